//! A real local S3-compatible server for tests: the `moto_server` executable from the
//! PyPI package `moto[server]` (installed by `scripts/setup`).
//!
//! [`MotoServer::start`] picks a free port, starts the server with its output in a log
//! file, and waits until it answers HTTP. Dropping the handle kills the process (by its
//! PID, through [`std::process::Child::kill`]) and reaps it. Moto keeps everything in
//! memory and does not check request signatures, so any credentials work; use
//! [`MotoServer::s3_env`] or [`s3_env_for`] for the `AWS_*` settings object_store reads.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The executable started by [`MotoServer::start`].
pub const MOTO_EXECUTABLE: &str = "moto_server";

/// How long [`MotoServer::start`] waits for one server process to answer HTTP.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of the log [`MotoServer::log_tail`] returns.
const LOG_TAIL_BYTES: u64 = 4096;

/// A running `moto_server` process on `127.0.0.1`, killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    // Holds the log file's directory; removed on drop, after the process is gone.
    _dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts `moto_server` on a free port of 127.0.0.1 and waits (at most
    /// [`START_TIMEOUT`]) until it answers an HTTP request.
    ///
    /// A port is chosen by binding it and releasing it (drawn below the kernel's
    /// ephemeral range, see `local::free_ports`); if another process takes it first and
    /// the server exits, a new port is tried (3 attempts in all).
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] when `moto_server` is not installed; otherwise an
    /// error carrying the tail of the server's log when it exits or does not answer.
    pub fn start() -> io::Result<MotoServer> {
        crate::local::with_port_attempts("moto_server", Self::start_once)
    }

    /// One attempt on one port. The outer error is fatal; the inner one means "the port
    /// could not be bound, try another".
    fn start_once() -> io::Result<io::Result<MotoServer>> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let dir = tempfile::Builder::new().prefix("tenax-moto-").tempdir()?;
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path)?;
        let child = Command::new(MOTO_EXECUTABLE)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    not_found()
                } else {
                    io::Error::new(e.kind(), format!("starting {MOTO_EXECUTABLE}: {e}"))
                }
            })?;
        let mut server = MotoServer {
            child,
            addr,
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                let tail = server.log_tail();
                // A pyenv shim without the command exits 127 ("command not found").
                if status.code() == Some(127) || tail.contains("command not found") {
                    return Err(not_found());
                }
                let msg = format!(
                    "{MOTO_EXECUTABLE} on port {port} exited with {status}; log tail:\n{tail}"
                );
                if tail.contains("Address already in use") || tail.contains("in use by another") {
                    return Ok(Err(io::Error::new(io::ErrorKind::AddrInUse, msg)));
                }
                return Err(io::Error::other(msg));
            }
            if crate::local::http_request(addr, "GET", "/", Duration::from_secs(2)).is_ok() {
                return Ok(Ok(server));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{MOTO_EXECUTABLE} on port {port} did not answer within {:?}; log tail:\n{}",
                        START_TIMEOUT,
                        server.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates bucket `name` with an unsigned `PUT /name` (moto does not check
    /// signatures).
    ///
    /// # Errors
    /// On a connection failure or any answer other than `200`.
    pub fn create_bucket(&self, name: &str) -> io::Result<()> {
        let (status, response) = crate::local::http_request(
            self.addr,
            "PUT",
            &format!("/{name}"),
            Duration::from_secs(10),
        )?;
        if status != 200 {
            return Err(io::Error::other(format!(
                "creating bucket {name:?} on {}: HTTP {status}: {response}",
                self.endpoint()
            )));
        }
        Ok(())
    }

    /// The `AWS_*` environment that points object_store (`AmazonS3Builder::from_env`)
    /// at this server; see [`s3_env_for`].
    pub fn s3_env(&self) -> Vec<(String, String)> {
        s3_env_for(&self.endpoint())
    }

    /// The last few KB of the server's stdout and stderr, for error messages.
    pub fn log_tail(&self) -> String {
        crate::local::log_tail(&self.log_path, LOG_TAIL_BYTES)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Only our own child, by PID; then reap it so that no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `AWS_*` environment for an S3-compatible server at `endpoint` (moto, or a
/// [`FaultProxy`](crate::http_proxy::FaultProxy) in front of it): plain HTTP,
/// path-style requests, region `us-east-1`, credentials `testing`/`testing`.
pub fn s3_env_for(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn not_found() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "moto_server not found on PATH: run scripts/setup (pip install \"moto[server]\")",
    )
}

/// A port that was free a moment ago ([`crate::local::free_ports`]).
fn free_port() -> io::Result<u16> {
    Ok(crate::local::free_ports(1)?[0])
}

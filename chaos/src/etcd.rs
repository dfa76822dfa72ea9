//! A real local etcd for tests and chaos runs: the `etcd` executable (Debian package
//! `etcd-server`, installed by `scripts/setup`).
//!
//! [`EtcdServer::start`] picks two free ports of 127.0.0.1 (client and peer), starts a
//! one-member cluster on a fresh temporary data directory with its output in a log file,
//! and waits until `GET /health` on the client URL answers `{"health":"true"...}`.
//! [`EtcdServer::stop`] kills the process (by its PID, through
//! [`std::process::Child::kill`]) and reaps it; [`EtcdServer::restart`] starts it again on
//! the same ports and the same data directory, so everything written survives, like an
//! etcd restart in production. Dropping the handle kills the process and removes the
//! directory.
//!
//! etcd 3.4 facts the tests rely on: the smallest lease TTL it grants is 2 s (with the
//! default 100 ms heartbeat and 1 s election timeout), expired leases are noticed up to
//! about 0.5 s late, and auto-compaction is off (a test compacts explicitly through the
//! client's `compact` call).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The executable started by [`EtcdServer::start`].
pub const ETCD_EXECUTABLE: &str = "etcd";

/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for the server to
/// report itself healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of the log [`EtcdServer::log_tail`] returns.
const LOG_TAIL_BYTES: u64 = 4096;

/// The member name of the one-member cluster.
const MEMBER_NAME: &str = "tenax-chaos";

/// A running one-member `etcd` on `127.0.0.1`, killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    /// The process while it runs; `None` after [`EtcdServer::stop`].
    child: Option<Child>,
    /// The client port (`--listen-client-urls`).
    client_port: u16,
    /// The peer port (`--listen-peer-urls`), unused by a one-member cluster but bound.
    peer_port: u16,
    /// The log file shared by every start of this server (appended to).
    log_path: PathBuf,
    /// The data directory, kept across restarts.
    data_dir: PathBuf,
    /// Holds the log and data directories; removed on drop, after the process is gone.
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts `etcd` on two free ports of 127.0.0.1 with a fresh data directory and waits
    /// (at most [`ETCD_START_TIMEOUT`]) until `GET /health` answers healthy.
    ///
    /// Ports are chosen by binding `127.0.0.1:0` and releasing it; if another process
    /// takes one first and etcd exits, new ports are tried (3 attempts in all).
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] when `etcd` is not installed; otherwise an error
    /// carrying the tail of the server's log when it exits or does not become healthy.
    pub fn start() -> io::Result<EtcdServer> {
        crate::local::with_port_attempts("etcd", Self::start_once)
    }

    /// One attempt on one pair of ports. The outer error is fatal; the inner one means
    /// "a port could not be bound, try others".
    fn start_once() -> io::Result<io::Result<EtcdServer>> {
        let (client_port, peer_port) = free_port_pair()?;
        let dir = tempfile::Builder::new().prefix("tenax-etcd-").tempdir()?;
        let log_path = dir.path().join("etcd.log");
        let data_dir = dir.path().join("data");
        File::create(&log_path)?;
        let mut server = EtcdServer {
            child: None,
            client_port,
            peer_port,
            log_path,
            data_dir,
            _dir: dir,
        };
        match server.spawn_and_wait() {
            Ok(()) => Ok(Ok(server)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(Err(e)),
            Err(e) => Err(e),
        }
    }

    /// Spawns the process on this server's ports and data directory, then waits until
    /// it is healthy. On failure the process is killed and reaped.
    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let log = OpenOptions::new().append(true).open(&self.log_path)?;
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let initial_cluster = format!("{MEMBER_NAME}={peer_url}");
        let cluster_token = format!("tenax-chaos-{}", self.client_port);
        let child = Command::new(ETCD_EXECUTABLE)
            .args([
                "--name",
                MEMBER_NAME,
                "--data-dir",
                &data_dir,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &cluster_token,
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    not_found()
                } else {
                    io::Error::new(e.kind(), format!("starting {ETCD_EXECUTABLE}: {e}"))
                }
            })?;
        self.child = Some(child);
        match self.wait_healthy() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill_and_reap();
                Err(e)
            }
        }
    }

    /// Polls `GET /health` every 50 ms until it answers healthy, the process exits, or
    /// [`ETCD_START_TIMEOUT`] passes.
    fn wait_healthy(&mut self) -> io::Result<()> {
        let addr = self.addr();
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => return Err(io::Error::other("etcd is not running")),
            };
            if let Some(status) = exited {
                let tail = self.log_tail();
                let msg = format!(
                    "{ETCD_EXECUTABLE} on client port {} / peer port {} exited with {status}; \
                     log tail:\n{tail}",
                    self.client_port, self.peer_port
                );
                if tail.contains("address already in use") {
                    return Err(io::Error::new(io::ErrorKind::AddrInUse, msg));
                }
                return Err(io::Error::other(msg));
            }
            if let Ok((200, body)) =
                crate::local::http_request(addr, "GET", "/health", Duration::from_secs(2))
            {
                if body.contains("\"health\":\"true\"") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{ETCD_EXECUTABLE} at {} was not healthy within {:?}; log tail:\n{}",
                        self.endpoint(),
                        ETCD_START_TIMEOUT,
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URL, `http://127.0.0.1:PORT`: what etcd clients connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The client socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The peer port (bound by the server, used by nobody in a one-member cluster).
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The server process's PID, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process was started and not stopped since (it may still have died on
    /// its own; [`EtcdServer::is_healthy`] asks it).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether `GET /health` answers healthy right now (2 s timeout).
    pub fn is_healthy(&self) -> bool {
        matches!(
            crate::local::http_request(self.addr(), "GET", "/health", Duration::from_secs(2)),
            Ok((200, body)) if body.contains("\"health\":\"true\"")
        )
    }

    /// The data directory, kept across [`EtcdServer::restart`].
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the process (SIGKILL to its PID, like a crash) and reaps it. Nothing
    /// happens when it is already stopped.
    ///
    /// # Errors
    /// When the kill or the wait fails for another reason than "already exited".
    pub fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            match child.kill() {
                Ok(()) => {}
                // Already exited: reaping below is all that is left.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                Err(e) => {
                    let pid = child.id();
                    self.child = Some(child);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("killing {ETCD_EXECUTABLE} (pid {pid}): {e}"),
                    ));
                }
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the server if it runs, then starts it again on the same ports and data
    /// directory (everything written survives) and waits until it is healthy.
    ///
    /// # Errors
    /// As [`EtcdServer::start`]; in particular [`io::ErrorKind::AddrInUse`] when another
    /// process took one of the ports meanwhile (the ports cannot change: clients hold
    /// the URL).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn_and_wait()
    }

    /// The last few KB of the server's stdout and stderr (all starts), for error
    /// messages.
    pub fn log_tail(&self) -> String {
        crate::local::log_tail(&self.log_path, LOG_TAIL_BYTES)
    }

    /// Kills and reaps the child, ignoring errors (drop and failed starts).
    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // Only our own child, by PID; then reap it so that no zombie is left.
        self.kill_and_reap();
    }
}

fn not_found() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "etcd not found on PATH: run scripts/setup (apt-get install etcd-server)",
    )
}

/// Two distinct ports that were free a moment ago (both bound at once, then released).
fn free_port_pair() -> io::Result<(u16, u16)> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

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
//! [`EtcdServer::start_tls`] starts one that serves its clients over TLS only and
//! requires a client certificate (`--client-cert-auth`): the certificates are made by
//! rcgen at start, PEM files in the server's directory ([`EtcdTlsFiles`]): a CA, a server
//! certificate for IP 127.0.0.1 and DNS `localhost`, a client certificate of that CA, and
//! one of another CA that the server does not trust. Its health is then polled on a
//! third, plain-HTTP port (`--listen-metrics-urls`). [`EtcdServer::etcdctl`] runs the
//! `etcdctl` executable (Debian package `etcd-client`) against the server with the right
//! flags, and [`EtcdServer::enable_auth`] turns on etcd's username/password
//! authentication through it. A restart keeps TLS, the certificates and (in the data
//! directory) the users.
//!
//! etcd 3.4 facts the tests rely on: the smallest lease TTL it grants is 2 s (with the
//! default 100 ms heartbeat and 1 s election timeout), expired leases are noticed up to
//! about 0.5 s late, and auto-compaction is off (a test compacts explicitly through the
//! client's `compact` call).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The executable started by [`EtcdServer::start`].
pub const ETCD_EXECUTABLE: &str = "etcd";

/// The executable run by [`EtcdServer::etcdctl`] (Debian package `etcd-client`).
pub const ETCDCTL_EXECUTABLE: &str = "etcdctl";

/// The common name of the client certificate in [`EtcdTlsFiles`]. It is no etcd user
/// name on purpose: etcd takes a client certificate's common name as the user of a
/// request that carries no auth token, and a test must not pass by that route.
pub const CLIENT_CERT_COMMON_NAME: &str = "tenax-test-client";

/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for the server to
/// report itself healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of the log [`EtcdServer::log_tail`] returns.
const LOG_TAIL_BYTES: u64 = 4096;

/// The member name of the one-member cluster.
const MEMBER_NAME: &str = "tenax-chaos";

/// The PEM files of a TLS [`EtcdServer`], made by rcgen in the server's directory when it
/// starts (ECDSA P-256 keys, certificates valid for decades).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// The CA certificate that signed the server and the client certificate: the
    /// server's `--trusted-ca-file`, and what a client trusts.
    pub ca: PathBuf,
    /// The server certificate (SANs: IP 127.0.0.1, DNS `localhost`).
    pub server_cert: PathBuf,
    /// The server certificate's key.
    pub server_key: PathBuf,
    /// A client certificate of [`EtcdTlsFiles::ca`], common name
    /// [`CLIENT_CERT_COMMON_NAME`].
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
    /// A client certificate of ANOTHER CA, which the server does not trust.
    pub untrusted_client_cert: PathBuf,
    /// The untrusted client certificate's key.
    pub untrusted_client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// Makes the CA, the server and the client certificates into `dir` (which exists).
    ///
    /// # Errors
    /// When rcgen fails or a file cannot be written.
    fn generate(dir: &Path) -> io::Result<EtcdTlsFiles> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let rc = |e: rcgen::Error| io::Error::other(format!("making test certificates: {e}"));
        let write = |name: &str, pem: String| -> io::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let ca = |cn: &str| -> io::Result<(String, Issuer<'static, KeyPair>)> {
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().map_err(rc)?;
            let cert = params.self_signed(&key).map_err(rc)?;
            Ok((cert.pem(), Issuer::new(params, key)))
        };
        let leaf = |issuer: &Issuer<'static, KeyPair>,
                    cn: &str,
                    server: bool|
         -> io::Result<(String, String)> {
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            if server {
                params.subject_alt_names = vec![
                    SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
                    SanType::DnsName("localhost".try_into().map_err(rc)?),
                ];
                // etcd also dials itself as a client (its gRPC gateway).
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            } else {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            let key = KeyPair::generate().map_err(rc)?;
            let cert = params.signed_by(&key, issuer).map_err(rc)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (ca_pem, issuer) = ca("tenax test etcd CA")?;
        let (server_cert, server_key) = leaf(&issuer, "tenax test etcd", true)?;
        let (client_cert, client_key) = leaf(&issuer, CLIENT_CERT_COMMON_NAME, false)?;
        let (_, other_issuer) = ca("tenax test etcd, another CA")?;
        let (untrusted_cert, untrusted_key) = leaf(&other_issuer, CLIENT_CERT_COMMON_NAME, false)?;
        Ok(EtcdTlsFiles {
            ca: write("ca.pem", ca_pem)?,
            server_cert: write("server.pem", server_cert)?,
            server_key: write("server-key.pem", server_key)?,
            client_cert: write("client.pem", client_cert)?,
            client_key: write("client-key.pem", client_key)?,
            untrusted_client_cert: write("untrusted-client.pem", untrusted_cert)?,
            untrusted_client_key: write("untrusted-client-key.pem", untrusted_key)?,
        })
    }
}

/// How [`EtcdServer::start_with`] starts etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdServerOptions {
    /// Serve clients over TLS only, requiring a client certificate (see
    /// [`EtcdServer::start_tls`]).
    pub tls: bool,
    /// More flags for `etcd`, e.g. `["--auth-token-ttl", "2"]`; given at every start.
    pub extra_args: Vec<String>,
}

/// A user [`EtcdServer::enable_auth`] creates: a role of the same name grants it read and
/// write on every key under `prefix`.
#[derive(Clone, Copy, Debug)]
pub struct EtcdUser<'a> {
    /// The user name (and its role's).
    pub name: &'a str,
    /// Its password.
    pub password: &'a str,
    /// The key prefix it may read and write, e.g. `/tenax/`.
    pub prefix: &'a str,
}

/// A running one-member `etcd` on `127.0.0.1`, killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    /// The process while it runs; `None` after [`EtcdServer::stop`].
    child: Option<Child>,
    /// The client port (`--listen-client-urls`).
    client_port: u16,
    /// The peer port (`--listen-peer-urls`), unused by a one-member cluster but bound.
    peer_port: u16,
    /// A TLS server's certificates, and its plain-HTTP port for `/health`
    /// (`--listen-metrics-urls`); `None`: plain HTTP, health on the client port.
    tls: Option<(EtcdTlsFiles, u16)>,
    /// The root password once [`EtcdServer::enable_auth`] ran (for later `etcdctl` calls).
    root_password: Option<String>,
    /// [`EtcdServerOptions::extra_args`].
    extra_args: Vec<String>,
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
        Self::start_with(&EtcdServerOptions::default())
    }

    /// Like [`EtcdServer::start`], but the server talks to its clients over TLS only and
    /// requires a client certificate of its CA (`--client-cert-auth`); the certificates
    /// are made first ([`EtcdServer::tls_files`]). Its [`EtcdServer::endpoint`] is
    /// `https://127.0.0.1:PORT`; health is polled on a third, plain-HTTP port.
    ///
    /// # Errors
    /// As [`EtcdServer::start`], and when the certificates cannot be made.
    pub fn start_tls() -> io::Result<EtcdServer> {
        Self::start_with(&EtcdServerOptions {
            tls: true,
            ..EtcdServerOptions::default()
        })
    }

    /// [`EtcdServer::start`] or [`EtcdServer::start_tls`] with `options`.
    ///
    /// # Errors
    /// As [`EtcdServer::start_tls`].
    pub fn start_with(options: &EtcdServerOptions) -> io::Result<EtcdServer> {
        crate::local::with_port_attempts("etcd", || Self::start_once(options))
    }

    /// One attempt on one set of ports. The outer error is fatal; the inner one means
    /// "a port could not be bound, try others".
    fn start_once(options: &EtcdServerOptions) -> io::Result<io::Result<EtcdServer>> {
        let (client_port, peer_port, metrics_port) = free_ports()?;
        let dir = tempfile::Builder::new().prefix("tenax-etcd-").tempdir()?;
        let log_path = dir.path().join("etcd.log");
        let data_dir = dir.path().join("data");
        File::create(&log_path)?;
        let tls = if options.tls {
            let pki = dir.path().join("pki");
            std::fs::create_dir(&pki)?;
            Some((EtcdTlsFiles::generate(&pki)?, metrics_port))
        } else {
            None
        };
        let mut server = EtcdServer {
            child: None,
            client_port,
            peer_port,
            tls,
            root_password: None,
            extra_args: options.extra_args.clone(),
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
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let initial_cluster = format!("{MEMBER_NAME}={peer_url}");
        let cluster_token = format!("tenax-chaos-{}", self.client_port);
        let mut tls_args: Vec<String> = Vec::new();
        if let Some((files, metrics_port)) = &self.tls {
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            tls_args = vec![
                "--cert-file".into(),
                path(&files.server_cert),
                "--key-file".into(),
                path(&files.server_key),
                "--trusted-ca-file".into(),
                path(&files.ca),
                "--client-cert-auth".into(),
                "--listen-metrics-urls".into(),
                format!("http://127.0.0.1:{metrics_port}"),
            ];
        }
        let child = Command::new(ETCD_EXECUTABLE)
            .args(&tls_args)
            .args(&self.extra_args)
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
        let addr = self.health_addr();
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

    /// The client URL, `http://127.0.0.1:PORT` (`https://` for a TLS server): what etcd
    /// clients connect to.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// A TLS server's certificates ([`EtcdServer::start_tls`]); `None` for plain HTTP.
    pub fn tls_files(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref().map(|(files, _)| files)
    }

    /// Where `GET /health` is asked: the client port, or a TLS server's metrics port.
    fn health_addr(&self) -> SocketAddr {
        match &self.tls {
            Some((_, metrics_port)) => SocketAddr::from((Ipv4Addr::LOCALHOST, *metrics_port)),
            None => self.addr(),
        }
    }

    /// Runs `etcdctl` (API v3) against this server with `args` and returns its standard
    /// output. The endpoint is given, for a TLS server the CA and the client certificate,
    /// and after [`EtcdServer::enable_auth`] the root user (through `ETCDCTL_USER`, not
    /// the command line). `stdin` is written to its standard input (e.g. a password for
    /// `user add NAME --interactive=false`).
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] when `etcdctl` is not installed; an error with its
    /// standard error when it exits non-zero.
    pub fn etcdctl(&self, args: &[&str], stdin: &str) -> io::Result<String> {
        let mut cmd = Command::new(ETCDCTL_EXECUTABLE);
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(files) = self.tls_files() {
            cmd.arg("--cacert")
                .arg(&files.ca)
                .arg("--cert")
                .arg(&files.client_cert)
                .arg("--key")
                .arg(&files.client_key);
        }
        match &self.root_password {
            Some(pw) => cmd.env("ETCDCTL_USER", format!("root:{pw}")),
            None => cmd.env_remove("ETCDCTL_USER"),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "etcdctl not found on PATH: run scripts/setup (apt-get install \
                         etcd-client)",
                    )
                } else {
                    io::Error::new(e.kind(), format!("starting {ETCDCTL_EXECUTABLE}: {e}"))
                }
            })?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{ETCDCTL_EXECUTABLE} {} at {} exited with {}: {}",
                args.first().copied().unwrap_or_default(),
                self.endpoint(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Turns on etcd's username/password authentication through `etcdctl`: adds user
    /// `root` with `root_password` and the root role, adds `user` with a role of the same
    /// name granted read and write on its prefix, then `auth enable`. From then on every
    /// request needs a user's token (the client certificate's common name is no user).
    /// The users live in the data directory: they survive a restart.
    ///
    /// # Errors
    /// As [`EtcdServer::etcdctl`].
    pub fn enable_auth(&mut self, root_password: &str, user: &EtcdUser<'_>) -> io::Result<()> {
        self.etcdctl(
            &["user", "add", "root", "--interactive=false"],
            root_password,
        )?;
        self.etcdctl(&["user", "grant-role", "root", "root"], "")?;
        self.etcdctl(&["role", "add", user.name], "")?;
        self.etcdctl(
            &[
                "role",
                "grant-permission",
                user.name,
                "--prefix=true",
                "readwrite",
                user.prefix,
            ],
            "",
        )?;
        self.etcdctl(
            &["user", "add", user.name, "--interactive=false"],
            user.password,
        )?;
        self.etcdctl(&["user", "grant-role", user.name, user.name], "")?;
        self.etcdctl(&["auth", "enable"], "")?;
        self.root_password = Some(root_password.to_string());
        Ok(())
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
            crate::local::http_request(self.health_addr(), "GET", "/health", Duration::from_secs(2)),
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

/// Three distinct ports that were free a moment ago ([`crate::local::free_ports`]):
/// client, peer, and metrics (used by a TLS server only).
fn free_ports() -> io::Result<(u16, u16, u16)> {
    let p = crate::local::free_ports(3)?;
    Ok((p[0], p[1], p[2]))
}

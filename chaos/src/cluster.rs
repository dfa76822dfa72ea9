//! A real local cluster for end-to-end and chaos tests: one etcd, one S3-compatible server
//! and N `tenax daemon` processes, all on 127.0.0.1, all in one temporary directory.
//!
//! [`LocalCluster::start`] starts an [`EtcdServer`] and a [`MotoServer`], creates the
//! checkpoint bucket and a temporary directory; no daemon runs yet.
//! [`LocalCluster::spawn_daemon`] starts node `i` as
//!
//! ```text
//! {tenax_bin} daemon --job JOB --etcd http://127.0.0.1:P --store s3://BUCKET/ckpt
//!     --listen 127.0.0.1:P1 --metrics-listen 127.0.0.1:P2 --node-id node-{i}
//!     --run-dir {dir}/node-{i} {TLS flags} {daemon_args...} {extra_args...}
//! ```
//!
//! where the TLS flags are `--tls-ca/--tls-cert/--tls-key` of a node certificate issued
//! by the cluster's throwaway CA (`tenax certs`, in `{dir}/tls`) with [`ClusterSpec::tls`],
//! and `--insecure` without.
//!
//! with the `AWS_*` environment of the S3 server plus [`ClusterSpec::env`], and its stdout
//! and stderr appended to `{dir}/node-{i}.log`. A node that exited can be spawned again
//! (whole-job restarts): it gets new ports and keeps appending to the same log, each start
//! preceded by a `--- tenax-chaos: node-{i} start K ---` line.
//!
//! Faults are signals sent by PID ([`LocalCluster::signal`]: SIGTERM, SIGKILL, SIGSTOP,
//! SIGCONT through the `kill` command). A PID is only signalled while this handle still
//! holds the unreaped child, so the PID cannot belong to anybody else.
//!
//! Teardown never depends on a test passing: dropping the handle (also while a failed
//! test unwinds) sends SIGKILL to every daemon it started and reaps it, then stops etcd
//! and the S3 server and removes the directory. Nothing this handle did not start is ever
//! signalled.
//!
//! Ports are chosen by binding `127.0.0.1:0` and releasing it, so another process can
//! take one before the daemon binds it; the daemon then exits with an error in its log.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdServer, MotoServer};

/// How often [`LocalCluster::wait`] polls a daemon.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// How much of a node's log [`LocalCluster::log_tail`] returns.
const LOG_TAIL_BYTES: u64 = 8192;

/// How many times a spawn is retried when the executable is busy (`ETXTBSY`).
const SPAWN_BUSY_ATTEMPTS: usize = 20;

/// Linux's `ETXTBSY`: the executable is open for writing, typically a test script that
/// another thread's fork inherited the write descriptor of a moment ago.
const ETXTBSY: i32 = 26;

/// What a [`LocalCluster`] runs: the binary, the job and what every daemon gets.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The `tenax` executable (integration tests of the `tenax` package pass
    /// `env!("CARGO_BIN_EXE_tenax")`).
    pub tenax_bin: PathBuf,
    /// The job name (`--job`).
    pub job: String,
    /// The bucket created on the S3 server; the store URL is `s3://{bucket}/ckpt`.
    pub bucket: String,
    /// Flags given to every daemon after the cluster's own, e.g.
    /// `["--preset", "tiny", "--steps", "20"]`.
    pub daemon_args: Vec<String>,
    /// Extra environment for every daemon (e.g. `CANDLE_NUM_THREADS=1`), set after the
    /// `AWS_*` variables of the S3 server, so it can override them.
    pub env: Vec<(String, String)>,
    /// Mutual TLS: the cluster makes a throwaway CA in its directory with `tenax certs`,
    /// a node certificate per daemon (`--tls-ca/--tls-cert/--tls-key`) and an operator
    /// certificate ([`LocalCluster::operator_tls_args`]). `false`: daemons run with
    /// `--insecure`.
    pub tls: bool,
}

impl ClusterSpec {
    /// A spec for `job` run by `tenax_bin`, with bucket `tenax-chaos`, no extra daemon
    /// flags, no extra environment, and mutual TLS.
    pub fn new(tenax_bin: impl Into<PathBuf>, job: impl Into<String>) -> ClusterSpec {
        ClusterSpec {
            tenax_bin: tenax_bin.into(),
            job: job.into(),
            bucket: "tenax-chaos".to_string(),
            daemon_args: Vec::new(),
            env: Vec::new(),
            tls: true,
        }
    }
}

/// A signal [`LocalCluster::signal`] sends to a daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGTERM: a graceful stop (the daemon drains and saves a final checkpoint).
    Term,
    /// SIGKILL: a crash, `kill -9`.
    Kill,
    /// SIGSTOP: a hang; the process stays alive but does nothing until [`Signal::Cont`].
    Stop,
    /// SIGCONT: resumes a stopped process.
    Cont,
}

impl Signal {
    /// The signal's name as `kill -s` takes it: `TERM`, `KILL`, `STOP`, `CONT`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }

    /// The signal's number on Linux (15, 9, 19, 18), as
    /// `std::os::unix::process::ExitStatusExt::signal` reports it.
    pub fn number(self) -> i32 {
        match self {
            Signal::Term => 15,
            Signal::Kill => 9,
            Signal::Stop => 19,
            Signal::Cont => 18,
        }
    }
}

/// One node's slot: its process and what its latest start was given.
#[derive(Debug, Default)]
struct NodeSlot {
    /// The latest start's process while it has not been reaped (running, stopped, or
    /// exited but not yet noticed); `None` before the first start and once reaped.
    child: Option<Child>,
    /// The latest start's exit status, once reaped.
    exit: Option<ExitStatus>,
    /// The latest start's `--listen` address.
    listen_addr: Option<String>,
    /// The latest start's `--metrics-listen` address.
    metrics_addr: Option<String>,
    /// How many times the node was started.
    starts: u32,
    /// The etcd endpoint this node is given instead of the cluster's (a fault proxy).
    etcd: Option<String>,
}

/// The folder of the cluster's CA and certificates, in its directory.
const TLS_DIR: &str = "tls";
/// The name of the cluster's operator certificate.
const OPERATOR: &str = "chaos";

/// How long `tenax certs ...` may take.
const CERTS_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `tenax ARGS` (e.g. `tenax certs ...`) to completion within [`CERTS_TIMEOUT`]
/// (killed past it); its stderr on failure.
fn run_tenax(bin: &Path, args: &[&str]) -> io::Result<()> {
    let what = || format!("{} {}", bin.display(), args.join(" "));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + CERTS_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not finish within {CERTS_TIMEOUT:?}", what()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    Err(io::Error::other(format!("{}: {}", what(), stderr.trim())))
}

/// A running local cluster: etcd, an S3 server and the daemons spawned so far. Dropping it
/// kills every daemon (SIGKILL by PID), stops both servers and removes its directory.
#[derive(Debug)]
pub struct LocalCluster {
    /// What the daemons run.
    spec: ClusterSpec,
    /// One slot per node index ever spawned (and every index below it).
    nodes: Vec<NodeSlot>,
    /// The etcd server; dropped after the daemons are killed.
    etcd: EtcdServer,
    /// The S3-compatible server; dropped after the daemons are killed.
    s3: MotoServer,
    /// Run directories and logs; removed last, once every process is gone.
    dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts etcd and the S3 server, creates bucket [`ClusterSpec::bucket`] and a
    /// temporary directory. No daemon is started; see [`LocalCluster::spawn_daemon`].
    ///
    /// # Errors
    /// When etcd or `moto_server` cannot be started (not installed:
    /// [`io::ErrorKind::NotFound`]), the bucket cannot be created or the directory
    /// cannot be made. Whatever was started is stopped again.
    pub fn start(spec: ClusterSpec) -> io::Result<LocalCluster> {
        let etcd = EtcdServer::start()?;
        let s3 = MotoServer::start()?;
        s3.create_bucket(&spec.bucket)?;
        let dir = tempfile::Builder::new()
            .prefix("tenax-cluster-")
            .tempdir()?;
        if spec.tls {
            let ca = dir.path().join(TLS_DIR);
            let ca = ca.to_string_lossy();
            run_tenax(
                &spec.tenax_bin,
                &["certs", "init", "--out", &ca, "--days", "2"],
            )?;
            run_tenax(
                &spec.tenax_bin,
                &[
                    "certs",
                    "issue",
                    "--ca",
                    &ca,
                    "--operator",
                    OPERATOR,
                    "--days",
                    "2",
                ],
            )?;
        }
        Ok(LocalCluster {
            spec,
            nodes: Vec::new(),
            etcd,
            s3,
            dir,
        })
    }

    /// The spec the cluster was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The folder of the cluster's CA and certificates, with [`ClusterSpec::tls`].
    pub fn tls_dir(&self) -> Option<PathBuf> {
        self.spec.tls.then(|| self.dir.path().join(TLS_DIR))
    }

    /// The flags that give a client (`tenax status`, `tenax control`) the cluster's
    /// operator certificate; none without [`ClusterSpec::tls`].
    pub fn operator_tls_args(&self) -> Vec<String> {
        self.tls_files(&format!("operator-{OPERATOR}"))
    }

    /// The `--tls-*` flags of files `<stem>.pem` and `<stem>-key.pem` of the TLS folder.
    fn tls_files(&self, stem: &str) -> Vec<String> {
        let Some(dir) = self.tls_dir() else {
            return Vec::new();
        };
        let path = |name: String| dir.join(name).to_string_lossy().into_owned();
        vec![
            "--tls-ca".into(),
            path("ca.pem".into()),
            "--tls-cert".into(),
            path(format!("{stem}.pem")),
            "--tls-key".into(),
            path(format!("{stem}-key.pem")),
        ]
    }

    /// etcd's client URL, `http://127.0.0.1:PORT` (what `--etcd` gets).
    pub fn etcd_endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// The checkpoint store URL, `s3://{bucket}/ckpt` (what `--store` gets).
    pub fn store_url(&self) -> String {
        format!("s3://{}/ckpt", self.spec.bucket)
    }

    /// The `AWS_*` environment that reaches the S3 server (given to every daemon; a test
    /// opening the store itself needs it too).
    pub fn s3_env(&self) -> Vec<(String, String)> {
        self.s3.s3_env()
    }

    /// The cluster's temporary directory: run directories and logs of every node.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The etcd server, e.g. to [`EtcdServer::stop`] and [`EtcdServer::restart`] it.
    pub fn etcd(&mut self) -> &mut EtcdServer {
        &mut self.etcd
    }

    /// The S3 server.
    pub fn s3(&self) -> &MotoServer {
        &self.s3
    }

    /// The number of node slots: one more than the highest node index ever spawned.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The `--node-id` of node `node`: `node-{node}`.
    pub fn node_id(node: usize) -> String {
        format!("node-{node}")
    }

    /// Node `node`'s `--run-dir`: `{dir}/node-{node}` (the same for every start).
    pub fn run_dir(&self, node: usize) -> PathBuf {
        self.dir().join(Self::node_id(node))
    }

    /// Node `node`'s log, `{dir}/node-{node}.log`: stdout and stderr of every start.
    pub fn log_path(&self, node: usize) -> PathBuf {
        self.dir().join(format!("{}.log", Self::node_id(node)))
    }

    /// Node `node`'s whole log (lossy UTF-8), empty when it was never started.
    pub fn log(&self, node: usize) -> String {
        match fs::read(self.log_path(node)) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// The last few KB of node `node`'s log, for assertion messages.
    pub fn log_tail(&self, node: usize) -> String {
        crate::local::log_tail(&self.log_path(node), LOG_TAIL_BYTES)
    }

    /// Node `node`'s `--listen` address (`127.0.0.1:PORT`) of its latest start, `None`
    /// when it was never started.
    pub fn listen_addr(&self, node: usize) -> Option<String> {
        self.nodes.get(node)?.listen_addr.clone()
    }

    /// Node `node`'s `--metrics-listen` address (`127.0.0.1:PORT`) of its latest start,
    /// `None` when it was never started.
    pub fn metrics_addr(&self, node: usize) -> Option<String> {
        self.nodes.get(node)?.metrics_addr.clone()
    }

    /// Node `node`'s PID while this handle holds its process (running, stopped, or exited
    /// but not yet reaped by [`LocalCluster::wait`]); `None` otherwise.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes.get(node)?.child.as_ref().map(Child::id)
    }

    /// How many times node `node` was started.
    pub fn starts(&self, node: usize) -> u32 {
        self.nodes.get(node).map_or(0, |slot| slot.starts)
    }

    /// Starts node `node` (see the module docs for its command line) with two fresh free
    /// ports, `spec.daemon_args` and then `extra_args`. A node whose previous process
    /// exited can be started again.
    ///
    /// # Errors
    /// [`io::ErrorKind::AlreadyExists`] when the node's process still runs (or is
    /// stopped); otherwise when the log or run directory cannot be made or the binary
    /// cannot be executed.
    pub fn spawn_daemon(&mut self, node: usize, extra_args: &[String]) -> io::Result<()> {
        self.spawn_daemon_env(node, extra_args, &[])
    }

    /// As [`Self::spawn_daemon`], with extra environment variables for this start only
    /// (e.g. a chaos hook that makes this one daemon fail at a chosen moment).
    pub fn spawn_daemon_env(
        &mut self,
        node: usize,
        extra_args: &[String],
        env: &[(String, String)],
    ) -> io::Result<()> {
        if self.nodes.len() <= node {
            self.nodes.resize_with(node + 1, NodeSlot::default);
        }
        if let Some(child) = self.nodes[node].child.as_mut() {
            match child.try_wait()? {
                Some(status) => {
                    self.nodes[node].child = None;
                    self.nodes[node].exit = Some(status);
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} still runs (pid {}); stop it before spawning it again",
                            Self::node_id(node),
                            child.id()
                        ),
                    ))
                }
            }
        }

        let run_dir = self.run_dir(node);
        fs::create_dir_all(&run_dir)?;
        let (listen_port, metrics_port) = free_port_pair()?;
        let listen_addr = format!("127.0.0.1:{listen_port}");
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        let starts = self.nodes[node].starts + 1;

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node))?;
        writeln!(
            log,
            "--- tenax-chaos: {} start {starts} ---",
            Self::node_id(node)
        )?;

        let mut args: Vec<String> = vec![
            "daemon".into(),
            "--job".into(),
            self.spec.job.clone(),
            "--etcd".into(),
            self.nodes[node]
                .etcd
                .clone()
                .unwrap_or_else(|| self.etcd_endpoint()),
            "--store".into(),
            self.store_url(),
            "--listen".into(),
            listen_addr.clone(),
            "--metrics-listen".into(),
            metrics_addr.clone(),
            "--node-id".into(),
            Self::node_id(node),
            "--run-dir".into(),
            run_dir.to_string_lossy().into_owned(),
        ];
        match self.tls_dir() {
            Some(ca) => {
                let id = Self::node_id(node);
                if !ca.join(format!("node-{id}.pem")).exists() {
                    let ca = ca.to_string_lossy();
                    run_tenax(
                        &self.spec.tenax_bin,
                        &["certs", "issue", "--ca", &ca, "--node", &id, "--days", "2"],
                    )?;
                }
                args.extend(self.tls_files(&format!("node-{id}")));
            }
            None => args.push("--insecure".into()),
        }
        args.extend(self.spec.daemon_args.iter().cloned());
        args.extend(extra_args.iter().cloned());

        let mut attempt = 0;
        let child = loop {
            attempt += 1;
            let spawned = Command::new(&self.spec.tenax_bin)
                .args(&args)
                .envs(self.s3_env())
                .envs(self.spec.env.iter().cloned())
                .envs(env.iter().cloned())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?)
                .spawn();
            match spawned {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(ETXTBSY) && attempt < SPAWN_BUSY_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "starting {} as {}: {e}",
                            self.spec.tenax_bin.display(),
                            Self::node_id(node)
                        ),
                    ))
                }
            }
        };

        let slot = &mut self.nodes[node];
        slot.child = Some(child);
        slot.exit = None;
        slot.listen_addr = Some(listen_addr);
        slot.metrics_addr = Some(metrics_addr);
        slot.starts = starts;
        Ok(())
    }

    /// Gives node `node` `endpoint` as its `--etcd` from its next start on (`None`: the
    /// cluster's etcd again), e.g. a fault proxy in front of etcd that can cut this one
    /// node off.
    pub fn set_node_etcd(&mut self, node: usize, endpoint: Option<String>) {
        if self.nodes.len() <= node {
            self.nodes.resize_with(node + 1, NodeSlot::default);
        }
        self.nodes[node].etcd = endpoint;
    }

    /// Sends `sig` to node `node`'s process by PID (`kill -s NAME PID`).
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] when this handle holds no process for the node (never
    /// started, or already reaped: its PID may belong to somebody else by now); otherwise
    /// when `kill` fails.
    pub fn signal(&self, node: usize, sig: Signal) -> io::Result<()> {
        let pid = self.pid(node).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} has no process to send SIG{} to (never started, or exited and reaped)",
                    Self::node_id(node),
                    sig.name()
                ),
            )
        })?;
        let output = Command::new("kill")
            .args(["-s", sig.name(), &pid.to_string()])
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "kill -s {} {pid} ({}) failed with {}: {}",
                sig.name(),
                Self::node_id(node),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Waits up to `timeout` for node `node`'s latest process to exit, polling every
    /// 20 ms, and reaps it. `Ok(Some(status))` once it exited (also on later calls),
    /// `Ok(None)` if it still runs (or is stopped) at the deadline; `Duration::ZERO`
    /// just checks.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] when the node was never started; otherwise when
    /// polling the process fails.
    pub fn wait(&mut self, node: usize, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let slot = match self.nodes.get_mut(node) {
            Some(slot) if slot.starts > 0 => slot,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} was never started", Self::node_id(node)),
                ))
            }
        };
        loop {
            let Some(child) = slot.child.as_mut() else {
                return Ok(slot.exit);
            };
            if let Some(status) = child.try_wait()? {
                slot.child = None;
                slot.exit = Some(status);
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(WAIT_POLL.min(deadline - now));
        }
    }

    /// [`LocalCluster::wait`] on every node slot, all within one shared `timeout`. The
    /// result is indexed by node; a slot never started reads `None`, like one still
    /// running.
    ///
    /// # Errors
    /// When polling a process fails.
    pub fn wait_all(&mut self, timeout: Duration) -> io::Result<Vec<Option<ExitStatus>>> {
        let deadline = Instant::now() + timeout;
        let mut statuses = Vec::with_capacity(self.nodes.len());
        for node in 0..self.nodes.len() {
            if self.nodes[node].starts == 0 {
                statuses.push(None);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            statuses.push(self.wait(node, left)?);
        }
        Ok(statuses)
    }

    /// Sends SIGKILL to every daemon process this handle holds (by PID, through
    /// [`Child::kill`]) and reaps it. Errors are ignored: it is also the teardown.
    pub fn kill_all(&mut self) {
        for slot in &mut self.nodes {
            if let Some(mut child) = slot.child.take() {
                let _ = child.kill();
                if let Ok(status) = child.wait() {
                    slot.exit = Some(status);
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Daemons first (only our own children, by PID); the servers and the directory
        // go afterwards, as the fields drop in declaration order.
        self.kill_all();
    }
}

/// Two distinct ports that were free a moment ago ([`crate::local::free_ports`]).
fn free_port_pair() -> io::Result<(u16, u16)> {
    let p = crate::local::free_ports(2)?;
    Ok((p[0], p[1]))
}

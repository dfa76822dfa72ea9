//! The flags and TOML keys of `tenax daemon`, and the settings resolved from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tenax_cluster::peer::Reduction;
use tenax_cluster::tls::{Tls, TlsFiles};

use crate::config::TrainArgs;

/// Flags of `tenax daemon` (the TOML file given by `--config` may hold the same keys).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct DaemonArgs {
    /// The job name: every node of one training run passes the same (letters, digits, . _ -).
    #[arg(long, env = "TENAX_JOB")]
    pub job: Option<String>,
    /// etcd client URL(s), comma-separated, e.g. http://10.0.0.5:2379.
    #[arg(long, env = "TENAX_ETCD")]
    pub etcd: Option<String>,
    /// TLS and authentication to etcd (--etcd-ca, --etcd-cert, --etcd-key, --etcd-user).
    #[command(flatten)]
    pub etcd_client: crate::etcd_args::EtcdClientArgs,
    /// Address the gRPC services (peer data plane and control) listen on [default: 0.0.0.0:7070].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address the other nodes and `tenax status` reach this node at [default: the
    /// listen address, with 127.0.0.1 for an unspecified IP].
    #[arg(long, value_name = "ADDR")]
    pub advertise_addr: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint; empty disables it [default: none].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// This node's id, unique in the job [default: <hostname>-<pid>].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Ranks this node hosts, on its CPUs (tenax has no GPU path yet) [default: 1].
    #[arg(long)]
    pub devices: Option<u32>,
    /// With --pipeline-stages S above 1: each node runs one stage of a pipeline whose other
    /// stages are other nodes (S nodes per pipeline, --devices 1), and keeps the whole
    /// model's state, so a lost stage's state is on every survivor and too few nodes for
    /// S stages train as a shorter pipeline, with the same bits. Without it each of a
    /// node's devices runs a whole pipeline of S stages.
    #[arg(long)]
    pub stages_across_nodes: bool,
    /// The job trains only with at least this many nodes; below it, it waits [default: 1].
    #[arg(long)]
    pub min_nodes: Option<usize>,
    /// This node starts training only in a group of at least this many nodes (a fresh
    /// job or a whole-job restart waits for all its nodes) [default: --min-nodes].
    #[arg(long)]
    pub start_nodes: Option<usize>,
    /// Gradient reduction: exact (slot-ordered reduce-scatter + all-gather, bit-identical
    /// to `tenax train --ranks N`) or ring (plain ring all-reduce) [default: exact].
    #[arg(long)]
    pub reduction: Option<String>,
    /// On SIGTERM: drain and save a final checkpoint within this many seconds, then exit [default: 60].
    #[arg(long)]
    pub grace_period_s: Option<u64>,
    /// Membership lease TTL in seconds: how fast a dead node is noticed (at least 2) [default: 5].
    #[arg(long)]
    pub lease_ttl_s: Option<i64>,
    /// After a membership change, wait this long for more before re-planning [default: 300].
    #[arg(long)]
    pub settle_ms: Option<u64>,
    /// While etcd does not answer, members whose step failed (a peer died) keep their state
    /// and wait this long for etcd before they exit, and a node started while etcd does not
    /// answer tries again for this long before it exits [default: 600].
    #[arg(long)]
    pub etcd_outage_timeout_s: Option<u64>,
    /// A new node (its run dir holds no earlier life of it) that cannot reach etcd at
    /// start gives up after this long, so a mistyped --etcd fails fast; a node that ran
    /// before waits --etcd-outage-timeout-s instead (it may be restarting during an
    /// outage) [default: 30].
    #[arg(long)]
    pub etcd_start_timeout_s: Option<u64>,
    /// Deadline of one step, collective included [default: 300].
    #[arg(long)]
    pub step_timeout_s: Option<u64>,
    /// A step that takes longer than max(this, 3 x the p99 of recent steps) makes the
    /// members it waits for suspects (the leader probes them; a confirmed one is evicted
    /// at once) [default: 2000].
    #[arg(long)]
    pub suspect_after_ms: Option<u64>,
    /// Every N steps the members compare parameter hashes; a member that differs copies
    /// the state from a peer, and the mismatch is logged and counted; 0: never [default: 100].
    #[arg(long)]
    pub hash_check_every: Option<u64>,
    /// The cluster CA certificate (PEM) for mutual TLS on the peer plane, state copies
    /// and the control API: made by `tenax certs init`.
    #[arg(long, env = "TENAX_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), issued by `tenax certs issue --node ID`; it names
    /// the node id [default --node-id: the id it names].
    #[arg(long, env = "TENAX_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM). The three files are read again on SIGHUP.
    #[arg(long, env = "TENAX_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Run without TLS: anyone who reaches the listen address can send frames, copy the
    /// model's state and drain the node. Only on a network you trust.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,
    /// TOML file with the daemon's and the training's keys (snake_case); flags win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Training flags, as for `tenax train` (`--store` is the job's store root: checkpoints
    /// go under <store>/<job>/; `--ranks` does not apply, see --devices).
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The daemon's own keys in a TOML config file; the rest are training keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonToml {
    job: Option<String>,
    etcd: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    listen: Option<String>,
    advertise_addr: Option<String>,
    metrics_listen: Option<String>,
    node_id: Option<String>,
    devices: Option<u32>,
    stages_across_nodes: Option<bool>,
    min_nodes: Option<usize>,
    start_nodes: Option<usize>,
    reduction: Option<String>,
    grace_period_s: Option<u64>,
    lease_ttl_s: Option<i64>,
    settle_ms: Option<u64>,
    etcd_outage_timeout_s: Option<u64>,
    etcd_start_timeout_s: Option<u64>,
    step_timeout_s: Option<u64>,
    suspect_after_ms: Option<u64>,
    hash_check_every: Option<u64>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure: Option<bool>,
}

const DAEMON_KEYS: &[&str] = &[
    "job",
    "etcd",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password_file",
    "listen",
    "advertise_addr",
    "metrics_listen",
    "node_id",
    "devices",
    "stages_across_nodes",
    "min_nodes",
    "start_nodes",
    "reduction",
    "grace_period_s",
    "lease_ttl_s",
    "settle_ms",
    "etcd_outage_timeout_s",
    "etcd_start_timeout_s",
    "step_timeout_s",
    "suspect_after_ms",
    "hash_check_every",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "insecure",
];

impl DaemonArgs {
    /// Fill unset flags from the `--config` file.
    pub(crate) fn with_file(mut self) -> Result<DaemonArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("config file {}: cannot read it", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow!("config file {}: {}", path.display(), e.message()))?;
        let mut own = toml::Table::new();
        for k in DAEMON_KEYS {
            if let Some(v) = table.remove(*k) {
                own.insert(k.to_string(), v);
            }
        }
        let own: DaemonToml = own.try_into().map_err(|e: toml::de::Error| {
            anyhow!("config file {}: {}", path.display(), e.message())
        })?;
        let train: TrainArgs = table.try_into().map_err(|e: toml::de::Error| {
            anyhow!("config file {}: {}", path.display(), e.message())
        })?;
        macro_rules! fill {
            ($($k:ident),*) => { $( if self.$k.is_none() { self.$k = own.$k; } )* };
        }
        fill!(
            job,
            etcd,
            listen,
            advertise_addr,
            metrics_listen,
            node_id,
            devices,
            min_nodes,
            start_nodes,
            reduction,
            grace_period_s,
            lease_ttl_s,
            settle_ms,
            etcd_outage_timeout_s,
            etcd_start_timeout_s,
            step_timeout_s,
            suspect_after_ms,
            hash_check_every,
            tls_ca,
            tls_cert,
            tls_key
        );
        self.insecure = self.insecure || own.insecure.unwrap_or(false);
        self.stages_across_nodes =
            self.stages_across_nodes || own.stages_across_nodes.unwrap_or(false);
        self.etcd_client
            .fill_unset(crate::etcd_args::EtcdClientArgs {
                etcd_ca: own.etcd_ca,
                etcd_cert: own.etcd_cert,
                etcd_key: own.etcd_key,
                etcd_user: own.etcd_user,
                etcd_password_file: own.etcd_password_file,
            });
        self.train = self.train.or(train);
        Ok(self)
    }
}

/// Resolved daemon settings.
pub(crate) struct Settings {
    pub(crate) job: String,
    pub(crate) etcd: Vec<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) advertise: Option<String>,
    pub(crate) metrics_listen: Option<SocketAddr>,
    pub(crate) node_id: String,
    pub(crate) devices: u32,
    /// Each node runs one pipeline stage (`--stages-across-nodes`).
    pub(crate) stages_across_nodes: bool,
    /// `--pipeline-stages` (1 without pipelines).
    pub(crate) pipeline_stages: u32,
    pub(crate) min_nodes: usize,
    pub(crate) start_nodes: usize,
    pub(crate) reduction: Reduction,
    pub(crate) grace: Duration,
    pub(crate) lease_ttl_s: i64,
    pub(crate) settle_ms: u64,
    pub(crate) etcd_outage_timeout: Duration,
    /// How long a new node waits for etcd at start (`--etcd-start-timeout-s`).
    pub(crate) etcd_start_timeout: Duration,
    pub(crate) step_timeout: Duration,
    pub(crate) suspect_after_ms: u64,
    pub(crate) hash_check_every: u64,
    pub(crate) store_root: String,
    /// Mutual TLS material (`None`: `--insecure`).
    pub(crate) tls: Option<Tls>,
}

impl Settings {
    /// The pipeline depth the job's plans have: `--pipeline-stages` when each node runs
    /// one stage, else 1 (each node's pipelines are whole, in its process).
    pub(crate) fn across_stages(&self) -> u32 {
        match self.stages_across_nodes {
            true => self.pipeline_stages,
            false => 1,
        }
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}-{}", std::process::id())
}

fn parse_addr(flag: &str, s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow!("{flag} {s:?}: not an address: give host:port, e.g. 0.0.0.0:7070"))
}

pub(crate) fn settings(args: &mut DaemonArgs) -> Result<Settings> {
    let job = args
        .job
        .clone()
        .ok_or_else(|| anyhow!("--job: missing: name the training job (the same on every node)"))?;
    if job.is_empty()
        || !job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("--job {job:?}: use letters, digits, '.', '_' and '-' only");
    }
    let etcd: Vec<String> = args
        .etcd
        .clone()
        .ok_or_else(|| {
            anyhow!("--etcd: missing: give the etcd client URL, e.g. http://127.0.0.1:2379")
        })?
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if etcd.is_empty() {
        bail!("--etcd: empty: give the etcd client URL, e.g. http://127.0.0.1:2379");
    }
    let store_root = args.train.store.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
        anyhow!("--store: missing: give the job's checkpoint store, e.g. s3://bucket/prefix or file:///shared/ckpt (checkpoints go under <store>/<job>/)")
    })?;
    if args.train.ranks.is_some() {
        bail!("--ranks is for `tenax train`; a daemon hosts --devices ranks");
    }
    let listen = parse_addr("--listen", args.listen.as_deref().unwrap_or("0.0.0.0:7070"))?;
    let metrics_listen = match args.metrics_listen.as_deref() {
        None | Some("") => None,
        Some(a) => Some(parse_addr("--metrics-listen", a)?),
    };
    let reduction: Reduction = args
        .reduction
        .as_deref()
        .unwrap_or("exact")
        .parse()
        .map_err(|e| anyhow!("--reduction: {e}"))?;
    let devices = args.devices.unwrap_or(1);
    if devices == 0 {
        bail!("--devices 0: a node hosts at least one rank");
    }
    let stages = args.train.pipeline_stages.unwrap_or(1);
    if args.stages_across_nodes && stages < 2 {
        bail!("--stages-across-nodes: needs --pipeline-stages of 2 or more (the stages the nodes share)");
    }
    if args.stages_across_nodes && devices != 1 {
        bail!("--stages-across-nodes with --devices {devices}: a node runs one stage; pass --devices 1");
    }
    if args.stages_across_nodes && reduction != Reduction::Exact {
        bail!("--stages-across-nodes with --reduction {}: stages on different nodes reduce exactly; pass --reduction exact", args.reduction.as_deref().unwrap_or(""));
    }
    let min_nodes = args.min_nodes.unwrap_or(1);
    if min_nodes == 0 {
        bail!("--min-nodes 0: a job needs at least one node");
    }
    let lease_ttl_s = args.lease_ttl_s.unwrap_or(5);
    if lease_ttl_s < tenax_cluster::etcd::MIN_LEASE_TTL_S {
        bail!(
            "--lease-ttl-s {lease_ttl_s}: etcd grants at least {} s",
            tenax_cluster::etcd::MIN_LEASE_TTL_S
        );
    }
    let tls = tls_settings(args)?;
    let certified = tls
        .as_ref()
        .and_then(|t| t.current().identity().node().map(str::to_string));
    let node_id = match (args.node_id.clone(), certified) {
        (Some(id), Some(named)) if id != named => bail!(
            "--node-id {id:?}: the certificate {} names node {named:?}; pass that id, or issue a certificate for {id:?} with `tenax certs issue --node {id}`",
            tls.as_ref().map(|t| t.files().cert.display().to_string()).unwrap_or_default()
        ),
        (Some(id), _) => id,
        (None, Some(named)) => named,
        (None, None) => default_node_id(),
    };
    Ok(Settings {
        job,
        etcd,
        listen,
        advertise: args.advertise_addr.clone(),
        metrics_listen,
        node_id,
        devices,
        stages_across_nodes: args.stages_across_nodes,
        pipeline_stages: stages.max(1),
        min_nodes,
        start_nodes: args.start_nodes.unwrap_or(min_nodes).max(min_nodes),
        reduction,
        grace: Duration::from_secs(args.grace_period_s.unwrap_or(60)),
        lease_ttl_s,
        settle_ms: args.settle_ms.unwrap_or(300),
        etcd_outage_timeout: Duration::from_secs(args.etcd_outage_timeout_s.unwrap_or(600).max(1)),
        etcd_start_timeout: Duration::from_secs(args.etcd_start_timeout_s.unwrap_or(30).max(1)),
        step_timeout: Duration::from_secs(args.step_timeout_s.unwrap_or(300).max(1)),
        suspect_after_ms: args.suspect_after_ms.unwrap_or(2000).max(1),
        hash_check_every: args.hash_check_every.unwrap_or(100),
        store_root,
        tls,
    })
}

/// The node's TLS material from `--tls-ca/--tls-cert/--tls-key`, or `None` with
/// `--insecure`; without either the daemon refuses to start.
fn tls_settings(args: &DaemonArgs) -> Result<Option<Tls>> {
    let given = [&args.tls_ca, &args.tls_cert, &args.tls_key];
    if args.insecure {
        if given.iter().any(|f| f.is_some()) {
            bail!("--insecure with --tls-*: choose one (the TLS settings may come from TENAX_TLS_* or the config file)");
        }
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key) else {
        if given.iter().all(|f| f.is_none()) {
            bail!("no TLS settings: give --tls-ca, --tls-cert and --tls-key (make them with `tenax certs init` and `tenax certs issue --node ID`), or --insecure to run without authentication on a network you trust");
        }
        bail!("--tls-ca, --tls-cert and --tls-key go together: give all three");
    };
    let tls = Tls::load(TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })
    .map_err(|e| anyhow!("TLS: {e}"))?;
    if tls.current().identity().node().is_none() {
        bail!(
            "--tls-cert {}: names {}, but a daemon needs a node certificate (`tenax certs issue --node ID`)",
            cert.display(),
            tls.current().identity()
        );
    }
    Ok(Some(tls))
}

/// `<root>/<job>`, whatever the root's trailing slash.
pub(crate) fn job_store_url(root: &str, job: &str) -> String {
    format!("{}/{job}", root.trim_end_matches('/'))
}

/// The warning for a daemon whose listen address `bound` is unspecified (0.0.0.0 or ::,
/// as the default `--listen`) and that has no `--advertise-addr`: it then advertises
/// 127.0.0.1, which peers on other hosts cannot reach. `None` when there is nothing to
/// warn about.
pub(crate) fn unroutable_advertise_warning(
    bound: SocketAddr,
    advertise: Option<&str>,
) -> Option<String> {
    if advertise.is_some() || !bound.ip().is_unspecified() {
        return None;
    }
    Some(format!(
        "--listen {bound} without --advertise-addr: this node advertises 127.0.0.1:{}, \
         which peers on other hosts cannot reach; pass --advertise-addr HOST:{} with an \
         address they can route to",
        bound.port(),
        bound.port()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_for_an_unspecified_listen_address_without_advertise_addr() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (listen, advertise, warns) in [
            ("0.0.0.0:7070", None, true),
            ("[::]:7070", None, true),
            ("0.0.0.0:7070", Some("10.0.0.11:7070"), false),
            ("127.0.0.1:7070", None, false),
            ("10.0.0.11:7070", None, false),
        ] {
            let got = unroutable_advertise_warning(addr(listen), advertise);
            assert_eq!(got.is_some(), warns, "{listen} {advertise:?}: {got:?}");
            if let Some(w) = got {
                assert!(!w.contains('\n'), "one line: {w}");
                assert!(
                    w.contains("127.0.0.1:7070") && w.contains("--advertise-addr"),
                    "{w}"
                );
            }
        }
    }
}

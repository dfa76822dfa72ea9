//! `tenax daemon`: one node of a job. It joins the job through etcd, trains its ranks of
//! every generation's plan with the other nodes over the gRPC peer data plane, saves
//! checkpoints to `<store>/<job>/` committed through a fenced etcd record, and serves the
//! control API and `/metrics`.
//!
//! The node's tree: the gRPC server (peer data plane and control) and the `/metrics`
//! endpoint run as children of a [`NodeSupervisor`] actor, each restarted on failure at
//! most 3 times a minute; one failure more and the node leaves the job after its current
//! step and exits non-zero. The membership agent ([`Member`]) holds the lease; a lost
//! membership (evicted while hung, cut off past the lease) makes the node register again
//! and copy the group's state from a peer. Members that are behind, diverged or new copy
//! the state from a donor at the start of a generation; late or broken peers are
//! reported to the leader, who evicts them once a probe or a second reporter confirms.
//! The trainer ([`Trainer`]: one rank actor per device, candle on dedicated threads) is
//! rebuilt from its last state at every generation. The Checkpoint actor
//! ([`Checkpointer`]) uploads in the background. [`run`] drives the training loop.

mod shell;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tenax_actors::{CheckpointPolicy, Checkpointer, NodeSupervisor, ServiceSpec};
use tenax_cluster::etcd::{EtcdConfig, EtcdMembership};
use tenax_cluster::member::{Detection, Member, MemberConfig, Prober};
use tenax_cluster::peer::{
    HubConfig, PeerHub, Reduction, CONNECTION_WINDOW_BYTES, MAX_HTTP2_FRAME_BYTES,
    STREAM_WINDOW_BYTES,
};
use tenax_core::detector::DetectorConfig;
use tenax_core::membership::{MemberId, MemberInfo, Plan, PlannerConfig};
use tenax_core::node::{Exit, NodeConfig, NodeMachine};
use tenax_core::restart::RestartPolicy;
use tenax_proto::v1 as pb;
use tenax_storage::{LoadedCheckpoint, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{TrainArgs, TrainConfig};
use crate::metrics::{MetricKind, Sample};
use crate::train::{prepare, start_state, Prepared, StoredConfig};
use shell::{Request, Shell};

/// The etcd key (under `/tenax/<job>/`) of the job's training-config record.
const CONFIG_KEY: &str = "config";

/// The etcd key (under `/tenax/<job>/`) of the newest committed checkpoint: written by a
/// fenced txn, the authority on which checkpoint a restarted job resumes from.
pub const CHECKPOINT_KEY: &str = "checkpoint";

/// Operator requests waiting for the node's loop, at most.
const REQUEST_QUEUE: usize = 16;

/// How long past SIGTERM's grace period the process is ended even if the node's loop is
/// stuck in a bounded wait.
const GRACE_BACKSTOP: Duration = Duration::from_secs(2);

/// Flags of `tenax daemon` (the TOML file given by `--config` may hold the same keys).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct DaemonArgs {
    /// The job name: every node of one training run passes the same (letters, digits, . _ -).
    #[arg(long, env = "TENAX_JOB")]
    pub job: Option<String>,
    /// etcd client URL(s), comma-separated, e.g. http://10.0.0.5:2379.
    #[arg(long, env = "TENAX_ETCD")]
    pub etcd: Option<String>,
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
    /// Ranks (CPU slots or GPUs) this node hosts [default: 1].
    #[arg(long)]
    pub devices: Option<u32>,
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
    listen: Option<String>,
    advertise_addr: Option<String>,
    metrics_listen: Option<String>,
    node_id: Option<String>,
    devices: Option<u32>,
    min_nodes: Option<usize>,
    start_nodes: Option<usize>,
    reduction: Option<String>,
    grace_period_s: Option<u64>,
    lease_ttl_s: Option<i64>,
    settle_ms: Option<u64>,
    step_timeout_s: Option<u64>,
    suspect_after_ms: Option<u64>,
    hash_check_every: Option<u64>,
}

const DAEMON_KEYS: &[&str] = &[
    "job",
    "etcd",
    "listen",
    "advertise_addr",
    "metrics_listen",
    "node_id",
    "devices",
    "min_nodes",
    "start_nodes",
    "reduction",
    "grace_period_s",
    "lease_ttl_s",
    "settle_ms",
    "step_timeout_s",
    "suspect_after_ms",
    "hash_check_every",
];

impl DaemonArgs {
    /// Fill unset flags from the `--config` file.
    fn with_file(mut self) -> Result<DaemonArgs> {
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
            step_timeout_s,
            suspect_after_ms,
            hash_check_every
        );
        self.train = self.train.or(train);
        Ok(self)
    }
}

/// What `/tenax/<job>/checkpoint` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointRecord {
    /// Steps the checkpoint holds.
    pub step: u64,
    /// Its folder, relative to the job's store.
    pub folder: String,
    /// Its URL.
    pub url: String,
    /// The generation that committed it.
    pub generation: u64,
    /// The member that committed it.
    pub member: String,
}

/// What `/tenax/<job>/config` holds: the first node's training config.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ConfigRecord {
    config_hash: String,
    math: serde_json::Map<String, serde_json::Value>,
    corpus_sha256: String,
    node: String,
}

/// What the node shows through Status and `/metrics`.
#[derive(Debug, Default, Clone)]
struct NodeView {
    generation: u64,
    ranks: Vec<u32>,
    world: u32,
    step: u64,
    target_steps: u64,
    loss: f64,
    tokens_per_s: f64,
    param_hash: String,
    last_checkpoint_step: u64,
    last_checkpoint_url: String,
    phase: String,
    leader: bool,
    checkpoints_committed: u64,
    checkpoint_failures: u64,
    last_save_s: f64,
    save_s_sum: f64,
    reforms: u64,
    state_copies_in: u64,
    state_copies_out: u64,
    state_bytes_in: u64,
    last_copy_gb_per_s: f64,
    hash_mismatches: u64,
    suspicions: u64,
    probes_sent: u64,
    revocations: u64,
}

/// State shared by the loop, the control service and the metrics endpoint.
struct Shared {
    job: String,
    member_id: String,
    addr: String,
    metrics_addr: String,
    config_hash: String,
    view: Mutex<NodeView>,
    /// Operator requests to the node's loop (bounded; a full queue refuses the request).
    requests: mpsc::Sender<Request>,
    hub: PeerHub,
    /// Why the node must leave (a service kept failing), if it must.
    fatal: Mutex<Option<String>>,
}

impl Shared {
    fn view(&self) -> std::sync::MutexGuard<'_, NodeView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: &str) {
        self.view().phase = phase.to_string();
    }

    /// Hand an operator request to the node's loop.
    fn request(&self, req: Request) -> Result<(), tonic::Status> {
        self.requests.try_send(req).map_err(|e| {
            tonic::Status::unavailable(format!(
                "node {}: cannot take the request now ({e}); try again",
                self.member_id
            ))
        })
    }

    fn status(&self) -> pb::StatusReply {
        let v = self.view().clone();
        pb::StatusReply {
            job: self.job.clone(),
            member_id: self.member_id.clone(),
            addr: self.addr.clone(),
            generation: v.generation,
            ranks: v.ranks,
            world: v.world,
            step: v.step,
            target_steps: v.target_steps,
            loss: v.loss,
            tokens_per_s: v.tokens_per_s,
            param_hash: v.param_hash,
            last_checkpoint_step: v.last_checkpoint_step,
            last_checkpoint_url: v.last_checkpoint_url,
            phase: v.phase,
            leader: v.leader,
            stale_refused: self.hub.stale_refused(),
            metrics_addr: self.metrics_addr.clone(),
            config_hash: self.config_hash.clone(),
        }
    }

    fn metrics(&self) -> String {
        let v = self.view().clone();
        let node = |s: Sample| s.label("job", &self.job).label("node", &self.member_id);
        let g = MetricKind::Gauge;
        let c = MetricKind::Counter;
        let samples = vec![
            node(Sample::new(
                "tenax_step",
                "Optimizer steps completed.",
                g,
                v.step as f64,
            )),
            node(Sample::new(
                "tenax_target_steps",
                "The job's target step.",
                g,
                v.target_steps as f64,
            )),
            node(Sample::new(
                "tenax_loss",
                "Mean token loss of the last step.",
                g,
                v.loss,
            )),
            node(Sample::new(
                "tenax_tokens_per_second",
                "Training throughput of the last step (whole group).",
                g,
                v.tokens_per_s,
            )),
            node(Sample::new(
                "tenax_generation",
                "Generation of the group plan this node trains in.",
                g,
                v.generation as f64,
            )),
            node(Sample::new(
                "tenax_world_ranks",
                "Ranks in the current generation.",
                g,
                f64::from(v.world),
            )),
            node(Sample::new(
                "tenax_leader",
                "1 if this node leads the job.",
                g,
                if v.leader { 1.0 } else { 0.0 },
            )),
            node(Sample::new(
                "tenax_reformations_total",
                "Generations this node has trained in after its first.",
                c,
                v.reforms as f64,
            )),
            node(Sample::new(
                "tenax_checkpoints_committed_total",
                "Checkpoints this node committed.",
                c,
                v.checkpoints_committed as f64,
            )),
            node(Sample::new(
                "tenax_checkpoint_failures_total",
                "Checkpoint saves of this node that failed.",
                c,
                v.checkpoint_failures as f64,
            )),
            node(Sample::new(
                "tenax_checkpoint_save_seconds_last",
                "Duration of the last checkpoint save (upload and commit).",
                g,
                v.last_save_s,
            )),
            node(Sample::new(
                "tenax_checkpoint_save_seconds_sum",
                "Total time spent in checkpoint saves.",
                c,
                v.save_s_sum,
            )),
            node(Sample::new(
                "tenax_last_checkpoint_step",
                "Step of the newest committed checkpoint this node knows.",
                g,
                v.last_checkpoint_step as f64,
            )),
            node(Sample::new(
                "tenax_peer_stale_refused_total",
                "Peer frames refused because they came from an older generation.",
                c,
                self.hub.stale_refused() as f64,
            )),
            node(Sample::new(
                "tenax_peer_frames_accepted_total",
                "Peer frames accepted.",
                c,
                self.hub.frames_accepted() as f64,
            )),
            node(Sample::new(
                "tenax_state_copies_received_total",
                "Times this node copied the group's state from a peer (join, behind, diverged).",
                c,
                v.state_copies_in as f64,
            )),
            node(Sample::new(
                "tenax_state_copies_served_total",
                "Times this node sent its state to peers that lacked it.",
                c,
                v.state_copies_out as f64,
            )),
            node(Sample::new(
                "tenax_state_bytes_received_total",
                "Bytes of state copied from peers.",
                c,
                v.state_bytes_in as f64,
            )),
            node(Sample::new(
                "tenax_state_copy_gigabytes_per_second_last",
                "Throughput of the last state copy from a peer.",
                g,
                v.last_copy_gb_per_s,
            )),
            node(Sample::new(
                "tenax_param_hash_mismatches_total",
                "Periodic comparisons that found members with different parameters (each resyncs the odd ones).",
                c,
                v.hash_mismatches as f64,
            )),
            node(Sample::new(
                "tenax_leader_probes_total",
                "Suspects this node probed as leader.",
                c,
                v.probes_sent as f64,
            )),
            node(Sample::new(
                "tenax_leader_revocations_total",
                "Leases of confirmed suspects this node revoked as leader (evictions).",
                c,
                v.revocations as f64,
            )),
            node(Sample::new(
                "tenax_suspicions_reported_total",
                "Peers this node reported as suspects (a broken stream or a late step).",
                c,
                v.suspicions as f64,
            )),
        ];
        crate::metrics::render(&samples)
    }
}

/// The control service.
struct ControlService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        Ok(tonic::Response::new(self.shared.status()))
    }

    async fn drain(
        &self,
        req: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.shared.request(Request::Drain {
            checkpoint: req.get_ref().checkpoint,
        })?;
        Ok(reply(
            true,
            format!(
                "node {} leaves the job after its current step{}",
                self.shared.member_id,
                if req.get_ref().checkpoint {
                    ", after saving a checkpoint"
                } else {
                    ""
                }
            ),
        ))
    }

    async fn checkpoint_now(
        &self,
        _: tonic::Request<pb::CheckpointNowRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.shared.request(Request::CheckpointNow)?;
        Ok(reply(
            true,
            format!(
                "node {} saves a checkpoint at its next step boundary",
                self.shared.member_id
            ),
        ))
    }

    async fn pause(
        &self,
        _: tonic::Request<pb::PauseRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.shared.request(Request::Pause)?;
        Ok(reply(true, format!("node {} pauses at its next step boundary (pause the whole job with `tenax control pause --all`: peers kept waiting by one paused node report it as late after --suspect-after-ms, and it may be evicted)", self.shared.member_id)))
    }

    async fn resume(
        &self,
        _: tonic::Request<pb::ResumeRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.shared.request(Request::Resume)?;
        Ok(reply(
            true,
            format!("node {} goes on training", self.shared.member_id),
        ))
    }
}

fn reply(accepted: bool, message: String) -> tonic::Response<pb::ControlReply> {
    tonic::Response::new(pb::ControlReply { accepted, message })
}

/// A service's listener: the one bound at start-up first, then (after a restart) a new
/// one on the same address.
struct Rebind {
    first: Mutex<Option<tokio::net::TcpListener>>,
    addr: SocketAddr,
}

impl Rebind {
    fn new(first: tokio::net::TcpListener, addr: SocketAddr) -> Self {
        Self {
            first: Mutex::new(Some(first)),
            addr,
        }
    }

    async fn listener(&self) -> Result<tokio::net::TcpListener, String> {
        let taken = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(l) => Ok(l),
            None => tokio::net::TcpListener::bind(self.addr)
                .await
                .map_err(|e| format!("binding {} again: {e}", self.addr)),
        }
    }
}

/// Resolved daemon settings.
struct Settings {
    job: String,
    etcd: Vec<String>,
    listen: SocketAddr,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
    node_id: String,
    devices: u32,
    min_nodes: usize,
    start_nodes: usize,
    reduction: Reduction,
    grace: Duration,
    lease_ttl_s: i64,
    settle_ms: u64,
    step_timeout: Duration,
    suspect_after_ms: u64,
    hash_check_every: u64,
    store_root: String,
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

fn settings(args: &mut DaemonArgs) -> Result<Settings> {
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
    Ok(Settings {
        job,
        etcd,
        listen,
        advertise: args.advertise_addr.clone(),
        metrics_listen,
        node_id: args.node_id.clone().unwrap_or_else(default_node_id),
        devices,
        min_nodes,
        start_nodes: args.start_nodes.unwrap_or(min_nodes).max(min_nodes),
        reduction,
        grace: Duration::from_secs(args.grace_period_s.unwrap_or(60)),
        lease_ttl_s,
        settle_ms: args.settle_ms.unwrap_or(300),
        step_timeout: Duration::from_secs(args.step_timeout_s.unwrap_or(300).max(1)),
        suspect_after_ms: args.suspect_after_ms.unwrap_or(2000).max(1),
        hash_check_every: args.hash_check_every.unwrap_or(100),
        store_root,
    })
}

/// `<root>/<job>`, whatever the root's trailing slash.
fn job_store_url(root: &str, job: &str) -> String {
    format!("{}/{job}", root.trim_end_matches('/'))
}

/// Where a restarted job resumes: the fenced etcd record, or (when etcd lost its data)
/// the newest checkpoint of the store that verifies.
async fn find_resume_point(
    etcd: &EtcdMembership,
    store: &Store,
) -> Result<Option<LoadedCheckpoint>> {
    let record = etcd.get(CHECKPOINT_KEY).await.map_err(|e| anyhow!("{e}"))?;
    if let Some(bytes) = record {
        let rec: CheckpointRecord = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!("etcd key {CHECKPOINT_KEY} of job {}: not a checkpoint record ({e}): delete it with etcdctl to fall back to the store's manifests", etcd.config().job)
        })?;
        match tenax_storage::load_checkpoint(store, &rec.folder).await {
            Ok(c) => {
                println!(
                    "resuming from the committed checkpoint of step {} ({})",
                    rec.step, rec.url
                );
                return Ok(Some(c));
            }
            Err(e) => eprintln!(
                "warning: the committed checkpoint of step {} ({}) does not load ({e}); falling back to the newest checkpoint that verifies",
                rec.step, rec.url
            ),
        }
    }
    match tenax_storage::latest_verified(store)
        .await
        .map_err(|e| anyhow!("{e}"))?
    {
        None => Ok(None),
        Some((c, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "resuming from step {} ({}): found in the store's manifests (no usable etcd record)",
                c.manifest.step, c.url
            );
            Ok(Some(c))
        }
    }
}

/// Whether the job is running: the stored plan names a member that is registered now.
/// Says which, for the log.
async fn live_group(etcd: &EtcdMembership) -> Result<Option<String>> {
    let Some(record) = etcd.read_plan().await.map_err(|e| anyhow!("{e}"))? else {
        return Ok(None);
    };
    let Ok(plan) = serde_json::from_slice::<Plan>(&record.plan) else {
        return Ok(None);
    };
    let registered: Vec<String> = etcd
        .members()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let live: Vec<&str> = plan
        .ranks
        .iter()
        .map(|a| a.member.as_str())
        .filter(|m| registered.iter().any(|r| r == m))
        .collect();
    Ok((!live.is_empty()).then(|| {
        format!(
            "job {} is running (generation {}, members {})",
            etcd.config().job,
            plan.generation,
            live.join(", ")
        )
    }))
}

/// Fix the job's training config in etcd (the first node does) or check ours against it.
async fn agree_on_config(etcd: &EtcdMembership, node: &str, prep: &Prepared) -> Result<()> {
    let ours = ConfigRecord {
        config_hash: prep.config_hash.clone(),
        math: prep.cfg.math(),
        corpus_sha256: prep.stored_cfg.corpus_sha256.clone(),
        node: node.to_string(),
    };
    let bytes = serde_json::to_vec(&ours).expect("config record serialises");
    let stored = etcd
        .put_if_absent(CONFIG_KEY, &bytes)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let theirs: ConfigRecord = serde_json::from_slice(&stored).map_err(|e| {
        anyhow!(
            "etcd key {CONFIG_KEY} of job {}: not a config record ({e})",
            etcd.config().job
        )
    })?;
    if theirs.config_hash == ours.config_hash {
        return Ok(());
    }
    let mut diffs: Vec<String> = theirs
        .math
        .iter()
        .filter(|(k, v)| ours.math.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: job has {v}, this node has {}",
                ours.math.get(k).cloned().unwrap_or_default()
            )
        })
        .collect();
    if theirs.corpus_sha256 != ours.corpus_sha256 {
        diffs.push(format!(
            "corpus sha256: job has {}, this node has {}",
            theirs.corpus_sha256, ours.corpus_sha256
        ));
    }
    if diffs.is_empty() {
        diffs.push("model or tokenizer".to_string());
    }
    bail!(
        "node {node} refused: its training config differs from job {}'s (set by node {}): {}; start it with the job's config, or use another --job",
        etcd.config().job,
        theirs.node,
        diffs.join("; ")
    )
}

/// Run `tenax daemon` until the job reaches its target step (exit 0) or the node leaves.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let mut args = args.with_file()?;
    let s = settings(&mut args)?;
    let started = Instant::now();

    // etcd and the store first: without them there is nothing to join.
    let mut etcd_cfg = EtcdConfig::new(s.etcd.clone(), s.job.clone());
    etcd_cfg.lease_ttl_s = s.lease_ttl_s;
    let etcd = EtcdMembership::connect(etcd_cfg.clone())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let store_url = job_store_url(&s.store_root, &s.job);
    let store = Store::open(&store_url).map_err(|e| anyhow!("{e}"))?;
    // A node joining a running job copies the state from a peer: it loads nothing. A
    // fresh job, or a whole-job restart, loads the committed checkpoint.
    let live = live_group(&etcd).await?;
    let resumed = match &live {
        Some(why) => {
            println!(
                "{why}: this node will copy the state from a peer instead of loading a checkpoint"
            );
            None
        }
        None => find_resume_point(&etcd, &store).await?,
    };
    let stored: Option<StoredConfig> = match &resumed {
        Some(c) => Some(serde_json::from_value(c.manifest.config.clone()).map_err(|e| {
            anyhow!("checkpoint {}: its config does not parse ({e}): it was not written by this version of tenax", c.url)
        })?),
        None => None,
    };

    // The training config, checked against the checkpoint and the job.
    let run_dir = args
        .train
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/{}/{}", s.job, s.node_id)));
    std::fs::create_dir_all(&run_dir).map_err(|e| {
        anyhow!(
            "run dir {}: cannot create it ({e}): pick a writable --run-dir",
            run_dir.display()
        )
    })?;
    let mut train_args = args.train.clone();
    train_args.run_dir = Some(run_dir.clone());
    train_args.store = Some(store_url.clone());
    train_args.ranks = Some(1);
    let cfg = TrainConfig::resolve(train_args, stored.as_ref().map(|s| &s.train))?;
    if let Some(st) = &stored {
        let diffs = cfg.math_differences(&st.train);
        if !diffs.is_empty() {
            bail!(
                "cannot resume job {} from {}: this node's training config differs ({}): use the checkpoint's values or a new --job",
                s.job,
                resumed.as_ref().map(|c| c.url.as_str()).unwrap_or(""),
                diffs.join("; ")
            );
        }
    }
    let mut prep = prepare(cfg, stored.as_ref(), &run_dir)?;
    prep.setup.step_timeout = s.step_timeout;
    agree_on_config(&etcd, &s.node_id, &prep).await?;
    let start = start_state(&prep, resumed.as_ref())?;
    drop(resumed);

    // The gRPC server (peer data plane + control) and /metrics.
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .map_err(|e| anyhow!("--listen {}: cannot bind ({e}): pick a free port", s.listen))?;
    let bound = listener.local_addr().context("listen address")?;
    let advertise = match &s.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
        None => bound.to_string(),
    };
    let metrics_listener =
        match s.metrics_listen {
            None => None,
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
                anyhow!("--metrics-listen {a}: cannot bind ({e}): pick a free port")
            })?),
        };
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| {
            if a.ip().is_unspecified() {
                format!("127.0.0.1:{}", a.port())
            } else {
                a.to_string()
            }
        })
        .unwrap_or_default();
    let hub = PeerHub::new(s.job.clone(), HubConfig::default());
    let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let shared = Arc::new(Shared {
        job: s.job.clone(),
        member_id: s.node_id.clone(),
        addr: advertise.clone(),
        metrics_addr: metrics_addr.clone(),
        config_hash: prep.config_hash.clone(),
        view: Mutex::new(NodeView {
            step: start.step,
            target_steps: prep.cfg.steps,
            phase: "joining".into(),
            loss: f64::NAN,
            ..Default::default()
        }),
        requests: requests_tx,
        hub: hub.clone(),
        fatal: Mutex::new(None),
    });
    // The node's services run under the node supervisor, each with a restart policy: a
    // restart binds the same address again; too many failures make the node leave.
    let shutdown = CancellationToken::new();
    let policy = RestartPolicy {
        max_restarts: 3,
        window_ms: 60_000,
    };
    let mut services = vec![ServiceSpec {
        name: "grpc".into(),
        policy,
        start: {
            let listeners = Arc::new(Rebind::new(listener, bound));
            let shared = shared.clone();
            let token = shutdown.clone();
            Arc::new(move |_run| {
                let listeners = listeners.clone();
                let shared = shared.clone();
                let token = token.clone();
                Box::pin(async move {
                    let listener = listeners.listener().await?;
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    let control = pb::control_server::ControlServer::new(ControlService {
                        shared: shared.clone(),
                    });
                    tonic::transport::Server::builder()
                        .tcp_nodelay(true)
                        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
                        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
                        .max_frame_size(MAX_HTTP2_FRAME_BYTES)
                        .add_service(shared.hub.service())
                        .add_service(control)
                        .serve_with_incoming_shutdown(incoming, token.cancelled())
                        .await
                        .map_err(|e| format!("gRPC server on {bound}: {e}"))
                })
            })
        },
    }];
    if let Some(l) = metrics_listener {
        let addr = l.local_addr().context("metrics address")?;
        let listeners = Arc::new(Rebind::new(l, addr));
        let shared = shared.clone();
        let token = shutdown.clone();
        services.push(ServiceSpec {
            name: "metrics".into(),
            policy,
            start: Arc::new(move |_run| {
                let listeners = listeners.clone();
                let shared = shared.clone();
                let token = token.clone();
                Box::pin(async move {
                    let listener = listeners.listener().await?;
                    let sh = shared.clone();
                    crate::metrics::serve(listener, Arc::new(move || sh.metrics()), token).await;
                    Ok(())
                })
            }),
        });
    }
    let supervisor = NodeSupervisor::start(services)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    {
        // A service that keeps failing: leave the job after the current step.
        let mut failed = supervisor.failed();
        let sh = shared.clone();
        tokio::spawn(async move {
            loop {
                let failure = failed.borrow_and_update().clone();
                if let Some(reason) = failure {
                    eprintln!("node {}: {reason}: leaving the job", sh.member_id);
                    *sh.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                    let _ = sh.requests.send(Request::Drain { checkpoint: false }).await;
                    return;
                }
                if failed.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    println!(
        "node {} of job {}: gRPC on {} (advertised {advertise}){}; store {store_url}; config {}",
        s.node_id,
        s.job,
        bound,
        if metrics_addr.is_empty() {
            String::new()
        } else {
            format!(", metrics on http://{metrics_addr}/metrics")
        },
        &prep.config_hash[..12]
    );

    // SIGTERM/SIGINT: drain with a final checkpoint, bounded by the grace period (the
    // node's machine exits with status 3 when it runs out; this task is the backstop for
    // a loop stuck in a bounded wait past it).
    {
        let sh = shared.clone();
        let grace = s.grace;
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = sh.requests.send(Request::Sigterm).await;
            tokio::time::sleep(grace + GRACE_BACKSTOP).await;
            eprintln!(
                "error: node {}: the grace period of {} s ran out before the drain finished; exiting",
                sh.member_id,
                grace.as_secs()
            );
            std::process::exit(3);
        });
    }

    // Join the job.
    let planner = PlannerConfig {
        min_members: s.min_nodes,
        max_ranks_per_member: s.devices,
        settle_ms: s.settle_ms,
        settle_max_ms: s.settle_ms.saturating_mul(3).max(s.settle_ms),
        ..Default::default()
    };
    let join = MemberConfig {
        etcd: etcd_cfg,
        planner,
        id: s.node_id.clone(),
        devices: s.devices,
        addr: advertise.clone(),
        metrics_addr,
    };
    let member = start_member(&etcd, &join).await?;

    let checkpointer = Checkpointer::start(
        store.clone(),
        CheckpointPolicy {
            writers: 1,
            retention: None,
        },
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let mut deadline = DetectorConfig {
        window: 256,
        k: 3,
        min_deadline_ms: s.suspect_after_ms,
        min_samples: 8,
    };
    deadline
        .validate()
        .map_err(|e| anyhow!("--suspect-after-ms: {e}"))?;
    let mut rules = NodeConfig::daemon(
        MemberId::new(s.node_id.clone()),
        prep.cfg.steps,
        prep.cfg.batch_size,
        s.lease_ttl_s as u64,
        s.settle_ms,
    );
    rules.eval_every = prep.cfg.eval_every;
    rules.ckpt_every = prep.cfg.ckpt_every;
    rules.hash_check_every = s.hash_check_every;
    rules.start_nodes = s.start_nodes;
    rules.max_bad_steps = prep.cfg.max_bad_steps;
    rules.step_deadline = std::mem::take(&mut deadline);
    let machine = NodeMachine::new(rules).map_err(|e| anyhow!("--suspect-after-ms: {e}"))?;
    let shell = Shell::new(
        &s,
        &prep,
        shared.clone(),
        etcd,
        store.clone(),
        join,
        member,
        checkpointer,
        run_dir,
        requests,
        machine,
    );
    let outcome = shell.run(start, live.is_none()).await;
    let (end, step) = match outcome {
        Ok((how, why, mut shell)) => {
            shell.stop().await;
            let step = shell.step();
            shell.checkpointer.shutdown().await;
            if let Err(e) = shell.member.shutdown().await {
                eprintln!("warning: leaving the job: {e} (the lease expires after its TTL)");
            }
            (Ok((how, why)), step)
        }
        Err(e) => (Err(e), shared.view().step),
    };
    shared.hub.shutdown();
    supervisor.shutdown().await;
    shutdown.cancel();
    let (how, why) = end?;
    if let Some(reason) = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        bail!(
            "node {} left the job at step {step}: {reason}; restart it to rejoin",
            s.node_id
        );
    }
    match how {
        Exit::Done | Exit::Left => {
            println!(
                "node {}: {why} at step {step} after {:.1} s",
                s.node_id,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Exit::Failed => bail!("node {}: {why}", s.node_id),
        Exit::GraceExpired => {
            eprintln!("error: node {}: {why}; exiting", s.node_id);
            std::process::exit(3);
        }
    }
}

/// How long the leader's probe of a suspect waits for its Control service to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Registers this node in the job, with the leader's probe of suspects.
async fn start_member(etcd: &EtcdMembership, join: &MemberConfig) -> Result<Member> {
    let prober: Prober = Arc::new(|info: MemberInfo| {
        Box::pin(async move { crate::status::probe_control(&info.addr, PROBE_TIMEOUT).await })
    });
    Member::start_detecting(
        etcd.clone(),
        join.clone(),
        Detection {
            prober: Some(prober),
            probe_timeout: PROBE_TIMEOUT,
        },
    )
    .await
    .map_err(|e| anyhow!("{e}"))
}

/// A chaos hook's step, from the environment: tests make a daemon fail at a chosen
/// moment with it. Unset (always, outside tests): `None`.
#[cfg(feature = "chaos-hooks")]
fn chaos_step(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.trim().parse().ok()
}

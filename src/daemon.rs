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

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tenax_actors::{
    CheckpointEvent, CheckpointPolicy, Checkpointer, NodeSupervisor, ServiceSpec, Trainer,
};
use tenax_cluster::etcd::{EtcdConfig, EtcdMembership, FenceOutcome};
use tenax_cluster::member::{Detection, Member, MemberConfig, MemberState, Prober};
use tenax_cluster::peer::{
    fetch_state, CommSpec, GrpcCollective, HubConfig, MemberState as PeerState, PeerAddr, PeerHub,
    Reduction, StateSnapshot, CONNECTION_WINDOW_BYTES, MAX_HTTP2_FRAME_BYTES, STREAM_WINDOW_BYTES,
};
use tenax_cluster::Collective;
use tenax_core::detector::{DetectorConfig, FailureDetector};
use tenax_core::membership::{
    keeps_every_member, state_donors, MemberId, MemberInfo, Plan, PlannerConfig,
};
use tenax_core::restart::RestartPolicy;
use tenax_proto::v1 as pb;
use tenax_storage::{LoadedCheckpoint, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{TrainArgs, TrainConfig};
use crate::metrics::{MetricKind, Sample};
use crate::train::{prepare, start_state, Prepared, Start, StoredConfig};

/// The etcd key (under `/tenax/<job>/`) of the job's training-config record.
const CONFIG_KEY: &str = "config";

/// The etcd key (under `/tenax/<job>/`) of the newest committed checkpoint: written by a
/// fenced txn, the authority on which checkpoint a restarted job resumes from.
pub const CHECKPOINT_KEY: &str = "checkpoint";

/// How long the step in flight may still take to complete once a newer plan that keeps
/// every member has arrived, before it is abandoned.
const REFORM_GRACE: Duration = Duration::from_secs(2);

/// How long the end of a job waits for the final checkpoint (upload and commit).
const FINAL_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(1800);

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

/// Operator requests, set by the control service and read at step boundaries.
#[derive(Debug, Default)]
struct Requests {
    /// Leave after the current step.
    drain: AtomicBool,
    /// ... and save a final checkpoint first.
    drain_checkpoint: AtomicBool,
    /// Save a checkpoint at the next step boundary.
    checkpoint_now: AtomicBool,
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
    requests: Requests,
    paused: watch::Sender<bool>,
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
        let r = &self.shared.requests;
        if req.get_ref().checkpoint {
            r.drain_checkpoint.store(true, Ordering::SeqCst);
        }
        r.drain.store(true, Ordering::SeqCst);
        // A paused node must get to its step boundary to leave.
        self.shared.paused.send_replace(false);
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
        self.shared
            .requests
            .checkpoint_now
            .store(true, Ordering::SeqCst);
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
        self.shared.paused.send_replace(true);
        Ok(reply(true, format!("node {} pauses at its next step boundary (pause the whole job with `tenax control pause --all`: peers kept waiting by one paused node report it as late after --suspect-after-ms, and it may be evicted)", self.shared.member_id)))
    }

    async fn resume(
        &self,
        _: tonic::Request<pb::ResumeRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.shared.paused.send_replace(false);
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
    let (paused_tx, _) = watch::channel(false);
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
        requests: Requests::default(),
        paused: paused_tx,
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
                if let Some(reason) = failed.borrow_and_update().clone() {
                    eprintln!("node {}: {reason}: leaving the job", sh.member_id);
                    *sh.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                    sh.requests.drain.store(true, Ordering::SeqCst);
                    sh.paused.send_replace(false);
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

    // SIGTERM/SIGINT: drain with a final checkpoint, bounded by the grace period.
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
            eprintln!(
                "node {}: SIGTERM: draining with a final checkpoint (grace period {} s)",
                sh.member_id,
                grace.as_secs()
            );
            sh.requests.drain_checkpoint.store(true, Ordering::SeqCst);
            sh.requests.drain.store(true, Ordering::SeqCst);
            sh.paused.send_replace(false);
            tokio::time::sleep(grace).await;
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
    let mut node = Node {
        s: &s,
        shared: shared.clone(),
        member,
        etcd,
        checkpointer,
        prep: &prep,
        run_dir,
        join,
        rejoins: 0,
        rejoins_in_a_row: 0,
        stepped_since_rejoin: false,
        probes_base: 0,
        revocations_base: 0,
        metrics: None,
        events: None,
        history: Vec::new(),
        deadline: FailureDetector::new(
            "step",
            DetectorConfig {
                window: 256,
                k: 3,
                min_deadline_ms: s.suspect_after_ms,
                min_samples: 8,
            },
        )
        .map_err(|e| anyhow!("--suspect-after-ms: {e}"))?,
        #[cfg(feature = "chaos-hooks")]
        flipped: false,
        pending_record: None,
        refused_step: None,
        holds_state: live.is_none(),
        store: store.clone(),
    };
    let outcome = node.train(start).await;
    let Node {
        member,
        checkpointer,
        ..
    } = node;
    checkpointer.shutdown().await;
    if let Err(e) = member.shutdown().await {
        eprintln!("warning: leaving the job: {e} (the lease expires after its TTL)");
    }
    shared.hub.shutdown();
    supervisor.shutdown().await;
    shutdown.cancel();
    let end = outcome?;
    if let Some(reason) = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        bail!(
            "node {} left the job at step {}: {reason}; restart it to rejoin",
            s.node_id,
            shared.view().step
        );
    }
    println!(
        "node {}: {} at step {} after {:.1} s",
        s.node_id,
        end,
        shared.view().step,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The node's training loop and its parts.
struct Node<'a> {
    s: &'a Settings,
    shared: Arc<Shared>,
    member: Member,
    etcd: EtcdMembership,
    checkpointer: Checkpointer,
    prep: &'a Prepared,
    run_dir: PathBuf,
    /// How the node registers (again, after losing its membership).
    join: MemberConfig,
    /// Registrations after the first.
    rejoins: u32,
    /// Registrations since this node last applied a step (reset by a step).
    rejoins_in_a_row: u32,
    /// Whether a step was applied since the last registration.
    stepped_since_rejoin: bool,
    /// Probes and revocations of earlier registrations (the counters go on across rejoins).
    probes_base: u64,
    revocations_base: u64,
    metrics: Option<std::fs::File>,
    /// `events.jsonl`: how the node's state was set other than by training a step.
    events: Option<std::fs::File>,
    history: Vec<crate::plot::LossPoint>,
    /// Step durations: the deadline past which a step's laggards are reported.
    deadline: FailureDetector,
    /// The chaos bit flip was done (it is done once).
    #[cfg(feature = "chaos-hooks")]
    flipped: bool,
    /// A checkpoint record etcd did not take yet (with its save time and the last try).
    pending_record: Option<(CheckpointRecord, f64, Instant)>,
    /// The step of the last checkpoint whose record the fence refused (a newer generation
    /// was current): the final checkpoint is then saved again in that generation.
    refused_step: Option<u64>,
    /// Whether the node's state is real: false for a node that joined a running job and
    /// has not copied the state yet (it compares as "empty", never as a donor).
    holds_state: bool,
    /// The job's checkpoint store (a node that holds no state and finds nobody who does
    /// loads the committed checkpoint from it).
    store: Store,
}

/// How long one attempt to write a checkpoint's etcd record may hold the training loop.
const RECORD_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// How often a checkpoint record etcd did not take is tried again.
const RECORD_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// The state-exchange round of a group in which no member held any state: after every
/// member loaded the committed checkpoint.
const LOADED_ROUND: u64 = u64::MAX;

/// Most times in a row (without training a step in between) a node registers again after
/// losing its membership (evicted while hung, cut off past its lease) before it exits.
const MAX_REJOINS: u32 = 20;

/// The wait before the first registration after a lost membership; it doubles with each
/// registration in a row that trains no step.
const REJOIN_BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// The longest wait before registering again.
const REJOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);

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

/// What waiting for a plan ended with.
enum Waited {
    /// A plan with ranks for this node.
    Plan(Plan),
    /// The node was drained meanwhile.
    Drained,
    /// The node lost its membership meanwhile: register again.
    Lost,
}

/// How one generation ended.
enum GenEnd {
    /// The job reached its target step.
    Done,
    /// A newer plan arrived; train in it from this state.
    Reform,
    /// This node leaves the job (drain or SIGTERM).
    Leave,
    /// A periodic comparison found members with different parameters (their states
    /// are given): copy the reference state, then train on in this generation.
    Resync(Vec<PeerState>),
}

impl Node<'_> {
    /// Train generation after generation until done or leaving. Returns what happened.
    async fn train(&mut self, start: Start) -> Result<&'static str> {
        let metrics_path = self.run_dir.join("metrics.jsonl");
        // A node's metrics.jsonl is its step log: what it did, appended across restarts
        // (a step redone after a whole-job restart appears again; the plot keeps the last).
        let mut by_step = BTreeMap::new();
        for p in crate::train::load_history(&metrics_path, u64::MAX)? {
            by_step.insert(p.step, p);
        }
        self.history = by_step.into_values().collect();
        self.metrics = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| {
                    anyhow!(
                        "{}: cannot open for appending ({e}): pick a writable --run-dir",
                        metrics_path.display()
                    )
                })?,
        );
        let events_path = self.run_dir.join("events.jsonl");
        self.events = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&events_path)
                .map_err(|e| {
                    anyhow!(
                        "{}: cannot open for appending ({e}): pick a writable --run-dir",
                        events_path.display()
                    )
                })?,
        );
        match (self.holds_state, start.step) {
            (false, _) => self.log_state_event("none", 0, None),
            (true, 0) => self.log_state_event("init", 0, None),
            (true, step) => self.log_state_event("checkpoint", step, None),
        }
        let mut state = start;
        let mut last_gen: Option<u64> = None;
        loop {
            if self.shared.requests.drain.load(Ordering::SeqCst) && last_gen.is_none() {
                return Ok("left the job before training (drained)");
            }
            if let MemberState::Lost { reason } = self.member.state() {
                self.rejoin(&reason).await?;
            }
            self.shared.set_phase("waiting for a plan");
            let mut plan_rx = self.member.plan_receiver();
            let plan = match self.wait_for_plan(&mut plan_rx, last_gen).await? {
                Waited::Plan(p) => p,
                Waited::Drained => return Ok("left the job (drained while waiting for a plan)"),
                Waited::Lost => continue,
            };
            if self.job_already_done().await {
                self.plot();
                return Ok(
                    "job done (its final checkpoint was committed while this node was away)",
                );
            }
            if last_gen.is_some() {
                self.shared.view().reforms += 1;
            }
            last_gen = Some(plan.generation);
            let (end, next) = self.generation(&plan, state).await?;
            state = next;
            match end {
                GenEnd::Done => {
                    self.plot();
                    return Ok("job done");
                }
                GenEnd::Leave => return Ok("left the job (drained)"),
                GenEnd::Reform | GenEnd::Resync(_) => continue,
            }
        }
    }

    /// Whether the job's final checkpoint is committed already: a node that was away (hung,
    /// cut off, restarted) while the others finished must not train the job again on
    /// its own. An etcd that does not answer within 2 s reads as "not done".
    async fn job_already_done(&self) -> bool {
        let me = self.member.id().to_string();
        let record = tokio::time::timeout(Duration::from_secs(2), self.etcd.get(CHECKPOINT_KEY));
        let Ok(Ok(Some(bytes))) = record.await else {
            return false;
        };
        match serde_json::from_slice::<CheckpointRecord>(&bytes) {
            Ok(rec) if rec.step >= self.prep.cfg.steps => {
                println!(
                    "node {me}: the job is done: {} committed its final checkpoint (step {}): {}",
                    rec.member, rec.step, rec.url
                );
                true
            }
            _ => false,
        }
    }

    /// Registers again after the membership was lost (the lease was revoked while this
    /// node hung, or expired while it was cut off): the node keeps its state, which the
    /// next generation compares and copies over where it is behind.
    async fn rejoin(&mut self, reason: &str) -> Result<()> {
        let me = self.member.id().clone();
        self.rejoins += 1;
        if std::mem::take(&mut self.stepped_since_rejoin) {
            self.rejoins_in_a_row = 0;
        }
        self.rejoins_in_a_row += 1;
        if self.rejoins_in_a_row > MAX_REJOINS {
            bail!(
                "node {me}: lost its membership {} times in a row without training a step (last: {reason}); check its network to the peers and etcd, then restart it",
                self.rejoins_in_a_row - 1
            );
        }
        // Back off when registering does not lead to training (a node cut off from its
        // peers but not from etcd is admitted, fails the state exchange and is evicted
        // again): 250 ms, doubling, at most REJOIN_BACKOFF_MAX.
        let backoff = (REJOIN_BACKOFF_FIRST * 2u32.pow(self.rejoins_in_a_row.min(8) - 1))
            .min(REJOIN_BACKOFF_MAX);
        tokio::time::sleep(backoff).await;
        println!("node {me}: lost its membership ({reason}); registering again");
        self.shared.set_phase("rejoining");
        let fresh = start_member(&self.etcd, &self.join).await?;
        let old = std::mem::replace(&mut self.member, fresh);
        self.probes_base += old.probes_sent();
        self.revocations_base += old.revocations();
        if let Err(e) = old.shutdown().await {
            eprintln!("note: node {me}: releasing the old registration: {e}");
        }
        Ok(())
    }

    /// Wait for a plan newer than `after` that gives this node ranks.
    async fn wait_for_plan(
        &self,
        rx: &mut watch::Receiver<Option<Plan>>,
        after: Option<u64>,
    ) -> Result<Waited> {
        let me = self.member.id().clone();
        let mut announced = false;
        loop {
            if let MemberState::Lost { .. } = self.member.state() {
                return Ok(Waited::Lost);
            }
            let current = rx.borrow_and_update().clone();
            if let Some(p) = current {
                if after.is_none_or(|g| p.generation > g) {
                    let nodes = p
                        .members
                        .iter()
                        .filter(|m| !p.ranks_of(m).is_empty())
                        .count();
                    let enough = after.is_some() || nodes >= self.s.start_nodes;
                    if !p.ranks_of(&me).is_empty() && enough {
                        return Ok(Waited::Plan(p));
                    }
                    if !enough {
                        if !announced {
                            println!(
                                "node {me}: generation {} has {nodes} node(s); waiting for {} (--start-nodes)",
                                p.generation, self.s.start_nodes
                            );
                            announced = true;
                        }
                    } else if !announced {
                        println!(
                            "node {me}: generation {} has no rank for this node ({}); waiting",
                            p.generation, p.reason
                        );
                        announced = true;
                    }
                }
            }
            tokio::select! {
                r = rx.changed() => { r.map_err(|_| anyhow!("node {me}: the membership agent stopped"))?; }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if self.shared.requests.drain.load(Ordering::SeqCst) {
                return Ok(Waited::Drained);
            }
        }
    }

    /// The members of `plan` that host ranks, in order of their first rank, with addresses.
    async fn peers(&self, plan: &Plan) -> Result<Vec<PeerAddr>> {
        let registered = self.etcd.members().await.map_err(|e| anyhow!("{e}"))?;
        let mut addrs = BTreeMap::new();
        for m in registered {
            if let Ok(info) = serde_json::from_slice::<MemberInfo>(&m.info) {
                addrs.insert(info.id.to_string(), info.addr);
            }
        }
        let mut order: Vec<(u32, String)> = Vec::new();
        for a in &plan.ranks {
            let id = a.member.to_string();
            if !order.iter().any(|(_, m)| *m == id) {
                order.push((a.rank, id));
            }
        }
        order
            .into_iter()
            .map(|(_, id)| {
                let addr = addrs
                    .get(&id)
                    .cloned()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| {
                        anyhow!(
                            "member {id} of generation {} has no registered address (it left?)",
                            plan.generation
                        )
                    })?;
                Ok(PeerAddr { id, addr })
            })
            .collect()
    }

    /// Train in one generation. Returns how it ended and the state to go on from.
    async fn generation(&mut self, plan: &Plan, mut state: Start) -> Result<(GenEnd, Start)> {
        let me = self.member.id().clone();
        let local: Vec<u32> = plan.ranks_of(&me);
        let peers = match self.peers(plan).await {
            Ok(p) => p,
            Err(e) => {
                // A member of the plan is already gone: wait for the plan without it.
                let (end, _, _) = self
                    .after_failure(plan, state.step, state.cursor, format!("{e:#}"))
                    .await?;
                return Ok((end, state));
            }
        };
        let my_index = peers
            .iter()
            .position(|p| p.id == me.to_string())
            .ok_or_else(|| {
                anyhow!(
                    "node {me} is not among the members of generation {}",
                    plan.generation
                )
            })?;
        let committer = plan.member_of(0).map(|m| m.to_string()) == Some(me.to_string());
        {
            let mut v = self.shared.view();
            v.generation = plan.generation;
            v.ranks = local.clone();
            v.world = plan.world;
            v.leader = self.member.is_leader();
            v.phase = "forming".into();
        }
        println!(
            "node {me}: generation {}: ranks {:?} of {} on {} node(s){}; {}",
            plan.generation,
            local,
            plan.world,
            peers.len(),
            if committer {
                "; commits checkpoints"
            } else {
                ""
            },
            plan.reason
        );
        let num_slots = self.prep.setup.batch.num_slots();
        let spec = CommSpec {
            job: self.s.job.clone(),
            generation: plan.generation,
            members: peers.clone(),
            me: my_index,
            local_ranks: local.clone(),
            world: plan.world,
            num_slots,
            num_params: self.prep.param_layout.total,
            reduction: self.s.reduction,
            max_frame_floats: HubConfig::default().max_frame_floats,
            connect_deadline: Duration::from_secs(10),
        };
        let comm = GrpcCollective::new(&self.shared.hub, spec).map_err(|e| anyhow!("{e}"))?;
        #[cfg(feature = "chaos-hooks")]
        if let Some(step) = crate::hooks::step(crate::hooks::EXIT_IN_ALL_GATHER) {
            comm.exit_during_all_gather(step);
        }
        // Which member computes each slot: a late step names the members it waits for.
        let mut slot_owner = vec![0usize; num_slots as usize];
        for a in &plan.ranks {
            let k = peers
                .iter()
                .position(|p| p.id == a.member.as_str())
                .unwrap_or(0);
            for slot in tenax_core::slots::slots_for_rank(
                num_slots,
                u64::from(plan.world),
                u64::from(a.rank),
            ) {
                slot_owner[slot as usize] = k;
            }
        }

        // A newer plan ends this generation at the next step boundary. If it keeps every
        // member, the step in flight can still complete, so it gets REFORM_GRACE to do so
        // (aborting it at once could leave some members past it and others not); if a
        // member is gone, or the step does not complete in time, it is abandoned.
        let reform = Arc::new(AtomicBool::new(false));
        let watcher = {
            let mut rx = self.member.plan_receiver();
            let mut state_rx = self.member.state_receiver();
            let comm = comm.clone();
            let current = plan.clone();
            let reform = reform.clone();
            let gen = plan.generation;
            tokio::spawn(async move {
                loop {
                    let newer = rx
                        .borrow_and_update()
                        .clone()
                        .filter(|p| p.generation > gen);
                    if let Some(next) = newer {
                        reform.store(true, Ordering::SeqCst);
                        if keeps_every_member(&current, &next) {
                            tokio::time::sleep(REFORM_GRACE).await;
                        }
                        comm.abort(&format!(
                            "generation {} was planned; generation {gen} ends",
                            next.generation
                        ));
                        return;
                    }
                    if let MemberState::Lost { reason } = state_rx.borrow_and_update().clone() {
                        comm.abort(&format!("this node lost its membership: {reason}"));
                        return;
                    }
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        r = state_rx.changed() => if r.is_err() { return },
                    }
                }
            })
        };

        // Everyone trains from the same state: compare (round 0 now, later rounds at the
        // periodic hash checks) and copy it from a peer where it differs.
        let mut round = 0u64;
        let mut known: Option<Vec<PeerState>> = None;
        let end = loop {
            let (synced, outcome) = self
                .sync_state(plan, &peers, &comm, state, round, known.take())
                .await;
            state = synced;
            if let Err(e) = outcome {
                self.suspect_failed_peers(&comm);
                let r = self.after_failure(plan, state.step, state.cursor, e).await;
                match r {
                    Ok((end, _, _)) => break end,
                    Err(e) => {
                        watcher.abort();
                        return Err(e);
                    }
                }
            }
            #[cfg(feature = "chaos-hooks")]
            if let Some(at) = crate::hooks::step(crate::hooks::FLIP_PARAM_AT_STEP) {
                if state.step >= at && !self.flipped {
                    // Silent corruption on this node only: one bit of one parameter.
                    self.flipped = true;
                    crate::hooks::flip_one_bit(&mut state.params);
                    eprintln!(
                        "chaos: node {me} flipped one bit of its parameters at step {}",
                        state.step
                    );
                }
            }
            let mut setup = self.prep.setup.clone();
            setup.ranks = plan.world as usize;
            let collective: Arc<dyn Collective> = comm.clone();
            let trainer = match Trainer::start_group(
                setup,
                local.iter().map(|&r| r as usize).collect(),
                Some(collective),
                self.prep.data.clone(),
                state.params,
                state.opt,
            )
            .await
            {
                Ok(t) => t,
                Err(e) => {
                    watcher.abort();
                    return Err(anyhow!("{e}"));
                }
            };
            let result = self
                .run_steps(
                    plan,
                    &trainer,
                    &comm,
                    &reform,
                    committer,
                    state.step,
                    state.cursor,
                    &slot_owner,
                )
                .await;
            // The state to go on from: the last completed step (an aborted step applies nothing).
            let snap = trainer.snapshot().await;
            trainer.shutdown().await;
            let (end, step, cursor) = match result {
                Ok(r) => r,
                Err(e) => {
                    watcher.abort();
                    comm.abort("this node stops");
                    return Err(e);
                }
            };
            let snap = match snap {
                Ok(s) => s,
                Err(e) => {
                    watcher.abort();
                    bail!(
                        "node {me}: cannot read its state after generation {}: {e}",
                        plan.generation
                    );
                }
            };
            state = Start {
                step,
                cursor,
                params: snap.params,
                opt: snap.opt,
            };
            match end {
                GenEnd::Resync(states) => {
                    round = step;
                    known = Some(states);
                }
                other => break other,
            }
        };
        watcher.abort();
        if matches!(end, GenEnd::Leave) {
            comm.close(Duration::from_secs(10)).await;
        }
        Ok((end, state))
    }

    /// Appends one line to `events.jsonl`, the node's record of how its state was set
    /// other than by training a step: `init` (fresh weights), `checkpoint` (loaded),
    /// `copy` (from a peer), `none` (joined a running job holding nothing). The chaos
    /// harness reads it: a step log that goes backwards must be explained by one.
    fn log_state_event(&mut self, how: &str, step: u64, generation: Option<u64>) {
        let line = json!({"event": "state", "how": how, "step": step, "generation": generation,
            "t_ms": tenax_storage::now_unix_ms()});
        if let Some(f) = self.events.as_mut() {
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("warning: events.jsonl: cannot append: {e}");
            }
        }
    }

    /// Compare this member's state with the group's (`known`: the states of a round
    /// already exchanged; otherwise round `round` is exchanged now) and copy the reference
    /// state from a peer when this member lacks it, or serve it to the members that copy
    /// from this one ([`state_donors`]). Returns the state to train from and, when the
    /// generation cannot go on, why.
    async fn sync_state(
        &mut self,
        plan: &Plan,
        peers: &[PeerAddr],
        comm: &Arc<GrpcCollective>,
        state: Start,
        round: u64,
        known: Option<Vec<PeerState>>,
    ) -> (Start, std::result::Result<(), String>) {
        let me = self.member.id().to_string();
        let my_index = comm.spec().me;
        let mut state = state;
        // A node without state compares as empty: it is never a donor.
        let mut hash = if self.holds_state {
            tenax_actors::param_hash(&state.params)
        } else {
            String::new()
        };
        let mut states = match known {
            Some(s) => s,
            None => {
                self.shared.set_phase("comparing state");
                match comm
                    .compare_state(round, state.step, &hash, self.s.step_timeout)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return (state, Err(format!("state exchange: {e}"))),
                }
            }
        };
        if states.iter().all(|o| o.param_hash.is_empty()) {
            // Nobody holds the state (the group this node joined is gone): every member
            // loads the committed checkpoint, then they compare again.
            println!("node {me}: generation {}: no member holds the job's state; loading the committed checkpoint", plan.generation);
            self.shared.set_phase("loading checkpoint");
            let loaded = match find_resume_point(&self.etcd, &self.store).await {
                Ok(c) => c,
                Err(e) => {
                    return (
                        state,
                        Err(format!("loading the committed checkpoint: {e:#}")),
                    )
                }
            };
            state = match start_state(self.prep, loaded.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    return (
                        state,
                        Err(format!("loading the committed checkpoint: {e:#}")),
                    )
                }
            };
            self.holds_state = true;
            self.log_state_event("checkpoint", state.step, Some(plan.generation));
            hash = tenax_actors::param_hash(&state.params);
            states = match comm
                .compare_state(LOADED_ROUND, state.step, &hash, self.s.step_timeout)
                .await
            {
                Ok(s) => s,
                Err(e) => return (state, Err(format!("state exchange: {e}"))),
            };
        }
        let pairs: Vec<(u64, &str)> = states
            .iter()
            .map(|o| (o.step, o.param_hash.as_str()))
            .collect();
        let donors = state_donors(&pairs);
        if let Some(d) = donors.get(my_index).copied().flatten() {
            let donor = &peers[d];
            let want = &states[d];
            self.shared.set_phase("copying state");
            let t0 = Instant::now();
            let fetched = fetch_state(
                &self.shared.hub,
                plan.generation,
                &me,
                donor,
                want.step,
                &want.param_hash,
                self.s.step_timeout,
            )
            .await;
            let (snap, stats) = match fetched {
                Ok(x) => x,
                Err(e) => {
                    return (
                        state,
                        Err(format!(
                            "copying the state of step {} from {}: {e}",
                            want.step, donor.id
                        )),
                    )
                }
            };
            let got = tenax_actors::param_hash(&snap.params);
            if got != want.param_hash {
                return (
                    state,
                    Err(format!(
                        "the state copied from {} hashes to {} instead of {}",
                        donor.id,
                        &got[..12],
                        &want.param_hash[..want.param_hash.len().min(12)]
                    )),
                );
            }
            println!(
                "node {me}: generation {}: copied the state of step {} from {} ({:.1} MB in {:.3} s, {:.2} GB/s; {})",
                plan.generation,
                snap.step,
                donor.id,
                stats.bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64(),
                stats.gb_per_s(),
                if hash.is_empty() {
                    "it held no state".to_string()
                } else {
                    format!("it was at step {} with parameters {}", state.step, &hash[..12])
                }
            );
            self.holds_state = true;
            self.log_state_event("copy", snap.step, Some(plan.generation));
            {
                let mut v = self.shared.view();
                v.state_copies_in += 1;
                v.state_bytes_in += stats.bytes;
                v.last_copy_gb_per_s = stats.gb_per_s();
                v.step = snap.step;
                v.param_hash = got;
            }
            let opt = tenax_model::AdamW {
                m: snap.m,
                v: snap.v,
                step: snap.opt_step,
            };
            return (
                Start {
                    step: snap.step,
                    cursor: snap.cursor,
                    params: snap.params,
                    opt,
                },
                Ok(()),
            );
        }
        let receivers: Vec<&str> = donors
            .iter()
            .zip(&states)
            .filter(|(d, _)| **d == Some(my_index))
            .map(|(_, s)| s.id.as_str())
            .collect();
        if receivers.is_empty() {
            return (state, Ok(()));
        }
        self.shared.set_phase("sending state");
        let Start {
            step,
            cursor,
            params,
            opt,
        } = state;
        let snap = Arc::new(StateSnapshot {
            step,
            cursor,
            opt_step: opt.step,
            param_hash: hash,
            params,
            m: opt.m,
            v: opt.v,
        });
        let publication = self.shared.hub.publish_state(plan.generation, snap.clone());
        // Wait for the receivers, but not past the generation: a receiver that dies
        // mid-copy gets evicted, and the newer plan aborts the communicator.
        let started = Instant::now();
        let served = loop {
            let slice = Duration::from_millis(200);
            match publication.wait_served(receivers.len() as u64, slice).await {
                Ok(()) => break Ok(()),
                Err(e) => {
                    if let Some(reason) = comm.aborted() {
                        break Err(format!("{e}; the generation ended: {reason}"));
                    }
                    if started.elapsed() >= self.s.step_timeout {
                        break Err(format!(
                            "{} of {} receiver(s) copied the state within {} s",
                            publication.served(),
                            receivers.len(),
                            self.s.step_timeout.as_secs()
                        ));
                    }
                }
            }
        };
        drop(publication);
        let snap = Arc::try_unwrap(snap).unwrap_or_else(|a| StateSnapshot::clone(&a));
        let state = Start {
            step: snap.step,
            cursor: snap.cursor,
            params: snap.params,
            opt: tenax_model::AdamW {
                m: snap.m,
                v: snap.v,
                step: snap.opt_step,
            },
        };
        match served {
            Ok(()) => {
                println!(
                    "node {me}: generation {}: sent its state of step {step} to {}",
                    plan.generation,
                    receivers.join(", ")
                );
                self.shared.view().state_copies_out += 1;
                (state, Ok(()))
            }
            Err(e) => (
                state,
                Err(format!("sending state to {}: {e}", receivers.join(", "))),
            ),
        }
    }

    /// Report the peers whose streams failed as suspects (the leader probes them, and a
    /// confirmed one is evicted without waiting for its lease to expire).
    fn suspect_failed_peers(&self, comm: &GrpcCollective) {
        for (id, what) in comm.failed_peers() {
            self.shared.view().suspicions += 1;
            self.member.suspect(MemberId::new(id), what);
        }
    }

    /// Step `step` is past its deadline: report the members it waits for.
    fn suspect_late(
        &self,
        comm: &GrpcCollective,
        step: u64,
        slot_owner: &[usize],
        waited: Duration,
    ) {
        let Some((losses, chunks)) = comm.progress(step) else {
            return;
        };
        let chunks = (self.s.reduction == Reduction::Exact).then_some(chunks);
        let late = tenax_core::detector::late_members(slot_owner, &losses, chunks.as_deref());
        let me = comm.spec().me;
        for k in late.into_iter().filter(|&k| k != me) {
            let id = comm.spec().members[k].id.clone();
            eprintln!(
                "warning: node {}: step {} waits for {id} after {} ms: reporting it as a suspect",
                self.member.id(),
                step + 1,
                waited.as_millis()
            );
            self.shared.view().suspicions += 1;
            self.member.suspect(
                MemberId::new(id),
                format!(
                    "step {} still waits for it after {} ms",
                    step + 1,
                    waited.as_millis()
                ),
            );
        }
    }

    /// The steps of one generation. Returns how it ended, and the step and cursor reached.
    #[allow(clippy::too_many_arguments)]
    async fn run_steps(
        &mut self,
        plan: &Plan,
        trainer: &Trainer,
        comm: &Arc<GrpcCollective>,
        reform: &AtomicBool,
        committer: bool,
        step0: u64,
        cursor0: u64,
        slot_owner: &[usize],
    ) -> Result<(GenEnd, u64, u64)> {
        let me = self.member.id().to_string();
        let cfg = &self.prep.cfg;
        let mut step = step0;
        let mut cursor = cursor0;
        let my_slots = comm.spec().my_slots();
        self.shared.set_phase("training");
        let tokens_per_step =
            (cfg.batch_size as usize * self.prep.stored_cfg.model.block_size) as f64;
        let log_every = (cfg.steps / 20).max(1);
        while step < cfg.steps {
            // Step boundary: a newer plan ends this generation here.
            if reform.load(Ordering::SeqCst) {
                println!(
                    "node {me}: generation {} ends after step {step}; re-forming",
                    plan.generation
                );
                // The others may have started the next step: they give it up at once.
                comm.stop_after(step);
                return Ok((GenEnd::Reform, step, cursor));
            }
            // Operator requests.
            if self.shared.requests.drain.load(Ordering::SeqCst) {
                if self.shared.requests.drain_checkpoint.load(Ordering::SeqCst) {
                    self.shared.set_phase("saving before leaving");
                    self.save_and_commit(trainer, plan, step, cursor, true)
                        .await?;
                }
                self.shared.set_phase("leaving");
                println!("node {me}: drained: leaving the job after step {step}");
                comm.stop_after(step);
                return Ok((GenEnd::Leave, step, cursor));
            }
            if *self.shared.paused.borrow() {
                self.shared.set_phase("paused");
                println!("node {me}: paused after step {step}");
                let mut rx = self.shared.paused.subscribe();
                while *rx.borrow_and_update() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                println!("node {me}: resumed");
                self.shared.set_phase("training");
                continue;
            }
            if self
                .shared
                .requests
                .checkpoint_now
                .swap(false, Ordering::SeqCst)
            {
                self.save_and_commit(trainer, plan, step, cursor, false)
                    .await?;
            }

            let lr = self.prep.schedule.lr_at(step);
            let t0 = Instant::now();
            // Past the deadline a step is not abandoned: the members it waits for are
            // reported, and the leader decides (probe, second reporter). The first step
            // of a generation also waits for connections and state copies.
            // After an evaluation or a checkpoint, the committer starts this step late
            // by that work (everyone knows when): the deadline is ten times longer, at
            // least 30 s.
            let first = step == step0;
            let after_committer_work = step > step0
                && ((cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every))
                    || (cfg.ckpt_every > 0 && step.is_multiple_of(cfg.ckpt_every)));
            let base = Duration::from_millis(self.deadline.deadline_ms());
            let deadline = if after_committer_work {
                (base * 10).max(Duration::from_secs(30))
            } else if first {
                base.max(Duration::from_secs(10))
            } else {
                base
            };
            let fut = trainer.step(step, cursor, lr as f32);
            tokio::pin!(fut);
            let result = tokio::select! {
                r = &mut fut => r,
                _ = tokio::time::sleep(deadline) => {
                    // Lateness while a newer plan is pending is the re-formation's; while
                    // the job is paused (`control pause --all`), the pause's.
                    if !reform.load(Ordering::SeqCst) && !*self.shared.paused.borrow() {
                        self.suspect_late(comm, step, slot_owner, deadline);
                    }
                    fut.await
                }
            };
            let report = match result {
                Ok(r) => r,
                Err(e) => {
                    self.suspect_failed_peers(comm);
                    return self.after_failure(plan, step, cursor, e.to_string()).await;
                }
            };
            let secs = t0.elapsed().as_secs_f64();
            if !first {
                self.deadline.observe(t0.elapsed().as_millis() as u64);
            }
            let step_cursor = cursor;
            step += 1;
            cursor += cfg.batch_size;
            self.stepped_since_rejoin = true;
            let hash = trainer
                .param_hashes()
                .await
                .map_err(|e| anyhow!("node {me}: step {step}: {e}"))?
                .into_iter()
                .next()
                .unwrap_or_default();
            let tokens_per_s = tokens_per_step / secs.max(1e-9);
            {
                let mut v = self.shared.view();
                v.step = step;
                v.loss = report.loss;
                v.tokens_per_s = tokens_per_s;
                v.param_hash = hash.clone();
                v.leader = self.member.is_leader();
                v.probes_sent = self.probes_base + self.member.probes_sent();
                v.revocations = self.revocations_base + self.member.revocations();
            }
            let mut line = json!({"step": step, "loss": report.loss, "lr": lr, "tokens_per_s": tokens_per_s,
                "grad_norm": report.grad_norm, "skipped": report.skipped, "generation": plan.generation,
                "world": plan.world, "param_hash": hash, "cursor": step_cursor, "slots": my_slots, "t_ms": tenax_storage::now_unix_ms()});
            // Every N steps the members compare parameters; the odd ones copy the group's.
            if self.s.hash_check_every > 0
                && step.is_multiple_of(self.s.hash_check_every)
                && step < cfg.steps
            {
                let states = match comm
                    .compare_state(step, step, &hash, self.s.step_timeout)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        self.suspect_failed_peers(comm);
                        return self
                            .after_failure(plan, step, cursor, format!("parameter check: {e}"))
                            .await;
                    }
                };
                if states
                    .iter()
                    .any(|o| o.param_hash != hash || o.step != step)
                {
                    let odd: Vec<String> = states
                        .iter()
                        .map(|o| {
                            format!("{} {}", o.id, &o.param_hash[..o.param_hash.len().min(12)])
                        })
                        .collect();
                    eprintln!(
                        "ALARM: node {me}: generation {}: parameters differ between members after step {step} ({}): resyncing the odd ones from a peer",
                        plan.generation,
                        odd.join(", ")
                    );
                    self.shared.view().hash_mismatches += 1;
                    if let Some(f) = self.metrics.as_mut() {
                        writeln!(f, "{line}").context("metrics.jsonl: cannot append")?;
                    }
                    return Ok((GenEnd::Resync(states), step, cursor));
                }
            }
            let last = step == cfg.steps;
            let val_loss = if committer
                && ((cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || last)
            {
                Some(
                    trainer
                        .eval(self.prep.val_windows.clone())
                        .await
                        .map_err(|e| anyhow!("evaluation at step {step}: {e}"))?,
                )
            } else {
                None
            };
            if step.is_multiple_of(log_every) || last {
                println!(
                    "node {me}: step {step}/{}: loss {:.4}{}, {:.0} tokens/s, generation {}",
                    cfg.steps,
                    report.loss,
                    val_loss
                        .map(|v| format!(", val loss {v:.4}"))
                        .unwrap_or_default(),
                    tokens_per_s,
                    plan.generation
                );
            }
            if let Some(v) = val_loss {
                line["val_loss"] = json!(v);
            }
            if let Some(f) = self.metrics.as_mut() {
                writeln!(f, "{line}").context("metrics.jsonl: cannot append")?;
            }
            self.history.push(crate::plot::LossPoint {
                step,
                loss: report.loss,
                val_loss,
            });
            if committer && !last && cfg.ckpt_every > 0 && step.is_multiple_of(cfg.ckpt_every) {
                self.save_and_commit(trainer, plan, step, cursor, false)
                    .await?;
            }
            self.note_checkpoint_events(plan).await;
        }

        // The end of the job: the committer writes the final checkpoint; the others wait
        // until it is committed, so that nobody leaves (and re-forms the group) before.
        self.shared.set_phase("final checkpoint");
        if committer {
            self.refused_step = None;
            self.save_and_commit(trainer, plan, step, cursor, true)
                .await?;
            if self.refused_step == Some(step) {
                println!(
                    "node {}: generation {} ended before the record of the final checkpoint (step {step}); saving it again in the next",
                    self.member.id(),
                    plan.generation
                );
                return Ok((GenEnd::Reform, step, cursor));
            }
        } else if !self.wait_for_final(step, plan.generation).await? {
            return Ok((GenEnd::Reform, step, cursor));
        }
        self.shared.set_phase("done");
        Ok((GenEnd::Done, step, cursor))
    }

    /// A step failed: if a newer plan arrives within the re-formation window, re-form;
    /// otherwise the node leaves with the error.
    async fn after_failure(
        &self,
        plan: &Plan,
        step: u64,
        cursor: u64,
        error: String,
    ) -> Result<(GenEnd, u64, u64)> {
        let me = self.member.id().to_string();
        self.shared.set_phase("re-forming");
        // Long enough for a lease to expire and the leader to settle and plan.
        let window = Duration::from_secs(self.s.lease_ttl_s as u64 + 2)
            + Duration::from_millis(self.s.settle_ms.saturating_mul(3) + 2_000);
        let mut rx = self.member.plan_receiver();
        let deadline = tokio::time::Instant::now() + window;
        loop {
            if rx
                .borrow_and_update()
                .as_ref()
                .is_some_and(|p| p.generation > plan.generation)
            {
                println!(
                    "node {me}: generation {} ended during step {} ({error}); re-forming",
                    plan.generation,
                    step + 1
                );
                return Ok((GenEnd::Reform, step, cursor));
            }
            if let MemberState::Lost { reason } = self.member.state() {
                println!("node {me}: generation {} ended during step {}: this node lost its membership ({reason})", plan.generation, step + 1);
                return Ok((GenEnd::Reform, step, cursor));
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { bail!("node {me}: the membership agent stopped") },
                _ = tokio::time::sleep_until(deadline) => {
                    bail!("node {me}: training stopped at step {}: {error} (no new plan within {} s)", step + 1, window.as_secs());
                }
            }
        }
    }

    /// Snapshot now, save through the Checkpoint actor, and (when `wait`) wait for the
    /// commit and its fenced etcd record; otherwise the commit is recorded when its event
    /// comes back.
    async fn save_and_commit(
        &mut self,
        trainer: &Trainer,
        plan: &Plan,
        step: u64,
        cursor: u64,
        wait: bool,
    ) -> Result<()> {
        crate::train::save(
            trainer,
            &self.checkpointer,
            &self.prep.stored_cfg,
            &self.prep.config_hash,
            step,
            cursor,
            plan.generation,
        )
        .await?;
        if wait {
            self.checkpointer
                .flush(FINAL_CHECKPOINT_TIMEOUT)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            // The record may wait for etcd (unreachable for a while): keep trying.
            let deadline = Instant::now() + FINAL_CHECKPOINT_TIMEOUT;
            loop {
                if self.note_checkpoint_events(plan).await == Some(step) {
                    break;
                }
                let waiting = self
                    .pending_record
                    .as_ref()
                    .is_some_and(|(r, _, _)| r.step == step);
                if !waiting && self.refused_step == Some(step) {
                    // A newer generation formed: the caller saves it again there.
                    return Ok(());
                }
                if !waiting || Instant::now() > deadline {
                    bail!(
                        "the checkpoint of step {step} was not committed to {}: fix the store and etcd; the job resumes from its last committed checkpoint",
                        self.checkpointer_url()
                    );
                }
                if let MemberState::Lost { reason } = self.member.state() {
                    bail!("node {}: lost its membership ({reason}) while recording the checkpoint of step {step}", self.member.id());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    fn checkpointer_url(&self) -> String {
        job_store_url(&self.s.store_root, &self.s.job)
    }

    /// Record committed saves in etcd (fenced), log failures. A record etcd could not
    /// take (unreachable) is kept and tried again at later step boundaries (every
    /// [`RECORD_RETRY_INTERVAL`]) until it is taken, refused, or replaced by a newer one. Returns the
    /// newest step recorded in etcd by this call.
    async fn note_checkpoint_events(&mut self, plan: &Plan) -> Option<u64> {
        let mut recorded = None;
        let me = self.member.id().to_string();
        for event in self.checkpointer.take_events() {
            match event {
                CheckpointEvent::Committed {
                    step, url, save_s, ..
                } => {
                    let folder = url
                        .strip_prefix(&format!("{}/", self.checkpointer_url()))
                        .unwrap_or(&url)
                        .to_string();
                    let rec = CheckpointRecord {
                        step,
                        folder,
                        url: url.clone(),
                        generation: plan.generation,
                        member: me.clone(),
                    };
                    {
                        let mut v = self.shared.view();
                        v.last_save_s = save_s;
                        v.save_s_sum += save_s;
                    }
                    // A newer checkpoint replaces a record still waiting for etcd. While
                    // etcd did not answer lately, it waits for the next retry instead of
                    // holding this step for another attempt.
                    match self.pending_record.take() {
                        Some((_, _, tried)) if tried.elapsed() < RECORD_RETRY_INTERVAL => {
                            self.pending_record = Some((rec, save_s, tried));
                        }
                        _ => {
                            if self.record_checkpoint(rec, save_s).await {
                                recorded = Some(step);
                            }
                        }
                    }
                }
                CheckpointEvent::Failed { step, error } => {
                    self.shared.view().checkpoint_failures += 1;
                    eprintln!("warning: node {me}: checkpoint at step {step} failed, training goes on: {error}");
                }
                CheckpointEvent::Superseded { step, by_step } => eprintln!(
                    "note: node {me}: checkpoint at step {step} skipped, step {by_step} is saved instead"
                ),
                CheckpointEvent::Pruned { .. } | CheckpointEvent::PruneFailed { .. } => {}
            }
        }
        let retry = self
            .pending_record
            .as_ref()
            .filter(|(_, _, tried)| tried.elapsed() >= RECORD_RETRY_INTERVAL)
            .map(|(rec, save_s, _)| (rec.clone(), *save_s));
        if let Some((rec, save_s)) = retry {
            let step = rec.step;
            if self.record_checkpoint(rec, save_s).await {
                recorded = Some(step);
            }
        }
        recorded
    }

    /// Writes the fenced etcd record of a checkpoint in the store. `true` when etcd took
    /// it; when etcd could not be reached, the record waits in `pending_record`.
    async fn record_checkpoint(&mut self, rec: CheckpointRecord, save_s: f64) -> bool {
        let me = self.member.id().to_string();
        let bytes = serde_json::to_vec(&rec).expect("record serialises");
        let (step, url) = (rec.step, rec.url.clone());
        let retried = self.pending_record.take().is_some();
        // Bounded: the committer must not hold the group's next step while etcd is away.
        // Fenced on the generation that saved it: once a newer one is current, the newer
        // one commits its own checkpoints (found by the chaos harness's smoke scenario:
        // a record of generation 2 was accepted after generation 3 was planned).
        let attempt = match tokio::time::timeout(
            RECORD_ATTEMPT_TIMEOUT,
            self.member
                .fenced_commit_in(rec.generation, CHECKPOINT_KEY, &bytes),
        )
        .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer from etcd within {} ms",
                RECORD_ATTEMPT_TIMEOUT.as_millis()
            )),
        };
        match attempt {
            Ok(FenceOutcome::Committed { .. }) => {
                println!(
                    "node {me}: checkpoint of step {step} committed ({url}, {save_s:.2} s){}",
                    if retried {
                        "; etcd took its record once it answered again"
                    } else {
                        ""
                    }
                );
                let mut v = self.shared.view();
                v.last_checkpoint_step = step;
                v.last_checkpoint_url = url;
                v.checkpoints_committed += 1;
                true
            }
            Ok(FenceOutcome::Refused { reason }) => {
                self.refused_step = Some(step);
                eprintln!(
                    "warning: node {me}: checkpoint of step {step} is in the store ({url}) but its etcd record was refused ({reason:?}): a newer generation commits instead"
                );
                false
            }
            Err(e) => {
                if !retried {
                    eprintln!(
                        "warning: node {me}: checkpoint of step {step} is in the store ({url}) but etcd did not take its record ({e}); training goes on and the record is tried again"
                    );
                }
                self.pending_record = Some((rec, save_s, Instant::now()));
                false
            }
        }
    }

    /// Wait until the job's checkpoint record reaches `step` (another node commits it):
    /// `true`; `false` when a plan newer than `generation` appears first (the final
    /// checkpoint is then saved in that one).
    async fn wait_for_final(&self, step: u64, generation: u64) -> Result<bool> {
        let me = self.member.id().to_string();
        let deadline = Instant::now() + FINAL_CHECKPOINT_TIMEOUT;
        let plans = self.member.plan_receiver();
        loop {
            if plans
                .borrow()
                .as_ref()
                .is_some_and(|p| p.generation > generation)
            {
                return Ok(false);
            }
            match self.etcd.get(CHECKPOINT_KEY).await {
                Ok(Some(bytes)) => {
                    if let Ok(rec) = serde_json::from_slice::<CheckpointRecord>(&bytes) {
                        if rec.step >= step {
                            println!(
                                "node {me}: the final checkpoint (step {}) was committed by {}: {}",
                                rec.step, rec.member, rec.url
                            );
                            let mut v = self.shared.view();
                            v.last_checkpoint_step = rec.step;
                            v.last_checkpoint_url = rec.url;
                            return Ok(true);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("warning: node {me}: reading the checkpoint record: {e}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "node {me}: the final checkpoint of step {step} was not committed within {} s",
                    FINAL_CHECKPOINT_TIMEOUT.as_secs()
                );
            }
            if let MemberState::Lost { reason } = self.member.state() {
                bail!("node {me}: lost its membership ({reason}) while waiting for the final checkpoint");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn plot(&self) {
        let png = self.run_dir.join("loss.png");
        let title = format!("tenax job {} ({})", self.s.job, self.prep.cfg.preset);
        if let Err(e) = crate::plot::plot_loss(&png, &title, &self.history) {
            eprintln!("warning: {e}");
        }
    }
}

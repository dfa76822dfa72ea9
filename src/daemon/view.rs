//! What a node shows and takes: its view (the Control service's Status and
//! `/metrics`), the Control service (operator requests become messages to the node's
//! loop), and the listeners its services bind again after a restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tenax_actors::{Control, MemberStats, StepReport};
use tenax_cluster::peer::PeerHub;
use tenax_cluster::tls::PeerIdentity;
use tenax_core::membership::Plan;
use tenax_core::node::Event;
use tenax_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::metrics::{MetricKind, Sample};

/// What the node shows through Status and `/metrics`.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeView {
    pub(crate) generation: u64,
    pub(crate) ranks: Vec<u32>,
    pub(crate) world: u32,
    pub(crate) step: u64,
    pub(crate) target_steps: u64,
    pub(crate) loss: f64,
    pub(crate) tokens_per_s: f64,
    pub(crate) param_hash: String,
    pub(crate) last_checkpoint_step: u64,
    pub(crate) last_checkpoint_url: String,
    pub(crate) phase: String,
    pub(crate) leader: bool,
    pub(crate) checkpoints_committed: u64,
    pub(crate) checkpoint_failures: u64,
    pub(crate) last_save_s: f64,
    pub(crate) save_s_sum: f64,
    pub(crate) reforms: u64,
    pub(crate) state_copies_in: u64,
    pub(crate) state_copies_out: u64,
    pub(crate) state_bytes_in: u64,
    pub(crate) last_copy_gb_per_s: f64,
    pub(crate) hash_mismatches: u64,
    pub(crate) suspicions: u64,
    pub(crate) probes_sent: u64,
    pub(crate) revocations: u64,
    /// Pipelines: how each stage spent the last step.
    pub(crate) stage_times: Vec<tenax_actors::StageTime>,
    /// Pipelines: per stage, the sums over steps of busy and op-list seconds.
    pub(crate) stage_sums: Vec<(f64, f64)>,
}

/// An operator's request (the Control actor hands them to the node's loop: the gRPC
/// control calls and the signal handler send them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// Leave after the current step (with a checkpoint first).
    Drain { checkpoint: bool },
    /// SIGTERM: drain with a checkpoint within the grace period.
    Sigterm,
    /// Pause at the next step boundary.
    Pause,
    /// Go on.
    Resume,
    /// Save a checkpoint at the next step boundary.
    CheckpointNow,
}

impl Request {
    /// The node machine's event for this request (`grace_ms`: how long a SIGTERM drain
    /// may take).
    pub(crate) fn event(self, grace_ms: u64) -> Event {
        match self {
            Request::Drain { checkpoint } => Event::Drain { checkpoint },
            Request::Sigterm => Event::Sigterm { grace_ms },
            Request::Pause => Event::Pause,
            Request::Resume => Event::Resume,
            Request::CheckpointNow => Event::CheckpointNow,
        }
    }
}

impl NodeView {
    /// A checkpoint was committed; its save took `save_s` seconds.
    pub(crate) fn note_save(&mut self, save_s: f64) {
        self.last_save_s = save_s;
        self.save_s_sum += save_s;
    }

    /// The state the node holds now (`served`: it was just sent to peers).
    pub(crate) fn note_state(&mut self, step: u64, hash: &Option<String>, served: bool) {
        self.step = step;
        self.param_hash = hash.clone().unwrap_or_default();
        self.state_copies_out += u64::from(served);
    }

    /// A step finished.
    pub(crate) fn note_step(
        &mut self,
        step: u64,
        r: &StepReport,
        tokens_per_s: f64,
        m: MemberStats,
    ) {
        self.step = step;
        self.loss = r.loss;
        self.stage_times.clone_from(&r.stages);
        for t in &r.stages {
            let k = t.stage as usize;
            if self.stage_sums.len() <= k {
                self.stage_sums.resize(k + 1, (0.0, 0.0));
            }
            self.stage_sums[k].0 += t.busy_s;
            self.stage_sums[k].1 += t.ops_s;
        }
        self.tokens_per_s = tokens_per_s;
        self.leader = m.leader;
        self.probes_sent = m.probes_sent;
        self.revocations = m.revocations;
    }

    /// A generation forms (`reformed`: not the node's first).
    pub(crate) fn note_generation(
        &mut self,
        plan: &Plan,
        local: &[u32],
        leader: bool,
        reformed: bool,
    ) {
        self.reforms += u64::from(reformed);
        self.generation = plan.generation;
        self.ranks = local.to_vec();
        self.world = plan.world;
        self.leader = leader;
    }
}

/// State shared by the loop, the control service and the metrics endpoint.
pub(crate) struct Shared {
    pub(crate) job: String,
    pub(crate) member_id: String,
    pub(crate) addr: String,
    pub(crate) metrics_addr: String,
    pub(crate) config_hash: String,
    /// With `--pipeline-stages` above 1: the pipeline each of the node's ranks runs as.
    pub(crate) pipeline: Option<tenax_actors::PipelineSpec>,
    pub(crate) view: Mutex<NodeView>,
    /// The node's loop, for the supervisor's own requests (a child that keeps failing).
    pub(crate) requests: mpsc::Sender<Request>,
    /// The Control actor: operator requests go through it to the node's loop (bounded;
    /// a full queue refuses the request).
    pub(crate) control: Control<Request>,
    pub(crate) hub: PeerHub,
    /// Control calls refused for want of an operator certificate.
    pub(crate) control_refused: AtomicU64,
    /// Why the node must leave (a service kept failing), if it must.
    pub(crate) fatal: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, NodeView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_phase(&self, phase: &str) {
        self.view().phase = phase.to_string();
    }

    /// Hand an operator request to the node's loop, through the Control actor.
    pub(crate) async fn request(&self, req: Request) -> Result<(), tonic::Status> {
        self.control.request(req).await.map_err(|e| {
            tonic::Status::unavailable(format!(
                "node {}: cannot take the request now ({e}); try again",
                self.member_id
            ))
        })
    }

    pub(crate) fn status(&self) -> pb::StatusReply {
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
            pipeline_stages: self.pipeline.map_or(1, |p| p.stages),
            pipeline_schedule: self
                .pipeline
                .map(|p| p.schedule.to_string())
                .unwrap_or_default(),
        }
    }

    pub(crate) fn metrics(&self) -> String {
        let v = self.view().clone();
        let (g, c) = (MetricKind::Gauge, MetricKind::Counter);
        let hub = &self.hub;
        let tls = hub.tls();
        let table: [(&str, &str, MetricKind, f64); 30] = [
            ("tenax_step", "Optimizer steps completed.", g, v.step as f64),
            ("tenax_target_steps", "The job's target step.", g, v.target_steps as f64),
            ("tenax_loss", "Mean token loss of the last step.", g, v.loss),
            ("tenax_tokens_per_second", "Training throughput of the last step (whole group).", g, v.tokens_per_s),
            ("tenax_generation", "Generation of the group plan this node trains in.", g, v.generation as f64),
            ("tenax_world_ranks", "Ranks in the current generation.", g, f64::from(v.world)),
            ("tenax_pipeline_stages", "Stages of the pipeline each of this node's ranks runs as (1: none).", g, f64::from(self.pipeline.map_or(1, |p| p.stages))),
            ("tenax_leader", "1 if this node leads the job.", g, if v.leader { 1.0 } else { 0.0 }),
            ("tenax_reformations_total", "Generations this node has trained in after its first.", c, v.reforms as f64),
            ("tenax_checkpoints_committed_total", "Checkpoints this node committed.", c, v.checkpoints_committed as f64),
            ("tenax_checkpoint_failures_total", "Checkpoint saves of this node that failed.", c, v.checkpoint_failures as f64),
            ("tenax_checkpoint_save_seconds_last", "Duration of the last checkpoint save (upload and commit).", g, v.last_save_s),
            ("tenax_checkpoint_save_seconds_sum", "Total time spent in checkpoint saves.", c, v.save_s_sum),
            ("tenax_last_checkpoint_step", "Step of the newest committed checkpoint this node knows.", g, v.last_checkpoint_step as f64),
            ("tenax_peer_stale_refused_total", "Peer frames refused because they came from an older generation.", c, hub.stale_refused() as f64),
            ("tenax_peer_frames_accepted_total", "Peer frames accepted.", c, hub.frames_accepted() as f64),
            ("tenax_peer_state_requests_refused_total", "State copy requests refused (not a receiver of the published state, or too many at once).", c, hub.state_refused() as f64),
            ("tenax_peer_identity_refused_total", "Peer streams and state requests refused: the client's certificate names another member than the one claimed (mutual TLS).", c, hub.identity_refused() as f64),
            ("tenax_control_refused_total", "Control calls (drain, pause, resume, checkpoint) refused for want of an operator certificate.", c, self.control_refused.load(Ordering::Relaxed) as f64),
            ("tenax_tls_enabled", "1 if the node's gRPC services run mutual TLS, 0 with --insecure.", g, if tls.is_some() { 1.0 } else { 0.0 }),
            ("tenax_tls_handshakes_refused_total", "TLS handshakes refused on the node's listener (no certificate, another CA, expired, timed out).", c, tls.map_or(0.0, |t| t.handshakes_refused() as f64)),
            ("tenax_tls_reloads_total", "Times SIGHUP reloaded the node's certificates.", c, tls.map_or(0.0, |t| t.reloads() as f64)),
            ("tenax_state_copies_received_total", "Times this node copied the group's state from a peer (join, behind, diverged).", c, v.state_copies_in as f64),
            ("tenax_state_copies_served_total", "Times this node sent its state to peers that lacked it.", c, v.state_copies_out as f64),
            ("tenax_state_bytes_received_total", "Bytes of state copied from peers.", c, v.state_bytes_in as f64),
            ("tenax_state_copy_gigabytes_per_second_last", "Throughput of the last state copy from a peer.", g, v.last_copy_gb_per_s),
            ("tenax_param_hash_mismatches_total", "Periodic comparisons that found members with different parameters (each resyncs the odd ones).", c, v.hash_mismatches as f64),
            ("tenax_leader_probes_total", "Suspects this node probed as leader.", c, v.probes_sent as f64),
            ("tenax_leader_revocations_total", "Leases of confirmed suspects this node revoked as leader (evictions).", c, v.revocations as f64),
            ("tenax_suspicions_reported_total", "Peers this node reported as suspects (a broken stream or a late step).", c, v.suspicions as f64),
        ];
        let mut samples: Vec<Sample> = table
            .into_iter()
            .map(|(name, help, kind, value)| {
                Sample::new(name, help, kind, value)
                    .label("job", &self.job)
                    .label("node", &self.member_id)
            })
            .collect();
        samples.extend(self.stage_samples(&v));
        crate::metrics::render(&samples)
    }

    /// Per pipeline stage: the last step's op-list and busy seconds, their sums, and the
    /// last step's bubble (the share of the op list spent waiting).
    fn stage_samples(&self, v: &NodeView) -> Vec<Sample> {
        let (g, c) = (MetricKind::Gauge, MetricKind::Counter);
        let mut out = Vec::new();
        let label = |s: Sample, stage: usize| {
            s.label("job", &self.job)
                .label("node", &self.member_id)
                .label("stage", stage.to_string())
        };
        for t in &v.stage_times {
            let k = t.stage as usize;
            out.push(label(Sample::new("tenax_pipeline_stage_step_seconds", "Seconds the stage's op list of the last step took (compute and waits, before the reduction).", g, t.ops_s), k));
            out.push(label(
                Sample::new(
                    "tenax_pipeline_stage_busy_seconds",
                    "Seconds the stage computed (forward and backward) in the last step.",
                    g,
                    t.busy_s,
                ),
                k,
            ));
            out.push(label(Sample::new("tenax_pipeline_stage_bubble_ratio", "Share of the stage's op list spent waiting in the last step (1 - busy / op list).", g, t.bubble()), k));
        }
        for (k, (busy, ops)) in v.stage_sums.iter().enumerate() {
            out.push(label(
                Sample::new(
                    "tenax_pipeline_stage_step_seconds_total",
                    "Seconds of the stage's op lists over all steps.",
                    c,
                    *ops,
                ),
                k,
            ));
            out.push(label(
                Sample::new(
                    "tenax_pipeline_stage_busy_seconds_total",
                    "Seconds the stage computed over all steps.",
                    c,
                    *busy,
                ),
                k,
            ));
        }
        out
    }
}

/// The control service.
pub(crate) struct ControlService {
    pub(crate) shared: Arc<Shared>,
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
        self.operator_only(&req, "drain")?;
        self.shared
            .request(Request::Drain {
                checkpoint: req.get_ref().checkpoint,
            })
            .await?;
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
        req: tonic::Request<pb::CheckpointNowRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "checkpoint")?;
        self.shared.request(Request::CheckpointNow).await?;
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
        req: tonic::Request<pb::PauseRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "pause")?;
        self.shared.request(Request::Pause).await?;
        Ok(reply(true, format!("node {} pauses at its next step boundary (pause the whole job with `tenax control pause --all`: peers kept waiting by one paused node report it as late after --suspect-after-ms, and it may be evicted)", self.shared.member_id)))
    }

    async fn resume(
        &self,
        req: tonic::Request<pb::ResumeRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "resume")?;
        self.shared.request(Request::Resume).await?;
        Ok(reply(
            true,
            format!("node {} goes on training", self.shared.member_id),
        ))
    }
}

impl ControlService {
    /// Over mutual TLS, control calls need an operator certificate: a node's (or any
    /// other) is refused with `PERMISSION_DENIED`, counted. Over plain TCP (`--insecure`)
    /// there is nobody to check.
    fn operator_only<T>(&self, req: &tonic::Request<T>, call: &str) -> Result<(), tonic::Status> {
        match tenax_cluster::tls::peer_identity(req) {
            None | Some(Some(PeerIdentity::Operator(_))) => Ok(()),
            Some(other) => {
                self.shared.control_refused.fetch_add(1, Ordering::Relaxed);
                Err(tonic::Status::permission_denied(format!(
                    "{call} needs an operator certificate (`tenax certs issue --operator NAME`); this client's names {}",
                    other.map_or("no tenax identity".to_string(), |i| i.to_string())
                )))
            }
        }
    }
}

fn reply(accepted: bool, message: String) -> tonic::Response<pb::ControlReply> {
    tonic::Response::new(pb::ControlReply { accepted, message })
}

/// A service's listener: the one bound at start-up first, then (after a restart) a new
/// one on the same address.
pub(crate) struct Rebind {
    pub(crate) first: Mutex<Option<tokio::net::TcpListener>>,
    pub(crate) addr: SocketAddr,
}

impl Rebind {
    pub(crate) fn new(first: tokio::net::TcpListener, addr: SocketAddr) -> Self {
        Self {
            first: Mutex::new(Some(first)),
            addr,
        }
    }

    pub(crate) async fn listener(&self) -> Result<tokio::net::TcpListener, String> {
        let taken = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(l) => Ok(l),
            None => tokio::net::TcpListener::bind(self.addr)
                .await
                .map_err(|e| format!("binding {} again: {e}", self.addr)),
        }
    }
}

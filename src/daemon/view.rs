//! What a node shows and takes: its view ([`NodeView`], read by the Control service's
//! Status and by `/metrics`), the state its loop and services share ([`Shared`]), and the
//! listeners its services bind again after a restart. The Control service and operator
//! requests are in `view/control.rs`; the `/metrics` page in `view/metrics.rs`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use tenax_actors::{Control, MemberStats, StepReport};
use tenax_cluster::peer::PeerHub;
use tenax_core::membership::Plan;
use tokio::sync::mpsc;

mod control;
mod metrics;

pub(crate) use control::{ControlService, Request};
use metrics::Timings;

/// What the node shows through Status and `/metrics`.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeView {
    pub(crate) generation: u64,
    pub(crate) ranks: Vec<u32>,
    pub(crate) world: u32,
    /// The plan's pipeline depth (above 1 only with `--stages-across-nodes`).
    pub(crate) pp_depth: u32,
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
    pub(crate) reforms: u64,
    pub(crate) state_copies_in: u64,
    pub(crate) state_copies_out: u64,
    pub(crate) state_bytes_in: u64,
    /// Step, checkpoint and state copy durations.
    pub(crate) timings: Timings,
    pub(crate) hash_mismatches: u64,
    pub(crate) suspicions: u64,
    pub(crate) probes_sent: u64,
    pub(crate) revocations: u64,
    /// Pipelines: how each stage spent the last step.
    pub(crate) stage_times: Vec<tenax_actors::StageTime>,
    /// Pipelines: per stage, the sums over steps of busy and op-list seconds.
    pub(crate) stage_sums: Vec<(f64, f64)>,
}

impl NodeView {
    /// A checkpoint was committed to the store; its save took `save_s` seconds.
    pub(crate) fn note_save(&mut self, save_s: f64) {
        self.timings.checkpoint_save.observe(save_s);
    }

    /// A checkpoint's fenced record landed in etcd (`commit_s`: how long the write took)
    /// and is the newest this node knows.
    pub(crate) fn note_record(&mut self, step: u64, url: String, commit_s: f64) {
        self.last_checkpoint_step = step;
        self.last_checkpoint_url = url;
        self.checkpoints_committed += 1;
        self.timings.checkpoint_commit.observe(commit_s);
    }

    /// The state was copied from a peer: `bytes` in `copy_s` seconds.
    pub(crate) fn note_state_copy(&mut self, bytes: u64, copy_s: f64) {
        self.state_copies_in += 1;
        self.state_bytes_in += bytes;
        self.timings.state_copy.observe(copy_s);
    }

    /// The state the node holds now (`served`: it was just sent to peers).
    pub(crate) fn note_state(&mut self, step: u64, hash: &Option<String>, served: bool) {
        self.step = step;
        self.param_hash = hash.clone().unwrap_or_default();
        self.state_copies_out += u64::from(served);
    }

    /// A step finished; it took `step_s` seconds.
    pub(crate) fn note_step(
        &mut self,
        step: u64,
        r: &StepReport,
        step_s: f64,
        tokens_per_s: f64,
        m: MemberStats,
    ) {
        self.step = step;
        self.timings.step.observe(step_s);
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
        self.pp_depth = plan.pp_depth;
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
    /// With `--pipeline-stages` above 1: the pipeline each of the node's ranks runs as
    /// (or, with `stages_across_nodes`, whose stages the nodes share).
    pub(crate) pipeline: Option<tenax_actors::PipelineSpec>,
    /// Each node runs one stage (`--stages-across-nodes`).
    pub(crate) stages_across_nodes: bool,
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
    /// The node's view, locked (a poisoned lock is taken over: the view stays readable).
    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, NodeView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Show the node machine's phase.
    pub(crate) fn set_phase(&self, phase: &str) {
        self.view().phase = phase.to_string();
    }
}

/// A service's listener: the one bound at start-up first, then (after a restart) a new
/// one on the same address.
pub(crate) struct Rebind {
    pub(crate) first: Mutex<Option<tokio::net::TcpListener>>,
    pub(crate) addr: SocketAddr,
}

impl Rebind {
    /// Rebinds `addr`, starting with the listener bound at start-up.
    pub(crate) fn new(first: tokio::net::TcpListener, addr: SocketAddr) -> Self {
        Self {
            first: Mutex::new(Some(first)),
            addr,
        }
    }

    /// The listener to serve on: the first one once, then a new one bound on `addr`.
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

//! Pipeline parallelism in one process: D pipelines x S stages, each stage rank an actor
//! in front of a compute thread (the same [`RankActor`] as a data-parallel rank), under
//! one supervisor that answers the same requests as the data-parallel one, so
//! [`Trainer`] drives both alike.
//!
//! Rank `r` is stage `r % S` of pipeline `r / S` ([`PipelinePlan`]). Per step:
//!
//! - Pipeline `p` computes the slots `slots_for_rank(M, D, p)` of the global batch, the
//!   ones data-parallel rank `p` of D would compute. Each stage runs its op list
//!   ([`stage_ops`], GPipe or 1F1B) over them: activations go to the next stage and
//!   output gradients come back over bounded channels, every message stamped with its
//!   step and slot and checked on receipt. A stage holds one [`Workspace`] per slot in
//!   flight (the schedule's peak: M for GPipe, `min(M, S - i)` at stage `i` for 1F1B).
//! - Every slot's gradient of a stage's parameters is computed into zeros and handed to
//!   the stage's collective, which folds them in slot order across the stage's D
//!   replicas ([`InProcessCollective`], one per stage, sized to the stage's parameters):
//!   the exact reduction of data-parallel ranks, per stage.
//! - The token embedding is tied to the head. The first stage holds a copy of it for
//!   the lookup; its backward leaves each slot's embedding-output gradient, which it
//!   sends to the head stage (`emb` channel); the head stage adds those rows to that
//!   slot's token-embedding gradient ([`Workspace::add_embedding_grad`]) after the slot's
//!   own backward and before contributing it, which forms the slot's gradient exactly as
//!   the whole model does. Slots waiting for their rows are held (at most the
//!   pipeline's slots); rows that arrived are folded after every backward, the rest at
//!   the end of the step.
//! - After its reduction every stage posts its tensors' sums of squares (and the head
//!   stage its reduced loss and gradient) to the step's [`Meet`]; every stage then
//!   adds all the sums in the whole model's layout order ([`clip_scale_from_squares`]),
//!   so all apply the same clip factor and make the same non-finite skip decision as a
//!   run of one stage. The first stage applies the head stage's reduced token-embedding
//!   gradient to its copy, so both copies take the same AdamW update and stay equal.
//!
//! The result is bit-identical to `tenax train --ranks 1`. A snapshot gathers pipeline
//! 0's stages into the whole model's flat layout by name (the token embedding from the
//! head stage), so checkpoints, export and resume are those of any run; it is a copy,
//! not copy-on-write as with data-parallel ranks. Validation runs through pipeline 0's
//! stages (forward only, the same bits as the whole model); sampling builds the candle
//! model from a snapshot.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tenax_cluster::{
    Collective, GrpcCollective, InProcessCollective, Reduced, SlotContribution, StageMessage,
    StagePart,
};
use tenax_core::guard::GuardLimits;
use tenax_core::pipeline::{
    peak_in_flight, stage_ops, GridPos, Op, PipelineConfig, PipelinePlan, Schedule, StageLayers,
};
use tenax_core::sampler::Sampler;
use tenax_core::slots::slots_for_rank;
use tenax_model::{
    clip_scale_from_squares, tensor_squares, AdamW, Gpt, ParamLayout, StageInput, Workspace,
};

use crate::rank::{
    param_hash, Aborter, Compute, RankActor, RankArgs, RankMsg, RankOutcome, StageTime, TrainData,
    TrainSetup,
};
use crate::stage_slices::Assembler;
use crate::supervisor::{
    agree, on_rank, spawn_trainer, ActorsError, Ask, GroupStart, Snapshot, SupervisorMsg, Trainer,
};

/// The name of the token embedding, tied to the head.
const WTE: &str = "wte.weight";

/// The step tag of validation messages (no training step uses it).
const EVAL_STEP: u64 = u64::MAX;

/// How a process's ranks form pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineSpec {
    /// Stages S per pipeline; the process's ranks N form N / S pipelines.
    pub stages: u32,
    /// The schedule every stage runs.
    pub schedule: Schedule,
}

/// One message between the stages of a pipeline: a slot's activations, output gradient
/// or embedding-output gradient.
struct Piece {
    step: u64,
    slot: u64,
    data: Vec<f32>,
}

/// What one stage posts to a step's [`Meet`].
struct Post {
    /// (index in the whole model's layout, sum of squares of the reduced gradient) of
    /// each tensor this stage answers for (the first stage's copy of the token
    /// embedding is not one: the head stage answers for it).
    squares: Vec<(usize, f64)>,
    /// On the head stage: its reduction (the loss sum, and the token embedding's
    /// gradient the first stage applies to its copy).
    head: Option<Arc<Reduced>>,
}

/// Where the stages of a step meet after their reductions. Each stage's first post of a
/// step counts (its data-parallel replicas post the same values); every rank reads the
/// posts once every stage's is in; the last reader drops the step. At most two steps
/// are open at once (a rank a step ahead of another), more is an error.
pub(crate) struct Meet {
    stages: usize,
    ranks: usize,
    state: Mutex<MeetState>,
    changed: Condvar,
}

struct MeetState {
    aborted: Option<String>,
    steps: BTreeMap<u64, Round>,
}

struct Round {
    posts: Vec<Option<Arc<Post>>>,
    read: usize,
}

impl Meet {
    fn new(stages: usize, ranks: usize) -> Self {
        Self {
            stages,
            ranks,
            state: Mutex::new(MeetState {
                aborted: None,
                steps: BTreeMap::new(),
            }),
            changed: Condvar::new(),
        }
    }

    /// Post `stage`'s values for `step` and wait (at most `timeout`) for every stage's.
    fn exchange(
        &self,
        step: u64,
        stage: usize,
        post: Post,
        timeout: Duration,
    ) -> Result<Vec<Arc<Post>>, String> {
        let start = Instant::now();
        let mut st = self.state.lock().expect("meet lock poisoned");
        if let Some(r) = &st.aborted {
            return Err(format!("aborted: {r}"));
        }
        if !st.steps.contains_key(&step) && st.steps.len() >= 2 {
            return Err(format!(
                "step {step}: the stages' meeting already has steps {:?} open",
                st.steps.keys().collect::<Vec<_>>()
            ));
        }
        let stages = self.stages;
        let round = st.steps.entry(step).or_insert_with(|| Round {
            posts: vec![None; stages],
            read: 0,
        });
        if round.posts[stage].is_none() {
            round.posts[stage] = Some(Arc::new(post));
            self.changed.notify_all();
        }
        loop {
            if let Some(r) = &st.aborted {
                return Err(format!("aborted: {r}"));
            }
            let round = st.steps.get_mut(&step).expect("a step stays until read");
            if round.posts.iter().all(Option::is_some) {
                let posts: Vec<Arc<Post>> = round.posts.iter().flatten().cloned().collect();
                round.read += 1;
                if round.read == self.ranks {
                    st.steps.remove(&step);
                }
                return Ok(posts);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let missing: Vec<usize> =
                    (0..stages).filter(|&s| round.posts[s].is_none()).collect();
                return Err(format!(
                    "step {step}: stage(s) {missing:?} did not finish their reduction within {} s",
                    timeout.as_secs()
                ));
            }
            st = self
                .changed
                .wait_timeout(st, timeout - waited)
                .expect("meet lock poisoned")
                .0;
        }
    }

    fn abort(&self, reason: &str) {
        let mut st = self.state.lock().expect("meet lock poisoned");
        st.aborted.get_or_insert_with(|| reason.to_string());
        self.changed.notify_all();
    }

    fn aborted(&self) -> Option<String> {
        self.state
            .lock()
            .expect("meet lock poisoned")
            .aborted
            .clone()
    }
}

/// A stage's ends of its pipeline's channels in one process.
#[derive(Default)]
struct Channels {
    /// Activations from the previous stage.
    acts_in: Option<Receiver<Piece>>,
    /// Activations to the next stage.
    acts_out: Option<SyncSender<Piece>>,
    /// Output gradients from the next stage.
    grads_in: Option<Receiver<Piece>>,
    /// Input gradients to the previous stage.
    grads_out: Option<SyncSender<Piece>>,
    /// On the head stage (S > 1): embedding-output gradients from the first stage.
    emb_in: Option<Receiver<Piece>>,
    /// On the first stage (S > 1): embedding-output gradients to the head stage.
    emb_out: Option<SyncSender<Piece>>,
}

/// Where a stage's messages go: channels to stages in this process, or the peer plane
/// to stages on other members.
enum Links {
    /// The pipeline's stages are all in this process.
    Local(Channels),
    /// This stage's neighbours are other members of the generation.
    Peer(PeerLinks),
}

/// A stage's neighbours on other members: indices into the communicator's members.
struct PeerLinks {
    comm: Arc<GrpcCollective>,
    prev: Option<usize>,
    next: Option<usize>,
    /// The first stage's member (on the head stage of S > 1).
    first: Option<usize>,
    /// The head stage's member (on the first stage of S > 1).
    head: Option<usize>,
}

/// A stage of one pipeline whose other stages run on other members: which stage, and
/// where the others are. See [`Trainer::start_stage`].
#[derive(Clone)]
pub struct StageOnPeers {
    /// The stage this process runs (0-based).
    pub stage: u32,
    /// The generation's communicator, built with this stage's [`StagePart`]
    /// ([`stage_part`]): gradient parts and stage messages both travel over it.
    pub comm: Arc<GrpcCollective>,
    /// The members (indices into the communicator's members) running this pipeline's
    /// stages, in stage order; entry `stage` is this member.
    pub pipeline_members: Vec<usize>,
}

/// A stage on other members' view of the whole model: how its flat layout maps onto it,
/// and the whole model's state, which such a stage keeps up to date (see
/// [`Trainer::start_stage`]).
struct WholeView {
    whole: ParamLayout,
    /// The whole model's parameters: every member updates all of them with the whole
    /// reduced gradient, as one rank does, and takes its stage's tensors out of them.
    params: Arc<Vec<f32>>,
    /// The whole model's AdamW state.
    opt: Arc<AdamW>,
    /// A workspace for evaluating the whole model (made at the first evaluation).
    eval_ws: Option<Workspace>,
    /// (range in the stage's layout, range in the whole model's) of every tensor the
    /// stage holds (the first stage's tied copy of the token embedding included).
    takes: Vec<(Range<usize>, Range<usize>)>,
    /// The stage-layout ranges it gives to the reduction, ascending (the first stage's
    /// copy of the token embedding left out when another stage holds the head).
    gives: Vec<Range<usize>>,
}

/// The [`StagePart`] of stage `layers` of `model`: the whole layout's ranges whose
/// gradients the stage forms (its tensors, less the first stage's copy of the tied token
/// embedding when another stage holds the head), merged where adjacent.
/// `stage_frames_per_step` sizes the send queues for the stage messages.
pub fn stage_part(
    model: &tenax_model::GptConfig,
    layers: &StageLayers,
    stage_frames_per_step: usize,
) -> StagePart {
    let whole = ParamLayout::for_config(model);
    let stage = ParamLayout::for_stage(model, layers);
    let mut gives: Vec<Range<usize>> = Vec::new();
    for e in &stage.entries {
        if e.name == WTE && !layers.head {
            continue;
        }
        let r = whole
            .get(&e.name)
            .expect("a stage holds the model's tensors")
            .range();
        match gives.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => gives.push(r),
        }
    }
    StagePart {
        gives,
        head: layers.head,
        stage_frames_per_step,
    }
}

/// A slot whose forward ran: its workspace (holding the activations) and token ids.
struct Held {
    ws: Workspace,
    inputs: Vec<u32>,
    loss: f32,
}

/// A head-stage slot gradient waiting for the first stage's embedding rows.
struct Waiting {
    grad: Vec<f32>,
    loss: f32,
    inputs: Vec<u32>,
}

/// What a stage rank's compute thread owns.
pub(crate) struct StageCompute {
    rank: usize,
    pos: GridPos,
    stages: u32,
    pipelines: u32,
    schedule: Schedule,
    setup: TrainSetup,
    data: Arc<TrainData>,
    layers: StageLayers,
    /// The stage's flat layout ([`ParamLayout::for_stage`]).
    layout: ParamLayout,
    /// Per entry of `layout`: its index in the whole model's layout, `None` for the
    /// first stage's copy of the token embedding when another stage holds the head.
    whole_index: Vec<Option<usize>>,
    /// Entries of the whole model's layout.
    whole_entries: usize,
    /// On the first stage of S > 1: the token embedding's range in this stage's layout
    /// and in the head stage's.
    tied: Option<(Range<usize>, Range<usize>)>,
    params: Arc<Vec<f32>>,
    opt: Arc<AdamW>,
    /// Workspaces not holding a slot: one per slot the schedule keeps in flight.
    spare: Vec<Workspace>,
    /// For the token-embedding rows on the head stage (needs no buffers).
    tie_ws: Workspace,
    collective: Arc<dyn Collective>,
    meet: Arc<Meet>,
    links: Links,
    /// With the pipeline's other stages on other members: the whole model's view (the
    /// reduction gives every member the whole gradient; no [`Meet`]).
    view: Option<WholeView>,
    abort: Aborter,
    sampler: Sampler,
}

impl Compute for StageCompute {
    fn rank(&self) -> usize {
        self.rank
    }

    fn aborter(&self) -> Aborter {
        Arc::clone(&self.abort)
    }
}

impl StageCompute {
    fn err(&self, what: impl std::fmt::Display) -> String {
        format!(
            "rank {} (pipeline {}, stage {}): {what}",
            self.rank, self.pos.pipeline, self.pos.stage
        )
    }

    /// Input and target token ids of `windows`.
    fn tokens(&self, windows: &[u64], split_val: bool) -> (Vec<u32>, Vec<u32>) {
        let bs = self.setup.model.block_size;
        let tokens = match split_val {
            true => &self.data.val,
            false => &self.data.train,
        };
        let (mut inputs, mut targets) = (
            Vec::with_capacity(windows.len() * bs),
            Vec::with_capacity(windows.len() * bs),
        );
        let (mut i, mut t) = (Vec::with_capacity(bs), Vec::with_capacity(bs));
        for &w in windows {
            tenax_data::window(tokens, bs, w as usize, &mut i, &mut t);
            inputs.extend_from_slice(&i);
            targets.extend_from_slice(&t);
        }
        (inputs, targets)
    }

    /// Receive the piece `(step, slot)` of `which` ("activations", "gradient" or
    /// "embedding"), waiting at most the step timeout and giving up at once when the
    /// trainer is aborted.
    fn recv(&self, which: &str, step: u64, slot: u64) -> Result<Piece, String> {
        let links = match &self.links {
            Links::Local(links) => links,
            Links::Peer(peer) => {
                let (msg, from) = peer_route(peer, which, false);
                let from = from.ok_or_else(|| self.err(format!("has no {which} sender")))?;
                let data = peer
                    .comm
                    .recv_stage(from, msg, step, slot, self.setup.step_timeout)
                    .map_err(|e| self.err(format!("{which} of step {step} slot {slot}: {e}")))?;
                return Ok(Piece { step, slot, data });
            }
        };
        let rx = match which {
            "activations" => links.acts_in.as_ref(),
            "gradient" => links.grads_in.as_ref(),
            _ => links.emb_in.as_ref(),
        }
        .ok_or_else(|| self.err(format!("has no {which} channel")))?;
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(p) if p.step == step && p.slot == slot => return Ok(p),
                Ok(p) => {
                    return Err(self.err(format!(
                        "expected {which} of step {step} slot {slot}, got step {} slot {}",
                        p.step, p.slot
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.err(format!("the stage sending {which} is gone")))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(r) = self.meet.aborted() {
                        return Err(self.err(format!("aborted: {r}")));
                    }
                    if start.elapsed() >= self.setup.step_timeout {
                        return Err(self.err(format!(
                            "no {which} for step {step} slot {slot} within {} s",
                            self.setup.step_timeout.as_secs()
                        )));
                    }
                }
            }
        }
    }

    /// Send `piece` as `which` ("activations" to the next stage, "gradient" to the
    /// previous, "embedding" to the head). On channels a full queue (only validation can
    /// fill one) waits for the receiver, at most the step timeout, and gives up when the
    /// trainer is aborted; on the peer plane the send never waits.
    fn send(&self, which: &str, mut piece: Piece) -> Result<(), String> {
        let links = match &self.links {
            Links::Local(links) => links,
            Links::Peer(peer) => {
                let (msg, to) = peer_route(peer, which, true);
                let to = to.ok_or_else(|| self.err(format!("has no {which} receiver")))?;
                return peer
                    .comm
                    .send_stage(to, msg, piece.step, piece.slot, &piece.data)
                    .map_err(|e| self.err(e));
            }
        };
        let tx = match which {
            "activations" => links.acts_out.as_ref(),
            "gradient" => links.grads_out.as_ref(),
            _ => links.emb_out.as_ref(),
        }
        .ok_or_else(|| self.err("has no channel to send on"))?;
        let start = Instant::now();
        loop {
            match tx.try_send(piece) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => {
                    return Err(self.err("the stage receiving its output is gone"))
                }
                Err(TrySendError::Full(p)) => {
                    if let Some(r) = self.meet.aborted() {
                        return Err(self.err(format!("aborted: {r}")));
                    }
                    if start.elapsed() >= self.setup.step_timeout {
                        return Err(self.err("the next stage took nothing for a step timeout"));
                    }
                    piece = p;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// On the head stage: embedding rows that already arrived for one of `waiting`'s
    /// slots, without waiting.
    fn try_recv_embedding(
        &self,
        step: u64,
        waiting: &BTreeMap<u64, Waiting>,
    ) -> Result<Option<Piece>, String> {
        match &self.links {
            Links::Local(links) => match links.emb_in.as_ref().map(Receiver::try_recv) {
                Some(Ok(p)) => Ok(Some(p)),
                Some(Err(TryRecvError::Empty)) => Ok(None),
                _ => Err(self.err("the first stage is gone")),
            },
            Links::Peer(peer) => match waiting
                .keys()
                .find(|&&slot| peer.comm.has_stage(StageMessage::Embedding, step, slot))
            {
                Some(&slot) => self.recv("embedding", step, slot).map(Some),
                None => Ok(None),
            },
        }
    }

    fn contribute(
        &self,
        step: u64,
        slot: u64,
        loss_sum: f32,
        grad: Vec<f32>,
    ) -> Result<(), String> {
        let grad = match &self.view {
            None => grad,
            Some(v) => v
                .gives
                .iter()
                .flat_map(|r| grad[r.clone()].iter().copied())
                .collect(),
        };
        self.collective
            .contribute(
                step,
                SlotContribution {
                    slot,
                    loss_sum,
                    grad,
                },
            )
            .map_err(|e| self.err(e))
    }

    /// On the head stage of S > 1: add the first stage's embedding rows to the slots
    /// waiting for them and contribute those slots; `all`: wait until none is left.
    fn fold_embedding_rows(
        &self,
        step: u64,
        waiting: &mut BTreeMap<u64, Waiting>,
        all: bool,
    ) -> Result<(), String> {
        loop {
            let piece = match all {
                true => match waiting.keys().next() {
                    None => return Ok(()),
                    Some(&slot) => self.recv("embedding", step, slot)?,
                },
                false => match self.try_recv_embedding(step, waiting)? {
                    Some(p) => p,
                    None => return Ok(()),
                },
            };
            let Some(mut w) = waiting.remove(&piece.slot).filter(|_| piece.step == step) else {
                return Err(self.err(format!(
                    "embedding rows of step {} slot {} that no slot waits for",
                    piece.step, piece.slot
                )));
            };
            self.tie_ws
                .add_embedding_grad(&mut w.grad, &w.inputs, &piece.data)
                .map_err(|e| self.err(e))?;
            self.contribute(step, piece.slot, w.loss, w.grad)?;
        }
    }

    /// Run this stage's ops for `step` (global batch from sample `cursor`), reduce, meet
    /// the other stages, and apply the update. A failure aborts the trainer at once, so
    /// that no other stage waits for this one until its deadline.
    pub(crate) fn step(
        &mut self,
        step: u64,
        cursor: u64,
        lr: f32,
        limits: Option<GuardLimits>,
    ) -> Result<RankOutcome, String> {
        #[cfg(feature = "chaos-hooks")]
        crate::rank::panic_once_at(step);
        let r = self.run_step(step, cursor, lr, limits);
        if let Err(e) = &r {
            (self.abort)(e);
        }
        r
    }

    fn run_step(
        &mut self,
        step: u64,
        cursor: u64,
        lr: f32,
        limits: Option<GuardLimits>,
    ) -> Result<RankOutcome, String> {
        let batch = self.setup.batch;
        let mine = slots_for_rank(
            batch.num_slots(),
            u64::from(self.pipelines),
            u64::from(self.pos.pipeline),
        );
        let ops = stage_ops(
            self.schedule,
            self.stages,
            self.pos.stage,
            (mine.end - mine.start) as u32,
        );
        let (first, head) = (self.layers.embeddings, self.layers.head);
        let mut held: BTreeMap<u64, Held> = BTreeMap::new();
        let mut waiting: BTreeMap<u64, Waiting> = BTreeMap::new();
        let (mut input, mut output, mut dout, mut dx) = (None, None, None, None);
        let (t_ops, mut busy) = (Instant::now(), Duration::ZERO);
        for op in ops {
            let t_op = Instant::now();
            let computes = matches!(op, Op::Forward { .. } | Op::Backward { .. });
            let slot = mine.start + u64::from(op.slot());
            match op {
                Op::RecvActivation { .. } => input = Some(self.recv("activations", step, slot)?),
                Op::Forward { .. } => {
                    let samples = batch.slot_samples(cursor, slot);
                    let count = (samples.end - samples.start) as usize;
                    let bs = self.setup.model.block_size;
                    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
                    self.data
                        .read_train(&mut self.sampler, samples, bs, &mut inputs, &mut targets)
                        .map_err(|e| self.err(e))?;
                    let mut ws = self
                        .spare
                        .pop()
                        .ok_or_else(|| self.err("more slots in flight than workspaces"))?;
                    let acts: Option<Piece> = input.take();
                    let stage_input = match (first, &acts) {
                        (true, _) => StageInput::Tokens(&inputs),
                        (false, Some(a)) => StageInput::Acts(&a.data),
                        (false, None) => return Err(self.err("a forward without its input")),
                    };
                    let loss = ws
                        .stage_forward(&self.params, stage_input, &targets, count, true)
                        .map_err(|e| self.err(format!("step {step} slot {slot}: {e}")))?;
                    if !head {
                        output = Some(Piece {
                            step,
                            slot,
                            data: ws.output().to_vec(),
                        });
                    }
                    held.insert(slot, Held { ws, inputs, loss });
                }
                Op::SendActivation { .. } => {
                    let piece = output.take().ok_or_else(|| self.err("nothing to send"))?;
                    self.send("activations", piece)?;
                }
                Op::RecvGrad { .. } => dout = Some(self.recv("gradient", step, slot)?),
                Op::Backward { .. } => {
                    let Held {
                        mut ws,
                        inputs,
                        loss,
                    } = held.remove(&slot).ok_or_else(|| {
                        self.err(format!("a backward of slot {slot} before its forward"))
                    })?;
                    let mut grad = vec![0f32; self.layout.total];
                    let d: Option<Piece> = dout.take();
                    ws.stage_backward(
                        &self.params,
                        &inputs,
                        d.as_ref().map(|p| p.data.as_slice()),
                        &mut grad,
                    )
                    .map_err(|e| self.err(format!("step {step} slot {slot}: {e}")))?;
                    let rows = Piece {
                        step,
                        slot,
                        data: ws.input_grad().to_vec(),
                    };
                    self.spare.push(ws);
                    match (first, head) {
                        // The whole model: the slot's gradient is complete.
                        (true, true) => self.contribute(step, slot, loss, grad)?,
                        // The embedding rows go to the head stage, which forms the tied
                        // weight's gradient; this copy's stays zero.
                        (true, false) => {
                            self.send("embedding", rows)?;
                            self.contribute(step, slot, 0.0, grad)?;
                        }
                        (false, true) => {
                            dx = Some(rows);
                            waiting.insert(slot, Waiting { grad, loss, inputs });
                            self.fold_embedding_rows(step, &mut waiting, false)?;
                        }
                        (false, false) => {
                            dx = Some(rows);
                            self.contribute(step, slot, 0.0, grad)?;
                        }
                    }
                }
                Op::SendGrad { .. } => {
                    let piece = dx.take().ok_or_else(|| self.err("no gradient to send"))?;
                    self.send("gradient", piece)?;
                }
            }
            if computes {
                busy += t_op.elapsed();
            }
        }
        if head && !first {
            self.fold_embedding_rows(step, &mut waiting, true)?;
        }
        let time = StageTime {
            stage: self.pos.stage,
            busy_s: busy.as_secs_f64(),
            ops_s: t_ops.elapsed().as_secs_f64(),
        };
        let mut outcome = self.finish(step, lr, limits)?;
        outcome.stage_time = Some(time);
        Ok(outcome)
    }

    /// The stage's reduction, the meeting of the stages and the update.
    fn finish(
        &mut self,
        step: u64,
        lr: f32,
        limits: Option<GuardLimits>,
    ) -> Result<RankOutcome, String> {
        let reduced = self
            .collective
            .reduced(step, self.setup.step_timeout)
            .map_err(|e| self.err(e))?;
        if self.view.is_some() {
            return self.finish_whole(step, lr, limits, reduced);
        }
        let ws = &self.spare[0];
        let (grad, layout) = (&reduced.grad_sum, &self.layout);
        let sums = ws.install(|| tensor_squares(grad, layout));
        let squares = self
            .whole_index
            .iter()
            .zip(sums)
            .filter_map(|(w, s)| w.map(|w| (w, s)))
            .collect();
        let post = Post {
            squares,
            head: self.layers.head.then(|| Arc::clone(&reduced)),
        };
        let posts = self
            .meet
            .exchange(step, self.pos.stage as usize, post, self.setup.step_timeout)
            .map_err(|e| self.err(e))?;
        let mut all = vec![None; self.whole_entries];
        for p in &posts {
            for &(w, s) in &p.squares {
                all[w] = Some(s);
            }
        }
        let all: Vec<f64> = all
            .into_iter()
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| self.err("a tensor's sum of squares is missing"))?;
        let head = posts
            .last()
            .and_then(|p| p.head.clone())
            .ok_or_else(|| self.err("the head stage posted no loss"))?;
        let tokens = (self.setup.batch.batch_size as usize * self.setup.model.block_size) as f32;
        let loss = crate::rank::chaos_loss(step, head.loss_sum / f64::from(tokens));
        let (grad_norm, grad_scale) = clip_scale_from_squares(&all, tokens, self.setup.grad_clip);
        if let Some(out) = crate::rank::skip(loss, grad_norm, limits) {
            return Ok(out);
        }
        // The first stage's copy of the tied embedding takes the head stage's gradient.
        let patched;
        let grad: &[f32] = match &self.tied {
            None => &reduced.grad_sum,
            Some((mine, theirs)) => {
                let mut g = reduced.grad_sum.clone();
                g[mine.clone()].copy_from_slice(&head.grad_sum[theirs.clone()]);
                patched = g;
                &patched
            }
        };
        Ok(self.apply(grad, grad_scale, lr, loss, grad_norm))
    }

    /// The end of a step on a stage whose pipeline's other stages run on other members:
    /// the reduction gave every member the whole gradient and loss, so the clip norm comes
    /// from every tensor's sum of squares in the whole layout's order (the same sums, in
    /// the same order, as the stages' meeting adds) and the stage takes its tensors out
    /// of the whole (the first stage's tied copy of the token embedding gets the head's).
    fn finish_whole(
        &mut self,
        step: u64,
        lr: f32,
        limits: Option<GuardLimits>,
        reduced: Arc<Reduced>,
    ) -> Result<RankOutcome, String> {
        let Some(total) = self.view.as_ref().map(|v| v.whole.total) else {
            return Err(self.err("no whole-model view"));
        };
        if reduced.grad_sum.len() != total {
            return Err(self.err(format!(
                "the reduction gave {} values, the model has {total}",
                reduced.grad_sum.len(),
            )));
        }
        let Self {
            view: Some(view),
            spare,
            setup,
            params: mine,
            ..
        } = self
        else {
            return Err("no whole-model view".into());
        };
        let ws = &spare[0];
        let all = ws.install(|| tensor_squares(&reduced.grad_sum, &view.whole));
        let tokens = (setup.batch.batch_size as usize * setup.model.block_size) as f32;
        let loss = crate::rank::chaos_loss(step, reduced.loss_sum / f64::from(tokens));
        let (grad_norm, grad_scale) = clip_scale_from_squares(&all, tokens, setup.grad_clip);
        if let Some(out) = crate::rank::skip(loss, grad_norm, limits) {
            return Ok(out);
        }
        // AdamW on the whole model, as one rank runs it (element by element, so the bits
        // are one rank's), then this stage's tensors out of it.
        let (params, opt, snapshot_copy_s) = crate::rank::unshare(&mut view.params, &mut view.opt);
        let (grad, layout, adamw) = (&reduced.grad_sum, &view.whole, &setup.adamw);
        ws.install(|| opt.update_scaled(params, grad, grad_scale, lr, layout, adamw));
        let mine = Arc::make_mut(mine);
        for (m, w) in &view.takes {
            mine[m.clone()].copy_from_slice(&params[w.clone()]);
        }
        Ok(RankOutcome::applied(loss, grad_norm, snapshot_copy_s))
    }

    /// AdamW on this stage's tensors with the reduced gradient `grad` (this stage's
    /// layout) scaled by `grad_scale`.
    fn apply(
        &mut self,
        grad: &[f32],
        grad_scale: f32,
        lr: f32,
        loss: f64,
        grad_norm: f64,
    ) -> RankOutcome {
        let (params, opt, snapshot_copy_s) = crate::rank::unshare(&mut self.params, &mut self.opt);
        let (params, layout, adamw) = (params.as_mut_slice(), &self.layout, &self.setup.adamw);
        self.spare[0].install(|| opt.update_scaled(params, grad, grad_scale, lr, layout, adamw));
        RankOutcome::applied(loss, grad_norm, snapshot_copy_s)
    }

    /// Validation through the stages (pipeline 0): the head stage returns the mean token
    /// loss over `windows` in batches of the micro-batch size, the others `None`.
    pub(crate) fn eval(&mut self, windows: &[u64]) -> Result<Option<f64>, String> {
        if self.view.is_some() {
            let r = self.eval_whole(windows).map(Some);
            if let Err(e) = &r {
                (self.abort)(e);
            }
            return r;
        }
        let mut ws = self
            .spare
            .pop()
            .ok_or_else(|| self.err("no workspace for validation"))?;
        let r = self.eval_with(&mut ws, windows);
        self.spare.push(ws);
        if let Err(e) = &r {
            (self.abort)(e);
        }
        r
    }

    /// Validation of the whole model held by a stage on other members, in this process
    /// (no stage messages): the mean token loss over `windows` in batches of the
    /// micro-batch size.
    fn eval_whole(&mut self, windows: &[u64]) -> Result<f64, String> {
        let mb = (self.setup.batch.micro_batch_size as usize).max(1);
        let model = &self.setup.model;
        let bs = model.block_size;
        let mut batches = Vec::new();
        for chunk in windows.chunks(mb) {
            batches.push((self.tokens(chunk, true), chunk.len()));
        }
        let Some(view) = self.view.as_mut() else {
            return Err(self.err("no whole-model view"));
        };
        let ws = view.eval_ws.get_or_insert_with(|| {
            let all = StageLayers {
                stage: 0,
                blocks: 0..model.n_layer as u32,
                embeddings: true,
                head: true,
            };
            Workspace::for_stage(model, &all, 1)
        });
        let mut sum = 0f64;
        for ((inputs, targets), n) in &batches {
            let loss = ws
                .stage_forward(&view.params, StageInput::Tokens(inputs), targets, *n, false)
                .map_err(|e| format!("eval: {e}"))?;
            sum += f64::from(loss);
        }
        Ok(sum / (windows.len() * bs) as f64)
    }

    fn eval_with(&self, ws: &mut Workspace, windows: &[u64]) -> Result<Option<f64>, String> {
        let mb = (self.setup.batch.micro_batch_size as usize).max(1);
        let (first, head) = (self.layers.embeddings, self.layers.head);
        let mut sum = 0f64;
        for (k, chunk) in windows.chunks(mb).enumerate() {
            let k = k as u64;
            let (inputs, targets) = self.tokens(chunk, true);
            let acts;
            let input = match first {
                true => StageInput::Tokens(&inputs),
                false => {
                    acts = self.recv("activations", EVAL_STEP, k)?;
                    StageInput::Acts(&acts.data)
                }
            };
            let loss = ws
                .stage_forward(&self.params, input, &targets, chunk.len(), false)
                .map_err(|e| self.err(format!("eval: {e}")))?;
            match head {
                true => sum += f64::from(loss),
                false => self.send(
                    "activations",
                    Piece {
                        step: EVAL_STEP,
                        slot: k,
                        data: ws.output().to_vec(),
                    },
                )?,
            }
        }
        Ok(head.then(|| sum / (windows.len() * self.setup.model.block_size) as f64))
    }
}

/// The message and the member of `which` ("activations", "gradient", "embedding") for a
/// stage on the peer plane: whom it is sent to (`sending`) or whom it comes from.
fn peer_route(peer: &PeerLinks, which: &str, sending: bool) -> (StageMessage, Option<usize>) {
    match (which, sending) {
        ("activations", true) => (StageMessage::Activations, peer.next),
        ("activations", false) => (StageMessage::Activations, peer.prev),
        ("gradient", true) => (StageMessage::Gradient, peer.prev),
        ("gradient", false) => (StageMessage::Gradient, peer.next),
        (_, true) => (StageMessage::Embedding, peer.head),
        (_, false) => (StageMessage::Embedding, peer.first),
    }
}

/// Each stage's parameters and optimizer state, cut by name from the whole model's.
fn split_state(
    whole: &ParamLayout,
    stage: &ParamLayout,
    params: &[f32],
    opt: &AdamW,
) -> (Vec<f32>, AdamW) {
    let mut p = vec![0f32; stage.total];
    let mut o = AdamW::new(stage.total);
    o.step = opt.step;
    for e in &stage.entries {
        let w = whole
            .get(&e.name)
            .expect("a stage holds the model's tensors")
            .range();
        p[e.range()].copy_from_slice(&params[w.clone()]);
        o.m[e.range()].copy_from_slice(&opt.m[w.clone()]);
        o.v[e.range()].copy_from_slice(&opt.v[w]);
    }
    (p, o)
}

/// One stage's state, for gathering.
struct StageState {
    layout: ParamLayout,
    head: bool,
    params: Arc<Vec<f32>>,
    opt: Arc<AdamW>,
    /// A stage on other members: the whole model's state it keeps.
    whole: Option<(Arc<Vec<f32>>, Arc<AdamW>)>,
}

/// The whole model's parameters and optimizer state, gathered by name from one
/// pipeline's stages (the token embedding from the head stage).
fn gather_state(whole: &ParamLayout, stages: &[StageState]) -> Snapshot {
    if let Some((params, opt)) = stages.iter().find_map(|s| s.whole.clone()) {
        return Snapshot { params, opt };
    }
    let mut params = vec![0f32; whole.total];
    let mut opt = AdamW::new(whole.total);
    opt.step = stages.first().map_or(0, |s| s.opt.step);
    // The token embedding from the head stage, or from the first stage's copy when the
    // head runs in another process.
    let has_head = stages.iter().any(|s| s.head);
    for s in stages {
        for e in &s.layout.entries {
            if e.name == WTE && !s.head && has_head {
                continue;
            }
            let w = whole
                .get(&e.name)
                .expect("a stage holds the model's tensors")
                .range();
            params[w.clone()].copy_from_slice(&s.params[e.range()]);
            opt.m[w.clone()].copy_from_slice(&s.opt.m[e.range()]);
            opt.v[w].copy_from_slice(&s.opt.v[e.range()]);
        }
    }
    Snapshot {
        params: Arc::new(params),
        opt: Arc::new(opt),
    }
}

struct PipelineSupervisor;

struct PipelineArgs {
    generation: u64,
    setup: TrainSetup,
    plan: PipelinePlan,
    /// The pipelines this process runs (global numbers in `0..D`).
    local_pipelines: Vec<u32>,
    /// Where the pipelines of other processes meet this one's (whole-model slots,
    /// [`crate::stage_slices`]); `None`: every pipeline is here, each stage reduces in
    /// process.
    dp: Option<Arc<dyn Collective>>,
    /// `Some`: this process runs one stage of its one pipeline, the other stages are
    /// other members (and `dp` is unused: the stage reduces in `remote.comm`).
    remote: Option<StageOnPeers>,
    data: Arc<TrainData>,
    params: Vec<f32>,
    opt: AdamW,
}

struct PipelineState {
    generation: u64,
    /// Stage ranks by local pipeline, then local stage.
    ranks: Vec<ActorRef<RankMsg<StageCompute>>>,
    /// Stages of each pipeline in this process.
    stages: usize,
    /// Which stages those are (all of them, or the one of a [`StageOnPeers`]).
    local_stages: Vec<usize>,
    /// Stages of a pipeline.
    total_stages: usize,
    pipelines: usize,
    whole: Arc<ParamLayout>,
    layouts: Arc<Vec<ParamLayout>>,
    model: tenax_model::GptConfig,
    abort: Aborter,
    timeout: Duration,
    /// A stage on other members: it keeps the whole model's state.
    replicated: bool,
}

impl PipelineState {
    /// The ranks of `pipeline`, stage 0 first.
    fn pipeline(&self, pipeline: usize) -> &[ActorRef<RankMsg<StageCompute>>] {
        &self.ranks[pipeline * self.stages..(pipeline + 1) * self.stages]
    }

    /// Every stage's state from the ranks of `pipelines`, a future.
    fn states(
        &self,
        pipelines: Range<usize>,
    ) -> impl std::future::Future<Output = Result<Vec<StageState>, ActorsError>> + Send + 'static
    {
        let calls: Vec<_> = pipelines
            .flat_map(|p| {
                self.pipeline(p)
                    .iter()
                    .enumerate()
                    .map(move |(s, r)| (p, s, r))
            })
            .map(|(p, s, r)| {
                let g = self.local_stages[s];
                let (layout, head) = (self.layouts[g].clone(), g + 1 == self.total_stages);
                on_rank(
                    r,
                    self.timeout,
                    format!("pipeline {p} stage {s}: state"),
                    move |c: &mut StageCompute| {
                        Ok(StageState {
                            layout,
                            head,
                            params: Arc::clone(&c.params),
                            opt: Arc::clone(&c.opt),
                            whole: c
                                .view
                                .as_ref()
                                .map(|v| (Arc::clone(&v.params), Arc::clone(&v.opt))),
                        })
                    },
                )
            })
            .collect();
        async move { join_all(calls).await.into_iter().collect() }
    }
}

/// Run blocking work (gathering a model's state) off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ActorsError> + Send + 'static,
) -> Result<T, ActorsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActorsError::Rank(format!("gathering the stages' state failed: {e}")))?
}

impl Actor for PipelineSupervisor {
    type Msg = SupervisorMsg;
    type State = PipelineState;
    type Arguments = PipelineArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PipelineArgs,
    ) -> Result<PipelineState, ActorProcessingErr> {
        let PipelineArgs {
            generation,
            setup,
            plan,
            local_pipelines,
            dp,
            remote,
            data,
            params,
            opt,
        } = args;
        let cfg = *plan.config();
        // `pipelines`, `per` and `world` count this process's.
        let (stages, pipelines) = (cfg.stages as usize, local_pipelines.len());
        let local_stages: Vec<usize> = match &remote {
            Some(r) => vec![r.stage as usize],
            None => (0..stages).collect(),
        };
        let per = local_stages.len();
        let world = per * pipelines;
        let model = setup.model.clone();
        let whole = ParamLayout::for_config(&model);
        let layouts: Vec<ParamLayout> = plan
            .layers()
            .iter()
            .map(|l| ParamLayout::for_stage(&model, l))
            .collect();
        let num_slots = setup.batch.num_slots();
        // Per local pipeline, per stage.
        let collectives: Vec<Vec<Arc<dyn Collective>>> = match (&remote, dp) {
            (Some(r), _) => vec![vec![Arc::clone(&r.comm) as Arc<dyn Collective>]],
            (None, None) => {
                let per_stage: Vec<Arc<dyn Collective>> = (0..stages)
                    .map(|_| Arc::new(InProcessCollective::new(num_slots)) as Arc<dyn Collective>)
                    .collect();
                vec![per_stage; pipelines]
            }
            (None, Some(dp)) => {
                let asm = Assembler::new(dp, &whole, &layouts, WTE, pipelines)?;
                let asm = Arc::new(asm);
                (0..pipelines)
                    .map(|p| {
                        (0..stages)
                            .map(|s| Arc::new(asm.view(p, s)) as Arc<dyn Collective>)
                            .collect()
                    })
                    .collect()
            }
        };
        let meet = Arc::new(Meet::new(per, world));
        let abort: Aborter = {
            let (collectives, meet) = (collectives.clone(), Arc::clone(&meet));
            Arc::new(move |reason: &str| {
                meet.abort(reason);
                for c in collectives.iter().flatten() {
                    c.abort(reason);
                }
            })
        };
        let sampler = data.sampler(setup.seed, model.block_size)?;
        // Every channel holds a whole step's messages: a training send never waits.
        let capacity = num_slots as usize + 1;
        let links: Vec<Links> = match &remote {
            Some(r) => {
                let (s, m) = (r.stage as usize, &r.pipeline_members);
                let at = |i: usize| m.get(i).copied();
                let multi = stages > 1;
                vec![Links::Peer(PeerLinks {
                    comm: Arc::clone(&r.comm),
                    prev: s.checked_sub(1).and_then(at),
                    next: at(s + 1),
                    first: (multi && s + 1 == stages).then(|| at(0)).flatten(),
                    head: (multi && s == 0).then(|| at(stages - 1)).flatten(),
                })]
            }
            None => {
                let mut links: Vec<Channels> = (0..world).map(|_| Channels::default()).collect();
                for p in 0..pipelines {
                    let at = |s: usize| p * stages + s;
                    for s in 0..stages.saturating_sub(1) {
                        let (tx, rx) = mpsc::sync_channel(capacity);
                        links[at(s)].acts_out = Some(tx);
                        links[at(s + 1)].acts_in = Some(rx);
                        let (tx, rx) = mpsc::sync_channel(capacity);
                        links[at(s + 1)].grads_out = Some(tx);
                        links[at(s)].grads_in = Some(rx);
                    }
                    if stages > 1 {
                        let (tx, rx) = mpsc::sync_channel(capacity);
                        links[at(0)].emb_out = Some(tx);
                        links[at(stages - 1)].emb_in = Some(rx);
                    }
                }
                links.into_iter().map(Links::Local).collect()
            }
        };
        // The process's compute threads, shared evenly by its stage ranks.
        let threads = (tenax_model::step::default_threads() / world.max(1)).max(1);
        let wte_of = |l: &ParamLayout| l.get(WTE).map(|e| e.range());
        let head_wte = wte_of(&layouts[stages - 1]);
        let mut ranks = Vec::with_capacity(world);
        for (i, links) in links.into_iter().enumerate() {
            let (local, s) = (i / per, local_stages[i % per]);
            let rank = local_pipelines[local] as usize * stages + s;
            let pos = plan.position(rank as u32).expect("a rank of the plan");
            let layers = plan.layers()[s].clone();
            let layout = layouts[s].clone();
            let whole_index = layout
                .entries
                .iter()
                .map(|e| match e.name == WTE && !layers.head {
                    true => None,
                    false => whole.index_of(&e.name),
                })
                .collect();
            let tied = match (
                layers.embeddings && !layers.head,
                wte_of(&layout),
                &head_wte,
            ) {
                (true, Some(mine), Some(theirs)) => Some((mine, theirs.clone())),
                _ => None,
            };
            let mine = slots_for_rank(num_slots, cfg.pipelines.into(), pos.pipeline.into());
            let ops = stage_ops(
                cfg.schedule,
                cfg.stages,
                pos.stage,
                (mine.end - mine.start) as u32,
            );
            let spare = (0..peak_in_flight(&ops).max(1))
                .map(|_| Workspace::for_stage(&model, &layers, threads))
                .collect();
            let (p, o) = split_state(&whole, &layout, &params, &opt);
            let view = remote.as_ref().map(|_| {
                let mut takes = Vec::new();
                let mut gives: Vec<Range<usize>> = Vec::new();
                for e in &layout.entries {
                    let w = whole
                        .get(&e.name)
                        .expect("a stage holds the model's tensors");
                    takes.push((e.range(), w.range()));
                    if e.name == WTE && !layers.head {
                        continue;
                    }
                    match gives.last_mut() {
                        Some(last) if last.end == e.offset => last.end = e.range().end,
                        _ => gives.push(e.range()),
                    }
                }
                WholeView {
                    whole: whole.clone(),
                    params: Arc::new(params.clone()),
                    opt: Arc::new(opt.clone()),
                    eval_ws: None,
                    takes,
                    gives,
                }
            });
            let compute = StageCompute {
                rank,
                pos,
                stages: cfg.stages,
                pipelines: cfg.pipelines,
                schedule: cfg.schedule,
                setup: setup.clone(),
                data: Arc::clone(&data),
                tie_ws: Workspace::for_stage(&model, &layers, 1),
                layers,
                whole_index,
                whole_entries: whole.entries.len(),
                tied,
                layout,
                params: Arc::new(p),
                opt: Arc::new(o),
                spare,
                collective: Arc::clone(&collectives[local][i % per]),
                meet: Arc::clone(&meet),
                links,
                view,
                abort: Arc::clone(&abort),
                sampler: sampler.clone(),
            };
            let (r, _) = Actor::spawn_linked(
                None,
                RankActor::<StageCompute>::new(),
                RankArgs { compute },
                myself.get_cell(),
            )
            .await?;
            ranks.push(r);
        }
        Ok(PipelineState {
            generation,
            ranks,
            stages: per,
            local_stages,
            total_stages: stages,
            pipelines,
            whole: Arc::new(whole),
            layouts: Arc::new(layouts),
            model,
            abort,
            timeout: setup.step_timeout,
            replicated: remote.is_some(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut PipelineState,
    ) -> Result<(), ActorProcessingErr> {
        let timeout = st.timeout;
        let SupervisorMsg { generation, ask } = msg;
        if generation != st.generation {
            let stale = ActorsError::Stale {
                what: ask.what().into(),
                trainer: st.generation,
                asked: generation,
            };
            ask.refuse(stale);
            return Ok(());
        }
        // The awaiting happens in a task, so this actor stays free to see supervision events.
        match ask {
            Ask::Step {
                step,
                cursor,
                lr,
                limits,
                reply,
            } => {
                let calls: Vec<_> = st
                    .ranks
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        on_rank(r, timeout, format!("rank {i}: step {step}"), move |c| {
                            c.step(step, cursor, lr, limits)
                        })
                    })
                    .collect();
                let abort = Arc::clone(&st.abort);
                let me = myself.get_cell();
                tokio::spawn(async move {
                    let outcomes: Vec<Result<RankOutcome, ActorsError>> = join_all(calls).await;
                    let r = agree(step, outcomes, &*abort);
                    if matches!(r, Err(ActorsError::Crashed(_))) {
                        let _ = me.wait(Some(Duration::from_secs(5))).await;
                    }
                    let _ = reply.send(r);
                });
            }
            Ask::Snapshot { reply } => {
                let states = st.states(0..1);
                let whole = Arc::clone(&st.whole);
                tokio::spawn(async move {
                    let r = match states.await {
                        Ok(s) => blocking(move || Ok(gather_state(&whole, &s))).await,
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                });
            }
            Ask::Eval { windows, reply } => {
                let windows = Arc::new(windows);
                let calls: Vec<_> = st
                    .pipeline(0)
                    .iter()
                    .enumerate()
                    .map(|(s, r)| {
                        let windows = Arc::clone(&windows);
                        on_rank(r, timeout, format!("stage {s}: eval"), move |c| {
                            c.eval(&windows)
                        })
                    })
                    .collect();
                let abort = Arc::clone(&st.abort);
                tokio::spawn(async move {
                    let mut head = None;
                    let mut r = Ok(());
                    for o in join_all(calls).await {
                        match o {
                            Ok(Some(v)) => head = Some(v),
                            Ok(None) => {}
                            Err(e) => {
                                abort(&e.to_string());
                                r = Err(e);
                            }
                        }
                    }
                    let r = r.and_then(|()| {
                        head.ok_or_else(|| {
                            ActorsError::Rank("eval: the head stage gave no loss".into())
                        })
                    });
                    let _ = reply.send(r);
                });
            }
            Ask::Generate {
                prompt,
                max_new,
                seed,
                reply,
            } => {
                if st.stages != st.total_stages && !st.replicated {
                    let _ = reply.send(Err(ActorsError::Rank(format!(
                        "generate: this process runs stage {:?} of {} only",
                        st.local_stages, st.total_stages
                    ))));
                    return Ok(());
                }
                let states = st.states(0..1);
                let (whole, model) = (Arc::clone(&st.whole), st.model.clone());
                tokio::spawn(async move {
                    let r = match states.await {
                        Ok(s) => {
                            blocking(move || {
                                let snap = gather_state(&whole, &s);
                                let gpt = Gpt::new(model)
                                    .map_err(|e| ActorsError::Rank(format!("generate: {e}")))?;
                                gpt.set_params(&snap.params)
                                    .map_err(|e| ActorsError::Rank(format!("generate: {e}")))?;
                                gpt.generate(&prompt, max_new, 0.8, 40, seed)
                                    .map_err(|e| ActorsError::Rank(format!("generate: {e}")))
                            })
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                });
            }
            Ask::ParamHashes { reply } => {
                let states = st.states(0..st.pipelines);
                let (whole, stages) = (Arc::clone(&st.whole), st.stages);
                tokio::spawn(async move {
                    let r = match states.await {
                        Ok(s) => {
                            blocking(move || {
                                Ok(s.chunks(stages)
                                    .map(|p| param_hash(&gather_state(&whole, p).params))
                                    .collect())
                            })
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut PipelineState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                let reason = format!(
                    "generation {}: stage actor {} failed: {err}",
                    st.generation,
                    who.get_id()
                );
                (st.abort)(&reason);
                return Err(reason.into());
            }
            SupervisionEvent::ActorTerminated(who, _, why) => {
                let reason = format!(
                    "stage actor {} stopped: {}",
                    who.get_id(),
                    why.unwrap_or_default()
                );
                (st.abort)(&reason);
                myself.stop(Some(reason));
            }
            _ => {}
        }
        Ok(())
    }
}

impl Trainer {
    /// Start `setup.ranks` ranks as `setup.ranks / spec.stages` pipelines of
    /// `spec.stages` stages in this process, from one whole-model state (parameters and
    /// optimizer, split among the stages by name). The handle answers like one of
    /// [`Trainer::start`]'s, with the same bits: see the module docs.
    /// [`Trainer::param_hashes`] gives one hash per pipeline (its stages gathered).
    pub async fn start_pipeline(
        mut setup: TrainSetup,
        spec: PipelineSpec,
        data: Arc<TrainData>,
        params: Vec<f32>,
        opt: AdamW,
    ) -> Result<Self, ActorsError> {
        let stages = spec.stages.max(1) as usize;
        let world = setup.ranks;
        let pipelines = world / stages;
        if pipelines == 0 || pipelines * stages != world {
            return Err(ActorsError::Start(format!(
                "{world} rank(s) do not form pipelines of {stages} stages: the rank count must be a multiple of the stage count"
            )));
        }
        setup.ranks = pipelines;
        let group = GroupStart {
            generation: 0,
            setup,
            local_ranks: (0..pipelines).collect(),
            collective: None,
            data,
            params,
            opt,
        };
        Self::start_pipeline_group(group, spec, None).await
    }

    /// Start the pipelines `g.local_ranks` of a data-parallel group of `g.setup.ranks`
    /// pipelines of `spec.stages` stages each, whose other pipelines live in other
    /// processes: all meet in `g.collective` (the whole model's, see
    /// [`crate::stage_slices`]); with `None` every pipeline must be here. Every process
    /// starts from the same whole-model state. With `node`, the trainer is adopted by
    /// the node supervisor as in [`Trainer::start_group`].
    pub async fn start_pipeline_group(
        g: GroupStart,
        spec: PipelineSpec,
        node: Option<&crate::NodeSupervisor>,
    ) -> Result<Self, ActorsError> {
        Self::start_pipelines(g, spec, None, node).await
    }

    /// Start one stage, `on.stage`, of pipeline `g.local_ranks[0]` of a data-parallel
    /// group of `g.setup.ranks` pipelines whose other stages run on other members: the
    /// stage's activations and gradients and its share of every slot's gradient travel
    /// over `on.comm` (built with [`stage_part`] of this stage), whose exact reduction
    /// gives every member the whole reduced gradient; the stage takes its clip factor
    /// from all of it and its tensors out of it, so the bits are those of one rank.
    /// `g.params` and `g.opt` are the whole model's (the stage keeps its tensors).
    ///
    /// Every such stage also keeps the whole model's state: it runs AdamW on every tensor
    /// with the whole reduced gradient (as one rank does, so the bits are one rank's) and
    /// takes its stage's tensors out of it. A snapshot, a parameter hash, validation and
    /// sampling are then the whole model's, the same on every member, so state
    /// comparisons, state copies and checkpoints work as for whole replicas, and a lost
    /// stage's state is on every survivor (an in-memory copy of every stage on every
    /// member, refreshed every step). The cost: the whole model's parameters and AdamW
    /// moments in each member's host memory, and an update of the whole model per step.
    pub async fn start_stage(
        mut g: GroupStart,
        spec: PipelineSpec,
        on: StageOnPeers,
        node: Option<&crate::NodeSupervisor>,
    ) -> Result<Self, ActorsError> {
        let start = |e: String| ActorsError::Start(e);
        let me = on.comm.spec().me;
        if g.local_ranks.len() != 1
            || on.stage >= spec.stages
            || on.pipeline_members.len() != spec.stages as usize
            || on.pipeline_members.get(on.stage as usize) != Some(&me)
        {
            return Err(start(format!(
                "stage {} of pipeline {:?} with members {:?}: a process runs one stage of one pipeline of {} stages, and is that stage's member (index {me})",
                on.stage, g.local_ranks, on.pipeline_members, spec.stages
            )));
        }
        g.collective = Some(Arc::clone(&on.comm) as Arc<dyn Collective>);
        Self::start_pipelines(g, spec, Some(on), node).await
    }

    async fn start_pipelines(
        g: GroupStart,
        spec: PipelineSpec,
        remote: Option<StageOnPeers>,
        node: Option<&crate::NodeSupervisor>,
    ) -> Result<Self, ActorsError> {
        let start = |e: String| ActorsError::Start(e);
        let stages = spec.stages.max(1);
        let pipelines = g.setup.ranks as u32;
        g.setup
            .batch
            .check_ranks(u64::from(pipelines))
            .map_err(|e| start(format!("{pipelines} pipeline(s): {e}")))?;
        let local: Vec<u32> = g.local_ranks.iter().map(|&p| p as u32).collect();
        let all_here = local.len() == pipelines as usize;
        if local.is_empty()
            || local.iter().any(|&p| p >= pipelines)
            || (!all_here && g.collective.is_none())
        {
            return Err(start(format!(
                "local pipelines {local:?} do not fit {pipelines} pipeline(s) (pipelines of other processes need a collective)"
            )));
        }
        let slots = slots_for_rank(g.setup.batch.num_slots(), u64::from(pipelines), 0);
        let plan = PipelinePlan::new(
            PipelineConfig {
                pipelines,
                stages,
                blocks: g.setup.model.n_layer as u32,
                slots: (slots.end - slots.start) as u32,
                schedule: spec.schedule,
            },
            pipelines * stages,
        )
        .map_err(|e| start(e.to_string()))?;
        let whole = ParamLayout::for_config(&g.setup.model);
        let sizes = [g.params.len(), g.opt.m.len(), g.opt.v.len()];
        if sizes.iter().any(|&n| n != whole.total) {
            return Err(start(format!(
                "the initial state has {} parameters, the model {}",
                g.params.len(),
                whole.total
            )));
        }
        let (timeout, generation) = (g.setup.step_timeout, g.generation);
        let per = match remote {
            Some(_) => 1,
            None => stages as usize,
        };
        let stage_ranks = local.len() * per;
        let args = PipelineArgs {
            generation,
            setup: g.setup,
            plan,
            local_pipelines: local,
            dp: g.collective,
            remote,
            data: g.data,
            params: g.params,
            opt: g.opt,
        };
        let (sup, handle) = spawn_trainer(PipelineSupervisor, args, node).await?;
        Ok(Trainer::from_parts(
            sup,
            handle,
            timeout,
            stage_ranks,
            generation,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenax_core::slots::BatchLayout;
    use tenax_model::{AdamWConfig, GptConfig};

    fn setup(model: &GptConfig, ranks: usize) -> TrainSetup {
        TrainSetup {
            model: model.clone(),
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            batch: BatchLayout::new(6, 2).unwrap(),
            seed: 3,
            ranks,
            step_timeout: Duration::from_secs(120),
            device: Default::default(),
        }
    }

    /// A 3-block tiny model, its layout, and 40 windows of its tokens.
    fn three_blocks() -> (GptConfig, ParamLayout, Arc<TrainData>) {
        let mut model = GptConfig::preset("tiny", 17).unwrap();
        model.n_layer = 3;
        let whole = ParamLayout::for_config(&model);
        let tokens: Vec<u32> = (0..(model.block_size as u32 + 1) * 40)
            .map(|i| (i * 7 + i / 5) % 17)
            .collect();
        let data = Arc::new(TrainData::in_memory(tokens.clone(), tokens));
        (model, whole, data)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    async fn run(
        trainer: Trainer,
        steps: u64,
        batch: u64,
        val: &[u64],
    ) -> (Vec<u64>, Snapshot, f64, Vec<String>) {
        let mut losses = Vec::new();
        for step in 0..steps {
            let r = trainer.step(step, step * batch, 3e-3).await.unwrap();
            losses.push(r.loss.to_bits());
        }
        let snap = trainer.snapshot().await.unwrap();
        let eval = trainer.eval(val.to_vec()).await.unwrap();
        let hashes = trainer.param_hashes().await.unwrap();
        trainer.shutdown().await;
        (losses, snap, eval, hashes)
    }

    /// Pipelines of 2 and 3 stages, 1 and 2 of them, both schedules: the same losses,
    /// state, validation loss and hash as one data-parallel rank; another seed differs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelines_match_one_rank_bit_for_bit() {
        let (model, whole, data) = three_blocks();
        let val = [0u64, 3, 5, 7, 9];
        let init = tenax_model::init_params(&model, &whole, 1);
        let one = Trainer::start(
            setup(&model, 1),
            Arc::clone(&data),
            init.clone(),
            AdamW::new(whole.total),
        )
        .await
        .unwrap();
        let (want_losses, want, want_eval, want_hash) = run(one, 3, 6, &val).await;
        for (stages, ranks) in [(2u32, 2usize), (3, 3), (2, 4)] {
            for schedule in Schedule::ALL {
                let spec = PipelineSpec { stages, schedule };
                let t = Trainer::start_pipeline(
                    setup(&model, ranks),
                    spec,
                    Arc::clone(&data),
                    init.clone(),
                    AdamW::new(whole.total),
                )
                .await
                .unwrap();
                let (losses, snap, eval, hashes) = run(t, 3, 6, &val).await;
                let what = format!("S = {stages}, N = {ranks}, {schedule}");
                assert_eq!(losses, want_losses, "{what}: losses");
                assert_eq!(bits(&snap.params), bits(&want.params), "{what}: parameters");
                assert_eq!(bits(&snap.opt.m), bits(&want.opt.m), "{what}: adamw m");
                assert_eq!(bits(&snap.opt.v), bits(&want.opt.v), "{what}: adamw v");
                assert_eq!(snap.opt.step, want.opt.step, "{what}: adamw step");
                assert_eq!(eval.to_bits(), want_eval.to_bits(), "{what}: eval");
                assert_eq!(hashes.len(), ranks / stages as usize);
                assert!(hashes.iter().all(|h| *h == want_hash[0]), "{what}: hashes");
            }
        }
        // The oracle can fail: another initial state gives other bits.
        let t = Trainer::start_pipeline(
            setup(&model, 2),
            PipelineSpec {
                stages: 2,
                schedule: Schedule::OneFOneB,
            },
            Arc::clone(&data),
            tenax_model::init_params(&model, &whole, 2),
            AdamW::new(whole.total),
        )
        .await
        .unwrap();
        let (losses, snap, _, _) = run(t, 3, 6, &val).await;
        assert_ne!(losses, want_losses);
        assert_ne!(bits(&snap.params), bits(&want.params));
    }

    /// Losses (as bits) and final state of one data-parallel rank over 3 steps of 6
    /// samples from `init`: the reference the split runs must equal.
    async fn one_rank_reference(
        model: &GptConfig,
        whole: &ParamLayout,
        data: &Arc<TrainData>,
        init: &[f32],
    ) -> (Vec<u64>, Snapshot) {
        let one = Trainer::start(
            setup(model, 1),
            Arc::clone(data),
            init.to_vec(),
            AdamW::new(whole.total),
        )
        .await
        .unwrap();
        let (losses, snap, _, _) = run(one, 3, 6, &[0]).await;
        (losses, snap)
    }

    /// Two "processes", each running one pipeline of a data-parallel group of 2 and
    /// meeting in one whole-model collective (as daemons meet over the peer plane): the
    /// bits of one rank.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelines_of_separate_processes_meet_in_a_whole_model_collective() {
        let (model, whole, data) = three_blocks();
        let init = tenax_model::init_params(&model, &whole, 1);
        let (want_losses, want) = one_rank_reference(&model, &whole, &data, &init).await;
        for (stages_a, stages_b) in [(2u32, 2u32), (3, 1)] {
            let dp: Arc<dyn Collective> = Arc::new(InProcessCollective::new(3));
            let start = |p: usize, stages: u32| {
                let group = GroupStart {
                    generation: 0,
                    setup: setup(&model, 2),
                    local_ranks: vec![p],
                    collective: Some(Arc::clone(&dp)),
                    data: Arc::clone(&data),
                    params: init.clone(),
                    opt: AdamW::new(whole.total),
                };
                let spec = PipelineSpec {
                    stages,
                    schedule: Schedule::OneFOneB,
                };
                Trainer::start_pipeline_group(group, spec, None)
            };
            let (a, b) = (
                start(0, stages_a).await.unwrap(),
                start(1, stages_b).await.unwrap(),
            );
            let mut losses = Vec::new();
            for step in 0..3 {
                let (ra, rb) =
                    tokio::join!(a.step(step, step * 6, 3e-3), b.step(step, step * 6, 3e-3));
                let (ra, rb) = (ra.unwrap(), rb.unwrap());
                assert_eq!(ra.loss.to_bits(), rb.loss.to_bits());
                // Each stage reports how it spent the step, once.
                let stages: Vec<u32> = ra.stages.iter().map(|t| t.stage).collect();
                assert_eq!(stages, (0..stages_a).collect::<Vec<_>>());
                assert!(ra
                    .stages
                    .iter()
                    .all(|t| t.busy_s > 0.0 && t.busy_s <= t.ops_s));
                losses.push(ra.loss.to_bits());
            }
            let what = format!("S = {stages_a} and {stages_b}");
            assert_eq!(losses, want_losses, "{what}: losses");
            for t in [a, b] {
                let snap = t.snapshot().await.unwrap();
                assert_eq!(bits(&snap.params), bits(&want.params), "{what}: parameters");
                assert_eq!(bits(&snap.opt.v), bits(&want.opt.v), "{what}: adamw v");
                t.shutdown().await;
            }
        }
        // Without a collective, a process cannot run part of the pipelines.
        let group = GroupStart {
            generation: 0,
            setup: setup(&model, 2),
            local_ranks: vec![1],
            collective: None,
            data,
            params: init,
            opt: AdamW::new(whole.total),
        };
        let spec = PipelineSpec {
            stages: 2,
            schedule: Schedule::GPipe,
        };
        let e = Trainer::start_pipeline_group(group, spec, None)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("need a collective"), "{e}");
    }

    /// A peer hub served on 127.0.0.1 (a "member"), stopped when the token is cancelled.
    async fn serve_hub(
        job: &str,
    ) -> (
        tenax_cluster::PeerHub,
        String,
        tokio_util::sync::CancellationToken,
    ) {
        let hub = tenax_cluster::PeerHub::new(job, tenax_cluster::peer::HubConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = tokio_util::sync::CancellationToken::new();
        let (service, token) = (hub.service(), stop.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
        (hub, addr, stop)
    }

    /// The stages of each pipeline on different members (one process per stage, each
    /// with its own peer hub on loopback): D = 2 pipelines x S = 2 stages (1F1B) and
    /// D = 1 x S = 3 (GPipe) give the losses and every tensor of one rank, bit for bit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stages_on_separate_members_match_one_rank_bit_for_bit() {
        use tenax_cluster::peer::{CommSpec, PeerAddr, Reduction};
        let (model, whole, data) = three_blocks();
        let init = tenax_model::init_params(&model, &whole, 1);
        let (want_losses, want) = one_rank_reference(&model, &whole, &data, &init).await;
        for (pipelines, stages, schedule) in
            [(2u32, 2u32, Schedule::OneFOneB), (1, 3, Schedule::GPipe)]
        {
            let what = format!("{pipelines} x {stages} {schedule:?}");
            let n = (pipelines * stages) as usize;
            let mut hubs = Vec::new();
            for _ in 0..n {
                hubs.push(serve_hub("job-s").await);
            }
            let members: Vec<PeerAddr> = hubs
                .iter()
                .enumerate()
                .map(|(i, h)| PeerAddr {
                    id: format!("n{i}"),
                    addr: h.1.clone(),
                })
                .collect();
            let num_slots = setup(&model, 1).batch.num_slots();
            let slots = slots_for_rank(num_slots, u64::from(pipelines), 0);
            let plan = PipelinePlan::new(
                PipelineConfig {
                    pipelines,
                    stages,
                    blocks: 3,
                    slots: (slots.end - slots.start) as u32,
                    schedule,
                },
                pipelines * stages,
            )
            .unwrap();
            let mut trainers = Vec::new();
            for (me, hub) in hubs.iter().enumerate() {
                // Member `p * S + s` runs stage `s` of pipeline `p`.
                let (p, s) = (me as u32 / stages, me as u32 % stages);
                let spec = CommSpec {
                    members: members.clone(),
                    me,
                    stage: Some(stage_part(&model, &plan.layers()[s as usize], 64)),
                    max_frame_floats: 1000,
                    ..CommSpec::for_generation(
                        "job-s",
                        1,
                        vec![p],
                        pipelines,
                        num_slots,
                        whole.total,
                        Reduction::Exact,
                    )
                };
                let comm = tenax_cluster::GrpcCollective::new(&hub.0, spec).unwrap();
                let group = GroupStart {
                    generation: 1,
                    setup: setup(&model, pipelines as usize),
                    local_ranks: vec![p as usize],
                    collective: None,
                    data: Arc::clone(&data),
                    params: init.clone(),
                    opt: AdamW::new(whole.total),
                };
                let on = StageOnPeers {
                    stage: s,
                    comm,
                    pipeline_members: (0..stages).map(|k| (p * stages + k) as usize).collect(),
                };
                let spec = PipelineSpec { stages, schedule };
                trainers.push(Trainer::start_stage(group, spec, on, None).await.unwrap());
            }
            let mut losses = Vec::new();
            for step in 0..3u64 {
                let outs = join_all(trainers.iter().map(|t| t.step(step, step * 6, 3e-3))).await;
                let outs: Vec<_> = outs.into_iter().map(|o| o.unwrap()).collect();
                for o in &outs {
                    assert_eq!(
                        o.loss.to_bits(),
                        outs[0].loss.to_bits(),
                        "{what}: step {step}"
                    );
                }
                losses.push(outs[0].loss.to_bits());
            }
            assert_eq!(losses, want_losses, "{what}: losses");
            // Every member holds the whole model's state, equal to one rank's, and
            // evaluates it as one rank does.
            let want_hash = param_hash(&want.params);
            let mut evals = Vec::new();
            for (me, t) in trainers.iter().enumerate() {
                let snap = t.snapshot().await.unwrap();
                assert_eq!(
                    bits(&snap.params),
                    bits(&want.params),
                    "{what}: member {me}"
                );
                assert_eq!(
                    bits(&snap.opt.m),
                    bits(&want.opt.m),
                    "{what}: member {me} m"
                );
                assert_eq!(
                    bits(&snap.opt.v),
                    bits(&want.opt.v),
                    "{what}: member {me} v"
                );
                assert_eq!(snap.opt.step, want.opt.step, "{what}: member {me} step");
                assert_eq!(t.param_hashes().await.unwrap(), vec![want_hash.clone()]);
                let loss = t.eval(vec![0, 3, 5]).await.unwrap();
                assert!(
                    loss.is_finite() && loss > 0.0,
                    "{what}: member {me} eval {loss}"
                );
                evals.push(loss.to_bits());
            }
            assert!(
                evals.windows(2).all(|w| w[0] == w[1]),
                "{what}: evals {evals:?}"
            );
            for t in trainers {
                t.shutdown().await;
            }
            for h in hubs {
                h.2.cancel();
            }
        }
    }

    /// A bad shape is refused with a reason naming it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_shapes_are_refused() {
        let model = GptConfig::preset("tiny", 17).unwrap();
        let whole = ParamLayout::for_config(&model);
        let data = Arc::new(TrainData::in_memory(vec![1; 400], vec![1; 400]));
        for (stages, ranks, want) in [
            (2u32, 3usize, "multiple of the stage count"),
            (3, 3, "at most 2 stage"),
            (2, 8, "pipeline(s)"),
        ] {
            let r = Trainer::start_pipeline(
                setup(&model, ranks),
                PipelineSpec {
                    stages,
                    schedule: Schedule::GPipe,
                },
                Arc::clone(&data),
                vec![0.0; whole.total],
                AdamW::new(whole.total),
            )
            .await;
            match r {
                Err(ActorsError::Start(e)) => assert!(e.contains(want), "{e}"),
                Err(e) => panic!("S = {stages}, N = {ranks}: {e}"),
                Ok(_) => panic!("S = {stages}, N = {ranks} started"),
            }
        }
    }
}

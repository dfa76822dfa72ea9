//! One data-parallel rank: an actor in front of a compute thread.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tenax_cluster::{Collective, SlotContribution};
use tenax_core::canary::CanaryPlan;
use tenax_core::guard::GuardLimits;
use tenax_core::sampler::Sampler;
use tenax_core::slots::{slots_for_rank, BatchLayout};
use tenax_model::{
    clip_scale, AdamW, AdamWConfig, DeviceTrainer, Gpt, GptConfig, StepDevice, Workspace,
};

/// Training samples read by global sample index, from data that is not one in-memory
/// token stream (a streamed, prepared dataset: `tenax`'s `stream` module). Sample `s`
/// must be a pure function of `s` whatever the rank that asks and whatever was asked
/// before.
pub trait SampleSource: Send + Sync + std::fmt::Debug {
    /// Appends sample `s`'s `block_size` inputs and `block_size` targets (the inputs
    /// shifted by one token). Blocks until the sample's shard is at hand; an error names
    /// the shard and what to do.
    fn sample(
        &self,
        s: u64,
        block_size: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) -> Result<(), String>;
}

/// Token streams shared by every rank (read-only).
#[derive(Debug)]
pub struct TrainData {
    /// Training split (empty when `stream` is set).
    pub train: Vec<u32>,
    /// Validation split.
    pub val: Vec<u32>,
    /// Where training samples come from instead of `train` and the in-memory sampler.
    pub stream: Option<Arc<dyn SampleSource>>,
    /// Canaries planted in the training samples (the memorisation probe; `None`: off, and
    /// every sample is read as before).
    pub canaries: Option<Arc<CanaryPlan>>,
}

impl TrainData {
    /// In-memory train and validation token streams.
    pub fn in_memory(train: Vec<u32>, val: Vec<u32>) -> Self {
        Self {
            train,
            val,
            stream: None,
            canaries: None,
        }
    }

    /// The same data with `plan`'s canaries planted in the training samples.
    pub fn with_canaries(mut self, plan: Option<Arc<CanaryPlan>>) -> Self {
        self.canaries = plan;
        self
    }

    /// Reads training samples `samples` as a rank does (canaries included), for
    /// evaluations outside training: appends their inputs and targets.
    pub fn read_samples(
        &self,
        seed: u64,
        block_size: usize,
        samples: std::ops::Range<u64>,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) -> Result<(), String> {
        let mut sampler = self.sampler(seed, block_size)?;
        self.read_train(&mut sampler, samples, block_size, inputs, targets)
    }

    /// The in-memory sampler over `train` (a placeholder one when streaming).
    pub(crate) fn sampler(&self, seed: u64, block_size: usize) -> Result<Sampler, String> {
        if self.stream.is_some() {
            return Ok(Sampler::new(seed, 1));
        }
        let windows = tenax_data::num_windows(self.train.len(), block_size) as u64;
        if windows == 0 {
            return Err(format!(
                "the training split has {} tokens, fewer than one window of {}",
                self.train.len(),
                block_size + 1
            ));
        }
        Ok(Sampler::new(seed, windows))
    }

    /// Appends the inputs and targets of the training samples `samples`.
    pub(crate) fn read_train(
        &self,
        sampler: &mut Sampler,
        samples: std::ops::Range<u64>,
        block_size: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) -> Result<(), String> {
        if let Some(stream) = &self.stream {
            for s in samples {
                stream.sample(s, block_size, inputs, targets)?;
                self.plant(s, block_size, inputs, targets);
            }
            return Ok(());
        }
        let (mut i, mut t) = (
            Vec::with_capacity(block_size),
            Vec::with_capacity(block_size),
        );
        for s in samples {
            let w = sampler.window(s);
            tenax_data::window(&self.train, block_size, w as usize, &mut i, &mut t);
            inputs.extend_from_slice(&i);
            targets.extend_from_slice(&t);
            self.plant(s, block_size, inputs, targets);
        }
        Ok(())
    }

    /// Overwrites the sample just appended (the last `block_size` inputs and targets) with
    /// its canary, if sample `s` carries one.
    fn plant(&self, s: u64, block_size: usize, inputs: &mut [u32], targets: &mut [u32]) {
        if let Some(plan) = &self.canaries {
            let (i, t) = (inputs.len() - block_size, targets.len() - block_size);
            plan.overlay(s, &mut inputs[i..], &mut targets[t..]);
        }
    }
}

/// Everything that fixes the math of a step; identical on every rank.
#[derive(Clone, Debug)]
pub struct TrainSetup {
    /// Model shape.
    pub model: GptConfig,
    /// Optimizer hyper-parameters (the learning rate comes per step).
    pub adamw: AdamWConfig,
    /// Global-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    /// Global batch and micro-batch (slot) size.
    pub batch: BatchLayout,
    /// Data-order seed.
    pub seed: u64,
    /// Number of data-parallel ranks.
    pub ranks: usize,
    /// Deadline of one step (compute plus collective) and of every actor call.
    pub step_timeout: Duration,
    /// Where each rank's forward, backward and update run (the reduction stays on the
    /// host, exact and slot-ordered, whatever the device).
    pub device: StepDevice,
}

/// How one pipeline stage spent a step's op list (see [`crate::pipeline`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTime {
    /// The stage, in `0..S`.
    pub stage: u32,
    /// Seconds in forward and backward passes.
    pub busy_s: f64,
    /// Seconds from the op list's first op to its last (the busy time and the waits for
    /// activations and gradients: the bubble), before the reduction.
    pub ops_s: f64,
}

impl StageTime {
    /// The share of the op list's time the stage waited: `1 - busy / ops` (0 when the
    /// op list took no time).
    pub fn bubble(&self) -> f64 {
        match self.ops_s > 0.0 {
            true => (1.0 - self.busy_s / self.ops_s).max(0.0),
            false => 0.0,
        }
    }
}

/// What one rank reports for one step. Every rank reports the same values (but for
/// `stage_time`).
#[derive(Clone, Debug, PartialEq)]
pub struct RankOutcome {
    /// Mean token loss of the global batch (slot-ordered sum / tokens).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the loss or gradient was not finite and the update was skipped.
    pub skipped: bool,
    /// True when the training guard flagged the step (its loss or gradient norm above the
    /// step's [`GuardLimits`]) and the update was skipped.
    pub guarded: bool,
    /// Seconds the update spent copying state that a snapshot still shared (0 unless a
    /// checkpoint's background work had not yet read the previous snapshot).
    pub snapshot_copy_s: f64,
    /// On a pipeline stage: how it spent the step.
    pub stage_time: Option<StageTime>,
}

impl RankOutcome {
    /// A step whose update was applied: its loss, gradient norm and the seconds the
    /// update spent unsharing a snapshot's state.
    pub(crate) fn applied(loss: f64, grad_norm: f64, snapshot_copy_s: f64) -> Self {
        Self {
            loss,
            grad_norm,
            skipped: false,
            guarded: false,
            snapshot_copy_s,
            stage_time: None,
        }
    }
}

/// The state a compute thread owns.
pub(crate) struct RankCompute {
    pub(crate) rank: usize,
    pub(crate) setup: TrainSetup,
    pub(crate) data: Arc<TrainData>,
    pub(crate) collective: Arc<dyn Collective>,
    /// The candle model, for sampling only; its parameters are refreshed from `params`
    /// when `model_stale`.
    model: Gpt,
    model_stale: bool,
    /// The fused training step and its buffers.
    ws: Workspace,
    /// With a device ([`TrainSetup::device`]): the model and its AdamW state there; each
    /// slot's gradient comes back to the host for the collective, the reduced sum goes
    /// back for the update, and `params`/`opt` are refreshed from the device after each
    /// update (the host mirror snapshots, checkpoints and state copies read).
    device: Option<DeviceTrainer>,
    /// Parameters and optimizer state, shared copy-on-write with snapshots: taking a
    /// snapshot copies nothing; an update copies a buffer only while a snapshot still
    /// holds it.
    pub(crate) params: Arc<Vec<f32>>,
    pub(crate) opt: Arc<AdamW>,
    sampler: Sampler,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl RankCompute {
    /// Build the rank's model from the shared initial state.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rank: usize,
        local: usize,
        setup: TrainSetup,
        data: Arc<TrainData>,
        collective: Arc<dyn Collective>,
        params: Vec<f32>,
        opt: AdamW,
        threads: usize,
    ) -> Result<Self, String> {
        let model = Gpt::new(setup.model.clone())
            .map_err(|e| format!("rank {rank}: cannot build the model: {e}"))?;
        model
            .set_params(&params)
            .map_err(|e| format!("rank {rank}: cannot load parameters: {e}"))?;
        let sampler = data.sampler(setup.seed, setup.model.block_size)?;
        let ws = Workspace::new(&setup.model, model.layout(), threads);
        let device = match setup
            .device
            .open(local)
            .map_err(|e| format!("rank {rank}: {e}"))?
        {
            None => None,
            Some((device, dtype)) => Some(
                DeviceTrainer::new(setup.model.clone(), &params, &opt, &device, dtype)
                    .map_err(|e| format!("rank {rank}: cannot put the model on {device:?}: {e}"))?,
            ),
        };
        Ok(Self {
            rank,
            setup,
            data,
            collective,
            model,
            model_stale: false,
            ws,
            device,
            params: Arc::new(params),
            opt: Arc::new(opt),
            sampler,
            inputs: Vec::new(),
            targets: Vec::new(),
        })
    }

    /// Fill the input/target buffers with the given windows of `tokens`.
    fn fill(&mut self, windows: &[u64], split_val: bool) {
        let bs = self.setup.model.block_size;
        self.inputs.clear();
        self.targets.clear();
        let tokens = if split_val {
            &self.data.val
        } else {
            &self.data.train
        };
        let (mut i, mut t) = (Vec::with_capacity(bs), Vec::with_capacity(bs));
        for &w in windows {
            tenax_data::window(tokens, bs, w as usize, &mut i, &mut t);
            self.inputs.extend_from_slice(&i);
            self.targets.extend_from_slice(&t);
        }
    }

    /// Compute this rank's slots of `step`, reduce, and apply the update unless the loss
    /// or gradient norm is not finite or exceeds `limits` (the training guard's bounds).
    pub(crate) fn step(
        &mut self,
        step: u64,
        cursor: u64,
        lr: f32,
        limits: Option<GuardLimits>,
    ) -> Result<RankOutcome, String> {
        #[cfg(feature = "chaos-hooks")]
        panic_once_at(step);
        let layout = self.setup.batch;
        let my_slots = slots_for_rank(
            layout.num_slots(),
            self.setup.ranks as u64,
            self.rank as u64,
        );
        for slot in my_slots {
            let samples = layout.slot_samples(cursor, slot);
            let count = (samples.end - samples.start) as usize;
            self.inputs.clear();
            self.targets.clear();
            self.data.read_train(
                &mut self.sampler,
                samples,
                self.setup.model.block_size,
                &mut self.inputs,
                &mut self.targets,
            )?;
            let (loss_sum, grad) = match &mut self.device {
                Some(dev) => dev.slot_grad(&self.inputs, &self.targets, count),
                None => {
                    let mut grad = vec![0f32; self.params.len()];
                    self.ws
                        .loss_sum_and_grad(
                            &self.params,
                            &self.inputs,
                            &self.targets,
                            count,
                            &mut grad,
                        )
                        .map(|loss| (loss, grad))
                }
            }
            .map_err(|e| format!("rank {}: step {step} slot {slot}: {e}", self.rank))?;
            self.collective
                .contribute(
                    step,
                    SlotContribution {
                        slot,
                        loss_sum,
                        grad,
                    },
                )
                .map_err(|e| format!("rank {}: {e}", self.rank))?;
        }
        let reduced = self
            .collective
            .reduced(step, self.setup.step_timeout)
            .map_err(|e| format!("rank {}: {e}", self.rank))?;
        let tokens = (layout.batch_size as usize * self.setup.model.block_size) as f32;
        let loss = chaos_loss(step, reduced.loss_sum / f64::from(tokens));
        // The mean over tokens and the clip are one factor, applied as AdamW reads.
        let (grad, layout, clip) = (&reduced.grad_sum, self.model.layout(), self.setup.grad_clip);
        let (grad_norm, grad_scale) = self.ws.install(|| clip_scale(grad, layout, tokens, clip));
        if let Some(out) = skip(loss, grad_norm, limits) {
            return Ok(out);
        }
        let (params, opt, snapshot_copy_s) = unshare(&mut self.params, &mut self.opt);
        let (opt, params, layout, adamw) = (
            opt,
            params.as_mut_slice(),
            self.model.layout(),
            &self.setup.adamw,
        );
        let grad = &reduced.grad_sum;
        match &mut self.device {
            Some(dev) => dev
                .apply(grad, grad_scale, lr, adamw)
                .and_then(|()| dev.download_into(params, opt))
                .map_err(|e| {
                    format!("rank {}: step {step}: update on the device: {e}", self.rank)
                })?,
            None => self
                .ws
                .install(|| opt.update_scaled(params, grad, grad_scale, lr, layout, adamw)),
        }
        self.model_stale = true;
        Ok(RankOutcome::applied(loss, grad_norm, snapshot_copy_s))
    }

    /// Mean token loss over the given validation windows, in batches of the micro-batch size.
    pub(crate) fn eval(&mut self, windows: &[u64]) -> Result<f64, String> {
        let mb = self.setup.batch.micro_batch_size as usize;
        let mut sum = 0.0f64;
        for chunk in windows.chunks(mb.max(1)) {
            self.fill(chunk, true);
            let loss = match &self.device {
                Some(dev) => dev
                    .loss(&self.inputs, &self.targets, chunk.len())
                    .map(|mean| mean * self.inputs.len() as f64),
                None => self
                    .ws
                    .loss_sum(&self.params, &self.inputs, &self.targets, chunk.len())
                    .map(f64::from),
            };
            sum += loss.map_err(|e| format!("eval: {e}"))?;
        }
        Ok(sum / (windows.len() * self.setup.model.block_size) as f64)
    }

    /// Samples `max_new` tokens after `prompt` (temperature 0.8, top-k 40).
    pub(crate) fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        seed: u64,
    ) -> Result<Vec<u32>, String> {
        if self.model_stale {
            self.model
                .set_params(&self.params)
                .map_err(|e| format!("rank {}: cannot load parameters: {e}", self.rank))?;
            self.model_stale = false;
        }
        self.model
            .generate(prompt, max_new, 0.8, 40, seed)
            .map_err(|e| format!("generate: {e}"))
    }

    /// A hex SHA-256 of the parameter bits.
    pub(crate) fn param_hash(&self) -> String {
        param_hash(&self.params)
    }
}

/// The outcome of a step whose update is not applied, or `None` to apply it: a non-finite
/// loss or gradient norm (`skipped`), else one above the guard's `limits` (`guarded`).
/// Every rank and stage decides from the same reduced values, so all decide the same.
/// Copy-on-write access to a rank's parameters and optimizer state before an update: a
/// snapshot still read elsewhere (a checkpoint's background work) makes this copy what
/// it shares. Also gives the seconds that copy took (0 when nothing was shared), which
/// the step report shows.
pub(crate) fn unshare<'a>(
    params: &'a mut Arc<Vec<f32>>,
    opt: &'a mut Arc<AdamW>,
) -> (&'a mut Vec<f32>, &'a mut AdamW, f64) {
    let t_copy = std::time::Instant::now();
    let shared = Arc::strong_count(params) > 1 || Arc::strong_count(opt) > 1;
    let (opt, params) = (Arc::make_mut(opt), Arc::make_mut(params));
    let copy_s = match shared {
        true => t_copy.elapsed().as_secs_f64(),
        false => 0.0,
    };
    (params, opt, copy_s)
}

pub(crate) fn skip(loss: f64, grad_norm: f64, limits: Option<GuardLimits>) -> Option<RankOutcome> {
    let skipped = !loss.is_finite() || !grad_norm.is_finite();
    let guarded = !skipped && limits.is_some_and(|l| l.exceeded(loss, grad_norm).is_some());
    (skipped || guarded).then_some(RankOutcome {
        loss,
        grad_norm,
        skipped,
        guarded,
        snapshot_copy_s: 0.0,
        stage_time: None,
    })
}

/// Test-only fault hook: with `TENAX_CHAOS_LOSS_SPIKE_AT_STEPS=<step>[,<step>...]`, the
/// reduced mean loss of those steps (numbered from 0, as the trainer's `step` argument:
/// the step that ends at `step + 1`) is multiplied by 10 before the update is decided, on
/// every rank and stage alike, as a batch of garbage would raise it.
#[cfg(feature = "chaos-hooks")]
pub(crate) fn chaos_loss(step: u64, loss: f64) -> f64 {
    let planted = std::env::var("TENAX_CHAOS_LOSS_SPIKE_AT_STEPS").is_ok_and(|v| {
        v.split(',')
            .any(|x| x.trim().parse::<u64>().ok() == Some(step))
    });
    if planted {
        loss * 10.0
    } else {
        loss
    }
}

/// Without the `chaos-hooks` feature: the loss as it is.
#[cfg(not(feature = "chaos-hooks"))]
pub(crate) fn chaos_loss(_step: u64, loss: f64) -> f64 {
    loss
}

/// Hex SHA-256 of parameter bits (little-endian f32 in layout order): what members compare
/// to know they hold the same state.
pub fn param_hash(params: &[f32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in params {
        h.update(p.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// What a compute thread owns: a data-parallel rank ([`RankCompute`]) or a pipeline
/// stage (`crate::pipeline::StageCompute`).
pub(crate) trait Compute: Send + 'static {
    /// The rank's global number.
    fn rank(&self) -> usize;
    /// A handle that makes every peer this rank could leave waiting (its collective, its
    /// pipeline's channels) fail at once.
    fn aborter(&self) -> Aborter;
}

/// Makes a rank's peers stop waiting, with a reason.
pub(crate) type Aborter = Arc<dyn Fn(&str) + Send + Sync>;

impl Compute for RankCompute {
    fn rank(&self) -> usize {
        self.rank
    }

    fn aborter(&self) -> Aborter {
        let c = Arc::clone(&self.collective);
        Arc::new(move |reason: &str| c.abort(reason))
    }
}

/// A job for the compute thread.
pub(crate) type Job<C = RankCompute> = Box<dyn FnOnce(&mut C) + Send>;

/// Messages a rank actor takes.
pub(crate) enum RankMsg<C = RankCompute> {
    /// Run a job on the compute thread; the job sends its own reply.
    Run(Job<C>),
    /// The compute thread died (a job panicked): the actor fails, and its supervisor
    /// learns it at once.
    Died(String),
}

/// The rank actor: it owns the sending half of its compute thread's queue.
pub(crate) struct RankActor<C = RankCompute>(std::marker::PhantomData<fn() -> C>);

impl<C> RankActor<C> {
    /// The actor (its state comes with [`RankArgs`]).
    pub(crate) fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// Arguments of a rank actor: the already-built compute state.
pub(crate) struct RankArgs<C = RankCompute> {
    pub(crate) compute: C,
}

/// State of a rank actor.
pub(crate) struct RankState<C = RankCompute> {
    jobs: mpsc::SyncSender<Job<C>>,
    abort: Aborter,
    rank: usize,
}

impl<C: Compute> Actor for RankActor<C> {
    type Msg = RankMsg<C>;
    type State = RankState<C>;
    type Arguments = RankArgs<C>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RankArgs<C>,
    ) -> Result<RankState<C>, ActorProcessingErr> {
        let rank = args.compute.rank();
        let abort = args.compute.aborter();
        // A bounded queue: the supervisor never has more than a few jobs in flight per rank.
        let (tx, rx) = mpsc::sync_channel::<Job<C>>(4);
        let mut compute = args.compute;
        let abort_peers = Arc::clone(&abort);
        std::thread::Builder::new()
            .name(format!("tenax-rank-{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        job(&mut compute)
                    }));
                    if let Err(panic) = run {
                        // The job's reply is dropped with it; make the peers stop waiting too.
                        let what = panic_text(panic.as_ref());
                        abort_peers(&format!("rank {rank} panicked: {what}"));
                        let _ = myself.send_message(RankMsg::Died(format!(
                            "rank {rank}: its compute thread panicked: {what}"
                        )));
                        break;
                    }
                }
            })
            .map_err(|e| format!("rank {rank}: cannot start its compute thread: {e}"))?;
        Ok(RankState {
            jobs: tx,
            abort,
            rank,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: RankMsg<C>,
        state: &mut RankState<C>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RankMsg::Run(job) => {
                if state.jobs.try_send(job).is_err() {
                    let reason = format!(
                        "rank {}: compute thread is gone or its queue is full",
                        state.rank
                    );
                    (state.abort)(&reason);
                    return Err(reason.into());
                }
            }
            RankMsg::Died(reason) => return Err(reason.into()),
        }
        Ok(())
    }
}

/// The message of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Test-only fault hook: with `TENAX_CHAOS_PANIC_RANK_AT_STEP=<step>`, the first rank of
/// this process to run step `<step>` panics, once per process.
#[cfg(feature = "chaos-hooks")]
pub(crate) fn panic_once_at(step: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    let at = std::env::var("TENAX_CHAOS_PANIC_RANK_AT_STEP")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if at == Some(step) && !DONE.swap(true, Ordering::SeqCst) {
        panic!("chaos: a rank panics at step {step} (TENAX_CHAOS_PANIC_RANK_AT_STEP)");
    }
}

#[cfg(test)]
mod tests {
    use super::StageTime;

    #[test]
    fn the_bubble_is_the_share_of_the_op_list_spent_waiting() {
        let cases = [
            (1.0, 4.0, 0.75),
            (2.0, 2.0, 0.0),
            (0.0, 0.0, 0.0),
            (3.0, 2.0, 0.0),
        ];
        for (busy_s, ops_s, want) in cases {
            let t = StageTime {
                stage: 0,
                busy_s,
                ops_s,
            };
            assert_eq!(t.bubble(), want, "{t:?}");
        }
    }
}

//! The training supervisor over N rank actors, and the [`Trainer`] handle that drives it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tenax_cluster::{Collective, InProcessCollective};
use tenax_core::guard::GuardLimits;
use tenax_model::AdamW;
use tokio::sync::oneshot;

use crate::rank::{
    Compute, RankActor, RankArgs, RankCompute, RankMsg, RankOutcome, StageTime, TrainData,
    TrainSetup,
};

/// Errors of the training actors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActorsError {
    /// A rank or the supervisor could not start.
    #[error("cannot start training: {0}")]
    Start(String),
    /// A step, or a query, failed on some rank.
    #[error("{0}")]
    Rank(String),
    /// No answer within the deadline.
    #[error("{what} timed out after {timeout_s} s")]
    Timeout {
        /// The call that timed out.
        what: String,
        /// The deadline.
        timeout_s: u64,
    },
    /// The supervisor is gone (a rank failed earlier).
    #[error("the training supervisor has stopped: {0}")]
    Stopped(String),
    /// A rank's compute thread died (it panicked): this trainer cannot go on.
    #[error("{0}")]
    Crashed(String),
    /// A request for another generation than the trainer's.
    #[error(
        "{what}: this trainer belongs to generation {trainer}, the request to generation {asked}"
    )]
    Stale {
        /// The request.
        what: String,
        /// The trainer's generation.
        trainer: u64,
        /// The request's.
        asked: u64,
    },
}

impl ActorsError {
    /// Whether the trainer itself is gone (a rank died or the supervisor stopped), as
    /// opposed to a step that failed because of its peers or a deadline.
    pub fn trainer_is_gone(&self) -> bool {
        matches!(self, ActorsError::Crashed(_) | ActorsError::Stopped(_))
    }
}

/// One finished step, as seen by the supervisor.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Mean token loss of the step's global batch.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped because the loss or gradient was not finite.
    pub skipped: bool,
    /// The update was skipped because the training guard flagged the step.
    pub guarded: bool,
    /// Seconds the slowest rank's update spent copying state a [`Snapshot`] still shared.
    pub snapshot_copy_s: f64,
    /// Pipelines: how each stage spent the step (of the first local pipeline), by stage;
    /// empty without stages.
    pub stages: Vec<StageTime>,
}

/// The training state as of a step boundary, in host memory.
///
/// It shares rank 0's buffers copy-on-write: taking it copies nothing, and the rank copies
/// a buffer only if it updates it while a snapshot still holds it (the cost then shows as
/// [`StepReport::snapshot_copy_s`]). Drop it as soon as its contents are read.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Parameters, flat in layout order.
    pub params: Arc<Vec<f32>>,
    /// Optimizer state.
    pub opt: Arc<AdamW>,
}

pub(crate) type Reply<T> = RpcReplyPort<Result<T, ActorsError>>;

/// Messages of the supervisor. Each carries the generation it was sent for: the
/// supervisor refuses one of another generation ([`ActorsError::Stale`]).
pub(crate) struct SupervisorMsg {
    pub(crate) generation: u64,
    pub(crate) ask: Ask,
}

/// What a [`SupervisorMsg`] asks.
pub(crate) enum Ask {
    /// Run one step on every rank.
    Step {
        step: u64,
        cursor: u64,
        lr: f32,
        /// The training guard's bounds: a step above them is not applied.
        limits: Option<GuardLimits>,
        reply: Reply<StepReport>,
    },
    /// Copy rank 0's state.
    Snapshot { reply: Reply<Snapshot> },
    /// Mean validation loss over these windows (rank 0).
    Eval {
        windows: Vec<u64>,
        reply: Reply<f64>,
    },
    /// Sample text (rank 0).
    Generate {
        prompt: Vec<u32>,
        max_new: usize,
        seed: u64,
        reply: Reply<Vec<u32>>,
    },
    /// Every rank's parameter hash, in rank order.
    ParamHashes { reply: Reply<Vec<String>> },
}

impl Ask {
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Ask::Step { .. } => "step",
            Ask::Snapshot { .. } => "snapshot",
            Ask::Eval { .. } => "eval",
            Ask::Generate { .. } => "generate",
            Ask::ParamHashes { .. } => "param hashes",
        }
    }

    /// Answer with `e` instead of doing it.
    pub(crate) fn refuse(self, e: ActorsError) {
        let _ = match self {
            Ask::Step { reply, .. } => reply.send(Err(e)).is_ok(),
            Ask::Snapshot { reply } => reply.send(Err(e)).is_ok(),
            Ask::Eval { reply, .. } => reply.send(Err(e)).is_ok(),
            Ask::Generate { reply, .. } => reply.send(Err(e)).is_ok(),
            Ask::ParamHashes { reply } => reply.send(Err(e)).is_ok(),
        };
    }
}

struct TrainSupervisor;

struct SupervisorArgs {
    generation: u64,
    setup: TrainSetup,
    /// The global ranks this process hosts (`0..setup.ranks` for `tenax train`).
    local_ranks: Vec<usize>,
    /// The collective to use; `None` builds an in-process one.
    collective: Option<Arc<dyn Collective>>,
    data: Arc<TrainData>,
    params: Vec<f32>,
    opt: AdamW,
}

struct SupervisorState {
    generation: u64,
    ranks: Vec<ActorRef<RankMsg>>,
    collective: Arc<dyn Collective>,
    timeout: Duration,
}

/// Run `f` on a rank's compute thread and await its answer.
pub(crate) fn on_rank<C: Compute, T: Send + 'static>(
    rank: &ActorRef<RankMsg<C>>,
    timeout: Duration,
    what: String,
    f: impl FnOnce(&mut C) -> Result<T, String> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, ActorsError>> + Send + 'static {
    // The job is sent now; only the waiting is deferred to the returned future.
    let (tx, rx) = oneshot::channel();
    let sent = rank
        .send_message(RankMsg::Run(Box::new(move |c| {
            let _ = tx.send(f(c));
        })))
        .map_err(|e| ActorsError::Stopped(format!("{what}: {e}")));
    async move {
        sent?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(ActorsError::Timeout {
                what,
                timeout_s: timeout.as_secs(),
            }),
            Ok(Err(_)) => Err(ActorsError::Crashed(format!(
                "{what}: the rank's compute thread died"
            ))),
            Ok(Ok(r)) => r.map_err(ActorsError::Rank),
        }
    }
}

impl Actor for TrainSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let collective: Arc<dyn Collective> = match args.collective {
            Some(c) => c,
            None => Arc::new(InProcessCollective::new(args.setup.batch.num_slots())),
        };
        let mut ranks = Vec::with_capacity(args.local_ranks.len());
        // The process's compute threads, shared evenly by its ranks.
        let threads = (tenax_model::step::default_threads() / args.local_ranks.len().max(1)).max(1);
        for (local, &rank) in args.local_ranks.iter().enumerate() {
            let compute = RankCompute::new(
                rank,
                local,
                args.setup.clone(),
                Arc::clone(&args.data),
                Arc::clone(&collective),
                args.params.clone(),
                args.opt.clone(),
                threads,
            )?;
            let (r, _) = Actor::spawn_linked(
                None,
                RankActor::new(),
                RankArgs { compute },
                myself.get_cell(),
            )
            .await?;
            ranks.push(r);
        }
        Ok(SupervisorState {
            generation: args.generation,
            ranks,
            collective,
            timeout: args.setup.step_timeout,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
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
                let collective = Arc::clone(&st.collective);
                let me = myself.get_cell();
                tokio::spawn(async move {
                    let outcomes: Vec<Result<RankOutcome, ActorsError>> = join_all(calls).await;
                    let r = agree(step, outcomes, &|reason| collective.abort(reason));
                    if matches!(r, Err(ActorsError::Crashed(_))) {
                        // A rank died: this supervisor fails with it. Answer once it has,
                        // so that its own supervisor has seen the failure before the
                        // caller reacts (stopping it would hide the failure).
                        let _ = me.wait(Some(Duration::from_secs(5))).await;
                    }
                    let _ = reply.send(r);
                });
            }
            Ask::Snapshot { reply } => {
                let call = on_rank(&st.ranks[0], timeout, "snapshot".into(), |c| {
                    Ok(Snapshot {
                        params: Arc::clone(&c.params),
                        opt: Arc::clone(&c.opt),
                    })
                });
                tokio::spawn(async move {
                    let _ = reply.send(call.await);
                });
            }
            Ask::Eval { windows, reply } => {
                let call = on_rank(&st.ranks[0], timeout, "eval".into(), move |c| {
                    c.eval(&windows)
                });
                tokio::spawn(async move {
                    let _ = reply.send(call.await);
                });
            }
            Ask::Generate {
                prompt,
                max_new,
                seed,
                reply,
            } => {
                let call = on_rank(&st.ranks[0], timeout, "generate".into(), move |c| {
                    c.generate(&prompt, max_new, seed)
                });
                tokio::spawn(async move {
                    let _ = reply.send(call.await);
                });
            }
            Ask::ParamHashes { reply } => {
                let calls: Vec<_> = st
                    .ranks
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        on_rank(
                            r,
                            timeout,
                            format!("rank {i}: hash"),
                            |c| Ok(c.param_hash()),
                        )
                    })
                    .collect();
                tokio::spawn(async move {
                    let r: Result<Vec<String>, ActorsError> =
                        join_all(calls).await.into_iter().collect();
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
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                // The trainer fails with its rank: whoever supervises it (the node) sees it.
                let reason = format!(
                    "generation {}: rank actor {} failed: {err}",
                    st.generation,
                    who.get_id()
                );
                st.collective.abort(&reason);
                return Err(reason.into());
            }
            SupervisionEvent::ActorTerminated(who, _, why) => {
                let reason = format!(
                    "rank actor {} stopped: {}",
                    who.get_id(),
                    why.unwrap_or_default()
                );
                st.collective.abort(&reason);
                myself.stop(Some(reason));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Every rank must report the same outcome: they reduced the same gradients. `abort`
/// makes the ranks still waiting stop.
pub(crate) fn agree(
    step: u64,
    mut outcomes: Vec<Result<RankOutcome, ActorsError>>,
    abort: &dyn Fn(&str),
) -> Result<StepReport, ActorsError> {
    // A rank that died explains its peers' aborted collectives: report it first.
    if let Some(k) = outcomes
        .iter()
        .position(|o| matches!(o, Err(e) if e.trainer_is_gone()))
    {
        if let Err(e) = outcomes.swap_remove(k) {
            abort(&e.to_string());
            return Err(e);
        }
    }
    let mut first: Option<RankOutcome> = None;
    let mut snapshot_copy_s = 0f64;
    let mut stages: Vec<StageTime> = Vec::new();
    for (rank, o) in outcomes.into_iter().enumerate() {
        if let Ok(o) = &o {
            snapshot_copy_s = snapshot_copy_s.max(o.snapshot_copy_s);
            let new_stage = |t: &StageTime| stages.iter().all(|s| s.stage != t.stage);
            if let Some(t) = o.stage_time.filter(new_stage) {
                stages.push(t);
            }
        }
        match o {
            Err(e) => {
                abort(&e.to_string());
                return Err(e);
            }
            Ok(o) => match &first {
                None => first = Some(o),
                Some(f)
                    if f.loss.to_bits() == o.loss.to_bits()
                        && f.skipped == o.skipped
                        && f.guarded == o.guarded => {}
                Some(f) => {
                    let msg =
                        format!("step {step}: rank {rank} disagrees with rank 0 ({o:?} vs {f:?})");
                    abort(&msg);
                    return Err(ActorsError::Rank(msg));
                }
            },
        }
    }
    let o = first.ok_or_else(|| ActorsError::Rank(format!("step {step}: no rank answered")))?;
    Ok(StepReport {
        loss: o.loss,
        grad_norm: o.grad_norm,
        skipped: o.skipped,
        guarded: o.guarded,
        snapshot_copy_s,
        stages,
    })
}

/// How to start the trainer of one process's ranks in a group.
pub struct GroupStart {
    /// The generation the trainer belongs to: every request names it.
    pub generation: u64,
    /// The training setup (`setup.ranks` is the group's world size).
    pub setup: TrainSetup,
    /// The global ranks this process hosts.
    pub local_ranks: Vec<usize>,
    /// Where the ranks meet; `None` builds an in-process one.
    pub collective: Option<Arc<dyn Collective>>,
    /// The training data.
    pub data: Arc<TrainData>,
    /// Initial parameters, flat in layout order.
    pub params: Vec<f32>,
    /// Initial optimizer state.
    pub opt: AdamW,
}

/// The restart policy of a node's trainers: a trainer is never restarted in place (the
/// node rejoins and copies state), but more than 3 trainer failures within 10 minutes make
/// the node give up.
pub const TRAINER_POLICY: tenax_core::restart::RestartPolicy = tenax_core::restart::RestartPolicy {
    max_restarts: 3,
    window_ms: 600_000,
};

/// Spawn a trainer's supervisor: a root without `node`, else a child the node supervisor
/// adopts under the name `trainer` with [`TRAINER_POLICY`].
pub(crate) async fn spawn_trainer<A>(
    actor: A,
    args: A::Arguments,
    node: Option<&crate::NodeSupervisor>,
) -> Result<(ActorRef<SupervisorMsg>, Option<tokio::task::JoinHandle<()>>), ActorsError>
where
    A: Actor<Msg = SupervisorMsg>,
{
    let Some(node) = node else {
        let (sup, handle) = Actor::spawn(None, actor, args)
            .await
            .map_err(|e| ActorsError::Start(e.to_string()))?;
        return Ok((sup, Some(handle)));
    };
    let sup = node
        .adopt_actor("trainer", TRAINER_POLICY, actor, args)
        .await?;
    Ok((sup, None))
}

/// The handle the CLI drives: a running supervisor and its ranks.
pub struct Trainer {
    sup: ActorRef<SupervisorMsg>,
    /// Set when the trainer is a root (no node supervisor adopted it).
    handle: Option<tokio::task::JoinHandle<()>>,
    timeout: Duration,
    local_ranks: usize,
    generation: u64,
}

impl Trainer {
    /// Start `setup.ranks` ranks from one initial state (parameters and optimizer).
    pub async fn start(
        setup: TrainSetup,
        data: Arc<TrainData>,
        params: Vec<f32>,
        opt: AdamW,
    ) -> Result<Self, ActorsError> {
        let local_ranks = (0..setup.ranks).collect();
        let group = GroupStart {
            generation: 0,
            setup,
            local_ranks,
            collective: None,
            data,
            params,
            opt,
        };
        Self::start_group(group, None).await
    }

    /// Start the ranks `g.local_ranks` (global rank numbers in `0..g.setup.ranks`) of a
    /// group whose other ranks live in other processes, all meeting in `g.collective`.
    /// Every process of the group starts from the same state. With `node`, the trainer is
    /// a child of the node supervisor (adopted under the name `trainer` with
    /// [`TRAINER_POLICY`]); without, a root.
    pub async fn start_group(
        g: GroupStart,
        node: Option<&crate::NodeSupervisor>,
    ) -> Result<Self, ActorsError> {
        let setup = &g.setup;
        setup
            .batch
            .check_ranks(setup.ranks as u64)
            .map_err(|e| ActorsError::Start(e.to_string()))?;
        if g.local_ranks.is_empty() || g.local_ranks.iter().any(|&r| r >= setup.ranks) {
            return Err(ActorsError::Start(format!(
                "local ranks {:?} do not fit a world of {} ranks",
                g.local_ranks, setup.ranks
            )));
        }
        let timeout = setup.step_timeout;
        let local_count = g.local_ranks.len();
        let generation = g.generation;
        let args = SupervisorArgs {
            generation,
            setup: g.setup,
            local_ranks: g.local_ranks,
            collective: g.collective,
            data: g.data,
            params: g.params,
            opt: g.opt,
        };
        let (sup, handle) = spawn_trainer(TrainSupervisor, args, node).await?;
        Ok(Self {
            sup,
            handle,
            timeout,
            local_ranks: local_count,
            generation,
        })
    }

    /// A handle on a started supervisor (of ranks or of pipeline stages).
    pub(crate) fn from_parts(
        sup: ActorRef<SupervisorMsg>,
        handle: Option<tokio::task::JoinHandle<()>>,
        timeout: Duration,
        local_ranks: usize,
        generation: u64,
    ) -> Self {
        Self {
            sup,
            handle,
            timeout,
            local_ranks,
            generation,
        }
    }

    /// The generation this trainer belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many ranks this process hosts.
    pub fn local_ranks(&self) -> usize {
        self.local_ranks
    }

    async fn ask<T: Send + 'static>(
        &self,
        what: &str,
        generation: u64,
        build: impl FnOnce(Reply<T>) -> Ask,
    ) -> Result<T, ActorsError> {
        // The supervisor's own deadline is the rank timeout; give the call a little more.
        let deadline = self.timeout + Duration::from_secs(5);
        let msg = |reply| SupervisorMsg {
            generation,
            ask: build(reply),
        };
        match self.sup.call(msg, Some(deadline)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(ractor::rpc::CallResult::Timeout) => Err(ActorsError::Timeout {
                what: what.into(),
                timeout_s: deadline.as_secs(),
            }),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err(ActorsError::Stopped(format!("{what}: no reply")))
            }
            Err(e) => Err(ActorsError::Stopped(format!("{what}: {e}"))),
        }
    }

    /// Run `step`, whose global batch starts at sample `cursor`, at learning rate `lr`.
    pub async fn step(&self, step: u64, cursor: u64, lr: f32) -> Result<StepReport, ActorsError> {
        self.step_of(self.generation, step, cursor, lr).await
    }

    /// [`Trainer::step`] for `generation`: refused ([`ActorsError::Stale`]) when the trainer
    /// belongs to another.
    pub async fn step_of(
        &self,
        generation: u64,
        step: u64,
        cursor: u64,
        lr: f32,
    ) -> Result<StepReport, ActorsError> {
        self.step_guarded(generation, step, cursor, lr, None).await
    }

    /// [`Trainer::step_of`] with the training guard's bounds: every rank skips the update
    /// when the reduced loss or gradient norm exceeds them ([`StepReport::guarded`]).
    pub async fn step_guarded(
        &self,
        generation: u64,
        step: u64,
        cursor: u64,
        lr: f32,
        limits: Option<GuardLimits>,
    ) -> Result<StepReport, ActorsError> {
        self.ask("step", generation, |reply| Ask::Step {
            step,
            cursor,
            lr,
            limits,
            reply,
        })
        .await
    }

    /// Copy the training state (parameters and optimizer) out of rank 0.
    pub async fn snapshot(&self) -> Result<Snapshot, ActorsError> {
        self.ask("snapshot", self.generation, |reply| Ask::Snapshot { reply })
            .await
    }

    /// Mean token loss over the given validation windows.
    pub async fn eval(&self, windows: Vec<u64>) -> Result<f64, ActorsError> {
        self.ask("eval", self.generation, |reply| Ask::Eval {
            windows,
            reply,
        })
        .await
    }

    /// Sample `max_new` tokens after `prompt`.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        max_new: usize,
        seed: u64,
    ) -> Result<Vec<u32>, ActorsError> {
        self.ask("generate", self.generation, |reply| Ask::Generate {
            prompt,
            max_new,
            seed,
            reply,
        })
        .await
    }

    /// Every rank's parameter hash, in rank order (they must all be equal).
    pub async fn param_hashes(&self) -> Result<Vec<String>, ActorsError> {
        self.ask("param hashes", self.generation, |reply| Ask::ParamHashes {
            reply,
        })
        .await
    }

    /// Ask the supervisor and its ranks to stop, without waiting (for a handle still
    /// shared when its owner is done with it).
    pub fn stop(&self) {
        self.sup.stop(None);
    }

    /// Let go of a shared handle: the last holder stops the trainer and waits for it
    /// ([`Trainer::shutdown`]); while others still hold it, ask it to stop
    /// ([`Trainer::stop`]) without waiting.
    pub async fn release(this: Arc<Self>) {
        match Arc::try_unwrap(this) {
            Ok(t) => t.shutdown().await,
            Err(shared) => shared.stop(),
        }
    }

    /// Stop the supervisor and its ranks (waits at most 10 s for them to end).
    pub async fn shutdown(self) {
        let wait = Duration::from_secs(10);
        let _ = self.sup.stop_and_wait(None, Some(wait)).await;
        if let Some(h) = self.handle {
            let _ = tokio::time::timeout(wait, h).await;
        }
    }
}

#[cfg(test)]
/// The supervisor tests' job: `model` on 2 ranks, batch 4 in slots of 2, and 64 windows
/// of a repeating token pattern (for training and validation).
fn two_rank_setup(model: &tenax_model::GptConfig) -> (TrainSetup, Vec<u32>) {
    let tokens: Vec<u32> = (0..(model.block_size as u32 + 1) * 64)
        .map(|i| (i * 7) % 64)
        .collect();
    let setup = TrainSetup {
        model: model.clone(),
        adamw: tenax_model::AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        grad_clip: 1.0,
        batch: tenax_core::slots::BatchLayout::new(4, 2).unwrap(),
        seed: 1,
        ranks: 2,
        step_timeout: Duration::from_secs(120),
        device: Default::default(),
    };
    (setup, tokens)
}

#[cfg(all(test, feature = "chaos-hooks"))]
mod tests {
    use super::*;
    use tenax_model::{GptConfig, ParamLayout};

    /// A rank that panics fails its trainer, and the node supervisor that adopted the
    /// trainer counts the failure (it does not restart it: the node rejoins).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_rank_fails_its_trainer_and_the_node_counts_it() {
        std::env::set_var("TENAX_CHAOS_PANIC_RANK_AT_STEP", "0");
        let model = GptConfig::preset("nano", 64).unwrap();
        let layout = ParamLayout::for_config(&model);
        let (setup, tokens) = two_rank_setup(&model);
        let node = crate::NodeSupervisor::start(Vec::new()).await.unwrap();
        let group = GroupStart {
            generation: 7,
            setup,
            local_ranks: vec![0, 1],
            collective: None,
            data: Arc::new(TrainData::in_memory(tokens.clone(), tokens)),
            params: tenax_model::init_params(&model, &layout, 1),
            opt: AdamW::new(layout.total),
        };
        let trainer = Trainer::start_group(group, Some(&node)).await.unwrap();
        let stale = trainer.step_of(6, 0, 0, 1e-3).await;
        assert!(
            matches!(
                stale,
                Err(ActorsError::Stale {
                    trainer: 7,
                    asked: 6,
                    ..
                })
            ),
            "{stale:?}"
        );
        let crashed = trainer.step(0, 0, 1e-3).await;
        assert!(
            matches!(&crashed, Err(e) if e.trainer_is_gone()),
            "{crashed:?}"
        );
        // The answer comes once the trainer has failed; the node counts it in order.
        let mut failures = node.failures.clone();
        tokio::time::timeout(
            Duration::from_secs(60),
            failures.wait_for(|f| f.get("trainer") == Some(&1)),
        )
        .await
        .expect("the node counts the trainer's failure")
        .unwrap();
        trainer.stop();
        assert_eq!(node.failures_of("trainer"), 1);
        assert_eq!(node.restarts(), 0);
        node.shutdown().await;
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use tenax_model::{GptConfig, ParamLayout};

    /// Every rank skips a step whose reduced loss or gradient norm is above the guard's
    /// bounds (the parameters stay as they were, the report says `guarded`), and applies
    /// one within them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_above_the_guard_limits_is_skipped_on_every_rank() {
        let model = GptConfig::preset("tiny", 64).unwrap();
        let layout = ParamLayout::for_config(&model);
        let (setup, tokens) = two_rank_setup(&model);
        let trainer = Trainer::start(
            setup,
            Arc::new(TrainData::in_memory(tokens.clone(), tokens)),
            tenax_model::init_params(&model, &layout, 1),
            AdamW::new(layout.total),
        )
        .await
        .unwrap();
        let generation = trainer.generation();
        let before = trainer.param_hashes().await.unwrap();
        let cases = [
            (0.0, f64::INFINITY, "loss above its bound"),
            (f64::INFINITY, 0.0, "gradient norm above its bound"),
        ];
        // Steps are numbered on (the collective reduces each step once); the batch is
        // the same.
        for (step, (max_loss, max_grad_norm, what)) in cases.into_iter().enumerate() {
            let limits = GuardLimits {
                max_loss,
                max_grad_norm,
            };
            let r = trainer
                .step_guarded(generation, step as u64, 0, 1e-3, Some(limits))
                .await
                .unwrap();
            assert!(r.guarded && !r.skipped, "{what}: {r:?}");
            assert_eq!(trainer.param_hashes().await.unwrap(), before, "{what}");
        }
        let loose = GuardLimits {
            max_loss: f64::MAX,
            max_grad_norm: f64::MAX,
        };
        let r = trainer
            .step_guarded(generation, 2, 0, 1e-3, Some(loose))
            .await
            .unwrap();
        assert!(!r.guarded && !r.skipped, "{r:?}");
        let after = trainer.param_hashes().await.unwrap();
        assert_ne!(after, before);
        assert_eq!(after[0], after[1], "the ranks stay identical");
        trainer.shutdown().await;
    }
}

//! The training supervisor over N rank actors, and the [`Trainer`] handle that drives it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tenax_cluster::{Collective, InProcessCollective};
use tenax_model::AdamW;
use tokio::sync::oneshot;

use crate::rank::{RankActor, RankArgs, RankCompute, RankMsg, RankOutcome, TrainData, TrainSetup};

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
    /// Seconds the slowest rank's update spent copying state a [`Snapshot`] still shared.
    pub snapshot_copy_s: f64,
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

type Reply<T> = RpcReplyPort<Result<T, ActorsError>>;

/// Messages of the supervisor.
pub(crate) enum SupervisorMsg {
    /// Run one step on every rank.
    Step {
        step: u64,
        cursor: u64,
        lr: f32,
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

struct TrainSupervisor;

struct SupervisorArgs {
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
    ranks: Vec<ActorRef<RankMsg>>,
    collective: Arc<dyn Collective>,
    timeout: Duration,
}

/// Run `f` on a rank's compute thread and await its answer.
fn on_rank<T: Send + 'static>(
    rank: &ActorRef<RankMsg>,
    timeout: Duration,
    what: String,
    f: impl FnOnce(&mut RankCompute) -> Result<T, String> + Send + 'static,
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
        for &rank in &args.local_ranks {
            let compute = RankCompute::new(
                rank,
                args.setup.clone(),
                Arc::clone(&args.data),
                Arc::clone(&collective),
                args.params.clone(),
                args.opt.clone(),
                threads,
            )?;
            let (r, _) =
                Actor::spawn_linked(None, RankActor, RankArgs { compute }, myself.get_cell())
                    .await?;
            ranks.push(r);
        }
        Ok(SupervisorState {
            ranks,
            collective,
            timeout: args.setup.step_timeout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let timeout = st.timeout;
        // The awaiting happens in a task, so this actor stays free to see supervision events.
        match msg {
            SupervisorMsg::Step {
                step,
                cursor,
                lr,
                reply,
            } => {
                let calls: Vec<_> = st
                    .ranks
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        on_rank(r, timeout, format!("rank {i}: step {step}"), move |c| {
                            c.step(step, cursor, lr)
                        })
                    })
                    .collect();
                let collective = Arc::clone(&st.collective);
                tokio::spawn(async move {
                    let outcomes: Vec<Result<RankOutcome, ActorsError>> = join_all(calls).await;
                    let _ = reply.send(agree(step, outcomes, &*collective));
                });
            }
            SupervisorMsg::Snapshot { reply } => {
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
            SupervisorMsg::Eval { windows, reply } => {
                let call = on_rank(&st.ranks[0], timeout, "eval".into(), move |c| {
                    c.eval(&windows)
                });
                tokio::spawn(async move {
                    let _ = reply.send(call.await);
                });
            }
            SupervisorMsg::Generate {
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
            SupervisorMsg::ParamHashes { reply } => {
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
                let reason = format!("rank actor {} failed: {err}", who.get_id());
                st.collective.abort(&reason);
                myself.stop(Some(reason));
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

/// Every rank must report the same outcome: they reduced the same gradients.
fn agree(
    step: u64,
    outcomes: Vec<Result<RankOutcome, ActorsError>>,
    collective: &dyn Collective,
) -> Result<StepReport, ActorsError> {
    let mut first: Option<RankOutcome> = None;
    let mut snapshot_copy_s = 0f64;
    for (rank, o) in outcomes.into_iter().enumerate() {
        if let Ok(o) = &o {
            snapshot_copy_s = snapshot_copy_s.max(o.snapshot_copy_s);
        }
        match o {
            Err(e) => {
                collective.abort(&e.to_string());
                return Err(e);
            }
            Ok(o) => match &first {
                None => first = Some(o),
                Some(f) if f.loss.to_bits() == o.loss.to_bits() && f.skipped == o.skipped => {}
                Some(f) => {
                    let msg =
                        format!("step {step}: rank {rank} disagrees with rank 0 ({o:?} vs {f:?})");
                    collective.abort(&msg);
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
        snapshot_copy_s,
    })
}

/// The handle the CLI drives: a running supervisor and its ranks.
pub struct Trainer {
    sup: ActorRef<SupervisorMsg>,
    handle: tokio::task::JoinHandle<()>,
    timeout: Duration,
    local_ranks: usize,
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
        Self::start_group(setup, local_ranks, None, data, params, opt).await
    }

    /// Start the ranks `local_ranks` (global rank numbers in `0..setup.ranks`) of a group
    /// whose other ranks live in other processes, all meeting in `collective` (`None`: an
    /// in-process one). Every process of the group starts from the same state.
    pub async fn start_group(
        setup: TrainSetup,
        local_ranks: Vec<usize>,
        collective: Option<Arc<dyn Collective>>,
        data: Arc<TrainData>,
        params: Vec<f32>,
        opt: AdamW,
    ) -> Result<Self, ActorsError> {
        setup
            .batch
            .check_ranks(setup.ranks as u64)
            .map_err(|e| ActorsError::Start(e.to_string()))?;
        if local_ranks.is_empty() || local_ranks.iter().any(|&r| r >= setup.ranks) {
            return Err(ActorsError::Start(format!(
                "local ranks {local_ranks:?} do not fit a world of {} ranks",
                setup.ranks
            )));
        }
        let timeout = setup.step_timeout;
        let local_count = local_ranks.len();
        let (sup, handle) = Actor::spawn(
            None,
            TrainSupervisor,
            SupervisorArgs {
                setup,
                local_ranks,
                collective,
                data,
                params,
                opt,
            },
        )
        .await
        .map_err(|e| ActorsError::Start(e.to_string()))?;
        Ok(Self {
            sup,
            handle,
            timeout,
            local_ranks: local_count,
        })
    }

    /// How many ranks this process hosts.
    pub fn local_ranks(&self) -> usize {
        self.local_ranks
    }

    async fn ask<T: Send + 'static>(
        &self,
        what: &str,
        build: impl FnOnce(Reply<T>) -> SupervisorMsg,
    ) -> Result<T, ActorsError> {
        // The supervisor's own deadline is the rank timeout; give the call a little more.
        let deadline = self.timeout + Duration::from_secs(5);
        match self.sup.call(build, Some(deadline)).await {
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
        self.ask("step", |reply| SupervisorMsg::Step {
            step,
            cursor,
            lr,
            reply,
        })
        .await
    }

    /// Copy the training state (parameters and optimizer) out of rank 0.
    pub async fn snapshot(&self) -> Result<Snapshot, ActorsError> {
        self.ask("snapshot", |reply| SupervisorMsg::Snapshot { reply })
            .await
    }

    /// Mean token loss over the given validation windows.
    pub async fn eval(&self, windows: Vec<u64>) -> Result<f64, ActorsError> {
        self.ask("eval", |reply| SupervisorMsg::Eval { windows, reply })
            .await
    }

    /// Sample `max_new` tokens after `prompt`.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        max_new: usize,
        seed: u64,
    ) -> Result<Vec<u32>, ActorsError> {
        self.ask("generate", |reply| SupervisorMsg::Generate {
            prompt,
            max_new,
            seed,
            reply,
        })
        .await
    }

    /// Every rank's parameter hash, in rank order (they must all be equal).
    pub async fn param_hashes(&self) -> Result<Vec<String>, ActorsError> {
        self.ask("param hashes", |reply| SupervisorMsg::ParamHashes { reply })
            .await
    }

    /// Ask the supervisor and its ranks to stop, without waiting (for a handle still
    /// shared when its owner is done with it).
    pub fn stop(&self) {
        self.sup.stop(None);
    }

    /// Stop the supervisor and its ranks.
    pub async fn shutdown(self) {
        self.sup.stop(None);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.handle).await;
    }
}

//! The node's shell: it carries out the effects of the node's state machine
//! ([`NodeMachine`], core) and feeds their outcomes back as events. It decides nothing.
//!
//! One loop waits for the next input (a plan, a lost membership, an operator request, a
//! checkpoint actor event, the outcome of work in flight, the machine's timer), hands it
//! to the machine, and runs the effects in order. Work that waits on peers, etcd, the
//! store or the trainer runs as a future in `work` and comes back as [`Done`]; short,
//! bounded work (a snapshot for a save, a record write bounded by 300 ms, a log line) is
//! done in place. Parameter hashes are taken on blocking threads (`block_in_place`).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use tenax_actors::{CheckpointEvent, Checkpointer, StepReport, Trainer};
use tenax_cluster::etcd::{EtcdMembership, FenceOutcome};
use tenax_cluster::member::{Member, MemberConfig, MemberState};
use tenax_cluster::peer::{
    fetch_state, CommSpec, GrpcCollective, HubConfig, PeerAddr, Reduction, StateSnapshot,
};
use tenax_cluster::Collective;
use tenax_core::membership::{MemberId, MemberInfo, Plan};
use tenax_core::node::{Action, Effect, Event, Exit, NodeMachine, PeerState, Record};
use tenax_storage::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{find_resume_point, start_member, CheckpointRecord, Settings, Shared, CHECKPOINT_KEY};
use crate::train::{start_state, Prepared, Start};

/// How long one attempt to write a checkpoint's etcd record may hold the loop.
const RECORD_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// How often the non-committers read the job's record while waiting for the final one.
const FINAL_POLL: Duration = Duration::from_millis(200);

/// An operator's request (the Control service and the signal handler send them).
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

/// The outcome of work that ran outside the loop; applied to the shell, then fed to the
/// machine.
enum Done {
    /// Nothing to apply: just the event.
    Event(Event),
    /// Registered again.
    Registered(Result<Member>),
    /// The communicator of a generation.
    Built {
        generation: u64,
        result: Result<(Arc<GrpcCollective>, Vec<PeerAddr>), String>,
    },
    /// The committed checkpoint, loaded.
    Loaded {
        generation: u64,
        result: Result<(Start, String), String>,
    },
    /// The state copied from a peer (its hash checked).
    Copied {
        generation: u64,
        result: Result<(Start, String), String>,
    },
    /// The state served to the receivers; the state comes back either way.
    Served {
        generation: u64,
        state: Start,
        result: Result<(), String>,
    },
    /// The trainer of a generation.
    Trainer {
        generation: u64,
        result: Result<Trainer, String>,
    },
    /// A step.
    Stepped {
        generation: u64,
        result: Result<StepInfo, String>,
    },
}

/// What the last step reported, for its step-log line.
struct StepInfo {
    report: StepReport,
    lr: f64,
    secs: f64,
    hash: String,
}

/// The shell of one node. See the module docs.
pub(crate) struct Shell<'a> {
    pub s: &'a Settings,
    pub prep: &'a Prepared,
    pub shared: Arc<Shared>,
    pub etcd: EtcdMembership,
    pub store: Store,
    pub join: MemberConfig,
    pub member: Member,
    pub checkpointer: Checkpointer,
    pub run_dir: PathBuf,
    pub requests: mpsc::Receiver<Request>,
    pub machine: NodeMachine,
    /// The origin of the machine's clock.
    clock: tokio::time::Instant,
    /// The node's state while no trainer holds it (and no copy or serve has it).
    state: Option<Start>,
    /// The parameter hash of `state` (or of the trainer's state), when known.
    hash: Option<String>,
    trainer: Option<Arc<Trainer>>,
    comm: Option<Arc<GrpcCollective>>,
    peers: Vec<PeerAddr>,
    /// Which member computes each slot (a late step names the members it waits for).
    slot_owner: Vec<usize>,
    /// Cancelled when the generation's communicator is replaced: its pollers stop.
    gen_cancel: CancellationToken,
    work: FuturesUnordered<BoxFuture<'a, Done>>,
    /// Events to feed before waiting for more.
    queue: VecDeque<Event>,
    plans: watch::Receiver<Option<Plan>>,
    member_state: watch::Receiver<MemberState>,
    /// The membership agent's watches are open (false once it is lost or stopped, until
    /// the node registers again).
    member_live: bool,
    metrics: Option<std::fs::File>,
    events: Option<std::fs::File>,
    history: Vec<crate::plot::LossPoint>,
    last_step: Option<StepInfo>,
    /// The generation each save was handed over in, by step.
    saves: BTreeMap<u64, u64>,
    probes_base: u64,
    revocations_base: u64,
    /// Generations formed so far.
    formed: u64,
    #[cfg(feature = "chaos-hooks")]
    flipped: bool,
    exit: Option<(Exit, String)>,
}

impl<'a> Shell<'a> {
    /// A shell around a machine that has not started.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s: &'a Settings,
        prep: &'a Prepared,
        shared: Arc<Shared>,
        etcd: EtcdMembership,
        store: Store,
        join: MemberConfig,
        member: Member,
        checkpointer: Checkpointer,
        run_dir: PathBuf,
        requests: mpsc::Receiver<Request>,
        machine: NodeMachine,
    ) -> Self {
        let plans = member.plan_receiver();
        let member_state = member.state_receiver();
        Self {
            s,
            prep,
            shared,
            etcd,
            store,
            join,
            member,
            checkpointer,
            run_dir,
            requests,
            machine,
            clock: tokio::time::Instant::now(),
            state: None,
            hash: None,
            trainer: None,
            comm: None,
            peers: Vec::new(),
            slot_owner: Vec::new(),
            gen_cancel: CancellationToken::new(),
            work: FuturesUnordered::new(),
            queue: VecDeque::new(),
            plans,
            member_state,
            member_live: true,
            metrics: None,
            events: None,
            history: Vec::new(),
            last_step: None,
            saves: BTreeMap::new(),
            probes_base: 0,
            revocations_base: 0,
            formed: 0,
            #[cfg(feature = "chaos-hooks")]
            flipped: false,
            exit: None,
        }
    }

    fn me(&self) -> String {
        self.member.id().to_string()
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Run the node from `start` until the machine says to exit. Returns how it ended
    /// and why.
    pub async fn run(mut self, start: Start, holds_state: bool) -> Result<(Exit, String, Self)> {
        self.open_logs()?;
        let (step, cursor) = (start.step, start.cursor);
        self.state = Some(start);
        self.queue.push_back(Event::Started {
            holds_state,
            step,
            cursor,
        });
        if let Some(p) = self.plans.borrow_and_update().clone() {
            self.queue.push_back(Event::PlanSeen(p));
        }
        loop {
            while let Some(e) = self.queue.pop_front() {
                let now = self.now_ms();
                let effects = self.machine.handle(e, now);
                for effect in effects {
                    self.carry_out(effect).await;
                }
                self.shared.set_phase(self.machine.phase().name());
            }
            if let Some((how, why)) = self.exit.take() {
                return Ok((how, why, self));
            }
            let event = self.next_input().await;
            if let Some(e) = event {
                self.queue.push_back(e);
            }
        }
    }

    /// Wait for the next input and turn it into an event.
    async fn next_input(&mut self) -> Option<Event> {
        let timer = self
            .machine
            .next_timer_ms()
            .map(|ms| self.clock + Duration::from_millis(ms))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            Some(done) = self.work.next() => self.apply(done),
            r = self.plans.changed(), if self.member_live => match r {
                Ok(()) => self.plans.borrow_and_update().clone().map(Event::PlanSeen),
                Err(_) => self.member_gone(),
            },
            r = self.member_state.changed(), if self.member_live => match r {
                Ok(()) => match self.member_state.borrow_and_update().clone() {
                    MemberState::Lost { reason } => {
                        self.member_live = false;
                        Some(Event::MembershipLost { reason })
                    }
                    _ => None,
                },
                Err(_) => self.member_gone(),
            },
            Some(req) = self.requests.recv() => Some(self.request(req)),
            Some(ev) = self.checkpointer.next_event() => self.checkpoint_event(ev),
            _ = tokio::time::sleep_until(timer) => Some(Event::Tick),
        }
    }

    /// The membership agent closed its watches: lost (register again), or stopped.
    fn member_gone(&mut self) -> Option<Event> {
        self.member_live = false;
        Some(match self.member.state() {
            MemberState::Lost { reason } => Event::MembershipLost { reason },
            _ => Event::Fatal {
                error: "the membership agent stopped".into(),
            },
        })
    }

    fn request(&mut self, req: Request) -> Event {
        match req {
            Request::Drain { checkpoint } => Event::Drain { checkpoint },
            Request::Sigterm => Event::Sigterm {
                grace_ms: self.s.grace.as_millis() as u64,
            },
            Request::Pause => Event::Pause,
            Request::Resume => Event::Resume,
            Request::CheckpointNow => Event::CheckpointNow,
        }
    }

    fn checkpoint_event(&mut self, ev: CheckpointEvent) -> Option<Event> {
        let me = self.me();
        match ev {
            CheckpointEvent::Committed {
                step, url, save_s, ..
            } => {
                let generation = self.saves.remove(&step).unwrap_or_default();
                self.saves.retain(|s, _| *s > step);
                let mut v = self.shared.view();
                v.last_save_s = save_s;
                v.save_s_sum += save_s;
                Some(Event::CheckpointCommitted {
                    step,
                    url,
                    generation,
                })
            }
            CheckpointEvent::Failed { step, error } => {
                self.shared.view().checkpoint_failures += 1;
                Some(Event::CheckpointFailed { step, error })
            }
            CheckpointEvent::Superseded { step, by_step } => {
                eprintln!("note: node {me}: checkpoint at step {step} skipped, step {by_step} is saved instead");
                None
            }
            CheckpointEvent::Pruned { .. } | CheckpointEvent::PruneFailed { .. } => None,
        }
    }

    /// Apply a finished piece of work to the shell; the event for the machine.
    fn apply(&mut self, done: Done) -> Option<Event> {
        let me = self.me();
        match done {
            Done::Event(e) => Some(e),
            Done::Registered(Ok(fresh)) => {
                let old = std::mem::replace(&mut self.member, fresh);
                self.probes_base += old.probes_sent();
                self.revocations_base += old.revocations();
                tokio::spawn(async move {
                    if let Err(e) = old.shutdown().await {
                        eprintln!("note: releasing the old registration: {e}");
                    }
                });
                self.plans = self.member.plan_receiver();
                self.member_state = self.member.state_receiver();
                self.member_live = true;
                if let Some(p) = self.plans.borrow_and_update().clone() {
                    self.queue.push_back(Event::PlanSeen(p));
                }
                Some(Event::Registered)
            }
            Done::Registered(Err(e)) => Some(Event::Fatal {
                error: format!("registering again: {e:#}"),
            }),
            Done::Built { generation, result } => match result {
                Ok((comm, peers)) => {
                    self.install(comm, peers);
                    Some(Event::CommunicatorBuilt { generation })
                }
                Err(error) => Some(Event::Failed {
                    generation,
                    peers_may_have_failed: false,
                    error,
                }),
            },
            Done::Loaded { generation, result } | Done::Copied { generation, result } => {
                match result {
                    Ok((start, hash)) => {
                        let (step, cursor) = (start.step, start.cursor);
                        {
                            let mut v = self.shared.view();
                            v.step = step;
                            v.param_hash = hash.clone();
                        }
                        self.state = Some(start);
                        self.hash = Some(hash.clone());
                        Some(
                            if self.machine.phase() == &tenax_core::node::Phase::Loading {
                                Event::CheckpointLoaded {
                                    generation,
                                    step,
                                    cursor,
                                    hash,
                                }
                            } else {
                                Event::StateCopied {
                                    generation,
                                    step,
                                    cursor,
                                }
                            },
                        )
                    }
                    Err(error) => Some(Event::Failed {
                        generation,
                        peers_may_have_failed: true,
                        error,
                    }),
                }
            }
            Done::Served {
                generation,
                state,
                result,
            } => {
                self.state = Some(state);
                match result {
                    Ok(()) => {
                        self.shared.view().state_copies_out += 1;
                        Some(Event::StateServed { generation })
                    }
                    Err(error) => Some(Event::Failed {
                        generation,
                        peers_may_have_failed: true,
                        error,
                    }),
                }
            }
            Done::Trainer { generation, result } => match result {
                Ok(t) => {
                    self.trainer = Some(Arc::new(t));
                    Some(Event::TrainerStarted { generation })
                }
                Err(error) => Some(Event::Fatal { error }),
            },
            Done::Stepped { generation, result } => match result {
                Ok(info) => {
                    let (step, _) = self.machine.position();
                    let tokens = (self.prep.cfg.batch_size as usize
                        * self.prep.stored_cfg.model.block_size)
                        as f64;
                    {
                        let mut v = self.shared.view();
                        v.step = step + 1;
                        v.loss = info.report.loss;
                        v.tokens_per_s = tokens / info.secs.max(1e-9);
                        v.param_hash = info.hash.clone();
                        v.leader = self.member.is_leader();
                        v.probes_sent = self.probes_base + self.member.probes_sent();
                        v.revocations = self.revocations_base + self.member.revocations();
                    }
                    self.hash = Some(info.hash.clone());
                    let event = Event::StepDone {
                        generation,
                        loss: info.report.loss,
                        skipped: info.report.skipped,
                        elapsed_ms: (info.secs * 1000.0) as u64,
                    };
                    self.last_step = Some(info);
                    Some(event)
                }
                Err(error) => {
                    eprintln!("note: node {me}: generation {generation}: {error}");
                    Some(Event::Failed {
                        generation,
                        peers_may_have_failed: true,
                        error,
                    })
                }
            },
        }
    }

    /// A generation's communicator is built: keep it, and what the logs and the late-step
    /// reports need from its plan.
    fn install(&mut self, comm: Arc<GrpcCollective>, peers: Vec<PeerAddr>) {
        #[cfg(feature = "chaos-hooks")]
        if let Some(step) = super::chaos_step("TENAX_CHAOS_EXIT_IN_ALL_GATHER") {
            comm.exit_during_all_gather(step);
        }
        let spec = comm.spec().clone();
        let num_slots = spec.num_slots;
        self.slot_owner = vec![0usize; num_slots as usize];
        if let Some(plan) = self
            .member
            .current_plan()
            .filter(|p| p.generation == spec.generation)
        {
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
                    self.slot_owner[slot as usize] = k;
                }
            }
        }
        self.peers = peers;
        self.comm = Some(comm);
    }

    /// The generation's communicator, if `generation` is its.
    fn comm_of(&self, generation: u64) -> Option<Arc<GrpcCollective>> {
        self.comm
            .clone()
            .filter(|c| c.spec().generation == generation)
    }

    /// Carry out one effect.
    async fn carry_out(&mut self, effect: Effect) {
        let Effect { action, reason } = effect;
        let me = self.me();
        match action {
            Action::NoteState {
                source,
                step,
                generation,
            } => self.note_state(source.as_str(), step, generation),
            Action::Register => {
                println!("node {me}: registering again ({reason})");
                let (etcd, join) = (self.etcd.clone(), self.join.clone());
                self.work.push(Box::pin(async move {
                    Done::Registered(start_member(&etcd, &join).await)
                }));
            }
            Action::CheckJobDone => {
                let etcd = self.etcd.clone();
                self.work.push(Box::pin(async move {
                    let step = read_record(&etcd, Duration::from_secs(2))
                        .await
                        .map(|r| r.step);
                    Done::Event(Event::JobRecord { step })
                }));
            }
            Action::BuildCommunicator { plan } => self.build(plan, &reason),
            Action::ExchangeState {
                generation,
                round,
                step,
                holds_state,
            } => {
                let hash = if holds_state {
                    self.state_hash()
                } else {
                    String::new()
                };
                self.compare(generation, round, step, hash);
            }
            Action::LoadCheckpoint { generation } => {
                println!("node {me}: generation {generation}: {reason}");
                let (etcd, store, prep) = (self.etcd.clone(), self.store.clone(), self.prep);
                self.work.push(Box::pin(async move {
                    let result = async {
                        let loaded = find_resume_point(&etcd, &store).await?;
                        tokio::task::block_in_place(|| {
                            let start = start_state(prep, loaded.as_ref())?;
                            let hash = tenax_actors::param_hash(&start.params);
                            Ok::<_, anyhow::Error>((start, hash))
                        })
                    }
                    .await
                    .map_err(|e| format!("loading the committed checkpoint: {e:#}"));
                    Done::Loaded { generation, result }
                }));
            }
            Action::FetchState {
                generation,
                donor,
                step,
                hash,
            } => self.fetch(generation, donor, step, hash),
            Action::ServeState {
                generation,
                receivers,
            } => self.serve(generation, receivers),
            Action::StartTrainer {
                generation,
                step: _,
                cursor: _,
            } => self.start_trainer(generation),
            Action::StopTrainer { generation: _ } => self.stop_trainer().await,
            Action::RunStep {
                generation,
                step,
                cursor,
                deadline_ms: _,
            } => self.run_step(generation, step, cursor),
            Action::ReportLate {
                generation,
                step,
                waited_ms,
            } => {
                if let Some(comm) = self.comm_of(generation) {
                    self.suspect_late(&comm, step, waited_ms);
                }
            }
            Action::ReportFailedPeers { generation } => {
                if let Some(comm) = self.comm_of(generation) {
                    for (id, what) in comm.failed_peers() {
                        self.shared.view().suspicions += 1;
                        self.member.suspect(MemberId::new(id), what);
                    }
                }
            }
            Action::CompareHashes { generation, step } => {
                let hash = self.hash.clone().unwrap_or_default();
                self.compare(generation, step, step, hash);
            }
            Action::Alarm {
                generation,
                step,
                states,
            } => {
                let odd: Vec<String> = states
                    .iter()
                    .map(|o| format!("{} {}", o.member, &o.hash[..o.hash.len().min(12)]))
                    .collect();
                eprintln!(
                    "ALARM: node {me}: generation {generation}: parameters differ between members after step {step} ({}): resyncing the odd ones from a peer",
                    odd.join(", ")
                );
                self.shared.view().hash_mismatches += 1;
            }
            Action::Evaluate { generation, step } => {
                let trainer = self.trainer.clone();
                let windows = self.prep.val_windows.clone();
                self.work.push(Box::pin(async move {
                    let r = match trainer {
                        Some(t) => t.eval(windows).await.map_err(|e| e.to_string()),
                        None => Err("no trainer".into()),
                    };
                    Done::Event(match r {
                        Ok(val_loss) => Event::Evaluated {
                            generation,
                            val_loss,
                        },
                        Err(e) => Event::Fatal {
                            error: format!("evaluation at step {step}: {e}"),
                        },
                    })
                }));
            }
            Action::LogStep {
                generation,
                step,
                cursor,
                val_loss,
            } => self.log_step(generation, step, cursor, val_loss),
            Action::Save {
                generation,
                step,
                cursor,
            } => self.save(generation, step, cursor).await,
            Action::WriteRecord(rec) => self.write_record(rec).await,
            Action::WaitForFinalRecord {
                generation: _,
                step,
            } => {
                let etcd = self.etcd.clone();
                let cancel = self.gen_cancel.clone();
                self.work.push(Box::pin(async move {
                    loop {
                        if let Some(rec) = read_record(&etcd, Duration::from_secs(2)).await {
                            if rec.step >= step {
                                println!(
                                    "the final checkpoint (step {}) was committed by {}: {}",
                                    rec.step, rec.member, rec.url
                                );
                                return Done::Event(Event::FinalRecordSeen { step: rec.step });
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(FINAL_POLL) => {}
                            _ = cancel.cancelled() => return Done::Event(Event::Tick),
                        }
                    }
                }));
            }
            Action::StopAfter { generation, step } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.stop_after(step);
                }
            }
            Action::Abort { generation } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.abort(&reason);
                }
            }
            Action::Close { generation } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.close(Duration::from_secs(10)).await;
                }
            }
            Action::Say(text) => {
                if let Some(warning) = text.strip_prefix("warning: ") {
                    eprintln!("warning: node {me}: {warning}");
                } else {
                    println!("node {me}: {text}");
                }
            }
            Action::Plot => self.plot(),
            Action::Exit(how) => self.exit = Some((how, reason)),
        }
    }

    fn build(&mut self, plan: Plan, reason: &str) {
        let me = self.me();
        self.gen_cancel.cancel();
        self.gen_cancel = CancellationToken::new();
        if self.formed > 0 {
            self.shared.view().reforms += 1;
        }
        self.formed += 1;
        let local = plan.ranks_of(&MemberId::new(me.clone()));
        {
            let mut v = self.shared.view();
            v.generation = plan.generation;
            v.ranks = local.clone();
            v.world = plan.world;
            v.leader = self.member.is_leader();
            v.phase = "forming".into();
        }
        println!("node {me}: {reason}");
        let etcd = self.etcd.clone();
        let hub = self.shared.hub.clone();
        let spec = CommSpec {
            job: self.s.job.clone(),
            generation: plan.generation,
            members: Vec::new(),
            me: 0,
            local_ranks: local,
            world: plan.world,
            num_slots: self.prep.setup.batch.num_slots(),
            num_params: self.prep.param_layout.total,
            reduction: self.s.reduction,
            max_frame_floats: HubConfig::default().max_frame_floats,
            connect_deadline: Duration::from_secs(10),
        };
        let generation = plan.generation;
        self.work.push(Box::pin(async move {
            let result = async {
                let peers = peers_of(&etcd, &plan).await?;
                let my_index = peers.iter().position(|p| p.id == me).ok_or_else(|| {
                    format!("node {me} is not among the members of generation {generation}")
                })?;
                let spec = CommSpec {
                    members: peers.clone(),
                    me: my_index,
                    ..spec
                };
                let comm = GrpcCollective::new(&hub, spec).map_err(|e| e.to_string())?;
                Ok((comm, peers))
            }
            .await;
            Done::Built { generation, result }
        }));
    }

    /// The hash of the state the shell holds (taken on a blocking thread when unknown).
    fn state_hash(&mut self) -> String {
        if let Some(h) = &self.hash {
            return h.clone();
        }
        let h = match &self.state {
            Some(s) => tokio::task::block_in_place(|| tenax_actors::param_hash(&s.params)),
            None => String::new(),
        };
        self.hash = Some(h.clone());
        h
    }

    fn compare(&mut self, generation: u64, round: u64, step: u64, hash: String) {
        let Some(comm) = self.comm_of(generation) else {
            return;
        };
        let timeout = self.s.step_timeout;
        self.work.push(Box::pin(async move {
            Done::Event(
                match comm.compare_state(round, step, &hash, timeout).await {
                    Ok(states) => Event::StatesExchanged {
                        generation,
                        round,
                        states: states
                            .into_iter()
                            .map(|o| PeerState {
                                member: MemberId::new(o.id),
                                step: o.step,
                                hash: o.param_hash,
                            })
                            .collect(),
                    },
                    Err(e) => Event::Failed {
                        generation,
                        peers_may_have_failed: true,
                        error: format!("state exchange: {e}"),
                    },
                },
            )
        }));
    }

    fn fetch(&mut self, generation: u64, donor: usize, step: u64, hash: String) {
        let me = self.me();
        let Some(peer) = self.peers.get(donor).cloned() else {
            self.queue.push_back(Event::Failed {
                generation,
                peers_may_have_failed: false,
                error: format!("no member {donor} in generation {generation}"),
            });
            return;
        };
        let had = self.state.as_ref().map(|s| s.step);
        let held = self.machine.holds_state();
        let hub = self.shared.hub.clone();
        let timeout = self.s.step_timeout;
        let shared = self.shared.clone();
        self.work.push(Box::pin(async move {
            let t0 = Instant::now();
            let result = async {
                let (snap, stats) =
                    fetch_state(&hub, generation, &me, &peer, step, &hash, timeout)
                        .await
                        .map_err(|e| format!("copying the state of step {step} from {}: {e}", peer.id))?;
                let got = tokio::task::block_in_place(|| tenax_actors::param_hash(&snap.params));
                if got != hash {
                    return Err(format!(
                        "the state copied from {} hashes to {} instead of {}",
                        peer.id,
                        &got[..12],
                        &hash[..hash.len().min(12)]
                    ));
                }
                println!(
                    "node {me}: generation {generation}: copied the state of step {} from {} ({:.1} MB in {:.3} s, {:.2} GB/s; {})",
                    snap.step,
                    peer.id,
                    stats.bytes as f64 / 1e6,
                    t0.elapsed().as_secs_f64(),
                    stats.gb_per_s(),
                    match (held, had) {
                        (true, Some(s)) => format!("it was at step {s}"),
                        _ => "it held no state".to_string(),
                    }
                );
                {
                    let mut v = shared.view();
                    v.state_copies_in += 1;
                    v.state_bytes_in += stats.bytes;
                    v.last_copy_gb_per_s = stats.gb_per_s();
                }
                let start = Start {
                    step: snap.step,
                    cursor: snap.cursor,
                    params: snap.params,
                    opt: tenax_model::AdamW {
                        m: snap.m,
                        v: snap.v,
                        step: snap.opt_step,
                    },
                };
                Ok((start, got))
            }
            .await;
            Done::Copied { generation, result }
        }));
    }

    fn serve(&mut self, generation: u64, receivers: Vec<usize>) {
        let me = self.me();
        let hash = self.state_hash();
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            return;
        };
        let names: Vec<String> = receivers
            .iter()
            .filter_map(|&i| self.peers.get(i).map(|p| p.id.clone()))
            .collect();
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
        let publication = self.shared.hub.publish_state(generation, snap.clone());
        let timeout = self.s.step_timeout;
        self.work.push(Box::pin(async move {
            // Wait for the receivers, but not past the generation: a receiver that dies
            // mid-copy gets evicted, and the newer plan aborts the communicator.
            let started = Instant::now();
            let result = loop {
                match publication
                    .wait_served(names.len() as u64, Duration::from_millis(200))
                    .await
                {
                    Ok(()) => break Ok(()),
                    Err(e) => {
                        if let Some(reason) = comm.aborted() {
                            break Err(format!("{e}; the generation ended: {reason}"));
                        }
                        if started.elapsed() >= timeout {
                            break Err(format!(
                                "{} of {} receiver(s) copied the state within {} s",
                                publication.served(),
                                names.len(),
                                timeout.as_secs()
                            ));
                        }
                    }
                }
            };
            drop(publication);
            let snap = Arc::try_unwrap(snap).unwrap_or_else(|a| StateSnapshot::clone(&a));
            if result.is_ok() {
                println!(
                    "node {me}: generation {generation}: sent its state of step {step} to {}",
                    names.join(", ")
                );
            }
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
            Done::Served {
                generation,
                state,
                result: result.map_err(|e| format!("sending state to {}: {e}", names.join(", "))),
            }
        }));
    }

    fn start_trainer(&mut self, generation: u64) {
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            self.queue.push_back(Event::Fatal {
                error: format!("generation {generation}: no state or communicator to train with"),
            });
            return;
        };
        #[cfg(feature = "chaos-hooks")]
        let state = self.chaos_flip(state);
        let spec = comm.spec();
        let mut setup = self.prep.setup.clone();
        setup.ranks = spec.world as usize;
        let local: Vec<usize> = spec.local_ranks.iter().map(|&r| r as usize).collect();
        let data = self.prep.data.clone();
        let collective: Arc<dyn Collective> = comm.clone();
        self.work.push(Box::pin(async move {
            let result = Trainer::start_group(
                setup,
                local,
                Some(collective),
                data,
                state.params,
                state.opt,
            )
            .await
            .map_err(|e| e.to_string());
            Done::Trainer { generation, result }
        }));
    }

    /// Silent corruption on this node only, for tests: one bit of one parameter.
    #[cfg(feature = "chaos-hooks")]
    fn chaos_flip(&mut self, mut state: Start) -> Start {
        if let Some(at) = super::chaos_step("TENAX_CHAOS_FLIP_PARAM_AT_STEP") {
            if state.step >= at && !self.flipped {
                self.flipped = true;
                // The largest parameter's top mantissa bit: a change updates do not absorb.
                let i = (0..state.params.len())
                    .max_by(|&a, &b| state.params[a].abs().total_cmp(&state.params[b].abs()))
                    .unwrap_or(0);
                state.params[i] = f32::from_bits(state.params[i].to_bits() ^ (1 << 22));
                self.hash = None;
                eprintln!(
                    "chaos: node {} flipped one bit of its parameters at step {}",
                    self.me(),
                    state.step
                );
            }
        }
        state
    }

    async fn stop_trainer(&mut self) {
        let Some(trainer) = self.trainer.take() else {
            return;
        };
        let (step, cursor) = self.machine.position();
        let snap = trainer.snapshot().await;
        match Arc::try_unwrap(trainer) {
            Ok(t) => t.shutdown().await,
            Err(shared) => shared.stop(),
        }
        match snap {
            Ok(snap) => {
                self.state = Some(Start {
                    step,
                    cursor,
                    params: snap.params,
                    opt: snap.opt,
                });
            }
            Err(e) => self.queue.push_back(Event::Fatal {
                error: format!("cannot read its state after step {step}: {e}"),
            }),
        }
    }

    fn run_step(&mut self, generation: u64, step: u64, cursor: u64) {
        let Some(trainer) = self.trainer.clone() else {
            return;
        };
        let lr = self.prep.schedule.lr_at(step);
        self.work.push(Box::pin(async move {
            let t0 = Instant::now();
            let result = async {
                let report = trainer
                    .step(step, cursor, lr as f32)
                    .await
                    .map_err(|e| e.to_string())?;
                let secs = t0.elapsed().as_secs_f64();
                let hash = trainer
                    .param_hashes()
                    .await
                    .map_err(|e| format!("step {}: {e}", step + 1))?
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                Ok(StepInfo {
                    report,
                    lr,
                    secs,
                    hash,
                })
            }
            .await;
            Done::Stepped { generation, result }
        }));
    }

    /// Step `step + 1` is past its deadline: report the members it waits for.
    fn suspect_late(&self, comm: &GrpcCollective, step: u64, waited_ms: u64) {
        let Some((losses, chunks)) = comm.progress(step) else {
            return;
        };
        let chunks = (self.s.reduction == Reduction::Exact).then_some(chunks);
        let late = tenax_core::detector::late_members(&self.slot_owner, &losses, chunks.as_deref());
        let me = comm.spec().me;
        for k in late.into_iter().filter(|&k| k != me) {
            let id = comm.spec().members[k].id.clone();
            eprintln!(
                "warning: node {}: step {} waits for {id} after {waited_ms} ms: reporting it as a suspect",
                self.member.id(),
                step + 1,
            );
            self.shared.view().suspicions += 1;
            self.member.suspect(
                MemberId::new(id),
                format!("step {} still waits for it after {waited_ms} ms", step + 1),
            );
        }
    }

    fn log_step(&mut self, generation: u64, step: u64, cursor: u64, val_loss: Option<f64>) {
        let Some(info) = self.last_step.as_ref() else {
            return;
        };
        let cfg = &self.prep.cfg;
        let world = self.comm.as_ref().map(|c| c.spec().world).unwrap_or(0);
        let my_slots = self
            .comm
            .as_ref()
            .map(|c| c.spec().my_slots())
            .unwrap_or_default();
        let tokens_per_s = (cfg.batch_size as usize * self.prep.stored_cfg.model.block_size) as f64
            / info.secs.max(1e-9);
        let r = &info.report;
        let mut line = json!({"step": step, "loss": r.loss, "lr": info.lr, "tokens_per_s": tokens_per_s,
            "grad_norm": r.grad_norm, "skipped": r.skipped, "generation": generation,
            "world": world, "param_hash": info.hash, "cursor": cursor, "slots": my_slots, "t_ms": tenax_storage::now_unix_ms()});
        if let Some(v) = val_loss {
            line["val_loss"] = json!(v);
        }
        if let Some(f) = self.metrics.as_mut() {
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("warning: metrics.jsonl: cannot append: {e}");
            }
        }
        let log_every = (cfg.steps / 20).max(1);
        if step.is_multiple_of(log_every) || step == cfg.steps {
            println!(
                "node {}: step {step}/{}: loss {:.4}{}, {:.0} tokens/s, generation {generation}",
                self.member.id(),
                cfg.steps,
                r.loss,
                val_loss
                    .map(|v| format!(", val loss {v:.4}"))
                    .unwrap_or_default(),
                tokens_per_s,
            );
        }
        self.history.push(crate::plot::LossPoint {
            step,
            loss: r.loss,
            val_loss,
        });
    }

    async fn save(&mut self, generation: u64, step: u64, cursor: u64) {
        let Some(trainer) = self.trainer.clone() else {
            self.queue.push_back(Event::CheckpointFailed {
                step,
                error: "no trainer holds the state".into(),
            });
            return;
        };
        self.saves.insert(step, generation);
        let r = crate::train::save(
            &trainer,
            &self.checkpointer,
            &self.prep.stored_cfg,
            &self.prep.config_hash,
            step,
            cursor,
            generation,
        )
        .await;
        if let Err(e) = r {
            self.saves.remove(&step);
            self.queue.push_back(Event::CheckpointFailed {
                step,
                error: format!("{e:#}"),
            });
        }
    }

    /// Write the fenced etcd record of a committed checkpoint, bounded in time: the
    /// committer must not hold the group's next step while etcd is away.
    async fn write_record(&mut self, rec: Record) {
        let me = self.me();
        let prefix = format!("{}/", super::job_store_url(&self.s.store_root, &self.s.job));
        let record = CheckpointRecord {
            step: rec.step,
            folder: rec
                .url
                .strip_prefix(&prefix)
                .unwrap_or(&rec.url)
                .to_string(),
            url: rec.url.clone(),
            generation: rec.generation,
            member: me,
        };
        let bytes = serde_json::to_vec(&record).expect("record serialises");
        let attempt = tokio::time::timeout(
            RECORD_ATTEMPT_TIMEOUT,
            self.member
                .fenced_commit_in(rec.generation, CHECKPOINT_KEY, &bytes),
        )
        .await;
        let step = rec.step;
        self.queue.push_back(match attempt {
            Ok(Ok(FenceOutcome::Committed { .. })) => {
                let mut v = self.shared.view();
                v.last_checkpoint_step = step;
                v.last_checkpoint_url = rec.url;
                v.checkpoints_committed += 1;
                Event::RecordWritten { step }
            }
            Ok(Ok(FenceOutcome::Refused { reason })) => Event::RecordRefused {
                step,
                reason: format!("{reason:?}"),
            },
            Ok(Err(e)) => Event::RecordUnreachable {
                step,
                error: e.to_string(),
            },
            Err(_) => Event::RecordUnreachable {
                step,
                error: format!(
                    "no answer from etcd within {} ms",
                    RECORD_ATTEMPT_TIMEOUT.as_millis()
                ),
            },
        });
    }

    fn open_logs(&mut self) -> Result<()> {
        let metrics_path = self.run_dir.join("metrics.jsonl");
        // A node's metrics.jsonl is its step log: what it did, appended across restarts
        // (a step redone after a whole-job restart appears again; the plot keeps the last).
        let mut by_step = BTreeMap::new();
        for p in crate::train::load_history(&metrics_path, u64::MAX)? {
            by_step.insert(p.step, p);
        }
        self.history = by_step.into_values().collect();
        self.metrics = Some(append(&metrics_path)?);
        self.events = Some(append(&self.run_dir.join("events.jsonl"))?);
        Ok(())
    }

    /// Appends one line to `events.jsonl`, the node's record of how its state was set
    /// other than by training a step. The chaos harness reads it: a step log that goes
    /// backwards must be explained by one.
    fn note_state(&mut self, how: &str, step: u64, generation: Option<u64>) {
        let line = json!({"event": "state", "how": how, "step": step, "generation": generation,
            "t_ms": tenax_storage::now_unix_ms()});
        if let Some(f) = self.events.as_mut() {
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("warning: events.jsonl: cannot append: {e}");
            }
        }
    }

    fn plot(&self) {
        let png = self.run_dir.join("loss.png");
        let title = format!("tenax job {} ({})", self.s.job, self.prep.cfg.preset);
        if let Err(e) = crate::plot::plot_loss(&png, &title, &self.history) {
            eprintln!("warning: {e}");
        }
    }

    /// Stop what the shell still runs: the trainer, the communicator's pollers.
    pub async fn stop(&mut self) {
        self.gen_cancel.cancel();
        self.work = FuturesUnordered::new();
        if let Some(t) = self.trainer.take() {
            match Arc::try_unwrap(t) {
                Ok(t) => t.shutdown().await,
                Err(t) => t.stop(),
            }
        }
        if let Some(c) = self.comm.take() {
            c.abort("this node stops");
        }
    }

    /// The machine's position, for the exit line.
    pub fn step(&self) -> u64 {
        self.machine.position().0
    }
}

fn append(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot open for appending: pick a writable --run-dir",
                path.display()
            )
        })
}

/// The job's checkpoint record, if etcd answers within `timeout` and holds one.
async fn read_record(etcd: &EtcdMembership, timeout: Duration) -> Option<CheckpointRecord> {
    let got = tokio::time::timeout(timeout, etcd.get(CHECKPOINT_KEY)).await;
    let Ok(Ok(Some(bytes))) = got else {
        return None;
    };
    serde_json::from_slice(&bytes).ok()
}

/// The members of `plan` that host ranks, in order of their first rank, with addresses.
async fn peers_of(etcd: &EtcdMembership, plan: &Plan) -> Result<Vec<PeerAddr>, String> {
    let registered = etcd.members().await.map_err(|e| e.to_string())?;
    let mut addrs = BTreeMap::new();
    for m in registered {
        if let Ok(info) = serde_json::from_slice::<MemberInfo>(&m.info) {
            addrs.insert(info.id.to_string(), info.addr);
        }
    }
    let mut order: Vec<String> = Vec::new();
    for a in &plan.ranks {
        let id = a.member.to_string();
        if !order.contains(&id) {
            order.push(id);
        }
    }
    order
        .into_iter()
        .map(|id| {
            let addr = addrs
                .get(&id)
                .cloned()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| {
                    format!(
                        "member {id} of generation {} has no registered address (it left?)",
                        plan.generation
                    )
                })?;
            Ok(PeerAddr { id, addr })
        })
        .collect()
}

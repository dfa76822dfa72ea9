//! The node's shell: it carries out the effects of the node's state machine
//! ([`NodeMachine`], core) and feeds their outcomes back as events. It decides nothing.
//!
//! One loop waits for the next input (a plan, a lost membership, an operator request, a
//! checkpoint actor event, the outcome of work in flight, the machine's timer), hands it
//! to the machine, and carries out the effects in order. Work that waits on peers, etcd,
//! the store or the trainer runs as a future (`work.rs`) and comes back as a [`Done`];
//! short, bounded work (a snapshot for a save, a record write bounded by 300 ms, a log
//! line) is done in place.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tenax_actors::PipelineSpec;
use tenax_actors::{Checkpointer, Membership, NodeSupervisor, Trainer};
use tenax_cluster::etcd::EtcdMembership;
use tenax_cluster::etcd::LeaseState;
use tenax_cluster::member::{MemberConfig, MemberState};
use tenax_cluster::peer::{CommSpec, GrpcCollective, PeerAddr};
use tenax_cluster::Collective;
use tenax_core::membership::{MemberId, Plan};
use tenax_core::node::{Action, Effect, Event, Exit, NodeMachine, HASHES_IN_FLIGHT};
use tenax_core::pipeline::{split_blocks, StageLayers};
use tenax_storage::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod saving;

use super::steplog::StepLog;
use super::view::Request;
use super::work::{self, Done, StepInfo, TrainerKind};
use super::{Settings, Shared};
use crate::train::{guard, Prepared, Start};
use tenax_core::guard::{Guard, GuardState, Verdict};

/// How long releasing the membership may take before the node goes on (its lease then
/// expires after its TTL).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the node runs with: its settings and services.
pub(crate) struct Parts<'a> {
    pub s: &'a Settings,
    pub prep: &'a Prepared,
    pub shared: Arc<Shared>,
    pub etcd: EtcdMembership,
    pub store: Store,
    pub join: MemberConfig,
    /// The Membership actor's handle.
    pub member: Membership,
    pub checkpointer: Checkpointer,
    pub run_dir: PathBuf,
    pub requests: mpsc::Receiver<Request>,
    /// The job's nonce: the folder of a shared checkpoint derives from it.
    pub job_nonce: String,
    /// The node's supervisor: each generation's trainer is its child.
    pub node: &'a NodeSupervisor,
}

/// The shell of one node. See the module docs.
pub(crate) struct Shell<'a> {
    pub p: Parts<'a>,
    machine: NodeMachine,
    /// The origin of the machine's clock.
    clock: tokio::time::Instant,
    /// The node's state while no trainer holds it (and no copy or serve has it).
    state: Option<Start>,
    /// The parameter hash of the node's state, when known.
    hash: Option<String>,
    trainer: Option<Arc<Trainer>>,
    comm: Option<Arc<GrpcCollective>>,
    peers: Vec<PeerAddr>,
    /// Which member computes each slot (a late step names the members it waits for).
    slot_owner: Vec<usize>,
    /// The plan of the generation being formed or trained in.
    gen_plan: Option<Plan>,
    /// Cancelled when the generation's communicator is replaced: its pollers stop.
    gen_cancel: CancellationToken,
    work: FuturesUnordered<BoxFuture<'a, Done>>,
    /// Events to feed before waiting for more.
    queue: VecDeque<Event>,
    plans: watch::Receiver<Option<Plan>>,
    member_state: watch::Receiver<MemberState>,
    /// The lease keep-alive's view of etcd, and whether its sender is still there.
    lease_state: watch::Receiver<LeaseState>,
    lease_live: bool,
    /// Whether etcd answered, as last told to the machine.
    etcd_reachable: bool,
    /// The membership agent's watches are open (false once it is lost or stopped, until
    /// the node registers again).
    member_live: bool,
    log: Option<StepLog>,
    last_step: Option<StepInfo>,
    /// Parameter hashes being taken off the loop: (step, hash); at most
    /// [`HASHES_IN_FLIGHT`].
    hashing: FuturesUnordered<tokio::task::JoinHandle<(u64, String)>>,
    /// A comparison waiting for its step's hash: (generation, step).
    compare_after_hash: Option<(u64, u64)>,
    /// The generation each save was handed over in, by step.
    saves: BTreeMap<u64, u64>,
    /// The training guard (off unless `--guard-sigma`): its state is the one of the state
    /// the trainer holds; while no trainer runs, the guard state is in `state`.
    guard: Guard,
    /// The guard's in-memory snapshot (with `--guard-rollback-after`): its step and the
    /// state then. Every member takes it at the same steps, and a generation that starts
    /// from it holds it on every member (or forgets it on every member: `Guard::resumed`).
    guard_snapshot: Option<(u64, tenax_actors::Snapshot)>,
    /// Generations formed so far.
    formed: u64,
    exit: Option<(Exit, String)>,
}

impl<'a> Shell<'a> {
    /// A shell around a machine that has not started.
    pub fn new(p: Parts<'a>, machine: NodeMachine) -> Self {
        let plans = p.member.plan_receiver();
        let member_state = p.member.state_receiver();
        let lease_state = p.member.lease_state_receiver();
        let guard = Guard::new(p.prep.cfg.guard());
        Self {
            p,
            machine,
            clock: tokio::time::Instant::now(),
            state: None,
            hash: None,
            trainer: None,
            comm: None,
            peers: Vec::new(),
            slot_owner: Vec::new(),
            gen_plan: None,
            gen_cancel: CancellationToken::new(),
            work: FuturesUnordered::new(),
            queue: VecDeque::new(),
            plans,
            member_state,
            lease_state,
            lease_live: true,
            etcd_reachable: true,
            member_live: true,
            log: None,
            last_step: None,
            hashing: FuturesUnordered::new(),
            compare_after_hash: None,
            saves: BTreeMap::new(),
            guard,
            guard_snapshot: None,
            formed: 0,
            exit: None,
        }
    }

    fn me(&self) -> String {
        self.p.member.id().to_string()
    }

    /// Run the node from `start` until the machine says to exit; returns how and why.
    pub async fn run(&mut self, start: Start, holds_state: bool) -> Result<(Exit, String)> {
        self.log = Some(StepLog::open(&self.p.run_dir)?);
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
                let now_ms = self.clock.elapsed().as_millis() as u64;
                for effect in self.machine.handle(e, now_ms) {
                    self.carry_out(effect).await;
                }
                self.p.shared.set_phase(self.machine.phase().name());
                // The leader's planner holds the next plan while this is of the
                // current generation (pending records of g before the plan of g+1).
                self.p
                    .member
                    .set_record_pending(self.machine.pending_record_generation());
            }
            if let Some(end) = self.exit.take() {
                return Ok(end);
            }
            if let Some(e) = self.next_input().await {
                self.queue.push_back(e);
            }
        }
    }

    /// Wait for the next input and turn it into an event.
    async fn next_input(&mut self) -> Option<Event> {
        let timer = match self.machine.next_timer_ms() {
            Some(ms) => self.clock + Duration::from_millis(ms),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            Some(done) = self.work.next() => Some(self.apply(done).await),
            Some(Ok((step, hash))) = self.hashing.next() => {
                self.hashed(step, hash);
                None
            }
            r = self.plans.changed(), if self.member_live => match r {
                Ok(()) => self.plans.borrow_and_update().clone().map(Event::PlanSeen),
                Err(_) => Some(self.member_gone()),
            },
            r = self.member_state.changed(), if self.member_live => match r {
                Ok(()) => match self.member_state.borrow_and_update().clone() {
                    MemberState::Lost { reason } => {
                        self.member_live = false;
                        Some(Event::MembershipLost { reason })
                    }
                    _ => None,
                },
                Err(_) => Some(self.member_gone()),
            },
            r = self.lease_state.changed(), if self.lease_live => match r {
                Ok(()) => {
                    let reachable = match &*self.lease_state.borrow_and_update() {
                        LeaseState::Unconfirmed { .. } => false,
                        LeaseState::Alive => true,
                        _ => self.etcd_reachable,
                    };
                    (reachable != self.etcd_reachable).then(|| {
                        self.etcd_reachable = reachable;
                        Event::EtcdReachable { reachable }
                    })
                }
                Err(_) => {
                    self.lease_live = false;
                    None
                }
            },
            Some(req) = self.p.requests.recv() => Some(req.event(self.p.s.grace.as_millis() as u64)),
            Some(ev) = self.p.checkpointer.next_event() => self.checkpoint_event(ev),
            _ = tokio::time::sleep_until(timer) => Some(Event::Tick),
        }
    }

    /// The registration's watches closed while the node still counted on them: the
    /// Membership actor failed and its registration went with it. Register again (the
    /// node supervisor counts the actor's failures and gives up past its policy).
    fn member_gone(&mut self) -> Event {
        self.member_live = false;
        let reason = match self.member_state.borrow().clone() {
            MemberState::Lost { reason } => reason,
            _ => "the membership actor stopped".into(),
        };
        Event::MembershipLost { reason }
    }

    /// Keep what a finished piece of work brought; the event for the machine.
    async fn apply(&mut self, done: Done) -> Event {
        match done {
            Done::Event(e) => e,
            Done::State { state, hash, event } => {
                let served = matches!(event, Event::StateServed { .. });
                self.p.shared.view().note_state(state.step, &hash, served);
                self.state = Some(state);
                self.hash = hash;
                event
            }
            Done::Member(fresh) => {
                if let Err(e) = self.p.member.replace(fresh, self.p.node).await {
                    return Event::Fatal {
                        error: format!("registering again: {e}"),
                    };
                }
                self.plans = self.p.member.plan_receiver();
                self.member_state = self.p.member.state_receiver();
                self.lease_state = self.p.member.lease_state_receiver();
                self.lease_live = true;
                self.member_live = true;
                if let Some(p) = self.plans.borrow_and_update().clone() {
                    self.queue.push_back(Event::PlanSeen(p));
                }
                Event::Registered
            }
            Done::Comm { comm, peers, event } => {
                self.install(comm, peers);
                event
            }
            Done::Trainer(t, event) => {
                self.trainer = Some(Arc::new(t));
                event
            }
            Done::Step(mut info, event) => {
                if let Err(error) = self.guard_step(&mut info).await {
                    return Event::Fatal { error };
                }
                // The hash after this step comes later (`hashed`).
                self.hash = None;
                if let Some(params) = info.params.take() {
                    // On a loaded host hashing can fall behind the steps: wait for the
                    // oldest rather than hold an unbounded queue of parameter copies.
                    while self.hashing.len() >= HASHES_IN_FLIGHT {
                        if let Some(Ok((step, hash))) = self.hashing.next().await {
                            self.hashed(step, hash);
                        }
                    }
                    let step = self.machine.position().0 + 1;
                    self.hashing.push(tokio::task::spawn_blocking(move || {
                        (step, tenax_actors::param_hash(&params))
                    }));
                }
                let tokens_per_s = self.p.prep.tokens_per_step() / info.secs.max(1e-9);
                let (step, stats) = (self.machine.position().0 + 1, self.p.member.stats());
                let report = &info.report;
                (self.p.shared.view()).note_step(step, report, info.secs, tokens_per_s, stats);
                self.last_step = Some(info);
                event
            }
        }
    }

    /// A generation's communicator is built: keep it, and which member computes each
    /// slot.
    fn install(&mut self, comm: Arc<GrpcCollective>, peers: Vec<PeerAddr>) {
        #[cfg(feature = "chaos-hooks")]
        if let Some(step) = crate::hooks::step(crate::hooks::EXIT_IN_ALL_GATHER) {
            comm.exit_during_all_gather(step);
        }
        let spec = comm.spec();
        let plan = self.p.member.current_plan();
        let plan = plan.filter(|plan| plan.generation == spec.generation);
        let ids = peers.iter().map(|p| p.id.as_str());
        let ranks = match plan {
            // Stages on different members: a slot's loss comes from its pipeline's head
            // stage, so a late slot names that member (the stage it waits for may be
            // another member of the pipeline).
            Some(plan) if self.p.s.stages_across_nodes && plan.pp_depth > 1 => peers
                .iter()
                .map(|p| {
                    plan.ranks
                        .iter()
                        .filter(|a| a.member.as_str() == p.id && a.stage + 1 == plan.pp_depth)
                        .map(|a| a.dp_index)
                        .collect()
                })
                .collect(),
            Some(p) => p.ranks_of_each(ids),
            None => vec![Vec::new(); peers.len()],
        };
        self.slot_owner =
            tenax_core::slots::slot_owners(spec.num_slots, u64::from(spec.world), &ranks);
        self.peers = peers;
        self.comm = Some(comm);
    }

    /// The generation's communicator, if `generation` is its.
    fn comm_of(&self, generation: u64) -> Option<Arc<GrpcCollective>> {
        self.comm
            .clone()
            .filter(|c| c.spec().generation == generation)
    }

    /// Carry out one effect: work that waits starts in the background
    /// ([`Shell::start_work`]); the rest is done here.
    async fn carry_out(&mut self, effect: Effect) {
        let Effect { action, reason } = effect;
        let me = self.me();
        match action {
            Action::NoteState {
                source,
                step,
                generation,
            } => {
                if let Some(log) = self.log.as_mut() {
                    log.state(source.as_str(), step, generation);
                }
            }
            Action::StopTrainer { .. } => self.stop_trainer().await,
            Action::ReportLate {
                generation,
                step,
                waited_ms,
            } => self.suspect_late(generation, step, waited_ms),
            Action::ReportFailedPeers { generation } => {
                let failed = self.comm_of(generation).map(|c| c.failed_peers());
                for (id, what) in failed.unwrap_or_default() {
                    self.suspect(generation, id, what);
                }
            }
            Action::Alarm {
                generation,
                step,
                states,
            } => {
                let odd: Vec<String> = states.iter().map(ToString::to_string).collect();
                eprintln!(
                    "ALARM: node {me}: generation {generation}: parameters differ between members after step {step} ({}): resyncing the odd ones from a peer",
                    odd.join(", ")
                );
                self.p.shared.view().hash_mismatches += 1;
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
                share,
            } => self.save(generation, step, cursor, share).await,
            Action::WriteRecord(rec) => {
                let prefix = super::job_store_url(&self.p.s.store_root, &self.p.s.job);
                let event =
                    work::write_record(&self.p.member, &self.p.etcd, &prefix, rec, &self.p.shared)
                        .await;
                self.queue.push_back(event);
            }
            Action::DropTrainer { .. } => {
                if let Some(t) = self.trainer.take() {
                    t.stop();
                }
            }
            Action::Leave => {
                self.member_live = false;
                let left = tokio::time::timeout(LEAVE_TIMEOUT, self.p.member.leave()).await;
                if !matches!(left, Ok(Ok(()))) {
                    eprintln!("warning: node {me}: leaving the job did not finish cleanly: its lease expires after its TTL");
                }
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
            Action::Say(text) => match text.strip_prefix("warning: ") {
                Some(warning) => eprintln!("warning: node {me}: {warning}"),
                None => println!("node {me}: {text}"),
            },
            Action::Plot => {
                let title = format!("tenax job {} ({})", self.p.s.job, self.p.prep.cfg.preset);
                if let Some(log) = self.log.as_ref() {
                    log.plot(&title);
                }
            }
            Action::Exit(how) => self.exit = Some((how, reason)),
            other => self.start_work(other, &reason),
        }
    }

    /// Start the work an effect asks for; it comes back through `work` as a [`Done`].
    fn start_work(&mut self, action: Action, reason: &str) {
        let me = self.me();
        let (etcd, timeout) = (self.p.etcd.clone(), self.p.s.step_timeout);
        let f: BoxFuture<'a, Done> = match action {
            Action::Register => {
                println!("node {me}: registering again ({reason})");
                Box::pin(work::register(
                    etcd,
                    self.p.join.clone(),
                    self.p.s.tls.clone(),
                ))
            }
            Action::CheckJobDone => Box::pin(work::job_record(etcd)),
            Action::BuildCommunicator { plan } => return self.build(plan, reason),
            Action::ExchangeState {
                generation,
                round,
                step,
                holds_state,
            } => {
                let hash = match holds_state {
                    true => self.state_hash(),
                    false => String::new(),
                };
                let Some(comm) = self.comm_of(generation) else {
                    return;
                };
                Box::pin(work::compare(comm, round, step, hash, timeout))
            }
            Action::CompareHashes { generation, step } => {
                let hash = self.log.as_ref().and_then(|l| l.hash_of(step)).cloned();
                let (Some(hash), Some(comm)) = (hash, self.comm_of(generation)) else {
                    // The hash is still being taken: compare once it is in.
                    self.compare_after_hash = Some((generation, step));
                    return;
                };
                let trainer = self.trainer.clone();
                Box::pin(work::compare_all(trainer, comm, step, hash, timeout))
            }
            Action::LoadCheckpoint { generation } => {
                println!("node {me}: generation {generation}: {reason}");
                let store = self.p.store.clone();
                Box::pin(work::load(etcd, store, self.p.prep, generation))
            }
            Action::FetchState {
                generation,
                donor,
                step,
                hash,
            } => return self.fetch(generation, donor, step, hash),
            Action::ServeState {
                generation,
                receivers,
            } => return self.serve(generation, receivers),
            Action::StartTrainer { generation, .. } => return self.start_trainer(generation),
            Action::RunStep {
                generation,
                step,
                cursor,
                ..
            } => {
                let Some(t) = self.trainer.clone() else {
                    return;
                };
                let lr = self.p.prep.schedule.lr_at(step);
                let limits = self.guard.limits();
                Box::pin(work::step(t, generation, step, cursor, lr, limits))
            }
            Action::Evaluate { generation, step } => {
                let Some(t) = self.trainer.clone() else {
                    return;
                };
                let windows = self.p.prep.val_windows.clone();
                Box::pin(work::evaluate(t, windows, generation, step))
            }
            Action::WaitForFinalRecord { step, .. } => {
                Box::pin(work::final_record(etcd, step, self.gen_cancel.clone()))
            }
            other => {
                eprintln!("warning: node {me}: effect {other:?} has no shell ({reason})");
                return;
            }
        };
        self.work.push(f);
    }

    /// Form a generation: its view, and its communicator (built in the background).
    fn build(&mut self, plan: Plan, reason: &str) {
        let me = self.me();
        self.gen_cancel.cancel();
        self.gen_cancel = CancellationToken::new();
        let local = plan.ranks_of(&MemberId::new(me.clone()));
        let leader = self.p.member.stats().leader;
        let reformed = self.formed > 0;
        (self.p.shared.view()).note_generation(&plan, &local, leader, reformed);
        self.formed += 1;
        println!("node {me}: {reason}");
        let (slots, params) = (
            self.p.prep.setup.batch.num_slots(),
            self.p.prep.param_layout.total,
        );
        let (job, reduction) = (&self.p.s.job, self.p.s.reduction);
        let spec = match self.stage_in(&plan) {
            Some((_, pipeline, layers)) => {
                let spec = CommSpec::for_generation(
                    job,
                    plan.generation,
                    vec![pipeline],
                    plan.dp_width,
                    slots,
                    params,
                    reduction,
                );
                let frames =
                    stage_frames_per_step(&self.p.prep.setup, plan.dp_width, spec.max_frame_floats);
                let part = tenax_actors::stage_part(&self.p.prep.setup.model, &layers, frames);
                CommSpec {
                    stage: Some(part),
                    ..spec
                }
            }
            None => CommSpec::for_generation(
                job,
                plan.generation,
                local,
                plan.world,
                slots,
                params,
                reduction,
            ),
        };
        self.gen_plan = Some(plan.clone());
        let (etcd, hub) = (self.p.etcd.clone(), self.p.shared.hub.clone());
        let f = work::build_comm(etcd, hub, plan, spec, me);
        self.work.push(Box::pin(f));
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

    fn fetch(&mut self, generation: u64, donor: usize, step: u64, hash: String) {
        let Some(peer) = self.peers.get(donor).cloned() else {
            self.queue.push_back(Event::Failed {
                generation,
                peers_may_have_failed: false,
                error: format!("no member {donor} in generation {generation}"),
            });
            return;
        };
        let m = &self.machine;
        let had = m.holds_state().then(|| m.position().0);
        let f = work::fetch(work::Fetch {
            hub: self.p.shared.hub.clone(),
            shared: self.p.shared.clone(),
            generation,
            me: self.me(),
            donor: peer,
            step,
            hash,
            timeout: self.p.s.step_timeout,
            had,
        });
        self.work.push(Box::pin(f));
    }

    fn serve(&mut self, generation: u64, receivers: Vec<usize>) {
        let hash = self.state_hash();
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            return;
        };
        let names: Vec<String> = receivers
            .iter()
            .filter_map(|&i| self.peers.get(i).map(|p| p.id.clone()))
            .collect();
        let hub = self.p.shared.hub.clone();
        let f = work::serve(comm, hub, state, hash, names, self.p.s.step_timeout);
        self.work.push(Box::pin(f));
    }

    fn start_trainer(&mut self, generation: u64) {
        let (Some(comm), Some(state)) = (self.comm_of(generation), self.state.take()) else {
            self.queue.push_back(Event::Fatal {
                error: format!("generation {generation}: no state or communicator to train with"),
            });
            return;
        };
        // The guard goes on from the state's guard state (every member's is the same: a
        // copy carries the donor's, a checkpoint the committer's).
        let mut state = state;
        let cfg = self.p.prep.cfg.guard();
        let rolls_back = cfg.enabled() && cfg.rollback_after > 0;
        self.guard_snapshot = None;
        self.guard = match state.guard.take() {
            Some(st) => {
                let (guard, holds) = Guard::resumed(cfg, st, state.step);
                if holds && rolls_back {
                    // The state this generation starts from is the snapshot's.
                    let snap = tenax_actors::Snapshot {
                        params: Arc::new(state.params.clone()),
                        opt: Arc::new(state.opt.clone()),
                    };
                    self.guard_snapshot = Some((state.step, snap));
                }
                guard
            }
            None => Guard::new(cfg),
        };
        #[cfg(feature = "chaos-hooks")]
        let state = match crate::hooks::flip_once(state, &self.me()) {
            (state, true) => {
                self.hash = None;
                state
            }
            (state, false) => state,
        };
        let (setup, data) = (self.p.prep.setup.clone(), self.p.prep.data.clone());
        let kind = match self.trainer_kind(generation) {
            Ok(k) => k,
            Err(error) => {
                self.queue.push_back(Event::Fatal { error });
                return;
            }
        };
        let f = work::start_trainer(comm, setup, data, state, kind, self.p.node);
        self.work.push(Box::pin(f));
    }

    /// With `--stages-across-nodes` and a plan of more than one stage: this node's
    /// stage, its pipeline and the stage's layers.
    fn stage_in(&self, plan: &Plan) -> Option<(u32, u32, StageLayers)> {
        if !self.p.s.stages_across_nodes || plan.pp_depth < 2 {
            return None;
        }
        let me = MemberId::new(self.me());
        let a = plan.ranks.iter().find(|a| a.member == me)?;
        let layers = split_blocks(self.p.prep.setup.model.n_layer as u32, plan.pp_depth)
            .ok()?
            .into_iter()
            .nth(a.stage as usize)?;
        let layers = StageLayers {
            stage: a.stage,
            blocks: layers,
            embeddings: a.stage == 0,
            head: a.stage + 1 == plan.pp_depth,
        };
        Some((a.stage, a.dp_index, layers))
    }

    /// What the trainer of `generation` runs: one stage of a pipeline on several
    /// members, whole pipelines here, or whole-model ranks.
    fn trainer_kind(&self, generation: u64) -> Result<TrainerKind, String> {
        let plan = self
            .gen_plan
            .as_ref()
            .filter(|p| p.generation == generation);
        let schedule = self.p.prep.pipeline.map(|p| p.schedule).unwrap_or_default();
        match plan.and_then(|p| self.stage_in(p).map(|s| (p, s))) {
            Some((plan, (stage, pipeline, _))) => {
                let stages = plan.pp_depth;
                let pipeline_members = (0..stages)
                    .map(|k| {
                        let rank = pipeline * stages + k;
                        let member = plan.member_of(rank).map(|m| m.as_str().to_string());
                        member
                            .and_then(|id| self.peers.iter().position(|p| p.id == id))
                            .ok_or_else(|| {
                                format!("generation {generation}: rank {rank} has no member among the peers")
                            })
                    })
                    .collect::<Result<Vec<usize>, String>>()?;
                println!(
                    "node {}: generation {generation}: runs stage {stage} of {stages} of pipeline {pipeline} (of {}); it keeps the whole model's state",
                    self.me(),
                    plan.dp_width
                );
                Ok(TrainerKind::Stage {
                    spec: PipelineSpec { stages, schedule },
                    stage,
                    pipeline_members,
                })
            }
            None if self.p.s.stages_across_nodes => Ok(TrainerKind::Whole),
            None => Ok(match self.p.prep.pipeline {
                Some(p) => TrainerKind::Pipelines(p),
                None => TrainerKind::Whole,
            }),
        }
    }

    /// The guard state that goes with the trainer's state (checkpoints, state copies):
    /// `None` while the guard is off, so a guard-off node writes what it wrote before.
    fn guard_state(&self) -> Option<GuardState> {
        self.guard.cfg.enabled().then(|| self.guard.state.clone())
    }

    /// The guard's part of a finished step: it takes the step's reduced loss and gradient
    /// norm in and must decide as the ranks did (they checked the same values against the
    /// same bounds); a flagged step goes to `flagged.jsonl` in the run dir. An error: the
    /// ranks and the guard disagree (the node stops).
    ///
    /// With `--guard-rollback-after`, a step the guard's cadence names is snapshot (the
    /// trainer's copy-on-write state), and a streak of flagged steps restores it: the
    /// trainer is started again from the snapshot in the same generation, on every member
    /// at the same step (they decide from the same reduced values); training goes on
    /// from the next batch, as in `tenax train`.
    async fn guard_step(&mut self, info: &mut StepInfo) -> Result<(), String> {
        if !self.guard.cfg.enabled() {
            return Ok(());
        }
        let (done, cursor) = self.machine.position();
        let (step, r) = (done + 1, &info.report);
        let verdict = self.guard.observe(step, r.loss, r.grad_norm, r.skipped);
        if r.guarded != (verdict != Verdict::Apply) {
            return Err(format!(
                "step {step}: the ranks and the training guard disagree on whether to skip ({} vs {verdict:?})",
                r.guarded
            ));
        }
        if verdict == Verdict::Apply {
            if self.guard.snapshot_due(step) {
                let t = self.trainer.clone().ok_or("no trainer to snapshot")?;
                let snap = t
                    .snapshot()
                    .await
                    .map_err(|e| format!("the guard's snapshot of step {step}: {e}"))?;
                self.guard_snapshot = Some((step, snap));
            }
            return Ok(());
        }
        let (prep, limits) = (self.p.prep, info.limits);
        let line = guard::flagged_line(prep, step, cursor, r.loss, r.grad_norm, limits, &verdict);
        guard::append_flagged(&self.p.run_dir.join(guard::FLAGGED_FILE), &line);
        println!("node {}: {}", self.me(), guard::say(&line));
        if let Verdict::Rollback { to_step, .. } = verdict {
            let params = self.roll_back(to_step).await?;
            // The step's hash is the restored state's.
            info.params = Some(params);
        }
        Ok(())
    }

    /// Start the trainer again, in the same generation, from the guard's snapshot of
    /// `to_step`; gives the restored parameters.
    async fn roll_back(&mut self, to_step: u64) -> Result<Arc<Vec<f32>>, String> {
        let snap = match &self.guard_snapshot {
            Some((s, snap)) if *s == to_step => snap.clone(),
            _ => {
                return Err(format!(
                    "guard: no snapshot of step {to_step} to roll back to"
                ))
            }
        };
        let generation = self.machine.generation().ok_or("guard: no generation")?;
        let comm = self
            .comm_of(generation)
            .ok_or("guard: no communicator to roll back in")?;
        let kind = self.trainer_kind(generation)?;
        if let Some(old) = self.trainer.take() {
            Trainer::release(old).await;
        }
        let (step, cursor) = self.machine.position();
        let state = Start {
            step,
            cursor,
            params: (*snap.params).clone(),
            opt: (*snap.opt).clone(),
            guard: None,
        };
        let (setup, data) = (self.p.prep.setup.clone(), self.p.prep.data.clone());
        match work::start_trainer(comm, setup, data, state, kind, self.p.node).await {
            Done::Trainer(t, _) => {
                self.trainer = Some(Arc::new(t));
                self.hash = None;
                Ok(snap.params)
            }
            Done::Event(Event::Fatal { error }) => Err(format!("guard rollback: {error}")),
            _ => Err("guard rollback: the trainer did not start".into()),
        }
    }

    /// Take the trainer's state back (the last completed step) and stop it.
    async fn stop_trainer(&mut self) {
        let Some(trainer) = self.trainer.take() else {
            return;
        };
        let (step, cursor) = self.machine.position();
        let snap = trainer.snapshot().await;
        Trainer::release(trainer).await;
        match snap {
            Ok(snap) => {
                self.state = Some(Start {
                    step,
                    cursor,
                    // The ranks are gone: the buffers are no longer shared.
                    params: Arc::unwrap_or_clone(snap.params),
                    opt: Arc::unwrap_or_clone(snap.opt),
                    guard: self.guard_state(),
                })
            }
            Err(e) => self.queue.push_back(Event::Fatal {
                error: format!("cannot read its state after step {step}: {e}"),
            }),
        }
    }

    /// Step `step + 1` is past its deadline: report the members it waits for.
    fn suspect_late(&self, generation: u64, step: u64, waited_ms: u64) {
        let Some(comm) = self.comm_of(generation) else {
            return;
        };
        let late = match self.p.s.stages_across_nodes {
            false => comm.late_members(step, &self.slot_owner),
            true => self.late_pipelines(&comm, step),
        };
        for id in late {
            let me = self.me();
            eprintln!("warning: node {me}: step {} waits for {id} after {waited_ms} ms: reporting it as a suspect", step + 1);
            let why = format!("step {} still waits for it after {waited_ms} ms", step + 1);
            self.suspect(generation, id, why);
        }
    }

    /// With stages on different members a late slot names its pipeline's head stage
    /// (whose loss comes last), but any stage of that pipeline may be the one that
    /// hangs, this node's own pipeline included: the members of the pipelines of the late
    /// slots (this one left out), each once. The leader's probe then tells the hung one
    /// (no answer) from the ones waiting on it.
    fn late_pipelines(&self, comm: &GrpcCollective, step: u64) -> Vec<String> {
        let Some(plan) = self.gen_plan.as_ref() else {
            return Vec::new();
        };
        let me = self.me();
        let pipelines: Vec<u32> = match comm.progress(step) {
            Some((losses, chunks)) => {
                let late =
                    tenax_core::detector::late_members(&self.slot_owner, &losses, Some(&chunks));
                let members = &comm.spec().members;
                let late: Vec<&str> = late
                    .iter()
                    .filter_map(|&k| members.get(k).map(|m| m.id.as_str()))
                    .collect();
                plan.ranks
                    .iter()
                    .filter(|a| late.contains(&a.member.as_str()))
                    .map(|a| a.dp_index)
                    .collect()
            }
            // Nothing of the step reached the communicator here: this stage still waits
            // for its neighbours' messages, so its own pipeline is late.
            None => plan
                .ranks
                .iter()
                .filter(|a| a.member.as_str() == me)
                .map(|a| a.dp_index)
                .collect(),
        };
        let mut out: Vec<String> = Vec::new();
        for a in plan
            .ranks
            .iter()
            .filter(|a| pipelines.contains(&a.dp_index))
        {
            let id = a.member.as_str().to_string();
            if id != me && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// Report member `id` of `generation` as a suspect (the leader judges).
    fn suspect(&self, generation: u64, id: String, why: String) {
        self.p.shared.view().suspicions += 1;
        self.p.member.suspect(generation, MemberId::new(id), why);
    }

    /// Stop what the shell still runs: its work, the trainer, the communicator (aborted
    /// when `abort`: the node stops with an error and its peers must not wait for it).
    pub async fn stop(&mut self, abort: bool) {
        // The last steps' hashes, for their step-log lines.
        self.compare_after_hash = None;
        while let Ok(Some(Ok((step, hash)))) =
            tokio::time::timeout(Duration::from_secs(60), self.hashing.next()).await
        {
            self.hashed(step, hash);
        }
        self.gen_cancel.cancel();
        self.work = FuturesUnordered::new();
        if let Some(t) = self.trainer.take() {
            Trainer::release(t).await;
        }
        if let Some(c) = self.comm.take().filter(|_| abort) {
            c.abort("this node stops");
        }
    }

    /// Whether this node commits the generation's checkpoints (it hosts rank 0).
    pub fn is_committer(&self) -> bool {
        self.machine.is_committer()
    }

    /// The parameters of the node's state after its last step: the trainer's, else the
    /// state it holds.
    pub async fn params(&self) -> Option<Arc<Vec<f32>>> {
        if let Some(t) = &self.trainer {
            return t.snapshot().await.ok().map(|s| s.params);
        }
        self.state.as_ref().map(|s| Arc::new(s.params.clone()))
    }

    /// The step the node's state is at.
    pub fn step(&self) -> u64 {
        self.machine.position().0
    }
}

/// Most STAGE frames a stage sends any one member in a step: a pipeline's slots'
/// activations and input gradients (the first stage of two also sends the head its
/// embedding rows), each cut into frames of `max_frame_floats`, with room to spare.
fn stage_frames_per_step(
    setup: &tenax_actors::TrainSetup,
    pipelines: u32,
    max_frame_floats: usize,
) -> usize {
    let b = &setup.batch;
    let slots = tenax_core::slots::slots_for_rank(b.num_slots(), u64::from(pipelines.max(1)), 0);
    let slots = (slots.end - slots.start) as usize;
    let values = b.micro_batch_size as usize * setup.model.block_size * setup.model.n_embd;
    let per_message = values.div_ceil(max_frame_floats.max(1)).max(1);
    2 * slots * per_message + 8
}

//! The node's shell: it carries out the effects of the node's state machine
//! ([`NodeMachine`], core) and feeds their outcomes back as events. It decides nothing.
//!
//! One loop waits for the next input (a plan, a lost membership, an operator request, a
//! checkpoint actor event, the outcome of work in flight, the machine's timer), hands it
//! to the machine, and carries out the effects in order. Work that waits on peers, etcd,
//! the store or the trainer runs as a future (`work.rs`) and comes back as a [`Done`];
//! short, bounded work (a snapshot for a save, a record write bounded by 300 ms, a log
//! line) is done in place.
//!
//! This file holds the loop and what it keeps; the effects are carried out in
//! `shell/effects.rs`, generations formed and the state moved in `shell/generation.rs`,
//! the training guard kept in `shell/guarding.rs`, late and failed peers reported in
//! `shell/suspects.rs`, and step-log lines, hashes and checkpoints in `shell/saving.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tenax_actors::{Checkpointer, Membership, NodeSupervisor, Trainer};
use tenax_cluster::etcd::EtcdMembership;
use tenax_cluster::etcd::LeaseState;
use tenax_cluster::member::{MemberConfig, MemberState};
use tenax_cluster::peer::{GrpcCollective, PeerAddr};
use tenax_cluster::Collective;
use tenax_core::membership::Plan;
use tenax_core::node::{Event, Exit, NodeMachine, HASHES_IN_FLIGHT};
use tenax_storage::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod effects;
mod generation;
mod guarding;
mod saving;
mod suspects;

use super::steplog::StepLog;
use super::view::Request;
use super::work::{Done, StepInfo};
use super::{Settings, Shared};
use crate::train::{Prepared, Start};
use tenax_core::guard::Guard;

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

    /// The node's member id.
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

    /// The generation's communicator, if `generation` is its.
    fn comm_of(&self, generation: u64) -> Option<Arc<GrpcCollective>> {
        self.comm
            .clone()
            .filter(|c| c.spec().generation == generation)
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

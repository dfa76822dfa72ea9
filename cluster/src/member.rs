//! The membership agent of one node: [`Member`] glues the etcd driver ([`crate::etcd`])
//! to the pure planner ([`tenax_core::membership::Planner`]).
//!
//! What a member does, from [`Member::start`] to [`Member::shutdown`]:
//!
//! - Registers `/tenax/<job>/members/<id>` under its own lease, the value its
//!   [`MemberInfo`] as JSON with `joined_gen` = the generation stored at registration.
//!   The generation is read before and after the registration; if it changed meanwhile,
//!   `joined_gen` may be too low (the planner would believe the member holds state of a
//!   plan made without it), so that registration is stale: its lease is released
//!   (revoked) and the member registers again, at most [`REGISTER_ATTEMPTS`] times.
//!   A failed registration releases its lease too (the driver revokes it).
//! - Watches the plan: every member exposes the newest plan it observed
//!   ([`Member::current_plan`], [`Member::plan_receiver`]) and commits in that
//!   generation ([`Member::fenced_commit`]); etcd's txn is the fence, never local state.
//! - Watches its own member key. If the key is deleted or moved to another lease (the
//!   same id registered elsewhere, a stale put, a hand edit) while its lease lives, the
//!   member does NOT register again: it releases its lease, reports
//!   [`MemberState::Lost`] and stops. Releasing matters: a lease without its member key
//!   could keep this node's election key, so it would lead while every plan write it
//!   makes fails the fence. Rejoining is a new [`Member`], whose new `joined_gen` tells
//!   the planner it holds no state.
//! - A lost lease (the keep-alive task finds it gone) is the same: [`MemberState::Lost`],
//!   and the member stops.
//! - Campaigns for leadership in the background (etcd election, the key under the
//!   member's lease, so leadership ends with the lease). The leader watches every member
//!   key and runs the [`Planner`]: registrations are `MemberJoined`, deletions
//!   `LeaseExpired` (member keys only disappear with their lease, or by hand),
//!   `ArmSettleTimer` becomes a tokio timer that feeds `SettleTimerFired`, `WritePlan`
//!   is [`EtcdMembership::write_plan`] (then `PlanCommitted` or `PlanWriteFailed`),
//!   `RevokeLease` is [`EtcdMembership::revoke_lease`].
//! - Fast failure detection ([`Member::start_detecting`] with a [`Detection`]): anyone
//!   who finds a peer late calls [`Member::suspect`] (non-blocking). The leader feeds its
//!   own suspicions straight to its planner as `Suspected`; a follower puts a report at
//!   `/tenax/<job>/suspects/<suspect>/<reporter>` under its own lease
//!   ([`EtcdMembership::report_suspect`]; at most one per suspect every
//!   [`REPORT_INTERVAL`]), which the leader hears through the suspects watch it opens
//!   with leadership ([`EtcdMembership::watch_suspects`]; reports stored before are
//!   ignored). The planner's confirmation rule decides: a second distinct reporter
//!   confirms; a first report makes it ask for a `Probe`, which the agent runs with the
//!   injected [`Prober`] (bounded by [`Detection::probe_timeout`], a timeout is dead)
//!   and answers with `ProbeResult`; a dead probe confirms, a live one clears. Confirmed
//!   means `RevokeLease`: the member key goes at once, well before its TTL, and the
//!   member watch turns it into `LeaseExpired` and a new plan. Without a prober, a
//!   `Probe` is logged and never answered: a suspicion with one reporter waits for a
//!   second reporter or expires, so one reporter alone evicts nobody.
//!
//! Shape: one task per member (the agent) owns the planner and every watch, and runs
//! one `select!` loop; calls that may wait (campaign, plan write, revocation, suspicion
//! report, probe) run as jobs in a [`JoinSet`] that the agent owns, and their results
//! come back into the loop. Every etcd call has the driver's timeout and bounded
//! retries, every probe [`Detection::probe_timeout`]; every loop ends on
//! [`Member::shutdown`] (a cancellation token) or when the member is lost. Dropping a
//! [`Member`] aborts the agent, which drops its jobs and watches (aborting them) and the
//! registration (its lease then expires after its TTL).
//!
//! In steady state a member writes nothing to etcd: lease keep-alives (refreshes, no
//! revision), open watches, and one re-campaign per follower every [`CAMPAIGN_WAIT`].
//! Suspicion reports are written only when something is suspected.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::FutureExt;
use tenax_core::membership::{Effect, Event, MemberId, MemberInfo, Plan, Planner, PlannerConfig};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::etcd::{
    EtcdConfig, EtcdError, EtcdMembership, FenceOutcome, FenceRefusal, Leadership, LeaseState,
    Member as EtcdMember, MemberEvent, MemberWatch, PlanUpdate, PlanWatch, Registration,
    SuspectEvent, SuspectWatch, WriteOutcome, Writer,
};
use crate::records;

/// How many times [`Member::start`] registers when the generation keeps changing
/// during registration.
pub const REGISTER_ATTEMPTS: u32 = 3;

/// How long one campaign waits before it is withdrawn and made again. Long, because
/// each new campaign writes a candidate key; the wait is cancelled on shutdown.
pub const CAMPAIGN_WAIT: Duration = Duration::from_secs(600);

/// The first pause after a failed campaign; doubled per failure up to
/// [`CAMPAIGN_BACKOFF_MAX`].
const CAMPAIGN_BACKOFF: Duration = Duration::from_millis(200);

/// The longest pause between two failed campaigns. Short: after an etcd outage the
/// first campaign often fails on the old connection, and the survivors wait only 6 s for
/// the next plan (the 1-hour soak found a 5 s cap leaving them without a leader in time).
/// One campaign a second is one etcd request a second.
const CAMPAIGN_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The default of [`Detection::probe_timeout`].
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A member reports the same suspect at most once per this interval (later
/// [`Member::suspect`] calls about it are dropped until it has passed).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How many [`Member::suspect`] calls may wait for the agent; more are dropped (with a
/// warning).
pub const SUSPECT_QUEUE: usize = 64;

/// How many suspects a member remembers having reported (for [`REPORT_INTERVAL`]); the
/// oldest is forgotten first.
const MAX_REPORTED: usize = 1024;

/// Asks a member whether it is alive (e.g. a gRPC Status call to its `addr`); `true` if
/// it answered. The agent bounds every probe by [`Detection::probe_timeout`] (a timeout
/// is `false`).
pub type Prober = Arc<dyn Fn(MemberInfo) -> BoxFuture<'static, bool> + Send + Sync>;

/// Failure-detection settings of a [`Member`] ([`Member::start_detecting`]). The default
/// has no prober: a leader's `Probe` is then logged and never answered.
#[derive(Clone)]
pub struct Detection {
    /// How the leader probes a suspect; `None`: probes are not sent.
    pub prober: Option<Prober>,
    /// The longest a probe may take before it counts as dead (above zero). Default
    /// [`DEFAULT_PROBE_TIMEOUT`].
    pub probe_timeout: Duration,
}

impl Default for Detection {
    fn default() -> Self {
        Detection {
            prober: None,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }
}

impl fmt::Debug for Detection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Detection")
            .field("prober", &self.prober.as_ref().map_or("none", |_| "set"))
            .field("probe_timeout", &self.probe_timeout)
            .finish()
    }
}

/// Counters of one member's failure detection, shared by the agent and the handle.
#[derive(Debug, Default)]
struct Counters {
    /// Probes the agent started.
    probes_sent: AtomicU64,
    /// Leases revoked (that still existed) as leader.
    revocations: AtomicU64,
    /// Suspicions reported: fed to the own planner as leader, or written to etcd.
    suspicions_reported: AtomicU64,
    /// Probe results fed to the planner (counted once it has decided on them).
    probe_results: AtomicU64,
    /// Followers' reports fed to the planner as leader (counted once it has decided).
    reports_heard: AtomicU64,
    /// [`Member::suspect`] calls dropped as repeats within [`REPORT_INTERVAL`].
    repeats_dropped: AtomicU64,
}

/// Settings of one [`Member`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberConfig {
    /// The etcd endpoints, job and timing (the lease TTL among them).
    pub etcd: EtcdConfig,
    /// The planner's limits and timing (the same on every member of a job).
    pub planner: PlannerConfig,
    /// The member id: one key segment, unique in the job.
    pub id: String,
    /// How many ranks this node can host (at least 1).
    pub devices: u32,
    /// Where this node's gRPC services listen (`host:port`), registered for its peers and
    /// for `tenax status`; may be empty.
    pub addr: String,
    /// Where this node's `/metrics` endpoint listens (`host:port`); may be empty.
    pub metrics_addr: String,
}

/// Where a [`Member`] stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Registered: following, or leading ([`Member::is_leader`]).
    Active,
    /// The registration is gone: the lease expired or was revoked, the member key was
    /// deleted or moved to another lease, or a watch gave up. The member released its
    /// lease and stopped; start a new [`Member`] to rejoin.
    Lost {
        /// What happened, for logs.
        reason: String,
    },
    /// [`Member::shutdown`] ran: the member left the job.
    Stopped,
}

/// What went wrong starting or using a [`Member`].
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// A setting of [`MemberConfig`] is out of range.
    #[error("invalid member configuration: {detail}")]
    InvalidConfig {
        /// Which setting, and what is allowed.
        detail: String,
    },
    /// An etcd call failed (it names the endpoints and the key).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Every registration attempt saw the generation change while it registered.
    #[error(
        "member {member_id}: the plan's generation changed during each of {attempts} \
         registrations (the group keeps re-forming); start the member again later"
    )]
    RegistrationRaced {
        /// The member id.
        member_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The member is not in the plan it observed, so it has nothing to commit in it.
    #[error(
        "member {member_id} is not a member of generation {generation}, the newest plan it \
         observed: only members of a generation commit in it; wait for a plan that admits it"
    )]
    NotInPlan {
        /// The member id.
        member_id: String,
        /// The generation observed.
        generation: u64,
    },
}

/// The agent of one node in the job. See the module docs.
#[derive(Debug)]
pub struct Member {
    /// What this member registered.
    info: MemberInfo,
    /// The driver (clones share its connection and request counter).
    etcd: EtcdMembership,
    /// Member id and lease: the identity of fenced writes.
    writer: Writer,
    /// The registration (its lease keep-alive); taken by whoever releases it.
    registration: Arc<Mutex<Option<Registration>>>,
    /// The newest plan observed.
    plan_rx: watch::Receiver<Option<Plan>>,
    /// The member's state.
    state_tx: Arc<watch::Sender<MemberState>>,
    /// A receiver kept so that the state can always be read.
    state_rx: watch::Receiver<MemberState>,
    /// Whether this member leads (its planner believes so).
    leader_rx: watch::Receiver<bool>,
    /// The lease keep-alive's view (whether etcd answers).
    lease_state_rx: watch::Receiver<LeaseState>,
    /// Ends the agent's loop.
    cancel: CancellationToken,
    /// The agent task; aborted on drop.
    agent: Option<JoinHandle<()>>,
    /// Suspicions for the agent ([`Member::suspect`]).
    suspect_tx: mpsc::Sender<(MemberId, String)>,
    /// This node's checkpoint record etcd has not taken, for the agent's planner
    /// ([`Member::set_record_pending`]).
    record_tx: watch::Sender<Option<u64>>,
    /// Failure-detection counters.
    counters: Arc<Counters>,
}

impl Member {
    /// Connects to etcd with `config.etcd`, then as [`Member::start_with`].
    ///
    /// # Errors
    /// As [`EtcdMembership::connect`] and [`Member::start_with`].
    pub async fn start(config: MemberConfig) -> Result<Member, MemberError> {
        let etcd = EtcdMembership::connect(config.etcd.clone()).await?;
        Member::start_with(etcd, config).await
    }

    /// Starts a member on an existing connection (whose settings must be
    /// `config.etcd`): registers (see the module docs for the stale-registration rule),
    /// opens the plan watch and the watch of its own key, and starts the agent, which
    /// campaigns for leadership. Returns once registered. Failure detection runs with
    /// [`Detection::default`] (no prober); see [`Member::start_detecting`].
    ///
    /// # Errors
    /// [`MemberError::InvalidConfig`] for a bad setting or a connection made with other
    /// settings; [`MemberError::RegistrationRaced`]; the driver's errors.
    pub async fn start_with(
        etcd: EtcdMembership,
        config: MemberConfig,
    ) -> Result<Member, MemberError> {
        Member::start_detecting(etcd, config, Detection::default()).await
    }

    /// As [`Member::start_with`], with the failure-detection settings `detection`: the
    /// prober the agent runs when, as leader, its planner asks to probe a suspect.
    ///
    /// # Errors
    /// As [`Member::start_with`]; [`MemberError::InvalidConfig`] for a zero
    /// [`Detection::probe_timeout`].
    pub async fn start_detecting(
        etcd: EtcdMembership,
        config: MemberConfig,
        detection: Detection,
    ) -> Result<Member, MemberError> {
        if detection.probe_timeout.is_zero() {
            return Err(MemberError::InvalidConfig {
                detail: "detection.probe_timeout is zero; give a probe at least a few \
                         milliseconds (default 1500 ms)"
                    .into(),
            });
        }
        let MemberConfig {
            etcd: etcd_config,
            planner,
            id,
            devices,
            addr,
            metrics_addr,
        } = config;
        if *etcd.config() != etcd_config {
            return Err(MemberError::InvalidConfig {
                detail: format!(
                    "the connection was made with other etcd settings than config.etcd \
                     (job {:?} vs {:?}); pass the same EtcdConfig to both",
                    etcd.config().job,
                    etcd_config.job
                ),
            });
        }
        if devices == 0 {
            return Err(MemberError::InvalidConfig {
                detail: format!("member {id:?} has 0 devices; a member hosts at least one rank"),
            });
        }
        let planner = Planner::new(planner).map_err(|e| MemberError::InvalidConfig {
            detail: e.to_string(),
        })?;
        let (registration, info) = register(&etcd, &id, devices, &addr, &metrics_addr).await?;
        let writer = registration.writer();
        let lease_rx = registration.lease_state();
        let lease_state_rx = lease_rx.clone();
        let own_watch = etcd.watch_member(&id)?;
        let plan_watch = etcd.watch_plan().await;
        let registration = Arc::new(Mutex::new(Some(registration)));
        let (plan_tx, plan_rx) = watch::channel(None);
        let (state_tx, state_rx) = watch::channel(MemberState::Active);
        let state_tx = Arc::new(state_tx);
        let (leader_tx, leader_rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let (suspect_tx, suspect_rx) = mpsc::channel(SUSPECT_QUEUE);
        let (record_tx, record_rx) = watch::channel(None);
        let counters = Arc::new(Counters::default());
        let agent = Agent {
            etcd: etcd.clone(),
            writer: writer.clone(),
            planner,
            epoch: Instant::now(),
            registration: registration.clone(),
            lease_rx,
            plan_watch,
            own_watch,
            members_watch: None,
            suspects_watch: None,
            detection,
            counters: counters.clone(),
            suspect_rx,
            record_rx: Some(record_rx),
            reported: BTreeMap::new(),
            leases: BTreeMap::new(),
            leadership: None,
            campaign_failures: 0,
            jobs: JoinSet::new(),
            plan_tx,
            state_tx: state_tx.clone(),
            leader_tx,
            cancel: cancel.clone(),
        };
        tracing::info!(member = %id, lease = writer.lease, joined_gen = info.joined_gen, "member registered");
        let agent = tokio::spawn(agent.run());
        Ok(Member {
            info,
            etcd,
            writer,
            registration,
            plan_rx,
            state_tx,
            state_rx,
            leader_rx,
            lease_state_rx,
            cancel,
            agent: Some(agent),
            suspect_tx,
            record_tx,
            counters,
        })
    }

    /// Tells the agent's planner which generation this node's checkpoint record that
    /// etcd has not taken belongs to (`None`: none); the node machine's
    /// `pending_record_generation`, handed over after each of its steps. While it names
    /// the current generation, a leader holds the next plan (at most
    /// `tenax_core::membership::RECORD_HOLD_MAX_MS`): pending records of generation g
    /// are committed before the plan of g+1 is written. Cheap when unchanged.
    pub fn set_record_pending(&self, generation: Option<u64>) {
        self.record_tx.send_if_modified(|g| {
            let changed = *g != generation;
            *g = generation;
            changed
        });
    }

    /// Reports that `member` seems dead or hung (e.g. it missed a collective's deadline),
    /// without waiting: the suspicion is queued for the agent ([`SUSPECT_QUEUE`]; when
    /// full it is dropped with a warning). A leader feeds it to its planner; a follower
    /// writes it to etcd for the leader. The same suspect is reported at most once per
    /// [`REPORT_INTERVAL`] within a generation, and again as soon as a newer plan is seen
    /// (failing again after a re-formation is news); a report of oneself is ignored. One report evicts nobody: the
    /// leader's probe or a second reporter must confirm it (see the module docs).
    pub fn suspect(&self, member: MemberId, reason: String) {
        match self.suspect_tx.try_send((member, reason)) {
            Ok(()) => {}
            Err(TrySendError::Full((member, reason))) => {
                tracing::warn!(member = %self.info.id, target = %member, %reason, "suspicion dropped: {SUSPECT_QUEUE} suspicions already wait for the agent");
            }
            Err(TrySendError::Closed((member, _))) => {
                tracing::debug!(member = %self.info.id, target = %member, "suspicion dropped: the agent has ended");
            }
        }
    }

    /// Probes this member started as leader (for `/metrics`).
    pub fn probes_sent(&self) -> u64 {
        self.counters.probes_sent.load(Ordering::Relaxed)
    }

    /// Leases this member revoked as leader (confirmed failures evicted; a lease already
    /// gone is not counted).
    pub fn revocations(&self) -> u64 {
        self.counters.revocations.load(Ordering::Relaxed)
    }

    /// Suspicions this member reported: fed to its own planner as leader, or written to
    /// etcd as a follower (reports dropped by [`REPORT_INTERVAL`] or failed writes are
    /// not counted).
    pub fn suspicions_reported(&self) -> u64 {
        self.counters.suspicions_reported.load(Ordering::Relaxed)
    }

    /// Probe results this member's planner has decided on as leader (a probe that
    /// answered cleared its suspicion by then): what a test waits for before it checks
    /// that nothing came of a probe.
    pub fn probe_results(&self) -> u64 {
        self.counters.probe_results.load(Ordering::Relaxed)
    }

    /// Followers' suspicion reports this member's planner has decided on as leader
    /// (a revocation, if one was decided, was started by then).
    pub fn reports_heard(&self) -> u64 {
        self.counters.reports_heard.load(Ordering::Relaxed)
    }

    /// [`Member::suspect`] calls dropped because the same suspect was reported less than
    /// [`REPORT_INTERVAL`] before.
    pub fn repeats_dropped(&self) -> u64 {
        self.counters.repeats_dropped.load(Ordering::Relaxed)
    }

    /// The member id.
    pub fn id(&self) -> &MemberId {
        &self.info.id
    }

    /// What this member registered (its `joined_gen` among it).
    pub fn info(&self) -> &MemberInfo {
        &self.info
    }

    /// The identity of this member's fenced writes (id and lease).
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The driver this member uses (e.g. for its request counters).
    pub fn etcd(&self) -> &EtcdMembership {
        &self.etcd
    }

    /// The newest plan this member observed (a clone).
    pub fn current_plan(&self) -> Option<Plan> {
        self.plan_rx.borrow().clone()
    }

    /// The generation of the newest plan observed.
    pub fn generation(&self) -> Option<u64> {
        self.plan_rx.borrow().as_ref().map(|p| p.generation)
    }

    /// A receiver of the newest plan observed: `changed().await` wakes on every new one.
    pub fn plan_receiver(&self) -> watch::Receiver<Option<Plan>> {
        self.plan_rx.clone()
    }

    /// The member's state now.
    pub fn state(&self) -> MemberState {
        self.state_rx.borrow().clone()
    }

    /// A receiver of the member's state.
    pub fn state_receiver(&self) -> watch::Receiver<MemberState> {
        self.state_rx.clone()
    }

    /// The lease keep-alive's view: [`LeaseState::Unconfirmed`] while etcd does not
    /// answer its refreshes, [`LeaseState::Alive`] once it does.
    pub fn lease_state_receiver(&self) -> watch::Receiver<LeaseState> {
        self.lease_state_rx.clone()
    }

    /// Whether this member leads the job now.
    pub fn is_leader(&self) -> bool {
        *self.leader_rx.borrow()
    }

    /// A receiver of whether this member leads.
    pub fn leader_receiver(&self) -> watch::Receiver<bool> {
        self.leader_rx.clone()
    }

    /// Puts `value` at `/tenax/<job>/<key_suffix>` fenced on the generation of the newest
    /// plan this member observed and on its lease ([`EtcdMembership::fenced_put`]):
    /// etcd refuses it when that generation is no longer current or this member's key is
    /// gone or on another lease, whatever this member believes.
    ///
    /// # Errors
    /// [`MemberError::NotInPlan`] when the observed plan does not admit this member (no
    /// request is sent); the driver's errors. No plan observed yet is
    /// `Ok(Refused { NoPlan })`.
    pub async fn fenced_commit(
        &self,
        key_suffix: &str,
        value: &[u8],
    ) -> Result<FenceOutcome, MemberError> {
        let (generation, admitted) = match &*self.plan_rx.borrow() {
            None => {
                return Ok(FenceOutcome::Refused {
                    reason: FenceRefusal::NoPlan,
                })
            }
            Some(p) => (p.generation, p.contains(&self.info.id)),
        };
        if !admitted {
            return Err(MemberError::NotInPlan {
                member_id: self.info.id.to_string(),
                generation,
            });
        }
        self.fenced_commit_in(generation, key_suffix, value).await
    }

    /// As [`Member::fenced_commit`], fenced on `generation` instead of the newest plan
    /// observed: for a record of something made in that generation (a checkpoint saved
    /// then), which must not be accepted once a newer generation is current.
    ///
    /// # Errors
    /// The driver's errors.
    pub async fn fenced_commit_in(
        &self,
        generation: u64,
        key_suffix: &str,
        value: &[u8],
    ) -> Result<FenceOutcome, MemberError> {
        Ok(self
            .etcd
            .fenced_put(key_suffix, value, generation, &self.writer)
            .await?)
    }

    /// Test and chaos hook: stops sending keep-alives, as if the node hung or was cut
    /// off; the lease expires after its TTL and the member finds itself lost.
    pub fn pause_keepalive(&self) {
        if let Some(reg) = lock(&self.registration).as_ref() {
            reg.pause_keepalive();
        }
    }

    /// Leaves the job but keeps the handle (a node that registers again later replaces
    /// it): as [`Member::shutdown`].
    ///
    /// # Errors
    /// The revocation's errors (the lease then expires after its TTL anyway).
    pub async fn leave(&mut self) -> Result<(), MemberError> {
        self.cancel.cancel();
        if let Some(agent) = self.agent.take() {
            if let Err(e) = agent.await {
                tracing::warn!(member = %self.info.id, error = %e, "member agent ended abnormally");
            }
        }
        let registration = lock(&self.registration).take();
        match registration {
            Some(reg) => reg.revoke().await.map_err(MemberError::from),
            None => Ok(()),
        }
    }

    /// Leaves the job: ends the agent (its jobs and watches), then revokes the lease,
    /// which deletes the member key and, for a leader, the election key at once. The
    /// state becomes [`MemberState::Stopped`] (a lost member stays
    /// [`MemberState::Lost`]).
    ///
    /// # Errors
    /// The revocation's errors (the lease then expires after its TTL anyway).
    pub async fn shutdown(mut self) -> Result<(), MemberError> {
        self.cancel.cancel();
        if let Some(agent) = self.agent.take() {
            if let Err(e) = agent.await {
                tracing::warn!(member = %self.info.id, error = %e, "member agent ended abnormally");
            }
        }
        let registration = lock(&self.registration).take();
        let result = match registration {
            Some(reg) => reg.revoke().await.map_err(MemberError::from),
            None => Ok(()),
        };
        self.state_tx.send_if_modified(|s| {
            if matches!(s, MemberState::Active) {
                *s = MemberState::Stopped;
                true
            } else {
                false
            }
        });
        result
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(agent) = self.agent.take() {
            agent.abort();
        }
    }
}

/// Locks a mutex, recovering from poisoning (the data is an `Option` taken whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The generation stored now (0: no plan).
async fn stored_generation(etcd: &EtcdMembership) -> Result<u64, EtcdError> {
    Ok(etcd.read_plan().await?.map_or(0, |r| r.generation))
}

/// Registers `id` with `joined_gen` = the generation stored before and after the
/// registration; a registration during which it changed is released and made again.
async fn register(
    etcd: &EtcdMembership,
    id: &str,
    devices: u32,
    addr: &str,
    metrics_addr: &str,
) -> Result<(Registration, MemberInfo), MemberError> {
    for attempt in 1..=REGISTER_ATTEMPTS {
        let before = stored_generation(etcd).await?;
        let info = MemberInfo {
            id: MemberId::new(id),
            devices,
            joined_gen: before,
            addr: addr.to_string(),
            metrics_addr: metrics_addr.to_string(),
        };
        let registration = etcd
            .register(id, &records::encode_member_info(&info))
            .await?;
        match stored_generation(etcd).await {
            Ok(after) if after == before => return Ok((registration, info)),
            Ok(after) => {
                tracing::info!(
                    member = id,
                    attempt,
                    before,
                    after,
                    "the generation changed during registration: releasing it and registering again"
                );
                if let Err(e) = registration.revoke().await {
                    tracing::warn!(member = id, error = %e, "releasing a stale registration failed; its lease expires after its TTL");
                }
            }
            Err(e) => {
                if let Err(r) = registration.revoke().await {
                    tracing::warn!(member = id, error = %r, "releasing a registration failed; its lease expires after its TTL");
                }
                return Err(e.into());
            }
        }
    }
    Err(MemberError::RegistrationRaced {
        member_id: id.to_string(),
        attempts: REGISTER_ATTEMPTS,
    })
}

/// Leadership won, with what the new leader needs to start planning.
struct Won {
    /// The election key.
    leadership: Leadership,
    /// The watch of every member key, its snapshot already taken.
    watch: MemberWatch,
    /// The watch of suspicion reports, synced.
    suspects: SuspectWatch,
    /// The registered members when leadership began.
    snapshot: Vec<EtcdMember>,
    /// The plan stored when leadership began (already decoded).
    current: Option<Plan>,
}

/// How a campaign job ended.
enum CampaignEnd {
    /// This member leads.
    Won(Box<Won>),
    /// Not leader within [`CAMPAIGN_WAIT`]: campaign again.
    NotYet,
    /// The member's lease or key is gone.
    LeaseLost(String),
    /// etcd did not answer, or answered something unusable: retry after a pause.
    Failed(String),
}

/// The result of a job of the agent.
enum Job {
    /// A campaign (and, when won, the start of leadership).
    Campaign(CampaignEnd),
    /// A plan write.
    Write {
        /// The plan written.
        plan: Plan,
        /// What etcd said.
        result: Result<WriteOutcome, EtcdError>,
    },
    /// A lease revocation asked for by the planner.
    Revoke {
        /// The member evicted.
        member: MemberId,
        /// Its lease.
        lease: i64,
        /// Whether the lease still existed.
        result: Result<bool, EtcdError>,
    },
    /// A probe asked for by the planner.
    Probe {
        /// The member probed.
        member: MemberId,
        /// Whether it answered in time; `None`: the prober panicked (not fed back).
        alive: Option<bool>,
    },
    /// A follower's suspicion report written to etcd.
    Report {
        /// The member suspected.
        suspect: MemberId,
        /// The revision of the put.
        result: Result<i64, EtcdError>,
    },
    /// A follower's check of a suspect that may be the leader.
    LeaderCheck {
        /// The member suspected.
        suspect: MemberId,
        /// What the check found or did, for the log.
        outcome: LeaderCheck,
    },
}

/// What a follower's check of a suspected leader found.
#[derive(Debug)]
enum LeaderCheck {
    /// The suspect does not lead (its report reaches the leader through etcd).
    NotLeader,
    /// It leads and answered the probe: nothing is done.
    Answered,
    /// It leads, did not answer the probe, and its lease was revoked (`true` if it still
    /// existed).
    Revoked(Result<bool, EtcdError>),
    /// The check could not be made (etcd, no registration, no prober).
    Skipped(String),
}

/// The task of one member: owns the planner and the watches; see the module docs.
struct Agent {
    /// The driver.
    etcd: EtcdMembership,
    /// This member's identity.
    writer: Writer,
    /// The planner (leader or follower).
    planner: Planner,
    /// Time zero of the planner's milliseconds.
    epoch: Instant,
    /// The registration, released when the member is lost.
    registration: Arc<Mutex<Option<Registration>>>,
    /// The keep-alive task's view of the lease.
    lease_rx: watch::Receiver<LeaseState>,
    /// The plan watch.
    plan_watch: PlanWatch,
    /// The watch of this member's own key.
    own_watch: MemberWatch,
    /// The watch of every member key, while leader.
    members_watch: Option<MemberWatch>,
    /// The watch of suspicion reports, while leader.
    suspects_watch: Option<SuspectWatch>,
    /// The prober and its timeout.
    detection: Detection,
    /// Failure-detection counters, shared with the handle.
    counters: Arc<Counters>,
    /// Suspicions from [`Member::suspect`].
    suspect_rx: mpsc::Receiver<(MemberId, String)>,
    /// This node's pending checkpoint record ([`Member::set_record_pending`]); `None`
    /// once its sender is gone.
    record_rx: Option<watch::Receiver<Option<u64>>>,
    /// When each suspect was last reported (at most [`MAX_REPORTED`]).
    reported: BTreeMap<MemberId, Instant>,
    /// While leader: the lease of each registered member (for revocations).
    leases: BTreeMap<MemberId, i64>,
    /// The election key, while leader.
    leadership: Option<Leadership>,
    /// Failed campaigns in a row (for the backoff).
    campaign_failures: u32,
    /// Campaign, plan-write, revocation, probe and report jobs; aborted when the agent
    /// ends.
    jobs: JoinSet<Job>,
    /// The newest plan observed.
    plan_tx: watch::Sender<Option<Plan>>,
    /// The member's state.
    state_tx: Arc<watch::Sender<MemberState>>,
    /// Whether this member leads.
    leader_tx: watch::Sender<bool>,
    /// Set by shutdown.
    cancel: CancellationToken,
}

/// The next event of an optional watch; pending forever without one.
async fn next_member_event(watch: &mut Option<MemberWatch>) -> Option<MemberEvent> {
    match watch {
        Some(w) => w.recv().await,
        None => std::future::pending().await,
    }
}

/// The next event of the optional suspects watch; pending forever without one.
async fn next_suspect_event(watch: &mut Option<SuspectWatch>) -> Option<SuspectEvent> {
    match watch {
        Some(w) => w.recv().await,
        None => std::future::pending().await,
    }
}

/// The next value of the pending-record channel (`None`: its sender is gone).
async fn next_record_change(rx: &mut Option<watch::Receiver<Option<u64>>>) -> Option<Option<u64>> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Agent {
    /// The agent's loop: runs until shutdown or until the member is lost.
    async fn run(mut self) {
        self.spawn_campaign(Duration::ZERO);
        let lost = loop {
            let settle = self
                .planner
                .settle_deadline_ms()
                .map(|ms| self.epoch + Duration::from_millis(ms));
            let step = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break None,
                changed = self.lease_rx.changed() => match changed {
                    Err(_) => Err("the lease keep-alive task is gone".to_string()),
                    Ok(()) => self.on_lease_state(),
                },
                event = self.own_watch.recv() => self.on_own_key(event),
                update = self.plan_watch.recv() => self.on_plan_update(update),
                event = next_member_event(&mut self.members_watch),
                    if self.members_watch.is_some() => self.on_member_event(event),
                event = next_suspect_event(&mut self.suspects_watch),
                    if self.suspects_watch.is_some() => {
                    self.on_suspect_event(event);
                    Ok(())
                }
                Some((member, reason)) = self.suspect_rx.recv() => {
                    self.on_suspect_call(member, reason);
                    Ok(())
                }
                changed = next_record_change(&mut self.record_rx), if self.record_rx.is_some() => {
                    match changed {
                        Some(generation) => self.feed(Event::RecordPending { generation }),
                        None => self.record_rx = None,
                    }
                    Ok(())
                }
                done = self.jobs.join_next(), if !self.jobs.is_empty() => match done {
                    Some(Ok(job)) => self.on_job(job),
                    Some(Err(e)) if e.is_cancelled() => Ok(()),
                    Some(Err(e)) => Err(format!("a member job failed: {e}")),
                    None => Ok(()),
                },
                () = tokio::time::sleep_until(settle.unwrap_or_else(Instant::now)),
                    if settle.is_some() => {
                    self.feed(Event::SettleTimerFired);
                    Ok(())
                }
            };
            if let Err(reason) = step {
                break Some(reason);
            }
        };
        if let Some(reason) = lost {
            self.lose(reason).await;
        }
    }

    /// Milliseconds since the agent started: the planner's clock.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Feeds one event to the planner and executes its effects.
    fn feed(&mut self, event: Event) {
        let effects = self.planner.handle(event, self.now_ms());
        for effect in effects {
            self.execute(effect);
        }
    }

    fn execute(&mut self, effect: Effect) {
        let me = &self.writer.member_id;
        match effect {
            Effect::WritePlan {
                plan,
                expected_prev_generation,
            } => {
                tracing::info!(member = %me, generation = plan.generation, reason = %plan.reason, "writing a plan");
                let etcd = self.etcd.clone();
                let writer = self.writer.clone();
                let expected = (expected_prev_generation > 0).then_some(expected_prev_generation);
                self.jobs.spawn(async move {
                    let json = records::encode_plan(&plan);
                    let result = etcd
                        .write_plan(expected, plan.generation, &json, &writer)
                        .await;
                    Job::Write { plan, result }
                });
            }
            Effect::RevokeLease { member, reason } => match self.leases.get(&member) {
                Some(&lease) => {
                    tracing::warn!(member = %me, target = %member, %reason, "revoking a member's lease");
                    let etcd = self.etcd.clone();
                    self.jobs.spawn(async move {
                        let result = etcd.revoke_lease(lease).await;
                        Job::Revoke {
                            member,
                            lease,
                            result,
                        }
                    });
                }
                None => {
                    tracing::info!(member = %me, target = %member, %reason, "revocation asked for a member with no known lease: nothing to revoke")
                }
            },
            Effect::Probe { member, reason } => {
                let Some(prober) = self.detection.prober.clone() else {
                    tracing::warn!(member = %me, target = %member, %reason, "probe not sent: no prober configured (the suspicion waits for a second reporter or expires)");
                    return;
                };
                let Some(info) = self
                    .planner
                    .known_members()
                    .find(|m| m.id == member)
                    .cloned()
                else {
                    tracing::info!(member = %me, target = %member, %reason, "probe asked for a member that is not registered: not sent");
                    return;
                };
                tracing::info!(member = %me, target = %member, addr = %info.addr, %reason, "probing a suspect");
                self.counters.probes_sent.fetch_add(1, Ordering::Relaxed);
                let limit = self.detection.probe_timeout;
                self.jobs.spawn(async move {
                    let alive = run_probe(prober, info, limit).await;
                    Job::Probe { member, alive }
                });
            }
            Effect::ArmSettleTimer { at_ms, reason } => {
                tracing::debug!(member = %me, at_ms, %reason, "settle timer");
            }
            Effect::Wait { reason } => tracing::debug!(member = %me, %reason, "planner waits"),
        }
    }

    /// Starts a campaign after `delay`; when won, it also opens the members watch, takes
    /// its snapshot and reads the stored plan, so that the planner starts with a view.
    fn spawn_campaign(&mut self, delay: Duration) {
        let etcd = self.etcd.clone();
        let writer = self.writer.clone();
        self.jobs.spawn(async move {
            tokio::time::sleep(delay).await;
            Job::Campaign(campaign(etcd, writer).await)
        });
    }

    fn on_lease_state(&mut self) -> Result<(), String> {
        let state = self.lease_rx.borrow_and_update().clone();
        match state {
            LeaseState::Lost { reason } => Err(reason),
            LeaseState::Unconfirmed { failed_refreshes } => {
                tracing::warn!(member = %self.writer.member_id, failed_refreshes, "lease refreshes get no answer");
                Ok(())
            }
            LeaseState::Alive | LeaseState::Stopped => Ok(()),
        }
    }

    /// This member's own key: deleted or moved to another lease means lost.
    fn on_own_key(&mut self, event: Option<MemberEvent>) -> Result<(), String> {
        let w = &self.writer;
        let moved = |lease: i64| {
            format!(
                "member key of {} moved from lease {:#x} to lease {lease:#x} (registered again \
                 elsewhere, or a stale registration)",
                w.member_id, w.lease
            )
        };
        match event {
            None => Err(format!(
                "the watch of member key {} ended: {:?}",
                w.member_id,
                self.own_watch.status()
            )),
            Some(MemberEvent::Snapshot { members, revision }) => {
                match members.iter().find(|m| m.id == w.member_id) {
                    None => Err(format!(
                        "member key of {} is gone (read at revision {revision})",
                        w.member_id
                    )),
                    Some(m) if m.lease != w.lease => Err(moved(m.lease)),
                    Some(_) => Ok(()),
                }
            }
            Some(MemberEvent::Put { member, .. }) if member.lease != w.lease => {
                Err(moved(member.lease))
            }
            Some(MemberEvent::Put { .. }) => Ok(()),
            Some(MemberEvent::Deleted { revision, .. }) => Err(format!(
                "member key of {} was deleted at revision {revision} (lease {:#x} revoked or \
                 expired)",
                w.member_id, w.lease
            )),
        }
    }

    /// Publishes `plan` if it is newer than the one observed.
    fn publish(&self, plan: &Plan) {
        self.plan_tx.send_if_modified(|cur| {
            if cur.as_ref().is_none_or(|c| c.generation < plan.generation) {
                *cur = Some(plan.clone());
                true
            } else {
                false
            }
        });
    }

    fn on_plan_update(&mut self, update: Option<PlanUpdate>) -> Result<(), String> {
        let Some(update) = update else {
            return Err(format!(
                "the plan watch ended: {:?}",
                self.plan_watch.status()
            ));
        };
        match records::decode_plan(update.generation, &update.plan) {
            Ok(plan) => {
                // A new generation starts with a clean slate: a member the plan left out
                // was dealt with, and one that was evicted and registered again before
                // the leader planned (so that no plan ever left it out) is news when it
                // fails again. Either is reported at once. (Found by the chaos harness's
                // partitions scenario: a member cut off from its peers only was revoked,
                // re-registered at once, and its next failure went unreported.)
                self.reported.clear();
                self.publish(&plan);
                self.feed(Event::PlanCommitted(plan));
            }
            Err(e) => {
                tracing::warn!(member = %self.writer.member_id, generation = update.generation, revision = update.revision, error = %e, "ignoring a malformed plan");
            }
        }
        Ok(())
    }

    /// A member key event while leader.
    fn on_member_event(&mut self, event: Option<MemberEvent>) -> Result<(), String> {
        match event {
            None => Err(format!(
                "the watch of member keys ended while leading: {:?}",
                self.members_watch.as_ref().map(MemberWatch::status)
            )),
            Some(MemberEvent::Snapshot { members, .. }) => {
                self.reconcile(&members);
                Ok(())
            }
            Some(MemberEvent::Put { member, .. }) => {
                self.joined(&member);
                Ok(())
            }
            Some(MemberEvent::Deleted { id, .. }) => {
                let id = MemberId::new(id);
                self.leases.remove(&id);
                self.feed(Event::LeaseExpired(id));
                Ok(())
            }
        }
    }

    /// A [`Member::suspect`] call: at most one report per suspect per
    /// [`REPORT_INTERVAL`]; a leader feeds it to its planner, a follower writes it to
    /// etcd for the leader.
    fn on_suspect_call(&mut self, member: MemberId, reason: String) {
        let me = MemberId::new(self.writer.member_id.as_str());
        if member == me {
            tracing::debug!(member = %me, %reason, "ignoring a suspicion of oneself");
            return;
        }
        let now = Instant::now();
        if let Some(&last) = self.reported.get(&member) {
            if now.duration_since(last) < REPORT_INTERVAL {
                tracing::debug!(member = %me, target = %member, %reason, "suspicion not reported again: reported {:?} ago", now.duration_since(last));
                self.counters
                    .repeats_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if self.reported.len() >= MAX_REPORTED && !self.reported.contains_key(&member) {
            self.reported
                .retain(|_, &mut at| now.duration_since(at) < REPORT_INTERVAL);
            if self.reported.len() >= MAX_REPORTED {
                let oldest = self
                    .reported
                    .iter()
                    .min_by_key(|(_, &at)| at)
                    .map(|(id, _)| id.clone());
                if let Some(id) = oldest {
                    self.reported.remove(&id);
                }
            }
        }
        self.reported.insert(member.clone(), now);
        if self.leadership.is_some() {
            tracing::info!(member = %me, target = %member, %reason, "suspecting a member (as leader)");
            self.counters
                .suspicions_reported
                .fetch_add(1, Ordering::Relaxed);
            self.feed(Event::Suspected {
                member,
                reporter: me,
                reason,
            });
        } else {
            tracing::info!(member = %me, target = %member, %reason, "reporting a suspect to the leader");
            let etcd = self.etcd.clone();
            let writer = self.writer.clone();
            let suspect = member.clone();
            self.jobs.spawn(async move {
                let result = etcd
                    .report_suspect(&writer, suspect.as_str(), &reason, wall_ms())
                    .await;
                Job::Report { suspect, result }
            });
            // Nobody hears a report about the leader itself: if the suspect leads, this
            // member probes it and, when the probe fails too (the same evidence the
            // leader needs against anyone), revokes its lease instead of waiting for
            // the TTL.
            if let Some(prober) = self.detection.prober.clone() {
                let etcd = self.etcd.clone();
                let limit = self.detection.probe_timeout;
                self.jobs.spawn(async move {
                    let outcome = check_leader(&etcd, &member, prober, limit).await;
                    Job::LeaderCheck {
                        suspect: member,
                        outcome,
                    }
                });
            }
        }
    }

    /// A suspicion report while leader: every new report is `Suspected`. A watch that
    /// ended is dropped (logged): reports go unheard, but the other evidence (the
    /// leader's own suspicions and probes, lease expiry) still works.
    fn on_suspect_event(&mut self, event: Option<SuspectEvent>) {
        let me = &self.writer.member_id;
        match event {
            None => {
                let status = self.suspects_watch.as_ref().map(SuspectWatch::status);
                tracing::warn!(member = %me, ?status, "the watch of suspicion reports ended: followers' reports go unheard while this member leads");
                self.suspects_watch = None;
            }
            Some(SuspectEvent::Synced { revision }) => {
                tracing::debug!(member = %me, revision, "suspicion reports read; watching for new ones");
            }
            Some(SuspectEvent::Report(report)) => {
                tracing::info!(member = %me, target = %report.suspect, reporter = %report.reporter, reason = %report.reason, revision = report.revision, "suspicion reported");
                self.feed(Event::Suspected {
                    member: MemberId::new(report.suspect),
                    reporter: MemberId::new(report.reporter),
                    reason: report.reason,
                });
                self.counters.reports_heard.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A registration seen: feeds `MemberJoined` when its info decodes (and names the
    /// key's id and at least one device).
    fn joined(&mut self, member: &EtcdMember) {
        match records::decode_member_info(&member.id, &member.info) {
            Ok(info) => {
                self.leases.insert(info.id.clone(), member.lease);
                self.feed(Event::MemberJoined(info));
            }
            Err(e) => {
                tracing::warn!(member = %self.writer.member_id, error = %e, "ignoring a malformed member registration");
            }
        }
    }

    /// Brings the planner's view in line with a snapshot of the member keys.
    fn reconcile(&mut self, members: &[EtcdMember]) {
        let gone: Vec<MemberId> = self
            .planner
            .known_members()
            .map(|m| m.id.clone())
            .filter(|id| !members.iter().any(|m| m.id == id.as_str()))
            .collect();
        for id in gone {
            self.leases.remove(&id);
            self.feed(Event::LeaseExpired(id));
        }
        for m in members {
            self.joined(m);
        }
    }

    fn on_job(&mut self, job: Job) -> Result<(), String> {
        let me = self.writer.member_id.clone();
        match job {
            Job::Campaign(CampaignEnd::Won(won)) => {
                let Won {
                    leadership,
                    watch,
                    suspects,
                    snapshot,
                    current,
                } = *won;
                self.campaign_failures = 0;
                tracing::info!(member = %me, create_revision = leadership.info.create_revision, members = snapshot.len(), "became leader");
                // The view first (recorded as a follower), then leadership: the planner
                // starts its term knowing who is registered.
                self.reconcile(&snapshot);
                if let Some(plan) = &current {
                    self.publish(plan);
                }
                self.leadership = Some(leadership);
                self.members_watch = Some(watch);
                self.suspects_watch = Some(suspects);
                self.leader_tx.send_replace(true);
                self.feed(Event::BecameLeader { current });
                Ok(())
            }
            Job::Campaign(CampaignEnd::NotYet) => {
                self.spawn_campaign(Duration::ZERO);
                Ok(())
            }
            Job::Campaign(CampaignEnd::LeaseLost(reason)) => Err(reason),
            Job::Campaign(CampaignEnd::Failed(error)) => {
                self.campaign_failures = self.campaign_failures.saturating_add(1);
                let pause = CAMPAIGN_BACKOFF
                    .saturating_mul(1 << self.campaign_failures.min(8))
                    .min(CAMPAIGN_BACKOFF_MAX);
                tracing::warn!(member = %me, %error, ?pause, "campaign failed; campaigning again");
                self.spawn_campaign(pause);
                Ok(())
            }
            Job::Write { plan, result } => {
                let generation = plan.generation;
                match result {
                    Ok(WriteOutcome::Written { revision }) => {
                        tracing::info!(member = %me, generation, revision, "plan written");
                        self.publish(&plan);
                        self.feed(Event::PlanCommitted(plan));
                    }
                    Ok(WriteOutcome::Conflict { current_generation }) => {
                        self.feed(Event::PlanWriteFailed {
                            generation,
                            reason: format!(
                                "the stored generation is {current_generation:?}, not the expected previous one"
                            ),
                        });
                    }
                    Err(e @ EtcdError::LeaseLost { .. }) => return Err(e.to_string()),
                    Err(e) => self.feed(Event::PlanWriteFailed {
                        generation,
                        reason: e.to_string(),
                    }),
                }
                Ok(())
            }
            Job::Revoke {
                member,
                lease,
                result,
            } => {
                match result {
                    Ok(existed) => {
                        if existed {
                            self.counters.revocations.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(member = %me, target = %member, lease, existed, "lease revoked")
                    }
                    Err(e) => {
                        tracing::warn!(member = %me, target = %member, lease, error = %e, "revocation failed")
                    }
                }
                Ok(())
            }
            Job::Probe { member, alive } => {
                match alive {
                    Some(alive) => {
                        tracing::info!(member = %me, target = %member, alive, "probe answered");
                        self.feed(Event::ProbeResult { member, alive });
                        self.counters.probe_results.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        tracing::error!(member = %me, target = %member, "the prober panicked: no probe result (the suspicion waits for a second reporter or expires)");
                    }
                }
                Ok(())
            }
            Job::LeaderCheck { suspect, outcome } => {
                if matches!(outcome, LeaderCheck::Answered | LeaderCheck::Revoked(_)) {
                    self.counters.probes_sent.fetch_add(1, Ordering::Relaxed);
                }
                match outcome {
                    LeaderCheck::NotLeader => {}
                    LeaderCheck::Answered => {
                        tracing::info!(member = %me, target = %suspect, "the suspected leader answered the probe: it stays")
                    }
                    LeaderCheck::Revoked(Ok(existed)) => {
                        if existed {
                            self.counters.revocations.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::warn!(member = %me, target = %suspect, existed, "the suspected leader did not answer the probe: its lease was revoked")
                    }
                    LeaderCheck::Revoked(Err(e)) => {
                        tracing::warn!(member = %me, target = %suspect, error = %e, "revoking the unresponsive leader's lease failed")
                    }
                    LeaderCheck::Skipped(why) => {
                        tracing::debug!(member = %me, target = %suspect, %why, "leader check skipped")
                    }
                }
                Ok(())
            }
            Job::Report { suspect, result } => {
                match result {
                    Ok(revision) => {
                        self.counters
                            .suspicions_reported
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(member = %me, target = %suspect, revision, "suspicion report written");
                    }
                    Err(e) => {
                        // A later suspect() call may try again at once.
                        self.reported.remove(&suspect);
                        tracing::warn!(member = %me, target = %suspect, error = %e, "writing a suspicion report failed");
                    }
                }
                Ok(())
            }
        }
    }

    /// The member is lost: reports it, ends leadership and the jobs, and releases the
    /// lease if it still exists (a lease whose member key is gone must not keep the
    /// election key).
    async fn lose(&mut self, reason: String) {
        tracing::warn!(member = %self.writer.member_id, %reason, "member lost");
        self.jobs.abort_all();
        self.members_watch = None;
        self.suspects_watch = None;
        if let Some(l) = self.leadership.take() {
            tracing::warn!(member = %self.writer.member_id, create_revision = l.info.create_revision, "leadership ends with the member");
        }
        let now = self.now_ms();
        self.planner.handle(Event::LostLeadership, now);
        self.leader_tx.send_replace(false);
        self.state_tx.send_replace(MemberState::Lost { reason });
        let registration = lock(&self.registration).take();
        if let Some(reg) = registration {
            tokio::select! {
                () = self.cancel.cancelled() => {}
                released = reg.revoke() => {
                    if let Err(e) = released {
                        tracing::warn!(member = %self.writer.member_id, error = %e, "releasing the lease failed; it expires after its TTL");
                    }
                }
            }
        }
    }
}

/// One campaign; when won, the members snapshot and the stored plan.
async fn campaign(etcd: EtcdMembership, writer: Writer) -> CampaignEnd {
    let leadership = match etcd.campaign(&writer, CAMPAIGN_WAIT).await {
        Ok(Some(l)) => l,
        Ok(None) => return CampaignEnd::NotYet,
        Err(e @ EtcdError::LeaseLost { .. }) => return CampaignEnd::LeaseLost(e.to_string()),
        Err(e) => return CampaignEnd::Failed(e.to_string()),
    };
    // Bounded like one driver call with all its retries.
    let config = etcd.config();
    let limit = config
        .op_timeout
        .saturating_mul(config.max_retries.saturating_add(1))
        .saturating_add(config.backoff_max.saturating_mul(config.max_retries));
    let mut watch = etcd.watch_members();
    let snapshot = match tokio::time::timeout(limit, watch.recv()).await {
        Ok(Some(MemberEvent::Snapshot { members, .. })) => members,
        Ok(other) => {
            return CampaignEnd::Failed(format!(
                "the members watch began with {other:?} instead of a snapshot: {:?}",
                watch.status()
            ))
        }
        Err(_) => {
            return CampaignEnd::Failed(format!(
                "no snapshot of the member keys within {limit:?}: {:?}",
                watch.status()
            ))
        }
    };
    // Reports stored before leadership are not delivered: the watch is synced before the
    // member leads, so that every report put after that is heard.
    let mut suspects = etcd.watch_suspects();
    match tokio::time::timeout(limit, suspects.recv()).await {
        Ok(Some(SuspectEvent::Synced { .. })) => {}
        Ok(other) => {
            return CampaignEnd::Failed(format!(
                "the suspects watch began with {other:?} instead of a sync: {:?}",
                suspects.status()
            ))
        }
        Err(_) => {
            return CampaignEnd::Failed(format!(
                "the suspicion reports were not read within {limit:?}: {:?}",
                suspects.status()
            ))
        }
    }
    let current = match etcd.read_plan().await {
        Ok(None) => None,
        Ok(Some(record)) => match records::decode_plan(record.generation, &record.plan) {
            Ok(plan) => Some(plan),
            Err(e) => {
                return CampaignEnd::Failed(format!(
                    "the stored plan of generation {} does not decode: {e}",
                    record.generation
                ))
            }
        },
        Err(e) => return CampaignEnd::Failed(e.to_string()),
    };
    CampaignEnd::Won(Box::new(Won {
        leadership,
        watch,
        suspects,
        snapshot,
        current,
    }))
}

/// A follower's check of `suspect`: if it is the leader (etcd's election says so) and its
/// probe fails within `limit`, revoke the lease its election key lives under.
async fn check_leader(
    etcd: &EtcdMembership,
    suspect: &MemberId,
    prober: Prober,
    limit: Duration,
) -> LeaderCheck {
    let leader = match etcd.leader().await {
        Ok(Some(l)) => l,
        Ok(None) => return LeaderCheck::Skipped("no leader".into()),
        Err(e) => return LeaderCheck::Skipped(format!("reading the leader: {e}")),
    };
    if leader.member_id != suspect.as_str() {
        return LeaderCheck::NotLeader;
    }
    let info = match etcd.members().await {
        Ok(ms) => ms
            .into_iter()
            .find(|m| m.id == suspect.as_str())
            .and_then(|m| records::decode_member_info(&m.id, &m.info).ok()),
        Err(e) => return LeaderCheck::Skipped(format!("reading the members: {e}")),
    };
    let Some(info) = info else {
        return LeaderCheck::Skipped("the leader has no readable registration".into());
    };
    match run_probe(prober, info, limit).await {
        Some(true) => LeaderCheck::Answered,
        Some(false) => LeaderCheck::Revoked(etcd.revoke_lease(leader.lease).await),
        None => LeaderCheck::Skipped("the prober panicked".into()),
    }
}

/// Runs one probe of `info` bounded by `limit` (a timeout is `false`). It runs inside an
/// agent job: a panicking prober (`None`) costs one probe, never the agent.
async fn run_probe(prober: Prober, info: MemberInfo, limit: Duration) -> Option<bool> {
    AssertUnwindSafe(async move {
        tokio::time::timeout(limit, prober(info))
            .await
            .unwrap_or(false)
    })
    .catch_unwind()
    .await
    .ok()
}

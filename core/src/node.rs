//! The life of one node as a pure state machine: [`NodeMachine::handle`] takes an
//! [`Event`] and the time, and returns the [`Effect`]s its shell carries out, each with the
//! reason it was decided.
//!
//! The shell (a daemon's node actor, or `tenax train` as a one-member job) owns the I/O:
//! the membership agent, the communicator, the trainer, the checkpoint actor, the clock.
//! It feeds what happened back as events. Every rule that decides lives here:
//! - which plan the node trains in (newer than the last, with ranks for it, and at least
//!   `start_nodes` nodes for the first one), and that a node which finds the job done
//!   exits instead of training it again;
//! - when a newer plan ends the generation: at once if it drops a member, else after the
//!   step in flight had `reform_grace_ms` to complete; a lost membership aborts at once;
//! - who copies the state from whom ([`state_donors`], the one answer), and loading the
//!   committed checkpoint when no member holds any state;
//! - each step's deadline (a [`FailureDetector`] over observed step times, longer for a
//!   generation's first step and for the step after the committer evaluated or saved),
//!   and reporting the members a late step waits for;
//! - the committer (the member hosting rank 0), the evaluation and checkpoint cadence, the
//!   periodic parameter comparison and the resync it triggers;
//! - the fenced checkpoint record: written once the checkpoint is committed, retried
//!   every `record_retry_ms` while etcd does not answer, replaced by a newer one, and a
//!   refused final record saved again in the next generation;
//! - drain, pause, checkpoint-now, SIGTERM with its grace period, the re-formation window
//!   after a failure, rejoining with a doubling backoff and a bound on rejoins in a row,
//!   and stopping after too many non-finite steps in a row.
//!
//! Effects are carried out in the order given. An effect that says "feeds back" starts
//! work whose outcome comes back later as the named event (tagged with its generation, so
//! an outcome of a generation that has ended is ignored); the others are done before the
//! next effect. [`NodeMachine::next_timer_ms`] says when to feed [`Event::Tick`].

use serde::{Deserialize, Serialize};

use crate::detector::{DetectorConfig, FailureDetector};
use crate::membership::{keeps_every_member, state_donors, MemberId, Plan};

/// The state-exchange round of a group in which no member held any state, after every
/// member loaded the committed checkpoint.
pub const LOADED_ROUND: u64 = u64::MAX;

/// Parameter hashes a node's shell takes at once off its loop; a step that would start
/// another waits for one. Each holds a copy of the parameters, and a step's log line is
/// written once its hash is in.
pub const HASHES_IN_FLIGHT: usize = 2;

/// Step-log lines a member killed with `kill -9` may not have written although its slots
/// counted: those waiting for their hash ([`HASHES_IN_FLIGHT`]) and its step in flight.
/// The invariant checks allow this many per killed process.
pub const STEP_LINES_LOST_PER_KILL: u64 = HASHES_IN_FLIGHT as u64 + 1;

/// The rules' numbers. Durations are in milliseconds of the shell's monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// This node's member id.
    pub me: MemberId,
    /// The job's target step (`--steps`).
    pub target_steps: u64,
    /// Samples per step: how far the data cursor moves in one step.
    pub batch_size: u64,
    /// The committer evaluates every this many steps (0: only at the end).
    pub eval_every: u64,
    /// The committer saves a checkpoint every this many steps (0: only at the end).
    pub ckpt_every: u64,
    /// The members compare parameter hashes every this many steps (0: never).
    pub hash_check_every: u64,
    /// Nodes with ranks the first plan must have before this node trains in it.
    pub start_nodes: usize,
    /// Stop after this many non-finite (skipped) steps in a row (0: never stop).
    pub max_bad_steps: u64,
    /// The step deadline's detector: `max(min_deadline_ms, k x p99)` of observed steps.
    pub step_deadline: DetectorConfig,
    /// The least deadline of a generation's first step (connections, copies).
    pub first_step_deadline_ms: u64,
    /// The deadline of the step after the committer evaluated or saved is this many times
    /// the usual one ...
    pub committer_work_factor: u64,
    /// ... and at least this long.
    pub committer_work_deadline_ms: u64,
    /// How long a step in flight may still complete after a plan that keeps every member.
    pub reform_grace_ms: u64,
    /// How long a node whose step failed waits for a newer plan before it gives up.
    pub reform_window_ms: u64,
    /// How long a node whose step failed waits for etcd while etcd does not answer
    /// (`--etcd-outage-timeout-s`), counted from the start of the outage; once etcd
    /// answers again, `reform_window_ms` more for the plan.
    pub etcd_outage_timeout_ms: u64,
    /// How often a checkpoint record etcd did not take is tried again.
    pub record_retry_ms: u64,
    /// How long the end of the job waits for the final checkpoint's record.
    pub final_timeout_ms: u64,
    /// Registrations in a row without a step in between before the node exits.
    pub max_rejoins: u32,
    /// The wait before the first registration after a lost membership; it doubles.
    pub rejoin_backoff_first_ms: u64,
    /// The longest wait before registering again.
    pub rejoin_backoff_max_ms: u64,
    /// Every data-parallel replica writes its share of the periodic and final checkpoints
    /// (see [`share_of`]); off, the committer writes them whole.
    pub shared_saves: bool,
}

impl NodeConfig {
    /// The defaults of `tenax daemon` for a job of `target_steps` steps of `batch_size`
    /// samples, with a lease of `lease_ttl_s` and a planner settle window of `settle_ms`.
    pub fn daemon(
        me: MemberId,
        target_steps: u64,
        batch_size: u64,
        lease_ttl_s: u64,
        settle_ms: u64,
    ) -> Self {
        Self {
            me,
            target_steps,
            batch_size,
            eval_every: 0,
            ckpt_every: 0,
            hash_check_every: 100,
            start_nodes: 1,
            max_bad_steps: 0,
            step_deadline: DetectorConfig {
                window: 256,
                k: 3,
                min_deadline_ms: 2_000,
                min_samples: 8,
            },
            first_step_deadline_ms: 10_000,
            committer_work_factor: 10,
            committer_work_deadline_ms: 30_000,
            reform_grace_ms: 2_000,
            reform_window_ms: reform_window_ms(lease_ttl_s, settle_ms),
            etcd_outage_timeout_ms: 600_000,
            record_retry_ms: 2_000,
            final_timeout_ms: 1_800_000,
            max_rejoins: 20,
            rejoin_backoff_first_ms: 250,
            rejoin_backoff_max_ms: 5_000,
            shared_saves: true,
        }
    }
}

/// How long a node whose step failed waits for the plan that replaces its generation:
/// long enough for a lease to expire (`lease_ttl_s` + 2 s) and for the leader to settle
/// (up to 3 windows) and write the plan (2 s).
pub fn reform_window_ms(lease_ttl_s: u64, settle_ms: u64) -> u64 {
    (lease_ttl_s + 2) * 1_000 + settle_ms.saturating_mul(3) + 2_000
}

/// The wait before registration number `in_a_row` (1 for the first after a step): the
/// first wait, doubling, at most the maximum.
pub fn rejoin_backoff_ms(in_a_row: u32, first_ms: u64, max_ms: u64) -> u64 {
    let doublings = in_a_row.clamp(1, 9) - 1;
    first_ms.saturating_mul(1u64 << doublings).min(max_ms)
}

/// One member's state as exchanged at the start of a generation or at a periodic check,
/// in member order: the step it reached and its parameter hash (empty: holds no state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    /// The member.
    pub member: MemberId,
    /// The step its state is at.
    pub step: u64,
    /// Its parameter hash; empty for a node that holds no state.
    pub hash: String,
}

impl std::fmt::Display for PeerState {
    /// `member hash` with the hash cut to 12 characters (an alarm names the odd ones).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.member,
            &self.hash[..self.hash.len().min(12)]
        )
    }
}

/// How a node's state was set other than by a step (a line of `events.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateSource {
    /// Fresh weights.
    Init,
    /// Loaded from a committed checkpoint.
    Checkpoint,
    /// Copied from a peer.
    Copy,
    /// Nothing: a node that joined a running job.
    None,
}

impl StateSource {
    /// The word written to `events.jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateSource::Init => "init",
            StateSource::Checkpoint => "checkpoint",
            StateSource::Copy => "copy",
            StateSource::None => "none",
        }
    }
}

/// A checkpoint the committer saved, as recorded in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its step.
    pub step: u64,
    /// Its URL in the store.
    pub url: String,
    /// The generation that saved it (the record is fenced on it).
    pub generation: u64,
}

/// How the node's process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// The job reached its target step and its final checkpoint is committed.
    Done,
    /// The node left the job (drained, or SIGTERM with its checkpoint saved).
    Left,
    /// The node stops with an error (exit status 1); a supervisor restarts it.
    Failed,
    /// SIGTERM's grace period ran out (exit status 3).
    GraceExpired,
}

/// What happened, as the shell tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// The node is up: whether it holds real state (false: it joined a running job and
    /// loaded nothing), at which step and cursor.
    Started {
        /// Whether its state is real.
        holds_state: bool,
        /// The step of its state.
        step: u64,
        /// The data cursor of its state.
        cursor: u64,
    },
    /// A plan was read from etcd (any generation; old ones are ignored).
    PlanSeen(Plan),
    /// The node's membership is gone (lease revoked or expired, key deleted).
    MembershipLost {
        /// What the membership agent saw.
        reason: String,
    },
    /// Answer to [`Action::Register`]: the node is registered again.
    Registered,
    /// Answer to [`Action::CheckJobDone`]: the step of the job's committed checkpoint
    /// record (`None`: no record, or etcd did not answer).
    JobRecord {
        /// The recorded step.
        step: Option<u64>,
    },
    /// Answer to [`Action::BuildCommunicator`].
    CommunicatorBuilt {
        /// Its generation.
        generation: u64,
    },
    /// Answer to [`Action::ExchangeState`] or [`Action::CompareHashes`]: every member's
    /// state, in member order.
    StatesExchanged {
        /// The generation.
        generation: u64,
        /// The round (0 at the start, [`LOADED_ROUND`] after loading, else the step).
        round: u64,
        /// One per member, in member order.
        states: Vec<PeerState>,
    },
    /// Answer to [`Action::LoadCheckpoint`]: the committed checkpoint is loaded.
    CheckpointLoaded {
        /// The generation.
        generation: u64,
        /// Its step.
        step: u64,
        /// Its cursor.
        cursor: u64,
        /// The loaded parameters' hash.
        hash: String,
    },
    /// Answer to [`Action::FetchState`]: the state was copied and its hash checked.
    StateCopied {
        /// The generation.
        generation: u64,
        /// The copied step.
        step: u64,
        /// The copied cursor.
        cursor: u64,
    },
    /// Answer to [`Action::ServeState`]: every receiver was served.
    StateServed {
        /// The generation.
        generation: u64,
    },
    /// Answer to [`Action::StartTrainer`].
    TrainerStarted {
        /// The generation.
        generation: u64,
    },
    /// Answer to [`Action::RunStep`]: the step is applied.
    StepDone {
        /// The generation.
        generation: u64,
        /// The step's loss.
        loss: f64,
        /// Whether the update was skipped (non-finite loss or gradient norm).
        skipped: bool,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// Answer to [`Action::Evaluate`].
    Evaluated {
        /// The generation.
        generation: u64,
        /// The validation loss.
        val_loss: f64,
    },
    /// An operation of the generation failed: building the communicator, an exchange,
    /// a copy, serving, or a step (an aborted step applied nothing).
    Failed {
        /// The generation.
        generation: u64,
        /// Whether peers' streams may have failed (report them as suspects).
        peers_may_have_failed: bool,
        /// What failed.
        error: String,
    },
    /// The trainer of the generation died (a rank panicked): its state is lost. The node
    /// leaves the group cleanly and joins again, copying the group's state.
    TrainerFailed {
        /// The generation.
        generation: u64,
        /// What failed.
        error: String,
    },
    /// The trainer could not start or read its state: the node cannot go on.
    Fatal {
        /// What failed.
        error: String,
    },
    /// The checkpoint actor committed a checkpoint (manifest written).
    CheckpointCommitted {
        /// Its step.
        step: u64,
        /// Its URL.
        url: String,
        /// The generation that saved it.
        generation: u64,
    },
    /// The checkpoint actor could not save one.
    CheckpointFailed {
        /// Its step.
        step: u64,
        /// Why.
        error: String,
    },
    /// Answer to [`Action::WriteRecord`]: etcd took the record.
    RecordWritten {
        /// Its step.
        step: u64,
    },
    /// Answer to [`Action::WriteRecord`]: the fence refused it (a newer generation is
    /// current).
    RecordRefused {
        /// Its step.
        step: u64,
        /// The fence's words.
        reason: String,
    },
    /// Answer to [`Action::WriteRecord`]: etcd did not answer in time.
    RecordUnreachable {
        /// Its step.
        step: u64,
        /// What was seen.
        error: String,
    },
    /// Answer to [`Action::WaitForFinalRecord`]: the job's record reached its step.
    FinalRecordSeen {
        /// The recorded step.
        step: u64,
    },
    /// An operator drained the node (with a checkpoint first, or not).
    Drain {
        /// Save and commit a checkpoint before leaving.
        checkpoint: bool,
    },
    /// SIGTERM: drain with a checkpoint, and exit with status 3 past the grace period.
    Sigterm {
        /// The grace period.
        grace_ms: u64,
    },
    /// An operator paused training (at the next step boundary).
    Pause,
    /// An operator resumed training.
    Resume,
    /// An operator asked for a checkpoint at the next step boundary.
    CheckpointNow,
    /// The membership agent's view of etcd changed: `false` when its lease refreshes get
    /// no answer (etcd down or cut off), `true` when they are answered again.
    EtcdReachable {
        /// Whether etcd answers.
        reachable: bool,
    },
    /// The time in `handle`'s `now_ms` reached [`NodeMachine::next_timer_ms`].
    Tick,
}

/// What the shell is asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Append a line to `events.jsonl`: how the node's state was set.
    NoteState {
        /// How.
        source: StateSource,
        /// The state's step.
        step: u64,
        /// In which generation (none before the first).
        generation: Option<u64>,
    },
    /// Register in the job again (a new membership); feeds back [`Event::Registered`].
    Register,
    /// Read the job's checkpoint record; feeds back [`Event::JobRecord`].
    CheckJobDone,
    /// Build the communicator of `plan` (resolve its members' addresses, connect);
    /// feeds back [`Event::CommunicatorBuilt`] or [`Event::Failed`].
    BuildCommunicator {
        /// The plan.
        plan: Plan,
    },
    /// Exchange (step, parameter hash) with every member; feeds back
    /// [`Event::StatesExchanged`] or [`Event::Failed`].
    ExchangeState {
        /// The generation.
        generation: u64,
        /// The round.
        round: u64,
        /// This node's step.
        step: u64,
        /// Whether to send this node's hash (false: it holds nothing, sends empty).
        holds_state: bool,
    },
    /// Load the job's committed checkpoint; feeds back [`Event::CheckpointLoaded`] or
    /// [`Event::Failed`].
    LoadCheckpoint {
        /// The generation.
        generation: u64,
    },
    /// Copy the state at `step` with parameter hash `hash` from member `donor` (an index
    /// in member order) and check the copy's hash; feeds back [`Event::StateCopied`] or
    /// [`Event::Failed`].
    FetchState {
        /// The generation.
        generation: u64,
        /// The donor's index in member order.
        donor: usize,
        /// The state's step.
        step: u64,
        /// The parameter hash the copy must have.
        hash: String,
    },
    /// Serve this node's state to the members at `receivers` (indexes in member
    /// order) and wait until each has it; feeds back [`Event::StateServed`] or
    /// [`Event::Failed`].
    ServeState {
        /// The generation.
        generation: u64,
        /// Who copies from this node.
        receivers: Vec<usize>,
    },
    /// Start the trainer of this node's ranks from its state; feeds back
    /// [`Event::TrainerStarted`] or [`Event::Fatal`].
    StartTrainer {
        /// The generation.
        generation: u64,
        /// The state's step.
        step: u64,
        /// The state's cursor.
        cursor: u64,
    },
    /// Take the trainer's state back and stop it (the generation's steps are over).
    StopTrainer {
        /// The generation.
        generation: u64,
    },
    /// Run step `step + 1` from `cursor`; feeds back [`Event::StepDone`] or
    /// [`Event::Failed`]. Past `deadline_ms` a [`Action::ReportLate`] may follow.
    RunStep {
        /// The generation.
        generation: u64,
        /// The step the state is at.
        step: u64,
        /// The cursor of the step's first sample.
        cursor: u64,
        /// The step's deadline.
        deadline_ms: u64,
    },
    /// The step in flight is past its deadline: report the members it waits for.
    ReportLate {
        /// The generation.
        generation: u64,
        /// The step the state is at (the late step is `step + 1`).
        step: u64,
        /// How long it has run.
        waited_ms: u64,
    },
    /// Report the peers whose streams failed as suspects.
    ReportFailedPeers {
        /// The generation.
        generation: u64,
    },
    /// Compare parameter hashes with every member (round `step`); feeds back
    /// [`Event::StatesExchanged`] or [`Event::Failed`].
    CompareHashes {
        /// The generation.
        generation: u64,
        /// The step compared.
        step: u64,
    },
    /// Members hold different parameters: say so loudly (an `ALARM` line, a counter).
    Alarm {
        /// The generation.
        generation: u64,
        /// The step.
        step: u64,
        /// Every member's state.
        states: Vec<PeerState>,
    },
    /// Evaluate the validation loss; feeds back [`Event::Evaluated`] or [`Event::Fatal`].
    Evaluate {
        /// The generation.
        generation: u64,
        /// The step evaluated.
        step: u64,
    },
    /// Append the last step's line to the step log (`metrics.jsonl`), with the
    /// validation loss when there is one.
    LogStep {
        /// The generation.
        generation: u64,
        /// The step reached.
        step: u64,
        /// The cursor of the step's first sample.
        cursor: u64,
        /// The validation loss, when evaluated.
        val_loss: Option<f64>,
    },
    /// Snapshot the state and hand it to the checkpoint actor (its outcome comes back as
    /// [`Event::CheckpointCommitted`] or [`Event::CheckpointFailed`]).
    Save {
        /// The generation.
        generation: u64,
        /// The step.
        step: u64,
        /// The cursor after it.
        cursor: u64,
        /// `Some`: every replica writes its share of this checkpoint and the committer
        /// commits it; on a writer that does not commit no event comes back. `None`: this
        /// node writes it all.
        share: Option<Share>,
    },
    /// Write the checkpoint record, fenced on its generation, bounded in time; feeds
    /// back [`Event::RecordWritten`], [`Event::RecordRefused`] or
    /// [`Event::RecordUnreachable`].
    WriteRecord(Record),
    /// Poll the job's checkpoint record until it reaches `step`; feeds back
    /// [`Event::FinalRecordSeen`].
    WaitForFinalRecord {
        /// The generation.
        generation: u64,
        /// The final step.
        step: u64,
    },
    /// Tell every other member this node stops the generation after `step` (a member
    /// waiting on a later step gives it up at once).
    StopAfter {
        /// The generation.
        generation: u64,
        /// The last step of this node in it.
        step: u64,
    },
    /// Abort the generation's communicator (every wait in it fails at once).
    Abort {
        /// The generation.
        generation: u64,
    },
    /// Drop the generation's trainer without reading its state (it died).
    DropTrainer {
        /// The generation.
        generation: u64,
    },
    /// Leave the group now: release the membership (revoke the lease), so that the
    /// others re-form at once; the node registers again after [`Action::Register`].
    Leave,
    /// Drain the communicator's send queues (the node leaves), bounded.
    Close {
        /// The generation.
        generation: u64,
    },
    /// Say something in the node's log (phase changes, waits).
    Say(String),
    /// Plot the loss curve.
    Plot,
    /// End the process.
    Exit(Exit),
}

/// One thing to do, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// What.
    pub action: Action,
    /// Why, for the log and for tests.
    pub reason: String,
}

fn fx(action: Action, reason: impl Into<String>) -> Effect {
    Effect {
        action,
        reason: reason.into(),
    }
}

/// Where the node is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Before [`Event::Started`].
    Starting,
    /// Waiting for a plan newer than the last with ranks for this node.
    WaitingForPlan,
    /// Backing off before registering again.
    Rejoining {
        /// When to register.
        at_ms: u64,
    },
    /// [`Action::Register`] is in flight.
    Registering,
    /// [`Action::CheckJobDone`] is in flight for this plan.
    CheckingDone,
    /// Building the communicator.
    Forming,
    /// Exchanging states (round).
    Exchanging(u64),
    /// Loading the committed checkpoint.
    Loading,
    /// Copying the state from a peer.
    Copying,
    /// Serving the state to peers.
    Serving,
    /// Starting the trainer.
    StartingTrainer,
    /// A step is in flight.
    Stepping {
        /// When it started.
        started_ms: u64,
        /// Its deadline.
        deadline_ms: u64,
        /// Whether its late members were reported.
        reported: bool,
    },
    /// Comparing parameter hashes after a step.
    Comparing,
    /// Evaluating after a step.
    Evaluating,
    /// Paused at a step boundary.
    Paused,
    /// Waiting for a checkpoint's commit and record before leaving or finishing.
    Committing {
        /// The checkpoint's step.
        step: u64,
        /// Leave (drain) after it instead of finishing the job.
        leave: bool,
        /// Give up at.
        until_ms: u64,
    },
    /// Waiting for the committer's final record.
    WaitingForFinal {
        /// Give up at.
        until_ms: u64,
    },
    /// A generation's operation failed: waiting for a newer plan.
    AfterFailure {
        /// Give up at.
        until_ms: u64,
        /// What failed.
        error: String,
    },
    /// The process ends.
    Ended(Exit),
}

impl Phase {
    /// A short name for status displays.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "joining",
            Phase::WaitingForPlan | Phase::CheckingDone => "waiting for a plan",
            Phase::Rejoining { .. } | Phase::Registering => "rejoining",
            Phase::Forming | Phase::StartingTrainer => "forming",
            Phase::Exchanging(_) => "comparing state",
            Phase::Loading => "loading checkpoint",
            Phase::Copying => "copying state",
            Phase::Serving => "sending state",
            Phase::Stepping { .. } | Phase::Comparing | Phase::Evaluating => "training",
            Phase::Paused => "paused",
            Phase::Committing { leave: true, .. } => "saving before leaving",
            Phase::Committing { leave: false, .. } | Phase::WaitingForFinal { .. } => {
                "final checkpoint"
            }
            Phase::AfterFailure { .. } => "re-forming",
            Phase::Ended(Exit::Done) => "done",
            Phase::Ended(Exit::Left) => "left",
            Phase::Ended(_) => "stopped",
        }
    }
}

/// A node's part in a checkpoint that every data-parallel replica writes a share of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// This member's writer index: its place among the plan's members that host ranks.
    pub writer: u32,
    /// Writers: the plan's members that host ranks (each holds a whole replica).
    pub writers: u32,
    /// This member commits: it collects the others' shares, writes missing ones, commits.
    pub commits: bool,
}

/// This node's share of the generation's checkpoints: `None` when it hosts no rank or is
/// the only member hosting ranks. Every member hosting ranks holds the whole state (with
/// pipeline stages on different members too: each keeps the whole model's state).
pub fn share_of(plan: &Plan, me: &MemberId) -> Option<Share> {
    let holders: Vec<&MemberId> = plan
        .members
        .iter()
        .filter(|m| !plan.ranks_of(m).is_empty())
        .collect();
    let writer = holders.iter().position(|m| *m == me)?;
    (holders.len() > 1).then(|| Share {
        writer: writer as u32,
        writers: holders.len() as u32,
        commits: plan.member_of(0) == Some(me),
    })
}

/// The generation the node is in.
#[derive(Debug, Clone)]
struct Gen {
    plan: Plan,
    /// Whether this node hosts rank 0 (evaluates, saves, writes records).
    committer: bool,
    /// This node's share of the generation's checkpoints (see [`share_of`]).
    share: Option<Share>,
    /// The step the generation's training started at (after the state sync).
    step0: u64,
    /// The comparison round in progress or last done.
    round: u64,
    /// The states of the last comparison, in member order.
    states: Vec<PeerState>,
    /// Why the generation ends at the next boundary (a newer plan, a lost membership).
    ending: Option<String>,
    /// When the communicator is aborted (a newer plan that keeps every member lets the
    /// step in flight complete until then).
    abort_at_ms: Option<u64>,
    /// The trainer runs.
    trainer: bool,
    /// The validation loss of the last step, once evaluated.
    val_loss: Option<f64>,
    /// The cursor of the last step's first sample.
    step_cursor: u64,
    /// A step applied whose log line waits for its comparison or evaluation: logged
    /// then, or when the generation breaks off first ([`NodeMachine::log_unlogged`]).
    unlogged: Option<u64>,
}

/// The node's life. See the module docs.
#[derive(Debug, Clone)]
pub struct NodeMachine {
    cfg: NodeConfig,
    phase: Phase,
    holds_state: bool,
    step: u64,
    cursor: u64,
    /// The generation trained in (or last trained in, while waiting).
    gen: Option<Gen>,
    /// The last generation this node formed in.
    last_gen: Option<u64>,
    /// The newest plan seen.
    latest: Option<Plan>,
    /// The plan being checked or formed.
    candidate: Option<Plan>,
    /// The generation whose wait was announced (said once).
    announced: Option<u64>,
    /// The membership is gone (why); the node registers again at the next chance.
    lost: Option<String>,
    drain: Option<bool>,
    paused: bool,
    checkpoint_now: bool,
    /// SIGTERM's deadline.
    grace_until_ms: Option<u64>,
    deadline: FailureDetector,
    rejoins_in_a_row: u32,
    stepped_since_rejoin: bool,
    /// A record etcd did not take yet, and when it was last tried (`None`: it came
    /// while another write was in flight, and is written once that one is answered).
    pending_record: Option<(Record, Option<u64>)>,
    /// A record write in flight, and whether it is a retry.
    writing: Option<(Record, bool)>,
    /// The step of the last record the fence refused.
    refused_step: Option<u64>,
    /// The step of the newest record etcd took.
    recorded_step: Option<u64>,
    /// The job's record as read before forming the generation (`None`: none, or etcd
    /// did not answer).
    job_record_step: Option<u64>,
    bad_in_a_row: u64,
    /// Since when etcd does not answer (`None`: it answers).
    etcd_down_since_ms: Option<u64>,
}

impl NodeMachine {
    /// A node that has not started. Fails on an invalid step-deadline configuration.
    pub fn new(cfg: NodeConfig) -> Result<Self, crate::detector::DetectorError> {
        let deadline = FailureDetector::new("step", cfg.step_deadline.clone())?;
        Ok(Self {
            cfg,
            phase: Phase::Starting,
            holds_state: false,
            step: 0,
            cursor: 0,
            gen: None,
            last_gen: None,
            latest: None,
            candidate: None,
            announced: None,
            lost: None,
            drain: None,
            paused: false,
            checkpoint_now: false,
            grace_until_ms: None,
            deadline,
            rejoins_in_a_row: 0,
            stepped_since_rejoin: false,
            pending_record: None,
            writing: None,
            refused_step: None,
            recorded_step: None,
            job_record_step: None,
            bad_in_a_row: 0,
            etcd_down_since_ms: None,
        })
    }

    /// Where the node is.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The step the node's state is at, and its cursor.
    pub fn position(&self) -> (u64, u64) {
        (self.step, self.cursor)
    }

    /// Whether the node's state is real (false for a joiner that has not copied yet).
    pub fn holds_state(&self) -> bool {
        self.holds_state
    }

    /// The generation the node is in (or was last in).
    pub fn generation(&self) -> Option<u64> {
        self.gen.as_ref().map(|g| g.plan.generation)
    }

    /// Whether this node commits checkpoints in its generation (hosts rank 0).
    pub fn is_committer(&self) -> bool {
        self.gen.as_ref().is_some_and(|g| g.committer)
    }

    /// Whether training is paused (or will pause at the next boundary).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The step of the newest checkpoint record etcd took from this node.
    pub fn recorded_step(&self) -> Option<u64> {
        self.recorded_step
    }

    /// The generation of this node's checkpoint record that etcd has not taken yet:
    /// being written, or waiting to be tried again (etcd did not answer); `None`: none.
    /// The shell hands it to its membership agent
    /// ([`crate::membership::Event::RecordPending`]): a leader does not write the plan
    /// of generation g+1 while its node holds a record of g (the record is fenced on g:
    /// written after g+1 it would be refused), at most
    /// [`crate::membership::RECORD_HOLD_MAX_MS`].
    pub fn pending_record_generation(&self) -> Option<u64> {
        let writing = self.writing.as_ref().map(|(r, _)| r.generation);
        let waiting = self.pending_record.as_ref().map(|(r, _)| r.generation);
        writing.max(waiting)
    }

    /// When to feed [`Event::Tick`] next, if any timer is armed.
    pub fn next_timer_ms(&self) -> Option<u64> {
        let phase = match &self.phase {
            Phase::Rejoining { at_ms } => Some(*at_ms),
            Phase::Stepping {
                started_ms,
                deadline_ms,
                reported: false,
            } => Some(started_ms + deadline_ms),
            Phase::Committing { until_ms, .. }
            | Phase::WaitingForFinal { until_ms }
            | Phase::AfterFailure { until_ms, .. } => Some(*until_ms),
            _ => None,
        };
        let abort = self.gen.as_ref().and_then(|g| g.abort_at_ms);
        let retry = match (&self.pending_record, &self.writing) {
            (Some((_, Some(tried))), None) => Some(tried + self.cfg.record_retry_ms),
            _ => None,
        };
        [phase, abort, retry, self.grace_until_ms]
            .into_iter()
            .flatten()
            .min()
    }

    /// Feed one event at time `now_ms`; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Effect> {
        if let Phase::Ended(_) = self.phase {
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            Event::Started {
                holds_state,
                step,
                cursor,
            } => self.started(holds_state, step, cursor, now_ms, &mut out),
            Event::PlanSeen(plan) => self.plan_seen(plan, now_ms, &mut out),
            Event::MembershipLost { reason } => self.membership_lost(reason, now_ms, &mut out),
            Event::Registered => {
                if self.phase == Phase::Registering {
                    self.phase = Phase::WaitingForPlan;
                    self.consider_latest(now_ms, &mut out);
                }
            }
            Event::JobRecord { step } => self.job_record(step, now_ms, &mut out),
            Event::CommunicatorBuilt { generation } => {
                if self.current(generation) && self.phase == Phase::Forming {
                    self.exchange(0, now_ms, &mut out);
                }
            }
            Event::StatesExchanged {
                generation,
                round,
                states,
            } => {
                if self.current(generation) {
                    self.states_exchanged(round, states, now_ms, &mut out);
                }
            }
            Event::CheckpointLoaded {
                generation,
                step,
                cursor,
                hash: _,
            } => {
                if self.current(generation) && self.phase == Phase::Loading {
                    self.holds_state = true;
                    self.step = step;
                    self.cursor = cursor;
                    out.push(fx(
                        Action::NoteState {
                            source: StateSource::Checkpoint,
                            step,
                            generation: Some(generation),
                        },
                        "no member held the job's state: loaded the committed checkpoint",
                    ));
                    self.exchange(LOADED_ROUND, now_ms, &mut out);
                }
            }
            Event::StateCopied {
                generation,
                step,
                cursor,
            } => {
                if self.current(generation) && self.phase == Phase::Copying {
                    self.holds_state = true;
                    self.step = step;
                    self.cursor = cursor;
                    out.push(fx(
                        Action::NoteState {
                            source: StateSource::Copy,
                            step,
                            generation: Some(generation),
                        },
                        "copied the reference state from a peer",
                    ));
                    self.start_trainer(now_ms, &mut out);
                }
            }
            Event::StateServed { generation } => {
                if self.current(generation) && self.phase == Phase::Serving {
                    self.start_trainer(now_ms, &mut out);
                }
            }
            Event::TrainerStarted { generation } => {
                if self.current(generation) && self.phase == Phase::StartingTrainer {
                    if let Some(g) = self.gen.as_mut() {
                        g.trainer = true;
                        g.step0 = self.step;
                    }
                    self.boundary(now_ms, &mut out);
                }
            }
            Event::StepDone {
                generation,
                loss,
                skipped,
                elapsed_ms,
            } => {
                if self.current(generation) && matches!(self.phase, Phase::Stepping { .. }) {
                    self.step_done(loss, skipped, elapsed_ms, now_ms, &mut out);
                }
            }
            Event::Evaluated {
                generation,
                val_loss,
            } => {
                if self.current(generation) && self.phase == Phase::Evaluating {
                    if let Some(g) = self.gen.as_mut() {
                        g.val_loss = Some(val_loss);
                    }
                    self.after_checks(now_ms, &mut out);
                }
            }
            Event::Failed {
                generation,
                peers_may_have_failed,
                error,
            } => {
                if self.current(generation) {
                    self.failed(peers_may_have_failed, error, now_ms, &mut out);
                }
            }
            Event::TrainerFailed { generation, error } => {
                if self.current(generation) {
                    self.trainer_failed(error, now_ms, &mut out);
                }
            }
            Event::Fatal { error } => self.exit(Exit::Failed, error, &mut out),
            Event::CheckpointCommitted {
                step,
                url,
                generation,
            } => self.checkpoint_committed(
                Record {
                    step,
                    url,
                    generation,
                },
                now_ms,
                &mut out,
            ),
            Event::CheckpointFailed { step, error } => {
                if let Phase::Committing { step: s, leave, .. } = self.phase {
                    if s == step {
                        let what = match leave {
                            true => format!("the checkpoint of step {step} before leaving"),
                            false => format!("the final checkpoint (step {step})"),
                        };
                        return self.exit_now(
                            Exit::Failed,
                            format!("{what} was not committed ({error}): fix the store; the job resumes from its last committed checkpoint"),
                        );
                    }
                }
                out.push(fx(
                    Action::Say(format!(
                        "warning: checkpoint at step {step} failed, training goes on: {error}"
                    )),
                    "a periodic checkpoint failed; the next one may succeed",
                ));
            }
            Event::RecordWritten { step } => {
                let retried = self.writing.take().is_some_and(|(_, r)| r);
                self.recorded_step = Some(self.recorded_step.unwrap_or(0).max(step));
                if self
                    .pending_record
                    .as_ref()
                    .is_some_and(|(r, _)| r.step <= step)
                {
                    self.pending_record = None;
                }
                out.push(fx(
                    Action::Say(format!(
                        "checkpoint of step {step} committed{}",
                        if retried {
                            "; etcd took its record once it answered again"
                        } else {
                            ""
                        }
                    )),
                    "its fenced etcd record is written",
                ));
                self.after_record(step, true, now_ms, &mut out);
                self.write_queued(&mut out);
            }
            Event::RecordRefused { step, reason } => {
                self.writing = None;
                self.refused_step = Some(step);
                if self
                    .pending_record
                    .as_ref()
                    .is_some_and(|(r, _)| r.step <= step)
                {
                    self.pending_record = None;
                }
                out.push(fx(
                    Action::Say(format!("warning: the checkpoint of step {step} is in the store but its etcd record was refused ({reason}): a newer generation commits instead")),
                    "the record is fenced on the generation that saved it",
                ));
                self.after_record(step, false, now_ms, &mut out);
                self.write_queued(&mut out);
            }
            Event::RecordUnreachable { step, error } => {
                if let Some((rec, retried)) = self.writing.take().filter(|(r, _)| r.step == step) {
                    let newer = self
                        .pending_record
                        .as_ref()
                        .is_some_and(|(r, _)| r.step > step);
                    if !newer {
                        if !retried {
                            out.push(fx(
                                Action::Say(format!("warning: checkpoint of step {step} is in the store but etcd did not take its record ({error}); training goes on and the record is tried again")),
                                "a record etcd did not take waits and is retried",
                            ));
                        }
                        self.pending_record = Some((rec, Some(now_ms)));
                    }
                }
                self.write_queued(&mut out);
            }
            Event::FinalRecordSeen { step } => {
                if matches!(self.phase, Phase::WaitingForFinal { .. }) && step >= self.step {
                    self.recorded_step = Some(step);
                    out.push(fx(Action::Plot, "the job is done"));
                    self.exit(
                        Exit::Done,
                        format!("the final checkpoint (step {step}) is committed"),
                        &mut out,
                    );
                }
            }
            Event::Drain { checkpoint } => {
                self.drain = Some(checkpoint || self.drain.unwrap_or(false));
                self.drain_now_if_idle(now_ms, &mut out);
            }
            Event::Sigterm { grace_ms } => {
                self.drain = Some(true);
                self.grace_until_ms = Some(now_ms + grace_ms);
                out.push(fx(
                    Action::Say(format!(
                        "SIGTERM: draining with a checkpoint (grace period {} s)",
                        grace_ms / 1000
                    )),
                    "SIGTERM drains the node with a checkpoint",
                ));
                self.drain_now_if_idle(now_ms, &mut out);
            }
            Event::Pause => self.paused = true,
            Event::Resume => {
                self.paused = false;
                if self.phase == Phase::Paused {
                    out.push(fx(Action::Say("resumed".into()), "an operator resumed"));
                    self.boundary(now_ms, &mut out);
                }
            }
            Event::CheckpointNow => self.checkpoint_now = true,
            Event::EtcdReachable { reachable } => self.etcd_reachable(reachable, now_ms, &mut out),
            Event::Tick => self.tick(now_ms, &mut out),
        }
        out
    }

    fn current(&self, generation: u64) -> bool {
        self.gen
            .as_ref()
            .is_some_and(|g| g.plan.generation == generation)
    }

    fn exit(&mut self, how: Exit, message: String, out: &mut Vec<Effect>) {
        self.log_unlogged(out);
        self.phase = Phase::Ended(how);
        out.push(fx(Action::Exit(how), message));
    }

    fn exit_now(&mut self, how: Exit, message: String) -> Vec<Effect> {
        let mut out = Vec::new();
        self.exit(how, message, &mut out);
        out
    }

    fn started(
        &mut self,
        holds_state: bool,
        step: u64,
        cursor: u64,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        if self.phase != Phase::Starting {
            return;
        }
        self.holds_state = holds_state;
        self.step = step;
        self.cursor = cursor;
        let source = match (holds_state, step) {
            (false, _) => StateSource::None,
            (true, 0) => StateSource::Init,
            (true, _) => StateSource::Checkpoint,
        };
        out.push(fx(
            Action::NoteState {
                source,
                step,
                generation: None,
            },
            "the node's starting state",
        ));
        self.consider_latest(now_ms, out);
    }

    /// The plan `plan` is one this node trains in: newer than its last generation, with
    /// ranks for it, and (for the first) with at least `start_nodes` nodes. `Err` says
    /// why not.
    fn qualifies(&self, plan: &Plan) -> Result<(), String> {
        if self.last_gen.is_some_and(|g| plan.generation <= g) {
            return Err(format!(
                "generation {} is not newer than the last one this node trained in",
                plan.generation
            ));
        }
        let nodes = plan
            .members
            .iter()
            .filter(|m| !plan.ranks_of(m).is_empty())
            .count();
        if self.last_gen.is_none() && nodes < self.cfg.start_nodes {
            return Err(format!(
                "generation {} has {nodes} node(s); waiting for {} (--start-nodes)",
                plan.generation, self.cfg.start_nodes
            ));
        }
        if plan.ranks_of(&self.cfg.me).is_empty() {
            return Err(format!(
                "generation {} has no rank for this node ({}); waiting",
                plan.generation, plan.reason
            ));
        }
        Ok(())
    }

    fn plan_seen(&mut self, plan: Plan, now_ms: u64, out: &mut Vec<Effect>) {
        if self
            .latest
            .as_ref()
            .is_some_and(|l| plan.generation <= l.generation)
        {
            return;
        }
        self.latest = Some(plan.clone());
        let newer_than_gen = self
            .gen
            .as_ref()
            .is_some_and(|g| plan.generation > g.plan.generation);
        match self.phase {
            Phase::WaitingForPlan => self.consider_latest(now_ms, out),
            Phase::AfterFailure { .. } | Phase::WaitingForFinal { .. } if newer_than_gen => {
                out.push(fx(
                    Action::Say(format!(
                        "generation {} was planned; re-forming",
                        plan.generation
                    )),
                    "a newer plan replaces the generation this node waits in",
                ));
                self.end_generation(out);
                self.consider_latest(now_ms, out);
            }
            Phase::Forming
            | Phase::Exchanging(_)
            | Phase::Loading
            | Phase::Copying
            | Phase::Serving
            | Phase::StartingTrainer
            | Phase::Stepping { .. }
            | Phase::Comparing
            | Phase::Evaluating
            | Phase::Paused
            | Phase::Committing { .. }
                if newer_than_gen =>
            {
                self.reform_pending(&plan, now_ms, out)
            }
            _ => {}
        }
    }

    /// A newer plan ends the generation at the next boundary. If it drops a member the
    /// communicator is aborted now (the step in flight cannot complete); otherwise the
    /// step in flight gets `reform_grace_ms` to complete (aborting it at once could leave
    /// some members past it and others not).
    fn reform_pending(&mut self, next: &Plan, now_ms: u64, out: &mut Vec<Effect>) {
        let grace = self.cfg.reform_grace_ms;
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        let generation = g.plan.generation;
        g.ending = Some(format!("generation {} was planned", next.generation));
        if matches!(self.phase, Phase::Committing { .. }) {
            // The final (or drain) checkpoint's record decides: the fence refuses it once
            // the newer generation is current.
            return;
        }
        if keeps_every_member(&g.plan, next) {
            if g.abort_at_ms.is_none() {
                g.abort_at_ms = Some(now_ms + grace);
            }
        } else {
            g.abort_at_ms = None;
            out.push(fx(
                Action::Abort { generation },
                format!(
                    "generation {} drops a member of generation {generation}: its step in flight cannot complete",
                    next.generation
                ),
            ));
        }
    }

    fn membership_lost(&mut self, reason: String, now_ms: u64, out: &mut Vec<Effect>) {
        match self.phase {
            Phase::Starting | Phase::Rejoining { .. } | Phase::Registering | Phase::Ended(_) => {}
            Phase::WaitingForPlan | Phase::AfterFailure { .. } => {
                self.lost = Some(reason);
                self.end_generation(out);
                self.rejoin(now_ms, out);
            }
            Phase::CheckingDone => self.lost = Some(reason),
            Phase::Committing { step, .. } => self.exit(
                Exit::Failed,
                format!(
                    "lost its membership ({reason}) while recording the checkpoint of step {step}"
                ),
                out,
            ),
            Phase::WaitingForFinal { .. } => self.exit(
                Exit::Failed,
                format!("lost its membership ({reason}) while waiting for the final checkpoint"),
                out,
            ),
            _ => {
                let Some(g) = self.gen.as_mut() else {
                    return;
                };
                g.ending = Some(format!("this node lost its membership: {reason}"));
                g.abort_at_ms = None;
                let generation = g.plan.generation;
                self.lost = Some(reason);
                out.push(fx(
                    Action::Abort { generation },
                    "this node lost its membership: nothing it does in the generation counts",
                ));
            }
        }
    }

    /// Register again after the membership was lost, keeping the state (the next
    /// generation compares it and copies over where it is behind), after a backoff
    /// that doubles with each registration in a row that trained no step.
    fn rejoin(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let reason = self.lost.take().unwrap_or_default();
        if std::mem::take(&mut self.stepped_since_rejoin) {
            self.rejoins_in_a_row = 0;
        }
        self.rejoins_in_a_row += 1;
        if self.rejoins_in_a_row > self.cfg.max_rejoins {
            let n = self.rejoins_in_a_row - 1;
            self.exit(
                Exit::Failed,
                format!("lost its membership {n} times in a row without training a step (last: {reason}); check its network to the peers and etcd, then restart it"),
                out,
            );
            return;
        }
        let backoff = rejoin_backoff_ms(
            self.rejoins_in_a_row,
            self.cfg.rejoin_backoff_first_ms,
            self.cfg.rejoin_backoff_max_ms,
        );
        self.phase = Phase::Rejoining {
            at_ms: now_ms + backoff,
        };
        out.push(fx(
            Action::Say(format!(
                "lost its membership ({reason}); registering again in {backoff} ms"
            )),
            format!(
                "registration {} in a row without a step: backoff {backoff} ms",
                self.rejoins_in_a_row
            ),
        ));
    }

    /// Waiting, with `latest` possibly newer: train in it if it qualifies.
    fn consider_latest(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        self.phase = Phase::WaitingForPlan;
        if self.lost.is_some() {
            self.rejoin(now_ms, out);
            return;
        }
        // A drained node leaves now, unless it owes a checkpoint and a plan to save it
        // in is there: then it trains in that plan up to its first boundary.
        let owes_checkpoint = self.drain == Some(true)
            && self.holds_state
            && self
                .latest
                .as_ref()
                .is_some_and(|p| self.qualifies(p).is_ok());
        if self.drain.is_some() && !owes_checkpoint {
            self.drain_now_if_idle(now_ms, out);
            return;
        }
        let Some(plan) = self.latest.clone() else {
            return;
        };
        match self.qualifies(&plan) {
            Ok(()) => {
                self.candidate = Some(plan);
                self.phase = Phase::CheckingDone;
                out.push(fx(
                    Action::CheckJobDone,
                    "a node that was away while the others finished must not train the job again alone",
                ));
            }
            Err(why) => {
                let newer = self.last_gen.is_none_or(|g| plan.generation > g);
                if newer && self.announced != Some(plan.generation) {
                    self.announced = Some(plan.generation);
                    out.push(fx(Action::Say(why.clone()), why));
                }
            }
        }
    }

    fn job_record(&mut self, step: Option<u64>, now_ms: u64, out: &mut Vec<Effect>) {
        if self.phase != Phase::CheckingDone {
            return;
        }
        self.job_record_step = step;
        if let Some(step) = step.filter(|&s| s >= self.cfg.target_steps) {
            out.push(fx(Action::Plot, "the job is done"));
            self.exit(
                Exit::Done,
                format!("job done (its final checkpoint, step {step}, was committed while this node was away)"),
                out,
            );
            return;
        }
        if self.lost.is_some() || self.drain == Some(false) {
            self.consider_latest(now_ms, out);
            return;
        }
        // A plan newer than the one checked may have come meanwhile.
        let plan = match self.latest.clone().filter(|p| self.qualifies(p).is_ok()) {
            Some(p) => p,
            None => match self.candidate.take() {
                Some(p) => p,
                None => {
                    self.consider_latest(now_ms, out);
                    return;
                }
            },
        };
        self.form(plan, out);
    }

    fn form(&mut self, plan: Plan, out: &mut Vec<Effect>) {
        let me = &self.cfg.me;
        let committer = plan.member_of(0) == Some(me);
        self.last_gen = Some(plan.generation);
        self.candidate = None;
        let reason = format!(
            "generation {}: ranks {:?} of {}{}; {}",
            plan.generation,
            plan.ranks_of(me),
            plan.world,
            if committer {
                "; commits checkpoints"
            } else {
                ""
            },
            plan.reason
        );
        let share = match self.cfg.shared_saves {
            true => share_of(&plan, me),
            false => None,
        };
        self.gen = Some(Gen {
            plan: plan.clone(),
            committer,
            share,
            step0: self.step,
            round: 0,
            states: Vec::new(),
            ending: None,
            abort_at_ms: None,
            trainer: false,
            val_loss: None,
            step_cursor: self.cursor,
            unlogged: None,
        });
        self.phase = Phase::Forming;
        out.push(fx(Action::BuildCommunicator { plan }, reason));
    }

    fn exchange(&mut self, round: u64, _now_ms: u64, out: &mut Vec<Effect>) {
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        g.round = round;
        self.phase = Phase::Exchanging(round);
        // A state older than the job's committed checkpoint is not offered: the group
        // copies a newer member's state or loads the checkpoint instead of training
        // from behind it (and recording older steps over it).
        let behind = self
            .job_record_step
            .filter(|&r| round == 0 && self.holds_state && self.step < r);
        out.push(fx(
            Action::ExchangeState {
                generation: g.plan.generation,
                round,
                step: self.step,
                holds_state: self.holds_state && behind.is_none(),
            },
            if let Some(r) = behind {
                format!(
                    "this node's state (step {}) is older than the job's checkpoint (step {r}): it offers none",
                    self.step
                )
            } else if round == 0 {
                "a generation trains only from one agreed state: compare (step, parameter hash)"
                    .to_string()
            } else {
                "compare again after loading the committed checkpoint".to_string()
            },
        ));
    }

    fn states_exchanged(
        &mut self,
        round: u64,
        states: Vec<PeerState>,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        match self.phase {
            Phase::Exchanging(r) if r == round => self.sync(states, now_ms, out),
            Phase::Comparing if round == self.step => self.hashes_compared(states, now_ms, out),
            _ => {}
        }
    }

    /// Decide, from every member's state, whether this node copies the reference state,
    /// serves it, or trains on.
    fn sync(&mut self, states: Vec<PeerState>, now_ms: u64, out: &mut Vec<Effect>) {
        let me = self.cfg.me.clone();
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        let generation = g.plan.generation;
        let round = g.round;
        g.states = states.clone();
        let Some(my_index) = states.iter().position(|s| s.member == me) else {
            self.failed(
                false,
                format!("the exchanged states of generation {generation} do not name this node"),
                now_ms,
                out,
            );
            return;
        };
        if states.iter().all(|s| s.hash.is_empty()) {
            if round == LOADED_ROUND {
                self.failed(
                    false,
                    "no member holds state even after loading the committed checkpoint".into(),
                    now_ms,
                    out,
                );
                return;
            }
            self.phase = Phase::Loading;
            out.push(fx(
                Action::LoadCheckpoint { generation },
                "no member holds the job's state (the group this node joined is gone): every member loads the committed checkpoint",
            ));
            return;
        }
        let pairs: Vec<(u64, &str)> = states.iter().map(|s| (s.step, s.hash.as_str())).collect();
        let donors = state_donors(&pairs);
        if let Some(d) = donors[my_index] {
            let want = &states[d];
            self.phase = Phase::Copying;
            out.push(fx(
                Action::FetchState {
                    generation,
                    donor: d,
                    step: want.step,
                    hash: want.hash.clone(),
                },
                format!(
                    "{} holds the reference state (step {}); this node {}",
                    want.member,
                    want.step,
                    if self.holds_state {
                        format!("is at step {} with other parameters or behind", self.step)
                    } else {
                        "holds no state".to_string()
                    }
                ),
            ));
            return;
        }
        let receivers: Vec<usize> = (0..donors.len())
            .filter(|&i| donors[i] == Some(my_index))
            .collect();
        if receivers.is_empty() {
            self.start_trainer(now_ms, out);
            return;
        }
        let names: Vec<&str> = receivers
            .iter()
            .map(|&i| states[i].member.as_str())
            .collect();
        let reason = format!(
            "{} copy the reference state from this node",
            names.join(", ")
        );
        self.phase = Phase::Serving;
        out.push(fx(
            Action::ServeState {
                generation,
                receivers,
            },
            reason,
        ));
    }

    fn start_trainer(&mut self, _now_ms: u64, out: &mut Vec<Effect>) {
        let Some(g) = self.gen.as_ref() else {
            return;
        };
        self.phase = Phase::StartingTrainer;
        out.push(fx(
            Action::StartTrainer {
                generation: g.plan.generation,
                step: self.step,
                cursor: self.cursor,
            },
            format!(
                "every member of generation {} holds the state of step {}",
                g.plan.generation, self.step
            ),
        ));
    }

    /// A step boundary: end the generation, leave, pause, save, or run the next step.
    fn boundary(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(g) = self.gen.as_ref() else {
            return;
        };
        let generation = g.plan.generation;
        let (step, cursor) = (self.step, self.cursor);
        if step >= self.cfg.target_steps {
            self.finish(now_ms, out);
            return;
        }
        if let Some(why) = g.ending.clone() {
            out.push(fx(
                Action::StopAfter { generation, step },
                format!("{why}: generation {generation} ends after step {step}; re-forming"),
            ));
            self.end_generation(out);
            if self.lost.is_some() {
                self.rejoin(now_ms, out);
            } else {
                self.consider_latest(now_ms, out);
            }
            return;
        }
        if let Some(with_checkpoint) = self.drain {
            if with_checkpoint {
                out.push(fx(
                    Action::Save {
                        generation,
                        step,
                        cursor,
                        share: None,
                    },
                    "drained with a checkpoint: save before leaving",
                ));
                self.refused_step = None;
                self.phase = Phase::Committing {
                    step,
                    leave: true,
                    until_ms: now_ms + self.cfg.final_timeout_ms,
                };
            } else {
                self.leave(out);
            }
            return;
        }
        if self.paused {
            self.phase = Phase::Paused;
            out.push(fx(
                Action::Say(format!("paused after step {step}")),
                "an operator paused training",
            ));
            return;
        }
        if std::mem::take(&mut self.checkpoint_now) {
            out.push(fx(
                Action::Save {
                    generation,
                    step,
                    cursor,
                    share: None,
                },
                "an operator asked for a checkpoint",
            ));
        }
        let deadline_ms = self.step_deadline_ms(step, g.step0);
        self.phase = Phase::Stepping {
            started_ms: now_ms,
            deadline_ms,
            reported: false,
        };
        out.push(fx(
            Action::RunStep {
                generation,
                step,
                cursor,
                deadline_ms,
            },
            self.deadline.deadline_reason(),
        ));
    }

    /// The deadline of step `step + 1` in a generation that started training at `step0`:
    /// the detector's, at least `first_step_deadline_ms` for the generation's first step
    /// (connections, copies), and `committer_work_factor` times longer (at least
    /// `committer_work_deadline_ms`) after a boundary where the committer evaluated or
    /// saved (every member knows when: the cadences are the job's).
    pub fn step_deadline_ms(&self, step: u64, step0: u64) -> u64 {
        let base = self.deadline.deadline_ms();
        let c = &self.cfg;
        let after_committer_work = step > step0
            && ((c.eval_every > 0 && step.is_multiple_of(c.eval_every))
                || (c.ckpt_every > 0 && step.is_multiple_of(c.ckpt_every)));
        if after_committer_work {
            base.saturating_mul(c.committer_work_factor)
                .max(c.committer_work_deadline_ms)
        } else if step == step0 {
            base.max(c.first_step_deadline_ms)
        } else {
            base
        }
    }

    fn leave(&mut self, out: &mut Vec<Effect>) {
        if let Some(g) = self.gen.as_ref() {
            let generation = g.plan.generation;
            out.push(fx(
                Action::StopAfter {
                    generation,
                    step: self.step,
                },
                "this node leaves: the others stop waiting for it",
            ));
            out.push(fx(
                Action::Close { generation },
                "drain the send queues before leaving",
            ));
        }
        self.end_generation(out);
        self.exit(Exit::Left, "left the job (drained)".into(), out);
    }

    /// The job reached its target: the committer saves the final checkpoint and waits
    /// for its record; the others wait for that record, so that nobody leaves (and
    /// re-forms the group) before it is committed.
    fn finish(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(g) = self.gen.as_ref() else {
            return;
        };
        let generation = g.plan.generation;
        let step = self.step;
        let until_ms = now_ms + self.cfg.final_timeout_ms;
        if g.committer {
            self.refused_step = None;
            self.phase = Phase::Committing {
                step,
                leave: false,
                until_ms,
            };
            out.push(fx(
                Action::Save {
                    generation,
                    step,
                    cursor: self.cursor,
                    share: g.share.clone(),
                },
                "the job reached its target step: the committer saves the final checkpoint",
            ));
        } else if let Some(next) = self
            .latest
            .as_ref()
            .map(|l| l.generation)
            .filter(|&l| l > generation)
        {
            // The newer plan came during the last step: it is not seen again, and the
            // fence refuses the committer's record of this generation.
            out.push(fx(
                Action::Say(format!(
                    "the job reached its target step in generation {generation}, but generation {next} was planned: finishing in it"
                )),
                "the final record is fenced on the current generation: the committer saves it again in the newer one",
            ));
            self.end_generation(out);
            self.consider_latest(now_ms, out);
        } else {
            if let Some(share) = g.share.clone() {
                out.push(fx(
                    Action::Save {
                        generation,
                        step,
                        cursor: self.cursor,
                        share: Some(share),
                    },
                    "the job reached its target step: every replica writes its share of the final checkpoint",
                ));
            }
            self.phase = Phase::WaitingForFinal { until_ms };
            out.push(fx(
                Action::WaitForFinalRecord { generation, step },
                "the job reached its target step: wait until the committer's final checkpoint is recorded",
            ));
        }
    }

    fn step_done(
        &mut self,
        loss: f64,
        skipped: bool,
        elapsed_ms: u64,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        if self.step != g.step0 {
            // A generation's first step also waits for connections and copies.
            self.deadline.observe(elapsed_ms);
        }
        g.step_cursor = self.cursor;
        g.val_loss = None;
        let generation = g.plan.generation;
        self.step += 1;
        self.cursor += self.cfg.batch_size;
        self.stepped_since_rejoin = true;
        if skipped {
            self.bad_in_a_row += 1;
            out.push(fx(
                Action::Say(format!(
                    "warning: step {}: non-finite loss ({loss}) or gradient norm: update skipped",
                    self.step
                )),
                "every member skips the same update (it decides from reduced values)",
            ));
            if self.cfg.max_bad_steps > 0 && self.bad_in_a_row >= self.cfg.max_bad_steps {
                let (n, step, cursor) = (self.bad_in_a_row, self.step, g.step_cursor);
                out.push(fx(
                    Action::LogStep {
                        generation,
                        step,
                        cursor,
                        val_loss: None,
                    },
                    "the step log records every step",
                ));
                self.exit(
                    Exit::Failed,
                    format!("stopping: {n} non-finite steps in a row (last at step {step}); nothing was saved after the last checkpoint: lower --lr or check the data, then resume"),
                    out,
                );
                return;
            }
        } else {
            self.bad_in_a_row = 0;
        }
        let c = &self.cfg;
        if c.hash_check_every > 0
            && self.step.is_multiple_of(c.hash_check_every)
            && self.step < c.target_steps
        {
            self.phase = Phase::Comparing;
            g.unlogged = Some(self.step);
            out.push(fx(
                Action::CompareHashes {
                    generation,
                    step: self.step,
                },
                format!(
                    "every {} steps the members compare parameters",
                    c.hash_check_every
                ),
            ));
            return;
        }
        self.after_checks(now_ms, out);
    }

    fn hashes_compared(&mut self, states: Vec<PeerState>, now_ms: u64, out: &mut Vec<Effect>) {
        let me = self.cfg.me.clone();
        let step = self.step;
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        let generation = g.plan.generation;
        let mine = states
            .iter()
            .find(|s| s.member == me)
            .map(|s| s.hash.clone());
        let agree = mine.is_some()
            && states
                .iter()
                .all(|s| Some(&s.hash) == mine.as_ref() && s.step == step);
        if agree {
            self.after_checks(now_ms, out);
            return;
        }
        let cursor = g.step_cursor;
        g.round = step;
        g.unlogged = None;
        out.push(fx(
            Action::Alarm {
                generation,
                step,
                states: states.clone(),
            },
            format!("parameters differ between members after step {step}: the odd ones copy the group's"),
        ));
        out.push(fx(
            Action::LogStep {
                generation,
                step,
                cursor,
                val_loss: None,
            },
            "the step log records every step",
        ));
        if g.trainer {
            g.trainer = false;
            out.push(fx(
                Action::StopTrainer { generation },
                "the state is compared and copied with the trainer stopped",
            ));
        }
        self.sync(states, now_ms, out);
    }

    /// After a step and its comparison: evaluate, log, save, then the next boundary.
    fn after_checks(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let step = self.step;
        let cursor = self.cursor;
        let c = &self.cfg;
        let last = step == c.target_steps;
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        let generation = g.plan.generation;
        if g.committer
            && g.val_loss.is_none()
            && ((c.eval_every > 0 && step.is_multiple_of(c.eval_every)) || last)
        {
            self.phase = Phase::Evaluating;
            g.unlogged = Some(step);
            out.push(fx(
                Action::Evaluate { generation, step },
                "the committer evaluates at the evaluation cadence and at the end",
            ));
            return;
        }
        g.unlogged = None;
        out.push(fx(
            Action::LogStep {
                generation,
                step,
                cursor: g.step_cursor,
                val_loss: g.val_loss,
            },
            "the step log records every step",
        ));
        let writes = g.committer || g.share.is_some();
        if writes && !last && c.ckpt_every > 0 && step.is_multiple_of(c.ckpt_every) {
            let who = match (&g.share, g.committer) {
                (None, _) => "the committer saves",
                (Some(_), true) => "every replica writes its share and the committer commits",
                (Some(_), false) => "every replica writes its share of the checkpoint",
            };
            out.push(fx(
                Action::Save {
                    generation,
                    step,
                    cursor,
                    share: g.share.clone(),
                },
                format!("{who} every {} steps (--ckpt-every)", c.ckpt_every),
            ));
        }
        self.boundary(now_ms, out);
    }

    /// An operation of the generation failed: re-form if a newer plan (or a lost
    /// membership) explains it, else wait `reform_window_ms` for one.
    fn failed(
        &mut self,
        peers_may_have_failed: bool,
        error: String,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(g) = self.gen.as_ref() else {
            return;
        };
        let generation = g.plan.generation;
        // Only an operation of the generation in progress can fail it.
        if !matches!(
            self.phase,
            Phase::Forming
                | Phase::Exchanging(_)
                | Phase::Loading
                | Phase::Copying
                | Phase::Serving
                | Phase::StartingTrainer
                | Phase::Stepping { .. }
                | Phase::Comparing
                | Phase::Evaluating
                | Phase::Paused
        ) {
            return;
        }
        self.log_unlogged(out);
        if peers_may_have_failed {
            out.push(fx(
                Action::ReportFailedPeers { generation },
                "a peer whose stream failed is reported; the leader confirms before evicting",
            ));
        }
        let step = self.step;
        if let Some(why) = self.gen.as_ref().and_then(|g| g.ending.clone()) {
            out.push(fx(
                Action::Say(format!(
                    "generation {generation} ended during step {} ({error}); re-forming",
                    step + 1
                )),
                why,
            ));
            self.end_generation(out);
            if self.lost.is_some() {
                self.rejoin(now_ms, out);
            } else {
                self.consider_latest(now_ms, out);
            }
            return;
        }
        let window = self.cfg.reform_window_ms;
        if let Some(since) = self.etcd_down_since_ms {
            let until_ms = (since + self.cfg.etcd_outage_timeout_ms).max(now_ms + window);
            out.push(fx(
                Action::Say(format!(
                    "generation {generation}: step {} failed ({error}); etcd does not answer: waiting for etcd (up to {} s more, --etcd-outage-timeout-s) to re-form, holding the state of step {step}",
                    step + 1,
                    (until_ms - now_ms) / 1000
                )),
                "without etcd no plan can replace the generation: keep the state and wait for etcd",
            ));
            self.phase = Phase::AfterFailure { until_ms, error };
            return;
        }
        out.push(fx(
            Action::Say(format!(
                "generation {generation}: step {} failed ({error}); waiting up to {} s for a new plan",
                step + 1,
                window / 1000
            )),
            "a failure is followed by a re-formation if a newer plan comes within the window",
        ));
        self.phase = Phase::AfterFailure {
            until_ms: now_ms + window,
            error,
        };
    }

    /// etcd stopped or started answering the membership agent. A node waiting for a
    /// plan after a failure waits for etcd while it is down (up to
    /// `etcd_outage_timeout_ms` from the outage's start), then `reform_window_ms` from
    /// its return; a checkpoint record etcd did not take is tried again at once when
    /// etcd answers.
    fn etcd_reachable(&mut self, reachable: bool, now_ms: u64, out: &mut Vec<Effect>) {
        let window = self.cfg.reform_window_ms;
        match (reachable, self.etcd_down_since_ms) {
            (false, None) => {
                self.etcd_down_since_ms = Some(now_ms);
                if let Phase::AfterFailure { until_ms, error } = self.phase.clone() {
                    let until_ms = until_ms.max(now_ms + self.cfg.etcd_outage_timeout_ms);
                    out.push(fx(
                        Action::Say(format!(
                            "etcd does not answer: waiting for etcd (up to {} s, --etcd-outage-timeout-s) to re-form, holding the state of step {}",
                            (until_ms - now_ms) / 1000,
                            self.step
                        )),
                        "without etcd no plan can replace the generation: keep the state and wait for etcd",
                    ));
                    self.phase = Phase::AfterFailure { until_ms, error };
                }
            }
            (true, Some(since)) => {
                self.etcd_down_since_ms = None;
                if let Phase::AfterFailure { error, .. } = self.phase.clone() {
                    out.push(fx(
                        Action::Say(format!(
                            "etcd answers again after {:.1} s: waiting up to {} s for a new plan",
                            (now_ms - since) as f64 / 1000.0,
                            window / 1000
                        )),
                        "the plan that replaces the generation can be written now",
                    ));
                    self.phase = Phase::AfterFailure {
                        until_ms: now_ms + window,
                        error,
                    };
                }
                if self.writing.is_none() {
                    if let Some((rec, Some(_))) = self.pending_record.clone() {
                        self.pending_record = None;
                        self.write_record(rec, true, out);
                    }
                }
            }
            _ => {}
        }
    }

    /// The trainer died: its state is lost. Leave the group (the others re-form without
    /// this node at once instead of waiting for its deadline) and join again holding no
    /// state, so that the next generation copies the group's state to it.
    fn trainer_failed(&mut self, error: String, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        let generation = g.plan.generation;
        g.trainer = false;
        self.holds_state = false;
        out.push(fx(
            Action::Abort { generation },
            format!("this node's trainer died ({error}): nothing it computes counts"),
        ));
        out.push(fx(
            Action::DropTrainer { generation },
            "a dead trainer's state cannot be read",
        ));
        out.push(fx(
            Action::Say(format!(
                "warning: its trainer died ({error}); leaving the job and joining again with a copy of the group's state"
            )),
            "a trainer that fails makes its node leave cleanly and rejoin by copying state",
        ));
        out.push(fx(
            Action::Leave,
            "the others re-form without this node at once",
        ));
        self.end_generation(out);
        self.lost = Some(format!("its trainer died: {error}"));
        self.rejoin(now_ms, out);
    }

    /// A failure that no newer plan followed within the window: the group this node
    /// failed in may still stand (the failure was this node's own, e.g. etcd refused it
    /// one call while the plan stayed), so waiting longer changes nothing. It leaves and
    /// registers again holding its state (the rejoins in a row are bounded), so that the
    /// others re-form with it or without it.
    fn rejoin_after_failure(&mut self, error: String, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(generation) = self.gen.as_ref().map(|g| g.plan.generation) else {
            return;
        };
        let window_s = self.cfg.reform_window_ms / 1000;
        out.push(fx(
            Action::Abort { generation },
            format!("no newer plan within {window_s} s after the failure: nothing more is computed in generation {generation}"),
        ));
        self.end_generation(out);
        out.push(fx(
            Action::Say(format!(
                "generation {generation}: no new plan within {window_s} s after its failure ({error}); leaving and registering again, holding the state of step {}",
                self.step
            )),
            "the plan stands without this node training in it: registering again makes the leader plan anew",
        ));
        out.push(fx(
            Action::Leave,
            "the others re-form without this node at once",
        ));
        self.lost = Some(format!("no new plan after: {error}"));
        self.rejoin(now_ms, out);
    }

    /// A step applied but not logged yet (its comparison or evaluation broke off): its
    /// line now, without the validation loss. The state goes on from that step, so the
    /// step log must show it.
    fn log_unlogged(&mut self, out: &mut Vec<Effect>) {
        let step = self.step;
        let Some(g) = self.gen.as_mut() else {
            return;
        };
        if g.unlogged.take() == Some(step) {
            out.push(fx(
                Action::LogStep {
                    generation: g.plan.generation,
                    step,
                    cursor: g.step_cursor,
                    val_loss: None,
                },
                "a step applied before its comparison or evaluation broke off is still logged",
            ));
        }
    }

    /// The generation's work is over on this node: take the trainer's state back.
    fn end_generation(&mut self, out: &mut Vec<Effect>) {
        self.log_unlogged(out);
        if let Some(g) = self.gen.as_mut() {
            g.abort_at_ms = None;
            if std::mem::take(&mut g.trainer) {
                out.push(fx(
                    Action::StopTrainer {
                        generation: g.plan.generation,
                    },
                    "the generation ends: the state to go on from is the last completed step",
                ));
            }
        }
    }

    fn checkpoint_committed(&mut self, rec: Record, now_ms: u64, out: &mut Vec<Effect>) {
        if self.writing.is_some() {
            // Written once the write in flight is answered.
            self.pending_record = Some((rec, None));
            return;
        }
        match self.pending_record.take() {
            Some((_, Some(tried))) if now_ms < tried + self.cfg.record_retry_ms => {
                // etcd did not answer lately: the newer record waits for the next retry
                // instead of holding this step for another attempt.
                self.pending_record = Some((rec, Some(tried)));
            }
            older => self.write_record(rec, older.is_some(), out),
        }
    }

    /// A record that came while a write was in flight is written once it is answered.
    fn write_queued(&mut self, out: &mut Vec<Effect>) {
        if self.writing.is_none() && matches!(self.pending_record, Some((_, None))) {
            if let Some((rec, _)) = self.pending_record.take() {
                self.write_record(rec, false, out);
            }
        }
    }

    fn write_record(&mut self, rec: Record, retry: bool, out: &mut Vec<Effect>) {
        self.writing = Some((rec.clone(), retry));
        let reason = format!(
            "the checkpoint of step {} is committed in the store; it becomes the job's once its record, fenced on generation {}, is written",
            rec.step, rec.generation
        );
        out.push(fx(Action::WriteRecord(rec), reason));
    }

    fn after_record(&mut self, step: u64, written: bool, now_ms: u64, out: &mut Vec<Effect>) {
        let Phase::Committing { step: s, leave, .. } = self.phase else {
            return;
        };
        if s != step {
            return;
        }
        if leave {
            self.leave(out);
        } else if written {
            out.push(fx(Action::Plot, "the job is done"));
            self.exit(Exit::Done, "job done".into(), out);
        } else {
            out.push(fx(
                Action::Say(format!(
                    "the generation ended before the record of the final checkpoint (step {step}); saving it again in the next"
                )),
                "a refused final record is saved again by the newer generation",
            ));
            self.end_generation(out);
            self.consider_latest(now_ms, out);
        }
    }

    fn drain_now_if_idle(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        match self.phase {
            Phase::WaitingForPlan => {
                let msg = if self.last_gen.is_none() {
                    "left the job before training (drained)"
                } else {
                    "left the job (drained while waiting for a plan)"
                };
                self.exit(Exit::Left, msg.into(), out);
            }
            Phase::Paused => {
                // Leaving does not wait for a resume: the boundary acts on the drain now.
                self.paused = false;
                self.boundary(now_ms, out);
            }
            _ => {}
        }
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        if self.grace_until_ms.is_some_and(|t| now_ms >= t) {
            self.exit(
                Exit::GraceExpired,
                "SIGTERM's grace period ran out before the node could leave cleanly".into(),
                out,
            );
            return;
        }
        if let Some(g) = self.gen.as_mut() {
            if g.abort_at_ms.is_some_and(|t| now_ms >= t) {
                g.abort_at_ms = None;
                out.push(fx(
                    Action::Abort {
                        generation: g.plan.generation,
                    },
                    format!(
                        "{}: the step in flight had {} ms to complete",
                        g.ending.clone().unwrap_or_default(),
                        self.cfg.reform_grace_ms
                    ),
                ));
            }
        }
        if self.writing.is_none() {
            if let Some((rec, Some(tried))) = self.pending_record.clone() {
                if now_ms >= tried + self.cfg.record_retry_ms {
                    self.pending_record = None;
                    self.write_record(rec, true, out);
                }
            }
        }
        let step = self.step;
        match self.phase.clone() {
            Phase::Rejoining { at_ms } if now_ms >= at_ms => {
                self.phase = Phase::Registering;
                out.push(fx(Action::Register, "the backoff before registering again is over"));
            }
            Phase::Stepping {
                started_ms,
                deadline_ms,
                reported: false,
            } if now_ms >= started_ms + deadline_ms => {
                self.phase = Phase::Stepping {
                    started_ms,
                    deadline_ms,
                    reported: true,
                };
                let Some(g) = self.gen.as_ref() else {
                    return;
                };
                // Lateness while a re-formation is pending is the re-formation's; while
                // the job is paused, the pause's.
                if g.ending.is_none() && !self.paused {
                    out.push(fx(
                        Action::ReportLate {
                            generation: g.plan.generation,
                            step,
                            waited_ms: now_ms - started_ms,
                        },
                        format!(
                            "step {} is past its deadline of {deadline_ms} ms: the members it waits for are reported (the step goes on)",
                            step + 1
                        ),
                    ));
                }
            }
            Phase::Committing { until_ms, .. } if now_ms >= until_ms => self.exit(
                Exit::Failed,
                format!("the checkpoint of step {step} was not committed within {} s: fix the store and etcd; the job resumes from its last committed checkpoint", self.cfg.final_timeout_ms / 1000),
                out,
            ),
            Phase::WaitingForFinal { until_ms } if now_ms >= until_ms => self.exit(
                Exit::Failed,
                format!("the final checkpoint of step {step} was not committed within {} s", self.cfg.final_timeout_ms / 1000),
                out,
            ),
            Phase::AfterFailure { until_ms, error }
                if now_ms >= until_ms && self.etcd_down_since_ms.is_none() =>
            {
                self.rejoin_after_failure(error, now_ms, out)
            }
            Phase::AfterFailure { until_ms, error } if now_ms >= until_ms => {
                let why = match self.etcd_down_since_ms {
                    Some(since) => format!(
                        "etcd did not answer for {} s (--etcd-outage-timeout-s {}): bring etcd back and restart the daemons; the job resumes from its last committed checkpoint",
                        (now_ms - since) / 1000,
                        self.cfg.etcd_outage_timeout_ms / 1000
                    ),
                    None => format!("no new plan within {} s", self.cfg.reform_window_ms / 1000),
                };
                self.exit(
                    Exit::Failed,
                    format!("training stopped at step {}: {error} ({why})", step + 1),
                    out,
                )
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{compute_plan, MemberInfo, PlannerConfig};

    fn info(id: &str, joined_gen: u64) -> MemberInfo {
        MemberInfo {
            id: MemberId::new(id),
            devices: 1,
            joined_gen,
            addr: String::new(),
            metrics_addr: String::new(),
        }
    }

    /// The plan of `generation` over `members` (in admission order).
    fn plan(generation: u64, members: &[&str]) -> Plan {
        let infos: Vec<MemberInfo> = members.iter().map(|m| info(m, 0)).collect();
        let cfg = PlannerConfig {
            min_members: 1,
            ..PlannerConfig::default()
        };
        compute_plan(None, &infos, &cfg, generation).unwrap()
    }

    fn config(me: &str) -> NodeConfig {
        let mut c = NodeConfig::daemon(MemberId::new(me), 100, 8, 3, 300);
        c.hash_check_every = 0;
        c
    }

    fn state(member: &str, step: u64, hash: &str) -> PeerState {
        PeerState {
            member: MemberId::new(member),
            step,
            hash: hash.into(),
        }
    }

    /// A machine driven by hand, with its clock.
    struct T {
        m: NodeMachine,
        now: u64,
    }

    impl T {
        fn new(c: NodeConfig) -> Self {
            Self {
                m: NodeMachine::new(c).unwrap(),
                now: 1_000,
            }
        }

        fn ev(&mut self, e: Event) -> Vec<Action> {
            let fx = self.m.handle(e, self.now);
            for f in &fx {
                assert!(!f.reason.is_empty(), "{f:?} has no reason");
            }
            fx.into_iter().map(|f| f.action).collect()
        }

        fn at(&mut self, now: u64) -> Vec<Action> {
            self.now = now;
            self.ev(Event::Tick)
        }

        fn gen(&self) -> u64 {
            self.m.generation().unwrap()
        }

        /// Start holding state at `step` and train in generation `g` of `members`
        /// where everyone agrees: returns the first `RunStep`'s actions.
        fn train_from(&mut self, step: u64, g: u64, members: &[&str]) -> Vec<Action> {
            self.ev(Event::Started {
                holds_state: true,
                step,
                cursor: step * 8,
            });
            let a = self.ev(Event::PlanSeen(plan(g, members)));
            assert_eq!(a, vec![Action::CheckJobDone]);
            let a = self.ev(Event::JobRecord { step: None });
            assert!(matches!(a[..], [Action::BuildCommunicator { .. }]), "{a:?}");
            let a = self.ev(Event::CommunicatorBuilt { generation: g });
            assert!(
                matches!(a[..], [Action::ExchangeState { round: 0, .. }]),
                "{a:?}"
            );
            let states = members.iter().map(|m| state(m, step, "h")).collect();
            let a = self.ev(Event::StatesExchanged {
                generation: g,
                round: 0,
                states,
            });
            assert!(matches!(a[..], [Action::StartTrainer { .. }]), "{a:?}");
            self.ev(Event::TrainerStarted { generation: g })
        }

        fn step_done(&mut self, elapsed_ms: u64) -> Vec<Action> {
            self.now += elapsed_ms;
            let generation = self.gen();
            self.ev(Event::StepDone {
                generation,
                loss: 2.0,
                skipped: false,
                elapsed_ms,
            })
        }
    }

    fn run_step(a: &[Action]) -> Option<(u64, u64, u64)> {
        a.iter().find_map(|x| match x {
            Action::RunStep {
                step,
                cursor,
                deadline_ms,
                ..
            } => Some((*step, *cursor, *deadline_ms)),
            _ => None,
        })
    }

    #[test]
    fn a_peer_state_reads_as_its_member_and_a_short_hash() {
        let cases = [
            ("abcdef0123456789", "n1 abcdef012345"),
            ("abc", "n1 abc"),
            ("", "n1 "),
        ];
        for (hash, want) in cases {
            let st = PeerState {
                member: MemberId::new("n1"),
                step: 4,
                hash: hash.into(),
            };
            assert_eq!(st.to_string(), want);
        }
    }

    #[test]
    fn a_node_trains_in_the_first_plan_with_its_ranks_and_enough_nodes() {
        // (start_nodes, plans seen, the generation it trains in or None)
        #[allow(clippy::type_complexity)]
        let cases: &[(usize, &[(u64, &[&str])], Option<u64>)] = &[
            (1, &[(1, &["a"])], Some(1)),
            (2, &[(1, &["a"])], None),
            (2, &[(1, &["a"]), (2, &["a", "b"])], Some(2)),
            (1, &[(1, &["b"])], None),
            (1, &[(1, &["b"]), (2, &["a", "b"])], Some(2)),
            // An old plan seen late is ignored.
            (1, &[(3, &["b"]), (2, &["a", "b"])], None),
        ];
        for (start_nodes, plans, want) in cases {
            let mut c = config("a");
            c.start_nodes = *start_nodes;
            let mut t = T::new(c);
            t.ev(Event::Started {
                holds_state: true,
                step: 0,
                cursor: 0,
            });
            let mut checked = None;
            for (g, members) in plans.iter() {
                let a = t.ev(Event::PlanSeen(plan(*g, members)));
                if a.contains(&Action::CheckJobDone) {
                    checked = Some(*g);
                    let a = t.ev(Event::JobRecord { step: None });
                    assert!(
                        matches!(&a[..], [Action::BuildCommunicator { plan }] if plan.generation == *g)
                    );
                }
            }
            assert_eq!(checked, *want, "start_nodes {start_nodes}, plans {plans:?}");
        }
    }

    #[test]
    fn a_node_that_finds_the_job_done_exits_without_training() {
        let mut t = T::new(config("a"));
        t.ev(Event::Started {
            holds_state: false,
            step: 0,
            cursor: 0,
        });
        t.ev(Event::PlanSeen(plan(4, &["a", "b"])));
        let a = t.ev(Event::JobRecord { step: Some(100) });
        assert_eq!(a, vec![Action::Plot, Action::Exit(Exit::Done)]);
        // A record short of the target: train.
        let mut t = T::new(config("a"));
        t.ev(Event::Started {
            holds_state: false,
            step: 0,
            cursor: 0,
        });
        t.ev(Event::PlanSeen(plan(4, &["a", "b"])));
        let a = t.ev(Event::JobRecord { step: Some(40) });
        assert!(matches!(a[..], [Action::BuildCommunicator { .. }]));
    }

    #[test]
    fn who_copies_from_whom() {
        // (this node, exchanged states, what it does next)
        let members = ["a", "b", "c"];
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, [(u64, &str); 3], &str)] = &[
            ("a", [(5, "h"), (5, "h"), (5, "h")], "train"),
            ("b", [(5, "h"), (0, "z"), (5, "h")], "fetch 0"),
            ("a", [(5, "h"), (0, "z"), (5, "h")], "serve [1]"),
            ("c", [(5, "h"), (0, "z"), (5, "h")], "train"),
            ("b", [(6, "x"), (5, "h"), (5, "h")], "fetch 0"),
            ("a", [(6, "x"), (5, "h"), (5, "h")], "serve [1, 2]"),
            ("b", [(0, ""), (0, ""), (0, "")], "load"),
            ("b", [(0, ""), (0, ""), (7, "k")], "fetch 2"),
        ];
        for (me, states, want) in cases {
            let mut t = T::new(config(me));
            t.ev(Event::Started {
                holds_state: states.iter().any(|s| !s.1.is_empty()),
                step: 0,
                cursor: 0,
            });
            t.ev(Event::PlanSeen(plan(1, &members)));
            t.ev(Event::JobRecord { step: None });
            t.ev(Event::CommunicatorBuilt { generation: 1 });
            let states: Vec<PeerState> = members
                .iter()
                .zip(states)
                .map(|(m, (s, h))| state(m, *s, h))
                .collect();
            let a = t.ev(Event::StatesExchanged {
                generation: 1,
                round: 0,
                states: states.clone(),
            });
            let got = match &a[..] {
                [Action::StartTrainer { .. }] => "train".to_string(),
                [Action::FetchState { donor, .. }] => format!("fetch {donor}"),
                [Action::ServeState { receivers, .. }] => format!("serve {receivers:?}"),
                [Action::LoadCheckpoint { .. }] => "load".to_string(),
                other => format!("{other:?}"),
            };
            assert_eq!(got, *want, "{me} with {states:?}");
        }
    }

    #[test]
    fn nobody_holding_state_loads_the_checkpoint_and_compares_again() {
        let mut t = T::new(config("a"));
        t.ev(Event::Started {
            holds_state: false,
            step: 0,
            cursor: 0,
        });
        t.ev(Event::PlanSeen(plan(1, &["a", "b"])));
        t.ev(Event::JobRecord { step: None });
        t.ev(Event::CommunicatorBuilt { generation: 1 });
        let a = t.ev(Event::StatesExchanged {
            generation: 1,
            round: 0,
            states: vec![state("a", 0, ""), state("b", 0, "")],
        });
        assert!(matches!(a[..], [Action::LoadCheckpoint { generation: 1 }]));
        let a = t.ev(Event::CheckpointLoaded {
            generation: 1,
            step: 30,
            cursor: 240,
            hash: "k".into(),
        });
        assert!(matches!(
            a[..],
            [
                Action::NoteState {
                    source: StateSource::Checkpoint,
                    step: 30,
                    ..
                },
                Action::ExchangeState {
                    round: LOADED_ROUND,
                    step: 30,
                    holds_state: true,
                    ..
                }
            ]
        ));
        // Still nobody (a broken store): the generation fails.
        let a = t.ev(Event::StatesExchanged {
            generation: 1,
            round: LOADED_ROUND,
            states: vec![state("a", 0, ""), state("b", 0, "")],
        });
        assert!(matches!(a[..], [Action::Say(_)]), "{a:?}");
        assert!(matches!(t.m.phase(), Phase::AfterFailure { .. }));
    }

    #[test]
    fn a_state_older_than_the_jobs_checkpoint_is_not_offered() {
        // Found by node_sim seed 806: a node that hung at step 6 re-formed alone after
        // the others recorded step 20 and died, trained from step 6 and recorded step 10
        // over step 20.
        // (the job's recorded step, whether the node at step 6 offers its state)
        for (recorded, offers) in [(Some(20), false), (Some(6), true), (None, true)] {
            let mut t = T::new(config("a"));
            t.ev(Event::Started {
                holds_state: true,
                step: 6,
                cursor: 48,
            });
            t.ev(Event::PlanSeen(plan(3, &["a", "b"])));
            t.ev(Event::JobRecord { step: recorded });
            let a = t.ev(Event::CommunicatorBuilt { generation: 3 });
            assert_eq!(
                a,
                vec![Action::ExchangeState {
                    generation: 3,
                    round: 0,
                    step: 6,
                    holds_state: offers
                }],
                "record {recorded:?}"
            );
        }
        // Nobody offers a state: every member loads the checkpoint.
        let mut t = T::new(config("a"));
        t.ev(Event::Started {
            holds_state: true,
            step: 6,
            cursor: 48,
        });
        t.ev(Event::PlanSeen(plan(3, &["a"])));
        t.ev(Event::JobRecord { step: Some(20) });
        t.ev(Event::CommunicatorBuilt { generation: 3 });
        let a = t.ev(Event::StatesExchanged {
            generation: 3,
            round: 0,
            states: vec![state("a", 6, "")],
        });
        assert_eq!(a, vec![Action::LoadCheckpoint { generation: 3 }]);
    }

    #[test]
    fn step_deadlines() {
        let mut c = config("a");
        c.eval_every = 10;
        c.ckpt_every = 25;
        c.step_deadline.min_samples = 2;
        let mut t = T::new(c);
        let a = t.train_from(0, 1, &["a", "b"]);
        // The generation's first step: at least 10 s.
        assert_eq!(run_step(&a), Some((0, 0, 10_000)));
        // Then the floor (2 s) until the p99 is trusted, then 3 x p99.
        let a = t.step_done(50_000);
        assert_eq!(run_step(&a), Some((1, 8, 2_000)));
        let a = t.step_done(900);
        assert_eq!(run_step(&a), Some((2, 16, 2_000)));
        let a = t.step_done(1_000);
        assert_eq!(run_step(&a), Some((3, 24, 3_000)));
        // (the first step's 50 s was not observed)
        let cases: &[(u64, u64, u64)] = &[
            // (step, step0, deadline) with the p99 at 1000 ms
            (10, 0, 30_000),
            (25, 0, 30_000),
            (26, 0, 3_000),
            (25, 25, 10_000),
            (11, 3, 3_000),
        ];
        for (step, step0, want) in cases {
            assert_eq!(t.m.step_deadline_ms(*step, *step0), *want, "step {step}");
        }
    }

    #[test]
    fn a_late_step_reports_its_laggards_once_unless_a_reform_or_pause_explains_it() {
        for (ending, paused, reports) in [
            (false, false, true),
            (true, false, false),
            (false, true, false),
        ] {
            let mut t = T::new(config("a"));
            t.train_from(0, 1, &["a", "b", "c"]);
            t.step_done(100);
            if ending {
                t.ev(Event::PlanSeen(plan(2, &["a", "b", "c", "d"])));
            }
            if paused {
                t.ev(Event::Pause);
            }
            let now = t.now;
            let a = t.at(now + 1_999);
            assert!(!a.iter().any(|x| matches!(x, Action::ReportLate { .. })));
            let a = t.at(now + 2_000);
            assert_eq!(
                a.iter()
                    .any(|x| matches!(x, Action::ReportLate { step: 1, .. })),
                reports,
                "ending {ending} paused {paused}: {a:?}"
            );
            let a = t.at(now + 9_000);
            assert!(!a.iter().any(|x| matches!(x, Action::ReportLate { .. })));
        }
    }

    #[test]
    fn a_newer_plan_that_keeps_every_member_lets_the_step_complete() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        let a = t.ev(Event::PlanSeen(plan(2, &["a", "b", "c"])));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(t.m.next_timer_ms(), Some(t.now + 2_000));
        // The step completes within the grace: the generation ends at the boundary.
        let a = t.step_done(500);
        assert_eq!(
            a,
            vec![
                Action::LogStep {
                    generation: 1,
                    step: 1,
                    cursor: 0,
                    val_loss: None
                },
                Action::StopAfter {
                    generation: 1,
                    step: 1
                },
                Action::StopTrainer { generation: 1 },
                Action::CheckJobDone,
            ]
        );
        // No abort is left armed for the old generation.
        let a = t.at(t.now + 5_000);
        assert!(
            !a.iter().any(|x| matches!(x, Action::Abort { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn a_step_that_does_not_complete_within_the_grace_is_aborted() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        t.ev(Event::PlanSeen(plan(2, &["a", "b", "c"])));
        let a = t.at(t.now + 2_000);
        assert!(a.contains(&Action::Abort { generation: 1 }), "{a:?}");
        let a = t.ev(Event::Failed {
            generation: 1,
            peers_may_have_failed: false,
            error: "aborted".into(),
        });
        assert!(
            matches!(
                &a[..],
                [
                    Action::Say(_),
                    Action::StopTrainer { generation: 1 },
                    Action::CheckJobDone
                ]
            ),
            "{a:?}"
        );
        let a = t.ev(Event::JobRecord { step: None });
        assert!(matches!(&a[..], [Action::BuildCommunicator { plan }] if plan.generation == 2));
    }

    #[test]
    fn a_plan_that_drops_a_member_aborts_at_once() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b", "c"]);
        let a = t.ev(Event::PlanSeen(plan(2, &["a", "c"])));
        assert_eq!(a, vec![Action::Abort { generation: 1 }]);
        let a = t.ev(Event::Failed {
            generation: 1,
            peers_may_have_failed: true,
            error: "aborted".into(),
        });
        assert_eq!(a[0], Action::ReportFailedPeers { generation: 1 });
        assert_eq!(a.last(), Some(&Action::CheckJobDone));
    }

    #[test]
    fn a_failure_waits_for_a_newer_plan_within_the_window_then_gives_up() {
        for plan_comes in [true, false] {
            let mut t = T::new(config("a"));
            t.train_from(0, 1, &["a", "b"]);
            let a = t.ev(Event::Failed {
                generation: 1,
                peers_may_have_failed: true,
                error: "stream from b failed".into(),
            });
            assert_eq!(a[0], Action::ReportFailedPeers { generation: 1 });
            let window = reform_window_ms(3, 300);
            assert_eq!(window, 7_900);
            let a = t.at(t.now + window - 1);
            assert!(a.is_empty());
            if plan_comes {
                let a = t.ev(Event::PlanSeen(plan(2, &["a"])));
                assert_eq!(a.last(), Some(&Action::CheckJobDone), "{a:?}");
            } else {
                // The plan stands: leave and register again, holding the state.
                let a = t.at(t.now + 1);
                assert!(
                    matches!(
                        &a[..],
                        [
                            Action::Abort { generation: 1 },
                            Action::StopTrainer { generation: 1 },
                            Action::Say(_),
                            Action::Leave,
                            Action::Say(_)
                        ]
                    ),
                    "{a:?}"
                );
                assert!(t.m.holds_state());
                let Phase::Rejoining { at_ms } = *t.m.phase() else {
                    panic!("{:?}", t.m.phase())
                };
                assert_eq!(t.at(at_ms), vec![Action::Register]);
            }
        }
    }

    /// A node whose failures are never followed by a newer plan rejoins a bounded number
    /// of times in a row, then stops.
    #[test]
    fn failures_without_a_new_plan_rejoin_a_bounded_number_of_times() {
        let c = config("a");
        let max = c.max_rejoins;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b"]);
        let window = reform_window_ms(3, 300);
        for g in 1..=u64::from(max) + 1 {
            if g > 1 {
                t.ev(Event::Registered);
                t.ev(Event::PlanSeen(plan(g, &["a", "b"])));
                t.ev(Event::JobRecord { step: None });
                t.ev(Event::CommunicatorBuilt { generation: g });
            }
            t.ev(Event::Failed {
                generation: g,
                peers_may_have_failed: false,
                error: "etcd refused a call".into(),
            });
            let a = t.at(t.now + window);
            if g <= u64::from(max) {
                assert!(a.contains(&Action::Leave), "rejoin {g}: {a:?}");
                let Phase::Rejoining { at_ms } = *t.m.phase() else {
                    panic!("{:?}", t.m.phase())
                };
                assert_eq!(t.at(at_ms), vec![Action::Register]);
            } else {
                assert_eq!(a.last(), Some(&Action::Exit(Exit::Failed)), "{a:?}");
            }
        }
    }

    #[test]
    fn a_failure_while_etcd_is_down_waits_for_etcd_then_for_the_plan() {
        // (etcd goes down before the failure, etcd comes back, a plan comes after it)
        let cases = [
            (true, Some(20_000), true),
            (true, Some(20_000), false),
            (false, Some(20_000), true),
            (true, None, false),
            (false, None, false),
        ];
        for (down_first, back_after_ms, plan_comes) in cases {
            let case =
                format!("down first {down_first}, back after {back_after_ms:?}, plan {plan_comes}");
            let mut c = config("a");
            c.etcd_outage_timeout_ms = 60_000;
            let mut t = T::new(c);
            t.train_from(0, 1, &["a", "b", "c"]);
            let down_at = t.now;
            let failed = Event::Failed {
                generation: 1,
                peers_may_have_failed: true,
                error: "stream from c failed".into(),
            };
            if down_first {
                assert!(
                    t.ev(Event::EtcdReachable { reachable: false }).is_empty(),
                    "{case}"
                );
                t.now += 1_000;
                t.ev(failed);
            } else {
                t.ev(failed);
                t.now += 1_000;
                let a = t.ev(Event::EtcdReachable { reachable: false });
                assert!(
                    matches!(&a[..], [Action::Say(s)] if s.contains("waiting for etcd")),
                    "{case}: {a:?}"
                );
            }
            let window = reform_window_ms(3, 300);
            // Far past the re-formation window, the node still waits: it holds its state.
            assert!(t.at(down_at + 3 * window).is_empty(), "{case}");
            assert_eq!(t.m.position().0, 0, "{case}");
            match back_after_ms {
                Some(after) => {
                    t.now = down_at + after;
                    let a = t.ev(Event::EtcdReachable { reachable: true });
                    assert!(
                        matches!(&a[..], [Action::Say(s)] if s.contains("etcd answers again")),
                        "{case}: {a:?}"
                    );
                    assert_eq!(t.m.next_timer_ms(), Some(t.now + window), "{case}");
                    if plan_comes {
                        let a = t.ev(Event::PlanSeen(plan(2, &["a", "b"])));
                        assert_eq!(a.last(), Some(&Action::CheckJobDone), "{case}: {a:?}");
                    } else {
                        // etcd is back and the plan stands: leave and register again.
                        assert!(t.at(t.now + window - 1).is_empty(), "{case}");
                        let a = t.at(t.now + 1);
                        assert!(a.contains(&Action::Leave), "{case}: {a:?}");
                        assert!(t.m.holds_state(), "{case}");
                    }
                }
                None => {
                    // The outage's timeout counts from when etcd stopped answering.
                    let outage_start = if down_first { down_at } else { down_at + 1_000 };
                    assert!(t.at(outage_start + 60_000 - 1).is_empty(), "{case}");
                    let fx = t.m.handle(Event::Tick, outage_start + 60_000);
                    assert_eq!(
                        fx.last().map(|f| &f.action),
                        Some(&Action::Exit(Exit::Failed)),
                        "{case}"
                    );
                    let words: String = fx
                        .iter()
                        .map(|f| format!("{:?} {}", f.action, f.reason))
                        .collect();
                    assert!(words.contains("--etcd-outage-timeout-s"), "{case}: {words}");
                }
            }
        }
    }

    #[test]
    fn a_record_etcd_did_not_take_is_written_as_soon_as_etcd_answers() {
        let mut c = config("a");
        c.ckpt_every = 1;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b"]);
        t.step_done(10);
        t.ev(Event::EtcdReachable { reachable: false });
        let rec = |a: &[Action]| {
            a.iter()
                .any(|x| matches!(x, Action::WriteRecord(r) if r.step == 1))
        };
        let a = t.ev(committed(1));
        assert!(rec(&a), "{a:?}");
        t.ev(Event::RecordUnreachable {
            step: 1,
            error: "etcd down".into(),
        });
        t.now += 100;
        let a = t.ev(Event::EtcdReachable { reachable: true });
        assert!(rec(&a), "retried at once, not after record_retry_ms: {a:?}");
    }

    #[test]
    fn evaluation_belongs_to_the_committer_and_every_replica_writes_its_share() {
        for (me, shared) in [("a", true), ("b", true), ("a", false), ("b", false)] {
            let mut c = config(me);
            c.eval_every = 2;
            c.ckpt_every = 3;
            c.target_steps = 7;
            c.shared_saves = shared;
            let mut t = T::new(c);
            t.train_from(0, 1, &["a", "b"]);
            let committer = t.m.is_committer();
            assert_eq!(committer, me == "a");
            let mut evals = Vec::new();
            let mut saves = Vec::new();
            for _ in 0..7 {
                let mut a = t.step_done(10);
                while let Some(Action::Evaluate { step, .. }) = a.last().cloned() {
                    evals.push(step);
                    a = t.ev(Event::Evaluated {
                        generation: 1,
                        val_loss: 1.5,
                    });
                    assert!(matches!(
                        a[0],
                        Action::LogStep {
                            val_loss: Some(_),
                            ..
                        }
                    ));
                }
                for x in &a {
                    if let Action::Save { step, share, .. } = x {
                        saves.push((*step, share.clone()));
                    }
                }
            }
            let share = shared.then_some(Share {
                writer: u32::from(!committer),
                writers: 2,
                commits: committer,
            });
            // The last step's save is the final checkpoint.
            let every = |s: &Option<Share>| vec![(3, s.clone()), (6, s.clone()), (7, s.clone())];
            if committer {
                assert_eq!(evals, vec![2, 4, 6, 7]);
                assert_eq!(saves, every(&share));
                assert!(matches!(
                    t.m.phase(),
                    Phase::Committing {
                        step: 7,
                        leave: false,
                        ..
                    }
                ));
            } else {
                assert!(evals.is_empty());
                match shared {
                    true => assert_eq!(saves, every(&share), "a replica writes its share"),
                    false => assert!(saves.is_empty(), "{saves:?}"),
                }
                assert!(matches!(t.m.phase(), Phase::WaitingForFinal { .. }));
            }
        }
    }

    #[test]
    fn the_writers_of_a_shared_checkpoint_are_the_members_that_host_ranks() {
        use crate::membership::RankAssignment;
        let plan = |members: &[&str], hosts: &[&str], pp_depth: u32| {
            let ranks: Vec<RankAssignment> = hosts
                .iter()
                .enumerate()
                .map(|(r, m)| RankAssignment {
                    rank: r as u32,
                    member: MemberId::new(*m),
                    dp_index: r as u32 / pp_depth,
                    stage: r as u32 % pp_depth,
                })
                .collect();
            Plan {
                generation: 1,
                members: members.iter().map(|m| MemberId::new(*m)).collect(),
                spares: vec![],
                world: hosts.len() as u32,
                dp_width: hosts.len() as u32 / pp_depth,
                pp_depth,
                ranks,
                reason: String::new(),
            }
        };
        let share = |writer, writers, commits| {
            Some(Share {
                writer,
                writers,
                commits,
            })
        };
        let three = plan(&["a", "b", "c"], &["b", "a", "c"], 1);
        let no_ranks_for_c = plan(&["a", "b", "c"], &["b", "a"], 1);
        let alone = plan(&["a"], &["a"], 1);
        let stages = plan(&["a", "b"], &["a", "b"], 2);
        let cases = [
            (&three, "a", share(0, 3, false)),
            (&three, "b", share(1, 3, true)),
            (&three, "c", share(2, 3, false)),
            (&three, "z", None),
            (&no_ranks_for_c, "a", share(0, 2, false)),
            (&no_ranks_for_c, "c", None),
            (&alone, "a", None),
            (&stages, "a", share(0, 2, true)),
            (&stages, "b", share(1, 2, false)),
        ];
        for (plan, me, want) in cases {
            assert_eq!(
                share_of(plan, &MemberId::new(me)),
                want,
                "{me} in {:?}",
                plan.ranks
            );
        }
    }

    fn to_the_end(me: &str) -> T {
        let mut c = config(me);
        c.target_steps = 2;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b"]);
        t.step_done(10);
        let a = t.step_done(10);
        if me == "a" {
            assert_eq!(
                a.last(),
                Some(&Action::Evaluate {
                    generation: 1,
                    step: 2
                })
            );
            let a = t.ev(Event::Evaluated {
                generation: 1,
                val_loss: 1.0,
            });
            assert!(
                matches!(a.last(), Some(Action::Save { step: 2, .. })),
                "{a:?}"
            );
        } else {
            assert_eq!(
                a.last(),
                Some(&Action::WaitForFinalRecord {
                    generation: 1,
                    step: 2
                })
            );
        }
        t
    }

    fn committed(step: u64) -> Event {
        Event::CheckpointCommitted {
            step,
            url: format!("s3://b/j/step-{step}"),
            generation: 1,
        }
    }

    #[test]
    fn the_final_checkpoint_ends_the_job_once_recorded() {
        let mut t = to_the_end("a");
        let a = t.ev(committed(2));
        assert!(matches!(&a[..], [Action::WriteRecord(r)] if r.step == 2 && r.generation == 1));
        let a = t.ev(Event::RecordWritten { step: 2 });
        assert_eq!(a[1..], [Action::Plot, Action::Exit(Exit::Done)]);
        assert_eq!(t.m.recorded_step(), Some(2));
        // After the end nothing happens.
        assert!(t.ev(Event::Tick).is_empty());
    }

    #[test]
    fn a_refused_final_record_is_saved_again_in_the_next_generation() {
        let mut t = to_the_end("a");
        t.ev(committed(2));
        let a = t.ev(Event::RecordRefused {
            step: 2,
            reason: "generation 2 is current".into(),
        });
        assert!(
            matches!(a.last(), Some(Action::StopTrainer { generation: 1 })),
            "{a:?}"
        );
        let a = t.ev(Event::PlanSeen(plan(2, &["a"])));
        assert_eq!(a, vec![Action::CheckJobDone]);
        t.ev(Event::JobRecord { step: Some(1) });
        t.ev(Event::CommunicatorBuilt { generation: 2 });
        t.ev(Event::StatesExchanged {
            generation: 2,
            round: 0,
            states: vec![state("a", 2, "h")],
        });
        let a = t.ev(Event::TrainerStarted { generation: 2 });
        assert!(
            matches!(
                a[..],
                [Action::Save {
                    generation: 2,
                    step: 2,
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn the_others_wait_for_the_final_record_or_a_newer_plan() {
        let mut t = to_the_end("b");
        assert_eq!(
            t.ev(Event::FinalRecordSeen { step: 2 }),
            vec![Action::Plot, Action::Exit(Exit::Done)]
        );
        let mut t = to_the_end("b");
        let a = t.ev(Event::PlanSeen(plan(2, &["b"])));
        assert_eq!(a.last(), Some(&Action::CheckJobDone), "{a:?}");
        let mut t = to_the_end("b");
        let a = t.at(t.now + 1_800_000);
        assert_eq!(a, vec![Action::Exit(Exit::Failed)]);
    }

    #[test]
    fn a_newer_plan_during_the_last_step_is_where_the_others_finish() {
        // Found by node_sim seed 57: the plan came during the last step, so waiting for
        // the final record of generation 1 would wait for a record the fence refuses
        // while generation 2 waits for this node.
        let mut c = config("b");
        c.target_steps = 2;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b"]);
        t.step_done(10);
        assert!(t.ev(Event::PlanSeen(plan(2, &["a", "b", "c"]))).is_empty());
        let a = t.step_done(10);
        assert!(
            matches!(
                &a[..],
                [
                    Action::LogStep { step: 2, .. },
                    Action::Say(_),
                    Action::StopTrainer { generation: 1 },
                    Action::CheckJobDone
                ]
            ),
            "{a:?}"
        );
        // No abort of the finished generation is left armed.
        assert_eq!(t.m.next_timer_ms(), None);
        let a = t.ev(Event::JobRecord { step: Some(1) });
        assert!(matches!(&a[..], [Action::BuildCommunicator { plan }] if plan.generation == 2));
        // Without a newer plan it waits for the record, as before.
        let t = to_the_end("b");
        assert!(matches!(t.m.phase(), Phase::WaitingForFinal { .. }));
    }

    #[test]
    fn a_record_etcd_does_not_take_waits_and_the_newest_is_retried() {
        let mut c = config("a");
        c.ckpt_every = 1;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b"]);
        t.step_done(10);
        t.ev(committed(1));
        let a = t.ev(Event::RecordUnreachable {
            step: 1,
            error: "timeout".into(),
        });
        assert!(matches!(a[..], [Action::Say(_)]));
        let tried = t.now;
        assert_eq!(
            t.m.next_timer_ms().map(|x| x.min(tried + 2_000)),
            Some(tried + 2_000)
        );
        // A newer checkpoint within the retry interval waits for the retry.
        t.now += 500;
        assert!(t.ev(committed(2)).is_empty());
        let a = t.at(tried + 2_000);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::WriteRecord(r) if r.step == 2)),
            "{a:?}"
        );
        // Still unreachable: tried again, quietly.
        let a = t.ev(Event::RecordUnreachable {
            step: 2,
            error: "timeout".into(),
        });
        assert!(a.is_empty());
        let a = t.at(t.now + 2_000);
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::WriteRecord(r) if r.step == 2)));
        let a = t.ev(Event::RecordWritten { step: 2 });
        assert!(matches!(a[..], [Action::Say(_)]));
        assert_eq!(t.m.recorded_step(), Some(2));
        // Nothing left to retry.
        let a = t.at(t.now + 10_000);
        assert!(!a.iter().any(|x| matches!(x, Action::WriteRecord(_))));
    }

    /// What the leader's planner is told ([`NodeMachine::pending_record_generation`]):
    /// the generation of a record etcd has not taken, from the write's start until etcd
    /// takes it or the fence refuses it, through unanswered tries.
    #[test]
    fn a_record_is_pending_from_its_write_until_etcd_takes_or_refuses_it() {
        type Step = (&'static str, Option<u64>);
        let table: &[(&str, &[Step])] = &[
            (
                "taken at once",
                &[("commit 1", Some(1)), ("written 1", None)],
            ),
            (
                "etcd does not answer, then takes it",
                &[
                    ("commit 1", Some(1)),
                    ("unreachable 1", Some(1)),
                    ("retry", Some(1)),
                    ("unreachable 1", Some(1)),
                    ("retry", Some(1)),
                    ("written 1", None),
                ],
            ),
            (
                "refused by the fence (a newer generation is current)",
                &[
                    ("commit 1", Some(1)),
                    ("unreachable 1", Some(1)),
                    ("retry", Some(1)),
                    ("refused 1", None),
                ],
            ),
        ];
        for (case, steps) in table {
            let mut c = config("a");
            c.ckpt_every = 1;
            let mut t = T::new(c);
            t.train_from(0, 1, &["a", "b"]);
            t.step_done(10);
            assert_eq!(t.m.pending_record_generation(), None, "{case}: before");
            for (what, want) in *steps {
                match *what {
                    "commit 1" => {
                        t.ev(committed(1));
                    }
                    "written 1" => {
                        t.ev(Event::RecordWritten { step: 1 });
                    }
                    "unreachable 1" => {
                        t.ev(Event::RecordUnreachable {
                            step: 1,
                            error: "timeout".into(),
                        });
                    }
                    "refused 1" => {
                        t.ev(Event::RecordRefused {
                            step: 1,
                            reason: "gen 2 is current".into(),
                        });
                    }
                    "retry" => {
                        let a = t.at(t.now + 2_000);
                        assert!(
                            a.iter()
                                .any(|x| matches!(x, Action::WriteRecord(r) if r.step == 1)),
                            "{case}: {a:?}"
                        );
                    }
                    other => unreachable!("{other}"),
                }
                assert_eq!(
                    t.m.pending_record_generation(),
                    *want,
                    "{case}: after {what}"
                );
            }
        }
    }

    #[test]
    fn a_commit_during_a_record_write_is_written_after_it() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        t.ev(committed(1));
        assert!(t.ev(committed(2)).is_empty());
        let a = t.ev(Event::RecordWritten { step: 1 });
        assert!(
            matches!(a.last(), Some(Action::WriteRecord(r)) if r.step == 2),
            "{a:?}"
        );
    }

    #[test]
    fn drains_pauses_and_checkpoint_requests_act_at_the_boundary() {
        // Drain without a checkpoint.
        let mut t = T::new(config("b"));
        t.train_from(0, 1, &["a", "b"]);
        t.ev(Event::Drain { checkpoint: false });
        let a = t.step_done(10);
        assert_eq!(
            a[1..],
            [
                Action::StopAfter {
                    generation: 1,
                    step: 1
                },
                Action::Close { generation: 1 },
                Action::StopTrainer { generation: 1 },
                Action::Exit(Exit::Left)
            ]
        );
        // Drain with a checkpoint: leave once it is recorded.
        let mut t = T::new(config("b"));
        t.train_from(0, 1, &["a", "b"]);
        t.ev(Event::Drain { checkpoint: true });
        let a = t.step_done(10);
        assert!(matches!(a.last(), Some(Action::Save { step: 1, .. })));
        t.ev(committed(1));
        let a = t.ev(Event::RecordWritten { step: 1 });
        assert_eq!(a.last(), Some(&Action::Exit(Exit::Left)));
        // Pause, then resume.
        let mut t = T::new(config("b"));
        t.train_from(0, 1, &["a", "b"]);
        t.ev(Event::Pause);
        let a = t.step_done(10);
        assert!(run_step(&a).is_none());
        assert_eq!(t.m.phase(), &Phase::Paused);
        let a = t.ev(Event::Resume);
        assert_eq!(run_step(&a).map(|x| x.0), Some(1));
        // A drain while paused acts at once (leaving does not wait for a resume).
        let mut p = T::new(config("b"));
        p.train_from(0, 1, &["a", "b"]);
        p.ev(Event::Pause);
        p.step_done(10);
        assert_eq!(p.m.phase(), &Phase::Paused);
        let a = p.ev(Event::Drain { checkpoint: false });
        assert_eq!(a.last(), Some(&Action::Exit(Exit::Left)), "{a:?}");
        // Checkpoint now: saved at the boundary, once.
        t.ev(Event::CheckpointNow);
        let a = t.step_done(10);
        assert!(
            matches!(
                a[..],
                [_, Action::Save { step: 2, .. }, Action::RunStep { .. }]
            ),
            "{a:?}"
        );
        let a = t.step_done(10);
        assert!(!a.iter().any(|x| matches!(x, Action::Save { .. })));
        // A node drained with a checkpoint whose generation ended trains in the next
        // plan up to its first boundary to save it; without a checkpoint it leaves.
        for checkpoint in [true, false] {
            let mut t = T::new(config("b"));
            t.train_from(0, 1, &["a", "b", "c"]);
            t.ev(Event::Failed {
                generation: 1,
                peers_may_have_failed: false,
                error: "c stopped after step 0".into(),
            });
            t.ev(Event::Drain { checkpoint });
            let a = t.ev(Event::PlanSeen(plan(2, &["a", "b"])));
            if checkpoint {
                assert_eq!(a.last(), Some(&Action::CheckJobDone), "{a:?}");
                let a = t.ev(Event::JobRecord { step: None });
                assert!(matches!(a[..], [Action::BuildCommunicator { .. }]), "{a:?}");
            } else {
                assert_eq!(a.last(), Some(&Action::Exit(Exit::Left)), "{a:?}");
            }
        }
        // Drained while waiting for a plan.
        let mut t = T::new(config("c"));
        t.ev(Event::Started {
            holds_state: true,
            step: 0,
            cursor: 0,
        });
        assert_eq!(
            t.ev(Event::Drain { checkpoint: true }),
            vec![Action::Exit(Exit::Left)]
        );
    }

    #[test]
    fn sigterm_drains_with_a_checkpoint_and_exits_3_past_its_grace() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        let a = t.ev(Event::Sigterm { grace_ms: 30_000 });
        assert!(matches!(a[..], [Action::Say(_)]));
        let start = t.now;
        let a = t.step_done(10);
        assert!(matches!(a.last(), Some(Action::Save { step: 1, .. })));
        let a = t.at(start + 30_000);
        assert_eq!(a, vec![Action::Exit(Exit::GraceExpired)]);
    }

    #[test]
    fn a_lost_membership_aborts_and_registers_again_with_a_doubling_backoff() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        let a = t.ev(Event::MembershipLost {
            reason: "lease expired".into(),
        });
        assert_eq!(a, vec![Action::Abort { generation: 1 }]);
        let a = t.ev(Event::Failed {
            generation: 1,
            peers_may_have_failed: false,
            error: "aborted".into(),
        });
        assert!(matches!(a.last(), Some(Action::Say(_))));
        // It stepped since the last registration: the first backoff.
        assert_eq!(t.m.phase(), &Phase::Rejoining { at_ms: t.now + 250 });
        assert_eq!(t.at(t.now + 250), vec![Action::Register]);
        t.ev(Event::Registered);
        assert_eq!(t.m.phase(), &Phase::WaitingForPlan);
        // Lost again without a step: 500 ms, 1 s, ... at most 5 s, and after 20 the node exits.
        let mut waits = Vec::new();
        loop {
            let a = t.ev(Event::MembershipLost {
                reason: "evicted".into(),
            });
            if a == vec![Action::Exit(Exit::Failed)] {
                break;
            }
            let Phase::Rejoining { at_ms } = *t.m.phase() else {
                panic!("{a:?}")
            };
            waits.push(at_ms - t.now);
            t.at(at_ms);
            t.ev(Event::Registered);
        }
        assert_eq!(waits.len(), 19);
        assert_eq!(waits[..5], [500, 1_000, 2_000, 4_000, 5_000]);
        assert!(waits[5..].iter().all(|&w| w == 5_000));
    }

    #[test]
    fn a_node_whose_trainer_dies_leaves_and_rejoins_holding_nothing() {
        let mut t = T::new(config("b"));
        t.train_from(0, 1, &["a", "b"]);
        t.step_done(10);
        let a = t.ev(Event::TrainerFailed {
            generation: 1,
            error: "rank 1 panicked".into(),
        });
        assert!(
            matches!(
                &a[..],
                [
                    Action::Abort { generation: 1 },
                    Action::DropTrainer { generation: 1 },
                    Action::Say(_),
                    Action::Leave,
                    Action::Say(_)
                ]
            ),
            "{a:?}"
        );
        assert!(!t.m.holds_state());
        // The step in flight failing afterwards changes nothing.
        let a = t.ev(Event::Failed {
            generation: 1,
            peers_may_have_failed: true,
            error: "aborted".into(),
        });
        assert!(a.is_empty(), "{a:?}");
        let Phase::Rejoining { at_ms } = *t.m.phase() else {
            panic!("{:?}", t.m.phase())
        };
        assert_eq!(t.at(at_ms), vec![Action::Register]);
        t.ev(Event::Registered);
        t.ev(Event::PlanSeen(plan(2, &["a", "b"])));
        t.ev(Event::JobRecord { step: None });
        let a = t.ev(Event::CommunicatorBuilt { generation: 2 });
        assert!(
            matches!(
                a[..],
                [Action::ExchangeState {
                    holds_state: false,
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn rejoin_backoff_table() {
        let cases = [
            (1, 250),
            (2, 500),
            (3, 1_000),
            (5, 4_000),
            (6, 5_000),
            (40, 5_000),
        ];
        for (n, want) in cases {
            assert_eq!(rejoin_backoff_ms(n, 250, 5_000), want, "{n}");
        }
    }

    #[test]
    fn a_periodic_comparison_resyncs_the_odd_members() {
        let mut c = config("b");
        c.hash_check_every = 2;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a", "b", "c"]);
        t.step_done(10);
        let a = t.step_done(10);
        assert_eq!(
            a,
            vec![Action::CompareHashes {
                generation: 1,
                step: 2
            }]
        );
        // Agreement: on to the next step.
        let a = t.ev(Event::StatesExchanged {
            generation: 1,
            round: 2,
            states: vec![state("a", 2, "h"), state("b", 2, "h"), state("c", 2, "h")],
        });
        assert_eq!(run_step(&a).map(|x| x.0), Some(2));
        t.step_done(10);
        t.step_done(10);
        // This node is the odd one: alarm, log, stop the trainer, copy, train on.
        let a = t.ev(Event::StatesExchanged {
            generation: 1,
            round: 4,
            states: vec![state("a", 4, "h"), state("b", 4, "x"), state("c", 4, "h")],
        });
        assert!(
            matches!(
                &a[..],
                [
                    Action::Alarm { step: 4, .. },
                    Action::LogStep { step: 4, .. },
                    Action::StopTrainer { generation: 1 },
                    Action::FetchState {
                        donor: 0,
                        step: 4,
                        ..
                    }
                ]
            ),
            "{a:?}"
        );
        let a = t.ev(Event::StateCopied {
            generation: 1,
            step: 4,
            cursor: 32,
        });
        assert!(matches!(
            a.last(),
            Some(Action::StartTrainer { step: 4, .. })
        ));
        let a = t.ev(Event::TrainerStarted { generation: 1 });
        assert_eq!(run_step(&a).map(|x| (x.0, x.1)), Some((4, 32)));
    }

    /// A step is applied before its comparison (or the committer's evaluation); when the
    /// generation breaks off first, the node still goes on from that step, so its line is
    /// written then, once (the soak found steps no member had logged).
    #[test]
    fn a_step_whose_comparison_or_evaluation_breaks_off_is_still_logged_once() {
        let logged = |a: &[Action]| {
            a.iter()
                .filter(|x| matches!(x, Action::LogStep { step: 2, .. }))
                .count()
        };
        // (what runs after step 2, how the generation breaks off)
        for (evaluate, newer_plan) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = config("a");
            match evaluate {
                true => c.eval_every = 2,
                false => c.hash_check_every = 2,
            }
            let mut t = T::new(c);
            t.train_from(0, 1, &["a", "b", "c"]);
            t.step_done(10);
            let a = t.step_done(10);
            let want = match evaluate {
                true => Action::Evaluate {
                    generation: 1,
                    step: 2,
                },
                false => Action::CompareHashes {
                    generation: 1,
                    step: 2,
                },
            };
            assert_eq!(a, vec![want], "evaluate {evaluate}");
            let mut after = Vec::new();
            if newer_plan {
                after.extend(t.ev(Event::PlanSeen(plan(2, &["a", "b"]))));
            }
            after.extend(t.ev(Event::Failed {
                generation: 1,
                peers_may_have_failed: true,
                error: "collective aborted".into(),
            }));
            assert_eq!(
                logged(&after),
                1,
                "evaluate {evaluate}, newer plan {newer_plan}: {after:?}"
            );
            let cursor = after.iter().find_map(|x| match x {
                Action::LogStep {
                    step: 2,
                    cursor,
                    val_loss,
                    ..
                } => Some((*cursor, *val_loss)),
                _ => None,
            });
            assert_eq!(
                cursor,
                Some((8, None)),
                "the cursor of step 2's first sample"
            );
            // Later events of the old generation log nothing again.
            let a = t.ev(Event::Failed {
                generation: 1,
                peers_may_have_failed: false,
                error: "again".into(),
            });
            assert_eq!(logged(&a), 0, "{a:?}");
        }
    }

    #[test]
    fn too_many_non_finite_steps_in_a_row_stop_the_node() {
        let mut c = config("a");
        c.max_bad_steps = 3;
        let mut t = T::new(c);
        t.train_from(0, 1, &["a"]);
        let bad = |t: &mut T| {
            t.ev(Event::StepDone {
                generation: 1,
                loss: f64::NAN,
                skipped: true,
                elapsed_ms: 5,
            })
        };
        bad(&mut t);
        bad(&mut t);
        t.step_done(5);
        bad(&mut t);
        bad(&mut t);
        let a = bad(&mut t);
        assert_eq!(a.last(), Some(&Action::Exit(Exit::Failed)));
    }

    #[test]
    fn outcomes_of_another_generation_are_ignored() {
        let mut t = T::new(config("a"));
        t.train_from(0, 1, &["a", "b"]);
        for e in [
            Event::StepDone {
                generation: 0,
                loss: 1.0,
                skipped: false,
                elapsed_ms: 1,
            },
            Event::Failed {
                generation: 7,
                peers_may_have_failed: true,
                error: "x".into(),
            },
            Event::CommunicatorBuilt { generation: 1 },
            Event::StatesExchanged {
                generation: 1,
                round: 0,
                states: vec![],
            },
        ] {
            assert!(t.ev(e.clone()).is_empty(), "{e:?}");
        }
        assert!(matches!(t.m.phase(), Phase::Stepping { .. }));
    }
}

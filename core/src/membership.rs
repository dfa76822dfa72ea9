//! Group membership and generations: who is in the job, which rank each device gets,
//! who copies state from whom, and when the group is re-formed, as pure decisions.
//!
//! - [`compute_plan`]: the plan of one generation from the previous plan and the
//!   registered members. A plan is a data-parallel width D times a fixed pipeline depth
//!   S; rank `r` is replica `r / S`, stage `r % S`. Ranks are exactly `0..world`, and
//!   stable: a member keeps its rank numbers where they still fit, freed numbers go to
//!   the others in admission order. [`Plan::validate`] checks the invariants it
//!   guarantees; a plan read from outside (etcd) is validated before use.
//! - [`state_donors`]: who copies state from whom at the start of a generation, from
//!   the `(step, param hash)` every member reports (the plan does not say: which copy is
//!   freshest is only known at run time).
//! - [`Planner`]: the leader's state machine. [`Event`]s go in (member joined, left,
//!   suspected, lease expired, probe answered, settle timer fired, plan committed,
//!   leadership won or lost), [`Effect`]s come out (write plan gen+1, revoke a lease,
//!   probe, arm the settle timer, wait). A settle window makes a burst of changes one
//!   generation, a cap on it keeps a steady trickle from postponing the plan forever,
//!   and at most one plan write is in flight. Suspicions go through the
//!   [`crate::detector::Confirmation`] rule before any lease is revoked.
//!
//! Safety does not rest on this module: the shell writes a plan in one etcd txn that
//! compares the previous generation (and the leader's lease), so a stale leader's write
//! fails; this module only promises never to ask for two different writes of one
//! generation while it believes it is leader, and to ask for `current + 1` only.
//!
//! A member's state is assumed to live with the member: a member that held stage `s`
//! in the previous plan holds it in this one, whatever rank number it now has. A member
//! that re-registered after that plan was written (`joined_gen >= prev.generation`,
//! e.g. after a restart) holds nothing, so the planner writes a new generation for it
//! even when the layout is unchanged. Which copy is actually freshest is checked at
//! run time by comparing (step, param hash) ([`state_donors`]).
//!
//! Nothing here does I/O, reads a clock or spawns a thread. Every decision carries a
//! human-readable reason.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::detector::{Confirmation, ConfirmationConfig, DetectorError, Verdict};

/// At most this many member names are spelled out in one reason string.
const NAMES_IN_REASON: usize = 8;

/// The largest world a plan may have (`max_members x max_ranks_per_member`).
pub const MAX_WORLD: u64 = 1 << 20;

/// A member's id: the node id it registers under `/tenax/<job>/nodes/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub String);

impl MemberId {
    /// A member id from a string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MemberId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// What a member registered: its id, how many ranks it can host, and when it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's id.
    pub id: MemberId,
    /// How many ranks it can host (its devices); at least 1.
    pub devices: u32,
    /// The generation that was current when this registration was made. It orders
    /// admission (earlier first) and tells a member that survived a plan
    /// (`joined_gen < plan.generation`) from one that re-registered after it.
    pub joined_gen: u64,
    /// Where its gRPC services (peer data plane and control) listen, `host:port`; empty
    /// for members that serve none (tests, simulations).
    #[serde(default)]
    pub addr: String,
    /// Where its Prometheus `/metrics` endpoint listens, `host:port`; empty if none.
    #[serde(default)]
    pub metrics_addr: String,
}

/// One rank of a plan: which member hosts it and where it sits in the D x S grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankAssignment {
    /// The rank, in `0..world`.
    pub rank: u32,
    /// The member that hosts it.
    pub member: MemberId,
    /// Its data-parallel replica: `rank / pp_depth`.
    pub dp_index: u32,
    /// Its pipeline stage: `rank % pp_depth`.
    pub stage: u32,
}

/// The plan of one generation. It is stored whole as one etcd value at
/// `/tenax/<job>/gen`, never one key per member, so one txn replaces it atomically.
///
/// A plan written with the former `transfers` field (the donor of each rank, computed
/// here and never read) still decodes: serde skips unknown fields, and this struct does
/// not deny them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The generation this plan defines; one more than the plan it replaces.
    pub generation: u64,
    /// Admitted members, sorted by id (some may host no rank; see `reason`).
    pub members: Vec<MemberId>,
    /// Registered members left out because there were more than `max_members`,
    /// sorted by id. They wait for a place.
    pub spares: Vec<MemberId>,
    /// Number of ranks: `dp_width * pp_depth`.
    pub world: u32,
    /// Data-parallel width D.
    pub dp_width: u32,
    /// Pipeline depth S.
    pub pp_depth: u32,
    /// One entry per rank, sorted by rank: exactly `0..world`.
    pub ranks: Vec<RankAssignment>,
    /// Why this plan: who joined, left, waits, and how the grid was chosen.
    pub reason: String,
}

/// `(dp_index, stage)` of `rank` in a grid of pipeline depth `pp_depth` (at least 1).
pub fn rank_coords(rank: u32, pp_depth: u32) -> (u32, u32) {
    let s = pp_depth.max(1);
    (rank / s, rank % s)
}

impl Plan {
    /// The ranks `member` hosts, ascending.
    pub fn ranks_of(&self, member: &MemberId) -> Vec<u32> {
        self.ranks
            .iter()
            .filter(|a| &a.member == member)
            .map(|a| a.rank)
            .collect()
    }

    /// The ranks of each of `members` (empty for one not in the plan), in their order.
    pub fn ranks_of_each<'m>(&self, members: impl IntoIterator<Item = &'m str>) -> Vec<Vec<u32>> {
        members
            .into_iter()
            .map(|m| self.ranks_of(&MemberId::new(m)))
            .collect()
    }

    /// The member that hosts `rank`.
    pub fn member_of(&self, rank: u32) -> Option<&MemberId> {
        self.ranks
            .iter()
            .find(|a| a.rank == rank)
            .map(|a| &a.member)
    }

    /// Whether `member` is admitted in this plan.
    pub fn contains(&self, member: &MemberId) -> bool {
        self.members.binary_search(member).is_ok()
    }

    /// Checks the invariants [`compute_plan`] guarantees and users of a plan rely on:
    /// a generation above 0; `world = dp_width * pp_depth` with both above 0 and world at
    /// most [`MAX_WORLD`]; one rank entry per rank, exactly `0..world` in order, each with
    /// the coordinates [`rank_coords`] gives; every rank hosted by an admitted member;
    /// member and spare lists sorted, unique, disjoint and without empty ids; a reason.
    /// A plan that passes is safe for [`Plan::ranks_of`], [`Plan::member_of`] and
    /// [`crate::slots::slots_for_rank`] (`rank < world`, `world > 0`).
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason: String| {
            Err(PlanError::InvalidPlan {
                generation: self.generation,
                reason,
            })
        };
        if self.generation == 0 {
            return bad("generation is 0; plans start at generation 1".into());
        }
        if self.pp_depth == 0 {
            return bad("pp_depth is 0".into());
        }
        if self.dp_width == 0 {
            return bad("dp_width is 0".into());
        }
        if u64::from(self.dp_width) * u64::from(self.pp_depth) != u64::from(self.world) {
            return bad(format!(
                "world {} is not dp_width {} x pp_depth {}",
                self.world, self.dp_width, self.pp_depth
            ));
        }
        if u64::from(self.world) > MAX_WORLD {
            return bad(format!("world {} exceeds {MAX_WORLD}", self.world));
        }
        if self.ranks.len() as u64 != u64::from(self.world) {
            return bad(format!(
                "{} rank entries for world {}",
                self.ranks.len(),
                self.world
            ));
        }
        if self.members.is_empty() {
            return bad("no members".into());
        }
        if self
            .members
            .iter()
            .chain(&self.spares)
            .any(|m| m.0.is_empty())
        {
            return bad("a member or spare has an empty id".into());
        }
        if !self.members.windows(2).all(|w| w[0] < w[1]) {
            return bad("members are not sorted and unique".into());
        }
        if !self.spares.windows(2).all(|w| w[0] < w[1]) {
            return bad("spares are not sorted and unique".into());
        }
        if let Some(s) = self.spares.iter().find(|s| self.contains(s)) {
            return bad(format!("{s} is both a member and a spare"));
        }
        for (i, a) in self.ranks.iter().enumerate() {
            if a.rank as usize != i {
                return bad(format!(
                    "entry {i} is rank {}: ranks must be 0..world in order",
                    a.rank
                ));
            }
            if (a.dp_index, a.stage) != rank_coords(a.rank, self.pp_depth) {
                return bad(format!(
                    "rank {} has (dp {}, stage {}), expected {:?}",
                    a.rank,
                    a.dp_index,
                    a.stage,
                    rank_coords(a.rank, self.pp_depth)
                ));
            }
            if !self.contains(&a.member) {
                return bad(format!(
                    "rank {} is hosted by {}, who is not a member",
                    a.rank, a.member
                ));
            }
        }
        if self.reason.is_empty() {
            return bad("the plan has no reason".into());
        }
        Ok(())
    }
}

/// Errors in a planner configuration, a member list or a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A [`PlannerConfig`] value is out of range.
    #[error("invalid planner configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and what would be valid.
        reason: String,
    },
    /// A member registered with an empty id.
    #[error("a member has an empty id: every node must register under a non-empty id")]
    EmptyMemberId,
    /// Two registrations share an id.
    #[error("member `{member}` is listed twice: member ids must be unique")]
    DuplicateMember {
        /// The repeated id.
        member: MemberId,
    },
    /// A member registered with no devices.
    #[error("member `{member}` registered 0 devices: a member must host at least one rank")]
    NoDevices {
        /// The member.
        member: MemberId,
    },
    /// Fewer admitted members than `min_members`.
    #[error("{have} member(s) registered, {min} needed (min_members): waiting for more")]
    BelowMinimum {
        /// Members available.
        have: usize,
        /// The configured minimum.
        min: usize,
    },
    /// The members' devices do not make one full pipeline.
    #[error("{ranks} usable rank(s) cannot fill one pipeline of depth {pp_depth}: waiting for more devices")]
    TooFewRanks {
        /// Usable ranks of the admitted members.
        ranks: u64,
        /// The configured pipeline depth.
        pp_depth: u32,
    },
    /// The generation asked for does not follow the previous plan's.
    #[error("generation {generation} does not follow the previous plan's generation {prev}")]
    GenerationNotAfter {
        /// The generation asked for.
        generation: u64,
        /// The previous plan's generation.
        prev: u64,
    },
    /// No generation after the current one can be represented.
    #[error("generation {current} is the largest representable: no further plan can be written")]
    GenerationExhausted {
        /// The current generation.
        current: u64,
    },
    /// A plan fails [`Plan::validate`].
    #[error("plan of generation {generation} is malformed: {reason}")]
    InvalidPlan {
        /// The plan's generation.
        generation: u64,
        /// What is wrong.
        reason: String,
    },
    /// The confirmation settings are invalid.
    #[error(transparent)]
    Detector(#[from] DetectorError),
}

/// Limits and timing of the [`Planner`] and of [`compute_plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// No plan is written with fewer admitted members than this (at least 1).
    pub min_members: usize,
    /// At most this many members are admitted; the rest wait as spares.
    pub max_members: usize,
    /// The fixed pipeline depth S; the data-parallel width is
    /// `floor(usable ranks / S)` (at least 1).
    pub pp_depth: u32,
    /// When the usable ranks cannot fill one pipeline of `pp_depth` stages, plan one
    /// shorter pipeline of as many stages as there are usable ranks instead of waiting
    /// (for members that each hold the whole model's state, so any depth goes on exactly).
    #[serde(default)]
    pub shrink_pipeline: bool,
    /// A member hosts at most this many ranks, however many devices it has (at least 1).
    pub max_ranks_per_member: u32,
    /// After a membership change, wait this long for more changes before planning.
    pub settle_ms: u64,
    /// ... but never longer than this after the first change of a burst
    /// (at least `settle_ms`).
    pub settle_max_ms: u64,
    /// The planner remembers at most this many registered members; further joins are
    /// refused with a reason (at least `max_members`).
    pub max_known_members: usize,
    /// How suspicions are confirmed.
    pub confirmation: ConfirmationConfig,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            min_members: 1,
            max_members: 256,
            pp_depth: 1,
            shrink_pipeline: false,
            max_ranks_per_member: 64,
            settle_ms: 2_000,
            settle_max_ms: 6_000,
            max_known_members: 4096,
            confirmation: ConfirmationConfig::default(),
        }
    }
}

impl PlannerConfig {
    /// Checks that every value is in range.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason: String| Err(PlanError::InvalidConfig { reason });
        if self.min_members == 0 {
            return bad("min_members is 0; it must be at least 1".into());
        }
        if self.max_members < self.min_members {
            return bad(format!(
                "max_members {} is below min_members {}",
                self.max_members, self.min_members
            ));
        }
        if self.pp_depth == 0 {
            return bad("pp_depth is 0; the pipeline needs at least one stage".into());
        }
        if self.max_ranks_per_member == 0 {
            return bad("max_ranks_per_member is 0; it must be at least 1".into());
        }
        let most = (self.max_members as u64).saturating_mul(u64::from(self.max_ranks_per_member));
        if most > MAX_WORLD {
            return bad(format!(
                "max_members {} x max_ranks_per_member {} = {most} ranks exceeds {MAX_WORLD}",
                self.max_members, self.max_ranks_per_member
            ));
        }
        if self.settle_max_ms < self.settle_ms {
            return bad(format!(
                "settle_max_ms {} is below settle_ms {}",
                self.settle_max_ms, self.settle_ms
            ));
        }
        if self.max_known_members < self.max_members {
            return bad(format!(
                "max_known_members {} is below max_members {}",
                self.max_known_members, self.max_members
            ));
        }
        self.confirmation.validate()?;
        Ok(())
    }
}

/// Names for a reason string: at most [`NAMES_IN_REASON`], then a count.
fn names<'a>(ids: impl IntoIterator<Item = &'a MemberId>) -> String {
    let all: Vec<&MemberId> = ids.into_iter().collect();
    if all.is_empty() {
        return "none".into();
    }
    let mut s = all
        .iter()
        .take(NAMES_IN_REASON)
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > NAMES_IN_REASON {
        s.push_str(&format!(" and {} more", all.len() - NAMES_IN_REASON));
    }
    s
}

/// The plan of `generation` for `members`, given the previous plan.
///
/// - Admission: members are taken in `(joined_gen, id)` order; the first
///   `max_members` are admitted, the rest are spares. Fewer than `min_members`
///   admitted is [`PlanError::BelowMinimum`].
/// - Grid: a member hosts `min(devices, max_ranks_per_member)` ranks at most;
///   `dp_width = floor(usable / pp_depth)`, `world = dp_width * pp_depth`. Members
///   past the usable ranks host none (named "idle" in the reason).
/// - Ranks: an admitted member keeps each rank number it had in `prev` that is below
///   the new world (lowest first, up to its capacity). The remaining numbers, ascending,
///   go to admitted members in admission order, each filling its remaining capacity
///   with consecutive numbers (so a member's ranks tend to form whole pipelines).
/// - Who copies state from whom is not decided here: members compare their
///   `(step, param hash)` at the start of the generation ([`state_donors`]). The reason
///   counts the ranks whose member did not hold their stage in `prev`.
pub fn compute_plan(
    prev: Option<&Plan>,
    members: &[MemberInfo],
    config: &PlannerConfig,
    generation: u64,
) -> Result<Plan, PlanError> {
    config.validate()?;
    if let Some(p) = prev {
        if generation <= p.generation {
            return Err(PlanError::GenerationNotAfter {
                generation,
                prev: p.generation,
            });
        }
    }
    let mut seen = BTreeSet::new();
    for m in members {
        if m.id.0.is_empty() {
            return Err(PlanError::EmptyMemberId);
        }
        if m.devices == 0 {
            return Err(PlanError::NoDevices {
                member: m.id.clone(),
            });
        }
        if !seen.insert(&m.id) {
            return Err(PlanError::DuplicateMember {
                member: m.id.clone(),
            });
        }
    }

    // Admission.
    let mut order: Vec<&MemberInfo> = members.iter().collect();
    order.sort_by(|a, b| (a.joined_gen, &a.id).cmp(&(b.joined_gen, &b.id)));
    let (admitted, spare) = order.split_at(order.len().min(config.max_members));
    if admitted.len() < config.min_members {
        return Err(PlanError::BelowMinimum {
            have: admitted.len(),
            min: config.min_members,
        });
    }
    let capacity = |m: &MemberInfo| m.devices.min(config.max_ranks_per_member);
    let usable: u64 = admitted.iter().map(|m| u64::from(capacity(m))).sum();
    let pp = match config.shrink_pipeline {
        true => config.pp_depth.min(usable.max(1) as u32),
        false => config.pp_depth,
    };
    let dp = usable / u64::from(pp);
    if dp == 0 {
        return Err(PlanError::TooFewRanks {
            ranks: usable,
            pp_depth: pp,
        });
    }
    // usable <= max_members * max_ranks_per_member <= MAX_WORLD, so this fits.
    let world = (dp * u64::from(pp)) as u32;
    let dp = dp as u32;
    let by_id: BTreeMap<&MemberId, &MemberInfo> = admitted.iter().map(|m| (&m.id, *m)).collect();

    // Ranks: keep, then fill.
    let mut holder: Vec<Option<&MemberId>> = vec![None; world as usize];
    let mut used: BTreeMap<&MemberId, u32> = BTreeMap::new();
    let mut kept = 0usize;
    if let Some(p) = prev {
        let mut prev_ranks: Vec<&RankAssignment> = p.ranks.iter().collect();
        prev_ranks.sort_by_key(|a| a.rank);
        for a in prev_ranks {
            let Some(info) = by_id.get(&a.member) else {
                continue;
            };
            let n = used.entry(&info.id).or_insert(0);
            if a.rank < world && holder[a.rank as usize].is_none() && *n < capacity(info) {
                holder[a.rank as usize] = Some(&info.id);
                *n += 1;
                kept += 1;
            }
        }
    }
    let mut free = (0..world)
        .filter(|&r| holder[r as usize].is_none())
        .collect::<Vec<_>>()
        .into_iter();
    'fill: for m in admitted {
        let n = used.entry(&m.id).or_insert(0);
        while *n < capacity(m) {
            match free.next() {
                Some(r) => {
                    holder[r as usize] = Some(&m.id);
                    *n += 1;
                }
                None => break 'fill,
            }
        }
    }
    let ranks: Vec<RankAssignment> = holder
        .iter()
        .enumerate()
        .map(|(r, h)| {
            let rank = r as u32;
            let (dp_index, stage) = rank_coords(rank, pp);
            RankAssignment {
                rank,
                // Every number was filled: usable >= world.
                member: h.expect("every rank below world has a holder").clone(),
                dp_index,
                stage,
            }
        })
        .collect();

    // Ranks whose member did not hold their stage in the previous generation (or
    // re-registered since): they start without state and copy it at run time
    // (`state_donors`), or load the checkpoint. Counted for the reason only.
    let without_state = match prev {
        Some(p) if p.pp_depth == pp => ranks
            .iter()
            .filter(|a| {
                let survived = by_id
                    .get(&a.member)
                    .is_some_and(|info| holds_state_of(p, info));
                !(survived
                    && p.ranks
                        .iter()
                        .any(|b| b.member == a.member && b.stage == a.stage))
            })
            .count(),
        _ => ranks.len(),
    };

    let mut member_ids: Vec<MemberId> = admitted.iter().map(|m| m.id.clone()).collect();
    member_ids.sort();
    let mut spares: Vec<MemberId> = spare.iter().map(|m| m.id.clone()).collect();
    spares.sort();
    let idle: Vec<&MemberId> = member_ids
        .iter()
        .filter(|m| used.get(m).copied().unwrap_or(0) == 0)
        .collect();
    let (joined, left): (Vec<&MemberId>, Vec<&MemberId>) = match prev {
        Some(p) => (
            member_ids.iter().filter(|m| !p.contains(m)).collect(),
            p.members
                .iter()
                .filter(|m| !by_id.contains_key(m))
                .collect(),
        ),
        None => (member_ids.iter().collect(), Vec::new()),
    };
    let mut reason = format!(
        "gen {generation}: {} member(s) with {usable} usable rank(s) -> {dp} x {pp} = {world} rank(s); \
         joined: {}; left: {}; {kept} rank(s) kept their member; {without_state} rank(s) start \
         without their stage's state",
        member_ids.len(),
        names(joined),
        names(left),
    );
    if pp < config.pp_depth {
        reason.push_str(&format!(
            "; pipeline shortened to {pp} stage(s) of {} (too few usable ranks for a full one)",
            config.pp_depth
        ));
    }
    if !spares.is_empty() {
        reason.push_str(&format!(
            "; spares (over max_members {}): {}",
            config.max_members,
            names(&spares)
        ));
    }
    if !idle.is_empty() {
        reason.push_str(&format!(
            "; idle (devices do not fill another {pp}-stage pipeline): {}",
            names(idle)
        ));
    }
    Ok(Plan {
        generation,
        members: member_ids,
        spares,
        world,
        dp_width: dp,
        pp_depth: pp,
        ranks,
        reason,
    })
}

/// Whether `info`'s registration survived `prev` (it was made before `prev` was
/// planned), so that the member still holds the state it had in `prev`. A member that
/// re-registered since (a restart) holds nothing.
fn holds_state_of(prev: &Plan, info: &MemberInfo) -> bool {
    info.joined_gen < prev.generation
}

/// Something the planner is told: a fact observed by the shell, with the time it
/// was observed passed separately to [`Planner::handle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A member registered (or re-registered, or changed its registration).
    MemberJoined(MemberInfo),
    /// A member deleted its registration.
    MemberLeft(MemberId),
    /// A member's lease expired or was revoked, taking its registration with it.
    LeaseExpired(MemberId),
    /// A peer reports that `member` missed a deadline.
    Suspected {
        /// The late member.
        member: MemberId,
        /// Who reports it.
        reporter: MemberId,
        /// What the reporter saw.
        reason: String,
    },
    /// The leader's own probe of `member` came back (or timed out: `alive: false`).
    ProbeResult {
        /// The probed member.
        member: MemberId,
        /// Whether it answered.
        alive: bool,
    },
    /// A settle timer armed by [`Effect::ArmSettleTimer`] fired.
    SettleTimerFired,
    /// A plan was read from `/tenax/<job>/gen` (written by anyone).
    PlanCommitted(Plan),
    /// This planner's plan write failed (the txn compare did not hold, or etcd did
    /// not answer).
    PlanWriteFailed {
        /// The generation of the failed write.
        generation: u64,
        /// What the shell saw.
        reason: String,
    },
    /// This node won the election; `current` is the plan in etcd at that moment.
    BecameLeader {
        /// The plan read from `/tenax/<job>/gen`, if any.
        current: Option<Plan>,
    },
    /// This node is no longer leader (its election key or lease is gone).
    LostLeadership,
    /// This node's checkpoint record that etcd has not taken yet (still being written,
    /// or waiting to be tried again), by the generation that saved it; `None`: none.
    /// From the node machine ([`crate::node::NodeMachine::pending_record_generation`]).
    /// While it names the current generation, the leader holds the next plan (see
    /// [`RECORD_HOLD_MAX_MS`]).
    RecordPending {
        /// The generation the pending record is fenced on.
        generation: Option<u64>,
    },
}

/// The rule "pending records of generation g are committed before the plan of g+1 is
/// written": a leader whose own node holds a checkpoint record of the current
/// generation g that etcd has not taken does not write g+1 (the record is fenced on g,
/// so g+1 would make etcd refuse it and the checkpoint would never be committed); it
/// re-checks every settle window and writes once the record is taken, or at the latest
/// this long after the plan was first ready (an etcd that takes plans but keeps failing
/// the record must not stop the group from re-forming; the record is then refused and
/// the plan's reason says so). Kept well inside the members' re-formation window
/// (`NodeConfig::reform_window_ms`: lease TTL + 2 s + 3 x settle + 2 s, of which the
/// lease's expiry and one settle window are already spent when the plan is ready), so
/// that the hold never makes the survivors give up waiting for the plan.
pub const RECORD_HOLD_MAX_MS: u64 = 2_000;

/// Something the planner asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Write `plan` to `/tenax/<job>/gen` in one txn that succeeds only if the key still
    /// holds `expected_prev_generation` (0: absent) and this node still holds the
    /// election key. Feed back [`Event::PlanCommitted`] or [`Event::PlanWriteFailed`].
    WritePlan {
        /// The plan, whose `reason` explains it.
        plan: Plan,
        /// The generation the key must hold for the write to succeed.
        expected_prev_generation: u64,
    },
    /// Revoke `member`'s lease (fenced on this node's leadership).
    RevokeLease {
        /// The member to evict.
        member: MemberId,
        /// The confirmed evidence.
        reason: String,
    },
    /// Probe `member` directly; feed back [`Event::ProbeResult`] (a timeout is
    /// `alive: false`).
    Probe {
        /// The member to probe.
        member: MemberId,
        /// Why.
        reason: String,
    },
    /// Feed [`Event::SettleTimerFired`] at `at_ms` (earlier timers may fire too; they
    /// are answered with a wait).
    ArmSettleTimer {
        /// When.
        at_ms: u64,
        /// Why.
        reason: String,
    },
    /// Nothing to do now.
    Wait {
        /// Why.
        reason: String,
    },
}

impl Effect {
    /// The reason of this effect (a plan's own reason for a write).
    pub fn reason(&self) -> &str {
        match self {
            Effect::WritePlan { plan, .. } => &plan.reason,
            Effect::RevokeLease { reason, .. }
            | Effect::Probe { reason, .. }
            | Effect::ArmSettleTimer { reason, .. }
            | Effect::Wait { reason } => reason,
        }
    }
}

fn wait(reason: String) -> Vec<Effect> {
    vec![Effect::Wait { reason }]
}

/// A settle window in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settle {
    /// The first change of the burst.
    first_change_ms: u64,
    /// When the plan will be computed.
    deadline_ms: u64,
}

/// The group planner: every node runs one; only the leader's writes anything.
///
/// Followers track the registered members from the same events, so a new leader
/// starts with a view. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Limits and timing.
    config: PlannerConfig,
    /// Whether this node believes it is leader.
    leader: bool,
    /// The newest committed plan seen.
    current: Option<Plan>,
    /// Registered members; at most `config.max_known_members`.
    known: BTreeMap<MemberId, MemberInfo>,
    /// The settle window in progress, if any (leader only).
    settle: Option<Settle>,
    /// The generation of the plan write in flight, if any.
    in_flight: Option<u64>,
    /// Consecutive failed plan writes (the retry delay doubles, up to 16 x settle).
    write_failures: u32,
    /// Suspicions and their confirmation.
    confirmation: Confirmation,
    /// The generation of this node's checkpoint record that etcd has not taken, if any.
    record_pending: Option<u64>,
    /// Since when the next plan is held for that record ([`RECORD_HOLD_MAX_MS`]).
    held_since_ms: Option<u64>,
}

impl Planner {
    /// A follower with no plan and no members.
    pub fn new(config: PlannerConfig) -> Result<Self, PlanError> {
        config.validate()?;
        Ok(Self {
            confirmation: Confirmation::new(config.confirmation.clone())?,
            config,
            leader: false,
            current: None,
            known: BTreeMap::new(),
            settle: None,
            in_flight: None,
            write_failures: 0,
            record_pending: None,
            held_since_ms: None,
        })
    }

    /// Since when the next plan waits for this node's pending checkpoint record, if it
    /// does ([`RECORD_HOLD_MAX_MS`]).
    pub fn held_for_record_since_ms(&self) -> Option<u64> {
        self.held_since_ms
    }

    /// The configuration in use.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Whether this planner believes it is leader.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The newest committed plan seen.
    pub fn current(&self) -> Option<&Plan> {
        self.current.as_ref()
    }

    /// The newest committed generation seen (0 before any plan).
    pub fn current_generation(&self) -> u64 {
        self.current.as_ref().map_or(0, |p| p.generation)
    }

    /// The registered members, by id.
    pub fn known_members(&self) -> impl Iterator<Item = &MemberInfo> {
        self.known.values()
    }

    /// The generation of the plan write in flight, if any.
    pub fn write_in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// When the pending settle window ends, if one is pending.
    pub fn settle_deadline_ms(&self) -> Option<u64> {
        self.settle.map(|s| s.deadline_ms)
    }

    /// Whether `member` is confirmed failed (its revocation was asked for).
    pub fn confirmed(&self, member: &MemberId) -> bool {
        self.confirmation.confirmed(member)
    }

    /// Handles one event observed at `now_ms` and returns what to do, always at least
    /// one effect, each with a reason.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Effect> {
        match event {
            Event::MemberJoined(info) => self.on_joined(info, now_ms),
            Event::MemberLeft(id) => self.on_gone(id, "left", now_ms),
            Event::LeaseExpired(id) => self.on_gone(id, "lost its lease", now_ms),
            Event::Suspected {
                member,
                reporter,
                reason,
            } => self.on_suspected(member, reporter, reason, now_ms),
            Event::ProbeResult { member, alive } => self.on_probe(member, alive, now_ms),
            Event::SettleTimerFired => self.on_settle(now_ms),
            Event::PlanCommitted(plan) => self.on_committed(plan, now_ms),
            Event::PlanWriteFailed { generation, reason } => {
                self.on_write_failed(generation, reason, now_ms)
            }
            Event::BecameLeader { current } => self.on_became_leader(current, now_ms),
            Event::LostLeadership => self.on_lost_leadership(),
            Event::RecordPending { generation } => self.on_record_pending(generation, now_ms),
        }
    }

    /// This node's pending checkpoint record changed. A record taken (or given up) while
    /// the next plan was held for it: plan at once.
    fn on_record_pending(&mut self, generation: Option<u64>, now_ms: u64) -> Vec<Effect> {
        let before = self.record_pending;
        self.record_pending = generation;
        let what = match generation {
            Some(g) => format!("this node's checkpoint record of gen {g} is not committed yet"),
            None => "this node has no checkpoint record pending".to_string(),
        };
        if !self.leader {
            return wait(format!("{what}; follower: the leader plans"));
        }
        let held = self.held_since_ms.is_some();
        if held && !self.holds_for_record() {
            self.held_since_ms = None;
            self.settle = Some(Settle {
                first_change_ms: now_ms,
                deadline_ms: now_ms,
            });
            return vec![Effect::ArmSettleTimer {
                at_ms: now_ms,
                reason: format!(
                    "{what} (was gen {}): the held plan is written now",
                    before.map_or("-".to_string(), |g| g.to_string())
                ),
            }];
        }
        wait(what)
    }

    /// Whether this node's pending record is of the current generation (the next plan
    /// would fence it out).
    fn holds_for_record(&self) -> bool {
        self.current.is_some() && self.record_pending == Some(self.current_generation())
    }

    fn on_joined(&mut self, info: MemberInfo, now_ms: u64) -> Vec<Effect> {
        if self.known.get(&info.id) == Some(&info) {
            return wait(format!("{} is already registered as is", info.id));
        }
        if !self.known.contains_key(&info.id) && self.known.len() >= self.config.max_known_members {
            return wait(format!(
                "registration of {} ignored: already {} members known (max_known_members)",
                info.id,
                self.known.len()
            ));
        }
        let what = match self.known.insert(info.id.clone(), info.clone()) {
            Some(old) => format!(
                "{} re-registered ({} device(s), joined gen {}; was {} device(s), gen {})",
                info.id, info.devices, info.joined_gen, old.devices, old.joined_gen
            ),
            None => format!(
                "{} joined ({} device(s), joined gen {})",
                info.id, info.devices, info.joined_gen
            ),
        };
        self.note_change(what, now_ms)
    }

    fn on_gone(&mut self, id: MemberId, how: &str, now_ms: u64) -> Vec<Effect> {
        self.confirmation.forget(&id);
        if self.known.remove(&id).is_none() {
            return wait(format!(
                "{id} {how}, but it was not registered: nothing to do"
            ));
        }
        self.note_change(format!("{id} {how}"), now_ms)
    }

    /// A membership change: followers only record it; the leader (re)arms the settle
    /// window, capped at `settle_max_ms` after the first change of the burst.
    fn note_change(&mut self, what: String, now_ms: u64) -> Vec<Effect> {
        if !self.leader {
            return wait(format!("{what}; recorded as a follower: the leader plans"));
        }
        let first = self.settle.map_or(now_ms, |s| s.first_change_ms);
        let cap = first.saturating_add(self.config.settle_max_ms);
        let mut at = now_ms.saturating_add(self.config.settle_ms).min(cap);
        if let Some(s) = self.settle {
            at = at.max(s.deadline_ms);
            if at == s.deadline_ms {
                return wait(format!(
                    "{what}; the settle window already ends at {at} ms (capped {} ms after the first change at {first} ms)",
                    self.config.settle_max_ms
                ));
            }
        }
        self.settle = Some(Settle {
            first_change_ms: first,
            deadline_ms: at,
        });
        vec![Effect::ArmSettleTimer {
            at_ms: at,
            reason: format!(
                "{what}; settling until {at} ms ({} ms after the last change, at most {} ms after the first at {first} ms)",
                self.config.settle_ms, self.config.settle_max_ms
            ),
        }]
    }

    fn on_suspected(
        &mut self,
        member: MemberId,
        reporter: MemberId,
        report: String,
        now_ms: u64,
    ) -> Vec<Effect> {
        if !self.leader {
            return wait(format!(
                "{reporter} suspects {member} ({report}); only the leader confirms suspicions"
            ));
        }
        if !self.known.contains_key(&member) {
            return wait(format!(
                "{reporter} suspects {member} ({report}), who is not registered: nothing to revoke"
            ));
        }
        let verdict = self
            .confirmation
            .report(&member, &reporter, &report, now_ms);
        self.act_on(member, verdict)
    }

    fn on_probe(&mut self, member: MemberId, alive: bool, now_ms: u64) -> Vec<Effect> {
        if !self.leader {
            return wait(format!(
                "probe result for {member} ignored: no longer leader"
            ));
        }
        if !self.known.contains_key(&member) {
            self.confirmation.forget(&member);
            return wait(format!(
                "probe result for {member} ignored: it is no longer registered"
            ));
        }
        let verdict = self.confirmation.probe_result(&member, alive, now_ms);
        self.act_on(member, verdict)
    }

    fn act_on(&mut self, member: MemberId, verdict: Verdict) -> Vec<Effect> {
        match verdict {
            Verdict::Probe { reason } => vec![Effect::Probe { member, reason }],
            Verdict::Confirmed { reason } => vec![Effect::RevokeLease { member, reason }],
            other => wait(other.reason().to_string()),
        }
    }

    /// The plan the leader would write now, or `None` when the current plan already
    /// matches the registered members, or why no plan can be made.
    fn candidate(&self) -> Result<Option<Plan>, String> {
        let current = self.current_generation();
        let next = current
            .checked_add(1)
            .ok_or_else(|| PlanError::GenerationExhausted { current }.to_string())?;
        let members: Vec<MemberInfo> = self.known.values().cloned().collect();
        let plan = compute_plan(self.current.as_ref(), &members, &self.config, next)
            .map_err(|e| e.to_string())?;
        // The same layout needs no new generation unless a member of it re-registered
        // (restarted) since: it lost its state, and a new generation makes the members
        // compare states and copy.
        match &self.current {
            Some(cur)
                if same_layout(cur, &plan)
                    && plan.ranks.iter().all(|a| {
                        self.known
                            .get(&a.member)
                            .is_some_and(|info| holds_state_of(cur, info))
                    }) =>
            {
                Ok(None)
            }
            _ => Ok(Some(plan)),
        }
    }

    fn on_settle(&mut self, now_ms: u64) -> Vec<Effect> {
        if !self.leader {
            return wait("settle timer fired on a follower: nothing to plan".into());
        }
        let Some(settle) = self.settle else {
            return wait("settle timer fired with no change pending".into());
        };
        if now_ms < settle.deadline_ms {
            return wait(format!(
                "settle timer fired at {now_ms} ms, before the window ends at {} ms: still settling",
                settle.deadline_ms
            ));
        }
        self.settle = None;
        if let Some(g) = self.in_flight {
            return wait(format!(
                "settled, but the write of gen {g} is in flight: re-planning once it resolves"
            ));
        }
        match self.candidate() {
            Err(why) => wait(format!("settled; no plan: {why}")),
            Ok(None) => wait(format!(
                "settled; registered members match gen {}: no new generation",
                self.current_generation()
            )),
            Ok(Some(mut plan)) => {
                // Pending records of gen g are committed before gen g+1 is written.
                if self.holds_for_record() {
                    let g = self.current_generation();
                    let since = *self.held_since_ms.get_or_insert(now_ms);
                    let until = since.saturating_add(RECORD_HOLD_MAX_MS);
                    if now_ms < until {
                        let at = now_ms
                            .saturating_add(self.config.settle_ms.max(1))
                            .min(until);
                        self.settle = Some(Settle {
                            first_change_ms: now_ms,
                            deadline_ms: at,
                        });
                        return vec![Effect::ArmSettleTimer {
                            at_ms: at,
                            reason: format!(
                                "settled, but gen {} waits: this node's checkpoint record of gen {g} is not committed yet \
                                 (it is fenced on gen {g}; written first, it is not lost); checking again at {at} ms, \
                                 writing anyway at {until} ms",
                                plan.generation
                            ),
                        }];
                    }
                    plan.reason = format!(
                        "{}; written although this node's checkpoint record of gen {g} was not committed within {RECORD_HOLD_MAX_MS} ms (etcd will refuse it)",
                        plan.reason
                    );
                }
                self.held_since_ms = None;
                self.in_flight = Some(plan.generation);
                vec![Effect::WritePlan {
                    expected_prev_generation: self.current_generation(),
                    plan,
                }]
            }
        }
    }

    /// After the leader's view or the current plan changed: start a settle window if
    /// the registered members no longer match the current plan.
    fn reevaluate(&mut self, what: String, now_ms: u64) -> Vec<Effect> {
        if !self.leader {
            return wait(format!("{what}; follower: the leader plans"));
        }
        if let Some(g) = self.in_flight {
            return wait(format!("{what}; the write of gen {g} is in flight"));
        }
        match self.candidate() {
            Err(why) => wait(format!("{what}; no plan: {why}")),
            Ok(None) => wait(format!(
                "{what}; registered members match gen {}",
                self.current_generation()
            )),
            Ok(Some(_)) => self.note_change(
                format!(
                    "{what}; registered members differ from gen {}",
                    self.current_generation()
                ),
                now_ms,
            ),
        }
    }

    fn on_committed(&mut self, plan: Plan, now_ms: u64) -> Vec<Effect> {
        let current = self.current_generation();
        if plan.generation <= current {
            return wait(format!(
                "plan of gen {} ignored: gen {current} is already current (generations only grow)",
                plan.generation
            ));
        }
        let what = match self.in_flight.take() {
            Some(g) if g == plan.generation => format!("gen {g} committed"),
            Some(g) => format!(
                "gen {} committed by someone else while our write of gen {g} was in flight",
                plan.generation
            ),
            None => format!("gen {} committed", plan.generation),
        };
        let what = match plan.validate() {
            Ok(()) => what,
            Err(e) => format!("{what} (malformed, adopted as the fence anyway: {e})"),
        };
        self.write_failures = 0;
        self.held_since_ms = None;
        self.current = Some(plan);
        self.reevaluate(what, now_ms)
    }

    fn on_write_failed(&mut self, generation: u64, reason: String, now_ms: u64) -> Vec<Effect> {
        if self.in_flight != Some(generation) {
            return wait(format!(
                "failure of a gen {generation} write ignored: no such write in flight ({reason})"
            ));
        }
        self.in_flight = None;
        if !self.leader {
            return wait(format!(
                "write of gen {generation} failed ({reason}); no longer leader"
            ));
        }
        self.write_failures = self.write_failures.saturating_add(1);
        let delay = self
            .config
            .settle_ms
            .max(1)
            .saturating_mul(1 << self.write_failures.min(4));
        let at = now_ms.saturating_add(delay);
        self.settle = Some(Settle {
            first_change_ms: now_ms,
            deadline_ms: at,
        });
        vec![Effect::ArmSettleTimer {
            at_ms: at,
            reason: format!(
                "write of gen {generation} failed ({reason}); failure {} in a row, retrying at {at} ms",
                self.write_failures
            ),
        }]
    }

    fn on_became_leader(&mut self, current: Option<Plan>, now_ms: u64) -> Vec<Effect> {
        let mut what = String::from("became leader");
        if let Some(p) = current {
            if p.generation > self.current_generation() {
                what.push_str(&format!(" at gen {}", p.generation));
                self.current = Some(p);
            }
        }
        self.leader = true;
        self.in_flight = None;
        self.write_failures = 0;
        self.settle = None;
        self.confirmation =
            Confirmation::new(self.config.confirmation.clone()).expect("validated in Planner::new");
        self.reevaluate(what, now_ms)
    }

    fn on_lost_leadership(&mut self) -> Vec<Effect> {
        let was = self.leader;
        self.leader = false;
        self.in_flight = None;
        self.settle = None;
        self.held_since_ms = None;
        self.confirmation =
            Confirmation::new(self.config.confirmation.clone()).expect("validated in Planner::new");
        wait(if was {
            "lost leadership: pending plans and suspicions dropped".into()
        } else {
            "told of lost leadership while a follower: nothing to drop".into()
        })
    }
}

/// Whether two plans admit the same members the same way (ignoring generation and
/// reasons).
fn same_layout(a: &Plan, b: &Plan) -> bool {
    a.members == b.members
        && a.spares == b.spares
        && a.world == b.world
        && a.dp_width == b.dp_width
        && a.pp_depth == b.pp_depth
        && a.ranks == b.ranks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> MemberId {
        MemberId::new(s)
    }

    fn info(s: &str, devices: u32, joined_gen: u64) -> MemberInfo {
        MemberInfo {
            id: id(s),
            devices,
            joined_gen,
            addr: String::new(),
            metrics_addr: String::new(),
        }
    }

    fn cfg(pp_depth: u32) -> PlannerConfig {
        PlannerConfig {
            min_members: 1,
            max_members: 16,
            pp_depth,
            shrink_pipeline: false,
            max_ranks_per_member: 8,
            settle_ms: 100,
            settle_max_ms: 300,
            max_known_members: 64,
            confirmation: ConfirmationConfig {
                report_ttl_ms: 5_000,
                max_suspects: 16,
            },
        }
    }

    /// `(rank, member)` pairs in rank order.
    fn layout(p: &Plan) -> Vec<(u32, &str)> {
        p.ranks
            .iter()
            .map(|a| (a.rank, a.member.as_str()))
            .collect()
    }

    /// How many ranks the reason says start without their stage's state.
    fn without_state(p: &Plan) -> usize {
        let (head, _) = p
            .reason
            .split_once(" rank(s) start without")
            .expect("the reason counts the ranks without state");
        head.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn first_plan_loads_everything_from_the_checkpoint() {
        let p = compute_plan(None, &[info("b", 2, 0), info("a", 2, 0)], &cfg(2), 1).unwrap();
        p.validate().unwrap();
        assert_eq!((p.world, p.dp_width, p.pp_depth), (4, 2, 2));
        assert_eq!(layout(&p), vec![(0, "a"), (1, "a"), (2, "b"), (3, "b")]);
        assert_eq!(without_state(&p), 4);
        assert!(
            p.reason.contains("2 x 2 = 4") && p.reason.contains("joined: a, b"),
            "{}",
            p.reason
        );
    }

    /// The table of re-formations: (previous members, new members, pp, expected layout,
    /// how many ranks start without their stage's state).
    #[test]
    fn re_formation_table() {
        type Case = (
            &'static str,
            Vec<MemberInfo>,
            Vec<MemberInfo>,
            u32,
            Vec<(u32, &'static str)>,
            usize,
        );
        let table: Vec<Case> = vec![
            (
                "a member of the middle leaves: its ranks are freed, the world shrinks, \
                 the high ranks move down and copy from their twins",
                vec![info("a", 2, 0), info("b", 2, 0), info("c", 2, 0)],
                vec![info("a", 2, 0), info("c", 2, 0)],
                2,
                vec![(0, "a"), (1, "a"), (2, "c"), (3, "c")],
                // c had ranks 4, 5 (stages 0, 1); it keeps holding those stages.
                0,
            ),
            (
                "a newcomer takes the freed numbers and copies from twins",
                vec![info("a", 2, 0), info("b", 2, 0)],
                vec![info("a", 2, 0), info("c", 2, 1)],
                2,
                vec![(0, "a"), (1, "a"), (2, "c"), (3, "c")],
                2,
            ),
            (
                "a growing world keeps every survivor's rank",
                vec![info("a", 1, 0), info("b", 1, 0)],
                vec![
                    info("a", 1, 0),
                    info("b", 1, 0),
                    info("c", 1, 1),
                    info("d", 1, 1),
                ],
                1,
                vec![(0, "a"), (1, "b"), (2, "c"), (3, "d")],
                2,
            ),
            (
                "a lost stage with no twin comes from the checkpoint",
                vec![info("a", 1, 0), info("b", 1, 0)],
                vec![info("a", 1, 0), info("c", 1, 1)],
                2,
                vec![(0, "a"), (1, "c")],
                1,
            ),
            (
                "a member that re-registered lost its state but keeps its rank",
                vec![info("a", 1, 0), info("b", 1, 0)],
                vec![info("a", 1, 0), info("b", 1, 1)],
                1,
                vec![(0, "a"), (1, "b")],
                1,
            ),
            (
                "devices that do not fill a pipeline leave a member idle",
                vec![info("a", 1, 0), info("b", 1, 0)],
                vec![info("a", 1, 0), info("b", 1, 0), info("c", 1, 1)],
                2,
                vec![(0, "a"), (1, "b")],
                0,
            ),
        ];
        for (name, before, after, pp, want_layout, want_without) in table {
            let c = cfg(pp);
            let prev = compute_plan(None, &before, &c, 1).unwrap();
            let p = compute_plan(Some(&prev), &after, &c, 2).unwrap();
            p.validate().unwrap();
            assert_eq!(layout(&p), want_layout, "{name}");
            assert_eq!(without_state(&p), want_without, "{name}: {}", p.reason);
            assert!(!p.reason.is_empty());
        }
    }

    #[test]
    fn shrinking_world_moves_a_survivor_to_a_low_rank() {
        let c = cfg(2);
        // a: ranks 0,1; b: 2,3; c: 4,5.
        let prev = compute_plan(
            None,
            &[info("a", 2, 0), info("b", 2, 0), info("c", 2, 0)],
            &c,
            1,
        )
        .unwrap();
        // a leaves; b keeps 2,3; c keeps nothing below world 4 and moves to 0,1, but it
        // held stages 0 and 1 already: every rank keeps its stage's state.
        let p = compute_plan(Some(&prev), &[info("b", 2, 0), info("c", 2, 0)], &c, 2).unwrap();
        assert_eq!(layout(&p), vec![(0, "c"), (1, "c"), (2, "b"), (3, "b")]);
        assert_eq!(without_state(&p), 0);
        assert!(p.reason.contains("left: a"), "{}", p.reason);
        // Now with single-device members: c held stage 0 at rank 2 and moves to rank 1
        // (stage 1), whose state it does not hold.
        let prev = compute_plan(
            None,
            &[
                info("a", 1, 0),
                info("b", 1, 0),
                info("c", 1, 0),
                info("d", 1, 0),
                info("e", 1, 0),
            ],
            &c,
            1,
        )
        .unwrap();
        // world 4: a0 b1 c2 d3, e idle.
        assert_eq!(layout(&prev), vec![(0, "a"), (1, "b"), (2, "c"), (3, "d")]);
        assert!(prev.reason.contains("idle") && prev.reason.contains('e'));
        let p = compute_plan(
            Some(&prev),
            &[info("a", 1, 0), info("c", 1, 0), info("e", 1, 0)],
            &c,
            2,
        )
        .unwrap();
        // world 2: a keeps 0; c's 2 is out of range; 1 goes to c (first in order).
        assert_eq!(layout(&p), vec![(0, "a"), (1, "c")]);
        // c held stage 0, now needs stage 1.
        assert_eq!(without_state(&p), 1);
    }

    #[test]
    fn admission_order_spares_and_caps() {
        let mut c = cfg(1);
        c.max_members = 2;
        c.max_ranks_per_member = 2;
        let members = [
            info("z", 4, 0),
            info("y", 1, 3),
            info("x", 1, 3),
            info("a", 1, 5),
        ];
        let p = compute_plan(None, &members, &c, 1).unwrap();
        assert_eq!(p.members, vec![id("x"), id("z")]);
        assert_eq!(p.spares, vec![id("a"), id("y")]);
        // z is capped at 2 ranks and comes first in admission order.
        assert_eq!(layout(&p), vec![(0, "z"), (1, "z"), (2, "x")]);
        assert!(
            p.reason.contains("spares") && p.reason.contains("a, y"),
            "{}",
            p.reason
        );
    }

    /// With `shrink_pipeline`, too few usable ranks for a full pipeline give one shorter
    /// pipeline (and more ranks the full depth again); without it the planner waits.
    #[test]
    fn a_short_cluster_shrinks_the_pipeline_when_told() {
        let shrink = PlannerConfig {
            shrink_pipeline: true,
            ..cfg(3)
        };
        let ones =
            |ids: &[&str]| -> Vec<MemberInfo> { ids.iter().map(|i| info(i, 1, 0)).collect() };
        // (members, depth, data-parallel width, shortened)
        let table: &[(&[&str], u32, u32, bool)] = &[
            (&["a"], 1, 1, true),
            (&["a", "b"], 2, 1, true),
            (&["a", "b", "c"], 3, 1, false),
            (&["a", "b", "c", "d"], 3, 1, false),
            (&["a", "b", "c", "d", "e", "f"], 3, 2, false),
        ];
        for &(ids, pp, dp, short) in table {
            let p = compute_plan(None, &ones(ids), &shrink, 1).unwrap();
            assert_eq!(
                (p.pp_depth, p.dp_width, p.world),
                (pp, dp, pp * dp),
                "{ids:?}"
            );
            assert_eq!(
                p.reason.contains("pipeline shortened"),
                short,
                "{}",
                p.reason
            );
            for a in &p.ranks {
                assert_eq!((a.dp_index, a.stage), rank_coords(a.rank, pp));
            }
        }
        // A member lost from 1 x 3: the next generation is 1 x 2 with the survivors.
        let prev = compute_plan(None, &ones(&["a", "b", "c"]), &shrink, 1).unwrap();
        let next = compute_plan(Some(&prev), &ones(&["a", "c"]), &shrink, 2).unwrap();
        assert_eq!((next.pp_depth, next.world), (2, 2));
        assert_eq!(next.members, vec![id("a"), id("c")]);
        assert!(matches!(
            compute_plan(None, &ones(&["a", "b"]), &cfg(3), 1),
            Err(PlanError::TooFewRanks { .. })
        ));
    }

    #[test]
    fn plan_errors_table() {
        let c = cfg(2);
        let table: Vec<(Vec<MemberInfo>, PlannerConfig, PlanError)> = vec![
            (
                vec![],
                c.clone(),
                PlanError::BelowMinimum { have: 0, min: 1 },
            ),
            (
                vec![info("a", 1, 0)],
                c.clone(),
                PlanError::TooFewRanks {
                    ranks: 1,
                    pp_depth: 2,
                },
            ),
            (vec![info("", 1, 0)], c.clone(), PlanError::EmptyMemberId),
            (
                vec![info("a", 0, 0)],
                c.clone(),
                PlanError::NoDevices { member: id("a") },
            ),
            (
                vec![info("a", 1, 0), info("a", 2, 0)],
                c.clone(),
                PlanError::DuplicateMember { member: id("a") },
            ),
            (
                vec![info("a", 2, 0)],
                PlannerConfig {
                    min_members: 2,
                    ..c.clone()
                },
                PlanError::BelowMinimum { have: 1, min: 2 },
            ),
        ];
        for (members, config, want) in table {
            assert_eq!(compute_plan(None, &members, &config, 1), Err(want));
        }
        let prev = compute_plan(None, &[info("a", 2, 0)], &c, 5).unwrap();
        assert_eq!(
            compute_plan(Some(&prev), &[info("a", 2, 0)], &c, 5),
            Err(PlanError::GenerationNotAfter {
                generation: 5,
                prev: 5
            })
        );
        let bad_configs = [
            PlannerConfig {
                min_members: 0,
                ..c.clone()
            },
            PlannerConfig {
                max_members: 0,
                ..c.clone()
            },
            PlannerConfig {
                pp_depth: 0,
                ..c.clone()
            },
            PlannerConfig {
                max_ranks_per_member: 0,
                ..c.clone()
            },
            PlannerConfig {
                settle_max_ms: 10,
                ..c.clone()
            },
            PlannerConfig {
                max_known_members: 1,
                ..c.clone()
            },
            PlannerConfig {
                max_members: 1 << 20,
                max_known_members: 1 << 20,
                ..c.clone()
            },
        ];
        for b in bad_configs {
            let e = Planner::new(b.clone()).unwrap_err();
            assert!(matches!(e, PlanError::InvalidConfig { .. }), "{b:?}: {e}");
        }
    }

    /// Every kind of malformed plan fails `validate` with `InvalidPlan`, and the reason
    /// names the problem.
    #[test]
    fn validate_catches_malformed_plans() {
        let good = compute_plan(None, &[info("a", 2, 0), info("b", 2, 0)], &cfg(2), 1).unwrap();
        good.validate().unwrap();
        type Break = fn(&mut Plan);
        let table: &[(&str, Break)] = &[
            ("generation is 0", |p| p.generation = 0),
            ("pp_depth is 0", |p| p.pp_depth = 0),
            ("dp_width is 0", |p| {
                p.dp_width = 0;
                p.world = 0;
                p.ranks.clear();
            }),
            ("is not dp_width", |p| p.world = 6),
            ("rank entries for world", |p| {
                p.ranks.pop();
            }),
            ("exceeds", |p| {
                p.dp_width = 1 << 20;
                p.world = 1 << 21;
            }),
            ("ranks must be 0..world in order", |p| p.ranks[1].rank = 0),
            ("ranks must be 0..world in order", |p| p.ranks.swap(0, 1)),
            ("ranks must be 0..world in order", |p| p.ranks[3].rank = 7),
            ("expected", |p| p.ranks[1].stage = 0),
            ("expected", |p| p.ranks[2].dp_index = 0),
            ("who is not a member", |p| p.ranks[0].member = id("zz")),
            ("no members", |p| {
                p.members.clear();
            }),
            ("empty id", |p| p.members.insert(0, id(""))),
            ("members are not sorted", |p| p.members.reverse()),
            ("members are not sorted", |p| p.members.push(id("b"))),
            ("spares are not sorted", |p| {
                p.spares = vec![id("y"), id("x")]
            }),
            ("both a member and a spare", |p| p.spares = vec![id("a")]),
            ("no reason", |p| p.reason.clear()),
        ];
        for (want, break_it) in table {
            let mut p = good.clone();
            break_it(&mut p);
            match p.validate() {
                Err(e @ PlanError::InvalidPlan { .. }) => {
                    assert!(e.to_string().contains(want), "{want}: {e}")
                }
                other => panic!("{want}: {other:?} for {p:?}"),
            }
        }
    }

    // ---- Planner table tests -------------------------------------------------

    fn leader(c: PlannerConfig) -> Planner {
        let mut p = Planner::new(c).unwrap();
        let e = p.handle(Event::BecameLeader { current: None }, 0);
        assert!(matches!(&e[..], [Effect::Wait { .. }]), "{e:?}");
        p
    }

    fn writes(effects: &[Effect]) -> Vec<&Plan> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::WritePlan { plan, .. } => Some(plan),
                _ => None,
            })
            .collect()
    }

    fn armed(effects: &[Effect]) -> Option<u64> {
        effects.iter().find_map(|e| match e {
            Effect::ArmSettleTimer { at_ms, .. } => Some(*at_ms),
            _ => None,
        })
    }

    #[test]
    fn a_burst_of_joins_makes_one_generation() {
        let mut p = leader(cfg(1));
        let mut at = None;
        for (i, t) in [0u64, 30, 60, 90].iter().enumerate() {
            let e = p.handle(Event::MemberJoined(info(&format!("m{i}"), 1, 0)), *t);
            at = armed(&e).or(at);
            assert!(writes(&e).is_empty());
        }
        assert_eq!(at, Some(190), "re-armed to the last change + settle");
        // Early timers are answered with a wait.
        let e = p.handle(Event::SettleTimerFired, 100);
        assert!(
            writes(&e).is_empty() && e[0].reason().contains("still settling"),
            "{e:?}"
        );
        let e = p.handle(Event::SettleTimerFired, 190);
        let w = writes(&e);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].generation, w[0].world), (1, 4));
        assert_eq!(p.write_in_flight(), Some(1));
        assert!(matches!(
            e[0],
            Effect::WritePlan {
                expected_prev_generation: 0,
                ..
            }
        ));
        let plan = w[0].clone();
        let e = p.handle(Event::PlanCommitted(plan), 200);
        assert!(e[0].reason().contains("match gen 1"), "{e:?}");
        assert_eq!(p.current_generation(), 1);
        // A second fire with nothing pending does nothing.
        assert!(writes(&p.handle(Event::SettleTimerFired, 500)).is_empty());
    }

    /// The rule "pending checkpoint records of generation g are committed before the
    /// plan of g+1 is written", as tables of (event, time, what must come out). Each
    /// table starts from a leader at gen 1 with members a and b (settle 100 ms); the
    /// first two would fail if the leader wrote gen 2 while its record of gen 1 is
    /// pending.
    #[test]
    fn pending_records_of_a_generation_are_committed_before_the_next_plan() {
        #[derive(Debug)]
        enum Want {
            /// A plan of this generation is written (its reason containing the text).
            Write(u64, &'static str),
            /// No write; the settle timer is armed at this time.
            Armed(u64, &'static str),
            /// No write, no timer; the reason contains the text.
            Wait(&'static str),
        }
        use Want::*;
        let pending = |g: Option<u64>| Event::RecordPending { generation: g };
        let gone = || Event::LeaseExpired(id("b"));
        let late = RECORD_HOLD_MAX_MS + 300;
        type Case = (&'static str, bool, Vec<(Event, u64, Want)>);
        let table: Vec<Case> = vec![
            (
                "the record is taken while the plan waits: the plan is written right after",
                true,
                vec![
                    (pending(Some(1)), 120, Wait("record of gen 1 is not committed")),
                    (gone(), 200, Armed(300, "settling")),
                    (Event::SettleTimerFired, 300, Armed(400, "gen 2 waits")),
                    (Event::SettleTimerFired, 400, Armed(500, "gen 2 waits")),
                    (pending(None), 450, Armed(450, "written now")),
                    (Event::SettleTimerFired, 450, Write(2, "left: b")),
                ],
            ),
            (
                "a record etcd never takes holds the plan at most RECORD_HOLD_MAX_MS",
                true,
                vec![
                    (pending(Some(1)), 120, Wait("not committed")),
                    (gone(), 200, Armed(300, "settling")),
                    (Event::SettleTimerFired, 300, Armed(400, "gen 2 waits")),
                    (Event::SettleTimerFired, late - 50, Armed(late, "gen 2 waits")),
                    (Event::SettleTimerFired, late, Write(2, "etcd will refuse it")),
                ],
            ),
            (
                "a record pending before the change and taken before the settle window ends: no wait",
                true,
                vec![
                    (pending(Some(1)), 120, Wait("not committed")),
                    (gone(), 200, Armed(300, "settling")),
                    (pending(None), 250, Wait("no checkpoint record pending")),
                    (Event::SettleTimerFired, 300, Write(2, "left: b")),
                ],
            ),
            (
                "a pending record of an older generation does not hold the plan (the fence \
                 refuses it whatever the leader does)",
                true,
                vec![
                    (pending(Some(0)), 120, Wait("not committed")),
                    (gone(), 200, Armed(300, "settling")),
                    (Event::SettleTimerFired, 300, Write(2, "left: b")),
                ],
            ),
            (
                "a follower's pending record changes nothing (the leader plans)",
                false,
                vec![
                    (pending(Some(1)), 120, Wait("follower")),
                    (gone(), 200, Wait("follower")),
                    (Event::SettleTimerFired, 300, Wait("follower")),
                ],
            ),
        ];
        for (name, lead, steps) in table {
            let mut p = Planner::new(cfg(1)).unwrap();
            if lead {
                p.handle(Event::BecameLeader { current: None }, 0);
            }
            p.handle(Event::MemberJoined(info("a", 1, 0)), 0);
            p.handle(Event::MemberJoined(info("b", 1, 0)), 0);
            let g1 = match lead {
                true => writes(&p.handle(Event::SettleTimerFired, 100))[0].clone(),
                false => {
                    compute_plan(None, &[info("a", 1, 0), info("b", 1, 0)], &cfg(1), 1).unwrap()
                }
            };
            p.handle(Event::PlanCommitted(g1), 110);
            assert_eq!(p.current_generation(), 1, "{name}");
            for (i, (event, now, want)) in steps.into_iter().enumerate() {
                let e = p.handle(event, now);
                let why = format!("{name}, step {i}: want {want:?}, got {e:?}");
                match want {
                    Write(g, text) => {
                        let w = writes(&e);
                        assert!(w.len() == 1 && w[0].generation == g, "{why}");
                        assert!(w[0].reason.contains(text), "{why}");
                        assert_eq!(p.held_for_record_since_ms(), None, "{why}");
                    }
                    Armed(at, text) => {
                        assert!(writes(&e).is_empty(), "{why}");
                        assert_eq!(armed(&e), Some(at), "{why}");
                        assert!(e.iter().any(|x| x.reason().contains(text)), "{why}");
                    }
                    Wait(text) => {
                        assert!(writes(&e).is_empty() && armed(&e).is_none(), "{why}");
                        assert!(e.iter().any(|x| x.reason().contains(text)), "{why}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_steady_trickle_cannot_postpone_the_plan_past_the_cap() {
        let mut p = leader(cfg(1));
        let mut last_at = 0;
        for i in 0..20u64 {
            let e = p.handle(Event::MemberJoined(info(&format!("m{i:02}"), 1, 0)), i * 50);
            if let Some(at) = armed(&e) {
                last_at = at;
            }
        }
        assert_eq!(last_at, 300, "settle_max_ms after the first change");
        assert_eq!(p.settle_deadline_ms(), Some(300));
        let e = p.handle(Event::SettleTimerFired, 300);
        assert_eq!(writes(&e).len(), 1);
    }

    #[test]
    fn one_write_in_flight_and_stale_commits_ignored() {
        let mut p = leader(cfg(1));
        p.handle(Event::MemberJoined(info("a", 1, 0)), 0);
        let e = p.handle(Event::SettleTimerFired, 100);
        let g1 = writes(&e)[0].clone();
        // A change during the write: the timer fires, but no second write.
        p.handle(Event::MemberJoined(info("b", 1, 0)), 110);
        let e = p.handle(Event::SettleTimerFired, 210);
        assert!(
            writes(&e).is_empty() && e[0].reason().contains("in flight"),
            "{e:?}"
        );
        // Commit: the leader sees the difference and settles again.
        let e = p.handle(Event::PlanCommitted(g1.clone()), 220);
        assert_eq!(armed(&e), Some(320), "{e:?}");
        let e = p.handle(Event::SettleTimerFired, 320);
        let g2 = writes(&e)[0].clone();
        assert_eq!(g2.generation, 2);
        assert!(matches!(
            e[0],
            Effect::WritePlan {
                expected_prev_generation: 1,
                ..
            }
        ));
        p.handle(Event::PlanCommitted(g2), 330);
        // An old plan arriving late is ignored.
        let e = p.handle(Event::PlanCommitted(g1), 340);
        assert!(e[0].reason().contains("generations only grow"), "{e:?}");
        assert_eq!(p.current_generation(), 2);
    }

    #[test]
    fn a_failed_write_is_retried_with_backoff_and_a_foreign_commit_supersedes_it() {
        let mut p = leader(cfg(1));
        p.handle(Event::MemberJoined(info("a", 1, 0)), 0);
        let e = p.handle(Event::SettleTimerFired, 100);
        let ours = writes(&e)[0].clone();
        let e = p.handle(
            Event::PlanWriteFailed {
                generation: 7,
                reason: "x".into(),
            },
            110,
        );
        assert!(e[0].reason().contains("no such write"), "{e:?}");
        let e = p.handle(
            Event::PlanWriteFailed {
                generation: 1,
                reason: "compare failed".into(),
            },
            110,
        );
        assert_eq!(armed(&e), Some(310), "2 x settle");
        // Someone else's gen 1 arrives; it already has a: nothing more to do.
        let mut theirs = ours.clone();
        theirs.reason = "written by another leader".into();
        let e = p.handle(Event::PlanCommitted(theirs), 120);
        assert!(e[0].reason().contains("match gen 1"), "{e:?}");
        let e = p.handle(Event::SettleTimerFired, 310);
        assert!(writes(&e).is_empty(), "{e:?}");
    }

    #[test]
    fn followers_never_write_and_a_new_leader_plans_from_its_view() {
        let mut p = Planner::new(cfg(1)).unwrap();
        for e in [
            p.handle(Event::MemberJoined(info("a", 1, 0)), 0),
            p.handle(Event::MemberJoined(info("b", 1, 0)), 0),
            p.handle(Event::SettleTimerFired, 1_000),
            p.handle(
                Event::Suspected {
                    member: id("a"),
                    reporter: id("b"),
                    reason: "late".into(),
                },
                0,
            ),
            p.handle(
                Event::ProbeResult {
                    member: id("a"),
                    alive: false,
                },
                0,
            ),
        ] {
            assert!(matches!(&e[..], [Effect::Wait { .. }]), "{e:?}");
        }
        let e = p.handle(Event::BecameLeader { current: None }, 2_000);
        assert_eq!(armed(&e), Some(2_100));
        let e = p.handle(Event::SettleTimerFired, 2_100);
        assert_eq!(writes(&e)[0].members, vec![id("a"), id("b")]);
        let e = p.handle(Event::LostLeadership, 2_150);
        assert!(e[0].reason().contains("lost leadership"));
        assert_eq!(p.write_in_flight(), None);
        assert!(writes(&p.handle(Event::SettleTimerFired, 3_000)).is_empty());
    }

    #[test]
    fn below_minimum_waits_with_a_reason() {
        let mut p = leader(PlannerConfig {
            min_members: 3,
            ..cfg(1)
        });
        p.handle(Event::MemberJoined(info("a", 1, 0)), 0);
        p.handle(Event::MemberJoined(info("b", 1, 0)), 0);
        let e = p.handle(Event::SettleTimerFired, 100);
        assert!(writes(&e).is_empty());
        assert!(e[0].reason().contains("min_members"), "{e:?}");
    }

    #[test]
    fn suspicion_needs_confirmation_before_a_revocation() {
        let mut p = leader(cfg(1));
        for m in ["a", "b", "c", "x"] {
            p.handle(Event::MemberJoined(info(m, 1, 0)), 0);
        }
        let sus = |who: &str, by: &str| Event::Suspected {
            member: id(who),
            reporter: id(by),
            reason: "missed step deadline".into(),
        };
        // One reporter: probe.
        let e = p.handle(sus("x", "a"), 10);
        assert!(
            matches!(&e[..], [Effect::Probe { member, .. }] if member == &id("x")),
            "{e:?}"
        );
        // The probe answers: cleared, nothing revoked.
        let e = p.handle(
            Event::ProbeResult {
                member: id("x"),
                alive: true,
            },
            20,
        );
        assert!(e[0].reason().contains("cleared"), "{e:?}");
        assert!(!p.confirmed(&id("x")));
        // One reporter and a failed probe: revoke.
        p.handle(sus("x", "a"), 30);
        let e = p.handle(
            Event::ProbeResult {
                member: id("x"),
                alive: false,
            },
            40,
        );
        assert!(
            matches!(&e[..], [Effect::RevokeLease { member, .. }] if member == &id("x")),
            "{e:?}"
        );
        assert!(e[0].reason().contains("failed probe"));
        // Two reporters: revoke.
        p.handle(sus("c", "a"), 50);
        let e = p.handle(sus("c", "b"), 60);
        assert!(matches!(&e[..], [Effect::RevokeLease { .. }]), "{e:?}");
        // Unknown members are not revoked; leaving forgets the suspicion.
        let e = p.handle(sus("nobody", "a"), 70);
        assert!(matches!(&e[..], [Effect::Wait { .. }]));
        p.handle(Event::LeaseExpired(id("c")), 80);
        assert!(!p.confirmed(&id("c")));
    }

    #[test]
    fn a_restarted_member_forces_a_new_generation() {
        let mut p = leader(cfg(1));
        p.handle(Event::MemberJoined(info("a", 1, 0)), 0);
        p.handle(Event::MemberJoined(info("b", 1, 0)), 0);
        let g1 = writes(&p.handle(Event::SettleTimerFired, 100))[0].clone();
        p.handle(Event::PlanCommitted(g1), 100);
        // b restarts: same id, re-registered at gen 1.
        let e = p.handle(Event::MemberJoined(info("b", 1, 1)), 200);
        assert!(e[0].reason().contains("re-registered"), "{e:?}");
        let g2 = writes(&p.handle(Event::SettleTimerFired, 300))[0].clone();
        assert_eq!(layout(&g2), vec![(0, "a"), (1, "b")]);
        assert_eq!(without_state(&g2), 1, "{}", g2.reason);
        p.handle(Event::PlanCommitted(g2), 300);
        // Then it is settled: no gen 3.
        p.handle(Event::MemberJoined(info("b", 1, 1)), 400);
        assert!(writes(&p.handle(Event::SettleTimerFired, 10_000)).is_empty());
    }

    #[test]
    fn the_known_member_bound_holds() {
        let mut c = cfg(1);
        c.max_members = 2;
        c.min_members = 1;
        c.max_known_members = 3;
        let mut p = leader(c);
        for i in 0..5 {
            p.handle(Event::MemberJoined(info(&format!("m{i}"), 1, 0)), 0);
        }
        assert_eq!(p.known_members().count(), 3);
        let e = p.handle(Event::MemberJoined(info("m9", 1, 0)), 0);
        assert!(e[0].reason().contains("max_known_members"));
    }

    // ---- Properties ----------------------------------------------------------

    /// Devices of a member are a function of its id, so capacity never changes
    /// between generations in these properties.
    fn devices_of(i: u8) -> u32 {
        u32::from(i % 3) + 1
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8),
        Rejoin(u8),
        Leave(u8),
        Expire(u8),
        Suspect(u8, u8),
        Probe(u8, bool),
        Advance(u16),
        Fire,
        Commit,
        Fail,
        Foreign(u8),
        StaleCommit,
        Lead,
        Lose,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12).prop_map(Op::Join),
            1 => (0u8..12).prop_map(Op::Rejoin),
            2 => (0u8..12).prop_map(Op::Leave),
            2 => (0u8..12).prop_map(Op::Expire),
            1 => (0u8..12, 0u8..12).prop_map(|(a, b)| Op::Suspect(a, b)),
            1 => (0u8..12, any::<bool>()).prop_map(|(a, b)| Op::Probe(a, b)),
            3 => (0u16..400).prop_map(Op::Advance),
            3 => Just(Op::Fire),
            3 => Just(Op::Commit),
            1 => Just(Op::Fail),
            1 => (0u8..12).prop_map(Op::Foreign),
            1 => Just(Op::StaleCommit),
            1 => Just(Op::Lead),
            1 => Just(Op::Lose),
        ]
    }

    fn check_plan(
        plan: &Plan,
        prev: Option<&Plan>,
        registered: &BTreeMap<MemberId, MemberInfo>,
    ) -> Result<(), TestCaseError> {
        plan.validate()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ranks: Vec<u32> = plan.ranks.iter().map(|a| a.rank).collect();
        prop_assert_eq!(ranks, (0..plan.world).collect::<Vec<_>>());
        prop_assert!(!plan.reason.is_empty());
        let mut all: Vec<&MemberId> = plan.members.iter().chain(&plan.spares).collect();
        all.sort();
        prop_assert_eq!(all, registered.keys().collect::<Vec<_>>());
        if let Some(prev) = prev {
            for a in &prev.ranks {
                if a.rank < plan.world && plan.contains(&a.member) {
                    prop_assert_eq!(
                        plan.member_of(a.rank),
                        Some(&a.member),
                        "survivor {} lost rank {} (world {} -> {})",
                        &a.member,
                        a.rank,
                        prev.world,
                        plan.world
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random event sequences against a model etcd that compares the generation:
        /// at most one write in flight, every write is for current + 1, at most one
        /// committed plan per generation, generations only grow, a plan's ranks are
        /// exactly 0..world, survivors keep their ranks where they fit, only a leader
        /// writes, revokes or probes, and every effect has a reason.
        #[test]
        fn random_event_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..120)) {
            let mut p = Planner::new(cfg(2)).unwrap();
            let mut now = 0u64;
            // The model etcd: committed plans by generation.
            let mut etcd: BTreeMap<u64, Plan> = BTreeMap::new();
            let mut registered: BTreeMap<MemberId, MemberInfo> = BTreeMap::new();
            // Plan writes travelling to the model etcd, oldest first (bounded: one per
            // leadership term at most, and terms are few).
            let mut network: Vec<Plan> = Vec::new();
            // Generations written and not yet failed or superseded by a leadership change.
            let mut outstanding: BTreeSet<u64> = BTreeSet::new();
            // The settle window as seen from outside: (first change, started by a failure).
            let mut window: Option<(u64, bool)> = None;
            for op in ops {
                let name = |i: u8| id(&format!("m{i:02}"));
                let etcd_gen = etcd.keys().next_back().copied().unwrap_or(0);
                let event = match op {
                    Op::Join(i) | Op::Rejoin(i) => {
                        let joined_gen = if matches!(op, Op::Rejoin(_)) { etcd_gen } else {
                            registered.get(&name(i)).map_or(etcd_gen, |m| m.joined_gen)
                        };
                        let m = MemberInfo { id: name(i), devices: devices_of(i), joined_gen, addr: String::new(), metrics_addr: String::new() };
                        registered.insert(m.id.clone(), m.clone());
                        Event::MemberJoined(m)
                    }
                    Op::Leave(i) => { registered.remove(&name(i)); Event::MemberLeft(name(i)) }
                    Op::Expire(i) => { registered.remove(&name(i)); Event::LeaseExpired(name(i)) }
                    Op::Suspect(a, b) => Event::Suspected { member: name(a), reporter: name(b), reason: "late".into() },
                    Op::Probe(a, alive) => Event::ProbeResult { member: name(a), alive },
                    Op::Advance(ms) => { now += u64::from(ms); continue; }
                    Op::Fire => Event::SettleTimerFired,
                    Op::Commit | Op::Fail if network.is_empty() => continue,
                    Op::Commit => {
                        let plan = network.remove(0);
                        // The model etcd's compare: only gen current + 1 lands.
                        if plan.generation == etcd_gen + 1 {
                            etcd.insert(plan.generation, plan.clone());
                            Event::PlanCommitted(plan)
                        } else {
                            Event::PlanWriteFailed { generation: plan.generation, reason: "compare failed".into() }
                        }
                    }
                    Op::Fail => {
                        let plan = network.remove(0);
                        Event::PlanWriteFailed { generation: plan.generation, reason: "timeout".into() }
                    }
                    Op::Foreign(i) => {
                        // Another leader commits the next generation.
                        let members: Vec<MemberInfo> = registered.values().filter(|m| m.id != name(i)).cloned().collect();
                        match compute_plan(etcd.values().next_back(), &members, &cfg(2), etcd_gen + 1) {
                            Ok(plan) => { etcd.insert(plan.generation, plan.clone()); Event::PlanCommitted(plan) }
                            Err(_) => continue,
                        }
                    }
                    Op::StaleCommit => match etcd.values().next() {
                        Some(plan) => Event::PlanCommitted(plan.clone()),
                        None => continue,
                    },
                    Op::Lead => Event::BecameLeader { current: etcd.values().next_back().cloned() },
                    Op::Lose => Event::LostLeadership,
                };
                let was_leader = p.is_leader();
                let had_in_flight = p.write_in_flight();
                let gen_before = p.current_generation();
                let prev = p.current().cloned();
                let fired = matches!(event, Event::SettleTimerFired);
                let failed = matches!(event, Event::PlanWriteFailed { .. });
                let lead = matches!(event, Event::BecameLeader { .. });
                match &event {
                    Event::PlanWriteFailed { generation, .. } => { outstanding.remove(generation); }
                    Event::BecameLeader { .. } | Event::LostLeadership => outstanding.clear(),
                    _ => {}
                }
                let effects = p.handle(event, now);
                prop_assert!(!effects.is_empty(), "every event gets an explained outcome");
                prop_assert!(p.current_generation() >= gen_before, "generations only grow");
                for e in &effects {
                    prop_assert!(!e.reason().is_empty(), "{:?}", e);
                    match e {
                        Effect::WritePlan { plan, expected_prev_generation } => {
                            prop_assert!(was_leader && fired, "only a leader's settle timer writes");
                            prop_assert_eq!(had_in_flight, None, "at most one write in flight");
                            prop_assert_eq!(*expected_prev_generation, gen_before);
                            prop_assert_eq!(plan.generation, gen_before + 1);
                            prop_assert!(outstanding.insert(plan.generation),
                                "gen {} written twice without a failure in between", plan.generation);
                            check_plan(plan, prev.as_ref(), &registered)?;
                            network.push(plan.clone());
                        }
                        Effect::RevokeLease { member, .. } | Effect::Probe { member, .. } => {
                            prop_assert!(p.is_leader(), "only a leader revokes or probes");
                            prop_assert!(registered.contains_key(member));
                        }
                        Effect::ArmSettleTimer { at_ms, .. } => {
                            prop_assert!(p.is_leader());
                            prop_assert_eq!(Some(*at_ms), p.settle_deadline_ms());
                        }
                        Effect::Wait { .. } => {}
                    }
                }
                // The settle cap: a window started by a change ends at most settle_max_ms
                // after it, however many changes follow (a retry window may back off
                // further).
                window = match (window, p.settle_deadline_ms()) {
                    (_, None) => None,
                    // A failure or a new term starts a fresh window.
                    (_, Some(_)) if failed || lead => Some((now, failed)),
                    (None, Some(_)) => Some((now, false)),
                    (w, Some(_)) => w,
                };
                if let (Some((first, false)), Some(d)) = (window, p.settle_deadline_ms()) {
                    prop_assert!(d <= first + 300, "settle deadline {} > first change {} + 300", d, first);
                }
            }
            // At most one committed plan per generation, each valid, generations dense.
            let gens: Vec<u64> = etcd.keys().copied().collect();
            prop_assert_eq!(gens, (1..=etcd.len() as u64).collect::<Vec<_>>());
            for plan in etcd.values() { plan.validate().map_err(|e| TestCaseError::fail(e.to_string()))?; }
        }

        /// Whatever the configuration, members and previous plan, a plan `compute_plan`
        /// returns passes `Plan::validate` (which is what a plan read from etcd must pass).
        #[test]
        fn compute_plan_outputs_always_validate(
            before in proptest::collection::vec((0u8..24, 1u32..6, 0u64..3), 0..14),
            after in proptest::collection::vec((0u8..24, 1u32..6, 0u64..4), 0..14),
            pp in 1u32..5,
            max_members in 1usize..10,
            max_ranks in 1u32..5,
            generation in 1u64..1_000,
        ) {
            let c = PlannerConfig { max_members, max_ranks_per_member: max_ranks, ..cfg(pp) };
            let dedup = |v: &[(u8, u32, u64)]| -> Vec<MemberInfo> {
                let mut seen = BTreeSet::new();
                v.iter()
                    .filter(|(i, _, _)| seen.insert(*i))
                    .map(|&(i, devices, joined_gen)| MemberInfo { id: id(&format!("m{i:02}")), devices, joined_gen, addr: String::new(), metrics_addr: String::new() })
                    .collect()
            };
            let prev = compute_plan(None, &dedup(&before), &c, generation).ok();
            if let Some(p) = &prev {
                p.validate().map_err(|e| TestCaseError::fail(format!("{e}: {p:?}")))?;
            }
            let next_gen = prev.as_ref().map_or(generation, |p| p.generation + 1);
            if let Ok(p) = compute_plan(prev.as_ref(), &dedup(&after), &c, next_gen) {
                p.validate().map_err(|e| TestCaseError::fail(format!("{e}: {p:?}")))?;
            }
        }

        /// compute_plan alone over random prev/next member sets.
        #[test]
        fn compute_plan_keeps_ranks_exact_and_stable(
            before in proptest::collection::btree_set(0u8..20, 1..12),
            after in proptest::collection::btree_set(0u8..20, 1..12),
            restarted in proptest::collection::btree_set(0u8..20, 0..4),
            pp in 1u32..4,
        ) {
            let c = PlannerConfig { max_members: 8, ..cfg(pp) };
            let mk = |i: u8, g: u64| MemberInfo { id: id(&format!("m{i:02}")), devices: devices_of(i), joined_gen: g, addr: String::new(), metrics_addr: String::new() };
            let b: Vec<MemberInfo> = before.iter().map(|&i| mk(i, 0)).collect();
            let Ok(prev) = compute_plan(None, &b, &c, 1) else { return Ok(()); };
            prev.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let a: Vec<MemberInfo> = after.iter().map(|&i| mk(i, if restarted.contains(&i) { 1 } else { 0 })).collect();
            let registered: BTreeMap<MemberId, MemberInfo> = a.iter().map(|m| (m.id.clone(), m.clone())).collect();
            let Ok(plan) = compute_plan(Some(&prev), &a, &c, 2) else { return Ok(()); };
            check_plan(&plan, Some(&prev), &registered)?;
            plan.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
            // The reason counts exactly the ranks whose member does not hold their stage.
            let without = plan.ranks.iter().filter(|r| {
                let info = &registered[&r.member];
                !(info.joined_gen < prev.generation
                    && prev.ranks.iter().any(|x| x.member == r.member && x.stage == r.stage))
            }).count();
            prop_assert_eq!(without_state(&plan), without, "{}", plan.reason);
        }
    }
}

/// Which members of a new generation keep training when they do not all hold the same
/// state, given each member's `(step, param_hash)` in member order: the reference is the
/// highest step and, among the members at it, the parameter hash most of them hold (ties:
/// the first such member's). `true` for the members that hold the reference state; the
/// others copy the state from a holder before training. An empty hash is a member that
/// holds no state at all (a node that joined a running job without loading anything): it
/// never counts; when every member is empty, nobody holds the reference (all `false`).
///
/// [`state_donors`] names, for the others, the holder each copies the state from.
pub fn members_holding_reference_state(states: &[(u64, &str)]) -> Vec<bool> {
    let Some(best_step) = states
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(s, _)| *s)
        .max()
    else {
        return vec![false; states.len()];
    };
    let mut best: Option<(&str, usize)> = None;
    for (_, h) in states
        .iter()
        .filter(|(s, h)| *s == best_step && !h.is_empty())
    {
        let n = states
            .iter()
            .filter(|(s, x)| *s == best_step && x == h)
            .count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((h, n));
        }
    }
    let reference = best.map(|(h, _)| h).unwrap_or_default();
    states
        .iter()
        .map(|(s, h)| *s == best_step && *h == reference)
        .collect()
}

#[cfg(test)]
mod reference_state_tests {
    use super::members_holding_reference_state as keep;

    #[test]
    fn table() {
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(u64, &str)], &[bool])] = &[
            (&[], &[]),
            (&[(5, "a"), (5, "a"), (5, "a")], &[true, true, true]),
            // A restarted member behind the group.
            (&[(5, "a"), (0, "z"), (5, "a")], &[true, false, true]),
            // One member completed a step the others did not: the highest step wins.
            (&[(5, "a"), (6, "b"), (5, "a")], &[false, true, false]),
            // Same step, a diverged member: the majority wins.
            (&[(5, "x"), (5, "a"), (5, "a")], &[false, true, true]),
            // A tie: the first member's hash.
            (&[(5, "x"), (5, "a")], &[true, false]),
            // A joiner that holds nothing, whatever step it claims.
            (&[(5, "a"), (9, ""), (5, "a")], &[true, false, true]),
            // Nobody holds state.
            (&[(0, ""), (0, "")], &[false, false]),
        ];
        for (states, want) in cases {
            assert_eq!(keep(states), *want, "{states:?}");
        }
    }
}

/// Whether every member hosting a rank in `current` hosts one in `next` too: a plan that
/// only adds members (or moves ranks among the same members). Then the step in flight can
/// still complete, and members finish it before they re-form; otherwise a member it needs
/// is gone and the step is abandoned at once.
pub fn keeps_every_member(current: &Plan, next: &Plan) -> bool {
    current
        .ranks
        .iter()
        .all(|a| next.ranks.iter().any(|b| b.member == a.member))
}

#[cfg(test)]
mod keeps_every_member_tests {
    use super::*;

    fn plan(generation: u64, members: &[&str]) -> Plan {
        let infos: Vec<MemberInfo> = members
            .iter()
            .map(|m| MemberInfo {
                id: MemberId::new(*m),
                devices: 1,
                joined_gen: 0,
                addr: String::new(),
                metrics_addr: String::new(),
            })
            .collect();
        compute_plan(None, &infos, &PlannerConfig::default(), generation).unwrap()
    }

    #[test]
    fn ranks_of_each_follows_the_order_asked_and_gives_strangers_none() {
        let p = plan(3, &["a", "b"]);
        let got = p.ranks_of_each(["b", "x", "a"]);
        assert_eq!(
            got,
            vec![p.ranks_of(&"b".into()), vec![], p.ranks_of(&"a".into())]
        );
        assert!(!got[0].is_empty() && !got[2].is_empty());
        assert_ne!(got[0], got[2]);
    }

    #[test]
    fn table() {
        let cases: &[(&[&str], &[&str], bool)] = &[
            (&["a", "b"], &["a", "b"], true),
            (&["a", "b"], &["a", "b", "c"], true),
            (&["a", "b", "c"], &["a", "c"], false),
            (&["a"], &["b"], false),
        ];
        for (cur, next, want) in cases {
            assert_eq!(
                keeps_every_member(&plan(1, cur), &plan(2, next)),
                *want,
                "{cur:?} -> {next:?}"
            );
        }
    }
}

/// Who copies state from whom at the start of a generation, given each member's
/// `(step, param_hash)` in member order (as for [`members_holding_reference_state`]):
/// `None` for the members that hold the reference state, `Some(donor)` (a member index)
/// for the others. Receivers are spread over the holders round-robin in member order, so
/// that one donor does not serve every joiner when several hold the state. Every member
/// computes the same answer from the same exchanged states.
pub fn state_donors(states: &[(u64, &str)]) -> Vec<Option<usize>> {
    let keep = members_holding_reference_state(states);
    let holders: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    let mut next = 0usize;
    keep.iter()
        .map(|&k| {
            if k || holders.is_empty() {
                None
            } else {
                let d = holders[next % holders.len()];
                next += 1;
                Some(d)
            }
        })
        .collect()
}

#[cfg(test)]
mod state_donors_tests {
    use super::state_donors;

    #[test]
    fn table() {
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(u64, &str)], &[Option<usize>])] = &[
            (&[], &[]),
            (&[(5, "a"), (5, "a")], &[None, None]),
            // A restarted member behind the group copies from the first holder.
            (&[(5, "a"), (0, "z"), (5, "a")], &[None, Some(0), None]),
            // Kill during the all-gather: one member completed the step.
            (&[(6, "b"), (5, "a"), (5, "a")], &[None, Some(0), Some(0)]),
            // Two joiners, two holders: one each.
            (
                &[(7, "a"), (0, "z"), (7, "a"), (0, "y")],
                &[None, Some(0), None, Some(2)],
            ),
            // A diverged member at the same step: the majority donates.
            (&[(5, "x"), (5, "a"), (5, "a")], &[Some(1), None, None]),
            // An empty joiner copies; when every member is empty nobody can donate.
            (&[(0, ""), (3, "a")], &[Some(1), None]),
            (&[(0, ""), (0, "")], &[None, None]),
        ];
        for (states, want) in cases {
            assert_eq!(state_donors(states), *want, "{states:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn donors_hold_the_reference_and_receivers_do_not(
            states in proptest::collection::vec((0u64..4, 0usize..3), 0..9)
        ) {
            let hashes = ["a", "b", ""];
            let states: Vec<(u64, &str)> = states.iter().map(|&(s, h)| (s, hashes[h])).collect();
            let keep = super::members_holding_reference_state(&states);
            let donors = state_donors(&states);
            proptest::prop_assert_eq!(donors.len(), states.len());
            for (i, d) in donors.iter().enumerate() {
                match d {
                    None => proptest::prop_assert!(keep[i] || keep.iter().all(|k| !k)),
                    Some(d) => {
                        proptest::prop_assert!(!keep[i]);
                        proptest::prop_assert!(keep[*d]);
                    }
                }
            }
        }
    }
}

//! Failure detection: when a peer becomes a suspect, and when a suspicion is strong
//! enough to revoke the peer's lease.
//!
//! Two pieces, both pure (time comes in as `now_ms`):
//! - [`FailureDetector`]: the observed durations of one kind of operation (a step's
//!   all-reduce, a ping, an activation send) in a bounded window. An operation in flight
//!   longer than `k` times the observed p99 (never less than a floor) makes its peer a
//!   [`Suspicion`]. A straggler whose durations are in the window raises the p99 and so
//!   its own deadline: it is slow, not dead, and is not suspected.
//! - [`Confirmation`]: the leader's record of suspicions. One report never evicts
//!   anyone: a suspicion is confirmed only by a second, distinct reporter or by the
//!   leader's own failed probe, so one slow link cannot evict a healthy node. A success
//!   from the member (a probe it answered) clears the suspicion. Reports expire after a
//!   time to live, so two reports an hour apart do not add up to a confirmation.
//!
//! Every verdict carries a human-readable reason.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::membership::MemberId;

/// The largest window a [`FailureDetector`] may keep (durations remembered).
pub const MAX_WINDOW: usize = 1 << 16;

/// Errors in a detector configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectorError {
    /// A [`DetectorConfig`] or [`ConfirmationConfig`] value is out of range.
    #[error("invalid failure-detector configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and what would be valid.
        reason: String,
    },
}

/// How a [`FailureDetector`] turns observed durations into a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// How many of the most recent durations the p99 is taken over (1..=[`MAX_WINDOW`]).
    pub window: usize,
    /// The deadline is `k` times the observed p99 (at least 1).
    pub k: u32,
    /// The deadline never goes below this, and it is the whole deadline until
    /// `min_samples` durations have been observed.
    pub min_deadline_ms: u64,
    /// Durations needed before the p99 is trusted (1..=`window`).
    pub min_samples: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            window: 1024,
            k: 3,
            min_deadline_ms: 1000,
            min_samples: 16,
        }
    }
}

impl DetectorConfig {
    /// Checks that every value is in range.
    pub fn validate(&self) -> Result<(), DetectorError> {
        let bad = |reason: String| Err(DetectorError::InvalidConfig { reason });
        if self.window == 0 || self.window > MAX_WINDOW {
            return bad(format!(
                "window is {}; it must be between 1 and {MAX_WINDOW}",
                self.window
            ));
        }
        if self.k == 0 {
            return bad("k is 0; the deadline multiplier must be at least 1".into());
        }
        if self.min_samples == 0 || self.min_samples > self.window {
            return bad(format!(
                "min_samples is {}; it must be between 1 and the window ({})",
                self.min_samples, self.window
            ));
        }
        Ok(())
    }
}

/// A peer that has not answered within the deadline of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicion {
    /// The peer that is late.
    pub member: MemberId,
    /// The kind of operation it is late in.
    pub operation: String,
    /// When the operation started.
    pub started_ms: u64,
    /// How long it has been waited for.
    pub waited_ms: u64,
    /// The deadline it missed.
    pub deadline_ms: u64,
    /// Why this is a suspicion, for logs and for the leader.
    pub reason: String,
}

/// Observed durations of one kind of operation and the deadline they imply.
///
/// The window is a ring of the most recent durations plus a sorted copy of it, so
/// [`FailureDetector::p99`] is a lookup and [`FailureDetector::observe`] costs one
/// binary search and one shift of at most `window` values.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    /// The operation kind, named in every suspicion.
    operation: String,
    /// Deadline rules.
    config: DetectorConfig,
    /// The last `config.window` durations, oldest first.
    ring: VecDeque<u64>,
    /// The same durations, sorted ascending.
    sorted: Vec<u64>,
}

impl FailureDetector {
    /// A detector for one kind of operation with no observations yet.
    pub fn new(
        operation: impl Into<String>,
        config: DetectorConfig,
    ) -> Result<Self, DetectorError> {
        config.validate()?;
        Ok(Self {
            operation: operation.into(),
            ring: VecDeque::with_capacity(config.window.min(1024)),
            sorted: Vec::with_capacity(config.window.min(1024)),
            config,
        })
    }

    /// The operation kind this detector watches.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Records one completed operation's duration, forgetting the oldest when the
    /// window is full. Late completions must be recorded too: that is how a straggler
    /// raises its own deadline.
    pub fn observe(&mut self, duration_ms: u64) {
        if self.ring.len() == self.config.window {
            if let Some(old) = self.ring.pop_front() {
                if let Ok(i) = self.sorted.binary_search(&old) {
                    self.sorted.remove(i);
                }
            }
        }
        self.ring.push_back(duration_ms);
        let i = self.sorted.partition_point(|&x| x < duration_ms);
        self.sorted.insert(i, duration_ms);
    }

    /// How many durations the window holds.
    pub fn samples(&self) -> usize {
        self.ring.len()
    }

    /// The 99th percentile (nearest rank) of the window, once it holds `min_samples`.
    pub fn p99(&self) -> Option<u64> {
        let n = self.sorted.len();
        if n < self.config.min_samples {
            return None;
        }
        // Nearest rank: the smallest value with at least 99% of the window at or below it.
        let rank = (n * 99).div_ceil(100).max(1);
        Some(self.sorted[rank - 1])
    }

    /// The deadline an operation of this kind gets now: `max(min_deadline_ms, k x p99)`,
    /// or `min_deadline_ms` while the p99 is not yet trusted.
    pub fn deadline_ms(&self) -> u64 {
        match self.p99() {
            Some(p) => p
                .saturating_mul(u64::from(self.config.k))
                .max(self.config.min_deadline_ms),
            None => self.config.min_deadline_ms,
        }
    }

    /// How the current deadline was derived, in words.
    pub fn deadline_reason(&self) -> String {
        match self.p99() {
            Some(p) => format!(
                "deadline {} ms = max(floor {} ms, {} x p99 {} ms over {} `{}` samples)",
                self.deadline_ms(),
                self.config.min_deadline_ms,
                self.config.k,
                p,
                self.samples(),
                self.operation
            ),
            None => format!(
                "deadline {} ms = floor (only {} of {} `{}` samples needed for a p99)",
                self.config.min_deadline_ms,
                self.samples(),
                self.config.min_samples,
                self.operation
            ),
        }
    }

    /// Whether an operation with `member` that started at `started_ms` and has not
    /// finished by `now_ms` has missed its deadline. This only suspects: the leader's
    /// [`Confirmation`] decides whether anything is done about it.
    pub fn check(&self, member: &MemberId, started_ms: u64, now_ms: u64) -> Option<Suspicion> {
        let waited_ms = now_ms.saturating_sub(started_ms);
        let deadline_ms = self.deadline_ms();
        if waited_ms <= deadline_ms {
            return None;
        }
        Some(Suspicion {
            member: member.clone(),
            operation: self.operation.clone(),
            started_ms,
            waited_ms,
            deadline_ms,
            reason: format!(
                "`{}` with {member} started at {started_ms} ms has waited {waited_ms} ms, past its {}",
                self.operation,
                self.deadline_reason()
            ),
        })
    }
}

/// How long reports are remembered and how many suspects are tracked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmationConfig {
    /// A report (or a confirmation) older than this is forgotten (at least 1).
    pub report_ttl_ms: u64,
    /// At most this many members are suspected at once; further reports are ignored
    /// (with a reason) until older ones clear or expire (at least 1).
    pub max_suspects: usize,
}

impl Default for ConfirmationConfig {
    fn default() -> Self {
        Self {
            report_ttl_ms: 10_000,
            max_suspects: 1024,
        }
    }
}

impl ConfirmationConfig {
    /// Checks that every value is in range.
    pub fn validate(&self) -> Result<(), DetectorError> {
        if self.report_ttl_ms == 0 {
            return Err(DetectorError::InvalidConfig {
                reason: "report_ttl_ms is 0; reports must live at least 1 ms".into(),
            });
        }
        if self.max_suspects == 0 {
            return Err(DetectorError::InvalidConfig {
                reason: "max_suspects is 0; at least one suspect must be trackable".into(),
            });
        }
        Ok(())
    }
}

/// What the leader should do about a member after a report, a probe result or a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// First report: the leader should probe the member itself before doing anything.
    Probe {
        /// Who reported what.
        reason: String,
    },
    /// Suspected, waiting for the leader's probe or a second reporter.
    Pending {
        /// What is awaited.
        reason: String,
    },
    /// Confirmed just now: the member's lease should be revoked.
    Confirmed {
        /// The evidence: two reporters, or a report and a failed probe.
        reason: String,
    },
    /// Confirmed earlier; the revocation is already under way.
    AlreadyConfirmed {
        /// The earlier evidence.
        reason: String,
    },
    /// The suspicion was cleared: the member answered.
    Cleared {
        /// What cleared it.
        reason: String,
    },
    /// Nothing recorded (a self-report, an unknown member, too many suspects).
    Ignored {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// The verdict's reason.
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Probe { reason }
            | Verdict::Pending { reason }
            | Verdict::Confirmed { reason }
            | Verdict::AlreadyConfirmed { reason }
            | Verdict::Cleared { reason }
            | Verdict::Ignored { reason } => reason,
        }
    }
}

/// One suspected member.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Suspect {
    /// Who reported it first.
    reporter: MemberId,
    /// What the first reporter said.
    report: String,
    /// When the last piece of evidence arrived (reports expire from here).
    since_ms: u64,
    /// Set once confirmed, with the evidence.
    confirmed: Option<String>,
}

/// The leader's record of suspicions and the confirmation rule.
#[derive(Debug, Clone)]
pub struct Confirmation {
    /// Expiry and bounds.
    config: ConfirmationConfig,
    /// Suspected members; at most `config.max_suspects`.
    suspects: BTreeMap<MemberId, Suspect>,
}

impl Confirmation {
    /// An empty record.
    pub fn new(config: ConfirmationConfig) -> Result<Self, DetectorError> {
        config.validate()?;
        Ok(Self {
            config,
            suspects: BTreeMap::new(),
        })
    }

    /// Forgets reports older than the time to live.
    fn expire(&mut self, now_ms: u64) {
        let ttl = self.config.report_ttl_ms;
        self.suspects
            .retain(|_, s| now_ms.saturating_sub(s.since_ms) <= ttl);
    }

    /// `reporter` says `member` missed a deadline.
    pub fn report(
        &mut self,
        member: &MemberId,
        reporter: &MemberId,
        report: &str,
        now_ms: u64,
    ) -> Verdict {
        self.expire(now_ms);
        if member == reporter {
            return Verdict::Ignored {
                reason: format!("{reporter} reported itself; a member cannot suspect itself"),
            };
        }
        match self.suspects.get_mut(member) {
            Some(s) => {
                if let Some(evidence) = &s.confirmed {
                    return Verdict::AlreadyConfirmed {
                        reason: format!("{member} is already confirmed ({evidence}); new report by {reporter}: {report}"),
                    };
                }
                if &s.reporter == reporter {
                    return Verdict::Pending {
                        reason: format!(
                            "{member} reported again by the same reporter {reporter} ({report}); \
                             waiting for the leader's probe or a second reporter"
                        ),
                    };
                }
                let evidence = format!(
                    "two reporters: {} ({}) and {reporter} ({report})",
                    s.reporter, s.report
                );
                s.confirmed = Some(evidence.clone());
                s.since_ms = now_ms;
                Verdict::Confirmed {
                    reason: format!("{member} confirmed by {evidence}"),
                }
            }
            None => {
                if self.suspects.len() >= self.config.max_suspects {
                    return Verdict::Ignored {
                        reason: format!(
                            "report of {member} by {reporter} dropped: already {} suspects (max_suspects)",
                            self.suspects.len()
                        ),
                    };
                }
                self.suspects.insert(
                    member.clone(),
                    Suspect {
                        reporter: reporter.clone(),
                        report: report.to_string(),
                        since_ms: now_ms,
                        confirmed: None,
                    },
                );
                Verdict::Probe {
                    reason: format!(
                        "{member} suspected by {reporter} ({report}); one reporter is not enough: probing it"
                    ),
                }
            }
        }
    }

    /// The leader's own probe of `member` came back. A failed probe confirms (a probe
    /// is the leader's own evidence, even without a report); an answered probe clears.
    pub fn probe_result(&mut self, member: &MemberId, alive: bool, now_ms: u64) -> Verdict {
        self.expire(now_ms);
        if alive {
            return self.success(member, now_ms);
        }
        match self.suspects.get_mut(member) {
            Some(s) => {
                if let Some(evidence) = &s.confirmed {
                    return Verdict::AlreadyConfirmed {
                        reason: format!(
                            "{member} is already confirmed ({evidence}); its probe also failed"
                        ),
                    };
                }
                let evidence = format!(
                    "report by {} ({}) and the leader's failed probe",
                    s.reporter, s.report
                );
                s.confirmed = Some(evidence.clone());
                s.since_ms = now_ms;
                Verdict::Confirmed {
                    reason: format!("{member} confirmed by {evidence}"),
                }
            }
            None => {
                if self.suspects.len() >= self.config.max_suspects {
                    return Verdict::Ignored {
                        reason: format!(
                            "failed probe of {member} dropped: already {} suspects (max_suspects)",
                            self.suspects.len()
                        ),
                    };
                }
                let evidence = "the leader's failed probe (no report on record)".to_string();
                self.suspects.insert(
                    member.clone(),
                    Suspect {
                        reporter: member.clone(),
                        report: "no report".into(),
                        since_ms: now_ms,
                        confirmed: Some(evidence.clone()),
                    },
                );
                Verdict::Confirmed {
                    reason: format!("{member} confirmed by {evidence}"),
                }
            }
        }
    }

    /// `member` answered something (a probe, an operation): a pending suspicion is
    /// cleared. A confirmed one stays until [`Confirmation::forget`] or expiry, since the
    /// revocation may already be under way.
    pub fn success(&mut self, member: &MemberId, now_ms: u64) -> Verdict {
        self.expire(now_ms);
        match self.suspects.get(member) {
            Some(s) if s.confirmed.is_some() => Verdict::AlreadyConfirmed {
                reason: format!(
                    "{member} answered, but it was already confirmed ({}); the revocation stands",
                    s.confirmed.as_deref().unwrap_or_default()
                ),
            },
            Some(s) => {
                let reason = format!(
                    "{member} answered: suspicion by {} ({}) cleared",
                    s.reporter, s.report
                );
                self.suspects.remove(member);
                Verdict::Cleared { reason }
            }
            None => Verdict::Ignored {
                reason: format!("{member} answered and was not suspected"),
            },
        }
    }

    /// Drops everything about `member` (it left, or its lease is gone).
    pub fn forget(&mut self, member: &MemberId) {
        self.suspects.remove(member);
    }

    /// Whether `member` is confirmed (as of the last call that took a time).
    pub fn confirmed(&self, member: &MemberId) -> bool {
        self.suspects
            .get(member)
            .is_some_and(|s| s.confirmed.is_some())
    }

    /// Whether `member` is suspected or confirmed (as of the last call that took a time).
    pub fn suspected(&self, member: &MemberId) -> bool {
        self.suspects.contains_key(member)
    }

    /// How many members are suspected or confirmed.
    pub fn len(&self) -> usize {
        self.suspects.len()
    }

    /// Whether nobody is suspected.
    pub fn is_empty(&self) -> bool {
        self.suspects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MemberId {
        MemberId::new(s)
    }

    fn cfg(window: usize, k: u32, min_deadline_ms: u64, min_samples: usize) -> DetectorConfig {
        DetectorConfig {
            window,
            k,
            min_deadline_ms,
            min_samples,
        }
    }

    fn conf() -> Confirmation {
        Confirmation::new(ConfirmationConfig {
            report_ttl_ms: 5_000,
            max_suspects: 4,
        })
        .unwrap()
    }

    #[test]
    fn config_errors_name_the_field() {
        let table = [
            (cfg(0, 3, 10, 1), "window"),
            (cfg(MAX_WINDOW + 1, 3, 10, 1), "window"),
            (cfg(8, 0, 10, 1), "k is 0"),
            (cfg(8, 3, 10, 0), "min_samples"),
            (cfg(8, 3, 10, 9), "min_samples"),
        ];
        for (c, word) in table {
            let e = FailureDetector::new("step", c.clone()).unwrap_err();
            assert!(e.to_string().contains(word), "{c:?}: {e}");
        }
        assert!(Confirmation::new(ConfirmationConfig {
            report_ttl_ms: 0,
            max_suspects: 1
        })
        .is_err());
        assert!(Confirmation::new(ConfirmationConfig {
            report_ttl_ms: 1,
            max_suspects: 0
        })
        .is_err());
    }

    #[test]
    fn p99_table() {
        // (window, observations, min_samples, expected p99)
        let table: &[(usize, &[u64], usize, Option<u64>)] = &[
            (8, &[], 1, None),
            (8, &[5, 5], 3, None),
            (8, &[7], 1, Some(7)),
            (200, &[1; 100], 1, Some(1)),
            // Nearest rank over 100 values: the 99th smallest.
            (200, &[10; 99], 1, Some(10)),
            (4, &[100, 1, 2, 3, 4], 1, Some(4)), // 100 fell out of the window
        ];
        for (window, obs, min_samples, want) in table {
            let mut d = FailureDetector::new("op", cfg(*window, 3, 0, *min_samples)).unwrap();
            for &o in *obs {
                d.observe(o);
            }
            assert_eq!(d.p99(), *want, "window {window} obs {obs:?}");
            assert!(d.samples() <= *window);
        }
        // 99 fast and 1 slow: the slow one is the p100, not the p99.
        let mut d = FailureDetector::new("op", cfg(100, 3, 0, 1)).unwrap();
        for _ in 0..99 {
            d.observe(10);
        }
        d.observe(900);
        assert_eq!(d.p99(), Some(10));
        // Two slow in 100: the p99 is slow.
        d.observe(900);
        assert_eq!(d.p99(), Some(900));
    }

    #[test]
    fn deadline_is_k_times_p99_with_a_floor() {
        let mut d = FailureDetector::new("allreduce", cfg(64, 3, 100, 4)).unwrap();
        assert_eq!(d.deadline_ms(), 100, "floor before min_samples");
        assert!(d.deadline_reason().contains("floor"));
        for _ in 0..4 {
            d.observe(20);
        }
        assert_eq!(d.deadline_ms(), 100, "3 x 20 = 60 is under the floor");
        for _ in 0..4 {
            d.observe(50);
        }
        assert_eq!(d.deadline_ms(), 150);
        assert!(d.deadline_reason().contains("3 x p99 50 ms"));
        let s = d.check(&m("b"), 1_000, 1_151).unwrap();
        assert_eq!((s.waited_ms, s.deadline_ms), (151, 150));
        assert!(
            s.reason.contains("allreduce") && s.reason.contains('b'),
            "{}",
            s.reason
        );
        assert_eq!(
            d.check(&m("b"), 1_000, 1_150),
            None,
            "exactly at the deadline is in time"
        );
        assert_eq!(
            d.check(&m("b"), 1_000, 900),
            None,
            "a clock behind the start is no wait"
        );
    }

    /// A straggler that is always slow, and slowly gets slower, raises the p99 with its
    /// own durations and is never suspected, even once it is far past the floor.
    #[test]
    fn straggler_raises_p99_and_is_not_suspected() {
        let floor = 200;
        let mut d = FailureDetector::new("step", cfg(64, 3, floor, 8)).unwrap();
        let mut now = 0;
        let mut suspected = 0;
        let mut past_floor = 0;
        for i in 0..500u64 {
            // Every member takes about 20 ms; the straggler (every 4th op) 120 ms at
            // first and one more ms each op after that, up to 619 ms.
            let took = if i % 4 == 0 { 120 + i } else { 20 };
            if took > floor {
                past_floor += 1;
            }
            if d.check(&m("slow"), now, now + took).is_some() {
                suspected += 1;
            }
            d.observe(took);
            now += took;
        }
        assert!(past_floor > 50, "the floor alone would have suspected it");
        assert_eq!(suspected, 0, "deadline {}", d.deadline_reason());
        assert!(d.deadline_ms() >= 3 * 600);
        // A dead member (no answer for a long time) is still suspected.
        assert!(d.check(&m("dead"), now, now + 10_000).is_some());
    }

    #[test]
    fn one_slow_link_is_never_confirmed_when_the_probe_answers() {
        let mut c = conf();
        let v = c.report(&m("x"), &m("a"), "step late", 0);
        assert!(matches!(v, Verdict::Probe { .. }), "{v:?}");
        // The same reporter again does not add up to two.
        for t in [10, 20, 30] {
            let v = c.report(&m("x"), &m("a"), "step late", t);
            assert!(matches!(v, Verdict::Pending { .. }), "{v:?}");
            assert!(!c.confirmed(&m("x")));
        }
        let v = c.probe_result(&m("x"), true, 40);
        assert!(matches!(v, Verdict::Cleared { .. }), "{v:?}");
        assert!(v.reason().contains("cleared"));
        assert!(!c.suspected(&m("x")) && !c.confirmed(&m("x")));
        // The slow link goes on: every round is probe, answer, cleared.
        for t in (100..1000).step_by(100) {
            assert!(matches!(
                c.report(&m("x"), &m("a"), "late", t),
                Verdict::Probe { .. }
            ));
            assert!(matches!(
                c.probe_result(&m("x"), true, t + 5),
                Verdict::Cleared { .. }
            ));
            assert!(!c.confirmed(&m("x")));
        }
    }

    #[test]
    fn a_dead_member_is_confirmed_by_the_probe() {
        let mut c = conf();
        c.report(&m("x"), &m("a"), "no answer", 0);
        let v = c.probe_result(&m("x"), false, 100);
        assert!(matches!(v, Verdict::Confirmed { .. }), "{v:?}");
        assert!(v.reason().contains("failed probe") && v.reason().contains('a'));
        assert!(c.confirmed(&m("x")));
        // Later evidence does not confirm twice; an answer does not undo a revocation.
        assert!(matches!(
            c.report(&m("x"), &m("b"), "late", 200),
            Verdict::AlreadyConfirmed { .. }
        ));
        assert!(matches!(
            c.probe_result(&m("x"), false, 200),
            Verdict::AlreadyConfirmed { .. }
        ));
        assert!(matches!(
            c.success(&m("x"), 210),
            Verdict::AlreadyConfirmed { .. }
        ));
        c.forget(&m("x"));
        assert!(c.is_empty());
        // A failed probe with no report on record is the leader's own evidence.
        assert!(matches!(
            c.probe_result(&m("y"), false, 300),
            Verdict::Confirmed { .. }
        ));
    }

    #[test]
    fn two_distinct_reporters_confirm_but_only_within_the_ttl() {
        let mut c = conf();
        c.report(&m("x"), &m("a"), "late", 0);
        let v = c.report(&m("x"), &m("b"), "late too", 4_000);
        assert!(matches!(v, Verdict::Confirmed { .. }), "{v:?}");
        assert!(v.reason().contains("two reporters"));

        let mut c = conf();
        c.report(&m("x"), &m("a"), "late", 0);
        // 6 s later the first report has expired: this is a fresh first report.
        assert!(matches!(
            c.report(&m("x"), &m("b"), "late", 6_000),
            Verdict::Probe { .. }
        ));
        assert!(!c.confirmed(&m("x")));
    }

    #[test]
    fn self_reports_unknown_successes_and_the_bound() {
        let mut c = conf();
        assert!(matches!(
            c.report(&m("x"), &m("x"), "me", 0),
            Verdict::Ignored { .. }
        ));
        assert!(matches!(c.success(&m("x"), 0), Verdict::Ignored { .. }));
        for (i, who) in ["p", "q", "r", "s"].iter().enumerate() {
            assert!(matches!(
                c.report(&m(who), &m("a"), "late", i as u64),
                Verdict::Probe { .. }
            ));
        }
        assert_eq!(c.len(), 4);
        let v = c.report(&m("t"), &m("a"), "late", 10);
        assert!(
            matches!(v, Verdict::Ignored { .. }) && v.reason().contains("max_suspects"),
            "{v:?}"
        );
        assert!(matches!(
            c.probe_result(&m("t"), false, 10),
            Verdict::Ignored { .. }
        ));
        assert_eq!(c.len(), 4);
        // Once they expire there is room again.
        assert!(matches!(
            c.report(&m("t"), &m("a"), "late", 10_000),
            Verdict::Probe { .. }
        ));
        assert_eq!(c.len(), 1);
    }
}

/// The members a late step waits for, from what this member has received of it:
/// `slot_owner[slot]` is the member (index) computing each slot, `losses_in[slot]` whether
/// that slot's loss arrived, `chunks_in[k]` (exact reduction) whether member `k`'s
/// reduced chunk arrived. While any slot's loss is missing, the late ones are the owners
/// of those slots (every chunk owner is waiting on them, so missing chunks say nothing);
/// otherwise they are the members whose chunk is missing. Sorted, each once.
pub fn late_members(
    slot_owner: &[usize],
    losses_in: &[bool],
    chunks_in: Option<&[bool]>,
) -> Vec<usize> {
    let mut late: Vec<usize> = slot_owner
        .iter()
        .zip(losses_in)
        .filter(|(_, &arrived)| !arrived)
        .map(|(&owner, _)| owner)
        .collect();
    if late.is_empty() {
        if let Some(chunks) = chunks_in {
            late = (0..chunks.len()).filter(|&k| !chunks[k]).collect();
        }
    }
    late.sort_unstable();
    late.dedup();
    late
}

#[cfg(test)]
mod late_members_tests {
    use super::late_members;

    #[test]
    fn table() {
        let owners = [0, 0, 1, 1, 2, 2];
        let all = [true; 6];
        #[allow(clippy::type_complexity)]
        let cases: &[(&[bool], Option<&[bool]>, &[usize])] = &[
            // Member 2 has not computed its slots: only it is late.
            (
                &[true, true, true, true, false, false],
                Some(&[false, false, false]),
                &[2],
            ),
            (&[false, true, true, false, true, true], None, &[0, 1]),
            // Every loss is in; member 1's reduced chunk is missing (died in the all-gather).
            (&all, Some(&[true, false, true]), &[1]),
            // Ring: no per-member chunks, nothing to blame once the losses are in.
            (&all, None, &[]),
            (&all, Some(&[true, true, true]), &[]),
        ];
        for (losses, chunks, want) in cases {
            assert_eq!(
                late_members(&owners, losses, *chunks),
                *want,
                "{losses:?} {chunks:?}"
            );
        }
    }
}

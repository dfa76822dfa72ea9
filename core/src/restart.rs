//! The restart policy of a supervised child: restart it after a failure, unless it has
//! failed too often lately, in which case the node gives up and leaves the job (a child
//! that keeps failing would otherwise make the node flap in and out of the group).

use std::collections::VecDeque;

/// At most `max_restarts` restarts within any `window_ms`; one more failure gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within the window (0: never restart).
    pub max_restarts: u32,
    /// The sliding window, in milliseconds.
    pub window_ms: u64,
}

/// What to do after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart the child; this is restart number `attempt` within the window.
    Restart {
        /// 1 for the first restart within the window.
        attempt: u32,
    },
    /// Do not restart: the node leaves. `reason` says why, for logs and the exit message.
    GiveUp {
        /// E.g. "3 failures within 60 s (at most 2 restarts allowed)".
        reason: String,
    },
}

/// The failures of one child, against its policy.
#[derive(Clone, Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// Times (ms, caller's clock) of the failures still inside the window.
    failures: VecDeque<u64>,
}

impl RestartTracker {
    /// A tracker with no failures yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: VecDeque::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    /// A failure at `now_ms` (monotonic, caller's clock): restart or give up.
    pub fn on_failure(&mut self, now_ms: u64) -> RestartDecision {
        let window = self.policy.window_ms;
        while self
            .failures
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now_ms);
        let n = self.failures.len() as u32;
        if n <= self.policy.max_restarts {
            RestartDecision::Restart { attempt: n }
        } else {
            RestartDecision::GiveUp {
                reason: format!(
                    "{n} failure(s) within {} s (at most {} restart(s) allowed)",
                    window / 1000,
                    self.policy.max_restarts
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(max_restarts: u32, window_ms: u64) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window_ms,
        }
    }

    #[test]
    fn table() {
        // (policy, failure times, expected decisions: Some(attempt) = restart, None = give up)
        #[allow(clippy::type_complexity)]
        let cases: &[(RestartPolicy, &[u64], &[Option<u32>])] = &[
            (p(0, 1000), &[0], &[None]),
            (p(2, 1000), &[0, 10, 20], &[Some(1), Some(2), None]),
            // Failures spaced wider than the window never add up.
            (
                p(1, 1000),
                &[0, 1000, 2000, 3000],
                &[Some(1), Some(1), Some(1), Some(1)],
            ),
            // The window slides: the oldest failure drops out exactly at window_ms.
            (
                p(2, 1000),
                &[0, 500, 999, 1000],
                &[Some(1), Some(2), None, None],
            ),
            (
                p(2, 1000),
                &[0, 500, 1400, 1450],
                &[Some(1), Some(2), Some(2), None],
            ),
            (
                p(2, 1000),
                &[0, 500, 1500, 1600],
                &[Some(1), Some(2), Some(1), Some(2)],
            ),
        ];
        for (policy, times, want) in cases {
            let mut t = RestartTracker::new(*policy);
            let got: Vec<Option<u32>> = times
                .iter()
                .map(|&now| match t.on_failure(now) {
                    RestartDecision::Restart { attempt } => Some(attempt),
                    RestartDecision::GiveUp { reason } => {
                        assert!(reason.contains("failure"), "{reason}");
                        None
                    }
                })
                .collect();
            assert_eq!(&got, want, "{policy:?} at {times:?}");
        }
    }
}

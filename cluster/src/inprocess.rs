//! The in-process collective: ranks that share one process meet at a mutex.
//!
//! Every rank hands in its slots; the fold runs as they arrive (see [`SlotFold`]);
//! whoever completes it publishes the result and wakes the others. Steps follow one
//! another: the first contribution to a new step starts a new fold once the previous
//! one is complete.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::collective::{Collective, CollectiveError, Reduced, SlotContribution, SlotFold};

/// A collective for ranks in one process.
#[derive(Debug)]
pub struct InProcessCollective {
    num_slots: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    fold: Option<SlotFold>,
    result: Option<Arc<Reduced>>,
    aborted: Option<String>,
}

impl InProcessCollective {
    /// A collective reducing `num_slots` slots per step.
    pub fn new(num_slots: u64) -> Self {
        Self {
            num_slots,
            state: Mutex::new(State {
                fold: None,
                result: None,
                aborted: None,
            }),
            changed: Condvar::new(),
        }
    }
}

impl Collective for InProcessCollective {
    fn contribute(&self, step: u64, contribution: SlotContribution) -> Result<(), CollectiveError> {
        let mut st = self.state.lock().expect("collective lock poisoned");
        if let Some(reason) = &st.aborted {
            return Err(CollectiveError::Aborted {
                reason: reason.clone(),
            });
        }
        let current = st
            .fold
            .as_ref()
            .map(SlotFold::step)
            .or(st.result.as_ref().map(|r| r.step));
        match current {
            Some(s) if s == step => {}
            Some(s) if s > step => {
                return Err(CollectiveError::BadContribution {
                    step,
                    reason: format!("step {step} is older than the current step {s}"),
                });
            }
            Some(s) if st.fold.as_ref().is_some_and(|f| !f.is_complete()) => {
                return Err(CollectiveError::BadContribution {
                    step,
                    reason: format!("step {s} is still being reduced"),
                });
            }
            _ => {
                st.fold = Some(SlotFold::new(step, self.num_slots));
                st.result = None;
            }
        }
        let Some(fold) = st.fold.as_mut() else {
            return Err(CollectiveError::BadContribution {
                step,
                reason: format!("step {step} is already reduced"),
            });
        };
        fold.add(contribution)?;
        if fold.is_complete() {
            let reduced = fold.finish().expect("complete fold has a result");
            st.fold = None;
            st.result = Some(Arc::new(reduced));
            self.changed.notify_all();
        }
        Ok(())
    }

    fn reduced(&self, step: u64, timeout: Duration) -> Result<Arc<Reduced>, CollectiveError> {
        let start = Instant::now();
        let mut st = self.state.lock().expect("collective lock poisoned");
        loop {
            if let Some(reason) = &st.aborted {
                return Err(CollectiveError::Aborted {
                    reason: reason.clone(),
                });
            }
            if let Some(r) = st.result.as_ref().filter(|r| r.step == step) {
                return Ok(Arc::clone(r));
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let arrived = st
                    .fold
                    .as_ref()
                    .filter(|f| f.step() == step)
                    .map_or(0, SlotFold::arrived);
                return Err(CollectiveError::Timeout {
                    step,
                    waited_ms: waited.as_millis() as u64,
                    arrived,
                    expected: self.num_slots,
                });
            }
            st = self
                .changed
                .wait_timeout(st, timeout - waited)
                .expect("collective lock poisoned")
                .0;
        }
    }

    fn abort(&self, reason: &str) {
        let mut st = self.state.lock().expect("collective lock poisoned");
        st.aborted.get_or_insert_with(|| reason.to_string());
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(slot: u64, v: f32) -> SlotContribution {
        SlotContribution {
            slot,
            loss_sum: v,
            grad: vec![v, -v],
        }
    }

    #[test]
    fn two_threads_meet_and_agree() {
        let coll = Arc::new(InProcessCollective::new(4));
        for step in 0..3u64 {
            let handles: Vec<_> = (0..2u64)
                .map(|rank| {
                    let coll = Arc::clone(&coll);
                    std::thread::spawn(move || {
                        for slot in rank * 2..rank * 2 + 2 {
                            coll.contribute(step, c(slot, slot as f32 + step as f32))
                                .unwrap();
                        }
                        coll.reduced(step, Duration::from_secs(10)).unwrap()
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(results[0], results[1]);
            let s = step as f32;
            assert_eq!(results[0].grad_sum, vec![4.0 * s + 6.0, -(4.0 * s + 6.0)]);
        }
    }

    #[test]
    fn missing_slot_times_out_and_abort_wakes() {
        let coll = InProcessCollective::new(2);
        coll.contribute(0, c(0, 1.0)).unwrap();
        let err = coll.reduced(0, Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::Timeout {
                    arrived: 1,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
        coll.abort("rank 1 failed");
        assert!(matches!(
            coll.reduced(0, Duration::from_secs(5)),
            Err(CollectiveError::Aborted { .. })
        ));
        assert!(matches!(
            coll.contribute(0, c(1, 1.0)),
            Err(CollectiveError::Aborted { .. })
        ));
    }

    #[test]
    fn stale_step_is_refused() {
        let coll = InProcessCollective::new(1);
        coll.contribute(5, c(0, 1.0)).unwrap();
        assert!(coll.reduced(5, Duration::from_secs(1)).is_ok());
        assert!(matches!(
            coll.contribute(4, c(0, 1.0)),
            Err(CollectiveError::BadContribution { .. })
        ));
    }
}

//! The collective interface and the exact slot-ordered reduction.
//!
//! A step's global batch is cut into slots (see `tenax_core::slots`). Every slot's
//! gradient is the gradient of the *sum* of its token losses. The reduction adds the
//! slots' gradients in slot order, a left fold starting at slot 0, whatever rank
//! computed them. Floating-point addition is not associative, so the order is what
//! makes the result bit-identical for 1, 2 or N ranks.

use std::sync::Arc;
use std::time::Duration;

/// One slot's share of a step, as computed by some rank.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotContribution {
    /// The slot's index within the step (0-based).
    pub slot: u64,
    /// Sum of the slot's token losses.
    pub loss_sum: f32,
    /// Gradient of `loss_sum` for every parameter, flat in layout order.
    pub grad: Vec<f32>,
}

/// A step's reduced result, the same for every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduced {
    /// The step this result belongs to.
    pub step: u64,
    /// Sum of all slots' loss sums, added in slot order in `f64`.
    pub loss_sum: f64,
    /// Sum of all slots' gradients, added in slot order.
    pub grad_sum: Vec<f32>,
}

/// Why a collective call did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// Not every slot arrived before the deadline.
    #[error("step {step}: collective timed out after {waited_ms} ms with {arrived} of {expected} slots in")]
    Timeout {
        /// The step being reduced.
        step: u64,
        /// How long the caller waited.
        waited_ms: u64,
        /// Slots received.
        arrived: u64,
        /// Slots expected.
        expected: u64,
    },
    /// The collective was aborted (a rank failed, the run is stopping).
    #[error("collective aborted: {reason}")]
    Aborted {
        /// Why.
        reason: String,
    },
    /// A contribution that does not fit the step (wrong slot, wrong step, wrong size).
    #[error("step {step}: bad contribution: {reason}")]
    BadContribution {
        /// The step being reduced.
        step: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Ranks exchange per-slot gradients through a collective.
///
/// Each rank calls [`Collective::contribute`] once per slot it computed, then
/// [`Collective::reduced`] to wait for the step's result. Every call has a deadline.
pub trait Collective: Send + Sync {
    /// Hand in one slot of `step`.
    fn contribute(&self, step: u64, contribution: SlotContribution) -> Result<(), CollectiveError>;
    /// Wait, at most `timeout`, until every slot of `step` is in; returns the reduced result.
    fn reduced(&self, step: u64, timeout: Duration) -> Result<Arc<Reduced>, CollectiveError>;
    /// Make every waiting and future call fail with `reason`.
    fn abort(&self, reason: &str);
}

/// An incremental left fold over slots that arrive in any order: slots are added as
/// soon as every earlier slot is in, so at most the out-of-order ones are held.
#[derive(Debug)]
pub struct SlotFold {
    step: u64,
    num_slots: u64,
    next: u64,
    loss_sum: f64,
    acc: Option<Vec<f32>>,
    pending: std::collections::BTreeMap<u64, SlotContribution>,
}

impl SlotFold {
    /// An empty fold for `num_slots` slots of `step`.
    pub fn new(step: u64, num_slots: u64) -> Self {
        Self {
            step,
            num_slots,
            next: 0,
            loss_sum: 0.0,
            acc: None,
            pending: Default::default(),
        }
    }

    /// The step this fold belongs to.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Slots received so far (folded or pending).
    pub fn arrived(&self) -> u64 {
        self.next + self.pending.len() as u64
    }

    /// True once every slot is folded.
    pub fn is_complete(&self) -> bool {
        self.next == self.num_slots
    }

    /// Add one slot; errors on a duplicate, out-of-range or wrongly sized slot.
    pub fn add(&mut self, c: SlotContribution) -> Result<(), CollectiveError> {
        let bad = |reason: String| CollectiveError::BadContribution {
            step: self.step,
            reason,
        };
        if c.slot >= self.num_slots {
            return Err(bad(format!(
                "slot {} out of range 0..{}",
                c.slot, self.num_slots
            )));
        }
        if c.slot < self.next || self.pending.contains_key(&c.slot) {
            return Err(bad(format!("slot {} contributed twice", c.slot)));
        }
        if let Some(acc) = &self.acc {
            if acc.len() != c.grad.len() {
                return Err(bad(format!(
                    "slot {} has {} gradient values, expected {}",
                    c.slot,
                    c.grad.len(),
                    acc.len()
                )));
            }
        }
        self.pending.insert(c.slot, c);
        while let Some(c) = self.pending.remove(&self.next) {
            self.loss_sum += f64::from(c.loss_sum);
            match &mut self.acc {
                None => self.acc = Some(c.grad),
                Some(acc) => {
                    if acc.len() != c.grad.len() {
                        return Err(CollectiveError::BadContribution {
                            step: self.step,
                            reason: format!(
                                "slot {} has {} gradient values, expected {}",
                                c.slot,
                                c.grad.len(),
                                acc.len()
                            ),
                        });
                    }
                    for (a, g) in acc.iter_mut().zip(&c.grad) {
                        *a += *g;
                    }
                }
            }
            self.next += 1;
        }
        Ok(())
    }

    /// The result, once complete.
    pub fn finish(&mut self) -> Option<Reduced> {
        if !self.is_complete() {
            return None;
        }
        Some(Reduced {
            step: self.step,
            loss_sum: self.loss_sum,
            grad_sum: self.acc.take().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contribution(slot: u64, grad: Vec<f32>) -> SlotContribution {
        SlotContribution {
            slot,
            loss_sum: slot as f32 + 0.5,
            grad,
        }
    }

    proptest! {
        /// Whatever order slots arrive in, the fold equals the sequential left fold, bit for bit.
        #[test]
        fn arrival_order_never_changes_the_bits(
            grads in proptest::collection::vec(proptest::collection::vec(-1e3f32..1e3, 5), 1..12),
            seed in any::<u64>(),
        ) {
            let n = grads.len();
            let mut want = grads[0].clone();
            for g in &grads[1..] { for (a, x) in want.iter_mut().zip(g) { *a += *x; } }
            let mut order: Vec<usize> = (0..n).collect();
            let mut s = seed;
            for i in (1..n).rev() { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); order.swap(i, (s >> 33) as usize % (i + 1)); }
            let mut fold = SlotFold::new(7, n as u64);
            for &i in &order { fold.add(contribution(i as u64, grads[i].clone())).unwrap(); }
            let got = fold.finish().unwrap();
            let want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            let got_bits: Vec<u32> = got.grad_sum.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(got_bits, want_bits);
        }
    }

    #[test]
    fn rejects_duplicates_and_out_of_range() {
        let mut fold = SlotFold::new(1, 2);
        fold.add(contribution(0, vec![1.0])).unwrap();
        assert!(matches!(
            fold.add(contribution(0, vec![1.0])),
            Err(CollectiveError::BadContribution { .. })
        ));
        assert!(matches!(
            fold.add(contribution(2, vec![1.0])),
            Err(CollectiveError::BadContribution { .. })
        ));
        assert!(matches!(
            fold.add(contribution(1, vec![1.0, 2.0])),
            Err(CollectiveError::BadContribution { .. })
        ));
        assert!(fold.finish().is_none());
    }
}

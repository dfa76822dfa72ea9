//! The learning-rate schedule: linear warmup then cosine decay (nanoGPT's `get_lr`).

use serde::{Deserialize, Serialize};

/// Linear warmup to `max_lr`, cosine decay to `min_lr` at `decay_steps`, then `min_lr`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warmup.
    pub max_lr: f64,
    /// Floor learning rate, held after `decay_steps`.
    pub min_lr: f64,
    /// Number of warmup steps.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr` (counted from step 0, warmup included).
    pub decay_steps: u64,
}

impl LrSchedule {
    /// The learning rate for optimiser step `step` (0-based), exactly nanoGPT's `get_lr`:
    /// `max_lr * (step + 1) / (warmup + 1)` during warmup, `min_lr` after `decay_steps`,
    /// `min_lr + 0.5 (1 + cos(pi r)) (max_lr - min_lr)` in between with
    /// `r = (step - warmup) / (decay_steps - warmup)`. If `decay_steps <= warmup_steps`
    /// there is no cosine phase: `max_lr` up to `decay_steps`, `min_lr` after.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step > self.decay_steps {
            return self.min_lr;
        }
        if self.decay_steps <= self.warmup_steps {
            return self.max_lr;
        }
        let ratio =
            (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_table() {
        let s = LrSchedule {
            max_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 9,
            decay_steps: 109,
        };
        // (step, expected lr, what)
        let table = [
            (0, 1e-4, "first warmup step: max * 1/10"),
            (4, 5e-4, "mid warmup: max * 5/10"),
            (8, 9e-4, "last warmup step: max * 9/10"),
            (9, 1e-3, "peak: cosine starts at max"),
            (59, 5.5e-4, "cosine middle: (max + min) / 2"),
            (
                34,
                1e-4 + 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos()) * 9e-4,
                "quarter",
            ),
            (109, 1e-4, "end of decay: min"),
            (110, 1e-4, "after decay: min"),
            (1_000_000, 1e-4, "long after decay: min"),
        ];
        for (step, want, what) in table {
            let got = s.lr_at(step);
            assert!(
                (got - want).abs() < 1e-15,
                "step {step} ({what}): got {got}, want {want}"
            );
        }
    }

    #[test]
    fn degenerate_schedules_stay_finite() {
        let s = LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 0,
            decay_steps: 0,
        };
        assert_eq!(s.lr_at(0), 1.0);
        assert_eq!(s.lr_at(1), 0.1);
        let s = LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 5,
            decay_steps: 3,
        };
        assert_eq!(s.lr_at(2), 0.5);
        assert_eq!(s.lr_at(5), 0.1);
        assert_eq!(s.lr_at(6), 0.1);
    }
}

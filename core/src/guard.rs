//! Training guards: a loss-spike and gradient-norm anomaly detector.
//!
//! It decides only from reduced values (the step's all-reduced mean loss and the global
//! norm of the reduced gradient), which every member of a job holds bit for bit, so every
//! member takes the same decision without talking. Its state is plain data, serialised
//! with the f64 values as their bits, carried in checkpoints and state copies, so a
//! resumed or re-formed run decides as a straight one.
//!
//! The rules:
//! - **Estimate.** A running mean and variance of the loss and of the gradient norm over
//!   the steps whose update was applied: plain over the first `1 / (1 - ema_decay)` (50),
//!   then exponential with decay `ema_decay` (0.98), so it follows a falling loss. Skipped
//!   steps do not move it, so a spike never raises its own bar.
//! - **Warm-up.** During the first `warmup_steps` applied steps nothing is flagged.
//! - **Flag.** After it, a step is flagged when its loss is above
//!   `mean + sigma x std` of the losses, or its gradient norm above the same bound of the
//!   norms, where `std` is at least `min_rel_std x |mean|` (a near-constant series would
//!   otherwise flag its own noise). A non-finite loss or norm is not the guard's: the node
//!   machine already skips it and counts it toward `--max-bad-steps`.
//! - **Skip.** A flagged step's update is not applied; the step counter and the data cursor
//!   still advance (the batch is consumed, never retried), so the sample order stays a pure
//!   function of the step.
//! - **Snapshot.** After an applied step whose number is a multiple of `snapshot_every`,
//!   the shell keeps the state (parameters and optimizer, in memory, copy-on-write) and the
//!   guard keeps its estimate as of that step.
//! - **Roll back.** After `rollback_after` flagged steps in a row, the shell restores the
//!   snapshot's parameters and optimizer and the guard its estimate; the step counter and
//!   cursor go on from where they are, so the offending batches are skipped past.
//!
//! Every decision carries a reason.

use serde::{Deserialize, Serialize};

/// The guard's settings. `sigma == 0` switches the guard off.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// A step is flagged above `mean + sigma x std`; 0: the guard is off.
    pub sigma: f64,
    /// Applied steps observed before anything is flagged.
    pub warmup_steps: u64,
    /// Roll back after this many flagged steps in a row; 0: never roll back (only skip).
    pub rollback_after: u32,
    /// Take the in-memory snapshot after every applied step that is a multiple of this
    /// (at least 1).
    pub snapshot_every: u64,
    /// Decay of the moving estimates (weight of the past).
    pub ema_decay: f64,
    /// The standard deviation used is at least this fraction of the mean.
    pub min_rel_std: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            sigma: 0.0,
            warmup_steps: 50,
            rollback_after: 0,
            snapshot_every: 50,
            ema_decay: 0.98,
            min_rel_std: 0.02,
        }
    }
}

/// A configuration the guard cannot run with.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GuardError {
    /// `sigma` is negative or not finite.
    #[error("--guard-sigma {0}: must be a finite number >= 0 (0 switches the guard off)")]
    Sigma(f64),
    /// `snapshot_every` is 0 while rolling back.
    #[error("--guard-snapshot-every must be at least 1 when --guard-rollback-after is set")]
    SnapshotEvery,
    /// `ema_decay` outside `(0, 1)`.
    #[error("guard ema_decay {0}: must lie in (0, 1)")]
    Decay(f64),
    /// `min_rel_std` negative or not finite.
    #[error("guard min_rel_std {0}: must be a finite number >= 0")]
    MinRelStd(f64),
}

impl GuardConfig {
    /// Whether the guard does anything.
    pub fn enabled(&self) -> bool {
        self.sigma > 0.0
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), GuardError> {
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(GuardError::Sigma(self.sigma));
        }
        if self.rollback_after > 0 && self.snapshot_every == 0 {
            return Err(GuardError::SnapshotEvery);
        }
        if !(self.ema_decay > 0.0 && self.ema_decay < 1.0) {
            return Err(GuardError::Decay(self.ema_decay));
        }
        if !(self.min_rel_std.is_finite() && self.min_rel_std >= 0.0) {
            return Err(GuardError::MinRelStd(self.min_rel_std));
        }
        Ok(())
    }
}

/// The bounds a step is checked against: what the shell hands to every rank with the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardLimits {
    /// Highest mean loss not flagged.
    pub max_loss: f64,
    /// Highest gradient norm (before clipping) not flagged.
    pub max_grad_norm: f64,
}

impl GuardLimits {
    /// Why a step with this loss and gradient norm is flagged, or `None`. Non-finite
    /// values are not flagged here (the update is skipped for them anyway).
    pub fn exceeded(&self, loss: f64, grad_norm: f64) -> Option<String> {
        if loss.is_finite() && loss > self.max_loss {
            return Some(format!(
                "loss {loss:.4} above the guard's bound {:.4}",
                self.max_loss
            ));
        }
        if grad_norm.is_finite() && grad_norm > self.max_grad_norm {
            return Some(format!(
                "gradient norm {grad_norm:.4} above the guard's bound {:.4}",
                self.max_grad_norm
            ));
        }
        None
    }
}

/// A running, then exponential, mean and variance (West's incremental form), f64
/// serialised as bits so that a checkpoint round trip is exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ema {
    /// Values observed.
    pub n: u64,
    /// The mean, as `f64::to_bits`.
    #[serde(with = "bits")]
    pub mean: f64,
    /// The variance, as `f64::to_bits`.
    #[serde(with = "bits")]
    pub var: f64,
}

impl Ema {
    /// Takes one value in. The weight of the new value is `max(1 / n, 1 - decay)`: the
    /// plain mean and (population) variance of the first `1 / (1 - decay)` values, then
    /// exponential (a pure exponential average would cling to the first value).
    pub fn observe(&mut self, x: f64, decay: f64) {
        self.n += 1;
        let alpha = (1.0 / self.n as f64).max(1.0 - decay);
        let diff = x - self.mean;
        let incr = alpha * diff;
        self.mean += incr;
        self.var = (1.0 - alpha) * (self.var + diff * incr);
    }

    /// `mean + sigma x max(std, min_rel_std x |mean|)`.
    pub fn bound(&self, sigma: f64, min_rel_std: f64) -> f64 {
        let std = self.var.max(0.0).sqrt().max(min_rel_std * self.mean.abs());
        self.mean + sigma * std
    }
}

mod bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(x.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(f64::from_bits(u64::deserialize(d)?))
    }
}

/// The estimates a rollback restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardStats {
    /// Of the mean loss of applied steps.
    pub loss: Ema,
    /// Of the gradient norm of applied steps.
    pub grad_norm: Ema,
}

/// Everything the guard remembers: carried in checkpoints (`extra.guard`) and state copies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// The current estimates.
    pub stats: GuardStats,
    /// Flagged steps in a row, up to now.
    pub streak: u32,
    /// Flagged steps in all.
    pub flagged: u64,
    /// Rollbacks in all.
    pub rollbacks: u64,
    /// The step of the last snapshot and the estimates as of it.
    pub snapshot: Option<(u64, GuardStats)>,
}

/// What to do with a finished step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The update was applied (or skipped for a non-finite value, which is not the
    /// guard's); nothing to do.
    Apply,
    /// The step was flagged and its update skipped.
    Skip {
        /// Why it was flagged.
        reason: String,
    },
    /// The step was flagged, the `streak`-th in a row: restore the snapshot of `to_step`.
    Rollback {
        /// The snapshot's step.
        to_step: u64,
        /// Why.
        reason: String,
    },
}

/// The detector: configuration and state.
#[derive(Clone, Debug, PartialEq)]
pub struct Guard {
    /// Its settings.
    pub cfg: GuardConfig,
    /// What it has seen.
    pub state: GuardState,
}

impl Guard {
    /// A fresh guard.
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            cfg,
            state: GuardState::default(),
        }
    }

    /// The bounds of the next step: `None` while off or warming up.
    pub fn limits(&self) -> Option<GuardLimits> {
        let (c, s) = (&self.cfg, &self.state.stats);
        if !c.enabled() || s.loss.n < c.warmup_steps.max(1) {
            return None;
        }
        Some(GuardLimits {
            max_loss: s.loss.bound(c.sigma, c.min_rel_std),
            max_grad_norm: s.grad_norm.bound(c.sigma, c.min_rel_std),
        })
    }

    /// Takes in finished step `step` (its mean loss and gradient norm as reduced, and
    /// whether its update was skipped because a value was not finite) and says what to
    /// do. It flags from the same values with the same bounds ([`Guard::limits`],
    /// [`GuardLimits::exceeded`]) as the ranks did, so the two agree (the shell checks).
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: f64, non_finite: bool) -> Verdict {
        let flag = self.limits().and_then(|l| l.exceeded(loss, grad_norm));
        let st = &mut self.state;
        let Some(why) = flag else {
            if !non_finite {
                st.stats.loss.observe(loss, self.cfg.ema_decay);
                st.stats.grad_norm.observe(grad_norm, self.cfg.ema_decay);
                st.streak = 0;
            }
            return Verdict::Apply;
        };
        st.streak += 1;
        st.flagged += 1;
        let n = self.cfg.rollback_after;
        match st.snapshot {
            Some((to_step, stats)) if n > 0 && st.streak >= n => {
                let streak = st.streak;
                st.stats = stats;
                st.streak = 0;
                st.rollbacks += 1;
                Verdict::Rollback {
                    to_step,
                    reason: format!(
                        "step {step}: {why}; {streak} flagged steps in a row: back to the snapshot of step {to_step}, the batches in between skipped"
                    ),
                }
            }
            _ => Verdict::Skip {
                reason: format!("step {step}: {why}: update skipped"),
            },
        }
    }

    /// Whether to keep a snapshot after applied step `step` (call after
    /// [`Guard::observe`] returned [`Verdict::Apply`]); records it when so.
    pub fn snapshot_due(&mut self, step: u64) -> bool {
        let c = &self.cfg;
        let due = c.enabled()
            && c.rollback_after > 0
            && self.state.streak == 0
            && step.is_multiple_of(c.snapshot_every.max(1));
        if due {
            self.state.snapshot = Some((step, self.state.stats));
        }
        due
    }

    /// The guard of a run that starts at `step` from a checkpoint or a copied state
    /// whose guard state was `state`; `holds_snapshot` says whether the state it starts
    /// from is the snapshot's (its step is the snapshot's). A snapshot the process does
    /// not hold is forgotten: until the next one a streak only skips.
    pub fn resumed(cfg: GuardConfig, mut state: GuardState, step: u64) -> (Self, bool) {
        let holds = matches!(state.snapshot, Some((s, _)) if s == step);
        if !holds {
            state.snapshot = None;
        }
        (Self { cfg, state }, holds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(sigma: f64, warmup: u64, rollback_after: u32, snapshot_every: u64) -> GuardConfig {
        GuardConfig {
            sigma,
            warmup_steps: warmup,
            rollback_after,
            snapshot_every,
            ..GuardConfig::default()
        }
    }

    /// Steps `(loss, norm)` fed in order from step 1; the verdict kinds, `A`pply,
    /// `S`kip, `R`ollback, and the snapshot marks `*`.
    fn run(g: &mut Guard, steps: &[(f64, f64)]) -> String {
        let mut out = String::new();
        for (i, &(loss, norm)) in steps.iter().enumerate() {
            let step = i as u64 + 1;
            match g.observe(step, loss, norm, !loss.is_finite() || !norm.is_finite()) {
                Verdict::Apply => {
                    out.push('A');
                    if g.snapshot_due(step) {
                        out.push('*');
                    }
                }
                Verdict::Skip { .. } => out.push('S'),
                Verdict::Rollback { .. } => out.push('R'),
            }
        }
        out
    }

    /// A table row: name, settings, the steps' `(loss, norm)`, the verdicts wanted.
    type Case = (&'static str, GuardConfig, Vec<(f64, f64)>, &'static str);

    fn flat(n: usize) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| (3.0 + 0.01 * (i % 3) as f64, 1.0 + 0.01 * (i % 2) as f64))
            .collect()
    }

    #[test]
    fn verdicts_table() {
        let spike = (30.0, 1.0);
        let norm_spike = (3.0, 50.0);
        let with = |at: &[usize], v: (f64, f64)| {
            let mut s = flat(12);
            for &i in at {
                s[i] = v;
            }
            s
        };
        let cases: Vec<Case> = vec![
            (
                "off",
                cfg(0.0, 2, 2, 2),
                with(&[6, 7, 8], spike),
                "AAAAAAAAAAAA",
            ),
            (
                "a spike in warm-up is applied",
                cfg(5.0, 4, 0, 1),
                with(&[2], spike),
                "AAAAAAAAAAAA",
            ),
            (
                "one loss spike skipped",
                cfg(5.0, 4, 0, 1),
                with(&[6], spike),
                "AAAAAASAAAAA",
            ),
            (
                "one norm spike skipped",
                cfg(5.0, 4, 0, 1),
                with(&[6], norm_spike),
                "AAAAAASAAAAA",
            ),
            (
                "a streak below rollback_after only skips",
                cfg(5.0, 4, 3, 2),
                with(&[6, 7], spike),
                "AA*AA*AA*SSAA*AA*",
            ),
            (
                "a streak of rollback_after rolls back",
                cfg(5.0, 4, 3, 2),
                with(&[6, 7, 8], spike),
                "AA*AA*AA*SSRA*AA*",
            ),
            (
                "no snapshot yet: only skips",
                cfg(5.0, 4, 2, 100),
                with(&[6, 7, 8], spike),
                "AAAAAASSSAAA",
            ),
            (
                "non-finite is not the guard's",
                cfg(5.0, 4, 2, 1),
                with(&[6, 7], (f64::NAN, 1.0)),
                "A*A*A*A*A*A*A*A*A*A*A*A*",
            ),
        ];
        for (name, c, steps, want) in cases {
            let mut g = Guard::new(c);
            assert_eq!(run(&mut g, &steps), want, "{name}");
        }
    }

    #[test]
    fn a_rollback_restores_the_snapshot_estimates_and_counts() {
        let mut g = Guard::new(cfg(5.0, 4, 2, 4));
        let mut s = flat(6);
        s.extend([(30.0, 1.0), (30.0, 1.0)]);
        let kinds = run(&mut g, &s);
        assert_eq!(kinds, "AAAA*AASR");
        let (step, stats) = g.state.snapshot.expect("a snapshot at step 4");
        assert_eq!(step, 4);
        assert_eq!(g.state.stats, stats, "the estimates are the snapshot's");
        assert_eq!(
            (g.state.streak, g.state.flagged, g.state.rollbacks),
            (0, 2, 1)
        );
    }

    #[test]
    fn reasons_name_the_value_and_the_bound() {
        let mut g = Guard::new(cfg(5.0, 4, 0, 1));
        run(&mut g, &flat(6));
        let Verdict::Skip { reason } = g.observe(7, 30.0, 1.0, false) else {
            panic!("not skipped");
        };
        assert!(
            reason.starts_with("step 7: loss 30.0000 above the guard's bound 3.3"),
            "{reason}"
        );
    }

    #[test]
    fn the_state_round_trips_through_json_bit_for_bit() {
        let mut g = Guard::new(cfg(4.0, 3, 2, 3));
        let steps: Vec<(f64, f64)> = (0..40)
            .map(|i| {
                (
                    1.0 / (1.0 + i as f64).sqrt() + 1e-7 * i as f64,
                    0.3 + (i as f64).sin() / 7.0,
                )
            })
            .collect();
        run(&mut g, &steps);
        let text = serde_json::to_string(&g.state).unwrap();
        let back: GuardState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, g.state);
        assert_eq!(
            back.stats.loss.mean.to_bits(),
            g.state.stats.loss.mean.to_bits()
        );
    }

    #[test]
    fn resuming_keeps_only_a_snapshot_it_holds() {
        let mut g = Guard::new(cfg(4.0, 3, 2, 5));
        run(&mut g, &flat(12));
        assert_eq!(g.state.snapshot.map(|s| s.0), Some(10));
        let (r, holds) = Guard::resumed(g.cfg, g.state.clone(), 10);
        assert!(holds);
        assert_eq!(r.state, g.state);
        let (r, holds) = Guard::resumed(g.cfg, g.state.clone(), 12);
        assert!(!holds);
        assert_eq!(r.state.snapshot, None);
        assert_eq!(r.state.stats, g.state.stats);
    }

    #[test]
    fn the_estimate_is_plain_at_first_then_exponential() {
        let mut e = Ema::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            e.observe(x, 0.5);
        }
        // Weights 1, 1/2, then 1/2 (1 - decay) from the third value on.
        assert_eq!(e.n, 4);
        assert_eq!(e.mean, 3.125);
        let mut p = Ema::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            p.observe(x, 0.98);
        }
        assert_eq!(p.mean, 2.5, "the plain mean of the first values");
        assert!(
            (p.var - 1.25).abs() < 1e-12,
            "their population variance: {}",
            p.var
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert!(cfg(-1.0, 1, 0, 1).validate().is_err());
        assert!(cfg(f64::NAN, 1, 0, 1).validate().is_err());
        assert!(cfg(3.0, 1, 2, 0).validate().is_err());
        assert!(cfg(3.0, 1, 0, 0).validate().is_ok());
        let mut c = cfg(3.0, 1, 0, 1);
        c.ema_decay = 1.0;
        assert!(c.validate().is_err());
    }

    proptest! {
        /// Without anomalies (every value within a band the bound cannot be below) the
        /// guard never skips, whatever the settings.
        #[test]
        fn without_anomalies_it_never_skips(
            sigma in 3.0f64..10.0,
            warmup in 0u64..20,
            rollback_after in 0u32..4,
            snapshot_every in 1u64..10,
            base_loss in 0.5f64..10.0,
            base_norm in 0.1f64..10.0,
            noise in proptest::collection::vec((0.0f64..1.0, 0.0f64..1.0), 1..300),
        ) {
            // Values within +-1% of the base: the bound is at least mean + 3 x 2% of it,
            // and the mean of values in the band stays in the band.
            let mut g = Guard::new(cfg(sigma, warmup, rollback_after, snapshot_every));
            for (i, (a, b)) in noise.iter().enumerate() {
                let loss = base_loss * (0.99 + 0.02 * a);
                let norm = base_norm * (0.99 + 0.02 * b);
                let v = g.observe(i as u64 + 1, loss, norm, false);
                prop_assert_eq!(v, Verdict::Apply);
                g.snapshot_due(i as u64 + 1);
            }
            prop_assert_eq!(g.state.flagged, 0);
        }

        /// A value far above everything seen after the warm-up is always flagged.
        #[test]
        fn a_far_spike_after_warm_up_is_flagged(
            sigma in 1.0f64..10.0,
            warmup in 1u64..20,
            base in 0.5f64..10.0,
        ) {
            let mut g = Guard::new(cfg(sigma, warmup, 0, 1));
            for i in 0..warmup {
                prop_assert_eq!(g.observe(i + 1, base, 1.0, false), Verdict::Apply);
            }
            let spike = base * (1.0 + 1.1 * sigma);
            let flagged = matches!(g.observe(warmup + 1, spike, 1.0, false), Verdict::Skip { .. });
            prop_assert!(flagged);
        }
    }
}

//! The training guard in the daemon's shell (`--guard-sigma`): each step's verdict, the
//! guard's snapshots and rollbacks, and the guard state that goes with the node's state.

use std::sync::Arc;

use tenax_actors::Trainer;
use tenax_core::guard::{GuardState, Verdict};
use tenax_core::node::Event;

use super::super::work::{self, Done, StepInfo};
use super::Shell;
use crate::train::{guard, Start};

impl Shell<'_> {
    /// The guard state that goes with the trainer's state (checkpoints, state copies):
    /// `None` while the guard is off, so a guard-off node writes what it wrote before.
    pub(super) fn guard_state(&self) -> Option<GuardState> {
        self.guard.cfg.enabled().then(|| self.guard.state.clone())
    }

    /// The guard's part of a finished step: it takes the step's reduced loss and gradient
    /// norm in and must decide as the ranks did (they checked the same values against the
    /// same bounds); a flagged step goes to `flagged.jsonl` in the run dir. An error: the
    /// ranks and the guard disagree (the node stops).
    ///
    /// With `--guard-rollback-after`, a step the guard's cadence names is snapshot (the
    /// trainer's copy-on-write state), and a streak of flagged steps restores it: the
    /// trainer is started again from the snapshot in the same generation, on every member
    /// at the same step (they decide from the same reduced values); training goes on
    /// from the next batch, as in `tenax train`.
    pub(super) async fn guard_step(&mut self, info: &mut StepInfo) -> Result<(), String> {
        if !self.guard.cfg.enabled() {
            return Ok(());
        }
        let (done, cursor) = self.machine.position();
        let (step, r) = (done + 1, &info.report);
        let verdict = self.guard.observe(step, r.loss, r.grad_norm, r.skipped);
        if r.guarded != (verdict != Verdict::Apply) {
            return Err(format!(
                "step {step}: the ranks and the training guard disagree on whether to skip ({} vs {verdict:?})",
                r.guarded
            ));
        }
        if verdict == Verdict::Apply {
            if self.guard.snapshot_due(step) {
                let t = self.trainer.clone().ok_or("no trainer to snapshot")?;
                let snap = t
                    .snapshot()
                    .await
                    .map_err(|e| format!("the guard's snapshot of step {step}: {e}"))?;
                self.guard_snapshot = Some((step, snap));
            }
            return Ok(());
        }
        let (prep, limits) = (self.p.prep, info.limits);
        let line = guard::flagged_line(prep, step, cursor, r.loss, r.grad_norm, limits, &verdict);
        guard::append_flagged(&self.p.run_dir.join(guard::FLAGGED_FILE), &line);
        println!("node {}: {}", self.me(), guard::say(&line));
        if let Verdict::Rollback { to_step, .. } = verdict {
            let params = self.roll_back(to_step).await?;
            // The step's hash is the restored state's.
            info.params = Some(params);
        }
        Ok(())
    }

    /// Start the trainer again, in the same generation, from the guard's snapshot of
    /// `to_step`; gives the restored parameters.
    async fn roll_back(&mut self, to_step: u64) -> Result<Arc<Vec<f32>>, String> {
        let snap = match &self.guard_snapshot {
            Some((s, snap)) if *s == to_step => snap.clone(),
            _ => {
                return Err(format!(
                    "guard: no snapshot of step {to_step} to roll back to"
                ))
            }
        };
        let generation = self.machine.generation().ok_or("guard: no generation")?;
        let comm = self
            .comm_of(generation)
            .ok_or("guard: no communicator to roll back in")?;
        let kind = self.trainer_kind(generation)?;
        if let Some(old) = self.trainer.take() {
            Trainer::release(old).await;
        }
        let (step, cursor) = self.machine.position();
        let state = Start {
            step,
            cursor,
            params: (*snap.params).clone(),
            opt: (*snap.opt).clone(),
            guard: None,
        };
        let (setup, data) = (self.p.prep.setup.clone(), self.p.prep.data.clone());
        match work::start_trainer(comm, setup, data, state, kind, self.p.node).await {
            Done::Trainer(t, _) => {
                self.trainer = Some(Arc::new(t));
                self.hash = None;
                Ok(snap.params)
            }
            Done::Event(Event::Fatal { error }) => Err(format!("guard rollback: {error}")),
            _ => Err("guard rollback: the trainer did not start".into()),
        }
    }
}

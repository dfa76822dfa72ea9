//! The shell's step-log lines, parameter hashes and checkpoints: what it does with a
//! step's outcome and with the Checkpoint actor's events.

use tenax_actors::{CheckpointEvent, ShareJob};
use tenax_core::node::{Action, Event, Share};

use super::super::steplog::StepLine;
use super::Shell;

impl Shell<'_> {
    /// What a Checkpoint actor event means for the machine (and the status).
    pub(super) fn checkpoint_event(&mut self, ev: CheckpointEvent) -> Option<Event> {
        match ev {
            CheckpointEvent::Committed {
                step,
                url,
                save_s,
                shares_from,
                taken_over,
                ..
            } => {
                if !taken_over.is_empty() {
                    println!(
                        "node {}: checkpoint step {step}: the shares of writers {taken_over:?} written here (not reported in time); writers {shares_from:?} wrote their own",
                        self.me(),
                    );
                }
                let generation = self.saves.get(&step).copied().unwrap_or_default();
                self.saves.retain(|s, _| *s > step);
                self.p.shared.view().note_save(save_s);
                Some(Event::CheckpointCommitted {
                    step,
                    url,
                    generation,
                })
            }
            CheckpointEvent::Failed { step, error } => {
                self.saves.remove(&step);
                self.p.shared.view().checkpoint_failures += 1;
                Some(Event::CheckpointFailed { step, error })
            }
            CheckpointEvent::Superseded { step, by_step } => {
                self.saves.remove(&step);
                eprintln!(
                    "note: node {}: checkpoint at step {step} skipped, step {by_step} is saved instead",
                    self.me()
                );
                None
            }
            CheckpointEvent::ShareWritten {
                step,
                file,
                bytes,
                save_s,
            } => {
                println!(
                    "node {}: wrote its share of checkpoint step {step} ({file}, {:.1} MiB in {save_s:.2} s)",
                    self.me(),
                    bytes as f64 / (1u64 << 20) as f64
                );
                None
            }
            CheckpointEvent::Pruned { .. } | CheckpointEvent::PruneFailed { .. } => None,
        }
    }

    /// The step-log line of `step` (written once its hash is in) and the progress line.
    pub(super) fn log_step(
        &mut self,
        generation: u64,
        step: u64,
        cursor: u64,
        val_loss: Option<f64>,
    ) {
        let tokens_per_step = self.p.prep.tokens_per_step();
        let (Some(info), Some(log)) = (self.last_step.as_ref(), self.log.as_mut()) else {
            return;
        };
        let spec = self.comm.as_ref().map(|c| c.spec());
        let stage = match (self.gen_plan.as_ref(), self.p.s.stages_across_nodes) {
            (Some(plan), true) if plan.generation == generation && plan.pp_depth > 1 => {
                let me = self.p.member.id();
                plan.ranks.iter().find(|a| &a.member == me).map(|a| a.stage)
            }
            _ => None,
        };
        let r = &info.report;
        let line = StepLine {
            step,
            loss: r.loss,
            lr: info.lr,
            tokens_per_s: tokens_per_step / info.secs.max(1e-9),
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            guarded: r.guarded,
            generation,
            world: spec.map(|s| s.world).unwrap_or(0),
            param_hash: String::new(),
            cursor,
            slots: spec.map(|s| s.my_slots()).unwrap_or_default(),
            stage,
            val_loss,
        };
        if let Some(text) = line.progress(self.p.member.id().as_str(), self.p.prep.cfg.steps) {
            println!("{text}");
        }
        log.step(line);
    }

    /// Snapshot now and hand the save to the checkpoint actor.
    pub(super) async fn save(
        &mut self,
        generation: u64,
        step: u64,
        cursor: u64,
        share: Option<Share>,
    ) {
        let Some(trainer) = self.trainer.clone() else {
            let error = "no trainer holds the state".into();
            self.queue
                .push_back(Event::CheckpointFailed { step, error });
            return;
        };
        let commits = share.as_ref().is_none_or(|s| s.commits);
        if commits {
            self.saves.insert(step, generation);
        }
        let share = share.map(|s| ShareJob {
            job_nonce: self.p.job_nonce.clone(),
            writer: s.writer,
            writers: s.writers,
            node: self.me(),
            commits: s.commits,
        });
        let at = crate::train::SaveAt {
            step,
            cursor,
            generation,
        };
        let guard = self.guard_state();
        let (checkpointer, prep) = (&self.p.checkpointer, self.p.prep);
        let r =
            crate::train::save_at(&trainer, checkpointer, prep, at, share, guard.as_ref()).await;
        if let Err(e) = r {
            self.saves.remove(&step);
            let error = format!("{e:#}");
            let event = match self.p.checkpointer.is_running() {
                true => Event::CheckpointFailed { step, error },
                // Too many panicking uploads: no checkpoint can be saved any more.
                false => Event::Fatal { error },
            };
            self.queue.push_back(event);
        }
    }

    /// The parameter hash after `step` is in: its step-log line, the status, and a
    /// comparison waiting for it.
    pub(super) fn hashed(&mut self, step: u64, hash: String) {
        if step == self.machine.position().0 {
            self.hash = Some(hash.clone());
            self.p.shared.view().param_hash = hash.clone();
        }
        if let Some(log) = self.log.as_mut() {
            log.hashed(step, hash);
        }
        if let Some((generation, s)) = self.compare_after_hash.take() {
            match s == step {
                true => self.start_work(Action::CompareHashes { generation, step }, ""),
                false => self.compare_after_hash = Some((generation, s)),
            }
        }
    }
}

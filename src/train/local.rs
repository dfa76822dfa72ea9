//! `tenax train` as a one-member job: the same node state machine as a daemon
//! ([`NodeMachine`], core) decides the steps, the evaluation and checkpoint cadence, the
//! final checkpoint and the limit on non-finite steps; this shell runs its effects in one
//! process. There is no etcd and no peer: the plan is one member hosting every rank, the
//! state comparison has one member, and a checkpoint's committed manifest is its record.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tenax_actors::{CheckpointEvent, Checkpointer, StepReport, Trainer};
use tenax_core::membership::{compute_plan, MemberId, MemberInfo, PlannerConfig};
use tenax_core::node::{Action, Event, Exit, NodeConfig, NodeMachine, PeerState};

use super::guard::{flagged_line, say, Guarding};
use super::{save_at, Prepared, SaveAt, Start};
use crate::plot::LossPoint;
use tenax_core::guard::Verdict;

/// The member id of the one-member job.
const LOCAL: &str = "local";

/// How a run ended, for the closing line.
#[derive(Clone, Debug)]
pub(crate) struct End {
    pub step: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub tokens_per_s: f64,
}

/// The one-member job's shell.
pub(crate) struct Local<'a> {
    pub prep: &'a Prepared,
    pub checkpointer: &'a mut Checkpointer,
    pub metrics: &'a mut std::fs::File,
    pub history: &'a mut Vec<LossPoint>,
    /// The trainer, once started (kept after the end for the sample).
    pub trainer: Option<Trainer>,
    /// The state while no trainer holds it (a run resumed at its target never starts one).
    pub state: Option<Start>,
    queue: VecDeque<Event>,
    bar: ProgressBar,
    /// The last step's report and time.
    last: Option<(StepReport, f64, f64)>,
    /// The step-log line of the boundary being processed (a save adds its stall).
    line: Option<serde_json::Value>,
    end: End,
    tps_sum: f64,
    steps_run: u64,
    exit: Option<(Exit, String)>,
    /// The training guard, its snapshot and its log.
    guarding: Guarding,
}

/// A trainer over `prep`'s ranks (pipelines when configured) from this state.
async fn start_trainer(
    prep: &Prepared,
    params: Vec<f32>,
    opt: tenax_model::AdamW,
) -> Result<Trainer> {
    let (setup, data) = (prep.setup.clone(), prep.data.clone());
    match prep.pipeline {
        None => Trainer::start(setup, data, params, opt).await,
        Some(spec) => Trainer::start_pipeline(setup, spec, data, params, opt).await,
    }
    .map_err(|e| anyhow!("{e}"))
}

/// The node machine of a one-member job with `prep`'s cadences.
fn machine(prep: &Prepared) -> Result<NodeMachine> {
    let cfg = &prep.cfg;
    let mut rules = NodeConfig::daemon(MemberId::new(LOCAL), cfg.steps, cfg.batch_size, 2, 0);
    rules.eval_every = cfg.eval_every;
    rules.ckpt_every = cfg.ckpt_every;
    rules.hash_check_every = 0;
    rules.max_bad_steps = cfg.max_bad_steps;
    NodeMachine::new(rules).map_err(|e| anyhow!("{e}"))
}

impl<'a> Local<'a> {
    /// A shell for a run starting from `start`.
    pub fn new(
        prep: &'a Prepared,
        checkpointer: &'a mut Checkpointer,
        metrics: &'a mut std::fs::File,
        history: &'a mut Vec<LossPoint>,
        start: Start,
        guarding: Guarding,
    ) -> Self {
        let bar = ProgressBar::new(prep.cfg.steps);
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} (eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(start.step);
        let step = start.step;
        Self {
            prep,
            checkpointer,
            metrics,
            history,
            trainer: None,
            state: Some(start),
            queue: VecDeque::new(),
            bar,
            last: None,
            line: None,
            end: End {
                step,
                loss: f64::NAN,
                val_loss: None,
                tokens_per_s: 0.0,
            },
            tps_sum: 0.0,
            steps_run: 0,
            exit: None,
            guarding,
        }
    }

    /// Train to the target step. `resumed`: the run resumed from a checkpoint at the
    /// state's step (the job's record).
    pub async fn run(&mut self, resumed: bool) -> Result<End> {
        let mut m = machine(self.prep)?;
        let (step, cursor) = self
            .state
            .as_ref()
            .map(|s| (s.step, s.cursor))
            .unwrap_or_default();
        let ranks = self.prep.cfg.ranks as u32;
        let me = MemberInfo {
            id: MemberId::new(LOCAL),
            devices: ranks,
            joined_gen: 0,
            addr: String::new(),
            metrics_addr: String::new(),
        };
        let planner = PlannerConfig {
            min_members: 1,
            max_ranks_per_member: ranks,
            ..PlannerConfig::default()
        };
        let plan = compute_plan(None, &[me], &planner, 1).map_err(|e| anyhow!("{e}"))?;
        self.queue.extend([
            Event::Started {
                holds_state: true,
                step,
                cursor,
            },
            Event::PlanSeen(plan),
        ]);
        let clock = Instant::now();
        let record = resumed.then_some(step);
        loop {
            while let Some(e) = self.queue.pop_front() {
                let now_ms = clock.elapsed().as_millis() as u64;
                for effect in m.handle(e, now_ms) {
                    self.carry_out(effect.action, effect.reason, record).await;
                }
                self.flush_line();
            }
            if let Some((how, why)) = self.exit.take() {
                self.bar.finish_and_clear();
                return match how {
                    Exit::Done | Exit::Left => Ok(self.end.clone()),
                    Exit::Failed | Exit::GraceExpired => Err(anyhow!("{why}")),
                };
            }
            let timer = m
                .next_timer_ms()
                .map(|ms| Duration::from_millis(ms).saturating_sub(clock.elapsed()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                ev = self.checkpointer.next_event() => match ev {
                    Some(ev) => self.checkpoint_event(ev),
                    None => self.queue.push_back(Event::Fatal { error: "the checkpoint actor stopped".into() }),
                },
                _ = tokio::time::sleep(timer) => self.queue.push_back(Event::Tick),
            }
        }
    }

    fn checkpoint_event(&mut self, ev: CheckpointEvent) {
        let line = match ev {
            CheckpointEvent::Committed {
                step,
                url,
                bytes,
                save_s,
                recovered_by_read_back,
                ..
            } => {
                self.queue.push_back(Event::CheckpointCommitted {
                    step,
                    url: url.clone(),
                    generation: 1,
                });
                format!(
                    "checkpoint step {step} -> {url} ({:.1} MiB in {save_s:.2} s{})",
                    bytes as f64 / (1u64 << 20) as f64,
                    if recovered_by_read_back {
                        "; the commit's response was lost, read back and confirmed"
                    } else {
                        ""
                    }
                )
            }
            CheckpointEvent::Failed { step, error } => {
                self.queue
                    .push_back(Event::CheckpointFailed { step, error });
                return;
            }
            CheckpointEvent::Superseded { step, by_step } => format!(
                "note: checkpoint at step {step} skipped: the previous one was still uploading, step {by_step} is saved instead"
            ),
            CheckpointEvent::Pruned { folders, bytes } => format!(
                "retention: deleted {} old checkpoint folder(s), {:.1} MiB",
                folders.len(),
                bytes as f64 / (1u64 << 20) as f64
            ),
            CheckpointEvent::PruneFailed { error } => {
                format!("warning: retention failed (checkpoints are intact): {error}")
            }
            // One member: no shared saves.
            CheckpointEvent::ShareWritten { .. } => return,
        };
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// Carry out one effect. `record`: the step of the checkpoint the run resumed from.
    async fn carry_out(&mut self, action: Action, reason: String, record: Option<u64>) {
        let prep = self.prep;
        match action {
            Action::CheckJobDone => self.queue.push_back(Event::JobRecord { step: record }),
            Action::BuildCommunicator { plan } => self.queue.push_back(Event::CommunicatorBuilt {
                generation: plan.generation,
            }),
            Action::ExchangeState {
                generation,
                round,
                step,
                holds_state,
            } => {
                // One member compares with itself: its hash is not needed, only whether it
                // holds state.
                let hash = if holds_state { LOCAL } else { "" };
                self.queue.push_back(Event::StatesExchanged {
                    generation,
                    round,
                    states: vec![PeerState {
                        member: MemberId::new(LOCAL),
                        step,
                        hash: hash.to_string(),
                    }],
                });
            }
            Action::StartTrainer { generation, .. } => {
                let Some(state) = self.state.take() else {
                    return self.fatal("no state to train from".into());
                };
                let step = state.step;
                match start_trainer(prep, state.params, state.opt).await {
                    Ok(t) => {
                        if std::mem::take(&mut self.guarding.snapshot_on_start) {
                            // The run resumed from the state the guard's snapshot names.
                            match t.snapshot().await {
                                Ok(snap) => self.guarding.snapshot = Some((step, snap)),
                                Err(e) => return self.fatal(format!("guard snapshot: {e}")),
                            }
                        }
                        self.trainer = Some(t);
                        self.queue.push_back(Event::TrainerStarted { generation });
                    }
                    Err(e) => self.fatal(e.to_string()),
                }
            }
            Action::RunStep {
                generation,
                step,
                cursor,
                ..
            } => self.run_step(generation, step, cursor).await,
            Action::Evaluate { generation, step } => {
                let Some(t) = self.trainer.as_ref() else {
                    return;
                };
                match t.eval(prep.val_windows.clone()).await {
                    Ok(v) => {
                        let loss = self.last.as_ref().map_or(f64::NAN, |l| l.0.loss);
                        self.bar
                            .suspend(|| println!("step {step}: loss {loss:.4}, val loss {v:.4}"));
                        self.queue.push_back(Event::Evaluated {
                            generation,
                            val_loss: v,
                        });
                    }
                    Err(e) => self.fatal(format!("evaluation at step {step}: {e}")),
                }
            }
            Action::LogStep { step, val_loss, .. } => self.log_step(step, val_loss),
            Action::Save { step, cursor, .. } => {
                let Some(t) = self.trainer.as_ref() else {
                    return;
                };
                let t_save = Instant::now();
                let guard = self.guarding.checkpoint_state();
                let at = SaveAt {
                    step,
                    cursor,
                    generation: 0,
                };
                let r = save_at(t, self.checkpointer, prep, at, None, guard).await;
                if let Some(line) = self.line.as_mut().filter(|l| l["step"] == json!(step)) {
                    line["ckpt_stall_s"] = json!(t_save.elapsed().as_secs_f64());
                }
                if let Err(e) = r {
                    let error = format!("{e:#}");
                    self.queue
                        .push_back(Event::CheckpointFailed { step, error });
                }
            }
            // The committed manifest is a one-member job's record.
            Action::WriteRecord(rec) => self
                .queue
                .push_back(Event::RecordWritten { step: rec.step }),
            // Warnings only: the bar and the checkpoint lines say the rest.
            Action::Say(text) if text.starts_with("warning") => {
                self.bar.suspend(|| eprintln!("{text}"))
            }
            Action::Exit(how) => self.exit = Some((how, reason)),
            // Nothing to do in one process: no peers, no etcd, no events log; the plot is
            // drawn by the caller.
            _ => {}
        }
    }

    fn fatal(&mut self, error: String) {
        self.queue.push_back(Event::Fatal { error });
    }

    async fn run_step(&mut self, generation: u64, step: u64, cursor: u64) {
        let Some(t) = self.trainer.as_ref() else {
            return;
        };
        let lr = self.prep.schedule.lr_at(step);
        let t0 = Instant::now();
        let limits = self.guarding.limits();
        match t
            .step_guarded(t.generation(), step, cursor, lr as f32, limits)
            .await
        {
            Ok(report) => {
                if let Err(e) = self.guard_step(step + 1, cursor, &report, limits).await {
                    return self.fatal(format!("{e:#}"));
                }
                let secs = t0.elapsed().as_secs_f64();
                let event = Event::StepDone {
                    generation,
                    loss: report.loss,
                    skipped: report.skipped,
                    elapsed_ms: (secs * 1000.0) as u64,
                };
                self.last = Some((report, lr, secs));
                self.queue.push_back(event);
            }
            Err(e) => self.fatal(format!("training stopped at step {}: {e}", step + 1)),
        }
    }

    /// The guard's part of finished step `step` (the batch from `cursor`): keep a
    /// snapshot, or log a flagged step and, after a streak, restore the snapshot.
    async fn guard_step(
        &mut self,
        step: u64,
        cursor: u64,
        report: &StepReport,
        limits: Option<tenax_core::guard::GuardLimits>,
    ) -> Result<()> {
        let g = &mut self.guarding;
        if !g.guard.cfg.enabled() {
            return Ok(());
        }
        let verdict = g
            .guard
            .observe(step, report.loss, report.grad_norm, report.skipped);
        if report.guarded != (verdict != Verdict::Apply) {
            return Err(anyhow!(
                "step {step}: the ranks and the guard disagree on whether to skip ({} vs {verdict:?})",
                report.guarded
            ));
        }
        if verdict == Verdict::Apply {
            if g.guard.snapshot_due(step) {
                let t = self.trainer.as_ref().ok_or_else(|| anyhow!("no trainer"))?;
                let snap = t
                    .snapshot()
                    .await
                    .map_err(|e| anyhow!("guard snapshot: {e}"))?;
                self.guarding.snapshot = Some((step, snap));
            }
            return Ok(());
        }
        let line = flagged_line(
            self.prep,
            step,
            cursor,
            report.loss,
            report.grad_norm,
            limits,
            &verdict,
        );
        self.guarding.log(&line);
        self.bar.suspend(|| eprintln!("{}", say(&line)));
        let Verdict::Rollback { to_step, .. } = verdict else {
            return Ok(());
        };
        let snap = match &self.guarding.snapshot {
            Some((s, snap)) if *s == to_step => snap.clone(),
            _ => {
                return Err(anyhow!(
                    "guard: no snapshot of step {to_step} to roll back to"
                ))
            }
        };
        if let Some(old) = self.trainer.take() {
            old.shutdown().await;
        }
        let (params, opt) = ((*snap.params).clone(), (*snap.opt).clone());
        self.trainer = Some(start_trainer(self.prep, params, opt).await?);
        Ok(())
    }

    fn log_step(&mut self, step: u64, val_loss: Option<f64>) {
        let Some((r, lr, secs)) = self.last.clone() else {
            return;
        };
        let tokens = self.prep.tokens_per_step();
        let tokens_per_s = tokens / secs.max(1e-9);
        self.tps_sum += tokens_per_s;
        self.steps_run += 1;
        self.history.push(LossPoint {
            step,
            loss: r.loss,
            val_loss,
        });
        self.bar.set_position(step);
        self.bar
            .set_message(format!("loss {:.4} | {tokens_per_s:.0} tok/s", r.loss));
        let mut line = json!({"step": step, "loss": r.loss, "lr": lr, "tokens_per_s": tokens_per_s, "grad_norm": r.grad_norm, "skipped": r.skipped});
        if r.guarded {
            line["guarded"] = json!(true);
        }
        if let Some(v) = val_loss {
            line["val_loss"] = json!(v);
        }
        self.flush_line();
        self.line = Some(line);
        self.end = End {
            step,
            loss: r.loss,
            val_loss: val_loss.or(self.end.val_loss),
            tokens_per_s: self.tps_sum / self.steps_run as f64,
        };
    }

    /// Write the pending step-log line.
    fn flush_line(&mut self) {
        if let Some(line) = self.line.take() {
            if let Err(e) = writeln!(self.metrics, "{line}") {
                eprintln!("warning: metrics.jsonl: cannot append: {e}");
            }
        }
    }
}

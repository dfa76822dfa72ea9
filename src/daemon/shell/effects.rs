//! How the shell carries out the node machine's effects: the short, bounded ones in
//! place, the ones that wait as work in the background.

use std::time::Duration;

use futures::future::BoxFuture;
use tenax_cluster::Collective;
use tenax_core::node::{Action, Effect};

use super::super::work::{self, Done};
use super::{Shell, LEAVE_TIMEOUT};

impl<'a> Shell<'a> {
    /// Carry out one effect: work that waits starts in the background
    /// ([`Shell::start_work`]); the rest is done here.
    pub(super) async fn carry_out(&mut self, effect: Effect) {
        let Effect { action, reason } = effect;
        let me = self.me();
        match action {
            Action::NoteState {
                source,
                step,
                generation,
            } => {
                if let Some(log) = self.log.as_mut() {
                    log.state(source.as_str(), step, generation);
                }
            }
            Action::StopTrainer { .. } => self.stop_trainer().await,
            Action::ReportLate {
                generation,
                step,
                waited_ms,
            } => self.suspect_late(generation, step, waited_ms),
            Action::ReportFailedPeers { generation } => {
                let failed = self.comm_of(generation).map(|c| c.failed_peers());
                for (id, what) in failed.unwrap_or_default() {
                    self.suspect(generation, id, what);
                }
            }
            Action::Alarm {
                generation,
                step,
                states,
            } => {
                let odd: Vec<String> = states.iter().map(ToString::to_string).collect();
                eprintln!(
                    "ALARM: node {me}: generation {generation}: parameters differ between members after step {step} ({}): resyncing the odd ones from a peer",
                    odd.join(", ")
                );
                self.p.shared.view().hash_mismatches += 1;
            }
            Action::LogStep {
                generation,
                step,
                cursor,
                val_loss,
            } => self.log_step(generation, step, cursor, val_loss),
            Action::Save {
                generation,
                step,
                cursor,
                share,
            } => self.save(generation, step, cursor, share).await,
            Action::WriteRecord(rec) => {
                let prefix = super::super::job_store_url(&self.p.s.store_root, &self.p.s.job);
                let event =
                    work::write_record(&self.p.member, &self.p.etcd, &prefix, rec, &self.p.shared)
                        .await;
                self.queue.push_back(event);
            }
            Action::DropTrainer { .. } => {
                if let Some(t) = self.trainer.take() {
                    t.stop();
                }
            }
            Action::Leave => {
                self.member_live = false;
                let left = tokio::time::timeout(LEAVE_TIMEOUT, self.p.member.leave()).await;
                if !matches!(left, Ok(Ok(()))) {
                    eprintln!("warning: node {me}: leaving the job did not finish cleanly: its lease expires after its TTL");
                }
            }
            Action::StopAfter { generation, step } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.stop_after(step);
                }
            }
            Action::Abort { generation } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.abort(&reason);
                }
            }
            Action::Close { generation } => {
                if let Some(comm) = self.comm_of(generation) {
                    comm.close(Duration::from_secs(10)).await;
                }
            }
            Action::Say(text) => match text.strip_prefix("warning: ") {
                Some(warning) => eprintln!("warning: node {me}: {warning}"),
                None => println!("node {me}: {text}"),
            },
            Action::Plot => {
                let title = format!("tenax job {} ({})", self.p.s.job, self.p.prep.cfg.preset);
                if let Some(log) = self.log.as_ref() {
                    log.plot(&title);
                }
            }
            Action::Exit(how) => self.exit = Some((how, reason)),
            other => self.start_work(other, &reason),
        }
    }

    /// Start the work an effect asks for; it comes back through `work` as a [`Done`].
    pub(super) fn start_work(&mut self, action: Action, reason: &str) {
        let me = self.me();
        let (etcd, timeout) = (self.p.etcd.clone(), self.p.s.step_timeout);
        let f: BoxFuture<'a, Done> = match action {
            Action::Register => {
                println!("node {me}: registering again ({reason})");
                Box::pin(work::register(
                    etcd,
                    self.p.join.clone(),
                    self.p.s.tls.clone(),
                ))
            }
            Action::CheckJobDone => Box::pin(work::job_record(etcd)),
            Action::BuildCommunicator { plan } => return self.build(plan, reason),
            Action::ExchangeState {
                generation,
                round,
                step,
                holds_state,
            } => {
                let hash = match holds_state {
                    true => self.state_hash(),
                    false => String::new(),
                };
                let Some(comm) = self.comm_of(generation) else {
                    return;
                };
                Box::pin(work::compare(comm, round, step, hash, timeout))
            }
            Action::CompareHashes { generation, step } => {
                let hash = self.log.as_ref().and_then(|l| l.hash_of(step)).cloned();
                let (Some(hash), Some(comm)) = (hash, self.comm_of(generation)) else {
                    // The hash is still being taken: compare once it is in.
                    self.compare_after_hash = Some((generation, step));
                    return;
                };
                let trainer = self.trainer.clone();
                Box::pin(work::compare_all(trainer, comm, step, hash, timeout))
            }
            Action::LoadCheckpoint { generation } => {
                println!("node {me}: generation {generation}: {reason}");
                let store = self.p.store.clone();
                Box::pin(work::load(etcd, store, self.p.prep, generation))
            }
            Action::FetchState {
                generation,
                donor,
                step,
                hash,
            } => return self.fetch(generation, donor, step, hash),
            Action::ServeState {
                generation,
                receivers,
            } => return self.serve(generation, receivers),
            Action::StartTrainer { generation, .. } => return self.start_trainer(generation),
            Action::RunStep {
                generation,
                step,
                cursor,
                ..
            } => {
                let Some(t) = self.trainer.clone() else {
                    return;
                };
                let lr = self.p.prep.schedule.lr_at(step);
                let limits = self.guard.limits();
                Box::pin(work::step(t, generation, step, cursor, lr, limits))
            }
            Action::Evaluate { generation, step } => {
                let Some(t) = self.trainer.clone() else {
                    return;
                };
                let windows = self.p.prep.val_windows.clone();
                Box::pin(work::evaluate(t, windows, generation, step))
            }
            Action::WaitForFinalRecord { step, .. } => {
                Box::pin(work::final_record(etcd, step, self.gen_cancel.clone()))
            }
            other => {
                eprintln!("warning: node {me}: effect {other:?} has no shell ({reason})");
                return;
            }
        };
        self.work.push(f);
    }
}

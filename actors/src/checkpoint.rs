//! The Checkpoint actor: saves run in the background while training goes on.
//!
//! The training loop pays only for a host-memory snapshot and one message
//! ([`Checkpointer::save`]); building the tensors, encoding, hashing, uploading (multipart for
//! large shards) and committing happen here, followed by retention when a policy is set.
//!
//! Policy when a save comes due while another is still uploading: one save is in flight and
//! at most one waits. A newer save replaces the waiting one, which is reported as
//! [`CheckpointEvent::Superseded`] and never written: checkpoints never stack without bound,
//! memory holds at most two snapshots, and the newest state always gets saved next. A failed
//! save is reported as [`CheckpointEvent::Failed`]; training goes on and the next save tries
//! afresh (a new attempt folder). [`Checkpointer::flush`] waits until nothing is in flight or
//! waiting, e.g. before the process exits.
//!
//! A shared save ([`SaveJob::share`]) is written by every data-parallel replica: this node
//! writes its share of rows and a receipt, or, on the committer, writes its share, collects
//! the others' receipts (writing any share still missing after [`CheckpointPolicy::share_wait`]
//! itself) and commits; see `tenax_storage::shared`.
//!
//! An upload that panics does not take the actor with it: the panic is caught, the save is
//! reported [`CheckpointEvent::Failed`], and the actor's work starts afresh with the save
//! waiting behind it, at most [`UPLOAD_RESTARTS`] times within a minute. One panic more and
//! the actor stops: later saves fail at once and [`Checkpointer::is_running`] says so, so
//! that the node can exit instead of training on without checkpoints.

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tenax_core::ckpt::RetentionPolicy;
use tenax_core::restart::{RestartDecision, RestartPolicy, RestartTracker};
use tenax_storage::{CheckpointContent, CheckpointMeta, ShareWait, Store, TensorData};
use tokio::sync::mpsc;

use crate::supervisor::ActorsError;

/// Builds the tensors of a snapshot (runs on a blocking thread in the background).
pub type BuildTensors = Box<dyn FnOnce() -> Vec<TensorData> + Send>;

/// One save: what the manifest says, and how to get the tensors from the snapshot.
pub struct SaveJob {
    /// Step, generation, config, cursor...
    pub meta: CheckpointMeta,
    /// Turns the host-memory snapshot into named tensors, off the training loop.
    pub build: BuildTensors,
    /// `Some`: a save that every replica writes a share of; `None`: this node writes it all.
    pub share: Option<ShareJob>,
}

/// This node's part in a save that every data-parallel replica writes a share of.
#[derive(Clone, Debug, PartialEq)]
pub struct ShareJob {
    /// The job's nonce: with the generation and step it names the folder all writers use.
    pub job_nonce: String,
    /// This node's writer index, in `0..writers`.
    pub writer: u32,
    /// Writers: one per replica.
    pub writers: u32,
    /// This node's name, recorded with the files it writes.
    pub node: String,
    /// The committer collects the shares, writes missing ones and commits; the others
    /// write their share and its receipt.
    pub commits: bool,
}

/// How the checkpoint actor saves.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    /// Data-parallel replicas that share the writing (one shard file each).
    pub writers: u32,
    /// Retention applied after every committed save; `None` keeps everything.
    pub retention: Option<RetentionPolicy>,
    /// How long the committer of a shared save waits for the other writers' shares.
    pub share_wait: ShareWait,
}

/// What happened to a save, reported in order.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckpointEvent {
    /// The save committed.
    Committed {
        /// Its step.
        step: u64,
        /// Its URL.
        url: String,
        /// Bytes of its shard files.
        bytes: u64,
        /// Seconds from the start of the background work to the commit.
        save_s: f64,
        /// The manifest PUT failed but reading it back showed it committed.
        recovered_by_read_back: bool,
        /// A shared save: the writers whose own shares it lists (the committer not counted).
        shares_from: Vec<u32>,
        /// A shared save: the writers whose shares the committer wrote instead.
        taken_over: Vec<u32>,
    },
    /// This node's share of a shared save is written, with its receipt.
    ShareWritten {
        /// Its step.
        step: u64,
        /// The shard file.
        file: String,
        /// Its size.
        bytes: u64,
        /// Seconds from the start of the background work.
        save_s: f64,
    },
    /// The save failed; nothing of it is committed.
    Failed {
        /// Its step.
        step: u64,
        /// Why.
        error: String,
    },
    /// The save was waiting behind an upload and a newer one replaced it.
    Superseded {
        /// The step that was not saved.
        step: u64,
        /// The step saved instead.
        by_step: u64,
    },
    /// Retention deleted these attempts after a commit.
    Pruned {
        /// Folders deleted.
        folders: Vec<String>,
        /// Bytes deleted.
        bytes: u64,
    },
    /// Retention failed (the checkpoint itself is committed).
    PruneFailed {
        /// Why.
        error: String,
    },
}

/// Events kept for the caller before the oldest are dropped.
const EVENT_QUEUE: usize = 256;

/// Panicking uploads the actor survives within a minute; one more stops it.
pub const UPLOAD_RESTARTS: u32 = 3;

enum Msg {
    Save(SaveJob),
    Done(Vec<CheckpointEvent>),
    /// The upload of `step` panicked.
    Crashed {
        step: u64,
        error: String,
    },
    Flush(RpcReplyPort<()>),
}

struct CheckpointActor;

struct State {
    store: Store,
    policy: CheckpointPolicy,
    events: mpsc::Sender<CheckpointEvent>,
    in_flight: Option<u64>,
    waiting: Option<SaveJob>,
    flushers: Vec<RpcReplyPort<()>>,
    /// Panicking uploads within the policy's window.
    restarts: RestartTracker,
    /// The clock of `restarts`.
    started: Instant,
}

impl State {
    fn emit(&self, event: CheckpointEvent) {
        if self.events.try_send(event).is_err() {
            tracing::warn!("checkpoint event dropped: the event queue is full or closed");
        }
    }

    fn start(&mut self, myself: &ActorRef<Msg>, job: SaveJob) {
        self.in_flight = Some(job.meta.step);
        let store = self.store.clone();
        let policy = self.policy.clone();
        let myself = myself.clone();
        let step = job.meta.step;
        tokio::spawn(async move {
            let upload = tokio::spawn(async move { run_save(&store, &policy, job).await });
            let msg = match upload.await {
                Ok(events) => Msg::Done(events),
                Err(e) => Msg::Crashed {
                    step,
                    error: panic_message(e),
                },
            };
            let _ = myself.cast(msg);
        });
    }

    /// A writer's share that will not be written: leave a skip receipt, so that the
    /// committer writes it at once instead of waiting for it (in the background; if that
    /// fails the committer waits its [`ShareWait`] out).
    fn skip_share(&self, job: &SaveJob, by_step: u64) {
        let Some(share) = job.share.as_ref().filter(|s| !s.commits) else {
            return;
        };
        let m = &job.meta;
        let folder = tenax_storage::shared_folder(&share.job_nonce, m.generation, m.step);
        let (store, writer) = (self.store.clone(), share.writer);
        let why = format!("superseded by the save of step {by_step}");
        tokio::spawn(async move {
            let put = tenax_storage::put_skip_receipt(&store, &folder, writer, &why);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), put).await {
                tracing::warn!("{folder}: skip receipt of writer {writer}: {e}");
            }
        });
    }

    /// The upload in flight ended: start the waiting save, or answer the flushers.
    fn next(&mut self, myself: &ActorRef<Msg>) {
        self.in_flight = None;
        if let Some(next) = self.waiting.take() {
            self.start(myself, next);
        } else {
            for f in self.flushers.drain(..) {
                let _ = f.send(());
            }
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

/// A test-only fault hook's step, from the environment (`<name>=<step>`).
#[cfg(feature = "chaos-hooks")]
fn chaos_step(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.trim().parse().ok()
}

/// Test-only fault hook: with `TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP=<step>`, the upload of
/// that step's checkpoint panics after its tensors are built, before its shards are
/// written.
#[cfg(feature = "chaos-hooks")]
fn chaos_panic_in_upload(step: u64) {
    if chaos_step("TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP") == Some(step) {
        panic!("chaos: the upload of step {step} panics (TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP)");
    }
}

/// Test-only fault hook: with `TENAX_CHAOS_KILL_IN_SHARE_AT_STEP=<step>`, a writer of a
/// shared save (not the committer) kills its own process with SIGKILL in its first save
/// at or after that step (a save superseded before it starts is not one), after its shard
/// is uploaded and before its receipt.
#[cfg(feature = "chaos-hooks")]
fn chaos_kill_in_share(step: u64) {
    if chaos_step("TENAX_CHAOS_KILL_IN_SHARE_AT_STEP").is_some_and(|at| step >= at) {
        eprintln!("chaos: this writer kills itself in the middle of the save of step {step}");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Build, save and (on success) prune; the events to report.
async fn run_save(store: &Store, policy: &CheckpointPolicy, job: SaveJob) -> Vec<CheckpointEvent> {
    let t0 = Instant::now();
    let step = job.meta.step;
    let build = job.build;
    let tensors = match tokio::task::spawn_blocking(build).await {
        Ok(t) => t,
        Err(e) => {
            return vec![CheckpointEvent::Failed {
                step,
                error: format!("building the snapshot's tensors panicked: {e}"),
            }]
        }
    };
    #[cfg(feature = "chaos-hooks")]
    chaos_panic_in_upload(step);
    let content = CheckpointContent {
        meta: job.meta,
        tensors,
    };
    let outcome = match job.share {
        None => tenax_storage::save_owned(store, content, policy.writers)
            .await
            .map(|saved| Some((saved, Vec::new(), Vec::new())))
            .map_err(StepError::Store),
        Some(share) => save_share(store, policy, content, share, t0).await,
    };
    let (saved, shares_from, taken_over) = match outcome {
        Ok(Some(x)) => x,
        Ok(None) => return Vec::new(),
        Err(StepError::Share(event)) => return vec![event],
        Err(StepError::Store(e)) => {
            return vec![CheckpointEvent::Failed {
                step,
                error: e.to_string(),
            }]
        }
    };
    let mut events = vec![CheckpointEvent::Committed {
        step,
        url: saved.url.clone(),
        bytes: saved.manifest.total_bytes(),
        save_s: t0.elapsed().as_secs_f64(),
        recovered_by_read_back: saved.recovered_by_read_back,
        shares_from,
        taken_over,
    }];
    if let Some(retention) = &policy.retention {
        let now = tenax_storage::now_unix_ms();
        match tenax_storage::prune_after_save(store, retention, &saved.folder, now).await {
            Ok(report) => {
                let folders: Vec<String> = report
                    .decisions
                    .iter()
                    .filter(|d| !d.keep)
                    .map(|d| d.folder.clone())
                    .collect();
                if !folders.is_empty() {
                    events.push(CheckpointEvent::Pruned {
                        folders,
                        bytes: report.deleted_bytes,
                    });
                }
            }
            Err(e) => events.push(CheckpointEvent::PruneFailed {
                error: e.to_string(),
            }),
        }
    }
    events
}

/// Why a save ended without a commit of this node's.
enum StepError {
    /// The store refused or failed.
    Store(tenax_storage::StorageError),
    /// A writer's share is done (not an error: the committer commits).
    Share(CheckpointEvent),
}

impl From<tenax_storage::StorageError> for StepError {
    fn from(e: tenax_storage::StorageError) -> Self {
        StepError::Store(e)
    }
}

type Commit = (tenax_storage::SavedCheckpoint, Vec<u32>, Vec<u32>);

/// This node's part of a shared save: its share (and receipt), and on the committer the
/// collection and the commit.
async fn save_share(
    store: &Store,
    policy: &CheckpointPolicy,
    content: CheckpointContent,
    share: ShareJob,
    t0: Instant,
) -> Result<Option<Commit>, StepError> {
    let step = content.meta.step;
    let plan = tenax_storage::replica_plan(store, &content.tensors, share.writers)?;
    let pending = tenax_storage::begin_shared_save(content.meta, &share.job_nonce);
    let tensors: std::collections::BTreeMap<String, TensorData> = content
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let tensors = std::sync::Arc::new(tensors);
    let t_own = Instant::now();
    let mine = match tenax_storage::shard_of(&plan, share.writer) {
        Some(shard) => {
            let mut w = tenax_storage::write_shard(store, &pending, shard, &tensors).await?;
            w.file.writer = Some(share.node.clone());
            Some(w)
        }
        None => None,
    };
    let own_write = t_own.elapsed();
    if !share.commits {
        let Some(w) = mine else {
            return Ok(None);
        };
        #[cfg(feature = "chaos-hooks")]
        chaos_kill_in_share(step);
        tenax_storage::put_receipt(store, &pending, share.writer, &w).await?;
        return Err(StepError::Share(CheckpointEvent::ShareWritten {
            step,
            file: w.file.name.clone(),
            bytes: w.file.size,
            save_s: t0.elapsed().as_secs_f64(),
        }));
    }
    let c = tenax_storage::collect_shares(
        store,
        &pending,
        &plan,
        &tensors,
        share.writer,
        mine,
        own_write,
        &policy.share_wait,
    )
    .await?;
    Ok(Some((c.saved, c.from_writers, c.taken_over)))
}

impl Actor for CheckpointActor {
    type Msg = Msg;
    type State = State;
    type Arguments = (Store, CheckpointPolicy, mpsc::Sender<CheckpointEvent>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Msg>,
        (store, policy, events): Self::Arguments,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            store,
            policy,
            events,
            in_flight: None,
            waiting: None,
            flushers: Vec::new(),
            restarts: RestartTracker::new(RestartPolicy {
                max_restarts: UPLOAD_RESTARTS,
                window_ms: 60_000,
            }),
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        st: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Save(job) => {
                if st.in_flight.is_none() {
                    st.start(&myself, job);
                } else {
                    let by_step = job.meta.step;
                    if let Some(old) = st.waiting.replace(job) {
                        st.skip_share(&old, by_step);
                        st.emit(CheckpointEvent::Superseded {
                            step: old.meta.step,
                            by_step,
                        });
                    }
                }
            }
            Msg::Done(events) => {
                for e in events {
                    st.emit(e);
                }
                st.next(&myself);
            }
            Msg::Crashed { step, error } => {
                let now_ms = st.started.elapsed().as_millis() as u64;
                match st.restarts.on_failure(now_ms) {
                    RestartDecision::Restart { attempt } => {
                        st.emit(CheckpointEvent::Failed {
                            step,
                            error: format!("the upload panicked ({error}); the checkpoint actor goes on (restart {attempt} of {UPLOAD_RESTARTS} within 60 s)"),
                        });
                        st.next(&myself);
                    }
                    RestartDecision::GiveUp { reason } => {
                        let error = format!("the upload panicked ({error}): the checkpoint actor stops after {reason}");
                        st.emit(CheckpointEvent::Failed {
                            step,
                            error: error.clone(),
                        });
                        return Err(error.into());
                    }
                }
            }
            Msg::Flush(reply) => {
                if st.in_flight.is_none() {
                    let _ = reply.send(());
                } else {
                    st.flushers.push(reply);
                }
            }
        }
        Ok(())
    }
}

/// Handle to the checkpoint actor.
pub struct Checkpointer {
    actor: ActorRef<Msg>,
    handle: tokio::task::JoinHandle<()>,
    events: mpsc::Receiver<CheckpointEvent>,
}

impl Checkpointer {
    /// Start the actor saving into `store`.
    pub async fn start(
        store: Store,
        policy: CheckpointPolicy,
    ) -> Result<Checkpointer, ActorsError> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let (actor, handle) = Actor::spawn(None, CheckpointActor, (store, policy, tx))
            .await
            .map_err(|e| ActorsError::Start(format!("checkpoint actor: {e}")))?;
        Ok(Checkpointer {
            actor,
            handle,
            events: rx,
        })
    }

    /// Hand a save over; returns at once (see the module doc for what happens when a save is
    /// already uploading).
    pub fn save(&self, job: SaveJob) -> Result<(), ActorsError> {
        self.actor
            .cast(Msg::Save(job))
            .map_err(|e| ActorsError::Stopped(format!("checkpoint actor: {e}")))
    }

    /// Wait until no save is in flight or waiting (at most `timeout`).
    pub async fn flush(&self, timeout: Duration) -> Result<(), ActorsError> {
        match self.actor.call(Msg::Flush, Some(timeout)).await {
            Ok(ractor::rpc::CallResult::Success(())) => Ok(()),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ActorsError::Timeout {
                what: "waiting for checkpoint uploads".into(),
                timeout_s: timeout.as_secs(),
            }),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err(ActorsError::Stopped("checkpoint actor: no reply".into()))
            }
            Err(e) => Err(ActorsError::Stopped(format!("checkpoint actor: {e}"))),
        }
    }

    /// The events reported since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<CheckpointEvent> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push(e);
        }
        out
    }

    /// The next event, waiting for it (`None` once the actor is gone). Cancel-safe: an
    /// event is never lost by dropping the future.
    pub async fn next_event(&mut self) -> Option<CheckpointEvent> {
        self.events.recv().await
    }

    /// Whether the actor still runs (it stops after too many panicking uploads).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Stop the actor (an upload in flight is abandoned: its folder stays uncommitted).
    pub async fn shutdown(self) {
        self.actor.stop(None);
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(step: u64) -> SaveJob {
        SaveJob {
            meta: CheckpointMeta {
                step,
                generation: 0,
                config: json!({}),
                config_hash: "h".into(),
                data_cursor: step,
                rng: json!(null),
                extra: json!(null),
            },
            build: Box::new(move || {
                vec![TensorData {
                    name: "w".into(),
                    shape: vec![4, 2],
                    data: (0..8).map(|i| (i as u64 + step) as f32).collect(),
                }]
            }),
            share: None,
        }
    }

    /// The steps of the `Committed` events, in order.
    fn committed_steps(events: &[CheckpointEvent]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                CheckpointEvent::Committed { step, .. } => Some(*step),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn saves_commit_in_the_background_and_a_waiting_save_is_superseded() {
        let store = Store::open("memory://").unwrap();
        let mut ck = Checkpointer::start(
            store.clone(),
            CheckpointPolicy {
                share_wait: Default::default(),
                writers: 2,
                retention: None,
            },
        )
        .await
        .unwrap();
        // Three saves handed over back to back: 1 starts, 2 waits, 3 replaces 2.
        ck.save(job(1)).unwrap();
        ck.save(job(2)).unwrap();
        ck.save(job(3)).unwrap();
        ck.flush(Duration::from_secs(30)).await.unwrap();
        let events = ck.take_events();
        let committed = committed_steps(&events);
        assert_eq!(committed, vec![1, 3], "{events:?}");
        assert!(events.contains(&CheckpointEvent::Superseded {
            step: 2,
            by_step: 3
        }));
        let (loaded, _) = tenax_storage::latest_verified(&store)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(loaded.manifest.step, 3);
        assert_eq!(loaded.manifest.files.len(), 2, "two writers, two shards");
        assert_eq!(
            loaded.tensor("w").unwrap().data,
            (3..11).map(|v| v as f32).collect::<Vec<_>>()
        );
        ck.shutdown().await;
    }

    /// Two nodes' checkpoint actors on one store: each writes its share, the committer's
    /// manifest lists both.
    #[tokio::test]
    async fn a_shared_save_is_written_by_each_replica_and_committed_once() {
        let store = Store::open("memory://").unwrap();
        let policy = CheckpointPolicy {
            writers: 1,
            retention: None,
            share_wait: ShareWait {
                min_wait: Duration::from_secs(60),
                ..ShareWait::default()
            },
        };
        let share = |writer: u32| ShareJob {
            job_nonce: "nonce".into(),
            writer,
            writers: 2,
            node: format!("node-{writer}"),
            commits: writer == 0,
        };
        let mut committer = Checkpointer::start(store.clone(), policy.clone())
            .await
            .unwrap();
        let mut other = Checkpointer::start(store.clone(), policy).await.unwrap();
        let mut mine = job(5);
        mine.share = Some(share(0));
        committer.save(mine).unwrap();
        let mut theirs = job(5);
        theirs.share = Some(share(1));
        other.save(theirs).unwrap();
        match other.next_event().await.unwrap() {
            CheckpointEvent::ShareWritten { step: 5, file, .. } => {
                assert_eq!(file, "shard-00001.safetensors")
            }
            e => panic!("{e:?}"),
        }
        // The committer does not wait out its 60 s: both shares are in.
        let e = tokio::time::timeout(Duration::from_secs(30), committer.next_event())
            .await
            .unwrap()
            .unwrap();
        let CheckpointEvent::Committed {
            step: 5,
            shares_from,
            taken_over,
            ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((shares_from, taken_over), (vec![1], vec![]));
        let (loaded, _) = tenax_storage::latest_verified(&store)
            .await
            .unwrap()
            .unwrap();
        let writers: Vec<Option<String>> = loaded
            .manifest
            .files
            .iter()
            .map(|f| f.writer.clone())
            .collect();
        assert_eq!(writers, vec![Some("node-0".into()), Some("node-1".into())]);
        assert_eq!(
            loaded.tensor("w").unwrap().data,
            (5..13).map(|v| v as f32).collect::<Vec<_>>()
        );
        committer.shutdown().await;
        other.shutdown().await;
    }

    /// A panicking upload is reported as a failed save and the actor goes on, at most
    /// `UPLOAD_RESTARTS` times a minute; one more stops it.
    #[cfg(feature = "chaos-hooks")]
    #[tokio::test]
    async fn a_panicking_upload_fails_its_save_and_the_actor_goes_on_within_its_policy() {
        // A step no other test saves (`cargo test` runs them in one process).
        std::env::set_var("TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP", "1002");
        let store = Store::open("memory://").unwrap();
        let policy = CheckpointPolicy {
            share_wait: Default::default(),
            writers: 1,
            retention: None,
        };
        let mut ck = Checkpointer::start(store.clone(), policy).await.unwrap();
        for step in [1001, 1002, 1003] {
            ck.save(job(step)).unwrap();
            ck.flush(Duration::from_secs(30)).await.unwrap();
        }
        let events = ck.take_events();
        let committed = committed_steps(&events);
        assert_eq!(committed, vec![1001, 1003], "{events:?}");
        assert!(
            events.iter().any(|e| matches!(e, CheckpointEvent::Failed { step: 1002, error } if error.contains("panicked") && error.contains("restart 1 of 3"))),
            "{events:?}"
        );
        assert!(ck.is_running());
        // Three more panics within the minute: the fourth stops the actor.
        for _ in 0..UPLOAD_RESTARTS {
            ck.save(job(1002)).unwrap();
            let _ = ck.flush(Duration::from_secs(30)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while ck.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!ck.is_running(), "the actor stops after too many panics");
        assert!(
            ck.save(job(1004)).is_err(),
            "a save after it stopped fails at once"
        );
        let events = ck.take_events();
        assert!(
            events.iter().any(|e| matches!(e, CheckpointEvent::Failed { error, .. } if error.contains("stops after"))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn retention_runs_after_each_commit() {
        let store = Store::open("memory://").unwrap();
        let mut ck = Checkpointer::start(
            store.clone(),
            CheckpointPolicy {
                share_wait: Default::default(),
                writers: 1,
                retention: Some(RetentionPolicy {
                    keep_last: 2,
                    keep_every: 0,
                    min_uncommitted_age_ms: 60_000,
                }),
            },
        )
        .await
        .unwrap();
        for step in 1..=4 {
            ck.save(job(step)).unwrap();
            ck.flush(Duration::from_secs(30)).await.unwrap();
        }
        let steps: Vec<u64> = tenax_storage::list_checkpoints(&store)
            .await
            .unwrap()
            .attempts
            .iter()
            .map(|a| a.step)
            .collect();
        assert_eq!(steps, vec![3, 4]);
        assert!(ck
            .take_events()
            .iter()
            .any(|e| matches!(e, CheckpointEvent::Pruned { .. })));
        ck.shutdown().await;
    }

    #[tokio::test]
    async fn a_failed_save_is_reported_and_the_next_one_still_runs() {
        let store = Store::open("memory://").unwrap();
        let mut ck = Checkpointer::start(
            store.clone(),
            CheckpointPolicy {
                share_wait: Default::default(),
                writers: 1,
                retention: None,
            },
        )
        .await
        .unwrap();
        let mut bad = job(1);
        bad.build = Box::new(|| {
            vec![TensorData {
                name: "w".into(),
                shape: vec![3],
                data: vec![1.0],
            }]
        });
        ck.save(bad).unwrap();
        ck.save(job(2)).unwrap();
        ck.flush(Duration::from_secs(30)).await.unwrap();
        let events = ck.take_events();
        assert!(
            matches!(&events[0], CheckpointEvent::Failed { step: 1, error } if error.contains("needs 3")),
            "{events:?}"
        );
        assert!(matches!(
            &events[1],
            CheckpointEvent::Committed { step: 2, .. }
        ));
        ck.shutdown().await;
    }
}

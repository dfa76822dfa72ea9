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
//! The actor is a restartable child of a [`NodeSupervisor`] (its own private one when it is
//! started alone, as `tenax train` does): a save that panics makes the actor fail; the
//! supervisor starts it again by [`CHECKPOINT_POLICY`]. The new actor retries the save that
//! was in flight if it still holds its snapshot (a panic while building the tensors; at most
//! [`SAVE_TRIES`] tries), else it reports it [`CheckpointEvent::Failed`] and goes on with the
//! next save: the snapshot is released as soon as its tensors are built, so that holding it
//! through an upload never makes the ranks copy their buffers. The queue of saves outlives the
//! actor, so no save handed over is lost to a restart. One failure more than the policy
//! allows and the supervisor gives up: later saves fail at once and
//! [`Checkpointer::is_running`] says so, so that the node can exit instead of training on
//! without checkpoints.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tenax_core::ckpt::RetentionPolicy;
use tenax_core::restart::RestartPolicy;
use tenax_storage::{CheckpointContent, CheckpointMeta, ShareWait, Store, TensorData};
use tokio::sync::{mpsc, watch};

use crate::node::{ChildSpec, NodeSupervisor};
use crate::supervisor::ActorsError;

/// Builds the tensors of a snapshot (runs on a blocking thread in the background; called
/// again when the save is retried).
pub type BuildTensors = Arc<dyn Fn() -> Vec<TensorData> + Send + Sync>;

/// One save: what the manifest says, and how to get the tensors from the snapshot.
#[derive(Clone)]
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

/// The restart policy of the Checkpoint actor: at most 3 restarts within a minute.
pub const CHECKPOINT_POLICY: RestartPolicy = RestartPolicy {
    max_restarts: 3,
    window_ms: 60_000,
};

/// Tries of one save whose upload panics (the first, and one retry by the restarted actor).
pub const SAVE_TRIES: u32 = 2;

/// The child's name under the node supervisor.
const CHILD: &str = "checkpoint";

enum Msg {
    /// Look at the queue: start the next save if none is running.
    Wake,
    /// The running save ended with these events.
    Done(Vec<CheckpointEvent>),
    /// The upload of `step` panicked.
    Crashed { step: u64, error: String },
}

/// The save being uploaded (or to retry), and how many times it was started.
struct InFlight {
    meta: CheckpointMeta,
    share: Option<ShareJob>,
    /// Released once the tensors are built, so that the snapshot's buffers are no longer
    /// shared with the ranks (they would copy them at their next update): a save that
    /// fails after that point is not retried; the next one goes on.
    build: Option<BuildTensors>,
    tries: u32,
}

impl InFlight {
    fn new(job: SaveJob) -> Self {
        Self {
            meta: job.meta,
            share: job.share,
            build: Some(job.build),
            tries: 0,
        }
    }
}

/// The saves handed over: one in flight, at most one waiting.
#[derive(Default)]
struct Queue {
    in_flight: Option<InFlight>,
    /// An upload task of the current actor runs `in_flight`.
    running: bool,
    waiting: Option<SaveJob>,
}

/// What outlives one actor: the queue, the event channel, and the actor to wake. Shared by
/// the [`Checkpointer`] handle and every start of the actor.
struct Desk {
    store: Store,
    policy: CheckpointPolicy,
    events: mpsc::Sender<CheckpointEvent>,
    queue: Mutex<Queue>,
    /// The running actor (replaced at each restart).
    actor: Mutex<Option<ActorRef<Msg>>>,
    /// True while nothing is in flight or waiting.
    idle: watch::Sender<bool>,
}

impl Desk {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: CheckpointEvent) {
        if self.events.try_send(event).is_err() {
            tracing::warn!("checkpoint event dropped: the event queue is full or closed");
        }
    }

    /// Queue a save: it starts at once if none is in flight, else it waits, replacing the
    /// one waiting.
    fn submit(&self, job: SaveJob) {
        let by_step = job.meta.step;
        let old = {
            let mut q = self.queue();
            match q.in_flight {
                // It goes next: the actor starts it when it looks at the queue.
                None => {
                    q.in_flight = Some(InFlight::new(job));
                    None
                }
                Some(_) => q.waiting.replace(job),
            }
        };
        self.idle.send_replace(false);
        if let Some(old) = old {
            self.skip_share(&old, by_step);
            self.emit(CheckpointEvent::Superseded {
                step: old.meta.step,
                by_step,
            });
        }
        let actor = self.actor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // An actor being restarted looks at the queue when it starts.
        if let Some(a) = actor {
            let _ = a.cast(Msg::Wake);
        }
    }

    /// Start the save in flight (a retry after a restart) or the waiting one, unless one
    /// runs already; report idle when there is none.
    fn pump(self: &Arc<Self>, myself: &ActorRef<Msg>) {
        let mut q = self.queue();
        if q.running {
            return;
        }
        if q.in_flight.is_none() {
            q.in_flight = q.waiting.take().map(InFlight::new);
        }
        let Some(f) = q.in_flight.as_mut() else {
            self.idle.send_replace(true);
            return;
        };
        let step = f.meta.step;
        let Some(build) = f.build.clone() else {
            // Left by a failed actor after its tensors were built: it cannot be retried.
            q.in_flight = None;
            drop(q);
            self.emit(CheckpointEvent::Failed {
                step,
                error: "the checkpoint actor failed while uploading it (its snapshot was already released); the next save goes on".into(),
            });
            return self.pump(myself);
        };
        f.tries += 1;
        if f.tries > 1 {
            tracing::warn!(
                step,
                "retrying the save after a restart of the checkpoint actor"
            );
        }
        let job = SaveJob {
            meta: f.meta.clone(),
            build,
            share: f.share.clone(),
        };
        q.running = true;
        drop(q);
        let desk = Arc::clone(self);
        let myself = myself.clone();
        tokio::spawn(async move {
            let upload = tokio::spawn(async move { run_save(&desk, job).await });
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
}

struct CheckpointActor;

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
/// written; once per process (the retry by the restarted actor goes through).
#[cfg(feature = "chaos-hooks")]
fn chaos_panic_in_upload(step: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if chaos_step("TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP") == Some(step)
        && !DONE.swap(true, Ordering::SeqCst)
    {
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
async fn run_save(desk: &Desk, job: SaveJob) -> Vec<CheckpointEvent> {
    let (store, policy) = (&desk.store, &desk.policy);
    let t0 = Instant::now();
    let step = job.meta.step;
    let build = job.build;
    let built = tokio::task::spawn_blocking(move || build()).await;
    // Built: the snapshot is no longer needed; release it (see `InFlight::build`).
    if built.is_ok() {
        if let Some(f) = desk.queue().in_flight.as_mut() {
            f.build = None;
        }
    }
    let tensors = match built {
        Ok(t) => t,
        // A panic is the actor's failure: its supervisor restarts it and the save is retried.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            return vec![CheckpointEvent::Failed {
                step,
                error: format!("building the snapshot's tensors: {e}"),
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
    type State = Arc<Desk>;
    type Arguments = Arc<Desk>;

    async fn pre_start(
        &self,
        myself: ActorRef<Msg>,
        desk: Arc<Desk>,
    ) -> Result<Arc<Desk>, ActorProcessingErr> {
        *desk.actor.lock().unwrap_or_else(|p| p.into_inner()) = Some(myself.clone());
        // A save left in flight by the previous actor is retried; else the waiting one.
        desk.queue().running = false;
        desk.pump(&myself);
        Ok(desk)
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        desk: &mut Arc<Desk>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Wake => desk.pump(&myself),
            Msg::Done(events) => {
                {
                    let mut q = desk.queue();
                    q.in_flight = None;
                    q.running = false;
                }
                for e in events {
                    desk.emit(e);
                }
                desk.pump(&myself);
            }
            Msg::Crashed { step, error } => {
                let gave_up = {
                    let mut q = desk.queue();
                    q.running = false;
                    let (tries, built) = q
                        .in_flight
                        .as_ref()
                        .map_or((SAVE_TRIES, true), |f| (f.tries, f.build.is_none()));
                    let gave_up = match (tries >= SAVE_TRIES, built) {
                        (true, _) => Some(format!(
                            "the save panicked in each of {SAVE_TRIES} tries (last: {error})"
                        )),
                        (false, true) => Some(format!(
                            "the upload panicked ({error}); the checkpoint actor restarts and the next save goes on"
                        )),
                        (false, false) => None,
                    };
                    if gave_up.is_some() {
                        q.in_flight = None;
                    }
                    gave_up
                };
                if let Some(error) = gave_up {
                    desk.emit(CheckpointEvent::Failed { step, error });
                }
                // Fail: the node supervisor restarts the actor by its policy, and the new
                // actor retries the save (or starts the next).
                return Err(format!("the upload of step {step} panicked: {error}").into());
            }
        }
        Ok(())
    }
}

/// Handle to the checkpoint actor.
pub struct Checkpointer {
    desk: Arc<Desk>,
    events: mpsc::Receiver<CheckpointEvent>,
    idle: watch::Receiver<bool>,
    /// Some once the supervisor gave up on the actor.
    gave_up: watch::Receiver<Option<String>>,
    /// The private supervisor of an actor started alone.
    own: Option<NodeSupervisor>,
}

impl Checkpointer {
    /// Start the actor saving into `store`, under a supervisor of its own.
    pub async fn start(
        store: Store,
        policy: CheckpointPolicy,
    ) -> Result<Checkpointer, ActorsError> {
        let node = NodeSupervisor::start(Vec::new()).await?;
        let mut ck = Self::start_under(&node, store, policy).await?;
        ck.own = Some(node);
        Ok(ck)
    }

    /// Start the actor saving into `store` as a restartable child of `node` (see the
    /// module doc).
    pub async fn start_under(
        node: &NodeSupervisor,
        store: Store,
        policy: CheckpointPolicy,
    ) -> Result<Checkpointer, ActorsError> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let (idle_tx, idle) = watch::channel(true);
        let desk = Arc::new(Desk {
            store,
            policy,
            events: tx,
            queue: Mutex::new(Queue::default()),
            actor: Mutex::new(None),
            idle: idle_tx,
        });
        let d = desk.clone();
        let spec = ChildSpec::actor(
            CHILD,
            CHECKPOINT_POLICY,
            Arc::new(move |_run, parent| {
                let d = d.clone();
                Box::pin(async move {
                    let (a, _) = Actor::spawn_linked(None, CheckpointActor, d, parent)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(a.get_cell())
                })
            }),
        );
        node.add(spec).await?;
        Ok(Checkpointer {
            desk,
            events: rx,
            idle,
            gave_up: node.failed(),
            own: None,
        })
    }

    /// Hand a save over; returns at once (see the module doc for what happens when a save is
    /// already uploading).
    pub fn save(&self, job: SaveJob) -> Result<(), ActorsError> {
        if let Some(why) = self.gave_up.borrow().clone() {
            return Err(ActorsError::Stopped(format!("checkpoint actor: {why}")));
        }
        self.desk.submit(job);
        Ok(())
    }

    /// Wait until no save is in flight or waiting (at most `timeout`).
    pub async fn flush(&self, timeout: Duration) -> Result<(), ActorsError> {
        let (mut idle, mut gave_up) = (self.idle.clone(), self.gave_up.clone());
        let wait = async {
            tokio::select! {
                r = idle.wait_for(|&idle| idle) => r.map(|_| ()).map_err(|_| "gone".to_string()),
                r = gave_up.wait_for(|g| g.is_some()) => Err(match r {
                    Ok(why) => why.clone().unwrap_or_default(),
                    Err(_) => "gone".to_string(),
                }),
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(ActorsError::Stopped(format!("checkpoint actor: {why}"))),
            Err(_) => Err(ActorsError::Timeout {
                what: "waiting for checkpoint uploads".into(),
                timeout_s: timeout.as_secs(),
            }),
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

    /// Whether the actor still runs (its supervisor gives up on it after too many
    /// failures within [`CHECKPOINT_POLICY`]'s window).
    pub fn is_running(&self) -> bool {
        self.gave_up.borrow().is_none()
    }

    /// Restarts of the actor so far (counted by its own supervisor; 0 under a node's,
    /// which counts them with its other children).
    pub fn restarts(&self) -> u64 {
        self.own.as_ref().map_or(0, |n| n.restarts())
    }

    /// Stop the actor (an upload in flight is abandoned: its folder stays uncommitted).
    /// Under a node supervisor, the node's shutdown stops it.
    pub async fn shutdown(self) {
        if let Some(node) = self.own {
            node.shutdown().await;
        }
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
            build: Arc::new(move || {
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

    /// A job whose tensors panic to build the first `panics` times.
    fn panicking_job(step: u64, panics: u32) -> SaveJob {
        let left = Arc::new(std::sync::atomic::AtomicU32::new(panics));
        let good = job(step).build;
        let mut j = job(step);
        j.build = Arc::new(move || {
            let n = left.load(std::sync::atomic::Ordering::SeqCst);
            if n > 0 {
                left.store(n - 1, std::sync::atomic::Ordering::SeqCst);
                panic!("planted panic building step {step}");
            }
            good()
        });
        j
    }

    /// A panicking save makes the actor fail; its supervisor restarts it and the new
    /// actor retries the save, which commits. A save waiting behind it is not lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_save_restarts_the_actor_and_is_retried() {
        let store = Store::open("memory://").unwrap();
        let policy = CheckpointPolicy {
            share_wait: Default::default(),
            writers: 1,
            retention: None,
        };
        let mut ck = Checkpointer::start(store.clone(), policy).await.unwrap();
        ck.save(panicking_job(11, 1)).unwrap();
        ck.save(job(12)).unwrap();
        ck.flush(Duration::from_secs(30)).await.unwrap();
        let events = ck.take_events();
        assert_eq!(committed_steps(&events), vec![11, 12], "{events:?}");
        assert_eq!(ck.restarts(), 1, "one restart of the actor");
        assert!(ck.is_running());
        ck.shutdown().await;
    }

    /// A save that panics in every try is reported failed after `SAVE_TRIES` and the next
    /// save commits; one failure more than `CHECKPOINT_POLICY` allows within its window
    /// and the supervisor gives up: later saves fail at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_save_that_always_panics_fails_and_too_many_panics_stop_the_actor() {
        let store = Store::open("memory://").unwrap();
        let policy = CheckpointPolicy {
            share_wait: Default::default(),
            writers: 1,
            retention: None,
        };
        let mut ck = Checkpointer::start(store.clone(), policy).await.unwrap();
        ck.save(panicking_job(21, u32::MAX)).unwrap();
        ck.save(job(22)).unwrap();
        ck.flush(Duration::from_secs(30)).await.unwrap();
        let events = ck.take_events();
        assert_eq!(committed_steps(&events), vec![22], "{events:?}");
        assert!(
            events.iter().any(|e| matches!(e, CheckpointEvent::Failed { step: 21, error } if error.contains("each of 2 tries"))),
            "{events:?}"
        );
        assert_eq!(ck.restarts(), u64::from(SAVE_TRIES));
        assert!(ck.is_running());
        // Two failures more within the minute: the fourth is one more than the policy's 3.
        ck.save(panicking_job(23, u32::MAX)).unwrap();
        let stopped = ck.flush(Duration::from_secs(30)).await;
        assert!(
            matches!(&stopped, Err(ActorsError::Stopped(why)) if why.contains("keeps failing")),
            "{stopped:?}"
        );
        assert!(!ck.is_running(), "the supervisor gave up");
        assert!(
            ck.save(job(24)).is_err(),
            "a save after it stopped fails at once"
        );
        ck.shutdown().await;
    }

    /// A panic in the upload (after the tensors are built): the actor restarts, that save
    /// is reported failed (its snapshot is released) and the next one commits.
    #[cfg(feature = "chaos-hooks")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_upload_restarts_the_actor_and_the_next_save_commits() {
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
        assert_eq!(committed_steps(&events), vec![1001, 1003], "{events:?}");
        assert!(
            events.iter().any(|e| matches!(e, CheckpointEvent::Failed { step: 1002, error } if error.contains("upload panicked"))),
            "{events:?}"
        );
        assert_eq!(ck.restarts(), 1);
        ck.shutdown().await;
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
        bad.build = Arc::new(|| {
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

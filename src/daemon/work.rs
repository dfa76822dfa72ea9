//! The node's work that waits on peers, etcd, the store or the trainer: each function is a
//! future that owns what it needs and ends in a [`Done`], the event for the node's
//! machine plus what the shell keeps (a state, a communicator, a trainer). Failures are
//! events too. Parameter hashes are taken on blocking threads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenax_actors::{
    GroupStart, Membership, NodeSupervisor, PipelineSpec, StageOnPeers, StepReport, TrainSetup,
    Trainer,
};
use tenax_cluster::etcd::{EtcdMembership, FenceOutcome};
use tenax_cluster::member::{Member, MemberConfig};
use tenax_cluster::peer::{
    fetch_state, CommSpec, GrpcCollective, PeerAddr, PeerHub, StateSnapshot,
};
use tenax_cluster::Collective;
use tenax_core::guard::{GuardLimits, GuardState};
use tenax_core::membership::{MemberId, Plan};
use tenax_core::node::{Event, PeerState, Record};
use tenax_storage::Store;
use tokio_util::sync::CancellationToken;

use super::{find_resume_point, start_member, Shared};
use crate::train::{start_state, Prepared, Start};
use tenax_cluster::records::{self, CheckpointRecord, CHECKPOINT_KEY};

/// How long one attempt to write a checkpoint's etcd record may hold the loop.
const RECORD_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// How often the non-committers read the job's record while waiting for the final one.
const FINAL_POLL: Duration = Duration::from_millis(200);

/// The outcome of a piece of work: the event for the machine, and what the shell keeps.
pub(super) enum Done {
    /// Only an event.
    Event(Event),
    /// The node's state (loaded, copied, or back from serving) and its hash if known.
    State {
        state: Start,
        hash: Option<String>,
        event: Event,
    },
    /// Registered again.
    Member(Member),
    /// A generation's communicator and its members in order.
    Comm {
        comm: Arc<GrpcCollective>,
        peers: Vec<PeerAddr>,
        event: Event,
    },
    /// A generation's trainer.
    Trainer(Trainer, Event),
    /// A step, for its step-log line.
    Step(StepInfo, Event),
}

/// What the last step reported, for its step-log line.
pub(super) struct StepInfo {
    pub report: StepReport,
    pub lr: f64,
    pub secs: f64,
    /// The parameters after the step (shared copy-on-write with the trainer), to hash off
    /// the loop; taken out at once, so that the next update does not have to copy them.
    pub params: Option<Arc<Vec<f32>>>,
    /// The training guard's bounds the step ran with (`None`: off or warming up).
    pub limits: Option<GuardLimits>,
}

fn failed(generation: u64, peers_may_have_failed: bool, error: String) -> Done {
    Done::Event(Event::Failed {
        generation,
        peers_may_have_failed,
        error,
    })
}

/// A copied or served state back as the node's, with its guard state (parsed by the
/// caller: `guard`).
fn into_start(snap: StateSnapshot, guard: Option<GuardState>) -> Start {
    Start {
        step: snap.step,
        cursor: snap.cursor,
        params: snap.params,
        opt: tenax_model::AdamW {
            m: snap.m,
            v: snap.v,
            step: snap.opt_step,
        },
        guard,
    }
}

/// The training guard's state as a state copy carries it (`StateSnapshot::guard_state`):
/// JSON as in a checkpoint's `extra.guard` (f64 values as their bits), empty for none.
pub(super) fn guard_blob(guard: Option<&GuardState>) -> Vec<u8> {
    guard.map_or_else(Vec::new, |g| {
        serde_json::to_vec(g).expect("a guard state serialises")
    })
}

/// The guard state a copy carried: `None` when empty (the donor's guard is off).
pub(super) fn guard_from_blob(blob: &[u8]) -> Result<Option<GuardState>, String> {
    if blob.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(blob)
        .map(Some)
        .map_err(|e| format!("its training guard state does not parse ({e})"))
}

/// Register in the job again.
pub(super) async fn register(
    etcd: EtcdMembership,
    join: MemberConfig,
    tls: Option<tenax_cluster::tls::Tls>,
) -> Done {
    match start_member(&etcd, &join, tls).await {
        Ok(m) => Done::Member(m),
        Err(e) => Done::Event(Event::Fatal {
            error: format!("registering again: {e:#}"),
        }),
    }
}

/// The step of the job's checkpoint record (etcd bounded by 2 s).
pub(super) async fn job_record(etcd: EtcdMembership) -> Done {
    let step = read_record(&etcd, Duration::from_secs(2))
        .await
        .map(|r| r.step);
    Done::Event(Event::JobRecord { step })
}

/// Resolve the plan's members and build the generation's communicator (`spec` without
/// members; `me` is this node's id).
pub(super) async fn build_comm(
    etcd: EtcdMembership,
    hub: PeerHub,
    plan: Plan,
    spec: CommSpec,
    me: String,
) -> Done {
    let generation = plan.generation;
    let built = async {
        let peers = peers_of(&etcd, &plan).await?;
        let my_index = peers.iter().position(|p| p.id == me).ok_or_else(|| {
            format!("node {me} is not among the members of generation {generation}")
        })?;
        let spec = CommSpec {
            members: peers.clone(),
            me: my_index,
            ..spec
        };
        let comm = GrpcCollective::new(&hub, spec).map_err(|e| e.to_string())?;
        Ok::<_, String>((comm, peers))
    }
    .await;
    match built {
        Ok((comm, peers)) => Done::Comm {
            comm,
            peers,
            event: Event::CommunicatorBuilt { generation },
        },
        Err(e) => failed(generation, false, e),
    }
}

/// Exchange (step, hash) with every member in round `round`.
pub(super) async fn compare(
    comm: Arc<GrpcCollective>,
    round: u64,
    step: u64,
    hash: String,
    timeout: Duration,
) -> Done {
    let generation = comm.spec().generation;
    match comm.compare_state(round, step, &hash, timeout).await {
        Ok(states) => Done::Event(Event::StatesExchanged {
            generation,
            round,
            states: states
                .into_iter()
                .map(|o| PeerState {
                    member: MemberId::new(o.id),
                    step: o.step,
                    hash: o.param_hash,
                })
                .collect(),
        }),
        Err(e) => failed(generation, true, format!("state exchange: {e}")),
    }
}

/// The periodic comparison after `step`: this node's ranks with each other (when it
/// hosts more than one; ranks that differ make its trainer count as failed: the node
/// leaves and copies the state back), then the members with each other.
pub(super) async fn compare_all(
    trainer: Option<Arc<Trainer>>,
    comm: Arc<GrpcCollective>,
    step: u64,
    hash: String,
    timeout: Duration,
) -> Done {
    let generation = comm.spec().generation;
    if let Some(t) = trainer.filter(|t| t.local_ranks() > 1) {
        let differ = match t.param_hashes().await {
            Ok(h) if h.windows(2).all(|w| w[0] == w[1]) => None,
            Ok(h) => Some(format!(
                "its ranks hold different parameters after step {step} ({})",
                h.iter()
                    .map(|x| &x[..x.len().min(12)])
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(e) => Some(format!("hashing its ranks after step {step}: {e}")),
        };
        if let Some(error) = differ {
            return Done::Event(Event::TrainerFailed { generation, error });
        }
    }
    compare(comm, step, step, hash, timeout).await
}

/// Load the job's committed checkpoint.
pub(super) async fn load(
    etcd: EtcdMembership,
    store: Store,
    prep: &Prepared,
    generation: u64,
) -> Done {
    let loaded = async {
        let c = find_resume_point(&etcd, &store).await?;
        tokio::task::block_in_place(|| {
            let start = start_state(prep, c.as_ref())?;
            let hash = tenax_actors::param_hash(&start.params);
            Ok::<_, anyhow::Error>((start, hash))
        })
    }
    .await;
    match loaded {
        Ok((state, hash)) => Done::State {
            event: Event::CheckpointLoaded {
                generation,
                step: state.step,
                cursor: state.cursor,
                hash: hash.clone(),
            },
            state,
            hash: Some(hash),
        },
        Err(e) => failed(
            generation,
            false,
            format!("loading the committed checkpoint: {e:#}"),
        ),
    }
}

/// What a state copy asks for.
pub(super) struct Fetch {
    pub hub: PeerHub,
    pub shared: Arc<Shared>,
    pub generation: u64,
    pub me: String,
    pub donor: PeerAddr,
    pub step: u64,
    pub hash: String,
    pub timeout: Duration,
    /// The step of the state this node had, if it held one.
    pub had: Option<u64>,
}

/// Copy the reference state from a donor and check its hash.
pub(super) async fn fetch(f: Fetch) -> Done {
    let t0 = Instant::now();
    let (g, me, donor) = (f.generation, &f.me, &f.donor.id);
    let (snap, stats) = match fetch_state(&f.hub, g, me, &f.donor, f.step, &f.hash, f.timeout).await
    {
        Ok(x) => x,
        Err(e) => {
            return failed(
                g,
                true,
                format!("copying the state of step {} from {donor}: {e}", f.step),
            )
        }
    };
    let guard = match guard_from_blob(&snap.guard_state) {
        Ok(g) => g,
        Err(e) => return failed(g, true, format!("the state copied from {donor}: {e}")),
    };
    let got = tokio::task::block_in_place(|| tenax_actors::param_hash(&snap.params));
    if got != f.hash {
        return failed(
            g,
            true,
            format!(
                "the state copied from {donor} hashes to {} instead of {}",
                &got[..12],
                &f.hash[..f.hash.len().min(12)]
            ),
        );
    }
    println!(
        "node {me}: generation {g}: copied the state of step {} from {donor} ({:.1} MB in {:.3} s, {:.2} GB/s; {})",
        snap.step,
        stats.bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        stats.gb_per_s(),
        match f.had {
            Some(s) => format!("it was at step {s}"),
            None => "it held no state".to_string(),
        }
    );
    (f.shared.view()).note_state_copy(stats.bytes, t0.elapsed().as_secs_f64());
    let state = into_start(snap, guard);
    Done::State {
        event: Event::StateCopied {
            generation: g,
            step: state.step,
            cursor: state.cursor,
        },
        state,
        hash: Some(got),
    }
}

/// Publish this node's state for the generation and wait until every receiver has it,
/// but not past the generation (a receiver that dies mid-copy gets evicted, and the newer
/// plan aborts the communicator) nor past `timeout`. The state comes back either way.
pub(super) async fn serve(
    comm: Arc<GrpcCollective>,
    hub: PeerHub,
    state: Start,
    hash: String,
    names: Vec<String>,
    timeout: Duration,
) -> Done {
    let generation = comm.spec().generation;
    let me = comm.spec().members[comm.spec().me].id.clone();
    let Start {
        step,
        cursor,
        params,
        opt,
        guard,
    } = state;
    let snap = Arc::new(StateSnapshot {
        step,
        cursor,
        opt_step: opt.step,
        param_hash: hash.clone(),
        params,
        m: opt.m,
        v: opt.v,
        guard_state: guard_blob(guard.as_ref()),
    });
    let publication = hub.publish_state_for(generation, snap.clone(), names.clone());
    let started = Instant::now();
    let result = loop {
        let slice = Duration::from_millis(200);
        match publication.wait_served(names.len() as u64, slice).await {
            Ok(()) => break Ok(()),
            Err(e) => {
                if let Some(reason) = comm.aborted() {
                    break Err(format!("{e}; the generation ended: {reason}"));
                }
                if started.elapsed() >= timeout {
                    break Err(format!(
                        "{} of {} receiver(s) copied the state within {} s",
                        publication.served(),
                        names.len(),
                        timeout.as_secs()
                    ));
                }
            }
        }
    };
    drop(publication);
    let snap = Arc::try_unwrap(snap).unwrap_or_else(|a| StateSnapshot::clone(&a));
    let state = into_start(snap, guard);
    let names = names.join(", ");
    let event = match result {
        Ok(()) => {
            println!(
                "node {me}: generation {generation}: sent its state of step {step} to {names}"
            );
            Event::StateServed { generation }
        }
        Err(e) => Event::Failed {
            generation,
            peers_may_have_failed: true,
            error: format!("sending state to {names}: {e}"),
        },
    };
    Done::State {
        state,
        hash: Some(hash),
        event,
    }
}

/// Start the trainer of this node's ranks in the communicator's generation.
/// What a node's trainer runs in a generation.
#[derive(Clone)]
pub(super) enum TrainerKind {
    /// Its ranks each run the whole model.
    Whole,
    /// Its ranks each run a whole pipeline of stages, in this process.
    Pipelines(PipelineSpec),
    /// One stage of a pipeline whose other stages are other members
    /// (`--stages-across-nodes`): which, and the members (indices into the
    /// communicator's) running the pipeline's stages, in stage order.
    Stage {
        spec: PipelineSpec,
        stage: u32,
        pipeline_members: Vec<usize>,
    },
}

pub(super) async fn start_trainer(
    comm: Arc<GrpcCollective>,
    mut setup: TrainSetup,
    data: Arc<tenax_actors::TrainData>,
    state: Start,
    kind: TrainerKind,
    node: &NodeSupervisor,
) -> Done {
    let spec = comm.spec();
    let generation = spec.generation;
    setup.ranks = spec.world as usize;
    let local: Vec<usize> = spec.local_ranks.iter().map(|&r| r as usize).collect();
    let collective: Arc<dyn Collective> = comm.clone();
    let group = GroupStart {
        generation,
        setup,
        local_ranks: local,
        collective: Some(collective),
        data,
        params: state.params,
        opt: state.opt,
    };
    let started = match kind {
        TrainerKind::Whole => Trainer::start_group(group, Some(node)).await,
        TrainerKind::Pipelines(p) => Trainer::start_pipeline_group(group, p, Some(node)).await,
        TrainerKind::Stage {
            spec,
            stage,
            pipeline_members,
        } => {
            let on = StageOnPeers {
                stage,
                comm: Arc::clone(&comm),
                pipeline_members,
            };
            Trainer::start_stage(group, spec, on, Some(node)).await
        }
    };
    match started {
        Ok(t) => Done::Trainer(t, Event::TrainerStarted { generation }),
        Err(e) => Done::Event(Event::Fatal {
            error: e.to_string(),
        }),
    }
}

/// Run one step and read the parameters' hash after it (computed on the rank threads).
pub(super) async fn step(
    trainer: Arc<Trainer>,
    generation: u64,
    step: u64,
    cursor: u64,
    lr: f64,
    limits: Option<GuardLimits>,
) -> Done {
    let t0 = Instant::now();
    let stepped = trainer.step_guarded(generation, step, cursor, lr as f32, limits);
    let report = match stepped.await {
        Ok(r) => r,
        Err(e) if e.trainer_is_gone() => {
            return Done::Event(Event::TrainerFailed {
                generation,
                error: e.to_string(),
            })
        }
        Err(e) => return failed(generation, true, e.to_string()),
    };
    let ran = async {
        let secs = t0.elapsed().as_secs_f64();
        // One hash per node per step, of rank 0's parameters, taken by the shell on a
        // blocking thread while the next step runs; the snapshot copies nothing.
        let snap = trainer
            .snapshot()
            .await
            .map_err(|e| format!("step {}: {e}", step + 1))?;
        Ok::<_, String>(StepInfo {
            report,
            lr,
            secs,
            params: Some(snap.params),
            limits,
        })
    }
    .await;
    match ran {
        Ok(info) => {
            let event = Event::StepDone {
                generation,
                loss: info.report.loss,
                skipped: info.report.skipped,
                elapsed_ms: (info.secs * 1000.0) as u64,
            };
            Done::Step(info, event)
        }
        Err(e) => failed(generation, true, e),
    }
}

/// The validation loss.
pub(super) async fn evaluate(
    trainer: Arc<Trainer>,
    windows: Vec<u64>,
    generation: u64,
    step: u64,
) -> Done {
    Done::Event(match trainer.eval(windows).await {
        Ok(val_loss) => Event::Evaluated {
            generation,
            val_loss,
        },
        Err(e) => Event::Fatal {
            error: format!("evaluation at step {step}: {e}"),
        },
    })
}

/// Read the job's record until it reaches `step` (or the generation's pollers stop).
pub(super) async fn final_record(
    etcd: EtcdMembership,
    step: u64,
    cancel: CancellationToken,
) -> Done {
    loop {
        if let Some(rec) = read_record(&etcd, Duration::from_secs(2)).await {
            if rec.step >= step {
                println!(
                    "the final checkpoint (step {}) was committed by {}: {}",
                    rec.step, rec.member, rec.url
                );
                return Done::Event(Event::FinalRecordSeen { step: rec.step });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FINAL_POLL) => {}
            _ = cancel.cancelled() => return Done::Event(Event::Tick),
        }
    }
}

/// Write the fenced etcd record of a committed checkpoint in the job's store
/// `store_url`, bounded in time: the committer must not hold the group's next step
/// while etcd is away.
///
/// The record etcd holds is read first: a write that timed out may still have landed, and
/// writing it again would record the same checkpoint twice (a retry then only confirms
/// it); a record of a later step is never replaced by an earlier one.
pub(super) async fn write_record(
    member: &Membership,
    etcd: &EtcdMembership,
    store_url: &str,
    rec: Record,
    shared: &Shared,
) -> Event {
    let step = rec.step;
    // The commit time shown in /metrics: this attempt's, read and write.
    let t0 = Instant::now();
    match read_record_checked(etcd, RECORD_ATTEMPT_TIMEOUT).await {
        Err(error) => return Event::RecordUnreachable { step, error },
        Ok(Some(held)) if held.step == rec.step && held.url == rec.url => {
            (shared.view()).note_record(step, rec.url, t0.elapsed().as_secs_f64());
            return Event::RecordWritten { step };
        }
        Ok(Some(held)) if held.step >= rec.step => {
            return Event::RecordRefused {
                step,
                reason: format!(
                    "the job's record already holds step {} ({})",
                    held.step, held.url
                ),
            };
        }
        Ok(_) => {}
    }
    let prefix = format!("{store_url}/");
    let record = CheckpointRecord {
        step: rec.step,
        folder: rec
            .url
            .strip_prefix(&prefix)
            .unwrap_or(&rec.url)
            .to_string(),
        url: rec.url.clone(),
        generation: rec.generation,
        member: member.id().to_string(),
    };
    let bytes = records::encode_checkpoint(&record);
    let commit = member.fenced_commit_in(rec.generation, CHECKPOINT_KEY, &bytes);
    match tokio::time::timeout(RECORD_ATTEMPT_TIMEOUT, commit).await {
        Ok(Ok(FenceOutcome::Committed { .. })) => {
            (shared.view()).note_record(step, rec.url, t0.elapsed().as_secs_f64());
            Event::RecordWritten { step }
        }
        Ok(Ok(FenceOutcome::Refused { reason })) => Event::RecordRefused {
            step,
            reason: format!("{reason:?}"),
        },
        Ok(Err(e)) => Event::RecordUnreachable {
            step,
            error: e.to_string(),
        },
        Err(_) => Event::RecordUnreachable {
            step,
            error: format!(
                "no answer from etcd within {} ms",
                RECORD_ATTEMPT_TIMEOUT.as_millis()
            ),
        },
    }
}

/// The job's checkpoint record as etcd holds it (`None`: none yet, or one this version
/// cannot read), or why etcd did not answer within `timeout`.
async fn read_record_checked(
    etcd: &EtcdMembership,
    timeout: Duration,
) -> Result<Option<CheckpointRecord>, String> {
    match tokio::time::timeout(timeout, etcd.get(CHECKPOINT_KEY)).await {
        Ok(Ok(bytes)) => Ok(bytes.and_then(|b| records::decode_checkpoint(&b).ok())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer from etcd within {} ms",
            timeout.as_millis()
        )),
    }
}

/// The job's checkpoint record, if etcd answers within `timeout` and holds one.
async fn read_record(etcd: &EtcdMembership, timeout: Duration) -> Option<CheckpointRecord> {
    read_record_checked(etcd, timeout).await.ok().flatten()
}

/// The members of `plan` that host ranks, in order of their first rank, with addresses.
async fn peers_of(etcd: &EtcdMembership, plan: &Plan) -> Result<Vec<PeerAddr>, String> {
    let registered = etcd.members().await.map_err(|e| e.to_string())?;
    let mut addrs = BTreeMap::new();
    for m in registered {
        match records::decode_member_info(&m.id, &m.info) {
            Ok(info) => {
                addrs.insert(info.id.to_string(), info.addr);
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let mut order: Vec<String> = Vec::new();
    for a in &plan.ranks {
        let id = a.member.to_string();
        if !order.contains(&id) {
            order.push(id);
        }
    }
    order
        .into_iter()
        .map(|id| {
            let addr = addrs
                .get(&id)
                .cloned()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| {
                    format!(
                        "member {id} of generation {} has no registered address (it left?)",
                        plan.generation
                    )
                })?;
            Ok(PeerAddr { id, addr })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenax_core::guard::{Ema, GuardStats};

    /// The guard state a copy carries comes back bit for bit (f64 values that JSON numbers
    /// would round, a NaN, the snapshot's estimates); none travels as nothing.
    #[test]
    fn a_copied_guard_state_round_trips_bit_for_bit() {
        let ema = |n, mean: f64, var: f64| Ema { n, mean, var };
        let st = GuardState {
            stats: GuardStats {
                loss: ema(57, 0.1 + 0.2, f64::MIN_POSITIVE / 3.0),
                grad_norm: ema(57, f64::NAN, 1e308),
            },
            streak: 2,
            flagged: 9,
            rollbacks: 1,
            snapshot: Some((
                50,
                GuardStats {
                    loss: ema(50, -0.0, 3.5),
                    grad_norm: ema(50, 1.0 / 3.0, 0.0),
                },
            )),
        };
        let blob = guard_blob(Some(&st));
        let back = guard_from_blob(&blob).unwrap().unwrap();
        assert_eq!(guard_blob(Some(&back)), blob);
        let bits = |s: &GuardStats| {
            [s.loss.mean, s.loss.var, s.grad_norm.mean, s.grad_norm.var].map(f64::to_bits)
        };
        assert_eq!(bits(&back.stats), bits(&st.stats));
        assert_eq!(
            bits(&back.snapshot.unwrap().1),
            bits(&st.snapshot.unwrap().1)
        );
        assert_eq!((back.streak, back.flagged, back.rollbacks), (2, 9, 1));
        assert!(guard_blob(None).is_empty());
        assert_eq!(guard_from_blob(&[]), Ok(None));
        let err = guard_from_blob(b"{\"stats\":").unwrap_err();
        assert!(err.contains("guard state does not parse"), "{err}");
    }
}

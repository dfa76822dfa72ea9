//! [`GrpcCollective`]: the communicator of one generation on one member.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use prost::Message;
use tenax_proto::v1::peer_client::PeerClient;
use tenax_proto::v1::{ExchangeReply, FrameKind, PeerFrame};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::hub::{Counters, PeerHub};
use super::step::{Geometry, Outgoing, StepState};
use super::{
    message_limit_bytes, piece_count, CommSpec, MemberState, PeerAddr, Reduction, StageMessage,
};
use crate::collective::{Collective, CollectiveError, Reduced, SlotContribution};

/// Most attempts of the first connect to a peer (within [`CommSpec::connect_deadline`]).
pub const MAX_CONNECT_ATTEMPTS: u32 = 64;

/// Spare frames in every send queue besides two steps' worth of traffic.
const QUEUE_SLACK: usize = 16;

/// The communicator of one generation on one member: a [`Collective`] whose ranks live
/// in several processes, talking through [`PeerHub`]s.
///
/// Built by [`GrpcCollective::new`] inside a tokio runtime; used by the local ranks'
/// compute threads (plain threads, outside the runtime) through [`Collective`].
/// `reduced` blocks its thread on a condition variable; `contribute` never waits (its
/// frames go to bounded queues; a full queue aborts). See the [module docs](super).
pub struct GrpcCollective {
    spec: CommSpec,
    geo: Geometry,
    counters: Arc<Counters>,
    state: Mutex<State>,
    changed: Condvar,
    notify: watch::Sender<u64>,
    /// One send queue per member (`None` for this member and after [`Self::close`]).
    links: Mutex<Vec<Option<mpsc::Sender<PeerFrame>>>>,
    queue_bounds: Vec<usize>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    cancel: CancellationToken,
    /// Peers whose stream failed, with what was seen (in order, each once).
    failed_peers: Mutex<Vec<(String, String)>>,
    /// Chaos hook: the step whose all-gather this member leaves half done, then exits.
    #[cfg(feature = "chaos-hooks")]
    exit_in_all_gather: Mutex<Option<u64>>,
    /// Threads blocked in `reduced` now (a test seam: a test waits for it before it
    /// checks that an event wakes them).
    waiting: std::sync::atomic::AtomicUsize,
}

struct Taken {
    result: Arc<Reduced>,
    takers: usize,
}

#[derive(Default)]
struct State {
    aborted: Option<String>,
    closed: bool,
    steps: BTreeMap<u64, StepState>,
    results: BTreeMap<u64, Taken>,
    finished_max: Option<u64>,
    /// Exchanged states by round (0: the start of the generation; later rounds: the
    /// step of a periodic comparison).
    states: BTreeMap<u64, Vec<Option<MemberState>>>,
    /// Members that said they stop after a step ([`GrpcCollective::stop_after`]).
    stopped_after: BTreeMap<usize, u64>,
    /// Messages between pipeline stages, by (message, step, slot): being assembled or
    /// complete and not yet taken.
    stage_msgs: BTreeMap<(StageMessage, u64, u64), StageMsg>,
}

/// A message between pipeline stages on its way in.
struct StageMsg {
    from: usize,
    values: Vec<f32>,
    /// Pieces' offsets in, to refuse a duplicate.
    offsets: std::collections::BTreeSet<u64>,
    filled: usize,
}

impl StageMsg {
    fn complete(&self) -> bool {
        self.filled == self.values.len()
    }
}

/// Most state-exchange rounds held at once (rounds a fast peer opened early included).
const MAX_STATE_ROUNDS: usize = 8;

impl std::fmt::Debug for GrpcCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcCollective")
            .field("job", &self.spec.job)
            .field("generation", &self.spec.generation)
            .field("me", &self.spec.members[self.spec.me].id)
            .field("reduction", &self.spec.reduction)
            .field("aborted", &self.lock().aborted)
            .finish()
    }
}

impl GrpcCollective {
    /// Builds the communicator of `spec.generation` and installs it in `hub`, aborting
    /// the previously installed one ("superseded by generation g"). Frames of this
    /// generation that the hub buffered are delivered now. Starts one sending task per
    /// other member (on the current tokio runtime), which connects (retrying until
    /// `spec.connect_deadline`) and opens the `Exchange` stream.
    ///
    /// Fails (as [`CollectiveError::Aborted`]) if the spec is invalid, does not match the
    /// hub (job, frame size), is not newer than the installed generation, or if called
    /// outside a tokio runtime.
    pub fn new(hub: &PeerHub, spec: CommSpec) -> Result<Arc<Self>, CollectiveError> {
        let generation = spec.generation;
        let invalid = |reason: String| CollectiveError::Aborted {
            reason: format!("cannot build the communicator of generation {generation}: {reason}"),
        };
        spec.validate().map_err(|e| invalid(e.to_string()))?;
        if spec.job != hub.job() {
            return Err(invalid(format!(
                "job {:?} but the hub serves job {:?}",
                spec.job,
                hub.job()
            )));
        }
        if spec.max_frame_floats > hub.config().max_frame_floats {
            return Err(invalid(format!(
                "max_frame_floats {} exceeds the hub's {}",
                spec.max_frame_floats,
                hub.config().max_frame_floats
            )));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("must be built inside a tokio runtime".into()))?;
        let geo = Geometry::new(&spec);
        let m = spec.members.len();
        let mut links = Vec::with_capacity(m);
        let mut receivers = Vec::with_capacity(m);
        let mut queue_bounds = Vec::with_capacity(m);
        for k in 0..m {
            if k == spec.me {
                links.push(None);
                receivers.push(None);
                queue_bounds.push(0);
            } else {
                let bound = 2 * geo.frames_per_step_to(k) + QUEUE_SLACK;
                let (tx, rx) = mpsc::channel(bound);
                links.push(Some(tx));
                receivers.push(Some(rx));
                queue_bounds.push(bound);
            }
        }
        let comm = Arc::new(Self {
            geo,
            counters: hub.counters(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            notify: watch::channel(0).0,
            links: Mutex::new(links),
            queue_bounds,
            tasks: Mutex::new(Vec::new()),
            cancel: CancellationToken::new(),
            failed_peers: Mutex::new(Vec::new()),
            #[cfg(feature = "chaos-hooks")]
            exit_in_all_gather: Mutex::new(None),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            spec,
        });
        let (old, buffered) = hub
            .install(generation, Arc::clone(&comm))
            .map_err(invalid)?;
        if let Some(old) = old {
            old.abort(&format!("superseded by generation {generation}"));
        }
        let limit = message_limit_bytes(comm.spec.max_frame_floats);
        let mut tasks = Vec::new();
        for (k, rx) in receivers.into_iter().enumerate() {
            let Some(rx) = rx else { continue };
            let link = Link {
                comm: Arc::downgrade(&comm),
                peer: comm.spec.members[k].clone(),
                connect_deadline: comm.spec.connect_deadline,
                message_limit: limit,
                counters: Arc::clone(&comm.counters),
                cancel: comm.cancel.clone(),
                tls: hub.tls().cloned(),
            };
            tasks.push(runtime.spawn(link.run(rx)));
        }
        *comm.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        hub.deliver_buffered(&comm, buffered);
        tracing::debug!(
            job = %comm.spec.job,
            generation,
            me = %comm.spec.members[comm.spec.me].id,
            members = m,
            reduction = %comm.spec.reduction,
            "communicator installed"
        );
        Ok(comm)
    }

    /// The spec this communicator was built from.
    pub fn spec(&self) -> &CommSpec {
        &self.spec
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.spec.generation
    }

    /// Why it was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// How many threads are blocked in `reduced` now (for tests).
    #[cfg(test)]
    pub(super) fn waiting_in_reduced(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// How far `step` got on this member: which slots' losses are in (by slot) and which
    /// members' reduced chunks are in (by member; exact reduction only, the ring gives no
    /// per-member chunks). `None` if the step is not open (not started, or complete).
    /// Used to name the members a late step waits for.
    pub fn progress(&self, step: u64) -> Option<(Vec<bool>, Vec<bool>)> {
        let st = self.lock();
        let s = st.steps.get(&step)?;
        Some((s.losses_present(), s.chunks_present(&self.geo)))
    }

    /// The members (ids, this one left out) that step `step + 1` still waits for, given
    /// which member computes each slot (`slot_owner`): see
    /// [`tenax_core::detector::late_members`]. Empty when the step has not begun here.
    pub fn late_members(&self, step: u64, slot_owner: &[usize]) -> Vec<String> {
        let Some((losses, chunks)) = self.progress(step) else {
            return Vec::new();
        };
        let chunks = (self.spec.reduction == Reduction::Exact).then_some(chunks);
        let late = tenax_core::detector::late_members(slot_owner, &losses, chunks.as_deref());
        late.into_iter()
            .filter(|&k| k != self.spec.me)
            .filter_map(|k| self.spec.members.get(k).map(|m| m.id.clone()))
            .collect()
    }

    /// The peers whose stream failed (connect refused, connection reset, ...), each with
    /// what was seen: the members to suspect after an abort.
    pub fn failed_peers(&self) -> Vec<(String, String)> {
        self.failed_peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells every other member that this one stops the generation after `step` (a newer
    /// plan arrived and it will not start the next step): a member already waiting on a
    /// later step gives it up at once instead of waiting for its deadline. Sent after
    /// everything this member queued before, on the same ordered streams.
    pub fn stop_after(&self, step: u64) {
        let frames: Vec<_> = self
            .others()
            .map(|k| {
                (
                    k,
                    self.frame(step, FrameKind::Boundary, 0, 0, 0, 0.0, Vec::new()),
                )
            })
            .collect();
        if let Err(reason) = self.queue(frames) {
            tracing::debug!(%reason, "could not announce the end of this generation");
        }
    }

    /// Why a step after which some member stopped cannot complete, if one did.
    fn stopped_before(&self, st: &State, step: u64) -> Option<String> {
        st.stopped_after
            .iter()
            .find(|(_, &after)| step >= after)
            .map(|(&k, &after)| {
                format!(
                    "member {} stopped this generation after step {after} (a newer plan)",
                    self.spec.members[k].id
                )
            })
    }

    fn peer_failed(&self, id: &str, what: &str) {
        let mut failed = self
            .failed_peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !failed.iter().any(|(p, _)| p == id) {
            failed.push((id.to_string(), what.to_string()));
        }
    }

    /// Chaos hook, for tests that need a member to die in the middle of a collective: in
    /// `step`, this member sends its all-gather frames (reduced chunks, ring all-gather
    /// rounds) to the first other member only, then exits the process 300 ms later. That
    /// member can complete the step while the others cannot: the survivors then disagree
    /// on whether the step was applied. Only with the `chaos-hooks` feature.
    #[cfg(feature = "chaos-hooks")]
    pub fn exit_during_all_gather(&self, step: u64) {
        *self
            .exit_in_all_gather
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(step);
    }

    /// The send queue bound (in frames) towards member `k` (0 for this member).
    pub fn queue_bound(&self, k: usize) -> usize {
        self.queue_bounds.get(k).copied().unwrap_or(0)
    }

    /// Every member sends its state (`step`, `param_hash`) to every other; returns all
    /// members' states in member order, this member's included, once every one is in.
    /// Waits at most `timeout` ([`CollectiveError::Timeout`] counts members, not slots);
    /// fails at once if the communicator is aborted. This is round 0, at the start of
    /// the generation; see [`Self::compare_state`] for later rounds.
    pub async fn exchange_state(
        &self,
        step: u64,
        param_hash: &str,
        timeout: Duration,
    ) -> Result<Vec<MemberState>, CollectiveError> {
        self.compare_state(0, step, param_hash, timeout).await
    }

    /// As [`Self::exchange_state`], for round `round`: every member calls it with the
    /// same round (a periodic comparison uses the step it is made at, which is never 0
    /// within a generation's steps). A round's states are forgotten once returned.
    pub async fn compare_state(
        &self,
        round: u64,
        step: u64,
        param_hash: &str,
        timeout: Duration,
    ) -> Result<Vec<MemberState>, CollectiveError> {
        let start = Instant::now();
        let mut rx = self.notify.subscribe();
        {
            let mut st = self.lock();
            if let Some(reason) = &st.aborted {
                return Err(CollectiveError::Aborted {
                    reason: reason.clone(),
                });
            }
            let me = self.spec.me;
            let m = self.spec.members.len();
            st.states.entry(round).or_insert_with(|| vec![None; m])[me] = Some(MemberState {
                id: self.spec.members[me].id.clone(),
                step,
                param_hash: param_hash.to_string(),
            });
        }
        let frames: Vec<_> = self
            .others()
            .map(|k| {
                (
                    k,
                    self.frame(
                        step,
                        FrameKind::State,
                        round,
                        0,
                        0,
                        0.0,
                        param_hash.as_bytes().to_vec(),
                    ),
                )
            })
            .collect();
        self.send(frames)?;
        let deadline = tokio::time::Instant::from_std(start + timeout);
        loop {
            {
                let mut st = self.lock();
                if let Some(reason) = &st.aborted {
                    return Err(CollectiveError::Aborted {
                        reason: reason.clone(),
                    });
                }
                let states = st.states.get(&round).cloned().unwrap_or_default();
                if states.iter().all(Option::is_some) {
                    st.states.remove(&round);
                    return Ok(states.into_iter().flatten().collect());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(CollectiveError::Timeout {
                        step,
                        waited_ms: start.elapsed().as_millis() as u64,
                        arrived: states.iter().flatten().count() as u64,
                        expected: states.len() as u64,
                    });
                }
            }
            // The sender lives in `self`, so `changed` only ends by the deadline.
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    /// Ends this communicator's outgoing streams gracefully: no more frames are taken
    /// (later contributions fail), each `Exchange` stream completes once its queue is
    /// drained, and the receivers' replies are awaited, at most `timeout` (then the
    /// streams are cut). Used by a member that leaves after a step, so that everything
    /// it sent is delivered before it exits. Received frames are still taken.
    pub async fn close(&self, timeout: Duration) {
        self.lock().closed = true;
        for link in self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            *link = None;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        if tokio::time::timeout(timeout, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(
                generation = self.spec.generation,
                timeout_ms = timeout.as_millis() as u64,
                "closing the peer streams timed out; cutting them"
            );
            self.cancel.cancel();
        }
    }

    /// Hands one received frame (of this communicator's job and generation) in. A bad
    /// frame from a member aborts the communicator; one from a non-member is only
    /// refused. The error says why it was refused.
    pub(super) fn deliver(&self, frame: PeerFrame) -> Result<(), String> {
        match self.take_frame(&frame) {
            Ok(()) => Ok(()),
            // The frame was taken, but what it made this member send could not be queued.
            Err(FrameError::Send(reason)) => {
                self.abort(&reason);
                Ok(())
            }
            Err(FrameError::Aborted(reason)) => Err(format!("communicator aborted: {reason}")),
            Err(FrameError::Stranger) => Err(format!(
                "frame from {:?}, which is not another member of generation {}: dropped",
                frame.from_member, self.spec.generation
            )),
            Err(FrameError::Protocol(e)) => {
                let reason = format!(
                    "protocol error: frame from {:?} (step {}, kind {}): {e}",
                    frame.from_member, frame.step, frame.kind
                );
                self.abort(&reason);
                Err(reason)
            }
        }
    }

    /// Takes a frame under the state lock. What it makes this member send (reduced
    /// chunks, ring rounds) is queued before the lock is released, so that a step's
    /// result is never visible (and [`Self::close`] never runs) before its forwards are
    /// queued.
    fn take_frame(&self, frame: &PeerFrame) -> Result<(), FrameError> {
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(FrameError::Aborted(reason.clone()));
        }
        let from = self
            .spec
            .members
            .iter()
            .position(|m| m.id == frame.from_member)
            .filter(|&k| k != self.spec.me)
            .ok_or(FrameError::Stranger)?;
        let kind = FrameKind::try_from(frame.kind)
            .map_err(|_| FrameError::Protocol(format!("unknown frame kind {}", frame.kind)))?;
        match kind {
            FrameKind::Unspecified => Err(FrameError::Protocol("frame kind unspecified".into())),
            FrameKind::Boundary => {
                st.stopped_after.insert(from, frame.step);
                // `frame.step` counts the steps the sender completed: the collective step
                // of that index (and every later one) will miss its contributions.
                let open_later = st.steps.keys().any(|&k| k >= frame.step);
                drop(st);
                if open_later {
                    let reason = format!(
                        "member {} stopped this generation after step {} (a newer plan)",
                        frame.from_member, frame.step
                    );
                    self.abort(&reason);
                }
                Ok(())
            }
            FrameKind::Stage => {
                self.take_stage_frame(&mut st, from, frame)
                    .map_err(FrameError::Protocol)?;
                drop(st);
                self.changed.notify_all();
                Ok(())
            }
            FrameKind::State => {
                let hash = String::from_utf8(frame.data.clone())
                    .map_err(|_| FrameError::Protocol("state hash is not UTF-8".into()))?;
                let m = self.spec.members.len();
                if !st.states.contains_key(&frame.index) && st.states.len() >= MAX_STATE_ROUNDS {
                    return Err(FrameError::Protocol(format!(
                        "state round {} would be more than {MAX_STATE_ROUNDS} open rounds",
                        frame.index
                    )));
                }
                let round = st
                    .states
                    .entry(frame.index)
                    .or_insert_with(|| vec![None; m]);
                if round[from].is_some() {
                    return Err(FrameError::Protocol(format!(
                        "state of round {} sent twice",
                        frame.index
                    )));
                }
                round[from] = Some(MemberState {
                    id: frame.from_member.clone(),
                    step: frame.step,
                    param_hash: hash,
                });
                drop(st);
                self.notify.send_modify(|v| *v += 1);
                Ok(())
            }
            _ => {
                let step = frame.step;
                check_step(&st, step).map_err(FrameError::Protocol)?;
                let s = st
                    .steps
                    .entry(step)
                    .or_insert_with(|| StepState::new(&self.geo, step));
                let out = s
                    .frame(
                        &self.geo,
                        from,
                        kind,
                        frame.index,
                        frame.chunk,
                        frame.offset,
                        frame.loss_sum,
                        &frame.data,
                    )
                    .map_err(FrameError::Protocol)?;
                let queued = self.queue(self.encode_all(step, out));
                self.complete_if_done(&mut st, step);
                queued.map_err(FrameError::Send)
            }
        }
    }

    /// Moves a complete step's result to `results` and wakes the waiters.
    fn complete_if_done(&self, st: &mut State, step: u64) {
        let Some(s) = st.steps.get_mut(&step) else {
            return;
        };
        let Some(reduced) = s.finish(&self.geo) else {
            return;
        };
        st.steps.remove(&step);
        st.results.insert(
            step,
            Taken {
                result: Arc::new(reduced),
                takers: 0,
            },
        );
        st.finished_max = Some(st.finished_max.map_or(step, |f| f.max(step)));
        // Results no local rank came for (it failed) do not pile up.
        st.results.retain(|&s, _| s + 2 >= step);
        self.changed.notify_all();
        self.notify.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.spec.members.len()).filter(move |&k| k != self.spec.me)
    }

    #[allow(clippy::too_many_arguments)]
    fn frame(
        &self,
        step: u64,
        kind: FrameKind,
        index: u64,
        chunk: u32,
        offset: u64,
        loss_sum: f64,
        data: Vec<u8>,
    ) -> PeerFrame {
        PeerFrame {
            job: self.spec.job.clone(),
            generation: self.spec.generation,
            from_member: self.spec.members[self.spec.me].id.clone(),
            step,
            kind: kind as i32,
            index,
            chunk,
            offset,
            loss_sum,
            data,
            total: 0,
        }
    }

    /// Cuts `values` into pieces of at most `max_frame_floats` and queues a frame per
    /// piece for every destination.
    #[allow(clippy::too_many_arguments)]
    fn pieces(
        &self,
        step: u64,
        kind: FrameKind,
        index: u64,
        chunk: u32,
        loss_sum: f64,
        values: &[f32],
        dests: &[usize],
        out: &mut Vec<(usize, PeerFrame)>,
    ) {
        let mff = self.spec.max_frame_floats;
        for i in 0..piece_count(values.len(), mff) {
            let offset = i * mff;
            let piece = &values[offset..values.len().min(offset + mff)];
            let mut data = Vec::with_capacity(4 * piece.len());
            for v in piece {
                data.extend_from_slice(&v.to_le_bytes());
            }
            let frame = self.frame(step, kind, index, chunk, offset as u64, loss_sum, data);
            for &d in dests {
                out.push((d, frame.clone()));
            }
        }
    }

    fn encode_all(&self, step: u64, outgoing: Vec<Outgoing>) -> Vec<(usize, PeerFrame)> {
        let mut frames = Vec::new();
        for o in outgoing {
            self.pieces(
                step,
                o.kind,
                o.index,
                o.chunk,
                o.loss_sum,
                &o.values,
                &o.dests,
                &mut frames,
            );
        }
        frames
    }

    /// Queues frames without waiting; a full or gone queue aborts the communicator.
    fn send(&self, frames: Vec<(usize, PeerFrame)>) -> Result<(), CollectiveError> {
        self.queue(frames).map_err(|reason| self.fail(&reason))
    }

    /// The [`Self::exit_during_all_gather`] hook: in its step, keeps only the all-gather
    /// frames to the first other member and exits the process 300 ms later.
    #[cfg(feature = "chaos-hooks")]
    fn exit_if_in_all_gather(
        &self,
        mut frames: Vec<(usize, PeerFrame)>,
    ) -> Vec<(usize, PeerFrame)> {
        let fault = *self
            .exit_in_all_gather
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(step) = fault {
            let gather = |f: &PeerFrame| {
                f.step == step
                    && (f.kind == FrameKind::Reduced as i32
                        || f.kind == FrameKind::RingGather as i32)
            };
            if frames.iter().any(|(_, f)| gather(f)) {
                let first = self.others().next();
                frames.retain(|(d, f)| !gather(f) || Some(*d) == first);
                tracing::warn!(
                    step,
                    "chaos: all-gather sent to one peer only; exiting in 300 ms"
                );
                eprintln!(
                    "chaos: member {} leaves the all-gather of step {step} half done and exits",
                    self.spec.members[self.spec.me].id
                );
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    std::process::exit(86);
                });
            }
        }
        frames
    }

    /// Queues frames without waiting; says why if a queue is full, closed or gone.
    fn queue(&self, frames: Vec<(usize, PeerFrame)>) -> Result<(), String> {
        #[cfg(feature = "chaos-hooks")]
        let frames = self.exit_if_in_all_gather(frames);
        let failure = {
            let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            let mut failure = None;
            for (dest, frame) in frames {
                let peer = &self.spec.members[dest];
                let problem = match links.get(dest).and_then(Option::as_ref) {
                    None => Some(format!(
                        "the stream to peer {} at {} is closed",
                        peer.id, peer.addr
                    )),
                    Some(tx) => match tx.try_send(frame) {
                        Ok(()) => None,
                        Err(TrySendError::Full(_)) => Some(format!(
                            "the send queue to peer {} at {} is full ({} frames, two steps' \
                             worth): the peer is not keeping up",
                            peer.id, peer.addr, self.queue_bounds[dest]
                        )),
                        Err(TrySendError::Closed(_)) => Some(format!(
                            "the stream to peer {} at {} has ended",
                            peer.id, peer.addr
                        )),
                    },
                };
                if problem.is_some() {
                    failure = problem;
                    break;
                }
            }
            failure
        };
        match failure {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }

    /// Aborts with `reason` (unless already aborted) and returns the abort error with
    /// the first reason.
    fn fail(&self, reason: &str) -> CollectiveError {
        self.abort(reason);
        CollectiveError::Aborted {
            reason: self.aborted().unwrap_or_else(|| reason.to_string()),
        }
    }
}

impl Drop for GrpcCollective {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

enum FrameError {
    /// The communicator was aborted before: refused, nothing else happens.
    Aborted(String),
    /// A bad frame: refused, and the communicator aborts.
    Protocol(String),
    /// Taken, but its consequences could not be queued: the communicator aborts.
    Send(String),
    /// From a sender that is not another member of the generation (a frame it buffered
    /// before it learnt the plan, or a stranger's): refused and counted, nothing else
    /// happens, so that no outsider can abort a generation.
    Stranger,
}

/// Frames and contributions are taken for steps not yet reduced and at most two ahead
/// of the oldest step not reduced.
fn check_step(st: &State, step: u64) -> Result<(), String> {
    if let Some(f) = st.finished_max {
        if step <= f {
            return Err(format!("step {step} is already reduced"));
        }
    }
    let base = st
        .finished_max
        .map(|f| f + 1)
        .or_else(|| st.steps.keys().next().copied());
    if let Some(b) = base {
        if step > b.saturating_add(2) {
            return Err(format!(
                "step {step} is more than two steps ahead of step {b}"
            ));
        }
    }
    Ok(())
}

impl GrpcCollective {
    /// LOSS frames carrying local slot `slot`'s loss sum to every other member.
    fn loss_frames(&self, step: u64, slot: u64, loss: f32) -> Vec<(usize, PeerFrame)> {
        let frame = self.frame(
            step,
            FrameKind::Loss,
            slot,
            0,
            0,
            f64::from(loss),
            Vec::new(),
        );
        self.others().map(|k| (k, frame.clone())).collect()
    }

    /// The state, locked, with `step` open for local slot `slot`: refused if the
    /// communicator is aborted or closed, the step is out of the window, a member stopped
    /// before it, or the slot was handed in already.
    fn open_for_local(
        &self,
        step: u64,
        slot: u64,
    ) -> Result<MutexGuard<'_, State>, CollectiveError> {
        let bad = |reason: String| CollectiveError::BadContribution { step, reason };
        let mut st = self.lock();
        if let Some(reason) = &st.aborted {
            return Err(CollectiveError::Aborted {
                reason: reason.clone(),
            });
        }
        if st.closed {
            return Err(CollectiveError::Aborted {
                reason: "the communicator is closed".into(),
            });
        }
        check_step(&st, step).map_err(bad)?;
        if let Some(reason) = self.stopped_before(&st, step) {
            drop(st);
            return Err(self.fail(&reason));
        }
        let s = st
            .steps
            .entry(step)
            .or_insert_with(|| StepState::new(&self.geo, step));
        if s.has_local(slot) {
            return Err(bad(format!("slot {slot} contributed twice")));
        }
        Ok(st)
    }
}

/// Most messages between pipeline stages held at once (being assembled or not yet
/// taken), beyond the slots of two steps.
const STAGE_MSG_SLACK: usize = 16;

impl GrpcCollective {
    /// A STAGE frame into the stage mailbox (under the state lock).
    fn take_stage_frame(&self, st: &mut State, from: usize, f: &PeerFrame) -> Result<(), String> {
        let which = StageMessage::from_code(f.chunk)
            .ok_or_else(|| format!("unknown stage message {}", f.chunk))?;
        let total = usize::try_from(f.total).map_err(|_| "stage message too long".to_string())?;
        // A slot's activations are at most a micro-batch's: bounded by the frame limit
        // times the pieces of a message the hub could ever hold.
        if total > 64 * self.spec.max_frame_floats || !f.data.len().is_multiple_of(4) {
            return Err(format!(
                "stage message of {total} values, piece of {} bytes",
                f.data.len()
            ));
        }
        let key = (which, f.step, f.index);
        let bound = 6 * self.geo.num_slots as usize + STAGE_MSG_SLACK;
        if !st.stage_msgs.contains_key(&key) && st.stage_msgs.len() >= bound {
            return Err(format!(
                "more than {bound} stage messages held: the receiving stage is not taking them"
            ));
        }
        let msg = st.stage_msgs.entry(key).or_insert_with(|| StageMsg {
            from,
            values: vec![0.0; total],
            offsets: Default::default(),
            filled: 0,
        });
        if msg.from != from || msg.values.len() != total || msg.complete() {
            return Err(format!(
                "{} of step {} slot {} sent twice or by two members",
                which.as_str(),
                f.step,
                f.index
            ));
        }
        let offset = usize::try_from(f.offset).unwrap_or(usize::MAX);
        let n = f.data.len() / 4;
        let end = offset.checked_add(n).filter(|&e| e <= total);
        let Some(end) = end else {
            return Err(format!(
                "a piece at {offset} of a message of {total} values"
            ));
        };
        if (n == 0 && total != 0) || !msg.offsets.insert(f.offset) {
            return Err(format!("a piece at {offset} arrived twice or is empty"));
        }
        for (v, b) in msg.values[offset..end]
            .iter_mut()
            .zip(f.data.chunks_exact(4))
        {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        msg.filled += n;
        Ok(())
    }

    /// Sends `values` as message `which` of (`step`, `slot`) to member `to` (another
    /// pipeline stage). Never waits: the frames go to the bounded send queue, and a full
    /// queue aborts the communicator as for gradients.
    pub fn send_stage(
        &self,
        to: usize,
        which: StageMessage,
        step: u64,
        slot: u64,
        values: &[f32],
    ) -> Result<(), CollectiveError> {
        if to == self.spec.me || to >= self.spec.members.len() {
            return Err(CollectiveError::BadContribution {
                step,
                reason: format!("a stage message to member index {to}"),
            });
        }
        if let Some(reason) = &self.lock().aborted {
            return Err(CollectiveError::Aborted {
                reason: reason.clone(),
            });
        }
        let mut frames = Vec::new();
        self.pieces(
            step,
            FrameKind::Stage,
            slot,
            which as u32,
            0.0,
            values,
            &[to],
            &mut frames,
        );
        for (_, f) in &mut frames {
            f.total = values.len() as u64;
        }
        self.send(frames)
    }

    /// Waits, at most `timeout`, for message `which` of (`step`, `slot`) from member
    /// `from` and takes it. Fails at once when the communicator is aborted.
    pub fn recv_stage(
        &self,
        from: usize,
        which: StageMessage,
        step: u64,
        slot: u64,
        timeout: Duration,
    ) -> Result<Vec<f32>, CollectiveError> {
        let start = Instant::now();
        let key = (which, step, slot);
        let mut st = self.lock();
        loop {
            if let Some(reason) = &st.aborted {
                return Err(CollectiveError::Aborted {
                    reason: reason.clone(),
                });
            }
            if st.stage_msgs.get(&key).is_some_and(StageMsg::complete) {
                let msg = st.stage_msgs.remove(&key).expect("present");
                if msg.from != from {
                    let reason = format!(
                        "{} of step {step} slot {slot} came from member {}, expected {}",
                        which.as_str(),
                        self.spec.members[msg.from].id,
                        self.spec.members[from].id
                    );
                    drop(st);
                    return Err(self.fail(&reason));
                }
                return Ok(msg.values);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(CollectiveError::Timeout {
                    step,
                    waited_ms: waited.as_millis() as u64,
                    arrived: 0,
                    expected: 1,
                });
            }
            st = self
                .changed
                .wait_timeout(st, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// True if message `which` of (`step`, `slot`) is complete and waiting.
    pub fn has_stage(&self, which: StageMessage, step: u64, slot: u64) -> bool {
        self.lock()
            .stage_msgs
            .get(&(which, step, slot))
            .is_some_and(StageMsg::complete)
    }

    /// A stage part of a slot (see [`crate::StagePart`]): `c.grad` holds the values of the
    /// part's ranges, concatenated; `c.loss_sum` counts only from the head stage.
    fn contribute_part(&self, step: u64, c: SlotContribution) -> Result<(), CollectiveError> {
        let bad = |reason: String| CollectiveError::BadContribution { step, reason };
        let want = self.geo.part.as_ref().map_or(0, |p| p.len());
        if c.grad.len() != want {
            return Err(bad(format!(
                "slot {} has {} gradient values, the stage part {want}",
                c.slot,
                c.grad.len()
            )));
        }
        if !self.geo.is_mine(c.slot) {
            return Err(bad(format!(
                "slot {} is not computed by member {} (local ranks {:?})",
                c.slot, self.spec.members[self.spec.me].id, self.spec.local_ranks
            )));
        }
        let (slot, grad) = (c.slot, &c.grad);
        let loss = self.geo.gives_loss().then_some(c.loss_sum);
        let out = {
            let mut st = self.open_for_local(step, slot)?;
            let s = st.steps.get_mut(&step).expect("opened for the slot");
            let segments = self
                .geo
                .part_segments(self.spec.me)
                .into_iter()
                .map(|(r, offset)| (offset, &grad[r]))
                .collect();
            let out = s.local_part(&self.geo, slot, loss, segments).map_err(bad)?;
            self.complete_if_done(&mut st, step);
            out
        };
        let mut frames = Vec::new();
        let others: Vec<usize> = self.others().collect();
        if let Some(loss) = loss {
            frames.extend(self.loss_frames(step, slot, loss));
        }
        let mff = self.spec.max_frame_floats;
        for &k in &others {
            for (r, offset) in self.geo.part_segments(k) {
                let values = &grad[r];
                for i in 0..values.len().div_ceil(mff) {
                    let piece = &values[i * mff..values.len().min((i + 1) * mff)];
                    let mut data = Vec::with_capacity(4 * piece.len());
                    for v in piece {
                        data.extend_from_slice(&v.to_le_bytes());
                    }
                    let at = (offset + i * mff) as u64;
                    frames.push((
                        k,
                        self.frame(step, FrameKind::Slot, slot, k as u32, at, 0.0, data),
                    ));
                }
            }
        }
        frames.extend(self.encode_all(step, out));
        self.send(frames)
    }
}

impl Collective for GrpcCollective {
    fn contribute(&self, step: u64, c: SlotContribution) -> Result<(), CollectiveError> {
        let bad = |reason: String| CollectiveError::BadContribution { step, reason };
        if self.geo.part.is_some() {
            return self.contribute_part(step, c);
        }
        if c.grad.len() != self.geo.p {
            return Err(bad(format!(
                "slot {} has {} gradient values, expected {}",
                c.slot,
                c.grad.len(),
                self.geo.p
            )));
        }
        if !self.geo.is_mine(c.slot) {
            return Err(bad(format!(
                "slot {} is not computed by member {} (local ranks {:?})",
                c.slot, self.spec.members[self.spec.me].id, self.spec.local_ranks
            )));
        }
        let SlotContribution {
            slot,
            loss_sum,
            grad,
        } = c;
        let (local, grad) = match self.geo.reduction {
            Reduction::Exact => (grad[self.geo.chunk(self.spec.me)].to_vec(), grad),
            Reduction::Ring => (grad, Vec::new()),
        };
        let out = {
            let mut st = self.open_for_local(step, slot)?;
            let s = st.steps.get_mut(&step).expect("opened for the slot");
            let out = s.local(&self.geo, slot, loss_sum, local).map_err(bad)?;
            self.complete_if_done(&mut st, step);
            out
        };
        let mut frames = Vec::new();
        let others: Vec<usize> = self.others().collect();
        frames.extend(self.loss_frames(step, slot, loss_sum));
        if self.geo.reduction == Reduction::Exact {
            for &k in &others {
                self.pieces(
                    step,
                    FrameKind::Slot,
                    slot,
                    k as u32,
                    f64::from(loss_sum),
                    &grad[self.geo.chunk(k)],
                    &[k],
                    &mut frames,
                );
            }
        }
        frames.extend(self.encode_all(step, out));
        self.send(frames)
    }

    fn reduced(&self, step: u64, timeout: Duration) -> Result<Arc<Reduced>, CollectiveError> {
        let start = Instant::now();
        let mut st = self.lock();
        loop {
            if let Some(reason) = &st.aborted {
                return Err(CollectiveError::Aborted {
                    reason: reason.clone(),
                });
            }
            if let Some(reason) = self.stopped_before(&st, step) {
                if !st.results.contains_key(&step) {
                    drop(st);
                    return Err(self.fail(&reason));
                }
            }
            if let Some(t) = st.results.get_mut(&step) {
                let result = Arc::clone(&t.result);
                t.takers += 1;
                if t.takers >= self.spec.local_ranks.len() {
                    st.results.remove(&step);
                }
                return Ok(result);
            }
            if st.finished_max.is_some_and(|f| step <= f) {
                return Err(CollectiveError::BadContribution {
                    step,
                    reason: format!(
                        "step {step} was reduced and its result taken by every local rank"
                    ),
                });
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(CollectiveError::Timeout {
                    step,
                    waited_ms: waited.as_millis() as u64,
                    arrived: st.steps.get(&step).map_or(0, StepState::losses_in),
                    expected: self.geo.num_slots,
                });
            }
            // Counted under the lock, which the wait releases: whoever sees the count
            // and then takes the lock to change the state wakes this thread.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            st = self
                .changed
                .wait_timeout(st, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn abort(&self, reason: &str) {
        {
            let mut st = self.lock();
            if st.aborted.is_none() {
                tracing::warn!(
                    generation = self.spec.generation,
                    me = %self.spec.members[self.spec.me].id,
                    reason,
                    "peer collective aborted"
                );
                st.aborted = Some(reason.to_string());
            }
        }
        self.changed.notify_all();
        self.notify.send_modify(|v| *v += 1);
        self.cancel.cancel();
    }
}

/// The sending side towards one peer: connect, then one `Exchange` stream fed from the
/// queue until the queue is closed (graceful end) or the communicator is cancelled.
struct Link {
    comm: Weak<GrpcCollective>,
    peer: PeerAddr,
    connect_deadline: Duration,
    message_limit: usize,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    tls: Option<crate::tls::Tls>,
}

impl Link {
    async fn run(self, rx: mpsc::Receiver<PeerFrame>) {
        let result = tokio::select! {
            _ = self.cancel.cancelled() => return,
            r = self.stream(rx) => r,
        };
        match result {
            Ok(reply) if reply.refused_stale + reply.refused_other > 0 => tracing::warn!(
                peer = %self.peer.id,
                accepted = reply.accepted,
                refused_stale = reply.refused_stale,
                refused_other = reply.refused_other,
                "peer refused some frames"
            ),
            Ok(reply) => {
                tracing::debug!(
                    peer = %self.peer.id,
                    accepted = reply.accepted,
                    "peer stream closed"
                )
            }
            Err(e) => {
                if let Some(comm) = self.comm.upgrade() {
                    comm.peer_failed(&self.peer.id, &e);
                    comm.abort(&format!("peer {} at {}: {e}", self.peer.id, self.peer.addr));
                }
            }
        }
    }

    async fn stream(&self, rx: mpsc::Receiver<PeerFrame>) -> Result<ExchangeReply, String> {
        let channel = self.connect().await?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit);
        let counters = Arc::clone(&self.counters);
        let frames = ReceiverStream::new(rx).map(move |f| {
            counters
                .bytes_sent
                .fetch_add(f.encoded_len() as u64, Ordering::Relaxed);
            f
        });
        client
            .exchange(frames)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("the stream failed: {} ({:?})", s.message(), s.code()))
    }

    /// Connects, retrying with backoff until the connect deadline.
    async fn connect(&self) -> Result<Channel, String> {
        let endpoint = super::peer_endpoint(&self.peer, self.tls.as_ref())?.connect_timeout(
            self.connect_deadline
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match endpoint.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    if attempt >= MAX_CONNECT_ATTEMPTS
                        || start.elapsed() + delay >= self.connect_deadline
                    {
                        return Err(format!(
                            "could not connect after {attempt} attempts in {} ms: {}",
                            start.elapsed().as_millis(),
                            error_chain(&e)
                        ));
                    }
                    tracing::debug!(
                        peer = %self.peer.id,
                        attempt,
                        error = %error_chain(&e),
                        "connect failed; retrying"
                    );
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// An error and its sources, `: `-separated.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

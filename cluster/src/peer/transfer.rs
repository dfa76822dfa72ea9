//! State transfer: a member that lacks the group's training state (it (re)joins, or ended
//! up behind after a failure) takes parameters and optimizer state from a live peer, the
//! donor, over the `FetchState` rpc of the peer data plane (never from S3).
//!
//! The donor publishes its state for a generation ([`PeerHub::publish_state`]); the
//! requester calls [`fetch_state`]. The donor's hub answers a request of its job and
//! of the published generation whose step (and parameter hash, if given) match with a
//! stream of [`StateChunk`]s: the parameters, then Adam's `m`, then Adam's `v`, each in
//! order of offset in pieces of at most [`STATE_CHUNK_FLOATS`] values (and at most the
//! hub's `max_frame_floats`). The first chunk carries the [`StateHeader`], the last a
//! checksum of every data byte sent ([`PayloadSum`], Fletcher-64: memory speed; the
//! parameters' SHA-256 is checked by the caller against the one it expected). A request of a generation not published yet waits
//! for it (at most `min(wait_ms, 60 s)`, then `NOT_FOUND`); an older generation, another
//! job or another step or hash are refused with `FAILED_PRECONDITION`.
//!
//! The donor builds chunks (little-endian bytes, hashed as they are written) on a
//! blocking thread and hands them to the response stream through a queue of
//! [`CHUNKS_IN_FLIGHT`] chunks, so a transfer holds a bounded amount of memory besides
//! the published [`StateSnapshot`] (shared, not copied). The payload's checksum depends
//! only on the state, so the first transfer of a publication computes it and later
//! ones reuse it. The requester checks each chunk's place as it arrives and hands its
//! data to two blocking threads, one hashing it in order and one decoding it into the
//! tensors, so that receiving, hashing and decoding overlap (queues of
//! [`CHUNKS_IN_FLIGHT`] chunks each).

use super::comm::error_chain;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use tenax_proto::v1::peer_client::PeerClient;
use tenax_proto::v1::{StateChunk, StateHeader, StateRequest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use super::hub::{Counters, PeerHub};
use super::{message_limit_bytes, PeerAddr};

/// Most values one [`StateChunk`] carries (4 MiB of data); a hub with a smaller
/// [`HubConfig::max_frame_floats`](super::HubConfig::max_frame_floats) sends that many.
pub const STATE_CHUNK_FLOATS: usize = 1 << 20;

/// Chunks a donor builds ahead of the response stream, per transfer.
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// Longest a donor waits for a publication of the requested generation.
pub const MAX_PUBLICATION_WAIT: Duration = Duration::from_secs(60);

/// Bytes the donor converts, then hashes, in one go (they stay in cache between the two).
const BLOCK_BYTES: usize = 64 << 10;

/// The stream of chunks the hub answers `FetchState` with.
pub(super) type ChunkStream = BoxStream<'static, Result<StateChunk, Status>>;

/// A member's whole training state, as it travels between peers.
#[derive(Clone, PartialEq)]
pub struct StateSnapshot {
    /// The step the state is at (the step its owner runs next).
    pub step: u64,
    /// The data cursor that goes with it.
    pub cursor: u64,
    /// The optimizer's step count (Adam's bias correction).
    pub opt_step: u64,
    /// Hex SHA-256 of `params` (as the trainer computes it; not recomputed here).
    pub param_hash: String,
    /// The flat parameters.
    pub params: Vec<f32>,
    /// Adam's first moment, as long as `params`.
    pub m: Vec<f32>,
    /// Adam's second moment, as long as `params`.
    pub v: Vec<f32>,
    /// What the owner carries with the tensors besides them, opaque here: the training
    /// guard's state (JSON; empty: none). It travels in the [`StateHeader`] and comes
    /// back bit for bit.
    pub guard_state: Vec<u8>,
}

impl std::fmt::Debug for StateSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSnapshot")
            .field("step", &self.step)
            .field("cursor", &self.cursor)
            .field("opt_step", &self.opt_step)
            .field("param_hash", &self.param_hash)
            .field("params", &self.params.len())
            .field("m", &self.m.len())
            .field("v", &self.v.len())
            .field("guard_state", &self.guard_state.len())
            .finish()
    }
}

impl StateSnapshot {
    pub(super) fn tensors(&self) -> [&[f32]; 3] {
        [&self.params, &self.m, &self.v]
    }

    pub(super) fn header(&self) -> StateHeader {
        StateHeader {
            step: self.step,
            cursor: self.cursor,
            opt_step: self.opt_step,
            param_hash: self.param_hash.clone(),
            num_params: self.params.len() as u64,
            guard_state: self.guard_state.clone(),
        }
    }
}

/// How a fetch went.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransferStats {
    /// Data bytes received (4 per value, three tensors).
    pub bytes: u64,
    /// Wall time of the whole fetch, connect and the donor's wait included.
    pub seconds: f64,
    /// Chunks received.
    pub chunks: u64,
}

impl TransferStats {
    /// Throughput in GB/s (10^9 bytes), 0 for a fetch that took no time.
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// Why a [`fetch_state`] failed. Every message names the donor (`id at host:port`).
#[derive(thiserror::Error, Debug)]
pub enum TransferError {
    /// The donor could not be reached before the deadline.
    #[error("state transfer from {donor}: connect failed after {attempts} attempts in {ms} ms: {reason}")]
    Connect {
        /// The donor, `id at host:port`.
        donor: String,
        /// Connect attempts made.
        attempts: u32,
        /// Time spent trying.
        ms: u64,
        /// The last attempt's error.
        reason: String,
    },
    /// The donor answered the request with an error status (another job, a stale
    /// generation, another step or hash, nothing published, shutting down).
    #[error("state transfer from {donor}: refused: {code:?}: {message}")]
    Refused {
        /// The donor, `id at host:port`.
        donor: String,
        /// The status code (`FailedPrecondition`, `NotFound`, `Unavailable`, ...).
        code: Code,
        /// The status message.
        message: String,
    },
    /// The stream broke after it started.
    #[error("state transfer from {donor}: stream failed after {got} bytes: {code:?}: {message}")]
    Stream {
        /// The donor, `id at host:port`.
        donor: String,
        /// Data bytes received before the failure.
        got: u64,
        /// The status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// The header does not describe the requested state.
    #[error("state transfer from {donor}: bad header: {reason}")]
    BadHeader {
        /// The donor, `id at host:port`.
        donor: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk that does not fit (order, offset, bounds, size) or a stream that ends
    /// early.
    #[error("state transfer from {donor}: bad chunk {index}: {reason}")]
    BadChunk {
        /// The donor, `id at host:port`.
        donor: String,
        /// The chunk's index in the stream (0-based).
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// The data received does not hash to the checksum of the last chunk.
    #[error("state transfer from {donor}: checksum mismatch: the donor sent {expected}, the data hashes to {actual}")]
    Checksum {
        /// The donor, `id at host:port`.
        donor: String,
        /// The checksum the donor sent.
        expected: String,
        /// The checksum of the data received.
        actual: String,
    },
    /// The whole fetch took longer than its timeout.
    #[error("state transfer from {donor}: timed out after {ms} ms with {got} of {} bytes",
        .total.map_or_else(|| "an unknown number of".to_string(), |t| t.to_string()))]
    TimedOut {
        /// The donor, `id at host:port`.
        donor: String,
        /// The timeout.
        ms: u64,
        /// Data bytes received.
        got: u64,
        /// Data bytes expected (`None` before the header arrived).
        total: Option<u64>,
    },
}

/// A published state, as the hub holds it.
pub(super) struct Published {
    /// The generation whose requests it answers.
    pub(super) generation: u64,
    /// The state.
    pub(super) state: Arc<StateSnapshot>,
    /// The members it is served to; `None`: any member of the job.
    receivers: Option<Vec<String>>,
    /// Complete transfers served.
    pub(super) served: watch::Sender<u64>,
    /// The payload checksum, once a transfer computed it.
    pub(super) payload_checksum: OnceLock<String>,
}

/// Handle of a published state: served to `FetchState` requests of its generation until
/// dropped (drop withdraws it, unless a newer publication already replaced it;
/// transfers already streaming finish from their own reference to the state).
pub struct Publication {
    hub: PeerHub,
    entry: Arc<Published>,
}

impl std::fmt::Debug for Publication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publication")
            .field("generation", &self.entry.generation)
            .field("state", &self.entry.state)
            .field("served", &self.served())
            .finish()
    }
}

impl Publication {
    /// The generation whose requests it answers.
    pub fn generation(&self) -> u64 {
        self.entry.generation
    }

    /// The published state.
    pub fn state(&self) -> &Arc<StateSnapshot> {
        &self.entry.state
    }

    /// How many complete transfers were served so far (a transfer counts once its last
    /// chunk was handed to the response stream).
    pub fn served(&self) -> u64 {
        *self.entry.served.borrow()
    }

    /// Waits until `n` complete transfers were served, at most `timeout`; on timeout
    /// the error says how many of `n` were.
    pub async fn wait_served(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let mut rx = self.entry.served.subscribe();
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|&s| s >= n)).await,
            Ok(Ok(_))
        );
        if reached {
            Ok(())
        } else {
            Err(format!(
                "{} of {n} state transfers of generation {} served within {} ms",
                self.served(),
                self.entry.generation,
                timeout.as_millis()
            ))
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        self.hub.publication().send_if_modified(|current| {
            if current
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &self.entry))
            {
                *current = None;
                true
            } else {
                false
            }
        });
    }
}

impl PeerHub {
    /// Publishes `state` for `FetchState` requests of `generation`, replacing any earlier
    /// publication (requests of an older generation are then refused as stale; requests
    /// waiting for this generation are answered now). `params`, `m` and `v` must be
    /// equally long (requests for a state that is not are refused with `INTERNAL`).
    pub fn publish_state(&self, generation: u64, state: Arc<StateSnapshot>) -> Publication {
        self.publish(generation, state, None)
    }

    /// [`PeerHub::publish_state`], served only to the members `receivers`: a request
    /// from another member is refused (`PERMISSION_DENIED`) and counted.
    pub fn publish_state_for(
        &self,
        generation: u64,
        state: Arc<StateSnapshot>,
        receivers: Vec<String>,
    ) -> Publication {
        self.publish(generation, state, Some(receivers))
    }

    fn publish(
        &self,
        generation: u64,
        state: Arc<StateSnapshot>,
        receivers: Option<Vec<String>>,
    ) -> Publication {
        if state.m.len() != state.params.len() || state.v.len() != state.params.len() {
            tracing::error!(
                generation,
                params = state.params.len(),
                m = state.m.len(),
                v = state.v.len(),
                "published state has tensors of different lengths; requests will be refused"
            );
        }
        let entry = Arc::new(Published {
            generation,
            state,
            receivers,
            served: watch::channel(0).0,
            payload_checksum: OnceLock::new(),
        });
        self.publication().send_replace(Some(Arc::clone(&entry)));
        tracing::debug!(generation, step = entry.state.step, "state published");
        Publication {
            hub: self.clone(),
            entry,
        }
    }

    /// The generation of the current state publication, if any.
    pub fn published_generation(&self) -> Option<u64> {
        self.publication().borrow().as_ref().map(|p| p.generation)
    }

    /// Data bytes of state served to peers (`FetchState` answers).
    pub fn state_bytes_served(&self) -> u64 {
        self.counters().state_bytes_served.load(Ordering::Relaxed)
    }

    /// Data bytes of state received from peers ([`fetch_state`] on this hub).
    pub fn state_bytes_fetched(&self) -> u64 {
        self.counters().state_bytes_fetched.load(Ordering::Relaxed)
    }
}

fn failed_precondition(msg: String) -> Status {
    Status::failed_precondition(msg)
}

/// A `FetchState` request the donor accepted: the state to send, and a transfer slot held
/// until it is sent (or abandoned).
pub(super) struct Admitted {
    /// The publication it is served from.
    pub(super) published: Arc<Published>,
    /// The slot of [`HubConfig::max_state_transfers`](super::HubConfig) it holds.
    pub(super) permit: tokio::sync::OwnedSemaphorePermit,
    /// Values per chunk.
    pub(super) chunk_floats: usize,
    /// The requesting member.
    pub(super) to: String,
}

/// Checks one `FetchState` request (whichever path it came by: gRPC or the state stream)
/// against the hub: its job, its generation (waiting for a publication of it, at most
/// `min(wait_ms, 60 s)`), the receivers of the publication, the transfer slots, the step
/// and hash, and takes a transfer slot. The caller checked the requester's certificate.
pub(super) async fn admit(hub: &PeerHub, req: StateRequest) -> Result<Admitted, Status> {
    if req.job != hub.job() {
        return Err(failed_precondition(format!(
            "job {:?} but this donor serves job {:?}",
            req.job,
            hub.job()
        )));
    }
    let shutdown = hub.shutdown_token().clone();
    let wait = Duration::from_millis(req.wait_ms).min(MAX_PUBLICATION_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = hub.publication().subscribe();
    let published = loop {
        if shutdown.is_cancelled() {
            return Err(Status::unavailable("peer hub is shutting down"));
        }
        let current = rx.borrow_and_update().clone();
        match current {
            Some(p) if p.generation == req.generation => break p,
            Some(p) if p.generation > req.generation => {
                return Err(failed_precondition(format!(
                    "stale request: generation {} is older than the published generation {}",
                    req.generation, p.generation
                )))
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                return Err(Status::unavailable("peer hub is shutting down"));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Status::not_found(format!(
                    "no state published for generation {} within {} ms",
                    req.generation,
                    wait.as_millis()
                )));
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("peer hub is gone"));
                }
            }
        }
    };
    if let Some(to) = published
        .receivers
        .as_ref()
        .filter(|r| !r.contains(&req.from_member))
    {
        Counters::add(&hub.counters().state_refused, 1);
        return Err(Status::permission_denied(format!(
            "member {:?} is not among the receivers of generation {}'s state ({})",
            req.from_member,
            req.generation,
            to.join(", ")
        )));
    }
    // At most `max_state_transfers` at once; the permit goes with the response stream.
    let Ok(permit) = Arc::clone(hub.transfer_slots()).try_acquire_owned() else {
        Counters::add(&hub.counters().state_refused, 1);
        return Err(Status::resource_exhausted(format!(
            "this donor already serves {} state transfers: try again",
            hub.config().max_state_transfers
        )));
    };
    let state = &published.state;
    if state.step != req.step {
        return Err(failed_precondition(format!(
            "the state of generation {} is at step {}, not the requested step {}",
            req.generation, state.step, req.step
        )));
    }
    if !req.param_hash.is_empty() && state.param_hash != req.param_hash {
        return Err(failed_precondition(format!(
            "the state of generation {} has param_hash {}, not the requested {}",
            req.generation, state.param_hash, req.param_hash
        )));
    }
    let n = state.params.len();
    if state.m.len() != n || state.v.len() != n {
        return Err(Status::internal(format!(
            "the published state is inconsistent: {n} params, {} m, {} v",
            state.m.len(),
            state.v.len()
        )));
    }
    let chunk_floats = STATE_CHUNK_FLOATS.min(hub.config().max_frame_floats).max(1);
    Ok(Admitted {
        published,
        permit,
        chunk_floats,
        to: req.from_member,
    })
}

/// The hub's answer to one `FetchState` request over gRPC.
pub(super) async fn serve(
    hub: &PeerHub,
    req: StateRequest,
) -> Result<Response<ChunkStream>, Status> {
    let Admitted {
        published,
        permit,
        chunk_floats,
        to,
    } = admit(hub, req).await?;
    let shutdown = hub.shutdown_token().clone();
    let (tx, chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let producer = Producer {
        published,
        chunk_floats,
        to,
        counters: hub.counters(),
        shutdown: shutdown.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    tokio::task::spawn_blocking(move || producer.run(tx));
    let stream = until_shutdown(chunks, shutdown).map(move |c| {
        let _held = &permit;
        c
    });
    Ok(Response::new(stream.boxed()))
}

/// The chunks of `chunks` until the producer is done, or an `UNAVAILABLE` status and the
/// end as soon as the hub shuts down.
fn until_shutdown(
    chunks: mpsc::Receiver<Result<StateChunk, Status>>,
    shutdown: CancellationToken,
) -> ChunkStream {
    futures::stream::unfold(Some((chunks, shutdown)), |st| async move {
        let (mut chunks, shutdown) = st?;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                Some((Err(Status::unavailable("peer hub is shutting down")), None))
            }
            next = chunks.recv() => next.map(|c| (c, Some((chunks, shutdown)))),
        }
    })
    .boxed()
}

/// Builds one transfer's chunks on a blocking thread (conversion and hashing are CPU
/// work) and hands them to the response stream.
struct Producer {
    published: Arc<Published>,
    chunk_floats: usize,
    to: String,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
}

impl Producer {
    fn run(self, tx: mpsc::Sender<Result<StateChunk, Status>>) {
        let started = Instant::now();
        let state = &self.published.state;
        let tensors = state.tensors();
        let mut pieces: Vec<(u32, usize, usize)> = Vec::new();
        for (t, values) in tensors.iter().enumerate() {
            for start in (0..values.len()).step_by(self.chunk_floats) {
                let end = (start + self.chunk_floats).min(values.len());
                pieces.push((t as u32, start, end));
            }
        }
        if pieces.is_empty() {
            // An empty state still travels as one chunk: header and checksum.
            pieces.push((0, 0, 0));
        }
        // The payload's checksum only depends on the state: computed by the first
        // transfer, reused by the next ones.
        let known = self.published.payload_checksum.get().cloned();
        let mut hasher = PayloadSum::default();
        let mut bytes = 0u64;
        let last = pieces.len() - 1;
        for (i, &(t, start, end)) in pieces.iter().enumerate() {
            if self.shutdown.is_cancelled() {
                return;
            }
            let data = encode_and_hash(
                &tensors[t as usize][start..end],
                known.is_none().then_some(&mut hasher),
            );
            let len = data.len() as u64;
            let chunk = StateChunk {
                header: (i == 0).then(|| state.header()),
                tensor: t,
                offset: start as u64,
                data,
                payload_checksum: if i == last {
                    known.clone().unwrap_or_else(|| {
                        let sum = hasher.finalize_reset();
                        let _ = self.published.payload_checksum.set(sum.clone());
                        sum
                    })
                } else {
                    String::new()
                },
            };
            let permit = self.runtime.block_on(async {
                tokio::select! {
                    _ = self.shutdown.cancelled() => None,
                    p = tx.reserve() => p.ok(),
                }
            });
            let Some(permit) = permit else {
                tracing::debug!(
                    to = %self.to,
                    generation = self.published.generation,
                    bytes,
                    "state transfer abandoned (requester gone or hub shutting down)"
                );
                return;
            };
            bytes += len;
            Counters::add(&self.counters.state_bytes_served, len);
            if i == last {
                self.published.served.send_modify(|n| *n += 1);
            }
            permit.send(Ok(chunk));
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            to = %self.to,
            generation = self.published.generation,
            step = state.step,
            bytes,
            chunks = pieces.len(),
            seconds,
            "state served"
        );
    }
}

/// `values` as little-endian bytes, fed to `hasher` (if any) as they are written.
fn encode_and_hash(values: &[f32], hasher: Option<&mut PayloadSum>) -> Vec<u8> {
    let mut data = Vec::new();
    encode_and_hash_into(values, hasher, &mut data);
    data
}

/// [`encode_and_hash`] into `data` (its old content replaced; its allocation reused).
pub(super) fn encode_and_hash_into(
    values: &[f32],
    mut hasher: Option<&mut PayloadSum>,
    data: &mut Vec<u8>,
) {
    // Every byte is overwritten below: only new room is zeroed.
    data.truncate(values.len() * 4);
    data.resize(values.len() * 4, 0);
    for (block, vals) in data
        .chunks_mut(BLOCK_BYTES)
        .zip(values.chunks(BLOCK_BYTES / 4))
    {
        for (dst, v) in block.chunks_exact_mut(4).zip(vals) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&*block);
        }
    }
}

/// Lanes of [`PayloadSum::update`].
const SUM_LANES: usize = 8;

/// [`decode`] and [`PayloadSum::update`] over `data` in blocks of [`BLOCK_BYTES`], each
/// summed while it is still in cache (one pass over the received bytes, not two).
pub(super) fn decode_and_sum(data: &[u8], out: &mut Vec<f32>, sum: &mut PayloadSum) {
    for block in data.chunks(BLOCK_BYTES) {
        sum.update(block);
        decode(block, out);
    }
}

/// Appends the little-endian f32 values of `data` (a multiple of 4 bytes) to `out`.
pub(super) fn decode(data: &[u8], out: &mut Vec<f32>) {
    out.extend(
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

/// Fetches the state `donor` published for `generation`, as member `me` of `hub`'s job.
///
/// Connects (retrying until the deadline, with the peer data plane's large HTTP/2
/// windows and the hub's message size limit), asks for the state at `want_step` with
/// parameter hash `want_hash` (`""`: any), and checks what comes: the header (`step ==
/// want_step`, the hash unless `want_hash` is empty, a parameter count it can hold),
/// every chunk (in order, each tensor contiguous from offset 0, within bounds, whole
/// values), all three tensors complete, and the payload checksum. The donor may
/// wait for the publication for the time left after the connect less a margin (a
/// quarter of it, at most 2 s), and at most 60 s, so that "nothing published" comes
/// back as a `NOT_FOUND` refusal rather than a timeout; the whole fetch is bounded by
/// `timeout`. Received data bytes are counted in [`PeerHub::state_bytes_fetched`].
pub async fn fetch_state(
    hub: &PeerHub,
    generation: u64,
    me: &str,
    donor: &PeerAddr,
    want_step: u64,
    want_hash: &str,
    timeout: Duration,
) -> Result<(StateSnapshot, TransferStats), TransferError> {
    let started = Instant::now();
    let fetch = Fetch {
        hub,
        donor: format!("{} at {}", donor.id, donor.addr),
        peer: donor,
        generation,
        me,
        want_step,
        want_hash,
        deadline: started + timeout,
    };
    let mut progress = Progress::default();
    let outcome = if hub.config().state_stream {
        fetch.run_stream(&mut progress).await
    } else {
        tokio::time::timeout_at(fetch.deadline.into(), fetch.run(&mut progress)).await
    };
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(Ok(state)) => {
            tracing::info!(
                donor = %fetch.donor,
                generation,
                step = state.step,
                bytes = progress.got,
                seconds,
                "state fetched"
            );
            Ok((
                state,
                TransferStats {
                    bytes: progress.got,
                    seconds,
                    chunks: progress.chunks,
                },
            ))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(TransferError::TimedOut {
            donor: fetch.donor,
            ms: timeout.as_millis() as u64,
            got: progress.got,
            total: progress.total,
        }),
    }
}

/// What a fetch received so far (read after a timeout).
#[derive(Default)]
struct Progress {
    got: u64,
    total: Option<u64>,
    chunks: u64,
}

struct Fetch<'a> {
    hub: &'a PeerHub,
    donor: String,
    peer: &'a PeerAddr,
    generation: u64,
    me: &'a str,
    want_step: u64,
    want_hash: &'a str,
    deadline: Instant,
}

impl Fetch<'_> {
    /// The fetch over the state stream ([`super::stream`]), on a blocking thread; `Err`
    /// once the deadline passed (the thread then ends at its socket timeouts, which are
    /// set to the time left).
    async fn run_stream(
        &self,
        progress: &mut Progress,
    ) -> Result<Result<StateSnapshot, TransferError>, tokio::time::error::Elapsed> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = (left - (left / 4).min(Duration::from_secs(2))).min(MAX_PUBLICATION_WAIT);
        let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let chunks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let total = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let job = super::stream::StreamFetch {
            donor: self.donor.clone(),
            peer: self.peer.clone(),
            tls: self.hub.tls().cloned(),
            request: StateRequest {
                job: self.hub.job().to_string(),
                generation: self.generation,
                from_member: self.me.to_string(),
                step: self.want_step,
                param_hash: self.want_hash.to_string(),
                wait_ms: wait.as_millis() as u64,
            },
            want_step: self.want_step,
            want_hash: self.want_hash.to_string(),
            deadline: self.deadline,
            got: Arc::clone(&got),
            chunks: Arc::clone(&chunks),
            total: Arc::clone(&total),
            counters: self.hub.counters(),
        };
        let outcome = tokio::time::timeout_at(
            self.deadline.into(),
            tokio::task::spawn_blocking(move || job.run()),
        )
        .await;
        progress.got = got.load(Ordering::Relaxed);
        progress.chunks = chunks.load(Ordering::Relaxed);
        progress.total = Some(total.load(Ordering::Relaxed)).filter(|&t| t != u64::MAX);
        outcome.map(joined)
    }

    async fn run(&self, progress: &mut Progress) -> Result<StateSnapshot, TransferError> {
        let limit = message_limit_bytes(self.hub.config().max_frame_floats);
        let channel = self.connect().await?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = (left - (left / 4).min(Duration::from_secs(2))).min(MAX_PUBLICATION_WAIT);
        let request = StateRequest {
            job: self.hub.job().to_string(),
            generation: self.generation,
            from_member: self.me.to_string(),
            step: self.want_step,
            param_hash: self.want_hash.to_string(),
            wait_ms: wait.as_millis() as u64,
        };
        // A donor serving its most transfers at once refuses with RESOURCE_EXHAUSTED:
        // ask again (backing off) until the deadline.
        let mut delay = Duration::from_millis(50);
        let mut stream = loop {
            let refused = |s: Status| TransferError::Refused {
                donor: self.donor.clone(),
                code: s.code(),
                message: s.message().to_string(),
            };
            match client.fetch_state(request.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    if Instant::now() + delay >= self.deadline {
                        return Err(refused(s));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(s) => return Err(refused(s)),
            }
        };
        let counters = self.hub.counters();
        let mut asm: Option<Assembly> = None;
        let expected = loop {
            let mut chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Err(TransferError::BadChunk {
                        donor: self.donor.clone(),
                        index: progress.chunks,
                        reason: format!(
                            "the stream ended after {} of {} bytes without a checksum",
                            progress.got,
                            progress
                                .total
                                .map_or_else(|| "?".to_string(), |t| t.to_string())
                        ),
                    })
                }
                Err(s) if progress.chunks == 0 => {
                    return Err(TransferError::Refused {
                        donor: self.donor.clone(),
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
                Err(s) => {
                    return Err(TransferError::Stream {
                        donor: self.donor.clone(),
                        got: progress.got,
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
            };
            let index = progress.chunks;
            progress.chunks += 1;
            let len = chunk.data.len() as u64;
            progress.got += len;
            Counters::add(&counters.state_bytes_fetched, len);
            let bad = |reason: String| TransferError::BadChunk {
                donor: self.donor.clone(),
                index,
                reason,
            };
            let current = match (&mut asm, chunk.header.as_ref()) {
                (None, Some(h)) => {
                    let a = self.start(h)?;
                    progress.total = Some(a.n as u64 * 12);
                    asm.insert(a)
                }
                (None, None) => return Err(bad("the first chunk has no header".into())),
                (Some(_), Some(_)) => return Err(bad("a header after the first chunk".into())),
                (Some(a), None) => a,
            };
            let checksum = std::mem::take(&mut chunk.payload_checksum);
            current
                .place
                .check(
                    chunk.tensor,
                    chunk.offset,
                    chunk.data.len(),
                    !checksum.is_empty(),
                )
                .map_err(bad)?;
            current
                .feed(chunk.tensor as usize, Arc::new(chunk.data))
                .await
                .map_err(bad)?;
            if !checksum.is_empty() {
                if let Ok(Some(_)) = stream.message().await {
                    return Err(bad("a chunk after the one with the checksum".into()));
                }
                break checksum;
            }
        };
        let asm = asm.expect("the header came before the checksum");
        let header = asm.header.clone();
        let (actual, tensors) = asm.finish().await;
        let [params, m, v] = tensors.map_err(|reason| TransferError::BadChunk {
            donor: self.donor.clone(),
            index: progress.chunks.saturating_sub(1),
            reason,
        })?;
        if actual != expected {
            return Err(TransferError::Checksum {
                donor: self.donor.clone(),
                expected,
                actual,
            });
        }
        Ok(StateSnapshot {
            step: header.step,
            cursor: header.cursor,
            opt_step: header.opt_step,
            param_hash: header.param_hash,
            params,
            m,
            v,
            guard_state: header.guard_state,
        })
    }

    /// Checks the header and makes room for the state.
    fn start(&self, h: &StateHeader) -> Result<Assembly, TransferError> {
        let bad = |reason: String| TransferError::BadHeader {
            donor: self.donor.clone(),
            reason,
        };
        if h.step != self.want_step {
            return Err(bad(format!(
                "step {}, not the requested step {}",
                h.step, self.want_step
            )));
        }
        if !self.want_hash.is_empty() && h.param_hash != self.want_hash {
            return Err(bad(format!(
                "param_hash {}, not the requested {}",
                h.param_hash, self.want_hash
            )));
        }
        let n = usize::try_from(h.num_params)
            .ok()
            .filter(|n| n.checked_mul(12).is_some())
            .ok_or_else(|| bad(format!("num_params {} is too large", h.num_params)))?;
        // The count is the donor's word: reserve at most RESERVE_AHEAD_FLOATS values per
        // tensor now, the rest as data arrives (make_room, on the writer thread).
        let mut tensors: [Vec<f32>; 3] = Default::default();
        for t in &mut tensors {
            let ahead = n.min(super::stream::RESERVE_AHEAD_FLOATS);
            t.try_reserve_exact(ahead)
                .map_err(|e| bad(format!("cannot hold {ahead} values: {e}")))?;
        }
        Ok(Assembly::new(h.clone(), n, tensors))
    }

    /// Connects to the donor, retrying with backoff until the deadline.
    async fn connect(&self) -> Result<Channel, TransferError> {
        let started = Instant::now();
        let failed = |attempts: u32, reason: String| TransferError::Connect {
            donor: self.donor.clone(),
            attempts,
            ms: started.elapsed().as_millis() as u64,
            reason,
        };
        let endpoint = super::peer_endpoint(self.peer, self.hub.tls()).map_err(|e| failed(0, e))?;
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = self.deadline.saturating_duration_since(Instant::now());
            let endpoint = endpoint
                .clone()
                .connect_timeout(left.clamp(Duration::from_millis(100), Duration::from_secs(5)));
            match endpoint.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    let reason = error_chain(&e);
                    if Instant::now() + delay >= self.deadline {
                        return Err(failed(attempt, reason));
                    }
                    tracing::debug!(donor = %self.donor, attempt, error = %reason, "connect failed; retrying");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where the chunks received so far put a state of `n` values per tensor: the three
/// tensors in order, each contiguous from offset 0, within bounds, whole values.
pub(super) struct Placement {
    /// Values per tensor.
    n: usize,
    /// Values received per tensor.
    lens: [usize; 3],
    /// The tensor being filled; the ones before it are complete.
    current: usize,
}

impl Placement {
    /// Nothing received yet of three tensors of `n` values.
    pub(super) fn new(n: usize) -> Self {
        Self {
            n,
            lens: [0; 3],
            current: 0,
        }
    }

    /// Checks the place of a chunk of `bytes` data bytes of tensor `tensor` at value
    /// `offset` against what came before (`last`: it carries the checksum, so every
    /// tensor must be complete with it) and counts its values.
    pub(super) fn check(
        &mut self,
        tensor: u32,
        offset: u64,
        bytes: usize,
        last: bool,
    ) -> Result<(), String> {
        let t = tensor as usize;
        if t > 2 {
            return Err(format!("tensor {t} (not 0, 1 or 2)"));
        }
        if t < self.current {
            return Err(format!("tensor {t} after tensor {}", self.current));
        }
        while self.current < t {
            let have = self.lens[self.current];
            if have != self.n {
                return Err(format!(
                    "tensor {t} starts but tensor {} has only {have} of {} values",
                    self.current, self.n
                ));
            }
            self.current += 1;
        }
        let have = self.lens[t];
        if offset != have as u64 {
            return Err(format!(
                "tensor {t} offset {} but {have} values came before",
                offset
            ));
        }
        if !bytes.is_multiple_of(4) {
            return Err(format!("{} data bytes are not whole f32 values", bytes));
        }
        let values = bytes / 4;
        if values > self.n - have {
            return Err(format!(
                "tensor {t} values {have}..{} past its end {}",
                have + values,
                self.n
            ));
        }
        self.lens[t] += values;
        if last {
            self.complete()?;
        }
        Ok(())
    }

    /// Checks that every tensor is complete (the last chunk came).
    pub(super) fn complete(&self) -> Result<(), String> {
        for (k, &len) in self.lens.iter().enumerate() {
            if len != self.n {
                return Err(format!(
                    "the last chunk came but tensor {k} has only {len} of {} values",
                    self.n
                ));
            }
        }
        Ok(())
    }
}

/// The data of one received chunk, shared by the hashing and the decoding thread.
type ChunkData = Arc<Vec<u8>>;

/// The state being received: the async side checks every chunk's place, a blocking
/// thread hashes the data in order, another one decodes it into the tensors, so that
/// receiving, hashing and decoding overlap.
struct Assembly {
    header: StateHeader,
    n: usize,
    /// Where the chunks so far go.
    place: Placement,
    to_hasher: mpsc::Sender<ChunkData>,
    hasher: JoinHandle<String>,
    to_writer: mpsc::Sender<(usize, ChunkData)>,
    /// The tensors, or why the room for a chunk could not be had.
    writer: JoinHandle<Result<[Vec<f32>; 3], String>>,
}

impl Assembly {
    /// Starts the two threads; `tensors` are empty, with room for what comes first of
    /// their `n` values each (the writer makes more as chunks come, never past `n`).
    fn new(header: StateHeader, n: usize, mut tensors: [Vec<f32>; 3]) -> Self {
        let (to_hasher, mut chunks) = mpsc::channel::<ChunkData>(CHUNKS_IN_FLIGHT);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = PayloadSum::default();
            while let Some(data) = chunks.blocking_recv() {
                hasher.update(&data[..]);
            }
            hasher.finalize()
        });
        let (to_writer, mut chunks) = mpsc::channel::<(usize, ChunkData)>(CHUNKS_IN_FLIGHT);
        let writer = tokio::task::spawn_blocking(move || {
            while let Some((t, data)) = chunks.blocking_recv() {
                let values = &mut tensors[t];
                super::stream::make_room(values, n, data.len() / 4).map_err(|e| {
                    format!(
                        "cannot hold {} more values of tensor {t} ({} so far): {e}",
                        data.len() / 4,
                        values.len()
                    )
                })?;
                decode(&data, values);
            }
            Ok(tensors)
        });
        Self {
            header,
            n,
            place: Placement::new(n),
            to_hasher,
            hasher,
            to_writer,
            writer,
        }
    }

    /// Hands a checked chunk's data of tensor `t` to both threads.
    async fn feed(&mut self, t: usize, data: ChunkData) -> Result<(), String> {
        let gone = "the receiving threads stopped";
        self.to_hasher
            .send(Arc::clone(&data))
            .await
            .map_err(|_| gone.to_string())?;
        self.to_writer
            .send((t, data))
            .await
            .map_err(|_| gone.to_string())
    }

    /// The checksum of every chunk fed, and the tensors (or why they could not be held).
    async fn finish(self) -> (String, Result<[Vec<f32>; 3], String>) {
        drop(self.to_hasher);
        drop(self.to_writer);
        (joined(self.hasher.await), joined(self.writer.await))
    }
}

/// The result of a blocking thread of ours (which only ends by returning or panicking).
fn joined<T>(r: Result<T, tokio::task::JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a state transfer thread did not run: {e}"),
    }
}

/// The payload checksum: Fletcher-64 over little-endian u32 words (every chunk holds whole
/// f32 values, so chunks split between words never). Order-sensitive and at memory speed;
/// it catches a torn, truncated or misordered payload (TCP and HTTP/2 already guard the
/// bytes on the wire), while the parameters are also checked against the SHA-256 the
/// receiver expects.
#[derive(Clone, Debug, Default)]
pub(super) struct PayloadSum {
    a: u64,
    b: u64,
}

impl PayloadSum {
    /// Adds `data` (a multiple of 4 bytes).
    ///
    /// Word by word this is `a += w; b += a` (see [`PayloadSum::update_words`]); here the
    /// words are summed in [`SUM_LANES`] independent lanes, which the compiler vectorises,
    /// and folded back exactly (all arithmetic wraps, so it is exact mod 2^64): for the
    /// `k = L * M` words `w[m][j]` of `M` rows of `L` lanes, with per-lane sums `A_j` and
    /// prefix sums `B_j = sum over m of (M - 1 - m) * w[m][j]`,
    /// `a += sum A_j` and `b += k * a_before + L * sum (A_j + B_j) - sum j * A_j`.
    pub(super) fn update(&mut self, data: &[u8]) {
        const L: usize = SUM_LANES;
        let rows = data.chunks_exact(4 * L);
        let tail = rows.remainder();
        let k = (rows.len() * L) as u64;
        let (mut lane_a, mut lane_b) = ([0u64; L], [0u64; L]);
        for row in rows {
            for j in 0..L {
                lane_b[j] = lane_b[j].wrapping_add(lane_a[j]);
                let w = u32::from_le_bytes([
                    row[4 * j],
                    row[4 * j + 1],
                    row[4 * j + 2],
                    row[4 * j + 3],
                ]);
                lane_a[j] = lane_a[j].wrapping_add(u64::from(w));
            }
        }
        let (mut sum_a, mut sum_b, mut weighted) = (0u64, 0u64, 0u64);
        for j in 0..L {
            sum_a = sum_a.wrapping_add(lane_a[j]);
            sum_b = sum_b.wrapping_add(lane_b[j]);
            weighted = weighted.wrapping_add((j as u64).wrapping_mul(lane_a[j]));
        }
        self.b = self
            .b
            .wrapping_add(k.wrapping_mul(self.a))
            .wrapping_add((L as u64).wrapping_mul(sum_a.wrapping_add(sum_b)))
            .wrapping_sub(weighted);
        self.a = self.a.wrapping_add(sum_a);
        self.update_words(tail);
    }

    /// [`PayloadSum::update`] one word at a time: the definition.
    pub(super) fn update_words(&mut self, data: &[u8]) {
        let (mut a, mut b) = (self.a, self.b);
        for w in data.chunks_exact(4) {
            a = a.wrapping_add(u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            b = b.wrapping_add(a);
        }
        self.a = a;
        self.b = b;
    }

    /// The checksum as 32 hex digits.
    pub(super) fn finalize(&self) -> String {
        format!("{:016x}{:016x}", self.a, self.b)
    }

    /// The checksum, and a fresh start.
    pub(super) fn finalize_reset(&mut self) -> String {
        let s = self.finalize();
        *self = Self::default();
        s
    }
}

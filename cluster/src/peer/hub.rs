//! The served side of the data plane: [`PeerHub`] takes every member's `Exchange`
//! streams and routes each frame to the communicator of the installed generation, and
//! answers `FetchState` requests with the state published for their generation
//! ([`PeerHub::publish_state`], see [`super::transfer`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use tenax_proto::v1::peer_server::{Peer, PeerServer};
use tenax_proto::v1::{ExchangeReply, PeerFrame, StateRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::comm::GrpcCollective;
use super::transfer::{self, ChunkStream, Published};
use super::{message_limit_bytes, DEFAULT_MAX_FRAME_FLOATS};
use crate::tls::Tls;

/// Limits of a [`PeerHub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// Most values a frame may carry; sets the gRPC message size limit
    /// ([`super::message_limit_bytes`]). Communicators may use less, not more.
    pub max_frame_floats: usize,
    /// Most bytes of frames of a not yet installed (newer) generation held at once.
    pub max_buffered_bytes: usize,
    /// Most frames of a not yet installed (newer) generation held at once.
    pub max_buffered_frames: usize,
    /// Most frames and bytes of newer generations held for one sending member, as a
    /// share of the two bounds above (1/N of each).
    pub buffered_share_per_peer: usize,
    /// Most `FetchState` transfers served at once (more are refused, to be retried).
    pub max_state_transfers: usize,
    /// [`fetch_state`](super::fetch_state) takes the state over the state stream
    /// ([`super::stream`]: raw frames on the donor's peer port, the donor's listener
    /// passing its connections through [`PeerHub::incoming`]) rather than over gRPC
    /// `FetchState` (which donors serve either way).
    pub state_stream: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_frame_floats: DEFAULT_MAX_FRAME_FLOATS,
            max_buffered_bytes: 256 << 20,
            max_buffered_frames: 1 << 16,
            buffered_share_per_peer: 2,
            max_state_transfers: 4,
            state_stream: true,
        }
    }
}

/// Counters shared by the hub and its communicators.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub stale_refused: AtomicU64,
    pub other_refused: AtomicU64,
    pub accepted: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub state_bytes_served: AtomicU64,
    pub state_bytes_fetched: AtomicU64,
    pub off_runtime: AtomicU64,
    /// `FetchState` requests refused: not a receiver, or too many at once.
    pub state_refused: AtomicU64,
    /// `Exchange` streams and `FetchState` requests refused because the client's
    /// certificate does not name the member they claim (mutual TLS).
    pub identity_refused: AtomicU64,
}

/// Frames of at least this many bytes are decoded and folded into the step (the gradient
/// sums) with the async worker handed off (`block_in_place`), so that the sums never hold
/// up the runtime's other tasks; smaller frames are taken in place, where the hand-off
/// would cost more than the work.
pub const OFF_RUNTIME_FRAME_BYTES: usize = 256 * 1024;

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The peer service of one daemon (cheap to clone: an `Arc` inside).
///
/// The daemon serves [`PeerHub::service`] with its tonic server; every
/// [`GrpcCollective`] built on the hub ([`GrpcCollective::new`]) is installed in it and
/// receives the frames of its generation. Frames of another job are refused, frames of
/// an older generation are refused as stale, frames of a newer generation wait in a
/// bounded buffer until their generation is installed (over the bound they are refused;
/// buffered frames of a generation older than the one installed are dropped and counted
/// as stale). Every refusal is counted, both in the stream's [`ExchangeReply`] and in
/// the hub's counters.
///
/// It also serves the state transfer: the state published with
/// [`PeerHub::publish_state`] goes to the `FetchState` requests of its generation
/// ([`super::fetch_state`] is the requesting side).
#[derive(Clone)]
pub struct PeerHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    job: String,
    config: HubConfig,
    counters: Arc<Counters>,
    state: Mutex<HubState>,
    /// The state published for `FetchState`, if any.
    publication: watch::Sender<Option<Arc<Published>>>,
    /// One permit per `FetchState` transfer being served.
    transfer_slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    /// This node's TLS material: the communicators and state fetches dial peers with it.
    tls: Option<Tls>,
}

#[derive(Default)]
struct HubState {
    installed: Option<(u64, Arc<GrpcCollective>)>,
    buffer: Vec<PeerFrame>,
    buffered_bytes: usize,
    /// Buffered frames and bytes per sending member.
    per_peer: HashMap<String, (usize, usize)>,
    /// Buffered frames per generation.
    per_generation: BTreeMap<u64, usize>,
}

impl HubState {
    /// Counts the buffer again (after frames left it other than one by one).
    fn recount(&mut self) {
        self.buffered_bytes = 0;
        self.per_peer.clear();
        self.per_generation.clear();
        for f in &self.buffer {
            let size = f.encoded_len();
            self.buffered_bytes += size;
            let p = self.per_peer.entry(f.from_member.clone()).or_default();
            *p = (p.0 + 1, p.1 + size);
            *self.per_generation.entry(f.generation).or_default() += 1;
        }
    }

    fn push(&mut self, frame: PeerFrame, size: usize) {
        self.buffered_bytes += size;
        let p = self.per_peer.entry(frame.from_member.clone()).or_default();
        *p = (p.0 + 1, p.1 + size);
        *self.per_generation.entry(frame.generation).or_default() += 1;
        self.buffer.push(frame);
    }
}

/// What became of one received frame.
enum Verdict {
    Accepted,
    Stale,
    Other,
}

impl std::fmt::Debug for PeerHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHub")
            .field("job", &self.inner.job)
            .field("installed_generation", &self.installed_generation())
            .field("frames_accepted", &self.frames_accepted())
            .field("stale_refused", &self.stale_refused())
            .field("published_generation", &self.published_generation())
            .finish()
    }
}

impl PeerHub {
    /// A hub for job `job`, with nothing installed yet (frames of every generation are
    /// buffered until the first install).
    pub fn new(job: impl Into<String>, config: HubConfig) -> Self {
        Self::with_tls(job, config, None)
    }

    /// As [`PeerHub::new`], dialling peers over mutual TLS with `tls` when given (the
    /// daemon's listener then serves TLS too: [`Tls::incoming`]).
    pub fn with_tls(job: impl Into<String>, config: HubConfig, tls: Option<Tls>) -> Self {
        Self {
            inner: Arc::new(HubInner {
                job: job.into(),
                counters: Arc::new(Counters::default()),
                state: Mutex::new(HubState::default()),
                publication: watch::channel(None).0,
                transfer_slots: Arc::new(tokio::sync::Semaphore::new(
                    config.max_state_transfers.max(1),
                )),
                config,
                shutdown: CancellationToken::new(),
                tls,
            }),
        }
    }

    /// The job whose frames this hub takes.
    pub fn job(&self) -> &str {
        &self.inner.job
    }

    /// The hub's limits.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// The tonic service to add to the daemon's server, with message size limits of
    /// [`super::message_limit_bytes`]`(config.max_frame_floats)` both ways.
    pub fn service(&self) -> PeerServer<PeerHub> {
        let limit = message_limit_bytes(self.inner.config.max_frame_floats);
        PeerServer::new(self.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    /// The generation of the installed communicator, if any.
    pub fn installed_generation(&self) -> Option<u64> {
        self.lock().installed.as_ref().map(|(g, _)| *g)
    }

    /// The installed communicator, if any.
    pub fn installed(&self) -> Option<Arc<GrpcCollective>> {
        self.lock().installed.as_ref().map(|(_, c)| Arc::clone(c))
    }

    /// Frames refused because their generation is older than the installed one.
    pub fn stale_refused(&self) -> u64 {
        self.inner.counters.stale_refused.load(Ordering::Relaxed)
    }

    /// Frames refused for any other reason: another job, a full buffer, a protocol
    /// error, an aborted communicator.
    pub fn other_refused(&self) -> u64 {
        self.inner.counters.other_refused.load(Ordering::Relaxed)
    }

    /// Frames of at least [`OFF_RUNTIME_FRAME_BYTES`] taken with the async worker handed off.
    pub fn frames_taken_off_runtime(&self) -> u64 {
        self.inner.counters.off_runtime.load(Ordering::Relaxed)
    }

    /// Frames taken (delivered, or buffered for a newer generation).
    pub fn frames_accepted(&self) -> u64 {
        self.inner.counters.accepted.load(Ordering::Relaxed)
    }

    /// Protobuf bytes of frames sent by this hub's communicators.
    pub fn bytes_sent(&self) -> u64 {
        self.inner.counters.bytes_sent.load(Ordering::Relaxed)
    }

    /// Protobuf bytes of frames received by this hub.
    pub fn bytes_received(&self) -> u64 {
        self.inner.counters.bytes_received.load(Ordering::Relaxed)
    }

    /// Frames held for a generation not installed yet.
    pub fn buffered_frames(&self) -> usize {
        self.lock().buffer.len()
    }

    /// Ends every open and future `Exchange` and `FetchState` stream (and every
    /// `FetchState` request waiting for a publication) with `UNAVAILABLE`, so that peers
    /// notice at once instead of waiting for their keep-alive. The daemon calls this
    /// before it stops its server (a graceful server shutdown waits for open streams).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    pub(super) fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.inner.counters)
    }

    pub(super) fn publication(&self) -> &watch::Sender<Option<Arc<Published>>> {
        &self.inner.publication
    }

    pub(super) fn transfer_slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.transfer_slots
    }

    /// The TLS material peers are dialled with, if any.
    pub fn tls(&self) -> Option<&Tls> {
        self.inner.tls.as_ref()
    }

    /// `Exchange` streams and `FetchState` requests refused because the client's
    /// certificate names another member than the one they claim, or no node.
    pub fn identity_refused(&self) -> u64 {
        self.inner.counters.identity_refused.load(Ordering::Relaxed)
    }

    /// The member a request's client certificate names, checked against `claimed`: `Ok`
    /// over plain TCP (no certificate to check) or when they agree; otherwise the
    /// refusal (`PERMISSION_DENIED`), counted.
    pub(super) fn check_identity<T>(
        &self,
        request: &Request<T>,
        claimed: Option<&str>,
    ) -> Result<Option<String>, Status> {
        self.check_identity_of(crate::tls::peer_identity(request), claimed)
    }

    /// [`PeerHub::check_identity`] for a client whose certificate names `identity`
    /// (`None`: plain TCP; `Some(None)`: a certificate that names none of ours).
    pub(super) fn check_identity_of(
        &self,
        identity: Option<Option<crate::tls::PeerIdentity>>,
        claimed: Option<&str>,
    ) -> Result<Option<String>, Status> {
        let Some(identity) = identity else {
            return Ok(None);
        };
        let node = identity.as_ref().and_then(|i| i.node().map(str::to_string));
        let Some(node) = node else {
            Counters::add(&self.inner.counters.identity_refused, 1);
            return Err(Status::permission_denied(format!(
                "the peer plane serves nodes only; this client's certificate names {}",
                identity.map_or("no tenax identity".to_string(), |i| i.to_string())
            )));
        };
        match claimed {
            Some(claimed) if claimed != node => {
                Counters::add(&self.inner.counters.identity_refused, 1);
                Err(Status::permission_denied(format!(
                    "member {claimed:?} claimed by a client whose certificate names node {node:?}"
                )))
            }
            _ => Ok(Some(node)),
        }
    }

    /// `FetchState` requests refused (not a receiver of the publication, or too many
    /// transfers at once).
    pub fn state_refused(&self) -> u64 {
        self.inner.counters.state_refused.load(Ordering::Relaxed)
    }

    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs `comm` as generation `generation`: returns the communicator it replaces
    /// and the buffered frames of that generation (older buffered frames are dropped).
    pub(super) fn install(
        &self,
        generation: u64,
        comm: Arc<GrpcCollective>,
    ) -> Result<(Option<Arc<GrpcCollective>>, Vec<PeerFrame>), String> {
        let mut st = self.lock();
        if let Some((g, _)) = &st.installed {
            if *g >= generation {
                return Err(format!(
                    "generation {generation} is not newer than the installed generation {g}"
                ));
            }
        }
        let old = st.installed.replace((generation, comm)).map(|(_, c)| c);
        let buffer = std::mem::take(&mut st.buffer);
        let mut mine = Vec::new();
        let mut dropped = 0u64;
        for f in buffer {
            if f.generation == generation {
                mine.push(f);
            } else if f.generation > generation {
                st.buffer.push(f);
            } else {
                dropped += 1;
            }
        }
        st.recount();
        drop(st);
        if dropped > 0 {
            tracing::debug!(
                generation,
                dropped,
                "dropped buffered frames of older generations"
            );
            Counters::add(&self.inner.counters.stale_refused, dropped);
        }
        Ok((old, mine))
    }

    /// Hands buffered frames to the communicator they waited for.
    pub(super) fn deliver_buffered(&self, comm: &GrpcCollective, frames: Vec<PeerFrame>) {
        for f in frames {
            if let Err(e) = comm.deliver(f) {
                tracing::debug!(error = %e, "buffered frame refused");
                Counters::add(&self.inner.counters.other_refused, 1);
            }
        }
    }

    /// [`Self::accept`], with the async worker handed off for a large frame on a
    /// multi-threaded runtime (see [`OFF_RUNTIME_FRAME_BYTES`]).
    fn accept_large_off_runtime(&self, frame: PeerFrame) -> Verdict {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi && frame.encoded_len() >= OFF_RUNTIME_FRAME_BYTES {
            Counters::add(&self.inner.counters.off_runtime, 1);
            tokio::task::block_in_place(|| self.accept(frame))
        } else {
            self.accept(frame)
        }
    }

    fn accept(&self, frame: PeerFrame) -> Verdict {
        let size = frame.encoded_len();
        let counters = &self.inner.counters;
        Counters::add(&counters.bytes_received, size as u64);
        let verdict = self.route(frame, size);
        match verdict {
            Verdict::Accepted => Counters::add(&counters.accepted, 1),
            Verdict::Stale => Counters::add(&counters.stale_refused, 1),
            Verdict::Other => Counters::add(&counters.other_refused, 1),
        }
        verdict
    }

    fn route(&self, frame: PeerFrame, size: usize) -> Verdict {
        if frame.job != self.inner.job {
            tracing::debug!(
                job = %frame.job,
                from = %frame.from_member,
                "frame of another job refused"
            );
            return Verdict::Other;
        }
        let mut st = self.lock();
        let installed = st.installed.as_ref().map(|(g, c)| (*g, Arc::clone(c)));
        match installed {
            Some((g, _)) if frame.generation < g => Verdict::Stale,
            Some((g, comm)) if frame.generation == g => {
                drop(st);
                match comm.deliver(frame) {
                    Ok(()) => Verdict::Accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "frame refused");
                        Verdict::Other
                    }
                }
            }
            _ => self.buffer(&mut st, frame, size),
        }
    }

    /// Holds a frame of a newer generation until it is installed. Each sending member
    /// holds at most its share of the bounds, so one peer flooding frames cannot keep
    /// the others' out; when the buffer is full, frames of the latest generation held
    /// make room for a frame of an earlier one (the next generation the node forms
    /// comes first), else the frame is refused.
    fn buffer(&self, st: &mut HubState, frame: PeerFrame, size: usize) -> Verdict {
        let cfg = &self.inner.config;
        let share = cfg.buffered_share_per_peer.max(1);
        let (peer_frames, peer_bytes) = st
            .per_peer
            .get(&frame.from_member)
            .copied()
            .unwrap_or_default();
        let over_share = peer_frames >= (cfg.max_buffered_frames / share).max(1)
            || peer_bytes.saturating_add(size) > (cfg.max_buffered_bytes / share).max(1);
        let refuse = |why: &str, st: &HubState| {
            tracing::warn!(
                generation = frame.generation,
                from = %frame.from_member,
                frames = st.buffer.len(),
                bytes = st.buffered_bytes,
                peer_frames,
                "frame of a newer generation refused: {why}"
            );
            Verdict::Other
        };
        if over_share {
            return refuse("its member holds its share of the buffer", st);
        }
        while st.buffer.len() >= cfg.max_buffered_frames
            || st.buffered_bytes.saturating_add(size) > cfg.max_buffered_bytes
        {
            let latest = st.per_generation.keys().next_back().copied();
            match latest {
                Some(g) if frame.generation < g => {
                    let before = st.buffer.len();
                    st.buffer.retain(|f| f.generation != g);
                    st.recount();
                    let evicted = (before - st.buffer.len()) as u64;
                    tracing::debug!(
                        generation = g,
                        evicted,
                        "frames of a later generation evicted for an earlier one"
                    );
                    Counters::add(&self.inner.counters.other_refused, evicted);
                }
                _ => return refuse("the buffer is full", st),
            }
        }
        st.push(frame, size);
        Verdict::Accepted
    }
}

#[tonic::async_trait]
impl Peer for PeerHub {
    async fn exchange(
        &self,
        request: Request<Streaming<PeerFrame>>,
    ) -> Result<Response<ExchangeReply>, Status> {
        // Over mutual TLS every frame must come from the node the certificate names.
        let certified = self.check_identity(&request, None)?;
        let mut stream = request.into_inner();
        let mut reply = ExchangeReply::default();
        loop {
            let next = tokio::select! {
                _ = self.inner.shutdown.cancelled() => {
                    return Err(Status::unavailable("peer hub is shutting down"));
                }
                next = stream.message() => next,
            };
            match next {
                Ok(Some(frame))
                    if certified
                        .as_ref()
                        .is_some_and(|node| *node != frame.from_member) =>
                {
                    Counters::add(&self.inner.counters.identity_refused, 1);
                    return Err(Status::permission_denied(format!(
                        "a frame from member {:?} on a stream whose certificate names node {:?}",
                        frame.from_member,
                        certified.unwrap_or_default()
                    )));
                }
                Ok(Some(frame)) => match self.accept_large_off_runtime(frame) {
                    Verdict::Accepted => reply.accepted += 1,
                    Verdict::Stale => reply.refused_stale += 1,
                    Verdict::Other => reply.refused_other += 1,
                },
                Ok(None) => return Ok(Response::new(reply)),
                // The sender went away (aborted, died): nothing to answer.
                Err(status) => return Err(status),
            }
        }
    }

    type FetchStateStream = ChunkStream;

    async fn fetch_state(
        &self,
        request: Request<StateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.check_identity(&request, Some(&request.get_ref().from_member))?;
        transfer::serve(self, request.into_inner()).await
    }
}

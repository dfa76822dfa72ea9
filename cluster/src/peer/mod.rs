//! The CPU collective over gRPC: the peer data plane between daemons.
//!
//! Every daemon serves one [`PeerHub`] (the tonic `Peer` service, see
//! [`PeerHub::service`]). For each generation of the job's plan it builds one
//! [`GrpcCollective`] ([`GrpcCollective::new`]) from a [`CommSpec`]; building installs
//! it in the hub and aborts the communicator of the previous generation. The compute
//! threads of the member's local ranks then use it through the
//! [`Collective`](crate::Collective) trait, exactly like [`crate::InProcessCollective`].
//!
//! # Transport
//!
//! One client-streaming `Exchange` call per (generation, destination member) carries
//! every frame this member has for that destination, in order. Frames are queued in a
//! bounded queue per destination (room for two steps' worth of traffic); a full queue,
//! a failed connect or a failed stream aborts the communicator with an error naming the
//! peer. Every frame carries its job and generation: the hub refuses frames of another
//! job and of older generations (counted), holds frames of newer generations in a
//! bounded buffer until that generation is installed, and hands the rest to the
//! installed communicator. A gradient chunk travels in pieces of at most
//! [`CommSpec::max_frame_floats`] values that the receiver reassembles.
//!
//! # Reductions
//!
//! - [`Reduction::Exact`] (the default): the flat gradient is cut into one contiguous
//!   chunk per member ([`chunk_range`]); member `k` owns chunk `k`. Every slot's chunk
//!   `k` goes to member `k`, which folds it over slots in slot order with
//!   [`SlotFold`](crate::SlotFold) (a left fold from slot 0), then sends the reduced
//!   chunk to every member. Each element sees exactly the additions a single
//!   [`SlotFold`](crate::SlotFold) over whole vectors does, so the result is
//!   bit-identical to [`crate::InProcessCollective`] for any number of members and ranks.
//! - [`Reduction::Ring`]: each member first sums its own slots in slot order, then a
//!   classic ring all-reduce over members in plan order (M-1 reduce-scatter rounds, M-1
//!   all-gather rounds). Deterministic, and every member gets identical bits, but the
//!   additions are grouped by member, so the bits differ from `Exact` (and depend on
//!   how slots are spread over members). Each member sends and receives about
//!   `2 (M-1)/M` gradients per step instead of `slots/M + 1`.
//!
//! In both, the loss is the exact fold of [`SlotFold`](crate::SlotFold): every slot's
//! loss sum is sent to every member (`FRAME_KIND_LOSS`), and each member adds them in
//! `f64` in slot order from `0.0`. (The `loss_sum` of REDUCED frames is informational:
//! the owner's total if it already has every loss, else 0; receivers ignore it.)
//!
//! # Steps
//!
//! A communicator keeps state per step. It accepts frames of any step that is not yet
//! reduced and at most two steps ahead of the oldest one not reduced (a faster member may
//! start the next step while this one still assembles the current one); anything else
//! is a protocol error that aborts the communicator. A step's state is dropped once
//! every local rank took its result.
//!
//! # State transfer
//!
//! A member that lacks the training state (it (re)joins, or ended up behind) takes
//! parameters and Adam's moments from a live peer, the donor: the donor publishes a
//! [`StateSnapshot`] for a generation ([`PeerHub::publish_state`]), the requester calls
//! [`fetch_state`], which takes it in chunks of at most [`STATE_CHUNK_FLOATS`] values,
//! checked by header (step, parameter hash, size), offsets and a Fletcher-64 checksum of
//! the payload (the caller checks the parameters' SHA-256 against the hash it expected).
//! By default the chunks travel as raw frames on a connection of their own to the
//! donor's peer port, authenticated like every peer connection (the state stream,
//! `stream.rs`: the listener's connections pass through [`PeerHub::incoming`], which
//! tells them from gRPC by their first bytes); with [`HubConfig::state_stream`] off they
//! travel over the `FetchState` rpc, which donors always serve too.

mod comm;
mod hub;
mod step;
mod stream;
#[cfg(test)]
mod tests;
mod transfer;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

pub use comm::{GrpcCollective, MAX_CONNECT_ATTEMPTS};
pub use hub::{HubConfig, PeerHub};
pub use stream::{
    BlockingIo, PeerConn, Rewind, DONOR_WRITE_TIMEOUT, FIRST_BYTES_TIMEOUT, FRAME_ABORT,
    FRAME_DATA, FRAME_END, MAX_REQUEST_BYTES, STATE_STREAM_MAGIC,
};
pub use transfer::{
    fetch_state, Publication, StateSnapshot, TransferError, TransferStats, CHUNKS_IN_FLIGHT,
    MAX_PUBLICATION_WAIT, STATE_CHUNK_FLOATS,
};

/// Default for [`CommSpec::max_frame_floats`] and [`HubConfig::max_frame_floats`]:
/// 2^20 values, 4 MiB of gradient per frame.
pub const DEFAULT_MAX_FRAME_FLOATS: usize = 1 << 20;

/// Default for [`CommSpec::connect_deadline`].
pub const DEFAULT_CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Room a frame needs besides its values in a gRPC message (routing fields, framing).
pub const FRAME_OVERHEAD_BYTES: usize = 64 * 1024;

/// HTTP/2 flow-control window of one peer stream (client and server side): large enough
/// that a 4 MiB frame is never held back for a window update.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// HTTP/2 flow-control window of one peer connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest HTTP/2 DATA frame a peer endpoint accepts (client and server side): HTTP/2's
/// default, 16 KiB, cuts a 4 MiB message into 256 frames.
pub const MAX_HTTP2_FRAME_BYTES: u32 = 1 << 20;

/// The gRPC message size limit (decoding and encoding) for frames of at most
/// `max_frame_floats` values: `4 * max_frame_floats + 64 KiB`.
pub fn message_limit_bytes(max_frame_floats: usize) -> usize {
    max_frame_floats
        .saturating_mul(4)
        .saturating_add(FRAME_OVERHEAD_BYTES)
}

/// One member of a generation, as the plan lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The member's id (unique in the job).
    pub id: String,
    /// Where its [`PeerHub`] is served, `host:port`.
    pub addr: String,
}

/// The endpoint of `peer` with the data plane's HTTP/2 settings (windows open to a few
/// frames, large frames, keep-alive): `https://` with this node's client certificate and
/// the check that the server's certificate names `peer.id` when `tls` is given,
/// `http://` otherwise.
pub(crate) fn peer_endpoint(
    peer: &PeerAddr,
    tls: Option<&crate::tls::Tls>,
) -> Result<tonic::transport::Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", peer.addr))
        .map_err(|e| format!("bad address {:?}: {e}", peer.addr))?
        .tcp_nodelay(true)
        // HTTP/2's default 64 KiB windows make a gradient chunk crawl: one round trip
        // per window. Open them to a few frames.
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(MAX_HTTP2_FRAME_BYTES)
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let config = tls
            .current()
            .client_for_node(&peer.id)
            .map_err(|e| e.to_string())?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS settings for {}: {e}", peer.id))?;
    }
    Ok(endpoint)
}

/// How a step's gradients are reduced over members.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Slot-ordered reduce-scatter and all-gather: bit-identical to a single
    /// [`SlotFold`](crate::SlotFold) over all slots, whatever the members and ranks.
    #[default]
    Exact,
    /// Ring all-reduce of per-member partial sums: deterministic and identical on every
    /// member, but not bit-identical to `Exact`.
    Ring,
}

impl Reduction {
    /// The name accepted by [`FromStr`] and written by [`fmt::Display`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Reduction::Exact => "exact",
            Reduction::Ring => "ring",
        }
    }
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reduction name that is neither `exact` nor `ring`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reduction {0:?}: use \"exact\" or \"ring\"")]
pub struct ParseReductionError(pub String);

impl FromStr for Reduction {
    type Err = ParseReductionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exact" => Ok(Reduction::Exact),
            "ring" => Ok(Reduction::Ring),
            _ => Err(ParseReductionError(s.to_string())),
        }
    }
}

/// Everything a communicator of one generation needs to know. Every member of the
/// generation must agree on all of it except `me` and `local_ranks`.
#[derive(Clone, Debug, PartialEq)]
pub struct CommSpec {
    /// The job; frames of other jobs are refused.
    pub job: String,
    /// The plan's generation; frames of other generations never reach this communicator.
    pub generation: u64,
    /// The members that host ranks, in plan order. Member `k` owns gradient chunk `k`.
    pub members: Vec<PeerAddr>,
    /// This member's index in `members`.
    pub me: usize,
    /// The global ranks this member hosts (each calls the [`Collective`](crate::Collective)
    /// from its own thread).
    pub local_ranks: Vec<u32>,
    /// Ranks in the generation.
    pub world: u32,
    /// Slots per step; rank `r` computes `tenax_core::slots::slots_for_rank(num_slots, world, r)`.
    pub num_slots: u64,
    /// Gradient values per slot (the flat parameter count).
    pub num_params: usize,
    /// How gradients are reduced; all members must use the same.
    pub reduction: Reduction,
    /// Most values one frame carries (all members must use the same); at most the
    /// hub's [`HubConfig::max_frame_floats`].
    pub max_frame_floats: usize,
    /// How long the first connect to each peer is retried.
    pub connect_deadline: Duration,
    /// `Some` when this member runs one pipeline stage of its slots' pipeline (the stages
    /// of a pipeline on different members): it contributes only its stage's share of
    /// each slot's gradient (see [`StagePart`]); `None`: whole slots.
    pub stage: Option<StagePart>,
}

/// What a STAGE frame carries between the stages of one pipeline on different members
/// ([`GrpcCollective::send_stage`], [`GrpcCollective::recv_stage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageMessage {
    /// A slot's activations, to the next stage.
    Activations = 0,
    /// A slot's input gradient, to the previous stage.
    Gradient = 1,
    /// A slot's embedding-output gradient, from the first stage to the head stage
    /// (which forms the tied token embedding's gradient).
    Embedding = 2,
}

impl StageMessage {
    /// The message of a frame's `chunk` field.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::Activations),
            1 => Some(Self::Gradient),
            2 => Some(Self::Embedding),
            _ => None,
        }
    }

    /// Its name in errors.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Activations => "activations",
            Self::Gradient => "gradient",
            Self::Embedding => "embedding rows",
        }
    }
}

/// A member's share of its slots' gradients when the stages of a pipeline run on
/// different members (with [`Reduction::Exact`] only).
///
/// Every slot's whole-model gradient is then the union of its pipeline's stages' parts,
/// which cover the flat layout without overlap. The owner of chunk `k` assembles each
/// slot's chunk from the parts that reach into it (any order, each value once) and folds
/// the complete slots in slot order, as it folds whole slots: each value sees the same
/// additions, so the result is bit-identical to whole slots. Every member receives the
/// whole reduced gradient (the clip norm needs every tensor's sum of squares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePart {
    /// The ranges of the whole flat gradient this member's stage gives, ascending and
    /// disjoint; a contribution's `grad` is their values, concatenated in this order.
    pub gives: Vec<Range<usize>>,
    /// Whether this member's stage computes the slots' loss (the head stage): only its
    /// contributions carry a loss.
    pub head: bool,
    /// Most STAGE frames this member sends any one member in a step (activations and
    /// gradients to its neighbours), for sizing the send queues.
    pub stage_frames_per_step: usize,
}

impl StagePart {
    /// Values a contribution carries: the sum of the ranges' lengths.
    pub fn len(&self) -> usize {
        self.gives.iter().map(|r| r.len()).sum()
    }

    /// True if the stage gives nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`CommSpec`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Something in the spec is inconsistent.
    #[error("invalid communicator spec: {0}")]
    Invalid(String),
}

impl CommSpec {
    /// The spec of a generation before its members are resolved (`members` empty, `me`
    /// 0), with the hub's frame size and a 10 s connect deadline.
    pub fn for_generation(
        job: &str,
        generation: u64,
        local_ranks: Vec<u32>,
        world: u32,
        num_slots: u64,
        num_params: usize,
        reduction: Reduction,
    ) -> Self {
        Self {
            job: job.to_string(),
            generation,
            members: Vec::new(),
            me: 0,
            local_ranks,
            world,
            num_slots,
            num_params,
            reduction,
            max_frame_floats: HubConfig::default().max_frame_floats,
            connect_deadline: Duration::from_secs(10),
            stage: None,
        }
    }

    /// Checks the spec on its own (the hub checks job and frame size on install).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |s: String| Err(SpecError::Invalid(s));
        if self.members.is_empty() {
            return bad("no members".into());
        }
        if self.me >= self.members.len() {
            return bad(format!(
                "me = {} but only {} members",
                self.me,
                self.members.len()
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for m in &self.members {
            if m.id.is_empty() || m.addr.is_empty() {
                return bad(format!("member {m:?} has an empty id or address"));
            }
            if !ids.insert(m.id.as_str()) {
                return bad(format!("member id {:?} listed twice", m.id));
            }
        }
        if self.members.len() > u32::MAX as usize {
            return bad("too many members".into());
        }
        if self.world == 0 {
            return bad("world is 0".into());
        }
        if self.local_ranks.is_empty() {
            return bad("this member hosts no rank".into());
        }
        let mut ranks = std::collections::BTreeSet::new();
        for &r in &self.local_ranks {
            if r >= self.world {
                return bad(format!("local rank {r} is not below world {}", self.world));
            }
            if !ranks.insert(r) {
                return bad(format!("local rank {r} listed twice"));
            }
        }
        if self.num_slots == 0 {
            return bad("num_slots is 0".into());
        }
        if self.max_frame_floats == 0 {
            return bad("max_frame_floats is 0".into());
        }
        if let Some(part) = &self.stage {
            if self.num_params < self.members.len() {
                return bad(format!(
                    "stage parts need a chunk for every member: {} values for {} members",
                    self.num_params,
                    self.members.len()
                ));
            }
            if self.reduction != Reduction::Exact {
                return bad("stage parts need the exact reduction".into());
            }
            let mut end = 0;
            for r in &part.gives {
                if r.start < end || r.end < r.start || r.end > self.num_params {
                    return bad(format!(
                        "stage part {r:?} is not ascending, disjoint and within {} values",
                        self.num_params
                    ));
                }
                end = r.end;
            }
        }
        Ok(())
    }

    /// The slots this member computes (the union over its local ranks), ascending.
    pub fn my_slots(&self) -> Vec<u64> {
        let mut slots: Vec<u64> = self
            .local_ranks
            .iter()
            .flat_map(|&r| {
                tenax_core::slots::slots_for_rank(
                    self.num_slots,
                    u64::from(self.world),
                    u64::from(r),
                )
            })
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }
}

/// A member's training state, as exchanged by [`GrpcCollective::exchange_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberState {
    /// The member's id.
    pub id: String,
    /// The step it will run next.
    pub step: u64,
    /// Hex SHA-256 of its parameters.
    pub param_hash: String,
}

/// The values of chunk `k` of `num_params` values cut into `members` chunks:
/// `k * P / M .. (k + 1) * P / M` (integer division), so sizes differ by at most one.
pub fn chunk_range(num_params: usize, members: usize, k: usize) -> Range<usize> {
    let p = num_params as u128;
    let m = members.max(1) as u128;
    let at = |i: usize| (i as u128 * p / m) as usize;
    at(k)..at(k + 1)
}

/// How many pieces a chunk of `len` values travels as (at least one, so that an empty
/// chunk still announces itself).
pub(crate) fn piece_count(len: usize, max_frame_floats: usize) -> usize {
    len.div_ceil(max_frame_floats.max(1)).max(1)
}

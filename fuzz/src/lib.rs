//! Helpers of tenax's fuzz targets: a reader that turns fuzz input into small fields
//! (and the writer the seed generator uses to write inputs in the same layout), and the
//! input layouts of the structure-aware targets `peer_exchange` and `state_transfer`,
//! and the fixed world of the `state_stream` target.

/// Reads fuzz input as a sequence of small little-endian fields. Reads past the end give
/// zeros (and empty byte strings), so every input is a valid one.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// At most `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Exactly `N` bytes, zero-padded at the end of the input.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Writes fields in the layout [`Input`] reads (for the seed generator).
#[derive(Clone, Debug, Default)]
pub struct Output(pub Vec<u8>);

impl Output {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The input layout of the `peer_exchange` target: a communicator spec, then the frames
/// one `Exchange` stream brings to the member's hub.
pub mod exchange {
    use super::{Input, Output};

    /// The job of the hub; frames of another job are refused.
    pub const JOB: &str = "j";
    /// The generation of the installed communicator.
    pub const GENERATION: u64 = 5;
    /// Most frames read from one input.
    pub const MAX_FRAMES: usize = 256;

    /// The id of member `k` (`m`: an id that is no member's).
    pub fn member_id(k: usize) -> String {
        format!("m{k}")
    }

    /// The communicator spec's free parameters, each one byte of input.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Spec {
        /// Members: `2 + members % 3`.
        pub members: u8,
        /// This member's index: `me % members`.
        pub me: u8,
        /// Gradient values per slot.
        pub num_params: u8,
        /// Slots per step: `1 + num_slots % 8`.
        pub num_slots: u8,
        /// Bit 0: the ring reduction (else exact).
        pub reduction: u8,
        /// Values per frame: `1 + max_frame_floats % 16`.
        pub max_frame_floats: u8,
        /// Ranks: `max(members, 1 + world % 8)`; this member hosts the ranks `r` with
        /// `r % members == me`.
        pub world: u8,
    }

    /// Bits of [`Frame::flags`].
    pub mod flags {
        /// The frame is of another job.
        pub const OTHER_JOB: u8 = 1;
        /// The frame is of the generation before the installed one.
        pub const OLDER: u8 = 2;
        /// The frame is of the generation after the installed one.
        pub const NEWER: u8 = 4;
        /// `index` is a u64 (else a u8).
        pub const WIDE_INDEX: u8 = 8;
        /// `offset` is a u64 (else a u16).
        pub const WIDE_OFFSET: u8 = 16;
        /// `loss_sum` is the f64 of a u64's bits (else the f32 of a u32's bits).
        pub const RAW_LOSS: u8 = 32;
        /// The data length byte counts bytes (else f32 values).
        pub const RAW_DATA: u8 = 64;
        /// The frame carries [`super::Frame::total`] (else 0).
        pub const TOTAL: u8 = 128;
    }

    /// One frame, as the input describes it.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Frame {
        /// [`flags`] bits.
        pub flags: u8,
        /// The sender: member `from % (members + 1)` (the last: not a member).
        pub from: u8,
        /// The step.
        pub step: u8,
        /// The frame kind (as the wire's i32; 0..=8 are known).
        pub kind: u8,
        /// Slot or round.
        pub index: u64,
        /// The chunk.
        pub chunk: u8,
        /// Offset within the chunk, in values.
        pub offset: u64,
        /// The loss sum's bits (see [`flags::RAW_LOSS`]).
        pub loss_bits: u64,
        /// A stage message's length in values, with [`flags::TOTAL`].
        pub total: u16,
        /// The data.
        pub data: Vec<u8>,
    }

    /// Reads an input.
    pub fn parse(data: &[u8]) -> (Spec, Vec<Frame>) {
        let mut inp = Input::new(data);
        let spec = Spec {
            members: inp.u8(),
            me: inp.u8(),
            num_params: inp.u8(),
            num_slots: inp.u8(),
            reduction: inp.u8(),
            max_frame_floats: inp.u8(),
            world: inp.u8(),
        };
        let mut frames = Vec::new();
        while !inp.is_empty() && frames.len() < MAX_FRAMES {
            let fl = inp.u8();
            let from = inp.u8();
            let step = inp.u8();
            let kind = inp.u8();
            let index = if fl & flags::WIDE_INDEX != 0 {
                inp.u64()
            } else {
                u64::from(inp.u8())
            };
            let chunk = inp.u8();
            let offset = if fl & flags::WIDE_OFFSET != 0 {
                inp.u64()
            } else {
                u64::from(inp.u16())
            };
            let loss_bits = if fl & flags::RAW_LOSS != 0 {
                inp.u64()
            } else {
                u64::from(inp.u32())
            };
            let total = if fl & flags::TOTAL != 0 { inp.u16() } else { 0 };
            let len = usize::from(inp.u8());
            let len = if fl & flags::RAW_DATA != 0 {
                len
            } else {
                4 * len
            };
            let data = inp.bytes(len).to_vec();
            frames.push(Frame {
                flags: fl,
                from,
                step,
                kind,
                index,
                chunk,
                offset,
                loss_bits,
                total,
                data,
            });
        }
        (spec, frames)
    }

    /// Writes an input that [`parse`] reads back.
    pub fn encode(spec: &Spec, frames: &[Frame]) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(spec.members)
            .u8(spec.me)
            .u8(spec.num_params)
            .u8(spec.num_slots)
            .u8(spec.reduction)
            .u8(spec.max_frame_floats)
            .u8(spec.world);
        for f in frames {
            out.u8(f.flags).u8(f.from).u8(f.step).u8(f.kind);
            if f.flags & flags::WIDE_INDEX != 0 {
                out.u64(f.index);
            } else {
                out.u8(f.index as u8);
            }
            out.u8(f.chunk);
            if f.flags & flags::WIDE_OFFSET != 0 {
                out.u64(f.offset);
            } else {
                out.u16(f.offset as u16);
            }
            if f.flags & flags::RAW_LOSS != 0 {
                out.u64(f.loss_bits);
            } else {
                out.u32(f.loss_bits as u32);
            }
            if f.flags & flags::TOTAL != 0 {
                out.u16(f.total);
            }
            if f.flags & flags::RAW_DATA != 0 {
                out.u8(f.data.len() as u8);
            } else {
                out.u8((f.data.len() / 4) as u8);
            }
            out.bytes(&f.data);
        }
        out.0
    }
}

/// The input layout of the `state_transfer` target: either a donor's answer to a
/// requester's `FetchState` (the requester's checks of header and chunks), or a
/// requester's `StateRequest` to a donor hub (the donor's checks).
pub mod transfer {
    use super::{Input, Output};

    /// The job of both sides.
    pub const JOB: &str = "j";
    /// The generation the requester asks for and the donor publishes.
    pub const GENERATION: u64 = 5;
    /// The step the requester asks for (and the donor's state is at).
    pub const STEP: u64 = 7;
    /// The parameter hash the donor's state has.
    pub const HASH: &str = "h";
    /// The member allowed to fetch when the donor names receivers.
    pub const RECEIVER: &str = "r";
    /// Most chunks read from one input.
    pub const MAX_CHUNKS: usize = 64;

    /// Bits of the first byte.
    pub mod mode {
        /// The input is a request to a donor (else a donor's answer to a requester).
        pub const DONOR: u8 = 1;
    }

    /// Bits of [`Answer::flags`].
    pub mod answer_flags {
        /// The header's step is [`Answer::step`] (else the requested step).
        pub const OTHER_STEP: u8 = 2;
        /// The requester asks for the hash [`super::HASH`] (else any).
        pub const WANT_HASH: u8 = 4;
        /// The header's hash is another one.
        pub const OTHER_HASH: u8 = 8;
        /// The header's parameter count is [`super::Answer::huge_params`] with its top
        /// bit set (else the small count).
        pub const HUGE_PARAMS: u8 = 16;
    }

    /// Bits of [`Chunk::flags`].
    pub mod chunk_flags {
        /// The chunk carries the header.
        pub const HEADER: u8 = 1;
        /// The offset is [`super::Chunk::offset`] (else the values of the tensor sent so far).
        pub const RAW_OFFSET: u8 = 2;
        /// The chunk carries a checksum (so it is the last one).
        pub const CHECKSUM: u8 = 4;
        /// The checksum is a wrong one (else the Fletcher-64 of the data sent).
        pub const WRONG_CHECKSUM: u8 = 8;
        /// The data length byte counts bytes (else f32 values).
        pub const RAW_DATA: u8 = 16;
        /// The donor ends the stream with an error status here instead of the chunk.
        pub const ERROR: u8 = 32;
    }

    /// The donor's answer: the header it sends and its chunks.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Answer {
        /// [`answer_flags`] bits.
        pub flags: u8,
        /// The header's step with [`answer_flags::OTHER_STEP`].
        pub step: u8,
        /// The header's parameter count.
        pub params: u8,
        /// The parameter count with [`answer_flags::HUGE_PARAMS`].
        pub huge_params: u64,
        /// The chunks.
        pub chunks: Vec<Chunk>,
    }

    /// One chunk of an answer.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Chunk {
        /// [`chunk_flags`] bits.
        pub flags: u8,
        /// The tensor (0, 1, 2 are known).
        pub tensor: u8,
        /// The offset with [`chunk_flags::RAW_OFFSET`].
        pub offset: u64,
        /// The data.
        pub data: Vec<u8>,
    }

    /// Bits of [`Request::flags`].
    pub mod request_flags {
        /// The donor names the receivers of its state (only [`super::RECEIVER`]).
        pub const RECEIVERS: u8 = 2;
        /// The request is of another job.
        pub const OTHER_JOB: u8 = 4;
        /// The requester is [`super::RECEIVER`] (else another member).
        pub const AS_RECEIVER: u8 = 8;
        /// The request names the donor's hash.
        pub const RIGHT_HASH: u8 = 16;
        /// The request names another hash (else none, with [`RIGHT_HASH`] unset).
        pub const WRONG_HASH: u8 = 32;
    }

    /// A request to a donor that published a state of [`Request::params`] values.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Request {
        /// [`request_flags`] bits.
        pub flags: u8,
        /// The donor's state has `params % 64` values per tensor.
        pub params: u8,
        /// The generation asked for: `GENERATION - 1 + generation % 3`.
        pub generation: u8,
        /// The step asked for.
        pub step: u8,
        /// The donor's frame size: `1 + frame % 16` values.
        pub frame: u8,
    }

    /// One input of the target.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Case {
        /// A donor's answer to the requester.
        Answer(Answer),
        /// A request to the donor.
        Request(Request),
    }

    /// Reads an input.
    pub fn parse(data: &[u8]) -> Case {
        let mut inp = Input::new(data);
        let first = inp.u8();
        if first & mode::DONOR != 0 {
            return Case::Request(Request {
                flags: first,
                params: inp.u8(),
                generation: inp.u8(),
                step: inp.u8(),
                frame: inp.u8(),
            });
        }
        let mut a = Answer {
            flags: first,
            step: inp.u8(),
            params: inp.u8(),
            huge_params: inp.u64(),
            chunks: Vec::new(),
        };
        while !inp.is_empty() && a.chunks.len() < MAX_CHUNKS {
            let flags = inp.u8();
            let tensor = inp.u8();
            let offset = if flags & chunk_flags::RAW_OFFSET != 0 {
                inp.u64()
            } else {
                0
            };
            let len = usize::from(inp.u8());
            let len = if flags & chunk_flags::RAW_DATA != 0 {
                len
            } else {
                4 * len
            };
            let data = inp.bytes(len).to_vec();
            a.chunks.push(Chunk {
                flags,
                tensor,
                offset,
                data,
            });
        }
        Case::Answer(a)
    }

    /// Writes an input that [`parse`] reads back.
    pub fn encode(case: &Case) -> Vec<u8> {
        let mut out = Output::default();
        match case {
            Case::Request(r) => {
                out.u8(r.flags | mode::DONOR)
                    .u8(r.params)
                    .u8(r.generation)
                    .u8(r.step)
                    .u8(r.frame);
            }
            Case::Answer(a) => {
                out.u8(a.flags & !mode::DONOR)
                    .u8(a.step)
                    .u8(a.params)
                    .u64(a.huge_params);
                for c in &a.chunks {
                    out.u8(c.flags).u8(c.tensor);
                    if c.flags & chunk_flags::RAW_OFFSET != 0 {
                        out.u64(c.offset);
                    }
                    if c.flags & chunk_flags::RAW_DATA != 0 {
                        out.u8(c.data.len() as u8);
                    } else {
                        out.u8((c.data.len() / 4) as u8);
                    }
                    out.bytes(&c.data);
                }
            }
        }
        out.0
    }

    /// The payload checksum of a state transfer: Fletcher-64 over little-endian u32
    /// words, as 32 hex digits (the donor's `PayloadSum`, which is private to the
    /// cluster crate; a wrong copy here only makes the "right checksum" inputs fail).
    #[derive(Clone, Debug, Default)]
    pub struct Fletcher64 {
        a: u64,
        b: u64,
    }

    impl Fletcher64 {
        /// Adds whole words of `data`.
        pub fn update(&mut self, data: &[u8]) {
            for w in data.chunks_exact(4) {
                self.a = self
                    .a
                    .wrapping_add(u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
                self.b = self.b.wrapping_add(self.a);
            }
        }

        /// The checksum so far.
        pub fn hex(&self) -> String {
            format!("{:016x}{:016x}", self.a, self.b)
        }
    }
}

/// The fixed world of the `state_stream` target, whose inputs are raw bytes: a first
/// byte of [`mode`] bits, then either a donor's answer on a state stream (what the
/// requester's `fetch_state` reads) or a client's request (what a donor hub's
/// `PeerHub::incoming` reads). The seeds are recorded from tenax's own two ends.
pub mod stream {
    use tenax_cluster::peer::{HubConfig, StateSnapshot};

    /// The job of both sides.
    pub const JOB: &str = "j";
    /// The generation the donor hubs publish (and the requester asks for): the largest,
    /// so that no request is for a newer one, which a donor would wait up to a minute
    /// for (`MAX_PUBLICATION_WAIT`) instead of answering.
    pub const GENERATION: u64 = u64::MAX;
    /// The step of the donors' state (and the one the requester asks for).
    pub const STEP: u64 = 7;
    /// The parameter hash of the donors' state.
    pub const HASH: &str = "h";
    /// The member the requester is (and the only receiver of the donor that names one).
    pub const RECEIVER: &str = "r";
    /// Values per tensor of the donors' state.
    pub const PARAMS: usize = 5;
    /// Values per frame of the donors: [`PARAMS`] takes three frames per tensor.
    pub const FRAME_FLOATS: usize = 2;

    /// Bits of the first byte.
    pub mod mode {
        /// The rest is a client's request to a donor hub (else a donor's answer to the
        /// requester).
        pub const DONOR: u8 = 1;
        /// Request: to the donor that serves only [`super::RECEIVER`] (else to the one
        /// that serves every member). Answer: the requester asks for the hash
        /// [`super::HASH`] (else any).
        pub const NARROW: u8 = 2;
    }

    /// One input of the target.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Case<'a> {
        /// A donor's answer to the requester (status, header, frames).
        Answer {
            /// The requester asks for [`HASH`] (else any hash).
            want_hash: bool,
            /// The bytes the donor sends.
            bytes: &'a [u8],
        },
        /// A client's first bytes to a donor hub (magic, length, request).
        Request {
            /// To the donor that serves only [`RECEIVER`].
            receivers: bool,
            /// The bytes the client sends.
            bytes: &'a [u8],
        },
    }

    /// Reads an input.
    pub fn parse(data: &[u8]) -> Case<'_> {
        let (first, bytes) = match data.split_first() {
            Some((&f, rest)) => (f, rest),
            None => (0, data),
        };
        let narrow = first & mode::NARROW != 0;
        if first & mode::DONOR != 0 {
            Case::Request {
                receivers: narrow,
                bytes,
            }
        } else {
            Case::Answer {
                want_hash: narrow,
                bytes,
            }
        }
    }

    /// Writes an input that [`parse`] reads back.
    pub fn encode(case: &Case<'_>) -> Vec<u8> {
        let (first, bytes) = match *case {
            Case::Answer { want_hash, bytes } => (if want_hash { mode::NARROW } else { 0 }, bytes),
            Case::Request { receivers, bytes } => (
                mode::DONOR | if receivers { mode::NARROW } else { 0 },
                bytes,
            ),
        };
        let mut out = vec![first];
        out.extend_from_slice(bytes);
        out
    }

    /// The state the donor hubs publish.
    pub fn state() -> StateSnapshot {
        let values = |k: f32| (0..PARAMS).map(|i| k + i as f32).collect::<Vec<f32>>();
        StateSnapshot {
            step: STEP,
            cursor: 3,
            opt_step: 2,
            param_hash: HASH.into(),
            params: values(0.0),
            m: values(0.5),
            v: values(0.25),
            guard_state: Vec::new(),
        }
    }

    /// The donor hubs' config: frames of [`FRAME_FLOATS`] values.
    pub fn donor_config() -> HubConfig {
        HubConfig {
            max_frame_floats: FRAME_FLOATS,
            ..HubConfig::default()
        }
    }

    /// The requester's config: the state stream on (whatever the default is).
    pub fn requester_config() -> HubConfig {
        HubConfig {
            state_stream: true,
            ..HubConfig::default()
        }
    }
}

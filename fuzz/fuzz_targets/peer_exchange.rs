//! Peer frames as a member's hub receives them (tenax-cluster `PeerHub`, the served side of
//! the `Exchange` rpc, and the communicator of the installed generation): the input (see
//! `tenax_fuzz::exchange`) gives a communicator spec and a sequence of frames; the frames
//! are encoded as a gRPC request body and decoded by tonic into the `Streaming` the hub
//! reads, so every frame goes the way a received one does: routing by job and
//! generation, buffering of newer generations, and the step's checks (sender, kind,
//! slot, round, chunk, piece offset and length, duplicates). Any frame is taken or refused
//! (the communicator aborts on a bad one), never a panic. The frame decoders themselves
//! (`StepState::frame`) are private to the cluster crate; this is the public way in.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tenax_cluster::peer::HubConfig;
use tenax_cluster::{
    Collective, CommSpec, GrpcCollective, PeerAddr, PeerHub, Reduction, SlotContribution,
};
use tenax_fuzz::exchange::{self, flags, member_id, GENERATION, JOB};
use tenax_proto::v1::peer_server::Peer;
use tenax_proto::v1::PeerFrame;
use tonic::codec::Streaming;
use tonic::Request;

/// The hub's (and every spec's largest) frame size, in values.
const HUB_FRAME_FLOATS: usize = 16;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn spec_of(s: &exchange::Spec, generation: u64) -> CommSpec {
    let m = 2 + usize::from(s.members % 3);
    let me = usize::from(s.me) % m;
    let world = (1 + u32::from(s.world % 8)).max(m as u32);
    CommSpec {
        job: JOB.into(),
        generation,
        // Nothing listens there: the sending tasks retry their connects until dropped.
        members: (0..m)
            .map(|k| PeerAddr {
                id: member_id(k),
                addr: "127.0.0.1:9".into(),
            })
            .collect(),
        me,
        local_ranks: (0..world).filter(|r| *r as usize % m == me).collect(),
        world,
        num_slots: 1 + u64::from(s.num_slots % 8),
        num_params: usize::from(s.num_params),
        reduction: if s.reduction & 1 != 0 {
            Reduction::Ring
        } else {
            Reduction::Exact
        },
        max_frame_floats: 1 + usize::from(s.max_frame_floats) % HUB_FRAME_FLOATS,
        connect_deadline: Duration::from_secs(3600),
        // Whole slots: the stage parts of a pipeline split across members are not fed.
        stage: None,
    }
}

/// The gRPC request body of `frames`: each message with its 5-byte prefix.
fn body_of(frames: &[exchange::Frame], members: usize) -> bytes::Bytes {
    let mut body = BytesMut::new();
    for f in frames {
        let generation = if f.flags & flags::OLDER != 0 {
            GENERATION - 1
        } else if f.flags & flags::NEWER != 0 {
            GENERATION + 1
        } else {
            GENERATION
        };
        let frame = PeerFrame {
            job: if f.flags & flags::OTHER_JOB != 0 {
                "x".into()
            } else {
                JOB.into()
            },
            generation,
            from_member: member_id(usize::from(f.from) % (members + 1)),
            step: u64::from(f.step),
            kind: i32::from(f.kind),
            index: f.index,
            chunk: u32::from(f.chunk),
            offset: f.offset,
            loss_sum: if f.flags & flags::RAW_LOSS != 0 {
                f64::from_bits(f.loss_bits)
            } else {
                f64::from(f32::from_bits(f.loss_bits as u32))
            },
            data: f.data.clone(),
            total: u64::from(f.total),
        };
        body.put_u8(0);
        body.put_u32(frame.encoded_len() as u32);
        frame.encode(&mut body).expect("a BytesMut grows");
    }
    body.freeze()
}

/// Hands in this member's slots of `step` (deterministic gradients).
fn contribute(comm: &GrpcCollective, spec: &CommSpec, step: u64) {
    for slot in spec.my_slots() {
        let grad = (0..spec.num_params)
            .map(|i| slot as f32 + i as f32 / 8.0)
            .collect();
        let _ = comm.contribute(
            step,
            SlotContribution {
                slot,
                loss_sum: 1.0 + slot as f32,
                grad,
            },
        );
    }
}

async fn exchange(hub: &PeerHub, body: bytes::Bytes) {
    let stream = Streaming::new_request(
        tonic_prost::ProstDecoder::<PeerFrame>::default(),
        http_body_util::Full::new(body),
        None,
        Some(tenax_cluster::peer::message_limit_bytes(HUB_FRAME_FLOATS)),
    );
    let _ = hub.exchange(Request::new(stream)).await;
}

fuzz_target!(|data: &[u8]| {
    let (s, frames) = exchange::parse(data);
    let spec = spec_of(&s, GENERATION);
    let body = body_of(&frames, spec.members.len());
    let steps: Vec<u64> = {
        let mut v: Vec<u64> = frames.iter().map(|f| u64::from(f.step)).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // The member computing each slot (rank r is hosted by member r % members).
    let mut owners = vec![0usize; spec.num_slots as usize];
    for r in 0..spec.world {
        let slots =
            tenax_core::slots::slots_for_rank(spec.num_slots, u64::from(spec.world), u64::from(r));
        for slot in slots {
            owners[slot as usize] = r as usize % spec.members.len();
        }
    }
    runtime().block_on(async {
        let hub = PeerHub::new(
            JOB,
            HubConfig {
                max_frame_floats: HUB_FRAME_FLOATS,
                max_buffered_frames: 64,
                max_buffered_bytes: 1 << 16,
                ..HubConfig::default()
            },
        );
        let comm: Arc<GrpcCollective> =
            GrpcCollective::new(&hub, spec.clone()).expect("a valid spec installs");
        // Bits 1 and 2 of the reduction byte: this member's own slots of steps 0 and 1
        // go in before the frames.
        if s.reduction & 2 != 0 {
            contribute(&comm, &spec, 0);
        }
        if s.reduction & 4 != 0 {
            contribute(&comm, &spec, 1);
        }
        exchange(&hub, body).await;
        for &step in &steps {
            let _ = comm.progress(step);
            let _ = comm.late_members(step, &owners);
            let _ = comm.reduced(step, Duration::ZERO);
        }
        let _ = comm.failed_peers();
        // The next generation takes the frames the hub buffered for it.
        if frames.iter().any(|f| f.flags & flags::NEWER != 0) {
            if let Ok(next) = GrpcCollective::new(&hub, spec_of(&s, GENERATION + 1)) {
                for &step in &steps {
                    let _ = next.progress(step);
                }
            }
        }
        hub.shutdown();
    });
    // The communicators are gone and their sending tasks cancelled: let the runtime run
    // those tasks to their end (a block_on whose future is ready at once never does), or
    // every input would leave its tasks queued and the process would grow without bound.
    runtime().block_on(async {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
});

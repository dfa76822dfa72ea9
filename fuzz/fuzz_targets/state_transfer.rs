//! State transfer (tenax-cluster `fetch_state` and the donor side of the `FetchState` rpc):
//! the input (see `tenax_fuzz::transfer`) is either
//! - a donor's answer (the `StateHeader`, the `StateChunk`s, a checksum or an error), which
//!   a fake donor served over a real gRPC connection on 127.0.0.1 streams to
//!   `fetch_state`: the requester checks the header (step, hash, parameter count) and
//!   every chunk (tensor order, offsets, whole values, bounds, completeness, checksum)
//!   and returns a state or a `TransferError`, never panics; or
//! - a `StateRequest` to a donor hub that published a small state: it is refused or
//!   answered with a well-formed stream (header first, every value once, the checksum
//!   last).
//!
//! The header's parameter count is either small (a byte) or beyond what any machine can
//! hold (top bit set); counts in between make the requester reserve up to 12 bytes per
//! value before any data arrives, by design, which libFuzzer's malloc limit would report.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use tenax_cluster::peer::{fetch_state, HubConfig, StateSnapshot};
use tenax_cluster::{PeerAddr, PeerHub};
use tenax_fuzz::transfer::{
    self, answer_flags, chunk_flags, request_flags, Answer, Case, Fletcher64, Request, GENERATION,
    HASH, JOB, RECEIVER, STEP,
};
use tenax_proto::v1::peer_server::{Peer, PeerServer};
use tenax_proto::v1::{ExchangeReply, PeerFrame, StateChunk, StateHeader, StateRequest};
use tonic::{Response, Status, Streaming};

/// The hub's frame size, in values.
const HUB_FRAME_FLOATS: usize = 16;

type Answered = Vec<Result<StateChunk, Status>>;

/// What the fake donor answers the next `FetchState` with.
static NEXT_ANSWER: Mutex<Option<Answered>> = Mutex::new(None);

/// A donor that answers every `FetchState` with [`NEXT_ANSWER`].
struct FakeDonor;

#[tonic::async_trait]
impl Peer for FakeDonor {
    async fn exchange(
        &self,
        _request: tonic::Request<Streaming<PeerFrame>>,
    ) -> Result<Response<ExchangeReply>, Status> {
        Err(Status::unimplemented("a fake donor"))
    }

    type FetchStateStream = BoxStream<'static, Result<StateChunk, Status>>;

    async fn fetch_state(
        &self,
        _request: tonic::Request<StateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        let chunks = NEXT_ANSWER
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Status::unavailable("no answer set"))?;
        Ok(Response::new(futures::stream::iter(chunks).boxed()))
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    donor: PeerAddr,
    requester: PeerHub,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a port on 127.0.0.1");
        let addr = listener.local_addr().expect("its address");
        // No Nagle on the donor's side either (the requester sets it on its own): small
        // answers would wait for the requester's delayed ACK.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(FakeDonor))
                .serve_with_incoming(incoming),
        );
        let requester = rt.block_on(async {
            PeerHub::new(
                JOB,
                HubConfig {
                    max_frame_floats: HUB_FRAME_FLOATS,
                    // The gRPC FetchState path (the state stream, on by default, is the
                    // state_stream target's).
                    state_stream: false,
                    ..HubConfig::default()
                },
            )
        });
        World {
            rt,
            donor: PeerAddr {
                id: "donor".into(),
                addr: addr.to_string(),
            },
            requester,
        }
    })
}

/// The chunks (or the error) the fake donor streams for `a`.
fn answer_of(a: &Answer) -> Answered {
    let header = StateHeader {
        step: if a.flags & answer_flags::OTHER_STEP != 0 {
            u64::from(a.step)
        } else {
            STEP
        },
        cursor: 3,
        opt_step: 2,
        param_hash: if a.flags & answer_flags::OTHER_HASH != 0 {
            "other".into()
        } else {
            HASH.into()
        },
        num_params: if a.flags & answer_flags::HUGE_PARAMS != 0 {
            a.huge_params | (1 << 63)
        } else {
            u64::from(a.params)
        },
        guard_state: Vec::new(),
    };
    let mut sent = [0u64; 256];
    let mut sum = Fletcher64::default();
    let mut out = Vec::new();
    for c in &a.chunks {
        if c.flags & chunk_flags::ERROR != 0 {
            out.push(Err(Status::internal("the donor failed")));
            break;
        }
        let t = usize::from(c.tensor);
        let offset = if c.flags & chunk_flags::RAW_OFFSET != 0 {
            c.offset
        } else {
            sent[t]
        };
        sent[t] += c.data.len() as u64 / 4;
        sum.update(&c.data);
        let payload_checksum = match (
            c.flags & chunk_flags::CHECKSUM != 0,
            c.flags & chunk_flags::WRONG_CHECKSUM != 0,
        ) {
            (false, _) => String::new(),
            (true, false) => sum.hex(),
            (true, true) => "0".repeat(32),
        };
        out.push(Ok(StateChunk {
            header: (c.flags & chunk_flags::HEADER != 0).then(|| header.clone()),
            tensor: u32::from(c.tensor),
            offset,
            data: c.data.clone(),
            payload_checksum,
        }));
    }
    out
}

fn requester(w: &World, a: &Answer) {
    *NEXT_ANSWER.lock().unwrap() = Some(answer_of(a));
    let want_hash = if a.flags & answer_flags::WANT_HASH != 0 {
        HASH
    } else {
        ""
    };
    let got = w.rt.block_on(fetch_state(
        &w.requester,
        GENERATION,
        "me",
        &w.donor,
        STEP,
        want_hash,
        Duration::from_secs(20),
    ));
    if let Ok((state, _)) = got {
        assert_eq!(state.params.len(), state.m.len());
        assert_eq!(state.params.len(), state.v.len());
        assert_eq!(state.step, STEP);
    }
}

fn donor(w: &World, r: &Request) {
    w.rt.block_on(async {
        let hub = PeerHub::new(
            JOB,
            HubConfig {
                max_frame_floats: 1 + usize::from(r.frame % 16),
                ..HubConfig::default()
            },
        );
        let n = usize::from(r.params % 64);
        let values = |k: f32| (0..n).map(|i| k + i as f32).collect::<Vec<f32>>();
        let state = Arc::new(StateSnapshot {
            step: STEP,
            cursor: 1,
            opt_step: 1,
            param_hash: HASH.into(),
            params: values(0.0),
            m: values(0.5),
            v: values(0.25),
            guard_state: Vec::new(),
        });
        let _publication = if r.flags & request_flags::RECEIVERS != 0 {
            hub.publish_state_for(GENERATION, Arc::clone(&state), vec![RECEIVER.into()])
        } else {
            hub.publish_state(GENERATION, Arc::clone(&state))
        };
        let req = StateRequest {
            job: if r.flags & request_flags::OTHER_JOB != 0 {
                "x".into()
            } else {
                JOB.into()
            },
            generation: GENERATION - 1 + u64::from(r.generation % 3),
            from_member: if r.flags & request_flags::AS_RECEIVER != 0 {
                RECEIVER.into()
            } else {
                "other".into()
            },
            step: u64::from(r.step),
            param_hash: if r.flags & request_flags::RIGHT_HASH != 0 {
                HASH.into()
            } else if r.flags & request_flags::WRONG_HASH != 0 {
                "wrong".into()
            } else {
                String::new()
            },
            wait_ms: 0,
        };
        let Ok(resp) = Peer::fetch_state(&hub, tonic::Request::new(req)).await else {
            return;
        };
        // What a donor answers is a well-formed transfer of its state.
        let mut stream = resp.into_inner();
        let mut sum = Fletcher64::default();
        let mut data = Vec::new();
        let mut first = true;
        let mut checksum = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("a donor's stream does not fail");
            assert!(checksum.is_empty(), "a chunk after the checksum");
            assert_eq!(
                chunk.header.is_some(),
                first,
                "the header is in the first chunk only"
            );
            first = false;
            sum.update(&chunk.data);
            data.extend_from_slice(&chunk.data);
            checksum = chunk.payload_checksum;
        }
        let mut want = Vec::new();
        for t in [&state.params, &state.m, &state.v] {
            want.extend(t.iter().flat_map(|v| v.to_le_bytes()));
        }
        assert_eq!(data, want, "the donor sends every value once, in order");
        assert_eq!(checksum, sum.hex(), "the donor's checksum");
    });
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    match transfer::parse(data) {
        Case::Answer(a) => requester(w, &a),
        Case::Request(r) => donor(w, &r),
    }
});

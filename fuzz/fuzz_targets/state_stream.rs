//! The state stream (tenax-cluster `peer::stream`: `FetchState` as raw frames on the
//! peer port): the input (see `tenax_fuzz::stream`) is a mode byte and raw bytes, either
//! - a donor's answer (status byte, length, `StateHeader` or refusal, then 16-byte frame
//!   heads with their payloads and the end frame's checksum), which a fake donor on
//!   127.0.0.1 sends to a real `fetch_state` with `HubConfig::state_stream` on, after
//!   reading its request: the requester refuses it with a `TransferError` or returns a
//!   state of three equal tensors at the requested step, never panics, never reserves
//!   what a header claims before the data comes (libFuzzer's malloc limit would report
//!   it), and its request is well-formed; or
//! - a client's first bytes to a donor hub's peer port, demuxed by `PeerHub::incoming`:
//!   without the magic they reach the gRPC side unchanged (through `Rewind`); with it the
//!   donor answers nothing (an unreadable request), a refusal (a gRPC code and a UTF-8
//!   message, nothing after it), or exactly the published state's header, frames and
//!   checksum, and the latter only to a request of the right job, generation, step and
//!   hash from a member it serves.
//!
//! Every input is bounded in time: the fetch by a 10 s deadline, the client's reads by a
//! 10 s timeout (the fake donor answers at once and closes, and answers a retry, after a
//! `RESOURCE_EXHAUSTED`, with a final refusal; the donor hubs publish the largest
//! generation, so no request waits for a newer one).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tenax_cluster::peer::{
    fetch_state, Publication, FRAME_DATA, FRAME_END, MAX_REQUEST_BYTES, STATE_STREAM_MAGIC,
};
use tenax_cluster::{PeerAddr, PeerHub};
use tenax_fuzz::stream::{
    self, donor_config, requester_config, state, Case, FRAME_FLOATS, GENERATION, HASH, JOB,
    RECEIVER, STEP,
};
use tenax_fuzz::transfer::Fletcher64;
use tenax_proto::v1::{StateHeader, StateRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

/// Longest a fetch, or a client's read of a donor's answer, may take.
const LIMIT: Duration = Duration::from_secs(10);

/// What the fake donor answers the next state stream with (a retry gets a refusal).
static NEXT_ANSWER: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// The first bytes (magic, length, request) the fake donor read last.
static LAST_REQUEST: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// A donor hub serving on 127.0.0.1.
struct Donor {
    addr: String,
    _hub: PeerHub,
    _publication: Publication,
}

struct World {
    rt: tokio::runtime::Runtime,
    fake_donor: PeerAddr,
    requester: PeerHub,
    /// Serving every member, and serving only [`RECEIVER`].
    donors: [Donor; 2],
    /// The bytes of each connection that `PeerHub::incoming` passed on as not a state
    /// stream (read to their end).
    rewound: Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// Every byte a donor sends for an accepted request.
    accepted_answer: Vec<u8>,
}

/// A donor hub whose `incoming` is fed by a listener on 127.0.0.1, every connection it
/// passes on read to its end and sent to `rewound`.
async fn donor(receivers: bool, rewound: mpsc::UnboundedSender<Vec<u8>>) -> Donor {
    let hub = PeerHub::new(JOB, donor_config());
    let state = Arc::new(state());
    let publication = if receivers {
        hub.publish_state_for(GENERATION, state, vec![RECEIVER.into()])
    } else {
        hub.publish_state(GENERATION, state)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on 127.0.0.1");
    let addr = listener.local_addr().expect("its address").to_string();
    let mut passed = hub.incoming(TcpListenerStream::new(listener));
    tokio::spawn(async move {
        while let Some(conn) = passed.next().await {
            let Ok(mut conn) = conn else { continue };
            let rewound = rewound.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                if let Ok(Ok(_)) = tokio::time::timeout(LIMIT, conn.read_to_end(&mut all)).await {
                    let _ = rewound.send(all);
                }
            });
        }
    });
    Donor {
        addr,
        _hub: hub,
        _publication: publication,
    }
}

/// A donor that reads a state stream's first bytes into [`LAST_REQUEST`], answers with
/// [`NEXT_ANSWER`] and closes.
async fn fake_donor() -> PeerAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on 127.0.0.1");
    let addr = listener.local_addr().expect("its address").to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(LIMIT, async {
                    let mut first = [0u8; 12];
                    conn.read_exact(&mut first).await?;
                    let mut got = first.to_vec();
                    let len = u32::from_le_bytes(first[8..].try_into().expect("4 bytes")) as usize;
                    if len <= MAX_REQUEST_BYTES {
                        let mut req = vec![0u8; len];
                        conn.read_exact(&mut req).await?;
                        got.extend_from_slice(&req);
                    }
                    *LAST_REQUEST.lock().unwrap() = Some(got);
                    let answer = NEXT_ANSWER.lock().unwrap().take().unwrap_or_else(|| {
                        let mut no = vec![tonic::Code::Unavailable as i32 as u8];
                        no.extend_from_slice(&13u32.to_le_bytes());
                        no.extend_from_slice(b"answered once");
                        no
                    });
                    conn.write_all(&answer).await?;
                    conn.shutdown().await?;
                    // Until the requester closes: closing with its bytes unread would
                    // reset the connection.
                    let mut rest = Vec::new();
                    conn.read_to_end(&mut rest).await?;
                    std::io::Result::Ok(())
                })
                .await;
            });
        }
    });
    PeerAddr {
        id: "donor".into(),
        addr,
    }
}

/// What a donor sends for an accepted request, written from the documented wire format
/// (not with the donor's writer): status 0, the header, [`FRAME_FLOATS`] values per data
/// frame, tensor by tensor, and the end frame with the Fletcher-64 of the data.
fn accepted_answer() -> Vec<u8> {
    let s = state();
    let header = StateHeader {
        step: s.step,
        cursor: s.cursor,
        opt_step: s.opt_step,
        param_hash: s.param_hash.clone(),
        num_params: s.params.len() as u64,
        guard_state: s.guard_state.clone(),
    }
    .encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    let frame = |out: &mut Vec<u8>, kind: u8, tensor: u8, offset: u64, payload: &[u8]| {
        out.extend_from_slice(&[kind, tensor, 0, 0]);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(payload);
    };
    let mut sum = Fletcher64::default();
    for (t, values) in [&s.params, &s.m, &s.v].into_iter().enumerate() {
        for (k, piece) in values.chunks(FRAME_FLOATS).enumerate() {
            let data = tenax_fuzz::f32_bytes(piece);
            sum.update(&data);
            frame(
                &mut out,
                FRAME_DATA,
                t as u8,
                (k * FRAME_FLOATS) as u64,
                &data,
            );
        }
    }
    frame(&mut out, FRAME_END, 0, 0, sum.hex().as_bytes());
    out
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (tx, rx) = mpsc::unbounded_channel();
        let (fake_donor, requester, donors) = rt.block_on(async {
            (
                fake_donor().await,
                PeerHub::new(JOB, requester_config()),
                [donor(false, tx.clone()).await, donor(true, tx).await],
            )
        });
        World {
            rt,
            fake_donor,
            requester,
            donors,
            rewound: Mutex::new(rx),
            accepted_answer: accepted_answer(),
        }
    })
}

/// The request in a state stream's first bytes (magic, length, protobuf), if any.
fn request_in(first: &[u8]) -> Option<StateRequest> {
    if first.len() < 12 || first[..8] != STATE_STREAM_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(first[8..12].try_into().expect("4 bytes")) as usize;
    let body = first[12..].get(..len)?;
    StateRequest::decode(body).ok()
}

fn requester(w: &World, want_hash: bool, answer: &[u8]) {
    *NEXT_ANSWER.lock().unwrap() = Some(answer.to_vec());
    *LAST_REQUEST.lock().unwrap() = None;
    let want = if want_hash { HASH } else { "" };
    let got = w.rt.block_on(fetch_state(
        &w.requester,
        GENERATION,
        RECEIVER,
        &w.fake_donor,
        STEP,
        want,
        LIMIT,
    ));
    match got {
        Ok((state, stats)) => {
            let n = state.params.len();
            assert_eq!(n, state.m.len());
            assert_eq!(n, state.v.len());
            assert_eq!(state.step, STEP);
            if want_hash {
                assert_eq!(state.param_hash, HASH);
            }
            assert_eq!(stats.bytes, 12 * n as u64);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // What tenax's requester sent (the fake donor reads it before answering).
    if let Some(first) = LAST_REQUEST.lock().unwrap().take() {
        let req = request_in(&first).expect("the requester's first bytes are a request");
        assert_eq!(
            (
                req.job.as_str(),
                req.generation,
                req.from_member.as_str(),
                req.step,
                req.param_hash.as_str()
            ),
            (JOB, GENERATION, RECEIVER, STEP, want)
        );
    }
}

fn donor_side(w: &World, receivers: bool, bytes: &[u8]) {
    let mut rewound = w.rewound.lock().unwrap();
    while rewound.try_recv().is_ok() {}
    let addr = &w.donors[usize::from(receivers)].addr;
    let (answer, clean) = w.rt.block_on(async {
        let mut conn = TcpStream::connect(addr).await.expect("the donor listens");
        let _ = conn.set_nodelay(true);
        // A donor that stops reading (a request it refused) may reset the connection.
        let _ = conn.write_all(bytes).await;
        let _ = conn.shutdown().await;
        let mut answer = Vec::new();
        let clean = matches!(
            tokio::time::timeout(LIMIT, conn.read_to_end(&mut answer)).await,
            Ok(Ok(_))
        );
        (answer, clean)
    });
    if bytes.len() >= 8 && bytes[..8] != STATE_STREAM_MAGIC {
        // Not a state stream: the gRPC side gets every byte, the first 8 put back.
        assert!(
            answer.is_empty(),
            "a donor answered a gRPC connection itself"
        );
        let passed =
            w.rt.block_on(async { tokio::time::timeout(LIMIT, rewound.recv()).await })
                .expect("a connection without the magic is passed on")
                .expect("the donors run");
        assert_eq!(passed, bytes, "what the gRPC side reads");
        return;
    }
    if answer.is_empty() {
        // Too short to tell, or an unreadable request: dropped without an answer.
        return;
    }
    if answer[0] == 0 {
        let want = &w.accepted_answer;
        if clean {
            assert_eq!(&answer, want, "the donor's state stream");
        } else {
            assert!(want.starts_with(&answer), "the donor's state stream (cut)");
        }
        let req = request_in(bytes).expect("an accepted request is one");
        assert_eq!(req.job, JOB);
        assert_eq!(req.generation, GENERATION);
        assert_eq!(req.step, STEP);
        assert!(req.param_hash.is_empty() || req.param_hash == HASH);
        if receivers {
            assert_eq!(req.from_member, RECEIVER, "served a member not a receiver");
        }
        return;
    }
    // A refusal: a gRPC code, a length, a UTF-8 message, nothing after.
    assert!((1..=16).contains(&answer[0]), "status byte {}", answer[0]);
    if let Some(head) = answer.get(1..5) {
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        assert!(len <= MAX_REQUEST_BYTES, "a refusal of {len} bytes");
        let message = &answer[5..];
        assert!(message.len() <= len, "bytes after a refusal");
        if clean {
            assert_eq!(message.len(), len, "a refusal cut short");
            assert!(std::str::from_utf8(message).is_ok());
        }
    } else {
        assert!(!clean, "a refusal cut short");
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    match stream::parse(data) {
        Case::Answer { want_hash, bytes } => requester(w, want_hash, bytes),
        Case::Request { receivers, bytes } => donor_side(w, receivers, bytes),
    }
});

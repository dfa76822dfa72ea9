//! Three members on 127.0.0.1, each with its own hub and server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tenax_proto::v1::peer_client::PeerClient;
use tenax_proto::v1::{FrameKind, PeerFrame};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::collective::{Collective, CollectiveError, Reduced, SlotContribution, SlotFold};

const JOB: &str = "job-t";

struct Node {
    hub: PeerHub,
    addr: String,
    stop: CancellationToken,
    _server: JoinHandle<()>,
}

async fn start_node() -> Node {
    let hub = PeerHub::new(JOB, HubConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let service = hub.service();
    let token = stop.clone();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
            .await;
    });
    Node {
        hub,
        addr,
        stop,
        _server: server,
    }
}

fn members(nodes: &[Node]) -> Vec<PeerAddr> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| PeerAddr {
            id: format!("m{i}"),
            addr: n.addr.clone(),
        })
        .collect()
}

const WORLD: u32 = 4;
const SLOTS: u64 = 8;
const PARAMS: usize = 1000;

/// Member 0 hosts ranks 0 and 1, member 1 rank 2, member 2 rank 3.
fn ranks_of(member: usize) -> Vec<u32> {
    match member {
        0 => vec![0, 1],
        1 => vec![2],
        _ => vec![3],
    }
}

fn spec(nodes: &[Node], me: usize, generation: u64, reduction: Reduction) -> CommSpec {
    spec_with(nodes, me, generation, reduction, PARAMS)
}

fn spec_with(
    nodes: &[Node],
    me: usize,
    generation: u64,
    reduction: Reduction,
    num_params: usize,
) -> CommSpec {
    let world = if nodes.len() == 1 { 1 } else { WORLD };
    CommSpec {
        job: JOB.into(),
        generation,
        members: members(nodes),
        me,
        local_ranks: if nodes.len() == 1 {
            vec![0]
        } else {
            ranks_of(me)
        },
        world,
        num_slots: SLOTS,
        num_params,
        reduction,
        max_frame_floats: 7,
        connect_deadline: Duration::from_secs(5),
    }
}

async fn build(nodes: &[Node], generation: u64, reduction: Reduction) -> Vec<Arc<GrpcCollective>> {
    (0..nodes.len())
        .map(|me| {
            GrpcCollective::new(&nodes[me].hub, spec(nodes, me, generation, reduction)).unwrap()
        })
        .collect()
}

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

/// A slot's contribution: values of mixed magnitudes so that the order of additions shows.
fn contribution(step: u64, slot: u64) -> SlotContribution {
    contribution_n(step, slot, PARAMS)
}

fn contribution_n(step: u64, slot: u64, num_params: usize) -> SlotContribution {
    let mut s = step * 1_000_003 + slot * 7919 + 1;
    let grad = (0..num_params)
        .map(|_| {
            let mantissa = (lcg(&mut s) % 2_000_001) as f32 / 1_000_000.0 - 1.0;
            let scale = [1e-3f32, 1.0, 1e3, 3.7][(lcg(&mut s) % 4) as usize];
            mantissa * scale
        })
        .collect();
    SlotContribution {
        slot,
        loss_sum: (lcg(&mut s) % 100_000) as f32 / 7.0,
        grad,
    }
}

fn expected(step: u64) -> Reduced {
    expected_n(step, PARAMS)
}

fn expected_n(step: u64, num_params: usize) -> Reduced {
    let mut fold = SlotFold::new(step, SLOTS);
    for slot in 0..SLOTS {
        fold.add(contribution_n(step, slot, num_params)).unwrap();
    }
    fold.finish().unwrap()
}

/// Every local rank of the given members on its own thread: contributes its slots in
/// scrambled order, then waits for the result. Returns (rank, result) pairs.
async fn run_step(
    comms: &[Arc<GrpcCollective>],
    which: &[usize],
    step: u64,
    timeout: Duration,
) -> Vec<(u32, Result<Arc<Reduced>, CollectiveError>)> {
    let mut jobs = Vec::new();
    for &m in which {
        for rank in comms[m].spec().local_ranks.clone() {
            let comm = Arc::clone(&comms[m]);
            jobs.push(std::thread::spawn(move || {
                let spec = comm.spec();
                let slots: Vec<u64> = tenax_core::slots::slots_for_rank(
                    SLOTS,
                    u64::from(spec.world),
                    u64::from(rank),
                )
                .collect();
                let mut order = slots.clone();
                let mut s = step + u64::from(rank) * 31;
                for i in (1..order.len()).rev() {
                    order.swap(i, lcg(&mut s) as usize % (i + 1));
                }
                for slot in order {
                    let c = contribution_n(step, slot, spec.num_params);
                    if let Err(e) = comm.contribute(step, c) {
                        return (rank, Err(e));
                    }
                }
                (rank, comm.reduced(step, timeout))
            }));
        }
    }
    tokio::task::spawn_blocking(move || jobs.into_iter().map(|j| j.join().unwrap()).collect())
        .await
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_is_bit_identical_to_a_single_fold() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    for step in 10..13 {
        let results = run_step(&comms, &[0, 1, 2], step, Duration::from_secs(10)).await;
        let want = expected(step);
        assert_eq!(results.len(), 4);
        for (rank, r) in results {
            let r = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert_eq!(r.step, step);
            assert_eq!(r.loss_sum.to_bits(), want.loss_sum.to_bits(), "rank {rank}");
            assert!(
                bits(&r.grad_sum) == bits(&want.grad_sum),
                "rank {rank} step {step}"
            );
        }
    }
    for n in &nodes {
        assert_eq!(n.hub.stale_refused(), 0);
        assert_eq!(n.hub.other_refused(), 0);
        assert!(n.hub.frames_accepted() > 0);
        assert!(n.hub.bytes_sent() > 4 * PARAMS as u64);
        assert!(n.hub.bytes_received() > 4 * PARAMS as u64);
    }
    for c in &comms {
        c.close(Duration::from_secs(5)).await;
        assert!(c.aborted().is_none(), "{:?}", c.aborted());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_agrees_everywhere_and_is_close_to_exact() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Ring).await;
    for step in 0..2 {
        let results = run_step(&comms, &[0, 1, 2], step, Duration::from_secs(10)).await;
        let want = expected(step);
        let first = results[0].1.as_ref().unwrap().clone();
        for (rank, r) in &results {
            let r = r.as_ref().unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert!(
                bits(&r.grad_sum) == bits(&first.grad_sum),
                "rank {rank} differs"
            );
            assert_eq!(
                r.loss_sum.to_bits(),
                want.loss_sum.to_bits(),
                "loss is exact"
            );
        }
        let mut abs_sum = vec![0.0f64; PARAMS];
        for slot in 0..SLOTS {
            for (a, g) in abs_sum.iter_mut().zip(contribution(step, slot).grad) {
                *a += f64::from(g.abs());
            }
        }
        let mut differing = 0;
        for (i, ((got, want), scale)) in first
            .grad_sum
            .iter()
            .zip(&want.grad_sum)
            .zip(&abs_sum)
            .enumerate()
        {
            let diff = (f64::from(*got) - f64::from(*want)).abs();
            assert!(diff <= 1e-5 * scale + 1e-12, "param {i}: {got} vs {want}");
            differing += usize::from(got.to_bits() != want.to_bits());
        }
        // Not a claim the ring must differ, just a look at how often it does.
        eprintln!("step {step}: ring differs from exact in {differing} of {PARAMS} values");
    }
}

fn state_frame(job: &str, generation: u64, from: &str, step: u64, hash: &str) -> PeerFrame {
    PeerFrame {
        job: job.into(),
        generation,
        from_member: from.into(),
        step,
        kind: FrameKind::State as i32,
        data: hash.as_bytes().to_vec(),
        ..PeerFrame::default()
    }
}

async fn send_raw(addr: &str, frames: Vec<PeerFrame>) -> tenax_proto::v1::ExchangeReply {
    let mut client = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    client
        .exchange(tokio_stream::iter(frames))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generations_are_refused_newer_ones_wait() {
    let nodes = vec![start_node().await, start_node().await];
    let a = &nodes[0];
    let two = GrpcCollective::new(&a.hub, spec(&nodes, 0, 2, Reduction::Exact)).unwrap();
    assert_eq!(a.hub.installed_generation(), Some(2));

    let reply = send_raw(&a.addr, vec![state_frame(JOB, 1, "m1", 5, "old")]).await;
    assert_eq!(
        (reply.accepted, reply.refused_stale, reply.refused_other),
        (0, 1, 0)
    );
    assert_eq!(a.hub.stale_refused(), 1);

    let reply = send_raw(
        &a.addr,
        vec![
            state_frame(JOB, 3, "m1", 7, "cafe"),
            state_frame("another-job", 2, "m1", 7, "cafe"),
        ],
    )
    .await;
    assert_eq!(
        (reply.accepted, reply.refused_stale, reply.refused_other),
        (1, 0, 1)
    );
    assert_eq!(a.hub.buffered_frames(), 1);
    assert_eq!(a.hub.other_refused(), 1);

    // Installing generation 3 supersedes 2 and delivers the buffered state frame.
    let three = GrpcCollective::new(&a.hub, spec(&nodes, 0, 3, Reduction::Exact)).unwrap();
    assert_eq!(a.hub.buffered_frames(), 0);
    match two.reduced(0, Duration::from_secs(5)) {
        Err(CollectiveError::Aborted { reason }) => {
            assert!(reason.contains("superseded by generation 3"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let states = three
        .exchange_state(7, "beef", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        states,
        vec![
            MemberState {
                id: "m0".into(),
                step: 7,
                param_hash: "beef".into()
            },
            MemberState {
                id: "m1".into(),
                step: 7,
                param_hash: "cafe".into()
            },
        ]
    );
    // An older generation cannot be installed again.
    assert!(GrpcCollective::new(&a.hub, spec(&nodes, 0, 3, Reduction::Exact)).is_err());
    // Member 1 never built generation 3: member 0's state waits in its buffer.
    assert_eq!(nodes[1].hub.installed_generation(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes[1].hub.buffered_frames() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(nodes[1].hub.buffered_frames() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_times_out_and_abort_wakes_at_once() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    let started = Instant::now();
    let results = run_step(&comms, &[0, 1], 0, Duration::from_millis(500)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(results.len(), 3);
    for (rank, r) in results {
        match r {
            Err(CollectiveError::Timeout {
                arrived, expected, ..
            }) => {
                assert_eq!(expected, SLOTS);
                assert!(arrived < SLOTS, "rank {rank}");
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    let waiter = Arc::clone(&comms[1]);
    let wait = std::thread::spawn(move || {
        let t = Instant::now();
        (waiter.reduced(0, Duration::from_secs(30)), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    comms[1].abort("operator stop");
    let (r, waited) = tokio::task::spawn_blocking(move || wait.join().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(r, Err(CollectiveError::Aborted { ref reason }) if reason == "operator stop"),
        "{r:?}"
    );
    assert!(waited < Duration::from_secs(10));
    assert!(matches!(
        comms[1].contribute(0, contribution(0, 4)),
        Err(CollectiveError::Aborted { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_member_is_noticed_without_hanging() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    let results = run_step(&comms, &[0, 1, 2], 0, Duration::from_secs(10)).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()));

    // Member 2 dies: its communicator stops, its hub ends every stream, its server stops.
    comms[2].abort("killed");
    nodes[2].hub.shutdown();
    nodes[2].stop.cancel();

    let started = Instant::now();
    let results = run_step(&comms, &[0, 1], 1, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(8));
    for (rank, r) in results {
        match r {
            Err(CollectiveError::Aborted { reason }) => {
                assert!(reason.contains("m2"), "rank {rank}: {reason}")
            }
            Err(CollectiveError::Timeout { .. }) => {}
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // The stream failure reaches both survivors' communicators (they send to m2).
    let deadline = Instant::now() + Duration::from_secs(5);
    while comms[..2].iter().any(|c| c.aborted().is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in &comms[..2] {
        let reason = c.aborted().expect("aborted");
        assert!(reason.contains("m2"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_state_returns_every_member_in_order() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 4, Reduction::Exact).await;
    let t = Duration::from_secs(5);
    let (a, b, c) = tokio::join!(
        comms[0].exchange_state(100, "h0", t),
        comms[1].exchange_state(100, "h1", t),
        comms[2].exchange_state(101, "h2", t),
    );
    let want: Vec<MemberState> = [(100, "h0"), (100, "h1"), (101, "h2")]
        .iter()
        .enumerate()
        .map(|(i, (step, h))| MemberState {
            id: format!("m{i}"),
            step: *step,
            param_hash: h.to_string(),
        })
        .collect();
    assert_eq!(a.unwrap(), want);
    assert_eq!(b.unwrap(), want);
    assert_eq!(c.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_too_far_ahead_is_a_protocol_error() {
    let nodes = vec![start_node().await, start_node().await];
    let comm = GrpcCollective::new(&nodes[0].hub, spec(&nodes, 0, 1, Reduction::Exact)).unwrap();
    let loss = |step: u64| PeerFrame {
        job: JOB.into(),
        generation: 1,
        from_member: "m1".into(),
        step,
        kind: FrameKind::Loss as i32,
        index: 7,
        loss_sum: 1.0,
        ..PeerFrame::default()
    };
    // Step 3 opens a step; step 9 is more than two ahead of it.
    let reply = send_raw(&nodes[0].addr, vec![loss(3), loss(9)]).await;
    assert_eq!((reply.accepted, reply.refused_other), (1, 1));
    let reason = comm.aborted().expect("aborted");
    assert!(reason.contains("more than two steps ahead"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_and_empty_chunks_are_exact() {
    // One member: no network at all; both reductions are a plain slot-order fold.
    for reduction in [Reduction::Exact, Reduction::Ring] {
        let nodes = vec![start_node().await];
        let comm = GrpcCollective::new(&nodes[0].hub, spec(&nodes, 0, 1, reduction)).unwrap();
        let results = run_step(&[comm], &[0], 3, Duration::from_secs(10)).await;
        let want = expected(3);
        let got = results[0].1.as_ref().unwrap();
        assert_eq!(bits(&got.grad_sum), bits(&want.grad_sum), "{reduction}");
        assert_eq!(got.loss_sum.to_bits(), want.loss_sum.to_bits());
    }
    // Two values over three members: chunk 0 is empty and travels as an empty piece.
    for reduction in [Reduction::Exact, Reduction::Ring] {
        let nodes = vec![start_node().await, start_node().await, start_node().await];
        let comms: Vec<_> = (0..3)
            .map(|me| {
                GrpcCollective::new(&nodes[me].hub, spec_with(&nodes, me, 1, reduction, 2)).unwrap()
            })
            .collect();
        let results = run_step(&comms, &[0, 1, 2], 0, Duration::from_secs(10)).await;
        let want = expected_n(0, 2);
        for (rank, r) in results {
            let r = r.unwrap_or_else(|e| panic!("{reduction} rank {rank}: {e}"));
            assert_eq!(r.grad_sum.len(), 2);
            if reduction == Reduction::Exact {
                assert_eq!(bits(&r.grad_sum), bits(&want.grad_sum), "rank {rank}");
            }
        }
    }
}

#[test]
fn reduction_names_and_chunks() {
    assert_eq!("exact".parse::<Reduction>().unwrap(), Reduction::Exact);
    assert_eq!("Ring".parse::<Reduction>().unwrap(), Reduction::Ring);
    assert!("tree".parse::<Reduction>().is_err());
    assert_eq!(Reduction::default().to_string(), "exact");
    assert_eq!(Reduction::Ring.to_string(), "ring");
    let chunks: Vec<_> = (0..3).map(|k| chunk_range(1000, 3, k)).collect();
    assert_eq!(chunks, vec![0..333, 333..666, 666..1000]);
    assert_eq!(chunk_range(2, 3, 0), 0..0);
    assert_eq!(piece_count(0, 7), 1);
    assert_eq!(piece_count(14, 7), 2);
    assert_eq!(piece_count(15, 7), 3);
    assert_eq!(message_limit_bytes(1 << 20), (4 << 20) + 65536);
}

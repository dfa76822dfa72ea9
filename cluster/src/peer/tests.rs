//! Three members on 127.0.0.1, each with its own hub and server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tenax_proto::v1::peer_client::PeerClient;
use tenax_proto::v1::{FrameKind, PeerFrame, StateChunk, StateRequest};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::collective::{Collective, CollectiveError, Reduced, SlotContribution, SlotFold};

const JOB: &str = "job-t";

/// The bound of every wait for something that must happen: far above what it takes on a
/// loaded machine, so that only a hang reaches it.
const WAIT: Duration = Duration::from_secs(60);

/// Polls `done` every 10 ms until it holds; panics, naming `what`, after [`WAIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Node {
    hub: PeerHub,
    addr: String,
    stop: CancellationToken,
    _server: JoinHandle<()>,
}

async fn start_node() -> Node {
    start_node_with(PeerHub::new(JOB, HubConfig::default())).await
}

async fn start_node_with(hub: PeerHub) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let service = hub.service();
    let incoming_hub = hub.clone();
    let token = stop.clone();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                incoming_hub.incoming(TcpListenerStream::new(listener)),
                token.cancelled_owned(),
            )
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
        stage: None,
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
        let results = run_step(&comms, &[0, 1, 2], step, WAIT).await;
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
        let results = run_step(&comms, &[0, 1, 2], step, WAIT).await;
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
    let states = three.exchange_state(7, "beef", WAIT).await.unwrap();
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
    wait_until("member 1 buffers member 0's state frame", || {
        nodes[1].hub.buffered_frames() >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_times_out_and_abort_wakes_at_once() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    // Member 2 never contributes: every rank waits its whole timeout, not less (a result
    // that never comes would never return, which only the test runner's limit catches).
    let results = run_step(&comms, &[0, 1], 0, Duration::from_millis(500)).await;
    assert_eq!(results.len(), 3);
    for (rank, r) in results {
        match r {
            Err(CollectiveError::Timeout {
                waited_ms,
                arrived,
                expected,
                ..
            }) => {
                assert!(waited_ms >= 500, "rank {rank}: {waited_ms} ms");
                assert_eq!(expected, SLOTS);
                assert!(arrived < SLOTS, "rank {rank}");
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // A rank blocked in `reduced` with a long timeout: the abort must wake it, not its
    // timeout. The abort comes once the rank demonstrably waits.
    let timeout = Duration::from_secs(120);
    let waiter = Arc::clone(&comms[1]);
    let wait = std::thread::spawn(move || {
        let t = Instant::now();
        (waiter.reduced(0, timeout), t.elapsed())
    });
    wait_until("the rank waits in reduced", || {
        comms[1].waiting_in_reduced() == 1
    })
    .await;
    comms[1].abort("operator stop");
    let (r, waited) = tokio::task::spawn_blocking(move || wait.join().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(r, Err(CollectiveError::Aborted { ref reason }) if reason == "operator stop"),
        "{r:?}"
    );
    // Not woken, it would sleep the whole 120 s (and then report the abort too); half of
    // it is the room a loaded machine gets to deliver a wake-up.
    assert!(waited < timeout / 2, "woken after {waited:?}");
    assert!(matches!(
        comms[1].contribute(0, contribution(0, 4)),
        Err(CollectiveError::Aborted { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_member_is_noticed_without_hanging() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    let results = run_step(&comms, &[0, 1, 2], 0, WAIT).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()));

    // Member 2 dies: its communicator stops, its hub ends every stream, its server stops.
    comms[2].abort("killed");
    nodes[2].hub.shutdown();
    nodes[2].stop.cancel();

    // Every rank returns: with the abort of the failed stream, or at its own 5 s timeout
    // (a rank that hung would not return at all).
    let results = run_step(&comms, &[0, 1], 1, Duration::from_secs(5)).await;
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
    wait_until("both survivors abort", || {
        comms[..2].iter().all(|c| c.aborted().is_some())
    })
    .await;
    for c in &comms[..2] {
        let reason = c.aborted().expect("aborted");
        assert!(reason.contains("m2"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_state_returns_every_member_in_order() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 4, Reduction::Exact).await;
    let t = WAIT;
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
async fn a_member_stopping_at_the_boundary_ends_the_next_step_at_once() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms = build(&nodes, 1, Reduction::Exact).await;
    let results = run_step(&comms, &[0, 1, 2], 0, WAIT).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    // Members 0 and 1 start step 1 and wait for it (all three ranks); member 2 saw a
    // newer plan and stops after step 1.
    let timeout = Duration::from_secs(120);
    let waiters = tokio::spawn({
        let comms = comms.clone();
        async move { run_step(&comms, &[0, 1], 1, timeout).await }
    });
    wait_until("the three ranks wait for step 1", || {
        comms[0].waiting_in_reduced() == 2 && comms[1].waiting_in_reduced() == 1
    })
    .await;
    let started = Instant::now();
    comms[2].stop_after(1);
    let results = waiters.await.unwrap();
    // Without the wake-up they would sleep their whole 120 s timeout (and then see the
    // boundary); half of it is the room a loaded machine gets to deliver it.
    assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
    for (rank, r) in results {
        match r {
            Err(CollectiveError::Aborted { reason }) => {
                assert!(reason.contains("m2 stopped"), "rank {rank}: {reason}")
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // Member 2 stays healthy: its own step 1 was never started, nothing was aborted.
    assert!(comms[2].aborted().is_none());
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
        let results = run_step(&[comm], &[0], 3, WAIT).await;
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
        let results = run_step(&comms, &[0, 1, 2], 0, WAIT).await;
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

/// Frames of gradient chunks large enough are folded with the async worker handed off,
/// and the result is still the exact slot-order fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_are_folded_off_the_async_workers_bit_identically() {
    // 3 members, a chunk of 200,000 floats each: frames of ~800 KB.
    let n = 600_000;
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let comms: Vec<_> = (0..3)
        .map(|me| {
            let mut s = spec_with(&nodes, me, 1, Reduction::Exact, n);
            s.max_frame_floats = 1 << 18;
            GrpcCollective::new(&nodes[me].hub, s).unwrap()
        })
        .collect();
    let results = run_step(&comms, &[0, 1, 2], 5, WAIT).await;
    let want = expected_n(5, n);
    for (rank, r) in results {
        let r = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert!(bits(&r.grad_sum) == bits(&want.grad_sum), "rank {rank}");
        assert_eq!(r.loss_sum.to_bits(), want.loss_sum.to_bits());
    }
    let off: u64 = nodes.iter().map(|n| n.hub.frames_taken_off_runtime()).sum();
    assert!(off > 0, "no frame was taken off the async workers");
    for c in &comms {
        c.close(Duration::from_secs(5)).await;
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

// ---------------------------------------------------------------------------
// State transfer (FetchState)
// ---------------------------------------------------------------------------

/// A snapshot of `n` values per tensor with arbitrary bit patterns (NaNs included), so
/// that any conversion that is not bit-exact shows.
fn snapshot(n: usize, step: u64, seed: u64) -> StateSnapshot {
    let mut s = seed;
    let mut vector = || -> Vec<f32> {
        (0..n)
            .map(|_| f32::from_bits((lcg(&mut s) as u32) ^ ((lcg(&mut s) as u32) << 31)))
            .collect()
    };
    let (params, m, v) = (vector(), vector(), vector());
    // Arbitrary bytes (not even UTF-8) in the guard state: the hub must not read them.
    let guard_state = (0..(n % 300 + 40)).map(|_| lcg(&mut s) as u8).collect();
    StateSnapshot {
        step,
        cursor: step * 1000 + 17,
        opt_step: step + 3,
        param_hash: format!("hash-{step}-{seed}"),
        params,
        m,
        v,
        guard_state,
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn donor_of(node: &Node) -> PeerAddr {
    PeerAddr {
        id: "donor".into(),
        addr: node.addr.clone(),
    }
}

/// A fetching hub that takes the state over the state stream (`true`) or gRPC.
fn fetcher(stream: bool) -> PeerHub {
    PeerHub::new(
        JOB,
        HubConfig {
            state_stream: stream,
            ..HubConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_transfer_round_trip_is_bit_identical() {
    let donor_node = start_node().await;
    let donor = donor_of(&donor_node);
    let n = 2_500_003; // three chunks per tensor, the last one short
    let state = Arc::new(snapshot(n, 42, 7));
    let t = Duration::from_secs(60);
    let bytes = 12 * n as u64;
    for (k, stream) in [true, false].into_iter().enumerate() {
        let generation = 3 + 2 * k as u64;
        let hub = fetcher(stream);
        let publication = donor_node.hub.publish_state(generation, Arc::clone(&state));
        assert_eq!(donor_node.hub.published_generation(), Some(generation));
        let (got, stats) = fetch_state(&hub, generation, "m1", &donor, 42, &state.param_hash, t)
            .await
            .unwrap();
        assert_eq!(
            (got.step, got.cursor, got.opt_step, got.param_hash.as_str()),
            (42, 42_017, 45, state.param_hash.as_str())
        );
        assert!(same_bits(&got.params, &state.params), "stream {stream}");
        assert!(same_bits(&got.m, &state.m), "stream {stream}");
        assert!(same_bits(&got.v, &state.v), "stream {stream}");
        // The training guard's state comes with the header, byte for byte.
        assert!(!state.guard_state.is_empty());
        assert_eq!(got.guard_state, state.guard_state, "stream {stream}");
        assert_eq!((stats.bytes, stats.chunks), (bytes, 9), "stream {stream}");
        assert!(stats.gb_per_s() > 0.0);
        publication.wait_served(1, WAIT).await.unwrap();
        assert_eq!(publication.served(), 1);
        assert_eq!(
            donor_node.hub.state_bytes_served(),
            bytes * (2 * k as u64 + 1)
        );
        assert_eq!(hub.state_bytes_fetched(), bytes);
        // Any hash is fine when none is asked for; a second transfer counts too.
        let (again, _) = fetch_state(&hub, generation, "m1", &donor, 42, "", t)
            .await
            .unwrap();
        assert!(same_bits(&again.v, &state.v));
        publication.wait_served(2, WAIT).await.unwrap();
        let err = publication
            .wait_served(3, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.contains("2 of 3"), "{err}");

        // An empty state travels as one chunk over gRPC, as no data frame over the stream.
        let empty = Arc::new(snapshot(0, 1, 1));
        let _p = donor_node
            .hub
            .publish_state(generation + 1, Arc::clone(&empty));
        let (got, stats) = fetch_state(&hub, generation + 1, "m1", &donor, 1, "", t)
            .await
            .unwrap();
        assert_eq!(got, *empty);
        assert_eq!((stats.bytes, stats.chunks), (0, u64::from(!stream)));
    }
}

async fn raw_fetch(addr: &str, req: StateRequest) -> tonic::Status {
    let mut client = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    match client.fetch_state(req).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the request was served"),
                    Err(status) => return status,
                }
            }
        }
    }
}

fn request(generation: u64, step: u64, wait_ms: u64) -> StateRequest {
    StateRequest {
        job: JOB.into(),
        generation,
        from_member: "m1".into(),
        step,
        param_hash: String::new(),
        wait_ms,
    }
}

fn refused(r: Result<(StateSnapshot, TransferStats), TransferError>) -> (tonic::Code, String) {
    match r {
        Err(e @ TransferError::Refused { code, .. }) => (code, e.to_string()),
        Err(e) => panic!("not a refusal: {e}"),
        Ok((s, _)) => panic!("served {s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_transfer_refuses_mismatches_and_waits_for_a_publication() {
    let nodes = [start_node().await, start_node().await];
    let (hub, donor) = (&nodes[1].hub, donor_of(&nodes[0]));
    let t = WAIT;
    let state = Arc::new(snapshot(1000, 7, 1));
    let five = nodes[0].hub.publish_state(5, Arc::clone(&state));

    let (code, msg) = refused(fetch_state(hub, 5, "m1", &donor, 7, "wrong-hash", t).await);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(
        msg.contains("wrong-hash") && msg.contains(&donor.addr),
        "{msg}"
    );
    let (code, msg) = refused(fetch_state(hub, 5, "m1", &donor, 8, "", t).await);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(msg.contains("requested step 8"), "{msg}");
    let (code, msg) = refused(fetch_state(hub, 4, "m1", &donor, 7, "", t).await);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(
        msg.contains("stale") && msg.contains("generation 5"),
        "{msg}"
    );
    let mut other = request(5, 7, 0);
    other.job = "another-job".into();
    let status = raw_fetch(&nodes[0].addr, other).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("another-job"), "{status:?}");
    assert_eq!(five.served(), 0);

    // Generation 6 is published while the request for it waits at the donor (a waiting
    // request is the one subscriber of the donor's publications).
    let publications = nodes[0].hub.publication();
    assert_eq!(publications.receiver_count(), 0);
    let (hub1, donor1) = (hub.clone(), donor.clone());
    let waiting =
        tokio::spawn(async move { fetch_state(&hub1, 6, "m1", &donor1, 9, "", WAIT).await });
    wait_until("the request waits at the donor", || {
        publications.receiver_count() == 1
    })
    .await;
    let six = nodes[0]
        .hub
        .publish_state(6, Arc::new(snapshot(3000, 9, 2)));
    let (got, _) = waiting.await.unwrap().unwrap();
    assert_eq!(got.step, 9);
    assert_eq!(six.served(), 1);
    assert_eq!(five.served(), 0, "replaced by generation 6");
    // Generation 5 is now stale; dropping the old handle does not withdraw generation 6.
    drop(five);
    assert_eq!(nodes[0].hub.published_generation(), Some(6));

    // Nothing published within the wait: NOT_FOUND after the wait asked for.
    let status = raw_fetch(&nodes[0].addr, request(7, 9, 100)).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("within 100 ms"), "{status:?}");
    // fetch_state lets the donor wait for part of its timeout, so NOT_FOUND comes first
    // (not a timeout of the fetch). An 8 s timeout leaves the largest margin, 2 s, for
    // the answer to come back on a loaded machine.
    let (code, msg) =
        refused(fetch_state(hub, 7, "m1", &donor, 9, "", Duration::from_secs(8)).await);
    assert_eq!(code, tonic::Code::NotFound, "{msg}");
    assert!(msg.contains("no state published for generation 7"), "{msg}");
    // A withdrawn publication is not served.
    drop(six);
    assert_eq!(nodes[0].hub.published_generation(), None);
    let status = raw_fetch(&nodes[0].addr, request(6, 9, 50)).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // A request waiting when the hub shuts down ends at once: UNAVAILABLE, where one
    // the shutdown did not wake would answer NOT_FOUND after its 30 s wait.
    let addr = nodes[0].addr.clone();
    let waiting = tokio::spawn(async move { raw_fetch(&addr, request(8, 9, 30_000)).await });
    wait_until("the request waits at the donor", || {
        publications.receiver_count() == 1
    })
    .await;
    nodes[0].hub.shutdown();
    let status = waiting.await.unwrap();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_transfer_from_a_dead_donor_fails_in_time() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let hub = PeerHub::new(JOB, HubConfig::default());
    let donor = PeerAddr {
        id: "gone".into(),
        addr: addr.clone(),
    };
    let started = Instant::now();
    let timeout = Duration::from_millis(700);
    let err = fetch_state(&hub, 1, "m1", &donor, 0, "", timeout)
        .await
        .unwrap_err();
    // The refused connects are retried until the deadline and no further: a fetch that
    // ignored its deadline would retry for ever. The 10 s of slack are for a loaded
    // machine, not a claim about how quickly a refusal comes back.
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_secs(10), "{took:?}");
    let msg = err.to_string();
    assert!(msg.contains(&addr) && msg.contains("gone"), "{msg}");
    assert!(
        matches!(
            err,
            TransferError::Connect { .. } | TransferError::TimedOut { .. }
        ),
        "{msg}"
    );
}

/// A donor that serves whatever chunks it is given (to check the requester's checks).
#[derive(Clone)]
struct FakeDonor(Vec<StateChunk>);

#[tonic::async_trait]
impl tenax_proto::v1::peer_server::Peer for FakeDonor {
    async fn exchange(
        &self,
        _: tonic::Request<tonic::Streaming<PeerFrame>>,
    ) -> Result<tonic::Response<tenax_proto::v1::ExchangeReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    type FetchStateStream = futures::stream::BoxStream<'static, Result<StateChunk, tonic::Status>>;

    async fn fetch_state(
        &self,
        _: tonic::Request<StateRequest>,
    ) -> Result<tonic::Response<Self::FetchStateStream>, tonic::Status> {
        use futures::StreamExt;
        Ok(tonic::Response::new(
            futures::stream::iter(self.0.clone().into_iter().map(Ok)).boxed(),
        ))
    }
}

async fn fake_donor(chunks: Vec<StateChunk>) -> (PeerAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(tenax_proto::v1::peer_server::PeerServer::new(FakeDonor(
                chunks,
            )))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
            .await;
    });
    (
        PeerAddr {
            id: "fake".into(),
            addr,
        },
        stop,
    )
}

/// The chunks a real donor sends for two values per tensor, one value per chunk.
fn fake_chunks() -> Vec<StateChunk> {
    let header = tenax_proto::v1::StateHeader {
        step: 5,
        cursor: 0,
        opt_step: 5,
        param_hash: "h".into(),
        num_params: 2,
        // As a donor without the training guard sends it.
        guard_state: Vec::new(),
    };
    let mut chunks = Vec::new();
    let mut all = Vec::new();
    for tensor in 0..3u32 {
        for offset in 0..2u64 {
            let data = (tensor as f32 * 10.0 + offset as f32)
                .to_le_bytes()
                .to_vec();
            all.extend_from_slice(&data);
            chunks.push(StateChunk {
                header: chunks.is_empty().then(|| header.clone()),
                tensor,
                offset,
                data,
                payload_checksum: String::new(),
            });
        }
    }
    let mut sum = super::transfer::PayloadSum::default();
    sum.update(&all);
    let sum = sum.finalize();
    chunks.last_mut().unwrap().payload_checksum = sum;
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_transfer_checks_every_chunk_and_the_checksum() {
    let hub = fetcher(false);
    let t = WAIT;
    // The untampered stream is accepted.
    let (donor, stop) = fake_donor(fake_chunks()).await;
    let (got, _) = fetch_state(&hub, 1, "m1", &donor, 5, "h", t).await.unwrap();
    assert_eq!(
        (got.params, got.m, got.v),
        (vec![0.0, 1.0], vec![10.0, 11.0], vec![20.0, 21.0])
    );
    stop.cancel();

    type Tamper = fn(&mut Vec<StateChunk>);
    let cases: Vec<(&str, Tamper)> = vec![
        ("checksum mismatch", |c| {
            c[3].data = 7.0f32.to_le_bytes().to_vec()
        }),
        ("offset 0 but 1 values came before", |c| c[3].offset = 0),
        ("not whole f32 values", |c| c[2].data = vec![1, 2, 3]),
        ("past its end", |c| c[1].data = vec![0; 8]),
        ("tensor 2 starts but tensor 1 has only 1", |c| {
            c.remove(3);
        }),
        ("without a checksum", |c| {
            c.pop();
        }),
        ("first chunk has no header", |c| c[0].header = None),
        ("step 5, not the requested step 6", |_| {}),
        // The header's count is the donor's word: it is not reserved up front (12 TiB
        // here), the stream is refused where it falls short.
        (
            "tensor 1 starts but tensor 0 has only 2 of 1099511627776 values",
            |c| c[0].header.as_mut().unwrap().num_params = 1 << 40,
        ),
    ];
    for (want, tamper) in cases {
        let mut chunks = fake_chunks();
        tamper(&mut chunks);
        let (donor, stop) = fake_donor(chunks).await;
        let step = if want.contains("step 6") { 6 } else { 5 };
        let err = fetch_state(&hub, 1, "m1", &donor, step, "", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want) && err.contains(&donor.addr),
            "{want}: {err}"
        );
        stop.cancel();
    }
}

/// Loopback throughput of a ~100M-value state (3 x 33.3M floats, 400 MB):
/// `cargo test -p tenax-cluster --release --lib peer::tests::state_transfer_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a throughput figure, run by hand in release"]
async fn state_transfer_throughput() {
    let nodes = [start_node().await, start_node().await];
    let n = 33_333_333;
    let values = |k: u32| -> Vec<f32> { (0..n as u32).map(|i| (i ^ k) as f32 * 0.5).collect() };
    let state = Arc::new(StateSnapshot {
        step: 1,
        cursor: 0,
        opt_step: 1,
        param_hash: "h".into(),
        params: values(0),
        m: values(1),
        v: values(2),
        guard_state: Vec::new(),
    });
    let _p = nodes[0].hub.publish_state(1, Arc::clone(&state));
    let donor = donor_of(&nodes[0]);
    for round in 0..3 {
        let (got, stats) = fetch_state(
            &nodes[1].hub,
            1,
            "m1",
            &donor,
            1,
            "h",
            Duration::from_secs(120),
        )
        .await
        .unwrap();
        assert_eq!(got.v.len(), n);
        println!(
            "round {round}: {} bytes in {} chunks, {:.3} s: {:.2} GB/s",
            stats.bytes,
            stats.chunks,
            stats.seconds,
            stats.gb_per_s()
        );
        drop(got);
    }
}

/// A member flooding 100,000 frames of far-future generations holds at most its share
/// of the buffer; the frames of the next generation from another member still get in
/// (evicting the flood's when the buffer is full) and reach the communicator installed
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_future_frames_cannot_keep_the_next_generation_out() {
    let nodes = vec![start_node().await, start_node().await];
    let a = &nodes[0];
    let _two = GrpcCollective::new(&a.hub, spec(&nodes, 0, 2, Reduction::Exact)).unwrap();
    let flood: Vec<PeerFrame> = (0..100_000u64)
        .map(|i| state_frame(JOB, 1_000 + i % 7, "evil", i, "flood"))
        .collect();
    let reply = send_raw(&a.addr, flood).await;
    let share =
        HubConfig::default().max_buffered_frames / HubConfig::default().buffered_share_per_peer;
    assert_eq!(
        reply.accepted as usize, share,
        "the flood holds its share only"
    );
    assert_eq!(reply.refused_other as usize, 100_000 - share);
    assert_eq!(a.hub.buffered_frames(), share);
    // The next generation's frame from member m1 is taken.
    let reply = send_raw(&a.addr, vec![state_frame(JOB, 3, "m1", 7, "cafe")]).await;
    assert_eq!((reply.accepted, reply.refused_other), (1, 0));
    // A frame of generation 3 from a sender that will not be a member of it is buffered,
    // then dropped on install: it must not abort the generation.
    let reply = send_raw(&a.addr, vec![state_frame(JOB, 3, "stranger", 7, "bad")]).await;
    assert_eq!(reply.accepted, 1);
    let three = GrpcCollective::new(&a.hub, spec(&nodes, 0, 3, Reduction::Exact)).unwrap();
    // Nor does one that comes once it is installed.
    let reply = send_raw(&a.addr, vec![state_frame(JOB, 3, "stranger", 7, "bad")]).await;
    assert_eq!((reply.accepted, reply.refused_other), (0, 1));
    let states = three.exchange_state(7, "beef", WAIT).await.unwrap();
    assert_eq!(
        states[1].param_hash, "cafe",
        "the buffered frame reached generation 3"
    );

    // A small buffer: frames of an earlier generation evict those of the latest one.
    let cfg = HubConfig {
        max_buffered_frames: 8,
        buffered_share_per_peer: 1,
        ..HubConfig::default()
    };
    let hub = PeerHub::new(JOB, cfg);
    let small = start_node_with(hub).await;
    let far: Vec<PeerFrame> = (0..8)
        .map(|i| state_frame(JOB, 50, "evil", i, "x"))
        .collect();
    assert_eq!(send_raw(&small.addr, far).await.accepted, 8);
    let next = send_raw(&small.addr, vec![state_frame(JOB, 4, "m1", 1, "y")]).await;
    assert_eq!(next.accepted, 1, "an earlier generation makes room");
    assert_eq!(small.hub.buffered_frames(), 1);
    let later = send_raw(&small.addr, vec![state_frame(JOB, 60, "evil", 9, "z")]).await;
    assert_eq!(
        later.accepted, 1,
        "room left: a later generation is still taken"
    );
}

/// A published state goes only to the members it is for; a donor serves at most its
/// bound of transfers at once (the others are told to retry, and a fetch retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_served_only_to_its_receivers() {
    let nodes = [start_node().await, start_node().await];
    let state = Arc::new(snapshot(1_000, 5, 3));
    let _p = nodes[0]
        .hub
        .publish_state_for(2, Arc::clone(&state), vec!["m1".into()]);
    let donor = donor_of(&nodes[0]);
    let t = Duration::from_secs(20);
    let (got, _) = fetch_state(&nodes[1].hub, 2, "m1", &donor, 5, "", t)
        .await
        .unwrap();
    assert!(same_bits(&got.params, &state.params));
    let e = fetch_state(&nodes[1].hub, 2, "intruder", &donor, 5, "", t)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("\"intruder\" is not among the receivers"),
        "{text}"
    );
    assert_eq!(nodes[0].hub.state_refused(), 1);
}

/// Two pipelines of two stages on four members (member `2p + s` runs stage `s` of
/// pipeline `p`): stage 0 gives values 0..300 and 600..700 of every slot, stage 1 the
/// rest and the loss. The reduced result is the single fold's, bit for bit, on every
/// member; and stage messages cross between them in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_parts_fold_like_whole_slots_and_stage_messages_cross() {
    let nodes: Vec<Node> = futures::future::join_all((0..4).map(|_| start_node())).await;
    let gives = [vec![0..300, 600..700], vec![300..600, 700..1000]];
    let comms: Vec<Arc<GrpcCollective>> = (0..4)
        .map(|me| {
            let (p, s) = (me / 2, me % 2);
            let spec = CommSpec {
                local_ranks: vec![p as u32],
                world: 2,
                stage: Some(StagePart {
                    gives: gives[s].clone(),
                    head: s == 1,
                    stage_frames_per_step: 64,
                }),
                ..spec_with(&nodes, me, 1, Reduction::Exact, PARAMS)
            };
            GrpcCollective::new(&nodes[me].hub, spec).unwrap()
        })
        .collect();
    for step in 3..5u64 {
        let jobs: Vec<_> = (0..4)
            .map(|me| {
                let comm = Arc::clone(&comms[me]);
                let ranges = gives[me % 2].clone();
                std::thread::spawn(move || {
                    let p = me as u64 / 2;
                    let slots = tenax_core::slots::slots_for_rank(SLOTS, 2, p);
                    // Stage messages: activations forward, gradients back, in pieces of 7.
                    for slot in slots.clone() {
                        let acts: Vec<f32> = (0..30).map(|i| (slot * 100 + i) as f32).collect();
                        if me % 2 == 0 {
                            comm.send_stage(me + 1, StageMessage::Activations, step, slot, &acts)
                                .unwrap();
                            let g = comm
                                .recv_stage(me + 1, StageMessage::Gradient, step, slot, WAIT)
                                .unwrap();
                            assert_eq!(g, acts.iter().map(|x| -x).collect::<Vec<_>>());
                        } else {
                            let a = comm
                                .recv_stage(me - 1, StageMessage::Activations, step, slot, WAIT)
                                .unwrap();
                            assert_eq!(a, acts);
                            let back: Vec<f32> = a.iter().map(|x| -x).collect();
                            comm.send_stage(me - 1, StageMessage::Gradient, step, slot, &back)
                                .unwrap();
                        }
                    }
                    for slot in slots.rev() {
                        let whole = contribution(step, slot);
                        let grad = ranges
                            .iter()
                            .flat_map(|r| whole.grad[r.clone()].to_vec())
                            .collect();
                        // Only the head's loss counts: the others' must not.
                        let loss_sum = if me % 2 == 1 { whole.loss_sum } else { 1e9 };
                        comm.contribute(
                            step,
                            SlotContribution {
                                slot,
                                loss_sum,
                                grad,
                            },
                        )
                        .unwrap();
                    }
                    comm.reduced(step, WAIT)
                })
            })
            .collect();
        let want = expected(step);
        for (me, j) in jobs.into_iter().enumerate() {
            let r = j
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("member {me}: {e}"));
            assert_eq!(r.loss_sum.to_bits(), want.loss_sum.to_bits(), "member {me}");
            assert!(
                bits(&r.grad_sum) == bits(&want.grad_sum),
                "member {me} step {step}"
            );
        }
    }
    // A part of the wrong size is refused before anything is sent.
    let e = comms[0]
        .contribute(
            9,
            SlotContribution {
                slot: 0,
                loss_sum: 0.0,
                grad: vec![0.0; 10],
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("the stage part 400"), "{e}");
    for c in &comms {
        c.close(Duration::from_secs(5)).await;
        assert!(c.aborted().is_none(), "{:?}", c.aborted());
    }
}

/// A stage message sent twice is a protocol error that aborts the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_message_sent_twice_is_refused() {
    let nodes = vec![start_node().await, start_node().await];
    let comm = GrpcCollective::new(&nodes[0].hub, spec(&nodes, 0, 1, Reduction::Exact)).unwrap();
    let msg = PeerFrame {
        job: JOB.into(),
        generation: 1,
        from_member: "m1".into(),
        step: 2,
        kind: FrameKind::Stage as i32,
        index: 1,
        chunk: StageMessage::Activations as u32,
        data: 1f32.to_le_bytes().to_vec(),
        total: 1,
        ..PeerFrame::default()
    };
    let reply = send_raw(&nodes[0].addr, vec![msg.clone()]).await;
    assert_eq!(reply.accepted, 1);
    assert!(comm.has_stage(StageMessage::Activations, 2, 1));
    let reply = send_raw(&nodes[0].addr, vec![msg]).await;
    assert_eq!(reply.refused_other, 1);
    let reason = comm.aborted().expect("aborted");
    assert!(reason.contains("sent twice"), "{reason}");
}

/// The bytes a state stream donor sends for `chunks` (as [`fake_chunks`] makes them):
/// an accepting status with the first chunk's header, one data frame per chunk, and the
/// end frame with the last chunk's checksum unless `end` is false.
fn stream_bytes(chunks: &[StateChunk], end: bool) -> Vec<u8> {
    use prost::Message;
    fn frame(out: &mut Vec<u8>, kind: u8, tensor: u8, offset: u64, payload: &[u8]) {
        out.extend_from_slice(&[kind, tensor, 0, 0]);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(payload);
    }
    let header = chunks[0].header.clone().unwrap().encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for c in chunks {
        frame(&mut out, FRAME_DATA, c.tensor as u8, c.offset, &c.data);
    }
    if end {
        let sum = fake_chunks().last().unwrap().payload_checksum.clone();
        frame(&mut out, FRAME_END, 0, 0, sum.as_bytes());
    }
    out
}

/// A donor speaking the state stream protocol that answers every request with `bytes`.
async fn fake_stream_donor(bytes: Vec<u8>) -> PeerAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 12];
                if conn.read_exact(&mut first).await.is_err() {
                    return;
                }
                assert_eq!(first[..8], STATE_STREAM_MAGIC);
                let len = u32::from_le_bytes(first[8..].try_into().unwrap()) as usize;
                let mut req = vec![0u8; len];
                if conn.read_exact(&mut req).await.is_err() {
                    return;
                }
                let _ = conn.write_all(&bytes).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    PeerAddr {
        id: "fake".into(),
        addr,
    }
}

/// Over the state stream, the requester checks what it checks over gRPC: every frame's
/// place and size, the header, completeness and the checksum; a tampered frame is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_stream_checks_every_frame_and_the_checksum() {
    let hub = fetcher(true);
    let t = WAIT;
    let donor = fake_stream_donor(stream_bytes(&fake_chunks(), true)).await;
    let (got, stats) = fetch_state(&hub, 1, "m1", &donor, 5, "h", t).await.unwrap();
    assert_eq!(
        (got.params, got.m, got.v),
        (vec![0.0, 1.0], vec![10.0, 11.0], vec![20.0, 21.0])
    );
    assert_eq!((stats.bytes, stats.chunks), (24, 6));

    type Tamper = fn(&mut Vec<StateChunk>);
    let cases: Vec<(&str, Tamper)> = vec![
        ("checksum mismatch", |c| {
            c[3].data = 7.0f32.to_le_bytes().to_vec()
        }),
        ("offset 0 but 1 values came before", |c| c[3].offset = 0),
        ("not whole f32 values", |c| c[2].data = vec![1, 2, 3]),
        ("past its end", |c| c[1].data = vec![0; 8]),
        ("tensor 2 starts but tensor 1 has only 1", |c| {
            c.remove(3);
        }),
        ("the last chunk came but tensor 2 has only 1", |c| {
            c.pop();
        }),
        ("tensor 3 (not 0, 1 or 2)", |c| c[5].tensor = 3),
        ("step 5, not the requested step 6", |_| {}),
    ];
    for (want, tamper) in cases {
        let mut chunks = fake_chunks();
        tamper(&mut chunks);
        let donor = fake_stream_donor(stream_bytes(&chunks, true)).await;
        let step = if want.contains("step 6") { 6 } else { 5 };
        let err = fetch_state(&hub, 1, "m1", &donor, step, "", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want) && err.contains(&donor.addr),
            "{want}: {err}"
        );
    }
    // Cut before the end frame; a frame of an unknown kind; a frame too large to hold.
    let mut cut = stream_bytes(&fake_chunks(), true);
    cut.truncate(cut.len() - 20);
    let mut odd = stream_bytes(&fake_chunks(), false);
    odd.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut huge = stream_bytes(&fake_chunks()[..1], false);
    huge.extend_from_slice(&[FRAME_DATA, 0, 0, 0]);
    huge.extend_from_slice(&(u32::MAX).to_le_bytes());
    huge.extend_from_slice(&1u64.to_le_bytes());
    for (want, bytes) in [
        ("stream failed after 24 bytes", cut),
        ("frame kind 9", odd),
        ("4294967295 data bytes (at most 4194304)", huge),
    ] {
        let donor = fake_stream_donor(bytes).await;
        let err = fetch_state(&hub, 1, "m1", &donor, 5, "", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{want}: {err}");
    }
    // A donor that refuses: its code and message come back.
    let mut no = vec![tonic::Code::NotFound as i32 as u8];
    no.extend_from_slice(&7u32.to_le_bytes());
    no.extend_from_slice(b"nothing");
    let donor = fake_stream_donor(no).await;
    let err = fetch_state(&hub, 1, "m1", &donor, 5, "", t)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Refused { code: tonic::Code::NotFound, message, .. } if message == "nothing"),
        "{err}"
    );
}

/// A state stream header's parameter count is the donor's word: the requester reserves
/// room as data arrives, so a header claiming 2^40 values (12 TiB) costs at most
/// `RESERVE_AHEAD_FLOATS` values per tensor up front and the stream is refused at the
/// frame that shows it short (before this, the requester reserved the whole claim on the
/// header and refused with "cannot hold").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_stream_reserves_as_data_arrives_not_what_the_header_claims() {
    let hub = fetcher(true);
    let mut chunks = fake_chunks();
    chunks[0].header.as_mut().unwrap().num_params = 1 << 40;
    let donor = fake_stream_donor(stream_bytes(&chunks, true)).await;
    let err = fetch_state(&hub, 1, "m1", &donor, 5, "", WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor 1 starts but tensor 0 has only 2 of 1099511627776 values"),
        "{err}"
    );
}

proptest::proptest! {
    /// The lane-wise payload checksum is the word-by-word Fletcher-64 exactly, from any
    /// running state and for any split of the words into updates (full and partial rows
    /// of lanes, words near u32::MAX so that both halves wrap).
    #[test]
    fn the_lane_wise_checksum_is_the_word_by_word_one(
        words in proptest::collection::vec(proptest::prop_oneof![
            proptest::prelude::any::<u32>(),
            (u32::MAX - 3)..=u32::MAX,
        ], 0..600),
        cuts in proptest::collection::vec(0usize..600, 0..6),
        start in proptest::prelude::any::<(u32, u32)>(),
    ) {
        use super::transfer::PayloadSum;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(words.len()) * 4).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let (mut by_lanes, mut by_words) = (PayloadSum::default(), PayloadSum::default());
        let lead = [start.0.to_le_bytes(), start.1.to_le_bytes()].concat();
        by_lanes.update_words(&lead);
        by_words.update_words(&lead);
        for part in cuts.windows(2) {
            by_lanes.update(&bytes[part[0]..part[1]]);
        }
        by_words.update_words(&bytes);
        proptest::prop_assert_eq!(by_lanes.finalize(), by_words.finalize());
    }
}

/// `make_room` grows a tensor by doubling, never past its `n` values, and not at all
/// while it has room: (capacity, len, n, more) -> capacity after.
#[test]
fn make_room_doubles_up_to_n() {
    use super::stream::{make_room, RESERVE_AHEAD_FLOATS};
    let cases: &[(usize, usize, usize, usize, usize)] = &[
        (0, 0, 0, 0, 0),
        (0, 0, 5, 3, 3),
        (4, 2, 100, 2, 4),
        (4, 4, 100, 1, 8),
        (4, 4, 6, 1, 6),
        (4, 4, 100, 20, 24),
        (8, 8, 1 << 40, 1, 16),
    ];
    for &(cap, len, n, more, want) in cases {
        let mut v: Vec<f32> = Vec::with_capacity(cap);
        v.resize(len, 0.0);
        assert_eq!(v.capacity(), cap);
        make_room(&mut v, n, more).unwrap();
        assert_eq!(v.capacity(), want, "cap {cap} len {len} n {n} more {more}");
    }
    // The requester's first reservation is bounded whatever the header says.
    let (n, mut v) = (1usize << 40, Vec::<f32>::new());
    v.try_reserve_exact(n.min(RESERVE_AHEAD_FLOATS)).unwrap();
    assert_eq!(v.capacity(), RESERVE_AHEAD_FLOATS);
}

/// A hub serving over mutual TLS as node `id` with the certificates in `dir`, and its
/// listener passing state streams to the hub.
async fn start_tls_node(dir: &std::path::Path, id: &str) -> Node {
    let tls = crate::tls::Tls::load(crate::tls::TlsFiles::in_folder(
        dir,
        &crate::tls::PeerIdentity::Node(id.into()),
    ))
    .unwrap();
    let hub = PeerHub::with_tls(JOB, HubConfig::default(), Some(tls.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let (service, incoming_hub, token) = (hub.service(), hub.clone(), stop.clone());
    let server = tokio::spawn(async move {
        let incoming = incoming_hub.incoming(tls.incoming(listener).unwrap());
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await;
    });
    Node {
        hub,
        addr,
        stop,
        _server: server,
    }
}

fn tls_fetcher(dir: &std::path::Path, id: &str, stream: bool) -> PeerHub {
    let tls = crate::tls::Tls::load(crate::tls::TlsFiles::in_folder(
        dir,
        &crate::tls::PeerIdentity::Node(id.into()),
    ))
    .unwrap();
    let config = HubConfig {
        state_stream: stream,
        ..HubConfig::default()
    };
    PeerHub::with_tls(JOB, config, Some(tls))
}

/// Over mutual TLS the state stream authenticates like gRPC: a member's certificate must
/// name the member it claims, a certificate of another CA gets nothing, a member that is
/// not a receiver is refused; gRPC on the same port still works (the listener tells the
/// two apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_stream_over_mutual_tls_checks_the_certificate() {
    use crate::tls::{init_ca, issue, PeerIdentity};
    let tmp = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (tmp.path().join("ca"), tmp.path().join("other"));
    init_ca(&ca, 1).unwrap();
    init_ca(&other_ca, 1).unwrap();
    for id in ["donor", "m1", "m2"] {
        issue(&ca, &PeerIdentity::Node(id.into()), &ca, 1).unwrap();
    }
    issue(&other_ca, &PeerIdentity::Node("m1".into()), &other_ca, 1).unwrap();
    let node = start_tls_node(&ca, "donor").await;
    let state = Arc::new(snapshot(300_000, 5, 9));
    let _p = node
        .hub
        .publish_state_for(2, Arc::clone(&state), vec!["m1".into()]);
    let donor = donor_of(&node);
    let t = Duration::from_secs(20);
    for stream in [true, false] {
        let (got, _) = fetch_state(&tls_fetcher(&ca, "m1", stream), 2, "m1", &donor, 5, "", t)
            .await
            .unwrap();
        assert!(same_bits(&got.v, &state.v), "stream {stream}");
    }
    let m1 = tls_fetcher(&ca, "m1", true);
    // m1's certificate claiming m2.
    let e = fetch_state(&m1, 2, "m2", &donor, 5, "", t)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, TransferError::Refused { code: tonic::Code::PermissionDenied, message, .. }
            if message.contains("\"m2\" claimed by a client whose certificate names node \"m1\"")),
        "{e}"
    );
    assert_eq!(node.hub.identity_refused(), 1);
    // m2 is who it says, but not a receiver.
    let e = fetch_state(&tls_fetcher(&ca, "m2", true), 2, "m2", &donor, 5, "", t)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("\"m2\" is not among the receivers"),
        "{e}"
    );
    assert_eq!(node.hub.state_refused(), 1);
    // A certificate of another CA: the handshake fails, nothing is served.
    let served = node.hub.state_bytes_served();
    let e = fetch_state(
        &tls_fetcher(&other_ca, "m1", true),
        2,
        "m1",
        &donor,
        5,
        "",
        t,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            TransferError::Connect { .. } | TransferError::Refused { .. }
        ),
        "{e}"
    );
    // A plain TCP requester gets no answer from a TLS port either.
    let e = fetch_state(
        &fetcher(true),
        2,
        "m1",
        &donor,
        5,
        "",
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(!matches!(e, TransferError::BadChunk { .. }), "{e}");
    assert_eq!(node.hub.state_bytes_served(), served);
    let tls = node.hub.tls().unwrap().clone();
    wait_until("both refused handshakes counted", || {
        tls.handshakes_refused() >= 2
    })
    .await;
}

//! [`Member`] against a real etcd: each test starts its own server
//! ([`tenax_chaos::EtcdServer`], killed on drop) and its members, with a 2 s lease TTL
//! (etcd 3.4's minimum) and a 300 ms settle window.
//!
//! Waits are bounded polls with generous deadlines; measured times are printed
//! (`--nocapture`) and asserted only loosely, so a loaded machine never decides a
//! verdict. What is asserted exactly is what must hold whatever the timing: who is in
//! which generation, that exactly one member leads, that a lost member's commits are
//! refused by etcd, that steady state writes nothing. "Nothing happened" is checked once
//! the member that would have acted has demonstrably decided (its counters of probe
//! results and heard reports), not after a pause.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tenax_chaos::EtcdServer;
use tenax_cluster::etcd::{EtcdConfig, EtcdMembership, FenceOutcome, FenceRefusal, WriteOutcome};
use tenax_cluster::member::{Detection, Member, MemberConfig, MemberError, MemberState, Prober};
use tenax_core::detector::ConfirmationConfig;
use tenax_core::membership::{MemberId, MemberInfo, Plan, PlannerConfig};

/// The most any wait in these tests may take; far above what it needs.
const WAIT: Duration = Duration::from_secs(15);

/// Lease TTL of every member.
const TTL_S: i64 = 2;

/// Settle window of every planner.
const SETTLE_MS: u64 = 300;

/// A loose bound on a re-formation after a lost lease: TTL + settle + 1 s is expected;
/// this leaves room for a loaded machine.
const REFORM_BOUND: Duration = Duration::from_secs(10);

fn start_etcd() -> Result<EtcdServer> {
    let t = Instant::now();
    let server = tokio::task::block_in_place(EtcdServer::start).context("starting etcd")?;
    eprintln!("etcd {} up in {:?}", server.endpoint(), t.elapsed());
    Ok(server)
}

fn etcd_config(server: &EtcdServer, job: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![server.endpoint()], job);
    c.lease_ttl_s = TTL_S;
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.max_retries = 8;
    c
}

fn planner(min_members: usize) -> PlannerConfig {
    PlannerConfig {
        min_members,
        max_members: 16,
        pp_depth: 1,
        shrink_pipeline: false,
        max_ranks_per_member: 8,
        settle_ms: SETTLE_MS,
        settle_max_ms: 3 * SETTLE_MS,
        max_known_members: 64,
        confirmation: ConfirmationConfig::default(),
    }
}

fn config(server: &EtcdServer, job: &str, id: &str, min_members: usize) -> MemberConfig {
    MemberConfig {
        etcd: etcd_config(server, job),
        planner: planner(min_members),
        id: id.to_string(),
        devices: 1,
        addr: String::new(),
        metrics_addr: String::new(),
    }
}

/// Starts members `ids` (one connection each), one after the other.
async fn start_members(
    server: &EtcdServer,
    job: &str,
    ids: &[&str],
    min_members: usize,
) -> Result<Vec<Member>> {
    let mut members = Vec::new();
    for id in ids {
        let m = Member::start(config(server, job, id, min_members))
            .await
            .with_context(|| format!("starting member {id}"))?;
        members.push(m);
    }
    Ok(members)
}

/// Polls `check` every 20 ms until it returns `Some`, at most `limit`; returns the value
/// and the time it took.
async fn poll<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(plan: &Plan) -> Vec<&str> {
    plan.members.iter().map(MemberId::as_str).collect()
}

/// Waits until every member in `members` observes one plan whose members are exactly
/// `expected`, newer than `after`; returns it and the time it took.
async fn await_plan(
    members: &[&Member],
    expected: &[&str],
    after: u64,
) -> Result<(Plan, Duration)> {
    poll(
        &format!("a plan of {expected:?} after gen {after}"),
        WAIT,
        || {
            let plans: Vec<Option<Plan>> = members.iter().map(|m| m.current_plan()).collect();
            let first = plans.first()?.clone()?;
            let agreed = plans.iter().all(|p| p.as_ref() == Some(&first));
            (agreed && first.generation > after && ids(&first) == expected).then_some(first)
        },
    )
    .await
}

/// The index of the one member that leads, once exactly one does.
async fn await_one_leader(members: &[&Member]) -> Result<(usize, Duration)> {
    poll("exactly one leader", WAIT, || {
        let leaders: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].is_leader())
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

/// The etcd store's revision now: it grows with every write and with nothing else.
async fn store_revision(raw: &mut etcd_client::Client) -> Result<i64> {
    Ok(raw
        .get("/", None)
        .await?
        .header()
        .context("no header")?
        .revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_form_generation_one() -> Result<()> {
    let etcd = start_etcd()?;
    // min_members 3: no plan is made before all three are registered, so generation 1
    // holds all three whatever the start-up timing.
    let t = Instant::now();
    let members = start_members(&etcd, "form", &["a", "b", "c"], 3).await?;
    let refs: Vec<&Member> = members.iter().collect();
    let (plan, _) = await_plan(&refs, &["a", "b", "c"], 0).await?;
    eprintln!(
        "gen {} with a, b, c observed by all {:?} after the first start",
        plan.generation,
        t.elapsed()
    );
    assert_eq!(plan.generation, 1, "{}", plan.reason);
    plan.validate()?;
    assert_eq!(plan.world, 3);
    let mut hosts: Vec<&str> = plan.ranks.iter().map(|r| r.member.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["a", "b", "c"]);
    for m in &members {
        assert_eq!(m.info().joined_gen, 0);
        assert_eq!(m.state(), MemberState::Active);
        assert_eq!(m.generation(), Some(1));
    }

    // Exactly one leads, and it is the one etcd names.
    let (l, _) = await_one_leader(&refs).await?;
    let raw = EtcdMembership::connect(etcd_config(&etcd, "form")).await?;
    let leader = raw.leader().await?.context("etcd names a leader")?;
    assert_eq!(leader.member_id, members[l].id().as_str());

    // Every member commits in generation 1.
    for m in &members {
        let out = m
            .fenced_commit(&format!("commits/{}", m.id()), b"1")
            .await?;
        assert!(
            matches!(out, FenceOutcome::Committed { .. }),
            "{}: {out:?}",
            m.id()
        );
    }
    for m in members {
        m.shutdown().await?;
    }
    assert!(raw.members().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_dropped_and_its_commits_are_refused() -> Result<()> {
    let etcd = start_etcd()?;
    let members = start_members(&etcd, "hang", &["a", "b", "c"], 1).await?;
    let refs: Vec<&Member> = members.iter().collect();
    let (formed, _) = await_plan(&refs, &["a", "b", "c"], 0).await?;
    let (l, _) = await_one_leader(&refs).await?;
    // The victim is a follower: this test is about losing a member, not the leader.
    let v = (l + 1) % 3;
    let victim = &members[v];
    let survivors: Vec<&Member> = (0..3).filter(|&i| i != v).map(|i| &members[i]).collect();
    let expected: Vec<&str> = survivors.iter().map(|m| m.id().as_str()).collect();
    let mut victim_state = victim.state_receiver();

    victim.pause_keepalive();
    let (plan, took) = await_plan(&survivors, &expected, formed.generation).await?;
    eprintln!(
        "{} hung (keep-alives paused); gen {} -> {} without it observed by the others after \
         {took:?} (TTL {TTL_S} s + settle {SETTLE_MS} ms + 1 s expected)",
        victim.id(),
        formed.generation,
        plan.generation
    );
    assert!(took < REFORM_BOUND, "re-formation took {took:?}");
    assert!(
        plan.reason.contains(victim.id().as_str()),
        "{}",
        plan.reason
    );

    // The victim finds out that its key is gone and reports itself lost.
    tokio::time::timeout(
        WAIT,
        victim_state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("the victim reports Lost")??;
    eprintln!("victim state: {:?}", victim.state());
    assert!(!victim.is_leader());

    // Its commits are refused: by etcd's fence with the generation it observed, and
    // even with the new, current generation.
    match victim.fenced_commit("commits/victim", b"x").await {
        Ok(FenceOutcome::Refused {
            reason: FenceRefusal::WriterLeaseGone { .. },
        })
        | Err(MemberError::NotInPlan { .. }) => {}
        other => bail!("the hung member's commit was not refused: {other:?}"),
    }
    let out = victim
        .etcd()
        .fenced_put("commits/victim", b"x", plan.generation, victim.writer())
        .await?;
    assert!(
        matches!(
            out,
            FenceOutcome::Refused {
                reason: FenceRefusal::WriterLeaseGone { .. }
            }
        ),
        "{out:?}"
    );
    // The survivors commit in the new generation.
    for m in &survivors {
        let out = m.fenced_commit("commits/survivor", b"ok").await?;
        assert!(
            matches!(out, FenceOutcome::Committed { .. }),
            "{}: {out:?}",
            m.id()
        );
    }
    // A record of something made in the old generation (a checkpoint saved then) is
    // refused once the new one is current, even from a survivor.
    let out = survivors[0]
        .fenced_commit_in(formed.generation, "commits/survivor", b"old")
        .await?;
    assert!(
        matches!(
            out,
            FenceOutcome::Refused {
                reason: FenceRefusal::StaleGeneration { .. }
            }
        ),
        "{out:?}"
    );

    // The lost node rejoins cleanly: a new Member under the same id joins the next
    // generation (as a member holding no state) and commits in it.
    let victim_id = victim.id().as_str().to_string();
    let rejoined = Member::start(config(&etcd, "hang", &victim_id, 1)).await?;
    let mut everyone: Vec<&Member> = survivors.clone();
    everyone.push(&rejoined);
    let (back, took) = await_plan(&everyone, &["a", "b", "c"], plan.generation).await?;
    eprintln!(
        "{victim_id} rejoined: gen {} with all three after {took:?}",
        back.generation
    );
    let out = rejoined.fenced_commit("commits/rejoined", b"ok").await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_member_leads_when_the_leader_hangs() -> Result<()> {
    let etcd = start_etcd()?;
    let members = start_members(&etcd, "failover", &["a", "b", "c"], 1).await?;
    let refs: Vec<&Member> = members.iter().collect();
    let (formed, _) = await_plan(&refs, &["a", "b", "c"], 0).await?;
    let (l, _) = await_one_leader(&refs).await?;
    let old = &members[l];
    let survivors: Vec<&Member> = (0..3).filter(|&i| i != l).map(|i| &members[i]).collect();
    let expected: Vec<&str> = survivors.iter().map(|m| m.id().as_str()).collect();

    // The leader hangs: no keep-alives, no resign.
    old.pause_keepalive();
    let t = Instant::now();
    let (n, led_after) = await_one_leader(&survivors).await?;
    eprintln!(
        "leader {} hung; {} leads after {led_after:?} (TTL {TTL_S} s + 1 s expected)",
        old.id(),
        survivors[n].id()
    );
    assert!(led_after < REFORM_BOUND, "failover took {led_after:?}");
    let (plan, _) = await_plan(&survivors, &expected, formed.generation).await?;
    let reform = t.elapsed();
    eprintln!(
        "gen {} -> {} without the old leader observed by the others {reform:?} after it hung",
        formed.generation, plan.generation
    );
    assert!(reform < REFORM_BOUND, "re-formation took {reform:?}");

    let raw = EtcdMembership::connect(etcd_config(&etcd, "failover")).await?;
    let leader = raw.leader().await?.context("etcd names a leader")?;
    assert_eq!(leader.member_id, survivors[n].id().as_str());
    let mut old_state = old.state_receiver();
    tokio::time::timeout(
        WAIT,
        old_state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("the old leader reports Lost")??;
    assert!(!old.is_leader());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_writes_nothing_to_etcd() -> Result<()> {
    let etcd = start_etcd()?;
    let members = start_members(&etcd, "steady", &["a", "b", "c"], 3).await?;
    let refs: Vec<&Member> = members.iter().collect();
    let (plan, _) = await_plan(&refs, &["a", "b", "c"], 0).await?;
    await_one_leader(&refs).await?;
    // Let the leader's last settle window run out.
    tokio::time::sleep(Duration::from_millis(3 * SETTLE_MS)).await;

    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let requests = || -> (u64, u64) {
        members.iter().fold((0, 0), |(r, k), m| {
            (r + m.etcd().requests(), k + m.etcd().keepalive_requests())
        })
    };
    let rev0 = store_revision(&mut raw).await?;
    let (req0, ka0) = requests();
    // Simulated training steps: every member reads its plan each step.
    let t = Instant::now();
    let mut steps = 0u64;
    while t.elapsed() < Duration::from_secs(3) {
        for m in &members {
            assert_eq!(m.generation(), Some(plan.generation));
        }
        steps += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = t.elapsed();
    let rev1 = store_revision(&mut raw).await?;
    let (req1, ka1) = requests();
    let (requests, keepalives) = (req1 - req0, ka1 - ka0);
    eprintln!(
        "steady state, 3 members, {steps} steps in {elapsed:?}: etcd writes {} ({} per step), \
         requests {requests}, of which keep-alives {keepalives} ({:.1}/s per member), other {}",
        rev1 - rev0,
        (rev1 - rev0) as f64 / steps as f64,
        keepalives as f64 / elapsed.as_secs_f64() / 3.0,
        requests - keepalives
    );
    assert_eq!(rev1, rev0, "etcd's revision moved: something was written");
    assert_eq!(
        requests - keepalives,
        0,
        "requests other than keep-alives were sent"
    );
    assert!(keepalives > 0, "no keep-alive was counted");
    for m in &members {
        assert_eq!(m.generation(), Some(plan.generation));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_key_moves_or_vanishes_is_lost_and_releases_its_lease() -> Result<()> {
    let etcd = start_etcd()?;
    let members = start_members(&etcd, "moved", &["a", "b"], 1).await?;
    let refs: Vec<&Member> = members.iter().collect();
    await_plan(&refs, &["a", "b"], 0).await?;
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let other = EtcdMembership::connect(etcd_config(&etcd, "moved")).await?;

    // Someone else registers as "a": a's key moves to another lease.
    let a = &members[0];
    let a_lease = a.writer().lease;
    let mut a_state = a.state_receiver();
    let impostor = other.register("a", b"{}").await?;
    tokio::time::timeout(
        WAIT,
        a_state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("a reports Lost")??;
    let MemberState::Lost { reason } = a.state() else {
        bail!("a is not lost");
    };
    eprintln!("a: {reason}");
    assert!(reason.contains("moved"), "{reason}");
    // a released its own lease (its election key and candidacy went with it).
    let (_, released) = poll_async("a's lease is revoked", || {
        let mut raw = raw.clone();
        async move { Ok((raw.lease_time_to_live(a_lease, None).await?.ttl() < 0).then_some(())) }
    })
    .await?;
    eprintln!("a's lease released {released:?} after it was found lost");
    drop(impostor);

    // b's key is deleted by hand while its lease lives.
    let b = &members[1];
    let mut b_state = b.state_receiver();
    raw.delete(format!("{}members/b", other.prefix()), None)
        .await?;
    tokio::time::timeout(
        WAIT,
        b_state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("b reports Lost")??;
    let MemberState::Lost { reason } = b.state() else {
        bail!("b is not lost");
    };
    eprintln!("b: {reason}");
    assert!(reason.contains("deleted"), "{reason}");
    let b_lease = b.writer().lease;
    poll_async("b's lease is revoked", || {
        let mut raw = raw.clone();
        async move { Ok((raw.lease_time_to_live(b_lease, None).await?.ttl() < 0).then_some(())) }
    })
    .await?;
    assert!(
        raw.get(
            format!("{}leader", other.prefix()),
            Some(etcd_client::GetOptions::new().with_prefix())
        )
        .await?
        .kvs()
        .is_empty(),
        "no election key outlives its member"
    );
    Ok(())
}

/// Polls an async `check` every 50 ms, at most [`WAIT`].
async fn poll_async<T, F, Fut>(what: &str, mut check: F) -> Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok((v, start.elapsed()));
        }
        ensure!(start.elapsed() <= WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_during_which_the_generation_changes_is_released() -> Result<()> {
    let etcd = start_etcd()?;
    let job = "race";
    let writer_etcd = EtcdMembership::connect(etcd_config(&etcd, job)).await?;
    let reg = writer_etcd.register("writer", b"{}").await?;
    let w = reg.writer();
    writer_etcd.write_plan(None, 1, b"{}", &w).await?;
    // A writer bumps the generation as fast as etcd allows while "m" registers.
    let bumper = {
        let etcd = writer_etcd.clone();
        tokio::spawn(async move {
            let mut g = 1u64;
            loop {
                match etcd.write_plan(Some(g), g + 1, b"{}", &w).await {
                    Ok(WriteOutcome::Written { .. }) => g += 1,
                    other => return format!("bumper stopped at gen {g}: {other:?}"),
                }
            }
        })
    };
    let started = Member::start(config(&etcd, job, "m", 1)).await;
    bumper.abort();
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let leases: Vec<i64> = raw
        .leases()
        .await?
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    match started {
        Err(MemberError::RegistrationRaced { attempts, .. }) => {
            eprintln!("every one of {attempts} registrations raced a plan write");
            // Every stale registration was released: only the writer's lease is left.
            assert_eq!(leases, vec![reg.lease_id()]);
            assert!(writer_etcd.members().await?.iter().all(|m| m.id != "m"));
        }
        Ok(m) => {
            // One attempt did not race: exactly its lease is left beside the writer's.
            eprintln!("registered with joined_gen {}", m.info().joined_gen);
            let mut expected = vec![reg.lease_id(), m.writer().lease];
            let mut leases = leases;
            expected.sort();
            leases.sort();
            assert_eq!(leases, expected);
        }
        Err(e) => bail!("unexpected start error: {e}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_at_once_and_drop_stops_the_keepalive() -> Result<()> {
    let etcd = start_etcd()?;
    let mut members = start_members(&etcd, "leave", &["a", "b", "c"], 1).await?;
    let refs: Vec<&Member> = members.iter().collect();
    let (formed, _) = await_plan(&refs, &["a", "b", "c"], 0).await?;
    await_one_leader(&refs).await?;

    // A graceful leave revokes the lease: the others re-form without waiting for a TTL.
    let c = members.pop().context("three members")?;
    let c_state = c.state_receiver();
    c.shutdown().await?;
    assert_eq!(*c_state.borrow(), MemberState::Stopped);
    let refs: Vec<&Member> = members.iter().collect();
    let (plan, took) = await_plan(&refs, &["a", "b"], formed.generation).await?;
    eprintln!(
        "c left; gen {} of a, b observed after {took:?} (settle {SETTLE_MS} ms expected)",
        plan.generation
    );
    assert!(took < REFORM_BOUND, "{took:?}");

    // Dropping a member aborts it: nobody refreshes its lease any more, which expires.
    let b = members.pop().context("two members")?;
    let b_lease = b.writer().lease;
    drop(b);
    let raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let (_, expired) = poll_async("the dropped member's lease expires", || {
        let mut raw = raw.clone();
        async move { Ok((raw.lease_time_to_live(b_lease, None).await?.ttl() < 0).then_some(())) }
    })
    .await?;
    eprintln!("b dropped; its lease expired after {expired:?}");
    let refs: Vec<&Member> = members.iter().collect();
    await_plan(&refs, &["a"], plan.generation).await?;
    Ok(())
}

/// Starts members `ids` (one connection each) with failure detection `detection`, a lease
/// TTL of `ttl_s` and a settle window of `settle_ms`.
async fn start_detecting(
    server: &EtcdServer,
    job: &str,
    ids: &[&str],
    ttl_s: i64,
    settle_ms: u64,
    detection: &Detection,
) -> Result<Vec<Member>> {
    let mut members = Vec::new();
    for id in ids {
        // min_members 1: the group re-forms without an evicted member.
        let mut c = config(server, job, id, 1);
        c.etcd.lease_ttl_s = ttl_s;
        c.planner.settle_ms = settle_ms;
        c.planner.settle_max_ms = 3 * settle_ms;
        let etcd = EtcdMembership::connect(c.etcd.clone()).await?;
        let m = Member::start_detecting(etcd, c, detection.clone())
            .await
            .with_context(|| format!("starting member {id}"))?;
        members.push(m);
    }
    Ok(members)
}

/// What a test prober saw and decides.
#[derive(Default)]
struct ProbeLog {
    /// Members whose probe never answers (so it times out: dead).
    dead: BTreeSet<String>,
    /// Members probed, in order.
    probed: Vec<String>,
}

/// A prober that answers at once for the living and never for the members in `dead`.
fn test_prober(log: Arc<Mutex<ProbeLog>>) -> Prober {
    Arc::new(move |info: MemberInfo| {
        let mut l = log.lock().unwrap();
        l.probed.push(info.id.to_string());
        let dead = l.dead.contains(info.id.as_str());
        Box::pin(async move {
            if dead {
                std::future::pending::<()>().await;
            }
            true
        })
    })
}

/// Formation of `members` (all of them in generation 1), the leader's index and a
/// follower's (the leader's next one).
async fn formed(members: &[Member], ids: &[&str]) -> Result<(Plan, usize)> {
    let refs: Vec<&Member> = members.iter().collect();
    let (plan, _) = await_plan(&refs, ids, 0).await?;
    let (l, _) = await_one_leader(&refs).await?;
    Ok((plan, l))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_that_fails_the_leaders_probe_is_evicted_before_its_ttl() -> Result<()> {
    // Twice WAIT: a plan without the victim within WAIT cannot come from its lease
    // running out.
    const LONG_TTL_S: i64 = 30;
    let etcd = start_etcd()?;
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let detection = Detection {
        prober: Some(test_prober(log.clone())),
        probe_timeout: Duration::from_millis(500),
    };
    let all = ["a", "b", "c"];
    let members = start_detecting(&etcd, "probe", &all, LONG_TTL_S, 100, &detection).await?;
    let (all_in, l) = formed(&members, &all).await?;
    let leader = &members[l];
    let x = (l + 1) % 3;
    let victim = &members[x];
    let victim_id = victim.id().as_str().to_string();
    let survivors: Vec<&Member> = (0..3).filter(|&i| i != x).map(|i| &members[i]).collect();
    let expected: Vec<&str> = survivors.iter().map(|m| m.id().as_str()).collect();
    let mut victim_state = victim.state_receiver();

    // The victim's keep-alives keep running: only a revocation removes it before its TTL.
    log.lock().unwrap().dead.insert(victim_id.clone());
    let t = Instant::now();
    leader.suspect(victim.id().clone(), "missed the all-reduce deadline".into());
    let (plan, _) = await_plan(&survivors, &expected, all_in.generation).await?;
    let took = t.elapsed();
    eprintln!(
        "{victim_id} suspected by the leader {}; its probe timed out; gen {} -> {} without it \
         after {took:?} (lease TTL {LONG_TTL_S} s; probe timeout 500 ms + settle 100 ms expected)",
        leader.id(),
        all_in.generation,
        plan.generation
    );
    assert!(
        took < Duration::from_secs(LONG_TTL_S as u64),
        "eviction took {took:?}, not before the TTL"
    );
    assert!(plan.reason.contains(&victim_id), "{}", plan.reason);
    assert_eq!(log.lock().unwrap().probed, vec![victim_id.clone()]);
    assert_eq!(leader.probes_sent(), 1);
    assert_eq!(leader.revocations(), 1);
    assert_eq!(leader.suspicions_reported(), 1);
    tokio::time::timeout(
        WAIT,
        victim_state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("the evicted member reports Lost")??;
    eprintln!("victim state: {:?}", victim.state());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_revokes_a_leader_that_fails_its_probe() -> Result<()> {
    // Twice WAIT: a plan without the dead leader within WAIT cannot come from its lease
    // running out.
    const LONG_TTL_S: i64 = 30;
    let etcd = start_etcd()?;
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let detection = Detection {
        prober: Some(test_prober(log.clone())),
        probe_timeout: Duration::from_millis(500),
    };
    let all = ["a", "b", "c"];
    let mut members =
        start_detecting(&etcd, "dead-leader", &all, LONG_TTL_S, 100, &detection).await?;
    let (all_in, l) = formed(&members, &all).await?;
    let leader_id = members[l].id().clone();
    let f = (l + 1) % 3;

    // A live leader that answers: a follower's report changes nothing. The follower
    // counts its probe of the leader once the check is over (a revocation is made before
    // and counted with it).
    let first_reporter = members[f].id().clone();
    members[f].suspect(leader_id.clone(), "its stream broke".into());
    poll("the follower's check of the leader ends", WAIT, || {
        (members[f].probes_sent() == 1).then_some(())
    })
    .await?;
    assert_eq!(members[f].revocations(), 0);
    assert!(members[l].is_leader());

    // The leader dies: its agent stops (no more keep-alives, no planning), its lease
    // and election key live on until the TTL. Nobody would hear a report about it; the
    // follower's own failed probe revokes its lease, another member leads and re-plans.
    log.lock()
        .unwrap()
        .dead
        .insert(leader_id.as_str().to_string());
    drop(members.remove(l));
    // The other follower reports (the first one already did within REPORT_INTERVAL).
    let g = (l + 2) % 3;
    let follower = members
        .iter()
        .position(|m| m.id() == &MemberId::new(all[g]))
        .expect("the other follower");
    let expected: Vec<&str> = members.iter().map(|m| m.id().as_str()).collect();
    let t = Instant::now();
    members[follower].suspect(leader_id.clone(), "its stream broke again".into());
    let survivors: Vec<&Member> = members.iter().collect();
    let (plan, _) = await_plan(&survivors, &expected, all_in.generation).await?;
    let took = t.elapsed();
    eprintln!(
        "the dead leader {leader_id} evicted by a follower after {took:?} (TTL {LONG_TTL_S} s)"
    );
    assert!(took < Duration::from_secs(LONG_TTL_S as u64), "{took:?}");
    assert!(plan.reason.contains(leader_id.as_str()), "{}", plan.reason);
    poll("the follower counts its revocation", WAIT, || {
        (members[follower].revocations() == 1).then_some(())
    })
    .await?;
    // Long after its check, the first reporter still revoked nothing.
    let first = members
        .iter()
        .find(|m| m.id() == &first_reporter)
        .expect("the first reporter");
    assert_eq!(first.revocations(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_report_of_a_live_member_evicts_nobody() -> Result<()> {
    let etcd = start_etcd()?;
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let detection = Detection {
        prober: Some(test_prober(log.clone())),
        ..Detection::default()
    };
    let all = ["a", "b", "c"];
    let members = start_detecting(&etcd, "alive", &all, TTL_S, SETTLE_MS, &detection).await?;
    let (all_in, l) = formed(&members, &all).await?;
    let leader = &members[l];
    let x = (l + 1) % 3;
    let f = (l + 2) % 3;
    let suspect = members[x].id().clone();
    let raw = EtcdMembership::connect(etcd_config(&etcd, "alive")).await?;
    let registered =
        |ms: &[tenax_cluster::etcd::Member]| ms.iter().any(|m| m.id == suspect.as_str());

    // The leader's own suspicion: it probes, the member answers, the suspicion clears.
    // The follower's report below must come after the leader decided on the answer:
    // a report while the suspicion is pending is a second reporter, which confirms.
    leader.suspect(suspect.clone(), "slow step".into());
    poll("the leader decides on its probe's answer", WAIT, || {
        (leader.probe_results() == 1).then_some(())
    })
    .await?;
    assert_eq!(leader.probes_sent(), 1);
    for m in &members {
        assert_eq!(m.generation(), Some(all_in.generation), "{}", m.id());
        assert_eq!(m.state(), MemberState::Active, "{}", m.id());
    }
    assert!(
        registered(&raw.members().await?),
        "{suspect} is still registered"
    );
    assert_eq!(leader.revocations(), 0);

    // One follower's report, through etcd: the leader hears it, probes again (a new
    // suspicion: the first one was cleared, not confirmed), and the member answers
    // again. Reported again at once (well within REPORT_INTERVAL), it is not written
    // again.
    let follower = &members[f];
    follower.suspect(suspect.clone(), "late chunk".into());
    follower.suspect(suspect.clone(), "late chunk again".into());
    poll("the follower drops the repeated report", WAIT, || {
        (follower.repeats_dropped() == 1).then_some(())
    })
    .await?;
    let (_, heard) = poll(
        "the leader decides on its second probe's answer",
        WAIT,
        || (leader.probe_results() == 2).then_some(()),
    )
    .await?;
    eprintln!(
        "{}'s report of {suspect} was probed and answered after {heard:?}",
        follower.id()
    );
    poll("the follower counts its report", WAIT, || {
        (follower.suspicions_reported() >= 1).then_some(())
    })
    .await?;
    assert_eq!(follower.suspicions_reported(), 1);
    assert_eq!(leader.reports_heard(), 1);
    assert_eq!(leader.probes_sent(), 2);
    for m in &members {
        assert_eq!(m.generation(), Some(all_in.generation), "{}", m.id());
        assert_eq!(m.state(), MemberState::Active, "{}", m.id());
    }
    assert!(
        registered(&raw.members().await?),
        "{suspect} is still registered"
    );
    assert_eq!(leader.revocations(), 0);
    assert_eq!(
        log.lock().unwrap().probed,
        vec![suspect.to_string(), suspect.to_string()]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reporters_confirm_without_a_probe() -> Result<()> {
    let etcd = start_etcd()?;
    // No prober: a first report is never answered by a probe.
    let all = ["a", "b", "c", "d"];
    let members = start_detecting(
        &etcd,
        "confirm",
        &all,
        TTL_S,
        SETTLE_MS,
        &Detection::default(),
    )
    .await?;
    let (all_in, l) = formed(&members, &all).await?;
    let leader = &members[l];
    let x = (l + 1) % 4;
    let reporters = [(l + 2) % 4, (l + 3) % 4];
    let suspect = members[x].id().clone();
    let survivors: Vec<&Member> = (0..4).filter(|&i| i != x).map(|i| &members[i]).collect();
    let expected: Vec<&str> = survivors.iter().map(|m| m.id().as_str()).collect();

    // One report alone evicts nobody: once the leader has decided on it, nothing was
    // revoked and the group is as it was.
    members[reporters[0]].suspect(suspect.clone(), "missed a step".into());
    poll("the first report is written", WAIT, || {
        (members[reporters[0]].suspicions_reported() == 1).then_some(())
    })
    .await?;
    poll("the leader decides on the first report", WAIT, || {
        (leader.reports_heard() == 1).then_some(())
    })
    .await?;
    assert_eq!(leader.revocations(), 0);
    assert_eq!(leader.generation(), Some(all_in.generation));
    assert_eq!(members[x].state(), MemberState::Active);

    // A second, distinct reporter confirms.
    let t = Instant::now();
    members[reporters[1]].suspect(suspect.clone(), "missed a step too".into());
    let (plan, _) = await_plan(&survivors, &expected, all_in.generation).await?;
    eprintln!(
        "{suspect} reported by {} and {}: gen {} -> {} without it {:?} after the second report",
        members[reporters[0]].id(),
        members[reporters[1]].id(),
        all_in.generation,
        plan.generation,
        t.elapsed()
    );
    assert!(plan.reason.contains(suspect.as_str()), "{}", plan.reason);
    assert_eq!(leader.reports_heard(), 2);
    assert_eq!(leader.probes_sent(), 0);
    assert_eq!(leader.revocations(), 1);
    for r in reporters {
        assert_eq!(members[r].suspicions_reported(), 1, "{}", members[r].id());
    }
    let mut state = members[x].state_receiver();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, MemberState::Lost { .. })),
    )
    .await
    .context("the evicted member reports Lost")??;
    Ok(())
}

//! The etcd driver against a real etcd: each test starts its own server
//! ([`tenax_chaos::EtcdServer`], killed on drop) and uses its own job name.
//!
//! Waits are bounded polls with generous deadlines; the times measured are printed
//! (`--nocapture`) and never decide a verdict. etcd 3.4's minimum lease TTL is 2 s and it
//! notices an expired lease up to about 0.5 s late.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::CompactionOptions;
use tenax_chaos::EtcdServer;
use tenax_cluster::etcd::{
    EtcdConfig, EtcdError, EtcdMembership, FenceOutcome, FenceRefusal, LeaseState, MemberEvent,
    MemberWatch, PlanCursor, PlanUpdate, PlanWatch, WatchStatus, WriteOutcome,
};

/// The most any single wait in these tests may take; far above what it needs.
const WAIT: Duration = Duration::from_secs(20);

/// Starts etcd without blocking the runtime's other work.
fn start_etcd() -> Result<EtcdServer> {
    let t = Instant::now();
    let server = tokio::task::block_in_place(EtcdServer::start).context("starting etcd")?;
    eprintln!("etcd {} up in {:?}", server.endpoint(), t.elapsed());
    Ok(server)
}

fn config(server: &EtcdServer, job: &str, lease_ttl_s: i64) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![server.endpoint()], job);
    c.lease_ttl_s = lease_ttl_s;
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.max_retries = 8;
    c
}

/// A small JSON plan for generation `g`.
fn plan(g: u64) -> Vec<u8> {
    format!(r#"{{"members": ["a", "b"], "dp": {g}}}"#).into_bytes()
}

/// The next update of `watch`, at most [`WAIT`] away.
async fn next(watch: &mut PlanWatch) -> Result<PlanUpdate> {
    match tokio::time::timeout(WAIT, watch.recv()).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("the watch ended: {:?}", watch.status()),
        Err(_) => bail!("no plan within {WAIT:?}; watch status {:?}", watch.status()),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, at most `limit`.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_register_and_are_listed() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "members", 2)).await?;
    let before = m.requests();
    let a = m.register("a", b"host-a:1").await?;
    eprintln!("register: {} etcd requests", m.requests() - before);
    let b = m.register("b", b"host-b:1").await?;
    let c = m.register("c", b"host-c:1").await?;

    let members = m.members().await?;
    let ids: Vec<_> = members.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(members[1].info, b"host-b:1");
    for (reg, member) in [&a, &b, &c].iter().zip(&members) {
        assert_eq!(member.lease, reg.lease_id());
        assert_eq!(*reg.lease_state().borrow(), LeaseState::Alive);
    }
    assert!(a.ttl_s() >= 2);

    // Leaving revokes the lease: the key is gone at once.
    b.revoke().await?;
    let ids: Vec<_> = m.members().await?.into_iter().map(|x| x.id).collect();
    assert_eq!(ids, ["a", "c"]);
    // Evicting: the first revoke removes the lease, a second finds it gone (not an error).
    assert!(m.revoke_lease(c.lease_id()).await?);
    assert!(!m.revoke_lease(c.lease_id()).await?);
    let ids: Vec<_> = m.members().await?.into_iter().map(|x| x.id).collect();
    assert_eq!(ids, ["a"]);

    // Bad ids are refused before any request.
    let err = m.register("x/y", b"").await.unwrap_err();
    assert!(matches!(err, EtcdError::InvalidArgument { .. }), "{err}");
    drop(a);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_writes_are_guarded_by_the_previous_generation() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "plans", 5)).await?;
    let leader = m.register("leader", b"").await?;
    let w = leader.writer();
    assert_eq!(m.read_plan().await?, None);

    assert!(matches!(
        m.write_plan(None, 1, &plan(1), &w).await?,
        WriteOutcome::Written { .. }
    ));
    // A second "first plan" conflicts.
    assert_eq!(
        m.write_plan(None, 2, &plan(2), &w).await?,
        WriteOutcome::Conflict {
            current_generation: Some(1)
        }
    );
    let before = m.requests();
    assert!(matches!(
        m.write_plan(Some(1), 2, &plan(2), &w).await?,
        WriteOutcome::Written { .. }
    ));
    let per_write = m.requests() - before;
    eprintln!("write_plan with a known previous generation: {per_write} etcd request(s)");
    assert_eq!(per_write, 1, "one txn, no read");
    // A stale expectation conflicts and names the current generation.
    assert_eq!(
        m.write_plan(Some(1), 3, &plan(3), &w).await?,
        WriteOutcome::Conflict {
            current_generation: Some(2)
        }
    );
    let stored = m.read_plan().await?.context("a plan is stored")?;
    assert_eq!(stored.generation, 2);
    assert_eq!(stored.plan, plan(2), "the plan bytes come back exactly");

    // Another driver (no cached revision) reads the gen key first, then writes.
    let other = EtcdMembership::connect(config(&etcd, "plans", 5)).await?;
    let before = other.requests();
    assert!(matches!(
        other.write_plan(Some(2), 3, &plan(3), &w).await?,
        WriteOutcome::Written { .. }
    ));
    eprintln!(
        "write_plan without a cached revision: {} etcd request(s)",
        other.requests() - before
    );
    // A retry of an already applied write reports Written (idempotent).
    assert!(matches!(
        other.write_plan(Some(2), 3, &plan(3), &w).await?,
        WriteOutcome::Written { .. }
    ));

    // Refused arguments.
    let err = m.write_plan(Some(3), 3, &plan(3), &w).await.unwrap_err();
    assert!(matches!(err, EtcdError::InvalidArgument { .. }), "{err}");
    let err = m.write_plan(Some(3), 4, b"not json", &w).await.unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");

    // A writer whose lease is gone cannot write a plan.
    let lease = leader.lease_id();
    leader.revoke().await?;
    let err = m.write_plan(Some(3), 4, &plan(4), &w).await.unwrap_err();
    assert!(
        matches!(err, EtcdError::LeaseLost { lease: l, .. } if l == lease),
        "{err}"
    );
    assert_eq!(m.read_plan().await?.map(|r| r.generation), Some(3));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_plan_in_order() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "watch", 5)).await?;
    let leader = m.register("leader", b"").await?;
    let w = leader.writer();
    let mut watch = m.watch_plan().await;
    let mut prev = None;
    for g in 1..=5 {
        let out = m.write_plan(prev, g, &plan(g), &w).await?;
        ensure!(matches!(out, WriteOutcome::Written { .. }), "{out:?}");
        prev = Some(g);
    }
    let mut last_rev = 0;
    for g in 1..=5 {
        let u = next(&mut watch).await?;
        assert_eq!((u.generation, &u.plan), (g, &plan(g)));
        assert!(u.revision > last_rev);
        last_rev = u.revision;
    }
    assert_eq!(watch.status(), WatchStatus::Watching);

    // A watcher started later gets the current plan first.
    let mut late = m.watch_plan().await;
    assert_eq!(next(&mut late).await?.generation, 5);
    m.write_plan(Some(5), 6, &plan(6), &w).await?;
    assert_eq!(next(&mut late).await?.generation, 6);
    assert_eq!(next(&mut watch).await?.generation, 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_and_the_lease_survive_an_etcd_restart() -> Result<()> {
    let mut etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "restart", 5)).await?;
    let leader = m.register("leader", b"").await?;
    let w = leader.writer();
    m.write_plan(None, 1, &plan(1), &w).await?;
    let mut watch = m.watch_plan().await;
    assert_eq!(next(&mut watch).await?.generation, 1);

    let down = Instant::now();
    let pid = etcd.pid();
    tokio::task::block_in_place(|| etcd.stop())?;
    let (_, noticed) = poll("the watch notices etcd is gone", WAIT, || async {
        Ok(matches!(watch.status(), WatchStatus::Reconnecting { .. }).then_some(()))
    })
    .await?;
    tokio::task::block_in_place(|| etcd.restart())?;
    eprintln!(
        "etcd (pid {pid:?} -> {:?}) down for {:?}; the watch noticed after {noticed:?}",
        etcd.pid(),
        down.elapsed()
    );

    // Data survived, the lease too (etcd extends leases on restart), and the watch
    // resumes from its last revision.
    let stored = m.read_plan().await?.context("plan after restart")?;
    assert_eq!(stored.generation, 1);
    let out = m.write_plan(Some(1), 2, &plan(2), &w).await?;
    assert!(matches!(out, WriteOutcome::Written { .. }), "{out:?}");
    m.write_plan(Some(2), 3, &plan(3), &w).await?;
    assert_eq!(next(&mut watch).await?.generation, 2);
    assert_eq!(next(&mut watch).await?.generation, 3);
    assert!(watch.reconnects() >= 1);
    eprintln!("watch reconnects: {}", watch.reconnects());

    // The keep-alive reconnected as well: etcd sees the lease's remaining TTL go up
    // again (a refresh) after the restart.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let lease = leader.lease_id();
    let since = Instant::now();
    let mut prev = raw.lease_time_to_live(lease, None).await?.ttl();
    let refreshed = loop {
        ensure!(
            since.elapsed() < WAIT,
            "no refresh of lease {lease:#x} within {WAIT:?} after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ttl = raw.lease_time_to_live(lease, None).await?.ttl();
        ensure!(ttl > 0, "lease {lease:#x} expired after the restart");
        if ttl > prev {
            break ttl;
        }
        prev = ttl;
    };
    eprintln!(
        "lease remaining TTL went back up to {refreshed} s, seen {:?} after the checks began",
        since.elapsed()
    );
    assert_eq!(*leader.lease_state().borrow(), LeaseState::Alive);
    let out = m.fenced_put("commits/after-restart", b"ok", 3, &w).await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_a_compaction() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "compact", 5)).await?;
    let leader = m.register("leader", b"").await?;
    let w = leader.writer();
    let WriteOutcome::Written { revision: rev1 } = m.write_plan(None, 1, &plan(1), &w).await?
    else {
        bail!("first plan not written");
    };
    m.write_plan(Some(1), 2, &plan(2), &w).await?;
    m.write_plan(Some(2), 3, &plan(3), &w).await?;

    // Compact everything up to now: the history after gen 1 is gone.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let now = raw
        .get("/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    raw.compact(now, Some(CompactionOptions::new().with_physical()))
        .await?;
    eprintln!("compacted at revision {now} (gen 1 was written at {rev1})");

    // A watcher resuming after gen 1 finds its revision compacted, re-reads the plan and
    // continues: gen 2 is skipped (compacted away), gen 3 and later are delivered.
    let cursor = PlanCursor {
        generation: 1,
        revision: rev1,
    };
    let mut watch = m.watch_plan_from(Some(cursor)).await;
    assert_eq!(next(&mut watch).await?.generation, 3);
    assert_eq!(watch.resyncs(), 1);
    m.write_plan(Some(3), 4, &plan(4), &w).await?;
    assert_eq!(next(&mut watch).await?.generation, 4);

    // Never an older generation than already delivered: a watcher that has seen gen 10
    // (per its cursor) skips the re-read gen 4 and gets the next newer one.
    let cursor = PlanCursor {
        generation: 10,
        revision: rev1,
    };
    let mut ahead = m.watch_plan_from(Some(cursor)).await;
    poll("the watch re-reads after the compaction", WAIT, || async {
        Ok((ahead.resyncs() == 1 && ahead.status() == WatchStatus::Watching).then_some(()))
    })
    .await?;
    m.write_plan(Some(4), 11, &plan(11), &w).await?;
    assert_eq!(next(&mut ahead).await?.generation, 11);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_puts_check_the_generation_and_the_writers_lease() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "fence", 2)).await?;
    let leader = m.register("leader", b"").await?;
    let worker = m.register("worker", b"").await?;
    let lw = leader.writer();
    let w = worker.writer();
    assert_eq!(
        m.fenced_put("commits/0", b"x", 1, &w).await?,
        FenceOutcome::Refused {
            reason: FenceRefusal::NoPlan
        }
    );
    m.write_plan(None, 1, &plan(1), &lw).await?;

    let before = m.requests();
    let out = m
        .fenced_put("commits/step-10", b"manifest-10", 1, &w)
        .await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    eprintln!("fenced_put: {} etcd request(s)", m.requests() - before);

    // After a re-formation the old generation is refused.
    m.write_plan(Some(1), 2, &plan(2), &lw).await?;
    let out = m.fenced_put("commits/step-20", b"late", 1, &w).await?;
    assert_eq!(
        out,
        FenceOutcome::Refused {
            reason: FenceRefusal::StaleGeneration {
                writer: 1,
                current: 2
            }
        }
    );
    let out = m
        .fenced_put("commits/step-20", b"manifest-20", 2, &w)
        .await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");

    // Reserved keys are refused.
    let err = m.fenced_put("gen", b"x", 2, &w).await.unwrap_err();
    assert!(matches!(err, EtcdError::InvalidArgument { .. }), "{err}");

    // The worker hangs (no keep-alives): once its lease expires, its commits are refused.
    worker.pause_keepalive();
    let paused = Instant::now();
    let limit = Duration::from_secs(worker.ttl_s() as u64) + Duration::from_secs(8);
    let (reason, waited) = poll("the fence refuses the hung writer", limit, || async {
        match m.fenced_put("commits/probe", b"probe", 2, &w).await? {
            FenceOutcome::Refused { reason } => Ok(Some(reason)),
            FenceOutcome::Committed { .. } => Ok(None),
        }
    })
    .await?;
    eprintln!(
        "lease of TTL {} s expired {waited:?} after the keep-alives stopped",
        worker.ttl_s()
    );
    assert_eq!(
        reason,
        FenceRefusal::WriterLeaseGone {
            member_id: "worker".into(),
            lease: w.lease,
            current_lease: None
        }
    );
    assert!(
        paused.elapsed() >= Duration::from_secs(1),
        "a 2 s lease outlived 1 s"
    );
    let ids: Vec<_> = m.members().await?.into_iter().map(|x| x.id).collect();
    assert_eq!(ids, ["leader"]);

    // On resume the keep-alive finds the lease gone and says so.
    let mut state = worker.lease_state();
    worker.resume_keepalive();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, LeaseState::Lost { .. })),
    )
    .await
    .context("keep-alive reports the lost lease")??;
    assert!(worker.is_lost());

    // The leader, still alive, commits in the current generation.
    let out = m
        .fenced_put("commits/step-30", b"manifest-30", 2, &lw)
        .await?;
    assert!(matches!(out, FenceOutcome::Committed { .. }), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_fails_over_when_the_leaders_lease_expires() -> Result<()> {
    let etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "election", 2)).await?;
    let a = m.register("a", b"").await?;
    let b = m.register("b", b"").await?;
    assert_eq!(m.leader().await?, None);

    let lead_a = m
        .campaign(&a.writer(), WAIT)
        .await?
        .context("a leads an empty election")?;
    assert_eq!(lead_a.info.member_id, "a");
    assert_eq!(m.leader().await?.map(|l| l.member_id), Some("a".into()));

    // A campaign that does not win within its wait is withdrawn.
    let t = Instant::now();
    assert!(m
        .campaign(&b.writer(), Duration::from_millis(300))
        .await?
        .is_none());
    eprintln!("b's short campaign gave up after {:?}", t.elapsed());
    let b_key = format!("{}leader/{:x}", m.prefix(), b.lease_id());
    let raw = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    poll("b's withdrawn candidacy is deleted", WAIT, || {
        let mut raw = raw.clone();
        let key = b_key.clone();
        async move { Ok(raw.get(key, None).await?.kvs().is_empty().then_some(())) }
    })
    .await?;

    // b campaigns in its own task and waits behind a.
    let mb = m.clone();
    let wb = b.writer();
    let campaign_b = tokio::spawn(async move { mb.campaign(&wb, Duration::from_secs(30)).await });
    poll("b becomes a candidate", WAIT, || {
        let mut raw = raw.clone();
        let key = b_key.clone();
        async move { Ok((!raw.get(key, None).await?.kvs().is_empty()).then_some(())) }
    })
    .await?;
    // a's election key still exists, so b cannot lead yet.
    assert_eq!(m.leader().await?.map(|l| l.member_id), Some("a".into()));
    assert!(!campaign_b.is_finished());

    // a hangs: its lease expires and b leads.
    a.pause_keepalive();
    let t = Instant::now();
    let joined = tokio::time::timeout(Duration::from_secs(30), campaign_b)
        .await
        .context("b's campaign resolves")?;
    let lead_b = joined??.context("b leads before its campaign deadline")?;
    eprintln!(
        "b leads {:?} after a's keep-alives stopped (TTL 2 s)",
        t.elapsed()
    );
    assert_eq!(lead_b.info.member_id, "b");
    assert!(lead_b.info.create_revision > lead_a.info.create_revision);
    assert_eq!(m.leader().await?.map(|l| l.member_id), Some("b".into()));

    // Resigning empties the election; resigning a lost leadership is not an error.
    m.resign(lead_b).await?;
    assert_eq!(m.leader().await?, None);
    m.resign(lead_a).await?;

    // A campaign with a dead lease fails clearly.
    let err = m.campaign(&a.writer(), WAIT).await.unwrap_err();
    assert!(matches!(err, EtcdError::LeaseLost { .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_closed_port_fails_fast_and_names_the_endpoint() -> Result<()> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut c = EtcdConfig::new(vec![endpoint.clone()], "nowhere");
    c.connect_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let err = EtcdMembership::connect(c).await.unwrap_err();
    let took = t.elapsed();
    eprintln!("connect to a closed port failed after {took:?}: {err}");
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    Ok(())
}

/// The next event of `watch`, at most [`WAIT`] away.
async fn next_member(watch: &mut MemberWatch) -> Result<MemberEvent> {
    match tokio::time::timeout(WAIT, watch.recv()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => bail!("the member watch ended: {:?}", watch.status()),
        Err(_) => bail!(
            "no member event within {WAIT:?}; status {:?}",
            watch.status()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_watches_see_registrations_and_deletions_across_a_restart() -> Result<()> {
    let mut etcd = start_etcd()?;
    let m = EtcdMembership::connect(config(&etcd, "mwatch", 5)).await?;
    let a = m.register("a", b"A").await?;
    let mut all = m.watch_members();
    let mut only_b = m.watch_member("b")?;
    match next_member(&mut all).await? {
        MemberEvent::Snapshot { members, .. } => {
            let got: Vec<_> = members.iter().map(|x| (x.id.as_str(), x.lease)).collect();
            assert_eq!(got, [("a", a.lease_id())]);
        }
        other => bail!("expected a snapshot, got {other:?}"),
    }
    match next_member(&mut only_b).await? {
        MemberEvent::Snapshot { members, .. } => assert!(members.is_empty(), "{members:?}"),
        other => bail!("expected a snapshot, got {other:?}"),
    }
    let b = m.register("b", b"B").await?;
    for w in [&mut all, &mut only_b] {
        match next_member(w).await? {
            MemberEvent::Put { member, .. } => {
                assert_eq!(
                    (member.id.as_str(), member.info.as_slice(), member.lease),
                    ("b", &b"B"[..], b.lease_id())
                );
            }
            other => bail!("expected b's put, got {other:?}"),
        }
    }

    // etcd restarts: both watches resume from their last revision, nothing is lost.
    tokio::task::block_in_place(|| etcd.restart())?;
    a.revoke().await?;
    let b2 = m.register("b", b"B2").await?;
    match next_member(&mut all).await? {
        MemberEvent::Deleted { id, .. } => assert_eq!(id, "a"),
        other => bail!("expected a's deletion, got {other:?}"),
    }
    for w in [&mut all, &mut only_b] {
        match next_member(w).await? {
            MemberEvent::Put { member, .. } => assert_eq!(
                (member.id.as_str(), member.lease),
                ("b", b2.lease_id()),
                "b's key moved to its new lease"
            ),
            other => bail!("expected b's new put, got {other:?}"),
        }
    }
    eprintln!(
        "reconnects after the restart: all {}, only_b {}",
        all.reconnects(),
        only_b.reconnects()
    );
    assert!(all.reconnects() >= 1 && only_b.reconnects() >= 1);
    b2.revoke().await?;
    for w in [&mut all, &mut only_b] {
        match next_member(w).await? {
            MemberEvent::Deleted { id, .. } => assert_eq!(id, "b"),
            other => bail!("expected b's deletion, got {other:?}"),
        }
    }
    // b's first lease no longer holds any key; revoking it deletes nothing.
    drop(b);
    assert!(m.watch_member("x/y").is_err());
    Ok(())
}

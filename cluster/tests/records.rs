//! Malformed records in a real etcd ([`tenax_chaos::EtcdServer`], killed on drop): what
//! another tool or a hand edit may leave under `/tenax/<job>/` is ignored with a warning
//! by running [`Member`]s, which keep their plan, keep watching, and re-form as usual.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tenax_chaos::EtcdServer;
use tenax_cluster::etcd::EtcdConfig;
use tenax_cluster::member::{Member, MemberConfig, MemberState};
use tenax_cluster::records::{self, GEN_KEY};
use tenax_core::detector::ConfirmationConfig;
use tenax_core::membership::{compute_plan, MemberId, MemberInfo, Plan, PlannerConfig};

/// The most any wait in this test may take; far above what it needs.
const WAIT: Duration = Duration::from_secs(20);

fn planner() -> PlannerConfig {
    PlannerConfig {
        min_members: 1,
        max_members: 16,
        pp_depth: 1,
        shrink_pipeline: false,
        max_ranks_per_member: 8,
        settle_ms: 300,
        settle_max_ms: 900,
        max_known_members: 64,
        confirmation: ConfirmationConfig::default(),
    }
}

fn config(server: &EtcdServer, job: &str, id: &str) -> MemberConfig {
    let mut etcd = EtcdConfig::new(vec![server.endpoint()], job);
    etcd.lease_ttl_s = 2;
    etcd.backoff_initial = Duration::from_millis(50);
    etcd.backoff_max = Duration::from_millis(500);
    MemberConfig {
        etcd,
        planner: planner(),
        id: id.to_string(),
        devices: 1,
        addr: String::new(),
        metrics_addr: String::new(),
    }
}

/// Polls `check` every 20 ms until it holds, at most [`WAIT`].
async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > WAIT {
            bail!("{what}: not within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn members_of(m: &Member) -> Option<(u64, Vec<String>)> {
    m.current_plan().map(|p| {
        (
            p.generation,
            p.members.iter().map(|m| m.to_string()).collect(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_ignored_and_members_keep_working() -> Result<()> {
    let server = tokio::task::block_in_place(EtcdServer::start).context("starting etcd")?;
    let job = "records";
    let a = Member::start(config(&server, job, "a")).await?;
    let b = Member::start(config(&server, job, "b")).await?;
    let both =
        |m: &Member| members_of(m).is_some_and(|(_, ms)| ms == ["a".to_string(), "b".to_string()]);
    wait_for("a plan with a and b", || both(&a) && both(&b)).await?;
    let generation = a.generation().context("a plan")?;
    ensure!(b.generation() == Some(generation));

    let prefix = records::job_prefix(job);
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await?;
    let gen_key = format!("{prefix}{GEN_KEY}");
    let good = a.current_plan().context("a plan")?;
    let next = generation + 1;
    let with = |f: &dyn Fn(&mut Plan)| {
        let mut p = good.clone();
        p.generation = next;
        f(&mut p);
        records::encode_plan_envelope(next, &records::encode_plan(&p))
    };
    let bad_values: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"garbage".to_vec()),
        ("JSON, not an envelope", br#"{"generation":"x"}"#.to_vec()),
        (
            "an envelope around JSON that is not a plan",
            records::encode_plan_envelope(next, br#"{"any":"plan"}"#),
        ),
        (
            "a plan of another generation",
            records::encode_plan_envelope(next, &records::encode_plan(&good)),
        ),
        (
            "world 0",
            with(&|p| {
                p.world = 0;
                p.dp_width = 0;
                p.ranks.clear();
            }),
        ),
        ("a rank out of range", with(&|p| p.ranks[0].rank = 7)),
        (
            "a rank hosted by a stranger",
            with(&|p| p.ranks[0].member = MemberId::new("zz")),
        ),
        (
            "world larger than its ranks",
            with(&|p| {
                p.world = 5;
                p.dp_width = 5;
            }),
        ),
    ];
    for (name, value) in &bad_values {
        raw.put(gen_key.as_str(), value.clone(), None).await?;
        eprintln!("put {name} at {gen_key}");
    }
    // Malformed registrations (no lease: they stay) and a malformed suspicion report.
    raw.put(format!("{prefix}members/zz"), "garbage", None)
        .await?;
    let no_devices = MemberInfo {
        id: MemberId::new("yy"),
        devices: 0,
        joined_gen: 0,
        addr: String::new(),
        metrics_addr: String::new(),
    };
    raw.put(
        format!("{prefix}{}", records::member_key("yy")),
        records::encode_member_info(&no_devices),
        None,
    )
    .await?;
    raw.put(
        format!("{prefix}{}", records::suspect_key("b", "a")),
        "{",
        None,
    )
    .await?;
    // Give the watches time to see every value.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for m in [&a, &b] {
        ensure!(
            m.state() == MemberState::Active,
            "member {} after malformed values: {:?}",
            m.id(),
            m.state()
        );
        ensure!(
            m.generation() == Some(generation),
            "member {} moved to {:?}",
            m.id(),
            m.generation()
        );
    }

    // A good plan written over the garbage is delivered: the plan watches survived. Its
    // generation is above the malformed envelopes' (a watch delivers each generation
    // once, and counts an envelope that decodes as delivered even when the member then
    // rejects the plan inside).
    let members = [a.info().clone(), b.info().clone()];
    let next = next + 1;
    let repaired = compute_plan(Some(&good), &members, &planner(), next)?;
    raw.put(
        gen_key.as_str(),
        records::encode_plan_envelope(next, &records::encode_plan(&repaired)),
        None,
    )
    .await?;
    wait_for("the repaired plan on both members", || {
        a.generation() == Some(next) && b.generation() == Some(next)
    })
    .await?;

    // The group still re-forms: b leaves, the leader plans a generation with a alone (the
    // malformed registrations of zz and yy are not members).
    b.shutdown().await?;
    wait_for("a plan with a alone", || {
        members_of(&a).is_some_and(|(g, ms)| g > next && ms == ["a".to_string()])
    })
    .await?;
    ensure!(a.state() == MemberState::Active, "{:?}", a.state());
    a.shutdown().await?;
    Ok(())
}

//! `tenax bench ...`: measurements printed as one JSON line each.
//!
//! - `train`: training throughput on synthetic tokens.
//! - `rendezvous`: N members on one etcd form a generation; one lease is revoked; time and
//!   etcd requests until every member has observed the next generation.
//!
//! The others live beside it: `ckpt` and `ckpt-kill` in src/bench_ckpt.rs, `daemons` and
//! `recovery` in src/bench_cluster.rs, `state-copy` (and its donor) in src/bench_state.rs,
//! `pipeline`, `stream` and `gpu` in src/bench_pipeline.rs, src/bench_stream.rs and
//! src/bench_gpu.rs.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use tenax_actors::{TrainData, TrainSetup, Trainer};
use tenax_chaos::EtcdServer;
use tenax_cluster::etcd::{EtcdConfig, EtcdMembership, PlanWatch, Registration};
use tenax_cluster::member::{Member, MemberConfig};
use tenax_cluster::records;
use tenax_core::membership::{MemberId, MemberInfo, PlannerConfig};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;
use tenax_model::{AdamW, AdamWConfig, GptConfig, ParamLayout};

pub use crate::bench_ckpt::{ckpt, ckpt_kill, BenchCkptArgs, BenchCkptKillArgs};
pub(crate) use crate::bench_cluster::corpus_or_synthetic;
pub use crate::bench_cluster::{daemons, recovery, BenchDaemonsArgs, BenchRecoveryArgs};
pub use crate::bench_state::{state_copy, state_donor, BenchStateCopyArgs, StateDonorArgs};

/// Options of `tenax bench train`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// Model preset.
    #[arg(long, default_value = "nano")]
    pub preset: String,
    /// Vocabulary size of the synthetic tokens (65: tinyshakespeare's char vocabulary).
    #[arg(long, default_value_t = 65)]
    pub vocab: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 12)]
    pub batch_size: u64,
    /// Samples per slot (default: the whole batch, one pass per step).
    #[arg(long)]
    pub micro_batch_size: Option<u64>,
    /// Data-parallel ranks.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
}

/// A trainer of a freshly initialised `model` (seed 1) on 512 windows of uniformly random
/// tokens below `vocab`.
pub(crate) async fn synthetic_trainer(
    model: &GptConfig,
    vocab: usize,
    batch: BatchLayout,
    ranks: usize,
) -> Result<Trainer> {
    let layout = ParamLayout::for_config(model);
    let mut rng = SplitMix64::new(7);
    let tokens: Vec<u32> = (0..(model.block_size + 1) * 512)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    let data = Arc::new(TrainData::in_memory(tokens.clone(), tokens));
    let setup = TrainSetup {
        model: model.clone(),
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        grad_clip: 1.0,
        batch,
        seed: 1,
        ranks,
        step_timeout: Duration::from_secs(600),
        device: Default::default(),
    };
    let params = tenax_model::init_params(model, &layout, 1);
    Trainer::start(setup, data, params, AdamW::new(layout.total))
        .await
        .map_err(|e| anyhow!("{e}"))
}

/// Run the benchmark.
pub async fn train(a: BenchTrainArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps 0: the median needs at least one timed step; pass --steps 1 or more");
    }
    if a.ranks == 0 {
        bail!("--ranks 0: training needs at least one rank; pass --ranks 1 or more");
    }
    let model = GptConfig::preset(&a.preset, a.vocab).map_err(|e| anyhow!("--preset: {e}"))?;
    let batch = BatchLayout::new(a.batch_size, a.micro_batch_size.unwrap_or(a.batch_size))
        .map_err(|e| anyhow!("{e}"))?;
    let layout = ParamLayout::for_config(&model);
    let trainer = synthetic_trainer(&model, a.vocab, batch, a.ranks).await?;
    let mut times = Vec::new();
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        trainer
            .step(step, step * a.batch_size, 1e-3)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    trainer.shutdown().await;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (a.batch_size as usize * model.block_size) as f64;
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "{}",
        serde_json::json!({
            "bench": "train", "preset": a.preset, "params": layout.total, "batch_size": a.batch_size,
            "micro_batch_size": batch.micro_batch_size, "ranks": a.ranks, "threads": threads,
            "steps": a.steps, "ms_per_step_median": median * 1e3, "tokens_per_s": tokens / median,
        })
    );
    Ok(())
}

/// A small deterministic text corpus.
pub(crate) fn synthetic_corpus(path: &Path) -> Result<()> {
    let words = [
        "the", "king", "shall", "speak", "of", "love", "and", "war", "to", "thee", "my", "lord",
    ];
    let mut rng = SplitMix64::new(99);
    let mut text = String::new();
    while text.len() < 40_000 {
        for _ in 0..(3 + rng.below(8)) {
            text.push_str(words[rng.below(words.len() as u64) as usize]);
            text.push(' ');
        }
        text.push_str(if rng.below(4) == 0 { ".\n" } else { ",\n" });
    }
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

/// The median of `v` (of an even count, the upper of the middle two).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Options of `tenax bench rendezvous`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchRendezvousArgs {
    /// etcd client URL, http://host:port (default: start a local etcd; needs `etcd` on PATH).
    #[arg(long)]
    pub etcd: Option<String>,
    /// Members in the job.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Lease TTL of every member, in seconds (etcd's minimum is 2).
    #[arg(long, default_value_t = 2)]
    pub ttl_s: i64,
    /// The planner's settle window after a membership change, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub settle_ms: u64,
    /// Full members (each a `Member`: campaigns, plans when leader, watches its own key);
    /// the others are light (register under their own lease and watch the plan).
    #[arg(long, default_value_t = 3)]
    pub full_members: usize,
    /// etcd connections the members share (round-robin).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

/// How long the first generation with every member may take to form.
const RENDEZVOUS_FORM_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the re-formation after the revocation may take.
const RENDEZVOUS_REFORM_TIMEOUT: Duration = Duration::from_secs(120);

/// Registrations in flight at once while the light members join.
const RENDEZVOUS_REGISTER_CONCURRENCY: usize = 32;

/// A light member: a lease and a plan watch, its newest generation in `seen`.
struct LightMember {
    /// Its registration (lease kept alive).
    registration: Registration,
    /// The newest generation its plan watch delivered.
    seen: Arc<AtomicU64>,
}

/// Polls `done` every millisecond until it holds, at most `limit`.
async fn poll_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// N members on one etcd form a generation; one light member's lease is revoked; prints
/// the time until every other member has observed the next generation (`reform_s`) and
/// the etcd requests all members' connections sent meanwhile (`etcd_requests`, the
/// revocation and the keep-alives included; `keepalive_requests` says how many were
/// keep-alives).
pub async fn rendezvous(a: BenchRendezvousArgs) -> Result<()> {
    if a.members < 2 {
        bail!(
            "--members {} is too few: one member is revoked, so at least 2",
            a.members
        );
    }
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let full = a.full_members.clamp(1, a.members);
    // Keep the etcd server (if we started one) alive until the end.
    let (endpoint, _server) = match &a.etcd {
        Some(url) => (url.clone(), None),
        None => {
            let server = tokio::task::spawn_blocking(EtcdServer::start)
                .await?
                .context("starting a local etcd (pass --etcd URL to use a running one)")?;
            (server.endpoint(), Some(server))
        }
    };
    let job = format!(
        "bench-rendezvous-{}-{}",
        std::process::id(),
        tenax_storage::now_unix_ms()
    );
    let mut etcd_config = EtcdConfig::new(vec![endpoint.clone()], job);
    etcd_config.lease_ttl_s = a.ttl_s;
    let mut conns = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        conns.push(
            EtcdMembership::connect(etcd_config.clone())
                .await
                .with_context(|| format!("connecting to etcd at {endpoint}"))?,
        );
    }
    let requests = |conns: &[EtcdMembership]| -> (u64, u64) {
        conns.iter().fold((0, 0), |(r, k), c| {
            (r + c.requests(), k + c.keepalive_requests())
        })
    };
    // min_members N - 1: the group forms once (nearly) everyone registered, and the
    // revocation of one member still leaves enough.
    let planner = PlannerConfig {
        min_members: a.members - 1,
        max_members: a.members,
        pp_depth: 1,
        max_ranks_per_member: 1,
        settle_ms: a.settle_ms,
        settle_max_ms: 3 * a.settle_ms,
        max_known_members: a.members + 16,
        ..PlannerConfig::default()
    };

    let t_start = Instant::now();
    let mut full_members = Vec::with_capacity(full);
    for i in 0..full {
        let config = MemberConfig {
            etcd: etcd_config.clone(),
            planner: planner.clone(),
            id: format!("full-{i:05}"),
            devices: 1,
            addr: String::new(),
            metrics_addr: String::new(),
        };
        let m = Member::start_with(conns[i % conns.len()].clone(), config)
            .await
            .with_context(|| format!("starting full member {i}"))?;
        full_members.push(m);
    }
    let light_ids: Vec<String> = (0..a.members - full)
        .map(|i| format!("light-{i:05}"))
        .collect();
    let mut watchers = tokio::task::JoinSet::new();
    let registered: Vec<(Registration, PlanWatch)> =
        futures::stream::iter(light_ids.iter().enumerate())
            .map(|(i, id)| {
                let conn = conns[i % conns.len()].clone();
                async move {
                    let info = MemberInfo {
                        id: MemberId::new(id.clone()),
                        devices: 1,
                        joined_gen: 0,
                        addr: String::new(),
                        metrics_addr: String::new(),
                    };
                    let registration = conn
                        .register(id, &records::encode_member_info(&info))
                        .await?;
                    let watch = conn.watch_plan().await;
                    anyhow::Ok((registration, watch))
                }
            })
            .buffer_unordered(RENDEZVOUS_REGISTER_CONCURRENCY)
            .try_collect()
            .await?;
    let mut light = Vec::with_capacity(registered.len());
    for (registration, mut watch) in registered {
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        watchers.spawn(async move {
            while let Some(update) = watch.recv().await {
                s.fetch_max(update.generation, Ordering::Relaxed);
            }
        });
        light.push(LightMember { registration, seen });
    }
    let registered_s = t_start.elapsed().as_secs_f64();

    // The first generation with everyone, observed by everyone.
    let mut formed = None;
    poll_until(
        &format!("a generation of all {} members", a.members),
        RENDEZVOUS_FORM_TIMEOUT,
        || {
            let Some(plan) = full_members[0].current_plan() else {
                return false;
            };
            let g = plan.generation;
            let done = plan.members.len() == a.members
                && full_members.iter().all(|m| m.generation() == Some(g))
                && light.iter().all(|l| l.seen.load(Ordering::Relaxed) >= g);
            if done {
                formed = Some(plan);
            }
            done
        },
    )
    .await?;
    let formed = formed.context("the formed plan")?;
    let form_s = t_start.elapsed().as_secs_f64();

    // Revoke one member's lease: a light one (else a full one that does not lead).
    let victim_id: MemberId;
    let victim_lease;
    let victim_light = if light.is_empty() {
        None
    } else {
        Some(light.len() / 2)
    };
    match victim_light {
        Some(v) => {
            victim_id = MemberId::new(light[v].registration.member_id());
            victim_lease = light[v].registration.lease_id();
        }
        None => {
            let m = full_members
                .iter()
                .find(|m| !m.is_leader())
                .context("a full member that does not lead")?;
            victim_id = m.id().clone();
            victim_lease = m.writer().lease;
        }
    }
    let g = formed.generation;
    let (req0, ka0) = requests(&conns);
    let t0 = Instant::now();
    conns[0].revoke_lease(victim_lease).await?;
    let others_full: Vec<&Member> = full_members
        .iter()
        .filter(|m| *m.id() != victim_id)
        .collect();
    let others_light: Vec<&LightMember> = light
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != victim_light)
        .map(|(_, l)| l)
        .collect();
    poll_until(
        "every member observes the next generation",
        RENDEZVOUS_REFORM_TIMEOUT,
        || {
            others_full.iter().all(|m| m.generation() > Some(g))
                && others_light
                    .iter()
                    .all(|l| l.seen.load(Ordering::Relaxed) > g)
        },
    )
    .await?;
    let reform_s = t0.elapsed().as_secs_f64();
    let (req1, ka1) = requests(&conns);
    let plan = others_full[0].current_plan().context("the new plan")?;
    if plan.contains(&victim_id) || plan.members.len() != a.members - 1 {
        bail!(
            "gen {} has {} members (victim {victim_id} included: {}): {}",
            plan.generation,
            plan.members.len(),
            plan.contains(&victim_id),
            plan.reason
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "rendezvous", "members": a.members, "reform_s": reform_s,
            "etcd_requests": req1 - req0, "keepalive_requests": ka1 - ka0,
            "generation": plan.generation, "form_s": form_s, "registered_s": registered_s,
            "ttl_s": a.ttl_s, "settle_ms": a.settle_ms, "full_members": full,
            "connections": a.connections,
        })
    );

    // Leave: stop the watches, revoke every lease still held.
    watchers.abort_all();
    for m in full_members {
        if *m.id() != victim_id {
            let _ = m.shutdown().await;
        }
    }
    futures::stream::iter(light)
        .map(|l| l.registration.revoke())
        .buffer_unordered(RENDEZVOUS_REGISTER_CONCURRENCY)
        .for_each(|_| async {})
        .await;
    Ok(())
}

//! `tenax bench daemons` (daemons over gRPC against `tenax train --ranks N`, side by side)
//! and `tenax bench recovery` (SIGKILL one daemon at a time: time to the survivors' next
//! step, steps lost, the restarted daemon's state copy).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;

use crate::bench::{median, synthetic_corpus};

/// Flags of `tenax bench daemons`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchDaemonsArgs {
    /// Daemons (and ranks of the in-process run).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Model preset.
    #[arg(long, default_value = "nano")]
    pub preset: String,
    /// Steps per run; the first `--warmup` steps are not measured.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    /// Steps left out of the medians (start-up, first allocations).
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Global batch (samples per step).
    #[arg(long, default_value_t = 12)]
    pub batch_size: u64,
    /// Samples per slot.
    #[arg(long, default_value_t = 4)]
    pub micro_batch_size: u64,
    /// Text to train on (default: a small synthetic corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// Median step time of a run, from its metrics.jsonl (tokens/s per step), after `warmup`.
fn median_step_s(metrics: &Path, tokens_per_step: f64, warmup: u64) -> Result<f64> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("{}: cannot read", metrics.display()))?;
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["step"].as_u64().is_some_and(|s| s > warmup))
        .filter_map(|m| m["tokens_per_s"].as_f64())
        .map(|t| tokens_per_step / t)
        .collect();
    if v.is_empty() {
        bail!("{}: no measured steps", metrics.display());
    }
    Ok(median(v))
}

/// `data` if given, else a small synthetic corpus written into `dir`.
pub(crate) fn corpus_or_synthetic(data: Option<&Path>, dir: &Path) -> Result<PathBuf> {
    match data {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let p = dir.join("corpus.txt");
            synthetic_corpus(&p)?;
            Ok(p)
        }
    }
}

/// Step time of N daemons (processes, gRPC; exact reduction over plain TCP and over
/// mutual TLS, ring over plain TCP) against
/// `tenax train --ranks N` in one process, on the same machine, one after the other.
pub async fn daemons(a: BenchDaemonsArgs) -> Result<()> {
    use tenax_chaos::cluster::{ClusterSpec, LocalCluster};
    if a.nodes == 0 {
        bail!("--nodes 0: the benchmark needs at least one daemon; pass --nodes 1 or more");
    }
    if a.steps <= a.warmup {
        bail!(
            "--steps {} with --warmup {}: no step is left to measure; pass --steps above --warmup",
            a.steps,
            a.warmup
        );
    }
    BatchLayout::new(a.batch_size, a.micro_batch_size)
        .map_err(|e| anyhow!("--batch-size/--micro-batch-size: {e}"))?;
    let tmp = tempfile::tempdir().context("temp dir")?;
    let data = corpus_or_synthetic(a.data.as_deref(), tmp.path())?;
    let exe = std::env::current_exe().context("the tenax binary")?;
    let flags: Vec<String> = [
        "--preset",
        &a.preset,
        "--data",
        data.to_str().unwrap_or_default(),
        "--tokenizer",
        "char",
        "--batch-size",
        &a.batch_size.to_string(),
        "--micro-batch-size",
        &a.micro_batch_size.to_string(),
        "--steps",
        &a.steps.to_string(),
        "--eval-batches",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let block = tenax_model::GptConfig::preset(&a.preset, 256)
        .map_err(|e| anyhow!("--preset: {e}"))?
        .block_size;
    let tokens_per_step = (a.batch_size as usize * block) as f64;

    // One process, N rank actors.
    let run = tmp.path().join("inproc");
    let status = std::process::Command::new(&exe)
        .arg("train")
        .args(&flags)
        .args(["--ranks", &a.nodes.to_string(), "--run-dir"])
        .arg(&run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running tenax train")?;
    if !status.success() {
        bail!("tenax train --ranks {} failed", a.nodes);
    }
    let inproc = median_step_s(&run.join("metrics.jsonl"), tokens_per_step, a.warmup)?;

    let mut results = serde_json::Map::new();
    // Exact reduction over plain TCP and over mutual TLS (the cost of encryption), and
    // the ring over plain TCP.
    for (key, reduction, tls) in [
        ("exact", "exact", false),
        ("exact_mtls", "exact", true),
        ("ring", "ring", false),
    ] {
        let job = format!("bench-{}", key.replace('_', "-"));
        let mut args = flags.clone();
        args.extend(
            [
                "--start-nodes",
                &a.nodes.to_string(),
                "--reduction",
                reduction,
                "--settle-ms",
                "300",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let mut c = LocalCluster::start(ClusterSpec {
            tenax_bin: exe.clone(),
            job: job.clone(),
            bucket: format!("{job}-bucket"),
            daemon_args: args,
            env: vec![],
            tls,
        })
        .context("starting etcd and the S3 server")?;
        for n in 0..a.nodes {
            c.spawn_daemon(n, &[]).context("starting a daemon")?;
        }
        for n in 0..a.nodes {
            match c.wait(n, Duration::from_secs(3600))? {
                Some(s) if s.success() => {}
                other => bail!("daemon {n} ended with {other:?}:\n{}", c.log_tail(n)),
            }
        }
        let step_s = median_step_s(
            &c.run_dir(0).join("metrics.jsonl"),
            tokens_per_step,
            a.warmup,
        )?;
        results.insert(key.to_string(), serde_json::json!(step_s));
    }
    let exact = results["exact"].as_f64().unwrap_or(f64::NAN);
    let mtls = results["exact_mtls"].as_f64().unwrap_or(f64::NAN);
    let ring = results["ring"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "bench": "daemons", "nodes": a.nodes, "preset": a.preset, "steps": a.steps,
            "batch_size": a.batch_size, "micro_batch_size": a.micro_batch_size,
            "params": tenax_model::ParamLayout::for_config(&tenax_model::GptConfig::preset(&a.preset, 256).map_err(|e| anyhow!("{e}"))?).total,
            "train_ranks_step_s": inproc, "daemons_exact_step_s": exact, "daemons_ring_step_s": ring,
            "daemons_exact_mtls_step_s": mtls, "mtls_over_plain": mtls / exact,
            "daemons_exact_over_train": exact / inproc, "daemons_ring_over_train": ring / inproc,
            "exact_over_ring": exact / ring,
        })
    );
    Ok(())
}

/// Flags of `tenax bench recovery`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchRecoveryArgs {
    /// Daemons in the job.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// SIGKILLs, each of one daemon that is not the leader (see --kill-leader), restarted
    /// after the others re-formed.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Seed of the victims' choice.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The daemons' --settle-ms.
    #[arg(long, default_value_t = 200)]
    pub settle_ms: u64,
    /// The daemons' --lease-ttl-s (the backstop when nobody reports a failure).
    #[arg(long, default_value_t = 2)]
    pub lease_ttl_s: i64,
    /// The daemons' --suspect-after-ms.
    #[arg(long, default_value_t = 1000)]
    pub suspect_after_ms: u64,
    /// Text to train on (default: a small synthetic corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Kill the leader each time instead of another daemon (nobody is left to revoke its
    /// lease: the survivors wait for it to expire).
    #[arg(long)]
    pub kill_leader: bool,
    /// Run the daemons with --insecure (plain TCP) instead of mutual TLS.
    #[arg(long)]
    pub insecure: bool,
    /// The daemons' --pipeline-stages: each node's rank runs as a pipeline of this many
    /// stages (a killed node's stages come back from the survivors' twins).
    #[arg(long, default_value_t = 1)]
    pub pipeline_stages: u32,
    /// The daemons run --stages-across-nodes: each node runs one stage of a pipeline of
    /// --pipeline-stages nodes (and keeps the whole state).
    #[arg(long)]
    pub stages_across_nodes: bool,
}

/// Waits (polling every 50 ms, at most `limit`) until `f` gives a value.
async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nearest-rank percentile of sorted values (NaN when there are none).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    tenax_chaos::report::percentile(sorted, p).unwrap_or(f64::NAN)
}

/// SIGKILL one daemon of N at a time and measure the recovery: time from the kill to the
/// first step the survivors complete in the next generation, steps lost (applied by the
/// dead lineage and redone), and the throughput of the state copy the restarted daemon
/// makes from a peer.
pub async fn recovery(a: BenchRecoveryArgs) -> Result<()> {
    use tenax_chaos::cluster::{ClusterSpec, LocalCluster, Signal};
    if a.nodes < 2 {
        bail!(
            "--nodes {}: a kill needs survivors; use at least 2",
            a.nodes
        );
    }
    if a.pipeline_stages == 0 {
        bail!("--pipeline-stages 0: a rank runs at least one stage; pass 1 or more");
    }
    let tmp = tempfile::tempdir().context("temp dir")?;
    let data = corpus_or_synthetic(a.data.as_deref(), tmp.path())?;
    let exe = std::env::current_exe().context("the tenax binary")?;
    let flags: Vec<String> = [
        "--preset",
        &a.preset,
        "--data",
        data.to_str().unwrap_or_default(),
        "--tokenizer",
        "char",
        "--batch-size",
        "12",
        "--micro-batch-size",
        "2",
        "--steps",
        "100000000",
        "--eval-every",
        "0",
        "--settle-ms",
        &a.settle_ms.to_string(),
        "--lease-ttl-s",
        &a.lease_ttl_s.to_string(),
        "--suspect-after-ms",
        &a.suspect_after_ms.to_string(),
        "--pipeline-stages",
        &a.pipeline_stages.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        a.stages_across_nodes
            .then(|| "--stages-across-nodes".to_string()),
    )
    .collect();
    let job = "bench-recovery".to_string();
    let mut c = LocalCluster::start(ClusterSpec {
        tenax_bin: exe.clone(),
        job: job.clone(),
        bucket: format!("{job}-bucket"),
        daemon_args: flags,
        env: vec![("CANDLE_NUM_THREADS".into(), "1".into())],
        tls: !a.insecure,
    })
    .context("starting etcd and the S3 server")?;
    for n in 0..a.nodes {
        c.spawn_daemon(n, &["--start-nodes".into(), a.nodes.to_string()])
            .context("starting a daemon")?;
    }
    let dirs: Vec<PathBuf> = (0..a.nodes).map(|n| c.run_dir(n)).collect();
    let logged_steps = |n: usize| tenax_chaos::history::read_node_logs(n, &dirs[n]).0;
    let mut rng = SplitMix64::new(a.seed);
    let (mut recoveries_s, mut lost, mut copies_gbps, mut copy_mb) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let bar = indicatif::ProgressBar::new(a.kills as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} kills {pos}/{len} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let result: Result<()> = async {
        for _ in 0..a.kills {
            // Steady: every daemon has done 5 steps in the newest generation.
            let generation = wait_for(
                "all daemons training in one generation",
                Duration::from_secs(120),
                || {
                    let per: Vec<Vec<_>> = (0..a.nodes).map(logged_steps).collect();
                    let g = per
                        .iter()
                        .filter_map(|l| l.last().map(|s| s.generation))
                        .max()?;
                    per.iter()
                        .all(|l| l.iter().filter(|s| s.generation == g).count() >= 5)
                        .then_some(g)
                },
            )
            .await?;
            let out = std::process::Command::new(&exe)
                .args([
                    "status",
                    "--etcd",
                    &c.etcd_endpoint(),
                    "--job",
                    &job,
                    "--json",
                ])
                .args(c.operator_tls_args())
                .output()
                .context("tenax status")?;
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).with_context(|| {
                    format!("tenax status: {}", String::from_utf8_lossy(&out.stderr))
                })?;
            let leader: Option<usize> = status["members"].as_array().and_then(|m| {
                m.iter()
                    .find(|m| m["leader"] == true)
                    .and_then(|m| m["id"].as_str()?.strip_prefix("node-")?.parse().ok())
            });
            let candidates: Vec<usize> = if a.kill_leader {
                leader.into_iter().collect()
            } else {
                (0..a.nodes).filter(|&n| Some(n) != leader).collect()
            };
            if candidates.is_empty() {
                bail!("no leader found in `tenax status`");
            }
            let victim = candidates[(rng.next_u64() % candidates.len() as u64) as usize];
            let copies_before = c.log(victim).matches("copied the state of step").count();
            let t_kill = tenax_storage::now_unix_ms();
            c.signal(victim, Signal::Kill)?;
            c.wait(victim, Duration::from_secs(10))?;
            let survivors: Vec<usize> = (0..a.nodes).filter(|&n| n != victim).collect();
            let first_new = wait_for(
                "a step in the next generation",
                Duration::from_secs(60),
                || {
                    survivors
                        .iter()
                        .flat_map(|&n| logged_steps(n))
                        .filter(|s| s.generation > generation)
                        .min_by_key(|s| s.t_ms)
                },
            )
            .await?;
            recoveries_s.push(first_new.t_ms.saturating_sub(t_kill) as f64 / 1000.0);
            let done_old = (0..a.nodes)
                .flat_map(logged_steps)
                .filter(|s| s.generation <= generation)
                .map(|s| s.step)
                .max()
                .unwrap_or(0);
            lost.push(done_old.saturating_sub(first_new.step.saturating_sub(1)) as f64);
            // The victim restarts and copies the state from a peer.
            c.spawn_daemon(victim, &[])?;
            let line = wait_for(
                "the restarted daemon's state copy",
                Duration::from_secs(120),
                || {
                    let log = c.log(victim);
                    if log.matches("copied the state of step").count() > copies_before {
                        log.lines()
                            .rev()
                            .find(|l| l.contains("copied the state of step"))
                            .map(str::to_string)
                    } else {
                        None
                    }
                },
            )
            .await?;
            // "... (1.2 MB in 0.004 s, 0.30 GB/s; ..."
            let field = |unit: &str| -> Option<f64> {
                let at = line.find(unit)?;
                line[..at]
                    .trim_end()
                    .rsplit([' ', '('])
                    .next()?
                    .parse()
                    .ok()
            };
            if let (Some(g), Some(mb)) = (field(" GB/s"), field(" MB in")) {
                copies_gbps.push(g);
                copy_mb.push(mb);
            }
            bar.inc(1);
            bar.set_message(format!(
                "last: {:.2} s to recover, {} step(s) lost",
                recoveries_s.last().unwrap_or(&0.0),
                lost.last().unwrap_or(&0.0)
            ));
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    c.kill_all();
    if let Ok(dir) = std::env::var("TENAX_BENCH_KEEP_LOGS") {
        for n in 0..a.nodes {
            let _ = std::fs::write(format!("{dir}/node-{n}.log"), c.log(n));
        }
    }
    if let Err(e) = result {
        let tails: Vec<String> = (0..a.nodes)
            .map(|n| format!("node-{n}:\n{}", c.log_tail(n)))
            .collect();
        bail!("{e:#}\n{}", tails.join("\n"));
    }
    let mut sorted = recoveries_s.clone();
    sorted.sort_by(f64::total_cmp);
    let max_lost = lost.iter().copied().fold(0.0, f64::max);
    let mean_lost = lost.iter().sum::<f64>() / lost.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "recovery", "nodes": a.nodes, "kills": a.kills, "preset": a.preset, "kill_leader": a.kill_leader, "pipeline_stages": a.pipeline_stages, "stages_across_nodes": a.stages_across_nodes,
            "settle_ms": a.settle_ms, "lease_ttl_s": a.lease_ttl_s, "suspect_after_ms": a.suspect_after_ms,
            "recovery_s": recoveries_s, "recovery_p50_s": percentile(&sorted, 50.0), "recovery_p99_s": percentile(&sorted, 99.0),
            "steps_lost": lost, "steps_lost_mean": mean_lost, "steps_lost_max": max_lost,
            "state_copy_mb": copy_mb.first().copied().unwrap_or(f64::NAN),
            "state_copy_gb_per_s_median": if copies_gbps.is_empty() { f64::NAN } else { median(copies_gbps.clone()) },
        })
    );
    Ok(())
}

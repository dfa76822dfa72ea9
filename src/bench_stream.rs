//! `tenax bench stream`: training on a prepared dataset streamed from S3 (a moto server
//! this command starts) against the in-memory path, side by side in one process.
//!
//! It writes three text sources, prepares them (`tenax data prepare`'s code, dedup,
//! filters and scrubbing off) onto `s3://tenax-bench/ds` at least `--dataset-factor`
//! times the prefetch budget, then alternates rounds of `--steps` steps of two trainers
//! of the same model and batch: one reading the streamed dataset, one reading in-memory
//! tokens (the streamed dataset's validation tokens; the in-memory step does not depend on
//! the corpus size). It samples the process RSS after every streamed step and prints one
//! JSON line: tokens/s of each path (median step), their ratio, RSS at the start and end
//! of the streamed steps, the loader's peak held bytes, shards fetched and crossed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tenax_actors::{TrainData, TrainSetup, Trainer};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;
use tenax_model::{AdamW, AdamWConfig, GptConfig, ParamLayout};

use crate::data_cmd::{prepare_blocking, PrepareArgs};
use crate::stream::{StreamData, StreamOptions};

/// Options of `tenax bench stream`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchStreamArgs {
    /// Model preset.
    #[arg(long, default_value = "nano")]
    pub preset: String,
    /// Samples per step.
    #[arg(long, default_value_t = 12)]
    pub batch_size: u64,
    /// Timed steps of each path per round.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Rounds (streamed, then in-memory, each round).
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Untimed warm-up steps of each path.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Prefetch budget in KiB.
    #[arg(long, default_value_t = 256)]
    pub prefetch_kb: u64,
    /// Dataset size as a multiple of the budget.
    #[arg(long, default_value_t = 24)]
    pub dataset_factor: u64,
    /// Tokens per shard.
    #[arg(long, default_value_t = 4096)]
    pub shard_tokens: u64,
    /// Shards whose windows are shuffled together.
    #[arg(long, default_value_t = 2)]
    pub shuffle_shards: u32,
}

/// The resident set size of this process in bytes (Linux), 0 if unknown.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
pub async fn stream(a: BenchStreamArgs) -> Result<()> {
    if a.steps == 0 || a.rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    let moto = tenax_chaos::MotoServer::start()
        .context("start moto_server (scripts/setup installs it)")?;
    moto.create_bucket("tenax-bench")
        .map_err(|e| anyhow!("{e}"))?;
    // The store reads its endpoint from the environment; nothing else reads it yet.
    for (k, v) in moto.s3_env() {
        std::env::set_var(k, v);
    }
    let work = tempfile::Builder::new()
        .prefix("tenax-bench-stream-")
        .tempdir()?;
    let budget = a.prefetch_kb << 10;
    // Bytes tokenizer: one token a byte of text, two bytes a token in a shard.
    let text_bytes = budget * a.dataset_factor / 2 + 3 * a.shard_tokens;
    let mut sources = Vec::new();
    let words = [
        "the", "king", "shall", "speak", "of", "love", "and", "war", "to", "thee", "my", "lord",
        "now", "what", "is", "fair",
    ];
    for (i, (name, weight)) in [("web", 3), ("books", 2), ("code", 1)].iter().enumerate() {
        let mut rng = SplitMix64::new(i as u64 + 1);
        let mut text = String::new();
        while (text.len() as u64) < text_bytes * weight / 6 {
            for _ in 0..(3 + rng.below(8)) {
                text.push_str(words[rng.below(words.len() as u64) as usize]);
                text.push(' ');
            }
            text.push_str(if rng.below(4) == 0 { ".\n\n" } else { ",\n" });
        }
        let path = work.path().join(format!("{name}.txt"));
        std::fs::write(&path, text)?;
        sources.push(format!("{name}={}:{weight}", path.display()));
    }
    let config = work.path().join("prepare.toml");
    std::fs::write(
        &config,
        "[dedup]\nexact = false\nnear = false\n[filters]\nenabled = false\n[scrub]\nenabled = false\n",
    )?;
    let url = "s3://tenax-bench/ds".to_string();
    let args = PrepareArgs {
        sources,
        out: url.clone(),
        tokenizer: "bytes".into(),
        config: Some(config),
        shard_tokens: Some(a.shard_tokens),
        threads: 0,
        near_dup_memory_mib: tenax_data::prepare::config::DEFAULT_NEAR_DUP_MEMORY_MIB,
        spill_dir: None,
        staging: None,
        quiet: true,
    };
    let t_prep = Instant::now();
    let manifest = tokio::task::spawn_blocking(move || prepare_blocking(&args)).await??;
    let prepare_s = t_prep.elapsed().as_secs_f64();
    let dataset_bytes: u64 = manifest
        .sources
        .iter()
        .flat_map(|s| &s.shards)
        .map(|s| s.bytes)
        .sum();

    let model =
        GptConfig::preset(&a.preset, manifest.vocab_size).map_err(|e| anyhow!("--preset: {e}"))?;
    let batch = BatchLayout::new(a.batch_size, a.batch_size).map_err(|e| anyhow!("{e}"))?;
    let opts = StreamOptions::new(1, model.block_size, a.batch_size, budget, a.shuffle_shards);
    let open_url = url.clone();
    let stream =
        Arc::new(tokio::task::spawn_blocking(move || StreamData::open(&open_url, opts)).await??);
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
        ranks: 1,
        step_timeout: Duration::from_secs(600),
        device: Default::default(),
    };
    let layout = ParamLayout::for_config(&model);
    let params = tenax_model::init_params(&model, &layout, 1);
    let streamed = Trainer::start(
        setup.clone(),
        Arc::new(TrainData {
            train: Vec::new(),
            val: stream.val.clone(),
            stream: Some(stream.clone() as Arc<dyn tenax_actors::SampleSource>),
            canaries: None,
        }),
        params.clone(),
        AdamW::new(layout.total),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let in_memory = Trainer::start(
        setup,
        Arc::new(TrainData::in_memory(stream.val.clone(), stream.val.clone())),
        params,
        AdamW::new(layout.total),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;

    let bs = a.batch_size;
    let (mut s_step, mut m_step) = (0u64, 0u64);
    for _ in 0..a.warmup {
        streamed
            .step(s_step, s_step * bs, 1e-3)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        in_memory
            .step(m_step, m_step * bs, 1e-3)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        s_step += 1;
        m_step += 1;
    }
    let first_sample = s_step * bs;
    let (mut s_times, mut m_times, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        for _ in 0..a.steps {
            let t = Instant::now();
            streamed
                .step(s_step, s_step * bs, 1e-3)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            s_times.push(t.elapsed().as_secs_f64());
            rss.push(rss_bytes());
            s_step += 1;
        }
        for _ in 0..a.steps {
            let t = Instant::now();
            in_memory
                .step(m_step, m_step * bs, 1e-3)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            m_times.push(t.elapsed().as_secs_f64());
            m_step += 1;
        }
    }
    streamed.shutdown().await;
    in_memory.shutdown().await;
    let crossed: HashSet<String> = (first_sample..s_step * bs)
        .map(|s| stream.locate(s).1)
        .collect();
    let stats = stream.stats();
    let tokens = (bs as usize * model.block_size) as f64;
    let (s_med, m_med) = (median(s_times.clone()), median(m_times.clone()));
    let tenth = (rss.len() / 10).max(1);
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / (1u64 << 20) as f64;
    let line = json!({
        "bench": "stream",
        "preset": a.preset,
        "batch_size": bs,
        "steps_per_path": a.steps * a.rounds,
        "prefetch_budget_bytes": budget,
        "dataset_bytes": dataset_bytes,
        "dataset_over_budget": dataset_bytes as f64 / budget as f64,
        "shards": manifest.totals.shards,
        "shards_crossed": crossed.len(),
        "shard_fetches": stats.fetches,
        "held_peak_bytes": stats.peak_bytes,
        "prepare_s": prepare_s,
        "streamed_tokens_per_s": tokens / s_med,
        "in_memory_tokens_per_s": tokens / m_med,
        "streamed_over_in_memory": m_med / s_med,
        "streamed_mean_tokens_per_s": tokens * s_times.len() as f64 / s_times.iter().sum::<f64>(),
        "in_memory_mean_tokens_per_s": tokens * m_times.len() as f64 / m_times.iter().sum::<f64>(),
        "rss_mib_first_tenth": mean(&rss[..tenth]),
        "rss_mib_last_tenth": mean(&rss[rss.len() - tenth..]),
        "rss_mib_min": *rss.iter().min().unwrap() as f64 / (1u64 << 20) as f64,
        "rss_mib_max": *rss.iter().max().unwrap() as f64 / (1u64 << 20) as f64,
        "candle_threads": std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into()),
    });
    println!("{line}");
    drop(moto);
    Ok(())
}

//! `tenax bench train`: training throughput on synthetic tokens, printed as one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tenax_actors::{TrainData, TrainSetup, Trainer};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;
use tenax_model::{AdamW, AdamWConfig, GptConfig, ParamLayout};

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

/// Run the benchmark.
pub async fn train(a: BenchTrainArgs) -> Result<()> {
    let model = GptConfig::preset(&a.preset, a.vocab).map_err(|e| anyhow!("--preset: {e}"))?;
    let batch = BatchLayout::new(a.batch_size, a.micro_batch_size.unwrap_or(a.batch_size))
        .map_err(|e| anyhow!("{e}"))?;
    let layout = ParamLayout::for_config(&model);
    let mut rng = SplitMix64::new(7);
    let tokens: Vec<u32> = (0..(model.block_size + 1) * 512)
        .map(|_| rng.below(a.vocab as u64) as u32)
        .collect();
    let data = Arc::new(TrainData {
        train: tokens.clone(),
        val: tokens,
    });
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
        ranks: a.ranks,
        step_timeout: Duration::from_secs(600),
    };
    let params = tenax_model::init_params(&model, &layout, 1);
    let trainer = Trainer::start(setup, data, params, AdamW::new(layout.total))
        .await
        .map_err(|e| anyhow!("{e}"))?;
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

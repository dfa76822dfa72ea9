//! The training flags: [`TrainArgs`], every key optional, as `tenax train` and `tenax
//! daemon` take them on the command line and in a `--config` TOML file (same keys,
//! snake_case); `TrainConfig::resolve` in src/config.rs fills in the rest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Every training key, each optional: what a flag or a config file says.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TrainArgs {
    /// Model size: tiny (tests), nano (nanoGPT's CPU recipe) or gpt2-small [default: nano].
    #[arg(long)]
    pub preset: Option<String>,
    /// Text files or directories to train on (repeatable). Default: Rust sources of
    /// tenax's own dependencies from the local cargo registry.
    #[arg(long = "data", value_name = "PATH")]
    pub data: Option<Vec<PathBuf>>,
    /// Streaming a prepared dataset (--data s3://bucket/dataset, or a folder with a
    /// manifest.json): byte budget of the shards fetched ahead and held, in MiB [default: 256].
    #[arg(long, value_name = "MIB")]
    pub prefetch_mb: Option<u64>,
    /// Streaming a prepared dataset: K, the shards whose windows are shuffled together
    /// (shard order is permuted every epoch) [default: 4].
    #[arg(long, value_name = "K")]
    pub shuffle_shards: Option<u32>,
    /// Tokenizer: bytes, char (vocabulary from the corpus) or gpt2 (BPE) [default: bytes].
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Stop after this many optimizer steps in total, counted from the run's start [default: 6000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples (sequences) per optimizer step: the global batch [default: 12].
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Samples per forward/backward pass (one slot); must divide --batch-size [default: 4].
    #[arg(long)]
    pub micro_batch_size: Option<u64>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate at the end of the cosine decay [default: 1e-4].
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warmup steps [default: 100, or --steps/10 if smaller].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Length of the cosine decay in steps (default: --steps of the run that started it;
    /// a resumed run keeps it, so a larger --steps continues the same schedule).
    #[arg(long)]
    pub lr_decay_steps: Option<u64>,
    /// AdamW decoupled weight decay, on 2-D weights only [default: 0.1].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW beta2 [default: 0.99].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Global gradient-norm clip, 0 disables [default: 1.0].
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seed of weight init and data order [default: 1337].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data-parallel ranks in this process, at most batch / micro-batch [default: 1].
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Where metrics.jsonl, loss.png, token shards and (by default) checkpoints go [default: runs/default].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Checkpoint store URL (file:///abs/path, s3://bucket/prefix, memory://).
    /// Default: file://<run-dir>/checkpoints.
    #[arg(long)]
    pub store: Option<String>,
    /// Save a checkpoint every N steps, 0: only at the end [default: 0].
    #[arg(long)]
    pub ckpt_every: Option<u64>,
    /// Retention: keep the newest K checkpoints (older ones are deleted after each save
    /// unless --keep-every keeps them; the newest good one is never deleted), 0: keep all [default: 0].
    #[arg(long)]
    pub keep_last: Option<u64>,
    /// Retention: also keep every checkpoint whose step is a multiple of M, 0: off [default: 0].
    #[arg(long)]
    pub keep_every: Option<u64>,
    /// Evaluate validation loss every N steps, 0: only at the end [default: 0].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation batches (of --micro-batch-size samples) per evaluation [default: 20].
    #[arg(long)]
    pub eval_batches: Option<u64>,
    /// Stop with an error after this many consecutive non-finite steps [default: 5].
    #[arg(long)]
    pub max_bad_steps: Option<u64>,
    /// Training guard: flag a step whose loss or gradient norm is more than this many
    /// standard deviations above its moving mean, and skip its update; 0: off [default: 0].
    #[arg(long, value_name = "K")]
    pub guard_sigma: Option<f64>,
    /// Training guard: applied steps observed before anything is flagged [default: 50].
    #[arg(long, value_name = "STEPS")]
    pub guard_warmup_steps: Option<u64>,
    /// Training guard: after this many flagged steps in a row, roll back to the in-memory
    /// snapshot (the step counter and data cursor go on); 0: only skip [default: 0].
    #[arg(long, value_name = "N")]
    pub guard_rollback_after: Option<u32>,
    /// Training guard: keep the in-memory snapshot after every applied step that is a
    /// multiple of this (only with --guard-rollback-after; choose one dividing
    /// --ckpt-every, so that a resumed run holds it) [default: 50].
    #[arg(long, value_name = "STEPS")]
    pub guard_snapshot_every: Option<u64>,
    /// Pipeline stages S: the --ranks of this process form ranks / S pipelines of S
    /// stages (`tenax daemon`: each of its --devices ranks is a pipeline of S stages),
    /// each stage holding a contiguous run of the model's layers; the same bits as one
    /// rank. At most the model's layer count [default: 1].
    #[arg(long)]
    pub pipeline_stages: Option<u32>,
    /// Pipeline schedule: gpipe or 1f1b [default: 1f1b].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Where each rank's forward, backward and update run: cpu (fused kernels), cuda
    /// (rank i of this process on GPU i; needs a build with `--features cuda`), cuda:N
    /// (from GPU N) or candle-cpu (the GPU path's code on the CPU). The gradient
    /// reduction stays exact and on the host. Never taken from a checkpoint [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Compute precision off the fused CPU path: bf16 (f32 master weights and AdamW
    /// state) or f32 [default: bf16].
    #[arg(long)]
    pub precision: Option<String>,
    /// Sign the manifest of every checkpoint this process commits with this ed25519 private
    /// key file (`tenax ckpt keygen --out FILE` writes one). Never taken from a checkpoint.
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
    /// Resume only from a checkpoint whose manifest is signed by this ed25519 public key
    /// file (FILE.pub of `tenax ckpt keygen`): unsigned checkpoints and ones signed by
    /// another key or edited after signing are refused. Never taken from a checkpoint.
    #[arg(long, value_name = "FILE.pub")]
    pub trust_key: Option<PathBuf>,
    /// Memorisation probe: plant this many random canary sequences per repetition count of
    /// --canary-reps in the training samples (their secrets go to <run-dir>/canaries.json,
    /// their exposure to <run-dir>/memorisation.json at the end); 0: off [default: 0].
    #[arg(long, value_name = "N")]
    pub canaries: Option<u32>,
    /// Memorisation probe: how many times each canary is inserted, comma-separated
    /// [default: 1,10,100].
    #[arg(long, value_name = "R,R,...", value_delimiter = ',')]
    pub canary_reps: Option<Vec<u64>>,
    /// Memorisation probe: tokens of a canary's prefix, the context its secret follows [default: 8].
    #[arg(long, value_name = "TOKENS")]
    pub canary_prefix_tokens: Option<usize>,
    /// Memorisation probe: tokens of a canary's secret, on which exposure is measured [default: 6].
    #[arg(long, value_name = "TOKENS")]
    pub canary_secret_tokens: Option<usize>,
    /// Memorisation probe: candidate secrets each canary is ranked among at the end of the
    /// run (all of them when the secret space is no larger) [default: 1000].
    #[arg(long, value_name = "N")]
    pub canary_candidates: Option<u64>,
}

impl TrainArgs {
    /// Fill every unset key of `self` from `other`.
    pub fn or(self, other: TrainArgs) -> TrainArgs {
        macro_rules! pick { ($($f:ident),*) => { TrainArgs { $($f: self.$f.or(other.$f)),* } } }
        pick!(
            preset,
            data,
            tokenizer,
            steps,
            batch_size,
            micro_batch_size,
            lr,
            min_lr,
            warmup_steps,
            lr_decay_steps,
            weight_decay,
            beta1,
            beta2,
            grad_clip,
            seed,
            ranks,
            run_dir,
            store,
            ckpt_every,
            keep_last,
            keep_every,
            eval_every,
            eval_batches,
            max_bad_steps,
            guard_sigma,
            guard_warmup_steps,
            guard_rollback_after,
            guard_snapshot_every,
            pipeline_stages,
            schedule,
            device,
            precision,
            prefetch_mb,
            shuffle_shards,
            sign_key,
            trust_key,
            canaries,
            canary_reps,
            canary_prefix_tokens,
            canary_secret_tokens,
            canary_candidates
        )
    }

    /// The manifest keys that `--sign-key` and `--trust-key` name, read from their files
    /// (none given: none, and checkpoints are written and read unsigned as before).
    pub fn manifest_keys(&self) -> Result<tenax_storage::ManifestKeys> {
        let sign = match &self.sign_key {
            Some(p) => Some(tenax_storage::SignKey::read_file(p).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let trust = match &self.trust_key {
            Some(p) => Some(tenax_storage::TrustKey::read_file(p).map_err(anyhow::Error::msg)?),
            None => None,
        };
        Ok(tenax_storage::ManifestKeys {
            sign: sign.map(std::sync::Arc::new),
            trust: trust.map(std::sync::Arc::new),
        })
    }

    /// Read a TOML config file with the same keys as the flags (snake_case).
    pub fn from_toml_file(path: &std::path::Path) -> Result<TrainArgs> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config file {}: cannot read it", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("tenax-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "preset = \"tiny\"\nsteps = 3\n").unwrap();
        let a = TrainArgs::from_toml_file(&p).unwrap();
        assert_eq!(a.preset.as_deref(), Some("tiny"));
        std::fs::write(&p, "stpes = 3\n").unwrap();
        let err = TrainArgs::from_toml_file(&p).unwrap_err().to_string();
        assert!(err.contains("stpes"), "{err}");
    }
}

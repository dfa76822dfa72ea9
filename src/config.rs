//! The training configuration: flags, an optional TOML file with the same keys, and the
//! values a resumed run inherits from its checkpoint. The flags ([`TrainArgs`]) are in
//! src/config/args.rs; [`TrainConfig`], here, is what they resolve to.
//!
//! Precedence: flag > config file > checkpoint (on `--resume`) > default. Keys that fix
//! the math of a step (model, data, batch, optimizer, schedule, seed) must agree with
//! the checkpoint a run resumes from; keys that only say where and how long to run
//! (`steps`, `ranks`, `pipeline_stages`, `schedule`, `run_dir`, `store`, `ckpt_every`,
//! `keep_last`, `keep_every`, `eval_every`, `device`, `precision`) may change: a
//! pipelined run gives the same bits as one rank; a run moved to another device or
//! precision goes on from the same state but with that device's bits. The training
//! guard's keys (`guard_*`) are a policy like `max_bad_steps`: a resumed run inherits them
//! and may change them (they change the bits only when the guard flags a step). The
//! memorisation probe's keys (`canaries`, `canary_reps`, `canary_prefix_tokens`,
//! `canary_secret_tokens`) are math keys while canaries are on ([`CANARY_MATH_KEYS`]);
//! `canary_candidates` only sizes the end-of-run exposure.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

// An explicit path: fuzz/fuzz_targets/train_config.rs includes this file by path, and there
// a plain `mod args;` would be looked for beside this file (src/args.rs).
#[path = "config/args.rs"]
mod args;

pub use args::TrainArgs;

/// Steps of a run that names none: the bare `tenax train` (preset nano, bytes, the built-in
/// corpus) runs a few minutes on 2 cores and ends with a sample that looks like Rust
/// (README, "Get started"; BENCHMARKS.md, "The newcomer's run"). Tests pin their own.
pub const DEFAULT_STEPS: u64 = 6000;

/// The resolved training configuration: nothing optional left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model preset name.
    pub preset: String,
    /// Corpus paths (empty: the built-in corpus).
    pub data: Vec<PathBuf>,
    /// Tokenizer kind.
    pub tokenizer: String,
    /// Where this run stops.
    pub steps: u64,
    /// Global batch in samples.
    pub batch_size: u64,
    /// Samples per slot.
    pub micro_batch_size: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Cosine decay length.
    pub lr_decay_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// Gradient clip.
    pub grad_clip: f64,
    /// Seed.
    pub seed: u64,
    /// Ranks.
    pub ranks: usize,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Checkpoint store URL.
    pub store: String,
    /// Checkpoint period in steps (0: only at the end).
    pub ckpt_every: u64,
    /// Retention: newest checkpoints kept (0: all).
    #[serde(default)]
    pub keep_last: u64,
    /// Retention: steps that are multiples of this are kept (0: off).
    #[serde(default)]
    pub keep_every: u64,
    /// Eval period in steps (0: only at the end).
    pub eval_every: u64,
    /// Eval batches.
    pub eval_batches: u64,
    /// Consecutive non-finite steps tolerated.
    pub max_bad_steps: u64,
    /// Training guard: sigma (0: off).
    #[serde(default)]
    pub guard_sigma: f64,
    /// Training guard: warm-up in applied steps.
    #[serde(default = "default_guard_warmup")]
    pub guard_warmup_steps: u64,
    /// Training guard: flagged steps in a row before a rollback (0: never).
    #[serde(default)]
    pub guard_rollback_after: u32,
    /// Training guard: snapshot period in steps.
    #[serde(default = "default_guard_snapshot_every")]
    pub guard_snapshot_every: u64,
    /// Pipeline stages (1: no pipeline).
    #[serde(default = "one_stage")]
    pub pipeline_stages: u32,
    /// Pipeline schedule (`gpipe` or `1f1b`).
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Where ranks step: `cpu`, `cuda`, `cuda:N` or `candle-cpu`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Compute precision off the fused CPU path: `bf16` or `f32`.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Streamed dataset: prefetch budget in MiB.
    #[serde(default = "default_prefetch_mb")]
    pub prefetch_mb: u64,
    /// Streamed dataset: shards shuffled together (fixes the sample order: part of the
    /// data identity a resumed run must match, not of the math keys).
    #[serde(default = "default_shuffle_shards")]
    pub shuffle_shards: u32,
    /// Memorisation probe: canaries per repetition count (0: off).
    #[serde(default)]
    pub canaries: u32,
    /// Memorisation probe: insertions of each canary, per group.
    #[serde(default = "default_canary_reps")]
    pub canary_reps: Vec<u64>,
    /// Memorisation probe: prefix tokens of a canary.
    #[serde(default = "default_canary_prefix_tokens")]
    pub canary_prefix_tokens: usize,
    /// Memorisation probe: secret tokens of a canary.
    #[serde(default = "default_canary_secret_tokens")]
    pub canary_secret_tokens: usize,
    /// Memorisation probe: candidates per canary in the end-of-run exposure.
    #[serde(default = "default_canary_candidates")]
    pub canary_candidates: u64,
}

fn default_canary_reps() -> Vec<u64> {
    vec![1, 10, 100]
}

fn default_canary_prefix_tokens() -> usize {
    8
}

fn default_canary_secret_tokens() -> usize {
    6
}

fn default_canary_candidates() -> u64 {
    1000
}

fn default_prefetch_mb() -> u64 {
    256
}

fn default_shuffle_shards() -> u32 {
    4
}

fn default_device() -> String {
    "cpu".into()
}

fn default_precision() -> String {
    "bf16".into()
}

fn default_guard_warmup() -> u64 {
    tenax_core::guard::GuardConfig::default().warmup_steps
}

fn default_guard_snapshot_every() -> u64 {
    tenax_core::guard::GuardConfig::default().snapshot_every
}

fn one_stage() -> u32 {
    1
}

fn default_schedule() -> String {
    tenax_core::pipeline::Schedule::default().as_str().into()
}

/// The keys that fix the math of a step, and so must match on resume.
pub const MATH_KEYS: &[&str] = &[
    "preset",
    "tokenizer",
    "batch_size",
    "micro_batch_size",
    "lr",
    "min_lr",
    "warmup_steps",
    "lr_decay_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "seed",
];

/// The memorisation probe's keys that change which tokens a step reads: math keys, but
/// part of [`TrainConfig::math`] (and so of the config hash) only when canaries are on, so
/// a run without canaries hashes as before they existed.
pub const CANARY_MATH_KEYS: &[&str] = &[
    "canaries",
    "canary_reps",
    "canary_prefix_tokens",
    "canary_secret_tokens",
];

impl TrainConfig {
    /// Resolve: unset keys take the checkpoint's value (when resuming), else the default.
    pub fn resolve(args: TrainArgs, from_checkpoint: Option<&TrainConfig>) -> Result<TrainConfig> {
        let args = match from_checkpoint {
            Some(c) => args.or(c.as_args()),
            None => args,
        };
        let steps = args.steps.unwrap_or(DEFAULT_STEPS);
        let run_dir = args
            .run_dir
            .unwrap_or_else(|| PathBuf::from("runs/default"));
        let cfg = TrainConfig {
            preset: args.preset.unwrap_or_else(|| "nano".into()),
            data: args.data.unwrap_or_default(),
            tokenizer: args.tokenizer.unwrap_or_else(|| "bytes".into()),
            steps,
            batch_size: args.batch_size.unwrap_or(12),
            micro_batch_size: args.micro_batch_size.unwrap_or(4),
            lr: args.lr.unwrap_or(1e-3),
            min_lr: args.min_lr.unwrap_or(1e-4),
            warmup_steps: args.warmup_steps.unwrap_or(100.min(steps / 10)),
            lr_decay_steps: args.lr_decay_steps.unwrap_or(steps),
            weight_decay: args.weight_decay.unwrap_or(0.1),
            beta1: args.beta1.unwrap_or(0.9),
            beta2: args.beta2.unwrap_or(0.99),
            grad_clip: args.grad_clip.unwrap_or(1.0),
            seed: args.seed.unwrap_or(1337),
            ranks: args.ranks.unwrap_or(1),
            store: args.store.unwrap_or_default(),
            run_dir,
            ckpt_every: args.ckpt_every.unwrap_or(0),
            keep_last: args.keep_last.unwrap_or(0),
            keep_every: args.keep_every.unwrap_or(0),
            eval_every: args.eval_every.unwrap_or(0),
            eval_batches: args.eval_batches.unwrap_or(20),
            max_bad_steps: args.max_bad_steps.unwrap_or(5),
            guard_sigma: args.guard_sigma.unwrap_or(0.0),
            guard_warmup_steps: args.guard_warmup_steps.unwrap_or_else(default_guard_warmup),
            guard_rollback_after: args.guard_rollback_after.unwrap_or(0),
            guard_snapshot_every: args
                .guard_snapshot_every
                .unwrap_or_else(default_guard_snapshot_every),
            pipeline_stages: args.pipeline_stages.unwrap_or(1),
            schedule: args.schedule.unwrap_or_else(default_schedule),
            device: args.device.unwrap_or_else(default_device),
            precision: args.precision.unwrap_or_else(default_precision),
            prefetch_mb: args.prefetch_mb.unwrap_or_else(default_prefetch_mb),
            shuffle_shards: args.shuffle_shards.unwrap_or_else(default_shuffle_shards),
            canaries: args.canaries.unwrap_or(0),
            canary_reps: args.canary_reps.unwrap_or_else(default_canary_reps),
            canary_prefix_tokens: args
                .canary_prefix_tokens
                .unwrap_or_else(default_canary_prefix_tokens),
            canary_secret_tokens: args
                .canary_secret_tokens
                .unwrap_or_else(default_canary_secret_tokens),
            canary_candidates: args
                .canary_candidates
                .unwrap_or_else(default_canary_candidates),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {} is not a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!(
                "--beta1 {} / --beta2 {} must lie in [0, 1)",
                self.beta1,
                self.beta2
            );
        }
        if self.ranks == 0 {
            bail!("--ranks must be at least 1");
        }
        if self.eval_batches == 0 {
            bail!("--eval-batches must be at least 1");
        }
        if self.pipeline_stages == 0 {
            bail!("--pipeline-stages must be at least 1");
        }
        if !self.ranks.is_multiple_of(self.pipeline_stages as usize) {
            bail!(
                "--pipeline-stages {}: --ranks {} is not a multiple of it (the ranks form ranks / stages pipelines)",
                self.pipeline_stages,
                self.ranks
            );
        }
        if self.shuffle_shards == 0 {
            bail!("--shuffle-shards must be at least 1");
        }
        if self.prefetch_mb == 0 {
            bail!("--prefetch-mb must be at least 1");
        }
        self.pipeline_schedule()?;
        let device = self.step_device()?;
        if matches!(device, tenax_model::StepDevice::Cuda { .. })
            && !candle_core::utils::cuda_is_available()
        {
            bail!(
                "--device {}: this tenax was built without CUDA; rebuild with `--features cuda` (scripts/cuda-toolkit assembles a toolkit) and run it on a GPU machine",
                self.device
            );
        }
        if self.pipeline_stages > 1 && device != tenax_model::StepDevice::Cpu {
            bail!(
                "--device {}: pipeline stages run on the CPU only; drop --pipeline-stages or use --device cpu",
                self.device
            );
        }
        self.guard().validate()?;
        if self.canaries > 0 && self.canary_candidates == 0 {
            bail!("--canary-candidates must be at least 1 with --canaries");
        }
        Ok(())
    }

    /// The memorisation probe's canaries (`None` when `canaries` is 0).
    pub fn canary_config(&self) -> Option<tenax_core::canary::CanaryConfig> {
        (self.canaries > 0).then(|| tenax_core::canary::CanaryConfig {
            per_reps: self.canaries,
            reps: self.canary_reps.clone(),
            prefix_tokens: self.canary_prefix_tokens,
            secret_tokens: self.canary_secret_tokens,
        })
    }

    /// The math keys in force: [`MATH_KEYS`], and [`CANARY_MATH_KEYS`] with canaries on.
    fn math_keys(&self) -> Vec<&'static str> {
        let mut keys = MATH_KEYS.to_vec();
        if self.canaries > 0 {
            keys.extend_from_slice(CANARY_MATH_KEYS);
        }
        keys
    }

    /// Where ranks step, parsed from `device` and `precision`.
    pub fn step_device(&self) -> Result<tenax_model::StepDevice> {
        tenax_model::StepDevice::parse(&self.device, &self.precision)
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// The training guard's settings (`guard_sigma` 0: off).
    pub fn guard(&self) -> tenax_core::guard::GuardConfig {
        tenax_core::guard::GuardConfig {
            sigma: self.guard_sigma,
            warmup_steps: self.guard_warmup_steps,
            rollback_after: self.guard_rollback_after,
            snapshot_every: self.guard_snapshot_every,
            ..Default::default()
        }
    }

    /// The pipeline schedule, parsed.
    pub fn pipeline_schedule(&self) -> Result<tenax_core::pipeline::Schedule> {
        self.schedule
            .parse()
            .map_err(|e| anyhow::anyhow!("--schedule: {e}"))
    }

    /// Back to the optional form (for precedence merging).
    pub fn as_args(&self) -> TrainArgs {
        TrainArgs {
            preset: Some(self.preset.clone()),
            data: Some(self.data.clone()),
            tokenizer: Some(self.tokenizer.clone()),
            steps: Some(self.steps),
            batch_size: Some(self.batch_size),
            micro_batch_size: Some(self.micro_batch_size),
            lr: Some(self.lr),
            min_lr: Some(self.min_lr),
            warmup_steps: Some(self.warmup_steps),
            lr_decay_steps: Some(self.lr_decay_steps),
            weight_decay: Some(self.weight_decay),
            beta1: Some(self.beta1),
            beta2: Some(self.beta2),
            grad_clip: Some(self.grad_clip),
            seed: Some(self.seed),
            ranks: Some(self.ranks),
            run_dir: Some(self.run_dir.clone()),
            store: Some(self.store.clone()),
            ckpt_every: Some(self.ckpt_every),
            keep_last: Some(self.keep_last),
            keep_every: Some(self.keep_every),
            eval_every: Some(self.eval_every),
            eval_batches: Some(self.eval_batches),
            max_bad_steps: Some(self.max_bad_steps),
            guard_sigma: Some(self.guard_sigma),
            guard_warmup_steps: Some(self.guard_warmup_steps),
            guard_rollback_after: Some(self.guard_rollback_after),
            guard_snapshot_every: Some(self.guard_snapshot_every),
            pipeline_stages: Some(self.pipeline_stages),
            schedule: Some(self.schedule.clone()),
            // Where a run computes is the machine's business: a run trained on GPUs resumes
            // on the CPU unless --device says otherwise.
            device: None,
            precision: Some(self.precision.clone()),
            prefetch_mb: Some(self.prefetch_mb),
            shuffle_shards: Some(self.shuffle_shards),
            canaries: Some(self.canaries),
            canary_reps: Some(self.canary_reps.clone()),
            canary_prefix_tokens: Some(self.canary_prefix_tokens),
            canary_secret_tokens: Some(self.canary_secret_tokens),
            canary_candidates: Some(self.canary_candidates),
            // Keys are this process's: a checkpoint never names them.
            sign_key: None,
            trust_key: None,
        }
    }

    /// The math keys as one JSON object, in a fixed order.
    pub fn math(&self) -> serde_json::Map<String, serde_json::Value> {
        let all = serde_json::to_value(self).expect("config serialises");
        self.math_keys()
            .iter()
            .map(|k| (k.to_string(), all[*k].clone()))
            .collect()
    }

    /// Keys whose values differ from `other`'s among the math keys, as "key: a -> b".
    pub fn math_differences(&self, other: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).expect("config serialises"),
            serde_json::to_value(other).expect("config serialises"),
        );
        let canary_keys = match self.canaries > 0 || other.canaries > 0 {
            true => CANARY_MATH_KEYS,
            false => &[],
        };
        MATH_KEYS
            .iter()
            .chain(canary_keys)
            .filter(|k| a[**k] != b[**k])
            .map(|k| format!("{k}: checkpoint has {}, this run has {}", b[*k], a[*k]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_checkpoint_over_default() {
        let ckpt = TrainConfig::resolve(
            TrainArgs {
                steps: Some(10),
                lr: Some(3e-4),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(ckpt.lr_decay_steps, 10);
        let resumed = TrainConfig::resolve(
            TrainArgs {
                steps: Some(20),
                ..Default::default()
            },
            Some(&ckpt),
        )
        .unwrap();
        assert_eq!(resumed.steps, 20);
        assert_eq!(resumed.lr, 3e-4);
        assert_eq!(
            resumed.lr_decay_steps, 10,
            "a resumed run keeps its schedule"
        );
        assert!(resumed.math_differences(&ckpt).is_empty());
        let changed = TrainConfig::resolve(
            TrainArgs {
                seed: Some(5),
                ..Default::default()
            },
            Some(&ckpt),
        )
        .unwrap();
        assert_eq!(changed.math_differences(&ckpt).len(), 1);
    }

    #[test]
    fn bare_run_defaults() {
        let c = TrainConfig::resolve(TrainArgs::default(), None).unwrap();
        assert_eq!(
            (c.steps, c.lr_decay_steps, c.warmup_steps),
            (DEFAULT_STEPS, DEFAULT_STEPS, 100)
        );
        assert_eq!((c.preset.as_str(), c.tokenizer.as_str()), ("nano", "bytes"));
        assert_eq!((c.batch_size, c.micro_batch_size), (12, 4));
    }

    /// A checkpoint written on GPUs resumes on the CPU unless --device says otherwise; the
    /// precision is inherited like the other keys.
    #[test]
    fn the_device_is_never_taken_from_a_checkpoint() {
        let on_gpu = TrainConfig {
            device: "cuda:1".into(),
            precision: "f32".into(),
            ..TrainConfig::resolve(TrainArgs::default(), None).unwrap()
        };
        let resumed = TrainConfig::resolve(TrainArgs::default(), Some(&on_gpu)).unwrap();
        assert_eq!(
            (resumed.device.as_str(), resumed.precision.as_str()),
            ("cpu", "f32")
        );
        let flagged = TrainArgs {
            device: Some("candle-cpu".into()),
            ..Default::default()
        };
        let resumed = TrainConfig::resolve(flagged, Some(&on_gpu)).unwrap();
        assert_eq!(
            resumed.step_device().unwrap(),
            tenax_model::StepDevice::CandleCpu { bf16: false }
        );
    }

    #[test]
    fn the_guard_is_off_by_default_and_inherited_but_not_a_math_key() {
        let off = TrainConfig::resolve(TrainArgs::default(), None).unwrap();
        assert!(!off.guard().enabled());
        let on = TrainConfig::resolve(
            TrainArgs {
                guard_sigma: Some(6.0),
                guard_rollback_after: Some(3),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert!(on.guard().enabled());
        assert_eq!(
            (on.guard().warmup_steps, on.guard().snapshot_every),
            (50, 50)
        );
        assert!(on.math_differences(&off).is_empty(), "a policy, not math");
        assert_eq!(on.math(), off.math(), "the config hash does not change");
        let resumed = TrainConfig::resolve(TrainArgs::default(), Some(&on)).unwrap();
        assert_eq!(resumed.guard(), on.guard(), "a resumed run inherits it");
        // A checkpoint written before the guard existed has no guard keys: off.
        let mut old = serde_json::to_value(&off).unwrap();
        for k in [
            "guard_sigma",
            "guard_warmup_steps",
            "guard_rollback_after",
            "guard_snapshot_every",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        let old: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.guard(), off.guard());
        for bad in [
            TrainArgs {
                guard_sigma: Some(-1.0),
                ..Default::default()
            },
            TrainArgs {
                guard_sigma: Some(3.0),
                guard_rollback_after: Some(2),
                guard_snapshot_every: Some(0),
                ..Default::default()
            },
        ] {
            let err = TrainConfig::resolve(bad, None).unwrap_err().to_string();
            assert!(err.contains("--guard-"), "{err}");
        }
    }
}

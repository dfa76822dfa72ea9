//! The training guard's shell in `tenax train`: the pure detector
//! (`tenax_core::guard::Guard`) decides; this keeps its in-memory snapshot, writes the
//! flagged steps to `flagged.jsonl` in the run dir, and names the samples of a flagged
//! batch (source, shard and token offset, as the sampler gives them).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use tenax_actors::Snapshot;
use tenax_core::guard::{Guard, GuardLimits, GuardState, Verdict};
use tenax_core::sampler::Sampler;
use tenax_storage::LoadedCheckpoint;

use super::Prepared;

/// The file of flagged steps in a run dir: one JSON object a line.
pub const FLAGGED_FILE: &str = "flagged.jsonl";

/// The guard of one `tenax train` process.
pub(crate) struct Guarding {
    /// The detector.
    pub guard: Guard,
    /// The in-memory snapshot: its step and the state (shared copy-on-write with rank 0).
    pub snapshot: Option<(u64, Snapshot)>,
    /// Take a snapshot as soon as the trainer starts (the run resumed from the state the
    /// guard's snapshot names).
    pub snapshot_on_start: bool,
    /// Where flagged steps are appended.
    path: PathBuf,
}

/// The guard state a checkpoint carries (`extra.guard`), if any.
pub(crate) fn state_of(ckpt: &LoadedCheckpoint) -> Result<Option<GuardState>> {
    match ckpt.manifest.extra.get("guard") {
        None => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            anyhow!(
                "checkpoint {}: its guard state does not parse: {e}",
                ckpt.url
            )
        }),
    }
}

impl Guarding {
    /// The guard of a run starting at `step`, from a checkpoint's guard state if it
    /// resumed from one.
    pub fn new(prep: &Prepared, run_dir: &Path, step: u64, state: Option<GuardState>) -> Self {
        let cfg = prep.cfg.guard();
        let (guard, holds) = match state {
            Some(st) => Guard::resumed(cfg, st, step),
            None => (Guard::new(cfg), false),
        };
        Self {
            guard,
            snapshot: None,
            snapshot_on_start: holds,
            path: run_dir.join(FLAGGED_FILE),
        }
    }

    /// The bounds of the next step.
    pub fn limits(&self) -> Option<GuardLimits> {
        self.guard.limits()
    }

    /// The state a checkpoint carries: `None` while the guard is off, so a run without it
    /// writes the manifests it wrote before.
    pub fn checkpoint_state(&self) -> Option<&GuardState> {
        self.guard.cfg.enabled().then_some(&self.guard.state)
    }

    /// Appends one flagged step to `flagged.jsonl` (a failure to write is a warning: the
    /// decision stands).
    pub fn log(&self, line: &Value) {
        append_flagged(&self.path, line);
    }
}

/// Appends one flagged step's line to `path` (a `flagged.jsonl`) in one write, so that a
/// process killed meanwhile leaves no half line for the next start to append to; a
/// failure to write is a warning: the decision stands.
pub(crate) fn append_flagged(path: &Path, line: &Value) {
    let text = format!("{line}\n");
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = r {
        eprintln!("warning: {}: cannot append: {e}", path.display());
    }
}

/// The line of a flagged step: what was decided, why, and the samples of its batch.
pub(crate) fn flagged_line(
    prep: &Prepared,
    step: u64,
    cursor: u64,
    loss: f64,
    grad_norm: f64,
    limits: Option<GuardLimits>,
    verdict: &Verdict,
) -> Value {
    let (action, reason, to_step) = match verdict {
        Verdict::Apply => ("apply", String::new(), None),
        Verdict::Skip { reason } => ("skip", reason.clone(), None),
        Verdict::Rollback { to_step, reason } => ("rollback", reason.clone(), Some(*to_step)),
    };
    json!({
        "step": step,
        "cursor": cursor,
        "loss": loss,
        "grad_norm": grad_norm,
        "max_loss": limits.map(|l| l.max_loss),
        "max_grad_norm": limits.map(|l| l.max_grad_norm),
        "action": action,
        "rollback_to_step": to_step,
        "reason": reason,
        "samples": samples(prep, cursor),
    })
}

/// Where each sample of the global batch starting at `cursor` comes from: for a streamed
/// dataset its source, shard file, window and token offset in the shard; in memory the
/// corpus, the window and the token offset in the training split.
pub(crate) fn samples(prep: &Prepared, cursor: u64) -> Vec<Value> {
    let bs = prep.stored_cfg.model.block_size as u64;
    let batch = prep.cfg.batch_size;
    match &prep.stream {
        Some(stream) => (cursor..cursor + batch)
            .map(|s| {
                let (source, shard, window) = stream.locate(s);
                json!({"sample": s, "source": source, "shard": shard, "window": window, "token_offset": window * bs})
            })
            .collect(),
        None => {
            let windows = tenax_data::num_windows(prep.data.train.len(), bs as usize) as u64;
            let mut sampler = Sampler::new(prep.cfg.seed, windows.max(1));
            let source = match prep.cfg.data.as_slice() {
                [] => "built-in corpus".to_string(),
                paths => paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            (cursor..cursor + batch)
                .map(|s| {
                    let w = sampler.window(s);
                    json!({"sample": s, "source": source, "shard": "train", "window": w, "token_offset": w * bs})
                })
                .collect()
        }
    }
}

/// One flagged line as the run's log shows it.
pub(crate) fn say(line: &Value) -> String {
    let samples = line["samples"].as_array().map_or(0, Vec::len);
    let first = line["samples"]
        .get(0)
        .map(|s| {
            format!(
                "{} {} window {}",
                s["source"].as_str().unwrap_or("?"),
                s["shard"].as_str().unwrap_or("?"),
                s["window"]
            )
        })
        .unwrap_or_default();
    format!(
        "guard: {} ({samples} samples from sample {}, first: {first}; all in {FLAGGED_FILE})",
        line["reason"].as_str().unwrap_or(""),
        line["cursor"],
    )
}

//! The node's logs in its run directory: `metrics.jsonl` (one line per step, appended
//! across restarts: the chaos harness reads it as the node's step log), `events.jsonl`
//! (how the node's state was set other than by a step), and the loss plot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::plot::LossPoint;

/// One step's line.
pub(super) struct StepLine<'a> {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub generation: u64,
    pub world: u32,
    pub param_hash: &'a str,
    /// The cursor of the step's first sample.
    pub cursor: u64,
    /// The slots this member computed.
    pub slots: Vec<u64>,
    pub val_loss: Option<f64>,
}

/// The open logs and the loss history for the plot.
pub(super) struct StepLog {
    dir: PathBuf,
    metrics: std::fs::File,
    events: std::fs::File,
    history: Vec<LossPoint>,
}

fn append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot open for appending: pick a writable --run-dir",
                path.display()
            )
        })
}

impl StepLog {
    /// Open the logs in `dir`, keeping the history already there (a step redone after a
    /// whole-job restart appears again; the plot keeps the last).
    pub fn open(dir: &Path) -> Result<Self> {
        let metrics_path = dir.join("metrics.jsonl");
        let mut by_step = BTreeMap::new();
        for p in crate::train::load_history(&metrics_path, u64::MAX)? {
            by_step.insert(p.step, p);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics: append(&metrics_path)?,
            events: append(&dir.join("events.jsonl"))?,
            history: by_step.into_values().collect(),
        })
    }

    /// Append a step's line.
    pub fn step(&mut self, l: StepLine<'_>) {
        let mut line = json!({"step": l.step, "loss": l.loss, "lr": l.lr, "tokens_per_s": l.tokens_per_s,
            "grad_norm": l.grad_norm, "skipped": l.skipped, "generation": l.generation,
            "world": l.world, "param_hash": l.param_hash, "cursor": l.cursor, "slots": l.slots,
            "t_ms": tenax_storage::now_unix_ms()});
        if let Some(v) = l.val_loss {
            line["val_loss"] = json!(v);
        }
        // One write of the whole line: a reader of the live file never sees half a line
        // followed by another line.
        if let Err(e) = self.metrics.write_all(format!("{line}\n").as_bytes()) {
            eprintln!("warning: metrics.jsonl: cannot append: {e}");
        }
        self.history.push(LossPoint {
            step: l.step,
            loss: l.loss,
            val_loss: l.val_loss,
        });
    }

    /// Append how the node's state was set other than by a step: `init`, `checkpoint`,
    /// `copy`, `none`. A step log that goes backwards must be explained by one.
    pub fn state(&mut self, how: &str, step: u64, generation: Option<u64>) {
        let line = json!({"event": "state", "how": how, "step": step, "generation": generation,
            "t_ms": tenax_storage::now_unix_ms()});
        if let Err(e) = self.events.write_all(format!("{line}\n").as_bytes()) {
            eprintln!("warning: events.jsonl: cannot append: {e}");
        }
    }

    /// Plot the loss curve to `loss.png`.
    pub fn plot(&self, title: &str) {
        let png = self.dir.join("loss.png");
        if let Err(e) = crate::plot::plot_loss(&png, title, &self.history) {
            eprintln!("warning: {e}");
        }
    }
}

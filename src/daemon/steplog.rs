//! The node's logs in its run directory: `metrics.jsonl` (one line per step, appended
//! across restarts: the chaos harness reads it as the node's step log), `events.jsonl`
//! (how the node's state was set other than by a step), and the loss plot.
//!
//! A step's parameter hash is taken on a blocking thread while the next step runs; its
//! line waits in [`StepLog`] until the hash is in, and lines are written in step order.
//! Writes go through `block_in_place`, off the async workers.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::plot::{LossCurve, LossPoint};

/// One step's line.
pub(super) struct StepLine {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    /// The training guard flagged the step and its update was skipped (the line says so
    /// only then, as `tenax train`'s).
    pub guarded: bool,
    pub generation: u64,
    pub world: u32,
    /// Filled in when the hash is in (see [`StepLog::hashed`]).
    pub param_hash: String,
    /// The cursor of the step's first sample.
    pub cursor: u64,
    /// The slots this member computed.
    pub slots: Vec<u64>,
    /// With stages on different members: the pipeline stage this member computed the
    /// slots as.
    pub stage: Option<u32>,
    pub val_loss: Option<f64>,
}

impl StepLine {
    /// The progress line of `node` for this step, printed about 20 times in a run of
    /// `steps` steps (and at its last step); `None` between.
    pub fn progress(&self, node: &str, steps: u64) -> Option<String> {
        let step = self.step;
        (step.is_multiple_of((steps / 20).max(1)) || step == steps).then(|| {
            let val = self.val_loss.map(|v| format!(", val loss {v:.4}"));
            format!(
                "node {node}: step {step}/{steps}: loss {:.4}{}, {:.0} tokens/s, generation {}",
                self.loss,
                val.unwrap_or_default(),
                self.tokens_per_s,
                self.generation
            )
        })
    }
}

/// The open logs and the loss history for the plot.
pub(super) struct StepLog {
    dir: PathBuf,
    metrics: std::fs::File,
    events: std::fs::File,
    /// The loss curve for the plot, bounded however long the daemon lives.
    history: LossCurve,
    /// Lines waiting for their step's hash, in step order.
    waiting: VecDeque<StepLine>,
    /// The hashes of the last few steps.
    hashes: BTreeMap<u64, String>,
}

/// Hashes kept for lines and comparisons that may still ask for them.
const HASHES_KEPT: usize = 8;

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

/// The loss curve of an existing `metrics.jsonl`, read a line at a time (a months-long
/// run's file is large; the curve is bounded). Lines that do not parse are skipped.
fn read_curve(path: &Path) -> Result<LossCurve> {
    let mut curve = LossCurve::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(curve),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    for line in std::io::BufReader::new(file).lines() {
        let line = line.with_context(|| format!("{}: cannot read", path.display()))?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(step) = v["step"].as_u64() {
            curve.push(LossPoint {
                step,
                loss: v["loss"].as_f64().unwrap_or(f64::NAN),
                val_loss: v["val_loss"].as_f64(),
            });
        }
    }
    Ok(curve)
}

impl StepLog {
    /// Open the logs in `dir`, keeping the history already there (a step redone after a
    /// whole-job restart appears again; the plot keeps the last).
    pub fn open(dir: &Path) -> Result<Self> {
        let metrics_path = dir.join("metrics.jsonl");
        Ok(Self {
            dir: dir.to_path_buf(),
            history: read_curve(&metrics_path)?,
            metrics: append(&metrics_path)?,
            events: append(&dir.join("events.jsonl"))?,
            waiting: VecDeque::new(),
            hashes: BTreeMap::new(),
        })
    }

    /// A step's line: written now if its hash is in, else once it is.
    pub fn step(&mut self, l: StepLine) {
        self.waiting.push_back(l);
        self.flush();
    }

    /// The parameter hash after `step` is in.
    pub fn hashed(&mut self, step: u64, hash: String) {
        self.hashes.insert(step, hash);
        self.flush();
        // Hashes finish out of order (each on its own blocking thread): one for a line
        // still waiting is kept however late it came, or that line and every later one
        // would wait forever. Bounded all the same: a waiting line needs one hash.
        let needed = self.waiting.front().map_or(u64::MAX, |l| l.step);
        while self.hashes.len() > HASHES_KEPT
            && self
                .hashes
                .first_key_value()
                .is_some_and(|(&s, _)| s < needed)
        {
            self.hashes.pop_first();
        }
    }

    /// The parameter hash after `step`, if it is in.
    pub fn hash_of(&self, step: u64) -> Option<&String> {
        self.hashes.get(&step)
    }

    /// Write the waiting lines whose hashes are in, in order.
    fn flush(&mut self) {
        while let Some(hash) = self
            .waiting
            .front()
            .and_then(|l| self.hashes.get(&l.step).cloned())
        {
            let mut l = self.waiting.pop_front().expect("a front line");
            l.param_hash = hash;
            tokio::task::block_in_place(|| self.write_step(l));
        }
    }

    /// Append a step's line.
    fn write_step(&mut self, l: StepLine) {
        let mut line = json!({"step": l.step, "loss": l.loss, "lr": l.lr, "tokens_per_s": l.tokens_per_s,
            "grad_norm": l.grad_norm, "skipped": l.skipped, "generation": l.generation,
            "world": l.world, "param_hash": l.param_hash, "cursor": l.cursor, "slots": l.slots,
            "t_ms": tenax_storage::now_unix_ms()});
        if l.guarded {
            line["guarded"] = json!(true);
        }
        if let Some(v) = l.val_loss {
            line["val_loss"] = json!(v);
        }
        if let Some(s) = l.stage {
            line["stage"] = json!(s);
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
        let wrote =
            tokio::task::block_in_place(|| self.events.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = wrote {
            eprintln!("warning: events.jsonl: cannot append: {e}");
        }
    }

    /// Plot the loss curve to `loss.png`.
    pub fn plot(&self, title: &str) {
        let png = self.dir.join("loss.png");
        if let Err(e) = crate::plot::plot_loss(&png, title, &self.history.points()) {
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, val_loss: Option<f64>) -> StepLine {
        StepLine {
            step,
            loss: 2.5,
            lr: 1e-3,
            tokens_per_s: 1234.4,
            grad_norm: 1.0,
            skipped: false,
            guarded: false,
            generation: 3,
            world: 2,
            param_hash: String::new(),
            cursor: 0,
            slots: vec![0],
            stage: None,
            val_loss,
        }
    }

    /// About 20 progress lines a run, and always the last step's.
    #[test]
    fn progress_lines_come_every_twentieth_of_the_run_and_at_its_end() {
        let cases: &[(u64, u64, Option<f64>, Option<&str>)] = &[
            (
                10,
                200,
                None,
                Some("node n: step 10/200: loss 2.5000, 1234 tokens/s, generation 3"),
            ),
            (11, 200, None, None),
            (
                7,
                7,
                Some(2.25),
                Some("node n: step 7/7: loss 2.5000, val loss 2.2500, 1234 tokens/s, generation 3"),
            ),
            (
                5,
                10,
                None,
                Some("node n: step 5/10: loss 2.5000, 1234 tokens/s, generation 3"),
            ),
        ];
        for &(step, steps, val, want) in cases {
            let got = line(step, val).progress("n", steps);
            assert_eq!(got.as_deref(), want, "step {step}/{steps}");
        }
    }

    /// A hash that finishes after more than [`HASHES_KEPT`] later ones (a starved
    /// blocking thread) still gets its line written, and the lines after it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_late_hash_does_not_hold_back_the_step_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = StepLog::open(dir.path()).unwrap();
        let n = HASHES_KEPT as u64 + 5;
        for step in 1..=n {
            log.step(line(step, None));
        }
        for step in 2..=n {
            log.hashed(step, format!("h{step}"));
        }
        assert_eq!(log.waiting.len() as u64, n, "step 1's hash is not in yet");
        log.hashed(1, "h1".into());
        assert!(
            log.waiting.is_empty(),
            "{} lines still wait",
            log.waiting.len()
        );
        assert!(log.hashes.len() <= HASHES_KEPT);
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, (1..=n).collect::<Vec<_>>());
    }
}

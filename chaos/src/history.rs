//! The recorded history of a chaos run: what every daemon did (its step log and state
//! events), what etcd accepted (every plan and checkpoint record, in revision order), what
//! the harness injected, and the checks made after the run. The invariant checker
//! ([`crate::invariants`]) and the report ([`crate::report`]) read only this, so that a
//! history can be written by hand (tests plant violations) or saved and checked again.
//!
//! Sources, per node `i` (run directory `node-i/`):
//! - `metrics.jsonl`: one line per step the node applied: `step`, `generation`, `cursor`
//!   (the first sample of the step), `slots` (the batch slots this node computed),
//!   `stage` (with a pipeline's stages on different nodes: the stage it computed them as),
//!   `param_hash` (after the step), `t_ms`, `loss`.
//! - `events.jsonl`: one line each time the node's state was set other than by a step:
//!   `{"event":"state","how":"init"|"checkpoint"|"copy"|"none","step":N,...}`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One step a node applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Node index.
    pub node: usize,
    /// The step number after it was applied.
    pub step: u64,
    /// The generation it was applied in.
    pub generation: u64,
    /// The first sample of the step's batch.
    pub cursor: u64,
    /// The batch slots this node computed.
    pub slots: Vec<u64>,
    /// With a pipeline's stages on different nodes: the stage it computed them as (each
    /// slot is then computed once per stage).
    #[serde(default)]
    pub stage: Option<u32>,
    /// The parameters' hash after the step.
    pub param_hash: String,
    /// Unix milliseconds when it was logged.
    pub t_ms: u64,
    /// Training loss.
    pub loss: f64,
}

/// A node's state set other than by a step (loaded, copied, fresh, none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Node index.
    pub node: usize,
    /// `init`, `checkpoint`, `copy`, `none`.
    pub how: String,
    /// The step the state holds.
    pub step: u64,
    /// Unix milliseconds.
    pub t_ms: u64,
}

/// One plan etcd accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// The etcd revision of the write.
    pub revision: i64,
    /// The generation.
    pub generation: u64,
    /// Member ids (`node-i`).
    pub members: Vec<String>,
}

/// One checkpoint record etcd accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitEntry {
    /// The etcd revision of the write.
    pub revision: i64,
    /// The step the checkpoint holds.
    pub step: u64,
    /// The generation that committed it.
    pub generation: u64,
    /// Where it is.
    pub url: String,
    /// Whether `verify` passed (`None`: not verified).
    pub verified: Option<bool>,
    /// Why verification failed.
    #[serde(default)]
    pub verify_error: String,
}

/// One fault the harness injected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    /// Its index in the schedule.
    pub index: usize,
    /// Its kind's name (`kill`, `hang`, ...).
    pub kind: String,
    /// The daemon it hit, if one.
    pub node: Option<usize>,
    /// A group fault: the daemons it hit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<usize>,
    /// Unix milliseconds when it started.
    pub start_ms: u64,
    /// Unix milliseconds when it ended (the node restarted or resumed, the proxy healed).
    pub end_ms: u64,
    /// What was done, in words.
    pub detail: String,
}

/// The comparison of the final parameters with a fault-free run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalComparison {
    /// Whether the bytes are identical.
    pub identical: bool,
    /// What was compared.
    pub detail: String,
}

/// Everything recorded about one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Daemons in the cluster.
    pub nodes: usize,
    /// The target step.
    pub target_step: u64,
    /// Samples per step (a step's cursor is `(step - 1) * batch_size`).
    pub batch_size: u64,
    /// Batch slots per step.
    pub slots: u64,
    /// Every step every node logged, per node in log order.
    pub steps: Vec<StepRecord>,
    /// Every state event, per node in log order.
    pub states: Vec<StateRecord>,
    /// Plans in etcd revision order.
    pub plans: Vec<PlanEntry>,
    /// Checkpoint records in etcd revision order.
    pub commits: Vec<CommitEntry>,
    /// Faults injected, in order.
    pub faults: Vec<InjectedFault>,
    /// The faulted run's place among all runs (reference runs before it have a lower
    /// `order`).
    #[serde(default)]
    pub faulted_run_order: usize,
    /// The final parameters against a fault-free run (`None`: not compared).
    pub final_params: Option<FinalComparison>,
    /// Unix milliseconds when the harness started the daemons.
    pub started_ms: u64,
    /// Unix milliseconds when the last daemon exited.
    pub ended_ms: u64,
    /// Fault-free runs of the same scenario (same cluster, no faults), interleaved with
    /// this one (`tenax chaos run --reference-runs N`).
    #[serde(default)]
    pub reference_runs: Vec<ReferenceRun>,
    /// Every daemon's RSS and open fds, sampled over the faulted run
    /// ([`crate::resources`]).
    #[serde(default)]
    pub resources: Vec<crate::resources::ResourceSample>,
    /// Whether the run was sized by time (`run.stop_after_s`): the harness stopped the
    /// job and `target_step` is the newest committed checkpoint's step.
    #[serde(default)]
    pub stopped_by_time: bool,
}

/// One fault-free run of the scenario, for the reference goodput.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRun {
    /// Its place among all runs (0 first); the faulted run's place is
    /// [`History::faulted_run_order`]'s.
    pub order: usize,
    /// Seconds from its first step to its last (plus one step), like the faulted run's.
    pub wall_s: f64,
    /// Steps its lineage applied in that time (0 in reports written before it was
    /// recorded: read as the faulted run's count, i.e. a ratio of wall times).
    #[serde(default)]
    pub steps: u64,
    /// Whether it ran to its end: the target step, or for a run sized by time, its
    /// time with steps applied and no harness error.
    pub finished: bool,
    /// Its daemons' RSS and open fds, one segment per process life: the growth of a
    /// run without faults, next to the faulted run's.
    #[serde(default)]
    pub resources: Vec<crate::resources::ResourceSegment>,
}

/// Reads node `node`'s step log and state events from its run directory (missing files
/// read as empty; lines that do not parse are skipped: a daemon killed mid-write leaves
/// at most a torn last line).
pub fn read_node_logs(node: usize, run_dir: &Path) -> (Vec<StepRecord>, Vec<StateRecord>) {
    let lines = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run_dir.join(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let steps = lines("metrics.jsonl")
        .into_iter()
        .filter_map(|m| {
            Some(StepRecord {
                node,
                step: m["step"].as_u64()?,
                generation: m["generation"].as_u64()?,
                cursor: m["cursor"].as_u64()?,
                slots: m["slots"]
                    .as_array()?
                    .iter()
                    .filter_map(|s| s.as_u64())
                    .collect(),
                stage: m["stage"].as_u64().map(|s| s as u32),
                param_hash: m["param_hash"].as_str().unwrap_or_default().to_string(),
                t_ms: m["t_ms"].as_u64()?,
                loss: m["loss"].as_f64().unwrap_or(f64::NAN),
            })
        })
        .collect();
    let states = lines("events.jsonl")
        .into_iter()
        .filter(|m| m["event"] == "state")
        .filter_map(|m| {
            Some(StateRecord {
                node,
                how: m["how"].as_str()?.to_string(),
                step: m["step"].as_u64()?,
                t_ms: m["t_ms"].as_u64()?,
            })
        })
        .collect();
    (steps, states)
}

impl History {
    /// The first generation number newer than `generation` that any node logged a step
    /// in, with the time of its first step.
    pub fn first_step_after(&self, generation: u64, since_ms: u64) -> Option<&StepRecord> {
        self.steps
            .iter()
            .filter(|s| s.generation > generation && s.t_ms >= since_ms)
            .min_by_key(|s| s.t_ms)
    }

    /// The newest generation a step was logged in at or before `t_ms`.
    pub fn generation_at(&self, t_ms: u64) -> u64 {
        self.steps
            .iter()
            .filter(|s| s.t_ms <= t_ms)
            .map(|s| s.generation)
            .max()
            .unwrap_or(0)
    }

    /// When generation `g` was first seen: its first logged step.
    pub fn generation_seen_ms(&self, g: u64) -> Option<u64> {
        self.steps
            .iter()
            .filter(|s| s.generation == g)
            .map(|s| s.t_ms)
            .min()
    }
}

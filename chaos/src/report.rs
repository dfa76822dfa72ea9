//! The report of a chaos run: `report.json` (seed, faults injected per kind, a verdict
//! per invariant with its evidence, recovery times, steps lost, goodput) and `report.md`,
//! computed from the [`History`] alone.
//!
//! - Recovery of a fault that takes a member out (kill, hang, partition, kill in an
//!   upload): from the injection to the first step any node logs in a newer generation.
//! - Steps lost: steps the old generation applied past the step the new one restarted
//!   from (work redone).
//! - Goodput: committed steps x the fault-free median step time / the wall time from the
//!   first step's start to the last. The fault-free median step time is measured in the
//!   same run (a separate fault-free cluster on a shared machine would not see the same
//!   load): the median, over windows of up to 20 consecutive steps of one generation that
//!   no fault overlaps, of the window's mean step interval (see
//!   [`fault_free_median_step_s`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::History;
use crate::invariants::Verdict;

/// One fault's recovery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// The fault's index in the schedule.
    pub fault: usize,
    /// Its kind.
    pub kind: String,
    /// Seconds from the injection to the first step of a newer generation (`None`: none
    /// followed).
    pub recovery_s: Option<f64>,
    /// Steps the old generation applied and the new one redid.
    pub steps_lost: u64,
}

/// `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The seed (replays the same schedule).
    pub seed: u64,
    /// Whether every invariant held.
    pub passed: bool,
    /// Daemons.
    pub nodes: usize,
    /// The target step.
    pub target_step: u64,
    /// Faults injected, per kind.
    pub faults_injected: BTreeMap<String, usize>,
    /// Invariant name -> verdict and evidence.
    pub invariants: BTreeMap<String, Verdict>,
    /// Median recovery over the faults that took a member out.
    pub recovery_s_p50: Option<f64>,
    /// 99th percentile (nearest rank).
    pub recovery_s_p99: Option<f64>,
    /// Steps lost over all faults.
    pub steps_lost: u64,
    /// Committed steps x fault-free median step time / wall time.
    pub goodput: Option<f64>,
    /// The fault-free median step time used for goodput.
    pub median_step_s: Option<f64>,
    /// Seconds from the first step's start to the last step.
    pub wall_s: f64,
    /// Steps committed (the newest committed checkpoint's step).
    pub committed_steps: u64,
    /// Per fault.
    pub recoveries: Vec<Recovery>,
    /// Problems of the run itself (a fault that could not be injected, a timeout).
    pub harness_errors: Vec<String>,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// Each step's first log time on any node of its surviving lineage.
fn lineage_times(h: &History) -> BTreeMap<u64, (u64, u64)> {
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &h.steps {
        let g = newest.entry(s.step).or_insert(0);
        *g = (*g).max(s.generation);
    }
    let mut out: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for s in &h.steps {
        if newest.get(&s.step) == Some(&s.generation) {
            let e = out.entry(s.step).or_insert((s.generation, s.t_ms));
            e.1 = e.1.min(s.t_ms);
        }
    }
    out
}

/// Per-fault recoveries.
pub fn recoveries(h: &History) -> Vec<Recovery> {
    h.faults
        .iter()
        .filter(|f| {
            matches!(
                f.kind.as_str(),
                "kill" | "hang" | "partition" | "kill_in_upload"
            )
        })
        .map(|f| {
            let g = h.generation_at(f.start_ms);
            let first = h.first_step_after(g, f.start_ms);
            let done_old = h
                .steps
                .iter()
                .filter(|s| s.generation <= g)
                .map(|s| s.step)
                .max()
                .unwrap_or(0);
            Recovery {
                fault: f.index,
                kind: f.kind.clone(),
                recovery_s: first.map(|s| s.t_ms.saturating_sub(f.start_ms) as f64 / 1000.0),
                steps_lost: first
                    .map(|s| done_old.saturating_sub(s.step.saturating_sub(1)))
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// The fault-free median step time, in seconds: the intervals between consecutive steps
/// of one generation that no fault overlaps, in runs; each run cut into windows of `w`
/// intervals (`w` = a fiftieth of those intervals, 1 to 20); the median of the windows'
/// means. Step times are logged in whole milliseconds, so the median of single intervals
/// would be off by up to half a millisecond, more than a kill costs a 20 ms step;
/// averaging over a window first keeps the sub-millisecond part.
pub fn fault_free_median_step_s(h: &History) -> Option<f64> {
    let times = lineage_times(h);
    let mut runs: Vec<Vec<f64>> = vec![Vec::new()];
    for ((s0, (g0, t0)), (s1, (g1, t1))) in times.iter().zip(times.iter().skip(1)) {
        let healthy = *s1 == *s0 + 1
            && g0 == g1
            && !h
                .faults
                .iter()
                .any(|f| f.start_ms <= *t1 && f.end_ms >= *t0);
        if healthy {
            if let Some(run) = runs.last_mut() {
                run.push(t1.saturating_sub(*t0) as f64 / 1000.0);
            }
        } else if runs.last().is_some_and(|r| !r.is_empty()) {
            runs.push(Vec::new());
        }
    }
    let gaps: usize = runs.iter().map(Vec::len).sum();
    let w = (gaps / 50).clamp(1, 20);
    let mut means: Vec<f64> = runs
        .iter()
        .flat_map(|run| run.chunks_exact(w))
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    if means.is_empty() {
        means = runs.into_iter().flatten().collect();
    }
    means.sort_by(f64::total_cmp);
    percentile(&means, 50.0)
}

/// Builds the report.
pub fn build(
    scenario: &str,
    seed: u64,
    h: &History,
    invariants: BTreeMap<String, Verdict>,
    harness_errors: Vec<String>,
) -> Report {
    let mut faults_injected = BTreeMap::new();
    for f in &h.faults {
        *faults_injected.entry(f.kind.clone()).or_insert(0) += 1;
    }
    let recoveries = recoveries(h);
    let mut rec: Vec<f64> = recoveries.iter().filter_map(|r| r.recovery_s).collect();
    rec.sort_by(f64::total_cmp);
    let median_step_s = fault_free_median_step_s(h);
    let times = lineage_times(h);
    let committed_steps = h.commits.iter().map(|c| c.step).max().unwrap_or(0);
    let wall_s = match (times.values().next(), times.values().next_back()) {
        (Some((_, t0)), Some((_, t1))) => {
            t1.saturating_sub(*t0) as f64 / 1000.0 + median_step_s.unwrap_or(0.0)
        }
        _ => 0.0,
    };
    // Not capped at 1: a figure a little above it says how noisy the estimate is.
    let goodput = median_step_s
        .filter(|_| wall_s > 0.0)
        .map(|m| committed_steps as f64 * m / wall_s);
    let passed = harness_errors.is_empty() && invariants.values().all(Verdict::is_held);
    Report {
        scenario: scenario.to_string(),
        seed,
        passed,
        nodes: h.nodes,
        target_step: h.target_step,
        faults_injected,
        invariants,
        recovery_s_p50: percentile(&rec, 50.0),
        recovery_s_p99: percentile(&rec, 99.0),
        steps_lost: recoveries.iter().map(|r| r.steps_lost).sum(),
        goodput,
        median_step_s,
        wall_s,
        committed_steps,
        recoveries,
        harness_errors,
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// `report.md`: the verdicts, the figures and the faults, for people.
    pub fn markdown(&self, h: &History) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# Chaos run: {} (seed {})\n\n**{}**: {} nodes, target step {}, {} faults injected.\n\n",
            self.scenario,
            self.seed,
            if self.passed {
                "PASSED, every invariant held"
            } else {
                "FAILED"
            },
            self.nodes,
            self.target_step,
            h.faults.len()
        ));
        s.push_str("## Invariants\n\n| invariant | verdict | evidence |\n|---|---|---|\n");
        for (name, v) in &self.invariants {
            s.push_str(&format!(
                "| {name} | {} | {} |\n",
                v.verdict,
                v.evidence.replace('|', "\\|")
            ));
        }
        s.push_str(&format!(
            "\n## Figures\n\n| figure | value |\n|---|---|\n\
             | recovery p50 | {} s |\n| recovery p99 | {} s |\n| steps lost | {} |\n\
             | goodput | {} |\n| fault-free median step | {} s |\n| wall time | {:.1} s |\n\
             | committed steps | {} |\n",
            opt(self.recovery_s_p50, 3),
            opt(self.recovery_s_p99, 3),
            self.steps_lost,
            self.goodput
                .map(|g| format!("{:.1}%", g * 100.0))
                .unwrap_or_else(|| "-".into()),
            opt(self.median_step_s, 4),
            self.wall_s,
            self.committed_steps
        ));
        s.push_str("\n## Faults\n\n| # | kind | node | at (s) | lasted (s) | recovery (s) | steps lost | what |\n|---|---|---|---|---|---|---|---|\n");
        let t0 = h.steps.iter().map(|x| x.t_ms).min().unwrap_or(h.started_ms);
        for f in &h.faults {
            let r = self.recoveries.iter().find(|r| r.fault == f.index);
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} |\n",
                f.index,
                f.kind,
                f.node
                    .map(|n| format!("node-{n}"))
                    .unwrap_or_else(|| "-".into()),
                (f.start_ms as f64 - t0 as f64) / 1000.0,
                f.end_ms.saturating_sub(f.start_ms) as f64 / 1000.0,
                opt(r.and_then(|r| r.recovery_s), 3),
                r.map(|r| r.steps_lost.to_string())
                    .unwrap_or_else(|| "-".into()),
                f.detail.replace('|', "\\|")
            ));
        }
        if !self.harness_errors.is_empty() {
            s.push_str("\n## Harness errors\n\n");
            for e in &self.harness_errors {
                s.push_str(&format!("- {e}\n"));
            }
        }
        s.push_str("\nSee timeline.png (loss over time, faults and generation changes marked) and history.json (everything recorded).\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{InjectedFault, StepRecord};

    fn step(node: usize, step: u64, generation: u64, t_ms: u64) -> StepRecord {
        StepRecord {
            node,
            step,
            generation,
            cursor: 0,
            slots: vec![],
            param_hash: String::new(),
            t_ms,
            loss: 1.0,
        }
    }

    #[test]
    fn the_fault_free_step_time_keeps_sub_millisecond_precision() {
        // Steps alternate 20 and 21 ms apart (a 20.5 ms step logged in whole ms): the
        // median of single intervals says 20 or 21, windows say 20.5.
        let mut h = History::default();
        let mut t = 1000;
        for s in 1..=2001 {
            h.steps.push(step(0, s, 1, t));
            t += if s % 2 == 0 { 20 } else { 21 };
        }
        let m = fault_free_median_step_s(&h).unwrap();
        assert!((m - 0.0205).abs() < 1e-9, "{m}");
    }

    #[test]
    fn recovery_steps_lost_and_goodput_come_from_the_history() {
        // Steps every 100 ms; a kill at 1050 ms; generation 2's first step at 1500 ms
        // redoes step 10 (applied by generation 1 at 1000 ms).
        let mut h = History {
            nodes: 2,
            target_step: 15,
            ..History::default()
        };
        for s in 1..=10 {
            h.steps.push(step(0, s, 1, s * 100));
        }
        for s in 10..=15 {
            h.steps.push(step(0, s, 2, 1500 + (s - 10) * 100));
        }
        h.faults.push(InjectedFault {
            index: 0,
            kind: "kill".into(),
            node: Some(1),
            start_ms: 1050,
            end_ms: 1400,
            detail: String::new(),
        });
        h.commits.push(crate::history::CommitEntry {
            revision: 5,
            step: 15,
            generation: 2,
            url: String::new(),
            verified: Some(true),
            verify_error: String::new(),
        });
        let r = build("t", 1, &h, BTreeMap::new(), vec![]);
        assert_eq!(r.recoveries.len(), 1);
        assert!((r.recoveries[0].recovery_s.unwrap() - 0.45).abs() < 1e-9);
        assert_eq!(r.steps_lost, 1);
        assert!((r.median_step_s.unwrap() - 0.1).abs() < 1e-9);
        // Wall: steps 1..15 of the lineage span 100 ms .. 2000 ms, plus one step.
        assert!((r.wall_s - 2.0).abs() < 1e-9, "{}", r.wall_s);
        assert!((r.goodput.unwrap() - 0.75).abs() < 1e-9);
        assert_eq!(r.faults_injected["kill"], 1);
        assert!(r.passed);
        assert!(r.markdown(&h).contains("| 0 | kill | node-1 |"));
    }
}

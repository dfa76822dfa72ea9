//! The report of a chaos run: `report.json` (seed, faults injected per kind, a verdict
//! per invariant with its evidence, recovery times, steps lost, goodput) and `report.md`,
//! computed from the [`History`] alone.
//!
//! - Recovery of a fault that takes a member out (kill, hang, partition, kill in an
//!   upload): from the injection to the first step any node logs in a newer generation.
//! - Steps lost: steps the old generation applied past the step the new one restarted
//!   from (work redone).
//! - Goodput (primary, [`lost_time`]): lost-time accounting from the run's own timeline,
//!   `1 - lost / wall`, so it cannot exceed 1. The timeline is the time each step was
//!   first applied by a generation; its normal step time is the median of windowed mean
//!   intervals; lost is time with no step applied (stalls), the excess of slow spells, and
//!   steps applied and then redone by a newer generation.
//! - Goodput against reference runs (secondary, [`reference_goodput`]): the faulted run's
//!   throughput (steps of its surviving lineage per second of its wall time) over that of
//!   fault-free runs of the same scenario, interleaved with the faulted one; for runs
//!   sized in steps that is the reference wall time over the faulted one. Unclamped, with
//!   min/median/max over the reference runs. A ratio above 1 can be real on a shared
//!   machine: a killed daemon frees cores for the others.
//! - Fault overlaps: for each fault, the others whose injected `[start, end]` overlaps
//!   its own ([`crate::schedule::overlaps`]).

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
    /// `1 - lost / wall` from the run's own timeline ([`lost_time`]), in [0, 1].
    pub goodput: Option<f64>,
    /// Where the time went ([`lost_time`]).
    pub lost_time: Option<LostTime>,
    /// Reference runs' wall time / this run's ([`reference_goodput`]), unclamped.
    pub reference_goodput: Option<ReferenceGoodput>,
    /// The fault-free median step time (windows of one generation that no fault overlaps).
    pub median_step_s: Option<f64>,
    /// Seconds from the first step's start to the last step.
    pub wall_s: f64,
    /// Steps committed (the newest committed checkpoint's step).
    pub committed_steps: u64,
    /// Per fault.
    pub recoveries: Vec<Recovery>,
    /// Problems of the run itself (a fault that could not be injected, a timeout).
    pub harness_errors: Vec<String>,
    /// The daemons' RSS and open fds, one segment per process life, with slopes per
    /// hour ([`crate::resources::segments`]).
    #[serde(default)]
    pub resources: Vec<crate::resources::ResourceSegment>,
}

/// Where a run's time went, from its own timeline ([`lost_time`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LostTime {
    /// From the first applied step's start (one normal step before it is logged) to the
    /// last applied step.
    pub wall_s: f64,
    /// The normal step time: the median of the mean interval of windows of consecutive
    /// applied steps.
    pub step_s: f64,
    /// Time with no step applied by the group: intervals over [`STALL_FACTOR`] normal
    /// steps, less one normal step each.
    pub stall_s: f64,
    /// Slow spells: windows whose mean interval exceeds [`SLOW_FACTOR`] normal steps, by
    /// their excess over normal steps.
    pub slow_s: f64,
    /// Steps applied and then applied again by a newer generation: their normal time.
    pub redone_s: f64,
    /// How many such steps.
    pub redone_steps: u64,
    /// `1 - (stall + slow + redone) / wall`, in [0, 1].
    pub goodput: f64,
}

/// An interval longer than this many normal steps is a stall (no step applied).
pub const STALL_FACTOR: f64 = 10.0;

/// A window whose mean interval exceeds this many normal steps is a slow spell (below
/// it: the machine's ordinary noise, not counted).
pub const SLOW_FACTOR: f64 = 1.25;

/// One step applied by a generation, for [`account`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// When it was first logged, in milliseconds.
    pub t_ms: u64,
    /// Whether a newer generation applied the same step again.
    pub redone: bool,
}

/// The applied-step timeline of a history: each (generation, step) at the first time any
/// node logged it, in time order.
pub fn applied_timeline(h: &History) -> Vec<Applied> {
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    let mut first: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for s in &h.steps {
        let g = newest.entry(s.step).or_insert(0);
        *g = (*g).max(s.generation);
        let t = first.entry((s.generation, s.step)).or_insert(s.t_ms);
        *t = (*t).min(s.t_ms);
    }
    let mut out: Vec<Applied> = first
        .into_iter()
        .map(|((g, step), t_ms)| Applied {
            t_ms,
            redone: newest.get(&step).is_some_and(|&n| n > g),
        })
        .collect();
    out.sort_by_key(|a| a.t_ms);
    out
}

/// Lost-time accounting over an applied-step timeline (sorted by time); `None` with
/// fewer than two steps. Pure; the result's parts are >= 0 and add up to at most the
/// wall time, so goodput is in [0, 1].
///
/// Each interval between consecutive applied steps belongs to the step at its end. An
/// interval over [`STALL_FACTOR`] normal steps loses all but one normal step (stall);
/// the others, in windows of up to 20, lose their excess when the window is slower than
/// [`SLOW_FACTOR`] normal steps (slow); a redone step loses its normal part too.
pub fn account(timeline: &[Applied]) -> Option<LostTime> {
    if timeline.len() < 2 {
        return None;
    }
    let iv: Vec<f64> = timeline
        .windows(2)
        .map(|w| w[1].t_ms.saturating_sub(w[0].t_ms) as f64 / 1000.0)
        .collect();
    // Whole-millisecond stamps: a window's mean keeps the sub-millisecond part.
    let w = (iv.len() / 50).clamp(1, 20);
    let mut means: Vec<f64> = iv
        .chunks(w)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let step_s = percentile(&means, 50.0).unwrap_or(0.0);
    let stall_at = STALL_FACTOR * step_s;
    let (mut stall_s, mut slow_s, mut redone_s) = (0.0, 0.0, 0.0);
    let mut redone_steps = 0;
    if timeline[0].redone {
        redone_s += step_s;
        redone_steps += 1;
    }
    let mut window: Vec<f64> = Vec::with_capacity(w);
    let close = |window: &mut Vec<f64>, slow_s: &mut f64| {
        let sum: f64 = window.iter().sum();
        let normal = window.len() as f64 * step_s;
        if !window.is_empty() && sum > SLOW_FACTOR * normal {
            *slow_s += sum - normal;
        }
        window.clear();
    };
    for (i, &x) in iv.iter().enumerate() {
        let normal = x.min(step_s);
        if timeline[i + 1].redone {
            redone_s += normal;
            redone_steps += 1;
        }
        if x > stall_at && x > 0.0 {
            close(&mut window, &mut slow_s);
            stall_s += x - normal;
        } else {
            window.push(x);
            if window.len() == w {
                close(&mut window, &mut slow_s);
            }
        }
    }
    close(&mut window, &mut slow_s);
    let wall_s = iv.iter().sum::<f64>() + step_s;
    let lost = stall_s + slow_s + redone_s;
    let goodput = if wall_s > 0.0 {
        (1.0 - lost / wall_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    Some(LostTime {
        wall_s,
        step_s,
        stall_s,
        slow_s,
        redone_s,
        redone_steps,
        goodput,
    })
}

/// [`account`] of a history's [`applied_timeline`].
pub fn lost_time(h: &History) -> Option<LostTime> {
    account(&applied_timeline(h))
}

/// The secondary goodput: the faulted run's throughput over each finished reference
/// run's, unclamped (above 1 can be real: a killed daemon frees cores on a shared
/// machine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceGoodput {
    /// Reference runs that ran to their end (the others are left out).
    pub runs: usize,
    /// Their wall times, in run order.
    pub wall_s: Vec<f64>,
    /// Their steps applied, in run order.
    #[serde(default)]
    pub steps: Vec<u64>,
    /// The faulted run's steps (of its surviving lineage) per second of its wall time.
    #[serde(default)]
    pub faulted_steps_per_s: f64,
    /// Smallest ratio.
    pub min: f64,
    /// Median ratio (of an even count: the mean of the middle two).
    pub median: f64,
    /// Largest ratio.
    pub max: f64,
}

/// One run's throughput: steps applied in a wall time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    /// Steps applied (0: unknown, read as the faulted run's count).
    pub steps: u64,
    /// Seconds they took.
    pub wall_s: f64,
}

/// [`ReferenceGoodput`] of reference runs against the faulted run: each ratio is the
/// faulted steps per second over the reference's. `None` without a reference or a
/// faulted run that applied steps in a positive wall time.
pub fn reference_goodput(
    references: &[Throughput],
    faulted: Throughput,
) -> Option<ReferenceGoodput> {
    let valid = |t: &Throughput| t.wall_s.is_finite() && t.wall_s > 0.0;
    if references.is_empty() || !valid(&faulted) || faulted.steps == 0 {
        return None;
    }
    let faulted_rate = faulted.steps as f64 / faulted.wall_s;
    let mut r: Vec<f64> = references
        .iter()
        .filter(|t| valid(t))
        .map(|t| {
            let steps = if t.steps == 0 { faulted.steps } else { t.steps };
            faulted_rate / (steps as f64 / t.wall_s)
        })
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    let n = r.len();
    let median = if n % 2 == 1 {
        r[n / 2]
    } else {
        (r[n / 2 - 1] + r[n / 2]) / 2.0
    };
    Some(ReferenceGoodput {
        runs: n,
        wall_s: references.iter().map(|t| t.wall_s).collect(),
        steps: references.iter().map(|t| t.steps).collect(),
        faulted_steps_per_s: faulted_rate,
        min: r[0],
        median,
        max: r[n - 1],
    })
}

/// Steps of the history's surviving lineage: each step counted once, in the newest
/// generation that applied it.
pub fn lineage_steps(h: &History) -> u64 {
    lineage_times(h).len() as u64
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
            // A fault with no daemon hit was not injected (its daemon was down).
            (matches!(
                f.kind.as_str(),
                "kill" | "hang" | "partition" | "kill_in_upload"
            ) && f.node.is_some())
                || (f.kind == "group" && !f.nodes.is_empty())
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
    let lost = lost_time(h);
    let goodput = lost.as_ref().map(|l| l.goodput);
    let refs: Vec<Throughput> = h
        .reference_runs
        .iter()
        .filter(|r| r.finished)
        .map(|r| Throughput {
            steps: r.steps,
            wall_s: r.wall_s,
        })
        .collect();
    let reference_goodput = lost.as_ref().and_then(|l| {
        reference_goodput(
            &refs,
            Throughput {
                steps: times.len() as u64,
                wall_s: l.wall_s,
            },
        )
    });
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
        lost_time: lost,
        reference_goodput,
        median_step_s,
        wall_s,
        committed_steps,
        recoveries,
        harness_errors,
        resources: crate::resources::segments(&h.resources),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// The resources section of `report.md`: one row per process life (empty without
    /// samples).
    fn resources_markdown(&self, h: &History) -> String {
        if self.resources.is_empty() && h.reference_runs.iter().all(|r| r.resources.is_empty()) {
            return String::new();
        }
        let t0 = h.steps.iter().map(|x| x.t_ms).min().unwrap_or(h.started_ms);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = format!(
            "\n## Memory and file descriptors\n\nEvery daemon sampled every {} s (VmRSS of /proc/PID/status, entries of /proc/PID/fd); \
             one row per process life (a restarted daemon has a new PID and a fresh heap). Slopes are least-squares fits per hour \
             over the life after its first {} s (its start-up climb: model, buffers, allocator arenas; \"settled\" is the RSS \
             then); lives with less than {} s or {} samples after that get none.\n\n\
             | node | pid | from (s) | to (s) | samples | RSS first / settled / last / max (MiB) | RSS slope (MiB/h) | fds first / last / max | fd slope (/h) |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            crate::resources::SAMPLE_EVERY.as_secs(),
            crate::resources::WARMUP_S,
            crate::resources::MIN_SPAN_S,
            crate::resources::MIN_SAMPLES
        );
        // The faulted run's lives, then each fault-free reference run's (its times from
        // its own first sample).
        let lives = self.resources.iter().map(|g| (String::new(), t0, g)).chain(
            h.reference_runs.iter().flat_map(|r| {
                let r0 = r.resources.iter().map(|g| g.first_ms).min().unwrap_or(0);
                r.resources
                    .iter()
                    .map(move |g| (format!(" (reference run {})", r.order + 1), r0, g))
            }),
        );
        for (run, t0, g) in lives {
            s.push_str(&format!(
                "| node-{}{run} | {} | {:.0} | {:.0} | {} | {:.1} / {} / {:.1} / {:.1} | {} | {} / {} / {} | {} |\n",
                g.node,
                g.pid,
                (g.first_ms as f64 - t0 as f64) / 1000.0,
                (g.last_ms as f64 - t0 as f64) / 1000.0,
                g.samples,
                mib(g.rss_first),
                opt(g.rss_settled.map(mib), 1),
                mib(g.rss_last),
                mib(g.rss_max),
                opt(g.rss_slope_per_h.map(|b| b / (1024.0 * 1024.0)), 2),
                g.fds_first,
                g.fds_last,
                g.fds_max,
                opt(g.fds_slope_per_h, 2),
            ));
        }
        s
    }

    /// `report.md`: the verdicts, the figures and the faults, for people.
    pub fn markdown(&self, h: &History) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# Chaos run: {} (seed {})\n\n**{}**: {} nodes, target step {}{}, {} faults injected.\n\n",
            self.scenario,
            self.seed,
            if self.passed {
                "PASSED, every invariant held"
            } else {
                "FAILED"
            },
            self.nodes,
            self.target_step,
            if h.stopped_by_time {
                " (sized by time: the newest checkpoint committed when the harness stopped the job)"
            } else {
                ""
            },
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
        let pct = |g: Option<f64>| {
            g.map(|g| format!("{:.1}%", g * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        s.push_str(&format!(
            "\n## Figures\n\n| figure | value |\n|---|---|\n\
             | recovery p50 | {} s |\n| recovery p99 | {} s |\n| steps lost | {} |\n\
             | goodput (lost-time accounting, <= 100%) | {} |\n| fault-free median step | {} s |\n| wall time | {:.1} s |\n\
             | committed steps | {} |\n",
            opt(self.recovery_s_p50, 3),
            opt(self.recovery_s_p99, 3),
            self.steps_lost,
            pct(self.goodput),
            opt(self.median_step_s, 4),
            self.wall_s,
            self.committed_steps
        ));
        if let Some(l) = &self.lost_time {
            s.push_str(&format!(
                "\n## Where the time went\n\nFrom the run's own timeline (each step at the first time a generation applied it): \
                 wall {:.1} s, normal step {:.4} s.\n\n| lost to | seconds | share |\n|---|---|---|\n\
                 | stalls (no step applied for over {STALL_FACTOR} normal steps) | {:.2} | {:.1}% |\n\
                 | slow spells (windows over {SLOW_FACTOR}x the normal step) | {:.2} | {:.1}% |\n\
                 | redone steps ({}) | {:.2} | {:.1}% |\n",
                l.wall_s,
                l.step_s,
                l.stall_s,
                100.0 * l.stall_s / l.wall_s.max(f64::MIN_POSITIVE),
                l.slow_s,
                100.0 * l.slow_s / l.wall_s.max(f64::MIN_POSITIVE),
                l.redone_steps,
                l.redone_s,
                100.0 * l.redone_s / l.wall_s.max(f64::MIN_POSITIVE),
            ));
        }
        match &self.reference_goodput {
            Some(r) => s.push_str(&format!(
                "\n## Against fault-free reference runs\n\n{} fault-free runs of the same scenario, interleaved with this one; \
                 this run's throughput ({:.2} steps/s of its surviving lineage) over theirs, unclamped: min {:.3}, median {:.3}, max {:.3} \
                 (references: {}). A ratio above 1 can be real on a shared machine: a killed daemon frees cores for the others.\n",
                r.runs,
                r.faulted_steps_per_s,
                r.min,
                r.median,
                r.max,
                r.wall_s
                    .iter()
                    .zip(r.steps.iter().chain(std::iter::repeat(&0)))
                    .map(|(w, n)| if *n == 0 {
                        format!("{w:.1} s")
                    } else {
                        format!("{n} steps in {w:.1} s")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None if !h.reference_runs.is_empty() => s.push_str(
                "\n## Against fault-free reference runs\n\nNo reference run ran to its end: no ratio.\n",
            ),
            None => {}
        }
        s.push_str("\n## Faults\n\nTimes in seconds since the first step; faults overlap when their [start, end] do.\n\n| # | kind | node | start | end | overlaps | recovery (s) | steps lost | what |\n|---|---|---|---|---|---|---|---|---|\n");
        let t0 = h.steps.iter().map(|x| x.t_ms).min().unwrap_or(h.started_ms);
        let windows: Vec<(f64, f64)> = h
            .faults
            .iter()
            .map(|f| (f.start_ms as f64, f.end_ms as f64))
            .collect();
        let over = crate::schedule::overlaps(&windows);
        for (f, over) in h.faults.iter().zip(&over) {
            let r = self.recoveries.iter().find(|r| r.fault == f.index);
            let node = match (f.node, f.nodes.as_slice()) {
                (Some(n), _) => format!("node-{n}"),
                (None, []) => "-".into(),
                (None, ns) => ns
                    .iter()
                    .map(|n| format!("node-{n}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
                f.index,
                f.kind,
                node,
                (f.start_ms as f64 - t0 as f64) / 1000.0,
                (f.end_ms as f64 - t0 as f64) / 1000.0,
                if over.is_empty() {
                    "-".to_string()
                } else {
                    over.iter()
                        .map(|&j| format!("#{}", h.faults[j].index))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                opt(r.and_then(|r| r.recovery_s), 3),
                r.map(|r| r.steps_lost.to_string())
                    .unwrap_or_else(|| "-".into()),
                f.detail.replace('|', "\\|")
            ));
        }
        s.push_str(&self.resources_markdown(h));
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
            stage: None,
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
    fn the_report_lists_memory_and_fds_per_process_life() {
        let mut h = History {
            nodes: 1,
            stopped_by_time: true,
            ..History::default()
        };
        h.steps.push(step(0, 1, 1, 0));
        assert!(!build("t", 1, &h, BTreeMap::new(), vec![])
            .markdown(&h)
            .contains("Memory and file descriptors"));
        // 1 MiB more every 10 minutes over an hour: +6 MiB/h, fds flat.
        for k in 0..=6u64 {
            h.resources.push(crate::resources::ResourceSample {
                node: 0,
                pid: 42,
                t_ms: k * 600_000,
                rss_bytes: (100 + k) << 20,
                fds: 20,
            });
        }
        let r = build("t", 1, &h, BTreeMap::new(), vec![]);
        assert_eq!(r.resources.len(), 1);
        let md = r.markdown(&h);
        assert!(md.contains("sized by time"), "{md}");
        assert!(
            md.contains("| node-0 | 42 | 0 | 3600 | 7 | 100.0 / 101.0 / 106.0 / 106.0 | 6.00 | 20 / 20 / 20 | 0.00 |"),
            "{md}"
        );
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
            nodes: vec![],
            start_ms: 1050,
            end_ms: 1400,
            detail: String::new(),
        });
        // A hang whose daemon was down (another fault's kill) was not injected: no
        // recovery of its own.
        h.faults.push(InjectedFault {
            index: 1,
            kind: "hang".into(),
            node: None,
            nodes: vec![],
            start_ms: 1100,
            end_ms: 1100,
            detail: "not injected: node-1 was down".into(),
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
        // Lost: the 500 ms gap's excess over a 100 ms step (slow) and redone step 10.
        let l = r.lost_time.clone().unwrap();
        assert!((l.slow_s - 0.4).abs() < 1e-9, "{l:?}");
        assert!((l.redone_s - 0.1).abs() < 1e-9, "{l:?}");
        assert_eq!((l.redone_steps, l.stall_s), (1, 0.0));
        assert!((r.goodput.unwrap() - 0.75).abs() < 1e-9);
        assert_eq!(r.faults_injected["kill"], 1);
        assert!(r.passed);
        assert!(r.markdown(&h).contains("| 0 | kill | node-1 |"));
    }

    fn timeline(gaps_ms: &[u64], redone: &[usize]) -> Vec<Applied> {
        let mut t = 1000;
        let mut out = vec![Applied {
            t_ms: t,
            redone: redone.contains(&0),
        }];
        for (i, g) in gaps_ms.iter().enumerate() {
            t += g;
            out.push(Applied {
                t_ms: t,
                redone: redone.contains(&(i + 1)),
            });
        }
        out
    }

    #[test]
    fn lost_time_table() {
        let steady = vec![10u64; 40];
        let mut stalled = steady.clone();
        stalled[20] = 2010; // 2 s with no step
        let mut slow = steady.clone();
        for g in &mut slow[10..15] {
            *g = 30; // a slow spell: 5 steps at 3x
        }
        let mut noisy = steady.clone();
        for g in noisy.iter_mut().step_by(2) {
            *g = 11; // +10% on every other step: noise, not a slow spell
        }
        /// (name, gaps, redone indices, stall, slow, redone, goodput)
        type Row<'a> = (&'a str, &'a [u64], &'a [usize], f64, f64, f64, f64);
        let table: &[Row] = &[
            ("steady", &steady, &[], 0.0, 0.0, 0.0, 1.0),
            ("noise is not lost", &noisy, &[], 0.0, 0.0, 0.0, 1.0),
            (
                "a stall loses all but one step",
                &stalled,
                &[],
                2.0,
                0.0,
                0.0,
                1.0 - 2.0 / 2.41,
            ),
            (
                "a slow spell loses its excess",
                &slow,
                &[],
                0.0,
                0.1,
                0.0,
                1.0 - 0.1 / 0.51,
            ),
            (
                "redone steps lose their time",
                &steady,
                &[5, 6, 7],
                0.0,
                0.0,
                0.03,
                1.0 - 0.03 / 0.41,
            ),
            ("all redone", &[10, 10], &[0, 1, 2], 0.0, 0.0, 0.03, 0.0),
        ];
        for (name, gaps, redone, stall, slow, re, goodput) in table {
            let l = account(&timeline(gaps, redone)).unwrap();
            let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
            assert!(close(l.stall_s, *stall), "{name}: {l:?}");
            assert!(close(l.slow_s, *slow), "{name}: {l:?}");
            assert!(close(l.redone_s, *re), "{name}: {l:?}");
            assert!(close(l.goodput, *goodput), "{name}: {l:?} want {goodput}");
        }
        assert_eq!(
            account(&timeline(&[], &[])),
            None,
            "one step: nothing to account"
        );
    }

    #[test]
    fn reference_goodput_is_unclamped_with_its_spread() {
        let t = |steps, wall_s| Throughput { steps, wall_s };
        // Sized in steps: the same count, so the ratio of wall times.
        assert_eq!(reference_goodput(&[], t(100, 10.0)), None);
        assert_eq!(reference_goodput(&[t(100, 10.0)], t(100, 0.0)), None);
        assert_eq!(reference_goodput(&[t(100, 10.0)], t(0, 10.0)), None);
        let r =
            reference_goodput(&[t(100, 9.0), t(100, 11.0), t(100, 10.0)], t(100, 10.0)).unwrap();
        assert_eq!((r.runs, r.median), (3, 1.0));
        assert!(
            (r.min - 0.9).abs() < 1e-12 && (r.max - 1.1).abs() < 1e-12,
            "{r:?}"
        );
        let r = reference_goodput(
            &[t(100, 12.0), t(100, 8.0), t(100, 9.0), t(100, 11.0)],
            t(100, 10.0),
        )
        .unwrap();
        assert!((r.median - 1.0).abs() < 1e-12 && r.max > 1.0, "{r:?}");
        // Sized by time: throughputs. 900 steps in 100 s against 100 steps in 10 s: 0.9.
        let r = reference_goodput(&[t(100, 10.0)], t(900, 100.0)).unwrap();
        assert!((r.median - 0.9).abs() < 1e-12 && (r.faulted_steps_per_s - 9.0).abs() < 1e-12);
        // A reference of an old report (no step count) reads as the faulted count.
        let r = reference_goodput(&[t(0, 12.0)], t(100, 10.0)).unwrap();
        assert!((r.median - 1.2).abs() < 1e-12, "{r:?}");
    }

    proptest::proptest! {
        #[test]
        fn goodput_is_in_zero_one_and_the_parts_add_up(
            gaps in proptest::collection::vec(0u64..5000, 1..300),
            redone in proptest::collection::vec(proptest::bool::ANY, 301),
        ) {
            let mut t = 0u64;
            let mut tl = vec![Applied { t_ms: 0, redone: redone[0] }];
            for (i, g) in gaps.iter().enumerate() {
                t += g;
                tl.push(Applied { t_ms: t, redone: redone[i + 1] });
            }
            let l = account(&tl).unwrap();
            proptest::prop_assert!((0.0..=1.0).contains(&l.goodput), "{:?}", l);
            proptest::prop_assert!(l.stall_s >= 0.0 && l.slow_s >= 0.0 && l.redone_s >= 0.0);
            proptest::prop_assert!(
                l.stall_s + l.slow_s + l.redone_s <= l.wall_s + 1e-9,
                "{:?}", l
            );
        }
    }
}

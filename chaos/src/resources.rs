//! The daemons' resident memory and open file descriptors over a run (a soak must show
//! that nothing grows without bound).
//!
//! The harness samples every live daemon every [`SAMPLE_EVERY`]: `VmRSS` from
//! `/proc/PID/status` and the number of entries of `/proc/PID/fd` ([`sample_pid`]). A
//! killed daemon comes back with a new PID and a fresh heap, so the samples are cut into
//! *segments*, one per process life (node and PID), and each segment gets its own
//! least-squares slope per hour ([`slope_per_hour`]); a slope across a restart would
//! mix the fall of the kill with the growth of a life. [`segments`] does the cutting.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often the harness samples each daemon.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A segment needs this many samples, over at least [`MIN_SPAN_S`], for a slope.
pub const MIN_SAMPLES: usize = 3;

/// A segment shorter than this (seconds) gets no slope: a few seconds of a life say
/// nothing per hour.
pub const MIN_SPAN_S: f64 = 60.0;

/// The slopes leave out a life's first this many seconds (its start-up).
pub const WARMUP_S: f64 = 120.0;

/// One sample of one daemon process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceSample {
    /// Node index.
    pub node: usize,
    /// The process id (a restarted daemon has a new one).
    pub pid: u32,
    /// Unix milliseconds.
    pub t_ms: u64,
    /// Resident set size in bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: u64,
}

/// One process life of one node, summarised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceSegment {
    /// Node index.
    pub node: usize,
    /// The process id.
    pub pid: u32,
    /// Samples in the segment.
    pub samples: usize,
    /// Unix milliseconds of the first and the last sample.
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// RSS at the first sample, the last, and the most, in bytes.
    pub rss_first: u64,
    /// See `rss_first`.
    pub rss_last: u64,
    /// See `rss_first`.
    pub rss_max: u64,
    /// RSS at the first sample after the warm-up ([`WARMUP_S`]), in bytes (`None`: the
    /// life ended before).
    #[serde(default)]
    pub rss_settled: Option<u64>,
    /// Least-squares slope of RSS in bytes per hour after the warm-up (`None`: too few
    /// samples or too short after it).
    pub rss_slope_per_h: Option<f64>,
    /// Open fds at the first sample, the last, and the most.
    pub fds_first: u64,
    /// See `fds_first`.
    pub fds_last: u64,
    /// See `fds_first`.
    pub fds_max: u64,
    /// Least-squares slope of open fds per hour after the warm-up.
    pub fds_slope_per_h: Option<f64>,
}

/// The least-squares slope of `points` (`(unix ms, value)`) in value per hour; `None`
/// with fewer than two distinct times. Pure.
pub fn slope_per_hour(points: &[(u64, f64)]) -> Option<f64> {
    let n = points.len();
    if n < 2 {
        return None;
    }
    // Times relative to the first point, in hours, to keep precision.
    let t0 = points[0].0;
    let xs: Vec<f64> = points
        .iter()
        .map(|(t, _)| (*t as f64 - t0 as f64) / 3_600_000.0)
        .collect();
    let mx = xs.iter().sum::<f64>() / n as f64;
    let my = points.iter().map(|(_, y)| y).sum::<f64>() / n as f64;
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = xs
        .iter()
        .zip(points)
        .map(|(x, (_, y))| (x - mx) * (y - my))
        .sum();
    Some(sxy / sxx)
}

/// `VmRSS` in bytes from the text of `/proc/PID/status` (`None`: no such line, e.g. a
/// zombie). Pure.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = parts.next().unwrap_or("kB");
    let mult = match unit {
        "kB" => 1024,
        "mB" | "MB" => 1024 * 1024,
        "B" => 1,
        _ => return None,
    };
    Some(value * mult)
}

/// Samples process `pid` now: `(rss bytes, open fds)`; `None` if it is gone or a zombie.
pub fn sample_pid(pid: u32) -> Option<(u64, u64)> {
    let dir = Path::new("/proc").join(pid.to_string());
    let rss = parse_vm_rss(&std::fs::read_to_string(dir.join("status")).ok()?)?;
    let fds = std::fs::read_dir(dir.join("fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// Cuts `samples` into one segment per process life (node, PID), in node then time
/// order, each with its slopes. Pure.
pub fn segments(samples: &[ResourceSample]) -> Vec<ResourceSegment> {
    let mut lives: BTreeMap<(usize, u32), Vec<&ResourceSample>> = BTreeMap::new();
    for s in samples {
        lives.entry((s.node, s.pid)).or_default().push(s);
    }
    let mut out: Vec<ResourceSegment> = lives
        .into_iter()
        .map(|((node, pid), mut v)| {
            v.sort_by_key(|s| s.t_ms);
            let (first, last) = (v[0], v[v.len() - 1]);
            let settled: Vec<&ResourceSample> = v
                .iter()
                .copied()
                .filter(|s| (s.t_ms - first.t_ms) as f64 / 1000.0 >= WARMUP_S)
                .collect();
            let long_enough = settled.len() >= MIN_SAMPLES
                && settled
                    .first()
                    .zip(settled.last())
                    .is_some_and(|(a, b)| (b.t_ms - a.t_ms) as f64 / 1000.0 >= MIN_SPAN_S);
            let slope = |f: fn(&ResourceSample) -> u64| {
                if !long_enough {
                    return None;
                }
                let pts: Vec<(u64, f64)> = settled.iter().map(|s| (s.t_ms, f(s) as f64)).collect();
                slope_per_hour(&pts)
            };
            ResourceSegment {
                node,
                pid,
                samples: v.len(),
                first_ms: first.t_ms,
                last_ms: last.t_ms,
                rss_first: first.rss_bytes,
                rss_last: last.rss_bytes,
                rss_max: v.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
                rss_settled: settled.first().map(|s| s.rss_bytes),
                rss_slope_per_h: slope(|s| s.rss_bytes),
                fds_first: first.fds,
                fds_last: last.fds,
                fds_max: v.iter().map(|s| s.fds).max().unwrap_or(0),
                fds_slope_per_h: slope(|s| s.fds),
            }
        })
        .collect();
    out.sort_by_key(|s| (s.node, s.first_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_table() {
        const H: u64 = 3_600_000;
        type Case<'a> = (&'a [(u64, f64)], Option<f64>);
        let table: &[Case] = &[
            // Too few points or no spread in time.
            (&[], None),
            (&[(5, 1.0)], None),
            (&[(5, 1.0), (5, 2.0)], None),
            // Flat.
            (&[(0, 7.0), (H / 2, 7.0), (H, 7.0)], Some(0.0)),
            // +10 per hour, exactly.
            (&[(0, 0.0), (H / 2, 5.0), (H, 10.0)], Some(10.0)),
            // -6 per hour over 10 minutes, from a late start.
            (&[(1_000_000, 100.0), (1_000_000 + H / 6, 99.0)], Some(-6.0)),
            // Noise around a line: the fit is the least-squares one, (0,0) (1,1) (2,3) in
            // hours: slope 1.5.
            (&[(0, 0.0), (H, 1.0), (2 * H, 3.0)], Some(1.5)),
            // One step up halfway through (allocator warm-up): a positive slope.
            (
                &[(0, 1.0), (H / 3, 1.0), (2 * H / 3, 2.0), (H, 2.0)],
                Some(1.2),
            ),
        ];
        for (pts, want) in table {
            let got = slope_per_hour(pts);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{pts:?}: {g} != {w}"),
                _ => panic!("{pts:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn vm_rss_table() {
        let table: &[(&str, Option<u64>)] = &[
            (
                "Name:\ttenax\nVmRSS:\t  123456 kB\nVmSwap:\t0 kB\n",
                Some(123456 * 1024),
            ),
            ("VmRSS:\t1 kB\n", Some(1024)),
            ("Name:\ttenax\nState:\tZ (zombie)\n", None),
            ("VmRSS:\tlots kB\n", None),
            ("VmRSS:\t3 GB\n", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_vm_rss(text), *want, "{text:?}");
        }
    }

    #[test]
    fn this_process_can_be_sampled() {
        let (rss, fds) = sample_pid(std::process::id()).expect("our own /proc entry");
        assert!(rss > 0 && fds > 0, "rss {rss} fds {fds}");
        assert_eq!(sample_pid(u32::MAX), None);
    }

    #[test]
    fn segments_are_one_per_process_life() {
        let s = |node, pid, t_s: u64, rss, fds| ResourceSample {
            node,
            pid,
            t_ms: t_s * 1000,
            rss_bytes: rss,
            fds,
        };
        let samples = vec![
            // node 0: one life; its start-up climb (100 -> 1000 bytes) is left out, then
            // RSS +3600 bytes in 20 min = +10800/h.
            s(0, 10, 0, 100, 5),
            s(0, 10, 120, 1000, 20),
            s(0, 10, 720, 2800, 20),
            s(0, 10, 1320, 4600, 20),
            // node 1: killed after 20 s (too short for a slope), restarted as pid 12.
            s(1, 11, 0, 5000, 30),
            s(1, 11, 20, 5000, 31),
            s(1, 12, 40, 900, 25),
            s(1, 12, 160, 900, 25),
            s(1, 12, 520, 900, 27),
            s(1, 12, 880, 900, 29),
        ];
        let seg = segments(&samples);
        assert_eq!(seg.len(), 3);
        assert_eq!((seg[0].node, seg[0].pid, seg[0].samples), (0, 10, 4));
        assert!((seg[0].rss_slope_per_h.unwrap() - 10_800.0).abs() < 1e-6);
        assert_eq!((seg[0].rss_first, seg[0].rss_settled), (100, Some(1000)));
        assert_eq!(seg[0].fds_slope_per_h, Some(0.0));
        assert_eq!((seg[1].pid, seg[1].rss_slope_per_h), (11, None));
        assert_eq!((seg[1].fds_max, seg[1].rss_settled), (31, None));
        assert_eq!(
            (seg[2].pid, seg[2].rss_first, seg[2].rss_last),
            (12, 900, 900)
        );
        // +4 fds in 720 s after the warm-up = +20 per hour, the restart's drop not counted.
        assert!((seg[2].fds_slope_per_h.unwrap() - 20.0).abs() < 1e-6);
    }
}

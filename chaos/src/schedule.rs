//! The fault schedule of a scenario and a seed: a pure function, so that a seed replays
//! the same faults (kinds, times or steps, victims, durations) run after run.
//!
//! Fixed faults come first, in file order; then the random ones, in time order: a Poisson
//! process of rate `random.rate_per_min` over `[start_s, start_s + duration_s)` (or evenly
//! spaced with a seeded jitter, `spacing = "even"`), each event
//! a template picked uniformly. A node target of `"any"` (or none) becomes an index drawn
//! from the seed; `"leader"` and `"non-leader"` stay roles, resolved when the fault is
//! injected. The harness injects one fault at a time: each waits for its trigger and for
//! the previous fault to end.

use serde::{Deserialize, Serialize};
use tenax_core::rng::SplitMix64;

use crate::scenario::{FaultKind, FaultSpec, NodeTarget, Scenario, Spacing, MAX_FAULTS};

/// When a fault is injected.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Seconds since the first step any daemon logged.
    AtS(f64),
    /// Once any daemon logged this step.
    AtStep(u64),
}

/// Whom a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// This daemon.
    Node(usize),
    /// The leader when the fault is injected.
    Leader,
    /// A daemon other than the leader (the lowest index that is not).
    NonLeader,
    /// No single daemon (S3, etcd, or the checkpoint writer found at the time).
    Cluster,
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedFault {
    /// Position in the schedule.
    pub index: usize,
    /// The fault's kind (also in `spec`).
    pub kind: FaultKind,
    /// When.
    pub trigger: Trigger,
    /// Whom.
    pub target: Target,
    /// The fault as written (its settings; `at_s`/`at_step`/`node` are in `trigger`/`target`).
    pub spec: FaultSpec,
}

fn target(spec: &FaultSpec, nodes: usize, rng: &mut SplitMix64) -> Target {
    if !spec.kind.has_node() {
        return Target::Cluster;
    }
    match &spec.node {
        Some(NodeTarget::Index(i)) => Target::Node(*i),
        Some(NodeTarget::Named(n)) if n == "leader" => Target::Leader,
        Some(NodeTarget::Named(n)) if n == "non-leader" => Target::NonLeader,
        _ => Target::Node(rng.below(nodes.max(1) as u64) as usize),
    }
}

/// The schedule of `scenario` under `seed`.
pub fn schedule(scenario: &Scenario, seed: u64) -> Vec<PlannedFault> {
    let nodes = scenario.cluster.nodes;
    let mut rng = SplitMix64::derive(seed, "chaos-schedule");
    let mut out = Vec::new();
    for spec in &scenario.faults {
        let trigger = match (spec.at_s, spec.at_step) {
            (Some(t), _) => Trigger::AtS(t),
            (None, Some(s)) => Trigger::AtStep(s),
            (None, None) => Trigger::AtS(0.0),
        };
        let target = target(spec, nodes, &mut rng);
        out.push(PlannedFault {
            index: out.len(),
            kind: spec.kind,
            trigger,
            target,
            spec: spec.clone(),
        });
    }
    if let Some(r) = &scenario.random {
        let rate_per_s = r.rate_per_min / 60.0;
        let end = r.start_s + r.duration_s;
        let mut t = r.start_s;
        let mut k = 0u64;
        while out.len() < MAX_FAULTS {
            t = match r.spacing {
                // Exponential gaps: 1 - u is in (0, 1], so the log is finite.
                Spacing::Poisson => t - (1.0 - rng.next_f64()).ln() / rate_per_s,
                Spacing::Even => {
                    let gap = 1.0 / rate_per_s;
                    r.start_s + gap * (k as f64 + 0.5 + (rng.next_f64() - 0.5) * 0.5)
                }
            };
            k += 1;
            if t >= end {
                break;
            }
            let spec = &r.faults[rng.below(r.faults.len() as u64) as usize];
            let target = target(spec, nodes, &mut rng);
            out.push(PlannedFault {
                index: out.len(),
                kind: spec.kind,
                trigger: Trigger::AtS((t * 1000.0).round() / 1000.0),
                target,
                spec: spec.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storm() -> Scenario {
        Scenario::parse(
            "[cluster]\nnodes = 4\n[train]\nsteps = 100\n\
             [[faults]]\nkind = \"hang\"\nat_step = 10\n\
             [[faults]]\nkind = \"s3\"\nat_s = 5\n\
             [random]\nrate_per_min = 6\nstart_s = 10\nduration_s = 600\n\
             [[random.faults]]\nkind = \"kill\"\n[[random.faults]]\nkind = \"slow\"\nnode = \"leader\"\n",
            "storm.toml",
        )
        .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let s = storm();
        let a = schedule(&s, 42);
        assert_eq!(a, schedule(&s, 42));
        assert_ne!(a, schedule(&s, 43));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&schedule(&s, 42)).unwrap()
        );
    }

    #[test]
    fn fixed_faults_come_first_then_random_ones_in_time_order_within_the_window() {
        let s = storm();
        let plan = schedule(&s, 7);
        assert_eq!(plan[0].trigger, Trigger::AtStep(10));
        assert_eq!(plan[1].trigger, Trigger::AtS(5.0));
        assert_eq!(plan[1].target, Target::Cluster);
        let times: Vec<f64> = plan[2..]
            .iter()
            .map(|f| match f.trigger {
                Trigger::AtS(t) => t,
                Trigger::AtStep(_) => panic!("random faults are timed"),
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert!(times.iter().all(|&t| (10.0..610.0).contains(&t)));
        // Rate 6/min over 10 min: about 60 events; a wide band, the draw is seeded.
        assert!((30..=100).contains(&times.len()), "{}", times.len());
        for f in &plan[2..] {
            match f.kind {
                FaultKind::Kill => assert!(matches!(f.target, Target::Node(n) if n < 4)),
                FaultKind::Slow => assert_eq!(f.target, Target::Leader),
                k => panic!("unexpected kind {k}"),
            }
        }
        assert!(plan.iter().enumerate().all(|(i, f)| f.index == i));
    }

    #[test]
    fn even_spacing_gives_one_fault_per_gap() {
        let s = Scenario::parse(
            "[cluster]\nnodes = 4\n[train]\nsteps = 100\n\
             [random]\nrate_per_min = 1\nstart_s = 0\nduration_s = 600\nspacing = \"even\"\n\
             [[random.faults]]\nkind = \"kill\"\n",
            "even.toml",
        )
        .unwrap();
        for seed in 0..20 {
            let plan = schedule(&s, seed);
            assert_eq!(plan.len(), 10, "seed {seed}");
            for (k, f) in plan.iter().enumerate() {
                let Trigger::AtS(t) = f.trigger else { panic!() };
                let mid = 60.0 * (k as f64 + 0.5);
                assert!((t - mid).abs() <= 15.0, "seed {seed}: fault {k} at {t}");
            }
        }
    }
}

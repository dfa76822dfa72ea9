//! The fault schedule of a scenario and a seed: a pure function, so that a seed replays
//! the same faults (kinds, times or steps, victims, durations) run after run.
//!
//! Fixed faults come first, in file order; then the random ones, in time order: a Poisson
//! process of rate `random.rate_per_min` over `[start_s, start_s + duration_s)` (or evenly
//! spaced with a seeded jitter, `spacing = "even"`), each event
//! a template picked uniformly. A node target of `"any"` (or none) becomes an index drawn
//! from the seed; `"leader"` and `"non-leader"` stay roles, resolved when the fault is
//! injected (from the daemons' own status, so it works while etcd is down). A group
//! fault's `"any"` targets draw distinct indices not otherwise named.
//!
//! Each fault starts at its own trigger whatever the others do: faults overlap when
//! their windows do ([`PlannedFault::window_s`], [`overlaps`]). [`resolve_group`] turns a
//! group's targets into distinct daemons once the roles are known.

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
    /// A group fault's daemons (empty for other kinds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Target>,
    /// A group fault takes etcd down too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub etcd: bool,
    /// The fault as written (its settings; `at_s`/`at_step`/`node` are in `trigger`/`target`).
    pub spec: FaultSpec,
}

impl PlannedFault {
    /// The planned window, seconds since the first step: from the trigger to the planned
    /// end ([`FaultSpec::planned_length_s`]); `None` for a fault triggered by a step.
    pub fn window_s(&self) -> Option<(f64, f64)> {
        match self.trigger {
            Trigger::AtS(t) => Some((t, t + self.spec.planned_length_s())),
            Trigger::AtStep(_) => None,
        }
    }
}

/// For each fault, the others whose `(start, end)` windows overlap it (closed intervals:
/// one ending as another starts overlaps it), in index order.
pub fn overlaps(windows: &[(f64, f64)]) -> Vec<Vec<usize>> {
    windows
        .iter()
        .enumerate()
        .map(|(i, &(a0, a1))| {
            windows
                .iter()
                .enumerate()
                .filter(|&(j, &(b0, b1))| j != i && a0 <= b1 && b0 <= a1)
                .map(|(j, _)| j)
                .collect()
        })
        .collect()
}

/// A group's daemons once the roles are known: `"leader"` and `"non-leader"` from
/// `leader` (none known: the lowest free index), indices as planned; a daemon already
/// taken is replaced by the lowest index not taken (so a group never hits one daemon
/// twice). Returns the daemons in target order, with the reason for any replacement.
pub fn resolve_group(
    targets: &[Target],
    leader: Option<usize>,
    nodes: usize,
) -> (Vec<usize>, Vec<String>) {
    let mut taken: Vec<usize> = Vec::with_capacity(targets.len());
    let mut why = Vec::new();
    for t in targets {
        let want = match t {
            Target::Node(n) => Some(*n),
            Target::Leader => leader,
            Target::NonLeader => (0..nodes).find(|&n| Some(n) != leader && !taken.contains(&n)),
            Target::Cluster => None,
        };
        let free = |taken: &[usize]| (0..nodes).find(|n| !taken.contains(n));
        let got = match want {
            Some(n) if n < nodes && !taken.contains(&n) => Some(n),
            Some(n) => {
                let f = free(&taken);
                why.push(format!(
                    "{t:?}: node-{n} already hit, node-{} instead",
                    f.map_or("?".into(), |f| f.to_string())
                ));
                f
            }
            None => {
                let f = free(&taken);
                why.push(format!(
                    "{t:?}: unknown (no daemon answered), node-{} instead",
                    f.map_or("?".into(), |f| f.to_string())
                ));
                f
            }
        };
        taken.extend(got);
    }
    (taken, why)
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

/// A group's targets: roles and indices as written, each `"any"` an index drawn from
/// those not named.
fn group_targets(spec: &FaultSpec, nodes: usize, rng: &mut SplitMix64) -> Vec<Target> {
    let written = spec.nodes.as_deref().unwrap_or_default();
    let mut free: Vec<usize> = (0..nodes)
        .filter(|i| !written.contains(&NodeTarget::Index(*i)))
        .collect();
    written
        .iter()
        .map(|t| match t {
            NodeTarget::Index(i) => Target::Node(*i),
            NodeTarget::Named(n) if n == "leader" => Target::Leader,
            NodeTarget::Named(n) if n == "non-leader" => Target::NonLeader,
            NodeTarget::Named(_) if free.is_empty() => Target::Node(0),
            NodeTarget::Named(_) => {
                Target::Node(free.remove(rng.below(free.len() as u64) as usize))
            }
        })
        .collect()
}

fn planned(
    index: usize,
    spec: &FaultSpec,
    trigger: Trigger,
    nodes: usize,
    rng: &mut SplitMix64,
) -> PlannedFault {
    let target = target(spec, nodes, rng);
    let group = if spec.kind == FaultKind::Group {
        group_targets(spec, nodes, rng)
    } else {
        Vec::new()
    };
    PlannedFault {
        index,
        kind: spec.kind,
        trigger,
        target,
        nodes: group,
        etcd: spec.kind == FaultKind::Group && spec.group_etcd(),
        spec: spec.clone(),
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
        out.push(planned(out.len(), spec, trigger, nodes, &mut rng));
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
            let trigger = Trigger::AtS((t * 1000.0).round() / 1000.0);
            out.push(planned(out.len(), spec, trigger, nodes, &mut rng));
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

    fn scenario_file(name: &str) -> Scenario {
        let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        Scenario::parse(&text, &path).unwrap()
    }

    /// The soak is sized by time, its faults end before the harness stops the job, and
    /// its templates cover every fault kind the harness has.
    #[test]
    fn the_soak_is_sized_by_time_and_draws_every_fault_kind() {
        let s = scenario_file("soak");
        let stop = s.run.stop_after_s.expect("sized by time");
        let r = s.random.as_ref().expect("random faults");
        assert!(r.start_s + r.duration_s < stop && stop < s.run.timeout_s as f64);
        assert!((r.rate_per_min - 1.0).abs() < 1e-9, "one a minute");
        let kinds: std::collections::BTreeSet<&str> =
            r.faults.iter().map(|f| f.kind.name()).collect();
        for k in [
            FaultKind::Kill,
            FaultKind::Hang,
            FaultKind::Slow,
            FaultKind::Partition,
            FaultKind::S3,
            FaultKind::EtcdRestart,
            FaultKind::EtcdDown,
            FaultKind::KillInUpload,
            FaultKind::Group,
        ] {
            assert!(kinds.contains(k.name()), "soak lacks {k}");
        }
        let plan = schedule(&s, 1);
        assert_eq!(plan, schedule(&s, 1));
        assert!(plan
            .iter()
            .all(|f| f.window_s().is_some_and(|(_, end)| end < stop)));
    }

    #[test]
    fn the_overlap_scenarios_overlap_as_planned_whatever_the_seed() {
        // (file, pairs of fault indices whose planned windows overlap)
        let table: &[(&str, &[(usize, usize)])] = &[
            ("rack-loss", &[]),
            ("kill-in-etcd-outage", &[(0, 1)]),
            ("brownout-and-kill", &[(0, 1)]),
            ("leader-in-partition-while-etcd-restarts", &[(0, 1)]),
        ];
        for (name, pairs) in table {
            let s = scenario_file(name);
            for seed in [1, 2, 99] {
                let plan = schedule(&s, seed);
                assert_eq!(plan, schedule(&s, seed), "{name}: seed {seed} replays");
                let windows: Vec<(f64, f64)> =
                    plan.iter().map(|f| f.window_s().expect("timed")).collect();
                let over = overlaps(&windows);
                for &(a, b) in *pairs {
                    assert!(
                        over[a].contains(&b) && over[b].contains(&a),
                        "{name}: {over:?}"
                    );
                }
            }
        }
        let rack = schedule(&scenario_file("rack-loss"), 1);
        assert_eq!(rack.len(), 1);
        assert_eq!(rack[0].kind, FaultKind::Group);
        assert!(rack[0].etcd);
        assert_eq!(rack[0].nodes.len(), 2);
        assert_eq!(rack[0].nodes[0], Target::Leader);
        assert_eq!(rack[0].window_s(), Some((15.0, 25.0)));
    }

    #[test]
    fn every_scenario_file_parses_and_sizes_its_new_faults_by_time() {
        let dir = format!("{}/scenarios", env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let s = Scenario::parse(&text, &path.display().to_string()).unwrap();
            n += 1;
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            if [
                "rack-loss",
                "kill-in-etcd-outage",
                "leader-kill-in-etcd-outage",
                "brownout-and-kill",
                "leader-in-partition-while-etcd-restarts",
            ]
            .contains(&stem.as_str())
            {
                assert!(s.faults.iter().all(|f| f.at_s.is_some()), "{stem}: at_s");
            }
        }
        assert!(n >= 11, "{n} scenario files");
    }

    #[test]
    fn overlaps_table() {
        /// (windows, each one's overlaps)
        type Row<'a> = (&'a [(f64, f64)], &'a [&'a [usize]]);
        let table: &[Row] = &[
            (&[], &[]),
            (&[(0.0, 1.0)], &[&[]]),
            (&[(0.0, 10.0), (3.0, 4.0)], &[&[1], &[0]]),
            (&[(0.0, 1.0), (2.0, 3.0)], &[&[], &[]]),
            (
                &[(0.0, 2.0), (2.0, 3.0), (2.5, 9.0)],
                &[&[1], &[0, 2], &[1]],
            ),
        ];
        for (windows, want) in table {
            let got = overlaps(windows);
            let want: Vec<Vec<usize>> = want.iter().map(|w| w.to_vec()).collect();
            assert_eq!(got, want, "{windows:?}");
        }
    }

    #[test]
    fn resolve_group_table() {
        use Target::*;
        // (targets, leader, nodes, daemons hit, replacements)
        type Row<'a> = (&'a [Target], Option<usize>, usize, &'a [usize], usize);
        let table: &[Row] = &[
            (&[Node(3), Node(4)], Some(0), 5, &[3, 4], 0),
            (&[Leader, Node(4)], Some(2), 5, &[2, 4], 0),
            (&[Leader, Node(2)], Some(2), 5, &[2, 0], 1),
            (&[Leader, NonLeader], Some(0), 3, &[0, 1], 0),
            (&[NonLeader, NonLeader], Some(0), 4, &[1, 2], 0),
            (&[Leader], None, 3, &[0], 1),
        ];
        for (targets, leader, nodes, want, replaced) in table {
            let (got, why) = resolve_group(targets, *leader, *nodes);
            assert_eq!(got, *want, "{targets:?} leader {leader:?}");
            assert_eq!(why.len(), *replaced, "{why:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn group_targets_are_distinct_daemons_and_the_seed_replays(
            seed in 0u64..10_000,
            nodes in 3usize..9,
            anys in 1usize..3,
            with_leader in proptest::bool::ANY,
        ) {
            let mut list: Vec<String> = vec!["\"any\"".into(); anys.min(nodes - 2)];
            if with_leader {
                list.push("\"leader\"".into());
            }
            let text = format!(
                "[cluster]\nnodes = {nodes}\n[train]\nsteps = 100\n\
                 [[faults]]\nkind = \"group\"\nat_s = 3\nnodes = [{}]\netcd = true\n\
                 [random]\nrate_per_min = 30\nduration_s = 60\n\
                 [[random.faults]]\nkind = \"group\"\nnodes = [\"any\", 0]\n",
                list.join(", ")
            );
            let s = Scenario::parse(&text, "p.toml").unwrap();
            let plan = schedule(&s, seed);
            proptest::prop_assert_eq!(&plan, &schedule(&s, seed));
            for f in &plan {
                let (hit, _) = resolve_group(&f.nodes, Some(seed as usize % nodes), nodes);
                let mut d = hit.clone();
                d.sort_unstable();
                d.dedup();
                proptest::prop_assert_eq!(d.len(), f.nodes.len(), "{:?} -> {:?}", f.nodes, hit);
                proptest::prop_assert!(hit.iter().all(|&n| n < nodes));
                proptest::prop_assert!(hit.len() < nodes, "a survivor is left");
            }
        }
    }
}

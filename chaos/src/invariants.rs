//! The invariants a chaos run must keep, checked from its recorded [`History`] alone.
//!
//! | name | held when |
//! |---|---|
//! | `target_step_reached` | a node applied the target step and a checkpoint of it was committed |
//! | `slots_exactly_once` | for every step, the lineage that survived (the newest generation that applied it) computed each batch slot at most once, at the cursor the step implies, and with one parameter hash; a step missing a slot's log line is explained by a member that then adopted (copied, loaded) a state holding the step, and otherwise such steps are no more than the faults that kill a process |
//! | `no_stale_generation` | every checkpoint record etcd accepted carries the generation of the plan current at its revision; no node logs a step in a generation older than one it already logged; members of a generation that applied a step agree on its parameters |
//! | `checkpoints_verify` | every committed checkpoint verifies |
//! | `steps_never_go_backwards` | a node's next logged step is its previous plus one, unless a state event (a load or a copy) in between explains it; each committed checkpoint holds a later step than the one before |
//! | `no_healthy_member_evicted` | no plan written while a node was only slow leaves it out |
//! | `final_params_match_fault_free` | the final parameters are bit-identical to a fault-free run's |

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::{History, StepRecord};

/// The verdict on one invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// `held` or `violated`.
    pub verdict: String,
    /// What shows it: counts checked when held, the first offending records when violated.
    pub evidence: String,
}

impl Verdict {
    fn held(evidence: impl Into<String>) -> Verdict {
        Verdict {
            verdict: "held".into(),
            evidence: evidence.into(),
        }
    }

    fn violated(evidence: impl Into<String>) -> Verdict {
        Verdict {
            verdict: "violated".into(),
            evidence: evidence.into(),
        }
    }

    /// Whether the invariant held.
    pub fn is_held(&self) -> bool {
        self.verdict == "held"
    }
}

/// How many offending records a violation's evidence lists.
const EVIDENCE_ITEMS: usize = 5;

fn listed(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(EVIDENCE_ITEMS)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > EVIDENCE_ITEMS {
        s.push_str(&format!("; and {} more", items.len() - EVIDENCE_ITEMS));
    }
    s
}

/// Checks the invariants named in `names` (unknown names are reported as violated, so a
/// typo cannot pass).
pub fn check(history: &History, names: &[&str]) -> BTreeMap<String, Verdict> {
    names
        .iter()
        .map(|&n| {
            let v = match n {
                "target_step_reached" => target_step_reached(history),
                "slots_exactly_once" => slots_exactly_once(history),
                "no_stale_generation" => no_stale_generation(history),
                "checkpoints_verify" => checkpoints_verify(history),
                "steps_never_go_backwards" => steps_never_go_backwards(history),
                "no_healthy_member_evicted" => no_healthy_member_evicted(history),
                "final_params_match_fault_free" => final_params(history),
                other => Verdict::violated(format!("no such invariant: {other}")),
            };
            (n.to_string(), v)
        })
        .collect()
}

fn target_step_reached(h: &History) -> Verdict {
    let max_step = h.steps.iter().map(|s| s.step).max().unwrap_or(0);
    let committed = h.commits.iter().map(|c| c.step).max().unwrap_or(0);
    if max_step >= h.target_step && committed >= h.target_step {
        Verdict::held(format!(
            "step {} applied; checkpoint of step {committed} committed",
            h.target_step
        ))
    } else {
        Verdict::violated(format!(
            "target step {}: the newest step applied is {max_step}, the newest committed checkpoint holds step {committed}",
            h.target_step
        ))
    }
}

/// Faults that end a process (and may take a step's log line with it).
fn process_faults(h: &History) -> usize {
    h.faults
        .iter()
        .map(|f| match f.kind.as_str() {
            "kill" | "kill_in_upload" => 1,
            "group" => f.nodes.len(),
            _ => 0,
        })
        .sum()
}

/// Whether any record of a step's lineage names its pipeline stage.
fn names_stages(lineage: &[&&StepRecord]) -> bool {
    lineage.iter().any(|r| r.stage.is_some())
}

fn slots_exactly_once(h: &History) -> Verdict {
    let mut by_step: BTreeMap<u64, Vec<&StepRecord>> = BTreeMap::new();
    for s in &h.steps {
        by_step.entry(s.step).or_default().push(s);
    }
    let mut problems = Vec::new();
    let mut incomplete = Vec::new();
    let mut adopted_steps = 0usize;
    for step in 1..=h.target_step {
        let Some(records) = by_step.get(&step) else {
            incomplete.push(step);
            continue;
        };
        let newest = records.iter().map(|r| r.generation).max().unwrap_or(0);
        let lineage: Vec<&&StepRecord> =
            records.iter().filter(|r| r.generation == newest).collect();
        // Per (stage, slot): the nodes that computed it (stage 0 without stages on
        // different nodes).
        let mut seen: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
        let mut nodes = BTreeSet::new();
        for r in &lineage {
            let want_cursor = (step - 1) * h.batch_size;
            if r.cursor != want_cursor {
                problems.push(format!(
                    "step {step}: node-{} read from sample {} instead of {want_cursor}",
                    r.node, r.cursor
                ));
            }
            if !nodes.insert(r.node) {
                problems.push(format!(
                    "step {step}: node-{} applied it twice in generation {newest}",
                    r.node
                ));
            }
            if r.param_hash != lineage[0].param_hash {
                problems.push(format!(
                    "step {step} generation {newest}: node-{} and node-{} hold different parameters",
                    lineage[0].node, r.node
                ));
            }
            for &slot in &r.slots {
                seen.entry((r.stage.unwrap_or(0), slot))
                    .or_default()
                    .push(r.node);
            }
        }
        for ((stage, slot), by) in &seen {
            if by.len() > 1 {
                let of = match names_stages(&lineage) {
                    true => format!(" of stage {stage}"),
                    false => String::new(),
                };
                problems.push(format!(
                    "step {step} generation {newest}: slot {slot}{of} computed {} times (nodes {by:?})",
                    by.len()
                ));
            }
            if *slot >= h.slots {
                problems.push(format!(
                    "step {step}: slot {slot} does not exist (a step has {} slots)",
                    h.slots
                ));
            }
        }
        // Every stage that logged the step (stage 0 always) computed every slot.
        let stages: BTreeSet<u32> = std::iter::once(0)
            .chain(lineage.iter().filter_map(|r| r.stage))
            .collect();
        if stages
            .iter()
            .any(|&st| (0..h.slots).any(|s| !seen.contains_key(&(st, s))))
        {
            // A member that computed its slots but failed before it applied the step
            // (its collective broke mid-way, or it was killed) logs nothing; if it copied
            // or loaded a state holding the step afterwards, its slots are accounted for.
            let first_t = lineage.iter().map(|r| r.t_ms).min().unwrap_or(0);
            let adopted = h.states.iter().any(|e| {
                !nodes.contains(&e.node)
                    && e.step >= step
                    && e.t_ms >= first_t
                    && matches!(e.how.as_str(), "copy" | "checkpoint")
            });
            if adopted {
                adopted_steps += 1;
            } else {
                incomplete.push(step);
            }
        }
    }
    let killed = process_faults(h);
    let allowed = killed * tenax_core::node::STEP_LINES_LOST_PER_KILL as usize;
    if incomplete.len() > allowed {
        problems.push(format!(
            "{} steps lack a slot's log line, more than the {killed} killed processes explain ({allowed} lines), and no member that missed them adopted a state holding them: {:?}",
            incomplete.len(),
            &incomplete[..incomplete.len().min(10)]
        ));
    }
    if problems.is_empty() {
        Verdict::held(format!(
            "{} steps x {} slots: each computed once by the surviving lineage at its cursor; {} steps lack the line of a member that then copied the state, {} that of a killed one",
            h.target_step,
            h.slots,
            adopted_steps,
            incomplete.len()
        ))
    } else {
        Verdict::violated(listed(&problems))
    }
}

fn no_stale_generation(h: &History) -> Verdict {
    let mut problems = Vec::new();
    for c in &h.commits {
        let current = h
            .plans
            .iter()
            .filter(|p| p.revision < c.revision)
            .map(|p| p.generation)
            .next_back();
        match current {
            Some(g) if g == c.generation => {}
            Some(g) => problems.push(format!(
                "checkpoint of step {} committed at revision {} by generation {} while generation {g} was current",
                c.step, c.revision, c.generation
            )),
            None => problems.push(format!(
                "checkpoint of step {} committed at revision {} before any plan",
                c.step, c.revision
            )),
        }
    }
    let mut newest: BTreeMap<usize, u64> = BTreeMap::new();
    for s in &h.steps {
        let n = newest.entry(s.node).or_insert(0);
        if s.generation < *n {
            problems.push(format!(
                "node-{} applied step {} in generation {} after it had applied steps in generation {n}",
                s.node, s.step, s.generation
            ));
        }
        *n = (*n).max(s.generation);
    }
    let mut hashes: BTreeMap<(u64, u64), &StepRecord> = BTreeMap::new();
    for s in &h.steps {
        match hashes.get(&(s.generation, s.step)) {
            Some(first) if first.param_hash != s.param_hash => problems.push(format!(
                "generation {} step {}: node-{} and node-{} applied different updates",
                s.generation, s.step, first.node, s.node
            )),
            Some(_) => {}
            None => {
                hashes.insert((s.generation, s.step), s);
            }
        }
    }
    if problems.is_empty() {
        Verdict::held(format!(
            "{} commits each in the generation current at their revision; {} plans; generations never went back on any node",
            h.commits.len(),
            h.plans.len()
        ))
    } else {
        Verdict::violated(listed(&problems))
    }
}

fn checkpoints_verify(h: &History) -> Verdict {
    let bad: Vec<String> = h
        .commits
        .iter()
        .filter(|c| c.verified != Some(true))
        .map(|c| match c.verified {
            Some(false) => format!("{} (step {}): {}", c.url, c.step, c.verify_error),
            _ => format!("{} (step {}): not verified", c.url, c.step),
        })
        .collect();
    if h.commits.is_empty() {
        Verdict::violated("no checkpoint was committed")
    } else if bad.is_empty() {
        Verdict::held(format!("{} committed checkpoints verify", h.commits.len()))
    } else {
        Verdict::violated(listed(&bad))
    }
}

fn steps_never_go_backwards(h: &History) -> Verdict {
    let mut problems = Vec::new();
    let mut explained = 0usize;
    for node in 0..h.nodes {
        let steps: Vec<&StepRecord> = h.steps.iter().filter(|s| s.node == node).collect();
        for w in steps.windows(2) {
            let (prev, next) = (w[0], w[1]);
            if next.step == prev.step + 1 {
                continue;
            }
            // A load or a copy between the two lines, to the state the next step starts from.
            let event = h.states.iter().any(|e| {
                e.node == node
                    && e.t_ms >= prev.t_ms
                    && e.t_ms <= next.t_ms
                    && e.step + 1 == next.step
                    && matches!(e.how.as_str(), "checkpoint" | "copy" | "init")
            });
            if event {
                explained += 1;
            } else {
                problems.push(format!(
                    "node-{node} went from step {} (generation {}) to step {} (generation {}) with no load or copy logged",
                    prev.step, prev.generation, next.step, next.generation
                ));
            }
        }
    }
    // The job's committed step never goes back either: a commit of a step at or below
    // one already committed means committed work was trained again.
    let mut committed: Option<(u64, u64)> = None;
    for c in &h.commits {
        if let Some((step, generation)) = committed {
            if c.step <= step {
                problems.push(format!(
                    "checkpoint of step {} committed by generation {} after generation {generation} had committed step {step}",
                    c.step, c.generation
                ));
            }
        }
        if committed.is_none_or(|(s, _)| c.step > s) {
            committed = Some((c.step, c.generation));
        }
    }
    if problems.is_empty() {
        Verdict::held(format!(
            "every node stepped by one; {explained} jumps each explained by a logged load or copy; {} commits in step order",
            h.commits.len()
        ))
    } else {
        Verdict::violated(listed(&problems))
    }
}

/// How long after a slow spell a plan that leaves the slow node out still counts as its
/// eviction.
const SLOW_GRACE_MS: u64 = 5_000;

fn no_healthy_member_evicted(h: &History) -> Verdict {
    let slow: Vec<_> = h.faults.iter().filter(|f| f.kind == "slow").collect();
    let mut problems = Vec::new();
    for f in &slow {
        let Some(node) = f.node else { continue };
        let id = format!("node-{node}");
        for w in h.plans.windows(2) {
            let (before, after) = (&w[0], &w[1]);
            if !before.members.contains(&id) || after.members.contains(&id) {
                continue;
            }
            // When the plan took effect: its first logged step (or the next one's).
            let seen = h.generation_seen_ms(after.generation).unwrap_or(u64::MAX);
            // Another fault that ended this node (kill, hang, partition) explains it.
            let other = h.faults.iter().any(|o| {
                o.kind != "slow"
                    && (o.node == Some(node) || o.node.is_none())
                    && o.start_ms <= seen
                    && seen <= o.end_ms.saturating_add(SLOW_GRACE_MS)
            });
            if !other && seen >= f.start_ms && seen <= f.end_ms.saturating_add(SLOW_GRACE_MS) {
                problems.push(format!(
                    "generation {} (revision {}) left out {id}, which was only slow ({})",
                    after.generation, after.revision, f.detail
                ));
            }
        }
    }
    if problems.is_empty() {
        Verdict::held(format!(
            "{} slow spells; no plan written during one left the slow node out",
            slow.len()
        ))
    } else {
        Verdict::violated(listed(&problems))
    }
}

fn final_params(h: &History) -> Verdict {
    match &h.final_params {
        Some(c) if c.identical => Verdict::held(c.detail.clone()),
        Some(c) => Verdict::violated(c.detail.clone()),
        None => Verdict::violated("the final parameters were not compared with a fault-free run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{CommitEntry, FinalComparison, InjectedFault, PlanEntry, StateRecord};
    use crate::scenario::ALL_INVARIANTS;

    /// Two nodes, 2 slots, batch 4, 4 steps in generation 1, a checkpoint of each even
    /// step: a clean history.
    fn clean() -> History {
        let mut steps = Vec::new();
        for step in 1..=4u64 {
            for node in 0..2usize {
                steps.push(StepRecord {
                    node,
                    step,
                    generation: 1,
                    cursor: (step - 1) * 4,
                    slots: vec![node as u64],
                    stage: None,
                    param_hash: format!("h{step}"),
                    t_ms: 1000 * step + node as u64,
                    loss: 3.0 - step as f64 * 0.1,
                });
            }
        }
        History {
            nodes: 2,
            target_step: 4,
            batch_size: 4,
            slots: 2,
            steps,
            states: (0..2)
                .map(|node| StateRecord {
                    node,
                    how: "init".into(),
                    step: 0,
                    t_ms: 500,
                })
                .collect(),
            plans: vec![PlanEntry {
                revision: 10,
                generation: 1,
                members: vec!["node-0".into(), "node-1".into()],
            }],
            commits: vec![2u64, 4]
                .into_iter()
                .enumerate()
                .map(|(i, step)| CommitEntry {
                    revision: 20 + i as i64,
                    step,
                    generation: 1,
                    url: format!("s3://b/ckpt/step-{step}"),
                    verified: Some(true),
                    verify_error: String::new(),
                })
                .collect(),
            faults: Vec::new(),
            final_params: Some(FinalComparison {
                identical: true,
                detail: "same bytes".into(),
            }),
            started_ms: 0,
            ended_ms: 5000,
            ..History::default()
        }
    }

    fn violated(h: &History) -> Vec<String> {
        check(h, ALL_INVARIANTS)
            .into_iter()
            .filter(|(_, v)| !v.is_held())
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn a_clean_history_holds_every_invariant() {
        let h = clean();
        let verdicts = check(&h, ALL_INVARIANTS);
        assert!(verdicts.values().all(Verdict::is_held), "{verdicts:#?}");
    }

    #[test]
    fn a_duplicated_slot_is_a_violation() {
        let mut h = clean();
        h.steps[5].slots = vec![0]; // node 1 also computes slot 0 of step 3
        assert_eq!(violated(&h), vec!["slots_exactly_once"]);
        let v = &check(&h, &["slots_exactly_once"])["slots_exactly_once"];
        assert!(v.evidence.contains("step 3"), "{}", v.evidence);
    }

    /// A pipeline's 2 stages on the 2 nodes: each computes both slots, once per stage.
    #[test]
    fn stages_on_different_nodes_compute_each_slot_once_per_stage() {
        let staged = || {
            let mut h = clean();
            for s in h.steps.iter_mut() {
                s.slots = vec![0, 1];
                s.stage = Some(s.node as u32);
            }
            h
        };
        assert!(violated(&staged()).is_empty(), "{:?}", violated(&staged()));
        // Both nodes claim stage 0 of step 3.
        let mut h = staged();
        h.steps[5].stage = Some(0);
        let v = &check(&h, &["slots_exactly_once"])["slots_exactly_once"];
        assert!(
            !v.is_held() && v.evidence.contains("of stage 0"),
            "{}",
            v.evidence
        );
        // Stage 1 of step 3 misses slot 1 (and nothing explains it).
        let mut h = staged();
        h.steps[5].slots = vec![0];
        assert_eq!(violated(&h), vec!["slots_exactly_once"]);
    }

    #[test]
    fn a_missing_line_is_explained_only_by_a_member_that_adopted_the_step() {
        let mut h = clean();
        // node 1 computed slot 1 of step 3, its collective broke, it logged nothing.
        h.steps.retain(|s| !(s.step == 3 && s.node == 1));
        for s in h.steps.iter_mut().filter(|s| s.step == 4) {
            s.generation = 2;
        }
        h.commits[1].generation = 2;
        h.commits[1].revision = 31;
        h.plans.push(PlanEntry {
            revision: 30,
            generation: 2,
            members: vec!["node-0".into(), "node-1".into()],
        });
        // Nothing explains it: the slot's line is missing and node 1 jumps from 2 to 4.
        assert_eq!(
            violated(&h),
            vec!["slots_exactly_once", "steps_never_go_backwards"]
        );
        // It copied the state of step 3 from node 0 before step 4.
        h.states.push(StateRecord {
            node: 1,
            how: "copy".into(),
            step: 3,
            t_ms: 3500,
        });
        assert!(violated(&h).is_empty(), "{:?}", violated(&h));
    }

    #[test]
    fn a_skipped_or_repeated_batch_is_a_violation() {
        let mut h = clean();
        for s in h.steps.iter_mut().filter(|s| s.step == 3) {
            s.cursor = 4; // step 3 reads step 2's samples again
        }
        assert_eq!(violated(&h), vec!["slots_exactly_once"]);
    }

    #[test]
    fn a_stale_generation_commit_is_a_violation() {
        let mut h = clean();
        h.plans.push(PlanEntry {
            revision: 20,
            generation: 2,
            members: vec!["node-0".into(), "node-1".into()],
        });
        // The checkpoint of step 4 (revision 21) still carries generation 1.
        let v = &check(&h, &["no_stale_generation"])["no_stale_generation"];
        assert!(!v.is_held());
        assert!(v.evidence.contains("step 4"), "{}", v.evidence);
    }

    #[test]
    fn a_step_from_an_older_generation_after_a_newer_one_is_a_violation() {
        let mut h = clean();
        for s in h.steps.iter_mut().filter(|s| s.step == 2 && s.node == 1) {
            s.generation = 2;
        }
        assert!(violated(&h).contains(&"no_stale_generation".to_string()));
    }

    #[test]
    fn a_step_going_backwards_is_a_violation_unless_a_load_explains_it() {
        let mut h = clean();
        // node 0 logs step 2 again after step 4 (alone, in a new generation), with
        // nothing in between.
        let mut again = h.steps[2].clone();
        again.t_ms = 6000;
        again.generation = 2;
        again.slots = vec![0, 1];
        h.steps.push(again);
        assert_eq!(violated(&h), vec!["steps_never_go_backwards"]);
        h.states.push(StateRecord {
            node: 0,
            how: "checkpoint".into(),
            step: 1,
            t_ms: 5500,
        });
        assert!(violated(&h).is_empty(), "{:?}", violated(&h));
    }

    #[test]
    fn a_commit_of_a_step_already_committed_is_a_violation() {
        let mut h = clean();
        // A node that was away trains the finished job again and commits step 4 twice.
        h.commits.push(CommitEntry {
            revision: 40,
            ..h.commits[1].clone()
        });
        assert_eq!(violated(&h), vec!["steps_never_go_backwards"]);
    }

    #[test]
    fn a_missing_target_a_failed_verify_and_different_final_params_are_violations() {
        let mut h = clean();
        h.commits.pop();
        h.commits[0].verified = Some(false);
        h.commits[0].verify_error = "shard 0: checksum".into();
        h.final_params = Some(FinalComparison {
            identical: false,
            detail: "differ at byte 7".into(),
        });
        assert_eq!(
            violated(&h),
            vec![
                "checkpoints_verify",
                "final_params_match_fault_free",
                "target_step_reached"
            ]
        );
    }

    #[test]
    fn a_slow_node_left_out_of_a_plan_is_a_violation_but_a_killed_one_is_not() {
        let mut h = clean();
        h.plans.push(PlanEntry {
            revision: 30,
            generation: 2,
            members: vec!["node-0".into()],
        });
        for s in h.steps.iter_mut().filter(|s| s.step == 4) {
            s.generation = 2;
        }
        h.steps.retain(|s| !(s.step == 4 && s.node == 1));
        h.commits[1].revision = 31;
        h.commits[1].generation = 2;
        h.faults.push(InjectedFault {
            index: 0,
            kind: "slow".into(),
            node: Some(1),
            nodes: vec![],
            start_ms: 3000,
            end_ms: 3500,
            detail: "SIGSTOP 400 ms of every 600".into(),
        });
        // A lost line of a killed member is allowed only with a kill; here it is slow.
        let v = violated(&h);
        assert!(
            v.contains(&"no_healthy_member_evicted".to_string()),
            "{v:?}"
        );
        h.faults.push(InjectedFault {
            index: 1,
            kind: "kill".into(),
            node: Some(1),
            nodes: vec![],
            start_ms: 3600,
            end_ms: 3700,
            detail: "SIGKILL".into(),
        });
        assert!(violated(&h).is_empty(), "{:?}", violated(&h));
    }

    /// A member killed with `kill -9` may leave the lines of its steps waiting for their
    /// hash unwritten, and its step in flight: at most STEP_LINES_LOST_PER_KILL per kill.
    #[test]
    fn a_killed_member_may_leave_its_last_lines_unwritten_up_to_the_bound() {
        let lost = tenax_core::node::STEP_LINES_LOST_PER_KILL;
        let with_lost = |n: u64| {
            let mut h = clean();
            h.target_step = lost + 1;
            h.steps = h
                .steps
                .iter()
                .filter(|s| s.step == 1)
                .cloned()
                .flat_map(|first| {
                    (1..=lost + 1).map(move |step| StepRecord {
                        step,
                        cursor: (step - 1) * 4,
                        param_hash: format!("h{step}"),
                        t_ms: 1000 * step + first.node as u64,
                        ..first.clone()
                    })
                })
                // node 1 was killed; its last `n` lines never reached the log.
                .filter(|s| !(s.node == 1 && s.step > lost + 1 - n))
                .collect();
            h.faults.push(InjectedFault {
                index: 0,
                kind: "kill".into(),
                node: Some(1),
                nodes: vec![],
                start_ms: 1000 * (lost + 1) + 500,
                end_ms: 1000 * (lost + 1) + 600,
                detail: "SIGKILL".into(),
            });
            check(&h, &["slots_exactly_once"])["slots_exactly_once"].clone()
        };
        assert!(with_lost(lost).is_held(), "{}", with_lost(lost).evidence);
        let v = with_lost(lost + 1);
        assert!(
            !v.is_held() && v.evidence.contains("1 killed processes"),
            "{}",
            v.evidence
        );
    }
}

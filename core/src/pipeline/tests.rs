use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::membership::rank_coords;

/// Parse `"rA0 F0 sA0 rG0 B0 sG0"` into ops (the `Display` form).
fn parse(s: &str) -> Vec<Op> {
    s.split_whitespace()
        .map(|w| {
            let split = w.find(|c: char| c.is_ascii_digit()).expect("op has a slot");
            let slot: u32 = w[split..].parse().expect("slot is a number");
            match &w[..split] {
                "rA" => Op::RecvActivation { slot },
                "F" => Op::Forward { slot },
                "sA" => Op::SendActivation { slot },
                "rG" => Op::RecvGrad { slot },
                "B" => Op::Backward { slot },
                "sG" => Op::SendGrad { slot },
                other => panic!("unknown op tag {other}"),
            }
        })
        .collect()
}

fn show(ops: &[Op]) -> String {
    ops.iter().map(Op::to_string).collect::<Vec<_>>().join(" ")
}

#[test]
fn schedule_names_round_trip() {
    let table: &[(&str, Option<Schedule>)] = &[
        ("gpipe", Some(Schedule::GPipe)),
        ("1f1b", Some(Schedule::OneFOneB)),
        ("GPipe", Some(Schedule::GPipe)),
        (" 1F1B ", Some(Schedule::OneFOneB)),
        ("pipedream", None),
        ("", None),
        ("1f1b-interleaved", None),
    ];
    for (name, want) in table {
        let got = name.parse::<Schedule>();
        match want {
            Some(k) => {
                assert_eq!(got.as_ref().ok(), Some(k), "{name:?}");
                assert_eq!(k.to_string().parse::<Schedule>().unwrap(), *k);
            }
            None => {
                let err = got.expect_err(name).to_string();
                assert!(err.contains(&format!("`{name}`")), "{err}");
                assert!(err.contains("gpipe") && err.contains("1f1b"), "{err}");
            }
        }
    }
    assert_eq!(Schedule::default(), Schedule::OneFOneB);
    assert_eq!(Schedule::GPipe.to_string(), "gpipe");
    assert_eq!(Schedule::OneFOneB.to_string(), "1f1b");
}

/// Hand-written op lists; the 1F1B ones are what Megatron-LM's non-interleaved loop
/// emits (warm-up `S - i - 1`, then `recv_forward`, then forward /
/// `send_forward_recv_backward` / backward / `send_backward_recv_forward`).
#[test]
fn op_lists_table() {
    let table: &[(Schedule, u32, u32, u32, &str)] = &[
        (Schedule::GPipe, 1, 0, 2, "F0 F1 B0 B1"),
        (Schedule::OneFOneB, 1, 0, 2, "F0 B0 F1 B1"),
        (Schedule::GPipe, 2, 0, 2, "F0 sA0 F1 sA1 rG0 B0 rG1 B1"),
        (Schedule::GPipe, 2, 1, 2, "rA0 F0 rA1 F1 B0 sG0 B1 sG1"),
        (
            Schedule::OneFOneB,
            2,
            0,
            3,
            "F0 sA0 F1 sA1 rG0 B0 F2 sA2 rG1 B1 rG2 B2",
        ),
        (
            Schedule::OneFOneB,
            2,
            1,
            3,
            "rA0 F0 B0 sG0 rA1 F1 B1 sG1 rA2 F2 B2 sG2",
        ),
        // Warm-up capped by M: all forwards first, like GPipe.
        (Schedule::OneFOneB, 3, 0, 2, "F0 sA0 F1 sA1 rG0 B0 rG1 B1"),
        (
            Schedule::OneFOneB,
            3,
            1,
            2,
            "rA0 F0 sA0 rA1 F1 sA1 rG0 B0 sG0 rG1 B1 sG1",
        ),
        (Schedule::OneFOneB, 3, 2, 2, "rA0 F0 B0 sG0 rA1 F1 B1 sG1"),
        (
            Schedule::OneFOneB,
            4,
            1,
            6,
            "rA0 F0 sA0 rA1 F1 sA1 rA2 F2 sA2 rG0 B0 sG0 rA3 F3 sA3 rG1 B1 sG1 \
             rA4 F4 sA4 rG2 B2 sG2 rA5 F5 sA5 rG3 B3 sG3 rG4 B4 sG4 rG5 B5 sG5",
        ),
        // No such stage, no slots: nothing to do.
        (Schedule::OneFOneB, 2, 2, 4, ""),
        (Schedule::GPipe, 2, 0, 0, ""),
        (Schedule::GPipe, 0, 0, 4, ""),
    ];
    for &(schedule, stages, stage, slots, want) in table {
        let ops = stage_ops(schedule, stages, stage, slots);
        assert_eq!(
            show(&ops),
            want,
            "{schedule} S={stages} stage {stage} M={slots}"
        );
        assert_eq!(ops, parse(want));
    }
}

/// The slots of the ops of one kind, in list order.
fn slots_of(ops: &[Op], kind: fn(Op) -> bool) -> Vec<u32> {
    ops.iter()
        .copied()
        .filter(|&o| kind(o))
        .map(Op::slot)
        .collect()
}

fn is_recv_a(o: Op) -> bool {
    matches!(o, Op::RecvActivation { .. })
}
fn is_send_a(o: Op) -> bool {
    matches!(o, Op::SendActivation { .. })
}
fn is_recv_g(o: Op) -> bool {
    matches!(o, Op::RecvGrad { .. })
}
fn is_send_g(o: Op) -> bool {
    matches!(o, Op::SendGrad { .. })
}
fn is_fwd(o: Op) -> bool {
    matches!(o, Op::Forward { .. })
}
fn is_bwd(o: Op) -> bool {
    matches!(o, Op::Backward { .. })
}

/// Every promise of [`stage_ops`] and [`simulate`] for one shape.
fn check_shape(schedule: Schedule, stages: u32, slots: u32, costs: &[Costs]) {
    let ctx = format!("{schedule} S={stages} M={slots}");
    let lists: Vec<Vec<Op>> = (0..stages)
        .map(|i| stage_ops(schedule, stages, i, slots))
        .collect();
    let all: Vec<u32> = (0..slots).collect();
    for (i, ops) in lists.iter().enumerate() {
        let i = i as u32;
        let (first, last) = (i == 0, i + 1 == stages);
        let ctx = format!("{ctx} stage {i}: {}", show(ops));
        // Each slot's forward and backward exactly once, both in slot order.
        assert_eq!(slots_of(ops, is_fwd), all, "{ctx}");
        assert_eq!(slots_of(ops, is_bwd), all, "{ctx}");
        // Communication only where a neighbour exists, once per slot, in slot order.
        let expect = |has: bool| if has { all.clone() } else { Vec::new() };
        assert_eq!(slots_of(ops, is_recv_a), expect(!first), "{ctx}");
        assert_eq!(slots_of(ops, is_send_g), expect(!first), "{ctx}");
        assert_eq!(slots_of(ops, is_send_a), expect(!last), "{ctx}");
        assert_eq!(slots_of(ops, is_recv_g), expect(!last), "{ctx}");
        // Nothing else: two computes per slot, two messages per slot per neighbour.
        let neighbours = u32::from(!first) + u32::from(!last);
        assert_eq!(ops.len() as u32, slots * (2 + 2 * neighbours), "{ctx}");
        // Forward before backward; each compute wrapped by its own receive and send.
        for slot in 0..slots {
            let at = |op: Op| ops.iter().position(|&o| o == op);
            let f = at(Op::Forward { slot }).unwrap();
            let b = at(Op::Backward { slot }).unwrap();
            assert!(f < b, "{ctx}: F{slot} at {f}, B{slot} at {b}");
            if !first {
                assert_eq!(at(Op::RecvActivation { slot }), Some(f - 1), "{ctx}");
                assert_eq!(at(Op::SendGrad { slot }), Some(b + 1), "{ctx}");
            }
            if !last {
                assert_eq!(at(Op::SendActivation { slot }), Some(f + 1), "{ctx}");
                assert_eq!(at(Op::RecvGrad { slot }), Some(b - 1), "{ctx}");
            }
        }
        // Peak in-flight activations as promised: M for GPipe, min(M, S - i) for 1F1B.
        let peak = peak_in_flight(ops);
        let promised = match schedule {
            Schedule::GPipe => slots,
            Schedule::OneFOneB => slots.min(stages - i),
        } as usize;
        assert_eq!(peak, promised, "{ctx}");
        assert_eq!(
            promised_peak_in_flight(schedule, stages, i, slots),
            promised,
            "{ctx}"
        );
    }
    // Every send has its receive on the neighbour: same count, same slot order.
    for i in 1..stages as usize {
        assert_eq!(
            slots_of(&lists[i - 1], is_send_a),
            slots_of(&lists[i], is_recv_a),
            "{ctx}: activations {}->{i}",
            i - 1
        );
        assert_eq!(
            slots_of(&lists[i], is_send_g),
            slots_of(&lists[i - 1], is_recv_g),
            "{ctx}: grads {i}->{}",
            i - 1
        );
    }
    // The simulation terminates with the closed-form makespan and bubble.
    for c in costs {
        let t = simulate(schedule, stages, slots, |op| c.ticks(op))
            .unwrap_or_else(|e| panic!("{ctx} {c:?}: {e}"));
        let (m, s) = (u64::from(slots), u64::from(stages));
        let per_slot = c.forward_ticks + c.backward_ticks;
        assert_eq!(t.makespan_ticks, (m + s - 1) * per_slot, "{ctx} {c:?}");
        assert_eq!(t.stages.len(), stages as usize, "{ctx}");
        for st in &t.stages {
            assert_eq!(st.compute_ticks, m * per_slot, "{ctx} {c:?}");
            assert_eq!(st.comm_ticks, 0, "{ctx} {c:?}");
            assert_eq!(st.idle_ticks, t.makespan_ticks - m * per_slot, "{ctx}");
            assert!(st.finish_tick <= t.makespan_ticks, "{ctx}");
        }
        if per_slot > 0 {
            let want = textbook_bubble_fraction(stages, slots);
            assert!(
                (t.bubble_fraction() - want).abs() < 1e-12,
                "{ctx} {c:?}: bubble {} vs {want}",
                t.bubble_fraction()
            );
        }
    }
}

const COSTS: [Costs; 4] = [
    Costs::UNIT,
    Costs::BACKWARD_TWICE,
    Costs {
        forward_ticks: 3,
        backward_ticks: 2,
        comm_ticks: 0,
    },
    Costs {
        forward_ticks: 2,
        backward_ticks: 5,
        comm_ticks: 0,
    },
];

/// The table: S in 1..=8, M in 1..=16, both schedules.
#[test]
fn schedules_keep_their_promises_for_every_small_shape() {
    for schedule in Schedule::ALL {
        for stages in 1..=8 {
            for slots in 1..=16 {
                check_shape(schedule, stages, slots, &COSTS);
            }
        }
    }
}

#[test]
fn one_f_one_b_holds_no_more_than_gpipe_and_less_once_m_exceeds_s() {
    for stages in 1..=8u32 {
        for slots in 1..=16u32 {
            for i in 0..stages {
                let g = peak_in_flight(&stage_ops(Schedule::GPipe, stages, i, slots));
                let o = peak_in_flight(&stage_ops(Schedule::OneFOneB, stages, i, slots));
                assert!(o <= g);
                assert_eq!(o < g, slots > stages - i, "S={stages} M={slots} i={i}");
            }
        }
    }
}

#[test]
fn peak_in_flight_table() {
    let table: &[(&str, usize)] = &[
        ("", 0),
        ("F0 B0 F1 B1", 1),
        ("F0 F1 B0 B1", 2),
        ("rA0 F0 sA0 rA1 F1 sA1 rA2 F2 sA2 rG0 B0 sG0 rA3 F3 sA3", 3),
        ("F0 F1 F2 B0 B1 F3 F4 F5", 4),
    ];
    for (ops, want) in table {
        assert_eq!(peak_in_flight(&parse(ops)), *want, "{ops}");
    }
}

#[test]
fn bubble_table() {
    // (schedule, S, M, costs, numerator, denominator)
    let table: &[(Schedule, u32, u32, Costs, u32, u32)] = &[
        (Schedule::GPipe, 2, 2, Costs::UNIT, 1, 3),
        (Schedule::GPipe, 2, 4, Costs::UNIT, 1, 5),
        (Schedule::GPipe, 2, 8, Costs::UNIT, 1, 9),
        (Schedule::OneFOneB, 2, 2, Costs::UNIT, 1, 3),
        (Schedule::OneFOneB, 2, 4, Costs::UNIT, 1, 5),
        (Schedule::OneFOneB, 2, 8, Costs::UNIT, 1, 9),
        (Schedule::GPipe, 2, 8, Costs::BACKWARD_TWICE, 1, 9),
        (Schedule::OneFOneB, 2, 8, Costs::BACKWARD_TWICE, 1, 9),
        (Schedule::OneFOneB, 4, 8, Costs::UNIT, 3, 11),
        (Schedule::GPipe, 8, 1, Costs::UNIT, 7, 8),
        (Schedule::OneFOneB, 1, 4, Costs::UNIT, 0, 1),
    ];
    for &(schedule, stages, slots, c, num, den) in table {
        let got = bubble_fraction(schedule, stages, slots, |op| c.ticks(op)).unwrap();
        let want = f64::from(num) / f64::from(den);
        assert!(
            (got - want).abs() < 1e-12,
            "{schedule} S={stages} M={slots} {c:?}: {got} vs {want}"
        );
    }
    assert!((bubble_fraction(Schedule::GPipe, 2, 4, unit_cost).unwrap() - 0.2).abs() < 1e-12);
}

/// Charts checked by hand against the textbook pictures.
#[test]
fn timeline_charts_table() {
    let table: &[(Schedule, u32, u32, &str)] = &[
        (
            Schedule::GPipe,
            2,
            2,
            "stage 0: F0 F1 .  .  B0 B1\n\
             stage 1: .  F0 F1 B0 B1 .",
        ),
        (
            Schedule::OneFOneB,
            3,
            4,
            "stage 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3\n\
             stage 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .\n\
             stage 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .",
        ),
    ];
    for &(schedule, stages, slots, want) in table {
        let t = simulate(schedule, stages, slots, unit_cost).unwrap();
        let chart: Vec<String> = t
            .chart()
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect();
        assert_eq!(chart.join("\n"), want, "{schedule} S={stages} M={slots}");
    }
    // Spans: a receive starts once its message is there.
    let t = simulate(Schedule::GPipe, 2, 2, unit_cost).unwrap();
    let rg0 = t.stages[0]
        .spans
        .iter()
        .find(|s| s.op == Op::RecvGrad { slot: 0 })
        .unwrap();
    assert_eq!((rg0.start_tick, rg0.end_tick), (4, 4));
    assert_eq!(t.stages[1].finish_tick, 5);
    assert_eq!(t.stages[1].idle_ticks, 2);
}

#[test]
fn communication_ticks_occupy_both_ends_and_count_as_bubble() {
    let c = Costs {
        forward_ticks: 1,
        backward_ticks: 1,
        comm_ticks: 1,
    };
    let t = simulate(Schedule::GPipe, 2, 1, |op| c.ticks(op)).unwrap();
    // F0 [0,1) sA0 [1,2) | rA0 [2,3) F0 [3,4) B0 [4,5) sG0 [5,6) | rG0 [6,7) B0 [7,8)
    assert_eq!(t.makespan_ticks, 8);
    assert_eq!(t.stages[0].comm_ticks, 2);
    assert_eq!(t.stages[1].comm_ticks, 2);
    assert!((t.bubble_fraction() - 0.75).abs() < 1e-12);
}

#[test]
fn simulator_rejects_bad_op_lists() {
    type Check = fn(&SimulationError) -> bool;
    let table: &[(&str, &[&str], Check, &str)] = &[
        (
            "receiving the gradient before sending the activation",
            &["F0 rG0 sA0 B0", "rA0 F0 B0 sG0"],
            |e| matches!(e, SimulationError::Deadlock { .. }),
            "stage 0 waits at rG0 (op 2 of 4); stage 1 waits at rA0 (op 1 of 4)",
        ),
        (
            "a warm-up one short and the next activation received before the gradient is sent",
            &["F0 sA0 rG0 B0 F1 sA1 rG1 B1", "rA0 F0 B0 rA1 sG0 F1 B1 sG1"],
            |e| matches!(e, SimulationError::Deadlock { .. }),
            "stage 0 waits at rG0",
        ),
        (
            "activations sent out of slot order",
            &["F0 F1 sA1 sA0 rG0 B0 rG1 B1", "rA0 F0 rA1 F1 B0 sG0 B1 sG1"],
            |e| {
                matches!(
                    e,
                    SimulationError::WrongSlot {
                        stage: 1,
                        index: 0,
                        got: 1,
                        ..
                    }
                )
            },
            "next message on that link is for slot 1",
        ),
        (
            "the first stage receiving activations",
            &["rA0 F0 B0"],
            |e| {
                matches!(
                    e,
                    SimulationError::NoNeighbour {
                        stage: 0,
                        index: 0,
                        ..
                    }
                )
            },
            "has no such neighbour",
        ),
        (
            "the last stage sending activations",
            &["F0 sA0 rG0 B0", "rA0 F0 sA0 B0 sG0"],
            |e| {
                matches!(
                    e,
                    SimulationError::NoNeighbour {
                        stage: 1,
                        index: 2,
                        ..
                    }
                )
            },
            "stage 1 of 2 has op sA0",
        ),
        (
            "a send nobody receives",
            &["F0 sA0 B0", "F0 B0"],
            |e| matches!(e, SimulationError::Unreceived { .. }),
            "activations 0->1: slot(s) 0",
        ),
    ];
    for (what, lists, check, text) in table {
        let ops: Vec<Vec<Op>> = lists.iter().map(|l| parse(l)).collect();
        let err = simulate_ops(&ops, unit_cost).expect_err(what);
        assert!(check(&err), "{what}: {err:?}");
        assert!(err.to_string().contains(text), "{what}: {err}");
    }
    for (stages, slots) in [(0, 4), (2, 0)] {
        assert_eq!(
            simulate(Schedule::GPipe, stages, slots, unit_cost).unwrap_err(),
            SimulationError::EmptyShape { stages, slots }
        );
    }
    // The same lists in the right order run.
    let ok = [parse("F0 sA0 rG0 B0"), parse("rA0 F0 B0 sG0")];
    assert_eq!(simulate_ops(&ok, unit_cost).unwrap().makespan_ticks, 4);
}

#[test]
fn split_blocks_table() {
    /// `(L, S, the ranges as (start, end) or the error)`.
    type Row = (u32, u32, Result<&'static [(u32, u32)], PipelineError>);
    let table: &[Row] = &[
        (12, 4, Ok(&[(0, 3), (3, 6), (6, 9), (9, 12)])),
        (10, 4, Ok(&[(0, 3), (3, 6), (6, 8), (8, 10)])),
        (7, 3, Ok(&[(0, 3), (3, 5), (5, 7)])),
        (5, 5, Ok(&[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)])),
        (1, 1, Ok(&[(0, 1)])),
        (12, 1, Ok(&[(0, 12)])),
        (3, 0, Err(PipelineError::NoStages)),
        (
            2,
            3,
            Err(PipelineError::MoreStagesThanBlocks {
                stages: 3,
                blocks: 2,
            }),
        ),
        (
            0,
            1,
            Err(PipelineError::MoreStagesThanBlocks {
                stages: 1,
                blocks: 0,
            }),
        ),
    ];
    for (blocks, stages, want) in table {
        let got = split_blocks(*blocks, *stages);
        let want = want
            .clone()
            .map(|r| r.iter().map(|&(a, b)| a..b).collect::<Vec<_>>());
        assert_eq!(got, want, "L={blocks} S={stages}");
    }
}

fn config(pipelines: u32, stages: u32, blocks: u32, slots: u32) -> PipelineConfig {
    PipelineConfig {
        pipelines,
        stages,
        blocks,
        slots,
        schedule: Schedule::OneFOneB,
    }
}

#[test]
fn plan_errors_table() {
    let table: &[(PipelineConfig, u32, PipelineError, &str)] = &[
        (
            config(1, 0, 4, 4),
            0,
            PipelineError::NoStages,
            "must be at least 1",
        ),
        (
            config(0, 2, 4, 4),
            0,
            PipelineError::NoPipelines,
            "0 pipelines",
        ),
        (
            config(1, 2, 4, 0),
            2,
            PipelineError::NoSlots,
            "at least 1 slot",
        ),
        (
            config(1, 5, 4, 4),
            5,
            PipelineError::MoreStagesThanBlocks {
                stages: 5,
                blocks: 4,
            },
            "use at most 4 stage(s)",
        ),
        (
            config(2, 3, 6, 4),
            4,
            PipelineError::WorldMismatch {
                pipelines: 2,
                stages: 3,
                grid: 6,
                world: 4,
            },
            "2 pipeline(s) x 3 stage(s) = 6 rank(s), but the world has 4",
        ),
        (
            config(u32::MAX, 2, 4, 4),
            u32::MAX,
            PipelineError::WorldMismatch {
                pipelines: u32::MAX,
                stages: 2,
                grid: 2 * u64::from(u32::MAX),
                world: u32::MAX,
            },
            "but the world has",
        ),
    ];
    for (cfg, world, want, text) in table {
        let err = PipelinePlan::new(*cfg, *world).unwrap_err();
        assert_eq!(&err, want, "{cfg:?} world {world}");
        assert!(err.to_string().contains(text), "{err}");
    }
}

#[test]
fn plan_of_two_pipelines_of_two_stages() {
    let plan = PipelinePlan::new(config(2, 2, 5, 4), 4).unwrap();
    assert_eq!(plan.world(), 4);
    assert_eq!(
        plan.layers(),
        &[
            StageLayers {
                stage: 0,
                blocks: 0..3,
                embeddings: true,
                head: false
            },
            StageLayers {
                stage: 1,
                blocks: 3..5,
                embeddings: false,
                head: true
            },
        ]
    );
    assert_eq!(plan.stage_layers(2), None);
    // rank -> (pipeline, stage), data-parallel groups, pipelines, neighbours.
    /// `(rank, pipeline, stage, prev, next)`.
    type Row = (u32, u32, u32, Option<u32>, Option<u32>);
    let table: &[Row] = &[
        (0, 0, 0, None, Some(1)),
        (1, 0, 1, Some(0), None),
        (2, 1, 0, None, Some(3)),
        (3, 1, 1, Some(2), None),
    ];
    for &(rank, pipeline, stage, prev, next) in table {
        let pos = GridPos { pipeline, stage };
        assert_eq!(plan.position(rank), Some(pos));
        assert_eq!(plan.rank(pos), Some(rank));
        assert_eq!(plan.neighbours(rank), Some(Neighbours { prev, next }));
        assert_eq!(
            plan.ops(rank),
            stage_ops(Schedule::OneFOneB, 2, stage, 4),
            "rank {rank}"
        );
    }
    assert_eq!(plan.data_parallel_group(0), vec![0, 2]);
    assert_eq!(plan.data_parallel_group(1), vec![1, 3]);
    assert_eq!(plan.data_parallel_group(2), Vec::<u32>::new());
    assert_eq!(plan.pipeline_ranks(1), vec![2, 3]);
    assert_eq!(plan.pipeline_ranks(2), Vec::<u32>::new());
    assert_eq!(plan.position(4), None);
    assert_eq!(plan.neighbours(4), None);
    assert!(plan.ops(4).is_empty());
    assert_eq!(
        plan.rank(GridPos {
            pipeline: 2,
            stage: 0
        }),
        None
    );
    assert_eq!(
        plan.rank(GridPos {
            pipeline: 0,
            stage: 2
        }),
        None
    );
    let reason = plan.reason();
    for part in [
        "2 pipeline(s) x 2 stage(s) = 4 rank(s)",
        "the first 1 stage(s) one more",
        "stage 0: embeddings + blocks 0..3",
        "stage 1: blocks 3..5 + final norm, head, loss",
        "1f1b over 4 slot(s), peak in-flight activations per stage 2, 1",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
}

#[test]
fn a_single_stage_holds_everything() {
    let plan = PipelinePlan::new(config(3, 1, 4, 2), 3).unwrap();
    assert_eq!(
        plan.layers(),
        &[StageLayers {
            stage: 0,
            blocks: 0..4,
            embeddings: true,
            head: true
        }]
    );
    assert_eq!(plan.data_parallel_group(0), vec![0, 1, 2]);
    assert_eq!(
        plan.neighbours(1),
        Some(Neighbours {
            prev: None,
            next: None
        })
    );
    assert_eq!(show(&plan.ops(2)), "F0 B0 F1 B1");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Larger shapes and random uniform costs keep every promise.
    #[test]
    fn schedules_keep_their_promises(
        one_f_one_b in any::<bool>(),
        stages in 1u32..=24,
        slots in 1u32..=48,
        f in 0u64..6,
        b in 0u64..6,
    ) {
        let schedule = if one_f_one_b { Schedule::OneFOneB } else { Schedule::GPipe };
        let c = Costs { forward_ticks: f, backward_ticks: b, comm_ticks: 0 };
        check_shape(schedule, stages, slots, &[c]);
    }

    /// The split covers every block exactly once, contiguously, balanced, larger first.
    #[test]
    fn split_blocks_is_contiguous_and_balanced(blocks in 1u32..500, stages_seed in 1u32..500) {
        let stages = 1 + (stages_seed - 1) % blocks;
        let ranges = split_blocks(blocks, stages).unwrap();
        prop_assert_eq!(ranges.len(), stages as usize);
        prop_assert_eq!(ranges[0].start, 0);
        prop_assert_eq!(ranges[ranges.len() - 1].end, blocks);
        for w in ranges.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
            prop_assert!(w[0].len() >= w[1].len());
        }
        let min = ranges.iter().map(|r| r.len()).min().unwrap();
        let max = ranges.iter().map(|r| r.len()).max().unwrap();
        prop_assert!(min >= 1 && max - min <= 1);
        let covered: Vec<u32> = ranges.iter().flat_map(|r| r.clone()).collect();
        prop_assert_eq!(covered, (0..blocks).collect::<Vec<_>>());
    }

    /// Ranks and (pipeline, stage) are in bijection; groups partition the ranks;
    /// neighbours are consistent; and the grid agrees with membership's convention.
    #[test]
    fn rank_grid_is_a_bijection(pipelines in 1u32..40, stages in 1u32..40, extra in 0u32..5) {
        let world = pipelines * stages;
        let plan = PipelinePlan::new(config(pipelines, stages, stages + extra, 3), world).unwrap();
        let mut seen = BTreeSet::new();
        for rank in 0..world {
            let pos = plan.position(rank).unwrap();
            prop_assert!(pos.pipeline < pipelines && pos.stage < stages);
            prop_assert_eq!(plan.rank(pos), Some(rank));
            prop_assert_eq!((pos.pipeline, pos.stage), rank_coords(rank, stages));
            prop_assert!(seen.insert(pos), "two ranks at {:?}", pos);
            let n = plan.neighbours(rank).unwrap();
            prop_assert_eq!(n.prev.is_none(), pos.stage == 0);
            prop_assert_eq!(n.next.is_none(), pos.stage + 1 == stages);
            if let Some(next) = n.next {
                prop_assert_eq!(plan.neighbours(next).unwrap().prev, Some(rank));
                prop_assert_eq!(plan.position(next).unwrap().pipeline, pos.pipeline);
            }
        }
        prop_assert_eq!(seen.len() as u32, world);
        for pipeline in 0..pipelines {
            for stage in 0..stages {
                let rank = plan.rank(GridPos { pipeline, stage }).unwrap();
                prop_assert!(rank < world);
                prop_assert_eq!(plan.position(rank), Some(GridPos { pipeline, stage }));
            }
        }
        prop_assert_eq!(plan.position(world), None);
        let mut by_dp: Vec<u32> = (0..stages).flat_map(|s| plan.data_parallel_group(s)).collect();
        let mut by_pipe: Vec<u32> = (0..pipelines).flat_map(|p| plan.pipeline_ranks(p)).collect();
        by_dp.sort_unstable();
        by_pipe.sort_unstable();
        prop_assert_eq!(&by_dp, &(0..world).collect::<Vec<_>>());
        prop_assert_eq!(&by_pipe, &(0..world).collect::<Vec<_>>());
        for s in 0..stages {
            let group = plan.data_parallel_group(s);
            prop_assert_eq!(group.len() as u32, pipelines);
            for r in group {
                prop_assert_eq!(plan.position(r).unwrap().stage, s);
            }
        }
    }
}

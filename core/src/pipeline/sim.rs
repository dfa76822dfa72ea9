//! A pure simulator of a pipeline step: every stage runs its op list, blocking at each
//! receive until the neighbour's matching send is done, and the result is each stage's
//! busy and idle ticks and the makespan.

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::schedule::{stage_ops, Op, Schedule};

/// Ticks per op kind, the cost model of [`simulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Costs {
    /// Ticks of one `Forward` on any stage.
    pub forward_ticks: u64,
    /// Ticks of one `Backward` on any stage.
    pub backward_ticks: u64,
    /// Ticks of one send or receive (0: free, instant messages).
    pub comm_ticks: u64,
}

impl Costs {
    /// The textbook unit model: forward 1, backward 1, communication free.
    pub const UNIT: Costs = Costs {
        forward_ticks: 1,
        backward_ticks: 1,
        comm_ticks: 0,
    };

    /// The usual transformer model: a backward costs two forwards, communication free.
    pub const BACKWARD_TWICE: Costs = Costs {
        forward_ticks: 1,
        backward_ticks: 2,
        comm_ticks: 0,
    };

    /// The ticks `op` takes under this model.
    pub fn ticks(&self, op: Op) -> u64 {
        match op {
            Op::Forward { .. } => self.forward_ticks,
            Op::Backward { .. } => self.backward_ticks,
            _ => self.comm_ticks,
        }
    }
}

/// The unit cost function: [`Costs::UNIT`] as a plain `fn`.
pub fn unit_cost(op: Op) -> u64 {
    Costs::UNIT.ticks(op)
}

/// One op as it ran: it occupied its stage over `start_tick..end_tick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The op.
    pub op: Op,
    /// When the stage started it (for a receive: once the message was there).
    pub start_tick: u64,
    /// When it was done.
    pub end_tick: u64,
}

/// What one stage did during a simulated step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimeline {
    /// Ticks spent in forwards and backwards.
    pub compute_ticks: u64,
    /// Ticks spent in sends and receives (after the message arrived).
    pub comm_ticks: u64,
    /// Ticks of the makespan the stage neither computed nor communicated: waiting at
    /// a receive, or done before the slowest stage. `compute + comm + idle = makespan`.
    pub idle_ticks: u64,
    /// When the stage's last op was done.
    pub finish_tick: u64,
    /// Every op in the order it ran.
    pub spans: Vec<Span>,
}

/// The result of [`simulate`]: one step of every stage of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// One entry per stage, stage 0 first.
    pub stages: Vec<StageTimeline>,
    /// When the last stage to finish was done (all stages start at tick 0).
    pub makespan_ticks: u64,
}

impl Timeline {
    /// The share of stage-ticks not spent computing: `1 - sum(compute) / (S x
    /// makespan)`. Communication counts as bubble (a stage that sends is not
    /// computing). 0 for an empty timeline.
    pub fn bubble_fraction(&self) -> f64 {
        let total = self.makespan_ticks as f64 * self.stages.len() as f64;
        if total == 0.0 {
            return 0.0;
        }
        let compute: u64 = self.stages.iter().map(|s| s.compute_ticks).sum();
        1.0 - compute as f64 / total
    }

    /// A text chart, one row per stage, one column per tick: the compute op running
    /// in that tick (`F3`, `B3`), or `.` when the stage is not computing.
    pub fn chart(&self) -> String {
        let label = |op: Op| op.to_string();
        let width = self
            .stages
            .iter()
            .flat_map(|s| s.spans.iter())
            .filter(|s| s.op.is_compute())
            .map(|s| label(s.op).len())
            .max()
            .unwrap_or(1);
        let mut out = String::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let mut cells = vec![".".to_string(); self.makespan_ticks as usize];
            for span in stage.spans.iter().filter(|s| s.op.is_compute()) {
                for t in span.start_tick..span.end_tick {
                    cells[t as usize] = label(span.op);
                }
            }
            let _ = write!(out, "stage {i}:");
            for c in cells {
                let _ = write!(out, " {c:<width$}");
            }
            out.push('\n');
        }
        out
    }
}

/// Why a simulation could not run or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulationError {
    /// No stages or no slots: there is no step to simulate.
    #[error("cannot simulate {stages} stage(s) x {slots} slot(s): both must be at least 1")]
    EmptyShape {
        /// Stages asked for.
        stages: u32,
        /// Slots asked for.
        slots: u32,
    },
    /// An op talks to a neighbour the stage does not have (stage 0 receiving
    /// activations, the last stage sending them, ...).
    #[error(
        "stage {stage} of {stages} has op {op} at position {index}, but has no such neighbour"
    )]
    NoNeighbour {
        /// The stage.
        stage: u32,
        /// Stages in the pipeline.
        stages: u32,
        /// The op.
        op: Op,
        /// Its position in the stage's list.
        index: usize,
    },
    /// A receive got the neighbour's next message, which is for another slot.
    #[error("stage {stage} expected {op} at position {index}, but the next message on that link is for slot {got}")]
    WrongSlot {
        /// The receiving stage.
        stage: u32,
        /// The receive.
        op: Op,
        /// Its position in the stage's list.
        index: usize,
        /// The slot of the message that arrived.
        got: u32,
    },
    /// Every unfinished stage waits at a receive whose message is never sent.
    #[error("deadlock: {blocked}")]
    Deadlock {
        /// Each waiting stage and the receive it waits at.
        blocked: String,
    },
    /// All stages finished but some sent messages were never received.
    #[error("messages never received: {left}")]
    Unreceived {
        /// Each link with messages left over, and their slots.
        left: String,
    },
}

/// Which link a message travels on.
#[derive(Clone, Copy)]
enum Link {
    /// Activations from stage `k` to `k + 1`, indexed by `k`.
    Activation(usize),
    /// Gradients from stage `k + 1` to `k`, indexed by `k`.
    Grad(usize),
}

/// Simulate one step of `schedule` on `stages` stages over `slots` slots, each op
/// taking `cost(op)` ticks.
///
/// See [`simulate_ops`] for the execution model. With [`Costs::UNIT`] (forward 1,
/// backward 1, communication 0) or any uniform costs `f` and `b` with `b >= f` and
/// free communication, both schedules have makespan `(M + S - 1) x (f + b)` and
/// bubble fraction `(S - 1) / (M + S - 1)` (see the module docs).
pub fn simulate(
    schedule: Schedule,
    stages: u32,
    slots: u32,
    cost: impl Fn(Op) -> u64,
) -> Result<Timeline, SimulationError> {
    if stages == 0 || slots == 0 {
        return Err(SimulationError::EmptyShape { stages, slots });
    }
    let lists: Vec<Vec<Op>> = (0..stages)
        .map(|s| stage_ops(schedule, stages, s, slots))
        .collect();
    simulate_ops(&lists, cost)
}

/// The bubble fraction ([`Timeline::bubble_fraction`]) of one simulated step.
pub fn bubble_fraction(
    schedule: Schedule,
    stages: u32,
    slots: u32,
    cost: impl Fn(Op) -> u64,
) -> Result<f64, SimulationError> {
    Ok(simulate(schedule, stages, slots, cost)?.bubble_fraction())
}

/// The textbook bubble fraction `(S - 1) / (M + S - 1)` (0 with no stages or slots).
pub fn textbook_bubble_fraction(stages: u32, slots: u32) -> f64 {
    if stages == 0 || slots == 0 {
        return 0.0;
    }
    f64::from(stages - 1) / (f64::from(slots) + f64::from(stages) - 1.0)
}

/// Run arbitrary per-stage op lists (`ops[i]` is stage `i`'s) to completion.
///
/// Execution model: every stage starts at tick 0 and runs its ops in order, each for
/// `cost(op)` ticks. A send never blocks: its message is available to the neighbour
/// from the send's end tick on. A receive blocks until the next message on its link
/// (links are FIFO, one per direction per neighbour pair) is available, then takes
/// its own ticks; that message must be for the receive's slot. Because each stage is
/// sequential and each link is FIFO, the ticks do not depend on the order in which the
/// simulator visits stages, so the result is deterministic.
///
/// Fails when an op names a neighbour the stage lacks, a receive gets another slot's
/// message, every unfinished stage waits forever (deadlock), or messages are left
/// unreceived at the end.
pub fn simulate_ops(
    ops: &[Vec<Op>],
    cost: impl Fn(Op) -> u64,
) -> Result<Timeline, SimulationError> {
    let n = ops.len();
    let stages_u32 = n as u32;
    // Per link: FIFO of (slot, tick the message is available).
    let links = n.saturating_sub(1);
    let mut activations: Vec<VecDeque<(u32, u64)>> = vec![VecDeque::new(); links];
    let mut grads: Vec<VecDeque<(u32, u64)>> = vec![VecDeque::new(); links];
    let mut pc = vec![0usize; n];
    let mut clock = vec![0u64; n];
    let mut out: Vec<StageTimeline> = (0..n)
        .map(|_| StageTimeline {
            compute_ticks: 0,
            comm_ticks: 0,
            idle_ticks: 0,
            finish_tick: 0,
            spans: Vec::new(),
        })
        .collect();

    // The link an op uses and whether it sends, or `None` for compute.
    let link_of = |stage: usize,
                   index: usize,
                   op: Op|
     -> Result<Option<(Link, bool)>, SimulationError> {
        let no = || SimulationError::NoNeighbour {
            stage: stage as u32,
            stages: stages_u32,
            op,
            index,
        };
        let has_next = stage + 1 < n;
        Ok(match op {
            Op::Forward { .. } | Op::Backward { .. } => None,
            Op::RecvActivation { .. } => Some((
                Link::Activation(stage.checked_sub(1).ok_or_else(no)?),
                false,
            )),
            Op::SendGrad { .. } => Some((Link::Grad(stage.checked_sub(1).ok_or_else(no)?), true)),
            Op::SendActivation { .. } if has_next => Some((Link::Activation(stage), true)),
            Op::RecvGrad { .. } if has_next => Some((Link::Grad(stage), false)),
            Op::SendActivation { .. } | Op::RecvGrad { .. } => return Err(no()),
        })
    };

    loop {
        let mut progressed = false;
        for s in 0..n {
            while pc[s] < ops[s].len() {
                let index = pc[s];
                let op = ops[s][index];
                let ticks = cost(op);
                let start = match link_of(s, index, op)? {
                    None => clock[s],
                    Some((link, true)) => {
                        let queue = match link {
                            Link::Activation(k) => &mut activations[k],
                            Link::Grad(k) => &mut grads[k],
                        };
                        queue.push_back((op.slot(), clock[s] + ticks));
                        clock[s]
                    }
                    Some((link, false)) => {
                        let queue = match link {
                            Link::Activation(k) => &mut activations[k],
                            Link::Grad(k) => &mut grads[k],
                        };
                        let Some(&(got, available)) = queue.front() else {
                            break; // blocked until the neighbour sends
                        };
                        if got != op.slot() {
                            return Err(SimulationError::WrongSlot {
                                stage: s as u32,
                                op,
                                index,
                                got,
                            });
                        }
                        queue.pop_front();
                        clock[s].max(available)
                    }
                };
                let end = start + ticks;
                let stage = &mut out[s];
                if op.is_compute() {
                    stage.compute_ticks += ticks;
                } else {
                    stage.comm_ticks += ticks;
                }
                stage.spans.push(Span {
                    op,
                    start_tick: start,
                    end_tick: end,
                });
                clock[s] = end;
                pc[s] += 1;
                progressed = true;
            }
        }
        if (0..n).all(|s| pc[s] == ops[s].len()) {
            break;
        }
        if !progressed {
            let blocked: Vec<String> = (0..n)
                .filter(|&s| pc[s] < ops[s].len())
                .map(|s| {
                    format!(
                        "stage {s} waits at {} (op {} of {})",
                        ops[s][pc[s]],
                        pc[s] + 1,
                        ops[s].len()
                    )
                })
                .collect();
            return Err(SimulationError::Deadlock {
                blocked: blocked.join("; "),
            });
        }
    }

    let mut left = Vec::new();
    for k in 0..links {
        for (name, queue) in [("activations", &activations[k]), ("grads", &grads[k])] {
            if !queue.is_empty() {
                let slots: Vec<String> = queue.iter().map(|(slot, _)| slot.to_string()).collect();
                let (from, to) = if name == "activations" {
                    (k, k + 1)
                } else {
                    (k + 1, k)
                };
                left.push(format!("{name} {from}->{to}: slot(s) {}", slots.join(", ")));
            }
        }
    }
    if !left.is_empty() {
        return Err(SimulationError::Unreceived {
            left: left.join("; "),
        });
    }

    let makespan_ticks = clock.iter().copied().max().unwrap_or(0);
    for (s, stage) in out.iter_mut().enumerate() {
        stage.finish_tick = clock[s];
        stage.idle_ticks = makespan_ticks - stage.compute_ticks - stage.comm_ticks;
    }
    Ok(Timeline {
        stages: out,
        makespan_ticks,
    })
}

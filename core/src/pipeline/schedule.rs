//! Per-stage op lists of the GPipe and 1F1B schedules, and the activations they hold.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which pipeline schedule a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Schedule {
    /// Fill and drain: every slot's forward, then every slot's backward (slot order both
    /// times). Each stage holds the activations of all M slots at its peak.
    GPipe,
    /// One forward, one backward (PipeDream-flush; Megatron-LM's non-interleaved
    /// schedule): stage `i` runs `min(M, S - i)` warm-up forwards, then alternates one
    /// backward and one forward, then drains the remaining backwards. It holds at most
    /// `min(M, S - i)` slots' activations at a time.
    #[default]
    OneFOneB,
}

impl Schedule {
    /// Both schedules, for tables and tests.
    pub const ALL: [Schedule; 2] = [Schedule::GPipe, Schedule::OneFOneB];

    /// The name used on the command line and in configs: `gpipe` or `1f1b`.
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A schedule name that is neither `gpipe` nor `1f1b`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pipeline schedule `{name}`: use `gpipe` or `1f1b`")]
pub struct UnknownSchedule {
    /// The name given.
    pub name: String,
}

impl FromStr for Schedule {
    type Err = UnknownSchedule;

    /// Parses `gpipe` or `1f1b` (ASCII case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Schedule::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownSchedule {
                name: s.to_string(),
            })
    }
}

/// One operation of a stage, on one micro-batch slot.
///
/// Activations flow from stage `i` to stage `i + 1`, gradients from `i + 1` to `i`. The
/// first stage has no `RecvActivation`/`SendGrad` (it reads tokens and ends the
/// backward), the last stage no `SendActivation`/`RecvGrad` (it computes the loss and
/// starts the backward from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Wait for the slot's input activations from stage `i - 1`.
    RecvActivation {
        /// The micro-batch slot.
        slot: u32,
    },
    /// Run the stage's forward on the slot; its activations stay held until its backward.
    Forward {
        /// The micro-batch slot.
        slot: u32,
    },
    /// Send the slot's output activations to stage `i + 1`.
    SendActivation {
        /// The micro-batch slot.
        slot: u32,
    },
    /// Wait for the gradient of the slot's output from stage `i + 1`.
    RecvGrad {
        /// The micro-batch slot.
        slot: u32,
    },
    /// Run the stage's backward on the slot, releasing its held activations.
    Backward {
        /// The micro-batch slot.
        slot: u32,
    },
    /// Send the gradient of the slot's input to stage `i - 1`.
    SendGrad {
        /// The micro-batch slot.
        slot: u32,
    },
}

impl Op {
    /// The slot the op works on.
    pub fn slot(self) -> u32 {
        match self {
            Op::RecvActivation { slot }
            | Op::Forward { slot }
            | Op::SendActivation { slot }
            | Op::RecvGrad { slot }
            | Op::Backward { slot }
            | Op::SendGrad { slot } => slot,
        }
    }

    /// Whether the op is compute (a forward or a backward) rather than communication.
    pub fn is_compute(self) -> bool {
        matches!(self, Op::Forward { .. } | Op::Backward { .. })
    }
}

impl fmt::Display for Op {
    /// Short form for timelines and reasons: `F3`, `B3`, `rA3`, `sA3`, `rG3`, `sG3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self {
            Op::RecvActivation { .. } => "rA",
            Op::Forward { .. } => "F",
            Op::SendActivation { .. } => "sA",
            Op::RecvGrad { .. } => "rG",
            Op::Backward { .. } => "B",
            Op::SendGrad { .. } => "sG",
        };
        write!(f, "{tag}{}", self.slot())
    }
}

/// The ops stage `stage` of a `stages`-deep pipeline runs for one step of `slots`
/// micro-batch slots, in order.
///
/// Every forward is wrapped as `RecvActivation, Forward, SendActivation` and every
/// backward as `RecvGrad, Backward, SendGrad` (the ends of the pipeline omit what does
/// not apply). Sends are emitted right after the compute that produces them and a
/// receive right before the compute that needs it, so Megatron-LM's fused
/// `send_forward_recv_backward` is `SendActivation` then `RecvGrad` here, and
/// `send_backward_recv_forward` is `SendGrad` then `RecvActivation`. With unbounded
/// sends and blocking receives no stage ever waits on a message that a waiting stage
/// has yet to send (see the module docs; [`super::simulate`] checks it).
///
/// A stage outside `0..stages`, or `slots == 0`, has nothing to do: the list is empty.
/// Plans validate their shape first ([`super::PipelinePlan::new`]).
pub fn stage_ops(schedule: Schedule, stages: u32, stage: u32, slots: u32) -> Vec<Op> {
    if stage >= stages || slots == 0 {
        return Vec::new();
    }
    let first = stage == 0;
    let last = stage + 1 == stages;
    let mut ops = Vec::with_capacity(6 * slots as usize);
    let forward = |ops: &mut Vec<Op>, slot: u32| {
        if !first {
            ops.push(Op::RecvActivation { slot });
        }
        ops.push(Op::Forward { slot });
        if !last {
            ops.push(Op::SendActivation { slot });
        }
    };
    let backward = |ops: &mut Vec<Op>, slot: u32| {
        if !last {
            ops.push(Op::RecvGrad { slot });
        }
        ops.push(Op::Backward { slot });
        if !first {
            ops.push(Op::SendGrad { slot });
        }
    };
    match schedule {
        Schedule::GPipe => {
            for slot in 0..slots {
                forward(&mut ops, slot);
            }
            for slot in 0..slots {
                backward(&mut ops, slot);
            }
        }
        Schedule::OneFOneB => {
            // PyTorch's Schedule1F1B counts the warm-up as min(M, S - i) forwards;
            // Megatron-LM counts min(M, S - i - 1) and runs the next forward at the top
            // of its steady loop. The op sequence is the same.
            let warmup = slots.min(stages - stage);
            for slot in 0..warmup {
                forward(&mut ops, slot);
            }
            // Steady state: one backward, then one forward, while forwards remain.
            let mut next_forward = warmup;
            for slot in 0..slots {
                backward(&mut ops, slot);
                if next_forward < slots {
                    forward(&mut ops, next_forward);
                    next_forward += 1;
                }
            }
        }
    }
    ops
}

/// The most slots whose activations `ops` holds at once: +1 at each `Forward`, -1 at
/// each `Backward`.
pub fn peak_in_flight(ops: &[Op]) -> usize {
    let mut held: usize = 0;
    let mut peak = 0;
    for op in ops {
        match op {
            Op::Forward { .. } => {
                held += 1;
                peak = peak.max(held);
            }
            Op::Backward { .. } => held = held.saturating_sub(1),
            _ => {}
        }
    }
    peak
}

/// The peak a schedule promises at `stage`: `slots` for GPipe, `min(slots, stages -
/// stage)` for 1F1B (0 outside the pipeline or with no slots).
pub fn promised_peak_in_flight(schedule: Schedule, stages: u32, stage: u32, slots: u32) -> usize {
    if stage >= stages {
        return 0;
    }
    let peak = match schedule {
        Schedule::GPipe => slots,
        Schedule::OneFOneB => slots.min(stages - stage),
    };
    peak as usize
}

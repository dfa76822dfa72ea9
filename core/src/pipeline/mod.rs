//! Pipeline parallelism as pure decisions: the schedules each stage runs, what they cost,
//! and the plan of D pipelines x S stages.
//!
//! - [`stage_ops`]: the op list of one stage for one step of M micro-batch slots under a
//!   [`Schedule`] (GPipe or 1F1B): [`Op::Forward`] and [`Op::Backward`] per slot, with
//!   explicit [`Op::RecvActivation`]/[`Op::SendActivation`] (from stage `i - 1`, to stage
//!   `i + 1`) and [`Op::RecvGrad`]/[`Op::SendGrad`] (from `i + 1`, to `i - 1`); the first
//!   and last stage omit what does not apply. [`peak_in_flight`] counts the activations a
//!   list holds at once (+1 at a forward, -1 at its backward).
//! - [`simulate`] / [`simulate_ops`]: run every stage's list with blocking receives and
//!   non-blocking sends under a cost per op, giving each stage's compute, communication
//!   and idle ticks and the makespan ([`Timeline`]); [`bubble_fraction`] from it.
//! - [`PipelinePlan`]: a validated [`PipelineConfig`] (D, S, L blocks, M, schedule)
//!   against the number of ranks: the contiguous blocks each stage holds
//!   ([`split_blocks`], [`StageLayers`]), the rank grid ([`grid_position`],
//!   [`grid_rank`]), each stage's data-parallel group and each rank's pipeline
//!   [`Neighbours`], and a reason string.
//!
//! # Schedules, and where their order comes from
//!
//! Both schedules run forwards in slot order and backwards in slot order, so each
//! stage's slot gradients come out in the order the exact reduction folds them.
//!
//! - GPipe follows PyTorch's `ScheduleGPipe` (`torch/distributed/pipelining/
//!   schedules.py`): every slot's receive-forward-send, then every slot's
//!   receive-backward-send, slots `0..M` both times.
//! - 1F1B follows Megatron-LM's `forward_backward_pipelining_without_interleaving`
//!   (`megatron/core/pipeline_parallel/schedules.py`) and PyTorch's `Schedule1F1B`,
//!   which give the same op sequence. Stage `i` runs `W = min(M, S - i)` warm-up forwards
//!   (PyTorch's `warmup_chunks`; Megatron counts `min(M, S - i - 1)` and runs the next
//!   forward at the top of its steady loop), then repeats "one backward, then one
//!   forward while forwards remain", then drains the remaining backwards. Megatron's
//!   fused `send_forward_recv_backward` becomes `SendActivation` then `RecvGrad`, and
//!   `send_backward_recv_forward` becomes `SendGrad` then `RecvActivation`: a send is
//!   placed right after the compute that produced it, a receive right before the
//!   compute that needs it. Peak in-flight activations: `M` for GPipe, `min(M, S - i)`
//!   at stage `i` for 1F1B.
//!
//! # Why no deadlock
//!
//! Sends never block, so a stage can only wait at a receive. GPipe: stage `i` receives
//! forward `k` after stage `i - 1` sent it (which needs only earlier forwards), and
//! receives gradient `k` once stage `i + 1` ran all its forwards and backwards `<= k`.
//! 1F1B: stage `i` runs its backward `k` after `min(M, W_i + k)` forwards and, in the
//! steady phase, its forward `j` right after its backward `j - W_i`. Its `RecvGrad(k)`
//! waits on stage `i + 1`'s backward `k`, which needs `min(M, W_{i+1} + k)` activations
//! from stage `i`: no more than stage `i` has already sent, since `W_{i+1} <= W_i`. Its
//! `RecvActivation(j)` waits on stage `i - 1`'s forward `j`, which follows that stage's
//! backward `j - W_{i-1} <= j - W_i - 1`, whose gradient stage `i` sent before its
//! forward `j`. Every wait is thus on an op the other stage reaches without waiting
//! back, and by induction over the slots nothing waits forever. [`simulate_ops`]
//! reports a deadlock instead of hanging, and the tests run every shape S in 1..=8,
//! M in 1..=16 through it.
//!
//! # Cost model and the bubble
//!
//! [`simulate`] takes `cost(op)` in ticks. Under [`Costs`] with uniform forward `f` and
//! backward `b` ticks on every stage and free communication (`comm_ticks = 0`,
//! messages usable the tick they are sent), both schedules take
//!
//! ```text
//! makespan = (M + S - 1) x (f + b)        bubble = 1 - M (f + b) / makespan = (S - 1) / (M + S - 1)
//! ```
//!
//! for any `f, b`: [`Costs::UNIT`] (f = b = 1, the textbook figure) and
//! [`Costs::BACKWARD_TWICE`] (f = 1, b = 2) give the same fraction. 1F1B does not
//! shrink the bubble; it bounds the activations held. A nonzero `comm_ticks` occupies
//! both the sender and the receiver for that long and counts as bubble; no closed form
//! is claimed for it. With S = 2 the simulated bubble is 1/3, 1/5 and 1/9 for M = 2, 4
//! and 8, for both schedules.
//!
//! # Layers and ranks
//!
//! [`split_blocks`]: every stage gets `L / S` contiguous blocks and the first `L % S`
//! stages one more (sizes differ by at most one); stage 0 also holds the embeddings,
//! the last stage the final layer norm, the head and the loss. S must not exceed L.
//!
//! Ranks are pipeline-major: `rank = pipeline x S + stage`, the convention of
//! [`crate::membership::rank_coords`] (replica `r / S`, stage `r % S`), which this module
//! reuses so a membership plan and a pipeline plan never disagree. One pipeline is a run
//! of consecutive ranks (a member hosting consecutive ranks hosts whole pipelines, and
//! the per-slot activation traffic stays inside it); the data-parallel group of stage
//! `s` is `s, s + S, s + 2S, ..`, which reduces once per step. Megatron-LM's default
//! order puts the pipeline outermost instead (data-parallel ranks consecutive), for
//! tensor-parallel locality that tenax does not have.
//!
//! Nothing here does I/O, reads a clock or spawns a thread.

mod plan;
mod schedule;
mod sim;

pub use plan::{
    grid_position, grid_rank, split_blocks, GridPos, Neighbours, PipelineConfig, PipelineError,
    PipelinePlan, StageLayers,
};
pub use schedule::{
    peak_in_flight, promised_peak_in_flight, stage_ops, Op, Schedule, UnknownSchedule,
};
pub use sim::{
    bubble_fraction, simulate, simulate_ops, textbook_bubble_fraction, unit_cost, Costs,
    SimulationError, Span, StageTimeline, Timeline,
};

#[cfg(test)]
mod tests;

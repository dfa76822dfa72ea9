//! The plan of D pipelines x S stages: which blocks each stage holds, where each rank
//! sits in the grid, its data-parallel group and its pipeline neighbours.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::schedule::{peak_in_flight, stage_ops, Op, Schedule};
use crate::membership::rank_coords;

/// Errors in the shape of a pipeline plan. Each names the value and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// S = 0.
    #[error("a pipeline of 0 stages: the stage count (--pipeline-stages) must be at least 1")]
    NoStages,
    /// D = 0.
    #[error("0 pipelines: the data-parallel width must be at least 1")]
    NoPipelines,
    /// M = 0.
    #[error("0 micro-batch slots per step: a step needs at least 1 slot")]
    NoSlots,
    /// S > L: some stage would hold no transformer block.
    #[error("{stages} stages for a model of {blocks} block(s): use at most {blocks} stage(s) (each stage holds at least one block)")]
    MoreStagesThanBlocks {
        /// Stages asked for.
        stages: u32,
        /// Transformer blocks in the model.
        blocks: u32,
    },
    /// D x S differs from the number of ranks.
    #[error("{pipelines} pipeline(s) x {stages} stage(s) = {grid} rank(s), but the world has {world}: the rank count must be the data-parallel width times the stage count")]
    WorldMismatch {
        /// Pipelines D.
        pipelines: u32,
        /// Stages S.
        stages: u32,
        /// D x S.
        grid: u64,
        /// Ranks available.
        world: u32,
    },
}

/// The shape of a pipelined job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// Pipelines D: the data-parallel width (each pipeline holds a whole model).
    pub pipelines: u32,
    /// Stages S per pipeline.
    pub stages: u32,
    /// Transformer blocks L of the model.
    pub blocks: u32,
    /// Micro-batch slots M one pipeline runs per step.
    pub slots: u32,
    /// The schedule every stage runs.
    pub schedule: Schedule,
}

/// What one stage holds of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLayers {
    /// The stage, in `0..S`.
    pub stage: u32,
    /// Its contiguous transformer blocks (never empty).
    pub blocks: Range<u32>,
    /// Whether it holds the token and position embeddings (stage 0).
    pub embeddings: bool,
    /// Whether it holds the final layer norm, the head and the loss (stage S - 1).
    pub head: bool,
}

/// Where a rank sits in the D x S grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GridPos {
    /// The pipeline (data-parallel replica), in `0..D`.
    pub pipeline: u32,
    /// The stage, in `0..S`.
    pub stage: u32,
}

/// A rank's neighbours within its own pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbours {
    /// The rank of stage `s - 1` (it sends activations here, receives gradients back);
    /// `None` at stage 0.
    pub prev: Option<u32>,
    /// The rank of stage `s + 1` (activations go there, gradients come back); `None`
    /// at the last stage.
    pub next: Option<u32>,
}

/// The `(pipeline, stage)` of `rank` in a grid of `stages` stages: `rank = pipeline x S
/// + stage`, the convention of [`crate::membership::rank_coords`] (`stages` at least 1).
pub fn grid_position(rank: u32, stages: u32) -> GridPos {
    let (pipeline, stage) = rank_coords(rank, stages);
    GridPos { pipeline, stage }
}

/// The rank at `pos` in a grid of `stages` stages, or `None` when `pos.stage` is out of
/// range or the rank does not fit in a `u32`.
pub fn grid_rank(pos: GridPos, stages: u32) -> Option<u32> {
    if pos.stage >= stages {
        return None;
    }
    pos.pipeline.checked_mul(stages)?.checked_add(pos.stage)
}

/// The contiguous block ranges of `stages` stages over `blocks` blocks, stage 0 first.
///
/// Balanced: every stage gets `L / S` blocks and the first `L % S` stages one more, so
/// sizes differ by at most one and the ranges cover `0..L` in order. The embeddings
/// (stage 0) and the head and loss (last stage) are not counted; a cost-weighted split
/// would give the ends fewer blocks, but the even split keeps resume-across-S simple.
pub fn split_blocks(blocks: u32, stages: u32) -> Result<Vec<Range<u32>>, PipelineError> {
    if stages == 0 {
        return Err(PipelineError::NoStages);
    }
    if stages > blocks {
        return Err(PipelineError::MoreStagesThanBlocks { stages, blocks });
    }
    let base = blocks / stages;
    let extra = blocks % stages;
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + u32::from(s < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// A validated plan of D pipelines x S stages: the layers of each stage, the rank grid
/// and each stage's op list.
///
/// Ranks are laid out pipeline-major, `rank = pipeline x S + stage`, as in
/// [`crate::membership::Plan`] (replica `r / S`, stage `r % S`), so the two never
/// disagree. A pipeline is then a run of consecutive ranks: a member that hosts several
/// consecutive ranks hosts whole pipelines, and the per-slot activation and gradient
/// traffic (every slot, both directions) stays inside it, while the data-parallel
/// group of a stage (`s, s + S, s + 2S, ..`) meets once per step for the reduce.
///
/// It serializes (for status and logs) but does not deserialize: a plan is always
/// rebuilt from its [`PipelineConfig`] through [`PipelinePlan::new`], so it is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelinePlan {
    /// The validated shape.
    config: PipelineConfig,
    /// One entry per stage.
    layers: Vec<StageLayers>,
    /// Why this plan: grid, split and schedule in words.
    reason: String,
}

impl PipelinePlan {
    /// Validate `config` against `world` ranks and lay out the plan.
    ///
    /// Errors: S = 0, D = 0, M = 0, S > L, D x S != world (checked in that order).
    pub fn new(config: PipelineConfig, world: u32) -> Result<Self, PipelineError> {
        let PipelineConfig {
            pipelines,
            stages,
            blocks,
            slots,
            schedule,
        } = config;
        if stages == 0 {
            return Err(PipelineError::NoStages);
        }
        if pipelines == 0 {
            return Err(PipelineError::NoPipelines);
        }
        if slots == 0 {
            return Err(PipelineError::NoSlots);
        }
        let ranges = split_blocks(blocks, stages)?;
        let grid = u64::from(pipelines) * u64::from(stages);
        if grid != u64::from(world) {
            return Err(PipelineError::WorldMismatch {
                pipelines,
                stages,
                grid,
                world,
            });
        }
        let layers: Vec<StageLayers> = ranges
            .into_iter()
            .enumerate()
            .map(|(s, blocks)| StageLayers {
                stage: s as u32,
                blocks,
                embeddings: s == 0,
                head: s as u32 + 1 == stages,
            })
            .collect();
        let split: Vec<String> = layers
            .iter()
            .map(|l| {
                let mut parts = Vec::new();
                if l.embeddings {
                    parts.push("embeddings".to_string());
                }
                parts.push(format!("blocks {}..{}", l.blocks.start, l.blocks.end));
                if l.head {
                    parts.push("final norm, head, loss".to_string());
                }
                format!("stage {}: {}", l.stage, parts.join(" + "))
            })
            .collect();
        let peaks: Vec<String> = (0..stages)
            .map(|s| peak_in_flight(&stage_ops(schedule, stages, s, slots)).to_string())
            .collect();
        let reason = format!(
            "{pipelines} pipeline(s) x {stages} stage(s) = {world} rank(s), rank = pipeline * {stages} + stage; \
             {blocks} block(s) split evenly, the first {} stage(s) one more; {}; \
             {schedule} over {slots} slot(s), peak in-flight activations per stage {}",
            blocks % stages,
            split.join("; "),
            peaks.join(", "),
        );
        Ok(PipelinePlan {
            config,
            layers,
            reason,
        })
    }

    /// The validated shape.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Number of ranks: D x S.
    pub fn world(&self) -> u32 {
        self.config.pipelines * self.config.stages
    }

    /// What every stage holds, stage 0 first.
    pub fn layers(&self) -> &[StageLayers] {
        &self.layers
    }

    /// What `stage` holds, or `None` outside `0..S`.
    pub fn stage_layers(&self, stage: u32) -> Option<&StageLayers> {
        self.layers.get(stage as usize)
    }

    /// Where `rank` sits, or `None` outside `0..world`.
    pub fn position(&self, rank: u32) -> Option<GridPos> {
        (rank < self.world()).then(|| grid_position(rank, self.config.stages))
    }

    /// The rank at `pos`, or `None` outside the grid.
    pub fn rank(&self, pos: GridPos) -> Option<u32> {
        if pos.pipeline >= self.config.pipelines {
            return None;
        }
        grid_rank(pos, self.config.stages)
    }

    /// The data-parallel group of `stage`: the ranks holding it in every pipeline,
    /// ascending (empty outside `0..S`). Their gradients are reduced together.
    pub fn data_parallel_group(&self, stage: u32) -> Vec<u32> {
        (0..self.config.pipelines)
            .filter_map(|pipeline| self.rank(GridPos { pipeline, stage }))
            .collect()
    }

    /// The ranks of `pipeline`, stage 0 first (empty outside `0..D`).
    pub fn pipeline_ranks(&self, pipeline: u32) -> Vec<u32> {
        (0..self.config.stages)
            .filter_map(|stage| self.rank(GridPos { pipeline, stage }))
            .collect()
    }

    /// The pipeline neighbours of `rank`, or `None` outside `0..world`.
    pub fn neighbours(&self, rank: u32) -> Option<Neighbours> {
        let pos = self.position(rank)?;
        let at = |stage: Option<u32>| {
            stage.and_then(|stage| {
                self.rank(GridPos {
                    pipeline: pos.pipeline,
                    stage,
                })
            })
        };
        Some(Neighbours {
            prev: at(pos.stage.checked_sub(1)),
            next: at(pos.stage.checked_add(1)),
        })
    }

    /// The op list `rank` runs each step (empty outside `0..world`).
    pub fn ops(&self, rank: u32) -> Vec<Op> {
        match self.position(rank) {
            Some(pos) => stage_ops(
                self.config.schedule,
                self.config.stages,
                pos.stage,
                self.config.slots,
            ),
            None => Vec::new(),
        }
    }

    /// Why this plan: the grid, the split and the schedule's peaks, in words.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

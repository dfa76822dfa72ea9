//! Checkpoint planning for sharded checkpoints, as pure functions.
//!
//! Training state is a set of named f32 tensors (model parameters such as
//! `h.00.attn.c_attn.weight` and optimizer moments such as
//! `adamw.m.h.00.attn.c_attn.weight`). With data parallelism several ranks hold identical
//! replicas of a tensor; with pipeline parallelism a rank holds only its stage's tensors.
//! Slices are always row ranges along dimension 0 (a scalar counts as one row).
//!
//! - [`save_plan`]: which rank writes which row range of which tensor into which shard
//!   file, so that every row is written exactly once, by a rank that holds it, and the
//!   writers of each replica group carry about the same number of elements.
//! - [`check_tiling`] and [`load_plan`]: check that what was saved covers every tensor
//!   exactly, and work out which rows of which file each rank of a (possibly different)
//!   layout reads; [`replicated_needs`] is the data-parallel case where every rank needs
//!   every tensor whole.
//! - [`retention`]: which checkpoint folders to keep and which to delete, each decision
//!   with a human reason.
//!
//! Nothing here does I/O or reads a clock: the current time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Errors in a save plan, a set of saved slices or a load plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A tensor to save has an empty name.
    #[error("a tensor of shape {shape:?} has an empty name: every saved tensor needs a name")]
    EmptyName {
        /// Global shape of the unnamed tensor.
        shape: Vec<usize>,
    },
    /// Two tensors to save share a name.
    #[error("tensor `{tensor}` is listed twice: tensor names must be unique")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
    },
    /// A tensor to save has no rank that holds it.
    #[error("tensor `{tensor}` has no holder: at least one rank must hold it to save it")]
    NoHolders {
        /// The tensor nobody holds.
        tensor: String,
    },
    /// Two saved slices of one tensor disagree on its global shape.
    #[error("tensor `{tensor}` has global shape {shape:?} in `{file}` but {other_shape:?} in `{other_file}`")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// File of the first slice.
        file: String,
        /// Global shape recorded with the first slice.
        shape: Vec<usize>,
        /// File of the disagreeing slice.
        other_file: String,
        /// Global shape recorded with the disagreeing slice.
        other_shape: Vec<usize>,
    },
    /// A saved slice's rows are not a range within the tensor.
    #[error("tensor `{tensor}` in `{file}` claims rows {start}..{end}, but the tensor has rows 0..{rows}")]
    SliceOutOfRange {
        /// The tensor.
        tensor: String,
        /// File holding the slice.
        file: String,
        /// First row of the slice.
        start: usize,
        /// One past the last row of the slice.
        end: usize,
        /// Rows of the tensor.
        rows: usize,
    },
    /// Some rows of a tensor are in no saved slice.
    #[error("tensor `{tensor}` rows {start}..{end} were saved in no file")]
    Gap {
        /// The tensor.
        tensor: String,
        /// First missing row.
        start: usize,
        /// One past the last missing row.
        end: usize,
    },
    /// Some rows of a tensor are in two saved slices.
    #[error(
        "tensor `{tensor}` rows {start}..{end} were saved in both `{file}` and `{other_file}`"
    )]
    Overlap {
        /// The tensor.
        tensor: String,
        /// One file holding the rows.
        file: String,
        /// The other file holding the rows.
        other_file: String,
        /// First row saved twice.
        start: usize,
        /// One past the last row saved twice.
        end: usize,
    },
    /// A rank needs a tensor that the checkpoint does not hold.
    #[error("rank {rank} needs tensor `{tensor}`, which this checkpoint did not save")]
    NotSaved {
        /// The rank that needs it.
        rank: u32,
        /// The missing tensor.
        tensor: String,
    },
    /// A rank needs rows that are not a range within the tensor.
    #[error(
        "rank {rank} needs rows {start}..{end} of tensor `{tensor}`, which has rows 0..{rows}"
    )]
    NeedOutOfRange {
        /// The rank that needs it.
        rank: u32,
        /// The tensor.
        tensor: String,
        /// First needed row.
        start: usize,
        /// One past the last needed row.
        end: usize,
        /// Rows of the tensor.
        rows: usize,
    },
}

/// A named tensor with its full (global) shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name, e.g. `h.00.attn.c_attn.weight`.
    pub name: String,
    /// Full (global) shape.
    pub shape: Vec<usize>,
}

/// A half-open range of rows along dimension 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRange {
    /// First row.
    pub start: usize,
    /// One past the last row.
    pub end: usize,
}

impl RowRange {
    /// Number of rows (0 for an empty or inverted range).
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Number of rows of a shape for slicing: `shape[0]`, or 1 for a scalar (shape `[]`).
pub fn rows_of(shape: &[usize]) -> usize {
    shape.first().copied().unwrap_or(1)
}

/// Elements per row: product of `shape[1..]` (1 for a scalar or a 1-D tensor).
pub fn row_elems(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

/// Elements of a tensor of this shape (1 for a scalar).
fn elem_count(shape: &[usize]) -> u64 {
    rows_of(shape) as u64 * row_elems(shape) as u64
}

/// One row range of one tensor that a writer saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSlice {
    /// Tensor name.
    pub tensor: String,
    /// Global shape of the tensor.
    pub shape: Vec<usize>,
    /// Rows of the tensor this writer saves.
    pub rows: RowRange,
}

/// Everything one rank writes, into one shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterShard {
    /// The writing rank.
    pub writer: u32,
    /// Shard file name, [`shard_file_name`] of the writer.
    pub file: String,
    /// Slices to write, in tensor name order, at most one per tensor.
    pub slices: Vec<PlannedSlice>,
}

/// Who writes what: one shard per writer with something to write, sorted by writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavePlan {
    /// Shards sorted by writer; a writer with nothing to write has no shard.
    pub shards: Vec<WriterShard>,
}

/// File name of a writer's shard: `format!("shard-{writer:05}.safetensors")`.
pub fn shard_file_name(writer: u32) -> String {
    format!("shard-{writer:05}.safetensors")
}

/// Plans a sharded save. Each tensor comes with the ranks that hold an identical copy of it.
///
/// Tensors are grouped by holder set (sorted, deduplicated ranks). Within a group the
/// tensors, in name order, are laid end to end by element count (`T` elements in all);
/// holder `k` of `n` (in rank order) writes the elements between cut `k` and cut `k + 1`,
/// where cut `k` is the row boundary nearest to `k * T / n` (rounded down; ties go to the
/// lower boundary), cut 0 is 0 and cut `n` is `T`. So every row is written exactly once,
/// by a holder; each writer writes at most one contiguous row range per tensor; and each
/// writer's element count is within `max_row_elems + 1` of `T / n`. Zero-element tensors
/// are written whole by the group's first holder; a scalar is one row.
pub fn save_plan(held: &[(TensorSpec, Vec<u32>)]) -> Result<SavePlan, PlanError> {
    let mut names = BTreeSet::new();
    let mut groups: BTreeMap<Vec<u32>, Vec<&TensorSpec>> = BTreeMap::new();
    for (spec, holders) in held {
        if spec.name.is_empty() {
            return Err(PlanError::EmptyName {
                shape: spec.shape.clone(),
            });
        }
        if !names.insert(spec.name.as_str()) {
            return Err(PlanError::DuplicateTensor {
                tensor: spec.name.clone(),
            });
        }
        let mut holders = holders.clone();
        holders.sort_unstable();
        holders.dedup();
        if holders.is_empty() {
            return Err(PlanError::NoHolders {
                tensor: spec.name.clone(),
            });
        }
        groups.entry(holders).or_default().push(spec);
    }

    let mut by_writer: BTreeMap<u32, Vec<PlannedSlice>> = BTreeMap::new();
    for (holders, mut specs) in groups {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        for (writer, slice) in plan_group(&holders, &specs) {
            by_writer.entry(writer).or_default().push(slice);
        }
    }
    let shards = by_writer
        .into_iter()
        .map(|(writer, mut slices)| {
            slices.sort_by(|a, b| a.tensor.cmp(&b.tensor));
            WriterShard {
                writer,
                file: shard_file_name(writer),
                slices,
            }
        })
        .collect();
    Ok(SavePlan { shards })
}

/// Splits one holder group (tensors in name order, holders sorted and non-empty).
fn plan_group(holders: &[u32], specs: &[&TensorSpec]) -> Vec<(u32, PlannedSlice)> {
    let elems: Vec<u64> = specs.iter().map(|s| elem_count(&s.shape)).collect();
    let mut offsets = Vec::with_capacity(specs.len());
    let mut total = 0u64;
    for &e in &elems {
        offsets.push(total);
        total += e;
    }
    let n = holders.len() as u64;
    let mut cuts = Vec::with_capacity(holders.len() + 1);
    cuts.push(0u64);
    for k in 1..n {
        let target = (u128::from(k) * u128::from(total) / u128::from(n)) as u64;
        cuts.push(nearest_boundary(target, total, &offsets, specs));
    }
    cuts.push(total);

    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if elems[i] == 0 {
            out.push((
                holders[0],
                PlannedSlice {
                    tensor: spec.name.clone(),
                    shape: spec.shape.clone(),
                    rows: RowRange {
                        start: 0,
                        end: rows_of(&spec.shape),
                    },
                },
            ));
            continue;
        }
        let per_row = row_elems(&spec.shape) as u64;
        let (lo, hi) = (offsets[i], offsets[i] + elems[i]);
        for (k, &holder) in holders.iter().enumerate() {
            let a = cuts[k].max(lo);
            let b = cuts[k + 1].min(hi);
            if a < b {
                out.push((
                    holder,
                    PlannedSlice {
                        tensor: spec.name.clone(),
                        shape: spec.shape.clone(),
                        rows: RowRange {
                            start: ((a - lo) / per_row) as usize,
                            end: ((b - lo) / per_row) as usize,
                        },
                    },
                ));
            }
        }
    }
    out
}

/// The row boundary (in the group's element layout) nearest to `target`; ties go low.
fn nearest_boundary(target: u64, total: u64, offsets: &[u64], specs: &[&TensorSpec]) -> u64 {
    if target >= total {
        return total;
    }
    // The last tensor starting at or before `target`: a zero-element tensor shares its
    // offset with the tensor after it, so this is the non-empty tensor holding `target`.
    let i = offsets.partition_point(|&o| o <= target) - 1;
    let per_row = row_elems(&specs[i].shape) as u64;
    let lo = offsets[i] + (target - offsets[i]) / per_row * per_row;
    let hi = lo + per_row;
    if target - lo <= hi - target {
        lo
    } else {
        hi
    }
}

/// One saved row range of one tensor, as recorded in a checkpoint manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSlice {
    /// Tensor name.
    pub tensor: String,
    /// Global shape of the tensor.
    pub shape: Vec<usize>,
    /// File that holds the slice.
    pub file: String,
    /// Rows of the tensor the file holds.
    pub rows: RowRange,
}

/// The saved slices grouped by tensor name, each group sorted by (start, end, file).
fn by_tensor(saved: &[SavedSlice]) -> BTreeMap<&str, Vec<&SavedSlice>> {
    let mut map: BTreeMap<&str, Vec<&SavedSlice>> = BTreeMap::new();
    for s in saved {
        map.entry(s.tensor.as_str()).or_default().push(s);
    }
    for slices in map.values_mut() {
        slices.sort_by(|a, b| {
            (a.rows.start, a.rows.end, &a.file).cmp(&(b.rows.start, b.rows.end, &b.file))
        });
    }
    map
}

/// Checks that the saved slices of every tensor tile its rows exactly: same global shape
/// in every slice, no gap, no overlap, rows within range. Empty slices cover nothing and
/// are allowed anywhere within range.
pub fn check_tiling(saved: &[SavedSlice]) -> Result<(), PlanError> {
    for (tensor, slices) in by_tensor(saved) {
        let first = slices[0];
        for s in &slices {
            if s.shape != first.shape {
                return Err(PlanError::ShapeMismatch {
                    tensor: tensor.to_string(),
                    file: first.file.clone(),
                    shape: first.shape.clone(),
                    other_file: s.file.clone(),
                    other_shape: s.shape.clone(),
                });
            }
        }
        let rows = rows_of(&first.shape);
        for s in &slices {
            if s.rows.start > s.rows.end || s.rows.end > rows {
                return Err(PlanError::SliceOutOfRange {
                    tensor: tensor.to_string(),
                    file: s.file.clone(),
                    start: s.rows.start,
                    end: s.rows.end,
                    rows,
                });
            }
        }
        let mut cursor = 0;
        let mut prev_file: &str = "";
        for s in slices.iter().filter(|s| !s.rows.is_empty()) {
            if s.rows.start > cursor {
                return Err(PlanError::Gap {
                    tensor: tensor.to_string(),
                    start: cursor,
                    end: s.rows.start,
                });
            }
            if s.rows.start < cursor {
                return Err(PlanError::Overlap {
                    tensor: tensor.to_string(),
                    file: prev_file.to_string(),
                    other_file: s.file.clone(),
                    start: s.rows.start,
                    end: cursor.min(s.rows.end),
                });
            }
            cursor = s.rows.end;
            prev_file = &s.file;
        }
        if cursor < rows {
            return Err(PlanError::Gap {
                tensor: tensor.to_string(),
                start: cursor,
                end: rows,
            });
        }
    }
    Ok(())
}

/// Rows of one tensor that one rank needs after loading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedSlice {
    /// The rank.
    pub rank: u32,
    /// Tensor name.
    pub tensor: String,
    /// Rows of the full tensor the rank needs.
    pub rows: RowRange,
}

/// One read: rows of one tensor slice stored in one file, copied into rows of the tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    /// File to read.
    pub file: String,
    /// Tensor name.
    pub tensor: String,
    /// Rows relative to the start of the slice stored in `file`.
    pub src_rows: RowRange,
    /// Rows of the full tensor they fill.
    pub dst_rows: RowRange,
}

/// Everything one rank reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankLoad {
    /// The rank.
    pub rank: u32,
    /// Reads sorted by (tensor, `dst_rows.start`).
    pub reads: Vec<Read>,
}

/// What every rank reads, sorted by rank; a rank that needs nothing has no entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadPlan {
    /// Per-rank reads, sorted by rank.
    pub ranks: Vec<RankLoad>,
}

impl LoadPlan {
    /// Distinct files any rank reads, sorted.
    pub fn files(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self
            .ranks
            .iter()
            .flat_map(|r| r.reads.iter().map(|read| &read.file))
            .collect();
        set.into_iter().cloned().collect()
    }

    /// Distinct files one rank reads, sorted (empty for a rank with no reads).
    pub fn files_for(&self, rank: u32) -> Vec<String> {
        let set: BTreeSet<&String> = self
            .ranks
            .iter()
            .filter(|r| r.rank == rank)
            .flat_map(|r| r.reads.iter().map(|read| &read.file))
            .collect();
        set.into_iter().cloned().collect()
    }
}

/// Every rank in `0..ranks` needs every saved tensor whole (data-parallel replicas).
/// Needs are ordered by rank, then tensor name; a tensor's rows come from its first
/// saved slice's shape.
pub fn replicated_needs(saved: &[SavedSlice], ranks: u32) -> Vec<NeedSlice> {
    let mut tensors: BTreeMap<&str, usize> = BTreeMap::new();
    for s in saved {
        tensors
            .entry(s.tensor.as_str())
            .or_insert_with(|| rows_of(&s.shape));
    }
    (0..ranks)
        .flat_map(|rank| {
            tensors.iter().map(move |(&tensor, &rows)| NeedSlice {
                rank,
                tensor: tensor.to_string(),
                rows: RowRange {
                    start: 0,
                    end: rows,
                },
            })
        })
        .collect()
}

/// Plans a load: runs [`check_tiling`], then for each need emits the reads (the non-empty
/// intersections with saved slices) that cover its rows exactly. A need for zero rows
/// (e.g. of a tensor with a zero first dimension) gets one empty read from a slice whose
/// range touches its start, so the rank still learns which file describes the tensor.
pub fn load_plan(saved: &[SavedSlice], needs: &[NeedSlice]) -> Result<LoadPlan, PlanError> {
    check_tiling(saved)?;
    let index = by_tensor(saved);
    let mut by_rank: BTreeMap<u32, Vec<Read>> = BTreeMap::new();
    for need in needs {
        let slices = index
            .get(need.tensor.as_str())
            .ok_or_else(|| PlanError::NotSaved {
                rank: need.rank,
                tensor: need.tensor.clone(),
            })?;
        let rows = rows_of(&slices[0].shape);
        let (a, b) = (need.rows.start, need.rows.end);
        if a > b || b > rows {
            return Err(PlanError::NeedOutOfRange {
                rank: need.rank,
                tensor: need.tensor.clone(),
                start: a,
                end: b,
                rows,
            });
        }
        let reads = by_rank.entry(need.rank).or_default();
        let read = |s: &SavedSlice, lo: usize, hi: usize| Read {
            file: s.file.clone(),
            tensor: need.tensor.clone(),
            src_rows: RowRange {
                start: lo - s.rows.start,
                end: hi - s.rows.start,
            },
            dst_rows: RowRange { start: lo, end: hi },
        };
        if a == b {
            if let Some(s) = slices.iter().find(|s| s.rows.start <= a && a <= s.rows.end) {
                reads.push(read(s, a, a));
            }
            continue;
        }
        for s in slices {
            let lo = a.max(s.rows.start);
            let hi = b.min(s.rows.end);
            if lo < hi {
                reads.push(read(s, lo, hi));
            }
        }
    }
    let ranks = by_rank
        .into_iter()
        .map(|(rank, mut reads)| {
            reads.sort_by(|x, y| {
                (&x.tensor, x.dst_rows.start, x.dst_rows.end, &x.file).cmp(&(
                    &y.tensor,
                    y.dst_rows.start,
                    y.dst_rows.end,
                    &y.file,
                ))
            });
            RankLoad { rank, reads }
        })
        .collect();
    Ok(LoadPlan { ranks })
}

/// Which checkpoint folders to keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the newest this many committed checkpoints; 0 keeps every committed checkpoint.
    pub keep_last: usize,
    /// Keep checkpoints whose step is a multiple of this; 0 turns this off.
    pub keep_every: u64,
    /// A folder without a manifest is abandoned once its newest object is older than this.
    pub min_uncommitted_age_ms: u64,
}

/// What is known about a checkpoint folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FolderState {
    /// Committed and verified.
    Good,
    /// Committed, not verified (yet).
    Unverified,
    /// Committed but failed verification.
    Bad {
        /// What verification found wrong.
        reason: String,
    },
    /// No manifest: a save that has not finished or was abandoned.
    Uncommitted {
        /// Whether this process knows the save is still running.
        in_progress: bool,
    },
}

/// One checkpoint folder as listed in storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderInfo {
    /// Folder name.
    pub folder: String,
    /// Training step the checkpoint is of.
    pub step: u64,
    /// Creation time (unix ms); for `Uncommitted`, the newest object's time.
    pub created_unix_ms: u64,
    /// What is known about it.
    pub state: FolderState,
}

/// Whether to keep one folder, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionDecision {
    /// Folder name.
    pub folder: String,
    /// Keep (true) or delete (false).
    pub keep: bool,
    /// Human reason for the decision.
    pub reason: String,
}

/// A human age: `350 ms`, `40 s`, `12 min`, `2h`, `3 days`.
fn fmt_age(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if s < 120 {
        format!("{s} s")
    } else if s < 120 * 60 {
        format!("{} min", s / 60)
    } else if s < 48 * 3600 {
        format!("{}h", s / 3600)
    } else {
        format!("{} days", s / 86_400)
    }
}

/// Decides, for each folder, whether to keep it: one decision per folder, in input order;
/// `now_unix_ms` is the current time.
///
/// Committed checkpoints (`Good` or `Unverified`) are ordered by (step, creation time,
/// folder). The newest `Good` is always kept. If no folder is `Good`, no committed
/// (`Good`, `Unverified` or `Bad`) folder is deleted. Otherwise the newest `keep_last`
/// committed (all when 0) and those whose step is a multiple of `keep_every` (when not 0)
/// are kept, other committed ones and all `Bad` ones are deleted. An uncommitted folder
/// is kept while in progress or younger than `min_uncommitted_age_ms`, and deleted as
/// abandoned once older.
pub fn retention(
    folders: &[FolderInfo],
    policy: &RetentionPolicy,
    now_unix_ms: u64,
) -> Vec<RetentionDecision> {
    let key = |i: usize| {
        let f = &folders[i];
        (f.step, f.created_unix_ms, f.folder.as_str(), i)
    };
    let mut committed: Vec<usize> = (0..folders.len())
        .filter(|&i| {
            matches!(
                folders[i].state,
                FolderState::Good | FolderState::Unverified
            )
        })
        .collect();
    committed.sort_by_key(|&i| key(i));
    let newest_good = committed
        .iter()
        .rev()
        .copied()
        .find(|&i| folders[i].state == FolderState::Good);
    // Position from the newest (0 = newest) of each committed folder.
    let mut from_newest = vec![usize::MAX; folders.len()];
    for (pos, &i) in committed.iter().rev().enumerate() {
        from_newest[i] = pos;
    }
    const NO_GOOD: &str = "no checkpoint is verified good, refusing to delete committed ones";

    folders
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (keep, reason) = match &f.state {
                FolderState::Good | FolderState::Unverified => {
                    let k = policy.keep_last;
                    let m = policy.keep_every;
                    if newest_good == Some(i) {
                        (true, "newest good checkpoint".to_string())
                    } else if newest_good.is_none() {
                        (true, NO_GOOD.to_string())
                    } else if k == 0 {
                        (
                            true,
                            "keep_last is 0: every committed checkpoint is kept".to_string(),
                        )
                    } else if from_newest[i] < k {
                        (true, format!("one of the newest {k}"))
                    } else if m > 0 && f.step % m == 0 {
                        (true, format!("step {} is a multiple of {m}", f.step))
                    } else if m > 0 {
                        (
                            false,
                            format!("older than the newest {k} and not a multiple of {m}"),
                        )
                    } else {
                        (false, format!("older than the newest {k}"))
                    }
                }
                FolderState::Bad { reason } => {
                    if newest_good.is_none() {
                        (true, format!("corrupt: {reason}; kept because {NO_GOOD}"))
                    } else {
                        (false, format!("corrupt: {reason}"))
                    }
                }
                FolderState::Uncommitted { in_progress: true } => {
                    (true, "being written".to_string())
                }
                FolderState::Uncommitted { in_progress: false } => {
                    let age = now_unix_ms.saturating_sub(f.created_unix_ms);
                    if age > policy.min_uncommitted_age_ms {
                        (
                            false,
                            format!("abandoned attempt, no manifest, {} old", fmt_age(age)),
                        )
                    } else {
                        (
                            true,
                            format!(
                                "no manifest yet and only {} old: may still be being written",
                                fmt_age(age)
                            ),
                        )
                    }
                }
            };
            RetentionDecision {
                folder: f.folder.clone(),
                keep,
                reason,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rr(start: usize, end: usize) -> RowRange {
        RowRange { start, end }
    }

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        }
    }

    fn saved(tensor: &str, shape: &[usize], file: &str, start: usize, end: usize) -> SavedSlice {
        SavedSlice {
            tensor: tensor.to_string(),
            shape: shape.to_vec(),
            file: file.to_string(),
            rows: rr(start, end),
        }
    }

    /// The saved slices a save plan produces.
    fn saved_of(plan: &SavePlan) -> Vec<SavedSlice> {
        plan.shards
            .iter()
            .flat_map(|sh| {
                sh.slices.iter().map(|s| SavedSlice {
                    tensor: s.tensor.clone(),
                    shape: s.shape.clone(),
                    file: sh.file.clone(),
                    rows: s.rows.clone(),
                })
            })
            .collect()
    }

    /// (writer, tensor, start, end) of every planned slice.
    fn flat(plan: &SavePlan) -> Vec<(u32, String, usize, usize)> {
        plan.shards
            .iter()
            .flat_map(|sh| {
                sh.slices
                    .iter()
                    .map(|s| (sh.writer, s.tensor.clone(), s.rows.start, s.rows.end))
            })
            .collect()
    }

    #[test]
    fn shapes_rows_and_names() {
        let table: &[(&[usize], usize, usize)] = &[
            (&[], 1, 1),
            (&[7], 7, 1),
            (&[4, 3], 4, 3),
            (&[2, 3, 5], 2, 15),
            (&[0, 4], 0, 4),
            (&[3, 0], 3, 0),
        ];
        for (shape, rows, elems) in table {
            assert_eq!(rows_of(shape), *rows, "{shape:?}");
            assert_eq!(row_elems(shape), *elems, "{shape:?}");
        }
        assert_eq!(shard_file_name(3), "shard-00003.safetensors");
        assert_eq!(shard_file_name(123_456), "shard-123456.safetensors");
        assert_eq!(rr(2, 5).len(), 3);
        assert!(rr(4, 4).is_empty());
        assert!(rr(5, 4).is_empty());
    }

    #[test]
    fn save_plan_table() {
        type Row<'a> = (
            &'a [(&'a str, &'a [usize], &'a [u32])],
            &'a [(u32, &'a str, usize, usize)],
        );
        let table: &[Row] = &[
            // One holder writes everything.
            (
                &[("b", &[3], &[2]), ("a", &[2, 2], &[2])],
                &[(2, "a", 0, 2), (2, "b", 0, 3)],
            ),
            // T = 10, cut at 5 lies between row boundaries 4 and 6: tie goes low.
            (
                &[("a", &[4, 2], &[1, 0]), ("b", &[2], &[0, 1, 1])],
                &[(0, "a", 0, 2), (1, "a", 2, 4), (1, "b", 0, 2)],
            ),
            // More holders than rows: T = 6, targets 1, 3, 4 -> cuts 0, 3, 3.
            (
                &[("w", &[2, 3], &[0, 1, 2, 3])],
                &[(1, "w", 0, 1), (3, "w", 1, 2)],
            ),
            // Pipeline stages: two holder groups; zero-element and scalar tensors.
            (
                &[
                    ("s1.w", &[6, 2], &[2, 3]),
                    ("s0.w", &[4, 4], &[0, 1]),
                    ("s0.empty", &[0, 4], &[1, 0]),
                    ("s1.flat", &[5, 0], &[3, 2]),
                    ("s0.scale", &[], &[0, 1]),
                ],
                &[
                    (0, "s0.empty", 0, 0),
                    (0, "s0.scale", 0, 1),
                    (0, "s0.w", 0, 2),
                    (1, "s0.w", 2, 4),
                    (2, "s1.flat", 0, 5),
                    (2, "s1.w", 0, 3),
                    (3, "s1.w", 3, 6),
                ],
            ),
        ];
        for (input, want) in table {
            let held: Vec<(TensorSpec, Vec<u32>)> = input
                .iter()
                .map(|(n, s, h)| (spec(n, s), h.to_vec()))
                .collect();
            let plan = save_plan(&held).unwrap();
            let want: Vec<_> = want
                .iter()
                .map(|(w, t, a, b)| (*w, t.to_string(), *a, *b))
                .collect();
            assert_eq!(flat(&plan), want, "{input:?}");
            for sh in &plan.shards {
                assert_eq!(sh.file, shard_file_name(sh.writer));
            }
        }
    }

    #[test]
    fn save_plan_errors() {
        let e = save_plan(&[(spec("", &[2]), vec![0])]).unwrap_err();
        assert_eq!(e, PlanError::EmptyName { shape: vec![2] });
        let e = save_plan(&[(spec("a", &[2]), vec![0]), (spec("a", &[3]), vec![1])]).unwrap_err();
        assert_eq!(e, PlanError::DuplicateTensor { tensor: "a".into() });
        assert!(e.to_string().contains("`a`"));
        let e = save_plan(&[(spec("h.0.w", &[2]), vec![])]).unwrap_err();
        assert_eq!(
            e,
            PlanError::NoHolders {
                tensor: "h.0.w".into()
            }
        );
        assert!(e.to_string().contains("h.0.w"));
        assert_eq!(save_plan(&[]).unwrap(), SavePlan { shards: vec![] });
    }

    #[test]
    fn check_tiling_table() {
        let s = &[4usize, 2][..];
        let table: Vec<(Vec<SavedSlice>, Result<(), PlanError>)> = vec![
            (
                vec![saved("a", s, "f1", 2, 4), saved("a", s, "f0", 0, 2)],
                Ok(()),
            ),
            (
                vec![
                    saved("a", s, "f0", 0, 4),
                    saved("a", s, "f1", 2, 2),
                    saved("z", &[0, 3], "f1", 0, 0),
                ],
                Ok(()),
            ),
            (vec![], Ok(())),
            (
                vec![saved("a", s, "f0", 0, 1), saved("a", s, "f1", 2, 4)],
                Err(PlanError::Gap {
                    tensor: "a".into(),
                    start: 1,
                    end: 2,
                }),
            ),
            (
                vec![saved("a", s, "f0", 0, 3)],
                Err(PlanError::Gap {
                    tensor: "a".into(),
                    start: 3,
                    end: 4,
                }),
            ),
            (
                vec![saved("a", s, "f0", 0, 3), saved("a", s, "f1", 2, 4)],
                Err(PlanError::Overlap {
                    tensor: "a".into(),
                    file: "f0".into(),
                    other_file: "f1".into(),
                    start: 2,
                    end: 3,
                }),
            ),
            (
                vec![saved("a", s, "f0", 0, 5)],
                Err(PlanError::SliceOutOfRange {
                    tensor: "a".into(),
                    file: "f0".into(),
                    start: 0,
                    end: 5,
                    rows: 4,
                }),
            ),
            (
                vec![saved("a", s, "f0", 3, 1)],
                Err(PlanError::SliceOutOfRange {
                    tensor: "a".into(),
                    file: "f0".into(),
                    start: 3,
                    end: 1,
                    rows: 4,
                }),
            ),
            (
                vec![saved("a", s, "f0", 0, 2), saved("a", &[4, 3], "f1", 2, 4)],
                Err(PlanError::ShapeMismatch {
                    tensor: "a".into(),
                    file: "f0".into(),
                    shape: vec![4, 2],
                    other_file: "f1".into(),
                    other_shape: vec![4, 3],
                }),
            ),
        ];
        for (input, want) in table {
            assert_eq!(check_tiling(&input), want, "{input:?}");
        }
    }

    #[test]
    fn load_plan_table() {
        let s = &[6usize, 2][..];
        let saved_set = vec![
            saved("w", s, "f0", 0, 4),
            saved("w", s, "f1", 4, 6),
            saved("e", &[0, 2], "f0", 0, 0),
        ];
        let needs = vec![
            NeedSlice {
                rank: 1,
                tensor: "w".into(),
                rows: rr(3, 6),
            },
            NeedSlice {
                rank: 0,
                tensor: "w".into(),
                rows: rr(0, 3),
            },
            NeedSlice {
                rank: 1,
                tensor: "e".into(),
                rows: rr(0, 0),
            },
        ];
        let plan = load_plan(&saved_set, &needs).unwrap();
        let read = |file: &str, tensor: &str, src: (usize, usize), dst: (usize, usize)| Read {
            file: file.into(),
            tensor: tensor.into(),
            src_rows: rr(src.0, src.1),
            dst_rows: rr(dst.0, dst.1),
        };
        assert_eq!(
            plan,
            LoadPlan {
                ranks: vec![
                    RankLoad {
                        rank: 0,
                        reads: vec![read("f0", "w", (0, 3), (0, 3))],
                    },
                    RankLoad {
                        rank: 1,
                        reads: vec![
                            read("f0", "e", (0, 0), (0, 0)),
                            read("f0", "w", (3, 4), (3, 4)),
                            read("f1", "w", (0, 2), (4, 6)),
                        ],
                    },
                ]
            }
        );
        assert_eq!(plan.files(), vec!["f0".to_string(), "f1".to_string()]);
        assert_eq!(plan.files_for(0), vec!["f0".to_string()]);
        assert_eq!(plan.files_for(7), Vec::<String>::new());

        let need = |tensor: &str, start, end| NeedSlice {
            rank: 2,
            tensor: tensor.into(),
            rows: rr(start, end),
        };
        assert_eq!(
            load_plan(&saved_set, &[need("x", 0, 1)]),
            Err(PlanError::NotSaved {
                rank: 2,
                tensor: "x".into()
            })
        );
        assert_eq!(
            load_plan(&saved_set, &[need("w", 2, 7)]),
            Err(PlanError::NeedOutOfRange {
                rank: 2,
                tensor: "w".into(),
                start: 2,
                end: 7,
                rows: 6
            })
        );
        assert!(matches!(
            load_plan(&saved_set, &[need("w", 3, 2)]),
            Err(PlanError::NeedOutOfRange { .. })
        ));
        assert!(matches!(
            load_plan(&saved_set[1..], &[]),
            Err(PlanError::Gap { .. })
        ));
    }

    #[test]
    fn replicated_needs_table() {
        let saved_set = vec![
            saved("b", &[3], "f1", 0, 3),
            saved("a", &[4, 2], "f0", 0, 2),
            saved("a", &[4, 2], "f1", 2, 4),
        ];
        let got: Vec<_> = replicated_needs(&saved_set, 2)
            .into_iter()
            .map(|n| (n.rank, n.tensor, n.rows.start, n.rows.end))
            .collect();
        let want = vec![
            (0, "a".to_string(), 0, 4),
            (0, "b".to_string(), 0, 3),
            (1, "a".to_string(), 0, 4),
            (1, "b".to_string(), 0, 3),
        ];
        assert_eq!(got, want);
        assert!(replicated_needs(&saved_set, 0).is_empty());
    }

    fn folder(name: &str, step: u64, created: u64, state: FolderState) -> FolderInfo {
        FolderInfo {
            folder: name.into(),
            step,
            created_unix_ms: created,
            state,
        }
    }

    fn bad(reason: &str) -> FolderState {
        FolderState::Bad {
            reason: reason.into(),
        }
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn retention_table() {
        use FolderState::*;
        let policy = |keep_last, keep_every| RetentionPolicy {
            keep_last,
            keep_every,
            min_uncommitted_age_ms: HOUR,
        };
        let now = 100 * HOUR;
        type Row = (Vec<FolderInfo>, RetentionPolicy, Vec<(bool, &'static str)>);
        let table: Vec<Row> = vec![
            // keep_last 2, keep_every 500.
            (
                vec![
                    folder("s0500", 500, 1, Good),
                    folder("s0700", 700, 2, Good),
                    folder("s1000", 1000, 3, Good),
                    folder("s1100", 1100, 4, Good),
                    folder("s1200", 1200, 5, Unverified),
                ],
                policy(2, 500),
                vec![
                    (true, "step 500 is a multiple of 500"),
                    (
                        false,
                        "older than the newest 2 and not a multiple of 500",
                    ),
                    (true, "step 1000 is a multiple of 500"),
                    (true, "newest good checkpoint"),
                    (true, "one of the newest 2"),
                ],
            ),
            // keep_last 1 and the newest is unverified: the newest good stays too.
            (
                vec![
                    folder("a", 10, 1, Good),
                    folder("b", 20, 2, Good),
                    folder("c", 30, 3, Unverified),
                ],
                policy(1, 0),
                vec![
                    (false, "older than the newest 1"),
                    (true, "newest good checkpoint"),
                    (true, "one of the newest 1"),
                ],
            ),
            // keep_last 0 keeps every committed checkpoint; bad ones still go.
            (
                vec![
                    folder("a", 10, 1, Good),
                    folder("b", 20, 2, bad("shard-00001 checksum mismatch")),
                    folder("c", 30, 3, Good),
                ],
                policy(0, 0),
                vec![
                    (true, "keep_last is 0: every committed checkpoint is kept"),
                    (false, "corrupt: shard-00001 checksum mismatch"),
                    (true, "newest good checkpoint"),
                ],
            ),
            // No good folder: nothing committed is deleted; uncommitted rules still apply.
            (
                vec![
                    folder("a", 10, 1, Unverified),
                    folder("b", 20, 2, bad("missing shard")),
                    folder("c", 30, 3, Unverified),
                    folder("d", 40, now - 2 * HOUR, Uncommitted { in_progress: false }),
                ],
                policy(1, 0),
                vec![
                    (
                        true,
                        "no checkpoint is verified good, refusing to delete committed ones",
                    ),
                    (
                        true,
                        "corrupt: missing shard; kept because no checkpoint is verified good, refusing to delete committed ones",
                    ),
                    (
                        true,
                        "no checkpoint is verified good, refusing to delete committed ones",
                    ),
                    (false, "abandoned attempt, no manifest, 2h old"),
                ],
            ),
            // Uncommitted folders.
            (
                vec![
                    folder("g", 10, 1, Good),
                    folder("x", 20, now - 40_000, Uncommitted { in_progress: false }),
                    folder("y", 30, 0, Uncommitted { in_progress: true }),
                    folder("z", 40, now - 3 * 86_400_000, Uncommitted { in_progress: false }),
                    folder("w", 50, now + 5_000, Uncommitted { in_progress: false }),
                ],
                policy(3, 0),
                vec![
                    (true, "newest good checkpoint"),
                    (
                        true,
                        "no manifest yet and only 40 s old: may still be being written",
                    ),
                    (true, "being written"),
                    (false, "abandoned attempt, no manifest, 3 days old"),
                    (
                        true,
                        "no manifest yet and only 0 ms old: may still be being written",
                    ),
                ],
            ),
            // Same step: creation time, then folder name, orders them.
            (
                vec![
                    folder("b", 10, 5, Good),
                    folder("a", 10, 5, Good),
                    folder("c", 10, 4, Good),
                ],
                policy(1, 0),
                vec![
                    (true, "newest good checkpoint"),
                    (false, "older than the newest 1"),
                    (false, "older than the newest 1"),
                ],
            ),
        ];
        for (folders, policy, want) in table {
            let got = retention(&folders, &policy, now);
            let got: Vec<_> = got
                .iter()
                .zip(&folders)
                .map(|(d, f)| {
                    assert_eq!(d.folder, f.folder);
                    (d.keep, d.reason.as_str())
                })
                .collect();
            assert_eq!(got, want, "{folders:?}");
        }
    }

    #[test]
    fn ages_read_well() {
        let table = [
            (0, "0 ms"),
            (999, "999 ms"),
            (40_000, "40 s"),
            (119_999, "119 s"),
            (120_000, "2 min"),
            (2 * HOUR, "2h"),
            (47 * HOUR, "47h"),
            (48 * HOUR, "2 days"),
        ];
        for (ms, want) in table {
            assert_eq!(fmt_age(ms), want, "{ms}");
        }
    }

    /// Unique tensor names with shapes and holder lists (some groups shared).
    fn held_strategy() -> impl Strategy<Value = Vec<(TensorSpec, Vec<u32>)>> {
        let shape = prop::collection::vec(0usize..9, 0..4);
        let holders = prop_oneof![
            Just(vec![0u32, 1, 2, 3]),
            Just(vec![5u32, 4]),
            prop::collection::vec(0u32..7, 1..5),
        ];
        (
            prop::collection::btree_set("[a-z]{1,4}", 12),
            prop::collection::vec((shape, holders), 1..12),
        )
            .prop_map(|(names, items)| {
                names
                    .into_iter()
                    .rev()
                    .zip(items)
                    .map(|(name, (shape, holders))| (TensorSpec { name, shape }, holders))
                    .collect()
            })
    }

    /// Checks that `plan` gives `rank` reads that fill exactly the rows in `want` (tensor ->
    /// needed rows), each read taking the same global rows from the file's slice.
    fn check_reads(
        plan: &LoadPlan,
        saved_set: &[SavedSlice],
        rank: u32,
        want: &BTreeMap<String, (usize, usize)>,
    ) -> Result<(), TestCaseError> {
        let loads: Vec<_> = plan.ranks.iter().filter(|r| r.rank == rank).collect();
        prop_assert!(loads.len() <= 1);
        let reads: &[Read] = loads.first().map(|l| l.reads.as_slice()).unwrap_or(&[]);
        let mut sorted = reads.to_vec();
        sorted.sort_by(|x, y| (&x.tensor, x.dst_rows.start).cmp(&(&y.tensor, y.dst_rows.start)));
        prop_assert_eq!(&sorted, &reads.to_vec());
        let mut cursor: BTreeMap<&str, usize> = BTreeMap::new();
        for r in reads {
            let (start, end) = want[&r.tensor];
            let c = cursor.entry(r.tensor.as_str()).or_insert(start);
            prop_assert_eq!(r.dst_rows.start, *c);
            prop_assert_eq!(r.src_rows.len(), r.dst_rows.len());
            prop_assert!(r.dst_rows.end <= end);
            *c = r.dst_rows.end;
            let stored: Vec<_> = saved_set
                .iter()
                .filter(|s| s.file == r.file && s.tensor == r.tensor)
                .collect();
            prop_assert_eq!(stored.len(), 1);
            let s = stored[0];
            prop_assert!(r.src_rows.end <= s.rows.len());
            prop_assert_eq!(s.rows.start + r.src_rows.start, r.dst_rows.start);
        }
        for (tensor, &(_, end)) in want {
            prop_assert_eq!(
                cursor.get(tensor.as_str()).copied(),
                Some(end),
                "{}",
                tensor
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Every row of every tensor is written exactly once, by one of its holders, into
        /// the writer's shard file, and each writer's load is balanced.
        #[test]
        fn save_plan_tiles_balances_and_uses_holders(held in held_strategy()) {
            let plan = save_plan(&held).unwrap();
            let saved_set = saved_of(&plan);
            prop_assert_eq!(check_tiling(&saved_set), Ok(()));
            let writers: Vec<u32> = plan.shards.iter().map(|s| s.writer).collect();
            let mut sorted = writers.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(&writers, &sorted);
            let by_name: BTreeMap<&str, (&TensorSpec, Vec<u32>)> = held
                .iter()
                .map(|(s, h)| {
                    let mut h = h.clone();
                    h.sort_unstable();
                    h.dedup();
                    (s.name.as_str(), (s, h))
                })
                .collect();
            let mut saved_names = BTreeSet::new();
            // (holder set, writer) -> elements written.
            let mut load: BTreeMap<(Vec<u32>, u32), u64> = BTreeMap::new();
            for sh in &plan.shards {
                prop_assert_eq!(&sh.file, &shard_file_name(sh.writer));
                prop_assert!(!sh.slices.is_empty());
                for w in sh.slices.windows(2) {
                    prop_assert!(w[0].tensor < w[1].tensor);
                }
                for s in &sh.slices {
                    let (spec, holders) = &by_name[s.tensor.as_str()];
                    prop_assert!(holders.contains(&sh.writer));
                    prop_assert_eq!(&s.shape, &spec.shape);
                    saved_names.insert(s.tensor.as_str());
                    if elem_count(&spec.shape) == 0 {
                        prop_assert_eq!(sh.writer, holders[0]);
                    }
                    *load.entry((holders.clone(), sh.writer)).or_default() +=
                        (s.rows.len() * row_elems(&spec.shape)) as u64;
                }
            }
            let all_names: BTreeSet<&str> = by_name.keys().copied().collect();
            prop_assert_eq!(saved_names, all_names);
            // Balance: each cut is within half a row of a target floor(k*T/n), so each
            // writer's load is within (max row elems + 1) of T/n.
            let mut groups: BTreeMap<Vec<u32>, (u64, u64)> = BTreeMap::new();
            for (spec, holders) in by_name.values() {
                let g = groups.entry(holders.clone()).or_default();
                g.0 += elem_count(&spec.shape);
                if elem_count(&spec.shape) > 0 {
                    g.1 = g.1.max(row_elems(&spec.shape) as u64);
                }
            }
            for (holders, (total, max_row)) in groups {
                let n = holders.len() as u64;
                for &w in &holders {
                    let l = load.get(&(holders.clone(), w)).copied().unwrap_or(0);
                    prop_assert!(
                        (n * l).abs_diff(total) <= n * (max_row + 1),
                        "holders {:?} writer {} load {} total {} max row {}",
                        holders, w, l, total, max_row
                    );
                }
            }
        }

        /// Loading a planned save onto any number of data-parallel ranks gives every rank
        /// reads that fill every tensor exactly.
        #[test]
        fn replicated_load_fills_every_tensor(held in held_strategy(), ranks in 0u32..5) {
            let plan = save_plan(&held).unwrap();
            let saved_set = saved_of(&plan);
            let needs = replicated_needs(&saved_set, ranks);
            let load = load_plan(&saved_set, &needs).unwrap();
            prop_assert_eq!(load.ranks.len(), ranks as usize);
            let want: BTreeMap<String, (usize, usize)> = held
                .iter()
                .map(|(s, _)| (s.name.clone(), (0, rows_of(&s.shape))))
                .collect();
            for rank in 0..ranks {
                prop_assert_eq!(load.ranks[rank as usize].rank, rank);
                check_reads(&load, &saved_set, rank, &want)?;
                let files = load.files_for(rank);
                prop_assert!(files.iter().all(|f| load.files().contains(f)));
            }
            if ranks > 0 {
                let all: BTreeSet<String> = saved_set.iter().map(|s| s.file.clone()).collect();
                prop_assert_eq!(load.files(), all.into_iter().collect::<Vec<_>>());
            }
        }

        /// Any exact re-tiling of tensors over files, and any needed row ranges, load.
        #[test]
        fn load_plan_on_random_tiling(
            tensors in prop::collection::vec(
                (0usize..30, prop::collection::vec(0usize..30, 0..6), 1usize..5),
                1..6,
            ),
            needs in prop::collection::vec((0u32..4, 0usize..6, 0usize..31, 0usize..31), 0..12),
        ) {
            let mut saved_set = Vec::new();
            for (t, (rows, cuts, files)) in tensors.iter().enumerate() {
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (rows + 1)).collect();
                cuts.push(0);
                cuts.push(*rows);
                cuts.sort_unstable();
                cuts.dedup();
                if cuts.len() == 1 {
                    cuts.push(0);
                }
                for (i, w) in cuts.windows(2).enumerate() {
                    saved_set.push(saved(
                        &format!("t{t}"),
                        &[*rows, 3],
                        &format!("f{}", i + t % files),
                        w[0],
                        w[1],
                    ));
                }
            }
            prop_assert_eq!(check_tiling(&saved_set), Ok(()));
            // One need per (rank, tensor), so each rank's reads tile its needed rows.
            let mut wanted: BTreeMap<u32, BTreeMap<String, (usize, usize)>> = BTreeMap::new();
            let mut need_list = Vec::new();
            for (rank, t, a, b) in needs {
                let t = t % tensors.len();
                let rows = tensors[t].0;
                let (a, b) = (a.min(b) % (rows + 1), a.max(b) % (rows + 1));
                let (a, b) = (a.min(b), a.max(b));
                let name = format!("t{t}");
                let per_rank = wanted.entry(rank).or_default();
                if !per_rank.contains_key(&name) {
                    per_rank.insert(name.clone(), (a, b));
                    need_list.push(NeedSlice { rank, tensor: name, rows: rr(a, b) });
                }
            }
            let plan = load_plan(&saved_set, &need_list).unwrap();
            let ranks: Vec<u32> = plan.ranks.iter().map(|r| r.rank).collect();
            prop_assert_eq!(ranks, wanted.keys().copied().collect::<Vec<_>>());
            for (rank, want) in &wanted {
                check_reads(&plan, &saved_set, *rank, want)?;
            }
        }

        /// The newest good checkpoint and in-progress saves are never deleted, nothing
        /// committed is deleted without a good checkpoint, and there is one decision per
        /// folder in input order.
        #[test]
        fn retention_invariants(
            specs in prop::collection::vec((0u64..20, 0u64..50, 0u8..5, any::<bool>()), 0..12),
            keep_last in 0usize..4,
            keep_every in 0u64..6,
            min_age in 0u64..60,
            now in 0u64..80,
        ) {
            let folders: Vec<FolderInfo> = specs
                .iter()
                .enumerate()
                .map(|(i, &(step, created, kind, flag))| {
                    let state = match kind {
                        0 => FolderState::Good,
                        1 => FolderState::Unverified,
                        2 => bad("bad checksum"),
                        _ => FolderState::Uncommitted { in_progress: flag },
                    };
                    folder(&format!("ckpt-{i}"), step, created, state)
                })
                .collect();
            let policy = RetentionPolicy { keep_last, keep_every, min_uncommitted_age_ms: min_age };
            let decisions = retention(&folders, &policy, now);
            prop_assert_eq!(decisions.len(), folders.len());
            let newest_good = folders
                .iter()
                .enumerate()
                .filter(|(_, f)| f.state == FolderState::Good)
                .max_by_key(|(i, f)| (f.step, f.created_unix_ms, f.folder.clone(), *i))
                .map(|(i, _)| i);
            for (i, (d, f)) in decisions.iter().zip(&folders).enumerate() {
                prop_assert_eq!(&d.folder, &f.folder);
                prop_assert!(!d.reason.is_empty());
                if Some(i) == newest_good {
                    prop_assert!(d.keep);
                }
                if f.state == (FolderState::Uncommitted { in_progress: true }) {
                    prop_assert!(d.keep);
                }
                let committed = !matches!(f.state, FolderState::Uncommitted { .. });
                if newest_good.is_none() && committed {
                    prop_assert!(d.keep);
                }
                if keep_last == 0 && matches!(f.state, FolderState::Good | FolderState::Unverified) {
                    prop_assert!(d.keep);
                }
                if newest_good.is_some() && matches!(f.state, FolderState::Bad { .. }) {
                    prop_assert!(!d.keep);
                }
            }
        }
    }
}

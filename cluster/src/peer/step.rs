//! One step's reduction state on one member, without any I/O: local contributions and
//! received frames go in, frames to send come out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use tenax_proto::v1::FrameKind;

use super::{chunk_range, piece_count, CommSpec, Reduction, StagePart};
use crate::collective::{Reduced, SlotContribution, SlotFold};

/// The shape of a generation, derived once from its [`CommSpec`].
#[derive(Debug, Clone)]
pub(super) struct Geometry {
    /// Members.
    pub m: usize,
    /// This member's index.
    pub me: usize,
    /// Values per gradient.
    pub p: usize,
    /// Slots per step.
    pub num_slots: u64,
    /// Values per frame at most.
    pub mff: usize,
    /// The reduction.
    pub reduction: Reduction,
    /// This member's slots, ascending.
    pub my_slots: Vec<u64>,
    /// This member's stage share of its slots' gradients (stages across members).
    pub part: Option<StagePart>,
}

impl Geometry {
    pub fn new(spec: &CommSpec) -> Self {
        Self {
            m: spec.members.len(),
            me: spec.me,
            p: spec.num_params,
            num_slots: spec.num_slots,
            mff: spec.max_frame_floats,
            reduction: spec.reduction,
            my_slots: spec.my_slots(),
            part: spec.stage.clone(),
        }
    }

    /// True if this member computes the loss of its slots (always, unless it runs a
    /// stage other than the head).
    pub fn gives_loss(&self) -> bool {
        self.part.as_ref().is_none_or(|p| p.head)
    }

    /// With a stage part: the segments of it that fall into chunk `k`, each as (range
    /// in the contribution's values, offset in the chunk).
    pub fn part_segments(&self, k: usize) -> Vec<(Range<usize>, usize)> {
        let Some(part) = &self.part else {
            return Vec::new();
        };
        let chunk = self.chunk(k);
        let mut out = Vec::new();
        let mut at = 0;
        for r in &part.gives {
            let (lo, hi) = (r.start.max(chunk.start), r.end.min(chunk.end));
            if lo < hi {
                out.push((at + (lo - r.start)..at + (hi - r.start), lo - chunk.start));
            }
            at += r.len();
        }
        out
    }

    pub fn chunk(&self, k: usize) -> Range<usize> {
        chunk_range(self.p, self.m, k)
    }

    pub fn is_mine(&self, slot: u64) -> bool {
        self.my_slots.binary_search(&slot).is_ok()
    }

    pub fn next(&self) -> usize {
        (self.me + 1) % self.m
    }

    pub fn prev(&self) -> usize {
        (self.me + self.m - 1) % self.m
    }

    /// The chunk member `me` receives in ring reduce-scatter round `r`.
    pub fn ring_reduce_chunk(&self, r: usize) -> usize {
        (self.me + 2 * self.m - 1 - r % self.m) % self.m
    }

    /// The chunk member `me` receives in ring all-gather round `r`.
    pub fn ring_gather_chunk(&self, r: usize) -> usize {
        (self.me + self.m - r % self.m) % self.m
    }

    /// Most frames this member sends to member `dest` in one step.
    pub fn frames_per_step_to(&self, dest: usize) -> usize {
        let slots = self.my_slots.len();
        let pieces = |k: usize| piece_count(self.chunk(k).len(), self.mff);
        let grad = match self.reduction {
            Reduction::Exact if self.part.is_some() => {
                let part = self
                    .part
                    .as_ref()
                    .map_or(0, |p| p.gives.len() * (1 + slots) + p.stage_frames_per_step);
                slots * pieces(dest) + pieces(self.me) + part
            }
            Reduction::Exact => slots * pieces(dest) + pieces(self.me),
            Reduction::Ring if dest == self.next() => {
                let most = (0..self.m).map(pieces).max().unwrap_or(1);
                2 * self.m.saturating_sub(1) * most
            }
            Reduction::Ring => 0,
        };
        grad + slots
    }
}

/// Values to send: one logical message, cut into pieces by the sender.
#[derive(Debug)]
pub(super) struct Outgoing {
    /// Member indices to send it to.
    pub dests: Vec<usize>,
    pub kind: FrameKind,
    pub index: u64,
    pub chunk: u32,
    pub loss_sum: f64,
    pub values: Vec<f32>,
}

/// A chunk arriving in pieces.
#[derive(Debug)]
struct Assembly {
    values: Vec<f32>,
    got: Vec<bool>,
    missing: usize,
}

/// A slot's chunk assembled from the stage parts that reach into it (stages across
/// members): each value once, in any order.
#[derive(Debug)]
struct PartAssembly {
    values: Vec<f32>,
    /// Filled ranges of the chunk, sorted and disjoint.
    covered: Vec<Range<usize>>,
    filled: usize,
}

impl PartAssembly {
    fn new(len: usize) -> Self {
        Self {
            values: vec![0.0; len],
            covered: Vec::new(),
            filled: 0,
        }
    }

    /// Writes `values` at `offset`; true once every value of the chunk is in.
    fn fill(
        &mut self,
        offset: usize,
        values: impl ExactSizeIterator<Item = f32>,
    ) -> Result<bool, String> {
        let len = values.len();
        let end = offset.checked_add(len).filter(|&e| e <= self.values.len());
        let Some(end) = end else {
            return Err(format!(
                "a part of {len} values at offset {offset} of a chunk of {}",
                self.values.len()
            ));
        };
        let at = self.covered.partition_point(|r| r.end <= offset);
        if self.covered.get(at).is_some_and(|r| r.start < end) {
            return Err(format!(
                "the part at {offset}..{end} overlaps one already in"
            ));
        }
        self.covered.insert(at, offset..end);
        for (v, x) in self.values[offset..end].iter_mut().zip(values) {
            *v = x;
        }
        self.filled += len;
        Ok(self.filled == self.values.len())
    }
}

/// The reduced gradient, filled chunk by chunk.
#[derive(Debug, Default)]
struct Gathered {
    grad: Vec<f32>,
    done: Vec<bool>,
    count: usize,
}

impl Gathered {
    fn store(&mut self, geo: &Geometry, k: usize, values: &[f32]) -> Result<(), String> {
        if self.done.is_empty() {
            self.done = vec![false; geo.m];
            self.grad = vec![0.0; geo.p];
        }
        let range = geo.chunk(k);
        if self.done[k] {
            return Err(format!("chunk {k} reduced twice"));
        }
        if values.len() != range.len() {
            return Err(format!(
                "chunk {k} has {} values, expected {}",
                values.len(),
                range.len()
            ));
        }
        self.grad[range].copy_from_slice(values);
        self.done[k] = true;
        self.count += 1;
        Ok(())
    }
}

/// A left fold over this member's own slots, in slot order (Ring's local partial).
#[derive(Debug)]
struct PartialSum {
    expected: Vec<u64>,
    next: usize,
    pending: BTreeMap<u64, Vec<f32>>,
    acc: Option<Vec<f32>>,
}

impl PartialSum {
    fn new(geo: &Geometry) -> Self {
        Self {
            expected: geo.my_slots.clone(),
            next: 0,
            pending: BTreeMap::new(),
            // A member without slots contributes zeros.
            acc: geo.my_slots.is_empty().then(|| vec![0.0; geo.p]),
        }
    }

    fn add(&mut self, slot: u64, grad: Vec<f32>) {
        self.pending.insert(slot, grad);
        while let Some(g) = self
            .expected
            .get(self.next)
            .and_then(|s| self.pending.remove(s))
        {
            match &mut self.acc {
                None => self.acc = Some(g),
                Some(acc) => {
                    for (a, x) in acc.iter_mut().zip(&g) {
                        *a += *x;
                    }
                }
            }
            self.next += 1;
        }
    }

    fn done(&self) -> Option<&Vec<f32>> {
        if self.next == self.expected.len() {
            self.acc.as_ref()
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct RingState {
    partial: PartialSum,
    /// Assembled chunks received in each reduce-scatter round, not yet added.
    rs_recv: Vec<Option<Vec<f32>>>,
    /// The next reduce-scatter round to process.
    rs_next: usize,
    /// Round 0 sent.
    started: bool,
}

/// One step on one member.
#[derive(Debug)]
pub(super) struct StepState {
    step: u64,
    losses: Vec<Option<f32>>,
    losses_in: u64,
    local_in: HashSet<u64>,
    assembling: HashMap<(i32, u64), Assembly>,
    /// Stage parts: slots of this member's chunk being assembled, by slot.
    parts: HashMap<u64, PartAssembly>,
    done_keys: HashSet<(i32, u64)>,
    gathered: Gathered,
    /// Exact: the fold of this member's chunk over all slots.
    owner_fold: Option<SlotFold>,
    ring: Option<RingState>,
}

impl StepState {
    pub fn new(geo: &Geometry, step: u64) -> Self {
        let (owner_fold, ring) = match geo.reduction {
            Reduction::Exact => (Some(SlotFold::new(step, geo.num_slots)), None),
            Reduction::Ring => (
                None,
                Some(RingState {
                    partial: PartialSum::new(geo),
                    rs_recv: (0..geo.m.saturating_sub(1)).map(|_| None).collect(),
                    rs_next: 0,
                    started: false,
                }),
            ),
        };
        Self {
            step,
            losses: vec![None; usize::try_from(geo.num_slots).unwrap_or(usize::MAX)],
            losses_in: 0,
            local_in: HashSet::new(),
            assembling: HashMap::new(),
            parts: HashMap::new(),
            done_keys: HashSet::new(),
            gathered: Gathered::default(),
            owner_fold,
            ring,
        }
    }

    /// Slots whose loss is in.
    pub fn losses_in(&self) -> u64 {
        self.losses_in
    }

    /// True if a local rank already handed in `slot`.
    pub fn has_local(&self, slot: u64) -> bool {
        self.local_in.contains(&slot)
    }

    /// A local slot. `grad` is this member's own chunk (Exact) or the whole gradient
    /// (Ring); the caller sends the other chunks and the LOSS frames.
    pub fn local(
        &mut self,
        geo: &Geometry,
        slot: u64,
        loss_sum: f32,
        grad: Vec<f32>,
    ) -> Result<Vec<Outgoing>, String> {
        if !self.local_in.insert(slot) {
            return Err(format!("slot {slot} contributed twice"));
        }
        self.set_loss(slot, loss_sum)?;
        let mut out = Vec::new();
        match geo.reduction {
            Reduction::Exact => {
                self.fold_own(
                    geo,
                    SlotContribution {
                        slot,
                        loss_sum: 0.0,
                        grad,
                    },
                    &mut out,
                )?;
            }
            Reduction::Ring => {
                if let Some(ring) = &mut self.ring {
                    ring.partial.add(slot, grad);
                }
                self.advance_ring(geo, &mut out)?;
            }
        }
        Ok(out)
    }

    /// A local slot's stage part: `segments` are its values that fall into this
    /// member's chunk, with their offsets; `loss` only from the head stage. The caller
    /// sends the other chunks' segments and the LOSS frames.
    pub fn local_part(
        &mut self,
        geo: &Geometry,
        slot: u64,
        loss: Option<f32>,
        segments: Vec<(usize, &[f32])>,
    ) -> Result<Vec<Outgoing>, String> {
        if !self.local_in.insert(slot) {
            return Err(format!("slot {slot} contributed twice"));
        }
        if let Some(loss) = loss {
            self.set_loss(slot, loss)?;
        }
        let mut out = Vec::new();
        for (offset, values) in segments {
            self.fill_part(geo, slot, offset, values.iter().copied(), &mut out)?;
        }
        Ok(out)
    }

    /// One segment of slot `slot`'s part of this member's chunk; folds the slot once its
    /// chunk is complete.
    fn fill_part(
        &mut self,
        geo: &Geometry,
        slot: u64,
        offset: usize,
        values: impl ExactSizeIterator<Item = f32>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), String> {
        let key = (FrameKind::Slot as i32, slot);
        if self.done_keys.contains(&key) {
            return Err(format!(
                "a part of slot {slot} arrived after it was complete"
            ));
        }
        let len = geo.chunk(geo.me).len();
        let asm = self
            .parts
            .entry(slot)
            .or_insert_with(|| PartAssembly::new(len));
        if !asm
            .fill(offset, values)
            .map_err(|e| format!("slot {slot}: {e}"))?
        {
            return Ok(());
        }
        let values = self
            .parts
            .remove(&slot)
            .map(|a| a.values)
            .unwrap_or_default();
        self.done_keys.insert(key);
        self.fold_own(
            geo,
            SlotContribution {
                slot,
                loss_sum: 0.0,
                grad: values,
            },
            out,
        )
    }

    fn set_loss(&mut self, slot: u64, loss: f32) -> Result<(), String> {
        let n = self.losses.len();
        let cell = usize::try_from(slot)
            .ok()
            .and_then(|s| self.losses.get_mut(s))
            .ok_or_else(|| format!("slot {slot} out of range 0..{n}"))?;
        if cell.is_some() {
            return Err(format!("loss of slot {slot} arrived twice"));
        }
        *cell = Some(loss);
        self.losses_in += 1;
        Ok(())
    }

    /// A received frame (everything but STATE), from member `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn frame(
        &mut self,
        geo: &Geometry,
        from: usize,
        kind: FrameKind,
        index: u64,
        chunk: u32,
        offset: u64,
        loss_sum: f64,
        data: &[u8],
    ) -> Result<Vec<Outgoing>, String> {
        let mut out = Vec::new();
        if from == geo.me || from >= geo.m {
            return Err(format!("frame from member index {from}"));
        }
        let exact = geo.reduction == Reduction::Exact;
        let ring_rounds = geo.m.saturating_sub(1) as u64;
        let expected_chunk = match kind {
            FrameKind::Loss => {
                if geo.is_mine(index) && geo.gives_loss() {
                    return Err(format!("loss of slot {index}, which this member computes"));
                }
                let loss = loss_sum as f32;
                if f64::from(loss).to_bits() != loss_sum.to_bits() && !loss_sum.is_nan() {
                    return Err(format!("loss {loss_sum} of slot {index} is not an f32"));
                }
                self.set_loss(index, loss)?;
                return Ok(out);
            }
            FrameKind::Slot if exact && geo.part.is_some() => {
                if index >= geo.num_slots {
                    return Err(format!(
                        "gradient part of slot {index}, which is out of range"
                    ));
                }
                if chunk as usize != geo.me {
                    return Err(format!(
                        "gradient part of slot {index} for chunk {chunk}, expected chunk {}",
                        geo.me
                    ));
                }
                if !data.len().is_multiple_of(4) {
                    return Err(format!("a part of {} bytes", data.len()));
                }
                let offset = usize::try_from(offset).unwrap_or(usize::MAX);
                let values = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                self.fill_part(geo, index, offset, values, &mut out)?;
                return Ok(out);
            }
            FrameKind::Slot if exact => {
                if index >= geo.num_slots || geo.is_mine(index) {
                    return Err(format!(
                        "gradient of slot {index}, which is out of range or computed here"
                    ));
                }
                geo.me
            }
            FrameKind::Reduced if exact => from,
            FrameKind::RingReduce | FrameKind::RingGather if !exact => {
                if from != geo.prev() {
                    return Err(format!(
                        "ring frame from member {from}, expected only from {}",
                        geo.prev()
                    ));
                }
                if index >= ring_rounds {
                    return Err(format!("ring round {index} of {ring_rounds}"));
                }
                if kind == FrameKind::RingReduce {
                    geo.ring_reduce_chunk(index as usize)
                } else {
                    geo.ring_gather_chunk(index as usize)
                }
            }
            other => {
                return Err(format!(
                    "frame kind {} does not belong to the {} reduction",
                    other.as_str_name(),
                    geo.reduction
                ))
            }
        };
        if chunk as usize != expected_chunk {
            return Err(format!(
                "{} frame {index} for chunk {chunk}, expected chunk {expected_chunk}",
                kind.as_str_name()
            ));
        }
        let key_index = if kind == FrameKind::Reduced {
            u64::from(chunk)
        } else {
            index
        };
        let key = (kind as i32, key_index);
        if self.done_keys.contains(&key) {
            return Err(format!(
                "{} frame {index} chunk {chunk} arrived after it was complete",
                kind.as_str_name()
            ));
        }
        let len = geo.chunk(expected_chunk).len();
        let pieces = piece_count(len, geo.mff);
        let asm = self.assembling.entry(key).or_insert_with(|| Assembly {
            values: vec![0.0; len],
            got: vec![false; pieces],
            missing: pieces,
        });
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let piece = offset / geo.mff;
        if offset % geo.mff != 0 || piece >= pieces {
            return Err(format!(
                "piece at offset {offset} of a chunk of {len} values in pieces of {}",
                geo.mff
            ));
        }
        let count = geo.mff.min(len - offset.min(len));
        if data.len() != 4 * count {
            return Err(format!(
                "piece at offset {offset} has {} bytes, expected {}",
                data.len(),
                4 * count
            ));
        }
        if asm.got[piece] {
            return Err(format!("piece at offset {offset} arrived twice"));
        }
        asm.got[piece] = true;
        asm.missing -= 1;
        for (v, b) in asm.values[offset..offset + count]
            .iter_mut()
            .zip(data.chunks_exact(4))
        {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        if asm.missing > 0 {
            return Ok(out);
        }
        let values = self
            .assembling
            .remove(&key)
            .map(|a| a.values)
            .unwrap_or_default();
        self.done_keys.insert(key);
        match kind {
            FrameKind::Slot => self.fold_own(
                geo,
                SlotContribution {
                    slot: index,
                    loss_sum: 0.0,
                    grad: values,
                },
                &mut out,
            )?,
            FrameKind::Reduced => self.gathered.store(geo, from, &values)?,
            FrameKind::RingReduce => {
                if let Some(ring) = &mut self.ring {
                    ring.rs_recv[index as usize] = Some(values);
                }
                self.advance_ring(geo, &mut out)?;
            }
            FrameKind::RingGather => {
                self.gathered.store(geo, expected_chunk, &values)?;
                if index + 1 < ring_rounds {
                    out.push(Outgoing {
                        dests: vec![geo.next()],
                        kind: FrameKind::RingGather,
                        index: index + 1,
                        chunk: expected_chunk as u32,
                        loss_sum: 0.0,
                        values,
                    });
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// Exact: one slot of this member's chunk into the owner fold; once complete, the
    /// reduced chunk goes to every other member.
    fn fold_own(
        &mut self,
        geo: &Geometry,
        c: SlotContribution,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), String> {
        let Some(fold) = &mut self.owner_fold else {
            return Err("no owner fold in this reduction".into());
        };
        fold.add(c).map_err(|e| e.to_string())?;
        if !fold.is_complete() {
            return Ok(());
        }
        let reduced = fold.finish().map(|r| r.grad_sum).unwrap_or_default();
        self.owner_fold = None;
        self.gathered.store(geo, geo.me, &reduced)?;
        if geo.m > 1 {
            out.push(Outgoing {
                dests: (0..geo.m).filter(|&k| k != geo.me).collect(),
                kind: FrameKind::Reduced,
                index: 0,
                chunk: geo.me as u32,
                // Informational: receivers fold the loss from LOSS frames themselves.
                loss_sum: self.loss_sum().unwrap_or(0.0),
                values: reduced,
            });
        }
        Ok(())
    }

    /// Ring: send round 0 once the local partial is complete, then add every received
    /// reduce-scatter chunk in round order.
    fn advance_ring(&mut self, geo: &Geometry, out: &mut Vec<Outgoing>) -> Result<(), String> {
        let Some(ring) = &mut self.ring else {
            return Err("no ring state in this reduction".into());
        };
        let Some(partial) = ring.partial.done() else {
            return Ok(());
        };
        let rounds = geo.m - 1;
        if !ring.started {
            ring.started = true;
            if rounds == 0 {
                self.gathered.store(geo, 0, partial)?;
                return Ok(());
            }
            out.push(Outgoing {
                dests: vec![geo.next()],
                kind: FrameKind::RingReduce,
                index: 0,
                chunk: geo.me as u32,
                loss_sum: 0.0,
                values: partial[geo.chunk(geo.me)].to_vec(),
            });
        }
        while ring.rs_next < rounds {
            let r = ring.rs_next;
            let Some(received) = ring.rs_recv[r].take() else {
                break;
            };
            let c = geo.ring_reduce_chunk(r);
            let acc: Vec<f32> = received
                .iter()
                .zip(&partial[geo.chunk(c)])
                .map(|(a, b)| *a + *b)
                .collect();
            ring.rs_next += 1;
            if r + 1 < rounds {
                out.push(Outgoing {
                    dests: vec![geo.next()],
                    kind: FrameKind::RingReduce,
                    index: r as u64 + 1,
                    chunk: c as u32,
                    loss_sum: 0.0,
                    values: acc,
                });
            } else {
                self.gathered.store(geo, c, &acc)?;
                out.push(Outgoing {
                    dests: vec![geo.next()],
                    kind: FrameKind::RingGather,
                    index: 0,
                    chunk: c as u32,
                    loss_sum: 0.0,
                    values: acc,
                });
            }
        }
        Ok(())
    }

    /// The exact loss fold, once every slot's loss is in.
    fn loss_sum(&self) -> Option<f64> {
        let mut sum = 0.0f64;
        for l in &self.losses {
            sum += f64::from((*l)?);
        }
        Some(sum)
    }

    /// Which slots' losses are in, by slot.
    pub fn losses_present(&self) -> Vec<bool> {
        self.losses.iter().map(Option::is_some).collect()
    }

    /// Which members' reduced chunks are in, by member (all `false` before the first).
    pub fn chunks_present(&self, geo: &Geometry) -> Vec<bool> {
        if self.gathered.done.is_empty() {
            vec![false; geo.m]
        } else {
            self.gathered.done.clone()
        }
    }

    /// True once every chunk and every loss is in.
    pub fn is_complete(&self, geo: &Geometry) -> bool {
        self.gathered.count == geo.m && self.losses_in == self.losses.len() as u64
    }

    /// The result, once complete.
    pub fn finish(&mut self, geo: &Geometry) -> Option<Reduced> {
        if !self.is_complete(geo) {
            return None;
        }
        Some(Reduced {
            step: self.step,
            loss_sum: self.loss_sum()?,
            grad_sum: std::mem::take(&mut self.gathered.grad),
        })
    }
}

#[cfg(test)]
mod part_tests {
    use super::*;

    /// Parts fill a chunk in any order, each value once; overlaps and overruns are refused.
    #[test]
    fn part_assembly_table() {
        // (parts as (offset, len), expected result of each fill: Ok(complete) or an error
        // containing the text)
        type Case = (
            &'static [(usize, usize)],
            &'static [Result<bool, &'static str>],
        );
        let cases: &[Case] = &[
            (&[(0, 10)], &[Ok(true)]),
            (&[(5, 5), (0, 5)], &[Ok(false), Ok(true)]),
            (&[(0, 3), (7, 3), (3, 4)], &[Ok(false), Ok(false), Ok(true)]),
            (&[(0, 5), (4, 6)], &[Ok(false), Err("overlaps")]),
            (&[(5, 5), (0, 6)], &[Ok(false), Err("overlaps")]),
            (&[(8, 3)], &[Err("of a chunk of 10")]),
            (&[(0, 4), (4, 0), (4, 6)], &[Ok(false), Ok(false), Ok(true)]),
        ];
        for (parts, want) in cases {
            let mut a = PartAssembly::new(10);
            for (&(offset, len), want) in parts.iter().zip(*want) {
                let values = (offset..offset + len).map(|i| i as f32);
                match (a.fill(offset, values), want) {
                    (Ok(got), Ok(w)) => assert_eq!(got, *w, "{parts:?}"),
                    (Err(e), Err(w)) => assert!(e.contains(w), "{parts:?}: {e}"),
                    (got, w) => panic!("{parts:?}: got {got:?}, want {w:?}"),
                }
            }
            if want.last() == Some(&Ok(true)) {
                let expect: Vec<f32> = (0..10).map(|i| i as f32).collect();
                assert_eq!(a.values, expect, "{parts:?}");
            }
        }
    }

    /// A stage part's segments per chunk: the values of its ranges that fall into the
    /// chunk, with their place in the part's values and in the chunk.
    #[test]
    fn part_segments_cut_ranges_at_chunk_bounds() {
        let spec = CommSpec {
            members: (0..3)
                .map(|i| super::super::PeerAddr {
                    id: format!("m{i}"),
                    addr: "x:1".into(),
                })
                .collect(),
            stage: Some(StagePart {
                gives: vec![2..5, 8..12],
                head: false,
                stage_frames_per_step: 0,
            }),
            ..CommSpec::for_generation("j", 1, vec![0], 1, 1, 12, Reduction::Exact)
        };
        let geo = Geometry::new(&spec);
        // Chunks of 12 over 3 members: 0..4, 4..8, 8..12.
        assert_eq!(geo.part_segments(0), vec![(0..2, 2)]);
        assert_eq!(geo.part_segments(1), vec![(2..3, 0)]);
        assert_eq!(geo.part_segments(2), vec![(3..7, 0)]);
        assert!(!geo.gives_loss());
    }
}

//! Cutting a step's global batch into micro-batch slots and spreading slots over ranks.
//!
//! A step's global batch of `batch_size` samples is `num_slots = batch_size /
//! micro_batch_size` slots; slot `j` of step `k` holds global samples
//! `k * batch_size + j * micro_batch_size ..` (plus the cursor the run started from).
//! One slot is one forward/backward pass. Gradients are reduced per slot in slot order,
//! so which rank computed a slot never changes a step's result.

use std::ops::Range;

/// Errors in a batch layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The batch is not a whole number of micro-batches.
    #[error("batch size {batch_size} is not a multiple of micro-batch size {micro_batch_size}: pick a micro-batch size that divides it")]
    NotAMultiple {
        /// Samples per step.
        batch_size: u64,
        /// Samples per slot.
        micro_batch_size: u64,
    },
    /// A size was zero.
    #[error("batch size and micro-batch size must be at least 1 (got {batch_size} and {micro_batch_size})")]
    Zero {
        /// Samples per step.
        batch_size: u64,
        /// Samples per slot.
        micro_batch_size: u64,
    },
    /// More ranks than slots: some rank would have nothing to do.
    #[error("{ranks} ranks but only {num_slots} slots per step: use at most {num_slots} ranks or a smaller micro-batch size")]
    TooManyRanks {
        /// Ranks asked for.
        ranks: u64,
        /// Slots per step.
        num_slots: u64,
    },
}

/// The shape of one step's global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    /// Samples per optimizer step (the global batch).
    pub batch_size: u64,
    /// Samples per slot (one forward/backward pass).
    pub micro_batch_size: u64,
}

impl BatchLayout {
    /// A checked layout.
    pub fn new(batch_size: u64, micro_batch_size: u64) -> Result<Self, SlotError> {
        if batch_size == 0 || micro_batch_size == 0 {
            return Err(SlotError::Zero {
                batch_size,
                micro_batch_size,
            });
        }
        if !batch_size.is_multiple_of(micro_batch_size) {
            return Err(SlotError::NotAMultiple {
                batch_size,
                micro_batch_size,
            });
        }
        Ok(Self {
            batch_size,
            micro_batch_size,
        })
    }

    /// Slots per step.
    pub fn num_slots(&self) -> u64 {
        self.batch_size / self.micro_batch_size
    }

    /// Global sample indices of slot `slot` in the step that starts at `step_cursor`.
    pub fn slot_samples(&self, step_cursor: u64, slot: u64) -> Range<u64> {
        let start = step_cursor + slot * self.micro_batch_size;
        start..start + self.micro_batch_size
    }

    /// Checks that `ranks` ranks can share the slots.
    pub fn check_ranks(&self, ranks: u64) -> Result<(), SlotError> {
        if ranks == 0 || ranks > self.num_slots() {
            return Err(SlotError::TooManyRanks {
                ranks,
                num_slots: self.num_slots(),
            });
        }
        Ok(())
    }
}

/// The contiguous slots rank `rank` of `ranks` computes: the first `num_slots % ranks`
/// ranks get one slot more than the others.
pub fn slots_for_rank(num_slots: u64, ranks: u64, rank: u64) -> Range<u64> {
    assert!(ranks > 0 && rank < ranks, "rank {rank} of {ranks}");
    let base = num_slots / ranks;
    let extra = num_slots % ranks;
    let start = rank * base + rank.min(extra);
    let len = base + u64::from(rank < extra);
    start..start + len
}

/// Which member computes each slot: `ranks_of_member[k]` are the global ranks member `k`
/// hosts in a world of `world` ranks. A slot no listed rank computes goes to member 0.
pub fn slot_owners(num_slots: u64, world: u64, ranks_of_member: &[Vec<u32>]) -> Vec<usize> {
    let mut owner = vec![0usize; num_slots as usize];
    for (k, ranks) in ranks_of_member.iter().enumerate() {
        for &r in ranks.iter().filter(|&&r| u64::from(r) < world) {
            for slot in slots_for_rank(num_slots, world, u64::from(r)) {
                owner[slot as usize] = k;
            }
        }
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slot_owners_table() {
        // (slots, world, ranks of each member) -> owner of each slot
        type Row = (u64, u64, &'static [&'static [u32]], &'static [usize]);
        let table: &[Row] = &[
            (4, 1, &[&[0]], &[0, 0, 0, 0]),
            (4, 2, &[&[1], &[0]], &[1, 1, 0, 0]),
            (5, 3, &[&[0, 2], &[1]], &[0, 0, 1, 1, 0]),
            (6, 3, &[&[], &[2], &[0, 1]], &[2, 2, 2, 2, 1, 1]),
        ];
        for &(slots, world, members, want) in table {
            let members: Vec<Vec<u32>> = members.iter().map(|m| m.to_vec()).collect();
            assert_eq!(
                slot_owners(slots, world, &members),
                want,
                "{slots} {world} {members:?}"
            );
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn table_of_assignments() {
        // (slots, ranks) -> each rank's range
        let table: &[(u64, u64, &[Range<u64>])] = &[
            (4, 1, &[0..4]),
            (4, 2, &[0..2, 2..4]),
            (4, 3, &[0..2, 2..3, 3..4]),
            (12, 3, &[0..4, 4..8, 8..12]),
            (5, 5, &[0..1, 1..2, 2..3, 3..4, 4..5]),
            (3, 4, &[0..1, 1..2, 2..3, 3..3]),
        ];
        for (slots, ranks, want) in table {
            let got: Vec<_> = (0..*ranks)
                .map(|r| slots_for_rank(*slots, *ranks, r))
                .collect();
            assert_eq!(&got, want, "slots {slots} ranks {ranks}");
        }
    }

    #[test]
    fn layout_errors() {
        assert!(matches!(
            BatchLayout::new(12, 5),
            Err(SlotError::NotAMultiple { .. })
        ));
        assert!(matches!(
            BatchLayout::new(0, 1),
            Err(SlotError::Zero { .. })
        ));
        let l = BatchLayout::new(12, 4).unwrap();
        assert_eq!(l.num_slots(), 3);
        assert!(l.check_ranks(3).is_ok());
        assert!(matches!(
            l.check_ranks(4),
            Err(SlotError::TooManyRanks { .. })
        ));
        assert_eq!(l.slot_samples(24, 2), 32..36);
    }

    proptest! {
        /// Every slot goes to exactly one rank, in order.
        #[test]
        fn slots_partition_exactly(slots in 1u64..200, ranks in 1u64..50) {
            let mut next = 0;
            for r in 0..ranks {
                let range = slots_for_rank(slots, ranks, r);
                prop_assert_eq!(range.start, next);
                next = range.end;
            }
            prop_assert_eq!(next, slots);
        }
    }
}

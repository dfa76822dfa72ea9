//! The sampler: which training window each sample of the run reads.
//!
//! The training token stream is cut into `num_windows` non-overlapping windows of
//! `block_size + 1` tokens (inputs and shifted targets). Epoch `e` visits every
//! window once, in a permutation seeded by `(seed, e)`. Samples are numbered globally
//! from 0: sample `s` is position `s % num_windows` of epoch `s / num_windows`.
//!
//! The **cursor** is the number of samples consumed so far. Together with the seed it
//! is the whole data-loader state: a resumed run, or a run with a different number of
//! ranks, reads exactly the same samples in the same places.

use crate::rng::SplitMix64;

/// A deterministic sample order over `num_windows` windows. It caches the permutation
/// of the last epoch asked for; the result never depends on the cache.
#[derive(Clone, Debug)]
pub struct Sampler {
    seed: u64,
    num_windows: u64,
    cached_epoch: Option<u64>,
    cached_perm: Vec<u32>,
}

impl Sampler {
    /// A sampler over `num_windows` windows (must be > 0 and fit in `u32`).
    ///
    /// # Panics
    /// If `num_windows` is 0 or above `u32::MAX`.
    pub fn new(seed: u64, num_windows: u64) -> Self {
        assert!(
            num_windows > 0 && num_windows <= u64::from(u32::MAX),
            "bad window count {num_windows}"
        );
        Self {
            seed,
            num_windows,
            cached_epoch: None,
            cached_perm: Vec::new(),
        }
    }

    /// Number of windows in one epoch.
    pub fn num_windows(&self) -> u64 {
        self.num_windows
    }

    /// The window read by global sample `sample` (0-based).
    pub fn window(&mut self, sample: u64) -> u64 {
        let epoch = sample / self.num_windows;
        let pos = (sample % self.num_windows) as usize;
        if self.cached_epoch != Some(epoch) {
            self.cached_perm = epoch_permutation(self.seed, epoch, self.num_windows);
            self.cached_epoch = Some(epoch);
        }
        u64::from(self.cached_perm[pos])
    }

    /// The windows of the samples `cursor .. cursor + count`.
    pub fn windows(&mut self, cursor: u64, count: u64) -> Vec<u64> {
        (cursor..cursor + count).map(|s| self.window(s)).collect()
    }
}

/// The permutation of `0..num_windows` visited in `epoch` (Fisher-Yates driven by a
/// SplitMix64 stream derived from `(seed, epoch)`).
pub fn epoch_permutation(seed: u64, epoch: u64, num_windows: u64) -> Vec<u32> {
    let mut rng = SplitMix64::derive(
        seed ^ crate::rng::mix(epoch.wrapping_add(1)),
        "sampler-epoch",
    );
    let mut perm: Vec<u32> = (0..num_windows as u32).collect();
    for i in (1..perm.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The validation windows an evaluation reads: the first `count` windows of a seeded
/// permutation of the validation split (cycling when `count > num_windows`). Every
/// evaluation of a run reads the same windows, so val losses are comparable over time.
pub fn eval_windows(seed: u64, num_windows: u64, count: u64) -> Vec<u64> {
    if num_windows == 0 {
        return Vec::new();
    }
    let perm = epoch_permutation(seed ^ 0x7661_6c00, 0, num_windows);
    (0..count)
        .map(|i| u64::from(perm[(i % num_windows) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_epoch_visits_every_window_once() {
        let mut s = Sampler::new(3, 97);
        for epoch in 0..3u64 {
            let mut seen: Vec<u64> = s.windows(epoch * 97, 97);
            seen.sort_unstable();
            assert_eq!(seen, (0..97).collect::<Vec<_>>());
        }
    }

    #[test]
    fn epochs_and_seeds_differ() {
        let mut a = Sampler::new(1, 1000);
        let e0 = a.windows(0, 1000);
        let e1 = a.windows(1000, 1000);
        assert_ne!(e0, e1);
        let mut b = Sampler::new(2, 1000);
        assert_ne!(e0, b.windows(0, 1000));
    }

    #[test]
    fn eval_windows_are_fixed_and_cycle() {
        assert_eq!(eval_windows(1, 5, 7), eval_windows(1, 5, 7));
        let w = eval_windows(1, 5, 10);
        assert_eq!(&w[..5], &w[5..]);
        let mut first: Vec<u64> = w[..5].to_vec();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert!(eval_windows(1, 0, 3).is_empty());
    }

    proptest! {
        /// The window of a sample never depends on what was asked before (resume safety).
        #[test]
        fn window_is_a_pure_function_of_seed_and_index(seed in any::<u64>(), n in 1u64..500, probes in proptest::collection::vec(0u64..5000, 1..40)) {
            let mut warm = Sampler::new(seed, n);
            for &p in &probes {
                let fresh = Sampler::new(seed, n).window(p);
                prop_assert_eq!(warm.window(p), fresh);
                prop_assert!(fresh < n);
            }
        }
    }
}

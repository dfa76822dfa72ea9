//! The streaming sampler: which window of which shard of which source every sample of
//! a run reads, for a prepared dataset of many sources, each cut into token shards.
//!
//! Sample `s` is a pure function of `(config, s)`; the cursor (samples consumed) stays
//! the whole data-loader state, so a resumed run, or a run with any number of ranks,
//! reads exactly the same samples.
//!
//! Two levels:
//!
//! 1. **Mixture.** Samples are cut into blocks of [`MIX_BLOCK`]. Each source gets a fixed
//!    quota per block (its weight share of [`MIX_BLOCK`], largest-remainder rounding, so
//!    the drawn shares match the weights to within `1 / MIX_BLOCK` over every block), and
//!    the block's source labels are shuffled by a permutation seeded by `(seed, block)`.
//!    The `n`-th sample drawn from a source is that source's `n`-th window in its own
//!    stream, which it visits in epochs of its own: a small source with a large weight
//!    repeats more often than a large one.
//! 2. **Within a source.** Epoch `e` permutes the source's shards (seeded by
//!    `(seed, source, e)`) and cuts the permuted order into groups of `shuffle_shards`
//!    (K) shards. The group's windows are visited in a permutation seeded by
//!    `(seed, source, e, group)`. Only the current group of each source (and the next,
//!    near a group boundary) is needed at a time, which is what lets a loader fetch
//!    shards ahead with a bounded prefetch: a global permutation of every window would
//!    need the whole dataset resident.
//!
//! A window is `block_size + 1` tokens inside one shard; the tail of a shard shorter than
//! a window is never read. The loader (a shell) fetches shards in the order
//! [`MixtureSampler::upcoming`] names them.

use crate::rng::{mix, SplitMix64};

/// Samples per mixture block: every block holds each source's exact quota.
pub const MIX_BLOCK: u64 = 1024;

/// One source of a mixture.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcePlan {
    /// The source's name (for errors and reasons).
    pub name: String,
    /// Mixture weight (any non-negative scale; 0 drops the source).
    pub weight: f64,
    /// Training windows in each of its shards, in manifest order (0 for a shard shorter
    /// than a window, or one held out for validation: never fetched).
    pub shard_windows: Vec<u64>,
}

/// Everything that fixes a streamed sample order.
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureConfig {
    /// Data-order seed.
    pub seed: u64,
    /// K: shards whose windows are shuffled together (at least 1).
    pub shuffle_shards: u32,
    /// The sources, in manifest order.
    pub sources: Vec<SourcePlan>,
}

/// Why a mixture cannot be sampled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MixtureError {
    /// A bad configuration, in words (names the source and what to do).
    #[error("{0}")]
    Invalid(String),
}

/// Where one sample reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleLoc {
    /// Source index (manifest order).
    pub source: u32,
    /// Shard index within the source (manifest order).
    pub shard: u32,
    /// Window index within the shard.
    pub window: u64,
    /// The source's group sequence number (`epoch * groups_per_epoch + group`).
    pub group: u64,
}

/// A group of shards a loader must hold from `first_sample` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupNeed {
    /// First global sample that reads it (clamped to the `from` asked for).
    pub first_sample: u64,
    /// Source index.
    pub source: u32,
    /// The source's group sequence number.
    pub group: u64,
    /// Its shards with at least one window (indices within the source).
    pub shards: Vec<u32>,
}

/// One mixture block's shuffled labels, with the lookups both directions need.
#[derive(Clone, Debug)]
struct Block {
    index: u64,
    /// Source of each position.
    label: Vec<u32>,
    /// Rank of each position among the positions of its source.
    rank: Vec<u32>,
    /// Positions of each source, in order.
    positions: Vec<Vec<u32>>,
}

/// One epoch of one source: its shard order and group boundaries.
#[derive(Clone, Debug)]
struct Epoch {
    source: u32,
    epoch: u64,
    /// Shards in visiting order.
    order: Vec<u32>,
    /// `group_start[g]`: windows of the epoch before group `g` (one extra entry: total).
    group_start: Vec<u64>,
}

/// One group's window permutation.
#[derive(Clone, Debug)]
struct GroupPerm {
    source: u32,
    seq: u64,
    perm: Vec<u32>,
    /// Shards of the group and the cumulative windows before each (one extra: total).
    shards: Vec<u32>,
    starts: Vec<u64>,
}

/// How many of each kind of table a sampler keeps (the result never depends on them).
const CACHE_ENTRIES: usize = 4;

/// A deterministic streamed sample order over a mixture of sharded sources. It caches
/// the tables of recently asked blocks, epochs and groups; results never depend on them.
#[derive(Clone, Debug)]
pub struct MixtureSampler {
    cfg: MixtureConfig,
    /// Samples per block drawn from each source.
    quotas: Vec<u64>,
    /// Training windows of one epoch of each source.
    windows: Vec<u64>,
    blocks: Vec<Block>,
    epochs: Vec<Epoch>,
    groups: Vec<GroupPerm>,
}

/// A generator for one table, derived from the seed and the table's coordinates.
fn rng_for(seed: u64, purpose: &str, parts: &[u64]) -> SplitMix64 {
    let mut h = seed;
    for &p in parts {
        h = mix(h ^ mix(p.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    }
    SplitMix64::derive(h, purpose)
}

fn shuffle<T>(rng: &mut SplitMix64, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Per-block quotas: each weight's share of `block` by largest remainder (ties to the
/// lower index).
pub fn quotas(weights: &[f64], block: u64) -> Vec<u64> {
    let total: f64 = weights.iter().sum();
    if weights.is_empty() || total.is_nan() || total <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / total * block as f64).collect();
    let mut q: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut left = block.saturating_sub(q.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        if weights[i] > 0.0 {
            q[i] += 1;
            left -= 1;
        }
    }
    q
}

fn remember<T>(cache: &mut Vec<T>, item: T) -> &T {
    if cache.len() >= CACHE_ENTRIES {
        cache.remove(0);
    }
    cache.push(item);
    cache.last().expect("just pushed")
}

impl MixtureSampler {
    /// A sampler for `cfg`.
    ///
    /// # Errors
    /// No source with a positive weight; a negative or non-finite weight; a source with
    /// a positive weight but no training window; a weight share below `1 / MIX_BLOCK`;
    /// `shuffle_shards` 0 or a shard with more than `u32::MAX` windows.
    pub fn new(cfg: MixtureConfig) -> Result<Self, MixtureError> {
        let bad = |s: String| Err(MixtureError::Invalid(s));
        if cfg.shuffle_shards == 0 {
            return bad("the shard shuffle window K must be at least 1".into());
        }
        for s in &cfg.sources {
            if !(s.weight.is_finite() && s.weight >= 0.0) {
                return bad(format!(
                    "source {}: weight {} is not a non-negative number: fix it in the dataset manifest",
                    s.name, s.weight
                ));
            }
        }
        let weights: Vec<f64> = cfg.sources.iter().map(|s| s.weight).collect();
        if !weights.iter().any(|&w| w > 0.0) {
            return bad("no source has a positive weight: nothing to train on".into());
        }
        let quotas = quotas(&weights, MIX_BLOCK);
        let mut windows = Vec::with_capacity(cfg.sources.len());
        for (s, &q) in cfg.sources.iter().zip(&quotas) {
            if s.shard_windows.len() > u32::MAX as usize
                || s.shard_windows.iter().any(|&w| w > u64::from(u32::MAX))
            {
                return bad(format!("source {}: too many windows", s.name));
            }
            let w: u64 = s.shard_windows.iter().sum();
            if s.weight > 0.0 && w == 0 {
                return bad(format!(
                    "source {}: no training window (its shards are shorter than one sample, or its only \
                     shards are held out): give it more text, a smaller --preset, or weight 0",
                    s.name
                ));
            }
            if s.weight > 0.0 && q == 0 {
                return bad(format!(
                    "source {}: weight share below 1/{MIX_BLOCK}: raise its weight or set it to 0",
                    s.name
                ));
            }
            windows.push(w);
        }
        Ok(Self {
            cfg,
            quotas,
            windows,
            blocks: Vec::new(),
            epochs: Vec::new(),
            groups: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MixtureConfig {
        &self.cfg
    }

    /// Samples drawn from each source in every block of [`MIX_BLOCK`].
    pub fn quotas(&self) -> &[u64] {
        &self.quotas
    }

    /// One line saying how samples are drawn.
    pub fn reason(&self) -> String {
        let parts: Vec<String> = self
            .cfg
            .sources
            .iter()
            .zip(&self.quotas)
            .zip(&self.windows)
            .map(|((s, q), w)| format!("{} {q}/{MIX_BLOCK} ({w} windows)", s.name))
            .collect();
        format!(
            "mixture per block of {MIX_BLOCK} samples: {}; shards shuffled per epoch, windows within groups of {}",
            parts.join(", "),
            self.cfg.shuffle_shards
        )
    }

    fn block(&mut self, index: u64) -> &Block {
        if let Some(i) = self.blocks.iter().position(|b| b.index == index) {
            return &self.blocks[i];
        }
        let mut label: Vec<u32> = Vec::with_capacity(MIX_BLOCK as usize);
        for (src, &q) in self.quotas.iter().enumerate() {
            label.extend(std::iter::repeat_n(src as u32, q as usize));
        }
        shuffle(
            &mut rng_for(self.cfg.seed, "mixture-block", &[index]),
            &mut label,
        );
        let mut positions = vec![Vec::new(); self.quotas.len()];
        let mut rank = Vec::with_capacity(label.len());
        for (pos, &l) in label.iter().enumerate() {
            rank.push(positions[l as usize].len() as u32);
            positions[l as usize].push(pos as u32);
        }
        remember(
            &mut self.blocks,
            Block {
                index,
                label,
                rank,
                positions,
            },
        )
    }

    /// The source of sample `s` and the index of that draw within the source.
    pub fn draw(&mut self, s: u64) -> (u32, u64) {
        let (b, pos) = (s / MIX_BLOCK, (s % MIX_BLOCK) as usize);
        let block = self.block(b);
        let src = block.label[pos];
        let n = b * self.quotas[src as usize] + u64::from(self.block(b).rank[pos]);
        (src, n)
    }

    /// Samples below `s` drawn from `source`.
    pub fn draws_before(&mut self, source: u32, s: u64) -> u64 {
        let q = self.quotas[source as usize];
        let (b, pos) = (s / MIX_BLOCK, (s % MIX_BLOCK) as u32);
        let in_block = self.block(b).positions[source as usize].partition_point(|&p| p < pos);
        b * q + in_block as u64
    }

    /// The global sample of `source`'s `n`-th draw.
    ///
    /// # Panics
    /// If the source has quota 0 (weight 0).
    pub fn sample_of(&mut self, source: u32, n: u64) -> u64 {
        let q = self.quotas[source as usize];
        assert!(q > 0, "source {source} is never drawn");
        let (b, r) = (n / q, (n % q) as usize);
        b * MIX_BLOCK + u64::from(self.block(b).positions[source as usize][r])
    }

    fn epoch(&mut self, source: u32, epoch: u64) -> &Epoch {
        if let Some(i) = self
            .epochs
            .iter()
            .position(|e| e.source == source && e.epoch == epoch)
        {
            return &self.epochs[i];
        }
        let plan = &self.cfg.sources[source as usize];
        let mut order: Vec<u32> = (0..plan.shard_windows.len() as u32).collect();
        shuffle(
            &mut rng_for(self.cfg.seed, "mixture-shards", &[u64::from(source), epoch]),
            &mut order,
        );
        let mut group_start = vec![0u64];
        for chunk in order.chunks(self.cfg.shuffle_shards as usize) {
            let w: u64 = chunk.iter().map(|&i| plan.shard_windows[i as usize]).sum();
            group_start.push(group_start.last().unwrap() + w);
        }
        remember(
            &mut self.epochs,
            Epoch {
                source,
                epoch,
                order,
                group_start,
            },
        )
    }

    fn groups_per_epoch(&self, source: u32) -> u64 {
        let shards = self.cfg.sources[source as usize].shard_windows.len() as u64;
        shards.div_ceil(u64::from(self.cfg.shuffle_shards))
    }

    /// The group sequence number of `source`'s `n`-th draw and the draw's offset in it.
    fn group_of(&mut self, source: u32, n: u64) -> (u64, u64) {
        let w = self.windows[source as usize];
        let (e, p) = (n / w, n % w);
        let per = self.groups_per_epoch(source);
        let ep = self.epoch(source, e);
        // The last group whose start is <= p (empty groups are skipped over).
        let g = ep.group_start.partition_point(|&x| x <= p) - 1;
        let off = p - ep.group_start[g];
        (e * per + g as u64, off)
    }

    /// The first draw index of `source`'s group `seq`.
    fn group_first_draw(&mut self, source: u32, seq: u64) -> u64 {
        let per = self.groups_per_epoch(source);
        let w = self.windows[source as usize];
        let (e, g) = (seq / per, (seq % per) as usize);
        e * w + self.epoch(source, e).group_start[g]
    }

    fn group(&mut self, source: u32, seq: u64) -> &GroupPerm {
        if let Some(i) = self
            .groups
            .iter()
            .position(|g| g.source == source && g.seq == seq)
        {
            return &self.groups[i];
        }
        let per = self.groups_per_epoch(source);
        let (e, g) = (seq / per, (seq % per) as usize);
        let k = self.cfg.shuffle_shards as usize;
        let order = self.epoch(source, e).order.clone();
        let plan = &self.cfg.sources[source as usize];
        let shards: Vec<u32> = order[g * k..((g + 1) * k).min(order.len())].to_vec();
        let mut starts = vec![0u64];
        for &sh in &shards {
            starts.push(starts.last().unwrap() + plan.shard_windows[sh as usize]);
        }
        let total = *starts.last().unwrap();
        let mut perm: Vec<u32> = (0..total as u32).collect();
        shuffle(
            &mut rng_for(self.cfg.seed, "mixture-group", &[u64::from(source), seq]),
            &mut perm,
        );
        remember(
            &mut self.groups,
            GroupPerm {
                source,
                seq,
                perm,
                shards,
                starts,
            },
        )
    }

    /// Where sample `s` reads.
    pub fn locate(&mut self, s: u64) -> SampleLoc {
        let (source, n) = self.draw(s);
        let (seq, off) = self.group_of(source, n);
        let g = self.group(source, seq);
        let idx = u64::from(g.perm[off as usize]);
        let i = g.starts.partition_point(|&x| x <= idx) - 1;
        SampleLoc {
            source,
            shard: g.shards[i],
            window: idx - g.starts[i],
            group: seq,
        }
    }

    /// The groups samples `from..` need, each source's next `per_source` groups (its
    /// current one first), ordered by the first sample that reads them (then source).
    /// A loader that holds the first groups of this list, in order, holds what the next
    /// samples read.
    pub fn upcoming(&mut self, from: u64, per_source: usize) -> Vec<GroupNeed> {
        let mut out = Vec::new();
        for source in 0..self.cfg.sources.len() as u32 {
            if self.quotas[source as usize] == 0 {
                continue;
            }
            let n0 = self.draws_before(source, from);
            let (seq0, _) = self.group_of(source, n0);
            for seq in seq0..seq0 + per_source as u64 {
                let first = match seq == seq0 {
                    true => from,
                    false => {
                        let n = self.group_first_draw(source, seq);
                        self.sample_of(source, n)
                    }
                };
                let per = self.groups_per_epoch(source);
                let k = self.cfg.shuffle_shards as usize;
                let g = (seq % per) as usize;
                let order = self.epoch(source, seq / per).order.clone();
                let windows = &self.cfg.sources[source as usize].shard_windows;
                let shards: Vec<u32> = order[g * k..((g + 1) * k).min(order.len())]
                    .iter()
                    .copied()
                    .filter(|&sh| windows[sh as usize] > 0)
                    .collect();
                if shards.is_empty() {
                    continue;
                }
                out.push(GroupNeed {
                    first_sample: first,
                    source,
                    group: seq,
                    shards,
                });
            }
        }
        out.sort_by_key(|g| (g.first_sample, g.source, g.group));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn cfg(seed: u64, k: u32, sources: &[(f64, &[u64])]) -> MixtureConfig {
        MixtureConfig {
            seed,
            shuffle_shards: k,
            sources: sources
                .iter()
                .enumerate()
                .map(|(i, (w, sh))| SourcePlan {
                    name: format!("s{i}"),
                    weight: *w,
                    shard_windows: sh.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn quota_table() {
        let cases: &[(&[f64], u64, &[u64])] = &[
            (&[1.0], 1024, &[1024]),
            (&[1.0, 1.0], 1024, &[512, 512]),
            (&[0.5, 0.3, 0.2], 1000, &[500, 300, 200]),
            (&[1.0, 1.0, 1.0], 1024, &[342, 341, 341]),
            (&[2.0, 0.0, 1.0], 3, &[2, 0, 1]),
            (&[0.0, 0.0], 8, &[0, 0]),
        ];
        for (w, b, want) in cases {
            assert_eq!(quotas(w, *b), want.to_vec(), "{w:?}");
        }
    }

    #[test]
    fn three_source_shares_match_weights_within_one_percent() {
        let weights = [5.0, 3.0, 2.0];
        let mut s = MixtureSampler::new(cfg(
            7,
            2,
            &[
                (weights[0], &[40, 40, 40]),
                (weights[1], &[30, 7]),
                (weights[2], &[50, 50, 50, 50]),
            ],
        ))
        .unwrap();
        let mut counts = [0u64; 3];
        for i in 0..10_000u64 {
            counts[s.locate(i).source as usize] += 1;
        }
        for (c, w) in counts.iter().zip(weights) {
            let share = *c as f64 / 10_000.0;
            assert!((share - w / 10.0).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn each_source_epoch_visits_every_window_once_shards_in_groups() {
        // One source: its draws are consecutive samples.
        let shards: &[u64] = &[5, 3, 0, 4, 6, 2, 5];
        let total: u64 = shards.iter().sum();
        let mut s = MixtureSampler::new(cfg(3, 2, &[(1.0, shards)])).unwrap();
        let mut orders = Vec::new();
        for e in 0..3u64 {
            let mut seen = BTreeSet::new();
            let mut order = Vec::new();
            for i in e * total..(e + 1) * total {
                let l = s.locate(i);
                assert!(l.window < shards[l.shard as usize]);
                assert!(
                    seen.insert((l.shard, l.window)),
                    "window read twice in epoch {e}"
                );
                if order.last() != Some(&l.group) {
                    order.push(l.group);
                }
            }
            assert_eq!(seen.len() as u64, total);
            // Groups are visited one after the other, never interleaved.
            let distinct: BTreeSet<_> = order.iter().collect();
            assert_eq!(distinct.len(), order.len(), "{order:?}");
            let shard_order: Vec<u32> = s.epoch(0, e).order.clone();
            orders.push(shard_order);
        }
        assert!(
            orders[0] != orders[1] || orders[1] != orders[2],
            "epochs permute shards"
        );
    }

    #[test]
    fn a_group_holds_at_most_k_shards() {
        let mut s = MixtureSampler::new(cfg(9, 3, &[(1.0, &[4; 10]), (1.0, &[3; 7])])).unwrap();
        let mut by_group: BTreeMap<(u32, u64), BTreeSet<u32>> = BTreeMap::new();
        for i in 0..500 {
            let l = s.locate(i);
            by_group
                .entry((l.source, l.group))
                .or_default()
                .insert(l.shard);
        }
        assert!(by_group.values().all(|sh| sh.len() <= 3));
    }

    #[test]
    fn bad_configs_are_refused_by_name() {
        let cases: &[(MixtureConfig, &str)] = &[
            (cfg(1, 0, &[(1.0, &[3])]), "at least 1"),
            (cfg(1, 1, &[(0.0, &[3])]), "no source"),
            (cfg(1, 1, &[(1.0, &[3]), (-1.0, &[3])]), "s1"),
            (
                cfg(1, 1, &[(1.0, &[3]), (1.0, &[0, 0])]),
                "s1: no training window",
            ),
            (cfg(1, 1, &[(1e6, &[3]), (1.0, &[3])]), "s1: weight share"),
        ];
        for (c, want) in cases {
            let err = MixtureSampler::new(c.clone()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Weight 0 drops a source even without windows.
        MixtureSampler::new(cfg(1, 1, &[(1.0, &[3]), (0.0, &[])])).unwrap();
    }

    #[test]
    fn upcoming_lists_what_the_next_samples_read() {
        let c = cfg(
            5,
            2,
            &[(2.0, &[6, 6, 6, 6, 6]), (1.0, &[4, 4, 4]), (1.0, &[9])],
        );
        let mut s = MixtureSampler::new(c).unwrap();
        for from in [0u64, 17, 40, 1000, 5000] {
            let need = s.upcoming(from, 2);
            assert!(need
                .windows(2)
                .all(|w| w[0].first_sample <= w[1].first_sample));
            assert!(need.iter().all(|g| g.first_sample >= from));
            // Every sample from `from` until the first second-group need reads a listed
            // shard, and each listed later group really starts at its first sample.
            let horizon = need
                .iter()
                .filter(|g| g.first_sample > from)
                .map(|g| g.first_sample)
                .min()
                .unwrap_or(from + 1);
            for i in from..horizon.max(from + 1) {
                let l = s.locate(i);
                assert!(
                    need.iter().any(|g| g.source == l.source
                        && g.group == l.group
                        && g.shards.contains(&l.shard)),
                    "sample {i} reads {l:?}, not in {need:?}"
                );
            }
            for g in need.iter().filter(|g| g.first_sample > from) {
                let l = s.locate(g.first_sample);
                assert_eq!((l.source, l.group), (g.source, g.group));
                let before = s.locate(g.first_sample - 1);
                assert!(!(before.source == g.source && before.group == g.group));
            }
        }
    }

    proptest! {
        /// Where a sample reads never depends on what was asked before (resume and any
        /// rank count), and the inverse lookups agree with it.
        #[test]
        fn locate_is_a_pure_function_of_config_and_index(
            seed in any::<u64>(),
            k in 1u32..4,
            shards in proptest::collection::vec(proptest::collection::vec(0u64..12, 1..6), 1..4),
            weights in proptest::collection::vec(1u32..5, 4),
            probes in proptest::collection::vec(0u64..6000, 1..30),
        ) {
            let mut sources: Vec<(f64, &[u64])> = Vec::new();
            for (i, sh) in shards.iter().enumerate() {
                let w = if sh.iter().sum::<u64>() == 0 { 0.0 } else { f64::from(weights[i]) };
                sources.push((w, sh));
            }
            prop_assume!(sources.iter().any(|s| s.0 > 0.0));
            let c = cfg(seed, k, &sources);
            let mut warm = MixtureSampler::new(c.clone()).unwrap();
            for &p in &probes {
                let mut fresh = MixtureSampler::new(c.clone()).unwrap();
                let l = fresh.locate(p);
                prop_assert_eq!(warm.locate(p), l);
                prop_assert!(l.window < shards[l.source as usize][l.shard as usize]);
                let (src, n) = warm.draw(p);
                prop_assert_eq!(warm.sample_of(src, n), p);
                prop_assert_eq!(warm.draws_before(src, p), n);
            }
        }
    }
}

//! The memorisation probe: canary sequences planted in the training stream, and their
//! exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).
//!
//! A canary is a random token sequence, a `prefix` followed by a `secret`, drawn from a
//! seeded RNG over the ids `0..alphabet`. [`CanaryPlan::new`] draws `per_reps` canaries for
//! each repetition count `r` of [`CanaryConfig::reps`] and picks, for each, `r` distinct
//! global sample indices below a horizon (the run's planned samples) and an offset inside
//! each such sample's window: the trainer overwrites those window tokens with the canary
//! ([`CanaryPlan::overlay`]). Which samples carry which canary is a pure function of
//! (seed, config, alphabet, horizon, window), so a run with canaries is bit-identical
//! whatever the number of ranks and across a resume, and a run without them reads the
//! same windows as before.
//!
//! Exposure ([`exposure`]): the canary's log-perplexity (the secret's negative log2
//! likelihood given the prefix) is ranked among candidates, the same prefix with other
//! secrets from the space R of `alphabet^secret_tokens` sequences.
//! `exposure = log2 |R| - log2 rank`. When R is small enough every other secret is a
//! candidate and the rank is exact; otherwise the rank is estimated from a uniform sample
//! of `n` candidates as `|R| * (1 + lower) / (n + 1)`, which can show at most
//! `log2 (n + 1)` bits; [`Exposure::extrapolated_bits`] adds the estimate from a normal
//! fit of the candidates' log-perplexities (the paper fits a skew-normal), which reaches
//! beyond that bound.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// What to plant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryConfig {
    /// Canaries per repetition count (0: no canaries).
    pub per_reps: u32,
    /// Repetition counts: each of `per_reps` canaries of count `r` is inserted `r` times.
    pub reps: Vec<u64>,
    /// Tokens of a canary's prefix (the context its secret is scored in).
    pub prefix_tokens: usize,
    /// Tokens of a canary's secret (the part exposure is measured on).
    pub secret_tokens: usize,
}

impl CanaryConfig {
    /// Tokens of one canary (prefix and secret).
    pub fn tokens(&self) -> usize {
        self.prefix_tokens + self.secret_tokens
    }

    /// Insertions in all: `per_reps * sum(reps)`.
    pub fn insertions(&self) -> u64 {
        u64::from(self.per_reps) * self.reps.iter().sum::<u64>()
    }
}

/// Why a canary plan cannot be made; each names the flag to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanaryError {
    /// No repetition counts, or a count of zero.
    #[error("--canary-reps {reps:?}: give one or more repetition counts, each at least 1")]
    BadReps {
        /// The counts given.
        reps: Vec<u64>,
    },
    /// A prefix or secret of zero tokens.
    #[error("--canary-prefix-tokens {prefix} / --canary-secret-tokens {secret}: each must be at least 1")]
    EmptyPart {
        /// Prefix tokens.
        prefix: usize,
        /// Secret tokens.
        secret: usize,
    },
    /// A canary longer than a training window.
    #[error("a canary of {tokens} tokens (--canary-prefix-tokens + --canary-secret-tokens) does not fit a training window of {window} tokens (block size + 1): use shorter canaries or a larger --preset")]
    TooLong {
        /// Canary tokens.
        tokens: usize,
        /// Window tokens.
        window: usize,
    },
    /// More insertions than planned samples.
    #[error("{insertions} canary insertions (--canaries x the sum of --canary-reps) exceed the run's {horizon} planned samples (--lr-decay-steps x --batch-size): plant fewer or train longer")]
    TooMany {
        /// Insertions asked for.
        insertions: u64,
        /// Samples in the horizon.
        horizon: u64,
    },
    /// An alphabet of fewer than 2 ids.
    #[error("the tokenizer has {alphabet} drawable token ids: canaries need at least 2")]
    SmallAlphabet {
        /// Drawable ids.
        alphabet: u32,
    },
}

/// One planted canary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// Its index in the plan.
    pub id: u32,
    /// How many times it is inserted.
    pub reps: u64,
    /// The context tokens.
    pub prefix: Vec<u32>,
    /// The secret tokens.
    pub secret: Vec<u32>,
}

impl Canary {
    /// Prefix then secret.
    pub fn tokens(&self) -> Vec<u32> {
        let mut v = self.prefix.clone();
        v.extend_from_slice(&self.secret);
        v
    }
}

/// Where one insertion goes: which canary, at which token of the sample's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insertion {
    /// The canary's index.
    pub canary: u32,
    /// The first window token it overwrites.
    pub offset: u32,
}

/// The canaries of a run and the samples that carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanaryPlan {
    /// The canaries, grouped by repetition count in the order of [`CanaryConfig::reps`].
    pub canaries: Vec<Canary>,
    /// Global sample index -> insertion, at most one per sample.
    pub at: BTreeMap<u64, Insertion>,
    /// Token ids canaries are drawn from: `0..alphabet`.
    pub alphabet: u32,
    /// Why the plan is what it is (logged).
    pub reason: String,
}

/// `k` distinct values in `0..n`, sorted (Floyd's algorithm: O(k) memory whatever `n`).
fn distinct_below(rng: &mut SplitMix64, k: u64, n: u64) -> Vec<u64> {
    let mut chosen = HashSet::with_capacity(k as usize);
    for j in (n - k)..n {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u64> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

impl CanaryPlan {
    /// The plan of `cfg` for a run of `seed` whose first `horizon_samples` samples may
    /// carry canaries, with windows of `window_tokens` tokens and canary tokens drawn
    /// from `0..alphabet`.
    pub fn new(
        seed: u64,
        cfg: &CanaryConfig,
        alphabet: u32,
        horizon_samples: u64,
        window_tokens: usize,
    ) -> Result<Self, CanaryError> {
        if cfg.reps.is_empty() || cfg.reps.contains(&0) {
            return Err(CanaryError::BadReps {
                reps: cfg.reps.clone(),
            });
        }
        if cfg.prefix_tokens == 0 || cfg.secret_tokens == 0 {
            return Err(CanaryError::EmptyPart {
                prefix: cfg.prefix_tokens,
                secret: cfg.secret_tokens,
            });
        }
        if cfg.tokens() > window_tokens {
            return Err(CanaryError::TooLong {
                tokens: cfg.tokens(),
                window: window_tokens,
            });
        }
        if alphabet < 2 {
            return Err(CanaryError::SmallAlphabet { alphabet });
        }
        let insertions = cfg.insertions();
        if insertions > horizon_samples {
            return Err(CanaryError::TooMany {
                insertions,
                horizon: horizon_samples,
            });
        }
        let mut tok = SplitMix64::derive(seed, "canary-tokens");
        let mut draw = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| tok.below(u64::from(alphabet)) as u32)
                .collect()
        };
        let mut canaries = Vec::new();
        for &reps in &cfg.reps {
            for _ in 0..cfg.per_reps {
                let prefix = draw(cfg.prefix_tokens);
                let secret = draw(cfg.secret_tokens);
                canaries.push(Canary {
                    id: canaries.len() as u32,
                    reps,
                    prefix,
                    secret,
                });
            }
        }
        // Every insertion gets its own sample; which canary goes where is a seeded shuffle.
        let mut pos = SplitMix64::derive(seed, "canary-positions");
        let samples = distinct_below(&mut pos, insertions, horizon_samples);
        let mut order: Vec<u32> = canaries
            .iter()
            .flat_map(|c| std::iter::repeat_n(c.id, c.reps as usize))
            .collect();
        for i in (1..order.len()).rev() {
            let j = pos.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let slack = (window_tokens - cfg.tokens()) as u64 + 1;
        let at = samples
            .into_iter()
            .zip(order)
            .map(|(s, canary)| {
                let offset = pos.below(slack) as u32;
                (s, Insertion { canary, offset })
            })
            .collect();
        let reason = format!(
            "{} canaries ({} per repetition count {:?}) of {} + {} tokens over ids 0..{alphabet}, {insertions} insertions at seeded distinct samples below {horizon_samples}",
            canaries.len(),
            cfg.per_reps,
            cfg.reps,
            cfg.prefix_tokens,
            cfg.secret_tokens
        );
        Ok(Self {
            canaries,
            at,
            alphabet,
            reason,
        })
    }

    /// The canary sample `s` carries, and at which window token it starts.
    pub fn at(&self, s: u64) -> Option<(&Canary, usize)> {
        self.at
            .get(&s)
            .map(|i| (&self.canaries[i.canary as usize], i.offset as usize))
    }

    /// Overwrites sample `s`'s window with its canary, if it carries one. The window is
    /// given as its `inputs` (window tokens `0..B`) and `targets` (tokens `1..=B`), as the
    /// trainer holds it; both are updated consistently.
    pub fn overlay(&self, s: u64, inputs: &mut [u32], targets: &mut [u32]) {
        let Some((canary, offset)) = self.at(s) else {
            return;
        };
        let b = inputs.len();
        for (j, &t) in canary.prefix.iter().chain(&canary.secret).enumerate() {
            let p = offset + j;
            if p < b {
                inputs[p] = t;
            }
            if p >= 1 && p - 1 < targets.len() {
                targets[p - 1] = t;
            }
        }
    }

    /// log2 of the secret space |R| = alphabet ^ secret tokens.
    pub fn log2_space(&self) -> f64 {
        let s = self.canaries.first().map_or(0, |c| c.secret.len());
        s as f64 * f64::from(self.alphabet).log2()
    }
}

/// The candidate secrets a canary's is ranked among: every other secret of the space when
/// it has at most `max + 1` members (`true`: enumerated), else `max` uniform draws
/// (seeded by `seed` and the canary's id) that may repeat and may equal the canary's.
pub fn candidates(canary: &Canary, alphabet: u32, max: u64, seed: u64) -> (Vec<Vec<u32>>, bool) {
    let n = canary.secret.len();
    let space = (0..n).try_fold(1u64, |acc, _| acc.checked_mul(u64::from(alphabet)));
    if let Some(space) = space.filter(|&s| s <= max.saturating_add(1)) {
        let mut out = Vec::with_capacity(space as usize);
        for mut i in 0..space {
            let mut secret = vec![0u32; n];
            for d in secret.iter_mut().rev() {
                *d = (i % u64::from(alphabet)) as u32;
                i /= u64::from(alphabet);
            }
            if secret != canary.secret {
                out.push(secret);
            }
        }
        return (out, true);
    }
    let mut rng = SplitMix64::derive(seed ^ u64::from(canary.id), "canary-candidates");
    let out = (0..max)
        .map(|_| {
            (0..n)
                .map(|_| rng.below(u64::from(alphabet)) as u32)
                .collect()
        })
        .collect();
    (out, false)
}

/// One canary's exposure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exposure {
    /// log2 |R|, the secret space.
    pub log2_space: f64,
    /// Candidates compared.
    pub candidates: u64,
    /// True when the candidates are every other secret of R (the rank is exact).
    pub enumerated: bool,
    /// Candidates with a strictly lower log-perplexity than the canary.
    pub lower: u64,
    /// Candidates with the canary's log-perplexity exactly (counted as half below).
    pub ties: u64,
    /// log2 of the canary's (estimated) rank in R, 1 the most likely.
    pub log2_rank: f64,
    /// `log2 |R| - log2 rank`, in bits.
    pub exposure_bits: f64,
    /// The most this comparison can show: `log2 (candidates + 1)` (exact ranks: log2 |R|).
    pub max_measurable_bits: f64,
    /// `-log2 Phi((x - mean) / std)`: the exposure from a normal fit of the candidates'
    /// log-perplexities (x the canary's); capped at log2 |R|.
    pub extrapolated_bits: f64,
}

/// The exposure of a canary whose log-perplexity is `canary` among `candidates`' (see the
/// module docs); `enumerated`: the candidates are every other member of a space of
/// `2^log2_space` secrets.
pub fn exposure(canary: f64, candidates: &[f64], log2_space: f64, enumerated: bool) -> Exposure {
    let lower = candidates.iter().filter(|&&c| c < canary).count() as u64;
    let ties = candidates.iter().filter(|&&c| c == canary).count() as u64;
    let n = candidates.len() as f64;
    // The canary's rank among itself and the candidates, as a share of them.
    let share = (1.0 + lower as f64 + ties as f64 / 2.0) / (n + 1.0);
    let exposure_bits = -share.log2();
    let log2_rank = log2_space - exposure_bits;
    let max_measurable_bits = match enumerated {
        true => log2_space,
        false => (n + 1.0).log2(),
    };
    let mean = candidates.iter().sum::<f64>() / n.max(1.0);
    let var = candidates.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let extrapolated_bits = match var > 0.0 {
        true => (-ln_phi((canary - mean) / var.sqrt()) / std::f64::consts::LN_2).min(log2_space),
        false => exposure_bits,
    };
    Exposure {
        log2_space,
        candidates: candidates.len() as u64,
        enumerated,
        lower,
        ties,
        log2_rank,
        exposure_bits,
        max_measurable_bits,
        extrapolated_bits,
    }
}

/// ln Phi(z), the log of the standard normal CDF, accurate far into the lower tail
/// (Numerical Recipes' erfc, relative error below 1.2e-7, kept in log space).
pub fn ln_phi(z: f64) -> f64 {
    // Phi(z) = erfc(-z / sqrt 2) / 2.
    let x = -z / std::f64::consts::SQRT_2;
    let ln_erfc = if x >= 0.0 {
        let t = 1.0 / (1.0 + 0.5 * x);
        let poly = -x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        t.ln() + poly
    } else {
        // erfc(x) = 2 - erfc(-x) for x < 0: no tail to keep.
        (2.0 - ln_phi(-z).exp() * 2.0).ln()
    };
    ln_erfc - std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(per_reps: u32, reps: &[u64]) -> CanaryConfig {
        CanaryConfig {
            per_reps,
            reps: reps.to_vec(),
            prefix_tokens: 4,
            secret_tokens: 3,
        }
    }

    /// (canary, candidates, log2 |R|, enumerated) -> (exposure bits, log2 rank).
    type RankRow<'a> = (f64, &'a [f64], f64, bool, f64, f64);

    #[test]
    fn exposure_from_ranks_table() {
        let table: &[RankRow] = &[
            // Enumerated space of 4: the canary first of 4 -> rank 1, exposure 2 bits.
            (1.0, &[2.0, 3.0, 4.0], 2.0, true, 2.0, 0.0),
            // Last of 4 -> rank 4, exposure 0.
            (5.0, &[2.0, 3.0, 4.0], 2.0, true, 0.0, 2.0),
            // Second of 4 -> rank 2, exposure 1.
            (2.5, &[2.0, 3.0, 4.0], 2.0, true, 1.0, 1.0),
            // A tie counts half: rank 1.5.
            (
                2.0,
                &[2.0, 3.0, 4.0],
                2.0,
                true,
                2.0 - 1.5f64.log2(),
                1.5f64.log2(),
            ),
            // Sampled: 7 candidates all worse in a space of 2^20: 3 bits (log2 8), the most 7 can show.
            (0.0, &[1.0; 7], 20.0, false, 3.0, 17.0),
            // Sampled: half the candidates better -> about 1 bit whatever the space.
            (
                5.0,
                &[1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0],
                40.0,
                false,
                -(4.0f64 / 8.0).log2(),
                39.0,
            ),
        ];
        for &(c, cands, space, en, want, rank) in table {
            let e = exposure(c, cands, space, en);
            assert!(
                (e.exposure_bits - want).abs() < 1e-12,
                "{c} {cands:?}: {e:?}"
            );
            assert!((e.log2_rank - rank).abs() < 1e-12, "{c} {cands:?}: {e:?}");
            assert!(e.exposure_bits <= e.max_measurable_bits + 1e-12, "{e:?}");
        }
    }

    #[test]
    fn the_normal_tail_is_right_in_log_space() {
        // Phi(0) = 1/2, Phi(-1.959964) = 0.025, Phi(-10) = 7.6198530241604e-24.
        for (z, want) in [
            (0.0, 0.5f64.ln()),
            (-1.959_963_985, 0.025f64.ln()),
            (-10.0, 7.619_853_024_160_5e-24f64.ln()),
            (1.0, 0.841_344_746_068_543f64.ln()),
        ] {
            assert!(
                (ln_phi(z) - want).abs() < 1e-6 * want.abs().max(1.0),
                "z {z}: {} vs {want}",
                ln_phi(z)
            );
        }
        // Far tails stay finite.
        assert!(ln_phi(-40.0).is_finite() && ln_phi(-40.0) < -700.0);
        // The extrapolation: a canary 3 std below the mean of a wide sample.
        let cands: Vec<f64> = (0..1000).map(|i| 10.0 + ((i % 7) as f64 - 3.0)).collect();
        let mean = cands.iter().sum::<f64>() / 1000.0;
        let sd = (cands.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / 999.0).sqrt();
        let e = exposure(mean - 3.0 * sd, &cands, 60.0, false);
        let want = -(0.001_349_898f64).log2();
        assert!((e.extrapolated_bits - want).abs() < 1e-3, "{e:?}");
    }

    #[test]
    fn candidates_enumerate_small_spaces_and_sample_large_ones() {
        let c = Canary {
            id: 0,
            reps: 1,
            prefix: vec![1],
            secret: vec![2, 0],
        };
        let (all, en) = candidates(&c, 3, 100, 1);
        assert!(en);
        assert_eq!(all.len(), 8, "3^2 - 1");
        assert!(!all.contains(&vec![2, 0]));
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 8);
        let (some, en) = candidates(&c, 3, 5, 1);
        assert!(!en);
        assert_eq!(some.len(), 5);
        assert!(some
            .iter()
            .all(|s| s.len() == 2 && s.iter().all(|&t| t < 3)));
        assert_eq!(candidates(&c, 3, 5, 1), (some, false), "seeded");
        // A space too large for u64 is sampled.
        let big = Canary {
            secret: vec![0; 20],
            ..c
        };
        assert!(!candidates(&big, 50_000, 10, 1).1);
    }

    #[test]
    fn bad_configs_name_the_flag() {
        // (config, alphabet, horizon, window) -> the error names this.
        type BadRow<'a> = (CanaryConfig, u32, u64, usize, &'a str);
        let cases: &[BadRow] = &[
            (cfg(1, &[]), 10, 100, 17, "--canary-reps"),
            (cfg(1, &[1, 0]), 10, 100, 17, "--canary-reps"),
            (
                CanaryConfig {
                    prefix_tokens: 0,
                    ..cfg(1, &[1])
                },
                10,
                100,
                17,
                "--canary-prefix-tokens",
            ),
            (cfg(1, &[1]), 10, 100, 6, "does not fit"),
            (cfg(2, &[1, 10, 100]), 10, 221, 17, "222 canary insertions"),
            (cfg(1, &[1]), 1, 100, 17, "at least 2"),
        ];
        for (c, alphabet, horizon, window, want) in cases {
            let e = CanaryPlan::new(1, c, *alphabet, *horizon, *window).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(CanaryPlan::new(1, &cfg(2, &[1, 10, 100]), 10, 222, 7).is_ok());
    }

    #[test]
    fn overlay_writes_the_canary_into_inputs_and_targets() {
        let plan = CanaryPlan::new(3, &cfg(1, &[1]), 50, 1, 9).unwrap();
        let (c, off) = plan.at(0).unwrap();
        let want = c.tokens();
        // A window of 9 tokens 100..109 as inputs 0..8 and targets 1..9.
        let window: Vec<u32> = (100..109).collect();
        let (mut i, mut t) = (window[..8].to_vec(), window[1..].to_vec());
        plan.overlay(0, &mut i, &mut t);
        let mut w = window.clone();
        w[off..off + 7].copy_from_slice(&want);
        assert_eq!(i, w[..8]);
        assert_eq!(t, w[1..]);
        // A sample without a canary is left alone.
        let (mut i2, mut t2) = (window[..8].to_vec(), window[1..].to_vec());
        plan.overlay(1, &mut i2, &mut t2);
        assert_eq!((i2, t2), (window[..8].to_vec(), window[1..].to_vec()));
    }

    proptest! {
        #[test]
        fn every_canary_is_planted_reps_times_at_distinct_samples(
            seed in any::<u64>(),
            per in 1u32..4,
            reps in proptest::collection::vec(1u64..20, 1..4),
            extra in 0u64..500,
            window in 7usize..40,
        ) {
            let c = cfg(per, &reps);
            let horizon = c.insertions() + extra;
            let plan = CanaryPlan::new(seed, &c, 65, horizon, window).unwrap();
            prop_assert_eq!(plan.canaries.len(), per as usize * reps.len());
            prop_assert_eq!(plan.at.len() as u64, c.insertions());
            let mut count = vec![0u64; plan.canaries.len()];
            for (&s, ins) in &plan.at {
                prop_assert!(s < horizon);
                prop_assert!(ins.offset as usize + 7 <= window);
                count[ins.canary as usize] += 1;
            }
            for k in &plan.canaries {
                prop_assert_eq!(count[k.id as usize], k.reps);
                prop_assert!(k.prefix.iter().chain(&k.secret).all(|&t| t < 65));
            }
            // A pure function of its inputs.
            prop_assert_eq!(CanaryPlan::new(seed, &c, 65, horizon, window).unwrap(), plan);
        }

        #[test]
        fn exposure_is_within_its_bounds(
            canary in -5.0f64..50.0,
            cands in proptest::collection::vec(0.0f64..40.0, 1..200),
            space in 8.0f64..80.0,
        ) {
            let e = exposure(canary, &cands, space, false);
            prop_assert!(e.exposure_bits >= 0.0);
            prop_assert!(e.exposure_bits <= e.max_measurable_bits + 1e-9);
            prop_assert!(e.extrapolated_bits <= space + 1e-9);
            prop_assert!((e.log2_rank + e.exposure_bits - space).abs() < 1e-9);
            // A lower log-perplexity never lowers the exposure.
            let better = exposure(canary - 1.0, &cands, space, false);
            prop_assert!(better.exposure_bits >= e.exposure_bits);
        }
    }
}

//! Near-duplicate detection: MinHash signatures of word shingles and an LSH index.
//!
//! A document's words are its maximal runs of alphanumeric characters, lower-cased; its
//! shingles are the runs of `shingle_words` consecutive words (a document with fewer words
//! has one shingle, all of them). Each shingle is hashed to 64 bits (FNV-1a per word, mixed
//! per shingle, with a SplitMix64 finaliser: the same bits on every machine), and
//! permutation `i` maps a shingle hash `x` to `(a_i * x + b_i) >> 32` (multiply-shift
//! hashing; `a_i` odd, both drawn from [`SplitMix64`] seeded with the configured seed).
//! The signature keeps each permutation's minimum.
//!
//! [`LshIndex`] cuts a signature into `bands` bands of `rows` values; two documents become
//! candidates when a whole band agrees, which happens with probability
//! `1 - (1 - J^rows)^bands` for Jaccard similarity `J`. With the defaults (20 bands of 6
//! rows, 128 permutations) that is 0.998 at J = 0.8, 0.95 at J = 0.72 and 0.08 at J = 0.4.
//! A candidate is confirmed by the fraction of equal signature values, an unbiased
//! estimate of J (standard deviation `sqrt(J(1-J)/num_perm)`, 0.035 at J = 0.8), against
//! `near_threshold` (0.75 by default). Measured with these defaults
//! (`data/tests/prepare.rs`, 4,000 pairs): every pair at J >= 0.85 and 97.6% at
//! 0.80–0.85 are flagged (99.3% of all pairs at J >= 0.8), 71% at 0.75–0.80, 31% at
//! 0.70–0.75, 0.6% at 0.60–0.65 and none below 0.6.
//!
//! Memory: an index keeps, per indexed document, the low 16 bits of each signature value
//! (`2 * num_perm` bytes: 256 with the defaults; b-bit MinHash, Li & König 2010, whose
//! estimate is corrected for the 2^-16 chance of equal low bits) and one table entry per
//! band (a u64 key and a u32 id). A band key remembers only the first document that had
//! it; a later document sharing that band with a different, non-duplicate document is
//! still found through its other bands. [`LshIndex`] holds all of it in memory (about
//! 1 KiB a document with table overhead) and is the reference; the pipeline uses
//! [`NearDupIndex`](super::neardup::NearDupIndex), which takes the same decisions under a
//! memory bound and spills the rest to disk.

use std::collections::HashMap;

use tenax_core::rng::SplitMix64;

use crate::prepare::config::DedupConfig;

/// The MinHash permutations of one configuration.
#[derive(Clone, Debug)]
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    shingle_words: usize,
}

impl MinHasher {
    /// The permutations for `config` (its seed, `num_perm` and `shingle_words`).
    pub fn new(config: &DedupConfig) -> Self {
        let mut rng = SplitMix64::derive(config.seed, "minhash");
        let a = (0..config.num_perm).map(|_| rng.next_u64() | 1).collect();
        let b = (0..config.num_perm).map(|_| rng.next_u64()).collect();
        MinHasher {
            a,
            b,
            shingle_words: config.shingle_words.max(1),
        }
    }

    /// The signature of `text`, or `None` when it has no words.
    pub fn signature(&self, text: &str) -> Option<Vec<u32>> {
        let words = word_hashes(text);
        if words.is_empty() {
            return None;
        }
        let mut sig = vec![u32::MAX; self.a.len()];
        let n = self.shingle_words.min(words.len());
        for window in words.windows(n) {
            let x = shingle_hash(window);
            for ((s, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                let v = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
                if v < *s {
                    *s = v;
                }
            }
        }
        Some(sig)
    }
}

/// FNV-1a hashes of the lower-cased alphanumeric words of `text`.
pub fn word_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / 5);
    let mut h = FNV_OFFSET;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            in_word = true;
            h = (h ^ u64::from(c.to_ascii_lowercase() as u8)).wrapping_mul(FNV_PRIME);
        } else if !c.is_ascii() && c.is_alphanumeric() {
            in_word = true;
            for lc in c.to_lowercase() {
                let mut buf = [0u8; 4];
                for &byte in lc.encode_utf8(&mut buf).as_bytes() {
                    h = (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
                }
            }
        } else if in_word {
            out.push(h);
            h = FNV_OFFSET;
            in_word = false;
        }
    }
    if in_word {
        out.push(h);
    }
    out
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One 64-bit hash of a run of word hashes (order matters).
fn shingle_hash(words: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &w in words {
        h = (h.rotate_left(23) ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
    mix64(h)
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The set of shingle hashes of `text` (what a signature summarises).
pub fn shingle_set(text: &str, shingle_words: usize) -> std::collections::HashSet<u64> {
    let w = word_hashes(text);
    let n = shingle_words.max(1).min(w.len().max(1));
    w.windows(n).map(shingle_hash).collect()
}

/// The exact Jaccard similarity of two shingle sets (1 for two empty sets).
pub fn jaccard(a: &std::collections::HashSet<u64>, b: &std::collections::HashSet<u64>) -> f64 {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let inter = small.iter().filter(|x| large.contains(x)).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        return 1.0;
    }
    inter as f64 / union as f64
}

/// The exact Jaccard similarity of two documents' shingle sets (for tests and
/// measurements; the pipeline only estimates it).
pub fn exact_jaccard(x: &str, y: &str, shingle_words: usize) -> f64 {
    jaccard(
        &shingle_set(x, shingle_words),
        &shingle_set(y, shingle_words),
    )
}

/// What [`LshIndex::check_and_insert`] decided about a document.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NearDecision {
    /// No indexed document is similar enough; the document was indexed.
    Unique,
    /// No indexed document is similar enough, but the index is full: not indexed.
    UniqueNotIndexed,
    /// A near duplicate of the indexed document `of` (its insertion number), with this
    /// estimated Jaccard similarity.
    Duplicate {
        /// Insertion number of the earlier document.
        of: u32,
        /// Estimated Jaccard similarity.
        similarity: f64,
    },
}

/// Banded LSH over b-bit signatures (see the module docs for the memory bound).
#[derive(Debug)]
pub struct LshIndex {
    bands: usize,
    rows: usize,
    num_perm: usize,
    threshold: f64,
    max_docs: usize,
    /// Band key → the first indexed document with it.
    table: HashMap<u64, u32>,
    /// Low 16 bits of each indexed signature, `num_perm` per document.
    sigs: Vec<u16>,
    docs: u32,
}

impl LshIndex {
    /// An empty index for `config`.
    pub fn new(config: &DedupConfig) -> Self {
        LshIndex {
            bands: config.bands,
            rows: config.rows,
            num_perm: config.num_perm,
            threshold: config.near_threshold,
            max_docs: config.max_near_docs,
            table: HashMap::new(),
            sigs: Vec::new(),
            docs: 0,
        }
    }

    /// Number of indexed documents.
    pub fn len(&self) -> usize {
        self.docs as usize
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.docs == 0
    }

    /// Looks `sig` up; when no indexed document is a near duplicate, indexes it (while
    /// fewer than `max_near_docs` are indexed).
    pub fn check_and_insert(&mut self, sig: &[u32]) -> NearDecision {
        let keys = self.band_keys(sig);
        if let Some((of, similarity)) = self.lookup(&keys, sig) {
            return NearDecision::Duplicate { of, similarity };
        }
        if self.docs as usize >= self.max_docs || self.docs == u32::MAX {
            return NearDecision::UniqueNotIndexed;
        }
        let id = self.docs;
        self.docs += 1;
        self.sigs.extend(sig.iter().map(|&v| v as u16));
        for key in keys {
            self.table.entry(key).or_insert(id);
        }
        NearDecision::Unique
    }

    /// The first indexed document (in band order) that `sig` is a near duplicate of, and
    /// the estimated similarity; the index is not changed.
    pub fn query(&self, sig: &[u32]) -> Option<(u32, f64)> {
        self.lookup(&self.band_keys(sig), sig)
    }

    fn band_keys(&self, sig: &[u32]) -> Vec<u64> {
        debug_assert_eq!(sig.len(), self.num_perm);
        band_keys(sig, self.bands, self.rows)
    }

    fn lookup(&self, keys: &[u64], sig: &[u32]) -> Option<(u32, f64)> {
        let mut checked: Vec<u32> = Vec::new();
        for key in keys {
            if let Some(&doc) = self.table.get(key) {
                if checked.contains(&doc) {
                    continue;
                }
                checked.push(doc);
                let similarity = self.estimate(doc, sig);
                if similarity >= self.threshold {
                    return Some((doc, similarity));
                }
            }
        }
        None
    }

    /// Estimated Jaccard similarity of indexed document `doc` and `sig`.
    fn estimate(&self, doc: u32, sig: &[u32]) -> f64 {
        let stored = &self.sigs[doc as usize * self.num_perm..(doc as usize + 1) * self.num_perm];
        estimate_b16(stored, sig)
    }
}

/// The `bands` LSH keys of `sig`, in band order: band `b` hashes values
/// `b * rows .. (b + 1) * rows` together with `b`, so equal rows in different bands give
/// different keys.
pub fn band_keys(sig: &[u32], bands: usize, rows: usize) -> Vec<u64> {
    (0..bands)
        .map(|band| {
            let mut h = mix64(band as u64 ^ 0x6c73_6862_616e_6400);
            for &v in &sig[band * rows..(band + 1) * rows] {
                h = mix64(h ^ u64::from(v));
            }
            h
        })
        .collect()
}

/// Estimated Jaccard similarity of a stored b-bit signature (the low 16 bits of each
/// value) and a full signature of the same length, corrected for the 2^-16 chance that
/// two different values share their low bits.
pub fn estimate_b16(stored: &[u16], sig: &[u32]) -> f64 {
    debug_assert_eq!(stored.len(), sig.len());
    let equal = stored
        .iter()
        .zip(sig)
        .filter(|(&s, &v)| s == v as u16)
        .count();
    let m = equal as f64 / sig.len() as f64;
    // P(equal low 16 bits) = J + (1 - J) / 2^16.
    let c = 1.0 / 65536.0;
    ((m - c) / (1.0 - c)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_similarity() {
        assert_eq!(word_hashes("Hello, world!").len(), 2);
        assert_eq!(word_hashes("Hello world"), word_hashes("hello   WORLD."));
        assert!(word_hashes(" ,.; ").is_empty());
        assert_eq!(exact_jaccard("a b c d e f", "a b c d e f", 5), 1.0);
        assert_eq!(exact_jaccard("a b c d e f", "A, b c d e f!", 5), 1.0);
        // 6 words → 2 shingles; one changed word at the end → {s1} ∩ {s1, s2'} over 3.
        assert!((exact_jaccard("a b c d e f", "a b c d e g", 5) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn signatures_are_seeded_and_deterministic() {
        let config = DedupConfig::default();
        let h = MinHasher::new(&config);
        let s1 = h
            .signature("the quick brown fox jumps over the lazy dog")
            .unwrap();
        assert_eq!(s1.len(), 128);
        assert_eq!(
            s1,
            MinHasher::new(&config)
                .signature("the quick brown fox jumps over the lazy dog")
                .unwrap()
        );
        let other = MinHasher::new(&DedupConfig {
            seed: 1,
            ..config.clone()
        });
        assert_ne!(
            s1,
            other
                .signature("the quick brown fox jumps over the lazy dog")
                .unwrap()
        );
        assert_eq!(h.signature("?!"), None);
        // Pinned: the first value of a fixed text and seed never changes (dataset hashes
        // depend on it).
        assert_eq!(h.signature("pinned text").unwrap()[0], PINNED_FIRST_VALUE);
    }

    const PINNED_FIRST_VALUE: u32 = 696_508_728;

    #[test]
    fn index_finds_copies_and_ignores_strangers() {
        let config = DedupConfig::default();
        let h = MinHasher::new(&config);
        let mut index = LshIndex::new(&config);
        let a: String = (0..200).map(|i| format!("w{i} ")).collect();
        let b: String = (0..200).map(|i| format!("v{i} ")).collect();
        assert_eq!(
            index.check_and_insert(&h.signature(&a).unwrap()),
            NearDecision::Unique
        );
        assert_eq!(
            index.check_and_insert(&h.signature(&b).unwrap()),
            NearDecision::Unique
        );
        let mut a2 = a.clone();
        a2.push_str("extra words at the end");
        match index.check_and_insert(&h.signature(&a2).unwrap()) {
            NearDecision::Duplicate { of: 0, similarity } => assert!(similarity > 0.9),
            d => panic!("{d:?}"),
        }
        assert_eq!(index.len(), 2);
        let full = DedupConfig {
            max_near_docs: 2,
            ..config
        };
        let mut small = LshIndex::new(&full);
        for text in [&a, &b] {
            small.check_and_insert(&h.signature(text).unwrap());
        }
        let c: String = (0..200).map(|i| format!("u{i} ")).collect();
        assert_eq!(
            small.check_and_insert(&h.signature(&c).unwrap()),
            NearDecision::UniqueNotIndexed
        );
        assert_eq!(small.len(), 2);
    }
}

//! [`PrepareConfig`]: every knob of `tenax data prepare` that changes its output, read from
//! TOML (`--config FILE.toml`), with defaults that follow Gopher (Rae et al. 2021) and
//! datatrove for the quality rules.
//!
//! Unknown keys are errors, so a misspelt key never silently falls back to a default.
//! The whole struct is part of the dataset hash; [`RunOptions`] (threads, batch size, the
//! near-dup memory bound and spill folder) is not, because it never changes the output.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// How a plain-text file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextDocs {
    /// A whole file is one document.
    File,
    /// Documents are separated by one or more blank lines (paragraphs).
    Paragraphs,
}

/// Reading inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    /// How plain-text files (every file whose name does not end in `.jsonl`) are cut into
    /// documents.
    pub text_docs: TextDocs,
    /// The JSON field of a JSONL line that holds the document's text.
    pub jsonl_field: String,
    /// Documents longer than this (bytes of UTF-8 before normalisation) are dropped and
    /// counted as `too_long`; no more than this is ever held for one document.
    pub max_doc_bytes: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            text_docs: TextDocs::File,
            jsonl_field: "text".into(),
            max_doc_bytes: 4 << 20,
        }
    }
}

/// Exact and near-duplicate removal. The first occurrence (in source, file, document
/// order) is kept; duplicates are removed across sources too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Remove documents whose normalised text is byte-identical to an earlier one.
    pub exact: bool,
    /// Remove documents whose estimated Jaccard similarity (of word shingles) to an
    /// earlier kept document is at least `near_threshold`.
    pub near: bool,
    /// Words per shingle.
    pub shingle_words: usize,
    /// MinHash permutations per signature (at least `bands * rows`).
    pub num_perm: usize,
    /// LSH bands; a pair becomes a candidate when all `rows` values of one band agree.
    pub bands: usize,
    /// Signature values per band.
    pub rows: usize,
    /// Estimated Jaccard similarity at or above which a candidate is a near duplicate.
    pub near_threshold: f64,
    /// Seed of the MinHash permutations.
    pub seed: u64,
    /// At most this many distinct documents are remembered for exact dedup (24 bytes plus
    /// hash-table overhead each); later distinct documents are still checked but not
    /// remembered, and counted as `exact_index_full`.
    pub max_exact_docs: usize,
    /// At most this many kept documents are indexed for near-dup search (`2 * num_perm`
    /// bytes of signature plus `bands` table entries each, in memory up to
    /// `RunOptions::near_dup_memory_bytes` and on disk past it); later documents are still
    /// checked but not indexed, and counted as `near_index_full`.
    pub max_near_docs: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            exact: true,
            near: true,
            shingle_words: 5,
            num_perm: 128,
            bands: 20,
            rows: 6,
            near_threshold: 0.75,
            seed: 0x7465_6e61_7864_6470,
            max_exact_docs: 16_000_000,
            max_near_docs: 1_000_000,
        }
    }
}

/// Quality filters: a document failing any rule is dropped, and counted under the first
/// rule it fails (in the order of the fields here). A rule is off when its bound is
/// `None` (omit the key in TOML), or all rules when `enabled = false`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Run the filters at all.
    pub enabled: bool,
    /// Fewest characters.
    pub min_chars: Option<usize>,
    /// Most characters.
    pub max_chars: Option<usize>,
    /// Fewest whitespace-separated words (Gopher: 50).
    pub min_words: Option<usize>,
    /// Most words (Gopher: 100,000).
    pub max_words: Option<usize>,
    /// Smallest mean word length in characters (Gopher: 3).
    pub min_mean_word_len: Option<f64>,
    /// Largest mean word length (Gopher: 10).
    pub max_mean_word_len: Option<f64>,
    /// Largest ratio of symbols (`#`, `...`, `…`) to words (Gopher: 0.1).
    pub max_symbol_word_ratio: Option<f64>,
    /// Largest fraction of lines starting with a bullet (`•`, `-`, `*`, `·`) (Gopher: 0.9).
    pub max_bullet_line_fraction: Option<f64>,
    /// Largest fraction of lines ending in an ellipsis (`...`, `…`) (Gopher: 0.3).
    pub max_ellipsis_line_fraction: Option<f64>,
    /// Smallest fraction of words containing an alphabetic character (Gopher: 0.8).
    pub min_alpha_word_fraction: Option<f64>,
    /// Fewest English stop words (the, be, to, of, and, that, have, with) (Gopher: 2).
    pub min_stop_words: Option<usize>,
    /// Largest fraction of lines that repeat an earlier line (Gopher: 0.3).
    pub max_dup_line_fraction: Option<f64>,
    /// Largest fraction of characters in lines that repeat an earlier line (Gopher: 0.2).
    pub max_dup_line_char_fraction: Option<f64>,
    /// Largest fraction of characters covered by the most frequent word n-gram, per n
    /// (Gopher: 2 → 0.2, 3 → 0.18, 4 → 0.16).
    pub max_top_ngram_char_fraction: Vec<(usize, f64)>,
    /// Largest fraction of characters in repeated word n-grams, per n
    /// (Gopher: 5 → 0.15, 6 → 0.14, 7 → 0.13, 8 → 0.12, 9 → 0.11, 10 → 0.10).
    pub max_dup_ngram_char_fraction: Vec<(usize, f64)>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            enabled: true,
            min_chars: Some(1),
            max_chars: Some(1_000_000),
            min_words: Some(50),
            max_words: Some(100_000),
            min_mean_word_len: Some(3.0),
            max_mean_word_len: Some(10.0),
            max_symbol_word_ratio: Some(0.1),
            max_bullet_line_fraction: Some(0.9),
            max_ellipsis_line_fraction: Some(0.3),
            min_alpha_word_fraction: Some(0.8),
            min_stop_words: Some(2),
            max_dup_line_fraction: Some(0.3),
            max_dup_line_char_fraction: Some(0.2),
            max_top_ngram_char_fraction: vec![(2, 0.2), (3, 0.18), (4, 0.16)],
            max_dup_ngram_char_fraction: vec![
                (5, 0.15),
                (6, 0.14),
                (7, 0.13),
                (8, 0.12),
                (9, 0.11),
                (10, 0.10),
            ],
        }
    }
}

/// PII and secret scrubbing: each kind is replaced by a typed placeholder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScrubConfig {
    /// Scrub at all.
    pub enabled: bool,
    /// E-mail addresses → `<EMAIL>`.
    pub email: bool,
    /// Phone numbers with separators → `<PHONE>`.
    pub phone: bool,
    /// IPv4 and IPv6 addresses → `<IP>`.
    pub ip: bool,
    /// Card-like numbers with a known prefix passing the Luhn check → `<CREDIT_CARD>`.
    pub credit_card: bool,
    /// AWS access key ids and secret keys → `<AWS_KEY>`.
    pub aws_key: bool,
    /// PEM private key blocks → `<PRIVATE_KEY>`.
    pub private_key: bool,
    /// API tokens (GitHub, Slack, Stripe, Google, JWT) and high-entropy values after
    /// `token`, `bearer`, `api_key`, `secret`, `password` → `<TOKEN>`.
    pub token: bool,
    /// Smallest Shannon entropy (bits per character) of a generic token value.
    pub min_token_entropy: f64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            enabled: true,
            email: true,
            phone: true,
            ip: true,
            credit_card: true,
            aws_key: true,
            private_key: true,
            token: true,
            min_token_entropy: 3.5,
        }
    }
}

/// Output shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Tokens per shard; the last shard of each source holds the rest.
    pub shard_tokens: u64,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            shard_tokens: 1 << 24,
        }
    }
}

/// Everything that decides what `tenax data prepare` writes (and so enters the dataset
/// hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrepareConfig {
    /// Reading inputs.
    pub input: InputConfig,
    /// Unicode NFC normalisation (also always: CRLF → LF, control characters other than
    /// tab and newline dropped, leading and trailing whitespace trimmed).
    pub nfc: bool,
    /// Exact and near-duplicate removal.
    pub dedup: DedupConfig,
    /// Quality filters.
    pub filters: FilterConfig,
    /// PII and secret scrubbing.
    pub scrub: ScrubConfig,
    /// Output shards.
    pub output: OutputConfig,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            input: InputConfig::default(),
            nfc: true,
            dedup: DedupConfig::default(),
            filters: FilterConfig::default(),
            scrub: ScrubConfig::default(),
            output: OutputConfig::default(),
        }
    }
}

impl PrepareConfig {
    /// Parses TOML text over the defaults and validates it; `what` names the source in
    /// errors.
    pub fn from_toml_str(text: &str, what: &str) -> Result<Self, DataError> {
        let config: PrepareConfig = toml::from_str(text).map_err(|e| DataError::BadConfig {
            what: what.to_string(),
            reason: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate(what)?;
        Ok(config)
    }

    /// Reads and validates a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self, DataError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| DataError::io("read config", path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Checks the values that would make the pipeline meaningless or panic.
    pub fn validate(&self, what: &str) -> Result<(), DataError> {
        let bad = |reason: String| {
            Err(DataError::BadConfig {
                what: what.to_string(),
                reason,
            })
        };
        let d = &self.dedup;
        if d.near {
            if d.shingle_words == 0 {
                return bad("dedup.shingle_words must be at least 1".into());
            }
            if d.bands == 0 || d.rows == 0 {
                return bad("dedup.bands and dedup.rows must be at least 1".into());
            }
            if d.bands * d.rows > d.num_perm {
                return bad(format!(
                    "dedup.bands x dedup.rows = {} exceeds dedup.num_perm = {}",
                    d.bands * d.rows,
                    d.num_perm
                ));
            }
            if !(d.near_threshold > 0.0 && d.near_threshold <= 1.0) {
                return bad(format!(
                    "dedup.near_threshold = {} must be in (0, 1]",
                    d.near_threshold
                ));
            }
        }
        if self.output.shard_tokens == 0 {
            return bad("output.shard_tokens must be at least 1".into());
        }
        if self.input.max_doc_bytes == 0 {
            return bad("input.max_doc_bytes must be at least 1".into());
        }
        for &(n, _) in self
            .filters
            .max_top_ngram_char_fraction
            .iter()
            .chain(&self.filters.max_dup_ngram_char_fraction)
        {
            if n == 0 {
                return bad("an n-gram rule in [filters] has n = 0; use n >= 1".into());
            }
        }
        Ok(())
    }
}

/// How to run the pipeline; never changes its output, so not part of the dataset hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Worker threads (0: one per CPU).
    pub threads: usize,
    /// Bytes of raw documents read per batch; about four batches are in memory at once.
    pub batch_bytes: usize,
    /// Most bytes the near-dup (LSH) index holds in memory; past it, its band keys and
    /// signatures spill to files under `spill_dir` (the same documents are kept either
    /// way; see `minhash` and `neardup`). `--near-dup-memory-mib`, default 256 MiB.
    pub near_dup_memory_bytes: u64,
    /// Folder for the near-dup spill files (a private subfolder, removed at the end);
    /// `None`: the output folder.
    pub spill_dir: Option<std::path::PathBuf>,
}

/// The default of [`RunOptions::near_dup_memory_bytes`] in MiB.
pub const DEFAULT_NEAR_DUP_MEMORY_MIB: u64 = 256;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            threads: 0,
            batch_bytes: 8 << 20,
            near_dup_memory_bytes: DEFAULT_NEAR_DUP_MEMORY_MIB << 20,
            spill_dir: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c = PrepareConfig::from_toml_str(
            "nfc = false\n[dedup]\nnear = false\n[filters]\nmin_words = 3\n[output]\nshard_tokens = 10\n",
            "t.toml",
        )
        .unwrap();
        assert!(!c.nfc && !c.dedup.near && c.dedup.exact);
        assert_eq!(c.filters.min_words, Some(3));
        assert_eq!(c.filters.max_words, Some(100_000));
        assert_eq!(c.output.shard_tokens, 10);
        assert_eq!(
            PrepareConfig::from_toml_str("", "e").unwrap(),
            PrepareConfig::default()
        );

        let err = PrepareConfig::from_toml_str("[dedup]\nbandz = 3\n", "t.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t.toml") && msg.contains("bandz"), "{msg}");
        let err =
            PrepareConfig::from_toml_str("[dedup]\nbands = 30\nrows = 6\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("exceeds dedup.num_perm"), "{err}");
        let err = PrepareConfig::from_toml_str("[output]\nshard_tokens = 0\n", "x").unwrap_err();
        assert!(err.to_string().contains("shard_tokens"), "{err}");
    }
}

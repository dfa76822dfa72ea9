//! The dataset manifest (`manifest.json` next to the `shards/` folder): what was read, what
//! was removed and why, what was written, and one dataset hash over it all.
//!
//! The dataset hash is the SHA-256 of the JSON of [`HashInput`]: the format, the whole
//! [`PrepareConfig`], the tokenizer spec, each source's name, weight and input hash (the
//! SHA-256 over its files' relative paths, sizes and SHA-256s, in read order), and each
//! shard's file name and SHA-256. It does not depend on where the inputs or the output
//! live, on the thread count, or on the time: the same inputs and configuration give the
//! same hash, and the manifest itself is byte-identical.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::DataError;
use crate::prepare::config::PrepareConfig;
use crate::prepare::filters::Rule;
use crate::prepare::neardup::NearDupStats;
use crate::prepare::scrub::PiiKind;
use crate::prepare::source::SkipReason;
use crate::tokenizer::TokenizerSpec;

/// The manifest format this crate writes.
pub const MANIFEST_FORMAT: &str = "tenax-dataset-v1";

/// One token shard of a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Path relative to the dataset root, e.g. `shards/web-00000.tok`.
    pub file: String,
    /// Tokens in the shard.
    pub tokens: u64,
    /// Size of the shard file.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the whole shard file.
    pub sha256: String,
}

/// What happened to one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The source's name.
    pub name: String,
    /// Where it was read from, as given (not part of the dataset hash).
    pub location: String,
    /// Mixture weight as given.
    pub weight: f64,
    /// Weight divided by the sum of all weights.
    pub share: f64,
    /// Input files read.
    pub input_files: u64,
    /// Input bytes read.
    pub input_bytes: u64,
    /// Hex SHA-256 over `rel\tbytes\tsha256\n` of each file, in read order.
    pub input_hash: String,
    /// Documents read (after the skips below).
    pub docs_read: u64,
    /// Input pieces that were not documents, by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
    /// Documents removed as exact duplicates of an earlier document.
    pub exact_dups: u64,
    /// Documents removed by a quality rule, by the first rule they failed.
    pub filtered: BTreeMap<Rule, u64>,
    /// Documents removed as near duplicates of an earlier kept document.
    pub near_dups: u64,
    /// Documents kept and tokenized.
    pub docs_kept: u64,
    /// Kept documents in which at least one value was scrubbed.
    pub docs_scrubbed: u64,
    /// Scrubbed values, by kind.
    pub scrubbed: BTreeMap<PiiKind, u64>,
    /// UTF-8 bytes of the kept documents after scrubbing.
    pub bytes_kept: u64,
    /// Tokens written (document separators included).
    pub tokens: u64,
    /// The source's shards, in order.
    pub shards: Vec<ShardEntry>,
}

/// Counts over all sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Documents read.
    pub docs_read: u64,
    /// Documents kept.
    pub docs_kept: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Shards written.
    pub shards: u64,
    /// Distinct documents checked for exact duplicates but not remembered because the
    /// exact index was full (`dedup.max_exact_docs`).
    pub exact_index_full: u64,
    /// Kept documents checked for near duplicates but not indexed because the LSH index
    /// was full (`dedup.max_near_docs`).
    pub near_index_full: u64,
}

/// The manifest of a prepared dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// Hex SHA-256 over the inputs' hashes, the configuration and the shard hashes.
    pub dataset_hash: String,
    /// The tokenizer the shards were written with.
    pub tokenizer: TokenizerSpec,
    /// Its vocabulary size (the shards' headers say the same).
    pub vocab_size: usize,
    /// What follows each document in the token stream, in words.
    pub doc_separator: String,
    /// The configuration it was prepared with.
    pub config: PrepareConfig,
    /// Per-source reports, in `--source` order.
    pub sources: Vec<SourceReport>,
    /// Counts over all sources.
    pub totals: Totals,
    /// Memory and disk use of the near-dup index (depends on `RunOptions`, so not part
    /// of the dataset hash; all zero when near dedup is off).
    #[serde(default)]
    pub near_dup_index: NearDupStats,
}

/// Exactly what the dataset hash covers.
#[derive(Serialize)]
pub struct HashInput<'a> {
    /// The manifest format.
    pub format: &'a str,
    /// The configuration.
    pub config: &'a PrepareConfig,
    /// The tokenizer.
    pub tokenizer: &'a TokenizerSpec,
    /// `(name, weight, input_hash)` per source.
    pub sources: Vec<(&'a str, f64, &'a str)>,
    /// `(file, sha256)` per shard, sources in order.
    pub shards: Vec<(&'a str, &'a str)>,
}

impl Manifest {
    /// The dataset hash of this manifest's contents (what [`Manifest::dataset_hash`] should
    /// be).
    pub fn compute_hash(&self) -> String {
        let input = HashInput {
            format: &self.format,
            config: &self.config,
            tokenizer: &self.tokenizer,
            sources: self
                .sources
                .iter()
                .map(|s| (s.name.as_str(), s.weight, s.input_hash.as_str()))
                .collect(),
            shards: self
                .sources
                .iter()
                .flat_map(|s| &s.shards)
                .map(|sh| (sh.file.as_str(), sh.sha256.as_str()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&input).expect("the hash input serialises");
        hex::encode(Sha256::digest(&bytes))
    }

    /// Writes the manifest as pretty JSON to `path` (through a temporary file and a rename).
    pub fn write(&self, path: &Path) -> Result<(), DataError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("the manifest serialises");
        bytes.push(b'\n');
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| DataError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| DataError::io("rename a temporary file onto", path, e))
    }

    /// Reads a manifest and checks its format and that its dataset hash matches its
    /// contents.
    pub fn read(path: &Path) -> Result<Manifest, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io("read", path, e))?;
        Manifest::from_bytes(&bytes, path)
    }

    /// Parses a manifest read from anywhere (`path` names it in errors, e.g. a store
    /// URL) and checks its format and dataset hash, as [`Manifest::read`] does.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Manifest, DataError> {
        let bad = |reason: String| DataError::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a dataset manifest: {e}")))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {MANIFEST_FORMAT:?}",
                manifest.format
            )));
        }
        let want = manifest.compute_hash();
        if manifest.dataset_hash != want {
            return Err(bad(format!(
                "dataset_hash {} does not match its contents ({want})",
                manifest.dataset_hash
            )));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TokenizerKind;

    fn sample() -> Manifest {
        let mut m = Manifest {
            format: MANIFEST_FORMAT.into(),
            dataset_hash: String::new(),
            tokenizer: TokenizerSpec {
                kind: TokenizerKind::Bytes,
                chars: None,
            },
            vocab_size: 256,
            doc_separator: "\"\\n\\n\"".into(),
            config: PrepareConfig::default(),
            sources: vec![SourceReport {
                name: "web".into(),
                location: "/data/web".into(),
                weight: 2.0,
                share: 1.0,
                input_hash: "aa".into(),
                shards: vec![ShardEntry {
                    file: "shards/web-00000.tok".into(),
                    tokens: 3,
                    bytes: 66,
                    sha256: "bb".into(),
                }],
                ..Default::default()
            }],
            totals: Totals::default(),
            near_dup_index: NearDupStats::default(),
        };
        m.dataset_hash = m.compute_hash();
        m
    }

    #[test]
    fn hash_covers_inputs_config_and_shards_only() {
        let m = sample();
        type Change = fn(&mut Manifest);
        let changes: &[(&str, Change, bool)] = &[
            (
                "input hash",
                |m| m.sources[0].input_hash = "ab".into(),
                true,
            ),
            ("weight", |m| m.sources[0].weight = 1.0, true),
            ("name", |m| m.sources[0].name = "web2".into(), true),
            (
                "shard hash",
                |m| m.sources[0].shards[0].sha256 = "bc".into(),
                true,
            ),
            (
                "shard name",
                |m| m.sources[0].shards[0].file = "x".into(),
                true,
            ),
            ("config", |m| m.config.dedup.near_threshold = 0.8, true),
            (
                "tokenizer",
                |m| m.tokenizer.kind = TokenizerKind::Gpt2,
                true,
            ),
            (
                "location",
                |m| m.sources[0].location = "/elsewhere".into(),
                false,
            ),
            ("a count", |m| m.sources[0].docs_read = 7, false),
        ];
        for (what, change, changes_hash) in changes {
            let mut n = m.clone();
            change(&mut n);
            assert_eq!(n.compute_hash() != m.dataset_hash, *changes_hash, "{what}");
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        let m = sample();
        m.write(&path).unwrap();
        assert_eq!(Manifest::read(&path).unwrap(), m);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"bb\"", "\"bc\"")).unwrap();
        let err = Manifest::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("does not match"),
            "{err}"
        );
    }
}

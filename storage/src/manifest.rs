//! The checkpoint manifest and folder names: pure data and checks, no I/O.
//!
//! A checkpoint is the folder `step-<step:010>-g<gen>-<attempt>` holding safetensors shards and,
//! written last, `MANIFEST.json`. The manifest is the commit: a folder without one is an
//! abandoned attempt.
//!
//! Format version 2 (this build writes it; it also reads version 1): a tensor may be split by
//! rows (dimension 0) over several shard files, each slice written once by one writer; every
//! [`TensorEntry`] names its file, the full shape and the rows the file holds.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use tenax_core::ckpt::{check_tiling, rows_of, RowRange, SavedSlice};

use crate::store::is_plain_segment;

/// The manifest format this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest manifest format this build reads (version 1: every tensor whole in one file).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// The commit file, written last in every checkpoint folder.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The only tensor dtype written so far.
pub const DTYPE_F32: &str = "F32";

/// `MANIFEST.json`: everything needed to resume, and to check the shards beside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for now.
    pub format_version: u32,
    /// Optimizer steps completed when the snapshot was taken.
    pub step: u64,
    /// The cluster generation that saved it.
    pub generation: u64,
    /// Unique id of this save attempt (12 hex chars).
    pub attempt: String,
    /// Wall-clock time of the save, ms since the Unix epoch (strictly increasing within a process).
    pub created_unix_ms: u64,
    /// The full training config, verbatim.
    pub config: Value,
    /// Hash of the config; callers refuse to resume across a mismatch.
    pub config_hash: String,
    /// Samples consumed so far.
    pub data_cursor: u64,
    /// RNG state (opaque here).
    pub rng: Value,
    /// Anything else the trainer keeps, e.g. `{"adamw_step": 10}` (opaque here).
    pub extra: Value,
    /// Every shard file of the folder, in the order the trainer gave them.
    pub files: Vec<FileEntry>,
    /// Every tensor, in the order the trainer gave them, with the file it is in.
    pub tensors: Vec<TensorEntry>,
    /// SHA-256 of the exact bytes of `MANIFEST.json` with this field's value written as 64
    /// zeros (version 2; empty in version 1), so that any changed byte of the manifest
    /// itself is caught, not only changed shard files. Set by [`Manifest::to_json`].
    #[serde(default)]
    pub manifest_sha256: String,
}

/// The key of the manifest's self-checksum, as it appears in the JSON.
const SELF_HASH_KEY: &str = "\"manifest_sha256\": \"";

/// The SHA-256 of manifest bytes with the self-checksum's value zeroed, and where that value
/// sits; `None` if the bytes have no self-checksum field of 64 characters.
fn self_hash(bytes: &[u8]) -> Option<(String, usize)> {
    let key = SELF_HASH_KEY.as_bytes();
    // The field is the manifest's last: a key of the same name inside config, rng or extra
    // comes earlier.
    let at = bytes.windows(key.len()).rposition(|w| w == key)? + key.len();
    let value = bytes.get(at..at + 64)?;
    if bytes.get(at + 64) != Some(&b'"') || value.contains(&b'"') {
        return None;
    }
    let mut zeroed = bytes.to_vec();
    zeroed[at..at + 64].fill(b'0');
    Some((sha256_hex(&zeroed), at))
}

/// One shard file of a checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// File name inside the checkpoint folder, e.g. `params.safetensors`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// The node that wrote it, when several nodes wrote the checkpoint; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// One tensor slice of a checkpoint: the rows `rows` (along dimension 0) of the tensor `name`,
/// stored in `file` under the same name with shape `shape` except `rows` rows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name; unique within its file, one entry per slice across files.
    pub name: String,
    /// The file (a [`FileEntry::name`]) that holds this slice.
    pub file: String,
    /// Element type; always [`DTYPE_F32`] for now.
    pub dtype: String,
    /// Dimensions of the whole tensor.
    pub shape: Vec<usize>,
    /// `[start, end)` rows of the tensor that this file holds; absent (version 1) means all.
    /// A scalar counts as one row.
    #[serde(default)]
    pub rows: Option<[usize; 2]>,
}

impl TensorEntry {
    /// The rows this entry holds.
    pub fn row_range(&self) -> RowRange {
        match self.rows {
            Some([start, end]) => RowRange { start, end },
            None => RowRange {
                start: 0,
                end: rows_of(&self.shape),
            },
        }
    }

    /// The shape of the slice as stored in its file.
    pub fn stored_shape(&self) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = self.row_range().len();
        }
        shape
    }
}

/// The parts of a checkpoint folder name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderName {
    /// Step saved.
    pub step: u64,
    /// Generation that saved it.
    pub generation: u64,
    /// Attempt id.
    pub attempt: String,
}

/// `step-<step:010>-g<generation>-<attempt>`.
pub fn folder_name(step: u64, generation: u64, attempt: &str) -> String {
    format!("step-{step:010}-g{generation}-{attempt}")
}

/// The inverse of [`folder_name`]; `None` for anything that is not a checkpoint folder name.
pub fn parse_folder_name(name: &str) -> Option<FolderName> {
    let rest = name.strip_prefix("step-")?;
    let (step, rest) = rest.split_once("-g")?;
    let (generation, attempt) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(step) || !digits(generation) || !is_plain_segment(attempt) {
        return None;
    }
    Some(FolderName {
        step: step.parse().ok()?,
        generation: generation.parse().ok()?,
        attempt: attempt.to_string(),
    })
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Manifest {
    /// The folder this manifest belongs in.
    pub fn folder(&self) -> String {
        folder_name(self.step, self.generation, &self.attempt)
    }

    /// Pretty JSON, as written to `MANIFEST.json`, with its self-checksum filled in (for
    /// version 2; a version-1 manifest is written as it is).
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = self.clone();
        if m.format_version >= 2 {
            m.manifest_sha256 = "0".repeat(64);
        }
        let mut out = serde_json::to_vec_pretty(&m).expect("a manifest always serialises");
        out.push(b'\n');
        if m.format_version >= 2 {
            let (hash, at) = self_hash(&out).expect("the self-checksum field was just written");
            out[at..at + 64].copy_from_slice(hash.as_bytes());
        }
        out
    }

    /// Parse `MANIFEST.json` and check that it is self-consistent: the format version, unique
    /// plain file names, hex hashes, every tensor in a listed file with dtype `F32`, tensor
    /// names unique within a file. The error is a reason, without the file name.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| format!("does not parse as a checkpoint manifest ({e})"))?;
        if m.format_version >= 2 {
            match self_hash(bytes) {
                Some((hash, _)) if hash == m.manifest_sha256 => {}
                Some(_) => {
                    return Err(
                        "self-checksum mismatch: MANIFEST.json was altered after it was written"
                            .into(),
                    )
                }
                None => return Err("has no manifest_sha256 self-checksum".into()),
            }
        }
        m.check()?;
        Ok(m)
    }

    /// The self-consistency checks of [`Manifest::parse`].
    pub fn check(&self) -> Result<(), String> {
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(format!(
                "format_version {} is not supported (this build reads {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if !is_plain_segment(&self.attempt) {
            return Err(format!("attempt {:?} is not a plain name", self.attempt));
        }
        let mut names = std::collections::BTreeSet::new();
        for f in &self.files {
            if !is_plain_segment(&f.name) || f.name == MANIFEST_FILE {
                return Err(format!("file name {:?} is not allowed", f.name));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("file {:?} is listed twice", f.name));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "file {:?}: sha256 {:?} is not a SHA-256",
                    f.name, f.sha256
                ));
            }
        }
        let mut tensors = std::collections::BTreeSet::new();
        for t in &self.tensors {
            if !names.contains(t.file.as_str()) {
                return Err(format!(
                    "tensor {:?} is in file {:?}, which is not listed",
                    t.name, t.file
                ));
            }
            if t.dtype != DTYPE_F32 {
                return Err(format!(
                    "tensor {:?} has dtype {:?}; only {DTYPE_F32} is supported",
                    t.name, t.dtype
                ));
            }
            if !tensors.insert((t.file.as_str(), t.name.as_str())) {
                return Err(format!(
                    "tensor {:?} is listed twice in {:?}",
                    t.name, t.file
                ));
            }
            if t.rows.is_some() && self.format_version < 2 {
                return Err(format!(
                    "tensor {:?} has rows, which format_version {} does not have",
                    t.name, self.format_version
                ));
            }
        }
        check_tiling(&self.saved_slices()).map_err(|e| e.to_string())
    }

    /// Every tensor slice, as the load planner takes them.
    pub fn saved_slices(&self) -> Vec<SavedSlice> {
        self.tensors
            .iter()
            .map(|t| SavedSlice {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                file: t.file.clone(),
                rows: t.row_range(),
            })
            .collect()
    }

    /// Every tensor name with its full shape, sorted by name, once each.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut seen = std::collections::BTreeMap::new();
        for t in &self.tensors {
            seen.entry(t.name.clone())
                .or_insert_with(|| t.shape.clone());
        }
        seen.into_iter().collect()
    }

    /// Total bytes of the shard files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The tensors of one file, in manifest order.
    pub fn tensors_in<'a>(&'a self, file: &'a str) -> impl Iterator<Item = &'a TensorEntry> + 'a {
        self.tensors.iter().filter(move |t| t.file == file)
    }

    /// Listing order: oldest first by (step, created_unix_ms, attempt).
    pub fn sort_key(&self) -> (u64, u64, &str) {
        (self.step, self.created_unix_ms, &self.attempt)
    }
}

/// Check a file's bytes against its manifest entry: size, then SHA-256.
pub fn check_file(entry: &FileEntry, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() as u64 != entry.size {
        return Err(format!(
            "size mismatch (expected {} bytes, got {})",
            entry.size,
            bytes.len()
        ));
    }
    let got = sha256_hex(bytes);
    if !got.eq_ignore_ascii_case(&entry.sha256) {
        return Err(format!(
            "SHA-256 mismatch (expected {}, got {got})",
            entry.sha256
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_round_trip() {
        let name = folder_name(42, 3, "ab12cd34ef56");
        assert_eq!(name, "step-0000000042-g3-ab12cd34ef56");
        assert_eq!(
            parse_folder_name(&name),
            Some(FolderName {
                step: 42,
                generation: 3,
                attempt: "ab12cd34ef56".into()
            })
        );
    }

    #[test]
    fn non_checkpoint_folder_names_are_rejected() {
        for name in [
            "",
            "step-",
            "step-12",
            "step-12-g",
            "step-12-g3",
            "step-12-g3-",
            "step-x-g3-abc",
            "step-12-gx-abc",
            "job-12-g3-abc",
            "step--g3-abc",
        ] {
            assert_eq!(parse_folder_name(name), None, "{name:?}");
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            step: 1,
            generation: 0,
            attempt: "abc".into(),
            created_unix_ms: 5,
            config: Value::Null,
            config_hash: "h".into(),
            data_cursor: 0,
            rng: Value::Null,
            extra: Value::Null,
            files: vec![FileEntry {
                name: "a.safetensors".into(),
                size: 3,
                sha256: sha256_hex(b"abc"),
                writer: None,
            }],
            tensors: vec![TensorEntry {
                name: "w".into(),
                file: "a.safetensors".into(),
                dtype: DTYPE_F32.into(),
                shape: vec![1],
                rows: Some([0, 1]),
            }],
            manifest_sha256: String::new(),
        }
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        type Edit = fn(&mut Manifest);
        let cases: &[(&str, Edit, &str)] = &[
            ("version", |m| m.format_version = 3, "format_version 3"),
            (
                "rows in v1",
                |m| m.format_version = 1,
                "which format_version 1 does not have",
            ),
            ("gap", |m| m.tensors[0].shape = vec![2], "w"),
            (
                "rows past the end",
                |m| m.tensors[0].rows = Some([0, 2]),
                "w",
            ),
            (
                "traversal",
                |m| m.files[0].name = "../x".into(),
                "not allowed",
            ),
            (
                "manifest as shard",
                |m| m.files[0].name = MANIFEST_FILE.into(),
                "not allowed",
            ),
            (
                "dup file",
                |m| m.files.push(m.files[0].clone()),
                "listed twice",
            ),
            (
                "bad hash",
                |m| m.files[0].sha256 = "zz".into(),
                "not a SHA-256",
            ),
            (
                "unlisted file",
                |m| m.tensors[0].file = "b".into(),
                "not listed",
            ),
            ("dtype", |m| m.tensors[0].dtype = "F16".into(), "only F32"),
            (
                "dup tensor",
                |m| m.tensors.push(m.tensors[0].clone()),
                "listed twice",
            ),
            (
                "overlap across files",
                |m| {
                    m.files.push(FileEntry {
                        name: "b.safetensors".into(),
                        ..m.files[0].clone()
                    });
                    let mut t = m.tensors[0].clone();
                    t.file = "b.safetensors".into();
                    m.tensors.push(t);
                },
                "w",
            ),
        ];
        assert_eq!(manifest().check(), Ok(()));
        for (what, edit, want) in cases {
            let mut m = manifest();
            edit(&mut m);
            let err = m.check().unwrap_err();
            assert!(err.contains(want), "{what}: {err}");
            assert!(Manifest::parse(&m.to_json()).is_err(), "{what}");
        }
        let written = manifest().to_json();
        let mut parsed = Manifest::parse(&written).unwrap();
        assert_eq!(parsed.manifest_sha256.len(), 64);
        parsed.manifest_sha256.clear();
        assert_eq!(parsed, manifest());
        // Any flipped byte is caught: a parse error, a self-checksum mismatch or a failed check.
        for i in 0..written.len() {
            for bit in [0x01u8, 0x20, 0x80] {
                let mut b = written.clone();
                b[i] ^= bit;
                assert!(
                    Manifest::parse(&b).is_err(),
                    "byte {i} ^ {bit:#x} went unnoticed"
                );
            }
        }
        let mut v1 = manifest();
        v1.format_version = 1;
        v1.tensors[0].rows = None;
        assert_eq!(v1.check(), Ok(()), "version 1 manifests still read");
    }

    #[test]
    fn file_checks_name_size_then_hash() {
        let entry = &manifest().files[0];
        assert_eq!(check_file(entry, b"abc"), Ok(()));
        assert!(check_file(entry, b"ab")
            .unwrap_err()
            .contains("size mismatch (expected 3 bytes, got 2)"));
        let err = check_file(entry, b"abd").unwrap_err();
        assert!(err.starts_with("SHA-256 mismatch (expected "), "{err}");
    }
}

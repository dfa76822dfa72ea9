//! The checkpoint manifest and folder names: pure data and checks, no I/O.
//!
//! A checkpoint is the folder `step-<step:010>-g<gen>-<attempt>` holding safetensors shards and,
//! written last, `MANIFEST.json`. The manifest is the commit: a folder without one is an
//! abandoned attempt.
//!
//! Format version 3 (this build writes it; it also reads versions 1 and 2): a tensor may be
//! split by rows (dimension 0) over several shard files, each slice written once by one
//! writer; every [`TensorEntry`] names its file, the full shape and the rows the file holds.
//! Version 3 hashes files and the manifest itself with BLAKE3 ([`FileEntry::blake3`],
//! `manifest_blake3`) and may carry an ed25519 signature (`signer`, `signature`, see
//! `signing`); version 2 hashed with SHA-256 and had no signature; version 1 had whole
//! tensors only and no self-checksum.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::signing::{SignKey, PUBLIC_KEY_HEX_LEN, SIGNATURE_HEX_LEN};

use tenax_core::ckpt::{check_tiling, rows_of, RowRange, SavedSlice};

use crate::store::is_plain_segment;

/// The manifest format this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// The first format version hashed with BLAKE3 (and signable); older ones use SHA-256.
pub const BLAKE3_VERSION: u32 = 3;
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
    /// The public key (64 hex digits) that signed this manifest (version 3; empty when it is
    /// not signed). Informative: readers verify with the key they trust, not with this one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
    /// SHA-256 of the exact bytes of `MANIFEST.json` with this field's value written as 64
    /// zeros (version 2; empty in versions 1 and 3), so that any changed byte of the manifest
    /// itself is caught, not only changed shard files. Set by [`Manifest::to_json`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_sha256: String,
    /// The same self-checksum in version 3, with BLAKE3, over the bytes with both this
    /// field's value and the signature's written as zeros.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_blake3: String,
    /// Ed25519 signature (128 hex digits) of the exact bytes of `MANIFEST.json` with this
    /// value written as zeros (version 3, when the committer had a signing key; empty
    /// otherwise). Always the last field. See `signing`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

/// Where the string value of the last `"key": "` of manifest bytes sits, when that value is
/// `len` characters long; `None` otherwise.
pub(crate) fn string_value_at(bytes: &[u8], key: &str, len: usize) -> Option<usize> {
    let pattern = format!("\"{key}\": \"");
    let pattern = pattern.as_bytes();
    let at = bytes.windows(pattern.len()).rposition(|w| w == pattern)? + pattern.len();
    let value = bytes.get(at..at + len)?;
    if bytes.get(at + len) != Some(&b'"') || value.contains(&b'"') {
        return None;
    }
    Some(at)
}

/// The self-checksum's JSON key and hash in a format version.
fn self_hash_field(version: u32) -> (&'static str, HashAlg) {
    if version >= BLAKE3_VERSION {
        ("manifest_blake3", HashAlg::Blake3)
    } else {
        ("manifest_sha256", HashAlg::Sha256)
    }
}

/// The self-checksum of manifest bytes of a format version (its value, and the signature's
/// when there is one after it, zeroed) and where its value sits; `None` if the bytes have no
/// self-checksum field of 64 characters.
fn self_hash(bytes: &[u8], version: u32) -> Option<(String, usize)> {
    let (key, alg) = self_hash_field(version);
    // The fields are the manifest's last: a key of the same name inside config, rng or extra
    // comes earlier.
    let at = string_value_at(bytes, key, 64)?;
    let mut zeroed = bytes.to_vec();
    zeroed[at..at + 64].fill(b'0');
    if version >= BLAKE3_VERSION {
        if let Some(sig) = crate::signing::signature_at(bytes).filter(|&s| s > at) {
            zeroed[sig..sig + SIGNATURE_HEX_LEN].fill(b'0');
        }
    }
    Some((alg.hex(&zeroed), at))
}

/// A content hash of a format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-256 (format versions 1 and 2).
    Sha256,
    /// BLAKE3 (format version 3).
    Blake3,
}

impl HashAlg {
    /// The hash of files and manifests of a format version.
    pub fn of_version(version: u32) -> HashAlg {
        if version >= BLAKE3_VERSION {
            HashAlg::Blake3
        } else {
            HashAlg::Sha256
        }
    }

    /// `SHA-256` or `BLAKE3`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "SHA-256",
            HashAlg::Blake3 => "BLAKE3",
        }
    }

    /// Lowercase hex hash of `bytes`. BLAKE3 hashes inputs of at least
    /// [`PARALLEL_HASH_BYTES`] on every core (rayon's pool: a BLAKE3 tree's subtrees are
    /// independent; the result is the same as hashing on one thread). Call it from a
    /// blocking thread, never on an async worker.
    pub fn hex(self, bytes: &[u8]) -> String {
        match self {
            HashAlg::Sha256 => sha256_hex(bytes),
            HashAlg::Blake3 if bytes.len() >= PARALLEL_HASH_BYTES => blake3::Hasher::new()
                .update_rayon(bytes)
                .finalize()
                .to_hex()
                .to_string(),
            HashAlg::Blake3 => blake3::hash(bytes).to_hex().to_string(),
        }
    }

    /// A hasher to feed chunk by chunk.
    pub fn hasher(self) -> ContentHasher {
        match self {
            HashAlg::Sha256 => ContentHasher::Sha256(Sha256::new()),
            HashAlg::Blake3 => ContentHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

/// Inputs from this size on are hashed on every core by [`HashAlg::hex`] (BLAKE3):
/// below it, splitting the work costs more than it saves.
pub const PARALLEL_HASH_BYTES: usize = 1 << 20;

/// An incremental [`HashAlg`] hash.
pub enum ContentHasher {
    /// SHA-256.
    Sha256(Sha256),
    /// BLAKE3.
    Blake3(Box<blake3::Hasher>),
}

impl ContentHasher {
    /// Feed bytes (BLAKE3: from [`PARALLEL_HASH_BYTES`] on, on every core).
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            ContentHasher::Sha256(h) => h.update(bytes),
            ContentHasher::Blake3(h) if bytes.len() >= PARALLEL_HASH_BYTES => {
                h.update_rayon(bytes);
            }
            ContentHasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Lowercase hex hash of everything fed.
    pub fn finalize_hex(self) -> String {
        match self {
            ContentHasher::Sha256(h) => hex::encode(h.finalize()),
            ContentHasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// One shard file of a checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// File name inside the checkpoint folder, e.g. `params.safetensors`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file (format versions 1 and 2; empty in 3).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Lowercase hex BLAKE3 of the whole file (format version 3; empty before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blake3: String,
    /// The node that wrote it, when several nodes wrote the checkpoint; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl FileEntry {
    /// The entry of a file hashed with `alg` (`hash` is its lowercase hex).
    pub fn new(name: String, size: u64, alg: HashAlg, hash: String) -> FileEntry {
        let (sha256, blake3) = match alg {
            HashAlg::Sha256 => (hash, String::new()),
            HashAlg::Blake3 => (String::new(), hash),
        };
        FileEntry {
            name,
            size,
            sha256,
            blake3,
            writer: None,
        }
    }

    /// The hash this entry gives and its value (BLAKE3 when it has one, else SHA-256).
    pub fn hash(&self) -> (HashAlg, &str) {
        if self.blake3.is_empty() {
            (HashAlg::Sha256, &self.sha256)
        } else {
            (HashAlg::Blake3, &self.blake3)
        }
    }
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

    /// Pretty JSON, as written to `MANIFEST.json`, unsigned, with its self-checksum filled in
    /// (for versions 2 and 3; a version-1 manifest is written as it is).
    pub fn to_json(&self) -> Vec<u8> {
        self.to_json_signed(None)
    }

    /// [`Manifest::to_json`], signed by `key` when one is given and the format version has
    /// signatures (3): `signer` is set to its public key, the self-checksum is computed over
    /// the bytes with the signature zeroed, then the signature over the bytes with only the
    /// signature zeroed (see `signing`). Whatever `signer`, `signature` and self-checksums
    /// `self` holds are replaced.
    pub fn to_json_signed(&self, key: Option<&SignKey>) -> Vec<u8> {
        let mut m = self.clone();
        let version = m.format_version;
        m.signer.clear();
        m.signature.clear();
        m.manifest_sha256.clear();
        m.manifest_blake3.clear();
        let key = key.filter(|_| version >= BLAKE3_VERSION);
        if let Some(k) = key {
            m.signer = k.public().hex();
            m.signature = "0".repeat(SIGNATURE_HEX_LEN);
        }
        match version {
            v if v >= BLAKE3_VERSION => m.manifest_blake3 = "0".repeat(64),
            2 => m.manifest_sha256 = "0".repeat(64),
            _ => {}
        }
        let mut out = serde_json::to_vec_pretty(&m).expect("a manifest always serialises");
        out.push(b'\n');
        if version >= 2 {
            let (hash, at) =
                self_hash(&out, version).expect("the self-checksum field was just written");
            out[at..at + 64].copy_from_slice(hash.as_bytes());
        }
        if let Some(k) = key {
            let at =
                crate::signing::signature_at(&out).expect("the signature field was just written");
            crate::signing::sign_in_place(k, &mut out, at);
        }
        out
    }

    /// The self-checksum this manifest's version carries.
    fn self_checksum(&self) -> &str {
        if self.format_version >= BLAKE3_VERSION {
            &self.manifest_blake3
        } else {
            &self.manifest_sha256
        }
    }

    /// The hash of this manifest's files.
    pub fn hash_alg(&self) -> HashAlg {
        HashAlg::of_version(self.format_version)
    }

    /// Parse `MANIFEST.json` and check that it is self-consistent: the format version, unique
    /// plain file names, hex hashes, every tensor in a listed file with dtype `F32`, tensor
    /// names unique within a file. The error is a reason, without the file name.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| format!("does not parse as a checkpoint manifest ({e})"))?;
        if m.format_version >= 2 {
            match self_hash(bytes, m.format_version) {
                Some((hash, _)) if hash == m.self_checksum() => {}
                Some(_) => {
                    return Err(
                        "self-checksum mismatch: MANIFEST.json was altered after it was written"
                            .into(),
                    )
                }
                None => {
                    return Err(format!(
                        "has no {} self-checksum",
                        self_hash_field(m.format_version).0
                    ))
                }
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
            if f32_bytes_of(&t.shape).is_none() {
                return Err(format!(
                    "tensor {:?} has shape {:?}: more bytes than this machine can address",
                    t.name, t.shape
                ));
            }
        }
        if self
            .files
            .iter()
            .try_fold(0u64, |sum, f| sum.checked_add(f.size))
            .is_none()
        {
            return Err("the file sizes add up to more than 2^64 bytes".into());
        }
        for f in &self.files {
            let (want, other) = match self.hash_alg() {
                HashAlg::Blake3 => (("blake3", &f.blake3), ("sha256", &f.sha256)),
                HashAlg::Sha256 => (("sha256", &f.sha256), ("blake3", &f.blake3)),
            };
            if !other.1.is_empty() {
                return Err(format!(
                    "file {:?} has a {} hash, which format_version {} does not use",
                    f.name, other.0, self.format_version
                ));
            }
            if !is_hex(want.1, 64) {
                return Err(format!(
                    "file {:?}: {} {:?} is not a {}",
                    f.name,
                    want.0,
                    want.1,
                    self.hash_alg().name()
                ));
            }
        }
        let signed = !self.signer.is_empty() || !self.signature.is_empty();
        if signed && self.format_version < BLAKE3_VERSION {
            return Err(format!(
                "has a signature, which format_version {} does not have",
                self.format_version
            ));
        }
        if signed
            && (!is_hex(&self.signer, PUBLIC_KEY_HEX_LEN)
                || !is_hex(&self.signature, SIGNATURE_HEX_LEN))
        {
            return Err(format!(
                "signer {:?} / signature {:?}: not an ed25519 public key and signature in hex",
                self.signer, self.signature
            ));
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

/// The bytes of an F32 tensor of `shape` when the product of its non-zero dimensions, times
/// 4, fits a `usize`; `None` otherwise. Every partial product of the dimensions, in any
/// order (the element count, the values per row, a row's offset), is then at most that, so
/// the checkpoint reader's arithmetic on a shape that [`Manifest::check`] passed cannot
/// overflow.
fn f32_bytes_of(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(4usize, |n, &d| n.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// Whether `s` is `len` hex digits.
fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Check a file's bytes against its manifest entry: size, then its hash (SHA-256 or BLAKE3).
pub fn check_file(entry: &FileEntry, bytes: &[u8]) -> Result<(), String> {
    check_hashed(entry, bytes.len() as u64, &entry.hash().0.hex(bytes))
}

/// Check a file's size and hash (as [`FileEntry::hash`] computes it) against its entry.
pub fn check_hashed(entry: &FileEntry, size: u64, hash: &str) -> Result<(), String> {
    if size != entry.size {
        return Err(format!(
            "size mismatch (expected {} bytes, got {size})",
            entry.size
        ));
    }
    let (alg, want) = entry.hash();
    if !hash.eq_ignore_ascii_case(want) {
        return Err(format!(
            "{} mismatch (expected {want}, got {hash})",
            alg.name()
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
            files: vec![FileEntry::new(
                "a.safetensors".into(),
                3,
                HashAlg::Blake3,
                HashAlg::Blake3.hex(b"abc"),
            )],
            tensors: vec![TensorEntry {
                name: "w".into(),
                file: "a.safetensors".into(),
                dtype: DTYPE_F32.into(),
                shape: vec![1],
                rows: Some([0, 1]),
            }],
            signer: String::new(),
            manifest_sha256: String::new(),
            manifest_blake3: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        type Edit = fn(&mut Manifest);
        let cases: &[(&str, Edit, &str)] = &[
            ("version", |m| m.format_version = 4, "format_version 4"),
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
                |m| m.files[0].blake3 = "zz".into(),
                "not a BLAKE3",
            ),
            (
                "sha256 in v3",
                |m| m.files[0].sha256 = sha256_hex(b"abc"),
                "does not use",
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
        // A signature in a version-2 manifest (to_json never writes one there).
        let mut v2 = manifest_v2();
        v2.signer = "00".repeat(32);
        let err = v2.check().unwrap_err();
        assert!(
            err.contains("which format_version 2 does not have"),
            "{err}"
        );
        let written = manifest().to_json();
        let mut parsed = Manifest::parse(&written).unwrap();
        assert_eq!(parsed.manifest_blake3.len(), 64);
        parsed.manifest_blake3.clear();
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
        v1.files[0] = FileEntry::new(
            "a.safetensors".into(),
            3,
            HashAlg::Sha256,
            sha256_hex(b"abc"),
        );
        v1.tensors[0].rows = None;
        assert_eq!(v1.check(), Ok(()), "version 1 manifests still read");
    }

    /// A version-2 manifest: SHA-256 file hashes and self-checksum.
    /// Inputs of the fuzz targets (fuzz/) that made a reader panic on an arithmetic
    /// overflow (debug builds) once `Manifest::parse` had accepted them.
    #[test]
    fn sizes_and_shapes_that_overflow_are_rejected() {
        // `manifest` target: file sizes summing past u64::MAX (`total_bytes` overflowed).
        let sizes = br#"{"format_version":1,"step":4,"generation":1,"attempt":"0123456789ab","created_unix_ms":1,"config":null,"config_hash":"","data_cursor":0,"rng":null,"extra":null,"files":[{"name":"a","size":18446744073709551615,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"},{"name":"b","size":1,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}],"tensors":[]}"#;
        let err = Manifest::parse(sizes).unwrap_err();
        assert!(err.contains("add up to more than 2^64"), "{err}");

        // `ckpt_load` target: a tensor of 2^24 x 2^40 x 0 values in two row slices, each
        // a valid safetensors shape, whose full shape's element count overflowed in
        // `load_checkpoint`'s assembly. The manifest template of the crashing input (its
        // file sizes and hashes are placeholders: the parse does not read the files):
        let template = br#"{"format_version":3,"step":1,"generation":1,"attempt":"abc","created_unix_ms":1,"config":null,"config_hash":"","data_cursor":0,"rng":null,"extra":null,"files":[{"name":"a","size":80,"blake3":"ffc4ff3fd9f4fe7ab0e5bc2e0c0ba3ca6d5d7c51b3233ec2a8e8dd78ae2e3c57"},{"name":"b","size":80,"blake3":"ffc4ff3fd9f4fe7ab0e5bc2e0c0ba3ca6d5d7c51b3233ec2a8e8dd78ae2e3c57"}],"tensors":[{"name":"t","file":"a","dtype":"F32","shape":[16777216,1099511627776,0],"rows":[0,8388608]},{"name":"t","file":"b","dtype":"F32","shape":[16777216,1099511627776,0],"rows":[8388608,16777216]}]}"#;
        let m: Manifest = serde_json::from_slice(template).unwrap();
        let err = Manifest::parse(&m.to_json()).unwrap_err();
        assert!(err.contains("more bytes than this machine"), "{err}");
        // The same overflow in the values per row (dimensions after the first).
        let mut m = manifest();
        m.tensors[0].shape = vec![0, 1 << 40, 1 << 40];
        m.tensors[0].rows = Some([0, 0]);
        assert!(m.check().unwrap_err().contains("more bytes"));
        // 4 bytes per value: 2^62 values are too many on a 64-bit machine, 2^62 - 1 are not.
        m.tensors[0].shape = vec![1, 1 << 62];
        m.tensors[0].rows = Some([0, 1]);
        assert!(m.check().unwrap_err().contains("more bytes"));
        assert_eq!(f32_bytes_of(&[1, (1 << 62) - 1]), Some(usize::MAX - 3));
        assert_eq!(f32_bytes_of(&[1 << 40, 1 << 40, 0]), None);
        assert_eq!(f32_bytes_of(&[0, 3]), Some(0));
        assert_eq!(f32_bytes_of(&[]), Some(4));
    }

    fn manifest_v2() -> Manifest {
        let mut m = manifest();
        m.format_version = 2;
        m.files[0] = FileEntry::new(
            "a.safetensors".into(),
            3,
            HashAlg::Sha256,
            sha256_hex(b"abc"),
        );
        m
    }

    #[test]
    fn version_2_manifests_still_read_and_check_sha256() {
        let written = manifest_v2().to_json();
        let text = String::from_utf8(written.clone()).unwrap();
        assert!(text.contains("\"manifest_sha256\": \""), "{text}");
        assert!(!text.contains("blake3"), "{text}");
        let parsed = Manifest::parse(&written).unwrap();
        assert_eq!(parsed.hash_alg(), HashAlg::Sha256);
        assert_eq!(check_file(&parsed.files[0], b"abc"), Ok(()));
        let err = check_file(&parsed.files[0], b"abd").unwrap_err();
        assert!(err.starts_with("SHA-256 mismatch"), "{err}");
        let mut b = written.clone();
        let at = b.len() - 10;
        b[at] ^= 1;
        assert!(Manifest::parse(&b).is_err());
    }

    /// `bytes` with `from` replaced by `to` (same length) and the self-checksum recomputed:
    /// what someone who edits a manifest and fixes its hashes writes.
    fn edit_and_rehash(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        let mut out = text.replacen(from, to, 1).into_bytes();
        let (hash, at) = self_hash(&out, FORMAT_VERSION).unwrap();
        out[at..at + 64].copy_from_slice(hash.as_bytes());
        out
    }

    #[test]
    fn signed_manifests_verify_and_edits_with_recomputed_hashes_do_not() {
        use crate::signing::{check_signature, SignKey};
        let key = SignKey::from_seed([1; 32]);
        let other = SignKey::from_seed([2; 32]);
        let signed = manifest().to_json_signed(Some(&key));
        let m = Manifest::parse(&signed).unwrap();
        assert_eq!(m.signer, key.public().hex());
        assert_eq!(m.signature.len(), 128);
        assert_eq!(check_signature(&signed, &m, &key.public()), Ok(()));
        assert_eq!(
            manifest().to_json_signed(Some(&key)),
            signed,
            "signing is deterministic: a retried commit writes the same bytes"
        );
        // Signed by another key.
        let err = check_signature(&signed, &m, &other.public()).unwrap_err();
        assert!(err.contains("signed by key"), "{err}");
        assert!(err.contains(&other.public().id()), "{err}");
        // Edited (another file hash, as if the shard were replaced), self-checksum recomputed:
        // it parses, but the signature no longer verifies.
        let new_hash = HashAlg::Blake3.hex(b"xyz");
        let edited = edit_and_rehash(&signed, &m.files[0].blake3, &new_hash);
        let e = Manifest::parse(&edited).expect("the hashes were recomputed");
        assert_eq!(e.files[0].blake3, new_hash);
        let err = check_signature(&edited, &e, &key.public()).unwrap_err();
        assert!(err.contains("was changed after it was signed"), "{err}");
        let edited = edit_and_rehash(&signed, "\"data_cursor\": 0", "\"data_cursor\": 9");
        let e = Manifest::parse(&edited).unwrap();
        assert!(check_signature(&edited, &e, &key.public()).is_err());
        // Re-signed by another key, signer and all: refused under the first key.
        let mut forged = e.clone();
        forged.data_cursor = 9;
        let forged_bytes = forged.to_json_signed(Some(&other));
        let f = Manifest::parse(&forged_bytes).unwrap();
        assert!(check_signature(&forged_bytes, &f, &key.public()).is_err());
        // The signer field swapped for the trusted key's own, hashes recomputed: refused.
        let swapped = edit_and_rehash(&forged_bytes, &other.public().hex(), &key.public().hex());
        let s = Manifest::parse(&swapped).unwrap();
        let err = check_signature(&swapped, &s, &key.public()).unwrap_err();
        assert!(err.contains("was changed after it was signed"), "{err}");
        // Every flipped byte of a signed manifest is caught by parsing or by the signature.
        for i in 0..signed.len() {
            let mut b = signed.clone();
            b[i] ^= 0x01;
            if let Ok(p) = Manifest::parse(&b) {
                assert!(check_signature(&b, &p, &key.public()).is_err(), "byte {i}");
            }
        }
    }

    #[test]
    fn unsigned_manifests_are_refused_under_a_trust_key_only() {
        use crate::signing::{check_signature, SignKey};
        let key = SignKey::from_seed([1; 32]).public();
        for (what, bytes) in [
            ("v3", manifest().to_json()),
            ("v2", manifest_v2().to_json()),
            (
                "v2 given a key",
                manifest_v2().to_json_signed(Some(&SignKey::from_seed([1; 32]))),
            ),
        ] {
            let m = Manifest::parse(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(m.signature.is_empty(), "{what}");
            let err = check_signature(&bytes, &m, &key).unwrap_err();
            assert!(err.starts_with("not signed"), "{what}: {err}");
            assert!(err.contains("drop --trust-key"), "{what}: {err}");
        }
        // A "signature" key of the right length inside the config of an unsigned manifest is
        // not taken for the signature.
        let mut m = manifest();
        m.config = serde_json::json!({"signature": "0".repeat(128)});
        let bytes = m.to_json();
        let parsed = Manifest::parse(&bytes).unwrap();
        assert!(check_signature(&bytes, &parsed, &key)
            .unwrap_err()
            .starts_with("not signed"));
    }

    #[test]
    fn file_checks_name_size_then_hash() {
        let entry = &manifest().files[0];
        assert_eq!(check_file(entry, b"abc"), Ok(()));
        assert!(check_file(entry, b"ab")
            .unwrap_err()
            .contains("size mismatch (expected 3 bytes, got 2)"));
        let err = check_file(entry, b"abd").unwrap_err();
        assert!(err.starts_with("BLAKE3 mismatch (expected "), "{err}");
    }
}

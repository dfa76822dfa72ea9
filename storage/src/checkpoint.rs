//! Saving, listing, verifying, loading and pruning checkpoints in a [`Store`].
//!
//! A save is planned by [`tenax_core::ckpt::save_plan`]: every tensor is cut by rows among the
//! ranks that hold an identical copy of it, so that replicas share the writing and nothing is
//! written twice. Each writer puts its one shard file (`shard-<rank>.safetensors`, once, into the
//! attempt's fresh folder `step-<step:010>-g<gen>-<attempt>`), then one committer puts
//! `MANIFEST.json` with `PutMode::Create`: the manifest is the commit. The three steps are
//! separate functions ([`begin_save`], [`write_shard`], [`commit_save`]) so that writers can be
//! on different machines; [`save_checkpoint`] runs them all in this process.
//!
//! Readers trust nothing they have not hashed: verify and load re-read every file and check its
//! size, hash (BLAKE3, or SHA-256 for format versions 1 and 2) and tensors against the
//! manifest; [`latest_verified`] falls back to older checkpoints when the newest one does not
//! verify. A store with a signing key ([`Store::with_keys`]) signs the manifests it commits
//! (inside the one `PutMode::Create` PUT); one with a trust key refuses to verify or load a
//! manifest that is not signed by it ([`StorageError::Untrusted`]). Loading assembles whole
//! tensors from the slices with [`tenax_core::ckpt::load_plan`], whatever number of ranks
//! wrote them; from a `file://` store it reads the files straight into the tensors and hashes
//! them there, from a remote store it places the streamed chunks straight into the tensors
//! (no intermediate buffer either way), falling back to the buffered read, which names any
//! problem, when that does not check out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tenax_core::ckpt::{
    retention, row_elems, FolderInfo, FolderState, RetentionDecision, RetentionPolicy, WriterShard,
};

use crate::error::StorageError;
use crate::manifest::{
    check_hashed, folder_name, parse_folder_name, FileEntry, HashAlg, Manifest, TensorEntry,
    DTYPE_F32, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::restore::{load_direct, load_streamed};
use crate::shard::{decode_shard, encode_refs, TensorData, TensorRef};
use crate::signing::TrustKey;
use crate::store::{ObjectInfo, Store};

/// At most this many files are uploaded or downloaded at once by one call.
const MAX_CONCURRENT_TRANSFERS: usize = 4;

/// Everything of a checkpoint except its tensors.
#[derive(Clone, Debug)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: u64,
    /// Cluster generation saving it.
    pub generation: u64,
    /// The full training config, stored verbatim.
    pub config: Value,
    /// Stored; callers use it to refuse mismatched resumes.
    pub config_hash: String,
    /// Samples consumed.
    pub data_cursor: u64,
    /// RNG state (opaque here).
    pub rng: Value,
    /// E.g. `{"adamw_step": 10}` (opaque here).
    pub extra: Value,
}

/// What the trainer hands over: a host-memory snapshot of whole tensors.
#[derive(Clone, Debug)]
pub struct CheckpointContent {
    /// Step, generation, config, cursor...
    pub meta: CheckpointMeta,
    /// Every tensor, whole; names unique.
    pub tensors: Vec<TensorData>,
}

/// A save attempt that has a folder but no manifest yet.
#[derive(Clone, Debug)]
pub struct PendingSave {
    /// The attempt's folder, relative to the store.
    pub folder: String,
    /// The attempt id (12 hex chars).
    pub attempt: String,
    /// Creation time written into the manifest.
    pub created_unix_ms: u64,
    /// What the manifest will say besides files and tensors.
    pub meta: CheckpointMeta,
}

/// One shard file, written (also the receipt a writer of a shared save leaves).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WrittenShard {
    /// The file's manifest entry (name, size, SHA-256).
    pub file: FileEntry,
    /// Its tensor slices' manifest entries.
    pub tensors: Vec<TensorEntry>,
}

/// A committed save.
#[derive(Clone, Debug)]
pub struct SavedCheckpoint {
    /// The checkpoint's URL: store URL + folder.
    pub url: String,
    /// The manifest as written.
    pub manifest: Manifest,
    /// The folder, relative to the store.
    pub folder: String,
    /// True when the manifest PUT failed (e.g. its response was lost) but reading it back
    /// showed it committed.
    pub recovered_by_read_back: bool,
}

/// What a listing says of one save attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptStatus {
    /// It has a manifest that parses and describes this folder, and every file it lists is
    /// there with the listed size (hashes are checked by verify, not by listing).
    Committed,
    /// No manifest: a save that failed, was killed, or is still being written.
    Incomplete,
    /// It has a manifest, but the manifest or a file is wrong.
    Corrupt {
        /// The bad file (`MANIFEST.json` or a shard).
        file: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl AttemptStatus {
    /// `committed`, `incomplete` or `corrupt`.
    pub fn label(&self) -> &'static str {
        match self {
            AttemptStatus::Committed => "committed",
            AttemptStatus::Incomplete => "incomplete",
            AttemptStatus::Corrupt { .. } => "corrupt",
        }
    }
}

/// One save attempt (checkpoint folder) of a store.
#[derive(Clone, Debug)]
pub struct ListedAttempt {
    /// The folder, relative to the store.
    pub folder: String,
    /// Store URL + folder.
    pub url: String,
    /// Step, from the folder name.
    pub step: u64,
    /// Generation, from the folder name.
    pub generation: u64,
    /// Attempt id, from the folder name.
    pub attempt: String,
    /// What the listing found.
    pub status: AttemptStatus,
    /// The manifest, when it parses.
    pub manifest: Option<Manifest>,
    /// Every object in the folder.
    pub objects: Vec<ObjectInfo>,
}

impl ListedAttempt {
    /// Total size of the folder's objects.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// Newest object time in the folder.
    pub fn modified_unix_ms(&self) -> u64 {
        self.objects
            .iter()
            .map(|o| o.modified_unix_ms)
            .max()
            .unwrap_or(0)
    }

    /// Whether it has a `MANIFEST.json` object at all (committed or corrupt).
    pub fn has_manifest(&self) -> bool {
        !matches!(self.status, AttemptStatus::Incomplete)
    }

    /// (step, created time, attempt): the order saves happened in.
    fn sort_key(&self) -> (u64, u64, String) {
        let created = self
            .manifest
            .as_ref()
            .map_or_else(|| self.modified_unix_ms(), |m| m.created_unix_ms);
        (self.step, created, self.attempt.clone())
    }
}

/// The save attempts of a store.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Oldest first by (step, creation time, attempt id); for one step the newest attempt
    /// sorts last.
    pub attempts: Vec<ListedAttempt>,
}

impl Listing {
    /// The attempts with a manifest (committed or corrupt), oldest first.
    pub fn with_manifest(&self) -> impl DoubleEndedIterator<Item = &ListedAttempt> {
        self.attempts.iter().filter(|a| a.has_manifest())
    }

    /// The newest attempt whose status is committed (not hash-checked).
    pub fn newest_committed(&self) -> Option<&ListedAttempt> {
        self.attempts
            .iter()
            .rev()
            .find(|a| a.status == AttemptStatus::Committed)
    }
}

/// What verification read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Shard files checked.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// Tensor slices checked.
    pub tensors: usize,
}

/// A verified checkpoint in memory.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    /// Its manifest.
    pub manifest: Manifest,
    /// Store URL + folder.
    pub url: String,
    /// The folder, relative to the store.
    pub folder: String,
    /// Every tensor, whole (assembled from its slices), sorted by name.
    pub tensors: Vec<TensorData>,
    /// Whether the files were read straight into the tensors' memory (a `file://` store:
    /// `pread`s, hashed there; a remote one: streamed chunks placed as they arrive), rather
    /// than downloaded into buffers and converted.
    pub read_direct: bool,
}

impl LoadedCheckpoint {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorData> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }
}

/// A fresh attempt id: 12 hex chars mixing the time, the process id and a process-wide counter.
fn new_attempt_id() -> String {
    unique_hex(6, b"")
}

/// `bytes` bytes (as hex) of the SHA-256 of the clock, this process, a per-process counter
/// and `salt`: unique per call in practice (attempt ids, job nonces); not for secrets.
pub fn unique_hex(bytes: usize, salt: &[u8]) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(n.to_le_bytes());
    h.update(salt);
    hex::encode(&h.finalize()[..bytes.min(32)])
}

/// Wall-clock ms since the epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wall-clock ms since the epoch, strictly increasing within this process, so that two saves of
/// one step by one process always order as they happened.
fn created_now_ms() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_unix_ms();
    let prev = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .expect("the closure always returns Some");
    now.max(prev + 1)
}

/// Start a save attempt: pick its attempt id and folder. Writes nothing.
pub fn begin_save(meta: CheckpointMeta) -> PendingSave {
    begin_save_as(meta, new_attempt_id())
}

/// Start a save attempt with a given attempt id (a shared save's writers agree on one).
pub(crate) fn begin_save_as(meta: CheckpointMeta, attempt: String) -> PendingSave {
    PendingSave {
        folder: folder_name(meta.step, meta.generation, &attempt),
        attempt,
        created_unix_ms: created_now_ms(),
        meta,
    }
}

/// Whether a tensor's values exactly fill its shape (the reason if not).
fn check_fills_shape(t: &TensorData) -> Result<(), String> {
    let want: usize = t.shape.iter().product();
    if t.data.len() == want {
        Ok(())
    } else {
        Err(format!(
            "tensor {:?} has {} values but shape {:?} needs {want}",
            t.name,
            t.data.len(),
            t.shape
        ))
    }
}

/// Write one writer's shard of a save plan into the attempt's folder: encode its row slices
/// of `tensors` (whole tensors by name) as safetensors, then upload (multipart when large) and
/// hash at the same time. Encoding and hashing run on blocking threads.
pub async fn write_shard(
    store: &Store,
    pending: &PendingSave,
    shard: &WriterShard,
    tensors: &Arc<BTreeMap<String, TensorData>>,
) -> Result<WrittenShard, StorageError> {
    let format_err = |reason: String| StorageError::Format {
        url: store.url().to_string(),
        reason,
    };
    let mut entries = Vec::with_capacity(shard.slices.len());
    for s in &shard.slices {
        let t = tensors.get(&s.tensor).ok_or_else(|| {
            format_err(format!(
                "the save plan names tensor {:?}, which the snapshot does not have",
                s.tensor
            ))
        })?;
        if t.shape != s.shape {
            return Err(format_err(format!(
                "tensor {:?} has shape {:?}, the save plan says {:?}",
                s.tensor, t.shape, s.shape
            )));
        }
        check_fills_shape(t).map_err(format_err)?;
        entries.push(TensorEntry {
            name: t.name.clone(),
            file: shard.file.clone(),
            dtype: DTYPE_F32.to_string(),
            shape: t.shape.clone(),
            rows: Some([s.rows.start, s.rows.end]),
        });
    }
    let shared = Arc::clone(tensors);
    let slices = shard.slices.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let refs: Vec<TensorRef<'_>> = slices
            .iter()
            .map(|s| {
                let t = &shared[&s.tensor];
                let per_row = row_elems(&t.shape);
                let mut shape = t.shape.clone();
                if let Some(first) = shape.first_mut() {
                    *first = s.rows.len();
                }
                let data = &t.data[s.rows.start * per_row..s.rows.end * per_row];
                (t.name.as_str(), shape, data)
            })
            .collect();
        encode_refs(&refs, None)
    })
    .await
    .map_err(|e| format_err(format!("encoding {} panicked: {e}", shard.file)))?
    .map_err(|e| format_err(format!("{}: {e}", shard.file)))?;
    let bytes = Bytes::from(bytes);
    let to_hash = bytes.clone();
    let alg = HashAlg::of_version(FORMAT_VERSION);
    let hashing = tokio::task::spawn_blocking(move || alg.hex(&to_hash));
    let key = format!("{}/{}", pending.folder, shard.file);
    let (put, hash) = tokio::join!(store.put_large(&key, bytes.clone()), hashing);
    put?;
    let hash = hash.map_err(|e| format_err(format!("hashing {} panicked: {e}", shard.file)))?;
    Ok(WrittenShard {
        file: FileEntry::new(shard.file.clone(), bytes.len() as u64, alg, hash),
        tensors: entries,
    })
}

/// Commit a save: write `MANIFEST.json` (listing every written shard, signed when the store
/// has a signing key) with `PutMode::Create`. If the PUT fails in a way that leaves its outcome unknown (a lost response, or a retry that
/// found the key taken), the manifest is read back: identical bytes mean it is committed.
pub async fn commit_save(
    store: &Store,
    pending: &PendingSave,
    written: Vec<WrittenShard>,
) -> Result<SavedCheckpoint, StorageError> {
    let mut files = Vec::with_capacity(written.len());
    let mut tensors = Vec::new();
    for w in written {
        files.push(w.file);
        tensors.extend(w.tensors);
    }
    let m = &pending.meta;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: m.step,
        generation: m.generation,
        attempt: pending.attempt.clone(),
        created_unix_ms: pending.created_unix_ms,
        config: m.config.clone(),
        config_hash: m.config_hash.clone(),
        data_cursor: m.data_cursor,
        rng: m.rng.clone(),
        extra: m.extra.clone(),
        files,
        tensors,
        signer: String::new(),
        manifest_sha256: String::new(),
        manifest_blake3: String::new(),
        signature: String::new(),
    };
    manifest.check().map_err(|reason| StorageError::Format {
        url: store.url().to_string(),
        reason,
    })?;
    let json = manifest.to_json_signed(store.sign_key());
    let manifest = Manifest::parse(&json).map_err(|reason| StorageError::Format {
        url: store.url().to_string(),
        reason,
    })?;
    let key = format!("{}/{MANIFEST_FILE}", pending.folder);
    let recovered_by_read_back = store.put_new_or_same(&key, Bytes::from(json)).await?;
    Ok(SavedCheckpoint {
        url: store.url_of(&pending.folder),
        folder: pending.folder.clone(),
        manifest,
        recovered_by_read_back,
    })
}

/// Save a checkpoint from this process as `writers` data-parallel ranks would: plan (every
/// tensor held by ranks `0..writers`), write the shards (at most 4 at once), commit. Nothing is
/// ever overwritten; saving a step again makes a new folder. Content that cannot be saved is
/// [`StorageError::Format`] and writes nothing. A failure part-way leaves an incomplete folder.
pub async fn save_checkpoint(
    store: &Store,
    content: &CheckpointContent,
    writers: u32,
) -> Result<SavedCheckpoint, StorageError> {
    save_owned(store, content.clone(), writers).await
}

/// [`save_checkpoint`] taking the content by value, so that the snapshot's tensors are not
/// copied once more (the Checkpoint actor's path).
pub async fn save_owned(
    store: &Store,
    content: CheckpointContent,
    writers: u32,
) -> Result<SavedCheckpoint, StorageError> {
    let format_err = |reason: String| StorageError::Format {
        url: store.url().to_string(),
        reason,
    };
    let plan = crate::shared::replica_plan(store, &content.tensors, writers)?;
    let mut by_name = BTreeMap::new();
    for t in content.tensors {
        check_fills_shape(&t).map_err(format_err)?;
        by_name.insert(t.name.clone(), t);
    }
    let by_name = Arc::new(by_name);
    let pending = begin_save(content.meta);
    let pending_ref = &pending;
    let by_name_ref = &by_name;
    let written: Vec<WrittenShard> = futures::stream::iter(plan.shards)
        .map(|shard| async move { write_shard(store, pending_ref, &shard, by_name_ref).await })
        .buffered(MAX_CONCURRENT_TRANSFERS)
        .try_collect()
        .await?;
    commit_save(store, &pending, written).await
}

/// The status of a folder whose manifest object exists.
fn manifest_status(
    folder: &str,
    parsed: &Result<Manifest, String>,
    objects: &[ObjectInfo],
) -> AttemptStatus {
    let corrupt = |file: &str, reason: String| AttemptStatus::Corrupt {
        file: file.to_string(),
        reason,
    };
    let m = match parsed {
        Ok(m) => m,
        Err(reason) => return corrupt(MANIFEST_FILE, reason.clone()),
    };
    if m.folder() != folder {
        return corrupt(
            MANIFEST_FILE,
            format!("describes {} but sits in folder {folder}", m.folder()),
        );
    }
    for f in &m.files {
        let key = format!("{folder}/{}", f.name);
        match objects.iter().find(|o| o.key == key) {
            None => {
                return corrupt(
                    &f.name,
                    "missing: listed in MANIFEST.json but not in the store".into(),
                )
            }
            Some(o) if o.size != f.size => {
                return corrupt(
                    &f.name,
                    format!("size mismatch (expected {} bytes, got {})", f.size, o.size),
                )
            }
            Some(_) => {}
        }
    }
    AttemptStatus::Committed
}

/// List the store's save attempts (`step-...` folders directly under it; anything else is
/// ignored), reading each manifest and comparing file sizes with the listing; no hashing.
pub async fn list_checkpoints(store: &Store) -> Result<Listing, StorageError> {
    let mut folders = BTreeMap::<String, Vec<ObjectInfo>>::new();
    for object in store.list_objects().await? {
        let Some((folder, _)) = object.key.split_once('/') else {
            continue;
        };
        if parse_folder_name(folder).is_none() {
            continue;
        }
        folders.entry(folder.to_string()).or_default().push(object);
    }
    let fetched: Vec<Option<ListedAttempt>> = futures::stream::iter(folders)
        .map(|(folder, objects)| async move {
            let name = parse_folder_name(&folder).expect("only checkpoint folders are kept");
            let manifest_key = format!("{folder}/{MANIFEST_FILE}");
            let (status, manifest) = if objects.iter().any(|o| o.key == manifest_key) {
                let Some(bytes) = store.get(&manifest_key).await? else {
                    // Deleted between the listing and the read (pruned): not there any more.
                    return Ok(None);
                };
                let parsed = Manifest::parse(&bytes);
                let status = manifest_status(&folder, &parsed, &objects);
                (status, parsed.ok())
            } else {
                (AttemptStatus::Incomplete, None)
            };
            Ok::<_, StorageError>(Some(ListedAttempt {
                url: store.url_of(&folder),
                step: name.step,
                generation: name.generation,
                attempt: name.attempt,
                status,
                manifest,
                objects,
                folder,
            }))
        })
        .buffered(MAX_CONCURRENT_TRANSFERS * 2)
        .try_collect()
        .await?;
    let mut attempts: Vec<ListedAttempt> = fetched.into_iter().flatten().collect();
    attempts.sort_by_cached_key(ListedAttempt::sort_key);
    Ok(Listing { attempts })
}

/// Read a committed checkpoint and check everything against its manifest (each file hashed
/// as it downloads), and, with `trust`, the manifest's signature first; with `assemble`, also
/// return its whole tensors.
async fn read_checkpoint(
    store: &Store,
    folder: &str,
    assemble: bool,
    trust: Option<&TrustKey>,
) -> Result<(Manifest, Vec<TensorData>, VerifyReport, bool), StorageError> {
    let url = store.url_of(folder);
    let corrupt = |file: &str, reason: String| StorageError::Corrupt {
        url: url.clone(),
        file: file.to_string(),
        reason,
    };
    let bytes = store
        .get(&format!("{folder}/{MANIFEST_FILE}"))
        .await?
        .ok_or_else(|| corrupt(MANIFEST_FILE, "missing: the save never committed".into()))?;
    let manifest = Manifest::parse(&bytes).map_err(|e| corrupt(MANIFEST_FILE, e))?;
    let last_segment = folder.rsplit('/').next().unwrap_or(folder);
    if manifest.folder() != last_segment {
        return Err(corrupt(
            MANIFEST_FILE,
            format!(
                "describes {} but sits in folder {last_segment}",
                manifest.folder()
            ),
        ));
    }
    if let Some(trust) = trust {
        crate::signing::check_signature(&bytes, &manifest, trust).map_err(|reason| {
            StorageError::Untrusted {
                url: url.clone(),
                reason,
            }
        })?;
    }
    if assemble {
        let direct = if store.is_remote() {
            let streamed = load_streamed(store, folder, &manifest, MAX_CONCURRENT_TRANSFERS);
            streamed.await.ok().flatten()
        } else {
            load_local(store, folder, &manifest).await
        };
        if let Some(tensors) = direct {
            let report = VerifyReport {
                files: manifest.files.len(),
                bytes: manifest.files.iter().map(|f| f.size).sum(),
                tensors: manifest.tensors.len(),
            };
            return Ok((manifest, tensors, report, true));
        }
    }
    let manifest_ref = &manifest;
    let corrupt_ref = &corrupt;
    let files: Vec<(String, Bytes, usize)> = futures::stream::iter(manifest.files.clone())
        .map(|entry| async move {
            let (bytes, hash) = store
                .get_hashed(
                    &format!("{folder}/{}", entry.name),
                    Some(entry.size),
                    entry.hash().0,
                )
                .await?
                .ok_or_else(|| {
                    corrupt_ref(
                        &entry.name,
                        "missing: listed in MANIFEST.json but not in the store".into(),
                    )
                })?;
            check_hashed(&entry, bytes.len() as u64, &hash)
                .map_err(|e| corrupt_ref(&entry.name, e))?;
            let expected: Vec<TensorEntry> =
                manifest_ref.tensors_in(&entry.name).cloned().collect();
            let structure = bytes.clone();
            let slices = tokio::task::spawn_blocking(move || {
                let refs: Vec<&TensorEntry> = expected.iter().collect();
                decode_shard(&structure, &refs, false).map(|t| t.len())
            })
            .await
            .map_err(|e| corrupt_ref(&entry.name, format!("checking panicked: {e}")))?
            .map_err(|e| corrupt_ref(&entry.name, e))?;
            Ok::<_, StorageError>((entry.name.clone(), bytes, slices))
        })
        .buffered(MAX_CONCURRENT_TRANSFERS)
        .try_collect()
        .await?;
    let report = VerifyReport {
        files: files.len(),
        bytes: files.iter().map(|f| f.1.len() as u64).sum(),
        tensors: files.iter().map(|f| f.2).sum(),
    };
    if !assemble {
        return Ok((manifest, Vec::new(), report, false));
    }
    let for_assembly = manifest.clone();
    let tensors = tokio::task::spawn_blocking(move || {
        let files: Vec<(String, Bytes)> = files.into_iter().map(|(n, b, _)| (n, b)).collect();
        crate::restore::assemble_tensors(&for_assembly, &files)
    })
    .await
    .map_err(|e| corrupt(MANIFEST_FILE, format!("assembling panicked: {e}")))?
    .map_err(|reason| corrupt(MANIFEST_FILE, reason))?;
    Ok((manifest, tensors, report, false))
}

/// A restore from a `file://` store straight into tensor memory ([`load_direct`]), or
/// `None` to read the buffered way: another store, a checkpoint that path does not take,
/// or anything wrong (the buffered read then says what, as a verify does).
async fn load_local(store: &Store, folder: &str, manifest: &Manifest) -> Option<Vec<TensorData>> {
    store.local_file(folder)?;
    let paths: BTreeMap<String, std::path::PathBuf> = manifest
        .files
        .iter()
        .map(|f| {
            Some((
                f.name.clone(),
                store.local_file(&format!("{folder}/{}", f.name))?,
            ))
        })
        .collect::<Option<_>>()?;
    let manifest = manifest.clone();
    tokio::task::spawn_blocking(move || load_direct(&manifest, &|name| paths.get(name).cloned()))
        .await
        .ok()?
        .ok()?
}

/// Re-read every file of a committed checkpoint and check its size and hash against the
/// manifest, and that every tensor slice the manifest names is in its file with that dtype and
/// shape (and nothing else is). Problems are [`StorageError::Corrupt`] naming the file. When
/// the store has a trust key, a manifest not signed by it is [`StorageError::Untrusted`].
pub async fn verify_checkpoint(store: &Store, folder: &str) -> Result<VerifyReport, StorageError> {
    read_checkpoint(store, folder, false, store.trust_key())
        .await
        .map(|(_, _, report, _)| report)
}

/// Load a committed checkpoint, verifying it as it reads (see [`verify_checkpoint`]), and
/// assemble every tensor whole from its slices.
pub async fn load_checkpoint(
    store: &Store,
    folder: &str,
) -> Result<LoadedCheckpoint, StorageError> {
    let (manifest, tensors, _, read_direct) =
        read_checkpoint(store, folder, true, store.trust_key()).await?;
    Ok(LoadedCheckpoint {
        manifest,
        url: store.url_of(folder),
        folder: folder.to_string(),
        tensors,
        read_direct,
    })
}

/// The newest checkpoint that verifies, with a one-line warning for each newer one skipped
/// (corrupt manifest, missing or bad file, or under a trust key a manifest not signed by it). `Ok(None)` when the store has no manifest at all;
/// [`StorageError::NoneVerify`] when it has some but none verifies. Object store failures
/// (network, permissions) are returned, not skipped: a store that cannot be read says nothing
/// about which checkpoint is good.
pub async fn latest_verified(
    store: &Store,
) -> Result<Option<(LoadedCheckpoint, Vec<String>)>, StorageError> {
    let listing = list_checkpoints(store).await?;
    let mut warnings = Vec::new();
    let mut newest_problem = None;
    for listed in listing.with_manifest().rev() {
        let problem = match &listed.status {
            AttemptStatus::Corrupt { file, reason } => {
                format!("checkpoint {}: {file}: {reason}", listed.url)
            }
            _ => match load_checkpoint(store, &listed.folder).await {
                Ok(loaded) => return Ok(Some((loaded, warnings))),
                Err(e @ (StorageError::Corrupt { .. } | StorageError::Untrusted { .. })) => {
                    e.to_string()
                }
                Err(e) => return Err(e),
            },
        };
        warnings.push(format!("{problem}; skipped, trying an older checkpoint"));
        newest_problem.get_or_insert(problem);
    }
    match newest_problem {
        None => Ok(None),
        Some(newest_problem) => Err(StorageError::NoneVerify {
            url: store.url().to_string(),
            newest_problem,
        }),
    }
}

/// What [`prune`] decided and did.
#[derive(Clone, Debug, Default)]
pub struct PruneReport {
    /// One decision per save attempt, oldest first.
    pub decisions: Vec<RetentionDecision>,
    /// Objects deleted (0 on a dry run).
    pub deleted_objects: usize,
    /// Bytes deleted, or that would be on a dry run.
    pub deleted_bytes: u64,
}

/// Apply a retention policy to a store. Committed attempts are hash-verified newest first until
/// one verifies (that newest good checkpoint is never deleted); older committed ones are not
/// re-hashed. Signatures are not checked: retention is about intact checkpoints, and a trust
/// key never makes a checkpoint deletable. `in_progress` names folders being written right now (never deleted). A folder is
/// deleted manifest first, so a prune that dies half-way leaves an incomplete folder, never a
/// committed one with missing files. With `dry_run`, nothing is deleted.
pub async fn prune(
    store: &Store,
    policy: &RetentionPolicy,
    in_progress: &[String],
    now_unix_ms: u64,
    dry_run: bool,
) -> Result<PruneReport, StorageError> {
    prune_knowing(store, policy, in_progress, None, now_unix_ms, dry_run).await
}

/// [`prune`] right after this process committed `saved` (whose bytes it hashed as it wrote
/// them): that folder counts as verified, so the newest checkpoint is not read back.
pub async fn prune_after_save(
    store: &Store,
    policy: &RetentionPolicy,
    saved: &str,
    now_unix_ms: u64,
) -> Result<PruneReport, StorageError> {
    prune_knowing(store, policy, &[], Some(saved), now_unix_ms, false).await
}

async fn prune_knowing(
    store: &Store,
    policy: &RetentionPolicy,
    in_progress: &[String],
    known_good: Option<&str>,
    now_unix_ms: u64,
    dry_run: bool,
) -> Result<PruneReport, StorageError> {
    let listing = list_checkpoints(store).await?;
    let mut states: Vec<FolderState> = listing
        .attempts
        .iter()
        .map(|a| match &a.status {
            AttemptStatus::Incomplete => FolderState::Uncommitted {
                in_progress: in_progress.contains(&a.folder),
            },
            AttemptStatus::Corrupt { file, reason } => FolderState::Bad {
                reason: format!("{file}: {reason}"),
            },
            AttemptStatus::Committed => FolderState::Unverified,
        })
        .collect();
    for (i, a) in listing.attempts.iter().enumerate().rev() {
        if states[i] != FolderState::Unverified {
            continue;
        }
        if known_good == Some(a.folder.as_str()) {
            states[i] = FolderState::Good;
            break;
        }
        match read_checkpoint(store, &a.folder, false, None).await {
            Ok(_) => {
                states[i] = FolderState::Good;
                break;
            }
            Err(StorageError::Corrupt { file, reason, .. }) => {
                states[i] = FolderState::Bad {
                    reason: format!("{file}: {reason}"),
                }
            }
            Err(e) => return Err(e),
        }
    }
    let infos: Vec<FolderInfo> = listing
        .attempts
        .iter()
        .zip(states)
        .map(|(a, state)| FolderInfo {
            folder: a.folder.clone(),
            step: a.step,
            created_unix_ms: match (&state, &a.manifest) {
                (FolderState::Uncommitted { .. }, _) | (_, None) => a.modified_unix_ms(),
                (_, Some(m)) => m.created_unix_ms,
            },
            state,
        })
        .collect();
    let decisions = retention(&infos, policy, now_unix_ms);
    let mut report = PruneReport::default();
    for (a, d) in listing.attempts.iter().zip(&decisions) {
        if d.keep {
            continue;
        }
        report.deleted_bytes += a.bytes();
        if dry_run {
            continue;
        }
        let manifest_key = format!("{}/{MANIFEST_FILE}", a.folder);
        let mut keys: Vec<&str> = a.objects.iter().map(|o| o.key.as_str()).collect();
        keys.sort_by_key(|k| *k != manifest_key);
        for key in keys {
            store.delete(key).await?;
            report.deleted_objects += 1;
        }
    }
    report.decisions = decisions;
    Ok(report)
}

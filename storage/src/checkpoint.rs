//! Saving, listing, verifying and loading checkpoints in a [`Store`].
//!
//! Save writes every shard once (`PutMode::Create`) into a fresh folder
//! `step-<step:010>-g<gen>-<attempt>`, then `MANIFEST.json` last: the manifest is the commit.
//! Readers trust nothing they have not hashed: verify and load re-read every file and check its
//! size, SHA-256 and tensors against the manifest; [`latest_verified`] falls back to older
//! checkpoints when the newest one does not verify.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::StorageError;
use crate::manifest::{
    check_file, parse_folder_name, sha256_hex, FileEntry, Manifest, TensorEntry, DTYPE_F32,
    FORMAT_VERSION, MANIFEST_FILE,
};
use crate::shard::{decode_shard, encode_shard, TensorData};
use crate::store::{is_plain_segment, Store};

/// At most this many objects are uploaded or downloaded at once by one call.
const MAX_CONCURRENT_TRANSFERS: usize = 4;

/// What the trainer hands over: a host-memory snapshot.
#[derive(Clone, Debug)]
pub struct CheckpointContent {
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
    /// `(file name, tensors)`, e.g. `("params.safetensors", ..)`; file names are plain,
    /// unique, and not `MANIFEST.json`.
    pub shards: Vec<(String, Vec<TensorData>)>,
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
}

/// One committed (manifest-bearing) folder.
#[derive(Clone, Debug)]
pub struct ListedCheckpoint {
    /// The folder, relative to the store.
    pub folder: String,
    /// Store URL + folder.
    pub url: String,
    /// The parsed manifest, or why it does not parse.
    pub manifest: Result<Manifest, String>,
}

/// The checkpoint folders of a store.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Folders with a `MANIFEST.json`, oldest first by (step, created_unix_ms, attempt);
    /// a manifest that does not parse sorts by its folder's step, as if created at time 0.
    pub committed: Vec<ListedCheckpoint>,
    /// Checkpoint folders without a manifest (abandoned or in-progress saves), sorted by name.
    pub uncommitted: Vec<String>,
}

/// What verification read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Shard files checked.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// Tensors checked.
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
    /// `(file name, tensors)` in manifest order.
    pub shards: Vec<(String, Vec<TensorData>)>,
}

/// A fresh attempt id: 12 hex chars mixing the time, the process id and a process-wide counter.
fn new_attempt_id() -> String {
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
    hex::encode(&h.finalize()[..6])
}

/// Wall-clock ms since the epoch, strictly increasing within this process, so that two saves of
/// one step by one process always order as they happened.
fn created_now_ms() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let prev = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .expect("the closure always returns Some");
    now.max(prev + 1)
}

/// Save a checkpoint into a new folder: every shard as safetensors (F32, little endian) with
/// `PutMode::Create`, then `MANIFEST.json` with `PutMode::Create`. Nothing is ever overwritten;
/// saving a step again makes a new folder. Content that cannot be encoded is
/// [`StorageError::Format`] and writes nothing. A failure part-way leaves an uncommitted folder.
pub async fn save_checkpoint(
    store: &Store,
    content: &CheckpointContent,
) -> Result<SavedCheckpoint, StorageError> {
    let format_err = |reason: String| StorageError::Format {
        url: store.url().to_string(),
        reason,
    };
    let mut files = Vec::with_capacity(content.shards.len());
    let mut tensors = Vec::new();
    let mut encoded = Vec::with_capacity(content.shards.len());
    for (name, shard) in &content.shards {
        if !is_plain_segment(name) || name == MANIFEST_FILE {
            return Err(format_err(format!(
                "shard file name {name:?} is not allowed"
            )));
        }
        if files.iter().any(|f: &FileEntry| &f.name == name) {
            return Err(format_err(format!("shard file {name:?} appears twice")));
        }
        let bytes = encode_shard(shard).map_err(|e| format_err(format!("{name}: {e}")))?;
        files.push(FileEntry {
            name: name.clone(),
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
        tensors.extend(shard.iter().map(|t| TensorEntry {
            name: t.name.clone(),
            file: name.clone(),
            dtype: DTYPE_F32.to_string(),
            shape: t.shape.clone(),
        }));
        encoded.push((name.clone(), Bytes::from(bytes)));
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: content.step,
        generation: content.generation,
        attempt: new_attempt_id(),
        created_unix_ms: created_now_ms(),
        config: content.config.clone(),
        config_hash: content.config_hash.clone(),
        data_cursor: content.data_cursor,
        rng: content.rng.clone(),
        extra: content.extra.clone(),
        files,
        tensors,
    };
    manifest.check().map_err(format_err)?;
    let folder = manifest.folder();

    futures::stream::iter(encoded)
        .map(|(name, bytes)| {
            let key = format!("{folder}/{name}");
            async move { store.put_new(&key, bytes).await }
        })
        .buffer_unordered(MAX_CONCURRENT_TRANSFERS)
        .try_collect::<Vec<()>>()
        .await?;
    store
        .put_new(
            &format!("{folder}/{MANIFEST_FILE}"),
            manifest.to_json().into(),
        )
        .await?;
    Ok(SavedCheckpoint {
        url: store.url_of(&folder),
        manifest,
        folder,
    })
}

/// List the store's checkpoint folders (`step-...` folders directly under it; anything else is
/// ignored): those with a `MANIFEST.json` as committed (parsed, or the reason it does not parse),
/// the rest as uncommitted.
pub async fn list_checkpoints(store: &Store) -> Result<Listing, StorageError> {
    let mut folders = std::collections::BTreeMap::<String, bool>::new();
    for key in store.list_keys().await? {
        let Some((folder, rest)) = key.split_once('/') else {
            continue;
        };
        if parse_folder_name(folder).is_none() {
            continue;
        }
        *folders.entry(folder.to_string()).or_default() |= rest == MANIFEST_FILE;
    }
    let uncommitted = folders
        .iter()
        .filter(|(_, committed)| !**committed)
        .map(|(f, _)| f.clone())
        .collect();
    let committed_folders: Vec<String> = folders
        .into_iter()
        .filter(|(_, committed)| *committed)
        .map(|(f, _)| f)
        .collect();
    let fetched: Vec<Option<ListedCheckpoint>> = futures::stream::iter(committed_folders)
        .map(|folder| async move {
            let Some(bytes) = store.get(&format!("{folder}/{MANIFEST_FILE}")).await? else {
                // Deleted between the listing and the read (pruned): not there any more.
                return Ok(None);
            };
            Ok(Some(ListedCheckpoint {
                url: store.url_of(&folder),
                manifest: Manifest::parse(&bytes),
                folder,
            }))
        })
        .buffered(MAX_CONCURRENT_TRANSFERS)
        .try_collect()
        .await?;
    let mut committed: Vec<ListedCheckpoint> = fetched.into_iter().flatten().collect();
    committed.sort_by_cached_key(|c| match &c.manifest {
        Ok(m) => {
            let (step, created, attempt) = m.sort_key();
            (step, created, attempt.to_string())
        }
        Err(_) => {
            let name = parse_folder_name(&c.folder).expect("only checkpoint folders are listed");
            (name.step, 0, name.attempt)
        }
    });
    Ok(Listing {
        committed,
        uncommitted,
    })
}

/// Read a committed checkpoint and check everything against its manifest; with `decode`, also
/// return the tensors.
async fn read_checkpoint(
    store: &Store,
    folder: &str,
    decode: bool,
) -> Result<(Manifest, Vec<(String, Vec<TensorData>)>, VerifyReport), StorageError> {
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
    let manifest_ref = &manifest;
    let corrupt_ref = &corrupt;
    let shards: Vec<(String, Vec<TensorData>, u64)> = futures::stream::iter(&manifest.files)
        .map(|entry| async move {
            let bytes = store
                .get(&format!("{folder}/{}", entry.name))
                .await?
                .ok_or_else(|| {
                    corrupt_ref(
                        &entry.name,
                        "missing: listed in MANIFEST.json but not in the store".into(),
                    )
                })?;
            check_file(entry, &bytes).map_err(|e| corrupt_ref(&entry.name, e))?;
            let expected: Vec<&TensorEntry> = manifest_ref.tensors_in(&entry.name).collect();
            let tensors =
                decode_shard(&bytes, &expected, decode).map_err(|e| corrupt_ref(&entry.name, e))?;
            Ok::<_, StorageError>((entry.name.clone(), tensors, bytes.len() as u64))
        })
        .buffered(MAX_CONCURRENT_TRANSFERS)
        .try_collect()
        .await?;
    let report = VerifyReport {
        files: shards.len(),
        bytes: shards.iter().map(|s| s.2).sum(),
        tensors: shards.iter().map(|s| s.1.len()).sum(),
    };
    let shards = shards.into_iter().map(|(name, t, _)| (name, t)).collect();
    Ok((manifest, shards, report))
}

/// Re-read every file of a committed checkpoint and check its size and SHA-256 against the
/// manifest, and that every tensor the manifest names is in its file with that dtype and shape
/// (and nothing else is). Problems are [`StorageError::Corrupt`] naming the file.
pub async fn verify_checkpoint(store: &Store, folder: &str) -> Result<VerifyReport, StorageError> {
    read_checkpoint(store, folder, false)
        .await
        .map(|(_, _, report)| report)
}

/// Load a committed checkpoint, verifying it as it reads (see [`verify_checkpoint`]).
pub async fn load_checkpoint(
    store: &Store,
    folder: &str,
) -> Result<LoadedCheckpoint, StorageError> {
    let (manifest, shards, _) = read_checkpoint(store, folder, true).await?;
    Ok(LoadedCheckpoint {
        manifest,
        url: store.url_of(folder),
        folder: folder.to_string(),
        shards,
    })
}

/// The newest committed checkpoint that verifies, with a one-line warning for each newer one
/// skipped (its manifest does not parse, or it is corrupt). `Ok(None)` when the store has no
/// committed checkpoint; [`StorageError::NoneVerify`] when it has some but none verifies.
/// Object store failures (network, permissions) are returned, not skipped: a store that cannot
/// be read says nothing about which checkpoint is good.
pub async fn latest_verified(
    store: &Store,
) -> Result<Option<(LoadedCheckpoint, Vec<String>)>, StorageError> {
    let listing = list_checkpoints(store).await?;
    let mut warnings = Vec::new();
    let mut newest_problem = None;
    for listed in listing.committed.iter().rev() {
        let problem = match &listed.manifest {
            Err(reason) => format!("checkpoint {}: {MANIFEST_FILE}: {reason}", listed.url),
            Ok(_) => match load_checkpoint(store, &listed.folder).await {
                Ok(loaded) => return Ok(Some((loaded, warnings))),
                Err(e @ StorageError::Corrupt { .. }) => e.to_string(),
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

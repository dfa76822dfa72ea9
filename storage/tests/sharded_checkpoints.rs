//! Sharded checkpoints (manifest format version 2) on `memory://` and `file://` stores:
//! resharding, row tiling, a flipped byte in any file, listing statuses, retention, multipart
//! uploads, read-back commits and version-1 manifests.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    assert_bit_identical, bit_tensor, content, file_url, flip_byte, manifest_on_disk, meta,
    on_disk, sorted, tensor,
};
use serde_json::json;
use tenax_core::ckpt::{rows_of, save_plan, RetentionPolicy, TensorSpec, WriterShard};
use tenax_storage::manifest::sha256_hex;
use tenax_storage::{
    begin_save, commit_save, encode_shard, latest_verified, list_checkpoints, load_checkpoint,
    now_unix_ms, part_size_for, prune, save_checkpoint, verify_checkpoint, write_shard,
    AttemptStatus, CheckpointContent, CheckpointMeta, ListedAttempt, Listing, PendingSave,
    StorageError, Store, StoreOptions, TensorData, MANIFEST_FILE,
};

const S0: &str = "shard-00000.safetensors";
const S1: &str = "shard-00001.safetensors";
const S2: &str = "shard-00002.safetensors";

/// Awkward shapes, given out of name order: 36 elements in 18 rows (14 of them non-empty).
fn odd_tensors() -> Vec<TensorData> {
    vec![
        bit_tensor("e.row", &[1, 9], 5),
        bit_tensor("a.matrix", &[7, 3], 1),
        bit_tensor("c.scalar", &[], 3),
        bit_tensor("d.empty", &[4, 0], 4),
        bit_tensor("b.vector", &[5], 2),
        bit_tensor("f.none", &[0], 6),
    ]
}

fn with_tensors(step: u64, tensors: &[TensorData]) -> CheckpointContent {
    CheckpointContent {
        meta: meta(step, 0),
        tensors: tensors.to_vec(),
    }
}

/// The save plan `save_checkpoint` makes for `writers` data-parallel writers.
fn planned_shards(tensors: &[TensorData], writers: u32) -> Vec<WriterShard> {
    let holders: Vec<u32> = (0..writers).collect();
    let held: Vec<(TensorSpec, Vec<u32>)> = tensors
        .iter()
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                shape: t.shape.clone(),
            };
            (spec, holders.clone())
        })
        .collect();
    save_plan(&held).unwrap().shards
}

/// The names of the objects in a folder of a store, sorted.
async fn folder_files(store: &Store, folder: &str) -> Vec<String> {
    let prefix = format!("{folder}/");
    store
        .list_keys()
        .await
        .unwrap()
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn shard_names(writers: &[u32]) -> Vec<String> {
    writers
        .iter()
        .map(|w| format!("shard-{w:05}.safetensors"))
        .collect()
}

#[tokio::test]
async fn any_number_of_writers_loads_back_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = odd_tensors();
    // (writers, the writers that get a shard). With 8 writers the cuts fall at elements
    // 0, 3, 9, 12, 18, 22, 27, 27, 36: writer 6 has nothing to write and no file.
    let cases: &[(u32, &[u32])] = &[
        (1, &[0]),
        (2, &[0, 1]),
        (3, &[0, 1, 2]),
        (5, &[0, 1, 2, 3, 4]),
        (8, &[0, 1, 2, 3, 4, 5, 7]),
    ];
    // A wrapped object store counts as remote (S3-like): streamed GETs placed into the
    // tensors as they come.
    let wrapped = Store::from_object_store(
        "test://remote",
        std::sync::Arc::new(object_store::memory::InMemory::new()),
        "runs",
    );
    for store in [
        Store::open("memory://").unwrap(),
        Store::open(&file_url(tmp.path())).unwrap(),
        wrapped,
    ] {
        for (step, (writers, with_shard)) in cases.iter().enumerate() {
            let what = format!("{writers} writers on {}", store.url());
            let want_files = shard_names(with_shard);
            let planned: Vec<String> = planned_shards(&tensors, *writers)
                .into_iter()
                .map(|s| s.file)
                .collect();
            assert_eq!(planned, want_files, "{what}: the plan");

            let c = with_tensors(step as u64 + 1, &tensors);
            let saved = save_checkpoint(&store, &c, *writers).await.unwrap();
            let listed: Vec<String> = saved
                .manifest
                .files
                .iter()
                .map(|f| f.name.clone())
                .collect();
            assert_eq!(listed, want_files, "{what}: manifest files");
            let mut stored = want_files.clone();
            stored.push(MANIFEST_FILE.to_string());
            stored.sort();
            assert_eq!(folder_files(&store, &saved.folder).await, stored, "{what}");

            let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
            assert_bit_identical(&loaded.tensors, &sorted(&tensors), &what);
            // On local disk (pread) and from remote stores (streamed GETs) the files are
            // read straight into the tensors' memory; memory:// goes the buffered way.
            let direct = !store.url().starts_with("memory://");
            assert_eq!(
                loaded.read_direct, direct,
                "{what}: read straight into tensors"
            );
            let report = verify_checkpoint(&store, &saved.folder).await.unwrap();
            assert_eq!(report.files, want_files.len(), "{what}");
            assert_eq!(report.tensors, saved.manifest.tensors.len(), "{what}");
        }

        // Far more writers than rows: one shard at most per non-empty row, plus writer 0,
        // which writes the zero-element tensors.
        let planned = planned_shards(&tensors, 64);
        assert!(planned.len() <= 15, "{} shards", planned.len());
        let saved = save_checkpoint(&store, &with_tensors(100, &tensors), 64)
            .await
            .unwrap();
        let listed: Vec<String> = saved
            .manifest
            .files
            .iter()
            .map(|f| f.name.clone())
            .collect();
        let planned: Vec<String> = planned.into_iter().map(|s| s.file).collect();
        assert_eq!(listed, planned);
        assert_eq!(
            folder_files(&store, &saved.folder).await.len(),
            planned.len() + 1
        );
        let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
        assert_eq!(latest.folder, saved.folder);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_bit_identical(&latest.tensors, &sorted(&tensors), "64 writers");
        assert_eq!(latest.read_direct, !store.url().starts_with("memory://"));
    }
}

/// A remote store's shard with one flipped byte (header or data): a load refuses it,
/// naming the file.
#[tokio::test]
async fn a_flipped_byte_in_a_remote_shard_is_refused() {
    use object_store::{ObjectStore, ObjectStoreExt};
    let inner: std::sync::Arc<dyn ObjectStore> =
        std::sync::Arc::new(object_store::memory::InMemory::new());
    let store = Store::from_object_store("test://remote", inner.clone(), "");
    let tensors = odd_tensors();
    let saved = save_checkpoint(&store, &with_tensors(1, &tensors), 2)
        .await
        .unwrap();
    let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
    assert!(loaded.read_direct, "streamed straight into the tensors");
    assert_bit_identical(&loaded.tensors, &sorted(&tensors), "remote");
    let path = object_store::path::Path::from(format!("{}/{S1}", saved.folder));
    let good = inner.get(&path).await.unwrap().bytes().await.unwrap();
    for at in [3, 20, good.len() / 2, good.len() - 1] {
        let mut bad = good.to_vec();
        bad[at] ^= 0x10;
        inner.put(&path, Bytes::from(bad).into()).await.unwrap();
        match load_checkpoint(&store, &saved.folder).await {
            Err(StorageError::Corrupt { file, .. }) => assert_eq!(file, S1, "byte {at}"),
            other => panic!("byte {at}: want Corrupt, got {other:?}"),
        }
    }
    inner.put(&path, good.into()).await.unwrap();
    load_checkpoint(&store, &saved.folder).await.unwrap();
}

/// `save_checkpoint` accepts content without tensors and commits a manifest with no files;
/// `verify_checkpoint` passes it and `load_checkpoint` gives its manifest and no tensors.
#[tokio::test]
async fn a_checkpoint_without_tensors_is_a_manifest_alone() {
    let store = Store::open("memory://").unwrap();
    let saved = save_checkpoint(&store, &with_tensors(1, &[]), 4)
        .await
        .unwrap();
    assert!(saved.manifest.files.is_empty());
    assert_eq!(
        folder_files(&store, &saved.folder).await,
        [MANIFEST_FILE.to_string()]
    );
    verify_checkpoint(&store, &saved.folder).await.unwrap();
    let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
    assert!(loaded.tensors.is_empty());
    assert_eq!(loaded.manifest.data_cursor, 32);
}

#[tokio::test]
async fn every_row_is_written_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let tensors = odd_tensors();
    let saved = save_checkpoint(&store, &with_tensors(3, &tensors), 3)
        .await
        .unwrap();
    let manifest = manifest_on_disk(tmp.path(), &saved.folder);
    assert_eq!(manifest, saved.manifest);

    // 36 elements in name order (a.matrix 21, b.vector 5, c.scalar 1, d.empty 0, e.row 9,
    // f.none 0), cut at elements 12 and 24: 12 elements per writer.
    let layout: Vec<(&str, &str, Option<[usize; 2]>)> = manifest
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.file.as_str(), t.rows))
        .collect();
    assert_eq!(
        layout,
        vec![
            ("a.matrix", S0, Some([0, 4])),
            ("d.empty", S0, Some([0, 4])),
            ("f.none", S0, Some([0, 0])),
            ("a.matrix", S1, Some([4, 7])),
            ("b.vector", S1, Some([0, 3])),
            ("b.vector", S2, Some([3, 5])),
            ("c.scalar", S2, Some([0, 1])),
            ("e.row", S2, Some([0, 1])),
        ]
    );

    // From the manifest: per tensor, the slices tile its rows (sum = rows, no gap/overlap).
    for t in &tensors {
        let mut ranges: Vec<[usize; 2]> = manifest
            .tensors
            .iter()
            .filter(|e| e.name == t.name)
            .map(|e| {
                assert_eq!(e.shape, t.shape, "{}: whole shape in every slice", t.name);
                e.rows.expect("version 2 slices have rows")
            })
            .collect();
        let total: usize = ranges.iter().map(|r| r[1] - r[0]).sum();
        assert_eq!(total, rows_of(&t.shape), "{}: rows written", t.name);
        ranges.sort();
        let mut cursor = 0;
        for r in ranges.iter().filter(|r| r[0] < r[1]) {
            assert_eq!(r[0], cursor, "{}: {ranges:?}", t.name);
            cursor = r[1];
        }
    }

    // From the files themselves: each holds exactly its slices, with the original values.
    let mut rows_in_files: BTreeMap<String, usize> = BTreeMap::new();
    let by_name: BTreeMap<&str, &TensorData> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for f in &manifest.files {
        let bytes = std::fs::read(on_disk(tmp.path(), &saved.folder, &f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.size);
        assert_eq!(tenax_storage::HashAlg::Blake3.hex(&bytes), f.blake3);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort_unstable();
        let mut listed: Vec<&str> = manifest
            .tensors_in(&f.name)
            .map(|e| e.name.as_str())
            .collect();
        listed.sort_unstable();
        assert_eq!(names, listed, "{}", f.name);
        let mut elems = 0;
        for e in manifest.tensors_in(&f.name) {
            let view = st.tensor(&e.name).unwrap();
            assert_eq!(
                view.shape(),
                e.stored_shape().as_slice(),
                "{} in {}",
                e.name,
                f.name
            );
            let stored_rows = view.shape().first().copied().unwrap_or(1);
            *rows_in_files.entry(e.name.clone()).or_default() += stored_rows;
            let t = by_name[e.name.as_str()];
            let per_row: usize = t.shape.iter().skip(1).product();
            let [start, end] = e.rows.unwrap();
            let want: Vec<u8> = t.data[start * per_row..end * per_row]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            assert!(view.data() == want.as_slice(), "{} in {}", e.name, f.name);
            elems += view.data().len() / 4;
        }
        assert_eq!(elems, 12, "{}: balanced", f.name);
    }
    for t in &tensors {
        assert_eq!(rows_in_files[&t.name], rows_of(&t.shape), "{}", t.name);
    }
}

/// The status of one folder in a listing.
fn status_of<'a>(listing: &'a Listing, folder: &str) -> &'a ListedAttempt {
    listing
        .attempts
        .iter()
        .find(|a| a.folder == folder)
        .unwrap_or_else(|| panic!("{folder} is not listed"))
}

#[tokio::test]
async fn a_flipped_byte_in_any_file_is_named_and_latest_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let old = save_checkpoint(&store, &content(1, 0), 3).await.unwrap();
    let new = save_checkpoint(&store, &content(2, 0), 3).await.unwrap();
    let mut files: Vec<String> = new.manifest.files.iter().map(|f| f.name.clone()).collect();
    assert_eq!(files, [S0, S1, S2]);
    files.push(MANIFEST_FILE.to_string());

    for file in &files {
        let path = on_disk(tmp.path(), &new.folder, file);
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        // Every byte of every file, one at a time.
        for at in 0..len {
            flip_byte(&path, at);
            let what = format!("{file} byte {at} of {len}");
            match verify_checkpoint(&store, &new.folder).await {
                Err(StorageError::Corrupt {
                    url,
                    file: got,
                    reason,
                }) => {
                    assert_eq!(url, new.url, "{what}");
                    assert_eq!(&got, file, "{what}: {reason}");
                    if file != MANIFEST_FILE {
                        assert!(reason.starts_with("BLAKE3 mismatch"), "{what}: {reason}");
                    }
                }
                other => panic!("{what}: want Corrupt, got {other:?}"),
            }
            if at == 0 || at == len / 2 || at == len - 1 {
                match load_checkpoint(&store, &new.folder).await {
                    Err(StorageError::Corrupt { file: got, .. }) => assert_eq!(&got, file),
                    other => panic!("{what}: load: want Corrupt, got {other:?}"),
                }
                let listing = list_checkpoints(&store).await.unwrap();
                let status = &status_of(&listing, &new.folder).status;
                if file == MANIFEST_FILE {
                    assert!(
                        matches!(status, AttemptStatus::Corrupt { file: f, .. } if f == MANIFEST_FILE),
                        "{what}: {status:?}"
                    );
                } else {
                    // Same size: a listing does not hash, so it still looks committed.
                    assert_eq!(status, &AttemptStatus::Committed, "{what}");
                }
                let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
                assert_eq!(latest.folder, old.folder, "{what}");
                assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
                assert!(warnings[0].contains(&new.url), "{what}: {}", warnings[0]);
                assert!(
                    warnings[0].contains(&format!("{file}: ")),
                    "{what}: {}",
                    warnings[0]
                );
                assert!(!warnings[0].contains('\n'), "{what}: one line");
            }
            flip_byte(&path, at);
        }
        verify_checkpoint(&store, &new.folder).await.unwrap();
    }
    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, new.folder);
    assert!(warnings.is_empty());
}

#[tokio::test]
async fn listing_says_committed_incomplete_or_corrupt_without_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let committed = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let incomplete = "step-0000000002-g0-0123456789ab";
    let shard = encode_shard(&[tensor("wte", &[2], 1.0)]).unwrap();
    store
        .put_new(&format!("{incomplete}/{S0}"), shard.into())
        .await
        .unwrap();
    let missing = save_checkpoint(&store, &content(3, 0), 2).await.unwrap();
    std::fs::remove_file(on_disk(tmp.path(), &missing.folder, S1)).unwrap();
    let truncated = save_checkpoint(&store, &content(4, 0), 2).await.unwrap();
    let path = on_disk(tmp.path(), &truncated.folder, S0);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let flipped = save_checkpoint(&store, &content(5, 0), 2).await.unwrap();
    flip_byte(&on_disk(tmp.path(), &flipped.folder, S0), 0);

    let listing = list_checkpoints(&store).await.unwrap();
    let folders: Vec<&str> = listing.attempts.iter().map(|a| a.folder.as_str()).collect();
    assert_eq!(
        folders,
        [
            committed.folder.as_str(),
            incomplete,
            &missing.folder,
            &truncated.folder,
            &flipped.folder
        ]
    );
    let statuses: Vec<&AttemptStatus> = listing.attempts.iter().map(|a| &a.status).collect();
    assert_eq!(
        statuses,
        [
            &AttemptStatus::Committed,
            &AttemptStatus::Incomplete,
            &AttemptStatus::Corrupt {
                file: S1.into(),
                reason: "missing: listed in MANIFEST.json but not in the store".into()
            },
            &AttemptStatus::Corrupt {
                file: S0.into(),
                reason: format!(
                    "size mismatch (expected {} bytes, got {})",
                    bytes.len(),
                    bytes.len() - 3
                )
            },
            // A flipped byte keeps the size: only verify (hashing) finds it.
            &AttemptStatus::Committed,
        ]
    );
    let labels: Vec<&str> = listing.attempts.iter().map(|a| a.status.label()).collect();
    assert_eq!(
        labels,
        ["committed", "incomplete", "corrupt", "corrupt", "committed"]
    );
    let with_manifest: Vec<bool> = listing
        .attempts
        .iter()
        .map(|a| a.manifest.is_some())
        .collect();
    assert_eq!(with_manifest, [true, false, true, true, true]);
    assert_eq!(listing.with_manifest().count(), 4);
    assert_eq!(
        listing.newest_committed().map(|a| a.folder.as_str()),
        Some(flipped.folder.as_str())
    );
    for a in &listing.attempts {
        let on_disk_bytes: u64 = std::fs::read_dir(tmp.path().join(&a.folder))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(a.bytes(), on_disk_bytes, "{}", a.folder);
        assert_eq!(a.url, store.url_of(&a.folder));
    }

    // Verification hashes: the newest three are all rejected, newest first.
    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, committed.folder);
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].contains(&flipped.folder) && warnings[0].contains("BLAKE3 mismatch"));
    assert!(warnings[1].contains(&truncated.folder) && warnings[1].contains("size mismatch"));
    assert!(warnings[2].contains(&missing.folder) && warnings[2].contains("missing"));

    // The same in memory, with the shard deleted through the store.
    let mem = Store::open("memory://").unwrap();
    let saved = save_checkpoint(&mem, &content(1, 0), 2).await.unwrap();
    mem.delete(&format!("{}/{S0}", saved.folder)).await.unwrap();
    let listing = list_checkpoints(&mem).await.unwrap();
    assert!(
        matches!(&listing.attempts[0].status, AttemptStatus::Corrupt { file, .. } if file == S0),
        "{:?}",
        listing.attempts[0].status
    );
    assert!(listing.newest_committed().is_none());
}

/// Set a file's modification time to `ago` before now.
fn age_file(path: &Path, ago: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

/// Folder -> (keep, reason).
fn decisions(report: &tenax_storage::PruneReport) -> BTreeMap<String, (bool, String)> {
    report
        .decisions
        .iter()
        .map(|d| (d.folder.clone(), (d.keep, d.reason.clone())))
        .collect()
}

#[tokio::test]
async fn prune_keeps_the_newest_the_multiples_and_fresh_attempts() {
    const HOUR: Duration = Duration::from_secs(3600);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let mut saved = BTreeMap::new();
    for step in [5, 10, 15, 20, 25] {
        let s = save_checkpoint(&store, &content(step, 0), 2).await.unwrap();
        saved.insert(step, s.folder);
    }
    let abandoned = "step-0000000030-g0-0000000000aa";
    let fresh = "step-0000000031-g0-0000000000bb";
    let running = "step-0000000032-g0-0000000000cc";
    for folder in [abandoned, fresh, running] {
        let shard = encode_shard(&[tensor("wte", &[2], 1.0)]).unwrap();
        store
            .put_new(&format!("{folder}/{S0}"), shard.into())
            .await
            .unwrap();
    }
    age_file(&on_disk(tmp.path(), abandoned, S0), 2 * HOUR);
    age_file(&on_disk(tmp.path(), running, S0), 2 * HOUR);

    let policy = RetentionPolicy {
        keep_last: 2,
        keep_every: 10,
        min_uncommitted_age_ms: HOUR.as_millis() as u64,
    };
    let in_progress = [running.to_string()];
    let now = now_unix_ms();
    let before = store.list_keys().await.unwrap();
    let listing = list_checkpoints(&store).await.unwrap();

    let dry = prune(&store, &policy, &in_progress, now, true)
        .await
        .unwrap();
    assert_eq!(
        store.list_keys().await.unwrap(),
        before,
        "a dry run deletes nothing"
    );
    assert_eq!(dry.deleted_objects, 0);
    let d = decisions(&dry);
    assert_eq!(d.len(), 8);
    let not_kept = |reason: &str| (false, reason.to_string());
    let kept = |reason: &str| (true, reason.to_string());
    let older = "older than the newest 2 and not a multiple of 10";
    assert_eq!(d[&saved[&5]], not_kept(older));
    assert_eq!(d[&saved[&10]], kept("step 10 is a multiple of 10"));
    assert_eq!(d[&saved[&15]], not_kept(older));
    assert_eq!(d[&saved[&20]], kept("one of the newest 2"));
    assert_eq!(d[&saved[&25]], kept("newest good checkpoint"));
    assert!(!d[abandoned].0, "{:?}", d[abandoned]);
    assert!(
        d[abandoned].1.starts_with("abandoned attempt, no manifest"),
        "{:?}",
        d[abandoned]
    );
    assert!(d[fresh].0, "{:?}", d[fresh]);
    assert!(
        d[fresh].1.starts_with("no manifest yet and only"),
        "{:?}",
        d[fresh]
    );
    assert_eq!(d[running], kept("being written"));
    let doomed = [saved[&5].as_str(), saved[&15].as_str(), abandoned];
    let doomed_bytes: u64 = doomed.iter().map(|f| status_of(&listing, f).bytes()).sum();
    assert_eq!(dry.deleted_bytes, doomed_bytes);

    let real = prune(&store, &policy, &in_progress, now, false)
        .await
        .unwrap();
    assert_eq!(real.decisions, dry.decisions, "a dry run decides the same");
    assert_eq!(real.deleted_bytes, dry.deleted_bytes);
    assert_eq!(real.deleted_objects, 3 + 3 + 1);
    for folder in doomed {
        assert!(
            folder_files(&store, folder).await.is_empty(),
            "{folder} has objects left"
        );
    }
    let after = store.list_keys().await.unwrap();
    let want: Vec<String> = before
        .iter()
        .filter(|k| !doomed.iter().any(|f| k.starts_with(&format!("{f}/"))))
        .cloned()
        .collect();
    assert_eq!(after, want, "nothing else was touched");
    for step in [10, 20, 25] {
        verify_checkpoint(&store, &saved[&step]).await.unwrap();
    }
    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, saved[&25]);
    assert!(warnings.is_empty());

    // Pruning again finds nothing more to delete.
    let again = prune(&store, &policy, &in_progress, now, false)
        .await
        .unwrap();
    assert_eq!(again.deleted_objects, 0);
    assert!(
        again.decisions.iter().all(|d| d.keep),
        "{:?}",
        again.decisions
    );
    assert_eq!(store.list_keys().await.unwrap(), after);
}

#[tokio::test]
async fn prune_never_deletes_the_newest_good_checkpoint() {
    let policy = RetentionPolicy {
        keep_last: 1,
        keep_every: 0,
        min_uncommitted_age_ms: 0,
    };
    // (how the newest checkpoint is broken, the reason prune gives)
    let cases: &[(&str, &str)] = &[
        ("flip", "corrupt: shard-00000.safetensors: BLAKE3 mismatch"),
        ("truncate manifest", "corrupt: MANIFEST.json: "),
    ];
    for (how, reason) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&file_url(tmp.path())).unwrap();
        let one = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
        let two = save_checkpoint(&store, &content(2, 0), 2).await.unwrap();
        let three = save_checkpoint(&store, &content(3, 0), 2).await.unwrap();
        if *how == "flip" {
            flip_byte(&on_disk(tmp.path(), &three.folder, S0), 40);
        } else {
            let path = on_disk(tmp.path(), &three.folder, MANIFEST_FILE);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        }

        let dry = prune(&store, &policy, &[], now_unix_ms(), true)
            .await
            .unwrap();
        let report = prune(&store, &policy, &[], now_unix_ms(), false)
            .await
            .unwrap();
        assert_eq!(report.decisions, dry.decisions, "{how}");
        let d = decisions(&report);
        assert_eq!(
            d[&one.folder],
            (false, "older than the newest 1".into()),
            "{how}"
        );
        assert_eq!(
            d[&two.folder],
            (true, "newest good checkpoint".into()),
            "{how}"
        );
        assert!(!d[&three.folder].0, "{how}: {:?}", d[&three.folder]);
        assert!(
            d[&three.folder].1.starts_with(reason),
            "{how}: {:?}",
            d[&three.folder]
        );

        let keys = store.list_keys().await.unwrap();
        assert!(!keys.is_empty());
        assert!(
            keys.iter()
                .all(|k| k.starts_with(&format!("{}/", two.folder))),
            "{how}: {keys:?}"
        );
        let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
        assert_eq!(latest.folder, two.folder, "{how}");
        assert!(warnings.is_empty(), "{how}: {warnings:?}");
    }
}

#[tokio::test]
async fn prune_deletes_no_committed_checkpoint_when_none_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let one = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let two = save_checkpoint(&store, &content(2, 0), 2).await.unwrap();
    for s in [&one, &two] {
        flip_byte(&on_disk(tmp.path(), &s.folder, S1), 10);
    }
    let before = store.list_keys().await.unwrap();
    let policy = RetentionPolicy {
        keep_last: 1,
        keep_every: 0,
        min_uncommitted_age_ms: 0,
    };
    let report = prune(&store, &policy, &[], now_unix_ms(), false)
        .await
        .unwrap();
    assert_eq!(report.deleted_objects, 0);
    assert!(
        report
            .decisions
            .iter()
            .all(|d| d.keep && d.reason.contains("no checkpoint is verified good")),
        "{:?}",
        report.decisions
    );
    assert_eq!(store.list_keys().await.unwrap(), before);
}

#[tokio::test]
async fn multipart_uploads_round_trip_bit_for_bit() {
    const MIB: u64 = 1 << 20;
    let options = StoreOptions {
        multipart_threshold_bytes: 1024,
        min_part_bytes: 1,
        ..StoreOptions::default()
    };
    // 1600 x 1024 f32 = 6.25 MiB: two 5 MiB parts from one writer, one part each from two.
    let tensors = vec![
        bit_tensor("big", &[1600, 1024], 11),
        bit_tensor("bias", &[3], 12),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for store in [
        Store::open("memory://").unwrap(),
        Store::open(&file_url(tmp.path())).unwrap(),
    ] {
        let store = store.with_options(options.clone());
        assert_eq!(store.options(), &options);
        for (writers, parts) in [(1u32, &[2u64][..]), (2, &[1, 1])] {
            let what = format!("{writers} writers on {}", store.url());
            let saved =
                save_checkpoint(&store, &with_tensors(u64::from(writers), &tensors), writers)
                    .await
                    .unwrap();
            let got_parts: Vec<u64> = saved
                .manifest
                .files
                .iter()
                .map(|f| {
                    assert!(
                        f.size > options.multipart_threshold_bytes,
                        "{what}: {}",
                        f.name
                    );
                    let part = part_size_for(f.size, options.min_part_bytes);
                    assert_eq!(part, 5 * MIB, "S3's smallest part");
                    f.size.div_ceil(part)
                })
                .collect();
            assert_eq!(got_parts, parts, "{what}");
            let mut want_files = shard_names(&(0..writers).collect::<Vec<_>>());
            want_files.push(MANIFEST_FILE.into());
            want_files.sort();
            assert_eq!(
                folder_files(&store, &saved.folder).await,
                want_files,
                "{what}"
            );
            if store.url().starts_with("file://") {
                // No staging files left behind, and the sizes on disk are the manifest's.
                let mut names: Vec<String> = std::fs::read_dir(tmp.path().join(&saved.folder))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                assert_eq!(names, want_files, "{what}");
                for f in &saved.manifest.files {
                    let len = std::fs::metadata(on_disk(tmp.path(), &saved.folder, &f.name))
                        .unwrap()
                        .len();
                    assert_eq!(len, f.size, "{what}: {}", f.name);
                }
            }
            let report = verify_checkpoint(&store, &saved.folder).await.unwrap();
            assert_eq!(report.bytes, saved.manifest.total_bytes());
            let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
            assert_bit_identical(&loaded.tensors, &sorted(&tensors), &what);
        }
    }
}

/// Write every shard of `content`'s save plan for `writers` writers into `pending`'s folder.
async fn write_all(
    store: &Store,
    pending: &PendingSave,
    content: &CheckpointContent,
    writers: u32,
) -> Vec<tenax_storage::WrittenShard> {
    let by_name: std::sync::Arc<BTreeMap<String, TensorData>> = std::sync::Arc::new(
        content
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect(),
    );
    let mut written = Vec::new();
    for shard in planned_shards(&content.tensors, writers) {
        written.push(write_shard(store, pending, &shard, &by_name).await.unwrap());
    }
    written
}

#[tokio::test]
async fn commit_save_reads_back_an_identical_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    for store in [
        Store::open("memory://").unwrap(),
        Store::open(&file_url(tmp.path())).unwrap(),
    ] {
        let c = content(7, 1);
        let pending = begin_save(c.meta.clone());
        assert!(
            pending.folder.starts_with("step-0000000007-g1-"),
            "{}",
            pending.folder
        );
        assert!(pending.folder.ends_with(&pending.attempt));
        assert_eq!(pending.attempt.len(), 12);
        assert!(
            store.list_keys().await.unwrap().is_empty(),
            "begin_save writes nothing"
        );

        let written = write_all(&store, &pending, &c, 2).await;
        let files: Vec<&str> = written.iter().map(|w| w.file.name.as_str()).collect();
        assert_eq!(files, [S0, S1]);
        let listing = list_checkpoints(&store).await.unwrap();
        assert_eq!(listing.attempts[0].status, AttemptStatus::Incomplete);
        // Writing a shard again (a retry) with the same bytes is resolved by reading back;
        // other bytes for the same file are refused: a shard is written once.
        let shard = planned_shards(&c.tensors, 2).remove(0);
        let mut by_name: BTreeMap<String, TensorData> = c
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        let retried = write_shard(
            &store,
            &pending,
            &shard,
            &std::sync::Arc::new(by_name.clone()),
        )
        .await
        .unwrap();
        assert_eq!(retried, written[0]);
        by_name.get_mut("ln.bias").unwrap().data[0] += 1.0;
        match write_shard(&store, &pending, &shard, &std::sync::Arc::new(by_name)).await {
            Err(StorageError::AlreadyExists { key, .. }) => {
                assert_eq!(key, format!("{}/{S0}", pending.folder))
            }
            other => panic!("want AlreadyExists, got {other:?}"),
        }

        let first = commit_save(&store, &pending, written.clone())
            .await
            .unwrap();
        assert!(!first.recovered_by_read_back);
        assert_eq!(first.folder, pending.folder);
        assert_eq!(first.manifest.created_unix_ms, pending.created_unix_ms);

        // Committing the same save again (a retry after a lost response): the manifest that
        // is there has the same bytes, so the commit stands.
        let again = commit_save(&store, &pending, written.clone())
            .await
            .unwrap();
        assert!(again.recovered_by_read_back);
        assert_eq!(again.manifest, first.manifest);
        assert_eq!((&again.folder, &again.url), (&first.folder, &first.url));

        // A different manifest for the same folder is refused, and the first one stays.
        let changed = PendingSave {
            meta: CheckpointMeta {
                data_cursor: c.meta.data_cursor + 1,
                ..c.meta.clone()
            },
            ..pending.clone()
        };
        let reordered: Vec<_> = written.iter().rev().cloned().collect();
        for (what, p, w) in [
            ("changed data_cursor", &changed, written.clone()),
            ("shards in another order", &pending, reordered),
        ] {
            match commit_save(&store, p, w).await {
                Err(StorageError::AlreadyExists { url, key }) => {
                    assert_eq!(url, store.url(), "{what}");
                    assert_eq!(key, format!("{}/{MANIFEST_FILE}", pending.folder), "{what}");
                }
                other => panic!("{what}: want AlreadyExists, got {other:?}"),
            }
        }
        let loaded = load_checkpoint(&store, &pending.folder).await.unwrap();
        assert_eq!(loaded.manifest, first.manifest);
        assert_eq!(loaded.manifest.data_cursor, c.meta.data_cursor);
        assert_eq!(loaded.tensors, sorted(&c.tensors));
        let listing = list_checkpoints(&store).await.unwrap();
        assert_eq!(listing.attempts.len(), 1);
        assert_eq!(listing.attempts[0].status, AttemptStatus::Committed);
    }
}

#[tokio::test]
async fn a_version_1_manifest_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = "step-0000000007-g1-0123456789ab";
    let params = vec![tensor("wte", &[4, 2], 1.0), tensor("ln.bias", &[2], -1.0)];
    let optim = vec![tensor("m.wte", &[4, 2], 0.5), tensor("scalar", &[], 3.0)];
    let params_bytes = encode_shard(&params).unwrap();
    let optim_bytes = encode_shard(&optim).unwrap();
    let whole = |t: &TensorData, file: &str| json!({"name": t.name, "file": file, "dtype": "F32", "shape": t.shape});
    let manifest = json!({
        "format_version": 1,
        "step": 7,
        "generation": 1,
        "attempt": "0123456789ab",
        "created_unix_ms": 1_700_000_000_000u64,
        "config": {"model": {"d_model": 8}},
        "config_hash": "cafe",
        "data_cursor": 224,
        "rng": {"seed": 7},
        "extra": {"adamw_step": 7},
        "files": [
            {"name": "params.safetensors", "size": params_bytes.len(), "sha256": sha256_hex(&params_bytes)},
            {"name": "optim.safetensors", "size": optim_bytes.len(), "sha256": sha256_hex(&optim_bytes)},
        ],
        "tensors": [
            whole(&params[0], "params.safetensors"),
            whole(&params[1], "params.safetensors"),
            whole(&optim[0], "optim.safetensors"),
            whole(&optim[1], "optim.safetensors"),
        ],
    });
    let mut all = params.clone();
    all.extend(optim.clone());

    for store in [
        Store::open("memory://").unwrap(),
        Store::open(&file_url(tmp.path())).unwrap(),
    ] {
        store
            .put_new(
                &format!("{folder}/params.safetensors"),
                params_bytes.clone().into(),
            )
            .await
            .unwrap();
        store
            .put_new(
                &format!("{folder}/optim.safetensors"),
                optim_bytes.clone().into(),
            )
            .await
            .unwrap();
        store
            .put_new(
                &format!("{folder}/{MANIFEST_FILE}"),
                Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap()),
            )
            .await
            .unwrap();

        let listing = list_checkpoints(&store).await.unwrap();
        assert_eq!(listing.attempts.len(), 1);
        assert_eq!(listing.attempts[0].status, AttemptStatus::Committed);
        let m = listing.attempts[0].manifest.as_ref().unwrap();
        assert_eq!(m.format_version, 1);
        assert!(m.tensors.iter().all(|t| t.rows.is_none()));

        let report = verify_checkpoint(&store, folder).await.unwrap();
        assert_eq!((report.files, report.tensors), (2, 4));
        let loaded = load_checkpoint(&store, folder).await.unwrap();
        assert_eq!(loaded.tensors, sorted(&all));
        assert_eq!(loaded.manifest.data_cursor, 224);
        let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
        assert_eq!(latest.folder, folder);
        assert!(warnings.is_empty());

        // A newer save is written in version 3 and becomes the latest.
        let newer = save_checkpoint(&store, &content(8, 1), 2).await.unwrap();
        assert_eq!(newer.manifest.format_version, 3);
        let (latest, _) = latest_verified(&store).await.unwrap().unwrap();
        assert_eq!(latest.folder, newer.folder);
    }

    // Rows in a version-1 manifest are refused.
    let store = Store::open("memory://").unwrap();
    let mut with_rows = manifest.clone();
    with_rows["tensors"][0]["rows"] = json!([0, 4]);
    store
        .put_new(&format!("{folder}/params.safetensors"), params_bytes.into())
        .await
        .unwrap();
    store
        .put_new(&format!("{folder}/optim.safetensors"), optim_bytes.into())
        .await
        .unwrap();
    store
        .put_new(
            &format!("{folder}/{MANIFEST_FILE}"),
            Bytes::from(serde_json::to_vec_pretty(&with_rows).unwrap()),
        )
        .await
        .unwrap();
    match verify_checkpoint(&store, folder).await {
        Err(StorageError::Corrupt { file, reason, .. }) => {
            assert_eq!(file, MANIFEST_FILE);
            assert!(
                reason.contains("which format_version 1 does not have"),
                "{reason}"
            );
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
}

/// The manifest's self-checksum is found by searching the JSON for the first
/// `"manifest_sha256": "` (storage/src/manifest.rs, `self_hash`), and the trainer's `config`,
/// `rng` and `extra` are serialised before the real field. A config with an object key of that
/// name is taken for the checksum: with a value that is not 64 characters long
/// `Manifest::to_json` panics ("the self-checksum field was just written"); with a 64-character
/// value the checksum is written into the config and the commit fails its own re-parse
/// ("self-checksum mismatch"). Either way a legitimate checkpoint cannot be saved.
#[tokio::test]
async fn a_config_with_a_manifest_sha256_key_still_saves() {
    let store = Store::open("memory://").unwrap();
    let mut failures = Vec::new();
    for value in ["short".to_string(), "a".repeat(64)] {
        let config = json!({"resumed_from": {"manifest_sha256": value}});
        let mut c = content(1, 0);
        c.meta.config = config.clone();
        let saved = tokio::spawn({
            let store = store.clone();
            async move { save_checkpoint(&store, &c, 1).await }
        })
        .await;
        match saved {
            Ok(Ok(saved)) => {
                let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
                assert_eq!(loaded.manifest.config, config);
            }
            Ok(Err(e)) => failures.push(format!("{} chars: save failed: {e}", value.len())),
            Err(panic) => failures.push(format!("{} chars: save panicked: {panic}", value.len())),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

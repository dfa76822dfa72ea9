//! Checkpoints end to end on `memory://` and `file://` stores.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{content, file_url, flip_byte, on_disk, sorted, tensor};
use serde_json::{json, Value};
use tenax_storage::{
    latest_verified, list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint,
    AttemptStatus, CheckpointContent, Manifest, StorageError, Store, FORMAT_VERSION, MANIFEST_FILE,
};

const S0: &str = "shard-00000.safetensors";
const S1: &str = "shard-00001.safetensors";

/// (tensor, file, rows) of every slice of a manifest, in manifest order.
fn layout(m: &Manifest) -> Vec<(String, String, Option<[usize; 2]>)> {
    m.tensors
        .iter()
        .map(|t| (t.name.clone(), t.file.clone(), t.rows))
        .collect()
}

async fn round_trip(store: &Store) {
    let want = content(10, 2);
    let saved = save_checkpoint(store, &want, 2).await.unwrap();
    assert!(
        saved.folder.starts_with("step-0000000010-g2-"),
        "{}",
        saved.folder
    );
    assert_eq!(saved.url, store.url_of(&saved.folder));
    assert_eq!(saved.manifest.attempt.len(), 12);
    assert_eq!(saved.manifest.format_version, FORMAT_VERSION);
    assert!(!saved.recovered_by_read_back);
    let files: Vec<&str> = saved
        .manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(files, [S0, S1]);
    // 19 elements in name order (ln.bias 2, m.wte 8, scalar 1, wte 8), cut at row boundary 8.
    let s =
        |name: &str, file: &str, rows: [usize; 2]| (name.to_string(), file.to_string(), Some(rows));
    assert_eq!(
        layout(&saved.manifest),
        vec![
            s("ln.bias", S0, [0, 2]),
            s("m.wte", S0, [0, 3]),
            s("m.wte", S1, [3, 4]),
            s("scalar", S1, [0, 1]),
            s("wte", S1, [0, 4]),
        ]
    );

    let listing = list_checkpoints(store).await.unwrap();
    assert_eq!(listing.attempts.len(), 1);
    let listed = &listing.attempts[0];
    assert_eq!(listed.folder, saved.folder);
    assert_eq!(listed.url, saved.url);
    assert_eq!((listed.step, listed.generation), (10, 2));
    assert_eq!(listed.attempt, saved.manifest.attempt);
    assert_eq!(listed.status, AttemptStatus::Committed);
    assert_eq!(listed.status.label(), "committed");
    assert_eq!(listed.manifest.as_ref(), Some(&saved.manifest));
    assert_eq!(listed.objects.len(), 3);
    assert_eq!(
        listed.bytes(),
        saved.manifest.total_bytes() + saved.manifest.to_json().len() as u64
    );
    assert_eq!(
        listing.newest_committed().map(|a| a.folder.as_str()),
        Some(saved.folder.as_str())
    );

    let report = verify_checkpoint(store, &saved.folder).await.unwrap();
    assert_eq!(report.files, 2);
    assert_eq!(report.tensors, 5);
    assert_eq!(report.bytes, saved.manifest.total_bytes());

    let loaded = load_checkpoint(store, &saved.folder).await.unwrap();
    assert_eq!(
        loaded.tensors,
        sorted(&want.tensors),
        "whole tensors, sorted by name"
    );
    assert_eq!(loaded.tensor("m.wte"), Some(&want.tensors[2]));
    assert_eq!(loaded.tensor("scalar"), Some(&want.tensors[3]));
    assert_eq!(loaded.tensor("nope"), None);
    assert_eq!(loaded.url, saved.url);
    assert_eq!(loaded.folder, saved.folder);
    let m = &loaded.manifest;
    assert_eq!(m, &saved.manifest);
    assert_eq!((m.step, m.generation, m.data_cursor), (10, 2, 320));
    assert_eq!(m.config, want.meta.config);
    assert_eq!(m.config_hash, "cafe");
    assert_eq!(m.rng, want.meta.rng);
    assert_eq!(m.extra, want.meta.extra);

    let (latest, warnings) = latest_verified(store).await.unwrap().unwrap();
    assert_eq!(latest.folder, saved.folder);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[tokio::test]
async fn round_trip_in_memory() {
    round_trip(&Store::open("memory://").unwrap()).await;
}

#[tokio::test]
async fn round_trip_on_disk_lays_out_plain_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not/yet/there");
    let store = Store::open(&file_url(&dir)).unwrap();
    assert!(dir.is_dir(), "open creates the directory");
    round_trip(&store).await;
    let folder = &list_checkpoints(&store).await.unwrap().attempts[0].folder;
    let mut names: Vec<String> = std::fs::read_dir(dir.join(folder))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [MANIFEST_FILE, S0, S1]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(on_disk(&dir, folder, MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(manifest.step, 10);
    assert_eq!(manifest.format_version, 3);
    let raw: Value =
        serde_json::from_slice(&std::fs::read(on_disk(&dir, folder, MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        raw["tensors"][0]["rows"],
        json!([0, 2]),
        "rows: [start, end]"
    );
}

#[tokio::test]
async fn empty_store_has_no_latest() {
    let store = Store::open("memory://").unwrap();
    assert!(latest_verified(&store).await.unwrap().is_none());
    let listing = list_checkpoints(&store).await.unwrap();
    assert!(listing.attempts.is_empty());
    assert!(listing.newest_committed().is_none());
}

#[tokio::test]
async fn saving_a_step_twice_makes_two_folders_and_latest_is_the_newer() {
    let store = Store::open("memory://").unwrap();
    let first = save_checkpoint(&store, &content(5, 0), 2).await.unwrap();
    let mut again = content(5, 1);
    again.meta.data_cursor = 999;
    let second = save_checkpoint(&store, &again, 2).await.unwrap();
    assert_ne!(first.folder, second.folder);
    assert!(second.manifest.created_unix_ms > first.manifest.created_unix_ms);

    let listing = list_checkpoints(&store).await.unwrap();
    let folders: Vec<_> = listing.attempts.iter().map(|c| c.folder.clone()).collect();
    assert_eq!(folders, vec![first.folder.clone(), second.folder.clone()]);
    assert!(listing
        .attempts
        .iter()
        .all(|a| a.status == AttemptStatus::Committed));

    let (latest, _) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, second.folder);
    assert_eq!(latest.manifest.data_cursor, 999);

    // An older step saved later still loses to the higher step.
    save_checkpoint(&store, &content(4, 2), 2).await.unwrap();
    let (latest, _) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, second.folder);
}

#[tokio::test]
async fn a_flipped_byte_fails_verify_and_latest_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let old = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let new = save_checkpoint(&store, &content(2, 0), 2).await.unwrap();

    let path = on_disk(tmp.path(), &new.folder, S0);
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    flip_byte(&path, len - 1);

    let err = verify_checkpoint(&store, &new.folder).await.unwrap_err();
    match &err {
        StorageError::Corrupt { url, file, reason } => {
            assert_eq!(url, &new.url);
            assert_eq!(file, S0);
            assert!(reason.starts_with("BLAKE3 mismatch (expected "), "{reason}");
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("checkpoint {}: {S0}: BLAKE3 mismatch", new.url)),
        "{msg}"
    );
    assert!(load_checkpoint(&store, &new.folder).await.is_err());
    verify_checkpoint(&store, &old.folder).await.unwrap();

    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, old.folder);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(&new.url), "{}", warnings[0]);
    assert!(
        warnings[0].contains(&format!("{S0}: BLAKE3 mismatch")),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].contains('\n'), "one line");
}

#[tokio::test]
async fn a_truncated_or_missing_shard_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let saved = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let path = on_disk(tmp.path(), &saved.folder, S1);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = verify_checkpoint(&store, &saved.folder)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{S1}: size mismatch (expected {} bytes, got {})",
            bytes.len(),
            bytes.len() - 3
        )),
        "{err}"
    );

    std::fs::remove_file(&path).unwrap();
    let err = verify_checkpoint(&store, &saved.folder)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{S1}: missing")), "{err}");
}

#[tokio::test]
async fn a_garbage_manifest_is_listed_corrupt_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let good = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let truncated = save_checkpoint(&store, &content(2, 0), 2).await.unwrap();
    let path = on_disk(tmp.path(), &truncated.folder, MANIFEST_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    // A hand-made folder with a garbage manifest at a higher step still.
    let garbage = "step-0000000003-g0-0123456789ab";
    std::fs::create_dir(tmp.path().join(garbage)).unwrap();
    std::fs::write(on_disk(tmp.path(), garbage, MANIFEST_FILE), b"\x00not json").unwrap();

    let listing = list_checkpoints(&store).await.unwrap();
    let summary: Vec<(String, &str, Option<&str>, bool)> = listing
        .attempts
        .iter()
        .map(|a| {
            let file = match &a.status {
                AttemptStatus::Corrupt { file, .. } => Some(file.as_str()),
                _ => None,
            };
            (
                a.folder.clone(),
                a.status.label(),
                file,
                a.manifest.is_some(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (good.folder.clone(), "committed", None, true),
            (
                truncated.folder.clone(),
                "corrupt",
                Some(MANIFEST_FILE),
                false
            ),
            (garbage.to_string(), "corrupt", Some(MANIFEST_FILE), false),
        ]
    );
    match &listing.attempts[2].status {
        AttemptStatus::Corrupt { reason, .. } => {
            assert!(reason.contains("does not parse"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing.with_manifest().count(), 3);
    assert_eq!(
        listing.newest_committed().map(|a| a.folder.as_str()),
        Some(good.folder.as_str())
    );

    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, good.folder);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains(garbage), "newest first: {warnings:?}");
    assert!(warnings[1].contains(&truncated.folder), "{warnings:?}");
    assert!(
        warnings.iter().all(|w| w.contains(MANIFEST_FILE)),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn all_corrupt_is_none_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let a = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let b = save_checkpoint(&store, &content(2, 0), 2).await.unwrap();
    std::fs::write(on_disk(tmp.path(), &a.folder, MANIFEST_FILE), b"{").unwrap();
    std::fs::remove_file(on_disk(tmp.path(), &b.folder, S0)).unwrap();

    match latest_verified(&store).await {
        Err(StorageError::NoneVerify {
            url,
            newest_problem,
        }) => {
            assert_eq!(url, store.url());
            assert!(newest_problem.contains(&b.url), "{newest_problem}");
            assert!(
                newest_problem.contains(&format!("{S0}: missing")),
                "{newest_problem}"
            );
        }
        other => panic!("want NoneVerify, got {other:?}"),
    }
}

#[tokio::test]
async fn shards_without_a_manifest_are_incomplete_and_never_latest() {
    let store = Store::open("memory://").unwrap();
    let incomplete = "step-0000000009-g0-0123456789ab";
    let shard = tenax_storage::encode_shard(&[tensor("wte", &[2], 1.0)]).unwrap();
    store
        .put_new(&format!("{incomplete}/{S0}"), shard.into())
        .await
        .unwrap();
    // Not a checkpoint folder at all: ignored.
    store
        .put_new("notes/readme.txt", Bytes::from_static(b"hi"))
        .await
        .unwrap();

    let listing = list_checkpoints(&store).await.unwrap();
    assert_eq!(listing.attempts.len(), 1);
    let a = &listing.attempts[0];
    assert_eq!(a.folder, incomplete);
    assert_eq!(a.status, AttemptStatus::Incomplete);
    assert_eq!(a.status.label(), "incomplete");
    assert!(a.manifest.is_none());
    assert!(!a.has_manifest());
    assert_eq!(listing.with_manifest().count(), 0);
    assert!(listing.newest_committed().is_none());
    assert!(latest_verified(&store).await.unwrap().is_none());
    let err = load_checkpoint(&store, incomplete)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("MANIFEST.json: missing"), "{err}");

    let committed = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, committed.folder);
    assert!(warnings.is_empty());
}

/// Rewrite a committed manifest on disk (as tampering would). With `reseal`, the edited
/// manifest is written by [`Manifest::to_json`], so its self-checksum matches again (a forger
/// who knows the format); without, the JSON is written as edited.
fn tamper_manifest(dir: &Path, folder: &str, reseal: bool, edit: impl FnOnce(&mut Value)) {
    let path = on_disk(dir, folder, MANIFEST_FILE);
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    let bytes = if reseal {
        serde_json::from_value::<Manifest>(m).unwrap().to_json()
    } else {
        serde_json::to_vec_pretty(&m).unwrap()
    };
    std::fs::write(&path, bytes).unwrap();
}

/// The manifest entry of the slice of `name` stored in `file`.
fn slice_mut<'a>(m: &'a mut Value, name: &str, file: &str) -> &'a mut Value {
    m["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name && t["file"] == file)
        .unwrap_or_else(|| panic!("no slice of {name} in {file}"))
}

fn remove_slice(m: &mut Value, name: &str, file: &str) {
    m["tensors"]
        .as_array_mut()
        .unwrap()
        .retain(|t| !(t["name"] == name && t["file"] == file));
}

#[tokio::test]
async fn manifest_and_files_must_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    // The layout (see round_trip): S0 = ln.bias [0,2), m.wte [0,3);
    // S1 = m.wte [3,4), scalar, wte [0,4).
    type Edit = fn(&mut Value);
    let cases: &[(&str, Edit, &str, &str)] = &[
        (
            "any edit without resealing",
            |m| m["data_cursor"] = json!(12345),
            MANIFEST_FILE,
            "self-checksum mismatch: MANIFEST.json was altered after it was written",
        ),
        (
            "self-checksum removed",
            |m| {
                m.as_object_mut().unwrap().remove("manifest_blake3");
            },
            MANIFEST_FILE,
            "has no manifest_blake3 self-checksum",
        ),
        (
            "tensor missing from its file",
            |m| {
                m["tensors"].as_array_mut().unwrap().push(json!(
                    {"name": "ghost", "file": S0, "dtype": "F32", "shape": [1], "rows": [0, 1]}
                ))
            },
            S0,
            "tensor \"ghost\" listed in MANIFEST.json is missing from the file",
        ),
        (
            "wrong shape",
            |m| {
                let t = slice_mut(m, "wte", S1);
                t["shape"] = json!([8]);
                t["rows"] = json!([0, 8]);
            },
            S1,
            "has shape [4, 2], MANIFEST.json says [8]",
        ),
        (
            "tensor dropped from the manifest",
            |m| remove_slice(m, "ln.bias", S0),
            S0,
            "\"ln.bias\" is in the file but not in MANIFEST.json",
        ),
        (
            "rows moved between files (still a tiling)",
            |m| {
                slice_mut(m, "m.wte", S0)["rows"] = json!([0, 2]);
                slice_mut(m, "m.wte", S1)["rows"] = json!([2, 4]);
            },
            S0,
            "tensor \"m.wte\" has shape [3, 2], MANIFEST.json says [2, 2]",
        ),
        (
            "overlapping rows",
            |m| slice_mut(m, "m.wte", S0)["rows"] = json!([0, 4]),
            MANIFEST_FILE,
            "tensor `m.wte` rows 3..4 were saved in both `shard-00000.safetensors` and `shard-00001.safetensors`",
        ),
        (
            "no rows in a version 2 manifest means the whole tensor",
            |m| {
                slice_mut(m, "m.wte", S1)
                    .as_object_mut()
                    .unwrap()
                    .remove("rows");
            },
            MANIFEST_FILE,
            "were saved in both",
        ),
        (
            "rows saved nowhere",
            |m| remove_slice(m, "m.wte", S1),
            MANIFEST_FILE,
            "tensor `m.wte` rows 3..4 were saved in no file",
        ),
        (
            "rows in a version 1 manifest",
            |m| m["format_version"] = json!(1),
            MANIFEST_FILE,
            "which format_version 1 does not have",
        ),
        (
            "manifest moved to another step's folder",
            |m| m["step"] = json!(11),
            MANIFEST_FILE,
            "describes step-0000000011-",
        ),
        (
            "hash edited",
            |m| m["files"][1]["blake3"] = json!("00".repeat(32)),
            S1,
            "BLAKE3 mismatch",
        ),
    ];
    for (what, edit, file, want) in cases {
        let saved = save_checkpoint(&store, &content(10, 0), 2).await.unwrap();
        let reseal = !what.contains("resealing") && !what.contains("self-checksum");
        tamper_manifest(tmp.path(), &saved.folder, reseal, edit);
        match verify_checkpoint(&store, &saved.folder).await {
            Err(StorageError::Corrupt {
                file: got_file,
                reason,
                ..
            }) => {
                assert_eq!(&got_file, file, "{what}: {reason}");
                assert!(reason.contains(want), "{what}: {reason}");
            }
            other => panic!("{what}: want Corrupt, got {other:?}"),
        }
        // A load (from local disk: straight into the tensors, then, as that does not check
        // out, the buffered read that names the problem) says the same as a verify.
        match load_checkpoint(&store, &saved.folder).await {
            Err(StorageError::Corrupt {
                file: got_file,
                reason,
                ..
            }) => {
                assert_eq!(&got_file, file, "{what}: load: {reason}");
                assert!(reason.contains(want), "{what}: load: {reason}");
            }
            other => panic!("{what}: load: want Corrupt, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_content_is_refused_and_writes_nothing() {
    let store = Store::open("memory://").unwrap();
    type Edit = fn(&mut CheckpointContent);
    let cases: &[(Edit, u32, &str)] = &[
        (
            |c| {
                c.tensors[0].data.pop();
            },
            2,
            "has 7 values but shape [4, 2] needs 8",
        ),
        (
            |c| c.tensors[3].data.push(1.0),
            1,
            "has 2 values but shape [] needs 1",
        ),
        (
            |c| c.tensors[1].name = "wte".into(),
            2,
            "tensor `wte` is listed twice",
        ),
        (
            |c| {
                let t = c.tensors[0].clone();
                c.tensors.push(t)
            },
            3,
            "listed twice",
        ),
        (|c| c.tensors[1].name = String::new(), 2, "empty name"),
        (|_| {}, 0, "a save needs at least one writer"),
    ];
    for (edit, writers, want) in cases {
        let mut c = content(1, 0);
        edit(&mut c);
        match save_checkpoint(&store, &c, *writers).await {
            Err(e @ StorageError::Format { .. }) => {
                assert!(e.to_string().contains(want), "{e}")
            }
            other => panic!("want Format ({want}), got {other:?}"),
        }
    }
    assert!(store.list_keys().await.unwrap().is_empty());
}

#[tokio::test]
async fn write_once_keys_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    for store in [
        Store::open("memory://").unwrap(),
        Store::open(&file_url(tmp.path())).unwrap(),
    ] {
        store
            .put_new("a/b.bin", Bytes::from_static(b"first"))
            .await
            .unwrap();
        match store
            .put_new("a/b.bin", Bytes::from_static(b"second"))
            .await
        {
            Err(StorageError::AlreadyExists { key, .. }) => assert_eq!(key, "a/b.bin"),
            other => panic!("{}: want AlreadyExists, got {other:?}", store.url()),
        }
        assert_eq!(store.get("a/b.bin").await.unwrap().unwrap(), &b"first"[..]);
        assert_eq!(store.get("a/none").await.unwrap(), None);
    }
    assert_eq!(std::fs::read(tmp.path().join("a/b.bin")).unwrap(), b"first");
}

#[tokio::test]
async fn child_stores_share_the_backend_under_a_folder() {
    let root = Store::open("memory://").unwrap();
    let job = root.child("job-1").unwrap();
    assert_eq!(job.url(), "memory://job-1");
    let saved = save_checkpoint(&job, &content(3, 0), 2).await.unwrap();
    assert_eq!(saved.url, format!("memory://job-1/{}", saved.folder));
    assert!(list_checkpoints(&root).await.unwrap().attempts.is_empty());
    let keys = root.list_keys().await.unwrap();
    assert!(
        keys.contains(&format!("job-1/{}/{MANIFEST_FILE}", saved.folder)),
        "{keys:?}"
    );
    load_checkpoint(&job, &saved.folder).await.unwrap();
    assert!(root.child("a/b").is_err());
    assert!(root.child("..").is_err());
}

#[tokio::test]
async fn a_wrapped_object_store_keeps_keys_under_its_prefix() {
    use object_store::ObjectStore;
    let inner: std::sync::Arc<dyn ObjectStore> =
        std::sync::Arc::new(object_store::memory::InMemory::new());
    let store = Store::from_object_store("test://wrapped", inner.clone(), "runs/a");
    let saved = save_checkpoint(&store, &content(1, 0), 2).await.unwrap();
    assert_eq!(saved.url, format!("test://wrapped/{}", saved.folder));
    let outside = Store::from_object_store("test://root", inner, "");
    let keys = outside.list_keys().await.unwrap();
    assert!(
        keys.contains(&format!("runs/a/{}/{MANIFEST_FILE}", saved.folder)),
        "{keys:?}"
    );
    assert!(list_checkpoints(&outside)
        .await
        .unwrap()
        .attempts
        .is_empty());
    load_checkpoint(&store, &saved.folder).await.unwrap();
}

#[test]
fn bad_urls_say_what_is_accepted() {
    let cases = [
        ("", "empty"),
        ("ftp://x", "unsupported scheme \"ftp\""),
        ("http://example.com/x", "unsupported scheme \"http\""),
        ("file://relative", "needs an absolute path"),
        ("/abs/path", "not a URL"),
        ("relative/dir", "not a URL"),
        ("s3://", "no bucket"),
        ("s3://bucket/a//b", "empty path segment"),
        ("memory://a/../b", ". or .."),
    ];
    for (url, want) in cases {
        match Store::open(url) {
            Err(e @ StorageError::BadUrl { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "{url:?}: {msg}");
                assert!(msg.contains(&format!("{url:?}")), "{url:?}: {msg}");
                assert!(
                    msg.contains("accepted: file:///abs/path, memory://, s3://bucket/prefix"),
                    "{msg}"
                );
            }
            other => panic!("{url:?}: want BadUrl, got {other:?}"),
        }
    }
}

#[test]
fn an_uncreatable_directory_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let url = file_url(&file.join("sub"));
    match Store::open(&url) {
        Err(e @ StorageError::Create { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "checkpoint store {url}: cannot create directory ("
                )),
                "{msg}"
            );
            assert!(
                msg.ends_with("): pick a writable --store or --run-dir"),
                "{msg}"
            );
        }
        other => panic!("want Create, got {other:?}"),
    }
}

#[test]
fn s3_urls_build_a_store_without_network() {
    let store = Store::open("s3://bucket/some/prefix/").unwrap();
    assert_eq!(store.prefix().as_ref(), "some/prefix");
    assert_eq!(store.url_of("x"), "s3://bucket/some/prefix/x");
    let bare = Store::open("s3://bucket").unwrap();
    assert!(bare.prefix().is_root());
}

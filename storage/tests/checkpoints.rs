//! Checkpoints end to end on `memory://` and `file://` stores.

use std::path::Path;

use bytes::Bytes;
use serde_json::json;
use tenax_storage::{
    latest_verified, list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint,
    CheckpointContent, Manifest, StorageError, Store, TensorData, MANIFEST_FILE,
};

fn tensor(name: &str, shape: &[usize], seed: f32) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData {
        name: name.into(),
        shape: shape.to_vec(),
        data: (0..n).map(|i| seed + i as f32 * 0.25).collect(),
    }
}

fn content(step: u64, generation: u64) -> CheckpointContent {
    let s = step as f32;
    CheckpointContent {
        step,
        generation,
        config: json!({"model": {"d_model": 8}, "train": {"steps": 100}}),
        config_hash: "cafe".into(),
        data_cursor: step * 32,
        rng: json!({"seed": 7, "counter": step}),
        extra: json!({"adamw_step": step}),
        shards: vec![
            (
                "params.safetensors".into(),
                vec![tensor("wte", &[4, 2], s), tensor("ln.bias", &[2], -s)],
            ),
            (
                "optim.safetensors".into(),
                vec![tensor("m.wte", &[4, 2], 0.5), tensor("scalar", &[], s)],
            ),
        ],
    }
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The on-disk path of a checkpoint file in a `file://` store.
fn on_disk(dir: &Path, folder: &str, file: &str) -> std::path::PathBuf {
    dir.join(folder).join(file)
}

async fn round_trip(store: &Store) {
    let want = content(10, 2);
    let saved = save_checkpoint(store, &want).await.unwrap();
    assert!(
        saved.folder.starts_with("step-0000000010-g2-"),
        "{}",
        saved.folder
    );
    assert_eq!(saved.url, store.url_of(&saved.folder));
    assert_eq!(saved.manifest.attempt.len(), 12);

    let listing = list_checkpoints(store).await.unwrap();
    assert_eq!(listing.uncommitted, Vec::<String>::new());
    assert_eq!(listing.committed.len(), 1);
    assert_eq!(listing.committed[0].folder, saved.folder);
    assert_eq!(
        listing.committed[0].manifest.as_ref().unwrap(),
        &saved.manifest
    );

    let report = verify_checkpoint(store, &saved.folder).await.unwrap();
    assert_eq!(report.files, 2);
    assert_eq!(report.tensors, 4);
    assert_eq!(
        report.bytes,
        saved.manifest.files.iter().map(|f| f.size).sum::<u64>()
    );

    let loaded = load_checkpoint(store, &saved.folder).await.unwrap();
    assert_eq!(
        loaded.shards, want.shards,
        "tensors, files and order survive"
    );
    assert_eq!(loaded.url, saved.url);
    let m = &loaded.manifest;
    assert_eq!((m.step, m.generation, m.data_cursor), (10, 2, 320));
    assert_eq!(m.config, want.config);
    assert_eq!(m.config_hash, "cafe");
    assert_eq!(m.rng, want.rng);
    assert_eq!(m.extra, want.extra);

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
    let folder = &list_checkpoints(&store).await.unwrap().committed[0].folder;
    for file in [MANIFEST_FILE, "params.safetensors", "optim.safetensors"] {
        assert!(on_disk(&dir, folder, file).is_file(), "{file}");
    }
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(on_disk(&dir, folder, MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(manifest.step, 10);
}

#[tokio::test]
async fn empty_store_has_no_latest() {
    let store = Store::open("memory://").unwrap();
    assert!(latest_verified(&store).await.unwrap().is_none());
    let listing = list_checkpoints(&store).await.unwrap();
    assert!(listing.committed.is_empty() && listing.uncommitted.is_empty());
}

#[tokio::test]
async fn saving_a_step_twice_makes_two_folders_and_latest_is_the_newer() {
    let store = Store::open("memory://").unwrap();
    let first = save_checkpoint(&store, &content(5, 0)).await.unwrap();
    let mut again = content(5, 1);
    again.data_cursor = 999;
    let second = save_checkpoint(&store, &again).await.unwrap();
    assert_ne!(first.folder, second.folder);
    assert!(second.manifest.created_unix_ms > first.manifest.created_unix_ms);

    let listing = list_checkpoints(&store).await.unwrap();
    let folders: Vec<_> = listing.committed.iter().map(|c| c.folder.clone()).collect();
    assert_eq!(folders, vec![first.folder.clone(), second.folder.clone()]);

    let (latest, _) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, second.folder);
    assert_eq!(latest.manifest.data_cursor, 999);

    // An older step saved later still loses to the higher step.
    save_checkpoint(&store, &content(4, 2)).await.unwrap();
    let (latest, _) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, second.folder);
}

#[tokio::test]
async fn a_flipped_byte_fails_verify_and_latest_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let old = save_checkpoint(&store, &content(1, 0)).await.unwrap();
    let new = save_checkpoint(&store, &content(2, 0)).await.unwrap();

    let path = on_disk(tmp.path(), &new.folder, "params.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let err = verify_checkpoint(&store, &new.folder).await.unwrap_err();
    match &err {
        StorageError::Corrupt { url, file, reason } => {
            assert_eq!(url, &new.url);
            assert_eq!(file, "params.safetensors");
            assert!(
                reason.starts_with("SHA-256 mismatch (expected "),
                "{reason}"
            );
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "checkpoint {}: params.safetensors: SHA-256 mismatch",
            new.url
        )),
        "{msg}"
    );
    assert!(load_checkpoint(&store, &new.folder).await.is_err());
    verify_checkpoint(&store, &old.folder).await.unwrap();

    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, old.folder);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(&new.url), "{}", warnings[0]);
    assert!(
        warnings[0].contains("params.safetensors: SHA-256 mismatch"),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].contains('\n'), "one line");
}

#[tokio::test]
async fn a_truncated_or_missing_shard_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let saved = save_checkpoint(&store, &content(1, 0)).await.unwrap();
    let path = on_disk(tmp.path(), &saved.folder, "optim.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = verify_checkpoint(&store, &saved.folder)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optim.safetensors: size mismatch (expected"),
        "{err}"
    );

    std::fs::remove_file(&path).unwrap();
    let err = verify_checkpoint(&store, &saved.folder)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("optim.safetensors: missing"), "{err}");
}

#[tokio::test]
async fn a_garbage_manifest_is_listed_bad_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let good = save_checkpoint(&store, &content(1, 0)).await.unwrap();
    let truncated = save_checkpoint(&store, &content(2, 0)).await.unwrap();
    let path = on_disk(tmp.path(), &truncated.folder, MANIFEST_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    // A hand-made folder with a garbage manifest at a higher step still.
    let garbage = "step-0000000003-g0-0123456789ab";
    std::fs::create_dir(tmp.path().join(garbage)).unwrap();
    std::fs::write(on_disk(tmp.path(), garbage, MANIFEST_FILE), b"\x00not json").unwrap();

    let listing = list_checkpoints(&store).await.unwrap();
    let summary: Vec<(String, bool)> = listing
        .committed
        .iter()
        .map(|c| (c.folder.clone(), c.manifest.is_ok()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (good.folder.clone(), true),
            (truncated.folder.clone(), false),
            (garbage.to_string(), false),
        ]
    );
    let reason = listing.committed[2].manifest.as_ref().unwrap_err();
    assert!(reason.contains("does not parse"), "{reason}");

    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, good.folder);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains(garbage), "newest first: {warnings:?}");
    assert!(warnings[1].contains(&truncated.folder), "{warnings:?}");
}

#[tokio::test]
async fn all_corrupt_is_none_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    let a = save_checkpoint(&store, &content(1, 0)).await.unwrap();
    let b = save_checkpoint(&store, &content(2, 0)).await.unwrap();
    std::fs::write(on_disk(tmp.path(), &a.folder, MANIFEST_FILE), b"{").unwrap();
    std::fs::remove_file(on_disk(tmp.path(), &b.folder, "params.safetensors")).unwrap();

    match latest_verified(&store).await {
        Err(StorageError::NoneVerify {
            url,
            newest_problem,
        }) => {
            assert_eq!(url, store.url());
            assert!(newest_problem.contains(&b.url), "{newest_problem}");
            assert!(
                newest_problem.contains("params.safetensors: missing"),
                "{newest_problem}"
            );
        }
        other => panic!("want NoneVerify, got {other:?}"),
    }
}

#[tokio::test]
async fn shards_without_a_manifest_are_uncommitted_and_never_latest() {
    let store = Store::open("memory://").unwrap();
    let uncommitted = "step-0000000009-g0-0123456789ab";
    let shard = tenax_storage::shard::encode_shard(&[tensor("wte", &[2], 1.0)]).unwrap();
    store
        .put_new(&format!("{uncommitted}/params.safetensors"), shard.into())
        .await
        .unwrap();
    // Not a checkpoint folder at all: ignored.
    store
        .put_new("notes/readme.txt", Bytes::from_static(b"hi"))
        .await
        .unwrap();

    let listing = list_checkpoints(&store).await.unwrap();
    assert!(listing.committed.is_empty());
    assert_eq!(listing.uncommitted, vec![uncommitted.to_string()]);
    assert!(latest_verified(&store).await.unwrap().is_none());
    let err = load_checkpoint(&store, uncommitted)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("MANIFEST.json: missing"), "{err}");

    let committed = save_checkpoint(&store, &content(1, 0)).await.unwrap();
    let (latest, warnings) = latest_verified(&store).await.unwrap().unwrap();
    assert_eq!(latest.folder, committed.folder);
    assert!(warnings.is_empty());
}

/// Rewrite a committed manifest on disk (as tampering would).
fn tamper_manifest(dir: &Path, folder: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = on_disk(dir, folder, MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[tokio::test]
async fn manifest_and_files_must_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&file_url(tmp.path())).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &str, &str)] = &[
        (
            "tensor missing from its file",
            |m| {
                m["tensors"].as_array_mut().unwrap().push(json!(
                    {"name": "ghost", "file": "params.safetensors", "dtype": "F32", "shape": [1]}
                ))
            },
            "params.safetensors",
            "tensor \"ghost\" listed in MANIFEST.json is missing from the file",
        ),
        (
            "wrong shape",
            |m| m["tensors"][0]["shape"] = json!([8]),
            "params.safetensors",
            "has shape [4, 2], MANIFEST.json says [8]",
        ),
        (
            "tensor dropped from the manifest",
            |m| {
                m["tensors"].as_array_mut().unwrap().remove(1);
            },
            "params.safetensors",
            "\"ln.bias\" is in the file but not in MANIFEST.json",
        ),
        (
            "manifest moved to another step's folder",
            |m| m["step"] = json!(11),
            MANIFEST_FILE,
            "describes step-0000000011-",
        ),
        (
            "hash edited",
            |m| m["files"][1]["sha256"] = json!("00".repeat(32)),
            "optim.safetensors",
            "SHA-256 mismatch",
        ),
    ];
    for (what, edit, file, want) in cases {
        let saved = save_checkpoint(&store, &content(10, 0)).await.unwrap();
        tamper_manifest(tmp.path(), &saved.folder, edit);
        match verify_checkpoint(&store, &saved.folder).await {
            Err(StorageError::Corrupt {
                file: got_file,
                reason,
                ..
            }) => {
                assert_eq!(&got_file, file, "{what}");
                assert!(reason.contains(want), "{what}: {reason}");
            }
            other => panic!("{what}: want Corrupt, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_content_is_refused_and_writes_nothing() {
    let store = Store::open("memory://").unwrap();
    type Edit = fn(&mut CheckpointContent);
    let cases: &[(Edit, &str)] = &[
        (
            |c| c.shards[0].1[0].data.pop().map(drop).unwrap(),
            "has 7 values but shape [4, 2] needs 8",
        ),
        (
            |c| c.shards[1].0 = "params.safetensors".into(),
            "appears twice",
        ),
        (|c| c.shards[1].0 = MANIFEST_FILE.into(), "not allowed"),
        (|c| c.shards[1].0 = "a/b".into(), "not allowed"),
        (|c| c.shards[1].0 = String::new(), "not allowed"),
        (
            |c| {
                let t = c.shards[0].1[0].clone();
                c.shards[0].1.push(t)
            },
            "appears twice",
        ),
    ];
    for (edit, want) in cases {
        let mut c = content(1, 0);
        edit(&mut c);
        match save_checkpoint(&store, &c).await {
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
    let saved = save_checkpoint(&job, &content(3, 0)).await.unwrap();
    assert_eq!(saved.url, format!("memory://job-1/{}", saved.folder));
    assert!(list_checkpoints(&root).await.unwrap().committed.is_empty());
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
    let saved = save_checkpoint(&store, &content(1, 0)).await.unwrap();
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
        .committed
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

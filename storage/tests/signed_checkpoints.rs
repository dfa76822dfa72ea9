//! Signed manifests on a `file://` store: a store with a signing key signs what it commits, a
//! store with a trust key verifies and loads only what that key signed, and a manifest edited
//! after signing is refused even when every hash in it was recomputed. Version-2 (SHA-256)
//! checkpoints still verify and load.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_bit_identical, content, file_url, on_disk, sorted};
use tenax_storage::{
    latest_verified, load_checkpoint, save_checkpoint, verify_checkpoint, FileEntry, HashAlg,
    Manifest, ManifestKeys, SignKey, StorageError, Store, MANIFEST_FILE,
};

fn signing(key: &SignKey) -> ManifestKeys {
    ManifestKeys {
        sign: Some(Arc::new(key.clone())),
        trust: None,
    }
}

fn trusting(key: &SignKey) -> ManifestKeys {
    ManifestKeys {
        sign: None,
        trust: Some(Arc::new(key.public())),
    }
}

/// The value position of the last `"key": "` in `bytes`.
fn value_at(bytes: &[u8], key: &str) -> usize {
    let pattern = format!("\"{key}\": \"");
    bytes
        .windows(pattern.len())
        .rposition(|w| w == pattern.as_bytes())
        .unwrap_or_else(|| panic!("no {key}"))
        + pattern.len()
}

/// Rewrite a v3 manifest on disk with `edit` applied to its text, then recompute its
/// BLAKE3 self-checksum (over the bytes with it and the signature zeroed) and keep the
/// signature: what someone who edits a manifest and fixes every hash writes.
fn edit_and_rehash(dir: &Path, folder: &str, edit: impl FnOnce(String) -> String) {
    let path = on_disk(dir, folder, MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut bytes = edit(text).into_bytes();
    let at = value_at(&bytes, "manifest_blake3");
    let mut zeroed = bytes.clone();
    zeroed[at..at + 64].fill(b'0');
    let sig = value_at(&bytes, "signature");
    zeroed[sig..sig + 128].fill(b'0');
    let hash = HashAlg::Blake3.hex(&zeroed);
    bytes[at..at + 64].copy_from_slice(hash.as_bytes());
    Manifest::parse(&bytes).expect("the edit was re-hashed");
    std::fs::write(&path, bytes).unwrap();
}

fn untrusted_reason(e: Result<impl std::fmt::Debug, StorageError>) -> String {
    match e {
        Err(e @ StorageError::Untrusted { .. }) => e.to_string(),
        other => panic!("want Untrusted, got {other:?}"),
    }
}

#[tokio::test]
async fn signed_saves_verify_under_their_key_only() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(tmp.path());
    let key = SignKey::from_seed([3; 32]);
    let other = SignKey::from_seed([4; 32]);
    let writer = Store::open(&url).unwrap().with_keys(signing(&key));
    let want = content(10, 0);
    let saved = save_checkpoint(&writer, &want, 2).await.unwrap();
    assert_eq!(saved.manifest.signer, key.public().hex());
    assert_eq!(saved.manifest.signature.len(), 128);
    let on_disk_bytes = std::fs::read(on_disk(tmp.path(), &saved.folder, MANIFEST_FILE)).unwrap();
    assert_eq!(on_disk_bytes, saved.manifest.to_json_signed(Some(&key)));

    // No trust key: as before. The matching key: verifies and loads the same tensors.
    let plain = Store::open(&url).unwrap();
    verify_checkpoint(&plain, &saved.folder).await.unwrap();
    let trusted = Store::open(&url).unwrap().with_keys(trusting(&key));
    verify_checkpoint(&trusted, &saved.folder).await.unwrap();
    let loaded = load_checkpoint(&trusted, &saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&want.tensors), "signed load");

    // Another key: refused, naming the checkpoint and both keys.
    let wrong = Store::open(&url).unwrap().with_keys(trusting(&other));
    let err = untrusted_reason(verify_checkpoint(&wrong, &saved.folder).await);
    assert!(err.contains(&saved.url), "{err}");
    assert!(
        err.contains("signed by key") && err.contains(&other.public().id()),
        "{err}"
    );
    assert!(load_checkpoint(&wrong, &saved.folder).await.is_err());
    match latest_verified(&wrong).await {
        Err(StorageError::NoneVerify { newest_problem, .. }) => {
            assert!(newest_problem.contains("signed by key"), "{newest_problem}")
        }
        other => panic!("want NoneVerify, got {other:?}"),
    }
}

#[tokio::test]
async fn unsigned_checkpoints_are_refused_under_a_trust_key() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(tmp.path());
    let key = SignKey::from_seed([3; 32]);
    let saved = save_checkpoint(&Store::open(&url).unwrap(), &content(10, 0), 1)
        .await
        .unwrap();
    assert!(saved.manifest.signature.is_empty());
    let trusted = Store::open(&url).unwrap().with_keys(trusting(&key));
    let err = untrusted_reason(verify_checkpoint(&trusted, &saved.folder).await);
    assert!(
        err.contains("not signed") && err.contains("--sign-key"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(load_checkpoint(&trusted, &saved.folder).await.is_err());
}

#[tokio::test]
async fn an_edited_manifest_with_recomputed_hashes_is_refused_and_latest_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(tmp.path());
    let key = SignKey::from_seed([3; 32]);
    let writer = Store::open(&url).unwrap().with_keys(signing(&key));
    let older = save_checkpoint(&writer, &content(8, 0), 2).await.unwrap();
    let newer = save_checkpoint(&writer, &content(10, 0), 2).await.unwrap();
    // Swap a shard of the newer checkpoint for the older one's (other values, a valid
    // file) and fix its size and BLAKE3 in the manifest, and the self-checksum.
    let shard = &newer.manifest.files[0];
    let replacement = std::fs::read(on_disk(
        tmp.path(),
        &older.folder,
        &older.manifest.files[0].name,
    ))
    .unwrap();
    std::fs::write(
        on_disk(tmp.path(), &newer.folder, &shard.name),
        &replacement,
    )
    .unwrap();
    let new_entry = FileEntry::new(
        shard.name.clone(),
        replacement.len() as u64,
        HashAlg::Blake3,
        HashAlg::Blake3.hex(&replacement),
    );
    edit_and_rehash(tmp.path(), &newer.folder, |text| {
        text.replace(&shard.blake3, &new_entry.blake3).replace(
            &format!("\"size\": {}", shard.size),
            &format!("\"size\": {}", new_entry.size),
        )
    });
    // Every hash agrees: without a trust key it verifies (the edit is undetectable so).
    let plain = Store::open(&url).unwrap();
    verify_checkpoint(&plain, &newer.folder).await.unwrap();
    // Under the key: refused, and the newest good one is the older signed checkpoint.
    let trusted = Store::open(&url).unwrap().with_keys(trusting(&key));
    let err = untrusted_reason(verify_checkpoint(&trusted, &newer.folder).await);
    assert!(err.contains("changed after it was signed"), "{err}");
    let (latest, warnings) = latest_verified(&trusted).await.unwrap().unwrap();
    assert_eq!(latest.folder, older.folder);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(&newer.url), "{warnings:?}");
}

/// A version-2 checkpoint (SHA-256 hashes and self-checksum, no signature), as the previous
/// build wrote them: made from a fresh save by re-hashing its files with SHA-256.
#[tokio::test]
async fn version_2_checkpoints_still_verify_and_load() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(tmp.path());
    let store = Store::open(&url).unwrap();
    let want = content(10, 0);
    let saved = save_checkpoint(&store, &want, 2).await.unwrap();
    let mut v2 = saved.manifest.clone();
    v2.format_version = 2;
    for f in &mut v2.files {
        let bytes = std::fs::read(on_disk(tmp.path(), &saved.folder, &f.name)).unwrap();
        *f = FileEntry::new(
            f.name.clone(),
            f.size,
            HashAlg::Sha256,
            HashAlg::Sha256.hex(&bytes),
        );
    }
    let bytes = v2.to_json();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.contains("\"manifest_sha256\"") && !text.contains("blake3"),
        "{text}"
    );
    std::fs::write(on_disk(tmp.path(), &saved.folder, MANIFEST_FILE), &bytes).unwrap();
    verify_checkpoint(&store, &saved.folder).await.unwrap();
    let loaded = load_checkpoint(&store, &saved.folder).await.unwrap();
    assert_eq!(loaded.manifest.format_version, 2);
    assert_bit_identical(&loaded.tensors, &sorted(&want.tensors), "v2 load");
    // A flipped byte of a v2 shard is still caught, by SHA-256.
    let shard = on_disk(tmp.path(), &saved.folder, &v2.files[0].name);
    common::flip_byte(&shard, 100);
    match verify_checkpoint(&store, &saved.folder).await {
        Err(StorageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("SHA-256 mismatch"), "{reason}")
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
}

//! Shared saves: every replica writes its share of rows into one agreed folder, one member
//! commits; a missing or wrong share is written by the committer under another name.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_bit_identical, bit_tensor, meta, sorted};
use tenax_storage::{
    begin_shared_save, collect_shares, list_checkpoints, load_checkpoint, put_receipt,
    put_skip_receipt, receipt_name, replica_plan, shard_of, shared_attempt_id, shared_folder,
    takeover_file_name, verify_checkpoint, write_shard, AttemptStatus, PendingSave, ShareWait,
    Store, TensorData, WrittenShard,
};

fn tensors() -> Vec<TensorData> {
    vec![
        bit_tensor("wte", &[13, 4], 1),
        bit_tensor("h.0.attn", &[9, 5], 2),
        bit_tensor("ln.bias", &[7], 3),
        bit_tensor("adamw.step", &[], 4),
    ]
}

fn by_name(ts: &[TensorData]) -> Arc<BTreeMap<String, TensorData>> {
    Arc::new(ts.iter().map(|t| (t.name.clone(), t.clone())).collect())
}

fn quick() -> ShareWait {
    ShareWait {
        min_wait: Duration::from_millis(300),
        own_write_factor: 3,
        poll: Duration::from_millis(20),
    }
}

/// Writer `k` of `writers` writes its shard as node `node-k` (and its receipt if `receipt`).
async fn write_as(
    store: &Store,
    nonce: &str,
    writers: u32,
    k: u32,
    receipt: bool,
) -> (PendingSave, WrittenShard) {
    let ts = tensors();
    let plan = replica_plan(store, &ts, writers).unwrap();
    let pending = begin_shared_save(meta(40, 3), nonce);
    let shard = shard_of(&plan, k).unwrap();
    let mut w = write_shard(store, &pending, shard, &by_name(&ts))
        .await
        .unwrap();
    w.file.writer = Some(format!("node-{k}"));
    if receipt {
        put_receipt(store, &pending, k, &w).await.unwrap();
    }
    (pending, w)
}

/// The committer (writer 0) writes its share and collects the rest.
async fn commit_as_0(store: &Store, nonce: &str, writers: u32) -> tenax_storage::SharedCommit {
    let ts = tensors();
    let plan = replica_plan(store, &ts, writers).unwrap();
    let (pending, mine) = write_as(store, nonce, writers, 0, false).await;
    collect_shares(
        store,
        &pending,
        &plan,
        &by_name(&ts),
        0,
        Some(mine),
        Duration::from_millis(1),
        &quick(),
    )
    .await
    .unwrap()
}

#[test]
fn writers_agree_on_the_folder_and_a_new_job_never_reuses_it() {
    let a = shared_attempt_id("nonce-a", 3, 40);
    assert_eq!(a, shared_attempt_id("nonce-a", 3, 40));
    assert_eq!(a.len(), 12);
    assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    for other in [
        shared_attempt_id("nonce-b", 3, 40),
        shared_attempt_id("nonce-a", 4, 40),
        shared_attempt_id("nonce-a", 3, 41),
    ] {
        assert_ne!(a, other);
    }
    let p = begin_shared_save(meta(40, 3), "nonce-a");
    assert_eq!(p.folder, format!("step-0000000040-g3-{a}"));
}

#[tokio::test]
async fn every_replica_writes_its_share_and_the_committer_lists_them_all() {
    let store = Store::open("memory://").unwrap();
    for k in [2, 1] {
        write_as(&store, "n", 3, k, true).await;
    }
    let c = commit_as_0(&store, "n", 3).await;
    assert_eq!(c.from_writers, vec![1, 2]);
    assert!(c.taken_over.is_empty() && c.refused.is_empty());
    let writers: Vec<(String, Option<String>)> = c
        .saved
        .manifest
        .files
        .iter()
        .map(|f| (f.name.clone(), f.writer.clone()))
        .collect();
    assert_eq!(
        writers,
        (0..3)
            .map(|k| (
                format!("shard-{k:05}.safetensors"),
                Some(format!("node-{k}"))
            ))
            .collect::<Vec<_>>()
    );
    verify_checkpoint(&store, &c.saved.folder).await.unwrap();
    let loaded = load_checkpoint(&store, &c.saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&tensors()), "shared save");
}

#[tokio::test]
async fn a_writer_that_died_before_its_receipt_is_replaced_and_its_file_is_not_listed() {
    let store = Store::open("memory://").unwrap();
    write_as(&store, "n", 3, 1, true).await;
    // Writer 2 uploaded its shard and died before its receipt.
    write_as(&store, "n", 3, 2, false).await;
    let c = commit_as_0(&store, "n", 3).await;
    assert_eq!(c.from_writers, vec![1]);
    assert_eq!(c.taken_over, vec![2]);
    let names: Vec<&str> = c
        .saved
        .manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        names,
        vec![
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            takeover_file_name(2, 0).as_str()
        ]
    );
    assert_eq!(
        c.saved.manifest.files[2].writer.as_deref(),
        Some("node-0"),
        "the committer wrote the share it took over"
    );
    let listing = list_checkpoints(&store).await.unwrap();
    assert_eq!(listing.attempts.len(), 1);
    assert_eq!(listing.attempts[0].status, AttemptStatus::Committed);
    let loaded = load_checkpoint(&store, &c.saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&tensors()), "taken-over share");
}

#[tokio::test]
async fn with_no_other_writer_alive_the_committer_writes_every_share() {
    let store = Store::open("memory://").unwrap();
    let c = commit_as_0(&store, "n", 4).await;
    assert!(c.from_writers.is_empty());
    assert_eq!(c.taken_over, vec![1, 2, 3]);
    let loaded = load_checkpoint(&store, &c.saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&tensors()), "all taken over");
}

#[tokio::test]
async fn a_receipt_that_does_not_match_the_plan_is_refused() {
    let store = Store::open("memory://").unwrap();
    let (pending, mut w) = write_as(&store, "n", 2, 1, false).await;
    // A receipt from a writer that cut the rows differently.
    if let Some(rows) = w.tensors[0].rows.as_mut() {
        rows[0] += 1;
    }
    put_receipt(&store, &pending, 1, &w).await.unwrap();
    let c = commit_as_0(&store, "n", 2).await;
    assert_eq!(c.refused, vec![1]);
    assert_eq!(c.taken_over, vec![1]);
    let loaded = load_checkpoint(&store, &c.saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&tensors()), "refused receipt");
}

#[tokio::test]
async fn a_writer_that_skips_the_save_is_replaced_without_waiting() {
    let store = Store::open("memory://").unwrap();
    let ts = tensors();
    let plan = replica_plan(&store, &ts, 2).unwrap();
    let folder = shared_folder("n", 3, 40);
    put_skip_receipt(&store, &folder, 1, "superseded by the save of step 50")
        .await
        .unwrap();
    let (pending, mine) = write_as(&store, "n", 2, 0, false).await;
    assert_eq!(pending.folder, folder);
    let patient = ShareWait {
        min_wait: Duration::from_secs(600),
        ..quick()
    };
    let tensors_by_name = by_name(&ts);
    let collect = collect_shares(
        &store,
        &pending,
        &plan,
        &tensors_by_name,
        0,
        Some(mine),
        Duration::from_millis(1),
        &patient,
    );
    let c = tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("the committer does not wait for a writer that said it skips")
        .unwrap();
    assert_eq!((c.refused, c.taken_over), (vec![1], vec![1]));
    let loaded = load_checkpoint(&store, &c.saved.folder).await.unwrap();
    assert_bit_identical(&loaded.tensors, &sorted(&tensors()), "skipped share");
}

#[tokio::test]
async fn a_second_receipt_for_one_writer_is_refused_by_the_store() {
    let store = Store::open("memory://").unwrap();
    let (pending, w) = write_as(&store, "n", 2, 1, true).await;
    assert!(put_receipt(&store, &pending, 1, &w).await.is_err());
    assert_eq!(receipt_name(1), "share-00001.json");
}

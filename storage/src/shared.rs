//! Checkpoints written by several nodes at once: every data-parallel replica writes its
//! share of rows, one member commits.
//!
//! Every replica holds the whole training state, so the writing is split: core's
//! [`save_plan`] cuts the rows among the `n` replicas (writer `k` writes
//! `shard-<k>.safetensors`). All writers use one folder that they agree on without talking:
//! its attempt id is [`shared_attempt_id`] of the job's nonce, the generation and the step.
//!
//! 1. A writer uploads its shard ([`write_shard`]), then its receipt `share-<k>.json`
//!    ([`put_receipt`]): the shard's file entry (name, size, SHA-256, writer) and tensor
//!    entries, written with `PutMode::Create`.
//! 2. The committer writes its own share, then collects the other receipts
//!    ([`collect_shares`]) until every share is in or its wait ([`ShareWait`]) is over.
//!    A share still missing then (its writer died, hangs, or is slow) is written by the
//!    committer itself under another name (`shard-<k>.by-<committer>.safetensors`), so a
//!    late writer can never overwrite a file the manifest lists. A receipt that does not
//!    match the plan is treated as missing.
//! 3. The committer writes `MANIFEST.json` ([`commit_save`]): the commit, as for any save.
//!
//! A writer that dies part-way leaves an unlisted file or none: the checkpoint is either
//! committed whole (from shares that were all complete) or not at all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tenax_core::ckpt::{save_plan, SavePlan, TensorSpec, WriterShard};

use crate::checkpoint::{begin_save_as, write_shard, CheckpointMeta, PendingSave, WrittenShard};
use crate::error::StorageError;
use crate::shard::TensorData;
use crate::store::Store;

/// File name of writer `writer`'s receipt.
pub fn receipt_name(writer: u32) -> String {
    format!("share-{writer:05}.json")
}

/// File name under which `by` writes the share of writer `writer`, who did not.
pub fn takeover_file_name(writer: u32, by: u32) -> String {
    format!("shard-{writer:05}.by-{by:05}.safetensors")
}

/// The attempt id every writer of a shared save derives alike: 12 hex characters of the
/// SHA-256 of the job's nonce, the generation and the step. The nonce is unique to one
/// incarnation of the job, so a job started afresh with the same store never reuses a folder.
pub fn shared_attempt_id(job_nonce: &str, generation: u64, step: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"tenax shared save v1\n");
    h.update(job_nonce.as_bytes());
    h.update(format!("\n{generation}\n{step}\n").as_bytes());
    hex::encode(h.finalize())[..12].to_string()
}

/// The folder of the shared save of `step` in `generation`.
pub fn shared_folder(job_nonce: &str, generation: u64, step: u64) -> String {
    crate::manifest::folder_name(
        step,
        generation,
        &shared_attempt_id(job_nonce, generation, step),
    )
}

/// Start a shared save in the folder every writer agrees on. Writes nothing.
pub fn begin_shared_save(meta: CheckpointMeta, job_nonce: &str) -> PendingSave {
    let attempt = shared_attempt_id(job_nonce, meta.generation, meta.step);
    begin_save_as(meta, attempt)
}

/// The save plan of `writers` replicas that each hold every tensor of `tensors`.
///
/// # Errors
/// [`StorageError::Format`] when the tensors cannot be planned (e.g. a duplicate name) or
/// `writers` is 0.
pub fn replica_plan(
    store: &Store,
    tensors: &[TensorData],
    writers: u32,
) -> Result<SavePlan, StorageError> {
    let format_err = |reason: String| StorageError::Format {
        url: store.url().to_string(),
        reason,
    };
    if writers == 0 {
        return Err(format_err("a save needs at least one writer".into()));
    }
    let holders: Vec<u32> = (0..writers).collect();
    let held: Vec<(TensorSpec, Vec<u32>)> = tensors
        .iter()
        .map(|t| {
            (
                TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                },
                holders.clone(),
            )
        })
        .collect();
    save_plan(&held).map_err(|e| format_err(e.to_string()))
}

/// Write writer `shard.writer`'s receipt (after its shard is written).
///
/// # Errors
/// A store error; [`StorageError::AlreadyExists`] if a receipt for this writer is there.
pub async fn put_receipt(
    store: &Store,
    pending: &PendingSave,
    writer: u32,
    written: &WrittenShard,
) -> Result<(), StorageError> {
    let json = serde_json::to_vec_pretty(written).expect("a receipt always serialises");
    let key = format!("{}/{}", pending.folder, receipt_name(writer));
    store.put_new(&key, Bytes::from(json)).await
}

/// Write writer `writer`'s receipt saying it will not write its share (its save was
/// superseded by a newer one): the committer writes that share at once instead of waiting.
///
/// # Errors
/// A store error; [`StorageError::AlreadyExists`] if a receipt for this writer is there.
pub async fn put_skip_receipt(
    store: &Store,
    pending_folder: &str,
    writer: u32,
    why: &str,
) -> Result<(), StorageError> {
    let json = serde_json::to_vec(&serde_json::json!({ "skipped": why }))
        .expect("a skip receipt always serialises");
    let key = format!("{pending_folder}/{}", receipt_name(writer));
    store.put_new(&key, Bytes::from(json)).await
}

/// Whether a receipt describes exactly writer `shard.writer`'s share of the plan.
fn receipt_matches(shard: &WriterShard, written: &WrittenShard) -> bool {
    let want: Vec<(&str, [usize; 2])> = shard
        .slices
        .iter()
        .map(|s| (s.tensor.as_str(), [s.rows.start, s.rows.end]))
        .collect();
    let got: Vec<(&str, [usize; 2])> = written
        .tensors
        .iter()
        .filter_map(|t| Some((t.name.as_str(), t.rows?)))
        .collect();
    written.file.name == shard.file
        && written.tensors.iter().all(|t| t.file == shard.file)
        && want == got
}

/// How long the committer waits for the other writers' receipts.
#[derive(Clone, Debug, PartialEq)]
pub struct ShareWait {
    /// It waits at least this long after its own share is written...
    pub min_wait: Duration,
    /// ... or this many times as long as its own share took, if that is longer.
    pub own_write_factor: u32,
    /// It looks for new receipts at most this far apart (one listing of the folder each
    /// time); the first look comes after 10 ms and the gap doubles up to this.
    pub poll: Duration,
}

impl Default for ShareWait {
    /// At least 2 s, or 3 times the committer's own share; a listing every 200 ms. A
    /// writer that misses it only costs the committer the writing of its share.
    fn default() -> Self {
        Self {
            min_wait: Duration::from_secs(2),
            own_write_factor: 3,
            poll: Duration::from_millis(200),
        }
    }
}

/// A shared save, committed.
#[derive(Clone, Debug)]
pub struct SharedCommit {
    /// The manifest, folder and URL.
    pub saved: crate::checkpoint::SavedCheckpoint,
    /// Writers whose own receipts were used (the committer not included).
    pub from_writers: Vec<u32>,
    /// Writers whose shares the committer wrote itself because they were missing (or
    /// their receipts refused).
    pub taken_over: Vec<u32>,
    /// Writers whose receipts did not match the save plan, or said they skipped the save.
    pub refused: Vec<u32>,
}

/// The committer's side of a shared save of `plan`, whose share `me` is already written as
/// `mine` (`None`: the plan gave it nothing to write): collect the other writers' receipts within `wait`, write the missing shares from
/// `tensors` (every tensor whole, by name) under takeover names, then commit the manifest.
/// `writer_name` goes into the file entries the committer writes.
///
/// # Errors
/// A store error while listing, reading, writing or committing; nothing is committed then.
#[allow(clippy::too_many_arguments)]
pub async fn collect_shares(
    store: &Store,
    pending: &PendingSave,
    plan: &SavePlan,
    tensors: &Arc<BTreeMap<String, TensorData>>,
    me: u32,
    mine: Option<WrittenShard>,
    own_write: Duration,
    wait: &ShareWait,
) -> Result<SharedCommit, StorageError> {
    let writer_name = mine.as_ref().and_then(|w| w.file.writer.clone());
    let others: Vec<&WriterShard> = plan.shards.iter().filter(|s| s.writer != me).collect();
    let mut got: BTreeMap<u32, WrittenShard> = BTreeMap::new();
    let mut refused: Vec<u32> = Vec::new();
    let waited = wait.min_wait.max(own_write * wait.own_write_factor);
    let deadline = Instant::now() + waited;
    let folder = store.child(&pending.folder)?;
    let mut gap = Duration::from_millis(10).min(wait.poll);
    loop {
        let keys = folder.list_keys().await?;
        for shard in &others {
            let seen = got.contains_key(&shard.writer) || refused.contains(&shard.writer);
            if seen || !keys.contains(&receipt_name(shard.writer)) {
                continue;
            }
            let key = format!("{}/{}", pending.folder, receipt_name(shard.writer));
            let Some(bytes) = store.get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<WrittenShard>(&bytes) {
                Ok(w) if receipt_matches(shard, &w) => {
                    got.insert(shard.writer, w);
                }
                _ => refused.push(shard.writer),
            }
        }
        if got.len() + refused.len() == others.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(gap.min(deadline.saturating_duration_since(Instant::now()))).await;
        gap = (gap * 2).min(wait.poll);
    }
    let from_writers: Vec<u32> = got.keys().copied().collect();
    let mut taken_over = Vec::new();
    let missing: Vec<&WriterShard> = others
        .iter()
        .copied()
        .filter(|s| !got.contains_key(&s.writer))
        .collect();
    for shard in missing {
        let mut instead = shard.clone();
        instead.file = takeover_file_name(shard.writer, me);
        let mut w = write_shard(store, pending, &instead, tensors).await?;
        w.file.writer = writer_name.clone();
        got.insert(shard.writer, w);
        taken_over.push(shard.writer);
    }
    if let Some(mine) = mine {
        got.insert(me, mine);
    }
    let written: Vec<WrittenShard> = got.into_values().collect();
    let saved = crate::checkpoint::commit_save(store, pending, written).await?;
    Ok(SharedCommit {
        saved,
        from_writers,
        taken_over,
        refused,
    })
}

/// The shard of writer `writer` in `plan` (a writer with nothing to write has none).
pub fn shard_of(plan: &SavePlan, writer: u32) -> Option<&WriterShard> {
    plan.shards.iter().find(|s| s.writer == writer)
}

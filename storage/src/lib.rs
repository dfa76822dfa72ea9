//! tenax-storage: object store backends and the checkpoint writer/reader.
//!
//! A checkpoint store is a URL (`file:///abs/path`, `memory://`, `s3://bucket/prefix`). Each save
//! is a fresh folder `step-<step:010>-g<gen>-<attempt>` of write-once safetensors shards (one
//! per writer, tensors cut by rows so replicas share the writing) plus `MANIFEST.json`, written
//! last as the commit. Readers hash everything, assemble tensors whatever number of ranks wrote
//! them, and fall back to the newest checkpoint that verifies. Retention (`prune`) deletes
//! manifest first, and never the newest good checkpoint.
//!
//! Modules:
//! - `store`: [`Store`], parsing a store URL into an `object_store` backend and prefix, with
//!   bounded timeouts and retries ([`StoreOptions`]); write-once puts, multipart uploads for
//!   large files, gets, deletes and listing.
//! - `manifest`: [`Manifest`] and its entries, folder names, self-consistency and file hash
//!   checks, BLAKE3 (format v3) or SHA-256 (v1, v2) (pure).
//! - `signing`: ed25519 manifest signatures ([`SignKey`], [`TrustKey`], [`ManifestKeys`],
//!   given to a store with [`Store::with_keys`]) and key files (pure but for key files).
//! - `shard`: [`TensorData`] to and from safetensors bytes, checked against the manifest (pure).
//! - `restore`: whole tensors from a checkpoint's slices, on every core; from a `file://`
//!   store read straight into tensor memory and hashed there, from a remote store streamed
//!   straight into it (crate-private).
//! - `checkpoint`: [`save_checkpoint`] (or its steps [`begin_save`], [`write_shard`],
//!   [`commit_save`]), [`list_checkpoints`], [`verify_checkpoint`], [`load_checkpoint`],
//!   [`latest_verified`], [`prune`] (async, tokio).
//! - `shared`: a checkpoint written by several nodes, each replica its share of rows, one
//!   committer ([`collect_shares`]); the writers agree on the folder without talking.
//! - `error`: [`StorageError`].
//!
//! Invariants: no committed checkpoint file is ever overwritten (small files are put with
//! `PutMode::Create`; a large shard is written once by its one writer, and a share taken
//! over by the committer goes to a file of another name); a checkpoint exists only once its
//! manifest is written (one `PutMode::Create` PUT, its signature inside it); nothing is loaded
//! without its hash matching the manifest, nor, under a trust key, without the manifest's
//! signature verifying.

pub mod checkpoint;
pub mod error;
pub mod manifest;
mod restore;
pub mod shard;
pub mod shared;
pub mod signing;
pub mod store;

pub use checkpoint::{
    begin_save, commit_save, latest_verified, list_checkpoints, load_checkpoint, now_unix_ms,
    prune, prune_after_save, save_checkpoint, save_owned, unique_hex, verify_checkpoint,
    write_shard, AttemptStatus, CheckpointContent, CheckpointMeta, ListedAttempt, Listing,
    LoadedCheckpoint, PendingSave, PruneReport, SavedCheckpoint, VerifyReport, WrittenShard,
};
pub use error::StorageError;
pub use manifest::{
    FileEntry, HashAlg, Manifest, TensorEntry, FORMAT_VERSION, MANIFEST_FILE, PARALLEL_HASH_BYTES,
};
pub use shard::{encode_shard, TensorData};
pub use shared::{
    begin_shared_save, collect_shares, put_receipt, put_skip_receipt, receipt_name, replica_plan,
    shard_of, shared_attempt_id, shared_folder, takeover_file_name, ShareWait, SharedCommit,
};
pub use signing::{ManifestKeys, SignKey, TrustKey};
pub use store::{part_size_for, ObjectInfo, Store, StoreOptions};

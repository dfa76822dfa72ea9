//! tenax-storage: object store backends and the checkpoint writer/reader.
//!
//! A checkpoint store is a URL (`file:///abs/path`, `memory://`, `s3://bucket/prefix`). Each save
//! is a fresh folder `step-<step:010>-g<gen>-<attempt>` of write-once safetensors shards plus
//! `MANIFEST.json`, written last as the commit. Readers hash everything and fall back to the
//! newest checkpoint that verifies.
//!
//! Modules:
//! - `store`: [`Store`], parsing a store URL into an `object_store` backend and prefix;
//!   write-once puts, gets and listing by key.
//! - `manifest`: [`Manifest`] and its entries, folder names, self-consistency and file hash
//!   checks (pure).
//! - `shard`: [`TensorData`] to and from safetensors bytes, checked against the manifest (pure).
//! - `checkpoint`: [`save_checkpoint`], [`list_checkpoints`], [`verify_checkpoint`],
//!   [`load_checkpoint`], [`latest_verified`] (async, tokio).
//! - `error`: [`StorageError`].
//!
//! Invariants: no checkpoint file is ever overwritten (every put is `PutMode::Create`); a
//! checkpoint exists only once its manifest is written; nothing is loaded without its SHA-256
//! matching the manifest.

pub mod checkpoint;
pub mod error;
pub mod manifest;
pub mod shard;
pub mod store;

pub use checkpoint::{
    latest_verified, list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint,
    CheckpointContent, ListedCheckpoint, Listing, LoadedCheckpoint, SavedCheckpoint, VerifyReport,
};
pub use error::StorageError;
pub use manifest::{FileEntry, Manifest, TensorEntry, FORMAT_VERSION, MANIFEST_FILE};
pub use shard::TensorData;
pub use store::Store;

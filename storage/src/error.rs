//! The one error type of this crate.
//!
//! Every message names the store or checkpoint URL, the file where there is one, what is wrong
//! and, where the caller can act, what to do. Causes are written into the message (so a one-line
//! print says everything) rather than chained as `source()`.

/// What can go wrong opening a store or saving, listing, verifying or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store URL is not one this crate understands.
    #[error(
        "checkpoint store URL {url:?}: {reason}; accepted: file:///abs/path, memory://, s3://bucket/prefix"
    )]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A `file://` store's directory does not exist and cannot be created.
    #[error(
        "checkpoint store {url}: cannot create directory ({cause}): pick a writable --store or --run-dir"
    )]
    Create {
        /// The store URL.
        url: String,
        /// Why the directory could not be created or opened.
        cause: std::io::Error,
    },

    /// An object store call failed (network, permissions, disk).
    #[error("checkpoint store {url}: {op} failed: {cause}{}", hint(.cause))]
    ObjectStore {
        /// The store URL.
        url: String,
        /// The operation and the key it was for, e.g. `get step-0000000010-g0-ab12cd34ef56/MANIFEST.json`.
        op: String,
        /// The error object_store returned.
        cause: object_store::Error,
    },

    /// A write-once key already exists: checkpoint files are never overwritten.
    #[error(
        "checkpoint store {url}: {key} already exists; checkpoint files are written once and never overwritten"
    )]
    AlreadyExists {
        /// The store URL.
        url: String,
        /// The key, relative to the store URL.
        key: String,
    },

    /// A committed checkpoint does not match its manifest (or the manifest itself is bad).
    #[error("checkpoint {url}: {file}: {reason}")]
    Corrupt {
        /// The checkpoint URL (store URL + folder).
        url: String,
        /// The file inside the checkpoint folder, e.g. `params.safetensors` or `MANIFEST.json`.
        file: String,
        /// What is wrong, e.g. `SHA-256 mismatch (expected .., got ..)`.
        reason: String,
    },

    /// A trust key was given and the checkpoint's manifest is not signed by it (unsigned,
    /// signed by another key, or changed after it was signed).
    #[error("checkpoint {url}: {MANIFEST}: {reason}", MANIFEST = crate::manifest::MANIFEST_FILE)]
    Untrusted {
        /// The checkpoint URL (store URL + folder).
        url: String,
        /// What is wrong and what to do, e.g. `not signed, but --trust-key ... `.
        reason: String,
    },

    /// Committed checkpoints exist but none of them verifies.
    #[error(
        "checkpoint store {url}: no committed checkpoint verifies (newest: {newest_problem}); restore a good checkpoint into the store, or start afresh with an empty --store"
    )]
    NoneVerify {
        /// The store URL.
        url: String,
        /// Why the newest committed checkpoint was rejected.
        newest_problem: String,
    },

    /// The content handed to `save_checkpoint` cannot be saved as given (nothing was written).
    #[error("checkpoint store {url}: cannot save: {reason}")]
    Format {
        /// The store URL.
        url: String,
        /// What is wrong with the content, e.g. a tensor whose data does not fill its shape.
        reason: String,
    },
}

/// What to do about a failed object store call, recognised from the error (empty if nothing
/// specific is known).
pub fn hint(cause: &object_store::Error) -> &'static str {
    let text = cause.to_string();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["NoSuchBucket", "bucket does not exist"]) {
        " (the bucket does not exist: create it or fix the bucket in the URL)"
    } else if has(&[
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403 Forbidden",
        "ExpiredToken",
    ]) {
        " (the credentials were refused: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)"
    } else if has(&[
        "error sending request",
        "Connection refused",
        "connection refused",
        "dns error",
        "timed out",
        "tcp connect",
        "client error (Connect)",
    ]) {
        " (the endpoint is unreachable: check AWS_ENDPOINT / the URL and the network)"
    } else if matches!(cause, object_store::Error::PermissionDenied { .. }) {
        " (permission denied: check the store's access rights)"
    } else {
        ""
    }
}

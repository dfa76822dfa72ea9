//! `Store`: an object store reached through a URL, plus a key prefix inside it.
//!
//! Keys handed to and returned by `Store` are relative to the store URL and use `/` between
//! segments (`step-0000000010-g0-ab12cd34ef56/MANIFEST.json`). Writes go through
//! [`Store::put_new`], which never overwrites.

use std::sync::Arc;
use std::time::Duration;

use crate::error::StorageError;
use crate::manifest::HashAlg;
use crate::signing::{ManifestKeys, SignKey, TrustKey};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

/// Downloaded chunks waiting for the hashing thread, at most.
const HASH_QUEUE_CHUNKS: usize = 256;

/// S3 has a hard limit of 10,000 parts per multipart upload.
pub const S3_MAX_PARTS: u64 = 10_000;
/// S3 refuses parts smaller than 5 MiB (except the last one).
pub const S3_MIN_PART_BYTES: u64 = 5 << 20;

/// How a store talks to its backend. The defaults bound every call so that a command against
/// an unreachable endpoint fails in about 12 s rather than after minutes of retries.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreOptions {
    /// TCP connect timeout of one HTTP request (S3 only).
    pub connect_timeout_s: f64,
    /// Timeout of one whole HTTP request, body included (S3 only).
    pub request_timeout_s: f64,
    /// Retries of one failed request (5xx, dropped connection, timeout), S3 only.
    pub max_retries: usize,
    /// No retry starts later than this after a request's first try (S3 only).
    pub retry_window_s: f64,
    /// Objects larger than this are uploaded as multipart uploads; smaller ones with one PUT.
    pub multipart_threshold_bytes: u64,
    /// Smallest multipart part; grown for big objects so no upload needs more than
    /// [`S3_MAX_PARTS`] parts (see [`part_size_for`]).
    pub min_part_bytes: u64,
    /// Parts of one multipart upload in flight at once.
    pub part_concurrency: usize,
    /// Remote objects larger than this are read as parallel ranged GETs of this size; 0
    /// (the default) reads each object with one streamed GET. Ranged reads pay off on real
    /// S3, where one stream is throttled; against moto they are slower (it copies a
    /// multipart object whole for every range), so they are off until measured on the
    /// target store.
    pub range_read_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            connect_timeout_s: 2.0,
            request_timeout_s: 120.0,
            max_retries: 10,
            retry_window_s: 8.0,
            multipart_threshold_bytes: 32 << 20,
            min_part_bytes: 8 << 20,
            part_concurrency: 4,
            range_read_bytes: 0,
        }
    }
}

/// The part size for a multipart upload of `size` bytes: at least `min_part_bytes` (and S3's
/// 5 MiB), grown in whole MiB so that the upload needs at most [`S3_MAX_PARTS`] parts.
pub fn part_size_for(size: u64, min_part_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let needed = size.div_ceil(S3_MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(min_part_bytes).max(S3_MIN_PART_BYTES)
}

/// One object of a store, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modified, ms since the Unix epoch.
    pub modified_unix_ms: u64,
}

/// An object store plus the prefix inside it that this store URL names.
#[derive(Clone, Debug)]
pub struct Store {
    /// The URL the store was opened with (`file:///abs/path`, `memory://`, `s3://bucket/prefix`).
    pub url: String,
    /// The backend.
    inner: Arc<dyn ObjectStore>,
    /// Where this store's keys live inside `inner` (empty for `file://` and `memory://`).
    prefix: Path,
    /// Upload settings.
    options: StoreOptions,
    /// Whether the backend is across a network (S3, or a wrapped store of unknown kind):
    /// large reads then go as parallel ranged GETs, hashed as they arrive.
    remote: bool,
    /// The backend again when it is a local directory (`file://`): a restore then reads
    /// files straight into tensor memory ([`Store::local_file`]).
    local: Option<Arc<LocalFileSystem>>,
    /// Sign committed manifests / accept only signed ones (none by default).
    keys: ManifestKeys,
}

impl Store {
    /// Parse a store URL and build its backend.
    ///
    /// - `file:///abs/path`: a directory on local disk, created if missing; every key is a file
    ///   under it (writes are fsynced).
    /// - `memory://[prefix]`: a fresh in-memory store (nothing is shared between two `open`s).
    /// - `s3://bucket[/prefix]`: S3 or an S3-compatible server, configured from the `AWS_*`
    ///   environment (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, credentials...); region `us-east-1`
    ///   unless the environment names one; path-style requests. Building makes no request.
    ///
    /// Anything else is [`StorageError::BadUrl`]. Uses [`StoreOptions::default`].
    pub fn open(url: &str) -> Result<Store, StorageError> {
        Store::open_with(url, StoreOptions::default())
    }

    /// [`Store::open`] with explicit options.
    pub fn open_with(url: &str, options: StoreOptions) -> Result<Store, StorageError> {
        let bad = |reason: String| StorageError::BadUrl {
            url: url.to_string(),
            reason,
        };
        if url.is_empty() {
            return Err(bad("the URL is empty".into()));
        }
        if let Some(rest) = url.strip_prefix("memory://") {
            let prefix = parse_prefix(rest).map_err(bad)?;
            return Ok(Store {
                url: url.to_string(),
                inner: Arc::new(InMemory::new()),
                prefix,
                options,
                remote: false,
                local: None,
                keys: ManifestKeys::default(),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| {
            bad(format!(
                "not a URL ({e}); for a local directory write file:///abs/path"
            ))
        })?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().map_err(|()| {
                    bad("a file URL needs an absolute path, like file:///abs/path (file://name/.. names a host)".into())
                })?;
                let create = |cause: std::io::Error| StorageError::Create {
                    url: url.to_string(),
                    cause,
                };
                std::fs::create_dir_all(&dir).map_err(create)?;
                let local = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| create(std::io::Error::other(e.to_string())))?
                    .with_fsync(true);
                let local = Arc::new(local);
                Ok(Store {
                    url: url.to_string(),
                    inner: Arc::clone(&local) as Arc<dyn ObjectStore>,
                    prefix: Path::default(),
                    options,
                    remote: false,
                    local: Some(local),
                    keys: ManifestKeys::default(),
                })
            }
            "s3" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(bad("no bucket; write s3://bucket/prefix".into()));
                }
                let prefix = parse_prefix(parsed.path()).map_err(bad)?;
                let secs = |s: f64| Duration::from_secs_f64(s.max(0.001));
                // Timeouts go in as config keys: with_client_options would replace the
                // client settings from_env read (AWS_ALLOW_HTTP among them).
                let ms = |s: f64| format!("{}ms", (s.max(0.001) * 1000.0).round() as u64);
                let mut builder = AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        ms(options.connect_timeout_s),
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        ms(options.request_timeout_s),
                    )
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(2),
                            base: 2.0,
                        },
                        max_retries: options.max_retries,
                        retry_timeout: secs(options.retry_window_s),
                    });
                let region_set = ["AWS_REGION", "AWS_DEFAULT_REGION"]
                    .iter()
                    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
                if !region_set {
                    builder = builder.with_region("us-east-1");
                }
                let s3 = builder
                    .build()
                    .map_err(|e| bad(format!("cannot configure S3: {e}")))?;
                Ok(Store {
                    url: url.to_string(),
                    inner: Arc::new(s3),
                    prefix,
                    options,
                    remote: true,
                    local: None,
                    keys: ManifestKeys::default(),
                })
            }
            other => Err(bad(format!("unsupported scheme {other:?}"))),
        }
    }

    /// Wrap an already-built object store (a test double, a fault-injecting wrapper) under
    /// `prefix` (`""` for none). `url` is only used in messages and checkpoint URLs.
    ///
    /// # Panics
    /// If `prefix` is not a valid object store path (empty segments, `.` or `..`).
    pub fn from_object_store(url: &str, inner: Arc<dyn ObjectStore>, prefix: &str) -> Store {
        let prefix = parse_prefix(prefix)
            .unwrap_or_else(|reason| panic!("Store::from_object_store({url:?}): {reason}"));
        Store {
            url: url.to_string(),
            inner,
            prefix,
            options: StoreOptions::default(),
            remote: true,
            local: None,
            keys: ManifestKeys::default(),
        }
    }

    /// The same store with manifest keys: with `keys.sign`, every manifest committed through
    /// it is signed; with `keys.trust`, verifying or loading a checkpoint through it refuses
    /// a manifest that is not signed by that key ([`StorageError::Untrusted`]). Listing and
    /// pruning do not look at signatures.
    pub fn with_keys(mut self, keys: ManifestKeys) -> Store {
        self.keys = keys;
        self
    }

    /// The key that signs the manifests this store commits, if any.
    pub fn sign_key(&self) -> Option<&SignKey> {
        self.keys.sign.as_deref()
    }

    /// The key a checkpoint's manifest must be signed by to verify or load, if any.
    pub fn trust_key(&self) -> Option<&TrustKey> {
        self.keys.trust.as_deref()
    }

    /// The same store with other upload options (e.g. a small multipart threshold in tests).
    pub fn with_options(mut self, options: StoreOptions) -> Store {
        self.options = options;
        self
    }

    /// The store's options.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend, e.g. to wrap it.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The prefix inside the backend that this store's keys live under.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The same backend, one folder down: `<url>/<name>` (e.g. a daemon job's folder).
    pub fn child(&self, name: &str) -> Result<Store, StorageError> {
        let url = self.url_of(name);
        if !is_plain_segment(name) {
            return Err(StorageError::BadUrl {
                url,
                reason: format!("{name:?} is not a plain folder name"),
            });
        }
        Ok(Store {
            url,
            inner: Arc::clone(&self.inner),
            prefix: self.prefix.clone().join(name),
            options: self.options.clone(),
            remote: self.remote,
            local: self.local.clone(),
            keys: self.keys.clone(),
        })
    }

    /// The URL of a key (or folder) of this store: `<url>/<key>`.
    pub fn url_of(&self, key: &str) -> String {
        if self.url.ends_with('/') {
            format!("{}{key}", self.url)
        } else {
            format!("{}/{key}", self.url)
        }
    }

    /// Whether the backend is across a network (S3, or a wrapped store of unknown kind).
    pub(crate) fn is_remote(&self) -> bool {
        self.remote
    }

    /// The file on local disk that holds `key`, for a `file://` store (`None` for any other):
    /// a restore reads such files straight into tensor memory.
    pub(crate) fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.local
            .as_ref()?
            .path_to_filesystem(&self.path(key))
            .ok()
    }

    /// The backend path of a key (for calling the backend directly, e.g. in benchmarks).
    pub fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.prefix.clone(), |p, seg| p.join(seg))
    }

    fn os_error(&self, op: &str, key: &str, cause: object_store::Error) -> StorageError {
        StorageError::ObjectStore {
            url: self.url.clone(),
            op: format!("{op} {key}"),
            cause,
        }
    }

    /// Write `bytes` to `key` only if nothing is there yet (`PutMode::Create`): an existing key
    /// is [`StorageError::AlreadyExists`] and is left untouched.
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let opts = PutOptions::from(PutMode::Create);
        match self
            .inner
            .put_opts(&self.path(key), bytes.into(), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StorageError::AlreadyExists {
                url: self.url.clone(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.os_error("put", key, e)),
        }
    }

    /// [`Store::put_new`], resolving an unknown outcome by reading back: when the PUT fails
    /// (a lost response, or a retry that found the key taken by the first try), the object is
    /// read; if it holds exactly `bytes` the write happened and this returns `Ok(true)`.
    /// `Ok(false)` is a plain success.
    pub async fn put_new_or_same(&self, key: &str, bytes: Bytes) -> Result<bool, StorageError> {
        match self.put_new(key, bytes.clone()).await {
            Ok(()) => Ok(false),
            Err(put_err) => match self.get(key).await {
                Ok(Some(there)) if there == bytes => Ok(true),
                _ => Err(put_err),
            },
        }
    }

    /// Read a whole object and its `alg` hash (lowercase hex); `Ok(None)` if there is none at
    /// `key`. Local objects are read whole and hashed on a blocking thread. Remote objects
    /// are streamed and hashed chunk by chunk as they arrive, so hashing overlaps the
    /// download; with [`StoreOptions::range_read_bytes`] set, objects larger than it are
    /// read as ranged GETs instead, at most [`StoreOptions::part_concurrency`] in flight.
    ///
    /// `expected_size` (e.g. from a manifest) saves a size request before ranged reads.
    pub async fn get_hashed(
        &self,
        key: &str,
        expected_size: Option<u64>,
        alg: HashAlg,
    ) -> Result<Option<(Bytes, String)>, StorageError> {
        if !self.remote {
            let Some(bytes) = self.get(key).await? else {
                return Ok(None);
            };
            let for_hash = bytes.clone();
            let sha = tokio::task::spawn_blocking(move || alg.hex(&for_hash))
                .await
                .map_err(|e| StorageError::Format {
                    url: self.url.clone(),
                    reason: format!("hashing {key} panicked: {e}"),
                })?;
            return Ok(Some((bytes, sha)));
        }
        let range = self.options.range_read_bytes;
        if range > 0 && expected_size.is_none_or(|n| n > range) {
            return self.get_ranges_hashed(key, range, alg).await;
        }
        let got = match self.inner.get(&self.path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.os_error("get", key, e)),
        };
        let mut buf = bytes::BytesMut::with_capacity(usize::try_from(got.meta.size).unwrap_or(0));
        // A blocking thread hashes the chunks while the download goes on (bounded queue).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(HASH_QUEUE_CHUNKS);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = alg.hasher();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize_hex()
        });
        let mut stream = got.into_stream();
        loop {
            match stream.try_next().await {
                Ok(Some(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.os_error("get", key, e)),
            }
        }
        drop(tx);
        let sha = hasher.await.map_err(|e| StorageError::Format {
            url: self.url.clone(),
            reason: format!("hashing {key} panicked: {e}"),
        })?;
        Ok(Some((buf.freeze(), sha)))
    }

    /// [`Store::get_hashed`] as ranged GETs of `range` bytes, hashed in order.
    async fn get_ranges_hashed(
        &self,
        key: &str,
        range: u64,
        alg: HashAlg,
    ) -> Result<Option<(Bytes, String)>, StorageError> {
        let path = self.path(key);
        let size = match self.inner.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.os_error("head", key, e)),
        };
        let mut buf = bytes::BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut hasher = alg.hasher();
        let path_ref = &path;
        let mut chunks = futures::stream::iter((0..size).step_by(range as usize))
            .map(|start| async move {
                self.inner
                    .get_range(path_ref, start..(start + range).min(size))
                    .await
            })
            .buffered(self.options.part_concurrency.max(1));
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    hasher.update(&chunk);
                    buf.extend_from_slice(&chunk);
                }
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.os_error("get", key, e)),
            }
        }
        Ok(Some((buf.freeze(), hasher.finalize_hex())))
    }

    /// Read a whole object; `Ok(None)` if there is none at `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let got = match self.inner.get(&self.path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.os_error("get", key, e)),
        };
        match got.bytes().await {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.os_error("get", key, e)),
        }
    }

    /// Write a possibly large object: one `PutMode::Create` PUT up to
    /// [`StoreOptions::multipart_threshold_bytes`] (an unknown outcome resolved by reading
    /// back, see [`Store::put_new_or_same`]), a multipart upload above it (parts of
    /// [`part_size_for`], at most [`StoreOptions::part_concurrency`] in flight; aborted on
    /// failure). A multipart upload cannot be conditional, so callers only use this for keys
    /// that nobody else writes (a checkpoint attempt's own folder).
    pub async fn put_large(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let size = bytes.len() as u64;
        if size <= self.options.multipart_threshold_bytes {
            return self.put_new_or_same(key, bytes).await.map(drop);
        }
        let part = part_size_for(size, self.options.min_part_bytes) as usize;
        let path = self.path(key);
        // A multipart upload cannot be conditional: refuse a key that is already there (a
        // racing writer could still slip in between; keys are per attempt, so none does).
        match self.inner.head(&path).await {
            Ok(_) => {
                return Err(StorageError::AlreadyExists {
                    url: self.url.clone(),
                    key: key.to_string(),
                })
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.os_error("head", key, e)),
        }
        let mut upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| self.os_error("start multipart upload of", key, e))?;
        let parts: Vec<_> = (0..bytes.len())
            .step_by(part)
            .map(|start| {
                let end = (start + part).min(bytes.len());
                upload.put_part(PutPayload::from(bytes.slice(start..end)))
            })
            .collect();
        let sent = futures::stream::iter(parts)
            .buffered(self.options.part_concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await;
        let done = match sent {
            Ok(_) => upload.complete().await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            // Best effort: an upload left open costs storage until the bucket's lifecycle rule
            // removes it; it is never visible as an object.
            let _ = upload.abort().await;
            return Err(self.os_error("multipart upload of", key, e));
        }
        Ok(())
    }

    /// Delete one object (deleting a missing one is not an error).
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.os_error("delete", key, e)),
        }
    }

    /// Every key under this store, relative to it, sorted.
    pub async fn list_keys(&self) -> Result<Vec<String>, StorageError> {
        Ok(self
            .list_objects()
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// Every object under this store with its size and time, sorted by key.
    pub async fn list_objects(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        let prefix = (!self.prefix.is_root()).then_some(&self.prefix);
        let metas: Vec<_> = self
            .inner
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.os_error("list", "", e))?;
        let mut objects: Vec<ObjectInfo> = metas
            .iter()
            .filter_map(|m| {
                let rel = m.location.prefix_match(&self.prefix)?;
                let parts: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
                (!parts.is_empty()).then(|| ObjectInfo {
                    key: parts.join("/"),
                    size: m.size,
                    modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }
}

/// A `/`-separated prefix as an object store path (leading and trailing `/` ignored).
fn parse_prefix(prefix: &str) -> Result<Path, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("prefix {trimmed:?} has a . or .. segment"));
    }
    Path::parse(trimmed).map_err(|e| format!("bad prefix {trimmed:?}: {e}"))
}

/// A name usable as one path segment: non-empty, no `/`, not `.` or `..`.
pub(crate) fn is_plain_segment(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && name != "." && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_respect_s3_limits() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        // (object size, min part, expected part size)
        let cases = [
            (0, 8 * MIB, 8 * MIB),
            (100 * MIB, 8 * MIB, 8 * MIB),
            (1, MIB, 5 * MIB),
            (80 * GIB, 8 * MIB, 9 * MIB),
            (5 * 1024 * GIB, 8 * MIB, 525 * MIB),
        ];
        for (size, min, want) in cases {
            let part = part_size_for(size, min);
            assert_eq!(part, want, "size {size}");
            assert!(size.div_ceil(part) <= S3_MAX_PARTS, "size {size}");
            assert!(part >= S3_MIN_PART_BYTES);
        }
    }
}

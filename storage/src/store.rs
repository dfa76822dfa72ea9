//! `Store`: an object store reached through a URL, plus a key prefix inside it.
//!
//! Keys handed to and returned by `Store` are relative to the store URL and use `/` between
//! segments (`step-0000000010-g0-ab12cd34ef56/MANIFEST.json`). Writes go through
//! [`Store::put_new`], which never overwrites.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};

use crate::error::StorageError;

/// An object store plus the prefix inside it that this store URL names.
#[derive(Clone, Debug)]
pub struct Store {
    /// The URL the store was opened with (`file:///abs/path`, `memory://`, `s3://bucket/prefix`).
    pub url: String,
    /// The backend.
    inner: Arc<dyn ObjectStore>,
    /// Where this store's keys live inside `inner` (empty for `file://` and `memory://`).
    prefix: Path,
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
    /// Anything else is [`StorageError::BadUrl`].
    pub fn open(url: &str) -> Result<Store, StorageError> {
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
                Ok(Store {
                    url: url.to_string(),
                    inner: Arc::new(local),
                    prefix: Path::default(),
                })
            }
            "s3" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(bad("no bucket; write s3://bucket/prefix".into()));
                }
                let prefix = parse_prefix(parsed.path()).map_err(bad)?;
                let mut builder = AmazonS3Builder::from_env().with_url(url);
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
        }
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

    /// The backend path of a key.
    fn path(&self, key: &str) -> Path {
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

    /// Every key under this store, relative to it, sorted.
    pub async fn list_keys(&self) -> Result<Vec<String>, StorageError> {
        let prefix = (!self.prefix.is_root()).then_some(&self.prefix);
        let metas: Vec<_> = self
            .inner
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.os_error("list", "", e))?;
        let mut keys: Vec<String> = metas
            .iter()
            .filter_map(|m| {
                let rel = m.location.prefix_match(&self.prefix)?;
                let parts: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
                (!parts.is_empty()).then(|| parts.join("/"))
            })
            .collect();
        keys.sort();
        Ok(keys)
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

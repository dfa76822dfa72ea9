//! An in-process crash point for object stores: [`FaultStore`] wraps any
//! [`ObjectStore`] and, at a chosen [`CrashPoint`], starts failing every call, as if
//! the process using it had died at that moment.
//!
//! Writes are atomic, as on S3: the write that trips a crash point writes nothing
//! (except [`CrashPoint::AfterPut`], which writes and then loses the response). After
//! the crash every call fails with `object_store::Error::Generic { store: "FaultStore",
//! .. }`, including reads, lists, deletes, streams already handed out and multipart
//! uploads already started.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

/// Where a [`FaultStore`] crashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Never: the store only counts bytes.
    Never,
    /// The write (a single put, or a multipart part when it is put) that would take the
    /// cumulative bytes written over this limit fails and writes nothing, as does every
    /// later call.
    AfterBytes(u64),
    /// The first put (single, or multipart complete) whose path contains this string
    /// fails without writing, as does every later call.
    BeforePut(String),
    /// The first put (single, or multipart complete) whose path contains this string is
    /// written, then returns an error (a lost response); every later call fails.
    AfterPut(String),
    /// The first put (single, or multipart complete) whose path contains this string is
    /// written, then returns an error as if its response was lost; the store is not
    /// crashed: later calls (a retry, a read-back) work.
    LoseResponse(String),
}

/// An [`ObjectStore`] that delegates to an inner store until its [`CrashPoint`], and
/// fails every call after it.
///
/// Clones are not provided; share it as `Arc<FaultStore>` (or `Arc<dyn ObjectStore>`).
/// Copies and renames are delegated as they are: they are not puts for the crash
/// points and do not count bytes (but fail after a crash).
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    crash: CrashPoint,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    crashed: AtomicBool,
    /// Whether the one [`CrashPoint::LoseResponse`] has happened.
    response_lost: AtomicBool,
    /// Bytes written (reserved before each write, given back if it fails), and the
    /// reason of the crash once crashed. One lock so that check-and-reserve is atomic.
    inner: Mutex<Accounting>,
}

#[derive(Debug, Default)]
struct Accounting {
    bytes_written: u64,
    reason: Option<String>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Accounting> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// The error every call returns once crashed.
    fn dead(&self) -> object_store::Error {
        let reason = self.lock().reason.clone().unwrap_or_default();
        crash_error(&reason)
    }

    /// Fails if crashed.
    fn check(&self) -> Result<()> {
        if self.crashed() {
            Err(self.dead())
        } else {
            Ok(())
        }
    }

    /// Crashes now (the first reason sticks) and returns the error.
    fn crash_now(&self, reason: String) -> object_store::Error {
        let mut acc = self.lock();
        if acc.reason.is_none() {
            acc.reason = Some(reason);
        }
        self.crashed.store(true, Ordering::SeqCst);
        crash_error(acc.reason.as_deref().unwrap_or_default())
    }

    /// Reserves `len` bytes for a write, or crashes if that would exceed the limit.
    fn reserve(&self, crash: &CrashPoint, len: u64, what: &str) -> Result<()> {
        let mut acc = self.lock();
        if self.crashed() {
            return Err(crash_error(acc.reason.as_deref().unwrap_or_default()));
        }
        let after = acc.bytes_written.saturating_add(len);
        if let CrashPoint::AfterBytes(limit) = crash {
            if after > *limit {
                let reason = format!(
                    "{what} of {len} bytes would take the bytes written from {} over {limit}",
                    acc.bytes_written
                );
                acc.reason = Some(reason.clone());
                self.crashed.store(true, Ordering::SeqCst);
                return Err(crash_error(&reason));
            }
        }
        acc.bytes_written = after;
        Ok(())
    }

    /// Gives back the bytes of a write that failed.
    fn release(&self, len: u64) {
        let mut acc = self.lock();
        acc.bytes_written = acc.bytes_written.saturating_sub(len);
    }
}

fn crash_error(reason: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: format!("injected crash ({reason})").into(),
    }
}

impl FaultStore {
    /// Wraps `inner`, crashing at `crash`.
    pub fn new(inner: Arc<dyn ObjectStore>, crash: CrashPoint) -> FaultStore {
        FaultStore {
            inner,
            crash,
            state: Arc::new(State::default()),
        }
    }

    /// Whether the crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.state.crashed()
    }

    /// Bytes written through this store so far (single puts and multipart parts that
    /// succeeded, or are in flight).
    pub fn bytes_written(&self) -> u64 {
        self.state.lock().bytes_written
    }

    /// The crash point.
    pub fn crash_point(&self) -> &CrashPoint {
        &self.crash
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Wraps a stream so that it fails once the store has crashed.
    fn guard_stream<T: Send + 'static>(
        &self,
        s: BoxStream<'static, Result<T>>,
    ) -> BoxStream<'static, Result<T>> {
        let state = self.state.clone();
        s.map(move |item| {
            state.check()?;
            item
        })
        .boxed()
    }

    fn dead_stream<T: Send + 'static>(&self) -> BoxStream<'static, Result<T>> {
        stream::once(futures::future::ready(Err(self.state.dead()))).boxed()
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({}, {:?})", self.inner, self.crash)
    }
}

/// The crash points before a put (single, or multipart complete) to `location`: fails
/// if crashed, crashes on a matching [`CrashPoint::BeforePut`].
fn before_put(state: &State, crash: &CrashPoint, location: &Path) -> Result<()> {
    state.check()?;
    if let CrashPoint::BeforePut(needle) = crash {
        if location.as_ref().contains(needle.as_str()) {
            return Err(state.crash_now(format!("before put of {location}")));
        }
    }
    Ok(())
}

/// The crash point after a successful put to `location`: a matching
/// [`CrashPoint::AfterPut`] turns the success into a crash.
fn after_put(
    state: &State,
    crash: &CrashPoint,
    location: &Path,
    result: Result<PutResult>,
) -> Result<PutResult> {
    let result = result?;
    match crash {
        CrashPoint::AfterPut(needle) if location.as_ref().contains(needle.as_str()) => {
            Err(state.crash_now(format!("after put of {location}")))
        }
        CrashPoint::LoseResponse(needle)
            if location.as_ref().contains(needle.as_str())
                && !state.response_lost.swap(true, Ordering::SeqCst) =>
        {
            Err(object_store::Error::Generic {
                store: "FaultStore",
                source: format!("injected lost response (put of {location} was written)").into(),
            })
        }
        _ => Ok(result),
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        // A refused put (BeforePut) counts no bytes.
        before_put(&self.state, &self.crash, location)?;
        let len = payload.content_length() as u64;
        self.state
            .reserve(&self.crash, len, &format!("put of {location}"))?;
        let result = self.inner.put_opts(location, payload, opts).await;
        if result.is_err() {
            self.state.release(len);
        }
        after_put(&self.state, &self.crash, location, result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.state.check()?;
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultUpload {
            inner: upload,
            location: location.clone(),
            crash: self.crash.clone(),
            state: self.state.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.state.check()?;
        let mut result = self.inner.get_opts(location, options).await?;
        self.state.check()?;
        result.payload = match result.payload {
            GetResultPayload::Stream(s) => GetResultPayload::Stream(self.guard_stream(s)),
            file @ GetResultPayload::File(..) => file,
        };
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.state.check()?;
        let r = self.inner.get_ranges(location, ranges).await?;
        self.state.check()?;
        Ok(r)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if self.crashed() {
            return self.dead_stream();
        }
        // Paths reaching the inner store after a crash are refused there.
        let state = self.state.clone();
        let gated = locations
            .map(move |p| {
                state.check()?;
                p
            })
            .boxed();
        let out = self.inner.delete_stream(gated);
        self.guard_stream(out)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if self.crashed() {
            return self.dead_stream();
        }
        self.guard_stream(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        if self.crashed() {
            return self.dead_stream();
        }
        self.guard_stream(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.state.check()?;
        let r = self.inner.list_with_delimiter(prefix).await?;
        self.state.check()?;
        Ok(r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.state.check()?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.state.check()?;
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload through a [`FaultStore`]: parts count toward
/// [`CrashPoint::AfterBytes`] when put, `complete` is the put for `BeforePut`/`AfterPut`.
#[derive(Debug)]
struct FaultUpload {
    inner: Box<dyn MultipartUpload>,
    location: Path,
    crash: CrashPoint,
    state: Arc<State>,
}

#[async_trait]
impl MultipartUpload for FaultUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let len = data.content_length() as u64;
        if let Err(e) = self
            .state
            .reserve(&self.crash, len, &format!("part of {}", self.location))
        {
            return Box::pin(futures::future::ready(Err(e)));
        }
        let part = self.inner.put_part(data);
        let state = self.state.clone();
        Box::pin(async move {
            let r = part.await;
            if r.is_err() {
                state.release(len);
            }
            r
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        before_put(&self.state, &self.crash, &self.location)?;
        let result = self.inner.complete().await;
        after_put(&self.state, &self.crash, &self.location, result)
    }

    async fn abort(&mut self) -> Result<()> {
        self.state.check()?;
        self.inner.abort().await
    }
}

//! A seeded, fault-injecting HTTP/1.1 proxy for an S3-compatible server.
//!
//! Put a [`FaultProxy`] between object_store and moto (point `AWS_ENDPOINT` or
//! `AmazonS3Builder::with_endpoint` at [`FaultProxy::endpoint`]) and object_store's own
//! retry logic meets throttling replies, dropped connections and lost responses. Every
//! request gets an index `i` in arrival order; a [`SplitMix64`] derived from
//! `(seed, i)` decides its fate ([`ProxyFaults::decide`]), so the same seed and the
//! same sequence of sequential requests inject the same faults at the same indices.
//!
//! The proxy handles one request per client connection: it reads the request head
//! (at most 64 KiB) and the whole body (`Content-Length` or chunked, at most 1 GiB),
//! sets `Connection: close`, sends it over a new upstream connection, rewrites the
//! response head to `Connection: close` as well and copies the response back until the
//! upstream closes. Requests keep their `Host` header, so signatures stay valid.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenax_core::rng::SplitMix64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// The most client connections served at once; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Timeout of the upstream connect and of every single read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest one client connection (one request) is served before it is cut.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The largest request body accepted (it is buffered in memory).
const MAX_BODY: usize = 1 << 30;
/// The most chunks of a chunked request body.
const MAX_CHUNKS: usize = 1 << 20;
/// The most events [`FaultProxy::history`] keeps (the oldest are dropped first).
const HISTORY_CAP: usize = 100_000;

/// What the proxy injects; the rates are probabilities per request in `[0, 1]`.
///
/// The default injects nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProxyFaults {
    /// Reply with an S3-style error without forwarding (alternately `503 SlowDown` and
    /// `500 InternalError`).
    pub error_rate: f64,
    /// Close the client connection without forwarding the request.
    pub drop_before_rate: f64,
    /// Forward the request, let the server execute it, then close the client connection
    /// without its response (the "lost response" case).
    pub drop_after_rate: f64,
    /// Independently of the above, wait before handling the request.
    pub latency_rate: f64,
    /// The range (inclusive, milliseconds) of that wait, drawn uniformly.
    pub latency_ms: (u64, u64),
}

impl ProxyFaults {
    /// Several faults in flight on one proxy at once (overlapping chaos faults): the
    /// largest of each rate and of each latency bound. Nothing in flight: the default.
    pub fn strongest<'a>(layers: impl IntoIterator<Item = &'a ProxyFaults>) -> ProxyFaults {
        layers
            .into_iter()
            .fold(ProxyFaults::default(), |a, b| ProxyFaults {
                error_rate: a.error_rate.max(b.error_rate),
                drop_before_rate: a.drop_before_rate.max(b.drop_before_rate),
                drop_after_rate: a.drop_after_rate.max(b.drop_after_rate),
                latency_rate: a.latency_rate.max(b.latency_rate),
                latency_ms: (
                    a.latency_ms.0.max(b.latency_ms.0),
                    a.latency_ms.1.max(b.latency_ms.1),
                ),
            })
    }
}

/// What the proxy does with one request, apart from latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Forward it and relay the response.
    Forward,
    /// Reply with an injected S3 error (503 `SlowDown` or 500 `InternalError`).
    Error,
    /// Close the client connection without forwarding.
    DropBefore,
    /// Forward it, then close the client connection without the response.
    DropAfter,
}

/// The fate of one request: [`ProxyFaults::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultDecision {
    /// What happens to the request.
    pub action: FaultAction,
    /// The wait before the action, if latency was injected.
    pub delay: Option<Duration>,
}

impl ProxyFaults {
    /// The fate of request number `index` under `seed`: a pure function, so a test can
    /// predict which requests a [`FaultProxy`] with this seed will hit.
    ///
    /// An error takes precedence over a drop before, which takes precedence over a drop
    /// after; latency is drawn independently. The same five numbers are drawn whatever
    /// the rates, so changing one rate does not reshuffle the others' decisions.
    pub fn decide(&self, seed: u64, index: u64) -> FaultDecision {
        let mut rng = SplitMix64::derive(seed, &format!("tenax-chaos/http-proxy/{index}"));
        let error = rng.next_f64() < self.error_rate;
        let before = rng.next_f64() < self.drop_before_rate;
        let after = rng.next_f64() < self.drop_after_rate;
        let slow = rng.next_f64() < self.latency_rate;
        let (lo, hi) = if self.latency_ms.0 <= self.latency_ms.1 {
            self.latency_ms
        } else {
            (self.latency_ms.1, self.latency_ms.0)
        };
        let span = hi.saturating_sub(lo).saturating_add(1);
        let ms = lo.saturating_add(rng.below(span));
        let action = if error {
            FaultAction::Error
        } else if before {
            FaultAction::DropBefore
        } else if after {
            FaultAction::DropAfter
        } else {
            FaultAction::Forward
        };
        FaultDecision {
            action,
            delay: slow.then(|| Duration::from_millis(ms)),
        }
    }
}

/// Counters of a [`FaultProxy`] since it started.
///
/// Once every request is finished, `requests == forwarded + errors_injected +
/// dropped_before + dropped_after + upstream_failures`. Every counter is updated before
/// the client sees the outcome of its request, so a client that makes one request at a
/// time reads exact values after each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests read completely (each got an index).
    pub requests: u64,
    /// Requests forwarded whose response was relayed to the client (counted when the
    /// upstream's response head arrives, before it is relayed).
    pub forwarded: u64,
    /// Requests answered with an injected error.
    pub errors_injected: u64,
    /// Requests whose client connection was closed without forwarding.
    pub dropped_before: u64,
    /// Requests forwarded and executed whose response was withheld.
    pub dropped_after: u64,
    /// Requests delayed by injected latency (they are also counted by their action).
    pub delayed: u64,
    /// Requests that could not be forwarded because the upstream failed (refused,
    /// timed out, reset); the client got a `502` or a closed connection.
    pub upstream_failures: u64,
}

/// One request as the proxy saw it: [`FaultProxy::history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEvent {
    /// The request's index (arrival order).
    pub index: u64,
    /// The request method, e.g. `PUT`.
    pub method: String,
    /// The request target, e.g. `/bucket/key?partNumber=1`.
    pub target: String,
    /// What the proxy did with it.
    pub action: FaultAction,
    /// The injected status (503 or 500) when `action` is [`FaultAction::Error`].
    pub injected_status: Option<u16>,
    /// The injected wait, if any.
    pub delay: Option<Duration>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    forwarded: AtomicU64,
    errors_injected: AtomicU64,
    dropped_before: AtomicU64,
    dropped_after: AtomicU64,
    delayed: AtomicU64,
    upstream_failures: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    seed: u64,
    faults: Mutex<ProxyFaults>,
    next_index: AtomicU64,
    counters: Counters,
    history: Mutex<VecDeque<ProxyEvent>>,
}

/// A running fault-injecting proxy on `127.0.0.1`; dropping it stops the server and
/// cuts the connections in progress.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("seed", &self.shared.seed)
            .field("faults", &self.faults())
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and serves in a background task, forwarding to `upstream`.
    ///
    /// Must be called inside a tokio runtime (the server task is spawned on the
    /// current one and lives until the proxy is dropped, or the runtime shuts down).
    ///
    /// # Errors
    /// When the port cannot be bound or there is no current tokio runtime.
    pub fn start(upstream: SocketAddr, faults: ProxyFaults, seed: u64) -> io::Result<FaultProxy> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| {
            io::Error::other(format!("FaultProxy::start needs a tokio runtime: {e}"))
        })?;
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _guard = handle.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            upstream,
            seed,
            faults: Mutex::new(faults),
            next_index: AtomicU64::new(0),
            counters: Counters::default(),
            history: Mutex::new(VecDeque::new()),
        });
        let task = handle.spawn(serve(listener, shared.clone()));
        Ok(FaultProxy { addr, shared, task })
    }

    /// The proxy's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's base URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The seed the faults are drawn from.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// The faults in force.
    pub fn faults(&self) -> ProxyFaults {
        *lock(&self.shared.faults)
    }

    /// Replaces the faults; requests read after this call use the new ones (request
    /// indices keep counting, so decisions stay a function of `(seed, index)`).
    pub fn set_faults(&self, faults: ProxyFaults) {
        *lock(&self.shared.faults) = faults;
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ProxyStats {
            requests: get(&c.requests),
            forwarded: get(&c.forwarded),
            errors_injected: get(&c.errors_injected),
            dropped_before: get(&c.dropped_before),
            dropped_after: get(&c.dropped_after),
            delayed: get(&c.delayed),
            upstream_failures: get(&c.upstream_failures),
        }
    }

    /// The requests seen so far, oldest first (the last 100 000).
    pub fn history(&self) -> Vec<ProxyEvent> {
        lock(&self.shared.history).iter().cloned().collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): aborting it aborts them.
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The accept loop: runs until the proxy is dropped (its task is aborted).
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _ = client.set_nodelay(true);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, handle(&shared, client)).await;
        });
    }
}

/// Bytes read from a socket, with a cursor-free API: everything read is kept in `buf`.
struct Incoming<'a> {
    stream: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl Incoming<'_> {
    /// Reads at least one more byte; `Ok(false)` at EOF.
    async fn more(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = with_timeout(self.stream.read(&mut chunk)).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Reads until `buf` holds at least `len` bytes.
    async fn ensure(&mut self, len: usize) -> io::Result<()> {
        if len > MAX_BODY + MAX_HEAD {
            return Err(invalid("request body too large"));
        }
        while self.buf.len() < len {
            if !self.more().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Reads until a `\r\n` at or after `from`; returns the index just past it.
    async fn line_end(&mut self, from: usize) -> io::Result<usize> {
        let mut searched = from;
        loop {
            if let Some(p) = find(&self.buf[searched..], b"\r\n") {
                return Ok(searched + p + 2);
            }
            searched = self.buf.len().saturating_sub(1).max(from);
            if self.buf.len() - from > MAX_HEAD {
                return Err(invalid("line too long"));
            }
            if !self.more().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads until the end of a message head (`\r\n\r\n`); returns its length, or
    /// `None` when the peer closed before sending anything.
    async fn head(&mut self) -> io::Result<Option<usize>> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(p + 4));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("head too large"));
            }
            if !self.more().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }
}

/// A complete request, ready to forward.
struct Request {
    method: String,
    target: String,
    /// The rewritten head, ending in `\r\n\r\n`.
    head: Vec<u8>,
    /// The body exactly as received (chunked framing included).
    body: Vec<u8>,
}

/// Reads one request; `None` when the client closed without sending one.
async fn read_request(client: &mut TcpStream) -> io::Result<Option<Request>> {
    let mut inc = Incoming {
        stream: client,
        buf: Vec::new(),
    };
    let Some(head_len) = inc.head().await? else {
        return Ok(None);
    };
    let head_text = String::from_utf8_lossy(&inc.buf[..head_len - 4]).into_owned();
    inc.buf.drain(..head_len);
    let mut lines = head_text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    if method.is_empty() || target.is_empty() {
        return Err(invalid("malformed request line"));
    }
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut head = format!("{request_line}\r\n");
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "connection" | "proxy-connection" | "keep-alive" => continue,
            "expect" if value.eq_ignore_ascii_case("100-continue") => {
                expect_continue = true;
                continue;
            }
            "content-length" => {
                content_length = value.parse().map_err(|_| invalid("bad Content-Length"))?;
            }
            "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => {
                chunked = true;
            }
            _ => {}
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    if content_length > MAX_BODY {
        return Err(invalid("request body too large"));
    }
    if expect_continue {
        with_timeout(inc.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")).await?;
    }
    let body_len = if chunked {
        chunked_len(&mut inc).await?
    } else {
        inc.ensure(content_length).await?;
        content_length
    };
    inc.buf.truncate(body_len);
    Ok(Some(Request {
        method,
        target,
        head: head.into_bytes(),
        body: inc.buf,
    }))
}

/// Reads a chunked body (chunks, last chunk, trailers) and returns its raw length.
async fn chunked_len(inc: &mut Incoming<'_>) -> io::Result<usize> {
    let mut pos = 0;
    for _ in 0..MAX_CHUNKS {
        let end = inc.line_end(pos).await?;
        let line = String::from_utf8_lossy(&inc.buf[pos..end - 2]).into_owned();
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
        pos = end;
        if size == 0 {
            // Trailers, then an empty line.
            for _ in 0..1024 {
                let end = inc.line_end(pos).await?;
                let empty = end - pos == 2;
                pos = end;
                if empty {
                    return Ok(pos);
                }
            }
            return Err(invalid("too many trailers"));
        }
        if size > MAX_BODY || pos + size > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        inc.ensure(pos + size + 2).await?;
        if &inc.buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(invalid("chunk not followed by CRLF"));
        }
        pos += size + 2;
    }
    Err(invalid("too many chunks"))
}

/// Serves one client connection (one request).
async fn handle(shared: &Shared, mut client: TcpStream) {
    let request = match read_request(&mut client).await {
        Ok(Some(request)) => request,
        // Nothing sent, or garbage: not a request, no index.
        Ok(None) | Err(_) => return,
    };
    let c = &shared.counters;
    let index = shared.next_index.fetch_add(1, Ordering::SeqCst);
    c.requests.fetch_add(1, Ordering::SeqCst);
    let faults = *lock(&shared.faults);
    let decision = faults.decide(shared.seed, index);
    let injected_status = (decision.action == FaultAction::Error).then(|| {
        if c.errors_injected
            .fetch_add(1, Ordering::SeqCst)
            .is_multiple_of(2)
        {
            503
        } else {
            500
        }
    });
    {
        let mut history = lock(&shared.history);
        if history.len() >= HISTORY_CAP {
            history.pop_front();
        }
        history.push_back(ProxyEvent {
            index,
            method: request.method.clone(),
            target: request.target.clone(),
            action: decision.action,
            injected_status,
            delay: decision.delay,
        });
    }
    if let Some(delay) = decision.delay {
        c.delayed.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
    }
    match decision.action {
        FaultAction::Error => {
            let status = injected_status.unwrap_or(503);
            let reply = error_reply(status, request.method == "HEAD");
            let _ = with_timeout(client.write_all(&reply)).await;
            let _ = with_timeout(client.shutdown()).await;
        }
        FaultAction::DropBefore => {
            c.dropped_before.fetch_add(1, Ordering::SeqCst);
            drop(client);
        }
        FaultAction::DropAfter => {
            // Executed once the upstream answered, even if its body was cut.
            match forward(shared, &request, None).await {
                Ok(()) | Err(ForwardError::Relay) => c.dropped_after.fetch_add(1, Ordering::SeqCst),
                Err(ForwardError::Upstream(_)) => {
                    c.upstream_failures.fetch_add(1, Ordering::SeqCst)
                }
            };
            drop(client);
        }
        FaultAction::Forward => {
            // `forwarded` is counted inside, before the response is relayed.
            if let Err(ForwardError::Upstream(e)) =
                forward(shared, &request, Some(&mut client)).await
            {
                c.upstream_failures.fetch_add(1, Ordering::SeqCst);
                let msg = format!("tenax FaultProxy: upstream failed: {e}");
                let reply = s3_error(502, "Bad Gateway", "BadGateway", &msg);
                let _ = with_timeout(client.write_all(&reply)).await;
            }
            let _ = with_timeout(client.shutdown()).await;
        }
    }
}

/// Why forwarding failed: before the upstream's response head arrived (`Upstream`), or
/// after it, while relaying the rest (`Relay`: the request was executed, and the client
/// may hold part of the response).
enum ForwardError {
    Upstream(io::Error),
    Relay,
}

/// Sends `request` over a new upstream connection and reads the response until the
/// upstream closes, relaying it to `client` (with `Connection: close` in its head), or
/// discarding it when `client` is `None`.
async fn forward(
    shared: &Shared,
    request: &Request,
    client: Option<&mut TcpStream>,
) -> Result<(), ForwardError> {
    let up = async {
        let mut upstream = with_timeout(TcpStream::connect(shared.upstream)).await?;
        let _ = upstream.set_nodelay(true);
        with_timeout(upstream.write_all(&request.head)).await?;
        with_timeout(upstream.write_all(&request.body)).await?;
        with_timeout(upstream.flush()).await?;
        let mut inc = Incoming {
            stream: &mut upstream,
            buf: Vec::new(),
        };
        // The response head, rewritten; if there is none (EOF or over 64 KiB), the bytes
        // go through as they are.
        let first = match inc.head().await {
            Ok(Some(len)) => {
                let mut out = rewrite_response_head(&inc.buf[..len]);
                out.extend_from_slice(&inc.buf[len..]);
                out
            }
            Ok(None) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Err(e) if inc.buf.is_empty() => return Err(e),
            Err(_) => std::mem::take(&mut inc.buf),
        };
        Ok::<_, io::Error>((upstream, first))
    };
    let (mut upstream, first) = up.await.map_err(ForwardError::Upstream)?;
    if client.is_some() {
        // Counted before the client can see the response, so that a client that makes
        // requests one after another reads exact counters (the upstream closes its end
        // some milliseconds after the response, which the relay below waits for).
        shared.counters.forwarded.fetch_add(1, Ordering::SeqCst);
    }
    let relay = async {
        let mut client = client;
        if let Some(c) = client.as_deref_mut() {
            with_timeout(c.write_all(&first)).await?;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        // Ends at upstream EOF; each read is bounded by IO_TIMEOUT and the whole
        // connection by CONNECTION_TIMEOUT.
        loop {
            let n = with_timeout(upstream.read(&mut chunk)).await?;
            if n == 0 {
                return Ok(());
            }
            if let Some(c) = client.as_deref_mut() {
                with_timeout(c.write_all(&chunk[..n])).await?;
            }
        }
    };
    relay.await.map_err(|_: io::Error| ForwardError::Relay)
}

/// A response head with its `Connection`/`Keep-Alive` headers replaced by
/// `Connection: close`.
fn rewrite_response_head(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(&head[..head.len() - 4]);
    let mut out = String::with_capacity(head.len() + 20);
    for (i, line) in text.split("\r\n").enumerate() {
        if i > 0 {
            let name = line.split(':').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// The injected reply: 503 `SlowDown` or 500 `InternalError` (no body for `HEAD`).
fn error_reply(status: u16, head_only: bool) -> Vec<u8> {
    let mut reply = if status == 503 {
        s3_error(503, "Slow Down", "SlowDown", "injected by tenax FaultProxy")
    } else {
        s3_error(
            500,
            "Internal Server Error",
            "InternalError",
            "injected by tenax FaultProxy",
        )
    };
    if head_only {
        if let Some(p) = find(&reply, b"\r\n\r\n") {
            reply.truncate(p + 4);
        }
    }
    reply
}

/// A complete S3-style XML error response that closes the connection.
fn s3_error(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Runs an I/O future under [`IO_TIMEOUT`].
async fn with_timeout<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "FaultProxy I/O timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_faults_take_the_strongest_setting() {
        let brownout = ProxyFaults {
            error_rate: 0.18,
            drop_before_rate: 0.06,
            drop_after_rate: 0.06,
            latency_rate: 1.0,
            latency_ms: (100, 200),
        };
        let slow_upload = ProxyFaults {
            latency_rate: 1.0,
            latency_ms: (1500, 1500),
            ..ProxyFaults::default()
        };
        assert_eq!(ProxyFaults::strongest([]), ProxyFaults::default());
        assert_eq!(ProxyFaults::strongest([&brownout]), brownout);
        assert_eq!(
            ProxyFaults::strongest([&brownout, &slow_upload]),
            ProxyFaults {
                latency_ms: (1500, 1500),
                ..brownout
            }
        );
    }

    /// A one-connection-at-a-time upstream that answers every request with `200` and the
    /// raw request bytes it received (head and body) as its body, then closes.
    async fn echo_upstream() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            for _ in 0..16 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                // The proxy half-closes nothing, so read until the request is complete:
                // every test request that gets here ends with one of two markers.
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                for _ in 0..1000 {
                    let n = s.read(&mut chunk).await.unwrap();
                    got.extend_from_slice(&chunk[..n]);
                    if n == 0 || got.ends_with(b"END") || got.ends_with(b"X-Trailer: t\r\n\r\n") {
                        break;
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
                    got.len()
                );
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&got).await.unwrap();
            }
        });
        (addr, task)
    }

    /// Sends raw bytes to the proxy and reads its whole answer.
    async fn exchange(proxy: SocketAddr, request: &[u8], expect_continue: bool) -> String {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        if expect_continue {
            let split = find(request, b"\r\n\r\n").unwrap() + 4;
            s.write_all(&request[..split]).await.unwrap();
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).await.unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            s.write_all(&request[split..]).await.unwrap();
        } else {
            s.write_all(request).await.unwrap();
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn forwards_content_length_chunked_and_expect_continue() {
        let (upstream, _task) = echo_upstream().await;
        let proxy = FaultProxy::start(upstream, ProxyFaults::default(), 0).unwrap();

        let plain = b"PUT /b/k HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: 8\r\n\r\nbody END";
        let out = exchange(proxy.addr(), plain, false).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(
            !out.contains("keep-alive") && !out.contains("Keep-Alive"),
            "{out}"
        );
        assert!(out.contains("PUT /b/k HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\nConnection: close\r\n\r\nbody END"), "{out}");

        let chunked = b"PUT /b/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nEND\r\n0\r\nX-Trailer: t\r\n\r\n";
        let out = exchange(proxy.addr(), chunked, false).await;
        assert!(
            out.ends_with("\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nEND\r\n0\r\nX-Trailer: t\r\n\r\n"),
            "{out}"
        );

        let expect = b"PUT /b/e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\nxx END";
        let out = exchange(proxy.addr(), expect, true).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(!out.contains("Expect"), "{out}");
        assert!(out.ends_with("Connection: close\r\n\r\nxx END"), "{out}");

        let stats = proxy.stats();
        assert_eq!((stats.requests, stats.forwarded), (3, 3), "{stats:?}");
    }

    #[tokio::test]
    async fn injected_errors_alternate_503_and_500() {
        let (upstream, _task) = echo_upstream().await;
        let faults = ProxyFaults {
            error_rate: 1.0,
            ..ProxyFaults::default()
        };
        let proxy = FaultProxy::start(upstream, faults, 3).unwrap();
        let req = b"GET /b/k HTTP/1.1\r\nHost: h\r\n\r\n";
        let first = exchange(proxy.addr(), req, false).await;
        let second = exchange(proxy.addr(), req, false).await;
        assert!(first.starts_with("HTTP/1.1 503 Slow Down\r\n"), "{first}");
        assert!(first.ends_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by tenax FaultProxy</Message></Error>"), "{first}");
        assert!(
            second.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{second}"
        );
        assert!(second.contains("<Code>InternalError</Code>"), "{second}");
        let head = exchange(
            proxy.addr(),
            b"HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n",
            false,
        )
        .await;
        assert!(
            head.ends_with("Connection: close\r\n\r\n"),
            "no body for HEAD: {head}"
        );
        assert_eq!(proxy.stats().errors_injected, 3);
        assert_eq!(proxy.stats().forwarded, 0);
    }

    #[tokio::test]
    async fn dead_upstream_gives_502() {
        // A port that was free a moment ago: nothing listens there.
        let dead = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = FaultProxy::start(dead, ProxyFaults::default(), 0).unwrap();
        let out = exchange(proxy.addr(), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", false).await;
        assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
        assert_eq!(proxy.stats().upstream_failures, 1);
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let err = FaultProxy::start(addr, ProxyFaults::default(), 0).unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }

    #[test]
    fn decisions_follow_the_rates_and_are_pure() {
        let faults = ProxyFaults {
            error_rate: 0.2,
            drop_before_rate: 0.1,
            drop_after_rate: 0.1,
            latency_rate: 0.5,
            latency_ms: (30, 10),
        };
        let n = 20_000;
        let mut errors = 0;
        let mut delayed = 0;
        for i in 0..n {
            let d = faults.decide(5, i);
            assert_eq!(d, faults.decide(5, i));
            errors += u64::from(d.action == FaultAction::Error);
            if let Some(delay) = d.delay {
                delayed += 1;
                assert!((10..=30).contains(&delay.as_millis()), "{delay:?}");
            }
        }
        assert!((errors as f64 / n as f64 - 0.2).abs() < 0.02, "{errors}");
        assert!((delayed as f64 / n as f64 - 0.5).abs() < 0.02, "{delayed}");
        let none = ProxyFaults::default();
        assert!((0..1000).all(|i| none.decide(5, i)
            == FaultDecision {
                action: FaultAction::Forward,
                delay: None
            }));
    }
}

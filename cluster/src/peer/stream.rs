//! The state stream: the `FetchState` transfer as length-prefixed frames on a connection
//! of its own to the donor's peer port, instead of a gRPC stream, because protobuf and
//! HTTP/2 framing cost as much as the copy itself (see BENCHMARKS.md, "State copy
//! throughput").
//!
//! Same port, same authentication: the daemon's listener hands every connection (plain
//! TCP, or TLS after the handshake of [`Tls::incoming`](crate::tls::Tls::incoming)) to
//! [`PeerHub::incoming`], which reads its first 8 bytes. [`STATE_STREAM_MAGIC`] makes it a
//! state stream; anything else (an HTTP/2 client preface) goes on to the gRPC server with
//! those bytes put back ([`Rewind`]). A state stream's request is a [`StateRequest`] and
//! goes through the same checks as over gRPC: the member it claims must be the node its
//! client certificate names (under TLS), then job, generation, receivers, transfer slots,
//! step and hash ([`transfer::admit`]).
//!
//! Wire format (integers little-endian):
//! - client: the magic, a `u32` length (at most [`MAX_REQUEST_BYTES`]), a protobuf
//!   [`StateRequest`];
//! - donor: a status byte (0: accepted, otherwise a gRPC code), a `u32` length and that
//!   many bytes: a protobuf [`StateHeader`](tenax_proto::v1::StateHeader) if accepted, else
//!   the refusal's message;
//! - then frames of a 16-byte head (`u8` kind, `u8` tensor, 2 zero bytes, `u32` length,
//!   `u64` offset in values) and their payload: [`FRAME_DATA`] (little-endian f32 values of
//!   one tensor, at most [`STATE_CHUNK_FLOATS`] of them), then one [`FRAME_END`] whose
//!   payload is the payload checksum ([`PayloadSum`]), or [`FRAME_ABORT`] with a reason
//!   (the donor is shutting down).
//!
//! The requester checks exactly what it checks over gRPC (header, every frame's place,
//! all three tensors complete, the checksum). Both ends move the bytes on a blocking
//! thread with plain (or rustls) blocking I/O and socket timeouts: conversion and
//! checksum are CPU work and stay off the async workers. A frame's bytes are read into
//! one reused buffer and decoded straight into the tensors, the checksum taken while the
//! buffer is in cache, so a received byte is copied twice (kernel to buffer, buffer to
//! tensor) as over a bare socket, instead of five times through HTTP/2 and protobuf.

use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use prost::Message;
use tenax_proto::v1::{StateHeader, StateRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::transport::server::Connected;
use tonic::Code;

use super::hub::{Counters, PeerHub};
use super::transfer::{
    admit, decode_and_sum, encode_and_hash_into, Admitted, PayloadSum, Placement, StateSnapshot,
    TransferError, STATE_CHUNK_FLOATS,
};
use super::PeerAddr;
use crate::tls::PeerIdentity;

/// The first 8 bytes of a state stream (an HTTP/2 connection starts with `PRI * HT`).
pub const STATE_STREAM_MAGIC: [u8; 8] = *b"TNXSTAT1";

/// Largest request a donor reads.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// Longest a donor waits for a new connection's first 8 bytes, and then for the rest of
/// a state stream's request.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest one write of a donor to a state stream may block (a requester that stops
/// reading ends its transfer after this).
pub const DONOR_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections [`PeerHub::incoming`] holds for the gRPC server before it takes them.
const ACCEPT_QUEUE: usize = 64;

/// Frame kind: data of one tensor.
pub const FRAME_DATA: u8 = 1;
/// Frame kind: the end, with the payload checksum.
pub const FRAME_END: u8 = 2;
/// Frame kind: the donor gave up (its reason follows).
pub const FRAME_ABORT: u8 = 3;

/// Most values per tensor a requester reserves before they arrive: a header's parameter
/// count is only the donor's word, so a larger count is reserved as data comes
/// ([`make_room`]), not up front (a header claiming 2^40 values must not make the
/// requester reserve 12 TiB, nor fail a fetch that a cut stream would end anyway).
///
/// 32 MiB per tensor (address space: pages are only committed as values land in them):
/// glibc's allocator may serve a block up to that size from its heap, where growing it
/// copies every value again (a 96 MB state copied 0.69-0.75 as fast as a bare socket
/// with 4 MiB reserved ahead, 0.77-0.90 with the whole state reserved); a larger block is
/// `mmap`ed and grows by moving pages (`mremap`), not bytes.
pub(super) const RESERVE_AHEAD_FLOATS: usize = 8 << 20;

/// Makes room in `values` (a tensor of `n` values, `values.len() + more <= n`) for `more`
/// values: at least doubling its capacity, never past `n`, so that what is reserved is
/// at most twice what came (plus [`RESERVE_AHEAD_FLOATS`]) and a tensor of `n` values
/// ends with a capacity of exactly `n` after about log2(n / RESERVE_AHEAD_FLOATS)
/// reallocations (a large one moves pages with `mremap`, not bytes).
///
/// # Errors
/// The allocator's, when that room cannot be had.
pub(super) fn make_room(
    values: &mut Vec<f32>,
    n: usize,
    more: usize,
) -> Result<(), std::collections::TryReserveError> {
    let need = values.len() + more;
    if need <= values.capacity() {
        return Ok(());
    }
    let want = values.capacity().saturating_mul(2).min(n).max(need);
    values.try_reserve_exact(want - values.len())
}

/// Bytes of a frame head.
const FRAME_HEAD_BYTES: usize = 16;

/// Longest payload of an end or abort frame.
const MAX_TRAILER_BYTES: usize = 64 << 10;

/// A blocking byte stream (a plain or a TLS socket).
pub trait BlockingIo: Read + Write + Send {}
impl<T: Read + Write + Send> BlockingIo for T {}

/// A connection accepted on the peer port that may carry a state stream: plain TCP or
/// TLS over TCP (server side).
pub trait PeerConn: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static {
    /// The identity the client's certificate names: `None` over plain TCP, `Some(None)`
    /// for a certificate that names none of ours.
    fn client_identity(&self) -> Option<Option<PeerIdentity>>;

    /// The same connection as blocking I/O, reads and writes bounded by `timeout`.
    ///
    /// # Errors
    /// The socket's, when it cannot be made blocking.
    fn into_blocking(self, timeout: Duration) -> io::Result<Box<dyn BlockingIo>>;
}

fn blocking_socket(tcp: TcpStream, timeout: Duration) -> io::Result<std::net::TcpStream> {
    let tcp = tcp.into_std()?;
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    Ok(tcp)
}

impl PeerConn for TcpStream {
    fn client_identity(&self) -> Option<Option<PeerIdentity>> {
        None
    }

    fn into_blocking(self, timeout: Duration) -> io::Result<Box<dyn BlockingIo>> {
        Ok(Box::new(blocking_socket(self, timeout)?))
    }
}

impl PeerConn for tokio_rustls::server::TlsStream<TcpStream> {
    fn client_identity(&self) -> Option<Option<PeerIdentity>> {
        let certs = self.get_ref().1.peer_certificates();
        Some(
            certs
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::identity_of_der(c)),
        )
    }

    fn into_blocking(self, timeout: Duration) -> io::Result<Box<dyn BlockingIo>> {
        let (tcp, conn) = self.into_inner();
        let tcp = blocking_socket(tcp, timeout)?;
        Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
    }
}

/// A connection whose first bytes were read to tell a state stream from gRPC, with
/// those bytes put back in front of the rest for the gRPC server.
pub struct Rewind<IO> {
    /// The bytes read ahead.
    prefix: [u8; 8],
    /// How many of `prefix` were handed out again.
    used: usize,
    /// The connection.
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.used < self.prefix.len() {
            let take = (self.prefix.len() - self.used).min(buf.remaining());
            let start = self.used;
            buf.put_slice(&self.prefix[start..start + take]);
            self.used += take;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Rewind<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl PeerHub {
    /// The connections of `conns` (the peer port's, plain or after the TLS handshake)
    /// that are not state streams, for the gRPC server's `serve_with_incoming`; state
    /// streams are served here (see the [module docs](self)). Each connection's first 8
    /// bytes are awaited on its own task (at most [`FIRST_BYTES_TIMEOUT`]; a connection
    /// that sends none is dropped). Ends when the returned stream is dropped or `conns`
    /// ends.
    pub fn incoming<S, IO>(
        &self,
        conns: S,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<Rewind<IO>>>
    where
        S: Stream<Item = io::Result<IO>> + Send + Unpin + 'static,
        IO: PeerConn,
    {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let hub = self.clone();
        tokio::spawn(async move {
            let mut conns = conns;
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    n = conns.next() => n,
                };
                let mut io = match next {
                    None => return,
                    Some(Err(e)) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(io)) => io,
                };
                let (tx, hub) = (tx.clone(), hub.clone());
                tokio::spawn(async move {
                    let mut prefix = [0u8; 8];
                    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, io.read_exact(&mut prefix))
                        .await
                    {
                        Ok(Ok(_)) if prefix == STATE_STREAM_MAGIC => serve_stream(hub, io).await,
                        Ok(Ok(_)) => {
                            let _ = tx
                                .send(Ok(Rewind {
                                    prefix,
                                    used: 0,
                                    inner: io,
                                }))
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "connection closed before its first bytes")
                        }
                        Err(_) => tracing::debug!("connection sent no first bytes in time"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Serves one state stream whose magic was read: reads the request, checks it like a
/// gRPC `FetchState`, and sends the answer on a blocking thread.
async fn serve_stream<IO: PeerConn>(hub: PeerHub, mut io: IO) {
    let request = tokio::time::timeout(FIRST_BYTES_TIMEOUT, async {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REQUEST_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a state request of {len} bytes (at most {MAX_REQUEST_BYTES})"),
            ));
        }
        let mut bytes = vec![0u8; len];
        io.read_exact(&mut bytes).await?;
        StateRequest::decode(&bytes[..]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    })
    .await;
    let req = match request {
        Ok(Ok(req)) => req,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "unreadable state stream request");
            return;
        }
        Err(_) => {
            tracing::info!("state stream request not sent in time");
            return;
        }
    };
    let answer = match hub.check_identity_of(io.client_identity(), Some(&req.from_member)) {
        Ok(_) => admit(&hub, req).await,
        Err(refused) => Err(refused),
    };
    let io = match io.into_blocking(DONOR_WRITE_TIMEOUT) {
        Ok(io) => io,
        Err(e) => {
            tracing::info!(error = %e, "state stream: the socket cannot block");
            return;
        }
    };
    let counters = hub.counters();
    let shutdown = hub.shutdown_token().clone();
    tokio::task::spawn_blocking(move || {
        let result = match answer {
            Ok(admitted) => send_state(io, admitted, &counters, &shutdown),
            Err(status) => send_status(io, status.code(), status.message().as_bytes()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "state stream ended early");
        }
    });
}

fn send_status(mut io: Box<dyn BlockingIo>, code: Code, payload: &[u8]) -> io::Result<()> {
    write_status(&mut io, code, payload)?;
    io.flush()
}

fn write_status(io: &mut dyn BlockingIo, code: Code, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = code as i32 as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    io.write_all(&head)?;
    io.write_all(payload)
}

fn write_frame(
    io: &mut dyn BlockingIo,
    kind: u8,
    tensor: u8,
    offset: u64,
    payload: &[u8],
) -> io::Result<()> {
    let mut head = [0u8; FRAME_HEAD_BYTES];
    head[0] = kind;
    head[1] = tensor;
    head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[8..].copy_from_slice(&offset.to_le_bytes());
    io.write_all(&head)?;
    io.write_all(payload)
}

/// The donor's side of an accepted state stream (blocking thread).
fn send_state(
    mut io: Box<dyn BlockingIo>,
    admitted: Admitted,
    counters: &Counters,
    shutdown: &tokio_util::sync::CancellationToken,
) -> io::Result<()> {
    let started = Instant::now();
    let Admitted {
        published,
        permit,
        chunk_floats,
        to,
    } = admitted;
    let _held = permit;
    let state = &published.state;
    write_status(&mut io, Code::Ok, &state.header().encode_to_vec())?;
    // The checksum only depends on the state: the first transfer computes it.
    let known = published.payload_checksum.get().cloned();
    let mut hasher = PayloadSum::default();
    let mut block = Vec::with_capacity(chunk_floats * 4);
    let mut bytes = 0u64;
    for (t, values) in state.tensors().iter().enumerate() {
        for (k, piece) in values.chunks(chunk_floats).enumerate() {
            if shutdown.is_cancelled() {
                write_frame(&mut io, FRAME_ABORT, 0, 0, b"peer hub is shutting down")?;
                return io.flush();
            }
            encode_and_hash_into(piece, known.is_none().then_some(&mut hasher), &mut block);
            write_frame(
                &mut io,
                FRAME_DATA,
                t as u8,
                (k * chunk_floats) as u64,
                &block,
            )?;
            bytes += block.len() as u64;
            Counters::add(&counters.state_bytes_served, block.len() as u64);
        }
    }
    let sum = known.unwrap_or_else(|| {
        let sum = hasher.finalize();
        let _ = published.payload_checksum.set(sum.clone());
        sum
    });
    write_frame(&mut io, FRAME_END, 0, 0, sum.as_bytes())?;
    io.flush()?;
    published.served.send_modify(|n| *n += 1);
    tracing::info!(
        to = %to,
        generation = published.generation,
        step = state.step,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "state served (stream)"
    );
    Ok(())
}

/// What one [`fetch_stream`] needs.
pub(super) struct StreamFetch {
    /// The donor, `id at host:port` (for messages).
    pub(super) donor: String,
    /// Where to dial it.
    pub(super) peer: PeerAddr,
    /// The TLS material to dial with (the donor's certificate must name `peer.id`).
    pub(super) tls: Option<crate::tls::Tls>,
    /// The request.
    pub(super) request: StateRequest,
    /// The requested step.
    pub(super) want_step: u64,
    /// The requested parameter hash (`""`: any).
    pub(super) want_hash: String,
    /// When the whole fetch must be over.
    pub(super) deadline: Instant,
    /// Bytes received so far, also counted in the hub's counters.
    pub(super) got: Arc<AtomicU64>,
    /// Frames received so far.
    pub(super) chunks: Arc<AtomicU64>,
    /// Bytes expected (`u64::MAX` until the header came).
    pub(super) total: Arc<AtomicU64>,
    /// The hub's counters.
    pub(super) counters: Arc<Counters>,
}

fn err_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl StreamFetch {
    fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Dials the donor (retrying with backoff until the deadline) and sends the request.
    fn connect(&self) -> Result<Box<dyn BlockingIo>, TransferError> {
        let started = Instant::now();
        let failed = |attempts: u32, reason: String| TransferError::Connect {
            donor: self.donor.clone(),
            attempts,
            ms: started.elapsed().as_millis() as u64,
            reason,
        };
        let tls = match &self.tls {
            Some(tls) => Some(
                tls.current()
                    .rustls_client_for_node(&self.peer.id)
                    .map_err(|e| failed(0, e.to_string()))?,
            ),
            None => None,
        };
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let tried = (|| -> io::Result<std::net::TcpStream> {
                let mut last = None;
                for addr in self.peer.addr.to_socket_addrs()? {
                    let timeout = self
                        .left()
                        .clamp(Duration::from_millis(100), Duration::from_secs(5));
                    match std::net::TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| err_other("the address resolves to nothing")))
            })();
            match tried {
                Ok(tcp) => {
                    let setup = (|| -> io::Result<Box<dyn BlockingIo>> {
                        tcp.set_nodelay(true)?;
                        tcp.set_read_timeout(Some(self.left()))?;
                        tcp.set_write_timeout(Some(self.left()))?;
                        let mut io: Box<dyn BlockingIo> = match &tls {
                            Some((config, name)) => {
                                let conn =
                                    rustls::ClientConnection::new(config.clone(), name.clone())
                                        .map_err(err_other)?;
                                Box::new(rustls::StreamOwned::new(conn, tcp))
                            }
                            None => Box::new(tcp),
                        };
                        let req = self.request.encode_to_vec();
                        let mut first = Vec::with_capacity(12 + req.len());
                        first.extend_from_slice(&STATE_STREAM_MAGIC);
                        first.extend_from_slice(&(req.len() as u32).to_le_bytes());
                        first.extend_from_slice(&req);
                        io.write_all(&first)?;
                        io.flush()?;
                        Ok(io)
                    })();
                    // A TLS handshake that fails (a donor of another CA, or one not
                    // named `peer.id`) fails here and is not retried.
                    return setup.map_err(|e| failed(attempt, e.to_string()));
                }
                Err(e) => {
                    if Instant::now() + delay >= self.deadline {
                        return Err(failed(attempt, e.to_string()));
                    }
                    tracing::debug!(donor = %self.donor, attempt, error = %e, "connect failed; retrying");
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// The whole fetch (blocking thread): connect, request, read and check.
    pub(super) fn run(self) -> Result<StateSnapshot, TransferError> {
        // A donor serving its most transfers at once refuses with RESOURCE_EXHAUSTED:
        // ask again (backing off) until the deadline.
        let mut delay = Duration::from_millis(50);
        let (mut io, header) = loop {
            let mut io = self.connect()?;
            let refused = |code: Code, message: String| TransferError::Refused {
                donor: self.donor.clone(),
                code,
                message,
            };
            let mut head = [0u8; 5];
            if let Err(e) = io.read_exact(&mut head) {
                return Err(refused(Code::Unavailable, format!("no answer: {e}")));
            }
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > MAX_REQUEST_BYTES {
                return Err(refused(Code::Internal, format!("an answer of {len} bytes")));
            }
            let mut payload = vec![0u8; len];
            if let Err(e) = io.read_exact(&mut payload) {
                return Err(refused(Code::Unavailable, format!("no answer: {e}")));
            }
            let code = Code::from_i32(i32::from(head[0]));
            if code == Code::Ok {
                let header =
                    StateHeader::decode(&payload[..]).map_err(|e| TransferError::BadHeader {
                        donor: self.donor.clone(),
                        reason: format!("unreadable: {e}"),
                    })?;
                break (io, header);
            }
            let message = String::from_utf8_lossy(&payload).into_owned();
            if code == Code::ResourceExhausted && Instant::now() + delay < self.deadline {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
            return Err(refused(code, message));
        };
        let bad_header = |reason: String| TransferError::BadHeader {
            donor: self.donor.clone(),
            reason,
        };
        if header.step != self.want_step {
            return Err(bad_header(format!(
                "step {}, not the requested step {}",
                header.step, self.want_step
            )));
        }
        if !self.want_hash.is_empty() && header.param_hash != self.want_hash {
            return Err(bad_header(format!(
                "param_hash {}, not the requested {}",
                header.param_hash, self.want_hash
            )));
        }
        let n = usize::try_from(header.num_params)
            .ok()
            .filter(|n| n.checked_mul(12).is_some())
            .ok_or_else(|| bad_header(format!("num_params {} is too large", header.num_params)))?;
        // The count is the donor's word: reserve at most RESERVE_AHEAD_FLOATS values per
        // tensor now, the rest as data arrives (make_room).
        let mut tensors: [Vec<f32>; 3] = Default::default();
        for t in &mut tensors {
            let ahead = n.min(RESERVE_AHEAD_FLOATS);
            t.try_reserve_exact(ahead)
                .map_err(|e| bad_header(format!("cannot hold {ahead} values: {e}")))?;
        }
        self.total.store(n as u64 * 12, Ordering::Relaxed);
        let mut place = Placement::new(n);
        let mut sum = PayloadSum::default();
        let mut block = vec![0u8; STATE_CHUNK_FLOATS.min(n.max(1)) * 4];
        let mut index = 0u64;
        let expected = loop {
            let bad = |reason: String| TransferError::BadChunk {
                donor: self.donor.clone(),
                index,
                reason,
            };
            let broken = |e: io::Error| TransferError::Stream {
                donor: self.donor.clone(),
                got: self.got.load(Ordering::Relaxed),
                code: Code::Unavailable,
                message: e.to_string(),
            };
            let mut head = [0u8; FRAME_HEAD_BYTES];
            io.read_exact(&mut head).map_err(broken)?;
            let (kind, tensor) = (head[0], head[1]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let offset = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
            match kind {
                FRAME_DATA => {
                    self.chunks.fetch_add(1, Ordering::Relaxed);
                    if len > STATE_CHUNK_FLOATS * 4 {
                        return Err(bad(format!(
                            "{len} data bytes (at most {})",
                            STATE_CHUNK_FLOATS * 4
                        )));
                    }
                    place
                        .check(u32::from(tensor), offset, len, false)
                        .map_err(bad)?;
                    if block.len() < len {
                        block.resize(len, 0);
                    }
                    let data = &mut block[..len];
                    io.read_exact(data).map_err(broken)?;
                    let values = &mut tensors[tensor as usize];
                    make_room(values, n, len / 4).map_err(|e| {
                        bad(format!("cannot hold tensor {tensor}'s {n} values: {e}"))
                    })?;
                    decode_and_sum(data, values, &mut sum);
                    self.got.fetch_add(len as u64, Ordering::Relaxed);
                    Counters::add(&self.counters.state_bytes_fetched, len as u64);
                }
                FRAME_END | FRAME_ABORT => {
                    if len > MAX_TRAILER_BYTES {
                        return Err(bad(format!("a trailer of {len} bytes")));
                    }
                    let mut payload = vec![0u8; len];
                    io.read_exact(&mut payload).map_err(broken)?;
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    if kind == FRAME_ABORT {
                        return Err(TransferError::Stream {
                            donor: self.donor.clone(),
                            got: self.got.load(Ordering::Relaxed),
                            code: Code::Unavailable,
                            message: text,
                        });
                    }
                    let _ = offset;
                    place.complete().map_err(bad)?;
                    break text;
                }
                other => return Err(bad(format!("frame kind {other}"))),
            }
            index += 1;
        };
        let actual = sum.finalize();
        if actual != expected {
            return Err(TransferError::Checksum {
                donor: self.donor.clone(),
                expected,
                actual,
            });
        }
        let [params, m, v] = tensors;
        Ok(StateSnapshot {
            step: header.step,
            cursor: header.cursor,
            opt_step: header.opt_step,
            param_hash: header.param_hash,
            params,
            m,
            v,
            guard_state: header.guard_state,
        })
    }
}

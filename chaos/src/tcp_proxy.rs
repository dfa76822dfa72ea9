//! A fault-injecting TCP proxy, for network partitions between local processes.
//!
//! The chaos harness puts one [`TcpFaultProxy`] in front of each daemon's gRPC port (the
//! daemon advertises the proxy's address, so peers connect through it) and one per
//! daemon in front of etcd (the daemon's `--etcd` points at it). Switching a proxy's
//! [`TcpFault`] then cuts a daemon off from its peers and/or from etcd, and heals it:
//! [`TcpFault::Drop`] closes connections (a partition TCP notices), [`TcpFault::Blackhole`]
//! keeps them open but forwards nothing (one it does not), [`TcpFault::Delay`] adds
//! latency. A fault applies to open connections at once, not only to new ones.
//!
//! The proxy runs on its own thread with its own current-thread tokio runtime, so it
//! works the same from synchronous code and from inside any tokio runtime. Every client
//! connection gets one upstream connection and two copy loops (one per direction, a
//! 64 KiB buffer each) that consult the current fault for every chunk they read. The
//! fault lives in a `tokio::sync::watch` channel together with a drop epoch that every
//! [`TcpFault::Drop`] bumps, so connection tasks see each change at once, and a `Drop`
//! followed quickly by `Pass` still closes the connections open before it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

/// The most client connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a new connection waits for an upstream when none is set; then it is closed.
pub const UPSTREAM_WAIT: Duration = Duration::from_secs(10);
/// Timeout of one upstream connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The buffer of each copy loop: the largest chunk forwarded at once.
const BUF_BYTES: usize = 64 * 1024;
/// The longest [`TcpFaultProxy`]'s `drop` waits for its thread to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// What the proxy does to traffic now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFault {
    /// Forward bytes both ways.
    Pass,
    /// Forward, each chunk read held this long before it is written on (both directions).
    Delay {
        /// The hold per chunk, in milliseconds.
        ms: u64,
    },
    /// Close every open connection at once (both sides) and refuse (accept then close
    /// immediately) new ones.
    Drop,
    /// Keep connections open but forward nothing either way (bytes read are discarded,
    /// and end-of-stream is held back); new connections are accepted and hang without
    /// connecting upstream (what their clients send meanwhile stays unread, and is
    /// forwarded once the fault lifts). A network partition that TCP does not notice.
    /// Back to [`TcpFault::Pass`], forwarding resumes on the connections still open.
    Blackhole,
}

impl TcpFault {
    /// Several faults in flight on one proxy at once (overlapping chaos faults): the
    /// strongest, Blackhole over Drop over the longest Delay over Pass.
    pub fn strongest(layers: impl IntoIterator<Item = TcpFault>) -> TcpFault {
        let rank = |f: &TcpFault| match f {
            TcpFault::Pass => (0, 0),
            TcpFault::Delay { ms } => (1, *ms),
            TcpFault::Drop => (2, 0),
            TcpFault::Blackhole => (3, 0),
        };
        layers
            .into_iter()
            .max_by_key(rank)
            .unwrap_or(TcpFault::Pass)
    }
}

/// Counters since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpProxyStats {
    /// Client connections accepted (refused ones under [`TcpFault::Drop`] included).
    pub connections: u64,
    /// Bytes written on to the other side, both directions together.
    pub bytes_forwarded: u64,
    /// Client connections closed by [`TcpFault::Drop`]: open ones it closed and new ones
    /// it refused.
    pub connections_dropped: u64,
}

/// The fault in force and how many times [`TcpFault::Drop`] was set.
#[derive(Clone, Copy, Debug)]
struct FaultState {
    /// What the proxy does now.
    fault: TcpFault,
    /// Bumped by every `set_fault(Drop)`; a connection accepted at epoch `e` is closed as
    /// soon as the epoch is no longer `e`.
    drop_epoch: u64,
}

/// Counters shared by the proxy handle and its tasks.
#[derive(Debug, Default)]
struct Counters {
    /// See [`TcpProxyStats::connections`].
    connections: AtomicU64,
    /// See [`TcpProxyStats::bytes_forwarded`].
    bytes_forwarded: AtomicU64,
    /// See [`TcpProxyStats::connections_dropped`].
    connections_dropped: AtomicU64,
}

/// What a connection task needs: receivers of the control channels and the counters.
#[derive(Clone)]
struct ConnCtx {
    /// The fault in force.
    fault: watch::Receiver<FaultState>,
    /// The upstream, once set.
    upstream: watch::Receiver<Option<SocketAddr>>,
    /// The counters.
    counters: Arc<Counters>,
}

/// A fault-injecting TCP proxy on `127.0.0.1`, running on its own thread.
///
/// Dropping it stops the proxy and closes all its connections.
pub struct TcpFaultProxy {
    /// The address clients connect to.
    addr: SocketAddr,
    /// The fault in force, watched by every connection task.
    fault: watch::Sender<FaultState>,
    /// Where connections go; `None` until set.
    upstream: watch::Sender<Option<SocketAddr>>,
    /// Set to `true` to stop the proxy thread.
    shutdown: watch::Sender<bool>,
    /// The counters.
    counters: Arc<Counters>,
    /// Receives `()` (or disconnects) when the proxy thread has shut its runtime down.
    stopped: mpsc::Receiver<()>,
    /// The proxy thread; taken by `drop`.
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TcpFaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &*self.upstream.borrow())
            .field("fault", &self.fault())
            .field("stats", &self.stats())
            .finish()
    }
}

impl TcpFaultProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `upstream` on a new thread, with
    /// [`TcpFault::Pass`].
    ///
    /// `upstream` may be `None`: connections then wait (up to [`UPSTREAM_WAIT`]) for
    /// [`TcpFaultProxy::set_upstream`], and are closed if it does not come. Works from
    /// synchronous code and from inside a tokio runtime alike.
    ///
    /// # Errors
    /// When the port cannot be bound, or the thread or its runtime cannot be started.
    pub fn start(upstream: Option<SocketAddr>) -> io::Result<TcpFaultProxy> {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (fault_tx, fault_rx) = watch::channel(FaultState {
            fault: TcpFault::Pass,
            drop_epoch: 0,
        });
        let (upstream_tx, upstream_rx) = watch::channel(upstream);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let ctx = ConnCtx {
            fault: fault_rx,
            upstream: upstream_rx,
            counters: counters.clone(),
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let (stopped_tx, stopped_rx) = mpsc::sync_channel::<()>(1);
        let thread = thread::Builder::new()
            .name(format!("tcp-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            let _ = ready_tx.send(Ok(()));
                            serve(listener, ctx, shutdown_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // Dropping the runtime drops every connection task and so its sockets.
                runtime.shutdown_timeout(Duration::from_millis(500));
                let _ = stopped_tx.send(());
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other("TcpFaultProxy thread died while starting"));
            }
        }
        Ok(TcpFaultProxy {
            addr,
            fault: fault_tx,
            upstream: upstream_tx,
            shutdown: shutdown_tx,
            counters,
            stopped: stopped_rx,
            thread: Some(thread),
        })
    }

    /// The address clients connect to (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets where new connections go (and the connections waiting for an upstream);
    /// open connections keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.upstream.send_replace(Some(upstream));
    }

    /// Sets the fault; it applies to open connections at once: [`TcpFault::Drop`] closes
    /// them, [`TcpFault::Blackhole`] stops forwarding on them, and back to
    /// [`TcpFault::Pass`] forwarding resumes on those still open.
    pub fn set_fault(&self, fault: TcpFault) {
        self.fault.send_modify(|state| {
            state.fault = fault;
            if fault == TcpFault::Drop {
                state.drop_epoch += 1;
            }
        });
    }

    /// The fault in force.
    pub fn fault(&self) -> TcpFault {
        self.fault.borrow().fault
    }

    /// The counters so far.
    pub fn stats(&self) -> TcpProxyStats {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        TcpProxyStats {
            connections: get(&self.counters.connections),
            bytes_forwarded: get(&self.counters.bytes_forwarded),
            connections_dropped: get(&self.counters.connections_dropped),
        }
    }
}

impl Drop for TcpFaultProxy {
    /// Stops the proxy and closes all its connections; waits at most about 2 s for the
    /// proxy thread (if it is stuck, it is left to finish on its own).
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        match self.stopped.recv_timeout(SHUTDOWN_WAIT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The accept loop: runs until `shutdown` turns `true` or its sender is gone.
async fn serve(listener: TcpListener, ctx: ConnCtx, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = accept(&listener, &permits) => accepted,
        };
        let Some((client, permit)) = accepted else {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(ACCEPT_RETRY) => continue,
            }
        };
        ctx.counters.connections.fetch_add(1, Ordering::SeqCst);
        let state = *ctx.fault.borrow();
        if state.fault == TcpFault::Drop {
            ctx.counters
                .connections_dropped
                .fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            connection(client, ctx, state.drop_epoch).await;
            drop(permit);
        });
    }
}

/// Waits for a connection slot, then for a client; `None` when `accept` fails.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    let (client, _) = listener.accept().await.ok()?;
    let _ = client.set_nodelay(true);
    Some((client, permit))
}

/// Serves one client connection accepted at drop epoch `epoch`, until both directions
/// end, one fails, or a [`TcpFault::Drop`] closes it.
async fn connection(client: TcpStream, ctx: ConnCtx, epoch: u64) {
    let mut kill = ctx.fault.clone();
    let counters = ctx.counters.clone();
    tokio::select! {
        _ = forward(client, ctx) => {}
        killed = kill.wait_for(|state| state.drop_epoch != epoch) => {
            // `Err`: the proxy is going away, which is no drop fault.
            if killed.is_ok() {
                counters.connections_dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    // Returning drops both sockets, closing both sides.
}

/// Connects upstream (when one is set and the proxy is not blackholing) and copies both
/// ways; `Err` ends the connection.
async fn forward(client: TcpStream, mut ctx: ConnCtx) -> io::Result<()> {
    let upstream = tokio::time::timeout(UPSTREAM_WAIT, ctx.upstream.wait_for(Option::is_some))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no upstream set"))?
        .map_err(|_| io::Error::other("proxy stopped"))?
        .expect("waited for Some");
    ctx.fault
        .wait_for(|state| state.fault != TcpFault::Blackhole)
        .await
        .map_err(|_| io::Error::other("proxy stopped"))?;
    let server = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::try_join!(
        pump(client_read, server_write, ctx.fault.clone(), &ctx.counters),
        pump(server_read, client_write, ctx.fault.clone(), &ctx.counters),
    )?;
    Ok(())
}

/// One direction: reads chunks from `from` and, as the fault in force says, writes them
/// to `to`, holds them first, or discards them. At end of stream, shuts `to` down for
/// writing (once the proxy is not blackholing) and returns `Ok`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut fault: watch::Receiver<FaultState>,
    counters: &Counters,
) -> io::Result<()> {
    let stopped = |_| io::Error::other("proxy stopped");
    let mut buf = vec![0u8; BUF_BYTES];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            fault
                .wait_for(|state| state.fault != TcpFault::Blackhole)
                .await
                .map_err(stopped)?;
            to.shutdown().await?;
            return Ok(());
        }
        let read_at = Instant::now();
        loop {
            let current = fault.borrow_and_update().fault;
            match current {
                TcpFault::Pass => {}
                TcpFault::Blackhole => break,
                TcpFault::Drop => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "dropped"))
                }
                TcpFault::Delay { ms } => {
                    let due = read_at + Duration::from_millis(ms);
                    if Instant::now() < due {
                        // Re-decide when the hold is over or the fault changes.
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            changed = fault.changed() => changed.map_err(stopped)?,
                        }
                        continue;
                    }
                }
            }
            to.write_all(&buf[..n]).await?;
            counters
                .bytes_forwarded
                .fetch_add(n as u64, Ordering::SeqCst);
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TcpFault::{self, *};

    #[test]
    fn overlapping_faults_take_the_strongest() {
        let table: &[(&[TcpFault], TcpFault)] = &[
            (&[], Pass),
            (&[Pass, Delay { ms: 30 }], Delay { ms: 30 }),
            (&[Delay { ms: 30 }, Delay { ms: 100 }], Delay { ms: 100 }),
            (&[Delay { ms: 100 }, Drop], Drop),
            (&[Blackhole, Drop, Pass], Blackhole),
        ];
        for (layers, want) in table {
            assert_eq!(
                TcpFault::strongest(layers.iter().copied()),
                *want,
                "{layers:?}"
            );
        }
    }
}

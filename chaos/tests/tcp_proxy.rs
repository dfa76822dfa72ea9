//! `TcpFaultProxy` over real loopback sockets, in front of a tiny echo server.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tenax_chaos::tcp_proxy::TcpProxyStats;
use tenax_chaos::{TcpFault, TcpFaultProxy};

/// How long a read that should succeed may take before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// An echo server on `127.0.0.1:0`, one thread per connection; lives until the test ends.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to proxy");
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Writes `msg` and reads back exactly as many bytes.
fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).expect("write");
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).expect("read echo");
    got
}

/// Asserts that `stream` was closed by the other side: a read returns 0 or an error
/// other than a timeout, within [`READ_TIMEOUT`].
fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: read {n} bytes from a connection that should be closed"),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            panic!("{what}: still open after {READ_TIMEOUT:?}")
        }
        Err(_) => {}
    }
}

/// Polls `proxy.stats()` until it equals `want` (counters are bumped after the write).
fn wait_for_stats(proxy: &TcpFaultProxy, want: TcpProxyStats) {
    let deadline = Instant::now() + READ_TIMEOUT;
    while proxy.stats() != want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.stats(), want);
}

#[test]
fn pass_echoes_bytes() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    assert_eq!(proxy.fault(), TcpFault::Pass);
    assert!(proxy.addr().ip().is_loopback());
    let mut client = connect(proxy.addr());
    assert_eq!(round_trip(&mut client, b"hello"), b"hello");
    // Larger than one copy buffer.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&mut client, &big), big);
}

#[test]
fn delay_holds_each_chunk() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut client = connect(proxy.addr());
    assert_eq!(round_trip(&mut client, b"warm"), b"warm");
    proxy.set_fault(TcpFault::Delay { ms: 200 });
    assert_eq!(proxy.fault(), TcpFault::Delay { ms: 200 });
    let started = Instant::now();
    assert_eq!(round_trip(&mut client, b"slow"), b"slow");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "round trip took {took:?}"
    );
}

#[test]
fn blackhole_forwards_nothing_until_pass() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut client = connect(proxy.addr());
    assert_eq!(round_trip(&mut client, b"before"), b"before");

    proxy.set_fault(TcpFault::Blackhole);
    client.write_all(b"lost").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected no echo under Blackhole, got {other:?}"),
    }

    proxy.set_fault(TcpFault::Pass);
    client.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // The blackholed bytes were discarded: only the next write comes back.
    assert_eq!(round_trip(&mut client, b"after"), b"after");
}

#[test]
fn blackhole_hangs_new_connections_until_pass() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    proxy.set_fault(TcpFault::Blackhole);
    let mut client = connect(proxy.addr());
    client.write_all(b"early").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected a hanging connection under Blackhole, got {other:?}"),
    }
    assert_eq!(proxy.stats().bytes_forwarded, 0);
    proxy.set_fault(TcpFault::Pass);
    client.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // The connection was never forwarded, so what was sent before is not lost.
    let mut got = [0u8; 5];
    client
        .read_exact(&mut got)
        .expect("echo of the bytes sent while hanging");
    assert_eq!(&got, b"early");
    assert_eq!(round_trip(&mut client, b"after"), b"after");
}

#[test]
fn drop_closes_open_connections_and_refuses_new_ones() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut open = connect(proxy.addr());
    assert_eq!(round_trip(&mut open, b"ping"), b"ping");

    proxy.set_fault(TcpFault::Drop);
    assert_closed(&mut open, "open connection after Drop");

    let mut fresh = connect(proxy.addr());
    assert_closed(&mut fresh, "new connection under Drop");
    wait_for_stats(
        &proxy,
        TcpProxyStats {
            connections: 2,
            bytes_forwarded: 8,
            connections_dropped: 2,
        },
    );

    proxy.set_fault(TcpFault::Pass);
    let mut healed = connect(proxy.addr());
    assert_eq!(round_trip(&mut healed, b"back"), b"back");
}

#[test]
fn drop_then_pass_at_once_still_closes_open_connections() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut open = connect(proxy.addr());
    assert_eq!(round_trip(&mut open, b"ping"), b"ping");
    proxy.set_fault(TcpFault::Drop);
    proxy.set_fault(TcpFault::Pass);
    assert_closed(&mut open, "connection opened before a Drop");
}

#[test]
fn stats_count_connections_and_bytes() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    assert_eq!(proxy.stats(), TcpProxyStats::default());
    let mut a = connect(proxy.addr());
    let mut b = connect(proxy.addr());
    assert_eq!(round_trip(&mut a, b"0123456789"), b"0123456789");
    assert_eq!(round_trip(&mut b, b"abc"), b"abc");
    // Each byte is forwarded twice: to the echo server and back.
    wait_for_stats(
        &proxy,
        TcpProxyStats {
            connections: 2,
            bytes_forwarded: 2 * 13,
            connections_dropped: 0,
        },
    );
}

#[test]
fn set_upstream_after_start() {
    let proxy = TcpFaultProxy::start(None).unwrap();
    let mut client = connect(proxy.addr());
    client.write_all(b"early").unwrap();
    thread::sleep(Duration::from_millis(100));
    proxy.set_upstream(echo_server());
    let mut got = [0u8; 5];
    client
        .read_exact(&mut got)
        .expect("echo after set_upstream");
    assert_eq!(&got, b"early");
}

#[test]
fn dropping_the_proxy_closes_its_connections() {
    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut client = connect(proxy.addr());
    assert_eq!(round_trip(&mut client, b"ping"), b"ping");
    drop(proxy);
    assert_closed(&mut client, "connection after the proxy was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_inside_a_tokio_runtime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let proxy = TcpFaultProxy::start(Some(echo_server())).unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"async").await.unwrap();
    let mut got = [0u8; 5];
    tokio::time::timeout(READ_TIMEOUT, client.read_exact(&mut got))
        .await
        .expect("echo within the timeout")
        .unwrap();
    assert_eq!(&got, b"async");
    proxy.set_fault(TcpFault::Drop);
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(READ_TIMEOUT, client.read(&mut buf))
        .await
        .expect("closed within the timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    drop(proxy);
}

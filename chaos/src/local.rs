//! Helpers shared by the local server launchers ([`crate::moto`], [`crate::etcd`],
//! [`crate::cluster`]): free ports, port attempts, a raw HTTP/1.1 request for health
//! checks, and a log file's tail.

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// How many port choices a launcher tries before giving up.
pub(crate) const PORT_ATTEMPTS: usize = 3;

/// The most bytes read from one raw HTTP response.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Runs `attempt` up to [`PORT_ATTEMPTS`] times: its outer error is fatal, its inner one
/// means "a port could not be bound, try others".
pub(crate) fn with_port_attempts<T>(
    what: &str,
    mut attempt: impl FnMut() -> io::Result<io::Result<T>>,
) -> io::Result<T> {
    let mut last_err = None;
    for _ in 0..PORT_ATTEMPTS {
        match attempt()? {
            Ok(server) => return Ok(server),
            Err(port_err) => last_err = Some(port_err),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other(format!("{what} did not start"))))
}

/// The lowest port [`free_ports`] draws from.
const LOW_PORT: u16 = 10_000;

/// How many random ports [`free_ports`] tries before it falls back to the kernel's.
const PORT_DRAWS: usize = 256;

/// `n` distinct loopback ports that were free a moment ago (all bound at once, then
/// released), for a child process to bind later. They are drawn at random below the
/// kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`) when it leaves
/// room there: every outgoing connection of every process takes its local port from
/// that range, so a port the kernel hands out for `bind(0)` can be taken by a client
/// between its release and the child's bind (a daemon that then cannot listen, seen
/// as a cluster that never forms when tests run in parallel). Falls back to ports the
/// kernel picks.
pub(crate) fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    let mut held: Vec<TcpListener> = Vec::with_capacity(n);
    if let Some(high) = ephemeral_low.filter(|&lo| lo > LOW_PORT.saturating_add(1000)) {
        let span = u64::from(high - LOW_PORT);
        let random = std::collections::hash_map::RandomState::new();
        for draw in 0..PORT_DRAWS {
            if held.len() == n {
                break;
            }
            let mut h = random.build_hasher();
            h.write_usize(draw);
            let port = LOW_PORT + (h.finish() % span) as u16;
            if held
                .iter()
                .any(|l| l.local_addr().is_ok_and(|a| a.port() == port))
            {
                continue;
            }
            if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        held.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?);
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Sends one bodiless HTTP/1.1 request and returns the status code and the whole
/// response (read until the server closes, at most 1 MiB, every step under `timeout`).
pub(crate) fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut buf = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response from {addr}: {text:?}"),
            )
        })?;
    Ok((status, text))
}

/// The last `bytes` bytes of a log file, or a note saying why it cannot be read.
pub(crate) fn log_tail(path: &Path, bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = Vec::new();
        f.take(bytes).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports(5).unwrap();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 5, "{ports:?}");
        for &p in &ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
        if let Some(low) = low.filter(|&l| l > LOW_PORT + 1000) {
            assert!(
                ports.iter().all(|&p| (LOW_PORT..low).contains(&p)),
                "{ports:?}"
            );
        }
    }
}

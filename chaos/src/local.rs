//! Helpers shared by the local server launchers ([`crate::moto`], [`crate::etcd`]):
//! port attempts, a raw HTTP/1.1 request for health checks, and a log file's tail.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
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

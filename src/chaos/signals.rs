//! The signals that stop `tenax chaos run` and `tenax chaos up`.

use anyhow::{Context, Result};

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment this is made (a signal that
/// comes while the run starts its processes is not lost, nor does it kill the harness
/// before they are stopped).
pub(super) struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The next signal's name.
    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

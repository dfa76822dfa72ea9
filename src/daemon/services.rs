//! The node's services under its supervisor (the gRPC server of the peer data plane and
//! the control API, `/metrics`, and the Control actor the control API and the signal
//! handler send requests through), and the signal handler. Each service is restarted
//! on failure by its policy, binding the same address again; a service that keeps
//! failing makes the node leave the job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tenax_actors::{ChildSpec, NodeSupervisor};
use tenax_cluster::peer::{CONNECTION_WINDOW_BYTES, MAX_HTTP2_FRAME_BYTES, STREAM_WINDOW_BYTES};
use tenax_core::restart::RestartPolicy;
use tenax_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::view::Request;
use super::view::{ControlService, Rebind, Shared};

/// How long past SIGTERM's grace period the process is ended even if the node's loop is
/// stuck in a bounded wait.
const GRACE_BACKSTOP: Duration = Duration::from_secs(2);

/// Start the gRPC server on `listener` (bound to `bound`) and `/metrics` on
/// `metrics_listener` under a node supervisor; `shutdown` ends them.
pub(crate) async fn start(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    bound: SocketAddr,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<NodeSupervisor> {
    let policy = RestartPolicy {
        max_restarts: 3,
        window_ms: 60_000,
    };
    let mut services = vec![ChildSpec::service("grpc", policy, {
        let listeners = Arc::new(Rebind::new(listener, bound));
        let shared = shared.clone();
        let token = shutdown.clone();
        Arc::new(move |_run| {
            let listeners = listeners.clone();
            let shared = shared.clone();
            let token = token.clone();
            Box::pin(async move {
                let listener = listeners.listener().await?;
                let control = pb::control_server::ControlServer::new(ControlService {
                    shared: shared.clone(),
                });
                let router = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
                    .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
                    .max_frame_size(MAX_HTTP2_FRAME_BYTES)
                    .add_service(shared.hub.service())
                    .add_service(control);
                // Mutual TLS: each connection's handshake with the certificates current
                // then (SIGHUP reloads them); connections already up keep theirs.
                // Either way the hub takes the state streams off the connections first.
                match shared.hub.tls() {
                    Some(tls) => {
                        let incoming = tls.incoming(listener).map_err(|e| e.to_string())?;
                        let incoming = shared.hub.incoming(incoming);
                        router
                            .serve_with_incoming_shutdown(incoming, token.cancelled())
                            .await
                    }
                    None => {
                        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        let incoming = shared.hub.incoming(incoming);
                        router
                            .serve_with_incoming_shutdown(incoming, token.cancelled())
                            .await
                    }
                }
                .map_err(|e| format!("gRPC server on {bound}: {e}"))
            })
        })
    })];
    if let Some(l) = metrics_listener {
        let addr = l.local_addr().context("metrics address")?;
        let listeners = Arc::new(Rebind::new(l, addr));
        let shared = shared.clone();
        let token = shutdown.clone();
        services.push(ChildSpec::service(
            "metrics",
            policy,
            Arc::new(move |_run| {
                let listeners = listeners.clone();
                let shared = shared.clone();
                let token = token.clone();
                Box::pin(async move {
                    let listener = listeners.listener().await?;
                    let sh = shared.clone();
                    crate::metrics::serve(listener, Arc::new(move || sh.metrics()), token).await;
                    Ok(())
                })
            }),
        ));
    }
    services.push(shared.control.spec());
    let supervisor = NodeSupervisor::start(services)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // A service that keeps failing: leave the job after the current step.
    let mut failed = supervisor.failed();
    tokio::spawn(async move {
        loop {
            let failure = failed.borrow_and_update().clone();
            if let Some(reason) = failure {
                eprintln!("node {}: {reason}: leaving the job", shared.member_id);
                *shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                let _ = shared
                    .requests
                    .send(Request::Drain { checkpoint: false })
                    .await;
                return;
            }
            if failed.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(supervisor)
}

/// SIGTERM/SIGINT: drain with a final checkpoint, bounded by the grace period (the node's
/// machine exits with status 3 when it runs out; this task is the backstop for a loop
/// stuck in a bounded wait past it).
pub(crate) fn on_signals(shared: Arc<Shared>, grace: Duration) {
    on_sighup(shared.clone());
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Through the Control actor; straight to the loop if it cannot take it now.
        if shared.control.request(Request::Sigterm).await.is_err() {
            let _ = shared.requests.send(Request::Sigterm).await;
        }
        tokio::time::sleep(grace + GRACE_BACKSTOP).await;
        eprintln!(
            "error: node {}: the grace period of {} s ran out before the drain finished; exiting",
            shared.member_id,
            grace.as_secs()
        );
        std::process::exit(3);
    });
}

/// SIGHUP: read the TLS certificate files again (a renewed certificate, a rotated CA);
/// new connections use them, connections already up keep theirs. A file that does not
/// load leaves the current material in place.
fn on_sighup(shared: Arc<Shared>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let node = &shared.member_id;
            match shared.hub.tls() {
                None => eprintln!("node {node}: SIGHUP: no TLS settings to reload (--insecure)"),
                Some(tls) => match tls.reload() {
                    Ok(()) => eprintln!(
                        "node {node}: SIGHUP: TLS certificates reloaded from {}",
                        tls.files().cert.display()
                    ),
                    Err(e) => eprintln!(
                        "warning: node {node}: SIGHUP: TLS certificates not reloaded ({e}); the current ones stay"
                    ),
                },
            }
        }
    });
}

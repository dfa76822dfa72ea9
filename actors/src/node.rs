//! The node supervisor of `tenax daemon`: a ractor actor over the node's long-lived
//! services (the gRPC server of the peer data plane and the control API, the `/metrics`
//! endpoint), each run by a child actor, with an explicit restart policy per child.
//!
//! A child whose service fails (or ends on its own) is restarted while its
//! [`RestartPolicy`] allows; one failure more and the supervisor gives up: it reports the
//! reason on [`NodeSupervisor::failed`], and the daemon leaves the job cleanly (after the
//! current step, releasing its lease) and exits non-zero, so that systemd or Kubernetes
//! restart the whole process as a fresh member. No in-process flapping.
//!
//! The trainer (one rank actor per device, see [`crate::Trainer`]) and the membership
//! agent are not restarted in place: the trainer is rebuilt from its last state at every
//! generation, and a lost membership ends the node (a new process rejoins).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tenax_core::restart::{RestartDecision, RestartPolicy, RestartTracker};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ActorsError;

/// What a service task returns: `Err` (or an `Ok` end the supervisor did not ask for) is a
/// failure.
pub type ServiceFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Starts a service; the argument is the start number (0 for the first start, then 1, 2...
/// for restarts), so that a factory can, for example, use a pre-bound listener first and
/// bind again on a restart.
pub type ServiceFactory = Arc<dyn Fn(u32) -> ServiceFuture + Send + Sync>;

/// One supervised service.
#[derive(Clone)]
pub struct ServiceSpec {
    /// Its name, in logs and in the give-up reason.
    pub name: String,
    /// When to restart it.
    pub policy: RestartPolicy,
    /// How to start it.
    pub start: ServiceFactory,
}

impl std::fmt::Debug for ServiceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSpec")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The child actor running one service task.
struct ServiceActor;

struct ServiceArgs {
    name: String,
    start: ServiceFactory,
    run: u32,
}

enum ServiceMsg {
    /// The task ended with this result.
    Ended(Result<(), String>),
}

struct ServiceState {
    name: String,
    task: JoinHandle<()>,
}

impl Actor for ServiceActor {
    type Msg = ServiceMsg;
    type State = ServiceState;
    type Arguments = ServiceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ServiceMsg>,
        args: ServiceArgs,
    ) -> Result<ServiceState, ActorProcessingErr> {
        let fut = (args.start)(args.run);
        let me = myself.clone();
        let task = tokio::spawn(async move {
            let r = fut.await;
            let _ = me.send_message(ServiceMsg::Ended(r));
        });
        Ok(ServiceState {
            name: args.name,
            task,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ServiceMsg>,
        msg: ServiceMsg,
        st: &mut ServiceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServiceMsg::Ended(Ok(())) => {
                Err(format!("service {} ended on its own", st.name).into())
            }
            ServiceMsg::Ended(Err(e)) => Err(format!("service {} failed: {e}", st.name).into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ServiceMsg>,
        st: &mut ServiceState,
    ) -> Result<(), ActorProcessingErr> {
        st.task.abort();
        Ok(())
    }
}

/// Messages of the node supervisor.
enum NodeMsg {
    /// Stop every child, then the supervisor; failures from now on are expected.
    Stop,
}

struct NodeActor;

struct NodeArgs {
    services: Vec<ServiceSpec>,
    failed: watch::Sender<Option<String>>,
    restarts: watch::Sender<u64>,
}

struct NodeState {
    specs: HashMap<String, ServiceSpec>,
    trackers: HashMap<String, RestartTracker>,
    starts: HashMap<String, u32>,
    children: HashMap<ActorId, (String, ActorCell)>,
    epoch: Instant,
    failed: watch::Sender<Option<String>>,
    restarts: watch::Sender<u64>,
    stopping: bool,
}

async fn spawn_child(
    myself: &ActorRef<NodeMsg>,
    st: &mut NodeState,
    name: &str,
) -> Result<(), ActorProcessingErr> {
    let spec = st
        .specs
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no service named {name}"))?;
    let run = st.starts.get(name).copied().unwrap_or(0);
    st.starts.insert(name.to_string(), run + 1);
    let (child, _) = Actor::spawn_linked(
        None,
        ServiceActor,
        ServiceArgs {
            name: spec.name.clone(),
            start: spec.start.clone(),
            run,
        },
        myself.get_cell(),
    )
    .await?;
    st.children
        .insert(child.get_id(), (name.to_string(), child.get_cell()));
    Ok(())
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let mut st = NodeState {
            specs: HashMap::new(),
            trackers: HashMap::new(),
            starts: HashMap::new(),
            children: HashMap::new(),
            epoch: Instant::now(),
            failed: args.failed,
            restarts: args.restarts,
            stopping: false,
        };
        let names: Vec<String> = args.services.iter().map(|s| s.name.clone()).collect();
        for s in args.services {
            st.trackers
                .insert(s.name.clone(), RestartTracker::new(s.policy));
            st.specs.insert(s.name.clone(), s);
        }
        for name in names {
            spawn_child(&myself, &mut st, &name).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Stop => {
                st.stopping = true;
                for (_, (_, cell)) in st.children.drain() {
                    cell.stop(Some("the node stops".into()));
                }
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        evt: SupervisionEvent,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell.get_id(),
                reason.unwrap_or_else(|| "stopped".to_string()),
            ),
            _ => return Ok(()),
        };
        let Some((name, _)) = st.children.remove(&id) else {
            return Ok(());
        };
        if st.stopping {
            return Ok(());
        }
        let now_ms = st.epoch.elapsed().as_millis() as u64;
        let decision = st
            .trackers
            .get_mut(&name)
            .map(|t| t.on_failure(now_ms))
            .unwrap_or(RestartDecision::GiveUp {
                reason: "no restart policy".into(),
            });
        match decision {
            RestartDecision::Restart { attempt } => {
                tracing::warn!(service = %name, attempt, error = %why, "service failed; restarting it");
                st.restarts.send_modify(|n| *n += 1);
                spawn_child(&myself, st, &name).await?;
            }
            RestartDecision::GiveUp { reason } => {
                let msg = format!("service {name} keeps failing ({reason}); last error: {why}");
                tracing::error!(service = %name, "{msg}");
                st.failed.send_replace(Some(msg));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        st.stopping = true;
        for (_, (_, cell)) in st.children.drain() {
            cell.stop(Some("the node stops".into()));
        }
        Ok(())
    }
}

/// The running node supervisor.
pub struct NodeSupervisor {
    actor: ActorRef<NodeMsg>,
    handle: JoinHandle<()>,
    failed: watch::Receiver<Option<String>>,
    restarts: watch::Receiver<u64>,
}

impl NodeSupervisor {
    /// Start every service under one supervisor.
    ///
    /// # Errors
    /// [`ActorsError::Start`] when the supervisor or a first start of a child fails to spawn.
    pub async fn start(services: Vec<ServiceSpec>) -> Result<NodeSupervisor, ActorsError> {
        let (failed_tx, failed) = watch::channel(None);
        let (restarts_tx, restarts) = watch::channel(0);
        let (actor, handle) = Actor::spawn(
            None,
            NodeActor,
            NodeArgs {
                services,
                failed: failed_tx,
                restarts: restarts_tx,
            },
        )
        .await
        .map_err(|e| ActorsError::Start(format!("node supervisor: {e}")))?;
        Ok(NodeSupervisor {
            actor,
            handle,
            failed,
            restarts,
        })
    }

    /// `Some(reason)` once a child failed more often than its policy allows.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    /// Restarts made so far (all children).
    pub fn restarts(&self) -> u64 {
        *self.restarts.borrow()
    }

    /// Stop every child and the supervisor (waits at most 10 s).
    pub async fn shutdown(self) {
        let _ = self.actor.send_message(NodeMsg::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.handle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(max_restarts: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window_ms: 60_000,
        }
    }

    /// A service that fails its first `fail_first` starts at once, then runs until aborted.
    fn flaky(
        name: &str,
        fail_first: u32,
        max_restarts: u32,
        starts: Arc<AtomicU32>,
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            policy: policy(max_restarts),
            start: Arc::new(move |run| {
                starts.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if run < fail_first {
                        return Err(format!("start {run} failed"));
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                })
            }),
        }
    }

    /// The bound of every wait: far above what it takes on a loaded machine, so that
    /// only a hang reaches it.
    const WAIT: Duration = Duration::from_secs(60);

    /// Stops the node and waits until its supervisor has ended. The supervisor handles
    /// one event at a time and a restart starts its child within the handling of the
    /// failure, so every restart decided for a failure seen before now has been made.
    async fn stop_and_join(node: NodeSupervisor) {
        let NodeSupervisor { actor, handle, .. } = node;
        actor.send_message(NodeMsg::Stop).unwrap();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("the node supervisor stops")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_is_restarted_within_its_policy() {
        let starts = Arc::new(AtomicU32::new(0));
        let node = NodeSupervisor::start(vec![flaky("grpc", 2, 2, starts.clone())])
            .await
            .unwrap();
        let mut restarts = node.restarts.clone();
        tokio::time::timeout(WAIT, restarts.wait_for(|&n| n >= 2))
            .await
            .expect("two restarts")
            .unwrap();
        let failed = node.failed();
        stop_and_join(node).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "two failures, two restarts"
        );
        assert_eq!(*restarts.borrow(), 2);
        assert_eq!(*failed.borrow(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_failing_too_often_makes_the_node_give_up() {
        let starts = Arc::new(AtomicU32::new(0));
        let ok_starts = Arc::new(AtomicU32::new(0));
        let node = NodeSupervisor::start(vec![
            flaky("metrics", u32::MAX, 1, starts.clone()),
            flaky("grpc", 0, 1, ok_starts.clone()),
        ])
        .await
        .unwrap();
        let mut failed = node.failed();
        let reason = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(r) = failed.borrow_and_update().clone() {
                    return r;
                }
                failed.changed().await.unwrap();
            }
        })
        .await
        .expect("the supervisor gives up");
        assert!(
            reason.contains("metrics") && reason.contains("2 failure"),
            "{reason}"
        );
        // Once the supervisor has ended, it has handled every failure it saw: a restart
        // after giving up, or of the healthy child, would show in the counts.
        stop_and_join(node).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "one restart, then no more"
        );
        assert_eq!(
            ok_starts.load(Ordering::SeqCst),
            1,
            "the healthy child runs on"
        );
    }
}

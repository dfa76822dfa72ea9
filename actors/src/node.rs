//! The node supervisor: the root of a node's actor tree.
//!
//! Its children are started with `spawn_linked`, each with an explicit [`RestartPolicy`]:
//! - restartable children ([`ChildSpec`]): the node's long-lived services run as actors
//!   (the gRPC server of the peer data plane and the control API, the `/metrics` endpoint,
//!   each a [`ChildSpec::service`]) and the Checkpoint actor ([`crate::Checkpointer`]). One
//!   that fails is started again while its policy allows.
//! - adopted children ([`NodeSupervisor::adopt`]): the trainer of each generation (a
//!   supervisor over one rank actor per device). A trainer is never restarted in place: its
//!   state can only come back from a peer, so the node's machine makes the node leave the
//!   group and rejoin by copying state. The supervisor counts its failures against its
//!   policy all the same.
//!
//! One failure more than a policy allows and the supervisor gives up: it reports the reason
//! on [`NodeSupervisor::failed`], and the daemon leaves the job cleanly (after the current
//! step, releasing its lease) and exits non-zero, so that systemd or Kubernetes restart the
//! whole process as a fresh member. No in-process flapping.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
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

/// Starts a child actor linked to the supervisor given (the second argument; pass it to
/// `Actor::spawn_linked`) and returns its cell; the first argument is the start number.
pub type ActorFactory =
    Arc<dyn Fn(u32, ActorCell) -> BoxFuture<'static, Result<ActorCell, String>> + Send + Sync>;

/// Starts an adopted child once, linked to the supervisor given; returns its cell.
pub type AdoptFactory =
    Box<dyn FnOnce(ActorCell) -> BoxFuture<'static, Result<ActorCell, String>> + Send>;

/// How a restartable child starts.
#[derive(Clone)]
pub enum ChildStart {
    /// A service task, run by a child actor; its end is a failure.
    Service(ServiceFactory),
    /// An actor of its own.
    Actor(ActorFactory),
}

/// One restartable child.
#[derive(Clone)]
pub struct ChildSpec {
    /// Its name, in logs and in the give-up reason.
    pub name: String,
    /// When to restart it.
    pub policy: RestartPolicy,
    /// How to start it.
    pub start: ChildStart,
}

impl ChildSpec {
    /// A child running a service task.
    pub fn service(name: &str, policy: RestartPolicy, start: ServiceFactory) -> Self {
        Self {
            name: name.into(),
            policy,
            start: ChildStart::Service(start),
        }
    }

    /// A child actor.
    pub fn actor(name: &str, policy: RestartPolicy, start: ActorFactory) -> Self {
        Self {
            name: name.into(),
            policy,
            start: ChildStart::Actor(start),
        }
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
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

/// How long a call to the supervisor may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages of the node supervisor.
enum NodeMsg {
    /// Start one more restartable child.
    Add(ChildSpec, RpcReplyPort<Result<(), String>>),
    /// Start an adopted child (not restarted; its failures count against `policy`).
    Adopt {
        name: String,
        policy: RestartPolicy,
        start: AdoptFactory,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Stop every child, then the supervisor; failures from now on are expected.
    Stop,
}

struct NodeActor;

struct NodeArgs {
    children: Vec<ChildSpec>,
    failed: watch::Sender<Option<String>>,
    restarts: watch::Sender<u64>,
    failures: watch::Sender<HashMap<String, u64>>,
}

/// A running child.
struct Running {
    name: String,
    cell: ActorCell,
    /// Started again by its spec when it fails (an adopted child is not).
    restartable: bool,
}

struct NodeState {
    specs: HashMap<String, ChildSpec>,
    trackers: HashMap<String, RestartTracker>,
    starts: HashMap<String, u32>,
    children: HashMap<ActorId, Running>,
    epoch: Instant,
    failed: watch::Sender<Option<String>>,
    restarts: watch::Sender<u64>,
    /// Failures seen so far, by child name.
    failures: watch::Sender<HashMap<String, u64>>,
    stopping: bool,
}

async fn spawn_child(
    myself: &ActorRef<NodeMsg>,
    st: &mut NodeState,
    name: &str,
) -> Result<(), String> {
    let spec = st
        .specs
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no child named {name}"))?;
    let run = st.starts.get(name).copied().unwrap_or(0);
    st.starts.insert(name.to_string(), run + 1);
    let cell = match &spec.start {
        ChildStart::Service(start) => {
            let args = ServiceArgs {
                name: spec.name.clone(),
                start: start.clone(),
                run,
            };
            Actor::spawn_linked(None, ServiceActor, args, myself.get_cell())
                .await
                .map_err(|e| format!("{name}: {e}"))?
                .0
                .get_cell()
        }
        ChildStart::Actor(start) => start(run, myself.get_cell())
            .await
            .map_err(|e| format!("{name}: {e}"))?,
    };
    st.children.insert(
        cell.get_id(),
        Running {
            name: name.to_string(),
            cell,
            restartable: true,
        },
    );
    Ok(())
}

impl NodeState {
    fn stop_children(&mut self) {
        self.stopping = true;
        for (_, c) in self.children.drain() {
            c.cell.stop(Some("the node stops".into()));
        }
    }
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
            failures: args.failures,
            stopping: false,
        };
        let names: Vec<String> = args.children.iter().map(|s| s.name.clone()).collect();
        for s in args.children {
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
            NodeMsg::Add(spec, reply) => {
                let name = spec.name.clone();
                st.trackers
                    .entry(name.clone())
                    .or_insert_with(|| RestartTracker::new(spec.policy));
                st.specs.insert(name.clone(), spec);
                let _ = reply.send(spawn_child(&myself, st, &name).await);
            }
            NodeMsg::Adopt {
                name,
                policy,
                start,
                reply,
            } => {
                st.trackers
                    .entry(name.clone())
                    .or_insert_with(|| RestartTracker::new(policy));
                let started = start(myself.get_cell()).await.map(|cell| {
                    st.children.insert(
                        cell.get_id(),
                        Running {
                            name,
                            cell,
                            restartable: false,
                        },
                    );
                });
                let _ = reply.send(started);
            }
            NodeMsg::Stop => {
                st.stop_children();
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
        let (id, why, failed) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string(), true),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell.get_id(),
                reason.unwrap_or_else(|| "stopped".to_string()),
                false,
            ),
            _ => return Ok(()),
        };
        let Some(child) = st.children.remove(&id) else {
            return Ok(());
        };
        // An adopted child that stops without failing was stopped by its owner.
        if st.stopping || (!child.restartable && !failed) {
            return Ok(());
        }
        let name = child.name;
        st.failures
            .send_modify(|f| *f.entry(name.clone()).or_default() += 1);
        let now_ms = st.epoch.elapsed().as_millis() as u64;
        let decision = st
            .trackers
            .get_mut(&name)
            .map(|t| t.on_failure(now_ms))
            .unwrap_or(RestartDecision::GiveUp {
                reason: "no restart policy".into(),
            });
        match decision {
            RestartDecision::Restart { attempt } if child.restartable => {
                tracing::warn!(child = %name, attempt, error = %why, "child failed; restarting it");
                st.restarts.send_modify(|n| *n += 1);
                if let Err(e) = spawn_child(&myself, st, &name).await {
                    let msg = format!("{name} failed ({why}) and cannot start again: {e}");
                    tracing::error!(child = %name, "{msg}");
                    st.failed.send_replace(Some(msg));
                }
            }
            RestartDecision::Restart { attempt } => {
                tracing::warn!(child = %name, attempt, error = %why, "child failed; its owner replaces it");
            }
            RestartDecision::GiveUp { reason } => {
                let msg = format!("{name} keeps failing ({reason}); last error: {why}");
                tracing::error!(child = %name, "{msg}");
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
        st.stop_children();
        Ok(())
    }
}

/// The running node supervisor.
pub struct NodeSupervisor {
    actor: ActorRef<NodeMsg>,
    handle: JoinHandle<()>,
    failed: watch::Receiver<Option<String>>,
    restarts: watch::Receiver<u64>,
    pub(crate) failures: watch::Receiver<HashMap<String, u64>>,
}

impl NodeSupervisor {
    /// Start the supervisor and its first children.
    ///
    /// # Errors
    /// [`ActorsError::Start`] when the supervisor or a first start of a child fails to spawn.
    pub async fn start(children: Vec<ChildSpec>) -> Result<NodeSupervisor, ActorsError> {
        let (failed_tx, failed) = watch::channel(None);
        let (restarts_tx, restarts) = watch::channel(0);
        let (failures_tx, failures) = watch::channel(HashMap::new());
        let (actor, handle) = Actor::spawn(
            None,
            NodeActor,
            NodeArgs {
                children,
                failed: failed_tx,
                restarts: restarts_tx,
                failures: failures_tx,
            },
        )
        .await
        .map_err(|e| ActorsError::Start(format!("node supervisor: {e}")))?;
        Ok(NodeSupervisor {
            actor,
            handle,
            failed,
            restarts,
            failures,
        })
    }

    /// Start one more restartable child under the supervisor.
    ///
    /// # Errors
    /// [`ActorsError::Start`] when it does not start; [`ActorsError::Stopped`] when the
    /// supervisor is gone.
    pub async fn add(&self, spec: ChildSpec) -> Result<(), ActorsError> {
        let name = spec.name.clone();
        self.ask(&name, |reply| NodeMsg::Add(spec, reply)).await
    }

    /// Start a child that the supervisor watches but does not restart: its owner replaces
    /// it. Its failures (not its ordinary stops) count against `policy`, per `name`, over
    /// every child adopted under that name.
    ///
    /// # Errors
    /// As [`NodeSupervisor::add`].
    pub async fn adopt(
        &self,
        name: &str,
        policy: RestartPolicy,
        start: AdoptFactory,
    ) -> Result<(), ActorsError> {
        self.ask(name, |reply| NodeMsg::Adopt {
            name: name.to_string(),
            policy,
            start,
            reply,
        })
        .await
    }

    /// [`NodeSupervisor::adopt`] for one actor: spawn `actor` with `args`, linked to
    /// the supervisor, and return its handle once it started.
    ///
    /// # Errors
    /// As [`NodeSupervisor::add`].
    pub async fn adopt_actor<A: Actor>(
        &self,
        name: &str,
        policy: RestartPolicy,
        actor: A,
        args: A::Arguments,
    ) -> Result<ActorRef<A::Msg>, ActorsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start: AdoptFactory = Box::new(move |parent| {
            Box::pin(async move {
                let (a, _) = Actor::spawn_linked(None, actor, args, parent)
                    .await
                    .map_err(|e| e.to_string())?;
                let cell = a.get_cell();
                let _ = tx.send(a);
                Ok(cell)
            })
        });
        self.adopt(name, policy, start).await?;
        rx.await
            .map_err(|_| ActorsError::Start(format!("the {name} actor did not start")))
    }

    async fn ask(
        &self,
        name: &str,
        msg: impl FnOnce(RpcReplyPort<Result<(), String>>) -> NodeMsg,
    ) -> Result<(), ActorsError> {
        match self.actor.call(msg, Some(CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r.map_err(ActorsError::Start),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ActorsError::Timeout {
                what: format!("starting {name} under the node supervisor"),
                timeout_s: CALL_TIMEOUT.as_secs(),
            }),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(ActorsError::Stopped(
                format!("node supervisor (starting {name})"),
            )),
        }
    }

    /// `Some(reason)` once a child failed more often than its policy allows.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    /// Restarts made so far (all children).
    pub fn restarts(&self) -> u64 {
        *self.restarts.borrow()
    }

    /// Failures seen so far of the children called `name` (restarted or not).
    pub fn failures_of(&self, name: &str) -> u64 {
        self.failures.borrow().get(name).copied().unwrap_or(0)
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
    fn flaky(name: &str, fail_first: u32, max_restarts: u32, starts: Arc<AtomicU32>) -> ChildSpec {
        ChildSpec::service(
            name,
            policy(max_restarts),
            Arc::new(move |run| {
                starts.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if run < fail_first {
                        return Err(format!("start {run} failed"));
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                })
            }),
        )
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

    /// An actor that fails on its first message.
    struct Brittle;

    impl Actor for Brittle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<()>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<()>,
            _msg: (),
            _st: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("planted failure".into())
        }
    }

    /// Adopt a [`Brittle`] under `name`; returns it.
    async fn adopt_brittle(node: &NodeSupervisor, max_restarts: u32) -> ActorRef<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        node.adopt(
            "trainer",
            policy(max_restarts),
            Box::new(move |parent| {
                Box::pin(async move {
                    let (a, _) = Actor::spawn_linked(None, Brittle, (), parent)
                        .await
                        .map_err(|e| e.to_string())?;
                    let cell = a.get_cell();
                    let _ = tx.send(a);
                    Ok(cell)
                })
            }),
        )
        .await
        .unwrap();
        rx.await.unwrap()
    }

    /// An adopted child is never restarted: its failures are counted against its policy
    /// (its ordinary stops are not), and one failure more than the policy allows makes the
    /// node give up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adopted_children_are_counted_not_restarted() {
        let node = NodeSupervisor::start(Vec::new()).await.unwrap();
        let mut failures = node.failures.clone();
        // Stopped by its owner: not a failure.
        let a = adopt_brittle(&node, 1).await;
        a.stop_and_wait(None, Some(WAIT)).await.unwrap();
        // Fails: counted, not restarted, the node goes on.
        let b = adopt_brittle(&node, 1).await;
        b.cast(()).unwrap();
        tokio::time::timeout(WAIT, failures.wait_for(|f| f.get("trainer") == Some(&1)))
            .await
            .expect("one failure counted")
            .unwrap();
        assert_eq!(node.restarts(), 0, "an adopted child is not restarted");
        assert_eq!(*node.failed().borrow(), None);
        // A second failure within the window: more than 1 allowed restart: give up.
        let c = adopt_brittle(&node, 1).await;
        c.cast(()).unwrap();
        let mut failed = node.failed();
        let why = tokio::time::timeout(WAIT, failed.wait_for(|f| f.is_some()))
            .await
            .expect("the node gives up")
            .unwrap()
            .clone()
            .unwrap();
        assert!(why.contains("trainer keeps failing"), "{why}");
        assert_eq!(node.failures_of("trainer"), 2);
        stop_and_join(node).await;
    }
}

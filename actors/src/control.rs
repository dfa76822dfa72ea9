//! The Control actor: the node's one door for operator requests (the gRPC control API, and
//! SIGTERM). Each request becomes a message to the actor, which hands it to the node's loop
//! on a bounded queue and answers whether it was taken: a full queue refuses the request
//! at once (the operator retries), it never blocks the caller.
//!
//! The actor is a restartable child of the [`NodeSupervisor`] ([`Control::spec`]); the
//! [`Control`] handle always reaches the current one.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tenax_core::restart::RestartPolicy;
use tokio::sync::mpsc;

use crate::node::{ChildSpec, NodeSupervisor};
use crate::ActorsError;

/// How long a request may wait for the actor's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The restart policy of the Control actor: at most 3 restarts within a minute.
pub const CONTROL_POLICY: RestartPolicy = RestartPolicy {
    max_restarts: 3,
    window_ms: 60_000,
};

/// A message to the Control actor.
pub struct ControlMsg<R> {
    request: R,
    reply: RpcReplyPort<Result<(), String>>,
}

struct ControlActor<R>(PhantomData<fn() -> R>);

impl<R: Send + 'static> Actor for ControlActor<R> {
    type Msg = ControlMsg<R>;
    type State = Arc<Door<R>>;
    type Arguments = Arc<Door<R>>;

    async fn pre_start(
        &self,
        myself: ActorRef<ControlMsg<R>>,
        door: Arc<Door<R>>,
    ) -> Result<Arc<Door<R>>, ActorProcessingErr> {
        *door.actor.lock().unwrap_or_else(|p| p.into_inner()) = Some(myself);
        Ok(door)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ControlMsg<R>>,
        msg: ControlMsg<R>,
        door: &mut Arc<Door<R>>,
    ) -> Result<(), ActorProcessingErr> {
        let taken = door.node.try_send(msg.request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => format!(
                "the node has {} requests waiting already: try again after its next step",
                door.node.max_capacity()
            ),
            mpsc::error::TrySendError::Closed(_) => "the node is shutting down".to_string(),
        });
        let _ = msg.reply.send(taken);
        Ok(())
    }
}

/// What the handle and every start of the actor share.
struct Door<R> {
    /// The node's loop.
    node: mpsc::Sender<R>,
    /// The running actor (replaced at each restart).
    actor: Mutex<Option<ActorRef<ControlMsg<R>>>>,
}

/// The handle that request sources use (cheap to clone).
pub struct Control<R> {
    door: Arc<Door<R>>,
}

impl<R> Clone for Control<R> {
    fn clone(&self) -> Self {
        Self {
            door: Arc::clone(&self.door),
        }
    }
}

impl<R: Send + 'static> Control<R> {
    /// A handle whose requests go to `node`; the actor starts when the supervisor starts
    /// [`Control::spec`].
    pub fn new(node: mpsc::Sender<R>) -> Self {
        Self {
            door: Arc::new(Door {
                node,
                actor: Mutex::new(None),
            }),
        }
    }

    /// The actor, as a restartable child of the node supervisor, named `control`.
    pub fn spec(&self) -> ChildSpec {
        let door = Arc::clone(&self.door);
        ChildSpec::actor(
            "control",
            CONTROL_POLICY,
            Arc::new(move |_run, parent| {
                let door = Arc::clone(&door);
                Box::pin(async move {
                    let (a, _) = Actor::spawn_linked(None, ControlActor(PhantomData), door, parent)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(a.get_cell())
                })
            }),
        )
    }

    /// Start the actor under `node`.
    ///
    /// # Errors
    /// As [`NodeSupervisor::add`].
    pub async fn start_under(&self, node: &NodeSupervisor) -> Result<(), ActorsError> {
        node.add(self.spec()).await
    }

    /// Hand `request` to the node's loop; `Err` says why it was refused.
    ///
    /// # Errors
    /// [`ActorsError::Rank`] with the reason when the node refuses it (queue full, shutting
    /// down); [`ActorsError::Stopped`] or [`ActorsError::Timeout`] when the actor does not
    /// answer (it is being restarted: try again).
    pub async fn request(&self, request: R) -> Result<(), ActorsError> {
        let actor = self
            .door
            .actor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| ActorsError::Stopped("the control actor has not started".into()))?;
        let call = actor.call(|reply| ControlMsg { request, reply }, Some(CALL_TIMEOUT));
        match call.await {
            Ok(ractor::rpc::CallResult::Success(r)) => r.map_err(ActorsError::Rank),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ActorsError::Timeout {
                what: "the control actor".into(),
                timeout_s: CALL_TIMEOUT.as_secs(),
            }),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(ActorsError::Stopped(
                "the control actor is restarting: try again".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_reach_the_node_in_order_and_a_full_queue_refuses_at_once() {
        let (tx, mut rx) = mpsc::channel::<u32>(2);
        let control = Control::new(tx);
        assert!(
            control.request(0).await.is_err(),
            "no actor yet: refused, not blocked"
        );
        let node = NodeSupervisor::start(vec![control.spec()]).await.unwrap();
        control.request(1).await.unwrap();
        control.request(2).await.unwrap();
        let full = control.request(3).await;
        assert!(
            matches!(&full, Err(ActorsError::Rank(why)) if why.contains("2 requests waiting")),
            "{full:?}"
        );
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        control.request(4).await.unwrap();
        assert_eq!(rx.recv().await, Some(4));
        drop(rx);
        let closed = control.request(5).await;
        assert!(
            matches!(&closed, Err(ActorsError::Rank(why)) if why.contains("shutting down")),
            "{closed:?}"
        );
        node.shutdown().await;
    }
}

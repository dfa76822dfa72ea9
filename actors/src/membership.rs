//! The Membership actor: it owns the node's registration in the job (a
//! [`tenax_cluster::member::Member`]: etcd lease and keep-alive, member key, election,
//! plans) and is the one place the node's shell talks to it through: suspicions, fenced
//! record writes, leaving, and a fresh registration replacing a lost one are messages.
//!
//! Each message that depends on a generation carries it: a suspicion from an older
//! generation than the newest plan seen is dropped, and a record write is fenced in etcd
//! on its generation. Plans and the member's state reach the shell on watch channels
//! (the newest value wins); the leader flag and counters are published every second.
//!
//! The actor is adopted by the [`NodeSupervisor`] under the name `membership`: if it fails,
//! its registration goes with it (the lease is no longer kept alive), the shell sees the
//! state channel close and registers again, and [`Membership::replace`] starts a new actor;
//! more failures than [`MEMBERSHIP_POLICY`] allows make the node give up.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tenax_cluster::etcd::{FenceOutcome, LeaseState};
use tenax_cluster::member::{Member, MemberState};
use tenax_core::membership::{MemberId, Plan};
use tenax_core::restart::RestartPolicy;
use tokio::sync::watch;

use crate::node::NodeSupervisor;
use crate::ActorsError;

/// The restart policy of the Membership actor: at most 3 failures within 10 minutes.
pub const MEMBERSHIP_POLICY: RestartPolicy = RestartPolicy {
    max_restarts: 3,
    window_ms: 600_000,
};

/// How often the leader flag and counters are published.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// The longest a call to the actor may take (a record write or leaving is bounded by its
/// caller below this).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The registration's figures, as last published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberStats {
    /// This node leads the job.
    pub leader: bool,
    /// Liveness probes sent, over every registration of this process.
    pub probes_sent: u64,
    /// Leases revoked as leader, over every registration of this process.
    pub revocations: u64,
}

enum Msg {
    /// Report a suspect seen in `generation`.
    Suspect {
        generation: u64,
        member: MemberId,
        why: String,
    },
    /// Write `value` at the job's `key`, fenced on `generation` and this node's lease.
    Commit {
        generation: u64,
        key: String,
        value: Vec<u8>,
        reply: RpcReplyPort<Result<FenceOutcome, String>>,
    },
    /// Leave the job (revoke the lease); the registration stays until replaced.
    Leave(RpcReplyPort<Result<(), String>>),
    /// A fresh registration replaces the current one.
    Swap(Box<Member>, RpcReplyPort<()>),
    /// This node's checkpoint record etcd has not taken, by generation, for the
    /// leader's planner ([`Member::set_record_pending`]); kept across registrations.
    RecordPending(Option<u64>),
    /// Leave and stop.
    Shutdown(RpcReplyPort<Result<(), String>>),
    /// Publish the figures.
    Publish,
}

struct MembershipActor;

struct State {
    member: Option<Member>,
    stats: Arc<watch::Sender<MemberStats>>,
    /// Counters of earlier registrations.
    base: (u64, u64),
    /// The last [`Msg::RecordPending`], handed to each new registration.
    record_pending: Option<u64>,
}

impl State {
    fn publish(&self) {
        if let Some(m) = &self.member {
            self.stats.send_replace(MemberStats {
                leader: m.is_leader(),
                probes_sent: self.base.0 + m.probes_sent(),
                revocations: self.base.1 + m.revocations(),
            });
        }
    }
}

impl Actor for MembershipActor {
    type Msg = Msg;
    type State = State;
    type Arguments = (Member, Arc<watch::Sender<MemberStats>>);

    async fn pre_start(
        &self,
        myself: ActorRef<Msg>,
        (member, stats): Self::Arguments,
    ) -> Result<State, ActorProcessingErr> {
        let last = *stats.borrow();
        myself.send_interval(STATS_EVERY, || Msg::Publish);
        let st = State {
            member: Some(member),
            stats,
            base: (last.probes_sent, last.revocations),
            record_pending: None,
        };
        st.publish();
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        st: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Suspect {
                generation,
                member,
                why,
            } => {
                if let Some(m) = &st.member {
                    // A report from an older generation than the newest plan is stale.
                    if m.generation().is_none_or(|g| g <= generation) {
                        m.suspect(member, why);
                    }
                }
            }
            Msg::Commit {
                generation,
                key,
                value,
                reply,
            } => match &st.member {
                Some(m) => {
                    // The write waits on etcd: off the actor, which stays free.
                    let (etcd, writer) = (m.etcd().clone(), m.writer().clone());
                    tokio::spawn(async move {
                        let r = etcd.fenced_put(&key, &value, generation, &writer).await;
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    });
                }
                None => {
                    let _ = reply.send(Err("this node has no registration".into()));
                }
            },
            Msg::Leave(reply) => {
                let r = match st.member.as_mut() {
                    Some(m) => m.leave().await.map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let _ = reply.send(r);
            }
            Msg::Swap(fresh, reply) => {
                st.publish();
                let last = *st.stats.borrow();
                st.base = (last.probes_sent, last.revocations);
                fresh.set_record_pending(st.record_pending);
                if let Some(old) = st.member.replace(*fresh) {
                    tokio::spawn(async move {
                        if let Err(e) = old.shutdown().await {
                            eprintln!("note: releasing the old registration: {e}");
                        }
                    });
                }
                st.publish();
                let _ = reply.send(());
            }
            Msg::RecordPending(generation) => {
                st.record_pending = generation;
                if let Some(m) = &st.member {
                    m.set_record_pending(generation);
                }
            }
            Msg::Shutdown(reply) => {
                st.publish();
                let r = match st.member.take() {
                    Some(m) => m.shutdown().await.map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let _ = reply.send(r);
                myself.stop(None);
            }
            Msg::Publish => st.publish(),
        }
        Ok(())
    }
}

/// The shell's handle to the Membership actor.
pub struct Membership {
    actor: ActorRef<Msg>,
    id: MemberId,
    plans: watch::Receiver<Option<Plan>>,
    state: watch::Receiver<MemberState>,
    lease: watch::Receiver<LeaseState>,
    stats: Arc<watch::Sender<MemberStats>>,
    /// The pending-record generation last sent to the actor (`None`: nothing sent to
    /// this actor yet), so that an unchanged value costs no message.
    record_sent: std::sync::Mutex<Option<Option<u64>>>,
}

impl Membership {
    /// Start the actor over `member`, adopted by `node`.
    ///
    /// # Errors
    /// As [`NodeSupervisor::adopt`].
    pub async fn start_under(node: &NodeSupervisor, member: Member) -> Result<Self, ActorsError> {
        let stats = Arc::new(watch::channel(MemberStats::default()).0);
        Self::spawn(node, member, stats).await
    }

    async fn spawn(
        node: &NodeSupervisor,
        member: Member,
        stats: Arc<watch::Sender<MemberStats>>,
    ) -> Result<Self, ActorsError> {
        let (id, plans, state, lease) = (
            member.id().clone(),
            member.plan_receiver(),
            member.state_receiver(),
            member.lease_state_receiver(),
        );
        let args = (member, Arc::clone(&stats));
        let actor = node
            .adopt_actor("membership", MEMBERSHIP_POLICY, MembershipActor, args)
            .await?;
        Ok(Self {
            actor,
            id,
            plans,
            state,
            lease,
            stats,
            record_sent: std::sync::Mutex::new(None),
        })
    }

    /// This node's member id.
    pub fn id(&self) -> &MemberId {
        &self.id
    }

    /// The plans this registration sees (the newest wins).
    pub fn plan_receiver(&self) -> watch::Receiver<Option<Plan>> {
        self.plans.clone()
    }

    /// The newest plan seen.
    pub fn current_plan(&self) -> Option<Plan> {
        self.plans.borrow().clone()
    }

    /// The registration's state.
    pub fn state_receiver(&self) -> watch::Receiver<MemberState> {
        self.state.clone()
    }

    /// The lease keep-alive's view of etcd (see [`Member::lease_state_receiver`]).
    pub fn lease_state_receiver(&self) -> watch::Receiver<LeaseState> {
        self.lease.clone()
    }

    /// The figures as last published (at most a second old).
    pub fn stats(&self) -> MemberStats {
        *self.stats.borrow()
    }

    /// Report `member` as a suspect, seen in `generation` (dropped if stale).
    pub fn suspect(&self, generation: u64, member: MemberId, why: String) {
        let _ = self.actor.cast(Msg::Suspect {
            generation,
            member,
            why,
        });
    }

    /// The generation of this node's checkpoint record that etcd has not taken (`None`:
    /// none), for the leader's planner: a leader does not write the plan of g+1 while its
    /// own record of g is pending (see [`Member::set_record_pending`]). Sent to the actor
    /// only when it changes.
    pub fn set_record_pending(&self, generation: Option<u64>) {
        let mut sent = self
            .record_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *sent != Some(generation) {
            *sent = Some(generation);
            let _ = self.actor.cast(Msg::RecordPending(generation));
        }
    }

    /// Write `value` at the job's `key`, fenced on `generation` and this node's lease.
    ///
    /// # Errors
    /// A string naming the failure (etcd's, or the actor's absence).
    pub async fn fenced_commit_in(
        &self,
        generation: u64,
        key: &str,
        value: &[u8],
    ) -> Result<FenceOutcome, String> {
        let key = key.to_string();
        let value = value.to_vec();
        let msg = |reply| Msg::Commit {
            generation,
            key,
            value,
            reply,
        };
        self.call(msg).await?
    }

    /// Leave the job (revoke the lease).
    ///
    /// # Errors
    /// The revocation's failure (the lease then expires after its TTL).
    pub async fn leave(&self) -> Result<(), String> {
        self.call(Msg::Leave).await?
    }

    /// A fresh registration replaces the current one (the old one is released in the
    /// background). A new actor is started if the old one failed.
    ///
    /// # Errors
    /// As [`NodeSupervisor::adopt`], when a new actor must start and cannot.
    pub async fn replace(
        &mut self,
        fresh: Member,
        node: &NodeSupervisor,
    ) -> Result<(), ActorsError> {
        let (plans, state, lease) = (
            fresh.plan_receiver(),
            fresh.state_receiver(),
            fresh.lease_state_receiver(),
        );
        if self.actor.get_status() == ractor::ActorStatus::Running {
            let fresh = Box::new(fresh);
            if self
                .actor
                .call(|reply| Msg::Swap(fresh, reply), Some(CALL_TIMEOUT))
                .await
                .is_ok_and(|r| r.is_success())
            {
                self.plans = plans;
                self.state = state;
                self.lease = lease;
                return Ok(());
            }
            return Err(ActorsError::Stopped(
                "the membership actor did not take the new registration".into(),
            ));
        }
        *self = Self::spawn(node, fresh, Arc::clone(&self.stats)).await?;
        Ok(())
    }

    /// Leave the job and stop the actor.
    ///
    /// # Errors
    /// The revocation's failure (the lease then expires after its TTL).
    pub async fn shutdown(self) -> Result<(), String> {
        self.call(Msg::Shutdown).await?
    }

    async fn call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<T>) -> Msg,
    ) -> Result<T, String> {
        match self.actor.call(msg, Some(CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            Ok(ractor::rpc::CallResult::Timeout) => Err(format!(
                "the membership actor did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            )),
            _ => Err("the membership actor has stopped".into()),
        }
    }
}

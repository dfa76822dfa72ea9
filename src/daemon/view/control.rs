//! The Control service: operator requests (drain, pause, resume, checkpoint now) become
//! messages to the node's loop through the Control actor, and Status shows the node's
//! view.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tenax_cluster::tls::PeerIdentity;
use tenax_core::node::Event;
use tenax_proto::v1 as pb;

use super::Shared;

/// An operator's request (the Control actor hands them to the node's loop: the gRPC
/// control calls and the signal handler send them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// Leave after the current step (with a checkpoint first).
    Drain { checkpoint: bool },
    /// SIGTERM: drain with a checkpoint within the grace period.
    Sigterm,
    /// Pause at the next step boundary.
    Pause,
    /// Go on.
    Resume,
    /// Save a checkpoint at the next step boundary.
    CheckpointNow,
}

impl Request {
    /// The node machine's event for this request (`grace_ms`: how long a SIGTERM drain
    /// may take).
    pub(crate) fn event(self, grace_ms: u64) -> Event {
        match self {
            Request::Drain { checkpoint } => Event::Drain { checkpoint },
            Request::Sigterm => Event::Sigterm { grace_ms },
            Request::Pause => Event::Pause,
            Request::Resume => Event::Resume,
            Request::CheckpointNow => Event::CheckpointNow,
        }
    }
}

impl Shared {
    /// Hand an operator request to the node's loop, through the Control actor.
    pub(crate) async fn request(&self, req: Request) -> Result<(), tonic::Status> {
        self.control.request(req).await.map_err(|e| {
            tonic::Status::unavailable(format!(
                "node {}: cannot take the request now ({e}); try again",
                self.member_id
            ))
        })
    }

    /// The Control service's Status reply: the node's view and who it is.
    pub(crate) fn status(&self) -> pb::StatusReply {
        let v = self.view().clone();
        pb::StatusReply {
            job: self.job.clone(),
            member_id: self.member_id.clone(),
            addr: self.addr.clone(),
            generation: v.generation,
            ranks: v.ranks,
            world: v.world,
            step: v.step,
            target_steps: v.target_steps,
            loss: v.loss,
            tokens_per_s: v.tokens_per_s,
            param_hash: v.param_hash,
            last_checkpoint_step: v.last_checkpoint_step,
            last_checkpoint_url: v.last_checkpoint_url,
            phase: v.phase,
            leader: v.leader,
            stale_refused: self.hub.stale_refused(),
            metrics_addr: self.metrics_addr.clone(),
            config_hash: self.config_hash.clone(),
            pipeline_stages: match self.stages_across_nodes {
                true => v.pp_depth.max(1),
                false => self.pipeline.map_or(1, |p| p.stages),
            },
            stages_across_nodes: self.stages_across_nodes,
            pipeline_schedule: self
                .pipeline
                .map(|p| p.schedule.to_string())
                .unwrap_or_default(),
        }
    }
}

/// The control service.
pub(crate) struct ControlService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        Ok(tonic::Response::new(self.shared.status()))
    }

    async fn drain(
        &self,
        req: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "drain")?;
        self.shared
            .request(Request::Drain {
                checkpoint: req.get_ref().checkpoint,
            })
            .await?;
        Ok(reply(
            true,
            format!(
                "node {} leaves the job after its current step{}",
                self.shared.member_id,
                if req.get_ref().checkpoint {
                    ", after saving a checkpoint"
                } else {
                    ""
                }
            ),
        ))
    }

    async fn checkpoint_now(
        &self,
        req: tonic::Request<pb::CheckpointNowRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "checkpoint")?;
        self.shared.request(Request::CheckpointNow).await?;
        Ok(reply(
            true,
            format!(
                "node {} saves a checkpoint at its next step boundary",
                self.shared.member_id
            ),
        ))
    }

    async fn pause(
        &self,
        req: tonic::Request<pb::PauseRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "pause")?;
        self.shared.request(Request::Pause).await?;
        Ok(reply(true, format!("node {} pauses at its next step boundary (pause the whole job with `tenax control pause --all`: peers kept waiting by one paused node report it as late after --suspect-after-ms, and it may be evicted)", self.shared.member_id)))
    }

    async fn resume(
        &self,
        req: tonic::Request<pb::ResumeRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.operator_only(&req, "resume")?;
        self.shared.request(Request::Resume).await?;
        Ok(reply(
            true,
            format!("node {} goes on training", self.shared.member_id),
        ))
    }
}

impl ControlService {
    /// Over mutual TLS, control calls need an operator certificate: a node's (or any
    /// other) is refused with `PERMISSION_DENIED`, counted. Over plain TCP (`--insecure`)
    /// there is nobody to check.
    fn operator_only<T>(&self, req: &tonic::Request<T>, call: &str) -> Result<(), tonic::Status> {
        match tenax_cluster::tls::peer_identity(req) {
            None | Some(Some(PeerIdentity::Operator(_))) => Ok(()),
            Some(other) => {
                self.shared.control_refused.fetch_add(1, Ordering::Relaxed);
                Err(tonic::Status::permission_denied(format!(
                    "{call} needs an operator certificate (`tenax certs issue --operator NAME`); this client's names {}",
                    other.map_or("no tenax identity".to_string(), |i| i.to_string())
                )))
            }
        }
    }
}

fn reply(accepted: bool, message: String) -> tonic::Response<pb::ControlReply> {
    tonic::Response::new(pb::ControlReply { accepted, message })
}

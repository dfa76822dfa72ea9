//! tenax-actors: the ractor supervision tree that runs training.
//!
//! Modules:
//! - [`checkpoint`]: the Checkpoint actor ([`Checkpointer`]): saves in the background while
//!   training goes on, one in flight and at most one waiting, then applies retention; a
//!   restartable child of the node supervisor.
//! - [`control`]: the Control actor ([`Control`]): operator requests (gRPC control calls,
//!   SIGTERM) become messages to the node's loop on a bounded queue.
//! - [`membership`]: the Membership actor ([`Membership`]): the node's registration in the
//!   job (etcd lease, election, plans); suspicions, fenced record writes and leaving are
//!   messages, each carrying its generation.
//! - [`node`]: the [`NodeSupervisor`], the root of a node's tree: restartable children (the
//!   services gRPC and `/metrics`, the Control and Checkpoint actors) and adopted ones (the
//!   Membership actor, each generation's trainer), each with a restart policy; a child that fails too often makes
//!   the node give up and leave the job instead of flapping.
//! - [`pipeline`]: D pipelines x S stages in one process ([`Trainer::start_pipeline`]):
//!   each stage rank an actor over a compute thread like a rank, activations and
//!   gradients over bounded channels, per-stage exact reductions, one meeting per step
//!   for the clip norm and the tied embedding; bit-identical to one rank. Pipelines
//!   whose replicas live in other processes ([`Trainer::start_pipeline_group`], the
//!   daemon) meet those in the node's whole-model collective through `stage_slices`.
//! - [`rank`]: one data-parallel rank as an actor. Its model and optimizer live on a
//!   dedicated compute thread (candle work never runs inside a message handler); the
//!   actor forwards jobs to that thread and awaits their results with a timeout.
//! - [`supervisor`]: the `TrainSupervisor` over N rank actors, and [`Trainer`], the
//!   handle the CLI drives step by step.
//!
//! Restart policy (the embedded, single-process case): a rank is never restarted in
//! place, because its state could only come back from a peer (the elasticity issue). A
//! rank that fails aborts the collective, so its peers stop waiting at once, and the
//! supervisor stops the run with an error naming the rank; checkpoints already
//! committed are untouched and `--resume` continues from the newest one.
//!

pub mod checkpoint;
pub mod control;
pub mod membership;
pub mod node;
pub mod pipeline;
pub mod rank;
mod stage_slices;
pub mod supervisor;

pub use checkpoint::{CheckpointEvent, CheckpointPolicy, Checkpointer, SaveJob, ShareJob};
pub use control::{Control, CONTROL_POLICY};
pub use membership::{MemberStats, Membership, MEMBERSHIP_POLICY};
pub use node::{
    ActorFactory, AdoptFactory, ChildSpec, ChildStart, NodeSupervisor, ServiceFactory,
    ServiceFuture,
};
pub use pipeline::{stage_part, PipelineSpec, StageOnPeers};
pub use rank::{param_hash, RankOutcome, SampleSource, StageTime, TrainData, TrainSetup};
pub use supervisor::{ActorsError, GroupStart, Snapshot, StepReport, Trainer, TRAINER_POLICY};

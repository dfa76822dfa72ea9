//! tenax-actors: the ractor supervision tree that runs training.
//!
//! Modules:
//! - [`checkpoint`]: the Checkpoint actor ([`Checkpointer`]): saves in the background while
//!   training goes on, one in flight and at most one waiting, then applies retention.
//! - [`node`]: the [`NodeSupervisor`] of `tenax daemon`: child actors running the node's
//!   services (gRPC server, `/metrics`) with a restart policy each; a child that fails too
//!   often makes the node give up and leave the job instead of flapping.
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
pub mod node;
pub mod rank;
pub mod supervisor;

pub use checkpoint::{CheckpointEvent, CheckpointPolicy, Checkpointer, SaveJob, ShareJob};
pub use node::{NodeSupervisor, ServiceFactory, ServiceFuture, ServiceSpec};
pub use rank::{param_hash, RankOutcome, TrainData, TrainSetup};
pub use supervisor::{ActorsError, Snapshot, StepReport, Trainer};

//! tenax-cluster: how ranks talk to each other.
//!
//! Modules:
//! - [`collective`]: the [`Collective`] trait every backend implements, and the exact
//!   slot-ordered reduction that makes a step's result independent of the number of ranks.
//! - [`inprocess`]: the backend for ranks that share one process (`tenax train --ranks N`).
//!
//! Still to come (daemon and membership issues): the CPU backend over the peer gRPC stream,
//! NCCL through cudarc behind the `cuda` feature, and the etcd driver for membership and
//! fencing.

pub mod collective;
pub mod inprocess;

pub use collective::{Collective, CollectiveError, Reduced, SlotContribution, SlotFold};
pub use inprocess::InProcessCollective;

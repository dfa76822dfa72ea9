//! tenax-cluster: how ranks talk to each other.
//!
//! Modules:
//! - [`collective`]: the [`Collective`] trait every backend implements, and the exact
//!   slot-ordered reduction that makes a step's result independent of the number of ranks.
//! - [`inprocess`]: the backend for ranks that share one process (`tenax train --ranks N`).
//! - [`etcd`]: the etcd driver for membership and fencing: member leases and keep-alive,
//!   leader election, the generation plan (one value, written by a guarded txn, watched),
//!   and fenced commits (txns that compare the generation and the writer's lease), and
//!   watches of the member keys.
//! - [`records`]: the typed records of a job's etcd keys (the plan at `gen`, member
//!   registrations, the config and checkpoint records, suspicion reports): key names and
//!   every value's encoding and decoding in one place; a decoded plan is validated.
//! - [`member`]: [`member::Member`], the async agent of one node: registers under a
//!   lease, campaigns, runs the membership planner when leader (member watch in, plan
//!   writes and revocations out), watches the plan and commits fenced on the generation
//!   it observed.
//!
//! - [`peer`]: the CPU backend over gRPC between daemons: [`peer::PeerHub`] (the served
//!   `Peer` service) and [`peer::GrpcCollective`] (one generation's communicator:
//!   slot-ordered exact reduce-scatter/all-gather, or a ring all-reduce).
//!
//! - [`tls`]: mutual TLS: the cluster CA, node and operator certificates, the rustls
//!   configurations and the listener's acceptor, and the identity a peer's certificate names.
//! - [`status`]: what `tenax status` shows: the members' Status replies summarised
//!   ([`status::summarize`]) and the table ([`status::render_table`]).
//!
//! Feature `chaos-hooks` (test builds only; `tenax/chaos-hooks` turns it on): the fault
//! hook [`peer::GrpcCollective::exit_during_all_gather`]. Without it the hook's code is
//! not compiled.
//!
//! Still to come (daemon issues): NCCL through cudarc behind the `cuda` feature.

pub mod collective;
pub mod etcd;
pub mod inprocess;
pub mod member;
pub mod peer;
pub mod records;
pub mod status;
pub mod tls;

pub use collective::{Collective, CollectiveError, Reduced, SlotContribution, SlotFold};
pub use inprocess::InProcessCollective;
pub use peer::{CommSpec, GrpcCollective, PeerAddr, PeerHub, Reduction, StageMessage, StagePart};

//! tenax-chaos: the chaos harness behind `tenax chaos run SCENARIO`.
//!
//! It will start real local clusters (an etcd process, an S3-compatible server and N
//! `tenax daemon` processes), inject faults (kill -9, SIGSTOP, stragglers, network
//! partitions through a fault-injecting TCP proxy, S3 errors through an HTTP proxy,
//! etcd restarts), record a history of events and check invariants against it
//! (every slot consumed exactly once, no stale-generation commit, final parameters
//! bit-identical to a fault-free run), then write a report with a timeline plot.
//!
//! The invariant checks need the daemon and elasticity work first. What exists now are
//! the local cluster runner and the storage-side tools, usable from any crate's tests:
//!
//! - [`cluster`]: [`LocalCluster`], a real local cluster from a [`ClusterSpec`]: an
//!   [`EtcdServer`], a [`MotoServer`] with the checkpoint bucket, and N `tenax daemon`
//!   processes on free loopback ports in a temporary directory, one log per node;
//!   faults by [`Signal`] (SIGTERM, SIGKILL, SIGSTOP, SIGCONT) to a daemon's PID, nodes
//!   restartable, and every daemon killed by PID on drop, even when a test fails.
//! - [`moto`]: [`MotoServer`], a real local S3-compatible server (`moto_server`) on a
//!   free port, killed on drop, plus the `AWS_*` environment to reach it.
//! - [`http_proxy`]: [`FaultProxy`], a seeded HTTP/1.1 proxy in front of such a server
//!   that injects S3 errors (503 `SlowDown`, 500 `InternalError`), dropped connections,
//!   lost responses and latency, so that object_store's own retries get exercised.
//! - [`etcd`]: [`EtcdServer`], a real local one-member etcd (`etcd`) on free ports with a
//!   temporary data directory: stop (kill -9), restart on the same ports and data, killed
//!   on drop.
//! - [`fault_store`]: [`FaultStore`], an `ObjectStore` wrapper that "crashes" at a
//!   [`CrashPoint`] (after N bytes, before or after a given put) and fails every call
//!   from then on, like a dead process.

#![warn(missing_docs)]

pub mod cluster;
pub mod etcd;
pub mod fault_store;
pub mod http_proxy;
mod local;
pub mod moto;

pub use cluster::{ClusterSpec, LocalCluster, Signal};
pub use etcd::EtcdServer;
pub use fault_store::{CrashPoint, FaultStore};
pub use http_proxy::{FaultAction, FaultDecision, FaultProxy, ProxyEvent, ProxyFaults, ProxyStats};
pub use moto::{s3_env_for, MotoServer};

//! tenax-chaos: the chaos harness behind `tenax chaos run SCENARIO`.
//!
//! It starts real local clusters (an etcd process, an S3-compatible server and N
//! `tenax daemon` processes), inject faults (kill -9, SIGSTOP, stragglers, network
//! partitions through a fault-injecting TCP proxy, S3 errors through an HTTP proxy,
//! etcd restarts), record a history of events and check invariants against it
//! (every slot consumed exactly once, no stale-generation commit, final parameters
//! bit-identical to a fault-free run), then write a report with a timeline plot.
//!
//! `tenax chaos run SCENARIO --seed S --out DIR` (in the `tenax` binary) drives these
//! pieces; the pure parts live here:
//!
//! - [`scenario`]: the scenario file format ([`Scenario`]), checked before anything runs.
//! - [`schedule`]: the fault schedule of a scenario and a seed, a pure function.
//! - [`history`]: what a run recorded (step logs, state events, etcd's plans and
//!   checkpoint records, faults injected).
//! - [`invariants`]: the checker, from a history alone.
//! - [`report`]: `report.json` and `report.md`: recovery, steps lost, goodput (lost-time
//!   accounting from the run's own timeline; the ratio to fault-free reference runs).
//! - [`resources`]: the daemons' RSS and open fds sampled over a run, cut into one
//!   segment per process life, with least-squares slopes per hour.
//! - [`roles`]: the leader and the checkpoint writer from the daemons' own status, so
//!   that faults aimed at roles resolve while etcd is down.
//!
//! And the tools that run a cluster and inject faults:
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
//!   on drop; optionally over TLS with client certificates made by rcgen, and with users
//!   and authentication enabled through `etcdctl`.
//! - [`fault_store`]: [`FaultStore`], an `ObjectStore` wrapper that "crashes" at a
//!   [`CrashPoint`] (after N bytes, before or after a given put) and fails every call
//!   from then on, like a dead process.
//! - [`tcp_proxy`]: [`TcpFaultProxy`], a TCP proxy in front of a daemon's gRPC port or
//!   etcd that passes, delays, drops or blackholes traffic: a network partition.

#![warn(missing_docs)]

pub mod cluster;
pub mod etcd;
pub mod fault_store;
pub mod history;
pub mod http_proxy;
pub mod invariants;
mod local;
pub mod moto;
pub mod report;
pub mod resources;
pub mod roles;
pub mod scenario;
pub mod schedule;
pub mod tcp_proxy;

pub use cluster::{ClusterSpec, LocalCluster, Signal};
pub use etcd::{EtcdServer, EtcdServerOptions, EtcdTlsFiles, EtcdUser};
pub use fault_store::{CrashPoint, FaultStore};
pub use http_proxy::{FaultAction, FaultDecision, FaultProxy, ProxyEvent, ProxyFaults, ProxyStats};
pub use moto::{s3_env_for, MotoServer};
pub use scenario::Scenario;
pub use tcp_proxy::{TcpFault, TcpFaultProxy, TcpProxyStats};

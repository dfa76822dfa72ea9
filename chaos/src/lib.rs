//! tenax-chaos: the chaos harness behind `tenax chaos run SCENARIO`.
//!
//! It will start real local clusters (an etcd process, an S3-compatible server and N
//! `tenax daemon` processes), inject faults (kill -9, SIGSTOP, stragglers, network
//! partitions through a fault-injecting TCP proxy, S3 errors through an HTTP proxy,
//! etcd restarts), record a history of events and check invariants against it
//! (every slot consumed exactly once, no stale-generation commit, final parameters
//! bit-identical to a fault-free run), then write a report with a timeline plot.
//!
//! Nothing is here yet: it needs the daemon and elasticity work first.

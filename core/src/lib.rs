//! tenax-core: every decision tenax makes, as pure functions.
//!
//! This crate depends on no async runtime, network, storage or tensor crate: time and
//! seeded randomness are inputs, and results are plain data, so everything here gets
//! table tests and property tests.
//!
//! Modules:
//! - [`canary`]: the memorisation probe: canary sequences planted at chosen repetition
//!   counts (which samples carry which canary, where in the window), the candidates a
//!   canary's secret is ranked among, and its exposure (Carlini et al.).
//! - [`ckpt`]: the checkpoint save plan (which rank writes which tensor slices), the load
//!   plan for another number of ranks, and retention (which checkpoint folders to delete).
//! - [`detector`]: failure detection: a peer is suspected after missing k x the observed
//!   p99 of an operation, and a suspicion is confirmed (second reporter or failed probe)
//!   before its lease is revoked.
//! - [`guard`]: training guards: a loss-spike and gradient-norm anomaly detector over
//!   reduced values (skip a flagged update, roll back to the in-memory snapshot when
//!   flags persist), with its state as plain data for checkpoints and state copies.
//! - [`membership`]: the group planner as a state machine (events in, effects out), the
//!   plan of a generation (D x S grid, stable ranks, reasons) and its validation, and who
//!   copies state from whom once members have compared their states (`state_donors`).
//! - [`pipeline`]: pipeline parallelism: the GPipe and 1F1B schedules as per-stage op
//!   lists with their peak in-flight activations, a simulator of their timeline and
//!   bubble, and the plan of D pipelines x S stages (which blocks each stage holds, the
//!   rank grid, data-parallel groups and pipeline neighbours).
//! - [`mixture`]: the streaming sampler of a prepared dataset: which window of which
//!   shard of which source every sample reads (weighted, stratified source draws; shards
//!   permuted per epoch, windows shuffled within groups of K shards), and which shard
//!   groups the next samples need, for a bounded prefetch.
//! - [`node`]: the life of one node as a state machine (events in, effects out): which
//!   plan it trains in, state comparison and copies, steps and their deadlines,
//!   checkpoints and their fenced records, drains, pauses, failures and rejoins.
//! - [`restart`]: the restart policy of a supervised child (restart, or give up after
//!   too many failures within a window so that the node leaves instead of flapping).
//! - [`rng`]: a small, versioned, seedable RNG (SplitMix64) and the normal sampler the
//!   model uses to initialise weights, so that one seed gives the same weights on every
//!   machine and every version of every dependency.
//! - [`sampler`]: which training window every sample slot of every step reads, as a pure
//!   function of (seed, number of windows, global sample index); the cursor is the whole
//!   data-loader state.
//! - [`slots`]: how a step's global batch is cut into micro-batch slots and how slots are
//!   spread over data-parallel ranks.

pub mod canary;
pub mod ckpt;
pub mod detector;
pub mod guard;
pub mod membership;
pub mod mixture;
pub mod node;
pub mod pipeline;
pub mod restart;
pub mod rng;
pub mod sampler;
pub mod slots;

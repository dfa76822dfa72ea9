//! tenax-core: every decision tenax makes, as pure functions.
//!
//! This crate depends on no async runtime, network, storage or tensor crate: time and
//! seeded randomness are inputs, and results are plain data, so everything here gets
//! table tests and property tests.
//!
//! Modules:
//! - [`ckpt`]: the checkpoint save plan (which rank writes which tensor slices), the load
//!   plan for another number of ranks, and retention (which checkpoint folders to delete).
//! - [`rng`]: a small, versioned, seedable RNG (SplitMix64) and the normal sampler the
//!   model uses to initialise weights, so that one seed gives the same weights on every
//!   machine and every version of every dependency.
//! - [`sampler`]: which training window every sample slot of every step reads, as a pure
//!   function of (seed, number of windows, global sample index); the cursor is the whole
//!   data-loader state.
//! - [`slots`]: how a step's global batch is cut into micro-batch slots and how slots are
//!   spread over data-parallel ranks.

pub mod ckpt;
pub mod rng;
pub mod sampler;
pub mod slots;

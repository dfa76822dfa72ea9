//! tenax-proto: the `.proto` file of tenax (`proto/tenax.proto`) and the tonic/prost code
//! generated from it at build time.
//!
//! - [`v1::peer_server`] / [`v1::peer_client`]: the peer data plane. Each member streams
//!   frames (gradient pieces, reduced pieces, state hashes) to each other member, one
//!   client stream per generation; every frame carries its job and generation.
//! - [`v1::control_server`] / [`v1::control_client`]: the control API: status, drain,
//!   checkpoint-now, pause and resume. `tenax status` is a client of it.

/// Generated code of package `tenax.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tenax.v1");
}

//! tenax-proto: the `.proto` files of tenax and the tonic/prost code generated from them.
//!
//! It will hold the control API (status, drain, checkpoint-now, pause/resume) that
//! `tenax status` and operators call, and the peer data plane (gradient chunks,
//! state transfer) that the CPU collective backend streams between daemons.
//!
//! Nothing is here yet: the walking skeleton trains in one process, where ranks talk
//! through in-process channels (see `tenax-cluster`). The daemon issue fills this crate.

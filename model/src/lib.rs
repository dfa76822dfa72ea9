//! tenax-model: the GPT that tenax trains, in candle (on the CPU; on a GPU with the `cuda`
//! feature), and the pure pieces of its training step.
//!
//! Parameters, gradients and optimiser state are flat `f32` vectors in one fixed order
//! (the [`ParamLayout`]: parameters sorted by name, each row-major), which is what the
//! rest of tenax all-reduces, checkpoints and restores.
//!
//! Modules:
//! - [`config`]: [`GptConfig`] and its named presets.
//! - [`params`]: [`ParamLayout`] (names, shapes, offsets, decay flags) and nanoGPT
//!   initialisation [`init_params`] from a seed.
//! - [`gpt`]: [`Gpt`]: forward pass, summed cross-entropy and its gradient, sampling;
//!   on the CPU or (`cuda` feature) a CUDA device, in f32 or mixed precision (bf16).
//! - [`device`]: [`DeviceTrainer`]: the whole training step on one candle device (the GPU
//!   path): candle's graph forward and backward, the clip and AdamW as tensor ops.
//! - [`hf`]: the same model in Hugging Face transformers' GPT-2 layout ([`Gpt2Config`],
//!   tensor names, [`hf::to_hf`] and its inverse [`hf::from_hf`]) for `tenax ckpt export
//!   --format hf`.
//! - `loss` (private): fused softmax cross-entropy (a candle custom op with its own backward).
//! - [`kernels`]: fused CPU kernels (layer norm, GELU, causal attention, softmax
//!   cross-entropy, matmul) with hand-written backward passes, thread-count independent.
//! - [`step`]: [`Workspace`]: the training step's forward and backward over flat
//!   parameters with those kernels and reused buffers (what the trainer runs); for a
//!   pipeline stage (`Workspace::for_stage`, parameters in `ParamLayout::for_stage`),
//!   the same passes over the stage's blocks, activations in and out
//!   ([`StageInput`], `stage_forward`, `stage_backward`), bit-identical to the whole
//!   model's when the stages are chained.
//! - [`optim`]: [`AdamW`] (PyTorch semantics, plain loops), [`clip_grad_norm`], the
//!   trainer's clip factor from per-tensor sums of squares added in layout order
//!   ([`tensor_squares`], [`clip_scale_from_squares`], [`clip_scale`]: the same bits
//!   whether one stage or S stages hold the tensors) and [`NamedTensor`] conversions for
//!   checkpoints.
//! - [`schedule`]: [`LrSchedule`], warmup plus cosine decay.
//! - [`error`]: the error type [`ModelError`].

pub mod config;
pub mod device;
pub mod error;
pub mod gpt;
pub mod hf;
pub mod kernels;
mod loss;
pub mod optim;
pub mod params;
pub mod schedule;
pub mod step;

pub use config::GptConfig;
pub use device::{cuda_device, DeviceStep, DeviceTrainer, StepDevice};
pub use error::ModelError;
pub use gpt::Gpt;
pub use hf::Gpt2Config;
pub use optim::{
    clip_grad_norm, clip_scale, clip_scale_from_squares, named_params, params_from_named,
    tensor_squares, AdamW, AdamWConfig, NamedTensor,
};
pub use params::{init_params, ParamEntry, ParamLayout};
pub use schedule::LrSchedule;
pub use step::{StageInput, Workspace};

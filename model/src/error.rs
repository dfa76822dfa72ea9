//! The crate's error type.

/// Everything that can go wrong in `tenax-model`. Each message names the thing that is
/// wrong and says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A preset name that [`crate::GptConfig::preset`] does not know.
    #[error("unknown model preset `{name}`: use one of {valid}")]
    UnknownPreset {
        /// The name that was asked for.
        name: String,
        /// The valid preset names, comma separated.
        valid: String,
    },
    /// A configuration that cannot describe a GPT.
    #[error("invalid model config: {reason}")]
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A compute device that cannot be used (no CUDA in this build, no such GPU).
    #[error("{reason}")]
    Device {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An error from candle while building or running the graph.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A flat vector (parameters, gradients, tokens) has the wrong length.
    #[error("{what} has {got} values but {expected} were expected; {hint}")]
    Length {
        /// What the vector is, e.g. "flat parameter vector".
        what: &'static str,
        /// The length that the layout or arguments require.
        expected: usize,
        /// The length that was passed.
        got: usize,
        /// What to do about it.
        hint: &'static str,
    },
    /// A token batch that cannot be split into `batch` rows, or whose rows are empty or
    /// longer than the model's context.
    #[error(
        "{tokens} tokens cannot be split into {batch} rows of 1..={block_size} tokens; \
         pass batch * t tokens with t <= block_size"
    )]
    BatchShape {
        /// Number of tokens passed.
        tokens: usize,
        /// Number of rows asked for.
        batch: usize,
        /// The model's context length.
        block_size: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} at position {position} is outside the vocabulary of {vocab_size}; check the tokenizer matches the model config")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Its index in the flat token slice.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A parameter that got no gradient from the backward pass: the graph is broken
    /// (an op without backward, or a parameter unused by the forward pass).
    #[error("parameter `{name}` received no gradient; some op on its path has no backward")]
    MissingGrad {
        /// The parameter's name.
        name: String,
    },
    /// A named tensor that a checkpoint must hold is absent.
    #[error("tensor `{name}` is missing; the checkpoint does not match this model config")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A named tensor has the wrong shape or data length.
    #[error("tensor `{name}` has shape {got:?} ({got_len} values) but {expected:?} was expected; the checkpoint does not match this model config")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the layout requires.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
        /// The number of values found.
        got_len: usize,
    },
    /// A pipeline stage was asked for what another stage does (e.g. the loss of a stage
    /// without the head, or token input on a stage without the embeddings).
    #[error("pipeline stage: {reason}")]
    Stage {
        /// What was asked, and of which stage.
        reason: String,
    },
    /// `generate` was called with an empty prompt.
    #[error("generate needs a prompt of at least one token")]
    EmptyPrompt,
}

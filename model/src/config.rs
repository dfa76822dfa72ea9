//! Model hyper-parameters and named presets.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The shape of a GPT: vocabulary, depth, width and context length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of token ids (rows of the embedding and of the tied LM head).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads per block; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context length: the longest token sequence the model reads (rows of `wpe`).
    pub block_size: usize,
}

impl GptConfig {
    /// Names accepted by [`GptConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &["tiny", "nano", "gpt2-small"];

    /// A named preset with the given vocabulary size:
    /// `"tiny"` (2 layers, 2 heads, 32 dims, block 16; for tests),
    /// `"nano"` (4 layers, 4 heads, 128 dims, block 64) and
    /// `"gpt2-small"` (12 layers, 12 heads, 768 dims, block 1024).
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, ModelError> {
        let (n_layer, n_head, n_embd, block_size) = match name {
            "tiny" => (2, 2, 32, 16),
            "nano" => (4, 4, 128, 64),
            "gpt2-small" => (12, 12, 768, 1024),
            _ => {
                return Err(ModelError::UnknownPreset {
                    name: name.to_string(),
                    valid: Self::PRESETS.join(", "),
                })
            }
        };
        let config = Self {
            vocab_size,
            n_layer,
            n_head,
            n_embd,
            block_size,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that every size is positive and that the heads divide the width.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fields = [
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
        ];
        for (field, value) in fields {
            if value == 0 {
                return Err(ModelError::InvalidConfig {
                    reason: format!("{field} is 0; every size must be at least 1"),
                });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::InvalidConfig {
                reason: format!(
                    "n_embd {} is not a multiple of n_head {}; pick sizes so each head gets n_embd / n_head dims",
                    self.n_embd, self.n_head
                ),
            });
        }
        Ok(())
    }

    /// Width of one attention head (`n_embd / n_head`).
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of trainable scalars, position embeddings included (the LM head is tied to
    /// `wte` and not counted twice). Equals [`crate::ParamLayout::for_config`]`.total`.
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        // ln_1 (2c) + c_attn (3c^2 + 3c) + attn c_proj (c^2 + c) + ln_2 (2c)
        // + c_fc (4c^2 + 4c) + mlp c_proj (4c^2 + c) = 12c^2 + 13c.
        let per_layer = 12 * c * c + 13 * c;
        self.vocab_size * c + self.block_size * c + self.n_layer * per_layer + 2 * c
    }
}

//! The model in Hugging Face transformers' GPT-2 layout: `config.json` fields and tensor
//! names that `GPT2LMHeadModel.from_pretrained` loads as they are.
//!
//! tenax's GPT is GPT-2's architecture (learned position embeddings, pre-LN blocks,
//! fused `c_attn` with q, k, v side by side, 4x MLP, final LayerNorm, LM head tied to
//! `wte`, biases everywhere), so the mapping is a renaming only:
//! - names gain the `transformer.` prefix and block numbers lose their zero padding
//!   (`h.03.attn.c_attn.weight` -> `transformer.h.3.attn.c_attn.weight`);
//! - shapes and values are unchanged: tenax stores a linear layer's weight `(in, out)`,
//!   which is exactly the layout of GPT-2's `Conv1D` (transposed from `nn.Linear`);
//! - no `lm_head.weight`: with `tie_word_embeddings` transformers ties it to `wte`.
//!
//! Two details must agree for the numbers to match: the GELU is the exact (erf) one,
//! transformers' `"gelu"` (its `"gelu_new"` is the tanh approximation), and the LayerNorm
//! epsilon is 1e-5. Pure: no I/O; the caller writes the files.

use serde::Serialize;

use crate::config::GptConfig;
use crate::error::ModelError;
use crate::optim::NamedTensor;
use crate::params::{block_prefix, ParamLayout};

/// The Hugging Face name of GELU as tenax computes it (erf form).
pub const HF_ACTIVATION: &str = "gelu";

/// Prefix of every tensor name of `GPT2LMHeadModel` but the head.
const PREFIX: &str = "transformer.";

/// The `config.json` of a `GPT2LMHeadModel` (transformers' `GPT2Config`), field names as
/// transformers spells them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gpt2Config {
    /// Always `["GPT2LMHeadModel"]`.
    pub architectures: Vec<String>,
    /// Always `"gpt2"`.
    pub model_type: String,
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// Context length (rows of `wpe`).
    pub n_positions: usize,
    /// Same as `n_positions` (older transformers read it).
    pub n_ctx: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// MLP width; `4 * n_embd`, written out rather than left null.
    pub n_inner: usize,
    /// [`HF_ACTIVATION`]: exact GELU.
    pub activation_function: String,
    /// LayerNorm epsilon (1e-5, as tenax).
    pub layer_norm_epsilon: f64,
    /// Dropouts: 0, tenax trains without dropout.
    pub resid_pdrop: f64,
    /// See `resid_pdrop`.
    pub embd_pdrop: f64,
    /// See `resid_pdrop`.
    pub attn_pdrop: f64,
    /// Std of nanoGPT's (and GPT-2's) init, for completeness.
    pub initializer_range: f64,
    /// Attention scores are divided by sqrt(head dim): true.
    pub scale_attn_weights: bool,
    /// No extra 1/(layer index) scaling: false.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Plain attention: false.
    pub reorder_and_upcast_attn: bool,
    /// The LM head is `wte`: true.
    pub tie_word_embeddings: bool,
    /// The exported tensors' type: `"float32"`.
    pub torch_dtype: String,
    /// Token that starts a text, if the tokenizer has one (`<|endoftext|>` for gpt2).
    pub bos_token_id: Option<u32>,
    /// Token that ends a text, if the tokenizer has one.
    pub eos_token_id: Option<u32>,
}

impl Gpt2Config {
    /// The transformers config of `config`; `eos_token_id` is the tokenizer's end-of-text
    /// id (also used as the start token, as GPT-2 does), `None` when it has none.
    pub fn of(config: &GptConfig, eos_token_id: Option<u32>) -> Self {
        Self {
            architectures: vec!["GPT2LMHeadModel".into()],
            model_type: "gpt2".into(),
            vocab_size: config.vocab_size,
            n_positions: config.block_size,
            n_ctx: config.block_size,
            n_embd: config.n_embd,
            n_layer: config.n_layer,
            n_head: config.n_head,
            n_inner: 4 * config.n_embd,
            activation_function: HF_ACTIVATION.into(),
            layer_norm_epsilon: crate::gpt::LN_EPS,
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            torch_dtype: "float32".into(),
            bos_token_id: eos_token_id,
            eos_token_id,
        }
    }
}

/// The Hugging Face name of tenax parameter `name`, or `None` if it is not one of the
/// model's parameters (`h.03.mlp.c_fc.bias` -> `transformer.h.3.mlp.c_fc.bias`).
pub fn hf_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("h.") {
        let (block, tail) = rest.split_once('.')?;
        if block.is_empty() || !block.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let i: usize = block.parse().ok()?;
        return Some(format!("{PREFIX}h.{i}.{tail}"));
    }
    matches!(
        name,
        "wte.weight" | "wpe.weight" | "ln_f.weight" | "ln_f.bias"
    )
    .then(|| format!("{PREFIX}{name}"))
}

/// The tenax name of Hugging Face tensor `hf` for a model of `config`, or `None` if it is
/// no parameter of that model (`transformer.h.3.attn.c_proj.weight` -> `h.03.attn...`).
pub fn tenax_name(config: &GptConfig, hf: &str) -> Option<String> {
    let name = hf.strip_prefix(PREFIX)?;
    let name = match name.strip_prefix("h.") {
        Some(rest) => {
            let (block, tail) = rest.split_once('.')?;
            let i: usize = block.parse().ok()?;
            if i >= config.n_layer || i.to_string() != block {
                return None;
            }
            format!("{}.{tail}", block_prefix(config, i))
        }
        None => name.to_string(),
    };
    ParamLayout::for_config(config).get(&name)?;
    Some(name)
}

/// The parameters of a model (flat, `layout` order) as `GPT2LMHeadModel` tensors, sorted
/// by their Hugging Face names; shapes and values unchanged.
pub fn to_hf(layout: &ParamLayout, flat: &[f32]) -> Result<Vec<NamedTensor>, ModelError> {
    crate::gpt::check_flat_len(layout.total, flat.len())?;
    let mut out: Vec<NamedTensor> = layout
        .entries
        .iter()
        .map(|e| NamedTensor {
            name: hf_name(&e.name).expect("every layout entry has a Hugging Face name"),
            shape: e.shape.clone(),
            data: flat[e.range()].to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The flat parameters (layout order) of a model of `config` from `GPT2LMHeadModel`
/// tensors: the inverse of [`to_hf`]. Other tensors (`lm_head.weight`, attention mask
/// buffers) are ignored; the error names the first missing or mis-shaped parameter.
pub fn from_hf(config: &GptConfig, tensors: &[NamedTensor]) -> Result<Vec<f32>, ModelError> {
    let renamed: Vec<NamedTensor> = tensors
        .iter()
        .filter_map(|t| {
            tenax_name(config, &t.name).map(|name| NamedTensor {
                name,
                shape: t.shape.clone(),
                data: t.data.clone(),
            })
        })
        .collect();
    let layout = ParamLayout::for_config(config);
    crate::optim::params_from_named(&layout, &renamed).map_err(|e| match e {
        ModelError::MissingTensor { name } => ModelError::MissingTensor {
            name: hf_name(&name).unwrap_or(name),
        },
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gpt;
    use std::collections::HashMap;
    use tenax_core::rng::SplitMix64;

    fn config(n_layer: usize) -> GptConfig {
        GptConfig {
            vocab_size: 37,
            n_layer,
            n_head: 2,
            n_embd: 8,
            block_size: 6,
        }
    }

    #[test]
    fn names_map_both_ways() {
        let c = config(12);
        let cases = [
            ("wte.weight", "transformer.wte.weight"),
            ("wpe.weight", "transformer.wpe.weight"),
            ("ln_f.bias", "transformer.ln_f.bias"),
            ("h.00.ln_1.weight", "transformer.h.0.ln_1.weight"),
            (
                "h.03.attn.c_attn.weight",
                "transformer.h.3.attn.c_attn.weight",
            ),
            ("h.11.mlp.c_proj.bias", "transformer.h.11.mlp.c_proj.bias"),
        ];
        for (tenax, hf) in cases {
            assert_eq!(hf_name(tenax).as_deref(), Some(hf), "{tenax}");
            assert_eq!(tenax_name(&c, hf).as_deref(), Some(tenax), "{hf}");
        }
        for bad in [
            "adamw.m.wte.weight",
            "h.x1.ln_1.weight",
            "lm_head.weight",
            "wte",
        ] {
            assert_eq!(hf_name(bad), None, "{bad}");
        }
        for bad in [
            "lm_head.weight",
            "transformer.h.12.ln_1.weight",
            "transformer.h.03.ln_1.weight",
            "transformer.h.0.attn.bias",
            "wte.weight",
        ] {
            assert_eq!(tenax_name(&c, bad), None, "{bad}");
        }
    }

    #[test]
    fn config_json_fields() {
        let c = GptConfig::preset("nano", 256).unwrap();
        let h = Gpt2Config::of(&c, None);
        assert_eq!(
            (h.n_layer, h.n_head, h.n_embd, h.n_positions, h.vocab_size),
            (4, 4, 128, 64, 256)
        );
        assert_eq!(h.n_inner, 512);
        assert_eq!(h.activation_function, "gelu");
        assert_eq!(h.layer_norm_epsilon, 1e-5);
        assert!(h.tie_word_embeddings && h.scale_attn_weights);
        assert_eq!(Gpt2Config::of(&c, Some(50256)).eos_token_id, Some(50256));
    }

    #[test]
    fn round_trip_is_exact_and_sorted() {
        let c = config(3);
        let layout = ParamLayout::for_config(&c);
        let flat = crate::init_params(&c, &layout, 5);
        let hf = to_hf(&layout, &flat).unwrap();
        assert_eq!(hf.len(), layout.entries.len());
        assert!(hf.windows(2).all(|w| w[0].name < w[1].name));
        let t = hf
            .iter()
            .find(|t| t.name == "transformer.h.1.attn.c_attn.weight")
            .unwrap();
        assert_eq!(t.shape, vec![8, 24], "(in, out), as Conv1D");
        let back = from_hf(&c, &hf).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            flat.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let missing: Vec<NamedTensor> = hf
            .into_iter()
            .filter(|t| t.name != "transformer.h.2.mlp.c_fc.bias")
            .collect();
        let err = from_hf(&c, &missing).unwrap_err();
        assert!(
            err.to_string().contains("transformer.h.2.mlp.c_fc.bias"),
            "{err}"
        );
    }

    /// erf, Abramowitz & Stegun 7.1.26 refined: |error| < 1.2e-7 (Numerical Recipes' erfc).
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let r = t
            * (-z * z - 1.265_512_23
                + t * (1.000_023_68
                    + t * (0.374_091_96
                        + t * (0.096_784_18
                            + t * (-0.186_288_06
                                + t * (0.278_868_07
                                    + t * (-1.135_203_98
                                        + t * (1.488_515_87
                                            + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
                .exp();
        if x >= 0.0 {
            1.0 - r
        } else {
            r - 1.0
        }
    }

    /// A GPT-2 forward pass written from transformers' `modeling_gpt2.py`, reading only
    /// the Hugging Face tensors: `Conv1D` is `x @ W + b` with `W` `(nx, nf)`; `c_attn`'s
    /// output splits into q, k, v of `n_embd` columns each, each split into heads of
    /// `n_embd / n_head` columns; scores scaled by 1/sqrt(head dim), causal; GELU
    /// `activation_function` (erf); LayerNorm with `layer_norm_epsilon`; logits `x @ wte^T`.
    fn hf_forward(h: &Gpt2Config, w: &HashMap<String, NamedTensor>, ids: &[u32]) -> Vec<f64> {
        assert_eq!(h.activation_function, "gelu");
        let (t, c, nh) = (ids.len(), h.n_embd, h.n_head);
        let hd = c / nh;
        let get = |n: &str| -> &[f32] { &w[&format!("transformer.{n}")].data };
        let conv1d = |x: &[f64], n: &str, nf: usize| -> Vec<f64> {
            let (wt, b) = (get(&format!("{n}.weight")), get(&format!("{n}.bias")));
            let nx = wt.len() / nf;
            let mut y = vec![0.0; t * nf];
            for r in 0..t {
                for j in 0..nf {
                    let mut s = f64::from(b[j]);
                    for i in 0..nx {
                        s += x[r * nx + i] * f64::from(wt[i * nf + j]);
                    }
                    y[r * nf + j] = s;
                }
            }
            y
        };
        let ln = |x: &[f64], n: &str| -> Vec<f64> {
            let (g, b) = (get(&format!("{n}.weight")), get(&format!("{n}.bias")));
            let mut y = vec![0.0; x.len()];
            for r in 0..t {
                let row = &x[r * c..(r + 1) * c];
                let mean = row.iter().sum::<f64>() / c as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                for i in 0..c {
                    y[r * c + i] = (row[i] - mean) / (var + h.layer_norm_epsilon).sqrt()
                        * f64::from(g[i])
                        + f64::from(b[i]);
                }
            }
            y
        };
        let (wte, wpe) = (get("wte.weight"), get("wpe.weight"));
        let mut x: Vec<f64> = (0..t * c)
            .map(|k| {
                let (r, i) = (k / c, k % c);
                f64::from(wte[ids[r] as usize * c + i]) + f64::from(wpe[r * c + i])
            })
            .collect();
        for l in 0..h.n_layer {
            let a = ln(&x, &format!("h.{l}.ln_1"));
            let qkv = conv1d(&a, &format!("h.{l}.attn.c_attn"), 3 * c);
            let mut y = vec![0.0; t * c];
            for head in 0..nh {
                let at =
                    |r: usize, which: usize, d: usize| qkv[r * 3 * c + which * c + head * hd + d];
                for r in 0..t {
                    let scores: Vec<f64> = (0..=r)
                        .map(|s| {
                            (0..hd).map(|d| at(r, 0, d) * at(s, 1, d)).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        y[r * c + head * hd + d] =
                            (0..=r).map(|s| e[s] / z * at(s, 2, d)).sum::<f64>();
                    }
                }
            }
            let p = conv1d(&y, &format!("h.{l}.attn.c_proj"), c);
            x.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            let m = ln(&x, &format!("h.{l}.ln_2"));
            let m: Vec<f64> = conv1d(&m, &format!("h.{l}.mlp.c_fc"), 4 * c)
                .into_iter()
                .map(|v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)))
                .collect();
            let p = conv1d(&m, &format!("h.{l}.mlp.c_proj"), c);
            x.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        let x = ln(&x, "ln_f");
        let v = h.vocab_size;
        let mut logits = vec![0.0; t * v];
        for r in 0..t {
            for j in 0..v {
                logits[r * v + j] = (0..c)
                    .map(|i| x[r * c + i] * f64::from(wte[j * c + i]))
                    .sum();
            }
        }
        logits
    }

    /// The exported tensors, run through a forward pass written from transformers' GPT-2
    /// code, give tenax's logits.
    #[test]
    fn hf_layout_forward_reproduces_tenax_logits() {
        let c = config(2);
        let layout = ParamLayout::for_config(&c);
        // Large random values everywhere (LayerNorm gains and biases too), so that a
        // wrong split of q/k/v or heads, or a transposed weight, shows.
        let mut rng = SplitMix64::new(3);
        let flat: Vec<f32> = (0..layout.total)
            .map(|_| (rng.next_normal() * 0.5) as f32)
            .collect();
        let gpt = Gpt::new(c.clone()).unwrap();
        gpt.set_params(&flat).unwrap();
        let ids: Vec<u32> = (0..c.block_size)
            .map(|_| rng.below(c.vocab_size as u64) as u32)
            .collect();
        let want = gpt
            .forward(&ids, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let hf = Gpt2Config::of(&c, None);
        let tensors: HashMap<String, NamedTensor> = to_hf(&layout, &flat)
            .unwrap()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let got = hf_forward(&hf, &tensors, &ids);
        assert_eq!(got.len(), want.len());
        let spread = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(
            spread > 1.0,
            "logits too flat to tell layouts apart: {spread}"
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - f64::from(*w)).abs() < 1e-4 * (1.0 + w.abs() as f64),
                "logit {i}: hf layout {g}, tenax {w}"
            );
        }
    }
}

//! The GPT itself: a nanoGPT-style decoder built from basic candle-core ops.
//!
//! candle-nn's fused `softmax_last_dim`, `layer_norm`, `rms_norm` and `sdpa` record no
//! gradient, silently, so this module builds layer norm, softmax and the causal mask from
//! elementary ops that all have a backward pass; the cross-entropy is a custom op with a
//! hand-written backward (module `loss`). Every parameter's
//! gradient is checked against finite differences in the tests below.

use candle_core::{DType, Device, Tensor, Var, D};
use tenax_core::rng::SplitMix64;

use crate::config::GptConfig;
use crate::error::ModelError;
use crate::loss::cross_entropy_rows;
use crate::params::{block_prefix, ParamLayout};

/// LayerNorm epsilon, as torch's default.
pub(crate) const LN_EPS: f64 = 1e-5;

/// A GPT on the CPU: config, flat parameter layout and one candle [`Var`] per parameter.
///
/// Architecture: token + learned position embeddings; pre-LN blocks
/// `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))` with causal multi-head self-attention
/// and a 4x MLP with exact (erf) GELU; final LayerNorm; LM head tied to `wte`.
/// Linear weights are stored `(in, out)` so a layer is `x.matmul(w) + b`. No dropout.
pub struct Gpt {
    /// The model's shape.
    config: GptConfig,
    /// Names, shapes and flat offsets of the parameters.
    layout: ParamLayout,
    /// Element type of the Vars (f32 normally; f64 for gradient checks).
    dtype: DType,
    /// Element type the matrix products and activations run in: `dtype`, or BF16/F16 for
    /// mixed precision (layer norms, softmax and the loss still run in f32).
    compute: DType,
    /// Where the Vars live: the CPU, or a CUDA device (`cuda` feature).
    device: Device,
    /// One Var per layout entry, in layout order.
    vars: Vec<Var>,
    /// `h.NN` prefix of each block.
    block_prefixes: Vec<String>,
}

/// The parameter tensors one pass reads, in layout order: the Vars themselves when a
/// gradient is wanted, detached views of them (no graph recorded) otherwise.
struct Weights<'a> {
    layout: &'a ParamLayout,
    tensors: Vec<Tensor>,
}

impl Weights<'_> {
    fn get(&self, name: &str) -> &Tensor {
        let i = self
            .layout
            .index_of(name)
            .unwrap_or_else(|| panic!("no parameter `{name}`"));
        &self.tensors[i]
    }
}

impl Gpt {
    /// A model with every parameter zero, on the CPU in f32; call [`Gpt::set_params`]
    /// (e.g. with [`crate::init_params`]) before use.
    pub fn new(config: GptConfig) -> Result<Self, ModelError> {
        Self::new_with_dtype(config, DType::F32)
    }

    /// Like [`Gpt::new`] with the Vars in `dtype` (F32 or F64). The public API still
    /// speaks `f32`; F64 exists so the gradient check can use finite differences.
    #[doc(hidden)]
    pub fn new_with_dtype(config: GptConfig, dtype: DType) -> Result<Self, ModelError> {
        Self::on_device(config, &Device::Cpu, dtype, dtype)
    }

    /// A model with every parameter zero on `device`, its Vars (the master weights) in
    /// `dtype` (F32 or F64) and its passes computed in `compute`: `dtype` itself, or BF16
    /// or F16 for mixed precision, where weights are cast as they are read, the embedding
    /// lookups, layer norms, attention softmax and loss run in f32 and gradients reach
    /// the Vars in `dtype`.
    pub fn on_device(
        config: GptConfig,
        device: &Device,
        dtype: DType,
        compute: DType,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(ModelError::InvalidConfig {
                reason: format!("dtype {dtype:?} is not supported; use F32 or F64"),
            });
        }
        if compute != dtype && !matches!(compute, DType::BF16 | DType::F16) {
            return Err(ModelError::InvalidConfig {
                reason: format!(
                    "compute dtype {compute:?} is not supported; use the parameters' own or BF16/F16"
                ),
            });
        }
        let layout = ParamLayout::for_config(&config);
        let vars = layout
            .entries
            .iter()
            .map(|e| Var::zeros(e.shape.as_slice(), dtype, device))
            .collect::<Result<Vec<_>, _>>()?;
        let block_prefixes = (0..config.n_layer)
            .map(|i| block_prefix(&config, i))
            .collect();
        Ok(Self {
            config,
            layout,
            dtype,
            compute,
            device: device.clone(),
            vars,
            block_prefixes,
        })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The Vars (master weights), layout order.
    pub(crate) fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The model's shape.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The flat parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn check_flat_len(&self, len: usize) -> Result<(), ModelError> {
        check_flat_len(self.layout.total, len)
    }

    /// Copies `flat` (layout order) into the Vars.
    pub fn set_params(&self, flat: &[f32]) -> Result<(), ModelError> {
        self.check_flat_len(flat.len())?;
        for (entry, var) in self.layout.entries.iter().zip(&self.vars) {
            let t = Tensor::from_slice(&flat[entry.range()], entry.shape.as_slice(), &self.device)?;
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }

    /// Like [`Gpt::set_params`] from `f64` values (converted to the model's dtype).
    #[doc(hidden)]
    pub fn set_params_f64(&self, flat: &[f64]) -> Result<(), ModelError> {
        self.check_flat_len(flat.len())?;
        for (entry, var) in self.layout.entries.iter().zip(&self.vars) {
            let t = Tensor::from_slice(&flat[entry.range()], entry.shape.as_slice(), &self.device)?;
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }

    /// A flat copy of the parameters, layout order.
    pub fn params(&self) -> Result<Vec<f32>, ModelError> {
        let mut flat = Vec::with_capacity(self.layout.total);
        for var in &self.vars {
            flat.extend(
                var.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(flat)
    }

    fn weights(&self, track_grad: bool) -> Weights<'_> {
        let tensors = self
            .vars
            .iter()
            .map(|v| {
                if track_grad {
                    v.as_tensor().clone()
                } else {
                    v.as_detached_tensor()
                }
            })
            .collect();
        Weights {
            layout: &self.layout,
            tensors,
        }
    }

    /// Checks a token batch and returns `t`, the row length.
    fn check_tokens(&self, tokens: &[u32], batch: usize) -> Result<usize, ModelError> {
        check_tokens(&self.config, tokens, batch)
    }

    /// Logits `(batch * t, vocab)` for a checked token batch.
    fn logits_2d(
        &self,
        w: &Weights,
        tokens: &[u32],
        batch: usize,
        t: usize,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let n = batch * t;
        let ids = Tensor::from_slice(tokens, n, &self.device)?;
        let wte = w.get("wte.weight");
        // Embeddings are looked up and added in the master dtype (their gradient is a
        // scatter-add of many rows, which bf16 would round), then cast.
        let tok = wte.index_select(&ids, 0)?; // (n, C)
        let pos = w.get("wpe.weight").narrow(0, 0, t)?; // (t, C)
        let mut x = tok
            .reshape((batch, t, c.n_embd))?
            .broadcast_add(&pos)?
            .reshape((n, c.n_embd))?
            .to_dtype(self.compute)?;
        let norm_dtype = norm_dtype(self.dtype);
        let mask = causal_mask(t, norm_dtype, &self.device)?;
        let cast: Vec<Tensor> = w
            .tensors
            .iter()
            .map(|t| t.to_dtype(self.compute))
            .collect::<candle_core::Result<_>>()?;
        let wc = Weights {
            layout: w.layout,
            tensors: cast,
        };
        for p in &self.block_prefixes {
            let g = |s: &str| wc.get(&format!("{p}.{s}"));
            let h = layer_norm(&x, g("ln_1.weight"), g("ln_1.bias"))?;
            let h = self.attention(
                &h,
                g("attn.c_attn.weight"),
                g("attn.c_attn.bias"),
                &mask,
                batch,
                t,
            )?;
            let h = linear(&h, g("attn.c_proj.weight"), g("attn.c_proj.bias"))?;
            x = (x + h)?;
            let h = layer_norm(&x, g("ln_2.weight"), g("ln_2.bias"))?;
            let h = gelu(&linear(&h, g("mlp.c_fc.weight"), g("mlp.c_fc.bias"))?)?;
            let h = linear(&h, g("mlp.c_proj.weight"), g("mlp.c_proj.bias"))?;
            x = (x + h)?;
        }
        let x = layer_norm(&x, wc.get("ln_f.weight"), wc.get("ln_f.bias"))?;
        Ok(x.matmul(&wc.get("wte.weight").t()?)?)
    }

    /// Causal multi-head self-attention on `x` `(batch * t, C)`, before the output
    /// projection; returns `(batch * t, C)`.
    fn attention(
        &self,
        x: &Tensor,
        w_attn: &Tensor,
        b_attn: &Tensor,
        mask: &Tensor,
        batch: usize,
        t: usize,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (nh, hd) = (c.n_head, c.head_dim());
        let qkv = linear(x, w_attn, b_attn)? // (n, 3C)
            .reshape((batch, t, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))? // (3, B, H, T, hd)
            .contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = qkv.get(0)?.affine(scale, 0.0)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let att = q
            .matmul(&k.t()?)?
            .to_dtype(mask.dtype())?
            .broadcast_add(mask)?; // (B, H, T, T)
        let att = softmax_last_dim(&att)?.to_dtype(self.compute)?;
        let y = att.matmul(&v)?; // (B, H, T, hd)
        Ok(y.transpose(1, 2)?.reshape((batch * t, c.n_embd))?)
    }

    /// Logits `(batch, t, vocab)` for `batch` rows of `t` input ids (row-major, `t` at
    /// most `block_size`). No autograd graph is recorded.
    pub fn forward(&self, tokens: &[u32], batch: usize) -> Result<Tensor, ModelError> {
        let t = self.check_tokens(tokens, batch)?;
        let w = self.weights(false);
        let logits = self.logits_2d(&w, tokens, batch, t)?;
        Ok(logits.reshape((batch, t, self.config.vocab_size))?)
    }

    /// The scalar loss tensor (sum of cross-entropies) in the model dtype.
    fn loss_tensor(
        &self,
        w: &Weights,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<Tensor, ModelError> {
        let t = check_inputs_and_targets(&self.config, inputs, targets, batch)?;
        let logits = self.logits_2d(w, inputs, batch, t)?;
        let logits = logits.to_dtype(norm_dtype(self.dtype))?;
        Ok(cross_entropy_rows(&logits, targets)?.sum_all()?)
    }

    /// Sum (not mean) of the next-token cross-entropy over all `batch * t` positions.
    pub fn loss_sum(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<f32, ModelError> {
        let loss = self.loss_tensor(&self.weights(false), inputs, targets, batch)?;
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    /// [`Gpt::loss_sum`] in f64 (exact when the model dtype is F64).
    #[doc(hidden)]
    pub fn loss_sum_f64(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<f64, ModelError> {
        let loss = self.loss_tensor(&self.weights(false), inputs, targets, batch)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// The loss and one gradient tensor per parameter (layout order).
    pub(crate) fn loss_and_grad_tensors(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(Tensor, Vec<Tensor>), ModelError> {
        let loss = self.loss_tensor(&self.weights(true), inputs, targets, batch)?;
        let mut store = loss.backward()?;
        let grads = self
            .layout
            .entries
            .iter()
            .zip(&self.vars)
            .map(|(entry, var)| {
                store
                    .remove(var.as_tensor())
                    .ok_or_else(|| ModelError::MissingGrad {
                        name: entry.name.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((loss, grads))
    }

    /// The summed loss and every parameter's gradient, flat in layout order, read out as `T`.
    fn flat_loss_and_grad<T: candle_core::WithDType>(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(T, Vec<T>), ModelError> {
        let (loss, grads) = self.loss_and_grad_tensors(inputs, targets, batch)?;
        let mut flat = Vec::with_capacity(self.layout.total);
        for g in grads {
            flat.extend(g.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?);
        }
        Ok((loss.to_dtype(T::DTYPE)?.to_scalar::<T>()?, flat))
    }

    /// Sum (not mean) of next-token cross-entropy over all `batch * t` positions, and its
    /// gradient for every parameter, flattened in layout order.
    pub fn loss_sum_and_grad(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(f32, Vec<f32>), ModelError> {
        self.flat_loss_and_grad::<f32>(inputs, targets, batch)
    }

    /// [`Gpt::loss_sum_and_grad`] in f64.
    #[doc(hidden)]
    pub fn loss_sum_and_grad_f64(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(f64, Vec<f64>), ModelError> {
        self.flat_loss_and_grad::<f64>(inputs, targets, batch)
    }

    /// Samples `max_new` tokens after `prompt` and returns them (the new tokens only,
    /// without the prompt). The context fed to the model is the last `block_size` tokens.
    ///
    /// Each step divides the last position's logits by `temperature`, keeps the `top_k`
    /// largest (ties with the k-th kept; `top_k == 0` keeps all) and samples from their
    /// softmax with a `SplitMix64::derive(seed, "generate")` stream. `temperature <= 0`
    /// means greedy (argmax, lowest id on ties).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f32,
        top_k: usize,
        seed: u64,
    ) -> Result<Vec<u32>, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        self.check_tokens(prompt, 1).or_else(|e| match e {
            // Long prompts are cropped below; only the ids need checking.
            ModelError::BatchShape { .. } => Ok(0),
            e => Err(e),
        })?;
        let mut rng = SplitMix64::derive(seed, "generate");
        let mut context = prompt.to_vec();
        let mut out = Vec::with_capacity(max_new);
        let w = self.weights(false);
        for _ in 0..max_new {
            let start = context.len().saturating_sub(self.config.block_size);
            let window = &context[start..];
            let t = window.len();
            let logits = self.logits_2d(&w, window, 1, t)?;
            let last = logits.get(t - 1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let next = sample(&last, temperature, top_k, &mut rng) as u32;
            context.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Checks that a flat parameter vector has the layout's `total` length.
pub(crate) fn check_flat_len(total: usize, len: usize) -> Result<(), ModelError> {
    if len != total {
        return Err(ModelError::Length {
            what: "flat parameter vector",
            expected: total,
            got: len,
            hint: "build it with init_params or params() for the same config",
        });
    }
    Ok(())
}

/// Checks a token batch for `config` (whole rows of at most `block_size` ids, each below
/// the vocabulary) and returns `t`, the row length.
pub(crate) fn check_tokens(
    config: &GptConfig,
    tokens: &[u32],
    batch: usize,
) -> Result<usize, ModelError> {
    let block_size = config.block_size;
    let bad = ModelError::BatchShape {
        tokens: tokens.len(),
        batch,
        block_size,
    };
    if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
        return Err(bad);
    }
    let t = tokens.len() / batch;
    if t > block_size {
        return Err(bad);
    }
    if let Some((position, &token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= config.vocab_size)
    {
        return Err(ModelError::TokenOutOfRange {
            token,
            position,
            vocab_size: config.vocab_size,
        });
    }
    Ok(t)
}

/// [`check_tokens`] of the inputs and of the targets, one target per input; returns `t`.
pub(crate) fn check_inputs_and_targets(
    config: &GptConfig,
    inputs: &[u32],
    targets: &[u32],
    batch: usize,
) -> Result<usize, ModelError> {
    let t = check_tokens(config, inputs, batch)?;
    if targets.len() != inputs.len() {
        return Err(ModelError::Length {
            what: "targets",
            expected: inputs.len(),
            got: targets.len(),
            hint: "pass one target (the next token) per input token",
        });
    }
    check_tokens(config, targets, batch)?;
    Ok(t)
}

/// `x.matmul(w) + b` for `x` `(n, in)`, `w` `(in, out)`, `b` `(out)`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(w)?.broadcast_add(b)
}

/// Exact GELU `0.5 x (1 + erf(x / sqrt 2))`, as torch's `nn.GELU()`. Composed from
/// `erf` rather than candle's fused `gelu_erf`, whose backward rounds 1/sqrt(2 pi) to six
/// digits; `erf`'s backward is exact, so gradients match finite differences to ~1e-8.
fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let cdf = x
        .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?;
    x.mul(&cdf)
}

/// The dtype layer norms, the attention softmax and the loss run in for master weights
/// in `dtype`: f32 at least.
fn norm_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// LayerNorm over the last dim of `x` `(n, C)` with biased variance, as torch. A bf16 or
/// f16 input is normalised in f32 and cast back (as torch's autocast does).
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let wide = norm_dtype(dtype);
    let x = x.to_dtype(wide)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + LN_EPS)?.sqrt()?.recip()?;
    xc.broadcast_mul(&rstd)?
        .broadcast_mul(&w.to_dtype(wide)?)?
        .broadcast_add(&b.to_dtype(wide)?)?
        .to_dtype(dtype)
}

/// Softmax over the last dim. The max is detached: subtracting any constant leaves the
/// softmax unchanged, so its gradient contribution is exactly zero.
fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `(t, t)` additive causal mask: 0 on and below the diagonal, -inf above. The diagonal
/// is never masked, so every row's max is finite and `exp` gives exact zeros whose
/// gradients are zero.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(data, (t, t), device)?.to_dtype(dtype)
}

/// Draws one id from `logits` (see [`Gpt::generate`] for the rules).
fn sample(logits: &[f64], temperature: f32, top_k: usize, rng: &mut SplitMix64) -> usize {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best
    };
    if !temperature.is_finite() || temperature <= 0.0 {
        return argmax();
    }
    let inv_t = 1.0 / f64::from(temperature);
    let mut scaled: Vec<f64> = logits.iter().map(|&x| x * inv_t).collect();
    if top_k > 0 && top_k < scaled.len() {
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[top_k - 1];
        for x in scaled.iter_mut() {
            if *x < kth {
                *x = f64::NEG_INFINITY;
            }
        }
    }
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let probs: Vec<f64> = scaled.iter().map(|&x| (x - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax();
    }
    let mut u = rng.next_f64() * total;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            if u < p {
                return i;
            }
            u -= p;
            last_nonzero = i;
        }
    }
    last_nonzero
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::params::init_params;

    fn gradcheck_config() -> GptConfig {
        GptConfig {
            vocab_size: 11,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 5,
        }
    }

    fn random_tokens(rng: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
    }

    /// Compares `analytic` with central differences of `model.loss_sum_f64` at `p0` on
    /// every element of small parameters and 8 elements of larger ones (first, last and
    /// 6 random). Returns a description of every parameter that fails.
    fn check_gradient(
        model: &Gpt,
        p0: &[f64],
        analytic: &[f64],
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Vec<String> {
        const H: f64 = 1e-5;
        const REL_TOL: f64 = 1e-5;
        const ABS_FLOOR: f64 = 1e-8;
        let mut rng = SplitMix64::derive(3, "gradcheck-sample");
        let mut failures = Vec::new();
        let mut p = p0.to_vec();
        for entry in &model.layout().entries {
            let idx: Vec<usize> = if entry.len <= 16 {
                entry.range().collect()
            } else {
                let mut v = vec![entry.offset, entry.offset + entry.len - 1];
                v.extend((0..6).map(|_| entry.offset + rng.below(entry.len as u64) as usize));
                v
            };
            let mut worst: f64 = 0.0;
            let mut max_fd: f64 = 0.0;
            for i in idx {
                p[i] = p0[i] + H;
                model.set_params_f64(&p).unwrap();
                let plus = model.loss_sum_f64(inputs, targets, batch).unwrap();
                p[i] = p0[i] - H;
                model.set_params_f64(&p).unwrap();
                let minus = model.loss_sum_f64(inputs, targets, batch).unwrap();
                p[i] = p0[i];
                let numeric = (plus - minus) / (2.0 * H);
                let a = analytic[i];
                let err = (a - numeric).abs() / (a.abs().max(numeric.abs()) + ABS_FLOOR);
                max_fd = max_fd.max(numeric.abs());
                if err > worst {
                    worst = err;
                }
                if err > REL_TOL {
                    failures.push(format!(
                        "{} element {}: analytic {a:e}, numeric {numeric:e}, rel err {err:e}",
                        entry.name,
                        i - entry.offset
                    ));
                }
            }
            eprintln!(
                "gradcheck {:<28} worst rel err {worst:.2e}, max |fd| {max_fd:.2e}",
                entry.name
            );
            // A check on a parameter the loss does not depend on would prove nothing.
            assert!(
                max_fd > 1e-6,
                "{}: finite differences are all ~0 ({max_fd:e})",
                entry.name
            );
        }
        model.set_params_f64(p0).unwrap();
        failures
    }

    #[test]
    fn gradients_match_finite_differences_for_every_parameter() {
        let config = gradcheck_config();
        let model = Gpt::new_with_dtype(config.clone(), DType::F64).unwrap();
        let mut rng = SplitMix64::derive(11, "gradcheck");
        // Random values everywhere (biases and LayerNorm parameters too) so that no
        // gradient path is trivially zero or symmetric.
        let p0: Vec<f64> = model
            .layout()
            .entries
            .iter()
            .flat_map(|e| {
                let base = if e.name.contains("ln_") && e.name.ends_with(".weight") {
                    1.0
                } else {
                    0.0
                };
                (0..e.len)
                    .map(|_| base + 0.3 * rng.next_normal())
                    .collect::<Vec<_>>()
            })
            .collect();
        model.set_params_f64(&p0).unwrap();
        let (batch, t) = (2, config.block_size);
        let inputs = random_tokens(&mut rng, batch * t, config.vocab_size);
        let targets = random_tokens(&mut rng, batch * t, config.vocab_size);
        let (loss, grad) = model
            .loss_sum_and_grad_f64(&inputs, &targets, batch)
            .unwrap();
        assert!((loss - model.loss_sum_f64(&inputs, &targets, batch).unwrap()).abs() < 1e-12);
        let failures = check_gradient(&model, &p0, &grad, &inputs, &targets, batch);
        assert!(
            failures.is_empty(),
            "gradient mismatches:\n{}",
            failures.join("\n")
        );

        // The checker itself must catch a gradient that is silently zero.
        let mut broken = grad.clone();
        let e = model.layout().get("h.01.mlp.c_fc.bias").unwrap();
        broken[e.range()].fill(0.0);
        let failures = check_gradient(&model, &p0, &broken, &inputs, &targets, batch);
        assert!(
            !failures.is_empty() && failures.iter().all(|f| f.starts_with("h.01.mlp.c_fc.bias"))
        );

        // The f32 entry point agrees with the f64 one.
        let (loss32, grad32) = model.loss_sum_and_grad(&inputs, &targets, batch).unwrap();
        assert!((f64::from(loss32) - loss).abs() < 1e-4 * loss.abs());
        assert!(grad32
            .iter()
            .zip(&grad)
            .all(|(a, b)| (f64::from(*a) - b).abs() <= 1e-6 * b.abs() + 1e-30));
    }

    fn tiny_model(vocab: usize, seed: u64) -> Gpt {
        let model = Gpt::new(GptConfig::preset("tiny", vocab).unwrap()).unwrap();
        model
            .set_params(&init_params(model.config(), model.layout(), seed))
            .unwrap();
        model
    }

    #[test]
    fn forward_and_grad_are_bit_deterministic() {
        let model = tiny_model(37, 5);
        let again = tiny_model(37, 5);
        assert_eq!(
            model
                .params()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            again
                .params()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        );
        let mut rng = SplitMix64::new(1);
        let inputs = random_tokens(&mut rng, 3 * 16, 37);
        let targets = random_tokens(&mut rng, 3 * 16, 37);
        let bits = |t: Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        let a = bits(model.forward(&inputs, 3).unwrap());
        let b = bits(model.forward(&inputs, 3).unwrap());
        let c = bits(again.forward(&inputs, 3).unwrap());
        assert_eq!(a.len(), 3 * 16 * 37);
        assert_eq!(a, b);
        assert_eq!(a, c);
        let (l1, g1) = model.loss_sum_and_grad(&inputs, &targets, 3).unwrap();
        let (l2, g2) = again.loss_sum_and_grad(&inputs, &targets, 3).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert_eq!(
            g1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            g2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            l1.to_bits(),
            model.loss_sum(&inputs, &targets, 3).unwrap().to_bits()
        );
        // At init the logits are near zero, so the loss is near n * ln(vocab).
        let uniform = 48.0 * (37f32).ln();
        assert!(
            (l1 - uniform).abs() < 0.05 * uniform,
            "loss {l1}, uniform {uniform}"
        );
    }

    #[test]
    fn gpt_can_move_to_a_compute_thread() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Gpt>();
    }

    #[test]
    fn params_round_trip_and_lengths_are_checked() {
        let model = tiny_model(20, 9);
        let p = init_params(model.config(), model.layout(), 9);
        assert_eq!(model.params().unwrap(), p);
        let err = model.set_params(&p[1..]).unwrap_err();
        assert!(matches!(err, ModelError::Length { .. }), "{err}");
    }

    #[test]
    fn attention_is_causal() {
        let model = tiny_model(23, 2);
        let a: Vec<u32> = (0..10).map(|i| i % 23).collect();
        let mut b = a.clone();
        b[7] = 22;
        let la = model.forward(&a, 1).unwrap().get(0).unwrap();
        let lb = model.forward(&b, 1).unwrap().get(0).unwrap();
        for pos in 0..10 {
            let x = la.get(pos).unwrap().to_vec1::<f32>().unwrap();
            let y = lb.get(pos).unwrap().to_vec1::<f32>().unwrap();
            if pos < 7 {
                assert_eq!(x, y, "position {pos} sees the future");
            } else {
                assert_ne!(x, y, "position {pos} ignores its own token/past");
            }
        }
    }

    #[test]
    fn bad_token_batches_are_rejected() {
        let model = tiny_model(10, 1);
        let seq = vec![1u32; 6];
        assert!(matches!(
            model.forward(&seq, 4),
            Err(ModelError::BatchShape { .. })
        ));
        assert!(matches!(
            model.forward(&seq, 0),
            Err(ModelError::BatchShape { .. })
        ));
        assert!(matches!(
            model.forward(&[], 1),
            Err(ModelError::BatchShape { .. })
        ));
        assert!(matches!(
            model.forward(&[1; 17], 1),
            Err(ModelError::BatchShape { .. })
        ));
        let err = model.forward(&[1, 2, 10], 1).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::TokenOutOfRange {
                    token: 10,
                    position: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            model.loss_sum(&seq, &seq[1..], 1),
            Err(ModelError::Length { .. })
        ));
        assert!(matches!(
            model.loss_sum(&seq, &[11; 6], 1),
            Err(ModelError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            Gpt::new(GptConfig {
                n_head: 3,
                ..model.config().clone()
            }),
            Err(ModelError::InvalidConfig { .. })
        ));
        let err = GptConfig::preset("huge", 10).unwrap_err();
        assert!(err.to_string().contains("tiny, nano, gpt2-small"), "{err}");
    }

    #[test]
    fn learns_a_repeated_sequence() {
        let model = tiny_model(16, 3);
        let layout = model.layout().clone();
        let pattern = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2];
        let (inputs, targets) = (&pattern[..16], &pattern[1..]);
        let mut params = model.params().unwrap();
        let mut opt = AdamW::new(layout.total);
        let cfg = AdamWConfig::default();
        let first = model.loss_sum(inputs, targets, 1).unwrap();
        for _ in 0..30 {
            let (_, grad) = model.loss_sum_and_grad(inputs, targets, 1).unwrap();
            opt.update(&mut params, &grad, 1e-2, &layout, &cfg);
            model.set_params(&params).unwrap();
        }
        let last = model.loss_sum(inputs, targets, 1).unwrap();
        eprintln!("learning smoke test: loss {first} -> {last}");
        assert!(last < 0.5 * first, "loss {first} -> {last}");

        // Greedy continuation of a memorised prefix reproduces the pattern.
        let out = model.generate(&pattern[..8], 4, 0.0, 0, 0).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(
            model.generate(&pattern[..8], 4, 1.0, 1, 99).unwrap(),
            out,
            "top_k 1 is greedy"
        );
    }

    #[test]
    fn generate_is_seeded_and_crops_long_prompts() {
        let model = tiny_model(30, 4);
        let prompt: Vec<u32> = (0..40).map(|i| i % 30).collect(); // longer than block 16
        let a = model.generate(&prompt, 20, 1.0, 10, 7).unwrap();
        assert_eq!(a.len(), 20);
        assert!(a.iter().all(|&x| x < 30));
        assert_eq!(model.generate(&prompt, 20, 1.0, 10, 7).unwrap(), a);
        assert_ne!(model.generate(&prompt, 20, 1.0, 10, 8).unwrap(), a);
        assert!(model.generate(&prompt, 0, 1.0, 10, 7).unwrap().is_empty());
        assert!(matches!(
            model.generate(&[], 3, 1.0, 0, 7),
            Err(ModelError::EmptyPrompt)
        ));
        assert!(matches!(
            model.generate(&[30], 3, 1.0, 0, 7),
            Err(ModelError::TokenOutOfRange { .. })
        ));
    }

    #[test]
    fn sample_respects_top_k_and_temperature() {
        let logits = [0.0, 5.0, 1.0, 4.9, -3.0];
        let mut rng = SplitMix64::new(0);
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[sample(&logits, 1.0, 2, &mut rng)] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 800 && seen[3] > 800, "{seen:?}");
        assert_eq!(sample(&logits, 0.0, 0, &mut rng), 1);
        assert_eq!(sample(&logits, 1e-6, 0, &mut rng), 1);
    }

    /// Not a test: prints the time of one training step on the nano preset, batch 12.
    /// Run with `cargo test -p tenax-model --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_nano_loss_sum_and_grad() {
        for vocab in [65, 50304] {
            let config = GptConfig::preset("nano", vocab).unwrap();
            let model = Gpt::new(config.clone()).unwrap();
            model
                .set_params(&init_params(&config, model.layout(), 0))
                .unwrap();
            let mut rng = SplitMix64::new(0);
            let n = 12 * config.block_size;
            let inputs = random_tokens(&mut rng, n, vocab);
            let targets = random_tokens(&mut rng, n, vocab);
            model.loss_sum_and_grad(&inputs, &targets, 12).unwrap();
            let reps = 5;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                model.loss_sum_and_grad(&inputs, &targets, 12).unwrap();
            }
            let step_ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let start = std::time::Instant::now();
            model.loss_sum(&inputs, &targets, 12).unwrap();
            let fwd_ms = start.elapsed().as_secs_f64() * 1e3;
            println!("nano vocab {vocab}: loss_sum_and_grad {step_ms:.1} ms, loss_sum {fwd_ms:.1} ms ({} params)", config.num_params());
        }
    }
}

//! AdamW with flat state, gradient clipping and named tensors for checkpoints.
//!
//! Everything here is plain `f32` loops over flat vectors in layout order, so a step is
//! bit-for-bit deterministic and independent of candle.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::params::ParamLayout;

/// AdamW hyper-parameters other than the learning rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay rate of the first moment.
    pub beta1: f32,
    /// Decay rate of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay, applied to parameters whose layout entry has `decay`.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// nanoGPT's values for small models: betas (0.9, 0.99), eps 1e-8, decay 0.1.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW state: first and second moments, flat in layout order, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// First moment (moving average of gradients).
    pub m: Vec<f32>,
    /// Second moment (moving average of squared gradients).
    pub v: Vec<f32>,
    /// Number of updates applied so far.
    pub step: u64,
}

/// A named, shaped `f32` tensor as stored in checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Tensor name, e.g. `wte.weight` or `adamw.m.wte.weight`.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values, row-major; length is the product of `shape`.
    pub data: Vec<f32>,
}

const M_PREFIX: &str = "adamw.m.";
const V_PREFIX: &str = "adamw.v.";

impl AdamW {
    /// Zero state for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// One AdamW step with PyTorch semantics: for decay parameters `p -= lr * wd * p`
    /// first; then `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` and
    /// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)` with `t` the new step
    /// count. Bias corrections are computed in f64 and rounded to f32 once, as PyTorch
    /// does with Python floats.
    ///
    /// # Panics
    /// If `params`, `grad`, the state and the layout disagree on the length.
    pub fn update(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        lr: f32,
        layout: &ParamLayout,
        cfg: &AdamWConfig,
    ) {
        self.update_scaled(params, grad, 1.0, lr, layout, cfg)
    }

    /// [`AdamW::update`] with the gradient `grad * grad_scale`, scaled as it is read (so
    /// a mean and a clip cost no pass of their own; see [`clip_scale`]).
    ///
    /// # Panics
    /// As [`AdamW::update`].
    pub fn update_scaled(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        grad_scale: f32,
        lr: f32,
        layout: &ParamLayout,
        cfg: &AdamWConfig,
    ) {
        let n = layout.total;
        assert!(
            params.len() == n && grad.len() == n && self.m.len() == n && self.v.len() == n,
            "AdamW::update: params {}, grad {}, m {}, v {} but layout has {n}",
            params.len(),
            grad.len(),
            self.m.len(),
            self.v.len()
        );
        self.step += 1;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bias1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bias2 = 1.0 - f64::from(cfg.beta2).powi(t);
        let step_size = (f64::from(lr) / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let decay_factor = 1.0 - lr * cfg.weight_decay;
        let hyper = crate::kernels::AdamWStep {
            beta1: b1,
            beta2: b2,
            eps,
            step_size,
            bias2_sqrt,
            decay_factor,
            grad_scale,
        };
        let decays = cfg.weight_decay != 0.0;
        // One task per parameter: element-wise, so the bits do not depend on who runs it.
        // Inside a rayon pool (the trainer's, see `Workspace::install`) the tasks run in
        // parallel; elsewhere in order on this thread.
        #[allow(clippy::type_complexity)]
        let mut tasks: Vec<(&mut [f32], &[f32], &mut [f32], &mut [f32], bool)> =
            Vec::with_capacity(layout.entries.len());
        let (mut p, mut g, mut m, mut v) =
            (&mut params[..], grad, &mut self.m[..], &mut self.v[..]);
        for entry in &layout.entries {
            let (p0, p1) = std::mem::take(&mut p).split_at_mut(entry.len);
            let (g0, g1) = g.split_at(entry.len);
            let (m0, m1) = std::mem::take(&mut m).split_at_mut(entry.len);
            let (v0, v1) = std::mem::take(&mut v).split_at_mut(entry.len);
            tasks.push((p0, g0, m0, v0, entry.decay && decays));
            (p, g, m, v) = (p1, g1, m1, v1);
        }
        let run = |(p, g, m, v, decay): (&mut [f32], &[f32], &mut [f32], &mut [f32], bool)| {
            crate::kernels::adamw_slice(p, g, m, v, &hyper, decay)
        };
        if rayon::current_thread_index().is_some() {
            use rayon::prelude::*;
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
    }

    /// The moments as named tensors, `adamw.m.<param>` for every parameter then
    /// `adamw.v.<param>`, each with its parameter's shape. The step count is not a
    /// tensor: store [`AdamW::step`] next to them.
    pub fn named_state(&self, layout: &ParamLayout) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(2 * layout.entries.len());
        for (prefix, flat) in [(M_PREFIX, &self.m), (V_PREFIX, &self.v)] {
            out.extend(layout.entries.iter().map(|e| NamedTensor {
                name: format!("{prefix}{}", e.name),
                shape: e.shape.clone(),
                data: flat[e.range()].to_vec(),
            }));
        }
        out
    }

    /// Rebuilds the state from [`AdamW::named_state`] tensors (any order; other names are
    /// ignored) and the saved step count. Every moment of every parameter must be
    /// present with the right shape; the error names the first that is not.
    pub fn from_named_state(
        layout: &ParamLayout,
        tensors: &[NamedTensor],
        step: u64,
    ) -> Result<Self, ModelError> {
        let m = gather_flat(layout, tensors, M_PREFIX)?;
        let v = gather_flat(layout, tensors, V_PREFIX)?;
        Ok(Self { m, v, step })
    }
}

/// Finds `<prefix><param>` for every parameter, checks it and copies it to a flat vector.
fn gather_flat(
    layout: &ParamLayout,
    tensors: &[NamedTensor],
    prefix: &str,
) -> Result<Vec<f32>, ModelError> {
    let by_name: std::collections::HashMap<&str, &NamedTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut flat = vec![0f32; layout.total];
    for e in &layout.entries {
        let name = format!("{prefix}{}", e.name);
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        if t.shape != e.shape || t.data.len() != e.len {
            return Err(ModelError::TensorShape {
                name,
                expected: e.shape.clone(),
                got: t.shape.clone(),
                got_len: t.data.len(),
            });
        }
        flat[e.range()].copy_from_slice(&t.data);
    }
    Ok(flat)
}

/// The parameters as named tensors `<param>`, layout order.
///
/// # Panics
/// If `flat` is not `layout.total` long.
pub fn named_params(layout: &ParamLayout, flat: &[f32]) -> Vec<NamedTensor> {
    assert_eq!(
        flat.len(),
        layout.total,
        "named_params: flat vector length vs layout"
    );
    layout
        .entries
        .iter()
        .map(|e| NamedTensor {
            name: e.name.clone(),
            shape: e.shape.clone(),
            data: flat[e.range()].to_vec(),
        })
        .collect()
}

/// The flat parameter vector from [`named_params`] tensors (any order; other names are
/// ignored). The error names the first missing or mis-shaped parameter.
pub fn params_from_named(
    layout: &ParamLayout,
    tensors: &[NamedTensor],
) -> Result<Vec<f32>, ModelError> {
    gather_flat(layout, tensors, "")
}

/// Each parameter's sum of squares in f64, in `layout` order: one pass per tensor
/// (8 lanes, then the lanes, then the tail; see [`crate::kernels::sum_squares_f64`]).
/// Inside a rayon pool (the trainer's, see `Workspace::install`) the tensors are summed
/// in parallel; each tensor's value does not depend on who sums it.
///
/// # Panics
/// If `grad` is not `layout.total` long.
pub fn tensor_squares(grad: &[f32], layout: &ParamLayout) -> Vec<f64> {
    assert_eq!(
        grad.len(),
        layout.total,
        "tensor_squares: gradient vs layout"
    );
    let one = |e: &crate::params::ParamEntry| {
        let mut s = 0f64;
        crate::kernels::sum_squares_f64(&grad[e.range()], &mut s);
        s
    };
    if rayon::current_thread_index().is_some() {
        use rayon::prelude::*;
        layout.entries.par_iter().map(one).collect()
    } else {
        layout.entries.iter().map(one).collect()
    }
}

/// The global L2 norm of `sum / divisor` and the one factor that divides and clips it
/// to `max_norm` (0 disables clipping), from per-tensor sums of squares of `sum`
/// ([`tensor_squares`]) added in the order given: the whole model's layout order. A
/// pipeline stage holds some tensors only; every stage gathers all stages' per-tensor
/// sums and adds them in that one order, so every stage, and a run with any number of
/// stages, gets the same norm and factor. Pass the factor to [`AdamW::update_scaled`].
pub fn clip_scale_from_squares(squares: &[f64], divisor: f32, max_norm: f32) -> (f64, f32) {
    let mut total = 0f64;
    for &s in squares {
        total += s;
    }
    let norm = total.sqrt() / f64::from(divisor);
    let clip = if max_norm > 0.0 && norm > f64::from(max_norm) {
        f64::from(max_norm) / (norm + 1e-6)
    } else {
        1.0
    };
    (norm, (clip / f64::from(divisor)) as f32)
}

/// For a gradient held as `sum` (to be divided by `divisor`), flat in `layout`: the
/// global L2 norm of `sum / divisor` and the factor that divides and clips it, as
/// [`clip_scale_from_squares`] over [`tensor_squares`] (per-tensor sums combined in
/// layout order; until pipelines came it was one 8-lane pass over the whole vector,
/// which gave other bits).
pub fn clip_scale(sum: &[f32], layout: &ParamLayout, divisor: f32, max_norm: f32) -> (f64, f32) {
    clip_scale_from_squares(&tensor_squares(sum, layout), divisor, max_norm)
}

/// Global-norm gradient clipping. The norm is `sqrt` of the sum of squares accumulated in
/// f64 in a fixed order (8 lanes); if it exceeds `max_norm` every element is scaled by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping (NaN or infinite if the
/// gradient is; then nothing is scaled). `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(grad: &mut [f32], max_norm: f32) -> f64 {
    let mut squares = 0f64;
    crate::kernels::sum_squares_f64(grad, &mut squares);
    let norm = squares.sqrt();
    if max_norm > 0.0 && norm > f64::from(max_norm) {
        let scale = (f64::from(max_norm) / (norm + 1e-6)) as f32;
        crate::kernels::scale(grad, scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GptConfig;
    use crate::params::{ParamEntry, ParamLayout};

    /// A layout with one decayed 2-element weight and one undecayed 1-element bias.
    fn small_layout() -> ParamLayout {
        ParamLayout {
            entries: vec![
                ParamEntry {
                    name: "a.bias".into(),
                    shape: vec![1],
                    offset: 0,
                    len: 1,
                    decay: false,
                },
                ParamEntry {
                    name: "a.weight".into(),
                    shape: vec![1, 2],
                    offset: 1,
                    len: 2,
                    decay: true,
                },
            ],
            total: 3,
        }
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let layout = small_layout();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let lr = 0.1;
        // Elements: bias (no decay), weight[0], weight[1] (decay 0.1).
        let mut p = vec![1.0f32, 1.0, 1.0];
        let mut opt = AdamW::new(3);
        // Step 1: m_hat = g, v_hat = g^2, so the Adam step is lr * sign(g) (eps negligible).
        opt.update(&mut p, &[0.5, 0.5, 0.5], lr, &layout, &cfg);
        // bias: 1 - 0.1 = 0.9; weights: 1 * (1 - 0.01) - 0.1 = 0.89.
        let want1 = [0.9f32, 0.89, 0.89];
        // Step 2, gradients 0.5 (constant) for bias and weight[0], -1.0 for weight[1]:
        // constant g: again lr * sign(g): bias 0.8, weight[0] 0.89 * 0.99 - 0.1 = 0.7811.
        // weight[1]: m = 0.9*0.05 - 0.1 = -0.055, v = 0.99*0.0025 + 0.01 = 0.012475,
        // m_hat = -0.055/0.19 = -0.28947368, v_hat = 0.012475/0.0199 = 0.62688442,
        // step = 0.1 * -0.28947368 / 0.79176033 = -0.03656077;
        // p = 0.89 * 0.99 + 0.03656077 = 0.91766077.
        for (got, want) in p.iter().zip(want1) {
            assert!((got - want).abs() < 1e-6, "step 1: {p:?} vs {want1:?}");
        }
        opt.update(&mut p, &[0.5, 0.5, -1.0], lr, &layout, &cfg);
        let want2 = [0.8f32, 0.7811, 0.917_660_8];
        for (got, want) in p.iter().zip(want2) {
            assert!((got - want).abs() < 1e-6, "step 2: {p:?} vs {want2:?}");
        }
        assert_eq!(opt.step, 2);
        assert!((opt.m[2] - -0.055).abs() < 1e-7 && (opt.v[2] - 0.012475).abs() < 1e-7);

        // Without decay the weights follow the bias exactly.
        let no_decay = AdamWConfig {
            weight_decay: 0.0,
            ..cfg
        };
        let mut p = vec![1.0f32, 1.0, 1.0];
        let mut opt = AdamW::new(3);
        opt.update(&mut p, &[0.5, 0.5, 0.5], lr, &layout, &no_decay);
        opt.update(&mut p, &[0.5, 0.5, -1.0], lr, &layout, &no_decay);
        let want = [0.8f32, 0.8, 0.936_560_77];
        for (got, want) in p.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "no decay: {p:?}");
        }
    }

    #[test]
    fn adamw_named_state_round_trips_and_reports_missing() {
        let c = GptConfig::preset("tiny", 13).unwrap();
        let layout = ParamLayout::for_config(&c);
        let mut opt = AdamW::new(layout.total);
        for (i, (m, v)) in opt.m.iter_mut().zip(opt.v.iter_mut()).enumerate() {
            *m = i as f32 * 0.5;
            *v = i as f32 * 0.25;
        }
        opt.step = 17;
        let mut named = opt.named_state(&layout);
        assert_eq!(named.len(), 2 * layout.entries.len());
        assert!(named
            .iter()
            .any(|t| t.name == "adamw.m.h.01.mlp.c_fc.weight" && t.shape == vec![32, 128]));
        named.reverse(); // order must not matter
        let back = AdamW::from_named_state(&layout, &named, 17).unwrap();
        assert_eq!(back, opt);

        let missing: Vec<NamedTensor> = named
            .iter()
            .filter(|t| t.name != "adamw.v.wpe.weight")
            .cloned()
            .collect();
        let err = AdamW::from_named_state(&layout, &missing, 17).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingTensor { name } if name == "adamw.v.wpe.weight"),
            "{err}"
        );
        assert!(err.to_string().contains("adamw.v.wpe.weight"));

        let mut bad = named.clone();
        let t = bad
            .iter_mut()
            .find(|t| t.name == "adamw.m.ln_f.bias")
            .unwrap();
        t.shape = vec![31];
        t.data.pop();
        let err = AdamW::from_named_state(&layout, &bad, 17).unwrap_err();
        assert!(
            matches!(&err, ModelError::TensorShape { name, .. } if name == "adamw.m.ln_f.bias"),
            "{err}"
        );
    }

    #[test]
    fn named_params_round_trip() {
        let c = GptConfig::preset("tiny", 13).unwrap();
        let layout = ParamLayout::for_config(&c);
        let flat: Vec<f32> = (0..layout.total).map(|i| i as f32).collect();
        let named = named_params(&layout, &flat);
        assert_eq!(named[0].name, layout.entries[0].name);
        assert_eq!(params_from_named(&layout, &named).unwrap(), flat);
        let err = params_from_named(&layout, &named[1..]).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingTensor { name } if *name == layout.entries[0].name)
        );
    }

    /// One 1-D tensor of `n` values.
    fn flat_layout(n: usize) -> ParamLayout {
        ParamLayout {
            entries: vec![ParamEntry {
                name: "x".into(),
                shape: vec![n],
                offset: 0,
                len: n,
                decay: false,
            }],
            total: n,
        }
    }

    /// The norm is per-tensor sums of squares added in layout order: the sums of a
    /// model's tensors held by different pipeline stages, put back in the whole model's
    /// order, give the same bits; another order (or one pass over the whole vector)
    /// generally does not.
    #[test]
    fn clip_norm_is_per_tensor_sums_in_layout_order() {
        let c = GptConfig::preset("tiny", 13).unwrap();
        let whole = ParamLayout::for_config(&c);
        let mut rng = tenax_core::rng::SplitMix64::new(3);
        let grad: Vec<f32> = (0..whole.total)
            .map(|_| (rng.next_normal() * 10.0) as f32)
            .collect();
        let (norm, scale) = clip_scale(&grad, &whole, 7.0, 1.0);
        // Stage 0 holds block 0 and the embeddings, stage 1 block 1 and the head: their
        // tensors' sums, each summed on its own, gathered by name in the whole order.
        let stages = [(0..1u32, true, false), (1..2u32, false, true)];
        let mut by_name = std::collections::HashMap::new();
        for (i, (blocks, embeddings, head)) in stages.into_iter().enumerate() {
            let l = ParamLayout::for_stage(
                &c,
                &tenax_core::pipeline::StageLayers {
                    stage: i as u32,
                    blocks,
                    embeddings,
                    head,
                },
            );
            let g: Vec<f32> = l
                .entries
                .iter()
                .flat_map(|e| grad[whole.get(&e.name).unwrap().range()].to_vec())
                .collect();
            for (e, s) in l.entries.iter().zip(tensor_squares(&g, &l)) {
                by_name.insert(e.name.clone(), s);
            }
        }
        let gathered: Vec<f64> = whole.entries.iter().map(|e| by_name[&e.name]).collect();
        let (n2, s2) = clip_scale_from_squares(&gathered, 7.0, 1.0);
        assert_eq!(
            (n2.to_bits(), s2.to_bits()),
            (norm.to_bits(), scale.to_bits())
        );
        // The oracle can fail: the same sums in reverse order differ in the last bits.
        let mut reversed = gathered.clone();
        reversed.reverse();
        let mut one_pass = 0f64;
        crate::kernels::sum_squares_f64(&grad, &mut one_pass);
        let (n3, _) = clip_scale_from_squares(&reversed, 7.0, 1.0);
        let n4 = one_pass.sqrt() / 7.0;
        assert!(
            n3.to_bits() != norm.to_bits() || n4.to_bits() != norm.to_bits(),
            "neither another order nor one pass changes the bits: the test cannot tell"
        );
    }

    #[test]
    fn clip_scale_divides_and_clips_in_one_factor() {
        // (sum, divisor, max_norm, want norm of sum/divisor, want factor)
        let table: Vec<(Vec<f32>, f32, f32, f64, f64)> = vec![
            (vec![30.0, 40.0], 10.0, 10.0, 5.0, 0.1), // below: the mean only
            (vec![30.0, 40.0], 10.0, 1.0, 5.0, 0.1 / 5.0), // clipped to ~1
            (vec![30.0, 40.0], 10.0, 0.0, 5.0, 0.1),  // disabled
            (vec![0.0, 0.0], 4.0, 1.0, 0.0, 0.25),    // zero
        ];
        for (sum, divisor, max_norm, want_norm, want_scale) in table {
            let layout = flat_layout(sum.len());
            let (norm, scale) = clip_scale(&sum, &layout, divisor, max_norm);
            assert!((norm - want_norm).abs() < 1e-12, "{sum:?}: norm {norm}");
            assert!(
                (f64::from(scale) / want_scale - 1.0).abs() < 1e-5,
                "{sum:?} {max_norm}: scale {scale}"
            );
            // The same as dividing, then clip_grad_norm, up to rounding.
            let mut g: Vec<f32> = sum.iter().map(|x| x / divisor).collect();
            let n2 = clip_grad_norm(&mut g, max_norm);
            assert!((n2 - norm).abs() < 1e-9);
            for (a, b) in g.iter().zip(&sum) {
                assert!((a - b * scale).abs() <= 1e-6 * a.abs().max(1e-30));
            }
        }
        assert!(clip_scale(&[f32::NAN], &flat_layout(1), 1.0, 1.0)
            .0
            .is_nan());
        // AdamW with a factor of 1 is AdamW.
        let layout = small_layout();
        let (mut a, mut b) = (AdamW::new(layout.total), AdamW::new(layout.total));
        let (mut p1, mut p2) = (vec![0.5f32, -0.25, 1.0], vec![0.5f32, -0.25, 1.0]);
        let g = [0.1f32, -0.2, 0.3];
        let cfg = AdamWConfig::default();
        a.update(&mut p1, &g, 1e-2, &layout, &cfg);
        b.update_scaled(&mut p2, &[0.2, -0.4, 0.6], 0.5, 1e-2, &layout, &cfg);
        assert_eq!(p1, p2);
    }

    #[test]
    fn clip_grad_norm_table() {
        // (grad, max_norm, want pre-clip norm, want grad after)
        let s = (1.0 / (5.0 + 1e-6)) as f32;
        let table: Vec<(Vec<f32>, f32, f64, Vec<f32>)> = vec![
            (vec![3.0, 4.0], 10.0, 5.0, vec![3.0, 4.0]), // below: untouched
            (vec![3.0, 4.0], 5.0, 5.0, vec![3.0, 4.0]),  // equal: untouched
            (vec![3.0, 4.0], 1.0, 5.0, vec![3.0 * s, 4.0 * s]), // clipped to ~1
            (vec![3.0, 4.0], 0.0, 5.0, vec![3.0, 4.0]),  // disabled
            (vec![3.0, 4.0], -1.0, 5.0, vec![3.0, 4.0]), // disabled
            (vec![], 1.0, 0.0, vec![]),                  // empty
            (vec![0.0, 0.0, 0.0], 1.0, 0.0, vec![0.0, 0.0, 0.0]), // zero
            (
                vec![1.0, 1.0, 1.0, 1.0],
                1.0,
                2.0,
                vec![(1.0 / (2.0 + 1e-6)) as f32; 4],
            ),
        ];
        for (grad, max_norm, want_norm, want) in table {
            let mut g = grad.clone();
            let norm = clip_grad_norm(&mut g, max_norm);
            assert!(
                (norm - want_norm).abs() < 1e-12,
                "{grad:?} {max_norm}: norm {norm}"
            );
            assert_eq!(g, want, "{grad:?} max_norm {max_norm}");
        }
        let mut g = vec![f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut g, 1.0).is_nan());
        // Accumulated in f64: 1e20^2 overflows f32 but not f64.
        let mut g = vec![1e20f32, 1e20];
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm / (2f64.sqrt() * 1e20) - 1.0).abs() < 1e-6);
        assert!((g[0] - 1.0 / 2f32.sqrt()).abs() < 1e-6);
    }
}

//! Fused CPU kernels of the training step, on plain `f32` slices, each with its
//! hand-written backward: layer norm, exact (erf) GELU, causal multi-head attention,
//! softmax cross-entropy, and matrix products through the `gemm` crate (candle's own
//! CPU matmul).
//!
//! Every kernel reduces in a fixed order that does not depend on the number of threads:
//! work is split by rows (or by (sequence, head) pairs), never inside a sum, and sums
//! over a row use a fixed 16-lane pattern. The same inputs give the same bits at any
//! thread count and on any x86-64 ISA level (the AVX-512 and AVX2 builds of a kernel
//! run the same arithmetic as the portable one; no fused multiply-add is used).
//!
//! Each kernel is checked against the composition of unfused candle ops, forward and
//! gradient, in `model/tests/kernels_vs_candle.rs` (max relative error of every tensor
//! <= 1e-5 in f32; per element, as close as the unfused composition in f32), and the
//! whole step against candle's graph in the tests of [`crate::step`].

#![warn(clippy::undocumented_unsafe_blocks)]

use gemm::Parallelism;

/// Lanes of the fixed-order sums: wide enough for AVX-512, the same on every machine.
const LANES: usize = 16;

/// LayerNorm epsilon, as torch's default.
pub const LN_EPS: f32 = 1e-5;

/// Compiles `$body` three times (AVX-512, AVX2, portable) and runs the best one the CPU
/// has. The arithmetic is the same in each, so the bits are too.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Sum of `x` in a fixed order: 16 lanes, then the lanes, then the tail.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for &t in tail {
        s += t;
    }
    s
}

/// The largest element of `x` (NEG_INFINITY when empty), in 16 lanes so that the loop
/// vectorises (max is exact, so the order does not matter).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc {
        m = m.max(a);
    }
    for &t in tail {
        m = m.max(t);
    }
    m
}

/// Dot product of `a` and `b` in the fixed order of [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let split = n - n % LANES;
    for (ca, cb) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    for i in split..n {
        s += a[i] * b[i];
    }
    s
}

/// `exp(x)` in f32 without libm, so that loops over it vectorise: Cephes' `expf`
/// (range reduction by ln 2 in two parts, degree-6 polynomial; ~1 ulp). Inputs below
/// -87.3 give about 1e-38 instead of underflowing further; above 88.7, about 3e38.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of 1.5 * 2^23 + n (exact for |n| < 2^22): integer work only, so
    // the loop vectorises (a saturating `as i32` would not).
    let k = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    y * f32::from_bits(k.wrapping_add(127) << 23)
}

/// `Phi(x)`, the standard normal CDF, from `erfc` by the Chebyshev fit of Numerical
/// Recipes (`erfcc`, relative error < 1.2e-7 everywhere, so Phi keeps its relative
/// accuracy in the left tail).
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // Phi(x) = erfc(u) / 2 with u = -x / sqrt(2).
    let u = -x * FRAC_1_SQRT_2;
    let z = u.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    // z^2 = x^2 / 2, from x (one rounding) rather than from z (two, then squared).
    let r = t * exp_f32(poly - 0.5 * (x * x));
    let erfc = if u >= 0.0 { r } else { 2.0 - r };
    0.5 * erfc
}

/// `(gelu(x), gelu'(x))` = `(x Phi(x), Phi(x) + x phi(x))`.
#[inline(always)]
fn gelu_and_derivative(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = normal_cdf(x);
    let pdf = INV_SQRT_2PI * exp_f32(-0.5 * (x * x));
    (x * cdf, cdf + x * pdf)
}

multiversion! {
    /// GELU (exact, erf form) of `x` into `out`: `x * Phi(x)`, with its derivative
    /// `Phi(x) + x * phi(x)` kept in `dgelu` for the backward pass (which then reads one
    /// stream instead of recomputing).
    pub fn gelu_fwd(x: &[f32], out: &mut [f32], dgelu: &mut [f32]) {
        for ((o, d), &v) in out.iter_mut().zip(dgelu.iter_mut()).zip(x) {
            (*o, *d) = gelu_and_derivative(v);
        }
    }
}

multiversion! {
    /// [`gelu_fwd`] of `x + b` (`b` added to every row; rows of `b.len()` values): the
    /// bias of the layer before, in the same pass.
    pub fn bias_gelu_fwd(x: &[f32], b: &[f32], out: &mut [f32], dgelu: &mut [f32]) {
        let w = b.len();
        for ((xr, or), dr) in x
            .chunks_exact(w)
            .zip(out.chunks_exact_mut(w))
            .zip(dgelu.chunks_exact_mut(w))
        {
            for (((&xv, o), d), &bv) in xr.iter().zip(or.iter_mut()).zip(dr.iter_mut()).zip(b) {
                (*o, *d) = gelu_and_derivative(xv + bv);
            }
        }
    }
}

multiversion! {
    /// GELU backward: `dout *= dgelu`, the derivative [`gelu_fwd`] kept.
    pub fn gelu_bwd(dgelu: &[f32], dout: &mut [f32]) {
        for (d, &g) in dout.iter_mut().zip(dgelu) {
            *d *= g;
        }
    }
}

multiversion! {
    /// LayerNorm over rows of `w.len()` values: `out = (x - mean) * rstd * w + b`, with
    /// each row's mean and `rstd = 1 / sqrt(var + eps)` kept for the backward pass.
    pub fn layer_norm_fwd(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        let c = w.len();
        let inv_c = 1.0 / c as f32;
        for (((row, o), m), r) in x
            .chunks_exact(c)
            .zip(out.chunks_exact_mut(c))
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
        {
            let mu = sum(row) * inv_c;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = v - mu;
            }
            let var = dot(o, o) * inv_c;
            let s = 1.0 / (var + LN_EPS).sqrt();
            for ((o, &wi), &bi) in o.iter_mut().zip(w).zip(b) {
                *o = *o * s * wi + bi;
            }
            *m = mu;
            *r = s;
        }
    }
}

multiversion! {
    /// LayerNorm backward for the input: adds `dx` to `dx_acc` for each row, from the
    /// upstream gradient `dout`, the input `x` and the forward's `mean` and `rstd`.
    /// `scratch` holds one row.
    pub fn layer_norm_bwd_input(
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dx_acc: &mut [f32],
        scratch: &mut [f32],
    ) {
        let c = w.len();
        let inv_c = 1.0 / c as f32;
        let (norm, dnorm) = scratch[..2 * c].split_at_mut(c);
        for ((((d, row), dx), &mu), &s) in dout
            .chunks_exact(c)
            .zip(x.chunks_exact(c))
            .zip(dx_acc.chunks_exact_mut(c))
            .zip(mean)
            .zip(rstd)
        {
            for (((n, dn), (&v, &dv)), &wi) in norm
                .iter_mut()
                .zip(dnorm.iter_mut())
                .zip(row.iter().zip(d))
                .zip(w)
            {
                *n = (v - mu) * s;
                *dn = wi * dv;
            }
            let dnorm_mean = sum(dnorm) * inv_c;
            let dnorm_norm_mean = dot(dnorm, norm) * inv_c;
            for ((g, &n), &dn) in dx.iter_mut().zip(norm.iter()).zip(dnorm.iter()) {
                *g += (dn - dnorm_mean - n * dnorm_norm_mean) * s;
            }
        }
    }
}

multiversion! {
    /// LayerNorm backward for the parameters: adds `sum_rows(dout * norm)` to `dw` and
    /// `sum_rows(dout)` to `db`, rows in order.
    pub fn layer_norm_bwd_params(
        dout: &[f32],
        x: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let c = dw.len();
        for (((d, row), &mu), &s) in dout
            .chunks_exact(c)
            .zip(x.chunks_exact(c))
            .zip(mean)
            .zip(rstd)
        {
            for (((gw, gb), &dv), &v) in dw.iter_mut().zip(db.iter_mut()).zip(d).zip(row) {
                *gw += dv * ((v - mu) * s);
                *gb += dv;
            }
        }
    }
}

multiversion! {
    /// Adds every row of `x` (rows of `acc.len()` values) to `acc`, rows in order: the
    /// gradient of a bias.
    pub fn add_rows(x: &[f32], acc: &mut [f32]) {
        let c = acc.len();
        for row in x.chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

multiversion! {
    /// `out = x + b` with `b` added to every row.
    pub fn add_rows_bias(x: &[f32], b: &[f32], out: &mut [f32]) {
        for (o, row) in out.chunks_exact_mut(b.len()).zip(x.chunks_exact(b.len())) {
            for ((o, &v), &bi) in o.iter_mut().zip(row).zip(b) {
                *o = v + bi;
            }
        }
    }
}

multiversion! {
    /// Fills every row of `out` with `row`.
    pub fn fill_rows(row: &[f32], out: &mut [f32]) {
        for o in out.chunks_exact_mut(row.len()) {
            o.copy_from_slice(row);
        }
    }
}

multiversion! {
    /// `out[i] = a[i] + b[i]`.
    pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

multiversion! {
    /// Causal softmax of the `t x t` score block `s` (rows of query positions) scaled by
    /// `scale`, in place: row `i` keeps columns `0..=i`, the rest become 0. Rows are
    /// processed in whole lanes with the masked columns selected away, so the loops have
    /// no ragged tails.
    pub fn causal_softmax(s: &mut [f32], t: usize, scale: f32) {
        for (i, row) in s.chunks_exact_mut(t).enumerate() {
            // The live columns rounded up to whole lanes; the rest is 0.
            let (row, dead) = row.split_at_mut((i + 1).next_multiple_of(LANES).min(t));
            dead.fill(0.0);
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j <= i { *v * scale } else { f32::NEG_INFINITY };
            }
            let max = max_of(row);
            for (j, v) in row.iter_mut().enumerate() {
                let e = exp_f32(*v - max);
                *v = if j <= i { e } else { 0.0 };
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Backward of [`causal_softmax`]: on entry `dp` holds `dL/dp`; on exit
    /// `scale * p * (dp - sum_k p_k dp_k)`, the gradient of the unscaled scores (0 above
    /// the diagonal, where `p` is 0).
    pub fn causal_softmax_bwd(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        for (prow, drow) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let inner = dot(prow, drow);
            for (d, &pv) in drow.iter_mut().zip(prow) {
                *d = scale * (pv * (*d - inner));
            }
        }
    }
}

multiversion! {
    /// Softmax cross-entropy of `logits` (rows of `v`) against `targets`, fused with its
    /// gradient: returns each row's loss in `losses` and overwrites `logits` with
    /// `softmax - onehot(target)` (the gradient of the summed loss).
    pub fn softmax_xent(logits: &mut [f32], v: usize, targets: &[u32], losses: &mut [f32]) {
        for ((row, &t), loss) in logits.chunks_exact_mut(v).zip(targets).zip(losses.iter_mut()) {
            let max = max_of(row);
            let target_logit = row[t as usize];
            for x in row.iter_mut() {
                *x = exp_f32(*x - max);
            }
            let total = sum(row);
            *loss = total.ln() + max - target_logit;
            let inv = 1.0 / total;
            for x in row.iter_mut() {
                *x *= inv;
            }
            row[t as usize] -= 1.0;
        }
    }
}

multiversion! {
    /// Each row's softmax cross-entropy of `logits` against `targets`, without the
    /// gradient (`logits` is left as it was).
    pub fn xent_rows(logits: &[f32], v: usize, targets: &[u32], losses: &mut [f32]) {
        for ((row, &t), loss) in logits.chunks_exact(v).zip(targets).zip(losses.iter_mut()) {
            let max = max_of(row);
            let mut acc = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for j in 0..LANES {
                    acc[j] += exp_f32(c[j] - max);
                }
            }
            let mut total = 0f32;
            for a in acc {
                total += a;
            }
            for &x in tail {
                total += exp_f32(x - max);
            }
            *loss = total.ln() + max - row[t as usize];
        }
    }
}

multiversion! {
    /// One AdamW update of a slice (PyTorch's semantics, as [`crate::AdamW`]): decoupled
    /// weight decay `p *= decay_factor` first when `decay`, then the moments and the step
    /// with the gradient `g * grad_scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_slice(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hyper: &AdamWStep,
        decay: bool,
    ) {
        let AdamWStep { beta1: b1, beta2: b2, eps, step_size, bias2_sqrt, decay_factor, grad_scale } =
            *hyper;
        if decay {
            p.iter_mut().for_each(|x| *x *= decay_factor);
        }
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bias2_sqrt + eps;
            *p -= step_size * *m / denom;
        }
    }
}

/// The per-step constants of an AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
    /// `1 - lr * weight_decay`.
    pub decay_factor: f32,
    /// Factor applied to every gradient element as it is read (1: none; exact).
    pub grad_scale: f32,
}

multiversion! {
    /// `sum(x^2)` in f64, in a fixed order (8 lanes, then the lanes, then the tail).
    pub fn sum_squares_f64(x: &[f32], out: &mut f64) {
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..8 {
                let v = f64::from(c[j]);
                acc[j] += v * v;
            }
        }
        let mut s = 0f64;
        for a in acc {
            s += a;
        }
        for &t in tail {
            s += f64::from(t) * f64::from(t);
        }
        *out = s;
    }
}

multiversion! {
    /// `x *= s`.
    pub fn scale(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

/// A strided view of a row-major (or transposed) matrix for [`matmul`]: the element at
/// (row `i`, column `j`) is `ptr[i * rs + j * cs]`, with `len` values readable from
/// `ptr` (what [`matmul`] checks its extents against in debug builds).
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    /// First element.
    pub ptr: *const f32,
    /// Distance between rows.
    pub rs: isize,
    /// Distance between columns.
    pub cs: isize,
    /// Values readable from `ptr` on.
    pub len: usize,
}

impl Mat {
    /// A row-major matrix with rows of `cols` values starting at `data`.
    pub fn rows(data: &[f32], cols: usize) -> Self {
        Self::strided(data, cols as isize, 1)
    }

    /// The transpose of the row-major matrix with rows of `cols` values at `data`.
    pub fn rows_t(data: &[f32], cols: usize) -> Self {
        Self::strided(data, 1, cols as isize)
    }

    /// The matrix whose element (row `i`, column `j`) is `data[i * rs + j * cs]`.
    pub fn strided(data: &[f32], rs: isize, cs: isize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs,
            cs,
            len: data.len(),
        }
    }

    /// The view addresses a `rows x cols` matrix inside its `len` values (strides not
    /// negative).
    fn holds(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let (Ok(rs), Ok(cs)) = (usize::try_from(self.rs), usize::try_from(self.cs)) else {
            return false;
        };
        (rows - 1)
            .checked_mul(rs)
            .and_then(|r| r.checked_add((cols - 1).checked_mul(cs)?))
            .is_some_and(|last| last < self.len)
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] a (m x k) * b (k x n)` through `gemm`, on
/// `threads` threads (gemm splits the output, never the `k` sum, and its blocking does not
/// depend on the thread count, so the bits do not either).
///
/// Debug builds assert the extents they can see: `a` and `b` inside their `len`, and
/// `n <= dst_rs` (the destination's length is the caller's to check).
///
/// # Safety
/// `a` and `b` must address `m x k` and `k x n` readable elements inside their `len`, and
/// `dst` `m x n` writable ones at row stride `dst_rs`, none overlapping `dst`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    debug_assert!(a.holds(m, k), "matmul: a {a:?} does not hold {m} x {k}");
    debug_assert!(b.holds(k, n), "matmul: b {b:?} does not hold {k} x {n}");
    debug_assert!(
        m <= 1 || n <= dst_rs,
        "matmul: dst rows of {n} overlap at stride {dst_rs}"
    );
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the caller guarantees the extents; gemm computes
    // dst = alpha * dst + beta * a * b, reading dst only when asked.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = f64::from(exp_f32(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn normal_cdf_keeps_relative_accuracy_in_both_tails() {
        // Reference: Phi(x) = erfc(-x / sqrt 2) / 2 in f64, erfc by its series below 2
        // and by its continued fraction above.
        fn phi_ref(x: f64) -> f64 {
            0.5 * erfc_ref(-x / std::f64::consts::SQRT_2)
        }
        fn erfc_ref(z: f64) -> f64 {
            if z < 0.0 {
                return 2.0 - erfc_ref(-z);
            }
            if z < 2.0 {
                // erf series: 2/sqrt(pi) * sum (-1)^n z^(2n+1) / (n! (2n+1))
                let mut term = z;
                let mut s = z;
                let mut n = 0.0;
                loop {
                    n += 1.0;
                    term *= -z * z / n;
                    let add = term / (2.0 * n + 1.0);
                    s += add;
                    if add.abs() < 1e-17 {
                        break;
                    }
                }
                1.0 - 2.0 / std::f64::consts::PI.sqrt() * s
            } else {
                // Continued fraction (Lentz) for erfc.
                let mut f = z;
                let mut c = z;
                let mut d = 0.0;
                for k in 1..200 {
                    let a = k as f64 / 2.0;
                    d = z + a * d;
                    c = z + a / c;
                    d = 1.0 / d;
                    let delta = c * d;
                    f *= delta;
                    if (delta - 1.0).abs() < 1e-16 {
                        break;
                    }
                }
                (-z * z).exp() / (f * std::f64::consts::PI.sqrt())
            }
        }
        let mut worst = 0f64;
        let mut x = -9.0f32;
        while x < 9.0 {
            let got = f64::from(normal_cdf(x));
            let want = phi_ref(f64::from(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.01;
        }
        assert!(worst < 5e-6, "worst relative error of Phi {worst:e}");
    }

    #[test]
    fn sums_do_not_depend_on_alignment_or_length_tail() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = x.iter().map(|&v| f64::from(v)).sum();
        assert!((f64::from(sum(&x)) - want).abs() < 1e-5);
        let d = dot(&x, &x);
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((f64::from(d) - want).abs() < 1e-5);
    }
}

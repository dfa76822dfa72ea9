//! Fused softmax cross-entropy as a candle custom op with a hand-written backward.
//!
//! With a GPT-2 vocabulary the logits are by far the largest tensor of a step
//! (`batch * t * 50304` values), and composing the loss from elementary candle ops walks
//! over them about ten times. This op reads them twice forward and once backward. Its
//! gradient is checked against finite differences together with the rest of the model.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Shape, Storage, Tensor};

/// Per-row cross-entropy `-log softmax(logits)[target]` of `logits` `(n, V)` (F32 or
/// F64); the result has shape `(n)`.
pub(crate) fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy_rows: {} targets for {n} rows", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy_rows: target {t} outside vocabulary {v}");
    }
    if !logits.device().is_cpu() {
        return cross_entropy_rows_composed(logits, targets);
    }
    logits.contiguous()?.apply_op1(SoftmaxCrossEntropy {
        targets: targets.into(),
    })
}

/// [`cross_entropy_rows`] from elementary candle ops, for devices the fused op has no
/// kernel for (CUDA): `logsumexp(row) - row[target]`, the max detached (it cancels).
pub(crate) fn cross_entropy_rows_composed(
    logits: &Tensor,
    targets: &[u32],
) -> candle_core::Result<Tensor> {
    let n = targets.len();
    let max = logits.max_keepdim(1)?.detach();
    let lse = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .add(&max)?; // (n, 1)
    let ids = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let picked = logits.contiguous()?.gather(&ids, 1)?; // (n, 1)
    lse.sub(&picked)?.reshape(n)
}

struct SoftmaxCrossEntropy {
    targets: Arc<[u32]>,
}

/// The float operations the kernels need, for f32 and f64.
trait Float:
    Copy
    + PartialOrd
    + std::ops::Sub<Output = Self>
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// Row losses: `log(sum exp(x - max)) + max - x[target]`.
fn forward_rows<T: Float>(logits: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    logits
        .chunks_exact(v)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row
                .iter()
                .fold(T::NEG_INFINITY, |m, &x| if x > m { x } else { m });
            let sum = row.iter().fold(T::ZERO, |s, &x| s + (x - max).exp());
            sum.ln() + max - row[t as usize]
        })
        .collect()
}

/// `d loss_r / d x_rj = (softmax(x_r)_j - [j == t_r]) * grad_r`, with the log-sum-exp of
/// row `r` recovered from the forward result as `loss_r + x_r[t_r]`.
fn backward_rows<T: Float>(
    logits: &[T],
    v: usize,
    targets: &[u32],
    losses: &[T],
    grad: &[T],
) -> Vec<T> {
    let mut out = Vec::with_capacity(logits.len());
    for (((row, &t), &loss), &g) in logits.chunks_exact(v).zip(targets).zip(losses).zip(grad) {
        let lse = loss + row[t as usize];
        out.extend(row.iter().map(|&x| (x - lse).exp() * g));
        let target = out.len() - v + t as usize;
        out[target] = out[target] - g;
    }
    out
}

/// The contiguous `f32`/`f64` values of a CPU tensor, copied only if `f` needs them.
fn with_cpu_data<R>(
    t: &Tensor,
    f32_fn: impl FnOnce(&[f32]) -> R,
    f64_fn: impl FnOnce(&[f64]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .expect("contiguous() gave a strided tensor");
    match &*storage {
        Storage::Cpu(CpuStorage::F32(d)) => Ok(f32_fn(&d[start..end])),
        Storage::Cpu(CpuStorage::F64(d)) => Ok(f64_fn(&d[start..end])),
        _ => Err(Error::UnsupportedDTypeForOp(
            t.dtype(),
            "softmax-cross-entropy",
        )),
    }
}

impl CustomOp1 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-cross-entropy needs contiguous logits");
        };
        let out = match storage {
            CpuStorage::F32(d) => CpuStorage::F32(forward_rows(&d[start..end], v, &self.targets)),
            CpuStorage::F64(d) => CpuStorage::F64(forward_rows(&d[start..end], v, &self.targets)),
            s => {
                return Err(Error::UnsupportedDTypeForOp(
                    s.dtype(),
                    "softmax-cross-entropy",
                ))
            }
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let grad = match arg.dtype() {
            DType::F32 => {
                let losses = res.to_vec1::<f32>()?;
                let g = grad_res.to_vec1::<f32>()?;
                with_cpu_data(
                    arg,
                    |x| backward_rows(x, v, &self.targets, &losses, &g),
                    |_| unreachable!(),
                )?
            }
            DType::F64 => {
                let losses = res.to_vec1::<f64>()?;
                let g = grad_res.to_vec1::<f64>()?;
                let out = with_cpu_data(
                    arg,
                    |_| unreachable!(),
                    |x| backward_rows(x, v, &self.targets, &losses, &g),
                )?;
                return Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?));
            }
            dt => return Err(Error::UnsupportedDTypeForOp(dt, "softmax-cross-entropy")),
        };
        Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_direct_formula_and_gradient() {
        let x = [1.0f64, 2.0, 3.0, -1.0, 0.5, 0.0];
        let targets = [2u32, 0];
        let var = Var::from_slice(&x, (2, 3), &Device::Cpu).unwrap();
        let rows = cross_entropy_rows(var.as_tensor(), &targets).unwrap();
        let loss = rows.sum_all().unwrap();
        let got = rows.to_vec1::<f64>().unwrap();
        let grad = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (r, row) in x.chunks(3).enumerate() {
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            let t = targets[r] as usize;
            assert!((got[r] - (z.ln() - row[t])).abs() < 1e-12);
            for j in 0..3 {
                let want = row[j].exp() / z - if j == t { 1.0 } else { 0.0 };
                assert!((grad[3 * r + j] - want).abs() < 1e-12, "row {r} col {j}");
            }
        }
        // Large logits do not overflow.
        let big = Tensor::from_slice(&[1000f32, 0.0], (1, 2), &Device::Cpu).unwrap();
        let l = cross_entropy_rows(&big, &[1])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(l, vec![1000.0]);
        assert!(cross_entropy_rows(&big, &[2]).is_err());
    }

    /// The composed loss (what CUDA runs) gives the fused op's values and gradients.
    #[test]
    fn composed_matches_fused() {
        let x: Vec<f64> = (0..4 * 7)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.7)
            .collect();
        let targets = [3u32, 0, 6, 2];
        let run = |composed: bool| {
            let var = Var::from_slice(&x, (4, 7), &Device::Cpu).unwrap();
            let rows = match composed {
                true => cross_entropy_rows_composed(var.as_tensor(), &targets),
                false => cross_entropy_rows(var.as_tensor(), &targets),
            }
            .unwrap();
            let grads = rows.sum_all().unwrap().backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap();
            (
                rows.to_vec1::<f64>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            )
        };
        let (fused, composed) = (run(false), run(true));
        for (a, b) in fused
            .0
            .iter()
            .zip(&composed.0)
            .chain(fused.1.iter().zip(&composed.1))
        {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}

//! Training with the whole step on one candle device (the CPU, or a CUDA GPU with the
//! `cuda` feature): forward and backward through candle's graph ([`Gpt::on_device`], in
//! f32 or mixed precision), then the clip and AdamW as tensor ops on the device, so
//! parameters and moments stay there between steps. Parameters and moments are f32
//! master copies whatever the compute dtype.
//!
//! The update follows [`AdamW::update_scaled`] and [`clip_scale_from_squares`] term for
//! term (same hyper-parameters, same bias corrections, the mean over tokens and the clip
//! folded into one factor), so an f32 run tracks the CPU trainer's to rounding; the bits
//! differ (other kernels, other summation orders), which is why the GPU path is compared
//! with a tolerance rather than bit for bit.

use candle_core::{DType, Device, Tensor};

use crate::config::GptConfig;
use crate::error::ModelError;
use crate::gpt::Gpt;
use crate::optim::{clip_scale_from_squares, AdamW, AdamWConfig};

/// A model and its AdamW state on one device.
pub struct DeviceTrainer {
    /// The model; its Vars are the f32 master weights.
    model: Gpt,
    /// First moments, one f32 tensor per parameter, layout order.
    m: Vec<Tensor>,
    /// Second moments, likewise.
    v: Vec<Tensor>,
    /// Updates applied so far.
    step: u64,
}

/// What one [`DeviceTrainer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceStep {
    /// Mean token loss of the batch (before the update).
    pub loss: f64,
    /// Global L2 norm of the mean gradient, before clipping.
    pub grad_norm: f64,
    /// True when the loss or the norm was not finite and no update was applied.
    pub skipped: bool,
}

/// Where a data-parallel rank runs its step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepDevice {
    /// The fused CPU kernels ([`crate::Workspace`]): bit-identical for any rank count.
    #[default]
    Cpu,
    /// A [`DeviceTrainer`] on CUDA device `first + i` for the process's `i`-th rank,
    /// computing in bf16 (`bf16`) or f32.
    Cuda {
        /// The first local rank's device.
        first: usize,
        /// Matrix products and activations in bf16 (f32 master weights and moments).
        bf16: bool,
    },
    /// A [`DeviceTrainer`] on candle's CPU device: the GPU path's code without a GPU
    /// (tests), in bf16 or f32.
    CandleCpu {
        /// As for `Cuda`.
        bf16: bool,
    },
}

impl StepDevice {
    /// Parses `cpu`, `cuda`, `cuda:N` (first device N) or `candle-cpu`, with the compute
    /// precision `bf16` or `f32` (ignored for `cpu`, which is f32).
    pub fn parse(device: &str, precision: &str) -> Result<Self, String> {
        let bf16 = match precision {
            "bf16" => true,
            "f32" => false,
            other => return Err(format!("--precision {other}: use bf16 or f32")),
        };
        match device {
            "cpu" => Ok(Self::Cpu),
            "candle-cpu" => Ok(Self::CandleCpu { bf16 }),
            "cuda" => Ok(Self::Cuda { first: 0, bf16 }),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(first)) => Ok(Self::Cuda { first, bf16 }),
                _ => Err(format!(
                    "--device {d}: use cpu, cuda, cuda:N (the first GPU of this process's ranks) or candle-cpu"
                )),
            },
        }
    }

    /// The candle device and compute dtype of the process's `local`-th rank, or `None`
    /// for the fused CPU path.
    pub fn open(&self, local: usize) -> Result<Option<(Device, DType)>, ModelError> {
        let dtype = |bf16: bool| if bf16 { DType::BF16 } else { DType::F32 };
        match *self {
            Self::Cpu => Ok(None),
            Self::CandleCpu { bf16 } => Ok(Some((Device::Cpu, dtype(bf16)))),
            Self::Cuda { first, bf16 } => Ok(Some((cuda_device(first + local)?, dtype(bf16)))),
        }
    }
}

/// The CUDA device `ordinal`, or a one-line error that says why there is none.
pub fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Device {
            reason: "this tenax was built without CUDA: rebuild with `--features cuda` \
                     (scripts/cuda-toolkit assembles a toolkit) and run it on a GPU machine"
                .into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device {
        reason: format!(
            "CUDA device {ordinal} cannot be opened ({e}): check the NVIDIA driver and that \
             libcuda.so.1, libcublas.so.13 and libcurand.so.10 are on LD_LIBRARY_PATH"
        ),
    })
}

impl DeviceTrainer {
    /// A trainer on `device` from flat f32 parameters (layout order) and AdamW state,
    /// computing in `compute` (F32, or BF16/F16 for mixed precision).
    pub fn new(
        config: GptConfig,
        params: &[f32],
        opt: &AdamW,
        device: &Device,
        compute: DType,
    ) -> Result<Self, ModelError> {
        let model = Gpt::on_device(config, device, DType::F32, compute)?;
        model.set_params(params)?;
        let layout = model.layout();
        if opt.m.len() != layout.total || opt.v.len() != layout.total {
            return Err(ModelError::Length {
                what: "AdamW moments",
                expected: layout.total,
                got: opt.m.len().min(opt.v.len()),
                hint: "give the optimizer state of this model",
            });
        }
        let upload = |flat: &[f32]| -> Result<Vec<Tensor>, ModelError> {
            layout
                .entries
                .iter()
                .map(|e| {
                    Ok(Tensor::from_slice(
                        &flat[e.range()],
                        e.shape.as_slice(),
                        device,
                    )?)
                })
                .collect()
        };
        let (m, v) = (upload(&opt.m)?, upload(&opt.v)?);
        Ok(Self {
            model,
            m,
            v,
            step: opt.step,
        })
    }

    /// The model (for its layout, config and device).
    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// One training step on a batch of `batch` rows: loss and gradient of the summed
    /// token loss, the mean over tokens and the clip to `grad_clip` (0 = none) as one
    /// factor, then AdamW with learning rate `lr`. A non-finite loss or norm skips the
    /// update, as the CPU trainer does.
    pub fn step(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        lr: f32,
        cfg: &AdamWConfig,
        grad_clip: f32,
    ) -> Result<DeviceStep, ModelError> {
        let (loss_sum, grads) = self.model.loss_and_grad_tensors(inputs, targets, batch)?;
        let tokens = inputs.len() as f32;
        let loss =
            f64::from(loss_sum.to_dtype(DType::F32)?.to_scalar::<f32>()?) / f64::from(tokens);
        // Per-tensor sums of squares on the device, read back as one small vector and
        // added in layout order in f64, as the CPU trainer does.
        let squares = grads
            .iter()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let squares: Vec<f64> = Tensor::stack(&squares, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (grad_norm, grad_scale) = clip_scale_from_squares(&squares, tokens, grad_clip);
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Ok(DeviceStep {
                loss,
                grad_norm,
                skipped: true,
            });
        }
        self.adamw(&grads, grad_scale, lr, cfg)?;
        Ok(DeviceStep {
            loss,
            grad_norm,
            skipped: false,
        })
    }

    /// A data-parallel rank's half of a step: the summed token loss of one slot and its
    /// gradient, copied to the host flat in layout order (what the exact, slot-ordered
    /// collective reduces).
    pub fn slot_grad(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(f32, Vec<f32>), ModelError> {
        let (loss_sum, grads) = self.model.loss_and_grad_tensors(inputs, targets, batch)?;
        let mut flat = Vec::with_capacity(self.model.layout().total);
        for g in &grads {
            flat.extend(g.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((loss_sum.to_dtype(DType::F32)?.to_scalar::<f32>()?, flat))
    }

    /// The other half: AdamW on the device with the reduced gradient sum `grad_sum`
    /// (host, flat, layout order) times `grad_scale`, as [`AdamW::update_scaled`].
    pub fn apply(
        &mut self,
        grad_sum: &[f32],
        grad_scale: f32,
        lr: f32,
        cfg: &AdamWConfig,
    ) -> Result<(), ModelError> {
        let layout = self.model.layout();
        if grad_sum.len() != layout.total {
            return Err(ModelError::Length {
                what: "reduced gradient",
                expected: layout.total,
                got: grad_sum.len(),
                hint: "reduce a gradient of this model",
            });
        }
        let device = self.model.device().clone();
        let grads = layout
            .entries
            .iter()
            .map(|e| Tensor::from_slice(&grad_sum[e.range()], e.shape.as_slice(), &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.adamw(&grads, grad_scale, lr, cfg)
    }

    /// Copies the parameters and the optimizer state into host buffers of this model's
    /// size (the rank's mirror, which snapshots, checkpoints and state copies read).
    pub fn download_into(&self, params: &mut [f32], opt: &mut AdamW) -> Result<(), ModelError> {
        let layout = self.model.layout();
        if params.len() != layout.total
            || opt.m.len() != layout.total
            || opt.v.len() != layout.total
        {
            return Err(ModelError::Length {
                what: "host mirror",
                expected: layout.total,
                got: params.len(),
                hint: "size the parameters and moments to the model",
            });
        }
        for (i, entry) in layout.entries.iter().enumerate() {
            let r = entry.range();
            let var = &self.model.vars()[i];
            params[r.clone()].copy_from_slice(&var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            opt.m[r.clone()].copy_from_slice(&self.m[i].flatten_all()?.to_vec1::<f32>()?);
            opt.v[r].copy_from_slice(&self.v[i].flatten_all()?.to_vec1::<f32>()?);
        }
        opt.step = self.step;
        Ok(())
    }

    /// [`AdamW::update_scaled`] as tensor ops on the device.
    fn adamw(
        &mut self,
        grads: &[Tensor],
        grad_scale: f32,
        lr: f32,
        cfg: &AdamWConfig,
    ) -> Result<(), ModelError> {
        self.step += 1;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bias1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bias2 = 1.0 - f64::from(cfg.beta2).powi(t);
        let step_size = f64::from((f64::from(lr) / bias1) as f32);
        let bias2_sqrt = f64::from(bias2.sqrt() as f32);
        let (b1, b2) = (f64::from(cfg.beta1), f64::from(cfg.beta2));
        let decay_factor = f64::from(1.0 - lr * cfg.weight_decay);
        let decays = cfg.weight_decay != 0.0;
        let layout = self.model.layout().clone();
        for (i, entry) in layout.entries.iter().enumerate() {
            let var = &self.model.vars()[i];
            let g = grads[i].affine(f64::from(grad_scale), 0.0)?;
            let mut p = var.as_tensor().detach();
            if entry.decay && decays {
                p = p.affine(decay_factor, 0.0)?;
            }
            let m = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, f64::from(cfg.eps))?;
            let p = (p - m.div(&denom)?.affine(step_size, 0.0)?)?;
            var.set(&p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// A host copy of the parameters, flat in layout order.
    pub fn params(&self) -> Result<Vec<f32>, ModelError> {
        self.model.params()
    }

    /// A host copy of the optimizer state.
    pub fn optimizer(&self) -> Result<AdamW, ModelError> {
        let flat = |ts: &[Tensor]| -> Result<Vec<f32>, ModelError> {
            let mut out = Vec::with_capacity(self.model.layout().total);
            for t in ts {
                out.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        Ok(AdamW {
            m: flat(&self.m)?,
            v: flat(&self.v)?,
            step: self.step,
        })
    }

    /// Mean token loss of a batch without a gradient (evaluation).
    pub fn loss(&self, inputs: &[u32], targets: &[u32], batch: usize) -> Result<f64, ModelError> {
        let sum = self.model.loss_sum(inputs, targets, batch)?;
        Ok(f64::from(sum) / inputs.len() as f64)
    }

    /// Waits for the device's queued work (for timing).
    pub fn synchronize(&self) -> Result<(), ModelError> {
        Ok(self.model.device().synchronize()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::clip_scale;
    use crate::params::{init_params, ParamLayout};
    use crate::step::Workspace;
    use tenax_core::rng::SplitMix64;

    /// A learnable batch: a cycle of 5 ids from a random start.
    fn batch(rng: &mut SplitMix64, n: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
        let start = rng.below(5) as usize;
        let row: Vec<u32> = (0..n + 1)
            .map(|i| ((start + i) % 5 * 7 % vocab) as u32)
            .collect();
        (row[..n].to_vec(), row[1..].to_vec())
    }

    /// Steps of the trainer's own CPU path (Workspace + AdamW::update_scaled).
    fn cpu_run(
        config: &GptConfig,
        steps: usize,
        lr: f32,
        cfg: &AdamWConfig,
    ) -> (Vec<f64>, Vec<f32>) {
        let layout = ParamLayout::for_config(config);
        let mut params = init_params(config, &layout, 7);
        let mut opt = AdamW::new(layout.total);
        let mut ws = Workspace::new(config, &layout, 1);
        let mut rng = SplitMix64::new(3);
        let mut losses = Vec::new();
        for _ in 0..steps {
            let (x, y) = batch(&mut rng, 2 * config.block_size, config.vocab_size);
            let mut grad = vec![0f32; layout.total];
            let sum = ws.loss_sum_and_grad(&params, &x, &y, 2, &mut grad).unwrap();
            let tokens = x.len() as f32;
            let (_, scale) = clip_scale(&grad, &layout, tokens, 1.0);
            opt.update_scaled(&mut params, &grad, scale, lr, &layout, cfg);
            losses.push(f64::from(sum) / f64::from(tokens));
        }
        (losses, params)
    }

    fn device_run(
        config: &GptConfig,
        steps: usize,
        lr: f32,
        cfg: &AdamWConfig,
        compute: DType,
    ) -> (Vec<f64>, Vec<f32>) {
        let layout = ParamLayout::for_config(config);
        let params = init_params(config, &layout, 7);
        let mut tr = DeviceTrainer::new(
            config.clone(),
            &params,
            &AdamW::new(layout.total),
            &Device::Cpu,
            compute,
        )
        .unwrap();
        let mut rng = SplitMix64::new(3);
        let mut losses = Vec::new();
        for _ in 0..steps {
            let (x, y) = batch(&mut rng, 2 * config.block_size, config.vocab_size);
            let out = tr.step(&x, &y, 2, lr, cfg, 1.0).unwrap();
            assert!(!out.skipped);
            losses.push(out.loss);
        }
        assert_eq!(tr.optimizer().unwrap().step, steps as u64);
        (losses, tr.params().unwrap())
    }

    /// In f32 the device trainer (candle graph + tensor-op AdamW) follows the CPU
    /// trainer (fused kernels + loop AdamW) to rounding, step after step.
    #[test]
    fn f32_device_steps_track_the_cpu_trainer() {
        let config = GptConfig::preset("tiny", 40).unwrap();
        let cfg = AdamWConfig::default();
        let (cpu_loss, cpu_params) = cpu_run(&config, 6, 3e-3, &cfg);
        let (dev_loss, dev_params) = device_run(&config, 6, 3e-3, &cfg, DType::F32);
        for (a, b) in cpu_loss.iter().zip(&dev_loss) {
            assert!((a - b).abs() < 1e-4, "loss {a} vs {b}");
        }
        let worst = cpu_params
            .iter()
            .zip(&dev_params)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "largest parameter difference {worst}");
        assert!(cpu_loss[5] < cpu_loss[0], "the run learns: {cpu_loss:?}");
    }

    /// Mixed precision (bf16 matmuls, f32 master weights) stays close to f32.
    #[test]
    fn bf16_device_steps_stay_near_f32() {
        let config = GptConfig::preset("tiny", 40).unwrap();
        let cfg = AdamWConfig::default();
        let (f32_loss, _) = device_run(&config, 4, 3e-3, &cfg, DType::F32);
        let (bf16_loss, _) = device_run(&config, 4, 3e-3, &cfg, DType::BF16);
        for (a, b) in f32_loss.iter().zip(&bf16_loss) {
            assert!((a - b).abs() < 0.05, "loss {a} vs {b}");
        }
        assert_ne!(f32_loss, bf16_loss, "bf16 really computed in bf16");
    }

    #[test]
    fn moments_of_another_size_are_refused_and_cuda_errors_are_one_line() {
        let config = GptConfig::preset("tiny", 40).unwrap();
        let layout = ParamLayout::for_config(&config);
        let params = init_params(&config, &layout, 1);
        let err = DeviceTrainer::new(config, &params, &AdamW::new(3), &Device::Cpu, DType::F32)
            .err()
            .unwrap();
        assert!(err.to_string().contains("AdamW moments"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = cuda_device(0).unwrap_err().to_string();
            assert!(
                err.contains("--features cuda") && !err.contains('\n'),
                "{err}"
            );
        }
    }

    /// A rank's split step (slot gradient to the host, reduced sum back) is the whole
    /// device step, and the host mirror holds what the device holds.
    #[test]
    fn split_rank_step_equals_the_whole_device_step() {
        let config = GptConfig::preset("tiny", 40).unwrap();
        let layout = ParamLayout::for_config(&config);
        let params = init_params(&config, &layout, 5);
        let cfg = AdamWConfig::default();
        let new = || {
            DeviceTrainer::new(
                config.clone(),
                &params,
                &AdamW::new(layout.total),
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
        };
        let (mut whole, mut split) = (new(), new());
        let mut rng = SplitMix64::new(9);
        let (mut host_p, mut host_opt) = (vec![0f32; layout.total], AdamW::new(layout.total));
        for _ in 0..3 {
            let (x, y) = batch(&mut rng, 2 * config.block_size, config.vocab_size);
            let out = whole.step(&x, &y, 2, 1e-3, &cfg, 1.0).unwrap();
            let (loss_sum, grad) = split.slot_grad(&x, &y, 2).unwrap();
            assert_eq!(f64::from(loss_sum) / x.len() as f64, out.loss);
            let (norm, scale) = clip_scale(&grad, &layout, x.len() as f32, 1.0);
            assert!(
                (norm - out.grad_norm).abs() <= 1e-6 * norm.max(1.0),
                "{norm} vs {}",
                out.grad_norm
            );
            split.apply(&grad, scale, 1e-3, &cfg).unwrap();
            split.download_into(&mut host_p, &mut host_opt).unwrap();
        }
        // The clip factor is the only difference: the host adds per-tensor squares in
        // f64 from host copies, the device sums them in f32 on the device.
        let close = |a: &[f32], b: &[f32]| {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "largest difference {worst}");
        };
        close(&host_p, &whole.params().unwrap());
        let want = whole.optimizer().unwrap();
        close(&host_opt.m, &want.m);
        close(&host_opt.v, &want.v);
        assert_eq!(host_opt.step, 3);
        assert!(split.apply(&[0.0; 3], 1.0, 1e-3, &cfg).is_err());
    }

    #[test]
    fn step_devices_parse_from_flags() {
        let table: &[(&str, &str, Result<StepDevice, &str>)] = &[
            ("cpu", "bf16", Ok(StepDevice::Cpu)),
            ("cpu", "f32", Ok(StepDevice::Cpu)),
            (
                "cuda",
                "bf16",
                Ok(StepDevice::Cuda {
                    first: 0,
                    bf16: true,
                }),
            ),
            (
                "cuda:2",
                "f32",
                Ok(StepDevice::Cuda {
                    first: 2,
                    bf16: false,
                }),
            ),
            (
                "candle-cpu",
                "f32",
                Ok(StepDevice::CandleCpu { bf16: false }),
            ),
            ("cuda:x", "bf16", Err("--device cuda:x")),
            ("gpu", "bf16", Err("--device gpu")),
            ("cuda", "fp8", Err("--precision fp8")),
        ];
        for (device, precision, want) in table {
            let got = StepDevice::parse(device, precision);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(*w, g, "{device} {precision}"),
                (Err(w), Err(g)) => assert!(g.starts_with(w), "{device} {precision}: {g}"),
                (w, g) => panic!("{device} {precision}: want {w:?}, got {g:?}"),
            }
        }
        assert!(StepDevice::Cpu.open(0).unwrap().is_none());
        let (dev, dtype) = StepDevice::CandleCpu { bf16: true }
            .open(3)
            .unwrap()
            .unwrap();
        assert!(dev.is_cpu() && dtype == DType::BF16);
    }

    #[test]
    fn optimizer_state_round_trips_through_the_device() {
        let config = GptConfig::preset("tiny", 40).unwrap();
        let layout = ParamLayout::for_config(&config);
        let params = init_params(&config, &layout, 1);
        let mut opt = AdamW::new(layout.total);
        opt.m
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * 1e-3);
        opt.v
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * 1e-4);
        opt.step = 17;
        let tr = DeviceTrainer::new(config, &params, &opt, &Device::Cpu, DType::BF16).unwrap();
        assert_eq!(tr.optimizer().unwrap(), opt);
        assert_eq!(tr.params().unwrap(), params);
    }
}

//! `tenax bench gpu`: the GPU path measured on one device (what `scripts/gpu-check` runs
//! on a GPU machine).
//!
//! Three parts, each written to `--out`:
//! 1. the device's measured bf16 matmul peak (`--peak-size`³ products, 3 warm-ups, 10
//!    timed), the ceiling MFU is reported against;
//! 2. training throughput of each preset in `--presets` with the whole step on the device
//!    ([`DeviceTrainer`], bf16 compute, f32 master weights and AdamW state): tokens/s over
//!    the timed steps (bounded by `--max-steps` and `--max-seconds`, so a faster device
//!    runs more steps, not a shorter check), and MFU with nanoGPT's estimate
//!    `6 N + 12 L C T` FLOPs per token (N without the position embedding);
//! 3. the same `--compare-steps` steps on the same batches from a text corpus on the CPU
//!    trainer's own path (fused kernels + flat AdamW) and on the device in f32 and in bf16:
//!    every step's loss compared within `--f32-tolerance` and `--bf16-tolerance`; the
//!    bf16 run is repeated to see whether the device gives the same bits twice.
//!
//! `--device cpu` runs everything on candle's CPU device (how the default test suite
//! checks this command without a GPU). Output: `gpu-check.json` (every figure),
//! `loss-compare.csv` (step, cpu, device f32, device bf16) and a summary on stdout; the
//! exit status is non-zero when a loss comparison is out of tolerance.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tenax_core::rng::SplitMix64;
use tenax_data::{Tokenizer, TokenizerKind};
use tenax_model::{
    clip_scale, cuda_device, init_params, AdamW, AdamWConfig, DeviceTrainer, GptConfig, LrSchedule,
    ParamLayout, Workspace,
};

/// Options of `tenax bench gpu`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchGpuArgs {
    /// Folder for gpu-check.json and loss-compare.csv (created).
    #[arg(long)]
    pub out: PathBuf,
    /// `cuda` (needs a build with `--features cuda` and a GPU) or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Which CUDA device.
    #[arg(long, default_value_t = 0)]
    pub ordinal: usize,
    /// Presets whose throughput is measured, comma-separated.
    #[arg(long, default_value = "nano,gpt2-small", value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Vocabulary of the throughput runs (GPT-2's by default).
    #[arg(long, default_value_t = 50257)]
    pub vocab: usize,
    /// Rows per step of the nano throughput run.
    #[arg(long, default_value_t = 256)]
    pub nano_batch: usize,
    /// Rows per step of the gpt2-small throughput run (rows of 1024 tokens).
    #[arg(long, default_value_t = 16)]
    pub gpt2_batch: usize,
    /// Rows per step of the tiny throughput run.
    #[arg(long, default_value_t = 8)]
    pub tiny_batch: usize,
    /// Most timed steps per preset.
    #[arg(long, default_value_t = 300)]
    pub max_steps: u64,
    /// Most seconds of timed steps per preset.
    #[arg(long, default_value_t = 60.0)]
    pub max_seconds: f64,
    /// Untimed warm-up steps per preset.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Side of the square bf16 matrices of the peak measurement.
    #[arg(long, default_value_t = 8192)]
    pub peak_size: usize,
    /// Preset of the CPU-versus-device loss comparison.
    #[arg(long, default_value = "nano")]
    pub compare_preset: String,
    /// Steps of the loss comparison (0 skips it).
    #[arg(long, default_value_t = 50)]
    pub compare_steps: u64,
    /// Rows per step of the loss comparison.
    #[arg(long, default_value_t = 16)]
    pub compare_batch: usize,
    /// Text files or folders for the comparison's corpus (bytes tokenizer); the built-in
    /// corpus when none is given.
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// Largest |loss difference| allowed at any step between the CPU and the device in f32.
    #[arg(long, default_value_t = 2e-3)]
    pub f32_tolerance: f64,
    /// Largest |loss difference| allowed at any step between the CPU (f32) and the device
    /// in bf16.
    #[arg(long, default_value_t = 0.05)]
    pub bf16_tolerance: f64,
    /// Seed of weights and batches.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `tenax bench gpu`.
pub fn gpu(args: BenchGpuArgs) -> Result<()> {
    let device = match args.device.as_str() {
        "cuda" => cuda_device(args.ordinal).context("--device cuda")?,
        "cpu" => Device::Cpu,
        other => bail!("--device {other}: use `cuda` or `cpu`"),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    let peak = peak_bf16_tflops(&device, args.peak_size)?;
    println!(
        "bf16 matmul peak: {peak:.4} TFLOP/s ({n}x{n}x{n})",
        n = args.peak_size
    );
    let mut runs = Vec::new();
    for preset in &args.presets {
        let batch = match preset.as_str() {
            "nano" => args.nano_batch,
            "gpt2-small" => args.gpt2_batch,
            _ => args.tiny_batch,
        };
        let r = throughput(&device, &args, preset, batch, peak)?;
        println!(
            "{preset}: {tps:.0} tokens/s, {ms:.1} ms/step over {steps} steps, MFU {mfu:.1}% \
             of the measured peak (batch {batch} x {t}); forward {f:.1} ms, forward+backward \
             with the gradient to the host {fb:.1} ms",
            tps = r["tokens_per_s"].as_f64().unwrap_or(0.0),
            ms = r["step_ms"].as_f64().unwrap_or(0.0),
            steps = r["timed_steps"],
            mfu = 100.0 * r["mfu"].as_f64().unwrap_or(0.0),
            t = r["block_size"],
            f = r["forward_ms"].as_f64().unwrap_or(0.0),
            fb = r["forward_backward_to_host_ms"].as_f64().unwrap_or(0.0),
        );
        runs.push(r);
    }
    let compare = match args.compare_steps {
        0 => None,
        _ => Some(compare_losses(&device, &args)?),
    };
    let report = json!({
        "device": format!("{device:?}"),
        "bf16_peak_tflops": peak,
        "throughput": runs,
        "loss_compare": compare.as_ref().map(|c| c.summary.clone()),
    });
    std::fs::write(
        args.out.join("gpu-check.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if let Some(c) = compare {
        let mut f = std::fs::File::create(args.out.join("loss-compare.csv"))?;
        writeln!(f, "step,cpu_f32,device_f32,device_bf16")?;
        for (i, row) in c.rows.iter().enumerate() {
            writeln!(f, "{i},{},{},{}", row[0], row[1], row[2])?;
        }
        println!("{}", serde_json::to_string(&c.summary)?);
        if !c.passed {
            bail!(
                "the device's losses left the tolerance (see {}): f32 max |diff| {}, bf16 max |diff| {}",
                args.out.join("loss-compare.csv").display(),
                c.summary["f32_max_abs_diff"],
                c.summary["bf16_max_abs_diff"]
            );
        }
    }
    Ok(())
}

/// Measured bf16 matmul rate of `device` in TFLOP/s: `n`³ products, 3 warm-ups, then 10
/// timed between two synchronisations.
fn peak_bf16_tflops(device: &Device, n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    for _ in 0..3 {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    let s = t0.elapsed().as_secs_f64();
    Ok(2.0 * (n as f64).powi(3) * f64::from(reps) / s / 1e12)
}

/// FLOPs per token of a training step by nanoGPT's `estimate_mfu`: `6 N + 12 L C T`,
/// N without the position embedding.
fn flops_per_token(config: &GptConfig, layout: &ParamLayout) -> f64 {
    let wpe = config.block_size * config.n_embd;
    let n = (layout.total - wpe) as f64;
    6.0 * n + 12.0 * (config.n_layer * config.n_embd * config.block_size) as f64
}

/// Throughput of one preset with the whole step on the device in bf16.
fn throughput(
    device: &Device,
    args: &BenchGpuArgs,
    preset: &str,
    batch: usize,
    peak_tflops: f64,
) -> Result<serde_json::Value> {
    let config = GptConfig::preset(preset, args.vocab)?;
    let layout = ParamLayout::for_config(&config);
    let params = init_params(&config, &layout, args.seed);
    let mut trainer = DeviceTrainer::new(
        config.clone(),
        &params,
        &AdamW::new(layout.total),
        device,
        DType::BF16,
    )?;
    let mut rng = SplitMix64::new(args.seed);
    let n = batch * config.block_size;
    let mut draw = || -> (Vec<u32>, Vec<u32>) {
        let row: Vec<u32> = (0..n + 1)
            .map(|_| rng.below(config.vocab_size as u64) as u32)
            .collect();
        (row[..n].to_vec(), row[1..].to_vec())
    };
    let cfg = AdamWConfig::default();
    let mut last_loss = f64::NAN;
    for _ in 0..args.warmup {
        let (x, y) = draw();
        last_loss = trainer.step(&x, &y, batch, 3e-4, &cfg, 1.0)?.loss;
    }
    trainer.synchronize()?;
    let t0 = Instant::now();
    let mut steps = 0u64;
    while steps < args.max_steps.max(1)
        && (steps == 0 || t0.elapsed().as_secs_f64() < args.max_seconds)
    {
        let (x, y) = draw();
        // The step reads its loss back, so each step ends synchronised.
        last_loss = trainer.step(&x, &y, batch, 3e-4, &cfg, 1.0)?.loss;
        steps += 1;
    }
    trainer.synchronize()?;
    let s = t0.elapsed().as_secs_f64();
    let tokens_per_s = (steps as f64 * n as f64) / s;
    // Where a step's time goes: the same batch through the forward pass alone and through
    // forward and backward (gradients read back to the host, as a data-parallel rank
    // does), each timed over a few repetitions; the rest of a step is the clip and AdamW.
    let (x, y) = draw();
    let reps = 5;
    let t1 = Instant::now();
    for _ in 0..reps {
        trainer.loss(&x, &y, batch)?;
    }
    let forward_ms = 1e3 * t1.elapsed().as_secs_f64() / f64::from(reps);
    let t2 = Instant::now();
    for _ in 0..reps {
        trainer.slot_grad(&x, &y, batch)?;
    }
    let forward_backward_to_host_ms = 1e3 * t2.elapsed().as_secs_f64() / f64::from(reps);
    let achieved = tokens_per_s * flops_per_token(&config, &layout) / 1e12;
    Ok(json!({
        "preset": preset,
        "params": layout.total,
        "batch": batch,
        "block_size": config.block_size,
        "vocab": config.vocab_size,
        "compute_dtype": "bf16",
        "timed_steps": steps,
        "seconds": s,
        "step_ms": 1e3 * s / steps as f64,
        "forward_ms": forward_ms,
        "forward_backward_to_host_ms": forward_backward_to_host_ms,
        "tokens_per_s": tokens_per_s,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
        "last_loss": last_loss,
    }))
}

/// The loss comparison's result.
struct Compare {
    /// Per step: CPU f32, device f32, device bf16 losses.
    rows: Vec<[f64; 3]>,
    /// The figures for gpu-check.json.
    summary: serde_json::Value,
    /// Both comparisons within tolerance.
    passed: bool,
}

/// The same steps on the same batches: the CPU trainer's path, the device in f32 and in
/// bf16.
fn compare_losses(device: &Device, args: &BenchGpuArgs) -> Result<Compare> {
    let corpus = match args.corpus.is_empty() {
        true => tenax_data::default_corpus()?,
        false => tenax_data::load_corpus(&args.corpus)?,
    };
    let tokenizer = Tokenizer::build(TokenizerKind::Bytes, &corpus.text)?;
    let tokens = tokenizer.encode(&corpus.text)?;
    let config = GptConfig::preset(&args.compare_preset, tokenizer.vocab_size())?;
    let t = config.block_size;
    if tokens.len() < 2 * (t + 1) {
        bail!(
            "the comparison corpus has {} tokens; give --corpus with more text",
            tokens.len()
        );
    }
    let layout = ParamLayout::for_config(&config);
    let params = init_params(&config, &layout, args.seed);
    let mut rng = SplitMix64::new(args.seed ^ 0x9e37);
    let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..args.compare_steps)
        .map(|_| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..args.compare_batch {
                let at = rng.below((tokens.len() - t - 1) as u64) as usize;
                x.extend_from_slice(&tokens[at..at + t]);
                y.extend_from_slice(&tokens[at + 1..at + t + 1]);
            }
            (x, y)
        })
        .collect();
    let schedule = LrSchedule {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        decay_steps: args.compare_steps,
    };
    let cfg = AdamWConfig::default();
    let b = args.compare_batch;
    // The CPU trainer's own path.
    let mut cpu = Vec::new();
    {
        let mut p = params.clone();
        let mut opt = AdamW::new(layout.total);
        let mut ws = Workspace::new(&config, &layout, tenax_model::step::default_threads());
        for (i, (x, y)) in batches.iter().enumerate() {
            let mut grad = vec![0f32; layout.total];
            let sum = ws.loss_sum_and_grad(&p, x, y, b, &mut grad)?;
            let n = x.len() as f32;
            let (_, scale) = clip_scale(&grad, &layout, n, 1.0);
            let lr = schedule.lr_at(i as u64) as f32;
            ws.install(|| opt.update_scaled(&mut p, &grad, scale, lr, &layout, &cfg));
            cpu.push(f64::from(sum) / f64::from(n));
        }
    }
    let on_device = |compute: DType| -> Result<(Vec<f64>, Vec<f32>)> {
        let mut tr = DeviceTrainer::new(
            config.clone(),
            &params,
            &AdamW::new(layout.total),
            device,
            compute,
        )?;
        let mut out = Vec::new();
        for (i, (x, y)) in batches.iter().enumerate() {
            let lr = schedule.lr_at(i as u64) as f32;
            out.push(tr.step(x, y, b, lr, &cfg, 1.0)?.loss);
        }
        Ok((out, tr.params()?))
    };
    let (dev32, _) = on_device(DType::F32)?;
    let (dev16, params16) = on_device(DType::BF16)?;
    // The same steps again: a device whose kernels are deterministic gives the same bits,
    // which the exact (slot-ordered) reduction needs for runs to be bit-identical.
    let (again16, params16_again) = on_device(DType::BF16)?;
    let deterministic = again16 == dev16 && params16_again == params16;
    let max_diff = |other: &[f64]| {
        cpu.iter()
            .zip(other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max)
    };
    let (d32, d16) = (max_diff(&dev32), max_diff(&dev16));
    let passed = d32 <= args.f32_tolerance && d16 <= args.bf16_tolerance;
    let last = cpu.len() - 1;
    let summary = json!({
        "preset": args.compare_preset,
        "steps": args.compare_steps,
        "batch": b,
        "corpus": corpus.description,
        "cpu_first_loss": cpu[0],
        "cpu_last_loss": cpu[last],
        "device_f32_last_loss": dev32[last],
        "device_bf16_last_loss": dev16[last],
        "f32_max_abs_diff": d32,
        "bf16_max_abs_diff": d16,
        "f32_tolerance": args.f32_tolerance,
        "bf16_tolerance": args.bf16_tolerance,
        "passed": passed,
        "bf16_run_repeated_bit_identical": deterministic,
    });
    let rows = (0..cpu.len())
        .map(|i| [cpu[i], dev32[i], dev16[i]])
        .collect();
    Ok(Compare {
        rows,
        summary,
        passed,
    })
}

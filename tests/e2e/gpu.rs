//! `tenax bench gpu`, the GPU path's check, run on candle's CPU device: the same code
//! (device trainer, peak, throughput, CPU-versus-device loss comparison) minus CUDA.

use super::*;

#[test]
fn bench_gpu_on_the_cpu_device_writes_its_report_and_compares_losses() {
    let dir = tempfile::tempdir().unwrap();
    let text = corpus(dir.path());
    let out = dir.path().join("gpu");
    let stdout = ok(&[
        "bench",
        "gpu",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--presets",
        "tiny",
        "--max-steps",
        "3",
        "--warmup",
        "1",
        "--peak-size",
        "32",
        "--compare-preset",
        "tiny",
        "--compare-steps",
        "6",
        "--compare-batch",
        "2",
        "--corpus",
        text.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains("tiny:") && stdout.contains("tokens/s"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(report["throughput"][0]["timed_steps"], 3);
    assert!(report["throughput"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    let cmp = &report["loss_compare"];
    assert_eq!(cmp["passed"], true, "{cmp}");
    // Candle's graph in f32 and the CPU trainer's fused kernels agree to rounding.
    assert!(cmp["f32_max_abs_diff"].as_f64().unwrap() < 1e-4, "{cmp}");
    let csv = std::fs::read_to_string(out.join("loss-compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");

    // A tolerance nothing can meet fails the command, with one line.
    let err = fails(&[
        "bench",
        "gpu",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--presets",
        "tiny",
        "--max-steps",
        "1",
        "--warmup",
        "0",
        "--peak-size",
        "16",
        "--compare-preset",
        "tiny",
        "--compare-steps",
        "3",
        "--compare-batch",
        "2",
        "--bf16-tolerance",
        "0",
        "--corpus",
        text.to_str().unwrap(),
    ]);
    assert!(err.contains("tolerance"), "{err}");
}

/// A build without the `cuda` feature says so in one line instead of running on the CPU.
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_gpu_without_the_cuda_feature_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu");
    let err = fails(&["bench", "gpu", "--out", out.to_str().unwrap()]);
    assert!(err.contains("--features cuda"), "{err}");
}

/// `tenax train --device candle-cpu` runs the GPU path's rank (candle graph, AdamW as
/// tensor ops, host mirror) through the real trainer: the exact host reduction keeps the
/// bits the same for any rank count, f32 stays within rounding of the fused CPU path,
/// and a resumed run is bit-identical to a straight one.
#[test]
fn the_device_path_trains_through_the_trainer_with_the_bits_of_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let mut args = vec!["--steps", "6", "--lr-decay-steps", "6"];
        args.extend_from_slice(extra);
        train(&data, &tmp.path().join(name), &args).0
    };
    let dev = ["--device", "candle-cpu", "--precision", "f32"];
    let one = run("one", &dev);
    let three = run("three", &[&dev[..], &["--ranks", "3"]].concat());
    assert_eq!(
        three.losses(),
        one.losses(),
        "ranks change the device path's bits"
    );
    assert_eq!(three.state(6), one.state(6));
    let fused = run("fused", &[]);
    for ((s, a), (_, b)) in fused.losses().iter().zip(one.losses()) {
        let (a, b) = (f64::from_bits(*a), f64::from_bits(b));
        assert!((a - b).abs() < 1e-4, "step {s}: fused {a} vs device {b}");
    }
    assert_ne!(fused.state(6), one.state(6), "the device path really ran");
    // bf16 runs, learns and differs from f32.
    let bf16 = run("bf16", &["--device", "candle-cpu"]);
    let (first, last) = (
        f64::from_bits(bf16.losses()[0].1),
        f64::from_bits(bf16.losses()[5].1),
    );
    assert!(last < first, "bf16 learns: {:?}", bf16.losses());
    assert_ne!(bf16.losses(), one.losses());
    // Resume on the device path: bit-identical to the straight run.
    let half = tmp.path().join("half");
    let (d, r) = (data.to_str().unwrap(), half.to_str().unwrap());
    let first = [&dev[..], &["--steps", "3", "--lr-decay-steps", "6"]].concat();
    ok(&tiny_args(d, r, &first));
    ok(&tiny_args(
        d,
        r,
        &[&dev[..], &["--steps", "6", "--resume"]].concat(),
    ));
    let half = Run { dir: half };
    assert_eq!(
        half.state(6),
        one.state(6),
        "resume changes the device path's bits"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn train_on_cuda_without_the_feature_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("c");
    let err = fails(&tiny_args(
        data.to_str().unwrap(),
        dir.to_str().unwrap(),
        &["--steps", "2", "--device", "cuda"],
    ));
    assert!(err.contains("--features cuda"), "{err}");
    let written = std::fs::read_dir(dir.join("checkpoints")).map_or(0, |d| d.count());
    assert_eq!(written, 0, "no checkpoint was written");
    let err = fails(&tiny_args(
        data.to_str().unwrap(),
        dir.to_str().unwrap(),
        &["--steps", "2", "--device", "tpu"],
    ));
    assert!(err.contains("--device tpu"), "{err}");
}

//! End-to-end tests of the `tenax` binary: real processes, real files, tiny models.
//!
//! They run serially (the nextest group `e2e` in .config/nextest.toml) with one candle
//! thread each, so they are stable on a loaded 2-core machine. No verdict depends on time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tenax_core::rng::SplitMix64;

fn tenax(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenax"))
        .args(args)
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("TENAX_LOG")
        .output()
        .expect("run tenax")
}

fn ok(args: &[&str]) -> String {
    let out = tenax(args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tenax {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs tenax expecting failure; returns stderr. Asserts a one-line error, no panic.
fn fails(args: &[&str]) -> String {
    let out = tenax(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "tenax {args:?} should fail; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked"),
        "tenax {args:?} panicked:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "want exactly one error line, got:\n{stderr}"
    );
    errors[0].to_string()
}

/// A small deterministic corpus of pseudo-English text.
fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "king", "shall", "speak", "of", "love", "and", "war", "to", "thee", "my", "lord",
        "now", "what", "is", "fair",
    ];
    let mut rng = SplitMix64::new(99);
    let mut text = String::new();
    while text.len() < 40_000 {
        for _ in 0..(3 + rng.below(8)) {
            text.push_str(words[rng.below(words.len() as u64) as usize]);
            text.push(' ');
        }
        text.push_str(if rng.below(4) == 0 { ".\n" } else { ",\n" });
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

struct Run {
    dir: PathBuf,
}

impl Run {
    fn metrics(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    /// Losses by step, as exact bit patterns.
    fn losses(&self) -> Vec<(u64, u64)> {
        self.metrics()
            .iter()
            .map(|m| {
                (
                    m["step"].as_u64().unwrap(),
                    m["loss"].as_f64().unwrap().to_bits(),
                )
            })
            .collect()
    }
    fn ckpt_folders(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }
    fn folder_of_step(&self, step: u64) -> PathBuf {
        let prefix = format!("step-{step:010}");
        self.ckpt_folders()
            .into_iter()
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&prefix)
            })
            .expect("checkpoint folder of step")
    }
    /// Every parameter tensor of the checkpoint of `step`, as (name, raw bytes).
    fn params(&self, step: u64) -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(self.folder_of_step(step).join("params.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.data().to_vec()))
            .collect();
        v.sort();
        v
    }
    fn store(&self) -> String {
        format!("file://{}", self.dir.join("checkpoints").display())
    }
}

fn tiny_args<'a>(data: &'a str, dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--preset",
        "tiny",
        "--data",
        data,
        "--tokenizer",
        "char",
        "--batch-size",
        "6",
        "--micro-batch-size",
        "2",
        "--eval-batches",
        "2",
        "--run-dir",
        dir,
    ];
    // Defaults for the tests, unless the test sets them.
    for (flag, value) in [("--warmup-steps", "2"), ("--lr", "3e-3")] {
        if !extra.contains(&flag) {
            v.extend_from_slice(&[flag, value]);
        }
    }
    v.extend_from_slice(extra);
    v
}

fn train(data: &Path, dir: &Path, extra: &[&str]) -> (Run, String) {
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let out = ok(&tiny_args(d, r, extra));
    (
        Run {
            dir: dir.to_path_buf(),
        },
        out,
    )
}

#[test]
fn resume_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (straight, _) = train(
        &data,
        &tmp.path().join("a"),
        &["--steps", "20", "--lr-decay-steps", "20"],
    );
    let (first, _) = train(
        &data,
        &tmp.path().join("b"),
        &["--steps", "10", "--lr-decay-steps", "20"],
    );
    let (resumed, out) = train(&data, &tmp.path().join("b"), &["--steps", "20", "--resume"]);
    assert!(out.contains("resumed from step 10 (file://"), "{out}");
    let want: Vec<_> = straight
        .losses()
        .into_iter()
        .filter(|(s, _)| *s > 10)
        .collect();
    let got: Vec<_> = resumed
        .losses()
        .into_iter()
        .filter(|(s, _)| *s > 10)
        .collect();
    assert_eq!(want.len(), 10);
    assert_eq!(got, want, "losses of steps 11..20 differ after resume");
    assert_eq!(
        resumed.losses().len(),
        20,
        "metrics.jsonl holds each step once"
    );
    assert_eq!(
        first.params(20),
        straight.params(20),
        "final parameters differ after resume"
    );
}

#[test]
fn same_seed_same_bits_for_any_rank_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let runs: Vec<Run> = ["1", "2", "3", "1"]
        .iter()
        .enumerate()
        .map(|(i, ranks)| {
            train(
                &data,
                &tmp.path().join(format!("r{i}")),
                &["--steps", "8", "--ranks", ranks],
            )
            .0
        })
        .collect();
    for r in &runs[1..] {
        assert_eq!(
            r.losses(),
            runs[0].losses(),
            "losses differ for {:?}",
            r.dir
        );
        assert_eq!(
            r.params(8),
            runs[0].params(8),
            "parameters differ for {:?}",
            r.dir
        );
    }
    // The oracle can fail: another seed gives other bits.
    let (other, _) = train(
        &data,
        &tmp.path().join("seed2"),
        &["--steps", "8", "--seed", "2"],
    );
    assert_ne!(other.losses(), runs[0].losses());
}

#[test]
fn training_learns_and_writes_metrics_plot_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (run, out) = train(
        &data,
        &tmp.path().join("run"),
        &["--steps", "40", "--eval-every", "20", "--ckpt-every", "20"],
    );
    assert!(out.contains("corpus: "), "{out}");
    assert!(out.contains("sha256 "), "{out}");
    assert!(out.contains("--- sample ---"), "{out}");
    let m = run.metrics();
    assert_eq!(m.len(), 40);
    for line in &m {
        for key in ["step", "loss", "lr", "tokens_per_s"] {
            assert!(line.get(key).is_some(), "metrics line lacks {key}: {line}");
        }
    }
    assert!(m[19]["val_loss"].is_f64() && m[39]["val_loss"].is_f64());
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[39]["loss"].as_f64().unwrap();
    assert!(last < first * 0.8, "loss did not fall: {first} -> {last}");
    let png = std::fs::read(run.dir.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Checkpoints at 20 and 40, no extra final one.
    assert_eq!(run.ckpt_folders().len(), 2);
    let store = run.store();
    let list = ok(&["ckpt", "list", &store]);
    assert!(
        list.contains("step-0000000020") && list.contains("step-0000000040"),
        "{list}"
    );
    let inspect = ok(&["ckpt", "inspect", &store]);
    assert!(inspect.contains("step 40"), "{inspect}");
    let verify = ok(&["ckpt", "verify", &store]);
    assert_eq!(
        verify.lines().filter(|l| l.starts_with("ok ")).count(),
        2,
        "{verify}"
    );
}

#[test]
fn default_corpus_needs_no_flags_but_a_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = ok(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("corpus: built-in corpus"), "{out}");
    assert!(out.contains("done: step 2"), "{out}");
}

#[test]
fn a_second_start_without_resume_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    train(&data, &dir, &["--steps", "2"]);
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let err = fails(&tiny_args(d, r, &["--steps", "4"]));
    assert!(
        err.contains("already holds checkpoints") && err.contains("--resume"),
        "{err}"
    );
    let err = fails(&tiny_args(
        d,
        r,
        &["--steps", "4", "--resume", "--seed", "9"],
    ));
    assert!(err.contains("seed"), "{err}");
}

#[test]
fn bad_input_gets_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let d = data.to_str().unwrap();
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();

    let err = fails(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        "/no/such/corpus.txt",
        "--run-dir",
        r,
    ]);
    assert!(
        err.contains("/no/such/corpus.txt") && err.contains("does not exist"),
        "{err}"
    );

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        empty.to_str().unwrap(),
        "--run-dir",
        r,
    ]);
    assert!(err.contains("empty"), "{err}");

    let err = fails(&["train", "--preset", "gpt5", "--data", d, "--run-dir", r]);
    assert!(err.contains("gpt5") && err.contains("nano"), "{err}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("run");
    let err = fails(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        d,
        "--run-dir",
        under_file.to_str().unwrap(),
    ]);
    assert!(err.contains("run dir") && err.contains("writable"), "{err}");

    let err = fails(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        d,
        "--batch-size",
        "6",
        "--micro-batch-size",
        "4",
        "--run-dir",
        r,
    ]);
    assert!(err.contains("multiple"), "{err}");

    let err = fails(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        d,
        "--resume",
        "--run-dir",
        r,
    ]);
    assert!(err.contains("no checkpoint"), "{err}");
}

#[test]
fn corrupt_checkpoint_is_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let (run, _) = train(&data, &dir, &["--steps", "4", "--ckpt-every", "2"]);
    // Flip one byte in the newest checkpoint's parameters.
    let newest = run.folder_of_step(4).join("params.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();
    let before = std::fs::read(&newest).unwrap();

    let out = tenax(&["ckpt", "verify", &run.store()]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BAD") && stdout.contains("params.safetensors"),
        "{stdout}"
    );

    // Resume falls back to the older good checkpoint, with a warning naming the bad one.
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let out = tenax(&tiny_args(d, r, &["--steps", "6", "--resume"]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("resumed from step 2"), "{stdout}");
    assert!(
        stderr.contains("warning") && stderr.contains("params.safetensors"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&newest).unwrap(),
        before,
        "the bad checkpoint must not be touched"
    );

    // With every checkpoint bad, resume refuses.
    for folder in run.ckpt_folders() {
        let p = folder.join("params.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    }
    let err = fails(&tiny_args(d, r, &["--steps", "8", "--resume"]));
    assert!(err.contains("verif"), "{err}");
}

#[test]
fn non_finite_steps_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let out = tenax(&tiny_args(
        d,
        r,
        &[
            "--steps",
            "30",
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--grad-clip",
            "0",
            "--max-bad-steps",
            "3",
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("non-finite"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn config_file_takes_the_flag_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let cfg = tmp.path().join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "preset = \"tiny\"\ndata = [\"{}\"]\ntokenizer = \"bytes\"\nsteps = 3\nbatch_size = 4\nmicro_batch_size = 2\nrun_dir = \"{}\"\n",
            data.display(),
            dir.display()
        ),
    )
    .unwrap();
    let out = ok(&["train", "--config", cfg.to_str().unwrap(), "--steps", "2"]);
    assert!(
        out.contains("done: step 2"),
        "flag wins over the file: {out}"
    );
    assert!(out.contains("vocab 256"), "{out}");
    std::fs::write(&cfg, "preset = \"tiny\"\nbatchsize = 4\n").unwrap();
    let err = fails(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(err.contains("batchsize"), "{err}");
}

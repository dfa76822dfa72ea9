//! End-to-end tests of the `tenax` binary: real processes, real files, tiny models.
//!
//! They run serially (the nextest group `e2e` in .config/nextest.toml) with one candle
//! thread each, so they are stable on a loaded 2-core machine. No verdict depends on time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tenax_core::rng::SplitMix64;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

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
    /// Every tensor of the checkpoint of `step` (parameters and optimizer state, assembled
    /// from however many shards), as (name, bit patterns), sorted by name.
    fn state(&self, step: u64) -> Vec<(String, Vec<u32>)> {
        let folder = self.folder_of_step(step);
        let name = folder.file_name().unwrap().to_string_lossy().to_string();
        let store = tenax_storage::Store::open(&self.store()).unwrap();
        let loaded = block_on(tenax_storage::load_checkpoint(&store, &name)).unwrap();
        loaded
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.data.iter().map(|v| v.to_bits()).collect()))
            .collect()
    }
    /// The `config` of the manifest of the checkpoint of `step`.
    fn stored_config(&self, step: u64) -> serde_json::Value {
        let folder = self.folder_of_step(step);
        let name = folder.file_name().unwrap().to_string_lossy().to_string();
        let store = tenax_storage::Store::open(&self.store()).unwrap();
        block_on(tenax_storage::load_checkpoint(&store, &name))
            .unwrap()
            .manifest
            .config
    }
    /// The model parameters of the checkpoint of `step` (no optimizer state).
    fn params(&self, step: u64) -> Vec<(String, Vec<u32>)> {
        self.state(step)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("adamw."))
            .collect()
    }
    /// Shard files of the checkpoint of `step`.
    fn shard_files(&self, step: u64) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.folder_of_step(step))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("shard-"))
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
        first.state(20),
        straight.state(20),
        "final parameters or optimizer state differ after resume"
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
            r.state(8),
            runs[0].state(8),
            "parameters or optimizer state differ for {:?}",
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
    // The built-in corpus went through `tenax data prepare`'s code into the run dir and
    // was streamed from there, as a prepared dataset is.
    assert!(out.contains("prepared dataset: "), "{out}");
    assert!(out.contains("dataset: file://"), "{out}");
    let prepared: Vec<PathBuf> = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    assert_eq!(prepared.len(), 1, "{prepared:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prepared[0].join("manifest.json")).unwrap())
            .unwrap();
    assert!(
        manifest["totals"]["shards"].as_u64().unwrap() >= 2,
        "{manifest}"
    );
    // A resume reuses it, and continues.
    let out = ok(&[
        "train",
        "--steps",
        "4",
        "--resume",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("(reused)"), "{out}");
    assert!(out.contains("resumed from step 2"), "{out}");
    // A cached shard changed behind its manifest's back is refused by name.
    let shard = std::fs::read_dir(prepared[0].join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let err = fails(&[
        "train",
        "--steps",
        "6",
        "--resume",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let name = shard.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name), "{err}");
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

    // An allocator setting that is not a number stops the process before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_tenax"))
        .args(["ckpt", "list", "memory://"])
        .env("TENAX_MALLOC_TRIM_S", "10s")
        .output()
        .expect("run tenax");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: TENAX_MALLOC_TRIM_S=\"10s\" is not a whole number"),
        "{stderr}"
    );
}

#[test]
fn corrupt_checkpoint_is_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let (run, _) = train(&data, &dir, &["--steps", "4", "--ckpt-every", "2"]);
    // Flip one byte in the newest checkpoint's (only) shard.
    let newest = run.folder_of_step(4).join("shard-00000.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();
    let before = std::fs::read(&newest).unwrap();

    assert_named_and_skipped(&run, &data, &dir, "shard-00000.safetensors");
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    assert_eq!(
        std::fs::read(&newest).unwrap(),
        before,
        "the bad checkpoint must not be touched"
    );

    // With every checkpoint bad, resume refuses.
    for folder in run.ckpt_folders() {
        let p = folder.join("shard-00000.safetensors");
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

/// Runs tenax with extra environment variables; returns the output.
fn tenax_env(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenax"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("TENAX_LOG")
        .output()
        .expect("run tenax")
}

fn ok_env(args: &[&str], env: &[(String, String)]) -> String {
    let out = tenax_env(args, env);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tenax {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn saved_from_2_ranks_resumes_into_1_and_from_1_into_3() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let common = ["--lr-decay-steps", "12", "--ckpt-every", "6"];
    let with = |steps: &'static str, ranks: &'static str, resume: bool| {
        let mut v = common.to_vec();
        v.extend_from_slice(&["--steps", steps, "--ranks", ranks]);
        if resume {
            v.push("--resume");
        }
        v
    };
    let (straight, _) = train(&data, &tmp.path().join("straight"), &with("12", "1", false));
    let (two, _) = train(&data, &tmp.path().join("two"), &with("6", "2", false));
    assert_eq!(
        two.shard_files(6),
        ["shard-00000.safetensors", "shard-00001.safetensors"],
        "two replicas share the writing"
    );
    assert_eq!(straight.shard_files(6), ["shard-00000.safetensors"]);
    assert_eq!(
        two.state(6),
        straight.state(6),
        "the 2-writer checkpoint holds the same state"
    );
    let (_, out) = train(&data, &tmp.path().join("two"), &with("12", "1", true));
    assert!(out.contains("resumed from step 6"), "{out}");
    assert_eq!(two.state(12), straight.state(12), "2 ranks -> 1 rank");

    let (one, _) = train(&data, &tmp.path().join("one"), &with("6", "1", false));
    train(&data, &tmp.path().join("one"), &with("12", "3", true));
    assert_eq!(one.shard_files(12).len(), 3);
    assert_eq!(one.state(12), straight.state(12), "1 rank -> 3 ranks");
}

/// `tenax train` with another preset than the tests' tiny one.
fn train_preset(data: &Path, dir: &Path, preset: &str, extra: &[&str]) -> (Run, String) {
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let mut args = tiny_args(d, r, extra);
    assert_eq!(args[1], "--preset");
    args[2] = preset;
    let out = ok(&args);
    (
        Run {
            dir: dir.to_path_buf(),
        },
        out,
    )
}

/// The newest checkpoint of a run, exported.
fn run_export(run: &Run) -> Vec<u8> {
    export_bytes(&run.store(), &[], &run.dir.join("export.safetensors"))
}

/// The validation losses a run logged, as bit patterns.
fn val_losses(run: &Run) -> Vec<u64> {
    run.metrics()
        .iter()
        .filter_map(|m| m["val_loss"].as_f64())
        .map(f64::to_bits)
        .collect()
}

/// `--pipeline-stages 2` as 1 pipeline (`--ranks 2`) and 2 pipelines (`--ranks 4`),
/// both schedules: losses, validation losses and the exported final state are those of
/// `--ranks 1`, byte for byte; another seed is not.
#[test]
fn pipelines_of_2_stages_train_the_bits_of_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let common = ["--steps", "4", "--eval-every", "2"];
    let with = |extra: &[&'static str]| {
        let mut v = common.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let (one, _) = train(&data, &tmp.path().join("one"), &with(&["--ranks", "1"]));
    let want = run_export(&one);
    assert_eq!(val_losses(&one).len(), 2);
    for ranks in ["2", "4"] {
        for schedule in ["gpipe", "1f1b"] {
            let dir = tmp.path().join(format!("s2-n{ranks}-{schedule}"));
            let flags = [
                "--pipeline-stages",
                "2",
                "--ranks",
                ranks,
                "--schedule",
                schedule,
            ];
            let (run, out) = train(&data, &dir, &with(&flags));
            assert!(out.contains("pipelines: "), "{out}");
            assert!(out.contains("--- sample ---"), "{out}");
            let what = format!("--pipeline-stages 2 --ranks {ranks} --schedule {schedule}");
            assert_eq!(run.losses(), one.losses(), "{what}: losses");
            assert_eq!(val_losses(&run), val_losses(&one), "{what}: val losses");
            assert!(run_export(&run) == want, "{what}: the export differs");
        }
    }
    // The oracle can fail: another seed, pipelined, gives other bytes.
    let flags = ["--pipeline-stages", "2", "--ranks", "2", "--seed", "2"];
    let (other, _) = train(&data, &tmp.path().join("seed2"), &with(&flags));
    assert!(run_export(&other) != want);
    assert_ne!(other.losses(), one.losses());
}

/// Four stages of the 4-layer nano model, both schedules: the export of `--ranks 1`.
#[test]
fn a_pipeline_of_4_stages_trains_the_bits_of_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // The tests' batch of 6 in 3 slots: 1F1B's warm-up fills all 3 at stage 0.
    let common = ["--steps", "2"];
    let with = |extra: &[&'static str]| {
        let mut v = common.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let (one, _) = train_preset(&data, &tmp.path().join("one"), "nano", &with(&[]));
    let want = run_export(&one);
    for schedule in ["gpipe", "1f1b"] {
        let flags = [
            "--pipeline-stages",
            "4",
            "--ranks",
            "4",
            "--schedule",
            schedule,
        ];
        let dir = tmp.path().join(schedule);
        let (run, out) = train_preset(&data, &dir, "nano", &with(&flags));
        assert!(out.contains("4 stage(s)"), "{out}");
        assert_eq!(run.losses(), one.losses(), "S = 4 {schedule}: losses");
        assert_eq!(val_losses(&run), val_losses(&one), "S = 4 {schedule}");
        assert!(
            run_export(&run) == want,
            "S = 4 {schedule}: the export differs"
        );
    }
}

/// A checkpoint saved by 2 stages resumes into 1, and one saved by 1 into 2 stages (2
/// pipelines of them); both end as a straight run of one rank.
#[test]
fn saved_from_2_stages_resumes_into_1_and_from_1_into_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let with = |steps: &'static str, extra: &[&'static str]| {
        let mut v = vec!["--lr-decay-steps", "6", "--steps", steps];
        v.extend_from_slice(extra);
        v
    };
    let (straight, _) = train(&data, &tmp.path().join("straight"), &with("6", &[]));
    let stages2 = ["--pipeline-stages", "2", "--ranks", "2"];
    let (a, _) = train(&data, &tmp.path().join("a"), &with("3", &stages2));
    let one = ["--pipeline-stages", "1", "--ranks", "1", "--resume"];
    let (_, out) = train(&data, &tmp.path().join("a"), &with("6", &one));
    assert!(out.contains("resumed from step 3"), "{out}");
    assert!(!out.contains("pipelines: "), "{out}");
    assert_eq!(a.state(6), straight.state(6), "2 stages -> 1 stage");

    let (b, _) = train(&data, &tmp.path().join("b"), &with("3", &[]));
    let four = ["--pipeline-stages", "2", "--ranks", "4", "--resume"];
    train(&data, &tmp.path().join("b"), &with("6", &four));
    assert_eq!(
        b.state(6),
        straight.state(6),
        "1 stage -> 2 pipelines of 2 stages"
    );
    assert_eq!(b.losses(), straight.losses());
}

/// The nano model (4 blocks): saved by 2 stages, resumed by 4 stages and by 1; both
/// end as a straight run of one rank.
#[test]
fn saved_from_2_stages_resumes_into_4_and_into_1() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let with = |steps: &'static str, extra: &[&'static str]| {
        let mut v = vec!["--lr-decay-steps", "4", "--steps", steps];
        v.extend_from_slice(extra);
        v
    };
    let (straight, _) = train_preset(&data, &tmp.path().join("straight"), "nano", &with("4", &[]));
    let stages2 = ["--pipeline-stages", "2", "--ranks", "2"];
    for (name, resume) in [
        (
            "into-4",
            ["--pipeline-stages", "4", "--ranks", "4", "--resume"],
        ),
        (
            "into-1",
            ["--pipeline-stages", "1", "--ranks", "1", "--resume"],
        ),
    ] {
        let dir = tmp.path().join(name);
        let (run, _) = train_preset(&data, &dir, "nano", &with("2", &stages2));
        let (_, out) = train_preset(&data, &dir, "nano", &with("4", &resume));
        assert!(out.contains("resumed from step 2"), "{out}");
        assert_eq!(run.state(4), straight.state(4), "2 stages -> {name}");
        assert_eq!(run.losses(), straight.losses(), "2 stages -> {name}");
    }
}

/// Pipeline flags that cannot work get one line naming the flag.
#[test]
fn bad_pipeline_flags_get_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (d, r) = (
        data.to_str().unwrap(),
        tmp.path().join("run").to_str().unwrap().to_string(),
    );
    let cases: [(&[&str], &str); 5] = [
        (
            &["--pipeline-stages", "0"],
            "--pipeline-stages must be at least 1",
        ),
        (
            &["--pipeline-stages", "3", "--ranks", "4"],
            "--pipeline-stages 3: --ranks 4 is not a multiple",
        ),
        (
            &["--pipeline-stages", "3", "--ranks", "3"],
            "--pipeline-stages: 3 stages for a model of 2 block(s)",
        ),
        (
            &["--pipeline-stages", "2", "--ranks", "8"],
            "--ranks 8 / --pipeline-stages 2 = 4 pipeline(s)",
        ),
        (
            &["--schedule", "zigzag"],
            "--schedule: unknown pipeline schedule `zigzag`",
        ),
    ];
    for (flags, want) in cases {
        let err = fails(&tiny_args(d, &r, flags));
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn ckpt_ops_list_json_prune_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // One run per checkpoint, so that each save is the run's final one and is waited for:
    // with --ckpt-every a save that waits behind an upload may be superseded, and which
    // ones are depends on the machine's speed.
    let dir = tmp.path().join("run");
    let (run, _) = train(&data, &dir, &["--steps", "2", "--ranks", "2"]);
    for steps in ["4", "6", "8", "10"] {
        train(&data, &dir, &["--steps", steps, "--ranks", "2", "--resume"]);
    }
    let store = run.store();
    // A save that never committed: a shard without a manifest.
    let torn = run.dir.join("checkpoints/step-0000000012-g0-0123456789ab");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("shard-00000.safetensors"), b"partial").unwrap();
    // A committed checkpoint whose shard was truncated.
    let bad = run.folder_of_step(4).join("shard-00001.safetensors");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();

    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["ckpt", "list", &store, "--json"])).unwrap();
    let rows = listed.as_array().unwrap();
    let status_of = |step: u64| -> Vec<String> {
        rows.iter()
            .filter(|r| r["step"] == step)
            .map(|r| r["status"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(rows.len(), 6, "{listed}");
    assert_eq!(status_of(2), ["committed"]);
    assert_eq!(status_of(4), ["corrupt"]);
    assert_eq!(status_of(12), ["incomplete"]);
    for r in rows {
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["url"].as_str().unwrap().starts_with("file://"), "{r}");
    }
    let out = tenax(&["ckpt", "verify", &store]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BAD") && stdout.contains("shard-00001.safetensors"),
        "{stdout}"
    );

    // Export: from the root (newest good), and from that checkpoint's own URL: same bytes.
    let a = tmp.path().join("a.safetensors");
    let b = tmp.path().join("b.safetensors");
    let out = ok(&["ckpt", "export", &store, "--out", a.to_str().unwrap()]);
    assert!(out.contains("step 10"), "{out}");
    let folder10 = run.folder_of_step(10);
    let url10 = format!(
        "{store}/{}",
        folder10.file_name().unwrap().to_string_lossy()
    );
    ok(&["ckpt", "export", &url10, "--out", b.to_str().unwrap()]);
    let exported = std::fs::read(&a).unwrap();
    assert_eq!(
        exported,
        std::fs::read(&b).unwrap(),
        "export is byte-identical"
    );
    let st = safetensors::SafeTensors::deserialize(&exported).unwrap();
    let mut names = st.names();
    names.sort();
    let want: Vec<String> = run.params(10).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        want.iter().collect::<Vec<_>>(),
        "only model weights, model names"
    );
    for (name, bits) in run.params(10) {
        let t = st.tensor(&name).unwrap();
        let got: Vec<u32> = t
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, bits, "{name}");
    }

    // Prune: dry run first (deletes nothing), then for real.
    let before = run.ckpt_folders();
    let dry = ok(&[
        "ckpt",
        "prune",
        &store,
        "--keep-last",
        "2",
        "--min-age-s",
        "0",
        "--dry-run",
    ]);
    assert!(dry.contains("would delete"), "{dry}");
    assert_eq!(run.ckpt_folders(), before);
    let out = ok(&[
        "ckpt",
        "prune",
        &store,
        "--keep-last",
        "2",
        "--keep-every",
        "6",
        "--min-age-s",
        "0",
    ]);
    assert!(out.contains("deleted 3 folder(s)"), "{out}");
    let left: Vec<u64> =
        serde_json::from_str::<serde_json::Value>(&ok(&["ckpt", "list", &store, "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
    assert_eq!(
        left,
        [6, 8, 10],
        "keep the newest 2 and every 6th; corrupt 4 and the torn attempt go"
    );
    ok(&["ckpt", "verify", &store]);
}

/// A signing key pair in `dir`, written as `tenax ckpt keygen --out` writes it: (private
/// key file, public key file).
fn key_pair(dir: &Path, name: &str) -> (String, String) {
    let private = dir.join(name);
    tenax_storage::signing::write_key_pair(&private).unwrap();
    let public = tenax_storage::signing::public_key_path(&private);
    (
        private.to_str().unwrap().to_string(),
        public.to_str().unwrap().to_string(),
    )
}

/// Edit a signed (format v3) MANIFEST.json: replace `from` by `to`, recompute its BLAKE3
/// self-checksum and keep the signature, as someone who alters a checkpoint and fixes every
/// hash would.
fn edit_signed_manifest(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    let mut bytes = text.replacen(from, to, 1).into_bytes();
    let value_at = |bytes: &[u8], key: &str| {
        let pattern = format!("\"{key}\": \"");
        bytes
            .windows(pattern.len())
            .rposition(|w| w == pattern.as_bytes())
            .unwrap()
            + pattern.len()
    };
    let (at, sig) = (
        value_at(&bytes, "manifest_blake3"),
        value_at(&bytes, "signature"),
    );
    let mut zeroed = bytes.clone();
    zeroed[at..at + 64].fill(b'0');
    zeroed[sig..sig + 128].fill(b'0');
    let hash = tenax_storage::HashAlg::Blake3.hex(&zeroed);
    bytes[at..at + 64].copy_from_slice(hash.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// `tenax ckpt export --format hf`: a transformers GPT-2 directory. config.json says what
/// GPT2LMHeadModel needs; model.safetensors has transformers' names (h.0, not h.00) and
/// Conv1D shapes, and maps back to the checkpoint's weights bit for bit; a model built from
/// the exported tensors gives `tenax ckpt eval`'s loss on a text. (transformers itself:
/// scripts/hf-check, BENCHMARKS.md.)
#[test]
fn ckpt_export_hf_is_a_transformers_gpt2_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let (run, _) = train(&data, &dir, &["--steps", "3"]);
    let store = run.store();
    let out = tmp.path().join("hf");
    let printed = ok(&[
        "ckpt",
        "export",
        &store,
        "--format",
        "hf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        printed.contains("step 3") && printed.contains("tenax_tokenizer.json"),
        "{printed}"
    );

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let stored = run.stored_config(3);
    let model: tenax_model::GptConfig = serde_json::from_value(stored["model"].clone()).unwrap();
    for (key, want) in [
        ("model_type", serde_json::json!("gpt2")),
        ("architectures", serde_json::json!(["GPT2LMHeadModel"])),
        ("activation_function", serde_json::json!("gelu")),
        ("layer_norm_epsilon", serde_json::json!(1e-5)),
        ("tie_word_embeddings", serde_json::json!(true)),
        ("n_layer", serde_json::json!(2)),
        ("n_head", serde_json::json!(2)),
        ("n_embd", serde_json::json!(32)),
        ("n_positions", serde_json::json!(16)),
        ("vocab_size", serde_json::json!(model.vocab_size)),
    ] {
        assert_eq!(config[key], want, "config.json {key}: {config}");
    }

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt"),
        "transformers needs format = pt"
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<tenax_model::NamedTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| tenax_model::NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data: view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
        .collect();
    let shape_of = |n: &str| {
        tensors
            .iter()
            .find(|t| t.name == n)
            .map(|t| t.shape.clone())
    };
    assert_eq!(
        shape_of("transformer.wte.weight"),
        Some(vec![model.vocab_size, 32])
    );
    assert_eq!(shape_of("transformer.wpe.weight"), Some(vec![16, 32]));
    assert_eq!(
        shape_of("transformer.h.0.attn.c_attn.weight"),
        Some(vec![32, 96])
    );
    assert_eq!(
        shape_of("transformer.h.1.mlp.c_fc.weight"),
        Some(vec![32, 128])
    );
    assert_eq!(
        shape_of("transformer.h.1.mlp.c_proj.weight"),
        Some(vec![128, 32])
    );
    assert_eq!(shape_of("transformer.ln_f.bias"), Some(vec![32]));
    assert_eq!(tensors.len(), 4 + 12 * 2);
    assert!(
        tensors
            .iter()
            .all(|t| t.name.starts_with("transformer.") && !t.name.contains(".h.00")),
        "transformers' names, no zero-padded block numbers"
    );
    // Back to tenax's layout: the checkpoint's weights, bit for bit.
    let flat = tenax_model::hf::from_hf(&model, &tensors).unwrap();
    let layout = tenax_model::ParamLayout::for_config(&model);
    for (name, bits) in run.params(3) {
        let e = layout.get(&name).unwrap();
        let got: Vec<u32> = flat[e.range()].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, bits, "{name}");
    }

    // The char tokenizer's id table.
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tenax_tokenizer.json")).unwrap())
            .unwrap();
    let chars = stored["tokenizer"]["chars"].as_str().unwrap();
    let table: String = tok["id_to_char"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(table, chars);

    // tenax ckpt eval's loss is the loss of a model built from the exported tensors.
    let text = tmp.path().join("held-out.txt");
    std::fs::write(
        &text,
        "the king shall speak of love,\nnow what is fair to thee my lord.\n",
    )
    .unwrap();
    let ev: serde_json::Value = serde_json::from_str(&ok(&[
        "ckpt",
        "eval",
        &store,
        "--text",
        text.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let ids: Vec<u32> = ev["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let windows = ev["windows"].as_u64().unwrap() as usize;
    assert_eq!(windows, (ids.len() - 1) / 16);
    assert!(windows >= 3, "{ev}");
    let gpt = tenax_model::Gpt::new(model.clone()).unwrap();
    gpt.set_params(&flat).unwrap();
    let sum: f64 = (0..windows)
        .map(|w| {
            let win = &ids[w * 16..=(w + 1) * 16];
            f64::from(gpt.loss_sum(&win[..16], &win[1..], 1).unwrap())
        })
        .sum();
    let loss = ev["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{ev}");
    assert!((sum / (windows * 16) as f64 - loss).abs() < 1e-6, "{ev}");

    // A file where the directory should go: one line naming it.
    let err = fails(&[
        "ckpt",
        "export",
        &store,
        "--format",
        "hf",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(
        err.contains("is a file") && err.contains("directory"),
        "{err}"
    );
    let err = fails(&["ckpt", "eval", &store, "--text", "/no/such.txt"]);
    assert!(err.contains("/no/such.txt"), "{err}");
}

#[test]
fn signed_checkpoints_resume_only_under_the_matching_trust_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (sign, trust) = key_pair(tmp.path(), "ckpt.key");
    let (_, other) = key_pair(tmp.path(), "other.key");
    let dir = tmp.path().join("run");
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let (run, _) = train(
        &data,
        &dir,
        &["--steps", "4", "--ckpt-every", "2", "--sign-key", &sign],
    );
    let public = tenax_storage::TrustKey::read_file(Path::new(&trust)).unwrap();
    for step in [2, 4] {
        let bytes = std::fs::read(run.folder_of_step(step).join("MANIFEST.json")).unwrap();
        let m = tenax_storage::Manifest::parse(&bytes).unwrap();
        assert_eq!(m.format_version, 3);
        assert_eq!(m.signer, public.hex(), "step {step}");
    }

    // The matching key resumes; the run keeps signing.
    let (_, out) = train(
        &data,
        &dir,
        &[
            "--steps",
            "6",
            "--ckpt-every",
            "2",
            "--resume",
            "--trust-key",
            &trust,
            "--sign-key",
            &sign,
        ],
    );
    assert!(out.contains("resumed from step 4"), "{out}");

    // Another key: refused in one line naming the checkpoint, the key and what to do.
    let err = fails(&tiny_args(
        d,
        r,
        &["--steps", "8", "--resume", "--trust-key", &other],
    ));
    assert!(err.contains("no committed checkpoint verifies"), "{err}");
    assert!(err.contains("step-0000000006-"), "{err}");
    assert!(
        err.contains("signed by key") && err.contains("--trust-key"),
        "{err}"
    );

    // The newest manifest edited (another data cursor), its hashes recomputed: without a
    // trust key its hashes all agree (the edit would go unnoticed); under the key the
    // signature fails, and the resume falls back to step 4 with a warning naming it.
    let manifest = run.folder_of_step(6).join("MANIFEST.json");
    let m = tenax_storage::Manifest::parse(&std::fs::read(&manifest).unwrap()).unwrap();
    let cursor = format!("\"data_cursor\": {}", m.data_cursor);
    edit_signed_manifest(
        &manifest,
        &cursor,
        &format!("\"data_cursor\": {}", m.data_cursor + 6),
    );
    let edited = tenax_storage::Manifest::parse(&std::fs::read(&manifest).unwrap())
        .expect("the hashes were recomputed");
    assert_eq!(edited.data_cursor, m.data_cursor + 6);
    let out = tenax(&tiny_args(
        d,
        r,
        &["--steps", "8", "--resume", "--trust-key", &trust],
    ));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("resumed from step 4"), "{stdout}");
    assert!(
        stderr.contains("warning")
            && stderr.contains("step-0000000006-")
            && stderr.contains("changed after it was signed"),
        "{stderr}"
    );

    // An unsigned run: refused under a trust key, with what to do.
    let unsigned = tmp.path().join("unsigned");
    train(&data, &unsigned, &["--steps", "2"]);
    let u = unsigned.to_str().unwrap();
    let err = fails(&tiny_args(
        d,
        u,
        &["--steps", "4", "--resume", "--trust-key", &trust],
    ));
    assert!(
        err.contains("not signed") && err.contains("drop --trust-key"),
        "{err}"
    );
    // A private key given as the trust key is refused before anything runs.
    let err = fails(&tiny_args(
        d,
        u,
        &["--steps", "4", "--resume", "--trust-key", &sign],
    ));
    assert!(
        err.contains("--trust-key") && err.contains("private key"),
        "{err}"
    );
}

#[test]
fn ckpt_keygen_then_verify_and_export_under_a_trust_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let key = tmp.path().join("keys/ckpt.key");
    let (key_s, public) = (
        key.to_str().unwrap().to_string(),
        format!("{}.pub", key.display()),
    );
    let out = ok(&["ckpt", "keygen", "--out", &key_s]);
    assert!(out.contains("ckpt.key.pub"), "{out}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is 0600");
    }
    let err = fails(&["ckpt", "keygen", "--out", &key_s]);
    assert!(err.contains("already exists"), "{err}");
    let other = tmp.path().join("other.key");
    ok(&["ckpt", "keygen", "--out", other.to_str().unwrap()]);
    let other_pub = format!("{}.pub", other.display());

    let dir = tmp.path().join("run");
    let (run, _) = train(
        &data,
        &dir,
        &["--steps", "4", "--ckpt-every", "2", "--sign-key", &key_s],
    );
    let store = run.store();
    let out = ok(&["ckpt", "verify", &store, "--trust-key", &public]);
    assert_eq!(out.matches("signed by").count(), 2, "{out}");
    let a = tmp.path().join("a.safetensors");
    let out = ok(&[
        "ckpt",
        "export",
        &store,
        "--out",
        a.to_str().unwrap(),
        "--trust-key",
        &public,
    ]);
    assert!(out.contains("step 4"), "{out}");

    // Another key: verify says BAD for each, export refuses in one line.
    let out = tenax(&["ckpt", "verify", &store, "--trust-key", &other_pub]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("BAD").count(), 2, "{stdout}");
    assert!(stdout.contains("signed by key"), "{stdout}");
    let err = fails(&[
        "ckpt",
        "export",
        &store,
        "--out",
        a.to_str().unwrap(),
        "--trust-key",
        &other_pub,
    ]);
    assert!(err.contains("no committed checkpoint verifies"), "{err}");

    // Step 4's manifest edited, hashes recomputed: plain verify passes (every hash agrees),
    // verify under the key names it; export from the store falls back to step 2, and export
    // of step 4 itself is refused in one line naming it.
    let manifest = run.folder_of_step(4).join("MANIFEST.json");
    let m = tenax_storage::Manifest::parse(&std::fs::read(&manifest).unwrap()).unwrap();
    edit_signed_manifest(
        &manifest,
        &format!("\"data_cursor\": {}", m.data_cursor),
        &format!("\"data_cursor\": {}", m.data_cursor + 6),
    );
    ok(&["ckpt", "verify", &store]);
    let out = tenax(&["ckpt", "verify", &store, "--trust-key", &public]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("BAD") && stdout.contains("changed after it was signed"),
        "{stdout}"
    );
    let out = ok(&[
        "ckpt",
        "export",
        &store,
        "--out",
        a.to_str().unwrap(),
        "--trust-key",
        &public,
    ]);
    assert!(out.contains("step 2"), "{out}");
    let folder4 = run.folder_of_step(4);
    let url4 = format!("{store}/{}", folder4.file_name().unwrap().to_string_lossy());
    let err = fails(&[
        "ckpt",
        "export",
        &url4,
        "--out",
        a.to_str().unwrap(),
        "--trust-key",
        &public,
    ]);
    assert!(
        err.contains("step-0000000004-") && err.contains("changed after it was signed"),
        "{err}"
    );
}

#[test]
fn a_flipped_byte_in_the_manifest_is_named_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let dir = tmp.path().join("run");
    let (run, _) = train(&data, &dir, &["--steps", "4", "--ckpt-every", "2"]);
    let manifest = run.folder_of_step(4).join("MANIFEST.json");
    let mut bytes = std::fs::read(&manifest).unwrap();
    // Change one digit of the data cursor: still valid JSON, but no longer the saved state.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let at = text.find("\"data_cursor\": ").unwrap() + "\"data_cursor\": ".len();
    bytes[at] = if bytes[at] == b'9' {
        b'8'
    } else {
        bytes[at] + 1
    };
    std::fs::write(&manifest, &bytes).unwrap();
    // The manifest carries a checksum of its own bytes, so even a plausible edit is caught.
    assert_named_and_skipped(&run, &data, &dir, "MANIFEST.json");
}

/// With the step-4 checkpoint of `run` damaged in `file`: `ckpt verify` fails naming the
/// file, and a resume to step 6 falls back to step 2 with a warning naming it.
fn assert_named_and_skipped(run: &Run, data: &Path, dir: &Path, file: &str) {
    let out = tenax(&["ckpt", "verify", &run.store()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("BAD") && stdout.contains(file), "{stdout}");
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let out = tenax(&tiny_args(d, r, &["--steps", "6", "--resume"]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("resumed from step 2"), "{stdout}");
    assert!(
        stderr.contains("warning") && stderr.contains(file),
        "{stderr}"
    );
}

/// A moto S3 server with one bucket, started for one test and stopped (by PID) on drop.
fn moto_with_bucket(bucket: &str) -> tenax_chaos::MotoServer {
    let moto =
        tenax_chaos::MotoServer::start().expect("start moto_server (scripts/setup installs it)");
    moto.create_bucket(bucket).expect("create the bucket");
    moto
}

/// `tenax ckpt export` of a store's newest checkpoint, as bytes.
fn export_bytes(store: &str, env: &[(String, String)], out: &Path) -> Vec<u8> {
    ok_env(
        &["ckpt", "export", store, "--out", out.to_str().unwrap()],
        env,
    );
    std::fs::read(out).unwrap()
}

#[test]
fn s3_store_end_to_end_with_resume_and_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let d = data.to_str().unwrap();
    let moto = moto_with_bucket("tenax-e2e");
    let env = moto.s3_env();
    let store = "s3://tenax-e2e/jobs/a";

    let dir = tmp.path().join("s3run");
    let r = dir.to_str().unwrap();
    let flags = [
        "--lr-decay-steps",
        "10",
        "--ckpt-every",
        "3",
        "--ranks",
        "2",
        "--store",
        store,
    ];
    let with = |steps: &'static str, resume: bool| {
        let mut v = flags.to_vec();
        v.extend_from_slice(&["--steps", steps]);
        if resume {
            v.push("--resume");
        }
        v
    };
    ok_env(&tiny_args(d, r, &with("6", false)), &env);
    let out = ok_env(&tiny_args(d, r, &with("10", true)), &env);
    assert!(
        out.contains("resumed from step 6 (s3://tenax-e2e/jobs/a/step-0000000006-g0-"),
        "{out}"
    );
    // The same run on local disk, never interrupted: the exported weights are identical.
    let (local, _) = train(
        &data,
        &tmp.path().join("local"),
        &[
            "--steps",
            "10",
            "--lr-decay-steps",
            "10",
            "--ckpt-every",
            "3",
        ],
    );
    assert_eq!(
        export_bytes(store, &env, &tmp.path().join("s3.safetensors")),
        export_bytes(&local.store(), &[], &tmp.path().join("local.safetensors")),
        "S3 + resume + 2 ranks gives the same weights as one local run"
    );

    let listed: serde_json::Value =
        serde_json::from_str(&ok_env(&["ckpt", "list", store, "--json"], &env)).unwrap();
    let steps: Vec<(u64, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let committed = |s: u64| (s, "committed".to_string());
    assert_eq!(
        steps,
        [committed(3), committed(6), committed(9), committed(10)]
    );
    let verify = ok_env(&["ckpt", "verify", store], &env);
    assert_eq!(
        verify.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{verify}"
    );
    ok_env(&["ckpt", "prune", store, "--keep-last", "1"], &env);
    let left: serde_json::Value =
        serde_json::from_str(&ok_env(&["ckpt", "list", store, "--json"], &env)).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["step"], 10);

    // Errors name the URL and what to do.
    let out = tenax_env(&["ckpt", "list", "s3://no-such-bucket/x"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("s3://no-such-bucket/x") && stderr.contains("bucket does not exist"),
        "{stderr}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let t0 = std::time::Instant::now();
    let out = tenax_env(
        &["ckpt", "list", store],
        &tenax_chaos::s3_env_for(&dead_endpoint),
    );
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(store) && stderr.contains("unreachable"),
        "{stderr}"
    );
    // Not a speed verdict: retries are bounded (8 s window), so this returns, not hangs.
    assert!(elapsed.as_secs() < 120, "took {elapsed:?}");
    eprintln!("unreachable endpoint reported after {elapsed:?}");
}

#[test]
fn s3_saves_through_injected_faults_commit_or_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let d = data.to_str().unwrap();
    let moto = moto_with_bucket("faults");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let faults = tenax_chaos::ProxyFaults {
        error_rate: 0.2,
        drop_before_rate: 0.0,
        drop_after_rate: 0.05,
        latency_rate: 0.1,
        latency_ms: (1, 30),
    };
    let proxy = tenax_chaos::FaultProxy::start(moto.addr(), faults, 7).unwrap();
    let store = "s3://faults/run";
    let dir = tmp.path().join("run");
    let out = tenax_env(
        &tiny_args(
            d,
            dir.to_str().unwrap(),
            &[
                "--steps",
                "12",
                "--lr-decay-steps",
                "12",
                "--ckpt-every",
                "1",
                "--ranks",
                "2",
                "--store",
                store,
            ],
        ),
        &tenax_chaos::s3_env_for(&proxy.endpoint()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("proxy after the training run: {:?}", proxy.stats());
    // Every save either committed or failed with a warning; the run itself may fail only
    // because its final save failed, and then it says so.
    if !out.status.success() {
        assert!(stderr.contains("final checkpoint"), "{stderr}");
    }
    // Read directly from S3 (no proxy): nothing is half-visible. Every attempt with a
    // manifest verifies; the others are incomplete.
    let env = moto.s3_env();
    let listed: serde_json::Value =
        serde_json::from_str(&ok_env(&["ckpt", "list", store, "--json"], &env)).unwrap();
    let rows = listed.as_array().unwrap();
    assert!(rows.iter().all(|r| r["status"] != "corrupt"), "{listed}");
    let committed = rows.iter().filter(|r| r["status"] == "committed").count();
    assert!(committed > 0, "{listed}\n{stderr}");
    let verify = ok_env(&["ckpt", "verify", store], &env);
    assert_eq!(
        verify.lines().filter(|l| l.starts_with("ok ")).count(),
        committed,
        "{verify}"
    );
    // Many more saves, straight through the storage API and the same faulty proxy: each one
    // commits (through object_store's retries, or by reading back a lost commit) or fails
    // cleanly; read directly afterwards, every committed one verifies and loads.
    let direct = tenax_storage::Store::from_object_store(
        "s3://faults/direct",
        s3_client(&proxy.endpoint(), "faults", 10),
        "direct",
    );
    let (mut ok_saves, mut failed_saves, mut read_back) = (0, 0, 0);
    for step in 1..=30u64 {
        let content = tenax_storage::CheckpointContent {
            meta: tenax_storage::CheckpointMeta {
                step,
                generation: 0,
                config: serde_json::json!({}),
                config_hash: "h".into(),
                data_cursor: step,
                rng: serde_json::Value::Null,
                extra: serde_json::Value::Null,
            },
            tensors: vec![tenax_storage::TensorData {
                name: "w".into(),
                shape: vec![16, 8],
                data: (0..128).map(|i| (i as u64 * step) as f32).collect(),
            }],
        };
        match rt.block_on(tenax_storage::save_checkpoint(&direct, &content, 3)) {
            Ok(saved) => {
                ok_saves += 1;
                read_back += saved.recovered_by_read_back as u32;
            }
            Err(_) => failed_saves += 1,
        }
    }
    let clean = tenax_storage::Store::from_object_store(
        "s3://faults/direct",
        s3_client(&moto.endpoint(), "faults", 0),
        "direct",
    );
    let listing = rt
        .block_on(tenax_storage::list_checkpoints(&clean))
        .unwrap();
    let mut committed_direct = 0;
    for a in &listing.attempts {
        assert_ne!(a.status.label(), "corrupt", "{a:?}");
        if a.status == tenax_storage::AttemptStatus::Committed {
            committed_direct += 1;
            let loaded = rt
                .block_on(tenax_storage::load_checkpoint(&clean, &a.folder))
                .unwrap();
            let want: Vec<f32> = (0..128).map(|i| (i as u64 * a.step) as f32).collect();
            assert_eq!(loaded.tensor("w").unwrap().data, want);
        }
    }
    assert_eq!(
        committed_direct, ok_saves,
        "every reported commit is visible, nothing else is"
    );
    let stats = proxy.stats();
    eprintln!(
        "direct saves: {ok_saves} committed ({read_back} by read-back), {failed_saves} failed cleanly; proxy {stats:?}"
    );
    assert!(ok_saves > 0);
    // The faults really happened (about 190 requests at these rates).
    assert!(
        stats.errors_injected > 0 && stats.dropped_after > 0,
        "{stats:?}"
    );

    if out.status.success() {
        // Faults change nothing in the math: same weights as a fault-free local run.
        let (local, _) = train(
            &data,
            &tmp.path().join("local"),
            &["--steps", "12", "--lr-decay-steps", "12", "--ranks", "2"],
        );
        assert_eq!(
            export_bytes(store, &env, &tmp.path().join("s3.safetensors")),
            export_bytes(&local.store(), &[], &tmp.path().join("local.safetensors")),
        );
    }
}

/// An S3 client for a moto bucket (or a proxy in front of it) with bounded, quick retries,
/// built without touching this process's environment.
fn s3_client(
    endpoint: &str,
    bucket: &str,
    max_retries: usize,
) -> std::sync::Arc<dyn object_store::ObjectStore> {
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_retry(object_store::RetryConfig {
            max_retries,
            retry_timeout: std::time::Duration::from_secs(8),
            backoff: object_store::BackoffConfig {
                init_backoff: std::time::Duration::from_millis(10),
                max_backoff: std::time::Duration::from_millis(200),
                base: 2.0,
            },
        })
        .build()
        .unwrap();
    std::sync::Arc::new(s3)
}

#[test]
fn a_lost_manifest_response_is_resolved_by_reading_back() {
    let moto = moto_with_bucket("lost");
    block_on(async {
        let s3 = s3_client(&moto.endpoint(), "lost", 0);
        let faulty = std::sync::Arc::new(tenax_chaos::FaultStore::new(
            s3,
            tenax_chaos::CrashPoint::LoseResponse("MANIFEST.json".into()),
        ));
        let store = tenax_storage::Store::from_object_store("s3://lost/x", faulty, "x");
        let content = tenax_storage::CheckpointContent {
            meta: tenax_storage::CheckpointMeta {
                step: 7,
                generation: 1,
                config: serde_json::json!({}),
                config_hash: "h".into(),
                data_cursor: 42,
                rng: serde_json::Value::Null,
                extra: serde_json::Value::Null,
            },
            tensors: vec![tenax_storage::TensorData {
                name: "w".into(),
                shape: vec![3, 2],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            }],
        };
        let saved = tenax_storage::save_checkpoint(&store, &content, 2)
            .await
            .unwrap();
        assert!(
            saved.recovered_by_read_back,
            "the lost response was read back"
        );
        let (loaded, warnings) = tenax_storage::latest_verified(&store)
            .await
            .unwrap()
            .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(loaded.manifest.data_cursor, 42);
        assert_eq!(loaded.tensor("w").unwrap().data, content.tensors[0].data);
    });
}

#[test]
fn kill_9_during_s3_saves_never_tears_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = moto_with_bucket("kills");
    let out = tenax_env(
        &[
            "bench",
            "ckpt-kill",
            "--kills",
            "5",
            "--steps",
            "40",
            "--seed",
            "3",
            "--store",
            "s3://kills/bench",
            "--work-dir",
            tmp.path().to_str().unwrap(),
        ],
        &moto.s3_env(),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["kills"], 5, "{report}");
    assert_eq!(report["torn_loads"], 0, "{report}");
    assert_eq!(report["final_mismatches"], 0, "{report}");
    assert!(report["completed_runs"].as_u64().unwrap() >= 1, "{report}");
}

// ---------------------------------------------------------------------------
// `tenax daemon`: whole clusters of daemon processes with a real etcd and a real
// S3-compatible server (tenax_chaos::LocalCluster), compared bit for bit with
// `tenax train --ranks 3`.
// ---------------------------------------------------------------------------

use std::time::{Duration, Instant};

use tenax_chaos::cluster::{ClusterSpec, LocalCluster, Signal};

/// The training flags every daemon test uses (and the reference `tenax train` run).
fn daemon_train_flags(data: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--preset",
        "tiny",
        "--data",
        data.to_str().unwrap(),
        "--tokenizer",
        "char",
        "--batch-size",
        "12",
        "--micro-batch-size",
        "2",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--lr-decay-steps",
        "40",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // 0: the caller passes --steps per daemon (the schedule above does not depend on it).
    if steps > 0 {
        v.extend(["--steps".to_string(), steps.to_string()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cluster(job: &str, data: &Path, steps: u64, extra: &[&str]) -> LocalCluster {
    cluster_with_tls(job, data, steps, extra, false)
}

/// As [`cluster`]; with `tls` the daemons run mutual TLS with the cluster's throwaway CA
/// (`--insecure` otherwise).
fn cluster_with_tls(job: &str, data: &Path, steps: u64, extra: &[&str], tls: bool) -> LocalCluster {
    let mut daemon_args = daemon_train_flags(data, steps, extra);
    daemon_args.extend(
        ["--settle-ms", "300", "--lease-ttl-s", "3"]
            .iter()
            .map(|s| s.to_string()),
    );
    cluster_with_args(job, daemon_args, tls)
}

/// A local cluster (etcd, S3, the tenax binary) whose daemons take `daemon_args`, one
/// candle thread each; mutual TLS with `tls` (only in the tests that ask for it).
fn cluster_with_args(job: &str, daemon_args: Vec<String>, tls: bool) -> LocalCluster {
    LocalCluster::start(ClusterSpec {
        tenax_bin: PathBuf::from(env!("CARGO_BIN_EXE_tenax")),
        job: job.to_string(),
        bucket: format!("{job}-bucket"),
        daemon_args,
        env: vec![("CANDLE_NUM_THREADS".into(), "1".into())],
        tls,
    })
    .expect("start etcd and the S3 server (scripts/setup installs them)")
}

/// The final weights of `tenax train --ranks 3` with the daemon tests' flags.
fn reference_export(data: &Path, dir: &Path, steps: u64) -> Vec<u8> {
    let run = dir.join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(daemon_train_flags(data, steps, &[]));
    args.extend(["--ranks", "3", "--run-dir", run.to_str().unwrap()].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let store = format!("file://{}", run.join("checkpoints").display());
    export_bytes(&store, &[], &dir.join("reference.safetensors"))
}

/// Waits for every daemon to exit; asserts each exited 0, printing its log otherwise.
fn wait_all_ok(c: &mut LocalCluster, nodes: &[usize], timeout: Duration) {
    for &n in nodes {
        let status = c.wait(n, timeout).unwrap();
        match status {
            Some(s) if s.success() => {}
            other => panic!("node {n} ended with {other:?}; log:\n{}", c.log(n)),
        }
    }
}

/// `(step, param_hash)` of every step a node recorded. A running node may be writing its
/// last line: a line without its newline yet is not read.
fn node_hashes(c: &LocalCluster, node: usize) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(c.run_dir(node).join("metrics.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| {
            (
                m["step"].as_u64().unwrap(),
                m["param_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn status_json(c: &LocalCluster, job: &str) -> Option<serde_json::Value> {
    let etcd = c.etcd_endpoint();
    let mut args = vec!["status", "--etcd", &etcd, "--job", job, "--json"];
    // A cluster with mutual TLS answers the operator's certificate.
    let tls = c.operator_tls_args();
    args.extend(tls.iter().map(String::as_str));
    let out = tenax(&args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `tenax status --json` until `pred` holds (bounded); returns the last status.
fn wait_status(
    c: &LocalCluster,
    job: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(s) = status_json(c, job) {
            if pred(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; logs:\n{}\n{}\n{}",
            c.log(0),
            c.log(1),
            c.log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job_export(c: &LocalCluster, job: &str, out: &Path) -> Vec<u8> {
    let store = format!("{}/{job}", c.store_url());
    export_bytes(&store, &c.s3_env(), out)
}

/// Three daemons over mutual TLS (certificates of the cluster's throwaway CA) train the
/// bits of `tenax train --ranks 3`.
#[test]
fn three_daemons_train_bit_identically_to_train_ranks_3() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 8;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "three";
    let mut c = cluster_with_tls(job, &data, steps, &["--ckpt-every", "4"], true);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let h0 = node_hashes(&c, 0);
    assert_eq!(
        h0.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "node 0 recorded every step once"
    );
    for n in 1..3 {
        assert_eq!(
            node_hashes(&c, n),
            h0,
            "node {n} agrees with node 0 at every step"
        );
    }
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "the job's final weights differ from tenax train --ranks 3"
    );
    assert_eq!(committed_steps(&c, job), [4, 8]);
}

/// The value of an unlabelled-by-us counter or gauge `name` in a /metrics body (the
/// first sample of that name).
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("/metrics lacks {name}:\n{body}"))
}

/// A gRPC channel to `addr` over TLS trusting `ca`, presenting `identity` (cert, key) if
/// any, and checking that the server's certificate names node `node`.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    node: &str,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &Path| std::fs::read(p).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .domain_name(tenax_cluster::tls::node_dns_name(node).unwrap());
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// What each of Exchange, FetchState and Control.Drain answers a client: `Ok(())` or the
/// gRPC code (or the connect error) of the refusal.
async fn three_calls(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    job: &str,
    claimed: &str,
) -> [Result<(), String>; 3] {
    use tenax_proto::v1::{
        control_client::ControlClient, peer_client::PeerClient, DrainRequest, PeerFrame,
        StateRequest,
    };
    let code = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut out: [Result<(), String>; 3] = [Ok(()), Ok(()), Ok(())];
    for (k, slot) in out.iter_mut().enumerate() {
        let channel = match tls_channel(addr, ca, identity, "node-0").await {
            Ok(c) => c,
            Err(e) => {
                *slot = Err(format!("connect: {e}"));
                continue;
            }
        };
        *slot = match k {
            0 => {
                let frame = PeerFrame {
                    job: job.to_string(),
                    generation: 1,
                    from_member: claimed.to_string(),
                    kind: 1,
                    ..Default::default()
                };
                PeerClient::new(channel)
                    .exchange(tokio_stream::iter(vec![frame]))
                    .await
                    .map(|_| ())
                    .map_err(code)
            }
            1 => PeerClient::new(channel)
                .fetch_state(StateRequest {
                    job: job.to_string(),
                    generation: 1,
                    from_member: claimed.to_string(),
                    wait_ms: 10,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(code),
            _ => ControlClient::new(channel)
                .drain(DrainRequest { checkpoint: false })
                .await
                .map(|_| ())
                .map_err(code),
        };
    }
    out
}

/// Mutual TLS on real daemons: a client without a certificate, with one of another CA,
/// and node 1's certificate claiming to be node 2 are each refused on Exchange,
/// FetchState and Control; a node certificate cannot drain a peer. Node 1's certificate
/// then floods node 0 with 100,000 frames of future generations: when node 1 is killed,
/// node 0 still re-forms and trains on. An operator certificate drains it.
#[test]
fn mutual_tls_refuses_strangers_and_impostors_and_operators_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let job = "mtls";
    // Sized so that the job cannot end during the test: an operator drain ends it.
    let mut c = cluster_with_tls(job, &data, 1_000_000, &["--ckpt-every", "0"], true);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 1", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(1)
    });
    let generation = s["generation"].as_u64().unwrap();
    let tls = c.tls_dir().unwrap();
    let ca = tls.join("ca.pem");
    let addr = c.listen_addr(0).unwrap();
    let node1 = (tls.join("node-node-1.pem"), tls.join("node-node-1-key.pem"));
    let other_ca = tmp.path().join("other-ca");
    let other_ca_s = other_ca.to_str().unwrap();
    ok(&["certs", "init", "--out", other_ca_s]);
    ok(&["certs", "issue", "--ca", other_ca_s, "--node", "node-1"]);
    let stranger = (
        other_ca.join("node-node-1.pem"),
        other_ca.join("node-node-1-key.pem"),
    );
    let metrics_addr = c.metrics_addr(0).unwrap();
    let before = scrape(&metrics_addr);
    let refused = |r: &Result<(), String>| r.is_err();
    block_on(async {
        // No client certificate, and one of another CA: the handshake is refused.
        for (who, identity) in [
            ("no certificate", None),
            (
                "another CA's certificate",
                Some((&*stranger.0, &*stranger.1)),
            ),
        ] {
            let got = three_calls(&addr, &ca, identity, job, "node-1").await;
            assert!(got.iter().all(refused), "{who}: {got:?}");
        }
        // Node 1's certificate claiming to be node 2: PERMISSION_DENIED on the peer plane;
        // and a node's certificate cannot drain a peer.
        let got = three_calls(&addr, &ca, Some((&node1.0, &node1.1)), job, "node-2").await;
        for r in &got {
            assert!(
                r.as_ref().is_err_and(|e| e.starts_with("PermissionDenied")),
                "node-1 as node-2: {got:?}"
            );
        }
        // The server's identity is checked too: node 0's address does not pass for node 1.
        assert!(
            tls_channel(&addr, &ca, Some((&node1.0, &node1.1)), "node-1")
                .await
                .is_err(),
            "a client expecting node-1 accepted node-0's certificate"
        );
        // A peer with a valid node certificate floods future generations.
        use tenax_proto::v1::{peer_client::PeerClient, PeerFrame};
        let channel = tls_channel(&addr, &ca, Some((&node1.0, &node1.1)), "node-0")
            .await
            .unwrap();
        let frames = (0..100_000u64).map(move |i| PeerFrame {
            job: job.to_string(),
            generation: generation + 1 + i % 50,
            from_member: "node-1".to_string(),
            step: i,
            kind: 1,
            data: vec![0u8; 64],
            ..Default::default()
        });
        let reply = PeerClient::new(channel)
            .exchange(tokio_stream::iter(frames))
            .await
            .expect("the flood's stream is served")
            .into_inner();
        assert_eq!(
            reply.accepted + reply.refused_stale + reply.refused_other,
            100_000,
            "{reply:?}"
        );
    });
    let after = scrape(&metrics_addr);
    let grew = |name: &str| metric(&after, name) - metric(&before, name);
    assert!(grew("tenax_tls_handshakes_refused_total") >= 2.0, "{after}");
    assert!(grew("tenax_peer_identity_refused_total") >= 2.0, "{after}");
    assert!(grew("tenax_control_refused_total") >= 1.0, "{after}");
    assert_eq!(metric(&after, "tenax_tls_enabled"), 1.0);
    // The next re-formation still happens: node 1 dies, nodes 0 and 2 go on.
    c.signal(1, Signal::Kill).unwrap();
    let s = wait_status(&c, job, "a generation without node-1 that trains", |s| {
        s["generation"].as_u64() > Some(generation)
            && s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .filter(|m| m["error"].is_null())
                    .all(|m| m["id"] != "node-1")
            })
            && s["step"].as_u64() > Some(1)
    });
    let reformed = s["step"].as_u64().unwrap();
    wait_status(&c, job, "training after the re-formation", |s| {
        s["step"].as_u64() > Some(reformed)
    });
    // A renewed certificate is taken on SIGHUP (new connections use it).
    let tls_s = tls.to_str().unwrap();
    std::fs::remove_file(tls.join("node-node-0.pem")).unwrap();
    std::fs::remove_file(tls.join("node-node-0-key.pem")).unwrap();
    ok(&[
        "certs", "issue", "--ca", tls_s, "--node", "node-0", "--days", "3",
    ]);
    let pid = c.pid(0).unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&scrape(&metrics_addr), "tenax_tls_reloads_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            c.log_tail(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An operator's certificate drains them.
    let etcd = c.etcd_endpoint();
    let op = c.operator_tls_args();
    for n in [0usize, 2] {
        let id = format!("node-{n}");
        let mut args = vec![
            "control", "drain", "--etcd", &etcd, "--job", job, "--node", &id,
        ];
        args.extend(op.iter().map(String::as_str));
        let out = tenax(&args);
        assert!(
            out.status.success(),
            "drain {id}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log_tail(n)
        );
    }
    wait_all_ok(&mut c, &[0, 2], Duration::from_secs(120));
}

/// The committed checkpoints (steps) under a job's store.
fn committed_steps(c: &LocalCluster, job: &str) -> Vec<u64> {
    let listing = ok_env(
        &[
            "ckpt",
            "list",
            &format!("{}/{job}", c.store_url()),
            "--json",
        ],
        &c.s3_env(),
    );
    let attempts: Vec<serde_json::Value> = serde_json::from_str(&listing).unwrap();
    attempts
        .iter()
        .filter(|a| a["status"] == "committed")
        .map(|a| a["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn daemons_keep_the_last_checkpoints_they_are_told_to() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // 50 saves: a save still uploading when the next is due is superseded, so fewer commit.
    let (steps, every, keep) = (150u64, 3u64, 3usize);
    let job = "keep";
    let mut c = cluster(
        job,
        &data,
        steps,
        &[
            "--ckpt-every",
            &every.to_string(),
            "--keep-last",
            &keep.to_string(),
        ],
    );
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    // While the job runs, the store never holds more than `keep` committed checkpoints
    // plus the one just committed whose prune is in flight.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut samples, mut most) = (0, 0);
    while c.wait(0, Duration::from_millis(100)).unwrap().is_none() {
        assert!(Instant::now() < deadline, "the job did not end in time");
        let committed = committed_steps(&c, job);
        samples += 1;
        most = most.max(committed.len());
        assert!(
            committed.len() <= keep + 1,
            "{} committed checkpoints while running: {committed:?}",
            committed.len()
        );
    }
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));
    let log = c.log(0) + &c.log(1);
    // Every commit the committer recorded, in order (superseded saves never commit).
    let mut recorded: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("checkpoint of step ").nth(1))
        .filter_map(|rest| {
            rest.strip_suffix(" committed")
                .or(rest.split(" committed;").next())
        })
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    recorded.sort_unstable();
    recorded.dedup();
    let commits = recorded.len();
    let finals = committed_steps(&c, job);
    assert_eq!(
        recorded.last(),
        Some(&steps),
        "the final checkpoint committed"
    );
    assert_eq!(
        finals,
        recorded[commits.saturating_sub(keep)..],
        "the newest {keep} committed checkpoints are kept, the rest pruned"
    );
    eprintln!("{samples} listings while running, at most {most} committed; {commits} commit lines");
    assert!(samples > 0, "the store was listed while the job ran");
    // More commits than kept: at least one was pruned. (How many of the 50 saves commit
    // depends on the machine's speed: a slow upload is superseded by the next save.)
    assert!(
        commits > keep,
        "only {commits} checkpoints committed: nothing was pruned"
    );
}

/// Start nodes 0, 1 and 2 of a 3-node job, node 2 with the chaos hook `var=value`.
fn start_three_with_hook_on_2(c: &mut LocalCluster, var: &str, value: &str) {
    let start = ["--start-nodes".to_string(), "3".into()];
    c.spawn_daemon(0, &start).unwrap();
    c.spawn_daemon(1, &start).unwrap();
    c.spawn_daemon_env(2, &start, &[(var.into(), value.into())])
        .unwrap();
}

/// The logs of nodes `0..n`, each under its name, for assertion messages.
fn every_log(c: &LocalCluster, n: usize) -> String {
    (0..n)
        .map(|i| format!("--- log of node {i} ---\n{}", c.log(i)))
        .collect()
}

/// The save attempts of a job as `ckpt list --json` rows.
fn listed_rows(c: &LocalCluster, job: &str) -> Vec<serde_json::Value> {
    let listing = ok_env(
        &[
            "ckpt",
            "list",
            &format!("{}/{job}", c.store_url()),
            "--json",
        ],
        &c.s3_env(),
    );
    serde_json::from_str(&listing).unwrap()
}

#[test]
fn every_replica_writes_its_share_and_a_writer_killed_mid_save_leaves_no_torn_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that saves follow the committer's wait for the dead writer's share.
    let steps = 600;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "shares";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "10"]);
    // Node 2 (a writer, not the committer) SIGKILLs itself in its first save at or after
    // step 30, after its shard is uploaded and before its receipt.
    start_three_with_hook_on_2(&mut c, "TENAX_CHAOS_KILL_IN_SHARE_AT_STEP", "30");
    let status = c.wait(2, Duration::from_secs(300)).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{}", every_log(&c, 3));
    let log2 = c.log(2);
    let killed_at: u64 = log2
        .split("in the middle of the save of step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("node 2 did not die in a save:\n{log2}"));
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));
    let listed = listed_rows(&c, job);
    assert!(
        listed.iter().all(|r| r["status"] != "corrupt"),
        "a torn checkpoint: {listed:?}"
    );
    let rows: Vec<&serde_json::Value> = listed
        .iter()
        .filter(|r| r["status"] == "committed")
        .collect();
    let steps_committed: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    // Replicas write their shares: a checkpoint before the kill lists all three nodes,
    // one after it both survivors. (Not every one: a writer slower than the committer's
    // wait, as on a loaded machine, has its share written by the committer instead.)
    let writers = |r: &serde_json::Value| r["writers"].as_array().unwrap().clone();
    assert!(
        rows.iter().any(|r| writers(r).len() == 3),
        "no checkpoint lists all three nodes: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["step"].as_u64() > Some(killed_at)
            && writers(r) == [serde_json::json!("node-0"), serde_json::json!("node-1")]),
        "no checkpoint after the kill lists both survivors: {rows:?}"
    );
    // The save node 2 died in committed whole: the committer wrote its share instead.
    // Unless the committer never wrote that save: on a loaded machine its previous save
    // can still be uploading when a newer one comes due, and the newer replaces the one
    // waiting (the policy of the Checkpoint actor); node 2 dies in a save nobody commits.
    let superseded = format!("checkpoint at step {killed_at} skipped, step");
    match rows.iter().find(|r| r["step"].as_u64() == Some(killed_at)) {
        Some(torn) => {
            let files = torn["files"].as_array().unwrap();
            assert!(
                files.iter().any(|f| f["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("shard-00002.by-"))),
                "the dead writer's share was not written by the committer: {torn}"
            );
            assert!(
                c.log(0).contains("written here (not reported in time)"),
                "{}",
                c.log(0)
            );
        }
        None if c.log(0).contains(&superseded) => {
            println!("the committer skipped the save of step {killed_at} for a newer one: no takeover to check");
        }
        None => panic!(
            "step {killed_at} is not committed: {steps_committed:?}\nlisted: {listed:?}\n{}",
            every_log(&c, 3)
        ),
    }
    // The final save commits.
    let last = rows.last().unwrap();
    assert_eq!(last["step"].as_u64(), Some(steps), "{steps_committed:?}");
    // Every committed checkpoint verifies; the job's weights equal the fault-free run's.
    let store = format!("{}/{job}", c.store_url());
    ok_env(&["ckpt", "verify", &store], &c.s3_env());
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "the job's final weights differ from the reference"
    );
}

#[test]
fn drain_and_sigterm_shrink_the_group_without_losing_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Node 0 is frozen (SIGSTOP) while the others are told to leave, so that the group
    // cannot run to the end in between: each leave lands at a known point mid-run.
    let steps = 600;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "shrink";
    let mut c = cluster(job, &data, steps, &[]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 1", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(1)
    });
    c.signal(0, Signal::Stop).unwrap();
    for key in [
        "generation",
        "step",
        "loss",
        "tokens_per_s",
        "last_checkpoint",
        "members",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    for m in s["members"].as_array().unwrap() {
        for key in ["id", "addr", "rank", "step", "param_hash"] {
            assert!(m.get(key).is_some(), "member lacks {key}: {m}");
        }
        assert!(m["error"].is_null(), "{m}");
    }
    // Drain node 2 through the control API; it leaves at its next step boundary.
    ok(&[
        "control",
        "drain",
        "--etcd",
        &c.etcd_endpoint(),
        "--job",
        job,
        "--node",
        "node-2",
    ]);
    c.signal(0, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[2], Duration::from_secs(120));
    // The pair re-forms (it takes at least the settle window): freeze node 0 again.
    c.signal(0, Signal::Stop).unwrap();
    let drained_at = node_hashes(&c, 2).last().map_or(0, |(s, _)| *s);
    assert!(drained_at < steps, "node 2 left at {drained_at}");
    // Preempt node 1: SIGTERM drains it with a final checkpoint.
    c.signal(1, Signal::Term).unwrap();
    c.signal(0, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[1], Duration::from_secs(120));
    assert!(c.log(1).contains("SIGTERM"), "{}", c.log(1));
    let term_at = node_hashes(&c, 1).last().map_or(0, |(s, _)| *s);
    assert!(term_at < steps, "node 1 left at {term_at}");
    assert!(
        c.log(1)
            .contains(&format!("checkpoint of step {term_at} committed")),
        "SIGTERM saves a final checkpoint:\n{}",
        c.log(1)
    );
    wait_all_ok(&mut c, &[0], Duration::from_secs(300));

    // No step lost or repeated on the survivor, and every member agreed at every step.
    let h0 = node_hashes(&c, 0);
    assert_eq!(
        h0.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    for n in [1, 2] {
        for (step, hash) in node_hashes(&c, n) {
            assert_eq!(h0[step as usize - 1].1, hash, "node {n} at step {step}");
        }
    }
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "shrinking 3 -> 2 -> 1 changed the final weights"
    );
}

#[test]
fn a_whole_job_restart_resumes_at_the_last_committed_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let job = "restart";
    let mut c = cluster(job, &data, 0, &["--ckpt-every", "10"]);
    // The first run could never finish: the kill always lands mid-run. (--steps is not
    // part of the math: the schedule is fixed by --lr-decay-steps and --warmup-steps.)
    let with_steps = |steps: u64| {
        vec![
            "--start-nodes".to_string(),
            "3".into(),
            "--steps".into(),
            steps.to_string(),
        ]
    };
    for n in 0..3 {
        c.spawn_daemon(n, &with_steps(1_000_000)).unwrap();
    }
    let s = wait_status(&c, job, "a committed checkpoint", |s| {
        s["last_checkpoint"]["step"].as_u64() >= Some(10)
    });
    c.kill_all();
    let committed = s["last_checkpoint"]["step"].as_u64().unwrap();
    let steps = committed + 200;
    let want = reference_export(&data, tmp.path(), steps);
    for n in 0..3 {
        c.spawn_daemon(n, &with_steps(steps)).unwrap();
    }
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    // Some node loads the committed checkpoint; which one depends on timing: a node that
    // restarts before the killed run's leases expire sees a live group and copies the
    // state from a peer instead (or loads it later, when no member holds any).
    let logs: Vec<String> = (0..3).map(|n| c.log(n)).collect();
    let resumed: u64 = logs
        .iter()
        .flat_map(|log| log.lines())
        .find_map(|l| {
            l.strip_prefix("resuming from the committed checkpoint of step ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no node resumed:\n{}", logs.join("\n")));
    assert!(
        resumed >= committed && resumed < steps,
        "resumed at {resumed}"
    );
    assert_eq!(resumed % 10, 0);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "the restarted job's final weights differ");
    // The second run's metrics start right after the resumed step.
    let h0 = node_hashes(&c, 0);
    assert_eq!(h0.last().map(|(s, _)| *s), Some(steps));
}

#[test]
fn a_daemon_with_another_training_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let job = "mismatch";
    let mut c = cluster(job, &data, 10, &[]);
    c.spawn_daemon(0, &["--start-nodes".into(), "2".into()])
        .unwrap();
    // Node 0 fixes the job's config: wait until it has joined.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.log(0).contains("waiting for 2") {
        assert!(
            Instant::now() < deadline,
            "node 0 did not join:\n{}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `tenax control --all` reaches every registered member (here the one).
    let etcd = c.etcd_endpoint();
    for (verb, word) in [("pause", "pauses"), ("resume", "goes on")] {
        let out = ok(&["control", verb, "--all", "--etcd", &etcd, "--job", job]);
        assert!(out.contains("node-0") && out.contains(word), "{out}");
    }
    c.spawn_daemon(
        1,
        &[
            "--start-nodes".into(),
            "2".into(),
            "--weight-decay".into(),
            "0.05".into(),
        ],
    )
    .unwrap();
    let status = c.wait(1, Duration::from_secs(120)).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "node 1 must be refused:\n{}",
        c.log(1)
    );
    let log = c.log(1);
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("training config differs") && errors[0].contains("weight_decay"),
        "{}",
        errors[0]
    );
    // The training guard decides on every member alike: a node with other guard settings
    // (a rollback streak included) is refused by name.
    let refusal = |c: &mut LocalCluster, n: usize, args: &[&str]| -> String {
        let mut v: Vec<String> = vec!["--start-nodes".into(), "2".into()];
        v.extend(args.iter().map(|s| s.to_string()));
        c.spawn_daemon(n, &v).unwrap();
        let status = c.wait(n, Duration::from_secs(120)).unwrap();
        assert!(status.is_some_and(|s| !s.success()), "{}", c.log(n));
        let log = c.log(n);
        let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{log}");
        errors[0].to_string()
    };
    let e = refusal(&mut c, 2, &["--guard-sigma", "6"]);
    assert!(
        e.contains("training config differs") && e.contains("guard: job has"),
        "{e}"
    );
    let e = refusal(
        &mut c,
        3,
        &["--guard-sigma", "6", "--guard-rollback-after", "3"],
    );
    assert!(
        e.contains("training config differs") && e.contains("guard"),
        "{e}"
    );
    c.kill_all();
}

/// One step as a node's step log (metrics.jsonl) records it.
#[derive(Debug, Clone)]
struct StepLine {
    node: usize,
    step: u64,
    /// When it was logged (Unix ms).
    t_ms: u64,
    generation: u64,
    cursor: u64,
    slots: Vec<u64>,
    param_hash: String,
}

fn step_lines(c: &LocalCluster, nodes: &[usize]) -> Vec<StepLine> {
    let mut out = Vec::new();
    for &node in nodes {
        let text =
            std::fs::read_to_string(c.run_dir(node).join("metrics.jsonl")).unwrap_or_default();
        for l in text.lines() {
            let m: serde_json::Value = serde_json::from_str(l).unwrap();
            out.push(StepLine {
                node,
                step: m["step"].as_u64().unwrap(),
                t_ms: m["t_ms"].as_u64().unwrap(),
                generation: m["generation"].as_u64().unwrap(),
                cursor: m["cursor"].as_u64().unwrap(),
                slots: m["slots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect(),
                param_hash: m["param_hash"].as_str().unwrap().to_string(),
            });
        }
    }
    out
}

/// The step-log lines a member killed with `kill -9` may not have written.
const LINES_LOST_PER_FAULT: u64 = tenax_core::node::STEP_LINES_LOST_PER_KILL;

/// The daemon tests' batch: 12 samples per step in 6 slots of 2.
const BATCH: u64 = 12;
const SLOTS: u64 = 6;

/// The step logs of `nodes` against the promise "no sample lost, none used twice": every
/// step 1..=steps was applied by the surviving lineage (the newest generation that logged
/// it) at the cursor its position implies, with every member agreeing on the result and
/// no slot computed twice; the slots of a step are incomplete in the log only among the
/// last [`LINES_LOST_PER_FAULT`] steps of its generation (a member killed before its lines
/// were written, or that copied the step's result instead of finishing it), for at most
/// that many steps per fault; and at most `faults` steps were applied by a lineage that
/// died (steps lost). Returns the number of steps lost.
fn assert_every_slot_once(c: &LocalCluster, nodes: &[usize], steps: u64, faults: usize) -> usize {
    let lines = step_lines(c, nodes);
    let newest_of = |step: u64| {
        lines
            .iter()
            .filter(|l| l.step == step)
            .map(|l| l.generation)
            .max()
    };
    let mut incomplete = Vec::new();
    let mut redone = Vec::new();
    for step in 1..=steps {
        let of_step: Vec<&StepLine> = lines.iter().filter(|l| l.step == step).collect();
        let newest = of_step
            .iter()
            .map(|l| l.generation)
            .max()
            .unwrap_or_else(|| panic!("no node logged step {step}"));
        if of_step.iter().any(|l| l.generation != newest) {
            redone.push(step);
        }
        let lineage: Vec<&&StepLine> = of_step.iter().filter(|l| l.generation == newest).collect();
        let mut seen = vec![0u32; SLOTS as usize];
        let mut nodes_seen = Vec::new();
        for l in &lineage {
            assert_eq!(
                l.cursor,
                (step - 1) * BATCH,
                "step {step} on node {}",
                l.node
            );
            assert_eq!(
                l.param_hash, lineage[0].param_hash,
                "step {step}: members disagree"
            );
            if nodes_seen.contains(&l.node) {
                panic!(
                    "node {} logged step {step} twice in generation {newest}",
                    l.node
                );
            }
            nodes_seen.push(l.node);
            for &s in &l.slots {
                seen[s as usize] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n <= 1),
            "step {step}: a slot computed twice: {seen:?}"
        );
        if seen.contains(&0) {
            let generation_ends = (step + 1..=step + LINES_LOST_PER_FAULT)
                .any(|later| newest_of(later).is_some_and(|g| g > newest));
            assert!(
                generation_ends,
                "step {step}: slots not logged in the middle of generation {newest}: {seen:?}"
            );
            incomplete.push(step);
        }
    }
    assert!(
        incomplete.len() as u64 <= faults as u64 * LINES_LOST_PER_FAULT,
        "steps whose slots are not all logged: {incomplete:?}"
    );
    assert!(
        redone.len() <= faults,
        "steps applied by a lineage that died: {redone:?}"
    );
    redone.len()
}

/// Seconds from `since_ms` (Unix) to the first step any node logged in a generation
/// newer than `generation` (printed, never asserted: the machine may be loaded).
fn first_step_after(c: &LocalCluster, generation: u64, since_ms: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let first = first_logged_after(c, generation);
        if first < u64::MAX || Instant::now() > deadline {
            return first.saturating_sub(since_ms) as f64 / 1000.0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn first_logged_after(c: &LocalCluster, generation: u64) -> u64 {
    let mut first = u64::MAX;
    for n in 0..3 {
        let text = std::fs::read_to_string(c.run_dir(n).join("metrics.jsonl")).unwrap_or_default();
        // A line being written may be read torn: skip what does not parse.
        for m in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if m["generation"].as_u64() > Some(generation) {
                first = first.min(m["t_ms"].as_u64().unwrap());
            }
        }
    }
    first
}

/// The node the job's status calls leader, and one that is not.
fn leader_and_follower(c: &LocalCluster, job: &str) -> (usize, usize) {
    // A leader and another member, both answering (a member still joining may be
    // missing from the status for a moment).
    let s = wait_status(c, job, "a leader and a follower", |s| {
        s["members"].as_array().is_some_and(|m| {
            m.iter().any(|m| m["leader"] == true)
                && m.iter().filter(|m| m["error"].is_null()).count() >= 2
        })
    });
    let members = s["members"].as_array().unwrap();
    let node_of = |m: &serde_json::Value| -> usize {
        m["id"]
            .as_str()
            .unwrap()
            .trim_start_matches("node-")
            .parse()
            .unwrap()
    };
    let leader = members
        .iter()
        .find(|m| m["leader"] == true)
        .map(node_of)
        .unwrap();
    let follower = members.iter().map(node_of).find(|&n| n != leader).unwrap();
    (leader, follower)
}

#[test]
fn a_killed_member_is_evicted_and_rejoins_with_state_from_a_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that the pair cannot finish the job while the killed node restarts on a
    // loaded machine (with 800 steps it once did in CI: the restarted node found the job
    // done and its last step-log line was from before the kill).
    let steps = 4000;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "kill";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "500"]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(5)
    });
    let (leader, _) = leader_and_follower(&c, job);
    let victim = (0..3).rev().find(|&n| n != leader).unwrap();
    let generation = s["generation"].as_u64().unwrap();
    let killed = tenax_storage::now_unix_ms();
    c.signal(victim, Signal::Kill).unwrap();
    wait_status(&c, job, "the pair in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2)
            && s["generation"].as_u64() > Some(generation)
    });
    println!(
        "kill -9 of node-{victim} -> the survivors' first step in a new generation: {:.2} s",
        first_step_after(&c, generation, killed)
    );
    // The killed node restarts (as systemd would). The leader is frozen while it comes up
    // (well under the lease), so that the pair cannot finish the job first.
    let _ = c.wait(victim, Duration::from_secs(10));
    c.signal(leader, Signal::Stop).unwrap();
    c.spawn_daemon(victim, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c.log(victim).contains("gRPC on") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(leader, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let log = c.log(victim);
    assert!(
        log.contains("copied the state of step"),
        "the restarted node copies the state from a peer:\n{log}"
    );
    // ... and never reads the checkpoints in the store.
    let restarted = log.rsplit("start 2 ---").next().unwrap();
    assert!(
        restarted.contains("instead of loading a checkpoint")
            && !restarted.contains("resuming from"),
        "{restarted}"
    );
    let lost = assert_every_slot_once(&c, &[0, 1, 2], steps, 1);
    println!("steps lost to the kill: {lost}");
    let last: Vec<String> = (0..3)
        .map(|n| node_hashes(&c, n).last().unwrap().1.clone())
        .collect();
    assert!(last.iter().all(|h| *h == last[0]), "{last:?}");
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "a kill and a rejoin changed the final weights");
}

/// The body of `GET /metrics` from `addr` (plain HTTP/1.1 on loopback).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The body of a 200 answer to `GET /metrics` from `addr` (the status line and headers
/// checked and cut off); `None` while nothing listens there yet.
fn metrics_body(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {answer}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    Some(body.to_string())
}

/// `promtool check metrics` on a /metrics body: its complaints, empty when clean.
fn promtool_check(body: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): run scripts/setup, which installs it \
             (Debian's prometheus package)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() {
        true => said,
        false => format!("promtool exited with {}: {said}", out.status),
    }
}

/// Three live daemons' /metrics pass `promtool check metrics` (Prometheus's lint:
/// counters end in `_total`, base units, histograms well formed), with every histogram
/// observed at least once: steps, checkpoint saves and commits, and the state copy of a
/// node that joins the running job.
#[test]
fn metrics_pass_promtool_check_metrics() {
    // The lint itself works here, and catches the names this test exists for.
    let old = "# HELP tenax_checkpoint_save_seconds_sum Total.\n\
               # TYPE tenax_checkpoint_save_seconds_sum counter\n\
               tenax_checkpoint_save_seconds_sum 1\n";
    assert!(
        promtool_check(old).contains("_total"),
        "promtool does not flag a counter without _total"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let job = "promtool";
    // Far more steps than the test waits for: the job runs until the cluster is dropped.
    let mut c = cluster(job, &data, 20000, &["--ckpt-every", "50"]);
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    wait_status(&c, job, "2 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2) && s["step"].as_u64() >= Some(5)
    });
    // A third node joins the running job: it copies the state from a peer.
    c.spawn_daemon(2, &[]).unwrap();
    let addrs: Vec<String> = (0..3).map(|n| c.metrics_addr(n).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    let bodies = loop {
        let bodies: Vec<String> = addrs.iter().filter_map(|a| metrics_body(a)).collect();
        let total = |name: &str| bodies.iter().map(|b| metric(b, name)).sum::<f64>();
        if bodies.len() == 3
            && total("tenax_state_copy_seconds_count") >= 1.0
            && total("tenax_checkpoint_commit_seconds_count") >= 1.0
            && total("tenax_checkpoint_save_seconds_count") >= 1.0
            && bodies
                .iter()
                .all(|b| metric(b, "tenax_step_seconds_count") >= 1.0)
        {
            break bodies;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every histogram to be observed; /metrics:\n{}\nlogs:\n{}\n{}\n{}",
            bodies.join("\n"),
            c.log_tail(0),
            c.log_tail(1),
            c.log_tail(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for (n, body) in bodies.iter().enumerate() {
        let lint = promtool_check(body);
        assert!(
            lint.trim().is_empty(),
            "promtool check metrics on node {n}'s /metrics:\n{lint}\n{body}"
        );
        for want in [
            "# TYPE tenax_step_seconds histogram",
            "tenax_step_seconds_bucket{tenax_job=\"promtool\",node=",
            "le=\"+Inf\"} ",
        ] {
            assert!(
                body.contains(want),
                "node {n}'s /metrics lacks {want}:\n{body}"
            );
        }
    }
}

/// Two daemons, each running its rank as a pipeline of 2 stages (data parallel across
/// the nodes, the stages of a pipeline inside one). One is killed: the survivor, which
/// holds a twin of every stage, goes on alone; the killed node restarts and copies the
/// state from it. The job ends with the bits of `tenax train --ranks 3`.
#[test]
fn pipelined_daemons_survive_a_kill_with_the_bits_of_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Sized so that the pair and the survivor alone each run for seconds (a step of
    // this model takes a few milliseconds).
    let steps = 3000;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "pipes";
    let flags = [
        "--ckpt-every",
        "1000",
        "--pipeline-stages",
        "2",
        "--schedule",
        "gpipe",
    ];
    let mut c = cluster(job, &data, steps, &flags);
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "2 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2) && s["step"].as_u64() >= Some(5)
    });
    for m in s["members"].as_array().unwrap() {
        assert_eq!(
            m["pipeline_stages"], 2,
            "status shows each member's pipeline: {m}"
        );
        assert_eq!(m["pipeline_schedule"], "gpipe", "{m}");
    }
    let metrics = scrape(&c.metrics_addr(0).expect("node 0 serves /metrics"));
    for want in [
        "tenax_pipeline_stages{",
        "tenax_pipeline_stage_bubble_ratio{",
        "tenax_pipeline_stage_busy_seconds_total{",
        "stage=\"1\"",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }
    let (leader, victim) = leader_and_follower(&c, job);
    let generation = s["generation"].as_u64().unwrap();
    c.signal(victim, Signal::Kill).unwrap();
    wait_status(&c, job, "the survivor alone in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 1)
            && s["generation"].as_u64() > Some(generation)
    });
    // The survivor is frozen while the killed node comes back (well under the lease),
    // so that it cannot finish the job first.
    c.signal(leader, Signal::Stop).unwrap();
    let _ = c.wait(victim, Duration::from_secs(10));
    c.spawn_daemon(victim, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c.log(victim).contains("gRPC on") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(leader, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(400));
    let log = c.log(victim);
    let restarted = log.rsplit("start 2 ---").next().unwrap();
    assert!(
        restarted.contains("copied the state of step"),
        "the restarted node copies its stages' state from the twin:\n{log}"
    );
    assert!(c.log(leader).contains("2 stages"), "{}", c.log(leader));
    assert_every_slot_once(&c, &[0, 1], steps, 1);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "pipelined daemons with a kill changed the final weights"
    );
}

#[test]
fn a_kill_in_the_all_gather_leaves_the_survivors_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 200;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "gather";
    let mut c = cluster(job, &data, steps, &[]);
    // Node 2 sends its reduced chunk of step 21 to node 0 only, then exits: node 0
    // completes step 21, node 1 cannot.
    start_three_with_hook_on_2(&mut c, "TENAX_CHAOS_EXIT_IN_ALL_GATHER", "20");
    let status = c.wait(2, Duration::from_secs(120)).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{}", c.log(2));
    assert!(
        c.log(2).contains("leaves the all-gather of step 20"),
        "{}",
        c.log(2)
    );
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));
    let log1 = c.log(1);
    assert!(
        log1.contains("copied the state of step 21 from node-0"),
        "node 1, a step behind, copies node 0's state:\n{log1}"
    );
    assert_every_slot_once(&c, &[0, 1, 2], steps, 1);
    assert_eq!(node_hashes(&c, 0).last(), node_hashes(&c, 1).last());
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "the survivors' final weights differ");
}

#[test]
fn a_member_whose_trainer_panics_leaves_and_rejoins_with_state_from_a_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that the others still train when the node has rejoined.
    let steps = 600;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "panic";
    let mut c = cluster(job, &data, steps, &[]);
    // A rank of node 2 panics in step 21: its trainer is gone, its state with it.
    start_three_with_hook_on_2(&mut c, "TENAX_CHAOS_PANIC_RANK_AT_STEP", "20");
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let log2 = c.log(2);
    assert!(
        log2.contains("its trainer died") && log2.contains("registering again"),
        "node 2 leaves and registers again in the same process:\n{log2}"
    );
    assert!(
        log2.contains("copied the state of step"),
        "node 2 copies the group's state instead of training on its own:\n{log2}"
    );
    assert!(
        !log2.contains("start 2 ---"),
        "node 2 was not restarted: it rejoined by itself"
    );
    assert!(
        log2.contains("child failed; its owner replaces it") && log2.contains("trainer"),
        "the node supervisor saw its trainer fail (counted against its policy):\n{log2}"
    );
    assert_every_slot_once(&c, &[0, 1, 2], steps, 1);
    let last: Vec<String> = (0..3)
        .map(|n| node_hashes(&c, n).last().unwrap().1.clone())
        .collect();
    assert!(last.iter().all(|h| *h == last[0]), "{last:?}");
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "a panicked trainer changed the final weights");
}

#[test]
fn a_panicking_checkpoint_upload_restarts_the_checkpoint_actor_and_training_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 60;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "upload";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "10"]);
    // Every node carries the hook: each replica's Checkpoint actor panics in its share.
    let hook = [(
        "TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP".to_string(),
        "20".to_string(),
    )];
    for n in 0..3 {
        c.spawn_daemon_env(n, &["--start-nodes".into(), "3".into()], &hook)
            .unwrap();
    }
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let logs: String = (0..3).map(|n| c.log(n)).collect();
    assert!(
        logs.contains("the upload panicked") && logs.contains("training goes on"),
        "the committer reports the panicked save and goes on:\n{logs}"
    );
    assert!(
        logs.contains("child failed; restarting it") && logs.contains("checkpoint"),
        "the node supervisor restarts the Checkpoint actor:\n{logs}"
    );
    let committed = committed_steps(&c, job);
    assert!(!committed.contains(&20), "{committed:?}");
    assert!(
        committed.iter().any(|&s| s > 20),
        "a later checkpoint commits: {committed:?}"
    );
    // Training never stopped: one generation, every step recorded once on every node.
    for n in 0..3 {
        let h = node_hashes(&c, n);
        assert_eq!(
            h.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=steps).collect::<Vec<_>>(),
            "node {n}"
        );
    }
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "a panicked upload changed the final weights");
}

#[test]
fn a_stopped_member_is_evicted_by_deadline_and_rejoins_after_sigcont() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that the others still train when the stopped node comes back (it
    // backs off 250 ms before registering again, and a node that finds the job done
    // exits instead of copying).
    let steps = 1500;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "hang";
    let mut c = cluster(job, &data, steps, &["--suspect-after-ms", "500"]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(5)
    });
    let (_, follower) = leader_and_follower(&c, job);
    let generation = s["generation"].as_u64().unwrap();
    let stopped = tenax_storage::now_unix_ms();
    c.signal(follower, Signal::Stop).unwrap();
    // The others' step logs, not `tenax status` (which waits for the stopped node's
    // answer): continue it as soon as they train without it.
    println!(
        "SIGSTOP of node-{follower} -> the others' first step in a new generation: {:.2} s",
        first_step_after(&c, generation, stopped)
    );
    assert!(
        first_logged_after(&c, generation) < u64::MAX,
        "the others did not re-form without node-{follower}"
    );
    c.signal(follower, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    if std::env::var("TENAX_TEST_LOGS").is_ok() {
        for n in 0..3 {
            eprintln!("==== node {n}\n{}", c.log(n));
        }
    }
    let log = c.log(follower);
    assert!(log.contains("registering again"), "{log}");
    assert!(log.contains("copied the state of step"), "{log}");
    assert_every_slot_once(&c, &[0, 1, 2], steps, 1);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "a hang and a rejoin changed the final weights");
}

#[test]
fn a_slow_member_is_probed_not_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that the pair still trains through the 5 s of stops below (a tiny
    // step takes a few ms; at 300 steps the job could end before the first stop).
    let steps = 4000;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "slow";
    // Two nodes: the leader is the only one who can report the other.
    let mut c = cluster(job, &data, steps, &["--suspect-after-ms", "150"]);
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    wait_status(&c, job, "the pair at step 5", |s| {
        s["step"].as_u64() >= Some(5)
    });
    let (leader, slow) = leader_and_follower(&c, job);
    // Duty-cycled SIGSTOP: stopped 400 ms of every 600 ms, 8 times. Each stop makes the
    // leader's step late (a report and a probe), but the probe is answered.
    for _ in 0..8 {
        c.signal(slow, Signal::Stop).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        c.signal(slow, Signal::Cont).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));
    assert!(
        c.log(leader).contains("reporting it as a suspect"),
        "the stops were noticed:\n{}",
        c.log(leader)
    );
    let lines = step_lines(&c, &[0, 1]);
    let first = lines[0].generation;
    assert!(
        lines.iter().all(|l| l.generation == first),
        "the slow node was evicted:\n{}",
        c.log(leader)
    );
    assert_every_slot_once(&c, &[0, 1], steps, 0);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "the final weights differ");
}

#[test]
fn a_member_whose_parameters_differ_is_resynced_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 30;
    let job = "flip";
    let mut c = cluster(job, &data, steps, &["--hash-check-every", "10"]);
    let start = ["--start-nodes".to_string(), "3".into()];
    c.spawn_daemon(0, &start).unwrap();
    c.spawn_daemon_env(
        1,
        &start,
        &[("TENAX_CHAOS_FLIP_PARAM_AT_STEP".into(), "0".into())],
    )
    .unwrap();
    c.spawn_daemon(2, &start).unwrap();
    // Node 1 first: a build without the hooks refuses to start it, and the others would
    // wait for it until the timeout.
    wait_all_ok(&mut c, &[1, 0, 2], Duration::from_secs(300));
    for n in 0..3 {
        assert!(c.log(n).contains("ALARM"), "node {n}:\n{}", c.log(n));
    }
    assert!(
        c.log(1).contains("copied the state of step 10"),
        "{}",
        c.log(1)
    );
    // After the resync every member holds the same parameters at every step.
    let h0 = node_hashes(&c, 0);
    for n in [1, 2] {
        let h = node_hashes(&c, n);
        assert_eq!(&h[10..], &h0[10..], "node {n} after the resync");
    }
}

/// The highest step node `n` logged.
fn last_step(c: &LocalCluster, n: usize) -> u64 {
    node_hashes(c, n).last().map_or(0, |(s, _)| *s)
}

#[test]
fn training_goes_on_while_etcd_is_down_and_the_checkpoint_record_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 800;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "etcd-down";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "50"]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    wait_status(&c, job, "3 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(5)
    });
    // etcd crashes (SIGKILL); training goes on over the peer data plane. Wait (bounded)
    // until a checkpoint was saved during the outage and 20 more steps were done.
    c.etcd().stop().unwrap();
    let down_at = last_step(&c, 0);
    let next_ckpt = (down_at / 50 + 1) * 50;
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_step(&c, 0) < next_ckpt + 20 {
        assert!(
            Instant::now() < deadline && last_step(&c, 0) < steps,
            "no progress without etcd (step {}):\n{}",
            last_step(&c, 0),
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.etcd().restart().unwrap();
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let logs: String = (0..3).map(|n| c.log(n)).collect();
    assert!(
        logs.contains("etcd did not take its record"),
        "a checkpoint saved during the outage waits for etcd:\n{logs}"
    );
    // One generation from start to end: the outage re-formed nothing.
    let lines = step_lines(&c, &[0, 1, 2]);
    assert!(
        lines.iter().all(|l| l.generation == lines[0].generation),
        "{logs}"
    );
    assert_every_slot_once(&c, &[0, 1, 2], steps, 0);
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "the final weights differ");
}

#[test]
fn a_node_started_while_etcd_is_down_waits_for_it_and_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let job = "start-in-outage";
    let mut c = cluster(job, &data, 40, &["--ckpt-every", "20"]);
    c.etcd().stop().unwrap();
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    // etcd is down 4 s: the nodes do not exit, they say they wait.
    for n in 0..2 {
        let exited = c.wait(n, Duration::from_secs(2)).unwrap();
        assert!(
            exited.is_none(),
            "node-{n} exited while etcd was down:\n{}",
            c.log(n)
        );
    }
    for n in 0..2 {
        assert!(
            c.log(n).contains("waiting for etcd"),
            "node-{n} says it waits:\n{}",
            c.log(n)
        );
    }
    c.etcd().restart().unwrap();
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(120));
    for n in 0..2 {
        assert!(c.log(n).contains("etcd answered after"), "{}", c.log(n));
    }
}

/// A new node whose --etcd answers nothing (a typo) gives up after
/// --etcd-start-timeout-s with one error line that names the flag; a node whose run dir
/// holds an earlier life waits --etcd-outage-timeout-s instead (it may be restarting
/// during an outage). Nothing is written to the store either way.
#[test]
fn a_new_node_gives_up_on_an_unreachable_etcd_sooner_than_one_that_ran_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let etcd = format!("http://127.0.0.1:{port}");
    let store = tmp.path().join("store");
    let store_url = format!("file://{}", store.display());
    let start = |run: &Path| -> (String, String) {
        let mut args: Vec<String> = [
            "daemon",
            "--job",
            "typo",
            "--etcd",
            &etcd,
            "--store",
            &store_url,
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--etcd-start-timeout-s",
            "2",
            "--etcd-outage-timeout-s",
            "4",
            "--run-dir",
            run.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(daemon_train_flags(&data, 10, &[]));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tenax(&refs);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        (errors[0].to_string(), stderr)
    };
    let (error, stderr) = start(&tmp.path().join("new"));
    assert!(
        stderr.contains("waiting for etcd (at most 2 s, --etcd-start-timeout-s)"),
        "{stderr}"
    );
    assert!(
        error.contains("a new node") && error.contains("check --etcd"),
        "{error}"
    );
    let before = tmp.path().join("before");
    std::fs::create_dir_all(&before).unwrap();
    std::fs::write(before.join("events.jsonl"), "").unwrap();
    let (error, stderr) = start(&before);
    assert!(
        stderr.contains("waiting for etcd (at most 4 s, --etcd-outage-timeout-s)"),
        "{stderr}"
    );
    assert!(error.contains("this node ran before"), "{error}");
    assert!(!store.exists(), "nothing is written to the store");
}

#[test]
fn a_member_killed_while_etcd_is_down_is_replaced_when_etcd_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 800;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "kill-in-outage";
    let mut c = cluster(job, &data, steps, &["--ckpt-every", "50"]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(5)
    });
    let generation = s["generation"].as_u64().unwrap();
    let (leader, _) = leader_and_follower(&c, job);
    let victim = (0..3).rev().find(|&n| n != leader).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
    // etcd crashes; a few steps go on over the peer plane; then a member is killed.
    c.etcd().stop().unwrap();
    let down_at = last_step(&c, leader);
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_step(&c, leader) < down_at + 5 {
        assert!(
            Instant::now() < deadline,
            "no progress without etcd:\n{}",
            c.log(leader)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(victim, Signal::Kill).unwrap();
    let _ = c.wait(victim, Duration::from_secs(10));
    // etcd stays down 20 s: the survivors wait for it, they do not exit.
    for n in &survivors {
        let exited = c.wait(*n, Duration::from_secs(10)).unwrap();
        assert!(
            exited.is_none(),
            "node-{n} exited while etcd was down:\n{}",
            c.log(*n)
        );
    }
    let waiting_at: Vec<u64> = survivors.iter().map(|&n| last_step(&c, n)).collect();
    let exited = c.wait(survivors[0], Duration::from_secs(10)).unwrap();
    assert!(
        exited.is_none(),
        "node-{} exited while etcd was down",
        survivors[0]
    );
    assert_eq!(
        waiting_at,
        survivors
            .iter()
            .map(|&n| last_step(&c, n))
            .collect::<Vec<_>>(),
        "the survivors stop at a step boundary while they cannot re-form"
    );
    c.etcd().restart().unwrap();
    wait_status(&c, job, "the pair in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2)
            && s["generation"].as_u64() > Some(generation)
    });
    // The killed node restarts (as systemd would) and copies the state from a peer. The
    // leader is frozen while it comes up so that the pair cannot finish the job first.
    c.signal(leader, Signal::Stop).unwrap();
    c.spawn_daemon(victim, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c.log(victim).contains("gRPC on") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(leader, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(300));
    let log = c.log(victim);
    let restarted = log.rsplit("start 2 ---").next().unwrap();
    assert!(
        restarted.contains("copied the state of step"),
        "the restarted node copies the state from a peer:\n{restarted}"
    );
    let logs: String = survivors.iter().map(|&n| c.log(n)).collect();
    assert!(
        logs.contains("waiting for etcd"),
        "the survivors say they wait for etcd:\n{logs}"
    );
    let lost = assert_every_slot_once(&c, &[0, 1, 2], steps, 1);
    println!("steps redone after the kill in the etcd outage: {lost}");
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "a kill during an etcd outage changed the final weights"
    );
}

// ---------------------------------------------------------------------------
// `tenax chaos`: scenario runs against real local clusters.
// ---------------------------------------------------------------------------

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn chaos_smoke_scenario_holds_every_invariant_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smoke");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/chaos/scenarios/smoke.toml");
    let stdout = ok(&[
        "chaos",
        "run",
        scenario,
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(stdout.lines().next(), Some("seed 1"), "{stdout}");
    println!("{stdout}");
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["seed"], 1);
    assert_eq!(report["passed"], true);
    assert!(
        report["faults_injected"]["kill"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(
        report["faults_injected"]["hang"].as_u64() >= Some(1),
        "{report}"
    );
    let invariants = report["invariants"].as_object().unwrap();
    assert_eq!(invariants.len(), 7, "{report}");
    for (name, v) in invariants {
        assert_eq!(v["verdict"], "held", "{name}: {v}");
    }
    for key in ["recovery_s_p50", "recovery_s_p99", "goodput"] {
        assert!(report[key].as_f64().is_some(), "{key} in {report}");
    }
    assert!(report["steps_lost"].as_u64().is_some());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("PASSED"), "{md}");
    let png = std::fs::metadata(out.join("timeline.png")).unwrap();
    assert!(png.len() > 10_000, "timeline.png is {} bytes", png.len());
    // The history holds what the verdicts were drawn from.
    let history = read_json(&out.join("history.json"));
    assert!(
        history["plans"].as_array().unwrap().len() >= 3,
        "a kill and a hang re-form the group"
    );
    assert!(!history["commits"].as_array().unwrap().is_empty());
}

#[test]
fn chaos_sized_by_time_compares_throughput_with_fault_free_reference_runs() {
    // A run sized by time (the harness stops the job after stop_after_s) with one kill,
    // and one fault-free reference run of 4 s: the goodput against it is a ratio of
    // steps per second, and the reference's RSS and fds are reported next to the run's.
    let tmp = tempfile::tempdir().unwrap();
    let scenario = tmp.path().join("timed.toml");
    std::fs::write(
        &scenario,
        "name = \"timed\"\n[cluster]\nnodes = 2\n[train]\nsteps = 100000000\nckpt_every = 500\n\
         args = [\"--lr-decay-steps\", \"100000\", \"--eval-every\", \"0\"]\n\
         [run]\ntimeout_s = 240\nstop_after_s = 10.0\n\
         [invariants]\ncheck = [\"target_step_reached\", \"slots_exactly_once\", \"no_stale_generation\", \"steps_never_go_backwards\"]\n\
         [[faults]]\nkind = \"kill\"\nat_s = 3.0\nnode = \"non-leader\"\nrestart_after_s = 0.5\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let args = [
        "chaos",
        "run",
        scenario.to_str().unwrap(),
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ];
    // --reference-s belongs to runs sized by time; the smoke scenario runs in steps.
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/chaos/scenarios/smoke.toml");
    let err = fails(&[
        "chaos",
        "run",
        smoke,
        "--seed",
        "1",
        "--reference-runs",
        "1",
        "--reference-s",
        "4",
    ]);
    assert!(
        err.contains("--reference-s is for scenarios sized by time"),
        "{err}"
    );
    let stdout = ok(&[&args[..], &["--reference-runs", "1", "--reference-s", "4"]].concat());
    println!("{stdout}");
    assert!(stdout.contains("reference run 1 of 2: "), "{stdout}");
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["passed"], true, "{report}");
    let g = &report["reference_goodput"];
    assert_eq!(g["runs"], 1, "{report}");
    let ref_steps = g["steps"][0].as_u64().unwrap();
    let ref_wall = g["wall_s"][0].as_f64().unwrap();
    let faulted_rate = g["faulted_steps_per_s"].as_f64().unwrap();
    assert!(ref_steps > 0 && ref_wall > 0.0 && faulted_rate > 0.0, "{g}");
    let ratio = faulted_rate / (ref_steps as f64 / ref_wall);
    assert!((g["median"].as_f64().unwrap() - ratio).abs() < 1e-9, "{g}");
    let history = read_json(&out.join("history.json"));
    let refs = history["reference_runs"].as_array().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0]["finished"], true, "{}", refs[0]);
    assert!(
        !refs[0]["resources"].as_array().unwrap().is_empty(),
        "the reference run's daemons were sampled: {}",
        refs[0]
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Against fault-free reference runs"), "{md}");
    assert!(md.contains("(reference run 1)"), "{md}");
}

#[test]
fn chaos_run_fails_when_an_invariant_is_violated() {
    // A chaos hook makes a daemon flip one bit of its parameters when a generation starts
    // past step 20 (here: the survivor of a kill). The job goes on, but its weights are
    // not those of a fault-free run, and the harness must say so.
    let tmp = tempfile::tempdir().unwrap();
    let scenario = tmp.path().join("flip.toml");
    std::fs::write(
        &scenario,
        "name = \"flip\"\n[cluster]\nnodes = 2\n[train]\nsteps = 200\nckpt_every = 50\n\
         args = [\"--lr-decay-steps\", \"200\"]\n\
         [daemon]\nenv = { TENAX_CHAOS_FLIP_PARAM_AT_STEP = \"20\" }\n\
         [[faults]]\nkind = \"kill\"\nat_step = 20\nnode = \"non-leader\"\nrestart_after_s = 0.5\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = tenax(&[
        "chaos",
        "run",
        scenario.to_str().unwrap(),
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "must fail:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().next(), Some("seed 3"));
    assert!(
        stderr.contains("invariants violated: final_params_match_fault_free"),
        "{stderr}"
    );
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["passed"], false);
    let v = &report["invariants"]["final_params_match_fault_free"];
    assert_eq!(v["verdict"], "violated", "{report}");
    assert!(v["evidence"].as_str().unwrap().contains("differ"), "{v}");
}

#[test]
fn chaos_same_seed_same_schedule_and_bad_scenarios_are_one_line_errors() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/chaos/scenarios/kill-storm.toml"
    );
    let a = ok(&["chaos", "run", scenario, "--seed", "7", "--dry-run"]);
    let b = ok(&["chaos", "run", scenario, "--seed", "7", "--dry-run"]);
    let c = ok(&["chaos", "run", scenario, "--seed", "8", "--dry-run"]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.lines().count() > 5, "{a}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[cluster]\nnodes = 3\n[train]\nsteps = 10\n[[faults]]\nkind = \"kill\"\nat_step = 5\nnode = 9\n",
    )
    .unwrap();
    let err = fails(&["chaos", "run", bad.to_str().unwrap(), "--seed", "1"]);
    assert!(err.contains("faults[0].node = 9"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let err = fails(&["chaos", "run", "/nonexistent/x.toml", "--seed", "1"]);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn chaos_up_prints_how_to_watch_and_stops_everything_by_itself() {
    let out = ok(&["chaos", "up", "--nodes", "2", "--for-s", "6"]);
    assert!(
        out.contains("tenax status --etcd http://127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("stopping"), "{out}");
    // Every daemon it printed is gone.
    let pids: Vec<u32> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("node-")?.split("pid ").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{out}");
    for pid in pids {
        assert!(!runs(pid), "daemon {pid} still runs");
    }
}

/// The PIDs whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // "pid (comm) state ppid ...": comm may hold spaces; split after ')'.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Kills (SIGKILL) those of its processes that still run when dropped.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in self.0.iter().filter(|&&pid| runs(pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn chaos_run_stopped_by_sigterm_stops_every_process_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/chaos/scenarios/smoke.toml");
    let log = std::fs::File::create(tmp.path().join("chaos.log")).unwrap();
    let mut chaos = Command::new(env!("CARGO_BIN_EXE_tenax"))
        .args(["chaos", "run", scenario, "--seed", "1", "--out"])
        .arg(&out)
        .env("CANDLE_NUM_THREADS", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = chaos.id();
    // Wait until etcd, the S3 server and the daemons run (more than 2 children).
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let children = children_of(pid);
        if children.len() > 2 && out.join("schedule.json").exists() {
            break children;
        }
        assert!(
            Instant::now() < deadline && chaos.try_wait().unwrap().is_none(),
            "the run did not start its processes: {}",
            std::fs::read_to_string(tmp.path().join("chaos.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Should the test fail, what the run started does not outlive it.
    let _cleanup = KillOnDrop(started.clone());
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = chaos.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "chaos run did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(tmp.path().join("chaos.log")).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("SIGTERM: stopped every process it started; no report written"),
        "{text}"
    );
    assert!(!out.join("report.json").exists());
    for child in started {
        assert!(!runs(child), "process {child} outlived the run:\n{text}");
    }
}

#[path = "e2e/etcd_tls.rs"]
mod etcd_tls;
#[path = "e2e/gpu.rs"]
mod gpu;

#[path = "e2e/stream.rs"]
mod stream;

#[path = "e2e/guard.rs"]
mod guard;

#[path = "e2e/canary.rs"]
mod canary;

#[path = "e2e/stages.rs"]
mod stages;

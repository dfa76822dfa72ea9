//! The memorisation probe (`tenax train --canaries`, `tenax eval memorisation`): a run
//! without canaries keeps the bits it had before they existed; a run with them is
//! bit-identical across --ranks and a resume, and differs from one without; the secrets
//! and the end-of-run exposure are written to the run dir; `eval memorisation` reports
//! extraction and exposure. A module of `tests/e2e.rs` (serial, one candle thread).

use super::{corpus, fails, ok, run_export, train, Run};

/// 20 steps of the tiny model on the test corpus (char tokenizer, batch 6).
const STEPS: [&str; 4] = ["--steps", "20", "--lr-decay-steps", "20"];

/// One canary per repetition count 1, 10, 100 (111 insertions in the 120 samples planned).
const CANARIES: [&str; 4] = ["--canaries", "1", "--canary-reps", "1,10,100"];

fn args<'a>(extra: &[&'a [&'a str]]) -> Vec<&'a str> {
    extra.iter().flat_map(|a| a.iter().copied()).collect()
}

/// SHA-256 of the safetensors export of the tiny model after 20 steps without canaries
/// (`tenax ckpt export` of `tenax train --preset tiny --data corpus.txt --tokenizer char
/// --batch-size 6 --micro-batch-size 2 --eval-batches 2 --warmup-steps 2 --lr 3e-3
/// --steps 20 --lr-decay-steps 20`), made by the binary of commit 00c4851, before canaries
/// existed. A change of it means the bits of a run without canaries changed.
const BITS_BEFORE_CANARIES: &str =
    "f78f77be28879936bde79bff59920044aeb1d33eb4b6b87d59326018e16db8ef";

/// The `config_hash` of that run's checkpoint manifest, by the same binary: the canary keys
/// are not part of the math of a run without canaries.
const CONFIG_HASH_BEFORE_CANARIES: &str =
    "2a17e495f17301aaa23f255895a414a792d945d56f561a7917bf7292aa5496ee";

#[test]
fn a_run_without_canaries_keeps_the_bits_it_had_before_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (run, _) = train(&data, &tmp.path().join("off"), &STEPS);
    let bytes = run_export(&run);
    assert_eq!(
        tenax_storage::manifest::sha256_hex(&bytes),
        BITS_BEFORE_CANARIES
    );
    let manifest = std::fs::read_to_string(run.folder_of_step(20).join("MANIFEST.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["config_hash"], CONFIG_HASH_BEFORE_CANARIES);
    assert!(!run.dir.join("canaries.json").exists());
    assert!(!run.dir.join("memorisation.json").exists());
}

/// The final parameters and optimizer state of a run's newest checkpoint.
fn final_state(run: &Run) -> Vec<(String, Vec<u32>)> {
    run.state(20)
}

#[test]
fn canaries_are_bit_identical_across_ranks_and_a_resume_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (one, out) = train(&data, &tmp.path().join("one"), &args(&[&STEPS, &CANARIES]));
    assert!(out.contains("canaries: 3 canaries"), "{out}");
    assert!(out.contains("canary exposure (3 canaries"), "{out}");
    let (two, _) = train(
        &data,
        &tmp.path().join("two"),
        &args(&[&STEPS, &CANARIES, &["--ranks", "3"]]),
    );
    assert_eq!(one.losses(), two.losses(), "losses differ across --ranks");
    assert_eq!(
        final_state(&one),
        final_state(&two),
        "state differs across --ranks"
    );
    // Half, then a resume that inherits the canaries from the checkpoint.
    let half = tmp.path().join("half");
    train(
        &data,
        &half,
        &args(&[&["--steps", "10", "--lr-decay-steps", "20"], &CANARIES]),
    );
    let (resumed, out) = train(&data, &half, &["--steps", "20", "--resume"]);
    assert!(out.contains("resumed from step 10"), "{out}");
    assert_eq!(
        one.losses(),
        resumed.losses(),
        "losses differ after a resume"
    );
    assert_eq!(
        final_state(&one),
        final_state(&resumed),
        "state differs after a resume"
    );
    // A resume with other canaries is refused, in one line naming the key.
    let (d, h) = (data.to_str().unwrap(), half.to_str().unwrap());
    let err = fails(&super::tiny_args(
        d,
        h,
        &["--steps", "30", "--resume", "--canary-reps", "1,10,50"],
    ));
    assert!(err.contains("canary_reps"), "{err}");
    // Planting changes what is trained on.
    let (off, _) = train(&data, &tmp.path().join("off"), &STEPS);
    assert_ne!(one.losses(), off.losses(), "canaries changed nothing");

    // The secrets, and the exposure at the end of the run.
    let secrets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.dir.join("canaries.json")).unwrap())
            .unwrap();
    let canaries = secrets["canaries"].as_array().unwrap();
    assert_eq!(canaries.len(), 3);
    let reps: Vec<u64> = canaries
        .iter()
        .map(|c| c["reps"].as_u64().unwrap())
        .collect();
    assert_eq!(reps, [1, 10, 100]);
    assert!(canaries
        .iter()
        .all(|c| c["secret"].as_array().unwrap().len() == 6
            && c["prefix"].as_array().unwrap().len() == 8));
    let insertions = secrets["insertions_sample_canary_offset"]
        .as_array()
        .unwrap();
    assert_eq!(insertions.len(), 111);
    assert!(insertions.iter().all(|i| i[0].as_u64().unwrap() < 120));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.dir.join("memorisation.json")).unwrap())
            .unwrap();
    let e = &report["exposure"];
    assert_eq!(e["step"], 20);
    assert_eq!(e["rank_estimated_from_a_sample"], true, "{e}");
    let groups = e["by_reps"].as_array().unwrap();
    assert_eq!(
        groups
            .iter()
            .map(|g| g["reps"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 10, 100]
    );
    for c in e["canaries"].as_array().unwrap() {
        let x = &c["exposure"];
        let bits = x["exposure_bits"].as_f64().unwrap();
        let max = x["max_measurable_bits"].as_f64().unwrap();
        assert_eq!(x["candidates"], 1000);
        assert!((0.0..=max + 1e-9).contains(&bits), "{x}");
        assert!((max - 1001f64.log2()).abs() < 1e-9, "{x}");
        assert!(c["log_perplexity_bits"].as_f64().unwrap() > 0.0, "{c}");
    }
    // More repetitions, more exposure: measured on seeds 1-6 and 1337 (this one), where the
    // 100-repetition canary reached the most 1000 candidates can show (9.97 bits) and the
    // single one stayed below 1.7 bits; the run is deterministic, so this cannot flake.
    let mean = |g: &serde_json::Value, k: &str| g[k].as_f64().unwrap();
    let (r1, r10, r100) = (&groups[0], &groups[1], &groups[2]);
    assert!(
        mean(r100, "mean_exposure_bits") >= mean(r10, "mean_exposure_bits")
            && mean(r10, "mean_exposure_bits") > mean(r1, "mean_exposure_bits"),
        "{groups:?}"
    );
    assert!(
        mean(r100, "mean_log_perplexity_bits") < mean(r10, "mean_log_perplexity_bits")
            && mean(r10, "mean_log_perplexity_bits") < mean(r1, "mean_log_perplexity_bits"),
        "{groups:?}"
    );
    // The same report from the checkpoint, by `tenax eval memorisation`.
    let out = ok(&[
        "eval",
        "memorisation",
        one.dir.to_str().unwrap(),
        "--count",
        "20",
        "--json",
    ]);
    let last = out.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["step"], 20);
    assert_eq!(
        v["exposure"]["canaries"], e["canaries"],
        "eval and the end of the run disagree"
    );
    let x = &v["extraction"];
    assert_eq!(x["k"], 8, "the tiny model's window of 17 fits k = 8");
    assert!(x["train_sequences"].as_u64().unwrap() >= 1, "{x}");
    assert_eq!(x["val_sequences"], 20, "{x}");
    for f in [
        "train_exact_fraction",
        "train_token_fraction",
        "val_exact_fraction",
        "val_token_fraction",
    ] {
        assert!((0.0..=1.0).contains(&x[f].as_f64().unwrap()), "{f}: {x}");
    }
}

#[test]
fn eval_memorisation_without_canaries_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (run, _) = train(&data, &tmp.path().join("r"), &STEPS);
    let dir = run.dir.to_str().unwrap();
    let out = ok(&["eval", "memorisation", dir, "--count", "10", "--k", "4"]);
    assert!(out.contains("verbatim extraction, greedy, k = 4"), "{out}");
    assert!(out.contains("no canaries"), "{out}");
    let err = fails(&["eval", "memorisation", dir, "--k", "9"]);
    assert!(err.contains("--k 9") && err.contains("--k 1..=8"), "{err}");
    let missing = tmp.path().join("nope");
    let err = fails(&["eval", "memorisation", missing.to_str().unwrap()]);
    assert!(err.contains("no such run dir"), "{err}");
    // Canaries that cannot fit the run are refused before training, naming the flag.
    let (d, r) = (data.to_str().unwrap(), tmp.path().join("bad"));
    let err = fails(&super::tiny_args(
        d,
        r.to_str().unwrap(),
        &["--steps", "5", "--canaries", "1"],
    ));
    assert!(
        err.contains("--canaries") && err.contains("planned samples"),
        "{err}"
    );
}

/// Canaries in a job of daemons whose pipeline stages run on different nodes: the final
/// weights are those of `tenax train --ranks 1` with the same canaries, and the node that
/// committed the final checkpoint writes the same end-of-run exposure as `tenax train`.
#[test]
fn daemons_plant_the_same_canaries_and_the_committer_reports_their_exposure() {
    use super::{cluster, daemon_train_flags, export_bytes, job_export, wait_all_ok};
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 30;
    let canaries = ["--canaries", "1", "--canary-reps", "1,10,100"];
    let run = tmp.path().join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(daemon_train_flags(&data, steps, &canaries));
    args.extend(["--run-dir", run.to_str().unwrap()].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let store = format!("file://{}", run.join("checkpoints").display());
    let want = export_bytes(&store, &[], &tmp.path().join("reference.safetensors"));
    let exposure = |dir: &std::path::Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("memorisation.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["exposure"].clone()
    };
    let want_exposure = exposure(&run);

    let job = "canaries";
    let mut flags = vec!["--pipeline-stages", "2", "--stages-across-nodes"];
    flags.extend(canaries);
    let mut c = cluster(job, &data, steps, &flags);
    for n in 0..2 {
        c.spawn_daemon(n, &["--start-nodes".into(), "2".into()])
            .unwrap();
    }
    wait_all_ok(&mut c, &[0, 1], std::time::Duration::from_secs(300));
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "daemons with canaries trained other weights");
    let reports: Vec<usize> = (0..2)
        .filter(|&n| c.run_dir(n).join("memorisation.json").exists())
        .collect();
    assert_eq!(
        reports.len(),
        1,
        "one node (the committer) reports the exposure"
    );
    let e = exposure(&c.run_dir(reports[0]));
    assert_eq!(e["canaries"], want_exposure["canaries"], "{e}");
    assert_eq!(e["step"], steps);
    for n in 0..2 {
        assert!(
            c.run_dir(n).join("canaries.json").exists(),
            "node {n} keeps the secrets"
        );
    }
}

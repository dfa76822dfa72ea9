//! Training on a prepared dataset streamed from its store URL: `tenax data prepare`,
//! then `tenax train --data URL` (a local folder with a manifest.json, or S3 on a moto
//! server). A module of `tests/e2e.rs` (serial, one candle thread); no verdict depends
//! on time.

use std::path::{Path, PathBuf};

use tenax_core::rng::SplitMix64;

use super::{moto_with_bucket, ok, ok_env, tenax_env, Run};

/// Three text sources (weights 3:2:1 given at prepare time) in `dir`.
fn sources(dir: &Path) -> Vec<String> {
    let vocab = [
        "the", "king", "shall", "speak", "of", "love", "and", "war", "to", "thee", "my", "lord",
        "now", "what", "is", "fair",
    ];
    [("web", 3, 1u64), ("books", 2, 2), ("code", 1, 3)]
        .iter()
        .map(|(name, weight, seed)| {
            let mut rng = SplitMix64::new(*seed);
            let mut text = String::new();
            while text.len() < 6_000 {
                for _ in 0..(3 + rng.below(8)) {
                    text.push_str(vocab[rng.below(vocab.len() as u64) as usize]);
                    text.push(' ');
                }
                text.push_str(if rng.below(4) == 0 { ".\n\n" } else { ",\n" });
            }
            let path = dir.join(format!("{name}.txt"));
            std::fs::write(&path, text).unwrap();
            format!("{name}={}:{weight}", path.display())
        })
        .collect()
}

/// `tenax data prepare` of [`sources`] to `out`, 500-token shards, no filtering.
fn prepare_args(dir: &Path, out: &str) -> Vec<String> {
    let config = dir.join("prepare.toml");
    std::fs::write(
        &config,
        "[dedup]\nexact = false\nnear = false\n[filters]\nenabled = false\n[scrub]\nenabled = false\n",
    )
    .unwrap();
    let mut args: Vec<String> = ["data", "prepare", "--out", out, "--tokenizer", "bytes"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in sources(dir) {
        args.extend(["--source".to_string(), s]);
    }
    args.extend(
        [
            "--config",
            config.to_str().unwrap(),
            "--shard-tokens",
            "500",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// `tenax train` of the tiny model on the dataset at `data`.
fn train_args<'a>(data: &'a str, dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--preset",
        "tiny",
        "--data",
        data,
        "--batch-size",
        "6",
        "--micro-batch-size",
        "2",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--prefetch-mb",
        "1",
        "--run-dir",
        dir,
    ];
    if !extra.contains(&"--shuffle-shards") {
        v.extend_from_slice(&["--shuffle-shards", "2"]);
    }
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_streamed_mixture_resumes_bit_identically_on_another_rank_count() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let d = ds.to_str().unwrap().to_string();
    let out = ok(&strs(&prepare_args(tmp.path(), &d)));
    assert!(out.contains("dataset hash"), "{out}");
    let run = |name: &str, extra: &[&str]| -> (Run, String) {
        let dir = tmp.path().join(name);
        let out = ok(&train_args(&d, dir.to_str().unwrap(), extra));
        (Run { dir }, out)
    };
    let (straight, out) = run("a", &["--steps", "12", "--lr-decay-steps", "12"]);
    assert!(
        out.contains("dataset: file://") && out.contains("sampler: mixture"),
        "{out}"
    );
    assert!(
        out.contains("web 512/1024") && out.contains("code 171/1024"),
        "{out}"
    );
    let (first, _) = run("b", &["--steps", "6", "--lr-decay-steps", "12"]);
    let (resumed, out) = run("b", &["--steps", "12", "--resume", "--ranks", "3"]);
    assert!(out.contains("resumed from step 6"), "{out}");
    let after =
        |r: &Run| -> Vec<(u64, u64)> { r.losses().into_iter().filter(|(s, _)| *s > 6).collect() };
    assert_eq!(after(&straight).len(), 6);
    assert_eq!(
        after(&resumed),
        after(&straight),
        "losses of steps 7..12 differ"
    );
    assert_eq!(
        first.state(12),
        straight.state(12),
        "final parameters or optimizer state differ after a resume on 3 ranks"
    );
    // Two pipeline stages read the same samples and give the same bits.
    let (piped, _) = run(
        "p",
        &[
            "--steps",
            "12",
            "--lr-decay-steps",
            "12",
            "--ranks",
            "2",
            "--pipeline-stages",
            "2",
        ],
    );
    assert_eq!(
        piped.losses(),
        straight.losses(),
        "losses differ with 2 stages"
    );
    assert_eq!(
        piped.state(12),
        straight.state(12),
        "state differs with 2 stages"
    );
    // The oracle can fail: another K reads other samples, and a resume refuses it.
    let (other, _) = run(
        "c",
        &[
            "--steps",
            "12",
            "--lr-decay-steps",
            "12",
            "--shuffle-shards",
            "1",
        ],
    );
    assert_ne!(other.losses(), straight.losses());
    let dir = tmp.path().join("b");
    let bad = tenax_env(
        &train_args(
            &d,
            dir.to_str().unwrap(),
            &["--steps", "14", "--resume", "--shuffle-shards", "1"],
        ),
        &[],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("data changed"),
        "{stderr}"
    );
}

/// Overwrites `key` of the store at `url` with `body` (this test process's `AWS_*`
/// environment set to `env`, as the tenax processes get it).
fn s3_put(url: &str, env: &[(String, String)], key: &str, body: Vec<u8>) {
    use object_store::ObjectStoreExt;
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let store = tenax_storage::Store::open(url).unwrap();
    super::block_on(
        store
            .inner()
            .put(&store.path(key), bytes::Bytes::from(body).into()),
    )
    .unwrap();
}

#[test]
fn a_dataset_on_s3_streams_end_to_end_and_a_tampered_shard_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = moto_with_bucket("tenax-data");
    let env = moto.s3_env();
    let url = "s3://tenax-data/corpora/mix";
    let out = ok_env(&strs(&prepare_args(tmp.path(), url)), &env);
    assert!(
        out.contains("prepared s3://tenax-data/corpora/mix"),
        "{out}"
    );
    let dir = tmp.path().join("run");
    let out = ok_env(
        &train_args(
            url,
            dir.to_str().unwrap(),
            &["--steps", "4", "--eval-every", "2"],
        ),
        &env,
    );
    assert!(
        out.contains("dataset: s3://tenax-data/corpora/mix"),
        "{out}"
    );
    assert!(
        out.contains("done: step 4") && out.contains("val loss"),
        "{out}"
    );
    assert_eq!(Run { dir: dir.clone() }.losses().len(), 4);

    // The same shards prepared locally (prepare is deterministic); every training shard
    // of "web" (every one but its held-out first) replaced on S3 by a damaged copy.
    let local = tmp.path().join("local");
    ok(&strs(&prepare_args(tmp.path(), local.to_str().unwrap())));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local.join("manifest.json")).unwrap()).unwrap();
    let web: Vec<String> = manifest["sources"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap().to_string())
        .collect();
    assert!(web.len() >= 2, "{web:?}");
    for file in &web[1..] {
        let mut bytes = std::fs::read(local.join(file)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        s3_put(url, &env, file, bytes);
    }
    let dir2: PathBuf = tmp.path().join("run2");
    let bad = tenax_env(
        &train_args(url, dir2.to_str().unwrap(), &["--steps", "4"]),
        &env,
    );
    let stderr = String::from_utf8_lossy(&bad.stderr).to_string();
    assert!(
        !bad.status.success(),
        "a tampered shard was trained on:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        web[1..].iter().any(|f| errors[0].contains(f.as_str()))
            && errors[0].contains("tampered")
            && errors[0].contains("prepare the dataset again"),
        "{}",
        errors[0]
    );
}

#[test]
fn three_daemons_on_a_streamed_dataset_train_bit_identically_to_train_ranks_3() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    ok(&strs(&prepare_args(tmp.path(), ds.to_str().unwrap())));
    let steps = 6;
    let want = super::reference_export(&ds, tmp.path(), steps);
    let job = "streamed";
    let mut c = super::cluster(job, &ds, steps, &[]);
    for n in 0..3 {
        c.spawn_daemon(n, &["--start-nodes".into(), "3".into()])
            .unwrap();
    }
    super::wait_all_ok(&mut c, &[0, 1, 2], std::time::Duration::from_secs(300));
    for n in 0..3 {
        let log = c.log(n);
        assert!(
            log.contains("dataset: file://"),
            "node {n} did not stream:\n{log}"
        );
    }
    let got = super::job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "the job's final weights differ from tenax train --ranks 3 on the same streamed dataset"
    );
}

/// The training guard on a streamed mixture: a planted loss spike is skipped and logged
/// with the source, shard and window of every sample of its batch, and `tenax data report`
/// shows the run's dataset (mixture, filters, scrubbing) and the flagged batch.
#[test]
fn a_planted_spike_on_a_mixture_is_logged_with_its_sources_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let d = ds.to_str().unwrap().to_string();
    ok(&strs(&prepare_args(tmp.path(), &d)));
    let dir = tmp.path().join("run");
    let guard = [
        "--steps",
        "12",
        "--guard-sigma",
        "6",
        "--guard-warmup-steps",
        "5",
        "--ckpt-every",
        "6",
    ];
    let args = train_args(&d, dir.to_str().unwrap(), &guard);
    let env = [(
        "TENAX_CHAOS_LOSS_SPIKE_AT_STEPS".to_string(),
        "8".to_string(),
    )];
    let out = tenax_env(&args, &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("guard: step 9: loss"), "{stderr}");
    let text = std::fs::read_to_string(dir.join("flagged.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["step"], 9);
    let samples = lines[0]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 6);
    for s in samples {
        let (source, shard) = (s["source"].as_str().unwrap(), s["shard"].as_str().unwrap());
        assert!(["web", "books", "code"].contains(&source), "{s}");
        assert!(
            shard.starts_with(&format!("shards/{source}-")) && shard.ends_with(".tok"),
            "{s}"
        );
        assert!(s["window"].is_u64(), "{s}");
    }
    let report = ok(&["data", "report", dir.to_str().unwrap()]);
    assert!(report.contains(&format!("dataset file://{d}")), "{report}");
    for want in [
        "mixture",
        "web",
        "books",
        "code",
        "50.0%",
        "filters",
        "scrubbing",
    ] {
        assert!(report.contains(want), "{want}: {report}");
    }
    assert!(report.contains("flagged batches: 1"), "{report}");
    assert!(report.contains("  step 9 skip: loss "), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["data", "report", &d, "--json"])).unwrap();
    let shares: Vec<f64> = json["dataset"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["drawn_share"].as_f64().unwrap())
        .collect();
    assert_eq!(shares, vec![512.0 / 1024.0, 341.0 / 1024.0, 171.0 / 1024.0]);
    assert!(json.get("flagged").is_none(), "{json}");
}

//! The training guard of `tenax train` (`--guard-sigma`): a planted loss spike
//! (`TENAX_CHAOS_LOSS_SPIKE_AT_STEPS`, the reduced loss of those steps x 10) is skipped,
//! logged to flagged.jsonl with its samples, and rolled back after a streak; a guarded run
//! without spikes has the bits of an unguarded one; a resumed run decides as a straight
//! one. A module of `tests/e2e.rs` (serial, one candle thread).

use std::path::Path;

use super::{corpus, ok, ok_env, tiny_args, Run};

/// The guard's flags of these tests: 6 sigma after 5 steps, snapshots every 5 steps.
const GUARD: [&str; 8] = [
    "--guard-sigma",
    "6",
    "--guard-warmup-steps",
    "5",
    "--guard-snapshot-every",
    "5",
    "--lr-decay-steps",
    "20",
];

/// `tenax train` of the tiny model with the guard's flags, `extra`, and the loss spikes
/// planted at `spikes` (0-based step numbers, comma-separated; empty: none).
fn guarded(data: &Path, dir: &Path, spikes: &str, extra: &[&str]) -> (Run, String) {
    let (d, r) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let mut flags: Vec<&str> = GUARD.to_vec();
    flags.extend_from_slice(extra);
    let args = tiny_args(d, r, &flags);
    let env = match spikes {
        "" => vec![],
        s => vec![("TENAX_CHAOS_LOSS_SPIKE_AT_STEPS".to_string(), s.to_string())],
    };
    let out = ok_env(&args, &env);
    (
        Run {
            dir: dir.to_path_buf(),
        },
        out,
    )
}

fn flagged(run: &Run) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(run.dir.join("flagged.jsonl")) {
        Ok(t) => t
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn guards_without_spikes_give_the_bits_of_no_guards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (d, a) = (data.to_str().unwrap(), tmp.path().join("off"));
    ok(&tiny_args(
        d,
        a.to_str().unwrap(),
        &["--steps", "20", "--lr-decay-steps", "20"],
    ));
    let off = Run { dir: a };
    let (on, _) = guarded(
        &data,
        &tmp.path().join("on"),
        "",
        &["--steps", "20", "--guard-rollback-after", "2"],
    );
    assert!(flagged(&on).is_empty(), "{:?}", flagged(&on));
    assert_eq!(on.losses().len(), 20);
    assert_eq!(on.losses(), off.losses(), "losses differ with the guard on");
    assert_eq!(
        on.state(20),
        off.state(20),
        "final state differs with the guard on"
    );
}

#[test]
fn a_planted_spike_is_skipped_and_logged_with_its_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Step 12 (0-based 11) reports 10x its loss; a run that stops at step 11 and one
    // without the spike are the references (a run's final checkpoint is always saved).
    let (run, out) = guarded(&data, &tmp.path().join("run"), "11", &["--steps", "12"]);
    let (before, _) = guarded(&data, &tmp.path().join("before"), "", &["--steps", "11"]);
    let (clean, _) = guarded(&data, &tmp.path().join("clean"), "", &["--steps", "12"]);
    assert!(out.contains("done: step 12"), "{out}");
    let f = flagged(&run);
    assert_eq!(f.len(), 1, "{f:?}");
    let line = &f[0];
    assert_eq!(line["step"], 12);
    assert_eq!(line["action"], "skip");
    assert_eq!(
        line["cursor"],
        11 * 6,
        "the batch of step 12 starts at sample 66"
    );
    assert!(line["loss"].as_f64().unwrap() > line["max_loss"].as_f64().unwrap());
    let samples = line["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 6, "every sample of the batch is named");
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["sample"], 66 + i as u64);
        assert!(s["source"].as_str().unwrap().ends_with("corpus.txt"), "{s}");
        assert_eq!(
            s["token_offset"].as_u64().unwrap(),
            s["window"].as_u64().unwrap() * 16,
            "{s}"
        );
    }
    let guarded_steps: Vec<u64> = run
        .metrics()
        .iter()
        .filter(|m| m["guarded"] == true)
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(guarded_steps, vec![12]);
    // The skipped step changed nothing: the state after it is the state before it.
    assert_eq!(
        run.state(12),
        before.state(11),
        "step 12's update was applied"
    );
    assert_ne!(clean.state(12), before.state(11));
    assert!(flagged(&clean).is_empty());
}

#[test]
fn a_streak_of_spikes_rolls_back_to_the_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Steps 12, 13 and 14 spike; the snapshot is of step 10.
    let streak = ["--guard-rollback-after", "3"];
    let with = |steps: &'static str| {
        let mut v = vec!["--steps", steps];
        v.extend_from_slice(&streak);
        v
    };
    let (run, out) = guarded(&data, &tmp.path().join("run"), "11,12,13", &with("14"));
    let (at10, _) = guarded(&data, &tmp.path().join("at10"), "", &with("10"));
    let (on, _) = guarded(&data, &tmp.path().join("on"), "11,12,13", &with("16"));
    let actions: Vec<(u64, String)> = flagged(&run)
        .iter()
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            (12, "skip".into()),
            (13, "skip".into()),
            (14, "rollback".into())
        ]
    );
    assert_eq!(flagged(&run)[2]["rollback_to_step"], 10);
    assert!(out.contains("done: step 14"), "{out}");
    assert_eq!(
        run.state(14),
        at10.state(10),
        "the state after the rollback is the snapshot's"
    );
    // Training goes on after it, from the next batches (the cursor is not rewound).
    let m = on.metrics();
    assert_eq!(m.len(), 16);
    assert_eq!(flagged(&on).len(), 3);
    assert_ne!(on.state(16), at10.state(10));
}

#[test]
fn a_resumed_run_keeps_the_guard_state_and_decides_as_a_straight_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // A spike at step 12 (after the resume at 10, before a fresh guard's warm-up would
    // end: only the carried state flags it), then a streak of two at 15 and 16 rolling
    // back to the snapshot of step 10 (the resumed run holds it: it is its start).
    let spikes = "11,14,15";
    let extra = ["--guard-rollback-after", "2", "--ckpt-every", "5"];
    let mut straight_flags = vec!["--steps", "20"];
    straight_flags.extend_from_slice(&extra);
    let (straight, _) = guarded(&data, &tmp.path().join("a"), spikes, &straight_flags);
    let mut first_flags = vec!["--steps", "10"];
    first_flags.extend_from_slice(&extra);
    let (_first, _) = guarded(&data, &tmp.path().join("b"), spikes, &first_flags);
    let (resumed, out) = guarded(
        &data,
        &tmp.path().join("b"),
        spikes,
        &["--steps", "20", "--resume"],
    );
    assert!(out.contains("resumed from step 10"), "{out}");
    let actions = |r: &Run| -> Vec<(u64, String)> {
        flagged(r)
            .iter()
            .map(|l| {
                (
                    l["step"].as_u64().unwrap(),
                    l["action"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        actions(&straight),
        vec![
            (12, "skip".into()),
            (15, "skip".into()),
            (16, "rollback".into())
        ]
    );
    assert_eq!(actions(&resumed), actions(&straight));
    assert_eq!(resumed.losses(), straight.losses());
    assert_eq!(
        resumed.state(20),
        straight.state(20),
        "final state differs after resume"
    );
}

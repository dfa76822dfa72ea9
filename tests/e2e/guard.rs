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

/// The guard's flags of the daemon test: 6 sigma after 5 steps, no rollback (a daemon
/// only skips).
#[cfg(feature = "chaos-hooks")]
const DAEMON_GUARD: [&str; 4] = ["--guard-sigma", "6", "--guard-warmup-steps", "5"];

/// The line `  extra {...}` of `tenax ckpt inspect` of the checkpoint of `step` in `store`.
#[cfg(feature = "chaos-hooks")]
fn manifest_extra(store: &str, step: u64, env: &[(String, String)]) -> String {
    let out = super::ok_env(
        &["ckpt", "inspect", store, "--step", &step.to_string()],
        env,
    );
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix("extra "))
        .unwrap_or_else(|| panic!("no extra in:\n{out}"))
        .to_string()
}

/// Three daemons with the guard on and the same loss spikes planted in each (every 4th
/// step after the warm-up): a killed member rejoins with the state copied from a peer,
/// the guard's state with it, so it flags the later spikes as the others do (a fresh
/// guard would still be warming up and apply one, and its parameters would differ). The
/// final weights and the final checkpoint's guard state are `tenax train --ranks 3`'s with
/// the same flags and spikes.
#[cfg(feature = "chaos-hooks")]
#[test]
fn daemons_carry_the_guard_state_in_state_copies_and_checkpoints() {
    use super::{
        cluster, daemon_train_flags, export_bytes, job_export, leader_and_follower, wait_all_ok,
        wait_status,
    };
    use std::time::{Duration, Instant};
    use tenax_chaos::cluster::Signal;

    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Long enough that the pair cannot finish while the killed node restarts.
    let steps = 3000;
    let spikes: Vec<String> = (9..steps).step_by(4).map(|s| s.to_string()).collect();
    let env = vec![(
        "TENAX_CHAOS_LOSS_SPIKE_AT_STEPS".to_string(),
        spikes.join(","),
    )];

    // The reference: one process, three ranks, the same guard and spikes.
    let run = tmp.path().join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(daemon_train_flags(&data, steps, &DAEMON_GUARD));
    args.extend(["--ranks", "3", "--run-dir", run.to_str().unwrap()].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_env(&refs, &env);
    let reference = Run { dir: run.clone() };
    let ref_store = format!("file://{}", run.join("checkpoints").display());
    let want = export_bytes(&ref_store, &[], &tmp.path().join("reference.safetensors"));

    let job = "guarded";
    let mut extra = vec!["--ckpt-every", "500"];
    extra.extend_from_slice(&DAEMON_GUARD);
    let mut c = cluster(job, &data, steps, &extra);
    for n in 0..3 {
        c.spawn_daemon_env(n, &["--start-nodes".into(), "3".into()], &env)
            .unwrap();
    }
    let s = wait_status(&c, job, "3 members at step 20", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3) && s["step"].as_u64() >= Some(20)
    });
    let (leader, _) = leader_and_follower(&c, job);
    let victim = (0..3).rev().find(|&n| n != leader).unwrap();
    let generation = s["generation"].as_u64().unwrap();
    c.signal(victim, Signal::Kill).unwrap();
    wait_status(&c, job, "the pair in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2)
            && s["generation"].as_u64() > Some(generation)
    });
    // The killed node restarts while the leader is frozen (well under the lease), so
    // that the pair cannot finish the job first.
    let _ = c.wait(victim, Duration::from_secs(10));
    c.signal(leader, Signal::Stop).unwrap();
    c.spawn_daemon_env(victim, &[], &env).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c.log(victim).contains("gRPC on") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(leader, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1, 2], Duration::from_secs(400));

    let log = c.log(victim);
    let restarted = log.rsplit("start 2 ---").next().unwrap();
    let copied: u64 = restarted
        .split("copied the state of step ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the restarted node copies the state from a peer:\n{log}"));
    for n in 0..3 {
        assert!(!c.log(n).contains("ALARM"), "node {n}:\n{}", c.log(n));
    }
    // After its copy, the restarted node flagged exactly the steps the reference did.
    let after = |r: &Run| -> Vec<u64> {
        flagged(r)
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .filter(|&s| s > copied)
            .collect()
    };
    let victim_run = Run {
        dir: c.run_dir(victim),
    };
    let want_flagged = after(&reference);
    assert!(want_flagged.len() > 100, "{want_flagged:?}");
    assert_eq!(after(&victim_run), want_flagged);
    // The daemons' checkpoints carry the guard state, the reference's bits.
    let store = format!("{}/{job}", c.store_url());
    let extra = manifest_extra(&store, steps, &c.s3_env());
    assert!(extra.contains("\"guard\""), "{extra}");
    assert_eq!(extra, manifest_extra(&ref_store, steps, &[]));
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "the guarded daemons' final weights differ");
}

/// Two daemons with a rollback streak of 3: spikes at steps 22, 23 and 24 (1-based) make
/// both skip two steps and roll back to the snapshot of step 20, as `tenax train --ranks 2`
/// does with the same flags and spikes: the same flagged steps and actions, the same
/// final weights.
#[cfg(feature = "chaos-hooks")]
#[test]
fn daemons_roll_a_streak_back_as_train_does() {
    use super::{cluster, daemon_train_flags, export_bytes, job_export, wait_all_ok};
    use std::time::Duration;

    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 60;
    let env = vec![(
        "TENAX_CHAOS_LOSS_SPIKE_AT_STEPS".to_string(),
        "21,22,23".to_string(),
    )];
    let guard = [
        "--guard-sigma",
        "6",
        "--guard-warmup-steps",
        "5",
        "--guard-rollback-after",
        "3",
        "--guard-snapshot-every",
        "10",
    ];
    let run = tmp.path().join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(daemon_train_flags(&data, steps, &guard));
    args.extend(["--ranks", "2", "--run-dir", run.to_str().unwrap()].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_env(&refs, &env);
    let reference = Run { dir: run.clone() };
    let ref_store = format!("file://{}", run.join("checkpoints").display());
    let want = export_bytes(&ref_store, &[], &tmp.path().join("reference.safetensors"));
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
    let want_actions = actions(&reference);
    assert_eq!(
        want_actions,
        vec![
            (22, "skip".into()),
            (23, "skip".into()),
            (24, "rollback".into())
        ]
    );

    let job = "rollback";
    let mut c = cluster(job, &data, steps, &guard);
    for n in 0..2 {
        c.spawn_daemon_env(n, &["--start-nodes".into(), "2".into()], &env)
            .unwrap();
    }
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(300));
    for n in 0..2 {
        let node = Run { dir: c.run_dir(n) };
        assert_eq!(actions(&node), want_actions, "node {n}:\n{}", c.log(n));
    }
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "the daemons' rollback differs from tenax train's"
    );
}

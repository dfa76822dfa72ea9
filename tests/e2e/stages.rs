//! Daemons that each run one pipeline stage (`--stages-across-nodes`): a pipeline's
//! stages on different nodes, re-formed after a kill, with the bits of one rank.

use super::*;

/// The daemon flags of a job whose pipelines of `stages` stages run one stage per node.
fn across(stages: &str) -> Vec<&str> {
    vec![
        "--ckpt-every",
        "500",
        "--pipeline-stages",
        stages,
        "--stages-across-nodes",
    ]
}

/// The node that hosts rank `rank` in the job's status.
fn node_with_rank(s: &serde_json::Value, rank: u64) -> usize {
    let m = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            m["ranks"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x.as_u64() == Some(rank)))
        })
        .unwrap_or_else(|| panic!("no member hosts rank {rank}: {s}"));
    m["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap()
}

/// Starts `n` daemons and waits until all train past step 5; returns the status.
fn start_all(c: &mut LocalCluster, job: &str, n: usize) -> serde_json::Value {
    for k in 0..n {
        c.spawn_daemon(k, &["--start-nodes".into(), n.to_string()])
            .unwrap();
    }
    wait_status(c, job, "every member at step 5", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == n) && s["step"].as_u64() >= Some(5)
    })
}

/// Every step 1..=steps of the job, in the newest generation that logged it: every
/// member that logged it agrees on the whole state's hash, at the cursor the step implies.
/// Returns the steps a lineage that died had logged too (redone after the fault).
fn assert_members_agree(c: &LocalCluster, nodes: &[usize], steps: u64) -> usize {
    let lines = step_lines(c, nodes);
    let mut redone = 0;
    for step in 1..=steps {
        let of_step: Vec<&StepLine> = lines.iter().filter(|l| l.step == step).collect();
        let newest = of_step
            .iter()
            .map(|l| l.generation)
            .max()
            .unwrap_or_else(|| panic!("no node logged step {step}"));
        redone += usize::from(of_step.iter().any(|l| l.generation != newest));
        let lineage: Vec<&&StepLine> = of_step.iter().filter(|l| l.generation == newest).collect();
        for l in &lineage {
            assert_eq!(
                l.cursor,
                (step - 1) * BATCH,
                "step {step} on node {}",
                l.node
            );
            assert_eq!(
                l.param_hash, lineage[0].param_hash,
                "step {step}: members disagree (nodes {} and {})",
                lineage[0].node, l.node
            );
        }
    }
    redone
}

/// Seconds from `since_ms` (Unix) to the first step any of `nodes` logged in a generation
/// newer than `generation` (printed, never asserted).
fn reform_seconds(c: &LocalCluster, nodes: &[usize], generation: u64, since_ms: u64) -> f64 {
    let first = step_lines(c, nodes)
        .iter()
        .filter(|l| l.generation > generation)
        .map(|l| l.t_ms)
        .min()
        .unwrap_or(u64::MAX);
    first.saturating_sub(since_ms) as f64 / 1000.0
}

/// 4 daemons as 2 pipelines x 2 stages; one is killed and not restarted: the 3 survivors
/// form one pipeline of 2 stages (the lost stage's state is on every survivor) and finish
/// with the final weights of one rank.
#[test]
fn stages_on_four_nodes_survive_a_kill_with_the_bits_of_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 1500;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "stages4";
    let mut c = cluster(job, &data, steps, &across("2"));
    let s = start_all(&mut c, job, 4);
    for k in 0..4 {
        let log = c.log(k);
        assert!(
            log.contains("runs stage") && log.contains("of 2 of pipeline"),
            "{log}"
        );
    }
    let (leader, _) = leader_and_follower(&c, job);
    let victim = (0..4).rev().find(|&n| n != leader).unwrap();
    let generation = s["generation"].as_u64().unwrap();
    let killed = tenax_storage::now_unix_ms();
    c.signal(victim, Signal::Kill).unwrap();
    wait_status(&c, job, "3 members in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 3)
            && s["generation"].as_u64() > Some(generation)
    });
    let survivors: Vec<usize> = (0..4).filter(|&n| n != victim).collect();
    wait_all_ok(&mut c, &survivors, Duration::from_secs(400));
    println!(
        "2 x 2 stages, kill -9 of node-{victim} -> the survivors' first step in a new generation: {:.2} s",
        reform_seconds(&c, &survivors, generation, killed)
    );
    let redone = assert_members_agree(&c, &survivors, steps);
    println!("steps redone after the kill: {redone}");
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "stages across nodes with a kill changed the final weights"
    );
}

/// 2 daemons as 1 pipeline x 2 stages; the stage-1 node is killed and restarted: the
/// survivor trains on alone (a pipeline of 1 stage) from the whole state it holds, the
/// restarted node copies that state from it and takes stage 1 again; the final weights
/// are one rank's.
#[test]
fn a_killed_stage_comes_back_with_the_state_of_its_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 2000;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "stages2";
    let mut c = cluster(job, &data, steps, &across("2"));
    let s = start_all(&mut c, job, 2);
    let victim = node_with_rank(&s, 1);
    let survivor = 1 - victim;
    let generation = s["generation"].as_u64().unwrap();
    let killed = tenax_storage::now_unix_ms();
    c.signal(victim, Signal::Kill).unwrap();
    wait_status(&c, job, "the survivor alone in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 1)
            && s["generation"].as_u64() > Some(generation)
    });
    // Frozen while the killed node comes back (well under the lease), so that the
    // survivor cannot finish the job first.
    c.signal(survivor, Signal::Stop).unwrap();
    let _ = c.wait(victim, Duration::from_secs(10));
    c.spawn_daemon(victim, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !c.log(victim).contains("gRPC on") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(survivor, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(400));
    println!(
        "1 x 2 stages, kill -9 of the stage-1 node -> the survivor's first step alone: {:.2} s",
        reform_seconds(&c, &[survivor], generation, killed)
    );
    assert_members_agree(&c, &[0, 1], steps);
    let log = c.log(survivor);
    assert!(log.contains("pipeline shortened to 1 stage"), "{log}");
    let restarted = c.log(victim);
    let restarted = restarted.rsplit("start 2 ---").next().unwrap();
    assert!(
        restarted.contains("copied the state of step") && restarted.contains("runs stage"),
        "the restarted node copies the state and runs a stage again:\n{restarted}"
    );
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "a killed and restarted stage changed the final weights"
    );
}

/// `daemon_train_flags` with the nano preset (4 blocks: enough for 3 stages).
fn nano_flags(data: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v = daemon_train_flags(data, steps, extra);
    let at = v.iter().position(|a| a == "--preset").unwrap() + 1;
    v[at] = "nano".into();
    v
}

/// 3 daemons as 1 pipeline x 3 stages (nano, 4 blocks); one is killed and not
/// restarted: the two survivors go on as a pipeline of 2 stages and finish with the
/// final weights of `tenax train --ranks 1`.
#[test]
fn three_stages_go_on_as_two_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 120;
    let run = tmp.path().join("reference");
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(nano_flags(&data, steps, &[]));
    args.extend(["--run-dir", run.to_str().unwrap()].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let store = format!("file://{}", run.join("checkpoints").display());
    let want = export_bytes(&store, &[], &tmp.path().join("reference.safetensors"));
    let job = "stages3";
    let mut daemon_args = nano_flags(&data, steps, &across("3"));
    daemon_args.extend(["--settle-ms", "300", "--lease-ttl-s", "3"].map(String::from));
    let mut c = cluster_with_args(job, daemon_args, false);
    let s = start_all(&mut c, job, 3);
    let table = {
        let etcd = c.etcd_endpoint();
        ok(&["status", "--etcd", &etcd, "--job", job])
    };
    assert!(table.contains("(stage 2 of 3, pipeline 0)"), "{table}");
    let victim = node_with_rank(&s, 1);
    let generation = s["generation"].as_u64().unwrap();
    let killed = tenax_storage::now_unix_ms();
    c.signal(victim, Signal::Kill).unwrap();
    let s = wait_status(&c, job, "2 members in a new generation", |s| {
        s["members"].as_array().is_some_and(|m| m.len() == 2)
            && s["generation"].as_u64() > Some(generation)
    });
    for m in s["members"].as_array().unwrap() {
        assert_eq!(m["pipeline_stages"], 2, "{m}");
    }
    let survivors: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
    wait_all_ok(&mut c, &survivors, Duration::from_secs(500));
    println!(
        "1 x 3 stages, kill -9 of the stage-1 node -> the first step as 2 stages: {:.2} s",
        reform_seconds(&c, &survivors, generation, killed)
    );
    assert_members_agree(&c, &survivors, steps);
    for &n in &survivors {
        let log = c.log(n);
        assert!(
            log.contains("pipeline shortened to 2 stage(s) of 3"),
            "{log}"
        );
    }
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(
        got == want,
        "3 stages shrunk to 2 changed the final weights"
    );
}

/// 2 daemons as 1 pipeline x 2 stages with a long lease (20 s): the stage-0 node is
/// stopped (SIGSTOP). The head stage's late step names it (its pipeline's members are
/// the suspects, not only the head that owns the slots), the leader evicts it, the
/// survivor trains on alone, and after SIGCONT the stopped node rejoins; the final weights
/// are one rank's.
#[test]
fn a_hung_stage_is_named_by_the_stage_waiting_on_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 2500;
    let want = reference_export(&data, tmp.path(), steps);
    let job = "stagehang";
    let mut daemon_args = daemon_train_flags(&data, steps, &across("2"));
    daemon_args.extend(
        [
            "--settle-ms",
            "300",
            "--lease-ttl-s",
            "20",
            "--suspect-after-ms",
            "500",
        ]
        .map(String::from),
    );
    let mut c = cluster_with_args(job, daemon_args, false);
    let s = start_all(&mut c, job, 2);
    let (stopped, head) = (node_with_rank(&s, 0), node_with_rank(&s, 1));
    c.signal(stopped, Signal::Stop).unwrap();
    let named = format!("waits for node-{stopped}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.log(head).contains(&named) {
        assert!(
            Instant::now() < deadline,
            "the head stage never named the stopped stage:\n{}",
            c.log(head)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.signal(stopped, Signal::Cont).unwrap();
    wait_all_ok(&mut c, &[0, 1], Duration::from_secs(400));
    let got = job_export(&c, job, &tmp.path().join("job.safetensors"));
    assert!(got == want, "a hung stage changed the final weights");
}

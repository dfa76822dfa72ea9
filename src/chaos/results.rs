//! Around a chaos run: its fault-free reference runs; after it, etcd's history of plans
//! and checkpoint records, the comparison with the fault-free reference, the timeline
//! plot, the summary, and `tenax chaos report`.

use super::*;

/// Every plan and checkpoint record etcd accepted, in revision order.
pub(super) async fn etcd_history(
    endpoint: &str,
    job: &str,
) -> Result<(Vec<PlanEntry>, Vec<CommitEntry>)> {
    use tenax_cluster::etcd::{EtcdConfig, EtcdMembership};
    use tenax_cluster::records;
    let etcd = EtcdMembership::connect(EtcdConfig::new(vec![endpoint.to_string()], job))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let plans = etcd
        .plan_history(MAX_ETCD_VERSIONS)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .map(|r| {
            let members = match records::decode_plan(r.generation, &r.plan) {
                Ok(p) => p.members.iter().map(|m| m.to_string()).collect(),
                Err(e) => {
                    eprintln!(
                        "warning: plan history of job {job}, revision {}: {e}",
                        r.mod_revision
                    );
                    Vec::new()
                }
            };
            PlanEntry {
                revision: r.mod_revision,
                generation: r.generation,
                members,
            }
        })
        .collect();
    let commits = etcd
        .key_history(records::CHECKPOINT_KEY, MAX_ETCD_VERSIONS)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .filter_map(|v| {
            let rec = records::decode_checkpoint(&v.value).ok()?;
            Some(CommitEntry {
                revision: v.revision,
                step: rec.step,
                generation: rec.generation,
                url: rec.url,
                verified: None,
                verify_error: String::new(),
            })
        })
        .collect();
    Ok((plans, commits))
}

/// Exports the job's final checkpoint and a fault-free `tenax train` run's, compares bytes.
/// Trains the fault-free reference to `steps` (the scenario's target, or what a run
/// sized by time committed; the learning-rate schedule must not depend on `--steps`
/// then, so such scenarios give `--lr-decay-steps`) and compares its exported weights
/// with the job's final checkpoint, byte for byte.
pub(super) fn compare_with_reference(
    exe: &Path,
    s: &Scenario,
    steps: u64,
    data: &Path,
    out: &Path,
    c: &LocalCluster,
    job: &str,
) -> Result<FinalComparison> {
    let run_cmd = |args: &[String], env: &[(String, String)]| -> Result<()> {
        let o = std::process::Command::new(exe)
            .args(args)
            .envs(env.iter().cloned())
            .env("CANDLE_NUM_THREADS", "1")
            .output()
            .with_context(|| format!("tenax {}", args[0]))?;
        if !o.status.success() {
            bail!(
                "tenax {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    };
    let reference = out.join("reference");
    let _ = std::fs::remove_dir_all(&reference);
    // The unsplit model on one rank: the oracle whatever the job's ranks and stages.
    let mut args = vec!["train".to_string()];
    let mut flags = train_flags(s, data);
    if let Some(i) = flags.iter().position(|f| f == "--steps") {
        if let Some(v) = flags.get_mut(i + 1) {
            *v = steps.to_string();
        }
    }
    args.extend(tenax_chaos::scenario::without_pipeline_flags(&flags));
    args.extend([
        "--ranks".into(),
        "1".into(),
        "--run-dir".into(),
        reference.to_string_lossy().into_owned(),
    ]);
    run_cmd(&args, &[])?;
    let want_path = out.join("reference.safetensors");
    run_cmd(
        &[
            "ckpt".into(),
            "export".into(),
            format!("file://{}", reference.join("checkpoints").display()),
            "--out".into(),
            want_path.to_string_lossy().into_owned(),
        ],
        &[],
    )?;
    let got_path = out.join("final.safetensors");
    run_cmd(
        &[
            "ckpt".into(),
            "export".into(),
            format!("{}/{job}", c.store_url()),
            "--out".into(),
            got_path.to_string_lossy().into_owned(),
        ],
        &c.s3_env(),
    )?;
    let want = std::fs::read(&want_path)?;
    let got = std::fs::read(&got_path)?;
    let _ = std::fs::remove_dir_all(&reference);
    Ok(if want == got {
        FinalComparison {
            identical: true,
            detail: format!(
                "the job's final checkpoint (step {}) exports to the same {} bytes as a fault-free `tenax train --ranks 1`",
                steps,
                got.len()
            ),
        }
    } else {
        let at = want.iter().zip(&got).position(|(a, b)| a != b);
        FinalComparison {
            identical: false,
            detail: format!(
                "the job's final weights ({} bytes) differ from a fault-free `tenax train --ranks 1` ({} bytes){}",
                got.len(),
                want.len(),
                at.map(|i| format!(", first at byte {i}")).unwrap_or_default()
            ),
        }
    })
}

pub(super) fn timeline(path: &Path, name: &str, seed: u64, h: &History) -> Result<()> {
    use crate::plot::{TimelineFault, TimelineGeneration, TimelineLoss};
    let t0 = h.steps.iter().map(|s| s.t_ms).min().unwrap_or(h.started_ms);
    let secs = |t: u64| (t as f64 - t0 as f64) / 1000.0;
    let losses: Vec<TimelineLoss> = h
        .steps
        .iter()
        .map(|s| TimelineLoss {
            t_s: secs(s.t_ms),
            loss: s.loss,
            node: s.node,
        })
        .collect();
    let faults: Vec<TimelineFault> = h
        .faults
        .iter()
        .map(|f| TimelineFault {
            start_s: secs(f.start_ms),
            end_s: secs(f.end_ms),
            label: format!(
                "{}{}",
                f.kind,
                f.node
                    .into_iter()
                    .chain(f.nodes.iter().copied())
                    .map(|n| format!(" n{n}"))
                    .collect::<String>()
            ),
        })
        .collect();
    let mut seen = BTreeMap::new();
    for s in &h.steps {
        let t = seen.entry(s.generation).or_insert(s.t_ms);
        *t = (*t).min(s.t_ms);
    }
    let generations: Vec<TimelineGeneration> = seen
        .iter()
        .map(|(&g, &t)| TimelineGeneration {
            t_s: secs(t),
            generation: g,
        })
        .collect();
    crate::plot::plot_timeline(
        path,
        &format!("tenax chaos: {name}, seed {seed}"),
        &losses,
        &faults,
        &generations,
    )
}

pub(super) fn print_summary(r: &tenax_chaos::report::Report, out: &Path) {
    for (name, v) in &r.invariants {
        println!(
            "{:8}  {name}: {}",
            if v.is_held() { "held" } else { "VIOLATED" },
            v.evidence
        );
    }
    for e in &r.harness_errors {
        println!("error     {e}");
    }
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    println!(
        "faults {:?}; recovery p50 {} s, p99 {} s; steps lost {}; goodput {} (lost-time accounting{}); wall {:.1} s",
        r.faults_injected,
        fmt(r.recovery_s_p50),
        fmt(r.recovery_s_p99),
        r.steps_lost,
        r.goodput
            .map(|g| format!("{:.1}%", g * 100.0))
            .unwrap_or_else(|| "-".into()),
        r.lost_time
            .as_ref()
            .map(|l| format!(
                ": stalls {:.1} s, slow {:.1} s, {} redone steps {:.2} s",
                l.stall_s, l.slow_s, l.redone_steps, l.redone_s
            ))
            .unwrap_or_default(),
        r.wall_s
    );
    if let Some(g) = &r.reference_goodput {
        println!(
            "goodput against {} fault-free reference runs (unclamped; above 1 can be real on a shared machine): min {:.3}, median {:.3}, max {:.3}",
            g.runs, g.min, g.median, g.max
        );
    }
    println!(
        "{}: report in {}",
        if r.passed { "PASSED" } else { "FAILED" },
        out.join("report.md").display()
    );
}

/// `tenax chaos report`.
pub fn report(a: ChaosReportArgs) -> Result<()> {
    let read = |name: &str| -> Result<serde_json::Value> {
        let p = a.dir.join(name);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: cannot read it; give the --out directory of a `tenax chaos run`",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))
    };
    let old = read("report.json")?;
    let history: History = serde_json::from_value(read("history.json")?).with_context(|| {
        format!(
            "{}: not a chaos history",
            a.dir.join("history.json").display()
        )
    })?;
    let name = old["scenario"].as_str().unwrap_or("scenario").to_string();
    let seed = old["seed"].as_u64().unwrap_or(0);
    let names: Vec<String> = old["invariants"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let errors: Vec<String> = old["harness_errors"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let verdicts = tenax_chaos::invariants::check(&history, &names);
    let report = tenax_chaos::report::build(&name, seed, &history, verdicts, errors);
    std::fs::write(
        a.dir.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(a.dir.join("report.md"), report.markdown(&history))?;
    if let Err(e) = timeline(&a.dir.join("timeline.png"), &name, seed, &history) {
        eprintln!("warning: {e:#}");
    }
    print_summary(&report, &a.dir);
    if report.passed {
        Ok(())
    } else {
        bail!(
            "chaos run {name} (seed {seed}) failed; see {}",
            a.dir.join("report.md").display()
        )
    }
}

/// One fault-free run of the scenario on a fresh cluster (the reference goodput): its
/// wall time, measured like the faulted run's ([`tenax_chaos::report::lost_time`]).
/// A run that fails is reported, not fatal: it counts as not finished.
pub(super) async fn reference_run(
    scenario: &Scenario,
    exe: &Path,
    data: &Path,
    job: &str,
    order: usize,
    of: usize,
) -> ReferenceRun {
    let bar = spinner(&format!(
        "fault-free reference run (run {} of {})",
        order + 1,
        of + 1
    ));
    let result: Result<ReferenceRun> = async {
        let h = start_harness(scenario, &[], 0, exe, data, job)?;
        let sh = tokio::sync::Mutex::new(h);
        let outcome = drive(&sh, scenario, &[]).await;
        let h = sh.into_inner();
        let mut history = History {
            target_step: scenario.train.steps,
            ..History::default()
        };
        for n in 0..h.nodes {
            history.steps.extend(read_node_logs(n, &h.c.run_dir(n)).0);
        }
        let newest = history.steps.iter().map(|s| s.step).max().unwrap_or(0);
        let wall_s = tenax_chaos::report::lost_time(&history).map_or(0.0, |l| l.wall_s);
        if let Err(e) = &outcome {
            println!("reference run {order}: {e:#}");
        }
        for e in &h.errors {
            println!("reference run {order}: {e}");
        }
        // A run sized by time ends when its time is up, not at the target step.
        let reached = scenario.run.stop_after_s.is_some() || newest >= scenario.train.steps;
        Ok(ReferenceRun {
            order,
            wall_s,
            steps: tenax_chaos::report::lineage_steps(&history),
            finished: outcome.is_ok() && h.errors.is_empty() && newest > 0 && reached,
            resources: tenax_chaos::resources::segments(&h.resources),
        })
    }
    .await;
    bar.finish_and_clear();
    let r = result.unwrap_or_else(|e| {
        println!("reference run {order}: {e:#}");
        ReferenceRun {
            order,
            wall_s: 0.0,
            steps: 0,
            finished: false,
            resources: Vec::new(),
        }
    });
    println!(
        "reference run {} of {}: {}{} steps in {:.1} s",
        order + 1,
        of + 1,
        if r.finished { "" } else { "DID NOT FINISH, " },
        r.steps,
        r.wall_s
    );
    r
}

//! `tenax chaos run SCENARIO --seed S --out DIR` and `tenax chaos up --nodes N`.
//!
//! `run` starts a real local cluster (etcd, an S3-compatible server, N daemon processes),
//! injects the scenario's faults from a seeded schedule ([`tenax_chaos::schedule`]), each
//! at its own time whatever the others do (faults overlap), records a history (every node's step log and state events,
//! every plan and checkpoint record etcd accepted, every fault), verifies every committed
//! checkpoint, compares the final parameters with a fault-free `tenax train` of the same
//! config, checks the invariants ([`tenax_chaos::invariants`]) and writes `report.json`,
//! `report.md`, `history.json`, `schedule.json` and `timeline.png` into DIR. It exits 0
//! only when every invariant held.
//!
//! Faults and how they are made:
//! - kill: SIGKILL by PID, the node started again after `restart_after_s`;
//! - hang: SIGSTOP, SIGCONT after `duration_s`; slow: SIGSTOP/SIGCONT duty cycles;
//! - partition: each daemon advertises a TCP fault proxy in front of its gRPC port and
//!   reaches etcd through another ([`TcpFaultProxy`]); the fault blackholes, drops or
//!   delays them;
//! - s3: the daemons reach S3 through an HTTP fault proxy ([`FaultProxy`]): errors,
//!   dropped connections and latency;
//! - etcd_restart, etcd_down: etcd killed and started again on the same data;
//! - kill_in_upload: S3 latency so an upload lasts, then SIGKILL of the checkpoint writer
//!   (rank 0) as soon as the proxy sees it write;
//! - group: several daemons SIGKILLed and (`etcd = true`) etcd stopped at one instant, all
//!   back after `restart_after_s` (a rack).
//!
//! Faults in flight at once share the harness behind one lock, held only for each quick
//! action. Overlapping faults on one proxy take the strongest setting of each
//! (`ProxyFaults::strongest`, `TcpFault::strongest`); etcd starts again when the last
//! fault holding it down ends. "leader", "non-leader" and the checkpoint writer come from
//! the daemons' own `Control.Status` ([`tenax_chaos::roles`]), so they resolve while etcd
//! is down; through etcd (`tenax status`) only when no daemon answers. With
//! `--reference-runs N`, N fault-free runs of the same scenario on fresh clusters are
//! interleaved with the faulted one (half before, half after) for the reference goodput.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tenax_chaos::cluster::{ClusterSpec, LocalCluster, Signal};
use tenax_chaos::history::{
    read_node_logs, CommitEntry, FinalComparison, History, InjectedFault, PlanEntry, ReferenceRun,
};
use tenax_chaos::resources::{sample_pid, ResourceSample, SAMPLE_EVERY};
use tenax_chaos::roles::{pick_roles, NodeStatus, Roles};
use tenax_chaos::scenario::{FaultKind, PartitionFrom, PartitionMode, Scenario};
use tenax_chaos::schedule::{resolve_group, schedule, PlannedFault, Target, Trigger};
use tenax_chaos::{FaultProxy, ProxyFaults, TcpFault, TcpFaultProxy};
use tenax_storage::now_unix_ms;
use tonic::transport::ClientTlsConfig;

mod faults;
mod harness;
mod results;
mod signals;

use faults::{run_fault, wait_until};
use harness::{
    drive, roles_from_etcd, start_harness, train_flags, Harness, Shared, EXIT_WAIT, STATUS_TIMEOUT,
};
pub use results::report;
use results::{compare_with_reference, etcd_history, print_summary, reference_run, timeline};
use signals::StopSignals;

/// `tenax chaos` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ChaosCommand {
    /// Run a scenario file against a fresh local cluster and check its invariants.
    ///
    /// Prints `seed S` first; the same seed replays the same fault schedule. Writes
    /// report.json, report.md, history.json, schedule.json and timeline.png into --out.
    /// Exits 0 only if every invariant held. Needs etcd and moto_server (scripts/setup).
    /// Ctrl-C or SIGTERM stops every process it started and ends it without a report.
    Run(ChaosRunArgs),
    /// Start a local cluster (etcd, S3, N daemons) and leave it running for a demo.
    ///
    /// Prints how to watch it (`tenax status`, /metrics, logs) and how to stop it.
    /// Stops by itself after --for-s.
    Up(ChaosUpArgs),
    /// Check a finished run's history.json again and rewrite its report (report.json,
    /// report.md, timeline.png): after a change to the checker or the report.
    Report(ChaosReportArgs),
}

/// Flags of `tenax chaos report`.
#[derive(clap::Args, Debug)]
pub struct ChaosReportArgs {
    /// The --out directory of a `tenax chaos run`.
    pub dir: PathBuf,
}

/// Flags of `tenax chaos run`.
#[derive(clap::Args, Debug)]
pub struct ChaosRunArgs {
    /// The scenario file (TOML; see chaos/scenarios/).
    pub scenario: PathBuf,
    /// Seed of the fault schedule (default: drawn from the clock, and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the report goes (default: chaos-out/<scenario>-<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only print the schedule the seed gives, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Fault-free runs of the same scenario (same cluster, no faults), interleaved with
    /// the faulted one (half before it, half after), for the goodput against a reference:
    /// the faulted run's steps per second over theirs (for a scenario sized in steps, their
    /// wall time over the faulted run's), reported unclamped with min/median/max. Each
    /// costs about one fault-free run of the job; 0 (the default) skips it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub reference_runs: usize,
    /// For a scenario sized by time (`run.stop_after_s`): how long each reference run
    /// trains, in seconds from its first step (default: as long as the faulted run).
    #[arg(long, value_name = "SECONDS", requires = "reference_runs")]
    pub reference_s: Option<f64>,
}

/// Flags of `tenax chaos up`.
#[derive(clap::Args, Debug)]
pub struct ChaosUpArgs {
    /// Daemons.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Text to train on (default: a small synthetic corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Stop everything after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub for_s: u64,
}

/// How often the harness polls the daemons' logs.
const POLL: Duration = Duration::from_millis(50);

/// The most versions of a key read back from etcd.
const MAX_ETCD_VERSIONS: usize = 100_000;

/// How many `tenax ckpt verify` processes run at once.
const VERIFY_PARALLEL: usize = 4;

/// `tenax chaos run`. Ctrl-C or SIGTERM stops every process the run started (daemons,
/// etcd, the S3 server) and ends it without a report.
pub async fn run(a: ChaosRunArgs) -> Result<()> {
    let mut signals = StopSignals::new()?;
    let out = a.out.clone();
    tokio::select! {
        r = run_to_end(a) => r,
        signal = signals.recv() => {
            // Dropping the run's future drops its clusters and servers: they stop their
            // own children, by PID.
            bail!(
                "chaos run: {signal}: stopped every process it started; no report written{}",
                out.map(|o| format!(" (schedule and logs so far in {})", o.display()))
                    .unwrap_or_default()
            )
        }
    }
}

async fn run_to_end(a: ChaosRunArgs) -> Result<()> {
    let seed = a.seed.unwrap_or_else(|| now_unix_ms() % 1_000_000);
    println!("seed {seed}");
    let text = std::fs::read_to_string(&a.scenario).with_context(|| {
        format!(
            "{}: cannot read the scenario file (see chaos/scenarios/ for examples)",
            a.scenario.display()
        )
    })?;
    let scenario = Scenario::parse(&text, &a.scenario.display().to_string())?;
    // A hook in the daemons' environment that this build lacks: fail here, not in every
    // daemon (whose exits the run would report as faults).
    crate::hooks::check_env(
        scenario.daemon.env.keys().map(String::as_str),
        crate::hooks::compiled(),
    )
    .map_err(|e| anyhow!("{}: [daemon] env: {e}", a.scenario.display()))?;
    let name = if scenario.name.is_empty() {
        a.scenario
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into())
    } else {
        scenario.name.clone()
    };
    // The reference runs: the scenario without faults, for a run sized by time stopped
    // after --reference-s.
    let mut reference = scenario.clone();
    match (a.reference_s, scenario.run.stop_after_s) {
        (Some(s), Some(_)) if s.is_finite() && s > 0.0 => reference.run.stop_after_s = Some(s),
        (Some(s), Some(_)) => bail!("--reference-s {s}: give a positive number of seconds"),
        (Some(_), None) => bail!(
            "{}: --reference-s is for scenarios sized by time (run.stop_after_s); this one runs {} steps, and so do its reference runs",
            a.scenario.display(),
            scenario.train.steps
        ),
        (None, _) => {}
    }
    let plan = schedule(&scenario, seed);
    if a.dry_run {
        // Written, not printed: `| head` closing the pipe ends the listing, not a panic.
        let mut stdout = std::io::stdout().lock();
        for f in &plan {
            match writeln!(stdout, "{}", serde_json::to_string(f)?) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                r => r.context("writing the schedule to stdout")?,
            }
        }
        return Ok(());
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("chaos-out/{name}-{seed}")));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("--out {}: cannot create it", out.display()))?;
    std::fs::write(out.join("schedule.json"), serde_json::to_vec_pretty(&plan)?)
        .with_context(|| format!("{}: cannot write", out.join("schedule.json").display()))?;
    println!(
        "scenario {name}: {} nodes, {} steps, {} faults scheduled; report in {}",
        scenario.cluster.nodes,
        scenario.train.steps,
        plan.len(),
        out.display()
    );

    let data =
        crate::bench::corpus_or_synthetic(scenario.train.data.as_deref().map(Path::new), &out)?;
    let exe = std::env::current_exe().context("the tenax binary")?;
    let job = format!("chaos-{name}");
    let nodes = scenario.cluster.nodes;
    // Fault-free reference runs around the faulted one: half before, half after.
    let refs_before = a.reference_runs.div_ceil(2);
    let mut reference_runs = Vec::with_capacity(a.reference_runs);
    for order in 0..refs_before {
        reference_runs
            .push(reference_run(&reference, &exe, &data, &job, order, a.reference_runs).await);
    }
    let h = start_harness(&scenario, &plan, seed, &exe, &data, &job)?;
    let sh = tokio::sync::Mutex::new(h);
    let started_ms = now_unix_ms();
    let outcome = drive(&sh, &scenario, &plan).await;
    let ended_ms = now_unix_ms();
    let mut h = sh.into_inner();
    if let Err(e) = &outcome {
        h.errors.push(format!("{e:#}"));
    }
    // Logs for the record, whatever happened.
    for n in 0..nodes {
        let _ = std::fs::write(out.join(format!("node-{n}.log")), h.c.log(n));
    }
    let mut history = History {
        nodes,
        target_step: scenario.train.steps,
        batch_size: scenario.train.batch_size,
        slots: scenario.slots(),
        started_ms,
        ended_ms,
        faults: std::mem::take(&mut h.faults),
        faulted_run_order: refs_before,
        resources: std::mem::take(&mut h.resources),
        stopped_by_time: scenario.run.stop_after_s.is_some(),
        ..History::default()
    };
    history.faults.sort_by_key(|f| (f.start_ms, f.index));
    for n in 0..nodes {
        let (steps, states) = read_node_logs(n, &h.c.run_dir(n));
        history.steps.extend(steps);
        history.states.extend(states);
    }
    if h.c.etcd().pid().is_none() {
        let _ = h.c.etcd().restart();
    }
    match etcd_history(&h.c.etcd_endpoint(), &job).await {
        Ok((plans, commits)) => {
            history.plans = plans;
            history.commits = commits;
            if history.stopped_by_time {
                // Sized by time: the target is what the job committed when it was stopped.
                history.target_step = history.commits.iter().map(|c| c.step).max().unwrap_or(0);
            }
        }
        Err(e) => h.errors.push(format!("reading etcd's history: {e:#}")),
    }
    let s3_env = h.c.s3_env();
    let bar = spinner(&format!(
        "verifying {} committed checkpoints",
        history.commits.len()
    ));
    for batch in history.commits.chunks_mut(VERIFY_PARALLEL) {
        let children = batch
            .iter()
            .map(|commit| {
                std::process::Command::new(&exe)
                    .args(["ckpt", "verify", &commit.url])
                    .envs(s3_env.iter().cloned())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .context("tenax ckpt verify")
            })
            .collect::<Result<Vec<_>>>()?;
        for (commit, child) in batch.iter_mut().zip(children) {
            let out = child.wait_with_output().context("tenax ckpt verify")?;
            commit.verified = Some(out.status.success());
            if !out.status.success() {
                commit.verify_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
            }
        }
    }
    bar.finish_and_clear();
    let finished = history.target_step > 0
        && history
            .commits
            .iter()
            .any(|c| c.step >= history.target_step);
    // The fault-free replay costs as long as the job: only when the scenario checks it.
    let compare = scenario
        .invariants()
        .contains(&"final_params_match_fault_free");
    if finished && compare {
        let bar = spinner("training the fault-free reference (tenax train)");
        history.final_params = Some(
            compare_with_reference(
                &exe,
                &scenario,
                history.target_step,
                &data,
                &out,
                &h.c,
                &job,
            )
            .unwrap_or_else(|e| FinalComparison {
                identical: false,
                detail: format!("could not compare: {e:#}"),
            }),
        );
        bar.finish_and_clear();
    }
    drop(h.s3_proxy.take());
    let errors = std::mem::take(&mut h.errors);
    drop(h);
    for order in refs_before + 1..=a.reference_runs {
        reference_runs
            .push(reference_run(&reference, &exe, &data, &job, order, a.reference_runs).await);
    }
    history.reference_runs = reference_runs;

    let verdicts = tenax_chaos::invariants::check(&history, &scenario.invariants());
    let report = tenax_chaos::report::build(&name, seed, &history, verdicts, errors);
    std::fs::write(out.join("history.json"), serde_json::to_vec(&history)?)?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(out.join("report.md"), report.markdown(&history))?;
    if let Err(e) = timeline(&out.join("timeline.png"), &name, seed, &history) {
        eprintln!("warning: {e:#}");
    }
    print_summary(&report, &out);
    if report.passed {
        Ok(())
    } else {
        let violated: Vec<&str> = report
            .invariants
            .iter()
            .filter(|(_, v)| !v.is_held())
            .map(|(n, _)| n.as_str())
            .collect();
        bail!(
            "chaos run {name} (seed {seed}) failed: {}{}; see {}",
            if violated.is_empty() {
                String::new()
            } else {
                format!("invariants violated: {}", violated.join(", "))
            },
            if report.harness_errors.is_empty() {
                String::new()
            } else {
                format!(
                    "{}harness errors: {}",
                    if violated.is_empty() { "" } else { "; " },
                    report.harness_errors.len()
                )
            },
            out.join("report.md").display()
        )
    }
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `tenax chaos up`.
pub async fn up(a: ChaosUpArgs) -> Result<()> {
    let mut signals = StopSignals::new()?;
    if !(1..=tenax_chaos::scenario::MAX_NODES).contains(&a.nodes) {
        bail!(
            "--nodes {}: use 1 to {}",
            a.nodes,
            tenax_chaos::scenario::MAX_NODES
        );
    }
    let tmp = tempfile::tempdir().context("temp dir")?;
    let data = crate::bench::corpus_or_synthetic(a.data.as_deref(), tmp.path())?;
    let exe = std::env::current_exe().context("the tenax binary")?;
    let job = "demo".to_string();
    let mut c = LocalCluster::start(ClusterSpec {
        tenax_bin: exe.clone(),
        job: job.clone(),
        bucket: "tenax-demo".into(),
        tls: true,
        daemon_args: [
            "--preset",
            &a.preset,
            "--data",
            &data.to_string_lossy(),
            "--tokenizer",
            "char",
            "--steps",
            "1000000",
            "--ckpt-every",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: vec![("CANDLE_NUM_THREADS".into(), "1".into())],
    })
    .map_err(|e| {
        anyhow!("starting etcd and the S3 server: {e} (scripts/setup installs etcd-server and moto[server])")
    })?;
    for n in 0..a.nodes {
        c.spawn_daemon(n, &["--start-nodes".into(), a.nodes.to_string()])?;
    }
    let etcd = c.etcd_endpoint();
    println!(
        "a local tenax cluster is up: job {job}, {} daemons, etcd {etcd}",
        a.nodes
    );
    println!();
    println!("watch it:");
    // Mutual TLS: status takes the cluster's operator certificate.
    let operator = c.operator_tls_args().join(" ");
    println!("  tenax status --etcd {etcd} --job {job} {operator}");
    for n in 0..a.nodes {
        println!(
            "  node-{n}: pid {}, log {}, metrics http://{}/metrics",
            c.pid(n).unwrap_or(0),
            c.log_path(n).display(),
            c.metrics_addr(n).unwrap_or_default()
        );
    }
    println!();
    println!("break it (from another shell):");
    println!(
        "  kill -9 {}        # a crash; the others re-form without it",
        c.pid(a.nodes - 1).unwrap_or(0)
    );
    println!(
        "  tenax control drain --etcd {etcd} --job {job} --node node-0 {operator}   # a graceful leave"
    );
    println!("  checkpoints: AWS_ENDPOINT={} AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing tenax ckpt list {}/{job}", c.s3().endpoint(), c.store_url());
    println!();
    println!(
        "stop it: Ctrl-C here (or kill {}); it stops by itself after {} s. Everything it started goes with it.",
        std::process::id(),
        a.for_s
    );
    tokio::select! {
        signal = signals.recv() => println!("{signal}: stopping"),
        _ = tokio::time::sleep(Duration::from_secs(a.for_s)) => println!("--for-s {} passed: stopping", a.for_s),
    }
    c.kill_all();
    Ok(())
}

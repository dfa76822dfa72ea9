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
mod results;
mod signals;

use faults::{run_fault, wait_until};
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

/// How long the harness waits for the daemons to exit once the faults are over, at least.
const FINISH_MIN: Duration = Duration::from_secs(120);

/// The training flags of a scenario (the daemons' and the reference run's).
fn train_flags(s: &Scenario, data: &Path) -> Vec<String> {
    let t = &s.train;
    let mut v: Vec<String> = vec![
        "--preset".into(),
        t.preset.clone(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--tokenizer".into(),
        "char".into(),
        "--batch-size".into(),
        t.batch_size.to_string(),
        "--micro-batch-size".into(),
        t.micro_batch_size.to_string(),
        "--steps".into(),
        t.steps.to_string(),
        "--ckpt-every".into(),
        t.ckpt_every.to_string(),
    ];
    v.extend(t.args.iter().cloned());
    v
}

fn daemon_flags(s: &Scenario) -> Vec<String> {
    let d = &s.daemon;
    let mut v: Vec<String> = vec![
        "--lease-ttl-s".into(),
        d.lease_ttl_s.to_string(),
        "--settle-ms".into(),
        d.settle_ms.to_string(),
        "--suspect-after-ms".into(),
        d.suspect_after_ms.to_string(),
    ];
    v.extend(d.args.iter().cloned());
    v
}

/// The leader's and rank 0's node index, from `tenax status --json` (with the cluster's
/// operator certificate: `tls`): through etcd, the fallback when no daemon answers
/// directly.
fn roles_from_etcd(exe: &Path, etcd: &str, job: &str, tls: &[String]) -> Roles {
    let Ok(out) = std::process::Command::new(exe)
        .args([
            "status",
            "--etcd",
            etcd,
            "--job",
            job,
            "--json",
            "--timeout-s",
            "2",
        ])
        .args(tls)
        .output()
    else {
        return Roles::default();
    };
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Roles::default();
    };
    let index = |m: &serde_json::Value| -> Option<usize> {
        m["id"].as_str()?.strip_prefix("node-")?.parse().ok()
    };
    let members = status["members"].as_array().cloned().unwrap_or_default();
    Roles {
        leader: members.iter().find(|m| m["leader"] == true).and_then(index),
        rank0: members
            .iter()
            .find(|m| m["rank"].as_u64() == Some(0))
            .and_then(index),
    }
}

/// How long the harness waits for a daemon's own `Control.Status`.
const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long the harness waits for a SIGKILLed daemon to exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The running harness: the cluster, its proxies, and what it injected. The faults in
/// flight share it ([`Shared`]), each holding the lock only for its quick actions, so
/// that every fault starts at its own time whatever the others do.
struct Harness {
    /// The cluster.
    c: LocalCluster,
    /// The tenax binary (for `tenax status` through etcd).
    exe: PathBuf,
    /// The job's name.
    job: String,
    /// Daemons.
    nodes: usize,
    /// A fault proxy in front of each daemon's gRPC port (partition scenarios).
    peer_proxies: Vec<TcpFaultProxy>,
    /// A fault proxy in front of etcd per daemon (partition scenarios).
    etcd_proxies: Vec<TcpFaultProxy>,
    /// The HTTP fault proxy in front of S3 (s3 and kill_in_upload scenarios).
    s3_proxy: Option<FaultProxy>,
    /// Extra environment per daemon start (S3 through the proxy).
    env: Vec<(String, String)>,
    /// TLS to the daemons' Control service (the cluster's operator certificate).
    tls: Option<ClientTlsConfig>,
    /// S3 faults in flight, by fault index; the proxy gets the strongest setting of each.
    s3_layers: BTreeMap<usize, ProxyFaults>,
    /// TCP faults in flight per proxy, `(node, etcd side)` -> fault index -> fault; the
    /// proxy gets the strongest.
    tcp_layers: BTreeMap<(usize, bool), BTreeMap<usize, TcpFault>>,
    /// Faults holding etcd down; it starts again when the last one lets go.
    etcd_holds: BTreeSet<usize>,
    /// Daemons a fault killed and has not started again (their exit is no job end).
    down: BTreeSet<usize>,
    /// Faults injected.
    faults: Vec<InjectedFault>,
    /// Problems of the run itself.
    errors: Vec<String>,
    /// The run's end at the latest.
    deadline: Instant,
    /// Every daemon's RSS and open fds, sampled every
    /// [`tenax_chaos::resources::SAMPLE_EVERY`] while the run is driven.
    resources: Vec<ResourceSample>,
}

/// The harness as the faults in flight share it.
type Shared = tokio::sync::Mutex<Harness>;

impl Harness {
    fn spawn(&mut self, node: usize, first: bool) -> Result<()> {
        let mut extra = Vec::new();
        if first {
            extra.extend(["--start-nodes".to_string(), self.nodes.to_string()]);
        }
        if let Some(p) = self.peer_proxies.get(node) {
            extra.extend(["--advertise-addr".to_string(), p.addr().to_string()]);
        }
        self.c
            .spawn_daemon_env(node, &extra, &self.env)
            .with_context(|| format!("starting node-{node}"))?;
        if let (Some(p), Some(addr)) = (self.peer_proxies.get(node), self.c.listen_addr(node)) {
            p.set_upstream(addr.parse().context("the daemon's listen address")?);
        }
        self.down.remove(&node);
        Ok(())
    }

    /// The newest step any node logged.
    fn newest_step(&self) -> Option<u64> {
        (0..self.nodes)
            .flat_map(|n| read_node_logs(n, &self.c.run_dir(n)).0)
            .map(|s| s.step)
            .max()
    }

    /// Whether every node runs and logged at least 2 steps in the newest generation.
    fn steady(&self) -> bool {
        let per: Vec<_> = (0..self.nodes)
            .map(|n| read_node_logs(n, &self.c.run_dir(n)).0)
            .collect();
        let Some(g) = per
            .iter()
            .filter_map(|l| l.last().map(|s| s.generation))
            .max()
        else {
            return false;
        };
        (0..self.nodes).all(|n| self.c.pid(n).is_some())
            && per.iter().all(|l| {
                l.last().map(|s| s.generation) == Some(g)
                    && l.iter().filter(|s| s.generation == g).count() >= 2
            })
    }

    /// Whether a daemon exited that no fault killed (the job reached its target, or
    /// failed).
    fn job_ended(&mut self) -> bool {
        (0..self.nodes).any(|n| {
            !self.down.contains(&n) && matches!(self.c.wait(n, Duration::ZERO), Ok(Some(_)))
        })
    }

    /// Sets (`Some`) or lifts (`None`) fault `index`'s layer on the S3 proxy.
    fn s3_layer(&mut self, index: usize, faults: Option<ProxyFaults>) -> Result<()> {
        let p = self
            .s3_proxy
            .as_ref()
            .ok_or_else(|| anyhow!("no S3 proxy"))?;
        match faults {
            Some(f) => self.s3_layers.insert(index, f),
            None => self.s3_layers.remove(&index),
        };
        p.set_faults(ProxyFaults::strongest(self.s3_layers.values()));
        Ok(())
    }

    /// Sets (`Some`) or lifts (`None`) fault `index`'s layer on node `node`'s peer
    /// (`etcd` false) or etcd proxy.
    fn tcp_layer(&mut self, node: usize, etcd: bool, index: usize, fault: Option<TcpFault>) {
        let layers = self.tcp_layers.entry((node, etcd)).or_default();
        match fault {
            Some(f) => layers.insert(index, f),
            None => layers.remove(&index),
        };
        let now = TcpFault::strongest(layers.values().copied());
        let proxy = if etcd {
            self.etcd_proxies.get(node)
        } else {
            self.peer_proxies.get(node)
        };
        if let Some(p) = proxy {
            p.set_fault(now);
        }
    }

    /// Fault `index` holds etcd down (it stops with the first hold).
    fn etcd_hold(&mut self, index: usize) -> Result<()> {
        let first = self.etcd_holds.is_empty();
        self.etcd_holds.insert(index);
        if first {
            self.c.etcd().stop().context("stopping etcd")?;
        }
        Ok(())
    }

    /// Fault `index` lets etcd go (it starts again with the last release).
    fn etcd_release(&mut self, index: usize) -> Result<()> {
        self.etcd_holds.remove(&index);
        if self.etcd_holds.is_empty() {
            self.c.etcd().restart().context("starting etcd again")?;
        }
        Ok(())
    }

    /// SIGKILL of `node`; it counts as down until started again.
    fn kill(&mut self, node: usize) -> Result<()> {
        self.c.signal(node, Signal::Kill)?;
        self.down.insert(node);
        Ok(())
    }
}

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

/// The cluster's operator certificate as a client TLS configuration for the daemons'
/// Control service (`None` without TLS).
fn operator_tls(c: &LocalCluster) -> Result<Option<ClientTlsConfig>> {
    let args = c.operator_tls_args();
    let get = |flag: &str| {
        args.iter()
            .position(|x| x == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    crate::certs::ClientTlsArgs {
        tls_ca: get("--tls-ca"),
        tls_cert: get("--tls-cert"),
        tls_key: get("--tls-key"),
    }
    .client()
}

/// A fresh local cluster for `scenario` (etcd, S3, no daemon started yet) with the fault
/// proxies `plan` needs (none for a reference run).
fn start_harness(
    scenario: &Scenario,
    plan: &[PlannedFault],
    seed: u64,
    exe: &Path,
    data: &Path,
    job: &str,
) -> Result<Harness> {
    let mut daemon_args = train_flags(scenario, data);
    daemon_args.extend(daemon_flags(scenario));
    let mut c = LocalCluster::start(ClusterSpec {
        tenax_bin: exe.to_path_buf(),
        job: job.to_string(),
        bucket: "tenax-chaos".into(),
        daemon_args,
        env: std::iter::once(("CANDLE_NUM_THREADS".to_string(), "1".to_string()))
            .chain(scenario.daemon.env.clone())
            .collect(),
        // The harness runs mutual TLS: a throwaway CA per cluster.
        tls: true,
    })
    .map_err(|e| {
        anyhow!("starting etcd and the S3 server: {e} (scripts/setup installs etcd-server and moto[server])")
    })?;
    let nodes = scenario.cluster.nodes;
    let kinds: Vec<FaultKind> = plan.iter().map(|f| f.kind).collect();
    let needs_s3_proxy = kinds
        .iter()
        .any(|k| matches!(k, FaultKind::S3 | FaultKind::KillInUpload));
    let needs_tcp = kinds.contains(&FaultKind::Partition);
    let mut env = Vec::new();
    let s3_proxy = if needs_s3_proxy {
        let p = FaultProxy::start(c.s3().addr(), ProxyFaults::default(), seed)
            .context("starting the S3 fault proxy")?;
        env.push(("AWS_ENDPOINT".to_string(), p.endpoint()));
        Some(p)
    } else {
        None
    };
    let mut peer_proxies = Vec::new();
    let mut etcd_proxies = Vec::new();
    if needs_tcp {
        let etcd_addr: std::net::SocketAddr = c.etcd().addr();
        for n in 0..nodes {
            peer_proxies.push(TcpFaultProxy::start(None).context("starting a TCP proxy")?);
            let e = TcpFaultProxy::start(Some(etcd_addr)).context("starting a TCP proxy")?;
            c.set_node_etcd(n, Some(format!("http://{}", e.addr())));
            etcd_proxies.push(e);
        }
    }
    let tls = operator_tls(&c).context("the cluster's operator certificate")?;
    Ok(Harness {
        c,
        exe: exe.to_path_buf(),
        job: job.to_string(),
        nodes,
        peer_proxies,
        etcd_proxies,
        s3_proxy,
        env,
        tls,
        s3_layers: BTreeMap::new(),
        tcp_layers: BTreeMap::new(),
        etcd_holds: BTreeSet::new(),
        down: BTreeSet::new(),
        faults: Vec::new(),
        errors: Vec::new(),
        deadline: Instant::now() + Duration::from_secs(scenario.run.timeout_s),
        resources: Vec::new(),
    })
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Drives the run ([`drive_faults`]) while sampling every daemon's RSS and open fds
/// every [`SAMPLE_EVERY`] into the harness (until the run ends, at most until its
/// deadline).
async fn drive(sh: &Shared, scenario: &Scenario, plan: &[PlannedFault]) -> Result<()> {
    let done = std::sync::atomic::AtomicBool::new(false);
    let run = async {
        let r = drive_faults(sh, scenario, plan).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let sample = async {
        // Bounded by count (the run's timeout over the period) and by the deadline.
        let rounds = scenario.run.timeout_s / SAMPLE_EVERY.as_secs().max(1) + 2;
        for _ in 0..rounds {
            if done.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            {
                let mut h = sh.lock().await;
                if Instant::now() >= h.deadline {
                    break;
                }
                let t_ms = now_unix_ms();
                for node in 0..h.nodes {
                    let Some(pid) = h.c.pid(node) else { continue };
                    if let Some((rss_bytes, fds)) = sample_pid(pid) {
                        h.resources.push(ResourceSample {
                            node,
                            pid,
                            t_ms,
                            rss_bytes,
                            fds,
                        });
                    }
                }
            }
            // Sleep a period in short pieces, to stop soon after the run ends.
            let until = Instant::now() + SAMPLE_EVERY;
            while Instant::now() < until && !done.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (r, ()) = tokio::join!(run, sample);
    r
}

/// Starts the daemons, waits for a steady cluster, injects every fault at its own time
/// (faults in flight at once overlap), waits for the job to end: at its target step, or,
/// with `run.stop_after_s`, stopped by the harness when the time is up.
async fn drive_faults(sh: &Shared, scenario: &Scenario, plan: &[PlannedFault]) -> Result<()> {
    {
        let mut h = sh.lock().await;
        for n in 0..h.nodes {
            h.spawn(n, true)?;
        }
    }
    let first = wait_until(sh, Duration::from_secs(300), |h| h.newest_step().is_some()).await;
    if !first {
        bail!(
            "no daemon logged a step within 300 s; node-0's log ends:\n{}",
            sh.lock().await.c.log_tail(0)
        );
    }
    let t0 = {
        let h = sh.lock().await;
        (0..h.nodes)
            .flat_map(|n| read_node_logs(n, &h.c.run_dir(n)).0)
            .map(|s| s.t_ms)
            .min()
            .unwrap_or_else(now_unix_ms)
    };
    if !plan.is_empty() {
        // Once, before the faults: every node training in one generation.
        let steady_limit = Duration::from_secs(scenario.run.steady_timeout_s);
        if !wait_until(sh, steady_limit, |h| h.steady() || h.job_ended()).await {
            println!(
                "note: the cluster was not steady after {} s; the faults go on at their times",
                steady_limit.as_secs()
            );
        }
    }
    let bar = indicatif::ProgressBar::new(plan.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} faults {pos}/{len} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    futures::future::join_all(plan.iter().map(|f| run_fault(sh, f, t0, &bar))).await;
    bar.finish_and_clear();
    if let Some(stop_after_s) = scenario.run.stop_after_s {
        return stop_when_time_is_up(sh, t0, stop_after_s).await;
    }
    // The job ends by itself at the target step. Polled with the lock held only for
    // each check, so that the resource sampler goes on meanwhile.
    let limit = sh
        .lock()
        .await
        .deadline
        .saturating_duration_since(Instant::now())
        .max(FINISH_MIN);
    let until = Instant::now() + limit;
    let bar = spinner("training to the target step");
    let nodes = sh.lock().await.nodes;
    for n in 0..nodes {
        loop {
            let mut h = sh.lock().await;
            match h.c.wait(n, Duration::ZERO)? {
                Some(s) if s.success() => break,
                Some(s) => {
                    let tail = h.c.log_tail(n);
                    h.errors
                        .push(format!("node-{n} exited with {s}; its log ends:\n{tail}"));
                    break;
                }
                None if Instant::now() >= until => {
                    h.errors.push(format!(
                        "node-{n} still ran when the run's time was up ({} s)",
                        scenario.run.timeout_s
                    ));
                    break;
                }
                None => {}
            }
            drop(h);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    bar.finish_and_clear();
    sh.lock().await.c.kill_all();
    Ok(())
}

/// A run sized by time: waits until `stop_after_s` seconds after the first step (`t0`,
/// unix ms), at most until the deadline, polling each second; a daemon that exits by
/// itself meanwhile (the job reached `train.steps`, or failed) ends the wait. Then every
/// daemon is killed: the target is the newest committed checkpoint (see [`run`]).
async fn stop_when_time_is_up(sh: &Shared, t0: u64, stop_after_s: f64) -> Result<()> {
    let until_ms = t0.saturating_add((stop_after_s * 1000.0) as u64);
    let deadline = sh.lock().await.deadline;
    let bar = spinner("training until the scenario's time is up");
    loop {
        let now = now_unix_ms();
        if now >= until_ms || Instant::now() >= deadline || sh.lock().await.job_ended() {
            break;
        }
        tokio::time::sleep(Duration::from_millis((until_ms - now).min(1000))).await;
    }
    bar.finish_and_clear();
    let mut h = sh.lock().await;
    for n in 0..h.nodes {
        if h.down.contains(&n) {
            continue;
        }
        if let Ok(Some(s)) = h.c.wait(n, Duration::ZERO) {
            if !s.success() {
                let tail = h.c.log_tail(n);
                h.errors.push(format!(
                    "node-{n} exited with {s} before the scenario's time was up; its log ends:\n{tail}"
                ));
            }
        }
    }
    h.c.kill_all();
    Ok(())
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

//! The harness of `tenax chaos run`: the flags the daemons get, the running cluster with
//! its fault proxies and what it injected ([`Harness`], shared by the faults in flight as
//! [`Shared`]), its start, and the drive loop that starts the daemons, injects every fault
//! at its own time, samples the daemons' resources and waits for the job's end.

use super::*;

/// How long the harness waits for the daemons to exit once the faults are over, at least.
const FINISH_MIN: Duration = Duration::from_secs(120);

/// The training flags of a scenario (the daemons' and the reference run's).
pub(super) fn train_flags(s: &Scenario, data: &Path) -> Vec<String> {
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
pub(super) fn roles_from_etcd(exe: &Path, etcd: &str, job: &str, tls: &[String]) -> Roles {
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
pub(super) const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long the harness waits for a SIGKILLed daemon to exit.
pub(super) const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The running harness: the cluster, its proxies, and what it injected. The faults in
/// flight share it ([`Shared`]), each holding the lock only for its quick actions, so
/// that every fault starts at its own time whatever the others do.
pub(super) struct Harness {
    /// The cluster.
    pub(super) c: LocalCluster,
    /// The tenax binary (for `tenax status` through etcd).
    pub(super) exe: PathBuf,
    /// The job's name.
    pub(super) job: String,
    /// Daemons.
    pub(super) nodes: usize,
    /// A fault proxy in front of each daemon's gRPC port (partition scenarios).
    peer_proxies: Vec<TcpFaultProxy>,
    /// A fault proxy in front of etcd per daemon (partition scenarios).
    etcd_proxies: Vec<TcpFaultProxy>,
    /// The HTTP fault proxy in front of S3 (s3 and kill_in_upload scenarios).
    pub(super) s3_proxy: Option<FaultProxy>,
    /// Extra environment per daemon start (S3 through the proxy).
    env: Vec<(String, String)>,
    /// TLS to the daemons' Control service (the cluster's operator certificate).
    pub(super) tls: Option<ClientTlsConfig>,
    /// S3 faults in flight, by fault index; the proxy gets the strongest setting of each.
    s3_layers: BTreeMap<usize, ProxyFaults>,
    /// TCP faults in flight per proxy, `(node, etcd side)` -> fault index -> fault; the
    /// proxy gets the strongest.
    tcp_layers: BTreeMap<(usize, bool), BTreeMap<usize, TcpFault>>,
    /// Faults holding etcd down; it starts again when the last one lets go.
    etcd_holds: BTreeSet<usize>,
    /// Daemons a fault killed and has not started again (their exit is no job end).
    pub(super) down: BTreeSet<usize>,
    /// Faults injected.
    pub(super) faults: Vec<InjectedFault>,
    /// Problems of the run itself.
    pub(super) errors: Vec<String>,
    /// The run's end at the latest.
    pub(super) deadline: Instant,
    /// Every daemon's RSS and open fds, sampled every
    /// [`tenax_chaos::resources::SAMPLE_EVERY`] while the run is driven.
    pub(super) resources: Vec<ResourceSample>,
}

/// The harness as the faults in flight share it.
pub(super) type Shared = tokio::sync::Mutex<Harness>;

impl Harness {
    /// Starts daemon `node` (`first`: with `--start-nodes`), advertising its peer proxy
    /// where it has one; it no longer counts as down.
    pub(super) fn spawn(&mut self, node: usize, first: bool) -> Result<()> {
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
    pub(super) fn newest_step(&self) -> Option<u64> {
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
    pub(super) fn job_ended(&mut self) -> bool {
        (0..self.nodes).any(|n| {
            !self.down.contains(&n) && matches!(self.c.wait(n, Duration::ZERO), Ok(Some(_)))
        })
    }

    /// Sets (`Some`) or lifts (`None`) fault `index`'s layer on the S3 proxy.
    pub(super) fn s3_layer(&mut self, index: usize, faults: Option<ProxyFaults>) -> Result<()> {
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
    pub(super) fn tcp_layer(
        &mut self,
        node: usize,
        etcd: bool,
        index: usize,
        fault: Option<TcpFault>,
    ) {
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
    pub(super) fn etcd_hold(&mut self, index: usize) -> Result<()> {
        let first = self.etcd_holds.is_empty();
        self.etcd_holds.insert(index);
        if first {
            self.c.etcd().stop().context("stopping etcd")?;
        }
        Ok(())
    }

    /// Fault `index` lets etcd go (it starts again with the last release).
    pub(super) fn etcd_release(&mut self, index: usize) -> Result<()> {
        self.etcd_holds.remove(&index);
        if self.etcd_holds.is_empty() {
            self.c.etcd().restart().context("starting etcd again")?;
        }
        Ok(())
    }

    /// SIGKILL of `node`; it counts as down until started again.
    pub(super) fn kill(&mut self, node: usize) -> Result<()> {
        self.c.signal(node, Signal::Kill)?;
        self.down.insert(node);
        Ok(())
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
pub(super) fn start_harness(
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

/// Drives the run ([`drive_faults`]) while sampling every daemon's RSS and open fds
/// every [`SAMPLE_EVERY`] into the harness (until the run ends, at most until its
/// deadline).
pub(super) async fn drive(sh: &Shared, scenario: &Scenario, plan: &[PlannedFault]) -> Result<()> {
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

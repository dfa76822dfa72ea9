//! Injecting one planned fault into the running harness (kill, hang, slow, partition,
//! S3 errors, etcd restart or outage, a kill during an upload, a group), and resolving
//! its target ("leader", "non-leader", the checkpoint writer) from the daemons' status.

use super::*;

/// Sleeps `d`, never past `deadline`.
pub(super) async fn pause(deadline: Instant, d: Duration) {
    tokio::time::sleep(d.min(deadline.saturating_duration_since(Instant::now()))).await;
}

/// Waits until `f` holds (polling, the lock held only for each check), at most `limit`
/// and never past the deadline.
pub(super) async fn wait_until(
    sh: &Shared,
    limit: Duration,
    mut f: impl FnMut(&mut Harness) -> bool,
) -> bool {
    let deadline = sh.lock().await.deadline;
    let until = Instant::now()
        .checked_add(limit)
        .map_or(deadline, |t| t.min(deadline));
    loop {
        if f(&mut *sh.lock().await) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The leader and rank 0 from the daemons' own `Control.Status` (works while etcd is
/// down); through etcd (`tenax status`) when no daemon answers. Returns where they came
/// from, in words.
pub(super) async fn roles(sh: &Shared) -> (Roles, &'static str) {
    let (addrs, tls) = {
        let h = sh.lock().await;
        let addrs: Vec<(usize, String)> = (0..h.nodes)
            .filter(|&n| h.c.pid(n).is_some())
            .filter_map(|n| h.c.listen_addr(n).map(|a| (n, a)))
            .collect();
        (addrs, h.tls.clone())
    };
    let asks = addrs.iter().map(|(n, addr)| {
        let tls = tls.clone();
        async move {
            crate::status::query_status(addr, STATUS_TIMEOUT, tls.as_ref())
                .await
                .ok()
                .map(|r| {
                    (
                        *n,
                        NodeStatus {
                            generation: r.generation,
                            leader: r.leader,
                            ranks: r.ranks,
                        },
                    )
                })
        }
    });
    let answers: Vec<(usize, NodeStatus)> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if !answers.is_empty() {
        return (pick_roles(&answers), "from the daemons' own status");
    }
    let (exe, etcd, job, tls_args) = {
        let h = sh.lock().await;
        (
            h.exe.clone(),
            h.c.etcd_endpoint(),
            h.job.clone(),
            h.c.operator_tls_args(),
        )
    };
    let r = tokio::task::spawn_blocking(move || roles_from_etcd(&exe, &etcd, &job, &tls_args))
        .await
        .unwrap_or_default();
    (r, "from etcd (no daemon answered)")
}

/// The daemon a single-node fault hits, and how it was found.
pub(super) async fn resolve(sh: &Shared, target: Target) -> (Option<usize>, String) {
    match target {
        Target::Node(n) => (Some(n), String::new()),
        Target::Leader => {
            let (r, how) = roles(sh).await;
            (r.leader, format!(" (the leader, {how})"))
        }
        Target::NonLeader => {
            let (r, how) = roles(sh).await;
            let h = sh.lock().await;
            let n = (0..h.nodes).find(|&n| Some(n) != r.leader && !h.down.contains(&n));
            (n, format!(" (a non-leader, {how})"))
        }
        Target::Cluster => (None, String::new()),
    }
}

/// Polls until node `node`'s killed process exited (reaped), at most [`EXIT_WAIT`].
pub(super) async fn wait_exit(sh: &Shared, node: usize) -> Result<()> {
    let exited = wait_until(sh, EXIT_WAIT, |h| {
        matches!(h.c.wait(node, Duration::ZERO), Ok(Some(_)))
    })
    .await;
    if !exited {
        bail!("node-{node} did not exit within {EXIT_WAIT:?} of SIGKILL");
    }
    Ok(())
}

/// Kills `node`, waits `restart_after`, starts it again.
pub(super) async fn kill_and_restart(
    sh: &Shared,
    node: usize,
    restart_after: Duration,
) -> Result<()> {
    let deadline = {
        let mut h = sh.lock().await;
        h.kill(node)?;
        h.deadline
    };
    wait_exit(sh, node).await?;
    pause(deadline, restart_after).await;
    sh.lock().await.spawn(node, false)
}

/// What an injected fault hit and did.
pub(super) struct Done {
    /// The daemon it hit, if one.
    node: Option<usize>,
    /// A group's daemons.
    nodes: Vec<usize>,
    /// What was done, in words.
    detail: String,
    /// When it began (a kill in an upload: the kill, not the wait for an upload).
    start_ms: u64,
}

/// Injects one fault, from its trigger to its end.
pub(super) async fn inject(sh: &Shared, f: &PlannedFault) -> Result<Done> {
    let spec = &f.spec;
    let dur = Duration::from_secs_f64(spec.duration_s());
    let deadline = sh.lock().await.deadline;
    let (node, how) = resolve(sh, f.target).await;
    let start_ms = now_unix_ms();
    let single = |detail: String| Done {
        node,
        nodes: Vec::new(),
        detail: format!("{detail}{how}"),
        start_ms,
    };
    // Faults overlap: another one's kill may have this daemon down (not restarted yet).
    // A fault on a daemon that is not running is not injected, and says so.
    let one_node = matches!(
        f.kind,
        FaultKind::Kill
            | FaultKind::Hang
            | FaultKind::Slow
            | FaultKind::Partition
            | FaultKind::KillInUpload
    );
    if let Some(n) = node.filter(|_| one_node) {
        if sh.lock().await.down.contains(&n) {
            return Ok(Done {
                node: None,
                nodes: Vec::new(),
                detail: format!(
                    "not injected: node-{n}{how} was down (killed by another fault, not restarted yet)"
                ),
                start_ms,
            });
        }
    }
    // Nor is a fault on "the leader" while no daemon leads (another fault has the group
    // re-forming) or on "a non-leader" while none runs.
    if one_node && node.is_none() && matches!(f.target, Target::Leader | Target::NonLeader) {
        return Ok(Done {
            node: None,
            nodes: Vec::new(),
            detail: format!("not injected: no daemon found{how}"),
            start_ms,
        });
    }
    match f.kind {
        FaultKind::Kill => {
            let n = node.ok_or_else(|| anyhow!("no node to kill{how}"))?;
            kill_and_restart(sh, n, Duration::from_secs_f64(spec.restart_after_s())).await?;
            Ok(single(format!(
                "SIGKILL, restarted after {:.1} s",
                spec.restart_after_s()
            )))
        }
        FaultKind::Hang => {
            let n = node.ok_or_else(|| anyhow!("no node to hang{how}"))?;
            sh.lock().await.c.signal(n, Signal::Stop)?;
            pause(deadline, dur).await;
            let h = sh.lock().await;
            match h.c.signal(n, Signal::Cont) {
                // Another fault killed it during the hang: the kill ended it.
                Err(_) if h.down.contains(&n) => Ok(single(format!(
                    "SIGSTOP for {:.1} s, killed by another fault meanwhile",
                    dur.as_secs_f64()
                ))),
                Err(e) => Err(e.into()),
                Ok(()) => Ok(single(format!(
                    "SIGSTOP for {:.1} s, then SIGCONT",
                    dur.as_secs_f64()
                ))),
            }
        }
        FaultKind::Slow => {
            let n = node.ok_or_else(|| anyhow!("no node to slow down{how}"))?;
            let (stop, run) = spec.duty_cycle_ms();
            let until = Instant::now() + dur;
            let mut cycles = 0;
            while Instant::now() < until && Instant::now() < deadline {
                sh.lock().await.c.signal(n, Signal::Stop)?;
                pause(deadline, Duration::from_millis(stop)).await;
                sh.lock().await.c.signal(n, Signal::Cont)?;
                pause(deadline, Duration::from_millis(run)).await;
                cycles += 1;
            }
            Ok(single(format!(
                "SIGSTOP {stop} ms of every {} ms, {cycles} cycles",
                stop + run
            )))
        }
        FaultKind::Partition => {
            let n = node.ok_or_else(|| anyhow!("no node to partition{how}"))?;
            let from = spec.from.unwrap_or(PartitionFrom::Both);
            let fault = match spec.mode.unwrap_or(PartitionMode::Blackhole) {
                PartitionMode::Blackhole => TcpFault::Blackhole,
                PartitionMode::Drop => TcpFault::Drop,
                PartitionMode::Delay => TcpFault::Delay {
                    ms: spec.delay_ms.unwrap_or(100),
                },
            };
            let (peers, etcd) = match from {
                PartitionFrom::Peers => (true, false),
                PartitionFrom::Etcd => (false, true),
                PartitionFrom::Both => (true, true),
            };
            {
                let mut h = sh.lock().await;
                if peers {
                    h.tcp_layer(n, false, f.index, Some(fault));
                }
                if etcd {
                    h.tcp_layer(n, true, f.index, Some(fault));
                }
            }
            pause(deadline, dur).await;
            {
                let mut h = sh.lock().await;
                h.tcp_layer(n, false, f.index, None);
                h.tcp_layer(n, true, f.index, None);
            }
            Ok(single(format!(
                "{fault:?} from {from:?} for {:.1} s",
                dur.as_secs_f64()
            )))
        }
        FaultKind::S3 => {
            let rate = spec.error_rate();
            let lat = spec.latency_ms();
            let before = {
                let mut h = sh.lock().await;
                h.s3_layer(
                    f.index,
                    Some(ProxyFaults {
                        error_rate: rate * 0.6,
                        drop_before_rate: rate * 0.2,
                        drop_after_rate: rate * 0.2,
                        latency_rate: if lat > 0 { 1.0 } else { 0.0 },
                        latency_ms: (lat / 2, lat),
                    }),
                )?;
                h.s3_proxy.as_ref().map(FaultProxy::stats)
            };
            pause(deadline, dur).await;
            let after = {
                let mut h = sh.lock().await;
                h.s3_layer(f.index, None)?;
                h.s3_proxy.as_ref().map(FaultProxy::stats)
            };
            let (Some(before), Some(after)) = (before, after) else {
                bail!("no S3 proxy");
            };
            Ok(single(format!(
                "S3 error rate {rate} and up to {lat} ms latency for {:.1} s: {} requests, {} errors, {} dropped (counts include overlapping S3 faults)",
                dur.as_secs_f64(),
                after.requests - before.requests,
                after.errors_injected - before.errors_injected,
                (after.dropped_before + after.dropped_after)
                    - (before.dropped_before + before.dropped_after)
            )))
        }
        FaultKind::EtcdRestart | FaultKind::EtcdDown => {
            sh.lock().await.etcd_hold(f.index)?;
            pause(deadline, dur).await;
            sh.lock().await.etcd_release(f.index)?;
            Ok(single(format!(
                "etcd down for {:.1} s (up again once no other fault holds it down)",
                dur.as_secs_f64()
            )))
        }
        FaultKind::KillInUpload => {
            let lat = spec.latency_ms();
            let seen = {
                let mut h = sh.lock().await;
                h.s3_layer(
                    f.index,
                    Some(ProxyFaults {
                        latency_rate: 1.0,
                        latency_ms: (lat, lat),
                        ..ProxyFaults::default()
                    }),
                )?;
                h.s3_proxy.as_ref().map_or(0, |p| p.stats().requests)
            };
            // The next write is a checkpoint upload: rank 0 writes every shard.
            let caught = wait_until(sh, Duration::from_secs(300), |h| {
                h.s3_proxy.as_ref().is_some_and(|p| {
                    p.history()
                        .iter()
                        .any(|e| e.index >= seen && (e.method == "PUT" || e.method == "POST"))
                }) || h.job_ended()
            })
            .await;
            let (writer, how) = roles(sh).await;
            let kill_ms = now_unix_ms();
            let result = match (caught, writer.rank0) {
                (true, Some(n)) => {
                    kill_and_restart(sh, n, Duration::from_secs_f64(spec.restart_after_s()))
                        .await
                        .map(|()| Done {
                            node: Some(n),
                            nodes: Vec::new(),
                            detail: format!(
                                "SIGKILL of node-{n} (rank 0, {how}) during a checkpoint upload ({lat} ms S3 latency, {:.1} s after the fault began), restarted after {:.1} s",
                                kill_ms.saturating_sub(start_ms) as f64 / 1000.0,
                                spec.restart_after_s()
                            ),
                            start_ms: kill_ms,
                        })
                }
                (false, _) => Err(anyhow!("no checkpoint upload seen within 300 s")),
                (true, None) => Err(anyhow!("no rank 0 found ({how})")),
            };
            sh.lock().await.s3_layer(f.index, None)?;
            result
        }
        FaultKind::Group => {
            let (leader, how) = if f
                .nodes
                .iter()
                .any(|t| matches!(t, Target::Leader | Target::NonLeader))
            {
                let (r, how) = roles(sh).await;
                (r.leader, format!(" (roles {how})"))
            } else {
                (None, String::new())
            };
            let restart_after = Duration::from_secs_f64(spec.restart_after_s());
            let start_ms = now_unix_ms();
            let (hit, why) = {
                let mut h = sh.lock().await;
                let (mut hit, mut why) = resolve_group(&f.nodes, leader, h.nodes);
                // Faults overlap: a daemon another fault has down is left out (that
                // fault restarts it).
                hit.retain(|n| {
                    let down = h.down.contains(n);
                    if down {
                        why.push(format!("node-{n} was down (another fault), left out"));
                    }
                    !down
                });
                if hit.is_empty() && !f.etcd {
                    return Ok(Done {
                        node: None,
                        nodes: Vec::new(),
                        detail: format!("not injected: every daemon it names was down{how}"),
                        start_ms,
                    });
                }
                // All at the same instant: the signals first, then etcd.
                for &n in &hit {
                    h.kill(n)?;
                }
                if f.etcd {
                    h.etcd_hold(f.index)?;
                }
                (hit, why)
            };
            for &n in &hit {
                wait_exit(sh, n).await?;
            }
            pause(deadline, restart_after).await;
            {
                let mut h = sh.lock().await;
                if f.etcd {
                    h.etcd_release(f.index)?;
                }
                for &n in &hit {
                    h.spawn(n, false)?;
                }
            }
            let names: Vec<String> = hit.iter().map(|n| format!("node-{n}")).collect();
            Ok(Done {
                node: None,
                nodes: hit,
                detail: format!(
                    "SIGKILL of {}{} at once, all back after {:.1} s{how}{}",
                    names.join(", "),
                    if f.etcd { " and etcd stopped" } else { "" },
                    restart_after.as_secs_f64(),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", why.join("; "))
                    }
                ),
                start_ms,
            })
        }
    }
}

/// One fault: waits for its own trigger (whatever the other faults do), injects it,
/// records it.
pub(super) async fn run_fault(
    sh: &Shared,
    f: &PlannedFault,
    t0: u64,
    bar: &indicatif::ProgressBar,
) {
    let triggered = match f.trigger {
        Trigger::AtS(s) => {
            let at = t0 + (s * 1000.0) as u64;
            wait_until(sh, Duration::MAX, |h| now_unix_ms() >= at || h.job_ended()).await
        }
        Trigger::AtStep(step) => {
            wait_until(sh, Duration::MAX, |h| {
                h.newest_step().is_some_and(|s| s >= step) || h.job_ended()
            })
            .await
        }
    };
    let ended = sh.lock().await.job_ended();
    if !triggered || ended {
        sh.lock().await.errors.push(format!(
            "fault {} ({}) not injected: {}",
            f.index,
            f.kind,
            if triggered {
                "the job had ended"
            } else {
                "the run's timeout came first"
            }
        ));
        bar.inc(1);
        return;
    }
    // Printed whether or not stdout is a terminal (a hidden bar's println prints nothing).
    bar.suspend(|| {
        println!(
            "fault {} ({}) starts at {:.1} s",
            f.index,
            f.kind,
            now_unix_ms().saturating_sub(t0) as f64 / 1000.0
        )
    });
    let result = inject(sh, f).await;
    let mut h = sh.lock().await;
    match result {
        Ok(done) => h.faults.push(InjectedFault {
            index: f.index,
            kind: f.kind.name().to_string(),
            node: done.node,
            nodes: done.nodes,
            start_ms: done.start_ms,
            end_ms: now_unix_ms(),
            detail: done.detail,
        }),
        Err(e) => h
            .errors
            .push(format!("fault {} ({}): {e:#}", f.index, f.kind)),
    }
    bar.inc(1);
}

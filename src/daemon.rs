//! `tenax daemon`: one node of a job. It joins the job through etcd, trains its ranks of
//! every generation's plan with the other nodes over the gRPC peer data plane, saves
//! checkpoints to `<store>/<job>/` committed through a fenced etcd record, and serves the
//! control API and `/metrics`.
//!
//! The node's tree: the gRPC server (peer data plane and control) and the `/metrics`
//! endpoint run as children of a [`NodeSupervisor`] actor, each restarted on failure at
//! most 3 times a minute; one failure more and the node leaves the job after its current
//! step and exits non-zero. The membership agent ([`Member`]) holds the lease; a lost
//! membership (evicted while hung, cut off past the lease) makes the node register again
//! and copy the group's state from a peer. Members that are behind, diverged or new copy
//! the state from a donor at the start of a generation; late or broken peers are
//! reported to the leader, who evicts them once a probe or a second reporter confirms.
//! The trainer ([`Trainer`]: one rank actor per device, candle on dedicated threads) is
//! rebuilt from its last state at every generation. The Checkpoint actor
//! ([`Checkpointer`]) uploads in the background. [`run`] drives the training loop.

mod args;
mod services;
mod shell;
mod steplog;
mod view;
mod work;

pub use args::DaemonArgs;
use args::{job_store_url, settings, Settings};
use view::{NodeView, Request, Shared};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::Digest as _;
use tenax_actors::{CheckpointPolicy, Checkpointer, Control, Membership};
use tenax_cluster::etcd::{EtcdConfig, EtcdMembership};
use tenax_cluster::member::{Detection, Member, MemberConfig, Prober};
use tenax_cluster::peer::{HubConfig, PeerHub};
use tenax_cluster::records::{self, ConfigRecord, CHECKPOINT_KEY, CONFIG_KEY};
use tenax_cluster::tls::Tls;
use tenax_core::ckpt::RetentionPolicy;
use tenax_core::detector::DetectorConfig;
use tenax_core::membership::{MemberId, MemberInfo, PlannerConfig};
use tenax_core::node::{Exit, NodeConfig, NodeMachine};
use tenax_storage::{LoadedCheckpoint, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::TrainConfig;
use crate::train::{prepare, start_state, Prepared, Start, StoredConfig};
use shell::{Parts, Shell};

/// Operator requests waiting for the node's loop, at most.
const REQUEST_QUEUE: usize = 16;

/// Where a restarted job resumes: the fenced etcd record, or (when etcd lost its data)
/// the newest checkpoint of the store that verifies.
async fn find_resume_point(
    etcd: &EtcdMembership,
    store: &Store,
) -> Result<Option<LoadedCheckpoint>> {
    let record = etcd.get(CHECKPOINT_KEY).await.map_err(|e| anyhow!("{e}"))?;
    if let Some(bytes) = record {
        let rec = records::decode_checkpoint(&bytes).map_err(|e| {
            anyhow!(
                "job {}: {e} (deleting it with etcdctl falls back to the store's manifests)",
                etcd.config().job
            )
        })?;
        match tenax_storage::load_checkpoint(store, &rec.folder).await {
            Ok(c) => {
                println!(
                    "resuming from the committed checkpoint of step {} ({})",
                    rec.step, rec.url
                );
                return Ok(Some(c));
            }
            Err(e) => eprintln!(
                "warning: the committed checkpoint of step {} ({}) does not load ({e}); falling back to the newest checkpoint that verifies",
                rec.step, rec.url
            ),
        }
    }
    match tenax_storage::latest_verified(store)
        .await
        .map_err(|e| anyhow!("{e}"))?
    {
        None => Ok(None),
        Some((c, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "resuming from step {} ({}): found in the store's manifests (no usable etcd record)",
                c.manifest.step, c.url
            );
            Ok(Some(c))
        }
    }
}

/// Whether the job is running: the stored plan names a member that is registered now.
/// Says which, for the log.
async fn live_group(etcd: &EtcdMembership) -> Result<Option<String>> {
    let Some(record) = etcd.read_plan().await.map_err(|e| anyhow!("{e}"))? else {
        return Ok(None);
    };
    let plan = match records::decode_plan(record.generation, &record.plan) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!(
                "warning: job {}: ignoring the stored plan: {e}",
                etcd.config().job
            );
            return Ok(None);
        }
    };
    let registered: Vec<String> = etcd
        .members()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let live: Vec<&str> = plan
        .ranks
        .iter()
        .map(|a| a.member.as_str())
        .filter(|m| registered.iter().any(|r| r == m))
        .collect();
    Ok((!live.is_empty()).then(|| {
        format!(
            "job {} is running (generation {}, members {})",
            etcd.config().job,
            plan.generation,
            live.join(", ")
        )
    }))
}

/// Fix the job's training config in etcd (the first node does) or check ours against it.
async fn agree_on_config(etcd: &EtcdMembership, node: &str, prep: &Prepared) -> Result<String> {
    // The training guard decides on every member from the same reduced values, so the
    // members must run it with the same settings: they join the math. A guard-off node
    // keeps the hash an older build writes.
    let guard = prep.cfg.guard();
    let guard_json = serde_json::to_value(guard).expect("guard settings serialise");
    let config_hash = match guard.enabled() {
        false => prep.config_hash.clone(),
        true => hex::encode(sha2::Sha256::digest(
            format!("{}/guard:{guard_json}", prep.config_hash).as_bytes(),
        )),
    };
    let mut math = prep.cfg.math();
    math.insert("guard".to_string(), guard_json);
    let ours = ConfigRecord {
        config_hash,
        math,
        corpus_sha256: prep.stored_cfg.corpus_sha256.clone(),
        node: node.to_string(),
        // 16 hex characters, unique to this incarnation of the job.
        nonce: tenax_storage::unique_hex(8, node.as_bytes()),
    };
    let stored = etcd
        .put_if_absent(CONFIG_KEY, &records::encode_config(&ours))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let theirs =
        records::decode_config(&stored).map_err(|e| anyhow!("job {}: {e}", etcd.config().job))?;
    if theirs.config_hash == ours.config_hash {
        return Ok(match theirs.nonce.is_empty() {
            // A record of an older build: the job's name stands in.
            true => etcd.config().job.clone(),
            false => theirs.nonce,
        });
    }
    let mut diffs: Vec<String> = theirs
        .math
        .iter()
        .filter(|(k, v)| ours.math.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: job has {v}, this node has {}",
                ours.math.get(k).cloned().unwrap_or_default()
            )
        })
        .collect();
    if theirs.corpus_sha256 != ours.corpus_sha256 {
        diffs.push(format!(
            "corpus sha256: job has {}, this node has {}",
            theirs.corpus_sha256, ours.corpus_sha256
        ));
    }
    if diffs.is_empty() {
        diffs.push("model or tokenizer".to_string());
    }
    bail!(
        "node {node} refused: its training config differs from job {}'s (set by node {}): {}; start it with the job's config, or use another --job",
        etcd.config().job,
        theirs.node,
        diffs.join("; ")
    )
}

/// Run `tenax daemon` until the job reaches its target step (exit 0) or the node leaves.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let mut args = args.with_file()?;
    let s = settings(&mut args)?;
    let started = Instant::now();
    if s.tls.is_none() {
        eprintln!(
            "warning: --insecure: the peer plane and the control API on {} take any client: anyone who reaches it can send gradient frames, copy the model's state or drain the node; use --tls-* outside a network you trust",
            s.listen
        );
    }

    // etcd and the store first: without them there is nothing to join.
    let mut etcd_cfg = EtcdConfig::new(s.etcd.clone(), s.job.clone());
    etcd_cfg.lease_ttl_s = s.lease_ttl_s;
    // A lease is kept (not given up) as long as the node waits for etcd.
    etcd_cfg.give_up_after = s.etcd_outage_timeout;
    args.etcd_client.apply(&mut etcd_cfg)?;
    // A node that ran before may be restarting during an etcd outage: it waits as long
    // as the members do. A new one gives up sooner: a mistyped --etcd is the likelier cause.
    let run_dir = run_dir_of(&s, &args);
    let ran_before = run_dir.join("events.jsonl").exists();
    let wait = match ran_before {
        true => (s.etcd_outage_timeout, "--etcd-outage-timeout-s"),
        false => (s.etcd_start_timeout, "--etcd-start-timeout-s"),
    };
    let etcd = connect_waiting(&etcd_cfg, wait).await.map_err(|e| {
        let why = match ran_before {
            true => format!("this node ran before ({} holds its earlier life), so it waited as long as a member waits for etcd", run_dir.display()),
            false => format!("a new node (no earlier life in {}) waits {} s, --etcd-start-timeout-s", run_dir.display(), s.etcd_start_timeout.as_secs()),
        };
        anyhow!("{e:#} ({why}): check --etcd and that etcd runs")
    })?;
    let store_url = job_store_url(&s.store_root, &s.job);
    // --sign-key: this node signs the manifests it commits; --trust-key: a (re)start loads
    // only a checkpoint signed by that key (a joining node copies a peer's state instead).
    let store = Store::open(&store_url)
        .map_err(|e| anyhow!("{e}"))?
        .with_keys(args.train.manifest_keys()?);
    // A node joining a running job copies the state from a peer: it loads nothing. A
    // fresh job, or a whole-job restart, loads the committed checkpoint.
    let live = live_group(&etcd).await?;
    let (prep, start, run_dir, job_nonce) =
        prepare_node(&s, &args, &etcd, &store, live.as_deref()).await?;

    let Bound {
        shared,
        requests,
        listener,
        bound,
        metrics_listener,
    } = bind(&s, &prep, start.step).await?;
    let (advertise, metrics_addr) = (shared.addr.clone(), shared.metrics_addr.clone());
    let shutdown = CancellationToken::new();
    let supervisor = services::start(
        shared.clone(),
        listener,
        bound,
        metrics_listener,
        shutdown.clone(),
    )
    .await?;
    println!(
        "node {} of job {}: gRPC on {bound} (advertised {advertise}){}; store {store_url}; config {}",
        s.node_id,
        s.job,
        match metrics_addr.is_empty() {
            true => String::new(),
            false => format!(", metrics on http://{metrics_addr}/metrics"),
        },
        &prep.config_hash[..12]
    );
    if let Some(p) = prep.pipeline.filter(|_| s.stages_across_nodes) {
        println!(
            "node {}: runs one stage of a pipeline of {} stages ({}) whose other stages are other nodes (--stages-across-nodes); it keeps the whole model's state",
            s.node_id, p.stages, p.schedule
        );
    } else if let Some(p) = prep.pipeline {
        println!(
            "node {}: each of its {} data-parallel rank(s) runs as a pipeline of {} stages ({}) in this process; the pipelines of the other nodes hold twins of its stages",
            s.node_id, s.devices, p.stages, p.schedule
        );
    }
    services::on_signals(shared.clone(), s.grace);

    // Join the job.
    let join = join_config(&s, etcd_cfg, advertise, metrics_addr);
    let member = start_member(&etcd, &join, s.tls.clone()).await?;
    let member = Membership::start_under(&supervisor, member)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // --keep-last / --keep-every: the committer's Checkpoint actor prunes after each commit
    // (never the newest good checkpoint, nor one being written).
    let cfg = &prep.cfg;
    let retention = (cfg.keep_last > 0 || cfg.keep_every > 0).then_some(RetentionPolicy {
        keep_last: cfg.keep_last as usize,
        keep_every: cfg.keep_every,
        min_uncommitted_age_ms: 3_600_000,
    });
    let checkpointer = Checkpointer::start_under(
        &supervisor,
        store.clone(),
        CheckpointPolicy {
            share_wait: Default::default(),
            writers: 1,
            retention,
        },
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let parts = Parts {
        s: &s,
        prep: &prep,
        shared: shared.clone(),
        etcd,
        store,
        join,
        member,
        checkpointer,
        run_dir,
        requests,
        job_nonce,
        node: &supervisor,
    };
    let mut shell = Shell::new(parts, node_machine(&s, &prep)?);
    let outcome = shell.run(start, live.is_none()).await;
    if matches!(outcome, Ok((Exit::Done, _)))
        && prep.data.canaries.is_some()
        && shell.is_committer()
    {
        // The canaries' exposure in the final state, by the node that committed it (every
        // member holds the same state).
        let reported = match shell.params().await {
            Some(params) => {
                let dir = shell.p.run_dir.clone();
                crate::memorisation::report_run(&prep, params, shell.step(), &dir).await
            }
            None => Err(anyhow!("no final state to measure")),
        };
        if let Err(e) = reported {
            eprintln!("warning: node {}: the canaries' exposure: {e:#}", s.node_id);
        }
    }
    let failed = !matches!(outcome, Ok((Exit::Done | Exit::Left, _)));
    shell.stop(failed).await;
    let step = shell.step();
    {
        // The shell (which borrows the supervisor) ends here.
        let shell = shell;
        let Shell { p, .. } = shell;
        p.checkpointer.shutdown().await;
        if let Err(e) = p.member.shutdown().await {
            eprintln!("warning: leaving the job: {e} (the lease expires after its TTL)");
        }
    }
    shared.hub.shutdown();
    supervisor.shutdown().await;
    shutdown.cancel();
    let (how, why) = outcome?;
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(reason) = fatal {
        bail!(
            "node {} left the job at step {step}: {reason}; restart it to rejoin",
            s.node_id
        );
    }
    match how {
        Exit::Done | Exit::Left => {
            let secs = started.elapsed().as_secs_f64();
            println!("node {}: {why} at step {step} after {secs:.1} s", s.node_id);
            Ok(())
        }
        Exit::Failed => bail!("node {}: {why}", s.node_id),
        Exit::GraceExpired => {
            eprintln!("error: node {}: {why}; exiting", s.node_id);
            std::process::exit(3);
        }
    }
}

/// The node's listeners and what its services and loop share.
struct Bound {
    shared: Arc<Shared>,
    requests: mpsc::Receiver<Request>,
    listener: tokio::net::TcpListener,
    bound: std::net::SocketAddr,
    metrics_listener: Option<tokio::net::TcpListener>,
}

/// Bind the gRPC server's (peer data plane + control) and `/metrics`' listeners; the
/// node's shared view starts at `step`.
async fn bind(s: &Settings, prep: &Prepared, step: u64) -> Result<Bound> {
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .map_err(|e| anyhow!("--listen {}: cannot bind ({e}): pick a free port", s.listen))?;
    let bound = listener.local_addr().context("listen address")?;
    if let Some(w) = args::unroutable_advertise_warning(bound, s.advertise.as_deref()) {
        eprintln!("warning: {w}");
    }
    let advertise = match &s.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
        None => bound.to_string(),
    };
    let metrics_listener =
        match s.metrics_listen {
            None => None,
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
                anyhow!("--metrics-listen {a}: cannot bind ({e}): pick a free port")
            })?),
        };
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| match a.ip().is_unspecified() {
            true => format!("127.0.0.1:{}", a.port()),
            false => a.to_string(),
        })
        .unwrap_or_default();
    let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let shared = Arc::new(Shared {
        job: s.job.clone(),
        member_id: s.node_id.clone(),
        addr: advertise,
        metrics_addr,
        config_hash: prep.config_hash.clone(),
        pipeline: prep.pipeline,
        stages_across_nodes: s.stages_across_nodes,
        view: Mutex::new(NodeView {
            step,
            target_steps: prep.cfg.steps,
            phase: "joining".into(),
            loss: f64::NAN,
            ..Default::default()
        }),
        control: Control::new(requests_tx.clone()),
        requests: requests_tx,
        hub: PeerHub::with_tls(s.job.clone(), HubConfig::default(), s.tls.clone()),
        control_refused: Default::default(),
        fatal: Mutex::new(None),
    });
    Ok(Bound {
        shared,
        requests,
        listener,
        bound,
        metrics_listener,
    })
}

/// The node's training config (checked against the checkpoint it resumes from, if any,
/// and against the job's), its data, its starting state, and the job's nonce. `live` says why the node
/// joins a running job (it then loads nothing: it copies the state from a peer).
async fn prepare_node(
    s: &Settings,
    args: &DaemonArgs,
    etcd: &EtcdMembership,
    store: &Store,
    live: Option<&str>,
) -> Result<(Prepared, Start, PathBuf, String)> {
    let resumed = match live {
        Some(why) => {
            println!(
                "{why}: this node will copy the state from a peer instead of loading a checkpoint"
            );
            None
        }
        None => find_resume_point(etcd, store).await?,
    };
    let stored: Option<StoredConfig> = match &resumed {
        Some(c) => Some(serde_json::from_value(c.manifest.config.clone()).map_err(|e| {
            anyhow!("checkpoint {}: its config does not parse ({e}): it was not written by this version of tenax", c.url)
        })?),
        None => None,
    };
    let run_dir = run_dir_of(s, args);
    std::fs::create_dir_all(&run_dir).map_err(|e| {
        anyhow!(
            "run dir {}: cannot create it ({e}): pick a writable --run-dir",
            run_dir.display()
        )
    })?;
    let mut train_args = args.train.clone();
    train_args.run_dir = Some(run_dir.clone());
    train_args.store = Some(job_store_url(&s.store_root, &s.job));
    // The config's ranks are one pipeline's stage ranks (one rank without pipelines);
    // each of the node's --devices data-parallel ranks runs one such pipeline.
    train_args.ranks = Some(train_args.pipeline_stages.unwrap_or(1).max(1) as usize);
    let cfg = TrainConfig::resolve(train_args, stored.as_ref().map(|s| &s.train))?;
    if let Some(st) = &stored {
        let diffs = cfg.math_differences(&st.train);
        if !diffs.is_empty() {
            bail!(
                "cannot resume job {} from {}: this node's training config differs ({}): use the checkpoint's values or a new --job",
                s.job,
                resumed.as_ref().map(|c| c.url.as_str()).unwrap_or(""),
                diffs.join("; ")
            );
        }
    }
    let mut prep = prepare(cfg, stored.as_ref(), &run_dir)?;
    prep.setup.step_timeout = s.step_timeout;
    if let Some(plan) = &prep.data.canaries {
        // Planted as in `tenax train` (the same samples whatever the members); their
        // exposure is measured by `tenax eval memorisation` on the job's checkpoints.
        crate::memorisation::write_canaries(plan, &prep.tokenizer, &run_dir)?;
    }
    let job_nonce = agree_on_config(etcd, &s.node_id, &prep).await?;
    let start = start_state(&prep, resumed.as_ref())?;
    if let Some(stream) = &prep.stream {
        // A streamed dataset: fetch first what the starting cursor reads.
        stream.seek(start.cursor);
    }
    Ok((prep, start, run_dir, job_nonce))
}

/// The node's run directory: `--run-dir`, or `runs/<job>/<node id>`.
fn run_dir_of(s: &Settings, args: &DaemonArgs) -> PathBuf {
    args.train
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/{}/{}", s.job, s.node_id)))
}

/// How this node registers in the job (again, after losing its membership).
fn join_config(s: &Settings, etcd: EtcdConfig, addr: String, metrics_addr: String) -> MemberConfig {
    MemberConfig {
        etcd,
        planner: PlannerConfig {
            min_members: s.min_nodes,
            pp_depth: s.across_stages(),
            shrink_pipeline: s.stages_across_nodes,
            max_ranks_per_member: s.devices,
            settle_ms: s.settle_ms,
            settle_max_ms: s.settle_ms.saturating_mul(3).max(s.settle_ms),
            ..Default::default()
        },
        id: s.node_id.clone(),
        devices: s.devices,
        addr,
        metrics_addr,
    }
}

/// The node's state machine with the daemon's settings and the job's cadences.
fn node_machine(s: &Settings, prep: &Prepared) -> Result<NodeMachine> {
    let mut rules = NodeConfig::daemon(
        MemberId::new(s.node_id.clone()),
        prep.cfg.steps,
        prep.cfg.batch_size,
        s.lease_ttl_s as u64,
        s.settle_ms,
    );
    rules.etcd_outage_timeout_ms = s.etcd_outage_timeout.as_millis() as u64;
    rules.eval_every = prep.cfg.eval_every;
    rules.ckpt_every = prep.cfg.ckpt_every;
    rules.hash_check_every = s.hash_check_every;
    rules.start_nodes = s.start_nodes;
    rules.max_bad_steps = prep.cfg.max_bad_steps;
    rules.step_deadline = DetectorConfig {
        window: 256,
        k: 3,
        min_deadline_ms: s.suspect_after_ms,
        min_samples: 8,
    };
    NodeMachine::new(rules).map_err(|e| anyhow!("--suspect-after-ms: {e}"))
}

/// How long the leader's probe of a suspect waits for its Control service to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Registers this node in the job, with the leader's probe of suspects.
async fn start_member(
    etcd: &EtcdMembership,
    join: &MemberConfig,
    tls: Option<Tls>,
) -> Result<Member> {
    // Over mutual TLS the probe dials the suspect as this node, checking it is that node.
    let prober: Prober = Arc::new(move |info: MemberInfo| {
        let tls = tls
            .as_ref()
            .and_then(|t| t.current().client_for_node(info.id.as_str()).ok());
        Box::pin(async move { crate::status::probe_control(&info.addr, PROBE_TIMEOUT, tls).await })
    });
    Member::start_detecting(
        etcd.clone(),
        join.clone(),
        Detection {
            prober: Some(prober),
            probe_timeout: PROBE_TIMEOUT,
        },
    )
    .await
    .map_err(|e| anyhow!("{e}"))
}

/// How often a node that starts while etcd is down tries again.
const ETCD_START_RETRY: Duration = Duration::from_secs(1);

/// Connects to etcd; while it is unreachable (a node started again during an etcd
/// outage, e.g. by its supervisor after a crash), tries again every
/// [`ETCD_START_RETRY`] for at most `outage_timeout` (given by `flag`:
/// `--etcd-outage-timeout-s`, the bound the running members wait, for a node that ran
/// before; `--etcd-start-timeout-s` for a new one), saying so every 10 s. Any other error
/// (a bad setting, TLS, authentication) fails at once.
async fn connect_waiting(
    cfg: &EtcdConfig,
    (outage_timeout, flag): (Duration, &str),
) -> Result<EtcdMembership> {
    let started = Instant::now();
    let mut said = None::<Instant>;
    loop {
        match EtcdMembership::connect(cfg.clone()).await {
            Ok(etcd) => {
                if said.is_some() {
                    println!(
                        "etcd answered after {:.1} s: going on",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(etcd);
            }
            Err(e @ tenax_cluster::etcd::EtcdError::Unreachable { .. })
                if started.elapsed() + ETCD_START_RETRY < outage_timeout =>
            {
                if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    eprintln!(
                        "warning: {e}; waiting for etcd (at most {} s, {flag})",
                        outage_timeout.as_secs()
                    );
                    said = Some(Instant::now());
                }
                tokio::time::sleep(ETCD_START_RETRY).await;
            }
            Err(e) => return Err(anyhow!("{e}")),
        }
    }
}

//! `tenax bench ckpt` and `tenax bench ckpt-kill`: the checkpoint benchmarks, each printing
//! one JSON line.
//!
//! - `ckpt`: training stall per asynchronous save, and checkpoint upload/restore throughput
//!   as ratios to raw object_store puts/gets of the same bytes, side by side.
//! - `ckpt-kill`: kill -9 training processes during saves; count torn loads (must be 0) and
//!   compare finished runs with one never killed, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tenax_actors::{CheckpointEvent, CheckpointPolicy, Checkpointer, SaveJob};
use tenax_core::rng::SplitMix64;
use tenax_core::slots::BatchLayout;
use tenax_model::{GptConfig, ParamLayout};
use tenax_storage::{AttemptStatus, CheckpointMeta, Store, TensorData};

use crate::bench::{median, synthetic_corpus, synthetic_trainer};

/// Options of `tenax bench ckpt-kill`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchCkptKillArgs {
    /// How many times to kill -9 the training process.
    #[arg(long, default_value_t = 50)]
    pub kills: u64,
    /// Seed of the kill times (printed first, so a failing run can be replayed).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Checkpoint store root for the killed runs (each run gets a folder under it).
    /// Default: file://<work-dir>/stores. S3 URLs use the AWS_* environment.
    #[arg(long)]
    pub store: Option<String>,
    /// Where runs, the corpus and the reference go (default: a fresh temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Steps of each run; every step is checkpointed.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
}

/// The training flags of every run of the kill benchmark.
fn kill_run_args(corpus: &Path, run_dir: &Path, store: &str, steps: u64) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--tokenizer",
        "char",
        "--batch-size",
        "6",
        "--micro-batch-size",
        "2",
        "--ranks",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--eval-batches",
        "1",
        "--ckpt-every",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--steps".into(),
        steps.to_string(),
        "--lr-decay-steps".into(),
        steps.to_string(),
        "--data".into(),
        corpus.display().to_string(),
        "--run-dir".into(),
        run_dir.display().to_string(),
        "--store".into(),
        store.to_string(),
    ])
    .collect()
}

/// The newest verified checkpoint's step, cursor and tensors (bit patterns), if any.
type StateBits = (u64, u64, Vec<(String, Vec<u32>)>);

async fn newest_state(store: &Store) -> Result<Option<(StateBits, Vec<String>)>> {
    let Some((c, warnings)) = tenax_storage::latest_verified(store)
        .await
        .map_err(|e| anyhow!("{e}"))?
    else {
        return Ok(None);
    };
    let bits = c
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.data.iter().map(|v| v.to_bits()).collect()))
        .collect();
    Ok(Some((
        (c.manifest.step, c.manifest.data_cursor, bits),
        warnings,
    )))
}

/// Kill -9 training processes at random moments (checkpointing every step) and check that
/// every resume loads a complete checkpoint and that finished runs match a run never killed.
pub async fn ckpt_kill(a: BenchCkptKillArgs) -> Result<()> {
    let tmp;
    let work = match &a.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&work)
        .with_context(|| format!("--work-dir {}: cannot create it", work.display()))?;
    let work = std::path::absolute(&work)?;
    eprintln!("seed {}; work dir {}", a.seed, work.display());
    let corpus = work.join("corpus.txt");
    synthetic_corpus(&corpus)?;
    let store_root = match &a.store {
        Some(s) => s.trim_end_matches('/').to_string(),
        None => format!("file://{}", work.join("stores").display()),
    };
    let exe = std::env::current_exe().context("cannot find the tenax executable")?;
    let run = |args: Vec<String>| {
        std::process::Command::new(&exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot start tenax train")
    };

    // The reference: the same run, never killed.
    let ref_store = format!("{store_root}/reference");
    let t_ref = Instant::now();
    let out = run(kill_run_args(
        &corpus,
        &work.join("reference"),
        &ref_store,
        a.steps,
    ))?
    .wait_with_output()?;
    // Kills land uniformly over the length of an unkilled run.
    let span_ms = (t_ref.elapsed().as_millis() as u64).max(10);
    if !out.status.success() {
        bail!(
            "the reference run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let reference = newest_state(&Store::open(&ref_store).map_err(|e| anyhow!("{e}"))?)
        .await?
        .ok_or_else(|| anyhow!("the reference run saved no checkpoint"))?
        .0;

    let mut rng = SplitMix64::new(a.seed);
    let (mut kills, mut resumes, mut torn, mut completed, mut mismatched) = (0u64, 0, 0, 0, 0);
    let mut incomplete_seen = 0usize;
    let mut run_no = 0u64;
    let mut problems: Vec<String> = Vec::new();
    let bar = indicatif::ProgressBar::new(a.kills);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} kills {pos}/{len} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    // Bounded: every iteration either kills (at most `kills` times) or finishes a run, and a
    // run finishes after at most `steps` more steps; cap the iterations anyway.
    let max_iterations = a.kills * 4 + 20;
    let mut iteration = 0;
    let mut final_pass = false;
    loop {
        iteration += 1;
        if iteration > max_iterations {
            bail!("gave up after {max_iterations} process starts");
        }
        let store_url = format!("{store_root}/run-{run_no:04}");
        let store = Store::open(&store_url).map_err(|e| anyhow!("{e}"))?;
        let listing = tenax_storage::list_checkpoints(&store)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        incomplete_seen += listing
            .attempts
            .iter()
            .filter(|x| x.status == AttemptStatus::Incomplete)
            .count();
        for x in &listing.attempts {
            if let AttemptStatus::Corrupt { file, reason } = &x.status {
                torn += 1;
                problems.push(format!("{}: listed corrupt: {file}: {reason}", x.url));
            }
        }
        let resuming = listing.with_manifest().next().is_some();
        let mut args = kill_run_args(
            &corpus,
            &work.join(format!("run-{run_no:04}")),
            &store_url,
            a.steps,
        );
        if resuming {
            args.push("--resume".into());
            resumes += 1;
        }
        let mut child = run(args)?;
        let killing = !final_pass && kills < a.kills;
        if killing {
            let delay = 1 + rng.below(span_ms);
            let deadline = Instant::now() + Duration::from_millis(delay);
            while Instant::now() < deadline && child.try_wait()?.is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let finished_alone = child.try_wait()?.is_some();
        if killing && !finished_alone {
            child.kill()?;
            let _ = child.wait()?;
            kills += 1;
            bar.set_position(kills);
            continue;
        }
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if resuming && stderr.contains("skipped, trying an older checkpoint") {
            torn += 1;
            problems.push(format!(
                "{store_url}: a resume skipped a committed checkpoint: {stderr}"
            ));
        }
        if !out.status.success() {
            bail!("run {store_url} failed on its own: {stderr}");
        }
        if resuming && !stdout.contains("resumed from step") {
            bail!("run {store_url} did not say where it resumed: {stdout}");
        }
        // A run that reached its last step: compare with the reference, bit for bit.
        completed += 1;
        match newest_state(&store).await? {
            Some((state, _)) if state == reference => {}
            Some((state, _)) => {
                mismatched += 1;
                problems.push(format!(
                    "{store_url}: final state (step {}, cursor {}) differs from the reference",
                    state.0, state.1
                ));
            }
            None => bail!("{store_url}: finished but has no checkpoint"),
        }
        bar.set_message(format!("{completed} run(s) completed"));
        if final_pass || kills >= a.kills {
            break;
        }
        run_no += 1;
        final_pass = kills >= a.kills;
    }
    bar.finish_and_clear();
    for p in &problems {
        eprintln!("problem: {p}");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "ckpt-kill", "seed": a.seed, "store": store_root, "run_ms": span_ms, "kills": kills,
            "resumes": resumes, "completed_runs": completed, "torn_loads": torn,
            "final_mismatches": mismatched, "incomplete_attempts_seen": incomplete_seen,
        })
    );
    if torn > 0 || mismatched > 0 {
        bail!("{torn} torn load(s), {mismatched} final mismatch(es): see the problems above");
    }
    Ok(())
}

/// A fresh directory under the system temp dir (kept: it holds the evidence of the run).
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tenax-ckpt-kill-{}-{}",
        std::process::id(),
        tenax_storage::now_unix_ms()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    Ok(dir)
}

/// Options of `tenax bench ckpt`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchCkptArgs {
    /// Model preset (nano: 10.7M parameters, 128 MB of state per checkpoint).
    #[arg(long, default_value = "nano")]
    pub preset: String,
    /// Vocabulary size of the model (50257: GPT-2's, for a gpt2-small checkpoint of
    /// 1.4 GiB with its AdamW moments).
    #[arg(long, default_value_t = 65)]
    pub vocab_size: usize,
    /// Checkpoint store (default: file:// in a fresh temporary directory). S3 URLs use the
    /// AWS_* environment.
    #[arg(long)]
    pub store: Option<String>,
    /// Data-parallel ranks (and checkpoint writers).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 12)]
    pub batch_size: u64,
    /// Save every this many steps in the timed phase with saves.
    #[arg(long, default_value_t = 10)]
    pub ckpt_every: u64,
    /// Timed steps per phase; phases alternate without and with saves, twice each.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Repeats of the upload/restore comparison.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Compare upload/restore on a synthetic state of this many MiB (16 tensors) instead of
    /// the trained model's snapshot, e.g. to see a gpt2-size checkpoint (1,400 MiB).
    #[arg(long, value_name = "MIB")]
    pub state_mib: Option<usize>,
    /// Files larger than this are uploaded as multipart uploads (default: the store's, 32).
    #[arg(long, value_name = "MIB")]
    pub multipart_threshold_mib: Option<u64>,
}

/// Training stall per save (async checkpoints) and checkpoint upload/restore throughput as
/// ratios to raw object_store puts/gets of the same bytes, measured side by side.
pub async fn ckpt(a: BenchCkptArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps 0: each phase needs at least one timed step; pass --steps 1 or more");
    }
    if a.ckpt_every == 0 || a.ckpt_every > a.steps {
        bail!(
            "--ckpt-every {}: the phases with saves save every --ckpt-every of their --steps {} \
             steps; pass 1 to {}",
            a.ckpt_every,
            a.steps,
            a.steps
        );
    }
    if a.ranks == 0 {
        bail!("--ranks 0: training needs at least one rank; pass --ranks 1 or more");
    }
    if a.repeats == 0 {
        bail!("--repeats 0: the upload/restore comparison needs at least one; pass --repeats 1 or more");
    }
    let model = GptConfig::preset(&a.preset, a.vocab_size).map_err(|e| anyhow!("--preset: {e}"))?;
    let batch = BatchLayout::new(a.batch_size, 4.min(a.batch_size)).map_err(|e| anyhow!("{e}"))?;
    let layout = ParamLayout::for_config(&model);
    let tmp = tempfile_dir()?;
    let store_url = a
        .store
        .clone()
        .unwrap_or_else(|| format!("file://{}", tmp.join("store").display()));
    let mut options = tenax_storage::StoreOptions::default();
    if let Some(mib) = a.multipart_threshold_mib {
        options.multipart_threshold_bytes = mib << 20;
    }
    let store = Store::open_with(&store_url, options).map_err(|e| anyhow!("{e}"))?;
    let trainer = synthetic_trainer(&model, a.vocab_size, batch, a.ranks).await?;
    let mut checkpointer = Checkpointer::start(
        store.clone(),
        CheckpointPolicy {
            share_wait: Default::default(),
            writers: a.ranks as u32,
            retention: None,
        },
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let meta = |step: u64| CheckpointMeta {
        step,
        generation: 0,
        config: serde_json::json!({"bench": "ckpt"}),
        config_hash: "bench".into(),
        data_cursor: step,
        rng: serde_json::Value::Null,
        extra: serde_json::Value::Null,
    };
    let snapshot_tensors = |snap: tenax_actors::Snapshot, layout: ParamLayout| {
        let mut t: Vec<TensorData> = tenax_model::named_params(&layout, &snap.params)
            .into_iter()
            .chain(snap.opt.named_state(&layout))
            .map(|n| TensorData {
                name: n.name,
                shape: n.shape,
                data: n.data,
            })
            .collect();
        t.sort_by(|x, y| x.name.cmp(&y.name));
        t
    };

    let mut step = 0u64;
    for _ in 0..3 {
        trainer
            .step(step, step * a.batch_size, 1e-3)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        step += 1;
    }
    // Alternate phases: plain, saving (copy-on-write snapshots, what the trainer does),
    // plain, saving with the snapshot deep-copied in the loop (what the trainer did before
    // snapshots were shared copy-on-write), side by side in one run.
    let (mut plain_s, mut saving_s, mut copying_s) = (0.0, 0.0, 0.0);
    let (mut stalls, mut copy_stalls, mut update_copies) = (Vec::new(), Vec::new(), Vec::new());
    let mut saves = 0u64;
    for phase in 0..4 {
        let with_saves = phase % 2 == 1;
        let deep_copy = phase == 3;
        let t0 = Instant::now();
        // The loop's own cost per save: the stall, plus any copy the next updates make
        // because the background still held the snapshot.
        let mut copied_s = 0.0;
        for i in 0..a.steps {
            let report = trainer
                .step(step, step * a.batch_size, 1e-3)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            copied_s += report.snapshot_copy_s;
            step += 1;
            if with_saves && (i + 1) % a.ckpt_every == 0 {
                let t_save = Instant::now();
                let mut snap = trainer.snapshot().await.map_err(|e| anyhow!("{e}"))?;
                if deep_copy {
                    snap = tenax_actors::Snapshot {
                        params: Arc::new(snap.params.as_ref().clone()),
                        opt: Arc::new(snap.opt.as_ref().clone()),
                    };
                }
                let l = layout.clone();
                checkpointer
                    .save(SaveJob {
                        meta: meta(step),
                        build: Arc::new(move || snapshot_tensors(snap.clone(), l.clone())),
                        share: None,
                    })
                    .map_err(|e| anyhow!("{e}"))?;
                match deep_copy {
                    true => copy_stalls.push(t_save.elapsed().as_secs_f64()),
                    false => stalls.push(t_save.elapsed().as_secs_f64()),
                }
                saves += 1;
            }
        }
        let took = t0.elapsed().as_secs_f64();
        match (with_saves, deep_copy) {
            (false, _) => plain_s += took,
            (true, false) => {
                saving_s += took;
                update_copies.push(copied_s);
            }
            (true, true) => copying_s += took,
        }
        if with_saves {
            // Uploads still running after the phase are waited for outside the timing; the
            // next plain phase starts with an idle store.
            checkpointer
                .flush(Duration::from_secs(1800))
                .await
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    let events = checkpointer.take_events();
    let committed = events
        .iter()
        .filter(|e| matches!(e, CheckpointEvent::Committed { .. }))
        .count();
    let failed = events
        .iter()
        .filter(|e| matches!(e, CheckpointEvent::Failed { .. }))
        .count();
    let step_s = plain_s / (2 * a.steps) as f64;
    let cow_saves = stalls.len().max(1) as f64;
    let stall_s = median(stalls.clone());
    let copy_stall_s = median(copy_stalls.clone());
    let update_copy_s_per_save = update_copies.iter().sum::<f64>() / cow_saves;
    let slowdown_per_save_s = (saving_s - plain_s / 2.0) / cow_saves;
    let copy_slowdown_per_save_s = (copying_s - plain_s / 2.0) / copy_stalls.len().max(1) as f64;
    let cycle_s = a.ckpt_every as f64 * step_s;

    // Upload and restore throughput against raw object_store calls on the same bytes.
    let snap = trainer.snapshot().await.map_err(|e| anyhow!("{e}"))?;
    trainer.shutdown().await;
    checkpointer.shutdown().await;
    let tensors = match a.state_mib {
        None => snapshot_tensors(snap, layout.clone()),
        Some(mib) => {
            drop(snap);
            let rows = (mib << 20) / 4 / 1024 / 16;
            (0..16)
                .map(|i| TensorData {
                    name: format!("synthetic.{i:02}"),
                    shape: vec![rows, 1024],
                    data: (0..rows * 1024)
                        .map(|j| (j % 1000) as f32 * 1e-3 + i as f32)
                        .collect(),
                })
                .collect()
        }
    };
    let content = tenax_storage::CheckpointContent {
        meta: meta(step),
        tensors,
    };
    let (mut save_ratio, mut load_ratio, mut save_mb_s, mut load_mb_s) =
        (vec![], vec![], vec![], vec![]);
    let mut bytes_total = 0u64;
    let mut read_direct = false;
    for r in 0..a.repeats {
        // The same bytes as our files, put and got with plain object_store calls (one PUT and
        // one GET per file, all files at once); for the upload ours and raw alternate which
        // goes first from repeat to repeat, the restores run in both orders every repeat.
        let ours_first = r % 2 == 0;
        let mut t_save = 0.0;
        let mut saved = None;
        let mut t_raw_put = 0.0;
        let mut files: Vec<(object_store::path::Path, bytes::Bytes)> = Vec::new();
        for turn in 0..2 {
            if (turn == 0) == ours_first {
                // The Checkpoint actor saves the snapshot it owns (`save_owned`): the copy
                // that hands this loop's content over is made before the clock starts.
                let owned = content.clone();
                let t0 = Instant::now();
                let s = tenax_storage::save_owned(&store, owned, a.ranks as u32)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                t_save = t0.elapsed().as_secs_f64();
                if files.is_empty() {
                    for f in &s.manifest.files {
                        let b = store
                            .get(&format!("{}/{}", s.folder, f.name))
                            .await
                            .map_err(|e| anyhow!("{e}"))?
                            .ok_or_else(|| anyhow!("{} vanished", f.name))?;
                        files.push((store.path(&format!("raw-{r}/{}", f.name)), b));
                    }
                }
                saved = Some(s);
            } else {
                if files.is_empty() {
                    // Raw goes first: encode the same files without timing it.
                    let probe = tenax_storage::save_checkpoint(&store, &content, a.ranks as u32)
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                    for f in &probe.manifest.files {
                        let b = store
                            .get(&format!("{}/{}", probe.folder, f.name))
                            .await
                            .map_err(|e| anyhow!("{e}"))?
                            .ok_or_else(|| anyhow!("{} vanished", f.name))?;
                        files.push((store.path(&format!("raw-{r}/{}", f.name)), b));
                    }
                }
                let t0 = Instant::now();
                futures::stream::iter(files.clone())
                    .map(|(path, bytes)| {
                        let inner = store.inner();
                        async move { inner.put(&path, bytes.into()).await }
                    })
                    .buffer_unordered(4)
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| anyhow!("raw put: {e}"))?;
                t_raw_put = t0.elapsed().as_secs_f64();
            }
        }
        let saved = saved.expect("ours ran");
        bytes_total = files.iter().map(|(_, b)| b.len() as u64).sum();
        // Restores in both orders in every repeat (ours, raw, raw, ours or the mirror), each
        // side timed twice: whoever goes first can pay for page faults that the second
        // does not, whatever the number of repeats.
        let raw_get = || {
            futures::stream::iter(files.iter().map(|(p, _)| p.clone()))
                .map(|path| {
                    let inner = store.inner();
                    async move { inner.get(&path).await?.bytes().await }
                })
                .buffer_unordered(4)
                .try_collect::<Vec<_>>()
        };
        // One untimed GET first: the uploads just filled the page cache, and whoever first
        // takes that much memory again pays for reclaiming it (3.6 s instead of 0.4 s for
        // 1 GiB here), which is no property of either side.
        drop(raw_get().await.map_err(|e| anyhow!("raw get: {e}"))?);
        let (mut t_load, mut t_raw_get) = (0.0, 0.0);
        for turn in 0..4 {
            if (turn == 0 || turn == 3) == ours_first {
                let t0 = Instant::now();
                let loaded = tenax_storage::load_checkpoint(&store, &saved.folder)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                t_load += t0.elapsed().as_secs_f64() / 2.0;
                read_direct = loaded.read_direct;
                drop(loaded);
            } else {
                let t0 = Instant::now();
                raw_get().await.map_err(|e| anyhow!("raw get: {e}"))?;
                t_raw_get += t0.elapsed().as_secs_f64() / 2.0;
            }
        }
        save_ratio.push(t_raw_put / t_save);
        load_ratio.push(t_raw_get / t_load);
        save_mb_s.push(bytes_total as f64 / 1e6 / t_save);
        load_mb_s.push(bytes_total as f64 / 1e6 / t_load);
    }
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "{}",
        serde_json::json!({
            "bench": "ckpt", "preset": a.preset, "store": store_url, "ranks": a.ranks, "threads": threads,
            "checkpoint_bytes": bytes_total, "ckpt_every": a.ckpt_every, "saves": saves,
            "committed": committed, "failed": failed,
            "step_ms": step_s * 1e3, "stall_ms_per_save_median": stall_s * 1e3,
            "stall_share_of_step": stall_s / step_s,
            "stall_share_of_cycle": stall_s / cycle_s,
            "update_copy_ms_per_save": update_copy_s_per_save * 1e3,
            "slowdown_ms_per_save": slowdown_per_save_s * 1e3,
            "slowdown_share_of_cycle": slowdown_per_save_s / cycle_s,
            "deep_copy_stall_ms_per_save_median": copy_stall_s * 1e3,
            "deep_copy_stall_share_of_step": copy_stall_s / step_s,
            "deep_copy_slowdown_ms_per_save": copy_slowdown_per_save_s * 1e3,
            "save_mb_s_median": median(save_mb_s), "upload_ratio_to_raw_put_median": median(save_ratio),
            "load_mb_s_median": median(load_mb_s), "restore_ratio_to_raw_get_median": median(load_ratio),
            "restore_read_direct": read_direct,
        })
    );
    Ok(())
}

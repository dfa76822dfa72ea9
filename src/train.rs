//! `tenax train`: one process, N data-parallel rank actors, checkpoints saved in the
//! background by the Checkpoint actor to any store URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use tenax_actors::{
    CheckpointEvent, CheckpointPolicy, Checkpointer, PipelineSpec, SaveJob, ShareJob, TrainData,
    TrainSetup, Trainer,
};
use tenax_core::ckpt::RetentionPolicy;
use tenax_core::sampler::eval_windows;
use tenax_core::slots::BatchLayout;
use tenax_data::{Tokenizer, TokenizerKind, TokenizerSpec};
use tenax_model::{AdamW, AdamWConfig, GptConfig, LrSchedule, ParamLayout};
use tenax_storage::{CheckpointMeta, LoadedCheckpoint, Store, TensorData};

use crate::config::{TrainArgs, TrainConfig};
use crate::plot::{plot_loss, LossPoint};

mod builtin;
pub(crate) mod guard;
mod local;
use local::Local;

/// Prefix of the optimizer-state tensors in a checkpoint (`adamw.m.<param>`, `adamw.v.<param>`);
/// every other tensor is a model parameter under its model name.
pub const OPTIMIZER_PREFIX: &str = "adamw.";

/// How long the end of a run waits for checkpoint uploads still in flight.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Everything a checkpoint's `config` field holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoredConfig {
    /// The resolved training config.
    pub train: TrainConfig,
    /// The model shape (vocabulary included).
    pub model: GptConfig,
    /// The tokenizer, with its vocabulary.
    pub tokenizer: TokenizerSpec,
    /// SHA-256 of the corpus text.
    pub corpus_sha256: String,
}

impl StoredConfig {
    /// Hash of everything that fixes the math of a step.
    pub fn hash(&self) -> String {
        let v = json!({"math": self.train.math(), "model": self.model, "tokenizer": self.tokenizer, "corpus": self.corpus_sha256});
        hex::encode(Sha256::digest(v.to_string().as_bytes()))
    }
}

/// The default checkpoint store of a run dir.
pub fn default_store(run_dir: &Path) -> Result<String> {
    let abs = std::path::absolute(run_dir)
        .with_context(|| format!("run dir {}: cannot resolve it", run_dir.display()))?;
    Ok(format!("file://{}", abs.join("checkpoints").display()))
}

fn create_run_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow!(
            "run dir {}: cannot create it ({e}): pick a writable --run-dir",
            dir.display()
        )
    })?;
    let probe = dir.join(".tenax-write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| {
        anyhow!(
            "run dir {}: not writable ({e}): pick a writable --run-dir",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn tensors_from(named: Vec<tenax_model::NamedTensor>) -> Vec<TensorData> {
    named
        .into_iter()
        .map(|t| TensorData {
            name: t.name,
            shape: t.shape,
            data: t.data,
        })
        .collect()
}

fn named_from(tensors: &[TensorData]) -> Vec<tenax_model::NamedTensor> {
    tensors
        .iter()
        .map(|t| tenax_model::NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: t.data.clone(),
        })
        .collect()
}

/// Where a run starts.
pub struct Start {
    /// Steps already done.
    pub step: u64,
    /// Samples already consumed.
    pub cursor: u64,
    /// Parameters, flat in layout order.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub opt: AdamW,
    /// The training guard's state that goes with it (from a checkpoint's `extra.guard` or
    /// a state copy); `None` when it holds none (a fresh start, or the guard was off).
    pub guard: Option<tenax_core::guard::GuardState>,
}

/// Everything a run needs besides its starting state: the resolved config, the data, the
/// model shape and the schedule. `tenax train` and `tenax daemon` share it.
pub struct Prepared {
    /// The resolved training config.
    pub cfg: TrainConfig,
    /// What a checkpoint's `config` field holds.
    pub stored_cfg: StoredConfig,
    /// [`StoredConfig::hash`]: what must agree on resume and across a job's nodes.
    pub config_hash: String,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Where each parameter sits in the flat vector.
    pub param_layout: ParamLayout,
    /// The math of a step, for the rank actors (`ranks` = this process's ranks).
    pub setup: TrainSetup,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// The validation windows evaluated.
    pub val_windows: Vec<u64>,
    /// The token streams.
    pub data: Arc<TrainData>,
    /// With `--pipeline-stages` above 1: the ranks form pipelines of that many stages.
    pub pipeline: Option<PipelineSpec>,
    /// The streamed dataset, when `--data` names a prepared one.
    pub stream: Option<Arc<crate::stream::StreamData>>,
}

impl Prepared {
    /// Tokens one step trains on (batch size x block size).
    pub fn tokens_per_step(&self) -> f64 {
        (self.cfg.batch_size as usize * self.stored_cfg.model.block_size) as f64
    }
}

/// Check `cfg`, load and tokenize the data (caching token shards under `run_dir/data`; the
/// built-in corpus is prepared there as a dataset, see `builtin`) and build the model shape; `stored` is the config of the checkpoint being resumed, whose
/// corpus must match.
pub fn prepare(
    cfg: TrainConfig,
    stored: Option<&StoredConfig>,
    run_dir: &Path,
) -> Result<Prepared> {
    let layout =
        BatchLayout::new(cfg.batch_size, cfg.micro_batch_size).map_err(|e| anyhow!("{e}"))?;
    // Pipelines: the data-parallel width is the number of pipelines.
    let stages = cfg.pipeline_stages.max(1);
    let pipelines = cfg.ranks as u64 / u64::from(stages);
    match stages {
        1 => layout.check_ranks(cfg.ranks as u64),
        _ => layout.check_ranks(pipelines),
    }
    .map_err(|e| match stages {
        1 => anyhow!("--ranks: {e}"),
        _ => anyhow!(
            "--ranks {} / --pipeline-stages {stages} = {pipelines} pipeline(s): {e}",
            cfg.ranks
        ),
    })?;
    let pipe_schedule = cfg.pipeline_schedule()?;
    // Check the stage count against the model before the (slow) data preparation.
    let blocks = GptConfig::preset(&cfg.preset, 256).map_or(0, |m| m.n_layer as u32);
    if stages > 1 && blocks > 0 {
        tenax_core::pipeline::split_blocks(blocks, stages)
            .map_err(|e| anyhow!("--pipeline-stages: {e}"))?;
    }
    let kind: TokenizerKind = cfg
        .tokenizer
        .parse()
        .map_err(|e| anyhow!("--tokenizer: {e}"))?;
    // Check the preset name before the (slow) data preparation.
    GptConfig::preset(&cfg.preset, 256).map_err(|e| anyhow!("--preset: {e}"))?;

    // Data: a prepared dataset is streamed; anything else is read whole.
    if let Some(url) = crate::stream::dataset_url(&cfg.data)? {
        return prepare_streamed(cfg, stored, &url, layout, stages, pipelines, pipe_schedule);
    }
    // The built-in corpus: prepared once into the run dir by `tenax data prepare`'s code,
    // then streamed like any prepared dataset.
    if cfg.data.is_empty() {
        let url = builtin::builtin_dataset(kind, run_dir)?;
        return prepare_streamed(cfg, stored, &url, layout, stages, pipelines, pipe_schedule);
    }
    let corpus = tenax_data::load_corpus(&cfg.data).map_err(|e| anyhow!("{e}"))?;
    println!(
        "corpus: {}; {} bytes; sha256 {}",
        corpus.description,
        corpus.bytes(),
        corpus.sha256
    );
    if let Some(s) = &stored {
        if s.corpus_sha256 != corpus.sha256 {
            bail!("cannot resume: the corpus changed since the checkpoint (sha256 {} then, {} now): train on the same data or start a new --run-dir", s.corpus_sha256, corpus.sha256);
        }
    }
    let dataset = tenax_data::prepare_dataset(&corpus, kind, &run_dir.join("data"))
        .map_err(|e| anyhow!("{e}"))?;
    drop(corpus);
    let tokenizer: Tokenizer = dataset.tokenizer;
    let model_cfg = GptConfig::preset(&cfg.preset, tokenizer.vocab_size())
        .map_err(|e| anyhow!("--preset: {e}"))?;
    for (split, tokens) in [("training", &dataset.train), ("validation", &dataset.val)] {
        if tenax_data::num_windows(tokens.len(), model_cfg.block_size) == 0 {
            bail!(
                "the {split} split has {} tokens, fewer than one sample of {} tokens for preset {}: give more data (--data) or a smaller --preset",
                tokens.len(),
                model_cfg.block_size + 1,
                cfg.preset
            );
        }
    }
    let stored_cfg = StoredConfig {
        train: cfg.clone(),
        model: model_cfg.clone(),
        tokenizer: tokenizer.spec(),
        corpus_sha256: dataset.corpus_sha256.clone(),
    };
    println!(
        "tokenizer: {}, vocab {}; train {} tokens, val {} tokens",
        cfg.tokenizer,
        tokenizer.vocab_size(),
        dataset.train.len(),
        dataset.val.len()
    );
    let (setup, schedule) = setup_and_schedule(&cfg, &model_cfg, layout);
    let val_windows = eval_windows(
        cfg.seed,
        tenax_data::num_windows(dataset.val.len(), model_cfg.block_size) as u64,
        cfg.eval_batches * cfg.micro_batch_size,
    );
    let canaries = crate::memorisation::plan(&cfg, &model_cfg, &tokenizer)?;
    let data = Arc::new(TrainData::in_memory(dataset.train, dataset.val).with_canaries(canaries));
    finish_prepare(
        cfg,
        stored_cfg,
        tokenizer,
        setup,
        schedule,
        val_windows,
        data,
        None,
        (stages, pipelines, pipe_schedule),
    )
}

/// The rest of [`prepare`] once the data is open: the pipeline plan and the result.
#[allow(clippy::too_many_arguments)]
fn finish_prepare(
    cfg: TrainConfig,
    stored_cfg: StoredConfig,
    tokenizer: Tokenizer,
    setup: TrainSetup,
    schedule: LrSchedule,
    val_windows: Vec<u64>,
    data: Arc<TrainData>,
    stream: Option<Arc<crate::stream::StreamData>>,
    (stages, pipelines, pipe_schedule): (u32, u64, tenax_core::pipeline::Schedule),
) -> Result<Prepared> {
    let config_hash = stored_cfg.hash();
    let model_cfg = stored_cfg.model.clone();
    let layout = setup.batch;
    let param_layout = ParamLayout::for_config(&model_cfg);
    println!(
        "model: {} ({} layers, {} heads, {} dims, block {}), {:.2}M parameters; batch {} in {} slot(s) of {}; {} rank(s)",
        cfg.preset,
        model_cfg.n_layer,
        model_cfg.n_head,
        model_cfg.n_embd,
        model_cfg.block_size,
        param_layout.total as f64 / 1e6,
        cfg.batch_size,
        layout.num_slots(),
        cfg.micro_batch_size,
        cfg.ranks
    );
    let pipeline = (stages > 1).then_some(PipelineSpec {
        stages,
        schedule: pipe_schedule,
    });
    if pipeline.is_some() {
        let per_pipeline = tenax_core::slots::slots_for_rank(layout.num_slots(), pipelines, 0);
        let plan = tenax_core::pipeline::PipelinePlan::new(
            tenax_core::pipeline::PipelineConfig {
                pipelines: pipelines as u32,
                stages,
                blocks: model_cfg.n_layer as u32,
                slots: (per_pipeline.end - per_pipeline.start) as u32,
                schedule: pipe_schedule,
            },
            cfg.ranks as u32,
        )
        .map_err(|e| anyhow!("--pipeline-stages: {e}"))?;
        println!("pipelines: {}", plan.reason());
    }
    if let Some(plan) = &data.canaries {
        println!("canaries: {}", plan.reason);
    }
    Ok(Prepared {
        cfg,
        stored_cfg,
        config_hash,
        tokenizer,
        param_layout,
        setup,
        schedule,
        val_windows,
        data,
        pipeline,
        stream,
    })
}

/// [`prepare`] for a prepared dataset streamed from `url` (see `crate::stream`).
fn prepare_streamed(
    cfg: TrainConfig,
    stored: Option<&StoredConfig>,
    url: &str,
    layout: BatchLayout,
    stages: u32,
    pipelines: u64,
    pipe_schedule: tenax_core::pipeline::Schedule,
) -> Result<Prepared> {
    use crate::stream::{StreamData, StreamOptions};
    // The block size comes from the preset; the vocabulary from the manifest.
    let block_size = GptConfig::preset(&cfg.preset, 256)
        .map_err(|e| anyhow!("--preset: {e}"))?
        .block_size;
    let opts = StreamOptions::new(
        cfg.seed,
        block_size,
        cfg.batch_size,
        cfg.prefetch_mb << 20,
        cfg.shuffle_shards,
    );
    let stream = StreamData::open(url, opts)?;
    let m = &stream.manifest;
    let tokenizer = Tokenizer::from_spec(&m.tokenizer)
        .map_err(|e| anyhow!("dataset {url}: its tokenizer: {e}"))?;
    let identity = stream.identity();
    if let Some(s) = &stored {
        if s.corpus_sha256 != identity {
            bail!("cannot resume: the data changed since the checkpoint (identity {} then, {identity} now: dataset, --data or --shuffle-shards): train on the same data or start a new --run-dir", s.corpus_sha256);
        }
    }
    println!(
        "dataset: {url}; hash {}; {} tokens in {} shards of {} source(s); streamed with a {} MiB prefetch budget; val: the first shard of each multi-shard source ({} tokens)",
        m.dataset_hash,
        m.totals.tokens,
        m.totals.shards,
        m.sources.len(),
        cfg.prefetch_mb,
        stream.val.len()
    );
    println!("sampler: {}", stream.reason);
    let model_cfg = GptConfig::preset(&cfg.preset, tokenizer.vocab_size())
        .map_err(|e| anyhow!("--preset: {e}"))?;
    let stored_cfg = StoredConfig {
        train: cfg.clone(),
        model: model_cfg.clone(),
        tokenizer: tokenizer.spec(),
        corpus_sha256: identity,
    };
    let (setup, schedule) = setup_and_schedule(&cfg, &model_cfg, layout);
    let val_windows = eval_windows(
        cfg.seed,
        tenax_data::num_windows(stream.val.len(), block_size) as u64,
        cfg.eval_batches * cfg.micro_batch_size,
    );
    let stream = Arc::new(stream);
    let data = Arc::new(TrainData {
        train: Vec::new(),
        val: stream.val.clone(),
        stream: Some(stream.clone() as Arc<dyn tenax_actors::SampleSource>),
        canaries: crate::memorisation::plan(&cfg, &model_cfg, &tokenizer)?,
    });
    finish_prepare(
        cfg,
        stored_cfg,
        tokenizer,
        setup,
        schedule,
        val_windows,
        data,
        Some(stream),
        (stages, pipelines, pipe_schedule),
    )
}

/// The state a run starts from: fresh from the seed, or the checkpoint's.
pub fn start_state(prep: &Prepared, resumed: Option<&LoadedCheckpoint>) -> Result<Start> {
    Ok(match resumed {
        None => Start {
            step: 0,
            cursor: 0,
            params: tenax_model::init_params(&prep.setup.model, &prep.param_layout, prep.cfg.seed),
            opt: AdamW::new(prep.param_layout.total),
            guard: None,
        },
        Some(c) => {
            let all = named_from(&c.tensors);
            let params = tenax_model::params_from_named(&prep.param_layout, &all)
                .map_err(|e| anyhow!("checkpoint {}: {e}", c.url))?;
            let adamw_step = c
                .manifest
                .extra
                .get("adamw_step")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| anyhow!("checkpoint {}: manifest has no adamw_step", c.url))?;
            let opt = AdamW::from_named_state(&prep.param_layout, &all, adamw_step)
                .map_err(|e| anyhow!("checkpoint {}: {e}", c.url))?;
            let guard = guard::state_of(c)?;
            println!("resumed from step {} ({})", c.manifest.step, c.url);
            Start {
                step: c.manifest.step,
                cursor: c.manifest.data_cursor,
                params,
                opt,
                guard,
            }
        }
    })
}

/// Run `tenax train`.
pub async fn run(args: TrainArgs, resume: bool) -> Result<()> {
    // Where things go: the run dir and the store, before anything else is read.
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/default"));
    create_run_dir(&run_dir)?;
    let store_url = match &args.store {
        Some(s) if !s.is_empty() => s.clone(),
        _ => default_store(&run_dir)?,
    };
    // --sign-key signs what this run commits; --trust-key refuses to resume from a
    // checkpoint not signed by it.
    let store = Store::open(&store_url)
        .map_err(|e| anyhow!("{e}"))?
        .with_keys(args.manifest_keys()?);

    // The checkpoint to resume from, if any, decides the keys left unset.
    let mut resumed = None;
    if resume {
        match tenax_storage::latest_verified(&store).await.map_err(|e| anyhow!("{e}"))? {
            None => bail!("--resume: no checkpoint in {store_url}: run without --resume to start, or point --run-dir/--store at the run to continue"),
            Some((ckpt, warnings)) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                resumed = Some(ckpt);
            }
        }
    } else {
        let listing = tenax_storage::list_checkpoints(&store)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if let Some(newest) = listing.with_manifest().last() {
            bail!("{store_url} already holds checkpoints (newest at step {}): pass --resume to continue that run, or choose another --run-dir or --store", newest.step);
        }
    }
    let stored: Option<StoredConfig> = match &resumed {
        Some(c) => Some(
            serde_json::from_value(c.manifest.config.clone())
                .map_err(|e| anyhow!("checkpoint {}: its config does not parse ({e}): it was not written by this version of tenax", c.url))?,
        ),
        None => None,
    };
    let mut args = args;
    args.run_dir = Some(run_dir.clone());
    args.store = Some(store_url.clone());
    let cfg = TrainConfig::resolve(args, stored.as_ref().map(|s| &s.train))?;
    if let Some(s) = &stored {
        let diffs = cfg.math_differences(&s.train);
        if !diffs.is_empty() {
            bail!(
                "cannot resume from {}: this run's training config differs ({}): use the checkpoint's values or a new --run-dir",
                resumed.as_ref().map(|c| c.url.as_str()).unwrap_or(""),
                diffs.join("; ")
            );
        }
    }
    let prep = prepare(cfg, stored.as_ref(), &run_dir)?;
    if let Some(plan) = &prep.data.canaries {
        crate::memorisation::write_canaries(plan, &prep.tokenizer, &run_dir)?;
    }
    let start = start_state(&prep, resumed.as_ref())?;
    if let Some(stream) = &prep.stream {
        stream.seek(start.cursor);
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut history = load_history(&metrics_path, start.step)?;
    let mut metrics = open_metrics(&metrics_path, &history)?;

    let cfg = &prep.cfg;
    let retention = (cfg.keep_last > 0 || cfg.keep_every > 0).then_some(RetentionPolicy {
        keep_last: cfg.keep_last as usize,
        keep_every: cfg.keep_every,
        min_uncommitted_age_ms: 3_600_000,
    });
    let mut checkpointer = match Checkpointer::start(
        store.clone(),
        CheckpointPolicy {
            share_wait: Default::default(),
            writers: cfg.ranks as u32,
            retention,
        },
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return Err(anyhow!("{e}")),
    };
    let guarding = guard::Guarding::new(&prep, &run_dir, start.step, start.guard.clone());
    let mut local = Local::new(
        &prep,
        &mut checkpointer,
        &mut metrics,
        &mut history,
        start,
        guarding,
    );
    let result = local.run(resumed.is_some()).await;
    let (trainer, state) = (local.trainer.take(), local.state.take());
    let end = match result {
        Ok(end) => end,
        Err(e) => {
            // Let saves already handed over finish: they are older, consistent states.
            let _ = checkpointer.flush(FLUSH_TIMEOUT).await;
            report_events(&mut checkpointer);
            checkpointer.shutdown().await;
            if let Some(t) = trainer {
                t.shutdown().await;
            }
            return Err(e);
        }
    };
    // Saves still uploading (older than the final one, which is committed).
    let _ = checkpointer.flush(FLUSH_TIMEOUT).await;
    report_events(&mut checkpointer);
    checkpointer.shutdown().await;
    // A run resumed at its target trained nothing: start a trainer for the sample.
    let trainer = match (trainer, state) {
        (Some(t), _) => t,
        (None, Some(st)) => {
            Trainer::start(prep.setup.clone(), prep.data.clone(), st.params, st.opt)
                .await
                .map_err(|e| anyhow!("{e}"))?
        }
        (None, None) => bail!("the run ended without a trainer or a state"),
    };
    if prep.data.canaries.is_some() {
        let snap = trainer
            .snapshot()
            .await
            .map_err(|e| anyhow!("the final state, for the canaries' exposure: {e}"))?;
        crate::memorisation::report_run(&prep, snap.params, end.step, &run_dir).await?;
    }
    let Prepared { cfg, tokenizer, .. } = prep;

    // A short sample of what the model learnt.
    let prompt = tokenizer.encode("\n").unwrap_or_default();
    let prompt = if prompt.is_empty() { vec![0] } else { prompt };
    match trainer.generate(prompt, 200, cfg.seed).await {
        Ok(ids) => println!("--- sample ---\n{}\n--------------", tokenizer.decode(&ids)),
        Err(e) => eprintln!("warning: could not sample text: {e}"),
    }
    trainer.shutdown().await;

    let png = run_dir.join("loss.png");
    let data_name = match cfg.data.as_slice() {
        [] => "the built-in corpus".to_string(),
        [one] => one.file_name().map_or_else(
            || one.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        many => format!("{} paths", many.len()),
    };
    let title = format!(
        "tenax {} on {data_name} ({} tokenizer)",
        cfg.preset, cfg.tokenizer
    );
    if let Err(e) = plot_loss(&png, &title, &history) {
        eprintln!("warning: {e}");
    }
    println!(
        "done: step {}, loss {:.4}{}, {:.0} tokens/s; metrics {}, plot {}, checkpoints {}",
        end.step,
        end.loss,
        end.val_loss
            .map(|v| format!(", val loss {v:.4}"))
            .unwrap_or_default(),
        end.tokens_per_s,
        metrics_path.display(),
        png.display(),
        store_url
    );
    Ok(())
}

/// Print what the checkpoint actor reported after the run.
fn report_events(checkpointer: &mut Checkpointer) {
    for event in checkpointer.take_events() {
        match event {
            CheckpointEvent::Failed { step, error } => {
                eprintln!("warning: checkpoint at step {step} failed: {error}")
            }
            CheckpointEvent::PruneFailed { error } => {
                eprintln!("warning: retention failed (checkpoints are intact): {error}")
            }
            _ => {}
        }
    }
}

/// Where a checkpoint is taken.
pub(crate) struct SaveAt {
    /// Steps done.
    pub step: u64,
    /// Samples consumed.
    pub cursor: u64,
    /// The generation saving it (0 for `tenax train`).
    pub generation: u64,
}

/// Take a host-memory snapshot (copy-on-write: it copies nothing) and hand it to the
/// checkpoint actor: all the training loop pays for a save. `guard`: the training guard's
/// state for the manifest's `extra.guard` (`None` while the guard is off).
pub(crate) async fn save_at(
    trainer: &Trainer,
    checkpointer: &Checkpointer,
    prep: &Prepared,
    at: SaveAt,
    share: Option<ShareJob>,
    guard: Option<&tenax_core::guard::GuardState>,
) -> Result<()> {
    let SaveAt {
        step,
        cursor,
        generation,
    } = at;
    let snap = trainer
        .snapshot()
        .await
        .map_err(|e| anyhow!("checkpoint at step {step}: {e}"))?;
    let (stored_cfg, config_hash) = (&prep.stored_cfg, &prep.config_hash);
    let layout = ParamLayout::for_config(&stored_cfg.model);
    let meta = CheckpointMeta {
        step,
        generation,
        config: serde_json::to_value(stored_cfg).expect("config serialises"),
        config_hash: config_hash.to_string(),
        data_cursor: cursor,
        rng: json!({"seed": stored_cfg.train.seed, "sampler": "splitmix64-fisher-yates-v1"}),
        extra: match guard {
            None => json!({"adamw_step": snap.opt.step}),
            Some(g) => json!({"adamw_step": snap.opt.step, "guard": g}),
        },
    };
    checkpointer
        .save(SaveJob {
            meta,
            build: Arc::new(move || {
                let mut tensors = tensors_from(tenax_model::named_params(&layout, &snap.params));
                tensors.extend(tensors_from(snap.opt.named_state(&layout)));
                tensors
            }),
            share,
        })
        .map_err(|e| anyhow!("checkpoint at step {step}: {e}"))
}

/// Read metrics.jsonl, keeping the steps up to `upto` (a resumed run redoes the rest).
pub(crate) fn load_history(path: &Path, upto: u64) -> Result<Vec<LossPoint>> {
    if upto == 0 || !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let step = v["step"].as_u64()?;
            (step <= upto).then(|| LossPoint {
                step,
                loss: v["loss"].as_f64().unwrap_or(f64::NAN),
                val_loss: v["val_loss"].as_f64(),
            })
        })
        .collect())
}

/// Rewrite metrics.jsonl with `history` and open it for appending.
pub(crate) fn open_metrics(path: &Path, history: &[LossPoint]) -> Result<std::fs::File> {
    let mut kept = String::new();
    if !history.is_empty() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let upto = history.last().map_or(0, |p| p.step);
        for l in text.lines() {
            if serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= upto)
            {
                kept.push_str(l);
                kept.push('\n');
            }
        }
    }
    std::fs::write(path, kept).map_err(|e| {
        anyhow!(
            "{}: cannot write ({e}): pick a writable --run-dir",
            path.display()
        )
    })?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))
}

/// The trainers' setup and the learning-rate schedule of a run of `cfg`.
fn setup_and_schedule(
    cfg: &TrainConfig,
    model_cfg: &GptConfig,
    layout: BatchLayout,
) -> (TrainSetup, LrSchedule) {
    let setup = TrainSetup {
        model: model_cfg.clone(),
        adamw: AdamWConfig {
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: 1e-8,
            weight_decay: cfg.weight_decay as f32,
        },
        grad_clip: cfg.grad_clip as f32,
        batch: layout,
        seed: cfg.seed,
        ranks: cfg.ranks,
        step_timeout: Duration::from_secs(600),
        device: cfg.step_device().expect("validated with the config"),
    };
    let schedule = LrSchedule {
        max_lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        decay_steps: cfg.lr_decay_steps,
    };
    (setup, schedule)
}

//! The memorisation probe's shell: the canaries of a run written to
//! `<run-dir>/canaries.json`, their exposure at the end of `tenax train` (written to
//! `<run-dir>/memorisation.json`), and `tenax eval memorisation RUN_OR_CKPT`, which also
//! measures verbatim extraction of training sequences.
//!
//! The decisions (which samples carry which canary, the candidates, the exposure from a
//! rank) are pure, in `tenax_core::canary`; this module scores token sequences with the
//! model on the CPU and writes reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use serde_json::json;
use tenax_core::canary::{candidates, exposure, CanaryPlan, Exposure};
use tenax_data::{Tokenizer, TokenizerKind};
use tenax_model::{Gpt, GptConfig};

use crate::train::StoredConfig;

/// Rows scored in one forward pass (bounds the logits held: rows x tokens x vocabulary).
const ROWS_PER_PASS: usize = 64;

/// The canaries of a run with `cfg`'s probe on, for a model of `model` (block size) and
/// `tokenizer` (canary tokens are drawn from its ids, GPT-2's `<|endoftext|>` excluded);
/// `None` when canaries are off.
pub fn plan(
    cfg: &crate::config::TrainConfig,
    model: &GptConfig,
    tokenizer: &Tokenizer,
) -> Result<Option<Arc<CanaryPlan>>> {
    let Some(c) = cfg.canary_config() else {
        return Ok(None);
    };
    let alphabet = match tokenizer.kind() {
        TokenizerKind::Gpt2 => tokenizer.vocab_size() - 1,
        _ => tokenizer.vocab_size(),
    } as u32;
    let horizon = cfg.lr_decay_steps.saturating_mul(cfg.batch_size);
    let plan = CanaryPlan::new(cfg.seed, &c, alphabet, horizon, model.block_size + 1)
        .map_err(|e| anyhow!("--canaries: {e}"))?;
    Ok(Some(Arc::new(plan)))
}

/// Writes `plan`'s canaries (their secrets, as ids and decoded text) and every insertion
/// (sample, canary, window offset) to `<run_dir>/canaries.json`.
pub fn write_canaries(plan: &CanaryPlan, tokenizer: &Tokenizer, run_dir: &Path) -> Result<()> {
    let canaries: Vec<_> = plan
        .canaries
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "reps": c.reps,
                "prefix": c.prefix,
                "secret": c.secret,
                "prefix_text": tokenizer.decode(&c.prefix),
                "secret_text": tokenizer.decode(&c.secret),
            })
        })
        .collect();
    let insertions: Vec<_> = plan
        .at
        .iter()
        .map(|(s, i)| json!([s, i.canary, i.offset]))
        .collect();
    let v = json!({
        "plan": plan.reason,
        "alphabet": plan.alphabet,
        "log2_space": plan.log2_space(),
        "canaries": canaries,
        "insertions_sample_canary_offset": insertions,
    });
    let path = run_dir.join("canaries.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n").map_err(|e| {
        anyhow!(
            "{}: cannot write ({e}): pick a writable --run-dir",
            path.display()
        )
    })
}

/// A CPU model of `model` holding `params`.
fn cpu_model(model: &GptConfig, params: &[f32]) -> Result<Gpt> {
    let gpt = Gpt::new(model.clone()).map_err(|e| anyhow!("{e}"))?;
    gpt.set_params(params).map_err(|e| anyhow!("{e}"))?;
    Ok(gpt)
}

/// Negative log2-likelihood (bits) of the tokens after the first `context` of each row of
/// `rows` (all of one length, at most block size + 1).
fn log_perplexities(gpt: &Gpt, rows: &[Vec<u32>], context: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_PASS) {
        let len = chunk[0].len();
        let t = len - 1;
        let inputs: Vec<u32> = chunk.iter().flat_map(|r| r[..t].iter().copied()).collect();
        let logits = gpt
            .forward(&inputs, chunk.len())
            .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec3::<f32>()?))
            .map_err(|e| anyhow!("scoring canaries: {e}"))?;
        for (row, lg) in chunk.iter().zip(&logits) {
            let mut bits = 0f64;
            for p in (context - 1)..t {
                let l = &lg[p];
                let max = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let sum: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum();
                let logp = l[row[p + 1] as usize] as f64 - max - sum.ln();
                bits -= logp / std::f64::consts::LN_2;
            }
            out.push(bits);
        }
    }
    Ok(out)
}

/// One canary's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CanaryResult {
    /// The canary's id.
    pub id: u32,
    /// Its insertions.
    pub reps: u64,
    /// Its secret's log-perplexity given its prefix, in bits.
    pub log_perplexity_bits: f64,
    /// Its exposure.
    pub exposure: Exposure,
}

/// The exposure of every canary of `plan` under `params`, ranked among up to
/// `max_candidates` candidate secrets each (seeded by `seed`).
pub fn exposures(
    model: &GptConfig,
    params: &[f32],
    plan: &CanaryPlan,
    max_candidates: u64,
    seed: u64,
) -> Result<Vec<CanaryResult>> {
    let gpt = cpu_model(model, params)?;
    let mut out = Vec::new();
    for c in &plan.canaries {
        let (cands, enumerated) = candidates(c, plan.alphabet, max_candidates, seed);
        let mut rows = vec![c.tokens()];
        rows.extend(cands.into_iter().map(|s| {
            let mut r = c.prefix.clone();
            r.extend(s);
            r
        }));
        let lp = log_perplexities(&gpt, &rows, c.prefix.len())?;
        out.push(CanaryResult {
            id: c.id,
            reps: c.reps,
            log_perplexity_bits: lp[0],
            exposure: exposure(lp[0], &lp[1..], plan.log2_space(), enumerated),
        });
    }
    Ok(out)
}

/// Per repetition count: canaries, mean exposure (sampled and extrapolated), mean
/// log-perplexity, in the order of the plan.
pub fn by_reps(results: &[CanaryResult]) -> Vec<serde_json::Value> {
    let mut reps: Vec<u64> = Vec::new();
    for r in results {
        if !reps.contains(&r.reps) {
            reps.push(r.reps);
        }
    }
    reps.iter()
        .map(|&n| {
            let g: Vec<&CanaryResult> = results.iter().filter(|r| r.reps == n).collect();
            let mean = |f: &dyn Fn(&CanaryResult) -> f64| {
                g.iter().map(|r| f(r)).sum::<f64>() / g.len() as f64
            };
            json!({
                "reps": n,
                "canaries": g.len(),
                "mean_exposure_bits": mean(&|r| r.exposure.exposure_bits),
                "mean_extrapolated_bits": mean(&|r| r.exposure.extrapolated_bits),
                "mean_log_perplexity_bits": mean(&|r| r.log_perplexity_bits),
                "max_measurable_bits": g[0].exposure.max_measurable_bits,
            })
        })
        .collect()
}

/// The exposure section of a report, and lines for a person.
pub fn exposure_report(
    plan: &CanaryPlan,
    results: &[CanaryResult],
) -> (serde_json::Value, Vec<String>) {
    let groups = by_reps(results);
    let sampled = results.iter().any(|r| !r.exposure.enumerated);
    let mut lines = vec![format!(
        "canary exposure ({} canaries, |R| = 2^{:.1}; {}):",
        results.len(),
        plan.log2_space(),
        match (sampled, results.first()) {
            (true, Some(r)) => format!(
                "rank estimated from {} random candidates each, so at most {:.2} bits are measurable; 'extrapolated' fits a normal to the candidates",
                r.exposure.candidates, r.exposure.max_measurable_bits
            ),
            _ => "every other secret ranked: exact".into(),
        }
    )];
    for g in &groups {
        lines.push(format!(
            "  {:>5} reps: exposure {:6.2} bits (extrapolated {:6.2}), log-perplexity {:7.2} bits, {} canaries",
            g["reps"].as_u64().unwrap_or(0), g["mean_exposure_bits"].as_f64().unwrap_or(f64::NAN),
            g["mean_extrapolated_bits"].as_f64().unwrap_or(f64::NAN),
            g["mean_log_perplexity_bits"].as_f64().unwrap_or(f64::NAN),
            g["canaries"]
        ));
    }
    let v = json!({
        "plan": plan.reason,
        "log2_space": plan.log2_space(),
        "rank_estimated_from_a_sample": sampled,
        "by_reps": groups,
        "canaries": results,
    });
    (v, lines)
}

/// Verbatim extraction: of rows of `2k` tokens, the share whose last `k` tokens greedy
/// decoding reproduces exactly from the first `k`, and the share of tokens reproduced.
fn extraction(gpt: &Gpt, rows: &[Vec<u32>], k: usize) -> Result<(f64, f64)> {
    let (mut exact, mut tokens) = (0usize, 0usize);
    for chunk in rows.chunks(ROWS_PER_PASS) {
        let mut ctx: Vec<Vec<u32>> = chunk.iter().map(|r| r[..k].to_vec()).collect();
        for _ in 0..k {
            let t = ctx[0].len();
            let flat: Vec<u32> = ctx.iter().flatten().copied().collect();
            let logits = gpt
                .forward(&flat, ctx.len())
                .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec3::<f32>()?))
                .map_err(|e| anyhow!("greedy decoding: {e}"))?;
            for (c, lg) in ctx.iter_mut().zip(&logits) {
                let last = &lg[t - 1];
                // Argmax, the lowest id on ties.
                let mut best = 0;
                for (i, &x) in last.iter().enumerate() {
                    if x > last[best] {
                        best = i;
                    }
                }
                c.push(best as u32);
            }
        }
        for (r, c) in chunk.iter().zip(&ctx) {
            let same = r[k..2 * k]
                .iter()
                .zip(&c[k..])
                .filter(|(a, b)| a == b)
                .count();
            tokens += same;
            exact += usize::from(same == k);
        }
    }
    let n = rows.len().max(1) as f64;
    Ok((exact as f64 / n, tokens as f64 / (n * k as f64)))
}

/// `tenax eval memorisation`'s arguments.
#[derive(clap::Args, Debug)]
pub struct MemorisationArgs {
    /// A run dir (its checkpoints/ store is read), a store URL, or one checkpoint's URL.
    pub run_or_ckpt: String,
    /// Which step (default: the newest checkpoint that verifies).
    #[arg(long)]
    pub step: Option<u64>,
    /// Extraction: prefix and continuation length in tokens (2k must fit a window of
    /// block size + 1) [default: 32, or the largest that fits].
    #[arg(long, value_name = "TOKENS")]
    pub k: Option<usize>,
    /// Extraction: training sequences tried (spread evenly over the samples trained on,
    /// skipping those carrying canaries), and as many validation sequences as a baseline.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub count: u64,
    /// Exposure: candidate secrets each canary is ranked among (all of them when the
    /// secret space is no larger).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub candidates: u64,
    /// Where a prepared text corpus is cached for reading the training sequences
    /// (default: <run-dir>/data when a run dir is given, else a temporary folder).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// End with one JSON object on the last line (after the data preparation's lines)
    /// instead of the report's lines.
    #[arg(long)]
    pub json: bool,
    /// Evaluate only a checkpoint signed by this ed25519 public key (FILE.pub).
    #[arg(long, value_name = "FILE.pub")]
    pub trust_key: Option<PathBuf>,
}

/// The store URL and run dir a RUN_OR_CKPT names.
fn resolve(target: &str) -> Result<(String, Option<PathBuf>)> {
    let p = Path::new(target);
    if target.contains("://") {
        return Ok((target.to_string(), None));
    }
    if !p.exists() {
        bail!("{target}: no such run dir or checkpoint: give a run dir, a store URL (file://, s3://) or a checkpoint's URL");
    }
    let abs = std::path::absolute(p).with_context(|| format!("{target}: cannot resolve it"))?;
    if abs.join("checkpoints").is_dir() {
        return Ok((
            format!("file://{}", abs.join("checkpoints").display()),
            Some(abs),
        ));
    }
    Ok((format!("file://{}", abs.display()), None))
}

/// `tenax eval memorisation RUN_OR_CKPT`: the canaries' exposure (when the run planted
/// some) and verbatim extraction of training sequences against validation ones.
pub async fn eval(args: MemorisationArgs) -> Result<()> {
    let (url, run_dir) = resolve(&args.run_or_ckpt)?;
    let loaded = crate::ckpt::load_one(&url, args.step, args.trust_key.as_deref()).await?;
    let (stored, flat) = crate::ckpt::model_of(&loaded)?;
    let StoredConfig { train, model, .. } = &stored;
    let block = model.block_size;
    let k = args.k.unwrap_or(32.min(block.div_ceil(2)));
    if k == 0 || 2 * k > block + 1 {
        bail!(
            "--k {k}: a prefix and continuation of {k} tokens each need a window of {} tokens, this model's is {} (block size + 1): use --k 1..={}",
            2 * k,
            block + 1,
            block.div_ceil(2)
        );
    }
    if args.count == 0 || args.candidates == 0 {
        bail!("--count and --candidates must be at least 1");
    }
    let cursor = loaded.manifest.data_cursor;
    if cursor == 0 {
        bail!(
            "checkpoint {}: it was saved before any training step: nothing was memorised yet",
            loaded.url
        );
    }
    // The data as training read it: the same preparation (a text corpus is re-read and
    // re-tokenised; a prepared dataset streamed).
    let tmp;
    let cache = match (&args.cache_dir, &run_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => {
            tmp = tempfile::tempdir().context("a temporary folder for the corpus cache")?;
            tmp.path().to_path_buf()
        }
    };
    let mut cfg = train.clone();
    cfg.ranks = 1;
    cfg.pipeline_stages = 1;
    let prep = crate::train::prepare(cfg, Some(&stored), &cache)?;
    let plan = prep.data.canaries.clone();
    let seed = train.seed;
    // Held training sequences: evenly spread over the samples trained on.
    let count = args.count.min(cursor);
    let held: Vec<u64> = (0..count)
        .map(|i| i * cursor / count)
        .filter(|s| plan.as_ref().is_none_or(|p| p.at(*s).is_none()))
        .collect();
    if let Some(stream) = &prep.stream {
        stream.seek(held.first().copied().unwrap_or(0));
    }
    let data = prep.data.clone();
    let (model_c, plan_c, flat_c) = (model.clone(), plan.clone(), flat.clone());
    let candidates_max = args.candidates;
    let (report, lines) =
        tokio::task::spawn_blocking(move || -> Result<(serde_json::Value, Vec<String>)> {
            let gpt = cpu_model(&model_c, &flat_c)?;
            let mut train_rows = Vec::new();
            for &s in &held {
                let (mut i, mut t) = (Vec::new(), Vec::new());
                data.read_samples(seed, block, s..s + 1, &mut i, &mut t)
                    .map_err(|e| anyhow!("training sample {s}: {e}"))?;
                i.push(*t.last().expect("a window"));
                train_rows.push(i[..2 * k].to_vec());
            }
            let windows = tenax_data::num_windows(data.val.len(), block) as u64;
            let nval = count.min(windows);
            let mut val_rows = Vec::new();
            for j in 0..nval {
                let w = (j * windows / nval) as usize;
                let (mut i, mut t) = (Vec::new(), Vec::new());
                tenax_data::window(&data.val, block, w, &mut i, &mut t);
                i.push(*t.last().expect("a window"));
                val_rows.push(i[..2 * k].to_vec());
            }
            let (train_exact, train_tokens) = extraction(&gpt, &train_rows, k)?;
            let (val_exact, val_tokens) = extraction(&gpt, &val_rows, k)?;
            let mut v = json!({
                "extraction": {
                    "k": k,
                    "greedy": true,
                    "train_sequences": train_rows.len(),
                    "train_exact_fraction": train_exact,
                    "train_token_fraction": train_tokens,
                    "val_sequences": val_rows.len(),
                    "val_exact_fraction": val_exact,
                    "val_token_fraction": val_tokens,
                }
            });
            let mut lines = Vec::new();
            if let Some(plan) = &plan_c {
                let results = exposures(&model_c, &flat_c, plan, candidates_max, seed)?;
                let (e, l) = exposure_report(plan, &results);
                v["exposure"] = e;
                lines = l;
            }
            Ok((v, lines))
        })
        .await??;
    let mut report = report;
    report["checkpoint"] = json!(loaded.url);
    report["step"] = json!(loaded.manifest.step);
    report["data_cursor"] = json!(cursor);
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let x = &report["extraction"];
    println!(
        "checkpoint {} (step {}, {} samples trained on)",
        loaded.url, loaded.manifest.step, cursor
    );
    println!(
        "verbatim extraction, greedy, k = {k}: {:.1}% of {} training sequences reproduced exactly ({:.1}% of tokens); validation baseline {:.1}% of {} ({:.1}% of tokens)",
        100.0 * x["train_exact_fraction"].as_f64().unwrap_or(0.0),
        x["train_sequences"],
        100.0 * x["train_token_fraction"].as_f64().unwrap_or(0.0),
        100.0 * x["val_exact_fraction"].as_f64().unwrap_or(0.0),
        x["val_sequences"],
        100.0 * x["val_token_fraction"].as_f64().unwrap_or(0.0),
    );
    match lines.is_empty() {
        true => println!("no canaries: the run was trained without --canaries"),
        false => lines.iter().for_each(|l| println!("{l}")),
    }
    Ok(())
}

/// The end of `tenax train` with canaries: their exposure under the final `params`,
/// printed and written to `<run_dir>/memorisation.json`.
pub async fn report_run(
    prep: &crate::train::Prepared,
    params: Arc<Vec<f32>>,
    step: u64,
    run_dir: &Path,
) -> Result<()> {
    let Some(plan) = prep.data.canaries.clone() else {
        return Ok(());
    };
    let (model, n, seed) = (
        prep.stored_cfg.model.clone(),
        prep.cfg.canary_candidates,
        prep.cfg.seed,
    );
    let plan2 = plan.clone();
    let results =
        tokio::task::spawn_blocking(move || exposures(&model, &params, &plan2, n, seed)).await??;
    let (mut v, lines) = exposure_report(&plan, &results);
    v["step"] = json!(step);
    let path = run_dir.join("memorisation.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "exposure": v }))? + "\n",
    )
    .map_err(|e| anyhow!("{}: cannot write ({e})", path.display()))?;
    for l in lines {
        println!("{l}");
    }
    println!("memorisation report: {}", path.display());
    Ok(())
}

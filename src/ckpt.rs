//! `tenax ckpt list|inspect|verify|prune|export|eval|keygen`: operating on the checkpoints of
//! a store.
//!
//! Every command but `keygen` takes a store URL (the root given to `tenax train --store`);
//! `inspect`, `verify`, `export` and `eval` also take the URL of one checkpoint folder inside
//! it. `verify`, `export` and `eval` take `--trust-key FILE.pub`: then a checkpoint whose manifest is not
//! signed by that key is refused. `keygen` writes a signing key pair (`tenax_storage::signing`).
//! `export --format hf` (submodule `hf`) writes a Hugging Face transformers GPT-2 directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tenax_core::ckpt::RetentionPolicy;
use tenax_storage::manifest::parse_folder_name;
use tenax_storage::{AttemptStatus, ListedAttempt, Listing, ManifestKeys, Store, TrustKey};

use crate::train::OPTIMIZER_PREFIX;

mod hf;

/// The store, and the one checkpoint folder the URL names (if it names one).
fn open(url: &str) -> Result<(Store, Option<String>)> {
    let trimmed = url.trim_end_matches('/');
    if let Some((parent, last)) = trimmed.rsplit_once('/') {
        if parse_folder_name(last).is_some() && !parent.ends_with(':') && !parent.ends_with(":/") {
            let store = Store::open(parent).map_err(|e| anyhow!("{e}"))?;
            return Ok((store, Some(last.to_string())));
        }
    }
    Ok((Store::open(url).map_err(|e| anyhow!("{e}"))?, None))
}

/// [`open`], the store refusing checkpoints not signed by the key in `trust_key` (if given).
fn open_trusting(url: &str, trust_key: Option<&Path>) -> Result<(Store, Option<String>)> {
    let (store, folder) = open(url)?;
    let Some(path) = trust_key else {
        return Ok((store, folder));
    };
    let trust = TrustKey::read_file(path).map_err(anyhow::Error::msg)?;
    let keys = ManifestKeys {
        sign: None,
        trust: Some(Arc::new(trust)),
    };
    Ok((store.with_keys(keys), folder))
}

/// `signed by <key id>` or `unsigned`, for a manifest.
fn signed_by(m: &tenax_storage::Manifest) -> String {
    match m.signer.get(..16) {
        Some(id) if !m.signature.is_empty() => format!("signed by {id}"),
        _ => "unsigned".into(),
    }
}

async fn listing(store: &Store) -> Result<Listing> {
    tenax_storage::list_checkpoints(store)
        .await
        .map_err(|e| anyhow!("{e}"))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn status_detail(a: &ListedAttempt) -> String {
    match &a.status {
        AttemptStatus::Committed => "committed".into(),
        AttemptStatus::Incomplete => "incomplete (no manifest)".into(),
        AttemptStatus::Corrupt { file, reason } => format!("corrupt ({file}: {reason})"),
    }
}

/// `tenax ckpt list URL [--json]`.
pub async fn list(url: &str, as_json: bool) -> Result<()> {
    let (store, folder) = open(url)?;
    if folder.is_some() {
        bail!("{url} is one checkpoint; `tenax ckpt list` takes the store URL above it");
    }
    let l = listing(&store).await?;
    if as_json {
        let rows: Vec<_> = l
            .attempts
            .iter()
            .map(|a| {
                let mut row = json!({
                    "step": a.step,
                    "generation": a.generation,
                    "attempt": a.attempt,
                    "status": a.status.label(),
                    "bytes": a.bytes(),
                    "url": a.url,
                    "folder": a.folder,
                });
                if let Some(m) = &a.manifest {
                    row["created_unix_ms"] = json!(m.created_unix_ms);
                    row["data_cursor"] = json!(m.data_cursor);
                    row["format_version"] = json!(m.format_version);
                    if !m.signature.is_empty() {
                        row["signer"] = json!(m.signer);
                    }
                    // The nodes that wrote its files (a checkpoint written by several).
                    let writers: std::collections::BTreeSet<&str> =
                        m.files.iter().filter_map(|f| f.writer.as_deref()).collect();
                    row["writers"] = json!(writers);
                    row["files"] = json!(m
                        .files
                        .iter()
                        .map(|f| json!({"name": f.name, "bytes": f.size, "writer": f.writer}))
                        .collect::<Vec<_>>());
                }
                if let AttemptStatus::Corrupt { file, reason } = &a.status {
                    row["problem"] = json!(format!("{file}: {reason}"));
                }
                row
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if l.attempts.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    println!(
        "{:>10}  {:>4}  {:<12}  {:>10}  folder  status",
        "step", "gen", "attempt", "size"
    );
    for a in &l.attempts {
        println!(
            "{:>10}  {:>4}  {:<12}  {:>10}  {}  {}",
            a.step,
            a.generation,
            a.attempt,
            human(a.bytes()),
            a.folder,
            status_detail(a)
        );
    }
    Ok(())
}

/// The attempts with a manifest that a command acts on: the one the URL names, `--step`'s, or
/// all of them.
fn pick<'a>(
    l: &'a Listing,
    url: &str,
    folder: Option<&str>,
    step: Option<u64>,
) -> Result<Vec<&'a ListedAttempt>> {
    let chosen: Vec<&ListedAttempt> = l
        .with_manifest()
        .filter(|a| folder.is_none_or(|f| a.folder == f))
        .filter(|a| step.is_none_or(|s| a.step == s))
        .collect();
    if chosen.is_empty() {
        match (folder, step) {
            (Some(f), _) => bail!("no committed checkpoint {f} in the store: `tenax ckpt list` on the store URL shows what exists"),
            (None, Some(s)) => bail!(
                "no committed checkpoint of step {s} in {url}: `tenax ckpt list {url}` shows what exists"
            ),
            (None, None) => bail!("no committed checkpoints in {url}"),
        }
    }
    Ok(chosen)
}

/// `tenax ckpt inspect URL [--step N]`: the newest (or the given) checkpoint's manifest.
pub async fn inspect(url: &str, step: Option<u64>) -> Result<()> {
    let (store, folder) = open(url)?;
    let l = listing(&store).await?;
    let a = *pick(&l, url, folder.as_deref(), step)?
        .last()
        .expect("non-empty");
    let m = a.manifest.as_ref().ok_or_else(|| {
        anyhow!(
            "checkpoint {}: {}",
            a.url,
            status_detail(a).trim_start_matches("corrupt ")
        )
    })?;
    println!("checkpoint {}  [{}]", a.url, status_detail(a));
    println!(
        "  step {}  generation {}  attempt {}  format v{}  created {} (unix ms)  {}",
        m.step,
        m.generation,
        m.attempt,
        m.format_version,
        m.created_unix_ms,
        signed_by(m)
    );
    println!(
        "  data cursor {}  config hash {}",
        m.data_cursor, m.config_hash
    );
    println!("  rng {}", m.rng);
    println!("  extra {}", m.extra);
    if let Some(t) = m.config.get("train") {
        println!("  train config {t}");
    }
    if let Some(t) = m.config.get("model") {
        println!("  model {t}");
    }
    for f in &m.files {
        let slices = m.tensors_in(&f.name).count();
        let (alg, hash) = f.hash();
        println!(
            "  file {}  {}  {slices} tensor slices  {} {hash}",
            f.name,
            human(f.size),
            alg.name().to_lowercase().replace('-', "")
        );
    }
    let shapes = m.tensor_shapes();
    let params: usize = shapes
        .iter()
        .filter(|(n, _)| !n.starts_with(OPTIMIZER_PREFIX))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "  {} tensors ({} slices), {} model parameters",
        shapes.len(),
        m.tensors.len(),
        params
    );
    Ok(())
}

/// `tenax ckpt verify URL [--step N] [--trust-key FILE.pub]`: re-hash every file, and with a
/// trust key check every manifest's signature first; fails naming each bad checkpoint.
pub async fn verify(url: &str, step: Option<u64>, trust_key: Option<&Path>) -> Result<()> {
    let (store, folder) = open_trusting(url, trust_key)?;
    let l = listing(&store).await?;
    let mut bad = Vec::new();
    for a in pick(&l, url, folder.as_deref(), step)? {
        match tenax_storage::verify_checkpoint(&store, &a.folder).await {
            Ok(r) => println!(
                "ok   {}  ({} files, {}, {} tensor slices, {})",
                a.url,
                r.files,
                human(r.bytes),
                r.tensors,
                a.manifest
                    .as_ref()
                    .map_or_else(|| "unsigned".into(), signed_by)
            ),
            Err(
                e @ (tenax_storage::StorageError::Corrupt { .. }
                | tenax_storage::StorageError::Untrusted { .. }),
            ) => {
                println!("BAD  {e}");
                bad.push(a.url.clone());
            }
            Err(e) => return Err(anyhow!("{e}")),
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} checkpoint(s) failed verification: {}",
            bad.len(),
            bad.join(", ")
        );
    }
    Ok(())
}

/// `tenax ckpt prune URL --keep-last K [--keep-every M] [--min-age-s S] [--dry-run]`.
pub async fn prune(
    url: &str,
    keep_last: usize,
    keep_every: u64,
    min_age_s: u64,
    dry_run: bool,
) -> Result<()> {
    let (store, folder) = open(url)?;
    if folder.is_some() {
        bail!("{url} is one checkpoint; `tenax ckpt prune` takes the store URL above it");
    }
    let policy = RetentionPolicy {
        keep_last,
        keep_every,
        min_uncommitted_age_ms: min_age_s.saturating_mul(1000),
    };
    let report = tenax_storage::prune(&store, &policy, &[], tenax_storage::now_unix_ms(), dry_run)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if report.decisions.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    for d in &report.decisions {
        let verb = match (d.keep, dry_run) {
            (true, _) => "keep  ",
            (false, true) => "would delete",
            (false, false) => "delete",
        };
        println!("{verb}  {}  ({})", d.folder, d.reason);
    }
    let n = report.decisions.iter().filter(|d| !d.keep).count();
    if dry_run {
        println!(
            "dry run: {n} folder(s), {} would be deleted; nothing was deleted",
            human(report.deleted_bytes)
        );
    } else {
        println!(
            "deleted {n} folder(s): {} objects, {}",
            report.deleted_objects,
            human(report.deleted_bytes)
        );
    }
    Ok(())
}

/// The checkpoint that `export` and `eval` read: the one the URL names, `--step`'s, or the
/// newest good one of the store (with `trust_key`, the newest that verifies and is signed).
pub(crate) async fn load_one(
    url: &str,
    step: Option<u64>,
    trust_key: Option<&Path>,
) -> Result<tenax_storage::LoadedCheckpoint> {
    let (store, folder) = open_trusting(url, trust_key)?;
    Ok(match (&folder, step) {
        (None, None) => {
            let (loaded, warnings) = tenax_storage::latest_verified(&store)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .ok_or_else(|| anyhow!("no checkpoints in {url}: nothing to read"))?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            loaded
        }
        _ => {
            let l = listing(&store).await?;
            let a = *pick(&l, url, folder.as_deref(), step)?
                .last()
                .expect("non-empty");
            tenax_storage::load_checkpoint(&store, &a.folder)
                .await
                .map_err(|e| anyhow!("{e}"))?
        }
    })
}

/// What `tenax ckpt export` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One safetensors file, tenax's tensor names.
    #[default]
    Safetensors,
    /// A Hugging Face transformers GPT-2 directory (config.json, model.safetensors,
    /// tokenizer files).
    Hf,
}

/// `tenax ckpt export URL --out FILE [--format safetensors|hf]`: the model weights of one
/// checkpoint (or the newest good one of a store).
///
/// `safetensors` (default): one file; tensor names are the model's parameter names
/// (`wte.weight`, `h.00.attn.c_attn.weight`, ...); the only metadata is `tenax_model`, the
/// model config as JSON, so identical weights of one model give a byte-identical file.
/// `hf`: a directory that transformers' `GPT2LMHeadModel.from_pretrained` loads (see
/// [`hf::export`]).
/// With `trust_key`, the checkpoint's manifest must be signed by that key: from a store
/// URL, the newest checkpoint that verifies and is signed by it.
pub async fn export(
    url: &str,
    step: Option<u64>,
    out: &Path,
    format: ExportFormat,
    trust_key: Option<&Path>,
) -> Result<()> {
    let loaded = load_one(url, step, trust_key).await?;
    let weights: Vec<tenax_storage::TensorData> = loaded
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with(OPTIMIZER_PREFIX))
        .cloned()
        .collect();
    if weights.is_empty() {
        bail!("checkpoint {}: it holds no model weights", loaded.url);
    }
    if format == ExportFormat::Hf {
        return hf::export(&loaded, &weights, out);
    }
    let model = loaded
        .manifest
        .config
        .get("model")
        .cloned()
        .unwrap_or_default();
    let metadata = HashMap::from([("tenax_model".to_string(), model.to_string())]);
    let bytes = tenax_storage::shard::encode_shard_with_metadata(&weights, Some(metadata))
        .map_err(|e| anyhow!("checkpoint {}: cannot encode the weights: {e}", loaded.url))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out {}: cannot create its directory", out.display()))?;
    }
    write_atomic(out, &bytes)?;
    let params: usize = weights.iter().map(|t| t.data.len()).sum();
    println!(
        "exported {} tensors, {params} parameters, step {} of {} -> {} ({}, sha256 {})",
        weights.len(),
        loaded.manifest.step,
        loaded.url,
        out.display(),
        human(bytes.len() as u64),
        tenax_storage::manifest::sha256_hex(&bytes)
    );
    Ok(())
}

/// Writes `bytes` to `out` through a `.partial` file renamed into place.
fn write_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| anyhow!("--out {}: cannot write it ({e})", out.display()))
}

/// The model of a checkpoint: its stored config (model shape and tokenizer) and its
/// parameters, flat in layout order.
pub(crate) fn model_of(
    loaded: &tenax_storage::LoadedCheckpoint,
) -> Result<(crate::train::StoredConfig, Vec<f32>)> {
    let stored: crate::train::StoredConfig =
        serde_json::from_value(loaded.manifest.config.clone()).map_err(|e| {
            anyhow!(
                "checkpoint {}: its config does not parse ({e}): it was not written by this version of tenax",
                loaded.url
            )
        })?;
    let layout = tenax_model::ParamLayout::for_config(&stored.model);
    let named: Vec<tenax_model::NamedTensor> = loaded
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with(OPTIMIZER_PREFIX))
        .map(|t| tenax_model::NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: t.data.clone(),
        })
        .collect();
    let flat = tenax_model::params_from_named(&layout, &named)
        .map_err(|e| anyhow!("checkpoint {}: {e}", loaded.url))?;
    Ok((stored, flat))
}

/// `tenax ckpt eval URL --text FILE [--step N] [--json]`: the model's mean next-token
/// cross-entropy (nats) on a text, encoded with the checkpoint's own tokenizer.
///
/// The tokens are cut into windows of `block_size + 1` that overlap by one token (window
/// `i` is tokens `i*B ..= i*B + B`), so every token after the first is predicted once, up
/// to a remainder shorter than a window, which is left out. `--json` prints the loss, the
/// counts and the token ids evaluated, for `scripts/hf-check` to repeat in PyTorch.
pub async fn eval(
    url: &str,
    step: Option<u64>,
    text: &Path,
    as_json: bool,
    trust_key: Option<&Path>,
) -> Result<()> {
    let loaded = load_one(url, step, trust_key).await?;
    let (stored, flat) = model_of(&loaded)?;
    let content = std::fs::read_to_string(text).map_err(|e| {
        anyhow!(
            "--text {}: cannot read it as UTF-8 text ({e})",
            text.display()
        )
    })?;
    let tokenizer = tenax_data::Tokenizer::from_spec(&stored.tokenizer)
        .map_err(|e| anyhow!("checkpoint {}: {e}", loaded.url))?;
    let tokens = tokenizer.encode(&content).map_err(|e| {
        anyhow!(
            "--text {}: {e}: evaluate on text the checkpoint's tokenizer can encode",
            text.display()
        )
    })?;
    let block = stored.model.block_size;
    let windows = tokens.len().saturating_sub(1) / block;
    if windows == 0 {
        bail!(
            "--text {}: {} tokens, fewer than the {} of one window (block size + 1): give a longer text",
            text.display(),
            tokens.len(),
            block + 1
        );
    }
    let gpt = tenax_model::Gpt::new(stored.model.clone()).map_err(|e| anyhow!("{e}"))?;
    gpt.set_params(&flat).map_err(|e| anyhow!("{e}"))?;
    let mut sum = 0f64;
    for w in 0..windows {
        let win = &tokens[w * block..=(w + 1) * block];
        sum += f64::from(
            gpt.loss_sum(&win[..block], &win[1..], 1)
                .map_err(|e| anyhow!("{e}"))?,
        );
    }
    let predictions = windows * block;
    let loss = sum / predictions as f64;
    if as_json {
        let used = &tokens[..=windows * block];
        println!(
            "{}",
            json!({
                "checkpoint": loaded.url,
                "step": loaded.manifest.step,
                "tokenizer": stored.tokenizer.kind.name(),
                "block_size": block,
                "windows": windows,
                "predictions": predictions,
                "loss": loss,
                "tokens": used,
            })
        );
    } else {
        println!(
            "loss {loss:.6} (nats per token) over {predictions} predictions in {windows} windows of {} tokens; step {} of {}",
            block + 1,
            loaded.manifest.step,
            loaded.url
        );
    }
    Ok(())
}

/// `tenax ckpt keygen --out FILE`: a fresh ed25519 key pair for signing checkpoint manifests:
/// the private key in FILE (mode 0600; for `--sign-key`), the public key in FILE.pub (for
/// `--trust-key`). Existing files are never overwritten.
pub fn keygen(out: &Path) -> Result<()> {
    let public = tenax_storage::signing::write_key_pair(out).map_err(anyhow::Error::msg)?;
    println!(
        "wrote {} (private: --sign-key, keep it secret) and {} (public key {}: --trust-key)",
        out.display(),
        tenax_storage::signing::public_key_path(out).display(),
        public.id()
    );
    Ok(())
}

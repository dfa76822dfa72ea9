//! `tenax ckpt list|inspect|verify`: operating on the checkpoints of a store.

use anyhow::{anyhow, bail, Result};
use tenax_storage::{ListedCheckpoint, Store};

async fn listing(url: &str) -> Result<(Store, tenax_storage::Listing)> {
    let store = Store::open(url).map_err(|e| anyhow!("{e}"))?;
    let listing = tenax_storage::list_checkpoints(&store)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok((store, listing))
}

/// `tenax ckpt list URL`.
pub async fn list(url: &str) -> Result<()> {
    let (_, l) = listing(url).await?;
    if l.committed.is_empty() && l.uncommitted.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    println!(
        "{:>10}  {:>4}  {:<14}  {:>10}  {:<24}  folder",
        "step", "gen", "attempt", "size", "created (unix ms)"
    );
    for c in &l.committed {
        match &c.manifest {
            Ok(m) => {
                let size: u64 = m.files.iter().map(|f| f.size).sum();
                println!(
                    "{:>10}  {:>4}  {:<14}  {:>10}  {:<24}  {}",
                    m.step,
                    m.generation,
                    m.attempt,
                    human(size),
                    m.created_unix_ms,
                    c.folder
                );
            }
            Err(e) => println!(
                "{:>10}  {:>4}  {:<14}  {:>10}  {:<24}  {} (bad manifest: {e})",
                "?", "?", "?", "?", "?", c.folder
            ),
        }
    }
    for f in &l.uncommitted {
        println!(
            "{:>10}  {:>4}  {:<14}  {:>10}  {:<24}  {f} (uncommitted: no manifest)",
            "-", "-", "-", "-", "-"
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn pick<'a>(
    l: &'a tenax_storage::Listing,
    url: &str,
    step: Option<u64>,
) -> Result<Vec<&'a ListedCheckpoint>> {
    let chosen: Vec<&ListedCheckpoint> = match step {
        None => l.committed.iter().collect(),
        Some(s) => l
            .committed
            .iter()
            .filter(|c| c.manifest.as_ref().is_ok_and(|m| m.step == s))
            .collect(),
    };
    if chosen.is_empty() {
        match step {
            Some(s) => bail!(
                "no checkpoint of step {s} in {url}: `tenax ckpt list {url}` shows what exists"
            ),
            None => bail!("no checkpoints in {url}"),
        }
    }
    Ok(chosen)
}

/// `tenax ckpt inspect URL [--step N]`: the newest (or the given step's) manifest.
pub async fn inspect(url: &str, step: Option<u64>) -> Result<()> {
    let (_, l) = listing(url).await?;
    let c = *pick(&l, url, step)?.last().expect("non-empty");
    let m = c
        .manifest
        .as_ref()
        .map_err(|e| anyhow!("checkpoint {}: bad manifest: {e}", c.url))?;
    println!("checkpoint {}", c.url);
    println!(
        "  step {}  generation {}  attempt {}  format v{}",
        m.step, m.generation, m.attempt, m.format_version
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
        println!("  file {}  {}  sha256 {}", f.name, human(f.size), f.sha256);
    }
    let params: usize = m
        .tensors
        .iter()
        .filter(|t| t.file == crate::train::PARAMS_FILE)
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    println!("  {} tensors, {} parameters", m.tensors.len(), params);
    Ok(())
}

/// `tenax ckpt verify URL [--step N]`: re-hash every file; fails if any checkpoint is bad.
pub async fn verify(url: &str, step: Option<u64>) -> Result<()> {
    let (store, l) = listing(url).await?;
    let mut bad = Vec::new();
    for c in pick(&l, url, step)? {
        match tenax_storage::verify_checkpoint(&store, &c.folder).await {
            Ok(r) => println!(
                "ok   {}  ({} files, {}, {} tensors)",
                c.url,
                r.files,
                human(r.bytes),
                r.tensors
            ),
            Err(e) => {
                println!("BAD  {e}");
                bad.push(c.url.clone());
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} of the checkpoints in {url} failed verification: {}",
            bad.len(),
            bad.join(", ")
        );
    }
    Ok(())
}

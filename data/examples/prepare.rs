//! The data preparation pipeline without the tenax CLI around it, for measuring its
//! throughput with a small release build (`tenax data prepare` calls the same function).
//!
//! ```sh
//! cargo run --release -p tenax-data --example prepare -- \
//!     --source NAME=PATH[:WEIGHT]... --out DIR [--tokenizer bytes|char|gpt2] \
//!     [--config FILE.toml] [--threads N] [--near-dup-memory-kib N] [--spill-dir DIR]
//! ```
//!
//! Prints one JSON line: input MB, seconds, MB/s, documents read and kept, tokens, the
//! dataset hash, and the near-dup index's peak memory and spills.

use std::path::PathBuf;
use std::time::Instant;

use tenax_data::prepare::config::{PrepareConfig, RunOptions};
use tenax_data::prepare::source::SourceSpec;
use tenax_data::prepare::{prepare, Progress};
use tenax_data::TokenizerKind;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut sources = Vec::new();
    let mut out: Option<PathBuf> = None;
    let mut tokenizer = TokenizerKind::Bytes;
    let mut config = PrepareConfig::default();
    let mut options = RunOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--source" => sources.push(SourceSpec::parse(&value()?)?),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--tokenizer" => tokenizer = value()?.parse()?,
            "--config" => config = PrepareConfig::from_toml_file(&PathBuf::from(value()?))?,
            "--threads" => options.threads = value()?.parse()?,
            "--near-dup-memory-kib" => {
                options.near_dup_memory_bytes = value()?.parse::<u64>()? << 10
            }
            "--spill-dir" => options.spill_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    let started = Instant::now();
    let manifest = prepare(
        &sources,
        tokenizer,
        &config,
        &options,
        &out,
        &|_: &Progress| {},
    )?;
    let secs = started.elapsed().as_secs_f64();
    let mb = manifest.sources.iter().map(|s| s.input_bytes).sum::<u64>() as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "input_mb": mb,
            "seconds": secs,
            "mb_per_s": mb / secs,
            "docs_read": manifest.totals.docs_read,
            "docs_kept": manifest.totals.docs_kept,
            "exact_dups": manifest.sources.iter().map(|s| s.exact_dups).sum::<u64>(),
            "near_dups": manifest.sources.iter().map(|s| s.near_dups).sum::<u64>(),
            "filtered": manifest.sources.iter().map(|s| s.filtered.values().sum::<u64>()).sum::<u64>(),
            "tokens": manifest.totals.tokens,
            "shards": manifest.totals.shards,
            "dataset_hash": manifest.dataset_hash,
            "near_dup_index": manifest.near_dup_index,
        })
    );
    Ok(())
}

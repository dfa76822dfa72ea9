//! `tenax data`: the CLI shell of the data preparation pipeline in `tenax_data::prepare`.
//!
//! `report` (`tenax data report RUN_OR_URL`) prints a dataset's manifest statistics and a
//! run's flagged batches. `prepare` parses the flags, builds the [`PrepareConfig`] (TOML file, then flags), runs
//! the pipeline on a blocking thread with a progress bar, and prints a summary. A local
//! path or `file://` URL is written in place; any other store URL (`s3://...`) is prepared
//! in a local staging folder and then uploaded through `tenax_storage::Store`, shards first
//! and the manifest last, each create-only (a re-run with the same result uploads nothing
//! new; a different dataset at the same URL is refused).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tenax_data::prepare::config::{PrepareConfig, RunOptions, DEFAULT_NEAR_DUP_MEMORY_MIB};
use tenax_data::prepare::manifest::Manifest;
use tenax_data::prepare::neardup::NearDupStats;
use tenax_data::prepare::source::SourceSpec;
use tenax_data::prepare::{prepare as run_prepare, Progress, MANIFEST_FILE};
use tenax_data::TokenizerKind;

/// `tenax data ...`.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Turn raw text into a deduplicated, filtered, scrubbed dataset of token shards.
    ///
    /// Each --source is NAME=PATH[:WEIGHT]: a text file, a .jsonl file (one JSON object a
    /// line, the text in "text"), or a directory of them (recursive, sorted). Documents are
    /// NFC-normalised, exact and near duplicates (MinHash/LSH) removed, Gopher-style quality
    /// filters applied, e-mails, phone numbers, IPs, card numbers, keys and tokens replaced
    /// by placeholders (<EMAIL>, <PHONE>, ...), and the rest tokenized into fixed-size shards
    /// per source, with manifest.json listing every count, shard hash and the dataset hash.
    Prepare(PrepareArgs),
    /// Show a prepared dataset's mixture shares, filter and scrub statistics (from its
    /// manifest.json) and a run's flagged batches (from its flagged.jsonl, written by the
    /// training guard).
    Report(ReportArgs),
}

/// Flags of `tenax data prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// A source, NAME=PATH_OR_URL[:WEIGHT] (repeat for a mixture), e.g. web=/data/web:2.
    #[arg(long = "source", value_name = "NAME=PATH[:WEIGHT]", required = true)]
    pub sources: Vec<String>,
    /// Where the dataset goes: a local folder, file:///abs/dir or s3://bucket/prefix.
    #[arg(long, value_name = "URL")]
    pub out: String,
    /// Tokenizer: bytes, char or gpt2.
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    /// TOML file of pipeline settings ([input], nfc, [dedup], [filters], [scrub], [output]);
    /// see docs/ARCHITECTURE.md, "Data preparation".
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Tokens per shard (overrides [output] shard_tokens).
    #[arg(long, value_name = "N")]
    pub shard_tokens: Option<u64>,
    /// Worker threads (default: one per CPU). Never changes the output.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Most MiB the near-dup (MinHash/LSH) index holds in memory; past it, band keys and
    /// signatures spill to files under --spill-dir. Never changes the output; spilling
    /// costs time (each batch rereads the spilled runs), so size it to the corpus
    /// (about 1 KiB a kept document with the default [dedup]).
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_NEAR_DUP_MEMORY_MIB)]
    pub near_dup_memory_mib: u64,
    /// Folder for near-dup spill files (a private subfolder, removed at the end; default:
    /// the local output or staging folder).
    #[arg(long, value_name = "DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Local folder to prepare in before uploading to a remote --out (default: a temporary
    /// folder, deleted afterwards).
    #[arg(long, value_name = "DIR")]
    pub staging: Option<PathBuf>,
    /// No progress bar (for logs and tests).
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `tenax data prepare`.
pub async fn prepare(args: PrepareArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || prepare_blocking(&args))
        .await
        .context("the data prepare thread panicked")?
        .map(|_| ())
}

/// Where the dataset is written locally, and where it goes after.
enum Target {
    /// Written in place.
    Local(PathBuf),
    /// Written to `staging`, then uploaded to `url`.
    Remote {
        url: String,
        staging: PathBuf,
        _temp: Option<tempfile::TempDir>,
    },
}

/// The whole command, synchronously; returns the manifest it wrote.
pub fn prepare_blocking(args: &PrepareArgs) -> Result<Manifest> {
    let kind: TokenizerKind = args
        .tokenizer
        .parse()
        .with_context(|| format!("--tokenizer {:?}", args.tokenizer))?;
    let mut config = match &args.config {
        Some(path) => PrepareConfig::from_toml_file(path)?,
        None => PrepareConfig::default(),
    };
    if let Some(n) = args.shard_tokens {
        config.output.shard_tokens = n;
        config.validate("--shard-tokens")?;
    }
    let sources = args
        .sources
        .iter()
        .map(|s| SourceSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let target = if let Some(path) = args.out.strip_prefix("file://") {
        Target::Local(PathBuf::from(path))
    } else if args.out.contains("://") {
        let (staging, temp) = match &args.staging {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("tenax-prepare-")
                    .tempdir()
                    .context("cannot create a staging folder: pass --staging DIR")?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        Target::Remote {
            url: args.out.clone(),
            staging,
            _temp: temp,
        }
    } else if args.out.is_empty() {
        bail!("--out is empty: pass a folder, file:///abs/dir or s3://bucket/prefix");
    } else {
        Target::Local(PathBuf::from(&args.out))
    };
    let local = match &target {
        Target::Local(p) => p.clone(),
        Target::Remote { staging, .. } => staging.clone(),
    };

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} prepare [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    };
    if args.near_dup_memory_mib == 0 {
        bail!("--near-dup-memory-mib 0: the near-dup index needs at least 1 MiB; pass 1 or more");
    }
    let options = RunOptions {
        threads: args.threads,
        near_dup_memory_bytes: args.near_dup_memory_mib.saturating_mul(1 << 20),
        spill_dir: args.spill_dir.clone(),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let on_progress = |p: &Progress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_read);
        bar.set_message(format!(
            "{} docs read, {} kept, {} tokens",
            p.docs_read, p.docs_kept, p.tokens
        ));
    };
    let manifest = run_prepare(&sources, kind, &config, &options, &local, &on_progress)?;
    bar.finish_and_clear();
    let elapsed_s = started.elapsed().as_secs_f64();

    if let Target::Remote { url, staging, .. } = &target {
        upload(url, staging, &manifest)?;
    }
    print_summary(&manifest, &args.out, elapsed_s);
    Ok(manifest)
}

/// Uploads the shards, then the manifest, from `staging` to the store at `url`.
fn upload(url: &str, staging: &Path, manifest: &Manifest) -> Result<()> {
    let store = tenax_storage::Store::open(url)?;
    // Inside `tenax` this runs on a blocking thread of the runtime; a test has none.
    let own_runtime = match tokio::runtime::Handle::try_current() {
        Ok(_) => None,
        Err(_) => Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        ),
    };
    let put = |key: &str| -> Result<()> {
        let bytes = std::fs::read(staging.join(key))
            .with_context(|| format!("cannot read the staged {}", staging.join(key).display()))?;
        let fut = store.put_new_or_same(key, bytes::Bytes::from(bytes));
        let res = match &own_runtime {
            Some(rt) => rt.block_on(fut),
            None => tokio::runtime::Handle::current().block_on(fut),
        };
        res.map(|_| ()).with_context(|| {
            format!(
                "cannot upload {key} to {url}: a different dataset may already be there; \
                 choose a new --out"
            )
        })
    };
    for shard in manifest.sources.iter().flat_map(|s| &s.shards) {
        put(&shard.file)?;
    }
    put(MANIFEST_FILE)
}

fn print_summary(m: &Manifest, out: &str, elapsed_s: f64) {
    let input_bytes: u64 = m.sources.iter().map(|s| s.input_bytes).sum();
    println!(
        "prepared {out}: {} documents read, {} kept, {} tokens in {} shards ({}); \
         {:.1} MB in {elapsed_s:.1} s ({:.1} MB/s)",
        m.totals.docs_read,
        m.totals.docs_kept,
        m.totals.tokens,
        m.totals.shards,
        m.tokenizer.kind,
        input_bytes as f64 / 1e6,
        input_bytes as f64 / 1e6 / elapsed_s.max(1e-9),
    );
    for s in &m.sources {
        let filtered: u64 = s.filtered.values().sum();
        let scrubbed: u64 = s.scrubbed.values().sum();
        println!(
            "  {:<12} weight {:<5} docs {:>9} kept {:>9} exact-dup {:>7} near-dup {:>7} \
             filtered {:>7} scrubbed {:>6} tokens {:>11}",
            s.name,
            s.weight,
            s.docs_read,
            s.docs_kept,
            s.exact_dups,
            s.near_dups,
            filtered,
            scrubbed,
            s.tokens
        );
    }
    if let Some(line) = near_dup_line(&m.near_dup_index) {
        println!("{line}");
    }
    println!("dataset hash {}", m.dataset_hash);
}

/// The near-dup index's memory and spills in one line (`None` when near dedup was off or
/// the manifest predates the report).
fn near_dup_line(n: &NearDupStats) -> Option<String> {
    (n.bound_bytes > 0).then(|| {
        format!(
            "near-dup index: peak {:.1} MiB of a {:.1} MiB bound, {} spills, {:.1} MiB \
             spilled, {:.1} MiB read back",
            n.peak_bytes as f64 / MIB,
            n.bound_bytes as f64 / MIB,
            n.spills,
            n.spilled_bytes as f64 / MIB,
            n.spill_read_bytes as f64 / MIB,
        )
    })
}

/// Bytes in a MiB, for printing.
const MIB: f64 = (1u64 << 20) as f64;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DataCommand,
    }

    fn parse(args: &[&str]) -> PrepareArgs {
        let mut all = vec!["data", "prepare"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            DataCommand::Prepare(a) => a,
            DataCommand::Report(_) => unreachable!("parsed `data prepare`"),
        }
    }

    #[test]
    fn prepares_a_small_corpus_from_flags_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let doc = |seed: usize| -> String {
            let mut words = vec!["the".to_string(), "and".to_string()];
            words.extend((0..80).map(|i| format!("word{seed}x{i}")));
            words.join(" ")
        };
        std::fs::write(
            root.join("a.jsonl"),
            format!(
                "{}\n{}\n{}\n",
                serde_json::json!({"text": doc(1)}),
                serde_json::json!({"text": doc(1)}),
                serde_json::json!({"text": format!("{} mail me at a.b@example.org", doc(2))}),
            ),
        )
        .unwrap();
        std::fs::create_dir(root.join("books")).unwrap();
        std::fs::write(root.join("books/x.txt"), doc(3)).unwrap();
        std::fs::write(root.join("c.toml"), "[dedup]\nnear = false\n").unwrap();
        let web = format!("web={}:2", root.join("a.jsonl").display());
        let books = format!("books={}", root.join("books").display());
        let out = root.join("out");
        let out_url = format!("file://{}", out.display());
        let config = root.join("c.toml");
        let args = parse(&[
            "--source",
            &web,
            "--source",
            &books,
            "--out",
            &out_url,
            "--tokenizer",
            "bytes",
            "--config",
            config.to_str().unwrap(),
            "--shard-tokens",
            "100",
            "--quiet",
        ]);
        let m = prepare_blocking(&args).unwrap();
        assert!(!m.config.dedup.near, "the TOML file was applied");
        assert_eq!(m.config.output.shard_tokens, 100, "the flag was applied");
        assert_eq!(m.sources[0].exact_dups, 1);
        assert_eq!(m.sources[0].docs_kept, 2);
        assert_eq!(m.sources[0].weight, 2.0);
        assert_eq!(m.sources[1].docs_kept, 1);
        assert!(m.sources[0].shards.len() > 1);
        assert_eq!(Manifest::read(&out.join(MANIFEST_FILE)).unwrap(), m);

        // The same command again gives the same dataset hash.
        let again = prepare_blocking(&args).unwrap();
        assert_eq!(again.dataset_hash, m.dataset_hash);

        // Through a store URL: staged, then uploaded (memory:// takes the same path as s3://).
        let mut remote = parse(&["--source", &web, "--out", "memory://ds", "--quiet"]);
        remote.tokenizer = "bytes".into();
        prepare_blocking(&remote).unwrap();

        // A tiny near-dup bound with a spill folder: same dataset, the bound reported,
        // no spill files left; an unusable spill folder is named.
        let spill = root.join("spill");
        let spill_str = spill.to_str().unwrap().to_string();
        let near_args = |spill_dir: &str, out: &str| {
            let mut a = parse(&[
                "--source",
                &web,
                "--out",
                out,
                "--tokenizer",
                "bytes",
                "--quiet",
                "--near-dup-memory-mib",
                "1",
                "--spill-dir",
                spill_dir,
            ]);
            a.shard_tokens = Some(100);
            a
        };
        let out2 = root.join("out2");
        let bounded = prepare_blocking(&near_args(&spill_str, out2.to_str().unwrap())).unwrap();
        assert_eq!(bounded.near_dup_index.bound_bytes, 1 << 20);
        assert!(bounded.near_dup_index.peak_bytes <= 1 << 20);
        let report = render_report(Some(("out2", &bounded)), None);
        assert!(report.contains("near-dup index: peak "), "{report}");
        assert!(report.contains("of a 1.0 MiB bound"), "{report}");
        assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
        let file = root.join("a.jsonl");
        let err = format!(
            "{:#}",
            prepare_blocking(&near_args(file.to_str().unwrap(), out2.to_str().unwrap()))
                .unwrap_err()
        );
        assert!(
            err.contains("a.jsonl") && err.contains("--spill-dir"),
            "{err}"
        );

        // User errors name the flag.
        let bad = parse(&["--source", "nope", "--out", &out_url, "--quiet"]);
        let err = format!("{:#}", prepare_blocking(&bad).unwrap_err());
        assert!(err.contains("--source \"nope\""), "{err}");
        let bad = parse(&[
            "--source",
            &web,
            "--out",
            &out_url,
            "--tokenizer",
            "x",
            "--quiet",
        ]);
        let err = format!("{:#}", prepare_blocking(&bad).unwrap_err());
        assert!(
            err.contains("--tokenizer") && err.contains("bytes, char, gpt2"),
            "{err}"
        );
        let bad = parse(&[
            "--source",
            &web,
            "--out",
            &out_url,
            "--shard-tokens",
            "0",
            "--quiet",
        ]);
        let err = format!("{:#}", prepare_blocking(&bad).unwrap_err());
        assert!(
            err.contains("--shard-tokens") && err.contains("shard_tokens"),
            "{err}"
        );
    }
}

/// Flags of `tenax data report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run dir (its flagged.jsonl, and the prepared dataset its newest checkpoint trained
    /// on, if any) or a prepared dataset (a folder with manifest.json, or a store URL).
    #[arg(value_name = "RUN_OR_URL")]
    pub target: String,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs `tenax data report`.
pub async fn report(args: ReportArgs) -> Result<()> {
    let local = Path::new(&args.target);
    let is_run = !args.target.contains("://")
        && (local.join(FLAGGED_FILE).is_file() || local.join("metrics.jsonl").is_file());
    let (dataset, flagged) = match is_run {
        true => {
            let flagged = read_flagged(&local.join(FLAGGED_FILE))?;
            let url = run_dataset(local)?;
            (url, Some(flagged))
        }
        false => match crate::stream::dataset_url(&[PathBuf::from(&args.target)])? {
            Some(url) => (Some(url), None),
            None => bail!(
                "{}: neither a run dir (no metrics.jsonl or {FLAGGED_FILE}) nor a prepared dataset (no {MANIFEST_FILE}): give a --run-dir of `tenax train` or an --out of `tenax data prepare`",
                args.target
            ),
        },
    };
    let manifest = match &dataset {
        Some(url) => Some((url.clone(), read_manifest(url).await?)),
        None => None,
    };
    let m = manifest.as_ref().map(|(u, m)| (u.as_str(), m));
    if args.json {
        println!("{}", report_json(m, flagged.as_deref()));
    } else {
        print!("{}", render_report(m, flagged.as_deref()));
    }
    Ok(())
}

use crate::train::guard::FLAGGED_FILE;

/// The flagged steps of a run (none when the file does not exist).
fn read_flagged(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("{}: cannot read it: {e}", path.display()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))
        })
        .collect()
}

/// The prepared dataset a run trained on, from the config of its newest checkpoint in
/// the run dir's default store (`<run>/checkpoints`): `None` for the in-memory path or
/// when there is no checkpoint there.
fn run_dataset(run: &Path) -> Result<Option<String>> {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else {
        return Ok(None);
    };
    let mut manifests: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("MANIFEST.json"))
        .filter(|p| p.is_file())
        .collect();
    manifests.sort();
    let Some(newest) = manifests.last() else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(newest)
        .with_context(|| format!("{}: cannot read it", newest.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", newest.display()))?;
    let data: Vec<PathBuf> = v["config"]["train"]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default();
    crate::stream::dataset_url(&data)
}

/// A prepared dataset's manifest, read and checked (format and dataset hash).
async fn read_manifest(url: &str) -> Result<Manifest> {
    let store = tenax_storage::Store::open(url).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let bytes = store
        .get(MANIFEST_FILE)
        .await
        .map_err(|e| anyhow::anyhow!("dataset {url}: cannot read {MANIFEST_FILE}: {e}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "dataset {url}: no {MANIFEST_FILE}: give the --out of `tenax data prepare`"
            )
        })?;
    Manifest::from_bytes(&bytes, Path::new(&format!("{url}/{MANIFEST_FILE}")))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The sampler's drawn share of each source (its quota per block of
/// `tenax_core::mixture::MIX_BLOCK` samples).
fn drawn_shares(m: &Manifest) -> Vec<f64> {
    let weights: Vec<f64> = m.sources.iter().map(|s| s.weight).collect();
    let block = tenax_core::mixture::MIX_BLOCK;
    tenax_core::mixture::quotas(&weights, block)
        .into_iter()
        .map(|q| q as f64 / block as f64)
        .collect()
}

/// Counts by name as "name n, name n" (empty: "-").
fn counts(v: &impl serde::Serialize) -> String {
    let v = serde_json::to_value(v).unwrap_or_default();
    let parts: Vec<String> = v
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, n)| n.as_u64() != Some(0))
                .map(|(k, n)| format!("{k} {n}"))
                .collect()
        })
        .unwrap_or_default();
    match parts.is_empty() {
        true => "-".into(),
        false => parts.join(", "),
    }
}

/// Flagged samples by source, in first-seen order.
fn flagged_by_source(flagged: &[serde_json::Value]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for line in flagged {
        for s in line["samples"].as_array().into_iter().flatten() {
            let src = s["source"].as_str().unwrap_or("?").to_string();
            match out.iter_mut().find(|(n, _)| *n == src) {
                Some((_, c)) => *c += 1,
                None => out.push((src, 1)),
            }
        }
    }
    out
}

/// The report as text: the dataset's mixture, filter and scrub tables, then the flagged
/// batches.
pub fn render_report(
    dataset: Option<(&str, &Manifest)>,
    flagged: Option<&[serde_json::Value]>,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if let Some((url, m)) = dataset {
        let t = &m.totals;
        let _ = writeln!(
            o,
            "dataset {url}\n  hash {}, tokenizer {:?}, {} documents read, {} kept, {} tokens in {} shards",
            &m.dataset_hash[..m.dataset_hash.len().min(16)],
            m.tokenizer.kind,
            t.docs_read,
            t.docs_kept,
            t.tokens,
            t.shards
        );
        let _ = writeln!(
            o,
            "\nmixture\n  {:<16} {:>7} {:>7} {:>7} {:>10} {:>7} {:>12}",
            "source", "weight", "share", "drawn", "docs kept", "shards", "tokens"
        );
        for (s, drawn) in m.sources.iter().zip(drawn_shares(m)) {
            let _ = writeln!(
                o,
                "  {:<16} {:>7} {:>6.1}% {:>6.1}% {:>10} {:>7} {:>12}",
                s.name,
                s.weight,
                100.0 * s.share,
                100.0 * drawn,
                s.docs_kept,
                s.shards.len(),
                s.tokens
            );
        }
        let _ = writeln!(o, "\nfilters (documents dropped)");
        for s in &m.sources {
            let _ = writeln!(
                o,
                "  {:<16} read {}, exact dups {}, near dups {}, by rule: {}, not documents: {}",
                s.name,
                s.docs_read,
                s.exact_dups,
                s.near_dups,
                counts(&s.filtered),
                counts(&s.skipped)
            );
        }
        if let Some(line) = near_dup_line(&m.near_dup_index) {
            let _ = writeln!(o, "  {line}");
        }
        let _ = writeln!(o, "\nscrubbing (values replaced)");
        for s in &m.sources {
            let _ = writeln!(
                o,
                "  {:<16} {} documents: {}",
                s.name,
                s.docs_scrubbed,
                counts(&s.scrubbed)
            );
        }
    }
    if let Some(flagged) = flagged {
        if !o.is_empty() {
            o.push('\n');
        }
        let _ = writeln!(o, "flagged batches: {} ({FLAGGED_FILE})", flagged.len());
        for l in flagged {
            let srcs: Vec<String> = l["samples"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    format!(
                        "{}:{}#{}",
                        s["source"].as_str().unwrap_or("?"),
                        s["shard"].as_str().unwrap_or("?"),
                        s["window"]
                    )
                })
                .collect();
            let _ = writeln!(
                o,
                "  step {} {}: loss {:.4} (bound {}), grad norm {:.4} (bound {}); samples {}",
                l["step"],
                l["action"].as_str().unwrap_or("?"),
                l["loss"].as_f64().unwrap_or(f64::NAN),
                l["max_loss"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.4}")),
                l["grad_norm"].as_f64().unwrap_or(f64::NAN),
                l["max_grad_norm"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.4}")),
                srcs.join(" ")
            );
        }
        let by = flagged_by_source(flagged);
        if !by.is_empty() {
            let parts: Vec<String> = by.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let _ = writeln!(o, "  flagged samples by source: {}", parts.join(", "));
        }
    }
    o
}

/// The report as one JSON object.
fn report_json(
    dataset: Option<(&str, &Manifest)>,
    flagged: Option<&[serde_json::Value]>,
) -> serde_json::Value {
    let mut v = serde_json::json!({});
    if let Some((url, m)) = dataset {
        let sources: Vec<serde_json::Value> = m
            .sources
            .iter()
            .zip(drawn_shares(m))
            .map(|(s, drawn)| {
                serde_json::json!({
                    "name": s.name, "weight": s.weight, "share": s.share, "drawn_share": drawn,
                    "docs_read": s.docs_read, "docs_kept": s.docs_kept, "exact_dups": s.exact_dups,
                    "near_dups": s.near_dups, "filtered": s.filtered, "skipped": s.skipped,
                    "docs_scrubbed": s.docs_scrubbed, "scrubbed": s.scrubbed, "tokens": s.tokens,
                    "shards": s.shards.len(),
                })
            })
            .collect();
        v["dataset"] = serde_json::json!({"url": url, "dataset_hash": m.dataset_hash, "totals": m.totals, "near_dup_index": m.near_dup_index, "sources": sources});
    }
    if let Some(f) = flagged {
        v["flagged"] = serde_json::json!(f);
        v["flagged_by_source"] = serde_json::json!(flagged_by_source(f));
    }
    v
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn flagged_batches_are_listed_with_their_sources() {
        let flagged: Vec<serde_json::Value> = vec![
            serde_json::json!({"step": 12, "action": "skip", "loss": 30.0, "max_loss": 3.3, "grad_norm": 1.0, "max_grad_norm": 2.0,
                "samples": [{"source": "web", "shard": "web-00001.tok", "window": 4}, {"source": "code", "shard": "code-00000.tok", "window": 9}]}),
            serde_json::json!({"step": 13, "action": "rollback", "loss": 31.0, "max_loss": 3.3, "grad_norm": 1.0, "max_grad_norm": 2.0,
                "samples": [{"source": "web", "shard": "web-00002.tok", "window": 1}]}),
        ];
        let text = render_report(None, Some(&flagged));
        assert!(
            text.starts_with("flagged batches: 2 (flagged.jsonl)\n"),
            "{text}"
        );
        assert!(
            text.contains("  step 12 skip: loss 30.0000 (bound 3.3000), grad norm 1.0000 (bound 2.0000); samples web:web-00001.tok#4 code:code-00000.tok#9\n"),
            "{text}"
        );
        assert!(text.contains("step 13 rollback"), "{text}");
        assert!(
            text.ends_with("flagged samples by source: web 2, code 1\n"),
            "{text}"
        );
        assert_eq!(
            render_report(None, Some(&[])),
            "flagged batches: 0 (flagged.jsonl)\n"
        );
    }

    #[test]
    fn zero_counts_are_left_out() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("a", 0u64);
        m.insert("b", 3u64);
        assert_eq!(counts(&m), "b 3");
        m.insert("b", 0);
        assert_eq!(counts(&m), "-");
    }
}

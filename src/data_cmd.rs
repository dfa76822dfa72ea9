//! `tenax data`: the CLI shell of the data preparation pipeline in `tenax_data::prepare`.
//!
//! `prepare` parses the flags, builds the [`PrepareConfig`] (TOML file, then flags), runs
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
use tenax_data::prepare::config::{PrepareConfig, RunOptions};
use tenax_data::prepare::manifest::Manifest;
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
    let options = RunOptions {
        threads: args.threads,
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
    println!("dataset hash {}", m.dataset_hash);
}

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

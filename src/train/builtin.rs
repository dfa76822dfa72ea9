//! The built-in corpus of a bare `tenax train` as a prepared dataset: on first use it goes
//! through `tenax data prepare`'s code (`tenax_data::prepare::prepare`) into a cache folder
//! of the run dir, and training streams it like any prepared dataset (`crate::stream`),
//! so the first run a newcomer makes uses the same path as a real corpus.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tenax_data::prepare::config::{
    DedupConfig, FilterConfig, InputConfig, OutputConfig, PrepareConfig, RunOptions, ScrubConfig,
};
use tenax_data::prepare::source::SourceSpec;
use tenax_data::prepare::MANIFEST_FILE;
use tenax_data::TokenizerKind;

/// Tokens per shard of the prepared built-in corpus: its ~4 MiB of Rust give about 8 shards
/// of bytes, so the stream's validation rule (the first shard of a multi-shard source)
/// holds out about an eighth, near the 10% of the in-memory split.
pub const BUILTIN_SHARD_TOKENS: u64 = 512 << 10;

/// The settings the built-in corpus is prepared with: it is source code, so no Gopher
/// filter, no scrubbing (its e-mail addresses are crate authors'), no dedup and no
/// normalisation (the text is trained on as cargo stores it); one document.
pub fn builtin_config(doc_bytes: usize) -> PrepareConfig {
    let d = PrepareConfig::default();
    PrepareConfig {
        input: InputConfig {
            max_doc_bytes: doc_bytes.max(d.input.max_doc_bytes),
            ..d.input
        },
        nfc: false,
        dedup: DedupConfig {
            exact: false,
            near: false,
            ..d.dedup
        },
        filters: FilterConfig {
            enabled: false,
            ..d.filters
        },
        scrub: ScrubConfig {
            enabled: false,
            ..d.scrub
        },
        output: OutputConfig {
            shard_tokens: BUILTIN_SHARD_TOKENS,
        },
    }
}

/// The folder of the built-in corpus prepared for `kind` under `run_dir`, prepared now
/// if it holds no manifest yet; returns its `file://` URL.
pub fn builtin_dataset(kind: TokenizerKind, run_dir: &Path) -> Result<String> {
    let corpus = tenax_data::default_corpus().map_err(|e| anyhow!("{e}"))?;
    println!(
        "corpus: {}; {} bytes; sha256 {}",
        corpus.description,
        corpus.bytes(),
        corpus.sha256
    );
    let data = std::path::absolute(run_dir.join("data"))
        .with_context(|| format!("run dir {}: cannot resolve it", run_dir.display()))?;
    let name = format!("builtin-{}-{}", &corpus.sha256[..16], kind.name());
    let dir = data.join(&name);
    if dir.join(MANIFEST_FILE).is_file() {
        println!("prepared dataset: {} (reused)", dir.display());
        return Ok(format!("file://{}", dir.display()));
    }
    let source: PathBuf = data.join(format!("{name}.txt"));
    std::fs::create_dir_all(&data)
        .and_then(|()| std::fs::write(&source, corpus.text.as_bytes()))
        .map_err(|e| {
            anyhow!(
                "{}: cannot write the built-in corpus ({e}): pick a writable --run-dir",
                source.display()
            )
        })?;
    let spec = SourceSpec {
        name: "builtin".into(),
        location: source.display().to_string(),
        weight: 1.0,
    };
    let manifest = tenax_data::prepare::prepare(
        &[spec],
        kind,
        &builtin_config(corpus.bytes()),
        &RunOptions::default(),
        &dir,
        &|_| {},
    )
    .map_err(|e| anyhow!("preparing the built-in corpus into {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&source);
    println!(
        "prepared dataset: {} ({} tokens in {} shards, `tenax data prepare`'s code; dataset hash {})",
        dir.display(),
        manifest.totals.tokens,
        manifest.totals.shards,
        manifest.dataset_hash
    );
    Ok(format!("file://{}", dir.display()))
}

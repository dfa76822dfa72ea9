//! `tenax data prepare`: raw text from several sources in, a deduplicated, filtered,
//! scrubbed and tokenized dataset of fixed-size token shards and a manifest out.
//!
//! [`prepare`] streams every document of every source, in `--source` order, file order and
//! document order, through these steps:
//!
//! 1. read ([`source`]): text files, directories, JSONL; each input byte hashed;
//! 2. normalise ([`normalize`]): NFC, line ends, control characters, trimming;
//! 3. exact dedup: SHA-256 of the normalised text, first 16 bytes remembered;
//! 4. quality filters ([`filters`]): Gopher-style rules, the first failed rule counted;
//! 5. near dedup ([`minhash`], [`neardup`]): MinHash signature, LSH lookup, estimated
//!    Jaccard check;
//! 6. scrub ([`scrub`]): PII and secrets replaced by typed placeholders;
//! 7. tokenize and append, followed by a document separator, to the source's current shard;
//!    every `shard_tokens` tokens a shard is written.
//!
//! Then it writes `manifest.json` ([`manifest`]). The result depends only on the inputs,
//! the [`PrepareConfig`] and the tokenizer, never on the thread count: the expensive steps
//! (2–6 and tokenizing) run in parallel over a batch of documents, and every decision that
//! depends on earlier documents (dedup, appending to shards) is taken in input order on
//! one thread.
//!
//! Memory does not grow with the corpus except through the exact dedup index (capped by
//! `dedup.max_exact_docs`, about 40 bytes a document): one batch being read and two queued
//! (`RunOptions::batch_bytes` each, 8 MiB by default), the batch being processed (its
//! normalised and scrubbed copies), one shard buffer per source (`4 * shard_tokens`
//! bytes), the exact index, and the near-dup index, which holds at most
//! `RunOptions::near_dup_memory_bytes` (256 MiB by default) and spills the rest of its
//! band keys and signatures to files under `RunOptions::spill_dir` (the output folder by
//! default), removed at the end; the manifest's `near_dup_index` reports its peak and
//! the bytes spilled. The char tokenizer needs the whole vocabulary before the first
//! token, so with it the kept documents are spilled to a temporary file in the output
//! folder and tokenized in a second pass.
//!
//! Modules: [`config`], [`source`], [`normalize`], [`filters`], [`minhash`], [`neardup`],
//! [`scrub`], [`manifest`].

pub mod config;
pub mod filters;
pub mod manifest;
pub mod minhash;
pub mod neardup;
pub mod normalize;
pub mod scrub;
pub mod source;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::DataError;
use crate::shard::write_shard_hashed;
use crate::tokenizer::{Tokenizer, TokenizerKind};

use config::{PrepareConfig, RunOptions};
use filters::Rule;
use manifest::{Manifest, ShardEntry, SourceReport, Totals, MANIFEST_FORMAT};
use minhash::{MinHasher, NearDecision};
use neardup::{NearDupIndex, NearDupMemory, NearDupStats};
use scrub::{ScrubCounts, Scrubber};
use source::{DocReader, InputFile, Item, SkipReason, SourceSpec};

/// The manifest's file name in the output folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The folder of the shards in the output folder.
pub const SHARDS_DIR: &str = "shards";

/// How far [`prepare`] has got; passed to the progress callback after each batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes read so far.
    pub bytes_read: u64,
    /// Input bytes in all listed files.
    pub bytes_total: u64,
    /// Documents read so far.
    pub docs_read: u64,
    /// Documents kept so far.
    pub docs_kept: u64,
    /// Tokens produced so far (0 during the first pass of the char tokenizer).
    pub tokens: u64,
}

/// Prepares a dataset from `sources` into the local folder `out_dir` (created if needed):
/// `out_dir/shards/<source>-<NNNNN>.tok` and `out_dir/manifest.json`. Shards of an earlier
/// run in `out_dir/shards` that this run did not write are deleted, so the folder holds
/// exactly the dataset its manifest describes.
///
/// Errors: [`DataError::BadSource`] for duplicate source names or unsupported URLs,
/// [`DataError::Missing`] for a source path that does not exist, [`DataError::Io`] when
/// reading or writing fails, [`DataError::Empty`] when nothing is left to tokenize.
pub fn prepare(
    sources: &[SourceSpec],
    tokenizer: TokenizerKind,
    config: &PrepareConfig,
    options: &RunOptions,
    out_dir: &Path,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Manifest, DataError> {
    config.validate("(in use)")?;
    if sources.is_empty() {
        return Err(DataError::BadSource {
            spec: String::new(),
            reason: "no sources given".into(),
        });
    }
    let mut names = HashSet::new();
    for s in sources {
        if !names.insert(s.name.as_str()) {
            return Err(DataError::BadSource {
                spec: format!("{}={}", s.name, s.location),
                reason: format!("the name {:?} is used by another --source", s.name),
            });
        }
    }
    let mut files: Vec<Vec<InputFile>> = Vec::new();
    for s in sources {
        files.push(source::list_files(&s.local_path()?)?);
    }
    let bytes_total: u64 = files.iter().flatten().map(|f| f.bytes).sum();

    let shards_dir = out_dir.join(SHARDS_DIR);
    std::fs::create_dir_all(&shards_dir)
        .map_err(|e| DataError::io("create directory", &shards_dir, e))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()
        .map_err(|e| DataError::Worker {
            reason: format!("cannot start the worker threads: {e}"),
        })?;

    let weight_sum: f64 = sources.iter().map(|s| s.weight).sum();
    let mut reports: Vec<SourceReport> = sources
        .iter()
        .zip(&files)
        .map(|(s, f)| SourceReport {
            name: s.name.clone(),
            location: s.location.clone(),
            weight: s.weight,
            share: s.weight / weight_sum,
            input_files: f.len() as u64,
            ..Default::default()
        })
        .collect();

    // Pass 1 (and, but for char, the only one).
    let spill_path = out_dir.join(".prepare-spill.tmp");
    let mut sink = match tokenizer {
        TokenizerKind::Char => Sink::Spill {
            file: BufWriter::new(
                std::fs::File::create(&spill_path)
                    .map_err(|e| DataError::io("create", &spill_path, e))?,
            ),
            chars: BTreeSet::from(['\n']),
        },
        kind => Sink::Shards(Sharder::new(
            Tokenizer::build(kind, "")?,
            &shards_dir,
            sources,
            config.output.shard_tokens,
        )),
    };
    let mut totals = Totals::default();
    let mut progress_state = Progress {
        bytes_total,
        ..Default::default()
    };
    let memory = NearDupMemory {
        bound_bytes: options.near_dup_memory_bytes,
        spill_dir: options
            .spill_dir
            .clone()
            .unwrap_or_else(|| out_dir.to_path_buf()),
    };
    let mut near_dup_index = NearDupStats::default();
    let result = pool.install(|| {
        run_pass(
            &files,
            config,
            options,
            &memory,
            &mut reports,
            &mut totals,
            &mut near_dup_index,
            &mut sink,
            &mut progress_state,
            progress,
        )
    });
    let sharder = match (result, sink) {
        (Err(e), _) => {
            let _ = std::fs::remove_file(&spill_path);
            return Err(e);
        }
        (Ok(()), Sink::Shards(sharder)) => sharder,
        (Ok(()), Sink::Spill { file, chars }) => {
            let replay = pool.install(|| {
                replay_spill(
                    file,
                    &spill_path,
                    chars,
                    &shards_dir,
                    sources,
                    config,
                    options,
                    &mut progress_state,
                    progress,
                )
            });
            let _ = std::fs::remove_file(&spill_path);
            replay?
        }
    };
    let (tokenizer, shards) = sharder.finish()?;
    for (report, shards) in reports.iter_mut().zip(shards) {
        report.tokens = shards.iter().map(|s| s.tokens).sum();
        report.shards = shards;
        totals.tokens += report.tokens;
        totals.shards += report.shards.len() as u64;
    }
    if totals.tokens == 0 {
        return Err(DataError::Empty {
            what: format!(
                "{} after dedup and filters ({} documents read, none kept)",
                sources
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                totals.docs_read
            ),
        });
    }
    remove_stale_shards(&shards_dir, &reports)?;

    let mut manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        dataset_hash: String::new(),
        tokenizer: tokenizer.spec(),
        vocab_size: tokenizer.vocab_size(),
        doc_separator: separator_description(tokenizer.kind()).into(),
        config: config.clone(),
        sources: reports,
        totals,
        near_dup_index,
    };
    manifest.dataset_hash = manifest.compute_hash();
    manifest.write(&out_dir.join(MANIFEST_FILE))?;
    Ok(manifest)
}

/// What follows each document in the token stream, in words.
fn separator_description(kind: TokenizerKind) -> &'static str {
    match kind {
        TokenizerKind::Gpt2 => "<|endoftext|> (token 50256)",
        TokenizerKind::Bytes | TokenizerKind::Char => "\"\\n\\n\" (two newlines)",
    }
}

/// Where the kept documents of the first pass go.
enum Sink {
    /// Tokenized and appended to shards at once.
    Shards(Sharder),
    /// Written to a spill file (char tokenizer), their characters collected.
    Spill {
        file: BufWriter<std::fs::File>,
        chars: BTreeSet<char>,
    },
}

/// One batch from the reader thread.
#[derive(Default)]
struct Batch {
    /// `(source, raw text)` in input order.
    docs: Vec<(usize, String)>,
    /// `(source, reason)` for input pieces that were not documents.
    skipped: Vec<(usize, SkipReason)>,
    /// `(source, rel, bytes, sha256)` of files finished, in read order.
    files_done: Vec<(usize, String, u64, String)>,
    /// Input bytes consumed.
    bytes: u64,
}

/// A document after the parallel first stage.
enum Verdict {
    /// An exact duplicate of a remembered document.
    Duplicate,
    /// Failed a quality rule.
    Filtered(Rule),
    /// Passed: its exact key and (when near dedup is on) its MinHash signature.
    Candidate {
        key: [u8; 16],
        sig: Option<Vec<u32>>,
    },
}

#[allow(clippy::too_many_arguments)]
fn run_pass(
    files: &[Vec<InputFile>],
    config: &PrepareConfig,
    options: &RunOptions,
    memory: &NearDupMemory,
    reports: &mut [SourceReport],
    totals: &mut Totals,
    near_stats: &mut NearDupStats,
    sink: &mut Sink,
    state: &mut Progress,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<(), DataError> {
    let hasher = MinHasher::new(&config.dedup);
    let scrubber = Scrubber::new(&config.scrub);
    let mut exact: HashSet<[u8; 16]> = HashSet::new();
    let mut lsh = if config.dedup.near {
        Some(NearDupIndex::new(&config.dedup, memory)?)
    } else {
        None
    };
    let mut input_hashers: Vec<Sha256> = files.iter().map(|_| Sha256::new()).collect();

    std::thread::scope(|scope| -> Result<(), DataError> {
        let (tx, rx) = sync_channel::<Result<Batch, DataError>>(2);
        let input = &config.input;
        let batch_bytes = options.batch_bytes.max(1);
        scope.spawn(move || {
            if let Err(e) = read_all(files, input, batch_bytes, &tx) {
                let _ = tx.send(Err(e));
            }
        });
        for batch in rx_iter(&rx) {
            let batch = batch?;
            // Stage 1 (parallel): normalise, exact key, filters, signature.
            let normalized: Vec<String> = batch
                .docs
                .par_iter()
                .map(|(_, raw)| normalize::normalize(raw, config.nfc))
                .collect();
            let exact_ref = &exact;
            let verdicts: Vec<Verdict> = normalized
                .par_iter()
                .map(|text| {
                    let digest = Sha256::digest(text.as_bytes());
                    let key: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
                    if config.dedup.exact && exact_ref.contains(&key) {
                        return Verdict::Duplicate;
                    }
                    if let Some(rule) = filters::check(text, &config.filters) {
                        return Verdict::Filtered(rule);
                    }
                    let sig = if config.dedup.near {
                        hasher.signature(text)
                    } else {
                        None
                    };
                    Verdict::Candidate { key, sig }
                })
                .collect();
            // Stage 2 (in order): exact dedup, then near dedup of the survivors that
            // have a signature (the exact index never depends on near decisions).
            let mut survivors: Vec<(usize, Option<Vec<u32>>)> = Vec::new();
            for (i, verdict) in verdicts.into_iter().enumerate() {
                let src = batch.docs[i].0;
                let report = &mut reports[src];
                report.docs_read += 1;
                totals.docs_read += 1;
                match verdict {
                    Verdict::Duplicate => report.exact_dups += 1,
                    Verdict::Filtered(rule) => *report.filtered.entry(rule).or_default() += 1,
                    Verdict::Candidate { key, sig } => {
                        if config.dedup.exact {
                            if exact.contains(&key) {
                                report.exact_dups += 1;
                                continue;
                            }
                            if exact.len() < config.dedup.max_exact_docs {
                                exact.insert(key);
                            } else {
                                totals.exact_index_full += 1;
                            }
                        }
                        survivors.push((i, sig));
                    }
                }
            }
            let sigs: Vec<&[u32]> = survivors
                .iter()
                .filter_map(|(_, sig)| sig.as_deref())
                .collect();
            let mut decisions = match lsh.as_mut() {
                Some(index) => index.decide(&sigs)?,
                None => Vec::new(),
            }
            .into_iter();
            let mut kept: Vec<usize> = Vec::new();
            for (i, sig) in &survivors {
                if sig.is_some() {
                    match decisions.next().expect("one decision per signature") {
                        NearDecision::Duplicate { .. } => {
                            reports[batch.docs[*i].0].near_dups += 1;
                            continue;
                        }
                        NearDecision::UniqueNotIndexed => totals.near_index_full += 1,
                        NearDecision::Unique => {}
                    }
                }
                kept.push(*i);
            }
            for (src, reason) in &batch.skipped {
                *reports[*src].skipped.entry(*reason).or_default() += 1;
            }
            for (src, rel, bytes, sha) in &batch.files_done {
                input_hashers[*src].update(format!("{rel}\t{bytes}\t{sha}\n").as_bytes());
                reports[*src].input_bytes += bytes;
            }
            // Stage 3 (parallel): scrub the kept documents.
            let scrubbed: Vec<(usize, String, ScrubCounts)> = kept
                .par_iter()
                .map(|&i| {
                    let mut counts = ScrubCounts::new();
                    let text = scrubber.scrub(&normalized[i], &mut counts);
                    (batch.docs[i].0, text, counts)
                })
                .collect();
            let mut docs = Vec::with_capacity(scrubbed.len());
            for (src, text, counts) in scrubbed {
                let report = &mut reports[src];
                report.docs_kept += 1;
                report.bytes_kept += text.len() as u64;
                totals.docs_kept += 1;
                if !counts.is_empty() {
                    report.docs_scrubbed += 1;
                }
                for (kind, n) in counts {
                    *report.scrubbed.entry(kind).or_default() += n;
                }
                docs.push((src, text));
            }
            // Stage 4: tokenize and shard, or spill.
            match sink {
                Sink::Shards(sharder) => state.tokens += sharder.push_batch(&docs)?,
                Sink::Spill { file, chars } => {
                    let sets: Vec<BTreeSet<char>> =
                        docs.par_iter().map(|(_, t)| t.chars().collect()).collect();
                    for set in sets {
                        chars.extend(set);
                    }
                    for (src, text) in &docs {
                        write_spilled(file, *src, text)?;
                    }
                }
            }
            state.bytes_read += batch.bytes;
            state.docs_read = totals.docs_read;
            state.docs_kept = totals.docs_kept;
            progress(state);
        }
        Ok(())
    })?;
    for (report, hasher) in reports.iter_mut().zip(input_hashers) {
        report.input_hash = hex::encode(hasher.finalize());
    }
    if let Some(index) = lsh {
        *near_stats = index.stats();
    }
    Ok(())
}

fn rx_iter<T>(rx: &Receiver<T>) -> impl Iterator<Item = T> + '_ {
    std::iter::from_fn(move || rx.recv().ok())
}

/// The reader thread: every document of every file, in order, in batches of about
/// `batch_bytes`.
fn read_all(
    files: &[Vec<InputFile>],
    input: &config::InputConfig,
    batch_bytes: usize,
    tx: &std::sync::mpsc::SyncSender<Result<Batch, DataError>>,
) -> Result<(), DataError> {
    let mut batch = Batch::default();
    let mut held = 0usize;
    for (src, source_files) in files.iter().enumerate() {
        for file in source_files {
            let mut reader = DocReader::open(file, input)?;
            while let Some(item) = reader.next_doc()? {
                match item {
                    Item::Doc(text) => {
                        held += text.len();
                        batch.docs.push((src, text));
                    }
                    Item::Skipped(reason) => batch.skipped.push((src, reason)),
                }
                if held >= batch_bytes {
                    if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                        return Ok(());
                    }
                    held = 0;
                }
            }
            let (sha, bytes) = reader.finish()?;
            batch.bytes += bytes;
            batch.files_done.push((src, file.rel.clone(), bytes, sha));
        }
    }
    let _ = tx.send(Ok(batch));
    Ok(())
}

fn write_spilled(
    file: &mut BufWriter<std::fs::File>,
    src: usize,
    text: &str,
) -> Result<(), DataError> {
    let io = |e| DataError::io("write", "the spill file of the char tokenizer", e);
    file.write_all(&(src as u32).to_le_bytes()).map_err(io)?;
    file.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

/// The char tokenizer's second pass: builds the vocabulary and tokenizes the spilled
/// documents.
#[allow(clippy::too_many_arguments)]
fn replay_spill(
    file: BufWriter<std::fs::File>,
    spill_path: &Path,
    chars: BTreeSet<char>,
    shards_dir: &Path,
    sources: &[SourceSpec],
    config: &PrepareConfig,
    options: &RunOptions,
    state: &mut Progress,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Sharder, DataError> {
    let f = file
        .into_inner()
        .map_err(|e| DataError::io("write", spill_path, e.into_error()))?;
    drop(f);
    let vocab: String = chars.into_iter().collect();
    let tokenizer = Tokenizer::build(TokenizerKind::Char, &vocab)?;
    let mut sharder = Sharder::new(tokenizer, shards_dir, sources, config.output.shard_tokens);
    let mut reader = BufReader::new(
        std::fs::File::open(spill_path).map_err(|e| DataError::io("open", spill_path, e))?,
    );
    let io = |e| DataError::io("read", spill_path, e);
    loop {
        let mut docs: Vec<(usize, String)> = Vec::new();
        let mut held = 0usize;
        while held < options.batch_bytes.max(1) {
            let mut head = [0u8; 12];
            match reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io(e)),
            }
            let src = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let len = u64::from_le_bytes(head[4..].try_into().expect("8 bytes")) as usize;
            let mut buf = vec![0u8; len];
            reader.read_exact(&mut buf).map_err(io)?;
            let text = String::from_utf8(buf).map_err(|_| DataError::Worker {
                reason: format!("{} holds invalid UTF-8", spill_path.display()),
            })?;
            held += len;
            docs.push((src, text));
        }
        if docs.is_empty() {
            break;
        }
        state.tokens += sharder.push_batch(&docs)?;
        progress(state);
    }
    Ok(sharder)
}

/// Tokenizes documents and cuts each source's token stream into shards.
struct Sharder {
    tokenizer: Tokenizer,
    separator: Vec<u32>,
    dir: PathBuf,
    names: Vec<String>,
    shard_tokens: usize,
    buffers: Vec<Vec<u32>>,
    shards: Vec<Vec<ShardEntry>>,
}

impl Sharder {
    fn new(tokenizer: Tokenizer, dir: &Path, sources: &[SourceSpec], shard_tokens: u64) -> Self {
        let separator = match tokenizer.kind() {
            TokenizerKind::Gpt2 => vec![50256],
            _ => tokenizer
                .encode("\n\n")
                .expect("newline is in every vocabulary"),
        };
        Sharder {
            tokenizer,
            separator,
            dir: dir.to_path_buf(),
            names: sources.iter().map(|s| s.name.clone()).collect(),
            shard_tokens: usize::try_from(shard_tokens).unwrap_or(usize::MAX),
            buffers: sources.iter().map(|_| Vec::new()).collect(),
            shards: sources.iter().map(|_| Vec::new()).collect(),
        }
    }

    /// Tokenizes `docs` in parallel and appends them in order; returns the tokens added.
    fn push_batch(&mut self, docs: &[(usize, String)]) -> Result<u64, DataError> {
        let tokenizer = &self.tokenizer;
        let encoded: Vec<Result<Vec<u32>, DataError>> =
            docs.par_iter().map(|(_, t)| tokenizer.encode(t)).collect();
        let mut added = 0u64;
        for ((src, _), tokens) in docs.iter().zip(encoded) {
            let tokens = tokens?;
            added += (tokens.len() + self.separator.len()) as u64;
            self.buffers[*src].extend_from_slice(&tokens);
            self.buffers[*src].extend_from_slice(&self.separator);
            while self.buffers[*src].len() >= self.shard_tokens {
                let rest = self.buffers[*src].split_off(self.shard_tokens);
                let full = std::mem::replace(&mut self.buffers[*src], rest);
                self.write(*src, &full)?;
            }
        }
        Ok(added)
    }

    fn write(&mut self, src: usize, tokens: &[u32]) -> Result<(), DataError> {
        let index = self.shards[src].len();
        let file = format!("{SHARDS_DIR}/{}-{index:05}.tok", self.names[src]);
        let path = self.dir.join(format!("{}-{index:05}.tok", self.names[src]));
        let (sha256, bytes) = write_shard_hashed(&path, tokens, self.tokenizer.vocab_size())?;
        self.shards[src].push(ShardEntry {
            file,
            tokens: tokens.len() as u64,
            bytes,
            sha256,
        });
        Ok(())
    }

    /// Writes the partial last shard of each source.
    fn finish(mut self) -> Result<(Tokenizer, Vec<Vec<ShardEntry>>), DataError> {
        for src in 0..self.buffers.len() {
            let rest = std::mem::take(&mut self.buffers[src]);
            if !rest.is_empty() {
                self.write(src, &rest)?;
            }
        }
        Ok((self.tokenizer, self.shards))
    }
}

/// Deletes `*.tok` files in `shards_dir` that no report lists.
fn remove_stale_shards(shards_dir: &Path, reports: &[SourceReport]) -> Result<(), DataError> {
    let listed: HashSet<&str> = reports
        .iter()
        .flat_map(|r| &r.shards)
        .filter_map(|s| s.file.strip_prefix(&format!("{SHARDS_DIR}/")))
        .collect();
    let entries =
        std::fs::read_dir(shards_dir).map_err(|e| DataError::io("list", shards_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("list", shards_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tok") && !listed.contains(name.as_str()) {
            std::fs::remove_file(entry.path())
                .map_err(|e| DataError::io("remove stale shard", entry.path(), e))?;
        }
    }
    Ok(())
}

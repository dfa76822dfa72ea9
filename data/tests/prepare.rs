//! `tenax data prepare` end to end on small generated corpora: near-duplicate recall and
//! precision, planted counts in the manifest, shards that read back, scrubbed text, and a
//! dataset hash that is the same on every re-run and changes with the inputs.

use std::collections::HashSet;
use std::path::Path;

use sha2::{Digest, Sha256};
use tenax_core::rng::SplitMix64;
use tenax_data::prepare::config::{DedupConfig, PrepareConfig, RunOptions, TextDocs};
use tenax_data::prepare::filters::Rule;
use tenax_data::prepare::manifest::Manifest;
use tenax_data::prepare::minhash::{
    exact_jaccard, jaccard, shingle_set, LshIndex, MinHasher, NearDecision,
};
use tenax_data::prepare::normalize::normalize;
use tenax_data::prepare::scrub::PiiKind;
use tenax_data::prepare::source::{SkipReason, SourceSpec};
use tenax_data::prepare::{prepare, Progress, MANIFEST_FILE};
use tenax_data::{read_shard, Tokenizer, TokenizerKind, TokenizerSpec};

/// A vocabulary of random lower-case words.
fn vocabulary(rng: &mut SplitMix64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 3 + (rng.next_u64() % 7) as usize;
            (0..len)
                .map(|_| (b'a' + (rng.next_u64() % 26) as u8) as char)
                .collect()
        })
        .collect()
}

fn random_doc(rng: &mut SplitMix64, vocab: &[String], words: usize) -> Vec<String> {
    (0..words)
        .map(|_| vocab[(rng.next_u64() % vocab.len() as u64) as usize].clone())
        .collect()
}

/// What a planted document is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plant {
    Original,
    Exact,
    Near,
    HardNegative,
}

/// Near-dup detection on a generated set: 500 originals, then 100 exact copies (some with
/// extra whitespace), 150 near copies (1–3 words substituted, inserted or deleted, or the
/// case changed: true Jaccard >= 0.8) and 100 hard negatives (a 55–75% prefix of an
/// original and new words: Jaccard about 0.4–0.6), in a seeded order after the originals.
/// Ground truth is the exact Jaccard against every earlier document.
#[test]
fn near_duplicates_recall_and_precision() {
    let seed = 0x5eed_0018;
    eprintln!("seed {seed:#x}");
    let mut rng = SplitMix64::new(seed);
    let vocab = vocabulary(&mut rng, 5000);
    let mut docs: Vec<(Plant, String)> = Vec::new();
    let originals: Vec<Vec<String>> = (0..500)
        .map(|_| {
            let n = 150 + (rng.next_u64() % 150) as usize;
            random_doc(&mut rng, &vocab, n)
        })
        .collect();
    for o in &originals {
        docs.push((Plant::Original, o.join(" ")));
    }
    let mut planted: Vec<(Plant, String)> = Vec::new();
    for i in 0..100 {
        let o = &originals[(rng.next_u64() % 500) as usize];
        let text = if i % 2 == 0 {
            o.join(" ")
        } else {
            format!("  {}\n", o.join(" "))
        };
        planted.push((Plant::Exact, text));
    }
    for i in 0..150 {
        let mut words = originals[(rng.next_u64() % 500) as usize].clone();
        if i % 10 == 0 {
            planted.push((Plant::Near, words.join(" ").to_uppercase()));
            continue;
        }
        let edits = 1 + (rng.next_u64() % 3) as usize;
        for _ in 0..edits {
            let at = (rng.next_u64() % words.len() as u64) as usize;
            let new = vocab[(rng.next_u64() % vocab.len() as u64) as usize].clone();
            match rng.next_u64() % 3 {
                0 => words[at] = new,
                1 => words.insert(at, new),
                _ => {
                    words.remove(at);
                }
            }
        }
        planted.push((Plant::Near, words.join(" ")));
    }
    for _ in 0..100 {
        let o = &originals[(rng.next_u64() % 500) as usize];
        let keep = o.len() * (55 + (rng.next_u64() % 21) as usize) / 100;
        let mut words: Vec<String> = o[..keep].to_vec();
        words.extend(random_doc(&mut rng, &vocab, o.len() - keep));
        planted.push((Plant::HardNegative, words.join(" ")));
    }
    // Seeded Fisher-Yates over the planted documents.
    for i in (1..planted.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        planted.swap(i, j);
    }
    docs.extend(planted);

    // The pipeline's decisions (exact first, then near), as `prepare` takes them.
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let mut lsh = LshIndex::new(&config);
    let mut exact: HashSet<[u8; 32]> = HashSet::new();
    let mut kept: Vec<HashSet<u64>> = Vec::new();
    let (mut tp, mut fp, mut fn_, mut exact_found, mut exact_missed) = (0, 0, 0, 0, 0);
    let mut gray = 0;
    for (plant, raw) in &docs {
        let text = normalize(raw, true);
        let key: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if !exact.insert(key) {
            assert_eq!(*plant, Plant::Exact, "{raw:.60}");
            exact_found += 1;
            continue;
        }
        if *plant == Plant::Exact {
            exact_missed += 1;
        }
        let shingles = shingle_set(&text, config.shingle_words);
        let best = kept
            .iter()
            .map(|k| jaccard(k, &shingles))
            .fold(0.0f64, f64::max);
        let truth = best >= 0.8;
        if *plant == Plant::Near {
            assert!(truth, "a planted near copy has Jaccard {best} < 0.8");
        }
        if *plant == Plant::HardNegative {
            assert!(best < 0.65, "a hard negative has Jaccard {best}");
        }
        if (0.65..0.8).contains(&best) {
            gray += 1;
        }
        let flagged = matches!(
            lsh.check_and_insert(&hasher.signature(&text).unwrap()),
            NearDecision::Duplicate { .. }
        );
        match (flagged, truth) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
        if !flagged {
            kept.push(shingles);
        }
    }
    let recall = tp as f64 / (tp + fn_) as f64;
    let precision = tp as f64 / (tp + fp) as f64;
    eprintln!(
        "exact: {exact_found} found, {exact_missed} missed; near: tp {tp} fp {fp} fn {fn_}; \
         recall {recall:.4} precision {precision:.4}; {gray} in the gray zone"
    );
    assert_eq!((exact_found, exact_missed), (100, 0));
    assert!(tp + fn_ >= 150, "{tp} + {fn_}");
    assert!(recall >= 0.95, "recall {recall}");
    assert!(precision >= 0.99, "precision {precision}");
}

/// The flag rate of the default near-dup settings as a function of the true Jaccard
/// similarity: 4,000 pairs (an original of 150–300 random words and a copy whose last part
/// is replaced by new words), bucketed by exact Jaccard. Asserts the documented contract:
/// at J >= 0.8 at least 95% of pairs are flagged, at J < 0.6 at most 1%.
#[test]
fn near_dup_flag_rate_by_jaccard() {
    let seed = 0x5eed_0019;
    eprintln!("seed {seed:#x}");
    let mut rng = SplitMix64::new(seed);
    let vocab = vocabulary(&mut rng, 50_000);
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let mut lsh = LshIndex::new(&config);
    let mut buckets = [(0u32, 0u32); 12]; // J in [0.4, 1.0) by 0.05: (pairs, flagged)
    let (mut hi, mut hi_flagged, mut lo, mut lo_flagged) = (0u32, 0u32, 0u32, 0u32);
    for _ in 0..4000 {
        let n = 150 + (rng.next_u64() % 150) as usize;
        let original = random_doc(&mut rng, &vocab, n);
        // Keep a prefix of 55–100% of the words: J from about 0.38 to 1.
        let keep = n * (55 + (rng.next_u64() % 46) as usize) / 100;
        let mut copy = original[..keep].to_vec();
        copy.extend(random_doc(&mut rng, &vocab, n - keep));
        let (a, b) = (original.join(" "), copy.join(" "));
        let j = exact_jaccard(&a, &b, config.shingle_words);
        assert_eq!(
            lsh.check_and_insert(&hasher.signature(&a).unwrap()),
            NearDecision::Unique
        );
        let flagged = lsh.query(&hasher.signature(&b).unwrap()).is_some();
        if (0.4..1.0).contains(&j) {
            let bucket = &mut buckets[((j - 0.4) / 0.05) as usize];
            bucket.0 += 1;
            bucket.1 += u32::from(flagged);
        }
        if j >= 0.8 {
            hi += 1;
            hi_flagged += u32::from(flagged);
        } else if j < 0.6 {
            lo += 1;
            lo_flagged += u32::from(flagged);
        }
    }
    for (i, (pairs, flagged)) in buckets.iter().enumerate() {
        let from = 0.4 + 0.05 * i as f64;
        eprintln!(
            "J {from:.2}-{:.2}: {flagged}/{pairs} flagged ({:.3})",
            from + 0.05,
            f64::from(*flagged) / f64::from((*pairs).max(1))
        );
    }
    let (hi_rate, lo_rate) = (
        f64::from(hi_flagged) / f64::from(hi),
        f64::from(lo_flagged) / f64::from(lo),
    );
    eprintln!(
        "J >= 0.8: {hi_flagged}/{hi} ({hi_rate:.4}); J < 0.6: {lo_flagged}/{lo} ({lo_rate:.4})"
    );
    assert!(hi >= 500 && lo >= 500, "{hi} {lo}");
    assert!(hi_rate >= 0.95, "flag rate at J >= 0.8: {hi_rate}");
    assert!(lo_rate <= 0.01, "flag rate at J < 0.6: {lo_rate}");
}

/// A JSONL line holding `text`.
fn jsonl(text: &str) -> String {
    format!("{}\n", serde_json::json!({ "text": text, "id": 1 }))
}

/// `n` distinct words (with stop words) from a seed: a document that passes the default
/// filters.
fn prose(seed: u64, n: usize) -> String {
    let mut rng = SplitMix64::new(seed);
    let vocab = vocabulary(&mut rng, 400);
    let mut words = random_doc(&mut rng, &vocab, n);
    for (i, w) in ["the", "and", "of", "to"].iter().enumerate() {
        words[i * 7] = w.to_string();
    }
    words.join(" ")
}

/// A small two-source corpus with planted duplicates, a filtered document, a malformed
/// line, PII, and a text file in a sub-directory.
fn write_corpus(root: &Path) {
    let web = root.join("web");
    std::fs::create_dir_all(web.join("sub")).unwrap();
    let base = prose(1, 120);
    let near = base.replacen(' ', " extra ", 1);
    let pii = format!(
        "{} contact jane.doe@example.com or card 4111 1111 1111 1111 key AKIAIOSFODNN7EXAMPLE",
        prose(2, 80)
    );
    let mut lines = String::new();
    lines.push_str(&jsonl(&base));
    lines.push_str(&jsonl(&prose(3, 100)));
    lines.push_str(&jsonl(&base)); // exact duplicate
    lines.push_str(&jsonl(&near)); // near duplicate
    lines.push_str(&jsonl("too short to keep")); // min_words
    lines.push_str("{not json\n");
    lines.push_str(&jsonl(&pii));
    std::fs::write(web.join("a.jsonl"), lines).unwrap();
    std::fs::write(web.join("sub/b.txt"), prose(4, 150)).unwrap();
    let books = root.join("books.txt");
    std::fs::write(
        &books,
        format!("{}\n\n{}\n\n{}\n", prose(5, 90), prose(6, 90), base),
    )
    .unwrap();
}

fn specs(root: &Path) -> Vec<SourceSpec> {
    vec![
        SourceSpec::parse(&format!("web={}:3", root.join("web").display())).unwrap(),
        SourceSpec::parse(&format!(
            "books=file://{}",
            root.join("books.txt").display()
        ))
        .unwrap(),
    ]
}

fn small_config() -> PrepareConfig {
    let mut c = PrepareConfig::default();
    c.input.text_docs = TextDocs::Paragraphs;
    c.output.shard_tokens = 1000;
    c
}

fn run(
    root: &Path,
    out: &Path,
    kind: TokenizerKind,
    config: &PrepareConfig,
    threads: usize,
) -> Manifest {
    let options = RunOptions {
        threads,
        batch_bytes: 700,
        ..RunOptions::default()
    };
    prepare(
        &specs(root),
        kind,
        config,
        &options,
        out,
        &|_: &Progress| {},
    )
    .unwrap()
}

#[test]
fn prepare_end_to_end_counts_shards_and_scrubs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_corpus(root);
    let out = root.join("out");
    let progress_calls = std::sync::atomic::AtomicUsize::new(0);
    let m = prepare(
        &specs(root),
        TokenizerKind::Bytes,
        &small_config(),
        &RunOptions {
            threads: 2,
            batch_bytes: 700,
            ..RunOptions::default()
        },
        &out,
        &|p: &Progress| {
            assert!(p.bytes_read <= p.bytes_total);
            progress_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .unwrap();
    assert!(
        progress_calls.into_inner() >= 2,
        "progress is reported per batch"
    );

    let web = &m.sources[0];
    assert_eq!(
        (web.name.as_str(), web.weight, web.share),
        ("web", 3.0, 0.75)
    );
    assert_eq!(web.input_files, 2);
    assert_eq!(web.docs_read, 7);
    assert_eq!(web.skipped.get(&SkipReason::MalformedJson), Some(&1));
    assert_eq!(web.exact_dups, 1);
    assert_eq!(web.near_dups, 1);
    assert_eq!(web.filtered.get(&Rule::MinWords), Some(&1));
    assert_eq!(web.docs_kept, 4);
    assert_eq!(web.docs_scrubbed, 1);
    for kind in [PiiKind::Email, PiiKind::CreditCard, PiiKind::AwsKey] {
        assert_eq!(web.scrubbed.get(&kind), Some(&1), "{kind:?}");
    }
    let books = &m.sources[1];
    // The third paragraph of books.txt is web's first document: a cross-source duplicate.
    assert_eq!(
        (books.docs_read, books.exact_dups, books.docs_kept),
        (3, 1, 2)
    );
    assert_eq!(m.totals.docs_kept, 6);
    assert_eq!(m.tokenizer.kind, TokenizerKind::Bytes);

    // Shards: fixed size but the last of each source, hashes as listed, text scrubbed.
    let tokenizer = Tokenizer::from_spec(&m.tokenizer).unwrap();
    for report in &m.sources {
        assert!(!report.shards.is_empty());
        let mut all = Vec::new();
        for (i, shard) in report.shards.iter().enumerate() {
            let path = out.join(&shard.file);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(hex::encode(Sha256::digest(&bytes)), shard.sha256);
            let tokens = read_shard(&path).unwrap();
            assert_eq!(tokens.len() as u64, shard.tokens);
            if i + 1 < report.shards.len() {
                assert_eq!(shard.tokens, 1000, "{}", shard.file);
            }
            all.extend(tokens);
        }
        assert_eq!(all.len() as u64, report.tokens);
        let text = tokenizer.decode(&all);
        assert_eq!(text.matches("\n\n").count() as u64, report.docs_kept);
        if report.name == "web" {
            assert!(text.contains("<EMAIL>") && text.contains("<CREDIT_CARD>"));
            assert!(text.contains("<AWS_KEY>"));
            assert!(!text.contains("jane.doe") && !text.contains("4111"));
            assert!(!text.contains("too short"));
        }
    }
    assert!(
        m.sources[0].shards.len() >= 2,
        "small shards cut web in several"
    );
    assert_eq!(Manifest::read(&out.join(MANIFEST_FILE)).unwrap(), m);
}

#[test]
fn dataset_hash_is_deterministic_and_tracks_inputs_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_corpus(root);
    let config = small_config();
    let a = run(root, &root.join("a"), TokenizerKind::Bytes, &config, 2);
    let b = run(root, &root.join("b"), TokenizerKind::Bytes, &config, 1);
    assert_eq!(a.dataset_hash, b.dataset_hash);
    assert_eq!(
        std::fs::read(root.join("a").join(MANIFEST_FILE)).unwrap(),
        std::fs::read(root.join("b").join(MANIFEST_FILE)).unwrap(),
        "the manifest is byte-identical across runs and thread counts"
    );

    // Re-running into the same folder with bigger shards replaces the dataset and leaves no
    // stale shard behind.
    let mut big = config.clone();
    big.output.shard_tokens = 1 << 20;
    let c = run(root, &root.join("a"), TokenizerKind::Bytes, &big, 2);
    assert_ne!(c.dataset_hash, a.dataset_hash);
    let files: Vec<_> = std::fs::read_dir(root.join("a/shards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");

    // One changed input byte changes the hash.
    let path = root.join("web/sub/b.txt");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push('x');
    std::fs::write(&path, text).unwrap();
    let d = run(root, &root.join("d"), TokenizerKind::Bytes, &config, 2);
    assert_ne!(d.dataset_hash, a.dataset_hash);
    assert_ne!(d.sources[0].input_hash, a.sources[0].input_hash);
    assert_eq!(d.sources[1].input_hash, a.sources[1].input_hash);
}

#[test]
fn char_and_gpt2_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_corpus(root);
    let config = small_config();
    let bytes = run(root, &root.join("bytes"), TokenizerKind::Bytes, &config, 2);

    let chars = run(root, &root.join("char"), TokenizerKind::Char, &config, 2);
    let TokenizerSpec {
        chars: Some(vocab), ..
    } = &chars.tokenizer
    else {
        panic!("char manifest without a vocabulary");
    };
    assert!(vocab.contains('\n') && vocab.contains('<'));
    assert_eq!(chars.vocab_size, vocab.chars().count());
    // Every kept document is ASCII here, so char and bytes count the same tokens.
    assert_eq!(chars.totals.tokens, bytes.totals.tokens);
    assert!(
        !root.join("char/.prepare-spill.tmp").exists(),
        "spill file removed"
    );

    let gpt2 = run(root, &root.join("gpt2"), TokenizerKind::Gpt2, &config, 2);
    assert_eq!(gpt2.vocab_size, 50257);
    let first = read_shard(&root.join("gpt2").join(&gpt2.sources[1].shards[0].file)).unwrap();
    assert_eq!(
        first.iter().filter(|&&t| t == 50256).count() as u64,
        gpt2.sources[1].docs_kept,
        "one <|endoftext|> after each document"
    );
    assert!(gpt2.totals.tokens < bytes.totals.tokens);
}

#[test]
fn user_errors_name_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_corpus(root);
    let none = |specs: Vec<SourceSpec>| {
        prepare(
            &specs,
            TokenizerKind::Bytes,
            &small_config(),
            &RunOptions::default(),
            &root.join("o"),
            &|_: &Progress| {},
        )
        .unwrap_err()
        .to_string()
    };
    let missing = none(vec![SourceSpec::parse("x=/does/not/exist").unwrap()]);
    assert!(missing.contains("/does/not/exist"), "{missing}");
    let dup = none(vec![
        SourceSpec::parse(&format!("w={}", root.join("web").display())).unwrap(),
        SourceSpec::parse(&format!("w={}", root.join("books.txt").display())).unwrap(),
    ]);
    assert!(dup.contains("\"w\" is used by another --source"), "{dup}");
    let mut strict = small_config();
    strict.filters.min_words = Some(1_000_000);
    let empty = prepare(
        &specs(root),
        TokenizerKind::Bytes,
        &strict,
        &RunOptions::default(),
        &root.join("o"),
        &|_: &Progress| {},
    )
    .unwrap_err()
    .to_string();
    assert!(empty.contains("none kept"), "{empty}");
}

/// The near-dup index under a 16 KiB bound, through `prepare`: it spills many times, holds
/// no more than the bound, leaves no spill files, and writes the same dataset as with the
/// default bound (which never spills here); an unusable spill folder is named in the error.
#[test]
fn near_dup_index_spills_under_a_tiny_bound_with_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut rng = SplitMix64::new(0x5eed_0183);
    let originals: Vec<String> = (0..150).map(|i| prose(1000 + i, 90)).collect();
    let mut lines = String::new();
    for (i, doc) in originals.iter().enumerate() {
        lines.push_str(&jsonl(doc));
        if i >= 20 && i % 2 == 0 {
            // A near copy of an earlier document: one word inserted.
            let of = &originals[(rng.next_u64() % i as u64) as usize];
            lines.push_str(&jsonl(&of.replacen(' ', " inserted ", 1)));
        }
    }
    std::fs::create_dir_all(root.join("web")).unwrap();
    std::fs::write(root.join("web/a.jsonl"), lines).unwrap();
    let specs = vec![SourceSpec::parse(&format!("web={}", root.join("web").display())).unwrap()];
    let config = small_config();
    let go = |options: &RunOptions, out: &Path| {
        prepare(
            &specs,
            TokenizerKind::Bytes,
            &config,
            options,
            out,
            &|_: &Progress| {},
        )
    };

    let free = go(&RunOptions::default(), &root.join("free")).unwrap();
    let spill_dir = root.join("spill");
    let bound = 16 << 10;
    let tight = go(
        &RunOptions {
            near_dup_memory_bytes: bound,
            spill_dir: Some(spill_dir.clone()),
            batch_bytes: 4096,
            ..RunOptions::default()
        },
        &root.join("tight"),
    )
    .unwrap();
    eprintln!(
        "free {:?}\ntight {:?}",
        free.near_dup_index, tight.near_dup_index
    );
    // 65 copies planted; a second copy of the same original is an exact duplicate.
    let copies = free.sources[0].near_dups + free.sources[0].exact_dups;
    assert_eq!(copies, 65, "{:?}", free.sources[0]);
    assert!(free.sources[0].near_dups >= 40, "{:?}", free.sources[0]);
    assert_eq!(free.near_dup_index.spills, 0);
    assert_eq!(tight.dataset_hash, free.dataset_hash);
    assert_eq!(tight.totals, free.totals);
    assert_eq!(tight.sources, free.sources);
    let stats = &tight.near_dup_index;
    assert_eq!(stats.bound_bytes, bound);
    assert!(stats.peak_bytes <= bound, "{stats:?}");
    assert!(stats.spills >= 10 && stats.spilled_bytes > 0, "{stats:?}");
    assert!(stats.spill_read_bytes > 0, "{stats:?}");
    let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
    assert!(left.is_empty(), "spill files left behind: {left:?}");
    let written = std::fs::read_to_string(root.join("tight").join(MANIFEST_FILE)).unwrap();
    assert!(written.contains("\"near_dup_index\""), "{written}");

    let not_a_dir = root.join("web/a.jsonl");
    let err = go(
        &RunOptions {
            spill_dir: Some(not_a_dir.clone()),
            ..RunOptions::default()
        },
        &root.join("bad"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&not_a_dir.display().to_string()) && err.contains("--spill-dir"),
        "{err}"
    );
}

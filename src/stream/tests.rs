//! Tests of the streamed dataset loader.

use super::*;
use proptest::prelude::*;
use std::path::PathBuf;
use tenax_core::rng::SplitMix64;
use tenax_data::prepare::config::{PrepareConfig, RunOptions};
use tenax_data::prepare::source::SourceSpec;
use tenax_data::TokenizerKind;

/// Block size of the tests (the tiny preset's).
const BS: usize = 16;

/// A sample's inputs and targets.
type Sample = (Vec<u32>, Vec<u32>);

/// Writes `docs` pseudo-random documents of `words` words to `dir/name.txt`.
pub(crate) fn write_source(
    dir: &Path,
    name: &str,
    seed: u64,
    docs: usize,
    words: usize,
) -> PathBuf {
    let vocab = [
        "the", "king", "shall", "speak", "of", "love", "and", "war", "to", "thee", "my", "lord",
        "now", "what", "is", "fair", "river", "stone", "light", "code",
    ];
    let mut rng = SplitMix64::new(seed);
    let mut text = String::new();
    for _ in 0..docs {
        for _ in 0..words {
            text.push_str(vocab[rng.below(vocab.len() as u64) as usize]);
            text.push(' ');
        }
        text.push_str("\n\n");
    }
    let path = dir.join(format!("{name}.txt"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Prepares a 3-source dataset (weights 3:2:1, bytes tokenizer, `shard_tokens` per
/// shard, no dedup, filters or scrubbing) in `dir/ds`.
pub(crate) fn prepare_dataset(dir: &Path, shard_tokens: u64, scale: usize) -> (PathBuf, Manifest) {
    let specs: Vec<SourceSpec> = [("web", 3, 11u64), ("books", 2, 12), ("code", 1, 13)]
        .iter()
        .map(|(name, w, seed)| {
            let p = write_source(dir, name, *seed, 4 * scale, 60);
            SourceSpec::parse(&format!("{name}={}:{w}", p.display())).unwrap()
        })
        .collect();
    let mut config = PrepareConfig::from_toml_str(
        "[dedup]\nexact = false\nnear = false\n[filters]\nenabled = false\n[scrub]\nenabled = false\n",
        "test",
    )
    .unwrap();
    config.output.shard_tokens = shard_tokens;
    let out = dir.join("ds");
    let m = tenax_data::prepare::prepare(
        &specs,
        TokenizerKind::Bytes,
        &config,
        &RunOptions::default(),
        &out,
        &|_: &tenax_data::prepare::Progress| {},
    )
    .unwrap();
    (out, m)
}

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn opts(budget: u64) -> StreamOptions {
    let mut o = StreamOptions::new(7, BS, 6, budget, 2);
    o.wait_timeout = Duration::from_secs(60);
    o
}

/// Sample `s` read straight from the shard file the sampler names.
fn reference(ds: &StreamData, root: &Path, s: u64) -> (Vec<u32>, Vec<u32>) {
    let (_, file, w) = ds.locate(s);
    let tokens = tenax_data::read_shard(&root.join(file)).unwrap();
    let (mut i, mut t) = (Vec::new(), Vec::new());
    tenax_data::window(&tokens, BS, w as usize, &mut i, &mut t);
    (i, t)
}

fn read(ds: &StreamData, s: u64) -> Result<(Vec<u32>, Vec<u32>), String> {
    let (mut i, mut t) = (Vec::new(), Vec::new());
    ds.sample(s, BS, &mut i, &mut t)?;
    Ok((i, t))
}

/// One dataset shared by the property test's cases.
fn shared_dataset() -> &'static (PathBuf, Manifest) {
    static DS: std::sync::OnceLock<(PathBuf, Manifest)> = std::sync::OnceLock::new();
    DS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        prepare_dataset(&dir, 400, 3)
    })
}

#[test]
fn a_streamed_read_crosses_many_shards_within_the_budget_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (root, m) = prepare_dataset(dir.path(), 300, 6);
    assert!(m.totals.shards >= 30, "{} shards", m.totals.shards);
    let shard_bytes = m.sources[0].shards[0].bytes;
    let budget = 8 * shard_bytes;
    let ds = StreamData::open(&url(&root), opts(budget)).unwrap();
    assert!(!ds.val.is_empty());
    let n = 3000u64;
    let straight: Vec<_> = (0..n).map(|s| read(&ds, s).unwrap()).collect();
    for s in (0..n).step_by(97) {
        assert_eq!(straight[s as usize], reference(&ds, &root, s), "sample {s}");
    }
    let stats = ds.stats();
    assert!(stats.fetches >= 30, "{stats:?}");
    assert!(
        stats.peak_bytes <= budget + shard_bytes,
        "{stats:?} budget {budget}"
    );
    // Drawn shares follow the weights 3:2:1.
    let mut counts = [0u64; 3];
    for s in 0..n {
        let (src, _, _) = ds.locate(s);
        counts[["web", "books", "code"]
            .iter()
            .position(|x| *x == src)
            .unwrap()] += 1;
    }
    for (c, w) in counts.iter().zip([3.0, 2.0, 1.0]) {
        assert!((*c as f64 / n as f64 - w / 6.0).abs() < 0.01, "{counts:?}");
    }
    drop(ds);
    // A resumed loader (new process, cursor 1234) reads the same samples.
    let resumed = StreamData::open(&url(&root), opts(budget)).unwrap();
    resumed.seek(1234);
    for s in 1234..n {
        assert_eq!(
            read(&resumed, s).unwrap(),
            straight[s as usize],
            "sample {s}"
        );
    }
    // The oracle can fail: another seed reads other samples.
    let mut other = opts(budget);
    other.seed = 8;
    let other = StreamData::open(&url(&root), other).unwrap();
    assert_ne!(
        (0..50)
            .map(|s| read(&other, s).unwrap())
            .collect::<Vec<_>>(),
        straight[..50].to_vec()
    );
}

#[test]
fn tampered_missing_and_held_out_shards_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (root, m) = prepare_dataset(dir.path(), 400, 2);
    let ds = StreamData::open(&url(&root), opts(1 << 30)).unwrap();
    let web = &m.sources[0].shards;
    assert!(web.len() >= 3);
    let (tampered, missing) = (&web[1].file, &web[2].file);
    let first_read = |file: &str| -> u64 {
        (0..100_000)
            .find(|&s| ds.locate(s).1 == file)
            .expect("a sample reads it")
    };
    let (ts, ms) = (first_read(tampered), first_read(missing));
    drop(ds);
    let mut bytes = std::fs::read(root.join(tampered)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(root.join(tampered), bytes).unwrap();
    std::fs::remove_file(root.join(missing)).unwrap();
    let ds = StreamData::open(&url(&root), opts(1 << 30)).unwrap();
    let err = read(&ds, ts).unwrap_err();
    assert!(
        err.contains(tampered.as_str())
            && err.contains("tampered")
            && err.contains("prepare the dataset again"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    let err = read(&ds, ms).unwrap_err();
    assert!(
        err.contains(missing.as_str()) && err.contains("missing"),
        "{err}"
    );
    drop(ds);
    // A held-out (validation) shard is checked when the dataset is opened.
    let val = &web[0].file;
    let mut bytes = std::fs::read(root.join(val)).unwrap();
    bytes[HEADER_BYTES] ^= 1;
    std::fs::write(root.join(val), bytes).unwrap();
    let err = format!(
        "{:#}",
        StreamData::open(&url(&root), opts(1 << 30)).unwrap_err()
    );
    assert!(
        err.contains(val.as_str()) && err.contains("tampered"),
        "{err}"
    );
}

#[test]
fn bad_datasets_and_budgets_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        StreamData::open(&url(dir.path()), opts(1 << 20)).unwrap_err()
    );
    assert!(
        err.contains("no manifest.json") && err.contains("tenax data prepare"),
        "{err}"
    );
    let (root, _) = prepare_dataset(dir.path(), 400, 1);
    let err = format!(
        "{:#}",
        StreamData::open(&url(&root), opts(100)).unwrap_err()
    );
    assert!(
        err.contains("--prefetch-mb") && err.contains("--shuffle-shards"),
        "{err}"
    );
    assert_eq!(
        dataset_url(std::slice::from_ref(&root)).unwrap(),
        Some(format!("file://{}", root.display()))
    );
    assert_eq!(dataset_url(&[dir.path().to_path_buf()]).unwrap(), None);
    assert_eq!(
        dataset_url(&[PathBuf::from("s3://b/ds")])
            .unwrap()
            .as_deref(),
        Some("s3://b/ds")
    );
    assert_eq!(dataset_url(&[root.clone(), root]).unwrap(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    /// Sample `s` is the same whatever the prefetch budget, however many ranks ask and
    /// in whatever order.
    #[test]
    fn a_sample_does_not_depend_on_prefetch_or_rank(
        budget_shards in 6u64..40,
        ranks in 1usize..4,
        start in 0u64..5000,
        order_seed in any::<u64>(),
    ) {
        let (root, m) = shared_dataset();
        let budget = budget_shards * m.sources[0].shards[0].bytes;
        let ds = Arc::new(StreamData::open(&url(root), opts(budget)).unwrap());
        ds.seek(start);
        // Ranks take the samples of 20 steps of 6 in lockstep-free, shuffled order.
        let samples: Vec<u64> = (start..start + 120).collect();
        let got: Vec<Vec<(u64, Sample)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..ranks)
                .map(|r| {
                    let ds = ds.clone();
                    let mut mine: Vec<u64> = samples.iter().copied().filter(|s| (*s as usize) % ranks == r).collect();
                    let mut rng = SplitMix64::new(order_seed ^ r as u64);
                    for i in (1..mine.len()).rev() {
                        mine.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    scope.spawn(move || mine.iter().map(|&s| (s, read(&ds, s).unwrap())).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (s, tokens) in got.into_iter().flatten() {
            prop_assert_eq!(&tokens, &reference(&ds, root, s), "sample {}", s);
        }
    }
}

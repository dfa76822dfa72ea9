//! Datasets: a tokenized corpus split into train and val, cached as token shards, and the
//! fixed windows training reads from them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::corpus::Corpus;
use crate::error::DataError;
use crate::shard::{read_shard_with_vocab, write_shard};
use crate::tokenizer::{Tokenizer, TokenizerKind};

/// A tokenized corpus, split into train and val.
#[derive(Clone)]
pub struct Dataset {
    /// The first 90% of the tokens.
    pub train: Vec<u32>,
    /// The last 10% of the tokens.
    pub val: Vec<u32>,
    /// The tokenizer that produced them.
    pub tokenizer: Tokenizer,
    /// Hex SHA-256 of the corpus text.
    pub corpus_sha256: String,
    /// Where the corpus came from, in words.
    pub corpus_description: String,
    /// Size of the corpus text in bytes.
    pub corpus_bytes: usize,
    /// Whether the shards were read from the cache or (re)built, and why.
    pub cache: CacheStatus,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("train_tokens", &self.train.len())
            .field("val_tokens", &self.val.len())
            .field("tokenizer", &self.tokenizer)
            .field("corpus_sha256", &self.corpus_sha256)
            .field("corpus_description", &self.corpus_description)
            .field("corpus_bytes", &self.corpus_bytes)
            .field("cache", &self.cache)
            .finish()
    }
}

/// What [`prepare_dataset`] did with the shard cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Both shards existed and verified; nothing was tokenized.
    Reused,
    /// No shards existed; the corpus was tokenized and the shards written.
    Created,
    /// Shards existed but could not be used; the corpus was tokenized and the shards rewritten.
    Rebuilt {
        /// Why the existing shards were not used.
        reason: String,
    },
}

/// The cache key of a corpus and tokenizer kind: the first 16 hex digits of
/// SHA-256(`"<corpus sha256>:<kind>"`).
pub fn cache_key(corpus_sha256: &str, kind: TokenizerKind) -> String {
    let digest = Sha256::digest(format!("{corpus_sha256}:{kind}").as_bytes());
    hex::encode(digest)[..16].to_string()
}

/// The train and val shard paths for a cache key: `<cache_dir>/train-<key>.tok`, `val-<key>.tok`.
pub fn shard_paths(cache_dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    (
        cache_dir.join(format!("train-{key}.tok")),
        cache_dir.join(format!("val-{key}.tok")),
    )
}

/// Tokenizes `corpus` with a `kind` tokenizer and splits it as nanoGPT does: the first
/// `n * 9 / 10` tokens are train, the rest val.
///
/// The split is cached in `cache_dir` (created if needed) as the shards named by
/// [`shard_paths`] for [`cache_key`]. When both exist and verify (hash, vocabulary size,
/// split sizes) they are read instead of tokenizing; when they exist but do not verify they
/// are rebuilt, and [`Dataset::cache`] says why.
pub fn prepare_dataset(
    corpus: &Corpus,
    kind: TokenizerKind,
    cache_dir: &Path,
) -> Result<Dataset, DataError> {
    let tokenizer = Tokenizer::build(kind, &corpus.text)?;
    let key = cache_key(&corpus.sha256, kind);
    let (train_path, val_path) = shard_paths(cache_dir, &key);
    let dataset = |train, val, cache| Dataset {
        train,
        val,
        tokenizer: tokenizer.clone(),
        corpus_sha256: corpus.sha256.clone(),
        corpus_description: corpus.description.clone(),
        corpus_bytes: corpus.bytes(),
        cache,
    };

    let cache = match (train_path.exists(), val_path.exists()) {
        (false, false) => CacheStatus::Created,
        (true, true) => match read_cached(&train_path, &val_path, tokenizer.vocab_size()) {
            Ok((train, val)) => return Ok(dataset(train, val, CacheStatus::Reused)),
            Err(reason) => CacheStatus::Rebuilt { reason },
        },
        (train, _) => CacheStatus::Rebuilt {
            reason: format!(
                "only {} exists",
                if train { &train_path } else { &val_path }.display()
            ),
        },
    };

    let mut train = tokenizer.encode(&corpus.text)?;
    if train.is_empty() {
        return Err(DataError::Empty {
            what: corpus.description.clone(),
        });
    }
    let val = train.split_off(train_len(train.len()));
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| DataError::io("create directory", cache_dir, e))?;
    write_shard(&val_path, &val, tokenizer.vocab_size())?;
    write_shard(&train_path, &train, tokenizer.vocab_size())?;
    Ok(dataset(train, val, cache))
}

/// Number of train tokens out of `n`: nanoGPT's `int(n * 0.9)`.
fn train_len(n: usize) -> usize {
    n * 9 / 10
}

/// Reads cached shards, checking they fit the tokenizer and the split; the error is a reason.
fn read_cached(
    train_path: &Path,
    val_path: &Path,
    vocab_size: usize,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let (train, train_vocab) = read_shard_with_vocab(train_path).map_err(|e| e.to_string())?;
    let (val, val_vocab) = read_shard_with_vocab(val_path).map_err(|e| e.to_string())?;
    for (path, vocab) in [(train_path, train_vocab), (val_path, val_vocab)] {
        if vocab != vocab_size {
            return Err(format!(
                "{} has vocabulary size {vocab}, the tokenizer {vocab_size}",
                path.display()
            ));
        }
    }
    let n = train.len() + val.len();
    if train.len() != train_len(n) {
        return Err(format!(
            "the shards split {n} tokens {}/{}, not 90/10",
            train.len(),
            val.len()
        ));
    }
    Ok((train, val))
}

/// Number of non-overlapping windows of `block_size + 1` tokens in `tokens_len` tokens,
/// where window `i` starts at `i * block_size`: `(tokens_len - 1) / block_size`
/// (0 when there are no tokens or `block_size` is 0).
pub fn num_windows(tokens_len: usize, block_size: usize) -> usize {
    if block_size == 0 {
        return 0;
    }
    tokens_len.saturating_sub(1) / block_size
}

/// [`num_windows`] for a named split, with [`DataError::TooSmall`] when there is no window.
pub fn checked_num_windows(
    split: &str,
    tokens_len: usize,
    block_size: usize,
) -> Result<usize, DataError> {
    match num_windows(tokens_len, block_size) {
        0 => Err(DataError::TooSmall {
            split: split.to_string(),
            tokens: tokens_len,
            block_size,
        }),
        n => Ok(n),
    }
}

/// Fills `inputs` and `targets` (cleared first, `block_size` long after) with window `w`:
/// `inputs = tokens[w*bs .. w*bs + bs]`, `targets = tokens[w*bs + 1 .. w*bs + bs + 1]`.
///
/// # Panics
/// If `w >= num_windows(tokens.len(), block_size)`.
pub fn window(
    tokens: &[u32],
    block_size: usize,
    w: usize,
    inputs: &mut Vec<u32>,
    targets: &mut Vec<u32>,
) {
    let n = num_windows(tokens.len(), block_size);
    assert!(
        w < n,
        "window {w} out of range: {} tokens hold {n} windows of block_size {block_size}",
        tokens.len()
    );
    let start = w * block_size;
    inputs.clear();
    inputs.extend_from_slice(&tokens[start..start + block_size]);
    targets.clear();
    targets.extend_from_slice(&tokens[start + 1..start + block_size + 1]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::read_shard;

    fn corpus(text: &str) -> Corpus {
        Corpus::from_text("test corpus", text.to_string(), 1)
    }

    #[test]
    fn split_is_90_10_and_shards_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let text = "0123456789".repeat(10) + "abc"; // 103 bytes
        let c = corpus(&text);
        for (kind, n) in [(TokenizerKind::Bytes, 103), (TokenizerKind::Char, 103)] {
            let d = prepare_dataset(&c, kind, dir.path()).unwrap();
            assert_eq!(d.cache, CacheStatus::Created);
            assert_eq!((d.train.len(), d.val.len()), (92, n - 92), "{kind}");
            assert_eq!(
                d.tokenizer.decode(&d.train) + &d.tokenizer.decode(&d.val),
                text
            );
            assert_eq!(d.corpus_sha256, c.sha256);
            assert_eq!(d.corpus_bytes, 103);
            let (train_path, val_path) = shard_paths(dir.path(), &cache_key(&c.sha256, kind));
            assert_eq!(read_shard(&train_path).unwrap(), d.train);
            assert_eq!(read_shard(&val_path).unwrap(), d.val);
        }
        let gpt2 = prepare_dataset(&c, TokenizerKind::Gpt2, dir.path()).unwrap();
        let n = gpt2.train.len() + gpt2.val.len();
        assert_eq!(gpt2.train.len(), n * 9 / 10);
        assert_eq!(
            gpt2.tokenizer.decode(&gpt2.train) + &gpt2.tokenizer.decode(&gpt2.val),
            text
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    }

    #[test]
    fn split_sizes_table() {
        for (n, train) in [
            (1, 0),
            (2, 1),
            (9, 8),
            (10, 9),
            (11, 9),
            (100, 90),
            (1001, 900),
        ] {
            assert_eq!(train_len(n), train, "n {n}");
        }
    }

    #[test]
    fn cache_is_reused_then_rebuilt_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let c = corpus("To be, or not to be, that is the question.\n");
        let first = prepare_dataset(&c, TokenizerKind::Char, dir.path()).unwrap();
        assert_eq!(first.cache, CacheStatus::Created);
        let (train_path, val_path) =
            shard_paths(dir.path(), &cache_key(&c.sha256, TokenizerKind::Char));
        let mtimes = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        let before = (mtimes(&train_path), mtimes(&val_path));

        let second = prepare_dataset(&c, TokenizerKind::Char, dir.path()).unwrap();
        assert_eq!(second.cache, CacheStatus::Reused);
        assert_eq!((&second.train, &second.val), (&first.train, &first.val));
        assert_eq!(second.tokenizer.spec(), first.tokenizer.spec());
        assert_eq!((mtimes(&train_path), mtimes(&val_path)), before);

        // A damaged shard is rebuilt, not trusted, and the reason names it.
        let mut bytes = std::fs::read(&val_path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&val_path, bytes).unwrap();
        let third = prepare_dataset(&c, TokenizerKind::Char, dir.path()).unwrap();
        match &third.cache {
            CacheStatus::Rebuilt { reason } => assert!(reason.contains("val-"), "{reason}"),
            other => panic!("expected a rebuild, got {other:?}"),
        }
        assert_eq!((&third.train, &third.val), (&first.train, &first.val));
        assert_eq!(
            prepare_dataset(&c, TokenizerKind::Char, dir.path())
                .unwrap()
                .cache,
            CacheStatus::Reused
        );

        // A missing half is rebuilt too.
        std::fs::remove_file(&train_path).unwrap();
        let fourth = prepare_dataset(&c, TokenizerKind::Char, dir.path()).unwrap();
        assert!(
            matches!(fourth.cache, CacheStatus::Rebuilt { .. }),
            "{:?}",
            fourth.cache
        );
        assert_eq!(fourth.train, first.train);
    }

    #[test]
    fn cache_keys_differ_by_corpus_and_kind() {
        let a = cache_key("aa", TokenizerKind::Bytes);
        assert_eq!(a.len(), 16);
        assert_eq!(a, cache_key("aa", TokenizerKind::Bytes));
        assert_ne!(a, cache_key("ab", TokenizerKind::Bytes));
        assert_ne!(a, cache_key("aa", TokenizerKind::Char));
    }

    #[test]
    fn windows_table() {
        // (tokens, block_size, windows)
        for (len, bs, want) in [
            (0, 4, 0),
            (1, 4, 0),
            (4, 4, 0),
            (5, 4, 1),
            (8, 4, 1),
            (9, 4, 2),
            (10, 4, 2),
            (13, 4, 3),
            (5, 0, 0),
            (2, 1, 1),
        ] {
            assert_eq!(num_windows(len, bs), want, "len {len} bs {bs}");
        }
        let tokens: Vec<u32> = (0..10).collect();
        let (mut x, mut y) = (vec![99], vec![]);
        for (w, xs, ys) in [
            (0, [0, 1, 2, 3], [1, 2, 3, 4]),
            (1, [4, 5, 6, 7], [5, 6, 7, 8]),
        ] {
            window(&tokens, 4, w, &mut x, &mut y);
            assert_eq!(
                (x.as_slice(), y.as_slice()),
                (&xs[..], &ys[..]),
                "window {w}"
            );
        }
        let err = checked_num_windows("val", 4, 4).unwrap_err();
        assert!(matches!(
            err,
            DataError::TooSmall {
                tokens: 4,
                block_size: 4,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "the val split has 4 tokens, fewer than one window of block_size+1=5: use more data or a smaller block"
        );
        assert_eq!(checked_num_windows("train", 9, 4).unwrap(), 2);
    }

    #[test]
    #[should_panic(expected = "window 2 out of range")]
    fn window_out_of_range_panics() {
        let tokens: Vec<u32> = (0..9).collect();
        window(&tokens, 4, 2, &mut Vec::new(), &mut Vec::new());
    }
}

//! [`DataError`]: everything that can go wrong while loading a corpus, tokenizing it, or
//! reading and writing token shards. Every message names the thing (a path, a character,
//! a tokenizer name) and says what to do about it.

use std::path::PathBuf;

/// Errors of the data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A path given as corpus input does not exist.
    #[error("data path {} does not exist: pass an existing file or directory with --data", path.display())]
    Missing {
        /// The path that was asked for.
        path: PathBuf,
    },

    /// The corpus (or another input that must not be empty) holds no text.
    #[error("corpus from {what} is empty: pass files or directories that contain UTF-8 text with --data")]
    Empty {
        /// What the corpus was read from, in words.
        what: String,
    },

    /// An I/O operation on a file or directory failed.
    #[error("cannot {op} {}: {source}: check that the path exists and is accessible", path.display())]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// What was being done, as a verb phrase ("read", "create directory", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The char tokenizer met a character outside its vocabulary.
    #[error(
        "character {ch:?} (U+{:04X}) at byte offset {offset} is not in the char tokenizer's \
         vocabulary of {vocab_size} characters: the char tokenizer only knows the characters \
         of the corpus it was built from; use the bytes or gpt2 tokenizer for other text",
        *ch as u32
    )]
    UnknownChar {
        /// The character that has no id.
        ch: char,
        /// Byte offset of the character in the encoded text.
        offset: usize,
        /// Size of the char vocabulary.
        vocab_size: usize,
    },

    /// A tokenizer name that is not one of the known kinds.
    #[error("unknown tokenizer {name:?}: choose one of bytes, char, gpt2")]
    UnknownTokenizer {
        /// The name that was given.
        name: String,
    },

    /// A [`crate::TokenizerSpec`] that cannot describe a tokenizer (e.g. from a damaged checkpoint).
    #[error("invalid tokenizer spec: {reason}: the checkpoint or config that holds it is damaged or from another version")]
    InvalidSpec {
        /// What is wrong with it.
        reason: String,
    },

    /// The GPT-2 (r50k_base) tokenizer tables could not be built.
    #[error("cannot build the gpt2 tokenizer (tiktoken r50k_base): {reason}: use the bytes or char tokenizer")]
    Gpt2 {
        /// The error from tiktoken.
        reason: String,
    },

    /// A token id that does not fit the vocabulary it is stored with.
    #[error(
        "cannot write token shard {}: token {token} at position {position} is outside the \
         vocabulary of {vocab_size}: this is a bug in the tokenizer that produced it",
        path.display()
    )]
    TokenOutOfRange {
        /// The shard being written.
        path: PathBuf,
        /// The offending token id.
        token: u32,
        /// Its index in the token sequence.
        position: usize,
        /// The vocabulary size the shard declares.
        vocab_size: usize,
    },

    /// A token shard failed verification.
    #[error("token shard {} is corrupt ({reason}): delete it to rebuild", path.display())]
    CorruptShard {
        /// The shard file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },

    /// A split holds fewer tokens than one training window.
    #[error(
        "the {split} split has {tokens} tokens, fewer than one window of block_size+1={}: \
         use more data or a smaller block",
        block_size + 1
    )]
    TooSmall {
        /// Name of the split ("train" or "val").
        split: String,
        /// Number of tokens in it.
        tokens: usize,
        /// The model's context length.
        block_size: usize,
    },

    /// The built-in corpus found no crate sources in the cargo registry.
    #[error("built-in corpus: no crate sources found in {}: run `cargo fetch` or pass --data PATH", path.display())]
    NoRegistry {
        /// The registry source directory that was searched.
        path: PathBuf,
    },

    /// A `--source` argument of `tenax data prepare` that cannot be used.
    #[error(
        "--source {spec:?}: {reason}: write it as NAME=PATH[:WEIGHT], e.g. web=/data/web.jsonl:2"
    )]
    BadSource {
        /// The argument as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A data preparation config (TOML) that cannot be read or does not make sense.
    #[error("data prepare config {what}: {reason}: fix that key (docs/ARCHITECTURE.md, \"Data preparation\", lists them)")]
    BadConfig {
        /// The file, or "flags" for command-line values.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A dataset manifest that cannot be read.
    #[error("dataset manifest {}: {reason}: re-run `tenax data prepare` to rewrite it", path.display())]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The folder for near-dup spill files cannot be used.
    #[error(
        "cannot create near-dup spill files under {}: {source}: pass --spill-dir DIR with a \
         writable local folder that has room for them",
        path.display()
    )]
    SpillDir {
        /// The spill folder asked for.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A worker thread of the preparation pipeline panicked or could not be started.
    #[error("data prepare worker failed: {reason}: this is a bug, please report it")]
    Worker {
        /// What happened.
        reason: String,
    },
}

impl DataError {
    /// Shorthand for [`DataError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

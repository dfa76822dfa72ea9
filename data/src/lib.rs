//! tenax-data: the text a model trains on, turned into token ids.
//!
//! A [`Corpus`] comes from user files ([`load_corpus`]) or from the built-in corpus of Rust
//! sources of tenax's own dependencies ([`default_corpus`]). A [`Tokenizer`] (bytes, char or
//! GPT-2) encodes it; [`prepare_dataset`] splits the tokens 90/10 into train and val as
//! nanoGPT does and caches both as verified token shards; [`window`] cuts the fixed
//! `block_size + 1` windows that training samples.
//!
//! Modules:
//! - [`corpus`] — [`Corpus`], [`load_corpus`], [`default_corpus`].
//! - [`tokenizer`] — [`TokenizerKind`], [`TokenizerSpec`], [`Tokenizer`].
//! - [`hf`] — the tokenizer as files next to a Hugging Face model
//!   ([`hf::hf_tokenizer_files`]: GPT-2's vocab.json and merges.txt, or a table of ids).
//! - [`shard`] — the on-disk token shard format, [`write_shard`], [`read_shard`].
//! - [`dataset`] — [`Dataset`], [`prepare_dataset`], [`num_windows`], [`window`].
//! - [`error`] — [`DataError`].
//! - [`prepare`] — `tenax data prepare`: [`prepare::prepare`] streams raw text from several
//!   sources through normalisation, exact and near (MinHash/LSH) dedup, quality filters and
//!   PII/secret scrubbing into fixed-size token shards and a dataset manifest; its
//!   submodules are `config`, `source`, `normalize`, `filters`, `minhash`, `neardup` (the
//!   near-dup index under a memory bound, spilling to disk), `scrub` and `manifest`.
//!
//! Nothing here is async or touches the network; the only I/O is reading corpus files,
//! reading and writing shards in local directories, and the near-dup spill files.

pub mod corpus;
pub mod dataset;
pub mod error;
pub mod hf;
pub mod prepare;
pub mod shard;
pub mod tokenizer;

pub use corpus::{
    default_corpus, load_corpus, Corpus, DEFAULT_CORPUS_MAX_BYTES, DEFAULT_CORPUS_PER_CRATE_BYTES,
};
pub use dataset::{
    cache_key, checked_num_windows, num_windows, prepare_dataset, shard_paths, window, CacheStatus,
    Dataset,
};
pub use error::DataError;
pub use shard::{read_shard, read_shard_with_vocab, write_shard, write_shard_hashed};
pub use tokenizer::{Tokenizer, TokenizerKind, TokenizerSpec, GPT2_VOCAB_SIZE};

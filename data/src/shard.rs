//! Token shards: a token sequence on disk with a small self-verifying header.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | field                                                       |
//! |-------|-------------------------------------------------------------|
//! | 8     | magic `TNXTOK01`                                            |
//! | 4     | format version, `1`                                         |
//! | 4     | bytes per token: 2 if the vocabulary is ≤ 65536, else 4     |
//! | 8     | token count                                                 |
//! | 4     | vocabulary size                                             |
//! | 32    | SHA-256 of the token payload (the bytes after the header)   |
//!
//! followed by the tokens. Shards are written to a temporary file and renamed into place,
//! so a reader sees either no shard or a complete one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::DataError;

/// The first eight bytes of every token shard.
pub const SHARD_MAGIC: &[u8; 8] = b"TNXTOK01";
/// The shard format version this crate writes and reads.
pub const SHARD_VERSION: u32 = 1;
/// Length of the shard header in bytes.
pub const SHARD_HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4 + 32;

/// Writes `tokens` as a shard at `path` (through a temporary file in the same directory
/// and a rename). Every token must be below `vocab_size`.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<(), DataError> {
    let file_bytes = encode_shard(path, tokens, vocab_size)?;
    write_atomically(path, &file_bytes)
}

/// Like [`write_shard`], also returning the lower-case hex SHA-256 of the whole file and
/// its length in bytes (what a dataset manifest records for each shard).
pub fn write_shard_hashed(
    path: &Path,
    tokens: &[u32],
    vocab_size: usize,
) -> Result<(String, u64), DataError> {
    let file_bytes = encode_shard(path, tokens, vocab_size)?;
    write_atomically(path, &file_bytes)?;
    Ok((
        hex::encode(Sha256::digest(&file_bytes)),
        file_bytes.len() as u64,
    ))
}

/// The bytes of a shard file holding `tokens`; `path` only names the shard in errors.
fn encode_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<Vec<u8>, DataError> {
    let vocab = u32::try_from(vocab_size).map_err(|_| DataError::InvalidSpec {
        reason: format!(
            "vocabulary size {vocab_size} does not fit a token shard (at most {})",
            u32::MAX
        ),
    })?;
    if let Some((position, &token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        return Err(DataError::TokenOutOfRange {
            path: path.to_path_buf(),
            token,
            position,
            vocab_size,
        });
    }
    let width = token_width(vocab_size);
    let mut payload = Vec::with_capacity(tokens.len() * width);
    if width == 2 {
        for &t in tokens {
            payload.extend_from_slice(&(t as u16).to_le_bytes());
        }
    } else {
        for &t in tokens {
            payload.extend_from_slice(&t.to_le_bytes());
        }
    }
    let mut file_bytes = Vec::with_capacity(SHARD_HEADER_BYTES + payload.len());
    file_bytes.extend_from_slice(SHARD_MAGIC);
    file_bytes.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    file_bytes.extend_from_slice(&(width as u32).to_le_bytes());
    file_bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    file_bytes.extend_from_slice(&vocab.to_le_bytes());
    file_bytes.extend_from_slice(&Sha256::digest(&payload));
    file_bytes.extend_from_slice(&payload);
    Ok(file_bytes)
}

/// Reads and verifies the shard at `path`, returning its tokens.
///
/// Errors: [`DataError::CorruptShard`] when the magic, version, length, hash or a token id
/// is wrong; [`DataError::Io`] when the file cannot be read.
pub fn read_shard(path: &Path) -> Result<Vec<u32>, DataError> {
    read_shard_with_vocab(path).map(|(tokens, _)| tokens)
}

/// Like [`read_shard`], also returning the vocabulary size stored in the header.
pub fn read_shard_with_vocab(path: &Path) -> Result<(Vec<u32>, usize), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("read token shard", path, e))?;
    let corrupt = |reason: String| DataError::CorruptShard {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < SHARD_HEADER_BYTES {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    if &bytes[..8] != SHARD_MAGIC {
        return Err(corrupt("bad magic, not a tenax token shard".into()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let version = u32_at(8);
    if version != SHARD_VERSION {
        return Err(corrupt(format!(
            "format version {version}, expected {SHARD_VERSION}"
        )));
    }
    let width = u32_at(12) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let vocab_size = u32_at(24) as usize;
    if width != token_width(vocab_size) {
        return Err(corrupt(format!(
            "{width} bytes per token does not match vocabulary size {vocab_size}"
        )));
    }
    let payload = &bytes[SHARD_HEADER_BYTES..];
    let expected = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(width));
    if expected != Some(payload.len()) {
        return Err(corrupt(format!(
            "header says {count} tokens of {width} bytes, but the file holds {} payload bytes",
            payload.len()
        )));
    }
    if Sha256::digest(payload).as_slice() != &bytes[28..SHARD_HEADER_BYTES] {
        return Err(corrupt(
            "SHA-256 of the tokens does not match the header".into(),
        ));
    }
    let tokens: Vec<u32> = if width == 2 {
        payload
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    } else {
        payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if let Some((i, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        return Err(corrupt(format!(
            "token {t} at position {i} is outside the vocabulary of {vocab_size}"
        )));
    }
    Ok((tokens, vocab_size))
}

/// Bytes per token for a vocabulary.
fn token_width(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Writes `bytes` to a unique temporary file next to `path`, syncs it, and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(|e| DataError::io("create", &tmp, e))?;
        file.write_all(bytes)
            .map_err(|e| DataError::io("write", &tmp, e))?;
        file.sync_all()
            .map_err(|e| DataError::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| DataError::io("rename a temporary file onto", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_table() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&[u32], usize, usize)] = &[
            (&[], 256, 0),
            (&[0, 1, 255], 256, 2),
            (&[65535, 0, 7], 65536, 2),
            (&[65536, 50256, 3], 70000, 4),
            (&[15496, 995], 50257, 2),
        ];
        for (i, &(tokens, vocab, width)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("s{i}.tok"));
            write_shard(&path, tokens, vocab).unwrap();
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            assert_eq!(len, SHARD_HEADER_BYTES + tokens.len() * width, "case {i}");
            assert_eq!(
                read_shard_with_vocab(&path).unwrap(),
                (tokens.to_vec(), vocab),
                "case {i}"
            );
        }
        // Overwriting replaces, and leaves no temporary files behind.
        let path = dir.path().join("s0.tok");
        write_shard(&path, &[1, 2, 3], 4).unwrap();
        assert_eq!(read_shard(&path).unwrap(), vec![1, 2, 3]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), cases.len());
    }

    #[test]
    fn out_of_range_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tok");
        let err = write_shard(&path, &[1, 256], 256).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    token: 256,
                    position: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.tok");
        let tokens: Vec<u32> = (0..1000).map(|i| i % 50257).collect();
        write_shard(&path, &tokens, 50257).unwrap();
        let good = std::fs::read(&path).unwrap();

        type Damage = fn(&mut Vec<u8>);
        let damages: &[(&str, Damage)] = &[
            ("flip a payload byte", |b| {
                b[SHARD_HEADER_BYTES + 10] ^= 0x01
            }),
            ("flip the last byte", |b| *b.last_mut().unwrap() ^= 0x80),
            ("flip a hash byte", |b| b[40] ^= 0xff),
            ("flip the magic", |b| b[0] = b'X'),
            ("bump the version", |b| b[8] = 2),
            ("change the count", |b| b[16] ^= 0x01),
            ("change the width", |b| b[12] = 4),
            ("truncate the payload", |b| b.truncate(b.len() - 1)),
            ("truncate into the header", |b| b.truncate(20)),
            ("append a byte", |b| b.push(0)),
            ("empty file", |b| b.clear()),
        ];
        for (what, damage) in damages {
            let mut bytes = good.clone();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let err = read_shard(&path).unwrap_err();
            assert!(
                matches!(&err, DataError::CorruptShard { path: p, .. } if *p == path),
                "{what}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("train.tok") && msg.contains("delete it to rebuild"),
                "{what}: {msg}"
            );
        }
        std::fs::write(&path, &good).unwrap();
        assert_eq!(read_shard(&path).unwrap(), tokens);
    }

    #[test]
    fn missing_shard_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_shard(&dir.path().join("none.tok")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("none.tok"), "{err}");
    }
}

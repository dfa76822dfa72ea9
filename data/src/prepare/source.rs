//! Sources: `--source NAME=PATH[:WEIGHT]` arguments, the files they name, and the
//! documents in those files, read as a stream.
//!
//! A source is a file or a directory (walked recursively; entries whose name starts with
//! `.` skipped; symbolic links to directories not followed; files in sorted path order). A
//! file whose name ends in `.jsonl` holds one JSON object per line, the document's text in
//! a configurable field (`text`); any other file is plain UTF-8 text, one document per file
//! or per blank-line-separated paragraph. [`DocReader`] yields documents one at a time and
//! never holds more than one document (at most `max_doc_bytes`) plus a read buffer, and
//! hashes every input byte as it goes, so the dataset hash covers the inputs exactly as read.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::DataError;
use crate::prepare::config::{InputConfig, TextDocs};

/// One `--source` argument, parsed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// The source's name: letters, digits, `_` and `-` (it names its shards).
    pub name: String,
    /// The path as given (a `file://` URL is accepted and kept as given).
    pub location: String,
    /// Mixture weight, > 0 (default 1).
    pub weight: f64,
}

impl SourceSpec {
    /// Parses `NAME=PATH_OR_URL[:WEIGHT]`. A trailing `:WEIGHT` is taken as the weight only
    /// when it parses as a number, so `file:///data/x` and `/data/a:b` are paths.
    pub fn parse(spec: &str) -> Result<SourceSpec, DataError> {
        let bad = |reason: &str| DataError::BadSource {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| bad("no `=` between the name and the path"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(
                "the name must be non-empty ASCII letters, digits, `_` or `-`",
            ));
        }
        let (location, weight) = match rest.rsplit_once(':') {
            Some((loc, w)) if w.parse::<f64>().is_ok() => (loc, w.parse::<f64>().expect("checked")),
            _ => (rest, 1.0),
        };
        if location.is_empty() {
            return Err(bad("the path is empty"));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(bad("the weight must be a positive number"));
        }
        Ok(SourceSpec {
            name: name.to_string(),
            location: location.to_string(),
            weight,
        })
    }

    /// The local path of this source, or an error for a URL scheme other than `file://`.
    pub fn local_path(&self) -> Result<PathBuf, DataError> {
        if let Some(path) = self.location.strip_prefix("file://") {
            return Ok(PathBuf::from(path));
        }
        if let Some((scheme, _)) = self.location.split_once("://") {
            return Err(DataError::BadSource {
                spec: format!("{}={}", self.name, self.location),
                reason: format!(
                    "{scheme}:// inputs are not supported yet (local paths and file:// only); \
                     copy the data to a local directory first"
                ),
            });
        }
        Ok(PathBuf::from(&self.location))
    }
}

/// How an input file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Plain UTF-8 text.
    Text,
    /// JSON Lines with a text field.
    Jsonl,
}

/// One input file of a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    /// The file on disk.
    pub path: PathBuf,
    /// Its path relative to the source (its file name when the source is a file), with
    /// `/` separators: what the input hash records, so moving the data keeps the hash.
    pub rel: String,
    /// Its size when listed.
    pub bytes: u64,
    /// How it is read.
    pub kind: FileKind,
}

/// The files of a source, in the order they are read.
///
/// Errors: [`DataError::Missing`] when the path does not exist, [`DataError::Io`] when a
/// directory cannot be listed.
pub fn list_files(path: &Path) -> Result<Vec<InputFile>, DataError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(DataError::io("read metadata of", path, e)),
    };
    let mut found = Vec::new();
    if meta.is_dir() {
        walk(path, &mut found)?;
        found.sort();
    } else {
        found.push(path.to_path_buf());
    }
    found
        .into_iter()
        .map(|p| {
            let rel = if meta.is_dir() {
                p.strip_prefix(path)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            } else {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let bytes = std::fs::metadata(&p)
                .map_err(|e| DataError::io("read metadata of", &p, e))?
                .len();
            let kind = if rel.ends_with(".jsonl") {
                FileKind::Jsonl
            } else {
                FileKind::Text
            };
            Ok(InputFile {
                path: p,
                rel,
                bytes,
                kind,
            })
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("list", dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(|e| DataError::io("read metadata of", &path, e))?;
        if ty.is_dir() {
            walk(&path, out)?;
        } else if ty.is_file() || (ty.is_symlink() && path.is_file()) {
            out.push(path);
        }
    }
    Ok(())
}

/// What [`DocReader::next_doc`] yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A document's raw text.
    Doc(String),
    /// Something that is not a usable document, and why.
    Skipped(SkipReason),
}

/// Why an input piece was not made a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Not valid UTF-8.
    InvalidUtf8,
    /// A JSONL line that is not a JSON object with a string in the text field.
    MalformedJson,
    /// Longer than `max_doc_bytes`.
    TooLong,
}

/// Streams the documents of one file and hashes its bytes.
pub struct DocReader {
    reader: BufReader<File>,
    path: PathBuf,
    kind: FileKind,
    config: InputConfig,
    hasher: Sha256,
    bytes: u64,
    done: bool,
}

impl DocReader {
    /// Opens `file` for reading.
    pub fn open(file: &InputFile, config: &InputConfig) -> Result<Self, DataError> {
        let f = File::open(&file.path).map_err(|e| DataError::io("open", &file.path, e))?;
        Ok(DocReader {
            reader: BufReader::with_capacity(1 << 20, f),
            path: file.path.clone(),
            kind: file.kind,
            config: config.clone(),
            hasher: Sha256::new(),
            bytes: 0,
            done: false,
        })
    }

    /// The next document, or `None` at the end of the file.
    pub fn next_doc(&mut self) -> Result<Option<Item>, DataError> {
        if self.done {
            return Ok(None);
        }
        match (self.kind, self.config.text_docs) {
            (FileKind::Jsonl, _) => self.next_json(),
            (FileKind::Text, TextDocs::File) => self.whole_file(),
            (FileKind::Text, TextDocs::Paragraphs) => self.next_paragraph(),
        }
    }

    /// Consumes the reader: the hex SHA-256 and the length of every byte read.
    pub fn finish(mut self) -> Result<(String, u64), DataError> {
        // Hash whatever was not read (a caller that stops early still gets the file's hash).
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self
                .reader
                .read(&mut buf)
                .map_err(|e| DataError::io("read", &self.path, e))?;
            if n == 0 {
                break;
            }
            self.hasher.update(&buf[..n]);
            self.bytes += n as u64;
        }
        Ok((hex::encode(self.hasher.finalize()), self.bytes))
    }

    fn whole_file(&mut self) -> Result<Option<Item>, DataError> {
        self.done = true;
        let cap = self.config.max_doc_bytes;
        let mut buf = Vec::new();
        (&mut self.reader)
            .take(cap as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| DataError::io("read", &self.path, e))?;
        self.hasher.update(&buf);
        self.bytes += buf.len() as u64;
        if buf.len() > cap {
            return Ok(Some(Item::Skipped(SkipReason::TooLong)));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        Ok(Some(match String::from_utf8(buf) {
            Ok(s) => Item::Doc(s),
            Err(_) => Item::Skipped(SkipReason::InvalidUtf8),
        }))
    }

    fn next_paragraph(&mut self) -> Result<Option<Item>, DataError> {
        let cap = self.config.max_doc_bytes;
        let mut doc: Vec<u8> = Vec::new();
        let mut too_long = false;
        let mut line = Vec::new();
        loop {
            line.clear();
            let (n, overflow) = self.read_line_capped(&mut line, cap)?;
            if n == 0 {
                self.done = true;
                break;
            }
            let blank = !overflow && line.iter().all(|b| b.is_ascii_whitespace());
            if blank {
                if doc.is_empty() && !too_long {
                    continue;
                }
                break;
            }
            if overflow || doc.len() + line.len() > cap {
                too_long = true;
                doc.clear();
            } else if !too_long {
                doc.extend_from_slice(&line);
            }
        }
        if too_long {
            return Ok(Some(Item::Skipped(SkipReason::TooLong)));
        }
        if doc.is_empty() {
            return Ok(None);
        }
        Ok(Some(match String::from_utf8(doc) {
            Ok(s) => Item::Doc(s),
            Err(_) => Item::Skipped(SkipReason::InvalidUtf8),
        }))
    }

    fn next_json(&mut self) -> Result<Option<Item>, DataError> {
        let cap = self.config.max_doc_bytes;
        let mut line = Vec::new();
        loop {
            line.clear();
            // A JSON line may be longer than its text (escapes, other fields): allow 2x + 64 KiB.
            let (n, overflow) = self.read_line_capped(&mut line, cap * 2 + (64 << 10))?;
            if n == 0 {
                self.done = true;
                return Ok(None);
            }
            if overflow {
                return Ok(Some(Item::Skipped(SkipReason::TooLong)));
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let value: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(_) if std::str::from_utf8(&line).is_err() => {
                    return Ok(Some(Item::Skipped(SkipReason::InvalidUtf8)))
                }
                Err(_) => return Ok(Some(Item::Skipped(SkipReason::MalformedJson))),
            };
            return Ok(Some(
                match value.get(&self.config.jsonl_field).and_then(|t| t.as_str()) {
                    Some(text) if text.len() > cap => Item::Skipped(SkipReason::TooLong),
                    Some(text) => Item::Doc(text.to_string()),
                    None => Item::Skipped(SkipReason::MalformedJson),
                },
            ));
        }
    }

    /// Reads one line (through `\n`) into `line`, hashing it; keeps at most `cap` bytes
    /// and skips the rest of a longer line. Returns the bytes consumed and whether the
    /// line was longer than `cap`.
    fn read_line_capped(
        &mut self,
        line: &mut Vec<u8>,
        cap: usize,
    ) -> Result<(usize, bool), DataError> {
        let mut consumed = 0usize;
        let mut overflow = false;
        loop {
            let buf = self
                .reader
                .fill_buf()
                .map_err(|e| DataError::io("read", &self.path, e))?;
            if buf.is_empty() {
                break;
            }
            let (take, end) = match memchr_newline(buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let chunk = &buf[..take];
            self.hasher.update(chunk);
            if !overflow {
                if line.len() + chunk.len() > cap {
                    overflow = true;
                    line.clear();
                } else {
                    line.extend_from_slice(chunk);
                }
            }
            self.reader.consume(take);
            consumed += take;
            if end {
                break;
            }
        }
        self.bytes += consumed as u64;
        Ok((consumed, overflow))
    }
}

fn memchr_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, &str, &str, f64)] = &[
            ("web=/data/web", "web", "/data/web", 1.0),
            ("web=/data/web:2", "web", "/data/web", 2.0),
            ("w_1-b=rel/dir:0.25", "w_1-b", "rel/dir", 0.25),
            ("f=file:///abs/x.jsonl", "f", "file:///abs/x.jsonl", 1.0),
            ("f=file:///abs/x.jsonl:3", "f", "file:///abs/x.jsonl", 3.0),
            ("c=/a/b:c", "c", "/a/b:c", 1.0),
        ];
        for &(spec, name, loc, w) in ok {
            let s = SourceSpec::parse(spec).unwrap();
            assert_eq!(
                (s.name.as_str(), s.location.as_str(), s.weight),
                (name, loc, w),
                "{spec}"
            );
        }
        let bad: &[(&str, &str)] = &[
            ("/data/web", "no `=`"),
            ("=x", "name"),
            ("a b=x", "name"),
            ("a=", "path is empty"),
            ("a=:2", "path is empty"),
            ("a=/x:0", "positive"),
            ("a=/x:-1", "positive"),
        ];
        for &(spec, want) in bad {
            let err = SourceSpec::parse(spec).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("NAME=PATH"),
                "{spec}: {err}"
            );
        }
        let s3 = SourceSpec::parse("s=s3://bucket/x").unwrap();
        assert!(s3
            .local_path()
            .unwrap_err()
            .to_string()
            .contains("s3:// inputs"));
        assert_eq!(
            SourceSpec::parse("f=file:///abs/x")
                .unwrap()
                .local_path()
                .unwrap(),
            PathBuf::from("/abs/x")
        );
    }

    fn read_all(path: &Path, config: &InputConfig) -> (Vec<Item>, String, u64) {
        let files = list_files(path).unwrap();
        assert_eq!(files.len(), 1);
        let mut r = DocReader::open(&files[0], config).unwrap();
        let mut items = Vec::new();
        while let Some(item) = r.next_doc().unwrap() {
            items.push(item);
        }
        let (hash, bytes) = r.finish().unwrap();
        (items, hash, bytes)
    }

    #[test]
    fn readers_table() {
        let dir = tempfile::tempdir().unwrap();
        let text = "first para\nline two\n\n\n second\n  \nthird\n";
        std::fs::write(dir.path().join("a.txt"), text).unwrap();
        let want_hash = hex::encode(Sha256::digest(text.as_bytes()));

        let whole = InputConfig::default();
        let (items, hash, bytes) = read_all(&dir.path().join("a.txt"), &whole);
        assert_eq!(items, vec![Item::Doc(text.into())]);
        assert_eq!(
            (hash.as_str(), bytes),
            (want_hash.as_str(), text.len() as u64)
        );

        let paras = InputConfig {
            text_docs: TextDocs::Paragraphs,
            ..InputConfig::default()
        };
        let (items, hash, _) = read_all(&dir.path().join("a.txt"), &paras);
        assert_eq!(
            items,
            vec![
                Item::Doc("first para\nline two\n".into()),
                Item::Doc(" second\n".into()),
                Item::Doc("third\n".into())
            ]
        );
        assert_eq!(hash, want_hash);

        let small = InputConfig {
            max_doc_bytes: 12,
            ..paras.clone()
        };
        let (items, hash, _) = read_all(&dir.path().join("a.txt"), &small);
        assert_eq!(
            items,
            vec![
                Item::Skipped(SkipReason::TooLong),
                Item::Doc(" second\n".into()),
                Item::Doc("third\n".into())
            ]
        );
        assert_eq!(hash, want_hash, "skipped bytes are hashed too");

        let jsonl =
            "{\"text\":\"one\",\"id\":1}\n\nnot json\n{\"id\":3}\n{\"text\":\"caf\\u00e9\"}";
        std::fs::write(dir.path().join("b.jsonl"), jsonl).unwrap();
        let (items, _, bytes) = read_all(&dir.path().join("b.jsonl"), &whole);
        assert_eq!(
            items,
            vec![
                Item::Doc("one".into()),
                Item::Skipped(SkipReason::MalformedJson),
                Item::Skipped(SkipReason::MalformedJson),
                Item::Doc("café".into()),
            ]
        );
        assert_eq!(bytes, jsonl.len() as u64);

        std::fs::write(dir.path().join("c.bin"), [0xff, 0xfe, 0x00]).unwrap();
        let (items, _, _) = read_all(&dir.path().join("c.bin"), &whole);
        assert_eq!(items, vec![Item::Skipped(SkipReason::InvalidUtf8)]);
    }

    #[test]
    fn directories_are_walked_sorted_without_hidden_entries() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/inner")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/x"), "x").unwrap();
        std::fs::write(root.join("b/inner/z.jsonl"), "{}").unwrap();
        std::fs::write(root.join("b/a.txt"), "two").unwrap();
        std::fs::write(root.join("a.txt"), "one").unwrap();
        let files = list_files(root).unwrap();
        let rels: Vec<(&str, FileKind)> = files.iter().map(|f| (f.rel.as_str(), f.kind)).collect();
        assert_eq!(
            rels,
            vec![
                ("a.txt", FileKind::Text),
                ("b/a.txt", FileKind::Text),
                ("b/inner/z.jsonl", FileKind::Jsonl)
            ]
        );
        assert!(matches!(
            list_files(&root.join("nope")),
            Err(DataError::Missing { .. })
        ));
    }
}

//! Corpora: the raw text a model is trained on.
//!
//! [`load_corpus`] reads user-given files and directories; [`default_corpus`] builds the
//! built-in corpus from the Rust sources of the crates tenax itself is built from, found in
//! the local cargo registry, so `tenax` trains out of the box without downloading anything.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::DataError;

/// The most bytes of text [`default_corpus`] returns (4 MiB).
pub const DEFAULT_CORPUS_MAX_BYTES: usize = 4 << 20;

/// At most this many bytes of the built-in corpus come from one crate, so that a few
/// large crates (generated bindings, say) do not make up most of it.
pub const DEFAULT_CORPUS_PER_CRATE_BYTES: usize = 128 << 10;

/// The workspace's `Cargo.lock`, which names the crates of the built-in corpus.
const CARGO_LOCK: &str = include_str!("../../Cargo.lock");

/// Text to train on, with where it came from and a content hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Corpus {
    /// Where the text came from, in words (for logs and run metadata).
    pub description: String,
    /// The text itself.
    pub text: String,
    /// How many files the text was assembled from.
    pub files: usize,
    /// Lower-case hex SHA-256 of the UTF-8 bytes of `text`.
    pub sha256: String,
}

impl Corpus {
    /// Builds a corpus from text, computing its hash.
    pub fn from_text(description: impl Into<String>, text: String, files: usize) -> Self {
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        Corpus {
            description: description.into(),
            text,
            files,
            sha256,
        }
    }

    /// Size of the text in bytes.
    pub fn bytes(&self) -> usize {
        self.text.len()
    }
}

impl std::fmt::Debug for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Corpus")
            .field("description", &self.description)
            .field("bytes", &self.text.len())
            .field("files", &self.files)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// Loads a corpus from files and directories.
///
/// Paths are taken in the order given. A directory is walked recursively and its files are
/// taken in sorted path order; entries whose name starts with `.` (such as `.git`) are skipped
/// inside directories, and symbolic links to directories are not followed. A file that is not
/// valid UTF-8 is skipped and counted in the description. Files are concatenated, with a
/// `\n` added after a file whose text does not end with one.
///
/// Errors: [`DataError::Missing`] for a path that does not exist, [`DataError::Empty`] when
/// the files hold no text at all, [`DataError::Io`] when something cannot be read.
pub fn load_corpus(paths: &[PathBuf]) -> Result<Corpus, DataError> {
    let what = if paths.is_empty() {
        "no paths".to_string()
    } else {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut files = Vec::new();
    for path in paths {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::Missing { path: path.clone() })
            }
            Err(e) => return Err(DataError::io("read metadata of", path, e)),
        };
        if meta.is_dir() {
            let mut found = Vec::new();
            walk_files(path, &mut found, &|name| !name.starts_with('.'))?;
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }

    let mut text = String::new();
    let mut used = 0usize;
    let mut skipped = 0usize;
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| DataError::io("read", file, e))?;
        match String::from_utf8(bytes) {
            Ok(s) => {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&s);
                used += 1;
            }
            Err(_) => skipped += 1,
        }
    }
    if text.is_empty() {
        return Err(DataError::Empty { what });
    }
    let mut description = format!("{used} file{} from {what}", plural(used));
    if skipped > 0 {
        description.push_str(&format!(
            " ({skipped} non-UTF-8 file{} skipped)",
            plural(skipped)
        ));
    }
    Ok(Corpus::from_text(description, text, used))
}

/// The built-in corpus: Rust sources of the registry crates listed in tenax's `Cargo.lock`.
///
/// The registry packages of the embedded workspace `Cargo.lock` are taken sorted by
/// (name, version) as strings. Each is looked up as `<name>-<version>/` in the sorted index
/// directories under `$CARGO_HOME/registry/src` (default `~/.cargo/registry/src`), first match
/// wins; crates not found there are skipped. Each crate's `.rs` files (symbolic links not
/// followed, non-UTF-8 files skipped) are taken in sorted relative-path order and appended as
/// `// <name>-<version>/<relpath>\n<contents>\n`, at most [`DEFAULT_CORPUS_PER_CRATE_BYTES`]
/// per crate, until [`DEFAULT_CORPUS_MAX_BYTES`] is reached; a file that crosses either cap
/// is cut at a char boundary.
///
/// The result depends only on `Cargo.lock` and the (immutable) registry sources, so it is
/// the same on every machine that has fetched the crates.
///
/// Errors: [`DataError::NoRegistry`] when no crate source is found.
pub fn default_corpus() -> Result<Corpus, DataError> {
    let registry = registry_src_dir();
    let mut index_dirs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&registry) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                index_dirs.push(entry.path());
            }
        }
    }
    index_dirs.sort();

    let packages = registry_packages(CARGO_LOCK);
    let mut text = String::new();
    let mut crates = 0usize;
    let mut files = 0usize;
    let mut missing = 0usize;
    let mut truncated = false;
    'crates: for (name, version) in &packages {
        let dir_name = format!("{name}-{version}");
        let Some(crate_dir) = index_dirs
            .iter()
            .map(|d| d.join(&dir_name))
            .find(|d| d.is_dir())
        else {
            missing += 1;
            continue;
        };
        let mut sources = Vec::new();
        walk_files(&crate_dir, &mut sources, &|_| true)?;
        let mut rel: Vec<(String, PathBuf)> = sources
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .filter_map(|p| {
                let r = p.strip_prefix(&crate_dir).ok()?;
                let parts: Vec<String> = r
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                Some((parts.join("/"), p))
            })
            .collect();
        rel.sort();
        let mut used = false;
        let crate_start = text.len();
        for (relpath, path) in rel {
            let Ok(contents) = std::fs::read_to_string(&path) else {
                continue;
            };
            let chunk = format!("// {dir_name}/{relpath}\n{contents}\n");
            let room = DEFAULT_CORPUS_MAX_BYTES - text.len();
            let crate_room = DEFAULT_CORPUS_PER_CRATE_BYTES - (text.len() - crate_start);
            used = true;
            files += 1;
            if chunk.len() >= room {
                text.push_str(&chunk[..floor_char_boundary(&chunk, room)]);
                truncated = true;
                crates += 1;
                break 'crates;
            }
            if chunk.len() >= crate_room {
                text.push_str(&chunk[..floor_char_boundary(&chunk, crate_room)]);
                break;
            }
            text.push_str(&chunk);
        }
        if used {
            crates += 1;
        }
    }
    if text.is_empty() {
        return Err(DataError::NoRegistry { path: registry });
    }
    let mut description = format!(
        "built-in corpus: Rust sources of {crates} crate{} from Cargo.lock (cargo registry at {})",
        plural(crates),
        registry.display()
    );
    if truncated {
        description.push_str(&format!(", cut at {DEFAULT_CORPUS_MAX_BYTES} bytes"));
    } else if missing > 0 {
        description.push_str(&format!(
            ", {missing} crate{} not in the registry",
            plural(missing)
        ));
    }
    Ok(Corpus::from_text(description, text, files))
}

/// `$CARGO_HOME/registry/src`, or `~/.cargo/registry/src`.
fn registry_src_dir() -> PathBuf {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home).join(".cargo"),
            _ => PathBuf::from("~/.cargo"),
        },
    };
    cargo_home.join("registry").join("src")
}

/// The `(name, version)` of every registry package in a `Cargo.lock`, sorted and deduplicated.
fn registry_packages(lock: &str) -> Vec<(String, String)> {
    fn finish(
        out: &mut Vec<(String, String)>,
        name: &mut Option<String>,
        version: &mut Option<String>,
        registry: &mut bool,
    ) {
        if let (Some(n), Some(v), true) = (name.take(), version.take(), *registry) {
            out.push((n, v));
        }
        *registry = false;
    }
    let (mut name, mut version, mut registry) = (None, None, false);
    let mut out = Vec::new();
    for line in lock.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            finish(&mut out, &mut name, &mut version, &mut registry);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "name" => name = Some(value),
            "version" => version = Some(value),
            "source" => registry = value.starts_with("registry+") || value.starts_with("sparse+"),
            _ => {}
        }
    }
    finish(&mut out, &mut name, &mut version, &mut registry);
    out.sort();
    out.dedup();
    out
}

/// Appends every regular file under `dir` (recursively) to `out`. Entries whose file name
/// fails `keep` are skipped; symbolic links are followed for files but not for directories.
fn walk_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io("read directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("read directory", dir, e))?;
        if !keep(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(|e| DataError::io("read metadata of", &path, e))?;
        if file_type.is_dir() {
            walk_files(&path, out, keep)?;
        } else if file_type.is_file() || (file_type.is_symlink() && path.is_file()) {
            out.push(path);
        }
    }
    Ok(())
}

/// The largest index `<= max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_corpus_walks_nested_dirs_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/inner")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join("b/inner/z.txt"), "three\n").unwrap();
        std::fs::write(root.join("b/a.txt"), "two").unwrap();
        std::fs::write(root.join("a.txt"), "one\n").unwrap();
        std::fs::write(root.join("c.bin"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(root.join(".git/HEAD"), "hidden\n").unwrap();

        let corpus = load_corpus(&[root.to_path_buf()]).unwrap();
        assert_eq!(corpus.text, "one\ntwo\nthree\n");
        assert_eq!(corpus.files, 3);
        assert_eq!(corpus.bytes(), 14);
        assert!(
            corpus.description.contains("1 non-UTF-8 file skipped"),
            "{}",
            corpus.description
        );
        assert_eq!(
            corpus.sha256,
            hex::encode(Sha256::digest(b"one\ntwo\nthree\n"))
        );

        let again = load_corpus(&[root.to_path_buf()]).unwrap();
        assert_eq!(again.sha256, corpus.sha256);

        // Explicit files are taken in the order given.
        let files = load_corpus(&[root.join("b/a.txt"), root.join("a.txt")]).unwrap();
        assert_eq!(files.text, "two\none\n");
        assert_eq!(files.files, 2);
    }

    #[test]
    fn load_corpus_missing_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let err = load_corpus(std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            matches!(&err, DataError::Missing { path } if *path == missing),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("nope.txt") && msg.contains("--data"), "{msg}");
    }

    #[test]
    fn load_corpus_empty_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.txt"), "").unwrap();
        for paths in [
            vec![dir.path().to_path_buf()],
            vec![dir.path().join("empty.txt")],
            vec![],
        ] {
            let err = load_corpus(&paths).unwrap_err();
            assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
            assert!(err.to_string().contains("is empty"), "{err}");
        }
    }

    #[test]
    fn registry_packages_parses_cargo_lock() {
        let lock = r#"
version = 4

[[package]]
name = "zeta"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "00"

[[package]]
name = "local"
version = "0.1.0"
dependencies = [
 "zeta",
]

[[package]]
name = "alpha"
version = "0.2.0"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "gitdep"
version = "0.3.0"
source = "git+https://example.com/gitdep#abc"
"#;
        assert_eq!(
            registry_packages(lock),
            vec![
                ("alpha".into(), "0.2.0".into()),
                ("zeta".into(), "1.0.0".into())
            ]
        );
        // The embedded lock file has registry packages, tenax's own crates are not among them.
        let real = registry_packages(CARGO_LOCK);
        assert!(real.len() > 10);
        assert!(real.iter().all(|(n, _)| !n.starts_with("tenax")));
    }

    #[test]
    fn floor_char_boundary_table() {
        let s = "aé€"; // 1 + 2 + 3 bytes
        for (max, want) in [
            (0, 0),
            (1, 1),
            (2, 1),
            (3, 3),
            (4, 3),
            (5, 3),
            (6, 6),
            (100, 6),
        ] {
            assert_eq!(floor_char_boundary(s, max), want, "max {max}");
        }
    }

    #[test]
    fn default_corpus_is_deterministic_and_capped() {
        let a = default_corpus().unwrap();
        let b = default_corpus().unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.text, b.text);
        assert!(a.bytes() <= DEFAULT_CORPUS_MAX_BYTES, "{}", a.bytes());
        assert!(a.bytes() > 100 * 1024, "{}", a.bytes());
        assert!(a.text.starts_with("// "), "{}", &a.text[..40]);
        assert!(
            a.description
                .starts_with("built-in corpus: Rust sources of "),
            "{}",
            a.description
        );
    }
}

//! [`NearDupIndex`]: the LSH index of near dedup under a memory bound, spilling to disk.
//!
//! It takes exactly the decisions of the in-memory [`LshIndex`](super::minhash::LshIndex)
//! (the same documents kept and removed, the same `of` and similarity) while the bytes it
//! holds stay under `bound_bytes`. The rule it reproduces: a document's band keys are
//! looked up in band order; each key names the first indexed document that had it; the
//! first such document (each checked once) whose estimated Jaccard similarity reaches
//! `near_threshold` makes it a duplicate; otherwise it is indexed (while fewer than
//! `max_near_docs` are) and each of its keys that no indexed document had yet now names it.
//!
//! Layout. Documents are numbered in the order they are indexed. The resident part holds
//! the documents indexed since the last spill: a [`KeyTable`] (open addressing, band key →
//! document) and their 16-bit signatures in pages. When inserting the next document could
//! take the accounted bytes past the bound, the resident part is spilled into a private
//! folder (`.tenax-near-dup-<pid>-<n>` under the spill folder): the table's entries,
//! sorted by key, become one more run file of 12-byte records (`u64` key, `u32` document,
//! little-endian), and the signatures are appended to one file indexed by document number.
//! Every document in run `r` precedes every document in run `r + 1` and in the resident
//! table, and a key is stored only where it first appeared, so "the first indexed document
//! with this key" is the match in the oldest run that has it, else the resident one.
//!
//! Lookups come in chunks (at most a quarter of the bound of scratch, 12 bytes a key):
//! before a chunk is decided, all its keys, sorted, are merged against every run in one
//! sequential read per run ([`merge_lookup`]), and the matches kept in the scratch. A spill
//! in the middle of a chunk first copies the resident matches of the chunk's keys into the
//! scratch, so the chunk's view stays complete. A candidate in a run has its signature
//! read back from the signature file (one 256-byte read with the defaults).
//!
//! Cost: no disk I/O until the first spill; after it, every chunk reads every run once, so
//! spilled bytes read grow with (documents / bound)^2. The bound buys a run that finishes
//! on a small machine, not speed; size it so that a corpus spills rarely.
//!
//! Accounting (what the bound covers, from the allocations' real capacities): the key
//! table (16 bytes a slot, load at most 3/4, and both tables while it doubles), the
//! signature pages, the chunk scratch, one I/O buffer and the per-document temporaries.
//! [`NearDupIndex::stats`] reports the peak; tests assert it never passes the bound.
//! The folder and its files are removed when the index is dropped, on success, on error
//! and on panic.

use std::convert::Infallible;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::prepare::config::DedupConfig;
use crate::prepare::minhash::{band_keys, estimate_b16, NearDecision};

/// Bytes of one slot of a [`KeyTable`]: a `u64` key and a `u32` document, padded to 16.
pub const SLOT_BYTES: u64 = 16;
/// Bytes of one record of a spilled run: `u64` key and `u32` document, little-endian.
pub const RUN_RECORD_BYTES: u64 = 12;
/// Bytes of the one read or write buffer of a spill file open at a time.
pub const IO_BUF_BYTES: u64 = 8 << 10;
/// Bytes of chunk scratch per key: the key (8) and its match in the runs (4).
pub const SCRATCH_KEY_BYTES: u64 = 12;
/// A document number that names no document (an empty slot, no match).
const NONE: u32 = u32::MAX;

/// How the near-dup index may use memory and disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearDupMemory {
    /// Most bytes the index holds at once; past it the resident part spills to disk.
    pub bound_bytes: u64,
    /// Folder under which a private spill folder is created (and removed at the end).
    pub spill_dir: PathBuf,
}

/// What the near-dup index did with memory and disk (in the manifest as
/// `near_dup_index`; not part of the dataset hash, since it never changes the output).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NearDupStats {
    /// The memory bound it ran under.
    pub bound_bytes: u64,
    /// Most bytes it held at once (accounted as in the module docs); at most the bound.
    pub peak_bytes: u64,
    /// Times the resident part was written to disk.
    pub spills: u64,
    /// Bytes written to spill files (runs and signatures).
    pub spilled_bytes: u64,
    /// Bytes read back from spill files.
    pub spill_read_bytes: u64,
}

/// An open-addressing hash table from band key to document (linear probing, load at most
/// 3/4, a power of two of slots); its memory is exactly its slots.
#[derive(Debug, Default)]
pub struct KeyTable {
    slots: Vec<(u64, u32)>,
    len: usize,
}

impl KeyTable {
    /// An empty table holding no memory.
    pub fn new() -> Self {
        KeyTable::default()
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table's slots hold.
    pub fn bytes(&self) -> u64 {
        self.slots.capacity() as u64 * SLOT_BYTES
    }

    /// Slots a table of `len` entries needs: a power of two, at least 16, load <= 3/4.
    pub fn slots_for(len: usize) -> usize {
        (len * 4).div_ceil(3).next_power_of_two().max(16)
    }

    /// Bytes held at the peak of making room for `extra` more entries (both tables while
    /// it grows), and after.
    pub fn reserve_cost(&self, extra: usize) -> (u64, u64) {
        let slots = KeyTable::slots_for(self.len + extra);
        if slots <= self.slots.len() {
            (self.bytes(), self.bytes())
        } else {
            let after = slots as u64 * SLOT_BYTES;
            (self.bytes() + after, after)
        }
    }

    /// Makes room for `extra` more entries in one step; returns the bytes held at the
    /// peak (both tables while it grows).
    pub fn reserve(&mut self, extra: usize) -> u64 {
        let slots = KeyTable::slots_for(self.len + extra);
        if slots <= self.slots.len() {
            return self.bytes();
        }
        let mut grown = vec![(0u64, NONE); slots];
        let peak = self.bytes() + grown.capacity() as u64 * SLOT_BYTES;
        let mask = slots - 1;
        for &(key, id) in self.slots.iter().filter(|e| e.1 != NONE) {
            let mut i = key as usize & mask;
            while grown[i].1 != NONE {
                i = (i + 1) & mask;
            }
            grown[i] = (key, id);
        }
        self.slots = grown;
        peak
    }

    /// The document stored for `key`.
    pub fn get(&self, key: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = key as usize & mask;
        loop {
            let (k, id) = self.slots[i];
            if id == NONE {
                return None;
            }
            if k == key {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
    }

    /// Stores `key → id` unless `key` is present; growing if needed. `id` must not be
    /// `u32::MAX`.
    pub fn insert_if_absent(&mut self, key: u64, id: u32) {
        debug_assert_ne!(id, NONE);
        self.reserve(1);
        let mask = self.slots.len() - 1;
        let mut i = key as usize & mask;
        loop {
            let (k, stored) = self.slots[i];
            if stored == NONE {
                self.slots[i] = (key, id);
                self.len += 1;
                return;
            }
            if k == key {
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// The entries sorted by key, in the table's own allocation (no copy); the table is
    /// left empty and holds no memory.
    pub fn drain_sorted(&mut self) -> Vec<(u64, u32)> {
        let mut entries = std::mem::take(&mut self.slots);
        entries.retain(|e| e.1 != NONE);
        entries.sort_unstable_by_key(|e| e.0);
        self.len = 0;
        entries
    }
}

/// Merges sorted, distinct `keys` against one sorted run of `(key, document)` records
/// with distinct keys, filling `hits[i]` (where still `u32::MAX`) with the run's document
/// for `keys[i]`. Runs must be merged oldest first, so a hit from an older run stands.
/// Stops reading once past the last key.
pub fn merge_lookup<E>(
    keys: &[u64],
    run: impl IntoIterator<Item = Result<(u64, u32), E>>,
    hits: &mut [u32],
) -> Result<(), E> {
    debug_assert_eq!(keys.len(), hits.len());
    let mut i = 0;
    for record in run {
        if i == keys.len() {
            break;
        }
        let (key, id) = record?;
        while i < keys.len() && keys[i] < key {
            i += 1;
        }
        if i < keys.len() && keys[i] == key {
            if hits[i] == NONE {
                hits[i] = id;
            }
            i += 1;
        }
    }
    Ok(())
}

/// [`merge_lookup`] over records held in memory (for tests and callers without files).
pub fn merge_lookup_slice(keys: &[u64], run: &[(u64, u32)], hits: &mut [u32]) {
    let result: Result<(), Infallible> = merge_lookup(keys, run.iter().map(|&r| Ok(r)), hits);
    result.unwrap_or_else(|e| match e {});
}

/// The private spill folder and its files; removed on drop.
#[derive(Debug)]
struct SpillFiles {
    dir: PathBuf,
    runs: Vec<PathBuf>,
    sig_path: PathBuf,
    sigs: Option<File>,
}

impl SpillFiles {
    /// Creates a fresh folder under `base` (and `base` itself if needed).
    fn create(base: &Path) -> Result<Self, DataError> {
        let bad = |source: std::io::Error| DataError::SpillDir {
            path: base.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(base).map_err(bad)?;
        let pid = std::process::id();
        for n in 0u32.. {
            let dir = base.join(format!(".tenax-near-dup-{pid}-{n}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(SpillFiles {
                        sig_path: dir.join("signatures.bin"),
                        dir,
                        runs: Vec::new(),
                        sigs: None,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(bad(e)),
            }
        }
        unreachable!("some folder name is free")
    }

    /// Writes `entries` (sorted) as the next run; returns the bytes written.
    fn write_run(&mut self, entries: &[(u64, u32)]) -> Result<u64, DataError> {
        let path = self.dir.join(format!("run-{:06}.bin", self.runs.len()));
        let io = |e| DataError::io("write near-dup spill run", &path, e);
        let file = File::create(&path).map_err(io)?;
        let mut out = BufWriter::with_capacity(IO_BUF_BYTES as usize, file);
        for &(key, id) in entries {
            out.write_all(&key.to_le_bytes()).map_err(io)?;
            out.write_all(&id.to_le_bytes()).map_err(io)?;
        }
        out.flush().map_err(io)?;
        self.runs.push(path);
        Ok(entries.len() as u64 * RUN_RECORD_BYTES)
    }

    /// Appends signature values to the signature file; returns the bytes written.
    fn append_sigs<'a>(
        &mut self,
        pages: impl Iterator<Item = &'a [u16]>,
    ) -> Result<u64, DataError> {
        let path = &self.sig_path;
        let io = |e| DataError::io("write near-dup spilled signatures", path, e);
        if self.sigs.is_none() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io)?;
            self.sigs = Some(file);
        }
        let mut file = self.sigs.as_ref().expect("opened above");
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let mut out = BufWriter::with_capacity(IO_BUF_BYTES as usize, file);
        let mut bytes = 0u64;
        for page in pages {
            for &v in page {
                out.write_all(&v.to_le_bytes()).map_err(io)?;
            }
            bytes += page.len() as u64 * 2;
        }
        out.flush().map_err(io)?;
        Ok(bytes)
    }

    /// Reads the stored signature of spilled document `doc` into `buf` (through `bytes`,
    /// twice its length); returns the bytes read.
    fn read_sig(&self, doc: u32, bytes: &mut [u8], buf: &mut [u16]) -> Result<u64, DataError> {
        let io = |e| DataError::io("read near-dup spilled signatures", &self.sig_path, e);
        let mut file = self
            .sigs
            .as_ref()
            .expect("a spilled document has a signature file");
        let len = bytes.len() as u64;
        file.seek(SeekFrom::Start(u64::from(doc) * len))
            .map_err(io)?;
        file.read_exact(bytes).map_err(io)?;
        for (v, b) in buf.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = u16::from_le_bytes([b[0], b[1]]);
        }
        Ok(len)
    }

    /// Merges `keys` against every run, oldest first; returns the bytes read.
    fn lookup(&self, keys: &[u64], hits: &mut [u32]) -> Result<u64, DataError> {
        let mut read = 0u64;
        for path in &self.runs {
            let io = |e| DataError::io("read near-dup spill run", path, e);
            let file = File::open(path).map_err(io)?;
            let mut reader = BufReader::with_capacity(IO_BUF_BYTES as usize, file);
            let records = std::iter::from_fn(|| {
                let mut rec = [0u8; RUN_RECORD_BYTES as usize];
                match reader.read_exact(&mut rec) {
                    Ok(()) => {
                        read += RUN_RECORD_BYTES;
                        let key = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
                        let id = u32::from_le_bytes(rec[8..].try_into().expect("4 bytes"));
                        Some(Ok((key, id)))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                    Err(e) => Some(Err(e)),
                }
            });
            merge_lookup(keys, records, hits).map_err(io)?;
        }
        Ok(read)
    }
}

impl Drop for SpillFiles {
    fn drop(&mut self) {
        self.sigs = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The near-dup LSH index under a memory bound (see the module docs).
#[derive(Debug)]
pub struct NearDupIndex {
    bands: usize,
    rows: usize,
    num_perm: usize,
    threshold: f64,
    max_docs: usize,
    bound: u64,
    /// Documents per signature page.
    page_docs: usize,
    /// Documents per lookup chunk.
    chunk_docs: usize,
    /// Band key → first document with it, for documents since the last spill.
    table: KeyTable,
    /// 16-bit signatures of the documents since the last spill, `page_docs` a page.
    pages: Vec<Vec<u16>>,
    /// Documents indexed, and how many of them are on disk.
    docs: u32,
    spilled_docs: u32,
    /// The current chunk's keys (sorted, distinct) and their matches on disk.
    chunk_keys: Vec<u64>,
    chunk_hits: Vec<u32>,
    /// A spilled signature read back, as bytes and as values.
    sig_bytes: Vec<u8>,
    sig_buf: Vec<u16>,
    files: SpillFiles,
    stats: NearDupStats,
}

impl NearDupIndex {
    /// An empty index for `config` under `memory`; creates its spill folder at once, so
    /// an unusable folder fails before any work.
    ///
    /// Errors: [`DataError::SpillDir`] when the folder cannot be created,
    /// [`DataError::BadConfig`] when the bound cannot hold one document.
    pub fn new(config: &DedupConfig, memory: &NearDupMemory) -> Result<Self, DataError> {
        let bound = memory.bound_bytes;
        let sig_bytes = 2 * config.num_perm as u64;
        let page_docs = (bound / 16 / sig_bytes.max(1)).clamp(1, 256) as usize;
        let chunk_docs =
            (bound / 4 / (config.bands as u64 * SCRATCH_KEY_BYTES).max(1)).max(1) as usize;
        let max_pages = (bound / (page_docs as u64 * sig_bytes).max(1)) as usize + 1;
        let mut index = NearDupIndex {
            bands: config.bands,
            rows: config.rows,
            num_perm: config.num_perm,
            threshold: config.near_threshold,
            max_docs: config.max_near_docs,
            bound,
            page_docs,
            chunk_docs,
            table: KeyTable::new(),
            pages: Vec::with_capacity(max_pages),
            docs: 0,
            spilled_docs: 0,
            chunk_keys: Vec::new(),
            chunk_hits: Vec::new(),
            sig_bytes: vec![0; 2 * config.num_perm],
            sig_buf: vec![0; config.num_perm],
            files: SpillFiles::create(&memory.spill_dir)?,
            stats: NearDupStats {
                bound_bytes: bound,
                ..NearDupStats::default()
            },
        };
        // The most one document can need right after a spill, with a full chunk.
        let chunk_scratch = index.chunk_docs as u64 * index.bands as u64 * SCRATCH_KEY_BYTES;
        let need = index.fixed_bytes()
            + chunk_scratch
            + KeyTable::slots_for(index.bands) as u64 * SLOT_BYTES
            + index.page_bytes();
        if need > bound {
            return Err(DataError::BadConfig {
                what: "the near-dup memory bound".into(),
                reason: format!(
                    "{bound} bytes cannot hold one document's index entries ({need} bytes \
                     needed with these [dedup] settings); raise --near-dup-memory-mib"
                ),
            });
        }
        index.observe(index.resident_bytes());
        Ok(index)
    }

    /// Decides each signature in order, as [`LshIndex::check_and_insert`] would one after
    /// another, indexing the unique ones.
    ///
    /// [`LshIndex::check_and_insert`]: super::minhash::LshIndex::check_and_insert
    pub fn decide(&mut self, sigs: &[&[u32]]) -> Result<Vec<NearDecision>, DataError> {
        let mut out = Vec::with_capacity(sigs.len());
        for chunk in sigs.chunks(self.chunk_docs) {
            self.begin_chunk(chunk)?;
            for sig in chunk {
                out.push(self.decide_one(sig)?);
            }
            self.chunk_keys = Vec::new();
            self.chunk_hits = Vec::new();
        }
        Ok(out)
    }

    /// Documents indexed.
    pub fn len(&self) -> usize {
        self.docs as usize
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.docs == 0
    }

    /// What it did with memory and disk so far.
    pub fn stats(&self) -> NearDupStats {
        self.stats.clone()
    }

    /// The private spill folder (removed when the index is dropped).
    pub fn spill_folder(&self) -> &Path {
        &self.files.dir
    }

    /// Bytes held now, from the allocations' capacities.
    pub fn resident_bytes(&self) -> u64 {
        self.fixed_bytes()
            + self.table.bytes()
            + self
                .pages
                .iter()
                .map(|p| p.capacity() as u64 * 2)
                .sum::<u64>()
            + self.chunk_keys.capacity() as u64 * 8
            + self.chunk_hits.capacity() as u64 * 4
    }

    /// Bytes held whatever the index holds: the page list, the I/O buffer, the signature
    /// buffers and one document's keys and checked list.
    fn fixed_bytes(&self) -> u64 {
        self.pages.capacity() as u64 * std::mem::size_of::<Vec<u16>>() as u64
            + IO_BUF_BYTES
            + self.sig_bytes.capacity() as u64
            + self.sig_buf.capacity() as u64 * 2
            + self.bands as u64 * (8 + 4)
    }

    fn page_bytes(&self) -> u64 {
        (self.page_docs * self.num_perm) as u64 * 2
    }

    fn observe(&mut self, bytes: u64) {
        self.stats.peak_bytes = self.stats.peak_bytes.max(bytes);
    }

    /// Collects the chunk's keys and their matches in the runs.
    fn begin_chunk(&mut self, chunk: &[&[u32]]) -> Result<(), DataError> {
        let n = chunk.len() * self.bands;
        if self.resident_bytes() + n as u64 * SCRATCH_KEY_BYTES > self.bound {
            self.spill()?;
        }
        let mut keys = Vec::with_capacity(n);
        for sig in chunk {
            keys.extend(band_keys(sig, self.bands, self.rows));
        }
        keys.sort_unstable();
        keys.dedup();
        self.chunk_hits = vec![NONE; keys.len()];
        self.chunk_keys = keys;
        self.observe(self.resident_bytes());
        let read = self.files.lookup(&self.chunk_keys, &mut self.chunk_hits)?;
        self.stats.spill_read_bytes += read;
        Ok(())
    }

    /// The spilled document for `key`, if any (the key is one of the chunk's).
    fn spilled_hit(&self, key: u64) -> Option<u32> {
        let i = self.chunk_keys.binary_search(&key).ok()?;
        Some(self.chunk_hits[i]).filter(|&id| id != NONE)
    }

    fn decide_one(&mut self, sig: &[u32]) -> Result<NearDecision, DataError> {
        debug_assert_eq!(sig.len(), self.num_perm);
        let keys = band_keys(sig, self.bands, self.rows);
        let mut checked: Vec<u32> = Vec::with_capacity(self.bands);
        for &key in &keys {
            let Some(doc) = self.spilled_hit(key).or_else(|| self.table.get(key)) else {
                continue;
            };
            if checked.contains(&doc) {
                continue;
            }
            checked.push(doc);
            let similarity = self.estimate(doc, sig)?;
            if similarity >= self.threshold {
                return Ok(NearDecision::Duplicate {
                    of: doc,
                    similarity,
                });
            }
        }
        if self.docs as usize >= self.max_docs || self.docs == NONE {
            return Ok(NearDecision::UniqueNotIndexed);
        }
        if self.insert_peak() > self.bound {
            self.spill()?;
        }
        let grow_peak = self.table.reserve(self.bands);
        let others = self.resident_bytes() - self.table.bytes();
        self.observe(others + grow_peak);
        let id = self.docs;
        self.docs += 1;
        let slot = (id - self.spilled_docs) as usize;
        if slot.is_multiple_of(self.page_docs) {
            self.pages
                .push(Vec::with_capacity(self.page_docs * self.num_perm));
        }
        let page = self.pages.last_mut().expect("a page was pushed");
        page.extend(sig.iter().map(|&v| v as u16));
        for &key in &keys {
            if self.spilled_hit(key).is_none() {
                self.table.insert_if_absent(key, id);
            }
        }
        self.observe(self.resident_bytes());
        Ok(NearDecision::Unique)
    }

    /// Bytes held at the peak of indexing one more document now (the table may double
    /// and a signature page may be added).
    fn insert_peak(&self) -> u64 {
        let (table_peak, _) = self.table.reserve_cost(self.bands);
        let slot = (self.docs - self.spilled_docs) as usize;
        let new_page = if slot.is_multiple_of(self.page_docs) {
            self.page_bytes()
        } else {
            0
        };
        self.resident_bytes() - self.table.bytes() + table_peak + new_page
    }

    /// Estimated similarity of indexed document `doc` and `sig`.
    fn estimate(&mut self, doc: u32, sig: &[u32]) -> Result<f64, DataError> {
        if doc >= self.spilled_docs {
            let slot = (doc - self.spilled_docs) as usize;
            let page = &self.pages[slot / self.page_docs];
            let at = (slot % self.page_docs) * self.num_perm;
            return Ok(estimate_b16(&page[at..at + self.num_perm], sig));
        }
        let read = self
            .files
            .read_sig(doc, &mut self.sig_bytes, &mut self.sig_buf)?;
        self.stats.spill_read_bytes += read;
        Ok(estimate_b16(&self.sig_buf, sig))
    }

    /// Writes the resident part to disk and frees it. The chunk's keys that only the
    /// resident table had take their matches along into the scratch first.
    fn spill(&mut self) -> Result<(), DataError> {
        if self.docs == self.spilled_docs {
            return Ok(());
        }
        for (key, hit) in self.chunk_keys.iter().zip(self.chunk_hits.iter_mut()) {
            if *hit == NONE {
                if let Some(id) = self.table.get(*key) {
                    *hit = id;
                }
            }
        }
        let entries = self.table.drain_sorted();
        let mut written = self.files.write_run(&entries)?;
        drop(entries);
        written += self
            .files
            .append_sigs(self.pages.iter().map(|p| p.as_slice()))?;
        self.pages.clear();
        self.spilled_docs = self.docs;
        self.stats.spills += 1;
        self.stats.spilled_bytes += written;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_table_stores_the_first_id_and_drains_sorted() {
        let mut t = KeyTable::new();
        assert_eq!(t.bytes(), 0);
        assert_eq!(t.get(7), None);
        for k in 0..100u64 {
            t.insert_if_absent(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k as u32);
        }
        t.insert_if_absent(0, 999);
        assert_eq!(t.len(), 100);
        assert_eq!(t.get(0), Some(0));
        assert_eq!(t.get(5u64.wrapping_mul(0x9e37_79b9_7f4a_7c15)), Some(5));
        assert_eq!(t.bytes(), KeyTable::slots_for(100) as u64 * SLOT_BYTES);
        let sorted = t.drain_sorted();
        assert_eq!(sorted.len(), 100);
        assert!(sorted.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(t.is_empty() && t.bytes() == 0 && t.get(0).is_none());
    }

    #[test]
    fn slots_for_keeps_load_at_most_three_quarters() {
        for (len, slots) in [(0, 16), (12, 16), (13, 32), (24, 32), (25, 64), (96, 128)] {
            assert_eq!(KeyTable::slots_for(len), slots, "len {len}");
        }
    }

    /// (keys, run, hits before, hits after) for merge_lookup.
    #[allow(clippy::type_complexity)]
    const MERGE_CASES: &[(&[u64], &[(u64, u32)], &[u32], &[u32])] = &[
        (&[], &[(1, 1)], &[], &[]),
        (&[1, 2, 3], &[], &[NONE; 3], &[NONE; 3]),
        (
            &[2, 4, 6],
            &[(1, 10), (2, 11), (6, 12)],
            &[NONE; 3],
            &[11, NONE, 12],
        ),
        // An older run's hit stands.
        (&[2, 4], &[(2, 20), (4, 21)], &[5, NONE], &[5, 21]),
        // Keys past the run's end, and run records past the last key.
        (&[1, 9], &[(1, 3), (2, 4), (3, 5)], &[NONE; 2], &[3, NONE]),
        (
            &[0, u64::MAX],
            &[(0, 1), (u64::MAX, 2)],
            &[NONE; 2],
            &[1, 2],
        ),
    ];

    #[test]
    fn merge_lookup_table() {
        for (i, &(keys, run, before, after)) in MERGE_CASES.iter().enumerate() {
            let mut hits = before.to_vec();
            merge_lookup_slice(keys, run, &mut hits);
            assert_eq!(hits, after, "case {i}");
        }
    }

    /// A generated corpus in input order: originals, exact copies, near copies (1–3
    /// words substituted, inserted or deleted), prefixes of originals with new words
    /// (similar but mostly below the threshold), shuffled after the first quarter.
    fn corpus(seed: u64, docs: usize) -> Vec<String> {
        let mut rng = tenax_core::rng::SplitMix64::new(seed);
        let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
        let vocab: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let mut out: Vec<Vec<String>> = Vec::new();
        for _ in 0..docs {
            let kind = if out.is_empty() { 0 } else { pick(4) };
            let words: Vec<String> = match kind {
                1 => out[pick(out.len())].clone(),
                2 => {
                    let mut w = out[pick(out.len())].clone();
                    for _ in 0..1 + pick(3) {
                        let at = pick(w.len());
                        match pick(3) {
                            0 => w[at] = vocab[pick(vocab.len())].clone(),
                            1 => w.insert(at, vocab[pick(vocab.len())].clone()),
                            _ if w.len() > 2 => {
                                w.remove(at);
                            }
                            _ => {}
                        }
                    }
                    w
                }
                3 => {
                    let base = &out[pick(out.len())];
                    let keep = base.len() * (5 + pick(4)) / 10;
                    let mut w = base[..keep].to_vec();
                    w.extend((keep..base.len()).map(|_| vocab[pick(vocab.len())].clone()));
                    w
                }
                _ => (0..20 + pick(60))
                    .map(|_| vocab[pick(vocab.len())].clone())
                    .collect(),
            };
            out.push(words);
        }
        out.into_iter().map(|w| w.join(" ")).collect()
    }

    /// The in-memory reference: `LshIndex::check_and_insert` one document after another.
    fn reference(config: &DedupConfig, sigs: &[Vec<u32>]) -> Vec<NearDecision> {
        let mut index = crate::prepare::minhash::LshIndex::new(config);
        sigs.iter().map(|s| index.check_and_insert(s)).collect()
    }

    /// Runs `sigs` through a bounded index in batches of `batch` documents; checks the
    /// bound after every batch and returns the decisions and the stats.
    fn bounded(
        config: &DedupConfig,
        sigs: &[Vec<u32>],
        bound_bytes: u64,
        batch: usize,
    ) -> (Vec<NearDecision>, NearDupStats) {
        let dir = tempfile::tempdir().unwrap();
        let memory = NearDupMemory {
            bound_bytes,
            spill_dir: dir.path().to_path_buf(),
        };
        let mut index = NearDupIndex::new(config, &memory).unwrap();
        let folder = index.spill_folder().to_path_buf();
        let mut out = Vec::new();
        for chunk in sigs.chunks(batch) {
            let refs: Vec<&[u32]> = chunk.iter().map(|s| s.as_slice()).collect();
            out.extend(index.decide(&refs).unwrap());
            assert!(index.resident_bytes() <= bound_bytes);
            assert!(
                index.stats().peak_bytes <= bound_bytes,
                "{:?}",
                index.stats()
            );
        }
        let stats = index.stats();
        assert!(folder.exists());
        drop(index);
        assert!(!folder.exists(), "the spill folder outlives the index");
        (out, stats)
    }

    fn configs() -> Vec<DedupConfig> {
        let small = DedupConfig {
            num_perm: 32,
            bands: 8,
            rows: 4,
            near_threshold: 0.6,
            ..DedupConfig::default()
        };
        vec![
            DedupConfig::default(),
            small.clone(),
            DedupConfig {
                max_near_docs: 40,
                ..small
            },
        ]
    }

    #[test]
    fn a_tiny_bound_spills_often_and_decides_as_in_memory() {
        for (c, config) in configs().iter().enumerate() {
            let hasher = crate::prepare::minhash::MinHasher::new(config);
            let sigs: Vec<Vec<u32>> = corpus(0x5eed + c as u64, 400)
                .iter()
                .map(|t| hasher.signature(t).unwrap())
                .collect();
            let want = reference(config, &sigs);
            let dups = want
                .iter()
                .filter(|d| matches!(d, NearDecision::Duplicate { .. }))
                .count();
            assert!(
                dups > 50,
                "config {c}: only {dups} planted duplicates found"
            );
            let from_disk = want
                .iter()
                .filter(|d| matches!(d, NearDecision::Duplicate { of, .. } if *of < 40))
                .count();
            assert!(
                from_disk > 10,
                "config {c}: {from_disk} matches of early documents"
            );
            for (bound, batch) in [
                (16 << 10, 7),
                (24 << 10, 50),
                (64 << 10, 400),
                (1 << 30, 33),
            ] {
                let (got, stats) = bounded(config, &sigs, bound, batch);
                assert_eq!(got, want, "config {c}, bound {bound}, batch {batch}");
                if bound <= 24 << 10 {
                    let least = if config.max_near_docs >= sigs.len() {
                        5
                    } else {
                        1
                    };
                    assert!(
                        stats.spills >= least,
                        "config {c}, bound {bound}: {stats:?}"
                    );
                    assert!(stats.spill_read_bytes > 0 && stats.spilled_bytes > 0);
                }
                if bound == 1 << 30 {
                    assert_eq!(stats.spills, 0, "{stats:?}");
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        /// The kept set (and every decision) does not depend on the bound or the batch
        /// sizes, and the accounted memory never passes the bound.
        #[test]
        fn bounded_equals_in_memory(
            seed in proptest::prelude::any::<u64>(),
            docs in 1usize..250,
            bound_kib in 16u64..96,
            batch in 1usize..80,
            which in 0usize..3,
        ) {
            let config = &configs()[which];
            let hasher = crate::prepare::minhash::MinHasher::new(config);
            let sigs: Vec<Vec<u32>> = corpus(seed, docs)
                .iter()
                .map(|t| hasher.signature(t).unwrap())
                .collect();
            let (got, _) = bounded(config, &sigs, bound_kib << 10, batch);
            proptest::prop_assert_eq!(got, reference(config, &sigs));
        }
    }

    #[test]
    fn a_lost_spill_file_is_an_error_naming_it_and_the_folder_still_goes() {
        let config = DedupConfig::default();
        let hasher = crate::prepare::minhash::MinHasher::new(&config);
        let sigs: Vec<Vec<u32>> = corpus(7, 200)
            .iter()
            .map(|t| hasher.signature(t).unwrap())
            .collect();
        let refs: Vec<&[u32]> = sigs.iter().map(|s| s.as_slice()).collect();
        let dir = tempfile::tempdir().unwrap();
        let memory = NearDupMemory {
            bound_bytes: 16 << 10,
            spill_dir: dir.path().to_path_buf(),
        };
        let mut index = NearDupIndex::new(&config, &memory).unwrap();
        index.decide(&refs[..100]).unwrap();
        assert!(index.stats().spills > 0);
        let folder = index.spill_folder().to_path_buf();
        let run = folder.join("run-000000.bin");
        std::fs::remove_file(&run).unwrap();
        let err = index.decide(&refs[100..]).unwrap_err().to_string();
        assert!(err.contains("run-000000.bin"), "{err}");
        drop(index);
        assert!(!folder.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_unusable_spill_folder_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = NearDupIndex::new(
            &DedupConfig::default(),
            &NearDupMemory {
                bound_bytes: 1 << 20,
                spill_dir: file.join("below"),
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("a-file") && msg.contains("--spill-dir"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn a_bound_too_small_for_one_document_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = NearDupIndex::new(
            &DedupConfig::default(),
            &NearDupMemory {
                bound_bytes: 4 << 10,
                spill_dir: dir.path().to_path_buf(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("near-dup-memory-mib"), "{err}");
    }
}

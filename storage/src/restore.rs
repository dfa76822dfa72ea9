//! Assembling whole tensors from a checkpoint's verified shard files (the last step of a
//! restore), and, for a store on local disk, reading the files straight into the tensors.
//!
//! Both follow [`tenax_core::ckpt::load_plan`] for one rank: each read fills disjoint rows of
//! one tensor, cut here into pieces of about an equal share converted on every core.
//! [`assemble_tensors`] converts from file bytes already in memory (downloaded and hashed);
//! [`load_direct`] reads each piece from its file into its place in the tensor with one
//! `pread` (no intermediate buffer, no conversion pass) and then hashes the tensors' memory
//! in file order, so what is returned is exactly what was hashed. [`load_streamed`] does
//! the same from a remote store: one streamed GET per file, each chunk copied to its place
//! in the tensors as it arrives ([`Placer`]) and hashed on a blocking thread meanwhile.
//! Both take only the common case (little-endian host, files whose every data byte the
//! plan reads) and say `Ok(None)` for anything else; any error in them sends the caller to
//! the buffered path, which names the problem the way a verify does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use tenax_core::ckpt::{load_plan, replicated_needs, row_elems, Read};

use crate::manifest::{HashAlg, Manifest};
use crate::shard::{read_rows_into, TensorData};

/// A read's rows to convert: (the read, its first source row, values per row, target).
type Piece<'a> = (&'a Read, usize, usize, &'a mut [f32]);

/// Zeroed whole tensors for every tensor the manifest names (shape from its slices).
fn empty_tensors(manifest: &Manifest) -> BTreeMap<String, TensorData> {
    manifest
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            (
                name.clone(),
                TensorData {
                    name,
                    shape,
                    data: vec![0.0; n],
                },
            )
        })
        .collect()
}

/// The zeroed tensors a direct read fills, or `None` when there is none to take: a
/// big-endian host (file bytes are little-endian) or a checkpoint without tensors.
fn direct_tensors(manifest: &Manifest) -> Option<BTreeMap<String, TensorData>> {
    let out = empty_tensors(manifest);
    (cfg!(target_endian = "little") && !out.is_empty()).then_some(out)
}

/// How many threads convert or read pieces.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

/// The reads of the load plan for one rank, cut into pieces of rows of about an equal share
/// of `out`, and dealt biggest first to the least loaded of `threads` groups (empty groups
/// left out). A read of a file the manifest does not list is an error.
fn plan_pieces<'a>(
    manifest: &Manifest,
    reads: &'a [Read],
    out: &'a mut BTreeMap<String, TensorData>,
    threads: usize,
) -> Result<Vec<Vec<Piece<'a>>>, String> {
    let known: BTreeSet<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    let mut reads_of: BTreeMap<&str, Vec<&Read>> = BTreeMap::new();
    for read in reads {
        if !known.contains(read.file.as_str()) {
            return Err(format!("{} is not among the files read", read.file));
        }
        reads_of.entry(read.tensor.as_str()).or_default().push(read);
    }
    let total: usize = out.values().map(|t| t.data.len()).sum();
    let share = (total / threads.max(1)).max(1 << 16);
    let mut pieces: Vec<Piece<'a>> = Vec::new();
    for dst in out.values_mut() {
        let per_row = row_elems(&dst.shape);
        let mut reads: Vec<&Read> = reads_of
            .get(dst.name.as_str())
            .into_iter()
            .flatten()
            .copied()
            .collect();
        reads.sort_by_key(|r| r.dst_rows.start);
        let (mut rest, mut at): (&mut [f32], usize) = (&mut dst.data, 0);
        for read in reads {
            let (from, to) = (read.dst_rows.start * per_row, read.dst_rows.end * per_row);
            if from < at || to > at + rest.len() {
                return Err(format!(
                    "{}: rows of {} overlap or overrun",
                    read.file, read.tensor
                ));
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(from - at);
            let (mut target, tail) = tail.split_at_mut(to - from);
            (rest, at) = (tail, to);
            let rows_per_piece = (share / per_row.max(1)).max(1);
            let mut row = read.src_rows.start;
            while !target.is_empty() {
                let n = (rows_per_piece * per_row).min(target.len());
                let (piece, tail) = std::mem::take(&mut target).split_at_mut(n);
                pieces.push((read, row, per_row, piece));
                row += rows_per_piece;
                target = tail;
            }
        }
    }
    pieces.sort_by_key(|p| std::cmp::Reverse(p.3.len()));
    let mut groups: Vec<(usize, Vec<Piece<'a>>)> =
        (0..threads.max(1)).map(|_| (0, Vec::new())).collect();
    for p in pieces {
        let g = groups
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least one group");
        g.0 += p.3.len();
        g.1.push(p);
    }
    Ok(groups
        .into_iter()
        .filter(|(load, _)| *load > 0)
        .map(|(_, group)| group)
        .collect())
}

/// Run `work` on every piece, one scoped thread per group; the first error wins.
fn on_every_core<'a>(
    groups: &mut [Vec<Piece<'a>>],
    work: impl Fn(&Read, usize, usize, &mut [f32]) -> Result<(), String> + Sync,
) -> Result<(), String> {
    let work = &work;
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter_mut()
            .map(|group| {
                scope.spawn(move || {
                    for (read, first_row, per_row, target) in group.iter_mut() {
                        work(read, *first_row, *per_row, target)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("assembly panicked".into())))
            .collect()
    });
    results.into_iter().collect()
}

/// The load plan's reads for one rank that wants every tensor whole.
fn whole_tensor_reads(manifest: &Manifest) -> Result<Vec<Read>, String> {
    let saved = manifest.saved_slices();
    let mut plan = load_plan(&saved, &replicated_needs(&saved, 1)).map_err(|e| e.to_string())?;
    if plan.ranks.is_empty() {
        return Err("the load plan is empty".into());
    }
    Ok(plan.ranks.swap_remove(0).reads)
}

/// Whole tensors from verified shard files, following the load plan for one rank: each value
/// is converted once, straight from the file bytes into its place, on every core.
pub(crate) fn assemble_tensors(
    manifest: &Manifest,
    files: &[(String, Bytes)],
) -> Result<Vec<TensorData>, String> {
    let mut out = empty_tensors(manifest);
    if out.is_empty() {
        return Ok(Vec::new());
    }
    let reads = whole_tensor_reads(manifest)?;
    let parsed: BTreeMap<&str, SafeTensors<'_>> = files
        .iter()
        .map(|(name, bytes)| {
            SafeTensors::deserialize(bytes)
                .map(|st| (name.as_str(), st))
                .map_err(|e| format!("{name}: not a readable safetensors file ({e})"))
        })
        .collect::<Result<_, String>>()?;
    let mut groups = plan_pieces(manifest, &reads, &mut out, threads())?;
    on_every_core(&mut groups, |read, first_row, per_row, target| {
        let st = parsed
            .get(read.file.as_str())
            .ok_or_else(|| format!("{} is not among the files read", read.file))?;
        read_rows_into(st, &read.tensor, first_row, per_row, target)
            .map_err(|e| format!("{}: {e}", read.file))
    })?;
    drop(groups);
    Ok(out.into_values().collect())
}

/// The largest safetensors header read (the crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One shard file opened for a direct read, its header parsed and checked.
struct OpenFile {
    /// Open for positioned reads.
    file: std::fs::File,
    /// The first `8 + n` bytes: length and JSON header (hashed first).
    header: Vec<u8>,
    /// The parsed header.
    meta: Metadata,
    /// The hash the manifest gives.
    hash: (HashAlg, String),
    /// The file's size.
    size: u64,
}

/// Open one shard file, check its size, read and parse its header and check it against the
/// manifest's slices of that file (present, F32, the stored shape, nothing else).
fn open_file(manifest: &Manifest, name: &str, path: &std::path::Path) -> Result<OpenFile, String> {
    use std::os::unix::fs::FileExt;
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| format!("{name} is not in MANIFEST.json"))?;
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    if size != entry.size || size < 8 {
        return Err(format!(
            "{name}: size {size}, MANIFEST.json says {}",
            entry.size
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| format!("{name}: {e}"))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > size - 8 {
        return Err(format!("{name}: header of {n} bytes"));
    }
    let mut header = vec![0u8; 8 + n as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| format!("{name}: {e}"))?;
    check_header(manifest, name, header, size).map(|(header, meta, hash)| OpenFile {
        file,
        header,
        meta,
        hash,
        size,
    })
}

/// A checked header: its bytes, their parse, and the hash the manifest gives the file.
type CheckedHeader = (Vec<u8>, Metadata, (HashAlg, String));

/// A file's header (its first `8 + n` bytes, `n` from the first 8) parsed and checked
/// against the manifest's slices of that file: present, F32, the stored shape, nothing
/// else, and describing exactly `size` bytes. Returns the header, its parse and the hash
/// the manifest gives the file.
fn check_header(
    manifest: &Manifest,
    name: &str,
    header: Vec<u8>,
    size: u64,
) -> Result<CheckedHeader, String> {
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| format!("{name} is not in MANIFEST.json"))?;
    let n = header.len() as u64 - 8;
    // Deserializing checks the offsets: contiguous from 0, each the size its shape says.
    let meta: Metadata =
        serde_json::from_slice(&header[8..]).map_err(|e| format!("{name}: header: {e}"))?;
    if 8 + n + meta.data_len() as u64 != size {
        return Err(format!(
            "{name}: the header does not describe the whole file"
        ));
    }
    let expected: Vec<_> = manifest.tensors_in(name).collect();
    let names: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    if names.len() != expected.len() || meta.tensors().len() != expected.len() {
        return Err(format!("{name}: other tensors than MANIFEST.json lists"));
    }
    for t in &expected {
        let info = meta
            .info(&t.name)
            .ok_or_else(|| format!("{name}: {} missing", t.name))?;
        if info.dtype != Dtype::F32 || info.shape != t.stored_shape() {
            return Err(format!("{name}: {} is not F32 of its shape", t.name));
        }
    }
    let (alg, hash) = entry.hash();
    Ok((header, meta, (alg, hash.to_string())))
}

/// The bytes of `f32` values as they are in memory (little-endian on this host).
fn bytes_of(values: &[f32]) -> &[u8] {
    // SAFETY: an `f32` is 4 bytes without padding; a `u8` view of the same memory, of
    // exactly its length, borrowed for as long as `values`, is valid.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// [`bytes_of`], writable.
fn bytes_of_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and every bit pattern is a valid `f32`, so any bytes
    // written through the view leave valid values.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values),
        )
    }
}

/// For one file: the pieces' byte ranges `(offset, index)` sorted by offset must tile the
/// data section `[data_start, size)` exactly (zero-length pieces aside). Pure.
fn tiles(data_start: u64, size: u64, mut ranges: Vec<(u64, u64, usize)>) -> Option<Vec<usize>> {
    ranges.retain(|&(_, len, _)| len > 0);
    ranges.sort_unstable();
    let mut at = data_start;
    for &(offset, len, _) in &ranges {
        if offset != at {
            return None;
        }
        at = offset.checked_add(len)?;
    }
    (at == size).then(|| ranges.into_iter().map(|(_, _, i)| i).collect())
}

/// Restore from files on local disk straight into tensor memory (see the module doc).
/// `path_of(file)` is where a manifest file lies. `Ok(None)`: this host or checkpoint is not
/// the case this path takes (the caller reads the buffered way). `Err`: something did not
/// check out (the caller reads the buffered way, which says what).
pub(crate) fn load_direct(
    manifest: &Manifest,
    path_of: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<Option<Vec<TensorData>>, String> {
    let Some(mut out) = direct_tensors(manifest) else {
        return Ok(None);
    };
    let mut files: BTreeMap<&str, OpenFile> = BTreeMap::new();
    for entry in &manifest.files {
        let Some(path) = path_of(&entry.name) else {
            return Ok(None);
        };
        files.insert(&entry.name, open_file(manifest, &entry.name, &path)?);
    }
    let reads = whole_tensor_reads(manifest)?;
    let mut groups = plan_pieces(manifest, &reads, &mut out, threads())?;
    // Where each piece's bytes are in its file (checked to lie inside its tensor).
    let file_of = |read: &Read| {
        files
            .get(read.file.as_str())
            .ok_or_else(|| format!("{} is not among the files read", read.file))
    };
    let offset_of = |read: &Read, first_row: usize, per_row: usize, len: usize| {
        let f = file_of(read)?;
        let info = f
            .meta
            .info(&read.tensor)
            .ok_or_else(|| format!("{}: {} missing", read.file, read.tensor))?;
        let data_start = f.header.len() as u64;
        let start = info.data_offsets.0 as u64 + (first_row * per_row * 4) as u64;
        let end = start + (len * 4) as u64;
        if end > info.data_offsets.1 as u64 {
            return Err(format!("{}: {} has fewer rows", read.file, read.tensor));
        }
        Ok(data_start + start)
    };
    on_every_core(&mut groups, |read, first_row, per_row, target| {
        use std::os::unix::fs::FileExt;
        let at = offset_of(read, first_row, per_row, target.len())?;
        file_of(read)?
            .file
            .read_exact_at(bytes_of_mut(target), at)
            .map_err(|e| format!("{}: {e}", read.file))
    })?;
    // Hash every file in order: its header, then its data as it now lies in the tensors.
    let pieces: Vec<(&Read, usize, usize, &[f32])> = groups
        .iter()
        .flatten()
        .map(|(read, first_row, per_row, target)| (*read, *first_row, *per_row, &**target))
        .collect();
    let mut order: BTreeMap<&str, Vec<(u64, u64, usize)>> = BTreeMap::new();
    for (i, (read, first_row, per_row, target)) in pieces.iter().enumerate() {
        let at = offset_of(read, *first_row, *per_row, target.len())?;
        order.entry(read.file.as_str()).or_default().push((
            at,
            std::mem::size_of_val(*target) as u64,
            i,
        ));
    }
    let mut to_hash: Vec<(&str, &OpenFile, Vec<&[f32]>)> = Vec::with_capacity(files.len());
    for (name, f) in &files {
        let ranges = order.remove(name).unwrap_or_default();
        // A file some of whose bytes the plan does not read (a slice saved twice): hashing
        // it would need another read; the buffered path does that.
        let Some(in_order) = tiles(f.header.len() as u64, f.size, ranges) else {
            return Ok(None);
        };
        to_hash.push((name, f, in_order.into_iter().map(|i| pieces[i].3).collect()));
    }
    // Files hashed side by side (SHA-256 is one thread per file; BLAKE3 also splits each
    // large piece over every core).
    for batch in to_hash.chunks(threads()) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(name, f, parts)| {
                    scope.spawn(move || {
                        let mut hasher = f.hash.0.hasher();
                        hasher.update(&f.header);
                        for part in parts {
                            hasher.update(bytes_of(part));
                        }
                        let got = hasher.finalize_hex();
                        if got.eq_ignore_ascii_case(&f.hash.1) {
                            Ok(())
                        } else {
                            Err(format!("{name}: {} mismatch", f.hash.0.name()))
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|_| Err("hashing panicked".into())))
        })?;
    }
    drop(to_hash);
    drop(pieces);
    drop(groups);
    Ok(Some(out.into_values().collect()))
}

/// Restore from a remote store (S3) straight into tensor memory: one streamed GET per file,
/// as the buffered path does, but each chunk is copied to where its bytes belong in the
/// tensors as it arrives (no file buffer, no conversion pass) and hashed on a blocking
/// thread meanwhile; at most `concurrency` files at once. `Ok(None)`/`Err` as for
/// [`load_direct`]: the caller then reads the buffered way.
pub(crate) async fn load_streamed(
    store: &crate::Store,
    folder: &str,
    manifest: &Manifest,
    concurrency: usize,
) -> Result<Option<Vec<TensorData>>, String> {
    let Some(mut out) = direct_tensors(manifest) else {
        return Ok(None);
    };
    let reads = whole_tensor_reads(manifest)?;
    let groups = plan_pieces(manifest, &reads, &mut out, 1)?;
    let mut by_file: BTreeMap<&str, Vec<Piece<'_>>> = BTreeMap::new();
    for piece in groups.into_iter().flatten() {
        by_file
            .entry(piece.0.file.as_str())
            .or_default()
            .push(piece);
    }
    let mut jobs = Vec::with_capacity(manifest.files.len());
    for entry in &manifest.files {
        let pieces = by_file.remove(entry.name.as_str()).unwrap_or_default();
        jobs.push(stream_file(store, folder, manifest, entry, pieces));
    }
    if !by_file.is_empty() {
        return Err("the load plan reads files the manifest does not list".into());
    }
    futures::stream::iter(jobs)
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Some(out.into_values().collect()))
}

/// [`load_streamed`] for one file and the pieces read from it.
async fn stream_file(
    store: &crate::Store,
    folder: &str,
    manifest: &Manifest,
    entry: &crate::manifest::FileEntry,
    pieces: Vec<Piece<'_>>,
) -> Result<(), String> {
    use object_store::ObjectStoreExt;
    let name = entry.name.as_str();
    let path = store.path(&format!("{folder}/{name}"));
    let got = store
        .inner()
        .get(&path)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    if got.meta.size != entry.size {
        return Err(format!(
            "{name}: size {}, MANIFEST.json says {}",
            got.meta.size, entry.size
        ));
    }
    let alg = entry.hash().0;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = alg.hasher();
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
        }
        hasher.finalize_hex()
    });
    let mut placer = Placer::new(manifest, entry, pieces);
    let mut stream = got.into_stream();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| format!("{name}: {e}"))?
    {
        tx.send(chunk.clone())
            .await
            .map_err(|_| format!("{name}: hashing stopped"))?;
        placer.feed(&chunk)?;
    }
    drop(tx);
    let want = placer.finish()?;
    let got = hasher
        .await
        .map_err(|e| format!("{name}: hashing panicked: {e}"))?;
    if !got.eq_ignore_ascii_case(&want) {
        return Err(format!("{name}: {} mismatch", alg.name()));
    }
    Ok(())
}

/// Places one file's bytes, fed in chunks of any size in file order, into the tensors:
/// first the header (its length, then that much JSON), checked against the manifest, then
/// every data byte into the piece it belongs to (the pieces must tile the data section).
struct Placer<'m, 'a> {
    manifest: &'m Manifest,
    name: &'m str,
    size: u64,
    /// The pieces, until the header is in.
    pieces: Option<Vec<Piece<'a>>>,
    header: Vec<u8>,
    /// The hash the manifest gives the file.
    want_hash: String,
    /// Once the header is in: each piece's bytes, in file order (none empty).
    targets: Vec<&'a mut [u8]>,
    /// The piece being filled, and how far.
    next: usize,
    filled: usize,
    /// Bytes fed so far.
    pos: u64,
}

impl<'m, 'a> Placer<'m, 'a> {
    fn new(
        manifest: &'m Manifest,
        entry: &'m crate::manifest::FileEntry,
        pieces: Vec<Piece<'a>>,
    ) -> Self {
        Placer {
            manifest,
            name: &entry.name,
            size: entry.size,
            pieces: Some(pieces),
            header: Vec::new(),
            want_hash: String::new(),
            targets: Vec::new(),
            next: 0,
            filled: 0,
            pos: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        let name = self.name;
        self.pos += chunk.len() as u64;
        if self.pos > self.size || self.size < 8 {
            return Err(format!("{name}: longer than MANIFEST.json says"));
        }
        let mut body = chunk;
        if self.pieces.is_some() {
            if self.header.len() < 8 {
                let take = (8 - self.header.len()).min(body.len());
                self.header.extend_from_slice(&body[..take]);
                body = &body[take..];
            }
            if self.header.len() >= 8 {
                let n = u64::from_le_bytes(self.header[..8].try_into().expect("8 bytes"));
                if n > MAX_HEADER_BYTES || n > self.size - 8 {
                    return Err(format!("{name}: header of {n} bytes"));
                }
                let need = 8 + n as usize;
                let take = (need - self.header.len()).min(body.len());
                self.header.extend_from_slice(&body[..take]);
                body = &body[take..];
                if self.header.len() == need {
                    self.place_pieces()?;
                }
            }
        }
        while !body.is_empty() {
            let Some(target) = self.targets.get_mut(self.next) else {
                return Err(format!("{name}: bytes past the last tensor"));
            };
            let n = (target.len() - self.filled).min(body.len());
            target[self.filled..self.filled + n].copy_from_slice(&body[..n]);
            body = &body[n..];
            self.filled += n;
            if self.filled == target.len() {
                (self.next, self.filled) = (self.next + 1, 0);
            }
        }
        Ok(())
    }

    /// The header is in: check it and lay the pieces out in file order.
    fn place_pieces(&mut self) -> Result<(), String> {
        let name = self.name;
        let header = std::mem::take(&mut self.header);
        let (header, meta, hash) = check_header(self.manifest, name, header, self.size)?;
        self.want_hash = hash.1;
        let data_start = header.len() as u64;
        let mut ranges = Vec::new();
        let mut placed = Vec::new();
        for (read, first_row, per_row, target) in self.pieces.take().unwrap_or_default() {
            let info = meta
                .info(&read.tensor)
                .ok_or_else(|| format!("{name}: {} missing", read.tensor))?;
            let start = info.data_offsets.0 as u64 + (first_row * per_row * 4) as u64;
            let bytes = bytes_of_mut(target);
            if start + bytes.len() as u64 > info.data_offsets.1 as u64 {
                return Err(format!("{name}: {} has fewer rows", read.tensor));
            }
            ranges.push((data_start + start, bytes.len() as u64, placed.len()));
            placed.push(Some(bytes));
        }
        let order = tiles(data_start, self.size, ranges)
            .ok_or_else(|| format!("{name}: the plan does not read every byte"))?;
        self.targets = order
            .into_iter()
            .filter_map(|i| placed.get_mut(i).and_then(Option::take))
            .collect();
        Ok(())
    }

    /// Every byte fed and placed: the hash the manifest gives the file.
    fn finish(self) -> Result<String, String> {
        if self.pieces.is_some() || self.pos != self.size || self.next != self.targets.len() {
            return Err(format!("{}: ended early", self.name));
        }
        Ok(self.want_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_must_tile_the_data_section_exactly() {
        type Case = (
            &'static str,
            u64,
            u64,
            Vec<(u64, u64, usize)>,
            Option<Vec<usize>>,
        );
        let cases: Vec<Case> = vec![
            (
                "in order",
                10,
                30,
                vec![(10, 8, 0), (18, 12, 1)],
                Some(vec![0, 1]),
            ),
            (
                "out of order",
                10,
                30,
                vec![(18, 12, 7), (10, 8, 3)],
                Some(vec![3, 7]),
            ),
            (
                "empty pieces left out",
                10,
                30,
                vec![(10, 20, 0), (30, 0, 1)],
                Some(vec![0]),
            ),
            ("no data", 10, 10, vec![], Some(vec![])),
            ("a gap", 10, 30, vec![(10, 8, 0), (20, 10, 1)], None),
            ("an overlap", 10, 30, vec![(10, 9, 0), (18, 12, 1)], None),
            ("short of the end", 10, 30, vec![(10, 8, 0)], None),
            ("past the end", 10, 30, vec![(10, 21, 0)], None),
            ("not from the start", 10, 30, vec![(12, 18, 0)], None),
        ];
        for (what, start, size, ranges, want) in cases {
            assert_eq!(tiles(start, size, ranges), want, "{what}");
        }
    }

    /// A file fed to the placer in chunks of any size (1 byte, across the header's
    /// length and JSON, across pieces) ends up in the tensors bit for bit.
    #[tokio::test]
    async fn chunks_of_any_size_land_where_they_belong() {
        use crate::checkpoint::{save_checkpoint, CheckpointContent, CheckpointMeta};
        let store = crate::Store::open("memory://").unwrap();
        let tensors: Vec<TensorData> = [
            ("a", vec![7, 3]),
            ("b", vec![5]),
            ("c", vec![]),
            ("d", vec![4, 0]),
        ]
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            TensorData {
                name: name.into(),
                shape,
                data: (0..n)
                    .map(|i| f32::from_bits(0x3f80_0000 ^ (i * 7919 + k) as u32))
                    .collect(),
            }
        })
        .collect();
        let content = CheckpointContent {
            meta: CheckpointMeta {
                step: 1,
                generation: 0,
                config: serde_json::json!({}),
                config_hash: "x".into(),
                data_cursor: 0,
                rng: serde_json::json!(null),
                extra: serde_json::json!({}),
            },
            tensors: tensors.clone(),
        };
        let saved = save_checkpoint(&store, &content, 2).await.unwrap();
        let m = &saved.manifest;
        let mut files = Vec::new();
        for f in &m.files {
            let key = format!("{}/{}", saved.folder, f.name);
            files.push(store.get(&key).await.unwrap().unwrap());
        }
        for chunk in [1usize, 2, 3, 7, 8, 9, 13, 64, 1000, 1 << 20] {
            let mut out = empty_tensors(m);
            let reads = whole_tensor_reads(m).unwrap();
            let groups = plan_pieces(m, &reads, &mut out, 1).unwrap();
            let mut by_file: BTreeMap<&str, Vec<Piece<'_>>> = BTreeMap::new();
            for p in groups.into_iter().flatten() {
                by_file.entry(p.0.file.as_str()).or_default().push(p);
            }
            for (entry, bytes) in m.files.iter().zip(&files) {
                let pieces = by_file.remove(entry.name.as_str()).unwrap_or_default();
                let mut placer = Placer::new(m, entry, pieces);
                for c in bytes.chunks(chunk) {
                    placer.feed(c).unwrap();
                }
                assert_eq!(placer.finish().unwrap(), entry.hash().1, "chunk {chunk}");
            }
            let got: Vec<TensorData> = out.into_values().collect();
            for (g, w) in got.iter().zip(&tensors) {
                let bits = |t: &TensorData| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    (&g.name, &g.shape, bits(g)),
                    (&w.name, &w.shape, bits(w)),
                    "chunk {chunk}"
                );
            }
        }
        // Short, long and cut-off files are refused.
        let (entry, bytes) = (&m.files[0], &files[0]);
        let mut out = empty_tensors(m);
        let reads = whole_tensor_reads(m).unwrap();
        let groups = plan_pieces(m, &reads, &mut out, 1).unwrap();
        let pieces: Vec<Piece<'_>> = groups
            .into_iter()
            .flatten()
            .filter(|p| p.0.file == entry.name)
            .collect();
        let mut placer = Placer::new(m, entry, pieces);
        placer.feed(&bytes[..bytes.len() - 1]).unwrap();
        assert!(placer.finish().unwrap_err().contains("ended early"));
    }

    #[test]
    fn byte_views_are_the_little_endian_values() {
        let mut v = vec![1.0f32, -2.5, f32::MIN_POSITIVE];
        let want: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        if cfg!(target_endian = "little") {
            assert_eq!(bytes_of(&v), want.as_slice());
        }
        bytes_of_mut(&mut v)[..4].copy_from_slice(&7.0f32.to_ne_bytes());
        assert_eq!(v[0], 7.0);
    }
}

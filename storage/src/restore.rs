//! Assembling whole tensors from a checkpoint's verified shard files (the last step of a
//! restore), and, for a store on local disk, reading the files straight into the tensors.
//!
//! Both follow [`tenax_core::ckpt::load_plan`] for one rank: each read fills disjoint rows of
//! one tensor, cut here into pieces of about an equal share converted on every core.
//! [`assemble_tensors`] converts from file bytes already in memory (downloaded and hashed);
//! [`load_direct`] reads each piece from its file into its place in the tensor with one
//! `pread` (no intermediate buffer, no conversion pass) and then hashes the tensors' memory
//! in file order, so what is returned is exactly what was hashed. `load_direct` takes only
//! the common case (little-endian host, files whose every data byte the plan reads) and
//! says `Ok(None)` for anything else; any error in it sends the caller to the buffered path
//! too, which names the problem the way a verify does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use bytes::Bytes;
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

/// How many threads convert or read pieces.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

/// The reads of the load plan for one rank, cut into pieces of rows of about an equal share
/// of `out`, and dealt biggest first to the least loaded of `threads` groups (empty groups
/// left out). `known(file)` says whether a read's file is among those at hand.
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
    Ok(OpenFile {
        file,
        header,
        meta,
        hash: (alg, hash.to_string()),
        size,
    })
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
    if cfg!(not(target_endian = "little")) {
        return Ok(None);
    }
    let mut out = empty_tensors(manifest);
    if out.is_empty() {
        return Ok(None);
    }
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

//! Checkpoint shard files (tenax-storage `decode_shard`, and `read_rows_into` as the loader
//! calls it): safetensors bytes checked against the tensor entries a manifest lists for
//! the file. The first input byte varies the entries; the rest is the file. The entries
//! are those of the file itself (so that the checks get past the parse), then changed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;
use tenax_fuzz::Input;
use tenax_storage::manifest::{TensorEntry, DTYPE_F32};
use tenax_storage::shard::{decode_shard, read_rows_into};

/// Most values the loader-like reads decode from one input.
const MAX_VALUES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let ctl = inp.u8();
    let bytes = inp.rest();
    let mut entries: Vec<TensorEntry> = Vec::new();
    if let Ok(st) = SafeTensors::deserialize(bytes) {
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            let shape = view.shape().to_vec();
            let rows = match ctl & 3 {
                // Version 1: whole tensors.
                0 => None,
                // The whole tensor as one slice.
                1 => Some([0, shape.first().copied().unwrap_or(1)]),
                // The file holds the rows after the first of a one-row-larger tensor.
                2 => shape.first().map(|&r| [1, r.saturating_add(1)]),
                // A slice that claims one row more than the file holds.
                _ => Some([0, shape.first().copied().unwrap_or(1).saturating_add(1)]),
            };
            let full = match (rows, shape.first()) {
                (Some([_, end]), Some(_)) => {
                    let mut s = shape.clone();
                    s[0] = end;
                    s
                }
                _ => shape,
            };
            entries.push(TensorEntry {
                name,
                file: "shard-00000.safetensors".into(),
                dtype: DTYPE_F32.into(),
                shape: full,
                rows,
            });
        }
    }
    if ctl & 4 != 0 {
        entries.pop();
    }
    if ctl & 8 != 0 {
        entries.push(TensorEntry {
            name: "missing".into(),
            file: "shard-00000.safetensors".into(),
            dtype: DTYPE_F32.into(),
            shape: vec![2, 3],
            rows: None,
        });
    }
    let refs: Vec<&TensorEntry> = entries.iter().collect();
    let _ = decode_shard(bytes, &refs, false);
    let _ = decode_shard(bytes, &refs, true);
    // As the loader reads: the rows an entry says the file holds, row by row offsets
    // relative to what the file holds.
    let Ok(st) = SafeTensors::deserialize(bytes) else {
        return;
    };
    for e in &entries {
        let range = e.row_range();
        if range.start > range.end {
            continue;
        }
        let per_row: usize = e.shape.iter().skip(1).product::<usize>().max(1);
        let Some(n) = range
            .len()
            .checked_mul(per_row)
            .filter(|&n| n <= MAX_VALUES)
        else {
            continue;
        };
        let mut out = vec![0f32; n];
        let _ = read_rows_into(&st, &e.name, 0, per_row, &mut out);
        if range.len() > 1 {
            let _ = read_rows_into(&st, &e.name, 1, per_row, &mut out[per_row..]);
        }
    }
});

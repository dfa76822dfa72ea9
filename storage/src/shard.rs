//! Shard files: named f32 tensors to and from safetensors bytes (F32, little endian). Pure.

use std::collections::BTreeSet;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::manifest::TensorEntry;

/// One named f32 tensor. (The model crate has an identical struct; this one stays independent.)
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Name, unique within its shard.
    pub name: String,
    /// Dimensions; `data.len()` is their product.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// A borrowed tensor (or row slice of one) to encode: name, shape as stored, values.
pub type TensorRef<'a> = (&'a str, Vec<usize>, &'a [f32]);

/// Encode tensors as one safetensors file. Errors (as a reason) on a duplicate name or data
/// that does not fill its shape.
pub fn encode_shard(tensors: &[TensorData]) -> Result<Vec<u8>, String> {
    encode_shard_with_metadata(tensors, None)
}

/// [`encode_shard`] with a safetensors `__metadata__` map. The output depends only on the
/// tensors and the metadata (tensors are laid out sorted by name), so equal inputs give
/// byte-identical files; keep the metadata to one key for that (a map of several keys is
/// serialised in no fixed order).
pub fn encode_shard_with_metadata(
    tensors: &[TensorData],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let refs: Vec<TensorRef<'_>> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone(), t.data.as_slice()))
        .collect();
    encode_refs(&refs, metadata)
}

/// The little-endian bytes of f32 values: borrowed as they are on a little-endian machine,
/// converted on a big-endian one.
fn le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and every bit pattern is a valid u8; the slice covers
        // exactly the `len * 4` initialised bytes of `data`, borrowed for its lifetime.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        std::borrow::Cow::Borrowed(bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Encode borrowed tensors (or row slices) as one safetensors file, copying each value
/// once. Errors as [`encode_shard`].
pub fn encode_refs(
    tensors: &[TensorRef<'_>],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let mut names = BTreeSet::new();
    for (name, shape, data) in tensors {
        if name.is_empty() {
            return Err("a tensor has an empty name".into());
        }
        if !names.insert(*name) {
            return Err(format!("tensor {name:?} appears twice"));
        }
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(format!(
                "tensor {name:?} has {} values but shape {shape:?} needs {want}",
                data.len()
            ));
        }
    }
    let bytes: Vec<std::borrow::Cow<'_, [u8]>> =
        tensors.iter().map(|(_, _, data)| le_bytes(data)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (*name, v))
                .map_err(|e| format!("tensor {name:?}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    safetensors::serialize(views, metadata).map_err(|e| format!("safetensors encoding failed: {e}"))
}

/// The f32 values of `rows` rows (of `row_elems` values each) of a tensor stored in a
/// safetensors file, starting at row `first_row` of what the file holds, written into `out`.
/// Errors (as a reason) if the file does not hold those rows of that tensor as F32.
pub fn read_rows_into(
    st: &SafeTensors<'_>,
    name: &str,
    first_row: usize,
    row_elems: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let view = st
        .tensor(name)
        .map_err(|_| format!("tensor {name:?} is missing from the file"))?;
    if view.dtype() != Dtype::F32 {
        return Err(format!("tensor {name:?} is not F32"));
    }
    let start = first_row * row_elems * 4;
    let src = view
        .data()
        .get(start..start + out.len() * 4)
        .ok_or_else(|| format!("tensor {name:?} holds fewer rows than MANIFEST.json says"))?;
    for (d, c) in out.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Check a safetensors file against the tensor slices a manifest lists for it: every listed
/// slice is present with dtype F32 and the slice's shape, and the file holds nothing else. With
/// `decode`, return the slices (shape as stored) in `expected` order; otherwise return them
/// with empty `data`.
/// Errors are reasons, without the file name.
pub fn decode_shard(
    bytes: &[u8],
    expected: &[&TensorEntry],
    decode: bool,
) -> Result<Vec<TensorData>, String> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a readable safetensors file ({e})"))?;
    let mut out = Vec::with_capacity(expected.len());
    for entry in expected {
        let view = st.tensor(&entry.name).map_err(|_| {
            format!(
                "tensor {:?} listed in MANIFEST.json is missing from the file",
                entry.name
            )
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {:?} has dtype {:?}, MANIFEST.json says {}",
                entry.name,
                view.dtype(),
                entry.dtype
            ));
        }
        let stored = entry.stored_shape();
        if view.shape() != stored.as_slice() {
            return Err(format!(
                "tensor {:?} has shape {:?}, MANIFEST.json says {:?}",
                entry.name,
                view.shape(),
                stored
            ));
        }
        let data = if decode {
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            Vec::new()
        };
        out.push(TensorData {
            name: entry.name.clone(),
            shape: stored,
            data,
        });
    }
    let listed: BTreeSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut unlisted: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !listed.contains(n))
        .collect();
    unlisted.sort_unstable();
    if let Some(name) = unlisted.first() {
        return Err(format!(
            "tensor {name:?} is in the file but not in MANIFEST.json"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DTYPE_F32;

    fn t(name: &str, shape: &[usize]) -> TensorData {
        let n = shape.iter().product::<usize>();
        TensorData {
            name: name.into(),
            shape: shape.to_vec(),
            data: (0..n).map(|i| i as f32 * 0.5 - 1.0).collect(),
        }
    }

    fn entry(t: &TensorData) -> TensorEntry {
        TensorEntry {
            name: t.name.clone(),
            file: "f".into(),
            dtype: DTYPE_F32.into(),
            shape: t.shape.clone(),
            rows: None,
        }
    }

    #[test]
    fn round_trip_keeps_order_values_and_scalars() {
        let tensors = vec![t("z", &[2, 3]), t("a", &[]), t("m", &[0]), t("b", &[4])];
        let bytes = encode_shard(&tensors).unwrap();
        let entries: Vec<_> = tensors.iter().map(entry).collect();
        let refs: Vec<_> = entries.iter().collect();
        assert_eq!(decode_shard(&bytes, &refs, true).unwrap(), tensors);
        let shapes_only = decode_shard(&bytes, &refs, false).unwrap();
        assert!(shapes_only.iter().all(|t| t.data.is_empty()));
    }

    #[test]
    fn bad_content_is_refused_before_writing() {
        let mut short = t("w", &[2, 2]);
        short.data.pop();
        let err = encode_shard(&[short]).unwrap_err();
        assert!(
            err.contains("has 3 values but shape [2, 2] needs 4"),
            "{err}"
        );
        let err = encode_shard(&[t("w", &[1]), t("w", &[1])]).unwrap_err();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn decode_checks_against_the_manifest() {
        let bytes = encode_shard(&[t("w", &[2]), t("b", &[1])]).unwrap();
        let w = entry(&t("w", &[2]));
        let b = entry(&t("b", &[1]));
        let missing = entry(&t("gone", &[1]));
        let wrong_shape = entry(&t("w", &[1, 2]));
        let cases: &[(&[&TensorEntry], &str)] = &[
            (
                &[&w, &b, &missing],
                "\"gone\" listed in MANIFEST.json is missing",
            ),
            (
                &[&wrong_shape, &b],
                "has shape [2], MANIFEST.json says [1, 2]",
            ),
            (&[&w], "\"b\" is in the file but not in MANIFEST.json"),
        ];
        for (expected, want) in cases {
            let err = decode_shard(&bytes, expected, true).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let err = decode_shard(b"garbage", &[], true).unwrap_err();
        assert!(err.contains("not a readable safetensors file"), "{err}");
    }
}

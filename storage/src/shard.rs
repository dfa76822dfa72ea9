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
    let mut names = BTreeSet::new();
    let mut le = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.name.is_empty() {
            return Err("a tensor has an empty name".into());
        }
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor {:?} appears twice", t.name));
        }
        let want: usize = t.shape.iter().product();
        if t.data.len() != want {
            return Err(format!(
                "tensor {:?} has {} values but shape {:?} needs {want}",
                t.name,
                t.data.len(),
                t.shape
            ));
        }
        le.push(
            t.data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let views = tensors
        .iter()
        .zip(&le)
        .map(|(t, bytes)| {
            TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .map(|v| (t.name.as_str(), v))
                .map_err(|e| format!("tensor {:?}: {e}", t.name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    safetensors::serialize(views, metadata).map_err(|e| format!("safetensors encoding failed: {e}"))
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

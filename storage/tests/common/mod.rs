//! Helpers shared by the checkpoint integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use serde_json::json;
use tenax_storage::{CheckpointContent, CheckpointMeta, Manifest, TensorData, MANIFEST_FILE};

/// A tensor with simple, distinct values.
pub fn tensor(name: &str, shape: &[usize], seed: f32) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData {
        name: name.into(),
        shape: shape.to_vec(),
        data: (0..n).map(|i| seed + i as f32 * 0.25).collect(),
    }
}

/// A tensor whose values are arbitrary bit patterns (NaNs with payloads, signed zeros,
/// infinities, subnormals...), so that only a bit-exact copy compares equal.
pub fn bit_tensor(name: &str, shape: &[usize], salt: u32) -> TensorData {
    const SPECIAL: [u32; 8] = [
        0x8000_0000, // -0.0
        0x7fc0_0001, // quiet NaN with a payload
        0x7f80_0001, // signalling NaN
        0xff80_0000, // -inf
        0x0000_0001, // smallest subnormal
        0x7f7f_ffff, // f32::MAX
        0xffc1_2345, // negative NaN with a payload
        0x3f80_0000, // 1.0
    ];
    let n: usize = shape.iter().product();
    let data = (0..n as u32)
        .map(|i| {
            let bits = if (i as usize) < SPECIAL.len() {
                SPECIAL[i as usize] ^ (salt & 1)
            } else {
                let mut x = i.wrapping_mul(0x9e37_79b9) ^ salt.wrapping_mul(0x85eb_ca6b);
                x ^= x >> 15;
                x = x.wrapping_mul(0x2c1b_3c6d);
                x ^ (x >> 12)
            };
            f32::from_bits(bits)
        })
        .collect();
    TensorData {
        name: name.into(),
        shape: shape.to_vec(),
        data,
    }
}

/// Everything but the tensors of a checkpoint at `step`.
pub fn meta(step: u64, generation: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        generation,
        config: json!({"model": {"d_model": 8}, "train": {"steps": 100}}),
        config_hash: "cafe".into(),
        data_cursor: step * 32,
        rng: json!({"seed": 7, "counter": step}),
        extra: json!({"adamw_step": step}),
    }
}

/// A small checkpoint: `wte` [4, 2], `ln.bias` [2], `m.wte` [4, 2], `scalar` [].
pub fn content(step: u64, generation: u64) -> CheckpointContent {
    let s = step as f32;
    CheckpointContent {
        meta: meta(step, generation),
        tensors: vec![
            tensor("wte", &[4, 2], s),
            tensor("ln.bias", &[2], -s),
            tensor("m.wte", &[4, 2], 0.5),
            tensor("scalar", &[], s),
        ],
    }
}

/// The tensors sorted by name, as a load returns them.
pub fn sorted(tensors: &[TensorData]) -> Vec<TensorData> {
    let mut out = tensors.to_vec();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Same names, shapes and value bits (NaN payloads included), in the same order.
pub fn assert_bit_identical(got: &[TensorData], want: &[TensorData], what: &str) {
    let names = |ts: &[TensorData]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: tensor names");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape, w.shape, "{what}: shape of {}", w.name);
        let bits = |t: &TensorData| t.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert!(bits(g) == bits(w), "{what}: values of {} differ", w.name);
    }
}

pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The on-disk path of a checkpoint file in a `file://` store.
pub fn on_disk(dir: &Path, folder: &str, file: &str) -> PathBuf {
    dir.join(folder).join(file)
}

/// XOR one byte of a file on disk with 0x01 (twice restores it).
pub fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// The manifest of a `file://` checkpoint, read straight from disk.
pub fn manifest_on_disk(dir: &Path, folder: &str) -> Manifest {
    serde_json::from_slice(&std::fs::read(on_disk(dir, folder, MANIFEST_FILE)).unwrap()).unwrap()
}

//! `MANIFEST.json` (tenax-storage `Manifest::parse`) and checkpoint folder names
//! (`parse_folder_name`): any bytes either parse or give an error, never a panic; what
//! parses is self-consistent enough for everything a reader does next (slices, shapes,
//! the tiling check, the folder name, the signature check, writing it back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenax_storage::manifest::{folder_name, parse_folder_name, Manifest};
use tenax_storage::signing::check_signature;
use tenax_storage::SignKey;

/// The key the signed seed manifests were signed with (fuzz/examples/make_seeds.rs).
const SEED_KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(f) = parse_folder_name(text) {
            // The canonical name of what parsed parses back to the same parts.
            let again = parse_folder_name(&folder_name(f.step, f.generation, &f.attempt));
            assert_eq!(again.as_ref(), Some(&f), "folder name {text:?}");
        }
    }
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    let _ = m.saved_slices();
    let _ = m.tensor_shapes();
    let _ = m.total_bytes();
    let _ = m.sort_key();
    for t in &m.tensors {
        let _ = t.row_range().len();
        let _ = t.stored_shape();
        let _ = m.tensors_in(&t.file).count();
    }
    for f in &m.files {
        let _ = f.hash();
    }
    let folder = m.folder();
    assert!(
        parse_folder_name(&folder).is_some(),
        "the folder name {folder:?} of a parsed manifest does not parse"
    );
    let trust = SignKey::from_seed(SEED_KEY).public();
    let _ = check_signature(data, &m, &trust);
    // What a reader parsed, a writer writes back readable.
    let written = m.to_json();
    if let Err(e) = Manifest::parse(&written) {
        panic!("a parsed manifest, written again, does not parse: {e}");
    }
});

//! A whole checkpoint read back (tenax-storage `load_checkpoint` and `verify_checkpoint` on
//! an in-memory store): the manifest parse, the tiling and load plan of its tensor slices,
//! the shard checks (`decode_shard`) and the assembly of whole tensors from row slices
//! (`read_rows_into`). Input: a little-endian u16 length, that many bytes of manifest
//! JSON (a template), then for each file the template lists a u32 length and the file's
//! bytes. The harness fills in each file's size and hash and the manifest's
//! self-checksum (a fuzzer would not find them), so that the reader gets past them.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tenax_fuzz::Input;
use tenax_storage::manifest::{FileEntry, Manifest, MANIFEST_FILE};
use tenax_storage::{load_checkpoint, verify_checkpoint, Store};

/// Most files of one input.
const MAX_FILES: usize = 8;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let len = usize::from(inp.u16());
    let template = inp.bytes(len);
    let Ok(mut m) = serde_json::from_slice::<Manifest>(template) else {
        return;
    };
    if m.files.len() > MAX_FILES {
        return;
    }
    let alg = m.hash_alg();
    let mut files = Vec::new();
    for f in &mut m.files {
        let n = inp.u32() as usize;
        let bytes = inp.bytes(n).to_vec();
        let writer = f.writer.take();
        *f = FileEntry::new(f.name.clone(), bytes.len() as u64, alg, alg.hex(&bytes));
        f.writer = writer;
        files.push((f.name.clone(), bytes));
    }
    let folder = m.folder();
    let manifest = m.to_json();
    runtime().block_on(async {
        let store = Store::open("memory://").expect("an in-memory store");
        for (name, bytes) in files {
            if store
                .put_new(&format!("{folder}/{name}"), Bytes::from(bytes))
                .await
                .is_err()
            {
                return;
            }
        }
        if store
            .put_new(&format!("{folder}/{MANIFEST_FILE}"), Bytes::from(manifest))
            .await
            .is_err()
        {
            return;
        }
        let verified = verify_checkpoint(&store, &folder).await;
        let loaded = load_checkpoint(&store, &folder).await;
        if let Ok(l) = loaded {
            assert!(verified.is_ok(), "a checkpoint that loads verifies");
            for t in &l.tensors {
                assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
            }
        }
    });
});

//! Prepared token shards (tenax-data `read_shard_with_vocab`: the `TNXTOK01` header, the
//! payload length and hash, the token ids): any file either reads or gives
//! `CorruptShard`, never a panic. The reader takes a path, so each input is written to a
//! file first (in a temporary directory made once per process).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tenax_data::read_shard_with_vocab;

fn path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = dir.path().join("shard.bin");
        (dir, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).expect("write the input");
    if let Ok((tokens, vocab)) = read_shard_with_vocab(p) {
        assert!(tokens.iter().all(|&t| (t as usize) < vocab));
    }
});

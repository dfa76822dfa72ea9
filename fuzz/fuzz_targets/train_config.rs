//! The training config TOML of `tenax train --config FILE` and `tenax daemon --config FILE`
//! (src/config.rs of the binary package, with its src/config/args.rs; the package has no
//! library target: included here by path, unchanged). `TrainArgs::from_toml_file` is
//! `toml::from_str` of the file's text; this target parses the text the same way, then
//! resolves it (alone, and over a checkpoint's config as `--resume` does) and compares the
//! math keys as a resume does.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/config.rs"]
mod config;

use config::{TrainArgs, TrainConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As TrainArgs::from_toml_file after reading the file.
    let Ok(args) = toml::from_str::<TrainArgs>(text) else {
        return;
    };
    // Not `args.manifest_keys()`: it reads the key files the config names, and a fuzzer
    // naming /dev/zero or a FIFO would make the target read forever.
    let Ok(cfg) = TrainConfig::resolve(args.clone(), None) else {
        return;
    };
    let _ = cfg.pipeline_schedule();
    let _ = cfg.math();
    // A resume: the resolved config is what a checkpoint stores (as JSON) and gives back.
    let stored = serde_json::to_string(&cfg).expect("a resolved config serialises");
    let from_ckpt: TrainConfig = serde_json::from_str(&stored).expect("a stored config reads back");
    if let Ok(resumed) = TrainConfig::resolve(TrainArgs::default(), Some(&from_ckpt)) {
        let _ = resumed.math_differences(&cfg);
    }
    let default = TrainConfig::resolve(TrainArgs::default(), None).expect("the defaults resolve");
    let _ = cfg.math_differences(&default);
    let _ = TrainConfig::resolve(args, Some(&default));
});

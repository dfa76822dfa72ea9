//! Chaos scenario files (tenax-chaos `Scenario::parse`): any text either parses or gives a
//! one-line error, never a panic; a scenario that parses has a fault schedule for any
//! seed (`schedule::schedule`), its invariants and its slots, and fault durations the
//! runner can wait for.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tenax_chaos::scenario::Scenario;
use tenax_chaos::schedule::schedule;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(s) = Scenario::parse(text, "fuzz.toml") else {
        return;
    };
    let _ = s.invariants();
    let _ = s.slots();
    let templates = s.random.iter().flat_map(|r| r.faults.iter());
    for f in s.faults.iter().chain(templates) {
        // The runner (src/chaos.rs) makes Durations of these with from_secs_f64, which
        // panics on a negative, NaN or huge value.
        assert!(Duration::try_from_secs_f64(f.duration_s()).is_ok(), "{f:?}");
        assert!(
            Duration::try_from_secs_f64(f.restart_after_s()).is_ok(),
            "{f:?}"
        );
        let _ = (
            f.duty_cycle_ms(),
            f.error_rate(),
            f.latency_ms(),
            f.kind.name(),
        );
    }
    let seed = data
        .iter()
        .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let _ = schedule(&s, seed);
});

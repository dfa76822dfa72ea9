//! Chaos scenario files (tenax-chaos `Scenario::parse`): any text either parses or gives a
//! one-line error, never a panic; a scenario that parses has a fault schedule for any
//! seed (`schedule::schedule`), its invariants and its slots.
#![no_main]

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
    for f in &s.faults {
        let _ = (f.duration_s(), f.restart_after_s(), f.duty_cycle_ms());
        let _ = (f.error_rate(), f.latency_ms(), f.kind.name());
    }
    let seed = data
        .iter()
        .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let _ = schedule(&s, seed);
});

//! The C allocator's settings for a months-long process (glibc on Linux only).
//!
//! A daemon allocates multi-MiB buffers all the time (gradient frames, state-copy
//! chunks, checkpoint shards) on many threads (the runtime's workers, blocking threads,
//! the trainer). glibc keeps what they free: each thread that contends gets an arena of
//! its own (up to 8 per core), and after a large `mmap`ed block is freed the threshold
//! above which blocks are `mmap`ed rises (up to 32 MiB), so later blocks of that size
//! come from the arenas, which return memory to the system only from their top. A
//! daemon's RSS then climbed with every re-formation and state copy (BENCHMARKS.md,
//! "Daemon memory").
//!
//! [`tune`] sets at most [`ARENA_MAX`] arenas (unless `MALLOC_ARENA_MAX` is set) and
//! starts a thread that calls `malloc_trim(0)` every [`TRIM_EVERY`] (unless
//! `TENAX_MALLOC_TRIM_S=0`; another number of seconds sets the period): glibc then hands
//! the free pages inside every arena back to the system. Keeping every large block
//! `mmap`ed instead (a fixed `M_MMAP_THRESHOLD`) also bounded RSS but cost 42% of the
//! training throughput (a page fault per page of every gradient buffer, every step).

use std::time::Duration;

/// Most malloc arenas (glibc's default is 8 per core).
pub const ARENA_MAX: i32 = 2;

/// How often the trim thread hands free pages back to the system.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The variable that sets the trim period in seconds (0: no trim thread).
pub const TRIM_VAR: &str = "TENAX_MALLOC_TRIM_S";

/// The trim period [`TRIM_VAR`] asks for: unset, [`TRIM_EVERY`]; a whole number of
/// seconds, that (0: never); anything else, a one-line error naming the variable. Pure.
pub fn trim_period(value: Option<&str>) -> Result<Duration, String> {
    let Some(value) = value else {
        return Ok(TRIM_EVERY);
    };
    value.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| {
        format!(
            "{TRIM_VAR}={value:?} is not a whole number of seconds; set e.g. {TRIM_VAR}=10, or 0 for no trimming, or unset it for every {} s",
            TRIM_EVERY.as_secs()
        )
    })
}

/// Applies [`ARENA_MAX`] unless `MALLOC_ARENA_MAX` is set, and starts the trim thread
/// unless [`TRIM_VAR`] is `0`; returns what it did, in words (empty where nothing
/// applies: another C library). A [`TRIM_VAR`] that is not a number is an error (and
/// nothing is applied).
pub fn tune() -> Result<Vec<String>, String> {
    let var = std::env::var_os(TRIM_VAR).map(|v| v.to_string_lossy().into_owned());
    let every = trim_period(var.as_deref())?;
    let mut applied = Vec::new();
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() && sys::set_arena_max(ARENA_MAX) {
        applied.push(format!("MALLOC_ARENA_MAX={ARENA_MAX}"));
    }
    if !every.is_zero() && sys::HAS_TRIM {
        let started = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                sys::trim();
            });
        if started.is_ok() {
            applied.push(format!("malloc_trim every {} s", every.as_secs()));
        }
    }
    Ok(applied)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod sys {
    use std::ffi::c_int;

    /// `M_ARENA_MAX` of glibc's malloc.h.
    const M_ARENA_MAX: c_int = -8;

    /// Whether this C library has `malloc_trim`.
    pub const HAS_TRIM: bool = true;

    unsafe extern "C" {
        /// glibc's `int mallopt(int param, int value)`: 1 on success, 0 on error.
        fn mallopt(param: c_int, value: c_int) -> c_int;
        /// glibc's `int malloc_trim(size_t pad)`: 1 if memory was released.
        fn malloc_trim(pad: usize) -> c_int;
    }

    /// Sets the most arenas; whether glibc took it.
    pub fn set_arena_max(value: c_int) -> bool {
        // SAFETY: mallopt only reads its two integer arguments; glibc documents it as
        // safe to call at any time (it takes the arena locks itself).
        unsafe { mallopt(M_ARENA_MAX, value) == 1 }
    }

    /// Hands the free pages of every arena back to the system.
    pub fn trim() {
        // SAFETY: malloc_trim takes no pointer and locks each arena itself; it may be
        // called from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod sys {
    /// No glibc: no `malloc_trim`.
    pub const HAS_TRIM: bool = false;

    /// No glibc: nothing to set.
    pub fn set_arena_max(_value: i32) -> bool {
        false
    }

    /// No glibc: nothing to trim.
    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_trim_period_is_whole_seconds_or_an_error_naming_the_variable() {
        let cases: &[(Option<&str>, Result<Duration, ()>)] = &[
            (None, Ok(super::TRIM_EVERY)),
            (Some("0"), Ok(Duration::ZERO)),
            (Some("30"), Ok(Duration::from_secs(30))),
            (Some(" 5 "), Ok(Duration::from_secs(5))),
            (Some(""), Err(())),
            (Some("10s"), Err(())),
            (Some("-1"), Err(())),
            (Some("2.5"), Err(())),
        ];
        for (value, want) in cases {
            match (super::trim_period(*value), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{value:?}"),
                (Err(line), Err(())) => {
                    assert!(line.starts_with("TENAX_MALLOC_TRIM_S="), "{line}");
                    assert!(line.contains("whole number of seconds"), "{line}");
                    assert!(!line.contains('\n'), "{line}");
                }
                (got, _) => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings_and_trims() {
        assert!(super::sys::set_arena_max(super::ARENA_MAX));
        // A big block freed, then trimmed: still usable afterwards.
        let v = vec![7u8; 4 << 20];
        assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 * (4 << 20));
        drop(v);
        super::sys::trim();
        let w = vec![1u8; 1 << 20];
        assert_eq!(w.len(), 1 << 20);
        // tune() applies what the environment does not set.
        let applied = super::tune().unwrap();
        assert_eq!(
            applied.iter().any(|a| a.starts_with("MALLOC_ARENA_MAX")),
            std::env::var_os("MALLOC_ARENA_MAX").is_none(),
            "{applied:?}"
        );
    }
}

//! The C allocator's settings for a months-long process (glibc on Linux only).
//!
//! A daemon allocates multi-MiB buffers all the time (gradient frames, state-copy
//! chunks, checkpoint shards) on many threads (the runtime's workers, blocking threads,
//! the trainer). glibc's defaults suit short programs: each thread that contends gets
//! an arena of its own (up to 8 per core), and after a large `mmap`ed block is freed the
//! threshold above which blocks are `mmap`ed rises (up to 32 MiB), so later blocks of
//! that size come from the arenas, whose free space is returned to the system only from
//! their top. A daemon's RSS then climbs with every re-formation and state copy and is
//! not given back (measured in BENCHMARKS.md, "Daemon memory").
//!
//! [`tune`] fixes that at start: at most [`ARENA_MAX`] arenas, and blocks of
//! [`MMAP_THRESHOLD_BYTES`] or more always `mmap`ed (a fixed threshold, so it never
//! rises), so that a freed buffer goes back to the system at once. A variable the
//! operator set (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) wins over ours.

/// Most malloc arenas (glibc's default is 8 per core).
pub const ARENA_MAX: i32 = 2;

/// Blocks at least this large are always `mmap`ed, and unmapped when freed.
pub const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Applies [`ARENA_MAX`] and [`MMAP_THRESHOLD_BYTES`] unless the environment sets them;
/// returns what it applied, as `NAME=VALUE` (empty where nothing applies: another C
/// library, or both set by the operator).
pub fn tune() -> Vec<String> {
    let mut applied = Vec::new();
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", sys::M_ARENA_MAX, ARENA_MAX),
        (
            "MALLOC_MMAP_THRESHOLD_",
            sys::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD_BYTES,
        ),
    ] {
        if std::env::var_os(var).is_none() && sys::set(param, value) {
            applied.push(format!("{var}={value}"));
        }
    }
    applied
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod sys {
    use std::ffi::c_int;

    /// `M_MMAP_THRESHOLD` of glibc's malloc.h.
    pub const M_MMAP_THRESHOLD: c_int = -3;
    /// `M_ARENA_MAX` of glibc's malloc.h.
    pub const M_ARENA_MAX: c_int = -8;

    unsafe extern "C" {
        /// glibc's `int mallopt(int param, int value)`: 1 on success, 0 on error.
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    /// Sets one malloc parameter; whether glibc took it.
    pub fn set(param: c_int, value: c_int) -> bool {
        // SAFETY: mallopt only reads its two integer arguments; glibc documents it as
        // safe to call at any time (it takes the arena locks itself).
        unsafe { mallopt(param, value) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod sys {
    pub const M_MMAP_THRESHOLD: i32 = -3;
    pub const M_ARENA_MAX: i32 = -8;

    /// No glibc: nothing to set.
    pub fn set(_param: i32, _value: i32) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_both_settings() {
        assert!(super::sys::set(super::sys::M_ARENA_MAX, super::ARENA_MAX));
        assert!(super::sys::set(
            super::sys::M_MMAP_THRESHOLD,
            super::MMAP_THRESHOLD_BYTES
        ));
        // tune() applies what the environment does not set.
        let applied = super::tune();
        for var in ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"] {
            assert_eq!(
                applied.iter().any(|a| a.starts_with(var)),
                std::env::var_os(var).is_none(),
                "{var}: {applied:?}"
            );
        }
        // A big block is usable after the change.
        let v = vec![7u8; 4 << 20];
        assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 * (4 << 20));
    }
}

//! Test-only fault hooks ("chaos hooks"), and the guard that keeps them honest.
//!
//! The hooks make a daemon fail at a chosen moment; tests set them in the daemon's
//! environment. They exist only in a binary built with `--features chaos-hooks`
//! (`scripts/test` builds that way): the variable names, the code that reads them and the
//! faults themselves are compiled out of a default build. Such a build refuses to run when
//! any hook variable is set ([`check_env`]), so a test can never pass because its fault
//! was silently not injected.

/// The hooks a `chaos-hooks` build reads, each `<name>=<step>`.
#[cfg(feature = "chaos-hooks")]
pub const KNOWN: &[&str] = &[
    EXIT_IN_ALL_GATHER,
    FLIP_PARAM_AT_STEP,
    PANIC_RANK_AT_STEP,
    PANIC_IN_UPLOAD_AT_STEP,
    KILL_IN_SHARE_AT_STEP,
    LOSS_SPIKE_AT_STEPS,
];

/// At `<step>`, this daemon sends its all-gather frames to one peer only, then exits
/// (`GrpcCollective::exit_during_all_gather`).
#[cfg(feature = "chaos-hooks")]
pub const EXIT_IN_ALL_GATHER: &str = "TENAX_CHAOS_EXIT_IN_ALL_GATHER";

/// The first rank of this process to run step `<step>` panics, once (read by
/// tenax-actors' `chaos-hooks` feature).
#[cfg(feature = "chaos-hooks")]
pub const PANIC_RANK_AT_STEP: &str = "TENAX_CHAOS_PANIC_RANK_AT_STEP";

/// The upload of step `<step>`'s checkpoint panics in the Checkpoint actor (read by
/// tenax-actors' `chaos-hooks` feature).
#[cfg(feature = "chaos-hooks")]
pub const PANIC_IN_UPLOAD_AT_STEP: &str = "TENAX_CHAOS_PANIC_IN_UPLOAD_AT_STEP";

/// A writer of a shared checkpoint (not the committer) kills its own process with SIGKILL
/// in its first save at or after `<step>`, after its shard is uploaded and before its
/// receipt (read by tenax-actors' `chaos-hooks` feature).
#[cfg(feature = "chaos-hooks")]
pub const KILL_IN_SHARE_AT_STEP: &str = "TENAX_CHAOS_KILL_IN_SHARE_AT_STEP";

/// The reduced loss of the steps `<step>[,<step>...]` (numbered from 0) is multiplied by
/// 10 before the update is decided: a planted loss spike for the training guard (read by
/// tenax-actors' `chaos-hooks` feature).
#[cfg(feature = "chaos-hooks")]
pub const LOSS_SPIKE_AT_STEPS: &str = "TENAX_CHAOS_LOSS_SPIKE_AT_STEPS";

/// When this daemon starts training at or after `<step>`, it flips one bit of one
/// parameter, once.
#[cfg(feature = "chaos-hooks")]
pub const FLIP_PARAM_AT_STEP: &str = "TENAX_CHAOS_FLIP_PARAM_AT_STEP";

/// The hooks this binary was built with: `None` without the `chaos-hooks` feature.
#[cfg(feature = "chaos-hooks")]
pub fn compiled() -> Option<&'static [&'static str]> {
    Some(KNOWN)
}

/// The hooks this binary was built with: `None` without the `chaos-hooks` feature.
#[cfg(not(feature = "chaos-hooks"))]
pub fn compiled() -> Option<&'static [&'static str]> {
    None
}

/// A hook's step, from the environment. Unset (always, outside tests): `None`.
#[cfg(feature = "chaos-hooks")]
pub fn step(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.trim().parse().ok()
}

/// Silent corruption: flips the top mantissa bit of the largest parameter (a change the
/// updates do not absorb).
#[cfg(feature = "chaos-hooks")]
pub fn flip_one_bit(params: &mut [f32]) {
    let i = (0..params.len())
        .max_by(|&a, &b| params[a].abs().total_cmp(&params[b].abs()))
        .unwrap_or(0);
    if let Some(p) = params.get_mut(i) {
        *p = f32::from_bits(p.to_bits() ^ (1 << 22));
    }
}

/// `FLIP_PARAM_AT_STEP`: silent corruption on this node only, once per process, of the
/// state a trainer starts from at or after the hook's step. Returns the state and whether
/// it was flipped.
#[cfg(feature = "chaos-hooks")]
pub fn flip_once(mut state: crate::train::Start, node: &str) -> (crate::train::Start, bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    let due = step(FLIP_PARAM_AT_STEP).is_some_and(|at| state.step >= at);
    if !due || DONE.swap(true, Ordering::SeqCst) {
        return (state, false);
    }
    flip_one_bit(&mut state.params);
    eprintln!(
        "chaos: node {node} flipped one bit of its parameters at step {}",
        state.step
    );
    (state, true)
}

/// Whether `name` is a hook variable (starts with `TENAX_CHAOS_`). The prefix is written in
/// lowercase and compared without case on purpose: a default build must not contain the
/// uppercase name anywhere (`scripts/test` greps the binary for it to prove the hooks are
/// out).
fn is_hook_var(name: &str) -> bool {
    name.get(.."tenax_chaos_".len())
        .is_some_and(|p| p.eq_ignore_ascii_case("tenax_chaos_"))
}

/// Decides whether this binary may run with an environment whose variable names are
/// `names`, given the hooks it was built with (`compiled`: `None` without the feature).
/// Without the feature any hook variable is an error; with it, a hook variable this build
/// does not know (a typo) is one too. The error is one line naming the variables.
pub fn check_env<'a>(
    names: impl IntoIterator<Item = &'a str>,
    compiled: Option<&[&str]>,
) -> Result<(), String> {
    let mut hooks: Vec<&str> = names.into_iter().filter(|n| is_hook_var(n)).collect();
    hooks.sort_unstable();
    hooks.dedup();
    match compiled {
        None if !hooks.is_empty() => Err(format!(
            "{} set, but this tenax was built without the `chaos-hooks` feature and would not \
             inject the fault: rebuild with `--features chaos-hooks` (scripts/test does), or \
             unset it",
            list(&hooks)
        )),
        Some(known) => {
            let unknown: Vec<&str> = hooks.into_iter().filter(|h| !known.contains(h)).collect();
            if unknown.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} set, but this tenax has no such chaos hook (it has {}): fix the name \
                     or unset it",
                    list(&unknown),
                    known.join(", ")
                ))
            }
        }
        None => Ok(()),
    }
}

/// `A is` or `A, B are`.
fn list(names: &[&str]) -> String {
    match names {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN_HERE: &[&str] = &["TENAX_CHAOS_A", "TENAX_CHAOS_B"];

    /// Environment names, the hooks built in (`None`: built without), the error (`None`: Ok).
    type Case = (
        &'static [&'static str],
        Option<&'static [&'static str]>,
        Option<&'static str>,
    );

    #[test]
    fn hook_variables_need_a_build_that_has_them() {
        let cases: &[Case] = &[
            (&[], None, None),
            (&["PATH", "TENAX_LOG", "CANDLE_NUM_THREADS"], None, None),
            (&["TENAX_CHAOSX", "MY_TENAX_CHAOS_A"], None, None),
            (
                &["PATH", "TENAX_CHAOS_A"],
                None,
                Some(
                    "TENAX_CHAOS_A is set, but this tenax was built without the `chaos-hooks` \
                     feature and would not inject the fault: rebuild with \
                     `--features chaos-hooks` (scripts/test does), or unset it",
                ),
            ),
            (
                &["TENAX_CHAOS_B", "TENAX_CHAOS_A", "TENAX_CHAOS_B"],
                None,
                Some(
                    "TENAX_CHAOS_A, TENAX_CHAOS_B are set, but this tenax was built without \
                     the `chaos-hooks` feature and would not inject the fault: rebuild with \
                     `--features chaos-hooks` (scripts/test does), or unset it",
                ),
            ),
            // Any case: the prefix is compared without case.
            (
                &["tenax_chaos_a"],
                None,
                Some(
                    "tenax_chaos_a is set, but this tenax was built without the `chaos-hooks` \
                     feature and would not inject the fault: rebuild with \
                     `--features chaos-hooks` (scripts/test does), or unset it",
                ),
            ),
            (&[], Some(KNOWN_HERE), None),
            (&["PATH", "TENAX_CHAOS_A"], Some(KNOWN_HERE), None),
            (&["TENAX_CHAOS_A", "TENAX_CHAOS_B"], Some(KNOWN_HERE), None),
            (
                &["TENAX_CHAOS_A", "TENAX_CHAOS_AA"],
                Some(KNOWN_HERE),
                Some(
                    "TENAX_CHAOS_AA is set, but this tenax has no such chaos hook (it has \
                     TENAX_CHAOS_A, TENAX_CHAOS_B): fix the name or unset it",
                ),
            ),
        ];
        for (names, compiled, want) in cases {
            let got = check_env(names.iter().copied(), *compiled);
            assert_eq!(
                got.as_ref().err().map(String::as_str),
                *want,
                "names {names:?}, compiled {compiled:?}"
            );
            if let Err(line) = got {
                assert!(!line.contains('\n'), "one line: {line}");
            }
        }
    }

    #[cfg(feature = "chaos-hooks")]
    #[test]
    fn the_flip_changes_one_bit_of_the_largest_parameter() {
        let mut p = vec![0.5f32, -3.0, 2.0];
        flip_one_bit(&mut p);
        assert_eq!(p[0], 0.5);
        assert_eq!(p[2], 2.0);
        assert_eq!((p[1].to_bits() ^ (-3.0f32).to_bits()).count_ones(), 1);
        flip_one_bit(&mut []);
    }

    #[test]
    fn this_build_knows_its_own_hooks() {
        #[cfg(feature = "chaos-hooks")]
        {
            assert_eq!(compiled(), Some(KNOWN));
            assert_eq!(check_env(KNOWN.iter().copied(), compiled()), Ok(()));
        }
        #[cfg(not(feature = "chaos-hooks"))]
        assert_eq!(compiled(), None);
    }
}

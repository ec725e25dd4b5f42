//! The retry ladder (pure): after a failed attempt, which safer plan to try next, or give
//! up.
//!
//! 1. If BOLT names the function it failed on (`... in function luaV_execute/1`), retry the
//!    same plan skipping it (`-skip-funcs=`, accumulating, at most [`MAX_SKIPPED`]).
//! 2. Else step down one rung: full flags -> without function splitting -> non-relocation
//!    mode (no function reordering). A binary without relocations starts on the last rung
//!    with splitting, so it has one step down.
//! 3. Timeouts and memory kills step down once (a smaller job may fit), then give up.
//! 4. Below the last rung: give up. The caller marks the binary failed until its content,
//!    its profile or the BOLT version changes (see [`super::retry_policy`]).

use super::applicability::BoltMode;
use super::job::{BoltPlan, FailureKind};

/// Functions skipped before the ladder stops trusting names and steps down instead.
pub const MAX_SKIPPED: usize = 8;

/// Where an attempt stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rung {
    pub plan: BoltPlan,
    /// A timeout or memory kill already cost its one step down.
    pub resource_step_used: bool,
}

impl Rung {
    pub fn first(plan: BoltPlan) -> Self {
        Self { plan, resource_step_used: false }
    }

    /// A name for status: "full", "no-split", "non-relocation", plus skipped functions.
    pub fn label(&self) -> String {
        let base = match (self.plan.mode, self.plan.split_functions) {
            (BoltMode::Relocations, true) => "full",
            (BoltMode::Relocations, false) => "no-split",
            (BoltMode::NonRelocation, true) => "non-relocation",
            (BoltMode::NonRelocation, false) => "non-relocation, no-split",
        };
        if self.plan.skip_funcs.is_empty() {
            base.to_string()
        } else {
            format!("{base}, skip {}", self.plan.skip_funcs.join(","))
        }
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Retry(Rung),
    /// The ladder is exhausted: the binary is failed until something changes.
    GiveUp(String),
    /// Stop without blaming the binary (shutdown).
    Abandon,
}

/// The next rung after `rung` failed with `kind`, given BOLT's output `tail`.
pub fn next_rung(rung: &Rung, kind: &FailureKind, tail: &str) -> Next {
    match kind {
        FailureKind::Cancelled => Next::Abandon,
        FailureKind::Setup(why) => Next::GiveUp(format!("could not run BOLT: {why}")),
        FailureKind::Timeout | FailureKind::MemoryLimit => {
            if rung.resource_step_used {
                return Next::GiveUp(format!("{} again after stepping down", kind.label()));
            }
            match step_down(rung) {
                Some(mut r) => {
                    r.resource_step_used = true;
                    Next::Retry(r)
                }
                None => Next::GiveUp(format!("{} on the safest flags", kind.label())),
            }
        }
        FailureKind::ExitCode(_) | FailureKind::Signal(_) | FailureKind::Verification(_) => {
            if !matches!(kind, FailureKind::Verification(_))
                && let Some(name) = failing_function(tail)
                && !rung.plan.skip_funcs.contains(&name)
                && rung.plan.skip_funcs.len() < MAX_SKIPPED
            {
                let mut r = rung.clone();
                r.plan.skip_funcs.push(name);
                return Next::Retry(r);
            }
            match step_down(rung) {
                Some(r) => Next::Retry(r),
                None => Next::GiveUp(format!("{} on the safest flags", kind.label())),
            }
        }
    }
}

/// One rung safer, keeping skipped functions; None below the last.
fn step_down(rung: &Rung) -> Option<Rung> {
    let mut r = rung.clone();
    match (rung.plan.mode, rung.plan.split_functions) {
        (_, true) => r.plan.split_functions = false,
        (BoltMode::Relocations, false) => r.plan.mode = BoltMode::NonRelocation,
        (BoltMode::NonRelocation, false) => return None,
    }
    Some(r)
}

/// The function BOLT names in its error, if any: the word after "in function " (or
/// "for function ") on the last line that says so, e.g. `luaV_execute/1`.
pub fn failing_function(tail: &str) -> Option<String> {
    tail.lines().rev().find_map(|line| {
        ["in function ", "for function "].iter().find_map(|marker| {
            let at = line.rfind(marker)?;
            let word = line[at + marker.len()..].split_whitespace().next()?;
            let name = word.trim_end_matches([':', ',', '.', ';', ')', '\'', '"']);
            let name = name.trim_start_matches(['\'', '"', '(']);
            (!name.is_empty()).then(|| name.to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::job::ProfileInput;
    use std::path::PathBuf;

    const LUA_TAIL: &str = "BOLT-INFO: ...\nBOLT-ERROR: unable to get new address corresponding \
                            to input address 0x1c2d0 in function luaV_execute/1\n";

    fn full() -> Rung {
        Rung::first(BoltPlan {
            mode: BoltMode::Relocations,
            split_functions: true,
            skip_funcs: vec![],
            profile: ProfileInput::Fdata(PathBuf::from("p")),
            flag_set: &crate::bolt::flags::DEFAULT_SET,
        })
    }

    fn retry(n: Next) -> Rung {
        match n {
            Next::Retry(r) => r,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_failing_function() {
        assert_eq!(failing_function(LUA_TAIL).as_deref(), Some("luaV_execute/1"));
        assert_eq!(
            failing_function("BOLT-ERROR: bad CFG for function 'foo.cold/2'.\n").as_deref(),
            Some("foo.cold/2")
        );
        assert_eq!(failing_function("Segmentation fault\n"), None);
    }

    #[test]
    fn a_named_function_is_skipped_and_names_accumulate() {
        let r = retry(next_rung(&full(), &FailureKind::ExitCode(1), LUA_TAIL));
        assert_eq!(r.plan.skip_funcs, vec!["luaV_execute/1"]);
        assert!(r.plan.split_functions, "same rung, one function less");
        let r2 = retry(next_rung(&r, &FailureKind::Signal(6), "in function bar/3\n"));
        assert_eq!(r2.plan.skip_funcs, vec!["luaV_execute/1", "bar/3"]);
        assert_eq!(r2.label(), "full, skip luaV_execute/1,bar/3");
        // The same name again means skipping did not help: step down instead.
        let r3 = retry(next_rung(&r2, &FailureKind::ExitCode(1), "in function bar/3\n"));
        assert!(!r3.plan.split_functions);
        assert_eq!(r3.plan.skip_funcs.len(), 2);
    }

    #[test]
    fn unnamed_failures_step_down_to_non_relocation_then_give_up() {
        let r = retry(next_rung(&full(), &FailureKind::Signal(11), "Segmentation fault"));
        assert_eq!(r.label(), "no-split");
        let r = retry(next_rung(&r, &FailureKind::ExitCode(1), ""));
        assert_eq!(r.plan.mode, BoltMode::NonRelocation);
        assert!(!r.plan.split_functions);
        assert!(matches!(next_rung(&r, &FailureKind::ExitCode(1), ""), Next::GiveUp(_)));
    }

    #[test]
    fn verification_failures_step_down_even_when_a_name_appears() {
        let r = retry(next_rung(&full(), &FailureKind::Verification("x".into()), LUA_TAIL));
        assert!(r.plan.skip_funcs.is_empty());
        assert!(!r.plan.split_functions);
    }

    #[test]
    fn timeouts_and_memory_kills_step_down_once() {
        let r = retry(next_rung(&full(), &FailureKind::Timeout, ""));
        assert!(r.resource_step_used);
        assert!(!r.plan.split_functions);
        assert!(matches!(next_rung(&r, &FailureKind::MemoryLimit, ""), Next::GiveUp(_)));
    }

    #[test]
    fn too_many_names_stop_skipping() {
        let mut r = full();
        for i in 0..MAX_SKIPPED {
            r = retry(next_rung(&r, &FailureKind::ExitCode(1), &format!("in function f{i}\n")));
        }
        assert_eq!(r.plan.skip_funcs.len(), MAX_SKIPPED);
        let r = retry(next_rung(&r, &FailureKind::ExitCode(1), "in function g\n"));
        assert!(!r.plan.split_functions, "stepped down instead of skipping a ninth");
    }

    #[test]
    fn shutdown_and_setup_do_not_retry() {
        assert_eq!(next_rung(&full(), &FailureKind::Cancelled, ""), Next::Abandon);
        assert!(matches!(
            next_rung(&full(), &FailureKind::Setup("disk full".into()), ""),
            Next::GiveUp(_)
        ));
    }
}

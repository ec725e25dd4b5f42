//! Instrumentation mode's pieces: how many executions may get the (slower) instrumented
//! variant, and merging what those runs wrote into the catalog.
//!
//! Serving the variant through the mount is the integrator's wiring; this module decides
//! and stores.

use std::path::Path;

use anyhow::Context;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::fdata::EdgeProfile;
use crate::catalog::profiles;

/// How many executions may run instrumented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstrumentationBudget {
    /// The first N executions (after the instrumented variant exists) are instrumented...
    pub first_runs: u64,
    /// ...then 1 in K (0: never after the first N)...
    pub then_one_in: u64,
    /// ...until this many instrumented runs have been collected in total.
    pub max_runs: u64,
}

/// The default budget: the first 5 execs get the instrumented variant, then 1 in 20 (for
/// runs that wrote no profile), until 5 profiles are in. One instrumented run already gave a
/// complete profile here (BOLT from it: Lua 0.93-0.95, SQLite 0.94-0.99 of the original's
/// time, BRIEF.md), while the 1-in-20 phase of the earlier default (3 first, 10 in all)
/// took 6.5 minutes per collected run for Lua on the busy benchmark machine.
impl Default for InstrumentationBudget {
    fn default() -> Self {
        Self { first_runs: 5, then_one_in: 20, max_runs: 5 }
    }
}

/// Instrumented runs slower than this many times the original (median CPU time, same
/// command) stop instrumentation of the binary. Measured here: instrumented Lua, SQLite and
/// ripgrep runs took 2-6x the original's time (BRIEF.md), so 10x is beyond anything seen
/// from a working instrumentation and still bounds what a user can be made to wait.
pub const DEFAULT_MAX_SLOWDOWN: f64 = 10.0;

/// How much slower the instrumented runs are than the original: the median over
/// instrumented runs of (its CPU time / the median CPU time of the original's runs of the
/// same command). `instrumented` and `original` are (command hash, CPU time) of normal
/// exits. None when no instrumented run has an original run of its command to compare with.
pub fn slowdown(instrumented: &[(&str, u64)], original: &[(&str, u64)]) -> Option<f64> {
    let mut by_cmd: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    for (cmd, t) in original {
        by_cmd.entry(cmd).or_default().push(*t);
    }
    let median_of = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let base: std::collections::HashMap<&str, u64> =
        by_cmd.into_iter().map(|(k, mut v)| (k, median_of(&mut v))).collect();
    let mut ratios: Vec<f64> = instrumented
        .iter()
        .filter_map(|(cmd, t)| base.get(cmd).filter(|b| **b > 0).map(|b| *t as f64 / *b as f64))
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(ratios[ratios.len() / 2])
}

/// Whether execution number `exec_index` (0-based, counted since the instrumented variant
/// became available) should get it, given `collected` instrumented runs so far.
pub fn should_instrument(budget: &InstrumentationBudget, exec_index: u64, collected: u64) -> bool {
    if collected >= budget.max_runs {
        return false;
    }
    if exec_index < budget.first_runs {
        return true;
    }
    budget.then_one_in > 0
        && (exec_index - budget.first_runs + 1).is_multiple_of(budget.then_one_in)
}

/// Reads the fdata files one or more instrumented runs wrote, merges them by edge, and
/// adds each file as one run of `binary_id`'s instrumentation profile. Returns the runs
/// added. Files that do not parse are an error (nothing is added from them).
pub fn collect_runs(
    conn: &Connection,
    binary_id: i64,
    files: &[&Path],
    now: i64,
) -> anyhow::Result<u64> {
    let mut runs = Vec::with_capacity(files.len());
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let profile = EdgeProfile::merge([text.as_str()])
            .with_context(|| format!("parsing the instrumentation profile {}", f.display()))?;
        runs.push(profile);
    }
    let tx = conn.unchecked_transaction()?;
    for p in &runs {
        profiles::add_instrumented_run(&tx, binary_id, &p.rows(), now)?;
    }
    tx.commit()?;
    Ok(runs.len() as u64)
}

/// Collects every `*.fdata` file in `dir` (the daemon-only directory an instrumented
/// variant writes to, built with `-instrumentation-file=DIR/prof.fdata
/// -instrumentation-file-append-pid`, which names each run's file `prof.fdata.<pid>.fdata`)
/// as runs of `binary_id`, then deletes them. Returns the runs added.
pub fn collect_dir(conn: &Connection, binary_id: i64, dir: &Path, now: i64) -> anyhow::Result<u64> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_file() && path.extension().is_some_and(|e| e == "fdata") {
            files.push(path);
        }
    }
    files.sort();
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let added = collect_runs(conn, binary_id, &refs, now)?;
    for f in &files {
        std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
    }
    Ok(added)
}

/// Writes the merged instrumentation profile of `binary_id` as fdata.
pub fn write_instrumented_fdata(
    conn: &Connection,
    binary_id: i64,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let rows = profiles::instrumented_edges(conn, binary_id)?;
    anyhow::ensure!(!rows.is_empty(), "binary {binary_id} has no instrumentation profile");
    EdgeProfile::from_rows(&rows).write(out).context("writing the instrumentation profile")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_first_n_then_one_in_k_up_to_a_cap() {
        let b = InstrumentationBudget { first_runs: 2, then_one_in: 3, max_runs: 4 };
        let picked: Vec<u64> = (0..12).filter(|&i| should_instrument(&b, i, 0)).collect();
        assert_eq!(picked, vec![0, 1, 4, 7, 10]);
        assert!(!should_instrument(&b, 0, 4), "cap reached");
        let never_after = InstrumentationBudget { first_runs: 1, then_one_in: 0, max_runs: 9 };
        assert!(should_instrument(&never_after, 0, 0));
        assert!(!should_instrument(&never_after, 1, 0));
    }

    #[test]
    fn slowdown_compares_like_commands_by_medians() {
        let original = [("a", 100), ("a", 120), ("a", 80), ("b", 1000)];
        assert_eq!(slowdown(&[("c", 500)], &original), None, "no original run of c");
        assert_eq!(slowdown(&[("a", 300)], &original), Some(3.0));
        // One run 12x slower, two 2x: the median says 2x (one noisy run does not decide).
        let runs = [("a", 1200), ("b", 2000), ("a", 200)];
        assert_eq!(slowdown(&runs, &original), Some(2.0));
        assert_eq!(slowdown(&[("a", 1500), ("b", 11_000)], &original), Some(15.0));
    }
}

//! Which runs are compared with which: normal exits only, paired adjacent in exec order
//! (by command, or across commands for the budget look).

use super::*;

/// Timed runs (normal exits only: a killed run's CPU time says nothing about speed).
pub(super) fn timed<'a>(runs: impl Iterator<Item = &'a RunInput>) -> Vec<Timed<'a>> {
    runs.filter(|r| matches!(r.exit, RunExit::Exited(_)))
        .map(|r| Timed { cmd: &r.cmd_hash, cpu_ns: r.cpu_ns })
        .collect()
}

/// Pairs normal runs of `variant_id` with normal runs of the original that are adjacent
/// in exec order (run id): walking the runs in id order, a run pairs with the waiting run
/// of its command if that one is of the other arm, and otherwise becomes the waiting run
/// (an older waiting run of the same arm is dropped: it is farther in time from any later
/// partner). Pairs come out in the order they complete, so the first `c` pairs never
/// change as later runs arrive (what makes a look's answer final), and both arms of the
/// first `c` pairs cover the same stretch of time. Runs of other variants are ignored.
///
/// Why only adjacent runs: pairing a streak `V V V O O O` as (V1,O4), (V2,O5), (V3,O6)
/// gives three pairs with the variant first, far apart in time: under a drifting load
/// their differences share one sign and the signed-rank interval is too narrow (the
/// simulation promoted about 10% of equal-speed variants that way). With adjacent runs the
/// order within each pair is a fresh fair coin (random arm assignment), independent of
/// the load, so the pairs' differences are symmetric and independent in sign.
pub fn pair_in_exec_order<'a>(
    runs: impl Iterator<Item = &'a RunInput>,
    variant_id: i64,
    by: PairBy,
) -> Vec<(Timed<'a>, Timed<'a>)> {
    pair_arms(runs, variant_id, None, by)
}

/// As [`pair_in_exec_order`], with the runs of `baseline` (None: the original) as the
/// other arm: a challenger is paired with the served variant.
pub fn pair_arms<'a>(
    runs: impl Iterator<Item = &'a RunInput>,
    variant_id: i64,
    baseline: Option<i64>,
    by: PairBy,
) -> Vec<(Timed<'a>, Timed<'a>)> {
    let mut sorted: Vec<&RunInput> = runs
        .filter(|r| r.variant_id == baseline || r.variant_id == Some(variant_id))
        .filter(|r| matches!(r.exit, RunExit::Exited(_)))
        .collect();
    sorted.sort_by_key(|r| r.id);
    // Per command: the waiting run and whether it is a variant run.
    let mut waiting: HashMap<&str, (Timed<'a>, bool)> = HashMap::new();
    let mut pairs = Vec::new();
    for r in sorted {
        let t = Timed { cmd: &r.cmd_hash, cpu_ns: r.cpu_ns };
        let is_variant = r.variant_id == Some(variant_id);
        let key = match by {
            PairBy::Command => r.cmd_hash.as_str(),
            PairBy::Nothing => "",
        };
        match waiting.remove(key) {
            Some((w, true)) if !is_variant => pairs.push((w, t)),
            Some((w, false)) if is_variant => pairs.push((t, w)),
            _ => {
                waiting.insert(key, (t, is_variant));
            }
        }
    }
    pairs
}

/// What two runs must share to be paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairBy {
    /// The command (the usual pairing: like with like).
    Command,
    /// Nothing: adjacent runs whatever their commands (a canary's final look when commands
    /// rarely repeat).
    Nothing,
}

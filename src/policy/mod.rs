//! The policy: which variant of a binary each exec gets, as a pure function of the
//! catalog's state (variants, measured runs, controls) plus a random draw per exec.
//!
//! Life of a variant: `ready` -> `canary` (served to `canary_fraction` of execs, chosen at
//! random, interleaved with the original so both see the same work) -> `served` (the
//! variant gets all execs but `exploration_share`, which keeps measuring the original) or
//! `rejected`; any state -> `quarantined` on a crash the original does not have.
//!
//! Promotion is decided with [`stats::paired_compare`] on time-adjacent pairs (a variant run
//! and an original run of the same command next to each other in exec order, see
//! [`pair_in_exec_order`]: the noise on a shared machine is correlated in time, and a pair
//! cancels the load both its runs saw) at a few fixed looks: when there are `m, 2m, 4m, ...`
//! pairs (m = `min_runs_per_arm`, `looks` of them), using exactly the first that many pairs,
//! so re-evaluating between looks cannot change the answer.
//! Each look tests at one-sided level `alpha / (looks + 1)`; the extra share is for one more
//! look a canary may need: when the variant has had [`canary_run_budget`] runs and the
//! looks by command have not decided (its commands rarely repeat, so few runs pair), the
//! runs up to that budget are paired adjacent in exec order whatever their commands and
//! looked at once, promoting or rejecting. By the union bound the chance that an
//! equal-speed variant is ever promoted is at most `alpha` (the stated false-promotion
//! bound), and promotion also needs the estimate to show at least `promote_min_gain` and,
//! against the original, a saving per run above what serving through the mount adds to an
//! exec (`serving_cost_us`; below it the binary is faster run natively). A
//! variant that is significantly slower is rejected at any look; one not shown faster at the
//! last look is rejected as indistinguishable. In steady state each exploration run of the
//! original pairs with the variant's run next to it in exec order; each time `2m` more such
//! pairs have accumulated, that block is tested like a look, and a variant now
//! significantly slower goes back to canary (drift reverses the decision through the same
//! bounded procedure). A block of an equal-speed variant sends it back with probability at
//! most `alpha / (looks + 1)`: a false alarm costs one more canary, never a wrong promotion.
//! The gain status shows is the paired estimate over the newest pairs since the canary
//! started.
//!
//! Safety (evaluated first, on every run): a variant run killed by SIGSEGV, SIGILL, SIGBUS,
//! SIGFPE or SIGABRT on a command whose original runs never died of that signal (including
//! a command the original has not run yet: safety first) quarantines the variant at once.
//! An exit code the original never gave for that command (when the original has runs of
//! it) is a strike: exit codes also depend on input (grep's 1 for "no match"), so a single
//! one is weak evidence; `suspicious_exit_strikes` strikes quarantine the variant.
//! A variant whose stdout or exit status differed from the original's on a training command
//! (the training check, `crate::train::check`, records it; the original agreed with itself)
//! is rejected at once from `ready`, `canary` or `served`, with the check's reason.
//!
//! Controls override the measured choice per path: an excluded path always gets the
//! original; a pin to `original` always the original; a pin to `bolted` always the best
//! usable variant (never a quarantined one, nor one whose output differed: if none is
//! usable, the original).
//!
//! Here: [`evaluate`] and [`decide`]. Their parts: `model` (what goes in and comes out),
//! `safety`, `pairing`, `canary`, `challenger` and `steady` (the served state).

mod canary;
mod challenger;
pub mod instrumented;
pub mod load;
mod model;
mod pairing;
mod safety;
pub mod settings;
pub mod sim;
pub mod stats;
mod steady;
pub mod task;

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A variant's state as stored in the catalog's `variants.state`.
pub use crate::catalog::variant::VariantState;
use crate::measure::RunExit;
pub use settings::Settings;
pub use stats::Comparison;
use stats::{Timed, normal_quantile, paired_compare};

pub use canary::*;
pub use challenger::*;
pub use model::*;
pub use pairing::*;
pub use safety::*;
use steady::*;

/// What a served exec costs over a native one on the project's 2-core VM: 1.12-1.17x of a
/// 0.9-1.0 ms exec+exit of a small program in the overlay benchmark (docs/mount.md).
pub const DEFAULT_SERVING_COST_US: u64 = 150;

/// Once a variant is served, one run in 8 gets counters: the counters are most of what
/// serving adds to an exec (the overlay benchmark, 2026-12-03: a build that counted one
/// run in 8 served a variant at 1.106 and 1.124 of native against 1.207 and 1.188 counting
/// every run), and a served variant's drift check and shown gain need no more than a
/// sample. Every run is still followed to its exit, so crashes are caught at once.
pub const DEFAULT_SERVED_COUNT_ONE_IN: u32 = 8;

/// The policy's knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// Share of execs a canary variant gets.
    pub canary_fraction: f64,
    /// Runs per arm at the first look; later looks at 2x, 4x, ...
    pub min_runs_per_arm: usize,
    /// Number of looks; the last is at `min_runs_per_arm * 2^(looks-1)` runs per arm, after
    /// which an undecided variant is rejected.
    pub looks: u32,
    /// Bound on the probability of promoting an equal-speed variant (split over the looks).
    pub alpha: f64,
    /// Minimum estimated gain to promote (0.02 = 2% less CPU time).
    pub promote_min_gain: f64,
    /// Share of execs that keep going to the original while a variant is served.
    pub exploration_share: f64,
    /// Suspicious exit codes that quarantine a variant.
    pub suspicious_exit_strikes: usize,
    /// What serving a binary through the mount adds to each exec, in microseconds (the
    /// `OPEN` round trip and the run's counters, see docs/mount.md). A variant is promoted
    /// over the original only if it saves more CPU time per run than this; below it the
    /// binary is faster run natively. 0: no such floor.
    pub serving_cost_us: u64,
    /// One run in this many of a served (promoted) variant's binary gets counters; the rest
    /// are followed for their exit only (see [`DEFAULT_SERVED_COUNT_ONE_IN`]).
    pub served_count_one_in: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            canary_fraction: 0.5,
            min_runs_per_arm: 20,
            looks: 5,
            alpha: 0.05,
            promote_min_gain: 0.02,
            exploration_share: 0.05,
            suspicious_exit_strikes: 2,
            serving_cost_us: DEFAULT_SERVING_COST_US,
            served_count_one_in: DEFAULT_SERVED_COUNT_ONE_IN,
        }
    }
}

impl PolicyConfig {
    /// Runs per arm at each look.
    pub fn checkpoints(&self) -> Vec<usize> {
        let m = self.min_runs_per_arm.max(1);
        (0..self.looks.max(1)).map(|k| m << k).collect()
    }

    /// Checks the knobs are in range (for the config loader).
    pub fn validate(&self) -> anyhow::Result<()> {
        let share = |name: &str, v: f64| {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "policy.{name} must be within 0..=1, not {v}"
            );
            Ok(())
        };
        share("canary_fraction", self.canary_fraction)?;
        share("exploration_share", self.exploration_share)?;
        share("promote_min_gain", self.promote_min_gain)?;
        anyhow::ensure!(
            self.alpha > 0.0 && self.alpha < 0.5,
            "policy.alpha must be within 0..0.5, not {}",
            self.alpha
        );
        anyhow::ensure!(self.min_runs_per_arm >= 5, "policy.min_runs_per_arm must be at least 5");
        anyhow::ensure!((1..=10).contains(&self.looks), "policy.looks must be within 1..=10");
        anyhow::ensure!(
            self.suspicious_exit_strikes >= 1,
            "policy.suspicious_exit_strikes must be >= 1"
        );
        Ok(())
    }

    /// The stated bound on false promotions of an equal-speed variant.
    pub fn false_promotion_bound(&self) -> f64 {
        self.alpha
    }

    /// The one-sided level of each test: `alpha` split over the looks and the final
    /// across-commands look of a canary whose commands rarely repeat.
    pub fn level_per_look(&self) -> f64 {
        self.alpha / f64::from(self.looks.max(1) + 1)
    }

    fn z_per_look(&self) -> f64 {
        normal_quantile(1.0 - self.level_per_look())
    }
}

/// Evaluates one binary: safety first, then the canary or steady-state decision.
pub fn evaluate(input: &BinaryInput, cfg: &PolicyConfig) -> Evaluation {
    let mut states: HashMap<i64, VariantState> =
        input.variants.iter().map(|v| (v.id, v.state)).collect();
    let mut transitions = Vec::new();
    let incidents = safety_incidents(input, cfg);
    for inc in &incidents {
        let from = states[&inc.variant_id];
        states.insert(inc.variant_id, VariantState::Quarantined);
        transitions.push(Transition {
            variant_id: inc.variant_id,
            from,
            to: VariantState::Quarantined,
            action: Action::Quarantine,
            detail: inc.detail.clone(),
            first_run_id: None,
            comparison: None,
        });
    }

    reject_output_mismatches(input, &mut states, &mut transitions);

    let newest_in = |states: &HashMap<i64, VariantState>, s: VariantState| {
        input.variants.iter().rev().find(|v| states[&v.id] == s)
    };

    // A variant in canary wins over a served one (the served one resumes if it is rejected).
    let mut stage_serve = None;
    // The variant a challenger is measured against: the served one.
    let served_id = |states: &HashMap<i64, VariantState>, v: &VariantInput| {
        input
            .variants
            .iter()
            .rev()
            .find(|o| o.id != v.id && states[&o.id] == VariantState::Served)
            .map(|o| o.id)
    };
    if let Some(v) = newest_in(&states, VariantState::Canary) {
        let from = v.canary_from_run.unwrap_or(0);
        let step = match (v.challenger, served_id(&states, v)) {
            (true, Some(served)) => {
                challenger_step(input, v, served, from, cfg, &mut states, &mut transitions)
            }
            (true, None) => {
                reject_orphan(v, VariantState::Canary, &mut states, &mut transitions);
                None
            }
            (false, _) => Some(canary_step(input, v, from, cfg, &mut states, &mut transitions)),
        };
        if matches!(states[&v.id], VariantState::Canary | VariantState::Served) {
            stage_serve = step;
        }
    } else if let Some(v) = newest_in(&states, VariantState::Ready) {
        let served = served_id(&states, v);
        if v.challenger && served.is_none() {
            reject_orphan(v, VariantState::Ready, &mut states, &mut transitions);
        } else {
            states.insert(v.id, VariantState::Canary);
            let detail = match (v.challenger, served) {
                (true, Some(s)) => format!(
                    "challenger of variant {s}: {:.0}% of execs",
                    challenger_share(cfg) * 100.0
                ),
                _ => format!("canary: {:.0}% of execs", cfg.canary_fraction * 100.0),
            };
            transitions.push(Transition {
                variant_id: v.id,
                from: VariantState::Ready,
                to: VariantState::Canary,
                action: Action::StartCanary,
                detail,
                first_run_id: Some(input.next_run_id),
                comparison: None,
            });
            stage_serve = Some(match (v.challenger, served) {
                (true, Some(s)) => challenge_stage(s, v.id, 0, 0, None, cfg),
                _ => canary_stage(v.id, 0, 0, None, cfg),
            });
        }
    }
    if stage_serve.is_none()
        && let Some(v) = newest_in(&states, VariantState::Served)
    {
        stage_serve = Some(served_step(input, v, cfg, &mut states, &mut transitions));
    }
    let (stage, serve) = match stage_serve {
        Some(s) => s,
        None => (resting_stage(input, &states, &transitions), ServeDecision::Original),
    };
    let pin_target = [
        VariantState::Served,
        VariantState::Canary,
        VariantState::Ready,
        VariantState::Rejected,
        VariantState::Retired,
    ]
    .iter()
    .find_map(|s| {
        input.variants.iter().rev().find(|v| states[&v.id] == *s && v.output_mismatch.is_none())
    })
    .map(|v| v.id);
    Evaluation { transitions, incidents, stage, serve, pin_target, states }
}

/// Rejects every variant still in play whose output differed from the original's on a
/// training command: a wrong answer is never served, whatever its speed.
fn reject_output_mismatches(
    input: &BinaryInput,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) {
    for v in &input.variants {
        let Some(why) = &v.output_mismatch else { continue };
        let from = states[&v.id];
        if !matches!(from, VariantState::Ready | VariantState::Canary | VariantState::Served) {
            continue;
        }
        reject_without_comparison(v.id, from, why.clone(), states, transitions);
    }
}

/// Applies a path's controls to an evaluation: the stage status shows and what to serve.
pub fn decide(eval: &Evaluation, controls: &Controls) -> (Stage, ServeDecision) {
    if controls.excluded {
        return (Stage::Excluded, ServeDecision::Original);
    }
    match controls.pin {
        Some(Pin::Original) => {
            (Stage::Pinned { pin: Pin::Original, variant_id: None }, ServeDecision::Original)
        }
        Some(Pin::Bolted) => {
            let serve = eval.pin_target.map_or(ServeDecision::Original, ServeDecision::Variant);
            (Stage::Pinned { pin: Pin::Bolted, variant_id: eval.pin_target }, serve)
        }
        None => (eval.stage.clone(), eval.serve),
    }
}

fn canary_stage(
    variant_id: i64,
    variant_runs: usize,
    original_runs: usize,
    last: Option<Comparison>,
    cfg: &PolicyConfig,
) -> (Stage, ServeDecision) {
    (
        Stage::Canary { variant_id, variant_runs, original_runs, last },
        ServeDecision::Split { variant_id, variant_share: cfg.canary_fraction },
    )
}

/// A challenger with no served variant left to measure against (it was quarantined,
/// drifted or unpinned meanwhile) is rejected: it was never measured against the original.
fn reject_orphan(
    v: &VariantInput,
    from: VariantState,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) {
    let why = "challenger without a served variant to measure against".to_string();
    reject_without_comparison(v.id, from, why, states, transitions);
}

/// Rejects a variant for a reason other than a measured comparison.
fn reject_without_comparison(
    variant_id: i64,
    from: VariantState,
    detail: String,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) {
    states.insert(variant_id, VariantState::Rejected);
    transitions.push(Transition {
        variant_id,
        from,
        to: VariantState::Rejected,
        action: Action::Reject,
        detail,
        first_run_id: None,
        comparison: None,
    });
}

/// CPU time saved by a served variant: its runs took `variant_cpu_ns` in total; the
/// original would have taken `variant_cpu_ns / ratio`. Zero when the ratio shows no gain.
pub fn cpu_saved_ns(variant_cpu_ns: u64, ratio: f64) -> u64 {
    if !(ratio > 0.0 && ratio < 1.0) {
        return 0;
    }
    (variant_cpu_ns as f64 * (1.0 / ratio - 1.0)) as u64
}

#[cfg(test)]
mod tests;

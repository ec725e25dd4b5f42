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

pub mod instrumented;
pub mod load;
pub mod settings;
pub mod sim;
pub mod stats;
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

/// Signals that mean "the program crashed" (as opposed to being stopped by its user).
pub const CRASH_SIGNALS: [i32; 5] =
    [libc::SIGSEGV, libc::SIGILL, libc::SIGBUS, libc::SIGFPE, libc::SIGABRT];

/// Pairs the served variant's measured gain is computed from (the newest; the estimate's
/// cost is quadratic in them).
const GAIN_PAIRS: usize = 200;

/// What a served exec costs over a native one on the project's 2-core VM: 1.12-1.17x of a
/// 0.9-1.0 ms exec+exit of a small program in the overlay benchmark (docs/mount.md).
pub const DEFAULT_SERVING_COST_US: u64 = 150;

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

/// A variant as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantInput {
    pub id: i64,
    pub state: VariantState,
    /// First run id of its current canary period (from the decision log).
    pub canary_from_run: Option<i64>,
    /// First run id of its current served period.
    pub served_from_run: Option<i64>,
    pub note: Option<String>,
    /// Built by the flag search with another flag set: its canary is measured against the
    /// served variant, not the original (see [`challenger_step`]).
    pub challenger: bool,
    /// Why its output differed from the original's on a training command, if it did (the
    /// training check's record): it is rejected and never a pin's target.
    pub output_mismatch: Option<String>,
}

/// A measured run as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInput {
    pub id: i64,
    pub variant_id: Option<i64>,
    pub cmd_hash: String,
    pub cpu_ns: u64,
    pub exit: RunExit,
}

/// Where the optimizing pipeline is for a binary (told by the profile and BOLT subsystems).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Pipeline {
    #[default]
    Seen,
    Collecting,
    Queued,
    Optimizing,
    BoltFailed(String),
    NotCandidate(String),
}

/// Everything the policy needs about one binary.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BinaryInput {
    pub binary_id: i64,
    /// Ordered by id (oldest first).
    pub variants: Vec<VariantInput>,
    /// Ordered by id (oldest first).
    pub runs: Vec<RunInput>,
    pub pipeline: Pipeline,
    /// The id the next stored run will get (where a new canary period starts).
    pub next_run_id: i64,
}

/// A user's pin: the catalog's stored word, the control file's target and the policy's
/// input are this one enum.
pub use crate::catalog::variant::Pin;

/// The user's controls over one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Controls {
    pub pin: Option<Pin>,
    pub excluded: bool,
}

/// What a transition does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    StartCanary,
    Promote,
    Reject,
    Quarantine,
    Retire,
    /// Drift: a served variant goes back to canary.
    Recanary,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StartCanary => "start_canary",
            Self::Promote => "promote",
            Self::Reject => "reject",
            Self::Quarantine => "quarantine",
            Self::Retire => "retire",
            Self::Recanary => "recanary",
        }
    }
}

/// A state change the policy asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub variant_id: i64,
    pub from: VariantState,
    pub to: VariantState,
    pub action: Action,
    pub detail: String,
    /// Where the new period starts (canary and served periods).
    pub first_run_id: Option<i64>,
    pub comparison: Option<Comparison>,
}

impl Transition {
    /// A canary's end by a look's verdict (`k`); a promotion starts the served period at
    /// the next run.
    fn canary_decided(
        input: &BinaryInput,
        variant_id: i64,
        to: VariantState,
        action: Action,
        detail: String,
        k: Comparison,
    ) -> Self {
        Transition {
            variant_id,
            from: VariantState::Canary,
            to,
            action,
            detail,
            first_run_id: (to == VariantState::Served).then_some(input.next_run_id),
            comparison: Some(k),
        }
    }
}

/// Why a variant was quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    Crash,
    SuspiciousExit,
}

impl IncidentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::SuspiciousExit => "suspicious_exit",
        }
    }
}

/// A quarantine record.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub variant_id: i64,
    pub run_id: i64,
    pub cmd_hash: String,
    pub exit: RunExit,
    pub kind: IncidentKind,
    pub detail: String,
}

/// A binary's stage, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Seen,
    Collecting,
    Queued,
    Optimizing,
    Canary {
        variant_id: i64,
        variant_runs: usize,
        original_runs: usize,
        /// The comparison at the latest look, if one happened.
        last: Option<Comparison>,
    },
    ServingOptimized {
        variant_id: i64,
        gain: Option<Comparison>,
    },
    /// A variant is served and a challenger (another flag set) is measured against it.
    Challenge {
        served_id: i64,
        challenger_id: i64,
        challenger_runs: usize,
        served_runs: usize,
        /// The challenger against the served variant at the latest look, if one happened.
        last: Option<Comparison>,
    },
    ServingOriginal {
        reason: String,
    },
    Crashed {
        variant_id: i64,
        detail: String,
    },
    BoltFailed(String),
    NotCandidate(String),
    Excluded,
    Pinned {
        pin: Pin,
        variant_id: Option<i64>,
    },
}

impl Stage {
    /// The stage's name as `status.json` keys it (`canary`, `serving_optimized`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Seen => "seen",
            Stage::Collecting => "collecting",
            Stage::Queued => "queued",
            Stage::Optimizing => "optimizing",
            Stage::Canary { .. } => "canary",
            Stage::Challenge { .. } => "challenge",
            Stage::ServingOptimized { .. } => "serving_optimized",
            Stage::ServingOriginal { .. } => "serving_original",
            Stage::Crashed { .. } => "crashed",
            Stage::BoltFailed(_) => "bolt_failed",
            Stage::NotCandidate(_) => "not_candidate",
            Stage::Excluded => "excluded",
            Stage::Pinned { .. } => "pinned",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Seen => f.write_str("seen"),
            Stage::Collecting => f.write_str("collecting"),
            Stage::Queued => f.write_str("queued"),
            Stage::Optimizing => f.write_str("optimizing"),
            Stage::Canary { variant_id, variant_runs, original_runs, last } => {
                write!(
                    f,
                    "canary (variant {variant_id}: {variant_runs} runs vs {original_runs} original"
                )?;
                if let Some(c) = last {
                    write!(f, "; so far {}", c.describe())?;
                }
                f.write_str(")")
            }
            Stage::ServingOptimized { variant_id, gain } => match gain {
                Some(g) => write!(f, "serving optimized (variant {variant_id}, {})", g.describe()),
                None => write!(f, "serving optimized (variant {variant_id})"),
            },
            Stage::Challenge { served_id, challenger_id, challenger_runs, served_runs, last } => {
                write!(
                    f,
                    "serving optimized (variant {served_id}); challenger {challenger_id}: \
                     {challenger_runs} runs vs {served_runs} of variant {served_id}"
                )?;
                if let Some(c) = last {
                    write!(f, "; so far {}", c.describe())?;
                }
                Ok(())
            }
            Stage::ServingOriginal { reason } => write!(f, "serving original: {reason}"),
            Stage::Crashed { variant_id, detail } => {
                write!(f, "serving original: variant {variant_id} crashed ({detail})")
            }
            Stage::BoltFailed(why) => write!(f, "BOLT failed: {why}"),
            // The optimizer's reasons already say "not a candidate: ...".
            Stage::NotCandidate(why) if why.starts_with("not a candidate") => f.write_str(why),
            Stage::NotCandidate(why) => write!(f, "not a candidate: {why}"),
            Stage::Excluded => f.write_str("excluded"),
            Stage::Pinned { pin: Pin::Original, .. } => f.write_str("pinned to the original"),
            Stage::Pinned { pin: Pin::Bolted, variant_id: Some(v) } => {
                write!(f, "pinned to bolted (variant {v})")
            }
            Stage::Pinned { pin: Pin::Bolted, variant_id: None } => {
                f.write_str("pinned to bolted, but no usable variant: serving the original")
            }
        }
    }
}

/// What the overlay serves for a path; the per-exec choice is [`ServeDecision::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeDecision {
    Original,
    Variant(i64),
    /// The variant for a `variant_share` fraction of execs, the original for the rest.
    Split {
        variant_id: i64,
        variant_share: f64,
    },
    /// A challenger's canary: the challenger for `challenger_share` of execs, the original
    /// for `original_share` (exploration: the served gain stays measured), the served
    /// variant for the rest.
    Challenge {
        served: i64,
        challenger: i64,
        challenger_share: f64,
        original_share: f64,
    },
}

impl ServeDecision {
    /// The variant an exec gets (None: the original), given a uniform draw in [0, 1).
    pub fn choose(&self, draw: f64) -> Option<i64> {
        match *self {
            ServeDecision::Original => None,
            ServeDecision::Variant(v) => Some(v),
            ServeDecision::Split { variant_id, variant_share } => {
                (draw < variant_share).then_some(variant_id)
            }
            ServeDecision::Challenge { served, challenger, challenger_share, original_share } => {
                if draw < challenger_share {
                    Some(challenger)
                } else if draw < 1.0 - original_share {
                    Some(served)
                } else {
                    None
                }
            }
        }
    }
}

/// The outcome of evaluating one binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub transitions: Vec<Transition>,
    pub incidents: Vec<Incident>,
    /// The stage without controls applied.
    pub stage: Stage,
    /// What to serve without controls applied.
    pub serve: ServeDecision,
    /// What a pin to `bolted` serves: the best variant that is not quarantined.
    pub pin_target: Option<i64>,
    /// Variant states after the transitions.
    pub states: HashMap<i64, VariantState>,
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

/// Timed runs (normal exits only: a killed run's CPU time says nothing about speed).
fn timed<'a>(runs: impl Iterator<Item = &'a RunInput>) -> Vec<Timed<'a>> {
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

/// The variant runs after which a canary that has not reached its last look by command
/// gets one final look across commands: twice the last look's pairs.
pub fn canary_run_budget(cfg: &PolicyConfig) -> usize {
    2 * cfg.checkpoints().last().copied().unwrap_or(1)
}

fn canary_step(
    input: &BinaryInput,
    v: &VariantInput,
    from_run: i64,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> (Stage, ServeDecision) {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let var_runs = timed(window().filter(|r| r.variant_id == Some(v.id))).len();
    let orig_runs = timed(window().filter(|r| r.variant_id.is_none())).len();
    let (verdict, last) = look_verdict(input, v, None, from_run, cfg);
    let Some(verdict) = verdict else {
        return canary_stage(v.id, var_runs, orig_runs, last, cfg);
    };

    let mut decide_to = |to: VariantState, action: Action, detail: String, k: Comparison| {
        states.insert(v.id, to);
        transitions.push(Transition::canary_decided(input, v.id, to, action, detail, k));
    };
    match verdict {
        Verdict::Promote(k) => {
            decide_to(
                VariantState::Served,
                Action::Promote,
                format!("promoted: {}", k.describe()),
                k,
            );
            let served_before: Vec<i64> = input
                .variants
                .iter()
                .filter(|o| o.id != v.id && states[&o.id] == VariantState::Served)
                .map(|o| o.id)
                .collect();
            for old in served_before {
                states.insert(old, VariantState::Retired);
                transitions.push(Transition {
                    variant_id: old,
                    from: VariantState::Served,
                    to: VariantState::Retired,
                    action: Action::Retire,
                    detail: format!("replaced by variant {}", v.id),
                    first_run_id: None,
                    comparison: None,
                });
            }
            (
                Stage::ServingOptimized { variant_id: v.id, gain: Some(k) },
                ServeDecision::Split {
                    variant_id: v.id,
                    variant_share: 1.0 - cfg.exploration_share,
                },
            )
        }
        Verdict::Reject(k, reason) => {
            decide_to(VariantState::Rejected, Action::Reject, reason.clone(), k);
            (Stage::ServingOriginal { reason }, ServeDecision::Original)
        }
    }
}

/// The canary's verdict at its latest look (None: undecided), with the comparison of that
/// look: the variant's runs since `from_run` paired with `baseline`'s (None: the
/// original's) at the looks of [`PolicyConfig::checkpoints`], then the budget look.
fn look_verdict(
    input: &BinaryInput,
    v: &VariantInput,
    baseline: Option<i64>,
    from_run: i64,
    cfg: &PolicyConfig,
) -> (Option<Verdict>, Option<Comparison>) {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let pairs = pair_arms(window(), v.id, baseline, PairBy::Command);
    let checkpoints = cfg.checkpoints();
    let look = checkpoints.iter().rposition(|&c| c <= pairs.len());
    let by_command = look.map(|look| {
        let c = checkpoints[look];
        (c, look + 1 == checkpoints.len(), paired_compare(&pairs[..c], cfg.z_per_look()))
    });
    let verdict = match by_command {
        Some((c, _, Some(k))) if promotes(&k, cfg) => {
            Some(promote_if_worth_serving(k, &pairs[..c], baseline, cfg))
        }
        Some((_, _, Some(k))) if k.low > 1.0 => Some(Verdict::Reject(k, k.describe())),
        Some((c, true, Some(k))) => Some(Verdict::Reject(
            k,
            format!("not faster beyond noise after {c} runs per arm: {}", k.describe()),
        )),
        _ => None,
    };
    let verdict = verdict.or_else(|| budget_look(input, v, baseline, from_run, pairs.len(), cfg));
    (verdict, by_command.and_then(|(_, _, k)| k))
}

/// The share of execs a challenger gets: the canary share of what exploration leaves.
pub fn challenger_share(cfg: &PolicyConfig) -> f64 {
    cfg.canary_fraction * (1.0 - cfg.exploration_share)
}

fn challenge_stage(
    served_id: i64,
    challenger_id: i64,
    challenger_runs: usize,
    served_runs: usize,
    last: Option<Comparison>,
    cfg: &PolicyConfig,
) -> (Stage, ServeDecision) {
    (
        Stage::Challenge { served_id, challenger_id, challenger_runs, served_runs, last },
        ServeDecision::Challenge {
            served: served_id,
            challenger: challenger_id,
            challenger_share: challenger_share(cfg),
            original_share: cfg.exploration_share,
        },
    )
}

/// A challenger's canary: its runs paired with the served variant's, decided at the same
/// looks and level as any canary. Promoted (clearly faster than the served variant, by at
/// least `promote_min_gain`): it is served and the old one retired. Rejected (slower, or
/// not faster beyond the noise at the last look): the served variant goes on (None).
fn challenger_step(
    input: &BinaryInput,
    v: &VariantInput,
    served: i64,
    from_run: i64,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> Option<(Stage, ServeDecision)> {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let arm_runs = |id: i64| timed(window().filter(|r| r.variant_id == Some(id))).len();
    let (verdict, last) = look_verdict(input, v, Some(served), from_run, cfg);
    let Some(verdict) = verdict else {
        return Some(challenge_stage(served, v.id, arm_runs(v.id), arm_runs(served), last, cfg));
    };
    let (to, action, detail, k) = match verdict {
        Verdict::Promote(k) => (
            VariantState::Served,
            Action::Promote,
            format!("promoted over variant {served}: {}", k.describe()),
            k,
        ),
        Verdict::Reject(k, reason) => (
            VariantState::Rejected,
            Action::Reject,
            format!("against variant {served}: {reason}"),
            k,
        ),
    };
    states.insert(v.id, to);
    transitions.push(Transition::canary_decided(input, v.id, to, action, detail, k));
    if to != VariantState::Served {
        return None;
    }
    states.insert(served, VariantState::Retired);
    transitions.push(Transition {
        variant_id: served,
        from: VariantState::Served,
        to: VariantState::Retired,
        action: Action::Retire,
        detail: format!("replaced by challenger {}", v.id),
        first_run_id: None,
        comparison: None,
    });
    // The new variant's gain against the original is measured from here on (exploration).
    Some((
        Stage::ServingOptimized { variant_id: v.id, gain: None },
        ServeDecision::Split { variant_id: v.id, variant_share: 1.0 - cfg.exploration_share },
    ))
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

/// What a look decided.
enum Verdict {
    Promote(Comparison),
    /// With the reason status shows.
    Reject(Comparison, String),
}

/// The fewest pairs a promotion is made on, whatever `min_runs_per_arm` says. Two
/// byte-identical files can differ by 1-2% for as long as their pages stay cached (see
/// docs/policy.md); over a few pairs such an offset plus noise easily shows as a 2% gain
/// (real equal-speed canaries were promoted at 10 pairs, none of 40 with looks from 20).
pub const MIN_PAIRS_TO_PROMOTE: usize = 20;

/// Faster beyond the noise, by at least `promote_min_gain`, on enough pairs.
fn promotes(k: &Comparison, cfg: &PolicyConfig) -> bool {
    k.high < 1.0 && k.ratio <= 1.0 - cfg.promote_min_gain && k.variant_runs >= MIN_PAIRS_TO_PROMOTE
}

/// A variant faster than the original beyond the noise is still not worth serving when it
/// saves less CPU time per run than serving through the mount adds to each exec
/// (`serving_cost_us`): the binary is then faster run natively, so it is rejected with both
/// figures. Against a served variant (`baseline` is Some) both arms pay that cost and only
/// the ratio counts.
fn promote_if_worth_serving(
    k: Comparison,
    pairs: &[(Timed<'_>, Timed<'_>)],
    baseline: Option<i64>,
    cfg: &PolicyConfig,
) -> Verdict {
    if baseline.is_some() {
        return Verdict::Promote(k);
    }
    let saved_ns = saving_per_run_ns(&k, pairs);
    if saved_ns >= cfg.serving_cost_us as f64 * 1e3 {
        return Verdict::Promote(k);
    }
    let reason = format!(
        "{}, but that saves {:.0} us per run, less than serving through the mount adds to an \
         exec ({} us): faster run natively",
        k.describe(),
        saved_ns / 1e3,
        cfg.serving_cost_us
    );
    Verdict::Reject(k, reason)
}

/// The CPU time a variant saves per run: the original arm's median over `pairs` (variant,
/// original) times the estimated gain.
fn saving_per_run_ns(k: &Comparison, pairs: &[(Timed<'_>, Timed<'_>)]) -> f64 {
    let mut original: Vec<f64> = pairs.iter().map(|(_, o)| o.cpu_ns as f64).collect();
    stats::median(&mut original).unwrap_or(0.0) * (1.0 - k.ratio)
}

/// The final look of a canary whose commands rarely repeat: once the variant has had
/// [`canary_run_budget`] runs and the looks by command have not decided, the runs up to
/// that budget are paired adjacent in exec order whatever their commands, and compared at
/// the same level as a look. Valid because the arms are assigned at random per exec, so a
/// pair's two commands are exchangeable; noisier, because different commands cost
/// differently. Promoted if faster beyond the noise, else rejected: a variant not shown
/// faster is not served.
fn budget_look(
    input: &BinaryInput,
    v: &VariantInput,
    baseline: Option<i64>,
    from_run: i64,
    pairs_by_command: usize,
    cfg: &PolicyConfig,
) -> Option<Verdict> {
    let budget = canary_run_budget(cfg);
    // The id of the variant's budget-th timed run: the look uses exactly the runs up to it,
    // so evaluating it again later gives the same answer.
    let end = input
        .runs
        .iter()
        .filter(|r| r.id >= from_run && r.variant_id == Some(v.id))
        .filter(|r| matches!(r.exit, RunExit::Exited(_)))
        .nth(budget - 1)?
        .id;
    let upto = || input.runs.iter().filter(|r| r.id >= from_run && r.id <= end);
    let pairs = pair_arms(upto(), v.id, baseline, PairBy::Nothing);
    let k = paired_compare(&pairs, cfg.z_per_look())?;
    if promotes(&k, cfg) {
        return Some(promote_if_worth_serving(k, &pairs, baseline, cfg));
    }
    let reason = format!(
        "commands rarely repeat ({pairs_by_command} runs paired by command in {budget} \
         variant runs); across commands: {}",
        k.describe()
    );
    Some(Verdict::Reject(k, reason))
}

fn served_step(
    input: &BinaryInput,
    v: &VariantInput,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> (Stage, ServeDecision) {
    let serve =
        ServeDecision::Split { variant_id: v.id, variant_share: 1.0 - cfg.exploration_share };
    // The measured gain: the newest time-adjacent pairs since the canary started (the
    // canary's pairs, then each exploration run of the original with its neighbour).
    let since = v.canary_from_run.or(v.served_from_run).unwrap_or(0);
    let pairs =
        pair_in_exec_order(input.runs.iter().filter(|r| r.id >= since), v.id, PairBy::Command);
    let gain = paired_compare(newest(&pairs), normal_quantile(0.975));
    // Drift: the latest full block of 2m pairs of the served period, tested like a look.
    let served_from = v.served_from_run.unwrap_or(since);
    let served_pairs = pair_in_exec_order(
        input.runs.iter().filter(|r| r.id >= served_from),
        v.id,
        PairBy::Command,
    );
    let block = 2 * cfg.min_runs_per_arm.max(1);
    let blocks = served_pairs.len() / block;
    if blocks > 0
        && let Some(k) =
            paired_compare(&served_pairs[(blocks - 1) * block..blocks * block], cfg.z_per_look())
        && k.low > 1.0
    {
        states.insert(v.id, VariantState::Canary);
        transitions.push(Transition {
            variant_id: v.id,
            from: VariantState::Served,
            to: VariantState::Canary,
            action: Action::Recanary,
            detail: format!("drift: now {}; measuring again", k.describe()),
            first_run_id: Some(input.next_run_id),
            comparison: Some(k),
        });
        return canary_stage(v.id, 0, 0, None, cfg);
    }
    (Stage::ServingOptimized { variant_id: v.id, gain }, serve)
}

/// The newest [`GAIN_PAIRS`] pairs.
fn newest<'a, 'b>(t: &'b [(Timed<'a>, Timed<'a>)]) -> &'b [(Timed<'a>, Timed<'a>)] {
    &t[t.len().saturating_sub(GAIN_PAIRS)..]
}

/// The stage of a binary with no active variant.
fn resting_stage(
    input: &BinaryInput,
    states: &HashMap<i64, VariantState>,
    transitions: &[Transition],
) -> Stage {
    if matches!(input.pipeline, Pipeline::Queued | Pipeline::Optimizing) {
        return pipeline_stage(&input.pipeline);
    }
    let last_outcome = input
        .variants
        .iter()
        .rev()
        .find(|v| matches!(states[&v.id], VariantState::Quarantined | VariantState::Rejected));
    if let Some(v) = last_outcome {
        let detail = transitions
            .iter()
            .rev()
            .find(|t| t.variant_id == v.id)
            .map(|t| t.detail.clone())
            .or_else(|| v.note.clone())
            .unwrap_or_default();
        return match states[&v.id] {
            VariantState::Quarantined => Stage::Crashed { variant_id: v.id, detail },
            _ => Stage::ServingOriginal { reason: detail },
        };
    }
    pipeline_stage(&input.pipeline)
}

fn pipeline_stage(p: &Pipeline) -> Stage {
    match p {
        Pipeline::Seen => Stage::Seen,
        Pipeline::Collecting => Stage::Collecting,
        Pipeline::Queued => Stage::Queued,
        Pipeline::Optimizing => Stage::Optimizing,
        Pipeline::BoltFailed(w) => Stage::BoltFailed(w.clone()),
        Pipeline::NotCandidate(w) => Stage::NotCandidate(w.clone()),
    }
}

/// Crash and exit-code checks of every variant not yet quarantined.
fn safety_incidents(input: &BinaryInput, cfg: &PolicyConfig) -> Vec<Incident> {
    #[derive(Default)]
    struct Seen {
        signals: HashSet<i32>,
        codes: HashSet<i32>,
    }
    let mut original: HashMap<&str, Seen> = HashMap::new();
    for r in input.runs.iter().filter(|r| r.variant_id.is_none()) {
        let e = original.entry(&r.cmd_hash).or_default();
        match r.exit {
            RunExit::Exited(c) => e.codes.insert(c),
            RunExit::Signaled(s) => e.signals.insert(s),
        };
    }
    let mut out = Vec::new();
    for v in input.variants.iter().filter(|v| v.state != VariantState::Quarantined) {
        let mut strikes: Vec<&RunInput> = Vec::new();
        for r in input.runs.iter().filter(|r| r.variant_id == Some(v.id)) {
            let orig = original.get(r.cmd_hash.as_str());
            match r.exit {
                RunExit::Signaled(s)
                    if CRASH_SIGNALS.contains(&s)
                        && !orig.is_some_and(|o| o.signals.contains(&s)) =>
                {
                    out.push(Incident {
                        variant_id: v.id,
                        run_id: r.id,
                        cmd_hash: r.cmd_hash.clone(),
                        exit: r.exit,
                        kind: IncidentKind::Crash,
                        detail: format!(
                            "killed by {} on command {}, which the original never was",
                            signal_name(s),
                            r.cmd_hash
                        ),
                    });
                    break;
                }
                RunExit::Exited(c)
                    if orig.is_some_and(|o| !o.codes.is_empty() && !o.codes.contains(&c)) =>
                {
                    strikes.push(r);
                    if strikes.len() >= cfg.suspicious_exit_strikes.max(1) {
                        out.push(Incident {
                            variant_id: v.id,
                            run_id: r.id,
                            cmd_hash: r.cmd_hash.clone(),
                            exit: r.exit,
                            kind: IncidentKind::SuspiciousExit,
                            detail: format!(
                                "{} runs exited with codes the original never gave \
                                 (last: {c} on command {})",
                                strikes.len(),
                                r.cmd_hash
                            ),
                        });
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// "SIGSEGV (11)".
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGILL => "SIGILL",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    };
    format!("{name} ({sig})")
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

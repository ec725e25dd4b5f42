//! What the policy reads about a binary ([`BinaryInput`]: its variants, measured runs,
//! pipeline state and controls) and what it decides ([`Evaluation`]: state transitions,
//! incidents, the stage status shows, and what each exec is served).

use super::*;

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
    /// The runs with counters, ordered by id (oldest first): what comparisons are made of.
    pub runs: Vec<RunInput>,
    /// Runs followed for their exit only (a sample of a served variant's runs had counters;
    /// these did not), ordered by id: their `cpu_ns` is 0 and means nothing. The safety
    /// checks read them with `runs` ([`BinaryInput::every_run`]).
    pub exit_only_runs: Vec<RunInput>,
    pub pipeline: Pipeline,
    /// The id the next stored run will get (where a new canary period starts).
    pub next_run_id: i64,
}

impl BinaryInput {
    /// Every run, counted or not, in id order: what crash and exit-code checks look at.
    pub fn every_run(&self) -> Vec<&RunInput> {
        let mut all: Vec<&RunInput> = self.runs.iter().chain(&self.exit_only_runs).collect();
        if !self.exit_only_runs.is_empty() {
            all.sort_by_key(|r| r.id);
        }
        all
    }
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
    pub(super) fn canary_decided(
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

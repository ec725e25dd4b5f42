//! Each subsystem's status of one binary, as typed structs: the daemon's subsystems fill
//! them ([`crate::control::SubsystemStatus::binary`]), `status.json` serializes them under
//! the binary's `details` (one object per subsystem, by name), and the text status renders
//! them, reading the fields it needs (the policy's stage, each summary) instead of parsing
//! JSON or sentences back.
//!
//! To show something new about a binary, add a field to its subsystem's struct here (or a
//! new subsystem's field to [`BinaryDetails`]); serde puts it in `status.json`.

use serde::Serialize;

use crate::bolt::status::SearchStatus;
use crate::catalog::bolt_jobs::BoltJobRow;
use crate::fleet::view::FleetBinary;
use crate::observe::heatmap::HeatFigures;
use crate::policy::{Comparison, Stage};
use crate::profile::ProfileSummary;
use crate::report::CounterChange;
use crate::train::check::Verdict;

/// Every subsystem's status of one binary; a subsystem with nothing to say is absent.
/// Fields in name order, the order `status.json` always had.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BinaryDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetBinary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observe: Option<ObserveBinary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<Detail<OptimizerBinary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Detail<PolicyBinary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiler: Option<Detail<ProfilerBinary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingBinary>,
}

impl BinaryDetails {
    /// Each subsystem's one line about the binary, by subsystem name (in name order).
    pub fn summaries(&self) -> Vec<(&'static str, &str)> {
        [
            ("fleet", self.fleet.as_ref().map(|d| d.summary.as_str())),
            ("observe", self.observe.as_ref().map(|d| d.summary.as_str())),
            ("optimizer", self.optimizer.as_ref().map(|d| d.summary(|d| &d.summary))),
            ("policy", self.policy.as_ref().map(|d| d.summary(|d| &d.summary))),
            ("profiler", self.profiler.as_ref().map(|d| d.summary(|d| &d.summary))),
            ("training", self.training.as_ref().map(|d| d.summary.as_str())),
        ]
        .into_iter()
        .filter_map(|(name, summary)| Some((name, summary?)))
        .collect()
    }

    /// The policy's status of the binary, when it was read.
    pub fn policy(&self) -> Option<&PolicyBinary> {
        self.policy.as_ref()?.read()
    }
}

/// A subsystem's status of a binary, or why its part of the catalog could not be read
/// (shown, never an empty section that would read as "nothing yet").
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Detail<T> {
    Read(T),
    Unreadable(Unreadable),
}

impl<T> Detail<T> {
    /// `what` (e.g. "policy status") could not be read: the error, with its context.
    pub fn unreadable(what: &str, e: &anyhow::Error) -> Self {
        let error = format!("{e:#}");
        Self::Unreadable(Unreadable { summary: format!("{what} unreadable: {error}"), error })
    }

    pub fn read(&self) -> Option<&T> {
        match self {
            Self::Read(t) => Some(t),
            Self::Unreadable(_) => None,
        }
    }

    fn summary<'a>(&'a self, of: impl Fn(&'a T) -> &'a String) -> &'a str {
        match self {
            Self::Read(t) => of(t),
            Self::Unreadable(u) => &u.summary,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Unreadable {
    pub error: String,
    pub summary: String,
}

/// The profiler's view of a binary: its profile and how far it is.
#[derive(Debug, Clone, Serialize)]
pub struct ProfilerBinary {
    #[serde(flatten)]
    pub profile: ProfileSummary,
    /// Instrumented runs a profile needs, when instrumentation mode is on.
    pub instrumented_runs_needed: Option<u64>,
    pub summary: String,
}

/// The optimizer's view of a binary: whether BOLT applies, and its job.
#[derive(Debug, Clone, Serialize)]
pub struct OptimizerBinary {
    pub candidate: bool,
    pub facts_only: bool,
    /// The search for better BOLT flags on this content.
    pub flag_search: SearchStatus,
    pub job: Option<BoltJobRow>,
    pub mode: &'static str,
    /// "queued" / "optimizing (attempt 2: no-split)".
    pub queue: Option<String>,
    pub reason: String,
    pub score: f64,
    /// Which earlier version's profile a variant bridging an upgrade was built from.
    pub stale_profile: Option<String>,
    pub summary: String,
}

/// The policy's view of a binary: its stage, runs per variant and measured gain.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyBinary {
    /// The per-run counters of the original and the variant in play.
    pub counters: Option<CounterChanges>,
    pub gain: Option<Gain>,
    pub last_incident: Option<String>,
    /// Execs of its first path run natively since the server started (passed through while
    /// it has no variant to serve: not measured, so not in `runs`).
    pub native_execs: u64,
    /// The stage of each path holding this content.
    pub paths: Vec<PathStage>,
    pub runs: Vec<RunCount>,
    pub stage: Stage,
    pub stage_text: String,
    pub summary: String,
}

/// The measured gain of the served or measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct Gain {
    pub high: f64,
    pub low: f64,
    pub original_runs: usize,
    pub ratio: f64,
    /// The gain as a sentence ("faster by 12.0% (interval ...)").
    pub text: String,
    pub variant_runs: usize,
}

impl From<&Comparison> for Gain {
    fn from(g: &Comparison) -> Self {
        Self {
            high: g.high,
            low: g.low,
            original_runs: g.original_runs,
            ratio: g.ratio,
            text: g.describe(),
            variant_runs: g.variant_runs,
        }
    }
}

/// The per-run counters of the original and of the variant canaried, served or pinned
/// (medians per run from the measured runs), next to the CPU-time gain. A counter the
/// machine lacks has no figures and says why (`unsupported`), never a zero.
#[derive(Debug, Clone, Serialize)]
pub struct CounterChanges {
    pub metrics: Vec<CounterChange>,
    /// The counters with figures, in a few words ("page-faults 95 -> 80 (-15.8%), ...").
    pub text: Option<String>,
    pub variant: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathStage {
    pub path: String,
    pub stage_text: String,
}

/// Runs of one arm: `variant` None is the original.
#[derive(Debug, Clone, Serialize)]
pub struct RunCount {
    pub runs: usize,
    pub variant: Option<i64>,
}

/// The heat map's figures of a binary.
#[derive(Debug, Clone, Serialize)]
pub struct ObserveBinary {
    #[serde(flatten)]
    pub figures: HeatFigures,
    pub summary: String,
}

/// The training commands that run a binary.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingBinary {
    pub commands: usize,
    /// The output check of each command against each variant in play (by variant).
    pub output_checks: Vec<OutputCheckStatus>,
    pub runs: u64,
    pub summary: String,
}

/// One training command's output checked against one variant (`crate::train::check`).
#[derive(Debug, Clone, Serialize)]
pub struct OutputCheckStatus {
    /// The training file's name.
    pub command: String,
    /// When, in unix seconds.
    pub at: i64,
    pub variant: i64,
    /// `same`, `differs` (with `detail`) or `not_compared` (with `why`).
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl OutputCheckStatus {
    /// "variant 3 on prog.toml: same output as the original".
    pub fn text(&self) -> String {
        let what = match &self.verdict {
            Verdict::Same => "same output as the original".to_string(),
            Verdict::Differs { .. } => "OUTPUT DIFFERS from the original's (rejected)".to_string(),
            Verdict::NotCompared { why } => format!("not compared: {why}"),
        };
        format!("variant {} on {}: {what}", self.variant, self.command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Pin;

    #[test]
    fn the_stage_name_is_the_key_status_json_shows() {
        let stages = [
            Stage::Seen,
            Stage::Collecting,
            Stage::Queued,
            Stage::Optimizing,
            Stage::Canary { variant_id: 1, variant_runs: 2, original_runs: 3, last: None },
            Stage::Challenge {
                served_id: 1,
                challenger_id: 2,
                challenger_runs: 3,
                served_runs: 4,
                last: None,
            },
            Stage::ServingOptimized { variant_id: 1, gain: None },
            Stage::ServingOriginal { reason: "slower".into() },
            Stage::Crashed { variant_id: 1, detail: "SIGSEGV".into() },
            Stage::BoltFailed("x".into()),
            Stage::NotCandidate("x".into()),
            Stage::Excluded,
            Stage::Pinned { pin: Pin::Original, variant_id: None },
        ];
        for stage in stages {
            let json = serde_json::to_value(&stage).unwrap();
            let key = json
                .as_str()
                .map(String::from)
                .or_else(|| json.as_object().and_then(|m| m.keys().next().cloned()));
            assert_eq!(key.as_deref(), Some(stage.name()), "{json}");
        }
    }

    #[test]
    fn an_unreadable_detail_shows_the_error_and_a_summary_only() {
        let e = anyhow::anyhow!("no such table: runs").context("reading runs");
        let details = BinaryDetails {
            policy: Some(Detail::unreadable("policy status", &e)),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&details).unwrap(),
            serde_json::json!({"policy": {
                "error": "reading runs: no such table: runs",
                "summary": "policy status unreadable: reading runs: no such table: runs",
            }})
        );
        assert_eq!(
            details.summaries(),
            [("policy", "policy status unreadable: reading runs: no such table: runs")]
        );
        assert!(details.policy().is_none());
    }
}

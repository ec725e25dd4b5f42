//! What the optimizer shows in `status.json`: is BOLT there, what is queued and running,
//! and how the last jobs ended (failures with the tail of BOLT's output).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::discover::BoltState;
use crate::catalog::flag_trials::FlagTrial;

/// Finished jobs kept in memory for status; the catalog keeps everything.
const RECENT: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoltView {
    pub found: bool,
    pub path: Option<String>,
    pub version: Option<String>,
    /// Where discovery looked when BOLT is missing.
    pub looked_in: Vec<String>,
}

impl BoltView {
    pub fn of(state: &BoltState) -> Self {
        match state {
            BoltState::Found(t) => Self {
                found: true,
                path: Some(t.llvm_bolt.display().to_string()),
                version: Some(t.version.to_string()),
                looked_in: vec![],
            },
            BoltState::Missing { looked_in } => {
                Self { found: false, path: None, version: None, looked_in: looked_in.clone() }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedView {
    pub binary_id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningView {
    pub binary_id: i64,
    pub name: String,
    pub attempt: u32,
    /// The ladder rung being tried ("full", "no-split, skip f/1", ...).
    pub step: String,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEnd {
    /// A variant was stored and recorded.
    Built { variant_id: i64, sha256: String },
    /// The ladder gave up: failed until content, profile or BOLT version changes.
    Failed { kind: String, tail: String, step: String, why: String },
    /// Not attempted (history, exclusion, empty profile).
    Skipped { why: String },
    /// Stopped by shutdown.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedView {
    pub binary_id: i64,
    pub name: String,
    pub attempts: u32,
    pub end: JobEnd,
}

/// The optimizer's state for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerStatus {
    pub bolt: BoltView,
    pub queued: Vec<QueuedView>,
    pub running: Vec<RunningView>,
    /// Newest first.
    pub recent: Vec<FinishedView>,
    pub built: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl OptimizerStatus {
    pub fn new(state: &BoltState) -> Self {
        Self {
            bolt: BoltView::of(state),
            queued: vec![],
            running: vec![],
            recent: vec![],
            built: 0,
            failed: 0,
            skipped: 0,
        }
    }

    /// True when nothing is queued or running.
    pub fn idle(&self) -> bool {
        self.queued.is_empty() && self.running.is_empty()
    }

    pub fn last_failures(&self) -> impl Iterator<Item = &FinishedView> {
        self.recent.iter().filter(|f| matches!(f.end, JobEnd::Failed { .. }))
    }

    pub(super) fn finish(&mut self, done: FinishedView) {
        self.running.retain(|r| r.binary_id != done.binary_id);
        match done.end {
            JobEnd::Built { .. } => self.built += 1,
            JobEnd::Failed { .. } => self.failed += 1,
            JobEnd::Skipped { .. } => self.skipped += 1,
            JobEnd::Cancelled => {}
        }
        let mut recent: VecDeque<FinishedView> = std::mem::take(&mut self.recent).into();
        recent.push_front(done);
        recent.truncate(RECENT);
        self.recent = recent.into();
    }
}

/// The flag search as status shows it for one binary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchStatus {
    pub on: bool,
    pub max_challengers: usize,
    /// The challenger being built or measured: its flag set and state.
    pub current: Option<FlagTrial>,
    /// Every flag set tried on this content, with its outcome.
    pub tried: Vec<FlagTrial>,
    /// What the search does next ("variant 3 is being measured", "done: ...").
    pub next: String,
}

impl SearchStatus {
    /// "flag search: no-split rejected, cleanup-passes canary (2 of 3)".
    pub fn summary(&self) -> Option<String> {
        if !self.on {
            return None;
        }
        let challengers: Vec<String> = self
            .tried
            .iter()
            .filter(|t| t.challenger)
            .map(|t| format!("{} {}", t.flag_set, t.outcome))
            .collect();
        if challengers.is_empty() {
            return None;
        }
        Some(format!(
            "flag search: {} ({} of {})",
            challengers.join(", "),
            challengers.len(),
            self.max_challengers
        ))
    }
}

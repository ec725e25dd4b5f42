//! One BOLT run: what to do ([`BoltJob`], [`BoltPlan`]) and what came of it
//! ([`BoltOutcome`]). Shared by the runner, the ladder and the queue.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::applicability::BoltMode;
use super::flags::FlagSet;
use super::sandbox::ScratchDir;
use super::stale::StaleMatch;
use crate::identity::ContentId;

/// Where BOLT's profile comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileInput {
    /// Optimize with this fdata file (copied into the job's scratch directory).
    Fdata(PathBuf),
    /// Build an instrumented binary that writes its profile to `profile_file` at exit
    /// (see [`super::flags`] for the directory this must be in).
    ///
    /// `binpath`: where the runtime reads the instrumented binary itself from at exit
    /// (`-instrumentation-binpath`). Without it the runtime reads `/proc/self/map_files`,
    /// which only root may: a run by any other user aborts with "failed to open binary
    /// path".
    Instrument { profile_file: PathBuf, append_pid: bool, binpath: Option<PathBuf> },
    /// Optimize with the YAML profile of a previous version of the binary
    /// (`-infer-stale-profile` matches it to this one; see [`super::stale`]).
    StaleYaml(PathBuf),
}

impl ProfileInput {
    /// Whether the build optimizes from a profile (not `-instrument`).
    pub fn optimizes(&self) -> bool {
        !matches!(self, ProfileInput::Instrument { .. })
    }

    /// The sha256 of the profile's bytes, recorded with the variant and shared in the
    /// fleet's verdicts so that "built from the same inputs" can be checked exactly; None
    /// for an instrumented build, which has no profile yet.
    pub fn digest(&self) -> std::io::Result<Option<ContentId>> {
        match self {
            ProfileInput::Fdata(path) | ProfileInput::StaleYaml(path) => {
                ContentId::of_file(path).map(Some)
            }
            ProfileInput::Instrument { .. } => Ok(None),
        }
    }
}

/// The flags-level choices of one attempt; the ladder moves between these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoltPlan {
    pub mode: BoltMode,
    /// Split hot and cold code of functions (`-split-functions -split-all-cold -split-eh`).
    pub split_functions: bool,
    /// Functions BOLT must leave alone (`-skip-funcs=`), from earlier failures.
    pub skip_funcs: Vec<String>,
    pub profile: ProfileInput,
    /// The optimization flags (ignored by `-instrument` builds); see [`super::flags`].
    pub flag_set: &'static FlagSet,
}

/// A request to the runner.
#[derive(Debug, Clone)]
pub struct BoltJob {
    /// The original binary. The runner works on a copy of it.
    pub original: PathBuf,
    /// When given, the copy must have this content (the original may have been replaced
    /// since the job was queued).
    pub expected_content: Option<ContentId>,
    pub plan: BoltPlan,
    /// Set to stop the run early (daemon shutdown); the runner kills BOLT.
    pub cancel: Arc<AtomicBool>,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    ExitCode(i32),
    Signal(i32),
    Timeout,
    /// BOLT ran out of its address-space limit.
    MemoryLimit,
    /// Stopped by shutdown; not BOLT's fault, not recorded as a failure of the binary.
    Cancelled,
    /// optbin could not prepare or start the run.
    Setup(String),
    /// BOLT succeeded but its output failed the checks of [`super::verify`].
    Verification(String),
}

impl FailureKind {
    /// Short text for status and the catalog.
    pub fn label(&self) -> String {
        match self {
            FailureKind::ExitCode(n) => format!("exit {n}"),
            FailureKind::Signal(n) => format!("signal {n}"),
            FailureKind::Timeout => "timeout".into(),
            FailureKind::MemoryLimit => "memory limit".into(),
            FailureKind::Cancelled => "cancelled".into(),
            FailureKind::Setup(why) => format!("setup: {why}"),
            FailureKind::Verification(why) => format!("verification: {why}"),
        }
    }
}

/// A successful run: the output lives in `scratch` until that guard is dropped.
#[derive(Debug)]
pub struct BoltSuccess {
    pub output: PathBuf,
    pub scratch: ScratchDir,
    pub tail: String,
    pub wall: Duration,
    pub peak_rss_kib: u64,
    pub version: String,
    /// The exact arguments given to `llvm-bolt` (paths are inside the scratch directory).
    pub args: Vec<String>,
    /// The profile BOLT wrote in its YAML form (`-w`), when it did: kept for the next
    /// version of the binary (see [`super::stale`]).
    pub profile_yaml: Option<PathBuf>,
    /// How a stale profile matched, read from BOLT's output (stale builds only).
    pub stale_match: Option<StaleMatch>,
}

/// A failed run.
#[derive(Debug, Clone)]
pub struct BoltFailure {
    pub kind: FailureKind,
    /// The last lines BOLT printed (stdout and stderr together).
    pub tail: String,
    pub wall: Duration,
    pub peak_rss_kib: u64,
    pub version: String,
    pub args: Vec<String>,
}

#[derive(Debug)]
pub enum BoltOutcome {
    Ok(BoltSuccess),
    Failed(BoltFailure),
}

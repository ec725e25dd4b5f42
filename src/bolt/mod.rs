//! The optimizer: turns a binary with a mature profile into a BOLT variant, safely and in
//! the background.
//!
//! The pieces, each in its own file:
//! - [`applicability`]: is this binary worth a BOLT run, and in which mode (pure).
//! - [`discover`]: where `llvm-bolt` is and which version it is.
//! - [`flags`]: the exact command line for a plan and a version (pure).
//! - [`ladder`]: which safer plan to try after a failure, and when to give up (pure).
//! - [`retry_policy`]: whether a binary should be (re)built at all now (pure).
//! - [`sandbox`]: runs a command as an unprivileged user, at idle priority, with limits.
//! - [`runner`]: the [`BoltRunner`] trait and its real, sandboxed implementation.
//! - [`verify`]: checks an output before it may be stored.
//! - [`queue`]: the tokio task that takes requests and drives all of the above.
//! - [`status`]: what the optimizer shows in status.
//! - [`settings`]: the `[optimizer]` section of the config file.
//! - [`perf2bolt`]: converts `perf.data` into fdata (tests and benchmarks).
//! - [`stale`]: profiles kept per path in BOLT's YAML format, so that a new version of a
//!   binary is built at once from the previous version's profile.

pub mod applicability;
pub mod discover;
pub mod flags;
pub mod history;
pub mod job;
pub mod ladder;
pub mod perf2bolt;
pub mod queue;
pub mod retry_policy;
pub mod runner;
pub mod sandbox;
pub mod settings;
pub mod stale;
pub mod status;
pub mod verify;

pub use applicability::{
    Applicability, ApplicabilityConfig, BoltMode, ProfileNumbers, Verdict, assess, verdict,
};
pub use discover::{BoltState, BoltTool, BoltVersion, discover};
pub use job::{
    BoltFailure, BoltJob, BoltOutcome, BoltPlan, BoltSuccess, FailureKind, ProfileInput,
};
pub use queue::{
    OptimizeRequest, OptimizerConfig, OptimizerDeps, OptimizerHandle, OptimizerWorker, ProfileInfo,
    ProfileSource, Rejected, RequestOrigin, optimizer, run_optimizer,
};
pub use runner::{BoltRunner, SandboxedBoltRunner};
pub use sandbox::{Sandbox, SandboxLimits, SandboxUser, ScratchDir};
pub use settings::Settings;
pub use status::{JobEnd, OptimizerStatus};
pub use verify::SmokeCommand;

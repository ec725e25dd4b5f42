//! The [`BoltRunner`] trait (what the queue needs from BOLT) and its real implementation,
//! [`SandboxedBoltRunner`]: `llvm-bolt` on a copy of the original, in a fresh scratch
//! directory, as the sandbox user, at idle priority, with a memory limit and a timeout
//! (see [`super::sandbox`]).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::discover::BoltTool;
use super::flags::bolt_args;
use super::job::{BoltFailure, BoltJob, BoltOutcome, BoltSuccess, FailureKind, ProfileInput};
use super::sandbox::{Sandbox, SandboxCommand, SandboxLimits, Termination};
use super::stale::{StaleMatch, yaml_beside};
use crate::identity::ContentId;

/// How much of BOLT's output is kept for status and the catalog.
pub const TAIL_BYTES: usize = 8192;

/// Runs one BOLT job to its end. Synchronous: the queue calls it on a blocking thread.
pub trait BoltRunner: Send + Sync {
    /// The version recorded with every variant ("22.1.8").
    fn version(&self) -> String;
    fn run(&self, job: &BoltJob) -> BoltOutcome;
}

/// The real runner.
#[derive(Debug, Clone)]
pub struct SandboxedBoltRunner {
    pub tool: BoltTool,
    pub sandbox: Sandbox,
    pub limits: SandboxLimits,
}

impl SandboxedBoltRunner {
    pub fn new(tool: BoltTool, sandbox: Sandbox, limits: SandboxLimits) -> Self {
        Self { tool, sandbox, limits }
    }
}

impl BoltRunner for SandboxedBoltRunner {
    fn version(&self) -> String {
        self.tool.version.to_string()
    }

    fn run(&self, job: &BoltJob) -> BoltOutcome {
        let version = self.version();
        let failed = |kind: FailureKind, tail: String, args: Vec<String>| {
            BoltOutcome::Failed(BoltFailure {
                kind,
                tail,
                wall: Duration::ZERO,
                peak_rss_kib: 0,
                version: version.clone(),
                args,
            })
        };
        let scratch = match self.sandbox.scratch() {
            Ok(s) => s,
            Err(e) => return failed(FailureKind::Setup(format!("{e:#}")), String::new(), vec![]),
        };
        let placed = (|| -> anyhow::Result<_> {
            let input = scratch.place(&job.original, "input", 0o644)?;
            if let Some(expected) = job.expected_content {
                let got = ContentId::of_file(&input).context("hashing the copy")?;
                anyhow::ensure!(
                    got == expected,
                    "the original changed since the job was queued ({} is now {})",
                    expected.short(),
                    got.short()
                );
            }
            let profile = match &job.plan.profile {
                ProfileInput::Fdata(p) => Some(scratch.place(p, "profile.fdata", 0o644)?),
                ProfileInput::StaleYaml(p) => Some(scratch.place(p, "profile.yaml", 0o644)?),
                ProfileInput::Instrument { .. } => None,
            };
            Ok((input, profile))
        })();
        let (input, profile) = match placed {
            Ok(p) => p,
            Err(e) => return failed(FailureKind::Setup(format!("{e:#}")), String::new(), vec![]),
        };
        let output = scratch.work().join("output");
        let args = bolt_args(&job.plan, &input, &output, profile.as_deref());
        let ran = self.sandbox.run(&SandboxCommand {
            program: &self.tool.llvm_bolt,
            args: &args,
            cwd: scratch.work(),
            stdin: None,
            merge_stderr: true,
            limits: &self.limits,
            cancel: Some(&job.cancel),
        });
        let ran = match ran {
            Ok(r) => r,
            Err(e) => return failed(FailureKind::Setup(format!("{e:#}")), String::new(), args),
        };
        let tail = ran.stdout.tail_text(TAIL_BYTES);
        let kind = match ran.termination {
            Termination::TimedOut => Some(FailureKind::Timeout),
            Termination::Cancelled => Some(FailureKind::Cancelled),
            Termination::Exited(0) if is_regular_file(&output) => None,
            Termination::Exited(0) => Some(FailureKind::ExitCode(0)),
            // LLVM's stack dump follows the message: look further back than the tail.
            _ if mentions_memory_exhaustion(&ran.stdout.tail_text(64 * 1024)) => {
                Some(FailureKind::MemoryLimit)
            }
            Termination::Exited(n) => Some(FailureKind::ExitCode(n)),
            Termination::Signaled(s) => Some(FailureKind::Signal(s)),
        };
        match kind {
            None => BoltOutcome::Ok(BoltSuccess {
                profile_yaml: Some(yaml_beside(&output)).filter(|y| is_regular_file(y)),
                stale_match: match job.plan.profile {
                    // The match is reported before the passes: look at all of the output kept.
                    ProfileInput::StaleYaml(_) => {
                        StaleMatch::parse(&ran.stdout.tail_text(usize::MAX))
                    }
                    _ => None,
                },
                output,
                scratch,
                tail,
                wall: ran.wall,
                peak_rss_kib: ran.peak_rss_kib,
                version,
                args,
            }),
            Some(kind) => BoltOutcome::Failed(BoltFailure {
                kind,
                tail,
                wall: ran.wall,
                peak_rss_kib: ran.peak_rss_kib,
                version,
                args,
            }),
        }
    }
}

/// Not a symlink or anything else the sandbox user could have planted.
fn is_regular_file(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// LLVM's ways of dying when `RLIMIT_AS` refuses memory.
fn mentions_memory_exhaustion(tail: &str) -> bool {
    ["out of memory", "bad_alloc", "Cannot allocate memory", "failed to allocate"]
        .iter()
        .any(|m| tail.contains(m))
}

/// Creates the directory instrumented binaries write their profiles to: root-owned, mode
/// 1733 (every user may create files, only the owner of a file may remove it, nobody but
/// root may list). See [`super::flags`] for why.
pub fn prepare_instrumentation_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o1733))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_messages_are_recognised() {
        assert!(mentions_memory_exhaustion("LLVM ERROR: out of memory\nAllocation failed\n"));
        assert!(mentions_memory_exhaustion("terminate called after throwing 'std::bad_alloc'"));
        assert!(!mentions_memory_exhaustion("BOLT-ERROR: unable to get new address"));
    }
}

//! Checks a BOLT output before it may be stored.
//!
//! 1. Structure (read in-process, never executed): an ELF of the original's class,
//!    machine and type (a PIE stays a PIE, an ET_EXEC stays one), with BOLT's
//!    `.note.bolt_info`.
//! 2. The dynamic linker accepts it: `ld.so --verify FILE`, run in the sandbox. `--verify`
//!    maps the object and checks it is one ld.so can load, without running any of its
//!    code (unlike `--list`, which relocates and can run IFUNC resolvers). Only required
//!    when ld.so also accepts the original (a static original is skipped).
//! 3. Where the caller knows a command that is safe to run (a profile workload without
//!    side effects, `--version`), both the original and the candidate run it in the
//!    sandbox, each in its own fresh scratch directory, as the unprivileged user with a
//!    timeout; exit status and stdout must be equal. Running an arbitrary command of the
//!    user's is not safe (it may write files, talk to the network), so optbin never
//!    invents one: no command, no run.
//!
//! This cannot prove a variant correct. It rejects broken files early; the policy still
//! serves a variant only after it measured faster, with the original as the fallback.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sandbox::{
    Captured, RunResult, Sandbox, SandboxCommand, SandboxLimits, ScratchDir, Termination,
};
use crate::elf::ElfFacts;

/// The dynamic linker used for `--verify`.
pub const LD_SO: &str = "/lib64/ld-linux-x86-64.so.2";

/// A command known to be safe to run the binary with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmokeCommand {
    /// Arguments after the program name.
    pub args: Vec<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// What was checked, for the variant's note.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub checks: Vec<String>,
}

/// Verifies `candidate` (a root-owned copy of BOLT's output) against `original`.
pub fn verify(
    original: &Path,
    candidate: &Path,
    scratch: &ScratchDir,
    sandbox: &Sandbox,
    limits: &SandboxLimits,
    smoke: Option<&SmokeCommand>,
) -> Result<VerifyReport, String> {
    let mut report = VerifyReport::default();
    check_structure(original, candidate)?;
    report.checks.push("elf".into());

    let orig_copy =
        scratch.place(original, "check-original", 0o755).map_err(|e| format!("setup: {e:#}"))?;
    let cand_copy =
        scratch.place(candidate, "check-candidate", 0o755).map_err(|e| format!("setup: {e:#}"))?;
    let ld_limits = SandboxLimits { timeout: Duration::from_secs(30), ..limits.clone() };
    let ld_verify = |file: &Path| {
        let args = vec!["--verify".to_string(), file.display().to_string()];
        run(sandbox, scratch, Path::new(LD_SO), &args, None, &ld_limits)
    };
    if ld_verify(&orig_copy)?.termination == Termination::Exited(0) {
        let r = ld_verify(&cand_copy)?;
        if r.termination != Termination::Exited(0) {
            return Err(format!("ld.so --verify refused it ({:?})", r.termination));
        }
        report.checks.push("ld.so --verify".into());
    }

    if let Some(cmd) = smoke {
        let smoke_limits = SandboxLimits { timeout: cmd.timeout, ..limits.clone() };
        let fresh = || sandbox.scratch().map_err(|e| format!("setup: {e:#}"));
        let (a, b) = (fresh()?, fresh()?);
        let stdin = cmd.stdin.as_deref();
        let want = run(sandbox, &a, &orig_copy, &cmd.args, stdin, &smoke_limits)?;
        if matches!(want.termination, Termination::TimedOut | Termination::Cancelled) {
            report.checks.push("smoke run skipped: the original timed out".into());
            return Ok(report);
        }
        let got = run(sandbox, &b, &cand_copy, &cmd.args, stdin, &smoke_limits)?;
        if got.termination != want.termination {
            return Err(format!(
                "smoke run ended {:?}, the original {:?}",
                got.termination, want.termination
            ));
        }
        if !same_output(&got.stdout, &want.stdout) {
            return Err(format!(
                "smoke run printed {} bytes differing from the original's {}",
                got.stdout.len, want.stdout.len
            ));
        }
        report
            .checks
            .push(format!("smoke run ({:?}, {} bytes equal)", want.termination, want.stdout.len));
    }
    Ok(report)
}

fn same_output(a: &Captured, b: &Captured) -> bool {
    a.len == b.len && a.tail == b.tail
}

fn run(
    sandbox: &Sandbox,
    scratch: &ScratchDir,
    program: &Path,
    args: &[String],
    stdin: Option<&[u8]>,
    limits: &SandboxLimits,
) -> Result<RunResult, String> {
    sandbox
        .run(&SandboxCommand {
            program,
            args,
            cwd: scratch.work(),
            stdin,
            merge_stderr: false,
            limits,
            cancel: None,
        })
        .map_err(|e| format!("setup: {e:#}"))
}

/// Class, byte order, type and machine from the ELF header, PIE-ness and BOLT's note.
fn check_structure(original: &Path, candidate: &Path) -> Result<(), String> {
    let head = |p: &Path| -> Result<[u8; 20], String> {
        let mut h = [0u8; 20];
        File::open(p)
            .and_then(|mut f| f.read_exact(&mut h))
            .map_err(|e| format!("reading {}: {e}", p.display()))?;
        Ok(h)
    };
    let (o, c) = (head(original)?, head(candidate)?);
    if &c[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    // e_ident class (4) and data (5), e_type (16..18), e_machine (18..20).
    if c[4..6] != o[4..6] || c[16..20] != o[16..20] {
        return Err("ELF class, byte order, type or machine differs from the original".into());
    }
    let facts = |p: &Path| ElfFacts::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (of, cf) = (facts(original)?, facts(candidate)?);
    if of.pie != cf.pie {
        return Err(format!("position independence changed (original pie={})", of.pie));
    }
    if !cf.bolted {
        return Err("no .note.bolt_info: not a BOLT output".into());
    }
    Ok(())
}

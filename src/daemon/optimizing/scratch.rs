//! The scratch root BOLT jobs work in: checked at start-up, created only when the first job
//! needs it ([`ScratchOnDemand`]), so a daemon that never runs BOLT leaves no directory
//! behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::bolt::{
    BoltFailure, BoltJob, BoltOutcome, BoltRunner, FailureKind, Sandbox, SandboxedBoltRunner,
};

/// Whether `sandbox.scratch_root` can serve as the scratch root, without creating it: an
/// existing directory must not be writable by everyone (`/tmp`, `/var/tmp`: the sandbox
/// makes its root 0711, which would break it for everyone); a missing one must be
/// reachable by the sandbox user through every existing directory above it.
pub fn check_scratch_root(sandbox: &Sandbox) -> anyhow::Result<()> {
    let dir = &sandbox.scratch_root;
    if let Ok(md) = std::fs::metadata(dir) {
        anyhow::ensure!(md.is_dir(), "{} is not a directory", dir.display());
        anyhow::ensure!(
            md.permissions().mode() & 0o002 == 0,
            "{} is writable by everyone; give optbin a directory of its own (it is made 0711)",
            dir.display()
        );
        return Sandbox::new(dir, sandbox.user.clone()).map(|_| ());
    }
    if sandbox.user.is_none() {
        return Ok(());
    }
    for above in dir.ancestors().skip(1).filter(|d| d.exists()) {
        let mode = std::fs::metadata(above)?.permissions().mode();
        anyhow::ensure!(
            mode & 0o001 != 0,
            "{} would be inside {}, which the sandbox user cannot enter",
            dir.display(),
            above.display()
        );
    }
    Ok(())
}

/// The real runner, creating the scratch root (root-owned 0711) before each job if it is
/// missing.
pub struct ScratchOnDemand {
    pub runner: SandboxedBoltRunner,
}

impl BoltRunner for ScratchOnDemand {
    fn version(&self) -> String {
        self.runner.version()
    }

    fn run(&self, job: &BoltJob) -> BoltOutcome {
        let sandbox = &self.runner.sandbox;
        if let Err(e) = Sandbox::new(&sandbox.scratch_root, sandbox.user.clone()) {
            return BoltOutcome::Failed(BoltFailure {
                kind: FailureKind::Setup(format!("{e:#}")),
                tail: String::new(),
                wall: Duration::ZERO,
                peak_rss_kib: 0,
                version: self.version(),
                args: vec![],
            });
        }
        self.runner.run(job)
    }
}

/// Removes the scratch root at shutdown when this daemon created it and it is empty (every
/// job's directory is gone once the queue has stopped; someone else's files stay).
pub fn remove_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

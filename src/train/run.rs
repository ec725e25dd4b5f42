//! Running one training command through the mount: as its user, at idle priority
//! (`nice` 19 and `SCHED_IDLE`), in its own process group, killed at its time limit.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::train::file::TrainCommand;

/// How a training run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    /// The daemon is stopping.
    Stopped,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "exit {c}"),
            Outcome::Signaled(s) => write!(f, "killed by signal {s}"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::Stopped => write!(f, "stopped"),
        }
    }
}

/// The path under the mount that serves `original`.
pub fn through_mount(mountpoint: &Path, original: &Path) -> PathBuf {
    mountpoint.join(original.strip_prefix("/").unwrap_or(original))
}

/// Runs `cmd` (whose binary is `original`) through `mountpoint`; `stop` ends it early.
pub fn run(
    cmd: &TrainCommand,
    mountpoint: &Path,
    original: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<(Outcome, Duration)> {
    let program = through_mount(mountpoint, original);
    let argv0 = original.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut c = Command::new(&program);
    c.arg0(argv0).args(&cmd.args).current_dir(&cmd.dir);
    c.env_clear();
    c.env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", mountpoint.join("bin").display()));
    c.env("HOME", "/");
    c.envs(&cmd.env);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c.uid(cmd.uid).gid(cmd.gid);
    // std drops supplementary groups itself when root sets a uid, before pre_exec runs.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = c.spawn().with_context(|| format!("starting {}", program.display()))?;
    let deadline = started + Duration::from_secs(cmd.timeout_secs);
    loop {
        if let Some(status) = child.try_wait()? {
            use std::os::unix::process::ExitStatusExt;
            let outcome = match (status.code(), status.signal()) {
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s),
                _ => Outcome::Exited(-1),
            };
            return Ok((outcome, started.elapsed()));
        }
        let why = if stop.load(Ordering::Relaxed) {
            Some(Outcome::Stopped)
        } else if Instant::now() >= deadline {
            Some(Outcome::TimedOut)
        } else {
            None
        };
        if let Some(why) = why {
            // SAFETY: signalling the process group the child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            return Ok((why, started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

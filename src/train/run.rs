//! Running one training command: through the mount (a training run), or with a given file
//! and its stdout captured (the output check's runs, [`run_captured`]); either way as its
//! user, at idle priority (`nice` 19 and `SCHED_IDLE`), in its own process group, killed at
//! its time limit.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::process::{Pid, Signal, kill_process_group};
use serde::Serialize;

use crate::bench::run::capture;
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
    let mut c = command(cmd, mountpoint, &program, &argv0);
    c.stdout(Stdio::null());
    let started = Instant::now();
    let mut child = c.spawn().with_context(|| format!("starting {}", program.display()))?;
    let outcome = wait(&mut child, cmd.timeout_secs, started, stop)?;
    Ok((outcome, started.elapsed()))
}

/// What a run wrote to stdout (the same digest `optbin bench` compares).
pub use crate::bench::run::Captured;

/// How many bytes of stdout are kept to show a difference.
pub const PREVIEW: usize = 120;

/// Runs `cmd` with `program` (argv[0] the original's name, as through the mount) and
/// captures its stdout; the output check's runs.
pub fn run_captured(
    cmd: &TrainCommand,
    mountpoint: &Path,
    program: &Path,
    argv0: &OsStr,
    stop: &AtomicBool,
) -> anyhow::Result<(Outcome, Captured)> {
    let mut c = command(cmd, mountpoint, program, argv0);
    c.stdout(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().with_context(|| format!("starting {}", program.display()))?;
    let mut stdout = child.stdout.take().context("the child's stdout")?;
    // Read on the side: a full pipe must not stall the child while we watch the clock.
    let reader = std::thread::spawn(move || capture(&mut stdout, PREVIEW));
    let outcome = wait(&mut child, cmd.timeout_secs, started, stop)?;
    // Whatever the command left running in its group would hold the pipe open.
    // Signalling the process group the child led (ESRCH when it is empty).
    let _ = kill_process_group(Pid::from_child(&child), Signal::KILL);
    let captured = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?
        .context("reading the program's stdout")?;
    Ok((outcome, captured))
}

/// The command as a training run gets it: its argv, directory, a minimal environment with
/// the mount's PATH first, its user, at idle priority in its own process group.
fn command(cmd: &TrainCommand, mountpoint: &Path, program: &Path, argv0: &OsStr) -> Command {
    let mut c = Command::new(program);
    c.arg0(argv0).args(&cmd.args).current_dir(&cmd.dir);
    c.env_clear();
    c.env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", mountpoint.join("bin").display()));
    c.env("HOME", "/");
    c.envs(&cmd.env);
    c.stdin(Stdio::null()).stderr(Stdio::null());
    c.uid(cmd.uid).gid(cmd.gid);
    // std drops supplementary groups itself when root sets a uid, before pre_exec runs.
    // SAFETY: only async-signal-safe calls between fork and exec (rustix's are raw system
    // calls that allocate nothing; sched_setscheduler reads a param on the stack).
    unsafe {
        c.pre_exec(|| {
            let _ = rustix::process::setpgid(None, None);
            let _ = rustix::process::setpriority_process(None, 19);
            // libc: rustix has no sched_setscheduler.
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            Ok(())
        });
    }
    c
}

/// Waits for `child` until it ends, its time limit passes or `stop` is set (then its
/// process group is killed).
fn wait(
    child: &mut Child,
    timeout_secs: u64,
    started: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<Outcome> {
    let deadline = started + Duration::from_secs(timeout_secs);
    loop {
        if let Some(status) = child.try_wait()? {
            use std::os::unix::process::ExitStatusExt;
            return Ok(match (status.code(), status.signal()) {
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s),
                _ => Outcome::Exited(-1),
            });
        }
        let why = if stop.load(Ordering::Relaxed) {
            Some(Outcome::Stopped)
        } else if Instant::now() >= deadline {
            Some(Outcome::TimedOut)
        } else {
            None
        };
        if let Some(why) = why {
            // Signalling the process group the child leads.
            let _ = kill_process_group(Pid::from_child(child), Signal::KILL);
            let _ = child.kill();
            let _ = child.wait();
            return Ok(why);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! One measured run of a program: spawned with counters attached before its exec, its
//! stdout hashed, reaped with `wait4` for CPU time and max RSS.
//!
//! Counters must exist before the exec so that start-up (the dynamic loader, relocations,
//! page faults on the first touch of the code) is counted, which is where code layout
//! matters most for short programs. `std::process::Command::spawn` returns only once the
//! exec happened, so the child announces its pid on a pipe from `pre_exec` and waits for a
//! go byte; a helper thread opens the counters on that pid (enabled on exec, inherited by
//! children) and sends the go.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use rustix::pipe::{PipeFlags, pipe_with};
use rustix::thread::{CpuSet, sched_setaffinity};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::measure::RunExit;
use crate::measure::counters::{Metric, MetricCounters};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec<'a> {
    pub program: &'a Path,
    /// argv[0] as the user would type it (the same for every arm).
    pub argv0: &'a str,
    pub args: &'a [OsString],
    /// Pin the run to this CPU.
    pub cpu: Option<usize>,
    pub metrics: &'a [Metric],
}

/// How many bytes of stdout are kept to show a mismatch.
pub const STDOUT_PREVIEW: usize = 240;

/// What a run wrote to stdout: its digest, length and first bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Captured {
    pub sha256: String,
    pub len: u64,
    pub preview: String,
}

/// Reads `r` to its end: the sha256 of all of it, its length, and its first `preview_max`
/// bytes (lossy UTF-8).
pub fn capture(r: &mut impl Read, preview_max: usize) -> std::io::Result<Captured> {
    let mut hasher = Sha256::new();
    let (mut preview, mut len) = (Vec::new(), 0u64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        let take = n.min(preview_max.saturating_sub(preview.len()));
        preview.extend_from_slice(&buf[..take]);
        len += n as u64;
    }
    let preview = String::from_utf8_lossy(&preview).into_owned();
    Ok(Captured { sha256: hex::encode(hasher.finalize()), len, preview })
}

/// One run's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSample {
    /// From the go signal to the reap.
    pub wall_ns: u64,
    /// User + system time of the process and the children it waited for (rusage).
    pub cpu_ns: u64,
    pub max_rss_kb: u64,
    pub exit: RunExit,
    pub stdout_sha256: String,
    pub stdout_len: u64,
    pub stdout_preview: String,
    /// Counter name -> count; a counter the machine lacks is absent (see `unsupported`).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Counter name -> why it was not counted.
    pub unsupported: std::collections::BTreeMap<String, String>,
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    pipe_with(PipeFlags::CLOEXEC).map_err(std::io::Error::from).context("pipe2")
}

/// Runs `spec` once and measures it.
pub fn run_once(spec: &RunSpec<'_>) -> anyhow::Result<RunSample> {
    let (pid_r, pid_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // The child closes its copies of the helper's ends, so that its read of `go_r` ends
    // when the helper goes away.
    let (child_closes_pid_r, child_closes_go_w) = (pid_r.as_raw_fd(), go_w.as_raw_fd());
    let mut cmd = Command::new(spec.program);
    cmd.arg0(spec.argv0).args(spec.args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let cpu_set = spec.cpu.map(|cpu| {
        let mut set = CpuSet::new();
        set.set(cpu);
        set
    });
    // SAFETY: only async-signal-safe calls (sched_setaffinity, getpid, close, write, read;
    // rustix's are raw system calls that allocate nothing) run between fork and exec. The
    // closure owns `pid_w` and `go_r`: the parent's copies close when `cmd` is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(set) = &cpu_set {
                sched_setaffinity(None, set)?;
            }
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            // libc: these are the child's copies of descriptors the parent's helper owns,
            // known here only by number (rustix's close of a raw fd is as unsafe).
            libc::close(child_closes_pid_r);
            libc::close(child_closes_go_w);
            match rustix::io::write(&pid_w, &pid.to_ne_bytes()) {
                Ok(4) => {}
                Ok(_) => return Err(std::io::ErrorKind::WriteZero.into()),
                Err(e) => return Err(e.into()),
            }
            let mut go = [0u8];
            if rustix::io::read(&go_r, &mut go) != Ok(1) {
                // The bench runner went away. std hands the parent only an errno (EINVAL
                // for an error without one), so say that without allocating: malloc after
                // fork in a threaded process can deadlock.
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(())
        });
    }
    let metrics = spec.metrics.to_vec();
    // The helper: learn the pid, attach counters, let the child exec.
    let helper = std::thread::spawn(move || {
        let mut buf = [0u8; 4];
        let n = rustix::io::read(&pid_r, &mut buf);
        drop(pid_r);
        if n != Ok(4) {
            drop(go_w);
            return None;
        }
        let pid = i32::from_ne_bytes(buf);
        let counters = MetricCounters::open(pid, &metrics);
        let start = Instant::now();
        let _ = rustix::io::write(&go_w, &[1u8]);
        drop(go_w);
        Some((pid, counters, start))
    });
    let spawned = cmd.spawn();
    // Closes the parent's `pid_w` and `go_r`, which the pre_exec closure owns.
    drop(cmd);
    let attached = helper.join().map_err(|_| anyhow::anyhow!("the counter thread panicked"))?;
    let mut child = spawned.with_context(|| format!("running {}", spec.program.display()))?;
    let (pid, mut counters, start) =
        attached.ok_or_else(|| anyhow::anyhow!("the child never announced itself"))?;
    anyhow::ensure!(pid as u32 == child.id(), "pid handshake mismatch");

    let mut stdout = child.stdout.take().context("child stdout")?;
    let out = capture(&mut stdout, STDOUT_PREVIEW).context("reading the program's stdout")?;
    let mut status = 0i32;
    // libc: rustix's waits do not return the child's rusage.
    // SAFETY: a zeroed rusage (plain integers) is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = loop {
        // SAFETY: reaping our own child, with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break r;
    };
    let wall_ns = start.elapsed().as_nanos() as u64;
    anyhow::ensure!(reaped == pid, "wait4: {}", std::io::Error::last_os_error());
    // std's Child would try to reap again on wait(); it is not used after this point.
    drop(child);
    let exit = if libc::WIFSIGNALED(status) {
        RunExit::Signaled(libc::WTERMSIG(status))
    } else {
        RunExit::Exited(libc::WEXITSTATUS(status))
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    let mut sample = RunSample {
        wall_ns,
        cpu_ns: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss as u64,
        exit,
        stdout_sha256: out.sha256,
        stdout_len: out.len,
        stdout_preview: out.preview,
        counters: Default::default(),
        unsupported: Default::default(),
    };
    for (m, r) in counters.read() {
        match r {
            Ok(n) => {
                sample.counters.insert(m.name().to_string(), n);
            }
            Err(why) => {
                sample.unsupported.insert(m.name().to_string(), why);
            }
        }
    }
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_run() {
        let args = vec![OsString::from("-c"), OsString::from("echo hi; exit 3")];
        let spec = RunSpec {
            program: Path::new("/bin/sh"),
            argv0: "sh",
            args: &args,
            cpu: Some(0),
            metrics: &Metric::ALL,
        };
        let s = run_once(&spec).unwrap();
        assert_eq!(s.exit, RunExit::Exited(3));
        assert_eq!(s.stdout_preview, "hi\n");
        assert_eq!(s.stdout_len, 3);
        assert!(s.max_rss_kb > 0 && s.wall_ns > 0);
        assert!(s.counters["task-clock"] > 0, "{s:?}");
        assert!(s.counters["page-faults"] > 0, "{s:?}");
        for m in Metric::ALL {
            assert!(
                s.counters.contains_key(m.name()) != s.unsupported.contains_key(m.name()),
                "{} is either counted or unsupported",
                m.name()
            );
        }
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_hang() {
        let spec = RunSpec {
            program: Path::new("/nonexistent/x"),
            argv0: "x",
            args: &[],
            cpu: None,
            metrics: &[Metric::TaskClock],
        };
        assert!(run_once(&spec).is_err());
    }
}

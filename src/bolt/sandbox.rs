//! Running untrusted work (BOLT parsing arbitrary ELF files, test runs of its outputs) as
//! an unprivileged user, at idle priority, with limits, in a scratch directory of its own.
//!
//! The child, before `exec`: joins a new process group (so a timeout kills everything it
//! started), takes the idle I/O class (`ioprio_set`), nice 19 and `SCHED_IDLE`, gets
//! `RLIMIT_AS` (memory), `RLIMIT_FSIZE` (disk) and no core dumps, drops supplementary
//! groups, gid and uid to the sandbox user (`optbin` if that system user exists, else
//! `nobody`), asks to be killed if the daemon dies (`PR_SET_PDEATHSIG`, set after the uid
//! change, which clears it), and sets `no_new_privs`. Its environment is emptied but for a
//! fixed PATH, `LC_ALL=C` and HOME. When optbin itself is not root it cannot change users:
//! the child then keeps optbin's (already unprivileged) user and everything else applies.
//!
//! Scratch layout (see [`ScratchDir`]): `job-XXXX/` root-owned 0711 (enter, not list),
//! holding root-owned inputs the child may read, and `work/` owned by the sandbox user,
//! mode 0700, the child's only writable place and its cwd.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::process::{
    Pid, Signal, WaitId, WaitIdOptions, kill_process_group, test_kill_process_group, waitid,
};
use serde::{Deserialize, Serialize};

/// The most of a child's stdout/stderr kept (its end).
const CAPTURE_TAIL: u64 = 1 << 20;
const POLL: Duration = Duration::from_millis(20);

/// The user untrusted work runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl SandboxUser {
    /// `optbin` if it exists, else `nobody`; None when optbin is not root (it cannot switch
    /// users, and already runs unprivileged).
    pub fn resolve() -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        ["optbin", "nobody"].iter().find_map(|n| Self::lookup(n))
    }

    /// Looks a user up in the password database.
    pub fn lookup(name: &str) -> Option<Self> {
        let cname = CString::new(name).ok()?;
        // libc: rustix has no user database lookup (getpwnam_r goes through NSS).
        // SAFETY: passwd is plain data (integers and pointers); all-zero is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; buf outlives the use of pwd's fields
        // (we copy uid/gid only).
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() || pwd.pw_uid == 0 {
            return None;
        }
        Some(Self { name: name.to_string(), uid: pwd.pw_uid, gid: pwd.pw_gid })
    }
}

/// Resource limits of one child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLimits {
    pub timeout: Duration,
    /// RLIMIT_AS. BOLT's `-instrument` of ripgrep peaked at 800 MB here.
    pub memory_bytes: u64,
    /// RLIMIT_FSIZE: the largest file the child may write.
    pub file_size_bytes: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(600), memory_bytes: 4 << 30, file_size_bytes: 4 << 30 }
    }
}

/// Where and as whom children run.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub user: Option<SandboxUser>,
    pub scratch_root: PathBuf,
}

/// A job's private directory; removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    dir: tempfile::TempDir,
    work: PathBuf,
}

impl ScratchDir {
    /// The root-owned job directory (inputs live here).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The child's writable working directory.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// Copies `src` into the job directory as `name`, root-owned with `mode` (0644 for
    /// data, 0755 for programs): the child can read it but not change it.
    pub fn place(&self, src: &Path, name: &str, mode: u32) -> anyhow::Result<PathBuf> {
        let dst = self.dir.path().join(name);
        fs::copy(src, &dst)
            .with_context(|| format!("copying {} into the scratch directory", src.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
        Ok(dst)
    }
}

/// One command to run in the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxCommand<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    pub cwd: &'a Path,
    pub stdin: Option<&'a [u8]>,
    /// Send stderr into stdout's capture (BOLT's log is both).
    pub merge_stderr: bool,
    pub limits: &'a SandboxLimits,
    pub cancel: Option<&'a AtomicBool>,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
}

/// The captured end of a stream and its full length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Captured {
    pub len: u64,
    pub tail: Vec<u8>,
}

impl Captured {
    /// The last `max_bytes` as text, starting at a line boundary when one is near.
    pub fn tail_text(&self, max_bytes: usize) -> String {
        let start = self.tail.len().saturating_sub(max_bytes);
        let mut slice = &self.tail[start..];
        if start > 0
            && let Some(nl) = slice.iter().position(|&b| b == b'\n')
        {
            slice = &slice[nl + 1..];
        }
        String::from_utf8_lossy(slice).into_owned()
    }
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub termination: Termination,
    pub stdout: Captured,
    pub stderr: Captured,
    pub wall: Duration,
    pub peak_rss_kib: u64,
}

impl Sandbox {
    /// Uses `scratch_root` (created root-owned 0711 if missing) for job directories.
    pub fn new(scratch_root: &Path, user: Option<SandboxUser>) -> anyhow::Result<Self> {
        fs::create_dir_all(scratch_root)
            .with_context(|| format!("creating the scratch root {}", scratch_root.display()))?;
        fs::set_permissions(scratch_root, fs::Permissions::from_mode(0o711))?;
        if user.is_some() {
            // The child resolves absolute paths into its job directory: every ancestor
            // must let others search it.
            for dir in scratch_root.ancestors().skip(1) {
                let mode = fs::metadata(dir)?.permissions().mode();
                anyhow::ensure!(
                    mode & 0o001 != 0,
                    "the scratch root {} is inside {}, which the sandbox user cannot enter",
                    scratch_root.display(),
                    dir.display()
                );
            }
        }
        Ok(Self { user, scratch_root: scratch_root.to_path_buf() })
    }

    /// A fresh job directory with a `work/` the sandbox user owns.
    pub fn scratch(&self) -> anyhow::Result<ScratchDir> {
        let dir = tempfile::Builder::new()
            .prefix("job-")
            .tempdir_in(&self.scratch_root)
            .context("creating a scratch directory")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711))?;
        let work = dir.path().join("work");
        fs::create_dir(&work)?;
        fs::set_permissions(&work, fs::Permissions::from_mode(0o700))?;
        if let Some(u) = &self.user {
            std::os::unix::fs::chown(&work, Some(u.uid), Some(u.gid))
                .with_context(|| format!("giving {} to {}", work.display(), u.name))?;
        }
        Ok(ScratchDir { dir, work })
    }

    /// Runs a command to its end, its timeout or its cancellation; kills its whole process
    /// group in every case. Errors only when it cannot be started.
    pub fn run(&self, cmd: &SandboxCommand<'_>) -> anyhow::Result<RunResult> {
        let mut out = tempfile::tempfile().context("creating the output capture")?;
        let mut err = tempfile::tempfile().context("creating the error capture")?;
        let stdin = match cmd.stdin {
            Some(bytes) => {
                let mut f = tempfile::tempfile()?;
                f.write_all(bytes)?;
                f.seek(SeekFrom::Start(0))?;
                Stdio::from(f)
            }
            None => Stdio::null(),
        };
        let mut command = Command::new(cmd.program);
        command
            .args(cmd.args)
            .current_dir(cmd.cwd)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("HOME", cmd.cwd)
            .stdin(stdin)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(if cmd.merge_stderr { out.try_clone()? } else { err.try_clone()? }))
            .process_group(0);
        let setup = ChildSetup {
            ids: self.user.as_ref().map(|u| (u.uid, u.gid)),
            memory: cmd.limits.memory_bytes,
            file_size: cmd.limits.file_size_bytes,
        };
        // SAFETY: the closure only makes async-signal-safe system calls on values copied
        // in before the fork; it allocates nothing.
        unsafe {
            command.pre_exec(move || setup.apply());
        }
        let started = Instant::now();
        let child =
            command.spawn().with_context(|| format!("starting {}", cmd.program.display()))?;
        let pid = Pid::from_child(&child);
        let mut ended = None;
        loop {
            if exited_without_reaping(pid)? {
                break;
            }
            if started.elapsed() >= cmd.limits.timeout {
                ended = Some(Termination::TimedOut);
                break;
            }
            if cmd.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                ended = Some(Termination::Cancelled);
                break;
            }
            std::thread::sleep(POLL);
        }
        // The leader is a zombie or still running: its pid (= the group id) cannot be
        // reused yet, so this kills only what it started.
        let _ = kill_process_group(pid, Signal::KILL);
        let (status, rusage) = reap(pid)?;
        let wall = started.elapsed();
        wait_for_group_gone(pid);
        let termination = ended.unwrap_or(if libc::WIFEXITED(status) {
            Termination::Exited(libc::WEXITSTATUS(status))
        } else {
            Termination::Signaled(libc::WTERMSIG(status))
        });
        drop(child);
        Ok(RunResult {
            termination,
            stdout: capture(&mut out)?,
            stderr: if cmd.merge_stderr { Captured::default() } else { capture(&mut err)? },
            wall,
            peak_rss_kib: rusage.ru_maxrss.max(0) as u64,
        })
    }
}

/// What the child does to itself between fork and exec.
#[derive(Clone, Copy)]
struct ChildSetup {
    ids: Option<(u32, u32)>,
    memory: u64,
    file_size: u64,
}

impl ChildSetup {
    /// Runs in the child between fork and exec: async-signal-safe calls only (rustix's are
    /// raw system calls that allocate nothing; an Errno converts to io::Error without one).
    fn apply(&self) -> std::io::Result<()> {
        use rustix::process::{Resource, Rlimit, setpriority_process, setrlimit};
        let check = |rc: libc::c_int| {
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        };
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        // libc: rustix has no ioprio_set.
        // SAFETY: ioprio_set takes integers only and touches no memory of ours.
        unsafe {
            // Best effort: a kernel without an I/O scheduler that honours classes still runs.
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0,
                IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
            );
        }
        setpriority_process(None, 19)?;
        let param = libc::sched_param { sched_priority: 0 };
        // libc: rustix has no sched_setscheduler.
        // SAFETY: `param` is a valid sched_param for the call.
        check(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) })?;
        let limit = |res, v: u64| setrlimit(res, Rlimit { current: Some(v), maximum: Some(v) });
        limit(Resource::As, self.memory)?;
        limit(Resource::Fsize, self.file_size)?;
        limit(Resource::Core, 0)?;
        if let Some((uid, gid)) = self.ids {
            // libc: rustix's set_thread_* change only the calling thread's ids; the drop of
            // privileges stays with libc's process-wide calls.
            // SAFETY: setgroups with a count of 0 reads no list; setgid/setuid take ids.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
        }
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        rustix::thread::set_no_new_privs(true)?;
        Ok(())
    }
}

/// True once `pid` has exited; leaves it a zombie so its process group id stays reserved.
fn exited_without_reaping(pid: Pid) -> anyhow::Result<bool> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    loop {
        // None when nothing changed (the kernel left si_pid 0).
        match waitid(WaitId::Pid(pid), options) {
            Ok(status) => return Ok(status.is_some()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(std::io::Error::from(e)).context("waiting for the sandboxed child");
            }
        }
    }
}

/// Signals are delivered asynchronously: give the rest of the group a moment to die, so
/// that nothing of a job outlives [`Sandbox::run`] (bounded: a zombie whose new parent
/// never reaps it still counts as a member).
fn wait_for_group_gone(pgid: Pid) {
    for _ in 0..50 {
        if test_kill_process_group(pgid).is_err() {
            return;
        }
        let _ = kill_process_group(pgid, Signal::KILL);
        std::thread::sleep(POLL);
    }
}

fn reap(pid: Pid) -> anyhow::Result<(libc::c_int, libc::rusage)> {
    let pid = pid.as_raw_nonzero().get();
    loop {
        let mut status = 0;
        // libc: rustix's waits do not return the child's rusage.
        // SAFETY: rusage is plain integers; all-zero is a valid value.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `rusage` are valid out-pointers for the call.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if rc == pid {
            return Ok((status, rusage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("reaping the sandboxed child");
        }
    }
}

fn capture(file: &mut File) -> anyhow::Result<Captured> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(CAPTURE_TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail)?;
    Ok(Captured { len, tail })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_sh(sandbox: &Sandbox, script: &str, limits: &SandboxLimits) -> RunResult {
        let scratch = sandbox.scratch().unwrap();
        let args = vec!["-c".to_string(), script.to_string()];
        sandbox
            .run(&SandboxCommand {
                program: Path::new("/bin/sh"),
                args: &args,
                cwd: scratch.work(),
                stdin: Some(b"from stdin"),
                merge_stderr: false,
                limits,
                cancel: None,
            })
            .unwrap()
    }

    #[test]
    fn child_runs_unprivileged_idle_and_limited() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(root.path(), SandboxUser::resolve()).unwrap();
        let limits = SandboxLimits { memory_bytes: 1 << 30, ..Default::default() };
        let r = run_sh(
            &sandbox,
            "id -u; nice; ulimit -v; cat; echo; touch ok && echo wrote; echo err >&2; exit 3",
            &limits,
        );
        assert_eq!(r.termination, Termination::Exited(3));
        let out = String::from_utf8(r.stdout.tail.clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        // The suite runs as root; as another user this would check nothing, so it fails.
        assert!(rustix::process::geteuid().is_root(), "run the tests as root");
        assert_ne!(lines[0], "0", "ran as root: {out}");
        assert_eq!(lines[1], "19", "nice: {out}");
        assert_eq!(lines[2], (1u64 << 20).to_string(), "ulimit -v in KiB: {out}");
        assert_eq!(lines[3], "from stdin");
        assert_eq!(lines[4], "wrote", "the work dir is writable: {out}");
        assert_eq!(r.stderr.tail, b"err\n");
        let sched = fs::read_to_string("/proc/self/sched").unwrap_or_default();
        assert!(!sched.is_empty());
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(root.path(), SandboxUser::resolve()).unwrap();
        let limits = SandboxLimits { timeout: Duration::from_millis(300), ..Default::default() };
        let marker = format!("{}.{}", 40 + std::process::id() % 50, std::process::id() % 97);
        let r = run_sh(&sandbox, &format!("sleep {marker} & sleep {marker}; wait"), &limits);
        assert_eq!(r.termination, Termination::TimedOut);
        assert!(r.wall < Duration::from_secs(5));
        // SIGKILLed: they go within moments (a process being killed still shows in /proc
        // until the kernel has torn it down).
        let left = || {
            fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(&marker))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while left() > 0 {
            assert!(Instant::now() < deadline, "a sleeper of the killed group survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn tail_text_starts_at_a_line() {
        let c = Captured { len: 12, tail: b"abc\ndef\nghi\n".to_vec() };
        assert_eq!(c.tail_text(6), "ghi\n");
        assert_eq!(c.tail_text(100), "abc\ndef\nghi\n");
    }
}

//! Crash-proof serving. A FUSE mount whose server died answers ENOTCONN, and glibc's
//! `execvp` stops at ENOTCONN instead of trying the next PATH entry: a crashed daemon would
//! break every shell that has the mount on PATH. So the mount is owned by a supervisor:
//!
//! 1. the supervisor (still single-threaded) clears a stale mount, mounts, and answers the
//!    kernel's INIT ([`Connection`]); or it adopts the live connection that systemd's
//!    descriptor store or the holder kept while the previous supervisor was down
//!    ([`crate::fuse::fdstore`]), and hands a copy of its connection to that keeper;
//! 2. it forks the server process, which builds everything else (runtime, catalog,
//!    overlay: the caller's `start`) and runs a fuser session made from the connection. The
//!    session holds no mount guard: a server whose loop fails exits without unmounting;
//! 3. the supervisor never runs a thread or a request: it waits. When the server dies,
//!    the supervisor's copy of the fd keeps the connection alive, so requests queue in the
//!    kernel instead of failing; it forks a new server, which asks the kernel
//!    (FUSE_NOTIFY_RESEND, Linux >= 6.9) to re-queue the requests the dead server had read
//!    but not answered. Node ids are derived from what nodes are, so the new server
//!    understands the ids the kernel holds.
//!
//! Too many crashes in a row (see [`MountOptions`]) put the mount in safe mode
//! ([`crate::fuse::safe_mode`]): a server without catalog or optimizer serves every file as
//! its original and status says why; the full server is tried again after a back-off that
//! doubles on each failed try. Only if the safe server itself keeps crashing does the
//! supervisor unmount and give up, so that PATH falls through to the real directories.
//!
//! The supervisor makes itself the last candidate of the OOM killer (it is tiny, and its fd
//! is what keeps the mount alive); the server gets the default score back.
//!
//! Signals: SIGTERM/SIGINT to the supervisor are forwarded to the server, which unmounts
//! (lazily if programs from the mount still run), runs the caller's shutdown hook and exits
//! 0; the supervisor then removes the pid file, tells the keeper to drop the stored
//! connection and exits 0. SIGUSR1 to a server makes it hand over: it runs its shutdown
//! hook and exits without unmounting (the supervisor uses it to leave safe mode; a server
//! whose supervisor died gets it when a keeper holds the connection, SIGTERM otherwise).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rustix::pipe::{PipeFlags, pipe_with};
use rustix::process::{
    Pid, Signal, WaitOptions, getppid, kill_process, set_parent_process_death_signal, waitpid,
};

use crate::fs::{Overlay, OverlayConfig};
use crate::fuse::adapter::{NotifierInvalidator, OptbinFs};
use crate::fuse::connection::Connection;
use crate::fuse::fdstore::{self, StoredState};
use crate::fuse::mount::{MountOptions, fuser_config, prepare_mountpoint, unmount};
use crate::fuse::safe_mode::{self, SafeModeInfo};

/// What a server process is told when it starts.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// 0 for the first server, then 1, 2, ... after each crash (and on across a supervisor
    /// that adopted the connection).
    pub generation: u64,
    pub mountpoint: PathBuf,
}

/// What `start` returns: the overlay to serve and what to run on clean shutdown.
pub struct Served {
    pub overlay: Arc<Overlay>,
    pub shutdown: Box<dyn FnOnce() + Send>,
}

/// Server exit codes the supervisor acts on.
const EXIT_STOPPED: i32 = 0;
const EXIT_START_FAILED: i32 = 2;
const EXIT_LOOP_FAILED: i32 = 3;
const EXIT_HANDED_OVER: i32 = 4;

/// Longest wait between two tries of the full server in safe mode.
const MAX_SAFE_MODE_BACKOFF: Duration = Duration::from_secs(600);

/// Which server to run.
#[derive(Debug, Clone)]
enum Mode {
    Full,
    Safe(SafeModeInfo),
}

/// Mounts and serves under a supervisor (see the module doc). Call it before the process
/// has any other thread: it forks. `start` runs in each full server process (after every
/// restart) and must build everything the server needs there. The supervisor owns SIGTERM
/// and SIGINT (they stay blocked in the server; a dedicated thread waits for them).
///
/// Returns in the supervisor only, when serving ended: Ok after a clean stop (signal or
/// unmount), Err when it could not mount or gave up after repeated crashes of even the
/// safe server.
pub fn run_supervised<F>(opts: &MountOptions, mut start: F) -> anyhow::Result<()>
where
    F: FnMut(ServeContext) -> anyhow::Result<Served>,
{
    let (conn, state, mut generation, adopted, mountpoint) = match fdstore::take_stored()? {
        Some(a) => {
            let mountpoint = crate::fs::absolute_mountpoint(&opts.mountpoint)?;
            tracing::info!(
                mountpoint = %mountpoint.display(),
                generation = a.generation,
                "adopting the live FUSE connection kept while the daemon was down"
            );
            (a.connection, a.state, a.generation, true, mountpoint)
        }
        None => {
            let mountpoint = prepare_mountpoint(&opts.mountpoint)?;
            let conn = Connection::mount(&mountpoint)?;
            let fs = OptbinFs::handshake_only(opts.passthrough);
            if let Err(e) = conn.handshake(fs, &fuser_config(opts)) {
                let _ = unmount(&mountpoint);
                return Err(e);
            }
            let state = StoredState::create(0, conn.init_request())?;
            tracing::info!(mountpoint = %mountpoint.display(), "mounted; starting the server");
            (conn, state, 0, false, mountpoint)
        }
    };
    let stored = fdstore::store(&conn, &state);
    set_oom_score_adj(-1000);

    let signals = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD]);
    // libc: rustix masks signals and installs handlers only in its unstable `runtime` module.
    // SAFETY: plain signal mask manipulation on a valid set; the handler only stores to
    // an atomic (async-signal-safe).
    unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
        // Should another thread exist after all (the caller's), a stop signal delivered to
        // it is not lost: the handler records it for the wait loop.
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = record_stop_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    let supervisor = Supervisor { opts, conn: &conn, mountpoint: &mountpoint, stored };
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut safe: Option<SafeModeInfo> = None;
    let mut backoff = opts.safe_mode_retry;
    // A full server started from safe mode, until it survives `restart_window`.
    let mut on_trial = false;
    let mut resend = adopted;
    loop {
        state.set_generation(generation + 1);
        let mode = match &safe {
            Some(info) if !on_trial => Mode::Safe(info.clone()),
            _ => Mode::Full,
        };
        let started = Instant::now();
        let (pid, errors) = supervisor.fork_server(&mode, generation, resend, &mut start)?;
        tracing::info!(
            pid = pid.as_raw_nonzero().get(),
            generation,
            safe_mode = matches!(mode, Mode::Safe(_)),
            "server started"
        );
        let retry_at = match &mode {
            Mode::Safe(info) => Some(
                Instant::now()
                    + info.retry_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
            ),
            Mode::Full => None,
        };
        let ended = wait_for(pid, &signals, retry_at);
        let start_error = read_all(errors);
        let code = libc::WIFEXITED(ended.status).then(|| libc::WEXITSTATUS(ended.status));
        if code == Some(EXIT_STOPPED) {
            tracing::info!("server stopped cleanly");
            supervisor.clean_up();
            return Ok(());
        }
        let why = match (&start_error, code) {
            (Some(e), Some(EXIT_START_FAILED)) => format!("the server could not start: {e}"),
            _ => describe(ended.status),
        };
        if ended.stopping {
            tracing::warn!(why, "server ended badly while stopping; unmounting");
            let _ = unmount(&mountpoint);
            supervisor.clean_up();
            return Ok(());
        }
        if !conn.alive() {
            tracing::info!(why, "server ended and the mount is gone; nothing to supervise");
            supervisor.clean_up();
            return Ok(());
        }
        generation += 1;
        resend = true;
        if ended.leaving_safe_mode && code == Some(EXIT_HANDED_OVER) {
            tracing::info!("trying the full server again");
            on_trial = true;
            continue;
        }
        let now = Instant::now();
        if on_trial && now.duration_since(started) > opts.restart_window {
            tracing::info!("the full server is back; leaving safe mode");
            on_trial = false;
            safe = None;
            backoff = opts.safe_mode_retry;
        }
        match &mut safe {
            Some(info) if !on_trial => {
                // The safe server itself crashed.
                crashes.push_back(now);
                prune(&mut crashes, now, opts.restart_window);
                if crashes.len() >= opts.max_crashes {
                    tracing::error!(why, "even the safe-mode server keeps crashing; unmounting");
                    let _ = unmount(&mountpoint);
                    supervisor.clean_up();
                    bail!(
                        "the safe-mode server crashed {} times within {:?} ({why}); the full \
                         server before it: {}",
                        crashes.len(),
                        opts.restart_window,
                        info.reason
                    );
                }
                tracing::error!(why, "the safe-mode server died; restarting it");
            }
            Some(info) => {
                on_trial = false;
                backoff = (backoff * 2).min(MAX_SAFE_MODE_BACKOFF);
                info.reason = format!("the full server failed again on retry: {why}");
                info.retries += 1;
                info.retry_at = SystemTime::now() + backoff;
                crashes.clear();
                tracing::error!(why, ?backoff, "the full server failed again; back to safe mode");
            }
            None => {
                crashes.push_back(now);
                prune(&mut crashes, now, opts.restart_window);
                if crashes.len() >= opts.max_crashes {
                    let reason = format!(
                        "the server failed {} times within {}s (last: {why})",
                        crashes.len(),
                        opts.restart_window.as_secs()
                    );
                    tracing::error!(reason, ?backoff, "entering safe mode: serving originals");
                    safe = Some(SafeModeInfo {
                        reason,
                        since: SystemTime::now(),
                        retry_at: SystemTime::now() + backoff,
                        retries: 0,
                        supervisor_pid: std::process::id(),
                    });
                    crashes.clear();
                } else {
                    tracing::error!(
                        why,
                        generation,
                        "server died; restarting it (requests wait in the kernel)"
                    );
                }
            }
        }
    }
}

fn prune(crashes: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while crashes.front().is_some_and(|t| now.duration_since(*t) > window) {
        crashes.pop_front();
    }
}

struct Supervisor<'a> {
    opts: &'a MountOptions,
    conn: &'a Connection,
    mountpoint: &'a Path,
    /// Whether a keeper (systemd, the holder) holds a copy of the connection.
    stored: bool,
}

impl Supervisor<'_> {
    /// Forks a server; returns its pid and the read end of its start-up error pipe.
    fn fork_server<F>(
        &self,
        mode: &Mode,
        generation: u64,
        resend: bool,
        start: &mut F,
    ) -> anyhow::Result<(Pid, OwnedFd)>
    where
        F: FnMut(ServeContext) -> anyhow::Result<Served>,
    {
        let (read_end, write_end) =
            pipe_with(PipeFlags::CLOEXEC).map_err(std::io::Error::from).context("pipe2")?;
        let supervisor_pid = std::process::id();
        // libc: rustix has no safe fork (only the unsafe `runtime::kernel_fork`, which
        // skips libc's at-fork handlers).
        // SAFETY: the supervisor is single-threaded (documented requirement), so the child
        // starts from a consistent copy of it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            drop(read_end);
            let code = self.serve(mode, generation, resend, supervisor_pid, start, write_end);
            // Never return into the supervisor's code in the child.
            std::process::exit(code);
        }
        Ok((Pid::from_raw(pid).context("fork returned no pid")?, read_end))
    }

    /// The server process. Returns its exit code.
    fn serve<F>(
        &self,
        mode: &Mode,
        generation: u64,
        resend: bool,
        supervisor_pid: u32,
        start: &mut F,
        errors: OwnedFd,
    ) -> i32
    where
        F: FnMut(ServeContext) -> anyhow::Result<Served>,
    {
        // When the supervisor dies: with a keeper holding the connection, leave the mount
        // to the next supervisor (hand over); without one, stop cleanly (unmount) rather
        // than serve unsupervised.
        let parent_death = if self.stored { Signal::USR1 } else { Signal::TERM };
        change_signal_mask(libc::SIG_BLOCK, &[libc::SIGUSR1]);
        let _ = set_parent_process_death_signal(Some(parent_death));
        if getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(supervisor_pid) {
            return EXIT_HANDED_OVER;
        }
        change_signal_mask(libc::SIG_UNBLOCK, &[libc::SIGCHLD]);
        set_oom_score_adj(0);
        let opts = self.opts;
        if let Some(pid_file) = &opts.server_pid_file
            && let Err(e) = write_atomically(pid_file, &format!("{}\n", std::process::id()))
        {
            tracing::warn!(path = %pid_file.display(), error = %e, "writing the server pid file");
        }
        let fail = |e: anyhow::Error| {
            let text = format!("{e:#}");
            tracing::error!(error = text, "the server could not start");
            let _ =
                std::fs::File::from(errors.try_clone().expect("dup")).write_all(text.as_bytes());
            EXIT_START_FAILED
        };
        let served = match mode {
            Mode::Full => {
                start(ServeContext { generation, mountpoint: self.mountpoint.to_path_buf() })
            }
            Mode::Safe(info) => {
                let config = OverlayConfig {
                    mountpoint: self.mountpoint.to_path_buf(),
                    overlay_dirs: opts.overlay_dirs.clone(),
                    // Safe mode needs no state: originals are served as they are.
                    originals: None,
                };
                safe_mode::overlay(config, info.clone())
                    .map(|overlay| Served { overlay, shutdown: Box::new(|| {}) })
            }
        };
        let served = match served {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let overlay = served.overlay.clone();
        let fs = OptbinFs::new(overlay.clone(), generation, opts.passthrough);
        let session = match self.conn.session(fs, &fuser_config(opts)) {
            Ok(s) => s,
            Err(e) => return fail(e.context("making the FUSE session")),
        };
        if let Err(e) = overlay.attach(Arc::new(NotifierInvalidator(session.notifier()))) {
            return fail(e.context("attaching the overlay"));
        }
        if resend {
            self.conn.resend_interrupted_requests();
        }
        let shutdown = Arc::new(Mutex::new(Some(served.shutdown)));
        let run_shutdown = {
            let shutdown = shutdown.clone();
            let overlay = overlay.clone();
            move || {
                overlay.detach();
                if let Some(hook) = shutdown.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    hook();
                }
            }
        };
        let on_signal = run_shutdown.clone();
        let mountpoint = self.mountpoint.to_path_buf();
        let signals = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1]);
        let spawned = std::thread::Builder::new().name("optbin-signals".into()).spawn(move || {
            let mut sig = 0;
            // libc: rustix waits for signals only in its unstable `runtime` module.
            // SAFETY: waits for the blocked signals of a valid set; writes `sig` only.
            unsafe { libc::sigwait(&signals, &mut sig) };
            if sig == libc::SIGUSR1 {
                tracing::info!("handing the mount over to the next server");
                on_signal();
                std::process::exit(EXIT_HANDED_OVER);
            }
            tracing::info!(sig, "stopping: unmounting");
            match unmount(&mountpoint) {
                Ok(how) => tracing::info!(?how, "unmounted"),
                Err(e) => tracing::error!(error = format!("{e:#}"), "unmount failed"),
            }
            on_signal();
            std::process::exit(EXIT_STOPPED);
        });
        if let Err(e) = spawned {
            return fail(anyhow::Error::new(e).context("spawning the signal thread"));
        }
        drop(errors);
        tracing::info!(generation, safe_mode = matches!(mode, Mode::Safe(_)), "serving");
        match run_session_loop(session) {
            Ok(()) => {
                tracing::info!("the mount is gone; stopping");
                run_shutdown();
                EXIT_STOPPED
            }
            Err(e) => {
                // The mount stays: it is the supervisor's, for the next server.
                tracing::error!(error = %e, "the session loop failed");
                EXIT_LOOP_FAILED
            }
        }
    }

    /// After the mount is gone for good.
    fn clean_up(&self) {
        if let Some(pid_file) = &self.opts.server_pid_file {
            let _ = std::fs::remove_file(pid_file);
        }
        if self.stored {
            fdstore::forget();
        }
    }
}

/// Runs the server's session loop. The session holds no mount guard (it was made by
/// [`Connection::session`]), so however the loop ends, nothing is unmounted here.
fn run_session_loop(session: fuser::Session<OptbinFs>) -> std::io::Result<()> {
    session.run()
}

static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn record_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// A signal set for sigprocmask and the waits. libc: rustix handles signal sets only in its
/// unstable `runtime` module.
fn signal_set(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialized by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// sigprocmask(2): `how` (SIG_BLOCK, SIG_UNBLOCK) the calling thread's mask with `signals`.
fn change_signal_mask(how: libc::c_int, signals: &[i32]) {
    let set = signal_set(signals);
    // SAFETY: a valid, initialized set; the old mask is not asked for.
    unsafe { libc::sigprocmask(how, &set, std::ptr::null_mut()) };
}

struct Ended {
    status: i32,
    /// A stop (SIGTERM/SIGINT) was requested and forwarded.
    stopping: bool,
    /// The safe-mode server was told to hand over (its retry time came).
    leaving_safe_mode: bool,
}

/// Waits for the server to end, forwarding SIGTERM/SIGINT; at `hand_over_at`, tells it to
/// hand over (SIGUSR1).
fn wait_for(pid: Pid, signals: &libc::sigset_t, hand_over_at: Option<Instant>) -> Ended {
    let mut ended = Ended { status: 0, stopping: false, leaving_safe_mode: false };
    loop {
        if let Ok(Some((_, status))) = waitpid(Some(pid), WaitOptions::NOHANG) {
            ended.status = status.as_raw();
            return ended;
        }
        if !ended.stopping
            && !ended.leaving_safe_mode
            && hand_over_at.is_some_and(|t| Instant::now() >= t)
        {
            ended.leaving_safe_mode = true;
            let _ = kill_process(pid, Signal::USR1);
        }
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        // libc: rustix waits for signals only in its unstable `runtime` module.
        // SAFETY: valid set and timeout; the info struct is not needed.
        let mut sig = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        let recorded = STOP_SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
        if recorded != 0 {
            sig = recorded;
        }
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            tracing::info!(sig, "stop requested; forwarding to the server");
            ended.stopping = true;
            if let Some(sig) = Signal::from_named_raw(sig) {
                let _ = kill_process(pid, sig);
            }
        }
    }
}

fn read_all(fd: OwnedFd) -> Option<String> {
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text).ok()?;
    (!text.is_empty()).then_some(text)
}

fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            EXIT_LOOP_FAILED => "its session loop failed".into(),
            code => format!("exited with status {code}"),
        }
    } else {
        format!("wait status {status:#x}")
    }
}

fn set_oom_score_adj(score: i32) {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", score.to_string()) {
        tracing::debug!(error = %e, score, "cannot set oom_score_adj");
    }
}

/// Readers never see a half-written file.
fn write_atomically(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted(path: &std::path::Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        mounts.lines().any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
    }

    /// The server's session loop fails (here: at once, for want of threads; in life: a
    /// panicking request thread, a read error). The mount must stay: it belongs to the
    /// supervisor, which restarts the server on it. (With fuser's own mount guard, as
    /// before, this test failed: the loop's end unmounted.)
    #[test]
    fn a_failing_session_loop_never_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = std::fs::canonicalize(dir.path()).unwrap();
        let opts = MountOptions::new(&mnt);
        let conn = Connection::mount(&mnt).unwrap();
        let fs = || OptbinFs::handshake_only(false);
        conn.handshake(fs(), &fuser_config(&opts)).unwrap();
        assert!(mounted(&mnt));
        let mut config = fuser_config(&opts);
        config.n_threads = Some(0);
        let session = conn.session(fs(), &config).unwrap();
        let result = run_session_loop(session);
        assert!(result.is_err(), "the loop was made to fail");
        let still = mounted(&mnt) && conn.alive();
        let _ = unmount(&mnt);
        assert!(still, "a failing session loop unmounted the supervisor's mount");
    }
}

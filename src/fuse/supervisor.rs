//! Crash-proof serving. A FUSE mount whose server died answers ENOTCONN, and glibc's
//! `execvp` stops at ENOTCONN instead of trying the next PATH entry: a crashed daemon would
//! break every shell that has the mount on PATH. So the mount is owned by a supervisor:
//!
//! 1. the supervisor (still single-threaded) clears a stale mount, mounts, and completes
//!    the FUSE INIT handshake;
//! 2. it forks the server process, which builds everything else (runtime, catalog,
//!    overlay: the caller's `start`) and runs the session loop on the inherited
//!    `/dev/fuse` fd;
//! 3. the supervisor never runs a thread or a request: it waits. When the server dies,
//!    the supervisor's copy of the fd keeps the connection alive, so requests queue in the
//!    kernel instead of failing; it forks a new server from its pristine post-handshake
//!    state, which asks the kernel (FUSE_NOTIFY_RESEND, Linux >= 6.9) to re-queue the
//!    requests the dead server had read but not answered. Node ids are derived from what
//!    nodes are, so the new server understands the ids the kernel holds.
//!
//! The supervisor makes itself the last candidate of the OOM killer (it is tiny, and its fd
//! is what keeps the mount alive); the server gets the default score back.
//!
//! Not covered: SIGKILL of the supervisor itself (or of the whole service at once) leaves a
//! dead mount answering ENOTCONN until the next start clears it ([`prepare_mountpoint`]).
//!
//! SIGTERM/SIGINT to the supervisor are forwarded to the server, which unmounts (lazily if
//! programs from the mount still run), runs the caller's shutdown hook and exits 0; the
//! supervisor then exits 0. Too many crashes in a row (see [`MountOptions`]) make the
//! supervisor unmount and give up, so that PATH falls through to the real directories.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::fs::Overlay;
use crate::fuse::adapter::{NotifierInvalidator, OptbinFs, Shared};
use crate::fuse::mount::{MountOptions, fuser_config, prepare_mountpoint, unmount};

/// What a server process is told when it starts.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// 0 for the first server, then 1, 2, ... after each crash.
    pub generation: u64,
    pub mountpoint: PathBuf,
}

/// What `start` returns: the overlay to serve and what to run on clean shutdown.
pub struct Served {
    pub overlay: Arc<Overlay>,
    pub shutdown: Box<dyn FnOnce() + Send>,
}

const FUSE_NOTIFY_RESEND: i32 = 7;

/// Mounts and serves under a supervisor (see the module doc). Call it before the process
/// has any other thread: it forks. `start` runs in each server process (after every
/// restart) and must build everything the server needs there. The supervisor owns SIGTERM
/// and SIGINT (they stay blocked in the server; a dedicated thread waits for them).
///
/// Returns in the supervisor only, when serving ended: Ok after a clean stop (signal or
/// unmount), Err when it gave up after repeated crashes or could not mount.
pub fn run_supervised<F>(opts: &MountOptions, mut start: F) -> anyhow::Result<()>
where
    F: FnMut(ServeContext) -> anyhow::Result<Served>,
{
    let mountpoint = prepare_mountpoint(&opts.mountpoint)?;
    let shared = Arc::new(Shared::default());
    let session = fuser::Session::new(
        OptbinFs::new(shared.clone(), opts.passthrough),
        &mountpoint,
        &fuser_config(opts),
    )
    .with_context(|| format!("mounting {}", mountpoint.display()))?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted; starting the server");
    set_oom_score_adj(-1000);

    let signals = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD]);
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
    let supervisor_pid = std::process::id();
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut generation = 0u64;
    loop {
        // SAFETY: the supervisor is single-threaded (documented requirement), so the child
        // starts from a consistent copy of it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            let _ = unmount(&mountpoint);
            return Err(e).context("fork");
        }
        if pid == 0 {
            let code =
                serve(&session, &shared, opts, &mountpoint, generation, supervisor_pid, &mut start);
            // Never run the session's destructors here: they would unmount.
            std::process::exit(code);
        }
        tracing::info!(pid, generation, "server started");
        let (status, stopping) = wait_for(pid, &signals);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            tracing::info!("server stopped cleanly");
            std::mem::forget(session);
            return Ok(());
        }
        let why = describe(status);
        if stopping {
            tracing::warn!(why, "server ended badly while stopping; unmounting");
            let _ = unmount(&mountpoint);
            std::mem::forget(session);
            return Ok(());
        }
        if !connection_alive(&session) {
            tracing::info!(why, "server ended and the mount is gone; nothing to supervise");
            std::mem::forget(session);
            return Ok(());
        }
        let now = Instant::now();
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.duration_since(*t) > opts.restart_window) {
            crashes.pop_front();
        }
        if crashes.len() >= opts.max_crashes {
            tracing::error!(
                why,
                crashes = crashes.len(),
                "server keeps crashing; unmounting and giving up"
            );
            let _ = unmount(&mountpoint);
            std::mem::forget(session);
            bail!(
                "the server crashed {} times within {:?} ({why})",
                crashes.len(),
                opts.restart_window
            );
        }
        generation += 1;
        tracing::error!(
            why,
            generation,
            "server died; restarting it (requests wait in the kernel)"
        );
    }
}

static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn record_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

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

/// Waits for the server to end, forwarding SIGTERM/SIGINT. Returns its wait status and
/// whether a stop was requested.
fn wait_for(pid: libc::pid_t, signals: &libc::sigset_t) -> (i32, bool) {
    let mut stopping = false;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return (status, stopping);
        }
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        // SAFETY: valid set and timeout; the info struct is not needed.
        let mut sig = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        let recorded = STOP_SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
        if recorded != 0 {
            sig = recorded;
        }
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            tracing::info!(sig, "stop requested; forwarding to the server");
            stopping = true;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Whether the FUSE connection still exists (poll reports an error once it was aborted).
fn connection_alive(fd: &impl AsFd) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_fd().as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) };
    pfd.revents & libc::POLLERR == 0
}

/// The server process. Returns its exit code.
fn serve<F>(
    session: &fuser::Session<OptbinFs>,
    shared: &Arc<Shared>,
    opts: &MountOptions,
    mountpoint: &std::path::Path,
    generation: u64,
    supervisor_pid: u32,
    start: &mut F,
) -> i32
where
    F: FnMut(ServeContext) -> anyhow::Result<Served>,
{
    // SAFETY: prctl/getppid/sigprocmask have no memory-safety preconditions.
    unsafe {
        // If the supervisor dies, stop cleanly (unmount) rather than serve unsupervised.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() as u32 != supervisor_pid {
            return 1;
        }
        let chld = signal_set(&[libc::SIGCHLD]);
        libc::sigprocmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut());
    }
    set_oom_score_adj(0);
    if let Some(pid_file) = &opts.server_pid_file
        && let Err(e) = write_atomically(pid_file, &format!("{}\n", std::process::id()))
    {
        tracing::warn!(path = %pid_file.display(), error = %e, "writing the server pid file");
    }
    let served = match start(ServeContext { generation, mountpoint: mountpoint.to_path_buf() }) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the server could not start");
            return 2;
        }
    };
    let overlay = served.overlay.clone();
    shared.generation.store(generation, std::sync::atomic::Ordering::SeqCst);
    let _ = shared.overlay.set(overlay.clone());
    if let Err(e) = overlay.attach(Arc::new(NotifierInvalidator(session.notifier()))) {
        tracing::error!(error = format!("{e:#}"), "attaching the overlay");
        return 2;
    }
    if generation > 0 {
        resend_interrupted_requests(session);
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
    let mountpoint_owned = mountpoint.to_path_buf();
    let signals = signal_set(&[libc::SIGTERM, libc::SIGINT]);
    let spawned = std::thread::Builder::new().name("optbin-signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: waits for the blocked signals.
        unsafe { libc::sigwait(&signals, &mut sig) };
        tracing::info!(sig, "stopping: unmounting");
        match unmount(&mountpoint_owned) {
            Ok(how) => tracing::info!(?how, "unmounted"),
            Err(e) => tracing::error!(error = format!("{e:#}"), "unmount failed"),
        }
        on_signal();
        std::process::exit(0);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "spawning the signal thread");
        return 2;
    }
    tracing::info!(generation, "serving");
    // The session loop runs on threads reading the shared fd; it ends when the mount goes.
    // The session is borrowed from the supervisor's copy: run it through a raw copy that is
    // never dropped (dropping it would unmount).
    // SAFETY: this process never touches `session` again and exits without dropping it.
    let owned: fuser::Session<OptbinFs> = unsafe { std::ptr::read(session) };
    let result = owned.run();
    match result {
        Ok(()) => {
            tracing::info!("the mount is gone; stopping");
            run_shutdown();
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "the session loop failed");
            3
        }
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

/// Asks the kernel to queue again the requests a dead server had read but not answered.
fn resend_interrupted_requests(fd: &impl AsFd) {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a valid buffer to the fuse fd.
    let n = unsafe { libc::write(fd.as_fd().as_raw_fd(), header.as_ptr().cast(), header.len()) };
    if n == 16 {
        tracing::info!("asked the kernel to resend interrupted requests");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "FUSE_NOTIFY_RESEND failed (kernel < 6.9?)");
    }
}

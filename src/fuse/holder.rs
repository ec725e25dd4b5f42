//! The holder: what systemd does for the service, for machines without systemd.
//!
//! `optbin mount` (in the background) starts `optbin hold`, a tiny single-threaded parent
//! of the daemon that keeps copies of its FUSE connection and restarts it when it dies,
//! so that even SIGKILL of the whole daemon (supervisor and server) costs a pause, not
//! failed commands. It speaks the same protocol as systemd (see [`crate::fuse::fdstore`]):
//! the daemon finds a datagram socket in `NOTIFY_SOCKET` and stores descriptors there with
//! `FDSTORE=1`/`FDNAME=`; a restarted daemon gets them back as `LISTEN_FDS`/
//! `LISTEN_FDNAMES`/`LISTEN_PID` from descriptor 3 on. The daemon code is one for both.
//!
//! Restart rules (`Restart=on-failure`): exit 0 is a clean stop, the holder exits too; a
//! failure before anything was stored is a start-up error, the holder exits with it (the
//! `optbin mount` that started it shows the log); a failure with a live stored connection
//! restarts the daemon at once. More than [`MAX_RESTARTS`] within [`RESTART_WINDOW`] and
//! the holder gives up: it unmounts lazily (PATH falls through to the real directories
//! instead of waiting on a mount nobody serves) and exits 1. SIGTERM/SIGINT are forwarded
//! to the daemon.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::net::sockopt::set_socket_passcred;
use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, socket_with};
use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};

use crate::fuse::fdstore;

pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn record_signal(sig: libc::c_int) {
    SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Runs `command` (the daemon, in the foreground) under the holder until it stops cleanly.
pub fn run(mountpoint: &Path, command: &[OsString]) -> anyhow::Result<ExitCode> {
    if command.is_empty() {
        bail!("no command to hold");
    }
    let name = format!("@optbin-holder-{}", std::process::id());
    let sock = bind_notify_socket(&name)?;
    // libc: rustix installs signal handlers only in its unstable `runtime` module.
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe); the
    // sigaction struct is plain data, zeroed then filled.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = record_signal as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    let mut stored: Vec<(String, OwnedFd)> = Vec::new();
    let mut restarts: Vec<Instant> = Vec::new();
    let mut stopping = false;
    loop {
        let pid = spawn(command, &name, &stored)?;
        tracing::info!(
            pid = pid.as_raw_nonzero().get(),
            stored = stored.len(),
            "holder: daemon started"
        );
        let status = loop {
            receive(&sock, &mut stored);
            if let Ok(Some((_, status))) = waitpid(Some(pid), WaitOptions::NOHANG) {
                // Take what it stored just before it died.
                receive(&sock, &mut stored);
                break status.as_raw();
            }
            let sig = SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
            if sig != 0 {
                stopping = true;
                // SIGTERM or SIGINT, the signals recorded above.
                if let Some(sig) = Signal::from_named_raw(sig) {
                    let _ = kill_process(pid, sig);
                }
            }
        };
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if clean || stopping {
            tracing::info!(clean, "holder: the daemon stopped; so does the holder");
            return Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        stored.retain(|(_, fd)| fd_alive(fd));
        if !stored.iter().any(|(n, _)| n == fdstore::FUSE_NAME) {
            tracing::error!(status, "holder: the daemon failed with no connection to keep");
            let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
            return Ok(ExitCode::from(code.clamp(1, 255) as u8));
        }
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        restarts.push(now);
        if restarts.len() > MAX_RESTARTS {
            tracing::error!(
                "holder: the daemon died {} times within {:?}; unmounting so that PATH falls \
                 through to the real directories",
                restarts.len(),
                RESTART_WINDOW
            );
            let _ = crate::fuse::unmount_lazily(mountpoint);
            return Ok(ExitCode::FAILURE);
        }
        tracing::warn!(status, "holder: the daemon died; restarting it on the kept connection");
    }
}

/// Whether a stored descriptor is still worth keeping (a FUSE connection that was
/// unmounted reports POLLERR, as systemd's `FDPOLL` would notice).
fn fd_alive(fd: &OwnedFd) -> bool {
    crate::fuse::connection::alive(fd.as_fd())
}

fn bind_notify_socket(name: &str) -> anyhow::Result<OwnedFd> {
    let sock = socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(std::io::Error::from)
    .context("socket")?;
    let addr = fdstore::unix_addr(name.as_bytes())?;
    // The kernel attaches each sender's credentials: only root may store here.
    let _ = set_socket_passcred(&sock, true);
    bind(&sock, &addr).map_err(std::io::Error::from).context("binding the holder's socket")?;
    Ok(sock)
}

/// Takes the datagrams waiting on the socket (up to 100 ms for the first).
fn receive(sock: &OwnedFd, stored: &mut Vec<(String, OwnedFd)>) {
    let mut pfd = [PollFd::new(sock, PollFlags::IN)];
    if !matches!(poll(&mut pfd, Some(&Timespec { tv_sec: 0, tv_nsec: 100_000_000 })), Ok(n) if n > 0)
    {
        return;
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, fds, uid)) = fdstore::recv_with_fds(sock.as_fd(), &mut buf) else {
            return;
        };
        // The socket's name is abstract (no file permissions): only root's messages count.
        if uid != Some(0) {
            continue;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        let mut name = None;
        let (mut store, mut remove) = (false, false);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("FDSTORE", "1")) => store = true,
                Some(("FDSTOREREMOVE", "1")) => remove = true,
                Some(("FDNAME", n)) => name = Some(n.to_string()),
                _ => {}
            }
        }
        let Some(name) = name else { continue };
        if remove {
            stored.retain(|(n, _)| *n != name);
        } else if store && let Some(fd) = fds.into_iter().next() {
            stored.retain(|(n, _)| *n != name);
            stored.push((name, fd));
        }
    }
}

/// Forks and execs the daemon with the stored descriptors from fd 3 on.
fn spawn(
    command: &[OsString],
    notify_name: &str,
    stored: &[(String, OwnedFd)],
) -> anyhow::Result<Pid> {
    let argv: Vec<CString> =
        command.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(
                k.to_str(),
                Some("NOTIFY_SOCKET" | "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
            )
        })
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv)
        })
        .collect::<Result<_, _>>()?;
    env.push(CString::new(format!("NOTIFY_SOCKET={notify_name}"))?);
    if !stored.is_empty() {
        env.push(CString::new(format!("LISTEN_FDS={}", stored.len()))?);
        let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
        env.push(CString::new(format!("LISTEN_FDNAMES={}", names.join(":")))?);
    }
    // Moved out of the way of 3.. first, so that dup2 in the child cannot clobber them.
    let high: Vec<OwnedFd> = stored
        .iter()
        .map(|(_, fd)| rustix::io::fcntl_dupfd_cloexec(fd, 100).map_err(std::io::Error::from))
        .collect::<Result<_, _>>()
        .context("duplicating the stored descriptors")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // LISTEN_PID is the child's own pid, known only after the fork: its slot is filled in
    // there, in a buffer made here.
    let mut listen_pid = *b"LISTEN_PID=\0\0\0\0\0\0\0\0\0\0\0\0";
    let listen_pid: *mut u8 = listen_pid.as_mut_ptr();
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    if !stored.is_empty() {
        env_ptrs.push(listen_pid.cast_const().cast());
    }
    env_ptrs.push(std::ptr::null());
    // libc: rustix has no safe fork (only the unsafe `runtime::kernel_fork`); the child
    // between fork and execve stays with libc's plain calls on raw descriptors.
    // SAFETY: the holder is single-threaded; the child only calls async-signal-safe
    // functions (dup2, getpid, execve, _exit) and writes into memory prepared above.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(fd.as_raw_fd(), 3 + i as i32) < 0 {
                    libc::_exit(127);
                }
            }
            let mut digits = [0u8; 12];
            let mut n = libc::getpid() as u32;
            let mut len = 0;
            loop {
                digits[len] = b'0' + (n % 10) as u8;
                len += 1;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            for i in 0..len {
                *listen_pid.add(11 + i) = digits[len - 1 - i];
            }
            *listen_pid.add(11 + len) = 0;
            libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            libc::_exit(127);
        }
        Pid::from_raw(pid).context("fork returned no pid")
    }
}

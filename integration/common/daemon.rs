//! The real `optbin` daemon as a child process of a test: started on temp directories,
//! driven through its mount, and always stopped and unmounted (also when the test panics).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OPTBIN: &str = env!("CARGO_BIN_EXE_optbin");

/// A running `optbin mount --foreground`.
pub struct Daemon {
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub overlay: Vec<PathBuf>,
    pub config: Option<PathBuf>,
    /// The `optbin` executable run and its `RUST_LOG` (see [`Daemon::start_as`]).
    binary: PathBuf,
    log_filter: String,
    child: Option<Child>,
}

impl Daemon {
    /// Starts the daemon and waits until its status file answers.
    pub fn start(mnt: &Path, overlay: &[&Path], state: &Path, config: Option<&Path>) -> Self {
        Self::start_as(Path::new(OPTBIN), "optbin=debug,info", mnt, overlay, state, config)
    }

    /// As [`Daemon::start`], running `binary` with `RUST_LOG=log_filter` (benchmarks run the
    /// daemon as a user would, at the default log level, and may compare another build).
    pub fn start_as(
        binary: &Path,
        log_filter: &str,
        mnt: &Path,
        overlay: &[&Path],
        state: &Path,
        config: Option<&Path>,
    ) -> Self {
        let mut d = Daemon {
            mnt: mnt.to_path_buf(),
            state: state.to_path_buf(),
            overlay: overlay.iter().map(|p| p.to_path_buf()).collect(),
            config: config.map(Path::to_path_buf),
            binary: binary.to_path_buf(),
            log_filter: log_filter.to_string(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("mount").arg(&self.mnt).arg("--foreground").arg("--state-dir").arg(&self.state);
        for o in &self.overlay {
            cmd.arg("--overlay").arg(o);
        }
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("daemon log");
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        cmd.env("RUST_LOG", &self.log_filter);
        std::fs::create_dir_all(&self.state).ok();
        self.child = Some(cmd.spawn().expect("starting optbin"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::fs::metadata(self.mnt.join(".optbin/status")).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("optbin exited early ({status}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("optbin did not come up; log:\n{}", self.log());
    }

    pub fn log_path(&self) -> PathBuf {
        self.state.with_extension("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The serving process's pid (written by the supervisor).
    pub fn server_pid(&self) -> u32 {
        std::fs::read_to_string(self.state.join("server.pid"))
            .expect("server.pid")
            .trim()
            .parse()
            .expect("pid")
    }

    /// The serving process's pid, if the supervisor has written one.
    pub fn try_server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state.join("server.pid")).ok()?.trim().parse().ok()
    }

    pub fn bin(&self) -> PathBuf {
        self.mnt.join("bin")
    }

    pub fn status_text(&self) -> String {
        std::fs::read_to_string(self.mnt.join(".optbin/status")).expect("status")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let text = std::fs::read(self.mnt.join(".optbin/status.json")).expect("status.json");
        serde_json::from_slice(&text).expect("status.json parses")
    }

    /// The status.json entry of the binary at `path`.
    pub fn binary(&self, path: &Path) -> Option<serde_json::Value> {
        let status = self.status_json();
        status["binaries"].as_array()?.iter().find(|b| b["path"] == path.to_str().unwrap()).cloned()
    }

    /// The status.json entry whose PATH-view name is `name`.
    pub fn binary_named(&self, name: &str) -> Option<serde_json::Value> {
        let status = self.status_json();
        status["binaries"].as_array()?.iter().find(|b| b["name"] == name).cloned()
    }

    /// Polls `f` every 100 ms until it returns Some, or panics after `timeout` with `what`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                let status = std::fs::read_to_string(self.mnt.join(".optbin/status"))
                    .unwrap_or_else(|e| format!("(unreadable: {e})"));
                panic!(
                    "timed out waiting for {what}; status:\n{status}\nlog tail:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One write of `command` to the control file, as root.
    pub fn control(&self, command: &str) -> std::io::Result<()> {
        let mut f =
            std::fs::OpenOptions::new().write(true).open(self.mnt.join(".optbin/control"))?;
        f.write_all(command.as_bytes())
    }

    pub fn last_error(&self) -> String {
        std::fs::read_to_string(self.mnt.join(".optbin/last_error")).expect("last_error")
    }

    /// SIGTERM to the supervisor; waits for a clean exit and the mount to go.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "optbin exited with {status}; log:\n{}", self.log());
                break;
            }
            if Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                panic!("optbin did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!super::is_mounted(&self.mnt), "the mount outlived a clean stop");
    }

    /// Starts the daemon again with the same settings.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills supervisor and server with SIGKILL, leaving a stale mount: the supervisor is
    /// stopped first so it can neither restart the server nor let it unmount.
    pub fn kill_all(&mut self) {
        let server = std::fs::read_to_string(self.state.join("server.pid")).ok();
        let child = self.child.take();
        if let Some(child) = &child {
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        }
        let server = server.and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = server {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // Dead (a zombie until the stopped supervisor is gone, or reaped already).
            wait_until(Duration::from_secs(10), "the killed server to die", || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
                stat.map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.starts_with(" Z")))
            });
        }
        if let Some(mut child) = child {
            child.kill().ok();
            child.wait().ok();
        }
        // Nobody serves the mount any more: it answers ENOTCONN.
        let bin = self.mnt.join("bin");
        wait_until(Duration::from_secs(10), "the mount to go stale", || {
            std::fs::metadata(&bin).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
        });
    }

    /// Starts again after [`Daemon::kill_all`].
    pub fn start_again(&mut self) {
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill().ok();
            child.wait().ok();
        }
        let server = std::fs::read_to_string(self.state.join("server.pid")).ok();
        if let Some(pid) = server.and_then(|p| p.trim().parse::<i32>().ok()) {
            // Only if it is still an optbin process (the pid may have been reused).
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "optbin" {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if super::is_mounted(&self.mnt) {
            let c = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Polls `done` every 10 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The daemon's catalog under `state`, opened read-only (the daemon keeps writing).
pub fn catalog_read_only(state: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(
        state.join("catalog.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("opening the catalog read-only");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn
}

//! The real daemon as a child process (`optbin mount ... --foreground`) for end-to-end
//! tests: started on temp dirs, read through `.optbin/`, stopped with SIGTERM; dropping
//! the guard kills it and lazily unmounts whatever is left, even after a panic.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct DaemonGuard {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl DaemonGuard {
    /// Starts the daemon and waits until `status.json` answers.
    pub fn start(mnt: &Path, overlay: &[&Path], state: &Path, config: &Path, log: &Path) -> Self {
        std::fs::create_dir_all(mnt).expect("creating the mountpoint");
        let log_file = std::fs::File::create(log).expect("creating the daemon log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_optbin"));
        cmd.arg("mount").arg(mnt);
        for dir in overlay {
            cmd.arg("--overlay").arg(dir);
        }
        cmd.arg("--state-dir").arg(state).arg("--config").arg(config).arg("--foreground");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .env("RUST_LOG", "optbin=debug");
        let child = cmd.spawn().expect("starting optbin");
        let guard = Self { child: Some(child), mnt: mnt.to_path_buf(), log: log.to_path_buf() };
        guard.wait_for("status.json to answer", Duration::from_secs(30), || {
            std::fs::read(guard.mnt.join(".optbin/status.json")).ok()
        });
        guard
    }

    /// `status.json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.mnt.join(".optbin/status.json"))
            .unwrap_or_else(|e| panic!("reading status.json: {e}\n{}", self.log_tail()));
        serde_json::from_slice(&bytes).expect("status.json is JSON")
    }

    /// Writes one command to `.optbin/control`.
    pub fn control(&self, command: &str) -> std::io::Result<()> {
        std::fs::write(self.mnt.join(".optbin/control"), format!("{command}\n"))
    }

    pub fn last_error(&self) -> String {
        std::fs::read_to_string(self.mnt.join(".optbin/last_error")).unwrap_or_default()
    }

    /// Polls `probe` every 200 ms until it answers; panics with the daemon's log after
    /// `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The end of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        format!("--- daemon log (end) ---\n{}", &text[start..])
    }

    /// SIGTERM, then waits for a clean exit (the mount is gone after it).
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "optbin did not stop cleanly: {status:?}\n{}",
            self.log_tail()
        );
        unmount_if_mounted(&self.mnt);
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(!log.contains("panicked"), "optbin panicked\n{}", self.log_tail());
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with the pid of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        unmount_if_mounted(&self.mnt);
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Lazily unmounts `mnt` if it is still a mount point.
pub fn unmount_if_mounted(mnt: &Path) {
    if super::is_mounted(mnt) {
        let c = std::ffi::CString::new(mnt.to_string_lossy().as_bytes()).expect("a path");
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

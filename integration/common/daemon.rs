//! The real daemon as a child process (`optbin mount ... --foreground`) on temp dirs, with
//! a guard that stops it and leaves no mount behind, even when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `optbin mount --foreground`. Dropping it stops the daemon (SIGTERM, then
/// SIGKILL of the supervisor and its server) and detaches the mount if it is still there.
pub struct Daemon {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub state: PathBuf,
    /// The daemon's stderr (its log).
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `mnt` over `overlay`, with `config` (a TOML file) when given,
    /// and waits until `.optbin/status.json` answers.
    pub fn start(mnt: &Path, overlay: &[&Path], state: &Path, config: Option<&Path>) -> Self {
        std::fs::create_dir_all(mnt).expect("creating the mountpoint");
        std::fs::create_dir_all(state).expect("creating the state dir");
        let log = state.with_extension("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_optbin"));
        cmd.arg("mount").arg(mnt).arg("--foreground").arg("--state-dir").arg(state);
        for d in overlay {
            cmd.arg("--overlay").arg(d);
        }
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the daemon log"))
            .spawn()
            .expect("starting optbin");
        let mut d =
            Self { child: Some(child), mnt: mnt.to_path_buf(), state: state.to_path_buf(), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read(mnt.join(".optbin/status.json")).is_err() {
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("optbin exited at start ({status}):\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "the mount did not come up:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// `.optbin/status.json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.mnt.join(".optbin/status.json")).expect("reading status");
        serde_json::from_slice(&bytes).expect("status.json is JSON")
    }

    /// `.optbin/status`, the text table.
    pub fn status_text(&self) -> String {
        std::fs::read_to_string(self.mnt.join(".optbin/status")).expect("reading status")
    }

    /// The entry of `status.json`'s `binaries` whose PATH-view name is `name`.
    pub fn binary(&self, name: &str) -> Option<serde_json::Value> {
        let status = self.status_json();
        status["binaries"].as_array()?.iter().find(|b| b["name"] == name).cloned()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `probe` until it returns Some, or panics after `timeout` with `what` and the log.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if Instant::now() > deadline {
                let status = std::fs::read_to_string(self.mnt.join(".optbin/status.json"));
                panic!(
                    "timed out waiting for {what}\nstatus.json: {}\nlog:\n{}",
                    status.unwrap_or_else(|e| e.to_string()),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM and wait (up to 30 s) for a clean exit; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("optbin did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the current server process (the supervisor forks a new one after a crash).
    pub fn server_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state.join("server.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !matches!(child.try_wait(), Ok(Some(_))) {
                if let Some(server) = self.server_pid() {
                    // SAFETY: the server our own child forked; its pid file names it.
                    unsafe { libc::kill(server, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if super::is_mounted(&self.mnt) {
            let path = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes())
                .expect("mountpoint without NUL");
            // SAFETY: a valid C string; detaching our own test mount.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

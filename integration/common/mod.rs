//! Helpers for real-mount tests: compiling C programs with gcc, fixture directories any
//! user can traverse, running commands, and checking that no mount is left behind.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temp dir with mode 0755 (tempfile makes 0700, which `nobody` cannot traverse).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("optbin-test").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Compiles C `source` into `out` with gcc and `flags`.
pub fn cc(source: &str, out: &Path, flags: &[&str]) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).expect("writing C source");
    let status = Command::new("gcc")
        .args(["-O1", "-g0", "-o"])
        .arg(out)
        .arg(&src)
        .args(flags)
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc failed for {}", out.display());
    std::fs::remove_file(&src).ok();
}

/// A program that prints `TAG` and its arguments, optionally sleeps first (env SLEEP_MS)
/// and exits with env CODE.
pub const PROG_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *sleep_ms = getenv("SLEEP_MS");
    if (sleep_ms) usleep(atoi(sleep_ms) * 1000);
    printf("%s", TAG);
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    const char *code = getenv("CODE");
    return code ? atoi(code) : 0;
}
"#;

/// Prints the file at `$(dirname /proc/self/exe)/../share/optbin-test/data.txt`.
pub const DATA_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <libgen.h>
#include <unistd.h>
int main(void) {
    char exe[4096] = {0}, path[8192];
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) return 2;
    snprintf(path, sizeof path, "%s/../share/optbin-test/data.txt", dirname(exe));
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return 3; }
    char buf[256] = {0};
    fread(buf, 1, sizeof buf - 1, f);
    printf("%s", buf);
    return 0;
}
"#;

/// Prints the effective uid.
pub const EUID_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"#;

/// Prints the name it was called by (busybox-style multi-call binary).
pub const MULTI_C: &str = r#"
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    const char *slash = strrchr(argv[0], '/');
    printf("called as %s\n", slash ? slash + 1 : argv[0]);
    return 0;
}
"#;

/// Compiles PROG_C with a tag.
pub fn prog(out: &Path, tag: &str, extra: &[&str]) {
    let define = format!("-DTAG=\"{tag}\"");
    let mut flags = vec![define.as_str()];
    flags.extend_from_slice(extra);
    cc(PROG_C, out, &flags);
}

#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code(),
    }
}

/// Whether `path` appears as a mount point in /proc/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let needle = path.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(needle.as_str()))
}

/// Runs `cmd` as `nobody` (uid/gid 65534) via setpriv.
pub fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(program);
    c
}

/// Path of `rel` (an absolute real path) inside the mount.
pub fn in_mount(mount: &Path, real: &Path) -> PathBuf {
    mount.join(real.strip_prefix("/").expect("absolute path"))
}

/// The real daemon (`optbin mount ... --foreground`) as a child process on temp dirs. Drop
/// stops it with SIGTERM (SIGKILL after 10 s) and detaches the mount if it is still there,
/// so nothing is left behind even when a test panics.
pub struct Daemon {
    child: Option<std::process::Child>,
    pub mount: PathBuf,
    pub state: PathBuf,
    /// The daemon's stderr (its log), shown when a test fails.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon over `overlay` with `config` (TOML text) and waits until its
    /// status file answers.
    pub fn start(root: &Path, overlay: &[PathBuf], config: &str) -> Self {
        let (mount, state) = (root.join("mnt"), root.join("state"));
        let config_file = root.join("config.toml");
        std::fs::write(&config_file, config).expect("writing the config");
        let log = root.join("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_optbin"));
        cmd.arg("mount").arg(&mount).arg("--state-dir").arg(&state);
        for d in overlay {
            cmd.arg("--overlay").arg(d);
        }
        cmd.arg("--config").arg(&config_file).arg("--foreground");
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the log"));
        let child = cmd.spawn().expect("starting optbin");
        let d = Self { child: Some(child), mount, state, log };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while d.try_status().is_none() {
            if std::time::Instant::now() > deadline {
                panic!("the daemon did not come up; its log:\n{}", d.log_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.mount.join(".optbin/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// `.optbin/status.json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|| panic!("no status; log:\n{}", self.log_text()))
    }

    /// The status entry of the binary at `path` (real path).
    pub fn binary(&self, path: &Path) -> Option<serde_json::Value> {
        let status = self.status();
        status["binaries"].as_array()?.iter().find(|b| b["path"].as_str() == path.to_str()).cloned()
    }

    /// Polls the binary's status entry until `ok` holds; panics with the entry and the log
    /// after `secs`.
    pub fn wait_binary(
        &self,
        path: &Path,
        secs: u64,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let b = self.binary(path);
            if let Some(b) = b.as_ref().filter(|b| ok(b)) {
                return b.clone();
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status entry: {}\nlog:\n{}",
                    serde_json::to_string_pretty(&b).unwrap_or_default(),
                    self.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Writes one command to `.optbin/control`.
    pub fn control(&self, command: &str) {
        std::fs::write(self.mount.join(".optbin/control"), command)
            .unwrap_or_else(|e| panic!("control {command:?}: {e}; log:\n{}", self.log_text()));
    }

    /// SIGTERM, then waits for the daemon to exit and the mount to go.
    pub fn stop(mut self) {
        let code = self.terminate();
        assert_eq!(code, Some(0), "the daemon did not stop cleanly; log:\n{}", self.log_text());
        assert!(!is_mounted(&self.mount), "the mount is still there after the daemon stopped");
    }

    fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        if is_mounted(&self.mount)
            && let Ok(c) = std::ffi::CString::new(self.mount.to_string_lossy().as_bytes())
        {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Places `file` as a BOLT variant in `state` (e.g. `ready`) of the binary with `sha256` in
/// the daemon's state dir, the way the optimizer records its output: published in the
/// store, a row in the catalog (written while the daemon runs; SQLite serializes writers).
pub fn place_variant(state_dir: &Path, sha256: &str, file: &Path, state: &str) -> i64 {
    let stored = optbin::store::VariantStore::open(state_dir).unwrap().publish(file).unwrap();
    let conn = rusqlite::Connection::open(state_dir.join("catalog.db")).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let binary_id: i64 = conn
        .query_row("SELECT id FROM binaries WHERE sha256 = ?1", [sha256], |r| r.get(0))
        .unwrap();
    let variant = optbin::catalog::base::NewVariant {
        binary_id,
        kind: "bolt".into(),
        sha256: stored.content.hex(),
        store_path: stored.path.to_string_lossy().into_owned(),
        size: stored.size,
        state: state.into(),
        note: Some("placed by a test".into()),
        ..Default::default()
    };
    optbin::catalog::base::insert_variant(&conn, &variant, 1).unwrap()
}

//! Helpers for real-mount tests: compiling C programs with gcc, fixture directories any
//! user can traverse, running commands, and checking that no mount is left behind.
#![allow(dead_code)]

pub mod daemon;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temp dir with mode 0755 (tempfile makes 0700, which `nobody` cannot traverse).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("optbin-test").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A test's private directory ([`open_tempdir`]), its canonical path (the overlay and
/// the mount see resolved paths) and an empty `bin` in it to overlay.
pub fn open_test_root() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().expect("canonical tempdir");
    let bin = root.join("bin");
    std::fs::create_dir(&bin).expect("creating bin");
    (tmp, root, bin)
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

/// A program that prints `TAG` and its arguments and exits with env CODE. With env HOLD it
/// first says `ready` on stderr and waits for the end of its stdin (see [`Held`]).
pub const PROG_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (getenv("HOLD")) {
        char buf[64];
        fprintf(stderr, "ready\n");
        fflush(stderr);
        while (read(0, buf, sizeof buf) > 0) {}
    }
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

/// A process of a [`PROG_C`] program held at its start: it has been exec'd and has run up to
/// its `main` (so its binary is open and mapped), and prints only once [`Held::release`]d.
/// A test controls exactly what happens while it runs, instead of guessing with sleeps.
pub struct Held {
    child: Option<std::process::Child>,
}

impl Held {
    /// Starts `cmd` (a PROG_C program) held, and waits until it says it is ready.
    pub fn spawn(cmd: &mut Command) -> Held {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd
            .env("HOLD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut line = String::new();
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        stderr.read_line(&mut line).expect("reading the held program's stderr");
        assert_eq!(line, "ready\n", "the held program {cmd:?} did not start");
        Held { child: Some(child) }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("held").id()
    }

    /// Lets the program go on (closes its stdin) and collects its output.
    pub fn release(mut self) -> Output {
        let mut child = self.child.take().expect("held");
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("waiting for the held program");
        Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
///
/// `setpriv` keeps its capabilities until its own execve (it sets KEEPCAPS), so the exec
/// of `program` would pass every permission check: a shell started as nobody, with no
/// capabilities left, makes that exec, and an exec refused exits 126 as in any shell.
pub fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c"])
        .arg(r#"exec "$0" "$@""#)
        .arg(program);
    c
}

/// Path of `rel` (an absolute real path) inside the mount.
pub fn in_mount(mount: &Path, real: &Path) -> PathBuf {
    mount.join(real.strip_prefix("/").expect("absolute path"))
}

/// Sets the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
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
        kind: optbin::catalog::base::VariantKind::Bolt,
        sha256: stored.content.hex(),
        store_path: stored.path.to_string_lossy().into_owned(),
        size: stored.size,
        state: state.parse().unwrap(),
        note: Some("placed by a test".into()),
        ..Default::default()
    };
    optbin::catalog::base::insert_variant(&conn, &variant, 1).unwrap()
}

/// Writes `ORIGINAL.variant` in `dir`: the original's bytes and one more, executable (the
/// same code, a content of its own: a variant that runs exactly like the original).
pub fn variant_copy(original: &Path, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(original).expect("reading the original");
    bytes.push(0);
    let name = format!("{}.variant", original.file_name().unwrap().to_string_lossy());
    let copy = dir.join(name);
    std::fs::write(&copy, bytes).expect("writing the variant copy");
    chmod(&copy, 0o755);
    copy
}

/// Starts the real daemon over `overlay` on `root`'s `mnt` and `state`, with `config`.
pub fn start_daemon(root: &Path, overlay: &Path, config: &str) -> daemon::Daemon {
    let config_file = root.join("config.toml");
    std::fs::write(&config_file, config).expect("writing the config");
    daemon::Daemon::start(&root.join("mnt"), &[overlay], &root.join("state"), Some(&config_file))
}

/// The policy's stage key in a binary's status entry (`collecting`, `canary`,
/// `serving_optimized`, ...: the serde tag of `optbin::policy::Stage`); empty when it has
/// none.
pub fn stage_key(binary: &serde_json::Value) -> String {
    match &binary["details"]["policy"]["stage"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

/// Polls the status entry of the binary at `path` until `ok` holds; panics after `secs`.
pub fn wait_binary(
    d: &daemon::Daemon,
    path: &Path,
    secs: u64,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    d.wait_for(std::time::Duration::from_secs(secs), what, |d| d.binary(path).filter(|b| ok(b)))
}

/// A loop whose `SLOW` build does extra volatile work per iteration; both print the same
/// line, `TAG` (default "work") and a checksum.
pub const WORK_C: &str = r#"
#include <stdio.h>
#ifndef TAG
#define TAG "work"
#endif
#include <stdlib.h>
static volatile unsigned long sink;
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    unsigned long acc = 0;
    for (long i = 0; i < n; i++) {
        acc += (unsigned long)i * 2654435761u;
#ifdef SLOW
        for (int k = 0; k < 6; k++) sink += (unsigned long)i ^ k;
#endif
    }
    printf("%s %lu\n", TAG, acc);
    return 0;
}
"#;

/// A hot loop over three small branchy functions (`prog N` prints a result of all of them);
/// `-DMASK=...` (default 0xff) changes `step_b` and the result, as a new version would.
pub const STEPS_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#ifndef MASK
#define MASK 0xff
#endif
__attribute__((noinline)) unsigned long step_a(unsigned long s, unsigned long i) { return (i % 7 == 3) ? s * 31 + i : s ^ (i * 3); }
__attribute__((noinline)) unsigned long step_b(unsigned long s, unsigned long i) { return (s << 1 | s >> 63) + (i & MASK); }
__attribute__((noinline)) unsigned long step_c(unsigned long s, unsigned long i) {
    switch (i & 7) { case 0: return s * 31 + i; case 1: return s ^ 0x5555; case 2: return s + (i >> 3);
    case 3: return s - i; case 4: return s * 7; case 5: return s | (i << 7); case 6: return s & ~i; default: return s + 1; }
}
__attribute__((noinline)) unsigned long hot_loop(unsigned long n) {
    unsigned long s = 1;
    for (unsigned long i = 0; i < n; i++) {
        s = step_a(s, i);
        if (i & 1) s = step_b(s, i); else s = step_c(s, i);
    }
    return s;
}
int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    printf("result %lu\n", hot_loop(n));
    return 0;
}
"#;

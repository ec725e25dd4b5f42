//! The real `optbin` binary end to end: mount, control file (valid, invalid, non-root),
//! pins across restarts, the CLI, crashes of the serving process under a loop of commands,
//! and recovery from a stale mount.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, OPTBIN};
use common::{is_mounted, open_tempdir, prog, run};

struct Fixture {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
}

fn fixture() -> Fixture {
    let dir = open_tempdir();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    prog(&bin.join("hello"), "hello", &[]);
    std::fs::write(bin.join("script"), "#!/bin/sh\necho script $1\n").unwrap();
    common::chmod(&bin.join("script"), 0o755);
    Fixture { mnt: root.join("mnt"), state: root.join("state"), bin, _dir: dir }
}

fn start(f: &Fixture) -> Daemon {
    Daemon::start(&f.mnt, &[&f.bin], &f.state, None)
}

#[test]
fn control_file_takes_valid_commands_and_refuses_bad_ones() {
    let f = fixture();
    let d = start(&f);
    let served = d.mnt.join(f.bin.strip_prefix("/").unwrap()).join("hello");
    // Served as a file; the first lookup makes the indexer hash it.
    assert!(std::fs::symlink_metadata(&served).unwrap().is_file());
    let out = run(Command::new(d.bin().join("hello")).arg("x"));
    assert_eq!(out.stdout, "hello x\n");
    d.wait_for(Duration::from_secs(20), "the binary's sha256 in status", |d| {
        d.binary(&f.bin.join("hello")).and_then(|b| b["sha256"].as_str().map(String::from))
    });

    d.control("exclude hello\n").expect("a valid command is accepted");
    assert!(
        std::fs::symlink_metadata(&served).unwrap().file_type().is_symlink(),
        "excluded: a link"
    );
    assert_eq!(std::fs::read_link(&served).unwrap(), f.bin.join("hello"));
    assert_eq!(run(Command::new(d.bin().join("hello")).arg("y")).stdout, "hello y\n");
    assert_eq!(d.last_error(), "");
    d.control("include hello").unwrap();
    assert!(std::fs::symlink_metadata(&served).unwrap().is_file(), "included again: a file");

    for (bad, reason) in [
        ("frobnicate hello", "unknown command"),
        ("pin hello fast", "must be `original` or `bolted`"),
        ("exclude nope", "no binary named"),
        ("exclude /etc/passwd", "not in an overlaid directory"),
        ("\n", "empty command"),
    ] {
        let err = d.control(bad).expect_err(bad);
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{bad}: {err}");
        assert!(d.last_error().contains(reason), "{bad}: last_error {:?}", d.last_error());
    }
    let status = d.status_json();
    assert!(status["controls"].as_array().unwrap().is_empty(), "refused commands changed nothing");

    // A non-root user may read status but not write control.
    let control = d.mnt.join(".optbin/control");
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg(format!("echo 'exclude hello' > {}", control.display())));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(d.mnt.join(".optbin/status")));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("hello"));
    assert!(d.status_json()["controls"].as_array().unwrap().is_empty());
}

#[test]
fn pins_and_exclusions_survive_a_restart() {
    let f = fixture();
    let mut d = start(&f);
    d.control("pin hello original").unwrap();
    d.control(&format!("exclude {}", f.bin.join("script").display())).unwrap();
    d.restart();
    let status = d.status_json();
    let controls = status["controls"].as_array().unwrap();
    let hello =
        controls.iter().find(|c| c["path"] == f.bin.join("hello").to_str().unwrap()).unwrap();
    assert_eq!(hello["pin"], "original");
    let script =
        controls.iter().find(|c| c["path"] == f.bin.join("script").to_str().unwrap()).unwrap();
    assert_eq!(script["excluded"], true);
    assert!(d.status_text().contains("pinned to original"));
    d.stop();
}

#[test]
fn cli_status_env_and_umount() {
    let f = fixture();
    let d = start(&f);
    let out = run(Command::new(OPTBIN).arg("status").arg(&f.mnt));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("optbin "), "{}", out.stdout);
    let out = run(Command::new(OPTBIN).args(["status", "--json"]).arg(&f.mnt));
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("--json is JSON");
    assert_eq!(json["mountpoint"], f.mnt.to_str().unwrap());

    let env = run(Command::new(OPTBIN).arg("env").arg(&f.mnt)).stdout;
    let path_after = |path: &str| {
        run(Command::new("sh").arg("-c").arg(format!("PATH={path}; {env} echo $PATH"))).stdout
    };
    let once = path_after("/usr/bin:/bin");
    assert_eq!(once.trim(), format!("{}/bin:/usr/bin:/bin", f.mnt.display()));
    assert_eq!(path_after(once.trim()).trim(), once.trim(), "optbin env is idempotent");

    let out = run(Command::new(OPTBIN).arg("umount").arg(&f.mnt));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!is_mounted(&f.mnt));
    d.wait_for(Duration::from_secs(10), "the daemon to exit after umount", |_| {
        (unsafe { libc::kill(d.pid() as i32, 0) } != 0 || zombie(d.pid())).then_some(())
    });
    let out = run(Command::new(OPTBIN).arg("status").arg(&f.mnt));
    assert_ne!(out.code, Some(0));
    drop(d);
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// The serving process is SIGKILLed four times (five within 10 s is a crash loop: the
/// supervisor then gives up on purpose) while a shell runs commands through PATH;
/// none may fail (the supervisor keeps the connection, the kernel resends what was taken).
#[test]
fn commands_keep_working_while_the_server_is_killed() {
    let f = fixture();
    let d = start(&f);
    let stop = f.state.with_extension("stop");
    let progress = f.state.with_extension("progress");
    let script = format!(
        "n=0; fail=0; while [ ! -e {stop} ]; do \
           out=$(hello $n 2>&1); [ \"$out\" = \"hello $n\" ] || {{ fail=$((fail+1)); echo \"FAIL $n: $out\" >&2; }}; \
           script x >/dev/null || fail=$((fail+1)); n=$((n+1)); \
           echo $n > {progress}.new && mv {progress}.new {progress}; \
         done; echo \"$n $fail\"",
        stop = stop.display(),
        progress = progress.display()
    );
    // Iterations the loop has completed (it writes the count after each one).
    let iterations =
        || std::fs::read_to_string(&progress).ok().and_then(|s| s.trim().parse::<u64>().ok());
    // Each server (the first and each restarted one) serves a few iterations before the
    // next kill, and the last one before the loop stops.
    let served_more = |d: &Daemon, more: u64| {
        let target = iterations().unwrap_or(0) + more;
        d.wait_for(Duration::from_secs(30), "the command loop to go on", |_| {
            (iterations()? >= target).then_some(())
        });
    };
    let child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", format!("{}:/usr/bin:/bin", d.bin().display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut killed = Vec::new();
    for _ in 0..4 {
        served_more(&d, 6);
        let pid = d.server_pid();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        killed.push(pid);
        d.wait_for(Duration::from_secs(10), "a new server", |d| {
            (d.server_pid() != pid).then_some(())
        });
    }
    served_more(&d, 6);
    std::fs::write(&stop, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace().map(|w| w.parse::<u64>().unwrap());
    let (runs, failed) = (words.next().unwrap(), words.next().unwrap());
    println!(
        "{runs} iterations (2 commands each) while the server was killed 4 times: {failed} failed"
    );
    assert!(runs > 20, "the loop made progress: {runs}");
    assert_eq!(failed, 0, "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(d.status_json()["daemon"]["server_restarts"].as_u64().unwrap() >= 4);
}

#[test]
fn next_start_clears_a_stale_mount() {
    let f = fixture();
    let mut d = start(&f);
    d.kill_all();
    let err = std::fs::metadata(f.mnt.join("bin")).expect_err("a dead mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    let out = run(Command::new(OPTBIN).arg("status").arg(&f.mnt));
    assert!(out.stderr.contains("stale"), "{out:?}");
    d.start_again();
    assert_eq!(run(Command::new(d.bin().join("hello")).arg("z")).stdout, "hello z\n");
    d.stop();
}

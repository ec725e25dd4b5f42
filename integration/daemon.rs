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

/// As [`start`], with `hello` served through the mount although it has no variant (by
/// default it runs natively until it has one), so that its runs are measured.
fn start_serving_everything(f: &Fixture) -> Daemon {
    let config = f.mnt.with_file_name("config.toml");
    std::fs::write(&config, "[policy]\nnative_until_variant = false\n").unwrap();
    Daemon::start(&f.mnt, &[&f.bin], &f.state, Some(&config))
}

#[test]
fn control_file_takes_valid_commands_and_refuses_bad_ones() {
    let f = fixture();
    let d = start_serving_everything(&f);
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

/// By default a binary with no variant runs natively (a symlink in the mirror, no run
/// measured); a variant to serve makes it a served file whose runs are measured; a
/// quarantine, and an exclusion, make it a symlink again.
#[test]
fn a_binary_runs_natively_until_it_has_a_variant_to_serve() {
    let f = fixture();
    let d = start(&f);
    let (real, mirrored) = (f.bin.join("hello"), d.mnt.join(f.bin.strip_prefix("/").unwrap()));
    let entry = mirrored.join("hello");
    let is_file = || std::fs::symlink_metadata(&entry).unwrap().is_file();
    assert!(!is_file(), "no variant: passed through");
    assert_eq!(std::fs::read_link(&entry).unwrap(), real);
    for i in 0..5 {
        assert_eq!(
            run(Command::new(d.bin().join("hello")).arg(i.to_string())).stdout,
            format!("hello {i}\n")
        );
    }
    let b = common::wait_binary(&d, &real, 20, "indexing", |b| b["sha256"].is_string());
    assert_eq!(b["served"], "original (link)", "{b:#}");
    let measured = |d: &Daemon| {
        d.status_json()["subsystems"]["policy"]["measurement"]["runs_measured"].as_u64().unwrap()
    };

    // A promoted variant (a copy of the original with one more byte).
    let copy = common::variant_copy(&real, f.mnt.parent().unwrap());
    let sha = b["sha256"].as_str().unwrap();
    let vid = common::place_variant(&f.state, sha, &copy, "served");
    let want = format!("variant {vid} for 95% of execs");
    common::wait_binary(&d, &real, 20, "the variant served", |b| b["served"] == want.as_str());
    assert!(is_file(), "a variant to serve: a served file");
    for i in 0..20 {
        assert_eq!(
            run(Command::new(d.bin().join("hello")).arg(i.to_string())).stdout,
            format!("hello {i}\n")
        );
    }
    // Every run through the mount since the variant was measured, none of the five before.
    d.wait_for(Duration::from_secs(20), "20 runs measured", |d| (measured(d) >= 20).then_some(()));
    assert_eq!(measured(&d), 20, "only the runs with a variant in play are measured");

    // Excluded: a link; included again: served, it still has its variant.
    d.control("exclude hello").unwrap();
    assert!(!is_file(), "excluded: a link");
    d.control("include hello").unwrap();
    assert!(is_file(), "included again: served, it has a variant");
    // Its variant quarantined (e.g. by the fleet): nothing to serve, a link again.
    let conn = rusqlite::Connection::open(f.state.join("catalog.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute("UPDATE variants SET state = 'quarantined' WHERE id = ?1", [vid]).unwrap();
    d.wait_for(Duration::from_secs(20), "the quarantined variant no longer served", |_| {
        (!is_file()).then_some(())
    });
    assert_eq!(run(Command::new(d.bin().join("hello")).arg("z")).stdout, "hello z\n");
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

/// Runs `optbin mount --foreground` on the fixture expecting it to fail before mounting;
/// returns its stderr.
fn start_fails(f: &Fixture) -> String {
    let mut child = Command::new(OPTBIN)
        .arg("mount")
        .arg(&f.mnt)
        .arg("--foreground")
        .arg("--state-dir")
        .arg(&f.state)
        .arg("--overlay")
        .arg(&f.bin)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            if is_mounted(&f.mnt) {
                let c = std::ffi::CString::new(f.mnt.to_str().unwrap()).unwrap();
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            panic!("optbin started on a bad catalog instead of refusing it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(!is_mounted(&f.mnt), "refused before mounting");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_catalog_is_reported_before_mounting() {
    let f = fixture();
    std::fs::create_dir_all(&f.state).unwrap();
    let catalog = f.state.join("catalog.db");
    std::fs::write(&catalog, vec![0x5au8; 16384]).unwrap();
    let err = start_fails(&f);
    assert!(err.contains("is damaged") && err.contains("not a database"), "{err}");
    std::fs::remove_file(&catalog).unwrap();
    std::fs::create_dir(&catalog).unwrap();
    let err = start_fails(&f);
    assert!(err.contains("is not a file (a directory)"), "{err}");
}

/// A clean stop leaves the whole catalog in catalog.db (checkpointed, the WAL empty); a
/// WAL damaged after a crash is reported instead of silently dropping what it held.
#[test]
fn a_clean_stop_checkpoints_and_a_damaged_wal_is_refused() {
    let f = fixture();
    let mut d = start(&f);
    d.control("pin hello original").unwrap();
    d.stop();
    let wal = f.state.join("catalog.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "the WAL was checkpointed into catalog.db at stop");
    {
        let conn = rusqlite::Connection::open_with_flags(
            f.state.join("catalog.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let pins: i64 = conn
            .query_row("SELECT count(*) FROM controls WHERE pin = 'original'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pins, 1, "the pin is in catalog.db itself");
    }

    // A crash (no checkpoint), then one flipped byte in the WAL's first frame.
    d.start_again();
    d.control("exclude script").unwrap();
    d.kill_all();
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(bytes.len() > 32 + 24 + 4096, "the crash left transactions in the WAL");
    bytes[32 + 24 + 200] ^= 0xff;
    std::fs::write(&wal, &bytes).unwrap();
    if is_mounted(&f.mnt) {
        let c = std::ffi::CString::new(f.mnt.to_str().unwrap()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let err = start_fails(&f);
    assert!(err.contains("write-ahead log") && err.contains("damaged at frame 0"), "{err}");
}

/// The state directory and the catalog are root's only; a clean stop removes server.pid
/// and logs no failed unmount.
#[test]
fn state_is_private_and_a_clean_stop_leaves_nothing_behind() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    // As a previous version (or install.sh) left it: world-readable.
    std::fs::create_dir_all(&f.state).unwrap();
    common::chmod(&f.state, 0o755);
    let mut d = start(&f);
    d.control("pin hello original").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&f.state), 0o700);
    for name in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let p = f.state.join(name);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{name}");
        }
    }
    assert!(f.state.join("server.pid").exists());
    d.stop();
    assert!(!f.state.join("server.pid").exists(), "server.pid removed at a clean stop");
    let log = d.log();
    assert!(!log.contains("Failed to umount"), "{log}");
    assert!(!log.contains('\u{1b}'), "no terminal colour codes in a log file");
}

/// `optbin status | head`: output into a closed pipe ends quietly.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::FromRawFd;
    let f = fixture();
    let d = start(&f);
    for json in [false, true] {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { libc::close(fds[0]) };
        let stdout = unsafe { std::process::Stdio::from_raw_fd(fds[1]) };
        let mut cmd = Command::new(OPTBIN);
        cmd.arg("status").arg(&f.mnt);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.stdout(stdout).stderr(std::process::Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "json {json}: {stderr}");
    }
    drop(d);
}

/// Any user can probe a served file for a terminal (TCGETS) as often as they like: the log
/// must not grow with it.
#[test]
fn terminal_probes_do_not_grow_the_log() {
    use std::os::fd::AsRawFd;
    let f = fixture();
    let d = start(&f);
    let served = d.bin().join("hello");
    let file = std::fs::File::open(&served).unwrap();
    let before = d.log().len();
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    for _ in 0..500 {
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TCGETS, &mut termios) };
        assert_eq!(r, -1, "not a terminal");
    }
    // Requests are answered in order: a status read after them sees their log lines.
    let _ = d.status_text();
    let grown = d.log().len() - before;
    assert!(grown < 2000, "500 terminal probes grew the log by {grown} bytes");
}

/// `optbin umount --timeout 2` on a mount whose server is stopped (SIGSTOP) finishes by its
/// timeout with a lazy unmount that aborts the connection. Without the abort it hung now and
/// then: a server thread that had not stopped yet took the status request `optbin umount`
/// made, which then waited for the answer uninterruptibly (1 of 6 runs of this file).
#[test]
fn umount_finishes_by_its_timeout_when_the_server_is_stopped() {
    let f = fixture();
    let d = start(&f);
    let server = d.server_pid() as i32;
    unsafe { libc::kill(server, libc::SIGSTOP) };
    let started = std::time::Instant::now();
    let mut child = Command::new(OPTBIN)
        .args(["umount", "--timeout", "2"])
        .arg(&f.mnt)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut finished = None;
    while started.elapsed() < Duration::from_secs(15) {
        if let Some(status) = child.try_wait().unwrap() {
            finished = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    let stacks = if finished.is_none() { kernel_stacks(child.id()) } else { String::new() };
    if finished.is_none() {
        child.kill().ok();
    }
    // A thread waiting on a request the stopped server had already read can be killed
    // only once the server answers: continue the server before reaping the child.
    unsafe { libc::kill(server, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    if !stacks.is_empty() {
        println!("where optbin umount was stuck:\n{stacks}");
    }
    println!("optbin umount --timeout 2 on a stopped server took {took:?}");
    let status = finished.expect("optbin umount --timeout 2 hung on a stopped server");
    assert!(status.success(), "{out:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!is_mounted(&f.mnt), "unmounted (lazily)");
    assert!(String::from_utf8_lossy(&out.stdout).contains("aborted its connection"), "{out:?}");
    // The server, running again, finds its connection aborted and ends as after an unmount.
    common::daemon::wait_until(
        Duration::from_secs(20),
        "the server to end after its connection was aborted",
        || !std::path::Path::new(&format!("/proc/{server}")).exists(),
    );
    drop(d);
}

/// What each thread of `pid` waits on in the kernel (`/proc/PID/task/*/stack`, root only),
/// for the message of a test that found a process stuck.
fn kernel_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stack = std::fs::read_to_string(path.join("stack")).unwrap_or_default();
        out += &format!("thread {:?} {}:\n{stack}", task.file_name(), comm.trim());
    }
    out
}

/// A shell loop running `hello` and `script` through PATH until `stop` exists; prints
/// "iterations failures longest-iteration-in-microseconds".
fn command_loop(bin: &std::path::Path, stop: &std::path::Path) -> std::process::Child {
    let script = format!(
        "n=0; fail=0; max=0; while [ ! -e {stop} ]; do \
           t0=${{EPOCHREALTIME/./}}; \
           out=$(hello $n 2>&1); [ \"$out\" = \"hello $n\" ] || {{ fail=$((fail+1)); echo \"FAIL $n: $out\" >&2; }}; \
           script x >/dev/null || fail=$((fail+1)); \
           t=$(( ${{EPOCHREALTIME/./}} - t0 )); [ $t -gt $max ] && max=$t; n=$((n+1)); \
           echo $n > {progress}.new && mv {progress}.new {progress}; \
         done; echo \"$n $fail $max\"",
        stop = stop.display(),
        progress = loop_progress(stop).display()
    );
    Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Where [`command_loop`] writes the count of iterations it completed.
fn loop_progress(stop: &std::path::Path) -> std::path::PathBuf {
    stop.with_extension("progress")
}

/// Waits (polling, with a deadline) until [`command_loop`] has completed `more` iterations
/// beyond what it had when called.
fn loop_goes_on(stop: &std::path::Path, more: u64) {
    let done = || {
        std::fs::read_to_string(loop_progress(stop))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let target = done() + more;
    common::daemon::wait_until(Duration::from_secs(60), "the command loop to go on", || {
        done() >= target
    });
}

fn loop_result(child: std::process::Child) -> (u64, u64, u64, String) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace().map(|w| w.parse::<u64>().unwrap());
    let (runs, failed, max_us) =
        (words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
    (runs, failed, max_us, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Past the crash limit the mount stays, serves every file as its original, status says
/// so, and the full server comes back after the back-off; no command fails throughout.
#[test]
fn past_the_crash_limit_the_mount_serves_originals_and_comes_back() {
    let f = fixture();
    let config = f.state.with_extension("toml");
    std::fs::write(&config, "[supervisor]\nsafe_mode_retry_secs = 3\n").unwrap();
    let mut d = Daemon::start(&f.mnt, &[&f.bin], &f.state, Some(&config));
    let stop = f.state.with_extension("stop");
    let child = command_loop(&d.bin(), &stop);
    for _ in 0..5 {
        loop_goes_on(&stop, 2);
        let pid = d.server_pid();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        d.wait_for(Duration::from_secs(10), "a new server", |d| {
            (d.try_server_pid().is_some_and(|p| p != pid)).then_some(())
        });
    }
    let text = d.wait_for(Duration::from_secs(10), "safe mode in status", |d| {
        let text = d.status_text();
        text.contains("SAFE MODE").then_some(text)
    });
    assert!(text.contains("failed 5 times"), "{text}");
    assert_eq!(d.status_json()["mode"], "safe");
    assert!(is_mounted(&f.mnt));
    assert_eq!(run(Command::new(d.bin().join("hello")).arg("safe")).stdout, "hello safe\n");
    let err = d.control("exclude hello").expect_err("commands wait for the full server");
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    d.wait_for(Duration::from_secs(20), "the full server back", |d| {
        (!d.status_text().contains("SAFE MODE")).then_some(())
    });
    loop_goes_on(&stop, 21);
    std::fs::write(&stop, b"").unwrap();
    let (runs, failed, max_us, stderr) = loop_result(child);
    println!(
        "{runs} iterations through 5 server kills, safe mode and back: {failed} failed, \
         longest iteration {} ms",
        max_us / 1000
    );
    assert!(runs > 20, "the loop made progress: {runs}");
    assert_eq!(failed, 0, "{stderr}");
    d.control("exclude hello").expect("the full server takes commands again");
    d.stop();
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let mut fields = rest.split(' ');
        let state = fields.next();
        if state != Some("Z") && fields.next().and_then(|s| s.parse().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// The background service as `optbin mount` starts it: holder, supervisor, server.
struct Service {
    holder: i32,
    mnt: PathBuf,
    state: PathBuf,
}

impl Service {
    fn supervisor(&self) -> Option<i32> {
        children_of(self.holder).into_iter().next()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("optbin.log")).unwrap_or_default()
    }

    /// Waits until a supervisor other than `old` serves status again.
    fn wait_restarted(&self, old: i32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.supervisor().is_some_and(|s| s != old)
                && std::fs::read(self.mnt.join(".optbin/status")).is_ok()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not come back; log:\n{}",
                common::daemon::tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let mut all = vec![self.holder];
        let mut i = 0;
        while i < all.len() {
            all.extend(children_of(all[i]));
            i += 1;
        }
        for p in all {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if is_mounted(&self.mnt) {
            let c = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The whole service dying: the supervisor is SIGKILLed, then supervisor and server at
/// once, while a shell runs commands through PATH. The holder keeps the FUSE connection
/// and restarts the daemon, which adopts it: no command fails, they only pause.
#[test]
fn commands_keep_working_while_the_whole_service_is_killed() {
    let f = fixture();
    let out = run(Command::new(OPTBIN)
        .arg("mount")
        .arg(&f.mnt)
        .arg("--state-dir")
        .arg(&f.state)
        .arg("--overlay")
        .arg(&f.bin));
    assert_eq!(out.code, Some(0), "{out:?}");
    let holder: i32 = out
        .stdout
        .split("holder pid ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no holder pid in {:?}", out.stdout));
    let service = Service { holder, mnt: f.mnt.clone(), state: f.state.clone() };
    let bin = f.mnt.join("bin");
    let stop = f.state.with_extension("stop");
    let child = command_loop(&bin, &stop);
    loop_goes_on(&stop, 3);

    let supervisor = service.supervisor().expect("a supervisor under the holder");
    unsafe { libc::kill(supervisor, libc::SIGKILL) };
    service.wait_restarted(supervisor);
    loop_goes_on(&stop, 3);

    let supervisor = service.supervisor().unwrap();
    let server: i32 =
        std::fs::read_to_string(f.state.join("server.pid")).unwrap().trim().parse().unwrap();
    unsafe {
        libc::kill(supervisor, libc::SIGKILL);
        libc::kill(server, libc::SIGKILL);
    }
    service.wait_restarted(supervisor);
    loop_goes_on(&stop, 3);

    std::fs::write(&stop, b"").unwrap();
    let (runs, failed, max_us, stderr) = loop_result(child);
    println!(
        "{runs} iterations while the supervisor, then supervisor and server, were SIGKILLed: \
         {failed} failed, longest iteration (the pause) {} ms",
        max_us / 1000
    );
    assert!(runs > 10, "the loop made progress: {runs}");
    assert_eq!(failed, 0, "{stderr}\nlog:\n{}", common::daemon::tail(&service.log(), 40));

    let out = run(Command::new(OPTBIN).arg("umount").arg(&f.mnt));
    assert_eq!(out.code, Some(0), "{out:?}");
    common::daemon::wait_until(Duration::from_secs(20), "the holder to exit after umount", || {
        // SAFETY: signal 0 only checks that the holder process exists.
        let alive = unsafe { libc::kill(holder, 0) } == 0
            && std::fs::read_to_string(format!("/proc/{holder}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
        !alive
    });
    assert!(!is_mounted(&f.mnt));
}

/// Unmounts a tmpfs on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// With the state directory full, runs that were measured but could not be stored are
/// counted and shown, instead of "0 lost".
#[test]
fn runs_that_cannot_be_recorded_are_counted() {
    let f = fixture();
    std::fs::create_dir_all(&f.state).unwrap();
    let out =
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&f.state));
    assert_eq!(out.code, Some(0), "{out:?}");
    let _tmpfs = Tmpfs(f.state.clone());
    let d = start_serving_everything(&f);
    assert_eq!(run(Command::new(d.bin().join("hello")).arg("x")).stdout, "hello x\n");
    // Fill the state directory's filesystem.
    {
        use std::io::Write;
        let mut fill = std::fs::File::create(f.state.join("fill")).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while fill.write_all(&chunk).is_ok() {}
    }
    let text = d.wait_for(Duration::from_secs(30), "unrecorded runs in status", |d| {
        let _ = run(Command::new(d.bin().join("hello")).arg("y"));
        let text = d.status_text();
        text.contains("not recorded").then_some(text)
    });
    let line = text.lines().find(|l| l.contains("not recorded")).unwrap();
    println!("{}", line.trim());
    assert!(!line.contains(" 0 measured but not recorded"), "{line}");
    drop(d);
}

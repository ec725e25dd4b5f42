//! The policy and measurement in the real daemon, end to end: a gcc-built program is
//! overlaid; a variant (a second build of it that segfaults on one argument) is placed
//! through the catalog and the store as a `ready` BOLT variant; the daemon runs it as a
//! canary (execs split between variant and original, each run measured with real perf
//! counters and the kernel's process connector), quarantines it at its first crash and
//! serves the original from then on. Pins and exclusions through the control file override
//! the policy. Only the variant's origin is staged (it is not built by BOLT).

#[path = "common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;

/// Prints its TAG and first argument; built with -DCRASH_ON it segfaults on `crash`.
const TOOL_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *arg = argc > 1 ? argv[1] : "";
#ifdef CRASH_ON
    if (strcmp(arg, "crash") == 0) {
        volatile int *nowhere = 0;
        *nowhere = 1;
    }
#endif
    if (strcmp(arg, "exe") == 0) {
        char exe[4096];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[n > 0 ? n : 0] = 0;
        printf("%s %s\n", TAG, exe);
        return 0;
    }
    printf("%s %s\n", TAG, arg);
    /* Alive a while after the exec: a native exec is heard only if its executable can
       still be read from /proc when the daemon handles the exec's event. */
    fflush(stdout);
    usleep(10000);
    return 0;
}
"#;

/// Fast rescans; `min_runs` above the 20 execs each arm can get before the crash, so the
/// canary stays undecided by speed until then (the quarantine needs no minimum of runs).
const CONFIG: &str = r#"
[policy]
canary_share = 0.5
min_runs = 25
rescan_ms = 100
"#;

struct Runs {
    variant: usize,
    original: usize,
}

/// Runs `tool ARG` through the mount `n` times; counts whose output each run had.
fn run_tool(daemon: &Daemon, arg: &str, n: usize) -> Runs {
    let mut runs = Runs { variant: 0, original: 0 };
    for _ in 0..n {
        let out = run(Command::new(daemon.mnt.join("bin/tool")).arg(arg));
        assert_eq!(out.code, Some(0), "{out:?}");
        match out.stdout.as_str().strip_suffix(&format!(" {arg}\n")) {
            Some("variant") => runs.variant += 1,
            Some("original") => runs.original += 1,
            _ => panic!("unexpected output {out:?}"),
        }
    }
    runs
}

/// Runs per variant from the policy's status (`None`: the original).
fn status_runs(binary: &serde_json::Value) -> (u64, u64) {
    let mut original = 0;
    let mut variant = 0;
    for r in binary["details"]["policy"]["runs"].as_array().into_iter().flatten() {
        let n = r["runs"].as_u64().unwrap_or(0);
        if r["variant"].is_null() { original += n } else { variant += n }
    }
    (original, variant)
}

fn stage(binary: &serde_json::Value) -> String {
    binary["details"]["policy"]["stage_text"].as_str().unwrap_or_default().to_string()
}

/// Runs `tool crash` through the mount until an exec gets the variant (which segfaults on
/// it; the original prints) and waits for the quarantine that follows; returns the
/// binary's status then.
fn crash_the_variant(daemon: &Daemon, tool: &std::path::Path) -> serde_json::Value {
    let mut crashed = false;
    for _ in 0..40 {
        let out = Command::new(daemon.mnt.join("bin/tool")).arg("crash").output().unwrap();
        if out.status.signal() == Some(libc::SIGSEGV) {
            crashed = true;
            break;
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout), "original crash\n");
    }
    assert!(crashed, "40 execs never reached the variant");
    wait_binary(daemon, tool, 20, "the quarantine", |b| {
        b["variants"][0]["state"] == "quarantined" && b["served"] == "original (link)"
    })
}

#[test]
fn canary_split_quarantine_on_crash_pins_and_exclusion() {
    let started = Instant::now();
    let (_tmp, root, bin) = open_test_root();
    let tool = bin.join("tool");
    cc(TOOL_C, &tool, &["-DTAG=\"original\""]);
    let variant_file = root.join("tool.variant");
    cc(TOOL_C, &variant_file, &["-DTAG=\"variant\"", "-DCRASH_ON"]);

    let mut daemon = start_daemon(&root, &bin, CONFIG);
    let status = daemon.status_json();
    assert_eq!(status["subsystems"]["policy"]["measurement"]["on"], true, "{status:#}");

    // A lookup through the mount makes the daemon index the binary.
    std::fs::metadata(daemon.mnt.join("bin/tool")).unwrap();
    let b =
        wait_binary(&daemon, &tool, 20, "the binary to be indexed", |b| b["sha256"].is_string());
    let sha256 = b["sha256"].as_str().unwrap().to_string();
    // No variant yet: passed through, it runs natively.
    assert_eq!(b["served"], "original (link)");

    // The variant enters canary: half of the execs, drawn per exec.
    let vid = place_variant(&daemon.state, &sha256, &variant_file, "ready");
    let canary = format!("variant {vid} for 50% of execs");
    let b = wait_binary(&daemon, &tool, 20, "the canary", |b| b["served"] == canary.as_str());
    assert!(stage(&b).starts_with("canary"), "{b:#}");
    assert_eq!(b["variants"][0]["state"], "canary");

    let split = run_tool(&daemon, "hello", 20);
    assert!(
        split.variant > 0 && split.original > 0,
        "20 execs all went one way: {} to the variant; log:\n{}",
        split.variant,
        daemon.log()
    );
    // Every run was measured and attributed to what it ran.
    let b = wait_binary(&daemon, &tool, 20, "20 measured runs", |b| {
        let (o, v) = status_runs(b);
        o + v >= 20
    });
    assert_eq!(
        status_runs(&b),
        (split.original as u64, split.variant as u64),
        "runs per variant in status vs what the runs printed: {b:#}"
    );
    assert!(stage(&b).contains(&format!("variant {vid}: {} runs", split.variant)), "{}", stage(&b));

    // A pin to the original overrides the canary at once; unpinning resumes it.
    daemon.control("pin tool original").unwrap();
    let pinned = run_tool(&daemon, "hello", 10);
    assert_eq!((pinned.variant, pinned.original), (0, 10));
    let b = daemon.binary(&tool).unwrap();
    // Pinned to the original: nothing to choose, it runs natively.
    assert_eq!(b["served"], "original (link)");
    assert_eq!(b["served_reason"], "pinned to the original");
    assert_eq!(b["pin"], "original");
    daemon.control("unpin tool").unwrap();
    let b = daemon.binary(&tool).unwrap();
    assert_eq!(b["served"], format!("variant {vid} for 50% of execs"), "{b:#}");

    // The variant's first crash quarantines it: no strikes, no minimum number of runs.
    let b = crash_the_variant(&daemon, &tool);
    let incident = b["details"]["policy"]["last_incident"].as_str().unwrap_or_default();
    assert!(incident.contains("SIGSEGV (11)"), "{b:#}");
    assert!(stage(&b).contains(&format!("variant {vid} crashed")), "{}", stage(&b));
    let after = run_tool(&daemon, "crash", 20);
    assert_eq!((after.variant, after.original), (0, 20), "the original serves every exec now");

    // The catalog (read-only) holds one incident and one crashed run of the variant.
    let conn = rusqlite::Connection::open_with_flags(
        daemon.state.join("catalog.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [vid], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM incidents WHERE variant_id = ?1 AND exit_signal = 11"),
        1
    );
    assert_eq!(count("SELECT count(*) FROM runs WHERE variant_id = ?1 AND exit_signal = 11"), 1);
    assert_eq!(
        count("SELECT count(*) FROM runs WHERE variant_id = ?1 AND exit_signal IS NULL"),
        split.variant as i64
    );

    // The pinned and the post-quarantine runs had nothing to serve but the original: they
    // ran natively, counted, not measured. (A process that exits within a millisecond of
    // its exec may be gone before its executable is read: 7 and 11 of 30 were missed in two
    // full runs when the tool exited at once; it stays 10 ms now, and a miss or two is
    // allowed.)
    wait_binary(&daemon, &tool, 10, "the native execs counted", |b| {
        b["details"]["policy"]["native_execs"].as_u64() >= Some(10 + 20 - 2)
    });

    // A pin to bolted never brings back a quarantined variant.
    daemon.control("pin tool bolted").unwrap();
    let b = daemon.binary(&tool).unwrap();
    assert_eq!(b["served"], "original (link)", "{b:#}");
    daemon.control("unpin tool").unwrap();

    // Excluded: the entry becomes a symlink to the original, which still runs.
    daemon.control("exclude tool").unwrap();
    let entry = in_mount(&daemon.mnt, &tool);
    let md = std::fs::symlink_metadata(&entry).unwrap();
    assert!(md.file_type().is_symlink(), "{} is not a symlink", entry.display());
    assert_eq!(std::fs::read_link(&entry).unwrap(), tool);
    assert_eq!(run_tool(&daemon, "hello", 3).original, 3);
    let b = daemon.binary(&tool).unwrap();
    assert_eq!(
        (b["served"].as_str(), b["excluded"].as_bool()),
        (Some("original (link)"), Some(true))
    );

    // The excluded runs are not counted: never more native execs than the 30 above. Every
    // exec with a variant in play was measured: the 20 of the split and at least the crash.
    let native = daemon.binary(&tool).unwrap();
    let n = native["details"]["policy"]["native_execs"].as_u64().unwrap();
    assert!(n <= 10 + 20, "{n} native execs counted of 30: {native:#}");
    let through_mount = 20 + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.status_json();
        let measurement = &status["subsystems"]["policy"]["measurement"];
        if measurement["runs_measured"].as_u64().unwrap_or(0) >= through_mount {
            assert_eq!(measurement["dropped"]["not_attached"], 0, "{measurement:#}");
            break;
        }
        assert!(Instant::now() < deadline, "runs went unmeasured: {measurement:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(daemon.mnt.join(".optbin/status")).unwrap();
    assert!(text.contains("policy: measuring runs"), "{text}");
    // Which counters runs get is said once for the machine; without a PMU, that it has none.
    let pmu = optbin::measure::counters::PerfCounterFactory::detect();
    if pmu.has_hardware() {
        assert!(text.contains("counters: task-clock, page-faults, context-switches"), "{text}");
    } else {
        assert_eq!(text.matches("counters: no PMU here").count(), 1, "{text}");
    }
    eprintln!("{text}");
    daemon.stop();
    eprintln!("policy_e2e took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_bad_policy_section_stops_the_daemon_before_it_mounts() {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let (bin, mnt) = (root.join("bin"), root.join("mnt"));
    std::fs::create_dir_all(&bin).unwrap();
    let config = root.join("config.toml");
    std::fs::write(&config, "[policy]\ncanary_shares = 0.5\n").unwrap();
    let mut child = Command::new(common::daemon::OPTBIN)
        .arg("mount")
        .arg(&mnt)
        .arg("--foreground")
        .arg("--overlay")
        .arg(&bin)
        .arg("--state-dir")
        .arg(root.join("state"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            // It must not have mounted: clean up whatever it did before failing.
            child.kill().ok();
            child.wait().ok();
            let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            panic!("optbin kept running with a bad [policy] section");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("canary_shares") && stderr.contains("[policy]"), "{stderr}");
    assert!(!is_mounted(&mnt));
}

/// A canary clearly faster than the original, whose saving per run is still less than what
/// the policy is told serving through the mount adds to an exec (`serving_cost_us`, set
/// here far above the real cost so that a real 3 ms saving falls below it): rejected with
/// both figures, and the binary runs natively again.
#[test]
fn a_gain_smaller_than_what_serving_costs_is_not_served() {
    let (_tmp, root, bin) = open_test_root();
    let tool = bin.join("worktool");
    cc(WORK_C, &tool, &["-DSLOW"]);
    let fast = root.join("fast");
    cc(WORK_C, &fast, &[]);
    let d = start_daemon(&root, &bin, &format!("{CONFIG}serving_cost_us = 50000\n"));
    let through_mount = d.bin().join("worktool");
    assert_eq!(run(Command::new(&through_mount).arg("10")).code, Some(0));
    let b = wait_binary(&d, &tool, 20, "the binary indexed", |b| b["sha256"].is_string());
    let vid = place_variant(&d.state, b["sha256"].as_str().unwrap(), &fast, "ready");
    let canary = format!("variant {vid} for 50% of execs");
    wait_binary(&d, &tool, 20, "the canary", |b| b["served"] == canary.as_str());

    // About 4 ms of CPU per run for the original, 1 ms for the variant.
    let decided = d.wait_for(Duration::from_secs(120), "a decision on the canary", |d| {
        assert_eq!(run(Command::new(&through_mount).arg("1000000")).code, Some(0));
        let b = d.binary(&tool)?;
        matches!(stage_key(&b).as_str(), "serving_optimized" | "serving_original").then_some(b)
    });
    let text = stage(&decided);
    assert_eq!(stage_key(&decided), "serving_original", "{decided:#}");
    assert_eq!(decided["variants"][0]["state"], "rejected", "{decided:#}");
    assert!(text.contains("faster by"), "{text}");
    assert!(
        text.contains("less than serving through the mount adds to an exec (50000 us)"),
        "{text}"
    );
    // Nothing left to serve: it runs natively again.
    assert_eq!(decided["served"], "original (link)", "{decided:#}");
}

/// A served (promoted) variant's runs are sampled for counters (`[policy]
/// served_count_one_in`); the others are followed to their exit only, so a crash in one of
/// them quarantines the variant at once. Sampled at one in a million here: every run of
/// this test goes without counters.
#[test]
fn a_served_variants_runs_are_sampled_and_a_crash_without_counters_quarantines() {
    let (_tmp, root, bin) = open_test_root();
    // Through the mount, not bound (bound runs: the next test).
    let config = "[policy]\nrescan_ms = 100\nserved_count_one_in = 1000000\nbind_served = false\n";
    let (daemon, tool, vid) = served_tool(&root, &bin, config, "95%");

    let measurement = |d: &Daemon| d.status_json()["subsystems"]["policy"]["measurement"].clone();
    let count = |m: &serde_json::Value, key: &str| m[key].as_u64().unwrap_or(0);
    let before = measurement(&daemon);
    let runs = run_tool(&daemon, "hello", 30);
    assert!(runs.variant > 0, "30 execs never reached the variant");
    let after = daemon.wait_for(Duration::from_secs(20), "the 30 runs followed", |d| {
        let m = measurement(d);
        (count(&m, "runs_measured") >= count(&before, "runs_measured") + 30).then_some(m)
    });
    let without = count(&after, "runs_without_counters") - count(&before, "runs_without_counters");
    assert_eq!(without, 30, "every run went without counters: {after:#}");
    let text = std::fs::read_to_string(daemon.mnt.join(".optbin/status")).unwrap();
    assert!(
        text.contains("without counters (a served variant's runs are counted one in 1000000)"),
        "{text}"
    );

    // The variant's first crash, in a run without counters, quarantines it.
    let b = crash_the_variant(&daemon, &tool);
    assert!(stage(&b).contains(&format!("variant {vid} crashed")), "{}", stage(&b));

    // In the catalog: the runs without counters, flagged as such, the crash among them.
    let conn = common::daemon::catalog_read_only(&daemon.state);
    let count = |sql: &str| -> i64 { conn.query_row(sql, [vid], |r| r.get(0)).unwrap() };
    assert_eq!(
        count(
            "SELECT count(*) FROM runs WHERE variant_id = ?1 AND exit_signal = 11 AND counted = 0"
        ),
        1
    );
    assert_eq!(count("SELECT count(*) FROM runs WHERE variant_id = ?1 AND counted = 1"), 0);
    assert_eq!(
        count("SELECT count(*) FROM runs WHERE variant_id = ?1 AND counted = 0 AND exit_code = 0"),
        runs.variant as i64
    );
}

/// Mounts at or below `dir`.
fn mounts_under(dir: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(p).starts_with(dir)))
        .count()
}

fn store_path(state: &Path, vid: i64) -> PathBuf {
    let conn = common::daemon::catalog_read_only(state);
    let p: String = conn
        .query_row("SELECT store_path FROM variants WHERE id = ?1", [vid], |r| r.get(0))
        .unwrap();
    PathBuf::from(p)
}

/// `tool` (the original) with a variant that crashes on `crash`, placed as served; waits
/// until status serves it to `label` ("95%") of execs.
fn served_tool(root: &Path, bin: &Path, config: &str, label: &str) -> (Daemon, PathBuf, i64) {
    let tool = bin.join("tool");
    cc(TOOL_C, &tool, &["-DTAG=\"original\""]);
    let variant_file = root.join("tool.variant");
    cc(TOOL_C, &variant_file, &["-DTAG=\"variant\"", "-DCRASH_ON"]);
    let daemon = start_daemon(root, bin, config);
    std::fs::metadata(daemon.mnt.join("bin/tool")).unwrap();
    let b =
        wait_binary(&daemon, &tool, 20, "the binary to be indexed", |b| b["sha256"].is_string());
    let vid = place_variant(&daemon.state, b["sha256"].as_str().unwrap(), &variant_file, "served");
    let served = format!("variant {vid} for {label} of execs");
    wait_binary(&daemon, &tool, 20, "the served variant", |b| b["served"] == served.as_str());
    (daemon, tool, vid)
}

/// A served tool whose variant the daemon has bind-mounted over its mirror entry.
fn bound_tool(
    root: &Path,
    bin: &Path,
    config: &str,
    label: &str,
) -> (Daemon, PathBuf, PathBuf, i64) {
    let (daemon, tool, vid) = served_tool(root, bin, config, label);
    let mirror = common::in_mount(&daemon.mnt, &tool);
    daemon.wait_for(Duration::from_secs(20), "the variant bind-mounted", |_| {
        is_mounted(&mirror).then_some(())
    });
    (daemon, tool, mirror, vid)
}

#[test]
fn a_promoted_variant_is_bind_mounted_its_runs_followed_and_a_crash_unbinds_it() {
    use std::os::unix::fs::MetadataExt;
    let (_tmp, root, bin) = open_test_root();
    // An even exploration share: a window through the mount after every bound exec (at
    // most one per 100 ms), so that 40 runs see a few.
    let config = "[policy]\nrescan_ms = 100\nexploration_share = 0.5\n";
    let (daemon, tool, mirror, vid) = bound_tool(&root, &bin, config, "50%");

    // The entry is the store file itself, read-only, and a bound run's executable is still
    // named by its path in the mount.
    let store = store_path(&daemon.state, vid);
    let (m, s) = (std::fs::metadata(&mirror).unwrap(), std::fs::metadata(&store).unwrap());
    assert_eq!(
        (m.dev(), m.ino()),
        (s.dev(), s.ino()),
        "{} is not the store file",
        mirror.display()
    );
    let write = std::fs::OpenOptions::new().write(true).open(&mirror).unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
    let exe = (0..20)
        .map(|_| run(Command::new(daemon.mnt.join("bin/tool")).arg("exe")).stdout)
        .find(|out| out.starts_with("variant "))
        .expect("20 execs never reached the variant");
    assert_eq!(exe, format!("variant {}\n", mirror.display()));

    // Every run is followed to its exit: bound ones heard through the mount's mark, those
    // of the windows through the mount.
    let measurement = |d: &Daemon| d.status_json()["subsystems"]["policy"]["measurement"].clone();
    let count = |m: &serde_json::Value, key: &str| m[key].as_u64().unwrap_or(0);
    let before = measurement(&daemon);
    let runs = run_tool(&daemon, "hello", 40);
    let after = daemon.wait_for(Duration::from_secs(20), "the 40 runs followed", |d| {
        let m = measurement(d);
        (count(&m, "runs_measured") >= count(&before, "runs_measured") + 40).then_some(m)
    });
    let bound = count(&after["bound"], "execs") - count(&before["bound"], "execs");
    let windows = count(&after["bound"], "windows") - count(&before["bound"], "windows");
    println!(
        "40 runs: {} of the variant, {} of the original; {bound} bound, {windows} windows",
        runs.variant, runs.original
    );
    assert!(bound >= 20, "{bound} of 40 runs were bound: {after:#}");
    assert!(windows >= 1 && runs.original >= 1, "no window in 40 runs: {after:#}");
    let conn = common::daemon::catalog_read_only(&daemon.state);
    let n = |sql: &str| -> i64 { conn.query_row(sql, [vid], |r| r.get(0)).unwrap() };
    assert!(n("SELECT count(*) FROM runs WHERE variant_id = ?1 AND counted = 0") >= 20);
    let original_counted: i64 = conn
        .query_row("SELECT count(*) FROM runs WHERE variant_id IS NULL AND counted = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(original_counted >= 1, "the windows' original runs are counted");
    // One bound run in `served_count_one_in` (8) is read for its command line, the others
    // are stored as `unread` (the read slows the new process down): of 20 or more bound
    // runs, all read is a chance of 8^-20. A read one names a command that was run.
    let in_mount = daemon.mnt.join("bin/tool");
    let hash = |arg: &str| {
        use std::os::unix::ffi::OsStrExt;
        optbin::measure::cmdline::cmd_hash_of_args(&[
            in_mount.as_os_str().as_bytes(),
            arg.as_bytes(),
        ])
    };
    let commands: Vec<(String, i64)> = {
        let sql = "SELECT cmd_hash, count(*) FROM runs WHERE variant_id = ?1 AND counted = 0 \
                   GROUP BY 1";
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([vid], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    println!("uncounted runs of the variant by command: {commands:?}");
    let unread = optbin::measure::cmdline::UNREAD_CMD;
    assert!(commands.iter().any(|(c, _)| c == unread), "no bound run left unread: {commands:?}");
    for (c, _) in &commands {
        assert!([unread.to_string(), hash("exe"), hash("hello")].contains(c), "{c}: {commands:?}");
    }
    drop(conn);

    // The variant's first crash quarantines it, and the bind mount goes with it.
    crash_the_variant(&daemon, &tool);
    daemon.wait_for(Duration::from_secs(10), "the bind mount removed", |_| {
        (!is_mounted(&mirror)).then_some(())
    });
    assert_eq!(run(Command::new(daemon.mnt.join("bin/tool")).arg("x")).stdout, "original x\n");
}

#[test]
fn a_bound_variant_survives_a_server_crash_and_goes_with_an_upgrade_and_the_stop() {
    let (_tmp, root, bin) = open_test_root();
    let (mut daemon, tool, mirror, _) =
        bound_tool(&root, &bin, "[policy]\nrescan_ms = 100\n", "95%");

    // A new server clears the mounts of the dead one (their marks died with it) and binds
    // again: one mount, and its runs heard.
    let server = daemon.server_pid();
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    daemon.wait_for(Duration::from_secs(30), "a new server with the variant bound", |d| {
        let bound = d.try_server_pid().is_some_and(|p| p != server)
            && d.status_json()["subsystems"]["policy"]["measurement"]["bound"]["bound_now"] == 1;
        bound.then_some(())
    });
    assert_eq!(mounts_under(&mirror), 1, "one bind mount, not one per server");
    let measured = |d: &Daemon| {
        d.status_json()["subsystems"]["policy"]["measurement"]["bound"]["execs"].as_u64().unwrap()
    };
    run_tool(&daemon, "hello", 5);
    daemon.wait_for(Duration::from_secs(10), "bound runs heard by the new server", |d| {
        (measured(d) >= 1).then_some(())
    });

    // An upgrade underneath: the bind goes and the new version runs.
    let new = root.join("tool.new");
    cc(TOOL_C, &new, &["-DTAG=\"upgraded\""]);
    let upgraded_at = Instant::now();
    std::fs::rename(&new, &tool).unwrap();
    let mut stale = 0;
    daemon.wait_for(Duration::from_secs(10), "the upgrade served", |d| {
        let out = run(Command::new(d.mnt.join("bin/tool")).arg("x")).stdout;
        stale += usize::from(out != "upgraded x\n");
        (out == "upgraded x\n").then_some(())
    });
    println!(
        "upgrade: the new version ran {} ms after the rename, after {stale} runs of the old",
        upgraded_at.elapsed().as_millis()
    );
    daemon.wait_for(Duration::from_secs(10), "the bind mount removed", |_| {
        (!is_mounted(&mirror)).then_some(())
    });

    // A clean stop leaves no mount behind.
    daemon.stop();
    assert_eq!(mounts_under(&daemon.mnt), 0);
}

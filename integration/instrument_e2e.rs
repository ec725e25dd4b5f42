//! Instrumentation mode in the real daemon, end to end: with `[profile] instrumentation =
//! "on"` and a small budget, a gcc-built program (symbols, PIE, `-Wl,--emit-relocs`) run
//! through `<mnt>/bin` gets an instrumented variant built by the real `llvm-bolt
//! -instrument`; the mount serves it to some execs (their outputs equal the original's);
//! the profiles those runs write into the instrumentation directory are collected into the
//! catalog; status says `instrumented runs: n/M`; and once the budget's runs are in, a BOLT
//! variant is built from the instrumentation profile. Sampling is set to never mature, so
//! the BOLT build can only come from the instrumentation profile.

#[path = "common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;
use rusqlite::{Connection, OpenFlags};

const ARG: &str = "200000";
/// For runs that must be heard when they run natively: a process gone within about a
/// millisecond of its exec may be (see `heard`), this one runs for about 15 ms.
const LONG_ARG: &str = "2000000";
const MAX_RUNS: i64 = 3;

fn catalog(state: &Path) -> Connection {
    let c = Connection::open_with_flags(
        state.join("catalog.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// (kind, state, id) of every variant of the binary at `path`.
fn variants(state: &Path, path: &Path) -> Vec<(String, String, i64)> {
    let c = catalog(state);
    let mut stmt = c
        .prepare(
            "SELECT v.kind, v.state, v.id FROM variants v JOIN paths p ON p.binary_id = v.binary_id
             WHERE p.path = ?1 ORDER BY v.id",
        )
        .unwrap();
    stmt.query_map([path.to_string_lossy()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn instrumented_runs(state: &Path, path: &Path) -> i64 {
    catalog(state)
        .query_row(
            "SELECT i.runs FROM instr_profiles i JOIN paths p ON p.binary_id = i.binary_id
             WHERE p.path = ?1",
            [path.to_string_lossy()],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

fn output(cmd: &mut Command) -> String {
    let out = common::run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
}

#[test]
fn instrumentation_mode_collects_a_profile_through_the_mount_and_bolt_uses_it() {
    let dir = common::open_tempdir();
    let bin = std::fs::canonicalize(dir.path()).unwrap().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let prog = bin.join("prog");
    common::cc(common::STEPS_C, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let expected = output(Command::new(&prog).arg(ARG));
    let instr_dir: PathBuf = dir.path().join("instr");
    let config = format!(
        "[profile]\nflush_secs = 1\nwindow_secs = 2\nidentify_after_samples = 5\n\
         min_samples = 100000000\ninstrumentation = \"on\"\ninstrument_first_runs = 2\n\
         instrument_one_in = 2\ninstrument_max_runs = {MAX_RUNS}\ninstrumentation_dir = {:?}\n\n\
         [optimizer]\nscratch_dir = {:?}\nmin_text_bytes = 256\ncheck_interval_secs = 1\n\
         timeout_secs = 120\n",
        instr_dir.display().to_string(),
        dir.path().join("scratch").display().to_string(),
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start(
        &dir.path().join("mnt"),
        &[&bin],
        &state,
        Some(&dir.path().join("config.toml")),
    );
    let through_mount = d.bin().join("prog");
    let mut runs = 0;
    let mut run = || {
        runs += 1;
        let got = output(Command::new(&through_mount).arg(ARG));
        assert_eq!(got, expected, "run {runs} through the mount");
    };

    // Run until the instrumented variant exists.
    let instr_id = d.wait_for(Duration::from_secs(40), "an instrumented variant", |_| {
        run();
        variants(&state, &prog).into_iter().find(|v| v.0 == "instrumented").map(|v| v.2)
    });
    let mode = std::fs::metadata(&instr_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1733, "the instrumentation dir is root-owned 1733");
    // A run as another user through the mount works too (whichever variant it gets)...
    assert_eq!(output(common::as_nobody(&through_mount).arg(ARG)), expected);
    // ...and so does the instrumented variant itself: it reads its own file from the
    // readable copy (`-instrumentation-binpath`), not from /proc/self/map_files (root only).
    let store_path: String = catalog(&state)
        .query_row("SELECT store_path FROM variants WHERE id = ?1", [instr_id], |r| r.get(0))
        .unwrap();
    let copy = dir.path().join("instrumented-copy");
    std::fs::copy(&store_path, &copy).unwrap();
    common::chmod(&copy, 0o755);
    assert_eq!(output(common::as_nobody(&copy).arg(ARG)), expected, "instrumented, as nobody");

    // Its runs write profiles the daemon collects; then BOLT builds from them.
    d.wait_for(Duration::from_secs(40), "the instrumentation profile and a BOLT variant", |_| {
        run();
        let v = variants(&state, &prog);
        let bolt = v.iter().any(|v| v.0 == "bolt");
        (instrumented_runs(&state, &prog) >= MAX_RUNS && bolt).then_some(())
    });
    let v = variants(&state, &prog);
    let instr = v.iter().find(|v| v.2 == instr_id).unwrap();
    assert_eq!(instr.1, "retired", "done collecting: {v:?}");
    let c = catalog(&state);
    let served_instrumented: i64 = c
        .query_row("SELECT COUNT(*) FROM runs WHERE variant_id = ?1", [instr_id], |r| r.get(0))
        .unwrap();
    assert!(served_instrumented > 0, "execs got the instrumented variant");
    // The cut-off is applied asynchronously (an exec-open past the budget queues a re-check of
    // the path), so under load an exec or two racing with it may still get the variant.
    assert!(served_instrumented <= 2 * MAX_RUNS + 2, "bounded: {served_instrumented} runs");
    // Retired: no more execs get it. The serving table no longer names it, and four more
    // runs, each heard by the daemon (measured where a variant is in play, else counted as
    // run natively), add no run of it.
    d.wait_for(Duration::from_secs(20), "the retired variant out of the serving table", |d| {
        let b = d.binary(&prog)?;
        (!serves_variant(&b, instr_id)).then_some(())
    });
    let last_run: i64 =
        c.query_row("SELECT COALESCE(MAX(id), 0) FROM runs", [], |r| r.get(0)).unwrap();
    let before = d.wait_for(Duration::from_secs(20), "the policy's status", |d| {
        heard(d, &state, &prog, last_run)
    });
    let expected_long = output(Command::new(&prog).arg(LONG_ARG));
    for _ in 0..4 {
        assert_eq!(output(Command::new(&through_mount).arg(LONG_ARG)), expected_long);
    }
    d.wait_for(Duration::from_secs(20), "the last four runs to be heard", |d| {
        (heard(d, &state, &prog, last_run)? >= before + 4).then_some(())
    });
    let after: i64 = c
        .query_row("SELECT COUNT(*) FROM runs WHERE variant_id = ?1", [instr_id], |r| r.get(0))
        .unwrap();
    assert_eq!(after, served_instrumented, "the retired instrumented variant is not served");
    eprintln!(
        "{runs} runs through the mount; {served_instrumented} measured runs of the instrumented \
         variant; {} instrumented runs collected; variants {v:?}",
        instrumented_runs(&state, &prog)
    );
    let (outcome, flags): (String, String) = c
        .query_row(
            "SELECT j.last_outcome, j.flags FROM bolt_jobs j JOIN paths p ON p.binary_id = j.binary_id
             WHERE p.path = ?1",
            [prog.to_string_lossy()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome, "ok");
    assert!(flags.contains("-data=<profile>") && !flags.contains("-instrument"), "{flags}");
    let status = d.status_text();
    let progress = status
        .split("instrumented runs: ")
        .nth(1)
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit() && ch != '/').next())
        .unwrap_or_else(|| panic!("no instrumented runs in status:\n{status}"));
    let (n, m) = progress.split_once('/').unwrap();
    assert!(n.parse::<i64>().unwrap() >= MAX_RUNS && m == MAX_RUNS.to_string(), "{progress}");
    drop(d);
    assert!(!common::is_mounted(&dir.path().join("mnt")));
}

/// A program for the budget's limits: `prog N` computes, `prog crash` dies of SIGSEGV,
/// `prog long SECS` computes for SECS seconds of wall time.
const MODES: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
__attribute__((noinline)) unsigned long mix(unsigned long s, unsigned long i) {
    switch (i & 3) { case 0: return s * 31 + i; case 1: return s ^ (i << 3); case 2: return s + (i >> 1); default: return s - i; }
}
__attribute__((noinline)) unsigned long work(unsigned long n) {
    unsigned long s = 1;
    for (unsigned long i = 0; i < n; i++) s = mix(s, i);
    return s;
}
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "crash") == 0) { raise(SIGSEGV); return 1; }
    if (argc > 2 && strcmp(argv[1], "long") == 0) {
        time_t end = time(0) + atoi(argv[2]);
        unsigned long s = 0;
        while (time(0) < end) s += work(1000000);
        printf("result %lu\n", s);
        return 0;
    }
    printf("result %lu\n", work(argc > 1 ? strtoul(argv[1], 0, 10) : 1000));
    return 0;
}
"#;

/// A daemon over a temp bin dir holding `prog` (MODES, relocations kept) with the default
/// instrumentation budget plus `extra` `[profile]` lines; sampling never matures.
fn modes_daemon(dir: &Path, extra: &str) -> (Daemon, PathBuf, PathBuf) {
    let bin = std::fs::canonicalize(dir).unwrap().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let prog = bin.join("prog");
    common::cc(MODES, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let config = format!(
        "[profile]\nflush_secs = 1\nmin_samples = 100000000\n{extra}\n\n\
         [optimizer]\nscratch_dir = {:?}\nmin_text_bytes = 256\ncheck_interval_secs = 1\n\
         timeout_secs = 120\n",
        dir.join("scratch").display().to_string(),
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    std::fs::create_dir(dir.join("mnt")).unwrap();
    let state = dir.join("state");
    let d = Daemon::start(&dir.join("mnt"), &[&bin], &state, Some(&dir.join("config.toml")));
    (d, prog, state)
}

/// Runs of `prog` the daemon heard of: recorded after run `last_run` (measured: a variant
/// was in play) plus those run natively since start (passed through: nothing to serve). A
/// native run that exits within about a millisecond of its exec may go unheard (its
/// executable is read from /proc at the exec event), so callers that count runs make them
/// last longer ([`LONG_ARG`]).
fn heard(d: &Daemon, state: &Path, prog: &Path, last_run: i64) -> Option<i64> {
    let recorded: i64 = catalog(state)
        .query_row("SELECT COUNT(*) FROM runs WHERE id > ?1", [last_run], |r| r.get(0))
        .unwrap();
    let native = d.binary(prog)?["details"]["policy"]["native_execs"].as_i64()?;
    Some(recorded + native)
}

/// Whether the status entry `binary` says variant `id` is served ("variant 3", "variant 3
/// for 50% of execs"; not "variant 31").
fn serves_variant(binary: &serde_json::Value, id: i64) -> bool {
    let name = format!("variant {id}");
    binary["served"].as_str().is_some_and(|s| s == name || s.starts_with(&format!("{name} ")))
}

fn runs_of_variant(state: &Path, variant: i64) -> i64 {
    catalog(state)
        .query_row("SELECT COUNT(*) FROM runs WHERE variant_id = ?1", [variant], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_crashing_instrumented_run_stops_instrumentation() {
    let dir = common::open_tempdir();
    // No `instrumentation` key: it is on by default. The original is served through the
    // mount rather than passed through, so every run after the crash is measured: the
    // proof below that they were heard does not hang on reading a short-lived process's
    // executable at its exec event.
    let (d, prog, state) = modes_daemon(dir.path(), "\n[policy]\nnative_until_variant = false\n");
    let through_mount = d.bin().join("prog");
    let instr_id = d.wait_for(Duration::from_secs(60), "an instrumented variant", |_| {
        output(Command::new(&through_mount).arg("1000"));
        variants(&state, &prog).into_iter().find(|v| v.0 == "instrumented").map(|v| v.2)
    });
    // The catalog row comes first, the serving table a moment later: until then execs get
    // the original.
    common::wait_binary(&d, &prog, 20, "the instrumented variant served", |b| {
        serves_variant(b, instr_id)
    });
    // The first execs after it is served get it (instrument_first_runs = 5): this one crashes.
    let out = common::run(Command::new(&through_mount).arg("crash"));
    assert_eq!(out.code, None, "killed by its signal: {out:?}");
    d.wait_for(Duration::from_secs(30), "the instrumented variant rejected", |_| {
        let v = variants(&state, &prog);
        v.iter().any(|v| v.2 == instr_id && v.1 == "rejected").then_some(())
    });
    // The catalog says rejected a moment before the serving table drops the variant.
    common::wait_binary(&d, &prog, 20, "the rejected variant no longer served", |b| {
        !serves_variant(b, instr_id)
    });
    let served = runs_of_variant(&state, instr_id);
    let crashed: i64 = catalog(&state)
        .query_row(
            "SELECT COUNT(*) FROM runs WHERE variant_id = ?1 AND exit_signal = 11",
            [instr_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(crashed, 1, "the crashing run got the instrumented variant");
    let last_run: i64 = catalog(&state)
        .query_row("SELECT COALESCE(MAX(id), 0) FROM runs", [], |r| r.get(0))
        .unwrap();
    let before = d.wait_for(Duration::from_secs(20), "the policy's status", |d| {
        heard(d, &state, &prog, last_run)
    });
    for _ in 0..6 {
        output(Command::new(&through_mount).arg(LONG_ARG));
    }
    // Proof that the daemon had its chance: the six runs are heard (measured, the original
    // served through the mount).
    let what = format!("the six runs to be heard (heard {before} before them)");
    d.wait_for(Duration::from_secs(20), &what, |d| {
        (heard(d, &state, &prog, last_run)? >= before + 6).then_some(())
    });
    assert_eq!(runs_of_variant(&state, instr_id), served, "not served after the crash");
    let kinds: Vec<String> = variants(&state, &prog).into_iter().map(|v| v.0).collect();
    assert_eq!(kinds, ["instrumented"], "and no second instrumented variant is built");
    let events: String = catalog(&state)
        .query_row(
            "SELECT group_concat(detail, ' | ') FROM events WHERE kind = 'instrument'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(events.contains("crashed (signal 11)"), "{events}");
}

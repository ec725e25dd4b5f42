//! The profiler wired into the real daemon: programs run through the mount (and beside it)
//! grow per-binary profiles that status.json reports, mature under the configured
//! thresholds, and come out as `.optbin/bins/NAME/profile.fdata` that llvm-bolt accepts;
//! a stripped binary shows why it gets no profile, and programs outside the overlaid
//! directories are never profiled. While execs are split between the original and a
//! canary, each process's samples go where it really ran: a variant built with its hot
//! function where the original has padding leaves no sample in that padding.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::Daemon;
use sha2::Digest;

/// Burns `argv[1]` milliseconds of CPU time in `hot_loop`, so every run gives the sampler
/// the same amount of work whatever else the machine runs; prints `TAG` ("done"). With
/// `-DPAD_BEFORE` (or `-DPAD_AFTER`) 32 KiB of never-run padding, `cold_pad`, come before
/// (after) `hot_loop` (with `-fno-toplevel-reorder`, functions stay in source order).
const HOT_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifndef TAG
#define TAG "done"
#endif
#define PAD __attribute__((noinline, used)) void cold_pad(void) { __asm__ volatile(".fill 32768, 1, 0x90"); }
#ifdef PAD_BEFORE
PAD
#endif
__attribute__((noinline)) unsigned long hot_loop(unsigned long x, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        x ^= x >> 17;
    }
    return x;
}
#ifdef PAD_AFTER
PAD
#endif
static double cpu_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
int main(int argc, char **argv) {
    double until = cpu_ms() + (argc > 1 ? atof(argv[1]) : 100);
    unsigned long x = SEED;
    while (cpu_ms() < until) x = hot_loop(x, 200000);
    printf("%s %lu\n", TAG, x & 1);
    return 0;
}
"#;

/// `window_secs` of [`CONFIG`].
const WINDOW_SECS: u64 = 2;

/// Low thresholds so that a few short runs mature a profile; 2-second windows so that
/// stability (recent windows against older ones) can be judged within the test.
const CONFIG: &str = r#"
[profile]
frequency_hz = 499
flush_secs = 1
window_secs = 2
identify_after_samples = 20
min_samples = 300
min_runs = 2
min_stability = 0.5
"#;

fn run_ok(program: &Path, cpu_ms: u32) {
    let out = common::run(Command::new(program).arg(cpu_ms.to_string()));
    assert_eq!(out.code, Some(0), "{}: {out:?}", program.display());
    assert!(out.stdout.starts_with("done"), "{}: {out:?}", program.display());
}

/// `details.profiler` of the binary at `path` in status.json, once there is one.
fn profile_of(d: &Daemon, path: &Path) -> Option<serde_json::Value> {
    d.binary(path).map(|b| b["details"]["profiler"].clone()).filter(|p| !p.is_null())
}

/// The server's pid, or None while a new server is being started.
fn server_pid(d: &Daemon) -> Option<u32> {
    std::fs::read_to_string(d.state.join("server.pid")).ok()?.trim().parse().ok()
}

fn sha256_hex(path: &Path) -> String {
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every installed llvm-bolt (`/usr/lib/llvm-N/bin/llvm-bolt`), oldest first.
fn installed_bolts() -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let version: u32 = name.strip_prefix("llvm-")?.parse().ok()?;
            let bolt = Path::new("/usr/lib").join(&name).join("bin/llvm-bolt");
            bolt.exists().then_some((version, bolt))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn profiles_grow_mature_and_feed_bolt_through_the_daemon() {
    let tmp = common::open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let (bin, outside, mnt) = (root.join("bin"), root.join("outside"), root.join("mnt"));
    for d in [&bin, &outside] {
        std::fs::create_dir(d).unwrap();
    }
    let pie = ["-DSEED=1", "-fPIE", "-pie", "-Wl,--emit-relocs"];
    let hot = bin.join("hot");
    common::cc(HOT_C, &hot, &pie);
    let stripped = bin.join("stripped_hot");
    common::cc(HOT_C, &stripped, &["-DSEED=2", "-s"]);
    let elsewhere = outside.join("elsewhere_hot");
    common::cc(HOT_C, &elsewhere, &["-DSEED=3"]);
    let config = root.join("config.toml");
    // Served through the mount from the first run (by default a binary with no variant runs
    // natively): the test follows processes that run from the mount's paths, up to a crash
    // of the server while one runs.
    std::fs::write(&config, format!("{CONFIG}\n[policy]\nnative_until_variant = false\n")).unwrap();
    let mut d = Daemon::start(&mnt, &[&bin], &root.join("state"), Some(&config));
    let view = mnt.join("bin");

    // The profiler runs, on the software clock (this VM has no PMU).
    let section = d.wait_for(Duration::from_secs(20), "the profiler to start", |d| {
        let s = d.status_json()["subsystems"]["profiler"].clone();
        (s["running"] == true).then_some(s)
    });
    assert_eq!(section["frequency_hz"], 499);
    assert_eq!(section["thresholds"]["min_samples"], 300);

    // One run through the mount: a profile appears and is still collecting.
    run_ok(&view.join("hot"), 400);
    let first = d.wait_for(Duration::from_secs(20), "a first profile of hot", |d| {
        profile_of(d, &hot).filter(|p| p["own_samples"].as_u64() > Some(0))
    });
    let first_samples = first["own_samples"].as_u64().unwrap();
    assert_eq!(first["runs"], 1, "{first}");
    assert!(
        first["summary"].as_str().unwrap().starts_with("collecting"),
        "one run cannot be mature (min_runs = 2): {first}"
    );

    // More runs, in a later window than the first (whose samples are stored: windows are
    // wall-clock multiples of window_secs, and a flush goes into the window of its time):
    // through the mount, and once straight from the overlaid directory (a process started
    // without the mount is the same binary).
    let window_now = || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_secs() / WINDOW_SECS
    };
    let first_window = window_now();
    d.wait_for(Duration::from_secs(3 * WINDOW_SECS), "the next profile window", |_| {
        (window_now() > first_window).then_some(())
    });
    for _ in 0..3 {
        run_ok(&view.join("hot"), 300);
    }
    run_ok(&hot, 300);
    run_ok(&view.join("stripped_hot"), 400);
    run_ok(&elsewhere, 400);

    let mature = d.wait_for(Duration::from_secs(30), "the profile of hot to mature", |d| {
        profile_of(d, &hot).filter(|p| p["maturity"]["mature"] == true && p["runs"] == 5)
    });
    let samples = mature["own_samples"].as_u64().unwrap();
    assert!(samples > first_samples, "samples grew: {first_samples} -> {samples}");
    assert!(samples >= 300, "{mature}");
    assert!(mature["windows"].as_u64().unwrap() >= 2, "{mature}");
    let (hottest, hottest_samples) =
        (&mature["hot_functions"][0][0], &mature["hot_functions"][0][1]);
    assert_eq!(hottest, "hot_loop", "{mature}");
    let share = hottest_samples.as_u64().unwrap() as f64 / samples as f64;
    assert!(share > 0.8, "most samples are in the hot function: {share:.2} ({mature})");
    let summary = mature["summary"].as_str().unwrap();
    assert!(summary.starts_with("mature: "), "{summary}");
    assert!(summary.contains("hottest hot_loop"), "{summary}");

    // The stripped binary was seen and sampled, and says why it gets no profile.
    let refused = d.wait_for(Duration::from_secs(20), "the stripped binary's refusal", |d| {
        profile_of(d, &stripped).filter(|p| !p["refused"].is_null())
    });
    assert!(refused["refused"].as_str().unwrap().contains("stripped"), "{refused}");
    assert!(refused["summary"].as_str().unwrap().starts_with("no profile: stripped"), "{refused}");

    // The machine-wide section and the text table.
    let section = d.status_json()["subsystems"]["profiler"].clone();
    assert_eq!(section["source"]["kind"], "cpu-clock", "{section}");
    let line = section["summary"].as_str().unwrap();
    assert!(line.starts_with("cpu-clock at 499 Hz ("), "{line}");
    assert!(section["samples"].as_u64().unwrap() >= samples, "{section}");
    let text = d.status_text();
    assert!(text.contains("profiler: cpu-clock at 499 Hz"), "{text}");
    assert!(text.contains("profiler: mature: "), "{text}");

    // The profile file: listed for hot only, named after the hot function.
    let bins = mnt.join(".optbin/bins");
    let listed: Vec<String> = std::fs::read_dir(&bins)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listed.contains(&"hot".to_string()), "{listed:?}");
    assert!(!bins.join("stripped_hot/profile.fdata").exists());
    let fdata = std::fs::read_to_string(bins.join("hot/profile.fdata")).unwrap();
    assert!(fdata.starts_with("no_lbr cpu-clock:\n"), "{fdata}");
    assert!(fdata.lines().any(|l| l.starts_with("1 hot_loop ")), "{fdata}");
    let fdata_copy = root.join("hot.fdata");
    std::fs::write(&fdata_copy, &fdata).unwrap();

    // Every installed BOLT accepts it and finds the profiled functions in the binary.
    let bolts = installed_bolts();
    assert!(!bolts.is_empty(), "no llvm-bolt under /usr/lib/llvm-*/bin");
    for bolt in &bolts {
        let out_bin = root.join("hot.bolt");
        let out = common::run(
            Command::new(bolt)
                .arg(&hot)
                .arg("-o")
                .arg(&out_bin)
                .arg(format!("-data={}", fdata_copy.display())),
        );
        let log = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(out.code, Some(0), "{}: {log}", bolt.display());
        assert!(!log.contains("BOLT-ERROR"), "{}: {log}", bolt.display());
        let profiled: u64 = log
            .lines()
            .find(|l| l.contains("have non-empty execution profile"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no profile summary in {log}", bolt.display()));
        assert!(profiled >= 1, "{}: {log}", bolt.display());
        run_ok(&out_bin, 20);
        std::fs::remove_file(&out_bin).unwrap();
    }

    // The catalog (read-only): the windows are there, the refusal is recorded, and the
    // program outside the overlaid directories was never even hashed.
    let db = rusqlite::Connection::open_with_flags(
        root.join("state/catalog.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = |sql: &str, sha: &str| -> i64 { db.query_row(sql, [sha], |r| r.get(0)).unwrap() };
    let windows = count(
        "SELECT count(*) FROM profile_windows w JOIN binaries b ON b.id = w.binary_id
         WHERE b.sha256 = ?1",
        &sha256_hex(&hot),
    );
    // At least the windows status reported when the profile matured: the last run's
    // samples may be flushed into a later window after that.
    assert!(windows as u64 >= mature["windows"].as_u64().unwrap(), "{windows} windows: {mature}");
    let refusals = count(
        "SELECT count(*) FROM profile_binaries p JOIN binaries b ON b.id = p.binary_id
         WHERE b.sha256 = ?1 AND p.refused LIKE 'stripped%'",
        &sha256_hex(&stripped),
    );
    assert_eq!(refusals, 1);
    let outside_rows =
        count("SELECT count(*) FROM binaries WHERE sha256 = ?1", &sha256_hex(&elsewhere));
    assert_eq!(outside_rows, 0, "a program outside the overlaid dirs was profiled");
    drop(db);

    // A crash of the server while hot runs from the mount: the next server's profiler finds
    // the process in /proc, where the kernel shows its mount path as `... (deleted)` once
    // the entry was invalidated (as any serving change does: here an exclude + include),
    // and keeps profiling it.
    let mut long =
        Command::new(view.join("hot")).arg("3000").stdout(Stdio::null()).spawn().unwrap();
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", long.id())).unwrap();
    // The spawn returns once the exec is past its point of no return, which is before the
    // kernel has mapped the program's segments: wait for the mapping.
    common::daemon::wait_until(
        Duration::from_secs(5),
        "hot's code to be mapped from the mount",
        || maps().lines().any(|l| l.ends_with("/hot")),
    );
    for command in ["exclude hot", "include hot"] {
        d.control(command).unwrap();
    }
    d.wait_for(Duration::from_secs(5), "the running hot's entry to be invalidated", |_| {
        maps().contains("/hot (deleted)").then_some(())
    });
    let crashed = d.server_pid();
    // SAFETY: killing the server process of our own daemon.
    assert_eq!(unsafe { libc::kill(crashed as i32, libc::SIGKILL) }, 0);
    d.wait_for(Duration::from_secs(20), "a new server with a running profiler", |d| {
        let running = d.status_json()["subsystems"]["profiler"]["running"] == true;
        (server_pid(d).is_some_and(|p| p != crashed) && running).then_some(())
    });
    let restarted = profile_of(&d, &hot).unwrap()["own_samples"].as_u64().unwrap();
    assert!(long.wait().unwrap().success());
    d.wait_for(Duration::from_secs(20), "samples of hot after the restart", |d| {
        let now = profile_of(d, &hot)?["own_samples"].as_u64()?;
        (now >= restarted + 300).then_some(())
    });

    // SIGTERM: a clean exit, and the mount is gone.
    d.stop();
}

/// Address of `name` in the ELF `file` (from `nm`).
fn symbol_address(file: &Path, name: &str) -> u64 {
    let out = common::run(Command::new("nm").arg(file));
    let line = out.stdout.lines().find(|l| l.ends_with(&format!(" {name}"))).unwrap();
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

#[test]
fn a_canarys_samples_stay_out_of_the_originals_profile() {
    let (_tmp, root, bin) = common::open_test_root();
    // Two builds whose hot function sits at different addresses: the original has the
    // padding first, the variant its hot loop first, where the original has padding.
    let flags = ["-fno-toplevel-reorder", "-no-pie", "-DSEED=1"];
    let prog = bin.join("layout");
    common::cc(HOT_C, &prog, &[&flags[..], &["-DTAG=\"original\"", "-DPAD_BEFORE"]].concat());
    let variant = root.join("layout.variant");
    common::cc(HOT_C, &variant, &[&flags[..], &["-DTAG=\"variant\"", "-DPAD_AFTER"]].concat());
    // The premise: the variant's hot code lies inside the original's padding, so a variant
    // process counted as the original would put samples into `cold_pad`.
    let (pad, hot_v) = (symbol_address(&prog, "cold_pad"), symbol_address(&variant, "hot_loop"));
    assert!(pad <= hot_v && hot_v + 64 < pad + 32768, "cold_pad {pad:#x}, hot_loop {hot_v:#x}");

    let config = root.join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let d = Daemon::start(&root.join("mnt"), &[&bin], &root.join("state"), Some(&config));
    std::fs::metadata(d.bin().join("layout")).unwrap();
    let sha256 = d.wait_for(Duration::from_secs(20), "the binary indexed", |d| {
        d.binary(&prog)?["sha256"].as_str().map(String::from)
    });
    let vid = common::place_variant(&d.state, &sha256, &variant, "ready");
    let canary = format!("variant {vid} for 50% of execs");
    d.wait_for(Duration::from_secs(20), "the canary", |d| {
        (d.binary(&prog)?["served"] == canary.as_str()).then_some(())
    });

    // Execs split at random between the two builds, each burning 250 ms in hot_loop.
    let (mut to_variant, mut to_original) = (0, 0);
    for _ in 0..16 {
        let out = common::run(Command::new(d.bin().join("layout")).arg("250"));
        assert_eq!(out.code, Some(0), "{out:?}");
        match out.stdout.split_whitespace().next() {
            Some("variant") => to_variant += 1,
            Some("original") => to_original += 1,
            other => panic!("unexpected output {other:?}"),
        }
    }
    assert!(to_variant >= 2 && to_original >= 2, "{to_variant} variant, {to_original} original");

    // The original's profile holds the original's runs and only them: its hot function,
    // nothing in the padding; the variant's samples are counted beside it.
    let profile = d.wait_for(Duration::from_secs(30), "the original's runs profiled", |d| {
        profile_of(d, &prog).filter(|p| p["runs"].as_u64() >= Some(to_original))
    });
    let functions: Vec<&str> =
        profile["hot_functions"].as_array().unwrap().iter().filter_map(|f| f[0].as_str()).collect();
    assert_eq!(functions.first(), Some(&"hot_loop"), "{profile}");
    assert!(!functions.contains(&"cold_pad"), "a variant's samples in the profile: {profile}");
    assert_eq!(profile["runs"].as_u64(), Some(to_original), "{profile}");
    let fdata = std::fs::read_to_string(d.mnt.join(".optbin/bins/layout/profile.fdata")).unwrap();
    assert!(!fdata.contains(" cold_pad "), "{fdata}");
    assert!(profile["variant_samples"].as_u64() > Some(0), "{profile}");
}

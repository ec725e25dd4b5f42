//! What measurement and per-exec choices cost an exec, side by side in one run (interleaved
//! rounds, medians of per-round ratios): three real daemons serve the same small program,
//! the first two served through the mount although the program has no variant
//! (`native_until_variant = false`; by default it would run natively), one without
//! measurement, one measuring every run (perf counters attached on the FUSE
//! request thread, a record per exit), one measuring and serving a promoted variant to 95%
//! of execs (the rest keep measuring the original: every exec looks the binary up again).
//! An A/A control (the unmeasured daemon against itself) shows the noise floor.
//! `OPTBIN_BENCH_QUICK=1` shrinks the counts.

#[path = "common/bench.rs"]
mod bench;

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::daemon::Daemon;
use common::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Time per exec of `path` over `n` execs, in microseconds.
fn exec_round(path: &Path, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let status = Command::new(path).stdout(Stdio::null()).status().expect("exec");
        assert!(status.success(), "{} failed", path.display());
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// One daemon over its own copy of the program.
fn daemon(root: &Path, config: &str) -> (Daemon, PathBuf) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let tool = root.join("bin/tool");
    prog(&tool, "bench", &[]);
    let d = start_daemon(root, &root.join("bin"), config);
    std::fs::metadata(d.mnt.join("bin/tool")).unwrap();
    wait_binary(&d, &tool, 20, "indexing", |b| b["sha256"].is_string());
    (d, tool)
}

fn main() {
    bench::run("bench_policing", bench_policing);
}

fn bench_policing() {
    let quick = std::env::var("OPTBIN_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (rounds, per_round) = if quick { (9, 20) } else { (31, 50) };
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let fast = "[policy]\nrescan_ms = 100\n";
    // Served through the mount although they have no variant (by default such a binary is
    // passed through and runs natively): the price of measuring the original's runs.
    let through = format!("{fast}native_until_variant = false\n");
    let (off, _) = daemon(&root.join("off"), &format!("{through}measure = false\n"));
    let (on, _) = daemon(&root.join("on"), &through);
    let (split, split_tool) = daemon(&root.join("split"), fast);
    // A promoted variant (here a copy of the original's bytes) is served to 95% of execs.
    let sha = split.binary(&split_tool).unwrap()["sha256"].as_str().unwrap().to_string();
    let copy = root.join("variant-copy");
    std::fs::copy(&split_tool, &copy).unwrap();
    let vid = place_variant(&split.state, &sha, &copy, "served");
    let want = format!("variant {vid} for 95% of execs");
    wait_binary(&split, &split_tool, 20, "the served variant", |b| b["served"] == want.as_str());

    let paths = [&off, &off, &on, &split].map(|d| d.mnt.join("bin/tool"));
    let mut times: [Vec<f64>; 4] = Default::default();
    let (mut aa, mut measured, mut per_exec) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        // Rotate the order so no configuration always runs first.
        let mut t = [0.0; 4];
        for k in 0..4 {
            let i = (r + k) % 4;
            t[i] = exec_round(&paths[i], per_round);
        }
        for i in 0..4 {
            times[i].push(t[i]);
        }
        aa.push(t[1] / t[0]);
        measured.push(t[2] / t[0]);
        per_exec.push(t[3] / t[2]);
    }
    let status = on.status_json();
    let runs = status["subsystems"]["policy"]["measurement"]["runs_measured"].as_u64().unwrap();
    println!(
        "policing benchmark ({}; {rounds} interleaved rounds of {per_round} execs, medians)",
        if quick { "quick" } else { "full" }
    );
    println!("| comparison | per exec (us, medians) | ratio (median of rounds) |");
    println!("|---|---|---|");
    println!(
        "| A/A control: unmeasured vs unmeasured | {:.0} vs {:.0} | {:.3} |",
        median(times[1].clone()),
        median(times[0].clone()),
        median(aa)
    );
    println!(
        "| measured vs unmeasured (original served) | {:.0} vs {:.0} | {:.3} |",
        median(times[2].clone()),
        median(times[0].clone()),
        median(measured.clone())
    );
    let measured_for_assert = measured;
    println!(
        "| 95% variant drawn per exec vs fixed original (both measured) | {:.0} vs {:.0} | {:.3} |",
        median(times[3].clone()),
        median(times[2].clone()),
        median(per_exec)
    );
    println!("runs recorded by the measuring daemon: {runs}");
    assert!(runs > 0, "the measuring daemon measured nothing");
    // A bound that noise never reaches (the A/A control shows it within a few percent) but
    // a measurement gone wrong does (e.g. an exec waiting for the daemon).
    let measured_ratio = median(measured_for_assert);
    assert!(measured_ratio < 2.0, "a measured exec costs {measured_ratio:.3}x an unmeasured one");
    for mut d in [off, on, split] {
        d.stop();
    }
}

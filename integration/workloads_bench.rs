//! `optbin bench` against the real daemon: a program compiled here, overlaid and indexed,
//! gets variants placed the way the optimizer records them (store + catalog): a build with
//! its deliberately slow path removed, a byte-identical copy, and a build that prints
//! something else. `bench` runs as an unprivileged user (nobody), fetches each variant
//! through `.optbin/bins/NAME/variant-ID`, and must show: the gain with a 95% interval
//! below 1; an interval around 1 for the copy (and its A/A control); the different output
//! as a mismatch (exit status 3); the counters this machine lacks as "not supported here".
//! The jobs are then listed, shown and removed.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, OPTBIN};
use common::*;
use serde_json::Value;

const CONFIG: &str = "[profile]\nenabled = false\n";

fn build(out: &Path, tag: &str, slow: bool) {
    let define = format!("-DTAG=\"{tag}\"");
    let mut flags = vec![define.as_str()];
    if slow {
        flags.push("-DSLOW");
    }
    cc(WORK_C, out, &flags);
}

/// Runs `optbin bench ARGS` as nobody; returns (exit code, stdout, stderr).
fn bench(d: &Daemon, db: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", OPTBIN, "bench"])
        .arg("--mount")
        .arg(&d.mnt)
        .arg("--db")
        .arg(db)
        .args(args);
    run(&mut cmd)
}

fn json(out: &Output) -> Value {
    assert!(out.code == Some(0) || out.code == Some(3), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn metric<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

fn interval(result: &Value, name: &str, field: &str) -> (f64, f64, f64) {
    let r = &metric(result, name)[field];
    (r["ratio"].as_f64().unwrap(), r["low"].as_f64().unwrap(), r["high"].as_f64().unwrap())
}

#[test]
fn bench_shows_gains_noise_and_mismatches_and_keeps_jobs() {
    let tmp = open_tempdir();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    chmod(&bin, 0o755);
    let tool = bin.join("worktool");
    build(&tool, "tool", true);
    let fast = tmp.path().join("fast");
    build(&fast, "tool", false);
    let other = tmp.path().join("other");
    build(&other, "different", false);
    let db_dir = tmp.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    std::os::unix::fs::chown(&db_dir, Some(65534), Some(65534)).unwrap();
    let db = db_dir.join("bench.db");

    let d = start_daemon(tmp.path(), &bin, CONFIG);
    // One run through the mount makes the daemon index it.
    let out = run(Command::new(d.mnt.join("bin/worktool")).arg("10"));
    assert_eq!(out.code, Some(0), "{out:?}");
    let entry = wait_binary(&d, &tool, 30, "indexed", |b| b["sha256"].is_string());
    let sha = entry["sha256"].as_str().unwrap().to_string();
    let fast_id = place_variant(&d.state, &sha, &fast, "ready");
    let copy_id = place_variant(&d.state, &sha, &tool, "ready");
    let other_id = place_variant(&d.state, &sha, &other, "ready");

    // Not found: a clear error naming what optbin knows.
    let out = bench(&d, &db, &["nosuchtool", "--json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("worktool"), "{out:?}");

    // 1. The variant without the slow path: faster, its interval excluding 1.
    let fast_s = fast_id.to_string();
    let out =
        bench(&d, &db, &["worktool", "-n", "10", "--against", &fast_s, "--json", "--", "3000000"]);
    let r = json(&out);
    assert_eq!(out.code, Some(0), "{out:?}");
    let (ratio, low, high) = interval(&r, "cpu", "ratio");
    eprintln!("faster variant: cpu ratio {ratio:.3} ({low:.3}..{high:.3})");
    assert!(high < 1.0 && ratio < 0.8, "cpu {ratio} ({low}..{high})");
    let (wall, _, wall_high) = interval(&r, "wall", "ratio");
    assert!(wall_high < 1.0, "wall {wall}");
    assert_eq!(r["output"]["mismatches"].as_array().unwrap().len(), 0);
    assert_eq!(r["output"]["runs_checked"], 20);
    assert_eq!(r["rounds"].as_array().unwrap().len(), 10);
    // Counters: supported ones have medians, the others say why, never a zero.
    let probe = optbin::measure::counters::probe(&optbin::measure::counters::Metric::ALL);
    for (m, why) in probe {
        let got = metric(&r, m.name());
        match why {
            None => assert!(got["medians"].as_array().unwrap().len() == 2, "{got}"),
            Some(_) => {
                let said = got["unsupported"].as_str().unwrap_or_default();
                assert!(said.starts_with("not "), "{}: {got}", m.name());
                assert!(got["medians"].as_array().unwrap().is_empty());
            }
        }
    }

    // 2. A byte-identical copy, with the A/A control: both intervals hold 1. A 95% interval
    // misses the truth 5% of the time, so one miss gets one more try (both miss: 0.25%).
    let copy_s = copy_id.to_string();
    let covers = |r: &Value, field: &str| {
        let (_, low, high) = interval(r, "cpu", field);
        low <= 1.0 && 1.0 <= high
    };
    let mut tries = Vec::new();
    for _ in 0..2 {
        let out = bench(
            &d,
            &db,
            &["worktool", "-n", "12", "--aa", "--against", &copy_s, "--json", "--", "1000000"],
        );
        let r = json(&out);
        assert_eq!(out.code, Some(0), "{out:?}");
        let ok = covers(&r, "ratio") && covers(&r, "aa");
        tries.push((interval(&r, "cpu", "ratio"), interval(&r, "cpu", "aa")));
        if ok {
            break;
        }
    }
    eprintln!("identical copy, (variant, A/A) cpu intervals: {tries:?}");
    assert!(
        tries.len() == 1
            || tries.len() == 2 && {
                let ((_, l, h), (_, al, ah)) = tries[1];
                l <= 1.0 && 1.0 <= h && al <= 1.0 && 1.0 <= ah
            }
    );

    // 3. Different output: reported loudly as a mismatch, exit status 3, text and JSON.
    let other_s = other_id.to_string();
    let out = bench(&d, &db, &["worktool", "-n", "3", "--warmup", "0", "--against", &other_s]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stdout.contains("OUTPUT MISMATCH"), "{}", out.stdout);
    assert!(out.stderr.contains("MISCOMPILE"), "{}", out.stderr);
    assert!(out.stdout.contains("\"different"), "the differing output is shown: {}", out.stdout);
    // The text report says unsupported counters once, as such.
    for (m, why) in optbin::measure::counters::probe(&optbin::measure::counters::Metric::ALL) {
        if why.is_some() {
            let line = out.stdout.lines().find(|l| l.contains(m.name())).unwrap();
            assert!(line.contains("not "), "{line}");
        }
    }

    // 4. Jobs: listed, shown, removed.
    let list = json(&bench(&d, &db, &["--list", "--json"]));
    let jobs = list.as_array().unwrap();
    assert!(jobs.len() >= 3, "{list}");
    let outcomes: Vec<&str> = jobs.iter().map(|j| j["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "mismatch").count(), 1, "{outcomes:?}");
    let first = jobs[0]["id"].as_i64().unwrap().to_string();
    let shown = json(&bench(&d, &db, &["--show", &first, "--json"]));
    assert_eq!(shown["job"].as_i64(), Some(first.parse().unwrap()));
    assert_eq!(shown["arms"][1]["variant_id"].as_i64(), Some(fast_id));
    let text = bench(&d, &db, &["--show", &first]);
    assert!(text.stdout.contains(&format!("variant {fast_id}")), "{}", text.stdout);
    let listed = bench(&d, &db, &["--list"]);
    assert!(listed.stdout.contains("worktool"), "{}", listed.stdout);
    let out = bench(&d, &db, &["--remove", &first]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let after = json(&bench(&d, &db, &["--list", "--json"]));
    assert_eq!(after.as_array().unwrap().len(), jobs.len() - 1);
    let out = bench(&d, &db, &["--show", &first]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains(&format!("no bench job {first}")), "{out:?}");

    // Root-only options refuse a user; the default mount is not assumed.
    let out = bench(&d, &db, &["worktool", "--drop-caches", "--against", &fast_s]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("--drop-caches needs root"), "{out:?}");
    let _ = Duration::from_secs(0);
}

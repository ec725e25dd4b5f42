//! `optbin report` against the real daemon: a program compiled here is overlaid, gets a
//! variant placed the way the optimizer records it (its deliberately slow path removed),
//! and is run through the mount until the policy's canary decided. The user (nobody) then
//! benchmarks it and asks for the report, which must list the binary with the real-run
//! ratio and its interval below 1, the decision and the time from the first run to it, the
//! CPU time saved, the counters before and after (those the machine lacks as "not supported
//! here", never as zero) and the user's bench job next to the real runs.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, OPTBIN};
use common::*;
use serde_json::Value;

const CONFIG: &str = "[profile]\nenabled = false\n\n[policy]\nmin_runs = 8\nlooks = 3\n\
                      rescan_ms = 200\n";

/// Runs `optbin ARGS` as nobody.
fn optbin_as_nobody(args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", OPTBIN]).args(args);
    run(&mut cmd)
}

#[test]
fn report_lists_what_bolt_did_with_real_runs_decision_counters_and_bench() {
    let tmp = open_tempdir();
    let root = tmp.path();
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    chmod(&bin, 0o755);
    let tool = bin.join("worktool");
    cc(WORK_C, &tool, &["-DSLOW"]);
    let fast = root.join("fast");
    cc(WORK_C, &fast, &[]);
    let db_dir = root.join("db");
    std::fs::create_dir(&db_dir).unwrap();
    std::os::unix::fs::chown(&db_dir, Some(65534), Some(65534)).unwrap();
    let db = db_dir.join("bench.db");
    let db_s = db.to_string_lossy().into_owned();

    let d: Daemon = start_daemon(root, &bin, CONFIG);
    let mnt = d.mnt.to_string_lossy().into_owned();
    // Nothing was tried yet: the report says so.
    let out = optbin_as_nobody(&["report", "--mount", &mnt, "--db", &db_s]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("0 binaries"), "{}", out.stdout);

    let served = d.mnt.join("bin/worktool");
    let out = run(Command::new(&served).arg("10"));
    assert_eq!(out.code, Some(0), "{out:?}");
    let entry = wait_binary(&d, &tool, 30, "indexed", |b| b["sha256"].is_string());
    let sha = entry["sha256"].as_str().unwrap().to_string();
    let variant = place_variant(&d.state, &sha, &fast, "ready");

    // Real runs through the mount until the canary decided.
    let decided = d.wait_for(Duration::from_secs(240), "a decision on the canary", |d| {
        let out = run(as_nobody(&served).arg("2000000"));
        assert_eq!(out.code, Some(0), "{out:?}");
        let b = d.binary(&tool)?;
        matches!(stage_key(&b).as_str(), "serving_optimized" | "serving_original").then_some(b)
    });
    assert_eq!(stage_key(&decided), "serving_optimized", "{decided:#}");
    // Status sets the counters of the original and the served variant side by side, next
    // to the gain: page faults and context switches always, the PMU's where present.
    let hardware = optbin::measure::counters::probe(&[
        optbin::measure::counters::Metric::Instructions,
        optbin::measure::counters::Metric::Cycles,
    ]);
    let no_pmu = hardware.iter().any(|(_, why)| why.is_some());
    let policy = &decided["details"]["policy"];
    assert_eq!(policy["counters"]["variant"], variant, "{policy:#}");
    let metrics = policy["counters"]["metrics"].as_array().unwrap();
    let metric = |name: &str| metrics.iter().find(|c| c["metric"] == name).unwrap().clone();
    let faults = metric("page-faults");
    let (fo, fv) = (faults["original"].as_f64().unwrap(), faults["variant"].as_f64().unwrap());
    assert!(fo > 0.0 && fv > 0.0, "{faults}");
    assert!(metric("context-switches")["unsupported"].is_null());
    let summary = policy["summary"].as_str().unwrap();
    println!("status: {summary}");
    let said = format!("counters per run, original -> variant {variant}: ");
    assert!(summary.contains(&said), "{summary}");
    assert!(summary.contains(&format!("page-faults {fo:.0} -> {fv:.0}")), "{summary}");
    let ipc = metric("IPC");
    if no_pmu {
        assert!(ipc["original"].is_null() && ipc["variant"].is_null(), "{ipc}");
        assert!(ipc["unsupported"].as_str().unwrap().starts_with("not supported"), "{ipc}");
        assert!(!summary.contains("IPC"), "no figure for a counter the machine lacks: {summary}");
    } else {
        assert!(summary.contains("IPC "), "{summary}");
    }
    let text = d.status_text();
    assert!(text.contains(&said), "{text}");
    // A few runs of the served variant: CPU time saved.
    for _ in 0..5 {
        assert_eq!(run(as_nobody(&served).arg("2000000")).code, Some(0));
    }

    // The user benchmarks it.
    let out = optbin_as_nobody(&[
        "bench", "worktool", "--mount", &mnt, "--db", &db_s, "-n", "8", "--json", "--", "2000000",
    ]);
    assert_eq!(out.code, Some(0), "{out:?}");

    // The report, as JSON.
    let out = optbin_as_nobody(&["report", "worktool", "--json", "--mount", &mnt, "--db", &db_s]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["format"], 1);
    let bins = r["binaries"].as_array().unwrap();
    assert_eq!(bins.len(), 1, "{r:#}");
    let b = &bins[0];
    assert_eq!(b["name"], "worktool");
    let v = b["variants"].as_array().unwrap().iter().find(|v| v["id"] == variant).unwrap();
    assert_eq!(v["state"], "served");
    let real = &v["real_runs"];
    let (ratio, high) = (real["ratio"].as_f64().unwrap(), real["high"].as_f64().unwrap());
    eprintln!("real runs: ratio {ratio:.3}, high {high:.3}, pairs {}", real["variant_runs"]);
    assert!(ratio < 0.8 && high < 1.0, "{real}");
    assert_eq!(v["decision"]["action"], "promote");
    let secs = v["decision"]["secs_from_first_run"].as_f64().unwrap();
    assert!(secs > 0.0 && secs < 300.0, "{secs}");
    assert!(v["cpu_saved_ns"].as_u64().unwrap() > 0, "{v:#}");
    assert_eq!(b["cpu_saved_ns"], v["cpu_saved_ns"]);
    // Counters: CPU time on both sides; the ones this machine lacks say so, never zero.
    let counters = v["counters"].as_array().unwrap();
    let cpu = counters.iter().find(|c| c["metric"] == "cpu").unwrap();
    assert!(cpu["change_percent"].as_f64().unwrap() < -20.0, "{cpu}");
    // Page faults and context switches are software counters: every run has them.
    let faults = counters.iter().find(|c| c["metric"] == "page-faults").unwrap();
    assert!(faults["original"].as_f64().unwrap() > 0.0, "{faults}");
    assert!(faults["variant"].as_f64().unwrap() > 0.0, "{faults}");
    let switches = counters.iter().find(|c| c["metric"] == "context-switches").unwrap();
    assert!(switches["unsupported"].is_null(), "{switches}");
    let ipc = counters.iter().find(|c| c["metric"] == "IPC").unwrap();
    if hardware.iter().any(|(_, why)| why.is_some()) {
        assert!(r["hardware_counters"].as_str().unwrap().starts_with("not "), "{r:#}");
        assert!(ipc["original"].is_null() && ipc["variant"].is_null(), "{ipc}");
        assert!(ipc["unsupported"].as_str().unwrap().starts_with("not supported"), "{ipc}");
    } else {
        assert!(ipc["original"].as_f64().unwrap() > 0.0, "{ipc}");
    }
    // The bench job is there, next to the real runs.
    let bench = v["bench"].as_array().unwrap();
    assert_eq!(bench.len(), 1, "{v:#}");
    assert_eq!(bench[0]["outcome"], "ok");
    assert!(bench[0]["cpu"]["high"].as_f64().unwrap() < 1.0, "{}", bench[0]);

    // The text table: one row, the figures and the unsupported counters named as such.
    let out = optbin_as_nobody(&["report", "--mount", &mnt, "--db", &db_s]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let t = &out.stdout;
    println!("{t}");
    assert!(t.contains("1 binary BOLT was tried on, 1 served optimized"), "{t}");
    let row = t.lines().find(|l| l.starts_with("worktool")).unwrap();
    assert!(row.contains("served") && row.contains("promote after"), "{row}");
    assert!(t.contains("bench job"), "{t}");
    if hardware.iter().any(|(_, why)| why.is_some()) {
        let line = t.lines().find(|l| l.trim_start().starts_with("IPC")).unwrap();
        assert!(line.contains("not supported here"), "{line}");
    }

    // A name BOLT never saw is an error that says so; another mount is not assumed.
    let out = optbin_as_nobody(&["report", "nosuchtool", "--mount", &mnt, "--db", &db_s]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("nosuchtool"), "{out:?}");
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = optbin_as_nobody(&["report", "--mount", &elsewhere.to_string_lossy()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("is optbin mounted"), "{out:?}");
}

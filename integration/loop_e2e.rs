//! The whole loop in the real daemon, nothing faked: a program compiled here (branchy C,
//! PIE, `--emit-relocs`) sits in an overlaid directory and runs through `<mnt>/bin` again
//! and again, as a user would run it, until the daemon has sampled it (real perf), built a
//! BOLT variant from that profile (the installed llvm-bolt), canaried it against the
//! original on those same runs (measured by the proc connector and task-clock) and decided:
//! serving optimized, or serving the original with the measured reason. Every stage shows
//! in status.json on the way, every run prints what the original prints, and the catalog
//! holds the job, the variant, the measured runs of both arms and the decision. Excluding it
//! then stops both serving and profiling.
//!
//! Settings are small so that the loop closes in about a minute: maturity at 1,500 samples
//! (999 Hz), looks at 8, 16 and 32 pairs.

#[path = "common/branchy.rs"]
mod branchy;
#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, catalog_read_only};
use serde_json::Value;

/// Iterations of one run through the mount (about 0.1 s of CPU here).
const ITERATIONS: &str = "10000000";

fn config(scratch: &Path) -> String {
    format!(
        r#"[profile]
# This test follows the sampled path (instrumentation is tested in instrument_e2e).
instrumentation = "off"
frequency_hz = 999
flush_secs = 1
window_secs = 2
identify_after_samples = 20
min_samples = 1500
min_runs = 2
min_stability = 0.5

[optimizer]
scratch_dir = {:?}
min_text_bytes = 1024
check_interval_secs = 1
timeout_secs = 120

[policy]
min_runs = 8
looks = 3
rescan_ms = 200
"#,
        scratch.display().to_string()
    )
}

/// The policy's stage key (`collecting`, `canary`, `serving_optimized`, ...) and its text.
fn stage(binary: &Value) -> (String, String) {
    let text = binary["details"]["policy"]["stage_text"].as_str().unwrap_or_default();
    (common::stage_key(binary), text.to_string())
}

fn run(program: &Path) -> String {
    let out = common::run(Command::new(program).arg(ITERATIONS));
    assert_eq!(out.code, Some(0), "{}: {out:?}", program.display());
    out.stdout
}

#[test]
fn a_program_run_through_the_mount_is_profiled_optimized_canaried_and_decided() {
    let started = Instant::now();
    let (_tmp, root, bin) = common::open_test_root();
    let prog = bin.join("prog");
    common::cc(branchy::PROGRAM, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let expected = run(&prog);
    std::fs::write(root.join("config.toml"), config(&root.join("scratch"))).unwrap();
    let d = Daemon::start(
        &root.join("mnt"),
        &[&bin],
        &root.join("state"),
        Some(&root.join("config.toml")),
    );
    let served = d.bin().join("prog");

    // Run it the way a user would, and watch the stages go by.
    let mut stages: Vec<String> = Vec::new();
    let mut runs = 0;
    let (last, text) = loop {
        assert_eq!(run(&served), expected, "run {runs} through the mount");
        runs += 1;
        let (key, text) = d.binary(&prog).map(|b| stage(&b)).unwrap_or_default();
        if !key.is_empty() && stages.last() != Some(&key) {
            stages.push(key.clone());
        }
        if key == "serving_optimized" || key == "serving_original" {
            break (key, text);
        }
        assert!(
            runs < 600 && started.elapsed() < Duration::from_secs(400),
            "no decision after {runs} runs; stages {stages:?}; now {text}\n{}",
            common::daemon::tail(&d.log(), 40)
        );
    };
    println!(
        "decided after {runs} runs in {:.0} s: {stages:?}: {text}",
        started.elapsed().as_secs_f64()
    );

    // The stages in their order: the profile collected, then the canary, then the decision
    // (queued and optimizing may pass between two runs unseen).
    let at = |k: &str| stages.iter().position(|s| s == k);
    let (collecting, canary) = (at("collecting"), at("canary"));
    assert!(collecting.is_some() && canary.is_some(), "{stages:?}");
    assert!(collecting < canary, "{stages:?}");
    for pipeline in ["queued", "optimizing"] {
        if let Some(p) = at(pipeline) {
            assert!(collecting < Some(p) && Some(p) < canary, "{stages:?}");
        }
    }
    // The decision says what was measured, with its interval.
    assert!(text.contains("faster by") || text.contains("slower by"), "{text}");
    assert!(text.contains("(interval "), "{text}");
    if last == "serving_original" {
        assert!(text.starts_with("serving original: "), "{text}");
    } else {
        assert!(text.starts_with("serving optimized (variant "), "{text}");
    }

    // The catalog: a real BOLT job, a BOLT variant in its decided state, runs of both arms
    // while it was a canary, and the decision logged.
    let c = catalog_read_only(&d.state);
    let (outcome, version): (String, String) = c
        .query_row("SELECT last_outcome, bolt_version FROM bolt_jobs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(outcome, "ok");
    assert!(version.chars().next().is_some_and(|c| c.is_ascii_digit()), "{version}");
    let (vid, state): (i64, String) = c
        .query_row("SELECT id, state FROM variants WHERE kind = 'bolt'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(state, if last == "serving_optimized" { "served" } else { "rejected" });
    let count = |sql: &str| -> i64 { c.query_row(sql, [vid], |r| r.get(0)).unwrap() };
    assert!(count("SELECT count(*) FROM runs WHERE variant_id = ?1") >= 8);
    assert!(count("SELECT count(*) FROM runs WHERE variant_id IS NULL AND ?1 > 0") >= 8);
    let actions: Vec<String> = c
        .prepare("SELECT action FROM policy_decisions WHERE variant_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([vid], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let decision = if last == "serving_optimized" { "promote" } else { "reject" };
    assert_eq!(actions, ["start_canary", decision]);
    drop(c);

    // What is served now keeps printing what the original prints.
    for _ in 0..3 {
        assert_eq!(run(&served), expected);
    }

    // Excluded: served as a link to the original, and no longer profiled (its runs, native
    // now, add no sample).
    let samples =
        |d: &Daemon| d.binary(&prog).unwrap()["details"]["profiler"]["own_samples"].as_u64();
    // Proof that the profiler had its chance: it stores what it sampled at each flush, and
    // counts the flushes; two more flushes than at a moment cover everything sampled before.
    let flushes = |d: &Daemon| d.status_json()["subsystems"]["profiler"]["flushes"].as_u64();
    let two_more_flushes = |d: &Daemon| {
        let target = flushes(d).expect("the profiler counts its flushes") + 2;
        d.wait_for(Duration::from_secs(20), "two more profiler flushes", |d| {
            (flushes(d)? >= target).then_some(())
        });
    };
    d.control("exclude prog").unwrap();
    two_more_flushes(&d); // samples already taken reach the catalog
    let before = samples(&d);
    assert!(before.is_some_and(|n| n >= 1500), "{before:?}");
    for _ in 0..5 {
        assert_eq!(run(&served), expected);
    }
    two_more_flushes(&d);
    let b = d.binary(&prog).unwrap();
    assert_eq!(b["served"], "original (link)", "{b:#}");
    assert_eq!(samples(&d), before, "an excluded binary was profiled");
}

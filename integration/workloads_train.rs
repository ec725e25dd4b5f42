//! Training commands in the real daemon: a program compiled here is never run by the test;
//! a training file in `[train] dir` makes the daemon run it through the mount (as nobody,
//! at idle priority) until its profile matured, BOLT built a variant, the canary measured
//! it against the original and the policy decided. Files with unknown keys, and a file not
//! owned by root that asks for root, are refused with the reason in status. `train NAME`
//! on the control file runs a binary's commands at once.

#[path = "common/branchy.rs"]
mod branchy;
#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, catalog_read_only};
use serde_json::Value;

fn config(scratch: &Path, train_dir: &Path) -> String {
    format!(
        r#"[profile]
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

[train]
dir = {:?}
check_secs = 1
idle_load = 1000.0
"#,
        scratch.display().to_string(),
        train_dir.display().to_string()
    )
}

#[test]
fn training_matures_optimizes_and_canaries_a_binary_nobody_ran() {
    let started = Instant::now();
    let (_tmp, root, bin) = common::open_test_root();
    common::chmod(&bin, 0o755);
    let prog = bin.join("prog");
    common::cc(branchy::PROGRAM, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let train = root.join("train.d");
    std::fs::create_dir(&train).unwrap();
    std::fs::write(
        train.join("prog.toml"),
        "binary = \"prog\"\nargs = [\"10000000\"]\nuser = \"nobody\"\nruns = 10\ntimeout_secs = 30\n",
    )
    .unwrap();
    std::fs::write(train.join("typo.toml"), "binary = \"prog\"\nargv = [\"1\"]\n").unwrap();
    let rootish = train.join("rootish.toml");
    std::fs::write(&rootish, "binary = \"prog\"\nuser = \"root\"\n").unwrap();
    std::os::unix::fs::chown(&rootish, Some(65534), Some(65534)).unwrap();
    std::fs::write(root.join("config.toml"), config(&root.join("scratch"), &train)).unwrap();
    let d = Daemon::start(
        &root.join("mnt"),
        &[&bin],
        &root.join("state"),
        Some(&root.join("config.toml")),
    );

    // The bad files are refused, each with its reason, in the training section.
    let section = d.wait_for(Duration::from_secs(30), "training section", |d| {
        let s = d.status_json()["subsystems"]["training"].clone();
        (s["refused"].as_array().is_some_and(|r| r.len() == 2)).then_some(s)
    });
    let refused = section["refused"].to_string();
    assert!(refused.contains("unknown field `argv`"), "{refused}");
    assert!(refused.contains("owned by uid 65534"), "{refused}");
    assert_eq!(section["commands"].as_array().unwrap().len(), 1, "{section:#}");
    assert!(d.status_text().contains("REFUSED"), "{}", d.status_text());

    // Nobody runs prog; the training command alone carries it to a decision.
    let mut stages: Vec<String> = Vec::new();
    let last = loop {
        let b = d.binary(&prog);
        let key = b.as_ref().map(common::stage_key).unwrap_or_default();
        if !key.is_empty() && stages.last() != Some(&key) {
            stages.push(key.clone());
        }
        if key == "serving_optimized" || key == "serving_original" {
            break b.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(420),
            "no decision; stages {stages:?}; training {:#}\n{}",
            d.status_json()["subsystems"]["training"],
            common::daemon::tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "decided in {:.0} s by training alone: {stages:?}: {}",
        started.elapsed().as_secs_f64(),
        last["details"]["policy"]["stage_text"]
    );
    assert!(stages.iter().any(|s| s == "canary"), "{stages:?}");
    let runs = last["details"]["training"]["runs"].as_u64().unwrap();
    assert!(runs >= 16, "{last:#}");

    // The canary's runs, both arms, came from training (the test never ran prog).
    let c = catalog_read_only(&d.state);
    let count = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    let variant_runs = count("SELECT count(*) FROM runs WHERE variant_id IS NOT NULL");
    let original_runs = count("SELECT count(*) FROM runs WHERE variant_id IS NULL");
    assert!(variant_runs >= 8 && original_runs >= 8, "{variant_runs} {original_runs}");
    drop(c);
    let runs_now = d.binary(&prog).unwrap()["details"]["training"]["runs"].as_u64().unwrap();
    assert!(
        (variant_runs + original_runs) as u64 <= runs_now,
        "every measured run was a training run: {variant_runs}+{original_runs} vs {runs_now}"
    );
    let runs = runs_now;

    // `train NAME` runs it now, whatever the stage; an unknown name is refused.
    d.control("train prog").unwrap();
    d.wait_for(Duration::from_secs(30), "train prog ran", |d| {
        let n = d.binary(&prog)?["details"]["training"]["runs"].as_u64()?;
        (n >= runs + 10).then_some(())
    });
    assert!(d.control("train nosuchprog").is_err());
    assert!(d.last_error().contains("no binary named"), "{}", d.last_error());
}

/// The status entry of `variant` in a binary's status.
fn variant_state(binary: &Value, variant: i64) -> String {
    let vs = binary["variants"].as_array().cloned().unwrap_or_default();
    let v = vs.iter().find(|v| v["id"].as_i64() == Some(variant));
    v.and_then(|v| v["state"].as_str()).unwrap_or_default().to_string()
}

/// The verdict of the output check of `variant` in a binary's training status.
fn check_verdict(binary: &Value, variant: i64) -> Option<Value> {
    let checks = binary["details"]["training"]["output_checks"].as_array()?;
    checks.iter().find(|c| c["variant"].as_i64() == Some(variant)).cloned()
}

#[test]
fn a_variant_whose_output_differs_on_a_training_command_is_rejected_by_the_policy() {
    let (_tmp, root, bin) = common::open_test_root();
    common::chmod(&bin, 0o755);
    // Two binaries, each with a variant: one prints another answer (a miscompile), the
    // other the same answer faster.
    let (differs, same) = (bin.join("differs"), bin.join("same"));
    common::cc(common::WORK_C, &differs, &["-DSLOW"]);
    common::cc(common::WORK_C, &same, &["-DSLOW"]);
    let wrong = root.join("wrong");
    common::cc(common::WORK_C, &wrong, &["-DSLOW", "-DTAG=\"miscompiled\""]);
    let fast = root.join("fast");
    common::cc(common::WORK_C, &fast, &[]);
    let train = root.join("train.d");
    std::fs::create_dir(&train).unwrap();
    // Training never runs by itself here (only `train NAME`); canaries never decide by speed.
    let config = "[profile]\nenabled = false\n\n[policy]\nmin_runs = 200\nlooks = 1\n\
                  rescan_ms = 200\n\n"
        .to_string()
        + &format!("[train]\nenabled = false\ndir = {:?}\n", train.display().to_string());
    let d = common::start_daemon(&root, &bin, &config);

    let mut variants = Vec::new();
    for (prog, file) in [(&differs, &wrong), (&same, &fast)] {
        let out = common::run(std::process::Command::new(common::in_mount(&d.mnt, prog)).arg("1"));
        assert_eq!(out.code, Some(0), "{out:?}");
        let b = common::wait_binary(&d, prog, 30, "indexed", |b| b["sha256"].is_string());
        let v = common::place_variant(&d.state, b["sha256"].as_str().unwrap(), file, "ready");
        // The status's stage comes from the catalog; the serving table follows it a moment
        // later (the applier), so wait for the table to serve the canary too.
        let canary_served = format!("variant {v} for ");
        common::wait_binary(&d, prog, 30, "canary served", |b| {
            common::stage_key(b) == "canary"
                && b["served"].as_str().is_some_and(|s| s.starts_with(&canary_served))
        });
        variants.push(v);
    }
    let (wrong_id, fast_id) = (variants[0], variants[1]);

    // The canary serves the wrong variant to some execs (half, drawn at random).
    let served = common::in_mount(&d.mnt, &differs);
    let outputs: Vec<String> =
        (0..20).map(|_| common::run(common::as_nobody(&served).arg("1000")).stdout).collect();
    assert!(outputs.iter().any(|o| o.starts_with("miscompiled ")), "{outputs:?}");
    assert!(outputs.iter().any(|o| o.starts_with("work ")), "{outputs:?}");

    for name in ["differs", "same"] {
        std::fs::write(
            train.join(format!("{name}.toml")),
            format!("binary = \"{name}\"\nargs = [\"1000\"]\nuser = \"nobody\"\nruns = 2\n"),
        )
        .unwrap();
    }
    d.control("train differs").unwrap();
    let b = common::wait_binary(&d, &differs, 60, "the wrong variant rejected", |b| {
        variant_state(b, wrong_id) == "rejected"
    });
    let text = b["details"]["policy"]["stage_text"].as_str().unwrap();
    println!("differs: {text}");
    assert_eq!(common::stage_key(&b), "serving_original", "{b:#}");
    assert!(
        text.contains("output differs from the original's on training command differs.toml"),
        "{text}"
    );
    assert!(text.contains("miscompiled"), "the variant's output is shown: {text}");
    let check = check_verdict(&b, wrong_id).expect("the check is in the training status");
    assert_eq!(check["verdict"], "differs", "{check}");
    // Nothing else to serve: the original, passed through.
    assert_eq!(b["served"], "original (link)", "{b:#}");
    // The decision went through the policy's log, with the reason.
    let c = catalog_read_only(&d.state);
    let (action, detail): (String, String) = c
        .query_row(
            "SELECT action, detail FROM policy_decisions WHERE variant_id = ?1 ORDER BY id DESC",
            [wrong_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(action, "reject");
    assert!(detail.starts_with("output differs"), "{detail}");
    drop(c);
    // No exec gets it any more.
    for _ in 0..20 {
        let out = common::run(common::as_nobody(&served).arg("1000"));
        assert!(out.stdout.starts_with("work "), "{out:?}");
    }
    let status = d.status_text();
    assert!(status.contains("OUTPUT DIFFERS"), "{status}");

    // `optbin report` shows the rejection and its reason.
    let db = root.join("bench.db");
    let out = common::run(std::process::Command::new(common::daemon::OPTBIN).args([
        "report",
        "differs",
        "--json",
        "--mount",
        &d.mnt.to_string_lossy(),
        "--db",
        &db.to_string_lossy(),
    ]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    let v = r["binaries"][0]["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"].as_i64() == Some(wrong_id))
        .cloned()
        .unwrap();
    assert_eq!(v["decision"]["action"], "reject", "{v:#}");
    assert!(v["decision"]["detail"].as_str().unwrap().starts_with("output differs"), "{v:#}");

    // A variant with the original's output passes the same check and stays in canary.
    d.control("train same").unwrap();
    let b = d.wait_for(Duration::from_secs(60), "the same-output variant checked", |d| {
        let b = d.binary(&same)?;
        let runs = b["details"]["training"]["runs"].as_u64()?;
        (check_verdict(&b, fast_id).is_some() && runs >= 2).then_some(b)
    });
    assert_eq!(check_verdict(&b, fast_id).unwrap()["verdict"], "same", "{b:#}");
    assert_eq!(variant_state(&b, fast_id), "canary", "{b:#}");
    assert_eq!(common::stage_key(&b), "canary", "{b:#}");
    let summary = b["details"]["training"]["summary"].as_str().unwrap();
    assert!(summary.contains("same output as the original"), "{summary}");
}

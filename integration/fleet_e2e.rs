//! Two machines on one host, sharing through a real `redis-server`: two real daemons with
//! their own mountpoints, state directories, overlaid directories (holding the same bytes)
//! and machine ids, each with its own ACL user. Nothing faked: real perf sampling, real
//! BOLT, real policy.
//!
//! 1. A runs a program until its profile matures; B, which ran it once, builds a variant
//!    from the fleet's merged profile within seconds, and its status says where the
//!    profile came from.
//! 2. A variant quarantined on A (it crashes) is never served on B.
//! 3. Redis killed while programs run through both mounts: no command fails, both status
//!    pages show the outage, and once Redis is back the pushes that waited arrive.
//! 4. Garbage, oversized and wrong-version values planted in Redis are refused with a
//!    reason in B's status; B keeps serving.

#[path = "common/branchy.rs"]
mod branchy;
#[path = "common/mod.rs"]
mod common;
#[path = "fleet_support.rs"]
mod fleet_support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, catalog_read_only};
use fleet_support::{Redis, credentials, reader_acl, writer_acl};

/// About 0.1 s of CPU per run.
const ITERATIONS: &str = "10000000";

/// Prints its TAG and first argument; built with -DCRASH_ON it segfaults on `crash`.
const TOOL_C: &str = r#"
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    const char *arg = argc > 1 ? argv[1] : "";
#ifdef CRASH_ON
    if (strcmp(arg, "crash") == 0) {
        volatile int *nowhere = 0;
        *nowhere = 1;
    }
#endif
    printf("%s %s\n", TAG, arg);
    return 0;
}
"#;

fn config(root: &Path, redis: &Redis, machine: &str, secret: &Path, mode: &str) -> String {
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
scratch_dir = {scratch:?}
min_text_bytes = 1024
check_interval_secs = 1
timeout_secs = 120

[policy]
min_runs = 8
looks = 3
rescan_ms = 200

[fleet]
url = "{url}"
credentials = {secret:?}
machine_id = "{machine}"
mode = "{mode}"
interval_secs = 0.5
timeout_ms = 500
"#,
        scratch = root.join(format!("scratch-{machine}")).display().to_string(),
        url = redis.url(),
        secret = secret.display().to_string(),
    )
}

struct Machine {
    daemon: Daemon,
    prog: PathBuf,
    tool: PathBuf,
}

fn machine(root: &Path, redis: &Redis, id: &str, prog: &Path, tool: &Path) -> Machine {
    machine_in_mode(root, redis, id, prog, tool, "read-write")
}

fn machine_in_mode(
    root: &Path,
    redis: &Redis,
    id: &str,
    prog: &Path,
    tool: &Path,
    mode: &str,
) -> Machine {
    let dir = root.join(id);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(prog, bin.join("prog")).unwrap();
    std::fs::copy(tool, bin.join("tool")).unwrap();
    let secret = credentials(&dir, id, &format!("pw-{id}"));
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config(&dir, redis, id, &secret, mode)).unwrap();
    let daemon = Daemon::start(&dir.join("mnt"), &[&bin], &dir.join("state"), Some(&cfg));
    Machine { daemon, prog: bin.join("prog"), tool: bin.join("tool") }
}

fn run_ok(program: &Path, arg: &str) -> String {
    let out = common::run(Command::new(program).arg(arg));
    assert_eq!(out.code, Some(0), "{}: {out:?}", program.display());
    out.stdout
}

fn fleet_summary(d: &Daemon) -> String {
    d.status_json()["subsystems"]["fleet"]["summary"].as_str().unwrap_or_default().to_string()
}

fn bolt_variants(state: &Path) -> i64 {
    let c = catalog_read_only(state);
    c.query_row("SELECT count(*) FROM variants WHERE kind = 'bolt'", [], |r| r.get(0)).unwrap()
}

#[test]
fn two_machines_share_profiles_verdicts_and_survive_an_outage() {
    let tmp = common::open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let acl = format!(
        "{}\n{}\n{}",
        writer_acl("m-a", "pw-m-a"),
        writer_acl("m-b", "pw-m-b"),
        reader_acl("m-c", "pw-m-c")
    );
    let mut redis = Redis::start(&root.join("redis"), &acl);
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let prog = src.join("prog");
    common::cc(branchy::PROGRAM, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let tool = src.join("tool");
    common::cc(TOOL_C, &tool, &["-DTAG=\"original\""]);
    let crashing = src.join("tool.variant");
    common::cc(TOOL_C, &crashing, &["-DTAG=\"variant\"", "-DCRASH_ON"]);
    let expected = run_ok(&prog, ITERATIONS);

    let a = machine(&root, &redis, "m-a", &prog, &tool);
    let b = machine(&root, &redis, "m-b", &prog, &tool);
    for m in [&a, &b] {
        let s = m.daemon.wait_for(Duration::from_secs(20), "the fleet link", |d| {
            Some(fleet_summary(d)).filter(|s| s.starts_with("fleet: reachable"))
        });
        assert!(s.contains("read-write"), "{s}");
    }

    // 1. A runs prog until its own profile matured and it queued a build.
    let a_served = a.daemon.bin().join("prog");
    let started = Instant::now();
    let mut runs = 0;
    loop {
        assert_eq!(run_ok(&a_served, ITERATIONS), expected);
        runs += 1;
        let st = a.daemon.binary(&a.prog).map(|b| common::stage_key(&b)).unwrap_or_default();
        if !st.is_empty() && st != "collecting" && st != "seen" {
            break;
        }
        assert!(runs < 400, "A's profile did not mature; stage {st}");
    }
    println!("A matured after {runs} runs, {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(bolt_variants(&b.daemon.state), 0);

    // B runs it once; it builds from the fleet's profile.
    let b_served = b.daemon.bin().join("prog");
    let once = Instant::now();
    assert_eq!(run_ok(&b_served, ITERATIONS), expected);
    b.daemon.wait_for(Duration::from_secs(60), "B's variant built from the fleet profile", |d| {
        (bolt_variants(&d.state) > 0).then_some(())
    });
    let built_in = once.elapsed();
    println!("B built its variant {:.1} s after its first run", built_in.as_secs_f64());
    assert!(built_in < Duration::from_secs(30), "B took {built_in:?}");
    let details = b.daemon.wait_for(Duration::from_secs(20), "B's fleet details", |d| {
        let b = d.binary(&b.prog)?;
        let f = b["details"]["fleet"].clone();
        let summary = f["summary"].as_str()?;
        // Two machines' samples, or one machine's exact instrumentation profile (which wins
        // over any sampled one when instrumentation mode is on).
        let shared = summary.starts_with("fleet: 2 machines, ")
            || (summary.starts_with("fleet: 1 machine, ") && summary.contains("(exact)"));
        (shared && summary.ends_with("; local: 1 run")).then_some(f)
    });
    println!("B: {}", details["summary"]);
    let built_from = details["built_from"].as_str().unwrap_or_default();
    assert!(built_from.starts_with("fleet: "), "{details:#}");
    let c = catalog_read_only(&b.daemon.state);
    let local: i64 = c
        .query_row("SELECT COALESCE(SUM(own_samples), 0) FROM profile_windows", [], |r| r.get(0))
        .unwrap();
    let built: i64 = c
        .query_row("SELECT profile_samples FROM variants WHERE kind = 'bolt'", [], |r| r.get(0))
        .unwrap();
    assert!(local < 1500 && built >= 1500, "B's own {local} samples, built from {built}");
    drop(c);

    // A read-only machine (`mode = "read"`, a reader in Redis's ACL) uses the fleet's
    // profile as B did, and leaves nothing in Redis: not its profile, not its verdicts, not
    // even its name in the identity's machine set.
    let c = machine_in_mode(&root, &redis, "m-c", &prog, &tool, "read");
    let s = c.daemon.wait_for(Duration::from_secs(20), "C's fleet link", |d| {
        Some(fleet_summary(d)).filter(|s| s.starts_with("fleet: reachable"))
    });
    assert!(s.contains("(read-only)"), "{s}");
    assert_eq!(run_ok(&c.daemon.bin().join("prog"), ITERATIONS), expected);
    c.daemon.wait_for(Duration::from_secs(60), "C's variant built from the fleet profile", |d| {
        (bolt_variants(&d.state) > 0).then_some(())
    });
    let c_keys = redis.cli(&["--scan", "--pattern", "*m-c*"]);
    assert_eq!(c_keys.trim(), "", "a read-only machine wrote keys");
    let machine_sets = redis.cli(&["--scan", "--pattern", "optbin:v1:*:machines"]);
    for set in machine_sets.lines().filter(|l| !l.is_empty()) {
        let members = redis.cli(&["SMEMBERS", set]);
        assert!(!members.lines().any(|m| m == "m-c"), "{set}: {members}");
    }
    // And Redis itself refuses its writes (the ACL, not only optbin, keeps it read-only).
    let refused = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--user", "m-c", "--pass", "pw-m-c"])
        .args(["--no-auth-warning", "SET", "optbin:v1:{x}:profile:m-c", "1"])
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&refused.stdout);
    assert!(refused.contains("NOPERM"), "{refused}");
    drop(c);

    // 2. A variant quarantined on A is never served on B.
    std::fs::metadata(a.daemon.bin().join("tool")).unwrap();
    std::fs::metadata(b.daemon.bin().join("tool")).unwrap();
    let sha = common::wait_binary(&a.daemon, &a.tool, 20, "tool indexed on A", |b| {
        b["sha256"].is_string()
    })["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    common::wait_binary(&b.daemon, &b.tool, 20, "tool indexed on B", |b| {
        b["sha256"] == sha.as_str()
    });
    let on_a = common::place_variant(&a.daemon.state, &sha, &crashing, "ready");
    common::wait_binary(&a.daemon, &a.tool, 20, "A's canary", |b| {
        b["served"].as_str().is_some_and(|s| s.starts_with(&format!("variant {on_a}")))
    });
    let mut crashed = false;
    for _ in 0..60 {
        let out = Command::new(a.daemon.bin().join("tool")).arg("crash").output().unwrap();
        if out.status.signal() == Some(libc::SIGSEGV) {
            crashed = true;
            break;
        }
    }
    assert!(crashed, "60 execs on A never reached the variant");
    common::wait_binary(&a.daemon, &a.tool, 20, "A's quarantine", |b| {
        b["variants"][0]["state"] == "quarantined"
    });
    let variant_sha = optbin::identity::ContentId::of_file(&crashing).unwrap().hex();
    b.daemon.wait_for(Duration::from_secs(20), "B to learn of the quarantine", |d| {
        let s = d.status_json();
        s["subsystems"]["fleet"]["quarantined_variants"].get(&variant_sha).map(|_| ())
    });
    let on_b = common::place_variant(&b.daemon.state, &sha, &crashing, "ready");
    for i in 0..30 {
        let out = common::run(Command::new(b.daemon.bin().join("tool")).arg("crash"));
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), "original crash\n"), "exec {i} on B");
    }
    let b_tool = common::wait_binary(&b.daemon, &b.tool, 20, "B's fleet quarantine", |b| {
        b["variants"][0]["state"] == "quarantined"
    });
    // The original: by default a link, as it has no other variant to serve.
    assert_eq!(b_tool["served"], "original (link)", "{b_tool:#}");
    let c = catalog_read_only(&b.daemon.state);
    let note: String =
        c.query_row("SELECT note FROM variants WHERE id = ?1", [on_b], |r| r.get(0)).unwrap();
    assert!(note.starts_with("fleet: quarantined on machine m-a"), "{note}");
    let canaried: i64 = c
        .query_row("SELECT count(*) FROM runs WHERE variant_id = ?1", [on_b], |r| r.get(0))
        .unwrap();
    assert_eq!(canaried, 0, "B ran the quarantined variant");
    drop(c);

    // 3. Redis killed while programs run through both mounts.
    let stop = Arc::new(AtomicBool::new(false));
    let (ran, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = [a_served.clone(), b_served.clone()]
        .into_iter()
        .map(|program| {
            let (stop, ran, failed, expected) =
                (stop.clone(), ran.clone(), failed.clone(), expected.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let out = Command::new(&program).arg(ITERATIONS).output();
                    ran.fetch_add(1, Ordering::SeqCst);
                    match out {
                        Ok(o) if o.status.success() && o.stdout == expected.as_bytes() => {}
                        other => {
                            eprintln!("failed run of {}: {other:?}", program.display());
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    // Some runs through both mounts before the outage.
    common::daemon::wait_until(Duration::from_secs(30), "runs through the mounts", || {
        ran.load(Ordering::SeqCst) >= 4
    });
    redis.kill();
    let killed = Instant::now();
    let ran_before = ran.load(Ordering::SeqCst);
    for m in [&a, &b] {
        let s = m.daemon.wait_for(Duration::from_secs(20), "the outage in status", |d| {
            Some(fleet_summary(d)).filter(|s| s.starts_with("fleet: unreachable since "))
        });
        assert!(s.contains(", retrying"), "{s}");
        let text = m.daemon.status_text();
        assert!(text.contains("fleet: unreachable since "), "{text}");
        assert!(!text.contains("pw-m-"), "a password in status");
    }
    // A keeps profiling while Redis is down: its next contribution waits in the queue.
    a.daemon.wait_for(Duration::from_secs(30), "a push waiting on A", |d| {
        let s = d.status_json();
        (s["subsystems"]["fleet"]["queued_pushes"].as_u64()? > 0).then_some(())
    });
    println!("outage noticed and pushes queued within {:.1} s", killed.elapsed().as_secs_f64());
    // Programs keep running through both mounts during the outage.
    a.daemon.wait_for(Duration::from_secs(60), "10 runs during the outage", |_| {
        (ran.load(Ordering::SeqCst) >= ran_before + 10).then_some(())
    });
    let during = ran.load(Ordering::SeqCst) - ran_before;
    redis.restart();
    let key = format!("optbin:v1:{{{}}}:profile:m-a", {
        let b = a.daemon.binary(&a.prog).unwrap();
        b["sha256"].as_str().unwrap().to_string()
    });
    a.daemon.wait_for(Duration::from_secs(30), "the queued push in Redis", |_| {
        (redis.cli(&["EXISTS", &key]).trim() == "1").then_some(())
    });
    for m in [&a, &b] {
        m.daemon.wait_for(Duration::from_secs(20), "reachable again", |d| {
            Some(fleet_summary(d)).filter(|s| s.starts_with("fleet: reachable"))
        });
    }
    // The verdicts Redis lost with its restart are sent again too.
    let verdicts = format!("optbin:v1:{{{sha}}}:verdicts:m-a");
    a.daemon.wait_for(Duration::from_secs(20), "A's verdicts in Redis again", |_| {
        (redis.cli(&["EXISTS", &verdicts]).trim() == "1").then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let (ran, failed) = (ran.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("{ran} runs through both mounts ({during} while Redis was down), {failed} failed");
    assert_eq!(failed, 0);

    // 4. Bad values planted in Redis are refused with a reason; B keeps working.
    let bsha = b.daemon.binary(&b.prog).unwrap()["sha256"].as_str().unwrap().to_string();
    let plant = |machine: &str, value: &str| {
        redis.cli(&["SET", &format!("optbin:v1:{{{bsha}}}:profile:{machine}"), value]);
        redis.cli(&["SADD", &format!("optbin:v1:{{{bsha}}}:machines"), machine]);
    };
    plant("evil-garbage", "\x01\x02 definitely not json");
    plant("evil-future", r#"{"v":9,"profile":"from the future"}"#);
    // 2 MiB (zero bytes, then `x`), over the 1 MiB cap.
    redis.cli(&["SETRANGE", &format!("optbin:v1:{{{bsha}}}:profile:evil-huge"), "2097152", "x"]);
    redis.cli(&["SADD", &format!("optbin:v1:{{{bsha}}}:machines"), "evil-huge"]);
    let refused = b.daemon.wait_for(Duration::from_secs(20), "the refusals in B's status", |d| {
        let s = d.status_json();
        let list = s["subsystems"]["fleet"]["refused_recent"].as_array()?.clone();
        let text: Vec<String> =
            list.iter().map(|r| format!("{} {}", r["key"], r["reason"])).collect();
        let has = |m: &str, why: &str| text.iter().any(|t| t.contains(m) && t.contains(why));
        (has("evil-garbage", "not a fleet value")
            && has("evil-future", "wrong version 9")
            && has("evil-huge", "oversized"))
        .then_some(text)
    });
    println!("refused: {refused:#?}");
    assert_eq!(run_ok(&b_served, ITERATIONS), expected);
    assert!(b.daemon.log().contains("fleet value refused"));
}

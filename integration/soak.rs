//! A soak run of the real daemon under mixed load: served binaries and symlinked ones
//! (an excluded binary, a symlink in the overlaid directory) run through the mount by root
//! and by `nobody` from several threads at once, while control commands switch what is
//! served (pins, exclusions, a canary of a placed variant), the original is upgraded
//! underneath by rename, and the server is SIGKILLed every so often.
//!
//! Asserted: no command fails and none prints what it should not (each program prints its
//! version: a command must print a version that was installed while it ran, never the bytes
//! of an older one); the supervisor's memory and descriptors stay flat, and so do the
//! server's across its restarts; the catalog stays bounded. The figures are printed.
//!
//! Short by default (about a minute, for the test suite); `OPTBIN_SOAK_SECS=3600` for the
//! full hour, with a server kill every `OPTBIN_SOAK_KILL_SECS` (default: a quarter of the
//! run, at most 180 s).

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident set size (KiB) and open descriptors of `pid`, if it is alive.
fn footprint(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

fn catalog_bytes(state: &Path) -> u64 {
    ["catalog.db", "catalog.db-wal", "catalog.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(state.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// One observation of the daemon's processes and catalog.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_secs: f64,
    supervisor: (u64, u64),
    server: Option<(u64, u64)>,
    catalog: u64,
    commands: u64,
}

/// The upgrades of the original `a`: `started` counts upgrades begun (incremented before the
/// rename), `done` those finished (after it). A run that began when `done` was d and ended
/// when `started` was s may print any version from d to s.
#[derive(Default)]
struct Versions {
    started: AtomicU64,
    done: AtomicU64,
}

#[derive(Default)]
struct Tally {
    commands: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
    control_writes: AtomicU64,
    control_failed: AtomicU64,
    upgrades: AtomicU64,
    kills: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, what: String) {
        let mut p = self.problems.lock().unwrap();
        if p.len() < 20 {
            p.push(what);
        }
    }
}

/// What `name` prints: `a` (and the symlink `c` to it) its version, `b` a fixed tag.
fn check_output(name: &str, out: &str, arg: &str, from: u64, to: u64) -> bool {
    let Some(rest) = out.strip_suffix(&format!(" {arg}\n")) else { return false };
    match name {
        "b" => rest == "b",
        _ => rest
            .strip_prefix("a-v")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| (from..=to).contains(&v)),
    }
}

#[test]
fn soak_mixed_load_with_upgrades_switches_and_server_kills() {
    let secs = env_secs("OPTBIN_SOAK_SECS", 60);
    let kill_every = env_secs("OPTBIN_SOAK_KILL_SECS", (secs / 4).clamp(5, 180));
    let (_tmp, root, bin) = common::open_test_root();
    common::chmod(&bin, 0o755);
    let a = bin.join("a");
    common::prog(&a, "a-v0", &[]);
    common::prog(&bin.join("b"), "b", &[]);
    std::os::unix::fs::symlink("a", bin.join("c")).unwrap();
    // A variant of `a` as built from version 0 (same output): once `a` is upgraded it must
    // never be served again.
    let variant = root.join("a.variant");
    common::prog(&variant, "a-v0", &["-O2"]);

    let mut d =
        common::start_daemon(&root, &bin, "[policy]\nrescan_ms = 200\nruns_max_rows = 1000\n");
    let view = d.bin();
    std::fs::metadata(view.join("a")).unwrap();
    let indexed = common::wait_binary(&d, &a, 30, "a to be indexed", |b| b["sha256"].is_string());
    let vid =
        common::place_variant(&d.state, indexed["sha256"].as_str().unwrap(), &variant, "ready");
    common::wait_binary(&d, &a, 30, "the canary of a's variant", |b| {
        b["served"].as_str().is_some_and(|s| s.contains(&format!("variant {vid}")))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let versions = Arc::new(Versions::default());
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);

    // Users: two threads as root, one as nobody; each runs a, b (excluded part of the time:
    // a symlink) and c (a symlink to a) through the mount.
    let mut workers = Vec::new();
    for (w, as_nobody) in [(0, false), (1, false), (2, true)] {
        let (view, stop, versions, tally) =
            (view.clone(), stop.clone(), versions.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let name = ["a", "b", "c"][(i % 3) as usize];
                let arg = format!("w{w}-{i}");
                let path: PathBuf = view.join(name);
                let from = versions.done.load(Ordering::SeqCst);
                let mut cmd =
                    if as_nobody { common::as_nobody(&path) } else { Command::new(&path) };
                let out = cmd.arg(&arg).output();
                let to = versions.started.load(Ordering::SeqCst);
                tally.commands.fetch_add(1, Ordering::SeqCst);
                match out {
                    Ok(o) if o.status.success() => {
                        let text = String::from_utf8_lossy(&o.stdout);
                        if !check_output(name, &text, &arg, from, to) {
                            tally.wrong.fetch_add(1, Ordering::SeqCst);
                            tally.problem(format!(
                                "{name} {arg} printed {text:?} (versions {from}..={to})"
                            ));
                        }
                    }
                    Ok(o) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        tally.problem(format!(
                            "{name} {arg}: {} {}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim()
                        ));
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        tally.problem(format!("{name} {arg}: {e}"));
                    }
                }
                i += 1;
            }
        }));
    }

    // Control writes: pins of a, exclusion of b, switching what is served.
    {
        let (mnt, stop, tally) = (d.mnt.clone(), stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            let commands = ["pin a bolted", "exclude b", "pin a original", "include b", "unpin a"];
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let command = commands[i % commands.len()];
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .open(mnt.join(".optbin/control"))
                    .and_then(|mut f| std::io::Write::write_all(&mut f, command.as_bytes()));
                tally.control_writes.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = written {
                    tally.control_failed.fetch_add(1, Ordering::SeqCst);
                    tally.problem(format!("control {command:?}: {e}"));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(300)); // a pace, not a wait
            }
        }));
    }

    // Upgrades of a underneath, by rename (as package managers do).
    {
        let (bin, stop, versions, tally) =
            (bin.clone(), stop.clone(), versions.clone(), tally.clone());
        let every = Duration::from_secs((secs / 6).clamp(5, 300));
        workers.push(std::thread::spawn(move || {
            let mut next = Instant::now() + every;
            while !stop.load(Ordering::SeqCst) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(50)); // a pace, not a wait
                    continue;
                }
                let v = versions.started.load(Ordering::SeqCst) + 1;
                let staged = bin.join(".a.new");
                common::prog(&staged, &format!("a-v{v}"), &[]);
                versions.started.store(v, Ordering::SeqCst);
                std::fs::rename(&staged, bin.join("a")).unwrap();
                versions.done.store(v, Ordering::SeqCst);
                tally.upgrades.fetch_add(1, Ordering::SeqCst);
                next = Instant::now() + every;
            }
        }));
    }

    // The main thread: samples the footprint every second and kills the server on schedule.
    let mut samples = Vec::new();
    let mut restart_ms = Vec::new();
    let mut next_kill = started + Duration::from_secs(kill_every);
    while Instant::now() < deadline {
        let supervisor = footprint(d.pid()).expect("the supervisor is alive");
        samples.push(Sample {
            at_secs: started.elapsed().as_secs_f64(),
            supervisor,
            server: d.try_server_pid().and_then(footprint),
            catalog: catalog_bytes(&d.state),
            commands: tally.commands.load(Ordering::SeqCst),
        });
        if Instant::now() >= next_kill {
            let pid = d.server_pid();
            // SAFETY: killing the server process of our own daemon.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            let killed = Instant::now();
            d.wait_for(Duration::from_secs(30), "a new server", |d| {
                d.try_server_pid().filter(|p| *p != pid)
            });
            restart_ms.push(killed.elapsed().as_millis());
            tally.kills.fetch_add(1, Ordering::SeqCst);
            next_kill = Instant::now() + Duration::from_secs(kill_every);
        }
        std::thread::sleep(Duration::from_secs(1)); // the sampling period
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();

    let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
    let (commands, failed, wrong) =
        (load(&tally.commands), load(&tally.failed), load(&tally.wrong));
    let first = samples.first().copied().unwrap();
    let last = samples.last().copied().unwrap();
    let half = samples.len() / 2;
    let max_of = |s: &[Sample], f: &dyn Fn(&Sample) -> Option<u64>| s.iter().filter_map(f).max();
    let server_rss = |s: &Sample| s.server.map(|x| x.0);
    let server_fds = |s: &Sample| s.server.map(|x| x.1);
    let catalog_max = samples.iter().map(|s| s.catalog).max().unwrap();
    let status = d.status_json();
    let served = d.binary(&a).map(|b| b["served"].clone());
    println!(
        "soak: {elapsed:.0} s, {commands} commands ({:.1}/s) by 3 users' threads, {failed} failed, {wrong} wrong",
        commands as f64 / elapsed
    );
    println!(
        "soak: {} control writes ({} failed), {} upgrades of a underneath, {} server kills (restarts took {restart_ms:?} ms)",
        load(&tally.control_writes),
        load(&tally.control_failed),
        load(&tally.upgrades),
        load(&tally.kills)
    );
    println!(
        "soak: supervisor RSS {} -> {} KiB, fds {} -> {}; server RSS max {} KiB (first half) / {} KiB (second half), fds max {} / {}; catalog {} -> {} KiB (max {} KiB)",
        first.supervisor.0,
        last.supervisor.0,
        first.supervisor.1,
        last.supervisor.1,
        max_of(&samples[..half], &server_rss).unwrap_or(0),
        max_of(&samples[half..], &server_rss).unwrap_or(0),
        max_of(&samples[..half], &server_fds).unwrap_or(0),
        max_of(&samples[half..], &server_fds).unwrap_or(0),
        first.catalog / 1024,
        last.catalog / 1024,
        catalog_max / 1024,
    );
    println!("soak: a is served as {served:?}; daemon {}", status["daemon"]);
    for s in samples.iter().step_by((samples.len() / 12).max(1)) {
        println!(
            "  t={:>5.0}s commands={:>6} supervisor {:>6} KiB {:>3} fds | server {:?} | catalog {} KiB",
            s.at_secs,
            s.commands,
            s.supervisor.0,
            s.supervisor.1,
            s.server,
            s.catalog / 1024
        );
    }
    let problems = tally.problems.lock().unwrap().join("\n");
    if failed + wrong > 0 {
        // What the daemon said about it (a request it answered with an error is a warning).
        let log = d.log();
        let said: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        println!("soak: the daemon's warnings and errors:\n{}", said.join("\n"));
    }
    assert_eq!((failed, wrong), (0, 0), "failed or wrong commands:\n{problems}");
    assert_eq!(load(&tally.control_failed), 0, "failed control writes:\n{problems}");
    assert!(commands >= secs, "the load was too light: {commands} commands in {secs} s");
    assert!(load(&tally.kills) >= 1 && load(&tally.upgrades) >= 1);
    // Flat: the supervisor lives through the whole run; the server restarts, so its
    // second half is compared with its first.
    assert!(
        last.supervisor.1 <= first.supervisor.1 + 4,
        "supervisor descriptors grew: {} -> {}",
        first.supervisor.1,
        last.supervisor.1
    );
    assert!(
        last.supervisor.0 <= first.supervisor.0 + 16 * 1024,
        "supervisor RSS grew: {} -> {} KiB",
        first.supervisor.0,
        last.supervisor.0
    );
    let (fds1, fds2) =
        (max_of(&samples[..half], &server_fds), max_of(&samples[half..], &server_fds));
    assert!(
        fds2.unwrap_or(0) <= fds1.unwrap_or(0) + 16,
        "server descriptors grew: {fds1:?} -> {fds2:?}"
    );
    let (rss1, rss2) =
        (max_of(&samples[..half], &server_rss), max_of(&samples[half..], &server_rss));
    assert!(
        rss2.unwrap_or(0) <= rss1.unwrap_or(0) * 3 / 2 + 32 * 1024,
        "server RSS grew: {rss1:?} -> {rss2:?} KiB"
    );
    assert!(catalog_max < 64 << 20, "the catalog grew to {} KiB", catalog_max / 1024);
    d.stop();
}

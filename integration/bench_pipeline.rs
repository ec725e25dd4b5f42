//! Benchmark of the whole pipeline through the REAL daemon (`optbin mount --foreground`):
//! real programs (Lua, and SQLite in full mode; see `common/programs.rs`) sit in a temp
//! overlay dir and a CPU-heavy workload runs through `<mnt>/bin/NAME` again and again
//! until the daemon has sampled them, built a BOLT variant, canaried it and decided
//! (serving optimized, or the original with the measured reason). Prints:
//! - the stages as status.json showed them, each with the runs and seconds since the first
//!   run (profile mature, queued/optimizing, variant stored, canary, the decision);
//! - BOLT's time and peak memory (the optimizer's `bolt_jobs` row in status);
//! - the served result side by side: interleaved pairs of (run through the mount, serving
//!   what the policy chose) and (the original file run directly), median ratio of CPU and
//!   wall time with the IQR, measured after a restart of the daemon without the profiler (so
//!   no rebuild from the growing profile starts a new canary meanwhile); the stored variant
//!   against the original for reference; the mount pinned to the original (the cost of the
//!   mount and of measuring each exec); and an A/A control (the original against itself);
//! - how often the policy promotes an equal-speed variant: real canaries of a variant that
//!   is a byte-identical copy of a fresh binary (placed as a `ready` BOLT variant through
//!   the store and the catalog, under a second daemon that does not profile), next to the
//!   policy's own simulation (`optbin::policy::sim`) with the same settings; per trial the
//!   arm shares, how often an exec got the same arm as the one before, and the per-arm
//!   median CPU time as the daemon measured it (runs table) and as wait4 saw it.
//!
//! Run: `OPTBIN_BENCH_QUICK=1 cargo bench --bench bench_pipeline` (or `integration/bench.sh bench_pipeline` for the full mode).
//!
//! `OPTBIN_BENCH_QUICK=1`: Lua only, smaller maturity threshold and policy looks, 7 pairs,
//! 3 equal-speed trials (a few minutes). Full mode: Lua and SQLite, 100k samples to
//! mature, the policy's default settings, 21 pairs, 8 trials (about half an hour).
//!
//! `OPTBIN_BENCH_AA_TRIALS=N`: only the equal-speed canaries, N of them, with the policy's
//! default settings (an equal-speed canary mostly runs to the last look, 320 pairs).

#[path = "common/bench.rs"]
mod bench;

#[path = "common/mod.rs"]
mod common;
#[path = "common/programs.rs"]
mod programs;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use optbin::catalog::base::{NewVariant, insert_variant};
use optbin::policy::PolicyConfig;
use optbin::policy::sim::{SimSpec, run_trials};
use optbin::store::VariantStore;
use programs::{Program, build_lua, build_sqlite, measure, quick};
use serde_json::Value;

/// The benchmark's knobs, chosen by mode.
struct Plan {
    /// Sampling rate: high enough that a profile reaches `min_samples` in well under a
    /// minute of runs (the default 99 Hz would need hours for the ~100k samples below which
    /// sampled profiles made BOLT slower on this machine).
    frequency_hz: u32,
    min_samples: u64,
    policy_min_runs: usize,
    policy_looks: u32,
    /// Wall-clock budget of the run loop per program.
    budget: Duration,
    pairs: usize,
    equal_speed_trials: usize,
    /// Only the equal-speed trials (`OPTBIN_BENCH_AA_TRIALS`), with the default policy.
    aa_only: bool,
}

impl Plan {
    fn new() -> Self {
        if let Some(n) = std::env::var("OPTBIN_BENCH_AA_TRIALS").ok().and_then(|v| v.parse().ok()) {
            let policy = PolicyConfig::default();
            return Plan {
                policy_min_runs: policy.min_runs_per_arm,
                policy_looks: policy.looks,
                equal_speed_trials: n,
                aa_only: true,
                ..Self::full()
            };
        }
        if quick() {
            Plan {
                frequency_hz: 4000,
                min_samples: 20_000,
                policy_min_runs: 5,
                policy_looks: 3,
                budget: Duration::from_secs(150),
                pairs: 7,
                equal_speed_trials: 3,
                aa_only: false,
            }
        } else {
            Self::full()
        }
    }

    /// Full mode: the policy's default settings (what a user gets).
    fn full() -> Self {
        let policy = PolicyConfig::default();
        Plan {
            frequency_hz: 4000,
            min_samples: 100_000,
            policy_min_runs: policy.min_runs_per_arm,
            policy_looks: policy.looks,
            budget: Duration::from_secs(600),
            pairs: 21,
            equal_speed_trials: 8,
            aa_only: false,
        }
    }

    fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            min_runs_per_arm: self.policy_min_runs,
            looks: self.policy_looks,
            ..PolicyConfig::default()
        }
    }

    fn config(&self, scratch: &Path, profile: bool) -> String {
        format!(
            r#"[profile]
enabled = {profile}
frequency_hz = {}
buffer_kib = 2048
flush_secs = 1
window_secs = 4
identify_after_samples = 20
min_samples = {}
min_runs = 3
min_stability = 0.5

[optimizer]
scratch_dir = "{}"
check_interval_secs = 1
timeout_secs = 300

[policy]
canary_share = 0.5
min_runs = {}
looks = {}
rescan_ms = 200
"#,
            self.frequency_hz,
            self.min_samples,
            scratch.display(),
            self.policy_min_runs,
            self.policy_looks
        )
    }
}

/// The policy's stage of a status.json binary entry: `collecting`, `canary`,
/// `serving_optimized`, ... (the serde tag of `optbin::policy::Stage`).
fn stage_key(binary: &Value) -> Option<String> {
    match &binary["details"]["policy"]["stage"] {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.keys().next().cloned(),
        _ => None,
    }
}

fn stage_text(binary: &Value) -> String {
    binary["details"]["policy"]["stage_text"].as_str().unwrap_or("(no policy stage)").to_string()
}

/// A moment of the pipeline as first seen by the poller.
#[derive(Clone, Debug)]
struct Milestone {
    what: String,
    runs: usize,
    secs: f64,
    detail: String,
}

/// Polls status.json every 100 ms while the run loop runs, recording each change of the
/// policy's stage (and of the variant it is about), the profile's maturity and each stored
/// variant, with the runs done by then.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    milestones: Arc<Mutex<Vec<Milestone>>>,
}

impl Poller {
    fn start(status: PathBuf, name: String, runs: Arc<AtomicUsize>, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let milestones = Arc::new(Mutex::new(Vec::<Milestone>::new()));
        let (s, m) = (stop.clone(), milestones.clone());
        let thread = std::thread::spawn(move || {
            let (mut stage, mut mature, mut stored) = (String::new(), false, 0);
            while !s.load(Ordering::Relaxed) {
                if let Some(b) = read_binary(&status, &name) {
                    let mut seen = m.lock().unwrap();
                    let mut note = |what: String, detail: String| {
                        seen.push(Milestone {
                            what,
                            runs: runs.load(Ordering::SeqCst),
                            secs: t0.elapsed().as_secs_f64(),
                            detail,
                        })
                    };
                    let profiler = &b["details"]["profiler"];
                    if !mature && profiler["maturity"]["mature"] == true {
                        mature = true;
                        let samples = profiler["own_samples"].as_u64().unwrap_or(0);
                        note("profile mature".into(), format!("{samples} own samples"));
                    }
                    let variants = b["variants"].as_array().cloned().unwrap_or_default();
                    for v in variants.iter().skip(stored) {
                        note(
                            "variant stored".into(),
                            format!(
                                "variant {} ({} KiB, from {} samples)",
                                v["id"],
                                v["size"].as_u64().unwrap_or(0) / 1024,
                                v["profile_samples"]
                            ),
                        );
                    }
                    stored = stored.max(variants.len());
                    if let Some(k) = stage_key(&b) {
                        let about = &b["details"]["policy"]["stage"][&k]["variant_id"];
                        let now = if about.is_null() { k.clone() } else { format!("{k} {about}") };
                        if now != stage {
                            note(now.clone(), stage_text(&b));
                            stage = now;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Poller { stop, thread: Some(thread), milestones }
    }

    fn finish(mut self) -> Vec<Milestone> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.milestones.lock().unwrap().clone()
    }
}

fn read_binary(status: &Path, name: &str) -> Option<Value> {
    let bytes = std::fs::read(status).ok()?;
    let json: Value = serde_json::from_slice(&bytes).ok()?;
    json["binaries"].as_array()?.iter().find(|b| b["name"] == name).cloned()
}

/// The decision the run loop waits for: the policy served the variant, rejected it
/// (serving the original with a variant present), or the pipeline ended otherwise.
fn decided(b: &Value) -> bool {
    let has_variant = b["variants"].as_array().is_some_and(|v| !v.is_empty());
    match stage_key(b).as_deref() {
        Some("serving_optimized" | "bolt_failed" | "crashed") => true,
        Some("serving_original") => has_variant,
        _ => false,
    }
}

/// The daemon's measured runs of the binary at `path`, in order: (ran the variant, task-clock
/// seconds).
fn measured_runs(state: &Path, path: &Path) -> Vec<(bool, f64)> {
    let conn = common::daemon::catalog_read_only(state);
    let mut stmt = conn
        .prepare(
            "SELECT variant_id IS NOT NULL, task_clock_ns FROM runs WHERE path = ?1 ORDER BY id",
        )
        .unwrap();
    stmt.query_map([path.to_string_lossy()], |r| {
        Ok((r.get::<_, bool>(0)?, r.get::<_, i64>(1)? as f64 / 1e9))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The policy's decisions about the binary at `path`, in order, from the catalog (read-only).
fn policy_events(state: &Path, path: &Path) -> Vec<String> {
    let conn = common::daemon::catalog_read_only(state);
    let mut stmt = conn
        .prepare(
            "SELECT kind, detail FROM events WHERE path = ?1 AND kind LIKE 'policy.%' ORDER BY id",
        )
        .unwrap();
    stmt.query_map([path.to_string_lossy()], |r| {
        Ok(format!("{}: {}", r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn run_quiet(bin: &Path, args: &[String]) {
    let out = Command::new(bin).args(args).stdout(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {out:?}", bin.display());
}

fn ratio_line(label: &str, (wall, cpu): (Vec<f64>, Vec<f64>)) -> String {
    let stats = |mut r: Vec<f64>| {
        r.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| r[((r.len() - 1) as f64 * p).round() as usize];
        format!("{:.3} [{:.3}-{:.3}]", q(0.5), q(0.25), q(0.75))
    };
    let n = cpu.len();
    format!("  {label:<44} cpu {}  wall {}  ({n} pairs)", stats(cpu), stats(wall))
}

/// One program through the whole pipeline, its table rows appended to `report`; returns
/// whether the daemon built a variant from the profile it collected.
fn pipeline(plan: &Plan, prog: &Program, root: &Path, report: &mut Vec<String>) -> bool {
    let overlay = root.join(format!("{}-bin", prog.name));
    std::fs::create_dir_all(&overlay).unwrap();
    let name = format!("{}-bench", prog.name);
    let original = overlay.join(&name);
    std::fs::copy(&prog.bin, &original).unwrap();
    std::fs::set_permissions(&original, std::fs::Permissions::from_mode(0o755)).unwrap();
    let scratch = root.join(format!("{}-scratch", prog.name));
    let config = root.join(format!("{}-config.toml", prog.name));
    std::fs::write(&config, plan.config(&scratch, true)).unwrap();
    let mnt = root.join(format!("{}-mnt", prog.name));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut daemon =
        Daemon::start(&mnt, &[&overlay], &root.join(format!("{}-state", prog.name)), Some(&config));
    let served = daemon.bin().join(&name);

    // The run loop: sequential runs through the mount until the policy decides.
    let runs = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let poller = Poller::start(mnt.join(".optbin/status.json"), name.clone(), runs.clone(), t0);
    let mut last_print = Instant::now();
    let outcome = loop {
        run_quiet(&served, &prog.measure);
        runs.fetch_add(1, Ordering::SeqCst);
        let b = daemon.binary_named(&name);
        if let Some(b) = &b {
            if decided(b) {
                // Let the poller see the final stage too.
                std::thread::sleep(Duration::from_millis(300));
                break Ok(b.clone());
            }
            if last_print.elapsed() > Duration::from_secs(15) {
                println!(
                    "  [{name}] {:>4} runs, {:>5.0} s: {}",
                    runs.load(Ordering::SeqCst),
                    t0.elapsed().as_secs_f64(),
                    stage_text(b)
                );
                last_print = Instant::now();
            }
        }
        if t0.elapsed() > plan.budget {
            break Err(b);
        }
    };
    let total_runs = runs.load(Ordering::SeqCst);
    let total_secs = t0.elapsed().as_secs_f64();
    let milestones = poller.finish();
    let built = milestones.iter().any(|m| m.what == "variant stored");

    report.push(format!("{name}: pipeline through the mount ({} per run)", prog.measure.join(" ")));
    for m in &milestones {
        report.push(format!(
            "  {:<18} after {:>4} runs, {:>6.1} s   {}",
            m.what, m.runs, m.secs, m.detail
        ));
    }
    let final_entry = match outcome {
        Ok(b) => {
            report.push(format!(
                "  decided after {total_runs} runs, {total_secs:.1} s: {}",
                stage_text(&b)
            ));
            b
        }
        Err(b) => {
            report.push(format!(
                "  NOT CONVERGED within {:.0} s ({total_runs} runs); stopped at: {}",
                plan.budget.as_secs_f64(),
                b.as_ref().map(stage_text).unwrap_or_else(|| "(not in status)".into())
            ));
            if let Some(b) = &b {
                report.push(format!(
                    "  profiler: {}",
                    b["details"]["profiler"]["summary"].as_str().unwrap_or("-")
                ));
                report.push(format!(
                    "  optimizer: {}",
                    b["details"]["optimizer"]["summary"].as_str().unwrap_or("-")
                ));
            }
            b.unwrap_or(Value::Null)
        }
    };
    for v in final_entry["variants"].as_array().into_iter().flatten() {
        report.push(format!(
            "  variant {}: {}, from {} samples, {} KiB",
            v["id"],
            v["state"].as_str().unwrap_or("?"),
            v["profile_samples"],
            v["size"].as_u64().unwrap_or(0) / 1024
        ));
    }
    for e in policy_events(&daemon.state, &original) {
        report.push(format!("    {e}"));
    }
    let job = &final_entry["details"]["optimizer"]["job"];
    if job.is_object() {
        report.push(format!(
            "  BOLT {}: last run {} ms, peak RSS {} MiB, {} attempt(s), step \"{}\", from {} samples",
            job["bolt_version"].as_str().unwrap_or("?"),
            job["wall_ms"].as_i64().unwrap_or(-1),
            job["peak_rss_kib"].as_i64().unwrap_or(-1) / 1024,
            job["attempts"],
            job["ladder_step"].as_str().unwrap_or(""),
            job["profile_samples"]
        ));
    }
    if let Some(gain) = final_entry["details"]["policy"]["gain"].as_object() {
        report.push(format!(
            "  policy's own estimate: {}",
            gain.get("text").and_then(Value::as_str).unwrap_or("-")
        ));
    }

    // The served result, side by side with the original file run directly. The daemon is
    // restarted on the same state without the profiler first: the profile would otherwise
    // keep growing from these runs and a rebuild (at twice the samples) would put a new
    // variant in canary in the middle of the measurement. The policy's decision is in the
    // catalog and survives the restart.
    std::fs::write(&config, plan.config(&scratch, false)).unwrap();
    daemon.restart();
    let frozen = daemon.binary_named(&name).unwrap_or(Value::Null);
    report.push(format!(
        "  measured after a restart without the profiler; the mount serves: {} ({})",
        frozen["served"].as_str().unwrap_or("?"),
        stage_text(&frozen)
    ));
    report.push("  ratios X/original, median [IQR]; below 1 is faster:".to_string());
    report.push(ratio_line(
        "through the mount (what the policy serves)",
        measure(&original, &served, &prog.measure, plan.pairs),
    ));
    // The served variant, else the newest one.
    let variants = frozen["variants"].as_array().cloned().unwrap_or_default();
    let variant = variants.iter().find(|v| v["state"] == "served").or(variants.last());
    if let Some(v) = variant
        && let Some(path) = v["store_path"].as_str().map(PathBuf::from).filter(|p| p.exists())
    {
        report.push(ratio_line(
            &format!("variant {} ({}) run directly", v["id"], v["state"].as_str().unwrap_or("?")),
            measure(&original, &path, &prog.measure, plan.pairs),
        ));
    }
    // What the mount and the per-exec measurement cost by themselves: the original served
    // through the mount (pinned) against the original run directly.
    daemon.control(&format!("pin {name} original")).unwrap();
    report.push(ratio_line(
        "mount, pinned to the original",
        measure(&original, &served, &prog.measure, plan.pairs),
    ));
    daemon.control(&format!("unpin {name}")).unwrap();
    report.push(ratio_line(
        "A/A control (original vs original)",
        measure(&original, &original, &prog.measure, plan.pairs),
    ));
    if let Some(b) = daemon.binary_named(&name) {
        report.push(format!(
            "  after the measurement runs: {} ({})",
            b["served"].as_str().unwrap_or("?"),
            stage_text(&b)
        ));
    }
    daemon.stop();
    built
}

/// Places `file` as a `ready` BOLT variant of the binary with `sha256`: published in the
/// daemon's store, a row in its catalog (what the optimizer does with BOLT's output).
fn place_variant(state: &Path, sha256: &str, file: &Path) -> i64 {
    let stored = VariantStore::open(state).unwrap().publish(file).unwrap();
    let conn = rusqlite::Connection::open(state.join("catalog.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let binary_id: i64 = conn
        .query_row("SELECT id FROM binaries WHERE sha256 = ?1", [sha256], |r| r.get(0))
        .unwrap();
    let variant = NewVariant {
        binary_id,
        kind: "bolt".into(),
        sha256: stored.content.hex(),
        store_path: stored.path.to_string_lossy().into_owned(),
        size: stored.size,
        state: "ready".into(),
        note: Some("bench_pipeline: byte-identical copy of the original".into()),
        ..Default::default()
    };
    insert_variant(&conn, &variant, 1).unwrap()
}

/// Real canaries of equal-speed variants, a line per trial and the rate of promotions, next
/// to the policy's simulation with the same settings.
fn equal_speed_trials(plan: &Plan, lua: &Program, root: &Path, report: &mut Vec<String>) {
    let overlay = root.join("aa-bin");
    std::fs::create_dir_all(&overlay).unwrap();
    let scratch = root.join("aa-scratch");
    let config = root.join("aa-config.toml");
    std::fs::write(&config, plan.config(&scratch, false)).unwrap();
    let mnt = root.join("aa-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let state = root.join("aa-state");
    let mut daemon = Daemon::start(&mnt, &[&overlay], &state, Some(&config));
    // A shorter workload: the policy compares like with like, so any command works.
    let args = vec![lua.measure[0].clone(), "10".to_string()];
    let max_execs = 2 * (plan.policy_min_runs << (plan.policy_looks - 1)) * 3;
    let (mut promoted, mut rejected, mut undecided) = (0, 0, 0);
    report.push(format!(
        "equal-speed canaries (variant = byte-identical copy of the binary; policy min_runs {}, \
         looks {}, alpha {}, promote_min_gain {}):",
        plan.policy_min_runs,
        plan.policy_looks,
        plan.policy().alpha,
        plan.policy().promote_min_gain
    ));
    let t0 = Instant::now();
    for trial in 0..plan.equal_speed_trials {
        // A fresh binary per trial: the Lua build plus a distinct trailer (ignored by the
        // loader), so each trial starts from no history.
        let name = format!("lua-aa{trial}");
        let file = overlay.join(&name);
        let mut bytes = std::fs::read(&lua.bin).unwrap();
        bytes.extend_from_slice(format!("\0bench_pipeline trial {trial}\0").as_bytes());
        std::fs::write(&file, &bytes).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let served = daemon.bin().join(&name);
        run_quiet(&served, &args);
        let sha = daemon.wait_for(Duration::from_secs(30), "the trial binary indexed", |d| {
            d.binary_named(&name)?["sha256"].as_str().map(String::from)
        });
        let copy = root.join(format!("{name}.copy"));
        std::fs::copy(&file, &copy).unwrap();
        let vid = place_variant(&state, &sha, &copy);
        let mut execs = 0;
        // CPU time (user + sys from wait4) of each exec, in order, to set beside what the
        // daemon measured for it.
        let mut cpu: Vec<f64> = Vec::new();
        let end = loop {
            cpu.push(programs::time_run(&served, &args).1);
            execs += 1;
            let b = daemon.binary_named(&name).unwrap_or(Value::Null);
            match stage_key(&b).as_deref() {
                Some("serving_optimized") => {
                    promoted += 1;
                    break format!("PROMOTED: {}", stage_text(&b));
                }
                Some("serving_original" | "crashed") => {
                    rejected += 1;
                    break format!("rejected: {}", stage_text(&b));
                }
                _ if execs >= max_execs => {
                    undecided += 1;
                    break format!("undecided after {execs} execs: {}", stage_text(&b));
                }
                _ => {}
            }
        };
        // The daemon's measured runs of this binary (the last `execs` are the loop's), with
        // the arm each got: the share, how often an exec got the same arm as the one before
        // (antithetic pairs of draws: about 25%, never within a pair), and per arm the
        // median CPU time the daemon measured (task-clock) and the one wait4 gave here, as
        // ratios variant/original.
        std::thread::sleep(Duration::from_millis(500)); // the daemon stores runs in bursts
        let rows = measured_runs(&state, &file);
        let rows = &rows[rows.len().saturating_sub(execs)..];
        let arms: Vec<bool> = rows.iter().map(|r| r.0).collect();
        let to_variant = arms.iter().filter(|a| **a).count();
        let same_as_previous = arms.windows(2).filter(|w| w[0] == w[1]).count();
        let mine = &cpu[cpu.len() - rows.len()..];
        let ratio = |xs: Vec<(bool, f64)>| {
            let med = |arm: bool| {
                let mut v: Vec<f64> = xs.iter().filter(|x| x.0 == arm).map(|x| x.1).collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
            };
            med(true) / med(false)
        };
        let daemon_ratio = ratio(rows.iter().map(|r| (r.0, r.1)).collect());
        let wait4_ratio = ratio(arms.iter().copied().zip(mine.iter().copied()).collect());
        report.push(format!(
            "  trial {trial} (variant {vid}): {execs} execs, {} measured, {to_variant} to the \
             variant; {:.0}% got the same arm as the exec before; median CPU variant/original: \
             {daemon_ratio:.3} measured by the daemon, {wait4_ratio:.3} by wait4; {end}",
            rows.len(),
            100.0 * same_as_previous as f64 / (rows.len().max(2) - 1) as f64
        ));
        for e in policy_events(&state, &file) {
            report.push(format!("    {e}"));
        }
    }
    report.push(format!(
        "  real: {promoted} promoted / {} trials ({rejected} rejected, {undecided} undecided), {:.0} s",
        plan.equal_speed_trials,
        t0.elapsed().as_secs_f64()
    ));
    let sim = run_trials(&SimSpec::default(), &plan.policy(), 2000, 7);
    report.push(format!(
        "  simulated (optbin::policy::sim, noise sigma 0.15, 5% outliers, same settings): \
         {} promoted / {} trials ({:.2}%), median {} execs to a decision",
        sim.promoted,
        sim.trials,
        100.0 * sim.promotion_rate(),
        sim.median_execs_to_decision
    ));
    daemon.stop();
}

fn main() {
    bench::run("bench_pipeline", bench_pipeline);
}

fn bench_pipeline() {
    let plan = Plan::new();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-optimizer");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = common::open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let t0 = Instant::now();
    let mut programs = vec![build_lua(&cache, &root)];
    if plan.aa_only {
        let mut report = Vec::new();
        equal_speed_trials(&plan, &programs[0], &root, &mut report);
        println!("\n{}\ntotal {:.0} s", report.join("\n"), t0.elapsed().as_secs_f64());
        return;
    }
    if !quick() {
        programs.push(build_sqlite(&cache));
    }
    println!(
        "\nbench_pipeline ({} mode): profile at {} Hz, mature at {} samples; policy min_runs {}, \
         looks {}",
        if quick() { "quick" } else { "full" },
        plan.frequency_hz,
        plan.min_samples,
        plan.policy_min_runs,
        plan.policy_looks
    );
    let mut report = Vec::new();
    let mut not_built = Vec::new();
    for prog in &programs {
        if !pipeline(&plan, prog, &root, &mut report) {
            not_built.push(prog.name);
        }
        report.push(String::new());
    }
    equal_speed_trials(&plan, &programs[0], &root, &mut report);
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{}\ntotal {:.0} s", report.join("\n"), t0.elapsed().as_secs_f64()).unwrap();
    assert!(not_built.is_empty(), "the daemon built no variant of {not_built:?} (see above)");
}

//! The proof benchmark of the whole pipeline with the DEFAULT configuration (issue 12):
//! real programs sit in a temp overlay dir behind the real daemon (`optbin mount
//! --foreground`, an empty config file: every setting at its default) and run through
//! `<mnt>/bin/NAME`, one after another, until the policy decides. Per program it prints:
//! - the stages as status.json showed them, each with the runs and minutes since the first
//!   run (instrumented variant, profile mature, variant stored, canary, the decision), and
//!   the minutes and runs from the first run to the served variant;
//! - in full mode, once a variant is served, the program keeps running until the flag
//!   search has canaried its challengers against it (`OPTBIN_BENCH_FLAG_SEARCH=0` skips
//!   this), so that what is measured is the search's winner; every flag set's outcome;
//! - then, after a restart of the daemon without the profiler (so that no rebuild from the
//!   growing profile starts a new canary in the middle), CPU time (user + sys, wait4) of
//!   interleaved rounds, every arm once per round in a rotating order: the original run
//!   directly, the path through the mount (what the policy serves), the served variant's
//!   bytes run directly, BOLT run by hand with the same BOLT version and the daemon's own
//!   flags from a sampled profile (perf record cpu-clock + perf2bolt) and from an
//!   instrumentation profile (one run of the workload), and the original once more (the
//!   A/A control); each as the median ratio to the round's original with a 95% interval of
//!   the median (distribution-free, from order statistics);
//! - the same for a second workload the profile never saw (mount vs original, and A/A);
//! - for a program BOLT does not speed up (ripgrep built with `--emit-relocs`): what was
//!   served and that it is not slower;
//! - in full mode, the upgrade case: Lua rebuilt with a few functions changed is renamed
//!   over the optimized original; the runs and minutes until the policy decides about the
//!   new version, how many functions BOLT matched from the old version's profile, and the
//!   new version's served ratio against its own original (with its A/A control).
//!
//! Run: `integration/bench.sh bench_pipeline` (full mode, about an hour; or
//! `cargo bench --bench bench_pipeline`).
//! `OPTBIN_BENCH_QUICK=1`: Lua only, 15 rounds. `OPTBIN_BENCH_ROUNDS=N` sets the rounds.
//!
//! `OPTBIN_BENCH_AA_TRIALS=N`: only equal-speed canaries (a byte-identical copy placed as a
//! variant), N of them, with the policy's default settings, next to the policy's simulation.

#[path = "common/bench.rs"]
mod bench;

#[path = "common/mod.rs"]
mod common;
#[path = "common/programs.rs"]
mod programs;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use optbin::bolt::flags::bolt_args;
use optbin::bolt::ladder::{Next, Rung, next_rung};
use optbin::bolt::perf2bolt::perf_to_fdata;
use optbin::bolt::{BoltMode, BoltPlan, BoltTool, FailureKind, ProfileInput, discover};
use optbin::catalog::base::{NewVariant, VariantKind, VariantState, insert_variant};
use optbin::policy::PolicyConfig;
use optbin::policy::sim::{SimSpec, run_trials};
use optbin::store::VariantStore;
use programs::{Program, build_lua, build_lua_with, crate_sources, gcc, quick, time_run};
use serde_json::Value;

/// The equal-speed trials' settings: the policy's defaults.
struct AaPlan {
    policy_min_runs: usize,
    policy_looks: u32,
    equal_speed_trials: usize,
}

impl AaPlan {
    fn policy(&self) -> PolicyConfig {
        PolicyConfig::default()
    }

    fn config(&self, _scratch: &Path, _profile: bool) -> String {
        "[profile]\nenabled = false\ninstrumentation = \"off\"\n\n[policy]\nrescan_ms = 200\n"
            .to_string()
    }
}

/// A program of the benchmark: the binary, its training workload (what runs through the
/// mount until the policy decides) and a second workload the profile never sees.
struct Bench {
    name: &'static str,
    bin: PathBuf,
    train: Vec<String>,
    unseen: Vec<String>,
    /// Whether BOLT is expected to help (hand-run BOLT variants are built and measured).
    hand_bolt: bool,
    /// A second build of the program with a few functions changed, for the upgrade case
    /// (full mode): renamed over the served original once the pipeline is done.
    upgrade: Option<Upgrade>,
}

/// The upgrade case's second build and what differs.
struct Upgrade {
    bin: PathBuf,
    change: &'static str,
}

/// A Lua workload unlike the training one (closures, coroutines, string building, floats).
const LUA_UNSEEN: &str = r#"
local N = N or 1
local acc = 0
for r = 1, N do
  local co = coroutine.wrap(function() for i = 1, 20000 do coroutine.yield(i * r) end end)
  for _ = 1, 20000 do acc = acc + co() % 7 end
  local fs = {}
  for i = 1, 2000 do fs[i] = function(x) return x * i + r end end
  for i = 1, #fs do acc = acc + fs[i](i) % 11 end
  local b = {}
  for i = 1, 4000 do b[#b + 1] = string.rep("ab", i % 5) .. string.char(65 + i % 26) end
  acc = acc + #table.concat(b):lower()
  local x = 0.5
  for i = 1, 50000 do x = math.sin(x) * 0.9 + math.sqrt(i) * 1e-6 end
  acc = acc + math.floor(x * 1000)
end
print(acc)
"#;

/// The SQLite driver of `common/programs.rs` plus a second mode: with a file argument it
/// runs that file's SQL once per round (the unseen workload).
const SQLITE_DRIVER2: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include "sqlite3.h"
static unsigned long long acc;
static int collect(void *u, int n, char **v, char **names) {
    (void)u; (void)names;
    for (int i = 0; i < n; i++) for (const char *p = v[i] ? v[i] : ""; *p; p++) acc = acc * 31 + (unsigned char)*p;
    return 0;
}
static void exec(sqlite3 *db, const char *sql) {
    char *err = 0;
    if (sqlite3_exec(db, sql, collect, 0, &err) != SQLITE_OK) { fprintf(stderr, "%s: %s\n", sql, err); exit(1); }
}
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb"); if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    char *s = malloc(n + 1); if (fread(s, 1, n, f) != (size_t)n) exit(2); s[n] = 0; fclose(f); return s;
}
int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    sqlite3 *db;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK) return 1;
    if (argc > 2) {
        char *sql = slurp(argv[2]);
        for (int r = 0; r < rounds; r++) exec(db, sql);
        sqlite3_close(db);
        printf("%llu\n", acc);
        return 0;
    }
    exec(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL)");
    exec(db, "CREATE INDEX ta ON t(a)");
    sqlite3_stmt *ins;
    if (sqlite3_prepare_v2(db, "INSERT INTO t(a, b, c) VALUES (?1, ?2, ?3)", -1, &ins, 0) != SQLITE_OK) return 1;
    for (int r = 0; r < rounds; r++) {
        exec(db, "BEGIN");
        for (int i = 0; i < 5000; i++) {
            char name[32];
            snprintf(name, sizeof name, "name%d", (i * 13 + r) % 1000);
            sqlite3_bind_int(ins, 1, (i * 7919 + r) % 10007);
            sqlite3_bind_text(ins, 2, name, -1, SQLITE_TRANSIENT);
            sqlite3_bind_double(ins, 3, i * 0.5);
            if (sqlite3_step(ins) != SQLITE_DONE) return 1;
            sqlite3_reset(ins);
        }
        exec(db, "COMMIT");
        exec(db, "SELECT b, count(*), sum(c) FROM t GROUP BY b ORDER BY 2 DESC, 1 LIMIT 5");
        exec(db, "SELECT count(*) FROM t WHERE b LIKE 'name1%'");
        exec(db, "SELECT sum(a) FROM t WHERE a BETWEEN 100 AND 5000");
        exec(db, "UPDATE t SET c = c + 1 WHERE id % 3 = 0");
        exec(db, "DELETE FROM t WHERE id % 5 = 0");
        exec(db, "SELECT a, b FROM t ORDER BY c DESC LIMIT 3");
    }
    sqlite3_finalize(ins);
    sqlite3_close(db);
    printf("%llu\n", acc);
    return 0;
}
"#;

/// The unseen SQLite workload: recursive CTEs, window functions, joins, string functions,
/// none of which the training workload runs.
const SQLITE_UNSEEN: &str = "
DROP TABLE IF EXISTS u; DROP TABLE IF EXISTS v;
CREATE TABLE u(k INTEGER PRIMARY KEY, g INTEGER, s TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
  INSERT INTO u SELECT i, i % 97, printf('%08x-%s', i * 2654435761 % 4294967296, hex(i)) FROM n;
CREATE TABLE v AS SELECT g, count(*) AS c, group_concat(substr(s, 1, 3), '') AS t FROM u GROUP BY g;
SELECT g, sum(k) OVER (PARTITION BY g ORDER BY k ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) FROM u
  WHERE k % 50 = 0 ORDER BY 2 DESC LIMIT 5;
SELECT count(*), max(length(v.t)) FROM u JOIN v ON u.g = v.g WHERE instr(u.s, 'a') > 0;
SELECT upper(s), replace(s, '0', 'z') FROM u WHERE k % 997 = 1;
";

fn build_sqlite2(cache: &Path, work: &Path) -> Bench {
    let src = crate_sources(
        "libsqlite3-sys-",
        "libsqlite3-sys = { version = \"*\", features = [\"bundled\"] }",
    );
    let dir = src.join("sqlite3");
    let driver = cache.join("sqldrv2.c");
    std::fs::write(&driver, SQLITE_DRIVER2).unwrap();
    let mut args: Vec<String> = [
        "-O2",
        "-g0",
        "-DSQLITE_THREADSAFE=0",
        "-DSQLITE_OMIT_LOAD_EXTENSION",
        "-Wl,--emit-relocs",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("-I{}", dir.display()));
    args.push(driver.display().to_string());
    args.push(dir.join("sqlite3.c").display().to_string());
    args.push("-lm".into());
    let bin = cache.join(format!("sqlite2-bench-{}", src.file_name().unwrap().to_string_lossy()));
    gcc(&bin, &args);
    let sql = work.join("unseen.sql");
    std::fs::write(&sql, SQLITE_UNSEEN).unwrap();
    std::fs::set_permissions(&sql, std::fs::Permissions::from_mode(0o644)).unwrap();
    Bench {
        name: "sqlite",
        bin,
        train: vec!["20".into()],
        unseen: vec!["3".into(), sql.display().to_string()],
        hand_bolt: true,
        upgrade: None,
    }
}

/// Lua's upgrade: the same sources rebuilt with a different C-stack limit, which changes
/// the functions that check it (a handful in ldo.c, lstate.c and lparser.c) and nothing
/// else; the output is the same.
const LUA_UPGRADE_DEFINE: &str = "-DLUAI_MAXCCALLS=250";

fn lua_bench(cache: &Path, work: &Path) -> Bench {
    let Program { bin, measure, .. } = build_lua(cache, work);
    let upgrade = (!quick()).then(|| Upgrade {
        bin: build_lua_with(cache, work, &[LUA_UPGRADE_DEFINE]).bin,
        change: "rebuilt with -DLUAI_MAXCCALLS=250 (the functions that check the C-stack limit)",
    });
    let script = work.join("unseen.lua");
    std::fs::write(&script, LUA_UNSEEN).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    Bench {
        name: "lua",
        bin,
        train: measure,
        unseen: vec![script.display().to_string(), "8".into()],
        hand_bolt: true,
        upgrade,
    }
}

/// ripgrep built with `--emit-relocs` (cached; `cargo install` the first time), searching
/// the cargo registry's sources; None when it cannot be built.
fn ripgrep_bench(cache: &Path) -> Option<Bench> {
    let root = cache.join("ripgrep");
    let bin = root.join("bin/rg");
    if !bin.exists() {
        let st = Command::new("cargo")
            .args(["install", "ripgrep", "--locked", "--root"])
            .arg(&root)
            .env("RUSTFLAGS", "-C link-arg=-Wl,--emit-relocs")
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
    }
    let corpus = programs::registry_dir("libsqlite3-sys-")?.parent()?.to_path_buf();
    Some(Bench {
        name: "rg",
        bin,
        train: vec![
            "-j1".into(),
            "-c".into(),
            r"fn [a-z_]+\(".into(),
            corpus.display().to_string(),
        ],
        unseen: vec![
            "-j1".into(),
            "-c".into(),
            r"\b[A-Z][a-z]+Error\b".into(),
            corpus.display().to_string(),
        ],
        hand_bolt: false,
        upgrade: None,
    })
}

/// The policy's stage of a status.json binary entry: `collecting`, `canary`,
/// `serving_optimized`, ... (the serde tag of `optbin::policy::Stage`).
fn stage_key(binary: &Value) -> Option<String> {
    Some(common::stage_key(binary)).filter(|k| !k.is_empty())
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

impl Milestone {
    /// The milestone as a report line, indented by `indent`.
    fn line(&self, indent: &str) -> String {
        format!(
            "{indent}{:<22} after {:>4} runs, {:>5.1} min   {}",
            self.what,
            self.runs,
            self.secs / 60.0,
            self.detail
        )
    }
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

fn run_quiet(bin: &Path, args: &[String]) -> bool {
    Command::new(bin).args(args).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Median of `xs` with a distribution-free 95% interval (order statistics around n/2).
fn median_ci(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (v[n / 2], v[lo], v[hi])
}

fn ratio_text(xs: &[f64]) -> String {
    let (m, lo, hi) = median_ci(xs);
    format!("{m:.3} [{lo:.3}, {hi:.3}]")
}

/// One arm of the measurement rounds.
struct Arm {
    label: String,
    bin: PathBuf,
    args: Vec<String>,
}

/// `rounds` rounds, each running every arm once (order rotating by round) after one run of
/// the base (the original, same args as the arm). Returns per arm the ratios
/// arm CPU / base CPU and arm wall / base wall of each round; the first arm is the base
/// itself and is not returned.
fn interleaved(arms: &[Arm], rounds: usize) -> Vec<(Vec<f64>, Vec<f64>)> {
    for a in arms {
        time_run(&a.bin, &a.args); // warm the page cache
    }
    let mut out = vec![(Vec::new(), Vec::new()); arms.len()];
    for r in 0..rounds {
        let mut times = vec![(0.0, 0.0); arms.len()];
        for k in 0..arms.len() {
            let i = (k + r) % arms.len();
            times[i] = time_run(&arms[i].bin, &arms[i].args);
        }
        for i in 0..arms.len() {
            // Each arm against the base of its own workload (the arm's args).
            let base = arms.iter().position(|b| b.args == arms[i].args).unwrap();
            out[i].0.push(times[i].1 / times[base].1);
            out[i].1.push(times[i].0 / times[base].0);
        }
    }
    out
}

fn bolt_tool() -> BoltTool {
    discover(None).tool().cloned().expect("BOLT is installed")
}

/// `llvm-bolt` run by hand on `bin` with the daemon's own flags for `profile` (retrying
/// with `-skip-funcs` when BOLT names a function it failed on, as the daemon's ladder
/// does). Returns the output file.
fn hand_bolt(tool: &BoltTool, bin: &Path, profile: ProfileInput, out: &Path) -> Option<PathBuf> {
    let mut rung = Rung::first(BoltPlan {
        mode: BoltMode::Relocations,
        split_functions: !matches!(profile, ProfileInput::Instrument { .. }),
        skip_funcs: vec![],
        profile,
        flag_set: &optbin::bolt::flags::DEFAULT_SET,
    });
    for _ in 0..6 {
        let fdata = match &rung.plan.profile {
            ProfileInput::Fdata(p) => Some(p.clone()),
            _ => None,
        };
        let args = bolt_args(&rung.plan, bin, out, fdata.as_deref());
        let res = Command::new(&tool.llvm_bolt).args(&args).output().unwrap();
        if res.status.success() {
            return Some(out.to_path_buf());
        }
        let tail = String::from_utf8_lossy(&res.stderr).to_string()
            + &String::from_utf8_lossy(&res.stdout);
        match next_rung(&rung, &FailureKind::ExitCode(1), &tail) {
            Next::Retry(r) if r.plan.mode == BoltMode::Relocations => rung = r,
            _ => {
                println!("  hand-run BOLT failed: {}", tail.lines().last().unwrap_or(""));
                return None;
            }
        }
    }
    None
}

/// BOLT by hand from an instrumentation profile of one run of the workload, and from a
/// sampled profile (perf record cpu-clock at 20 kHz over 5 runs of the workload, about the
/// 100k samples below which sampled profiles hurt here, + perf2bolt).
fn hand_variants(b: &Bench, dir: &Path, report: &mut Vec<String>) -> Vec<(String, PathBuf)> {
    let tool = bolt_tool();
    let mut out = Vec::new();
    let instr_bin = dir.join(format!("{}.instr", b.name));
    let instr_fdata = dir.join(format!("{}.instr.fdata", b.name));
    let plan = ProfileInput::Instrument {
        profile_file: instr_fdata.clone(),
        append_pid: false,
        binpath: None,
    };
    if hand_bolt(&tool, &b.bin, plan, &instr_bin).is_some()
        && run_quiet(&instr_bin, &b.train)
        && instr_fdata.exists()
    {
        let o = dir.join(format!("{}.bolt-instr", b.name));
        if hand_bolt(&tool, &b.bin, ProfileInput::Fdata(instr_fdata), &o).is_some() {
            out.push((format!("hand-run BOLT {}, instrumentation (1 run)", tool.version), o));
        }
    }
    let perf = dir.join(format!("{}.perf", b.name));
    let script = "for i in 1 2 3 4 5; do \"$0\" \"$@\" >/dev/null || exit 1; done";
    let st = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "20000", "-o"])
        .arg(&perf)
        .args(["--", "sh", "-c", script])
        .arg(&b.bin)
        .args(&b.train)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let fdata = dir.join(format!("{}.sampled.fdata", b.name));
    if st.success() && perf_to_fdata(&tool, &b.bin, &perf, &fdata).is_ok() {
        let o = dir.join(format!("{}.bolt-sampled", b.name));
        if hand_bolt(&tool, &b.bin, ProfileInput::Fdata(fdata), &o).is_some() {
            out.push((format!("hand-run BOLT {}, sampled (5 runs, 20 kHz)", tool.version), o));
        }
    } else {
        report.push("  hand-run sampled profile failed".into());
    }
    out
}

/// Runs the training workload through the mount (`served`) until the status entry of
/// `name` satisfies `done` (Ok with it) or `deadline` passes (Err with the last entry seen),
/// printing where the pipeline is every 30 s. `runs` counts every run; `t0` is the first.
#[allow(clippy::too_many_arguments)]
fn run_until(
    daemon: &Daemon,
    served: &Path,
    b: &Bench,
    name: &str,
    runs: &AtomicUsize,
    t0: Instant,
    deadline: Instant,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, Option<Value>> {
    let mut last_print = Instant::now();
    loop {
        run_quiet(served, &b.train);
        runs.fetch_add(1, Ordering::SeqCst);
        let entry = daemon.binary_named(name);
        if let Some(e) = &entry {
            if done(e) {
                std::thread::sleep(Duration::from_millis(300));
                return Ok(daemon.binary_named(name).unwrap_or_else(|| e.clone()));
            }
            if last_print.elapsed() > Duration::from_secs(30) {
                println!(
                    "  [{name}] {:>4} runs, {:>5.1} min: {}",
                    runs.load(Ordering::SeqCst),
                    t0.elapsed().as_secs_f64() / 60.0,
                    stage_text(e)
                );
                last_print = Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err(entry);
        }
    }
}

/// Reports how `run_until` ended (the decision, or none within `budget`), after `runs`
/// runs and minutes; returns whether a variant was served.
fn report_decision(
    prefix: &str,
    outcome: &Result<Value, Option<Value>>,
    (runs, mins): (usize, f64),
    budget: Duration,
    report: &mut Vec<String>,
) -> bool {
    match outcome {
        Ok(e) => {
            let promoted = stage_key(e).as_deref() == Some("serving_optimized");
            report.push(format!(
                "{prefix}DECIDED after {runs} runs, {mins:.1} min from the first run: {}{}",
                stage_text(e),
                if promoted { " (variant SERVED)" } else { "" }
            ));
            promoted
        }
        Err(e) => {
            report.push(format!(
                "{prefix}NOT DECIDED within {:.0} min ({runs} runs): {}",
                budget.as_secs_f64() / 60.0,
                e.as_ref().map(stage_text).unwrap_or_else(|| "(not in status)".into())
            ));
            false
        }
    }
}

/// The flag search's line in status: what it does next ("done: ..." once it has ended).
fn search_next(b: &Value) -> String {
    b["details"]["optimizer"]["flag_search"]["next"].as_str().unwrap_or("").to_string()
}

/// Whether the flag search has nothing left to do for the binary: it ended, is off, or
/// nothing is served to challenge; and no challenger is being built or measured.
fn search_settled(b: &Value) -> bool {
    let next = search_next(b);
    let idle = b["details"]["optimizer"]["flag_search"]["current"].is_null();
    idle && (next.starts_with("done")
        || next.starts_with("off")
        || next.contains("no BOLT variant"))
}

/// One program through the whole pipeline with the default configuration; its report rows
/// appended to `report`. Returns whether a variant was served.
fn pipeline(b: &Bench, root: &Path, rounds: usize, report: &mut Vec<String>) -> bool {
    let overlay = root.join(format!("{}-bin", b.name));
    std::fs::create_dir_all(&overlay).unwrap();
    let name = format!("{}-bench", b.name);
    let original = overlay.join(&name);
    std::fs::copy(&b.bin, &original).unwrap();
    std::fs::set_permissions(&original, std::fs::Permissions::from_mode(0o755)).unwrap();
    // An empty config file: every setting at its default.
    let config = root.join(format!("{}-config.toml", b.name));
    std::fs::write(&config, "").unwrap();
    let mnt = root.join(format!("{}-mnt", b.name));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut daemon =
        Daemon::start(&mnt, &[&overlay], &root.join(format!("{}-state", b.name)), Some(&config));
    let served = daemon.bin().join(&name);

    let runs = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let poller = Poller::start(mnt.join(".optbin/status.json"), name.clone(), runs.clone(), t0);
    let budget = Duration::from_secs(if quick() { 900 } else { 1500 });
    let outcome = run_until(&daemon, &served, b, &name, &runs, t0, t0 + budget, decided);
    let (total_runs, total_min) = (runs.load(Ordering::SeqCst), t0.elapsed().as_secs_f64() / 60.0);
    let milestones = poller.finish();
    report.push(format!(
        "{name}: default configuration, runs through the mount ({} per run)",
        b.train.join(" ")
    ));
    report.extend(milestones.iter().map(|m| m.line("  ")));
    let served_variant = report_decision("  ", &outcome, (total_runs, total_min), budget, report);
    // Full mode: keep the program running while the flag search challenges the served
    // variant (each challenger is canaried against it like any variant), until the search
    // has ended, so that what is measured below is the search's winner.
    let search_runs = served_variant
        && !quick()
        && std::env::var("OPTBIN_BENCH_FLAG_SEARCH").map_or(true, |v| v != "0");
    if search_runs {
        let (runs0, s0) = (runs.load(Ordering::SeqCst), Instant::now());
        let budget = Duration::from_secs(2400);
        let searched =
            run_until(&daemon, &served, b, &name, &runs, t0, s0 + budget, search_settled);
        let after = runs.load(Ordering::SeqCst) - runs0;
        let mins = s0.elapsed().as_secs_f64() / 60.0;
        report.push(match searched {
            Ok(e) => format!(
                "  FLAG SEARCH ended after {after} more runs, {mins:.1} min: {}; serving: {}",
                search_next(&e),
                stage_text(&e)
            ),
            Err(e) => format!(
                "  FLAG SEARCH not ended within {:.0} min ({after} more runs): {}",
                budget.as_secs_f64() / 60.0,
                e.as_ref().map(search_next).unwrap_or_default()
            ),
        });
    }
    let final_entry = daemon.binary_named(&name).unwrap_or(Value::Null);
    for v in final_entry["variants"].as_array().into_iter().flatten() {
        report.push(format!(
            "  variant {} ({}): {}, {} KiB, flags {}",
            v["id"],
            v["kind"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["size"].as_u64().unwrap_or(0) / 1024,
            v["flags"].as_str().unwrap_or("-")
        ));
    }
    for e in policy_events(&daemon.state, &original) {
        report.push(format!("    {e}"));
    }
    // The flag search (docs/policy.md): every flag set tried on this binary so far, with its
    // outcome, and what the search does next (it starts once a variant is served).
    let search = &final_entry["details"]["optimizer"]["flag_search"];
    report.push(format!("  flag search: {}", search["next"].as_str().unwrap_or("(not in status)")));
    for t in search["tried"].as_array().into_iter().flatten() {
        report.push(format!(
            "    {:<16} {}: {} {}",
            t["flag_set"].as_str().unwrap_or("?"),
            if t["challenger"] == true { "challenger" } else { "first build" },
            t["outcome"].as_str().unwrap_or("?"),
            t["detail"].as_str().unwrap_or("")
        ));
    }

    // Measurement: restarted without the profiler, the decision stays in the catalog.
    std::fs::write(&config, "[profile]\nenabled = false\n").unwrap();
    daemon.restart();
    let frozen = daemon.binary_named(&name).unwrap_or(Value::Null);
    report.push(format!(
        "  measured after a restart without the profiler; the mount serves: {} ({})",
        frozen["served"].as_str().unwrap_or("?"),
        stage_text(&frozen)
    ));
    let variants = frozen["variants"].as_array().cloned().unwrap_or_default();
    let variant = variants
        .iter()
        .filter(|v| v["kind"] != "instrumented")
        .find(|v| v["state"] == "served")
        .and_then(|v| v["store_path"].as_str().map(PathBuf::from))
        .filter(|p| p.exists());
    let arm = |label: &str, bin: &Path, args: &[String]| Arm {
        label: label.to_string(),
        bin: bin.to_path_buf(),
        args: args.to_vec(),
    };
    let mut arms = vec![
        arm("original (base)", &original, &b.train),
        arm("through the mount (served)", &served, &b.train),
        arm("A/A: original again", &original, &b.train),
    ];
    if let Some(v) = &variant {
        arms.push(arm("served variant's bytes, run directly", v, &b.train));
    }
    if b.hand_bolt {
        let dir = root.join(format!("{}-hand", b.name));
        std::fs::create_dir_all(&dir).unwrap();
        for (label, file) in hand_variants(b, &dir, report) {
            arms.push(arm(&label, &file, &b.train));
        }
    }
    let unseen_base = arms.len();
    arms.push(arm("unseen workload: original (base)", &original, &b.unseen));
    arms.push(arm("unseen workload: through the mount", &served, &b.unseen));
    arms.push(arm("unseen workload: A/A original again", &original, &b.unseen));
    let results = interleaved(&arms, rounds);
    report.push(format!(
        "  CPU time ratio to the original, median [95% interval], {rounds} interleaved rounds; \
         wall median in brackets; below 1 is faster:"
    ));
    for (i, a) in arms.iter().enumerate() {
        if i == 0 || i == unseen_base {
            continue;
        }
        let (cpu, wall) = &results[i];
        report.push(format!(
            "    {:<48} cpu {}   (wall {:.3})",
            a.label,
            ratio_text(cpu),
            median_ci(wall).0
        ));
    }
    if variant.is_some() {
        // The mount against the same bytes run directly, per round.
        let (m, v) = (&results[1].0, &results[3].0);
        let per_round: Vec<f64> = m.iter().zip(v).map(|(m, v)| m / v).collect();
        report.push(format!(
            "    {:<48} cpu {}",
            "through the mount / same bytes run directly",
            ratio_text(&per_round)
        ));
    }
    bolt_report(&mnt, &name, &outcome, served_variant, report);
    if let Some(up) = &b.upgrade {
        upgrade_case(&mut daemon, &config, &original, b, up, rounds, report);
    }
    daemon.stop();
    served_variant
}

/// The upgrade case (issue 12): with the default configuration again, the second build is
/// renamed over the original the pipeline optimized, and the workload runs through the
/// mount until the policy decides about the new version. Reports how many functions BOLT
/// matched from the old version's profile, the runs and minutes to the decision, and the
/// new version's served CPU-time ratio against its own original, side by side.
fn upgrade_case(
    daemon: &mut Daemon,
    config: &Path,
    original: &Path,
    b: &Bench,
    up: &Upgrade,
    rounds: usize,
    report: &mut Vec<String>,
) {
    use sha2::{Digest, Sha256};
    let name = original.file_name().unwrap().to_string_lossy().to_string();
    let served = daemon.bin().join(&name);
    report.push(format!("  UPGRADE: {}", up.change));
    std::fs::write(config, "").unwrap();
    daemon.restart();
    let staged = original.with_extension("upgrade");
    std::fs::copy(&up.bin, &staged).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, original).unwrap();
    let new_sha = hex::encode(Sha256::digest(std::fs::read(original).unwrap()));
    let is_new = |e: &Value| e["sha256"].as_str() == Some(new_sha.as_str());
    // The first run of the new version; the milestones start once status shows it.
    let t0 = Instant::now();
    run_quiet(&served, &b.train);
    let runs = Arc::new(AtomicUsize::new(1));
    daemon.wait_for(Duration::from_secs(60), "the new version in status", |d| {
        d.binary_named(&name).filter(|e| is_new(e))
    });
    let poller =
        Poller::start(daemon.mnt.join(".optbin/status.json"), name.clone(), runs.clone(), t0);
    let budget = Duration::from_secs(1500);
    let outcome =
        run_until(daemon, &served, b, &name, &runs, t0, t0 + budget, |e| is_new(e) && decided(e));
    let (total_runs, total_min) = (runs.load(Ordering::SeqCst), t0.elapsed().as_secs_f64() / 60.0);
    report.extend(poller.finish().iter().map(|m| m.line("    ")));
    // BOLT's own count of what the old profile matched, as the daemon logged it.
    let conn = common::daemon::catalog_read_only(&daemon.state);
    let bridge: Vec<String> = conn
        .prepare(
            "SELECT detail FROM events WHERE kind = 'bolt' AND path = ?1 \
             AND detail LIKE 'built from the stale profile%' ORDER BY id",
        )
        .unwrap()
        .query_map([original.to_string_lossy()], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(conn);
    if bridge.is_empty() {
        report.push("    no variant was built from the old version's profile".into());
    }
    for line in &bridge {
        report.push(format!("    {line}"));
    }
    let promoted =
        report_decision("    new version ", &outcome, (total_runs, total_min), budget, report);
    std::fs::write(config, "[profile]\nenabled = false\n").unwrap();
    daemon.restart();
    let entry = daemon.binary_named(&name).unwrap_or(Value::Null);
    let variant = entry["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["kind"] != "instrumented")
        .find(|v| v["state"] == "served")
        .and_then(|v| v["store_path"].as_str().map(PathBuf::from))
        .filter(|p| p.exists());
    let arm = |label: &str, bin: &Path| Arm {
        label: label.to_string(),
        bin: bin.to_path_buf(),
        args: b.train.clone(),
    };
    let mut arms = vec![
        arm("new version: original (base)", original),
        arm("new version: through the mount", &served),
        arm("new version: A/A original again", original),
    ];
    if let Some(v) = &variant {
        arms.push(arm("new version: served variant's bytes, directly", v));
    }
    let results = interleaved(&arms, rounds);
    report.push(format!(
        "    CPU time ratio to the new original, median [95% interval], {rounds} interleaved \
         rounds{}:",
        if promoted { "" } else { " (no variant of the new version is served)" }
    ));
    for (i, a) in arms.iter().enumerate().skip(1) {
        report.push(format!("      {:<48} cpu {}", a.label, ratio_text(&results[i].0)));
    }
}

/// `optbin report --json --mount MNT` at the end of a program's pipeline: printed, and
/// checked to list the program with its figures (a decided program's variants with the
/// policy's verdict; a promoted one with its real-run CPU ratio).
fn bolt_report(
    mnt: &Path,
    name: &str,
    outcome: &Result<Value, Option<Value>>,
    promoted: bool,
    report: &mut Vec<String>,
) {
    let out = Command::new(common::daemon::OPTBIN)
        .args(["report", "--json", "--mount"])
        .arg(mnt)
        .output()
        .expect("running optbin report");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "optbin report: {out:?}");
    println!("optbin report --json --mount {}:\n{stdout}", mnt.display());
    let r: Value = serde_json::from_str(&stdout).expect("the report is JSON");
    let bins = r["binaries"].as_array().cloned().unwrap_or_default();
    let Some(b) = bins.iter().find(|b| b["name"] == name) else {
        // The report lists the binaries the optimizer built for: one that never became a
        // candidate (ripgrep here) is rightly absent; one that was decided must be there.
        assert!(outcome.is_err(), "optbin report does not list {name}: {r:#}");
        report.push(format!("  optbin report: {name} not listed (nothing was built for it)"));
        return;
    };
    report.push(format!("  optbin report: {name}, cpu saved {} ns", b["cpu_saved_ns"]));
    let variants = b["variants"].as_array().cloned().unwrap_or_default();
    for v in &variants {
        let real = |k: &str| {
            v["real_runs"][k].as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
        };
        report.push(format!(
            "    variant {} ({}): verdict {}, real-run cpu ratio {} [{}, {}]",
            v["id"],
            v["state"].as_str().unwrap_or("?"),
            v["decision"]["action"].as_str().unwrap_or("none"),
            real("ratio"),
            real("low"),
            real("high")
        ));
    }
    if outcome.is_ok() && !variants.is_empty() {
        assert!(
            variants.iter().any(|v| v["decision"]["action"].is_string()),
            "{name} was decided but the report has no verdict: {b:#}"
        );
    }
    if promoted {
        let served = variants.iter().find(|v| v["state"] == "served");
        let served = served.unwrap_or_else(|| panic!("{name}: no served variant: {b:#}"));
        assert_eq!(served["decision"]["action"], "promote", "{served:#}");
        assert!(served["real_runs"]["ratio"].as_f64().is_some(), "no ratio: {served:#}");
    }
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
        kind: VariantKind::Bolt,
        sha256: stored.content.hex(),
        store_path: stored.path.to_string_lossy().into_owned(),
        size: stored.size,
        state: VariantState::Ready,
        note: Some("bench_pipeline: byte-identical copy of the original".into()),
        ..Default::default()
    };
    insert_variant(&conn, &variant, 1).unwrap()
}

/// Real canaries of equal-speed variants, a line per trial and the rate of promotions, next
/// to the policy's simulation with the same settings.
fn equal_speed_trials(plan: &AaPlan, lua: &Program, root: &Path, report: &mut Vec<String>) {
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
         {} promoted / {} trials ({:.2}%), median {:.0} execs to a decision",
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
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-optimizer");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = common::open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let t0 = Instant::now();
    if let Some(n) = std::env::var("OPTBIN_BENCH_AA_TRIALS").ok().and_then(|v| v.parse().ok()) {
        let policy = PolicyConfig::default();
        let plan = AaPlan {
            policy_min_runs: policy.min_runs_per_arm,
            policy_looks: policy.looks,
            equal_speed_trials: n,
        };
        let lua = build_lua(&cache, &root);
        let mut report = Vec::new();
        equal_speed_trials(&plan, &lua, &root, &mut report);
        println!("\n{}\ntotal {:.0} s", report.join("\n"), t0.elapsed().as_secs_f64());
        return;
    }
    let rounds = std::env::var("OPTBIN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 15 } else { 41 });
    let mut benches = vec![lua_bench(&cache, &root)];
    if !quick() {
        benches.push(build_sqlite2(&cache, &root));
    }
    println!(
        "\nbench_pipeline ({} mode): default configuration, BOLT {}",
        if quick() { "quick" } else { "full" },
        bolt_tool().version
    );
    let mut report = Vec::new();
    let mut served = Vec::new();
    let mut run = |b: &Bench, report: &mut Vec<String>| {
        if pipeline(b, &root, rounds, report) {
            served.push(b.name);
        }
        report.push(String::new());
        println!("{}", report.join("\n"));
    };
    for b in &benches {
        run(b, &mut report);
    }
    // ripgrep last: building it the first time takes long.
    if !quick() {
        match ripgrep_bench(&cache) {
            Some(rg) => run(&rg, &mut report),
            None => report.push("ripgrep could not be built: the no-gain case was skipped".into()),
        }
    }
    println!(
        "\n==== bench_pipeline summary ====\n{}\nserved a variant: {served:?}\ntotal {:.0} min",
        report.join("\n"),
        t0.elapsed().as_secs_f64() / 60.0
    );
}

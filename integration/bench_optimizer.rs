//! Benchmark: real programs built from real sources in the cargo registry (Lua 5.4 from the
//! `lua-src` crate, SQLite from the `libsqlite3-sys` amalgamation), linked with
//! `-Wl,--emit-relocs` and symbols, profiled on a CPU-heavy workload (perf record
//! cpu-clock + perf2bolt, then BOLT instrumentation), optimized through optbin's own
//! optimizer (queue, sandboxed runner, retry ladder, verification, store, catalog), and
//! measured against the original side by side: interleaved pairs (order alternating),
//! median ratio of wall times (variant / original; below 1 is faster) with min/max and
//! the interquartile range, plus BOLT's own wall time and peak memory.
//!
//! `OPTBIN_BENCH_QUICK=1`: 5 pairs and shorter profiles. `OPTBIN_BENCH_BOLT=19|22` picks
//! the BOLT version (default: the newest installed). Built programs are cached in cargo's
//! target tmp dir.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use optbin::bolt::applicability::ApplicabilityConfig;
use optbin::bolt::ladder::{Next, Rung, next_rung};
use optbin::bolt::perf2bolt::{fdata_samples, perf_to_fdata, record_cpu_clock};
use optbin::bolt::queue::OptimizerDeps;
use optbin::bolt::status::JobEnd;
use optbin::bolt::{
    BoltJob, BoltMode, BoltOutcome, BoltPlan, BoltRunner, BoltState, BoltTool, OptimizeRequest,
    OptimizerConfig, OptimizerHandle, ProfileInfo, ProfileInput, ProfileNumbers, ProfileSource,
    RequestOrigin, Sandbox, SandboxLimits, SandboxUser, SandboxedBoltRunner, SmokeCommand,
    discover, optimizer, run_optimizer,
};
use optbin::catalog::{Catalog, base, bolt_jobs};
use optbin::clock::SystemClock;
use optbin::elf::ElfFacts;
use optbin::identity::ContentId;
use optbin::store::VariantStore;
use tokio::sync::watch;

const LUA_DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include "lua.h"
#include "lualib.h"
#include "lauxlib.h"
int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: lua-bench SCRIPT [N]\n"); return 2; }
    lua_State *L = luaL_newstate();
    if (!L) return 3;
    luaL_openlibs(L);
    lua_pushinteger(L, argc > 2 ? atoi(argv[2]) : 1);
    lua_setglobal(L, "N");
    int rc = luaL_dofile(L, argv[1]);
    if (rc != LUA_OK) { fprintf(stderr, "%s\n", lua_tostring(L, -1)); lua_close(L); return 1; }
    lua_close(L);
    return 0;
}
"#;

const LUA_WORKLOAD: &str = r#"
local N = N or 1
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
local acc = 0
for r = 1, N do
  acc = acc + fib(20)
  local t = {}
  for i = 1, 20000 do t[i] = (i * 7919 + r) % 10007 end
  table.sort(t)
  local parts = {}
  for i = 1, 3000 do parts[#parts + 1] = string.format("%d:%s", i, tostring(t[i])) end
  local s = table.concat(parts, ",")
  for w in s:gmatch("%d+:") do acc = acc + #w end
  acc = acc + #s:upper() + select(2, s:gsub("1", "one"))
  local m = {}
  for i = 1, 8000 do local k = "k" .. (i % 997); m[k] = (m[k] or 0) + i end
  for k, v in pairs(m) do acc = acc + v % 13 end
  local pts = {}
  for i = 1, 3000 do pts[i] = { x = i % 17, y = i % 23 } end
  for i = 1, #pts do local p = pts[i]; acc = acc + p.x * p.y end
end
print(acc)
"#;

const SQLITE_DRIVER: &str = r#"
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
int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    sqlite3 *db;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK) return 1;
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

/// A program under test and its workload.
struct Program {
    name: &'static str,
    bin: PathBuf,
    /// Arguments of one measured run (~0.4 s).
    measure: Vec<String>,
    /// Arguments of the profiling run (longer, for enough samples).
    profile: Vec<String>,
    /// A short run for the optimizer's smoke check.
    smoke: Vec<String>,
}

fn registry_dir(prefix: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(home.join("registry/src"))
        .ok()?
        .filter_map(|e| e.ok())
        .flat_map(|index| {
            std::fs::read_dir(index.path()).into_iter().flatten().filter_map(|e| e.ok())
        })
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop()
}

/// The crate's sources in the registry, fetched through a throwaway project if missing.
fn crate_sources(prefix: &str, dependency: &str) -> PathBuf {
    if let Some(d) = registry_dir(prefix) {
        return d;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = Command::new("cargo")
        .args(["new", "-q", "--vcs", "none", "fetcher"])
        .current_dir(tmp.path())
        .status()
        .unwrap();
    assert!(st.success());
    let manifest = tmp.path().join("fetcher/Cargo.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(&format!("{dependency}\n"));
    std::fs::write(&manifest, text).unwrap();
    let st = Command::new("cargo")
        .arg("fetch")
        .current_dir(tmp.path().join("fetcher"))
        .status()
        .unwrap();
    assert!(st.success(), "cargo fetch {dependency}");
    registry_dir(prefix).unwrap_or_else(|| panic!("{prefix} sources after cargo fetch"))
}

fn gcc(out: &Path, args: &[String]) {
    if out.exists() {
        return;
    }
    let tmp = out.with_extension("building");
    let st = Command::new("gcc").arg("-o").arg(&tmp).args(args).status().unwrap();
    assert!(st.success(), "gcc {args:?}");
    std::fs::rename(&tmp, out).unwrap();
}

fn build_lua(cache: &Path, work: &Path) -> Program {
    let src = crate_sources("lua-src-", "lua-src = \"*\"");
    let lua = std::fs::read_dir(&src)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("lua-5.4")))
        .max()
        .expect("Lua 5.4 sources in lua-src");
    let driver = cache.join("luadrv.c");
    std::fs::write(&driver, LUA_DRIVER).unwrap();
    let mut args: Vec<String> =
        ["-O2", "-g0", "-DLUA_USE_POSIX", "-Wl,--emit-relocs"].map(String::from).to_vec();
    args.push(format!("-I{}", lua.display()));
    args.push(driver.display().to_string());
    let mut files: Vec<String> = std::fs::read_dir(&lua)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .filter(|p| !matches!(p.file_name().and_then(|n| n.to_str()), Some("lua.c" | "luac.c")))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    args.extend(files);
    args.push("-lm".into());
    let bin = cache.join(format!("lua-bench-{}", lua.file_name().unwrap().to_string_lossy()));
    gcc(&bin, &args);
    let script = work.join("work.lua");
    std::fs::write(&script, LUA_WORKLOAD).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = script.display().to_string();
    let quick = quick();
    Program {
        name: "lua",
        bin,
        measure: vec![s.clone(), "40".into()],
        profile: vec![s.clone(), if quick { "100" } else { "300" }.into()],
        smoke: vec![s, "3".into()],
    }
}

fn build_sqlite(cache: &Path) -> Program {
    let src = crate_sources(
        "libsqlite3-sys-",
        "libsqlite3-sys = { version = \"*\", features = [\"bundled\"] }",
    );
    let dir = src.join("sqlite3");
    let driver = cache.join("sqldrv.c");
    std::fs::write(&driver, SQLITE_DRIVER).unwrap();
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
    let bin = cache.join(format!("sqlite-bench-{}", src.file_name().unwrap().to_string_lossy()));
    gcc(&bin, &args);
    Program {
        name: "sqlite",
        bin,
        measure: vec!["20".into()],
        profile: vec![if quick() { "40" } else { "100" }.into()],
        smoke: vec!["3".into()],
    }
}

fn quick() -> bool {
    std::env::var_os("OPTBIN_BENCH_QUICK").is_some_and(|v| v != "0")
}

#[derive(Default)]
struct FileProfiles(Mutex<HashMap<i64, PathBuf>>);

impl ProfileSource for FileProfiles {
    fn write_fdata(&self, binary_id: i64, out: &Path) -> anyhow::Result<ProfileInfo> {
        let src = self.0.lock().unwrap().get(&binary_id).cloned();
        let src = src.ok_or_else(|| anyhow::anyhow!("no profile for {binary_id}"))?;
        std::fs::copy(&src, out)?;
        Ok(ProfileInfo { samples: fdata_samples(&std::fs::read_to_string(out)?) })
    }
}

/// One run: wall time and CPU time (user + system, from wait4), the latter being less
/// sensitive to other load on this shared 2-core machine.
// The child is reaped by wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn time_run(bin: &Path, args: &[String]) -> (f64, f64) {
    let t = Instant::now();
    let child = Command::new(bin).args(args).stdout(Stdio::null()).spawn().unwrap();
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(rc, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{} {args:?}",
        bin.display()
    );
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (wall, secs(ru.ru_utime) + secs(ru.ru_stime))
}

fn output(bin: &Path, args: &[String]) -> Vec<u8> {
    Command::new(bin).args(args).output().unwrap().stdout
}

/// Interleaved pairs, alternating which runs first; ratios variant/original of wall and
/// of CPU time.
fn measure(original: &Path, variant: &Path, args: &[String], pairs: usize) -> (Vec<f64>, Vec<f64>) {
    time_run(original, args);
    time_run(variant, args);
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        let (o, v) = if i % 2 == 0 {
            let o = time_run(original, args);
            (o, time_run(variant, args))
        } else {
            let v = time_run(variant, args);
            (time_run(original, args), v)
        };
        wall.push(v.0 / o.0);
        cpu.push(v.1 / o.1);
    }
    (wall, cpu)
}

fn summary((wall, cpu): (Vec<f64>, Vec<f64>)) -> String {
    let stats = |mut r: Vec<f64>| {
        r.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| r[((r.len() - 1) as f64 * p).round() as usize];
        format!(
            "median {:.3} (IQR {:.3}-{:.3}, min {:.3}, max {:.3})",
            q(0.5),
            q(0.25),
            q(0.75),
            r[0],
            r[r.len() - 1]
        )
    };
    let n = wall.len();
    format!("wall {}; cpu {}; {n} pairs", stats(wall), stats(cpu))
}

struct Optimizer {
    runner: SandboxedBoltRunner,
    catalog: Catalog,
    handle: OptimizerHandle,
    profiles: Arc<FileProfiles>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Optimizer {
    /// A whole optimizer (queue, sandboxed runner, store, catalog) under `dir`.
    fn start(tool: &BoltTool, dir: &Path) -> Self {
        let state = dir.join(format!("state-{}", tool.version));
        let catalog = Catalog::open(&state.join("catalog.db")).unwrap();
        let store = VariantStore::open(&state).unwrap();
        let scratch = dir.join(format!("scratch-{}", tool.version));
        let sandbox = Sandbox::new(&scratch, SandboxUser::resolve()).unwrap();
        let limits = SandboxLimits { timeout: Duration::from_secs(300), ..Default::default() };
        let runner = SandboxedBoltRunner::new(tool.clone(), sandbox.clone(), limits.clone());
        let profiles = Arc::new(FileProfiles::default());
        let (handle, worker) = optimizer(
            OptimizerConfig {
                applicability: ApplicabilityConfig::default(),
                limits,
                ..Default::default()
            },
            OptimizerDeps {
                catalog: catalog.clone(),
                store,
                bolt: BoltState::Found(tool.clone()),
                runner: Some(Arc::new(runner.clone())),
                sandbox,
                profiles: profiles.clone(),
                clock: Arc::new(SystemClock),
            },
        );
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(run_optimizer(worker, rx));
        Self { runner, catalog, handle, profiles, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap();
    }

    async fn build(
        &self,
        prog: &Program,
        fdata: &Path,
        origin: RequestOrigin,
    ) -> Option<base::VariantRow> {
        let content = ContentId::of_file(&prog.bin).unwrap();
        let facts = ElfFacts::read(&prog.bin).unwrap();
        let size = std::fs::metadata(&prog.bin).unwrap().len();
        let f = facts.clone();
        let id =
            self.catalog.run(move |c| base::upsert_binary(c, &content, size, &f, 1)).await.unwrap();
        self.profiles.0.lock().unwrap().insert(id, fdata.to_path_buf());
        let samples = fdata_samples(&std::fs::read_to_string(fdata).unwrap());
        let before = self.handle.status().recent.len();
        self.handle
            .submit(OptimizeRequest {
                binary_id: id,
                name: prog.name.into(),
                original: prog.bin.clone(),
                content,
                facts,
                profile: ProfileNumbers { samples, own_text_share: 0.9, front_end: None },
                origin,
                smoke: Some(SmokeCommand {
                    args: prog.smoke.clone(),
                    stdin: None,
                    timeout: Duration::from_secs(60),
                }),
            })
            .unwrap();
        let start = Instant::now();
        let status = loop {
            let s = self.handle.status();
            if s.idle() && s.recent.len() > before {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(600), "optimizer stuck");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let job = self.catalog.run(move |c| bolt_jobs::job_of(c, id)).await.unwrap().unwrap();
        println!(
            "  optimizer: {} BOLT run(s) for this binary so far, last step \"{}\", last run {} ms, peak RSS {} MiB, profile weight {}",
            job.attempts,
            job.ladder_step.unwrap_or_default(),
            job.wall_ms.unwrap_or(0),
            job.peak_rss_kib.unwrap_or(0) / 1024,
            samples
        );
        match &status.recent[0].end {
            JobEnd::Built { variant_id, .. } => {
                let vid = *variant_id;
                let vs = self.catalog.run(move |c| base::variants_of(c, id)).await.unwrap();
                vs.into_iter().find(|v| v.id == vid)
            }
            other => {
                println!("  no variant: {other:?}");
                None
            }
        }
    }
}

/// Builds an instrumented binary through the runner and the ladder, runs one measured
/// workload on it (instrumentation counts exactly: one short run is a complete profile)
/// and returns the profile it wrote.
fn instrumentation_profile(
    runner: &SandboxedBoltRunner,
    prog: &Program,
    dir: &Path,
) -> Option<PathBuf> {
    let profile_file = dir.join(format!("{}.instr.fdata", prog.name));
    let mut rung = Rung::first(BoltPlan {
        mode: BoltMode::Relocations,
        split_functions: false,
        skip_funcs: vec![],
        profile: ProfileInput::Instrument {
            profile_file: profile_file.clone(),
            append_pid: false,
            binpath: None,
        },
    });
    for _ in 0..4 {
        let job = BoltJob {
            original: prog.bin.clone(),
            expected_content: None,
            plan: rung.plan.clone(),
            cancel: Default::default(),
        };
        match runner.run(&job) {
            BoltOutcome::Ok(ok) => {
                let instrumented = dir.join(format!("{}.instrumented", prog.name));
                std::fs::copy(&ok.output, &instrumented).unwrap();
                println!(
                    "  instrumentation build: {} ms, peak RSS {} MiB, {}",
                    ok.wall.as_millis(),
                    ok.peak_rss_kib / 1024,
                    if rung.plan.skip_funcs.is_empty() {
                        "no skips".to_string()
                    } else {
                        rung.label()
                    }
                );
                let t = Instant::now();
                let want = output(&prog.bin, &prog.measure);
                let base = t.elapsed();
                let t = Instant::now();
                let got = output(&instrumented, &prog.measure);
                println!(
                    "  instrumented run: {:.2}x the original's time, same output: {}",
                    t.elapsed().as_secs_f64() / base.as_secs_f64(),
                    got == want
                );
                return profile_file.exists().then_some(profile_file);
            }
            BoltOutcome::Failed(f) => match next_rung(&rung, &f.kind, &f.tail) {
                Next::Retry(r) if r.plan.mode == BoltMode::Relocations => rung = r,
                _ => {
                    println!(
                        "  instrumentation failed: {} {}",
                        f.kind.label(),
                        f.tail.lines().last().unwrap_or("")
                    );
                    return None;
                }
            },
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_optimizer() {
    let pairs = if quick() { 5 } else { 15 };
    let tool: BoltTool = match std::env::var("OPTBIN_BENCH_BOLT") {
        Ok(v) => BoltTool::probe(Path::new(&format!("/usr/lib/llvm-{v}/bin/llvm-bolt"))).unwrap(),
        Err(_) => discover(None).tool().cloned().expect("BOLT is installed"),
    };
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-optimizer");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let opt = Optimizer::start(&tool, work.path());
    let runner = opt.runner.clone();

    println!(
        "\nbench_optimizer: BOLT {} ({}), {pairs} interleaved pairs per measurement",
        tool.version,
        tool.llvm_bolt.display()
    );
    println!(
        "ratios are variant/original, of wall time and of CPU time (user+sys); below 1 is faster\n"
    );
    let programs = [build_lua(&cache, work.path()), build_sqlite(&cache)];
    let mut built = 0;
    for prog in &programs {
        let facts = ElfFacts::read(&prog.bin).unwrap();
        println!(
            "{}: .text {} KiB, relocations {}, symbols {}",
            prog.name,
            facts.text_size / 1024,
            facts.has_relocs,
            facts.function_symbols
        );

        // 1. Sampled profile (what the daemon has on a machine without LBR).
        let perf = work.path().join(format!("{}.perf", prog.name));
        let args: Vec<&str> = prog.profile.iter().map(String::as_str).collect();
        record_cpu_clock(&prog.bin, &args, &perf).unwrap();
        let fdata = work.path().join(format!("{}.fdata", prog.name));
        perf_to_fdata(&tool, &prog.bin, &perf, &fdata).unwrap();
        println!(
            " sampled profile (perf record -e cpu-clock + perf2bolt {}):",
            tool.version.perf2bolt_no_lbr_flag()
        );
        if let Some(v) = opt.build(prog, &fdata, RequestOrigin::Matured).await {
            built += 1;
            let variant = PathBuf::from(&v.store_path);
            assert_eq!(
                output(&variant, &prog.measure),
                output(&prog.bin, &prog.measure),
                "{}: outputs differ",
                prog.name
            );
            println!(
                "  variant {} KiB (original {} KiB)",
                v.size / 1024,
                std::fs::metadata(&prog.bin).unwrap().len() / 1024
            );
            println!("  {}", summary(measure(&prog.bin, &variant, &prog.measure, pairs)));
        }

        // 1b. Lua with bolt-19 too: it fails on the interpreter loop and the ladder must
        // retry with -skip-funcs (bolt-22 does not fail there).
        if prog.name == "lua"
            && tool.version.major != 19
            && let Ok(t19) = BoltTool::probe(Path::new("/usr/lib/llvm-19/bin/llvm-bolt"))
        {
            println!(" sampled profile, BOLT {}:", t19.version);
            let opt19 = Optimizer::start(&t19, work.path());
            if let Some(v) = opt19.build(prog, &fdata, RequestOrigin::Matured).await {
                let variant = PathBuf::from(&v.store_path);
                assert_eq!(output(&variant, &prog.measure), output(&prog.bin, &prog.measure));
                println!("  {}", summary(measure(&prog.bin, &variant, &prog.measure, pairs)));
            }
            opt19.stop().await;
        }

        // 2. Instrumentation profile (exact counts; needs relocations).
        println!(" instrumentation profile:");
        if let Some(instr) = instrumentation_profile(&runner, prog, work.path())
            && let Some(v) = opt.build(prog, &instr, RequestOrigin::User).await
        {
            built += 1;
            let variant = PathBuf::from(&v.store_path);
            assert_eq!(
                output(&variant, &prog.measure),
                output(&prog.bin, &prog.measure),
                "{}: outputs differ",
                prog.name
            );
            println!("  {}", summary(measure(&prog.bin, &variant, &prog.measure, pairs)));
        }

        // A/A control: the original against itself, same procedure.
        println!(
            " A/A control (original vs original): {}",
            summary(measure(&prog.bin, &prog.bin, &prog.measure, pairs))
        );
        println!();
    }
    opt.stop().await;
    assert!(built >= 2, "the optimizer built {built} variants; expected at least one per program");
}

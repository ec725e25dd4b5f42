//! The real programs the benchmarks optimize, built from real sources in the cargo registry
//! (Lua 5.4 from the `lua-src` crate, SQLite from the `libsqlite3-sys` amalgamation, each
//! with a small C driver), linked `-O2 -Wl,--emit-relocs` with symbols, and their
//! CPU-heavy workloads; plus side-by-side timing of two binaries (interleaved pairs, ratios
//! of wall and CPU time). Shared by `bench_optimizer` and `bench_pipeline`.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub const LUA_DRIVER: &str = r#"
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

pub const LUA_WORKLOAD: &str = r#"
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

pub const SQLITE_DRIVER: &str = r#"
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
pub struct Program {
    pub name: &'static str,
    pub bin: PathBuf,
    /// Arguments of one measured run (~0.4 s).
    pub measure: Vec<String>,
    /// Arguments of the profiling run (longer, for enough samples).
    pub profile: Vec<String>,
    /// A short run for the optimizer's smoke check.
    pub smoke: Vec<String>,
}

pub fn registry_dir(prefix: &str) -> Option<PathBuf> {
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
pub fn crate_sources(prefix: &str, dependency: &str) -> PathBuf {
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

pub fn gcc(out: &Path, args: &[String]) {
    if out.exists() {
        return;
    }
    let tmp = out.with_extension("building");
    let st = Command::new("gcc").arg("-o").arg(&tmp).args(args).status().unwrap();
    assert!(st.success(), "gcc {args:?}");
    std::fs::rename(&tmp, out).unwrap();
}

pub fn build_lua(cache: &Path, work: &Path) -> Program {
    build_lua_with(cache, work, &[])
}

/// Lua built with extra compiler arguments (`defines`, e.g. `-DLUAI_MAXCCALLS=250`): a
/// second build of the same program with a few functions changed (an upgrade).
pub fn build_lua_with(cache: &Path, work: &Path, defines: &[&str]) -> Program {
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
    args.extend(defines.iter().map(|d| d.to_string()));
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
    let tag: String = defines.iter().map(|d| format!("-{}", d.trim_start_matches("-D"))).collect();
    let bin = cache.join(format!("lua-bench-{}{tag}", lua.file_name().unwrap().to_string_lossy()));
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

pub fn build_sqlite(cache: &Path) -> Program {
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

pub fn quick() -> bool {
    std::env::var_os("OPTBIN_BENCH_QUICK").is_some_and(|v| v != "0")
}
/// One run: wall time and CPU time (user + system, from wait4), the latter being less
/// sensitive to other load on this shared 2-core machine.
// The child is reaped by wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn time_run(bin: &Path, args: &[String]) -> (f64, f64) {
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

pub fn output(bin: &Path, args: &[String]) -> Vec<u8> {
    Command::new(bin).args(args).output().unwrap().stdout
}

/// Interleaved pairs, alternating which runs first; ratios variant/original of wall and
/// of CPU time.
pub fn measure(
    original: &Path,
    variant: &Path,
    args: &[String],
    pairs: usize,
) -> (Vec<f64>, Vec<f64>) {
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

pub fn summary((wall, cpu): (Vec<f64>, Vec<f64>)) -> String {
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

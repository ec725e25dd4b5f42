//! Real sampling of real programs: C programs compiled here run while the real
//! system-wide perf sampler runs (restricted to this test's temp directory by the
//! resolver), and the profiles it writes are fed to the installed llvm-bolt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use optbin::catalog::{Catalog, profiles};
use optbin::clock::ManualClock;
use optbin::identity::ContentId;
use optbin::profile::maturity::MaturityThresholds;
use optbin::profile::{
    Profiler, ProfilerConfig, ProfilerStatusHandle, UnderDirResolver, instrument, profile_summary,
    write_fdata,
};
use tokio::sync::watch;

const HOT_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* CPU time, not wall time: the program gets the same number of samples however busy the
   shared machine is. */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
__attribute__((noinline)) unsigned long cold_function(unsigned long x) {
    return x * 2654435761u ^ (x >> 3);
}
__attribute__((noinline)) unsigned long hot_function(unsigned long n) {
    unsigned long s = 0;
    for (unsigned long i = 0; i < n; i++) {
        s += (i * i) ^ (s >> 7);
        if (i % 100000 == 0) s += cold_function(i);
    }
    return s;
}
int main(int argc, char **argv) {
    double ms = argc > 1 ? atof(argv[1]) : 1000;
    double end = now() + ms / 1000;
    unsigned long s = 0;
    /* The argument depends on the last result, so the (pure) call cannot be hoisted. */
    do { s += hot_function(20000000 + (s & 1)); } while (now() < end);
    printf("%lu\n", s);
    return 0;
}
"#;

const BOLT_VERSIONS: [&str; 2] = ["/usr/lib/llvm-19/bin", "/usr/lib/llvm-22/bin"];

fn compile(dir: &Path, name: &str, pie: bool) -> PathBuf {
    let src = dir.join("hot.c");
    std::fs::write(&src, HOT_C).unwrap();
    let out = dir.join(name);
    let mut cmd = Command::new("gcc");
    cmd.args(["-O2", "-g", "-Wl,--emit-relocs", "-o"]).arg(&out).arg(&src);
    if pie {
        cmd.args(["-fPIE", "-pie"]);
    } else {
        cmd.args(["-fno-pie", "-no-pie"]);
    }
    let st = cmd.status().unwrap();
    assert!(st.success(), "gcc failed");
    out
}

fn run_for(prog: &Path, ms: u32) {
    let out = Command::new(prog).arg(ms.to_string()).output().unwrap();
    assert!(out.status.success(), "{} failed", prog.display());
}

/// A running profiler with its status and a way to stop it.
struct Running {
    status: ProfilerStatusHandle,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(dir: &Path, catalog: &Catalog, clock: Arc<ManualClock>) -> Self {
        let status = ProfilerStatusHandle::default();
        let profiler = Profiler {
            config: ProfilerConfig {
                frequency_hz: 999,
                flush_interval: Duration::from_millis(300),
                window_secs: 600,
                rotate_interval: Duration::ZERO,
                retention: profiles::Retention {
                    max_age_secs: 3600,
                    ..profiles::Retention::default()
                },
                ..ProfilerConfig::default()
            },
            catalog: catalog.clone(),
            resolver: Arc::new(UnderDirResolver { dir: dir.to_path_buf() }),
            clock,
            status: status.clone(),
            stacks: optbin::profile::stacks::StackStore::default(),
        };
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(profiler.run(rx));
        Self { status, shutdown, task }
    }

    /// Waits until the sampler runs (its perf events are open: programs started from now on
    /// are sampled).
    async fn until_sampling(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.status.snapshot().running {
            assert!(Instant::now() < deadline, "not sampling: {:?}", self.status.snapshot());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until two more flushes have happened (so everything sampled before the call
    /// is in the catalog).
    async fn settle(&self) {
        let start = self.status.snapshot().flushes;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status.snapshot().flushes < start + 2 {
            assert!(Instant::now() < deadline, "no flush: {:?}", self.status.snapshot());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        let started = Instant::now();
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "shutdown was not prompt");
    }
}

async fn binary_id(catalog: &Catalog, prog: &Path) -> i64 {
    let sha = ContentId::of_file(prog).unwrap().hex();
    catalog
        .run(move |c| {
            Ok(c.query_row("SELECT id FROM binaries WHERE sha256 = ?1", [sha], |r| r.get(0))?)
        })
        .await
        .expect("the program's binary is in the catalog")
}

/// Runs llvm-bolt with the profile and returns its output; asserts BOLT attached a profile
/// to `hot_function`.
fn assert_bolt_profiles_hot_function(bin_dir: &str, prog: &Path, fdata: &Path, out: &Path) {
    let bolt = Path::new(bin_dir).join("llvm-bolt");
    let output = Command::new(&bolt)
        .arg(prog)
        .arg(format!("-data={}", fdata.display()))
        .arg("-o")
        .arg(out)
        .args(["-print-profile", "-print-only=hot_function"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{} failed:\n{text}", bolt.display());
    let profiled_line = text
        .lines()
        .find(|l| l.contains("have non-empty execution profile"))
        .unwrap_or_else(|| panic!("no profile line from {}:\n{text}", bolt.display()));
    let profiled: u64 =
        profiled_line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(profiled >= 1, "{profiled_line}");
    let block = text
        .split("Binary Function \"hot_function\" after attaching profile")
        .nth(1)
        .unwrap_or_else(|| panic!("BOLT printed no profiled hot_function:\n{text}"));
    let block = block.split("End of Function").next().unwrap();
    let executed = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Exec Count"))
        .filter_map(|v| v.trim_start_matches([' ', ':']).trim().parse::<u64>().ok())
        .any(|n| n > 0);
    assert!(executed, "hot_function has no executed block in BOLT's view:\n{block}");
    let _ = std::fs::remove_file(out);
}

async fn sampled_profile_goes_to_hot_function(pie: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let prog = compile(&dir_path, if pie { "hot_pie" } else { "hot_nopie" }, pie);
    let stripped = dir_path.join("hot_stripped");
    std::fs::copy(&prog, &stripped).unwrap();
    assert!(Command::new("strip").arg(&stripped).status().unwrap().success());

    let catalog = Catalog::open(&dir_path.join("catalog.db")).unwrap();
    let clock = Arc::new(ManualClock::at(1_000_000));
    let running = Running::start(&dir_path, &catalog, Arc::clone(&clock));
    running.until_sampling().await;
    let (p, s) = (prog.clone(), stripped.clone());
    tokio::task::spawn_blocking(move || {
        run_for(&p, 1000);
        run_for(&s, 300);
    })
    .await
    .unwrap();
    running.settle().await;

    let status = running.status.snapshot();
    assert_eq!(status.source.as_ref().unwrap().kind.event_name(), "cpu-clock", "{status:?}");
    let stripped_status = &status.binaries[&stripped.display().to_string()];
    assert_eq!(stripped_status.refused.as_deref(), Some("stripped: no .symtab"));

    let id = binary_id(&catalog, &prog).await;
    let thresholds = MaturityThresholds::default();
    let summary = catalog.run(move |c| profile_summary(c, id, &thresholds)).await.unwrap();
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    assert!(summary.own_samples >= 200, "too few samples: {summary:?}");
    let hot = summary.hot_functions.iter().find(|(f, _)| f == "hot_function").map_or(0, |h| h.1);
    let share = hot as f64 / summary.own_samples as f64;
    assert!(share >= 0.6, "hot_function has {share:.2} of own samples: {summary:?}");
    assert_eq!(summary.runs, 1);
    assert!(summary.maturity.progress.starts_with("collecting "), "{}", summary.maturity.progress);

    // The stripped copy: refused, with its reason, and no profile file.
    let sid = binary_id(&catalog, &stripped).await;
    let err = catalog
        .run(move |c| {
            let mut out = Vec::new();
            Ok(write_fdata(c, sid, &mut out).map_err(|e| format!("{e:#}")))
        })
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.contains("stripped: no .symtab"), "{err}");

    // The profile file is accepted by both installed BOLTs, which attach it to hot_function.
    let fdata = catalog
        .run(move |c| {
            let mut out = Vec::new();
            write_fdata(c, id, &mut out)?;
            Ok(out)
        })
        .await
        .unwrap();
    let fdata_path = dir_path.join("profile.fdata");
    std::fs::write(&fdata_path, &fdata).unwrap();
    assert!(fdata.starts_with(b"no_lbr cpu-clock:\n"));
    for bin in BOLT_VERSIONS {
        assert_bolt_profiles_hot_function(bin, &prog, &fdata_path, &dir_path.join("out.bolt"));
    }

    // Rotation: a second run long after the first lands in a new window, and the first
    // window ages out (retention 1 h, rotation at every flush).
    let first_windows = catalog.run(move |c| profiles::windows(c, id)).await.unwrap();
    assert_eq!(first_windows.len(), 1);
    clock.advance(Duration::from_secs(7200));
    let p = prog.clone();
    tokio::task::spawn_blocking(move || run_for(&p, 300)).await.unwrap();
    running.settle().await;
    let windows = catalog.run(move |c| profiles::windows(c, id)).await.unwrap();
    assert_eq!(windows.len(), 1, "{windows:?}");
    assert_eq!(windows[0].window_start, 1_000_000 + 7200 - (1_000_000 + 7200) % 600);
    assert!(windows[0].own_samples > 0);
    assert_eq!(windows[0].runs, 1);
    assert!(running.status.snapshot().windows_dropped >= 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_pie_program_profile_is_attributed_and_accepted_by_bolt() {
    sampled_profile_goes_to_hot_function(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pie_program_profile_is_attributed_and_accepted_by_bolt() {
    sampled_profile_goes_to_hot_function(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instrumentation_profiles_of_two_runs_merge_and_feed_bolt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let prog = compile(&d, "hot", false);
    let catalog = Catalog::open(&d.join("catalog.db")).unwrap();
    let sha = ContentId::of_file(&prog).unwrap();
    let size = std::fs::metadata(&prog).unwrap().len();
    let facts = optbin::elf::ElfFacts::read(&prog).unwrap();
    let id = catalog
        .run(move |c| optbin::catalog::base::upsert_binary(c, &sha, size, &facts, 0))
        .await
        .unwrap();
    for bin in BOLT_VERSIONS {
        let bolt = Path::new(bin).join("llvm-bolt");
        let instr = d.join("hot.instr");
        // Each run writes its own file into a directory only the collector reads.
        let runs_dir = d.join("runs");
        std::fs::create_dir_all(&runs_dir).unwrap();
        let st = Command::new(&bolt)
            .arg(&prog)
            .arg("-instrument")
            .arg(format!("-instrumentation-file={}", runs_dir.join("prof.fdata").display()))
            .arg("-instrumentation-file-append-pid")
            .arg("-o")
            .arg(&instr)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        for ms in [50, 100] {
            run_for(&instr, ms);
        }
        let mut written: Vec<PathBuf> =
            std::fs::read_dir(&runs_dir).unwrap().map(|e| e.unwrap().path()).collect();
        written.sort();
        assert_eq!(written.len(), 2, "one profile per instrumented run: {written:?}");
        let first = std::fs::read_to_string(&written[0]).unwrap();
        let before = catalog.run(move |c| profiles::instrumented_runs(c, id)).await.unwrap();
        let dir_to_collect = runs_dir.clone();
        let added =
            catalog.run(move |c| instrument::collect_dir(c, id, &dir_to_collect, 0)).await.unwrap();
        assert_eq!(added, 2);
        assert_eq!(std::fs::read_dir(&runs_dir).unwrap().count(), 0, "collected files removed");
        let after = catalog.run(move |c| profiles::instrumented_runs(c, id)).await.unwrap();
        assert_eq!(after, before + 2);
        // Summed by edge: main's call of hot_function ran in both runs.
        let merged = catalog
            .run(move |c| {
                let mut out = Vec::new();
                instrument::write_instrumented_fdata(c, id, &mut out)?;
                Ok(String::from_utf8(out)?)
            })
            .await
            .unwrap();
        let edge = first
            .lines()
            .find(|l| l.contains(" 1 hot_function 0 "))
            .expect("the instrumented run recorded the call of hot_function");
        let key: String = edge.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
        let merged_count: u64 = merged
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .and_then(|l| l.split_whitespace().nth(7))
            .and_then(|n| n.parse().ok())
            .unwrap();
        let single: u64 = edge.split_whitespace().nth(7).unwrap().parse().unwrap();
        assert!(merged_count > single, "merged {merged_count} vs one run {single}");
        let merged_path = d.join("merged.fdata");
        std::fs::write(&merged_path, merged).unwrap();
        for check_with in BOLT_VERSIONS {
            assert_bolt_profiles_hot_function(check_with, &prog, &merged_path, &d.join("o.bolt"));
        }
        let _ = std::fs::remove_file(instr);
    }
}

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

#[path = "common/bench.rs"]
mod bench;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optbin::bolt::applicability::ApplicabilityConfig;
use optbin::bolt::ladder::{Next, Rung, next_rung};
use optbin::bolt::perf2bolt::{fdata_samples, perf_to_fdata, record_cpu_clock};
use optbin::bolt::queue::OptimizerDeps;
use optbin::bolt::status::JobEnd;
use optbin::bolt::{
    BoltJob, BoltMode, BoltOutcome, BoltPlan, BoltRunner, BoltState, BoltTool, OptimizeRequest,
    OptimizerConfig, OptimizerHandle, ProfileInput, ProfileNumbers, RequestOrigin, Sandbox,
    SandboxLimits, SandboxUser, SandboxedBoltRunner, SmokeCommand, discover, optimizer,
    run_optimizer,
};
use optbin::catalog::{Catalog, base, bolt_jobs};
use optbin::clock::SystemClock;
use optbin::elf::ElfFacts;
use optbin::identity::ContentId;
use optbin::store::VariantStore;
use tokio::sync::watch;

#[path = "common/programs.rs"]
mod programs;
use programs::{Program, build_lua, build_sqlite, measure, output, quick, summary};

#[path = "common/file_profiles.rs"]
mod file_profiles;
use file_profiles::FileProfiles;

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
                kept_profiles: None,
                variant_profiles: None,
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
                stale: None,
                challenge: None,
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
        flag_set: &optbin::bolt::flags::DEFAULT_SET,
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

fn main() {
    bench::run("bench_optimizer", || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(bench_optimizer());
    });
}

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
            let variant = same_output(prog, &v.store_path);
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
                let variant = same_output(prog, &v.store_path);
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
            let variant = same_output(prog, &v.store_path);
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

/// The stored variant at `store_path`, after checking it prints what the original prints.
fn same_output(prog: &Program, store_path: &str) -> PathBuf {
    let variant = PathBuf::from(store_path);
    assert_eq!(
        output(&variant, &prog.measure),
        output(&prog.bin, &prog.measure),
        "{}: outputs differ",
        prog.name
    );
    variant
}

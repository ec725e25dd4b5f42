//! `optbin bench`: runs a binary's original and one of its variants (and, with `--aa`, a
//! second copy of the original) in randomized interleaved rounds, as the invoking user, and
//! reports per metric the paired ratio with its 95% interval and whether every run gave the
//! original's output. Each benchmark is a job kept in the user's own SQLite database.
//!
//! - [`target`]: which files the arms are, learned from the mount's `status.json` and
//!   fetched from `.optbin/bins/NAME/variant-ID` (the store is root-only).
//! - [`run`]: one measured run (counters attached before the exec).
//! - [`analyze`]: the statistics and the output check, pure.
//! - [`jobs`]: the job database; [`render`]: the report.
//! - [`files`]: the daemon side, the `variant-ID` files.
//!
//! Every arm runs from a fresh copy in one private temporary directory, so the two files'
//! placement (page cache, disk) is alike; see docs/benchmarking.md for what remains.

pub mod analyze;
pub mod files;
pub mod jobs;
pub mod render;
pub mod run;
pub mod target;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub use files::VariantFiles;

use crate::measure::counters::Metric;
use analyze::{MetricResult, OutputCheck, Round};

/// Exit status of a benchmark whose runs did not all give the original's output.
pub const EXIT_MISMATCH: u8 = 3;

/// Benchmark a binary's original against one of its variants.
///
/// Runs the original and the variant chosen by --against in rounds of one run each, in a
/// random order per round, as you (never with more privileges). Reports per metric (wall
/// and CPU time, max RSS, and the perf counters this machine has) the median of each arm and
/// the ratio variant/original with its 95% interval; below 1 is faster. Every run's stdout
/// and exit status must equal the original's: a difference is reported as a miscompile and
/// the exit status is 3. Results are kept as jobs: --list, --show JOB, --remove JOB.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  optbin bench lua -n 30 --aa -- script.lua\n  \
                        optbin bench --list\n  optbin bench --show 3 --json\n\n\
                        See docs/benchmarking.md for what each option controls.")]
pub struct BenchArgs {
    /// The binary: its name on the overlaid PATH (`lua`) or its absolute path.
    #[arg(required_unless_present_any = ["list", "show", "remove"])]
    pub name: Option<String>,
    /// Measured rounds (one run of each arm per round).
    #[arg(short = 'n', long = "runs", default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..))]
    pub runs: u32,
    /// Unmeasured rounds before the measured ones (fill the page cache, settle frequency).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub warmup: u32,
    /// What the original is compared with: `served` (the variant the mount serves now),
    /// a variant id (see `optbin status --json`), or `original` (a copy of itself).
    #[arg(long, default_value = "served", value_name = "served|original|VARIANT_ID")]
    pub against: String,
    /// Pin every run to this CPU (sched_setaffinity).
    #[arg(long, value_name = "N")]
    pub cpu: Option<usize>,
    /// Drop the page cache before every run (root only: writes /proc/sys/vm/drop_caches).
    #[arg(long)]
    pub drop_caches: bool,
    /// Add an A/A control: a second copy of the original, measured like the variant.
    #[arg(long)]
    pub aa: bool,
    /// Print the result (or --list, --show) as JSON.
    #[arg(long)]
    pub json: bool,
    /// The optbin mount to ask.
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_MOUNTPOINT)]
    pub mount: PathBuf,
    /// The job database [default: $XDG_STATE_HOME/optbin/bench.db or
    /// ~/.local/state/optbin/bench.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// List stored jobs.
    #[arg(long, conflicts_with_all = ["name", "show", "remove"])]
    pub list: bool,
    /// Show a stored job.
    #[arg(long, value_name = "JOB", conflicts_with_all = ["name", "remove"])]
    pub show: Option<i64>,
    /// Remove a stored job.
    #[arg(long, value_name = "JOB", conflicts_with = "name")]
    pub remove: Option<i64>,
    /// The program's arguments (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// One arm of a benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// `original`, `variant 3`, `original (A/A copy)`.
    pub label: String,
    pub variant_id: Option<i64>,
    pub sha256: String,
}

/// A finished benchmark: what `--show` prints and the job row keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub job: Option<i64>,
    pub name: String,
    pub path: String,
    pub args: Vec<String>,
    pub arms: Vec<Arm>,
    pub runs: u32,
    pub warmup: u32,
    pub cpu: Option<usize>,
    pub drop_caches: bool,
    pub started_at: i64,
    pub finished_at: i64,
    pub metrics: Vec<MetricResult>,
    pub output: Option<OutputCheck>,
    pub rounds: Vec<Round>,
}

impl BenchResult {
    /// `ok`, or `mismatch` when a run's output differed from the original's.
    pub fn outcome(&self) -> &'static str {
        match &self.output {
            Some(c) if !c.mismatches.is_empty() => "mismatch",
            _ => "ok",
        }
    }

    /// One line: the CPU-time ratio and its interval.
    pub fn summary(&self) -> String {
        let against = self.arms.get(1).map(|a| a.label.as_str()).unwrap_or("?");
        let cpu = self.metrics.iter().find(|m| m.metric == "cpu").and_then(|m| m.ratio);
        let mut s = match cpu {
            Some(c) => format!("{against}: cpu {}", c.describe()),
            None => format!("{against}: no cpu ratio"),
        };
        if self.outcome() == "mismatch" {
            s.push_str("; OUTPUT MISMATCH");
        }
        s
    }

    pub fn metric(&self, name: &str) -> Option<&MetricResult> {
        self.metrics.iter().find(|m| m.metric == name)
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `optbin bench ...`.
pub fn main(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let db_path = match &args.db {
        Some(p) => p.clone(),
        None => jobs::default_path()?,
    };
    if args.list {
        let conn = jobs::open(&db_path)?;
        let rows = jobs::list(&conn)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", render::job_list(&rows));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = args.show {
        let conn = jobs::open(&db_path)?;
        let Some(result) = jobs::get(&conn, id)? else {
            bail!("no bench job {id} in {}", db_path.display())
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            print!("{}", render::result_text(&result));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = args.remove {
        let conn = jobs::open(&db_path)?;
        if !jobs::remove(&conn, id)? {
            bail!("no bench job {id} in {}", db_path.display());
        }
        println!("removed bench job {id}");
        return Ok(ExitCode::SUCCESS);
    }
    let name = args.name.clone().context("NAME is required")?;
    if args.drop_caches && !rustix::process::geteuid().is_root() {
        bail!("--drop-caches needs root: it writes /proc/sys/vm/drop_caches");
    }
    if let Some(cpu) = args.cpu {
        check_cpu(cpu)?;
    }
    let arms = target::prepare(&args.mount, &name, &args.against, args.aa)?;
    let mut result = run_benchmark(&args, &arms)?;
    let conn = jobs::open(&db_path)?;
    let id = jobs::insert(&conn, &result, result.finished_at)?;
    result.job = Some(id);
    conn.execute(
        "UPDATE bench_jobs SET result_json = ?1 WHERE id = ?2",
        rusqlite::params![serde_json::to_string(&result)?, id],
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", render::result_text(&result));
    }
    if result.outcome() == "mismatch" {
        eprintln!("{}", render::mismatch_alarm(&result));
        return Ok(ExitCode::from(EXIT_MISMATCH));
    }
    Ok(ExitCode::SUCCESS)
}

fn check_cpu(cpu: usize) -> anyhow::Result<()> {
    use rustix::thread::{CpuSet, sched_getaffinity};
    let set = sched_getaffinity(None)
        .map_err(|e| anyhow::anyhow!("sched_getaffinity: {}", std::io::Error::from(e)))?;
    if cpu >= CpuSet::MAX_CPU || !set.is_set(cpu) {
        bail!("--cpu {cpu}: this process may not run on CPU {cpu}");
    }
    Ok(())
}

fn drop_caches() -> anyhow::Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", b"3").context("writing /proc/sys/vm/drop_caches")
}

fn run_benchmark(args: &BenchArgs, prepared: &target::Prepared) -> anyhow::Result<BenchResult> {
    use rand::seq::SliceRandom;
    let arms = prepared.arms.len();
    let total = (args.runs + args.warmup) as u64 * arms as u64;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} runs, {elapsed} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("bench {}", prepared.name));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started_at = now_secs();
    let mut rounds = Vec::new();
    let mut rng = rand::rng();
    for round in 0..(args.warmup + args.runs) {
        let warm = round < args.warmup;
        let mut order: Vec<usize> = (0..arms).collect();
        order.shuffle(&mut rng);
        let mut samples: Vec<Option<run::RunSample>> = vec![None; arms];
        for &arm in &order {
            if args.drop_caches {
                drop_caches()?;
            }
            let spec = run::RunSpec {
                program: &prepared.files[arm],
                argv0: &prepared.argv0,
                args: &args.args,
                cpu: args.cpu,
                metrics: &Metric::ALL,
            };
            let sample = run::run_once(&spec)
                .with_context(|| format!("running {}", prepared.arms[arm].label))?;
            samples[arm] = Some(sample);
            bar.set_message(if warm { "warm-up" } else { "" });
            bar.inc(1);
        }
        if !warm {
            rounds.push(Round { order, samples: samples.into_iter().flatten().collect() });
        }
    }
    bar.finish_and_clear();
    let metrics = analyze::metrics(&rounds, arms);
    let output = analyze::check_output(&rounds);
    Ok(BenchResult {
        job: None,
        name: prepared.name.clone(),
        path: prepared.path.clone(),
        args: args.args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        arms: prepared.arms.clone(),
        runs: args.runs,
        warmup: args.warmup,
        cpu: args.cpu,
        drop_caches: args.drop_caches,
        started_at,
        finished_at: now_secs(),
        metrics,
        output,
        rounds,
    })
}

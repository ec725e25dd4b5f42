//! `optbin report`: what BOLT did for every program optbin tried BOLT on on this machine, and
//! what it measurably changed. Per binary: the BOLT version and flags, the profile's source
//! and size, the CPU-time ratio on the machine's real runs and on the user's benchmarks
//! (each with its 95% interval), the counters before and after where the machine has them
//! ("not supported here" where not, never a zero), the policy's decision and the time from
//! the first run to it, and the CPU time saved. Sorted by CPU time saved.
//!
//! - [`collect`]: the daemon side, catalog -> [`Report`], served as `.optbin/report.json`
//!   by [`file::ReportFile`] (the catalog is root-only and has one owner: the daemon).
//! - This module: the command, which reads that file through the mount, adds the user's
//!   own `optbin bench` jobs for the same variants, and prints it ([`render`]).
//!
//! The JSON's `format` is bumped whenever a field changes meaning or goes away; fields are
//! only ever added otherwise (docs/benchmarking.md, "optbin report").

pub mod collect;
pub mod file;
pub mod render;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::bench::BenchResult;
use crate::bench::analyze::MetricResult;
use crate::catalog::base::{VariantKind, VariantState};
use crate::policy::stats::Comparison;

/// The version of the report's JSON layout.
pub const FORMAT: u32 = 1;

/// The file under `.optbin/` the daemon serves the report as.
pub const FILE: &str = "report.json";

/// The BOLT report of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    pub generated_at_ms: i64,
    /// Why the machine does not count instructions and cycles (`None`: it does).
    pub hardware_counters: Option<String>,
    pub binaries: Vec<BinaryReport>,
}

/// One binary BOLT was tried on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryReport {
    /// The file name of its first path.
    pub name: String,
    pub paths: Vec<String>,
    pub sha256: String,
    pub size: u64,
    /// When the daemon first indexed this content (unix seconds).
    pub first_seen: i64,
    /// The oldest run still in the catalog (unix milliseconds).
    pub first_run_ms: Option<i64>,
    pub profile: ProfileSource,
    /// The last BOLT job (attempts, outcome), if BOLT ran.
    pub bolt: Option<BoltJob>,
    /// The variants the policy judges (`bolt` builds and variants placed by hand).
    pub variants: Vec<VariantReport>,
    /// Sum over its variants.
    pub cpu_saved_ns: u64,
}

/// Where the profile comes from and how big it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSource {
    /// `sampled`, `instrumentation` or `none`.
    pub source: String,
    /// The sampling event (`cpu-clock`, `cycles`...).
    pub event: Option<String>,
    /// Own-text samples.
    pub samples: u64,
    /// Runs of the instrumented variant that wrote a profile.
    pub instrumented_runs: u64,
    /// Distinct branch edges the instrumentation counted.
    pub edges: u64,
}

/// The last BOLT job of a binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoltJob {
    pub attempts: i64,
    /// `ok`, or the failure (`exit 1`, `timeout`, ...).
    pub last_outcome: String,
    pub bolt_version: String,
    pub flags: Option<String>,
    pub wall_ms: Option<i64>,
    /// BOLT gave up until the content, BOLT or the profile changes.
    pub gave_up: bool,
}

/// One variant and what it measurably did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantReport {
    pub id: i64,
    /// `bolt` or `placed` (instrumented variants are not reported).
    pub kind: VariantKind,
    pub state: VariantState,
    pub bolt_version: Option<String>,
    pub flags: Option<String>,
    /// Own-text samples of the profile it was built from.
    pub profile_samples: Option<i64>,
    /// Unix seconds.
    pub built_at: i64,
    pub size: u64,
    /// The policy's verdict (promote, reject, quarantine), if one was taken.
    pub decision: Option<Decision>,
    /// Variant / original CPU time on real runs (paired, 95% interval).
    pub real_runs: Option<Comparison>,
    /// Medians per run, original and variant.
    pub counters: Vec<CounterChange>,
    /// CPU time saved while served (from the real-run ratio).
    pub cpu_saved_ns: u64,
    /// The user's `optbin bench` jobs against this variant (added by the command).
    #[serde(default)]
    pub bench: Vec<BenchSummary>,
}

/// The policy's verdict on a variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// `promote`, `reject` or `quarantine`.
    pub action: String,
    pub at_ms: i64,
    pub detail: String,
    /// From the binary's first run (or first sight) to this decision.
    pub secs_from_first_run: Option<f64>,
}

/// One counter before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterChange {
    /// `cpu`, `wall`, `instructions`, `cycles`, `IPC`, ...
    pub metric: String,
    /// `ns`, `count` or `ratio`.
    pub unit: String,
    /// Median per run of the original's runs that had it.
    pub original: Option<f64>,
    pub variant: Option<f64>,
    pub change_percent: Option<f64>,
    pub original_runs: usize,
    pub variant_runs: usize,
    /// Why there is no figure ("not supported here ..."), never a zero instead.
    pub unsupported: Option<String>,
}

/// A benchmark job of the user's against one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchSummary {
    pub job: i64,
    pub finished_at: i64,
    pub runs: u32,
    /// `ok` or `mismatch`.
    pub outcome: String,
    pub cpu: Option<Comparison>,
    /// Every metric of the job (medians per arm, ratios, "not supported here").
    pub metrics: Vec<MetricResult>,
}

/// Most CPU time saved first; then the best real-run ratio; then by name.
pub fn sort(binaries: &mut [BinaryReport]) {
    let best = |b: &BinaryReport| {
        b.variants.iter().filter_map(|v| v.real_runs.map(|c| c.ratio)).fold(f64::INFINITY, f64::min)
    };
    binaries.sort_by(|a, b| {
        b.cpu_saved_ns
            .cmp(&a.cpu_saved_ns)
            .then_with(|| best(a).total_cmp(&best(b)))
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// Show what BOLT did for the programs optbin optimized, and what it measurably changed.
///
/// Per binary BOLT was tried on: BOLT version and flags, profile source and size, the
/// CPU-time ratio variant/original on this machine's real runs and on your `optbin bench`
/// jobs (each with a 95% interval; below 1 is faster), counters before and after (IPC,
/// i-cache, iTLB and branch misses where the machine counts them: "not supported here"
/// where it does not), the policy's decision and the time from the first run to it, and
/// the CPU time saved. Sorted by CPU time saved.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  optbin report\n  optbin report lua --json\n\n\
                        The JSON layout is versioned by its `format` field; see \
                        docs/benchmarking.md.")]
pub struct ReportArgs {
    /// Only this binary (its PATH-view name, its file name or an absolute path).
    pub name: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The optbin mount to ask.
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_MOUNTPOINT)]
    pub mount: PathBuf,
    /// Your bench job database, whose jobs are added [default: the one `optbin bench`
    /// uses].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
}

/// Reads `<mount>/.optbin/report.json`.
pub fn read(mount: &Path) -> anyhow::Result<Report> {
    let path = mount.join(".optbin").join(FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            anyhow::anyhow!("the mount at {} is stale: its daemon died", mount.display())
        } else {
            anyhow::anyhow!(
                "reading {} (is optbin mounted at {}? --mount DIR names another): {e}",
                path.display(),
                mount.display()
            )
        }
    })?;
    let report: Report =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        report.format == FORMAT,
        "{} has report format {}, this optbin reads format {FORMAT}: use the daemon's optbin",
        path.display(),
        report.format
    );
    Ok(report)
}

/// Adds the bench jobs whose compared arm is one of the report's variants.
pub fn add_bench_jobs(report: &mut Report, jobs: &[BenchResult]) {
    for b in &mut report.binaries {
        for v in &mut b.variants {
            v.bench = jobs
                .iter()
                .filter(|j| b.paths.contains(&j.path))
                .filter(|j| j.arms.get(1).is_some_and(|a| a.variant_id == Some(v.id)))
                .map(|j| BenchSummary {
                    job: j.job.unwrap_or_default(),
                    finished_at: j.finished_at,
                    runs: j.runs,
                    outcome: j.outcome().to_string(),
                    cpu: j.metric("cpu").and_then(|m| m.ratio),
                    metrics: j.metrics.clone(),
                })
                .collect();
        }
    }
}

/// The user's stored bench results (none when the database does not exist yet).
fn bench_jobs(db: Option<&Path>) -> anyhow::Result<Vec<BenchResult>> {
    let path = match db {
        Some(p) => p.to_path_buf(),
        None => match crate::bench::jobs::default_path() {
            Ok(p) => p,
            Err(_) => return Ok(Vec::new()),
        },
    };
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = crate::bench::jobs::open(&path)?;
    let mut out = Vec::new();
    for row in crate::bench::jobs::list(&conn)? {
        if let Some(mut r) = crate::bench::jobs::get(&conn, row.id)? {
            r.job = Some(row.id);
            out.push(r);
        }
    }
    Ok(out)
}

/// Whether a binary answers to `name` (a PATH-view or file name, or one of its paths).
fn matches(b: &BinaryReport, name: &str) -> bool {
    if name.contains('/') {
        b.paths.iter().any(|p| p == name)
    } else {
        b.name == name
            || b.paths.iter().any(|p| Path::new(p).file_name().is_some_and(|f| f == name))
    }
}

/// `optbin report ...`.
pub fn main(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut report = read(&args.mount)?;
    if let Some(name) = &args.name {
        report.binaries.retain(|b| matches(b, name));
        anyhow::ensure!(
            !report.binaries.is_empty(),
            "BOLT has not been tried on {name:?} on this machine (`optbin status` says where \
             it is)"
        );
    }
    add_bench_jobs(&mut report, &bench_jobs(args.db.as_deref())?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

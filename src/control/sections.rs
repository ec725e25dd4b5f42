//! Each subsystem's machine-wide status section, as typed structs: the daemon's subsystems
//! fill them ([`crate::control::SubsystemStatus::section`]), `status.json` serializes them
//! (one object per subsystem, by name, at the top level of `subsystems`), and the text
//! status, the HTML report and the metrics page read the fields they need (each summary,
//! the counters) instead of looking values up in JSON.
//!
//! The per-binary counterparts are in [`super::details`]; the fleet's section is with the
//! fleet ([`crate::fleet::view::FleetMachine`]), as its per-binary one is.

use std::path::PathBuf;

use serde::Serialize;

use crate::bolt::applicability::ApplicabilityConfig;
use crate::bolt::status::OptimizerStatus;
use crate::catalog::bolt_jobs::BoltJobRow;
use crate::fleet::view::FleetMachine;
use crate::policy::PolicyConfig;
use crate::profile::ProfilerStatus;
use crate::profile::maturity::MaturityThresholds;
use crate::store::StoreUsage;
use crate::train::Progress;
use crate::warm::warmer::WarmStatus;

/// Every subsystem's machine-wide section; a subsystem that does not run is absent.
/// Fields in name order, the order `status.json` always had.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineSections {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observe: Option<ObserveMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiler: Option<ProfilerMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingMachine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmMachine>,
}

impl MachineSections {
    /// Each subsystem's one line about the machine, by subsystem name (in name order).
    pub fn summaries(&self) -> Vec<(&'static str, &str)> {
        [
            ("fleet", self.fleet.as_ref().map(|s| s.summary.as_str())),
            ("observe", self.observe.as_ref().map(|s| s.summary.as_str())),
            ("optimizer", self.optimizer.as_ref().map(|s| s.summary.as_str())),
            ("policy", self.policy.as_ref().map(|s| s.summary.as_str())),
            ("profiler", self.profiler.as_ref().map(|s| s.summary.as_str())),
            ("training", self.training.as_ref().map(|s| s.summary.as_str())),
            ("warm", self.warm.as_ref().map(|s| s.summary.as_str())),
        ]
        .into_iter()
        .filter_map(|(name, summary)| Some((name, summary?)))
        .collect()
    }
}

/// A part of a section that is read from somewhere that can fail (the catalog, the store's
/// directory): the value, or `{"error": "..."}` with the error and its context (shown,
/// never hidden behind a default).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum OrError<T> {
    Read(T),
    Unreadable { error: String },
}

impl<T> OrError<T> {
    pub fn of(r: anyhow::Result<T>) -> Self {
        match r {
            Ok(t) => Self::Read(t),
            Err(e) => Self::Unreadable { error: format!("{e:#}") },
        }
    }

    pub fn read(&self) -> Option<&T> {
        match self {
            Self::Read(t) => Some(t),
            Self::Unreadable { .. } => None,
        }
    }
}

/// The profiler: the sampler's state and counters, and the settings it runs with.
#[derive(Debug, Clone, Serialize)]
pub struct ProfilerMachine {
    #[serde(flatten)]
    pub status: ProfilerStatus,
    pub disk_caps: DiskCaps,
    pub enabled: bool,
    pub summary: String,
    pub thresholds: MaturityThresholds,
}

/// The disk caps of the profile tables.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DiskCaps {
    pub per_binary_bytes: u64,
    pub total_bytes: u64,
}

/// The optimizer: BOLT found or missing, queue, running job, recent failures with BOLT's
/// tail, store usage, and the settings it judges by.
#[derive(Debug, Clone, Serialize)]
pub struct OptimizerMachine {
    pub applicability: ApplicabilityConfig,
    /// BOLT, the queue, the running and recent jobs, counters.
    #[serde(flatten)]
    pub status: OptimizerStatus,
    /// The catalog's recent failures (one error entry when it could not be read).
    pub failures: Vec<OrError<FailedJob>>,
    pub maturity: MaturityThresholds,
    /// Why the optimizer is off (None: on).
    pub off: Option<String>,
    pub scratch_dir: PathBuf,
    pub store: OrError<StoreUsage>,
    pub store_dir: PathBuf,
    pub summary: String,
}

/// A failed BOLT job and the paths of its binary.
#[derive(Debug, Clone, Serialize)]
pub struct FailedJob {
    pub job: BoltJobRow,
    pub paths: Vec<String>,
}

/// The policy: whether runs are measured (and why not), the machine summary, its settings.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyMachine {
    pub config: PolicyConfig,
    pub machine: OrError<PolicyFigures>,
    pub measurement: MeasurementStatus,
    pub summary: String,
}

/// What the policy's serving saved the machine.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PolicyFigures {
    pub binaries_optimized: usize,
    pub cpu_saved_ns: u64,
}

/// Whether runs are measured, and what became of them since start.
#[derive(Debug, Clone, Serialize)]
pub struct MeasurementStatus {
    /// Promoted variants bind-mounted over their entries: their execs make no request.
    pub bound: BoundStatus,
    /// The counters read per run, as a line.
    pub counters: String,
    pub dropped: DroppedRuns,
    pub hardware_counters: Vec<&'static str>,
    pub on: bool,
    pub pending: usize,
    pub runs_killed_by_signal: u64,
    pub runs_measured: u64,
    /// Of `runs_measured`, runs followed for their exit only: a served variant's runs get
    /// counters one in `[policy] served_count_one_in`.
    pub runs_without_counters: u64,
    pub why_off: Option<String>,
}

/// Execs of variants bind-mounted over their entries since start (`[policy] bind_served`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BoundStatus {
    /// Variants bind-mounted now.
    pub bound_now: usize,
    /// Runs heard through the bind mounts' fanotify marks (all of them in `runs_measured`,
    /// as runs without counters, once they ended).
    pub execs: u64,
    /// Times a bind mount was removed for a window of execs through the mount (the
    /// original's exploration runs and counted pairs).
    pub windows: u64,
    /// Binds that failed (the variant was then served through the mount).
    pub failed: u64,
    /// Times the kernel's queue of bound execs overflowed (runs then not followed).
    pub overflows: u64,
    /// Why nothing is bound, when so.
    pub why_off: Option<String>,
}

/// Runs seen but not measured, by cause.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DroppedRuns {
    pub exec_failed: u64,
    pub lost: u64,
    pub not_attached: u64,
    pub not_recorded: u64,
    pub unreadable: u64,
}

/// Training commands: where they are read from, which ran, which were refused.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingMachine {
    pub commands: Vec<TrainingCommand>,
    pub dir: PathBuf,
    pub enabled: bool,
    pub idle: bool,
    pub idle_load: f64,
    pub load_per_cpu: Option<f64>,
    pub refused: Vec<RefusedFile>,
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingCommand {
    pub args: Vec<String>,
    pub binary: String,
    pub file: PathBuf,
    pub progress: Progress,
    pub user: String,
}

/// A training file refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedFile {
    pub error: String,
    pub file: PathBuf,
}

/// The observability renderer: its one line about the host.
#[derive(Debug, Clone, Serialize)]
pub struct ObserveMachine {
    pub summary: String,
}

/// Page-cache warming.
#[derive(Debug, Clone, Serialize)]
pub struct WarmMachine {
    #[serde(flatten)]
    pub status: WarmStatus,
    pub summary: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().expect("an object").keys().map(String::as_str).collect()
    }

    /// The sections that were built by hand as JSON keep the keys scripts read.
    #[test]
    fn status_json_keeps_the_keys_of_each_section() {
        let sections = MachineSections {
            policy: Some(PolicyMachine {
                config: PolicyConfig::default(),
                machine: OrError::Read(PolicyFigures { binaries_optimized: 1, cpu_saved_ns: 2 }),
                measurement: MeasurementStatus {
                    bound: BoundStatus::default(),
                    counters: "cycles".into(),
                    dropped: DroppedRuns {
                        exec_failed: 1,
                        lost: 2,
                        not_attached: 3,
                        not_recorded: 4,
                        unreadable: 5,
                    },
                    hardware_counters: vec!["cycles"],
                    on: true,
                    pending: 6,
                    runs_killed_by_signal: 7,
                    runs_measured: 8,
                    runs_without_counters: 0,
                    why_off: None,
                },
                summary: "s".into(),
            }),
            training: Some(TrainingMachine {
                commands: vec![TrainingCommand {
                    args: vec!["-x".into()],
                    binary: "/usr/bin/lua".into(),
                    file: "/etc/optbin/train.d/lua.toml".into(),
                    progress: Progress::default(),
                    user: "nobody".into(),
                }],
                dir: "/etc/optbin/train.d".into(),
                enabled: true,
                idle: false,
                idle_load: 0.25,
                load_per_cpu: Some(0.5),
                refused: vec![RefusedFile { error: "bad".into(), file: "/x.toml".into() }],
                summary: "t".into(),
            }),
            observe: Some(ObserveMachine { summary: "o".into() }),
            ..Default::default()
        };
        let json = serde_json::to_value(&sections).unwrap();
        assert_eq!(keys(&json), ["observe", "policy", "training"]);
        let policy = &json["policy"];
        assert_eq!(keys(policy), ["config", "machine", "measurement", "summary"]);
        assert_eq!(
            policy["machine"],
            serde_json::json!({"binaries_optimized": 1, "cpu_saved_ns": 2})
        );
        assert_eq!(
            keys(&policy["measurement"]),
            [
                "bound",
                "counters",
                "dropped",
                "hardware_counters",
                "on",
                "pending",
                "runs_killed_by_signal",
                "runs_measured",
                "runs_without_counters",
                "why_off"
            ]
        );
        assert_eq!(
            policy["measurement"]["dropped"],
            serde_json::json!({"exec_failed": 1, "lost": 2, "not_attached": 3, "not_recorded": 4,
                "unreadable": 5})
        );
        let training = &json["training"];
        assert_eq!(
            keys(training),
            [
                "commands",
                "dir",
                "enabled",
                "idle",
                "idle_load",
                "load_per_cpu",
                "refused",
                "summary"
            ]
        );
        assert_eq!(keys(&training["commands"][0]), ["args", "binary", "file", "progress", "user"]);
        assert_eq!(training["refused"], serde_json::json!([{"error": "bad", "file": "/x.toml"}]));
        assert_eq!(sections.summaries(), [("observe", "o"), ("policy", "s"), ("training", "t")]);
    }

    #[test]
    fn an_unreadable_part_is_an_error_object() {
        let e: OrError<PolicyFigures> =
            OrError::of(Err(anyhow::anyhow!("no such table").context("reading runs")));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"error": "reading runs: no such table"})
        );
        assert!(e.read().is_none());
    }
}

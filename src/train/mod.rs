//! Training commands: `/etc/optbin/train.d/*.toml` ([`file`]) run by the daemon through the
//! mount ([`run`]) when the machine is idle, so a binary's profile matures and its canary
//! gets runs before its first real use. `echo 'train NAME' > .optbin/control` runs one
//! round of NAME's commands now.
//!
//! Runs go through the mount as ordinary execs: the profiler samples them and the policy
//! measures them like any other run. A command runs only while its binary still needs runs
//! (its policy stage is `seen`, `collecting`, `queued`, `optimizing` or `canary`, as the
//! mount's own `status.json` says) and only when the one-minute load average per CPU is
//! below `[train] idle_load`. The `training` section of status shows each command's runs
//! and last outcome, and every file that was refused with the reason.
//!
//! While a binary has a variant in canary or served, each training command's first run
//! with that variant is preceded by the output check ([`check`]): a variant whose stdout or
//! exit status differs from the original's is rejected by the policy; each binary's
//! `training` status lists the checks and their verdicts.

pub mod check;
pub mod file;
pub mod run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::control::ActionError;
use crate::control::SubsystemStatus;
use crate::control::details::{BinaryDetails, OutputCheckStatus, TrainingBinary};
use crate::control::resolve::resolve_name;
use crate::control::sections::{MachineSections, RefusedFile, TrainingCommand, TrainingMachine};
use check::{CheckKey, OutputCheck, Verdict};
use file::TrainCommand;

pub const DEFAULT_DIR: &str = "/etc/optbin/train.d";

/// `[train]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Run training commands when the machine is idle.
    pub enabled: bool,
    /// Where the training files are.
    pub dir: PathBuf,
    /// Seconds between two looks (load, files, which binaries need runs).
    pub check_secs: u64,
    /// Idle means the one-minute load average divided by the CPUs is below this.
    pub idle_load: f64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self { enabled: true, dir: PathBuf::from(DEFAULT_DIR), check_secs: 30, idle_load: 0.25 }
    }
}

impl TrainSettings {
    /// Checks the values serde cannot (unknown keys are already errors naming the key).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.check_secs >= 1, "[train] check_secs must be at least 1");
        anyhow::ensure!(self.idle_load > 0.0, "[train] idle_load must be above 0");
        anyhow::ensure!(self.dir.is_absolute(), "[train] dir must be an absolute path");
        Ok(())
    }
}

/// One command's progress.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub runs: u64,
    pub last_outcome: Option<String>,
    pub last_at: Option<i64>,
    pub last_secs: Option<f64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    commands: Vec<TrainCommand>,
    refused: Vec<(PathBuf, String)>,
    progress: HashMap<PathBuf, Progress>,
    load_per_cpu: Option<f64>,
    idle: bool,
    /// The output check's verdicts per command file and variant, with the command checked
    /// (a changed file is checked again) and when (unix seconds).
    checks: HashMap<CheckKey, (TrainCommand, Verdict, i64)>,
}

/// The training subsystem of one server process.
pub struct Trainer {
    settings: TrainSettings,
    mountpoint: PathBuf,
    overlay: Vec<PathBuf>,
    /// None: no output check (a trainer without a catalog).
    check: Option<OutputCheck>,
    state: Mutex<State>,
    stop: AtomicBool,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The one-minute load average per CPU.
fn load_per_cpu() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let one: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Some(one / cpus as f64)
}

/// The policy stage key of a status entry (`collecting`, `canary`, ...).
fn stage_key(entry: &Value) -> String {
    match &entry["details"]["policy"]["stage"] {
        Value::String(s) => s.clone(),
        Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

/// Whether a binary in this stage still learns from runs.
fn needs_runs(stage: &str) -> bool {
    matches!(stage, "" | "seen" | "collecting" | "queued" | "optimizing" | "canary")
}

impl Trainer {
    pub fn new(
        settings: TrainSettings,
        mountpoint: PathBuf,
        overlay: Vec<PathBuf>,
        check: Option<OutputCheck>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            mountpoint,
            overlay,
            check,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reload(&self) -> Vec<TrainCommand> {
        let (commands, refused) = file::load_dir(&self.settings.dir);
        for (f, why) in &refused {
            tracing::warn!(file = %f.display(), "training file refused: {why}");
        }
        let mut st = self.lock();
        st.commands = commands.clone();
        st.refused = refused;
        commands
    }

    fn resolve(&self, cmd: &TrainCommand) -> Result<PathBuf, String> {
        resolve_name(&cmd.binary, &self.overlay, &self.mountpoint).map_err(|e| e.to_string())
    }

    /// Runs `cmd` once and records the outcome; first the output check of each variant in
    /// play not yet checked with this command.
    fn run_one(&self, cmd: &TrainCommand, original: &Path) {
        if let Err(e) = self.check_outputs(cmd, original) {
            tracing::warn!(file = %cmd.file.display(), error = %format!("{e:#}"), "output check failed");
            self.lock().progress.entry(cmd.file.clone()).or_default().last_error =
                Some(format!("output check: {e:#}"));
        }
        let result = run::run(cmd, &self.mountpoint, original, &self.stop);
        let mut st = self.lock();
        let p = st.progress.entry(cmd.file.clone()).or_default();
        p.last_at = Some(now_secs());
        match result {
            Ok((outcome, took)) => {
                tracing::info!(file = %cmd.file.display(), %outcome, "training run");
                p.runs += 1;
                p.last_outcome = Some(outcome.to_string());
                p.last_secs = Some(took.as_secs_f64());
                p.last_error = None;
            }
            Err(e) => {
                tracing::warn!(file = %cmd.file.display(), error = %format!("{e:#}"), "training run failed");
                p.last_error = Some(format!("{e:#}"));
            }
        }
    }

    /// The output check of `cmd` against each canaried or served variant of `original` it
    /// was not checked with; a difference is recorded for the policy, which rejects it.
    fn check_outputs(&self, cmd: &TrainCommand, original: &Path) -> anyhow::Result<()> {
        let Some(checker) = &self.check else { return Ok(()) };
        let Some((binary_id, variants)) = check::variants_in_play(&checker.catalog, original)?
        else {
            return Ok(());
        };
        for v in variants {
            let key = (cmd.file.clone(), v.id);
            if self.lock().checks.get(&key).is_some_and(|(checked, _, _)| checked == cmd) {
                continue;
            }
            let verdict = check::check_variant(cmd, &self.mountpoint, original, &v, &self.stop)?;
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            tracing::info!(file = %cmd.file.display(), variant = v.id, ?verdict, "output check");
            if let Verdict::Differs { detail, exit } = &verdict {
                checker.record_mismatch(original, binary_id, v.id, &cmd.file, detail, *exit)?;
            }
            self.lock().checks.insert(key, (cmd.clone(), verdict, now_secs()));
        }
        Ok(())
    }

    /// One look: reload the files, check the load, run each command whose binary still
    /// needs runs.
    fn round(&self) {
        let commands = self.reload();
        let load = load_per_cpu();
        let idle = load.is_some_and(|l| l < self.settings.idle_load);
        {
            let mut st = self.lock();
            st.load_per_cpu = load;
            st.idle = idle;
        }
        if !idle || commands.is_empty() {
            return;
        }
        let status: Option<Value> = std::fs::read(self.mountpoint.join(".optbin/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        for cmd in commands {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let original = match self.resolve(&cmd) {
                Ok(p) => p,
                Err(why) => {
                    self.lock().progress.entry(cmd.file.clone()).or_default().last_error =
                        Some(why);
                    continue;
                }
            };
            let stage = status
                .as_ref()
                .and_then(|s| s["binaries"].as_array())
                .and_then(|bs| bs.iter().find(|b| b["path"].as_str() == original.to_str()))
                .map(stage_key)
                .unwrap_or_default();
            if needs_runs(&stage) {
                for _ in 0..cmd.runs {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    self.run_one(&cmd, &original);
                }
            }
        }
    }

    /// The background task: a round every `check_secs` until shutdown; None when training
    /// is off. Shutdown awaits it (a running command is killed first).
    pub fn spawn(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.settings.enabled {
            return None;
        }
        let me = self.clone();
        let stopper = self.clone();
        Some(rt.spawn(async move {
            let every = Duration::from_secs(me.settings.check_secs);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let m = me.clone();
                let mut round = tokio::task::spawn_blocking(move || m.round());
                tokio::select! {
                    _ = shutdown.changed() => {
                        // A running command is killed; the round returns at once.
                        stopper.stop.store(true, Ordering::Relaxed);
                        let _ = round.await;
                        break;
                    }
                    _ = &mut round => {}
                }
            }
        }))
    }

    /// `train NAME`: runs one round of NAME's commands now (each `runs` times), in the
    /// background.
    pub fn train_now(self: &Arc<Self>, path: &Path) -> Result<String, ActionError> {
        let commands: Vec<TrainCommand> = self
            .reload()
            .into_iter()
            .filter(|c| self.resolve(c).is_ok_and(|p| p == path))
            .collect();
        if commands.is_empty() {
            let refused = self.lock().refused.clone();
            let mut msg = format!(
                "no training command for {} in {}",
                path.display(),
                self.settings.dir.display()
            );
            if !refused.is_empty() {
                let why: Vec<String> = refused.iter().map(|(_, w)| w.clone()).collect();
                msg.push_str(&format!(" (refused files: {})", why.join("; ")));
            }
            return Err(ActionError::invalid(msg));
        }
        let n = commands.len();
        let me = self.clone();
        let original = path.to_path_buf();
        std::thread::Builder::new()
            .name("optbin-train".into())
            .spawn(move || {
                for c in commands {
                    for _ in 0..c.runs {
                        me.run_one(&c, &original);
                    }
                }
            })
            .map_err(|e| ActionError::io(format!("starting a training thread: {e}")))?;
        Ok(format!("running {n} training command(s) for {}", path.display()))
    }

    /// The `training` status section.
    pub fn status(self: &Arc<Self>) -> Arc<dyn SubsystemStatus> {
        Arc::new(TrainStatus(self.clone()))
    }
}

struct TrainStatus(Arc<Trainer>);

impl SubsystemStatus for TrainStatus {
    fn name(&self) -> &'static str {
        "training"
    }

    fn section(&self, sections: &mut MachineSections) {
        let t = &self.0;
        let st = t.lock();
        let runs: u64 = st.progress.values().map(|p| p.runs).sum();
        let load = st.load_per_cpu.map(|l| format!("{l:.2}")).unwrap_or_else(|| "?".into());
        let summary = if !t.settings.enabled {
            "disabled ([train] enabled = false)".to_string()
        } else {
            let mut s = format!(
                "{} command(s) in {}, {runs} run(s); load per CPU {load} ({} below {})",
                st.commands.len(),
                t.settings.dir.display(),
                if st.idle { "idle:" } else { "busy: not" },
                t.settings.idle_load
            );
            for (f, why) in &st.refused {
                s.push_str(&format!("; REFUSED {}: {why}", f.display()));
            }
            s
        };
        sections.training = Some(TrainingMachine {
            commands: st
                .commands
                .iter()
                .map(|c| TrainingCommand {
                    args: c.args.clone(),
                    binary: c.binary.clone(),
                    file: c.file.clone(),
                    progress: st.progress.get(&c.file).cloned().unwrap_or_default(),
                    user: c.user.clone(),
                })
                .collect(),
            dir: t.settings.dir.clone(),
            enabled: t.settings.enabled,
            idle: st.idle,
            idle_load: t.settings.idle_load,
            load_per_cpu: st.load_per_cpu,
            refused: st
                .refused
                .iter()
                .map(|(file, why)| RefusedFile { error: why.clone(), file: file.clone() })
                .collect(),
            summary,
        });
    }

    fn binary(&self, conn: &rusqlite::Connection, binary_id: i64, details: &mut BinaryDetails) {
        details.training = self.training_of(conn, binary_id);
    }
}

impl TrainStatus {
    fn training_of(&self, conn: &rusqlite::Connection, binary_id: i64) -> Option<TrainingBinary> {
        let paths = crate::catalog::runs::paths_of_binary(conn, binary_id).ok()?;
        let t = &self.0;
        let st = t.lock();
        let mine: Vec<&TrainCommand> = st
            .commands
            .iter()
            .filter(|c| t.resolve(c).is_ok_and(|p| paths.iter().any(|q| Path::new(q) == p)))
            .collect();
        if mine.is_empty() {
            return None;
        }
        let progress: Vec<Progress> =
            mine.iter().map(|c| st.progress.get(&c.file).cloned().unwrap_or_default()).collect();
        let runs: u64 = progress.iter().map(|p| p.runs).sum();
        let last = progress.iter().filter_map(|p| p.last_outcome.clone()).next_back();
        let mut output_checks: Vec<OutputCheckStatus> = st
            .checks
            .iter()
            .filter(|((file, _), _)| mine.iter().any(|c| &c.file == file))
            .map(|((_, variant), (cmd, verdict, at))| OutputCheckStatus {
                command: check::command_name(cmd),
                variant: *variant,
                verdict: verdict.clone(),
                at: *at,
            })
            .collect();
        output_checks.sort_by(|a, b| (a.variant, &a.command).cmp(&(b.variant, &b.command)));
        let checks_text: Vec<String> = output_checks.iter().map(OutputCheckStatus::text).collect();
        Some(TrainingBinary {
            commands: mine.len(),
            runs,
            summary: format!(
                "training: {runs} run(s) of {} command(s){}{}",
                mine.len(),
                last.map(|l| format!(", last {l}")).unwrap_or_default(),
                if checks_text.is_empty() {
                    String::new()
                } else {
                    format!("; output checks: {}", checks_text.join("; "))
                }
            ),
            output_checks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_bad_keys_and_default() {
        let s: TrainSettings = toml::from_str("idle_load = 2.0\ncheck_secs = 1").unwrap();
        s.validate().unwrap();
        assert_eq!((s.idle_load, s.check_secs, s.enabled), (2.0, 1, true));
        let err = toml::from_str::<TrainSettings>("idle = 2.0").unwrap_err().to_string();
        assert!(err.contains("unknown field `idle`"), "{err}");
        let s: TrainSettings = toml::from_str("dir = \"train.d\"").unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("absolute"));
    }

    #[test]
    fn stages_that_learn_from_runs() {
        for s in ["", "collecting", "canary", "queued"] {
            assert!(needs_runs(s), "{s}");
        }
        for s in ["serving_optimized", "serving_original", "excluded", "pinned", "crashed"] {
            assert!(!needs_runs(s), "{s}");
        }
        let e =
            serde_json::json!({"details": {"policy": {"stage": {"canary": {"variant_id": 1}}}}});
        assert_eq!(stage_key(&e), "canary");
    }
}

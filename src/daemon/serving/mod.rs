//! Serving: what each path of the overlay serves, decided by the policy and applied to the
//! overlay's serving table, with the runs of served binaries measured for it. One job per
//! file:
//! - [`measurement`]: the measurer fed by the overlay's exec-time opens, and the hand-over of
//!   measured runs to the policy task;
//! - [`translate`]: a policy decision -> a serving-table entry (and the store-file check);
//! - [`reconcile`]: the [`Reconciler`], the one path by which anything changes what a path
//!   serves (exclusions, then the policy's decision, applied under one lock), the policy
//!   task's sink and the task that applies its changes and re-derives diverged paths;
//! - [`instrumented`]: exec counts of instrumented variants (how big their share is, the
//!   policy decides: `crate::policy::instrumented`);
//! - [`rlimit`]: the open-files limit measurement needs;
//! - [`status`]: the "policy" section of the status report.
//!
//! [`Serving::new`] builds everything (measurer, status object, the [`Reconciler`] that
//! control commands, start-up and new versions use); [`Serving::spawn`] consumes it and
//! starts the tasks, returning their handles so shutdown can await each.
//!
//! The exec path: the overlay's lookup draws the variant per exec from the serving table
//! (a canary or exploration share below 1.0 is drawn per lookup); the kernel then opens the
//! chosen file for exec and the overlay reports `FsEvent::Opened { exec: true }` on the FUSE
//! request thread, while the process is still blocked in execve. The measuring event sink
//! attaches the run counters right there (they start counting when the exec completes), then
//! forwards the event. A failure to attach leaves that run unmeasured; serving never waits.
//!
//! One source of serving decisions: the policy. Whenever it (or a control command, or a new
//! version of a binary) changes what a path should get, [`Reconciler::refresh`] applies the
//! exclusions (the user's `exclude` and the config's deny/allow lists), re-derives the
//! decision from the catalog and applies it, under one lock, so the last application always
//! reflects the newest catalog state (a decision computed before a pin can never be applied
//! after it). The policy task only reports a path when its decision differs from what it
//! last reported; a path whose table entry was set to something else (a control command
//! applied at once, or a state the task never evaluated) would miss the task's next change
//! back. Such paths are marked diverged and re-derived every [`RECONCILE_EVERY`] until the
//! table and the task agree again.
//!
//! Without measurement (the process connector or perf is unavailable, or `measure = false`)
//! canaries are not run: a variant that was never measured would get execs with no crash
//! detection. Promoted variants and pins are still served; status says why measurement is
//! off.

pub mod binding;
mod instrumented;
mod measurement;
mod reconcile;
mod rlimit;
mod status;
mod translate;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::catalog::Catalog;
use crate::clock::SystemClock;
use crate::config::{Config, PathPatterns};
use crate::control::SubsystemStatus;
use crate::daemon::native_execs::{self, NativeExecs};
use crate::fs::{EventSink, ServingTable};
use crate::measure::{Measurer, RunRecord};
use crate::policy::Settings as PolicySettings;
use crate::policy::load::{NoPipeline, PipelineView};
use crate::policy::task::{PolicyTaskOptions, run_policy};
use crate::profile::instrument::InstrumentationBudget;
use crate::warm::Warmer;
use binding::{Binder, BinderSetup};
use instrumented::InstrServing;
use measurement::{Measurement, MeasuringEvents, count_runs};
use reconcile::{Inner, TableSink, apply_decisions};
pub use reconcile::{RECONCILE_EVERY, Reconciler};
use rlimit::raise_open_files_limit;
use status::PolicyStatus;

/// What serving is built from, besides the catalog, the table and the measurer.
pub struct Parts {
    /// `[policy]`, validated.
    pub settings: PolicySettings,
    /// Where the optimizing pipeline is per binary (for stage texts).
    pub pipeline: Arc<dyn PipelineView>,
    /// Instrumentation mode's budget; None when it is off.
    pub instrumentation: Option<InstrumentationBudget>,
    /// Paths the config leaves alone.
    pub exclusions: Exclusions,
    /// The mount's path, where promoted variants are bind-mounted (`binding`); None: none
    /// is (tests without a mount).
    pub mountpoint: Option<PathBuf>,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            settings: PolicySettings::default(),
            pipeline: Arc::new(NoPipeline),
            instrumentation: None,
            exclusions: Exclusions::default(),
            mountpoint: None,
        }
    }
}

/// The config's deny/allow lists and the overlaid directories (start-up looks for denied
/// paths there).
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    pub patterns: PathPatterns,
    pub overlay: Vec<PathBuf>,
}

/// Measurement, the policy task and the serving table's reconciliation, wired into one
/// server process.
pub struct Serving {
    inner: Arc<Inner>,
    settings: PolicySettings,
    /// Execs of binaries passed through until they have a variant (heard only while runs
    /// are measured: the measurer reads the process events).
    native: Arc<NativeExecs>,
    /// The measurer's records and its killed-run signal, for the policy task (None without
    /// a measurer).
    records: Option<(mpsc::UnboundedReceiver<RunRecord>, Arc<Notify>)>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("settings", &self.settings)
            .field("measuring", &self.inner.measurement.is_on())
            .finish_non_exhaustive()
    }
}

impl Serving {
    /// Raises the open-files limit (one perf fd per measured live process) and starts the
    /// measurer (needs root). A measurer that cannot start is not an error: the daemon
    /// serves without canaries and status says why. `pipeline` tells where the optimizing
    /// pipeline is per binary (for stage texts).
    pub fn new(
        cfg: &Config,
        catalog: &Catalog,
        table: Arc<ServingTable>,
        pipeline: Arc<dyn PipelineView>,
    ) -> Self {
        let settings = cfg.policy.clone();
        let measured = if !settings.measure {
            Err("turned off in the config (policy.measure = false)".to_string())
        } else {
            if let Err(e) = raise_open_files_limit() {
                tracing::warn!(error = %format!("{e:#}"), "could not raise the open-files limit");
            }
            Measurer::start().map_err(|e| format!("{e:#}"))
        };
        if let Err(why) = &measured {
            tracing::warn!(why = %why, "runs are not measured: no canary will be run");
        }
        let parts = Parts {
            settings,
            pipeline,
            instrumentation: cfg.profile.instrumentation_budget(),
            exclusions: Exclusions { patterns: cfg.patterns.clone(), overlay: cfg.overlay.clone() },
            mountpoint: Some(cfg.mountpoint.clone()),
        };
        Self::with_measurer(parts, catalog, table, measured)
    }

    /// Assembles the wiring around a given measurer (or the reason there is none).
    pub fn with_measurer(
        parts: Parts,
        catalog: &Catalog,
        table: Arc<ServingTable>,
        measured: Result<(Measurer, mpsc::UnboundedReceiver<RunRecord>), String>,
    ) -> Self {
        let binder = parts.mountpoint.map(|mountpoint| {
            Binder::start(BinderSetup {
                table: table.clone(),
                mountpoint,
                enabled: parts.settings.bind_served,
                measuring: measured.is_ok(),
            })
        });
        if let (Some(b), Ok((m, _))) = (&binder, &measured)
            && let Some(bound) = b.bound_execs()
        {
            m.set_bound_execs(bound);
        }
        let (measurement, records) = match measured {
            Ok((m, rx)) => {
                let killed = m.killed_runs();
                (Measurement::on(m), Some((rx, killed)))
            }
            Err(why) => (Measurement::off(why), None),
        };
        let inner = Arc::new(Inner {
            catalog: catalog.clone(),
            serving: table,
            config: parts.settings.policy_config(),
            measurement: Arc::new(measurement),
            pipeline: parts.pipeline,
            exclusions: parts.exclusions,
            apply_order: Mutex::new(()),
            reported: Mutex::new(HashMap::new()),
            diverged: Mutex::new(HashSet::new()),
            clock: Arc::new(SystemClock),
            instr: Arc::new(InstrServing { budget: parts.instrumentation, ..Default::default() }),
            binder,
        });
        Self { inner, settings: parts.settings, records, native: Arc::default() }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Whether runs are measured (and so canaries run).
    pub fn measuring(&self) -> bool {
        self.inner.measurement.is_on()
    }

    /// Hears the execs of binaries the mount passes through until they have a variant
    /// (`crate::daemon::native_execs`): counted for status and instrumentation mode, and
    /// told to `warmer`. False when runs are not measured: the measurer reads the process
    /// events, so without it those execs go unheard.
    pub fn hear_native_execs(&self, warmer: Arc<Warmer>, overlay_dirs: Vec<PathBuf>) -> bool {
        let Some(m) = &self.inner.measurement.measurer else { return false };
        let table = self.inner.serving.clone();
        if let Some(b) = &self.inner.binder {
            b.set_warmer(warmer.clone());
        }
        m.set_exec_hook(native_execs::hook(self.native.clone(), warmer, table, overlay_dirs));
        true
    }

    /// The execs of passed-through binaries heard so far (see [`Serving::hear_native_execs`]).
    pub fn native_execs(&self) -> Arc<NativeExecs> {
        self.native.clone()
    }

    /// The "policy" section of the status report.
    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        Arc::new(PolicyStatus { inner: self.inner.clone(), native: self.native.clone() })
    }

    /// Wraps the overlay's event sink: exec-time opens get their run counters attached
    /// (synchronously, before the exec completes), then every event goes on to `next`.
    pub fn event_sink(&self, next: Arc<dyn EventSink>) -> Arc<dyn EventSink> {
        Arc::new(MeasuringEvents {
            measurement: self.inner.measurement.clone(),
            serving: self.inner.serving.clone(),
            instr: self.inner.instr.clone(),
            binder: self.inner.binder.clone(),
            next,
        })
    }

    /// What control commands, start-up and new versions use to re-derive a path's serving.
    pub fn reconciler(&self) -> Reconciler {
        Reconciler { inner: self.inner.clone() }
    }

    /// Starts the tasks: the policy task (stores runs, decides, rescans, rotates runs), the
    /// task that applies its decisions to the serving table, and the run counter. Returns
    /// their handles; each ends on `shutdown`.
    pub fn spawn(
        self,
        rt: &tokio::runtime::Handle,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let (runs_tx, runs_rx) = mpsc::unbounded_channel();
        if let Some((records, killed)) = self.records {
            tasks.push(rt.spawn(count_runs(
                self.inner.measurement.clone(),
                records,
                killed,
                runs_tx,
                shutdown.clone(),
            )));
        }
        if let Some(binder) = self.inner.binder.clone() {
            // The bind mounts go when the server stops (a path walk per mount: not on the
            // runtime's threads).
            let mut stop = shutdown.clone();
            tasks.push(rt.spawn(async move {
                let _ = stop.changed().await;
                let _ = tokio::task::spawn_blocking(move || binder.stop()).await;
            }));
        }
        // Without a measurer the run channel is closed at once: the task only rescans.
        let (paths_tx, paths_rx) = mpsc::unbounded_channel();
        tasks.push(rt.spawn(apply_decisions(self.inner.clone(), paths_rx, shutdown.clone())));
        let s = &self.settings;
        let opts = PolicyTaskOptions {
            config: self.inner.config.clone(),
            pipeline: self.inner.pipeline.clone(),
            clock: self.inner.clock.clone(),
            rescan_every: Duration::from_millis(s.rescan_ms),
            runs_max_age: Duration::from_secs(s.runs_max_age_days.saturating_mul(86_400)),
            runs_max_rows: s.runs_max_rows,
            ..PolicyTaskOptions::default()
        };
        let catalog = self.inner.catalog.clone();
        let sink = Arc::new(TableSink { inner: self.inner.clone(), paths: paths_tx });
        tasks.push(rt.spawn(async move {
            if let Err(e) = run_policy(catalog, runs_rx, sink, shutdown, opts).await {
                tracing::error!(error = %format!("{e:#}"), "the policy task stopped");
            }
        }));
        tasks
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain map updates: a panic while holding the lock leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

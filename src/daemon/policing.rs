//! Wiring of measurement (`crate::measure`) and the policy (`crate::policy`) into the daemon:
//! the `[policy]` settings, the measurer fed by the overlay's exec-time opens, the policy
//! task, and the translation of the policy's decisions into the overlay's serving table.
//!
//! [`Policing::new`] builds everything (settings, measurer, status object, the
//! [`Reconciler`] that control commands and start-up use); [`Policing::spawn`] consumes it
//! and starts the tasks, returning their handles so shutdown can await each.
//!
//! The exec path: the overlay's lookup draws the variant per exec from the serving table
//! (a canary or exploration share below 1.0 is drawn per lookup); the kernel then opens the
//! chosen file for exec and the overlay reports `FsEvent::Opened { exec: true }` on the FUSE
//! request thread, while the process is still blocked in execve. [`MeasuringEvents`] attaches
//! the run counters right there (they start counting when the exec completes), then forwards
//! the event. A failure to attach leaves that run unmeasured; serving never waits for it.
//!
//! One source of serving decisions: the policy. Whenever it (or a control command, or a new
//! version of a binary) changes what a path should get, [`Policing::refresh`] re-derives the
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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

mod status;

pub use crate::policy::Settings as PolicySettings;
use status::PolicyStatus;

use crate::catalog::Catalog;
use crate::catalog::base::{self, VariantRow};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::control::SubsystemStatus;
use crate::fs::{EventSink, FsEvent, ServedVariant, ServingTable};
use crate::identity::FileKey;
use crate::measure::{ExecOpen, Measurer, RunExit, RunRecord};
use crate::policy::load::PipelineView;
use crate::policy::task::{PolicyTaskOptions, ServingSink, reevaluate_binary, run_policy};
use crate::policy::{PolicyConfig, ServeDecision, VariantState};
use crate::profile::instrument::InstrumentationBudget;

/// How often paths whose table entry differs from the policy task's last report are
/// re-derived (see the module doc); nothing is done while there are none.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// How long measured runs that ended normally are held to reach the policy as one batch.
pub const HAND_OVER_EVERY: Duration = Duration::from_millis(100);

/// The measurer (if it runs) and what became of the runs it saw.
struct Measurement {
    measurer: Option<Measurer>,
    /// Why measurement is off; `None` while it runs.
    off: Option<String>,
    /// Exec-time opens whose counters could not be attached (those runs are not measured).
    not_attached: AtomicU64,
    /// Run records received from the measurer since start.
    measured: AtomicU64,
    /// Of those, runs killed by a signal.
    killed: AtomicU64,
}

impl Measurement {
    fn off(why: String) -> Self {
        Self {
            measurer: None,
            off: Some(why),
            not_attached: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            killed: AtomicU64::new(0),
        }
    }

    fn on(measurer: Measurer) -> Self {
        Self { measurer: Some(measurer), off: None, ..Self::off(String::new()) }
    }

    fn is_on(&self) -> bool {
        self.measurer.is_some()
    }

    /// Attaches counters to an exec'ing process; never fails the exec.
    fn on_exec_open(&self, open: ExecOpen) {
        let Some(m) = &self.measurer else { return };
        let pid = open.pid;
        if let Err(e) = m.on_exec_open(open) {
            // A process killed while blocked in execve, or out of file descriptors: that
            // run goes unmeasured, the exec goes on.
            let n = self.not_attached.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                tracing::warn!(pid, error = %format!("{e:#}"), "a run could not be measured");
            } else {
                tracing::debug!(pid, error = %format!("{e:#}"), "a run could not be measured");
            }
        }
    }
}

/// Instrumentation mode's serving (`[profile] instrumentation = "on"`): a path whose policy
/// decision is the original, with no pin, and whose binary has a `ready` instrumented
/// variant, gets that variant for the share of execs [`instrument_share`] says. Execs that
/// got it are counted here from the overlay's exec-time opens (in memory: a restarted
/// server starts counting again; the collected runs in the catalog still cap it).
#[derive(Default)]
struct InstrServing {
    budget: Option<InstrumentationBudget>,
    /// Execs served per instrumented variant id (those this process decided to serve).
    served: Mutex<HashMap<i64, u64>>,
    /// Paths whose share changes (a count crossed a limit): re-derived on the next
    /// reconciliation tick.
    recheck: Mutex<HashSet<PathBuf>>,
}

impl InstrServing {
    fn budget(&self) -> Option<InstrumentationBudget> {
        self.budget
    }

    /// Counts an exec of `variant_id` if it is an instrumented variant being served.
    fn on_exec(&self, original: &Path, variant_id: i64) {
        let Some(b) = self.budget() else { return };
        let mut served = lock(&self.served);
        let Some(n) = served.get_mut(&variant_id) else { return };
        *n += 1;
        if *n == b.first_runs || *n >= b.max_runs.saturating_mul(2) {
            lock(&self.recheck).insert(original.to_path_buf());
        }
    }
}

/// The share of execs an instrumented variant gets after `served` execs got it and
/// `collected` instrumented runs were merged: every exec for the first N, then 1 in K, and
/// none once the profile is complete (`collected >= max_runs`) or twice `max_runs` execs
/// got it (runs that wrote no profile, killed or exec'ing something else, are not retried
/// forever).
pub fn instrument_share(b: &InstrumentationBudget, served: u64, collected: u64) -> f64 {
    if collected >= b.max_runs || served >= b.max_runs.saturating_mul(2) {
        return 0.0;
    }
    if served < b.first_runs {
        1.0
    } else if b.then_one_in == 0 {
        0.0
    } else {
        1.0 / b.then_one_in as f64
    }
}

/// Shared by the status object, the event sink, the tasks and control commands.
struct Inner {
    catalog: Catalog,
    serving: Arc<ServingTable>,
    config: PolicyConfig,
    measurement: Arc<Measurement>,
    /// Where the optimizing pipeline is per binary (for stage texts).
    pipeline: Arc<dyn PipelineView>,
    /// Held from reading the catalog to writing the serving table (see the module doc).
    apply_order: Mutex<()>,
    /// What the policy task last reported per path (it reports only changes).
    reported: Mutex<HashMap<PathBuf, ServeDecision>>,
    /// Paths whose applied decision differs from `reported`.
    diverged: Mutex<HashSet<PathBuf>>,
    clock: Arc<dyn Clock>,
    instr: Arc<InstrServing>,
}

/// The policy and measurement, wired into one server process.
pub struct Policing {
    inner: Arc<Inner>,
    settings: PolicySettings,
    /// The measurer's records, for the policy task (None without a measurer).
    records: Option<mpsc::UnboundedReceiver<RunRecord>>,
}

/// Re-derives what a path serves from the catalog and applies it (see
/// [`Policing::reconciler`]); cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

impl Reconciler {
    /// Re-derives what `path` serves from the catalog (re-evaluating its binary, so that a
    /// pin, an exclusion or a reset takes effect at once) and applies it to the serving
    /// table. Blocking (catalog round trips): call it from plain threads or
    /// `spawn_blocking`, never from the catalog thread.
    pub fn refresh(&self, path: &Path) {
        self.inner.refresh(path);
    }
}

impl std::fmt::Debug for Policing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policing")
            .field("settings", &self.settings)
            .field("measuring", &self.inner.measurement.is_on())
            .finish_non_exhaustive()
    }
}

impl Policing {
    /// Parses `[policy]`, raises the open-files limit (one perf fd per measured live
    /// process) and starts the measurer (needs root). A measurer that cannot start is not
    /// an error: the daemon serves without canaries and status says why.
    /// `pipeline` tells where the optimizing pipeline is per binary (for stage texts).
    pub fn new(
        cfg: &Config,
        catalog: &Catalog,
        serving: Arc<ServingTable>,
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
        let budget = cfg.profile.instrumentation_budget();
        Self::with_measurer(settings, catalog, serving, pipeline, budget, measured)
    }

    /// Assembles the wiring around a given measurer (or the reason there is none).
    pub fn with_measurer(
        settings: PolicySettings,
        catalog: &Catalog,
        serving: Arc<ServingTable>,
        pipeline: Arc<dyn PipelineView>,
        instrumentation: Option<InstrumentationBudget>,
        measured: Result<(Measurer, mpsc::UnboundedReceiver<RunRecord>), String>,
    ) -> Self {
        let (measurement, records) = match measured {
            Ok((m, rx)) => (Measurement::on(m), Some(rx)),
            Err(why) => (Measurement::off(why), None),
        };
        let inner = Arc::new(Inner {
            catalog: catalog.clone(),
            serving,
            config: settings.policy_config(),
            measurement: Arc::new(measurement),
            pipeline,
            apply_order: Mutex::new(()),
            reported: Mutex::new(HashMap::new()),
            diverged: Mutex::new(HashSet::new()),
            clock: Arc::new(SystemClock),
            instr: Arc::new(InstrServing { budget: instrumentation, ..Default::default() }),
        });
        Self { inner, settings, records }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Whether runs are measured (and so canaries run).
    pub fn measuring(&self) -> bool {
        self.inner.measurement.is_on()
    }

    /// The "policy" section of the status report.
    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        Arc::new(PolicyStatus { inner: self.inner.clone() })
    }

    /// Wraps the overlay's event sink: exec-time opens get their run counters attached
    /// (synchronously, before the exec completes), then every event goes on to `next`.
    pub fn event_sink(&self, next: Arc<dyn EventSink>) -> Arc<dyn EventSink> {
        Arc::new(MeasuringEvents {
            measurement: self.inner.measurement.clone(),
            instr: self.inner.instr.clone(),
            next,
        })
    }

    /// What control commands, start-up and new versions use to re-derive a path's serving.
    pub fn reconciler(&self) -> Reconciler {
        Reconciler { inner: self.inner.clone() }
    }

    /// Re-derives what `path` serves and applies it (see [`Reconciler::refresh`]).
    pub fn refresh(&self, path: &Path) {
        self.inner.refresh(path);
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
        if let Some(records) = self.records {
            tasks.push(rt.spawn(count_runs(
                self.inner.measurement.clone(),
                records,
                runs_tx,
                shutdown.clone(),
            )));
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

/// What the serving table gets for a path.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Original,
    /// The variant for a `share` of execs (0 < share <= 1), the original for the rest.
    Variant {
        variant: ServedVariant,
        share: f64,
    },
}

/// Translates a policy decision for a path whose file has `key` (the key the catalog
/// recorded for the content the decision is about) into a serving-table entry. `variants`
/// are the rows of that content's variants. Without measurement a canary is not run; a
/// promoted variant then gets every exec (exploration runs would not be measured either).
fn translate(
    decision: ServeDecision,
    variants: &[VariantRow],
    key: FileKey,
    measuring: bool,
) -> Target {
    let (variant_id, share) = match decision {
        ServeDecision::Original => return Target::Original,
        ServeDecision::Variant(id) => (id, 1.0),
        ServeDecision::Split { variant_id, variant_share } => (variant_id, variant_share),
    };
    let Some(row) = variants.iter().find(|v| v.id == variant_id) else {
        return Target::Original;
    };
    let share = match (measuring, VariantState::parse(&row.state)) {
        (true, _) => share,
        (false, Some(VariantState::Canary | VariantState::Ready)) if share < 1.0 => {
            return Target::Original;
        }
        (false, _) => 1.0,
    };
    if share.is_nan() || share <= 0.0 {
        return Target::Original;
    }
    Target::Variant {
        variant: ServedVariant {
            variant_id,
            path_in_store: PathBuf::from(&row.store_path),
            size: row.size,
            expected_original: key,
        },
        share: share.min(1.0),
    }
}

impl Inner {
    fn pipeline(&self) -> Arc<dyn PipelineView> {
        self.pipeline.clone()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }

    fn refresh(&self, path: &Path) {
        let _order = self.apply_order.lock().unwrap_or_else(|e| e.into_inner());
        let (decision, target) = self.derive(path).unwrap_or_else(|e| {
            // Serving the original is always safe.
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "deciding what to serve failed; serving the original");
            (ServeDecision::Original, Target::Original)
        });
        self.apply(path, target);
        let reported = lock(&self.reported).get(path).copied().unwrap_or(ServeDecision::Original);
        let mut diverged = lock(&self.diverged);
        if decision == reported {
            diverged.remove(path);
        } else {
            diverged.insert(path.to_path_buf());
        }
    }

    /// The policy's current decision for `path` and its translation, with the variant file
    /// checked.
    fn derive(&self, path: &Path) -> anyhow::Result<(ServeDecision, Target)> {
        let original = (ServeDecision::Original, Target::Original);
        let Ok(key) = FileKey::of(path) else { return Ok(original) };
        let text = path.to_string_lossy().into_owned();
        let (cfg, pipeline, now) = (self.config.clone(), self.pipeline(), self.now_ms());
        let measuring = self.measurement.is_on();
        let instrumenting = self.instr.budget().is_some();
        let original = (original.0, original.1, None);
        let (decision, target, instrumented) = self.catalog.run_blocking(move |c| {
            let Some(row) = base::path_row(c, &text)? else { return Ok(original) };
            // Variants belong to content: only those of the version now at the path count.
            let Some(binary_id) = row.binary_id.filter(|_| row.key == key) else {
                return Ok(original);
            };
            if base::variants_of(c, binary_id)?.is_empty() {
                return Ok(original);
            }
            let decision = reevaluate_binary(c, binary_id, &cfg, &*pipeline, now)?
                .into_iter()
                .find(|(p, _, _)| *p == text)
                .map_or(ServeDecision::Original, |(_, d, _)| d);
            // The states after the evaluation's own transitions.
            let variants = base::variants_of(c, binary_id)?;
            let target = translate(decision, &variants, key, measuring);
            // Instrumentation only where the policy serves the original and nothing is
            // pinned (a pin to the original means exactly the original).
            let instrumented = if instrumenting
                && target == Target::Original
                && crate::policy::load::controls_of(c, &text)?.pin.is_none()
            {
                let v = variants
                    .into_iter()
                    .find(|v| !crate::policy::load::is_policed_kind(&v.kind) && v.state == "ready");
                match v {
                    Some(v) => {
                        Some((v, crate::catalog::profiles::instrumented_runs(c, binary_id)?))
                    }
                    None => None,
                }
            } else {
                None
            };
            Ok((decision, target, instrumented))
        })?;
        let target = match instrumented {
            Some((row, collected)) => self.instrumented_target(&row, key, collected),
            None => target,
        };
        if let Target::Variant { variant, .. } = &target
            && let Err(e) = check_store_file(variant)
        {
            tracing::warn!(error = %format!("{e:#}"), "a variant cannot be served; serving the original");
            return Ok((decision, Target::Original));
        }
        Ok((decision, target))
    }

    /// The serving of an instrumented variant (see [`InstrServing`]); registers it so that
    /// its execs are counted.
    fn instrumented_target(&self, row: &VariantRow, key: FileKey, collected: u64) -> Target {
        let Some(budget) = self.instr.budget() else { return Target::Original };
        let served = *lock(&self.instr.served).entry(row.id).or_insert(0);
        let share = instrument_share(&budget, served, collected);
        if share <= 0.0 {
            return Target::Original;
        }
        Target::Variant {
            variant: ServedVariant {
                variant_id: row.id,
                path_in_store: PathBuf::from(&row.store_path),
                size: row.size,
                expected_original: key,
            },
            share,
        }
    }

    fn diverged_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = lock(&self.diverged).iter().cloned().collect();
        paths.extend(lock(&self.instr.recheck).drain());
        paths
    }

    fn apply(&self, path: &Path, target: Target) {
        let now = self.serving.served_share(path);
        // An excluded path (by the user or the config's lists) is a link to the original:
        // nothing is served for it, whatever the policy says.
        let target = if self.serving.is_excluded(path) { Target::Original } else { target };
        match target {
            Target::Original if now.is_some() => {
                tracing::info!(path = %path.display(), "serving the original");
                self.serving.serve(path, None);
            }
            Target::Original => {}
            Target::Variant { variant, share } => {
                if now.as_ref() != Some(&(variant.clone(), share)) {
                    tracing::info!(path = %path.display(), variant = variant.variant_id, share, "serving a variant");
                    self.serving.serve_share(path, variant, share);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain map updates: a panic while holding the lock leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The overlay checks the size on every open (EIO on a mismatch): refuse to serve a store
/// file that is missing or not what the catalog says.
fn check_store_file(v: &ServedVariant) -> anyhow::Result<()> {
    let md = std::fs::metadata(&v.path_in_store)
        .with_context(|| format!("variant {} at {}", v.variant_id, v.path_in_store.display()))?;
    anyhow::ensure!(
        md.is_file() && md.len() == v.size,
        "variant {} at {} has {} bytes, the catalog says {}",
        v.variant_id,
        v.path_in_store.display(),
        md.len(),
        v.size
    );
    Ok(())
}

/// Raises the soft limit on open files to the hard one (and the hard one to 65536 when it
/// is lower and we may): every measured process holds a perf fd in the daemon until it ends.
fn raise_open_files_limit() -> anyhow::Result<u64> {
    const WANTED: libc::rlim_t = 65_536;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let raised =
        libc::rlimit { rlim_cur: lim.rlim_max.max(WANTED), rlim_max: lim.rlim_max.max(WANTED) };
    // SAFETY: raised is a valid rlimit. Raising the hard limit needs CAP_SYS_RESOURCE.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(raised.rlim_cur);
    }
    let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above; the soft limit may always go up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(soft.rlim_cur)
}

/// The overlay's event sink with measurement in front (see the module doc).
struct MeasuringEvents {
    measurement: Arc<Measurement>,
    instr: Arc<InstrServing>,
    next: Arc<dyn EventSink>,
}

impl EventSink for MeasuringEvents {
    fn event(&self, event: FsEvent) {
        if let FsEvent::Opened { original, key, variant_id, pid, exec: true, .. } = &event {
            self.measurement.on_exec_open(ExecOpen {
                pid: *pid as i32,
                original: original.clone(),
                variant_id: *variant_id,
                // The catalog attributes the run by the variant or the path's key.
                binary_id: None,
                key: *key,
            });
            if let Some(v) = variant_id {
                self.instr.on_exec(original, *v);
            }
        }
        self.next.event(event);
    }
}

/// Tells the applier which paths' decisions changed, and remembers what the policy task
/// reported. The decision itself is re-derived at apply time (see the module doc), so a
/// stale one can never win.
struct TableSink {
    inner: Arc<Inner>,
    paths: mpsc::UnboundedSender<PathBuf>,
}

impl ServingSink for TableSink {
    fn set_decision(&self, original: &Path, decision: ServeDecision) {
        tracing::debug!(path = %original.display(), ?decision, "policy decision");
        lock(&self.inner.reported).insert(original.to_path_buf(), decision);
        // A closed channel means the server is stopping.
        let _ = self.paths.send(original.to_path_buf());
    }
}

/// Applies changed decisions to the serving table, and re-derives diverged paths, off the
/// async workers (catalog round trips and the kernel's invalidations block).
async fn apply_decisions(
    inner: Arc<Inner>,
    mut paths: mpsc::UnboundedReceiver<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = BTreeSet::new();
        tokio::select! {
            _ = shutdown.changed() => break,
            p = paths.recv() => match p {
                Some(p) => { batch.insert(p); }
                None => break,
            },
            _ = reconcile.tick() => batch.extend(inner.diverged_paths()),
        }
        // Paths queued meanwhile are refreshed once each.
        while let Ok(p) = paths.try_recv() {
            batch.insert(p);
        }
        if batch.is_empty() {
            continue;
        }
        let inner = inner.clone();
        let done = tokio::task::spawn_blocking(move || {
            for p in batch {
                inner.refresh(&p);
            }
        });
        if let Err(e) = done.await {
            tracing::error!(error = %e, "applying policy decisions panicked");
        }
    }
}

/// Counts the measurer's records for status on their way to the policy task, and hands
/// them over in bursts: the task stores and re-evaluates per batch of what is queued, and
/// one evaluation reads up to thousands of runs of the binary, so a record per exec would
/// cost an evaluation per exec. A run killed by a signal goes at once, with what is held:
/// a crash quarantines without waiting.
async fn count_runs(
    measurement: Arc<Measurement>,
    mut records: mpsc::UnboundedReceiver<RunRecord>,
    to_policy: mpsc::UnboundedSender<RunRecord>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut flush = tokio::time::interval(HAND_OVER_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held: Vec<RunRecord> = Vec::new();
    loop {
        let urgent = tokio::select! {
            _ = shutdown.changed() => break,
            r = records.recv() => match r {
                Some(record) => {
                    measurement.measured.fetch_add(1, Ordering::Relaxed);
                    let killed = matches!(record.exit, RunExit::Signaled(_));
                    if killed {
                        measurement.killed.fetch_add(1, Ordering::Relaxed);
                    }
                    held.push(record);
                    killed
                }
                None => break,
            },
            _ = flush.tick() => true,
        };
        if urgent && held.drain(..).any(|r| to_policy.send(r).is_err()) {
            break;
        }
    }
    for r in held {
        let _ = to_policy.send(r);
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc as std_mpsc;

    use super::*;
    use crate::catalog::base::{NewVariant, insert_variant, set_pin, upsert_binary, upsert_path};
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;
    use crate::measure::counters::{CounterFactory, CounterReading, RunCounters};
    use crate::measure::proc_connector::ProcEvent;
    use crate::measure::tracker::ProcessView;

    fn row(id: i64, state: &str) -> VariantRow {
        VariantRow {
            id,
            binary_id: 1,
            kind: "bolt".into(),
            sha256: String::new(),
            store_path: format!("/store/{id}"),
            size: 10,
            state: state.into(),
            bolt_version: None,
            flags: None,
            profile_samples: None,
            created_at: 0,
            note: None,
        }
    }

    fn key() -> FileKey {
        FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 }
    }

    fn share_of(t: &Target) -> Option<(i64, f64)> {
        match t {
            Target::Original => None,
            Target::Variant { variant, share } => Some((variant.variant_id, *share)),
        }
    }

    #[test]
    fn decisions_translate_to_entries_for_the_content_they_are_about() {
        let rows = [row(3, "canary"), row(4, "served")];
        let split = |v, s| ServeDecision::Split { variant_id: v, variant_share: s };
        assert_eq!(translate(ServeDecision::Original, &rows, key(), true), Target::Original);
        assert_eq!(share_of(&translate(split(3, 0.5), &rows, key(), true)), Some((3, 0.5)));
        assert_eq!(
            share_of(&translate(ServeDecision::Variant(4), &rows, key(), true)),
            Some((4, 1.0))
        );
        let Target::Variant { variant, .. } = translate(split(4, 0.95), &rows, key(), true) else {
            panic!("a served variant is served")
        };
        assert_eq!(variant.path_in_store, Path::new("/store/4"));
        assert_eq!((variant.size, variant.expected_original), (10, key()));
        // A variant of another content (the file changed since) is never served.
        assert_eq!(translate(ServeDecision::Variant(9), &rows, key(), true), Target::Original);
        assert_eq!(translate(split(3, 0.0), &rows, key(), true), Target::Original);

        // Without measurement: no canary, but promoted variants and pins are served fully.
        assert_eq!(translate(split(3, 0.5), &rows, key(), false), Target::Original);
        assert_eq!(share_of(&translate(split(4, 0.95), &rows, key(), false)), Some((4, 1.0)));
        assert_eq!(
            share_of(&translate(ServeDecision::Variant(3), &rows, key(), false)),
            Some((3, 1.0))
        );
    }

    #[test]
    fn instrumented_share_first_n_then_one_in_k_until_complete() {
        let b = InstrumentationBudget { first_runs: 2, then_one_in: 4, max_runs: 5 };
        assert_eq!(instrument_share(&b, 0, 0), 1.0);
        assert_eq!(instrument_share(&b, 1, 0), 1.0);
        assert_eq!(instrument_share(&b, 2, 0), 0.25);
        assert_eq!(instrument_share(&b, 9, 4), 0.25);
        assert_eq!(instrument_share(&b, 3, 5), 0.0, "complete");
        assert_eq!(instrument_share(&b, 10, 1), 0.0, "twice the runs served, few written");
        let never_after = InstrumentationBudget { then_one_in: 0, ..b };
        assert_eq!(instrument_share(&never_after, 2, 0), 0.0);
    }

    /// A catalog with one binary at a real file, and a real variant file in a store dir.
    struct World {
        _dir: tempfile::TempDir,
        catalog: Catalog,
        path: PathBuf,
        binary_id: i64,
        variant_id: i64,
    }

    fn world(state: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"original").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = dir.path().join("variant");
        std::fs::write(&store, b"variant!!").unwrap();
        let catalog = Catalog::in_memory().unwrap();
        let key = FileKey::of(&path).unwrap();
        let (text, store_text, state) = (
            path.to_string_lossy().into_owned(),
            store.to_string_lossy().into_owned(),
            state.to_string(),
        );
        let (binary_id, variant_id) = catalog
            .run_blocking(move |c| {
                let b = upsert_binary(
                    c,
                    &ContentId::of_bytes(b"original"),
                    8,
                    &ElfFacts::default(),
                    1,
                )?;
                upsert_path(c, &text, Some(b), &key, 1)?;
                let v = insert_variant(
                    c,
                    &NewVariant {
                        binary_id: b,
                        kind: "bolt".into(),
                        store_path: store_text,
                        size: 9,
                        state,
                        ..Default::default()
                    },
                    1,
                )?;
                Ok((b, v))
            })
            .unwrap();
        World { _dir: dir, catalog, path, binary_id, variant_id }
    }

    fn policing(w: &World, serving: &Arc<ServingTable>, measured: bool) -> Policing {
        let m = if measured { Ok(fake_measurer().0) } else { Err("not here".to_string()) };
        let pipeline = Arc::new(crate::policy::load::NoPipeline);
        Policing::with_measurer(
            PolicySettings::default(),
            &w.catalog,
            serving.clone(),
            pipeline,
            None,
            m,
        )
    }

    #[test]
    fn refresh_applies_the_policy_and_controls_to_the_serving_table() {
        let w = world("ready");
        let serving = ServingTable::new();
        let p = policing(&w, &serving, true);
        p.refresh(&w.path);
        let (v, share) = serving.served_share(&w.path).expect("the canary is served");
        assert_eq!((v.variant_id, share), (w.variant_id, 0.5));
        assert_eq!(v.expected_original, FileKey::of(&w.path).unwrap());
        let bid = w.binary_id;
        let states = w.catalog.run_blocking(move |c| base::variants_of(c, bid)).unwrap();
        assert_eq!(states[0].state, "canary", "the evaluation's transition was recorded");

        let text = w.path.to_string_lossy().into_owned();
        w.catalog.run_blocking(move |c| set_pin(c, &text, Some("original"), 2)).unwrap();
        p.refresh(&w.path);
        assert_eq!(serving.served_share(&w.path), None, "a pin to the original wins");
        let text = w.path.to_string_lossy().into_owned();
        w.catalog.run_blocking(move |c| set_pin(c, &text, Some("bolted"), 3)).unwrap();
        p.refresh(&w.path);
        assert_eq!(serving.served_share(&w.path).map(|x| x.1), Some(1.0));

        // New content at the path: its variants no longer apply.
        std::fs::write(&w.path, b"upgraded").unwrap();
        p.refresh(&w.path);
        assert_eq!(serving.served_share(&w.path), None);
    }

    #[test]
    fn without_measurement_canaries_are_not_served_and_status_says_why() {
        let w = world("ready");
        let serving = ServingTable::new();
        let p = policing(&w, &serving, false);
        assert!(!p.measuring());
        p.refresh(&w.path);
        assert_eq!(serving.served_share(&w.path), None);
        let status = p.status();
        let section = status.section();
        assert_eq!(section["measurement"]["on"], false);
        assert_eq!(section["measurement"]["why_off"], "not here");
        let summary = section["summary"].as_str().unwrap();
        assert!(summary.contains("no canaries (not here)"), "{summary}");
        let (bid, text) = (w.binary_id, w.path.to_string_lossy().into_owned());
        let (detail, reason) = w
            .catalog
            .run_blocking(move |c| Ok((status.binary(c, bid), status.served_reason(c, bid, &text))))
            .unwrap();
        let reason = reason.unwrap();
        assert!(reason.starts_with("canary") && reason.contains("measurement is off"), "{reason}");
        assert_eq!(detail.unwrap()["stage_text"], reason);
    }

    #[test]
    fn a_missing_store_file_is_not_served() {
        let w = world("served");
        let bid = w.binary_id;
        let store = w.catalog.run_blocking(move |c| base::variants_of(c, bid)).unwrap()[0]
            .store_path
            .clone();
        std::fs::remove_file(store).unwrap();
        let serving = ServingTable::new();
        policing(&w, &serving, true).refresh(&w.path);
        assert_eq!(serving.served_share(&w.path), None);
    }

    async fn wait_until(what: &str, ok: impl Fn() -> bool) {
        for _ in 0..300 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_the_task_would_not_report_is_reconciled() {
        let w = world("canary");
        let serving = ServingTable::new();
        let p = policing(&w, &serving, true);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = TableSink { inner: p.inner.clone(), paths: tx };
        // The task last reported the original (say, while the path was pinned), and that
        // report was applied long ago.
        sink.set_decision(&w.path, ServeDecision::Original);
        assert_eq!(rx.try_recv().ok(), Some(w.path.clone()));
        // A control command (unpin) applies the canary at once, behind the task's back.
        let (inner, path) = (p.inner.clone(), w.path.clone());
        tokio::task::spawn_blocking(move || inner.refresh(&path)).await.unwrap();
        assert_eq!(serving.served_share(&w.path).map(|x| x.1), Some(0.5));
        assert_eq!(p.inner.diverged_paths(), vec![w.path.clone()]);
        // The variant is quarantined: the task's decision is the original again, equal to
        // what it last reported, so it reports nothing. The reconciliation catches it.
        let vid = w.variant_id;
        w.catalog
            .run(move |c| base::set_variant_state(c, vid, "quarantined", Some("crashed")))
            .await
            .unwrap();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(apply_decisions(p.inner.clone(), rx, shutdown));
        wait_until("the reconciliation", || serving.served_share(&w.path).is_none()).await;
        wait_until("the divergence to end", || p.inner.diverged_paths().is_empty()).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        drop(sink);
    }

    use crate::measure::fakes::ChannelSource;
    struct Zero;
    impl RunCounters for Zero {
        fn read(&mut self) -> io::Result<CounterReading> {
            Ok(CounterReading::default())
        }
    }
    struct Factory;
    impl CounterFactory for Factory {
        fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>> {
            if pid == 666 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(Box::new(Zero))
        }
    }
    struct Alive;
    impl ProcessView for Alive {
        fn cmdline(&self, _pid: i32) -> Option<Vec<u8>> {
            None
        }
        fn is_alive(&self, _pid: i32) -> bool {
            true
        }
    }

    fn fake_measurer()
    -> ((Measurer, mpsc::UnboundedReceiver<RunRecord>), std_mpsc::Sender<ProcEvent>) {
        let (tx, rx) = std_mpsc::channel();
        (Measurer::with_parts(Arc::new(Factory), ChannelSource(rx), Alive).unwrap(), tx)
    }

    #[test]
    fn exec_opens_are_measured_before_the_event_is_forwarded() {
        let w = world("ready");
        let (measured, _events) = fake_measurer();
        let p = Policing::with_measurer(
            PolicySettings::default(),
            &w.catalog,
            ServingTable::new(),
            Arc::new(crate::policy::load::NoPipeline),
            None,
            Ok(measured),
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<FsEvent>();
        let sink = p.event_sink(Arc::new(tx));
        let opened = |pid, exec| FsEvent::Opened {
            mirror_path: "/mnt/x/tool".into(),
            original: w.path.clone(),
            key: key(),
            variant_id: Some(w.variant_id),
            pid,
            exec,
        };
        sink.event(opened(10, true));
        sink.event(opened(11, false));
        sink.event(opened(666, true));
        sink.event(FsEvent::Seen { original: w.path.clone(), key: key() });
        let forwarded: Vec<FsEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(forwarded.len(), 4, "every event goes on");
        let m = p.inner.measurement.measurer.as_ref().unwrap();
        assert_eq!(m.pending(), 1, "only the exec-time open that could attach is pending");
        let section = p.status().section();
        assert_eq!(section["measurement"]["dropped"]["not_attached"], 1);
        assert_eq!(section["measurement"]["pending"], 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_policy_task_drives_the_serving_table() {
        let w = world("served");
        let serving = ServingTable::new();
        let p = policing(&w, &serving, true);
        let (stop, shutdown) = watch::channel(false);
        let tasks = p.spawn(&tokio::runtime::Handle::current(), shutdown);
        // The first rescan evaluates every watched binary: the served variant gets all but
        // the exploration share.
        let mut got = None;
        for _ in 0..200 {
            got = serving.served_share(&w.path).map(|x| (x.0.variant_id, x.1));
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, Some((w.variant_id, 0.95)));
        // A pin noticed by the rescan alone (no refresh call) reaches the table too.
        let text = w.path.to_string_lossy().into_owned();
        w.catalog.run(move |c| set_pin(c, &text, Some("original"), 2)).await.unwrap();
        for _ in 0..400 {
            if serving.served_share(&w.path).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(serving.served_share(&w.path), None);
        // Shutdown ends every task it started.
        assert_eq!(tasks.len(), 3);
        stop.send(true).unwrap();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        }
    }
}

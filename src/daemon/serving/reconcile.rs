//! Keeping the serving table in line with the catalog: [`Reconciler::refresh`] applies the
//! exclusions (the user's and the config's deny/allow lists) and re-derives what a path
//! serves from the policy's decision, under one lock (see the module doc of
//! `crate::daemon::serving`); [`TableSink`] takes the policy task's changed decisions and
//! [`apply_decisions`] applies them and re-derives diverged paths.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Exclusions;
use super::instrumented::InstrServing;
use super::lock;
use super::measurement::Measurement;
use super::translate::{Target, check_store_file, sample_served_runs, translate};
use crate::catalog::Catalog;
use crate::catalog::base::{self, VariantRow, VariantState};
use crate::catalog::profiles::instrumented_runs;
use crate::clock::Clock;
use crate::fs::{ServedVariant, ServingTable};
use crate::identity::FileKey;
use crate::policy::instrumented::{self, Instrumented};
use crate::policy::load::{PipelineView, controls_of};
use crate::policy::task::{ServingSink, reevaluate_binary};
use crate::policy::{PolicyConfig, ServeDecision};

/// How often paths whose table entry differs from the policy task's last report are
/// re-derived (see the module doc); nothing is done while there are none.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// Shared by the status object, the event sink, the tasks and control commands.
pub(super) struct Inner {
    pub(super) catalog: Catalog,
    pub(super) serving: Arc<ServingTable>,
    pub(super) config: PolicyConfig,
    pub(super) measurement: Arc<Measurement>,
    /// The owner of the bind mounts of promoted variants (None without a mount).
    pub(super) binder: Option<Arc<super::binding::Binder>>,
    /// Where the optimizing pipeline is per binary (for stage texts).
    pub(super) pipeline: Arc<dyn PipelineView>,
    /// The config's deny/allow lists and the overlaid directories.
    pub(super) exclusions: Exclusions,
    /// Held from reading the catalog to writing the serving table (see the module doc).
    pub(super) apply_order: Mutex<()>,
    /// What the policy task last reported per path (it reports only changes).
    pub(super) reported: Mutex<HashMap<PathBuf, ServeDecision>>,
    /// Paths whose applied decision differs from `reported`.
    pub(super) diverged: Mutex<HashSet<PathBuf>>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) instr: Arc<InstrServing>,
}

/// The one path by which what a path serves changes (see the module doc of
/// `crate::daemon::serving`); cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    pub(super) inner: Arc<Inner>,
}

impl Reconciler {
    /// Applies the exclusions (the user's and the config's deny/allow lists) to `path`,
    /// re-derives what it serves from the catalog (re-evaluating its binary, so that a pin,
    /// an exclusion or a reset takes effect at once) and applies that to the serving table.
    /// Blocking (catalog round trips): call it from plain threads or `spawn_blocking`,
    /// never from the catalog thread.
    pub fn refresh(&self, path: &Path) {
        self.inner.refresh(path);
    }

    /// Applies the catalog to every path it knows and every path the config denies; at
    /// start-up, before the first request is served.
    pub fn refresh_all(&self) -> anyhow::Result<()> {
        let inner = &self.inner;
        let mut paths: Vec<String> = inner.catalog.run_blocking(|c| {
            let mut p: Vec<String> = base::all_paths(c)?.into_iter().map(|r| r.path).collect();
            p.extend(base::controls(c)?.into_iter().map(|r| r.path));
            Ok(p)
        })?;
        if inner.exclusions.patterns.denies_any() {
            for dir in &inner.exclusions.overlay {
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for e in entries.flatten() {
                    let p = e.path();
                    if !inner.exclusions.patterns.permits(&p) {
                        paths.push(p.to_string_lossy().into_owned());
                    }
                }
            }
        }
        paths.sort();
        paths.dedup();
        for p in paths {
            self.refresh(Path::new(&p));
        }
        Ok(())
    }
}

impl Inner {
    pub(super) fn pipeline(&self) -> Arc<dyn PipelineView> {
        self.pipeline.clone()
    }

    pub(super) fn refresh(&self, path: &Path) {
        let _order = self.apply_order.lock().unwrap_or_else(|e| e.into_inner());
        match self.apply_exclusion(path) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                // Serving the original is always safe.
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "refresh failed; serving the original");
                self.serving.serve(path, None);
                return;
            }
        }
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

    /// Marks `path` excluded in the table when the user excluded it or the config's lists
    /// leave it alone (then it is a link to the original). False when the path is gone:
    /// nothing is served for it.
    fn apply_exclusion(&self, path: &Path) -> anyhow::Result<bool> {
        if FileKey::of(path).is_err() {
            self.serving.serve(path, None);
            return Ok(false);
        }
        let text = path.to_string_lossy().into_owned();
        let control = self.catalog.run_blocking(move |c| base::control_row(c, &text))?;
        let excluded =
            control.is_some_and(|c| c.excluded) || !self.exclusions.patterns.permits(path);
        self.serving.set_excluded(path, excluded);
        Ok(true)
    }

    /// The policy's current decision for `path` and its translation, with the variant file
    /// checked.
    fn derive(&self, path: &Path) -> anyhow::Result<(ServeDecision, Target)> {
        let original = (ServeDecision::Original, Target::Original);
        let Ok(key) = FileKey::of(path) else { return Ok(original) };
        let text = path.to_string_lossy().into_owned();
        let (cfg, pipeline, now) = (self.config.clone(), self.pipeline(), self.clock.unix_ms());
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
            let target = sample_served_runs(
                translate(decision, &variants, key, measuring),
                &variants,
                cfg.served_count_one_in,
            );
            // Instrumentation mode's variant, when one is ready: whether it gets execs,
            // and how many, the policy decides (`policy::instrumented`).
            let ready = variants
                .into_iter()
                .find(|v| !v.kind.is_policed() && v.state == VariantState::Ready);
            let instrumented = match ready {
                Some(v) if instrumenting => {
                    let pinned = controls_of(c, &text)?.pin.is_some();
                    Some((v, pinned, instrumented_runs(c, binary_id)?))
                }
                _ => None,
            };
            Ok((decision, target, instrumented))
        })?;
        let target = match instrumented {
            Some((row, pinned, collected)) => {
                self.instrumented_target(&row, key, target, pinned, collected)
            }
            None => target,
        };
        if let Target::Variant { variant, second, .. } = &target
            && let Err(e) = check_store_file(variant)
                .and_then(|()| second.as_ref().map_or(Ok(()), |(v, _)| check_store_file(v)))
        {
            tracing::warn!(error = %format!("{e:#}"), "a variant cannot be served; serving the original");
            return Ok((decision, Target::Original));
        }
        Ok((decision, target))
    }

    /// What the path serves given its ready instrumented variant `row`: the policy's
    /// `decided` target, or the instrumented variant for the share the policy gives it
    /// ([`instrumented::share`]). Registers the variant so that its execs are counted.
    fn instrumented_target(
        &self,
        row: &VariantRow,
        key: FileKey,
        decided: Target,
        pinned: bool,
        collected: u64,
    ) -> Target {
        let Some(budget) = self.instr.budget() else { return decided };
        let served = *lock(&self.instr.served).entry(row.id).or_insert(0);
        let at = Instrumented {
            policy_serves_original: decided == Target::Original,
            pinned,
            served,
            collected,
        };
        let share = instrumented::share(&budget, at);
        if share <= 0.0 {
            return decided;
        }
        Target::Variant {
            variant: ServedVariant {
                variant_id: row.id,
                path_in_store: PathBuf::from(&row.store_path),
                size: row.size,
                expected_original: key,
            },
            share,
            second: None,
            count_one_in: 1,
        }
    }

    pub(super) fn diverged_paths(&self) -> Vec<PathBuf> {
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
            Target::Variant { variant, share, second, count_one_in } => {
                let (id, second_id) =
                    (variant.variant_id, second.as_ref().map(|(v, _)| v.variant_id));
                if self.serving.serve_arms(path, variant, share, second, count_one_in) {
                    tracing::info!(path = %path.display(), variant = id, share, ?second_id, count_one_in, "serving a variant");
                }
            }
        }
    }
}

/// Tells the applier which paths' decisions changed, and remembers what the policy task
/// reported. The decision itself is re-derived at apply time (see the module doc), so a
/// stale one can never win.
pub(super) struct TableSink {
    pub(super) inner: Arc<Inner>,
    pub(super) paths: mpsc::UnboundedSender<PathBuf>,
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
pub(super) async fn apply_decisions(
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

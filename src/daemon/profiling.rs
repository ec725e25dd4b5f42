//! Wiring of the profiler (`crate::profile`) into the daemon: reads `[profile]`, hands the
//! status page the profiler's state and each binary's profile summary, offers
//! `.optbin/bins/NAME/profile.fdata`, and runs the profiler over the overlay once it exists.
//!
//! [`Profiling::new`] builds what the control plane needs ([`Profiling::status`],
//! [`Profiling::bin_files`]); [`Profiling::spawn`] consumes it once the overlay exists (the
//! profiler resolves mapped files through it) and returns the task for shutdown to await.

mod resolver;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::control::{BinFiles, SubsystemStatus};
use crate::fs::Overlay;
use crate::profile::Settings as ProfileSettings;
use crate::profile::maturity::MaturityThresholds;
use crate::profile::stacks::StackStore;
use crate::profile::{ProfilerStatusHandle, run_profiler};

pub use resolver::OverlayResolver;
pub use status::{PROFILE_FILE, ProfileFiles, ProfilerSection, binary_summary, machine_summary};

/// After the profiler stops on an error, it is started again after 10 s, then after twice
/// as long after each failure, up to 10 min (perf may come back; a bug should not spin).
const RESTART: Backoff = Backoff { first: Duration::from_secs(10), max: Duration::from_secs(600) };

/// Delays between restarts of a task that keeps failing.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    max: Duration,
}

/// The profiler as the daemon runs it.
pub struct Profiling {
    settings: ProfileSettings,
    config: Arc<Config>,
    catalog: Catalog,
    status: ProfilerStatusHandle,
    stacks: StackStore,
}

impl Profiling {
    /// The profiler with the validated `[profile]` settings of `cfg`, and its status handle.
    pub fn new(cfg: Arc<Config>, catalog: &Catalog) -> Self {
        Self {
            settings: cfg.profile.clone(),
            config: cfg,
            catalog: catalog.clone(),
            status: ProfilerStatusHandle::default(),
            stacks: StackStore::default(),
        }
    }

    /// The recent call stacks the profiler samples (for `crate::observe`).
    pub fn stacks(&self) -> StackStore {
        self.stacks.clone()
    }

    /// The profiler's live status (for `crate::observe`'s metrics).
    pub fn status_handle(&self) -> ProfilerStatusHandle {
        self.status.clone()
    }

    pub fn settings(&self) -> &ProfileSettings {
        &self.settings
    }

    /// The maturity thresholds a profile must meet before BOLT uses it.
    pub fn thresholds(&self) -> MaturityThresholds {
        self.settings.thresholds()
    }

    /// The `profiler` section of the status report (machine-wide and per binary).
    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        let retention = self.settings.profiler_config().retention;
        Arc::new(ProfilerSection {
            enabled: self.settings.enabled,
            status: self.status.clone(),
            thresholds: self.thresholds(),
            disk_caps: (retention.max_bytes_per_binary, retention.max_bytes_total),
            instrumented_runs_needed: self.settings.instrumentation_budget().map(|b| b.max_runs),
        })
    }

    /// Whether the sampler runs on hardware branch stacks now (instrumentation mode is for
    /// machines without them).
    pub fn branch_stacks(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let status = self.status.clone();
        Arc::new(move || status.snapshot().source.as_ref().is_some_and(|s| s.kind.has_branches()))
    }

    /// `.optbin/bins/NAME/profile.fdata` for binaries with a sampled profile.
    pub fn bin_files(&self) -> Arc<dyn BinFiles> {
        Arc::new(ProfileFiles)
    }

    /// Runs the profiler on `rt` until `shutdown`, resolving mapped files through `overlay`.
    /// Starts nothing when `[profile] enabled = false`.
    pub fn spawn(
        self,
        rt: &tokio::runtime::Handle,
        overlay: Arc<Overlay>,
        shutdown: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.settings.enabled {
            tracing::info!("profiler disabled by the config");
            return None;
        }
        let resolver = Arc::new(OverlayResolver::new(overlay, self.config.clone()));
        Some(rt.spawn(keep_profiling(
            self.settings,
            self.catalog,
            resolver,
            self.status,
            self.stacks,
            shutdown,
        )))
    }
}

/// Runs the profiler, restarting it whenever it stops on an error; returns on `shutdown`.
/// A profiler failure never touches serving.
async fn keep_profiling(
    settings: ProfileSettings,
    catalog: Catalog,
    resolver: Arc<OverlayResolver>,
    status: ProfilerStatusHandle,
    stacks: StackStore,
    shutdown: watch::Receiver<bool>,
) {
    let stop = shutdown.clone();
    run_restarting(RESTART, shutdown, move || {
        run_profiler(
            settings.profiler_config(),
            catalog.clone(),
            resolver.clone(),
            status.clone(),
            stacks.clone(),
            stop.clone(),
        )
    })
    .await;
}

/// Runs `run` until `shutdown`; whenever it returns before that, runs it again after a
/// delay growing by `backoff` (reset after a run that lasted longer than `backoff.max`).
async fn run_restarting<F, Fut>(backoff: Backoff, mut shutdown: watch::Receiver<bool>, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut delay = backoff.first;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let result = run().await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("the profiler stopped on its own"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "the profiler stopped"),
        }
        if started.elapsed() > backoff.max {
            delay = backoff.first;
        }
        tracing::info!(retry_in_ms = delay.as_millis() as u64, "restarting the profiler later");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
        delay = (delay * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    // Paused time: the runtime's clock jumps from timer to timer, so the delays are exact.
    #[tokio::test(start_paused = true)]
    async fn a_failing_run_is_restarted_with_growing_delays_until_shutdown() {
        let (tx, rx) = watch::channel(false);
        let starts = Arc::new(Mutex::new(Vec::<tokio::time::Instant>::new()));
        let s = starts.clone();
        let backoff = Backoff { first: Duration::from_millis(20), max: Duration::from_millis(80) };
        let task = tokio::spawn(run_restarting(backoff, rx, move || {
            s.lock().unwrap().push(tokio::time::Instant::now());
            async { anyhow::bail!("perf went away") }
        }));
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task).await.unwrap().unwrap();
        let starts = starts.lock().unwrap().clone();
        let gaps: Vec<u128> = starts.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        // Starts at 0, 20, 60, 140, 220, 300, 380 ms; the shutdown at 400 ends the wait.
        assert_eq!(gaps, [20, 40, 80, 80, 80, 80]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_ended_by_shutdown_is_not_restarted() {
        let (tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let stop = rx.clone();
        let task = tokio::spawn(run_restarting(RESTART, rx, move || {
            r.fetch_add(1, Ordering::SeqCst);
            let mut stop = stop.clone();
            async move {
                let _ = stop.changed().await;
                Ok(())
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task).await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

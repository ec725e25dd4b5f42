//! Wiring of the profiler (`crate::profile`) into the daemon: reads `[profile]`, hands the
//! status page the profiler's state and each binary's profile summary, offers
//! `.optbin/bins/NAME/profile.fdata`, and runs the profiler over the overlay once it exists.
//!
//! Two phases, because the control plane (which needs [`Profiling::status`] and
//! [`Profiling::bin_files`]) is built before the overlay (which [`Profiling::spawn`] needs).

mod resolver;
mod settings;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::daemon::report::{BinFiles, SubsystemStatus};
use crate::fs::Overlay;
use crate::profile::maturity::MaturityThresholds;
use crate::profile::{ProfilerStatusHandle, run_profiler};

pub use resolver::OverlayResolver;
pub use settings::ProfileSettings;
pub use status::{PROFILE_FILE, ProfileFiles, ProfilerSection, binary_summary, machine_summary};

/// After the profiler stops on an error, it is started again after this delay, doubled
/// after each failure up to [`RETRY_MAX`] (perf may come back; a bug should not spin).
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// The profiler as the daemon runs it.
pub struct Profiling {
    settings: ProfileSettings,
    config: Arc<Config>,
    catalog: Catalog,
    status: ProfilerStatusHandle,
}

impl Profiling {
    /// Parses `[profile]` (errors name the bad key) and creates the status handle.
    pub fn new(cfg: &Config, catalog: &Catalog) -> anyhow::Result<Self> {
        let settings = ProfileSettings::from_table(&cfg.sections.profile)?;
        Ok(Self {
            settings,
            config: Arc::new(cfg.clone()),
            catalog: catalog.clone(),
            status: ProfilerStatusHandle::default(),
        })
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
        })
    }

    /// `.optbin/bins/NAME/profile.fdata` for binaries with a sampled profile.
    pub fn bin_files(&self) -> Arc<dyn BinFiles> {
        Arc::new(ProfileFiles)
    }

    /// Runs the profiler on `rt` until `shutdown`, resolving mapped files through `overlay`.
    /// Does nothing when `[profile] enabled = false`.
    pub fn spawn(
        &self,
        rt: &tokio::runtime::Handle,
        overlay: Arc<Overlay>,
        shutdown: watch::Receiver<bool>,
    ) {
        if !self.settings.enabled {
            tracing::info!("profiler disabled by the config");
            return;
        }
        let resolver = Arc::new(OverlayResolver::new(overlay, self.config.clone()));
        rt.spawn(keep_profiling(
            self.settings.clone(),
            self.catalog.clone(),
            resolver,
            self.status.clone(),
            shutdown,
        ));
    }
}

/// Runs the profiler, restarting it with a growing delay whenever it stops on an error;
/// returns on `shutdown`. A profiler failure never touches serving.
async fn keep_profiling(
    settings: ProfileSettings,
    catalog: Catalog,
    resolver: Arc<OverlayResolver>,
    status: ProfilerStatusHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = RETRY_FIRST;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let result = run_profiler(
            settings.profiler_config(),
            catalog.clone(),
            resolver.clone(),
            status.clone(),
            shutdown.clone(),
        )
        .await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("the profiler stopped on its own"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "the profiler stopped"),
        }
        // A run that lasted long was healthy: start the backoff over.
        if started.elapsed() > RETRY_MAX {
            delay = RETRY_FIRST;
        }
        tracing::info!(retry_in_secs = delay.as_secs(), "restarting the profiler later");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

//! The optimizer in the running daemon: finds BOLT, builds the job queue over the catalog,
//! the variant store and a sandbox, and connects it to the rest:
//! - [`driver`]: a task that submits binaries whose profile matured, and new versions of
//!   binaries built before, from their previous version's kept profile;
//! - [`challengers`]: the flag search's challengers of served variants (what it builds
//!   next and its status);
//! - [`hooks`]: the `optimize NAME` and `reset NAME` control commands;
//! - [`report`]: the "optimizer" status section and per-binary details, and the
//!   pipeline stage the policy shows;
//! - [`profiles`]: the profiles BOLT gets, written from the catalog;
//! - [`candidate`]: which content is at a path now, shared by all of the above (the
//!   candidacy rules themselves are `crate::bolt::applicability`'s).
//!
//! [`Optimizing::new`] builds everything the control plane needs (status, hooks; requests
//! submitted meanwhile wait in the queue); [`Optimizing::spawn`] consumes it and starts the
//! tasks, returning their handles so shutdown can await each.
//!
//! New variants are stored in state `ready`; the policy task picks them up as canaries on
//! its periodic rescan (a new variant changes its binary's watch fingerprint), so nothing
//! here has to tell it.

pub mod candidate;
pub mod challengers;
pub mod driver;
pub mod hooks;
pub mod instrumenting;
pub mod profiles;
pub mod report;
pub mod scratch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::bolt::BoltMode;
use crate::bolt::flags::{BoltOptions, DEFAULT_SET};
use crate::bolt::queue::VariantProfiles;
use crate::bolt::stale::StaleProfiles;
use crate::bolt::status::OptimizerStatus;
use crate::bolt::{
    ApplicabilityConfig, BoltRunner, BoltState, OptimizerConfig, OptimizerDeps, OptimizerHandle,
    OptimizerWorker, Sandbox, SandboxUser, SandboxedBoltRunner, discover, optimizer, run_optimizer,
};
use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::config::Config;
use crate::control::{CommandHooks, SubsystemStatus};
use crate::policy::load::PipelineView;
use crate::profile::maturity::MaturityThresholds;
use crate::store::VariantStore;

/// What every part of the wiring shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub settings: crate::bolt::Settings,
    pub thresholds: MaturityThresholds,
    pub applicability: ApplicabilityConfig,
    pub catalog: Catalog,
    pub handle: OptimizerHandle,
    pub store: VariantStore,
    pub bolt: BoltState,
    /// Why no BOLT job can run (BOLT missing, the scratch directory unusable); None when
    /// the optimizer works.
    pub off: Option<String>,
    /// Instrumentation mode's budget and directory; None when off.
    pub instrumentation: Option<instrumenting::InstrumentSetup>,
    /// The runner BOLT jobs use (None when the optimizer is off): instrumented builds go
    /// through it too.
    pub runner: Option<Arc<dyn BoltRunner>>,
    /// Verification runs of instrumented builds.
    pub sandbox: Sandbox,
    /// The queue's status as last copied (see [`Shared::queue_status`]).
    status_copy: Mutex<Option<(Instant, Arc<OptimizerStatus>)>>,
    /// The fleet's profiles and verdicts, when `[fleet]` is on.
    pub fleet: Option<Arc<crate::fleet::FleetView>>,
    /// The profiles kept per path for the binaries' next versions.
    pub kept_profiles: StaleProfiles,
    /// The flag search's rules (candidate sets this BOLT accepts, the bound).
    pub search: challengers::SearchRules,
}

/// How long a copy of the queue's status serves per-binary questions.
const STATUS_COPY_TTL: Duration = Duration::from_millis(250);

impl Shared {
    /// The queue's status, copied at most every [`STATUS_COPY_TTL`]: status pages and the
    /// policy ask once per binary, and a copy holds up to 16 BOLT output tails.
    pub fn queue_status(&self) -> Arc<OptimizerStatus> {
        let mut copy = self.status_copy.lock().unwrap_or_else(|p| p.into_inner());
        match &*copy {
            Some((at, status)) if at.elapsed() < STATUS_COPY_TTL => status.clone(),
            _ => {
                let status = Arc::new(self.handle.status());
                *copy = Some((Instant::now(), status.clone()));
                status
            }
        }
    }
}

/// The optimizer's wiring; see the module doc.
pub struct Optimizing {
    shared: Arc<Shared>,
    worker: OptimizerWorker,
    /// The scratch directory did not exist at start-up: if a job created it, it is removed
    /// again at shutdown (when empty).
    scratch_created: bool,
}

impl Optimizing {
    /// With the validated `[optimizer]` (and the maturity thresholds of `[profile]`): finds
    /// BOLT, opens the variant store and checks the scratch directory (the first job creates it). A
    /// missing BOLT or an unusable scratch directory turn the optimizer off with the reason
    /// in status; bad settings and an unusable store are errors. With the fleet's view
    /// (`[fleet]` on), builds from the fleet's mature profiles too and respects its
    /// rejections.
    pub fn new(
        cfg: &Config,
        catalog: &Catalog,
        clock: Arc<dyn Clock>,
        fleet: Option<Arc<crate::fleet::FleetView>>,
    ) -> anyhow::Result<Self> {
        let settings = cfg.optimizer.clone();
        let thresholds = cfg.profile.thresholds();
        let store = VariantStore::open(&cfg.state_dir).context("opening the variant store")?;
        let bolt = discover(settings.bolt.as_deref());
        let sandbox =
            Sandbox { user: SandboxUser::resolve(), scratch_root: settings.scratch_dir.clone() };
        let scratch_created = !sandbox.scratch_root.exists();
        let sandbox_error = scratch::check_scratch_root(&sandbox)
            .err()
            .map(|e| format!("the scratch directory is unusable: {e:#}"));
        let off = match (&bolt, sandbox_error) {
            (BoltState::Missing { looked_in }, _) => {
                Some(format!("BOLT is not installed (looked in: {})", looked_in.join("; ")))
            }
            (_, Some(why)) => Some(why),
            _ => None,
        };
        let runner = match (bolt.tool(), &off) {
            (Some(tool), None) => Some(Arc::new(scratch::ScratchOnDemand {
                runner: SandboxedBoltRunner::new(tool.clone(), sandbox.clone(), settings.limits()),
            }) as Arc<dyn BoltRunner>),
            _ => None,
        };
        if let Some(why) = &off {
            tracing::warn!(reason = %why, "the optimizer is off");
        }
        let applicability = settings.applicability();
        let config = OptimizerConfig {
            concurrency: settings.concurrency,
            applicability: applicability.clone(),
            limits: settings.limits(),
            ..OptimizerConfig::default()
        };
        let instrumentation = instrumenting::InstrumentSetup::from_config(cfg)?;
        let kept_profiles = StaleProfiles::in_state_dir(&cfg.state_dir);
        let variant_profiles = VariantProfiles { dir: cfg.state_dir.join("variant-profiles") };
        let usable = match bolt.tool().map(|t| BoltOptions::probe(&t.llvm_bolt)) {
            Some(Ok(options)) => options.usable_sets(BoltMode::Relocations),
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "reading BOLT's options failed; no flag search");
                vec![&DEFAULT_SET]
            }
            None => vec![&DEFAULT_SET],
        };
        let search = challengers::SearchRules {
            usable,
            max_challengers: settings.max_challengers,
            profiles: variant_profiles.clone(),
        };
        let deps = OptimizerDeps {
            catalog: catalog.clone(),
            store: store.clone(),
            bolt: bolt.clone(),
            runner: runner.clone(),
            sandbox: sandbox.clone(),
            profiles: Arc::new(profiles::CatalogProfiles {
                catalog: catalog.clone(),
                fleet: fleet.clone(),
            }),
            clock,
            kept_profiles: Some(kept_profiles.clone()),
            variant_profiles: Some(variant_profiles),
        };
        let (handle, worker) = optimizer(config, deps);
        let shared = Arc::new(Shared {
            config: Arc::new(cfg.clone()),
            settings,
            thresholds,
            applicability,
            catalog: catalog.clone(),
            handle,
            store,
            bolt,
            off,
            instrumentation,
            runner,
            sandbox,
            status_copy: Mutex::new(None),
            fleet,
            kept_profiles,
            search,
        });
        Ok(Self { shared, worker, scratch_created })
    }

    /// The "optimizer" section of `status.json` and its per-binary details.
    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        Arc::new(report::OptimizerReport { shared: self.shared.clone() })
    }

    /// `optimize NAME` and `reset NAME`.
    pub fn hooks(&self) -> Arc<dyn CommandHooks> {
        Arc::new(hooks::OptimizerHooks { shared: self.shared.clone() })
    }

    /// Where each binary is in the optimizing pipeline, for the policy's stage display.
    pub fn pipeline_view(&self) -> Arc<dyn PipelineView> {
        Arc::new(report::OptimizerPipeline { shared: self.shared.clone() })
    }

    /// Starts the job queue and the maturity driver on `rt`; both stop on `shutdown`.
    /// `instrument` connects instrumentation mode: what to refresh when an instrumented
    /// variant appears or has collected its runs, and whether the profiler has branch
    /// stacks (then no instrumented variant is built).
    /// Returns the tasks: await them after signalling shutdown, before the runtime goes,
    /// so running BOLT jobs are killed and recorded as cancelled.
    pub fn spawn(
        self,
        rt: &tokio::runtime::Handle,
        shutdown: watch::Receiver<bool>,
        instrument: instrumenting::Hooks,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let worker = self.worker;
        let scratch = self.scratch_created.then(|| self.shared.settings.scratch_dir.clone());
        let queue_shutdown = shutdown.clone();
        let queue = rt.spawn(async move {
            run_optimizer(worker, queue_shutdown).await;
            if let Some(dir) = scratch {
                scratch::remove_if_empty(&dir);
            }
        });
        let mut tasks = vec![queue];
        if self.shared.off.is_none() {
            tasks.push(rt.spawn(driver::run_driver(self.shared.clone(), shutdown, instrument)));
        }
        tasks
    }
}

#[cfg(test)]
mod tests;

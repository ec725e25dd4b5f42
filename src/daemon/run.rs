//! Running the daemon: the supervisor mounts and forks the server; [`start_server`] builds
//! everything the server needs (runtime, catalog, overlay, background tasks) in each server
//! process, and returns the hook that stops it all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::catalog::Catalog;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::control::ControlDir;
use crate::daemon::actions::Actions;
use crate::daemon::indexer::{self, Indexed, SeenFile};
use crate::daemon::optimizing::Optimizing;
use crate::daemon::profiling::Profiling;
use crate::daemon::report::Reporter;
use crate::daemon::serving::{Reconciler, Serving};
use crate::fleet::daemon::Fleet;
use crate::fs::{EventSink, FsEvent, Overlay, OverlayConfig, ServingTable};
use crate::fuse::{MountOptions, ServeContext, Served};
use crate::observe::SharedStatus;

/// Mounts the overlay and serves until SIGTERM/SIGINT or an unmount from outside.
pub fn run_foreground(cfg: Config) -> anyhow::Result<()> {
    crate::cli::create_private_dir(&cfg.state_dir)?;
    // A bad catalog is reported as what it is, before mounting.
    crate::catalog::health::check(&cfg.catalog_path())?;
    // An unreadable machine id or an unsafe credentials file refuses the start with the
    // reason, before mounting ([fleet]'s values were checked with the rest of the config).
    Fleet::new(cfg.fleet.as_ref())?;
    let cfg = Arc::new(cfg);
    let mut opts = MountOptions::new(&cfg.mountpoint);
    opts.server_pid_file = Some(cfg.state_dir.join("server.pid"));
    opts.overlay_dirs = cfg.overlay.clone();
    cfg.supervisor.apply(&mut opts);
    let started_at = SystemClock.unix_secs();
    tracing::info!(
        mountpoint = %cfg.mountpoint.display(),
        overlay = ?cfg.overlay,
        state_dir = %cfg.state_dir.display(),
        "optbin starting"
    );
    crate::fuse::run_supervised(&opts, |ctx| start_server(cfg.clone(), ctx, started_at))
}

/// Builds one server process's world. Runs after every (re)start of the server.
///
/// Built bottom-up, each part from the parts below it, so nothing is filled in later: the
/// fleet's view (when `[fleet]` is set), the optimizer over it (its pipeline view), then
/// measurement and the policy (the one source of serving decisions), the profiler's status,
/// the warmer, the observability renderer, the control plane over all of them, the overlay
/// over the control plane, and last the tasks, each of which ends on `shutdown` and is
/// awaited by the returned stop hook.
pub fn start_server(
    cfg: Arc<Config>,
    ctx: ServeContext,
    started_at: i64,
) -> anyhow::Result<Served> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("optbin-task")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let catalog = Catalog::open(&cfg.catalog_path())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let table = ServingTable::new();
    // Binaries with no variant to serve run natively (docs/mount.md, "Native until a
    // variant"): set before the overlay answers its first lookup.
    table.set_native_until_variant(cfg.policy.native_until_variant);
    // Fleet sharing (src/fleet), when `[fleet]` is set: profiles and verdicts via Redis.
    let fleet = Fleet::new(cfg.fleet.as_ref())?;
    // The optimizer (src/daemon/optimizing): BOLT, its job queue, the maturity driver, the
    // `optimize`/`reset` commands and the "optimizer" status section; it builds from the
    // fleet's mature profiles too and respects its rejections.
    let optimizing =
        Optimizing::new(&cfg, &catalog, clock.clone(), fleet.as_ref().map(|f| f.view.clone()))?;
    // Measurement and the policy: the one source of serving decisions (serving/), told
    // where the optimizing pipeline is per binary and what the fleet vetoes.
    let pipeline = match &fleet {
        Some(f) => f.pipeline(optimizing.pipeline_view()),
        None => optimizing.pipeline_view(),
    };
    let serving = Serving::new(&cfg, &catalog, table.clone(), pipeline);
    let reconciler = serving.reconciler();
    reconciler.refresh_all().context("loading pins, exclusions and served variants")?;
    // Profiler: its status and profile files now, its sampling task once the overlay exists.
    let profiling = Profiling::new(cfg.clone(), &catalog);
    // Keeping hot binaries warm (src/warm): fed every exec, stopped with the server.
    let warmer = crate::daemon::warming::start(&cfg)?;
    if !serving.hear_native_execs(warmer.clone(), cfg.overlay.clone())
        && cfg.policy.native_until_variant
    {
        tracing::info!(
            "runs are not measured: execs of binaries passed through until they have a variant \
             are not heard (not kept warm, not counted)"
        );
    }
    let mut subsystems = vec![profiling.status(), optimizing.status(), serving.status()];
    subsystems.push(Arc::new(crate::daemon::warming::WarmSection(warmer.clone())));
    subsystems.extend(fleet.as_ref().map(|f| f.status()));

    // Training commands (src/train): run through the mount when the machine is idle.
    // Their output check records a variant's different output for the policy to act on.
    let r5 = reconciler.clone();
    let check = crate::train::check::OutputCheck {
        catalog: catalog.clone(),
        refresh: Arc::new(move |p| r5.refresh(p)),
    };
    let trainer = crate::train::Trainer::new(
        cfg.train.clone(),
        cfg.mountpoint.clone(),
        cfg.overlay.clone(),
        Some(check),
    );
    subsystems.push(trainer.status());
    // Pictures, the host's USE summary, metrics and the HTML report (src/observe).
    let observe =
        crate::observe::Observe::new(&cfg.metrics, &cfg.mountpoint, &catalog, profiling.stacks());
    subsystems.push(observe.status());
    let reporter = Reporter {
        catalog: catalog.clone(),
        config: cfg.clone(),
        started_at,
        server_restarts: ctx.generation as u32,
        subsystems,
        serving: table.clone(),
        bin_files: Some(Arc::new(crate::control::BinFilesSet(vec![
            profiling.bin_files(),
            Arc::new(crate::bench::VariantFiles),
        ]))),
    };
    let r2 = reconciler.clone();
    let actions = Actions {
        catalog: catalog.clone(),
        clock: clock.clone(),
        overlay: cfg.overlay.clone(),
        mountpoint: cfg.mountpoint.clone(),
        refresh: Arc::new(move |p| r2.refresh(p)),
        hooks: Some(optimizing.hooks()),
        train: Some(trainer.clone()),
    };
    let reporter: Arc<dyn crate::control::StatusSource> = Arc::new(reporter);
    let control = Arc::new(
        ControlDir::new(Box::new(SharedStatus(reporter.clone())), Box::new(actions))
            .with_files(observe.files())
            .with_files(crate::report::file::ReportFile::new(catalog.clone())),
    );
    let (seen_tx, seen_rx) = mpsc::unbounded_channel::<SeenFile>();
    let events = RouteEvents { seen: seen_tx, warmer: warmer.clone() };
    let overlay = Overlay::new(
        OverlayConfig {
            mountpoint: cfg.mountpoint.clone(),
            overlay_dirs: cfg.overlay.clone(),
            // Running programs keep their bytes when an original is rewritten in place.
            originals: Some(cfg.state_dir.join("originals")),
        },
        table,
        None,
        control,
        // Exec-time opens get their run counters attached before the events go on.
        serving.event_sink(Arc::new(events)),
    )?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks = Tasks::default();
    let (indexed_tx, indexed_rx) = mpsc::unbounded_channel::<Indexed>();
    tasks.add(
        "indexer",
        rt.spawn(indexer::run_indexer(
            catalog.clone(),
            clock.clone(),
            seen_rx,
            indexed_tx,
            shutdown.clone(),
        )),
    );
    tasks.add(
        "refresh indexed",
        rt.spawn(refresh_indexed(indexed_rx, reconciler.clone(), shutdown.clone())),
    );
    for task in observe.spawn(rt.handle(), reporter, shutdown.clone()) {
        tasks.add("observe", task);
    }
    // Instrumented variants (instrumentation mode) change what a path serves when built
    // and when done: the optimizer re-derives it through the reconciler. None are built
    // while the profiler samples branch stacks.
    let r3 = reconciler.clone();
    let native = serving.native_execs();
    let instrument = crate::daemon::optimizing::instrumenting::Hooks {
        refresh: Arc::new(move |p| r3.refresh(p)),
        ran_natively: Arc::new(move |p| native.count(p) > 0),
        branch_stacks: profiling.branch_stacks(),
    };
    if let Some(task) = profiling.spawn(rt.handle(), overlay.clone(), shutdown.clone()) {
        tasks.add("profiler", task);
    }
    for task in optimizing.spawn(rt.handle(), shutdown.clone(), instrument) {
        tasks.add("optimizer", task);
    }
    for task in serving.spawn(rt.handle(), shutdown.clone()) {
        tasks.add("policy", task);
    }
    if let Some(f) = &fleet {
        let r4 = reconciler.clone();
        let task = f.spawn(
            rt.handle(),
            catalog.clone(),
            clock.clone(),
            Arc::new(move |p| r4.refresh(p)),
            shutdown.clone(),
        );
        tasks.add("fleet", task);
    }
    if let Some(task) = trainer.spawn(rt.handle(), shutdown.clone()) {
        tasks.add("training", task);
    }
    tracing::info!(generation = ctx.generation, "server ready");

    Ok(Served {
        overlay,
        shutdown: Box::new(move || {
            let _ = shutdown_tx.send(true);
            // Every task ends on the signal (the optimizer kills running BOLT jobs and
            // records them as cancelled): wait for each before the runtime goes.
            rt.block_on(tasks.join());
            // Blocking work a task handed off and no longer waits for (a catalog write
            // queued by a dropped caller) gets a bounded time to finish.
            rt.shutdown_timeout(Duration::from_secs(10));
            warmer.stop();
            match catalog.checkpoint() {
                Ok(true) => {}
                Ok(false) => tracing::warn!("the catalog checkpoint at stop was incomplete"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "checkpointing the catalog"),
            }
            tracing::info!("server stopped");
        }),
    })
}

/// The server's background tasks, by name, for an orderly shutdown.
#[derive(Default)]
struct Tasks {
    running: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Tasks {
    fn add(&mut self, name: &'static str, task: tokio::task::JoinHandle<()>) {
        self.running.push((name, task));
    }

    /// Waits for every task, saying which ones are still running every
    /// [`SLOW_SHUTDOWN`] (a task that ignores the signal is a bug to see, not to hide).
    async fn join(self) {
        for (name, mut task) in self.running {
            loop {
                match tokio::time::timeout(SLOW_SHUTDOWN, &mut task).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => {
                        tracing::error!(task = name, error = %e, "a task failed");
                        break;
                    }
                    Err(_) => tracing::warn!(task = name, "still stopping"),
                }
            }
        }
    }
}

/// How long shutdown waits for a task before saying so (and waiting on).
const SLOW_SHUTDOWN: Duration = Duration::from_secs(10);

/// Hands what the overlay reports to those that act on it, on the request thread and
/// without the async runtime: an exec's open goes to the warmer's own thread, a file seen
/// for the first time to the indexer. (A task in between cost a wake-up of the runtime per
/// exec, more daemon CPU than the rest of the exec's bookkeeping: docs/mount.md.)
struct RouteEvents {
    seen: mpsc::UnboundedSender<SeenFile>,
    warmer: Arc<crate::warm::Warmer>,
}

impl EventSink for RouteEvents {
    fn event(&self, event: FsEvent) {
        match event {
            FsEvent::Seen { original, key } => {
                // A closed indexer means the server is stopping.
                let _ = self.seen.send(SeenFile { path: original, key });
            }
            FsEvent::Opened { backing, pid, exec: true, .. } => self.warmer.note_exec(backing, pid),
            FsEvent::Opened { .. } => {}
        }
    }
}

/// A newly indexed version of a path may have variants (or lose them): re-derive what it
/// serves.
async fn refresh_indexed(
    mut indexed: mpsc::UnboundedReceiver<Indexed>,
    reconciler: Reconciler,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let item = tokio::select! {
            _ = shutdown.changed() => break,
            i = indexed.recv() => match i { Some(i) => i, None => break },
        };
        let r = reconciler.clone();
        let path: PathBuf = item.path;
        let _ = tokio::task::spawn_blocking(move || r.refresh(&path)).await;
    }
}

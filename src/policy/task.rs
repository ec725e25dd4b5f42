//! The policy's background task: stores measured runs, re-evaluates the binaries they
//! belong to, writes the decisions to the catalog and tells the serving table.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use super::load::{PipelineView, apply, controls_of, load_binary};
use super::{PolicyConfig, ServeDecision, Stage, decide, evaluate};
use crate::catalog::{Catalog, runs};
use crate::clock::Clock;
use crate::measure::RunRecord;

/// Where the policy's decisions go (the overlay's serving table). Called from the policy
/// task; it must not block.
pub trait ServingSink: Send + Sync {
    fn set_decision(&self, original: &Path, decision: ServeDecision);
}

/// The task's settings besides the policy's own.
#[derive(Clone)]
pub struct PolicyTaskOptions {
    pub config: PolicyConfig,
    pub pipeline: Arc<dyn PipelineView>,
    pub clock: Arc<dyn Clock>,
    /// How often every watched binary is re-evaluated (new variants, changed controls).
    pub rescan_every: Duration,
    /// Runs older than this are deleted.
    pub runs_max_age: Duration,
    /// At most this many runs are kept (oldest go first).
    pub runs_max_rows: u64,
    /// How often rotation runs.
    pub rotate_every: Duration,
}

impl std::fmt::Debug for PolicyTaskOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyTaskOptions").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Default for PolicyTaskOptions {
    fn default() -> Self {
        Self {
            config: PolicyConfig::default(),
            pipeline: Arc::new(super::load::NoPipeline),
            clock: Arc::new(crate::clock::SystemClock),
            rescan_every: Duration::from_secs(2),
            runs_max_age: Duration::from_secs(30 * 24 * 3600),
            runs_max_rows: 500_000,
            rotate_every: Duration::from_secs(600),
        }
    }
}

/// The most runs stored in one transaction.
const BATCH: usize = 256;

/// Evaluates one binary, records what changed, and returns each of its paths with what to
/// serve and the stage. The control module calls this after a pin or exclusion changes.
pub fn reevaluate_binary(
    conn: &mut Connection,
    binary_id: i64,
    cfg: &PolicyConfig,
    pipeline: &dyn PipelineView,
    now_ms: i64,
) -> anyhow::Result<Vec<(String, ServeDecision, Stage)>> {
    let input = load_binary(conn, binary_id, pipeline)?;
    let eval = evaluate(&input, cfg);
    apply(conn, &input, &eval, now_ms)?;
    let mut out = Vec::new();
    for path in runs::paths_of_binary(conn, binary_id)? {
        let (stage, serve) = decide(&eval, &controls_of(conn, &path)?);
        out.push((path, serve, stage));
    }
    Ok(out)
}

fn now_ms(clock: &dyn Clock) -> i64 {
    clock.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs until `shutdown` turns true (or the record channel closes): stores runs in batches,
/// re-evaluates the binaries they touched, rescans every watched binary periodically,
/// rotates old runs, and tells `sink` whenever a path's decision changes.
pub async fn run_policy(
    catalog: Catalog,
    mut records: mpsc::UnboundedReceiver<RunRecord>,
    sink: Arc<dyn ServingSink>,
    mut shutdown: watch::Receiver<bool>,
    opts: PolicyTaskOptions,
) -> anyhow::Result<()> {
    let mut sent: HashMap<String, ServeDecision> = HashMap::new();
    let mut rescan = tokio::time::interval(opts.rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotate = tokio::time::interval(opts.rotate_every);
    rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut records_open = true;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let decisions = tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break; // the sender is gone: nobody can ask us to keep running
                }
                continue;
            }
            first = records.recv(), if records_open => {
                let Some(first) = first else {
                    records_open = false;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match records.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                ingest(&catalog, batch, &opts).await
            }
            _ = rescan.tick() => rescan_all(&catalog, &opts).await,
            _ = rotate.tick() => {
                let (age, rows, now) =
                    (opts.runs_max_age.as_millis() as i64, opts.runs_max_rows, now_ms(&*opts.clock));
                match catalog.run(move |c| runs::rotate_runs(c, now, age, rows)).await {
                    Ok(n) if n > 0 => tracing::info!(n, "old runs rotated out"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "rotating runs failed"),
                }
                continue;
            }
        };
        match decisions {
            Ok(list) => {
                for (path, serve, _stage) in list {
                    if sent.get(&path) != Some(&serve) {
                        sink.set_decision(Path::new(&path), serve);
                        sent.insert(path, serve);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "policy evaluation failed"),
        }
    }
    Ok(())
}

type Decisions = Vec<(String, ServeDecision, Stage)>;

async fn ingest(
    catalog: &Catalog,
    batch: Vec<RunRecord>,
    opts: &PolicyTaskOptions,
) -> anyhow::Result<Decisions> {
    let (cfg, pipeline, now) = (opts.config.clone(), opts.pipeline.clone(), now_ms(&*opts.clock));
    catalog
        .run(move |conn| {
            let stored = runs::insert_runs(conn, &batch)?;
            let touched: BTreeSet<i64> =
                stored.iter().flatten().filter_map(|s| s.binary_id).collect();
            let mut out = Vec::new();
            for binary_id in touched {
                out.extend(reevaluate_binary(conn, binary_id, &cfg, &*pipeline, now)?);
            }
            Ok(out)
        })
        .await
}

async fn rescan_all(catalog: &Catalog, opts: &PolicyTaskOptions) -> anyhow::Result<Decisions> {
    let (cfg, pipeline, now) = (opts.config.clone(), opts.pipeline.clone(), now_ms(&*opts.clock));
    catalog
        .run(move |conn| {
            let mut out = Vec::new();
            for binary_id in runs::binaries_to_watch(conn)? {
                out.extend(reevaluate_binary(conn, binary_id, &cfg, &*pipeline, now)?);
            }
            Ok(out)
        })
        .await
}

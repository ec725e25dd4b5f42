//! The policy's background task: stores measured runs, re-evaluates the binaries they
//! belong to, writes the decisions to the catalog and tells the serving table.
//!
//! Wiring (the daemon): `let (measurer, records) = Measurer::start()?;` hand `measurer` to
//! the overlay (it calls `on_exec_open` on exec-time opens), spawn
//! `run_policy(catalog, records, sink, shutdown, opts)` with a [`ServingSink`] that updates
//! the overlay's serving table, and let the overlay pick per exec with
//! `decision.choose(random draw)`. Controls call [`reevaluate_binary`] after a change (a
//! rescan also notices it within `rescan_every`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use super::load::{Applied, PipelineView, apply, controls_of, load_for_decision};
use super::{PolicyConfig, ServeDecision, Stage, decide, evaluate};
use crate::catalog::{Catalog, base, runs};
use crate::clock::Clock;
use crate::measure::{RunExit, RunRecord};

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

/// How often a binary whose new runs all exited normally, and that has no variant on trial
/// (see [`settled`]), is re-evaluated: its runs are
/// stored as they come, and looks, drift blocks and the shown gain wait for this. An
/// evaluation reads up to [`super::load::RUNS_PER_BINARY`] runs of the binary and
/// computes its pair statistics: once per batch (every 100 ms under a stream of execs) it
/// cost the catalog thread more CPU per run than the run's own storing (docs/mount.md).
pub const EVALUATE_EVERY: Duration = Duration::from_secs(1);

/// Whether a run makes its binary's evaluation urgent: killed by a signal or exiting
/// nonzero, it may quarantine a variant, which must happen before the next exec.
pub fn urgent(run: &RunRecord) -> bool {
    run.exit != RunExit::Exited(0)
}

/// Evaluates one binary, records what changed, and returns each of its paths with what to
/// serve and the stage. The control module calls this after a pin or exclusion changes.
pub fn reevaluate_binary(
    conn: &mut Connection,
    binary_id: i64,
    cfg: &PolicyConfig,
    pipeline: &dyn PipelineView,
    now_ms: i64,
) -> anyhow::Result<Vec<(String, ServeDecision, Stage)>> {
    let mut attempts = 0;
    let eval = loop {
        let input = load_for_decision(conn, binary_id, pipeline)?;
        let eval = evaluate(&input, cfg);
        attempts += 1;
        match apply(conn, &input, &eval, now_ms)? {
            Applied::Written => break eval,
            // Another writer changed a variant meanwhile; it will not keep doing so.
            Applied::Stale if attempts < STALE_RETRIES => continue,
            Applied::Stale => anyhow::bail!(
                "binary {binary_id}: its variants kept changing during {attempts} evaluations"
            ),
        }
    };
    let mut out = Vec::new();
    for path in runs::paths_of_binary(conn, binary_id)? {
        let (stage, serve) = decide(&eval, &controls_of(conn, &path)?);
        out.push((path, serve, stage));
    }
    Ok(out)
}

/// How many times [`reevaluate_binary`] evaluates a binary whose variants changed under it.
const STALE_RETRIES: u32 = 3;

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
    // What each path was last told, and for which binary.
    let mut sent: HashMap<String, (Option<i64>, ServeDecision)> = HashMap::new();
    let mut fingerprints: HashMap<i64, String> = HashMap::new();
    let mut rescan = tokio::time::interval(opts.rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotate = tokio::time::interval(opts.rotate_every);
    rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut records_open = true;
    // Binaries whose evaluation waits for the next tick, and when each was last evaluated.
    let mut deferred: BTreeSet<i64> = BTreeSet::new();
    let mut evaluated: HashMap<i64, Instant> = HashMap::new();
    let mut evaluate = tokio::time::interval(EVALUATE_EVERY);
    evaluate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                evaluated.retain(|_, at| at.elapsed() < EVALUATE_EVERY);
                let recent = evaluated.keys().copied().collect();
                match ingest(&catalog, batch, &opts, recent).await {
                    Ok((decisions, now, later)) => {
                        let at = Instant::now();
                        for id in now {
                            deferred.remove(&id);
                            evaluated.insert(id, at);
                        }
                        deferred.extend(later);
                        Ok(decisions)
                    }
                    Err(e) => Err(e),
                }
            }
            _ = evaluate.tick(), if !deferred.is_empty() => {
                let ids = std::mem::take(&mut deferred);
                let at = Instant::now();
                for id in &ids {
                    evaluated.insert(*id, at);
                }
                evaluate_binaries(&catalog, &opts, ids).await
            }
            _ = rescan.tick() => {
                let serving: Vec<(String, Option<i64>)> = sent
                    .iter()
                    .filter(|(_, (_, d))| *d != ServeDecision::Original)
                    .map(|(p, (b, _))| (p.clone(), *b))
                    .collect();
                rescan_changed(&catalog, &opts, &mut fingerprints, serving).await
            }
            _ = rotate.tick() => {
                let (age, rows, now) =
                    (opts.runs_max_age.as_millis() as i64, opts.runs_max_rows, opts.clock.unix_ms());
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
                for (path, binary_id, serve) in list {
                    if sent.get(&path).map(|x| x.1) != Some(serve) {
                        sink.set_decision(Path::new(&path), serve);
                    }
                    sent.insert(path, (binary_id, serve));
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "policy evaluation failed"),
        }
    }
    Ok(())
}

/// (path, the binary decided for, what to serve).
type Decisions = Vec<(String, Option<i64>, ServeDecision)>;

/// [`reevaluate_binary`], each path's decision tagged with the binary it is for.
fn reevaluate_tagged(
    conn: &mut Connection,
    binary_id: i64,
    cfg: &PolicyConfig,
    pipeline: &dyn PipelineView,
    now: i64,
) -> anyhow::Result<Decisions> {
    let list = reevaluate_binary(conn, binary_id, cfg, pipeline, now)?;
    Ok(list.into_iter().map(|(p, d, _)| (p, Some(binary_id), d)).collect())
}

/// Stores a batch of runs and evaluates the binaries it touched that are due: one with an
/// [`urgent`] run or a variant on trial, or not in `recent` (evaluated within
/// [`EVALUATE_EVERY`]). Returns the decisions, the binaries evaluated and those left for
/// the next tick.
async fn ingest(
    catalog: &Catalog,
    batch: Vec<RunRecord>,
    opts: &PolicyTaskOptions,
    recent: HashSet<i64>,
) -> anyhow::Result<(Decisions, Vec<i64>, Vec<i64>)> {
    let (cfg, pipeline, now) = (opts.config.clone(), opts.pipeline.clone(), opts.clock.unix_ms());
    catalog
        .run(move |conn| {
            let stored = runs::insert_runs(conn, &batch).inspect_err(|_| {
                crate::measure::RUNS_NOT_RECORDED
                    .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            })?;
            // Per binary touched: whether one of its runs is urgent.
            let mut touched: BTreeMap<i64, bool> = BTreeMap::new();
            for (record, s) in batch.iter().zip(&stored) {
                if let Some(id) = s.as_ref().and_then(|s| s.binary_id) {
                    *touched.entry(id).or_default() |= urgent(record);
                }
            }
            let (mut out, mut now_ids, mut later) = (Vec::new(), Vec::new(), Vec::new());
            for (binary_id, urgent) in touched {
                if !urgent && recent.contains(&binary_id) && settled(conn, binary_id)? {
                    later.push(binary_id);
                    continue;
                }
                out.extend(reevaluate_tagged(conn, binary_id, &cfg, &*pipeline, now)?);
                now_ids.push(binary_id);
            }
            Ok((out, now_ids, later))
        })
        .await
}

/// Whether no decision about `binary_id` is pending: none of its variants is on trial
/// (a canary, or ready to become one). Only such a binary's evaluation may wait for the
/// tick: a canary's look decides what is served, and status, which evaluates on the fly,
/// would show a decision before the task made it.
fn settled(conn: &Connection, binary_id: i64) -> anyhow::Result<bool> {
    Ok(base::variants_of(conn, binary_id)?
        .iter()
        .all(|v| !matches!(v.state, base::VariantState::Canary | base::VariantState::Ready)))
}

/// Evaluates binaries whose evaluation was deferred.
async fn evaluate_binaries(
    catalog: &Catalog,
    opts: &PolicyTaskOptions,
    ids: BTreeSet<i64>,
) -> anyhow::Result<Decisions> {
    let (cfg, pipeline, now) = (opts.config.clone(), opts.pipeline.clone(), opts.clock.unix_ms());
    catalog
        .run(move |conn| {
            let mut out = Vec::new();
            for binary_id in ids {
                out.extend(reevaluate_tagged(conn, binary_id, &cfg, &*pipeline, now)?);
            }
            Ok(out)
        })
        .await
}

/// Re-evaluates the binaries whose variants or controls changed since the last rescan
/// (runs are handled as they arrive): new variants enter canary, pins take effect. A path
/// being served a variant whose binary is no longer the path's content (the file was
/// replaced) or no longer has variants (reset) is sent back to the original.
async fn rescan_changed(
    catalog: &Catalog,
    opts: &PolicyTaskOptions,
    fingerprints: &mut HashMap<i64, String>,
    serving: Vec<(String, Option<i64>)>,
) -> anyhow::Result<Decisions> {
    let (cfg, pipeline, now) = (opts.config.clone(), opts.pipeline.clone(), opts.clock.unix_ms());
    let known = std::mem::take(fingerprints);
    let (out, seen) = catalog
        .run(move |conn| {
            let mut out = Vec::new();
            for (binary_id, fp) in runs::watch_fingerprints(conn)? {
                if known.get(&binary_id) != Some(&fp) {
                    out.extend(reevaluate_tagged(conn, binary_id, &cfg, &*pipeline, now)?);
                }
            }
            // Re-read: the evaluations themselves may have changed states.
            let seen = runs::watch_fingerprints(conn)?;
            for (path, binary_id) in serving {
                let current = base::path_row(conn, &path)?.and_then(|p| p.binary_id);
                let watched = seen.iter().any(|(b, _)| Some(*b) == binary_id);
                if current != binary_id || !watched {
                    out.push((path, None, ServeDecision::Original));
                }
            }
            Ok((out, seen))
        })
        .await?;
    fingerprints.extend(seen);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;
    use crate::catalog::base::{
        NewVariant, Pin, VariantKind, VariantState, insert_variant, set_excluded, set_pin,
        upsert_binary, upsert_path,
    };
    use crate::elf::ElfFacts;
    use crate::identity::{ContentId, FileKey};
    use crate::measure::RunExit;
    use crate::policy::load::{NoPipeline, binary_status, machine_summary};

    #[derive(Default)]
    struct Sink(Mutex<Vec<(PathBuf, ServeDecision)>>);
    impl ServingSink for Sink {
        fn set_decision(&self, original: &Path, decision: ServeDecision) {
            self.0.lock().unwrap().push((original.to_path_buf(), decision));
        }
    }
    impl Sink {
        fn last(&self) -> Option<ServeDecision> {
            self.0.lock().unwrap().last().map(|x| x.1)
        }
    }

    async fn wait_for(sink: &Sink, want: ServeDecision) {
        for _ in 0..200 {
            if sink.last() == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sink never got {want:?}: {:?}", sink.0.lock().unwrap());
    }

    /// A catalog with /usr/bin/tool, its binary and one ready BOLT variant of it.
    fn catalog_with_a_ready_variant() -> (Catalog, i64, i64) {
        let catalog = Catalog::in_memory().unwrap();
        let (bid, vid) = catalog
            .run_blocking(|c| {
                let b =
                    upsert_binary(c, &ContentId::of_bytes(b"tool"), 1, &ElfFacts::default(), 1)?;
                let key = FileKey { dev: 1, ino: 1, size: 1, mtime_ns: 1, ctime_ns: 1 };
                upsert_path(c, "/usr/bin/tool", Some(b), &key, 1)?;
                let new = NewVariant {
                    binary_id: b,
                    kind: VariantKind::Bolt,
                    state: VariantState::Ready,
                    ..Default::default()
                };
                Ok((b, insert_variant(c, &new, 1)?))
            })
            .unwrap();
        (catalog, bid, vid)
    }

    fn record(binary_id: i64, variant_id: Option<i64>, cpu_ns: u64) -> RunRecord {
        RunRecord {
            original: PathBuf::from("/usr/bin/tool"),
            key: FileKey { dev: 1, ino: 1, size: 1, mtime_ns: 1, ctime_ns: 1 },
            binary_id: Some(binary_id),
            variant_id,
            cmd_hash: "cmd".into(),
            counted: true,
            task_clock_ns: cpu_ns,
            counts: Default::default(),
            wall_ns: cpu_ns,
            exit: RunExit::Exited(0),
            at_ms: 1,
        }
    }

    #[test]
    fn only_a_run_that_may_quarantine_is_urgent() {
        let run = |exit| RunRecord { exit, ..record(1, Some(2), 10) };
        assert!(!urgent(&run(RunExit::Exited(0))));
        assert!(urgent(&run(RunExit::Exited(3))), "an exit code the original may never give");
        assert!(urgent(&run(RunExit::Signaled(libc::SIGSEGV))));
    }

    #[tokio::test]
    async fn canary_promotion_controls_and_summary_through_the_task() {
        let (catalog, bid, vid) = catalog_with_a_ready_variant();
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink::default());
        let (stop, shutdown) = watch::channel(false);
        let opts =
            PolicyTaskOptions { rescan_every: Duration::from_millis(20), ..Default::default() };
        let task = tokio::spawn(run_policy(catalog.clone(), rx, sink.clone(), shutdown, opts));
        wait_for(&sink, ServeDecision::Split { variant_id: vid, variant_share: 0.5 }).await;

        // 20 interleaved runs per arm; the variant needs 20% less CPU.
        for i in 0..20u64 {
            let jitter = 1_000_000 + (i * 7919 % 97) * 1_000;
            tx.send(record(bid, None, 100 * jitter)).unwrap();
            tx.send(record(bid, Some(vid), 80 * jitter)).unwrap();
        }
        wait_for(&sink, ServeDecision::Split { variant_id: vid, variant_share: 0.95 }).await;

        let cfg = PolicyConfig::default();
        let (status, summary, decisions) = catalog
            .run(move |c| {
                Ok((
                    binary_status(c, bid, &cfg, &NoPipeline)?,
                    machine_summary(c, &cfg, &NoPipeline)?,
                    runs::decisions_of(c, bid)?,
                ))
            })
            .await
            .unwrap();
        let actions: Vec<&str> = decisions.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(actions, ["start_canary", "promote"]);
        assert!(status[0].stage_text.starts_with("serving optimized"), "{}", status[0].stage_text);
        assert!(status[0].stage_text.contains("faster by 20."), "{}", status[0].stage_text);
        assert_eq!(status[0].runs, vec![(None, 20), (Some(vid), 20)]);
        assert_eq!(summary.binaries_optimized, 1);
        assert_eq!(summary.cpu_saved_ns, 0, "no runs served since the promotion yet");

        // Runs served after the promotion count as saved CPU time.
        tx.send(record(bid, Some(vid), 80_000_000)).unwrap();
        let mut summary;
        let mut waited = 0;
        loop {
            let cfg = PolicyConfig::default();
            summary = catalog.run(move |c| machine_summary(c, &cfg, &NoPipeline)).await.unwrap();
            if summary.cpu_saved_ns > 0 || waited >= 200 {
                break;
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!((19_000_000..=21_000_000).contains(&summary.cpu_saved_ns), "{summary:?}");

        // Pins and exclusions reach the serving table on the next rescan.
        catalog.run(|c| set_pin(c, "/usr/bin/tool", Some(Pin::Original), 2)).await.unwrap();
        wait_for(&sink, ServeDecision::Original).await;
        catalog.run(|c| set_pin(c, "/usr/bin/tool", Some(Pin::Bolted), 3)).await.unwrap();
        wait_for(&sink, ServeDecision::Variant(vid)).await;
        catalog.run(|c| set_excluded(c, "/usr/bin/tool", true, 4)).await.unwrap();
        wait_for(&sink, ServeDecision::Original).await;
        catalog.run(|c| set_excluded(c, "/usr/bin/tool", false, 5)).await.unwrap();
        wait_for(&sink, ServeDecision::Variant(vid)).await;

        // The file is replaced by new content (a package upgrade): its variants no longer
        // apply, the path goes back to the original.
        catalog
            .run(|c| {
                let b =
                    upsert_binary(c, &ContentId::of_bytes(b"tool v2"), 1, &ElfFacts::default(), 6)?;
                let key = FileKey { dev: 1, ino: 2, size: 1, mtime_ns: 6, ctime_ns: 6 };
                upsert_path(c, "/usr/bin/tool", Some(b), &key, 6)
            })
            .await
            .unwrap();
        wait_for(&sink, ServeDecision::Original).await;

        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn a_decision_on_a_state_that_changed_meanwhile_is_not_written() {
        let (catalog, bid, vid) = catalog_with_a_ready_variant();
        let cfg = PolicyConfig::default();
        let (stale, now) = catalog
            .run_blocking(move |c| {
                // The policy reads the ready variant and decides to canary it...
                let input = load_for_decision(c, bid, &NoPipeline)?;
                let eval = evaluate(&input, &cfg);
                assert!(eval.transitions.iter().any(|t| t.to == VariantState::Canary));
                // ...while someone else serves it (here: by hand, as a test or a pin would).
                base::set_variant_state(c, vid, VariantState::Served, None)?;
                let applied = apply(c, &input, &eval, 1_000)?;
                let now = base::variants_of(c, bid)?[0].state;
                Ok((applied, now))
            })
            .unwrap();
        assert_eq!(stale, Applied::Stale);
        assert_eq!(now, VariantState::Served, "the newer state stays");
        // Evaluated again from the catalog as it is, the variant is served.
        let cfg = PolicyConfig::default();
        let decided = catalog
            .run_blocking(move |c| reevaluate_binary(c, bid, &cfg, &NoPipeline, 2_000))
            .unwrap();
        let served = match decided[0].1 {
            ServeDecision::Variant(v) => v == vid,
            // A served variant may leave a few execs to the original (exploration).
            ServeDecision::Split { variant_id, variant_share } => {
                variant_id == vid && variant_share > 0.5
            }
            _ => false,
        };
        assert!(served, "{decided:?}");
    }
}

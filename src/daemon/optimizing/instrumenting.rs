//! Instrumentation mode (`[profile] instrumentation = "on"`) in the optimizer's wiring: on
//! each driver tick, [`Instrumenter::tick`]
//! 1. collects the profiles instrumented runs wrote (one `prof.fdata.<pid>.fdata` per run,
//!    in the binary's directory under the instrumentation root) into the catalog, and
//!    retires an instrumented variant once its binary has the configured number of runs
//!    (its profile is then complete: the maturity driver treats it as mature, and
//!    `write_profile_for_bolt` prefers it for the BOLT build);
//! 2. builds at most one instrumented variant (kind `instrumented`, state `ready`) for a
//!    binary that is due one: a candidate with symbols and relocations (`-instrument`
//!    needs them), run at least once, whose instrumentation profile is not complete and
//!    which has no instrumented variant yet.
//!
//! A measured run of the instrumented variant killed by a crash signal rejects it at once
//! (the policy, which would otherwise quarantine a crashing variant, never sees it), and so
//! do instrumented runs much slower than the original's runs of the same commands (median
//! above `[profile] instrument_max_slowdown`). Either way the binary is not instrumented
//! again (an instrumented variant exists), and its sampled profile decides as without
//! instrumentation.
//!
//! Profiles are written at exit only. BOLT's periodic dump (`-instrumentation-sleep-time`)
//! is not used: its runtime forks a watcher child that lives until the parent is reaped,
//! so a caller that reads the output to EOF before waiting (`x=$(prog)`) or a program that
//! waits for all its children hangs forever (both measured; see `docs/config.md`).
//!
//! Serving the variant to a bounded share of execs is the policy wiring's
//! (`crate::daemon::serving`, with the share decided by `crate::policy::instrumented`); the
//! policy's comparisons never see such variants
//! (`crate::catalog::variant::VariantKind::is_policed`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::Connection;
use tokio::sync::watch;

use super::Shared;
use super::candidate::{current_binary, verdict};
use super::driver::current_paths;
use crate::bolt::runner::prepare_instrumentation_dir;
use crate::bolt::verify::verify;
use crate::bolt::{BoltJob, BoltMode, BoltOutcome, BoltPlan, ProfileInput};
use crate::catalog::base::{VariantKind, VariantState};
use crate::catalog::{base, profiles, runs};
use crate::config::Config;
use crate::identity::{ContentId, FileKey};
use crate::profile::instrument::{InstrumentationBudget, collect_runs};

/// Re-derives what a path serves (blocking: called on a blocking thread).
pub type Refresh = Arc<dyn Fn(&Path) + Send + Sync>;

/// What instrumentation mode needs from the rest of the daemon.
#[derive(Clone)]
pub struct Hooks {
    /// Called when an instrumented variant appears or is done.
    pub refresh: Refresh,
    /// Whether the profiler samples hardware branch stacks: its profiles are then good
    /// enough, and no instrumented variant is built (collection goes on).
    pub branch_stacks: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Whether the binary at a path has run natively since start (passed through until it
    /// has a variant, its runs are not measured; see `crate::daemon::native_execs`).
    pub ran_natively: Arc<dyn Fn(&Path) -> bool + Send + Sync>,
}

impl Hooks {
    /// Hooks that refresh nothing and see no branch stacks (tests).
    pub fn none() -> Self {
        Self {
            refresh: Arc::new(|_: &Path| {}),
            branch_stacks: Arc::new(|| false),
            ran_natively: Arc::new(|_: &Path| false),
        }
    }
}

/// The name of the instrumented binary's readable copy in its profile directory.
const BINARY_COPY: &str = "instrumented.bin";

/// A profile file that does not parse this long after it was last written is dropped
/// (a run still writing it gets that long to finish).
const UNPARSABLE_GRACE: Duration = Duration::from_secs(30);

/// Instrumentation mode's settings, from `[profile]`.
#[derive(Debug, Clone)]
pub struct InstrumentSetup {
    pub budget: InstrumentationBudget,
    /// Instrumented runs slower than this many times the original stop instrumentation.
    pub max_slowdown: f64,
    /// The root of the per-binary profile directories (root-owned, 1733).
    pub root: PathBuf,
}

impl InstrumentSetup {
    /// None when `[profile] instrumentation` is off.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Self>> {
        let settings = &cfg.profile;
        Ok(settings.instrumentation_budget().map(|budget| Self {
            budget,
            max_slowdown: settings.instrument_max_slowdown,
            root: settings.instrumentation_dir(&cfg.state_dir),
        }))
    }

    /// Where the instrumented variant of the binary with this sha256 writes its profiles.
    pub fn dir_of(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..16.min(sha256.len())])
    }
}

/// The driver's instrumentation state.
pub struct Instrumenter {
    refresh: Refresh,
    branch_stacks: Arc<dyn Fn() -> bool + Send + Sync>,
    ran_natively: Arc<dyn Fn(&Path) -> bool + Send + Sync>,
    /// Binaries whose instrumented build failed in this server process (not retried
    /// until the daemon restarts: a failure usually repeats).
    failed: HashSet<i64>,
    /// Set at shutdown: a running `-instrument` build is killed.
    cancel: Arc<AtomicBool>,
}

impl Instrumenter {
    pub fn new(hooks: Hooks, mut shutdown: watch::Receiver<bool>) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        tokio::spawn(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
            c.store(true, Ordering::SeqCst);
        });
        Self {
            refresh: hooks.refresh,
            branch_stacks: hooks.branch_stacks,
            ran_natively: hooks.ran_natively,
            failed: HashSet::new(),
            cancel,
        }
    }

    /// Collects, retires, and builds at most one instrumented variant (see the module doc).
    pub async fn tick(&mut self, shared: &Arc<Shared>) -> anyhow::Result<()> {
        let Some(setup) = shared.instrumentation.clone() else { return Ok(()) };
        let current = current_paths(shared).await?;
        let retired = self.collect(shared, &setup, &current).await?;
        for path in retired {
            self.refresh_path(path).await;
        }
        if (self.branch_stacks)() {
            return Ok(());
        }
        // BOLT one job at a time: wait for an idle queue.
        let status = shared.queue_status();
        if !status.queued.is_empty() || !status.running.is_empty() {
            return Ok(());
        }
        let failed = self.failed.clone();
        let applicability = shared.applicability.clone();
        let max_runs = setup.budget.max_runs;
        let ran_natively: HashSet<PathBuf> =
            current.iter().map(|(p, _)| p).filter(|p| (self.ran_natively)(p)).cloned().collect();
        let due = shared
            .catalog
            .run(move |c| {
                for (path, key) in current {
                    let natively = ran_natively.contains(&path);
                    if let Some(b) = due_binary(c, &path, &key, &applicability, max_runs, natively)?
                        && !failed.contains(&b.id)
                    {
                        return Ok(Some((path, b)));
                    }
                }
                Ok(None)
            })
            .await?;
        let Some((path, binary)) = due else { return Ok(()) };
        let id = binary.id;
        match self.build(shared, &setup, &path, binary).await {
            Ok(variant_id) => {
                tracing::info!(path = %path.display(), variant_id, "instrumented variant built");
                self.refresh_path(path).await;
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(path = %path.display(), error = %why, "instrumented build failed");
                self.failed.insert(id);
                let (now, name) = (unix_now(), path.to_string_lossy().into_owned());
                shared.catalog.spawn("instrument event", move |c| {
                    base::record_event(c, now, Some(&name), "instrument", &format!("failed: {why}"))
                });
            }
        }
        Ok(())
    }

    async fn refresh_path(&self, path: PathBuf) {
        let refresh = self.refresh.clone();
        let _ = tokio::task::spawn_blocking(move || refresh(&path)).await;
    }

    /// Merges what the runs of each `ready` instrumented variant wrote; retires the
    /// variants whose binary has enough runs now. Returns the paths whose serving changes.
    async fn collect(
        &self,
        shared: &Shared,
        setup: &InstrumentSetup,
        current: &[(PathBuf, FileKey)],
    ) -> anyhow::Result<Vec<PathBuf>> {
        let paths: Vec<PathBuf> = current.iter().map(|(p, _)| p.clone()).collect();
        let active = shared
            .catalog
            .run(move |c| {
                let mut out = Vec::new();
                for p in paths {
                    let Some(row) = base::path_row(c, &p.to_string_lossy())? else { continue };
                    let Some(id) = row.binary_id else { continue };
                    for v in base::variants_of(c, id)? {
                        if v.kind == VariantKind::Instrumented && v.state == VariantState::Ready {
                            let sha = base::binary_by_id(c, id)?.map(|b| b.sha256);
                            out.push((p.clone(), id, v.id, sha.unwrap_or_default()));
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        let mut retired = Vec::new();
        for (path, binary_id, variant_id, sha256) in active {
            let dir = setup.dir_of(&sha256);
            let files = tokio::task::spawn_blocking(move || profile_files(&dir)).await??;
            let (max_runs, max_slowdown) = (setup.budget.max_runs, setup.max_slowdown);
            let now = unix_now();
            let done = shared
                .catalog
                .run(move |c| {
                    // The policy never sees these runs: a crash is caught here, and the
                    // variant is not served again.
                    if let Some(signal) = crash_of(c, binary_id, variant_id)? {
                        let note = format!("an instrumented run crashed (signal {signal})");
                        base::set_variant_state(
                            c,
                            variant_id,
                            VariantState::Rejected,
                            Some(&note),
                        )?;
                        base::record_event(c, now, None, "instrument", &note)?;
                        return Ok(true);
                    }
                    if let Some(x) = slowdown_of(c, binary_id, variant_id)?
                        && x > max_slowdown
                    {
                        let note = format!(
                            "instrumented runs took {x:.1}x the original's CPU time (limit \
                             {max_slowdown}x): instrumentation stopped"
                        );
                        base::set_variant_state(
                            c,
                            variant_id,
                            VariantState::Rejected,
                            Some(&note),
                        )?;
                        base::record_event(c, now, None, "instrument", &note)?;
                        return Ok(true);
                    }
                    let added = merge_files(c, binary_id, &files, now);
                    let collected = profiles::instrumented_runs(c, binary_id)?;
                    if added > 0 {
                        tracing::info!(binary_id, added, collected, "instrumented runs collected");
                    }
                    if collected < max_runs {
                        return Ok(false);
                    }
                    let note = format!("collected {collected} instrumented runs");
                    base::set_variant_state(c, variant_id, VariantState::Retired, Some(&note))?;
                    base::record_event(c, now, None, "instrument", &note)?;
                    Ok(true)
                })
                .await?;
            if done {
                // The directory stays: runs still going read the binary's copy there and
                // write their profile at exit (a few stray files, never collected).
                retired.push(path);
            }
        }
        Ok(retired)
    }

    /// `llvm-bolt -instrument` through the optimizer's sandboxed runner, verified and stored
    /// like any variant; returns the new variant's id.
    async fn build(
        &self,
        shared: &Arc<Shared>,
        setup: &InstrumentSetup,
        path: &Path,
        binary: base::BinaryRow,
    ) -> anyhow::Result<i64> {
        let runner = shared.runner.clone().context("BOLT is not available")?;
        let content = ContentId::parse(&binary.sha256).context("a malformed sha256")?;
        let dir = setup.dir_of(&binary.sha256);
        prepare_instrumentation_dir(&setup.root)?;
        prepare_instrumentation_dir(&dir)?;
        let job = BoltJob {
            original: path.to_path_buf(),
            expected_content: Some(content),
            plan: BoltPlan {
                mode: BoltMode::Relocations,
                split_functions: false,
                skip_funcs: vec![],
                profile: ProfileInput::Instrument {
                    profile_file: dir.join("prof.fdata"),
                    append_pid: true,
                    binpath: Some(dir.join(BINARY_COPY)),
                },
                flag_set: &crate::bolt::flags::DEFAULT_SET,
            },
            cancel: self.cancel.clone(),
        };
        let version = runner.version();
        let outcome = tokio::task::spawn_blocking(move || runner.run(&job)).await?;
        let success = match outcome {
            BoltOutcome::Ok(s) => s,
            BoltOutcome::Failed(f) => {
                anyhow::bail!("llvm-bolt -instrument: {}: {}", f.kind.label(), f.tail.trim_end())
            }
        };
        let (store, sandbox) = (shared.store.clone(), shared.sandbox.clone());
        let limits = shared.settings.limits();
        let flags = success.args.iter().skip(3).cloned().collect::<Vec<_>>().join(" ");
        let wall_ms = success.wall.as_millis();
        let copy = dir.join(BINARY_COPY);
        let stored = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let staged = store.stage(&success.output)?;
            let original = success.scratch.path().join("input");
            let report =
                verify(&original, staged.path(), &success.scratch, &sandbox, &limits, None)
                    .map_err(|why| anyhow::anyhow!("verification: {why}"))?;
            let file = store.commit(staged)?;
            publish_binary_copy(&file.path, &copy)?;
            Ok((file, report.checks.join(", ")))
        })
        .await??;
        let (file, checks) = stored;
        let variant = base::NewVariant {
            binary_id: binary.id,
            kind: VariantKind::Instrumented,
            sha256: file.content.hex(),
            store_path: file.path.display().to_string(),
            size: file.size,
            state: VariantState::Ready,
            bolt_version: Some(version),
            flags: Some(flags),
            profile_samples: None,
            note: Some(format!(
                "instrumented (profiles in {}); checked: {checks}; BOLT took {wall_ms} ms",
                dir.display()
            )),
        };
        let now = unix_now();
        let name = path.to_string_lossy().into_owned();
        shared
            .catalog
            .run(move |c| {
                let id = base::insert_variant(c, &variant, now)?;
                base::record_event(
                    c,
                    now,
                    Some(&name),
                    "instrument",
                    &format!("instrumented variant {id} built"),
                )?;
                Ok(id)
            })
            .await
    }
}

/// The binary at `path` (with `key` now) when it is due an instrumented build: see the
/// module doc. It has run when it has measured runs, profiled runs, or `ran_natively`
/// (passed through, its runs are neither measured nor, when short, sampled).
pub fn due_binary(
    c: &Connection,
    path: &Path,
    key: &FileKey,
    applicability: &crate::bolt::ApplicabilityConfig,
    max_runs: u64,
    ran_natively: bool,
) -> anyhow::Result<Option<base::BinaryRow>> {
    let Some(binary) = current_binary(c, path, key)? else { return Ok(None) };
    if base::control_row(c, &path.to_string_lossy())?.is_some_and(|ctl| ctl.excluded) {
        return Ok(None);
    }
    if !binary.facts.has_relocs
        || !verdict(&binary.facts, None, applicability).applicability.candidate
    {
        return Ok(None);
    }
    if base::variants_of(c, binary.id)?.iter().any(|v| v.kind == VariantKind::Instrumented) {
        return Ok(None);
    }
    if profiles::instrumented_runs(c, binary.id)? >= max_runs {
        return Ok(None);
    }
    let ran = ran_natively
        || !runs::runs_of_binary(c, binary.id, 1)?.is_empty()
        || profiles::windows(c, binary.id)?.iter().any(|w| w.runs > 0);
    Ok(ran.then_some(binary))
}

/// Publishes a root-owned, world-readable copy of the instrumented binary at `copy` (in the
/// 1733 profile directory), for `-instrumentation-binpath`: the store is inside the 0700
/// state directory. Whatever is at that name is removed first (in a sticky directory only
/// root and its owner may), and the copy is created exclusively: a file planted between
/// the two makes this fail rather than be trusted.
fn publish_binary_copy(stored: &Path, copy: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(copy) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", copy.display())),
    }
    let bytes = std::fs::read(stored).with_context(|| format!("reading {}", stored.display()))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(copy)
        .with_context(|| format!("creating {}", copy.display()))?;
    out.write_all(&bytes).with_context(|| format!("writing {}", copy.display()))?;
    out.sync_all()?;
    Ok(())
}

/// The crash signal of a measured run of the instrumented variant `variant_id`, if one
/// crashed (the signals the policy calls crashes).
fn crash_of(c: &Connection, binary_id: i64, variant_id: i64) -> anyhow::Result<Option<i32>> {
    let runs = runs::runs_of_binary(c, binary_id, crate::policy::load::RUNS_PER_BINARY)?;
    Ok(runs.iter().filter(|r| r.variant_id == Some(variant_id)).find_map(|r| match r.exit {
        crate::measure::RunExit::Signaled(s) if crate::policy::CRASH_SIGNALS.contains(&s) => {
            Some(s)
        }
        _ => None,
    }))
}

/// How much slower the measured, normally ending runs of instrumented variant `variant_id`
/// were than the original's runs of the same commands (see
/// [`crate::profile::instrument::slowdown`]).
fn slowdown_of(c: &Connection, binary_id: i64, variant_id: i64) -> anyhow::Result<Option<f64>> {
    let runs = runs::runs_of_binary(c, binary_id, crate::policy::load::RUNS_PER_BINARY)?;
    let normal =
        |r: &&runs::RunRow| r.counted && matches!(r.exit, crate::measure::RunExit::Exited(_));
    let of = |v: Option<i64>| -> Vec<(&str, u64)> {
        runs.iter()
            .filter(|r| r.variant_id == v)
            .filter(normal)
            .map(|r| (r.cmd_hash.as_str(), r.task_clock_ns))
            .collect()
    };
    Ok(crate::profile::instrument::slowdown(&of(Some(variant_id)), &of(None)))
}

/// The `*.fdata` regular files in `dir` (none when it does not exist).
fn profile_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        // DirEntry::file_type does not follow symlinks: a planted link is not read.
        if entry.file_type()?.is_file() && path.extension().is_some_and(|e| e == "fdata") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Merges each file as one run and removes it; a file that does not parse is left for a
/// run still writing it, and dropped once it is older than [`UNPARSABLE_GRACE`].
fn merge_files(c: &Connection, binary_id: i64, files: &[PathBuf], now: i64) -> u64 {
    let mut added = 0;
    for f in files {
        match collect_runs(c, binary_id, &[f.as_path()], now) {
            Ok(n) => {
                added += n;
                let _ = std::fs::remove_file(f);
            }
            Err(e) => {
                let age = std::fs::metadata(f)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok());
                if age.is_none_or(|a| a > UNPARSABLE_GRACE) {
                    tracing::warn!(file = %f.display(), error = %format!("{e:#}"), "dropping an unreadable instrumentation profile");
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    }
    added
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::ApplicabilityConfig;
    use crate::catalog::Catalog;
    use crate::elf::ElfFacts;

    /// A binary `r` with relocations and a ready instrumented variant: (binary, variant).
    fn binary_with_ready_instrumented_variant(
        c: &rusqlite::Connection,
    ) -> anyhow::Result<(i64, i64)> {
        let id = base::upsert_binary(c, &ContentId::of_bytes(b"r"), 4, &facts(true), 1)?;
        let v = base::NewVariant {
            binary_id: id,
            kind: VariantKind::Instrumented,
            sha256: ContentId::of_bytes(b"v").hex(),
            state: VariantState::Ready,
            ..Default::default()
        };
        Ok((id, base::insert_variant(c, &v, 1)?))
    }

    fn facts(has_relocs: bool) -> ElfFacts {
        ElfFacts::for_tests(8 * 1024, has_relocs)
    }

    #[test]
    fn due_for_instrumentation_when_relocatable_ran_and_not_yet_instrumented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"tool").unwrap();
        let key = FileKey::of(&path).unwrap();
        let text = path.to_string_lossy().into_owned();
        let cfg = ApplicabilityConfig { min_text_bytes: 1024, min_own_text_share: 0.3 };
        Catalog::in_memory()
            .unwrap()
            .run_blocking(move |c| {
                let due = |c: &Connection| {
                    due_binary(c, Path::new(&text), &key, &cfg, 2, false).map(|b| b.map(|b| b.id))
                };
                let plain =
                    base::upsert_binary(c, &ContentId::of_bytes(b"p"), 4, &facts(false), 1)?;
                base::upsert_path(c, &text, Some(plain), &key, 1)?;
                let batch = profiles::WindowBatch {
                    samples: vec![("hot".into(), 0, 10)],
                    own_samples: 10,
                    new_runs: 1,
                    ..Default::default()
                };
                profiles::add_window(c, plain, 0, "cpu-clock", &batch, 1)?;
                assert_eq!(due(c)?, None, "no relocations: -instrument cannot work");

                let id = base::upsert_binary(c, &ContentId::of_bytes(b"r"), 4, &facts(true), 1)?;
                base::upsert_path(c, &text, Some(id), &key, 2)?;
                assert_eq!(due(c)?, None, "never ran");
                profiles::add_window(c, id, 0, "cpu-clock", &batch, 2)?;
                assert_eq!(due(c)?, Some(id));
                base::set_excluded(c, &text, true, 3)?;
                assert_eq!(due(c)?, None, "excluded");
                base::set_excluded(c, &text, false, 4)?;
                let v = base::NewVariant {
                    binary_id: id,
                    kind: VariantKind::Instrumented,
                    sha256: ContentId::of_bytes(b"v").hex(),
                    state: VariantState::Retired,
                    ..Default::default()
                };
                base::insert_variant(c, &v, 5)?;
                assert_eq!(due(c)?, None, "instrumented once already");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn much_slower_instrumented_runs_are_found_by_command() {
        Catalog::in_memory()
            .unwrap()
            .run_blocking(|c| {
                let (id, vid) = binary_with_ready_instrumented_variant(c)?;
                let run = |variant: Option<i64>, cmd: &str, ns: i64, signal: Option<i32>| {
                    c.execute(
                        "INSERT INTO runs (binary_id, path, variant_id, cmd_hash, task_clock_ns,
                                           wall_ns, exit_signal, at_ms)
                         VALUES (?1, '/bin/r', ?2, ?3, ?4, 1, ?5, 1)",
                        rusqlite::params![id, variant, cmd, ns, signal],
                    )
                };
                run(None, "a", 100, None)?;
                assert_eq!(slowdown_of(c, id, vid)?, None, "no instrumented run yet");
                run(Some(vid), "b", 5000, None)?;
                assert_eq!(slowdown_of(c, id, vid)?, None, "command b never ran plain");
                run(Some(vid), "a", 300, None)?;
                assert_eq!(slowdown_of(c, id, vid)?, Some(3.0));
                // A killed run's time says nothing about speed.
                run(Some(vid), "a", 90_000, Some(libc::SIGKILL))?;
                assert_eq!(slowdown_of(c, id, vid)?, Some(3.0));
                run(Some(vid), "a", 2000, None)?;
                run(Some(vid), "a", 2500, None)?;
                assert_eq!(slowdown_of(c, id, vid)?, Some(20.0));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_crash_of_an_instrumented_run_is_found_and_user_signals_are_not_crashes() {
        Catalog::in_memory()
            .unwrap()
            .run_blocking(|c| {
                let (id, vid) = binary_with_ready_instrumented_variant(c)?;
                let run = |variant: Option<i64>, signal: Option<i32>| {
                    c.execute(
                        "INSERT INTO runs (binary_id, path, variant_id, cmd_hash, task_clock_ns,
                                           wall_ns, exit_signal, at_ms)
                         VALUES (?1, '/bin/r', ?2, 'h', 1, 1, ?3, 1)",
                        rusqlite::params![id, variant, signal],
                    )
                };
                run(None, Some(libc::SIGSEGV))?;
                run(Some(vid), Some(libc::SIGINT))?;
                assert_eq!(crash_of(c, id, vid)?, None, "the original's crash, a user's ^C");
                run(Some(vid), Some(libc::SIGABRT))?;
                assert_eq!(crash_of(c, id, vid)?, Some(libc::SIGABRT));
                Ok(())
            })
            .unwrap();
    }
}

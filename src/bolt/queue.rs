//! The optimizer's job queue: a tokio task ([`run_optimizer`]) that takes build requests
//! (matured candidates from the profile side, `optimize NAME` from the control file),
//! runs them (one at a time by default), and for each: writes the profile, climbs the
//! retry ladder with the [`BoltRunner`], verifies the output, stores it, and records the
//! variant and the job in the catalog.
//!
//! Requests are checked when submitted ([`OptimizerHandle::submit`] answers with the reason
//! for a refusal, which the control file turns into EINVAL); history-dependent decisions
//! (failed until a change, re-optimization after growth, exclusion) are taken when the job
//! starts, from the catalog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::applicability::{ApplicabilityConfig, ProfileNumbers, assess};
use super::discover::BoltState;
use super::flags::{DEFAULT_SET, FlagSet};
use super::job::{BoltJob, BoltOutcome, BoltPlan, FailureKind, ProfileInput};
use super::ladder::{Next, Rung, next_rung};
use super::retry_policy::{DEFAULT_GROWTH, Decision, decide};
use super::runner::BoltRunner;
use super::sandbox::{Sandbox, SandboxLimits};
use super::stale::{self, STALE_PROFILE_SAMPLES, StaleProfiles, StaleSource};
use super::status::{FinishedView, JobEnd, OptimizerStatus, QueuedView, RunningView};
use super::verify::{SmokeCommand, verify};
use crate::catalog::Catalog;
use crate::catalog::base::{VariantKind, VariantState};
use crate::catalog::{base, bolt_jobs, flag_trials, profile_digests};
use crate::clock::Clock;
use crate::elf::ElfFacts;
use crate::identity::ContentId;
use crate::store::{StoredVariant, VariantStore};

pub use super::retry_policy::RequestOrigin;

/// Where profiles come from (the profile module implements it).
pub trait ProfileSource: Send + Sync {
    /// Writes the binary's profile as an fdata file (no_lbr or branch form) to `out`.
    fn write_fdata(&self, binary_id: i64, out: &Path) -> anyhow::Result<ProfileInfo>;
}

/// What [`ProfileSource::write_fdata`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileInfo {
    pub samples: u64,
}

/// A request to build a variant.
#[derive(Debug, Clone)]
pub struct OptimizeRequest {
    pub binary_id: i64,
    /// The path shown in status and events (also checked against exclusions).
    pub name: String,
    /// Where the original's bytes are read from.
    pub original: PathBuf,
    pub content: ContentId,
    pub facts: ElfFacts,
    pub profile: ProfileNumbers,
    pub origin: RequestOrigin,
    /// A command safe to run the binary with, to compare the variant's output.
    pub smoke: Option<SmokeCommand>,
    /// Build from this profile of a previous version of the binary (a new version with no
    /// mature profile of its own; see [`super::stale`]) instead of the binary's own.
    pub stale: Option<StaleSource>,
    /// A challenger of the flag search: another flag set, built from the served variant's
    /// profile (None: a build with the default flags).
    pub challenge: Option<Challenge>,
}

/// What makes a build a challenger of the served variant (see docs/policy.md).
#[derive(Debug, Clone)]
pub struct Challenge {
    pub flag_set: &'static FlagSet,
    /// The profile the served variant was built from (kept by [`VariantProfiles`]).
    pub profile: ProfileInput,
}

/// The profile each stored variant was built from, kept beside the store as
/// `<variant sha256>.fdata` (or `.yaml` for a build from a previous version's profile),
/// so that challengers of a served variant are built from exactly its profile: a
/// challenger measured against a variant built from a smaller profile would be measuring
/// the profile, not the flags.
#[derive(Debug, Clone)]
pub struct VariantProfiles {
    pub dir: PathBuf,
}

impl VariantProfiles {
    /// The kept profile of the variant with content `sha256`, if there is one.
    pub fn profile_of(&self, sha256: &str) -> Option<ProfileInput> {
        let fdata = self.dir.join(format!("{sha256}.fdata"));
        let yaml = self.dir.join(format!("{sha256}.yaml"));
        if fdata.is_file() {
            Some(ProfileInput::Fdata(fdata))
        } else if yaml.is_file() {
            Some(ProfileInput::StaleYaml(yaml))
        } else {
            None
        }
    }

    /// Keeps `profile` as the profile of the variant with content `sha256`.
    pub fn keep(&self, sha256: &str, profile: &ProfileInput) -> anyhow::Result<()> {
        let (from, ext) = match profile {
            ProfileInput::Fdata(p) => (p, "fdata"),
            ProfileInput::StaleYaml(p) => (p, "yaml"),
            ProfileInput::Instrument { .. } => return Ok(()),
        };
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let to = self.dir.join(format!("{sha256}.{ext}"));
        if from != &to {
            std::fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    }

    /// Removes the profiles of variants whose content is not in `keep`.
    pub fn gc(&self, keep: &std::collections::HashSet<ContentId>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or("");
            if ContentId::parse(stem).is_none_or(|c| !keep.contains(&c)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct OptimizerConfig {
    /// Jobs running at once.
    pub concurrency: usize,
    pub applicability: ApplicabilityConfig,
    /// Limits of BOLT runs and of verification runs.
    pub limits: SandboxLimits,
    /// Profile growth that justifies another build.
    pub growth: f64,
    /// BOLT runs per job before giving up, whatever the ladder says.
    pub max_attempts: u32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            concurrency: 1,
            applicability: ApplicabilityConfig::default(),
            limits: SandboxLimits::default(),
            growth: DEFAULT_GROWTH,
            max_attempts: 12,
        }
    }
}

/// What the optimizer works with.
#[derive(Clone)]
pub struct OptimizerDeps {
    pub catalog: Catalog,
    pub store: VariantStore,
    pub bolt: BoltState,
    /// None when BOLT is missing: every request is then refused.
    pub runner: Option<Arc<dyn BoltRunner>>,
    /// Runs verification checks.
    pub sandbox: Sandbox,
    pub profiles: Arc<dyn ProfileSource>,
    pub clock: Arc<dyn Clock>,
    /// Where the profile of each successful build is kept for the binary's next version;
    /// None keeps nothing.
    pub kept_profiles: Option<StaleProfiles>,
    /// Where the profile of each stored variant is kept for its challengers; None keeps
    /// nothing (then no challenger can be built).
    pub variant_profiles: Option<VariantProfiles>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

struct Shared {
    config: OptimizerConfig,
    deps: OptimizerDeps,
    status: Mutex<OptimizerStatus>,
    cancel: Arc<AtomicBool>,
}

/// The side other modules hold: submit requests, read status.
#[derive(Clone)]
pub struct OptimizerHandle {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<OptimizeRequest>,
}

/// The side [`run_optimizer`] consumes.
pub struct OptimizerWorker {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<OptimizeRequest>,
}

/// Creates the optimizer; spawn [`run_optimizer`] with the worker.
pub fn optimizer(
    config: OptimizerConfig,
    deps: OptimizerDeps,
) -> (OptimizerHandle, OptimizerWorker) {
    let status = Mutex::new(OptimizerStatus::new(&deps.bolt));
    let shared =
        Arc::new(Shared { config, deps, status, cancel: Arc::new(AtomicBool::new(false)) });
    let (tx, rx) = mpsc::unbounded_channel();
    (
        OptimizerHandle { shared: shared.clone(), requests: tx },
        OptimizerWorker { shared, requests: rx },
    )
}

impl OptimizerHandle {
    /// Queues a build, or says why not (no BOLT, not a candidate, no profile, already
    /// queued).
    pub fn submit(&self, req: OptimizeRequest) -> Result<(), Rejected> {
        let shared = &self.shared;
        if shared.deps.runner.is_none() {
            return Err(Rejected("BOLT is not installed (see status)".into()));
        }
        if req.profile.samples == 0 {
            return Err(Rejected(format!("{}: no profile collected yet", req.name)));
        }
        let verdict = assess(&req.facts, &req.profile, &shared.config.applicability);
        if !verdict.candidate {
            return Err(Rejected(format!("{}: {}", req.name, verdict.reason)));
        }
        let mut status = lock(&shared.status);
        let busy = status
            .queued
            .iter()
            .map(|q| q.binary_id)
            .chain(status.running.iter().map(|r| r.binary_id));
        if busy.into_iter().any(|id| id == req.binary_id) {
            return Err(Rejected(format!("{}: already queued", req.name)));
        }
        status.queued.push(QueuedView { binary_id: req.binary_id, name: req.name.clone() });
        let (id, name) = (req.binary_id, req.name.clone());
        if self.requests.send(req).is_err() {
            status.queued.retain(|q| q.binary_id != id);
            return Err(Rejected(format!("{name}: the optimizer has stopped")));
        }
        Ok(())
    }

    pub fn status(&self) -> OptimizerStatus {
        lock(&self.shared.status).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take status down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The optimizer's task: runs until `shutdown` turns true, then cancels running BOLT jobs
/// (their process groups are killed) and returns when they have ended.
pub async fn run_optimizer(worker: OptimizerWorker, mut shutdown: watch::Receiver<bool>) {
    let OptimizerWorker { shared, mut requests } = worker;
    let slots = Arc::new(Semaphore::new(shared.config.concurrency.max(1)));
    let mut running = JoinSet::new();
    'outer: loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
            Some(_) = running.join_next(), if !running.is_empty() => {}
            req = requests.recv() => {
                let Some(req) = req else { break };
                let permit = loop {
                    tokio::select! {
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => break p,
                            Err(_) => break 'outer,
                        },
                        changed = shutdown.changed() => {
                            if changed.is_err() || *shutdown.borrow() { break 'outer }
                        }
                        Some(_) = running.join_next(), if !running.is_empty() => {}
                    }
                };
                let shared = shared.clone();
                running.spawn(async move {
                    run_job(&shared, req).await;
                    drop(permit);
                });
            }
        }
    }
    shared.cancel.store(true, Ordering::SeqCst);
    while running.join_next().await.is_some() {}
    let mut status = lock(&shared.status);
    status.queued.clear();
}

async fn run_job(shared: &Arc<Shared>, req: OptimizeRequest) {
    {
        let mut status = lock(&shared.status);
        status.queued.retain(|q| q.binary_id != req.binary_id);
        status.running.push(RunningView {
            binary_id: req.binary_id,
            name: req.name.clone(),
            attempt: 0,
            step: "preparing".into(),
        });
    }
    let (attempts, end) = match build(shared, &req).await {
        Ok(done) => done,
        Err(e) => {
            let why = format!("{e:#}");
            tracing::warn!(binary = %req.name, error = %why, "optimizer job failed");
            (
                0,
                JobEnd::Failed {
                    kind: "internal".into(),
                    tail: String::new(),
                    step: String::new(),
                    why,
                },
            )
        }
    };
    let now = shared.deps.clock.unix_secs();
    let detail = match &end {
        JobEnd::Built { sha256, .. } => {
            format!("variant {} built", &sha256[..12.min(sha256.len())])
        }
        JobEnd::Failed { kind, why, .. } => format!("failed ({kind}): {why}"),
        JobEnd::Skipped { why } => format!("skipped: {why}"),
        JobEnd::Cancelled => "cancelled by shutdown".into(),
    };
    let name = req.name.clone();
    shared
        .deps
        .catalog
        .spawn("bolt event", move |c| base::record_event(c, now, Some(&name), "bolt", &detail));
    lock(&shared.status).finish(FinishedView {
        binary_id: req.binary_id,
        name: req.name,
        attempts,
        end,
    });
}

/// One job: decide, profile, ladder, verify, store, record. Returns the attempts made.
async fn build(shared: &Arc<Shared>, req: &OptimizeRequest) -> anyhow::Result<(u32, JobEnd)> {
    let deps = &shared.deps;
    let runner = deps.runner.clone().context("BOLT is not installed")?;
    let version = runner.version();
    let (binary_id, name) = (req.binary_id, req.name.clone());
    let (excluded, history) = deps
        .catalog
        .run(move |c| {
            let excluded = base::controls(c)?.iter().any(|ctl| ctl.path == name && ctl.excluded);
            Ok((excluded, super::history::build_history(c, binary_id)?))
        })
        .await?;
    if excluded {
        return Ok((0, JobEnd::Skipped { why: "excluded by the user".into() }));
    }
    let samples = req.profile.samples;
    // A challenger is the flag search's decision (bounded there); the retry policy is
    // about rebuilding with the default flags.
    if req.challenge.is_none()
        && let Decision::Skip(why) =
            decide(history.as_ref(), samples, &version, req.origin, shared.config.growth)
    {
        return Ok((0, JobEnd::Skipped { why }));
    }
    let flag_set = req.challenge.as_ref().map_or(&DEFAULT_SET, |c| c.flag_set);
    let challenger = req.challenge.is_some();
    let now = deps.clock.unix_secs();
    deps.catalog
        .run(move |c| flag_trials::start(c, binary_id, flag_set.name, challenger, now))
        .await?;
    let result = build_with(shared, req, &runner, &version, flag_set).await;
    let (variant_id, outcome, detail) = match &result {
        Ok((_, JobEnd::Built { variant_id, .. })) => (Some(*variant_id), "built", String::new()),
        Ok((_, JobEnd::Failed { kind, why, .. })) => (None, "failed", format!("{kind}: {why}")),
        Ok((_, JobEnd::Skipped { why })) => (None, "skipped", why.clone()),
        Ok((_, JobEnd::Cancelled)) => (None, "cancelled", String::new()),
        Err(e) => (None, "failed", format!("{e:#}")),
    };
    let now = deps.clock.unix_secs();
    deps.catalog
        .run(move |c| {
            flag_trials::finish(c, binary_id, flag_set.name, variant_id, outcome, &detail, now)
        })
        .await?;
    result
}

/// The build itself, once it is due: profile, ladder, verify, store, record.
async fn build_with(
    shared: &Arc<Shared>,
    req: &OptimizeRequest,
    runner: &Arc<dyn BoltRunner>,
    version: &str,
    flag_set: &'static FlagSet,
) -> anyhow::Result<(u32, JobEnd)> {
    let deps = &shared.deps;
    let binary_id = req.binary_id;

    let profile_dir = tempfile::tempdir().context("creating the profile directory")?;
    let (profile, info) = match (&req.challenge, &req.stale) {
        // The served variant's own profile; its size is what that variant recorded.
        (Some(c), _) => (c.profile.clone(), ProfileInfo { samples: req.profile.samples.max(1) }),
        // Recorded as a tiny profile: the binary's own mature profile replaces it.
        (None, Some(source)) => (
            ProfileInput::StaleYaml(source.yaml.clone()),
            ProfileInfo { samples: STALE_PROFILE_SAMPLES },
        ),
        (None, None) => {
            let fdata = profile_dir.path().join("profile.fdata");
            let profiles = deps.profiles.clone();
            let out = fdata.clone();
            let info = tokio::task::spawn_blocking(move || profiles.write_fdata(binary_id, &out))
                .await?
                .context("writing the profile")?;
            (ProfileInput::Fdata(fdata), info)
        }
    };
    if info.samples == 0 {
        return Ok((0, JobEnd::Skipped { why: "the profile is empty".into() }));
    }
    let digest_of = profile.clone();
    let profile_digest = tokio::task::spawn_blocking(move || digest_of.digest())
        .await?
        .context("hashing the profile")?;

    let mode = assess(&req.facts, &req.profile, &shared.config.applicability).mode;
    let mut rung = Rung::first(BoltPlan {
        mode,
        split_functions: flag_set.split,
        skip_funcs: vec![],
        profile: profile.clone(),
        flag_set,
    });
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        set_running(shared, binary_id, attempt, rung.label());
        let job = BoltJob {
            original: req.original.clone(),
            expected_content: Some(req.content),
            plan: rung.plan.clone(),
            cancel: shared.cancel.clone(),
        };
        let r = runner.clone();
        let outcome = tokio::task::spawn_blocking(move || r.run(&job)).await?;
        let tried = try_store(shared, req, outcome).await?;
        let record = bolt_jobs::AttemptRecord {
            binary_id,
            outcome: tried.kind.as_ref().map_or("ok".into(), |k| k.label()),
            tail: tried.kind.as_ref().map(|_| tried.tail.clone()),
            ladder_step: rung.label(),
            flags: tried.flags.clone(),
            profile_samples: info.samples,
            bolt_version: version.to_string(),
            wall_ms: tried.wall_ms,
            peak_rss_kib: tried.peak_rss_kib,
        };
        let now = deps.clock.unix_secs();
        let Some(kind) = tried.kind else {
            let stored = tried.stored.context("a success has a stored variant")?;
            let sha256 = stored.file.content.hex();
            if let Some(origin) = stored.origin.clone() {
                let name = req.name.clone();
                deps.catalog.spawn("stale profile event", move |c| {
                    base::record_event(c, now, Some(&name), "bolt", &origin)
                });
            }
            if let Some(kept) = &deps.variant_profiles {
                let (kept, sha) = (kept.clone(), sha256.clone());
                let profile = profile.clone();
                let done = tokio::task::spawn_blocking(move || kept.keep(&sha, &profile)).await?;
                if let Err(e) = done {
                    // The variant is fine; only its challengers cannot be built.
                    tracing::warn!(binary = %req.name, error = %format!("{e:#}"), "keeping the variant's profile failed");
                }
            }
            let built_from = BuiltFrom { samples: info.samples, digest: profile_digest };
            let variant_id = record_variant(shared, record, stored, built_from, now).await?;
            collect_garbage(shared).await;
            return Ok((attempt, JobEnd::Built { variant_id, sha256 }));
        };
        if kind == FailureKind::Cancelled {
            return Ok((attempt, JobEnd::Cancelled));
        }
        deps.catalog.run(move |c| bolt_jobs::record_attempt(c, &record, now)).await?;
        let next = if attempt >= shared.config.max_attempts {
            Next::GiveUp(format!("{attempt} attempts"))
        } else {
            next_rung(&rung, &kind, &tried.tail)
        };
        match next {
            Next::Retry(r) => rung = r,
            Next::Abandon => return Ok((attempt, JobEnd::Cancelled)),
            Next::GiveUp(why) => {
                // A challenger's flags failing says nothing about the default flags.
                if req.challenge.is_none() {
                    deps.catalog
                        .run(move |c| bolt_jobs::set_failed_until_change(c, binary_id, true, now))
                        .await?;
                }
                return Ok((
                    attempt,
                    JobEnd::Failed {
                        kind: kind.label(),
                        tail: tried.tail,
                        step: rung.label(),
                        why,
                    },
                ));
            }
        }
    }
}

/// The profile a variant was built from, as recorded with it.
struct BuiltFrom {
    samples: u64,
    digest: Option<ContentId>,
}

/// Records a stored variant (kind "bolt", state "ready"), the digest of its profile and its
/// successful attempt, in one transaction.
async fn record_variant(
    shared: &Arc<Shared>,
    attempt: bolt_jobs::AttemptRecord,
    stored: Stored,
    built_from: BuiltFrom,
    now: i64,
) -> anyhow::Result<i64> {
    let binary_id = attempt.binary_id;
    let variant = base::NewVariant {
        binary_id,
        kind: VariantKind::Bolt,
        sha256: stored.file.content.hex(),
        store_path: stored.file.path.display().to_string(),
        size: stored.file.size,
        state: VariantState::Ready,
        bolt_version: Some(attempt.bolt_version.clone()),
        flags: Some(attempt.flags.clone()),
        profile_samples: Some(built_from.samples as i64),
        note: Some(stored.note),
    };
    shared
        .deps
        .catalog
        .run(move |c| {
            let tx = c.transaction()?;
            bolt_jobs::record_attempt(&tx, &attempt, now)?;
            let id = base::insert_variant(&tx, &variant, now)?;
            if let Some(digest) = &built_from.digest {
                profile_digests::set(&tx, id, digest)?;
            }
            bolt_jobs::set_variant(&tx, binary_id, id)?;
            tx.commit()?;
            Ok(id)
        })
        .await
}

/// Removes stored variants the catalog no longer needs (after a build, when the store has
/// just grown). Failures are logged: a full store is not a failed job.
async fn collect_garbage(shared: &Arc<Shared>) {
    let keep = match shared.deps.catalog.run(|c| bolt_jobs::variants_to_keep(c)).await {
        Ok(k) => k,
        Err(e) => {
            return tracing::warn!(error = %format!("{e:#}"), "variant gc: reading the catalog");
        }
    };
    let store = shared.deps.store.clone();
    let profiles = shared.deps.variant_profiles.clone();
    match tokio::task::spawn_blocking(move || {
        if let Some(p) = profiles {
            p.gc(&keep);
        }
        store.gc(&keep)
    })
    .await
    {
        Ok(Ok(r)) if r.removed > 0 => {
            tracing::info!(removed = r.removed, freed = r.freed_bytes, "variant gc")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "variant gc"),
        Err(e) => tracing::warn!(error = %e, "variant gc"),
    }
}

/// The result of one attempt after verification and storing.
struct Tried {
    /// None: stored.
    kind: Option<FailureKind>,
    tail: String,
    flags: String,
    wall_ms: u64,
    peak_rss_kib: u64,
    stored: Option<Stored>,
}

/// A verified, stored output.
struct Stored {
    file: StoredVariant,
    /// What verification checked, and BOLT's cost.
    note: String,
    /// For a build from a previous version's profile: which, and how it matched.
    origin: Option<String>,
}

/// Verifies a successful run's output and stores it; failures pass through.
async fn try_store(
    shared: &Arc<Shared>,
    req: &OptimizeRequest,
    outcome: BoltOutcome,
) -> anyhow::Result<Tried> {
    let success = match outcome {
        BoltOutcome::Failed(f) => {
            return Ok(Tried {
                kind: Some(f.kind),
                tail: f.tail,
                flags: recorded_flags(&f.args, req.stale.as_ref()),
                wall_ms: f.wall.as_millis() as u64,
                peak_rss_kib: f.peak_rss_kib,
                stored: None,
            });
        }
        BoltOutcome::Ok(s) => s,
    };
    let store = shared.deps.store.clone();
    let sandbox = shared.deps.sandbox.clone();
    let limits = shared.config.limits.clone();
    let smoke = req.smoke.clone();
    let mut tried = Tried {
        kind: None,
        tail: success.tail.clone(),
        flags: recorded_flags(&success.args, req.stale.as_ref()),
        wall_ms: success.wall.as_millis() as u64,
        peak_rss_kib: success.peak_rss_kib,
        stored: None,
    };
    let (wall_ms, rss) = (tried.wall_ms, tried.peak_rss_kib);
    let origin = req.stale.as_ref().map(|s| stale::note(&s.kept, success.stale_match));
    let note_start = origin.as_ref().map(|o| format!("{o}; ")).unwrap_or_default();
    // Only a build from the binary's own profile leaves a profile for its next version.
    let keep = match (&shared.deps.kept_profiles, &req.stale, &success.profile_yaml) {
        (Some(kept), None, Some(yaml)) => Some((
            kept.clone(),
            yaml.clone(),
            req.name.clone(),
            req.content,
            success.version.clone(),
        )),
        _ => None,
    };
    let checked = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        // Verify a root-owned copy: the sandbox user can still write to the scratch output.
        let staged = store.stage(&success.output)?;
        let original = success.scratch.path().join("input");
        match verify(&original, staged.path(), &success.scratch, &sandbox, &limits, smoke.as_ref())
        {
            Ok(report) => {
                let note = format!(
                    "{note_start}checked: {}; BOLT took {wall_ms} ms, peak {}",
                    report.checks.join(", "),
                    bytesize::ByteSize::kib(rss).display().iec()
                );
                let file = store.commit(staged)?;
                if let Some((kept, yaml, name, content, version)) = keep
                    && let Err(e) = kept.keep(&name, &content, &version, &yaml)
                {
                    // The variant is fine; only the next version's head start is lost.
                    tracing::warn!(binary = %name, error = %format!("{e:#}"), "keeping the profile for upgrades failed");
                }
                Ok(Ok(Stored { file, note, origin }))
            }
            Err(why) => Ok(Err(why)),
        }
    })
    .await??;
    match checked {
        Ok(stored) => tried.stored = Some(stored),
        Err(why) => tried.kind = Some(FailureKind::Verification(why)),
    }
    Ok(tried)
}

/// The flags as recorded: without the scratch paths of input, output and profile; a
/// previous version's profile is named by that version (see [`stale::data_flag`]).
fn recorded_flags(args: &[String], stale: Option<&StaleSource>) -> String {
    args.iter()
        .skip(3)
        .map(|a| match a {
            _ if a.starts_with("-data=") => match stale {
                Some(s) => stale::data_flag(&s.kept),
                None => "-data=<profile>".to_string(),
            },
            _ if a.starts_with("-w=") => "-w=<profile.yaml>".to_string(),
            _ => a.clone(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn set_running(shared: &Shared, binary_id: i64, attempt: u32, step: String) {
    let mut status = lock(&shared.status);
    if let Some(r) = status.running.iter_mut().find(|r| r.binary_id == binary_id) {
        r.attempt = attempt;
        r.step = step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_flags_hide_scratch_paths() {
        let args: Vec<String> = [
            "/s/input",
            "-o",
            "/s/work/output",
            "-data=/s/profile.fdata",
            "-w=/s/o.yaml",
            "-plt=hot",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(recorded_flags(&args, None), "-data=<profile> -w=<profile.yaml> -plt=hot");
    }
}

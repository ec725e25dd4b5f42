//! The maturity driver: every `check_interval_secs`, looks at each binary now at a path of
//! the overlaid directories and submits a build (origin `Matured`) for those that are not
//! excluded or denied, whose profile is mature, that BOLT applies to, and that the retry
//! policy lets through (so an unchanged profile is not offered again every few seconds).
//! The queue checks again when the job starts; a refusal at submission is normal (already
//! queued) and only logged at debug level.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::watch;

use super::Shared;
use super::candidate::{current_binary, profile_numbers, request, verdict};
use crate::bolt::history::build_history;
use crate::bolt::retry_policy::{DEFAULT_GROWTH, Decision, decide};
use crate::bolt::stale::{STALE_PROFILE_NUMBERS, StaleSource};
use crate::bolt::{ApplicabilityConfig, OptimizeRequest, ProfileNumbers, RequestOrigin};
use crate::catalog::{base, bolt_jobs};
use crate::identity::FileKey;
use crate::profile::maturity::MaturityThresholds;
use crate::profile::profile_summary;

/// Runs until `shutdown`. With instrumentation on, each tick also collects instrumented
/// runs and builds at most one instrumented variant (inline: while it builds, no BOLT
/// build is submitted, so BOLT still runs one job at a time unless a user's `optimize`
/// arrives meanwhile).
pub async fn run_driver(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    hooks: super::instrumenting::Hooks,
) {
    let mut tick = tokio::time::interval(shared.settings.check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut instrumenter = super::instrumenting::Instrumenter::new(hooks, shutdown.clone());
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            _ = tick.tick() => {
                match submit_matured(&shared).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(n, "matured profiles queued for BOLT"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "looking for matured profiles failed"),
                }
                if shared.settings.flag_search {
                    match submit_challengers(&shared).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(n, "flag search: challengers queued for BOLT"),
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "flag search failed"),
                    }
                }
                if shared.instrumentation.is_some()
                    && let Err(e) = instrumenter.tick(&shared).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "instrumentation pass failed");
                }
            }
        }
    }
}

/// The judging inputs that do not change between binaries.
#[derive(Debug, Clone)]
pub struct Rules {
    pub thresholds: MaturityThresholds,
    pub applicability: ApplicabilityConfig,
    /// The BOLT version jobs would run with ("22.1.8").
    pub bolt_version: String,
    /// With instrumentation on: the instrumented runs that make an instrumentation profile
    /// complete. Such a profile is mature whatever the sampled one says (the maturity
    /// measure of `crate::profile::maturity` only looks at samples).
    pub instrumented_runs_needed: Option<u64>,
    /// The fleet's profiles and verdicts (`[fleet]`): a mature fleet profile makes a
    /// binary due here too, and enough rejections elsewhere hold a build back.
    pub fleet: Option<Arc<crate::fleet::FleetView>>,
    /// The profiles kept per path from earlier builds (`crate::bolt::stale`): a new
    /// version at such a path with no mature profile of its own and no build yet is
    /// built from its previous version's profile at once.
    pub kept: HashMap<String, StaleSource>,
}

/// The indexed binaries at paths of the overlaid directories that the config permits and
/// that still hold the content indexed (stat outside the catalog thread).
pub async fn current_paths(shared: &Shared) -> anyhow::Result<Vec<(PathBuf, FileKey)>> {
    let rows = shared.catalog.run(|c| base::all_paths(c)).await?;
    let cfg = shared.config.clone();
    // Stat outside the catalog thread: only content still at its path counts.
    let current: Vec<(PathBuf, FileKey)> = tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .filter(|r| r.binary_id.is_some())
            .map(|r| (PathBuf::from(r.path), r.key))
            .filter(|(p, _)| crate::config::in_overlaid_dir(&cfg.overlay, p))
            .filter(|(p, _)| cfg.permits(p))
            .filter(|(p, key)| FileKey::of(p).is_ok_and(|now| now == *key))
            .collect()
    })
    .await?;
    Ok(current)
}

/// One scan: submits every binary due for a build; returns how many were queued.
async fn submit_matured(shared: &Arc<Shared>) -> anyhow::Result<usize> {
    let current = current_paths(shared).await?;
    let kept_profiles = shared.kept_profiles.clone();
    let kept = tokio::task::spawn_blocking(move || kept_profiles.kept()).await?;
    let rules = Rules {
        thresholds: shared.thresholds,
        applicability: shared.applicability.clone(),
        bolt_version: shared.bolt.tool().map(|t| t.version.to_string()).unwrap_or_default(),
        instrumented_runs_needed: shared.instrumentation.as_ref().map(|i| i.budget.max_runs),
        fleet: shared.fleet.clone(),
        kept,
    };
    submit_requests(shared, current, rules, matured_request, "matured build").await
}

/// Makes the request (if any) for each current path with `request` on the catalog thread,
/// one per binary, and submits them; returns how many were queued. `what` names them in
/// the log.
async fn submit_requests<R: Send + 'static>(
    shared: &Arc<Shared>,
    current: Vec<(PathBuf, FileKey)>,
    rules: R,
    request: fn(&Connection, &Path, &FileKey, &R) -> anyhow::Result<Option<OptimizeRequest>>,
    what: &'static str,
) -> anyhow::Result<usize> {
    let requests = shared
        .catalog
        .run(move |c| {
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for (path, key) in current {
                if let Some(req) = request(c, &path, &key, &rules)?
                    && seen.insert(req.binary_id)
                {
                    out.push(req);
                }
            }
            Ok(out)
        })
        .await?;
    let mut queued = 0;
    for req in requests {
        let name = req.name.clone();
        match shared.handle.submit(req) {
            Ok(()) => queued += 1,
            Err(why) => tracing::debug!(binary = %name, reason = %why, "{what} not queued"),
        }
    }
    Ok(queued)
}

/// One scan of the flag search: submits a challenger for every binary due one (see
/// [`super::challengers`]); returns how many were queued.
async fn submit_challengers(shared: &Arc<Shared>) -> anyhow::Result<usize> {
    let current = current_paths(shared).await?;
    let rules = shared.search.clone();
    submit_requests(shared, current, rules, super::challengers::challenger_request, "challenger")
        .await
}

/// The build request for the binary at `path` (whose file has `key` now), when it is due
/// one: not excluded, mature, a candidate, and allowed by the retry policy.
pub fn matured_request(
    conn: &Connection,
    path: &Path,
    key: &FileKey,
    rules: &Rules,
) -> anyhow::Result<Option<OptimizeRequest>> {
    let Some(binary) = current_binary(conn, path, key)? else { return Ok(None) };
    if base::control_row(conn, &path.to_string_lossy())?.is_some_and(|c| c.excluded) {
        return Ok(None);
    }
    let local = match instrumented_numbers(conn, binary.id, rules)? {
        Some(numbers) => Some(numbers),
        None => mature_sampled_numbers(conn, binary.id, rules)?,
    };
    // The fleet's merged profile when it is mature and larger: the build uses it then
    // (see `super::profiles`).
    let fleet =
        rules.fleet.as_ref().and_then(|f| f.mature_profile(&binary.sha256, &rules.thresholds));
    let numbers = match (local, fleet) {
        (Some(l), Some(f)) if f.samples > l.samples => f,
        (Some(l), _) => l,
        (None, Some(f)) => f,
        (None, None) => return stale_request(conn, path, binary, rules),
    };
    if let Some(why) = rules
        .fleet
        .as_ref()
        .and_then(|f| f.rebuild_blocked(&binary.sha256, &rules.bolt_version, numbers.samples))
    {
        tracing::debug!(binary = %path.display(), reason = %why, "build held back by the fleet");
        return Ok(None);
    }
    if !verdict(&binary.facts, Some(&numbers), &rules.applicability).applicability.candidate {
        return Ok(None);
    }
    let history = build_history(conn, binary.id)?;
    let due = decide(
        history.as_ref(),
        numbers.samples,
        &rules.bolt_version,
        RequestOrigin::Matured,
        DEFAULT_GROWTH,
    );
    if let Decision::Skip(_) = due {
        return Ok(None);
    }
    request(path, binary, numbers, RequestOrigin::Matured).map(Some)
}

/// The build request from the previous version's kept profile for `binary` (a version
/// with no mature profile of its own) at `path`, when it is due one: a profile is kept for
/// the path from another content, BOLT never ran on this content, and its facts make it
/// a candidate (its own profile cannot say yet; the previous version's did).
fn stale_request(
    conn: &Connection,
    path: &Path,
    binary: base::BinaryRow,
    rules: &Rules,
) -> anyhow::Result<Option<OptimizeRequest>> {
    let name = path.to_string_lossy().into_owned();
    let Some(source) = rules.kept.get(&name).and_then(|s| s.for_content(&binary.sha256)) else {
        return Ok(None);
    };
    if bolt_jobs::job_of(conn, binary.id)?.is_some() {
        return Ok(None);
    }
    if !verdict(&binary.facts, None, &rules.applicability).applicability.candidate {
        return Ok(None);
    }
    let request = request(path, binary, STALE_PROFILE_NUMBERS, RequestOrigin::Matured)?;
    Ok(Some(OptimizeRequest { stale: Some(source.clone()), ..request }))
}

/// The sampled profile's numbers when it is mature, else None.
fn mature_sampled_numbers(
    conn: &Connection,
    binary_id: i64,
    rules: &Rules,
) -> anyhow::Result<Option<ProfileNumbers>> {
    // Cheap first: most binaries have far too few samples for the full maturity check.
    if profile_numbers(conn, binary_id)?.is_none_or(|p| p.samples < rules.thresholds.min_samples) {
        return Ok(None);
    }
    let summary = profile_summary(conn, binary_id, &rules.thresholds)?;
    if !summary.maturity.mature {
        return Ok(None);
    }
    Ok(Some(ProfileNumbers {
        samples: summary.own_samples,
        own_text_share: summary.own_share.unwrap_or(0.0),
        front_end: None,
    }))
}

/// The profile's numbers when its instrumentation profile is complete (instrumentation on
/// and enough instrumented runs merged), else None. The count is what the BOLT job will
/// record: the sampled own-text samples if there are any, else the edge executions of the
/// instrumentation profile (as [`super::profiles::CatalogProfiles`] counts them); the
/// own-text share is unknown without samples and taken as whole.
fn instrumented_numbers(
    conn: &Connection,
    binary_id: i64,
    rules: &Rules,
) -> anyhow::Result<Option<ProfileNumbers>> {
    let Some(needed) = rules.instrumented_runs_needed else { return Ok(None) };
    if crate::catalog::profiles::instrumented_runs(conn, binary_id)? < needed {
        return Ok(None);
    }
    if let Some(sampled) = profile_numbers(conn, binary_id)? {
        return Ok(Some(sampled));
    }
    let edges: u64 =
        crate::catalog::profiles::instrumented_edges(conn, binary_id)?.iter().map(|e| e.3).sum();
    Ok((edges > 0).then_some(ProfileNumbers {
        samples: edges,
        own_text_share: 1.0,
        front_end: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, profiles};
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    fn facts() -> ElfFacts {
        ElfFacts::for_tests(8 * 1024, true)
    }

    fn window(c: &Connection, id: i64, start: i64, own: u64) -> anyhow::Result<()> {
        profiles::add_test_window(c, id, start, own, own / 10)
    }

    #[test]
    fn a_complete_instrumentation_profile_is_mature_without_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"tool").unwrap();
        let key = FileKey::of(&path).unwrap();
        let mut rules = Rules {
            thresholds: MaturityThresholds { min_samples: 500, min_runs: 2, min_stability: 0.5 },
            applicability: ApplicabilityConfig { min_text_bytes: 1024, min_own_text_share: 0.3 },
            bolt_version: "22.1.8".into(),
            instrumented_runs_needed: Some(2),
            fleet: None,
            kept: HashMap::new(),
        };
        let catalog = Catalog::in_memory().unwrap();
        let text = path.to_string_lossy().into_owned();
        catalog
            .run_blocking(move |c| {
                let id = base::upsert_binary(c, &ContentId::of_bytes(b"tool"), 4, &facts(), 1)?;
                base::upsert_path(c, &text, Some(id), &key, 1)?;
                let due = |c: &Connection, r: &Rules| matured_request(c, Path::new(&text), &key, r);
                let edge = ("1 main 1a".to_string(), "1 main 2b".to_string(), 0u64, 40u64);
                profiles::add_instrumented_run(c, id, std::slice::from_ref(&edge), 1)?;
                assert!(due(c, &rules)?.is_none(), "one instrumented run of two");
                profiles::add_instrumented_run(c, id, &[edge], 2)?;
                let req = due(c, &rules)?.expect("complete");
                assert_eq!((req.profile.samples, req.profile.own_text_share), (80, 1.0));
                rules.instrumented_runs_needed = None;
                assert!(due(c, &rules)?.is_none(), "instrumentation off: samples decide");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn only_mature_candidates_the_retry_policy_allows_are_requested() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"tool").unwrap();
        let key = FileKey::of(&path).unwrap();
        let rules = Rules {
            thresholds: MaturityThresholds { min_samples: 500, min_runs: 2, min_stability: 0.5 },
            applicability: ApplicabilityConfig { min_text_bytes: 1024, min_own_text_share: 0.3 },
            bolt_version: "22.1.8".into(),
            instrumented_runs_needed: None,
            fleet: None,
            kept: HashMap::new(),
        };
        let catalog = Catalog::in_memory().unwrap();
        let text = path.to_string_lossy().into_owned();
        catalog
            .run_blocking(move |c| {
                let content = ContentId::of_bytes(b"tool");
                let id = base::upsert_binary(c, &content, 4, &facts(), 1)?;
                let due = |c: &Connection| matured_request(c, Path::new(&text), &key, &rules);
                assert!(due(c)?.is_none(), "not indexed at this path yet");
                base::upsert_path(c, &text, Some(id), &key, 1)?;
                window(c, id, 0, 400)?;
                assert!(due(c)?.is_none(), "one window, too few samples and runs");
                window(c, id, 600, 400)?;
                let req = due(c)?.expect("mature now");
                assert_eq!(req.binary_id, id);
                assert_eq!(req.origin, RequestOrigin::Matured);
                assert_eq!(req.profile.samples, 800);
                assert!((req.profile.own_text_share - 800.0 / 880.0).abs() < 1e-9);

                base::set_excluded(c, &text, true, 2)?;
                assert!(due(c)?.is_none(), "excluded");
                base::set_excluded(c, &text, false, 3)?;

                let failed = bolt_jobs::AttemptRecord {
                    binary_id: id,
                    outcome: "exit 1".into(),
                    profile_samples: 800,
                    bolt_version: "22.1.8".into(),
                    ..Default::default()
                };
                bolt_jobs::record_attempt(c, &failed, 4)?;
                bolt_jobs::set_failed_until_change(c, id, true, 4)?;
                assert!(due(c)?.is_none(), "failed until a change");
                window(c, id, 1200, 900)?;
                assert!(due(c)?.is_some(), "the profile doubled");

                let stripped = ElfFacts { has_symbols: false, ..facts() };
                let other = base::upsert_binary(c, &ContentId::of_bytes(b"s"), 4, &stripped, 1)?;
                base::upsert_path(c, &text, Some(other), &key, 5)?;
                window(c, other, 0, 900)?;
                window(c, other, 600, 900)?;
                assert!(due(c)?.is_none(), "not a candidate");
                Ok(())
            })
            .unwrap();
    }
}

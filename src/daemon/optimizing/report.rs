//! What the optimizer shows: the "optimizer" section of `status.json` (BOLT found or
//! missing, queue, running job, recent failures with BOLT's tail, store usage) and per
//! binary (applicability and the `bolt_jobs` row), each with a `summary` line; and the
//! pipeline stage the policy displays for a binary without an active variant.

use std::sync::Arc;

use rusqlite::Connection;

use super::Shared;
use super::candidate::{profile_numbers, verdict};
use crate::bolt::history::build_history;
use crate::bolt::retry_policy::{DEFAULT_GROWTH, Decision, RequestOrigin, decide};
use crate::bolt::stale;
use crate::bolt::status::{JobEnd, OptimizerStatus};
use crate::bolt::{ProfileNumbers, assess};
use crate::catalog::base::{VariantKind, VariantState};
use crate::catalog::{base, bolt_jobs, runs};
use crate::control::SubsystemStatus;
use crate::control::details::{BinaryDetails, Detail, OptimizerBinary};
use crate::control::sections::{FailedJob, MachineSections, OptimizerMachine, OrError};
use crate::control::status::human_size;
use crate::policy::Pipeline;
use crate::policy::load::PipelineView;
use crate::profile::profile_summary;

/// Failures listed from the catalog in the section.
const FAILURES_SHOWN: u32 = 10;
/// Lines of BOLT's output in a failure's short form.
const TAIL_LINES: usize = 3;

pub struct OptimizerReport {
    pub shared: Arc<Shared>,
}

impl SubsystemStatus for OptimizerReport {
    fn name(&self) -> &'static str {
        "optimizer"
    }

    fn section(&self, sections: &mut MachineSections) {
        let shared = &self.shared;
        let status = shared.handle.status();
        let failures = shared.catalog.run_blocking(|c| {
            let mut out = Vec::new();
            for job in bolt_jobs::recent_failures(c, FAILURES_SHOWN)? {
                let paths = runs::paths_of_binary(c, job.binary_id)?;
                out.push(OrError::Read(FailedJob { job, paths }));
            }
            Ok(out)
        });
        // An unreadable list is one entry saying why, where the failures would be.
        let failures = failures.unwrap_or_else(|e| vec![OrError::of(Err(e))]);
        let store = OrError::of(shared.store.disk_usage());
        sections.optimizer = Some(OptimizerMachine {
            summary: section_summary(shared, &status, store.read()),
            applicability: shared.applicability.clone(),
            status,
            failures,
            maturity: shared.thresholds,
            off: shared.off.clone(),
            scratch_dir: shared.settings.scratch_dir.clone(),
            store,
            store_dir: shared.store.root().to_path_buf(),
        });
    }

    fn binary(&self, conn: &Connection, binary_id: i64, details: &mut BinaryDetails) {
        details.optimizer = self
            .binary_details(conn, binary_id)
            .map(|d| d.map(Detail::Read))
            .unwrap_or_else(|e| Some(Detail::unreadable("optimizer status", &e)));
    }
}

impl OptimizerReport {
    pub(super) fn binary_details(
        &self,
        conn: &Connection,
        binary_id: i64,
    ) -> anyhow::Result<Option<OptimizerBinary>> {
        let Some(binary) = base::binary_by_id(conn, binary_id)? else { return Ok(None) };
        let profile = profile_numbers(conn, binary_id)?;
        let v = verdict(&binary.facts, profile.as_ref(), &self.shared.applicability);
        let job = bolt_jobs::job_of(conn, binary_id)?;
        let queue = queue_state(&self.shared.queue_status(), binary_id);
        let history = match &job {
            None => None,
            Some(j) if j.failed_until_change => Some(format!(
                "BOLT failed ({}) after {} attempt(s); waiting for a new content, BOLT version or \
                 a profile twice as big",
                j.last_outcome, j.attempts
            )),
            Some(j)
                if j.last_outcome == "ok"
                    && j.flags.as_deref().and_then(stale::version_in_flags).is_some() =>
            {
                Some(format!(
                    "built with BOLT {} from the previous version's profile ({} attempt(s))",
                    j.bolt_version, j.attempts
                ))
            }
            Some(j) if j.last_outcome == "ok" => Some(format!(
                "built with BOLT {} from {} samples ({} attempt(s))",
                j.bolt_version, j.profile_samples, j.attempts
            )),
            Some(j) => Some(format!("last BOLT attempt: {}", j.last_outcome)),
        };
        // A variant that bridges an upgrade says from which version and how it matched.
        let stale_profile = base::variants_of(conn, binary_id)?
            .into_iter()
            .rev()
            .filter(|v| v.kind == VariantKind::Bolt && v.state != VariantState::Retired)
            .find_map(|v| {
                let version = stale::version_in_flags(v.flags.as_deref()?)?;
                Some(format!("variant {} {}", v.id, stale::describe(version, None)))
            });
        let search = super::challengers::search_status(
            conn,
            binary_id,
            self.shared.settings.flag_search,
            &self.shared.search.usable,
            self.shared.search.max_challengers,
        )?;
        let summary = [
            queue.clone(),
            history,
            stale_profile.clone(),
            search.summary(),
            Some(v.applicability.reason.clone()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        Ok(Some(OptimizerBinary {
            candidate: v.applicability.candidate,
            facts_only: v.facts_only,
            flag_search: search,
            job,
            mode: v.applicability.mode.label(),
            queue,
            reason: v.applicability.reason,
            score: v.applicability.score,
            stale_profile,
            summary,
        }))
    }
}

/// "queued" / "optimizing (attempt 2: no-split)" / None.
fn queue_state(status: &OptimizerStatus, binary_id: i64) -> Option<String> {
    if let Some(r) = status.running.iter().find(|r| r.binary_id == binary_id) {
        return Some(format!("optimizing (attempt {}: {})", r.attempt, r.step));
    }
    status.queued.iter().any(|q| q.binary_id == binary_id).then(|| "queued".to_string())
}

fn section_summary(
    shared: &Shared,
    status: &OptimizerStatus,
    store: Option<&crate::store::StoreUsage>,
) -> String {
    if let Some(why) = &shared.off {
        return format!("off: {why}");
    }
    let bolt = match (&status.bolt.version, &status.bolt.path) {
        (Some(v), Some(p)) => format!("BOLT {v} ({p})"),
        _ => "BOLT".to_string(),
    };
    let activity = match status.running.first() {
        Some(r) => format!("optimizing {} (attempt {}: {})", r.name, r.attempt, r.step),
        None if status.queued.is_empty() => "idle".to_string(),
        None => String::new(),
    };
    let queued = if status.queued.is_empty() {
        String::new()
    } else {
        format!("{} queued", status.queued.len())
    };
    let last_failure = status.last_failures().next().map(|f| match &f.end {
        JobEnd::Failed { kind, .. } => format!("; last failure: {} ({kind})", f.name),
        _ => String::new(),
    });
    let store = store.map_or("store size unknown".to_string(), |u| {
        format!("store {} file(s), {}", u.files, human_size(u.bytes))
    });
    let doing = [activity, queued].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>();
    format!(
        "{bolt}; {}; {} built, {} failed, {} skipped{}; {store}",
        doing.join(", "),
        status.built,
        status.failed,
        status.skipped,
        last_failure.unwrap_or_default()
    )
}

/// The pipeline stage of a binary, for the policy.
pub struct OptimizerPipeline {
    pub shared: Arc<Shared>,
}

impl PipelineView for OptimizerPipeline {
    fn pipeline(&self, conn: &Connection, binary_id: i64) -> Pipeline {
        self.stage(conn, binary_id).unwrap_or_else(|e| {
            tracing::debug!(binary_id, error = %format!("{e:#}"), "pipeline stage unknown");
            Pipeline::Seen
        })
    }
}

impl OptimizerPipeline {
    fn stage(&self, conn: &Connection, binary_id: i64) -> anyhow::Result<Pipeline> {
        let status = self.shared.queue_status();
        if status.running.iter().any(|r| r.binary_id == binary_id) {
            return Ok(Pipeline::Optimizing);
        }
        if status.queued.iter().any(|q| q.binary_id == binary_id) {
            return Ok(Pipeline::Queued);
        }
        let Some(binary) = base::binary_by_id(conn, binary_id)? else { return Ok(Pipeline::Seen) };
        if let Some(why) = &self.shared.off {
            return Ok(Pipeline::NotCandidate(format!("the optimizer is off: {why}")));
        }
        let summary = profile_summary(conn, binary_id, &self.shared.thresholds)?;
        let numbers = (summary.own_samples > 0).then(|| ProfileNumbers {
            samples: summary.own_samples,
            own_text_share: summary.own_share.unwrap_or(0.0),
            front_end: None,
        });
        let a = match &numbers {
            Some(n) => assess(&binary.facts, n, &self.shared.applicability),
            None => verdict(&binary.facts, None, &self.shared.applicability).applicability,
        };
        if !a.candidate {
            return Ok(Pipeline::NotCandidate(a.reason));
        }
        if let Some(job) = bolt_jobs::job_of(conn, binary_id)?
            && job.failed_until_change
        {
            let tail = job.failure_tail.as_deref().map(last_lines).unwrap_or_default();
            return Ok(Pipeline::BoltFailed(format!("{}: {tail}", job.last_outcome)));
        }
        if !summary.maturity.mature {
            return Ok(Pipeline::Collecting);
        }
        // Mature: due for a build (the driver queues it at its next tick) unless the retry
        // policy holds it back (a variant is being measured, or was decided on and the
        // profile has not grown since); then the policy's stage says why.
        let bolt_version = self.shared.bolt.tool().map(|t| t.version.to_string());
        let history = build_history(conn, binary_id)?;
        let due = decide(
            history.as_ref(),
            summary.own_samples,
            bolt_version.as_deref().unwrap_or_default(),
            RequestOrigin::Matured,
            DEFAULT_GROWTH,
        );
        Ok(if due == Decision::Build { Pipeline::Queued } else { Pipeline::Seen })
    }
}

/// The last few non-empty lines of BOLT's output, on one line.
fn last_lines(tail: &str) -> String {
    let lines: Vec<&str> = tail.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_tails_are_shortened_to_their_last_lines() {
        assert_eq!(last_lines("a\n\nb\nc\nBOLT-ERROR: x\n"), "b | c | BOLT-ERROR: x");
        assert_eq!(last_lines(""), "");
    }
}

//! Reading the policy's inputs from the catalog and writing its outputs back: the only
//! place where the pure policy meets SQLite.

use std::collections::HashMap;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::{
    BinaryInput, Controls, Evaluation, Pipeline, PolicyConfig, RunInput, Stage, VariantInput,
    VariantState, cpu_saved_ns, decide, evaluate,
};
use crate::catalog::{base, flag_trials, runs};

/// Runs of a binary the policy looks at (the newest; the last look needs 2 x 320).
pub const RUNS_PER_BINARY: u32 = 4000;

/// Tells the policy where the optimizing pipeline is for a binary (the profile and BOLT
/// subsystems own that state; the integrator implements this over their tables).
pub trait PipelineView: Send + Sync {
    fn pipeline(&self, conn: &Connection, binary_id: i64) -> Pipeline;
    /// Whether something outside the catalog forbids serving a variant with these bytes
    /// (the fleet: quarantined on another machine), given its state here.
    fn veto(&self, _variant_sha256: &str, _state: VariantState) -> Option<Veto> {
        None
    }
}

/// See [`PipelineView::veto`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Veto {
    /// Never serve it: the policy treats it as quarantined.
    Never(String),
    /// Not yet (the fleet's verdicts are not known yet): the policy leaves it aside.
    NotYet,
}

/// A pipeline view that knows nothing: every binary without variants is "seen".
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPipeline;

impl PipelineView for NoPipeline {
    fn pipeline(&self, _conn: &Connection, _binary_id: i64) -> Pipeline {
        Pipeline::Seen
    }
}

/// Loads the policy's view of one binary.
pub fn load_binary(
    conn: &Connection,
    binary_id: i64,
    pipeline: &dyn PipelineView,
) -> anyhow::Result<BinaryInput> {
    load(conn, binary_id, pipeline, RunsWanted::Always)
}

/// Loads what a decision about one binary needs: as [`load_binary`], except that the runs
/// are left out when the binary has no variant the policy judges. They are evidence about
/// variants only, and reading the newest [`RUNS_PER_BINARY`] of them for every batch of
/// runs stored was the daemon's largest cost per exec of a binary without variants.
pub fn load_for_decision(
    conn: &Connection,
    binary_id: i64,
    pipeline: &dyn PipelineView,
) -> anyhow::Result<BinaryInput> {
    load(conn, binary_id, pipeline, RunsWanted::WithVariants)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunsWanted {
    Always,
    WithVariants,
}

fn load(
    conn: &Connection,
    binary_id: i64,
    pipeline: &dyn PipelineView,
    runs_wanted: RunsWanted,
) -> anyhow::Result<BinaryInput> {
    let decisions = runs::decisions_of(conn, binary_id)?;
    let period_start = |variant: i64, actions: &[&str]| {
        decisions
            .iter()
            .rev()
            .find(|d| d.variant_id == Some(variant) && actions.contains(&d.action.as_str()))
            .and_then(|d| d.first_run_id)
    };
    let rows = base::variants_of(conn, binary_id)?;
    let challengers = flag_trials::challenger_variants(conn, binary_id)?;
    let mismatches = runs::output_mismatches_of(conn, binary_id)?;
    // Instrumented variants only collect a profile: never canaries, never served as
    // optimized, and their (slower) runs are no one's evidence.
    let not_policed: std::collections::HashSet<i64> =
        rows.iter().filter(|v| !v.kind.is_policed()).map(|v| v.id).collect();
    let variants: Vec<VariantInput> = rows
        .into_iter()
        .filter(|v| v.kind.is_policed())
        .filter_map(|v| {
            let state = match pipeline.veto(&v.sha256, v.state) {
                Some(Veto::Never(_)) => VariantState::Quarantined,
                Some(Veto::NotYet) => return None,
                None => v.state,
            };
            Some(VariantInput {
                id: v.id,
                state,
                canary_from_run: period_start(v.id, &["start_canary", "recanary"]),
                served_from_run: period_start(v.id, &["promote"]),
                note: v.note,
                challenger: challengers.contains(&v.id),
                output_mismatch: mismatches.get(&v.id).cloned(),
            })
        })
        .collect();
    let skip_runs = runs_wanted == RunsWanted::WithVariants && variants.is_empty();
    let stored = if skip_runs {
        Vec::new()
    } else {
        runs::runs_of_binary(conn, binary_id, RUNS_PER_BINARY)?
    };
    let (counted, exit_only): (Vec<_>, Vec<_>) = stored
        .into_iter()
        .filter(|r| r.variant_id.is_none_or(|v| !not_policed.contains(&v)))
        .partition(|r| r.counted);
    let input = |r: runs::RunRow| RunInput {
        id: r.id,
        variant_id: r.variant_id,
        cmd_hash: r.cmd_hash,
        cpu_ns: r.task_clock_ns,
        exit: r.exit,
    };
    Ok(BinaryInput {
        binary_id,
        variants,
        runs: counted.into_iter().map(input).collect(),
        exit_only_runs: exit_only.into_iter().map(input).collect(),
        pipeline: pipeline.pipeline(conn, binary_id),
        next_run_id: runs::next_run_id(conn)?,
    })
}

/// The user's controls for a path (pins and exclusions live in the base `controls` table).
pub fn controls_of(conn: &Connection, path: &str) -> anyhow::Result<Controls> {
    let rows = base::controls(conn)?;
    Ok(rows
        .into_iter()
        .find(|c| c.path == path)
        .map(|c| Controls { pin: c.pin, excluded: c.excluded })
        .unwrap_or_default())
}

/// Whether [`apply`] wrote an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Written,
    /// A variant's state changed after the input was loaded: nothing was written, and the
    /// binary must be evaluated again from the catalog as it is now.
    Stale,
}

/// Writes an evaluation's transitions and incidents (state changes, decision log, incident
/// records, events) in one transaction; each transition only from the state the evaluation
/// saw (see [`base::transition_variant_state`]), or nothing at all.
pub fn apply(
    conn: &mut Connection,
    input: &BinaryInput,
    eval: &Evaluation,
    now_ms: i64,
) -> anyhow::Result<Applied> {
    if eval.transitions.is_empty() && eval.incidents.is_empty() {
        return Ok(Applied::Written);
    }
    let tx = conn.transaction()?;
    let path = runs::paths_of_binary(&tx, input.binary_id)?.into_iter().next();
    let profile_samples = crate::catalog::profiles::own_samples(&tx, input.binary_id)? as i64;
    for inc in &eval.incidents {
        runs::insert_incident(
            &tx,
            now_ms,
            input.binary_id,
            inc.variant_id,
            inc.run_id,
            &inc.cmd_hash,
            inc.kind.as_str(),
            inc.exit,
            &inc.detail,
        )?;
    }
    for t in &eval.transitions {
        if !base::transition_variant_state(&tx, t.variant_id, t.from, t.to, Some(&t.detail))? {
            tracing::debug!(
                variant = t.variant_id,
                from = t.from.as_str(),
                "the variant's state changed during the evaluation; evaluating again"
            );
            return Ok(Applied::Stale); // dropping `tx` rolls back what was written
        }
        runs::record_decision(
            &tx,
            &runs::DecisionRow {
                at_ms: now_ms,
                binary_id: input.binary_id,
                variant_id: Some(t.variant_id),
                action: t.action.as_str().into(),
                from_state: Some(t.from),
                to_state: Some(t.to),
                first_run_id: t.first_run_id,
                detail: t.detail.clone(),
                profile_samples: Some(profile_samples),
            },
        )?;
        flag_trials::set_outcome_of_variant(
            &tx,
            t.variant_id,
            t.to.as_str(),
            &t.detail,
            now_ms / 1000,
        )?;
        base::record_event(
            &tx,
            now_ms / 1000,
            path.as_deref(),
            &format!("policy.{}", t.action.as_str()),
            &format!("variant {}: {}", t.variant_id, t.detail),
        )?;
    }
    tx.commit()?;
    Ok(Applied::Written)
}

/// What status shows for one binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryStatus {
    pub binary_id: i64,
    pub path: String,
    pub stage: Stage,
    /// `stage` rendered as text
    /// ("serving original: slower by 2.1% (interval 1.3%..2.9% slower)").
    pub stage_text: String,
    /// Runs per variant (`None`: the original).
    pub runs: Vec<(Option<i64>, usize)>,
    pub gain: Option<super::Comparison>,
    pub last_incident: Option<String>,
}

/// Status of every path of a binary, from the catalog (no writes).
pub fn binary_status(
    conn: &Connection,
    binary_id: i64,
    cfg: &PolicyConfig,
    pipeline: &dyn PipelineView,
) -> anyhow::Result<Vec<BinaryStatus>> {
    let input = load_binary(conn, binary_id, pipeline)?;
    let eval = evaluate(&input, cfg);
    let mut per_variant: HashMap<Option<i64>, usize> = HashMap::new();
    for r in &input.runs {
        *per_variant.entry(r.variant_id).or_default() += 1;
    }
    let mut runs: Vec<_> = per_variant.into_iter().collect();
    runs.sort();
    let gain = match &eval.stage {
        Stage::ServingOptimized { gain, .. } => *gain,
        Stage::Canary { last, .. } | Stage::Challenge { last, .. } => *last,
        _ => None,
    };
    let last_incident = runs::incidents_of(conn, binary_id)?.into_iter().next().map(|i| i.detail);
    let mut out = Vec::new();
    for path in runs::paths_of_binary(conn, binary_id)? {
        let (stage, _) = decide(&eval, &controls_of(conn, &path)?);
        out.push(BinaryStatus {
            binary_id,
            stage_text: stage.to_string(),
            stage,
            path,
            runs: runs.clone(),
            gain,
            last_incident: last_incident.clone(),
        });
    }
    Ok(out)
}

/// The machine summary line's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MachineSummary {
    /// Binaries with a variant served.
    pub binaries_optimized: usize,
    /// Estimated CPU time saved so far, from the measured gains and the runs served.
    pub cpu_saved_ns: u64,
}

/// Computes the summary over all watched binaries.
pub fn machine_summary(
    conn: &Connection,
    cfg: &PolicyConfig,
    pipeline: &dyn PipelineView,
) -> anyhow::Result<MachineSummary> {
    let mut s = MachineSummary::default();
    for binary_id in runs::binaries_to_watch(conn)? {
        let input = load_binary(conn, binary_id, pipeline)?;
        let eval = evaluate(&input, cfg);
        if let Stage::Challenge { .. } = eval.stage {
            // Served all along; its gain is measured again once the challenge is decided.
            s.binaries_optimized += 1;
        }
        if let Stage::ServingOptimized { variant_id, gain } = eval.stage {
            s.binaries_optimized += 1;
            let from = input
                .variants
                .iter()
                .find(|v| v.id == variant_id)
                .and_then(|v| v.served_from_run)
                .unwrap_or(0);
            if let Some(g) = gain {
                s.cpu_saved_ns +=
                    cpu_saved_ns(runs::variant_cpu_since(conn, variant_id, from)?, g.ratio);
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::base::VariantKind;
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    #[test]
    fn instrumented_variants_and_their_runs_are_invisible_to_the_policy() {
        let catalog = Catalog::in_memory().unwrap();
        catalog
            .run_blocking(|c| {
                let id =
                    base::upsert_binary(c, &ContentId::of_bytes(b"b"), 1, &ElfFacts::default(), 0)?;
                let variant = |kind: VariantKind, sha: &[u8]| base::NewVariant {
                    binary_id: id,
                    kind,
                    sha256: ContentId::of_bytes(sha).hex(),
                    store_path: "/store/x".into(),
                    size: 1,
                    ..Default::default()
                };
                let bolt = base::insert_variant(c, &variant(VariantKind::Bolt, b"1"), 1)?;
                let instr = base::insert_variant(c, &variant(VariantKind::Instrumented, b"2"), 1)?;
                let placed = base::insert_variant(c, &variant(VariantKind::Placed, b"3"), 1)?;
                for v in [None, Some(bolt), Some(instr), Some(instr)] {
                    c.execute(
                        "INSERT INTO runs (binary_id, path, variant_id, cmd_hash, task_clock_ns,
                                           wall_ns, exit_code, at_ms)
                         VALUES (?1, '/bin/b', ?2, 'h', 1000, 2000, 0, 5)",
                        rusqlite::params![id, v],
                    )?;
                }
                let input = load_binary(c, id, &NoPipeline)?;
                let ids: Vec<i64> = input.variants.iter().map(|v| v.id).collect();
                assert_eq!(ids, vec![bolt, placed]);
                let runs: Vec<Option<i64>> = input.runs.iter().map(|r| r.variant_id).collect();
                assert_eq!(runs, vec![None, Some(bolt)]);
                let eval = evaluate(&input, &PolicyConfig::default());
                assert!(
                    eval.transitions.iter().all(|t| t.variant_id != instr),
                    "{:?}",
                    eval.transitions
                );
                Ok(())
            })
            .unwrap();
    }
}

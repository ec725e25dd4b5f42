//! Steady state: a served variant's drift blocks and shown gain, and the stage of a
//! binary with nothing in play.

use super::*;

/// Pairs the served variant's measured gain is computed from (the newest; the estimate's
/// cost is quadratic in them).
pub(super) const GAIN_PAIRS: usize = 200;

pub(super) fn served_step(
    input: &BinaryInput,
    v: &VariantInput,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> (Stage, ServeDecision) {
    let serve =
        ServeDecision::Split { variant_id: v.id, variant_share: 1.0 - cfg.exploration_share };
    // The measured gain: the newest time-adjacent pairs since the canary started (the
    // canary's pairs, then each exploration run of the original with its neighbour).
    let since = v.canary_from_run.or(v.served_from_run).unwrap_or(0);
    let pairs =
        pair_in_exec_order(input.runs.iter().filter(|r| r.id >= since), v.id, PairBy::Command);
    let gain = paired_compare(newest(&pairs), normal_quantile(0.975));
    // Drift: the latest full block of 2m pairs of the served period, tested like a look.
    let served_from = v.served_from_run.unwrap_or(since);
    let served_pairs = pair_in_exec_order(
        input.runs.iter().filter(|r| r.id >= served_from),
        v.id,
        PairBy::Command,
    );
    let block = 2 * cfg.min_runs_per_arm.max(1);
    let blocks = served_pairs.len() / block;
    if blocks > 0
        && let Some(k) =
            paired_compare(&served_pairs[(blocks - 1) * block..blocks * block], cfg.z_per_look())
        && k.low > 1.0
    {
        states.insert(v.id, VariantState::Canary);
        transitions.push(Transition {
            variant_id: v.id,
            from: VariantState::Served,
            to: VariantState::Canary,
            action: Action::Recanary,
            detail: format!("drift: now {}; measuring again", k.describe()),
            first_run_id: Some(input.next_run_id),
            comparison: Some(k),
        });
        return canary_stage(v.id, 0, 0, None, cfg);
    }
    (Stage::ServingOptimized { variant_id: v.id, gain }, serve)
}

/// The newest [`GAIN_PAIRS`] pairs.
pub(super) fn newest<'a, 'b>(t: &'b [(Timed<'a>, Timed<'a>)]) -> &'b [(Timed<'a>, Timed<'a>)] {
    &t[t.len().saturating_sub(GAIN_PAIRS)..]
}

/// The stage of a binary with no active variant.
pub(super) fn resting_stage(
    input: &BinaryInput,
    states: &HashMap<i64, VariantState>,
    transitions: &[Transition],
) -> Stage {
    if matches!(input.pipeline, Pipeline::Queued | Pipeline::Optimizing) {
        return pipeline_stage(&input.pipeline);
    }
    let last_outcome = input
        .variants
        .iter()
        .rev()
        .find(|v| matches!(states[&v.id], VariantState::Quarantined | VariantState::Rejected));
    if let Some(v) = last_outcome {
        let detail = transitions
            .iter()
            .rev()
            .find(|t| t.variant_id == v.id)
            .map(|t| t.detail.clone())
            .or_else(|| v.note.clone())
            .unwrap_or_default();
        return match states[&v.id] {
            VariantState::Quarantined => Stage::Crashed { variant_id: v.id, detail },
            _ => Stage::ServingOriginal { reason: detail },
        };
    }
    pipeline_stage(&input.pipeline)
}

pub(super) fn pipeline_stage(p: &Pipeline) -> Stage {
    match p {
        Pipeline::Seen => Stage::Seen,
        Pipeline::Collecting => Stage::Collecting,
        Pipeline::Queued => Stage::Queued,
        Pipeline::Optimizing => Stage::Optimizing,
        Pipeline::BoltFailed(w) => Stage::BoltFailed(w.clone()),
        Pipeline::NotCandidate(w) => Stage::NotCandidate(w.clone()),
    }
}

//! A challenger: a newer variant canaried against the served one (not the original), at
//! the same looks and level.

use super::*;

/// The share of execs a challenger gets: the canary share of what exploration leaves.
pub fn challenger_share(cfg: &PolicyConfig) -> f64 {
    cfg.canary_fraction * (1.0 - cfg.exploration_share)
}

pub(super) fn challenge_stage(
    served_id: i64,
    challenger_id: i64,
    challenger_runs: usize,
    served_runs: usize,
    last: Option<Comparison>,
    cfg: &PolicyConfig,
) -> (Stage, ServeDecision) {
    (
        Stage::Challenge { served_id, challenger_id, challenger_runs, served_runs, last },
        ServeDecision::Challenge {
            served: served_id,
            challenger: challenger_id,
            challenger_share: challenger_share(cfg),
            original_share: cfg.exploration_share,
        },
    )
}

/// A challenger's canary: its runs paired with the served variant's, decided at the same
/// looks and level as any canary. Promoted (clearly faster than the served variant, by at
/// least `promote_min_gain`): it is served and the old one retired. Rejected (slower, or
/// not faster beyond the noise at the last look): the served variant goes on (None).
pub(super) fn challenger_step(
    input: &BinaryInput,
    v: &VariantInput,
    served: i64,
    from_run: i64,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> Option<(Stage, ServeDecision)> {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let arm_runs = |id: i64| timed(window().filter(|r| r.variant_id == Some(id))).len();
    let (verdict, last) = look_verdict(input, v, Some(served), from_run, cfg);
    let Some(verdict) = verdict else {
        return Some(challenge_stage(served, v.id, arm_runs(v.id), arm_runs(served), last, cfg));
    };
    let (to, action, detail, k) = match verdict {
        Verdict::Promote(k) => (
            VariantState::Served,
            Action::Promote,
            format!("promoted over variant {served}: {}", k.describe()),
            k,
        ),
        Verdict::Reject(k, reason) => (
            VariantState::Rejected,
            Action::Reject,
            format!("against variant {served}: {reason}"),
            k,
        ),
    };
    states.insert(v.id, to);
    transitions.push(Transition::canary_decided(input, v.id, to, action, detail, k));
    if to != VariantState::Served {
        return None;
    }
    states.insert(served, VariantState::Retired);
    transitions.push(Transition {
        variant_id: served,
        from: VariantState::Served,
        to: VariantState::Retired,
        action: Action::Retire,
        detail: format!("replaced by challenger {}", v.id),
        first_run_id: None,
        comparison: None,
    });
    // The new variant's gain against the original is measured from here on (exploration).
    Some((
        Stage::ServingOptimized { variant_id: v.id, gain: None },
        ServeDecision::Split { variant_id: v.id, variant_share: 1.0 - cfg.exploration_share },
    ))
}

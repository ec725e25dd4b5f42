//! A canary against the original: its looks, the budget look across commands, and what
//! promotes it (faster beyond the noise, by enough, and saving more per run than serving
//! through the mount costs) or rejects it.

use super::*;

/// The variant runs after which a canary that has not reached its last look by command
/// gets one final look across commands: twice the last look's pairs.
pub fn canary_run_budget(cfg: &PolicyConfig) -> usize {
    2 * cfg.checkpoints().last().copied().unwrap_or(1)
}

pub(super) fn canary_step(
    input: &BinaryInput,
    v: &VariantInput,
    from_run: i64,
    cfg: &PolicyConfig,
    states: &mut HashMap<i64, VariantState>,
    transitions: &mut Vec<Transition>,
) -> (Stage, ServeDecision) {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let var_runs = timed(window().filter(|r| r.variant_id == Some(v.id))).len();
    let orig_runs = timed(window().filter(|r| r.variant_id.is_none())).len();
    let (verdict, last) = look_verdict(input, v, None, from_run, cfg);
    let Some(verdict) = verdict else {
        return canary_stage(v.id, var_runs, orig_runs, last, cfg);
    };

    let mut decide_to = |to: VariantState, action: Action, detail: String, k: Comparison| {
        states.insert(v.id, to);
        transitions.push(Transition::canary_decided(input, v.id, to, action, detail, k));
    };
    match verdict {
        Verdict::Promote(k) => {
            decide_to(
                VariantState::Served,
                Action::Promote,
                format!("promoted: {}", k.describe()),
                k,
            );
            let served_before: Vec<i64> = input
                .variants
                .iter()
                .filter(|o| o.id != v.id && states[&o.id] == VariantState::Served)
                .map(|o| o.id)
                .collect();
            for old in served_before {
                states.insert(old, VariantState::Retired);
                transitions.push(Transition {
                    variant_id: old,
                    from: VariantState::Served,
                    to: VariantState::Retired,
                    action: Action::Retire,
                    detail: format!("replaced by variant {}", v.id),
                    first_run_id: None,
                    comparison: None,
                });
            }
            (
                Stage::ServingOptimized { variant_id: v.id, gain: Some(k) },
                ServeDecision::Split {
                    variant_id: v.id,
                    variant_share: 1.0 - cfg.exploration_share,
                },
            )
        }
        Verdict::Reject(k, reason) => {
            decide_to(VariantState::Rejected, Action::Reject, reason.clone(), k);
            (Stage::ServingOriginal { reason }, ServeDecision::Original)
        }
    }
}

/// The canary's verdict at its latest look (None: undecided), with the comparison of that
/// look: the variant's runs since `from_run` paired with `baseline`'s (None: the
/// original's) at the looks of [`PolicyConfig::checkpoints`], then the budget look.
pub(super) fn look_verdict(
    input: &BinaryInput,
    v: &VariantInput,
    baseline: Option<i64>,
    from_run: i64,
    cfg: &PolicyConfig,
) -> (Option<Verdict>, Option<Comparison>) {
    let window = || input.runs.iter().filter(|r| r.id >= from_run);
    let pairs = pair_arms(window(), v.id, baseline, PairBy::Command);
    let checkpoints = cfg.checkpoints();
    let look = checkpoints.iter().rposition(|&c| c <= pairs.len());
    let by_command = look.map(|look| {
        let c = checkpoints[look];
        (c, look + 1 == checkpoints.len(), paired_compare(&pairs[..c], cfg.z_per_look()))
    });
    let verdict = match by_command {
        Some((c, _, Some(k))) if promotes(&k, cfg) => {
            Some(promote_if_worth_serving(k, &pairs[..c], baseline, cfg))
        }
        Some((_, _, Some(k))) if k.low > 1.0 => Some(Verdict::Reject(k, k.describe())),
        Some((c, true, Some(k))) => Some(Verdict::Reject(
            k,
            format!("not faster beyond noise after {c} runs per arm: {}", k.describe()),
        )),
        _ => None,
    };
    let verdict = verdict.or_else(|| budget_look(input, v, baseline, from_run, pairs.len(), cfg));
    (verdict, by_command.and_then(|(_, _, k)| k))
}

/// What a look decided.
pub(super) enum Verdict {
    Promote(Comparison),
    /// With the reason status shows.
    Reject(Comparison, String),
}

/// The fewest pairs a promotion is made on, whatever `min_runs_per_arm` says. Two
/// byte-identical files can differ by 1-2% for as long as their pages stay cached (see
/// docs/policy.md); over a few pairs such an offset plus noise easily shows as a 2% gain
/// (real equal-speed canaries were promoted at 10 pairs, none of 40 with looks from 20).
pub const MIN_PAIRS_TO_PROMOTE: usize = 20;

/// Faster beyond the noise, by at least `promote_min_gain`, on enough pairs.
pub(super) fn promotes(k: &Comparison, cfg: &PolicyConfig) -> bool {
    k.high < 1.0 && k.ratio <= 1.0 - cfg.promote_min_gain && k.variant_runs >= MIN_PAIRS_TO_PROMOTE
}

/// A variant faster than the original beyond the noise is still not worth serving when it
/// saves less CPU time per run than serving through the mount adds to each exec
/// (`serving_cost_us`): the binary is then faster run natively, so it is rejected with both
/// figures. Against a served variant (`baseline` is Some) both arms pay that cost and only
/// the ratio counts.
pub(super) fn promote_if_worth_serving(
    k: Comparison,
    pairs: &[(Timed<'_>, Timed<'_>)],
    baseline: Option<i64>,
    cfg: &PolicyConfig,
) -> Verdict {
    if baseline.is_some() {
        return Verdict::Promote(k);
    }
    let saved_ns = saving_per_run_ns(&k, pairs);
    if saved_ns >= cfg.serving_cost_us as f64 * 1e3 {
        return Verdict::Promote(k);
    }
    let reason = format!(
        "{}, but that saves {:.0} us per run, less than serving through the mount adds to an \
         exec ({} us): faster run natively",
        k.describe(),
        saved_ns / 1e3,
        cfg.serving_cost_us
    );
    Verdict::Reject(k, reason)
}

/// The CPU time a variant saves per run: the original arm's median over `pairs` (variant,
/// original) times the estimated gain.
pub(super) fn saving_per_run_ns(k: &Comparison, pairs: &[(Timed<'_>, Timed<'_>)]) -> f64 {
    let mut original: Vec<f64> = pairs.iter().map(|(_, o)| o.cpu_ns as f64).collect();
    stats::median(&mut original).unwrap_or(0.0) * (1.0 - k.ratio)
}

/// The final look of a canary whose commands rarely repeat: once the variant has had
/// [`canary_run_budget`] runs and the looks by command have not decided, the runs up to
/// that budget are paired adjacent in exec order whatever their commands, and compared at
/// the same level as a look. Valid because the arms are assigned at random per exec, so a
/// pair's two commands are exchangeable; noisier, because different commands cost
/// differently. Promoted if faster beyond the noise, else rejected: a variant not shown
/// faster is not served.
pub(super) fn budget_look(
    input: &BinaryInput,
    v: &VariantInput,
    baseline: Option<i64>,
    from_run: i64,
    pairs_by_command: usize,
    cfg: &PolicyConfig,
) -> Option<Verdict> {
    let budget = canary_run_budget(cfg);
    // The id of the variant's budget-th timed run: the look uses exactly the runs up to it,
    // so evaluating it again later gives the same answer.
    let end = input
        .runs
        .iter()
        .filter(|r| r.id >= from_run && r.variant_id == Some(v.id))
        .filter(|r| matches!(r.exit, RunExit::Exited(_)))
        .nth(budget - 1)?
        .id;
    let upto = || input.runs.iter().filter(|r| r.id >= from_run && r.id <= end);
    let pairs = pair_arms(upto(), v.id, baseline, PairBy::Nothing);
    let k = paired_compare(&pairs, cfg.z_per_look())?;
    if promotes(&k, cfg) {
        return Some(promote_if_worth_serving(k, &pairs, baseline, cfg));
    }
    let reason = format!(
        "commands rarely repeat ({pairs_by_command} runs paired by command in {budget} \
         variant runs); across commands: {}",
        k.describe()
    );
    Some(Verdict::Reject(k, reason))
}

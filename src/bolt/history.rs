//! What the catalog remembers of a binary's earlier builds and of the policy's decisions on
//! their variants, read into the retry policy's [`BuildHistory`]: one reading for the
//! daemon's maturity driver and for the queue when a job starts.

use rusqlite::Connection;

use super::retry_policy::BuildHistory;
use crate::catalog::base::{VariantKind, VariantState};
use crate::catalog::{base, bolt_jobs, runs};

/// The build history of `binary_id`; None when BOLT never ran on this content.
pub fn build_history(conn: &Connection, binary_id: i64) -> anyhow::Result<Option<BuildHistory>> {
    let Some(job) = bolt_jobs::job_of(conn, binary_id)? else { return Ok(None) };
    let bolt: Vec<base::VariantRow> = base::variants_of(conn, binary_id)?
        .into_iter()
        .filter(|v| v.kind == VariantKind::Bolt)
        .collect();
    // Retired variants were replaced or forgotten; every other one was built from a profile
    // a rebuild has to improve on.
    let variant_samples = bolt
        .iter()
        .filter(|v| v.state != VariantState::Retired)
        .filter_map(|v| v.profile_samples)
        .max()
        .map(|s| s.max(0) as u64);
    let measuring =
        bolt.iter().rev().find(|v| matches!(v.state, VariantState::Ready | VariantState::Canary));
    let decided_samples = runs::decisions_of(conn, binary_id)?
        .iter()
        .rev()
        .filter(|d| d.variant_id.is_some_and(|id| bolt.iter().any(|v| v.id == id)))
        .filter(|d| matches!(d.action.as_str(), "promote" | "reject" | "quarantine"))
        .find_map(|d| d.profile_samples)
        .map(|s| s.max(0) as u64);
    Ok(Some(BuildHistory {
        failed_until_change: job.failed_until_change,
        last_attempt_samples: job.profile_samples,
        last_bolt_version: job.bolt_version,
        variant_samples,
        measuring: measuring.map(|v| v.id),
        decided_samples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::retry_policy::{Decision, RequestOrigin, decide};
    use crate::catalog::{Catalog, profiles};
    use crate::identity::ContentId;
    use crate::measure::RunExit;
    use crate::policy::{
        BinaryInput, PolicyConfig, RunInput, VariantInput, VariantState, evaluate, load,
    };

    fn grow_profile(c: &Connection, id: i64, start: i64, own: u64) -> anyhow::Result<()> {
        profiles::add_test_window(c, id, start, own, 0)
    }

    #[test]
    fn a_rebuild_waits_for_the_decision_and_for_growth_since_it() {
        let catalog = Catalog::in_memory().unwrap();
        catalog
            .run_blocking(|c| {
                let id =
                    base::upsert_binary(c, &ContentId::of_bytes(b"t"), 1, &Default::default(), 1)?;
                grow_profile(c, id, 0, 400)?;
                let attempt = bolt_jobs::AttemptRecord {
                    binary_id: id,
                    outcome: "ok".into(),
                    profile_samples: 400,
                    bolt_version: "22.1.8".into(),
                    ..Default::default()
                };
                bolt_jobs::record_attempt(c, &attempt, 1)?;
                let vid = base::insert_variant(
                    c,
                    &base::NewVariant {
                        binary_id: id,
                        kind: VariantKind::Bolt,
                        state: VariantState::Canary,
                        profile_samples: Some(400),
                        ..Default::default()
                    },
                    1,
                )?;
                let due = |c: &Connection| -> anyhow::Result<Decision> {
                    let samples = profiles::own_samples(c, id)?;
                    let h = build_history(c, id)?;
                    Ok(decide(h.as_ref(), samples, "22.1.8", RequestOrigin::Matured, 2.0))
                };
                // The canary runs while the original's runs grow the profile past 2x.
                grow_profile(c, id, 600, 600)?;
                assert!(matches!(due(c)?, Decision::Skip(w) if w.contains("being measured")));

                // The policy promotes it (its transitions written the daemon's way), at
                // 1,000 profile samples.
                let runs: Vec<RunInput> = (0..40)
                    .map(|i| RunInput {
                        id: i + 1,
                        variant_id: (i % 2 == 1).then_some(vid),
                        cmd_hash: "a".into(),
                        cpu_ns: if i % 2 == 1 { 80_000 } else { 100_000 } * (1_000 + i as u64 % 7),
                        exit: RunExit::Exited(0),
                    })
                    .collect();
                let input = BinaryInput {
                    binary_id: id,
                    variants: vec![VariantInput {
                        id: vid,
                        state: VariantState::Canary,
                        canary_from_run: Some(1),
                        served_from_run: None,
                        note: None,
                        challenger: false,
                        output_mismatch: None,
                    }],
                    runs,
                    next_run_id: 41,
                    ..Default::default()
                };
                let eval = evaluate(&input, &PolicyConfig::default());
                assert_eq!(eval.states[&vid], VariantState::Served);
                load::apply(c, &input, &eval, 5)?;
                let h = build_history(c, id)?.unwrap();
                assert_eq!(
                    (h.measuring, h.decided_samples, h.variant_samples),
                    (None, Some(1000), Some(400))
                );
                assert!(matches!(due(c)?, Decision::Skip(w) if w.contains("1000")));
                grow_profile(c, id, 1200, 1000)?;
                assert_eq!(due(c)?, Decision::Build);
                Ok(())
            })
            .unwrap();
    }
}

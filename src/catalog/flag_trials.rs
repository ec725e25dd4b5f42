//! The flag search's table (migration 9): per binary content and flag set, what came of
//! building and measuring a variant with that set (see `crate::bolt::flags` for the sets
//! and docs/policy.md for the search).
//!
//! One row per (binary, flag set). The optimizer writes a row when a build starts
//! (`building`) and when it ends (`built` with the variant, or `failed`); the policy's
//! writer (`crate::policy::load::apply`) updates the row of a variant it moves (`canary`,
//! `served`, `rejected`, `quarantined`, `retired`). `challenger` marks builds of the flag
//! search (measured against the served variant), as opposed to the first build.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = r#"
CREATE TABLE flag_trials (
    binary_id   INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    flag_set    TEXT NOT NULL,
    challenger  INTEGER NOT NULL DEFAULT 0,
    variant_id  INTEGER REFERENCES variants(id) ON DELETE SET NULL,
    outcome     TEXT NOT NULL,
    detail      TEXT,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (binary_id, flag_set)
);
CREATE INDEX flag_trials_by_variant ON flag_trials(variant_id);
"#;

/// One flag set's record for one binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagTrial {
    pub binary_id: i64,
    pub flag_set: String,
    /// Built by the flag search as a challenger of the served variant.
    pub challenger: bool,
    pub variant_id: Option<i64>,
    /// `building`, `built`, `failed`, `canary`, `served`, `rejected`, `quarantined`,
    /// `retired`.
    pub outcome: String,
    pub detail: Option<String>,
    pub updated_at: i64,
}

/// Records that a build with `flag_set` started (replacing an older record of that set).
pub fn start(
    conn: &Connection,
    binary_id: i64,
    flag_set: &str,
    challenger: bool,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO flag_trials (binary_id, flag_set, challenger, variant_id, outcome, detail,
                                  updated_at)
         VALUES (?1, ?2, ?3, NULL, 'building', NULL, ?4)
         ON CONFLICT(binary_id, flag_set) DO UPDATE SET
            challenger = excluded.challenger, variant_id = NULL, outcome = 'building',
            detail = NULL, updated_at = excluded.updated_at",
        params![binary_id, flag_set, challenger as i64, now],
    )?;
    Ok(())
}

/// Records how a build with `flag_set` ended: `variant_id` when it stored one.
pub fn finish(
    conn: &Connection,
    binary_id: i64,
    flag_set: &str,
    variant_id: Option<i64>,
    outcome: &str,
    detail: &str,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE flag_trials SET variant_id = ?3, outcome = ?4, detail = ?5, updated_at = ?6
         WHERE binary_id = ?1 AND flag_set = ?2",
        params![binary_id, flag_set, variant_id, outcome, detail, now],
    )?;
    Ok(())
}

/// Records the policy's decision on `variant_id` on its flag set's row (none for variants
/// not built by the optimizer).
pub fn set_outcome_of_variant(
    conn: &Connection,
    variant_id: i64,
    outcome: &str,
    detail: &str,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE flag_trials SET outcome = ?2, detail = ?3, updated_at = ?4 WHERE variant_id = ?1",
        params![variant_id, outcome, detail, now],
    )?;
    Ok(())
}

/// Every flag set's record for a binary, oldest first.
pub fn trials_of(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<FlagTrial>> {
    let mut stmt = conn.prepare(
        "SELECT binary_id, flag_set, challenger, variant_id, outcome, detail, updated_at
         FROM flag_trials WHERE binary_id = ?1 ORDER BY updated_at, rowid",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok(FlagTrial {
                binary_id: r.get(0)?,
                flag_set: r.get(1)?,
                challenger: r.get::<_, i64>(2)? != 0,
                variant_id: r.get(3)?,
                outcome: r.get(4)?,
                detail: r.get(5)?,
                updated_at: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The variants of a binary that are challengers (measured against its served variant).
pub fn challenger_variants(
    conn: &Connection,
    binary_id: i64,
) -> anyhow::Result<std::collections::HashSet<i64>> {
    let mut stmt = conn.prepare(
        "SELECT variant_id FROM flag_trials
         WHERE binary_id = ?1 AND challenger = 1 AND variant_id IS NOT NULL",
    )?;
    let ids = stmt.query_map([binary_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(ids)
}

/// Forgets a binary's flag search (`reset NAME`).
pub fn forget(conn: &Connection, binary_id: i64) -> anyhow::Result<()> {
    conn.execute("DELETE FROM flag_trials WHERE binary_id = ?1", [binary_id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, base};
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    #[test]
    fn a_trial_goes_from_building_to_the_policys_outcome() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let id =
                base::upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 1)?;
            let v = base::insert_variant(
                c,
                &base::NewVariant {
                    binary_id: id,
                    kind: crate::catalog::variant::VariantKind::Bolt,
                    state: crate::catalog::variant::VariantState::Ready,
                    ..Default::default()
                },
                2,
            )?;
            start(c, id, "default", false, 1)?;
            finish(c, id, "default", None, "failed", "exit 1", 2)?;
            start(c, id, "no-split", true, 3)?;
            finish(c, id, "no-split", Some(v), "built", "variant built", 4)?;
            assert_eq!(challenger_variants(c, id)?.into_iter().collect::<Vec<_>>(), vec![v]);
            set_outcome_of_variant(c, v, "rejected", "not faster", 5)?;
            let t = trials_of(c, id)?;
            assert_eq!(t.len(), 2);
            assert_eq!((t[0].flag_set.as_str(), t[0].outcome.as_str()), ("default", "failed"));
            assert_eq!(
                (t[1].flag_set.as_str(), t[1].outcome.as_str(), t[1].challenger),
                ("no-split", "rejected", true)
            );
            forget(c, id)?;
            assert!(trials_of(c, id)?.is_empty());
            Ok(())
        })
        .unwrap();
    }
}

//! The optimizer's table (migration 3): per binary content, what BOLT runs came to.
//!
//! One row per `binaries` row (one content): attempts so far, the last outcome and the tail
//! of BOLT's output, the ladder step reached, the profile size and BOLT version of the
//! last attempt, and whether the binary is failed until its content, profile or BOLT
//! version changes. Variants themselves go to the base `variants` table.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::identity::ContentId;

pub const SCHEMA: &str = r#"
CREATE TABLE bolt_jobs (
    binary_id           INTEGER PRIMARY KEY REFERENCES binaries(id) ON DELETE CASCADE,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_outcome        TEXT NOT NULL,
    failure_tail        TEXT,
    ladder_step         TEXT,
    flags               TEXT,
    profile_samples     INTEGER NOT NULL DEFAULT 0,
    bolt_version        TEXT NOT NULL,
    failed_until_change INTEGER NOT NULL DEFAULT 0,
    wall_ms             INTEGER,
    peak_rss_kib        INTEGER,
    variant_id          INTEGER REFERENCES variants(id) ON DELETE SET NULL,
    updated_at          INTEGER NOT NULL
);
"#;

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttemptRecord {
    pub binary_id: i64,
    /// "ok", or the failure's label ("exit 1", "signal 11", "timeout", ...).
    pub outcome: String,
    pub tail: Option<String>,
    pub ladder_step: String,
    pub flags: String,
    pub profile_samples: u64,
    pub bolt_version: String,
    pub wall_ms: u64,
    pub peak_rss_kib: u64,
}

/// The row of one binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoltJobRow {
    pub binary_id: i64,
    pub attempts: i64,
    pub last_outcome: String,
    pub failure_tail: Option<String>,
    pub ladder_step: Option<String>,
    pub flags: Option<String>,
    pub profile_samples: u64,
    pub bolt_version: String,
    pub failed_until_change: bool,
    pub wall_ms: Option<i64>,
    pub peak_rss_kib: Option<i64>,
    pub variant_id: Option<i64>,
    pub updated_at: i64,
}

/// Counts one attempt and remembers its outcome. A success clears the failed flag and the
/// tail.
pub fn record_attempt(conn: &Connection, a: &AttemptRecord, now: i64) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO bolt_jobs (binary_id, attempts, last_outcome, failure_tail, ladder_step,
                                flags, profile_samples, bolt_version, failed_until_change,
                                wall_ms, peak_rss_kib, updated_at)
         VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10)
         ON CONFLICT(binary_id) DO UPDATE SET
            attempts = attempts + 1, last_outcome = excluded.last_outcome,
            failure_tail = excluded.failure_tail, ladder_step = excluded.ladder_step,
            flags = excluded.flags, profile_samples = excluded.profile_samples,
            bolt_version = excluded.bolt_version,
            failed_until_change = CASE WHEN excluded.last_outcome = 'ok' THEN 0
                                       ELSE failed_until_change END,
            wall_ms = excluded.wall_ms, peak_rss_kib = excluded.peak_rss_kib,
            updated_at = excluded.updated_at",
        params![
            a.binary_id,
            a.outcome,
            a.tail,
            a.ladder_step,
            a.flags,
            a.profile_samples as i64,
            a.bolt_version,
            a.wall_ms as i64,
            a.peak_rss_kib as i64,
            now
        ],
    )?;
    Ok(())
}

/// Marks the binary failed until its content, profile or BOLT version changes (the ladder
/// gave up), or clears that mark.
pub fn set_failed_until_change(
    conn: &Connection,
    binary_id: i64,
    failed: bool,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE bolt_jobs SET failed_until_change = ?2, updated_at = ?3 WHERE binary_id = ?1",
        params![binary_id, failed as i64, now],
    )?;
    Ok(())
}

/// Links the variant a successful job produced.
pub fn set_variant(conn: &Connection, binary_id: i64, variant_id: i64) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE bolt_jobs SET variant_id = ?2 WHERE binary_id = ?1",
        params![binary_id, variant_id],
    )?;
    Ok(())
}

/// Forgets a binary's BOLT history (`reset NAME`).
pub fn forget(conn: &Connection, binary_id: i64) -> anyhow::Result<()> {
    conn.execute("DELETE FROM bolt_jobs WHERE binary_id = ?1", [binary_id])?;
    Ok(())
}

/// Contents of variants the store must keep: every variant row not rejected or retired
/// (ready ones are waiting to be measured; canary and served ones are in use).
pub fn variants_to_keep(conn: &Connection) -> anyhow::Result<std::collections::HashSet<ContentId>> {
    let mut stmt =
        conn.prepare("SELECT sha256 FROM variants WHERE state NOT IN ('rejected', 'retired')")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut keep = std::collections::HashSet::new();
    for hex in rows {
        if let Some(id) = ContentId::parse(&hex?) {
            keep.insert(id);
        }
    }
    Ok(keep)
}

const COLUMNS: &str = "binary_id, attempts, last_outcome, failure_tail, ladder_step, flags,
    profile_samples, bolt_version, failed_until_change, wall_ms, peak_rss_kib, variant_id,
    updated_at";

pub fn job_of(conn: &Connection, binary_id: i64) -> anyhow::Result<Option<BoltJobRow>> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM bolt_jobs WHERE binary_id = ?1"),
            [binary_id],
            row,
        )
        .optional()?)
}

/// Binaries whose last attempt failed, newest first.
pub fn recent_failures(conn: &Connection, limit: u32) -> anyhow::Result<Vec<BoltJobRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM bolt_jobs WHERE last_outcome != 'ok'
         ORDER BY updated_at DESC, binary_id DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit], row)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BoltJobRow> {
    Ok(BoltJobRow {
        binary_id: r.get(0)?,
        attempts: r.get(1)?,
        last_outcome: r.get(2)?,
        failure_tail: r.get(3)?,
        ladder_step: r.get(4)?,
        flags: r.get(5)?,
        profile_samples: r.get::<_, i64>(6)?.max(0) as u64,
        bolt_version: r.get(7)?,
        failed_until_change: r.get::<_, i64>(8)? != 0,
        wall_ms: r.get(9)?,
        peak_rss_kib: r.get(10)?,
        variant_id: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::base::upsert_binary;
    use crate::catalog::base::{
        NewVariant, VariantKind, VariantState, insert_variant, set_variant_state,
    };
    use crate::elf::ElfFacts;

    #[test]
    fn attempts_accumulate_and_success_clears_failure() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let id = upsert_binary(c, &ContentId::of_bytes(b"b"), 1, &ElfFacts::default(), 1)?;
            assert_eq!(job_of(c, id)?, None);
            let fail = AttemptRecord {
                binary_id: id,
                outcome: "exit 1".into(),
                tail: Some("BOLT-ERROR: x".into()),
                ladder_step: "full".into(),
                flags: "-a".into(),
                profile_samples: 100,
                bolt_version: "22.1.8".into(),
                wall_ms: 5,
                peak_rss_kib: 1000,
            };
            record_attempt(c, &fail, 10)?;
            record_attempt(
                c,
                &AttemptRecord { ladder_step: "no-split".into(), ..fail.clone() },
                11,
            )?;
            set_failed_until_change(c, id, true, 12)?;
            let row = job_of(c, id)?.unwrap();
            assert_eq!(row.attempts, 2);
            assert!(row.failed_until_change);
            assert_eq!(row.ladder_step.as_deref(), Some("no-split"));
            assert_eq!(recent_failures(c, 10)?.len(), 1);
            let ok = AttemptRecord { outcome: "ok".into(), tail: None, ..fail };
            record_attempt(c, &ok, 13)?;
            let row = job_of(c, id)?.unwrap();
            assert_eq!(row.attempts, 3);
            assert!(!row.failed_until_change);
            assert_eq!(row.failure_tail, None);
            assert!(recent_failures(c, 10)?.is_empty());

            let (a, b) = (ContentId::of_bytes(b"a"), ContentId::of_bytes(b"b"));
            let v = |sha: &ContentId| NewVariant {
                binary_id: id,
                kind: VariantKind::Bolt,
                sha256: sha.hex(),
                state: VariantState::Ready,
                ..Default::default()
            };
            insert_variant(c, &v(&a), 14)?;
            let vb = insert_variant(c, &v(&b), 14)?;
            assert_eq!(variants_to_keep(c)?, [a, b].into());
            set_variant_state(c, vb, VariantState::Retired, None)?;
            assert_eq!(variants_to_keep(c)?, [a].into());
            Ok(())
        })
        .unwrap();
    }
}

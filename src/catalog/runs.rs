//! Measured runs, quarantine incidents and the policy's decision log (migration 4).
//!
//! Runs are rotated like profiles: older than the retention age, or beyond the row cap
//! (oldest first), they go. Incidents and decisions are small and kept (a reset of a binary
//! forgets them with [`forget_binary`]).

use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::catalog::variant::VariantState;
use crate::measure::counters::RunCounts;
use crate::measure::{RunExit, RunRecord};

pub const SCHEMA: &str = r#"
CREATE TABLE runs (
    id              INTEGER PRIMARY KEY,
    binary_id       INTEGER REFERENCES binaries(id) ON DELETE CASCADE,
    path            TEXT NOT NULL,
    variant_id      INTEGER REFERENCES variants(id) ON DELETE CASCADE,
    cmd_hash        TEXT NOT NULL,
    task_clock_ns   INTEGER NOT NULL,
    instructions    INTEGER,
    cycles          INTEGER,
    wall_ns         INTEGER NOT NULL,
    exit_code       INTEGER,
    exit_signal     INTEGER,
    at_ms           INTEGER NOT NULL
);
CREATE INDEX runs_by_binary ON runs(binary_id, id);
CREATE INDEX runs_by_at ON runs(at_ms);
CREATE TABLE incidents (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    binary_id   INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    variant_id  INTEGER REFERENCES variants(id) ON DELETE SET NULL,
    run_id      INTEGER,
    cmd_hash    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    exit_code   INTEGER,
    exit_signal INTEGER,
    detail      TEXT NOT NULL
);
CREATE INDEX incidents_by_binary ON incidents(binary_id, id);
CREATE TABLE policy_decisions (
    id            INTEGER PRIMARY KEY,
    at_ms         INTEGER NOT NULL,
    binary_id     INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    variant_id    INTEGER REFERENCES variants(id) ON DELETE CASCADE,
    action        TEXT NOT NULL,
    from_state    TEXT,
    to_state      TEXT,
    first_run_id  INTEGER,
    detail        TEXT NOT NULL
);
CREATE INDEX decisions_by_binary ON policy_decisions(binary_id, id);
"#;

/// Migration 5: the binary's own-text profile samples when a decision was taken, so that a
/// rebuild counts the profile's growth from the decision on (the profile grows during the
/// canary, and a rebuild right after it would start a new canary at once).
pub const SCHEMA_DECISION_SAMPLES: &str = r#"
ALTER TABLE policy_decisions ADD COLUMN profile_samples INTEGER;
"#;

/// Migration 8: the per-run counters besides CPU time, instructions and cycles (the
/// software ones every run has, the hardware ones where the PMU offers them). Runs stored
/// before have NULL: unknown, never zero.
pub const SCHEMA_RUN_COUNTERS: &str = r#"
ALTER TABLE runs ADD COLUMN page_faults INTEGER;
ALTER TABLE runs ADD COLUMN context_switches INTEGER;
ALTER TABLE runs ADD COLUMN branch_misses INTEGER;
ALTER TABLE runs ADD COLUMN l1i_misses INTEGER;
ALTER TABLE runs ADD COLUMN itlb_misses INTEGER;
ALTER TABLE runs ADD COLUMN cache_misses INTEGER;
"#;

/// Whether each run had counters (0: a sampled run of a served variant, followed for its
/// exit only: its CPU time and counts are not measurements).
pub const SCHEMA_RUN_COUNTED: &str = r#"
ALTER TABLE runs ADD COLUMN counted INTEGER NOT NULL DEFAULT 1;
"#;

/// A stored run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRow {
    pub id: i64,
    pub binary_id: Option<i64>,
    pub path: String,
    pub variant_id: Option<i64>,
    pub cmd_hash: String,
    /// Whether the run had counters; without them `task_clock_ns` is 0 and the counts are
    /// `None` (see [`RunRecord::counted`]).
    pub counted: bool,
    pub task_clock_ns: u64,
    /// The run's other counters; `None` where not counted.
    pub counts: RunCounts,
    pub wall_ns: u64,
    pub exit: RunExit,
    pub at_ms: i64,
}

/// The binary a run belongs to: the one the overlay named, else the variant's, else the
/// binary recorded for the path if the path still has the stat key the run saw.
pub fn resolve_binary(conn: &Connection, r: &RunRecord) -> anyhow::Result<Option<i64>> {
    if let Some(id) = r.binary_id {
        return Ok(Some(id));
    }
    if let Some(v) = r.variant_id {
        // Cached: a batch resolves every run (a statement parsed per run cost the catalog
        // thread more than the insert).
        let id: Option<i64> = conn
            .prepare_cached("SELECT binary_id FROM variants WHERE id = ?1")?
            .query_row([v], |row| row.get(0))
            .optional()?;
        if id.is_some() {
            return Ok(id);
        }
    }
    let path = r.original.to_string_lossy();
    Ok(crate::catalog::base::path_row(conn, &path)?
        .filter(|p| p.key == r.key)
        .and_then(|p| p.binary_id))
}

/// Where a stored run went: its row id and the binary it was attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRun {
    pub run_id: i64,
    pub binary_id: Option<i64>,
}

/// Stores a batch of runs in one transaction; `None` for a run that was skipped because
/// its variant no longer exists (the binary was reset meanwhile).
pub fn insert_runs(
    conn: &mut Connection,
    records: &[RunRecord],
) -> anyhow::Result<Vec<Option<StoredRun>>> {
    let tx = conn.transaction()?;
    let mut out = Vec::with_capacity(records.len());
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO runs (binary_id, path, variant_id, cmd_hash, task_clock_ns,
                               instructions, cycles, wall_ns, exit_code, exit_signal, at_ms,
                               page_faults, context_switches, branch_misses, l1i_misses,
                               itlb_misses, cache_misses, counted)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18
             WHERE ?3 IS NULL OR EXISTS (SELECT 1 FROM variants WHERE id = ?3)",
        )?;
        for r in records {
            let binary_id = resolve_binary(&tx, r)?;
            let (code, sig) = match r.exit {
                RunExit::Exited(c) => (Some(c), None),
                RunExit::Signaled(s) => (None, Some(s)),
            };
            let c = |v: Option<u64>| v.map(|v| v as i64);
            let n = stmt.execute(params![
                binary_id,
                r.original.to_string_lossy(),
                r.variant_id,
                r.cmd_hash,
                r.task_clock_ns as i64,
                c(r.counts.instructions),
                c(r.counts.cycles),
                r.wall_ns as i64,
                code,
                sig,
                r.at_ms,
                c(r.counts.page_faults),
                c(r.counts.context_switches),
                c(r.counts.branch_misses),
                c(r.counts.l1i_misses),
                c(r.counts.itlb_misses),
                c(r.counts.cache_misses),
                r.counted,
            ])?;
            out.push((n == 1).then(|| StoredRun { run_id: tx.last_insert_rowid(), binary_id }));
        }
    }
    tx.commit()?;
    Ok(out)
}

const RUN_COLUMNS: &str = "id, binary_id, path, variant_id, cmd_hash, task_clock_ns, \
     instructions, cycles, wall_ns, exit_code, exit_signal, at_ms, page_faults, \
     context_switches, branch_misses, l1i_misses, itlb_misses, cache_misses, counted";

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let code: Option<i32> = r.get(9)?;
    let sig: Option<i32> = r.get(10)?;
    let count = |i| r.get::<_, Option<i64>>(i).map(|v| v.map(|v| v as u64));
    Ok(RunRow {
        id: r.get(0)?,
        binary_id: r.get(1)?,
        path: r.get(2)?,
        variant_id: r.get(3)?,
        cmd_hash: r.get(4)?,
        counted: r.get(18)?,
        task_clock_ns: r.get::<_, i64>(5)? as u64,
        counts: RunCounts {
            instructions: count(6)?,
            cycles: count(7)?,
            page_faults: count(12)?,
            context_switches: count(13)?,
            branch_misses: count(14)?,
            l1i_misses: count(15)?,
            itlb_misses: count(16)?,
            cache_misses: count(17)?,
        },
        wall_ns: r.get::<_, i64>(8)? as u64,
        exit: match (code, sig) {
            (_, Some(s)) => RunExit::Signaled(s),
            (c, None) => RunExit::Exited(c.unwrap_or(0)),
        },
        at_ms: r.get(11)?,
    })
}

/// The newest `limit` runs of a binary, oldest first.
pub fn runs_of_binary(
    conn: &Connection,
    binary_id: i64,
    limit: u32,
) -> anyhow::Result<Vec<RunRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT * FROM (SELECT {RUN_COLUMNS} FROM runs WHERE binary_id = ?1
                        ORDER BY id DESC LIMIT ?2) ORDER BY id"
    ))?;
    let rows = stmt.query_map(params![binary_id, limit], run_row)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Runs of a path (any binary), oldest first, newest `limit`.
pub fn runs_of_path(conn: &Connection, path: &Path, limit: u32) -> anyhow::Result<Vec<RunRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT * FROM (SELECT {RUN_COLUMNS} FROM runs WHERE path = ?1
                        ORDER BY id DESC LIMIT ?2) ORDER BY id"
    ))?;
    let rows = stmt
        .query_map(params![path.to_string_lossy(), limit], run_row)?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The id the next run will get (runs are only ever appended).
pub fn next_run_id(conn: &Connection) -> anyhow::Result<i64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM runs", [], |r| r.get(0))?)
}

/// Deletes runs older than `max_age_ms` and, beyond `max_rows`, the oldest. Returns how
/// many went.
pub fn rotate_runs(
    conn: &Connection,
    now_ms: i64,
    max_age_ms: i64,
    max_rows: u64,
) -> anyhow::Result<usize> {
    let old = conn.execute("DELETE FROM runs WHERE at_ms < ?1", [now_ms - max_age_ms])?;
    let over = conn.execute(
        "DELETE FROM runs WHERE id <= (SELECT id FROM runs ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        [max_rows as i64],
    )?;
    Ok(old + over)
}

/// A stored quarantine record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRow {
    pub id: i64,
    pub at_ms: i64,
    pub binary_id: i64,
    pub variant_id: Option<i64>,
    pub run_id: Option<i64>,
    pub cmd_hash: String,
    pub kind: String,
    pub exit: RunExit,
    pub detail: String,
}

#[allow(clippy::too_many_arguments)]
pub fn insert_incident(
    conn: &Connection,
    at_ms: i64,
    binary_id: i64,
    variant_id: i64,
    run_id: i64,
    cmd_hash: &str,
    kind: &str,
    exit: RunExit,
    detail: &str,
) -> anyhow::Result<i64> {
    let (code, sig) = match exit {
        RunExit::Exited(c) => (Some(c), None),
        RunExit::Signaled(s) => (None, Some(s)),
    };
    conn.execute(
        "INSERT INTO incidents (at_ms, binary_id, variant_id, run_id, cmd_hash, kind,
                                exit_code, exit_signal, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![at_ms, binary_id, variant_id, run_id, cmd_hash, kind, code, sig, detail],
    )?;
    Ok(conn.last_insert_rowid())
}

/// The incident kind of a training command whose output differed between the original and
/// a variant (recorded by `crate::train::check`, acted on by the policy).
pub const OUTPUT_MISMATCH: &str = "output_mismatch";

/// Records that `variant_id` gave another stdout or exit status than the original on the
/// training command `command` (no run id: the check's runs are not measured runs; `exit`
/// is how the variant's run ended, None when it did not end by itself).
pub fn insert_output_mismatch(
    conn: &Connection,
    at_ms: i64,
    binary_id: i64,
    variant_id: i64,
    command: &str,
    exit: Option<RunExit>,
    detail: &str,
) -> anyhow::Result<i64> {
    let (code, sig) = match exit {
        Some(RunExit::Exited(c)) => (Some(c), None),
        Some(RunExit::Signaled(s)) => (None, Some(s)),
        None => (None, None),
    };
    conn.execute(
        "INSERT INTO incidents (at_ms, binary_id, variant_id, run_id, cmd_hash, kind,
                                exit_code, exit_signal, detail)
         VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7, ?8)",
        params![at_ms, binary_id, variant_id, command, OUTPUT_MISMATCH, code, sig, detail],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Per variant of a binary, the detail of its newest output mismatch.
pub fn output_mismatches_of(
    conn: &Connection,
    binary_id: i64,
) -> anyhow::Result<std::collections::HashMap<i64, String>> {
    let mut stmt = conn.prepare(
        "SELECT variant_id, detail FROM incidents
         WHERE binary_id = ?1 AND kind = ?2 AND variant_id IS NOT NULL ORDER BY id",
    )?;
    let rows = stmt
        .query_map(params![binary_id, OUTPUT_MISMATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// A binary's incidents, newest first.
pub fn incidents_of(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<IncidentRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, at_ms, binary_id, variant_id, run_id, cmd_hash, kind, exit_code,
                exit_signal, detail
         FROM incidents WHERE binary_id = ?1 ORDER BY id DESC",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            let sig: Option<i32> = r.get(8)?;
            Ok(IncidentRow {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                binary_id: r.get(2)?,
                variant_id: r.get(3)?,
                run_id: r.get(4)?,
                cmd_hash: r.get(5)?,
                kind: r.get(6)?,
                exit: match sig {
                    Some(s) => RunExit::Signaled(s),
                    None => RunExit::Exited(r.get::<_, Option<i32>>(7)?.unwrap_or(0)),
                },
                detail: r.get(9)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// One entry of the policy's decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRow {
    pub at_ms: i64,
    pub binary_id: i64,
    pub variant_id: Option<i64>,
    pub action: String,
    pub from_state: Option<VariantState>,
    pub to_state: Option<VariantState>,
    pub first_run_id: Option<i64>,
    pub detail: String,
    /// The binary's own-text profile samples at the decision.
    pub profile_samples: Option<i64>,
}

pub fn record_decision(conn: &Connection, d: &DecisionRow) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO policy_decisions (at_ms, binary_id, variant_id, action, from_state,
                                       to_state, first_run_id, detail, profile_samples)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            d.at_ms,
            d.binary_id,
            d.variant_id,
            d.action,
            d.from_state,
            d.to_state,
            d.first_run_id,
            d.detail,
            d.profile_samples
        ],
    )?;
    Ok(())
}

/// A binary's decisions, oldest first.
pub fn decisions_of(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<DecisionRow>> {
    let mut stmt = conn.prepare(
        "SELECT at_ms, binary_id, variant_id, action, from_state, to_state, first_run_id, detail,
                profile_samples
         FROM policy_decisions WHERE binary_id = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok(DecisionRow {
                at_ms: r.get(0)?,
                binary_id: r.get(1)?,
                variant_id: r.get(2)?,
                action: r.get(3)?,
                from_state: r.get(4)?,
                to_state: r.get(5)?,
                first_run_id: r.get(6)?,
                detail: r.get(7)?,
                profile_samples: r.get(8)?,
            })
        })?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the policy decisions of binary {binary_id}"))?;
    Ok(rows)
}

/// The paths a binary was seen at.
pub fn paths_of_binary(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT path FROM paths WHERE binary_id = ?1 ORDER BY path")?;
    let rows = stmt.query_map([binary_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Binaries the policy must keep deciding for: those with a variant that may be served,
/// or with a pinned or excluded path.
pub fn binaries_to_watch(conn: &Connection) -> anyhow::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT binary_id FROM variants
         UNION
         SELECT DISTINCT p.binary_id FROM paths p JOIN controls c ON c.path = p.path
         WHERE p.binary_id IS NOT NULL
         ORDER BY 1",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// For every watched binary, a text that changes whenever its variants' states, its
/// paths' controls or its recorded output mismatches change: the policy re-evaluates a
/// binary on a rescan only then.
pub fn watch_fingerprints(conn: &Connection) -> anyhow::Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare(
        "SELECT b.id,
                COALESCE((SELECT group_concat(v.id || ':' || v.state, ',')
                          FROM (SELECT id, state FROM variants WHERE binary_id = b.id
                                ORDER BY id) v), '')
                || '|' ||
                COALESCE((SELECT group_concat(c.path || ':' || COALESCE(c.pin, '') || ':'
                                              || c.excluded, ',')
                          FROM (SELECT c.path, c.pin, c.excluded FROM controls c
                                JOIN paths p ON p.path = c.path
                                WHERE p.binary_id = b.id ORDER BY c.path) c), '')
                || '|' ||
                (SELECT count(*) FROM incidents i
                 WHERE i.binary_id = b.id AND i.kind = 'output_mismatch')
         FROM binaries b
         WHERE b.id IN (SELECT binary_id FROM variants)
            OR b.id IN (SELECT p.binary_id FROM paths p JOIN controls c ON c.path = p.path)
         ORDER BY b.id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Forgets the measurements, incidents and decisions of a binary (`reset NAME`).
pub fn forget_binary(conn: &Connection, binary_id: i64) -> anyhow::Result<()> {
    conn.execute("DELETE FROM runs WHERE binary_id = ?1", [binary_id])?;
    conn.execute("DELETE FROM incidents WHERE binary_id = ?1", [binary_id])?;
    conn.execute("DELETE FROM policy_decisions WHERE binary_id = ?1", [binary_id])?;
    Ok(())
}

/// Total CPU time of a variant's runs since a run id (for "CPU time saved"): every run
/// since then (counted or followed for its exit only) at the mean CPU time of the counted
/// ones among them, or, when none of them was counted (a served variant's runs are
/// sampled), of all the variant's counted runs.
pub fn variant_cpu_since(conn: &Connection, variant_id: i64, from_run: i64) -> anyhow::Result<u64> {
    let (runs, mean_since, mean_ever): (i64, Option<f64>, Option<f64>) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM runs WHERE variant_id = ?1 AND id >= ?2),
                (SELECT AVG(task_clock_ns) FROM runs
                 WHERE variant_id = ?1 AND id >= ?2 AND counted = 1),
                (SELECT AVG(task_clock_ns) FROM runs WHERE variant_id = ?1 AND counted = 1)",
        params![variant_id, from_run],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mean = mean_since.or(mean_ever).unwrap_or(0.0);
    Ok((mean.max(0.0) * runs.max(0) as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::base::{
        NewVariant, VariantKind, insert_variant, upsert_binary, upsert_path,
    };
    use crate::elf::ElfFacts;
    use crate::identity::{ContentId, FileKey};
    use std::path::PathBuf;

    fn record(path: &str, key: FileKey, variant: Option<i64>, exit: RunExit, at: i64) -> RunRecord {
        RunRecord {
            original: PathBuf::from(path),
            key,
            binary_id: None,
            variant_id: variant,
            cmd_hash: "c".into(),
            counted: true,
            task_clock_ns: 10,
            counts: RunCounts {
                cycles: Some(5),
                page_faults: Some(77),
                context_switches: Some(2),
                ..RunCounts::default()
            },
            wall_ns: 20,
            exit,
            at_ms: at,
        }
    }

    #[test]
    fn runs_without_counters_are_stored_as_such_and_scaled_in_the_cpu_saved() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let key = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 };
            let bid = upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 1)?;
            upsert_path(c, "/bin/x", Some(bid), &key, 1)?;
            let new =
                NewVariant { binary_id: bid, kind: VariantKind::Placed, ..Default::default() };
            let vid = insert_variant(c, &new, 1)?;
            let counted = record("/bin/x", key, Some(vid), RunExit::Exited(0), 1);
            let exit_only = RunRecord {
                counted: false,
                task_clock_ns: 0,
                counts: RunCounts::default(),
                ..counted.clone()
            };
            let mut batch = vec![counted];
            batch.extend(std::iter::repeat_n(exit_only, 3));
            insert_runs(c, &batch)?;
            let rows = runs_of_binary(c, bid, 10)?;
            let flags: Vec<bool> = rows.iter().map(|r| r.counted).collect();
            assert_eq!(flags, [true, false, false, false]);
            // One run counted of four, 10 ns: the four took about 40.
            assert_eq!(variant_cpu_since(c, vid, 0)?, 40);
            // Since the second run none was counted: the variant's counted runs say 10 each.
            let second = rows[1].id;
            assert_eq!(variant_cpu_since(c, vid, second)?, 30);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn runs_round_trip_resolve_and_rotate() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let key = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 };
            let bid = upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 1)?;
            upsert_path(c, "/bin/x", Some(bid), &key, 1)?;
            let vid = insert_variant(
                c,
                &NewVariant {
                    binary_id: bid,
                    kind: VariantKind::Placed,
                    state: VariantState::Canary,
                    ..Default::default()
                },
                1,
            )?;
            let other_key = FileKey { ino: 9, ..key };
            let ids = insert_runs(
                c,
                &[
                    record("/bin/x", key, None, RunExit::Exited(3), 100),
                    record("/bin/x", key, Some(vid), RunExit::Signaled(11), 200),
                    record("/bin/x", other_key, None, RunExit::Exited(0), 300),
                    record("/bin/x", key, Some(999), RunExit::Exited(0), 300),
                ],
            )?;
            assert_eq!(ids[0].map(|x| x.binary_id), Some(Some(bid)));
            assert_eq!(ids[1].map(|x| x.binary_id), Some(Some(bid)));
            assert_eq!(
                ids[2].map(|x| x.binary_id),
                Some(None),
                "a changed file is not that binary"
            );
            assert_eq!(ids[3], None, "unknown variant skipped");
            let rows = runs_of_binary(c, bid, 100)?;
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].exit, RunExit::Exited(3));
            assert_eq!(rows[1].exit, RunExit::Signaled(11));
            assert_eq!(rows[1].counts.cycles, Some(5));
            assert_eq!(rows[1].counts.page_faults, Some(77));
            assert_eq!(rows[1].counts.context_switches, Some(2));
            assert_eq!((rows[1].counts.instructions, rows[1].counts.itlb_misses), (None, None));
            assert_eq!(next_run_id(c)?, rows[1].id + 2);
            assert_eq!(runs_of_path(c, Path::new("/bin/x"), 100)?.len(), 3);
            // Age: the run at 100 ms goes; cap 1: only the newest stays.
            assert_eq!(rotate_runs(c, 1_000, 850, 10)?, 1);
            assert_eq!(rotate_runs(c, 1_000, 10_000, 1)?, 1);
            assert_eq!(runs_of_path(c, Path::new("/bin/x"), 100)?.len(), 1);
            insert_incident(c, 5, bid, vid, 2, "c", "crash", RunExit::Signaled(11), "boom")?;
            assert_eq!(incidents_of(c, bid)?[0].exit, RunExit::Signaled(11));
            record_decision(
                c,
                &DecisionRow {
                    at_ms: 1,
                    binary_id: bid,
                    variant_id: Some(vid),
                    action: "start_canary".into(),
                    from_state: Some(VariantState::Ready),
                    to_state: Some(VariantState::Canary),
                    first_run_id: Some(7),
                    detail: "d".into(),
                    profile_samples: Some(1234),
                },
            )?;
            assert_eq!(decisions_of(c, bid)?[0].first_run_id, Some(7));
            assert_eq!(decisions_of(c, bid)?[0].profile_samples, Some(1234));
            assert_eq!(binaries_to_watch(c)?, vec![bid]);
            let before = watch_fingerprints(c)?;
            assert_eq!(before.len(), 1);
            crate::catalog::base::set_pin(c, "/bin/x", Some(crate::catalog::base::Pin::Bolted), 2)?;
            let after = watch_fingerprints(c)?;
            assert_ne!(before, after);
            crate::catalog::base::set_variant_state(c, vid, VariantState::Served, None)?;
            assert_ne!(after, watch_fingerprints(c)?);
            assert_eq!(paths_of_binary(c, bid)?, vec!["/bin/x".to_string()]);
            forget_binary(c, bid)?;
            assert!(incidents_of(c, bid)?.is_empty() && decisions_of(c, bid)?.is_empty());
            Ok(())
        })
        .unwrap();
    }
}

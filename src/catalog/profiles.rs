//! Profile tables (migration 2): sampled profiles per binary content, in time windows, and
//! merged instrumentation profiles; the queries that write, read and rotate them.
//!
//! Layout, chosen for size and speed:
//! - `profile_functions` interns function names per binary, so a sample row carries an
//!   integer instead of a (often long, mangled) name.
//! - `profile_samples` holds one row per (binary, window, function, offset) with a count;
//!   `WITHOUT ROWID` keyed on exactly that, so an additive upsert is one B-tree probe and a
//!   window's rows are contiguous (deleting a window is a range delete). A flush writes all
//!   rows of all binaries in one transaction.
//! - `profile_windows` keeps per-window totals: samples in the binary's own text, outside
//!   it, in served variants, and the runs (processes) first seen in that window.
//! - `profile_branches` is the same for branch records (hardware path; untested on a
//!   machine without a PMU).
//! - `instr_profiles` / `instr_edges` keep merged instrumentation profiles, by edge.
//!
//! A profile belongs to a `binaries.id`, i.e. to one exact content (sha256).

use std::collections::HashMap;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = r#"
CREATE TABLE profile_binaries (
    binary_id   INTEGER PRIMARY KEY REFERENCES binaries(id) ON DELETE CASCADE,
    event       TEXT NOT NULL,
    refused     TEXT,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE profile_functions (
    id          INTEGER PRIMARY KEY,
    binary_id   INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    UNIQUE (binary_id, name)
);
CREATE TABLE profile_windows (
    binary_id       INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    window_start    INTEGER NOT NULL,
    own_samples     INTEGER NOT NULL DEFAULT 0,
    unsymbolized    INTEGER NOT NULL DEFAULT 0,
    outside_samples INTEGER NOT NULL DEFAULT 0,
    variant_samples INTEGER NOT NULL DEFAULT 0,
    runs            INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (binary_id, window_start)
) WITHOUT ROWID;
CREATE TABLE profile_samples (
    binary_id    INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    window_start INTEGER NOT NULL,
    function_id  INTEGER NOT NULL,
    offset       INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    PRIMARY KEY (binary_id, window_start, function_id, offset)
) WITHOUT ROWID;
CREATE TABLE profile_branches (
    binary_id    INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    window_start INTEGER NOT NULL,
    from_fn      INTEGER NOT NULL,
    from_offset  INTEGER NOT NULL,
    to_fn        INTEGER NOT NULL,
    to_offset    INTEGER NOT NULL,
    mispreds     INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    PRIMARY KEY (binary_id, window_start, from_fn, from_offset, to_fn, to_offset)
) WITHOUT ROWID;
CREATE TABLE instr_profiles (
    binary_id   INTEGER PRIMARY KEY REFERENCES binaries(id) ON DELETE CASCADE,
    runs        INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE instr_edges (
    binary_id   INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    from_loc    TEXT NOT NULL,
    to_loc      TEXT NOT NULL,
    mispreds    INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (binary_id, from_loc, to_loc)
) WITHOUT ROWID;
"#;

/// Bytes one `profile_samples` row takes on disk, roughly (key + count + B-tree overhead);
/// used to estimate a binary's share of the profile tables.
const SAMPLE_ROW_BYTES: i64 = 24;
const BRANCH_ROW_BYTES: i64 = 36;
const WINDOW_ROW_BYTES: i64 = 40;

/// A branch row: (from function, from offset, to function, to offset, mispredictions,
/// count).
pub type BranchRow = (String, u64, String, u64, u64, u64);

/// What one flush adds to one binary's window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowBatch {
    /// (function, offset in function, samples).
    pub samples: Vec<(String, u64, u64)>,
    /// (from function, from offset, to function, to offset, mispredictions, count).
    pub branches: Vec<BranchRow>,
    /// Samples in the binary's own text (symbolized or not).
    pub own_samples: u64,
    /// Own-text samples that fell in no function symbol (PLT, padding).
    pub unsymbolized: u64,
    pub outside_samples: u64,
    pub variant_samples: u64,
    /// Processes of this binary first seen in this window.
    pub new_runs: u64,
}

/// Adds `batch` to the (binary, window) counts. Call inside a transaction for speed.
pub fn add_window(
    conn: &Connection,
    binary_id: i64,
    window_start: i64,
    event: &str,
    batch: &WindowBatch,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO profile_binaries (binary_id, event, refused, updated_at)
         VALUES (?1, ?2, NULL, ?3)
         ON CONFLICT(binary_id) DO UPDATE SET event = excluded.event, refused = NULL,
                                              updated_at = excluded.updated_at",
        params![binary_id, event, now],
    )?;
    conn.prepare_cached(
        "INSERT INTO profile_windows (binary_id, window_start, own_samples, unsymbolized,
                                      outside_samples, variant_samples, runs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(binary_id, window_start) DO UPDATE SET
            own_samples = own_samples + excluded.own_samples,
            unsymbolized = unsymbolized + excluded.unsymbolized,
            outside_samples = outside_samples + excluded.outside_samples,
            variant_samples = variant_samples + excluded.variant_samples,
            runs = runs + excluded.runs",
    )?
    .execute(params![
        binary_id,
        window_start,
        batch.own_samples as i64,
        batch.unsymbolized as i64,
        batch.outside_samples as i64,
        batch.variant_samples as i64,
        batch.new_runs as i64
    ])?;
    let mut names = FunctionIds::new(binary_id);
    let mut add_sample = conn.prepare_cached(
        "INSERT INTO profile_samples (binary_id, window_start, function_id, offset, count)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET count = count + excluded.count",
    )?;
    for (name, offset, count) in &batch.samples {
        let fid = names.id(conn, name)?;
        add_sample.execute(params![binary_id, window_start, fid, *offset as i64, *count as i64])?;
    }
    let mut add_branch = conn.prepare_cached(
        "INSERT INTO profile_branches (binary_id, window_start, from_fn, from_offset, to_fn,
                                       to_offset, mispreds, count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT DO UPDATE SET count = count + excluded.count,
                                   mispreds = mispreds + excluded.mispreds",
    )?;
    for (from, from_off, to, to_off, mispreds, count) in &batch.branches {
        let from_id = names.id(conn, from)?;
        let to_id = names.id(conn, to)?;
        add_branch.execute(params![
            binary_id,
            window_start,
            from_id,
            *from_off as i64,
            to_id,
            *to_off as i64,
            *mispreds as i64,
            *count as i64
        ])?;
    }
    Ok(())
}

/// Interns function names of one binary, remembering ids within one flush.
struct FunctionIds {
    binary_id: i64,
    known: HashMap<String, i64>,
}

impl FunctionIds {
    fn new(binary_id: i64) -> Self {
        Self { binary_id, known: HashMap::new() }
    }

    fn id(&mut self, conn: &Connection, name: &str) -> anyhow::Result<i64> {
        if let Some(id) = self.known.get(name) {
            return Ok(*id);
        }
        conn.prepare_cached(
            "INSERT INTO profile_functions (binary_id, name) VALUES (?1, ?2)
             ON CONFLICT(binary_id, name) DO NOTHING",
        )?
        .execute(params![self.binary_id, name])?;
        let id: i64 = conn
            .prepare_cached("SELECT id FROM profile_functions WHERE binary_id = ?1 AND name = ?2")?
            .query_row(params![self.binary_id, name], |r| r.get(0))?;
        self.known.insert(name.to_string(), id);
        Ok(id)
    }
}

/// Records that a binary gets no profile, and why (e.g. `stripped: no .symtab`).
pub fn mark_refused(
    conn: &Connection,
    binary_id: i64,
    event: &str,
    reason: &str,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO profile_binaries (binary_id, event, refused, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(binary_id) DO UPDATE SET refused = excluded.refused,
                                              updated_at = excluded.updated_at",
        params![binary_id, event, reason, now],
    )?;
    Ok(())
}

/// The profile's header facts: which event, and the refusal reason if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileHead {
    pub event: String,
    pub refused: Option<String>,
    pub updated_at: i64,
}

pub fn profile_head(conn: &Connection, binary_id: i64) -> anyhow::Result<Option<ProfileHead>> {
    Ok(conn
        .query_row(
            "SELECT event, refused, updated_at FROM profile_binaries WHERE binary_id = ?1",
            [binary_id],
            |r| Ok(ProfileHead { event: r.get(0)?, refused: r.get(1)?, updated_at: r.get(2)? }),
        )
        .optional()?)
}

/// Totals of one window of one binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WindowTotals {
    pub window_start: i64,
    pub own_samples: u64,
    pub unsymbolized: u64,
    pub outside_samples: u64,
    pub variant_samples: u64,
    pub runs: u64,
}

/// A binary's windows, oldest first.
pub fn windows(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<WindowTotals>> {
    let mut stmt = conn.prepare_cached(
        "SELECT window_start, own_samples, unsymbolized, outside_samples, variant_samples, runs
         FROM profile_windows WHERE binary_id = ?1 ORDER BY window_start",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok(WindowTotals {
                window_start: r.get(0)?,
                own_samples: r.get::<_, i64>(1)? as u64,
                unsymbolized: r.get::<_, i64>(2)? as u64,
                outside_samples: r.get::<_, i64>(3)? as u64,
                variant_samples: r.get::<_, i64>(4)? as u64,
                runs: r.get::<_, i64>(5)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Adds a window of `own` own-text samples (90% in `hot`, 10% in `warm`) and `outside`
/// samples elsewhere, one new run: the profile tests elsewhere need only its size.
#[cfg(test)]
pub fn add_test_window(
    conn: &Connection,
    binary_id: i64,
    start: i64,
    own: u64,
    outside: u64,
) -> anyhow::Result<()> {
    let batch = WindowBatch {
        samples: vec![("hot".into(), 0x10, own * 9 / 10), ("warm".into(), 0, own - own * 9 / 10)],
        own_samples: own,
        outside_samples: outside,
        new_runs: 1,
        ..Default::default()
    };
    add_window(conn, binary_id, start, "cpu-clock", &batch, start)
}

/// The binary's own-text samples over all its windows (what the profile's size means for
/// maturity and rebuilds).
pub fn own_samples(conn: &Connection, binary_id: i64) -> anyhow::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COALESCE(SUM(own_samples), 0) FROM profile_windows WHERE binary_id = ?1",
        [binary_id],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

/// Samples per (function, offset) summed over all windows, ordered by function and offset.
pub fn sample_counts(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT f.name, s.offset, sum(s.count) FROM profile_samples s
         JOIN profile_functions f ON f.id = s.function_id
         WHERE s.binary_id = ?1 GROUP BY s.function_id, s.offset ORDER BY f.name, s.offset",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Branch counts summed over all windows:
/// (from fn, from offset, to fn, to offset, mispredictions, count).
pub fn branch_counts(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<BranchRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ff.name, b.from_offset, tf.name, b.to_offset, sum(b.mispreds), sum(b.count)
         FROM profile_branches b
         JOIN profile_functions ff ON ff.id = b.from_fn
         JOIN profile_functions tf ON tf.id = b.to_fn
         WHERE b.binary_id = ?1
         GROUP BY b.from_fn, b.from_offset, b.to_fn, b.to_offset
         ORDER BY ff.name, b.from_offset, tf.name, b.to_offset",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)? as u64,
                r.get::<_, i64>(5)? as u64,
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Samples per function, per window: (window_start, function, samples).
pub fn function_counts_by_window(
    conn: &Connection,
    binary_id: i64,
) -> anyhow::Result<Vec<(i64, String, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.window_start, f.name, sum(s.count) FROM profile_samples s
         JOIN profile_functions f ON f.id = s.function_id
         WHERE s.binary_id = ?1 GROUP BY s.window_start, s.function_id",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Estimated bytes a binary's sampled profile takes in the database.
pub fn disk_bytes(conn: &Connection, binary_id: i64) -> anyhow::Result<u64> {
    let bytes: i64 = conn.query_row(
        "SELECT
           (SELECT count(*) FROM profile_samples WHERE binary_id = ?1) * ?2
         + (SELECT count(*) FROM profile_branches WHERE binary_id = ?1) * ?3
         + (SELECT count(*) FROM profile_windows WHERE binary_id = ?1) * ?4
         + (SELECT coalesce(sum(length(name) + 16), 0) FROM profile_functions
            WHERE binary_id = ?1)",
        params![binary_id, SAMPLE_ROW_BYTES, BRANCH_ROW_BYTES, WINDOW_ROW_BYTES],
        |r| r.get(0),
    )?;
    Ok(bytes.max(0) as u64)
}

/// Bytes the profile tables really occupy in the database file (SQLite's `dbstat`).
pub fn tables_disk_bytes(conn: &Connection) -> anyhow::Result<u64> {
    let bytes: i64 = conn
        .query_row(
            "SELECT coalesce(sum(pgsize), 0) FROM dbstat
             WHERE name LIKE 'profile_%' OR name LIKE 'instr_%'
                OR name LIKE 'sqlite_autoindex_profile_%' OR name LIKE 'sqlite_autoindex_instr_%'",
            [],
            |r| r.get(0),
        )
        .context("reading dbstat")?;
    Ok(bytes.max(0) as u64)
}

/// How long and how much profile data is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Windows that started longer ago than this are dropped.
    pub max_age_secs: i64,
    /// Per binary: the oldest windows are dropped while its estimate exceeds this.
    pub max_bytes_per_binary: u64,
    /// All binaries: the oldest windows (of any binary) are dropped while the total exceeds
    /// this.
    pub max_bytes_total: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_secs: 30 * 24 * 3600,
            max_bytes_per_binary: 16 << 20,
            max_bytes_total: 256 << 20,
        }
    }
}

/// What one rotation removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RotationReport {
    pub windows_dropped: u64,
}

/// Drops old windows: by age, then per binary over its cap, then globally over the total
/// cap (oldest first). A binary's newest window is never dropped for size, so a profile in
/// progress keeps its latest data.
pub fn rotate(conn: &Connection, now: i64, policy: &Retention) -> anyhow::Result<RotationReport> {
    let mut report = RotationReport::default();
    let cutoff = now - policy.max_age_secs;
    let old: Vec<(i64, i64)> = {
        let mut stmt = conn.prepare(
            "SELECT binary_id, window_start FROM profile_windows WHERE window_start < ?1",
        )?;
        stmt.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
    };
    for (binary_id, window_start) in old {
        drop_window(conn, binary_id, window_start)?;
        report.windows_dropped += 1;
    }
    let binaries: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT DISTINCT binary_id FROM profile_windows")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut sizes = HashMap::new();
    for binary_id in binaries {
        let mut size = disk_bytes(conn, binary_id)?;
        while size > policy.max_bytes_per_binary {
            let Some(oldest) = oldest_droppable_window(conn, Some(binary_id))? else { break };
            drop_window(conn, oldest.0, oldest.1)?;
            report.windows_dropped += 1;
            size = disk_bytes(conn, binary_id)?;
        }
        sizes.insert(binary_id, size);
    }
    let mut total: u64 = sizes.values().sum();
    while total > policy.max_bytes_total {
        let Some((binary_id, window_start)) = oldest_droppable_window(conn, None)? else { break };
        drop_window(conn, binary_id, window_start)?;
        report.windows_dropped += 1;
        let size = disk_bytes(conn, binary_id)?;
        let before = sizes.insert(binary_id, size).unwrap_or(0);
        total = total - before + size;
    }
    if report.windows_dropped > 0 {
        conn.execute(
            "DELETE FROM profile_functions WHERE id NOT IN
               (SELECT function_id FROM profile_samples
                UNION SELECT from_fn FROM profile_branches
                UNION SELECT to_fn FROM profile_branches)",
            [],
        )?;
    }
    Ok(report)
}

/// The oldest window that is not its binary's newest (of one binary, or of any).
fn oldest_droppable_window(
    conn: &Connection,
    binary_id: Option<i64>,
) -> anyhow::Result<Option<(i64, i64)>> {
    Ok(conn
        .query_row(
            "SELECT w.binary_id, w.window_start FROM profile_windows w
             WHERE (?1 IS NULL OR w.binary_id = ?1)
               AND w.window_start < (SELECT max(window_start) FROM profile_windows x
                                     WHERE x.binary_id = w.binary_id)
             ORDER BY w.window_start LIMIT 1",
            [binary_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

fn drop_window(conn: &Connection, binary_id: i64, window_start: i64) -> anyhow::Result<()> {
    let key = params![binary_id, window_start];
    conn.execute("DELETE FROM profile_samples WHERE binary_id = ?1 AND window_start = ?2", key)?;
    conn.execute("DELETE FROM profile_branches WHERE binary_id = ?1 AND window_start = ?2", key)?;
    conn.execute("DELETE FROM profile_windows WHERE binary_id = ?1 AND window_start = ?2", key)?;
    Ok(())
}

/// Binaries that have a sampled profile row (refused or not).
pub fn profiled_binaries(conn: &Connection) -> anyhow::Result<Vec<i64>> {
    let mut stmt = conn.prepare("SELECT binary_id FROM profile_binaries ORDER BY binary_id")?;
    let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Adds one instrumented run's edges (already merged by edge) to a binary's profile.
/// Edges are `(from, to, mispreds, count)` with `from`/`to` as BOLT writes them
/// (`1 main 1a`).
pub fn add_instrumented_run(
    conn: &Connection,
    binary_id: i64,
    edges: &[(String, String, u64, u64)],
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO instr_profiles (binary_id, runs, updated_at) VALUES (?1, 1, ?2)
         ON CONFLICT(binary_id) DO UPDATE SET runs = runs + 1, updated_at = excluded.updated_at",
        params![binary_id, now],
    )?;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO instr_edges (binary_id, from_loc, to_loc, mispreds, count)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET mispreds = mispreds + excluded.mispreds,
                                   count = count + excluded.count",
    )?;
    for (from, to, mispreds, count) in edges {
        stmt.execute(params![binary_id, from, to, *mispreds as i64, *count as i64])?;
    }
    Ok(())
}

/// Forgets everything profiled for a binary: sampled windows, functions, branches, the
/// refusal mark and the instrumentation profile (`reset NAME`).
pub fn forget(conn: &Connection, binary_id: i64) -> anyhow::Result<()> {
    for table in [
        "profile_samples",
        "profile_branches",
        "profile_windows",
        "profile_functions",
        "profile_binaries",
        "instr_edges",
        "instr_profiles",
    ] {
        conn.execute(&format!("DELETE FROM {table} WHERE binary_id = ?1"), [binary_id])?;
    }
    Ok(())
}

/// How many instrumented runs were merged into a binary's instrumentation profile.
pub fn instrumented_runs(conn: &Connection, binary_id: i64) -> anyhow::Result<u64> {
    let runs: Option<i64> = conn
        .query_row("SELECT runs FROM instr_profiles WHERE binary_id = ?1", [binary_id], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(runs.unwrap_or(0).max(0) as u64)
}

/// The merged instrumentation edges of a binary, ordered.
pub fn instrumented_edges(
    conn: &Connection,
    binary_id: i64,
) -> anyhow::Result<Vec<(String, String, u64, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT from_loc, to_loc, mispreds, count FROM instr_edges WHERE binary_id = ?1
         ORDER BY from_loc, to_loc",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, base};
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    fn batch(samples: &[(&str, u64, u64)], runs: u64) -> WindowBatch {
        WindowBatch {
            samples: samples.iter().map(|(f, o, c)| (f.to_string(), *o, *c)).collect(),
            own_samples: samples.iter().map(|s| s.2).sum(),
            new_runs: runs,
            outside_samples: 3,
            ..Default::default()
        }
    }

    #[test]
    fn counts_add_up_across_flushes_and_windows() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let id =
                base::upsert_binary(c, &ContentId::of_bytes(b"a"), 1, &ElfFacts::default(), 0)?;
            add_window(c, id, 0, "cpu-clock", &batch(&[("f", 0x10, 5), ("g", 0, 1)], 1), 1)?;
            add_window(c, id, 0, "cpu-clock", &batch(&[("f", 0x10, 2)], 1), 2)?;
            add_window(c, id, 600, "cpu-clock", &batch(&[("f", 0x10, 1), ("f", 0x20, 4)], 0), 3)?;
            assert_eq!(
                sample_counts(c, id)?,
                vec![("f".into(), 0x10, 8), ("f".into(), 0x20, 4), ("g".into(), 0, 1)]
            );
            let w = windows(c, id)?;
            assert_eq!(w.len(), 2);
            assert_eq!((w[0].own_samples, w[0].runs, w[0].outside_samples), (8, 2, 6));
            assert_eq!(w[1].own_samples, 5);
            assert_eq!(own_samples(c, id)?, 13);
            assert_eq!(own_samples(c, id + 1)?, 0);
            assert!(disk_bytes(c, id)? > 0);
            assert!(tables_disk_bytes(c)? > 0);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn rotation_drops_windows_by_age_and_by_size_but_keeps_the_newest() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let a = base::upsert_binary(c, &ContentId::of_bytes(b"a"), 1, &ElfFacts::default(), 0)?;
            let b = base::upsert_binary(c, &ContentId::of_bytes(b"b"), 1, &ElfFacts::default(), 0)?;
            for w in 0..5 {
                let rows: Vec<(&str, u64, u64)> = (0..50).map(|o| ("fn_a", o, 1)).collect();
                add_window(c, a, w * 100, "cpu-clock", &batch(&rows, 1), 0)?;
            }
            add_window(c, b, 0, "cpu-clock", &batch(&[("fn_b", 0, 1)], 1), 0)?;
            // Age: windows before 150 go (a: 0, 100; b: 0 — age beats "keep the newest").
            let policy = Retention {
                max_age_secs: 1000,
                max_bytes_per_binary: u64::MAX,
                max_bytes_total: u64::MAX,
            };
            let r = rotate(c, 1150, &policy)?;
            assert_eq!(r.windows_dropped, 3);
            assert_eq!(
                windows(c, a)?.iter().map(|w| w.window_start).collect::<Vec<_>>(),
                [200, 300, 400]
            );
            assert!(windows(c, b)?.is_empty());
            // Size: a cap below one window keeps only the newest window.
            let policy = Retention { max_bytes_per_binary: 100, ..policy };
            let r = rotate(c, 1150, &policy)?;
            assert_eq!(r.windows_dropped, 2);
            assert_eq!(windows(c, a)?.iter().map(|w| w.window_start).collect::<Vec<_>>(), [400]);
            assert_eq!(sample_counts(c, a)?.len(), 50);
            let orphan_names: i64 = c.query_row(
                "SELECT count(*) FROM profile_functions WHERE name = 'fn_b'",
                [],
                |r| r.get(0),
            )?;
            assert_eq!(orphan_names, 0, "names of dropped rows are dropped too");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn total_cap_drops_the_globally_oldest_windows() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let a = base::upsert_binary(c, &ContentId::of_bytes(b"a"), 1, &ElfFacts::default(), 0)?;
            let b = base::upsert_binary(c, &ContentId::of_bytes(b"b"), 1, &ElfFacts::default(), 0)?;
            let rows: Vec<(&str, u64, u64)> = (0..100).map(|o| ("f", o, 1)).collect();
            add_window(c, a, 0, "cpu-clock", &batch(&rows, 1), 0)?;
            add_window(c, b, 100, "cpu-clock", &batch(&rows, 1), 0)?;
            add_window(c, a, 200, "cpu-clock", &batch(&rows, 1), 0)?;
            add_window(c, b, 300, "cpu-clock", &batch(&rows, 1), 0)?;
            let one_binary = disk_bytes(c, a)?;
            let policy = Retention {
                max_age_secs: i64::MAX / 2,
                max_bytes_per_binary: u64::MAX,
                max_bytes_total: one_binary + one_binary / 2,
            };
            let r = rotate(c, 400, &policy)?;
            assert_eq!(r.windows_dropped, 2);
            assert_eq!(windows(c, a)?[0].window_start, 200);
            assert_eq!(windows(c, b)?[0].window_start, 300);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn instrumented_runs_sum_by_edge() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let a = base::upsert_binary(c, &ContentId::of_bytes(b"a"), 1, &ElfFacts::default(), 0)?;
            let e = |f: &str, t: &str, n| (f.to_string(), t.to_string(), 0, n);
            add_instrumented_run(c, a, &[e("1 main 1a", "1 main 2b", 3)], 1)?;
            add_instrumented_run(
                c,
                a,
                &[e("1 main 1a", "1 main 2b", 4), e("1 f 0", "1 g 0", 1)],
                2,
            )?;
            assert_eq!(instrumented_runs(c, a)?, 2);
            assert_eq!(
                instrumented_edges(c, a)?,
                vec![e("1 f 0", "1 g 0", 1), e("1 main 1a", "1 main 2b", 7)]
            );
            Ok(())
        })
        .unwrap();
    }
}

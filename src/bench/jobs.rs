//! Benchmark jobs in SQLite: one row per `optbin bench` run, with its whole result as JSON.
//!
//! The database is the invoking user's own (`$XDG_STATE_HOME/optbin/bench.db`, else
//! `~/.local/state/optbin/bench.db`, or `--db FILE`): `bench` runs as that user, who can
//! neither write the daemon's catalog (its state directory is root-only) nor should (the
//! daemon is the catalog's one owner). The schema is versioned in `PRAGMA user_version`
//! like the catalog's.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::bench::BenchResult;

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE bench_jobs (
    id          INTEGER PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    against     TEXT NOT NULL,
    runs        INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    summary     TEXT NOT NULL,
    result_json TEXT NOT NULL
);
"#];

/// A job as `--list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    pub id: i64,
    pub created_at: i64,
    pub name: String,
    pub path: String,
    pub against: String,
    pub runs: i64,
    /// `ok` or `mismatch`.
    pub outcome: String,
    pub summary: String,
}

/// The default database of the invoking user.
pub fn default_path() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("optbin/bench.db"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --db FILE")?;
    Ok(PathBuf::from(home).join(".local/state/optbin/bench.db"))
}

/// Opens (creating and migrating) the job database.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut conn = Connection::open(path)
        .with_context(|| format!("opening the bench database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let current = current.max(0) as usize;
    anyhow::ensure!(
        current <= MIGRATIONS.len(),
        "{} is at schema version {current}, newer than this optbin knows",
        path.display()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).with_context(|| format!("bench database migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(conn)
}

/// Stores a finished job and returns its id.
pub fn insert(conn: &Connection, r: &BenchResult, now: i64) -> anyhow::Result<i64> {
    conn.execute(
        "INSERT INTO bench_jobs (created_at, name, path, against, runs, outcome, summary, result_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            now,
            r.name,
            r.path,
            r.arms.get(1).map(|a| a.label.as_str()).unwrap_or("-"),
            r.runs as i64,
            r.outcome(),
            r.summary(),
            serde_json::to_string(r)?,
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn list(conn: &Connection) -> anyhow::Result<Vec<JobRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, created_at, name, path, against, runs, outcome, summary
         FROM bench_jobs ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(JobRow {
            id: r.get(0)?,
            created_at: r.get(1)?,
            name: r.get(2)?,
            path: r.get(3)?,
            against: r.get(4)?,
            runs: r.get(5)?,
            outcome: r.get(6)?,
            summary: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The stored result of job `id`.
pub fn get(conn: &Connection, id: i64) -> anyhow::Result<Option<BenchResult>> {
    let json: Option<String> = conn
        .query_row("SELECT result_json FROM bench_jobs WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    json.map(|j| serde_json::from_str(&j).with_context(|| format!("job {id}'s stored result")))
        .transpose()
}

/// Removes job `id`; whether it existed.
pub fn remove(conn: &Connection, id: i64) -> anyhow::Result<bool> {
    Ok(conn.execute("DELETE FROM bench_jobs WHERE id = ?1", [id])? > 0)
}

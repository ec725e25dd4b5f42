//! The base tables: binaries by content, the paths they were seen at, their variants, the
//! user's pins and exclusions, and an event log.

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use crate::catalog::variant::{Pin, VariantKind, VariantState};
use crate::elf::ElfFacts;
use crate::identity::{ContentId, FileKey};

pub const SCHEMA: &str = r#"
CREATE TABLE binaries (
    id          INTEGER PRIMARY KEY,
    sha256      TEXT NOT NULL UNIQUE,
    build_id    TEXT,
    size        INTEGER NOT NULL,
    facts_json  TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);
CREATE TABLE paths (
    path        TEXT PRIMARY KEY,
    binary_id   INTEGER REFERENCES binaries(id) ON DELETE SET NULL,
    dev         INTEGER NOT NULL,
    ino         INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);
CREATE TABLE variants (
    id              INTEGER PRIMARY KEY,
    binary_id       INTEGER NOT NULL REFERENCES binaries(id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    store_path      TEXT NOT NULL,
    size            INTEGER NOT NULL,
    state           TEXT NOT NULL,
    bolt_version    TEXT,
    flags           TEXT,
    profile_samples INTEGER,
    created_at      INTEGER NOT NULL,
    note            TEXT
);
CREATE INDEX variants_by_binary ON variants(binary_id);
CREATE TABLE controls (
    path        TEXT PRIMARY KEY,
    pin         TEXT,
    excluded    INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    path        TEXT,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_path ON events(path, at);
"#;

/// A binary as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryRow {
    pub id: i64,
    pub sha256: ContentIdHex,
    pub size: u64,
    pub facts: ElfFacts,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// A content id as stored (hex text).
pub type ContentIdHex = String;

/// Records (or refreshes) a binary by content and returns its id.
pub fn upsert_binary(
    conn: &Connection,
    content: &ContentId,
    size: u64,
    facts: &ElfFacts,
    now: i64,
) -> anyhow::Result<i64> {
    let facts_json = serde_json::to_string(facts)?;
    conn.execute(
        "INSERT INTO binaries (sha256, build_id, size, facts_json, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT(sha256) DO UPDATE SET last_seen = excluded.last_seen,
                                           facts_json = excluded.facts_json",
        params![content.hex(), facts.build_id, size as i64, facts_json, now],
    )?;
    Ok(conn.query_row("SELECT id FROM binaries WHERE sha256 = ?1", [content.hex()], |r| r.get(0))?)
}

pub fn binary_by_id(conn: &Connection, id: i64) -> anyhow::Result<Option<BinaryRow>> {
    conn.query_row(
        "SELECT id, sha256, size, facts_json, first_seen, last_seen FROM binaries WHERE id = ?1",
        [id],
        binary_row,
    )
    .optional()?
    .transpose()
}

fn binary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<BinaryRow>> {
    let facts_json: String = r.get(3)?;
    let row = (|| -> anyhow::Result<BinaryRow> {
        Ok(BinaryRow {
            id: r.get(0)?,
            sha256: r.get(1)?,
            size: r.get::<_, i64>(2)? as u64,
            facts: serde_json::from_str(&facts_json)?,
            first_seen: r.get(4)?,
            last_seen: r.get(5)?,
        })
    })();
    Ok(row)
}

/// Where a binary was seen, with the stat key it had then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathRow {
    pub path: String,
    pub binary_id: Option<i64>,
    pub key: FileKey,
    pub seen_at: i64,
}

pub fn upsert_path(
    conn: &Connection,
    path: &str,
    binary_id: Option<i64>,
    key: &FileKey,
    now: i64,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO paths (path, binary_id, dev, ino, size, mtime_ns, ctime_ns, seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(path) DO UPDATE SET binary_id = excluded.binary_id, dev = excluded.dev,
            ino = excluded.ino, size = excluded.size, mtime_ns = excluded.mtime_ns,
            ctime_ns = excluded.ctime_ns, seen_at = excluded.seen_at",
        params![
            path,
            binary_id,
            key.dev as i64,
            key.ino as i64,
            key.size as i64,
            key.mtime_ns,
            key.ctime_ns,
            now
        ],
    )?;
    Ok(())
}

pub fn path_row(conn: &Connection, path: &str) -> anyhow::Result<Option<PathRow>> {
    Ok(conn
        .query_row(
            "SELECT path, binary_id, dev, ino, size, mtime_ns, ctime_ns, seen_at
             FROM paths WHERE path = ?1",
            [path],
            path_from_row,
        )
        .optional()?)
}

pub fn all_paths(conn: &Connection) -> anyhow::Result<Vec<PathRow>> {
    let mut stmt = conn.prepare(
        "SELECT path, binary_id, dev, ino, size, mtime_ns, ctime_ns, seen_at FROM paths
         ORDER BY path",
    )?;
    let rows = stmt.query_map([], path_from_row)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

fn path_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PathRow> {
    Ok(PathRow {
        path: r.get(0)?,
        binary_id: r.get(1)?,
        key: FileKey {
            dev: r.get::<_, i64>(2)? as u64,
            ino: r.get::<_, i64>(3)? as u64,
            size: r.get::<_, i64>(4)? as u64,
            mtime_ns: r.get(5)?,
            ctime_ns: r.get(6)?,
        },
        seen_at: r.get(7)?,
    })
}

/// A user's control over one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ControlRow {
    pub path: String,
    /// None: unpinned.
    pub pin: Option<Pin>,
    pub excluded: bool,
}

pub fn controls(conn: &Connection) -> anyhow::Result<Vec<ControlRow>> {
    let mut stmt = conn.prepare(
        "SELECT path, pin, excluded FROM controls WHERE pin IS NOT NULL OR excluded != 0
         ORDER BY path",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ControlRow { path: r.get(0)?, pin: r.get(1)?, excluded: r.get::<_, i64>(2)? != 0 })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub fn control_row(conn: &Connection, path: &str) -> anyhow::Result<Option<ControlRow>> {
    Ok(conn
        .query_row("SELECT path, pin, excluded FROM controls WHERE path = ?1", [path], |r| {
            Ok(ControlRow { path: r.get(0)?, pin: r.get(1)?, excluded: r.get::<_, i64>(2)? != 0 })
        })
        .optional()?)
}

pub fn set_pin(conn: &Connection, path: &str, pin: Option<Pin>, now: i64) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO controls (path, pin, excluded, updated_at) VALUES (?1, ?2, 0, ?3)
         ON CONFLICT(path) DO UPDATE SET pin = excluded.pin, updated_at = excluded.updated_at",
        params![path, pin, now],
    )?;
    Ok(())
}

pub fn set_excluded(conn: &Connection, path: &str, excluded: bool, now: i64) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO controls (path, pin, excluded, updated_at) VALUES (?1, NULL, ?2, ?3)
         ON CONFLICT(path) DO UPDATE SET excluded = excluded.excluded,
                                         updated_at = excluded.updated_at",
        params![path, excluded as i64, now],
    )?;
    Ok(())
}

/// A variant of a binary: a file in the store that may be served in place of the original.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantRow {
    pub id: i64,
    pub binary_id: i64,
    pub kind: VariantKind,
    pub sha256: String,
    pub store_path: String,
    pub size: u64,
    pub state: VariantState,
    pub bolt_version: Option<String>,
    pub flags: Option<String>,
    pub profile_samples: Option<i64>,
    pub created_at: i64,
    pub note: Option<String>,
}

/// What a new variant row needs; the id and timestamps are the catalog's.
#[derive(Debug, Clone)]
pub struct NewVariant {
    pub binary_id: i64,
    pub kind: VariantKind,
    pub sha256: String,
    pub store_path: String,
    pub size: u64,
    pub state: VariantState,
    pub bolt_version: Option<String>,
    pub flags: Option<String>,
    pub profile_samples: Option<i64>,
    pub note: Option<String>,
}

/// A BOLT build, ready to be measured: what most new variants are.
impl Default for NewVariant {
    fn default() -> Self {
        Self {
            binary_id: 0,
            kind: VariantKind::Bolt,
            sha256: String::new(),
            store_path: String::new(),
            size: 0,
            state: VariantState::Ready,
            bolt_version: None,
            flags: None,
            profile_samples: None,
            note: None,
        }
    }
}

pub fn insert_variant(conn: &Connection, v: &NewVariant, now: i64) -> anyhow::Result<i64> {
    conn.execute(
        "INSERT INTO variants (binary_id, kind, sha256, store_path, size, state, bolt_version,
                               flags, profile_samples, created_at, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            v.binary_id,
            v.kind,
            v.sha256,
            v.store_path,
            v.size as i64,
            v.state,
            v.bolt_version,
            v.flags,
            v.profile_samples,
            now,
            v.note
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn variants_of(conn: &Connection, binary_id: i64) -> anyhow::Result<Vec<VariantRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, binary_id, kind, sha256, store_path, size, state, bolt_version, flags,
                profile_samples, created_at, note
         FROM variants WHERE binary_id = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([binary_id], |r| {
            Ok(VariantRow {
                id: r.get(0)?,
                binary_id: r.get(1)?,
                kind: r.get(2)?,
                sha256: r.get(3)?,
                store_path: r.get(4)?,
                size: r.get::<_, i64>(5)? as u64,
                state: r.get(6)?,
                bolt_version: r.get(7)?,
                flags: r.get(8)?,
                profile_samples: r.get(9)?,
                created_at: r.get(10)?,
                note: r.get(11)?,
            })
        })?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the variants of binary {binary_id}"))?;
    Ok(rows)
}

pub fn set_variant_state(
    conn: &Connection,
    variant_id: i64,
    state: VariantState,
    note: Option<&str>,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE variants SET state = ?2, note = COALESCE(?3, note) WHERE id = ?1",
        params![variant_id, state, note],
    )?;
    Ok(())
}

/// Moves a variant from state `from` to `to` (with `note`, when given). Returns false, and
/// writes nothing, when the variant is no longer in `from`: someone else (a control
/// command, the fleet, the optimizer, a test) changed it since the caller read it, and a
/// decision made on the old state must not overwrite the new one.
pub fn transition_variant_state(
    conn: &Connection,
    variant_id: i64,
    from: VariantState,
    to: VariantState,
    note: Option<&str>,
) -> anyhow::Result<bool> {
    let changed = conn.execute(
        "UPDATE variants SET state = ?3, note = COALESCE(?4, note) WHERE id = ?1 AND state = ?2",
        params![variant_id, from, to, note],
    )?;
    Ok(changed == 1)
}

pub fn record_event(
    conn: &Connection,
    now: i64,
    path: Option<&str>,
    kind: &str,
    detail: &str,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO events (at, path, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now, path, kind, detail],
    )?;
    Ok(())
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    pub at: i64,
    pub path: Option<String>,
    pub kind: String,
    pub detail: String,
}

/// The newest events, newest first.
pub fn recent_events(conn: &Connection, limit: u32) -> anyhow::Result<Vec<EventRow>> {
    let mut stmt =
        conn.prepare("SELECT at, path, kind, detail FROM events ORDER BY id DESC LIMIT ?1")?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok(EventRow { at: r.get(0)?, path: r.get(1)?, kind: r.get(2)?, detail: r.get(3)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    #[test]
    fn binaries_paths_controls_round_trip() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let id = upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 10)?;
            let again = upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 20)?;
            assert_eq!(id, again);
            assert_eq!(binary_by_id(c, id)?.unwrap().last_seen, 20);
            let key = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 };
            upsert_path(c, "/usr/bin/x", Some(id), &key, 10)?;
            assert_eq!(path_row(c, "/usr/bin/x")?.unwrap().key, key);
            set_pin(c, "/usr/bin/x", Some(Pin::Original), 11)?;
            set_excluded(c, "/usr/bin/y", true, 11)?;
            let ctl = controls(c)?;
            assert_eq!(ctl.len(), 2);
            assert_eq!(ctl[0].pin, Some(Pin::Original));
            assert_eq!(control_row(c, "/usr/bin/y")?.unwrap().pin, None);
            set_pin(c, "/usr/bin/x", None, 12)?;
            set_excluded(c, "/usr/bin/y", false, 12)?;
            assert!(controls(c)?.is_empty());
            let vid = insert_variant(
                c,
                &NewVariant {
                    binary_id: id,
                    kind: VariantKind::Placed,
                    state: VariantState::Ready,
                    ..Default::default()
                },
                13,
            )?;
            set_variant_state(c, vid, VariantState::Served, Some("test"))?;
            assert_eq!(variants_of(c, id)?[0].state, VariantState::Served);
            Ok(())
        })
        .unwrap();
    }
}

//! Per-binary facts the optimizer's wiring judges by, read from the catalog: which content
//! is at a path now; what its profile says and whether it is a BOLT candidate are the
//! candidacy rules of `crate::bolt::applicability`, re-exported here.

use std::path::Path;

use rusqlite::Connection;

pub use crate::bolt::applicability::{Verdict, profile_numbers, verdict};
use crate::catalog::base;
use crate::identity::FileKey;

/// The indexed binary whose content is at `path` now (`key` is the file's current stat
/// key): None when the path was never indexed or changed since.
pub fn current_binary(
    conn: &Connection,
    path: &Path,
    key: &FileKey,
) -> anyhow::Result<Option<base::BinaryRow>> {
    let Some(row) = base::path_row(conn, &path.to_string_lossy())? else { return Ok(None) };
    match row.binary_id {
        Some(id) if row.key == *key => base::binary_by_id(conn, id),
        _ => Ok(None),
    }
}

//! Per-binary facts the optimizer's wiring judges by, read from the catalog: which content
//! is at a path now; what its profile says and whether it is a BOLT candidate are the
//! candidacy rules of `crate::bolt::applicability`, re-exported here.

use std::path::Path;

use rusqlite::Connection;

pub use crate::bolt::applicability::{Verdict, profile_numbers, verdict};
use crate::bolt::{OptimizeRequest, ProfileNumbers, RequestOrigin};
use crate::catalog::base;
use crate::identity::{ContentId, FileKey};

/// A build request for `binary` at `path` with the default flags from a profile of
/// `profile`'s size; a build from a previous version's profile or a challenger of the flag
/// search sets `stale` or `challenge` on it.
pub fn request(
    path: &Path,
    binary: base::BinaryRow,
    profile: ProfileNumbers,
    origin: RequestOrigin,
) -> anyhow::Result<OptimizeRequest> {
    let Some(content) = ContentId::parse(&binary.sha256) else {
        anyhow::bail!("binary {} has a malformed sha256 in the catalog", binary.id);
    };
    Ok(OptimizeRequest {
        binary_id: binary.id,
        name: path.to_string_lossy().into_owned(),
        original: path.to_path_buf(),
        content,
        facts: binary.facts,
        profile,
        origin,
        // optbin knows no command that is safe to run an arbitrary program with.
        smoke: None,
        stale: None,
        challenge: None,
    })
}

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

//! What each subsystem (profiler, optimizer, policy) offers the control directory: its
//! status section and per-binary details ([`SubsystemStatus`], filling the typed structs of
//! [`super::sections`] and [`super::details`]), per-binary files under
//! `bins/` ([`BinFiles`]), and the commands that reach beyond controls ([`CommandHooks`]).
//! Subsystems implement these; the daemon's wiring hands them to the status report and the
//! command handler, so no subsystem depends on the wiring.

use std::path::Path;

use super::ActionError;
use super::details::BinaryDetails;
use super::sections::MachineSections;

/// A subsystem's contribution to the status report.
pub trait SubsystemStatus: Send + Sync {
    /// The section name in `status.json` ("profiler", "optimizer", "policy").
    fn name(&self) -> &'static str;
    /// Fills this subsystem's machine-wide section (its field of `sections`; its `summary`
    /// is shown in the text status).
    fn section(&self, sections: &mut MachineSections);
    /// Fills this subsystem's part of a binary's status (its field of `details`; its
    /// `summary` is shown in the text table). Nothing to say: leave it `None`.
    fn binary(&self, conn: &rusqlite::Connection, binary_id: i64, details: &mut BinaryDetails);
    /// Why `path` (holding content `binary_id`) is served what it is, when this subsystem
    /// decides that (the policy does).
    fn served_reason(
        &self,
        _conn: &rusqlite::Connection,
        _binary_id: i64,
        _path: &str,
    ) -> Option<String> {
        None
    }
}

/// Files under `.optbin/bins/NAME/`.
pub trait BinFiles: Send + Sync {
    /// File names offered for every binary that has data (e.g. `profile.fdata`).
    fn names(&self, conn: &rusqlite::Connection, binary_id: i64) -> Vec<String>;
    fn contents(
        &self,
        conn: &rusqlite::Connection,
        binary_id: i64,
        file: &str,
    ) -> anyhow::Result<Option<Vec<u8>>>;
}

/// Several subsystems' files under `.optbin/bins/NAME/`; the first that knows a name
/// answers it.
pub struct BinFilesSet(pub Vec<std::sync::Arc<dyn BinFiles>>);

impl BinFiles for BinFilesSet {
    fn names(&self, conn: &rusqlite::Connection, binary_id: i64) -> Vec<String> {
        self.0.iter().flat_map(|f| f.names(conn, binary_id)).collect()
    }

    fn contents(
        &self,
        conn: &rusqlite::Connection,
        binary_id: i64,
        file: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        for f in &self.0 {
            if let Some(bytes) = f.contents(conn, binary_id, file)? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }
}

/// Hooks into subsystems for the commands that reach beyond controls.
pub trait CommandHooks: Send + Sync {
    /// Queue an optimization of `path` now. The error is a sentence for `last_error`.
    fn optimize(&self, path: &Path) -> Result<String, ActionError>;
    /// Forget profile, variants and measurements of `path`'s current content.
    fn reset(&self, path: &Path) -> Result<String, ActionError>;
}

/// A subsystem's `details` entry for one binary as `status.json` shows it (tests check the
/// JSON shape users and scripts read).
#[cfg(test)]
pub fn binary_json(
    s: &dyn SubsystemStatus,
    conn: &rusqlite::Connection,
    binary_id: i64,
) -> Option<serde_json::Value> {
    let mut details = BinaryDetails::default();
    s.binary(conn, binary_id, &mut details);
    serde_json::to_value(&details).ok()?.get(s.name()).cloned()
}

/// A subsystem's machine-wide section as `status.json` shows it (tests check the JSON shape
/// users and scripts read).
#[cfg(test)]
pub fn section_json(s: &dyn SubsystemStatus) -> serde_json::Value {
    let mut sections = MachineSections::default();
    s.section(&mut sections);
    let json = serde_json::to_value(&sections).expect("a section serializes");
    json.get(s.name()).cloned().unwrap_or_else(|| panic!("no {} section", s.name()))
}

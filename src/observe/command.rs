//! `optbin use [--since DURATION]`: the USE summary now (two readings one second apart), or
//! over a past period from the history the daemon keeps in its catalog.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::{history, host};
use crate::clock::{Clock, SystemClock};

/// The text (or JSON) `optbin use` prints.
pub fn use_command(
    since: Option<Duration>,
    state_dir: &Path,
    json: bool,
) -> anyhow::Result<String> {
    let now = SystemClock.unix_secs();
    match since {
        None => {
            let before = host::HostSnapshot::read(Path::new("/")).context("reading /proc")?;
            std::thread::sleep(Duration::from_secs(1));
            let after = host::HostSnapshot::read(Path::new("/")).context("reading /proc")?;
            let summary = host::summarize(&before, &after, now, &|| host::top_resident(3));
            Ok(if json {
                serde_json::to_string_pretty(&summary)? + "\n"
            } else {
                host::render_text(&summary)
            })
        }
        Some(period) => {
            let path = state_dir.join("catalog.db");
            anyhow::ensure!(
                path.exists(),
                "no catalog at {}: the USE history is kept by a running daemon (see --state-dir)",
                path.display()
            );
            let conn = rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .with_context(|| format!("opening {}", path.display()))?;
            conn.busy_timeout(Duration::from_secs(5))?;
            let from = now - period.as_secs() as i64;
            let rows = history::since(&conn, from).with_context(|| {
                format!(
                    "reading the USE history from {} (a catalog of an older optbin?)",
                    path.display()
                )
            })?;
            let agg = history::aggregate(&rows);
            Ok(if json {
                serde_json::to_string_pretty(&serde_json::json!({
                    "from": from, "to": now, "summaries": rows.len(), "resources": agg,
                }))? + "\n"
            } else {
                history::render_period(&agg, rows.len(), from, now)
            })
        }
    }
}

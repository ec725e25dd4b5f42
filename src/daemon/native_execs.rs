//! Execs of binaries the mount passes through until they have a variant
//! (`ServingTable::set_native_until_variant`), and of any overlaid binary started by its
//! real path. They make no request through the mount, so
//! the measurer's process events are where the daemon hears of them ([`hook`]): each is
//! counted per path ([`NativeExecs`]: status shows the count, and instrumentation mode
//! needs a binary to have run at least once) and handed to the warmer, which would
//! otherwise learn of an exec from the overlay's `OPEN`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::in_overlaid_dir;
use crate::fs::ServingTable;
use crate::measure::ExecHook;
use crate::warm::Warmer;

/// Execs of the real files of overlaid binaries (run natively, not through a served file)
/// since this server process started, by original path (at most one entry per binary of
/// the overlaid directories).
///
/// Counted by the measurer's real-time thread, read by status: both take the read lock
/// (the count is an atomic), so neither waits for the other; only a binary's first exec
/// takes the write lock, and only that thread writes.
#[derive(Debug, Default)]
pub struct NativeExecs {
    counts: RwLock<HashMap<PathBuf, AtomicU64>>,
}

impl NativeExecs {
    pub fn note(&self, original: &Path) {
        if let Some(n) = read(&self.counts).get(original) {
            n.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut counts = self.counts.write().unwrap_or_else(|e| e.into_inner());
        counts.entry(original.to_path_buf()).or_default().fetch_add(1, Ordering::Relaxed);
    }

    /// Execs of `original` noted so far.
    pub fn count(&self, original: &Path) -> u64 {
        read(&self.counts).get(original).map_or(0, |n| n.load(Ordering::Relaxed))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Plain counter updates: a panic while holding the lock leaves consistent data.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// The measurer's exec hook: an exec whose executable is the real file of a binary of an
/// overlaid directory (not excluded when the exec completed) is counted and told to the
/// warmer. Whatever the serving table serves by the time the event is handled: an exec of a
/// served file through the mount has the mount's path as its executable (it is measured
/// instead), so an exec of the real file ran natively, passed through by the mount or
/// started by its real path, also one that raced with a switch to a served variant; and an
/// exec just before an exclusion counts, by its kernel timestamp, even if its event is
/// handled after. Execs of anything else (excluded and foreign binaries are not kept warm)
/// are dropped after a comparison or two. Runs on the measurer's thread: a map update and
/// a channel send.
pub fn hook(
    execs: Arc<NativeExecs>,
    warmer: Arc<Warmer>,
    table: Arc<ServingTable>,
    overlay_dirs: Vec<PathBuf>,
) -> ExecHook {
    Box::new(move |pid, exe, at_ns| {
        if in_overlaid_dir(&overlay_dirs, exe) && !table.was_excluded_at(exe, at_ns) {
            execs.note(exe);
            warmer.note_exec(exe.to_path_buf(), pid);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_path() {
        let execs = NativeExecs::default();
        execs.note(Path::new("/usr/bin/a"));
        execs.note(Path::new("/usr/bin/a"));
        execs.note(Path::new("/usr/bin/b"));
        assert_eq!(execs.count(Path::new("/usr/bin/a")), 2);
        assert_eq!(execs.count(Path::new("/usr/bin/b")), 1);
        assert_eq!(execs.count(Path::new("/usr/bin/c")), 0);
    }
}

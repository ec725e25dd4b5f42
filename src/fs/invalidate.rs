//! Invalidation of the kernel's cached entries when something changes underneath (inotify)
//! or in the serving table. From daemon threads the notification goes straight to the
//! kernel, so that `ServingTable::serve` returning means the next exec sees the change;
//! from inside a FUSE request it is queued to a worker (the kernel may be waiting for a
//! reply of ours on the same directory).

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::Arc;

use crate::fs::node::PATH_VIEW_ID;
use crate::fs::{Invalidator, Overlay};

/// Where invalidations go: straight to the kernel from daemon threads, through a worker
/// from request threads (the kernel may be waiting for a reply on the same directory).
pub(super) struct Invalidations {
    pub(super) direct: Arc<dyn Invalidator>,
    pub(super) queued: std::sync::mpsc::Sender<(u64, OsString)>,
}

thread_local! {
    static IN_REQUEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` marked as serving a FUSE request (the adapter wraps every core call in it), so
/// that invalidations it triggers are queued instead of sent from this thread.
pub fn in_request<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_REQUEST.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_REQUEST.with(|c| c.replace(true)));
    f()
}

impl Overlay {
    pub(super) fn send_invalidation(&self, parent: u64, name: &OsStr) {
        let target = self
            .invalidations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|i| (i.direct.clone(), i.queued.clone()));
        let Some((direct, queued)) = target else { return };
        if IN_REQUEST.with(|c| c.get()) {
            let _ = queued.send((parent, name.to_os_string()));
        } else {
            // Synchronous: when `ServingTable::serve` returns, the next exec sees the change.
            direct.inval_entry(parent, name);
        }
    }

    /// Something changed in real directory `dir` (name `name`, or everything if None).
    pub(crate) fn invalidate_real(&self, dir: &Path, name: Option<&OsStr>) {
        let names: Vec<OsString> = match name {
            Some(n) => vec![n.to_os_string()],
            None => std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
                .unwrap_or_default(),
        };
        if name.is_none()
            && let (Some(parent), Some(own)) = (dir.parent(), dir.file_name())
            && let Some(parent_ino) = self.tree_ino(parent)
        {
            // The directory itself changed (e.g. chmod): its attributes, which the kernel
            // checks permissions against, are refreshed by the next lookup.
            self.send_invalidation(parent_ino, own);
        }
        let tree_ino = self.tree_ino(dir);
        let in_path_view = self.layout.dirs.iter().any(|d| d.path == dir);
        for n in &names {
            if let Some(ino) = tree_ino {
                self.send_invalidation(ino, n);
            }
            if in_path_view {
                self.send_invalidation(PATH_VIEW_ID, n);
            }
        }
    }

    pub(super) fn invalidate_original(&self, original: &Path) {
        if let (Some(dir), Some(name)) = (original.parent(), original.file_name()) {
            self.invalidate_real(dir, Some(name));
        }
    }

    pub(super) fn tree_ino(&self, real: &Path) -> Option<u64> {
        self.layout.tree.contains_key(real).then(|| self.intern_tree(real).attr.ino)
    }
}

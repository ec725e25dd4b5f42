//! What the overlay tells the daemon: opens of served files (exec or read) and binaries seen
//! for the first time. Delivery never blocks a request: sinks must be non-blocking.

use std::path::PathBuf;

use crate::identity::FileKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsEvent {
    /// A served file was opened. `exec` is true for the kernel's exec-time open.
    Opened {
        /// The path inside the mount (`<mount>/usr/bin/x`).
        mirror_path: PathBuf,
        original: PathBuf,
        /// The file whose bytes were opened: the original, or the variant in the store.
        backing: PathBuf,
        key: FileKey,
        variant_id: Option<i64>,
        pid: u32,
        exec: bool,
    },
    /// An x86-64 ELF file (served or not: stripped ones too) was looked up for the first
    /// time in this version; the daemon may hash and index it in the background.
    Seen { original: PathBuf, key: FileKey },
}

/// Receives [`FsEvent`]s. Called on request threads: must return at once.
pub trait EventSink: Send + Sync {
    fn event(&self, event: FsEvent);
}

impl EventSink for std::sync::mpsc::Sender<FsEvent> {
    fn event(&self, event: FsEvent) {
        // A dropped receiver means nobody listens any more; the overlay keeps serving.
        let _ = self.send(event);
    }
}

impl EventSink for tokio::sync::mpsc::UnboundedSender<FsEvent> {
    fn event(&self, event: FsEvent) {
        let _ = self.send(event);
    }
}

/// A sink that drops everything.
#[derive(Debug, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn event(&self, _event: FsEvent) {}
}

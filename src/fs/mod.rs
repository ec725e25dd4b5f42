//! The overlay core, testable without FUSE: what the mount shows (the PATH view, the
//! mirrors of the overlay dirs, the control directory), which bytes each served file has
//! (the serving table), and the events the daemon learns from (opens, binaries seen).
//!
//! The FUSE adapter (`crate::fuse`) only translates requests to [`Overlay`] calls.
//!
//! Invariants:
//! - a node id always serves the same bytes (a new variant or a new version of the
//!   original is a new id, see [`node`]), and ids are the same in a restarted process;
//! - nothing on the exec path touches SQLite or hashes file contents;
//! - setuid/setgid files, scripts, stripped or foreign binaries, unreadable files and
//!   excluded paths reach the user unchanged, as symlinks to the real files.

mod classify;
mod control;
mod events;
mod layout;
pub mod node;
mod overlay;
mod serving;
mod watch;

pub use classify::{Classifier, Presentation, Sniffed};
pub use control::{ControlFile, ControlPlane, StaticControl};
pub use events::{EventSink, FsEvent, NoEvents};
pub use layout::{
    CONTROL_DIR, Layout, OverlayConfig, OverlayDir, PATH_VIEW, absolute_mountpoint,
    canonicalize_outside,
};
pub use node::{Attr, FileNode, NodeType};
pub use overlay::{
    DirEntry, Entry, FMODE_EXEC, Invalidator, LONG_TTL, Opened, Overlay, SeenBinary, in_request,
};
pub use serving::{Choice, ServedVariant, ServingTable, TableChooser, VariantChooser};

#[cfg(test)]
mod tests;

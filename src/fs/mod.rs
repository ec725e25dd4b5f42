//! The overlay core, testable without FUSE: what the mount shows (the PATH view, the
//! mirrors of the overlay dirs, the control directory), which bytes each served file has
//! (the serving table), and the events the daemon learns from (opens, binaries seen).
//!
//! The FUSE adapter (`crate::fuse`) only translates requests to [`Overlay`] calls.
//!
//! # Layout of a mount at `M`
//! - `M/bin/NAME`: symlink to `M/<D>/NAME` for the first overlay dir `D` holding `NAME`
//!   as an executable non-directory (PATH order, as bash does);
//! - `M/<D>/NAME` (e.g. `M/usr/bin/rustc`): an x86-64 ELF with a symbol table, not
//!   setuid/setgid, readable, not excluded, is a read-only regular file with the original's
//!   mode (minus write bits), owner and times, whose bytes are the chosen variant's (the
//!   original by default). Real symlinks are mirrored verbatim (relative ones stay in the
//!   mirror, so `argv[0]` of busybox-style aliases is kept; absolute ones, e.g.
//!   `/etc/alternatives/...`, lead out of the mount and run natively). Everything else is
//!   a symlink to the real path;
//! - the directories on the way (`M/usr`) are read-only; their other entries are
//!   symlinks to the real ones (`M/usr/lib -> /usr/lib`), so `$ORIGIN/../lib` and
//!   `/proc/self/exe`-relative lookups work;
//! - `M/.optbin/...`: whatever the [`ControlPlane`] lists;
//! - an overlay dir that would collide with `M/bin` or `M/.optbin` (a real `/bin`, not a
//!   symlink) cannot be mirrored: its PATH view entries point at the real files (served
//!   unoptimized).
//!
//! # API for the daemon
//! - [`Overlay::new`]`(OverlayConfig { mountpoint, overlay_dirs, originals }, serving, chooser,
//!   control, events)`; then `crate::fuse::run_supervised` / `mount_background` attach it;
//! - [`ServingTable::serve`]`(original, Some(variant) | None)`,
//!   [`ServingTable::set_excluded`], [`ServingTable::remember`] (variants served before a
//!   restart): each change invalidates the kernel's entries before returning (when called
//!   from a daemon thread; from inside a FUSE request, e.g. a control write, it is queued);
//! - [`VariantChooser`] for per-exec choices (canaries): `Choice { per_exec: true }` gives
//!   the entry TTL 0, so every exec asks again;
//! - [`Overlay::resolve_name`] (`node` or an absolute path -> the original's real path),
//!   [`Overlay::seen_binaries`], [`Overlay::original_of`] (a path from `/proc/PID/maps` or
//!   perf mmap events -> original and variant served now), [`Overlay::file_node`] (the
//!   inode of `/proc/PID/exe` is the node id: exactly the bytes that process runs);
//! - events: [`FsEvent::Opened`] on every open of a served file (`exec` for execve's
//!   open), [`FsEvent::Seen`] the first time an x86-64 ELF version is looked up; any
//!   [`EventSink`] (`std::sync::mpsc::Sender<FsEvent>`, tokio's `UnboundedSender`).
//!
//! Invariants:
//! - a node id always serves the same bytes (a new variant or a new version of the
//!   original is a new id, see [`node`]), and ids are the same in a restarted process;
//! - nothing on the exec path touches SQLite or hashes file contents;
//! - setuid/setgid files, scripts, stripped or foreign binaries, unreadable files and
//!   excluded paths reach the user unchanged, as symlinks to the real files.

mod access;
pub mod acl;
mod classify;
mod control;
mod events;
mod handles;
mod invalidate;
mod layout;
mod namespace;
pub mod node;
mod overlay;
mod serving;
mod snapshot;
mod watch;

pub use access::Caller;
pub use classify::{Classifier, Presentation, Sniffed};
pub use control::{ControlFile, ControlPlane, StaticControl};
pub use events::{EventSink, FsEvent, NoEvents};
pub use handles::{DirectoryReplier, Handle, HandleTable, RETAINED_BACKINGS, read_full};
pub use invalidate::in_request;
pub use layout::{
    CONTROL_DIR, Layout, OverlayConfig, OverlayDir, PATH_VIEW, absolute_mountpoint,
    canonicalize_outside, runs_from_path,
};
pub use node::{Attr, FileNode, NodeType};
pub use overlay::{
    DirEntry, Entry, FMODE_EXEC, Invalidator, LONG_TTL, MappedOriginal, Opened, Overlay, SeenBinary,
};
pub use serving::{
    Bind, Bindable, Choice, ExecRun, ServedVariant, ServingTable, TableChooser, VariantChooser,
};
pub use snapshot::Snapshots;

#[cfg(test)]
mod tests;

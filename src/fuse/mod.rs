//! The FUSE side of the overlay: a thin `fuser` adapter over [`crate::fs::Overlay`],
//! mounting and unmounting, stale-mount cleanup, and the crash-proof supervisor that keeps
//! the mount answering while the server restarts.
//!
//! Entry points:
//! - [`run_supervised`]: the daemon's way to mount (forks; call before any thread exists);
//! - [`mount_background`]: an in-process mount for tests and tools, unmounted on drop;
//! - [`unmount`]: `optbin umount` (lazy if busy);
//! - [`bind`]: read-only bind mounts of variant files over mirror entries;
//! - [`holder::run`]: `optbin hold`, the keeper of the connection outside systemd;
//! - [`mount_state`] / [`prepare_mountpoint`]: what is at a mountpoint, stale-mount cleanup.

mod adapter;
pub mod bind;
pub mod connection;
pub mod fdstore;
pub mod holder;
mod mount;
pub mod safe_mode;
mod supervisor;

pub use adapter::{NotifierInvalidator, OptbinFs};
pub use mount::{
    FS_NAME, MountEntry, MountGuard, MountOptions, MountState, SupervisorSettings, Unmounted,
    mount_background, mount_entry, mount_state, prepare_mountpoint, unmount, unmount_forcibly,
    unmount_lazily,
};
pub use supervisor::{ServeContext, Served, run_supervised};

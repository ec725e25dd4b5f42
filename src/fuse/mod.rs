//! The FUSE side of the overlay: a thin `fuser` adapter over [`crate::fs::Overlay`],
//! mounting and unmounting, stale-mount cleanup, and the crash-proof supervisor that keeps
//! the mount answering while the server restarts.
//!
//! Entry points:
//! - [`run_supervised`]: the daemon's way to mount (forks; call before any thread exists);
//! - [`mount_background`]: an in-process mount for tests and tools, unmounted on drop;
//! - [`unmount`]: `optbin umount` (lazy if busy);
//! - [`mount_state`] / [`prepare_mountpoint`]: what is at a mountpoint, stale-mount cleanup.

mod adapter;
mod mount;
mod supervisor;

pub use adapter::{NotifierInvalidator, OptbinFs, Shared};
pub use mount::{
    FS_NAME, MountGuard, MountOptions, MountState, Unmounted, mount_background, mount_state,
    prepare_mountpoint, unmount,
};
pub use supervisor::{ServeContext, Served, run_supervised};

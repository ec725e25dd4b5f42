//! Read-only bind mounts of single files over entries of the mount, and the mounts found
//! under the mount: the mechanism by which a steadily served variant runs with no FUSE
//! request at all (`crate::daemon::serving::binding` decides when).
//!
//! A file bind-mounted over a mirror entry is what every path walk through that entry
//! reaches: an exec opens the variant's file on its own filesystem, the kernel asks the
//! FUSE server nothing, and `/proc/PID/exe` still names the path inside the mount (a bind
//! mount's path is where it is mounted). The kernel detaches it by itself when the entry
//! is invalidated (`d_invalidate` detaches the mounts on a dentry), so any change the
//! overlay announces (an upgrade underneath, a new decision) ends it at once.
//!
//! The mount is built detached (`open_tree(OPEN_TREE_CLONE)`), made read-only, `nosuid` and
//! `nodev` (`mount_setattr`), handed to the caller to mark (fanotify), and only then moved
//! into place (`move_mount`): it is never visible writable or unmarked.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
use rustix::mount::{MoveMountFlags, OpenTreeFlags, UnmountFlags, move_mount, open_tree};

/// A file bind-mounted read-only over a path. Dropping it leaves the mount (the server may
/// hand over to the next one); [`BoundFile::detach`] removes it.
#[derive(Debug)]
pub struct BoundFile {
    /// The mount itself (an `O_PATH` descriptor of its root): detached through it, never
    /// through a path walk of the mount (which could wait on a stopped server).
    tree: OwnedFd,
    target: PathBuf,
}

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// Bind-mounts `source` (a regular file) over `target` read-only, `nosuid`, `nodev`.
/// `before_attach` gets a readable descriptor of the new mount's root before anything can
/// reach it through `target` (for a fanotify mount mark).
pub fn attach_read_only(
    source: &Path,
    target: &Path,
    before_attach: impl FnOnce(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<BoundFile> {
    let tree =
        open_tree(CWD, source, OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // libc: rustix has no mount_setattr.
    // SAFETY: a valid descriptor, an empty NUL-terminated path, and a live struct of the
    // size passed; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // fanotify marks need a real open file, not the O_PATH tree: reopen it through procfs
    // (same mount, same file).
    let readable = std::fs::File::open(format!("/proc/self/fd/{}", tree.as_raw_fd()))?;
    before_attach(readable.as_fd())?;
    drop(readable);
    move_mount(tree.as_fd(), "", CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
    Ok(BoundFile { tree, target: target.to_path_buf() })
}

impl BoundFile {
    /// Whether the mount is still where it was put: the kernel detaches it when the entry
    /// under it is invalidated. Stats the target (the mount when attached, else the entry
    /// of the mount under it).
    pub fn is_attached(&self) -> bool {
        let own = statx(&self.tree, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID);
        let there = statx(CWD, &self.target, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID);
        matches!((own, there), (Ok(a), Ok(b)) if a.stx_mnt_id == b.stx_mnt_id)
    }

    /// Removes the mount (lazily: a program running from it keeps its file). Already
    /// detached by the kernel is not an error.
    pub fn detach(self) -> io::Result<()> {
        // The magic link resolves to the mount's root without walking the FUSE mount.
        let path = format!("/proc/self/fd/{}", self.tree.as_raw_fd());
        match rustix::mount::unmount(path.as_str(), UnmountFlags::DETACH) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The mount points strictly below `mountpoint` in this mount namespace, deepest first.
pub fn submounts(mountpoint: &Path) -> io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| Some(PathBuf::from(super::mount::unescape(line.split(' ').nth(4)?))))
        .filter(|p| p != mountpoint && p.starts_with(mountpoint))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Lazily unmounts every mount below `mountpoint` (bind mounts a previous server left, or
/// the ones of a server stopping); returns how many went. Each is a path walk through the
/// mount: call it while a server answers.
pub fn detach_submounts(mountpoint: &Path) -> usize {
    let Ok(found) = submounts(mountpoint) else { return 0 };
    found
        .iter()
        .filter(|p| {
            match rustix::mount::unmount(p.as_path(), UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(path = %p.display(), error = %e, "could not detach a mount");
                    false
                }
            }
        })
        .count()
}

//! Hearing the execs of bind-mounted variants ([`ExecMarks`]): a fanotify group with an
//! `FAN_OPEN_EXEC` mark on each bind mount (`crate::fuse::bind`).
//!
//! A bound variant's exec makes no FUSE request, so nothing registers its run while the
//! process is blocked in execve. The kernel queues a fanotify event in the exec's open
//! instead (a notification: the exec does not wait for us), with the pid; the measurer's
//! thread drains the queue after each read of process events and before it handles them.
//! The event was queued before the exec completed, so before the process's exec and exit
//! events were sent: every bound run is registered before its exit is handled, and is
//! followed to its exit like a run registered in an `OPEN`.
//!
//! Mount marks, not inode marks: only execs through the bind mount count, not a run of
//! the store file by its own path (verification runs it).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fanotify group for exec-time opens through marked mounts.
#[derive(Debug)]
pub struct ExecMarks {
    group: OwnedFd,
    overflows: AtomicU64,
}

/// One exec through a marked mount: who, and the file it opened (device and inode: an
/// `fstat` of the event's descriptor, cheaper than naming it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkedExec {
    pub pid: i32,
    pub file: (u64, u64),
}

impl ExecMarks {
    /// A new group (needs CAP_SYS_ADMIN).
    pub fn new() -> io::Result<Self> {
        // libc: rustix has no fanotify.
        // SAFETY: plain flags; the returned descriptor is checked and then owned.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just returned, owned by nobody else.
        Ok(Self { group: unsafe { OwnedFd::from_raw_fd(fd) }, overflows: AtomicU64::new(0) })
    }

    /// Marks the mount `file` is on: each exec-time open through it queues an event.
    pub fn mark_mount(&self, file: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: valid descriptors; a null path makes the kernel use `file`'s own path.
        let r = unsafe {
            libc::fanotify_mark(
                self.group.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                libc::FAN_OPEN_EXEC,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Appends the execs queued so far; never blocks.
    pub fn drain(&self, out: &mut Vec<MarkedExec>) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a live buffer of the length passed.
            let n =
                unsafe { libc::read(self.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return; // EAGAIN: nothing queued (or an error there is nothing to do about)
            }
            let n = n as usize;
            let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
            let mut at = 0;
            while at + meta_len <= n {
                // SAFETY: `meta_len` bytes are within the buffer; read unaligned.
                let meta: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let len = meta.event_len as usize;
                if len < meta_len || at + len > n {
                    break;
                }
                at += len;
                if meta.fd < 0 {
                    if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
                        self.overflows.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                // SAFETY: the kernel opened this descriptor for us; we own it now.
                let file = unsafe { OwnedFd::from_raw_fd(meta.fd) };
                if let Ok(st) = rustix::fs::fstat(&file) {
                    out.push(MarkedExec { pid: meta.pid, file: (st.st_dev, st.st_ino) });
                }
            }
        }
    }

    /// Times the kernel's queue overflowed (events of bound execs lost, runs not followed).
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }
}

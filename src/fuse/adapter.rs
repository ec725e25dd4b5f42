//! The thin `fuser::Filesystem` adapter: maps each request's arguments to a call of the
//! overlay core ([`Overlay`] and its [`HandleTable`]: handles, reads, listings), maps errors
//! to errnos (logged: refusals a user can trigger at debug level, faults as warnings) and
//! replies. What stays here is what needs fuser's types: registering FUSE passthrough
//! backing ids, and the reply buffers. It never panics into fuser (a panic in the core
//! becomes EIO).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::error::{FsResult, errno_name};
use crate::fs::{
    Attr, Caller, DirectoryReplier, Handle, HandleTable, Invalidator, NodeType, Opened, Overlay,
};

pub struct OptbinFs {
    /// The core every request goes to. `None` only in the adapter that answers the kernel's
    /// INIT for the supervisor before any overlay exists ([`OptbinFs::handshake_only`]): no
    /// request past INIT ever reaches it, and one that did would get EIO.
    overlay: Option<Arc<Overlay>>,
    /// Server process generation, in the top bits of file handles so that a restarted
    /// server never reuses a handle number a previous one gave out.
    generation: u64,
    handles: HandleTable<BackingId>,
    /// Whether to ask the kernel for passthrough at all.
    want_passthrough: bool,
    /// Whether the kernel granted it.
    passthrough: AtomicBool,
}

impl OptbinFs {
    /// The adapter over `overlay`, for the server process of `generation`.
    pub fn new(overlay: Arc<Overlay>, generation: u64, want_passthrough: bool) -> Self {
        Self::with_overlay(Some(overlay), generation, want_passthrough)
    }

    /// An adapter with no core, only to answer the kernel's INIT (the supervisor's handshake
    /// on a new mount, before the first server builds its overlay).
    pub fn handshake_only(want_passthrough: bool) -> Self {
        Self::with_overlay(None, 0, want_passthrough)
    }

    fn with_overlay(
        overlay: Option<Arc<Overlay>>,
        generation: u64,
        want_passthrough: bool,
    ) -> Self {
        Self {
            overlay,
            generation,
            handles: HandleTable::default(),
            want_passthrough,
            passthrough: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the overlay, turning a missing overlay or a panic into EIO.
    fn with<T>(&self, what: &str, f: impl FnOnce(&Overlay) -> FsResult<T>) -> Result<T, Errno> {
        raise_request_thread_priority();
        let Some(overlay) = self.overlay.as_deref() else {
            tracing::error!(what, "request before the overlay was set up");
            return Err(Errno::EIO);
        };
        match catch_unwind(AssertUnwindSafe(|| crate::fs::in_request(|| f(overlay)))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_user_refusal(e.errno) {
                    tracing::debug!(what, errno = errno_name(e.errno), error = %e, "request refused");
                } else {
                    tracing::warn!(what, errno = errno_name(e.errno), error = %e, "request failed");
                }
                Err(Errno::from_i32(e.errno))
            }
            Err(_) => {
                tracing::error!(what, "panic in the overlay core: answered EIO");
                Err(Errno::EIO)
            }
        }
    }

    fn generation(&self) -> u64 {
        self.generation
    }
}

/// Whether a refusal is the answer to what the caller asked (a name that is not there, a
/// permission the caller lacks, a write to the read-only mount, a path that is too long or
/// loops, a bad control command, a binary replaced under a lookup...) rather than a fault of
/// ours. Any user can trigger those at will, as often as they like: they are logged at
/// debug level, so that no user can grow the log. Everything else (EIO, ENOSPC, EMFILE...)
/// is unexpected and warned about.
fn is_user_refusal(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT
            | libc::EACCES
            | libc::EPERM
            | libc::EROFS
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::EINVAL
            | libc::EEXIST
            | libc::ENOTEMPTY
            | libc::ENODATA
            | libc::ENOSYS
            | libc::ENOTTY
            | libc::EBADF
            | libc::ESTALE
            | libc::EAGAIN
            | libc::EBUSY
            | libc::EXDEV
            | libc::EFBIG
    )
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

/// fuser's directory reply buffer as the core's [`DirectoryReplier`].
struct DirectoryReply<'a>(&'a mut ReplyDirectory);

impl DirectoryReplier for DirectoryReply<'_> {
    fn add(&mut self, ino: u64, offset: u64, kind: NodeType, name: &OsStr) -> bool {
        self.0.add(INodeNo(ino), offset, file_type(kind), name)
    }
}

/// The nice value of request threads. An exec through the mount waits for one request
/// (OPEN) to be answered: on a busy machine the wait for a CPU dominates its cost, so the
/// threads answering get a larger share, like kernel work would. Background work of the
/// daemon (hashing, BOLT) runs on other threads and is not affected.
const REQUEST_THREAD_NICE: i32 = -10;

thread_local! {
    static PRIORITY_RAISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn raise_request_thread_priority() {
    if PRIORITY_RAISED.with(|p| p.replace(true)) {
        return;
    }
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), REQUEST_THREAD_NICE) {
        tracing::debug!(error = %std::io::Error::from(e), "cannot raise the request thread priority");
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(k: NodeType) -> FileType {
    match k {
        NodeType::Directory => FileType::Directory,
        NodeType::RegularFile => FileType::RegularFile,
        NodeType::Symlink => FileType::Symlink,
    }
}

/// Sends invalidations through fuser's notifier.
pub struct NotifierInvalidator(pub fuser::Notifier);

impl Invalidator for NotifierInvalidator {
    fn inval_entry(&self, parent: u64, name: &OsStr) {
        match self.0.inval_entry(INodeNo(parent), name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::debug!(parent, ?name, error = %e, "inval_entry"),
        }
    }
}

const READ_ONLY: Errno = Errno::EROFS;

impl Filesystem for OptbinFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Passthrough: reads and mmap of served files go straight to the backing file.
        if self.want_passthrough && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
            // 2: the backing files may themselves live on a stacked filesystem (overlayfs).
            if config.set_max_stack_depth(2).is_ok() {
                self.passthrough.store(true, Ordering::SeqCst);
            }
        }
        if !self.passthrough.load(Ordering::SeqCst) {
            tracing::warn!("no FUSE passthrough: reads are served by optbin, kernel-cached");
        }
        for optional in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // The kernel's permission check reads each node's ACL (Overlay::acl): the real
            // files' and directories' ACLs stop or admit the same users on the mount.
            InitFlags::FUSE_POSIX_ACL,
        ] {
            let _ = config.add_capabilities(optional);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with("lookup", |o| o.lookup_as(parent.0, name, &caller(req))) {
            Ok(e) => {
                reply.entry_with_ttls(&e.attr_ttl, &e.entry_ttl, &file_attr(&e.attr), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with("getattr", |o| o.getattr(ino.0)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let only_truncate = size == Some(0)
            && mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && atime.is_none()
            && mtime.is_none();
        if !only_truncate {
            return reply.error(READ_ONLY);
        }
        match self.with("setattr", |o| o.setattr_truncate(ino.0)) {
            Ok(attr) => reply.attr(&Duration::ZERO, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with("readlink", |o| o.readlink(ino.0)) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(READ_ONLY);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(READ_ONLY);
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(READ_ONLY);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(READ_ONLY);
    }

    fn symlink(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(READ_ONLY);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(READ_ONLY);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(READ_ONLY);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(READ_ONLY);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Fast path: the backing of this node is still registered; its bytes are the node's.
        if self.passthrough.load(Ordering::Relaxed)
            && let Some(id) = self.handles.retained(ino.0)
        {
            if let Err(e) = self.with("open", |o| o.open_again(ino.0, flags.0, req.pid())) {
                return reply.error(e);
            }
            let handle = Handle::Binary { file: None, backing: Some(id.clone()) };
            let fh = self.handles.insert(self.generation(), handle);
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id);
        }
        let opened = match self.with("open", |o| o.open(ino.0, flags.0, req.pid())) {
            Ok(opened) => opened,
            Err(e) => return reply.error(e),
        };
        match opened {
            Opened::Binary { file, .. } => {
                let file = Arc::new(file);
                let backing = if self.passthrough.load(Ordering::Relaxed) {
                    match self.handles.backing_of(ino.0) {
                        Some(id) => Some(id),
                        None => match reply.open_backing(&*file) {
                            Ok(id) => Some(self.handles.register_backing(ino.0, Arc::new(id))),
                            Err(e) => {
                                tracing::warn!(error = %e, "passthrough refused: serving reads");
                                None
                            }
                        },
                    }
                } else {
                    None
                };
                let handle = Handle::Binary { file: Some(file), backing: backing.clone() };
                let fh = self.handles.insert(self.generation(), handle);
                // Served files are read-only: no flush on close.
                match backing {
                    Some(id) => {
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id)
                    }
                    // The bytes behind a node id never change, so the page cache may keep them.
                    None => reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                    ),
                }
            }
            Opened::Control { name, content, writable } => {
                let handle = Handle::Control { name, content, writable };
                let fh = self.handles.insert(self.generation(), handle);
                // Small generated files whose size is unknown in advance: no page cache.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with("read", |o| self.handles.read(o, fh.0, ino.0, offset, size)) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self.with("write", |o| {
            let name = self.handles.control_for_write(o, fh.0, ino.0)?;
            o.control_write(&name, req.uid(), data)
        });
        match written {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _r: &Request, _i: INodeNo, _fh: FileHandle, _l: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Unknown handles (opened by a previous server process) are fine to release.
        drop(self.handles.remove(fh.0));
        reply.ok();
    }

    fn fsync(&self, _r: &Request, _i: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with("opendir", |o| o.opendir(ino.0, &caller(req))) {
            Ok(entries) => {
                let handle = Handle::Dir { entries: Arc::new(entries) };
                let fh = self.handles.insert(self.generation(), handle);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.with("readdir", |o| {
            let mut replier = DirectoryReply(&mut reply);
            self.handles.readdir(o, fh.0, ino.0, &caller(req), offset, &mut replier)
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        drop(self.handles.remove(fh.0));
        reply.ok();
    }

    fn getxattr(&self, _r: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !crate::fs::acl::is_acl(name) {
            return reply.error(Errno::ENODATA);
        }
        match self.with("getxattr", |o| o.acl(ino.0, name)) {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(value) => reply.data(&value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _r: &Request, _i: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }

    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(READ_ONLY);
    }

    fn removexattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(READ_ONLY);
    }
}

#[cfg(test)]
mod tests {
    use super::is_user_refusal;

    #[test]
    fn refusals_a_user_can_trigger_are_not_warnings_and_faults_are() {
        for errno in [
            libc::ENOENT,
            libc::EACCES,
            libc::EPERM,
            libc::EROFS,
            libc::ENOTDIR,
            libc::EISDIR,
            libc::ELOOP,
            libc::ENAMETOOLONG,
            libc::EINVAL,
            libc::ESTALE,
        ] {
            assert!(is_user_refusal(errno), "errno {errno} is a user's doing");
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::EMFILE, libc::ENFILE, libc::ENOMEM] {
            assert!(!is_user_refusal(errno), "errno {errno} is a fault to warn about");
        }
    }
}

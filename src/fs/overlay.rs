//! The overlay core's front: the [`Overlay`] type, the queries the daemon makes and the
//! operations the FUSE adapter delegates to. No FUSE types here, so all of it is testable
//! without a mount. What names resolve to lives in `namespace.rs`, invalidations in
//! `invalidate.rs`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{FsError, FsResult};
use crate::fs::classify::Classifier;
use crate::fs::layout::{CONTROL_DIR, Layout, OverlayConfig, PATH_VIEW};
use crate::fs::namespace::Purpose;
use crate::fs::node::{Attr, FileNode, Node, NodeKind, NodeTable, NodeType};
use crate::fs::{
    Caller, ControlPlane, EventSink, FsEvent, ServingTable, TableChooser, VariantChooser,
};
use crate::identity::FileKey;

/// How long the kernel may cache entries and attributes. Long, because every change the
/// overlay knows of is invalidated explicitly (inotify, serving-table changes).
pub const LONG_TTL: Duration = Duration::from_secs(300);
/// The `__FMODE_EXEC` bit of open flags: the kernel's open for execve.
pub const FMODE_EXEC: i32 = 0x20;
/// A miss on an unknown node id rebuilds the node table at most this often.
pub(super) const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

/// A looked-up entry: its attributes and how long the kernel may cache them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub attr: Attr,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
}

/// One directory entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeType,
    pub name: OsString,
}

/// What an open gives the adapter.
#[derive(Debug)]
pub enum Opened {
    /// A served file: the handle's bytes for its whole life.
    Binary { file: File, node: Arc<FileNode> },
    /// A control file: content snapshotted at open (empty if opened for writing only).
    Control { name: String, content: Vec<u8>, writable: bool },
}

/// Invalidates a cached directory entry in the kernel. Implemented over fuser's notifier.
pub trait Invalidator: Send + Sync {
    fn inval_entry(&self, parent: u64, name: &OsStr);
}

/// A binary the overlay has looked up (one version of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenBinary {
    pub original: PathBuf,
    pub key: FileKey,
    /// Has a symbol table: served as a file (unless excluded) and a BOLT candidate.
    pub optimizable: bool,
}

/// What a mapped file stands for ([`Overlay::original_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedOriginal {
    /// The original's real path.
    pub original: PathBuf,
    /// The variant served in its place, if the file is one.
    pub variant: Option<i64>,
    /// The (dev, ino) of the original's version the file was served for, when the mount's
    /// node id told it (a process of a version since replaced then says so).
    pub version: Option<(u64, u64)>,
}

/// The overlay. Shared (`Arc`) between the FUSE request threads and the daemon.
pub struct Overlay {
    pub(super) layout: Layout,
    pub(super) nodes: NodeTable,
    pub(super) classifier: Classifier,
    pub(super) serving: Arc<ServingTable>,
    pub(super) chooser: Arc<dyn VariantChooser>,
    pub(super) control: Arc<dyn ControlPlane>,
    pub(super) events: Arc<dyn EventSink>,
    /// Set by the FUSE layer once mounted; invalidations go through a worker thread so
    /// that no request thread ever waits on the kernel (which may wait on us).
    pub(super) invalidations: Mutex<Option<crate::fs::invalidate::Invalidations>>,
    pub(super) last_rebuild: Mutex<Option<Instant>>,
    pub(super) uid_gid: (u32, u32),
    pub(super) started: SystemTime,
    pub(super) watch: RwLock<Option<crate::fs::watch::Watcher>>,
    /// Private copies of served originals (None: the real files are served).
    pub(super) snapshots: Option<crate::fs::Snapshots>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("layout", &self.layout).finish_non_exhaustive()
    }
}

impl Overlay {
    /// Builds the overlay. `chooser` defaults to what `serving` says
    /// ([`TableChooser`]). Touches nothing inside the mountpoint.
    pub fn new(
        config: OverlayConfig,
        serving: Arc<ServingTable>,
        chooser: Option<Arc<dyn VariantChooser>>,
        control: Arc<dyn ControlPlane>,
        events: Arc<dyn EventSink>,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let layout = Layout::new(&config).context("laying out the overlay")?;
        let snapshots = match &config.originals {
            Some(dir) => Some(crate::fs::Snapshots::new(dir).with_context(|| {
                format!("creating the directory of copies of originals {}", dir.display())
            })?),
            None => None,
        };
        let chooser = chooser.unwrap_or_else(|| Arc::new(TableChooser(serving.clone())));
        let overlay = Arc::new(Self {
            layout,
            nodes: NodeTable::default(),
            classifier: Classifier::default(),
            serving: serving.clone(),
            chooser,
            control,
            events,
            invalidations: Mutex::new(None),
            last_rebuild: Mutex::new(None),
            uid_gid: (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw()),
            started: SystemTime::now(),
            watch: RwLock::new(None),
            snapshots,
        });
        let weak = Arc::downgrade(&overlay);
        serving.subscribe(move |original| {
            if let Some(o) = weak.upgrade() {
                o.invalidate_original(original);
            }
        });
        overlay.intern_fixed();
        Ok(overlay)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.layout.mountpoint
    }

    /// The overlay dirs in PATH order, canonical.
    pub fn overlay_dirs(&self) -> Vec<PathBuf> {
        self.layout.dirs.iter().map(|d| d.path.clone()).collect()
    }

    pub fn serving(&self) -> &Arc<ServingTable> {
        &self.serving
    }

    /// Connects the overlay to the kernel: from now on invalidations are sent, and the
    /// overlay dirs are watched (inotify) so that changes underneath show at once.
    pub fn attach(self: &Arc<Self>, invalidator: Arc<dyn Invalidator>) -> anyhow::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, OsString)>();
        let worker = invalidator.clone();
        std::thread::Builder::new().name("optbin-inval".into()).spawn(move || {
            for (parent, name) in rx {
                worker.inval_entry(parent, &name);
            }
        })?;
        *self.invalidations.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(crate::fs::invalidate::Invalidations { direct: invalidator, queued: tx });
        let dirs: Vec<PathBuf> =
            self.layout.tree.keys().filter(|p| p.as_os_str() != "/").cloned().collect();
        let mut watched = dirs;
        watched.extend(self.layout.dirs.iter().filter(|d| !d.mirrored).map(|d| d.path.clone()));
        let watcher = crate::fs::watch::Watcher::start(Arc::downgrade(self), watched)?;
        *self.watch.write().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
        Ok(())
    }

    /// Stops the inotify watcher and the invalidation worker (the FUSE layer calls it when
    /// the mount goes away).
    pub fn detach(&self) {
        self.invalidations.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.watch.write().unwrap_or_else(|e| e.into_inner()).take() {
            w.stop();
        }
    }

    // ----- queries for the daemon -----

    /// The real path of the binary a user means by `name`: a PATH-view name (`node`,
    /// first match in overlay order) or an absolute path (a real path, or a path inside
    /// the mount).
    pub fn resolve_name(&self, name: &str) -> Option<PathBuf> {
        let path = Path::new(name);
        if path.is_absolute() {
            if let Ok(view) = path.strip_prefix(self.layout.mountpoint.join(PATH_VIEW)) {
                return self.first_match(view.as_os_str()).map(|(dir, _)| dir.join(view));
            }
            if let Some(real) = self.layout.real_path(path) {
                return Some(real);
            }
            if path.starts_with(&self.layout.mountpoint) {
                return None;
            }
            return Some(path.to_path_buf());
        }
        if name.is_empty() || name.contains('/') {
            return None;
        }
        self.first_match(OsStr::new(name)).map(|(dir, _)| dir.join(name))
    }

    /// Maps a file as seen in `/proc/PID/maps` or perf mmap events (its path and the inode
    /// number the kernel gave) back to the original and the variant it is: a variant store
    /// path (FUSE passthrough may show the backing file), or a mount path (`<mount>/usr/bin/x`,
    /// `<mount>/bin/x`). Under the mount the inode number is the node id, which names one
    /// (original version, variant) pair: what the process was really served, even while
    /// execs are split between the original and a canary. Without a known node id the
    /// serving table answers when it serves one thing to every exec; for a split it cannot
    /// tell, and the answer is None (its samples would land in the wrong profile).
    pub fn original_of(&self, path: &Path, ino: Option<u64>) -> Option<MappedOriginal> {
        if let Some((original, variant)) = self.serving.original_of_store_path(path) {
            return Some(MappedOriginal { original, variant: Some(variant), version: None });
        }
        if let Some((original, key)) = self.snapshots.as_ref().and_then(|s| s.original_of(path)) {
            return Some(MappedOriginal {
                original,
                variant: None,
                version: Some((key.dev, key.ino)),
            });
        }
        if !path.starts_with(&self.layout.mountpoint) {
            return None;
        }
        if let Some(node) = ino.and_then(|ino| self.file_node(ino).ok()) {
            return Some(MappedOriginal {
                original: node.original.clone(),
                variant: node.variant.as_ref().map(|v| v.variant_id),
                version: Some((node.key.dev, node.key.ino)),
            });
        }
        let real = self.resolve_name(path.to_str()?)?;
        let key = FileKey::of(&real).ok()?;
        let variant = match self.serving.served_share(&real) {
            Some((v, share)) if v.expected_original == key && share > 0.0 => {
                // Split between the variant and the original: which one this process got
                // is not known.
                if share < 1.0 {
                    return None;
                }
                Some(v.variant_id)
            }
            _ => None,
        };
        Some(MappedOriginal { original: real, variant, version: None })
    }

    /// Every binary version the overlay has looked up (x86-64 ELF files).
    pub fn seen_binaries(&self) -> Vec<SeenBinary> {
        self.classifier
            .seen()
            .into_iter()
            .map(|(original, key, s)| SeenBinary { original, key, optimizable: s.optimizable })
            .collect()
    }

    // ----- operations for the FUSE adapter -----

    /// Looks `name` up in directory `parent` for root (see [`Overlay::lookup_as`]).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        self.lookup_as(parent, name, &Caller::ROOT)
    }

    /// Looks `name` up in directory `parent` for `caller`: someone is about to use the
    /// entry, so a per-exec choice is drawn and a binary seen for the first time is
    /// announced. Only the PATH view's answer depends on the caller.
    pub fn lookup_as(&self, parent: u64, name: &OsStr, caller: &Caller) -> FsResult<Entry> {
        let parent_node = self.node(parent)?;
        let (node, uncached) = self.resolve_child(&parent_node, name, caller, Purpose::Lookup)?;
        let entry_ttl = if uncached { Duration::ZERO } else { LONG_TTL };
        let attr_ttl = match node.kind {
            // Control files change size with every read; let the kernel ask.
            NodeKind::ControlFile(_) => Duration::ZERO,
            _ => LONG_TTL,
        };
        Ok(Entry { attr: node.attr, entry_ttl, attr_ttl })
    }

    pub fn getattr(&self, ino: u64) -> FsResult<(Attr, Duration)> {
        let node = self.node(ino)?;
        let ttl =
            if matches!(node.kind, NodeKind::ControlFile(_)) { Duration::ZERO } else { LONG_TTL };
        Ok((node.attr, ttl))
    }

    /// The POSIX ACL attribute `name` (`system.posix_acl_access` or `_default`) of the real
    /// file or directory node `ino` mirrors, in the kernel's binary form: what the kernel's
    /// permission check on the mount reads (see [`super::acl`]). ENODATA when the real one
    /// has none (its mode bits decide), and for the overlay's own nodes and other names.
    pub fn acl(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let none = || FsError::new(libc::ENODATA, "no such attribute");
        let Some(name) = [super::acl::ACCESS, super::acl::DEFAULT].into_iter().find(|n| name == *n)
        else {
            return Err(none());
        };
        let node = self.node(ino)?;
        let real = match &node.kind {
            NodeKind::Tree(real) => real.clone(),
            NodeKind::File(f) => f.original.clone(),
            _ => return Err(none()),
        };
        match super::acl::read(&real, name) {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(none()),
            Err(e) => Err(FsError::io(e, format!("reading the ACL of {}", real.display()))),
        }
    }

    pub fn readlink(&self, ino: u64) -> FsResult<PathBuf> {
        match &self.node(ino)?.kind {
            NodeKind::Link(target) => Ok(target.clone()),
            _ => Err(FsError::new(libc::EINVAL, "readlink of a non-symlink")),
        }
    }

    /// The node `name` in `parent` resolves to, and whether the kernel must not cache the
    /// answer (a per-exec choice, or an answer for this caller only).
    fn resolve_child(
        &self,
        parent: &Node,
        name: &OsStr,
        caller: &Caller,
        purpose: Purpose,
    ) -> FsResult<(Arc<Node>, bool)> {
        match &parent.kind {
            NodeKind::Root => Ok((self.lookup_root(name)?, false)),
            NodeKind::PathView => self.lookup_path_view(name, caller, purpose),
            NodeKind::Tree(real) => self.lookup_tree(real, name, purpose),
            NodeKind::ControlDir(prefix) => Ok((self.lookup_control(prefix, name)?, false)),
            _ => Err(FsError::new(libc::ENOTDIR, "lookup in a non-directory")),
        }
    }

    /// The entries of directory `ino` as root sees them (see [`Overlay::list`]).
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        self.list(ino, &Caller::ROOT)
    }

    /// A snapshot of directory `ino` for one opendir handle: `.` and `..`, then the
    /// entries `caller` may see (see [`Overlay::list`]). Offsets are positions in it.
    pub fn opendir(&self, ino: u64, caller: &Caller) -> FsResult<Vec<DirEntry>> {
        let node = self.node(ino)?;
        if node.attr.kind != NodeType::Directory {
            return Err(FsError::new(libc::ENOTDIR, "opendir of a non-directory"));
        }
        let dot = |name: &str| DirEntry { ino, kind: NodeType::Directory, name: name.into() };
        let mut entries = vec![dot("."), dot("..")];
        entries.extend(self.list(ino, caller)?);
        Ok(entries)
    }

    /// The entries of directory `ino` for `caller`: each name resolved as a listing does,
    /// never drawing a per-exec choice and never announcing a binary (`ls` of a mirror runs
    /// nothing, so it must not use up canary draws nor make the daemon index binaries).
    pub fn list(&self, ino: u64, caller: &Caller) -> FsResult<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let names: Vec<OsString> = match &node.kind {
            NodeKind::Root => {
                let mut n: Vec<OsString> = vec![PATH_VIEW.into(), CONTROL_DIR.into()];
                n.extend(self.layout.tree[Path::new("/")].on_the_way.iter().cloned());
                n
            }
            NodeKind::PathView => self.path_view_names(),
            NodeKind::Tree(real) => {
                let mut n: Vec<OsString> = std::fs::read_dir(real)
                    .map_err(|e| FsError::io(e, format!("listing {}", real.display())))?
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect();
                if let Some(t) = self.layout.tree.get(real) {
                    n.extend(t.on_the_way.iter().cloned());
                }
                n.sort();
                n.dedup();
                n
            }
            NodeKind::ControlDir(prefix) => self.control_children(prefix).into_keys().collect(),
            _ => return Err(FsError::new(libc::ENOTDIR, "readdir of a non-directory")),
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // Entries can vanish between the listing and the lookup: skip them.
            if let Ok((child, _)) = self.resolve_child(&node, &name, caller, Purpose::Listing) {
                out.push(DirEntry { ino: child.attr.ino, kind: child.attr.kind, name });
            }
        }
        Ok(out)
    }

    /// Opens a node. `flags` are the open(2) flags the kernel passed (with `FMODE_EXEC`
    /// for exec); `pid` the opener.
    pub fn open(&self, ino: u64, flags: i32, pid: u32) -> FsResult<Opened> {
        let node = self.node(ino)?;
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        match &node.kind {
            NodeKind::File(file_node) => {
                if writing {
                    return Err(FsError::read_only("served binaries are read-only"));
                }
                let file = self.open_backing(file_node)?;
                self.emit_opened(file_node, flags, pid);
                Ok(Opened::Binary { file, node: file_node.clone() })
            }
            NodeKind::ControlFile(name) => {
                let spec = self.control.files().into_iter().find(|f| f.name == *name);
                let Some(spec) = spec else {
                    return Err(FsError::not_found(format!("control file {name} is gone")));
                };
                if writing && !spec.writable {
                    return Err(FsError::new(libc::EACCES, format!("{name} is read-only")));
                }
                let content = if flags & libc::O_ACCMODE == libc::O_WRONLY {
                    Vec::new()
                } else {
                    self.control.read(name)?
                };
                Ok(Opened::Control { name: name.clone(), content, writable: spec.writable })
            }
            NodeKind::Link(_) => Err(FsError::new(libc::ELOOP, "open of a symlink")),
            // Directories are opened with OPENDIR; this is a file open of one.
            _ => Err(FsError::new(libc::EISDIR, "open of a directory as a file")),
        }
    }

    /// Records another open of a served file whose backing the adapter still holds (no
    /// file is opened): checks the access mode and emits the `Opened` event.
    pub fn open_again(&self, ino: u64, flags: i32, pid: u32) -> FsResult<()> {
        let node = self.file_node(ino)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::read_only("served binaries are read-only"));
        }
        check_original_unchanged(&node)?;
        self.emit_opened(&node, flags, pid);
        Ok(())
    }

    fn emit_opened(&self, node: &FileNode, flags: i32, pid: u32) {
        self.events.event(FsEvent::Opened {
            mirror_path: node.mirror_path.clone(),
            original: node.original.clone(),
            backing: node.backing_path().to_path_buf(),
            key: node.key,
            variant_id: node.variant.as_ref().map(|v| v.variant_id),
            pid,
            exec: flags & FMODE_EXEC != 0,
        });
    }

    /// Opens the file whose bytes `node` serves, refusing (ESTALE) if the original changed
    /// since the node was made: the bytes behind a node id never change. ESTALE makes the
    /// kernel look the path up again, which yields the new node.
    pub fn open_backing(&self, node: &FileNode) -> FsResult<File> {
        if node.variant.is_none()
            && let Some(snapshots) = &self.snapshots
        {
            match snapshots.open(&node.original, &node.key) {
                Ok(file) => return Ok(file),
                Err(e) if e.errno == libc::ESTALE => return Err(e),
                // No copy (a full disk, say): serving the real file still beats failing
                // the exec; only an in-place write would then reach running processes.
                Err(e) => snapshots.warn_once(&e),
            }
        }
        let path = node.backing_path();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_cloexec()
            .open(path)
            .map_err(|e| FsError::io(e, format!("opening {}", path.display())))?;
        let md = file.metadata().map_err(|e| FsError::io(e, format!("stat {}", path.display())))?;
        if node.variant.is_some() {
            check_original_unchanged(node)?;
        }
        match &node.variant {
            None if FileKey::from_metadata(&md) != node.key => Err(FsError::new(
                libc::ESTALE,
                format!("{} changed since it was looked up", path.display()),
            )),
            Some(v) if md.len() != v.size => Err(FsError::new(
                libc::EIO,
                format!("variant {} has size {} instead of {}", path.display(), md.len(), v.size),
            )),
            _ => Ok(file),
        }
    }

    /// The file node behind an id (for reads on handles a previous server process opened).
    pub fn file_node(&self, ino: u64) -> FsResult<Arc<FileNode>> {
        match &self.node(ino)?.kind {
            NodeKind::File(f) => Ok(f.clone()),
            _ => Err(FsError::new(libc::EBADF, "not a served file")),
        }
    }

    /// The name of the writable control file behind a node id (for writes on handles a
    /// previous server process opened: the open was allowed then, and a control write is
    /// self-contained); EBADF for any other node.
    pub fn writable_control_name(&self, ino: u64) -> FsResult<String> {
        let node = self.node(ino)?;
        match &node.kind {
            NodeKind::ControlFile(name)
                if self.control.files().iter().any(|f| f.name == *name && f.writable) =>
            {
                Ok(name.clone())
            }
            _ => Err(FsError::new(libc::EBADF, "not a handle of a writable control file")),
        }
    }

    /// One write(2) to a control file.
    pub fn control_write(&self, name: &str, uid: u32, data: &[u8]) -> FsResult<()> {
        self.control.write(name, uid, data)
    }

    /// Changes to attributes: allowed only as the truncation `>` does on a writable control
    /// file (a no-op there); everything else is EROFS.
    pub fn setattr_truncate(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        if let NodeKind::ControlFile(name) = &node.kind
            && self.control.files().iter().any(|f| f.name == *name && f.writable)
        {
            return Ok(node.attr);
        }
        Err(FsError::read_only("the overlay is read-only"))
    }
}

/// ESTALE when the original of a node was replaced or changed since the node was made
/// (an upgrade the inotify invalidation has not reached yet): the kernel then looks the
/// path up again and gets the node of the new original. One stat per open.
fn check_original_unchanged(node: &FileNode) -> FsResult<()> {
    match FileKey::of(&node.original) {
        Ok(key) if key == node.key => Ok(()),
        Ok(_) => Err(FsError::new(
            libc::ESTALE,
            format!("{} changed since it was looked up", node.original.display()),
        )),
        Err(e) => Err(FsError::io(e, format!("stat {}", node.original.display()))),
    }
}

trait CloexecExt {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecExt for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

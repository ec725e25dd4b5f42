//! The overlay core: the mount's namespace (root, PATH view, mirrors, control directory),
//! its nodes and the operations the FUSE adapter delegates to. No FUSE types here, so all of
//! it is testable without a mount.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{FsError, FsResult};
use crate::fs::classify::{Classifier, Presentation};
use crate::fs::layout::{CONTROL_DIR, Layout, OverlayConfig, PATH_VIEW};
use crate::fs::node::{
    Attr, CONTROL_ROOT_ID, FileNode, Node, NodeKind, NodeTable, NodeType, PATH_VIEW_ID, ROOT_ID,
};
use crate::fs::{ControlPlane, EventSink, FsEvent, ServingTable, TableChooser, VariantChooser};
use crate::identity::FileKey;

/// How long the kernel may cache entries and attributes. Long, because every change the
/// overlay knows of is invalidated explicitly (inotify, serving-table changes).
pub const LONG_TTL: Duration = Duration::from_secs(300);
/// The `__FMODE_EXEC` bit of open flags: the kernel's open for execve.
pub const FMODE_EXEC: i32 = 0x20;
/// A miss on an unknown node id rebuilds the node table at most this often.
const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

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

/// Where invalidations go: straight to the kernel from daemon threads, through a worker
/// from request threads (the kernel may be waiting for a reply on the same directory).
struct Invalidations {
    direct: Arc<dyn Invalidator>,
    queued: std::sync::mpsc::Sender<(u64, OsString)>,
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

/// A binary the overlay has looked up (one version of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenBinary {
    pub original: PathBuf,
    pub key: FileKey,
    /// Has a symbol table: served as a file (unless excluded) and a BOLT candidate.
    pub optimizable: bool,
}

/// The overlay. Shared (`Arc`) between the FUSE request threads and the daemon.
pub struct Overlay {
    layout: Layout,
    nodes: NodeTable,
    classifier: Classifier,
    serving: Arc<ServingTable>,
    chooser: Arc<dyn VariantChooser>,
    control: Arc<dyn ControlPlane>,
    events: Arc<dyn EventSink>,
    /// Set by the FUSE layer once mounted; invalidations go through a worker thread so
    /// that no request thread ever waits on the kernel (which may wait on us).
    invalidations: Mutex<Option<Invalidations>>,
    last_rebuild: Mutex<Option<Instant>>,
    uid_gid: (u32, u32),
    started: SystemTime,
    watch: RwLock<Option<crate::fs::watch::Watcher>>,
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
            // SAFETY: getuid/getgid cannot fail.
            uid_gid: unsafe { (libc::getuid(), libc::getgid()) },
            started: SystemTime::now(),
            watch: RwLock::new(None),
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
            Some(Invalidations { direct: invalidator, queued: tx });
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

    /// Maps a path as seen in `/proc/PID/maps` or perf mmap events back to the original
    /// and the variant served there: a mount path (`<mount>/usr/bin/x`, `<mount>/bin/x`),
    /// or a variant store path (with FUSE passthrough the kernel maps the backing file).
    /// For a mount path, the variant is what the current lookup serves.
    pub fn original_of(&self, path: &Path) -> Option<(PathBuf, Option<i64>)> {
        if let Some((original, variant)) = self.serving.original_of_store_path(path) {
            return Some((original, Some(variant)));
        }
        if !path.starts_with(&self.layout.mountpoint) {
            return None;
        }
        let real = self.resolve_name(path.to_str()?)?;
        let key = FileKey::of(&real).ok()?;
        let variant = self.chooser.choose(&real, &key).variant.map(|v| v.variant_id);
        Some((real, variant))
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

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let parent_node = self.node(parent)?;
        let (node, per_exec) = match &parent_node.kind {
            NodeKind::Root => (self.lookup_root(name)?, false),
            NodeKind::PathView => (self.lookup_path_view(name)?, false),
            NodeKind::Tree(real) => self.lookup_tree(real, name)?,
            NodeKind::ControlDir(prefix) => (self.lookup_control(prefix, name)?, false),
            _ => return Err(FsError::new(libc::ENOTDIR, "lookup in a non-directory")),
        };
        let entry_ttl = if per_exec { Duration::ZERO } else { LONG_TTL };
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

    pub fn readlink(&self, ino: u64) -> FsResult<PathBuf> {
        match &self.node(ino)?.kind {
            NodeKind::Link(target) => Ok(target.clone()),
            _ => Err(FsError::new(libc::EINVAL, "readlink of a non-symlink")),
        }
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
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
            if let Ok(entry) = self.lookup(ino, &name) {
                out.push(DirEntry { ino: entry.attr.ino, kind: entry.attr.kind, name });
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

    // ----- invalidation (inotify and serving-table changes) -----

    fn send_invalidation(&self, parent: u64, name: &OsStr) {
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

    fn invalidate_original(&self, original: &Path) {
        if let (Some(dir), Some(name)) = (original.parent(), original.file_name()) {
            self.invalidate_real(dir, Some(name));
        }
    }

    fn tree_ino(&self, real: &Path) -> Option<u64> {
        self.layout.tree.contains_key(real).then(|| self.intern_tree(real).attr.ino)
    }

    // ----- namespace -----

    fn intern_fixed(&self) {
        let dir = self.synthetic_dir_attr(None);
        self.nodes.intern(NodeKind::Root, &self.layout.mountpoint, dir);
        self.nodes.intern(NodeKind::PathView, &self.layout.mountpoint.join(PATH_VIEW), dir);
        self.nodes.intern(
            NodeKind::ControlDir(String::new()),
            &self.layout.mountpoint.join(CONTROL_DIR),
            dir,
        );
    }

    fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        if let Some(n) = self.nodes.get(ino) {
            return Ok(n);
        }
        // An id from a previous server process: rebuild what the namespace holds now.
        let due = {
            let mut last = self.last_rebuild.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= REBUILD_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.rebuild();
            if let Some(n) = self.nodes.get(ino) {
                return Ok(n);
            }
        }
        Err(FsError::new(libc::ESTALE, format!("unknown node id {ino:#x}")))
    }

    /// Interns every node the namespace can currently produce, including the known variants
    /// of every served file, so that ids handed out by a previous server process resolve.
    pub fn rebuild(&self) {
        let started = Instant::now();
        let before = self.nodes.len();
        let mut stack = vec![ROOT_ID, PATH_VIEW_ID, CONTROL_ROOT_ID];
        let mut visited = HashSet::new();
        while let Some(ino) = stack.pop() {
            if !visited.insert(ino) {
                continue;
            }
            let Some(node) = self.nodes.get(ino) else { continue };
            let Ok(entries) = self.readdir_known(&node) else { continue };
            for e in entries {
                if e.kind == NodeType::Directory {
                    stack.push(e.ino);
                }
            }
        }
        tracing::info!(
            nodes = self.nodes.len(),
            new = self.nodes.len() - before,
            took_ms = started.elapsed().as_millis() as u64,
            "rebuilt the node table"
        );
    }

    fn readdir_known(&self, node: &Node) -> FsResult<Vec<DirEntry>> {
        let entries = self.readdir(node.attr.ino)?;
        if let NodeKind::Tree(real) = &node.kind
            && self.layout.is_mirror_dir(real)
        {
            for e in &entries {
                self.intern_known_variants(&real.join(&e.name));
            }
        }
        Ok(entries)
    }

    fn intern_known_variants(&self, original: &Path) {
        let variants = self.serving.known_variants(original);
        if variants.is_empty() {
            return;
        }
        let Ok(md) = std::fs::metadata(original) else { return };
        let key = FileKey::from_metadata(&md);
        // The original itself is a possible node too (served before the switch).
        self.intern_file(original, key, &md, None);
        for v in variants.into_iter().filter(|v| v.expected_original == key) {
            self.intern_file(original, key, &md, Some(v));
        }
    }

    fn lookup_root(&self, name: &OsStr) -> FsResult<Arc<Node>> {
        if name == PATH_VIEW {
            return self.node(PATH_VIEW_ID);
        }
        if name == CONTROL_DIR {
            return self.node(CONTROL_ROOT_ID);
        }
        if self.layout.tree[Path::new("/")].on_the_way.contains(name) {
            return Ok(self.intern_tree(&Path::new("/").join(name)));
        }
        Err(FsError::not_found(format!("/{}", name.to_string_lossy())))
    }

    fn intern_tree(&self, real: &Path) -> Arc<Node> {
        let md = std::fs::metadata(real).ok();
        let attr = self.synthetic_dir_attr(md.as_ref());
        self.nodes.intern(NodeKind::Tree(real.to_path_buf()), &self.layout.mirror_path(real), attr)
    }

    /// The first overlay dir holding `name` as something PATH would run: a non-directory
    /// with an execute bit (following symlinks), as bash's lookup does.
    fn first_match(&self, name: &OsStr) -> Option<(PathBuf, bool)> {
        if name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return None;
        }
        self.layout.dirs.iter().find_map(|d| {
            let md = std::fs::metadata(d.path.join(name)).ok()?;
            (!md.is_dir() && md.permissions().mode() & 0o111 != 0)
                .then(|| (d.path.clone(), d.mirrored))
        })
    }

    fn lookup_path_view(&self, name: &OsStr) -> FsResult<Arc<Node>> {
        let Some((dir, mirrored)) = self.first_match(name) else {
            return Err(FsError::not_found(format!("bin/{}", name.to_string_lossy())));
        };
        let real = dir.join(name);
        let target = if mirrored { self.layout.mirror_path(&real) } else { real.clone() };
        let md = std::fs::symlink_metadata(&real).ok();
        let attr = self.link_attr(&target, md.as_ref());
        Ok(self.nodes.intern(
            NodeKind::Link(target),
            &self.layout.mountpoint.join(PATH_VIEW).join(name),
            attr,
        ))
    }

    /// Returns the node and whether its choice is made per exec.
    fn lookup_tree(&self, dir: &Path, name: &OsStr) -> FsResult<(Arc<Node>, bool)> {
        if name.is_empty() || name.as_bytes().contains(&b'/') {
            return Err(FsError::new(libc::EINVAL, "bad name"));
        }
        let real = dir.join(name);
        let tree = self.layout.tree.get(dir);
        if tree.is_some_and(|t| t.on_the_way.contains(name)) {
            return Ok((self.intern_tree(&real), false));
        }
        let mirror_path = self.layout.mirror_path(&real);
        if real.starts_with(&self.layout.mountpoint) {
            // The mount itself seen from a synthetic dir (e.g. /opt/optbin from <mount>/opt):
            // never stat it from here, a request thread would wait on its own mount.
            let attr = self.link_attr(&real, None);
            return Ok((
                self.nodes.intern(NodeKind::Link(real.clone()), &mirror_path, attr),
                false,
            ));
        }
        if !tree.is_some_and(|t| t.mirror) {
            // A sibling on the way to an overlay dir: a symlink to the real thing.
            let md = std::fs::symlink_metadata(&real)
                .map_err(|e| FsError::io(e, format!("{}", real.display())))?;
            let attr = self.link_attr(&real, Some(&md));
            return Ok((
                self.nodes.intern(NodeKind::Link(real.clone()), &mirror_path, attr),
                false,
            ));
        }
        let excluded = self.serving.is_excluded(&real);
        let classified = self
            .classifier
            .classify(&real, excluded)
            .map_err(|e| FsError::io(e, format!("{}", real.display())))?;
        if let Some(key) = classified.newly_seen {
            self.events.event(FsEvent::Seen { original: real.clone(), key });
        }
        match classified.presentation {
            Presentation::VerbatimLink(target) => {
                let attr = self.link_attr(&target, Some(&classified.md));
                Ok((self.nodes.intern(NodeKind::Link(target), &mirror_path, attr), false))
            }
            Presentation::LinkToReal => {
                let attr = self.link_attr(&real, Some(&classified.md));
                Ok((self.nodes.intern(NodeKind::Link(real.clone()), &mirror_path, attr), false))
            }
            Presentation::Served { key, md } => {
                let choice = self.chooser.choose(&real, &key);
                let variant = choice.variant.filter(|v| v.expected_original == key);
                Ok((self.intern_file(&real, key, &md, variant), choice.per_exec))
            }
        }
    }

    fn intern_file(
        &self,
        real: &Path,
        key: FileKey,
        md: &Metadata,
        variant: Option<crate::fs::ServedVariant>,
    ) -> Arc<Node> {
        let mirror_path = self.layout.mirror_path(real);
        let size = variant.as_ref().map_or(md.len(), |v| v.size);
        let attr = Attr {
            ino: 0,
            size,
            blocks: size.div_ceil(512),
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
            kind: NodeType::RegularFile,
            perm: (md.mode() & 0o7777 & !0o222) as u16,
            nlink: 1,
            uid: md.uid(),
            gid: md.gid(),
        };
        let node = FileNode {
            original: real.to_path_buf(),
            mirror_path: mirror_path.clone(),
            key,
            variant,
        };
        self.nodes.intern(NodeKind::File(Arc::new(node)), &mirror_path, attr)
    }

    fn path_view_names(&self) -> Vec<OsString> {
        let mut names: Vec<OsString> = Vec::new();
        for d in &self.layout.dirs {
            if let Ok(rd) = std::fs::read_dir(&d.path) {
                names.extend(rd.filter_map(|e| e.ok().map(|e| e.file_name())));
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// The children of a control directory: name -> Some(file name) for files, None for dirs.
    fn control_children(&self, prefix: &str) -> BTreeMap<OsString, Option<String>> {
        let mut out = BTreeMap::new();
        for f in self.control.files() {
            let rest = if prefix.is_empty() {
                Some(f.name.as_str())
            } else {
                f.name.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
            };
            let Some(rest) = rest else { continue };
            match rest.split_once('/') {
                None if !rest.is_empty() => {
                    out.insert(OsString::from(rest), Some(f.name.clone()));
                }
                Some((dir, _)) if !dir.is_empty() => {
                    out.entry(OsString::from(dir)).or_insert(None);
                }
                _ => {}
            }
        }
        out
    }

    fn lookup_control(&self, prefix: &str, name: &OsStr) -> FsResult<Arc<Node>> {
        let children = self.control_children(prefix);
        let Some(child) = children.get(name) else {
            return Err(FsError::not_found(format!(
                "{CONTROL_DIR}/{prefix}/{}",
                name.to_string_lossy()
            )));
        };
        let name = name.to_string_lossy();
        let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
        let mirror = self.layout.mountpoint.join(CONTROL_DIR).join(&path);
        match child {
            None => Ok(self.nodes.intern(
                NodeKind::ControlDir(path),
                &mirror,
                self.synthetic_dir_attr(None),
            )),
            Some(file) => {
                let mode = self
                    .control
                    .files()
                    .into_iter()
                    .find(|f| f.name == *file)
                    .map_or(0o444, |f| f.mode);
                let attr = Attr {
                    kind: NodeType::RegularFile,
                    perm: mode & 0o777,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    ..self.synthetic_dir_attr(None)
                };
                Ok(self.nodes.intern(NodeKind::ControlFile(file.clone()), &mirror, attr))
            }
        }
    }

    fn synthetic_dir_attr(&self, real: Option<&Metadata>) -> Attr {
        let (uid, gid) = real.map_or(self.uid_gid, |m| (m.uid(), m.gid()));
        let t = real.map_or(self.started, |m| time(m.mtime(), m.mtime_nsec()));
        Attr {
            ino: 0,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            kind: NodeType::Directory,
            perm: 0o555,
            nlink: 2,
            uid,
            gid,
        }
    }

    fn link_attr(&self, target: &Path, md: Option<&Metadata>) -> Attr {
        let t = md.map_or(self.started, |m| time(m.mtime(), m.mtime_nsec()));
        let (uid, gid) = md.map_or(self.uid_gid, |m| (m.uid(), m.gid()));
        Attr {
            ino: 0,
            size: target.as_os_str().len() as u64,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            kind: NodeType::Symlink,
            perm: 0o777,
            nlink: 1,
            uid,
            gid,
        }
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

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
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

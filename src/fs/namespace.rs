//! The namespace of the mount: what each name resolves to (root, PATH view, mirrors and
//! the directories on the way, the control directory), the attributes presented, and the
//! rebuild that makes node ids of a previous server process resolvable again.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{FsError, FsResult};
use crate::fs::access::search_rights;
use crate::fs::classify::Presentation;
use crate::fs::layout::{CONTROL_DIR, PATH_VIEW};
use crate::fs::node::{
    Attr, CONTROL_ROOT_ID, FileNode, Node, NodeKind, NodeType, PATH_VIEW_ID, ROOT_ID,
};
use crate::fs::overlay::REBUILD_INTERVAL;
use crate::fs::{Caller, DirEntry, FsEvent, Overlay};

/// Why a name is resolved: a lookup (someone is about to use the entry: per-exec choices
/// are drawn, binaries seen for the first time are announced) or a listing (neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Lookup,
    Listing,
}
use crate::identity::FileKey;

impl Overlay {
    pub(super) fn intern_fixed(&self) {
        let dir = self.synthetic_dir_attr(None);
        self.nodes.intern(NodeKind::Root, &self.layout.mountpoint, dir);
        self.nodes.intern(NodeKind::PathView, &self.layout.mountpoint.join(PATH_VIEW), dir);
        self.nodes.intern(
            NodeKind::ControlDir(String::new()),
            &self.layout.mountpoint.join(CONTROL_DIR),
            dir,
        );
    }

    pub(super) fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
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

    pub(super) fn readdir_known(&self, node: &Node) -> FsResult<Vec<DirEntry>> {
        let entries = self.list(node.attr.ino, &Caller::ROOT)?;
        if let NodeKind::Tree(real) = &node.kind
            && self.layout.is_mirror_dir(real)
        {
            for e in &entries {
                self.intern_known_variants(&real.join(&e.name));
            }
        }
        Ok(entries)
    }

    pub(super) fn intern_known_variants(&self, original: &Path) {
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

    pub(super) fn lookup_root(&self, name: &OsStr) -> FsResult<Arc<Node>> {
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

    pub(super) fn intern_tree(&self, real: &Path) -> Arc<Node> {
        let md = std::fs::metadata(real).ok();
        let attr = self.synthetic_dir_attr(md.as_ref());
        self.nodes.intern(NodeKind::Tree(real.to_path_buf()), &self.layout.mirror_path(real), attr)
    }

    /// The first overlay dir holding `name` as something PATH would run: a non-directory
    /// with an execute bit (following symlinks), as bash's lookup does.
    pub(super) fn first_match(&self, name: &OsStr) -> Option<(PathBuf, bool)> {
        self.first_match_for(name, &Caller::ROOT).map(|(dir, mirrored, _)| (dir, mirrored))
    }

    /// [`Overlay::first_match`] for `caller`: directories they may not search are skipped,
    /// as PATH lookup skips them. The third value is whether the answer may differ between
    /// callers (a directory holding the name is not searchable by all).
    pub(super) fn first_match_for(
        &self,
        name: &OsStr,
        caller: &Caller,
    ) -> Option<(PathBuf, bool, bool)> {
        if name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return None;
        }
        let mut per_caller = false;
        for d in &self.layout.dirs {
            if !crate::fs::runs_from_path(&d.path.join(name)) {
                continue;
            }
            let rights = search_rights(caller, &d.path);
            per_caller |= !rights.by_all;
            if rights.by_caller {
                return Some((d.path.clone(), d.mirrored, per_caller));
            }
        }
        None
    }

    /// Returns the node and whether the answer is the caller's own (not to be cached).
    pub(super) fn lookup_path_view(
        &self,
        name: &OsStr,
        caller: &Caller,
        purpose: Purpose,
    ) -> FsResult<(Arc<Node>, bool)> {
        let Some((dir, mirrored, per_caller)) = self.first_match_for(name, caller) else {
            return Err(FsError::not_found(format!("bin/{}", name.to_string_lossy())));
        };
        let real = dir.join(name);
        // A binary that runs natively (not optimizable, excluded, or no variant to serve
        // yet) is reached straight from the PATH view: one symlink fewer per exec, and on
        // the first exec no lookup and readlink of its mirror entry. Any change of how it
        // is presented invalidates this name too (`Overlay::invalidate_real`).
        // A listing only names the entry: nothing is classified for it.
        let presented = (mirrored && purpose == Purpose::Lookup)
            .then(|| self.present(&real, true).ok())
            .flatten();
        let native = matches!(presented, Some((Presentation::LinkToReal, _)));
        let target =
            if mirrored && !native { self.layout.mirror_path(&real) } else { real.clone() };
        // The classification's lstat, when there was one.
        let md = match presented {
            Some((_, md)) => Some(md),
            None => std::fs::symlink_metadata(&real).ok(),
        };
        let attr = self.link_attr(&target, md.as_ref());
        let node = self.nodes.intern(
            NodeKind::Link(target),
            &self.layout.mountpoint.join(PATH_VIEW).join(name),
            attr,
        );
        Ok((node, per_caller))
    }

    /// Returns the node and whether its choice is made per exec.
    pub(super) fn lookup_tree(
        &self,
        dir: &Path,
        name: &OsStr,
        purpose: Purpose,
    ) -> FsResult<(Arc<Node>, bool)> {
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
        let (presentation, md) = self
            .present(&real, purpose == Purpose::Lookup)
            .map_err(|e| FsError::io(e, format!("{}", real.display())))?;
        match presentation {
            Presentation::VerbatimLink(target) => {
                let target = link_target_in_mirror(dir, target);
                let attr = self.link_attr(&target, Some(&md));
                Ok((self.nodes.intern(NodeKind::Link(target), &mirror_path, attr), false))
            }
            Presentation::LinkToReal => {
                let attr = self.link_attr(&real, Some(&md));
                Ok((self.nodes.intern(NodeKind::Link(real.clone()), &mirror_path, attr), false))
            }
            Presentation::Served { key, md } if purpose == Purpose::Listing => {
                // No draw: the original's node (a listing only names the entry).
                Ok((self.intern_file(&real, key, &md, None), false))
            }
            Presentation::Served { key, md } => {
                let choice = self.chooser.choose(&real, &key);
                let variant = choice.variant.filter(|v| v.expected_original == key);
                Ok((self.intern_file(&real, key, &md, variant), choice.per_exec))
            }
        }
    }

    /// A new version of entry `name` of real directory `dir` is complete (renamed into place
    /// or closed after writing). If an earlier version was looked up through the mount, the
    /// new one is classified now and announced to the indexer: a binary that runs natively
    /// reaches its real file without asking the mount, so the next exec would not tell the
    /// daemon of the upgrade. Entries nobody looked up stay unread (indexing follows use).
    pub(crate) fn revisit_changed(&self, dir: &Path, name: &OsStr) {
        let real = dir.join(name);
        let mirrored = self.layout.tree.get(dir).is_some_and(|t| t.mirror);
        if !mirrored || !self.classifier.was_announced(&real) {
            return;
        }
        if let Err(e) = self.present(&real, true) {
            // Gone again, or unreadable: the next lookup classifies whatever is there.
            tracing::debug!(path = %real.display(), error = %e, "classifying a changed entry");
        }
    }

    /// How the entry `real` of a mirrored directory is presented, and its own metadata
    /// (lstat): its classification, except that an optimizable file with no variant to
    /// serve yet runs natively until it has one (`ServingTable::set_native_until_variant`).
    /// A version classified for the first time with `announce` is announced to the indexer
    /// (also one passed through: it may get a variant).
    fn present(&self, real: &Path, announce: bool) -> std::io::Result<(Presentation, Metadata)> {
        let excluded = self.serving.is_excluded(real);
        let classified = self.classifier.classify(real, excluded, announce)?;
        if let Some(key) = classified.newly_seen {
            self.events.event(FsEvent::Seen { original: real.to_path_buf(), key });
        }
        let presentation = match classified.presentation {
            Presentation::Served { .. } if self.serving.passes_through(real) => {
                Presentation::LinkToReal
            }
            p => p,
        };
        Ok((presentation, classified.md))
    }

    pub(super) fn intern_file(
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

    pub(super) fn path_view_names(&self) -> Vec<OsString> {
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
    pub(super) fn control_children(&self, prefix: &str) -> BTreeMap<OsString, Option<String>> {
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

    pub(super) fn lookup_control(&self, prefix: &str, name: &OsStr) -> FsResult<Arc<Node>> {
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

    pub(super) fn synthetic_dir_attr(&self, real: Option<&Metadata>) -> Attr {
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
            // The real directory's own mode (write bits dropped: the mount is read-only),
            // so that the kernel stops the same users as on the real path.
            perm: real.map_or(0o555, |m| (m.mode() & 0o7555) as u16),
            nlink: 2,
            uid,
            gid,
        }
    }

    pub(super) fn link_attr(&self, target: &Path, md: Option<&Metadata>) -> Attr {
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

/// What a real symlink in mirror dir `dir` points at inside the mount. A relative target
/// resolves in the mirror as it does natively as long as it stays below the mount's root:
/// every directory on its way is a mirror, a directory on the way, or a symlink to the real
/// one. The mount's root is not the real `/` (it holds `bin`, `.optbin` and the directories
/// on the way only), so a target that climbs to it (`/usr/local/bin/x ->
/// ../../../opt/x/bin/x`) is presented as the absolute real path it means.
pub(super) fn link_target_in_mirror(dir: &Path, target: PathBuf) -> PathBuf {
    use std::path::Component;
    if target.is_absolute() {
        return target;
    }
    let mut depth = dir.components().filter(|c| matches!(c, Component::Normal(_))).count();
    let mut at_root = depth == 0;
    for c in target.components() {
        match c {
            Component::ParentDir => depth = depth.saturating_sub(1),
            Component::Normal(_) => {
                if depth == 0 {
                    at_root = true;
                    break;
                }
                depth += 1;
            }
            _ => {}
        }
        at_root |= depth == 0;
    }
    if at_root { crate::config::normalize(&dir.join(&target)) } else { target }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::link_target_in_mirror;
    use std::path::{Path, PathBuf};

    #[test]
    fn relative_links_that_climb_to_the_root_become_absolute() {
        let dir = Path::new("/usr/local/bin");
        let link = |t: &str| link_target_in_mirror(dir, PathBuf::from(t));
        assert_eq!(link("../../../opt/x/bin/x"), Path::new("/opt/x/bin/x"));
        assert_eq!(link("../../../../../opt/x"), Path::new("/opt/x"), "`..` at / stays at /");
        assert_eq!(link("../../.."), Path::new("/"));
        // Staying below the root: verbatim (keeps argv[0] of busybox-style aliases).
        assert_eq!(link("busybox"), Path::new("busybox"));
        assert_eq!(link("../lib/x/run"), Path::new("../lib/x/run"));
        assert_eq!(link("../../bin/x"), Path::new("../../bin/x"));
        // Through the root on the way: the mount's root is not `/`, so absolute.
        assert_eq!(link("../../bin/../../usr/bin/x"), Path::new("/usr/bin/x"));
        assert_eq!(link("/etc/alternatives/x"), Path::new("/etc/alternatives/x"));
    }
}

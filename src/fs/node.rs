//! Nodes of the mount and their ids.
//!
//! A node id is derived from what the node *is* (its identity: e.g. the original's path,
//! its [`FileKey`] and the variant id), so a restarted server process computes the same id
//! for the same node and can answer for ids the kernel got from its predecessor. What a
//! node serves never changes under its id: a new variant or a new version of the original
//! is a new identity, hence a new id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::fs::ServedVariant;
use crate::identity::FileKey;

pub const ROOT_ID: u64 = 1;
pub const PATH_VIEW_ID: u64 = 2;
pub const CONTROL_ROOT_ID: u64 = 3;
/// Derived ids are never below this (the fixed ids above live there).
const FIRST_DERIVED_ID: u64 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    Directory,
    RegularFile,
    Symlink,
}

/// The attributes of a node, as the kernel sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: NodeType,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A served regular file: one (original version, variant) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    /// The real path of the original.
    pub original: PathBuf,
    /// Its path inside the mount.
    pub mirror_path: PathBuf,
    pub key: FileKey,
    pub variant: Option<ServedVariant>,
}

impl FileNode {
    /// The file whose bytes this node serves.
    pub fn backing_path(&self) -> &std::path::Path {
        self.variant.as_ref().map_or(&self.original, |v| &v.path_in_store)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Root,
    PathView,
    /// A directory backed by a real one (keyed by real path).
    Tree(PathBuf),
    /// A directory of `.optbin/` ("" for `.optbin` itself).
    ControlDir(String),
    ControlFile(String),
    Link(PathBuf),
    File(Arc<FileNode>),
}

impl NodeKind {
    /// The bytes that identify the node (see module doc).
    fn identity(&self, mirror_path: &std::path::Path) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut id = Vec::new();
        let mut push = |tag: &str, bytes: &[u8]| {
            id.extend_from_slice(tag.as_bytes());
            id.push(0);
            id.extend_from_slice(bytes);
            id.push(0);
        };
        match self {
            NodeKind::Root => push("root", b""),
            NodeKind::PathView => push("pathview", b""),
            NodeKind::Tree(real) => push("dir", real.as_os_str().as_bytes()),
            NodeKind::ControlDir(p) => push("cdir", p.as_bytes()),
            NodeKind::ControlFile(n) => push("cfile", n.as_bytes()),
            NodeKind::Link(target) => {
                push("link", mirror_path.as_os_str().as_bytes());
                push("to", target.as_os_str().as_bytes());
            }
            NodeKind::File(f) => {
                push("file", f.mirror_path.as_os_str().as_bytes());
                let k = &f.key;
                for n in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64] {
                    push("k", &n.to_le_bytes());
                }
                push("v", &f.variant.as_ref().map_or(0, |v| v.variant_id).to_le_bytes());
            }
        }
        id
    }
}

/// A node with the attributes it was created with.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub attr: Attr,
}

/// A node with the identity bytes its id was derived from.
type Interned = (Vec<u8>, Arc<Node>);

/// The id -> node map. Nodes are never removed: their number is bounded by the versions of
/// the binaries seen, and an id must stay answerable while the kernel may hold it.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: RwLock<HashMap<u64, Interned>>,
}

impl NodeTable {
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&ino).map(|(_, n)| n.clone())
    }

    pub fn len(&self) -> usize {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a node and returns it with its id filled in. A node with the same identity
    /// keeps its id (its attributes are refreshed: only directories and symlinks can
    /// differ, files cannot since their identity holds the full key).
    pub fn intern(
        &self,
        kind: NodeKind,
        mirror_path: &std::path::Path,
        mut attr: Attr,
    ) -> Arc<Node> {
        let identity = kind.identity(mirror_path);
        let fixed = match kind {
            NodeKind::Root => Some(ROOT_ID),
            NodeKind::PathView => Some(PATH_VIEW_ID),
            NodeKind::ControlDir(ref p) if p.is_empty() => Some(CONTROL_ROOT_ID),
            _ => None,
        };
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let mut probe = 0u32;
        let ino = loop {
            let candidate = fixed.unwrap_or_else(|| derive_id(&identity, probe));
            match nodes.get(&candidate) {
                Some((existing, _)) if *existing != identity && fixed.is_none() => probe += 1,
                _ => break candidate,
            }
        };
        attr.ino = ino;
        let node = Arc::new(Node { kind, attr });
        nodes.insert(ino, (identity, node.clone()));
        node
    }
}

fn derive_id(identity: &[u8], probe: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(identity);
    h.update(probe.to_le_bytes());
    let digest = h.finalize();
    let id = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    // Stay clear of the fixed ids and of the top bit (some tools treat inodes as signed).
    (id & (u64::MAX >> 1)) | FIRST_DERIVED_ID
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr() -> Attr {
        Attr {
            ino: 0,
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            kind: NodeType::RegularFile,
            perm: 0o555,
            nlink: 1,
            uid: 0,
            gid: 0,
        }
    }

    fn file(ino: u64, variant: Option<i64>) -> NodeKind {
        NodeKind::File(Arc::new(FileNode {
            original: "/usr/bin/x".into(),
            mirror_path: "/m/usr/bin/x".into(),
            key: FileKey { dev: 1, ino, size: 1, mtime_ns: 1, ctime_ns: 1 },
            variant: variant.map(|id| ServedVariant {
                variant_id: id,
                path_in_store: "/s".into(),
                size: 1,
                expected_original: FileKey { dev: 1, ino, size: 1, mtime_ns: 1, ctime_ns: 1 },
            }),
        }))
    }

    #[test]
    fn ids_are_deterministic_and_distinct_per_version_and_variant() {
        let a = NodeTable::default();
        let b = NodeTable::default();
        let p = std::path::Path::new("/m/usr/bin/x");
        let orig = a.intern(file(1, None), p, attr()).attr.ino;
        assert_eq!(orig, b.intern(file(1, None), p, attr()).attr.ino, "same id in a new process");
        let variant = a.intern(file(1, Some(5)), p, attr()).attr.ino;
        let upgraded = a.intern(file(2, None), p, attr()).attr.ino;
        assert!(orig != variant && orig != upgraded && variant != upgraded);
        assert!(orig >= FIRST_DERIVED_ID);
        assert_eq!(a.intern(file(1, None), p, attr()).attr.ino, orig, "stable within a process");
        assert_eq!(a.intern(NodeKind::Root, p, attr()).attr.ino, ROOT_ID);
        assert_eq!(a.len(), 4);
    }
}

//! The shape of the mount, decided once from the mountpoint and the overlay dirs.
//!
//! Each overlay dir `D` is mirrored at `<mount>/D`; the directories on the way
//! (`<mount>/usr` for `/usr/bin`) are synthetic directories whose other entries are
//! symlinks to the real paths, so programs that find resources relative to
//! `/proc/self/exe` (`../lib`) keep working. An overlay dir that cannot be mirrored (its
//! path would collide with `<mount>/bin` or `<mount>/.optbin`, e.g. a real, non-symlink
//! `/bin`) still takes part in the PATH view, whose entries for it then point straight at
//! the real files (they run natively, unoptimized).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};

/// The name of the PATH view directory at the mount's root.
pub const PATH_VIEW: &str = "bin";
/// The name of the control directory at the mount's root.
pub const CONTROL_DIR: &str = ".optbin";

/// What the overlay is asked to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    pub mountpoint: PathBuf,
    /// In PATH order. Need not be canonical; duplicates, missing dirs and anything at or
    /// under the mountpoint are dropped.
    pub overlay_dirs: Vec<PathBuf>,
    /// Where the overlay keeps its private copies of the originals it serves (see
    /// `fs::snapshot`): running programs keep their bytes when the real file is written in
    /// place. None serves the real files themselves (an in-place write then reaches running
    /// processes): for tests and benchmarks that do not need it.
    pub originals: Option<PathBuf>,
}

/// One overlay dir after canonicalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDir {
    pub path: PathBuf,
    /// False when its path collides with the mount's own entries (see module doc).
    pub mirrored: bool,
}

/// A directory of the mount backed by a real directory (`<mount>/usr` for `/usr`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDir {
    /// Its entries are classified binaries (it is an overlay dir), not plain symlinks.
    pub mirror: bool,
    /// Children that are themselves tree dirs (on the way to an overlay dir).
    pub on_the_way: BTreeSet<OsString>,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub mountpoint: PathBuf,
    pub dirs: Vec<OverlayDir>,
    /// Keyed by real path; "/" is the mount's root.
    pub tree: BTreeMap<PathBuf, TreeDir>,
}

impl Layout {
    pub fn new(config: &OverlayConfig) -> io::Result<Self> {
        let mountpoint = absolute_mountpoint(&config.mountpoint)?;
        let mut dirs: Vec<OverlayDir> = Vec::new();
        for dir in &config.overlay_dirs {
            let Some(path) = canonicalize_outside(dir, &mountpoint) else {
                tracing::info!(dir = %dir.display(), "not overlaid: at or under the mount");
                continue;
            };
            match std::fs::metadata(&path) {
                Ok(md) if md.is_dir() => {}
                _ => {
                    tracing::info!(dir = %dir.display(), "not overlaid: not a directory");
                    continue;
                }
            }
            if dirs.iter().any(|d| d.path == path) {
                continue;
            }
            let mirrored = mirrorable(&path);
            if !mirrored {
                tracing::warn!(
                    dir = %path.display(),
                    "collides with the mount's own entries: its PATH view entries point at \
                     the real files (served unoptimized)"
                );
            }
            dirs.push(OverlayDir { path, mirrored });
        }
        let mut tree: BTreeMap<PathBuf, TreeDir> = BTreeMap::new();
        tree.insert(PathBuf::from("/"), TreeDir::default());
        for dir in dirs.iter().filter(|d| d.mirrored) {
            let mut current = PathBuf::from("/");
            for component in dir.path.components().skip(1) {
                let name = component.as_os_str().to_os_string();
                tree.entry(current.clone()).or_default().on_the_way.insert(name.clone());
                current.push(name);
                tree.entry(current.clone()).or_default();
            }
            tree.entry(current).or_default().mirror = true;
        }
        Ok(Self { mountpoint, dirs, tree })
    }

    /// The path inside the mount that mirrors a real path.
    pub fn mirror_path(&self, real: &Path) -> PathBuf {
        self.mountpoint.join(real.strip_prefix("/").unwrap_or(real))
    }

    /// The real path behind a path inside the mount's mirror, if it is one.
    pub fn real_path(&self, mount_path: &Path) -> Option<PathBuf> {
        let rest = mount_path.strip_prefix(&self.mountpoint).ok()?;
        let first = rest.components().next()?;
        if first.as_os_str() == PATH_VIEW || first.as_os_str() == CONTROL_DIR {
            return None;
        }
        Some(Path::new("/").join(rest))
    }

    pub fn is_mirror_dir(&self, real: &Path) -> bool {
        self.tree.get(real).is_some_and(|t| t.mirror)
    }
}

/// Whether PATH lookup would run the entry at `path`: a non-directory with an execute bit,
/// following symlinks (as bash and glibc's `execvp` look). The PATH view and the control
/// commands' NAME resolution both use this one rule, so a command acts on exactly the file
/// that `<mount>/bin/NAME` runs.
pub fn runs_from_path(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|md| !md.is_dir() && md.permissions().mode() & 0o111 != 0)
}

/// Whether an overlay dir can be mirrored at its own path under the mount.
fn mirrorable(path: &Path) -> bool {
    match path.components().nth(1) {
        None => false, // "/" itself
        Some(first) => first.as_os_str() != PATH_VIEW && first.as_os_str() != CONTROL_DIR,
    }
}

/// The mountpoint as an absolute, canonical path, without touching the mountpoint itself
/// (it may be a dead mount, or our own mount whose server is not answering yet).
pub fn absolute_mountpoint(mountpoint: &Path) -> io::Result<PathBuf> {
    let absolute = if mountpoint.is_absolute() {
        mountpoint.to_path_buf()
    } else {
        std::env::current_dir()?.join(mountpoint)
    };
    let normal = lexical_normal(&absolute);
    let (Some(parent), Some(name)) = (normal.parent(), normal.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the mountpoint cannot be /"));
    };
    Ok(std::fs::canonicalize(parent)?.join(name))
}

fn lexical_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Canonicalizes `path` one component at a time and gives up (None) as soon as the path
/// reaches the mount: resolving a path inside our own mount from the server could wait
/// for the server itself. Also None for paths that do not resolve.
pub fn canonicalize_outside(path: &Path, mountpoint: &Path) -> Option<PathBuf> {
    let start = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let mut pending: Vec<OsString> =
        start.components().rev().map(|c| c.as_os_str().to_os_string()).collect();
    let mut current = PathBuf::from("/");
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        let part: &OsStr = &part;
        if part == "/" || part == "." {
            continue;
        }
        if part == ".." {
            current.pop();
            continue;
        }
        let next = current.join(part);
        if next.starts_with(mountpoint) {
            return None;
        }
        let md = std::fs::symlink_metadata(&next).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&next).ok()?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            pending.extend(target.components().rev().map(|c| c.as_os_str().to_os_string()));
        } else {
            current = next;
        }
    }
    if current.starts_with(mountpoint) { None } else { Some(current) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_canonical_deduplicated_and_never_under_the_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let a = root.join("a/bin");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(root.join("mnt")).unwrap();
        std::os::unix::fs::symlink(&a, root.join("alias")).unwrap();
        std::os::unix::fs::symlink(root.join("mnt/bin"), root.join("into-mount")).unwrap();
        let config = OverlayConfig {
            mountpoint: root.join("mnt"),
            overlay_dirs: vec![
                a.clone(),
                root.join("alias"),
                root.join("mnt/bin"),
                root.join("into-mount"),
                root.join("missing"),
                PathBuf::from("/bin"),
            ],
            originals: None,
        };
        let layout = Layout::new(&config).unwrap();
        let paths: Vec<_> = layout.dirs.iter().map(|d| d.path.clone()).collect();
        let mut expected = vec![a.clone()];
        let real_bin = Path::new("/bin").canonicalize().unwrap();
        expected.push(real_bin.clone());
        assert_eq!(paths, expected);
        assert_eq!(layout.dirs[1].mirrored, real_bin != Path::new("/bin"));
        assert!(layout.is_mirror_dir(&a));
        assert!(!layout.is_mirror_dir(&root));
        let first = root.components().nth(1).unwrap().as_os_str().to_os_string();
        assert!(layout.tree[Path::new("/")].on_the_way.contains(&first));
        assert!(layout.tree[&root.join("a")].on_the_way.contains(OsStr::new("bin")));
        assert_eq!(
            layout.mirror_path(&a.join("x")),
            root.join("mnt").join(a.strip_prefix("/").unwrap()).join("x")
        );
        assert_eq!(layout.real_path(&layout.mirror_path(&a.join("x"))), Some(a.join("x")));
        assert_eq!(layout.real_path(&root.join("mnt/bin/x")), None);
    }

    #[test]
    fn root_and_colliding_dirs_are_not_mirrored() {
        assert!(!mirrorable(Path::new("/")));
        assert!(!mirrorable(Path::new("/bin")));
        assert!(!mirrorable(Path::new("/.optbin/x")));
        assert!(mirrorable(Path::new("/usr/bin")));
    }
}

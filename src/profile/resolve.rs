//! From the file a process mapped to the binary it stands for: the mount's paths
//! (`/opt/optbin/usr/bin/x`) map back to the original (`/usr/bin/x`), and a served variant
//! (a BOLTed or instrumented copy, with other addresses) is told apart from the original.

use std::path::{Path, PathBuf};

/// What a mapped file stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The original binary at this path: its samples enter its profile. `version` is the
    /// (dev, ino) of the original's file the process runs, when the resolver knows it (so a
    /// process of a version since replaced is not counted for the new one).
    Original { path: PathBuf, version: Option<(u64, u64)> },
    /// A variant served in place of the original at this path: its addresses differ, so
    /// its samples are only counted (as variant samples of the original). `variant` is the
    /// catalog's id of the variant, when the resolver knows which one ran.
    Variant { original: PathBuf, variant: Option<i64> },
    /// Not profiled (not a candidate, or filtered out).
    Ignore,
}

impl Resolved {
    /// The original at `path`, version unknown.
    pub fn original(path: impl Into<PathBuf>) -> Self {
        Resolved::Original { path: path.into(), version: None }
    }
}

/// Maps a process's executable mapping to what it stands for: its filename and the (dev,
/// ino) the kernel gave for it, when it gave them.
pub trait PathResolver: Send + Sync {
    fn resolve(&self, mapped: &Path, file: Option<(u64, u64)>) -> Resolved;
}

/// Every file is its own original; for machines without the mount, and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityResolver;

impl PathResolver for IdentityResolver {
    fn resolve(&self, mapped: &Path, _file: Option<(u64, u64)>) -> Resolved {
        Resolved::original(mapped)
    }
}

/// Profiles only files under one directory (identity otherwise); for tests and for
/// restricting the daemon to chosen trees.
#[derive(Debug, Clone)]
pub struct UnderDirResolver {
    pub dir: PathBuf,
}

impl PathResolver for UnderDirResolver {
    fn resolve(&self, mapped: &Path, _file: Option<(u64, u64)>) -> Resolved {
        if mapped.starts_with(&self.dir) { Resolved::original(mapped) } else { Resolved::Ignore }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_dir_filters() {
        let r = UnderDirResolver { dir: "/tmp/t".into() };
        assert_eq!(r.resolve(Path::new("/tmp/t/a"), None), Resolved::original("/tmp/t/a"));
        assert_eq!(r.resolve(Path::new("/tmp/tx/a"), None), Resolved::Ignore);
        assert_eq!(IdentityResolver.resolve(Path::new("/x"), None), Resolved::original("/x"));
    }
}

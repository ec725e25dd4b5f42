//! From the file a process mapped to the binary it stands for: the mount's paths
//! (`/opt/optbin/usr/bin/x`) map back to the original (`/usr/bin/x`), and a served variant
//! (a BOLTed or instrumented copy, with other addresses) is told apart from the original.

use std::path::{Path, PathBuf};

/// What a mapped file stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The original binary at this path: its samples enter its profile.
    Original(PathBuf),
    /// A variant served in place of the original at this path: its addresses differ, so
    /// its samples are only counted (as variant samples of the original).
    Variant { original: PathBuf },
    /// Not profiled (not a candidate, or filtered out).
    Ignore,
}

/// Maps the filename of a process's executable mapping to what it stands for.
pub trait PathResolver: Send + Sync {
    fn resolve(&self, mapped: &Path) -> Resolved;
}

/// Every file is its own original; for machines without the mount, and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityResolver;

impl PathResolver for IdentityResolver {
    fn resolve(&self, mapped: &Path) -> Resolved {
        Resolved::Original(mapped.to_path_buf())
    }
}

/// Profiles only files under one directory (identity otherwise); for tests and for
/// restricting the daemon to chosen trees.
#[derive(Debug, Clone)]
pub struct UnderDirResolver {
    pub dir: PathBuf,
}

impl PathResolver for UnderDirResolver {
    fn resolve(&self, mapped: &Path) -> Resolved {
        if mapped.starts_with(&self.dir) {
            Resolved::Original(mapped.to_path_buf())
        } else {
            Resolved::Ignore
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_dir_filters() {
        let r = UnderDirResolver { dir: "/tmp/t".into() };
        assert_eq!(r.resolve(Path::new("/tmp/t/a")), Resolved::Original("/tmp/t/a".into()));
        assert_eq!(r.resolve(Path::new("/tmp/tx/a")), Resolved::Ignore);
        assert_eq!(IdentityResolver.resolve(Path::new("/x")), Resolved::Original("/x".into()));
    }
}

//! Turning the NAME of a control command into the absolute path of an original binary.
//!
//! A NAME is either a PATH-view name (`node`: the first overlaid directory that has it, as
//! PATH lookup does), an absolute path in an overlaid directory (`/usr/bin/node`), or a
//! path under the mount (`/opt/optbin/bin/node`, `/opt/optbin/usr/bin/node`). Whatever the
//! form, the file must be one PATH lookup would run ([`crate::fs::runs_from_path`]: a
//! non-directory with an execute bit), the same rule the PATH view `<mount>/bin` uses, so
//! `exclude foo` acts on the file `<mount>/bin/foo` runs and never on a directory, a data
//! file or a path that does not exist.

use std::path::{Component, Path, PathBuf};

use crate::fs::runs_from_path;

/// Resolves `name`; the error is a sentence for `last_error`.
pub fn resolve_name(name: &str, overlay: &[PathBuf], mountpoint: &Path) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("empty NAME".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} names no binary"));
    }
    if !name.contains('/') {
        return overlay
            .iter()
            .map(|dir| dir.join(name))
            .find(|p| runs_from_path(p))
            .ok_or_else(|| format!("no binary named {name:?} in the overlaid directories"));
    }
    let path = Path::new(name);
    if !path.is_absolute() {
        return Err(format!("{name:?} is neither a name nor an absolute path"));
    }
    if path.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir)) {
        return Err(format!("{name:?} names no binary: `.` and `..` are not allowed"));
    }
    if let Ok(rest) = path.strip_prefix(mountpoint) {
        let mut parts = rest.components();
        if let (Some(first), Some(second), None) = (parts.next(), parts.next(), parts.next())
            && first.as_os_str() == "bin"
        {
            return resolve_name(&second.as_os_str().to_string_lossy(), overlay, mountpoint);
        }
        return resolve_name(&Path::new("/").join(rest).to_string_lossy(), overlay, mountpoint);
    }
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(format!("{name:?} names no file"));
    };
    let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    if !overlay.contains(&parent) {
        return Err(format!(
            "{name:?} is not in an overlaid directory ({})",
            overlay.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    let real = parent.join(file);
    match std::fs::metadata(&real) {
        Err(_) if real.symlink_metadata().is_err() => Err(format!("{name:?} does not exist")),
        Err(_) => Err(format!("{name:?} is a dangling symlink")),
        Ok(md) if md.is_dir() => Err(format!("{name:?} is a directory, not a binary")),
        Ok(_) if !runs_from_path(&real) => {
            Err(format!("{name:?} is not executable: PATH lookup would not run it"))
        }
        Ok(_) => Ok(real),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(path: &Path) {
        std::fs::write(path, b"x").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn names_resolve_like_path_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        executable(&b.join("tool"));
        executable(&a.join("both"));
        executable(&b.join("both"));
        let dirs = vec![a.clone(), b.clone()];
        let mnt = Path::new("/mnt/optbin");
        assert_eq!(resolve_name("tool", &dirs, mnt).unwrap(), b.join("tool"));
        assert_eq!(resolve_name("both", &dirs, mnt).unwrap(), a.join("both"));
        assert_eq!(
            resolve_name(b.join("both").to_str().unwrap(), &dirs, mnt).unwrap(),
            b.join("both")
        );
        assert_eq!(resolve_name("/mnt/optbin/bin/both", &dirs, mnt).unwrap(), a.join("both"));
        let mirrored = format!("/mnt/optbin{}", b.join("both").display());
        assert_eq!(resolve_name(&mirrored, &dirs, mnt).unwrap(), b.join("both"));
        assert!(resolve_name("missing", &dirs, mnt).unwrap_err().contains("no binary named"));
        assert!(
            resolve_name("/etc/passwd", &dirs, mnt).unwrap_err().contains("not in an overlaid")
        );
        assert!(resolve_name("x/y", &dirs, mnt).unwrap_err().contains("neither"));
    }

    /// The PATH view runs the first *executable non-directory* of a name: a directory or a
    /// data file of that name in an earlier directory must not capture the command.
    #[test]
    fn only_what_path_lookup_would_run_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(a.join("foo")).unwrap();
        std::fs::write(a.join("data"), b"x").unwrap();
        std::fs::create_dir_all(&b).unwrap();
        executable(&b.join("foo"));
        executable(&b.join("data"));
        std::os::unix::fs::symlink("gone", a.join("dangling")).unwrap();
        let dirs = vec![a.clone(), b.clone()];
        let mnt = Path::new("/mnt/optbin");
        assert_eq!(resolve_name("foo", &dirs, mnt).unwrap(), b.join("foo"), "not the directory");
        assert_eq!(resolve_name("data", &dirs, mnt).unwrap(), b.join("data"), "not the data file");
        let err = |n: &str| resolve_name(n, &dirs, mnt).unwrap_err();
        assert!(err(a.join("foo").to_str().unwrap()).contains("is a directory"));
        assert!(err(a.join("data").to_str().unwrap()).contains("not executable"));
        assert!(err(a.join("nope").to_str().unwrap()).contains("does not exist"));
        assert!(err(a.join("dangling").to_str().unwrap()).contains("dangling"));
        assert!(err(".").contains("names no binary"));
        assert!(err("..").contains("names no binary"));
        assert!(err(&format!("{}/../b/foo", a.display())).contains("not allowed"));
        assert!(err("/mnt/optbin/bin/..").contains("not allowed"));
        assert!(err("dangling").contains("no binary named"));
    }
}

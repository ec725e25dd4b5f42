//! Turning the NAME of a control command into the absolute path of an original binary.
//!
//! A NAME is either a PATH-view name (`node`: the first overlaid directory that has it, as
//! PATH lookup does), an absolute path in an overlaid directory (`/usr/bin/node`), or a
//! path under the mount (`/opt/optbin/bin/node`, `/opt/optbin/usr/bin/node`).

use std::path::{Path, PathBuf};

/// Resolves `name`; the error is a sentence for `last_error`.
pub fn resolve_name(name: &str, overlay: &[PathBuf], mountpoint: &Path) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("empty NAME".into());
    }
    if !name.contains('/') {
        return overlay
            .iter()
            .map(|dir| dir.join(name))
            .find(|p| p.symlink_metadata().is_ok())
            .ok_or_else(|| format!("no binary named {name:?} in the overlaid directories"));
    }
    let path = Path::new(name);
    if !path.is_absolute() {
        return Err(format!("{name:?} is neither a name nor an absolute path"));
    }
    let path = crate::config::normalize(path);
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
    Ok(parent.join(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_like_path_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("tool"), b"x").unwrap();
        std::fs::write(a.join("both"), b"x").unwrap();
        std::fs::write(b.join("both"), b"x").unwrap();
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
}

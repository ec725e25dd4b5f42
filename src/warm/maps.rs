//! The regular files a process maps (its binary and shared libraries), from
//! `/proc/PID/maps`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Paths of the file-backed mappings in a `/proc/PID/maps` text, without pseudo-files
/// (`[vdso]`), deleted files, and anything under `exclude` (the mount itself: its files are
/// warmed through their backing paths).
pub fn mapped_files(maps: &str, exclude: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for line in maps.lines() {
        // address perms offset dev inode pathname: the path is the sixth field and may
        // hold spaces.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            match rest.find(char::is_whitespace) {
                Some(i) => rest = &rest[i..],
                None => {
                    rest = "";
                    break;
                }
            }
        }
        let path = rest.trim();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let path = PathBuf::from(path);
        if path.starts_with(exclude) {
            continue;
        }
        out.insert(path);
    }
    out
}

/// The files process `pid` maps now; empty when it is gone.
pub fn of_process(pid: u32, exclude: &Path) -> BTreeSet<PathBuf> {
    match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(text) => mapped_files(&text, exclude),
        Err(_) => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_files_drops_pseudo_deleted_and_excluded() {
        let maps = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 123 /opt/optbin/usr/bin/x
7f00000-7f01000 r-xp 00001000 fd:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01000-7f02000 r--p 00000000 fd:01 789 /tmp/a file with spaces
7f02000-7f03000 r--p 00000000 fd:01 790 /tmp/gone (deleted)
7ffd000-7ffe000 r-xp 00000000 00:00 0 [vdso]
7ffe000-7fff000 rw-p 00000000 00:00 0
";
        let files = mapped_files(maps, Path::new("/opt/optbin"));
        let files: Vec<_> = files.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(files, ["/tmp/a file with spaces", "/usr/lib/x86_64-linux-gnu/libc.so.6"]);
    }

    #[test]
    fn this_process_maps_its_libc() {
        let files = of_process(std::process::id(), Path::new("/nonexistent"));
        assert!(files.iter().any(|p| p.to_string_lossy().contains("libc")), "{files:?}");
    }
}

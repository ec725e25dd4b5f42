//! The files a binary's processes map: its shared libraries as the system's dynamic loader
//! resolves them (`ld.so --list`, which maps the libraries and exits without running any of
//! the program's or the libraries' code), and the regular files a live process maps, from
//! `/proc/PID/maps` (which also shows what it `dlopen`ed).

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

/// The system's dynamic loader, the only one optbin asks: a binary's own `PT_INTERP` is
/// the binary's choice and is never run.
pub const SYSTEM_LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// The shared libraries `binary` needs, as the system loader resolves them with the
/// daemon's environment (not a user's `LD_LIBRARY_PATH`). Empty for static binaries,
/// binaries for another loader, or when the loader fails or takes over 5 s.
pub fn needed_libraries(binary: &Path) -> BTreeSet<PathBuf> {
    // Mapped, not read: only the headers and `.interp` are touched (node is 98 MB).
    let Ok(f) = std::fs::File::open(binary) else { return BTreeSet::new() };
    // SAFETY: read-only mapping of a binary in an overlaid directory, which is replaced by
    // rename on upgrade (the mapping keeps the old inode); truncating it in place while we
    // parse would fault, as it would for the programs running it.
    let Ok(data) = (unsafe { memmap2::Mmap::map(&f) }) else { return BTreeSet::new() };
    let Ok(file) = object::File::parse(&*data) else { return BTreeSet::new() };
    if interpreter(&file).as_deref() != Some(SYSTEM_LOADER) {
        return BTreeSet::new();
    }
    let Ok(mut child) = std::process::Command::new(SYSTEM_LOADER)
        .arg("--list")
        .arg(binary)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return BTreeSet::new();
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return BTreeSet::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    // One name per file: the loader names itself by its symlink, /proc/PID/maps by the
    // real path.
    parse_loader_list(&out).into_iter().map(|p| std::fs::canonicalize(&p).unwrap_or(p)).collect()
}

fn interpreter(file: &object::File<'_>) -> Option<String> {
    use object::{Object, ObjectSection};
    let interp = file.section_by_name(".interp")?.data().ok()?;
    let end = interp.iter().position(|&b| b == 0).unwrap_or(interp.len());
    Some(String::from_utf8_lossy(&interp[..end]).into_owned())
}

/// Paths in `ld.so --list` output (`libc.so.6 => /lib/.../libc.so.6 (0x...)`, or a bare
/// absolute path for the loader itself; `linux-vdso.so.1 (0x...)` and `not found` are
/// skipped).
pub fn parse_loader_list(text: &str) -> BTreeSet<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let target = line.split_once("=>").map_or(line, |(_, t)| t.trim());
            let path = target.split(" (0x").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
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
    fn loader_lists_are_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\tlibgone.so => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs: Vec<_> = parse_loader_list(text).into_iter().collect();
        assert_eq!(
            libs,
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from(SYSTEM_LOADER)]
        );
    }

    #[test]
    fn the_loader_names_libc_for_a_dynamic_binary_and_nothing_for_a_script() {
        let ls = needed_libraries(Path::new("/usr/bin/ls"));
        assert!(ls.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{ls:?}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert!(needed_libraries(&script).is_empty());
    }

    #[test]
    fn this_process_maps_its_libc() {
        let files = of_process(std::process::id(), Path::new("/nonexistent"));
        assert!(files.iter().any(|p| p.to_string_lossy().contains("libc")), "{files:?}");
    }
}

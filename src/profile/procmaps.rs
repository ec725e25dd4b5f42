//! Seeding the mapping table of processes that were already running when sampling began
//! (or whose mmap records were lost), from /proc/PID/maps and /proc/PID/exe.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// An executable file mapping of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub pgoff: u64,
    /// (device number as `st_dev` encodes it, inode); None for anonymous/special mappings.
    pub file: Option<(u64, u64)>,
    pub filename: PathBuf,
}

impl Mapping {
    pub fn contains(&self, ip: u64) -> bool {
        ip >= self.start && ip < self.end
    }

    /// The file offset that `ip` (inside this mapping) reads from.
    pub fn file_offset(&self, ip: u64) -> u64 {
        ip - self.start + self.pgoff
    }
}

/// A process as /proc shows it now: its executable mappings and the (dev, ino) of its
/// main executable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcSnapshot {
    pub mappings: Vec<Mapping>,
    pub exe: Option<(u64, u64)>,
}

/// Reads /proc/PID; None when the process is gone or unreadable.
pub fn snapshot(pid: u32) -> Option<ProcSnapshot> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| (m.dev(), m.ino()));
    Some(ProcSnapshot { mappings: parse_maps(&maps), exe })
}

/// Parses the executable lines of a /proc/PID/maps text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().map(str::trim_start).unwrap_or("");
    if !perms.contains('x') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    let (maj, min) = (u32::from_str_radix(maj, 16).ok()?, u32::from_str_radix(min, 16).ok()?);
    let file = (inode != 0).then(|| (libc::makedev(maj, min), inode));
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        pgoff: u64::from_str_radix(offset, 16).ok()?,
        file,
        filename: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_lines_only() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/x
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1234 /usr/bin/x y
7ffd1000-7ffd2000 r-xp 00000000 00:00 0                          [vdso]
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].start, 0x55d0c0a01000);
        assert_eq!(m[0].pgoff, 0x1000);
        assert_eq!(m[0].file, Some((libc::makedev(8, 1), 1234)));
        assert_eq!(m[0].filename, PathBuf::from("/usr/bin/x y"));
        assert_eq!(m[0].file_offset(0x55d0c0a01010), 0x1010);
        assert_eq!(m[1].file, None);
        assert_eq!(m[1].filename, PathBuf::from("[vdso]"));
    }

    #[test]
    fn snapshot_of_this_process_finds_its_executable() {
        let snap = snapshot(std::process::id()).unwrap();
        let exe = snap.exe.unwrap();
        assert!(snap.mappings.iter().any(|m| m.file == Some(exe)));
    }
}

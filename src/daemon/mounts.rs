//! Facts about mounts from outside the daemon: is something mounted here, which daemon
//! serves it, and lazily unmounting what a dead daemon left behind.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;

/// Whether `mnt` is a mountpoint (per /proc/self/mountinfo; works for dead FUSE mounts,
/// which cannot be stat'ed).
pub fn is_mounted(mnt: &Path) -> anyhow::Result<bool> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .any(|line| line.split(' ').nth(4).is_some_and(|field| Path::new(&unescape(field)) == mnt)))
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid of the process serving `mnt`, as its own status file says.
pub fn daemon_pid(mnt: &Path) -> Option<u32> {
    let text = std::fs::read(mnt.join(".optbin/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("daemon")?.get("pid")?.as_u64().map(|p| p as u32)
}

/// Detaches the mount at `mnt` (MNT_DETACH: it goes as soon as nobody uses it).
pub fn lazy_unmount(mnt: &Path) -> anyhow::Result<()> {
    let c = CString::new(mnt.as_os_str().as_bytes()).context("mountpoint contains NUL")?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("unmounting {}", mnt.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
    }

    #[test]
    fn root_is_mounted_and_a_tempdir_is_not() {
        assert!(is_mounted(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(dir.path()).unwrap());
    }
}

//! Private copies of the originals the mount serves, so that a running program keeps its
//! bytes whatever happens to the real file.
//!
//! Natively, writing into a running executable fails with `ETXTBSY`: exec denies writes to
//! the file. Through the mount the kernel denies writes to the FUSE inode only; if the
//! overlay served the real file (FUSE passthrough maps it straight into the process), an
//! in-place write (`cp new /usr/bin/x`, `dd conv=notrunc`) would change the pages of every
//! process running it, and they crash or run the new code. So the overlay serves an
//! original from a copy it owns, made the first time that version is opened: the write to
//! the real file then succeeds (as it would natively for a program not running), running
//! processes keep their bytes, and the next exec sees a new version (a new node).
//!
//! Copies are named after the original's path and [`FileKey`]; making the copy of a new
//! version of a path removes the copies of its older versions (running processes keep
//! their unlinked inode). The cost: one copy per served version (`copy_file_range`, or a
//! reflink where the filesystem has them) on its first open, and its disk space.
//!
//! Copies are not synced to disk (an `fdatasync` per copy was most of a first exec's wait,
//! and far more on a busy disk): a copy is published by rename once completely written, so
//! within one boot every copy is whole, whatever happens to the daemon. Only a crash of
//! the machine can leave a torn copy behind, so the directory remembers the boot it was
//! filled in (`.boot`, the kernel's boot id) and is emptied when that is not this boot.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{FsError, FsResult};
use crate::identity::FileKey;

/// The directory of copies and what each copy is a copy of.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    /// Copy path -> (original, key), for the copies made or found by this process.
    known: Mutex<HashMap<PathBuf, (PathBuf, FileKey)>>,
    warned: std::sync::atomic::AtomicBool,
}

impl Snapshots {
    /// Uses (and creates, root-only) `dir`; empties it when it was filled during an earlier
    /// boot (see the module doc).
    pub fn new(dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        forget_other_boots(dir, &boot_id()?)?;
        Ok(Self { dir: dir.to_path_buf(), known: Mutex::default(), warned: Default::default() })
    }

    /// Logs a failure to make a copy: a warning the first time, then at debug level (a user
    /// who can fill the disk must not be able to fill the log too).
    pub fn warn_once(&self, error: &FsError) {
        if self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(%error, "no copy of an original: serving the real file");
        } else {
            tracing::warn!(%error, "no copy of an original: serving the real file (an in-place write would reach running processes; further failures are logged at debug level)");
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn prefix(original: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        hex::encode(&Sha256::digest(original.as_os_str().as_bytes())[..12])
    }

    /// Where the copy of `original` at version `key` lives.
    pub fn path_of(&self, original: &Path, key: &FileKey) -> PathBuf {
        let k = key;
        self.dir.join(format!(
            "{}-{:x}-{:x}-{:x}-{:x}-{:x}",
            Self::prefix(original),
            k.dev,
            k.ino,
            k.size,
            k.mtime_ns,
            k.ctime_ns
        ))
    }

    /// The original a copy stands for (a path seen in `/proc/PID/maps` may be the copy).
    pub fn original_of(&self, copy: &Path) -> Option<(PathBuf, FileKey)> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).get(copy).cloned()
    }

    /// Opens the copy of `original` at version `key`, making it first if needed. ESTALE
    /// when the original is no longer at that version (or changed while being copied):
    /// the kernel then looks the name up again and gets the new version's node.
    pub fn open(&self, original: &Path, key: &FileKey) -> FsResult<File> {
        let path = self.path_of(original, key);
        match open_read(&path) {
            Ok(file) => {
                let md = file.metadata().map_err(|e| FsError::io(e, "stat of a copy"))?;
                if md.len() == key.size {
                    self.remember(&path, original, key);
                    return Ok(file);
                }
                // A torn copy (a crash while copying renames nothing, so this is foreign).
                let _ = std::fs::remove_file(&path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::io(e, format!("opening {}", path.display()))),
        }
        self.make(original, key, &path)?;
        let file =
            open_read(&path).map_err(|e| FsError::io(e, format!("opening {}", path.display())))?;
        self.remember(&path, original, key);
        Ok(file)
    }

    fn remember(&self, copy: &Path, original: &Path, key: &FileKey) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if !known.contains_key(copy) {
            known.insert(copy.to_path_buf(), (original.to_path_buf(), *key));
        }
    }

    fn make(&self, original: &Path, key: &FileKey, path: &Path) -> FsResult<()> {
        let stale = || {
            FsError::new(
                libc::ESTALE,
                format!("{} changed since it was looked up", original.display()),
            )
        };
        let mut source = open_read(original)
            .map_err(|e| FsError::io(e, format!("opening {}", original.display())))?;
        let before = source.metadata().map_err(|e| FsError::io(e, "stat of an original"))?;
        if FileKey::from_metadata(&before) != *key {
            return Err(stale());
        }
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rustix::thread::gettid().as_raw_nonzero()
        ));
        let result = (|| -> FsResult<()> {
            let mut copy = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o400)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)
                .map_err(|e| FsError::io(e, format!("creating {}", tmp.display())))?;
            if !reflink(&source, &copy) {
                io::copy(&mut source, &mut copy)
                    .map_err(|e| FsError::io(e, format!("copying {}", original.display())))?;
            }
            let after = source.metadata().map_err(|e| FsError::io(e, "stat of an original"))?;
            let now = std::fs::metadata(original).map(|m| FileKey::from_metadata(&m));
            if FileKey::from_metadata(&after) != *key || now.ok() != Some(*key) {
                return Err(stale());
            }
            if copy.metadata().map(|m| m.size()).ok() != Some(key.size) {
                return Err(FsError::new(libc::EIO, "a copy of an original came out short"));
            }
            std::fs::rename(&tmp, path)
                .map_err(|e| FsError::io(e, format!("publishing {}", path.display())))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return result;
        }
        self.remove_older_versions(original, path);
        tracing::debug!(original = %original.display(), copy = %path.display(), "copied an original");
        Ok(())
    }

    /// Removes the copies of other versions of `original` (a process running one keeps its
    /// inode).
    fn remove_older_versions(&self, original: &Path, keep: &Path) {
        let prefix = format!("{}-", Self::prefix(original));
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != keep && entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(&path);
                self.known.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
            }
        }
    }
}

/// The marker of the boot the copies were made in.
const BOOT_MARKER: &str = ".boot";

/// This boot's id (random per boot, from the kernel).
fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim().to_string())
}

/// Removes every file in `dir` unless its marker says `boot`, then marks it with `boot`.
fn forget_other_boots(dir: &Path, boot: &str) -> io::Result<()> {
    let marker = dir.join(BOOT_MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == boot) {
        return Ok(());
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "copies of originals from an earlier boot removed");
    }
    std::fs::write(&marker, boot)
}

fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path)
}

/// Shares the extents of `source` with `copy` where the filesystem can (btrfs, XFS): no data
/// is copied then.
fn reflink(source: &File, copy: &File) -> bool {
    rustix::fs::ioctl_ficlone(copy, source).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_an_earlier_boot_are_removed_and_those_of_this_boot_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("copies");
        let original = tmp.path().join("prog");
        std::fs::write(&original, b"bytes").unwrap();
        let key = FileKey::of(&original).unwrap();
        let snapshots = Snapshots::new(&dir).unwrap();
        drop(snapshots.open(&original, &key).unwrap());
        let copy = snapshots.path_of(&original, &key);
        // A restarted daemon in the same boot keeps the copy.
        Snapshots::new(&dir).unwrap();
        assert!(copy.exists(), "a copy of this boot is kept");
        // After a reboot (another boot id) the copy may be torn: it goes.
        std::fs::write(dir.join(BOOT_MARKER), "an-earlier-boot").unwrap();
        Snapshots::new(&dir).unwrap();
        assert!(!copy.exists(), "a copy of an earlier boot is removed");
        assert_eq!(std::fs::read_to_string(dir.join(BOOT_MARKER)).unwrap(), boot_id().unwrap());
    }

    #[test]
    fn a_copy_keeps_its_bytes_when_the_original_is_rewritten_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let original = tmp.path().join("prog");
        std::fs::write(&original, b"version one").unwrap();
        let snapshots = Snapshots::new(&tmp.path().join("copies")).unwrap();
        let key = FileKey::of(&original).unwrap();
        let copy = snapshots.open(&original, &key).unwrap();
        let copy_path = snapshots.path_of(&original, &key);
        assert_eq!(snapshots.original_of(&copy_path), Some((original.clone(), key)));
        // In place, same inode (as `dd conv=notrunc` does); longer, so the key surely changes.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&original).unwrap();
            f.write_all(b"VERSION TWO!").unwrap();
        }
        let mut bytes = Vec::new();
        use std::io::Read;
        (&copy).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"version one");
        // The old version is gone: opening it again is ESTALE.
        let _ = std::fs::remove_file(&copy_path);
        assert_eq!(snapshots.open(&original, &key).unwrap_err().errno, libc::ESTALE);
        // The new version gets its copy; older copies of the path are removed.
        let key2 = FileKey::of(&original).unwrap();
        std::fs::write(&copy_path, b"stale leftover").unwrap();
        snapshots.open(&original, &key2).unwrap();
        assert!(!copy_path.exists(), "copies of older versions are removed");
        assert_eq!(std::fs::read(snapshots.path_of(&original, &key2)).unwrap(), b"VERSION TWO!");
    }
}

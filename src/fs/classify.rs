//! Deciding how one real directory entry is presented in a mirror: served as a file (an
//! x86-64 ELF with symbols that optbin may optimize) or passed through unchanged (as a
//! symlink). One `open` and [`crate::elf::sniff`] per file version, cached by [`FileKey`].

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::elf::{self, Sniff};
use crate::identity::FileKey;

/// How a real entry reaches the user.
#[derive(Debug, Clone)]
pub enum Presentation {
    /// A real symlink, mirrored verbatim (same target string).
    VerbatimLink(PathBuf),
    /// Passed through as a symlink to the real path (runs natively).
    LinkToReal,
    /// Served as a read-only regular file; `md` is the original's metadata.
    Served { key: FileKey, md: Box<Metadata> },
}

impl PartialEq for Presentation {
    /// Served entries are equal when they serve the same version (metadata aside).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::VerbatimLink(a), Self::VerbatimLink(b)) => a == b,
            (Self::LinkToReal, Self::LinkToReal) => true,
            (Self::Served { key: a, .. }, Self::Served { key: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// What sniffing one version of a file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sniffed {
    /// x86-64 ELF executable or shared object (with or without symbols).
    pub x86_elf: bool,
    /// ... with a symbol table: BOLT can work on it, so the overlay serves it.
    pub optimizable: bool,
}

/// The result of classifying an entry, plus whether it is the first announced sighting of a
/// binary.
#[derive(Debug)]
pub struct Classified {
    pub presentation: Presentation,
    /// Set the first time an x86-64 ELF version is classified with `announce` (for
    /// `FsEvent::Seen`).
    pub newly_seen: Option<FileKey>,
    /// The metadata of the entry itself (lstat).
    pub md: Metadata,
}

/// Sniff results by path, valid for one [`FileKey`], and whether the version was announced
/// (a lookup saw it, not only a listing).
#[derive(Debug, Default)]
pub struct Classifier {
    cache: Mutex<HashMap<PathBuf, Cached>>,
}

#[derive(Debug, Clone, Copy)]
struct Cached {
    key: FileKey,
    sniffed: Sniffed,
    announced: bool,
}

impl Classifier {
    /// Classifies the entry at `real` (`excluded`: the daemon asked not to serve it).
    /// `announce`: a lookup (someone may run it), so an x86-64 ELF version not announced
    /// before is reported in `newly_seen`; a directory listing classifies without it.
    pub fn classify(&self, real: &Path, excluded: bool, announce: bool) -> io::Result<Classified> {
        let md = std::fs::symlink_metadata(real)?;
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(real)?;
            return Ok(Classified {
                presentation: Presentation::VerbatimLink(target),
                newly_seen: None,
                md,
            });
        }
        // FUSE mounts are nosuid: a setuid/setgid file served by us would silently lose
        // its privilege, so it must run from the real path.
        if !ft.is_file() || md.mode() & (libc::S_ISUID | libc::S_ISGID) != 0 {
            return Ok(Classified { presentation: Presentation::LinkToReal, newly_seen: None, md });
        }
        // File capabilities (e.g. cap_net_raw on ping) are ignored on a nosuid mount, and
        // the overlay does not present xattrs: such files run from the real path, too.
        if has_file_capabilities(real) {
            return Ok(Classified { presentation: Presentation::LinkToReal, newly_seen: None, md });
        }
        let key = FileKey::from_metadata(&md);
        let sniffed = match self.cached(real, &key) {
            Some(s) => s,
            None => match sniff_file(real) {
                // The file may have been replaced between the lstat and the open: the key of
                // what we actually read is the one that counts.
                Ok((opened_md, s)) => {
                    let opened_key = FileKey::from_metadata(&opened_md);
                    if opened_key != key {
                        return self.classify(real, excluded, announce);
                    }
                    self.store(real, key, s);
                    s
                }
                Err(e) => {
                    tracing::debug!(path = %real.display(), error = %e, "unreadable: passed through");
                    return Ok(Classified {
                        presentation: Presentation::LinkToReal,
                        newly_seen: None,
                        md,
                    });
                }
            },
        };
        let newly_seen = (announce && sniffed.x86_elf && self.announce(real, &key)).then_some(key);
        let presentation = if sniffed.optimizable && !excluded {
            Presentation::Served { key, md: Box::new(md.clone()) }
        } else {
            Presentation::LinkToReal
        };
        Ok(Classified { presentation, newly_seen, md })
    }

    fn cached(&self, real: &Path, key: &FileKey) -> Option<Sniffed> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(real).filter(|c| c.key == *key).map(|c| c.sniffed)
    }

    fn store(&self, real: &Path, key: FileKey, sniffed: Sniffed) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(real.to_path_buf(), Cached { key, sniffed, announced: false });
    }

    /// Marks the version announced; true if it was not before.
    fn announce(&self, real: &Path, key: &FileKey) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get_mut(real) {
            Some(c) if c.key == *key && !c.announced => {
                c.announced = true;
                true
            }
            _ => false,
        }
    }

    /// Whether some version of `real` was announced to the indexer (looked up as an x86-64
    /// ELF) since the overlay started.
    pub fn was_announced(&self, real: &Path) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(real).is_some_and(|c| c.announced)
    }

    /// Every (path, key) looked up (announced) as an x86-64 ELF.
    pub fn seen(&self) -> Vec<(PathBuf, FileKey, Sniffed)> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = cache
            .iter()
            .filter(|(_, c)| c.sniffed.x86_elf && c.announced)
            .map(|(p, c)| (p.clone(), c.key, c.sniffed))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn has_file_capabilities(real: &Path) -> bool {
    // A size query (no buffer); a path with a NUL byte fails, which means no capabilities.
    matches!(rustix::fs::lgetxattr_query(real, c"security.capability"), Ok(size) if size > 0)
}

fn sniff_file(real: &Path) -> io::Result<(Metadata, Sniffed)> {
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(real)?;
    let md = file.metadata()?;
    let sniffed = match elf::sniff(&file)? {
        Sniff::X86_64 { has_symtab } => Sniffed { x86_elf: true, optimizable: has_symtab },
        Sniff::NotElf | Sniff::OtherElf => Sniffed { x86_elf: false, optimizable: false },
    };
    Ok((md, sniffed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn classification_of_entries() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let bin = dir.path().join("bin");
        std::fs::copy(&exe, &bin).unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let suid = dir.path().join("suid");
        std::fs::copy(&exe, &suid).unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("bin", dir.path().join("alias")).unwrap();
        let c = Classifier::default();

        // A listing classifies without announcing; the first lookup announces.
        let listed = c.classify(&bin, false, false).unwrap();
        assert!(matches!(listed.presentation, Presentation::Served { .. }));
        assert!(listed.newly_seen.is_none());
        assert!(c.seen().is_empty(), "listed only");
        let served = c.classify(&bin, false, true).unwrap();
        assert!(matches!(served.presentation, Presentation::Served { .. }));
        assert!(served.newly_seen.is_some());
        assert!(c.classify(&bin, false, true).unwrap().newly_seen.is_none(), "once per version");
        assert_eq!(c.classify(&bin, true, true).unwrap().presentation, Presentation::LinkToReal);
        assert_eq!(
            c.classify(&script, false, true).unwrap().presentation,
            Presentation::LinkToReal
        );
        assert_eq!(c.classify(&suid, false, true).unwrap().presentation, Presentation::LinkToReal);
        assert_eq!(
            c.classify(dir.path(), false, true).unwrap().presentation,
            Presentation::LinkToReal
        );
        assert_eq!(
            c.classify(&dir.path().join("alias"), false, true).unwrap().presentation,
            Presentation::VerbatimLink("bin".into())
        );
        assert!(c.classify(&dir.path().join("missing"), false, true).is_err());
        assert_eq!(c.seen().len(), 1);
    }
}

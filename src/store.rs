//! The variant store: content-addressed files under `<state_dir>/variants/<aa>/<sha256>`.
//!
//! - Directories are root-only (0700): only the daemon (and its FUSE server, also root)
//!   reads variants; users reach them through the mount.
//! - Files are 0755: the mount serves them as executables with these bits.
//! - Publishing is atomic: the bytes are copied (and hashed on the way) into a temporary
//!   file under `variants/.staging/` (same filesystem), fsynced, given their mode, then
//!   renamed to their content's name and the directory fsynced. A reader sees the whole
//!   file or nothing. A file never changes once published: the kernel may have its pages
//!   cached behind a running process.
//! - Garbage collection removes every variant the caller does not name as kept (served,
//!   canary, being measured), and staging files left behind by a crash. Files younger
//!   than [`GC_GRACE`] are spared: a job may have published one a moment ago and not yet
//!   recorded it in the catalog the keep set was read from.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::identity::ContentId;

const STAGING: &str = ".staging";
/// Staging files older than this belong to no running publish (a publish takes seconds).
const STALE_STAGING: Duration = Duration::from_secs(3600);
/// Published files younger than this are never collected (see the module doc).
pub const GC_GRACE: Duration = Duration::from_secs(600);

/// A handle to the store's directory.
#[derive(Debug, Clone)]
pub struct VariantStore {
    root: PathBuf,
}

/// A variant's file in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVariant {
    pub content: ContentId,
    pub path: PathBuf,
    pub size: u64,
}

/// A copy being published: verified by the caller, then [`VariantStore::commit`]ted;
/// removed if dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    file: tempfile::NamedTempFile,
    pub content: ContentId,
    pub size: u64,
}

impl Staged {
    /// The staged bytes, root-only, for checks before committing.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcReport {
    pub removed: u64,
    pub freed_bytes: u64,
    pub kept: u64,
}

/// The store's size on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StoreUsage {
    pub files: u64,
    pub bytes: u64,
}

impl VariantStore {
    /// Opens (creating) `<state_dir>/variants`, root-only. The mode of `state_dir` itself
    /// is left to its owner (the daemon).
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let root = state_dir.join("variants");
        for dir in [root.as_path(), root.join(STAGING).as_path()] {
            make_private_dir(dir)?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a content's file lives (whether or not it exists).
    pub fn path_of(&self, content: &ContentId) -> PathBuf {
        let hex = content.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, content: &ContentId) -> bool {
        self.path_of(content).is_file()
    }

    /// Copies `src` into a staging file, hashing it; fsynced and executable.
    /// `src` must be a regular file itself, not a symlink: BOLT's output sits in a directory
    /// the sandbox user owns, and root must not be tricked into copying another file.
    pub fn stage(&self, src: &Path) -> anyhow::Result<Staged> {
        let mut input = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .with_context(|| format!("opening {}", src.display()))?;
        anyhow::ensure!(input.metadata()?.is_file(), "{} is not a regular file", src.display());
        let mut file = tempfile::Builder::new()
            .prefix("variant-")
            .tempfile_in(self.root.join(STAGING))
            .context("creating a staging file")?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = input.read(&mut buf).with_context(|| format!("reading {}", src.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).context("writing the staging file")?;
            size += n as u64;
        }
        file.as_file().set_permissions(fs::Permissions::from_mode(0o755))?;
        file.as_file().sync_all().context("syncing the staging file")?;
        Ok(Staged { file, content: ContentId(hasher.finalize().into()), size })
    }

    /// Publishes a staged file under its content's name. Publishing content that is already
    /// there keeps the existing file.
    pub fn commit(&self, staged: Staged) -> anyhow::Result<StoredVariant> {
        let path = self.path_of(&staged.content);
        let dir = path.parent().context("a store path has a parent")?;
        make_private_dir(dir)?;
        if !path.is_file() {
            staged
                .file
                .persist(&path)
                .map_err(|e| e.error)
                .with_context(|| format!("publishing {}", path.display()))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
        Ok(StoredVariant { content: staged.content, path, size: staged.size })
    }

    /// [`Self::stage`] then [`Self::commit`].
    pub fn publish(&self, src: &Path) -> anyhow::Result<StoredVariant> {
        let staged = self.stage(src)?;
        self.commit(staged)
    }

    /// Removes every variant not in `keep` (older than [`GC_GRACE`]), and stale staging
    /// files.
    pub fn gc(&self, keep: &HashSet<ContentId>) -> anyhow::Result<GcReport> {
        self.gc_older_than(keep, GC_GRACE)
    }

    /// [`Self::gc`] with the grace period given.
    pub fn gc_older_than(
        &self,
        keep: &HashSet<ContentId>,
        grace: Duration,
    ) -> anyhow::Result<GcReport> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        let young = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < grace)
        };
        for (content, path, size) in self.files()? {
            if content.is_some_and(|c| keep.contains(&c)) || young(&path) {
                report.kept += 1;
                continue;
            }
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            report.removed += 1;
            report.freed_bytes += size;
        }
        for entry in fs::read_dir(self.root.join(STAGING))? {
            let entry = entry?;
            let md = entry.metadata()?;
            let age = md.modified().ok().and_then(|m| now.duration_since(m).ok());
            if age.is_some_and(|a| a > STALE_STAGING) {
                fs::remove_file(entry.path())?;
                report.removed += 1;
                report.freed_bytes += md.len();
            }
        }
        Ok(report)
    }

    /// Files and bytes under the store (staging included).
    pub fn disk_usage(&self) -> anyhow::Result<StoreUsage> {
        let mut usage = StoreUsage::default();
        for (_, _, size) in self.files()? {
            usage.files += 1;
            usage.bytes += size;
        }
        for entry in fs::read_dir(self.root.join(STAGING))? {
            usage.files += 1;
            usage.bytes += entry?.metadata()?.len();
        }
        Ok(usage)
    }

    /// Every file in the fan-out directories, with the content its name claims (None for
    /// names that are not a sha256: strays, removed by gc).
    fn files(&self) -> anyhow::Result<Vec<(Option<ContentId>, PathBuf, u64)>> {
        let mut out = Vec::new();
        for dir in
            fs::read_dir(&self.root).with_context(|| format!("listing {}", self.root.display()))?
        {
            let dir = dir?;
            if dir.file_name() == STAGING || !dir.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let name = f.file_name();
                let content = name.to_str().and_then(ContentId::parse);
                out.push((content, f.path(), f.metadata()?.len()));
            }
        }
        Ok(out)
    }
}

fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn publish_is_content_addressed_private_and_executable() {
        let state = tempfile::tempdir().unwrap();
        let store = VariantStore::open(state.path()).unwrap();
        let src = state.path().join("src");
        fs::write(&src, b"variant bytes").unwrap();
        let v = store.publish(&src).unwrap();
        assert_eq!(v.content, ContentId::of_bytes(b"variant bytes"));
        let hex = v.content.hex();
        assert_eq!(v.path, state.path().join("variants").join(&hex[..2]).join(&hex));
        assert_eq!(fs::read(&v.path).unwrap(), b"variant bytes");
        assert_eq!(mode(&v.path), 0o755);
        assert_eq!(mode(v.path.parent().unwrap()), 0o700);
        assert_eq!(mode(store.root()), 0o700);
        // Same content again: same file, nothing staged left over.
        let again = store.publish(&src).unwrap();
        assert_eq!(again, v);
        assert_eq!(fs::read_dir(store.root().join(STAGING)).unwrap().count(), 0);
        assert_eq!(store.disk_usage().unwrap(), StoreUsage { files: 1, bytes: 13 });
    }

    #[test]
    fn nothing_is_visible_before_commit_and_a_dropped_stage_leaves_nothing() {
        let state = tempfile::tempdir().unwrap();
        let store = VariantStore::open(state.path()).unwrap();
        let src = state.path().join("src");
        fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        let staged = store.stage(&src).unwrap();
        let content = staged.content;
        assert!(!store.contains(&content), "visible before commit");
        assert_eq!(fs::read(staged.path()).unwrap().len(), 3 << 20);
        drop(staged);
        assert!(!store.contains(&content));
        assert_eq!(store.disk_usage().unwrap(), StoreUsage::default());
        let staged = store.stage(&src).unwrap();
        let v = store.commit(staged).unwrap();
        assert!(store.contains(&content));
        assert_eq!(v.size, 3 << 20);
        // A symlink is refused, whatever it points to.
        let link = state.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert!(store.stage(&link).is_err());
    }

    #[test]
    fn gc_keeps_only_what_is_named() {
        let state = tempfile::tempdir().unwrap();
        let store = VariantStore::open(state.path()).unwrap();
        let mut made = Vec::new();
        for i in 0..4u8 {
            let src = state.path().join(format!("s{i}"));
            fs::write(&src, vec![i; 100]).unwrap();
            made.push(store.publish(&src).unwrap());
        }
        // A stray file with a non-hash name and a stale staging file.
        fs::write(made[0].path.with_file_name("junk"), b"x").unwrap();
        let stale = store.root().join(STAGING).join("variant-old");
        fs::write(&stale, b"yy").unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        let keep: HashSet<ContentId> = [made[1].content, made[3].content].into();
        // Within the grace period nothing published goes (only the stale staging file).
        let report = store.gc(&keep).unwrap();
        assert_eq!(report, GcReport { removed: 1, freed_bytes: 2, kept: 5 });
        let report = store.gc_older_than(&keep, Duration::ZERO).unwrap();
        assert_eq!(report, GcReport { removed: 3, freed_bytes: 201, kept: 2 });
        assert!(!made[0].path.exists() && !made[2].path.exists());
        assert!(made[1].path.exists() && made[3].path.exists());
        assert!(!stale.exists());
    }
}

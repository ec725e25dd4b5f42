//! Which binary a running program's executable stands for, as the overlay sees it: the
//! profiler asks once per process, with the path the kernel reports for its main mapping.
//!
//! Only binaries in the overlaid directories can ever be served optimized, so only they are
//! profiled (this also spares hashing every other program on the machine):
//! - a path under the mountpoint (the program was started through the mount) maps back to
//!   its original with [`Overlay::original_of`], by the mapping's inode number, which is the
//!   mount's node id and names exactly what the process was served: the original (and which
//!   version of it), or a variant, whose samples (other addresses) are counted but kept out
//!   of the profile. While execs are split between a canary and the original this is the
//!   only way to tell; a mapping whose node the server does not know is then ignored;
//! - a variant's file in the store (FUSE passthrough may show the backing file) is a
//!   variant of the original the serving table names;
//! - a file directly in an overlaid directory (started without the mount, or passed
//!   through as a link to the real file) is the original itself;
//! - anything else, and binaries the user excluded or the config's allow/deny lists leave
//!   alone, are ignored.
//!
//! The kernel appends ` (deleted)` to the path of a mapping whose dentry was unhashed. Under
//! the mount that happens all the time without any file being deleted: every entry
//! invalidation (a binary indexed, a variant served, a change in the directory) unhashes
//! the dentries of the programs running from it. So under the mount the suffix is dropped
//! and the path resolved as usual; the node id still tells which version of the original
//! the process runs, so a process of a version since replaced is not counted for the new
//! one. Outside the mount the suffix means the file really is gone or replaced: its samples
//! cannot be matched to what is at the path now, so they are ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::fs::{MappedOriginal, Overlay};
use crate::profile::{PathResolver, Resolved};

/// A [`PathResolver`] over the running overlay.
pub struct OverlayResolver {
    overlay: Arc<Overlay>,
    config: Arc<Config>,
    overlay_dirs: Vec<PathBuf>,
}

impl OverlayResolver {
    pub fn new(overlay: Arc<Overlay>, config: Arc<Config>) -> Self {
        let overlay_dirs = overlay.overlay_dirs();
        Self { overlay, config, overlay_dirs }
    }

    /// Whether optbin may profile (and so later optimize) `original`.
    fn allowed(&self, original: &Path) -> bool {
        !self.overlay.serving().is_excluded(original) && self.config.permits(original)
    }

    fn in_overlay_dir(&self, path: &Path) -> bool {
        crate::config::in_overlaid_dir(&self.overlay_dirs, path)
    }
}

/// What the kernel appends to the path of a mapping whose dentry was unhashed.
const DELETED_SUFFIX: &str = " (deleted)";

/// `mapped` without the kernel's ` (deleted)` suffix, if it had one.
fn strip_deleted(mapped: &Path) -> Option<&Path> {
    use std::os::unix::ffi::OsStrExt;
    let stem = mapped.as_os_str().as_bytes().strip_suffix(DELETED_SUFFIX.as_bytes())?;
    Some(Path::new(std::ffi::OsStr::from_bytes(stem)))
}

impl PathResolver for OverlayResolver {
    fn resolve(&self, mapped: &Path, file: Option<(u64, u64)>) -> Resolved {
        let mapped = match strip_deleted(mapped) {
            Some(stem) if stem.starts_with(self.overlay.mountpoint()) => stem,
            Some(_) => return Resolved::Ignore,
            None => mapped,
        };
        let in_mount = mapped.starts_with(self.overlay.mountpoint());
        let node_id = file.filter(|_| in_mount).map(|(_, ino)| ino);
        if let Some(MappedOriginal { original, variant, version }) =
            self.overlay.original_of(mapped, node_id)
        {
            if !self.in_overlay_dir(&original) || !self.allowed(&original) {
                return Resolved::Ignore;
            }
            return match variant {
                Some(id) => Resolved::Variant { original, variant: Some(id) },
                None => Resolved::Original { path: original, version },
            };
        }
        // Unknown files of the mount, and of the state directory (variants the serving
        // table does not know, BOLT's scratch copies): their addresses are not an
        // original's.
        if mapped.starts_with(self.overlay.mountpoint())
            || mapped.starts_with(&self.config.state_dir)
        {
            return Resolved::Ignore;
        }
        if self.in_overlay_dir(mapped) && self.allowed(mapped) {
            return Resolved::Original { path: mapped.to_path_buf(), version: file };
        }
        Resolved::Ignore
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::{FileConfig, Overrides};
    use crate::fs::{NoEvents, OverlayConfig, ServedVariant, ServingTable, StaticControl};
    use crate::identity::FileKey;

    struct World {
        _tmp: tempfile::TempDir,
        bin: PathBuf,
        mnt: PathBuf,
        state: PathBuf,
        serving: Arc<ServingTable>,
        resolver: OverlayResolver,
    }

    fn world(deny: &[&str]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let (bin, mnt, state) = (root.join("bin"), root.join("mnt"), root.join("state"));
        for d in [&bin, &mnt, &state] {
            std::fs::create_dir(d).unwrap();
        }
        for name in ["prog", "excluded", "denied"] {
            let p = bin.join(name);
            std::fs::write(&p, b"\x7fELF").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let file =
            FileConfig { deny: deny.iter().map(|d| d.to_string()).collect(), ..Default::default() };
        let cfg = Config::resolve(
            file,
            Overrides {
                mountpoint: Some(mnt.clone()),
                state_dir: Some(state.clone()),
                overlay: vec![bin.clone()],
                log: None,
            },
            None,
        )
        .unwrap();
        let serving = ServingTable::new();
        let overlay = Overlay::new(
            OverlayConfig {
                mountpoint: mnt.clone(),
                overlay_dirs: vec![bin.clone()],
                originals: None,
            },
            serving.clone(),
            None,
            Arc::new(StaticControl::default()),
            Arc::new(NoEvents),
        )
        .unwrap();
        serving.set_excluded(&bin.join("excluded"), true);
        let resolver = OverlayResolver::new(overlay, Arc::new(cfg));
        World { _tmp: tmp, bin, mnt, state, serving, resolver }
    }

    fn in_mount(mnt: &Path, real: &Path) -> PathBuf {
        mnt.join(real.strip_prefix("/").unwrap())
    }

    #[test]
    fn originals_are_binaries_of_the_overlaid_dirs_reached_either_way() {
        let w = world(&[]);
        let prog = w.bin.join("prog");
        let r = |p: &Path| w.resolver.resolve(p, None);
        assert_eq!(r(&in_mount(&w.mnt, &prog)), Resolved::original(&prog));
        assert_eq!(r(&w.mnt.join("bin/prog")), Resolved::original(&prog));
        assert_eq!(r(&prog), Resolved::original(&prog), "started without the mount");
        let key = FileKey::of(&prog).unwrap();
        assert_eq!(
            w.resolver.resolve(&prog, Some((key.dev, key.ino))),
            Resolved::Original { path: prog.clone(), version: Some((key.dev, key.ino)) },
            "the mapping's (dev, ino) name the version"
        );
        assert_eq!(r(Path::new("/usr/bin/env")), Resolved::Ignore, "not overlaid");
        assert_eq!(r(&w.bin.join("sub/prog")), Resolved::Ignore, "below, not in, the dir");
        assert_eq!(r(&w.mnt.join(".optbin/status")), Resolved::Ignore);
        assert_eq!(r(&w.mnt.join("bin/missing")), Resolved::Ignore);
    }

    #[test]
    fn unhashed_mount_dentries_still_resolve_but_deleted_real_files_do_not() {
        let w = world(&[]);
        let prog = w.bin.join("prog");
        let r = |p: PathBuf| w.resolver.resolve(&p, None);
        let deleted = |p: &Path| PathBuf::from(format!("{} (deleted)", p.display()));
        assert_eq!(r(deleted(&in_mount(&w.mnt, &prog))), Resolved::original(&prog));
        assert_eq!(r(deleted(&prog)), Resolved::Ignore, "the real file is gone or replaced");
        assert_eq!(strip_deleted(Path::new("/a/b")), None);
        assert_eq!(strip_deleted(Path::new("/a/b (deleted)")), Some(Path::new("/a/b")));
    }

    #[test]
    fn served_variants_are_told_apart_and_unknown_state_files_ignored() {
        let w = world(&[]);
        let prog = w.bin.join("prog");
        let stored = w.state.join("variants/ab/abcd");
        std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
        std::fs::copy(&prog, &stored).unwrap();
        let variant = ServedVariant {
            variant_id: 7,
            path_in_store: stored.clone(),
            size: 4,
            expected_original: FileKey::of(&prog).unwrap(),
        };
        w.serving.serve(&prog, Some(variant));
        let r = |p: &Path| w.resolver.resolve(p, None);
        let as_variant = Resolved::Variant { original: prog.clone(), variant: Some(7) };
        assert_eq!(r(&in_mount(&w.mnt, &prog)), as_variant, "the mount serves the variant");
        assert_eq!(r(&stored), as_variant, "the backing file of a passthrough mapping");
        assert_eq!(r(&prog), Resolved::original(&prog), "the real file is the original");
        assert_eq!(r(&w.state.join("variants/cd/cdef")), Resolved::Ignore, "unknown variant");
    }

    #[test]
    fn exclusions_and_deny_lists_are_ignored() {
        let w = world(&["/**/denied"]);
        let r = |p: &Path| w.resolver.resolve(p, None);
        for name in ["excluded", "denied"] {
            let real = w.bin.join(name);
            assert_eq!(r(&real), Resolved::Ignore, "{name}");
            assert_eq!(r(&in_mount(&w.mnt, &real)), Resolved::Ignore, "{name} via the mount");
        }
    }
}

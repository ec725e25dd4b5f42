//! Core tests without FUSE: namespace, classification, node id stability across a
//! "restart" (a second overlay), serving-table switches and upgrades underneath.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::fs::node::{PATH_VIEW_ID, ROOT_ID};
use crate::identity::FileKey;

struct Fixture {
    _tmp: tempfile::TempDir,
    bin1: PathBuf,
    bin2: PathBuf,
    mount: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let bin1 = root.join("one/bin");
    let bin2 = root.join("two/bin");
    std::fs::create_dir_all(&bin1).unwrap();
    std::fs::create_dir_all(&bin2).unwrap();
    std::fs::create_dir_all(root.join("one/share")).unwrap();
    let exe = std::env::current_exe().unwrap();
    std::fs::copy(&exe, bin1.join("prog")).unwrap();
    std::fs::copy(&exe, bin2.join("prog")).unwrap();
    std::fs::copy(&exe, bin2.join("only2")).unwrap();
    std::fs::write(bin1.join("script"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(bin1.join("script"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("prog", bin1.join("alias")).unwrap();
    Fixture { _tmp: tmp, bin1, bin2, mount: root.join("mnt") }
}

fn overlay(
    f: &Fixture,
    serving: Arc<ServingTable>,
) -> (Arc<Overlay>, std::sync::mpsc::Receiver<FsEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let config = OverlayConfig {
        mountpoint: f.mount.clone(),
        overlay_dirs: vec![f.bin1.clone(), f.bin2.clone()],
        originals: None,
    };
    let o = Overlay::new(
        config,
        serving,
        None,
        Arc::new(StaticControl::new(&[("status", "ok\n")])),
        Arc::new(tx),
    )
    .unwrap();
    (o, rx)
}

/// Walks a path inside the mount through lookups.
fn walk(o: &Overlay, rel: &str) -> Entry {
    let mut ino = ROOT_ID;
    let mut entry = None;
    for part in Path::new(rel).components() {
        let e = o.lookup(ino, part.as_os_str()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        ino = e.attr.ino;
        entry = Some(e);
    }
    entry.unwrap()
}

fn rel(p: &Path) -> String {
    p.strip_prefix("/").unwrap().to_string_lossy().into_owned()
}

#[test]
fn namespace_classifies_and_points_the_path_view_at_the_first_match() {
    let f = fixture();
    let (o, rx) = overlay(&f, ServingTable::new());
    let prog = walk(&o, &format!("{}/prog", rel(&f.bin1)));
    assert_eq!(prog.attr.kind, NodeType::RegularFile);
    let md = std::fs::metadata(f.bin1.join("prog")).unwrap();
    assert_eq!(prog.attr.size, md.len());
    assert_eq!(prog.attr.perm, (md.permissions().mode() & 0o7555) as u16);
    assert!(matches!(rx.try_recv(), Ok(FsEvent::Seen { .. })));
    let script = walk(&o, &format!("{}/script", rel(&f.bin1)));
    assert_eq!(script.attr.kind, NodeType::Symlink);
    assert_eq!(o.readlink(script.attr.ino).unwrap(), f.bin1.join("script"));
    let alias = walk(&o, &format!("{}/alias", rel(&f.bin1)));
    assert_eq!(o.readlink(alias.attr.ino).unwrap(), PathBuf::from("prog"), "verbatim");
    let share = walk(&o, &format!("{}/share", rel(f.bin1.parent().unwrap())));
    assert_eq!(o.readlink(share.attr.ino).unwrap(), f.bin1.parent().unwrap().join("share"));

    let view = o.lookup(PATH_VIEW_ID, OsStr::new("prog")).unwrap();
    assert_eq!(o.readlink(view.attr.ino).unwrap(), f.mount.join(rel(&f.bin1)).join("prog"));
    let view2 = o.lookup(PATH_VIEW_ID, OsStr::new("only2")).unwrap();
    assert_eq!(o.readlink(view2.attr.ino).unwrap(), f.mount.join(rel(&f.bin2)).join("only2"));
    // What runs natively is reached straight from the PATH view; a real symlink through
    // the mirror (its target may be served).
    let view3 = o.lookup(PATH_VIEW_ID, OsStr::new("script")).unwrap();
    assert_eq!(o.readlink(view3.attr.ino).unwrap(), f.bin1.join("script"));
    let view4 = o.lookup(PATH_VIEW_ID, OsStr::new("alias")).unwrap();
    assert_eq!(o.readlink(view4.attr.ino).unwrap(), f.mount.join(rel(&f.bin1)).join("alias"));
    assert!(o.lookup(PATH_VIEW_ID, OsStr::new("missing")).is_err());
    let names: Vec<_> = o.readdir(PATH_VIEW_ID).unwrap().into_iter().map(|e| e.name).collect();
    assert!(names.contains(&"only2".into()) && names.contains(&"prog".into()));

    assert_eq!(o.resolve_name("prog"), Some(f.bin1.join("prog")));
    assert_eq!(o.resolve_name("only2"), Some(f.bin2.join("only2")));
    let mount_path = f.mount.join(rel(&f.bin2)).join("prog");
    let mapped = o.original_of(&mount_path, None).unwrap();
    assert_eq!((mapped.original, mapped.variant), (f.bin2.join("prog"), None));
    // Announced: what the lookups classified, in the mirror and from the PATH view (the
    // first prog, only2).
    assert_eq!(o.seen_binaries().len(), 2);

    let status = o.lookup(crate::fs::node::CONTROL_ROOT_ID, OsStr::new("status")).unwrap();
    match o.open(status.attr.ino, libc::O_RDONLY, 1).unwrap() {
        Opened::Control { content, .. } => assert_eq!(content, b"ok\n"),
        other => panic!("{other:?}"),
    }
    assert_eq!(o.open(prog.attr.ino, libc::O_WRONLY, 1).unwrap_err().errno, libc::EROFS);
}

#[test]
fn node_ids_survive_a_restart_and_change_with_the_variant_and_the_original() {
    let f = fixture();
    let serving = ServingTable::new();
    let (o, _rx) = overlay(&f, serving.clone());
    let path = format!("{}/prog", rel(&f.bin1));
    let original = walk(&o, &path);

    // A variant: a different file in a "store", built from this version of the original.
    let store = f.mount.parent().unwrap().join("store-7");
    std::fs::write(&store, b"variant bytes").unwrap();
    let key = FileKey::of(&f.bin1.join("prog")).unwrap();
    let variant = ServedVariant {
        variant_id: 7,
        path_in_store: store.clone(),
        size: 13,
        expected_original: key,
    };
    serving.serve(&f.bin1.join("prog"), Some(variant.clone()));
    let switched = walk(&o, &path);
    assert_ne!(switched.attr.ino, original.attr.ino);
    assert_eq!(switched.attr.size, 13);
    match o.open(switched.attr.ino, libc::O_RDONLY | FMODE_EXEC, 42).unwrap() {
        Opened::Binary { node, .. } => assert_eq!(node.variant.as_ref().unwrap().variant_id, 7),
        other => panic!("{other:?}"),
    }
    // The old node still serves the original.
    match o.open(original.attr.ino, libc::O_RDONLY, 42).unwrap() {
        Opened::Binary { node, .. } => assert!(node.variant.is_none()),
        other => panic!("{other:?}"),
    }
    let mapped = o.original_of(&store, None).unwrap();
    assert_eq!((mapped.original, mapped.variant), (f.bin1.join("prog"), Some(7)));

    // Execs split between the two: the node id a mapping carries says which one a process
    // got; without it there is no telling.
    serving.serve_share(&f.bin1.join("prog"), variant.clone(), 0.5);
    let mount_path = f.mount.join(&path);
    let by_node = |ino| o.original_of(&mount_path, Some(ino)).unwrap();
    assert_eq!(by_node(switched.attr.ino).variant, Some(7));
    assert_eq!(by_node(original.attr.ino).variant, None);
    assert_eq!(by_node(original.attr.ino).version, Some((key.dev, key.ino)));
    assert_eq!(o.original_of(&mount_path, None), None);

    // A new process (restart) resolves both ids without having handed them out.
    let (o2, _rx2) = overlay(&f, serving.clone());
    assert_eq!(o2.getattr(switched.attr.ino).unwrap().0, switched.attr);
    assert_eq!(o2.getattr(original.attr.ino).unwrap().0.ino, original.attr.ino);

    // An upgrade underneath: new key, so a new id serving the new original, no variant.
    let tmp = f.bin1.join(".prog.new");
    std::fs::copy(std::env::current_exe().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, f.bin1.join("prog")).unwrap();
    let upgraded = walk(&o, &path);
    assert!(upgraded.attr.ino != original.attr.ino && upgraded.attr.ino != switched.attr.ino);
    match o.open(upgraded.attr.ino, libc::O_RDONLY, 1).unwrap() {
        Opened::Binary { node, .. } => assert!(node.variant.is_none()),
        other => panic!("{other:?}"),
    }
    // The node of the replaced original refuses to open other bytes.
    assert_eq!(o.open(original.attr.ino, libc::O_RDONLY, 1).unwrap_err().errno, libc::ESTALE);

    // Excluded: a symlink to the real file.
    serving.set_excluded(&f.bin1.join("prog"), true);
    let excluded = walk(&o, &path);
    assert_eq!(excluded.attr.kind, NodeType::Symlink);
}

#[test]
fn a_binary_with_no_variant_is_passed_through_until_it_has_one() {
    let f = fixture();
    let serving = ServingTable::new();
    serving.set_native_until_variant(true);
    let (o, rx) = overlay(&f, serving.clone());
    let (path, real) = (format!("{}/prog", rel(&f.bin1)), f.bin1.join("prog"));

    // No variant: a symlink to the real file (it runs natively), still announced to the
    // indexer; a listing says the same.
    let native = walk(&o, &path);
    assert_eq!(native.attr.kind, NodeType::Symlink);
    assert_eq!(o.readlink(native.attr.ino).unwrap(), real);
    let seen =
        rx.try_iter().any(|e| matches!(e, FsEvent::Seen { original, .. } if original == real));
    assert!(seen, "a passed-through binary is announced");
    let dir = walk(&o, &rel(&f.bin1));
    let listed = o.readdir(dir.attr.ino).unwrap();
    let entry = listed.iter().find(|e| e.name == "prog").expect("prog listed");
    assert_eq!(entry.kind, NodeType::Symlink);

    // A variant to serve: a served file from the next lookup on; none again: a symlink.
    let store = f.mount.parent().unwrap().join("store-9");
    std::fs::write(&store, b"variant").unwrap();
    let variant = ServedVariant {
        variant_id: 9,
        path_in_store: store,
        size: 7,
        expected_original: FileKey::of(&real).unwrap(),
    };
    let view_target = || {
        let view = o.lookup(PATH_VIEW_ID, OsStr::new("prog")).unwrap();
        o.readlink(view.attr.ino).unwrap()
    };
    assert_eq!(view_target(), real, "the PATH view points straight at what runs natively");
    serving.serve_share(&real, variant, 0.5);
    assert!(!serving.passes_through(&real));
    assert_eq!(walk(&o, &path).attr.kind, NodeType::RegularFile);
    assert_eq!(view_target(), f.mount.join(&path), "and at the mirror for what is served");
    serving.serve(&real, None);
    assert_eq!(walk(&o, &path).attr.kind, NodeType::Symlink);
    assert_eq!(view_target(), real);

    // Binaries that are not optimizable stay what they were (the script: a symlink).
    assert_eq!(walk(&o, &format!("{}/script", rel(&f.bin1))).attr.kind, NodeType::Symlink);
}

/// A canary-style chooser: alternates between the original and a variant on every lookup.
struct Alternating {
    variant: ServedVariant,
    calls: std::sync::atomic::AtomicU64,
}

impl VariantChooser for Alternating {
    fn choose(&self, _original: &Path, key: &FileKey) -> Choice {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let variant =
            (n % 2 == 1 && self.variant.expected_original == *key).then(|| self.variant.clone());
        Choice { variant, per_exec: true }
    }
}

#[test]
fn a_per_exec_chooser_gets_every_lookup_and_no_entry_caching() {
    let f = fixture();
    let store = f.mount.parent().unwrap().join("store-9");
    std::fs::write(&store, b"v").unwrap();
    let key = FileKey::of(&f.bin1.join("prog")).unwrap();
    let chooser = Arc::new(Alternating {
        variant: ServedVariant {
            variant_id: 9,
            path_in_store: store,
            size: 1,
            expected_original: key,
        },
        calls: Default::default(),
    });
    let config = OverlayConfig {
        mountpoint: f.mount.clone(),
        overlay_dirs: vec![f.bin1.clone()],
        originals: None,
    };
    let o = Overlay::new(
        config,
        ServingTable::new(),
        Some(chooser),
        Arc::new(StaticControl::default()),
        Arc::new(NoEvents),
    )
    .unwrap();
    let path = format!("{}/prog", rel(&f.bin1));
    let a = walk(&o, &path);
    let b = walk(&o, &path);
    assert_eq!(a.entry_ttl, std::time::Duration::ZERO);
    assert_ne!(a.attr.ino, b.attr.ino);
    assert_eq!(walk(&o, &path).attr.ino, a.attr.ino, "the same choice is the same node");
}

/// Counts the choices asked for.
struct CountingChooser(Arc<ServingTable>, std::sync::atomic::AtomicUsize);

impl VariantChooser for CountingChooser {
    fn choose(&self, original: &Path, key: &FileKey) -> Choice {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        TableChooser(self.0.clone()).choose(original, key)
    }
}

/// Issue 9: listing a mirror (and the rebuild after a restart, which lists everything)
/// draws no per-exec choice and announces no binary; a lookup does both.
#[test]
fn listings_and_rebuilds_never_draw_nor_announce() {
    let f = fixture();
    let serving = ServingTable::new();
    let key = FileKey::of(&f.bin1.join("prog")).unwrap();
    let store = f.mount.parent().unwrap().join("store-9");
    std::fs::write(&store, b"variant").unwrap();
    let variant =
        ServedVariant { variant_id: 9, path_in_store: store, size: 7, expected_original: key };
    serving.serve_share(&f.bin1.join("prog"), variant, 0.5);
    let chooser = Arc::new(CountingChooser(serving.clone(), Default::default()));
    let (tx, rx) = std::sync::mpsc::channel();
    let config = OverlayConfig {
        mountpoint: f.mount.clone(),
        overlay_dirs: vec![f.bin1.clone(), f.bin2.clone()],
        originals: None,
    };
    let o = Overlay::new(
        config,
        serving,
        Some(chooser.clone()),
        Arc::new(StaticControl::new(&[("status", "ok\n")])),
        Arc::new(tx),
    )
    .unwrap();
    let draws = || chooser.1.load(std::sync::atomic::Ordering::SeqCst);
    let dir = walk(&o, &rel(&f.bin1));
    let listed = o.opendir(dir.attr.ino, &Caller::ROOT).unwrap();
    let names: Vec<_> = listed.iter().map(|e| e.name.to_string_lossy().into_owned()).collect();
    assert_eq!(names[..2], [".", ".."]);
    assert!(names.contains(&"prog".to_string()));
    let prog = listed.iter().find(|e| e.name == "prog").unwrap();
    assert_eq!(prog.kind, NodeType::RegularFile, "served files are listed as files");
    o.opendir(PATH_VIEW_ID, &Caller::ROOT).unwrap();
    o.rebuild();
    assert_eq!(draws(), 0, "a listing drew");
    assert_eq!(rx.try_iter().filter(|e| matches!(e, FsEvent::Seen { .. })).count(), 0);
    assert!(o.seen_binaries().is_empty());
    walk(&o, &format!("{}/prog", rel(&f.bin1)));
    assert_eq!(draws(), 1);
    assert_eq!(rx.try_iter().filter(|e| matches!(e, FsEvent::Seen { .. })).count(), 1);
}

#[test]
fn a_changed_binary_that_was_looked_up_is_announced_again_without_a_lookup() {
    let f = fixture();
    let serving = ServingTable::new();
    serving.set_native_until_variant(true);
    let (o, rx) = overlay(&f, serving);
    let real = f.bin1.join("prog");
    let seen = || -> Vec<FileKey> {
        rx.try_iter()
            .filter_map(|e| match e {
                FsEvent::Seen { original, key } if original == real => Some(key),
                _ => None,
            })
            .collect()
    };
    walk(&o, &format!("{}/prog", rel(&f.bin1)));
    let first = seen();
    assert_eq!(first.len(), 1);

    // An upgrade by rename: it runs natively, so no lookup would tell the daemon of it.
    let staged = f.bin1.join(".prog.new");
    std::fs::copy(&real, &staged).unwrap();
    std::fs::OpenOptions::new().append(true).open(&staged).unwrap().write_all(b"v2").unwrap();
    std::fs::rename(&staged, &real).unwrap();
    o.revisit_changed(&f.bin1, OsStr::new("prog"));
    let again = seen();
    assert_eq!(again, [FileKey::of(&real).unwrap()]);
    assert_ne!(again, first);
    // The same version noticed twice is announced once.
    o.revisit_changed(&f.bin1, OsStr::new("prog"));
    assert!(seen().is_empty());
    // An entry nobody looked up is left unread.
    std::fs::copy(&real, f.bin2.join("only2")).unwrap();
    o.revisit_changed(&f.bin2, OsStr::new("only2"));
    assert!(rx.try_iter().next().is_none(), "an entry nobody looked up was announced");
}

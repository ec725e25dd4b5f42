//! The serving table: which bytes the overlay serves for each original binary.
//!
//! The daemon writes it (policy decisions, exclusions); the overlay reads it on every lookup,
//! so it is an in-memory map behind a lock: no SQLite and no hashing on the exec path. Every
//! change notifies the subscribers (the overlay), which invalidate the kernel's cached entries
//! so that the next exec looks the binary up again and gets a new inode.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::identity::FileKey;

/// One variant of an original binary, ready to be served in its place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServedVariant {
    /// The catalog's id of the variant (never 0: node ids use 0 for "the original").
    pub variant_id: i64,
    /// Where its bytes are (a file in the variant store that never changes).
    pub path_in_store: PathBuf,
    pub size: u64,
    /// The original the variant was built from; it is served only while the file at the
    /// original path still has this key (an upgrade underneath makes it stale at once).
    pub expected_original: FileKey,
}

/// What a [`VariantChooser`] decided for one lookup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Choice {
    /// `None` serves the original.
    pub variant: Option<ServedVariant>,
    /// The choice is made per exec (e.g. a canary): the kernel must not cache the entry, so
    /// every exec looks it up again (entry TTL 0).
    pub per_exec: bool,
}

/// Picks the variant served for one lookup of an original. Called on the exec path: it must
/// be cheap and must not block (no I/O, no database).
pub trait VariantChooser: Send + Sync {
    fn choose(&self, original: &Path, key: &FileKey) -> Choice;
}

/// Called with the original path whose serving changed.
type Subscriber = Box<dyn Fn(&Path) + Send + Sync>;

#[derive(Default)]
struct Table {
    served: HashMap<PathBuf, ServedVariant>,
    /// Every variant the table was told about, served now or before: after a restart of the
    /// server process the kernel may still hold their node ids, which must stay resolvable.
    known: HashMap<PathBuf, Vec<ServedVariant>>,
    excluded: HashSet<PathBuf>,
}

/// The shared serving table. Cheap to read; writes notify subscribers.
#[derive(Default)]
pub struct ServingTable {
    table: RwLock<Table>,
    subscribers: RwLock<Vec<Subscriber>>,
}

impl std::fmt::Debug for ServingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.read();
        f.debug_struct("ServingTable")
            .field("served", &t.served.len())
            .field("excluded", &t.excluded.len())
            .finish()
    }
}

impl ServingTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `variant` for `original` from now on (`None`: the original). The kernel's
    /// cached entries for it are invalidated, so the next exec gets the new inode; running
    /// processes keep the inode they have.
    pub fn serve(&self, original: &Path, variant: Option<ServedVariant>) {
        {
            let mut t = self.write();
            match variant {
                Some(v) => {
                    let known = t.known.entry(original.to_path_buf()).or_default();
                    if !known.contains(&v) {
                        known.push(v.clone());
                    }
                    t.served.insert(original.to_path_buf(), v);
                }
                None => {
                    t.served.remove(original);
                }
            }
        }
        self.notify(original);
    }

    /// Records a variant that exists (served before, e.g. by a previous server process) so
    /// that its node id stays resolvable; it does not change what is served.
    pub fn remember(&self, original: &Path, variant: ServedVariant) {
        let mut t = self.write();
        let known = t.known.entry(original.to_path_buf()).or_default();
        if !known.contains(&variant) {
            known.push(variant);
        }
    }

    /// Excludes `original` (it is then presented as a symlink to itself: never served as a
    /// file, so it runs natively) or includes it again.
    pub fn set_excluded(&self, original: &Path, excluded: bool) {
        let changed = {
            let mut t = self.write();
            if excluded {
                t.excluded.insert(original.to_path_buf())
            } else {
                t.excluded.remove(original)
            }
        };
        if changed {
            self.notify(original);
        }
    }

    pub fn is_excluded(&self, original: &Path) -> bool {
        self.read().excluded.contains(original)
    }

    /// The variant configured for `original`, if any (whether or not it is still valid for
    /// the file currently there).
    pub fn served(&self, original: &Path) -> Option<ServedVariant> {
        self.read().served.get(original).cloned()
    }

    /// All variants ever configured for `original`.
    pub fn known_variants(&self, original: &Path) -> Vec<ServedVariant> {
        self.read().known.get(original).cloned().unwrap_or_default()
    }

    /// The original a store file belongs to, if the table knows it.
    pub fn original_of_store_path(&self, path: &Path) -> Option<(PathBuf, i64)> {
        let t = self.read();
        t.known.iter().find_map(|(original, variants)| {
            variants
                .iter()
                .find(|v| v.path_in_store == path)
                .map(|v| (original.clone(), v.variant_id))
        })
    }

    /// Registers a callback run after every change, with the original path that changed.
    pub fn subscribe(&self, callback: impl Fn(&Path) + Send + Sync + 'static) {
        self.subscribers.write().unwrap_or_else(|e| e.into_inner()).push(Box::new(callback));
    }

    fn notify(&self, original: &Path) {
        for s in self.subscribers.read().unwrap_or_else(|e| e.into_inner()).iter() {
            s(original);
        }
    }
}

/// The default chooser: what the serving table says, valid only for the original it was
/// built from.
#[derive(Debug)]
pub struct TableChooser(pub Arc<ServingTable>);

impl VariantChooser for TableChooser {
    fn choose(&self, original: &Path, key: &FileKey) -> Choice {
        let variant = self.0.served(original).filter(|v| v.expected_original == *key);
        Choice { variant, per_exec: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn key(ino: u64) -> FileKey {
        FileKey { dev: 1, ino, size: 10, mtime_ns: 1, ctime_ns: 1 }
    }

    #[test]
    fn variant_is_served_only_for_its_original() {
        let table = ServingTable::new();
        let changed = Arc::new(Mutex::new(Vec::new()));
        let c = changed.clone();
        table.subscribe(move |p| c.lock().unwrap().push(p.to_path_buf()));
        let v = ServedVariant {
            variant_id: 7,
            path_in_store: "/store/7".into(),
            size: 3,
            expected_original: key(1),
        };
        let chooser = TableChooser(table.clone());
        let original = Path::new("/usr/bin/x");
        assert_eq!(chooser.choose(original, &key(1)).variant, None);
        table.serve(original, Some(v.clone()));
        assert_eq!(chooser.choose(original, &key(1)).variant, Some(v.clone()));
        assert_eq!(chooser.choose(original, &key(2)).variant, None, "stale after upgrade");
        table.serve(original, None);
        assert_eq!(chooser.choose(original, &key(1)).variant, None);
        assert_eq!(table.known_variants(original), vec![v]);
        assert_eq!(table.original_of_store_path(Path::new("/store/7")), Some((original.into(), 7)));
        table.set_excluded(original, true);
        table.set_excluded(original, true);
        assert!(table.is_excluded(original));
        assert_eq!(changed.lock().unwrap().len(), 3, "serve, unserve, exclude (once)");
    }
}

//! The serving table: which bytes the overlay serves for each original binary.
//!
//! The daemon writes it (policy decisions, exclusions); the overlay reads it on every lookup,
//! so it is an in-memory map behind a lock: no SQLite and no hashing on the exec path. Every
//! change notifies the subscribers (the overlay), which invalidate the kernel's cached entries
//! so that the next exec looks the binary up again and gets a new inode.
//!
//! A served variant has a share of execs: 1.0 serves it to every exec; a share below 1.0
//! (a canary, or a promoted variant that leaves some execs to the original to keep measuring
//! it) is drawn per lookup, uniformly at random, and the choice is marked per exec so the
//! kernel asks again for the next exec.
//!
//! One exec can cost two lookups: the kernel revalidates its cached entry with a lookup and,
//! when the answer names another node, drops the entry and looks the name up again. Drawing
//! afresh for the second lookup would make the served node sticky (an exec would switch only
//! when both draws say so: a share p would become p²/(p²+(1-p)²), 0.997 for 0.95; and a 0.5
//! canary would come in long runs). So a draw is reused for lookups of the same original
//! within [`DRAW_REUSE`]: every exec gets the variant with probability exactly p.
//!
//! A second variant may share the execs too (a challenger's canary: the challenger, the
//! served variant and the original each get a share): a draw below the first share picks
//! the first variant, below the sum of both shares the second, else the original.
//!
//! A served entry may be bound (see [`Bind`]): its variant is bind-mounted over the mirror
//! entry and every exec reaches it with no request; the chooser then answers a lookup with
//! the variant, cached, and the mount does the rest. In a window between binds the entry
//! draws per exec again, with both arms even (a 0.5 share), so that the few runs made
//! through the mount give the policy its pairs.
//!
//! Draws come in antithetic pairs: a fresh uniform `u` for one exec, `1 - u` for the next.
//! Each exec still gets the variant with probability exactly p, but for a 0.5 canary the
//! two execs of a pair always get one arm each, in random order: consecutive runs of the
//! two arms are what the policy pairs, so every two execs give a pair instead of about
//! every three with independent draws (decisions take a third fewer execs); for a small
//! share the variant never gets both execs of a pair.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::identity::FileKey;

/// How long a per-exec draw is reused for the same original (see the module doc): longer
/// than the kernel takes between the two lookups of one exec (tens of microseconds), shorter
/// than one exec of the smallest program through the mount (about a millisecond).
pub const DRAW_REUSE: Duration = Duration::from_micros(500);

/// The variant's share of execs in a window between binds ([`Bind::Window`]): even arms, so
/// that the window's two execs are one run of each, in random order (antithetic draws).
pub const WINDOW_SHARE: f64 = 0.5;

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

/// A served variant the binder may bind over its entry ([`ServingTable::bindable`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Bindable {
    pub variant: ServedVariant,
    /// Its share of execs (the original keeps the rest, through windows).
    pub share: f64,
    /// One run in this many is sampled: counted through the mount; when bound, read for
    /// its command line.
    pub sample_one_in: u32,
}

/// Picks the variant served for one lookup of an original. Called on the exec path: it must
/// be cheap and must not block (no I/O, no database).
pub trait VariantChooser: Send + Sync {
    fn choose(&self, original: &Path, key: &FileKey) -> Choice;
}

/// Called with the original path whose serving changed.
type Subscriber = Box<dyn Fn(&Path) + Send + Sync>;

/// How a served entry reaches execs (see the module doc). Set by the binder
/// (`crate::daemon::serving::binding`); any change of what is served resets it to
/// [`Bind::Fuse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bind {
    /// Through the mount: every exec looked up, drawn and opened as configured.
    #[default]
    Fuse,
    /// The variant is bind-mounted over the entry: a lookup gets the variant, cached, so
    /// the kernel crosses into the bind mount without asking.
    Bound,
    /// Between two binds: through the mount, each exec drawn with even arms and counted.
    Window,
}

/// What one exec-time run gets ([`ServingTable::exec_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecRun {
    /// Counters: always, unless the policy samples the runs (a served variant); then with
    /// probability `1 / count_one_in`, drawn independently of the arm the exec got. A run
    /// in a window between binds is always counted: those runs are the pairs.
    pub counted: bool,
    /// The exec is one of a window between binds ([`Bind::Window`]): the binder counts them.
    pub in_window: bool,
}

/// A variant configured for an original, with the share of execs it gets.
#[derive(Debug, Clone, PartialEq)]
struct ServedShare {
    variant: ServedVariant,
    /// Within 0..=1: the probability that one exec gets the variant.
    share: f64,
    /// A second variant and its probability (within 0..=1-share).
    second: Option<(ServedVariant, f64)>,
    /// One exec-time run in this many gets counters (1: every run; see
    /// [`ServingTable::exec_run`]). Not part of what is served: a change of it alone
    /// invalidates nothing.
    count_one_in: u32,
    /// How execs reach it; not part of what is served.
    bind: Bind,
}

impl ServedShare {
    /// What the kernel's cached entries depend on: everything but `count_one_in` and
    /// `bind`.
    fn arms(&self) -> (&ServedVariant, f64, Option<&(ServedVariant, f64)>) {
        (&self.variant, self.share, self.second.as_ref())
    }
}

#[derive(Default)]
struct Table {
    served: HashMap<PathBuf, ServedShare>,
    /// Every variant the table was told about, served now or before: after a restart of the
    /// server process the kernel may still hold their node ids, which must stay resolvable.
    known: HashMap<PathBuf, Vec<ServedVariant>>,
    /// Excluded originals, with when each was excluded ([`crate::clock::monotonic_ns`]).
    excluded: HashMap<PathBuf, u64>,
    /// Originals with no variant configured are passed through (see
    /// [`ServingTable::set_native_until_variant`]).
    native_until_variant: bool,
}

/// The per-exec draws of an original: the last one (when, and whether it chose the
/// variant), and the antithetic draw owed to the next exec, if any.
#[derive(Debug, Clone, Copy)]
struct Draws {
    at: Instant,
    chose: Arm,
    owed: Option<f64>,
}

/// Which of an entry's arms a draw chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Original,
    First,
    Second,
}

/// The shared serving table. Cheap to read; writes notify subscribers.
#[derive(Default)]
pub struct ServingTable {
    table: RwLock<Table>,
    /// Per-exec draws, reused within [`DRAW_REUSE`]; cleared when an entry changes.
    draws: Mutex<HashMap<PathBuf, Draws>>,
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

    /// Serves `variant` for `original` to every exec from now on (`None`: the original).
    /// The kernel's cached entries for it are invalidated, so the next exec gets the new
    /// inode; running processes keep the inode they have.
    pub fn serve(&self, original: &Path, variant: Option<ServedVariant>) {
        match variant {
            Some(v) => self.serve_share(original, v, 1.0),
            None => {
                // Unchanged serving must not invalidate: every invalidation makes the kernel
                // look the name up again and renames running programs' exe "(deleted)".
                if self.write().served.remove(original).is_some() {
                    self.forget_draw(original);
                    self.notify(original);
                }
            }
        }
    }

    /// Serves `variant` for `original` to a `share` of execs (clamped to 0..=1; NaN counts
    /// as 0), the original to the rest, each exec drawn at random. A share of 1.0 is
    /// [`ServingTable::serve`].
    pub fn serve_share(&self, original: &Path, variant: ServedVariant, share: f64) {
        self.serve_arms(original, variant, share, None, 1);
    }

    /// As [`ServingTable::serve_share`], with a `second` variant for its share of execs
    /// (clamped to what the first leaves), the original getting the rest, and counters on
    /// one exec-time run in `count_one_in` (1: every run). Returns whether what is served
    /// changed (then the kernel's entries were invalidated); the sampling rate changes in
    /// the same write, so a canary that starts again counts every run from its first.
    pub fn serve_arms(
        &self,
        original: &Path,
        variant: ServedVariant,
        share: f64,
        second: Option<(ServedVariant, f64)>,
        count_one_in: u32,
    ) -> bool {
        let clamp = |s: f64, max: f64| if s.is_nan() { 0.0 } else { s.clamp(0.0, max) };
        let share = clamp(share, 1.0);
        let second = second.map(|(v, s)| (v, clamp(s, 1.0 - share))).filter(|(_, s)| *s > 0.0);
        let changed = {
            let mut t = self.write();
            let known = t.known.entry(original.to_path_buf()).or_default();
            for v in std::iter::once(&variant).chain(second.as_ref().map(|(v, _)| v)) {
                if !known.contains(v) {
                    known.push(v.clone());
                }
            }
            let mut entry = ServedShare {
                variant,
                share,
                second,
                count_one_in: count_one_in.max(1),
                bind: Bind::Fuse,
            };
            let old = t.served.get(original).cloned();
            let changed = old.as_ref().map(ServedShare::arms) != Some(entry.arms());
            if !changed && let Some(old) = &old {
                entry.bind = old.bind;
            }
            t.served.insert(original.to_path_buf(), entry);
            changed
        };
        if changed {
            self.forget_draw(original);
            self.notify(original);
        }
        changed
    }

    /// What the binder may bind for `original`: a promoted variant served alone with its
    /// runs sampled (a canary, a challenger and an instrumented variant count every run
    /// through the mount).
    pub fn bindable(&self, original: &Path) -> Option<Bindable> {
        let t = self.read();
        let s = t.served.get(original)?;
        (s.second.is_none() && s.count_one_in > 1 && s.share > 0.0).then(|| Bindable {
            variant: s.variant.clone(),
            share: s.share,
            sample_one_in: s.count_one_in,
        })
    }

    /// How execs reach `original`'s served entry ([`Bind::Fuse`] when none).
    pub fn bind_of(&self, original: &Path) -> Bind {
        self.read().served.get(original).map_or(Bind::Fuse, |s| s.bind)
    }

    /// Sets how execs reach `original`'s served entry; returns whether it changed (then the
    /// kernel's entries were invalidated, which also detaches a bind mount on them). An
    /// original with nothing served is left alone.
    pub fn set_bind(&self, original: &Path, bind: Bind) -> bool {
        let changed = {
            let mut t = self.write();
            match t.served.get_mut(original) {
                Some(s) if s.bind != bind => {
                    s.bind = bind;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.forget_draw(original);
            self.notify(original);
        }
        changed
    }

    /// One in how many exec-time runs of `original` get counters (1 when nothing is
    /// served for it).
    #[cfg(test)]
    pub fn count_one_in(&self, original: &Path) -> u32 {
        self.read().served.get(original).map_or(1, |s| s.count_one_in)
    }

    /// Whether this exec-time run of `original` gets counters (see [`ExecRun`]).
    #[cfg(test)]
    pub fn counts_run(&self, original: &Path) -> bool {
        self.exec_run(original).counted
    }

    /// What an exec-time run of `original` gets, from one read of the table (it is asked
    /// on every exec-time `OPEN`).
    pub fn exec_run(&self, original: &Path) -> ExecRun {
        let (one_in, bind) =
            self.read().served.get(original).map_or((1, Bind::Fuse), |s| (s.count_one_in, s.bind));
        let counted = match (one_in, bind) {
            (_, Bind::Window) | (0 | 1, _) => true,
            (n, _) => rand::random_ratio(1, n),
        };
        ExecRun { counted, in_window: bind == Bind::Window }
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
                match t.excluded.entry(original.to_path_buf()) {
                    Entry::Occupied(_) => false,
                    Entry::Vacant(e) => {
                        e.insert(crate::clock::monotonic_ns());
                        true
                    }
                }
            } else {
                t.excluded.remove(original).is_some()
            }
        };
        if changed {
            self.notify(original);
        }
    }

    pub fn is_excluded(&self, original: &Path) -> bool {
        self.read().excluded.contains_key(original)
    }

    /// Whether `original` was already excluded at `at_ns` ([`crate::clock::monotonic_ns`]):
    /// an exec's event is handled a moment after the exec, perhaps after an exclusion that
    /// came later.
    pub fn was_excluded_at(&self, original: &Path, at_ns: u64) -> bool {
        self.read().excluded.get(original).is_some_and(|&since| since <= at_ns)
    }

    /// With `on`, an original that has no variant configured is presented as a symlink to
    /// itself, as an excluded one is: its execs make no FUSE request and run natively, at
    /// native speed, and they are not measured (a run of the original is evidence only
    /// next to runs of a variant, see `crate::policy`). The first variant configured for it
    /// turns it into a served file (the change invalidates its entries like any other).
    /// Off (the table's default, and the in-process overlay's): every optimizable original
    /// is served as a file through the mount.
    pub fn set_native_until_variant(&self, on: bool) {
        // Set once at start, before anything is looked up: no cached entry to invalidate.
        self.write().native_until_variant = on;
    }

    /// Whether `original` is passed through because it has no variant configured (see
    /// [`ServingTable::set_native_until_variant`]).
    pub fn passes_through(&self, original: &Path) -> bool {
        let t = self.read();
        t.native_until_variant && !t.served.contains_key(original)
    }

    /// The variant configured for `original`, if any (whether or not it is still valid for
    /// the file currently there).
    pub fn served(&self, original: &Path) -> Option<ServedVariant> {
        self.read().served.get(original).map(|s| s.variant.clone())
    }

    /// The variant configured for `original` with its share of execs (within 0..=1).
    pub fn served_share(&self, original: &Path) -> Option<(ServedVariant, f64)> {
        self.read().served.get(original).map(|s| (s.variant.clone(), s.share))
    }

    /// The second variant configured for `original` with its share, if any.
    #[cfg(test)]
    pub fn second_share(&self, original: &Path) -> Option<(ServedVariant, f64)> {
        self.read().served.get(original).and_then(|s| s.second.clone())
    }

    fn forget_draw(&self, original: &Path) {
        self.draws.lock().unwrap_or_else(|e| e.into_inner()).remove(original);
    }

    /// What one lookup of `original`, whose file now has `key`, gets for a uniform `draw`
    /// in [0, 1) at `now`: the variant only while the original is the one it was built
    /// from; a share strictly between 0 and 1 is a per-exec choice, made with `draw` (or,
    /// every second exec, with the antithetic `1 - u` of the draw before) unless a draw for
    /// this original was made less than [`DRAW_REUSE`] before `now`.
    pub fn choice(&self, original: &Path, key: &FileKey, draw: f64, now: Instant) -> Choice {
        let t = self.read();
        let Some(s) = t.served.get(original).filter(|s| s.variant.expected_original == *key) else {
            return Choice::default();
        };
        let (share, second_share) = match s.bind {
            Bind::Bound => return Choice { variant: Some(s.variant.clone()), per_exec: false },
            Bind::Window => (WINDOW_SHARE, 0.0),
            Bind::Fuse => (s.share, s.second.as_ref().map_or(0.0, |(_, p)| *p)),
        };
        if share >= 1.0 {
            Choice { variant: Some(s.variant.clone()), per_exec: false }
        } else if share <= 0.0 && second_share <= 0.0 {
            Choice::default()
        } else {
            let mut draws = self.draws.lock().unwrap_or_else(|e| e.into_inner());
            let last = draws.get(original).copied();
            let chose_variant = match last {
                Some(d) if now.saturating_duration_since(d.at) < DRAW_REUSE => d.chose,
                _ => {
                    let (u, owed) = match last.and_then(|d| d.owed) {
                        Some(u) => (u, None),
                        None => (draw, Some(1.0 - draw)),
                    };
                    let chose = if u < share {
                        Arm::First
                    } else if u < share + second_share {
                        Arm::Second
                    } else {
                        Arm::Original
                    };
                    draws.insert(original.to_path_buf(), Draws { at: now, chose, owed });
                    chose
                }
            };
            let variant = match chose_variant {
                Arm::Original => None,
                Arm::First => Some(s.variant.clone()),
                Arm::Second => s.second.as_ref().map(|(v, _)| v.clone()),
            };
            Choice { variant, per_exec: true }
        }
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
/// built from, with a fresh uniform draw per lookup for shared entries.
#[derive(Debug)]
pub struct TableChooser(pub Arc<ServingTable>);

impl VariantChooser for TableChooser {
    fn choose(&self, original: &Path, key: &FileKey) -> Choice {
        self.0.choice(original, key, rand::random::<f64>(), Instant::now())
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

    #[test]
    fn one_run_in_n_is_counted_while_sampled_and_every_run_after() {
        let table = ServingTable::new();
        let prog = Path::new("/usr/bin/prog");
        assert!((0..100).all(|_| table.counts_run(prog)), "every run by default");
        let served = variant(1, key(1));
        let sample = |n| table.serve_arms(prog, served.clone(), 0.95, None, n);
        assert!(sample(4), "a new entry");
        let counted = (0..8000).filter(|_| table.counts_run(prog)).count();
        // Binomial(8000, 1/4): mean 2000, sd 39.
        assert!((1800..2200).contains(&counted), "{counted} of 8000 counted at one in 4");
        assert_eq!(table.count_one_in(Path::new("/usr/bin/other")), 1, "per original");
        assert!(!sample(1), "the rate alone is not a change of what is served");
        assert!((0..100).all(|_| table.counts_run(prog)));
        sample(4);
        table.serve(prog, None);
        assert_eq!(table.count_one_in(prog), 1, "serving the original ends the sampling");
    }

    #[test]
    fn a_bound_entry_is_cached_and_a_window_draws_even_arms_and_counts_every_run() {
        let table = ServingTable::new();
        let notified = Arc::new(Mutex::new(0));
        let n = notified.clone();
        table.subscribe(move |_| *n.lock().unwrap() += 1);
        let prog = Path::new("/usr/bin/prog");
        let v = variant(1, key(1));
        assert_eq!(table.bindable(prog), None, "nothing served");
        table.serve_arms(prog, v.clone(), 0.95, None, 1);
        assert_eq!(table.bindable(prog), None, "every run counted: through the mount");
        table.serve_arms(prog, v.clone(), 0.5, Some((variant(2, key(1)), 0.3)), 8);
        assert_eq!(table.bindable(prog), None, "a challenger's canary: through the mount");
        table.serve_arms(prog, v.clone(), 0.95, None, 8);
        let want = Bindable { variant: v.clone(), share: 0.95, sample_one_in: 8 };
        assert_eq!(table.bindable(prog), Some(want));

        let before = *notified.lock().unwrap();
        assert!(table.set_bind(prog, Bind::Bound));
        assert!(!table.set_bind(prog, Bind::Bound), "unchanged");
        assert_eq!(*notified.lock().unwrap(), before + 1, "a change of bind invalidates");
        let t0 = Instant::now();
        for i in 1..=10 {
            let c = table.choice(prog, &key(1), 0.99, t0 + DRAW_REUSE * 2 * i);
            assert_eq!(c, Choice { variant: Some(v.clone()), per_exec: false }, "cached");
        }
        assert_eq!(table.choice(prog, &key(2), 0.0, t0).variant, None, "stale after an upgrade");

        table.set_bind(prog, Bind::Window);
        let arms: Vec<bool> = (1..=2)
            .map(|i| table.choice(prog, &key(1), 0.3, t0 + DRAW_REUSE * 2 * i).variant.is_some())
            .collect();
        assert_eq!(arms, [true, false], "even arms, antithetic: one of each");
        assert!((0..100).all(|_| table.counts_run(prog)), "a window counts every run");

        table.serve_arms(prog, v.clone(), 0.95, None, 8);
        assert_eq!(table.bind_of(prog), Bind::Window, "the same arms keep the bind");
        table.serve_arms(prog, variant(3, key(1)), 0.95, None, 8);
        assert_eq!(table.bind_of(prog), Bind::Fuse, "new arms reset it");
        table.serve(prog, None);
        assert!(!table.set_bind(prog, Bind::Bound), "nothing served: nothing to bind");
    }

    #[test]
    fn an_exec_before_an_exclusion_was_not_excluded_whenever_it_is_asked() {
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        let before = crate::clock::monotonic_ns();
        assert!(!table.was_excluded_at(original, before));
        table.set_excluded(original, true);
        let after = crate::clock::monotonic_ns();
        assert!(!table.was_excluded_at(original, before), "excluded later than that exec");
        assert!(table.was_excluded_at(original, after));
        // Excluding again keeps the first time; including forgets it.
        table.set_excluded(original, true);
        assert!(!table.was_excluded_at(original, before));
        table.set_excluded(original, false);
        assert!(!table.was_excluded_at(original, after));
        assert!(!table.is_excluded(original));
    }

    fn variant(id: i64, original: FileKey) -> ServedVariant {
        ServedVariant {
            variant_id: id,
            path_in_store: format!("/store/{id}").into(),
            size: 3,
            expected_original: original,
        }
    }

    #[test]
    fn a_share_below_one_is_drawn_per_exec_and_only_for_its_original() {
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        let v = variant(7, key(1));
        table.serve_share(original, v.clone(), 0.25);
        assert_eq!(table.served_share(original).map(|s| s.1), Some(0.25));
        assert_eq!(table.served(original), Some(v.clone()), "served() still names the variant");
        let t0 = Instant::now();
        let hit = table.choice(original, &key(1), 0.1, t0);
        assert_eq!(hit, Choice { variant: Some(v.clone()), per_exec: true });
        // The kernel's second lookup for the same exec gets the same answer.
        let again = table.choice(original, &key(1), 0.9, t0 + DRAW_REUSE / 2);
        assert_eq!(again, hit);
        let t1 = t0 + DRAW_REUSE;
        let miss = table.choice(original, &key(1), 0.25, t1);
        assert_eq!(miss, Choice { variant: None, per_exec: true });
        // Serving the same again changes nothing (no invalidation, the draw stands)...
        table.serve_share(original, v.clone(), 0.25);
        assert_eq!(table.choice(original, &key(1), 0.1, t1), miss);
        // ...a change of the entry forgets the draw.
        table.serve_share(original, v.clone(), 0.3);
        assert_eq!(table.choice(original, &key(1), 0.1, t1), hit);
        // An upgrade underneath: the original, and no reason to ask again per exec.
        let t2 = t1 + DRAW_REUSE;
        assert_eq!(table.choice(original, &key(2), 0.1, t2), Choice::default());

        // Full and empty shares are fixed choices the kernel may cache.
        table.serve_share(original, v.clone(), 1.0);
        let t3 = t2 + DRAW_REUSE;
        assert_eq!(
            table.choice(original, &key(1), 0.999, t3),
            Choice { variant: Some(v.clone()), per_exec: false }
        );
        table.serve_share(original, v.clone(), 0.0);
        assert_eq!(table.choice(original, &key(1), 0.0, t3), Choice::default());
        table.serve_share(original, v.clone(), f64::NAN);
        assert_eq!(table.served_share(original).map(|s| s.1), Some(0.0));
        table.serve_share(original, v.clone(), 7.0);
        assert_eq!(table.served_share(original).map(|s| s.1), Some(1.0));
        // serve() is a full share.
        table.serve(original, Some(variant(8, key(1))));
        assert_eq!(table.served_share(original).map(|s| s.1), Some(1.0));
        assert_eq!(table.known_variants(original).len(), 2);
    }

    /// The kernel's side of an exec on a per-exec entry: a revalidating lookup; if it names
    /// another node than the cached one, a second lookup whose answer the exec gets.
    fn exec_through_kernel(
        table: &ServingTable,
        original: &Path,
        cached: &mut bool,
        draw: &mut impl FnMut() -> f64,
        now: Instant,
    ) -> bool {
        let first = table.choice(original, &key(1), draw(), now).variant.is_some();
        if first != *cached {
            let second = table.choice(original, &key(1), draw(), now).variant.is_some();
            *cached = second;
        }
        *cached
    }

    #[test]
    fn every_exec_gets_the_share_despite_the_kernels_second_lookup() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(7);
        let mut draw = move || rng.random::<f64>();
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        table.serve_share(original, variant(7, key(1)), 0.95);
        let (n, mut cached, mut to_original) = (20_000, true, 0);
        let t0 = Instant::now();
        for i in 0..n {
            // Execs a millisecond apart; the two lookups of one exec at the same instant.
            let now = t0 + Duration::from_millis(i);
            to_original +=
                usize::from(!exec_through_kernel(&table, original, &mut cached, &mut draw, now));
        }
        // Binomial(20000, 0.05): mean 1000, sd 31; 6 sd either side. Without the reuse the
        // original would get p²/(p²+(1-p)²) of execs: about 55.
        assert!((814..=1186).contains(&to_original), "{to_original} of {n} execs");
    }

    #[test]
    fn draws_come_in_antithetic_pairs() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(3);
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        let t0 = Instant::now();
        let execs = |table: &ServingTable, rng: &mut rand::rngs::Xoshiro256PlusPlus, n| {
            (0..n)
                .map(|i| {
                    let now = t0 + Duration::from_millis(i);
                    table.choice(original, &key(1), rng.random::<f64>(), now).variant.is_some()
                })
                .collect::<Vec<bool>>()
        };
        // A 0.5 canary: each pair of execs has one of each arm, in random order.
        table.serve_share(original, variant(7, key(1)), 0.5);
        let arms = execs(&table, &mut rng, 2000);
        assert!(arms.chunks(2).all(|p| p[0] != p[1]));
        let variant_first = arms.chunks(2).filter(|p| p[0]).count();
        assert!((400..=600).contains(&variant_first), "{variant_first} of 1000 pairs");
        // A small share keeps its rate and never takes both execs of a pair.
        table.serve_share(original, variant(7, key(1)), 0.05);
        let arms = execs(&table, &mut rng, 20_000);
        assert!(arms.chunks(2).all(|p| !(p[0] && p[1])));
        let to_variant = arms.iter().filter(|a| **a).count();
        assert!((814..=1186).contains(&to_variant), "{to_variant} of 20000");
    }

    #[test]
    fn the_table_chooser_splits_lookups_by_the_share() {
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        table.serve_share(original, variant(7, key(1)), 0.3);
        let chooser = TableChooser(table.clone());
        let n = 600;
        let mut hits = 0;
        for _ in 0..n {
            let c = chooser.choose(original, &key(1));
            assert!(c.per_exec);
            hits += usize::from(c.variant.is_some());
            // Lookups of separate execs.
            std::thread::sleep(DRAW_REUSE);
        }
        // Binomial(600, 0.3): mean 180, sd 11.2; 6 sd either side.
        assert!((113..=247).contains(&hits), "{hits} of {n} lookups got the variant");
    }

    #[test]
    fn a_second_variant_gets_its_share_and_the_original_the_rest() {
        let table = ServingTable::new();
        let original = Path::new("/usr/bin/x");
        let (a, b) = (variant(7, key(1)), variant(8, key(1)));
        table.serve_arms(original, a.clone(), 0.45, Some((b.clone(), 0.5)), 1);
        assert_eq!(table.second_share(original).map(|s| s.1), Some(0.5));
        assert_eq!(table.known_variants(original).len(), 2);
        let t0 = Instant::now();
        let at = |i: u64, draw: f64| {
            let now = t0 + DRAW_REUSE * 2 * (i as u32 + 1);
            table.choice(original, &key(1), draw, now).variant.map(|v| v.variant_id)
        };
        // Fresh draws and their antithetic partners.
        assert_eq!(at(0, 0.1), Some(7));
        assert_eq!(at(1, 0.7), Some(8), "1 - 0.1 = 0.9 is in the second's share");
        assert_eq!(at(2, 0.97), None);
        assert_eq!(at(3, 0.5), Some(7), "1 - 0.97 = 0.03");
        // The second's share is clamped to what the first leaves.
        table.serve_arms(original, a, 0.8, Some((b, 0.5)), 1);
        assert!((table.second_share(original).unwrap().1 - 0.2).abs() < 1e-9);
    }
}

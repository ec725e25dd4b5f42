//! Serving a promoted variant with no FUSE request: the binder bind-mounts its store file
//! over the mirror entry (`crate::fuse::bind`), so an exec costs what a native one does.
//!
//! What is served is still the policy's decision alone: the binder only changes how a
//! served entry reaches execs ([`Bind`]), and only for an entry the table says may be bound
//! (a promoted variant served alone, its runs sampled: [`ServingTable::bindable`]). Every
//! change of the entry resets it to the mount's path, and the invalidation that goes with
//! the change makes the kernel detach the bind mount (`d_invalidate`): an upgrade
//! underneath or a quarantine ends it as soon as the overlay hears of it.
//!
//! Runs of a bound variant are heard through a fanotify mark on the bind mount
//! ([`ExecMarks`]): the measurer registers each in its own thread before handling its
//! process's events and follows it to its exit, without counters, as it does a sampled run
//! through the mount. So a crash or an unexpected exit code is caught at its first
//! occurrence, as before. Its command line is read for one bound run in the sampling rate
//! ([`BoundExec::read_command`]); the others are stored as `unread` and compared with the
//! original's runs of every command, because the read makes the new process's loader wait
//! for its memory-map lock (2-3% of a small program's exec+exit, docs/mount.md).
//!
//! The original's exploration share and the counted runs come from **windows**: after a
//! bound exec, with a probability that keeps the original's share of execs at
//! `exploration_share` (and at most once per [`WINDOW_MIN_GAP`] per binary, so that a hot
//! binary does not churn the mount table), the binder removes the mount and the entry draws
//! per exec again with even arms, every run counted ([`Bind::Window`]); after
//! [`WINDOW_EXECS`] execs through the mount it binds again. A window's two execs are one run
//! of each arm in random order: a pair for the policy.
//!
//! A variant is bound only when its store file has the original's owner, group and mode
//! (a bind mount shows the store file's): otherwise it is served through the mount as
//! before. The binder owns every bind mount: one thread makes and removes them (a path
//! walk through the mount may wait on a request: never on a request thread), checks every
//! [`CHECK_EVERY`] that they are still there, removes them all when it stops, and clears
//! those a previous server left when it starts.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::sections::BoundStatus;
use crate::fs::{Bind, Bindable, ServedVariant, ServingTable};
use crate::fuse::bind::{BoundFile, attach_read_only, detach_submounts};
use crate::identity::FileKey;
use crate::measure::exec_marks::{ExecMarks, MarkedExec};
use crate::measure::{BoundExec, BoundExecs, ExecOpen};
use crate::warm::Warmer;

/// Execs through the mount in a window before the variant is bound again: one pair.
pub const WINDOW_EXECS: u32 = 2;

/// The shortest time between two windows of one binary: each window is two changes of the
/// mount table, which every watcher of it (systemd) re-reads.
pub const WINDOW_MIN_GAP: Duration = Duration::from_millis(100);

/// How often the binder checks that its mounts are still in place (the kernel detaches one
/// when its entry is invalidated) and retries a bind that failed.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A failed bind is retried after this long (or when the entry changes).
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Whether a bound exec opens a window: with probability `1 / (1 / (1 - share) - WINDOW_EXECS)`
/// (one original run per window, so the original gets `1 - share` of execs; a share of 1
/// never opens one), and never within [`WINDOW_MIN_GAP`] of the last window. `draw` is
/// uniform in [0, 1).
pub fn window_due(share: f64, since_last_window: Duration, draw: f64) -> bool {
    if share >= 1.0 || since_last_window < WINDOW_MIN_GAP {
        return false;
    }
    let bound_execs_per_window = (1.0 / (1.0 - share) - f64::from(WINDOW_EXECS)).max(1.0);
    draw < 1.0 / bound_execs_per_window
}

/// What a bound exec is, by the device and inode of its store file.
#[derive(Debug)]
struct BoundRun {
    original: PathBuf,
    variant: ServedVariant,
    share: f64,
    /// One run in this many is read for its command line.
    command_one_in: u32,
    last_window: Mutex<Instant>,
}

enum Msg {
    /// The table's entry for this original changed (or may have).
    Changed(PathBuf),
    /// A bound exec drew a window.
    WindowDue(PathBuf),
    /// An exec through the mount in a window.
    WindowExec(PathBuf),
    Stop,
}

/// Counts for status.
#[derive(Debug, Default)]
struct BindCounts {
    bound_execs: AtomicU64,
    windows: AtomicU64,
    failed: AtomicU64,
}

/// Shared by the binder thread and the measurer's thread (which drains bound execs).
struct Shared {
    /// By the store file's (device, inode): a store file is bound for one original at most.
    runs: RwLock<HashMap<(u64, u64), Arc<BoundRun>>>,
    marks: Option<ExecMarks>,
    warmer: OnceLock<Arc<Warmer>>,
    /// To the binder thread (a `Sender` is shared by reference across threads).
    tx: mpsc::Sender<Msg>,
    counts: BindCounts,
}

/// The owner of the bind mounts (see the module doc).
pub struct Binder {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Why variants are not bound, when they are not.
    off: Option<String>,
}

impl std::fmt::Debug for Binder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binder").field("off", &self.off).finish_non_exhaustive()
    }
}

/// How the binder was set up.
pub struct BinderSetup {
    pub table: Arc<ServingTable>,
    pub mountpoint: PathBuf,
    /// `[policy] bind_served`.
    pub enabled: bool,
    /// Whether runs are measured: then bound runs must be heard (a fanotify group), or
    /// nothing is bound.
    pub measuring: bool,
}

impl Binder {
    /// Starts the binder thread (it first clears bind mounts a previous server left) and
    /// subscribes it to the table's changes.
    pub fn start(setup: BinderSetup) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let (marks, off) = match (setup.enabled, setup.measuring) {
            (false, _) => {
                (None, Some("turned off in the config (policy.bind_served = false)".into()))
            }
            (true, false) => (None, None),
            (true, true) => match ExecMarks::new() {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(format!("no fanotify group to hear bound runs by: {e}"))),
            },
        };
        if let Some(why) = &off {
            tracing::info!(why = %why, "promoted variants are served through the mount, not bound");
        }
        let shared = Arc::new(Shared {
            runs: RwLock::default(),
            marks,
            warmer: OnceLock::new(),
            tx: tx.clone(),
            counts: BindCounts::default(),
        });
        let mut worker = Worker {
            table: setup.table.clone(),
            mountpoint: setup.mountpoint,
            enabled: off.is_none(),
            shared: shared.clone(),
            states: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("optbin-bind".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| tracing::error!(error = %e, "could not start the binder thread"))
            .ok();
        let sub = tx.clone();
        setup.table.subscribe(move |p| {
            let _ = sub.send(Msg::Changed(p.to_path_buf()));
        });
        Arc::new(Self { shared, thread: Mutex::new(thread), off })
    }

    /// Where the measurer hears bound runs (None when nothing can be bound while measured).
    pub fn bound_execs(&self) -> Option<Box<dyn BoundExecs>> {
        self.shared.marks.as_ref()?;
        Some(Box::new(BoundExecsOf(self.shared.clone())))
    }

    /// Tells bound execs to the warmer, as exec-time opens through the mount are.
    pub fn set_warmer(&self, warmer: Arc<Warmer>) {
        let _ = self.shared.warmer.set(warmer);
    }

    /// An exec through the mount of `original` while its entry is in a window.
    pub fn window_exec(&self, original: &Path) {
        let _ = self.shared.tx.send(Msg::WindowExec(original.to_path_buf()));
    }

    /// What status shows of the binds.
    pub fn status(&self) -> BoundStatus {
        let c = &self.shared.counts;
        BoundStatus {
            bound_now: self.shared.runs.read().unwrap_or_else(|e| e.into_inner()).len(),
            execs: c.bound_execs.load(Ordering::Relaxed),
            windows: c.windows.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            overflows: self.shared.marks.as_ref().map_or(0, ExecMarks::overflows),
            why_off: self.off.clone(),
        }
    }

    /// Removes every bind mount and stops the thread.
    pub fn stop(&self) {
        let _ = self.shared.tx.send(Msg::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The measurer's view of bound execs.
struct BoundExecsOf(Arc<Shared>);

impl BoundExecs for BoundExecsOf {
    fn drain(&self, out: &mut Vec<BoundExec>) {
        let Some(marks) = &self.0.marks else { return };
        let mut heard: Vec<MarkedExec> = Vec::new();
        marks.drain(&mut heard);
        if heard.is_empty() {
            return;
        }
        let runs = self.0.runs.read().unwrap_or_else(|e| e.into_inner());
        for exec in heard {
            let Some(run) = runs.get(&exec.file) else { continue };
            self.0.counts.bound_execs.fetch_add(1, Ordering::Relaxed);
            let open = ExecOpen {
                pid: exec.pid,
                original: run.original.clone(),
                variant_id: Some(run.variant.variant_id),
                binary_id: None,
                key: run.variant.expected_original,
            };
            let read_command = rand::random_ratio(1, run.command_one_in.max(1));
            out.push(BoundExec { open, read_command });
            if let Some(w) = self.0.warmer.get() {
                w.note_exec(run.variant.path_in_store.clone(), exec.pid as u32);
            }
            let mut last = run.last_window.lock().unwrap_or_else(|e| e.into_inner());
            if window_due(run.share, last.elapsed(), rand::random::<f64>()) {
                *last = Instant::now();
                let _ = self.0.tx.send(Msg::WindowDue(run.original.clone()));
            }
        }
    }
}

/// What the binder thread knows of one original.
enum State {
    Bound {
        file: BoundFile,
        variant_id: i64,
        /// The store file's (device, inode), its key in [`Shared::runs`].
        store: (u64, u64),
    },
    Window {
        variant_id: i64,
        execs: u32,
    },
    /// Not bound (the reason was logged), since when: retried after [`RETRY_AFTER`] or when
    /// the entry changes.
    Failed {
        variant_id: i64,
        at: Instant,
    },
}

struct Worker {
    table: Arc<ServingTable>,
    mountpoint: PathBuf,
    enabled: bool,
    shared: Arc<Shared>,
    states: HashMap<PathBuf, State>,
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        // A previous server's mounts: their marks died with it, so their runs would go
        // unheard. (A path walk through the mount: waits until this server answers.)
        let cleared = detach_submounts(&self.mountpoint);
        if cleared > 0 {
            tracing::info!(cleared, "removed bind mounts a previous server left");
        }
        let mut checked = Instant::now();
        loop {
            match rx.recv_timeout(CHECK_EVERY.saturating_sub(checked.elapsed())) {
                Ok(Msg::Changed(p)) => self.evaluate(&p),
                Ok(Msg::WindowDue(p)) => self.open_window(&p),
                Ok(Msg::WindowExec(p)) => self.window_exec(&p),
                Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            }
            // Also under a steady stream of messages.
            if checked.elapsed() >= CHECK_EVERY {
                self.check();
                checked = Instant::now();
            }
        }
        for (original, state) in self.states.drain() {
            if let State::Bound { file, .. } = state
                && let Err(e) = file.detach()
            {
                tracing::warn!(original = %original.display(), error = %e, "could not remove a bind mount");
            }
        }
        self.shared.runs.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Brings `original` in line with the table: bound when it may be, not otherwise.
    fn evaluate(&mut self, original: &Path) {
        let want = if self.enabled { self.table.bindable(original) } else { None };
        let Some(want) = want else {
            if let Some(state) = self.states.remove(original) {
                self.unbind(original, state);
                self.table.set_bind(original, Bind::Fuse);
            }
            return;
        };
        let bind_now = self.table.bind_of(original);
        let settled = match self.states.get(original) {
            Some(State::Bound { file, variant_id, .. }) => {
                *variant_id == want.variant.variant_id
                    && bind_now == Bind::Bound
                    && file.is_attached()
            }
            Some(State::Window { variant_id, .. }) => {
                *variant_id == want.variant.variant_id && bind_now == Bind::Window
            }
            Some(State::Failed { variant_id, at }) => {
                *variant_id == want.variant.variant_id && at.elapsed() < RETRY_AFTER
            }
            None => false,
        };
        if !settled {
            self.bind(original, want);
        }
    }

    fn unbind(&self, original: &Path, state: State) {
        if let State::Bound { file, store, .. } = state {
            self.shared.runs.write().unwrap_or_else(|e| e.into_inner()).remove(&store);
            if let Err(e) = file.detach() {
                tracing::warn!(original = %original.display(), error = %e, "could not remove a bind mount");
            }
        }
    }

    fn bind(&mut self, original: &Path, want: Bindable) {
        let Bindable { variant, share, sample_one_in } = want;
        if let Some(old) = self.states.remove(original) {
            self.unbind(original, old);
        }
        let target = self.mountpoint.join(original.strip_prefix("/").unwrap_or(original));
        let attached = bindable_files(original, &variant).and_then(|store| {
            let runs = self.shared.runs.read().unwrap_or_else(|e| e.into_inner());
            if runs.contains_key(&store) {
                return Err("its store file is bound for another path already".into());
            }
            drop(runs);
            // The lookup the attach makes must get the cached variant entry.
            self.table.set_bind(original, Bind::Bound);
            let marks = self.shared.marks.as_ref();
            attach_read_only(&variant.path_in_store, &target, |fd| {
                marks.map_or(Ok(()), |m| m.mark_mount(fd))
            })
            .map(|file| (file, store))
            .map_err(|e| format!("bind-mounting {}: {e}", variant.path_in_store.display()))
        });
        let variant_id = variant.variant_id;
        match attached {
            Ok((file, store)) => {
                tracing::debug!(original = %original.display(), variant_id, "variant bound");
                let run = BoundRun {
                    original: original.to_path_buf(),
                    variant,
                    share,
                    command_one_in: sample_one_in,
                    last_window: Mutex::new(Instant::now()),
                };
                let mut runs = self.shared.runs.write().unwrap_or_else(|e| e.into_inner());
                runs.insert(store, Arc::new(run));
                drop(runs);
                self.states
                    .insert(original.to_path_buf(), State::Bound { file, variant_id, store });
            }
            Err(why) => {
                self.table.set_bind(original, Bind::Fuse);
                self.shared.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(original = %original.display(), variant_id, why = %why, "served through the mount, not bound");
                self.states.insert(
                    original.to_path_buf(),
                    State::Failed { variant_id, at: Instant::now() },
                );
            }
        }
    }

    fn open_window(&mut self, original: &Path) {
        let Some(State::Bound { variant_id, .. }) = self.states.get(original) else { return };
        let variant_id = *variant_id;
        if let Some(state) = self.states.remove(original) {
            self.unbind(original, state);
        }
        self.table.set_bind(original, Bind::Window);
        self.shared.counts.windows.fetch_add(1, Ordering::Relaxed);
        self.states.insert(original.to_path_buf(), State::Window { variant_id, execs: 0 });
    }

    fn window_exec(&mut self, original: &Path) {
        let Some(State::Window { execs, .. }) = self.states.get_mut(original) else { return };
        *execs += 1;
        if *execs >= WINDOW_EXECS {
            // Bound again if the table still says so.
            self.states.remove(original);
            self.evaluate(original);
        }
    }

    /// Mounts the kernel detached (an invalidation) are made again, failed binds retried.
    fn check(&mut self) {
        let stale: Vec<PathBuf> = self
            .states
            .iter()
            .filter(|(_, s)| match s {
                State::Bound { file, .. } => !file.is_attached(),
                State::Failed { at, .. } => at.elapsed() >= RETRY_AFTER,
                State::Window { .. } => false,
            })
            .map(|(p, _)| p.clone())
            .collect();
        for original in stale {
            self.evaluate(&original);
        }
    }
}

/// A bind mount shows the store file's owner, group and mode: bind only when they are the
/// original's (and the original is still the file the variant was built from). Returns the
/// store file's (device, inode), its key in [`Shared::runs`].
fn bindable_files(original: &Path, variant: &ServedVariant) -> Result<(u64, u64), String> {
    let o = std::fs::metadata(original).map_err(|e| format!("{}: {e}", original.display()))?;
    if FileKey::from_metadata(&o) != variant.expected_original {
        return Err("the original changed since the variant was built".into());
    }
    let s = std::fs::metadata(&variant.path_in_store)
        .map_err(|e| format!("{}: {e}", variant.path_in_store.display()))?;
    if (o.uid(), o.gid(), o.mode() & 0o7777) != (s.uid(), s.gid(), s.mode() & 0o7777) {
        return Err(format!(
            "the original's owner and mode ({}:{} {:o}) are not the store file's ({}:{} {:o})",
            o.uid(),
            o.gid(),
            o.mode() & 0o7777,
            s.uid(),
            s.gid(),
            s.mode() & 0o7777
        ));
    }
    Ok((s.dev(), s.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_keep_the_originals_share_and_their_gap() {
        let gap = WINDOW_MIN_GAP;
        assert!(!window_due(1.0, gap, 0.0), "a share of 1 has no original runs to make");
        assert!(!window_due(0.95, gap / 2, 0.0), "never twice within the gap");
        // 0.75: one original run in 4 execs; a window has two execs, so 2 bound execs per
        // window (exact in binary floating point).
        let opened = |share| {
            (0..18_000).filter(|i| window_due(share, gap, f64::from(*i) / 18_000.0)).count()
        };
        assert_eq!(opened(0.75), 9000);
        // 0.95: one original run in 20 execs, so 18 bound execs per window (0.05 is not
        // exact: within one draw of 1000).
        assert!((999..=1001).contains(&opened(0.95)), "{}", opened(0.95));
        // 0.5 and below: a window after every bound exec.
        assert!(window_due(0.5, gap, 0.999));
        assert!(window_due(0.2, gap, 0.999));
    }
}

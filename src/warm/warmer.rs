//! The warmer: one thread owns the heat table, the working sets and the page-cache handle.
//! Execs arrive on a channel (never blocking the FUSE thread that reports them); every
//! `interval_secs` it checks memory pressure, picks the hottest files that fit the budget,
//! and reads back the pages of their working sets that were evicted (BOLT variants' packed
//! hot code first, see [`super::order`]). Shutdown is a message; [`Warmer::stop`] waits for
//! the thread.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::maps;
use super::order::{Lost, read_back_order};
use super::pages::{PageCache, PageSet};
use super::pressure;
use super::rank::{Heat, within_budget};
use super::settings::Settings;

/// How long after an exec the warmer looks at the process's mappings and at the pages of
/// its files: long enough for the dynamic loader to map the libraries and the program to
/// fault in its start-up pages, short enough to catch most processes still alive.
pub const CAPTURE_AFTER: Duration = Duration::from_millis(50);

/// A file's working set is captured at most once per this interval: the pages a run touches
/// are much the same from one run to the next, and a capture (the process's mappings, the
/// residency of the binary and its libraries) cost more CPU than a short exec itself when
/// done for every exec of a binary run in a loop.
pub const CAPTURE_EVERY: Duration = Duration::from_secs(1);

/// After an exec arrives, the warmer waits this long and takes every exec that came
/// meanwhile in one go (one wake-up per burst, not one per exec).
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// At most this many execs wait for their capture; more are counted but not captured
/// (a fork bomb must not grow the warmer's memory).
const MAX_PENDING: usize = 4096;

/// One file kept warm.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeptFile {
    pub path: PathBuf,
    pub heat: f64,
    pub working_set_bytes: u64,
    /// Bytes of the working set in packed hot code (a BOLT variant's `.text`): read back
    /// before any other file's pages.
    pub hot_bytes: u64,
    /// Bytes of the working set resident at the last check, before reading anything back.
    pub resident_bytes: u64,
    pub locked_bytes: u64,
}

/// The last time warming stood back.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Backoff {
    pub at_unix: i64,
    pub reason: String,
}

/// What `status` shows of warming.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct WarmStatus {
    pub enabled: bool,
    pub budget_bytes: u64,
    pub lock_budget_bytes: u64,
    /// The files kept warm at the last check, hottest first.
    pub kept: Vec<KeptFile>,
    /// Their working sets together (never more than the budget).
    pub kept_bytes: u64,
    pub resident_bytes: u64,
    /// Pages read back since the daemon started.
    pub pages_reread: u64,
    pub checks: u64,
    pub execs_seen: u64,
    /// Files with heat (ranked, kept or not).
    pub files_tracked: usize,
    /// True while memory pressure keeps warming off.
    pub backing_off: bool,
    pub last_backoff: Option<Backoff>,
    /// PSI memory `some avg10` at the last check, percent (None: no PSI here).
    pub memory_pressure: Option<f64>,
    pub last_error: Option<String>,
}

impl WarmStatus {
    /// One line for the text status.
    pub fn summary(&self) -> String {
        if !self.enabled {
            return "off ([warm] budget_mib = 0)".into();
        }
        let iec = |b: u64| bytesize::ByteSize(b).display().iec();
        let mut s = if self.backing_off {
            let why = self.last_backoff.as_ref().map_or("", |b| b.reason.as_str());
            format!("backing off: {why}")
        } else {
            format!(
                "{} files kept warm, {} of {} resident, {} pages re-read",
                self.kept.len(),
                iec(self.resident_bytes),
                iec(self.budget_bytes),
                self.pages_reread
            )
        };
        if !self.backing_off
            && let Some(b) = &self.last_backoff
        {
            s.push_str(&format!("; last back-off {}: {}", humantime_utc(b.at_unix), b.reason));
        }
        if let Some(e) = &self.last_error {
            s.push_str(&format!("; last error: {e}"));
        }
        s
    }
}

fn humantime_utc(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

enum Msg {
    Exec { file: PathBuf, pid: u32 },
    Shutdown,
}

/// The handle to the warmer thread.
pub struct Warmer {
    /// Sent to by the request threads and by the measurer's real-time thread: a plain
    /// `Sender` (`Sync` since Rust 1.72), so that no sender waits for another one that
    /// was preempted while holding a mutex around it.
    tx: mpsc::Sender<Msg>,
    status: Arc<Mutex<WarmStatus>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Warmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer").finish_non_exhaustive()
    }
}

/// Where the warmer reads memory pressure and which paths it never warms by name.
#[derive(Debug, Clone)]
pub struct Environment {
    pub psi_path: PathBuf,
    /// The mount: processes map served files by their mount path; those are warmed through
    /// their backing files, never through the mount.
    pub mountpoint: PathBuf,
}

impl Warmer {
    /// Starts the warmer thread. With warming off (`budget_mib = 0`) the thread only
    /// answers status.
    pub fn start(
        settings: Settings,
        env: Environment,
        cache: Box<dyn PageCache>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(WarmStatus::default()));
        let mut state = State::new(settings, env, cache, status.clone());
        let thread = std::thread::Builder::new().name("optbin-warm".into()).spawn(move || {
            if let Err(e) = super::pages::set_idle_io_priority() {
                tracing::warn!(error = %e, "warm: cannot set idle I/O priority; reading at normal priority");
            }
            state.run(rx);
        })?;
        Ok(Self { tx, status, thread: Mutex::new(Some(thread)) })
    }

    /// Notes an exec of `file` (the file served: an original or a variant in the store) by
    /// process `pid`. Never blocks.
    pub fn note_exec(&self, file: PathBuf, pid: u32) {
        let _ = self.tx.send(Msg::Exec { file, pid });
    }

    pub fn status(&self) -> WarmStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the thread and waits for it (it finishes the check under way, if any).
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Pending {
    file: PathBuf,
    pid: u32,
    due: Instant,
}

/// The warmer thread's own state.
struct State {
    settings: Settings,
    env: Environment,
    cache: Box<dyn PageCache>,
    status: Arc<Mutex<WarmStatus>>,
    started: Instant,
    heat: Heat,
    /// Pages seen resident right after runs, per file.
    working_sets: HashMap<PathBuf, PageSet>,
    /// The files each binary's processes mapped (its libraries), from earlier captures.
    libraries: HashMap<PathBuf, BTreeSet<PathBuf>>,
    /// Pages asked back at the previous check, per file: still missing now means still in
    /// flight, and is not counted again.
    requested: HashMap<PathBuf, PageSet>,
    pending: Vec<Pending>,
    /// When each file's last capture was scheduled (see [`CAPTURE_EVERY`]).
    scheduled: HashMap<PathBuf, Instant>,
    /// Each exec'd file's packed hot code (pages), looked up once.
    hot: HashMap<PathBuf, Option<Range<usize>>>,
}

impl State {
    fn new(
        settings: Settings,
        env: Environment,
        cache: Box<dyn PageCache>,
        status: Arc<Mutex<WarmStatus>>,
    ) -> Self {
        if let Ok(mut s) = status.lock() {
            s.enabled = settings.enabled();
            s.budget_bytes = settings.budget_bytes();
            s.lock_budget_bytes = settings.lock_bytes();
        }
        Self {
            heat: Heat::new(settings.half_life_secs),
            settings,
            env,
            cache,
            status,
            started: Instant::now(),
            working_sets: HashMap::new(),
            libraries: HashMap::new(),
            requested: HashMap::new(),
            pending: Vec::new(),
            scheduled: HashMap::new(),
            hot: HashMap::new(),
        }
    }

    fn now_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let interval = Duration::from_secs(self.settings.interval_secs);
        let mut next_check = Instant::now() + interval;
        loop {
            let wake =
                self.pending.iter().map(|p| p.due).min().map_or(next_check, |d| d.min(next_check));
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Msg::Exec { file, pid }) => {
                    self.exec(file, pid);
                    // Execs come in bursts (a loop, a build): take what arrives within a
                    // short window at once rather than waking up for each of them.
                    std::thread::sleep(BATCH_WINDOW);
                    let mut stop = false;
                    for msg in rx.try_iter() {
                        match msg {
                            Msg::Exec { file, pid } => self.exec(file, pid),
                            Msg::Shutdown => stop = true,
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if self.pending.iter().any(|p| p.due <= now) {
                self.capture_due(now);
            }
            if now >= next_check {
                self.check();
                next_check = Instant::now() + interval;
            }
        }
        // Unlock everything on the way out.
        for path in self.working_sets.keys().cloned().collect::<Vec<_>>() {
            let _ = self.cache.lock(&path, &[]);
        }
    }

    fn exec(&mut self, file: PathBuf, pid: u32) {
        if let Ok(mut s) = self.status.lock() {
            s.execs_seen += 1;
        }
        if !self.settings.enabled() {
            return;
        }
        let now = self.now_secs();
        self.heat.touch(&file, now, 1.0);
        // Libraries known from earlier runs get their heat now; the capture refreshes them.
        for lib in self.libraries.get(&file).cloned().unwrap_or_default() {
            self.heat.touch(&lib, now, 1.0);
        }
        let at = Instant::now();
        let recent =
            self.scheduled.get(&file).is_some_and(|t| at.duration_since(*t) < CAPTURE_EVERY);
        if !recent && self.pending.len() < MAX_PENDING {
            self.scheduled.insert(file.clone(), at);
            self.pending.push(Pending { file, pid, due: at + CAPTURE_AFTER });
        }
    }

    /// After an exec: which files the process maps, and which of their pages are resident
    /// (the pages the run touched join the working sets).
    fn capture_due(&mut self, now: Instant) {
        let (due, rest): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.due <= now);
        self.pending = rest;
        let t = self.now_secs();
        let mut files: BTreeSet<PathBuf> = BTreeSet::new();
        let mut execed: BTreeSet<PathBuf> = BTreeSet::new();
        for p in due {
            let mut libs = maps::of_process(p.pid, &self.env.mountpoint);
            libs.remove(&p.file);
            if !self.libraries.contains_key(&p.file) {
                // Most runs are over before the capture: ask the loader once per file.
                libs.extend(maps::needed_libraries(&p.file));
            } else {
                libs.extend(self.libraries[&p.file].iter().cloned());
            }
            if !libs.is_empty() {
                let known = self.libraries.entry(p.file.clone()).or_default();
                for lib in libs.difference(known) {
                    // First time seen for this binary: count this exec for it too.
                    self.heat.touch(lib, t, 1.0);
                }
                *known = libs.clone();
            }
            files.insert(p.file.clone());
            files.extend(self.libraries.get(&p.file).cloned().unwrap_or_default());
            execed.insert(p.file);
        }
        for f in files {
            self.capture_working_set(&f);
        }
        // After the capture: looking at the section headers reads a page or two of the file
        // that runs do not need.
        for f in execed {
            if !self.hot.contains_key(&f) {
                match self.cache.hot_pages(&f) {
                    Ok(hot) => {
                        self.hot.insert(f, hot);
                    }
                    Err(e) => self.note_error(format!("reading sections of {}: {e}", f.display())),
                }
            }
        }
    }

    fn capture_working_set(&mut self, path: &Path) {
        match self.cache.residency(path) {
            Ok(resident) => {
                self.working_sets.entry(path.to_path_buf()).or_default().union_with(&resident);
            }
            Err(e) => self.note_error(format!("reading residency of {}: {e}", path.display())),
        }
    }

    fn note_error(&self, e: String) {
        tracing::debug!(error = %e, "warm");
        if let Ok(mut s) = self.status.lock() {
            s.last_error = Some(e);
        }
    }

    /// One residency check: back off under memory pressure, else read back what the kept
    /// files lost.
    fn check(&mut self) {
        if let Ok(mut s) = self.status.lock() {
            s.checks += 1;
        }
        if !self.settings.enabled() {
            return;
        }
        let t = self.now_secs();
        for gone in self.heat.forget_colder_than(t, self.settings.min_heat / 16.0) {
            self.working_sets.remove(&gone);
            self.libraries.remove(&gone);
            self.requested.remove(&gone);
            self.scheduled.remove(&gone);
            self.hot.remove(&gone);
            let _ = self.cache.lock(&gone, &[]);
        }
        let pressure = pressure::read(&self.env.psi_path);
        let psi = pressure.map(|p| p.some_avg10);
        if let Some(p) = psi
            && p >= self.settings.max_memory_pressure
        {
            let reason = format!(
                "memory pressure {p:.1}% (PSI some avg10) >= {:.1}%",
                self.settings.max_memory_pressure
            );
            tracing::info!(%reason, "warm: backing off");
            if let Ok(mut s) = self.status.lock() {
                s.backing_off = true;
                s.memory_pressure = psi;
                s.last_backoff = Some(Backoff { at_unix: unix_now(), reason });
            }
            return;
        }
        let page = self.cache.page_size();
        let ranked: Vec<(PathBuf, f64, u64)> = self
            .heat
            .ranked(t, self.settings.min_heat)
            .into_iter()
            .filter_map(|(p, h)| {
                let ws = self.working_sets.get(&p)?.count() as u64 * page;
                (ws > 0).then_some((p, h, ws))
            })
            .collect();
        let sizes: Vec<u64> = ranked.iter().map(|r| r.2).collect();
        let keep = within_budget(&sizes, self.settings.budget_bytes());
        // What each kept file lost, hottest first.
        let mut kept_now: Vec<(PathBuf, f64, u64, PageSet)> = Vec::new();
        for i in keep {
            let (path, heat, ws_bytes) = ranked[i].clone();
            match self.cache.residency(&path) {
                Ok(resident) => kept_now.push((path, heat, ws_bytes, resident)),
                Err(e) => self.note_error(format!("reading residency of {}: {e}", path.display())),
            }
        }
        let lost: Vec<Lost> = kept_now
            .iter()
            .map(|(path, _, _, resident)| Lost {
                runs: self.working_sets[path].missing_from(resident),
                hot: self.hot.get(path).cloned().flatten(),
            })
            .collect();
        let mut failed = vec![false; kept_now.len()];
        for (i, runs) in read_back_order(&lost) {
            let path = &kept_now[i].0;
            if let Err(e) = self.cache.fetch(path, &runs) {
                failed[i] = true;
                self.note_error(format!("reading back {}: {e}", path.display()));
            }
        }
        let mut kept = Vec::new();
        let mut reread = 0u64;
        let mut lock_left = self.settings.lock_bytes();
        for (i, (path, heat, ws_bytes, resident)) in kept_now.into_iter().enumerate() {
            let ws = &self.working_sets[&path];
            let mut asked = PageSet::empty(ws.pages());
            for page in lost[i].runs.iter().flat_map(|r| r.clone()) {
                asked.insert(page);
            }
            // Pages asked at the previous check and still missing are in flight: counted once.
            let new_pages = match self.requested.get(&path) {
                Some(before) => asked.count() - asked.intersection_count(before),
                None => asked.count(),
            };
            if !failed[i] {
                reread += new_pages as u64;
            }
            self.requested.insert(path.clone(), asked);
            let hot_pages =
                lost[i].hot.clone().map_or(0, |h| h.filter(|&p| ws.contains(p)).count());
            let mut locked_bytes = 0;
            if self.settings.lock_bytes() > 0 && ws_bytes <= lock_left {
                let runs = ws.missing_from(&PageSet::empty(ws.pages()));
                match self.cache.lock(&path, &runs) {
                    Ok(b) => {
                        locked_bytes = b;
                        lock_left -= ws_bytes;
                    }
                    Err(e) => self.note_error(format!("locking {}: {e}", path.display())),
                }
            }
            kept.push(KeptFile {
                path,
                heat,
                working_set_bytes: ws_bytes,
                hot_bytes: hot_pages as u64 * page,
                resident_bytes: ws.intersection_count(&resident) as u64 * page,
                locked_bytes,
            });
        }
        // Files that fell out of the kept set lose their locks.
        if self.settings.lock_bytes() > 0 {
            let kept_paths: BTreeSet<&PathBuf> = kept.iter().map(|k| &k.path).collect();
            let unlock: Vec<PathBuf> =
                self.working_sets.keys().filter(|p| !kept_paths.contains(p)).cloned().collect();
            for p in unlock {
                let _ = self.cache.lock(&p, &[]);
            }
        }
        if reread > 0 {
            tracing::debug!(pages = reread, "warm: read back evicted pages");
        }
        if let Ok(mut s) = self.status.lock() {
            s.backing_off = false;
            s.memory_pressure = psi;
            s.kept_bytes = kept.iter().map(|k| k.working_set_bytes).sum();
            s.resident_bytes = kept.iter().map(|k| k.resident_bytes).sum();
            s.kept = kept;
            s.pages_reread += reread;
            s.files_tracked = self.heat.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    /// The line docs/warm.md shows.
    #[test]
    fn the_summary_says_sizes_in_binary_units() {
        let status = WarmStatus {
            enabled: true,
            budget_bytes: 256 << 20,
            resident_bytes: 13_002_342,
            pages_reread: 530,
            ..WarmStatus::default()
        };
        assert_eq!(
            status.summary(),
            "0 files kept warm, 12.4 MiB of 256.0 MiB resident, 530 pages re-read"
        );
    }

    /// A page cache in memory: files of a given page count, residency flags, a log of
    /// fetches.
    #[derive(Clone, Default)]
    struct FakeCache(Arc<Mutex<FakeInner>>);
    #[derive(Default)]
    struct FakeInner {
        files: HashMap<PathBuf, Vec<bool>>,
        fetched_pages: u64,
        /// Packed hot code per file.
        hot: HashMap<PathBuf, Range<usize>>,
        /// Every run fetched, in order.
        fetch_log: Vec<(PathBuf, Range<usize>)>,
    }

    impl PageCache for FakeCache {
        fn page_size(&self) -> u64 {
            4096
        }
        fn residency(&mut self, path: &Path) -> std::io::Result<PageSet> {
            let g = self.0.lock().unwrap();
            let f = g.files.get(path).ok_or_else(|| std::io::Error::other("no such file"))?;
            Ok(PageSet::from_bools(f))
        }
        fn fetch(&mut self, path: &Path, runs: &[Range<usize>]) -> std::io::Result<()> {
            let mut g = self.0.lock().unwrap();
            let mut n = 0;
            let f = g.files.get_mut(path).unwrap();
            for r in runs {
                for p in r.clone() {
                    f[p] = true;
                    n += 1;
                }
            }
            g.fetched_pages += n;
            g.fetch_log.extend(runs.iter().map(|r| (path.to_path_buf(), r.clone())));
            Ok(())
        }
        fn lock(&mut self, _: &Path, runs: &[Range<usize>]) -> std::io::Result<u64> {
            Ok(runs.iter().map(|r| r.len() as u64 * 4096).sum())
        }
        fn hot_pages(&mut self, path: &Path) -> std::io::Result<Option<Range<usize>>> {
            Ok(self.0.lock().unwrap().hot.get(path).cloned())
        }
    }

    fn env(psi: &Path) -> Environment {
        Environment { psi_path: psi.to_path_buf(), mountpoint: PathBuf::from("/nonexistent-mount") }
    }

    /// A 1 MiB budget: 256 pages of 4 KiB.
    fn settings() -> Settings {
        Settings { budget_mib: 1, interval_secs: 1, min_heat: 0.5, ..Settings::default() }
    }

    fn state(s: Settings, cache: FakeCache, psi: &Path) -> State {
        State::new(s, env(psi), Box::new(cache), Arc::new(Mutex::new(WarmStatus::default())))
    }

    #[test]
    fn evicted_working_set_pages_are_read_back_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FakeCache::default();
        let bin = PathBuf::from("/bin/hot");
        // 8 pages, the run touched 0..3.
        cache
            .0
            .lock()
            .unwrap()
            .files
            .insert(bin.clone(), vec![true, true, true, false, false, false, false, false]);
        let mut st = state(settings(), cache.clone(), &dir.path().join("no-psi"));
        st.exec(bin.clone(), u32::MAX);
        st.capture_due(Instant::now() + CAPTURE_AFTER);
        // Evict everything, then check: pages 0..3 come back, nothing else.
        cache.0.lock().unwrap().files.insert(bin.clone(), vec![false; 8]);
        st.check();
        let f = cache.0.lock().unwrap().files[&bin].clone();
        assert_eq!(f, vec![true, true, true, false, false, false, false, false]);
        let s = st.status.lock().unwrap().clone();
        assert_eq!(s.pages_reread, 3);
        assert_eq!(s.kept.len(), 1);
        assert_eq!(s.kept[0].working_set_bytes, 3 * 4096);
    }

    #[test]
    fn execs_of_a_file_in_a_loop_are_captured_once_per_interval_and_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = state(settings(), FakeCache::default(), &dir.path().join("no-psi"));
        let (a, b) = (PathBuf::from("/bin/a"), PathBuf::from("/bin/b"));
        for _ in 0..100 {
            st.exec(a.clone(), u32::MAX);
        }
        st.exec(b.clone(), u32::MAX);
        assert_eq!(st.pending.len(), 2, "one capture per file within CAPTURE_EVERY");
        assert_eq!(st.status.lock().unwrap().execs_seen, 101);
        let t = st.now_secs();
        assert!(st.heat.heat_of(&a, t) > st.heat.heat_of(&b, t), "every exec still heats its file");
    }

    #[test]
    fn the_hottest_files_are_kept_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FakeCache::default();
        // A 1 MiB budget = 256 pages; three files of 200, 100 and 50 touched pages.
        let files = [("/a", 200usize, 1), ("/b", 100, 3), ("/c", 50, 2)];
        for (p, n, _) in files {
            cache.0.lock().unwrap().files.insert(PathBuf::from(p), vec![true; n]);
        }
        let mut st = state(settings(), cache.clone(), &dir.path().join("no-psi"));
        for (p, _, execs) in files {
            for _ in 0..execs {
                st.exec(PathBuf::from(p), u32::MAX);
            }
        }
        st.capture_due(Instant::now() + CAPTURE_AFTER);
        st.check();
        let s = st.status.lock().unwrap().clone();
        let kept: Vec<_> = s.kept.iter().map(|k| k.path.to_str().unwrap()).collect();
        // b (3 execs, 100) and c (2, 50) fit; a (1 exec, 200) would exceed 256 pages.
        assert_eq!(kept, ["/b", "/c"]);
        assert!(s.kept_bytes <= st.settings.budget_bytes());
    }

    #[test]
    fn a_variants_packed_hot_code_is_read_back_before_hotter_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FakeCache::default();
        let (lib, variant) = (PathBuf::from("/lib/libhot.so"), PathBuf::from("/store/variant"));
        {
            let mut g = cache.0.lock().unwrap();
            g.files.insert(lib.clone(), vec![true; 8]);
            // Runs touched pages 0..2 (headers, start-up code) and 10..14 (hot code).
            let mut v = vec![false; 16];
            for p in [0, 1, 10, 11, 12, 13] {
                v[p] = true;
            }
            g.files.insert(variant.clone(), v);
            g.hot.insert(variant.clone(), 10..16);
        }
        let mut st = state(settings(), cache.clone(), &dir.path().join("no-psi"));
        // The library is hotter (more execs) than the variant.
        for _ in 0..3 {
            st.exec(lib.clone(), u32::MAX);
        }
        st.exec(variant.clone(), u32::MAX);
        st.capture_due(Instant::now() + CAPTURE_AFTER);
        {
            let mut g = cache.0.lock().unwrap();
            g.files.insert(lib.clone(), vec![false; 8]);
            g.files.insert(variant.clone(), vec![false; 16]);
        }
        st.check();
        let g = cache.0.lock().unwrap();
        assert_eq!(
            g.fetch_log,
            vec![(variant.clone(), 10..14), (lib.clone(), 0..8), (variant.clone(), 0..2)]
        );
        let s = st.status.lock().unwrap().clone();
        let kept: Vec<_> = s.kept.iter().map(|k| (k.path.clone(), k.hot_bytes)).collect();
        assert_eq!(kept, vec![(lib, 0), (variant, 4 * 4096)]);
        assert_eq!(s.pages_reread, 8 + 6);
    }

    #[test]
    fn memory_pressure_stops_warming_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let psi = dir.path().join("memory");
        std::fs::write(&psi, "some avg10=42.00 avg60=10.00 avg300=1.00 total=1\n").unwrap();
        let cache = FakeCache::default();
        let bin = PathBuf::from("/bin/hot");
        cache.0.lock().unwrap().files.insert(bin.clone(), vec![true; 4]);
        let mut st = state(settings(), cache.clone(), &psi);
        st.exec(bin.clone(), u32::MAX);
        st.capture_due(Instant::now() + CAPTURE_AFTER);
        cache.0.lock().unwrap().files.insert(bin.clone(), vec![false; 4]);
        st.check();
        assert_eq!(cache.0.lock().unwrap().fetched_pages, 0);
        let s = st.status.lock().unwrap().clone();
        assert!(s.backing_off);
        assert!(s.summary().contains("memory pressure 42.0%"), "{}", s.summary());
        // Pressure gone: warming resumes and says when it last stood back.
        std::fs::write(&psi, "some avg10=0.00 avg60=10.00 avg300=1.00 total=1\n").unwrap();
        st.check();
        assert_eq!(cache.0.lock().unwrap().fetched_pages, 4);
        let s = st.status.lock().unwrap().clone();
        assert!(!s.backing_off);
        assert!(s.summary().contains("last back-off"), "{}", s.summary());
    }
}

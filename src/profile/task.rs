//! The profiler: a sampling thread (perf reads, decoding, attribution, in-memory counts)
//! and an async owner task that, every flush interval, identifies and symbolizes the
//! counts off the runtime's threads, writes them to the catalog in one transaction,
//! rotates old windows, and keeps [`ProfilerStatus`] current. Stops on `shutdown`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::attribute::{Attributor, BinaryFile, FileCounts, RealProc, StreamCounters};
use super::identify::{Dropped, Identifier, to_batch};
use super::resolve::PathResolver;
use super::sampler::{PerfSource, SampleSource};
use super::source::{self, SourceChoice};
use super::stacks::StackStore;
use crate::catalog::profiles::{self, Retention};
use crate::catalog::{Catalog, base};
use crate::clock::{Clock, SystemClock};

/// Settings of the profiler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfilerConfig {
    /// Samples per second per CPU.
    pub frequency_hz: u64,
    /// Ring buffer per CPU, bytes (rounded up to a power of two pages).
    pub buffer_bytes: usize,
    /// How often counts are written to the catalog.
    pub flush_interval: Duration,
    /// Length of a profile window, seconds.
    pub window_secs: i64,
    /// How often old windows are rotated out.
    pub rotate_interval: Duration,
    pub retention: Retention,
    /// A binary is hashed and symbolized only once it has this many samples (own text plus
    /// outside); until then its counts wait in memory. Spares hashing every short-lived
    /// program on the machine; counts below it at shutdown are dropped.
    pub identify_after_samples: u64,
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            buffer_bytes: 256 << 10,
            flush_interval: Duration::from_secs(5),
            window_secs: 600,
            rotate_interval: Duration::from_secs(300),
            retention: Retention::default(),
            identify_after_samples: 50,
        }
    }
}

/// Per binary, since the profiler started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BinaryStatus {
    pub content: Option<String>,
    pub binary_id: Option<i64>,
    pub own_samples: u64,
    pub outside_samples: u64,
    pub variant_samples: u64,
    pub runs: u64,
    /// Why this binary gets no profile (stripped, replaced, gone).
    pub refused: Option<String>,
}

/// What the status page shows about sampling.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfilerStatus {
    pub running: bool,
    pub source: Option<SourceChoice>,
    pub frequency_hz: u64,
    /// Why sampling is not running, if it is not.
    pub error: Option<String>,
    pub samples: u64,
    pub samples_per_sec: f64,
    /// Records the kernel dropped because a ring buffer was full.
    pub lost_records: u64,
    pub unattributed_samples: u64,
    pub tracked_processes: usize,
    /// CPU seconds used by the sampling thread.
    pub sampler_cpu_secs: f64,
    pub flushes: u64,
    pub windows_dropped: u64,
    /// Bytes the profile tables occupy in the catalog (SQLite dbstat).
    pub disk_bytes: u64,
    /// Keyed by the original path.
    pub binaries: BTreeMap<String, BinaryStatus>,
}

/// A shared, cheap-to-clone view of the profiler's status.
#[derive(Debug, Clone, Default)]
pub struct ProfilerStatusHandle(Arc<Mutex<ProfilerStatus>>);

impl ProfilerStatusHandle {
    pub fn snapshot(&self) -> ProfilerStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ProfilerStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}

/// What the sampling thread hands over at each flush.
struct Flush {
    counts: HashMap<BinaryFile, FileCounts>,
    stream: StreamCounters,
    tracked_processes: usize,
    thread_cpu_secs: f64,
    last: bool,
}

/// The profiler with its collaborators.
pub struct Profiler {
    pub config: ProfilerConfig,
    pub catalog: Catalog,
    pub resolver: Arc<dyn PathResolver>,
    pub clock: Arc<dyn Clock>,
    pub status: ProfilerStatusHandle,
    /// Where the sampled call stacks go (flame graphs, heat maps).
    pub stacks: StackStore,
}

/// Probes the best source, samples the whole machine and keeps profiles until `shutdown`.
/// `status` is where the status page reads from while it runs.
pub async fn run_profiler(
    cfg: ProfilerConfig,
    catalog: Catalog,
    resolver: Arc<dyn PathResolver>,
    status: ProfilerStatusHandle,
    stacks: StackStore,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    Profiler { config: cfg, catalog, resolver, clock: Arc::new(SystemClock), status, stacks }
        .run(shutdown)
        .await
}

impl Profiler {
    /// Probes the source and opens it on every CPU, then runs. A machine where nothing
    /// can be opened is an error, also recorded in the status.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let cfg = self.config.clone();
        let opened = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let choice = source::probe(cfg.frequency_hz).context("probing perf event sources")?;
            let perf = PerfSource::open(&choice, cfg.frequency_hz, cfg.buffer_bytes)?;
            Ok((choice, perf))
        })
        .await
        .context("the probing thread failed")?;
        match opened {
            Ok((choice, perf)) => self.run_with_source(Box::new(perf), choice, shutdown).await,
            Err(e) => {
                let msg = format!("{e:#}");
                self.status.update(|s| {
                    s.running = false;
                    s.error = Some(msg);
                });
                Err(e)
            }
        }
    }

    /// Runs with a given source (the real one, or a scripted one in tests).
    pub async fn run_with_source(
        self,
        source: Box<dyn SampleSource>,
        choice: SourceChoice,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let event = choice.kind.event_name().to_string();
        self.status.update(|s| {
            s.running = true;
            s.source = Some(choice);
            s.frequency_hz = self.config.frequency_hz;
            s.error = None;
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<Flush>(4);
        let thread = {
            let stop = Arc::clone(&stop);
            let resolver = Arc::clone(&self.resolver);
            let interval = self.config.flush_interval;
            let stacks = self.stacks.clone();
            let clock = Arc::clone(&self.clock);
            std::thread::Builder::new()
                .name("optbin-sampler".into())
                .spawn(move || {
                    sampling_loop(source, resolver, interval, &stop, &tx, &stacks, clock.as_ref())
                })
                .context("starting the sampling thread")?
        };
        let mut writer = Writer::new(&self, event);
        let mut stop_requested = false;
        let result = loop {
            tokio::select! {
                // Once stopping, only the sampling thread's last flush is awaited.
                changed = shutdown.changed(), if !stop_requested => {
                    if changed.is_err() || *shutdown.borrow() {
                        stop_requested = true;
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                flush = rx.recv() => match flush {
                    Some(flush) => {
                        let last = flush.last;
                        if let Err(e) = writer.write(flush).await {
                            tracing::warn!(error = %format!("{e:#}"), "profile flush failed");
                        }
                        if last { break Ok(()); }
                    }
                    None => break Err(anyhow::anyhow!("the sampling thread stopped")),
                },
            }
        };
        stop.store(true, Ordering::SeqCst);
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        let thread_result = match joined {
            Ok(Ok(r)) => r,
            _ => Err(anyhow::anyhow!("the sampling thread panicked")),
        };
        self.status.update(|s| {
            s.running = false;
            if let Err(e) = &thread_result {
                s.error = Some(format!("{e:#}"));
            }
        });
        result.and(thread_result)
    }
}

/// The sampling thread: read, attribute, hand over counts every `interval`.
fn sampling_loop(
    mut source: Box<dyn SampleSource>,
    resolver: Arc<dyn PathResolver>,
    interval: Duration,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Flush>,
    stacks: &StackStore,
    clock: &dyn Clock,
) -> anyhow::Result<()> {
    let mut attributor = Attributor::new(resolver, Box::new(RealProc));
    let mut events = Vec::with_capacity(4096);
    let mut last_flush = Instant::now();
    let poll = interval.min(Duration::from_millis(200));
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        events.clear();
        let read = source.read_batch(&mut events, if stopping { Duration::ZERO } else { poll });
        for e in &events {
            attributor.handle(e);
        }
        if stopping || read.is_err() || last_flush.elapsed() >= interval {
            last_flush = Instant::now();
            stacks.add(clock.unix_secs(), attributor.take_stacks());
            let flush = Flush {
                counts: attributor.take_counts(),
                stream: attributor.counters(),
                tracked_processes: attributor.tracked_processes(),
                thread_cpu_secs: thread_cpu_secs(),
                last: stopping || read.is_err(),
            };
            if tx.blocking_send(flush).is_err() {
                return Ok(()); // the owner is gone
            }
        }
        if stopping {
            return Ok(());
        }
        read.context("reading samples")?;
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_secs() -> f64 {
    use rustix::time::{ClockId, DynamicClockId, clock_gettime_dynamic};
    // The fallible variant: plain clock_gettime panics when the clock fails.
    let Ok(ts) = clock_gettime_dynamic(DynamicClockId::Known(ClockId::ThreadCPUTime)) else {
        return 0.0;
    };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The async side of a flush: identification, catalog writes, rotation, status.
struct Writer {
    catalog: Catalog,
    clock: Arc<dyn Clock>,
    status: ProfilerStatusHandle,
    config: ProfilerConfig,
    event: String,
    identifier: Arc<Mutex<Identifier>>,
    last_rotation: Option<Instant>,
    last_flush: Instant,
    last_samples: u64,
    /// Counts of binaries not identified yet, waiting for enough samples.
    deferred: HashMap<BinaryFile, FileCounts>,
    /// Binaries identified before: their counts go straight through.
    identified_files: std::collections::HashSet<BinaryFile>,
}

/// At most this many binaries wait for identification; the smallest are dropped beyond.
const DEFERRED_LIMIT: usize = 4096;

fn merge_counts(into: &mut FileCounts, from: FileCounts) {
    for (off, n) in from.offsets {
        *into.offsets.entry(off).or_default() += n;
    }
    for (edge, (n, m)) in from.branches {
        let e = into.branches.entry(edge).or_default();
        e.0 += n;
        e.1 += m;
    }
    into.outside += from.outside;
    into.variant += from.variant;
    into.new_runs += from.new_runs;
}

/// At most this many binaries are listed in the status.
const STATUS_BINARIES_LIMIT: usize = 1024;

/// At most this many file versions stay identified in memory.
const IDENTIFIER_CACHE_LIMIT: usize = 4096;

impl Writer {
    fn new(p: &Profiler, event: String) -> Self {
        Self {
            catalog: p.catalog.clone(),
            clock: Arc::clone(&p.clock),
            status: p.status.clone(),
            config: p.config.clone(),
            event,
            identifier: Arc::new(Mutex::new(Identifier::default())),
            last_rotation: None,
            last_flush: Instant::now(),
            last_samples: 0,
            deferred: HashMap::new(),
            identified_files: std::collections::HashSet::new(),
        }
    }

    /// Adds new counts to those waiting for identification and returns the ones ready:
    /// files identified before, or with enough samples now.
    fn ready_counts(
        &mut self,
        counts: HashMap<BinaryFile, FileCounts>,
    ) -> HashMap<BinaryFile, FileCounts> {
        for (file, c) in counts {
            merge_counts(self.deferred.entry(file).or_default(), c);
        }
        let threshold = self.config.identify_after_samples;
        let ready_files: Vec<BinaryFile> = self
            .deferred
            .iter()
            .filter(|(f, c)| {
                self.identified_files.contains(*f)
                    || c.own_samples() + c.outside + c.variant >= threshold
            })
            .map(|(f, _)| f.clone())
            .collect();
        let mut ready = HashMap::with_capacity(ready_files.len());
        for f in ready_files {
            if let Some(c) = self.deferred.remove(&f) {
                if self.identified_files.len() >= IDENTIFIER_CACHE_LIMIT {
                    self.identified_files.clear();
                }
                self.identified_files.insert(f.clone());
                ready.insert(f, c);
            }
        }
        if self.deferred.len() > DEFERRED_LIMIT {
            let mut by_size: Vec<(u64, BinaryFile)> = self
                .deferred
                .iter()
                .map(|(f, c)| (c.own_samples() + c.outside + c.variant, f.clone()))
                .collect();
            by_size.sort();
            let excess = self.deferred.len() - DEFERRED_LIMIT;
            for (_, f) in by_size.into_iter().take(excess) {
                self.deferred.remove(&f);
            }
        }
        ready
    }

    async fn write(&mut self, flush: Flush) -> anyhow::Result<()> {
        let identifier = Arc::clone(&self.identifier);
        let counts = self.ready_counts(flush.counts);
        // Hashing, ELF parsing and symbolization block: keep them off the runtime.
        let identified = tokio::task::spawn_blocking(move || {
            let mut idf = identifier.lock().map_err(|_| anyhow::anyhow!("identifier poisoned"))?;
            if idf.len() > IDENTIFIER_CACHE_LIMIT {
                idf.clear();
            }
            let mut out = Vec::with_capacity(counts.len());
            for (file, c) in counts {
                let path = file.path.display().to_string();
                match idf.identify(&file) {
                    Ok(id) => {
                        let batch = to_batch(&c, id.symbols.as_deref().ok());
                        out.push((path, Ok((id, batch))));
                    }
                    Err(d) => out.push((path, Err((d, c)))),
                }
            }
            anyhow::Ok(out)
        })
        .await
        .context("the identification thread failed")??;

        let now = self.clock.unix_secs();
        let window = now - now.rem_euclid(self.config.window_secs.max(1));
        let rotate = self.last_rotation.is_none_or(|t| t.elapsed() >= self.config.rotate_interval);
        if rotate {
            self.last_rotation = Some(Instant::now());
        }
        let retention = self.config.retention;
        let event = self.event.clone();
        let to_write: Vec<_> = identified
            .iter()
            .filter_map(|(path, r)| {
                r.as_ref().ok().map(|(id, b)| (path.clone(), id.clone(), b.clone()))
            })
            .collect();
        let (ids, rotation, disk) = self
            .catalog
            .run(move |conn| {
                let tx = conn.transaction()?;
                let mut ids = HashMap::new();
                for (path, id, batch) in &to_write {
                    let binary_id = base::upsert_binary(&tx, &id.content, id.size, &id.facts, now)?;
                    match &id.symbols {
                        Ok(_) => profiles::add_window(&tx, binary_id, window, &event, batch, now)?,
                        Err(reason) => profiles::mark_refused(&tx, binary_id, &event, reason, now)?,
                    }
                    ids.insert(path.clone(), binary_id);
                }
                let rotation =
                    if rotate { Some(profiles::rotate(&tx, now, &retention)?) } else { None };
                tx.commit()?;
                // dbstat reads every page of the tables: only as often as rotation.
                let disk = if rotate { profiles::tables_disk_bytes(conn).ok() } else { None };
                Ok((ids, rotation, disk))
            })
            .await?;

        let elapsed = self.last_flush.elapsed().as_secs_f64().max(1e-3);
        self.last_flush = Instant::now();
        let rate = (flush.stream.samples - self.last_samples) as f64 / elapsed;
        self.last_samples = flush.stream.samples;
        self.status.update(|s| {
            s.samples = flush.stream.samples;
            s.samples_per_sec = rate;
            s.lost_records = flush.stream.lost_records;
            s.unattributed_samples = flush.stream.unattributed;
            s.tracked_processes = flush.tracked_processes;
            s.sampler_cpu_secs = flush.thread_cpu_secs;
            s.flushes += 1;
            s.windows_dropped += rotation.map_or(0, |r| r.windows_dropped);
            if let Some(disk) = disk {
                s.disk_bytes = disk;
            }
            for (path, r) in identified {
                let entry = s.binaries.entry(path.clone()).or_default();
                match r {
                    Ok((id, batch)) => {
                        entry.content = Some(id.content.hex());
                        entry.binary_id = ids.get(&path).copied();
                        entry.own_samples += batch.own_samples;
                        entry.outside_samples += batch.outside_samples;
                        entry.variant_samples += batch.variant_samples;
                        entry.runs += batch.new_runs;
                        entry.refused = id.symbols.err();
                    }
                    Err((dropped, c)) => {
                        entry.own_samples += c.own_samples();
                        entry.outside_samples += c.outside;
                        entry.refused = Some(match dropped {
                            Dropped::Gone(e) => format!("file gone: {e}"),
                            Dropped::Replaced => "file replaced since it was run".to_string(),
                        });
                    }
                }
            }
            if s.binaries.len() > STATUS_BINARIES_LIMIT {
                // Keep the status bounded: forget the binaries with the fewest samples.
                let mut by_samples: Vec<(u64, String)> =
                    s.binaries.iter().map(|(p, b)| (b.own_samples, p.clone())).collect();
                by_samples.sort();
                let excess = s.binaries.len() - STATUS_BINARIES_LIMIT;
                for (_, path) in by_samples.into_iter().take(excess) {
                    s.binaries.remove(&path);
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::unix::fs::MetadataExt;

    use object::{Object, ObjectSegment, ObjectSymbol};

    use super::*;
    use crate::catalog::profiles;
    use crate::clock::ManualClock;
    use crate::identity::ContentId;
    use crate::profile::resolve::IdentityResolver;
    use crate::profile::sampler::SampleEvent;
    use crate::profile::source::SourceKind;

    /// Plays fixed batches, then idles.
    struct Scripted(VecDeque<Vec<SampleEvent>>);

    impl SampleSource for Scripted {
        fn read_batch(
            &mut self,
            out: &mut Vec<SampleEvent>,
            timeout: Duration,
        ) -> anyhow::Result<()> {
            match self.0.pop_front() {
                Some(batch) => out.extend(batch),
                None => std::thread::sleep(timeout.min(Duration::from_millis(10))),
            }
            Ok(())
        }
    }

    /// (file offset of `main` + 1, its PT_LOAD's file offset and size) in this test binary.
    fn main_site(exe: &std::path::Path) -> (u64, u64, u64) {
        let bytes = std::fs::read(exe).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let main = elf.symbols().find(|s| s.name() == Ok("main")).unwrap();
        let seg = elf
            .segments()
            .find(|g| main.address() >= g.address() && main.address() < g.address() + g.size())
            .unwrap();
        let (off, size) = seg.file_range();
        (main.address() - seg.address() + off + 1, off, size)
    }

    fn mmap_of(pid: u32, path: &std::path::Path, base: u64, off: u64, size: u64) -> SampleEvent {
        let md = std::fs::metadata(path).unwrap();
        SampleEvent::Mmap {
            time: 1,
            pid,
            addr: base + off,
            len: size,
            pgoff: off,
            file: Some((libc::major(md.dev()), libc::minor(md.dev()), md.ino())),
            filename: path.to_path_buf(),
        }
    }

    fn sample(pid: u32, ip: u64) -> SampleEvent {
        SampleEvent::Sample {
            time: 2,
            pid,
            tid: pid,
            ip,
            kernel: false,
            branches: vec![],
            callchain: vec![],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_identified_symbolized_counts_and_defers_small_binaries() {
        let exe = std::env::current_exe().unwrap();
        let (main_off, seg_off, seg_size) = main_site(&exe);
        let other = std::path::Path::new("/bin/sh").canonicalize().unwrap();
        let base = 0x5555_0000_0000;
        let mut batch = vec![
            SampleEvent::Exec { time: 0, pid: 1_000_001 },
            mmap_of(1_000_001, &exe, base, seg_off, seg_size),
            SampleEvent::Exec { time: 0, pid: 1_000_002 },
            mmap_of(1_000_002, &other, base, 0, 0x1000),
        ];
        batch.extend((0..120).map(|_| sample(1_000_001, base + main_off)));
        batch.extend((0..30).map(|_| sample(1_000_001, 0x1234)));
        batch.extend((0..10).map(|_| sample(1_000_002, base + 0x10)));
        let catalog = Catalog::in_memory().unwrap();
        let status = ProfilerStatusHandle::default();
        let profiler = Profiler {
            config: ProfilerConfig {
                flush_interval: Duration::from_millis(50),
                ..ProfilerConfig::default()
            },
            catalog: catalog.clone(),
            resolver: Arc::new(IdentityResolver),
            clock: Arc::new(ManualClock::at(6_000)),
            status: status.clone(),
            stacks: StackStore::default(),
        };
        let choice = SourceChoice {
            kind: SourceKind::CpuClock,
            include_kernel: true,
            reason: "test".into(),
        };
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(profiler.run_with_source(
            Box::new(Scripted(VecDeque::from([batch]))),
            choice,
            rx,
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while status.snapshot().samples < 160 {
            assert!(Instant::now() < deadline, "{:?}", status.snapshot());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(true).unwrap();
        task.await.unwrap().unwrap();

        let s = status.snapshot();
        assert!(!s.running);
        assert_eq!(s.samples, 160);
        let mine = &s.binaries[&exe.display().to_string()];
        assert_eq!((mine.own_samples, mine.outside_samples, mine.runs), (120, 30, 1));
        assert!(!s.binaries.contains_key(&other.display().to_string()), "10 samples: deferred");

        let content = ContentId::of_file(&exe).unwrap().hex();
        let (counts, windows) = catalog
            .run(move |c| {
                let id: i64 =
                    c.query_row("SELECT id FROM binaries WHERE sha256 = ?1", [content], |r| {
                        r.get(0)
                    })?;
                Ok((profiles::sample_counts(c, id)?, profiles::windows(c, id)?))
            })
            .await
            .unwrap();
        assert_eq!(counts, vec![("main".to_string(), 1, 120)]);
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].window_start, 6_000);
        assert_eq!(windows[0].outside_samples, 30);
        let binaries: i64 = catalog
            .run(|c| Ok(c.query_row("SELECT count(*) FROM binaries", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(binaries, 1, "the small binary was never hashed");
    }
}

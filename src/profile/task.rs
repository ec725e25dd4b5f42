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
}

/// Probes the best source, samples the whole machine and keeps profiles until `shutdown`.
pub async fn run_profiler(
    cfg: ProfilerConfig,
    catalog: Catalog,
    resolver: Arc<dyn PathResolver>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let status = ProfilerStatusHandle::default();
    Profiler { config: cfg, catalog, resolver, clock: Arc::new(SystemClock), status }
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
            std::thread::Builder::new()
                .name("optbin-sampler".into())
                .spawn(move || sampling_loop(source, resolver, interval, &stop, &tx))
                .context("starting the sampling thread")?
        };
        let mut writer = Writer::new(&self, event);
        let result = loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
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
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
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
        }
    }

    async fn write(&mut self, flush: Flush) -> anyhow::Result<()> {
        let identifier = Arc::clone(&self.identifier);
        let counts = flush.counts;
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

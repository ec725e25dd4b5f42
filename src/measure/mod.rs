//! Measuring real runs of served binaries: per-exec CPU counters and how each run ended.
//!
//! The overlay calls [`Measurer::on_exec_open`] when a process opens a served binary for
//! exec (the process is then blocked inside execve). That attaches perf counters to the pid
//! (enabled on exec, inherited by children; see [`counters`]) and notes which variant was
//! served. A reader thread follows the kernel's process connector ([`proc_connector`]):
//! the exec event says the exec completed (the command line is hashed then, while the
//! process is surely alive), the main thread's exit event gives the wait status; the
//! counters are read at that moment and a [`RunRecord`] goes out on a channel.
//!
//! Why the proc connector rather than pidfd + `PIDFD_GET_INFO`: the exec notification is
//! needed anyway (to read the new command line, and to tell a failed exec from a run), the
//! connector gives kernel timestamps for exec and exit (the wall time of the run), and its
//! exit status is available at exit, whereas pidfd exit information only appears once the
//! parent has reaped the process (checked on this 6.18 kernel: before the reap
//! `PIDFD_GET_INFO` leaves `PIDFD_INFO_EXIT` out of the mask; after it, the status is
//! there). Lost events (socket overflow) are covered by a sweep.
//!
//! Limitations: a multithreaded process whose main thread leaves early (pthread_exit) is
//! reported when that thread exits; children that outlive the main process are not
//! counted; an exec from a non-main thread is lost (the kernel reports it under the main
//! thread's pid, the overlay under the thread's); a process that exits within about a
//! millisecond of its exec may be gone before its command line is read (rare with the
//! reader thread's real-time priority, see `raise_priority`): its command is then
//! [`cmdline::UNKNOWN_CMD`], one class of its own for the statistics. The same race can hide
//! such a process's executable from the [`ExecHook`] (it is then not told of that exec).

pub mod cmdline;
pub mod counters;
pub mod exec_marks;
#[cfg(test)]
pub(crate) mod fakes;
pub mod proc_connector;
pub mod tracker;

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Measured runs the catalog could not store (a full state directory, an I/O error), since
/// this server process started. The policy task adds a failed batch here; status shows it
/// beside the runs lost before measurement, so that "0 lost" is never said of runs that
/// were measured and then dropped.
pub static RUNS_NOT_RECORDED: AtomicU64 = AtomicU64::new(0);

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use crate::clock::{Clock, SystemClock, monotonic_ns};
use crate::identity::FileKey;
use counters::{CounterFactory, PerfCounterFactory, RunCounters, RunCounts};
use proc_connector::{ProcConnector, ProcEvent};
use tracker::{LiveProcesses, ProcessView, RunTracker};

/// An exec-time open of a served binary, reported by the overlay while the process is
/// blocked in execve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOpen {
    pub pid: i32,
    /// The original path the user ran (the overlay's view of it).
    pub original: PathBuf,
    /// The variant served, `None` for the original.
    pub variant_id: Option<i64>,
    /// The catalog's binary id of the original's content, when the overlay knows it.
    pub binary_id: Option<i64>,
    /// The stat key of the original when it was served.
    pub key: FileKey,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunExit {
    Exited(i32),
    /// Killed by this signal (the real one, decoded from the wait status).
    Signaled(i32),
}

/// One measured run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub original: PathBuf,
    pub key: FileKey,
    pub binary_id: Option<i64>,
    pub variant_id: Option<i64>,
    /// See [`cmdline::cmd_hash`].
    pub cmd_hash: String,
    /// Whether the run had counters: `false` for a run followed for its exit only (a
    /// sampled run of a served variant); its CPU time and counts are then 0 and absent,
    /// and only its command and exit status say anything.
    pub counted: bool,
    /// CPU time of the process and its children that exited before it (task-clock).
    pub task_clock_ns: u64,
    /// The run's other counters (see [`counters::RunCounts`]).
    pub counts: RunCounts,
    /// Exec completion to exit, by the kernel's monotonic clock.
    pub wall_ns: u64,
    pub exit: RunExit,
    /// Unix milliseconds when the exit was handled.
    pub at_ms: i64,
}

/// A source of process events (the real one is the proc connector).
pub trait ProcEventSource: Send + 'static {
    /// Blocks a short while (it must return periodically) and appends events to `out`.
    fn next_events(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()>;
}

impl ProcEventSource for ProcConnector {
    fn next_events(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        self.recv(out)
    }
}

/// Told of every completed exec on the machine but those of runs the measurer follows (they
/// ran a file of the mount, which is not a native exec): the process id, its executable's path
/// (`/proc/PID/exe`, read by the reader thread at the exec event, while the process is
/// surely alive) and when the exec completed (the kernel's CLOCK_MONOTONIC nanoseconds,
/// [`crate::clock::monotonic_ns`]; the event is handled a moment later). Runs on the reader
/// thread: it must be quick and must not block.
pub type ExecHook = Box<dyn Fn(u32, &Path, u64) + Send + Sync>;

/// Execs that made no FUSE request (variants bind-mounted over their entries, see
/// `crate::daemon::serving::binding`), heard after the fact. Drained by the reader thread
/// after each read of process events and before it handles them: an exec's open is heard
/// before its process's exit can be. Runs on the reader thread: it must be quick and must
/// not block.
pub trait BoundExecs: Send + Sync {
    /// Appends the execs heard since the last call.
    fn drain(&self, out: &mut Vec<BoundExec>);
}

/// An exec of a bind-mounted variant, followed to its exit without counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundExec {
    pub open: ExecOpen,
    /// Whether its command line is read (a sample of the bound runs; the others get
    /// [`cmdline::UNREAD_CMD`]): the read slows the new process down (see there).
    pub read_command: bool,
}

/// Attaches counters on exec-time opens and emits a [`RunRecord`] per finished run.
/// Dropping it stops its reader thread.
///
/// The reader thread alone owns the [`RunTracker`]: an exec-time open reaches it through a
/// channel, and status reads counts it publishes. No lock is shared with it, because the
/// reader runs at real-time priority and must not wait for a request or status thread
/// that was preempted while holding one (on a loaded machine, long enough for a short run
/// to end before its command line and executable are read).
pub struct Measurer {
    registrations: std_mpsc::Sender<Registration>,
    stats: Arc<TrackerStats>,
    counters: Arc<dyn CounterFactory>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    killed: Arc<Notify>,
    exec_hook: Arc<OnceLock<ExecHook>>,
    bound: Arc<OnceLock<Box<dyn BoundExecs>>>,
}

impl std::fmt::Debug for Measurer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Measurer").field("pending", &self.pending()).finish()
    }
}

/// How often the reader thread wakes up without events (to notice a stop and to sweep).
const POLL: Duration = Duration::from_millis(200);

impl Measurer {
    /// The real thing: perf counters and the proc connector (needs root).
    pub fn start() -> anyhow::Result<(Self, mpsc::UnboundedReceiver<RunRecord>)> {
        let source = ProcConnector::open(POLL)
            .context("subscribing to the kernel's process connector (needs CAP_NET_ADMIN)")?;
        Self::with_parts(Arc::new(PerfCounterFactory::detect()), source, LiveProcesses)
    }

    /// Assembles a measurer from its parts (tests pass fakes).
    pub fn with_parts(
        counters: Arc<dyn CounterFactory>,
        mut source: impl ProcEventSource,
        procs: impl ProcessView + Send + 'static,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<RunRecord>)> {
        let (registrations, registered) = std_mpsc::channel();
        let stats = Arc::new(TrackerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let killed = Arc::new(Notify::new());
        let exec_hook = Arc::new(OnceLock::new());
        let bound: Arc<OnceLock<Box<dyn BoundExecs>>> = Arc::new(OnceLock::new());
        let reader = {
            let stats = stats.clone();
            let stop = stop.clone();
            let out = Records { tx, killed: killed.clone(), exec_hook: exec_hook.clone() };
            let bound = bound.clone();
            std::thread::Builder::new()
                .name("optbin-measure".into())
                .spawn(move || {
                    let mut tracker =
                        Tracked { tracker: RunTracker::new(), registered, stats, bound };
                    read_loop(&mut source, &procs, &mut tracker, &stop, &out)
                })
                .context("starting the measurement thread")?
        };
        let measurer = Self {
            registrations,
            stats,
            counters,
            stop,
            reader: Some(reader),
            killed,
            exec_hook,
            bound,
        };
        Ok((measurer, rx))
    }

    /// Sets the hook told of every exec on the machine (see [`ExecHook`]); the first one
    /// set stays. Without a hook no executable path is read.
    pub fn set_exec_hook(&self, hook: ExecHook) {
        let _ = self.exec_hook.set(hook);
    }

    /// Sets where execs that made no FUSE request are heard (see [`BoundExecs`]); the
    /// first one set stays.
    pub fn set_bound_execs(&self, bound: Box<dyn BoundExecs>) {
        let _ = self.bound.set(bound);
    }

    /// Notified after a record of a run killed by a signal was sent. A consumer that must
    /// act on crashes at once waits for this and drains the records with `try_recv`, and
    /// otherwise on a timer: unlike awaiting `recv`, that costs no wake-up per run (a
    /// wake-up of the async runtime per exec cost the daemon more CPU than the rest of a
    /// run's bookkeeping).
    pub fn killed_runs(&self) -> Arc<Notify> {
        self.killed.clone()
    }

    /// Called by the overlay on an exec-time open: attaches counters to the pid (one
    /// perf_event_open per counter, nothing slower; see [`PerfCounterFactory`]) and remembers what was served.
    pub fn on_exec_open(&self, event: ExecOpen) -> anyhow::Result<()> {
        let registered_ns = monotonic_ns();
        let counters = self
            .counters
            .attach(event.pid)
            .with_context(|| format!("attaching run counters to pid {}", event.pid))?;
        self.register(Registration { open: event, counters: Some(counters), registered_ns })
    }

    /// Follows the run of an exec-time open to its exit without counters: its record has
    /// the command and the exit status (what crash and exit-code checks need) and
    /// `counted: false`. A sampled run of a served variant costs the exec no counters.
    pub fn follow_exec_open(&self, event: ExecOpen) -> anyhow::Result<()> {
        self.register(Registration { open: event, counters: None, registered_ns: monotonic_ns() })
    }

    fn register(&self, registration: Registration) -> anyhow::Result<()> {
        // The reader takes it before it handles this process's exec event: the send
        // happens before the reply that lets the exec go on.
        self.registrations
            .send(registration)
            .map_err(|_| anyhow::anyhow!("the measurement thread has stopped"))
    }

    /// The hardware counters every run gets (none where there is no PMU).
    pub fn hardware_counters(&self) -> Vec<counters::Metric> {
        self.counters.hardware()
    }

    /// Measurements waiting for their process to end, as of the reader thread's last
    /// batch of events (it wakes at least every `POLL`).
    pub fn pending(&self) -> usize {
        self.stats.pending.load(Ordering::Relaxed)
    }

    /// Counts of measurements dropped so far, by reason (as of the last batch).
    pub fn dropped(&self) -> tracker::DropCounts {
        let s = &self.stats;
        tracker::DropCounts {
            exec_failed: s.exec_failed.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            unreadable: s.unreadable.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Measurer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// An exec-time open with its counters attached, on its way to the reader thread.
struct Registration {
    open: ExecOpen,
    /// `None`: followed for its exit only.
    counters: Option<Box<dyn RunCounters>>,
    registered_ns: u64,
}

/// What the reader thread publishes of its tracker after each batch, for status.
#[derive(Default)]
struct TrackerStats {
    pending: AtomicUsize,
    exec_failed: AtomicU64,
    lost: AtomicU64,
    unreadable: AtomicU64,
}

/// The reader thread's tracker, with the registrations it has yet to take and the counts
/// it publishes.
struct Tracked {
    tracker: RunTracker,
    registered: std_mpsc::Receiver<Registration>,
    stats: Arc<TrackerStats>,
    bound: Arc<OnceLock<Box<dyn BoundExecs>>>,
}

impl Tracked {
    /// Takes the exec-time opens registered so far, and the bound execs heard so far.
    fn take_registrations(&mut self) {
        if let Some(bound) = self.bound.get() {
            let mut execs = Vec::new();
            bound.drain(&mut execs);
            for exec in execs {
                // Heard after the fact, but before any event of its process is handled
                // (see `BoundExecs`): no earlier event can be mistaken for it.
                self.tracker.register_exit_only(exec.open, exec.read_command, 0);
            }
        }
        while let Ok(r) = self.registered.try_recv() {
            match r.counters {
                Some(counters) => self.tracker.register(r.open, counters, r.registered_ns),
                None => self.tracker.register_exit_only(r.open, true, r.registered_ns),
            }
        }
    }

    fn publish(&self) {
        let d = self.tracker.dropped();
        let s = &self.stats;
        s.pending.store(self.tracker.pending(), Ordering::Relaxed);
        s.exec_failed.store(d.exec_failed, Ordering::Relaxed);
        s.lost.store(d.lost, Ordering::Relaxed);
        s.unreadable.store(d.unreadable, Ordering::Relaxed);
    }
}

/// Makes this thread win the CPU when an exec event arrives: the command line of a program
/// that exits within a millisecond is gone unless it is read at once. Measured here with 60
/// instant runs on a loaded 2-core VM: normal priority lost 15-16 command lines, nice -15
/// lost 5-7, SCHED_FIFO priority 1 lost none. The lowest real-time priority is safe for this
/// thread: it sleeps in recv and does a few syscalls per event (and the kernel's RT
/// throttling bounds it regardless). Falls back to nice -15, then to nothing.
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 1 };
    // libc: rustix has no sched_setscheduler.
    // SAFETY: pid 0 is the calling thread; the kernel only reads `param`, a live local.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    let tid = rustix::thread::gettid();
    if rustix::process::setpriority_process(Some(tid), -15).is_err() {
        tracing::debug!("could not raise the measurement thread's priority");
    }
}

/// Where the reader thread sends finished runs (see [`Measurer::killed_runs`]) and
/// completed execs ([`ExecHook`]).
struct Records {
    tx: mpsc::UnboundedSender<RunRecord>,
    killed: Arc<Notify>,
    exec_hook: Arc<OnceLock<ExecHook>>,
}

impl Records {
    fn send(&self, record: RunRecord) {
        let killed = matches!(record.exit, RunExit::Signaled(_));
        // A closed receiver means nobody wants records any more: keep draining.
        if self.tx.send(record).is_ok() && killed {
            self.killed.notify_one();
        }
    }

    fn exec(&self, pid: i32, at_ns: u64, procs: &dyn ProcessView) {
        let Some(hook) = self.exec_hook.get() else { return };
        if let Some(exe) = procs.exe(pid) {
            hook(pid as u32, &exe, at_ns);
        }
    }
}

fn read_loop(
    source: &mut dyn ProcEventSource,
    procs: &dyn ProcessView,
    tracked: &mut Tracked,
    stop: &AtomicBool,
    out: &Records,
) {
    raise_priority();
    let mut events = Vec::new();
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        events.clear();
        if let Err(e) = source.next_events(&mut events) {
            if e.kind() == io::ErrorKind::OutOfMemory {
                tracing::warn!("process events were dropped by the kernel; some runs are lost");
            } else {
                tracing::warn!(error = %e, "reading process events failed");
                std::thread::sleep(POLL);
            }
        }
        // Every open registered before one of these execs was sent before that exec
        // completed, so before its event was read.
        tracked.take_registrations();
        let t = &mut tracked.tracker;
        for ev in events.drain(..) {
            // A run followed from the mount ran the mount's file: not a native exec for the
            // hook, whose executable need not be read (a path walk per run).
            let exec = match ev {
                ProcEvent::Exec { tgid, ts_ns, .. } if !t.follows(tgid) => Some((tgid, ts_ns)),
                _ => None,
            };
            if let Some(record) = t.on_event(ev, procs, SystemClock.unix_ms()) {
                out.send(record);
            }
            // After the tracker: a measured run's command line is read first (a program
            // that exits within a millisecond is gone soon).
            if let Some((pid, at_ns)) = exec {
                out.exec(pid, at_ns, procs);
            }
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            let n = t.sweep(procs, last_sweep);
            if n > 0 {
                tracing::debug!(n, "measurements dropped: processes vanished unseen");
            }
        }
        tracked.publish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::counters::{CounterReading, RunCounters};
    use super::*;

    use crate::measure::fakes::ChannelSource;

    struct Fixed;
    impl RunCounters for Fixed {
        fn read(&mut self) -> io::Result<CounterReading> {
            let counts = RunCounts {
                page_faults: Some(3),
                instructions: Some(7),
                cycles: Some(9),
                ..RunCounts::default()
            };
            Ok(CounterReading { task_clock_ns: 42, counts })
        }
    }
    struct FixedFactory;
    impl CounterFactory for FixedFactory {
        fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>> {
            if pid < 0 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(Box::new(Fixed))
        }
    }

    /// An exec-time open of `/usr/bin/tool`'s original by `pid`.
    fn tool_open(pid: i32) -> ExecOpen {
        ExecOpen {
            pid,
            original: PathBuf::from("/usr/bin/tool"),
            variant_id: None,
            binary_id: Some(1),
            key: FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 },
        }
    }

    struct Procs;
    impl ProcessView for Procs {
        fn cmdline(&self, _pid: i32) -> Option<Vec<u8>> {
            Some(b"tool\0--fast\0".to_vec())
        }
        fn is_alive(&self, _pid: i32) -> bool {
            true
        }
    }

    #[test]
    fn measurer_turns_events_into_records_on_its_channel() {
        let (tx, rx) = std_mpsc::channel();
        let (m, mut records) =
            Measurer::with_parts(Arc::new(FixedFactory), ChannelSource(rx), Procs).unwrap();
        let open = |pid| ExecOpen { variant_id: Some(3), ..tool_open(pid) };
        assert!(m.on_exec_open(open(-1)).is_err(), "attach failures are reported");
        m.on_exec_open(open(77)).unwrap();
        let t0 = monotonic_ns();
        tx.send(ProcEvent::Exec { pid: 77, tgid: 77, ts_ns: t0 + 10 }).unwrap();
        tx.send(ProcEvent::Exit { pid: 77, tgid: 77, status: 6, ts_ns: t0 + 1_010 }).unwrap();
        let r = records.blocking_recv().unwrap();
        assert_eq!(r.exit, RunExit::Signaled(libc::SIGABRT));
        assert_eq!(r.wall_ns, 1_000);
        assert_eq!(
            (r.task_clock_ns, r.counts.instructions, r.counts.cycles),
            (42, Some(7), Some(9))
        );
        assert_eq!((r.counts.page_faults, r.counts.itlb_misses), (Some(3), None));
        assert_eq!(r.cmd_hash, cmdline::cmd_hash_of_args(&["tool", "--fast"]));
        crate::measure::fakes::wait_until(
            || m.pending() == 0,
            "no measurement pending once the run is recorded",
        );
        drop(m); // stops and joins the reader thread
        assert!(records.blocking_recv().is_none());
    }

    /// A view whose processes all run `/usr/bin/tool`.
    struct ProcsWithExe;
    impl ProcessView for ProcsWithExe {
        fn cmdline(&self, pid: i32) -> Option<Vec<u8>> {
            Procs.cmdline(pid)
        }
        fn is_alive(&self, _pid: i32) -> bool {
            true
        }
        fn exe(&self, _pid: i32) -> Option<PathBuf> {
            Some(PathBuf::from("/usr/bin/tool"))
        }
    }

    #[test]
    fn the_exec_hook_hears_every_exec_but_the_measured_ones() {
        let (tx, rx) = std_mpsc::channel();
        let (m, mut records) =
            Measurer::with_parts(Arc::new(FixedFactory), ChannelSource(rx), ProcsWithExe).unwrap();
        let (heard_tx, heard) = std_mpsc::channel();
        let heard_tx = Mutex::new(heard_tx);
        m.set_exec_hook(Box::new(move |pid, exe, _at_ns| {
            let _ = heard_tx.lock().unwrap().send((pid, exe.to_path_buf()));
        }));
        // pid 90 is not measured (nothing opened it through the mount); pid 91 is.
        m.on_exec_open(tool_open(91)).unwrap();
        let t = monotonic_ns();
        // A thread's exec is reported under its thread group.
        tx.send(ProcEvent::Exec { pid: 95, tgid: 90, ts_ns: t + 10 }).unwrap();
        tx.send(ProcEvent::Exec { pid: 91, tgid: 91, ts_ns: t + 20 }).unwrap();
        tx.send(ProcEvent::Exit { pid: 91, tgid: 91, status: 0, ts_ns: t + 30 }).unwrap();
        let tool = PathBuf::from("/usr/bin/tool");
        let wait = Duration::from_secs(10);
        assert_eq!(heard.recv_timeout(wait).unwrap(), (90, tool));
        assert_eq!(records.blocking_recv().unwrap().exit, RunExit::Exited(0), "measured");
        // A measured run executes the mount's file: the hook (native execs) is not told, and
        // its executable is not read.
        assert!(heard.try_recv().is_err(), "the measured exec reached the hook");
    }

    #[test]
    fn only_a_run_killed_by_a_signal_signals_its_record() {
        let (tx, rx) = std_mpsc::channel();
        let (m, mut records) =
            Measurer::with_parts(Arc::new(FixedFactory), ChannelSource(rx), Procs).unwrap();
        let killed = m.killed_runs();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        // Polled once: whether a signal is waiting now.
        let signalled = || {
            rt.block_on(async { tokio::time::timeout(Duration::ZERO, killed.notified()).await })
                .is_ok()
        };
        let mut run = |pid, status| {
            m.on_exec_open(tool_open(pid)).unwrap();
            // Events stamped after the registration (earlier ones are an older process's).
            let t = monotonic_ns();
            tx.send(ProcEvent::Exec { pid, tgid: pid, ts_ns: t + 10 }).unwrap();
            tx.send(ProcEvent::Exit { pid, tgid: pid, status, ts_ns: t + 20 }).unwrap();
            records.blocking_recv().unwrap()
        };
        // The reader thread handles runs in order: once the record of a later run has come,
        // whatever the earlier run signalled is there.
        for (pid, status, signals) in [(80, 0, false), (81, 6, true), (82, 9 << 8, false)] {
            run(pid, status);
            let later = run(pid + 100, 0);
            assert_eq!(later.exit, RunExit::Exited(0));
            assert_eq!(signalled(), signals, "run {pid} with status {status}");
        }
    }
}

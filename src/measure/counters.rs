//! Per-process CPU counters behind a small trait: the real one opens perf events on the pid
//! (software task-clock always; instructions and cycles only where the PMU has them).
//!
//! Every counter is opened disabled with `enable_on_exec`, so it starts counting when the
//! blocked execve completes (the exec-time open that triggers attaching happens before),
//! and with `inherit`, so children and threads the program creates are counted too: the
//! kernel folds a child's count into ours when the child exits. The count is read when the
//! main thread exits; children still running then are not included.
//!
//! Hardware counters cannot be exercised on this VM (no PMU: `perf stat` says
//! `<not supported>`); [`PerfCounterFactory::detect`] probes for them once and leaves them
//! out when absent. That branch is untested here.
//!
//! [`Metric`] names every counter a run can have (the software ones always, the hardware
//! ones where the PMU offers them); [`MetricCounters`] opens a set of them on one process
//! for `optbin bench`, and a counter the machine refuses is recorded as unsupported (with
//! the kernel's reason), never as a zero.

use std::io;

use perf_event::Builder;
use perf_event::Counter;
use perf_event::events::{Cache, CacheId, CacheOp, CacheResult, Hardware, Software};

/// What a run's counters read when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterReading {
    pub task_clock_ns: u64,
    pub instructions: Option<u64>,
    pub cycles: Option<u64>,
}

/// Counters attached to one process.
pub trait RunCounters: Send {
    fn read(&mut self) -> io::Result<CounterReading>;
}

/// Attaches counters to a process that is about to exec.
pub trait CounterFactory: Send + Sync {
    fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>>;
}

/// perf_event_open on the pid.
#[derive(Debug, Clone, Copy)]
pub struct PerfCounterFactory {
    hardware: bool,
}

impl PerfCounterFactory {
    /// Probes once whether the PMU counts instructions and cycles (it does not on this VM).
    pub fn detect() -> Self {
        let hardware = Builder::new(Hardware::INSTRUCTIONS).build().is_ok()
            && Builder::new(Hardware::CPU_CYCLES).build().is_ok();
        if !hardware {
            tracing::info!("no hardware PMU counters: measuring task-clock only");
        }
        Self { hardware }
    }

    /// Whether instructions and cycles are counted.
    pub fn has_hardware(&self) -> bool {
        self.hardware
    }
}

fn open_on(event: impl perf_event::events::Event + 'static, pid: i32) -> io::Result<Counter> {
    Builder::new(event)
        .observe_pid(pid)
        .any_cpu()
        .inherit(true)
        .enabled(false)
        .enable_on_exec(true)
        .build()
}

impl CounterFactory for PerfCounterFactory {
    fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>> {
        let task_clock = open_on(Software::TASK_CLOCK, pid)?;
        let (instructions, cycles) = if self.hardware {
            // Hardware failures are not fatal: a run without them still has task-clock.
            (open_on(Hardware::INSTRUCTIONS, pid).ok(), open_on(Hardware::CPU_CYCLES, pid).ok())
        } else {
            (None, None)
        };
        Ok(Box::new(PerfRunCounters { task_clock, instructions, cycles }))
    }
}

struct PerfRunCounters {
    task_clock: Counter,
    instructions: Option<Counter>,
    cycles: Option<Counter>,
}

impl RunCounters for PerfRunCounters {
    fn read(&mut self) -> io::Result<CounterReading> {
        Ok(CounterReading {
            task_clock_ns: self.task_clock.read()?,
            instructions: self.instructions.as_mut().and_then(|c| c.read().ok()),
            cycles: self.cycles.as_mut().and_then(|c| c.read().ok()),
        })
    }
}

/// A counter a run can have. The order is the order of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    TaskClock,
    PageFaults,
    ContextSwitches,
    Instructions,
    Cycles,
    BranchMisses,
    L1IcacheLoadMisses,
    ItlbLoadMisses,
    CacheMisses,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::TaskClock,
        Metric::PageFaults,
        Metric::ContextSwitches,
        Metric::Instructions,
        Metric::Cycles,
        Metric::BranchMisses,
        Metric::L1IcacheLoadMisses,
        Metric::ItlbLoadMisses,
        Metric::CacheMisses,
    ];

    /// perf's name for it (`perf stat -e NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::TaskClock => "task-clock",
            Metric::PageFaults => "page-faults",
            Metric::ContextSwitches => "context-switches",
            Metric::Instructions => "instructions",
            Metric::Cycles => "cycles",
            Metric::BranchMisses => "branch-misses",
            Metric::L1IcacheLoadMisses => "L1-icache-load-misses",
            Metric::ItlbLoadMisses => "iTLB-load-misses",
            Metric::CacheMisses => "cache-misses",
        }
    }

    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether it needs the PMU (absent on most VMs).
    pub fn is_hardware(self) -> bool {
        !matches!(self, Metric::TaskClock | Metric::PageFaults | Metric::ContextSwitches)
    }

    fn builder(self) -> Builder<'static> {
        let cache = |which| Cache { which, operation: CacheOp::READ, result: CacheResult::MISS };
        match self {
            Metric::TaskClock => Builder::new(Software::TASK_CLOCK),
            Metric::PageFaults => Builder::new(Software::PAGE_FAULTS),
            Metric::ContextSwitches => Builder::new(Software::CONTEXT_SWITCHES),
            Metric::Instructions => Builder::new(Hardware::INSTRUCTIONS),
            Metric::Cycles => Builder::new(Hardware::CPU_CYCLES),
            Metric::BranchMisses => Builder::new(Hardware::BRANCH_MISSES),
            Metric::L1IcacheLoadMisses => Builder::new(cache(CacheId::L1I)),
            Metric::ItlbLoadMisses => Builder::new(cache(CacheId::ITLB)),
            Metric::CacheMisses => Builder::new(Hardware::CACHE_MISSES),
        }
    }
}

/// One counter of [`MetricCounters`]: open, or why the machine refused it.
#[derive(Debug)]
enum Slot {
    Open(Counter),
    Unsupported(String),
}

/// A set of [`Metric`] counters on one process, opened before its exec (disabled, enabled
/// on exec, inherited by its children), read after it exited.
#[derive(Debug)]
pub struct MetricCounters {
    slots: Vec<(Metric, Slot)>,
}

/// Why a counter could not be opened, in words (`ENOENT` from a VM without a PMU).
pub fn unsupported_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) => {
            "not supported here (no PMU event)".to_string()
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            format!("not permitted here ({e}; see /proc/sys/kernel/perf_event_paranoid)")
        }
        _ => format!("not supported here ({e})"),
    }
}

impl MetricCounters {
    /// Opens `metrics` on `pid`, which must not have exec'd yet (counting starts at its
    /// exec). Kernel-side counting is included only for root (`perf_event_paranoid` 2
    /// refuses it to users); the caller learns which by [`MetricCounters::user_only`].
    pub fn open(pid: i32, metrics: &[Metric]) -> Self {
        let with_kernel = unsafe { libc::geteuid() } == 0;
        let slots = metrics
            .iter()
            .map(|&m| {
                let mut b = m.builder();
                b.observe_pid(pid)
                    .any_cpu()
                    .inherit(true)
                    .enabled(false)
                    .enable_on_exec(true)
                    .exclude_kernel(!with_kernel);
                match b.build() {
                    Ok(c) => (m, Slot::Open(c)),
                    Err(e) => (m, Slot::Unsupported(unsupported_reason(&e))),
                }
            })
            .collect();
        Self { slots }
    }

    /// Reads every counter: `Ok(count)` or `Err(why not)`.
    pub fn read(&mut self) -> Vec<(Metric, Result<u64, String>)> {
        self.slots
            .iter_mut()
            .map(|(m, slot)| {
                let r = match slot {
                    Slot::Open(c) => c.read().map_err(|e| format!("reading failed ({e})")),
                    Slot::Unsupported(why) => Err(why.clone()),
                };
                (*m, r)
            })
            .collect()
    }
}

/// Which metrics this machine counts for a process of the caller's own, probed once on the
/// caller itself: `(metric, None)` when supported, `(metric, Some(why not))` otherwise.
pub fn probe(metrics: &[Metric]) -> Vec<(Metric, Option<String>)> {
    metrics
        .iter()
        .map(|&m| {
            let mut b = m.builder();
            b.observe_self().any_cpu();
            (m, b.build().err().map(|e| unsupported_reason(&e)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
        }
        assert!(!Metric::TaskClock.is_hardware());
        assert!(Metric::ItlbLoadMisses.is_hardware());
    }

    /// Software counters exist on every Linux machine; hardware ones either count or say
    /// why not (this VM: "not supported here"), never read as zero.
    #[test]
    fn a_child_is_counted_or_refused_with_a_reason() {
        let probed = probe(&Metric::ALL);
        for (m, why) in &probed {
            if !m.is_hardware() {
                assert!(why.is_none(), "{}: {why:?}", m.name());
            }
        }
        let mut counters = MetricCounters::open(std::process::id() as i32, &Metric::ALL);
        for (m, r) in counters.read() {
            match r {
                Ok(_) => {}
                Err(why) => {
                    assert!(m.is_hardware(), "{}: {why}", m.name());
                    assert!(why.contains("not"), "{why}");
                }
            }
        }
    }
}

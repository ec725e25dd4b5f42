//! Per-process CPU counters behind a small trait: the real one opens perf events on the pid
//! (software task-clock, page-faults and context-switches always; instructions, cycles,
//! branch-misses, L1-icache-load-misses, iTLB-load-misses and cache-misses where the PMU
//! has them).
//!
//! Every counter is opened disabled with `enable_on_exec`, so it starts counting when the
//! blocked execve completes (the exec-time open that triggers attaching happens before),
//! and with `inherit`, so children and threads the program creates are counted too: the
//! kernel folds a child's count into ours when the child exits. The count is read when the
//! main thread exits; children still running then are not included.
//!
//! The per-exec counters are two perf event groups ([`PerfCounterFactory`]): the software
//! one always, the hardware one where the PMU offers any counter. A group is read with one
//! `read` (`PERF_FORMAT_GROUP`), and a hardware group the PMU could schedule only part of
//! the run is scaled like `perf stat` does ([`scale_group`]; unit-tested). Hardware
//! counters cannot be exercised on this VM (no PMU: `perf stat` says `<not supported>`);
//! [`PerfCounterFactory::detect`] probes for them once and leaves them out when absent, so
//! a run here has the software counts and `None` for the rest, never zeros.
//!
//! [`Metric`] names every counter a run can have (the software ones always, the hardware
//! ones where the PMU offers them); [`MetricCounters`] opens a set of them on one process
//! for `optbin bench`, and a counter the machine refuses is recorded as unsupported (with
//! the kernel's reason), never as a zero.

use std::io;
use std::sync::Arc;

use perf_event::events::{Cache, CacheId, CacheOp, CacheResult, Hardware, Software};
use perf_event::{Builder, Counter, ReadFormat};
use serde::{Deserialize, Serialize};

/// The counts of one run besides its CPU time: `None` where the machine (or, for runs
/// stored before these columns existed, the catalog) has no such counter. Never a zero
/// for "not counted".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunCounts {
    pub page_faults: Option<u64>,
    pub context_switches: Option<u64>,
    pub instructions: Option<u64>,
    pub cycles: Option<u64>,
    pub branch_misses: Option<u64>,
    pub l1i_misses: Option<u64>,
    pub itlb_misses: Option<u64>,
    pub cache_misses: Option<u64>,
}

impl RunCounts {
    /// The count of `metric` (`None` for task-clock: that is the run's CPU time).
    pub fn get(&self, metric: Metric) -> Option<u64> {
        match metric {
            Metric::TaskClock => None,
            Metric::PageFaults => self.page_faults,
            Metric::ContextSwitches => self.context_switches,
            Metric::Instructions => self.instructions,
            Metric::Cycles => self.cycles,
            Metric::BranchMisses => self.branch_misses,
            Metric::L1IcacheLoadMisses => self.l1i_misses,
            Metric::ItlbLoadMisses => self.itlb_misses,
            Metric::CacheMisses => self.cache_misses,
        }
    }

    fn slot(&mut self, metric: Metric) -> Option<&mut Option<u64>> {
        Some(match metric {
            Metric::TaskClock => return None,
            Metric::PageFaults => &mut self.page_faults,
            Metric::ContextSwitches => &mut self.context_switches,
            Metric::Instructions => &mut self.instructions,
            Metric::Cycles => &mut self.cycles,
            Metric::BranchMisses => &mut self.branch_misses,
            Metric::L1IcacheLoadMisses => &mut self.l1i_misses,
            Metric::ItlbLoadMisses => &mut self.itlb_misses,
            Metric::CacheMisses => &mut self.cache_misses,
        })
    }

    /// Sets the count of `metric` (task-clock is not kept here).
    pub fn set(&mut self, metric: Metric, value: Option<u64>) {
        if let Some(slot) = self.slot(metric) {
            *slot = value;
        }
    }
}

/// What a run's counters read when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterReading {
    pub task_clock_ns: u64,
    pub counts: RunCounts,
}

/// Counters attached to one process.
pub trait RunCounters: Send {
    fn read(&mut self) -> io::Result<CounterReading>;
}

/// Attaches counters to a process that is about to exec.
pub trait CounterFactory: Send + Sync {
    fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>>;

    /// The hardware counters every run gets (none where there is no PMU).
    fn hardware(&self) -> Vec<Metric> {
        Vec::new()
    }
}

/// One line for status about which counters runs get: says once, for the machine, what a
/// machine without a PMU cannot count (rather than showing zeros per binary).
pub fn counters_line(hardware: &[Metric]) -> String {
    let missing: Vec<&str> =
        HARDWARE.iter().filter(|m| !hardware.contains(m)).map(|m| m.name()).collect();
    if hardware.is_empty() {
        return format!("counters: no PMU here ({} not supported)", missing.join(", "));
    }
    let counted: Vec<&str> = SOFTWARE.iter().chain(hardware).map(|m| m.name()).collect();
    let mut line = format!("counters: {}", counted.join(", "));
    if !missing.is_empty() {
        line.push_str(&format!(" ({} not supported)", missing.join(", ")));
    }
    line
}

/// The software counters of every run, in group order (task-clock leads the group): the
/// first three of [`Metric::ALL`].
const SOFTWARE: &[Metric] = Metric::ALL.split_at(3).0;

/// The hardware counters a run gets where the PMU offers them, in group order: the rest.
const HARDWARE: &[Metric] = Metric::ALL.split_at(3).1;

/// perf_event_open on the pid: one group of software counters (task-clock, page-faults,
/// context-switches), always, and one group of the hardware counters the PMU offers. Each
/// group is read with one `read` (`PERF_FORMAT_GROUP`) when the run ends, so a run costs
/// one `perf_event_open` per counter at exec and one or two reads at exit, nothing more.
///
/// Why the factory keeps a disabled page-faults and context-switches counter of its own
/// open: the kernel switches its software-event hooks on (patching kernel text, with
/// cross-CPU synchronization) when the first such event of a kind is created and off when
/// the last goes, so without a standing one every measured exec paid that switch twice.
/// Measured with `bench_overlay` (full mode, exec+exit of a served binary against native,
/// on the shared 2-core VM): 1.565 and 1.557 with the switch per exec; 1.187, 1.288 and
/// 1.150 with the standing counters, against 1.258, 1.153, 1.176 and 1.272 for the
/// task-clock-only measurement before.
#[derive(Debug, Clone)]
pub struct PerfCounterFactory {
    /// The hardware counters this machine opens (empty on a VM without a PMU).
    hardware: Vec<Metric>,
    /// The standing counters (see above); `None` in a factory built without them.
    _hooks_on: Option<Arc<Vec<Counter>>>,
}

impl PerfCounterFactory {
    /// Probes once which hardware counters the PMU offers (none on this VM).
    pub fn detect() -> Self {
        let hardware: Vec<Metric> =
            probe(HARDWARE).into_iter().filter_map(|(m, why)| why.is_none().then_some(m)).collect();
        if hardware.is_empty() {
            tracing::info!(
                "no hardware PMU counters: measuring task-clock, page-faults and \
                 context-switches only"
            );
        }
        Self { hardware, _hooks_on: Some(Arc::new(standing_software_counters())) }
    }

    /// A factory for exactly these hardware counters, without standing counters (tests).
    pub fn with_hardware(hardware: &[Metric]) -> Self {
        Self {
            hardware: hardware.iter().copied().filter(|m| m.is_hardware()).collect(),
            _hooks_on: None,
        }
    }

    /// Whether any hardware counter is counted.
    pub fn has_hardware(&self) -> bool {
        !self.hardware.is_empty()
    }

    /// The hardware counters counted.
    pub fn hardware(&self) -> &[Metric] {
        &self.hardware
    }
}

/// A disabled counter of each software event kind the runs use, on this process: it never
/// counts, it only keeps the kernel's hooks for the kind switched on (see
/// [`PerfCounterFactory`]). One that cannot be opened costs speed, not correctness.
fn standing_software_counters() -> Vec<Counter> {
    [Metric::PageFaults, Metric::ContextSwitches]
        .into_iter()
        .filter_map(|m| {
            let mut b = m.builder();
            b.observe_self().any_cpu().enabled(false);
            b.build()
                .map_err(|e| tracing::debug!(metric = m.name(), error = %e, "no standing counter"))
                .ok()
        })
        .collect()
}

/// One group of counters on a process: the leader (whose read returns every member's
/// count, in order) and the members, which must stay open.
struct CounterGroup {
    metrics: Vec<Metric>,
    leader: Counter,
    _members: Vec<Counter>,
}

impl CounterGroup {
    /// Opens `metrics` as one group on `pid` (disabled, enabled when the pid execs,
    /// inherited by its children). Fails when the first cannot be opened; a member the
    /// machine refuses is left out.
    fn open(metrics: &[Metric], pid: i32) -> io::Result<Self> {
        let (&first, rest) = metrics.split_first().ok_or(io::ErrorKind::InvalidInput)?;
        let mut b = first.builder();
        b.observe_pid(pid).any_cpu().inherit(true).enabled(false).enable_on_exec(true).read_format(
            ReadFormat::GROUP | ReadFormat::TOTAL_TIME_ENABLED | ReadFormat::TOTAL_TIME_RUNNING,
        );
        let mut leader = b.build()?;
        let mut opened = vec![first];
        let mut members = Vec::with_capacity(rest.len());
        for &m in rest {
            // Members are enabled: a group counts only while its leader is on, and the
            // leader comes on at the exec.
            let mut b = m.builder();
            b.observe_pid(pid).any_cpu().inherit(true).enabled(true);
            if let Ok(c) = b.build_with_group(&mut leader) {
                members.push(c);
                opened.push(m);
            }
        }
        Ok(Self { metrics: opened, leader, _members: members })
    }

    /// Every member's count, in the group's order; `None` for all when the group never
    /// got a hardware counter (the PMU was busy the whole run).
    fn read(&mut self) -> io::Result<Vec<(Metric, Option<u64>)>> {
        let data = self.leader.read_group()?;
        let values: Vec<u64> = data.iter().map(|e| e.value()).collect();
        let enabled = data.time_enabled().map_or(0, |d| d.as_nanos() as u64);
        let running = data.time_running().map_or(0, |d| d.as_nanos() as u64);
        let scaled = scale_group(&values, enabled, running);
        Ok(self.metrics.iter().copied().zip(scaled).collect())
    }
}

/// A group's counts corrected for multiplexing: a group that ran for part of the time it
/// was enabled (the PMU shared among more events than it has counters) is scaled up by
/// enabled/running, as `perf stat` does; one that never ran has no counts at all (not
/// zeros). A group enabled for no time (the run ended at once) is taken as is.
pub fn scale_group(values: &[u64], enabled_ns: u64, running_ns: u64) -> Vec<Option<u64>> {
    if enabled_ns == 0 || running_ns >= enabled_ns {
        return values.iter().map(|&v| Some(v)).collect();
    }
    if running_ns == 0 {
        return vec![None; values.len()];
    }
    let f = enabled_ns as f64 / running_ns as f64;
    values.iter().map(|&v| Some((v as f64 * f).round() as u64)).collect()
}

impl CounterFactory for PerfCounterFactory {
    fn hardware(&self) -> Vec<Metric> {
        self.hardware.clone()
    }

    fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>> {
        let software = CounterGroup::open(SOFTWARE, pid)?;
        // Hardware failures are not fatal: a run without them still has the software ones.
        let hardware = if self.hardware.is_empty() {
            None
        } else {
            CounterGroup::open(&self.hardware, pid).ok()
        };
        Ok(Box::new(PerfRunCounters { software, hardware }))
    }
}

struct PerfRunCounters {
    software: CounterGroup,
    hardware: Option<CounterGroup>,
}

impl RunCounters for PerfRunCounters {
    fn read(&mut self) -> io::Result<CounterReading> {
        let mut reading = CounterReading::default();
        let mut values = self.software.read()?;
        if let Some(h) = self.hardware.as_mut() {
            values.extend(h.read().unwrap_or_default());
        }
        for (m, v) in values {
            match m {
                Metric::TaskClock => reading.task_clock_ns = v.unwrap_or(0),
                m => reading.counts.set(m, v),
            }
        }
        Ok(reading)
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
        let with_kernel = rustix::process::geteuid().is_root();
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
    fn groups_scale_for_multiplexing_and_never_report_zeros_for_not_counted() {
        assert_eq!(scale_group(&[10, 20], 100, 100), vec![Some(10), Some(20)]);
        assert_eq!(scale_group(&[10, 20], 0, 0), vec![Some(10), Some(20)]);
        assert_eq!(scale_group(&[10, 21], 100, 50), vec![Some(20), Some(42)]);
        assert_eq!(scale_group(&[0, 0], 100, 0), vec![None, None]);
        let mut c = RunCounts::default();
        c.set(Metric::ItlbLoadMisses, Some(7));
        c.set(Metric::TaskClock, Some(9));
        assert_eq!(c.get(Metric::ItlbLoadMisses), Some(7));
        assert_eq!(c.get(Metric::TaskClock), None);
        for m in Metric::ALL {
            if m != Metric::ItlbLoadMisses {
                assert_eq!(c.get(m), None, "{}", m.name());
            }
        }
    }

    /// Forks a child that waits for a byte before it execs `sh -c SCRIPT`, the way execve
    /// reaches a served binary (blocked while the counters are attached by `attach`), and
    /// returns what `attach` gave once the child exited.
    fn run_held_with<T>(script: &str, attach: impl FnOnce(i32) -> T) -> T {
        let sh = c"/bin/sh";
        let argv: Vec<std::ffi::CString> =
            ["sh", "-c", script].iter().map(|a| std::ffi::CString::new(*a).unwrap()).collect();
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let (held, release) = rustix::pipe::pipe().unwrap();
        let mut b = [0u8; 1];
        // libc: rustix has no safe fork (only the unsafe `runtime::kernel_fork`) and no execv.
        // SAFETY: the child (of a multi-threaded test process) only makes async-signal-safe
        // calls (rustix's read is a raw system call; execv, _exit) on memory prepared above.
        let pid = unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let _ = rustix::io::read(&held, &mut b[..]);
                libc::execv(sh.as_ptr(), ptrs.as_ptr());
                libc::_exit(127);
            }
            pid
        };
        assert!(pid > 0, "fork failed");
        let attached = attach(pid);
        rustix::io::write(&release, &[1]).unwrap();
        let (_, status) = rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid),
            rustix::process::WaitOptions::empty(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(status.as_raw(), 0, "the child failed");
        attached
    }

    fn run_held(factory: &PerfCounterFactory, script: &str) -> CounterReading {
        let attach = |pid| factory.attach(pid).expect("software counters open everywhere");
        run_held_with(script, attach).read().unwrap()
    }

    /// The hardware group's path (a second group, led by a counter other than task-clock,
    /// read with one `read`, scaled, folded into the run's counts), driven with the
    /// software counters this VM has standing in for the PMU's: the code is the same, only
    /// the events differ. What this cannot show is that the PMU accepts the hardware and
    /// cache event encodings of [`Metric::builder`], and scaling under real multiplexing
    /// (that arithmetic is [`scale_group`], tested above).
    #[test]
    fn a_second_group_is_opened_read_and_folded_like_the_hardware_one() {
        let stand_in = [Metric::ContextSwitches, Metric::PageFaults];
        let script = "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; /bin/true";
        let (mut software, mut second) = run_held_with(script, |pid| {
            let software = CounterGroup::open(SOFTWARE, pid).unwrap();
            (software, CounterGroup::open(&stand_in, pid).unwrap())
        });
        let by_software = software.read().unwrap();
        let by_second = second.read().unwrap();
        assert_eq!(by_second.iter().map(|(m, _)| *m).collect::<Vec<_>>(), stand_in);
        let faults = |values: &[(Metric, Option<u64>)]| {
            values.iter().find(|(m, _)| *m == Metric::PageFaults).and_then(|(_, v)| *v).unwrap()
        };
        // The same event on the same process in both groups: the same count, give or take
        // the few faults between enabling one and the other.
        let (a, b) = (faults(&by_software), faults(&by_second));
        assert!(a > 10 && b > 10 && a.abs_diff(b) * 10 <= a, "{a} vs {b}");
        // Read through the per-run counters, the second group's counts land in the run's.
        let mut run = PerfRunCounters { software, hardware: Some(second) };
        let r = run.read().unwrap();
        assert!(r.task_clock_ns > 0, "{r:?}");
        assert_eq!(r.counts.page_faults, Some(b), "{r:?}");
        assert!(r.counts.context_switches.is_some() && r.counts.instructions.is_none(), "{r:?}");
    }

    /// The real per-exec counters on a real child with a grandchild: the software group
    /// counts (the grandchild's share folded in), each hardware counter is counted where
    /// the PMU has it and `None` where it has not.
    #[test]
    fn per_exec_groups_count_a_real_child() {
        let factory = PerfCounterFactory::detect();
        let r = run_held(&factory, "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; /bin/true");
        assert!(r.task_clock_ns > 1_000_000, "{r:?}");
        assert!(r.counts.page_faults.is_some_and(|n| n > 10), "{r:?}");
        assert!(r.counts.context_switches.is_some(), "{r:?}");
        for &m in HARDWARE {
            let counted = r.counts.get(m).is_some();
            assert_eq!(counted, factory.hardware().contains(&m), "{}: {r:?}", m.name());
        }
        // Asking for every hardware counter on a machine without them still measures.
        let r = run_held(&PerfCounterFactory::with_hardware(HARDWARE), "/bin/true");
        assert!(r.task_clock_ns > 0 && r.counts.page_faults.is_some(), "{r:?}");
    }

    #[test]
    fn the_counters_line_says_once_what_the_machine_lacks() {
        assert_eq!(
            counters_line(&[]),
            "counters: no PMU here (instructions, cycles, branch-misses, \
             L1-icache-load-misses, iTLB-load-misses, cache-misses not supported)"
        );
        assert_eq!(
            counters_line(&[Metric::Instructions, Metric::Cycles]),
            "counters: task-clock, page-faults, context-switches, instructions, cycles \
             (branch-misses, L1-icache-load-misses, iTLB-load-misses, cache-misses not supported)"
        );
        assert!(!counters_line(HARDWARE).contains("not supported"));
    }

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

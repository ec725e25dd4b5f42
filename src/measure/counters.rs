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

use std::io;

use perf_event::Builder;
use perf_event::Counter;
use perf_event::events::{Hardware, Software};

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

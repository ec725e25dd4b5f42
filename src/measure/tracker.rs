//! The run-record state machine: pending measurements keyed by pid, advanced by process
//! events, finished into [`RunRecord`]s. No I/O of its own (counters and /proc are behind
//! traits), so every path is unit-tested.
//!
//! Life of a measurement: `register` (exec-time open, counters attached, process blocked in
//! execve) -> `Exec` event (the exec completed: note the kernel timestamp, hash the new
//! command line) -> `Exit` of the main thread (read the counters, decode the status). An
//! exit before any exec means the exec failed: no run happened, nothing is recorded.
//! A second exec-time open for the same pid (a `#!` script opening its interpreter, or a
//! program exec'ing another served program) replaces the first: the last opened is what runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cmdline::{UNKNOWN_CMD, UNREAD_CMD, cmd_hash};
use super::counters::RunCounters;
use super::proc_connector::{ProcEvent, decode_wait_status};
use super::{ExecOpen, RunRecord};

/// What the tracker needs to know about live processes.
pub trait ProcessView {
    /// `/proc/PID/cmdline`, or None when the process is gone.
    fn cmdline(&self, pid: i32) -> Option<Vec<u8>>;
    /// Whether the pid still exists (a zombie counts as alive).
    fn is_alive(&self, pid: i32) -> bool;
    /// `/proc/PID/exe`, or None when the process is gone (or a view has no executables).
    fn exe(&self, _pid: i32) -> Option<PathBuf> {
        None
    }
}

/// The real `/proc` and `kill(pid, 0)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LiveProcesses;

impl ProcessView for LiveProcesses {
    fn cmdline(&self, pid: i32) -> Option<Vec<u8>> {
        super::cmdline::read_cmdline(pid)
    }

    fn exe(&self, pid: i32) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }

    fn is_alive(&self, pid: i32) -> bool {
        // A measured pid is a FUSE caller's, positive. As kill(2) had it: 0 (our own process
        // group) is alive; a negative one names a group, never a measured process.
        if pid < 0 {
            return false;
        }
        let Some(pid) = rustix::process::Pid::from_raw(pid) else { return true };
        // kill(pid, 0): existence and permission only; EPERM means it exists.
        rustix::process::test_kill_process(pid) != Err(rustix::io::Errno::SRCH)
    }
}

struct Pending {
    open: ExecOpen,
    /// CLOCK_MONOTONIC when registered: events stamped earlier belong to an older process
    /// (they may still sit in the socket queue when the registration happens).
    registered_ns: u64,
    /// `None`: followed for its exit only.
    counters: Option<Box<dyn RunCounters>>,
    /// Whether its command line is read at its exec (else its command is [`UNREAD_CMD`]).
    read_command: bool,
    exec: Option<(u64, String)>,
    /// When a sweep first found the process gone without its exit having been seen.
    gone_since: Option<Instant>,
}

/// Why measurements were dropped, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DropCounts {
    /// The process exited before its exec completed (exec failed).
    pub exec_failed: u64,
    /// The process vanished without an exit event (events lost) or its pid was reused.
    pub lost: u64,
    /// The counters could not be read at exit.
    pub unreadable: u64,
}

/// Pending measurements by pid.
#[derive(Default)]
pub struct RunTracker {
    pending: HashMap<i32, Pending>,
    dropped: DropCounts,
}

/// How long a measurement whose process vanished unseen waits for a late exit event.
pub const LOST_GRACE: Duration = Duration::from_secs(2);

impl RunTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a run of `pid` is being followed (registered, not ended).
    pub fn follows(&self, pid: i32) -> bool {
        self.pending.contains_key(&pid)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn dropped(&self) -> DropCounts {
        self.dropped
    }

    /// An exec-time open with counters attached to its pid, registered at `registered_ns`
    /// (CLOCK_MONOTONIC, the clock of the kernel's event timestamps).
    pub fn register(&mut self, open: ExecOpen, counters: Box<dyn RunCounters>, registered_ns: u64) {
        self.insert(open, Some(counters), true, registered_ns);
    }

    /// An exec-time open followed to its exit without counters: its record says
    /// `counted: false`. Without `read_command` its command is [`UNREAD_CMD`] (a bound run
    /// outside the sample, see [`crate::measure::BoundExec`]).
    pub fn register_exit_only(&mut self, open: ExecOpen, read_command: bool, registered_ns: u64) {
        self.insert(open, None, read_command, registered_ns);
    }

    fn insert(
        &mut self,
        open: ExecOpen,
        counters: Option<Box<dyn RunCounters>>,
        read_command: bool,
        registered_ns: u64,
    ) {
        let pid = open.pid;
        let exec = None;
        let p = Pending { open, registered_ns, counters, read_command, exec, gone_since: None };
        self.pending.insert(pid, p);
    }

    /// Advances the pending measurements; returns a record when a measured run ended.
    pub fn on_event(
        &mut self,
        ev: ProcEvent,
        procs: &dyn ProcessView,
        now_ms: i64,
    ) -> Option<RunRecord> {
        match ev {
            ProcEvent::Fork { child_pid, ts_ns, .. } => {
                // A task created with this id after we registered it: the process we were
                // waiting on is gone and the pid was reused.
                if self.pending.get(&child_pid).is_some_and(|p| ts_ns > p.registered_ns) {
                    self.pending.remove(&child_pid);
                    self.dropped.lost += 1;
                }
                None
            }
            ProcEvent::Exec { tgid, ts_ns, .. } => {
                let p = self.pending.get_mut(&tgid)?;
                if p.exec.is_none() && ts_ns >= p.registered_ns {
                    let hash = if p.read_command {
                        procs.cmdline(tgid).map_or_else(|| UNKNOWN_CMD.into(), |c| cmd_hash(&c))
                    } else {
                        UNREAD_CMD.into()
                    };
                    p.exec = Some((ts_ns, hash));
                }
                None
            }
            ProcEvent::Exit { pid, tgid, status, ts_ns } => {
                if pid != tgid {
                    return None; // a thread, not the process
                }
                if self.pending.get(&pid).is_none_or(|p| ts_ns < p.registered_ns) {
                    return None; // not ours, or an older process that had this pid
                }
                let mut p = self.pending.remove(&pid)?;
                let Some((exec_ts, cmd_hash)) = p.exec.take() else {
                    self.dropped.exec_failed += 1;
                    return None;
                };
                let reading = match p.counters.as_mut().map(|c| c.read()) {
                    Some(Ok(r)) => Some(r),
                    Some(Err(e)) => {
                        tracing::debug!(pid, error = %e, "run counters unreadable");
                        self.dropped.unreadable += 1;
                        return None;
                    }
                    None => None,
                };
                let counted = reading.is_some();
                let reading = reading.unwrap_or_default();
                Some(RunRecord {
                    original: p.open.original,
                    key: p.open.key,
                    binary_id: p.open.binary_id,
                    variant_id: p.open.variant_id,
                    cmd_hash,
                    counted,
                    task_clock_ns: reading.task_clock_ns,
                    counts: reading.counts,
                    wall_ns: ts_ns.saturating_sub(exec_ts),
                    exit: decode_wait_status(status),
                    at_ms: now_ms,
                })
            }
        }
    }

    /// Drops measurements whose process vanished without an exit event (the kernel drops
    /// events when the socket buffer overflows) after a grace period for late events.
    pub fn sweep(&mut self, procs: &dyn ProcessView, now: Instant) -> usize {
        let mut dead = Vec::new();
        for (pid, p) in self.pending.iter_mut() {
            if procs.is_alive(*pid) {
                p.gone_since = None;
                continue;
            }
            match p.gone_since {
                None => p.gone_since = Some(now),
                Some(t) if now.duration_since(t) >= LOST_GRACE => dead.push(*pid),
                Some(_) => {}
            }
        }
        for pid in &dead {
            self.pending.remove(pid);
        }
        self.dropped.lost += dead.len() as u64;
        dead.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::FileKey;
    use crate::measure::RunExit;
    use crate::measure::counters::CounterReading;
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::path::PathBuf;

    struct FixedCounters(u64);
    impl RunCounters for FixedCounters {
        fn read(&mut self) -> std::io::Result<CounterReading> {
            Ok(CounterReading { task_clock_ns: self.0, ..Default::default() })
        }
    }

    #[derive(Default)]
    struct FakeProcs {
        cmdlines: HashMap<i32, Vec<u8>>,
        dead: RefCell<HashSet<i32>>,
    }
    impl ProcessView for FakeProcs {
        fn cmdline(&self, pid: i32) -> Option<Vec<u8>> {
            self.cmdlines.get(&pid).cloned()
        }
        fn is_alive(&self, pid: i32) -> bool {
            !self.dead.borrow().contains(&pid)
        }
    }

    fn open(pid: i32, variant: Option<i64>) -> ExecOpen {
        ExecOpen {
            pid,
            original: PathBuf::from("/usr/bin/x"),
            variant_id: variant,
            binary_id: Some(1),
            key: FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 },
        }
    }

    #[test]
    fn exec_then_exit_makes_a_record() {
        let mut procs = FakeProcs::default();
        procs.cmdlines.insert(10, b"x\0-v\0".to_vec());
        let mut t = RunTracker::new();
        t.register(open(10, Some(7)), Box::new(FixedCounters(5_000)), 0);
        assert!(t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 100 }, &procs, 1).is_none());
        // A thread's exit is not the process's.
        assert!(
            t.on_event(ProcEvent::Exit { pid: 11, tgid: 10, status: 0, ts_ns: 200 }, &procs, 1)
                .is_none()
        );
        let r = t
            .on_event(ProcEvent::Exit { pid: 10, tgid: 10, status: 0x8b, ts_ns: 1_100 }, &procs, 9)
            .unwrap();
        assert_eq!(r.exit, RunExit::Signaled(11));
        assert_eq!(r.wall_ns, 1_000);
        assert_eq!(r.task_clock_ns, 5_000);
        assert_eq!(r.variant_id, Some(7));
        assert_eq!(r.cmd_hash, cmd_hash(b"x\0-v\0"));
        assert_eq!(r.at_ms, 9);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn a_run_followed_for_its_exit_only_has_its_command_and_exit_but_no_counts() {
        let mut procs = FakeProcs::default();
        procs.cmdlines.insert(10, b"x\0-v\0".to_vec());
        let mut t = RunTracker::new();
        t.register_exit_only(open(10, Some(7)), true, 0);
        assert!(t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 100 }, &procs, 1).is_none());
        let r = t
            .on_event(ProcEvent::Exit { pid: 10, tgid: 10, status: 0x8b, ts_ns: 1_100 }, &procs, 9)
            .unwrap();
        assert!(!r.counted);
        assert_eq!(r.exit, RunExit::Signaled(11), "a crash is seen without counters");
        assert_eq!((r.task_clock_ns, r.counts), (0, Default::default()));
        assert_eq!(r.cmd_hash, cmd_hash(b"x\0-v\0"));
        assert_eq!((r.variant_id, r.wall_ns), (Some(7), 1_000));
        assert_eq!(t.dropped(), DropCounts::default());
    }

    #[test]
    fn a_run_outside_the_command_sample_is_unread_and_its_command_line_untouched() {
        /// A process whose command line must not be read.
        struct Untouchable;
        impl ProcessView for Untouchable {
            fn cmdline(&self, pid: i32) -> Option<Vec<u8>> {
                panic!("the command line of {pid} was read");
            }
            fn is_alive(&self, _pid: i32) -> bool {
                true
            }
        }
        let mut t = RunTracker::new();
        t.register_exit_only(open(10, Some(7)), false, 0);
        assert!(
            t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 100 }, &Untouchable, 1)
                .is_none()
        );
        let exit = ProcEvent::Exit { pid: 10, tgid: 10, status: 0x8b, ts_ns: 1_100 };
        let r = t.on_event(exit, &Untouchable, 9).unwrap();
        assert_eq!(r.cmd_hash, UNREAD_CMD);
        assert_eq!(r.exit, RunExit::Signaled(11), "its exit is followed all the same");
        assert!(!r.counted);
    }

    #[test]
    fn exit_before_exec_is_a_failed_exec_not_a_run() {
        let procs = FakeProcs::default();
        let mut t = RunTracker::new();
        t.register(open(10, None), Box::new(FixedCounters(1)), 0);
        assert!(
            t.on_event(
                ProcEvent::Exit { pid: 10, tgid: 10, status: 127 << 8, ts_ns: 5 },
                &procs,
                0
            )
            .is_none()
        );
        assert_eq!(t.dropped().exec_failed, 1);
    }

    #[test]
    fn vanished_process_is_dropped_after_grace_and_fork_reuse_drops_stale() {
        let procs = FakeProcs::default();
        let mut t = RunTracker::new();
        t.register(open(10, None), Box::new(FixedCounters(1)), 0);
        t.register(open(20, None), Box::new(FixedCounters(1)), 0);
        procs.dead.borrow_mut().insert(10);
        let t0 = Instant::now();
        assert_eq!(t.sweep(&procs, t0), 0);
        assert_eq!(t.sweep(&procs, t0 + LOST_GRACE), 1);
        // A fork stamped before the registration is the measured process's own birth.
        t.pending.get_mut(&20).unwrap().registered_ns = 50;
        let fork = |ts_ns| ProcEvent::Fork { child_pid: 20, child_tgid: 20, ts_ns };
        assert!(t.on_event(fork(40), &procs, 0).is_none());
        assert_eq!(t.pending(), 1);
        assert!(t.on_event(fork(60), &procs, 0).is_none());
        assert_eq!(t.pending(), 0);
        assert_eq!(t.dropped().lost, 2);
    }

    #[test]
    fn events_older_than_the_registration_are_ignored() {
        let procs = FakeProcs::default();
        let mut t = RunTracker::new();
        t.register(open(10, None), Box::new(FixedCounters(1)), 100);
        // The previous owner of pid 10 exec'd and exited before we registered.
        t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 90 }, &procs, 0);
        assert!(
            t.on_event(ProcEvent::Exit { pid: 10, tgid: 10, status: 0, ts_ns: 95 }, &procs, 0)
                .is_none()
        );
        assert_eq!(t.pending(), 1);
        t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 110 }, &procs, 0);
        let r = t.on_event(ProcEvent::Exit { pid: 10, tgid: 10, status: 0, ts_ns: 150 }, &procs, 0);
        assert_eq!(r.map(|r| r.wall_ns), Some(40));
    }

    #[test]
    fn unreadable_cmdline_is_unknown_and_second_open_replaces_first() {
        let procs = FakeProcs::default();
        let mut t = RunTracker::new();
        t.register(open(10, Some(1)), Box::new(FixedCounters(1)), 0);
        t.register(open(10, Some(2)), Box::new(FixedCounters(2)), 0);
        t.on_event(ProcEvent::Exec { pid: 10, tgid: 10, ts_ns: 0 }, &procs, 0);
        let r = t
            .on_event(ProcEvent::Exit { pid: 10, tgid: 10, status: 3 << 8, ts_ns: 1 }, &procs, 0)
            .unwrap();
        assert_eq!(r.cmd_hash, UNKNOWN_CMD);
        assert_eq!(r.variant_id, Some(2));
        assert_eq!(r.task_clock_ns, 2);
        assert_eq!(r.exit, RunExit::Exited(3));
    }
}

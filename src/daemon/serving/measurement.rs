//! Measurement in the serving wiring: the measurer (if it runs) and what became of the runs
//! it saw ([`Measurement`]), the overlay's event sink that attaches run counters to
//! exec-time opens before the exec completes ([`MeasuringEvents`]), and the task that hands
//! measured runs to the policy in batches ([`count_runs`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use super::binding::Binder;
use super::instrumented::InstrServing;
use crate::fs::{EventSink, FsEvent, ServingTable};
use crate::measure::{ExecOpen, Measurer, RunExit, RunRecord};

/// How long measured runs that ended normally are held to reach the policy as one batch.
pub const HAND_OVER_EVERY: Duration = Duration::from_millis(100);

/// The measurer (if it runs) and what became of the runs it saw.
pub(super) struct Measurement {
    pub(super) measurer: Option<Measurer>,
    /// Why measurement is off; `None` while it runs.
    pub(super) off: Option<String>,
    /// Exec-time opens whose counters could not be attached (those runs are not measured).
    pub(super) not_attached: AtomicU64,
    /// Run records received from the measurer since start.
    pub(super) measured: AtomicU64,
    /// Of those, runs killed by a signal.
    pub(super) killed: AtomicU64,
    /// Of those, runs followed for their exit only (a served variant's runs not sampled
    /// for counters).
    pub(super) exit_only: AtomicU64,
}

impl Measurement {
    pub(super) fn off(why: String) -> Self {
        Self {
            measurer: None,
            off: Some(why),
            not_attached: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            killed: AtomicU64::new(0),
            exit_only: AtomicU64::new(0),
        }
    }

    pub(super) fn on(measurer: Measurer) -> Self {
        Self { measurer: Some(measurer), off: None, ..Self::off(String::new()) }
    }

    pub(super) fn is_on(&self) -> bool {
        self.measurer.is_some()
    }

    /// Attaches counters to an exec'ing process (or, for a run the serving table does not
    /// sample, follows it to its exit only); never fails the exec.
    fn on_exec_open(&self, open: ExecOpen, counted: bool) {
        let Some(m) = &self.measurer else { return };
        let pid = open.pid;
        let registered = if counted { m.on_exec_open(open) } else { m.follow_exec_open(open) };
        if let Err(e) = registered {
            // A process killed while blocked in execve, or out of file descriptors: that
            // run goes unmeasured, the exec goes on.
            let n = self.not_attached.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                tracing::warn!(pid, error = %format!("{e:#}"), "a run could not be measured");
            } else {
                tracing::debug!(pid, error = %format!("{e:#}"), "a run could not be measured");
            }
        }
    }
}

/// The overlay's event sink with measurement in front (see the module doc).
pub(super) struct MeasuringEvents {
    pub(super) measurement: Arc<Measurement>,
    /// Which runs get counters, and which are in a window ([`ServingTable::exec_run`]).
    pub(super) serving: Arc<ServingTable>,
    pub(super) instr: Arc<InstrServing>,
    /// Told of execs through the mount in a window between binds.
    pub(super) binder: Option<Arc<Binder>>,
    pub(super) next: Arc<dyn EventSink>,
}

impl EventSink for MeasuringEvents {
    fn event(&self, event: FsEvent) {
        if let FsEvent::Opened { original, key, variant_id, pid, exec: true, .. } = &event {
            let run = self.serving.exec_run(original);
            let open = ExecOpen {
                pid: *pid as i32,
                original: original.clone(),
                variant_id: *variant_id,
                // The catalog attributes the run by the variant or the path's key.
                binary_id: None,
                key: *key,
            };
            self.measurement.on_exec_open(open, run.counted);
            if let Some(b) = &self.binder
                && run.in_window
            {
                b.window_exec(original);
            }
            if let Some(v) = variant_id {
                self.instr.on_exec(original, *v);
            }
        }
        self.next.event(event);
    }
}

/// Counts the measurer's records for status on their way to the policy task, and hands
/// them over in bursts: the task stores and re-evaluates per batch of what is queued, and
/// one evaluation reads up to thousands of runs of the binary, so a record per exec would
/// cost an evaluation per exec. The records are drained every [`HAND_OVER_EVERY`] without
/// awaiting each one (a wake-up of the runtime per exec cost more daemon CPU than the
/// run's bookkeeping, see docs/mount.md); a run killed by a signal wakes this at once
/// (`killed`, [`crate::measure::Measurer::killed_runs`]): a crash quarantines without
/// waiting.
pub(super) async fn count_runs(
    measurement: Arc<Measurement>,
    mut records: mpsc::UnboundedReceiver<RunRecord>,
    killed: Arc<Notify>,
    to_policy: mpsc::UnboundedSender<RunRecord>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut flush = tokio::time::interval(HAND_OVER_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.changed() => true,
            _ = flush.tick() => false,
            _ = killed.notified() => false,
        };
        let closed = loop {
            match records.try_recv() {
                Ok(record) => {
                    measurement.measured.fetch_add(1, Ordering::Relaxed);
                    if !record.counted {
                        measurement.exit_only.fetch_add(1, Ordering::Relaxed);
                    }
                    if matches!(record.exit, RunExit::Signaled(_)) {
                        measurement.killed.fetch_add(1, Ordering::Relaxed);
                    }
                    if to_policy.send(record).is_err() {
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if stopping || closed {
            break;
        }
    }
}

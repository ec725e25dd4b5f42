//! Time behind a trait, so logic that depends on "now" (windows, ages, timeouts) is testable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in whole seconds and nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    fn unix_secs(&self) -> i64 {
        self.now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    }

    /// Milliseconds since the Unix epoch (0 before it): the catalog's `at_ms` columns.
    fn unix_ms(&self) -> i64 {
        self.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's process-connector timestamps
/// (an exec's, an exit's), to order them against what this process did.
pub fn monotonic_ns() -> u64 {
    use rustix::time::{ClockId, DynamicClockId, clock_gettime_dynamic};
    // The fallible variant (the same vDSO call): plain clock_gettime panics when the clock
    // fails; 0 then, as before.
    let Ok(ts) = clock_gettime_dynamic(DynamicClockId::Known(ClockId::Monotonic)) else {
        return 0;
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A clock that only moves when told to; for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    secs: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn at(unix_secs: i64) -> Self {
        Self { secs: std::sync::atomic::AtomicI64::new(unix_secs) }
    }

    pub fn advance(&self, by: Duration) {
        self.secs.fetch_add(by.as_secs() as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH
            + Duration::from_secs(self.secs.load(std::sync::atomic::Ordering::SeqCst).max(0) as u64)
    }
}

//! `[profile]` of the config file: sampling, maturity, retention and instrumentation
//! settings ([`Settings`]), parsed once with the rest of the file (`crate::config`),
//! validated there, and turned into the profiler's own types here.

use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::ProfilerConfig;
use super::instrument::InstrumentationBudget;
use super::maturity::MaturityThresholds;
use crate::catalog::profiles::Retention;

/// `[profile]` as written in the config file; every key is optional (see `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Whether the daemon samples at all. Without it no profile grows and nothing matures.
    pub enabled: bool,
    /// Samples per second per CPU (continuous profilers use 19-100 Hz).
    pub frequency_hz: u64,
    /// Ring buffer per CPU, KiB (rounded up to a power of two pages).
    pub buffer_kib: u64,
    /// Seconds between writes of the gathered counts to the catalog.
    pub flush_secs: u64,
    /// Length of one profile window, seconds; maturity compares recent windows with older ones.
    pub window_secs: u64,
    /// Seconds between retention passes (dropping windows that are too old or too big).
    pub rotate_secs: u64,
    /// A binary is hashed and symbolized only once it has this many samples.
    pub identify_after_samples: u64,
    /// Maturity: samples in the binary's own code before BOLT may use the profile.
    pub min_samples: u64,
    /// Maturity: separate processes (runs) the samples must come from.
    pub min_runs: u64,
    /// Maturity: agreement (0..1) of the recent hot functions with the older ones.
    pub min_stability: f64,
    /// Windows older than this many days are dropped.
    pub retention_days: u64,
    /// Per binary: the oldest windows are dropped while its profile exceeds this many MiB.
    pub max_mib_per_binary: u64,
    /// All binaries: the oldest windows are dropped while all profiles exceed this many MiB.
    pub max_mib_total: u64,
    /// Instrumentation mode: `"on"` (default) or `"off"`. When on, and the profiler has no
    /// hardware branch stacks, binaries with relocations get a BOLT-instrumented variant
    /// served to a bounded share of their execs; the exact profile those runs write is
    /// merged into the catalog and BOLT uses it (see `docs/config.md`).
    pub instrumentation: String,
    /// Instrumentation budget: the first N execs after the instrumented variant exists get it...
    pub instrument_first_runs: u64,
    /// ...then 1 exec in K (0: none after the first N)...
    pub instrument_one_in: u64,
    /// ...until this many instrumented runs were collected; the profile is then complete.
    pub instrument_max_runs: u64,
    /// Instrumented runs whose median CPU time exceeds this many times the original's (same
    /// command) stop instrumentation of that binary.
    pub instrument_max_slowdown: f64,
    /// Where instrumented runs write their profiles; default `<state_dir>.instr` (outside
    /// the 0700 state directory, which other users cannot enter).
    pub instrumentation_dir: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        let p = ProfilerConfig::default();
        let t = MaturityThresholds::default();
        let r = Retention::default();
        let b = InstrumentationBudget::default();
        Self {
            enabled: true,
            frequency_hz: p.frequency_hz,
            buffer_kib: (p.buffer_bytes >> 10) as u64,
            flush_secs: p.flush_interval.as_secs(),
            window_secs: p.window_secs as u64,
            rotate_secs: p.rotate_interval.as_secs(),
            identify_after_samples: p.identify_after_samples,
            min_samples: t.min_samples,
            min_runs: t.min_runs,
            min_stability: t.min_stability,
            retention_days: (r.max_age_secs / 86_400) as u64,
            max_mib_per_binary: r.max_bytes_per_binary >> 20,
            max_mib_total: r.max_bytes_total >> 20,
            instrumentation: "on".into(),
            instrument_first_runs: b.first_runs,
            instrument_one_in: b.then_one_in,
            instrument_max_runs: b.max_runs,
            instrument_max_slowdown: crate::profile::instrument::DEFAULT_MAX_SLOWDOWN,
            instrumentation_dir: None,
        }
    }
}

const DAY_SECS: u64 = 86_400;

impl Settings {
    /// Checks every value is in a range the profiler can work with; errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let in_range = |key: &str, v: u64, lo: u64, hi: u64| -> anyhow::Result<()> {
            if v < lo || v > hi {
                bail!("[profile] {key} = {v} is out of range: it must be within {lo}..={hi}");
            }
            Ok(())
        };
        // perf throttles far below its own cap; beyond 10 kHz sampling costs more than it tells.
        in_range("frequency_hz", self.frequency_hz, 1, 10_000)?;
        in_range("buffer_kib", self.buffer_kib, 4, 64 << 10)?;
        in_range("flush_secs", self.flush_secs, 1, 3_600)?;
        in_range("window_secs", self.window_secs, 1, 7 * DAY_SECS)?;
        in_range("rotate_secs", self.rotate_secs, 1, DAY_SECS)?;
        in_range("retention_days", self.retention_days, 1, 3_650)?;
        in_range("max_mib_per_binary", self.max_mib_per_binary, 1, 1 << 20)?;
        in_range("max_mib_total", self.max_mib_total, 1, 1 << 20)?;
        if !matches!(self.instrumentation.as_str(), "off" | "on") {
            bail!(
                "[profile] instrumentation = {:?} is not one of \"off\", \"on\"",
                self.instrumentation
            );
        }
        in_range("instrument_max_runs", self.instrument_max_runs, 1, 1_000_000)?;
        if !(self.instrument_max_slowdown > 1.0 && self.instrument_max_slowdown.is_finite()) {
            bail!(
                "[profile] instrument_max_slowdown = {} is out of range: it must be above 1.0",
                self.instrument_max_slowdown
            );
        }
        if let Some(dir) = &self.instrumentation_dir
            && !dir.is_absolute()
        {
            bail!("[profile] instrumentation_dir = {:?} must be an absolute path", dir);
        }
        if !(0.0..=1.0).contains(&self.min_stability) {
            bail!(
                "[profile] min_stability = {} is out of range: it must be within 0.0..=1.0",
                self.min_stability
            );
        }
        Ok(())
    }

    /// The profiler's settings.
    pub fn profiler_config(&self) -> ProfilerConfig {
        ProfilerConfig {
            frequency_hz: self.frequency_hz,
            buffer_bytes: (self.buffer_kib << 10) as usize,
            flush_interval: Duration::from_secs(self.flush_secs),
            window_secs: self.window_secs as i64,
            rotate_interval: Duration::from_secs(self.rotate_secs),
            retention: Retention {
                max_age_secs: (self.retention_days * DAY_SECS) as i64,
                max_bytes_per_binary: self.max_mib_per_binary << 20,
                max_bytes_total: self.max_mib_total << 20,
            },
            identify_after_samples: self.identify_after_samples,
        }
    }

    /// The instrumentation budget when `instrumentation = "on"`, else None.
    pub fn instrumentation_budget(&self) -> Option<InstrumentationBudget> {
        (self.instrumentation == "on").then_some(InstrumentationBudget {
            first_runs: self.instrument_first_runs,
            then_one_in: self.instrument_one_in,
            max_runs: self.instrument_max_runs,
        })
    }

    /// Where instrumented runs write their profiles: the configured directory, else
    /// `<state_dir>.instr`. Not inside the state directory: that one is 0700 (it holds the
    /// catalog and the variant store), and an instrumented program run by any user must be
    /// able to create its profile file; the directory itself is root-owned 1733 (see
    /// `crate::bolt::flags`).
    pub fn instrumentation_dir(&self, state_dir: &std::path::Path) -> std::path::PathBuf {
        self.instrumentation_dir.clone().unwrap_or_else(|| {
            let mut name = state_dir.as_os_str().to_owned();
            name.push(".instr");
            std::path::PathBuf::from(name)
        })
    }

    pub fn thresholds(&self) -> MaturityThresholds {
        MaturityThresholds {
            min_samples: self.min_samples,
            min_runs: self.min_runs,
            min_stability: self.min_stability,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> anyhow::Result<Settings> {
        crate::config::parse_section::<Settings>("profile", text)
    }

    #[test]
    fn defaults_are_the_profilers_own() {
        let s = parse("").unwrap();
        assert_eq!(s, Settings::default());
        let p = s.profiler_config();
        let d = ProfilerConfig::default();
        assert_eq!(
            (p.frequency_hz, p.buffer_bytes, p.flush_interval, p.window_secs, p.retention),
            (d.frequency_hz, d.buffer_bytes, d.flush_interval, d.window_secs, d.retention)
        );
        assert_eq!((p.rotate_interval, p.identify_after_samples), (d.rotate_interval, 50));
        assert_eq!(s.thresholds(), MaturityThresholds::default());
        assert_eq!(s.thresholds().min_samples, 100_000);
    }

    #[test]
    fn keys_reach_the_profiler() {
        let s = parse(
            "frequency_hz = 499\nwindow_secs = 2\nflush_secs = 1\nmin_samples = 300\n\
             min_runs = 2\nmin_stability = 0.5\nretention_days = 2\nmax_mib_per_binary = 3\n\
             max_mib_total = 7\nbuffer_kib = 64\nrotate_secs = 9\nidentify_after_samples = 5",
        )
        .unwrap();
        let p = s.profiler_config();
        assert_eq!((p.frequency_hz, p.window_secs, p.flush_interval.as_secs()), (499, 2, 1));
        assert_eq!((p.buffer_bytes, p.rotate_interval.as_secs()), (64 << 10, 9));
        assert_eq!(p.identify_after_samples, 5);
        assert_eq!(
            p.retention,
            Retention {
                max_age_secs: 2 * 86_400,
                max_bytes_per_binary: 3 << 20,
                max_bytes_total: 7 << 20
            }
        );
        assert_eq!(
            s.thresholds(),
            MaturityThresholds { min_samples: 300, min_runs: 2, min_stability: 0.5 }
        );
    }

    #[test]
    fn instrumentation_is_on_by_default_and_configurable() {
        let s = parse("").unwrap();
        assert_eq!(s.instrumentation_budget(), Some(InstrumentationBudget::default()));
        assert_eq!(s.instrument_max_slowdown, 10.0);
        assert_eq!(parse("instrumentation = \"off\"").unwrap().instrumentation_budget(), None);
        assert_eq!(
            s.instrumentation_dir(Path::new("/var/lib/optbin")),
            Path::new("/var/lib/optbin.instr")
        );
        let s = parse(
            "instrumentation = \"on\"\ninstrument_first_runs = 1\ninstrument_one_in = 2\n\
             instrument_max_runs = 3\ninstrumentation_dir = \"/srv/instr\"",
        )
        .unwrap();
        assert_eq!(
            s.instrumentation_budget(),
            Some(InstrumentationBudget { first_runs: 1, then_one_in: 2, max_runs: 3 })
        );
        assert_eq!(s.instrumentation_dir(Path::new("/x")), Path::new("/srv/instr"));
    }

    #[test]
    fn errors_name_the_bad_key() {
        for (text, key) in [
            ("frequncy_hz = 5", "frequncy_hz"),
            ("frequency_hz = 0", "frequency_hz"),
            ("window_secs = 0", "window_secs"),
            ("min_stability = 1.5", "min_stability"),
            ("min_samples = \"many\"", "min_samples"),
            ("min_runs = -1", "min_runs"),
            ("instrumentation = \"maybe\"", "instrumentation"),
            ("instrument_max_runs = 0", "instrument_max_runs"),
            ("instrument_max_slowdown = 0.5", "instrument_max_slowdown"),
            ("instrumentation_dir = \"rel\"", "instrumentation_dir"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains("profile"), "{text:?}: {err}");
        }
    }
}

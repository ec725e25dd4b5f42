//! `[policy]` of the config file ([`Settings`]): parsed once with the rest of the file
//! (`crate::config`), validated there, and turned into the policy's knobs and the policy
//! task's timings here.

use anyhow::{Context, ensure};
use serde::{Deserialize, Serialize};

use super::PolicyConfig;
use super::task::PolicyTaskOptions;

/// The `[policy]` section of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Measure runs of served binaries (per-exec CPU time and exit status). Without
    /// measurement no canary is run.
    pub measure: bool,
    /// A binary with no variant to serve runs natively: the mount presents it as a symlink
    /// to the real file (no FUSE request, no counters, native speed) until a variant of it
    /// is canaried, served or pinned. Off: every optimizable binary is served through the
    /// mount and each of its runs measured, also when there is nothing to compare it with.
    pub native_until_variant: bool,
    /// Share of execs a canary variant gets (0..=1).
    pub canary_share: f64,
    /// Runs per arm (variant and original) at the first look (>= 5); later looks at 2x,
    /// 4x, ... of it.
    pub min_runs: usize,
    /// Number of looks (1..=10); a variant not shown faster at the last is rejected.
    pub looks: u32,
    /// Bound on the chance of promoting a variant that is not faster (0..0.5).
    pub alpha: f64,
    /// Smallest estimated gain that promotes a variant (0.02 = 2% less CPU time).
    pub promote_min_gain: f64,
    /// Share of execs that keep going to the original while a variant is served (0..=1).
    pub exploration_share: f64,
    /// Runs exiting with a code the original never gave that quarantine a variant (>= 1).
    pub suspicious_exit_strikes: usize,
    /// Microseconds serving through the mount adds to an exec; a variant must save more CPU
    /// time per run than this to be promoted over the original (0: no floor).
    pub serving_cost_us: u64,
    /// Once a variant is served (promoted), one run in this many, drawn at random, gets
    /// counters; the others are followed for their exit status only (crashes and exit codes
    /// are still caught at once). 1: every run is counted. Canaries always count every run.
    pub served_count_one_in: u32,
    /// A promoted variant (served alone, its runs sampled) is bind-mounted over its entry in
    /// the mount, so that its execs make no FUSE request; the original's exploration runs
    /// and the counted runs are made in short windows through the mount (docs/mount.md).
    /// Off: every exec of it goes through the mount.
    pub bind_served: bool,
    /// How often every watched binary is checked for new variants and changed controls.
    pub rescan_ms: u64,
    /// Measured runs older than this are deleted.
    pub runs_max_age_days: u64,
    /// At most this many measured runs are kept, machine-wide (oldest go first).
    pub runs_max_rows: u64,
}

impl Default for Settings {
    fn default() -> Self {
        let p = PolicyConfig::default();
        let t = PolicyTaskOptions::default();
        Self {
            measure: true,
            native_until_variant: true,
            canary_share: p.canary_fraction,
            min_runs: p.min_runs_per_arm,
            looks: p.looks,
            alpha: p.alpha,
            promote_min_gain: p.promote_min_gain,
            exploration_share: p.exploration_share,
            suspicious_exit_strikes: p.suspicious_exit_strikes,
            serving_cost_us: p.serving_cost_us,
            served_count_one_in: p.served_count_one_in,
            bind_served: true,
            rescan_ms: t.rescan_every.as_millis() as u64,
            runs_max_age_days: t.runs_max_age.as_secs() / 86_400,
            runs_max_rows: t.runs_max_rows,
        }
    }
}

impl Settings {
    /// Checks every value is in a range the policy can work with; errors name the key as
    /// written in the file.
    pub fn validate(&self) -> anyhow::Result<()> {
        let share = |key: &str, v: f64| {
            ensure!((0.0..=1.0).contains(&v), "[policy] {key} = {v} must be within 0..=1");
            Ok(())
        };
        share("canary_share", self.canary_share)?;
        share("exploration_share", self.exploration_share)?;
        share("promote_min_gain", self.promote_min_gain)?;
        ensure!(
            self.alpha > 0.0 && self.alpha < 0.5,
            "[policy] alpha = {} must be within 0..0.5 (both excluded)",
            self.alpha
        );
        ensure!(self.min_runs >= 5, "[policy] min_runs = {} must be at least 5", self.min_runs);
        ensure!(
            (1..=10).contains(&self.looks),
            "[policy] looks = {} must be within 1..=10",
            self.looks
        );
        ensure!(
            self.suspicious_exit_strikes >= 1,
            "[policy] suspicious_exit_strikes must be at least 1"
        );
        ensure!(
            self.serving_cost_us <= 1_000_000,
            "[policy] serving_cost_us = {} must be at most 1000000 (one second)",
            self.serving_cost_us
        );
        ensure!(
            (1..=1_000_000).contains(&self.served_count_one_in),
            "[policy] served_count_one_in = {} must be within 1..=1000000",
            self.served_count_one_in
        );
        ensure!(
            self.rescan_ms >= 10,
            "[policy] rescan_ms = {} must be at least 10",
            self.rescan_ms
        );
        ensure!(self.runs_max_age_days >= 1, "[policy] runs_max_age_days must be at least 1");
        ensure!(
            self.runs_max_rows >= 1000,
            "[policy] runs_max_rows = {} must be at least 1000",
            self.runs_max_rows
        );
        // The policy's own check, for anything it adds.
        self.policy_config().validate().context("in the [policy] section of the config")
    }

    /// The policy's own knobs.
    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            canary_fraction: self.canary_share,
            min_runs_per_arm: self.min_runs,
            looks: self.looks,
            alpha: self.alpha,
            promote_min_gain: self.promote_min_gain,
            exploration_share: self.exploration_share,
            suspicious_exit_strikes: self.suspicious_exit_strikes,
            serving_cost_us: self.serving_cost_us,
            served_count_one_in: self.served_count_one_in,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Settings> {
        crate::config::parse_section::<Settings>("policy", text)
    }

    #[test]
    fn settings_default_to_the_policys_defaults_and_name_bad_keys() {
        let s = parse("").unwrap();
        assert_eq!(s.policy_config(), PolicyConfig::default());
        assert!(s.measure);
        let s = parse("canary_share = 0.25\nmin_runs = 6").unwrap();
        assert_eq!(s.policy_config().canary_fraction, 0.25);
        assert_eq!(s.policy_config().min_runs_per_arm, 6);

        let err = parse("canary_shares = 0.2").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("canary_shares") && text.contains("[policy]"), "{text}");
        let err = parse("canary_share = 1.5").unwrap_err();
        assert!(format!("{err:#}").contains("[policy] canary_share = 1.5"), "{err:#}");
        let err = parse("alpha = 0.5").unwrap_err();
        assert!(format!("{err:#}").contains("[policy] alpha"), "{err:#}");
        let err = parse("min_runs = 2").unwrap_err();
        assert!(format!("{err:#}").contains("min_runs"), "{err:#}");
        let err = parse("rescan_ms = 1").unwrap_err();
        assert!(format!("{err:#}").contains("rescan_ms"), "{err:#}");
        let err = parse("min_runs = \"x\"").unwrap_err();
        assert!(format!("{err:#}").contains("min_runs"), "{err:#}");
    }
}

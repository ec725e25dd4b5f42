//! The `[policy]` section of the config file, parsed and validated into the policy's knobs
//! and the policy task's timings.

use anyhow::Context;
use serde::Deserialize;

use crate::config::Sections;
use crate::policy::PolicyConfig;
use crate::policy::task::PolicyTaskOptions;

/// The `[policy]` section of the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    /// Measure runs of served binaries (per-exec CPU time and exit status). Without
    /// measurement no canary is run.
    pub measure: bool,
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
    /// How often every watched binary is checked for new variants and changed controls.
    pub rescan_ms: u64,
    /// Measured runs older than this are deleted.
    pub runs_max_age_days: u64,
    /// At most this many measured runs are kept, machine-wide (oldest go first).
    pub runs_max_rows: u64,
}

impl Default for PolicySettings {
    fn default() -> Self {
        let p = PolicyConfig::default();
        let t = PolicyTaskOptions::default();
        Self {
            measure: true,
            canary_share: p.canary_fraction,
            min_runs: p.min_runs_per_arm,
            looks: p.looks,
            alpha: p.alpha,
            promote_min_gain: p.promote_min_gain,
            exploration_share: p.exploration_share,
            suspicious_exit_strikes: p.suspicious_exit_strikes,
            rescan_ms: t.rescan_every.as_millis() as u64,
            runs_max_age_days: t.runs_max_age.as_secs() / 86_400,
            runs_max_rows: t.runs_max_rows,
        }
    }
}

impl PolicySettings {
    /// Parses and validates the raw `[policy]` table.
    pub fn from_table(table: &toml::Table) -> anyhow::Result<Self> {
        let s: Self = Sections::parse(table, "policy")?;
        s.policy_config().validate().context("in the [policy] section of the config")?;
        anyhow::ensure!(
            s.rescan_ms >= 10,
            "in the [policy] section of the config: policy.rescan_ms must be at least 10"
        );
        anyhow::ensure!(
            s.runs_max_age_days >= 1,
            "in the [policy] section of the config: policy.runs_max_age_days must be at least 1"
        );
        anyhow::ensure!(
            s.runs_max_rows >= 1000,
            "in the [policy] section of the config: policy.runs_max_rows must be at least 1000"
        );
        Ok(s)
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn settings_default_to_the_policys_defaults_and_name_bad_keys() {
        let s = PolicySettings::from_table(&toml::Table::new()).unwrap();
        assert_eq!(s.policy_config(), PolicyConfig::default());
        assert!(s.measure);
        let s = PolicySettings::from_table(&table("canary_share = 0.25\nmin_runs = 6")).unwrap();
        assert_eq!(s.policy_config().canary_fraction, 0.25);
        assert_eq!(s.policy_config().min_runs_per_arm, 6);

        let err = PolicySettings::from_table(&table("canary_shares = 0.2")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("canary_shares") && text.contains("[policy]"), "{text}");
        let err = PolicySettings::from_table(&table("canary_share = 1.5")).unwrap_err();
        assert!(format!("{err:#}").contains("canary_fraction"), "{err:#}");
        let err = PolicySettings::from_table(&table("min_runs = 2")).unwrap_err();
        assert!(format!("{err:#}").contains("min_runs"), "{err:#}");
        let err = PolicySettings::from_table(&table("rescan_ms = 1")).unwrap_err();
        assert!(format!("{err:#}").contains("rescan_ms"), "{err:#}");
        let err = PolicySettings::from_table(&table("min_runs = \"x\"")).unwrap_err();
        assert!(format!("{err:#}").contains("min_runs"), "{err:#}");
    }
}

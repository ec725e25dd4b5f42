//! `[warm]`: how much memory hot files may keep resident, how often residency is checked,
//! and when memory pressure makes warming stand back.

use serde::{Deserialize, Serialize};

/// The `[warm]` section. Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Page-cache bytes (MiB) the working sets of the hottest files may add up to; 0 turns
    /// warming off.
    pub budget_mib: u64,
    /// Of those, MiB locked in memory (`mlock`) for the hottest files: for latency-critical
    /// tools. 0 (the default) locks nothing.
    pub lock_mib: u64,
    /// Seconds between two residency checks.
    pub interval_secs: u64,
    /// Back off while PSI memory `some avg10` (percent of time some task stalled on memory
    /// in the last 10 s) is at or above this.
    pub max_memory_pressure: f64,
    /// Half-life of a file's heat, seconds: an exec counts half as much after this long.
    pub half_life_secs: u64,
    /// Files with less heat than this (about one exec within a half-life) are not warmed.
    pub min_heat: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            budget_mib: 256,
            lock_mib: 0,
            interval_secs: 30,
            max_memory_pressure: 10.0,
            half_life_secs: 6 * 3600,
            min_heat: 1.0,
        }
    }
}

impl Settings {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.lock_mib > self.budget_mib {
            anyhow::bail!(
                "[warm] lock_mib ({}) must not exceed budget_mib ({})",
                self.lock_mib,
                self.budget_mib
            );
        }
        if self.interval_secs == 0 || self.interval_secs > 86_400 {
            anyhow::bail!("[warm] interval_secs must be 1..=86400, got {}", self.interval_secs);
        }
        if !(0.0..=100.0).contains(&self.max_memory_pressure) {
            anyhow::bail!(
                "[warm] max_memory_pressure is a percentage (0..=100), got {}",
                self.max_memory_pressure
            );
        }
        if self.half_life_secs == 0 {
            anyhow::bail!("[warm] half_life_secs must be at least 1");
        }
        // NaN is refused too.
        if self.min_heat.is_nan() || self.min_heat < 0.0 {
            anyhow::bail!("[warm] min_heat must be >= 0, got {}", self.min_heat);
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.budget_mib > 0
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_mib * 1024 * 1024
    }

    pub fn lock_bytes(&self) -> u64 {
        self.lock_mib * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = toml::from_str::<Settings>("budget_mb = 3").unwrap_err().to_string();
        assert!(err.contains("budget_mb"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_partial_sections_keep_them() {
        Settings::default().validate().unwrap();
        let s: Settings = toml::from_str("budget_mib = 64").unwrap();
        assert_eq!(s.budget_mib, 64);
        assert_eq!(s.interval_secs, Settings::default().interval_secs);
    }

    #[test]
    fn lock_beyond_budget_is_refused_naming_the_key() {
        let s: Settings = toml::from_str("budget_mib = 8\nlock_mib = 16").unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("lock_mib"));
    }
}

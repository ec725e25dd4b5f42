//! The `[optimizer]` section of the config file ([`OptimizerSettings`]), and the maturity
//! thresholds of the `[profile]` section (parsed by the profiler's settings type).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use crate::bolt::{ApplicabilityConfig, SandboxLimits};
use crate::config::{Config, Sections};
use crate::daemon::profiling::ProfileSettings;
use crate::profile::maturity::MaturityThresholds;

/// Where BOLT's scratch directories go by default. Every directory above it must be
/// enterable by the sandbox user, so it cannot live under the 0700 state directory.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp/optbin-scratch";

/// `[optimizer]`: how BOLT is found, run and limited, and which binaries are worth it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSettings {
    /// The `llvm-bolt` to use. Default: the newest `/usr/lib/llvm-*/bin/llvm-bolt`, else
    /// `llvm-bolt` on PATH.
    pub bolt: Option<PathBuf>,
    /// Where each BOLT job gets its private scratch directory (created root-owned 0711).
    pub scratch_dir: PathBuf,
    /// Seconds one BOLT run (or one verification run) may take before it is killed.
    pub timeout_secs: u64,
    /// Address-space limit of one BOLT run, MiB.
    pub memory_limit_mib: u64,
    /// BOLT jobs running at once.
    pub concurrency: usize,
    /// Binaries with less `.text` than this are left alone (the i-cache holds them).
    pub min_text_bytes: u64,
    /// The share (0..=1) of a binary's samples that must fall in its own `.text`.
    pub min_own_text_share: f64,
    /// Seconds between two looks for binaries whose profile matured.
    pub check_interval_secs: u64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        let applicability = ApplicabilityConfig::default();
        let limits = SandboxLimits::default();
        Self {
            bolt: None,
            scratch_dir: PathBuf::from(DEFAULT_SCRATCH_DIR),
            timeout_secs: limits.timeout.as_secs(),
            memory_limit_mib: limits.memory_bytes >> 20,
            concurrency: 1,
            min_text_bytes: applicability.min_text_bytes,
            min_own_text_share: applicability.min_own_text_share,
            check_interval_secs: 10,
        }
    }
}

impl OptimizerSettings {
    /// Parses and validates `[optimizer]`; errors name the bad key.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let s: Self = Sections::parse(&cfg.sections.optimizer, "optimizer")?;
        ensure!(
            s.scratch_dir.is_absolute(),
            "[optimizer] scratch_dir must be an absolute path, got {}",
            s.scratch_dir.display()
        );
        ensure!(
            !s.scratch_dir.starts_with(&cfg.state_dir),
            "[optimizer] scratch_dir {} must not be inside the state directory {} (the \
             sandbox user cannot enter it)",
            s.scratch_dir.display(),
            cfg.state_dir.display()
        );
        ensure!(
            !s.scratch_dir.starts_with(&cfg.mountpoint),
            "[optimizer] scratch_dir must not be inside the mountpoint"
        );
        if let Some(bolt) = &s.bolt {
            ensure!(
                bolt.is_absolute(),
                "[optimizer] bolt must be an absolute path, got {}",
                bolt.display()
            );
        }
        ensure!(s.timeout_secs > 0, "[optimizer] timeout_secs must be above 0");
        ensure!(s.memory_limit_mib >= 64, "[optimizer] memory_limit_mib must be at least 64");
        ensure!(s.concurrency >= 1, "[optimizer] concurrency must be at least 1");
        ensure!(
            (0.0..=1.0).contains(&s.min_own_text_share),
            "[optimizer] min_own_text_share must be between 0 and 1, got {}",
            s.min_own_text_share
        );
        ensure!(s.check_interval_secs > 0, "[optimizer] check_interval_secs must be above 0");
        Ok(s)
    }

    pub fn applicability(&self) -> ApplicabilityConfig {
        ApplicabilityConfig {
            min_text_bytes: self.min_text_bytes,
            min_own_text_share: self.min_own_text_share,
        }
    }

    pub fn limits(&self) -> SandboxLimits {
        SandboxLimits {
            timeout: Duration::from_secs(self.timeout_secs),
            memory_bytes: self.memory_limit_mib << 20,
            ..SandboxLimits::default()
        }
    }

    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval_secs)
    }
}

/// The maturity thresholds of `[profile]`, read with the profiler's own settings type so
/// both sides judge maturity alike.
pub fn maturity_thresholds(cfg: &Config) -> anyhow::Result<MaturityThresholds> {
    Ok(ProfileSettings::from_table(&cfg.sections.profile)?.thresholds())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};

    fn config(text: &str) -> Config {
        let file: FileConfig = toml::from_str(text).unwrap();
        let dir = std::env::temp_dir();
        Config::resolve(
            file,
            Overrides {
                mountpoint: Some("/mnt/optbin-test".into()),
                state_dir: Some("/var/lib/optbin-test".into()),
                overlay: vec![dir],
                ..Default::default()
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_overrides() {
        let s = OptimizerSettings::from_config(&config("")).unwrap();
        assert_eq!(s, OptimizerSettings::default());
        assert_eq!(s.scratch_dir, PathBuf::from(DEFAULT_SCRATCH_DIR));
        let s = OptimizerSettings::from_config(&config(
            "[optimizer]\nmin_text_bytes = 1024\ntimeout_secs = 30\nbolt = \"/x/llvm-bolt\"\n",
        ))
        .unwrap();
        assert_eq!(s.applicability().min_text_bytes, 1024);
        assert_eq!(s.limits().timeout, Duration::from_secs(30));
        assert_eq!(s.bolt.as_deref(), Some(std::path::Path::new("/x/llvm-bolt")));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let err = OptimizerSettings::from_config(&config("[optimizer]\nmin_txt_bytes = 1\n"))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("min_txt_bytes") && text.contains("[optimizer]"), "{text}");
        let err = OptimizerSettings::from_config(&config(
            "[optimizer]\nscratch_dir = \"/var/lib/optbin-test/scratch\"\n",
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("state directory"));
        let err = OptimizerSettings::from_config(&config("[optimizer]\nmin_own_text_share = 2\n"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("min_own_text_share"));
    }

    #[test]
    fn maturity_comes_from_the_profile_section() {
        let t = maturity_thresholds(&config("[profile]\nmin_samples = 500\nfrequency_hz = 99\n"))
            .unwrap();
        assert_eq!(t.min_samples, 500);
        assert_eq!(t.min_runs, MaturityThresholds::default().min_runs);
        assert!(maturity_thresholds(&config("[profile]\nmin_runs = \"x\"\n")).is_err());
    }
}

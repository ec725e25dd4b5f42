//! `[optimizer]` of the config file ([`Settings`]): how BOLT is found, run and limited, and
//! which binaries are worth it. Parsed once with the rest of the file (`crate::config`),
//! validated there, and turned into the optimizer's own types here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use super::{ApplicabilityConfig, SandboxLimits};

/// Where BOLT's scratch directories go by default. Every directory above it must be
/// enterable by the sandbox user, so it cannot live under the 0700 state directory.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp/optbin-scratch";

/// `[optimizer]`: how BOLT is found, run and limited, and which binaries are worth it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
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
    /// Once a variant is served, build challengers with other flag sets
    /// (`crate::bolt::flags::FLAG_SETS`) and canary each against it (docs/policy.md).
    pub flag_search: bool,
    /// Challengers per binary content at most (0..=5, the candidate sets there are).
    pub max_challengers: usize,
}

/// Challengers per binary by default: see docs/policy.md ("Flag search") for the cost
/// that bounds it.
pub const DEFAULT_MAX_CHALLENGERS: usize = 3;

impl Default for Settings {
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
            flag_search: true,
            max_challengers: DEFAULT_MAX_CHALLENGERS,
        }
    }
}

impl Settings {
    /// Checks every value is usable; errors name the key. Where the scratch directory may
    /// not be (the state directory, the mount) is checked by `crate::config`, which knows both.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.scratch_dir.is_absolute(),
            "[optimizer] scratch_dir must be an absolute path, got {}",
            self.scratch_dir.display()
        );
        if let Some(bolt) = &self.bolt {
            ensure!(
                bolt.is_absolute(),
                "[optimizer] bolt must be an absolute path, got {}",
                bolt.display()
            );
        }
        ensure!(self.timeout_secs > 0, "[optimizer] timeout_secs must be above 0");
        ensure!(self.memory_limit_mib >= 64, "[optimizer] memory_limit_mib must be at least 64");
        ensure!(self.concurrency >= 1, "[optimizer] concurrency must be at least 1");
        ensure!(
            (0.0..=1.0).contains(&self.min_own_text_share),
            "[optimizer] min_own_text_share must be between 0 and 1, got {}",
            self.min_own_text_share
        );
        ensure!(self.check_interval_secs > 0, "[optimizer] check_interval_secs must be above 0");
        let sets = super::flags::FLAG_SETS.len() - 1;
        ensure!(
            self.max_challengers <= sets,
            "[optimizer] max_challengers = {} must be within 0..={sets} (the candidate flag sets)",
            self.max_challengers
        );
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Settings> {
        crate::config::parse_section::<Settings>("optimizer", text)
    }

    #[test]
    fn defaults_and_overrides() {
        let s = parse("").unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.scratch_dir, PathBuf::from(DEFAULT_SCRATCH_DIR));
        let s =
            parse("min_text_bytes = 1024\ntimeout_secs = 30\nbolt = \"/x/llvm-bolt\"\n").unwrap();
        assert_eq!(s.applicability().min_text_bytes, 1024);
        assert_eq!(s.limits().timeout, Duration::from_secs(30));
        assert_eq!(s.bolt.as_deref(), Some(std::path::Path::new("/x/llvm-bolt")));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let text = format!("{:#}", parse("min_txt_bytes = 1\n").unwrap_err());
        assert!(text.contains("min_txt_bytes") && text.contains("[optimizer]"), "{text}");
        let text = format!("{:#}", parse("min_own_text_share = 2\n").unwrap_err());
        assert!(text.contains("min_own_text_share"), "{text}");
        let text = format!("{:#}", parse("scratch_dir = \"rel\"\n").unwrap_err());
        assert!(text.contains("scratch_dir"), "{text}");
        let text = format!("{:#}", parse("max_challengers = 9\n").unwrap_err());
        assert!(text.contains("max_challengers"), "{text}");
        let s = parse("flag_search = false\nmax_challengers = 1\n").unwrap();
        assert!(!s.flag_search && s.max_challengers == 1);
    }
}

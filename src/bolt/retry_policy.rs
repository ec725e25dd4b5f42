//! Whether a binary should be built now (pure): not again after the ladder gave up, until
//! its content, its profile (grown by [`DEFAULT_GROWTH`]x) or the BOLT version changed; not
//! while a variant of it is being measured (a new build would start a new canary and cut
//! the running one short); and re-built when the profile grew that much since the last
//! variant was built *and* since the policy's last decision on one. The second base
//! matters because the profile keeps growing during a canary (the original's runs are
//! sampled): measured from the build alone it has often doubled by the time of the
//! decision, and a rebuild would send the binary straight into another canary.
//!
//! History is kept per binary *content* (the catalog's `binaries` row is one sha256), so a
//! changed content arrives here with no history at all.

use serde::{Deserialize, Serialize};

/// How much a profile must grow to be worth another build.
pub const DEFAULT_GROWTH: f64 = 2.0;

/// Who asked for the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOrigin {
    /// The profile matured (the daemon's own decision).
    Matured,
    /// A user wrote `optimize NAME`: build now, whatever the history says.
    User,
}

/// What the catalog remembers of earlier builds of this content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildHistory {
    pub failed_until_change: bool,
    /// Profile samples at the last attempt.
    pub last_attempt_samples: u64,
    pub last_bolt_version: String,
    /// The largest profile a BOLT variant not retired was built from, if any.
    pub variant_samples: Option<u64>,
    /// A BOLT variant that is ready or in canary (the policy is measuring it).
    pub measuring: Option<i64>,
    /// Profile samples at the policy's newest decision on a BOLT variant (promote, reject,
    /// quarantine).
    pub decided_samples: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Build,
    Skip(String),
}

/// Decides whether to build, given the history, the current profile size and BOLT version.
pub fn decide(
    history: Option<&BuildHistory>,
    samples: u64,
    bolt_version: &str,
    origin: RequestOrigin,
    growth: f64,
) -> Decision {
    let Some(h) = history else { return Decision::Build };
    if origin == RequestOrigin::User {
        return Decision::Build;
    }
    let grown = |base: u64| samples as f64 >= base as f64 * growth;
    if h.failed_until_change {
        if h.last_bolt_version != bolt_version {
            return Decision::Build;
        }
        if grown(h.last_attempt_samples) {
            return Decision::Build;
        }
        return Decision::Skip(format!(
            "BOLT failed on this binary with {} samples; waiting for the content, the BOLT \
             version or a profile of {:.0} samples",
            h.last_attempt_samples,
            h.last_attempt_samples as f64 * growth
        ));
    }
    if let Some(v) = h.measuring {
        return Decision::Skip(format!(
            "variant {v} is being measured; a rebuild waits for the policy's decision"
        ));
    }
    if let Some(built) = h.variant_samples
        && !grown(built)
    {
        return Decision::Skip(format!(
            "a variant built from {built} samples exists; the profile ({samples}) has not \
             grown {growth}x"
        ));
    }
    if let Some(decided) = h.decided_samples
        && !grown(decided)
    {
        return Decision::Skip(format!(
            "the policy decided on a variant at {decided} samples; the profile ({samples}) \
             has not grown {growth}x since"
        ));
    }
    Decision::Build
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(samples: u64) -> BuildHistory {
        BuildHistory {
            failed_until_change: true,
            last_attempt_samples: samples,
            last_bolt_version: "22.1.8".into(),
            ..Default::default()
        }
    }

    #[test]
    fn new_content_builds() {
        assert_eq!(decide(None, 10, "22.1.8", RequestOrigin::Matured, 2.0), Decision::Build);
    }

    #[test]
    fn a_failed_binary_waits_for_a_change() {
        let h = failed(1000);
        assert!(matches!(
            decide(Some(&h), 1500, "22.1.8", RequestOrigin::Matured, 2.0),
            Decision::Skip(_)
        ));
        assert_eq!(decide(Some(&h), 2000, "22.1.8", RequestOrigin::Matured, 2.0), Decision::Build);
        assert_eq!(decide(Some(&h), 1000, "19.1.7", RequestOrigin::Matured, 2.0), Decision::Build);
        assert_eq!(decide(Some(&h), 1000, "22.1.8", RequestOrigin::User, 2.0), Decision::Build);
    }

    #[test]
    fn reoptimizes_only_after_substantial_growth() {
        let h = BuildHistory {
            failed_until_change: false,
            last_attempt_samples: 20_000,
            last_bolt_version: "22.1.8".into(),
            variant_samples: Some(20_000),
            ..Default::default()
        };
        let skip = decide(Some(&h), 30_000, "22.1.8", RequestOrigin::Matured, 2.0);
        assert!(matches!(skip, Decision::Skip(ref why) if why.contains("20000")), "{skip:?}");
        assert_eq!(
            decide(Some(&h), 40_000, "22.1.8", RequestOrigin::Matured, 2.0),
            Decision::Build
        );
        let no_variant = BuildHistory { variant_samples: None, ..h };
        assert_eq!(
            decide(Some(&no_variant), 100, "22.1.8", RequestOrigin::Matured, 2.0),
            Decision::Build
        );
    }

    #[test]
    fn no_rebuild_while_a_variant_is_measured_nor_before_growth_since_the_decision() {
        let h = BuildHistory {
            last_attempt_samples: 20_000,
            last_bolt_version: "22.1.8".into(),
            variant_samples: Some(20_000),
            measuring: Some(4),
            ..Default::default()
        };
        let d = |h: &BuildHistory, samples, origin| decide(Some(h), samples, "22.1.8", origin, 2.0);
        let skip = d(&h, 90_000, RequestOrigin::Matured);
        assert!(matches!(skip, Decision::Skip(ref why) if why.contains("variant 4")), "{skip:?}");
        assert_eq!(d(&h, 90_000, RequestOrigin::User), Decision::Build);
        // Decided at 45,000 samples (the profile grew during the canary): 90,000 is due,
        // 60,000 is not, although both are more than twice the build's 20,000.
        let decided = BuildHistory { measuring: None, decided_samples: Some(45_000), ..h };
        let skip = d(&decided, 60_000, RequestOrigin::Matured);
        assert!(matches!(skip, Decision::Skip(ref why) if why.contains("45000")), "{skip:?}");
        assert_eq!(d(&decided, 90_000, RequestOrigin::Matured), Decision::Build);
    }
}

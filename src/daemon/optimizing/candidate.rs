//! Per-binary facts the optimizer's wiring judges by, read from the catalog: which content
//! is at a path now, what its profile says, what BOLT did with it before, and whether it is
//! a BOLT candidate ([`verdict`], the optimizer's `assess` with what is known).

use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use crate::bolt::{Applicability, ApplicabilityConfig, ProfileNumbers, assess};
use crate::catalog::{base, profiles};
use crate::elf::ElfFacts;
use crate::identity::FileKey;

/// The indexed binary whose content is at `path` now (`key` is the file's current stat
/// key): None when the path was never indexed or changed since.
pub fn current_binary(
    conn: &Connection,
    path: &Path,
    key: &FileKey,
) -> anyhow::Result<Option<base::BinaryRow>> {
    let Some(row) = base::path_row(conn, &path.to_string_lossy())? else { return Ok(None) };
    match row.binary_id {
        Some(id) if row.key == *key => base::binary_by_id(conn, id),
        _ => Ok(None),
    }
}

/// The profile's numbers, from its windows; None while it has no own-text sample.
pub fn profile_numbers(
    conn: &Connection,
    binary_id: i64,
) -> anyhow::Result<Option<ProfileNumbers>> {
    let windows = profiles::windows(conn, binary_id)?;
    let own: u64 = windows.iter().map(|w| w.own_samples).sum();
    let outside: u64 = windows.iter().map(|w| w.outside_samples).sum();
    if own == 0 {
        return Ok(None);
    }
    Ok(Some(ProfileNumbers {
        samples: own,
        own_text_share: own as f64 / (own + outside) as f64,
        front_end: None,
    }))
}

/// Whether BOLT applies, and whether that was judged with the profile or by the ELF facts
/// alone (no samples yet: the own-text share is unknown).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    #[serde(flatten)]
    pub applicability: Applicability,
    pub facts_only: bool,
}

/// [`assess`] with the profile when there is one, else with the facts only (and saying so).
pub fn verdict(
    facts: &ElfFacts,
    profile: Option<&ProfileNumbers>,
    cfg: &ApplicabilityConfig,
) -> Verdict {
    if let Some(p) = profile {
        return Verdict { applicability: assess(facts, p, cfg), facts_only: false };
    }
    // A full share passes the share test, so only the facts decide.
    let assumed = ProfileNumbers { samples: 0, own_text_share: 1.0, front_end: None };
    let mut a = assess(facts, &assumed, cfg);
    if a.candidate {
        a.score = 0.0;
        a.reason = format!(
            "candidate by its ELF facts ({}, .text {} KiB); its own-text share is unknown \
             until it is profiled",
            a.mode.label(),
            facts.text_size / 1024
        );
    }
    Verdict { applicability: a, facts_only: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ElfFacts {
        ElfFacts::for_tests(8 * 1024, true)
    }

    #[test]
    fn verdicts_say_what_they_were_judged_by() {
        let cfg = ApplicabilityConfig { min_text_bytes: 1024, min_own_text_share: 0.3 };
        let v = verdict(&facts(), None, &cfg);
        assert!(v.applicability.candidate && v.facts_only);
        assert!(v.applicability.reason.contains("unknown until it is profiled"));
        let hot = ProfileNumbers { samples: 900, own_text_share: 0.9, front_end: None };
        let v = verdict(&facts(), Some(&hot), &cfg);
        assert!(v.applicability.candidate && !v.facts_only);
        assert!(v.applicability.reason.contains("90% of samples"), "{}", v.applicability.reason);
        let cold = ProfileNumbers { own_text_share: 0.1, ..hot };
        assert!(!verdict(&facts(), Some(&cold), &cfg).applicability.candidate);
        let stripped = ElfFacts { has_symbols: false, ..facts() };
        let v = verdict(&stripped, None, &cfg);
        assert!(!v.applicability.candidate);
        assert_eq!(v.applicability.reason, "not a candidate: stripped (no .symtab)");
    }
}

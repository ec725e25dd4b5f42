//! What the fleet's verdicts change locally: pure functions.
//!
//! - A variant whose bytes (sha256) were quarantined on any machine is never served here:
//!   the policy treats it as quarantined the moment it is known (see `FleetView::vetoed`).
//! - Variants rejected on `quorum` machines or more, built with this BOLT version and the
//!   default flags from a profile at least half the size of the one this machine would
//!   build from, are "the same inputs": this machine does not build again until its
//!   profile doubles (the local retry policy's 2x rule, applied to the fleet's evidence).
//!   A rejected challenger of the flag search (another flag set, measured against a served
//!   variant) says nothing about a first build with the default flags, and is not counted.
//! - A promotion elsewhere changes nothing in the local policy: each machine still
//!   canaries and measures before it serves (docs/fleet.md says why).

use std::collections::{BTreeMap, BTreeSet};

use super::format::{Outcome, VerdictList};

/// The fleet's verdicts on one identity, summarized.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdicts {
    /// Variant sha256 -> who quarantined it and why.
    pub quarantined: BTreeMap<String, String>,
    /// (machine, bolt version, profile samples) of rejections of default-flag builds.
    pub rejected: Vec<(String, Option<String>, Option<u64>)>,
    /// Machines that serve a promoted variant.
    pub promoted_on: BTreeSet<String>,
}

pub fn summarize(lists: &[VerdictList]) -> Verdicts {
    let mut out = Verdicts::default();
    for list in lists {
        for v in &list.verdicts {
            match v.outcome {
                Outcome::Quarantined => {
                    out.quarantined.entry(v.variant.clone()).or_insert_with(|| {
                        format!(
                            "quarantined on machine {}{}",
                            list.machine,
                            v.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default()
                        )
                    });
                }
                // Verdicts from before the flag search name no set: they were default builds.
                Outcome::Rejected if v.flag_set.as_deref().is_none_or(|s| s == "default") => out
                    .rejected
                    .push((list.machine.clone(), v.bolt_version.clone(), v.profile_samples)),
                Outcome::Rejected => {}
                Outcome::Promoted => {
                    out.promoted_on.insert(list.machine.clone());
                }
            }
        }
    }
    out
}

/// Why this machine should not build from a profile of `samples` with `bolt_version`, or
/// None.
pub fn rebuild_blocked(
    verdicts: &Verdicts,
    bolt_version: &str,
    samples: u64,
    quorum: usize,
) -> Option<String> {
    let machines: BTreeSet<&str> = verdicts
        .rejected
        .iter()
        .filter(|(_, version, built_from)| {
            version.as_deref() == Some(bolt_version)
                && built_from.is_some_and(|b| b.saturating_mul(2) > samples)
        })
        .map(|(m, _, _)| m.as_str())
        .collect();
    (machines.len() >= quorum).then(|| {
        format!(
            "rejected on {} machines with BOLT {bolt_version} and a profile of this size: \
             waiting for a profile twice as large",
            machines.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::format::{VERSION, Verdict};
    use crate::identity::ContentId;

    fn list(machine: &str, verdicts: Vec<Verdict>) -> VerdictList {
        VerdictList {
            v: VERSION,
            machine: machine.into(),
            content: ContentId::of_bytes(b"x").hex(),
            verdicts,
        }
    }

    fn verdict(variant: &[u8], outcome: Outcome, samples: u64) -> Verdict {
        Verdict {
            variant: ContentId::of_bytes(variant).hex(),
            outcome,
            bolt_version: Some("19.1.7".into()),
            flags: None,
            profile_samples: Some(samples),
            profile_digest: None,
            flag_set: None,
            note: Some("why".into()),
            at: 1,
        }
    }

    #[test]
    fn a_quarantine_anywhere_is_known_with_its_machine() {
        let v = summarize(&[
            list("a", vec![verdict(b"v1", Outcome::Promoted, 10)]),
            list("b", vec![verdict(b"v1", Outcome::Quarantined, 10)]),
        ]);
        assert_eq!(
            v.quarantined.get(&ContentId::of_bytes(b"v1").hex()).map(String::as_str),
            Some("quarantined on machine b: why")
        );
        assert!(v.promoted_on.contains("a"));
    }

    #[test]
    fn rejections_on_a_quorum_block_the_same_inputs_until_the_profile_doubles() {
        let v = summarize(&[
            list("a", vec![verdict(b"v1", Outcome::Rejected, 1000)]),
            list("b", vec![verdict(b"v2", Outcome::Rejected, 1200)]),
        ]);
        assert!(rebuild_blocked(&v, "19.1.7", 1500, 2).is_some());
        assert!(rebuild_blocked(&v, "19.1.7", 1500, 3).is_none(), "quorum of 3");
        assert!(rebuild_blocked(&v, "22.1.8", 1500, 2).is_none(), "another BOLT");
        assert!(rebuild_blocked(&v, "19.1.7", 2100, 2).is_none(), "a profile 2x a's");
        let one = summarize(&[list("a", vec![verdict(b"v1", Outcome::Rejected, 1000)])]);
        assert!(rebuild_blocked(&one, "19.1.7", 1000, 2).is_none());
    }

    #[test]
    fn rejected_challengers_of_the_flag_search_do_not_hold_back_a_default_build() {
        let with_set = |variant: &[u8], set: &str| Verdict {
            flag_set: Some(set.into()),
            ..verdict(variant, Outcome::Rejected, 1000)
        };
        let challengers = summarize(&[
            list("a", vec![with_set(b"v1", "hfsort")]),
            list("b", vec![with_set(b"v2", "no-split")]),
        ]);
        assert!(rebuild_blocked(&challengers, "19.1.7", 1500, 2).is_none());
        let defaults = summarize(&[
            list("a", vec![with_set(b"v1", "default")]),
            list("b", vec![verdict(b"v2", Outcome::Rejected, 1000)]),
        ]);
        assert!(rebuild_blocked(&defaults, "19.1.7", 1500, 2).is_some());
    }
}

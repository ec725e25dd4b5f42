//! The flag search's driver half: once a binary's variant is served, builds one challenger
//! at a time with the next candidate flag set not tried on that content
//! (`crate::bolt::flags`), from the served variant's own profile, at most
//! `[optimizer] max_challengers` per content. The canary against the served variant, and
//! what becomes of it, is the policy's (`crate::policy::challenger_step`); the outcome of
//! each set is kept in `flag_trials` (see docs/policy.md, "Flag search").

use std::path::Path;

use rusqlite::Connection;

use super::candidate::{current_binary, request};
use crate::bolt::flags::{FlagSet, challenger_sets};
use crate::bolt::queue::{Challenge, VariantProfiles};
use crate::bolt::status::SearchStatus;
use crate::bolt::{BoltMode, OptimizeRequest, ProfileNumbers, RequestOrigin};
use crate::catalog::base;
use crate::catalog::flag_trials::{self, FlagTrial};
use crate::catalog::variant::{VariantKind, VariantState};
use crate::identity::FileKey;

/// The flag search's rules (from `[optimizer]` and the installed BOLT).
#[derive(Debug, Clone)]
pub struct SearchRules {
    /// The sets the installed BOLT accepts (the default among them).
    pub usable: Vec<&'static FlagSet>,
    pub max_challengers: usize,
    pub profiles: VariantProfiles,
}

/// The mode the served variant was built in, read from its recorded flags.
fn mode_of(flags: Option<&str>) -> BoltMode {
    match flags {
        Some(f) if f.split_whitespace().any(|a| a == "-relocs=0") => BoltMode::NonRelocation,
        _ => BoltMode::Relocations,
    }
}

/// What the search would do next for a binary, given its variants and trials (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextChallenger {
    /// Build a challenger with this set against the served variant.
    Build { flag_set: &'static FlagSet, served: i64 },
    /// Nothing now, and why.
    Wait(String),
}

/// The next challenger for a binary: only while a variant is served and nothing else is
/// being built or measured, never a set already tried on this content, never more than
/// `max` challengers.
pub fn next_challenger(
    variants: &[base::VariantRow],
    trials: &[FlagTrial],
    usable: &[&'static FlagSet],
    max: usize,
) -> NextChallenger {
    let policed = || variants.iter().filter(|v| v.kind.is_policed());
    if let Some(v) =
        policed().find(|v| matches!(v.state, VariantState::Ready | VariantState::Canary))
    {
        return NextChallenger::Wait(format!("variant {} is being measured", v.id));
    }
    let Some(served) =
        policed().rev().find(|v| v.state == VariantState::Served && v.kind == VariantKind::Bolt)
    else {
        return NextChallenger::Wait("no BOLT variant is served".into());
    };
    if trials.iter().any(|t| t.outcome == "building") {
        return NextChallenger::Wait("a build is running".into());
    }
    let tried = trials.iter().filter(|t| t.challenger).count();
    if tried >= max {
        return NextChallenger::Wait(format!("done: {tried} of at most {max} challengers tried"));
    }
    let mode = mode_of(served.flags.as_deref());
    match challenger_sets(usable, mode)
        .into_iter()
        .find(|s| !trials.iter().any(|t| t.flag_set == s.name))
    {
        Some(flag_set) => NextChallenger::Build { flag_set, served: served.id },
        None => NextChallenger::Wait(format!("done: every flag set was tried ({tried})")),
    }
}

/// The challenger request for the binary at `path` (whose file has `key` now), when one is
/// due (see [`next_challenger`]) and the served variant's profile is kept.
pub fn challenger_request(
    conn: &Connection,
    path: &Path,
    key: &FileKey,
    rules: &SearchRules,
) -> anyhow::Result<Option<OptimizeRequest>> {
    let Some(binary) = current_binary(conn, path, key)? else { return Ok(None) };
    if base::control_row(conn, &path.to_string_lossy())?.is_some_and(|c| c.excluded) {
        return Ok(None);
    }
    let variants = base::variants_of(conn, binary.id)?;
    let trials = flag_trials::trials_of(conn, binary.id)?;
    let NextChallenger::Build { flag_set, served } =
        next_challenger(&variants, &trials, &rules.usable, rules.max_challengers)
    else {
        return Ok(None);
    };
    let Some(served) = variants.iter().find(|v| v.id == served) else { return Ok(None) };
    let Some(profile) = rules.profiles.profile_of(&served.sha256) else {
        tracing::debug!(binary = %path.display(), variant = served.id, "no kept profile: no challenger");
        return Ok(None);
    };
    // Exactly the served variant's profile, whatever its size.
    let numbers = ProfileNumbers {
        samples: served.profile_samples.unwrap_or(1).max(1) as u64,
        own_text_share: 1.0,
        front_end: None,
    };
    let request = request(path, binary, numbers, RequestOrigin::Matured)?;
    Ok(Some(OptimizeRequest { challenge: Some(Challenge { flag_set, profile }), ..request }))
}

/// The flag search's status for a binary.
pub fn search_status(
    conn: &Connection,
    binary_id: i64,
    on: bool,
    usable: &[&'static FlagSet],
    max: usize,
) -> anyhow::Result<SearchStatus> {
    let variants = base::variants_of(conn, binary_id)?;
    let tried = flag_trials::trials_of(conn, binary_id)?;
    let current = tried
        .iter()
        .find(|t| {
            t.challenger && matches!(t.outcome.as_str(), "building" | "built" | "ready" | "canary")
        })
        .cloned();
    let next = if !on {
        "off ([optimizer] flag_search = false)".to_string()
    } else {
        match next_challenger(&variants, &tried, usable, max) {
            NextChallenger::Build { flag_set, served } => {
                format!("next: a challenger with {} against variant {served}", flag_set.name)
            }
            NextChallenger::Wait(why) => why,
        }
    };
    Ok(SearchStatus { on, max_challengers: max, current, tried, next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::flags::FLAG_SETS;

    fn variant(id: i64, state: &str) -> base::VariantRow {
        base::VariantRow {
            id,
            binary_id: 1,
            kind: VariantKind::Bolt,
            sha256: format!("{id}"),
            store_path: String::new(),
            size: 1,
            state: VariantState::parse(state).unwrap(),
            bolt_version: None,
            flags: Some("-data=<profile> -reorder-blocks=ext-tsp".into()),
            profile_samples: Some(10),
            created_at: 0,
            note: None,
        }
    }

    fn trial(set: &str, challenger: bool, outcome: &str) -> FlagTrial {
        FlagTrial {
            binary_id: 1,
            flag_set: set.into(),
            challenger,
            variant_id: None,
            outcome: outcome.into(),
            detail: None,
            updated_at: 0,
        }
    }

    #[test]
    fn challengers_come_one_at_a_time_in_order_and_within_the_bound() {
        let usable: Vec<&FlagSet> = FLAG_SETS.to_vec();
        let served = vec![variant(1, "served")];
        let default = trial("default", false, "served");
        let next = |v: &[base::VariantRow], t: &[FlagTrial], max| match next_challenger(
            v, t, &usable, max,
        ) {
            NextChallenger::Build { flag_set, served } => Ok((flag_set.name, served)),
            NextChallenger::Wait(why) => Err(why),
        };
        assert_eq!(next(&served, std::slice::from_ref(&default), 3), Ok(("cleanup-passes", 1)));
        // Not while nothing is served, nor while a variant is measured or a build runs.
        assert!(next(&[variant(1, "rejected")], &[], 3).is_err());
        let measuring = vec![variant(1, "served"), variant(2, "canary")];
        assert!(next(&measuring, &[], 3).unwrap_err().contains("measured"));
        let building = [default.clone(), trial("cleanup-passes", true, "building")];
        assert!(next(&served, &building, 3).is_err());
        // Never a set already tried on this content, failed ones included.
        let tried = [
            default.clone(),
            trial("cleanup-passes", true, "rejected"),
            trial("no-split", true, "failed"),
        ];
        assert_eq!(next(&served, &tried, 3), Ok(("cdsplit", 1)));
        // The bound counts every challenger tried.
        assert!(next(&served, &tried, 2).unwrap_err().contains("2 of at most 2"));
        assert!(next(&served, &[default], 0).is_err());
    }

    #[test]
    fn a_non_relocation_variant_gets_no_function_order_challenger() {
        let usable: Vec<&FlagSet> = FLAG_SETS.to_vec();
        let mut v = variant(1, "served");
        v.flags = Some("-data=<profile> -reorder-blocks=ext-tsp -relocs=0".into());
        let tried: Vec<FlagTrial> = ["cleanup-passes", "no-split", "cdsplit"]
            .iter()
            .map(|s| trial(s, true, "rejected"))
            .collect();
        // hfsort only changes the function order: cache-blocks is next.
        match next_challenger(&[v], &tried, &usable, 5) {
            NextChallenger::Build { flag_set, .. } => assert_eq!(flag_set.name, "cache-blocks"),
            other => panic!("{other:?}"),
        }
    }
}

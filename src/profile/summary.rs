//! What status pages show about one binary's profile, and the profile file itself
//! (`<mount>/.optbin/bins/NAME/profile.fdata`), both read from the catalog.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::fdata;
use super::maturity::{self, Maturity, MaturityThresholds};
use crate::catalog::{base, profiles};

/// A binary's profile as status.json carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSummary {
    pub binary_id: i64,
    pub sha256: String,
    /// The sampling event (`cpu-clock`, `cycles`), or None when never sampled.
    pub event: Option<String>,
    /// Why this binary gets no sampled profile (e.g. `stripped: no .symtab`).
    pub refused: Option<String>,
    pub own_samples: u64,
    /// Own-text samples outside any function symbol.
    pub unsymbolized: u64,
    pub outside_samples: u64,
    /// Samples that hit a served variant (not part of this profile).
    pub variant_samples: u64,
    pub runs: u64,
    /// own / (own + outside); None without samples.
    pub own_share: Option<f64>,
    pub windows: usize,
    pub maturity: Maturity,
    /// The hottest functions with their samples, hottest first (up to 5).
    pub hot_functions: Vec<(String, u64)>,
    /// Estimated bytes of this profile in the catalog.
    pub disk_bytes: u64,
    /// Instrumented runs merged into the instrumentation profile.
    pub instrumented_runs: u64,
}

/// Reads the summary of `binary_id`'s profile.
pub fn profile_summary(
    conn: &Connection,
    binary_id: i64,
    thresholds: &MaturityThresholds,
) -> anyhow::Result<ProfileSummary> {
    let binary = base::binary_by_id(conn, binary_id)?
        .with_context(|| format!("no binary with id {binary_id}"))?;
    let head = profiles::profile_head(conn, binary_id)?;
    let windows = profiles::windows(conn, binary_id)?;
    let sum = |f: fn(&profiles::WindowTotals) -> u64| windows.iter().map(f).sum::<u64>();
    let (own, outside) = (sum(|w| w.own_samples), sum(|w| w.outside_samples));
    let runs = sum(|w| w.runs);
    let by_window = profiles::function_counts_by_window(conn, binary_id)?;
    let mut per_function: HashMap<&str, u64> = HashMap::new();
    for (_, name, count) in &by_window {
        *per_function.entry(name.as_str()).or_default() += count;
    }
    let mut hot: Vec<(String, u64)> =
        per_function.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
    hot.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    hot.truncate(5);
    Ok(ProfileSummary {
        binary_id,
        sha256: binary.sha256,
        event: head.as_ref().map(|h| h.event.clone()),
        refused: head.and_then(|h| h.refused),
        own_samples: own,
        unsymbolized: sum(|w| w.unsymbolized),
        outside_samples: outside,
        variant_samples: sum(|w| w.variant_samples),
        runs,
        own_share: (own + outside > 0).then(|| own as f64 / (own + outside) as f64),
        windows: windows.len(),
        maturity: maturity::assess(own, runs, &by_window, thresholds),
        hot_functions: hot,
        disk_bytes: profiles::disk_bytes(conn, binary_id)?,
        instrumented_runs: profiles::instrumented_runs(conn, binary_id)?,
    })
}

/// Writes `binary_id`'s sampled profile as BOLT fdata: branch form when branch records
/// exist, `no_lbr` otherwise. Errors (with the reason) when the binary has no profile.
pub fn write_fdata(conn: &Connection, binary_id: i64, out: &mut impl Write) -> anyhow::Result<()> {
    let head = profiles::profile_head(conn, binary_id)?
        .with_context(|| format!("binary {binary_id} has no profile yet"))?;
    if let Some(reason) = head.refused {
        anyhow::bail!("binary {binary_id} gets no profile: {reason}");
    }
    let branches = profiles::branch_counts(conn, binary_id)?;
    if !branches.is_empty() {
        fdata::write_branches(out, &branches).context("writing the branch profile")?;
        return Ok(());
    }
    let samples = profiles::sample_counts(conn, binary_id)?;
    anyhow::ensure!(!samples.is_empty(), "binary {binary_id} has no samples yet");
    fdata::write_no_lbr(out, &head.event, &samples).context("writing the no_lbr profile")?;
    Ok(())
}

/// Which profile [`write_profile_for_bolt`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    /// Merged instrumentation edges: exact, complete after one run (BRIEF.md: never worse
    /// than sampled profiles here).
    Instrumentation,
    /// Sampled: branch records or `no_lbr` samples.
    Sampled,
}

/// Writes the best profile `binary_id` has for a BOLT run: its instrumentation profile if
/// any instrumented run was merged, else its sampled profile.
pub fn write_profile_for_bolt(
    conn: &Connection,
    binary_id: i64,
    out: &mut impl Write,
) -> anyhow::Result<ProfileKind> {
    if profiles::instrumented_runs(conn, binary_id)? > 0 {
        super::instrument::write_instrumented_fdata(conn, binary_id, out)?;
        return Ok(ProfileKind::Instrumentation);
    }
    write_fdata(conn, binary_id, out)?;
    Ok(ProfileKind::Sampled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::profiles::WindowBatch;
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    #[test]
    fn summary_and_fdata_from_the_catalog() {
        let cat = Catalog::in_memory().unwrap();
        cat.run_blocking(|c| {
            let id =
                base::upsert_binary(c, &ContentId::of_bytes(b"x"), 1, &ElfFacts::default(), 0)?;
            let s = base::upsert_binary(c, &ContentId::of_bytes(b"s"), 1, &ElfFacts::default(), 0)?;
            let batch = WindowBatch {
                samples: vec![("hot".into(), 0x10, 90), ("cold".into(), 0, 10)],
                own_samples: 100,
                outside_samples: 25,
                new_runs: 2,
                ..Default::default()
            };
            profiles::add_window(c, id, 0, "cpu-clock", &batch, 1)?;
            profiles::mark_refused(c, s, "cpu-clock", "stripped: no .symtab", 1)?;
            let t = MaturityThresholds { min_samples: 50, min_runs: 1, min_stability: 0.5 };
            let sum = profile_summary(c, id, &t)?;
            assert_eq!((sum.own_samples, sum.outside_samples, sum.runs), (100, 25, 2));
            assert_eq!(sum.own_share, Some(0.8));
            assert_eq!(sum.hot_functions[0], ("hot".to_string(), 90));
            assert!(!sum.maturity.mature, "one window: stability unknown");
            let mut out = Vec::new();
            write_fdata(c, id, &mut out)?;
            assert_eq!(String::from_utf8(out)?, "no_lbr cpu-clock:\n1 cold 0 10\n1 hot 10 90\n");
            let mut out = Vec::new();
            assert_eq!(write_profile_for_bolt(c, id, &mut out)?, ProfileKind::Sampled);
            let edge = ("1 hot 0".to_string(), "1 hot 10".to_string(), 0, 7);
            profiles::add_instrumented_run(c, id, &[edge], 2)?;
            let mut out = Vec::new();
            assert_eq!(write_profile_for_bolt(c, id, &mut out)?, ProfileKind::Instrumentation);
            assert_eq!(String::from_utf8(out)?, "1 hot 0 1 hot 10 0 7\n");
            let err = write_fdata(c, s, &mut Vec::new()).unwrap_err();
            assert!(format!("{err:#}").contains("stripped: no .symtab"));
            assert_eq!(profile_summary(c, s, &t)?.refused.as_deref(), Some("stripped: no .symtab"));
            serde_json::to_string(&sum)?;
            Ok(())
        })
        .unwrap();
    }
}

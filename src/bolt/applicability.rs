//! Whether a binary is worth a BOLT run, in which mode, with a score and a reason a human
//! can read in status ([`assess`]: a pure function of the binary's ELF facts, numbers from
//! its profile and the configured thresholds), judged with what is known so far
//! ([`verdict`]: before the first sample only the facts decide), and the candidacy rules the
//! status table shows ([`candidacy`]: the user's exclusion and the config's lists first).

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::catalog::profiles;
use crate::elf::ElfFacts;

/// How BOLT may rewrite the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BoltMode {
    /// The binary kept its relocations (`-Wl,--emit-relocs`): BOLT may move functions.
    Relocations,
    /// No relocations: BOLT rewrites functions in place; no function reordering.
    NonRelocation,
}

impl BoltMode {
    pub fn label(self) -> &'static str {
        match self {
            BoltMode::Relocations => "relocation mode",
            BoltMode::NonRelocation => "non-relocation mode",
        }
    }
}

/// Thresholds; the defaults suit real programs (tests lower them for tiny ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicabilityConfig {
    /// Below this much code, the instruction cache already holds the program.
    pub min_text_bytes: u64,
    /// The share of the binary's samples that must fall in its own `.text` (not in
    /// libraries or the kernel): BOLT only rewrites the binary's own code.
    pub min_own_text_share: f64,
}

impl Default for ApplicabilityConfig {
    fn default() -> Self {
        Self { min_text_bytes: 64 * 1024, min_own_text_share: 0.30 }
    }
}

/// Front-end pressure, where hardware counters exist (never on this project's VMs).
/// Untested here: no PMU to produce it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrontEndPressure {
    pub icache_misses_per_kilo_instructions: f64,
    pub itlb_misses_per_kilo_instructions: f64,
    pub branch_miss_rate: f64,
}

/// What the profile says about the binary, given by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct ProfileNumbers {
    pub samples: u64,
    /// Share (0..=1) of the binary's samples that hit its own text.
    pub own_text_share: f64,
    pub front_end: Option<FrontEndPressure>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applicability {
    pub candidate: bool,
    pub mode: BoltMode,
    /// Higher is more promising; 0 when not a candidate. Comparable between binaries only.
    pub score: f64,
    /// The verdict and why: `candidate (relocation mode, ...)`, `not a candidate: stripped`.
    pub reason: String,
    /// Why, without the verdict word (the status table prints that itself).
    #[serde(skip)]
    pub why: String,
}

/// Decides whether BOLT applies to a binary.
pub fn assess(
    facts: &ElfFacts,
    profile: &ProfileNumbers,
    cfg: &ApplicabilityConfig,
) -> Applicability {
    let mode = if facts.has_relocs { BoltMode::Relocations } else { BoltMode::NonRelocation };
    let no = |why: String| Applicability {
        candidate: false,
        mode,
        score: 0.0,
        reason: format!("not a candidate: {why}"),
        why,
    };
    if !facts.is_elf {
        return no("not an ELF file".into());
    }
    if !facts.x86_64 {
        return no("not x86-64".into());
    }
    if facts.bolted {
        return no("already processed by BOLT (.note.bolt_info)".into());
    }
    if !facts.has_symbols {
        return no("stripped (no .symtab)".into());
    }
    if facts.text_size < cfg.min_text_bytes {
        return no(format!(
            ".text {} below the {} threshold",
            iec(facts.text_size),
            iec(cfg.min_text_bytes)
        ));
    }
    let share = profile.own_text_share.clamp(0.0, 1.0);
    if share < cfg.min_own_text_share {
        return no(format!(
            "only {:.0}% of samples in its own text (needs {:.0}%)",
            share * 100.0,
            cfg.min_own_text_share * 100.0
        ));
    }
    let mut score = share * size_factor(facts.text_size);
    if mode == BoltMode::NonRelocation {
        // Measured here: non-relocation mode gained less every time.
        score *= 0.5;
    }
    let mut pressure = String::new();
    if let Some(fe) = profile.front_end {
        // Front-end bound programs are where layout pays; i-cache misses dominate.
        let factor = 1.0
            + (fe.icache_misses_per_kilo_instructions / 10.0).min(2.0)
            + (fe.itlb_misses_per_kilo_instructions / 2.0).min(1.0)
            + (fe.branch_miss_rate * 10.0).min(1.0);
        score *= factor;
        pressure = format!(
            ", i-cache {:.1} MPKI, iTLB {:.1} MPKI, branch misses {:.1}%",
            fe.icache_misses_per_kilo_instructions,
            fe.itlb_misses_per_kilo_instructions,
            fe.branch_miss_rate * 100.0
        );
    }
    let why = format!(
        "{}, .text {}, {:.0}% of samples in own text{pressure}",
        mode.label(),
        iec(facts.text_size),
        share * 100.0
    );
    Applicability { candidate: true, mode, score, reason: format!("candidate ({why})"), why }
}

/// The profile's numbers, from its windows in the catalog; None while it has no own-text
/// sample.
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
        a.why = format!(
            "by its ELF facts ({}, .text {}); its own-text share is unknown until it is \
             profiled",
            a.mode.label(),
            iec(facts.text_size)
        );
        a.reason = format!("candidate {}", a.why);
    }
    Verdict { applicability: a, facts_only: true }
}

/// Where a path stands for BOLT before its verdict: excluded by the user, left alone by the
/// config's allow/deny lists, or not indexed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub excluded: bool,
    pub permitted: bool,
}

/// Whether BOLT could work on this binary, and why (or why not), for the status table:
/// the user's exclusion and the allow/deny lists first, then [`verdict`], with the profile's
/// own-text share when known. The reason has no verdict word (the table prints
/// "candidate: " or "not a candidate: " itself).
pub fn candidacy(
    standing: Standing,
    facts: Option<&ElfFacts>,
    profile: Option<&ProfileNumbers>,
    cfg: &ApplicabilityConfig,
) -> (bool, String) {
    if standing.excluded {
        return (false, "excluded by the user".into());
    }
    if !standing.permitted {
        return (false, "left alone by the allow/deny lists of the config".into());
    }
    let Some(facts) = facts else { return (false, "not indexed yet".into()) };
    let v = verdict(facts, profile, cfg).applicability;
    (v.candidate, v.why)
}

/// Bigger code has more to gain from layout; grows slowly (log2 of KiB, 1.0 at 64 KiB).
fn size_factor(text_bytes: u64) -> f64 {
    let kib = (text_bytes as f64 / 1024.0).max(1.0);
    (kib.log2() / 6.0).max(0.1)
}

/// A size in binary units: `171.0 KiB`, `12.5 MiB`.
fn iec(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ElfFacts {
        ElfFacts { function_symbols: 900, ..ElfFacts::for_tests(171 * 1024, true) }
    }

    fn profile(share: f64) -> ProfileNumbers {
        ProfileNumbers { samples: 20_000, own_text_share: share, front_end: None }
    }

    #[test]
    fn relocatable_big_hot_binary_is_a_candidate() {
        let a = assess(&facts(), &profile(0.82), &ApplicabilityConfig::default());
        assert!(a.candidate);
        assert_eq!(a.mode, BoltMode::Relocations);
        assert_eq!(
            a.reason,
            "candidate (relocation mode, .text 171.0 KiB, 82% of samples in own text)"
        );
        assert!(a.score > 0.0);
    }

    #[test]
    fn refusals_name_their_reason() {
        let cfg = ApplicabilityConfig::default();
        let stripped = ElfFacts { has_symbols: false, ..facts() };
        assert_eq!(
            assess(&stripped, &profile(0.9), &cfg).reason,
            "not a candidate: stripped (no .symtab)"
        );
        let bolted = ElfFacts { bolted: true, ..facts() };
        assert!(assess(&bolted, &profile(0.9), &cfg).reason.contains("already processed by BOLT"));
        let small = ElfFacts { text_size: 4096, ..facts() };
        assert!(!assess(&small, &profile(0.9), &cfg).candidate);
        let arm = ElfFacts { x86_64: false, ..facts() };
        assert_eq!(assess(&arm, &profile(0.9), &cfg).reason, "not a candidate: not x86-64");
        let cold = assess(&facts(), &profile(0.1), &cfg);
        assert!(!cold.candidate);
        assert!(cold.reason.contains("10% of samples"), "{}", cold.reason);
        assert_eq!(cold.score, 0.0);
    }

    #[test]
    fn without_relocations_the_mode_is_non_relocation_and_scores_lower() {
        let cfg = ApplicabilityConfig::default();
        let reloc = assess(&facts(), &profile(0.8), &cfg);
        let plain = assess(&ElfFacts { has_relocs: false, ..facts() }, &profile(0.8), &cfg);
        assert!(plain.candidate);
        assert_eq!(plain.mode, BoltMode::NonRelocation);
        assert!(plain.reason.contains("non-relocation mode"));
        assert!(plain.score < reloc.score);
    }

    #[test]
    fn front_end_pressure_raises_the_score() {
        let cfg = ApplicabilityConfig::default();
        let base = assess(&facts(), &profile(0.8), &cfg);
        let mut p = profile(0.8);
        p.front_end = Some(FrontEndPressure {
            icache_misses_per_kilo_instructions: 12.0,
            itlb_misses_per_kilo_instructions: 1.0,
            branch_miss_rate: 0.02,
        });
        let hot = assess(&facts(), &p, &cfg);
        assert!(hot.score > base.score);
        assert!(hot.reason.contains("i-cache 12.0 MPKI"));
    }

    #[test]
    fn verdicts_say_what_they_were_judged_by() {
        let cfg = ApplicabilityConfig { min_text_bytes: 1024, min_own_text_share: 0.3 };
        let facts = ElfFacts::for_tests(8 * 1024, true);
        let v = verdict(&facts, None, &cfg);
        assert!(v.applicability.candidate && v.facts_only);
        assert!(v.applicability.reason.contains("unknown until it is profiled"));
        let hot = ProfileNumbers { samples: 900, own_text_share: 0.9, front_end: None };
        let v = verdict(&facts, Some(&hot), &cfg);
        assert!(v.applicability.candidate && !v.facts_only);
        assert!(v.applicability.reason.contains("90% of samples"), "{}", v.applicability.reason);
        let cold = ProfileNumbers { own_text_share: 0.1, ..hot };
        assert!(!verdict(&facts, Some(&cold), &cfg).applicability.candidate);
        let stripped = ElfFacts { has_symbols: false, ..facts };
        let v = verdict(&stripped, None, &cfg);
        assert!(!v.applicability.candidate);
        assert_eq!(v.applicability.reason, "not a candidate: stripped (no .symtab)");
    }

    #[test]
    fn candidacy_reasons_have_no_verdict_word_and_the_users_word_comes_first() {
        let cfg = ApplicabilityConfig::default();
        let ok = Standing { excluded: false, permitted: true };
        let stripped = ElfFacts { has_symbols: false, ..facts() };
        assert_eq!(
            candidacy(ok, Some(&stripped), None, &cfg),
            (false, "stripped (no .symtab)".to_string())
        );
        assert_eq!(
            candidacy(ok, Some(&facts()), Some(&profile(0.82)), &cfg),
            (true, "relocation mode, .text 171.0 KiB, 82% of samples in own text".to_string())
        );
        let (yes, why) = candidacy(ok, Some(&facts()), None, &cfg);
        assert!(yes && why.starts_with("by its ELF facts (relocation mode"), "{why}");
        let excluded = Standing { excluded: true, permitted: false };
        assert_eq!(candidacy(excluded, Some(&facts()), None, &cfg).1, "excluded by the user");
        let denied = Standing { excluded: false, permitted: false };
        assert!(candidacy(denied, Some(&facts()), None, &cfg).1.contains("allow/deny"));
        assert_eq!(candidacy(ok, None, None, &cfg).1, "not indexed yet");
    }
}

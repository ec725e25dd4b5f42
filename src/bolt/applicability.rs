//! Whether a binary is worth a BOLT run, in which mode, with a score and a reason a human
//! can read in status. A pure function of the binary's ELF facts, numbers from its profile
//! and the configured thresholds.

use serde::{Deserialize, Serialize};

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
    pub reason: String,
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
            kib(facts.text_size),
            kib(cfg.min_text_bytes)
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
    Applicability {
        candidate: true,
        mode,
        score,
        reason: format!(
            "candidate ({}, .text {}, {:.0}% of samples in own text{pressure})",
            mode.label(),
            kib(facts.text_size),
            share * 100.0
        ),
    }
}

/// Bigger code has more to gain from layout; grows slowly (log2 of KiB, 1.0 at 64 KiB).
fn size_factor(text_bytes: u64) -> f64 {
    let kib = (text_bytes as f64 / 1024.0).max(1.0);
    (kib.log2() / 6.0).max(0.1)
}

fn kib(bytes: u64) -> String {
    if bytes >= 10 * 1024 * 1024 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
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
            "candidate (relocation mode, .text 171 KiB, 82% of samples in own text)"
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
}

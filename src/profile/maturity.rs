//! When is a sampled profile good enough for BOLT? Pure functions over a binary's windows.
//!
//! A profile is mature when all three hold:
//! 1. **Samples**: at least `min_samples` samples in the binary's own text (BRIEF.md: below
//!    ~100k samples, no_lbr profiles made SQLite slower after BOLT).
//! 2. **Runs**: from at least `min_runs` separate processes, so one odd run does not
//!    decide the layout.
//! 3. **Stability**: the hot functions of the recent data agree with the older data.
//!    Windows are taken newest first until they hold at least a third of the samples:
//!    that is "recent"; the rest is "older". Each is turned into a distribution over
//!    functions (share of samples per function), and stability is their histogram
//!    intersection `sum_f min(p_recent(f), p_older(f))`, in [0, 1]: 1 when the recent
//!    time split matches the older one exactly, 0 when they share no function. It is
//!    weighted by hotness by construction (a cold function's disagreement barely counts).
//!    Comparing against the older part rather than the whole avoids the recent data
//!    agreeing with itself. With data from one window only, stability is unknown (not
//!    mature yet).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Thresholds; all configurable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaturityThresholds {
    pub min_samples: u64,
    pub min_runs: u64,
    pub min_stability: f64,
}

impl Default for MaturityThresholds {
    fn default() -> Self {
        Self { min_samples: 100_000, min_runs: 3, min_stability: 0.8 }
    }
}

/// One window's function counts: (window start, function, samples).
pub type FunctionWindowCounts = [(i64, String, u64)];

/// The verdict and its inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Maturity {
    pub samples: u64,
    pub runs: u64,
    /// None while all data is in one window.
    pub stability: Option<f64>,
    pub mature: bool,
    /// e.g. `collecting 3,400/100,000 samples, 12 runs, stable 0.91`.
    pub progress: String,
}

/// Histogram intersection of two count maps, each normalized to shares.
pub fn overlap(a: &HashMap<&str, u64>, b: &HashMap<&str, u64>) -> f64 {
    let (ta, tb) = (a.values().sum::<u64>() as f64, b.values().sum::<u64>() as f64);
    if ta == 0.0 || tb == 0.0 {
        return 0.0;
    }
    a.iter().filter_map(|(f, &ca)| b.get(f).map(|&cb| (ca as f64 / ta).min(cb as f64 / tb))).sum()
}

/// Stability of per-window function counts, as defined in the module doc.
pub fn stability(counts: &FunctionWindowCounts) -> Option<f64> {
    let mut per_window: HashMap<i64, u64> = HashMap::new();
    for (w, _, c) in counts {
        *per_window.entry(*w).or_default() += c;
    }
    if per_window.len() < 2 {
        return None;
    }
    let total: u64 = per_window.values().sum();
    let mut newest_first: Vec<(i64, u64)> = per_window.into_iter().collect();
    newest_first.sort_by_key(|(w, _)| std::cmp::Reverse(*w));
    let mut recent_from = i64::MAX;
    let mut held = 0u64;
    for (w, c) in &newest_first[..newest_first.len() - 1] {
        recent_from = *w;
        held += c;
        if held * 3 >= total {
            break;
        }
    }
    let (mut recent, mut older) = (HashMap::new(), HashMap::new());
    for (w, f, c) in counts {
        let side = if *w >= recent_from { &mut recent } else { &mut older };
        *side.entry(f.as_str()).or_default() += c;
    }
    Some(overlap(&recent, &older))
}

/// The verdict for a binary with `samples` own-text samples from `runs` runs.
pub fn assess(
    samples: u64,
    runs: u64,
    counts: &FunctionWindowCounts,
    t: &MaturityThresholds,
) -> Maturity {
    let stability = stability(counts);
    let mature = samples >= t.min_samples
        && runs >= t.min_runs
        && stability.is_some_and(|s| s >= t.min_stability);
    let stable = match stability {
        Some(s) => format!("stable {s:.2}"),
        None => "stability unknown (one window)".to_string(),
    };
    let runs_text = if runs == 1 { "1 run".to_string() } else { format!("{} runs", group(runs)) };
    let progress = if mature {
        format!("mature: {} samples, {runs_text}, {stable}", group(samples))
    } else {
        format!(
            "collecting {}/{} samples, {runs_text}, {stable}",
            group(samples),
            group(t.min_samples)
        )
    };
    Maturity { samples, runs, stability, mature, progress }
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(w: i64, f: &str, n: u64) -> (i64, String, u64) {
        (w, f.to_string(), n)
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(3_400), "3,400");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn overlap_is_histogram_intersection() {
        let a: HashMap<&str, u64> = [("f", 90), ("g", 10)].into();
        let b: HashMap<&str, u64> = [("f", 80), ("h", 20)].into();
        assert!((overlap(&a, &b) - 0.8).abs() < 1e-9);
        assert!((overlap(&a, &a) - 1.0).abs() < 1e-9);
        assert_eq!(overlap(&a, &HashMap::new()), 0.0);
    }

    #[test]
    fn stability_compares_the_newest_third_with_the_rest() {
        // Windows 0 and 100 hold the old picture (f hot); window 200 (the newest, 50% of
        // the samples) has moved to g.
        let counts =
            [c(0, "f", 50), c(100, "f", 40), c(100, "g", 10), c(200, "f", 20), c(200, "g", 80)];
        // recent = window 200: f .2, g .8 ; older: f .9, g .1 -> .2 + .1
        assert!((stability(&counts).unwrap() - 0.3).abs() < 1e-9);
        let same = [
            c(0, "f", 50),
            c(0, "g", 50),
            c(1, "f", 5),
            c(1, "g", 5),
            c(2, "f", 45),
            c(2, "g", 45),
        ];
        assert!((stability(&same).unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(stability(&[c(0, "f", 5), c(0, "g", 1)]), None);
        assert_eq!(stability(&[]), None);
    }

    #[test]
    fn maturity_needs_samples_runs_and_stability() {
        let t = MaturityThresholds { min_samples: 10_000, min_runs: 3, min_stability: 0.8 };
        let stable = [c(0, "f", 6_000), c(0, "g", 1_000), c(600, "f", 5_900), c(600, "g", 1_100)];
        let m = assess(14_000, 12, &stable, &t);
        assert!(m.mature, "{m:?}");
        assert!(
            m.progress.starts_with("mature: 14,000 samples, 12 runs, stable 0.9"),
            "{}",
            m.progress
        );
        let few = assess(3_400, 12, &stable, &t);
        assert!(!few.mature);
        assert!(few.progress.starts_with("collecting 3,400/10,000 samples, 12 runs, stable 0.9"));
        assert!(!assess(14_000, 2, &stable, &t).mature, "too few runs");
        let shifting = [c(0, "f", 7_000), c(600, "g", 7_000)];
        let m = assess(14_000, 12, &shifting, &t);
        assert!(!m.mature);
        assert_eq!(m.stability, Some(0.0));
        let one_window = [c(0, "f", 14_000)];
        let m = assess(14_000, 1, &one_window, &t);
        assert_eq!(
            m.progress,
            "collecting 14,000/10,000 samples, 1 run, stability unknown (one window)"
        );
    }
}

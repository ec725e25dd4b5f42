//! Pure statistics for "is the variant faster than the original?".
//!
//! [`paired_compare`] (the canary's test): time-adjacent pairs of a variant run and an
//! original run of the same command; a one-sample Hodges-Lehmann estimate of the paired
//! log-ratio with a Wilcoxon signed-rank interval. A load shared by a pair's two runs
//! cancels, so time-correlated noise (load bursts, drift) on a shared machine cannot pass
//! for a difference, which two independent samples cannot guarantee.
//!
//! It serves every decision: the canary's looks, the served stage's drift blocks and the
//! gain status shows. (An earlier two-sample test, stratified by command, was dropped:
//! under a load burst that hit one arm's runs more than the other's it saw a difference
//! where there was none; see `drift_shared_by_both_arms_is_not_a_difference`.)
//!
//! Why Hodges-Lehmann and not a bootstrap of the median ratio: on log times it is about 1.5x
//! as efficient as a difference of medians (asymptotic relative efficiency 0.955 vs 0.637
//! under normal noise), so it needs about two thirds of the runs for the same interval
//! width; its interval comes from the rank distribution, so its coverage holds for any
//! continuous noise shape (heavy tails included) without resampling, and it is
//! deterministic (no random source to seed). Medians of small bootstrap samples also
//! under-cover. The cost is O(N log N) in the N pairwise differences or Walsh averages
//! (at most 320 pairs here).
//!
//! The interval at one-sided level `a` on each side is `[W(C+1), W(M-C)]` over the `M`
//! sorted Walsh averages, with `C = floor(M/2 - z(1-a) * sqrt(Var) - 1/2)` and the
//! signed-rank variance `Var = n(n+1)(2n+1)/24`: under equal speed the probability that its
//! upper end falls below 0 (a false "faster") is at most `a`.
//!
//! [`median`] is the one median of the crate (the report's counters and the bench analysis
//! use it too).

/// One timed run: its command hash and CPU time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timed<'a> {
    pub cmd: &'a str,
    pub cpu_ns: u64,
}

/// Variant vs original: CPU-time ratio (below 1 is faster) with its interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    /// Hodges-Lehmann estimate of variant/original CPU time.
    pub ratio: f64,
    /// Interval ends (0 and infinity when there are too few runs to bound it). JSON has no
    /// infinity: an unbounded end is written as `null` and read back as infinity.
    pub low: f64,
    #[serde(with = "unbounded")]
    pub high: f64,
    pub variant_runs: usize,
    pub original_runs: usize,
    /// Commands that had runs in both arms.
    pub commands: usize,
}

/// An interval end that may be infinite, as JSON (`null` for infinity; serde_json would
/// write `null` and then refuse to read it back as a number).
mod unbounded {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { s.serialize_f64(*v) } else { s.serialize_none() }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

impl Comparison {
    /// Signed change in percent (negative: the variant is faster).
    pub fn change_percent(&self) -> f64 {
        (self.ratio - 1.0) * 100.0
    }

    /// "faster by 4.6% (95% interval 0.3%..8.8% faster)": the interval's own ends, since
    /// a ratio interval is asymmetric around its estimate (half its width misleads).
    pub fn describe(&self) -> String {
        let c = self.change_percent();
        let word = if c < 0.0 { "faster" } else { "slower" };
        format!("{word} by {:.1}% (interval {})", c.abs(), self.describe_interval())
    }

    /// The interval as changes: "0.3%..8.8% faster", "2.0% faster..1.1% slower",
    /// "unbounded" when too few runs bound it.
    pub fn describe_interval(&self) -> String {
        if !self.high.is_finite() || self.low <= 0.0 {
            return "unbounded".to_string();
        }
        let (lo, hi) = ((self.low - 1.0) * 100.0, (self.high - 1.0) * 100.0);
        if hi < 0.0 {
            format!("{:.1}%..{:.1}% faster", -hi, -lo)
        } else if lo > 0.0 {
            format!("{:.1}%..{:.1}% slower", lo, hi)
        } else {
            format!("{:.1}% faster..{:.1}% slower", -lo, hi)
        }
    }
}

/// Compares time-adjacent pairs `(variant run, original run)` of the same command: a
/// one-sample Hodges-Lehmann estimate of the paired log-ratio `ln v - ln o` (median of the
/// Walsh averages) with the Wilcoxon signed-rank interval (normal approximation with
/// continuity correction; `z` as in [`compare`]).
///
/// Why pairs: on a shared machine the noise is correlated in time (load bursts, slow
/// drifts); two arms' runs treated as independent samples turn a burst that hit one arm's
/// runs more than the other's into a "difference". A pair's two runs are adjacent in time,
/// so a load shared by both cancels in the pair's log-ratio, and the signed-rank interval
/// needs only that each pair's difference is symmetric about the true shift (which random
/// arm assignment gives). `None` without pairs.
pub fn paired_compare(pairs: &[(Timed<'_>, Timed<'_>)], z: f64) -> Option<Comparison> {
    if pairs.is_empty() {
        return None;
    }
    let d: Vec<f64> = pairs.iter().map(|(v, o)| log_time(v.cpu_ns) - log_time(o.cpu_ns)).collect();
    let n = d.len();
    let mut walsh = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        for j in i..n {
            walsh.push((d[i] + d[j]) / 2.0);
        }
    }
    // `median` leaves the Walsh averages sorted: the interval's bounds are order statistics.
    let hl = median(&mut walsh)?;
    let m = walsh.len();
    let nf = n as f64;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0;
    let c = (m as f64 / 2.0 - z * var.sqrt() - 0.5).floor();
    let (low, high) = if c < 0.0 {
        (0.0, f64::INFINITY)
    } else {
        let c = (c as usize).min((m - 1) / 2);
        (walsh[c].exp(), walsh[m - 1 - c].exp())
    };
    let commands = pairs.iter().map(|(v, _)| v.cmd).collect::<std::collections::HashSet<_>>().len();
    Some(Comparison { ratio: hl.exp(), low, high, variant_runs: n, original_runs: n, commands })
}

fn log_time(ns: u64) -> f64 {
    // A zero reading (a run too short for the clock) is treated as one nanosecond.
    (ns.max(1) as f64).ln()
}

/// The median of `x` (the mean of the two middle values when their number is even), `None`
/// when `x` is empty. Sorts `x` in place by [`f64::total_cmp`] (a NaN sorts last), which
/// callers that need order statistics besides the median may rely on. The one median of the
/// crate: the policy, the report's counters and the bench analysis all use it.
pub fn median(x: &mut [f64]) -> Option<f64> {
    x.sort_by(f64::total_cmp);
    let n = x.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(x[n / 2]),
        _ => Some((x[n / 2 - 1] + x[n / 2]) / 2.0),
    }
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbounded_interval_survives_json() {
        let k = Comparison {
            ratio: 0.99,
            low: 0.0,
            high: f64::INFINITY,
            variant_runs: 3,
            original_runs: 3,
            commands: 1,
        };
        let text = serde_json::to_string(&k).unwrap();
        assert!(text.contains("\"high\":null"), "{text}");
        assert_eq!(serde_json::from_str::<Comparison>(&text).unwrap(), k);
        let bounded = Comparison { high: 1.2, ..k };
        let back: Comparison =
            serde_json::from_str(&serde_json::to_string(&bounded).unwrap()).unwrap();
        assert_eq!(back, bounded);
    }

    #[test]
    fn quantiles_are_right() {
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.99) - 2.326_348).abs() < 1e-5);
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.01) + 2.326_348).abs() < 1e-5);
    }

    fn pairs<'a>(cmd: &'a str, v: &[f64], o: &[f64]) -> Vec<(Timed<'a>, Timed<'a>)> {
        let t = |x: f64| Timed { cmd, cpu_ns: x as u64 };
        v.iter().zip(o).map(|(&a, &b)| (t(a), t(b))).collect()
    }

    /// A deterministic stand-in for noise: a scrambled sequence in -0.5..0.5.
    fn jitter(i: usize, salt: usize) -> f64 {
        ((i * 7919 + salt * 104_729) % 1009) as f64 / 1009.0 - 0.5
    }

    #[test]
    fn paired_symmetric_noise_covers_one() {
        // Each pair's two runs get independent noise of the same shape: no difference.
        let o: Vec<f64> = (0..60).map(|i| 1e8 * (0.2 * jitter(i, 1)).exp()).collect();
        let v: Vec<f64> = (0..60).map(|i| 1e8 * (0.2 * jitter(i, 2)).exp()).collect();
        let c = paired_compare(&pairs("a", &v, &o), 1.96).unwrap();
        assert!(c.low < 1.0 && 1.0 < c.high, "{c:?}");
        assert_eq!((c.variant_runs, c.original_runs, c.commands), (60, 60, 1));
    }

    #[test]
    fn paired_constant_gain_is_found_and_excludes_one() {
        let o: Vec<f64> = (0..40).map(|i| 1e8 * (0.3 * jitter(i, 1)).exp()).collect();
        let v: Vec<f64> =
            o.iter().enumerate().map(|(i, &t)| t * 0.95 * (0.02 * jitter(i, 3)).exp()).collect();
        let c = paired_compare(&pairs("a", &v, &o), 2.326).unwrap();
        assert!((c.ratio - 0.95).abs() < 0.01, "{c:?}");
        assert!(c.low < c.ratio && c.ratio < c.high && c.high < 1.0, "{c:?}");
        assert!(c.describe().starts_with("faster by 5."), "{}", c.describe());
    }

    #[test]
    fn drift_shared_by_both_arms_is_not_a_difference() {
        // A slow drift (the machine getting 3x busier over the window) multiplies both runs
        // of each pair. Unpaired, the variant's runs happen to sit late in the window (as
        // when one arm's runs cluster in a burst) and look far slower; paired, the drift
        // cancels and the interval covers 1.
        let n = 80;
        let drift = |i: usize| (i as f64 / n as f64 * 3f64.ln()).exp();
        let o: Vec<f64> = (0..n).map(|i| 1e8 * drift(i) * (0.1 * jitter(i, 1)).exp()).collect();
        let v: Vec<f64> = (0..n).map(|i| 1e8 * drift(i) * (0.1 * jitter(i, 2)).exp()).collect();
        let c = paired_compare(&pairs("a", &v, &o), 2.326).unwrap();
        assert!(c.low < 1.0 && 1.0 < c.high, "{c:?}");
        // The same runs as independent samples, the variant's from the later half of the
        // window: their medians differ by far more than any real gain.
        let median_of = |x: &[f64]| median(&mut x.to_vec()).unwrap();
        assert!(median_of(&v[n / 2..]) / median_of(&o[..n / 2]) > 1.5);
    }

    #[test]
    fn interval_is_described_by_its_ends() {
        let c = Comparison {
            ratio: 0.954,
            low: 0.912,
            high: 0.997,
            variant_runs: 20,
            original_runs: 20,
            commands: 1,
        };
        assert_eq!(c.describe(), "faster by 4.6% (interval 0.3%..8.8% faster)");
        let c = Comparison { ratio: 1.01, low: 0.98, high: 1.04, ..c };
        assert_eq!(c.describe(), "slower by 1.0% (interval 2.0% faster..4.0% slower)");
        let c = Comparison { ratio: 1.1, low: 0.0, high: f64::INFINITY, ..c };
        assert_eq!(c.describe(), "slower by 10.0% (interval unbounded)");
    }

    #[test]
    fn too_few_pairs_give_an_unbounded_interval() {
        let c = paired_compare(&pairs("a", &[10.0], &[20.0]), 2.0).unwrap();
        assert_eq!(c.low, 0.0);
        assert!(c.high.is_infinite());
        assert!(paired_compare(&[], 2.0).is_none());
    }
}

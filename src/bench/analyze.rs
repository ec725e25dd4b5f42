//! From the runs of a benchmark to its result, purely: per metric the medians of each arm,
//! the paired ratio against the original with its 95% interval (the policy's statistics,
//! [`paired_compare`]), the A/A control, and the output check.

use serde::{Deserialize, Serialize};

use crate::bench::run::RunSample;
use crate::measure::RunExit;
use crate::measure::counters::Metric;
use crate::policy::stats::{Comparison, Timed, median, normal_quantile, paired_compare};

/// Arm 0 is always the original; arm 1 what it is compared against; arm 2 (with `--aa`) a
/// second copy of the original.
pub const ORIGINAL: usize = 0;
pub const AGAINST: usize = 1;
pub const AA: usize = 2;

/// One round: one run of every arm, in a random order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// The arms in the order they ran.
    pub order: Vec<usize>,
    /// Indexed by arm.
    pub samples: Vec<RunSample>,
}

/// One metric's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricResult {
    pub metric: String,
    pub unit: String,
    /// Median per arm (indexed like the arms); empty when unsupported.
    pub medians: Vec<f64>,
    /// Against / original: Hodges-Lehmann ratio of the pairs with its 95% interval.
    pub ratio: Option<Comparison>,
    /// A/A copy / original, the same way.
    pub aa: Option<Comparison>,
    /// Why the machine did not count it ("not supported here ...").
    pub unsupported: Option<String>,
}

/// A run whose stdout or exit status differs from the original's first run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub arm: usize,
    pub round: usize,
    pub exit: RunExit,
    pub stdout_sha256: String,
    pub stdout_preview: String,
}

/// The output check: every run of every arm against the original's first run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputCheck {
    pub runs_checked: usize,
    pub reference_exit: RunExit,
    pub reference_stdout_sha256: String,
    pub reference_stdout_preview: String,
    /// The original itself gave different outputs: the program is not deterministic, so
    /// a difference does not prove a miscompile.
    pub original_varies: bool,
    pub mismatches: Vec<Mismatch>,
}

impl OutputCheck {
    /// A variant (or the A/A copy) differed while the original agreed with itself.
    pub fn miscompile_suspected(&self) -> bool {
        self.mismatches.iter().any(|m| m.arm != ORIGINAL) && !self.original_varies
    }
}

/// The metrics of a run, in report order: wall, CPU, max RSS, then the counters.
pub fn metric_names() -> Vec<(&'static str, &'static str)> {
    let mut out = vec![("wall", "ns"), ("cpu", "ns"), ("max-rss", "KiB")];
    for m in Metric::ALL {
        out.push((m.name(), if m == Metric::TaskClock { "ns" } else { "count" }));
    }
    out
}

fn value(s: &RunSample, metric: &str) -> Option<u64> {
    match metric {
        "wall" => Some(s.wall_ns),
        "cpu" => Some(s.cpu_ns),
        "max-rss" => Some(s.max_rss_kb),
        other => s.counters.get(other).copied(),
    }
}

/// The z of a two-sided 95% interval.
pub fn z95() -> f64 {
    normal_quantile(0.975)
}

/// Per-metric results over `rounds` with `arms` arms.
pub fn metrics(rounds: &[Round], arms: usize) -> Vec<MetricResult> {
    let z = z95();
    metric_names()
        .into_iter()
        .map(|(metric, unit)| {
            let unsupported = rounds
                .iter()
                .flat_map(|r| &r.samples)
                .find_map(|s| s.unsupported.get(metric).cloned());
            let complete: Vec<&Round> = rounds
                .iter()
                .filter(|r| r.samples.iter().all(|s| value(s, metric).is_some()))
                .collect();
            if unsupported.is_some() || complete.is_empty() {
                return MetricResult {
                    metric: metric.into(),
                    unit: unit.into(),
                    medians: Vec::new(),
                    ratio: None,
                    aa: None,
                    unsupported: unsupported.or_else(|| Some("not measured".into())),
                };
            }
            let at = |r: &Round, arm: usize| value(&r.samples[arm], metric).unwrap_or(0);
            let medians = (0..arms).map(|a| {
                let mut x: Vec<f64> = complete.iter().map(|r| at(r, a) as f64).collect();
                median(&mut x).unwrap_or(f64::NAN)
            });
            let compare = |arm: usize| {
                let pairs: Vec<(Timed<'_>, Timed<'_>)> = complete
                    .iter()
                    .map(|r| {
                        (
                            Timed { cmd: "bench", cpu_ns: at(r, arm) },
                            Timed { cmd: "bench", cpu_ns: at(r, ORIGINAL) },
                        )
                    })
                    .collect();
                paired_compare(&pairs, z)
            };
            MetricResult {
                metric: metric.into(),
                unit: unit.into(),
                medians: medians.collect(),
                ratio: (arms > AGAINST).then(|| compare(AGAINST)).flatten(),
                aa: (arms > AA).then(|| compare(AA)).flatten(),
                unsupported: None,
            }
        })
        .collect()
}

/// Checks every run against the original's first run.
pub fn check_output(rounds: &[Round]) -> Option<OutputCheck> {
    let first = rounds.first()?.samples.get(ORIGINAL)?;
    let same = |s: &RunSample| s.exit == first.exit && s.stdout_sha256 == first.stdout_sha256;
    let mut check = OutputCheck {
        runs_checked: 0,
        reference_exit: first.exit,
        reference_stdout_sha256: first.stdout_sha256.clone(),
        reference_stdout_preview: first.stdout_preview.clone(),
        original_varies: false,
        mismatches: Vec::new(),
    };
    for (i, r) in rounds.iter().enumerate() {
        for (arm, s) in r.samples.iter().enumerate() {
            check.runs_checked += 1;
            if !same(s) {
                if arm == ORIGINAL {
                    check.original_varies = true;
                }
                check.mismatches.push(Mismatch {
                    arm,
                    round: i,
                    exit: s.exit,
                    stdout_sha256: s.stdout_sha256.clone(),
                    stdout_preview: s.stdout_preview.clone(),
                });
            }
        }
    }
    Some(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(wall: u64, out: &str) -> RunSample {
        RunSample {
            wall_ns: wall,
            cpu_ns: wall,
            max_rss_kb: 1000,
            exit: RunExit::Exited(0),
            stdout_sha256: out.into(),
            stdout_len: 1,
            stdout_preview: out.into(),
            counters: [("task-clock".to_string(), wall)].into(),
            unsupported: [("cycles".to_string(), "not supported here".to_string())].into(),
        }
    }

    fn rounds(f: impl Fn(usize) -> [RunSample; 3]) -> Vec<Round> {
        (0..30).map(|i| Round { order: vec![0, 1, 2], samples: f(i).to_vec() }).collect()
    }

    #[test]
    fn a_faster_arm_excludes_one_and_aa_includes_it() {
        let jitter = |i: usize, s: usize| {
            let x = ((i * 3 + s) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 40) % 200
        };
        let rs = rounds(|i| {
            [
                sample(10_000 + jitter(i, 1), "a"),
                sample(8_000 + jitter(i, 2), "a"),
                sample(10_000 + jitter(i, 3), "a"),
            ]
        });
        let m = metrics(&rs, 3);
        let wall = m.iter().find(|m| m.metric == "wall").unwrap();
        let r = wall.ratio.unwrap();
        assert!(r.high < 1.0 && (r.ratio - 0.8).abs() < 0.01, "{r:?}");
        let aa = wall.aa.unwrap();
        assert!(aa.low < 1.0 && aa.high > 1.0, "{aa:?}");
        let cycles = m.iter().find(|m| m.metric == "cycles").unwrap();
        assert_eq!(cycles.unsupported.as_deref(), Some("not supported here"));
        assert!(cycles.ratio.is_none() && cycles.medians.is_empty());
        assert!(check_output(&rs).unwrap().mismatches.is_empty());
    }

    #[test]
    fn a_different_output_is_a_suspected_miscompile_unless_the_original_varies() {
        let rs = rounds(|i| {
            [sample(10, "a"), sample(10, if i == 7 { "b" } else { "a" }), sample(10, "a")]
        });
        let c = check_output(&rs).unwrap();
        assert_eq!(c.runs_checked, 90);
        assert_eq!(c.mismatches.len(), 1);
        assert_eq!((c.mismatches[0].arm, c.mismatches[0].round), (AGAINST, 7));
        assert!(c.miscompile_suspected());

        let rs = rounds(|i| [sample(10, &i.to_string()), sample(10, "x"), sample(10, "y")]);
        let c = check_output(&rs).unwrap();
        assert!(c.original_varies && !c.miscompile_suspected());
    }
}

//! The merged fleet profile of one binary identity: pure functions over the machines'
//! contributions.
//!
//! Rules:
//! - One source wins: instrumentation (exact edge counts) when any machine has it, else
//!   branch stacks, else sampled `no_lbr` counts of the event with the most samples.
//!   BOLT reads one format per profile, and an exact profile beats any sampled one.
//! - Counts add up (as `merge-fdata` does), with each machine's weight capped: no machine
//!   may hold more than `max_share` of the merged total, and the cap never goes below
//!   1/(n-1) with n machines (a machine may always hold as much as all the others
//!   together). So the cap starts to act with three machines: with two, nothing tells the
//!   odd one from the good one, and holding both to half would throw away the larger
//!   profile. A capped machine's counts are scaled down uniformly, so its shape still
//!   counts but cannot decide the layout alone.
//! - Stability is the sample-weighted mean of the machines' own stability measures (each
//!   computed by the contributing machine over its windows); unknown when none has one.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::format::{Contribution, Source};
use crate::profile::fdata;

/// The merged profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Merged {
    pub source: Source,
    pub event: Option<String>,
    /// Machines merged (of the chosen source).
    pub machines: Vec<String>,
    /// Machines whose weight the share cap reduced.
    pub capped: Vec<String>,
    /// Samples (or edge executions) after the cap.
    pub samples: u64,
    pub outside: u64,
    pub runs: u64,
    pub stability: Option<f64>,
    /// Newest contribution's time.
    pub updated_at: i64,
    #[serde(skip)]
    pub functions: Vec<(String, u64, u64)>,
    #[serde(skip)]
    pub edges: Vec<(String, String, u64, u64)>,
}

impl Merged {
    /// The profile as BOLT fdata.
    pub fn write_fdata(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self.source {
            Source::Samples => fdata::write_no_lbr(
                out,
                self.event.as_deref().unwrap_or("cpu-clock"),
                &self.functions,
            ),
            Source::BranchStacks | Source::Instrumentation => {
                fdata::EdgeProfile::from_rows(&self.edges).write(out)
            }
        }
    }

    pub fn fdata(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_fdata(&mut out).expect("writing to memory");
        out
    }

    /// sha256 of the fdata: the profile's identity in verdicts and status.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.fdata()))
    }
}

/// Per-machine scale factors in (0, 1] such that no machine holds more than
/// `max(cap, 1/(n-1))` of the scaled total (water-filling: the biggest machines are cut to
/// a common level L with L = cap * sum(min(x_i, L))).
pub fn share_weights(totals: &[u64], cap: f64) -> Vec<f64> {
    let n = totals.len();
    if n <= 2 {
        return vec![1.0; n];
    }
    let cap = cap.max(1.0 / (n - 1) as f64);
    let total: f64 = totals.iter().map(|&x| x as f64).sum();
    let max = totals.iter().copied().max().unwrap_or(0) as f64;
    if total == 0.0 || max <= cap * total + 1e-9 {
        return vec![1.0; n];
    }
    let mut sorted: Vec<f64> = totals.iter().map(|&x| x as f64).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    // k machines capped at level L; the rest keep their counts.
    let mut level = *sorted.last().unwrap();
    for k in 1..n {
        let denom = 1.0 - k as f64 * cap;
        if denom <= 1e-12 {
            break;
        }
        let rest: f64 = sorted[k..].iter().sum();
        let l = cap * rest / denom;
        if sorted[k - 1] >= l && sorted[k] <= l {
            level = l;
            break;
        }
    }
    totals.iter().map(|&x| if x as f64 > level { level / x as f64 } else { 1.0 }).collect()
}

/// Merges the contributions (already parsed and checked); None when there are none.
pub fn merge(contributions: &[Contribution], max_share: f64) -> Option<Merged> {
    let chosen = choose_source(contributions)?;
    let group: Vec<&Contribution> = contributions
        .iter()
        .filter(|c| c.source == chosen.0 && (chosen.0 != Source::Samples || c.event == chosen.1))
        .collect();
    let totals: Vec<u64> = group.iter().map(|c| c.samples).collect();
    let weights = share_weights(&totals, max_share);
    let mut functions: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    let (mut samples, mut outside, mut runs) = (0f64, 0f64, 0u64);
    let (mut stab_sum, mut stab_weight) = (0f64, 0f64);
    let mut capped = Vec::new();
    for (c, &w) in group.iter().zip(&weights) {
        if w < 1.0 {
            capped.push(c.machine.clone());
        }
        for (f, off, n) in &c.functions {
            *functions.entry((f.clone(), *off)).or_default() += *n as f64 * w;
        }
        for (from, to, mis, n) in &c.edges {
            let e = edges.entry((from.clone(), to.clone())).or_default();
            e.0 += *mis as f64 * w;
            e.1 += *n as f64 * w;
        }
        samples += c.samples as f64 * w;
        outside += c.outside as f64 * w;
        runs += c.runs;
        if let Some(s) = c.stability {
            stab_sum += s * c.samples as f64 * w;
            stab_weight += c.samples as f64 * w;
        }
    }
    Some(Merged {
        source: chosen.0,
        event: chosen.1,
        machines: group.iter().map(|c| c.machine.clone()).collect(),
        capped,
        samples: samples.round() as u64,
        outside: outside.round() as u64,
        runs,
        stability: (stab_weight > 0.0).then(|| stab_sum / stab_weight),
        updated_at: group.iter().map(|c| c.updated_at).max().unwrap_or(0),
        functions: functions
            .into_iter()
            .map(|((f, o), n)| (f, o, n.round() as u64))
            .filter(|e| e.2 > 0)
            .collect(),
        edges: edges
            .into_iter()
            .map(|((a, b), (m, n))| (a, b, m.round() as u64, n.round() as u64))
            .filter(|e| e.3 > 0)
            .collect(),
    })
}

/// Instrumentation, else branch stacks, else the sampling event with the most samples.
fn choose_source(contributions: &[Contribution]) -> Option<(Source, Option<String>)> {
    for exact in [Source::Instrumentation, Source::BranchStacks] {
        if contributions.iter().any(|c| c.source == exact) {
            return Some((exact, None));
        }
    }
    let mut by_event: BTreeMap<&str, u64> = BTreeMap::new();
    for c in contributions {
        if let Some(e) = &c.event {
            *by_event.entry(e.as_str()).or_default() += c.samples;
        }
    }
    let (event, _) = by_event.into_iter().max_by_key(|(e, n)| (*n, std::cmp::Reverse(*e)))?;
    Some((Source::Samples, Some(event.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::format::VERSION;
    use crate::identity::ContentId;

    fn contribution(machine: &str, source: Source, fns: &[(&str, u64)]) -> Contribution {
        let samples = fns.iter().map(|f| f.1).sum();
        let edge = source != Source::Samples;
        Contribution {
            v: VERSION,
            machine: machine.into(),
            content: ContentId::of_bytes(b"x").hex(),
            build_id: None,
            source,
            event: (!edge).then(|| "cpu-clock".to_string()),
            samples,
            outside: 0,
            runs: 2,
            stability: Some(0.8),
            updated_at: 7,
            windows: vec![],
            functions: if edge {
                vec![]
            } else {
                fns.iter().map(|(f, n)| (f.to_string(), 0, *n)).collect()
            },
            edges: if edge {
                fns.iter().map(|(f, n)| (format!("1 {f} 0"), format!("1 {f} 8"), 0, *n)).collect()
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn no_machine_holds_more_than_its_share() {
        assert_eq!(share_weights(&[10, 10, 10], 0.5), vec![1.0; 3]);
        // One machine with 1,000,000 and two with 100: capped at half of the total.
        let w = share_weights(&[1_000_000, 100, 100], 0.5);
        let scaled = [1_000_000.0 * w[0], 100.0 * w[1], 100.0 * w[2]];
        let total: f64 = scaled.iter().sum();
        assert!((scaled[0] / total - 0.5).abs() < 1e-9, "{scaled:?}");
        assert_eq!((w[1], w[2]), (1.0, 1.0));
        // Two machines: nothing tells the odd one, no cap.
        assert_eq!(share_weights(&[900, 100], 0.2), vec![1.0, 1.0]);
        // Three: the cap is at least a half.
        let w = share_weights(&[900, 50, 50], 0.2);
        assert!((900.0 * w[0] - 100.0).abs() < 1e-9, "{w:?}");
        // One machine alone holds everything.
        assert_eq!(share_weights(&[5], 0.3), vec![1.0]);
        // Two big ones capped at a common level.
        let w = share_weights(&[1000, 1000, 10, 10, 10], 0.3);
        let s: Vec<f64> =
            [1000.0, 1000.0, 10.0, 10.0, 10.0].iter().zip(&w).map(|(x, w)| x * w).collect();
        let total: f64 = s.iter().sum();
        assert!(s.iter().all(|x| x / total <= 0.3 + 1e-9), "{s:?}");
    }

    #[test]
    fn counts_add_up_and_a_hostile_machine_cannot_decide_the_layout() {
        let a = contribution("a", Source::Samples, &[("hot", 600), ("cold", 10)]);
        let b = contribution("b", Source::Samples, &[("hot", 500), ("cold", 20)]);
        let m = merge(&[a.clone(), b.clone()], 0.5).unwrap();
        assert_eq!(m.samples, 1130);
        assert_eq!(m.runs, 4);
        assert_eq!(m.functions, vec![("cold".into(), 0, 30), ("hot".into(), 0, 1100)]);
        assert!(m.capped.is_empty());
        // A machine claiming a million samples in "cold" is held to half of the merge.
        let evil = contribution("evil", Source::Samples, &[("cold", 1_000_000)]);
        let m = merge(&[a, b, evil], 0.5).unwrap();
        assert_eq!(m.capped, vec!["evil".to_string()]);
        let cold = m.functions.iter().find(|f| f.0 == "cold").unwrap().2;
        let hot = m.functions.iter().find(|f| f.0 == "hot").unwrap().2;
        // evil holds half of the merge, not 99.9%: "hot" stays as hot as "cold".
        assert_eq!((cold - 30, hot), (1130, 1100));
        assert_eq!(m.samples, 2260);
        assert_eq!(String::from_utf8(m.fdata()).unwrap().lines().next(), Some("no_lbr cpu-clock:"));
    }

    #[test]
    fn an_instrumentation_profile_wins_over_samples() {
        let sampled = contribution("a", Source::Samples, &[("hot", 100_000)]);
        let exact = contribution("b", Source::Instrumentation, &[("hot", 40)]);
        let m = merge(&[sampled, exact], 0.5).unwrap();
        assert_eq!(m.source, Source::Instrumentation);
        assert_eq!(m.machines, vec!["b".to_string()]);
        assert_eq!(String::from_utf8(m.fdata()).unwrap(), "1 hot 0 1 hot 8 0 40\n");
        assert_eq!(m.digest().len(), 64);
        assert!(merge(&[], 0.5).is_none());
    }
}

//! Which files are hot: each exec of a served binary adds heat to the binary's file and to
//! every file its process mapped, and heat decays with a half-life. Which hot files fit the
//! budget: hottest first, a file whose working set does not fit is skipped for smaller ones.
//! Pure functions of the execs seen and the time given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
struct Entry {
    heat: f64,
    at: f64,
}

/// Decayed exec counts per file.
#[derive(Debug, Clone)]
pub struct Heat {
    half_life_secs: f64,
    files: HashMap<PathBuf, Entry>,
}

impl Heat {
    pub fn new(half_life_secs: u64) -> Self {
        Self { half_life_secs: half_life_secs.max(1) as f64, files: HashMap::new() }
    }

    fn decayed(&self, e: Entry, now: f64) -> f64 {
        let age = (now - e.at).max(0.0);
        e.heat * (0.5f64).powf(age / self.half_life_secs)
    }

    /// Adds `weight` (one exec) to `path` at time `now` (seconds).
    pub fn touch(&mut self, path: &Path, now: f64, weight: f64) {
        let current = self.files.get(path).map_or(0.0, |e| self.decayed(*e, now));
        self.files.insert(path.to_path_buf(), Entry { heat: current + weight, at: now });
    }

    pub fn heat_of(&self, path: &Path, now: f64) -> f64 {
        self.files.get(path).map_or(0.0, |e| self.decayed(*e, now))
    }

    /// Files with at least `min_heat`, hottest first (ties by path, so the order is stable).
    pub fn ranked(&self, now: f64, min_heat: f64) -> Vec<(PathBuf, f64)> {
        let mut out: Vec<_> = self
            .files
            .iter()
            .map(|(p, e)| (p.clone(), self.decayed(*e, now)))
            .filter(|(_, h)| *h >= min_heat)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Drops files colder than `below`, so the table stays bounded; returns them.
    pub fn forget_colder_than(&mut self, now: f64, below: f64) -> Vec<PathBuf> {
        let cold: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, e)| self.decayed(**e, now) < below)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &cold {
            self.files.remove(p);
        }
        cold
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The indices of `sizes` (bytes, in rank order) kept within `budget`: greedily hottest
/// first; a file that does not fit is skipped and smaller, colder ones may still fit. The
/// sum of the kept sizes never exceeds the budget.
pub fn within_budget(sizes: &[u64], budget: u64) -> Vec<usize> {
    let mut left = budget;
    let mut kept = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        if size <= left {
            left -= size;
            kept.push(i);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heat_follows_execs_and_decays() {
        let mut h = Heat::new(100);
        let (a, b) = (Path::new("/a"), Path::new("/b"));
        for _ in 0..3 {
            h.touch(a, 0.0, 1.0);
        }
        h.touch(b, 0.0, 1.0);
        assert_eq!(h.ranked(0.0, 0.0).first().unwrap().0, a);
        // One half-life later a has 1.5, b 0.5; five new execs of b overtake a.
        for _ in 0..5 {
            h.touch(b, 100.0, 1.0);
        }
        let r = h.ranked(100.0, 0.0);
        assert_eq!(r[0].0, b);
        assert!((r[1].1 - 1.5).abs() < 1e-9, "{r:?}");
        assert!((r[0].1 - 5.5).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn cold_files_are_forgotten() {
        let mut h = Heat::new(10);
        h.touch(Path::new("/a"), 0.0, 1.0);
        h.touch(Path::new("/b"), 95.0, 1.0);
        let gone = h.forget_colder_than(100.0, 0.01);
        assert_eq!(gone, vec![PathBuf::from("/a")]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_file_too_big_is_skipped_for_smaller_ones() {
        assert_eq!(within_budget(&[60, 50, 30, 10], 100), vec![0, 2, 3]);
        assert_eq!(within_budget(&[200], 100), Vec::<usize>::new());
        assert_eq!(within_budget(&[], 100), Vec::<usize>::new());
    }

    proptest! {
        #![proptest_config(ProptestConfig { rng_seed: proptest::test_runner::RngSeed::Fixed(15), ..ProptestConfig::default() })]
        #[test]
        fn the_budget_is_never_exceeded(sizes in proptest::collection::vec(0u64..1_000, 0..50), budget in 0u64..5_000) {
            let kept = within_budget(&sizes, budget);
            let total: u64 = kept.iter().map(|&i| sizes[i]).sum();
            prop_assert!(total <= budget);
            // Greedy: every skipped file was too big for what was left at its turn.
            let mut left = budget;
            for (i, &s) in sizes.iter().enumerate() {
                if kept.contains(&i) { left -= s } else { prop_assert!(s > left) }
            }
        }
    }
}

//! In which order evicted pages are read back. Reads are issued in this order from one
//! thread in the idle I/O class, so what is asked first is resident first: the packed hot
//! code of BOLT variants (see [`super::hot`]) of every kept file, hottest file first, then
//! the rest of every file's lost pages, hottest file first. Pure.

use std::ops::Range;

/// One kept file's lost pages, in rank order (hottest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Pages of its working set not resident now, as ascending runs.
    pub runs: Vec<Range<usize>>,
    /// Its packed hot code, if it has some.
    pub hot: Option<Range<usize>>,
}

/// The reads to issue, in order: (index into `files`, page runs of that file).
pub fn read_back_order(files: &[Lost]) -> Vec<(usize, Vec<Range<usize>>)> {
    let mut hot_first = Vec::new();
    let mut then = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (inside, outside) = match &f.hot {
            Some(hot) => split(&f.runs, hot),
            None => (Vec::new(), f.runs.clone()),
        };
        if !inside.is_empty() {
            hot_first.push((i, inside));
        }
        if !outside.is_empty() {
            then.push((i, outside));
        }
    }
    hot_first.extend(then);
    hot_first
}

/// `runs` cut into the parts inside `hot` and the parts outside it.
fn split(runs: &[Range<usize>], hot: &Range<usize>) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for r in runs {
        let (lo, hi) = (r.start.max(hot.start), r.end.min(hot.end));
        if lo < hi {
            if r.start < lo {
                outside.push(r.start..lo);
            }
            inside.push(lo..hi);
            if hi < r.end {
                outside.push(hi..r.end);
            }
        } else {
            outside.push(r.clone());
        }
    }
    (inside, outside)
}

#[cfg(test)]
// Lists of page runs: a list holding one run is meant, not a list of its pages.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_variants_hot_text_comes_before_everything_else() {
        let files = [
            // The hottest file: a library, no packed hot code.
            Lost { runs: vec![0..4, 10..12], hot: None },
            // A BOLT variant: its hot text is pages 100..110; it lost 2..3, 98..103, 108..120.
            Lost { runs: vec![2..3, 98..103, 108..120], hot: Some(100..110) },
            // Another variant whose lost pages are all cold.
            Lost { runs: vec![0..2], hot: Some(50..60) },
        ];
        assert_eq!(
            read_back_order(&files),
            vec![
                (1, vec![100..103, 108..110]),
                (0, vec![0..4, 10..12]),
                (1, vec![2..3, 98..100, 110..120]),
                (2, vec![0..2]),
            ]
        );
    }

    #[test]
    fn without_packed_hot_code_the_order_is_the_rank() {
        let files = [Lost { runs: vec![5..6], hot: None }, Lost { runs: vec![0..1], hot: None }];
        assert_eq!(read_back_order(&files), vec![(0, vec![5..6]), (1, vec![0..1])]);
        assert_eq!(read_back_order(&[]), vec![]);
    }

    /// Ascending, disjoint, non-empty runs below 200.
    fn runs() -> impl Strategy<Value = Vec<Range<usize>>> {
        proptest::collection::btree_set(0usize..200, 0..40).prop_map(|pages| {
            let mut out: Vec<Range<usize>> = Vec::new();
            for p in pages {
                match out.last_mut() {
                    Some(r) if r.end == p => r.end += 1,
                    _ => out.push(p..p + 1),
                }
            }
            out
        })
    }

    fn lost() -> impl Strategy<Value = Lost> {
        (runs(), proptest::option::of((0usize..200, 0usize..60)))
            .prop_map(|(runs, hot)| Lost { runs, hot: hot.map(|(s, n)| s..s + n) })
    }

    proptest! {
        #![proptest_config(ProptestConfig { rng_seed: proptest::test_runner::RngSeed::Fixed(15), ..ProptestConfig::default() })]
        #[test]
        fn every_lost_page_is_asked_once_and_hot_pages_first(files in proptest::collection::vec(lost(), 0..6)) {
            let plan = read_back_order(&files);
            let mut asked: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
            let mut seen_cold = false;
            let mut last_hot_file = None;
            for (i, runs) in &plan {
                let hot = files[*i].hot.clone();
                let is_hot = |p: usize| hot.as_ref().is_some_and(|h| h.contains(&p));
                let all_hot = runs.iter().flat_map(|r| r.clone()).all(is_hot);
                let none_hot = runs.iter().flat_map(|r| r.clone()).all(|p| !is_hot(p));
                prop_assert!(all_hot || none_hot, "a read mixes hot and cold pages: {plan:?}");
                if all_hot {
                    prop_assert!(!seen_cold, "hot pages after cold ones: {plan:?}");
                    prop_assert!(last_hot_file < Some(*i), "hot parts out of rank order: {plan:?}");
                    last_hot_file = Some(*i);
                } else {
                    seen_cold = true;
                }
                asked[*i].extend(runs.iter().flat_map(|r| r.clone()));
            }
            for (i, f) in files.iter().enumerate() {
                let mut want: Vec<usize> = f.runs.iter().flat_map(|r| r.clone()).collect();
                let mut got = asked[i].clone();
                want.sort_unstable();
                got.sort_unstable();
                prop_assert_eq!(want, got);
            }
        }
    }
}

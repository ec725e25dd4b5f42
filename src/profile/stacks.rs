//! The recent call stacks of the whole machine, in memory: what the sampling thread counted,
//! in one-minute buckets over a sliding window, for the flame graphs and heat maps of
//! `crate::observe`. Nothing here is persisted: the catalog keeps BOLT's profiles, this
//! keeps pictures of the last minutes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::attribute::StackSample;

/// Length of one bucket, seconds.
const BUCKET_SECS: i64 = 60;

/// At most this many (bucket, stack) entries are kept; the oldest buckets go first. About
/// 200 bytes each with their frames: some 40 MB at the very worst.
const ENTRIES_LIMIT: usize = 200_000;

#[derive(Debug, Default)]
struct Inner {
    /// (bucket start, stacks counted in it), oldest first.
    buckets: VecDeque<(i64, HashMap<StackSample, u64>)>,
    entries: usize,
}

/// A shared handle to the recent stacks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StackStore {
    inner: Arc<Mutex<Inner>>,
    window_secs: i64,
}

impl Default for StackStore {
    fn default() -> Self {
        Self::new(600)
    }
}

impl StackStore {
    /// Keeps the last `window_secs` (at least one bucket).
    pub fn new(window_secs: i64) -> Self {
        Self { inner: Arc::default(), window_secs: window_secs.max(BUCKET_SECS) }
    }

    pub fn window_secs(&self) -> i64 {
        self.window_secs
    }

    /// Adds the stacks counted up to `now` (unix seconds).
    pub fn add(&self, now: i64, stacks: HashMap<StackSample, u64>) {
        if stacks.is_empty() {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else { return };
        let bucket = now - now.rem_euclid(BUCKET_SECS);
        if inner.buckets.back().is_none_or(|(b, _)| *b != bucket) {
            inner.buckets.push_back((bucket, HashMap::new()));
        }
        let mut added = 0;
        if let Some((_, counts)) = inner.buckets.back_mut() {
            for (stack, n) in stacks {
                let e = counts.entry(stack).or_insert_with(|| {
                    added += 1;
                    0
                });
                *e += n;
            }
        }
        inner.entries += added;
        let oldest_kept = now - self.window_secs;
        while inner.buckets.len() > 1
            && (inner.entries > ENTRIES_LIMIT
                || inner.buckets.front().is_some_and(|(b, _)| *b + BUCKET_SECS <= oldest_kept))
        {
            if let Some((_, gone)) = inner.buckets.pop_front() {
                inner.entries -= gone.len();
            }
        }
    }

    /// The stacks of the window ending at `now`, summed over its buckets.
    pub fn recent(&self, now: i64) -> HashMap<StackSample, u64> {
        let Ok(inner) = self.inner.lock() else { return HashMap::new() };
        let oldest_kept = now - self.window_secs;
        let mut out: HashMap<StackSample, u64> = HashMap::new();
        for (bucket, counts) in &inner.buckets {
            if *bucket + BUCKET_SECS <= oldest_kept {
                continue;
            }
            for (stack, n) in counts {
                *out.entry(stack.clone()).or_default() += n;
            }
        }
        out
    }

    /// Distinct (bucket, stack) entries held now.
    pub fn entries(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::attribute::{Frame, StackOwner};

    fn stack(name: &str, off: u64) -> StackSample {
        StackSample {
            process: Arc::from(name),
            owner: StackOwner::Unknown,
            frames: vec![Frame::Own(off), Frame::Kernel],
        }
    }

    #[test]
    fn sums_over_the_window_and_forgets_older_buckets() {
        let store = StackStore::new(120);
        store.add(1_000, HashMap::from([(stack("a", 1), 2)]));
        store.add(1_030, HashMap::from([(stack("a", 1), 3), (stack("b", 2), 1)]));
        store.add(1_090, HashMap::from([(stack("a", 1), 1)]));
        let now = store.recent(1_100);
        assert_eq!(now[&stack("a", 1)], 6);
        assert_eq!(now[&stack("b", 2)], 1);
        // Three minutes later the first bucket (960..1020) is out of the 120 s window.
        store.add(1_200, HashMap::from([(stack("c", 3), 1)]));
        let later = store.recent(1_200);
        assert_eq!(later[&stack("a", 1)], 1, "only the 1080 bucket remains");
        assert!(!later.contains_key(&stack("b", 2)));
        assert_eq!(store.entries(), 2);
    }
}

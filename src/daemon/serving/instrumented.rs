//! Instrumentation mode's exec counts: how many execs got each instrumented variant this
//! server decided to serve. How big a share of execs such a variant gets is the policy's
//! decision (`crate::policy::instrumented`); this only counts, and marks a path for
//! re-derivation when a count crosses one of the budget's limits.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::lock;
use crate::profile::instrument::InstrumentationBudget;

/// Instrumentation mode's serving (`[profile] instrumentation = "on"`): a path whose policy
/// decision is the original, with no pin, and whose binary has a `ready` instrumented
/// variant, gets that variant for the share of execs `crate::policy::instrumented::share` says. Execs that
/// got it are counted here from the overlay's exec-time opens (in memory: a restarted
/// server starts counting again; the collected runs in the catalog still cap it).
#[derive(Default)]
pub(super) struct InstrServing {
    pub(super) budget: Option<InstrumentationBudget>,
    /// Execs served per instrumented variant id (those this process decided to serve).
    pub(super) served: Mutex<HashMap<i64, u64>>,
    /// Paths whose share changes (a count crossed a limit): re-derived on the next
    /// reconciliation tick.
    pub(super) recheck: Mutex<HashSet<PathBuf>>,
}

impl InstrServing {
    pub(super) fn budget(&self) -> Option<InstrumentationBudget> {
        self.budget
    }

    /// Counts an exec of `variant_id` if it is an instrumented variant being served.
    pub(super) fn on_exec(&self, original: &Path, variant_id: i64) {
        let Some(b) = self.budget() else { return };
        let mut served = lock(&self.served);
        let Some(n) = served.get_mut(&variant_id) else { return };
        *n += 1;
        if *n == b.first_runs || *n >= b.max_runs.saturating_mul(2) {
            lock(&self.recheck).insert(original.to_path_buf());
        }
    }
}

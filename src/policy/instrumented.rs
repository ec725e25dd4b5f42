//! Instrumentation mode's serving decision (`[profile] instrumentation = "on"`): the share of
//! execs a binary's instrumented variant (kind `instrumented`) gets. Such a variant is never
//! a canary and its runs are never compared (`VariantKind::is_policed`); it only collects an
//! exact profile, so it is served only where the policy serves the original and nothing is
//! pinned (a pin to the original means exactly the original), and only within the budget.

use crate::profile::instrument::InstrumentationBudget;

/// What the instrumented variant of a path's binary gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Instrumented {
    /// The policy's measured decision for the path is the original.
    pub policy_serves_original: bool,
    /// The path is pinned (to anything).
    pub pinned: bool,
    /// Execs this server gave the variant so far.
    pub served: u64,
    /// Instrumented runs whose profiles were merged into the catalog.
    pub collected: u64,
}

/// The share of execs the instrumented variant gets (0: none): every exec for the first N,
/// then 1 in K, and none once the profile is complete (`collected >= max_runs`) or twice
/// `max_runs` execs got it (runs that wrote no profile, killed or exec'ing something else,
/// are not retried forever); none at all where the policy serves a variant or a pin decides.
pub fn share(b: &InstrumentationBudget, at: Instrumented) -> f64 {
    if !at.policy_serves_original || at.pinned {
        return 0.0;
    }
    if at.collected >= b.max_runs || at.served >= b.max_runs.saturating_mul(2) {
        return 0.0;
    }
    if at.served < b.first_runs {
        1.0
    } else if b.then_one_in == 0 {
        0.0
    } else {
        1.0 / b.then_one_in as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(served: u64, collected: u64) -> Instrumented {
        Instrumented { policy_serves_original: true, pinned: false, served, collected }
    }

    #[test]
    fn first_n_then_one_in_k_until_complete() {
        let b = InstrumentationBudget { first_runs: 2, then_one_in: 4, max_runs: 5 };
        assert_eq!(share(&b, at(0, 0)), 1.0);
        assert_eq!(share(&b, at(1, 0)), 1.0);
        assert_eq!(share(&b, at(2, 0)), 0.25);
        assert_eq!(share(&b, at(9, 4)), 0.25);
        assert_eq!(share(&b, at(3, 5)), 0.0, "complete");
        assert_eq!(share(&b, at(10, 1)), 0.0, "twice the runs served, few written");
        let never_after = InstrumentationBudget { then_one_in: 0, ..b };
        assert_eq!(share(&never_after, at(2, 0)), 0.0);
    }

    #[test]
    fn only_where_the_policy_serves_the_original_and_nothing_is_pinned() {
        let b = InstrumentationBudget { first_runs: 2, then_one_in: 4, max_runs: 5 };
        let variant_served = Instrumented { policy_serves_original: false, ..at(0, 0) };
        assert_eq!(share(&b, variant_served), 0.0);
        assert_eq!(share(&b, Instrumented { pinned: true, ..at(0, 0) }), 0.0);
    }
}

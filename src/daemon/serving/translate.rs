//! The translation of a policy decision into a serving-table entry ([`translate`]), and the
//! check that a variant's store file is what the catalog says before it is served.

use std::path::PathBuf;

use anyhow::Context;

use crate::catalog::base::VariantRow;
use crate::fs::ServedVariant;
use crate::identity::FileKey;
use crate::policy::{ServeDecision, VariantState};

/// What the serving table gets for a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Original,
    /// The variant for a `share` of execs (0 < share <= 1), the original for the rest.
    Variant {
        variant: ServedVariant,
        share: f64,
        /// A second variant and its share (a challenger's canary: `variant` is the
        /// challenger, this the served variant); the original gets what both leave.
        second: Option<(ServedVariant, f64)>,
        /// One exec-time run in this many gets counters (1: every run); see
        /// [`sample_served_runs`].
        count_one_in: u32,
    },
}

/// Translates a policy decision for a path whose file has `key` (the key the catalog
/// recorded for the content the decision is about) into a serving-table entry. `variants`
/// are the rows of that content's variants. Without measurement a canary is not run; a
/// promoted variant then gets every exec (exploration runs would not be measured either).
pub fn translate(
    decision: ServeDecision,
    variants: &[VariantRow],
    key: FileKey,
    measuring: bool,
) -> Target {
    let (variant_id, share) = match decision {
        ServeDecision::Original => return Target::Original,
        ServeDecision::Variant(id) => (id, 1.0),
        ServeDecision::Split { variant_id, variant_share } => (variant_id, variant_share),
        ServeDecision::Challenge { served, challenger, challenger_share, original_share } => {
            return translate_challenge(
                variants,
                key,
                measuring,
                (served, 1.0 - challenger_share - original_share),
                (challenger, challenger_share),
            );
        }
    };
    let Some(row) = variants.iter().find(|v| v.id == variant_id) else {
        return Target::Original;
    };
    let share = match (measuring, row.state) {
        (true, _) => share,
        (false, VariantState::Canary | VariantState::Ready) if share < 1.0 => {
            return Target::Original;
        }
        (false, _) => 1.0,
    };
    if share.is_nan() || share <= 0.0 {
        return Target::Original;
    }
    Target::Variant {
        variant: served_variant(row, key),
        share: share.min(1.0),
        second: None,
        count_one_in: 1,
    }
}

fn served_variant(row: &VariantRow, key: FileKey) -> ServedVariant {
    ServedVariant {
        variant_id: row.id,
        path_in_store: PathBuf::from(&row.store_path),
        size: row.size,
        expected_original: key,
    }
}

/// A challenger's canary: the challenger and the served variant share the execs with the
/// original. Without measurement no canary runs: the served variant gets every exec. A
/// challenger whose row is gone leaves the served variant as a promoted one would be.
fn translate_challenge(
    variants: &[VariantRow],
    key: FileKey,
    measuring: bool,
    (served, served_share): (i64, f64),
    (challenger, challenger_share): (i64, f64),
) -> Target {
    let row = |id: i64| variants.iter().find(|v| v.id == id);
    let Some(served_row) = row(served) else { return Target::Original };
    let served_alone = |share: f64| Target::Variant {
        variant: served_variant(served_row, key),
        share,
        second: None,
        count_one_in: 1,
    };
    if !measuring {
        return served_alone(1.0);
    }
    match row(challenger) {
        Some(c) => Target::Variant {
            variant: served_variant(c, key),
            share: challenger_share,
            second: Some((served_variant(served_row, key), served_share)),
            count_one_in: 1,
        },
        None => served_alone(served_share + challenger_share),
    }
}

/// Counts one run in `one_in` of a variant the policy serves (promoted, alone with the
/// original's exploration share): its drift check and shown gain need only a sample, and
/// counters are most of what serving adds to an exec (docs/mount.md). Canaries, challengers
/// and instrumented variants keep counting every run: their decisions are made from them.
pub fn sample_served_runs(target: Target, variants: &[VariantRow], one_in: u32) -> Target {
    match target {
        Target::Variant { variant, share, second: None, .. }
            if variants
                .iter()
                .any(|r| r.id == variant.variant_id && r.state == VariantState::Served) =>
        {
            Target::Variant { variant, share, second: None, count_one_in: one_in.max(1) }
        }
        other => other,
    }
}

/// The overlay checks the size on every open (EIO on a mismatch): refuse to serve a store
/// file that is missing or not what the catalog says.
pub fn check_store_file(v: &ServedVariant) -> anyhow::Result<()> {
    let md = std::fs::metadata(&v.path_in_store)
        .with_context(|| format!("variant {} at {}", v.variant_id, v.path_in_store.display()))?;
    anyhow::ensure!(
        md.is_file() && md.len() == v.size,
        "variant {} at {} has {} bytes, the catalog says {}",
        v.variant_id,
        v.path_in_store.display(),
        md.len(),
        v.size
    );
    Ok(())
}

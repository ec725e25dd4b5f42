//! What the mount serves for one original path, from the user's controls and the variants
//! the catalog holds. Pure: the same inputs always give the same answer, so the status page
//! and the serving table can never disagree.

use crate::catalog::base::{ControlRow, VariantRow};

/// The serving decision for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The user excluded it: it reaches users as a link to the original, untouched.
    Excluded,
    /// Serve the original bytes.
    Original { why: String },
    /// Serve this variant.
    Variant { variant_id: i64, why: String },
}

impl Decision {
    pub fn served_label(&self) -> String {
        match self {
            Self::Excluded => "original (link)".into(),
            Self::Original { .. } => "original".into(),
            Self::Variant { variant_id, .. } => format!("variant {variant_id}"),
        }
    }

    pub fn why(&self) -> &str {
        match self {
            Self::Excluded => "excluded by the user",
            Self::Original { why } | Self::Variant { why, .. } => why,
        }
    }
}

/// States in which a variant may be served.
pub const SERVABLE_STATES: [&str; 2] = ["served", "canary"];

/// Decides from the user's control row and the variants of the path's *current* content
/// (variants of an older content never reach this function).
pub fn decide(control: Option<&ControlRow>, variants: &[VariantRow]) -> Decision {
    if control.is_some_and(|c| c.excluded) {
        return Decision::Excluded;
    }
    let newest_bolt = variants
        .iter()
        .filter(|v| v.kind == "bolt" && !matches!(v.state.as_str(), "quarantined" | "retired"))
        .max_by_key(|v| v.id);
    match control.and_then(|c| c.pin.as_deref()) {
        Some("original") => {
            return Decision::Original { why: "pinned to the original by the user".into() };
        }
        Some("bolted") => {
            return match newest_bolt {
                Some(v) => Decision::Variant {
                    variant_id: v.id,
                    why: "pinned to the optimized variant by the user".into(),
                },
                None => Decision::Original {
                    why: "pinned to the optimized variant, but none exists yet".into(),
                },
            };
        }
        _ => {}
    }
    match variants.iter().filter(|v| v.state == "served").max_by_key(|v| v.id) {
        Some(v) => Decision::Variant {
            variant_id: v.id,
            why: v.note.clone().unwrap_or_else(|| "measured faster than the original".into()),
        },
        None if variants.is_empty() => Decision::Original { why: "no variant yet".into() },
        None => Decision::Original { why: "no variant has been measured faster".into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(id: i64, kind: &str, state: &str) -> VariantRow {
        VariantRow {
            id,
            binary_id: 1,
            kind: kind.into(),
            sha256: String::new(),
            store_path: String::new(),
            size: 0,
            state: state.into(),
            bolt_version: None,
            flags: None,
            profile_samples: None,
            created_at: 0,
            note: None,
        }
    }

    fn control(pin: Option<&str>, excluded: bool) -> ControlRow {
        ControlRow { path: "/x".into(), pin: pin.map(String::from), excluded }
    }

    #[test]
    fn exclusion_beats_everything() {
        let vs = [variant(1, "bolt", "served")];
        assert_eq!(decide(Some(&control(Some("bolted"), true)), &vs), Decision::Excluded);
    }

    #[test]
    fn pins_win_over_measurements() {
        let vs = [variant(1, "bolt", "served"), variant(2, "bolt", "rejected")];
        assert!(matches!(
            decide(Some(&control(Some("original"), false)), &vs),
            Decision::Original { .. }
        ));
        assert_eq!(
            decide(Some(&control(Some("bolted"), false)), &vs),
            Decision::Variant {
                variant_id: 2,
                why: "pinned to the optimized variant by the user".into()
            }
        );
        let quarantined = [variant(3, "bolt", "quarantined")];
        assert!(matches!(
            decide(Some(&control(Some("bolted"), false)), &quarantined),
            Decision::Original { .. }
        ));
    }

    #[test]
    fn unpinned_serves_only_what_was_promoted() {
        assert!(matches!(decide(None, &[]), Decision::Original { .. }));
        assert!(matches!(decide(None, &[variant(1, "bolt", "ready")]), Decision::Original { .. }));
        assert!(matches!(
            decide(None, &[variant(1, "placed", "served")]),
            Decision::Variant { variant_id: 1, .. }
        ));
    }
}

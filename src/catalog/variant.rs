//! The closed vocabularies of the catalog: a variant's state and its kind (`variants`), and a
//! user's pin (`controls.pin`), as enums that SQLite stores as the same lowercase words it
//! always held (`ready`, `bolt`, `original`, ...), so the database needs no migration. A word the program does not know, read back
//! from SQLite, is an error naming the word and the column, not a silent default.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// Declares an enum of unit variants with one stored word each, and its text conversions
/// (`as_str`, `FromStr`, `Display`, SQLite's `ToSql`/`FromSql`); serde uses the same words.
macro_rules! stored_words {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word stored in SQLite and shown to users.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            /// The value stored as `word`, if it is one.
            pub fn parse(word: &str) -> Option<Self> {
                match word {
                    $($word => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(word: &str) -> Result<Self, UnknownWord> {
                Self::parse(word).ok_or_else(|| UnknownWord { what: $what, word: word.to_string() })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

stored_words! {
    /// A variant's state (`variants.state`): where it is in its life, as the policy and the
    /// subsystems that retire or quarantine variants set it.
    VariantState, "variant state" {
        /// Built and stored, not measured yet.
        Ready => "ready",
        /// Served to a share of the executions and measured against the original.
        Canary => "canary",
        /// Judged faster: served to every execution.
        Served => "served",
        /// Judged not faster (or failed to help): never served again.
        Rejected => "rejected",
        /// Crashed or vetoed: never served again.
        Quarantined => "quarantined",
        /// Replaced by a newer variant or dropped with its profile.
        Retired => "retired",
    }
}

stored_words! {
    /// How a variant was made (`variants.kind`).
    VariantKind, "variant kind" {
        /// An optimized build by `llvm-bolt` from a profile.
        Bolt => "bolt",
        /// A `llvm-bolt -instrument` build that only collects a profile.
        Instrumented => "instrumented",
        /// Put in place through the catalog's API (tests, benchmarks, by hand).
        Placed => "placed",
    }
}

impl VariantKind {
    /// Whether the policy judges and serves variants of this kind: BOLT builds and variants
    /// placed by hand, not the instrumented variants that only collect a profile (their
    /// serving is the instrumentation budget's, see `crate::policy::instrumented`).
    pub fn is_policed(self) -> bool {
        self != Self::Instrumented
    }
}

stored_words! {
    /// What a user's `pin` holds a path to (`controls.pin`; the control file's `pin NAME
    /// original|bolted`). The policy obeys it.
    Pin, "pin" {
        /// Always serve the original.
        Original => "original",
        /// Always serve the optimized variant, when there is one.
        Bolted => "bolted",
    }
}

/// A stored word that is not one of the vocabulary's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {word:?}")]
pub struct UnknownWord {
    pub what: &'static str,
    pub word: String,
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    #[test]
    fn every_word_round_trips_through_sqlite_as_the_same_text() -> anyhow::Result<()> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch("CREATE TABLE t (state TEXT NOT NULL, kind TEXT NOT NULL)")?;
        for (&state, &kind) in VariantState::ALL.iter().zip(VariantKind::ALL.iter().cycle()) {
            conn.execute("DELETE FROM t", [])?;
            conn.execute("INSERT INTO t VALUES (?1, ?2)", rusqlite::params![state, kind])?;
            let text: (String, String) =
                conn.query_row("SELECT state, kind FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
            assert_eq!(text, (state.as_str().to_string(), kind.as_str().to_string()));
            let back: (VariantState, VariantKind) =
                conn.query_row("SELECT state, kind FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
            assert_eq!(back, (state, kind));
            assert_eq!(serde_json::to_value(state)?, serde_json::json!(state.as_str()));
        }
        Ok(())
    }

    #[test]
    fn an_unknown_word_in_sqlite_is_an_error_that_names_it() -> anyhow::Result<()> {
        let conn = Connection::open_in_memory()?;
        let err = conn
            .query_row("SELECT 'promoted'", [], |r| r.get::<_, VariantState>(0))
            .expect_err("an unknown state must not read as a state");
        assert!(err.to_string().contains("unknown variant state \"promoted\""), "{err}");
        Ok(())
    }
}

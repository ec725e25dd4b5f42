//! Versioned schema migrations, applied in order inside one transaction each; the version
//! reached is kept in `PRAGMA user_version`.
//!
//! Each subsystem owns the SQL of its own tables and contributes it here under a version
//! number of its own; a released migration is never edited, only followed by a new one.

use anyhow::Context;
use rusqlite::Connection;

/// One step of the schema.
#[derive(Debug)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "base: binaries, paths, variants, controls, events",
        sql: super::base::SCHEMA,
    },
    Migration {
        version: 2,
        name: "profiles: sampled windows, functions, branches, instrumentation edges",
        sql: super::profiles::SCHEMA,
    },
    Migration {
        version: 3,
        name: "bolt_jobs: BOLT attempts per binary",
        sql: super::bolt_jobs::SCHEMA,
    },
    Migration {
        version: 4,
        name: "runs: measured runs, incidents, policy decisions",
        sql: super::runs::SCHEMA,
    },
    Migration {
        version: 5,
        name: "policy_decisions.profile_samples: the profile's size at each decision",
        sql: super::runs::SCHEMA_DECISION_SAMPLES,
    },
    Migration {
        version: 6,
        name: "host_use: the USE summary of the host, one a minute",
        sql: crate::observe::history::SCHEMA,
    },
    Migration {
        version: 7,
        name: "variants.profile_digest: the sha256 of the profile each variant was built from",
        sql: super::profile_digests::SCHEMA,
    },
    Migration {
        version: 8,
        name: "runs: page faults, context switches and the PMU's miss counters per run",
        sql: super::runs::SCHEMA_RUN_COUNTERS,
    },
    Migration {
        version: 9,
        name: "flag_trials: the flag search's outcome per binary and flag set",
        sql: super::flag_trials::SCHEMA,
    },
    Migration {
        version: 10,
        name: "runs.counted: whether a run had counters (a served variant's runs are sampled)",
        sql: super::runs::SCHEMA_RUN_COUNTED,
    },
];

pub(super) fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.version);
    anyhow::ensure!(
        current <= newest,
        "the catalog is at schema version {current}, newer than this optbin knows ({newest}); \
         it was written by a newer optbin"
    );
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql).with_context(|| format!("migration {} ({})", m.version, m.name))?;
        tx.pragma_update(None, "user_version", m.version)?;
        tx.commit()?;
        tracing::info!(version = m.version, name = m.name, "catalog migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase() {
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].version < w[1].version);
        }
    }
}

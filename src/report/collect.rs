//! The daemon side of the report: from the catalog to [`Report`], read-only.
//!
//! Every binary BOLT was tried on (a `bolt_jobs` row) or that has a variant the policy
//! judges (`bolt` or `placed`): per variant the BOLT version and flags it was built with,
//! the profile it came from, the CPU-time ratio on the machine's real runs (time-adjacent
//! pairs of the same command, the policy's statistics at 95%), the counters' medians per
//! run before and after, the policy's decision and how long after the binary's first run it
//! came, and the CPU time it saved while served.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension};

use super::{BinaryReport, CounterChange, Decision, FORMAT, ProfileSource, Report, VariantReport};
use crate::catalog::base::VariantState;
use crate::catalog::{base, bolt_jobs, runs};
use crate::measure::RunExit;
use crate::policy::stats::{median, normal_quantile, paired_compare};
use crate::policy::{PairBy, RunInput, cpu_saved_ns, pair_in_exec_order};

/// Runs of one binary the report looks at (the newest).
const RUNS_LOOKED_AT: u32 = 20_000;

/// Actions of the policy that end a variant's trial.
const VERDICTS: [&str; 3] = ["promote", "reject", "quarantine"];

/// The whole report, as of `now_ms`.
pub fn collect(conn: &Connection, now_ms: i64) -> anyhow::Result<Report> {
    let mut ids: BTreeSet<i64> = BTreeSet::new();
    {
        let mut stmt = conn.prepare(
            "SELECT binary_id FROM bolt_jobs
             UNION SELECT binary_id FROM variants WHERE kind != 'instrumented'",
        )?;
        for id in stmt.query_map([], |r| r.get::<_, i64>(0))? {
            ids.insert(id?);
        }
    }
    let mut binaries = Vec::new();
    for id in ids {
        if let Some(b) = binary(conn, id)? {
            binaries.push(b);
        }
    }
    super::sort(&mut binaries);
    Ok(Report {
        format: FORMAT,
        generated_at_ms: now_ms,
        hardware_counters: hardware_counters(),
        binaries,
    })
}

/// Whether this machine counts instructions and cycles for a process (`None`: yes).
fn hardware_counters() -> Option<String> {
    use crate::measure::counters::{Metric, probe};
    probe(&[Metric::Instructions, Metric::Cycles]).into_iter().find_map(|(_, why)| why)
}

fn binary(conn: &Connection, id: i64) -> anyhow::Result<Option<BinaryReport>> {
    let Some(row) = base::binary_by_id(conn, id)? else { return Ok(None) };
    let paths = runs::paths_of_binary(conn, id)?;
    let name = paths
        .first()
        .and_then(|p| std::path::Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut run_rows = runs::runs_of_binary(conn, id, RUNS_LOOKED_AT)?;
    // The report shows measurements: runs followed for their exit only have none.
    run_rows.retain(|r| r.counted);
    let first_run_ms = first_run_ms(conn, id)?;
    // The binary's first run, or when it was first seen if its runs have been rotated away.
    let start_ms = first_run_ms.map_or(row.first_seen * 1000, |r| r.min(row.first_seen * 1000));
    let decisions = runs::decisions_of(conn, id)?;
    let job = bolt_jobs::job_of(conn, id)?;
    let inputs: Vec<RunInput> = run_rows
        .iter()
        .map(|r| RunInput {
            id: r.id,
            variant_id: r.variant_id,
            cmd_hash: r.cmd_hash.clone(),
            cpu_ns: r.task_clock_ns,
            exit: r.exit,
        })
        .collect();
    let original_runs: Vec<&runs::RunRow> = run_rows
        .iter()
        .filter(|r| r.variant_id.is_none() && matches!(r.exit, RunExit::Exited(_)))
        .collect();
    let z = normal_quantile(0.975);
    let mut variants = Vec::new();
    for v in base::variants_of(conn, id)?.into_iter().filter(|v| v.kind.is_policed()) {
        let verdict = decisions
            .iter()
            .rev()
            .find(|d| d.variant_id == Some(v.id) && VERDICTS.contains(&d.action.as_str()));
        let decision = verdict.map(|d| Decision {
            action: d.action.clone(),
            at_ms: d.at_ms,
            detail: d.detail.clone(),
            secs_from_first_run: Some((d.at_ms - start_ms).max(0) as f64 / 1000.0),
        });
        let pairs = pair_in_exec_order(inputs.iter(), v.id, PairBy::Command);
        let real_runs = paired_compare(&pairs, z);
        let variant_runs: Vec<&runs::RunRow> = run_rows
            .iter()
            .filter(|r| r.variant_id == Some(v.id) && matches!(r.exit, RunExit::Exited(_)))
            .collect();
        let cpu_saved = if v.state == VariantState::Served {
            let from = decisions
                .iter()
                .rev()
                .find(|d| d.variant_id == Some(v.id) && d.action == "promote")
                .and_then(|d| d.first_run_id)
                .unwrap_or(0);
            real_runs.map_or(0, |c| {
                runs::variant_cpu_since(conn, v.id, from).map_or(0, |ns| cpu_saved_ns(ns, c.ratio))
            })
        } else {
            0
        };
        variants.push(VariantReport {
            id: v.id,
            kind: v.kind,
            state: v.state,
            bolt_version: v.bolt_version,
            flags: v.flags,
            profile_samples: v.profile_samples,
            built_at: v.created_at,
            size: v.size,
            decision,
            real_runs,
            counters: counter_changes(&original_runs, &variant_runs),
            cpu_saved_ns: cpu_saved,
            bench: Vec::new(),
        });
    }
    let cpu_saved_ns = variants.iter().map(|v| v.cpu_saved_ns).sum();
    Ok(Some(BinaryReport {
        name,
        paths,
        sha256: row.sha256,
        size: row.size,
        first_seen: row.first_seen,
        first_run_ms,
        profile: profile_source(conn, id)?,
        bolt: job.map(|j| super::BoltJob {
            attempts: j.attempts,
            last_outcome: j.last_outcome,
            bolt_version: j.bolt_version,
            flags: j.flags,
            wall_ms: j.wall_ms,
            gave_up: j.failed_until_change,
        }),
        variants,
        cpu_saved_ns,
    }))
}

/// The oldest run still in the catalog.
fn first_run_ms(conn: &Connection, id: i64) -> anyhow::Result<Option<i64>> {
    Ok(conn
        .query_row("SELECT MIN(at_ms) FROM runs WHERE binary_id = ?1", [id], |r| r.get(0))
        .optional()?
        .flatten())
}

/// Where the binary's profile comes from, and its size.
fn profile_source(conn: &Connection, id: i64) -> anyhow::Result<ProfileSource> {
    let instrumented: Option<i64> = conn
        .query_row("SELECT runs FROM instr_profiles WHERE binary_id = ?1", [id], |r| r.get(0))
        .optional()?;
    let event: Option<String> = conn
        .query_row("SELECT event FROM profile_binaries WHERE binary_id = ?1", [id], |r| r.get(0))
        .optional()?;
    let samples: i64 = conn.query_row(
        "SELECT COALESCE(SUM(own_samples), 0) FROM profile_windows WHERE binary_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let edges: i64 =
        conn.query_row("SELECT COUNT(*) FROM instr_edges WHERE binary_id = ?1", [id], |r| {
            r.get(0)
        })?;
    let source = match (instrumented, event.as_deref()) {
        (Some(runs), _) if runs > 0 && edges > 0 => "instrumentation",
        (_, Some(_)) if samples > 0 => "sampled",
        _ => "none",
    };
    Ok(ProfileSource {
        source: source.into(),
        event,
        samples: samples.max(0) as u64,
        instrumented_runs: instrumented.unwrap_or(0).max(0) as u64,
        edges: edges.max(0) as u64,
    })
}

/// A counter of a run: `None` when the run did not have it.
type Getter = fn(&runs::RunRow) -> Option<f64>;

/// What the report shows per run, in order: name, unit, how to read it from a run.
fn columns() -> Vec<(&'static str, &'static str, Getter)> {
    vec![
        ("cpu", "ns", |r| Some(r.task_clock_ns as f64)),
        ("wall", "ns", |r| Some(r.wall_ns as f64)),
        ("instructions", "count", |r| r.counts.instructions.map(|v| v as f64)),
        ("cycles", "count", |r| r.counts.cycles.map(|v| v as f64)),
        ("IPC", "ratio", |r| match (r.counts.instructions, r.counts.cycles) {
            (Some(i), Some(c)) if c > 0 => Some(i as f64 / c as f64),
            _ => None,
        }),
        ("page-faults", "count", |r| r.counts.page_faults.map(|v| v as f64)),
        ("context-switches", "count", |r| r.counts.context_switches.map(|v| v as f64)),
        ("branch-misses", "count", |r| r.counts.branch_misses.map(|v| v as f64)),
        ("L1-icache-load-misses", "count", |r| r.counts.l1i_misses.map(|v| v as f64)),
        ("iTLB-load-misses", "count", |r| r.counts.itlb_misses.map(|v| v as f64)),
        ("cache-misses", "count", |r| r.counts.cache_misses.map(|v| v as f64)),
    ]
}

/// The counters of `variant_id` against the original on the binary's newest `newest` runs
/// (normal exits only), as the report shows them; status shows them for the variant in play.
pub fn counters_of_variant(
    conn: &Connection,
    binary_id: i64,
    variant_id: i64,
    newest: u32,
) -> anyhow::Result<Vec<CounterChange>> {
    let rows = runs::runs_of_binary(conn, binary_id, newest)?;
    let arm = |v: Option<i64>| -> Vec<&runs::RunRow> {
        rows.iter().filter(|r| r.variant_id == v && matches!(r.exit, RunExit::Exited(_))).collect()
    };
    Ok(counter_changes(&arm(None), &arm(Some(variant_id))))
}

/// Medians per run of each counter for the original and the variant.
pub fn counter_changes(
    original: &[&runs::RunRow],
    variant: &[&runs::RunRow],
) -> Vec<CounterChange> {
    columns()
        .into_iter()
        .map(|(metric, unit, get)| {
            let mut o: Vec<f64> = original.iter().filter_map(|r| get(r)).collect();
            let mut v: Vec<f64> = variant.iter().filter_map(|r| get(r)).collect();
            let (runs_o, runs_v) = (o.len(), v.len());
            let (mo, mv) = (median(&mut o), median(&mut v));
            let unsupported = if original.is_empty() && variant.is_empty() {
                Some("no measured runs yet".to_string())
            } else if runs_o == 0 && runs_v == 0 {
                Some("not supported here (no run had this counter)".to_string())
            } else {
                None
            };
            CounterChange {
                metric: metric.into(),
                unit: unit.into(),
                original: mo,
                variant: mv,
                change_percent: match (mo, mv) {
                    (Some(a), Some(b)) if a > 0.0 => Some((b / a - 1.0) * 100.0),
                    _ => None,
                },
                original_runs: runs_o,
                variant_runs: runs_v,
                unsupported,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::base::VariantKind;
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    #[test]
    fn a_variant_faster_on_real_runs_has_its_ratio_counters_and_saving() {
        let catalog = Catalog::in_memory().unwrap();
        let report = catalog
            .run_blocking(|c| {
                let id = base::upsert_binary(c, &ContentId::of_bytes(b"lua"), 9, &ElfFacts::default(), 300)?;
                c.execute(
                    "INSERT INTO paths (path, binary_id, dev, ino, size, mtime_ns, ctime_ns, seen_at)
                     VALUES ('/usr/local/bin/lua', ?1, 1, 2, 9, 0, 0, 100)",
                    [id],
                )?;
                let v = base::insert_variant(
                    c,
                    &base::NewVariant {
                        binary_id: id,
                        kind: VariantKind::Bolt,
                        sha256: ContentId::of_bytes(b"lua-bolt").hex(),
                        store_path: "/store/x".into(),
                        size: 10,
                        state: VariantState::Served,
                        bolt_version: Some("19.1.7".into()),
                        flags: Some("-reorder-blocks=ext-tsp".into()),
                        profile_samples: Some(1234),
                        note: None,
                    },
                    200,
                )?;
                // Alternating original / variant runs of one command: the variant takes 90%.
                for i in 0..40i64 {
                    let (variant, ns) = if i % 2 == 0 { (None, 1_000_000) } else { (Some(v), 900_000) };
                    let ns = ns + (i % 7) * 1000;
                    c.execute(
                        "INSERT INTO runs (binary_id, path, variant_id, cmd_hash, task_clock_ns,
                                           wall_ns, exit_code, at_ms)
                         VALUES (?1, '/usr/local/bin/lua', ?2, 'h', ?3, ?3, 0, ?4)",
                        rusqlite::params![id, variant, ns, 300_000 + i],
                    )?;
                }
                runs::record_decision(
                    c,
                    &runs::DecisionRow {
                        at_ms: 400_000,
                        binary_id: id,
                        variant_id: Some(v),
                        action: "promote".into(),
                        from_state: Some(VariantState::Canary),
                        to_state: Some(VariantState::Served),
                        first_run_id: Some(1),
                        detail: "faster".into(),
                        profile_samples: None,
                    },
                )?;
                collect(c, 500_000)
            })
            .unwrap();
        assert_eq!(report.binaries.len(), 1);
        let b = &report.binaries[0];
        assert_eq!(b.name, "lua");
        let v = &b.variants[0];
        let r = v.real_runs.unwrap();
        assert!((r.ratio - 0.9).abs() < 0.01 && r.high < 1.0, "{r:?}");
        let d = v.decision.as_ref().unwrap();
        assert_eq!(d.action, "promote");
        // First seen and first run at 300 s, decision at 400 s.
        assert_eq!(d.secs_from_first_run, Some(100.0));
        assert!(v.cpu_saved_ns > 0);
        let cpu = v.counters.iter().find(|c| c.metric == "cpu").unwrap();
        assert!(cpu.change_percent.unwrap() < -5.0);
        // No run had instructions: said so, never a zero.
        let ipc = v.counters.iter().find(|c| c.metric == "IPC").unwrap();
        assert!(
            ipc.original.is_none() && ipc.unsupported.as_deref().unwrap().contains("not supported")
        );
    }
}

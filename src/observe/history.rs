//! USE history in the catalog: one summary per minute, kept a week (bounded in rows too),
//! so "how did the host look yesterday" has an answer (`optbin use --since 1d`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::host::{UseRow, UseSummary};

pub const SCHEMA: &str = "
CREATE TABLE host_use (
    at      INTEGER NOT NULL,   -- unix seconds at the end of the interval
    summary TEXT NOT NULL       -- the UseSummary as JSON
);
CREATE INDEX host_use_at ON host_use(at);
";

/// How long and how much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRetention {
    pub max_age_secs: i64,
    pub max_rows: i64,
}

impl Default for HistoryRetention {
    fn default() -> Self {
        // A week of one row a minute, ~1-2 KB each: some 15 MB at most.
        Self { max_age_secs: 7 * 86_400, max_rows: 7 * 1440 }
    }
}

pub fn record(conn: &Connection, summary: &UseSummary) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO host_use (at, summary) VALUES (?1, ?2)",
        params![summary.at, serde_json::to_string(summary)?],
    )?;
    Ok(())
}

/// Drops rows older than the retention or beyond its row count; returns how many went.
pub fn rotate(conn: &Connection, now: i64, keep: HistoryRetention) -> anyhow::Result<usize> {
    let old = conn.execute("DELETE FROM host_use WHERE at < ?1", [now - keep.max_age_secs])?;
    let extra = conn.execute(
        "DELETE FROM host_use WHERE rowid IN (SELECT rowid FROM host_use ORDER BY at DESC LIMIT -1 OFFSET ?1)",
        [keep.max_rows],
    )?;
    Ok(old + extra)
}

/// The summaries recorded at or after `since` (unix seconds), oldest first.
pub fn since(conn: &Connection, since: i64) -> anyhow::Result<Vec<UseSummary>> {
    let mut stmt = conn.prepare("SELECT summary FROM host_use WHERE at >= ?1 ORDER BY at")?;
    let rows = stmt.query_map([since], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for json in rows {
        // A row a newer optbin wrote differently is skipped, not fatal.
        if let Ok(s) = serde_json::from_str(&json?) {
            out.push(s);
        }
    }
    Ok(out)
}

/// One resource over a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeriodRow {
    pub resource: String,
    pub samples: usize,
    pub utilization_mean: Option<f64>,
    pub utilization_max: Option<f64>,
    pub saturation_kind: String,
    pub saturation_max: Option<f64>,
    pub errors: Option<u64>,
    /// Summaries in which the resource crossed a threshold, and the latest hint.
    pub hinted: usize,
    pub last_hint: Option<String>,
}

/// Mean and peak per resource over the summaries, in first-seen order.
pub fn aggregate(history: &[UseSummary]) -> Vec<PeriodRow> {
    let mut order: Vec<String> = Vec::new();
    let mut rows: BTreeMap<String, (PeriodRow, f64, usize)> = BTreeMap::new();
    for s in history {
        for r in &s.resources {
            let (row, util_sum, util_n) = rows.entry(r.resource.clone()).or_insert_with(|| {
                order.push(r.resource.clone());
                (PeriodRow { resource: r.resource.clone(), ..Default::default() }, 0.0, 0)
            });
            add(row, util_sum, util_n, r);
        }
    }
    order
        .into_iter()
        .filter_map(|name| rows.remove(&name))
        .map(|(mut row, sum, n)| {
            row.utilization_mean = (n > 0).then(|| sum / n as f64);
            row
        })
        .collect()
}

fn add(row: &mut PeriodRow, util_sum: &mut f64, util_n: &mut usize, r: &UseRow) {
    row.samples += 1;
    if let Some(u) = r.utilization {
        *util_sum += u;
        *util_n += 1;
        row.utilization_max = Some(row.utilization_max.map_or(u, |m: f64| m.max(u)));
    }
    if let Some(s) = r.saturation {
        row.saturation_max = Some(row.saturation_max.map_or(s, |m: f64| m.max(s)));
    }
    row.saturation_kind.clone_from(&r.saturation_kind);
    if let Some(e) = r.errors {
        row.errors = Some(row.errors.unwrap_or(0) + e);
    }
    if let Some(h) = &r.hint {
        row.hinted += 1;
        row.last_hint = Some(h.clone());
    }
}

/// The period table for people.
pub fn render_period(rows: &[PeriodRow], summaries: usize, from: i64, to: i64) -> String {
    let t = |s: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64),
        )
        .to_string()
    };
    let mut out = String::new();
    if summaries == 0 {
        let _ = writeln!(
            out,
            "no USE history since {} (the daemon records one summary a minute)",
            t(from)
        );
        return out;
    }
    let _ = writeln!(
        out,
        "host USE from {} to {} ({summaries} summaries, one a minute)",
        t(from),
        t(to)
    );
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0));
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>9} {:>14} {:<22} {:>7} {:>7}",
        "RESOURCE", "UTIL AVG", "UTIL MAX", "SATURATION MAX", "(AS)", "ERRORS", "HINTED"
    );
    for r in rows {
        let sat = match r.saturation_max {
            None => "-".to_string(),
            Some(s) if r.saturation_kind.starts_with("psi") => format!("{:.1}%", s * 100.0),
            Some(s) => format!("{s:.2}"),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9} {:>14} {:<22} {:>7} {:>7}",
            r.resource,
            pct(r.utilization_mean),
            pct(r.utilization_max),
            sat,
            r.saturation_kind,
            r.errors.map_or("-".into(), |e| e.to_string()),
            r.hinted
        );
    }
    for r in rows.iter().filter(|r| r.hinted > 0) {
        if let Some(h) = &r.last_hint {
            let _ = writeln!(out, "hint ({} of {} minutes): {h}", r.hinted, r.samples);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(at: i64, util: f64, hint: bool) -> UseSummary {
        UseSummary {
            at,
            interval_secs: 60.0,
            resources: vec![UseRow {
                resource: "cpu".into(),
                utilization: Some(util),
                saturation_kind: "psi some avg10".into(),
                saturation: Some(util / 2.0),
                errors: None,
                detail: String::new(),
                hint: hint.then(|| "CPU saturated".to_string()),
            }],
        }
    }

    #[test]
    fn records_rotates_and_aggregates() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for i in 0..10 {
            record(&conn, &summary(1_000 + i * 60, i as f64 / 10.0, i >= 8)).unwrap();
        }
        let keep = HistoryRetention { max_age_secs: 1_000, max_rows: 5 };
        assert_eq!(rotate(&conn, 1_000 + 9 * 60, keep).unwrap(), 5);
        let rows = since(&conn, 0).unwrap();
        assert_eq!(rows.first().unwrap().at, 1_000 + 5 * 60, "the newest five remain");
        let agg = aggregate(&rows);
        assert_eq!(agg.len(), 1);
        assert!((agg[0].utilization_mean.unwrap() - 0.7).abs() < 1e-9);
        assert_eq!(agg[0].utilization_max, Some(0.9));
        assert_eq!(agg[0].hinted, 2);
        let text = render_period(&agg, rows.len(), 0, 2_000);
        assert!(text.contains("hint (2 of 5 minutes): CPU saturated"), "{text}");
        assert_eq!(since(&conn, 1_000 + 9 * 60).unwrap().len(), 1);
    }
}

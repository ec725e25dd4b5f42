//! The report as text: a summary line, one table row per variant, then per binary the
//! details (BOLT, profile, decision, counters, benchmarks). Pure.

use std::fmt::Write;

use super::{BinaryReport, CounterChange, Report, VariantReport};
use crate::catalog::base::VariantState;
use crate::policy::stats::Comparison;

/// "0.963 [0.947..0.979] n=80", or "-" without a comparison.
pub fn ratio_cell(c: Option<&Comparison>) -> String {
    match c {
        None => "-".into(),
        Some(c) if !c.high.is_finite() || c.low <= 0.0 => {
            format!("{:.3} [unbounded] n={}", c.ratio, c.variant_runs)
        }
        Some(c) => format!("{:.3} [{:.3}..{:.3}] n={}", c.ratio, c.low, c.high, c.variant_runs),
    }
}

/// Seconds as "42 s", "26.5 min", "3.1 h".
pub fn duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

fn seconds_of_ns(ns: u64) -> String {
    format!("{:.1} s", ns as f64 / 1e9)
}

/// A counter's value in its unit.
fn value(v: f64, unit: &str) -> String {
    match unit {
        "ns" if v >= 1e9 => format!("{:.3} s", v / 1e9),
        "ns" if v >= 1e6 => format!("{:.2} ms", v / 1e6),
        "ns" => format!("{:.1} us", v / 1e3),
        "ratio" => format!("{v:.3}"),
        _ if v >= 1e9 => format!("{:.3} G", v / 1e9),
        _ if v >= 1e6 => format!("{:.3} M", v / 1e6),
        _ => format!("{v:.0}"),
    }
}

fn counter_line(c: &CounterChange) -> String {
    if let Some(why) = &c.unsupported {
        return why.clone();
    }
    let side = |v: Option<f64>| v.map_or_else(|| "no runs".to_string(), |v| value(v, &c.unit));
    let change = c.change_percent.map(|p| format!(" ({p:+.1}%)")).unwrap_or_default();
    format!(
        "{} -> {}{change}  (runs: {} original, {} variant)",
        side(c.original),
        side(c.variant),
        c.original_runs,
        c.variant_runs
    )
}

/// The counters a run has besides its times, in a few words each, for status:
/// `IPC 1.210 -> 1.340, page-faults 95 -> 80 (-15.8%)`. Counters without a figure on either
/// side are left out (status says once, for the machine, which ones it lacks); None when
/// none has one.
pub fn counters_brief(changes: &[CounterChange]) -> Option<String> {
    let parts: Vec<String> = changes
        .iter()
        .filter(|c| c.metric != "cpu" && c.metric != "wall" && c.unsupported.is_none())
        .filter_map(|c| {
            let (o, v) = (c.original?, c.variant?);
            let change = match c.change_percent {
                Some(p) if c.unit != "ratio" => format!(" ({p:+.1}%)"),
                _ => String::new(),
            };
            Some(format!("{} {} -> {}{change}", c.metric, value(o, &c.unit), value(v, &c.unit)))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn decided_cell(v: &VariantReport) -> String {
    match &v.decision {
        Some(d) => format!(
            "{} after {}",
            d.action,
            d.secs_from_first_run.map(duration).unwrap_or_else(|| "?".into())
        ),
        None => "-".into(),
    }
}

/// The whole report as text.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let served = report
        .binaries
        .iter()
        .filter(|b| b.variants.iter().any(|v| v.state == VariantState::Served))
        .count();
    let saved: u64 = report.binaries.iter().map(|b| b.cpu_saved_ns).sum();
    let _ = writeln!(
        out,
        "optbin report: {} binar{} BOLT was tried on, {served} served optimized, {} CPU time \
         saved",
        report.binaries.len(),
        if report.binaries.len() == 1 { "y" } else { "ies" },
        seconds_of_ns(saved)
    );
    let _ = writeln!(
        out,
        "hardware counters (IPC, i-cache, iTLB, branch misses): {}",
        match &report.hardware_counters {
            None => "counted".to_string(),
            Some(why) => why.clone(),
        }
    );
    if report.binaries.is_empty() {
        out.push_str("\nBOLT has not been tried on any binary yet.\n");
        return out;
    }
    out.push('\n');
    let header = [
        "BINARY",
        "VARIANT",
        "STATE",
        "REAL RUNS cpu [95%]",
        "BENCH cpu [95%]",
        "DECISION",
        "SAVED",
    ];
    let mut rows: Vec<[String; 7]> = Vec::new();
    for b in &report.binaries {
        if b.variants.is_empty() {
            let outcome =
                b.bolt.as_ref().map_or("-".into(), |j| format!("BOLT: {}", j.last_outcome));
            rows.push([
                b.name.clone(),
                "-".into(),
                outcome,
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for v in &b.variants {
            let bench = v.bench.last().map_or("-".to_string(), |j| {
                let cell = ratio_cell(j.cpu.as_ref());
                if j.outcome == "mismatch" { format!("{cell} MISMATCH") } else { cell }
            });
            rows.push([
                b.name.clone(),
                v.id.to_string(),
                v.state.to_string(),
                ratio_cell(v.real_runs.as_ref()),
                bench,
                decided_cell(v),
                seconds_of_ns(v.cpu_saved_ns),
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    for b in &report.binaries {
        out.push('\n');
        binary_details(&mut out, b);
    }
    out
}

fn binary_details(out: &mut String, b: &BinaryReport) {
    let _ = writeln!(out, "{} ({})", b.name, b.paths.join(", "));
    let p = &b.profile;
    let profile = match p.source.as_str() {
        "instrumentation" => format!(
            "instrumentation, {} run(s), {} edges (and {} samples)",
            p.instrumented_runs, p.edges, p.samples
        ),
        "sampled" => {
            format!("sampled ({}), {} samples", p.event.as_deref().unwrap_or("?"), p.samples)
        }
        _ => "none yet".into(),
    };
    let _ = writeln!(out, "  profile: {profile}");
    if let Some(j) = &b.bolt {
        let _ = writeln!(
            out,
            "  BOLT {}: {} attempt(s), last {}{}",
            j.bolt_version,
            j.attempts,
            j.last_outcome,
            if j.gave_up { " (gave up until the binary, BOLT or the profile changes)" } else { "" }
        );
    }
    for v in &b.variants {
        let built = match (&v.bolt_version, v.profile_samples) {
            (Some(b), Some(s)) => format!("BOLT {b}, built from {s} samples"),
            (Some(b), None) => format!("BOLT {b}"),
            (None, _) => "no BOLT record (placed by hand)".to_string(),
        };
        let _ = writeln!(out, "  variant {} ({}, {}): {built}", v.id, v.kind, v.state);
        if let Some(f) = &v.flags {
            let _ = writeln!(out, "    flags: {f}");
        }
        let _ = writeln!(
            out,
            "    real runs: {}",
            v.real_runs.map_or_else(
                || "no paired runs yet".to_string(),
                |c| format!("{}, {} pairs", c.describe(), c.variant_runs)
            )
        );
        if let Some(d) = &v.decision {
            let _ = writeln!(
                out,
                "    decision: {} {} after the first run: {}",
                d.action,
                d.secs_from_first_run.map(duration).unwrap_or_else(|| "?".into()),
                d.detail
            );
        }
        let _ = writeln!(out, "    counters, median per run (original -> variant):");
        for c in &v.counters {
            let _ = writeln!(out, "      {:<22} {}", c.metric, counter_line(c));
        }
        for j in &v.bench {
            let _ = writeln!(out, "    bench job {} ({} rounds, {}):", j.job, j.runs, j.outcome);
            for m in &j.metrics {
                let shown = match (&m.unsupported, &m.ratio) {
                    (Some(why), _) => why.clone(),
                    (None, Some(c)) => format!("{:.3} [{}]", c.ratio, c.describe_interval()),
                    (None, None) => "no ratio".into(),
                };
                let _ = writeln!(out, "      {:<22} {shown}", m.metric);
            }
        }
        if v.cpu_saved_ns > 0 {
            let _ = writeln!(out, "    CPU time saved: {}", seconds_of_ns(v.cpu_saved_ns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_and_durations() {
        assert_eq!(ratio_cell(None), "-");
        let c = Comparison {
            ratio: 0.9634,
            low: 0.947,
            high: 0.979,
            variant_runs: 80,
            original_runs: 80,
            commands: 1,
        };
        assert_eq!(ratio_cell(Some(&c)), "0.963 [0.947..0.979] n=80");
        assert_eq!(duration(42.0), "42 s");
        assert_eq!(duration(1590.0), "26.5 min");
        assert_eq!(value(12_100_000.0, "ns"), "12.10 ms");
    }

    #[test]
    fn an_empty_report_says_so() {
        let r = Report {
            format: super::super::FORMAT,
            generated_at_ms: 0,
            hardware_counters: Some("not supported here (no PMU event)".into()),
            binaries: vec![],
        };
        let t = text(&r);
        assert!(t.contains("0 binaries") && t.contains("not supported here"), "{t}");
    }
}

//! The benchmark report for people: a table of medians and ratios, counters the machine
//! lacks said once, and the output check; the job list.

use std::fmt::Write;

use crate::bench::BenchResult;
use crate::bench::analyze::{AGAINST, MetricResult, ORIGINAL};
use crate::bench::jobs::JobRow;
use crate::measure::RunExit;
use crate::policy::stats::Comparison;

/// A value of `unit` for people.
pub fn human(v: f64, unit: &str) -> String {
    match unit {
        "ns" if v >= 1e9 => format!("{:.3} s", v / 1e9),
        "ns" if v >= 1e6 => format!("{:.2} ms", v / 1e6),
        "ns" => format!("{:.1} us", v / 1e3),
        "KiB" => bytesize::ByteSize((v * 1024.0) as u64).display().iec().to_string(),
        _ if v >= 1e9 => format!("{:.2} G", v / 1e9),
        _ if v >= 1e6 => format!("{:.2} M", v / 1e6),
        _ if v >= 1e4 => format!("{:.1} k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

fn ratio_cell(c: &Option<Comparison>) -> (String, String) {
    match c {
        Some(c) => (format!("{:.3}", c.ratio), c.describe_interval()),
        None => ("-".into(), "-".into()),
    }
}

fn exit_text(e: RunExit) -> String {
    match e {
        RunExit::Exited(c) => format!("exit status {c}"),
        RunExit::Signaled(s) => format!("killed by signal {s}"),
    }
}

/// The whole report.
pub fn result_text(r: &BenchResult) -> String {
    let mut out = String::new();
    let job = r.job.map(|j| format!("job {j}: ")).unwrap_or_default();
    let _ = writeln!(
        out,
        "{job}optbin bench {} ({}) {}: {} rounds + {} warm-up, arms in random order per round",
        r.name,
        r.path,
        r.args.join(" "),
        r.runs,
        r.warmup
    );
    let arms: Vec<String> = r
        .arms
        .iter()
        .map(|a| format!("{} [{}]", a.label, &a.sha256[..12.min(a.sha256.len())]))
        .collect();
    let _ = writeln!(out, "arms: {}", arms.join(", "));
    let mut options = Vec::new();
    if let Some(cpu) = r.cpu {
        options.push(format!("pinned to CPU {cpu}"));
    }
    if r.drop_caches {
        options.push("page cache dropped before each run".into());
    }
    if !options.is_empty() {
        let _ = writeln!(out, "options: {}", options.join(", "));
    }
    let against = r.arms.get(AGAINST).map(|a| a.label.as_str()).unwrap_or("-");
    let aa = r.arms.len() > 2;
    let _ = writeln!(
        out,
        "\n{:<22} {:>12} {:>12} {:>7}  {:<32}{}",
        "metric",
        "original",
        truncate(against, 12),
        "ratio",
        "95% interval",
        if aa { "  A/A ratio (interval)" } else { "" }
    );
    let mut unsupported: Vec<(&str, &str)> = Vec::new();
    for m in &r.metrics {
        if let Some(why) = &m.unsupported {
            unsupported.push((&m.metric, why));
            continue;
        }
        let _ = writeln!(out, "{}", metric_line(m, aa));
    }
    // Counters the machine lacks: said once per reason, never shown as numbers.
    let mut reasons: Vec<&str> = unsupported.iter().map(|(_, w)| *w).collect();
    reasons.dedup();
    for why in reasons {
        let names: Vec<&str> =
            unsupported.iter().filter(|(_, w)| *w == why).map(|(n, _)| *n).collect();
        let _ = writeln!(out, "{}: {why}", names.join(", "));
    }
    let _ =
        writeln!(out, "ratios are {against} / original (below 1: {against} is faster or smaller)");
    if let Some(c) = &r.output {
        if c.mismatches.is_empty() {
            let _ = writeln!(
                out,
                "output: all {} runs gave the original's stdout (sha256 {}) and {}",
                c.runs_checked,
                &c.reference_stdout_sha256[..12],
                exit_text(c.reference_exit)
            );
        } else {
            let _ = writeln!(out, "{}", mismatch_alarm(r));
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n).collect() }
}

fn metric_line(m: &MetricResult, aa: bool) -> String {
    let med = |arm: usize| m.medians.get(arm).map(|&v| human(v, &m.unit)).unwrap_or_default();
    let (ratio, interval) = ratio_cell(&m.ratio);
    let mut line = format!(
        "{:<22} {:>12} {:>12} {:>7}  {:<32}",
        m.metric,
        med(ORIGINAL),
        med(AGAINST),
        ratio,
        interval
    );
    if aa {
        let (r, i) = ratio_cell(&m.aa);
        line.push_str(&format!("  {r} ({i})"));
    }
    line.trim_end().to_string()
}

/// The loud message for runs whose output differs from the original's.
pub fn mismatch_alarm(r: &BenchResult) -> String {
    let Some(c) = &r.output else { return String::new() };
    let mut out = String::new();
    if c.original_varies {
        let _ = writeln!(
            out,
            "OUTPUT DIFFERS, BUT THE ORIGINAL ITSELF GAVE DIFFERENT OUTPUTS: the program is not \
             deterministic with these arguments, so the check cannot tell a miscompile from that."
        );
    } else {
        let _ = writeln!(
            out,
            "!!! OUTPUT MISMATCH: {} of {} runs did not give the original's stdout and exit \
             status. A variant that changes a program's output is a MISCOMPILE: do not serve \
             it (`echo 'pin {} original' > <mount>/.optbin/control`) and report it.",
            c.mismatches.len(),
            c.runs_checked,
            r.name
        );
    }
    let _ = writeln!(
        out,
        "  original (round 1): {}, stdout sha256 {}: {:?}",
        exit_text(c.reference_exit),
        &c.reference_stdout_sha256[..12],
        c.reference_stdout_preview
    );
    for m in c.mismatches.iter().take(5) {
        let label = r.arms.get(m.arm).map(|a| a.label.as_str()).unwrap_or("?");
        let _ = writeln!(
            out,
            "  {label} (round {}): {}, stdout sha256 {}: {:?}",
            m.round + 1,
            exit_text(m.exit),
            &m.stdout_sha256[..12],
            m.stdout_preview
        );
    }
    if c.mismatches.len() > 5 {
        let _ = writeln!(out, "  ... and {} more", c.mismatches.len() - 5);
    }
    out.trim_end().to_string()
}

/// `--list`.
pub fn job_list(rows: &[JobRow]) -> String {
    if rows.is_empty() {
        return "no bench jobs\n".into();
    }
    let mut out = format!(
        "{:>4}  {:<20} {:<14} {:>5}  {:<9} summary\n",
        "job", "when (UTC)", "binary", "runs", "outcome"
    );
    for j in rows {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(j.created_at.max(0) as u64),
        )
        .to_string();
        let _ = writeln!(
            out,
            "{:>4}  {:<20} {:<14} {:>5}  {:<9} {}",
            j.id,
            when.trim_end_matches('Z').replace('T', " "),
            truncate(&j.name, 14),
            j.runs,
            j.outcome,
            j.summary
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_in_binary_units_and_times_in_their_scale() {
        assert_eq!(human(20_000.0, "KiB"), "19.5 MiB");
        assert_eq!(human(512.0, "KiB"), "512.0 KiB");
        assert_eq!(human(2.5e6, "ns"), "2.50 ms");
    }
}

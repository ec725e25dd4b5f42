//! The status report: what `.optbin/status` (for people) and `.optbin/status.json` (for
//! programs) show. The daemon fills a [`StatusReport`]; this module only renders it.

use std::fmt::Write as _;

use serde::Serialize;

use super::details::BinaryDetails;
use super::sections::MachineSections;
use crate::catalog::base::{ControlRow, EventRow, VariantRow};
use crate::elf::ElfFacts;

/// Everything the status files show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    pub version: String,
    pub mountpoint: String,
    pub state_dir: String,
    pub daemon: DaemonStatus,
    pub overlay: Vec<String>,
    pub overlay_skipped: Vec<String>,
    pub binaries: Vec<BinaryStatus>,
    pub controls: Vec<ControlRow>,
    /// Subsystem sections (profiler, optimizer, policy, ...), by subsystem name.
    pub subsystems: MachineSections,
    pub recent_events: Vec<EventRow>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub started_at: i64,
    /// How many times the serving process was restarted after a crash.
    pub server_restarts: u32,
}

/// One binary the mount has seen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BinaryStatus {
    /// The PATH-view name (`<mount>/bin/NAME`), when this path is the one PATH finds.
    pub name: String,
    pub path: String,
    pub sha256: Option<String>,
    pub build_id: Option<String>,
    pub size: u64,
    /// None until the background indexer has read the file.
    pub facts: Option<ElfFacts>,
    pub candidate: bool,
    /// Why it is or is not a candidate for BOLT.
    pub candidate_reason: String,
    /// `original` or `variant <id>`.
    pub served: String,
    pub served_reason: String,
    pub pin: Option<crate::policy::Pin>,
    pub excluded: bool,
    pub variants: Vec<VariantRow>,
    /// Subsystem details for this binary (profile, optimizer, policy), by subsystem name.
    pub details: BinaryDetails,
}

/// Renders the table a person reads.
pub fn render_text(r: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "optbin {} mounted at {} (server pid {}, restarts after crashes {})",
        r.version, r.mountpoint, r.daemon.pid, r.daemon.server_restarts
    );
    let _ = writeln!(out, "state: {}", r.state_dir);
    let _ = writeln!(out, "overlay: {}", r.overlay.join(" "));
    for s in &r.overlay_skipped {
        let _ = writeln!(out, "  skipped: {s}");
    }
    for (name, summary) in r.subsystems.summaries() {
        let _ = writeln!(out, "{name}: {summary}");
    }
    let candidates = r.binaries.iter().filter(|b| b.candidate).count();
    let in_stage =
        |stage: &str| r.binaries.iter().filter(|b| policy_stage(b) == Some(stage)).count();
    let _ = writeln!(
        out,
        "\nbinaries seen: {} ({} candidates, {} in canary, {} served optimized)",
        r.binaries.len(),
        candidates,
        in_stage("canary"),
        in_stage("serving_optimized"),
    );
    if !r.binaries.is_empty() {
        let rows: Vec<[String; 6]> = r
            .binaries
            .iter()
            .map(|b| {
                [
                    if b.name.is_empty() { "-".into() } else { one_line(&b.name) },
                    one_line(&b.path),
                    b.sha256
                        .as_deref()
                        .map_or("(hashing)".into(), |s| s[..12.min(s.len())].to_string()),
                    human_size(b.size),
                    b.facts.as_ref().map_or("(reading)".into(), facts_summary),
                    served_cell(b),
                ]
            })
            .collect();
        let mut lines =
            table(["NAME", "PATH", "SHA256", "SIZE", "ELF", "SERVED"], &rows).into_iter();
        let _ = writeln!(out, "{}", lines.next().unwrap_or_default());
        // One line per row (cells are single lines), each followed by its binary's reasons.
        for (line, b) in lines.zip(&r.binaries) {
            let _ = writeln!(out, "{line}");
            let _ = writeln!(
                out,
                "    {}: {}",
                if b.candidate { "candidate" } else { "not a candidate" },
                b.candidate_reason
            );
            // The policy's stage text may itself start with what is served.
            let reason = b
                .served_reason
                .strip_prefix(&format!("serving {}: ", b.served))
                .unwrap_or(&b.served_reason);
            let _ = writeln!(out, "    serving {}: {reason}", b.served);
            for (name, summary) in b.details.summaries() {
                // A subsystem that only repeats the verdict above adds nothing.
                if summary != b.candidate_reason && summary != b.served_reason {
                    let _ = writeln!(out, "    {name}: {summary}");
                }
            }
        }
    }
    if !r.controls.is_empty() {
        let _ = writeln!(out, "\npins and exclusions:");
        for c in &r.controls {
            let mut what = Vec::new();
            if let Some(p) = &c.pin {
                what.push(format!("pinned to {p}"));
            }
            if c.excluded {
                what.push("excluded".to_string());
            }
            let _ = writeln!(out, "  {}: {}", c.path, what.join(", "));
        }
    }
    if !r.recent_events.is_empty() {
        let _ = writeln!(out, "\nrecent events:");
        for e in &r.recent_events {
            let _ = writeln!(
                out,
                "  {} {} {}{}",
                utc_time(e.at),
                e.kind,
                e.path.as_deref().map(|p| format!("{p}: ")).unwrap_or_default(),
                e.detail
            );
        }
    }
    out
}

/// The binaries' table: columns left-aligned, two spaces apart, no borders, no trailing
/// blanks; the header line first, then one line per row.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> Vec<String> {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t.set_header(header);
    t.add_rows(rows.iter().map(|r| r.to_vec()));
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t.lines().map(|l| l.trim_end().to_string()).collect()
}

/// A file name on one table line: a newline in it (legal in a name) is shown escaped.
fn one_line(s: &str) -> String {
    s.replace('\n', "\\n")
}

/// `secs` since the epoch as UTC, to the second: `2026-11-22T09:40:52Z`.
fn utc_time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The policy's stage name of a binary (`canary`, `serving_optimized`, ...), when known.
fn policy_stage(b: &BinaryStatus) -> Option<&'static str> {
    Some(b.details.policy()?.stage.name())
}

fn served_cell(b: &BinaryStatus) -> String {
    let mut s = b.served.clone();
    if let Some(p) = &b.pin {
        let _ = write!(s, " (pinned {p})");
    }
    if b.excluded {
        s.push_str(" (excluded)");
    }
    s
}

/// `ELF pie symbols relocs .text 171K` or `stripped` and the like.
pub fn facts_summary(f: &ElfFacts) -> String {
    if !f.is_elf {
        return "not ELF".into();
    }
    if !f.x86_64 {
        return "ELF (not x86-64)".into();
    }
    let mut parts = vec![if f.pie { "pie" } else { "non-pie" }];
    parts.push(if f.has_symbols { "symbols" } else { "stripped" });
    parts.push(if f.has_relocs { "relocs" } else { "no-relocs" });
    if f.bolted {
        parts.push("bolted");
    }
    format!("{} .text {}", parts.join(","), human_size(f.text_size))
}

/// A size in binary units, as `ls -sh`: `512B`, `2.0K`, `98.0M`.
pub fn human_size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec_short().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shows_every_binary_with_reasons() {
        let report = StatusReport {
            version: "0.1.0".into(),
            mountpoint: "/opt/optbin".into(),
            overlay: vec!["/usr/bin".into()],
            binaries: vec![BinaryStatus {
                name: "lua".into(),
                path: "/usr/bin/lua".into(),
                sha256: Some("ab".repeat(32)),
                size: 470_000,
                facts: Some(ElfFacts {
                    is_elf: true,
                    x86_64: true,
                    pie: true,
                    has_symbols: true,
                    text_size: 175_000,
                    ..Default::default()
                }),
                candidate: true,
                candidate_reason: "relocation mode".into(),
                served: "original".into(),
                served_reason: "serving original: slower by 2.1% (interval 1.3%..2.9% slower)"
                    .into(),
                pin: Some(crate::policy::Pin::Original),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_text(&report);
        assert!(
            text.contains("binaries seen: 1 (1 candidates, 0 in canary, 0 served optimized)"),
            "{text}"
        );
        assert!(text.contains("/usr/bin/lua"));
        assert!(text.contains("abababababab"));
        assert!(text.contains("pie,symbols,no-relocs .text 170.9K"), "{text}");
        assert!(text.contains("original (pinned original)"));
        assert!(
            text.contains("    serving original: slower by 2.1% (interval 1.3%..2.9% slower)\n"),
            "{text}"
        );
        assert!(text.contains("candidate: relocation mode"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["binaries"][0]["name"], "lua");
        assert_eq!(json["binaries"][0]["details"], serde_json::json!({}));
    }

    #[test]
    fn event_times_read_as_utc() {
        assert_eq!(utc_time(1_795_340_452), "2026-11-22T09:40:52Z");
        assert_eq!(utc_time(-5), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(2048), "2.0K");
        assert_eq!(human_size(98 * 1024 * 1024), "98.0M");
        assert_eq!(human_size(3 << 40), "3.0T");
    }

    #[test]
    fn the_table_aligns_columns_two_spaces_apart() {
        let rows = [
            ["lua".to_string(), "/usr/bin/lua".into(), "original".into()],
            [one_line("a\nb"), one_line("/usr/bin/a\nb"), "variant 12".into()],
        ];
        let lines = table(["NAME", "PATH", "SERVED"], &rows);
        assert_eq!(
            lines,
            [
                "NAME  PATH           SERVED",
                "lua   /usr/bin/lua   original",
                "a\\nb  /usr/bin/a\\nb  variant 12",
            ]
        );
    }
}

//! `.optbin/report.html`: one self-contained page (inline SVG and CSS, nothing fetched)
//! with the status table, the machine's flame graph, each optimized binary's heat map and
//! measured gain, and the USE summary with its hints.

use std::fmt::Write as _;

use super::flame::xml_escape as esc;
use super::host::{UseSummary, saturation_text};
use crate::control::StatusReport;

/// One binary's section of the page.
pub struct BinarySection {
    pub name: String,
    pub gain: Option<String>,
    /// The heat map SVG (a document; its XML prolog is dropped when inlined).
    pub heatmap: String,
}

/// An SVG document's `<svg>` element, without the XML declaration and doctype, to inline
/// in HTML.
fn inline_svg(svg: &str) -> &str {
    svg.find("<svg").map_or("", |i| &svg[i..])
}

pub fn render(
    report: &StatusReport,
    flame_svg: &str,
    binaries: &[BinarySection],
    host: Option<&UseSummary>,
) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>optbin report</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222;background:#fff}}\
         table{{border-collapse:collapse;margin:8px 0 24px}}td,th{{border:1px solid #ccc;padding:4px 8px;\
         text-align:left;font-size:13px}}th{{background:#eef}}h2{{margin-top:32px}}\
         .hint{{color:#a40;font-weight:bold}}.figure{{overflow-x:auto;border:1px solid #ddd;padding:4px}}\
         </style></head><body>\n<h1>optbin report</h1>\n<p>optbin {} at {}, server pid {}</p>\n",
        esc(&report.version),
        esc(&report.mountpoint),
        report.daemon.pid
    );
    for (name, s) in report.subsystems.summaries() {
        let _ = writeln!(o, "<p><b>{}</b>: {}</p>", esc(name), esc(s));
    }

    o.push_str("<h2>Host: utilization, saturation, errors</h2>\n");
    match host {
        Some(h) => {
            o.push_str("<table id=\"use\"><tr><th>resource</th><th>utilization</th><th>saturation</th><th>measured as</th><th>errors</th><th>detail</th></tr>\n");
            for r in &h.resources {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&r.resource),
                    r.utilization.map_or("-".into(), |u| format!("{:.1}%", u * 100.0)),
                    esc(&saturation_text(r)),
                    esc(&r.saturation_kind),
                    r.errors.map_or("-".into(), |e| e.to_string()),
                    esc(&r.detail)
                );
            }
            o.push_str("</table>\n");
            for hint in h.resources.iter().filter_map(|r| r.hint.as_deref()) {
                let _ = writeln!(o, "<p class=\"hint\">{}</p>", esc(hint));
            }
        }
        None => o.push_str("<p>not measured yet</p>\n"),
    }

    o.push_str("<h2>Binaries</h2>\n<table id=\"status\"><tr><th>name</th><th>path</th><th>served</th><th>why</th><th>variants</th></tr>\n");
    for b in &report.binaries {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(if b.name.is_empty() { "-" } else { &b.name }),
            esc(&b.path),
            esc(&b.served),
            esc(&b.served_reason),
            b.variants
                .iter()
                .map(|v| format!("{} {}", v.id, v.state))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    o.push_str("</table>\n");

    let _ = write!(
        o,
        "<h2>Where the machine's CPU time goes</h2>\n<div class=\"figure\" id=\"flame\">{}</div>\n",
        inline_svg(flame_svg)
    );

    if !binaries.is_empty() {
        o.push_str("<h2>Code layout of optimized binaries</h2>\n");
    }
    for b in binaries {
        let _ = write!(
            o,
            "<h3>{}</h3>\n<p>{}</p>\n<div class=\"figure heatmap\">{}</div>\n",
            esc(&b.name),
            esc(b.gain.as_deref().unwrap_or("not measured yet")),
            inline_svg(&b.heatmap)
        );
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_inlines_the_figures_and_escapes_text() {
        let report = StatusReport { version: "1<2".into(), ..Default::default() };
        let html = render(
            &report,
            "<?xml version=\"1.0\"?>\n<!DOCTYPE svg>\n<svg id=\"f\"></svg>",
            &[BinarySection {
                name: "lua".into(),
                gain: Some("faster by 3%".into()),
                heatmap: "<svg/>".into(),
            }],
            None,
        );
        assert!(html.contains("<div class=\"figure\" id=\"flame\"><svg id=\"f\"></svg></div>"));
        assert!(!html.contains("<?xml"));
        assert!(html.contains("1&lt;2"));
        assert!(html.contains("faster by 3%"));
    }
}

//! Code layout heat maps: a binary's executable sections drawn as 4 KiB pages, coloured by
//! how many samples hit each, for the original and the served variant side by side. The
//! figure that shows what BOLT did is [`hot_pages`]: how few pages hold 90% of the samples
//! (BOLT packs hot code together, so a good variant needs fewer).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use object::{Object, ObjectSection, SectionKind};
use serde::{Deserialize, Serialize};

use super::flame::xml_escape;
use crate::profile::symbolize::Symbolizer;

pub const PAGE: u64 = 4096;
/// The share of samples [`hot_pages`] counts pages for.
pub const HOT_SHARE: f64 = 0.9;

/// An executable section: `[start, end)` virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSection {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// Samples on one page, and the function with the most of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageHeat {
    pub samples: u64,
    pub hottest: Option<String>,
}

/// One binary file's layout and where its samples fell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeatSide {
    pub label: String,
    pub sections: Vec<ExecSection>,
    /// Page number (vaddr / 4096) -> heat.
    pub pages: BTreeMap<u64, PageHeat>,
    pub samples: u64,
}

/// The heat map's numbers, also shown in `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeatFigures {
    pub original_samples: u64,
    /// 4 KiB pages holding 90% of the original's samples.
    pub original_hot_pages: usize,
    pub variant: Option<i64>,
    pub variant_samples: u64,
    pub variant_hot_pages: Option<usize>,
}

/// The executable regions of an ELF file: its executable sections, those sharing or
/// touching a page merged into one region named after all of them (`.init .plt .text`), so
/// every page is drawn once.
pub fn exec_sections(path: &Path) -> anyhow::Result<Vec<ExecSection>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only private mapping of a file optbin does not write.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let elf = object::File::parse(&*map).with_context(|| format!("parsing {}", path.display()))?;
    let sections = elf
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .filter(|s| s.size() > 0 && s.address() > 0)
        .map(|s| ExecSection {
            name: s.name().unwrap_or("?").to_string(),
            start: s.address(),
            end: s.address() + s.size(),
        })
        .collect();
    Ok(merge_by_page(sections))
}

/// Merges sections whose pages overlap or touch.
pub fn merge_by_page(mut sections: Vec<ExecSection>) -> Vec<ExecSection> {
    sections.sort_by_key(|s| s.start);
    let mut out: Vec<ExecSection> = Vec::new();
    for s in sections {
        match out.last_mut() {
            Some(last) if s.start / PAGE <= pages_of(last).0 + pages_of(last).1 => {
                last.end = last.end.max(s.end);
                last.name = format!("{} {}", last.name, s.name);
            }
            _ => out.push(s),
        }
    }
    out
}

/// A side of the heat map from sampled file offsets (`offset -> samples`) of the file whose
/// symbols and sections are given.
pub fn side(
    label: impl Into<String>,
    sections: Vec<ExecSection>,
    symbols: &Symbolizer,
    offsets: &HashMap<u64, u64>,
) -> HeatSide {
    let mut per_page: BTreeMap<u64, (u64, HashMap<String, u64>)> = BTreeMap::new();
    let mut samples = 0;
    for (&offset, &n) in offsets {
        let Some(vaddr) = symbols.offset_to_vaddr(offset) else { continue };
        samples += n;
        let page = per_page.entry(vaddr / PAGE).or_default();
        page.0 += n;
        let name = symbols.function_at(vaddr).map_or("?".to_string(), |(f, _)| f.to_string());
        *page.1.entry(name).or_default() += n;
    }
    let pages = per_page
        .into_iter()
        .map(|(p, (n, funcs))| {
            let hottest =
                funcs.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|f| f.0);
            (p, PageHeat { samples: n, hottest })
        })
        .collect();
    HeatSide { label: label.into(), sections, pages, samples }
}

/// How many pages, hottest first, hold `share` of the samples (0 without samples).
pub fn hot_pages(side: &HeatSide, share: f64) -> usize {
    let mut counts: Vec<u64> = side.pages.values().map(|p| p.samples).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let goal = (side.samples as f64 * share).ceil() as u64;
    let mut acc = 0;
    for (i, c) in counts.iter().enumerate() {
        acc += c;
        if acc >= goal {
            return i + 1;
        }
    }
    counts.len()
}

/// Cells per row of a section's grid, and the most cells a side draws.
const COLUMNS: u64 = 64;
const MAX_CELLS: u64 = 4096;
const CELL: u64 = 11;
const SIDE_WIDTH: u64 = COLUMNS * CELL + 40;

/// The heat map as SVG: the sides next to each other, each section a grid of pages.
pub fn render_svg(title: &str, sides: &[HeatSide]) -> String {
    let mut body = String::new();
    let mut height = 0;
    for (i, s) in sides.iter().enumerate() {
        let x0 = 20 + i as u64 * SIDE_WIDTH;
        let (part, h) = render_side(s, x0, 60);
        body.push_str(&part);
        height = height.max(h);
    }
    let width = 20 + SIDE_WIDTH * sides.len().max(1) as u64;
    let height = height + 40;
    let mut out = String::new();
    let _ = write!(
        out,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"#fdfdfd\"/>\
         <text x=\"20\" y=\"24\" font-size=\"16\">{}</text><text x=\"20\" y=\"42\" \
         font-size=\"11\" fill=\"#555\">each square is a 4 KiB page of executable code (or a \
         run of them, as labelled); colour: samples on it, grey none; hover for the \
         hottest function</text>{body}</svg>\n",
        xml_escape(title)
    );
    out
}

fn render_side(s: &HeatSide, x0: u64, y0: u64) -> (String, u64) {
    let mut out = String::new();
    let hot = hot_pages(s, HOT_SHARE);
    let total_pages: u64 = s.sections.iter().map(|sec| pages_of(sec).1).sum();
    let _ = write!(
        out,
        "<g class=\"heat-side\"><text x=\"{x0}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}</text>\
         <text x=\"{x0}\" y=\"{}\" font-size=\"12\" class=\"hot-pages\">{hot} of {total_pages} pages hold 90% of {} samples</text>",
        y0,
        xml_escape(&s.label),
        y0 + 16,
        s.samples
    );
    let max = s.pages.values().map(|p| p.samples).max().unwrap_or(0).max(1);
    let mut y = y0 + 30;
    for sec in &s.sections {
        let (first, count) = pages_of(sec);
        let group = count.div_ceil(MAX_CELLS).max(1);
        let cells = count.div_ceil(group);
        let _ = write!(
            out,
            "<text x=\"{x0}\" y=\"{}\" font-size=\"11\" fill=\"#333\">{} ({count} pages at {:#x}{})</text>",
            y + 10,
            xml_escape(&sec.name),
            sec.start,
            if group > 1 { format!(", {group} per square") } else { String::new() }
        );
        y += 16;
        for c in 0..cells {
            let lo = first + c * group;
            let hi = (lo + group).min(first + count);
            let (n, hottest) =
                s.pages.range(lo..hi).fold((0u64, None::<(&str, u64)>), |(n, h), (_, p)| {
                    let h = match (&p.hottest, h) {
                        (Some(f), Some((_, hn))) if p.samples > hn => Some((f.as_str(), p.samples)),
                        (Some(f), None) => Some((f.as_str(), p.samples)),
                        (_, h) => h,
                    };
                    (n + p.samples, h)
                });
            let cx = x0 + (c % COLUMNS) * CELL;
            let cy = y + (c / COLUMNS) * CELL;
            let share = if s.samples > 0 { n as f64 * 100.0 / s.samples as f64 } else { 0.0 };
            let _ = write!(
                out,
                "<rect x=\"{cx}\" y=\"{cy}\" width=\"{}\" height=\"{}\" fill=\"{}\"><title>page {:#x}: {n} samples ({share:.1}%){}</title></rect>",
                CELL - 1,
                CELL - 1,
                colour(n, max),
                lo * PAGE,
                hottest.map_or(String::new(), |(f, _)| format!(", hottest: {}", xml_escape(f)))
            );
        }
        y += cells.div_ceil(COLUMNS) * CELL + 8;
    }
    out.push_str("</g>");
    (out, y)
}

/// (first page, number of pages) a section spans.
fn pages_of(sec: &ExecSection) -> (u64, u64) {
    let first = sec.start / PAGE;
    let last = (sec.end.max(sec.start + 1) - 1) / PAGE;
    (first, last - first + 1)
}

/// Grey for none, then yellow to dark red on a log scale.
fn colour(n: u64, max: u64) -> String {
    if n == 0 {
        return "#e4e4e4".into();
    }
    let t = ((n as f64).ln_1p() / (max as f64).ln_1p()).clamp(0.0, 1.0);
    let r = 255.0 - 90.0 * t;
    let g = 220.0 * (1.0 - t);
    let b = 60.0 * (1.0 - t);
    format!("#{:02x}{:02x}{:02x}", r as u8, g as u8, b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::symbolize::{FunctionSymbol, LoadSegment};
    use std::sync::Arc;

    fn symbols() -> Symbolizer {
        Symbolizer::from_parts(
            vec![LoadSegment { offset: 0x1000, filesz: 0x4000, vaddr: 0x401000 }],
            vec![
                FunctionSymbol { start: 0x401000, end: 0x401100, name: Arc::from("hot") },
                FunctionSymbol { start: 0x403000, end: 0x403100, name: Arc::from("cold") },
            ],
        )
    }

    #[test]
    fn hot_pages_count_the_fewest_pages_holding_ninety_percent() {
        let sec = vec![ExecSection { name: ".text".into(), start: 0x401000, end: 0x405000 }];
        let offsets = HashMap::from([(0x1010, 90), (0x3010, 5), (0x2010, 5)]);
        let s = side("original", sec.clone(), &symbols(), &offsets);
        assert_eq!(s.samples, 100);
        assert_eq!(hot_pages(&s, 0.9), 1);
        assert_eq!(hot_pages(&s, 0.95), 2);
        assert_eq!(s.pages[&0x401].hottest.as_deref(), Some("hot"));
        let spread = side("v", sec, &symbols(), &HashMap::from([(0x1010, 40), (0x3010, 60)]));
        assert_eq!(hot_pages(&spread, 0.9), 2);
        let svg = render_svg("t", &[s, spread]);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert!(doc.descendants().any(|n| n.text().is_some_and(|t| t.contains("hottest: hot"))));
        assert_eq!(hot_pages(&HeatSide::default(), 0.9), 0);
    }

    #[test]
    fn sections_sharing_pages_are_drawn_once() {
        let sec = |name: &str, start: u64, end: u64| ExecSection { name: name.into(), start, end };
        let merged = merge_by_page(vec![
            sec(".text", 0x1060, 0x1d2d0),
            sec(".init", 0x1000, 0x1017),
            sec(".fini", 0x1d2dc, 0x1d2e9),
            sec(".text", 0x200000, 0x200140),
            sec(".text.cold", 0x200140, 0x200300),
        ]);
        assert_eq!(
            merged,
            vec![
                sec(".init .text .fini", 0x1000, 0x1d2e9),
                sec(".text .text.cold", 0x200000, 0x200300)
            ]
        );
    }
}

//! Flame graphs: sampled stacks -> folded lines (`root;...;leaf count`) -> SVG with the
//! `inferno` crate. Symbolization of the stacks' frames happens here too, with a cache of
//! parsed symbol tables keyed by the file's identity (an ELF parse, never a hash).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use inferno::flamegraph::{self, Options};

use crate::identity::FileKey;
use crate::profile::attribute::{Frame, StackOwner, StackSample};
use crate::profile::symbolize::Symbolizer;

/// Parsed symbol tables, by file identity. `None`: the file has no symbols (or is gone).
#[derive(Default)]
pub struct SymbolCache {
    by_key: HashMap<FileKey, Option<Arc<Symbolizer>>>,
}

/// At most this many files' symbol tables stay parsed.
const SYMBOL_CACHE_LIMIT: usize = 256;

impl SymbolCache {
    /// The symbols of the file at `path` now; when `expected` is given, only if the file
    /// there is still that (dev, ino).
    pub fn get(&mut self, path: &Path, expected: Option<(u64, u64)>) -> Option<Arc<Symbolizer>> {
        let key = FileKey::of(path).ok()?;
        if expected.is_some_and(|e| e != (key.dev, key.ino)) {
            return None;
        }
        if self.by_key.len() >= SYMBOL_CACHE_LIMIT {
            self.by_key.clear();
        }
        self.by_key
            .entry(key)
            .or_insert_with(|| Symbolizer::from_file(path).ok().and_then(Result::ok).map(Arc::new))
            .clone()
    }
}

/// Where the code of a stack's own frames is, to symbolize them.
pub fn owner_file(
    owner: &StackOwner,
    variants: &HashMap<i64, PathBuf>,
) -> Option<(PathBuf, Option<(u64, u64)>)> {
    match owner {
        StackOwner::Original(f) => Some((f.path.clone(), f.mapped)),
        StackOwner::Variant { variant: Some(id), .. } => {
            variants.get(id).map(|p| (p.clone(), None))
        }
        StackOwner::Other(path) => Some((path.to_path_buf(), None)),
        _ => None,
    }
}

/// A frame's name in a flame graph. Folded lines split on `;` and the last space, so `;`
/// in a name is replaced.
pub fn frame_name(frame: &Frame, process: &str, symbols: Option<&Symbolizer>) -> String {
    let name = match frame {
        Frame::Own(offset) => match symbols.and_then(|s| s.symbolize_offset(*offset)) {
            Some((name, _)) => name.to_string(),
            None => format!("[{process}]"),
        },
        Frame::Object(name) => format!("[{name}]"),
        Frame::Kernel => "[kernel]".into(),
        Frame::Unknown => "[unknown]".into(),
    };
    name.replace(';', ":")
}

/// The folded line of one stack, root first: `prefix;root;...;leaf`.
pub fn fold(stack: &StackSample, prefix: Option<&str>, symbols: Option<&Symbolizer>) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(stack.frames.len() + 1);
    if let Some(p) = prefix {
        parts.push(p.replace(';', ":"));
    }
    parts.extend(stack.frames.iter().rev().map(|f| frame_name(f, &stack.process, symbols)));
    parts.join(";")
}

/// Sums folded lines (`line -> count`), sorted.
pub fn folded_lines(counts: HashMap<String, u64>) -> Vec<String> {
    let mut lines: Vec<String> = counts.into_iter().map(|(s, n)| format!("{s} {n}")).collect();
    lines.sort();
    lines
}

/// How the stacks were unwound, for the graph's title: the share of samples with more than
/// one frame of the program's own code says whether frame pointers were there.
pub fn unwinding_note(stacks: &[(&StackSample, u64)]) -> String {
    let (mut deep, mut own) = (0u64, 0u64);
    for (s, n) in stacks {
        let own_frames = s.frames.iter().filter(|f| matches!(f, Frame::Own(_))).count();
        if own_frames > 0 {
            own += n;
            if own_frames > 1 {
                deep += n;
            }
        }
    }
    if own == 0 {
        return "stacks: kernel frame-pointer unwinding of user space".into();
    }
    let share = deep as f64 / own as f64;
    if share >= 0.5 {
        format!(
            "stacks: frame pointers ({:.0}% of samples unwound past their leaf function)",
            share * 100.0
        )
    } else {
        format!(
            "stacks: leaf only for most samples (only {:.0}% unwound: built without frame pointers)",
            share * 100.0
        )
    }
}

/// An SVG flame graph of `lines` (folded, `stack count`) as a document of its own: its
/// width follows the window it is opened in. An empty input gives a small SVG saying so,
/// not an error.
pub fn render(title: &str, subtitle: &str, lines: &[String]) -> anyhow::Result<Vec<u8>> {
    render_with_width(title, subtitle, lines, None)
}

/// Width of the flame graph inlined in `report.html`, in pixels.
pub const INLINE_WIDTH: usize = 1200;

/// As [`render`], for inlining in an HTML page: a fixed width in pixels. The fluid width of
/// a standalone graph comes from inferno's script removing the `width` and `viewBox`
/// attributes on load, which inside an HTML page leaves the `<svg>` at the default size of
/// a replaced element (300 pixels wide) and the graph squashed.
pub fn render_inline(title: &str, subtitle: &str, lines: &[String]) -> anyhow::Result<Vec<u8>> {
    render_with_width(title, subtitle, lines, Some(INLINE_WIDTH))
}

fn render_with_width(
    title: &str,
    subtitle: &str,
    lines: &[String],
    width: Option<usize>,
) -> anyhow::Result<Vec<u8>> {
    if lines.is_empty() {
        return Ok(empty_svg(title, "no samples in this window yet").into_bytes());
    }
    let mut opts = Options::default();
    opts.image_width = width;
    opts.title = title.to_string();
    opts.subtitle = Some(subtitle.to_string());
    opts.count_name = "samples".into();
    opts.deterministic = true;
    opts.hash = true;
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)
        .map_err(|e| anyhow::anyhow!("rendering the flame graph: {e}"))?;
    Ok(out)
}

/// inferno's differential graph of `after` against `before` (both folded), normalized to
/// the same total so only the shares of the workload compare: red grew, blue shrank.
pub fn render_diff(
    title: &str,
    subtitle: &str,
    before: &[String],
    after: &[String],
) -> anyhow::Result<Vec<u8>> {
    if before.is_empty() || after.is_empty() {
        return Ok(
            empty_svg(title, "needs samples of both the original and the variant").into_bytes()
        );
    }
    let mut joined = Vec::new();
    let opts = inferno::differential::Options { normalize: true, ..Default::default() };
    inferno::differential::from_readers(
        opts,
        before.join("\n").as_bytes(),
        after.join("\n").as_bytes(),
        &mut joined,
    )
    .map_err(|e| anyhow::anyhow!("joining the differential stacks: {e}"))?;
    let text = String::from_utf8_lossy(&joined).into_owned();
    render(title, subtitle, &text.lines().map(String::from).collect::<Vec<_>>())
}

/// A valid SVG with a title and one line of text.
pub fn empty_svg(title: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"800\" height=\"80\" viewBox=\"0 0 800 80\"><rect width=\"800\" height=\"80\" \
         fill=\"#f8f8f8\"/><text x=\"400\" y=\"30\" text-anchor=\"middle\" font-family=\"sans-serif\" \
         font-size=\"16\">{}</text><text x=\"400\" y=\"58\" text-anchor=\"middle\" \
         font-family=\"sans-serif\" font-size=\"13\" fill=\"#555\">{}</text></svg>\n",
        xml_escape(title),
        xml_escape(message)
    )
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// inferno's SVG has a DOCTYPE, which roxmltree refuses unless told.
    fn parse(text: &str) -> roxmltree::Document<'_> {
        let opts = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
        roxmltree::Document::parse_with_options(text, opts).unwrap()
    }

    fn stack(frames: Vec<Frame>) -> StackSample {
        StackSample { process: Arc::from("prog"), owner: StackOwner::Unknown, frames }
    }

    #[test]
    fn folds_root_first_with_names_for_every_kind_of_frame() {
        let s = stack(vec![Frame::Kernel, Frame::Object(Arc::from("libc.so.6")), Frame::Own(0x10)]);
        assert_eq!(fold(&s, Some("prog"), None), "prog;[prog];[libc.so.6];[kernel]");
    }

    #[test]
    fn renders_xml_with_the_frames_and_an_empty_graph_too() {
        let lines = vec!["p;main;hot 5".to_string(), "p;main;other;hot 3".to_string()];
        let svg = String::from_utf8(render("t", "sub", &lines).unwrap()).unwrap();
        let doc = parse(&svg);
        let titles: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("title"))
            .filter_map(|n| n.text())
            .collect();
        assert!(titles.iter().any(|t| t.starts_with("other")), "{titles:?}");
        let empty = String::from_utf8(render("t", "s", &[]).unwrap()).unwrap();
        parse(&empty);
        let diff = render_diff("d", "s", &lines, &["p;main;hot 9".to_string()]).unwrap();
        parse(std::str::from_utf8(&diff).unwrap());
    }

    #[test]
    fn the_inline_graph_has_a_fixed_width_and_the_standalone_one_a_fluid_width() {
        let lines = vec!["p;main;hot 10".to_string()];
        let svg_root = |bytes: Vec<u8>| {
            let text = String::from_utf8(bytes).unwrap();
            let start = text.find("<svg").unwrap();
            text[start..start + text[start..].find('>').unwrap()].to_string()
        };
        let inline = svg_root(render_inline("t", "s", &lines).unwrap());
        assert!(inline.contains(&format!("width=\"{INLINE_WIDTH}\"")), "{inline}");
        let standalone = String::from_utf8(render("t", "s", &lines).unwrap()).unwrap();
        assert!(standalone.contains("fluiddrawing = true"), "inferno's fluid mode");
        let inline_text = String::from_utf8(render_inline("t", "s", &lines).unwrap()).unwrap();
        assert!(inline_text.contains("fluiddrawing = false"), "no fluid mode inline");
    }

    #[test]
    fn the_unwinding_note_tells_frame_pointers_from_leaf_only() {
        let deep = stack(vec![Frame::Own(1), Frame::Own(2)]);
        let leaf = stack(vec![Frame::Own(1), Frame::Object(Arc::from("libc.so.6"))]);
        assert!(unwinding_note(&[(&deep, 9), (&leaf, 1)]).contains("frame pointers"));
        assert!(unwinding_note(&[(&deep, 1), (&leaf, 9)]).contains("leaf only"));
    }
}

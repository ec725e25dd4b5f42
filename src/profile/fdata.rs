//! BOLT's fdata profile format: writing sampled profiles (`no_lbr` or branch form) and
//! reading/merging instrumentation profiles by edge.
//!
//! Syntax (llvm-project bolt/docs/profiles.md, bolt/lib/Profile/DataReader.cpp, and
//! checked against llvm-bolt 19 and 22 by integration/profile.rs):
//! - no branches: first line `no_lbr <event>:`, then `1 <symbol> <offset hex> <count>`;
//! - branches: `1 <from sym> <from off hex> 1 <to sym> <to off hex> <mispreds> <count>`,
//!   which is also what an instrumented binary writes at exit.
//!
//! Symbol names must not contain spaces (BOLT splits on them); such functions are skipped.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::{Context, bail};

/// Writes a `no_lbr` profile; `samples` are (function, offset, count).
pub fn write_no_lbr(
    out: &mut impl Write,
    event: &str,
    samples: &[(String, u64, u64)],
) -> io::Result<()> {
    writeln!(out, "no_lbr {event}:")?;
    for (name, offset, count) in samples {
        if usable_name(name) && *count > 0 {
            writeln!(out, "1 {name} {offset:x} {count}")?;
        }
    }
    Ok(())
}

/// Writes a branch profile; `branches` are (from fn, from off, to fn, to off, mispreds,
/// count). UNTESTED with real branch stacks (no PMU on the dev VM); the syntax is the one
/// instrumentation files use, which is tested.
pub fn write_branches(
    out: &mut impl Write,
    branches: &[crate::catalog::profiles::BranchRow],
) -> io::Result<()> {
    for (from, from_off, to, to_off, mispreds, count) in branches {
        if usable_name(from) && usable_name(to) && *count > 0 {
            writeln!(out, "1 {from} {from_off:x} 1 {to} {to_off:x} {mispreds} {count}")?;
        }
    }
    Ok(())
}

fn usable_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace)
}

/// The largest count an edge holds: what the catalog stores (an SQLite integer). The files
/// come from a directory any user can write to, so a count is never trusted to fit.
pub const MAX_COUNT: u64 = i64::MAX as u64;

/// `a + b`, saturating at [`MAX_COUNT`] (a huge count must not wrap to a small or, in the
/// catalog, a negative one).
fn add_count(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(MAX_COUNT)
}

/// Edges of an instrumentation profile, summed: (from location, to location) ->
/// (mispredictions, count). A location is BOLT's `<is_sym> <name> <offset hex>` triple.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeProfile {
    pub edges: BTreeMap<(String, String), (u64, u64)>,
}

impl EdgeProfile {
    /// Adds every edge of one fdata text (an instrumented run's output).
    pub fn add_text(&mut self, text: &str) -> anyhow::Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with("boltedcollection") {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 8 {
                bail!("line {}: expected 8 fields of a branch profile, found {:?}", n + 1, line);
            }
            let parse = |s: &str| {
                s.parse::<u64>().with_context(|| format!("line {}: bad number {s:?}", n + 1))
            };
            let (mispreds, count) = (parse(fields[6])?, parse(fields[7])?);
            let from = fields[0..3].join(" ");
            let to = fields[3..6].join(" ");
            let e = self.edges.entry((from, to)).or_default();
            e.0 = add_count(e.0, mispreds);
            e.1 = add_count(e.1, count);
        }
        Ok(())
    }

    /// Merges fdata texts into one profile.
    pub fn merge<'a>(texts: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Self> {
        let mut p = Self::default();
        for t in texts {
            p.add_text(t)?;
        }
        Ok(p)
    }

    pub fn from_rows(rows: &[(String, String, u64, u64)]) -> Self {
        let mut p = Self::default();
        for (from, to, m, c) in rows {
            let e = p.edges.entry((from.clone(), to.clone())).or_default();
            e.0 = add_count(e.0, *m);
            e.1 = add_count(e.1, *c);
        }
        p
    }

    /// (from, to, mispreds, count) rows, for the catalog.
    pub fn rows(&self) -> Vec<(String, String, u64, u64)> {
        self.edges.iter().map(|((f, t), (m, c))| (f.clone(), t.clone(), *m, *c)).collect()
    }

    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        for ((from, to), (mispreds, count)) in &self.edges {
            writeln!(out, "{from} {to} {mispreds} {count}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_lbr_lines_are_hex_offsets_and_skip_unusable_names() {
        let mut out = Vec::new();
        let samples = vec![
            ("hot".to_string(), 0x1a, 900),
            ("has space".to_string(), 0, 5),
            ("cold".to_string(), 255, 0),
        ];
        write_no_lbr(&mut out, "cpu-clock", &samples).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "no_lbr cpu-clock:\n1 hot 1a 900\n");
    }

    #[test]
    fn branch_lines() {
        let mut out = Vec::new();
        write_branches(&mut out, &[("f".into(), 16, "g".into(), 0, 1, 7)]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "1 f 10 1 g 0 1 7\n");
    }

    #[test]
    fn instrumentation_profiles_merge_by_edge() {
        let a = "1 main e 1 main 10 0 1\n1 main 1b 1 strtoul@PLT 0 0 1\n";
        let b = "1 main e 1 main 10 0 2\n1 f 0 1 f 4 1 9\n";
        let p = EdgeProfile::merge([a, b]).unwrap();
        let mut out = Vec::new();
        p.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1 f 0 1 f 4 1 9\n1 main 1b 1 strtoul@PLT 0 0 1\n1 main e 1 main 10 0 3\n"
        );
        assert_eq!(EdgeProfile::from_rows(&p.rows()), p);
        assert!(EdgeProfile::merge(["no_lbr cpu-clock:\n"]).is_err());
        assert!(EdgeProfile::merge(["1 a 0 1 b 0 x 1\n"]).is_err());
    }
}

//! The values stored in Redis, version 1: JSON objects with a version field `v`, parsed
//! strictly (unknown fields, wrong types, bad symbols, counts that do not add up and
//! oversized values are refused with a reason). Everything read from Redis is untrusted.
//!
//! Writers trim a contribution to fit `max_value_bytes` by dropping its coldest entries.

use serde::{Deserialize, Serialize};

use super::keys::check_machine_id;
use crate::identity::ContentId;

/// The only value version this optbin reads and writes.
pub const VERSION: u32 = 1;
/// Longest symbol accepted (BOLT's fdata needs no whitespace in it).
const MAX_SYMBOL: usize = 1024;
/// Largest count accepted for one entry or total (guards sums against overflow).
const MAX_COUNT: u64 = 1 << 48;
/// Verdicts per machine and identity at most.
pub const MAX_VERDICTS: usize = 64;
/// Windows per contribution at most.
const MAX_WINDOWS: usize = 512;

/// The profile source of a contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Sampled without branch records (`no_lbr`), with this machine's event named in
    /// `event`: cpu-clock on a VM, cycles with a PMU.
    Samples,
    /// Sampled branch records (LBR): edges.
    BranchStacks,
    /// Exact edge counts from an instrumented binary.
    Instrumentation,
}

/// One machine's profile of one binary identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    pub v: u32,
    pub machine: String,
    /// sha256 of the original's content.
    pub content: String,
    /// GNU build-id, when the binary has one.
    pub build_id: Option<String>,
    pub source: Source,
    /// The sampling event of `samples` sources (`cpu-clock`, `cycles`).
    pub event: Option<String>,
    /// Own-text samples (or edge executions for edge sources).
    pub samples: u64,
    /// Samples the binary's processes spent outside its own text.
    pub outside: u64,
    pub runs: u64,
    /// The contributing machine's stability measure (profile::maturity), when known.
    pub stability: Option<f64>,
    pub updated_at: i64,
    /// (window start, own samples), for the age of the data.
    pub windows: Vec<(i64, u64)>,
    /// `samples` source: (function, offset, count).
    #[serde(default)]
    pub functions: Vec<(String, u64, u64)>,
    /// Edge sources: (from location, to location, mispredictions, count), a location being
    /// BOLT's `1 <symbol> <offset hex>`.
    #[serde(default)]
    pub edges: Vec<(String, String, u64, u64)>,
}

/// What became of one variant on one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Promoted,
    Rejected,
    Quarantined,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// sha256 of the variant's bytes.
    pub variant: String,
    pub outcome: Outcome,
    pub bolt_version: Option<String>,
    pub flags: Option<String>,
    /// Samples of the profile the variant was built from.
    pub profile_samples: Option<u64>,
    /// sha256 of the profile's bytes (fdata or YAML) the variant was built from; absent for
    /// variants recorded before optimizers kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_digest: Option<String>,
    /// The flag set it was built with (`default`, or a challenger's set of the flag
    /// search); absent for variants recorded before the flag search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag_set: Option<String>,
    /// The policy's reason (measured gain and interval, the crash).
    pub note: Option<String>,
    pub at: i64,
}

/// One machine's verdicts on the variants of one identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictList {
    pub v: u32,
    pub machine: String,
    pub content: String,
    pub verdicts: Vec<Verdict>,
}

/// Only the version, read before anything else so a newer format is named as such.
#[derive(Deserialize)]
struct Head {
    v: Option<u32>,
}

/// Refuses `bytes` unless it is a version-1 value of the expected shape, under the cap.
fn parse_value<T: serde::de::DeserializeOwned>(bytes: &[u8], cap: usize) -> Result<T, String> {
    if bytes.len() > cap {
        return Err(format!("oversized: {} bytes > the cap of {cap}", bytes.len()));
    }
    let head: Head =
        serde_json::from_slice(bytes).map_err(|e| format!("not a fleet value: {e}"))?;
    match head.v {
        Some(VERSION) => {}
        Some(v) => return Err(format!("wrong version {v} (this optbin reads {VERSION})")),
        None => return Err("no version field".into()),
    }
    serde_json::from_slice(bytes).map_err(|e| format!("malformed: {e}"))
}

fn check_symbol(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > MAX_SYMBOL
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("bad symbol {:?}", truncate(s, 40)));
    }
    Ok(())
}

/// `1 <symbol> <hex offset>` (`0 <address>` locations, outside any symbol, are useless
/// across machines and refused).
fn check_location(loc: &str) -> Result<(), String> {
    let parts: Vec<&str> = loc.split(' ').collect();
    match parts.as_slice() {
        ["1", sym, off] if check_symbol(sym).is_ok() && u64::from_str_radix(off, 16).is_ok() => {
            Ok(())
        }
        _ => Err(format!("bad edge location {:?}", truncate(loc, 60))),
    }
}

fn check_count(n: u64, what: &str) -> Result<(), String> {
    if n > MAX_COUNT { Err(format!("{what} {n} is implausibly large")) } else { Ok(()) }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl Contribution {
    /// Parses and checks a value read from the key of (`content`, `machine`).
    pub fn parse(
        bytes: &[u8],
        content: &ContentId,
        machine: &str,
        cap: usize,
    ) -> Result<Self, String> {
        let c: Contribution = parse_value(bytes, cap)?;
        c.check(content, machine)?;
        Ok(c)
    }

    fn check(&self, content: &ContentId, machine: &str) -> Result<(), String> {
        if self.machine != machine {
            return Err(format!("written for machine {:?} under {machine}'s key", self.machine));
        }
        if self.content != content.hex() {
            return Err("names another binary than its key".into());
        }
        check_machine_id(&self.machine)?;
        if let Some(b) = &self.build_id
            && (b.len() > 128 || !b.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err("bad build id".into());
        }
        check_count(self.samples, "samples")?;
        check_count(self.outside, "outside samples")?;
        check_count(self.runs, "runs")?;
        if let Some(s) = self.stability
            && !(s.is_finite() && (0.0..=1.0).contains(&s))
        {
            return Err(format!("stability {s} is not within 0..1"));
        }
        if self.windows.len() > MAX_WINDOWS {
            return Err(format!("{} windows > {MAX_WINDOWS}", self.windows.len()));
        }
        match self.source {
            Source::Samples => {
                if !self.edges.is_empty() {
                    return Err("a samples contribution carries edges".into());
                }
                match &self.event {
                    Some(e) if check_symbol(e).is_ok() && e.len() <= 64 => {}
                    _ => return Err("a samples contribution needs its event".into()),
                }
                let mut sum = 0u64;
                for (f, off, n) in &self.functions {
                    check_symbol(f)?;
                    check_count(*off, "offset")?;
                    check_count(*n, "count")?;
                    sum += n;
                }
                if sum > self.samples {
                    return Err(format!(
                        "its functions hold {sum} samples, more than its total {}",
                        self.samples
                    ));
                }
            }
            Source::BranchStacks | Source::Instrumentation => {
                if !self.functions.is_empty() {
                    return Err("an edge contribution carries function samples".into());
                }
                let mut sum = 0u64;
                for (from, to, mis, n) in &self.edges {
                    check_location(from)?;
                    check_location(to)?;
                    check_count(*mis, "mispredictions")?;
                    check_count(*n, "count")?;
                    sum += n;
                }
                if sum > self.samples {
                    return Err(format!(
                        "its edges hold {sum} executions, more than its total {}",
                        self.samples
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serializes within `cap` bytes, dropping the coldest entries if needed (the
    /// totals stay: they say how much data the machine has).
    pub fn encode(&self, cap: usize) -> Vec<u8> {
        let mut c = self.clone();
        let mut bytes = serde_json::to_vec(&c).expect("a contribution serializes");
        while bytes.len() > cap {
            let entries = c.functions.len() + c.edges.len();
            if entries == 0 {
                c.windows.clear();
                bytes = serde_json::to_vec(&c).expect("a contribution serializes");
                break;
            }
            // Keep a share proportional to what fits, and at least drop one.
            let keep = ((entries as f64 * cap as f64 / bytes.len() as f64 * 0.95) as usize)
                .min(entries - 1);
            c.functions.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
            c.functions.truncate(keep);
            c.edges.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
            c.edges.truncate(keep);
            bytes = serde_json::to_vec(&c).expect("a contribution serializes");
        }
        bytes
    }
}

impl VerdictList {
    pub fn parse(
        bytes: &[u8],
        content: &ContentId,
        machine: &str,
        cap: usize,
    ) -> Result<Self, String> {
        let list: VerdictList = parse_value(bytes, cap)?;
        if list.machine != machine {
            return Err(format!("written for machine {:?} under {machine}'s key", list.machine));
        }
        if list.content != content.hex() {
            return Err("names another binary than its key".into());
        }
        if list.verdicts.len() > MAX_VERDICTS {
            return Err(format!("{} verdicts > {MAX_VERDICTS}", list.verdicts.len()));
        }
        for v in &list.verdicts {
            if ContentId::parse(&v.variant).is_none() {
                return Err(format!("bad variant digest {:?}", truncate(&v.variant, 70)));
            }
            if let Some(p) = v.profile_digest.as_deref().filter(|p| ContentId::parse(p).is_none()) {
                return Err(format!("bad profile digest {:?}", truncate(p, 70)));
            }
            for text in [&v.bolt_version, &v.flags, &v.note, &v.flag_set].into_iter().flatten() {
                if text.len() > 1024 {
                    return Err("a verdict's text field is over 1024 bytes".into());
                }
            }
        }
        Ok(list)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("verdicts serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample(machine: &str, content: &ContentId, fns: &[(&str, u64, u64)]) -> Contribution {
        let total = fns.iter().map(|f| f.2).sum();
        Contribution {
            v: VERSION,
            machine: machine.into(),
            content: content.hex(),
            build_id: None,
            source: Source::Samples,
            event: Some("cpu-clock".into()),
            samples: total,
            outside: 0,
            runs: 1,
            stability: Some(0.9),
            updated_at: 1,
            windows: vec![(0, total)],
            functions: fns.iter().map(|(f, o, n)| (f.to_string(), *o, *n)).collect(),
            edges: vec![],
        }
    }

    #[test]
    fn a_value_round_trips() {
        let c = ContentId::of_bytes(b"bin");
        let v = sample("m1", &c, &[("main", 0x10, 5), ("f", 0, 3)]);
        let bytes = v.encode(1 << 20);
        assert_eq!(Contribution::parse(&bytes, &c, "m1", 1 << 20).unwrap(), v);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let c = ContentId::of_bytes(b"bin");
        let good = sample("m1", &c, &[("main", 0x10, 5)]);
        let reason = |bytes: &[u8]| Contribution::parse(bytes, &c, "m1", 4096).unwrap_err();
        assert!(reason(b"\x00\xffgarbage").starts_with("not a fleet value"));
        assert!(reason(b"{}").contains("no version"));
        let mut v2 = serde_json::to_value(&good).unwrap();
        v2["v"] = 2.into();
        assert!(reason(&serde_json::to_vec(&v2).unwrap()).contains("wrong version 2"));
        let mut extra = serde_json::to_value(&good).unwrap();
        extra["exec"] = "rm -rf /".into();
        assert!(reason(&serde_json::to_vec(&extra).unwrap()).contains("unknown field"));
        assert!(reason(&vec![b' '; 5000]).starts_with("oversized: 5000 bytes"));
        let other = Contribution::parse(&good.encode(4096), &c, "m2", 4096).unwrap_err();
        assert!(other.contains("under m2's key"), "{other}");
        let mut liar = good.clone();
        liar.samples = 1;
        assert!(reason(&liar.encode(4096)).contains("more than its total"));
        let mut spaced = good.clone();
        spaced.functions[0].0 = "a b".into();
        assert!(reason(&spaced.encode(4096)).contains("bad symbol"));
        let mut nan = good.clone();
        nan.stability = Some(7.0);
        assert!(reason(&nan.encode(4096)).contains("stability"));
        let wrong_binary =
            Contribution::parse(&good.encode(4096), &ContentId::of_bytes(b"o"), "m1", 4096);
        assert!(wrong_binary.unwrap_err().contains("another binary"));
    }

    #[test]
    fn encoding_trims_the_coldest_entries_to_the_cap() {
        let c = ContentId::of_bytes(b"big");
        let fns: Vec<(String, u64, u64)> =
            (0..2000).map(|i| (format!("function_{i}"), i, i + 1)).collect();
        let refs: Vec<(&str, u64, u64)> =
            fns.iter().map(|(f, o, n)| (f.as_str(), *o, *n)).collect();
        let v = sample("m1", &c, &refs);
        let bytes = v.encode(8192);
        assert!(bytes.len() <= 8192, "{}", bytes.len());
        let back = Contribution::parse(&bytes, &c, "m1", 8192).unwrap();
        assert!(back.functions.len() > 100 && back.functions.len() < 2000);
        let coldest_kept = back.functions.iter().map(|f| f.2).min().unwrap();
        assert!(coldest_kept > 2000 - back.functions.len() as u64, "hottest kept");
        assert_eq!(back.samples, v.samples, "the totals stay");
    }

    #[test]
    fn verdicts_are_checked() {
        let c = ContentId::of_bytes(b"bin");
        let list = VerdictList {
            v: VERSION,
            machine: "m1".into(),
            content: c.hex(),
            verdicts: vec![Verdict {
                variant: ContentId::of_bytes(b"var").hex(),
                outcome: Outcome::Quarantined,
                bolt_version: Some("19.1.7".into()),
                flags: None,
                profile_samples: Some(100),
                profile_digest: Some(ContentId::of_bytes(b"profile").hex()),
                flag_set: Some("default".into()),
                note: Some("crashed".into()),
                at: 5,
            }],
        };
        assert_eq!(VerdictList::parse(&list.encode(), &c, "m1", 4096).unwrap(), list);
        let mut bad = list.clone();
        bad.verdicts[0].variant = "zz".into();
        assert!(VerdictList::parse(&bad.encode(), &c, "m1", 4096).unwrap_err().contains("digest"));
        let mut bad = list.clone();
        bad.verdicts[0].profile_digest = Some("not hex".into());
        let why = VerdictList::parse(&bad.encode(), &c, "m1", 4096).unwrap_err();
        assert!(why.contains("bad profile digest"), "{why}");
        // A verdict from before the digest was kept still parses.
        let mut old = list.clone();
        old.verdicts[0].profile_digest = None;
        assert!(!String::from_utf8(old.encode()).unwrap().contains("profile_digest"));
        assert_eq!(VerdictList::parse(&old.encode(), &c, "m1", 4096).unwrap(), old);
    }
}

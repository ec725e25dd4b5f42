//! What the profiler shows in `.optbin/status(.json)`, and the profile files it offers under
//! `.optbin/bins/NAME/`.

use rusqlite::Connection;

use crate::catalog::profiles;
use crate::control::details::{BinaryDetails, Detail, ProfilerBinary};
use crate::control::sections::{DiskCaps, MachineSections, ProfilerMachine};
use crate::control::{BinFiles, SubsystemStatus};
use crate::profile::maturity::{MaturityThresholds, group};
use crate::profile::{ProfileSummary, ProfilerStatus, ProfilerStatusHandle};

/// The name of the profile file under `.optbin/bins/NAME/`.
pub const PROFILE_FILE: &str = "profile.fdata";

/// The `profiler` section of the status report.
pub struct ProfilerSection {
    pub enabled: bool,
    pub status: ProfilerStatusHandle,
    pub thresholds: MaturityThresholds,
    /// The disk caps of the profile tables, bytes (per binary, total).
    pub disk_caps: (u64, u64),
    /// Instrumentation mode: the instrumented runs a complete profile needs (None: off).
    pub instrumented_runs_needed: Option<u64>,
}

impl SubsystemStatus for ProfilerSection {
    fn name(&self) -> &'static str {
        "profiler"
    }

    fn section(&self, sections: &mut MachineSections) {
        let status = self.status.snapshot();
        sections.profiler = Some(ProfilerMachine {
            summary: machine_summary(self.enabled, &status),
            status,
            disk_caps: DiskCaps {
                per_binary_bytes: self.disk_caps.0,
                total_bytes: self.disk_caps.1,
            },
            enabled: self.enabled,
            thresholds: self.thresholds,
        });
    }

    fn binary(&self, conn: &Connection, binary_id: i64, details: &mut BinaryDetails) {
        let unreadable = |e| Some(Detail::unreadable("profile", &e));
        details.profiler = match has_any_profile(conn, binary_id) {
            Ok(false) => None,
            Ok(true) => match crate::profile::profile_summary(conn, binary_id, &self.thresholds) {
                Ok(s) => {
                    let mut summary = binary_summary(&s);
                    if let Some(needed) = self.instrumented_runs_needed {
                        summary = instrumented_progress(summary, s.instrumented_runs, needed);
                    }
                    Some(Detail::Read(ProfilerBinary {
                        profile: s,
                        instrumented_runs_needed: self.instrumented_runs_needed,
                        summary,
                    }))
                }
                Err(e) => unreadable(e),
            },
            Err(e) => unreadable(e),
        };
    }
}

/// Sampled (or refused) or instrumented: something to say about this binary.
fn has_any_profile(conn: &Connection, binary_id: i64) -> anyhow::Result<bool> {
    Ok(profiles::profile_head(conn, binary_id)?.is_some()
        || profiles::instrumented_runs(conn, binary_id)? > 0)
}

/// One line about sampling, e.g. `cpu-clock at 99 Hz (hardware cycles not supported
/// (ENOENT)); 12,345 samples (180/s), 0 lost, sampler CPU 0.4 s, disk 1.2 MB`.
pub fn machine_summary(enabled: bool, s: &ProfilerStatus) -> String {
    if !enabled {
        return "disabled by the config ([profile] enabled = false)".into();
    }
    let Some(source) = &s.source else {
        return match &s.error {
            Some(e) => format!("not sampling: {e}"),
            None => "starting".into(),
        };
    };
    let event = source.kind.event_name();
    // The reason starts with the event's own name ("cpu-clock: ..."): say it once.
    let why = source.reason.strip_prefix(&format!("{event}: ")).unwrap_or(&source.reason);
    let state = match (s.running, &s.error) {
        (true, _) => String::new(),
        (false, Some(e)) => format!("stopped ({e}); "),
        (false, None) => "stopped; ".into(),
    };
    format!(
        "{state}{event} at {} Hz ({why}); {} samples ({:.0}/s), {} lost, sampler CPU {:.1} s, disk {}",
        s.frequency_hz,
        group(s.samples),
        s.samples_per_sec,
        group(s.lost_records),
        s.sampler_cpu_secs,
        human_bytes(s.disk_bytes)
    )
}

/// One line about a binary's profile, e.g. `collecting 3,400/100,000 samples, 12 runs,
/// stable 0.91`, or why it gets none.
pub fn binary_summary(s: &ProfileSummary) -> String {
    if let Some(reason) = &s.refused {
        return format!("no profile: {reason}");
    }
    let mut text = s.maturity.progress.clone();
    if let Some((name, count)) = s.hot_functions.first()
        && s.own_samples > 0
    {
        text.push_str(&format!(
            "; hottest {name} {:.0}%",
            *count as f64 * 100.0 / s.own_samples as f64
        ));
    }
    if s.instrumented_runs > 0 {
        text.push_str(&format!("; {} instrumented runs", group(s.instrumented_runs)));
    }
    text
}

/// With instrumentation on, the runs say how far the instrumentation profile is:
/// `...; instrumented runs: 2/10` instead of `...; 2 instrumented runs`.
fn instrumented_progress(summary: String, runs: u64, needed: u64) -> String {
    let plain = format!("; {} instrumented runs", group(runs));
    let base = summary.strip_suffix(&plain).unwrap_or(&summary);
    format!("{base}; instrumented runs: {}/{}", group(runs), group(needed))
}

/// 1234567 -> "1.2 MB" (decimal units, as `df -H`).
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().si().to_string()
}

/// `profile.fdata` for every binary with a sampled profile.
pub struct ProfileFiles;

/// Whether `binary_id` has symbolized samples to write (not refused, not rotated away).
fn has_sampled_profile(conn: &Connection, binary_id: i64) -> anyhow::Result<bool> {
    let Some(head) = profiles::profile_head(conn, binary_id)? else { return Ok(false) };
    if head.refused.is_some() {
        return Ok(false);
    }
    let windows = profiles::windows(conn, binary_id)?;
    Ok(windows.iter().any(|w| w.own_samples > w.unsymbolized))
}

impl BinFiles for ProfileFiles {
    fn names(&self, conn: &Connection, binary_id: i64) -> Vec<String> {
        match has_sampled_profile(conn, binary_id) {
            Ok(true) => vec![PROFILE_FILE.to_string()],
            Ok(false) => Vec::new(),
            Err(e) => {
                tracing::warn!(binary_id, error = %format!("{e:#}"), "reading a profile head");
                Vec::new()
            }
        }
    }

    fn contents(
        &self,
        conn: &Connection,
        binary_id: i64,
        file: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        if file != PROFILE_FILE || !has_sampled_profile(conn, binary_id)? {
            return Ok(None);
        }
        let mut out = Vec::new();
        crate::profile::write_fdata(conn, binary_id, &mut out)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, base};
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;
    use crate::profile::source::{SourceChoice, SourceKind};

    #[test]
    fn byte_sizes_read_like_df() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_234_567), "1.2 MB");
        assert_eq!(human_bytes(5_000_000_000), "5.0 GB");
    }

    #[test]
    fn machine_summary_says_source_reason_rate_and_disk() {
        let mut s = ProfilerStatus { frequency_hz: 99, ..Default::default() };
        assert_eq!(machine_summary(true, &s), "starting");
        assert!(machine_summary(false, &s).starts_with("disabled"));
        s.error = Some("probing perf event sources: EACCES".into());
        assert_eq!(machine_summary(true, &s), "not sampling: probing perf event sources: EACCES");
        s.error = None;
        s.running = true;
        s.source = Some(SourceChoice {
            kind: SourceKind::CpuClock,
            include_kernel: true,
            reason: "cpu-clock: hardware cycles not supported (ENOENT)".into(),
        });
        s.samples = 12_345;
        s.samples_per_sec = 180.4;
        s.sampler_cpu_secs = 0.42;
        s.disk_bytes = 1_234_567;
        assert_eq!(
            machine_summary(true, &s),
            "cpu-clock at 99 Hz (hardware cycles not supported (ENOENT)); 12,345 samples \
             (180/s), 0 lost, sampler CPU 0.4 s, disk 1.2 MB"
        );
    }

    /// A catalog with one sampled binary, one refused, one never profiled.
    fn catalog() -> (Catalog, [i64; 3]) {
        let cat = Catalog::in_memory().unwrap();
        let ids = cat
            .run_blocking(|c| {
                let mut ids = [0; 3];
                for (i, name) in ["sampled", "stripped", "unknown"].iter().enumerate() {
                    let content = ContentId::of_bytes(name.as_bytes());
                    ids[i] = base::upsert_binary(c, &content, 1, &ElfFacts::default(), 0)?;
                }
                for (w, hot, cold) in [(0, 90, 10), (600, 85, 15)] {
                    let batch = profiles::WindowBatch {
                        samples: vec![("hot".into(), 0x10, hot), ("cold".into(), 0, cold)],
                        own_samples: 100,
                        outside_samples: 5,
                        new_runs: 2,
                        ..Default::default()
                    };
                    profiles::add_window(c, ids[0], w, "cpu-clock", &batch, 1)?;
                }
                profiles::mark_refused(c, ids[1], "cpu-clock", "stripped: no .symtab", 1)?;
                Ok(ids)
            })
            .unwrap();
        (cat, ids)
    }

    #[test]
    fn instrumented_progress_replaces_the_plain_count() {
        assert_eq!(
            instrumented_progress("collecting 5/9 samples; 2 instrumented runs".into(), 2, 10),
            "collecting 5/9 samples; instrumented runs: 2/10"
        );
        assert_eq!(instrumented_progress("x".into(), 0, 4), "x; instrumented runs: 0/4");
    }

    #[test]
    fn per_binary_summary_from_the_catalog() {
        use crate::control::subsystem::binary_json;
        let (cat, [sampled, stripped, unknown]) = catalog();
        let section = ProfilerSection {
            enabled: true,
            status: ProfilerStatusHandle::default(),
            thresholds: MaturityThresholds { min_samples: 150, min_runs: 3, min_stability: 0.8 },
            disk_caps: (1, 2),
            instrumented_runs_needed: None,
        };
        let (a, b, c) = cat
            .run_blocking(move |c| {
                Ok((
                    binary_json(&section, c, sampled),
                    binary_json(&section, c, stripped),
                    binary_json(&section, c, unknown),
                ))
            })
            .unwrap();
        let a = a.unwrap();
        assert_eq!(a["own_samples"], 200);
        assert_eq!(a["maturity"]["mature"], true);
        assert_eq!(a["summary"], "mature: 200 samples, 4 runs, stable 0.95; hottest hot 88%");
        assert_eq!(b.unwrap()["summary"], "no profile: stripped: no .symtab");
        assert_eq!(c, None, "nothing to say about a binary never sampled");
    }

    #[test]
    fn profile_file_only_for_sampled_binaries() {
        let (cat, [sampled, stripped, unknown]) = catalog();
        let (names, file, none, wrong) = cat
            .run_blocking(move |c| {
                let names: Vec<_> = [sampled, stripped, unknown]
                    .iter()
                    .map(|&id| ProfileFiles.names(c, id))
                    .collect();
                Ok((
                    names,
                    ProfileFiles.contents(c, sampled, PROFILE_FILE)?,
                    ProfileFiles.contents(c, stripped, PROFILE_FILE)?,
                    ProfileFiles.contents(c, sampled, "other")?,
                ))
            })
            .unwrap();
        assert_eq!(names, vec![vec![PROFILE_FILE], vec![], vec![]]);
        assert_eq!(
            String::from_utf8(file.unwrap()).unwrap(),
            "no_lbr cpu-clock:\n1 cold 0 25\n1 hot 10 175\n"
        );
        assert_eq!((none, wrong), (None, None));
    }
}

//! The "policy" section of the status report: whether runs are measured (and why not), what
//! became of them, the machine summary, and per binary the policy's stage, runs per
//! variant, measured gain and last incident.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::control::SubsystemStatus;
use crate::control::details::{
    BinaryDetails, CounterChanges, Detail, Gain, PathStage, PolicyBinary, RunCount,
};
use crate::control::sections::{
    DroppedRuns, MachineSections, MeasurementStatus, OrError, PolicyFigures, PolicyMachine,
};
use crate::policy::Stage;
use crate::policy::load::{
    BinaryStatus as PathStatus, RUNS_PER_BINARY, binary_status, machine_summary,
};
use crate::report::collect::counters_of_variant;
use crate::report::render::counters_brief;

/// The "policy" status section.
pub(super) struct PolicyStatus {
    pub(super) inner: Arc<Inner>,
    pub(super) native: Arc<crate::daemon::native_execs::NativeExecs>,
}

impl PolicyStatus {
    /// While an instrumented variant is served for `path` (instrumentation mode), says so:
    /// the policy's own stage would claim the original.
    fn instrumenting_reason(&self, path: &std::path::Path) -> Option<String> {
        let (variant, share) = self.inner.serving.served_share(path)?;
        let served = *super::lock(&self.inner.instr.served).get(&variant.variant_id)?;
        Some(format!(
            "instrumented variant {} for {:.0}% of execs (collecting its profile; {served} \
             execs got it so far)",
            variant.variant_id,
            share * 100.0
        ))
    }

    fn measurement(&self) -> (MeasurementStatus, String) {
        let m = &self.inner.measurement;
        let measured = m.measured.load(Ordering::Relaxed);
        let killed = m.killed.load(Ordering::Relaxed);
        let exit_only = m.exit_only.load(Ordering::Relaxed);
        let sampled = if exit_only > 0 {
            format!(
                ", of which {exit_only} without counters (a served variant's runs are counted \
                 one in {})",
                self.inner.config.served_count_one_in
            )
        } else {
            String::new()
        };
        let bound = self.inner.binder.as_ref().map(|b| b.status()).unwrap_or_default();
        let sampled = if bound.execs > 0 {
            format!(
                "{sampled}; {} runs of variants bind-mounted over their entry (no request; {} \
                 windows through the mount)",
                bound.execs, bound.windows
            )
        } else {
            sampled
        };
        let not_attached = m.not_attached.load(Ordering::Relaxed);
        let not_recorded = crate::measure::RUNS_NOT_RECORDED.load(Ordering::Relaxed);
        let (pending, dropped) = match &m.measurer {
            Some(x) => (x.pending(), x.dropped()),
            None => (0, Default::default()),
        };
        let hardware = m.measurer.as_ref().map(|x| x.hardware_counters()).unwrap_or_default();
        let counters = crate::measure::counters::counters_line(&hardware);
        let lost = not_attached + dropped.lost + dropped.unreadable + not_recorded;
        let text = match &m.off {
            None if not_recorded > 0 => format!(
                "measuring runs ({measured} measured since start{sampled}, {lost} lost, of which \
                 {not_recorded} measured but not recorded: the catalog could not store them, \
                 is the state directory full?)"
            ),
            None => {
                format!(
                    "measuring runs ({measured} measured since start{sampled}, {lost} lost); \
                     {counters}"
                )
            }
            Some(why) => format!("measurement off, no canaries ({why})"),
        };
        let status = MeasurementStatus {
            bound,
            counters,
            dropped: DroppedRuns {
                exec_failed: dropped.exec_failed,
                lost: dropped.lost,
                not_attached,
                not_recorded,
                unreadable: dropped.unreadable,
            },
            hardware_counters: hardware.iter().map(|h| h.name()).collect(),
            on: m.is_on(),
            pending,
            runs_killed_by_signal: killed,
            runs_measured: measured,
            runs_without_counters: exit_only,
            why_off: m.off.clone(),
        };
        (status, text)
    }
}

impl SubsystemStatus for PolicyStatus {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn section(&self, sections: &mut MachineSections) {
        let (measurement, measurement_text) = self.measurement();
        let (cfg, pipeline) = (self.inner.config.clone(), self.inner.pipeline());
        let machine = OrError::of(
            self.inner.catalog.run_blocking(move |c| machine_summary(c, &cfg, &*pipeline)).map(
                |s| PolicyFigures {
                    binaries_optimized: s.binaries_optimized,
                    cpu_saved_ns: s.cpu_saved_ns,
                },
            ),
        );
        let machine_text = match machine.read() {
            Some(s) => format!(
                "{} binar{} served optimized, {:.1} s CPU time saved",
                s.binaries_optimized,
                if s.binaries_optimized == 1 { "y" } else { "ies" },
                s.cpu_saved_ns as f64 / 1e9
            ),
            None => "summary unavailable".into(),
        };
        sections.policy = Some(PolicyMachine {
            config: self.inner.config.clone(),
            machine,
            measurement,
            summary: format!("{measurement_text}; {machine_text}"),
        });
    }

    fn binary(&self, conn: &rusqlite::Connection, binary_id: i64, details: &mut BinaryDetails) {
        details.policy =
            match binary_status(conn, binary_id, &self.inner.config, &*self.inner.pipeline()) {
                Ok(statuses) => self
                    .binary_detail(&statuses)
                    .map(|p| Detail::Read(with_counters(conn, binary_id, p))),
                Err(e) => Some(Detail::unreadable("policy status", &e)),
            };
    }

    fn served_reason(
        &self,
        conn: &rusqlite::Connection,
        binary_id: i64,
        path: &str,
    ) -> Option<String> {
        if let Some(text) = self.instrumenting_reason(std::path::Path::new(path)) {
            return Some(text);
        }
        let statuses =
            match binary_status(conn, binary_id, &self.inner.config, &*self.inner.pipeline()) {
                Ok(s) => s,
                Err(e) => return Some(format!("unknown: the catalog could not be read ({e:#})")),
            };
        let s = statuses.into_iter().find(|s| s.path == path)?;
        Some(self.stage_text(&s.stage, &s.stage_text))
    }
}

impl PolicyStatus {
    /// The policy's status of a binary, from the status of each of its paths.
    fn binary_detail(&self, statuses: &[PathStatus]) -> Option<PolicyBinary> {
        let first = statuses.first()?;
        let runs_text: Vec<String> = first
            .runs
            .iter()
            .map(|(v, n)| match v {
                None => format!("original: {n}"),
                Some(id) => format!("variant {id}: {n}"),
            })
            .collect();
        let stage_text = self.stage_text(&first.stage, &first.stage_text);
        let mut summary = stage_text.clone();
        if !runs_text.is_empty() {
            summary.push_str(&format!("; runs: {}", runs_text.join(", ")));
        }
        if let Some(i) = &first.last_incident {
            summary.push_str(&format!("; last incident: {i}"));
        }
        let native = self.native.count(std::path::Path::new(&first.path));
        if native > 0 {
            summary.push_str(&format!("; {native} execs run natively since start (not measured)"));
        }
        Some(PolicyBinary {
            counters: None,
            gain: first.gain.as_ref().map(Gain::from),
            last_incident: first.last_incident.clone(),
            native_execs: native,
            paths: statuses
                .iter()
                .map(|s| PathStage {
                    path: s.path.clone(),
                    stage_text: self.stage_text(&s.stage, &s.stage_text),
                })
                .collect(),
            runs: first.runs.iter().map(|&(variant, runs)| RunCount { runs, variant }).collect(),
            stage: first.stage.clone(),
            stage_text,
            summary,
        })
    }

    /// The policy's stage text, honest about canaries that do not run without measurement.
    fn stage_text(&self, stage: &Stage, text: &str) -> String {
        match (stage, &self.inner.measurement.off) {
            (Stage::Canary { .. }, Some(why)) => {
                format!("{text}; not run: measurement is off ({why})")
            }
            _ => text.to_string(),
        }
    }
}

/// The variant whose counters status sets against the original's: the one canaried,
/// served (during a challenge, the served one) or pinned.
fn variant_in_play(stage: &Stage) -> Option<i64> {
    match *stage {
        Stage::Canary { variant_id, .. } | Stage::ServingOptimized { variant_id, .. } => {
            Some(variant_id)
        }
        Stage::Challenge { served_id, .. } => Some(served_id),
        Stage::Pinned { variant_id, .. } => variant_id,
        _ => None,
    }
}

/// Adds the counters of the original and the variant in play (and their text to the
/// summary, after the gain); a catalog error leaves them out, with a warning.
fn with_counters(conn: &rusqlite::Connection, binary_id: i64, mut p: PolicyBinary) -> PolicyBinary {
    let Some(variant) = variant_in_play(&p.stage) else { return p };
    match counters_of_variant(conn, binary_id, variant, RUNS_PER_BINARY) {
        Ok(metrics) => {
            let text = counters_brief(&metrics);
            if let Some(t) = &text {
                p.summary
                    .push_str(&format!("; counters per run, original -> variant {variant}: {t}"));
            }
            p.counters = Some(CounterChanges { metrics, text, variant });
        }
        Err(e) => tracing::warn!(variant, error = %format!("{e:#}"), "reading runs for status"),
    }
    p
}

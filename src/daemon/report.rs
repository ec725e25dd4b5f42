//! Builds the status report from the catalog (one read transaction) plus what the running
//! daemon knows about itself and its subsystems.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::bolt::applicability::{Standing, candidacy, profile_numbers};
use crate::catalog::{Catalog, base};
use crate::config::Config;
use crate::control::details::BinaryDetails;
use crate::control::resolve::resolve_name;
use crate::control::status::{BinaryStatus, DaemonStatus, StatusReport};
use crate::control::{BinFiles, StatusSource, SubsystemStatus};
use crate::fs::ServingTable;
use crate::identity::FileKey;

pub struct Reporter {
    pub catalog: Catalog,
    pub config: Arc<Config>,
    pub started_at: i64,
    pub server_restarts: u32,
    pub subsystems: Vec<Arc<dyn SubsystemStatus>>,
    /// What the mount serves now (status shows it, not what the catalog would suggest).
    pub serving: Arc<ServingTable>,
    /// Per-binary read-only files under `.optbin/bins/` (e.g. the profile).
    pub bin_files: Option<Arc<dyn BinFiles>>,
}

impl StatusSource for Reporter {
    fn report(&self) -> anyhow::Result<StatusReport> {
        let subsystems = self.subsystems.clone();
        let rows = self.catalog.run_blocking(move |c| {
            let tx = c.transaction()?;
            let paths = base::all_paths(&tx)?;
            let controls = base::controls(&tx)?;
            let events = base::recent_events(&tx, 20)?;
            let mut binaries = HashMap::new();
            let mut variants = HashMap::new();
            let mut details = HashMap::new();
            let mut reasons = HashMap::new();
            let mut profiled = HashMap::new();
            for p in &paths {
                let Some(id) = p.binary_id else { continue };
                if let Some(r) = subsystems.iter().find_map(|s| s.served_reason(&tx, id, &p.path)) {
                    reasons.insert(p.path.clone(), r);
                }
                if binaries.contains_key(&id) {
                    continue;
                }
                if let Some(b) = base::binary_by_id(&tx, id)? {
                    binaries.insert(id, b);
                }
                variants.insert(id, base::variants_of(&tx, id)?);
                if let Some(numbers) = profile_numbers(&tx, id)? {
                    profiled.insert(id, numbers);
                }
                let mut d = BinaryDetails::default();
                for s in &subsystems {
                    s.binary(&tx, id, &mut d);
                }
                details.insert(id, d);
            }
            Ok((paths, controls, events, binaries, variants, details, profiled, reasons))
        })?;
        let (paths, controls, events, binaries, mut variants, mut details, profiled, mut reasons) =
            rows;
        let applicability = self.config.optimizer.applicability();
        let cfg = &self.config;
        let by_path: HashMap<&str, &base::ControlRow> =
            controls.iter().map(|c| (c.path.as_str(), c)).collect();
        let mut report = StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            mountpoint: cfg.mountpoint.display().to_string(),
            state_dir: cfg.state_dir.display().to_string(),
            daemon: DaemonStatus {
                pid: std::process::id(),
                started_at: self.started_at,
                server_restarts: self.server_restarts,
            },
            overlay: cfg.overlay.iter().map(|d| d.display().to_string()).collect(),
            overlay_skipped: cfg
                .overlay_skipped
                .iter()
                .map(|(d, why)| format!("{}: {why}", d.display()))
                .collect(),
            controls: controls.clone(),
            recent_events: events,
            ..Default::default()
        };
        for s in &self.subsystems {
            s.section(&mut report.subsystems);
        }
        for p in paths {
            let binary = p.binary_id.and_then(|id| binaries.get(&id));
            let vs = p.binary_id.and_then(|id| variants.remove(&id)).unwrap_or_default();
            let control = by_path.get(p.path.as_str()).copied();
            let excluded = control.is_some_and(|c| c.excluded);
            let (candidate, candidate_reason) = candidacy(
                Standing { excluded, permitted: cfg.permits(Path::new(&p.path)) },
                binary.map(|b| &b.facts),
                p.binary_id.and_then(|id| profiled.get(&id)),
                &applicability,
            );
            let served = served_label(&self.serving, Path::new(&p.path));
            let served_reason = if excluded {
                "excluded by the user".to_string()
            } else if !cfg.permits(Path::new(&p.path)) {
                "left alone by the allow/deny lists of the config".to_string()
            } else if let Some(r) = reasons.remove(&p.path) {
                r
            } else if p.binary_id.is_none() {
                "not indexed yet".to_string()
            } else {
                "no variant yet".to_string()
            };
            let name = Path::new(&p.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| {
                    resolve_name(n, &cfg.overlay, &cfg.mountpoint)
                        .is_ok_and(|r| r == Path::new(&p.path))
                })
                .unwrap_or_default();
            report.binaries.push(BinaryStatus {
                name,
                path: p.path.clone(),
                sha256: binary.map(|b| b.sha256.clone()),
                build_id: binary.and_then(|b| b.facts.build_id.clone()),
                size: p.key.size,
                facts: binary.map(|b| b.facts.clone()),
                candidate,
                candidate_reason,
                served,
                served_reason,
                pin: control.and_then(|c| c.pin),
                excluded,
                variants: vs,
                details: p.binary_id.and_then(|id| details.remove(&id)).unwrap_or_default(),
            });
        }
        Ok(report)
    }

    fn bin_files(&self) -> Vec<String> {
        let Some(files) = self.bin_files.clone() else { return Vec::new() };
        let cfg = self.config.clone();
        self.catalog
            .run_blocking(move |c| {
                let mut out = Vec::new();
                for p in base::all_paths(c)? {
                    let Some(id) = p.binary_id else { continue };
                    let Some(name) = path_view_name(&p.path, &cfg) else { continue };
                    for f in files.names(c, id) {
                        out.push(format!("{name}/{f}"));
                    }
                }
                Ok(out)
            })
            .unwrap_or_else(|e| {
                // The listing has no place for an error; the log has.
                tracing::warn!(error = %format!("{e:#}"), "listing .optbin/bins");
                Vec::new()
            })
    }

    fn bin_file(&self, relative: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(files) = self.bin_files.clone() else { return Ok(None) };
        let Some((name, file)) = relative.split_once('/') else { return Ok(None) };
        let Ok(path) = resolve_name(name, &self.config.overlay, &self.config.mountpoint) else {
            return Ok(None);
        };
        let file = file.to_string();
        let path = path.to_string_lossy().into_owned();
        self.catalog.run_blocking(move |c| {
            let Some(id) = base::path_row(c, &path)?.and_then(|p| p.binary_id) else {
                return Ok(None);
            };
            files.contents(c, id, &file)
        })
    }
}

/// What the serving table serves for `path` now: `original (link)` (excluded, or passed
/// through while it has no variant to serve: `served_reason` says which),
/// `original`, `variant N`, or `variant N for P% of execs` (a canary, or a served variant
/// that leaves the rest to the original to keep measuring it).
fn served_label(serving: &ServingTable, path: &Path) -> String {
    if serving.is_excluded(path) || serving.passes_through(path) {
        return "original (link)".into();
    }
    let key = FileKey::of(path).ok();
    match serving.served_share(path) {
        Some((v, share)) if Some(v.expected_original) == key && share >= 1.0 => {
            format!("variant {}", v.variant_id)
        }
        Some((v, share)) if Some(v.expected_original) == key && share > 0.0 => {
            format!("variant {} for {:.0}% of execs", v.variant_id, share * 100.0)
        }
        _ => "original".into(),
    }
}

/// The PATH-view name of `path`, when PATH lookup finds this very path.
fn path_view_name(path: &str, cfg: &Config) -> Option<String> {
    let name = Path::new(path).file_name()?.to_string_lossy().into_owned();
    resolve_name(&name, &cfg.overlay, &cfg.mountpoint)
        .ok()
        .filter(|r| r == Path::new(path))
        .map(|_| name)
}

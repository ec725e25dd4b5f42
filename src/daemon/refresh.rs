//! Keeps the overlay's serving table in line with the catalog: after anything that can
//! change what a path should serve (a control command, a new or promoted variant, a new
//! version of the original), [`Refresher::refresh`] re-derives the decision and applies it.

use std::path::Path;
use std::sync::Arc;

use crate::catalog::{Catalog, base};
use crate::config::Config;
use crate::daemon::decision::{Decision, decide};
use crate::fs::{ServedVariant, ServingTable};
use crate::identity::FileKey;

pub struct Refresher {
    pub catalog: Catalog,
    pub serving: Arc<ServingTable>,
    pub config: Arc<Config>,
}

impl Refresher {
    /// Re-derives and applies what `path` serves. Blocking (one catalog round trip): call it
    /// from plain threads or `spawn_blocking`.
    pub fn refresh(&self, path: &Path) {
        if let Err(e) = self.try_refresh(path) {
            // Serving the original is always safe.
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "refresh failed; serving the original");
            self.serving.serve(path, None);
        }
    }

    fn try_refresh(&self, path: &Path) -> anyhow::Result<()> {
        let Ok(key) = FileKey::of(path) else {
            self.serving.serve(path, None);
            return Ok(());
        };
        let text = path.to_string_lossy().into_owned();
        let (control, variants) = self.catalog.run_blocking(move |c| {
            let control = base::control_row(c, &text)?;
            // Variants belong to content: only those of the version now at the path count.
            let variants = match base::path_row(c, &text)? {
                Some(row) if row.key == key => match row.binary_id {
                    Some(id) => base::variants_of(c, id)?,
                    None => Vec::new(),
                },
                _ => Vec::new(),
            };
            Ok((control, variants))
        })?;
        let decision = decide(control.as_ref(), &variants);
        let excluded = matches!(decision, Decision::Excluded) || !self.config.permits(path);
        self.serving.set_excluded(path, excluded);
        let served = match &decision {
            Decision::Variant { variant_id, .. } if !excluded => {
                variants.iter().find(|v| v.id == *variant_id).map(|v| ServedVariant {
                    variant_id: v.id,
                    path_in_store: v.store_path.clone().into(),
                    size: v.size,
                    expected_original: key,
                })
            }
            _ => None,
        };
        self.serving.serve(path, served);
        Ok(())
    }

    /// Applies the catalog to every path it knows and every path the config denies; at
    /// start-up, before the first request is served.
    pub fn refresh_all(&self) -> anyhow::Result<()> {
        let mut paths: Vec<String> = self.catalog.run_blocking(|c| {
            let mut p: Vec<String> = base::all_paths(c)?.into_iter().map(|r| r.path).collect();
            p.extend(base::controls(c)?.into_iter().map(|r| r.path));
            Ok(p)
        })?;
        if !self.config.deny.is_empty() {
            for dir in &self.config.overlay {
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for e in entries.flatten() {
                    let p = e.path();
                    if !self.config.permits(&p) {
                        paths.push(p.to_string_lossy().into_owned());
                    }
                }
            }
        }
        paths.sort();
        paths.dedup();
        for p in paths {
            self.refresh(Path::new(&p));
        }
        Ok(())
    }
}

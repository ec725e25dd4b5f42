//! Keeps the overlay's serving table in line with the catalog: after anything that can
//! change what a path should serve (a control command, a new version of the original),
//! [`Refresher::refresh`] applies the exclusions (the user's and the config's deny/allow
//! lists) and has the policy re-derive what the path serves ([`Reconciler::refresh`]).

use std::path::Path;
use std::sync::Arc;

use crate::catalog::{Catalog, base};
use crate::config::Config;
use crate::daemon::policing::Reconciler;
use crate::fs::ServingTable;
use crate::identity::FileKey;

pub struct Refresher {
    pub catalog: Catalog,
    pub serving: Arc<ServingTable>,
    pub config: Arc<Config>,
    /// The one source of serving decisions.
    pub policing: Reconciler,
}

impl Refresher {
    /// Re-derives and applies what `path` serves. Blocking (catalog round trips): call it
    /// from plain threads or `spawn_blocking`.
    pub fn refresh(&self, path: &Path) {
        if let Err(e) = self.try_refresh(path) {
            // Serving the original is always safe.
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "refresh failed; serving the original");
            self.serving.serve(path, None);
        }
    }

    fn try_refresh(&self, path: &Path) -> anyhow::Result<()> {
        if FileKey::of(path).is_err() {
            self.serving.serve(path, None);
            return Ok(());
        }
        let text = path.to_string_lossy().into_owned();
        let control = self.catalog.run_blocking(move |c| base::control_row(c, &text))?;
        let excluded = control.is_some_and(|c| c.excluded) || !self.config.permits(path);
        self.serving.set_excluded(path, excluded);
        self.policing.refresh(path);
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

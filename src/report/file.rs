//! `.optbin/report.json`: the report rendered from the catalog when the file is opened
//! (like `status.json`), readable by every user of the mount.

use std::sync::Arc;

use crate::catalog::Catalog;
use crate::control::ExtraFiles;

/// Serves [`super::FILE`] from the daemon's catalog.
pub struct ReportFile {
    catalog: Catalog,
}

impl ReportFile {
    pub fn new(catalog: Catalog) -> Arc<Self> {
        Arc::new(Self { catalog })
    }

    /// The report as JSON bytes.
    pub fn render(&self) -> anyhow::Result<Vec<u8>> {
        let now_ms = crate::clock::Clock::unix_ms(&crate::clock::SystemClock);
        let report = self.catalog.run_blocking(move |c| super::collect::collect(c, now_ms))?;
        let mut bytes = serde_json::to_vec_pretty(&report)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

impl ExtraFiles for ReportFile {
    fn names(&self) -> Vec<String> {
        vec![super::FILE.to_string()]
    }

    fn read(&self, name: &str) -> Option<Result<Vec<u8>, String>> {
        (name == super::FILE)
            .then(|| self.render().map_err(|e| format!("building the BOLT report: {e:#}")))
    }
}

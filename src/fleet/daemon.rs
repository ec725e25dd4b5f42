//! The fleet in the running daemon: [`Fleet::new`] checks `[fleet]` (credentials file
//! included) and builds the view; [`Fleet::spawn`] starts the task; [`Fleet::status`] is
//! the "fleet" status section; [`Fleet::pipeline`] hands the policy the fleet's vetoes.

use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::watch;

use super::redis_store::RedisStore;
use super::settings::{FleetSettings, Resolved};
use super::task::{FleetTask, Refresh};
use super::view::{FleetView, Link};
use crate::catalog::{Catalog, base, profiles};
use crate::clock::Clock;
use crate::control::SubsystemStatus;
use crate::control::details::BinaryDetails;
use crate::control::sections::MachineSections;
use crate::policy::load::{PipelineView, Veto};
use crate::policy::{Pipeline, VariantState};

/// The fleet's wiring; see the module doc.
pub struct Fleet {
    pub settings: Resolved,
    pub view: Arc<FleetView>,
    store: Arc<RedisStore>,
}

impl Fleet {
    /// None without `[fleet]`. Errors name what to fix (the credentials file's owner or
    /// mode, a bad URL); the daemon refuses to start on them.
    pub fn new(settings: Option<&FleetSettings>) -> anyhow::Result<Option<Self>> {
        let Some(settings) = settings else { return Ok(None) };
        let resolved = settings.resolve()?;
        let store = Arc::new(RedisStore::from_settings(&resolved)?);
        let view = Arc::new(FleetView::new(
            resolved.machine.clone(),
            resolved.settings.mode.writes(),
            resolved.settings.reject_quorum,
        ));
        tracing::info!(
            machine = %resolved.machine,
            mode = ?resolved.settings.mode,
            nodes = resolved.urls.len(),
            "fleet sharing on"
        );
        Ok(Some(Self { settings: resolved, view, store }))
    }

    /// Starts the rounds on `rt`; they stop on `shutdown`.
    pub fn spawn(
        &self,
        rt: &tokio::runtime::Handle,
        catalog: Catalog,
        clock: Arc<dyn Clock>,
        refresh: Refresh,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let task = FleetTask::new(
            self.store.clone(),
            self.settings.clone(),
            catalog,
            self.view.clone(),
            clock,
            Some(refresh),
        );
        rt.spawn(task.run(shutdown))
    }

    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        Arc::new(FleetStatus { view: self.view.clone() })
    }

    /// `inner` with the fleet's quarantine vetoes added.
    pub fn pipeline(&self, inner: Arc<dyn PipelineView>) -> Arc<dyn PipelineView> {
        Arc::new(FleetPipeline { inner, view: self.view.clone() })
    }
}

struct FleetStatus {
    view: Arc<FleetView>,
}

impl SubsystemStatus for FleetStatus {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn section(&self, sections: &mut MachineSections) {
        sections.fleet = Some(self.view.section());
    }

    fn binary(&self, conn: &Connection, binary_id: i64, details: &mut BinaryDetails) {
        details.fleet = (|| {
            let binary = base::binary_by_id(conn, binary_id).ok()??;
            let runs: u64 = profiles::windows(conn, binary_id).ok()?.iter().map(|w| w.runs).sum();
            self.view.binary_details(&binary.sha256, runs)
        })();
    }
}

struct FleetPipeline {
    inner: Arc<dyn PipelineView>,
    view: Arc<FleetView>,
}

impl PipelineView for FleetPipeline {
    fn pipeline(&self, conn: &Connection, binary_id: i64) -> Pipeline {
        self.inner.pipeline(conn, binary_id)
    }

    fn veto(&self, variant_sha256: &str, state: VariantState) -> Option<Veto> {
        if let Some(why) = self.view.vetoed(variant_sha256) {
            return Some(Veto::Never(why));
        }
        // Before the first round has answered (or failed), a new variant waits: it may be
        // one the fleet quarantined.
        (state == VariantState::Ready && self.view.link() == Link::Starting).then_some(Veto::NotYet)
    }
}

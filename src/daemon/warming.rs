//! Wiring of the warmer (`crate::warm`) into the daemon: it is started with the server, fed
//! every exec the overlay reports and the execs of binaries the mount passes through
//! (`crate::daemon::native_execs`), shown in status as the `warm` section, and stopped (its thread
//! joined) with the server.

use std::sync::Arc;

use crate::config::Config;
use crate::control::SubsystemStatus;
use crate::control::sections::{MachineSections, WarmMachine};
use crate::warm::warmer::Environment;
use crate::warm::{Warmer, pages::Kernel, pressure::MEMORY_PSI};

/// Starts the warmer for this server process.
pub fn start(cfg: &Config) -> anyhow::Result<Arc<Warmer>> {
    let env = Environment { psi_path: MEMORY_PSI.into(), mountpoint: cfg.mountpoint.clone() };
    let warmer = Warmer::start(cfg.warm.clone(), env, Box::new(Kernel::new()))
        .map_err(|e| anyhow::anyhow!("starting the warm thread: {e}"))?;
    Ok(Arc::new(warmer))
}

/// The `warm` section of the status report.
pub struct WarmSection(pub Arc<Warmer>);

impl SubsystemStatus for WarmSection {
    fn name(&self) -> &'static str {
        "warm"
    }

    fn section(&self, sections: &mut MachineSections) {
        let status = self.0.status();
        sections.warm = Some(WarmMachine { summary: status.summary(), status });
    }

    fn binary(
        &self,
        _: &rusqlite::Connection,
        _: i64,
        _: &mut crate::control::details::BinaryDetails,
    ) {
    }
}

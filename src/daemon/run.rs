//! Running the daemon in the foreground: mount, serve, stop cleanly.

use crate::config::Config;

/// Mounts the overlay and serves until SIGTERM/SIGINT or an unmount from outside.
pub fn run_foreground(cfg: Config) -> anyhow::Result<()> {
    anyhow::bail!("not wired yet: {}", cfg.mountpoint.display())
}

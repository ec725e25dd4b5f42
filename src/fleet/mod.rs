//! Fleet sharing through Redis: machines that run the same bytes share what they learned
//! (profiles and verdicts), so a fleet learns once. Redis is the store, every daemon a
//! client; executable code is never shared (each machine builds its own variant).
//!
//! - [`settings`]: the `[fleet]` section and the credentials file checks;
//! - [`keys`]: the key layout (hash tag per binary identity);
//! - [`format`]: the versioned, size-capped value formats and their strict parsing;
//! - [`merge`]: the merged fleet profile with the per-machine share cap;
//! - [`trust`]: what the fleet's verdicts change locally;
//! - [`store`]: the store trait (and an in-memory one for tests); [`redis_store`]: Redis;
//! - [`task`]: the daemon's background rounds (collect, push, pull, enforce);
//! - [`view`]: what the rest of the daemon reads (never waiting on the network);
//! - [`daemon`]: the wiring into the running daemon; [`cli`]: `optbin fleet ...`.
//!
//! docs/fleet.md describes the formats, the trust model, the ACLs and each fault.

pub mod cli;
pub mod daemon;
pub mod format;
pub mod keys;
pub mod merge;
pub mod redis_store;
pub mod settings;
pub mod store;
pub mod task;
pub mod trust;
pub mod view;

pub use settings::FleetSettings;
pub use view::FleetView;

/// Unix seconds as UTC text (`2026-12-02T03:04:05Z`).
pub fn utc(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests;

//! The fleet store behind a small trait, so the task's logic is testable without Redis:
//! [`super::redis_store::RedisStore`] is the real one, [`MemoryStore`] serves unit tests.
//! Values cross the trait as raw bytes: parsing and trust are the caller's.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;

use crate::identity::ContentId;

/// What one machine writes for one identity in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub content: ContentId,
    pub kind: PushKind,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PushKind {
    Profile,
    Verdicts,
}

/// Everything stored for one identity, as read (values cut at the read cap + 1 byte, so
/// an oversized value is seen as such without being read whole).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawIdentity {
    pub profiles: Vec<(String, Vec<u8>)>,
    pub verdicts: Vec<(String, Vec<u8>)>,
}

/// The operations the fleet needs. Every call is one pipelined round trip per identity.
pub trait FleetStore: Send + Sync + 'static {
    /// Writes this machine's values (with their TTLs) and indexes their identities.
    fn push(
        &self,
        machine: &str,
        items: &[Push],
        ttl: &Ttl,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Reads what up to `max_machines` machines wrote for each identity.
    fn pull(
        &self,
        contents: &[ContentId],
        max_machines: usize,
        max_bytes: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<RawIdentity>>> + Send;
    /// The identities known to the fleet, newest first: (sha256, last push).
    fn identities(
        &self,
        limit: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<(String, i64)>>> + Send;
}

/// Time to live of values, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ttl {
    pub profile_secs: u64,
    pub verdict_secs: u64,
    pub now: i64,
}

/// An in-memory store (unit tests): same semantics, no TTL, can be switched off to play an
/// outage.
#[derive(Default)]
pub struct MemoryStore {
    pub state: Mutex<MemoryState>,
}

#[derive(Default)]
pub struct MemoryState {
    pub down: bool,
    /// (identity hex, kind, machine) -> value
    pub values: BTreeMap<(String, PushKind, String), Vec<u8>>,
    pub machines: BTreeMap<String, BTreeSet<String>>,
    pub index: BTreeMap<String, i64>,
    pub pushes: usize,
}

impl MemoryStore {
    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FleetStore for MemoryStore {
    async fn push(&self, machine: &str, items: &[Push], ttl: &Ttl) -> anyhow::Result<()> {
        let mut s = self.state();
        anyhow::ensure!(!s.down, "connection refused");
        for item in items {
            let hex = item.content.hex();
            s.values.insert((hex.clone(), item.kind, machine.to_string()), item.bytes.clone());
            s.machines.entry(hex.clone()).or_default().insert(machine.to_string());
            s.index.insert(hex, ttl.now);
            s.pushes += 1;
        }
        Ok(())
    }

    async fn pull(
        &self,
        contents: &[ContentId],
        max_machines: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<RawIdentity>> {
        let s = self.state();
        anyhow::ensure!(!s.down, "connection refused");
        Ok(contents
            .iter()
            .map(|c| {
                let hex = c.hex();
                let mut raw = RawIdentity::default();
                let machines = s.machines.get(&hex).cloned().unwrap_or_default();
                for m in machines.into_iter().take(max_machines) {
                    let get = |kind| {
                        s.values
                            .get(&(hex.clone(), kind, m.clone()))
                            .map(|v| v[..v.len().min(max_bytes + 1)].to_vec())
                    };
                    if let Some(v) = get(PushKind::Profile) {
                        raw.profiles.push((m.clone(), v));
                    }
                    if let Some(v) = get(PushKind::Verdicts) {
                        raw.verdicts.push((m.clone(), v));
                    }
                }
                raw
            })
            .collect())
    }

    async fn identities(&self, limit: usize) -> anyhow::Result<Vec<(String, i64)>> {
        let s = self.state();
        anyhow::ensure!(!s.down, "connection refused");
        let mut all: Vec<(String, i64)> = s.index.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by_key(|b| std::cmp::Reverse(b.1));
        all.truncate(limit);
        Ok(all)
    }
}

//! What this machine knows about the fleet right now: the fleet task writes it after each
//! round, the optimizer, the policy and status read it. In memory only: Redis is the
//! fleet's store, the local catalog never holds other machines' data. Reads never wait on
//! the network.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use super::merge::Merged;
use super::trust::{self, Verdicts};
use crate::bolt::ProfileNumbers;
use crate::profile::maturity::{MaturityThresholds, group};

/// The fleet's data on one binary identity.
#[derive(Debug, Clone)]
pub struct IdentityView {
    /// The merged profile of every machine's contribution (this one's included).
    pub merged: Option<Arc<Merged>>,
    pub verdicts: Verdicts,
}

/// Whether Redis answered the last round.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// No round finished yet.
    Starting,
    Up {
        since: i64,
    },
    Down {
        since: i64,
        error: String,
    },
}

/// A value read from Redis and refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub at: i64,
    pub key: String,
    pub reason: String,
}

/// Refusals kept for status.
const REFUSALS_KEPT: usize = 20;

#[derive(Debug, Default)]
struct State {
    identities: HashMap<String, IdentityView>,
    /// Variant sha256 -> reason, over every identity.
    quarantined: HashMap<String, String>,
    link: Option<Link>,
    refusals: VecDeque<Refusal>,
    refused_total: u64,
    queued: usize,
    pushed_total: u64,
    dropped_total: u64,
    last_round: Option<i64>,
    /// Content sha256 -> where the profile of its last build came from.
    built_from: HashMap<String, String>,
}

/// See the module doc.
#[derive(Debug)]
pub struct FleetView {
    pub machine: String,
    pub writes: bool,
    pub quorum: usize,
    state: RwLock<State>,
}

impl FleetView {
    pub fn new(machine: String, writes: bool, quorum: usize) -> Self {
        Self { machine, writes, quorum, state: RwLock::new(State::default()) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the data of the identities pulled in a round.
    pub fn update(&self, pulled: Vec<(String, IdentityView)>, now: i64) {
        let mut s = self.write();
        for (sha, view) in pulled {
            s.identities.insert(sha, view);
        }
        let quarantined: HashMap<String, String> = s
            .identities
            .values()
            .flat_map(|v| v.verdicts.quarantined.iter().map(|(k, r)| (k.clone(), r.clone())))
            .collect();
        s.quarantined = quarantined;
        s.last_round = Some(now);
    }

    pub fn set_link(&self, ok: Result<(), String>, now: i64) {
        let mut s = self.write();
        s.link = Some(match (ok, s.link.take()) {
            (Ok(()), Some(Link::Up { since })) => Link::Up { since },
            (Ok(()), _) => Link::Up { since: now },
            (Err(error), Some(Link::Down { since, .. })) => Link::Down { since, error },
            (Err(error), _) => Link::Down { since: now, error },
        });
    }

    pub fn link(&self) -> Link {
        self.read().link.clone().unwrap_or(Link::Starting)
    }

    /// Records a refused value; the same value refused again (every round) only updates
    /// its time, and is logged once.
    pub fn refuse(&self, at: i64, key: String, reason: String) {
        let mut s = self.write();
        if let Some(known) = s.refusals.iter_mut().find(|r| r.key == key && r.reason == reason) {
            known.at = at;
            return;
        }
        tracing::warn!(key = %key, reason = %reason, "fleet value refused");
        s.refused_total += 1;
        if s.refusals.len() == REFUSALS_KEPT {
            s.refusals.pop_front();
        }
        s.refusals.push_back(Refusal { at, key, reason });
    }

    pub fn set_queue(&self, queued: usize, pushed: u64, dropped: u64) {
        let mut s = self.write();
        s.queued = queued;
        s.pushed_total += pushed;
        s.dropped_total += dropped;
    }

    /// Why the variant with these bytes must never be served, when the fleet says so.
    pub fn vetoed(&self, variant_sha256: &str) -> Option<String> {
        self.read().quarantined.get(variant_sha256).cloned()
    }

    pub fn identity(&self, sha256: &str) -> Option<IdentityView> {
        self.read().identities.get(sha256).cloned()
    }

    /// The merged fleet profile of `sha256` when it is mature by `t` (instrumentation
    /// profiles are mature as soon as they exist), as numbers the optimizer judges by.
    pub fn mature_profile(&self, sha256: &str, t: &MaturityThresholds) -> Option<ProfileNumbers> {
        let merged = self.read().identities.get(sha256)?.merged.clone()?;
        is_mature(&merged, t).then(|| numbers(&merged))
    }

    /// Why the fleet's rejections block a build of `sha256` now, if they do.
    pub fn rebuild_blocked(
        &self,
        sha256: &str,
        bolt_version: &str,
        samples: u64,
    ) -> Option<String> {
        let s = self.read();
        let v = s.identities.get(sha256)?;
        trust::rebuild_blocked(&v.verdicts, bolt_version, samples, self.quorum)
    }

    /// The merged profile to build `sha256` from instead of the local one of `local_samples`
    /// samples: when the fleet's has more data (or is exact while the local one is not).
    pub fn profile_for_build(&self, sha256: &str, local_samples: u64) -> Option<Arc<Merged>> {
        let merged = self.read().identities.get(sha256)?.merged.clone()?;
        let exact = merged.source != super::format::Source::Samples;
        (exact || merged.samples > local_samples).then_some(merged)
    }

    pub fn note_built_from(&self, sha256: &str, what: String) {
        self.write().built_from.insert(sha256.to_string(), what);
    }

    pub fn built_from(&self, sha256: &str) -> Option<String> {
        self.read().built_from.get(sha256).cloned()
    }

    /// The machine-wide status section.
    pub fn section(&self) -> FleetMachine {
        let s = self.read();
        let link = s.link.clone().unwrap_or(Link::Starting);
        let summary = match &link {
            Link::Starting => format!("fleet: connecting (machine {})", self.machine),
            Link::Up { .. } => format!(
                "fleet: reachable, machine {} ({}), {} binaries shared, {} pushes waiting",
                self.machine,
                if self.writes { "read-write" } else { "read-only" },
                s.identities.values().filter(|v| v.merged.is_some()).count(),
                s.queued
            ),
            Link::Down { since, .. } => format!(
                "fleet: unreachable since {}, retrying ({} pushes waiting)",
                crate::fleet::utc(*since),
                s.queued
            ),
        };
        FleetMachine {
            dropped_pushes: s.dropped_total,
            last_round: s.last_round,
            link,
            machine: self.machine.clone(),
            mode: if self.writes { "read-write" } else { "read" },
            pushed_total: s.pushed_total,
            quarantined_variants: s.quarantined.clone().into_iter().collect(),
            queued_pushes: s.queued,
            refused_recent: s.refusals.clone(),
            refused_total: s.refused_total,
            summary,
        }
    }

    /// Per-binary details: where the profile came from.
    pub fn binary_details(&self, sha256: &str, local_runs: u64) -> Option<FleetBinary> {
        let s = self.read();
        let v = s.identities.get(sha256)?;
        let local =
            if local_runs == 1 { "1 run".to_string() } else { format!("{local_runs} runs") };
        let summary = match &v.merged {
            Some(m) => format!(
                "fleet: {} machine{}, {} {}; local: {local}",
                m.machines.len(),
                if m.machines.len() == 1 { "" } else { "s" },
                group(m.samples),
                match m.source {
                    super::format::Source::Samples => "samples",
                    _ => "edge executions (exact)",
                }
            ),
            None => format!("fleet: no profile yet; local: {local}"),
        };
        Some(FleetBinary {
            built_from: s.built_from.get(sha256).cloned(),
            profile: v.merged.clone(),
            promoted_on: v.verdicts.promoted_on.clone(),
            quarantined_elsewhere: v.verdicts.quarantined.clone(),
            rejected_on: v.verdicts.rejected.iter().map(|r| r.0.clone()).collect(),
            summary,
        })
    }
}

/// The fleet's machine-wide status (`subsystems.fleet` in `status.json`): the link to
/// Redis, pushes and refusals, and the variants other machines quarantined.
#[derive(Debug, Clone, Serialize)]
pub struct FleetMachine {
    pub dropped_pushes: u64,
    pub last_round: Option<i64>,
    pub link: Link,
    pub machine: String,
    /// `read-write` or `read`.
    pub mode: &'static str,
    pub pushed_total: u64,
    /// Variant sha256 -> why a machine quarantined it.
    pub quarantined_variants: BTreeMap<String, String>,
    pub queued_pushes: usize,
    pub refused_recent: VecDeque<Refusal>,
    pub refused_total: u64,
    pub summary: String,
}

/// The fleet's status of one binary (`details.fleet` in `status.json`): where its profile
/// came from and what other machines decided about its variants.
#[derive(Debug, Clone, Serialize)]
pub struct FleetBinary {
    pub built_from: Option<String>,
    #[serde(serialize_with = "shared_profile")]
    pub profile: Option<Arc<Merged>>,
    pub promoted_on: BTreeSet<String>,
    pub quarantined_elsewhere: BTreeMap<String, String>,
    pub rejected_on: Vec<String>,
    pub summary: String,
}

fn shared_profile<S: serde::Serializer>(p: &Option<Arc<Merged>>, s: S) -> Result<S::Ok, S::Error> {
    p.as_deref().serialize(s)
}

/// Mature by the same thresholds as a local profile: samples, runs and stability (the
/// machines' own stability measures, weighted); an exact (edge) profile is mature at once.
pub fn is_mature(m: &Merged, t: &MaturityThresholds) -> bool {
    if m.source != super::format::Source::Samples {
        return m.samples > 0;
    }
    m.samples >= t.min_samples
        && m.runs >= t.min_runs
        && m.stability.is_some_and(|s| s >= t.min_stability)
}

fn numbers(m: &Merged) -> ProfileNumbers {
    let total = m.samples + m.outside;
    ProfileNumbers {
        samples: m.samples,
        own_text_share: if total == 0 { 1.0 } else { m.samples as f64 / total as f64 },
        front_end: None,
    }
}

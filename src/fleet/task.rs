//! The daemon's fleet task: every `interval_secs`, one round of
//! 1. collect: this machine's profiles and verdicts from the catalog, re-read only for
//!    binaries whose numbers changed, into the bounded push queue (newest per binary);
//! 2. push the queue (read-write machines), pipelined per binary;
//! 3. pull what the fleet has on the binaries at this machine's paths, refuse bad values
//!    with a reason, merge, and publish the result in the [`FleetView`];
//! 4. enforce: a local variant whose bytes the fleet quarantined is quarantined here too
//!    (recorded in the catalog and handed to the policy through the refresher).
//!
//! Redis down: rounds keep failing fast (connect timeout), the view says since when, the
//! queue keeps what waits, and nothing else in the daemon waits for any of it. Never on
//! the exec path: the overlay, the profiler and the optimizer only read the view.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::watch;

use super::format::{Contribution, Outcome, Source, VERSION, Verdict, VerdictList};
use super::merge::merge;
use super::settings::Resolved;
use super::store::{FleetStore, Push, PushKind, Ttl};
use super::trust::summarize;
use super::view::{FleetView, IdentityView};
use crate::catalog::base::{VariantKind, VariantState};
use crate::catalog::{Catalog, base, flag_trials, profile_digests, profiles, runs};
use crate::clock::Clock;
use crate::identity::ContentId;

pub type Refresh = Arc<dyn Fn(&Path) + Send + Sync>;

/// Identities pulled per round at most.
const PULL_LIMIT: usize = 2000;

/// A cheap fingerprint of what a push would carry: re-read and re-sent only on change.
type Fingerprint = (u64, u64, u64, u64);

/// The bounded push queue: at most one push per (binary, kind), the newest; while it is
/// full, new binaries wait in the catalog until the queue drains (nothing is lost: the
/// catalog keeps the data and the next collection finds the difference again).
#[derive(Debug, Default)]
pub struct PushQueue {
    limit: usize,
    pending: BTreeMap<(ContentId, PushKind), (Fingerprint, Push)>,
    /// What Redis has: fingerprint and when it was sent (re-sent after a quarter TTL so
    /// live contributions never expire).
    acked: HashMap<(ContentId, PushKind), (Fingerprint, i64)>,
    pub deferred: u64,
}

impl PushQueue {
    pub fn new(limit: usize) -> Self {
        Self { limit, ..Default::default() }
    }

    /// Whether `key` with `fp` needs sending (not in Redis nor queued, or stale).
    pub fn wants(
        &self,
        key: &(ContentId, PushKind),
        fp: Fingerprint,
        now: i64,
        refresh: i64,
    ) -> bool {
        if self.pending.get(key).is_some_and(|(f, _)| *f == fp) {
            return false;
        }
        !self.acked.get(key).is_some_and(|(f, at)| *f == fp && now - at < refresh)
    }

    /// Queues a push, replacing an older one of the same key. False when full.
    pub fn offer(&mut self, fp: Fingerprint, push: Push) -> bool {
        let key = (push.content, push.kind);
        if !self.pending.contains_key(&key) && self.pending.len() >= self.limit {
            self.deferred += 1;
            return false;
        }
        self.pending.insert(key, (fp, push));
        true
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn batch(&self) -> Vec<Push> {
        self.pending.values().map(|(_, p)| p.clone()).collect()
    }

    /// Forgets what Redis had: after an outage it may have lost it (a restart without
    /// persistence, a failover), so everything is collected and sent again.
    pub fn forget_sent(&mut self) {
        self.acked.clear();
    }

    /// Everything sent: what was queued is now what Redis has.
    pub fn sent(&mut self, now: i64) -> usize {
        let n = self.pending.len();
        for (key, (fp, _)) in std::mem::take(&mut self.pending) {
            self.acked.insert(key, (fp, now));
        }
        n
    }
}

/// The task's state; see the module doc.
pub struct FleetTask<S: FleetStore> {
    pub store: Arc<S>,
    pub settings: Resolved,
    pub catalog: Catalog,
    pub view: Arc<FleetView>,
    pub clock: Arc<dyn Clock>,
    pub refresh: Option<Refresh>,
    pub queue: PushQueue,
}

impl<S: FleetStore> FleetTask<S> {
    pub fn new(
        store: Arc<S>,
        settings: Resolved,
        catalog: Catalog,
        view: Arc<FleetView>,
        clock: Arc<dyn Clock>,
        refresh: Option<Refresh>,
    ) -> Self {
        let queue = PushQueue::new(settings.settings.queue_limit);
        Self { store, settings, catalog, view, clock, refresh, queue }
    }

    /// Rounds until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.round().await {
                        tracing::debug!(error = %format!("{e:#}"), "fleet round incomplete");
                    }
                }
            }
        }
        if !self.queue.is_empty() {
            tracing::info!(
                waiting = self.queue.len(),
                "fleet pushes still waiting at shutdown (they are collected again from the catalog on the next start)"
            );
        }
    }

    /// One round (public for tests).
    pub async fn round(&mut self) -> anyhow::Result<()> {
        let now = self.clock.unix_secs();
        if matches!(self.view.link(), super::view::Link::Down { .. }) {
            self.queue.forget_sent();
        }
        self.collect(now).await?;
        let mut pushed = 0;
        let result = async {
            if self.settings.settings.mode.writes() && !self.queue.is_empty() {
                let ttl = Ttl {
                    profile_secs: self.settings.profile_ttl_secs(),
                    verdict_secs: self.settings.verdict_ttl_secs(),
                    now,
                };
                self.store.push(&self.settings.machine, &self.queue.batch(), &ttl).await?;
                pushed = self.queue.sent(now);
                tracing::debug!(pushed, "fleet pushes sent");
            }
            self.pull(now).await
        }
        .await;
        self.view.set_queue(self.queue.len(), pushed as u64, 0);
        match &result {
            Ok(()) => {
                if matches!(self.view.link(), super::view::Link::Down { .. }) {
                    tracing::info!("fleet: Redis reachable again");
                }
                self.view.set_link(Ok(()), now);
            }
            Err(e) => {
                if !matches!(self.view.link(), super::view::Link::Down { .. }) {
                    tracing::warn!(error = %format!("{e:#}"), "fleet: Redis unreachable, retrying");
                }
                self.view.set_link(Err(format!("{e:#}")), now);
            }
        }
        self.enforce(now).await?;
        result
    }

    /// Step 1: what changed locally goes into the queue.
    async fn collect(&mut self, now: i64) -> anyhow::Result<()> {
        if !self.settings.settings.mode.writes() {
            return Ok(());
        }
        let refresh_after =
            (self.settings.profile_ttl_secs().min(self.settings.verdict_ttl_secs()) / 4) as i64;
        let machine = self.settings.machine.clone();
        let cap = self.settings.settings.max_value_bytes;
        // Fingerprints first (cheap), then full values only for what changed.
        let fps = self.catalog.run(|c| fingerprints(c)).await?;
        let wanted: Vec<(i64, ContentId, PushKind, Fingerprint)> = fps
            .into_iter()
            .filter(|(_, content, kind, fp)| {
                self.queue.wants(&(*content, *kind), *fp, now, refresh_after.max(1))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let pushes = self
            .catalog
            .run(move |c| {
                let mut out = Vec::new();
                for (id, content, kind, fp) in wanted {
                    let bytes = match kind {
                        PushKind::Profile => {
                            contribution(c, id, &content, &machine, now)?.map(|v| v.encode(cap))
                        }
                        PushKind::Verdicts => {
                            let list = verdicts(c, id, &content, &machine)?;
                            (!list.verdicts.is_empty()).then(|| list.encode())
                        }
                    };
                    if let Some(bytes) = bytes {
                        out.push((fp, Push { content, kind, bytes }));
                    }
                }
                Ok(out)
            })
            .await?;
        for (fp, push) in pushes {
            self.queue.offer(fp, push);
        }
        Ok(())
    }

    /// Step 3: the fleet's data on the binaries this machine has.
    async fn pull(&mut self, now: i64) -> anyhow::Result<()> {
        let contents: Vec<ContentId> = self
            .catalog
            .run(|c| {
                let mut shas: Vec<String> = Vec::new();
                for p in base::all_paths(c)? {
                    if let Some(id) = p.binary_id
                        && let Some(b) = base::binary_by_id(c, id)?
                        && !shas.contains(&b.sha256)
                    {
                        shas.push(b.sha256);
                    }
                }
                Ok(shas)
            })
            .await?
            .iter()
            .filter_map(|s| ContentId::parse(s))
            .take(PULL_LIMIT)
            .collect();
        if contents.is_empty() {
            return Ok(());
        }
        let s = &self.settings.settings;
        let raw = self.store.pull(&contents, s.max_machines, s.max_value_bytes).await?;
        let mut pulled = Vec::with_capacity(contents.len());
        for (content, raw) in contents.iter().zip(raw) {
            let mut good = Vec::new();
            for (m, bytes) in &raw.profiles {
                match Contribution::parse(bytes, content, m, s.max_value_bytes) {
                    Ok(c) => good.push(c),
                    Err(why) => self.view.refuse(now, super::keys::profile(content, m), why),
                }
            }
            let mut lists = Vec::new();
            for (m, bytes) in &raw.verdicts {
                match VerdictList::parse(bytes, content, m, s.max_value_bytes) {
                    Ok(l) => lists.push(l),
                    Err(why) => self.view.refuse(now, super::keys::verdicts(content, m), why),
                }
            }
            let merged = merge(&good, s.max_machine_share).map(Arc::new);
            pulled.push((content.hex(), IdentityView { merged, verdicts: summarize(&lists) }));
        }
        self.view.update(pulled, now);
        Ok(())
    }

    /// Step 4: variants here whose bytes the fleet quarantined are quarantined here.
    async fn enforce(&self, now: i64) -> anyhow::Result<()> {
        let view = self.view.clone();
        let changed: Vec<String> = self
            .catalog
            .run(move |c| {
                let mut paths = Vec::new();
                for id in binaries_with_live_variants(c)? {
                    for v in base::variants_of(c, id)? {
                        if !matches!(
                            v.state,
                            VariantState::Ready | VariantState::Canary | VariantState::Served
                        ) {
                            continue;
                        }
                        let Some(reason) = view.vetoed(&v.sha256) else { continue };
                        let note = format!("fleet: {reason}");
                        base::set_variant_state(c, v.id, VariantState::Quarantined, Some(&note))?;
                        for p in runs::paths_of_binary(c, id)? {
                            base::record_event(c, now, Some(&p), "fleet-quarantine", &note)?;
                            paths.push(p);
                        }
                    }
                }
                Ok(paths)
            })
            .await?;
        if let Some(refresh) = &self.refresh {
            for p in changed {
                tracing::warn!(path = %p, "variant quarantined by the fleet");
                let refresh = refresh.clone();
                let _ = tokio::task::spawn_blocking(move || refresh(Path::new(&p))).await;
            }
        }
        Ok(())
    }
}

fn binaries_with_live_variants(c: &Connection) -> anyhow::Result<Vec<i64>> {
    let mut stmt = c.prepare(
        "SELECT DISTINCT binary_id FROM variants WHERE state IN ('ready', 'canary', 'served')",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// (binary id, content, kind, fingerprint) of everything this machine could push.
fn fingerprints(c: &Connection) -> anyhow::Result<Vec<(i64, ContentId, PushKind, Fingerprint)>> {
    let mut out = Vec::new();
    let mut ids = profiles::profiled_binaries(c)?;
    let instrumented: Vec<i64> = c
        .prepare("SELECT binary_id FROM instr_profiles")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    ids.extend(instrumented);
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let Some(b) = base::binary_by_id(c, id)? else { continue };
        let Some(content) = ContentId::parse(&b.sha256) else { continue };
        let windows = profiles::windows(c, id)?;
        let own: u64 = windows.iter().map(|w| w.own_samples).sum();
        let runs: u64 = windows.iter().map(|w| w.runs).sum();
        let instrumented = profiles::instrumented_runs(c, id)?;
        if own > 0 || instrumented > 0 {
            out.push((
                id,
                content,
                PushKind::Profile,
                (own, runs, instrumented, windows.len() as u64),
            ));
        }
    }
    let mut stmt = c.prepare(
        "SELECT binary_id, count(*), max(id), sum(length(state) * id) FROM variants
         WHERE state IN ('served', 'rejected', 'quarantined') AND kind != 'instrumented'
               AND (note IS NULL OR note NOT LIKE 'fleet: %')
         GROUP BY binary_id",
    )?;
    let rows: Vec<(i64, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (id, n, max, mix) in rows {
        let Some(b) = base::binary_by_id(c, id)? else { continue };
        let Some(content) = ContentId::parse(&b.sha256) else { continue };
        out.push((id, content, PushKind::Verdicts, (n as u64, max as u64, mix as u64, 0)));
    }
    Ok(out)
}

/// This machine's contribution for binary `id`: its instrumentation profile when it has
/// one, else its branch records, else its samples.
pub fn contribution(
    c: &Connection,
    id: i64,
    content: &ContentId,
    machine: &str,
    now: i64,
) -> anyhow::Result<Option<Contribution>> {
    let Some(b) = base::binary_by_id(c, id)? else { return Ok(None) };
    let windows = profiles::windows(c, id)?;
    let own: u64 = windows.iter().map(|w| w.own_samples).sum();
    let outside: u64 = windows.iter().map(|w| w.outside_samples).sum();
    let runs: u64 = windows.iter().map(|w| w.runs).sum();
    let mut value = Contribution {
        v: VERSION,
        machine: machine.to_string(),
        content: content.hex(),
        build_id: b.facts.build_id.clone(),
        source: Source::Samples,
        event: None,
        samples: own,
        outside,
        runs,
        stability: None,
        updated_at: now,
        windows: windows.iter().rev().take(256).map(|w| (w.window_start, w.own_samples)).collect(),
        functions: vec![],
        edges: vec![],
    };
    let instrumented = profiles::instrumented_runs(c, id)?;
    if instrumented > 0 {
        let edges = profiles::instrumented_edges(c, id)?;
        value.source = Source::Instrumentation;
        value.samples = edges.iter().map(|e| e.3).sum();
        value.runs = instrumented;
        value.edges =
            edges.into_iter().filter(|e| usable_location(&e.0) && usable_location(&e.1)).collect();
        return Ok((value.samples > 0).then_some(value));
    }
    let head = profiles::profile_head(c, id)?;
    if head.as_ref().is_none_or(|h| h.refused.is_some()) || own == 0 {
        return Ok(None);
    }
    let branches = profiles::branch_counts(c, id)?;
    if !branches.is_empty() {
        value.source = Source::BranchStacks;
        value.edges = branches
            .into_iter()
            .filter(|b| usable(&b.0) && usable(&b.2))
            .map(|(f, fo, t, to, m, n)| (format!("1 {f} {fo:x}"), format!("1 {t} {to:x}"), m, n))
            .collect();
        value.samples = value.samples.max(value.edges.iter().map(|e| e.3).sum());
    } else {
        value.event = head.map(|h| h.event);
        value.functions =
            profiles::sample_counts(c, id)?.into_iter().filter(|f| usable(&f.0)).collect();
        value.samples = value.samples.max(value.functions.iter().map(|f| f.2).sum());
    }
    let by_window = profiles::function_counts_by_window(c, id)?;
    value.stability = crate::profile::maturity::stability(&by_window);
    Ok(Some(value))
}

fn usable(symbol: &str) -> bool {
    !symbol.is_empty()
        && symbol.len() <= 1024
        && !symbol.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn usable_location(loc: &str) -> bool {
    let parts: Vec<&str> = loc.split(' ').collect();
    matches!(parts.as_slice(), ["1", sym, off] if usable(sym) && u64::from_str_radix(off, 16).is_ok())
}

/// This machine's verdicts on binary `id`'s variants.
pub fn verdicts(
    c: &Connection,
    id: i64,
    content: &ContentId,
    machine: &str,
) -> anyhow::Result<VerdictList> {
    let mut list = VerdictList {
        v: VERSION,
        machine: machine.to_string(),
        content: content.hex(),
        verdicts: vec![],
    };
    let digests = profile_digests::of_binary(c, id)?;
    let flag_sets: std::collections::HashMap<i64, String> = flag_trials::trials_of(c, id)?
        .into_iter()
        .filter_map(|t| Some((t.variant_id?, t.flag_set)))
        .collect();
    for v in base::variants_of(c, id)?.into_iter().rev() {
        let outcome = match v.state {
            VariantState::Served => Outcome::Promoted,
            VariantState::Rejected => Outcome::Rejected,
            VariantState::Quarantined => Outcome::Quarantined,
            VariantState::Ready | VariantState::Canary | VariantState::Retired => continue,
        };
        if v.kind == VariantKind::Instrumented || ContentId::parse(&v.sha256).is_none() {
            continue;
        }
        // A quarantine this machine learnt from the fleet is not its own evidence.
        if v.note.as_deref().is_some_and(|n| n.starts_with("fleet: ")) {
            continue;
        }
        list.verdicts.push(Verdict {
            variant: v.sha256,
            outcome,
            bolt_version: v.bolt_version,
            flags: v.flags,
            profile_samples: v.profile_samples.map(|n| n.max(0) as u64),
            profile_digest: digests.get(&v.id).map(ContentId::hex),
            flag_set: flag_sets.get(&v.id).cloned(),
            note: v.note.map(|n| n.chars().take(300).collect()),
            at: v.created_at,
        });
        if list.verdicts.len() == super::format::MAX_VERDICTS {
            break;
        }
    }
    Ok(list)
}

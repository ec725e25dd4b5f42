//! The fleet task's logic over the in-memory store: pushes, pulls, merges, refusals,
//! outages and the quarantine veto, each machine with its own (in-memory) catalog.

use std::sync::Arc;

use super::format::{Contribution, Source};
use super::settings::{FleetSettings, Mode, Urls};
use super::store::{MemoryStore, PushKind};
use super::task::FleetTask;
use super::view::{FleetView, Link};
use crate::catalog::base::VariantState;
use crate::catalog::profiles::WindowBatch;
use crate::catalog::{Catalog, base, profiles};
use crate::clock::ManualClock;
use crate::elf::ElfFacts;
use crate::identity::{ContentId, FileKey};
use crate::profile::maturity::MaturityThresholds;

const BINARY: &[u8] = b"the same bytes on every machine";

struct Machine {
    catalog: Catalog,
    task: FleetTask<MemoryStore>,
    view: Arc<FleetView>,
    binary_id: i64,
    _dir: tempfile::TempDir,
}

fn settings(machine: &str, mode: Mode) -> FleetSettings {
    let text = format!("url = \"redis://127.0.0.1:1\"\nmachine_id = \"{machine}\"");
    let mut s: FleetSettings = toml::from_str(&text).unwrap();
    s.mode = mode;
    s.url = Urls::One("redis://127.0.0.1:1".into());
    s
}

/// A machine with the binary indexed at a path, and `windows` windows of `per_window`
/// samples (90% in `hot`).
fn machine(
    store: &Arc<MemoryStore>,
    id: &str,
    mode: Mode,
    windows: i64,
    per_window: u64,
) -> Machine {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool");
    std::fs::write(&path, BINARY).unwrap();
    let key = FileKey::of(&path).unwrap();
    let catalog = Catalog::in_memory().unwrap();
    let text = path.to_string_lossy().into_owned();
    let binary_id = catalog
        .run_blocking(move |c| {
            let id =
                base::upsert_binary(c, &ContentId::of_bytes(BINARY), 31, &ElfFacts::default(), 1)?;
            base::upsert_path(c, &text, Some(id), &key, 1)?;
            for w in 0..windows {
                let batch = WindowBatch {
                    samples: vec![
                        ("hot".into(), 0x10, per_window * 9 / 10),
                        ("warm".into(), 0, per_window - per_window * 9 / 10),
                    ],
                    own_samples: per_window,
                    outside_samples: per_window / 10,
                    new_runs: 1,
                    ..Default::default()
                };
                profiles::add_window(c, id, w * 600, "cpu-clock", &batch, 1)?;
            }
            Ok(id)
        })
        .unwrap();
    let resolved = settings(id, mode).resolve().unwrap();
    let view = Arc::new(FleetView::new(id.into(), mode.writes(), 2));
    let task = FleetTask::new(
        store.clone(),
        resolved,
        catalog.clone(),
        view.clone(),
        Arc::new(ManualClock::at(1_000_000)),
        None,
    );
    Machine { catalog, task, view, binary_id, _dir: dir }
}

fn thresholds() -> MaturityThresholds {
    MaturityThresholds { min_samples: 10_000, min_runs: 3, min_stability: 0.5 }
}

fn sha() -> String {
    ContentId::of_bytes(BINARY).hex()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn a_machine_that_ran_once_gets_the_fleets_mature_profile() {
    let store = Arc::new(MemoryStore::default());
    let mut a = machine(&store, "a", Mode::ReadWrite, 5, 4_000);
    let mut b = machine(&store, "b", Mode::ReadWrite, 1, 300);
    let rt = rt();
    rt.block_on(a.task.round()).unwrap();
    rt.block_on(b.task.round()).unwrap();
    // b alone is far from mature; the fleet (a's 20,000 + b's 300) is.
    let numbers = b.view.mature_profile(&sha(), &thresholds()).expect("mature in the fleet");
    assert_eq!(numbers.samples, 20_300);
    let merged = b.view.profile_for_build(&sha(), 300).unwrap();
    assert_eq!(merged.machines.len(), 2);
    assert_eq!(merged.runs, 6);
    let fdata = String::from_utf8(merged.fdata()).unwrap();
    assert!(fdata.starts_with("no_lbr cpu-clock:\n"), "{fdata}");
    assert!(fdata.contains("1 hot 10 18270\n"), "{fdata}");
    let details = b.view.binary_details(&sha(), 1).unwrap();
    assert_eq!(details.summary, "fleet: 2 machines, 20,300 samples; local: 1 run");
    // Nothing changed: the next round pushes nothing.
    let before = store.state.lock().unwrap().pushes;
    rt.block_on(a.task.round()).unwrap();
    assert_eq!(store.state.lock().unwrap().pushes, before);
}

#[test]
fn a_read_only_machine_never_writes() {
    let store = Arc::new(MemoryStore::default());
    let mut r = machine(&store, "r", Mode::Read, 5, 4_000);
    rt().block_on(r.task.round()).unwrap();
    assert_eq!(store.state.lock().unwrap().pushes, 0);
    assert_eq!(r.view.link(), Link::Up { since: 1_000_000 });
}

#[test]
fn an_outage_keeps_the_pushes_and_sends_them_when_redis_is_back() {
    let store = Arc::new(MemoryStore::default());
    let mut a = machine(&store, "a", Mode::ReadWrite, 2, 1_000);
    store.state.lock().unwrap().down = true;
    let rt = rt();
    assert!(rt.block_on(a.task.round()).is_err());
    assert!(matches!(a.view.link(), Link::Down { since: 1_000_000, .. }));
    assert_eq!(a.task.queue.len(), 1);
    let section = serde_json::to_value(a.view.section()).unwrap();
    assert!(
        section["summary"]
            .as_str()
            .unwrap()
            .starts_with("fleet: unreachable since 1970-01-12T13:46:40Z, retrying"),
        "{section}"
    );
    store.state.lock().unwrap().down = false;
    rt.block_on(a.task.round()).unwrap();
    assert!(a.task.queue.is_empty());
    let s = store.state.lock().unwrap();
    assert!(s.values.contains_key(&(sha(), PushKind::Profile, "a".to_string())));
}

#[test]
fn bad_values_are_refused_with_a_reason_and_the_good_ones_still_merge() {
    let store = Arc::new(MemoryStore::default());
    let mut a = machine(&store, "a", Mode::ReadWrite, 2, 1_000);
    {
        let mut s = store.state.lock().unwrap();
        let mut plant = |m: &str, bytes: Vec<u8>| {
            s.values.insert((sha(), PushKind::Profile, m.into()), bytes);
            s.machines.entry(sha()).or_default().insert(m.into());
        };
        plant("garbage", b"\x00\x01 not json".to_vec());
        plant("future", br#"{"v":2,"anything":"new"}"#.to_vec());
        plant("huge", vec![b'{'; 2 << 20]);
    }
    rt().block_on(a.task.round()).unwrap();
    let section = serde_json::to_value(a.view.section()).unwrap();
    let reasons: Vec<String> = section["refused_recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r["key"], r["reason"]))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains(":profile:garbage") && r.contains("not a fleet value"))
    );
    assert!(reasons.iter().any(|r| r.contains(":profile:future") && r.contains("wrong version 2")));
    assert!(reasons.iter().any(|r| r.contains(":profile:huge") && r.contains("oversized")));
    let merged = a.view.identity(&sha()).unwrap().merged.unwrap();
    assert_eq!(merged.machines, vec!["a".to_string()]);
}

#[test]
fn a_variant_quarantined_anywhere_is_quarantined_here() {
    let store = Arc::new(MemoryStore::default());
    let mut a = machine(&store, "a", Mode::ReadWrite, 2, 1_000);
    let mut b = machine(&store, "b", Mode::ReadWrite, 1, 100);
    let variant = ContentId::of_bytes(b"variant bytes").hex();
    let insert = |cat: &Catalog, id: i64, state: VariantState| {
        let v = variant.clone();
        cat.run_blocking(move |c| {
            let nv = base::NewVariant {
                binary_id: id,
                sha256: v,
                store_path: "/nowhere".into(),
                size: 1,
                state,
                bolt_version: Some("19.1.7".into()),
                profile_samples: Some(2000),
                note: Some("crashed: SIGSEGV".into()),
                ..Default::default()
            };
            base::insert_variant(c, &nv, 1)
        })
        .unwrap()
    };
    let on_a = insert(&a.catalog, a.binary_id, VariantState::Quarantined);
    let profile = ContentId::of_bytes(b"the fdata it was built from");
    a.catalog
        .run_blocking(move |c| crate::catalog::profile_digests::set(c, on_a, &profile))
        .unwrap();
    let on_b = insert(&b.catalog, b.binary_id, VariantState::Ready);
    let rt = rt();
    rt.block_on(a.task.round()).unwrap();
    // The verdict names the profile it was built from.
    let pushed =
        store.state.lock().unwrap().values[&(sha(), PushKind::Verdicts, "a".to_string())].clone();
    let list = crate::fleet::format::VerdictList::parse(
        &pushed,
        &ContentId::parse(&sha()).unwrap(),
        "a",
        1 << 20,
    )
    .unwrap();
    assert_eq!(list.verdicts[0].profile_digest, Some(profile.hex()));
    rt.block_on(b.task.round()).unwrap();
    assert_eq!(
        b.view.vetoed(&variant).as_deref(),
        Some("quarantined on machine a: crashed: SIGSEGV")
    );
    let state = b
        .catalog
        .run_blocking(move |c| {
            Ok(base::variants_of(c, b.binary_id)?.into_iter().find(|v| v.id == on_b).unwrap())
        })
        .unwrap();
    assert_eq!(state.state, VariantState::Quarantined);
    assert_eq!(state.note.as_deref(), Some("fleet: quarantined on machine a: crashed: SIGSEGV"));
    // b does not publish a's evidence as its own.
    rt.block_on(b.task.round()).unwrap();
    let s = store.state.lock().unwrap();
    assert!(!s.values.contains_key(&(sha(), PushKind::Verdicts, "b".to_string())));
}

#[test]
fn an_instrumentation_profile_anywhere_is_the_one_everyone_builds_from() {
    let store = Arc::new(MemoryStore::default());
    let mut a = machine(&store, "a", Mode::ReadWrite, 5, 4_000);
    let mut b = machine(&store, "b", Mode::ReadWrite, 0, 0);
    let id = b.binary_id;
    b.catalog
        .run_blocking(move |c| {
            let edge = ("1 main 1a".to_string(), "1 main 2b".to_string(), 0u64, 40u64);
            profiles::add_instrumented_run(c, id, &[edge], 1)
        })
        .unwrap();
    let rt = rt();
    rt.block_on(b.task.round()).unwrap();
    rt.block_on(a.task.round()).unwrap();
    let merged = a.view.profile_for_build(&sha(), 20_000).expect("exact beats sampled");
    assert_eq!(merged.source, Source::Instrumentation);
    assert_eq!(String::from_utf8(merged.fdata()).unwrap(), "1 main 1a 1 main 2b 0 40\n");
    assert!(a.view.mature_profile(&sha(), &thresholds()).is_some());
}

#[test]
fn a_contribution_is_the_machines_own_profile_only() {
    let store = Arc::new(MemoryStore::default());
    let a = machine(&store, "a", Mode::ReadWrite, 3, 1_000);
    let c = a
        .catalog
        .run_blocking(move |c| {
            super::task::contribution(c, a.binary_id, &ContentId::of_bytes(BINARY), "a", 5)
        })
        .unwrap()
        .unwrap();
    let back = Contribution::parse(&c.encode(1 << 20), &ContentId::of_bytes(BINARY), "a", 1 << 20)
        .unwrap();
    assert_eq!((back.samples, back.runs, back.outside), (3_000, 3, 300));
    assert_eq!(back.event.as_deref(), Some("cpu-clock"));
    assert_eq!(back.windows.len(), 3);
    assert!(back.stability.is_some_and(|s| s > 0.99));
}

//! The serving wiring over an in-memory catalog, real files and a fake measurer.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc as std_mpsc;

use std::path::Path;

use super::reconcile::*;
use super::translate::*;
use super::*;
use crate::catalog::base::{self, VariantKind, VariantRow, VariantState};
use crate::catalog::base::{NewVariant, Pin, insert_variant, set_pin, upsert_binary, upsert_path};
use crate::control::subsystem::{binary_json, section_json};
use crate::elf::ElfFacts;
use crate::fs::FsEvent;
use crate::identity::ContentId;
use crate::identity::FileKey;
use crate::measure::counters::{CounterFactory, CounterReading, RunCounters};
use crate::measure::proc_connector::ProcEvent;
use crate::measure::tracker::ProcessView;
use crate::policy::ServeDecision;
use crate::policy::task::ServingSink;

fn row(id: i64, state: VariantState) -> VariantRow {
    VariantRow {
        id,
        binary_id: 1,
        kind: VariantKind::Bolt,
        sha256: String::new(),
        store_path: format!("/store/{id}"),
        size: 10,
        state,
        bolt_version: None,
        flags: None,
        profile_samples: None,
        created_at: 0,
        note: None,
    }
}

fn key() -> FileKey {
    FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 }
}

fn share_of(t: &Target) -> Option<(i64, f64)> {
    match t {
        Target::Original => None,
        Target::Variant { variant, share, .. } => Some((variant.variant_id, *share)),
    }
}

#[test]
fn decisions_translate_to_entries_for_the_content_they_are_about() {
    let rows = [row(3, VariantState::Canary), row(4, VariantState::Served)];
    let split = |v, s| ServeDecision::Split { variant_id: v, variant_share: s };
    assert_eq!(translate(ServeDecision::Original, &rows, key(), true), Target::Original);
    assert_eq!(share_of(&translate(split(3, 0.5), &rows, key(), true)), Some((3, 0.5)));
    assert_eq!(share_of(&translate(ServeDecision::Variant(4), &rows, key(), true)), Some((4, 1.0)));
    let Target::Variant { variant, .. } = translate(split(4, 0.95), &rows, key(), true) else {
        panic!("a served variant is served")
    };
    assert_eq!(variant.path_in_store, Path::new("/store/4"));
    assert_eq!((variant.size, variant.expected_original), (10, key()));
    // A variant of another content (the file changed since) is never served.
    assert_eq!(translate(ServeDecision::Variant(9), &rows, key(), true), Target::Original);
    assert_eq!(translate(split(3, 0.0), &rows, key(), true), Target::Original);

    // Without measurement: no canary, but promoted variants and pins are served fully.
    assert_eq!(translate(split(3, 0.5), &rows, key(), false), Target::Original);
    assert_eq!(share_of(&translate(split(4, 0.95), &rows, key(), false)), Some((4, 1.0)));
    assert_eq!(
        share_of(&translate(ServeDecision::Variant(3), &rows, key(), false)),
        Some((3, 1.0))
    );
}

#[test]
fn only_a_served_variant_alone_with_the_original_has_its_runs_sampled() {
    let rows = [row(3, VariantState::Canary), row(4, VariantState::Served)];
    let split = |v, s| ServeDecision::Split { variant_id: v, variant_share: s };
    let one_in =
        |decision| match sample_served_runs(translate(decision, &rows, key(), true), &rows, 8) {
            Target::Variant { count_one_in, .. } => Some(count_one_in),
            Target::Original => None,
        };
    assert_eq!(one_in(split(4, 0.95)), Some(8), "the served variant and the exploration runs");
    assert_eq!(one_in(ServeDecision::Variant(4)), Some(8));
    assert_eq!(one_in(split(3, 0.5)), Some(1), "a canary counts every run");
    assert_eq!(one_in(ServeDecision::Original), None);
    let challenge = ServeDecision::Challenge {
        served: 4,
        challenger: 3,
        challenger_share: 0.3,
        original_share: 0.05,
    };
    assert_eq!(one_in(challenge), Some(1), "a challenger's canary counts every run");
}

/// A catalog with one binary at a real file, and a real variant file in a store dir.
struct World {
    _dir: tempfile::TempDir,
    catalog: Catalog,
    path: PathBuf,
    binary_id: i64,
    variant_id: i64,
}

fn world(state: VariantState) -> World {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool");
    std::fs::write(&path, b"original").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = dir.path().join("variant");
    std::fs::write(&store, b"variant!!").unwrap();
    let catalog = Catalog::in_memory().unwrap();
    let key = FileKey::of(&path).unwrap();
    let (text, store_text, state) =
        (path.to_string_lossy().into_owned(), store.to_string_lossy().into_owned(), state);
    let (binary_id, variant_id) = catalog
        .run_blocking(move |c| {
            let b =
                upsert_binary(c, &ContentId::of_bytes(b"original"), 8, &ElfFacts::default(), 1)?;
            upsert_path(c, &text, Some(b), &key, 1)?;
            let v = insert_variant(
                c,
                &NewVariant {
                    binary_id: b,
                    kind: VariantKind::Bolt,
                    store_path: store_text,
                    size: 9,
                    state,
                    ..Default::default()
                },
                1,
            )?;
            Ok((b, v))
        })
        .unwrap();
    World { _dir: dir, catalog, path, binary_id, variant_id }
}

fn serving_with(w: &World, table: &Arc<ServingTable>, measured: bool, parts: Parts) -> Serving {
    let m = if measured { Ok(fake_measurer().0) } else { Err("not here".to_string()) };
    Serving::with_measurer(parts, &w.catalog, table.clone(), m)
}

fn policing(w: &World, table: &Arc<ServingTable>, measured: bool) -> Serving {
    serving_with(w, table, measured, Parts::default())
}

#[test]
fn refresh_applies_the_policy_and_controls_to_the_serving_table() {
    let w = world(VariantState::Ready);
    let serving = ServingTable::new();
    let p = policing(&w, &serving, true);
    p.reconciler().refresh(&w.path);
    let (v, share) = serving.served_share(&w.path).expect("the canary is served");
    assert_eq!((v.variant_id, share), (w.variant_id, 0.5));
    assert_eq!(v.expected_original, FileKey::of(&w.path).unwrap());
    let bid = w.binary_id;
    let states = w.catalog.run_blocking(move |c| base::variants_of(c, bid)).unwrap();
    assert_eq!(states[0].state, VariantState::Canary, "the evaluation's transition was recorded");

    let text = w.path.to_string_lossy().into_owned();
    w.catalog.run_blocking(move |c| set_pin(c, &text, Some(Pin::Original), 2)).unwrap();
    p.reconciler().refresh(&w.path);
    assert_eq!(serving.served_share(&w.path), None, "a pin to the original wins");
    let text = w.path.to_string_lossy().into_owned();
    w.catalog.run_blocking(move |c| set_pin(c, &text, Some(Pin::Bolted), 3)).unwrap();
    p.reconciler().refresh(&w.path);
    assert_eq!(serving.served_share(&w.path).map(|x| x.1), Some(1.0));

    // New content at the path: its variants no longer apply.
    std::fs::write(&w.path, b"upgraded").unwrap();
    p.reconciler().refresh(&w.path);
    assert_eq!(serving.served_share(&w.path), None);
}

#[test]
fn without_measurement_canaries_are_not_served_and_status_says_why() {
    let w = world(VariantState::Ready);
    let serving = ServingTable::new();
    let p = policing(&w, &serving, false);
    assert!(!p.measuring());
    p.reconciler().refresh(&w.path);
    assert_eq!(serving.served_share(&w.path), None);
    let status = p.status();
    let section = section_json(&*status);
    assert_eq!(section["measurement"]["on"], false);
    assert_eq!(section["measurement"]["why_off"], "not here");
    let summary = section["summary"].as_str().unwrap();
    assert!(summary.contains("no canaries (not here)"), "{summary}");
    let (bid, text) = (w.binary_id, w.path.to_string_lossy().into_owned());
    let (detail, reason) = w
        .catalog
        .run_blocking(move |c| {
            Ok((binary_json(&*status, c, bid), status.served_reason(c, bid, &text)))
        })
        .unwrap();
    let reason = reason.unwrap();
    assert!(reason.starts_with("canary") && reason.contains("measurement is off"), "{reason}");
    assert_eq!(detail.unwrap()["stage_text"], reason);
}

#[test]
fn the_configs_deny_list_and_the_users_exclusion_serve_the_original_as_a_link() {
    let w = world(VariantState::Served);
    let table = ServingTable::new();
    let pattern = format!("{}/*", w.path.parent().unwrap().display());
    let exclusions = Exclusions {
        patterns: PathPatterns::new(&[pattern], &[]).unwrap(),
        overlay: vec![w.path.parent().unwrap().to_path_buf()],
    };
    let s = serving_with(&w, &table, true, Parts { exclusions, ..Parts::default() });
    // Start-up finds the denied path in the overlaid directory, though the catalog would
    // serve its variant.
    s.reconciler().refresh_all().unwrap();
    assert!(table.is_excluded(&w.path));
    assert_eq!(table.served_share(&w.path), None);

    let table = ServingTable::new();
    let s = policing(&w, &table, true);
    s.reconciler().refresh(&w.path);
    assert!(table.served_share(&w.path).is_some(), "served without an exclusion");
    let text = w.path.to_string_lossy().into_owned();
    w.catalog.run_blocking(move |c| base::set_excluded(c, &text, true, 2)).unwrap();
    s.reconciler().refresh(&w.path);
    assert!(table.is_excluded(&w.path));
    assert_eq!(table.served_share(&w.path), None);
}

/// A catalog error shows in status as the error, not as an empty section that reads as
/// "nothing measured yet" (before, the per-binary policy status was silently left out).
#[test]
fn status_shows_catalog_errors() {
    let w = world(VariantState::Canary);
    let status = policing(&w, &ServingTable::new(), true).status();
    let (bid, text) = (w.binary_id, w.path.to_string_lossy().into_owned());
    let (detail, reason) = w
        .catalog
        .run_blocking(move |c| {
            c.execute_batch("DROP TABLE runs")?;
            Ok((binary_json(&*status, c, bid), status.served_reason(c, bid, &text)))
        })
        .unwrap();
    let detail = detail.expect("a policy section for the binary");
    assert!(detail["error"].as_str().is_some_and(|e| e.contains("runs")), "{detail}");
    assert!(detail["summary"].as_str().unwrap().starts_with("policy status unreadable"));
    assert!(reason.unwrap().contains("could not be read"));
}

#[test]
fn a_missing_store_file_is_not_served() {
    let w = world(VariantState::Served);
    let bid = w.binary_id;
    let store =
        w.catalog.run_blocking(move |c| base::variants_of(c, bid)).unwrap()[0].store_path.clone();
    std::fs::remove_file(store).unwrap();
    let serving = ServingTable::new();
    policing(&w, &serving, true).reconciler().refresh(&w.path);
    assert_eq!(serving.served_share(&w.path), None);
}

async fn wait_until(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..300 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_task_would_not_report_is_reconciled() {
    let w = world(VariantState::Canary);
    let serving = ServingTable::new();
    let p = policing(&w, &serving, true);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = TableSink { inner: p.inner.clone(), paths: tx };
    // The task last reported the original (say, while the path was pinned), and that
    // report was applied long ago.
    sink.set_decision(&w.path, ServeDecision::Original);
    assert_eq!(rx.try_recv().ok(), Some(w.path.clone()));
    // A control command (unpin) applies the canary at once, behind the task's back.
    let (inner, path) = (p.inner.clone(), w.path.clone());
    tokio::task::spawn_blocking(move || inner.refresh(&path)).await.unwrap();
    assert_eq!(serving.served_share(&w.path).map(|x| x.1), Some(0.5));
    assert_eq!(p.inner.diverged_paths(), vec![w.path.clone()]);
    // The variant is quarantined: the task's decision is the original again, equal to
    // what it last reported, so it reports nothing. The reconciliation catches it.
    let vid = w.variant_id;
    w.catalog
        .run(move |c| base::set_variant_state(c, vid, VariantState::Quarantined, Some("crashed")))
        .await
        .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(apply_decisions(p.inner.clone(), rx, shutdown));
    wait_until("the reconciliation", || serving.served_share(&w.path).is_none()).await;
    wait_until("the divergence to end", || p.inner.diverged_paths().is_empty()).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    drop(sink);
}

use crate::measure::fakes::ChannelSource;
struct Zero;
impl RunCounters for Zero {
    fn read(&mut self) -> io::Result<CounterReading> {
        Ok(CounterReading::default())
    }
}
struct Factory;
impl CounterFactory for Factory {
    fn attach(&self, pid: i32) -> io::Result<Box<dyn RunCounters>> {
        if pid == 666 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(Box::new(Zero))
    }
}
struct Alive;
impl ProcessView for Alive {
    fn cmdline(&self, _pid: i32) -> Option<Vec<u8>> {
        None
    }
    fn is_alive(&self, _pid: i32) -> bool {
        true
    }
}

fn fake_measurer() -> ((Measurer, mpsc::UnboundedReceiver<RunRecord>), std_mpsc::Sender<ProcEvent>)
{
    let (tx, rx) = std_mpsc::channel();
    (Measurer::with_parts(Arc::new(Factory), ChannelSource(rx), Alive).unwrap(), tx)
}

#[test]
fn exec_opens_are_measured_before_the_event_is_forwarded() {
    let w = world(VariantState::Ready);
    let (measured, _events) = fake_measurer();
    let p = Serving::with_measurer(Parts::default(), &w.catalog, ServingTable::new(), Ok(measured));
    let (tx, mut rx) = mpsc::unbounded_channel::<FsEvent>();
    let sink = p.event_sink(Arc::new(tx));
    let opened = |pid, exec| FsEvent::Opened {
        mirror_path: "/mnt/x/tool".into(),
        original: w.path.clone(),
        backing: w.path.clone(),
        key: key(),
        variant_id: Some(w.variant_id),
        pid,
        exec,
    };
    sink.event(opened(10, true));
    sink.event(opened(11, false));
    sink.event(opened(666, true));
    sink.event(FsEvent::Seen { original: w.path.clone(), key: key() });
    let forwarded: Vec<FsEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(forwarded.len(), 4, "every event goes on");
    let m = p.inner.measurement.measurer.as_ref().unwrap();
    // The measurer's thread publishes its count after it takes the registration.
    crate::measure::fakes::wait_until(|| m.pending() == 1, "the registration taken");
    assert_eq!(m.pending(), 1, "only the exec-time open that could attach is pending");
    let section = section_json(&*p.status());
    assert_eq!(section["measurement"]["dropped"]["not_attached"], 1);
    assert_eq!(section["measurement"]["pending"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_task_drives_the_serving_table() {
    let w = world(VariantState::Served);
    let serving = ServingTable::new();
    let p = policing(&w, &serving, true);
    let (stop, shutdown) = watch::channel(false);
    let tasks = p.spawn(&tokio::runtime::Handle::current(), shutdown);
    // The first rescan evaluates every watched binary: the served variant gets all but
    // the exploration share.
    let mut got = None;
    for _ in 0..200 {
        got = serving.served_share(&w.path).map(|x| (x.0.variant_id, x.1));
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, Some((w.variant_id, 0.95)));
    // A pin noticed by the rescan alone (no refresh call) reaches the table too.
    let text = w.path.to_string_lossy().into_owned();
    w.catalog.run(move |c| set_pin(c, &text, Some(Pin::Original), 2)).await.unwrap();
    for _ in 0..400 {
        if serving.served_share(&w.path).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(serving.served_share(&w.path), None);
    // Shutdown ends every task it started.
    assert_eq!(tasks.len(), 3);
    stop.send(true).unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }
}

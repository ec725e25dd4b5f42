//! The wiring's parts together over an in-memory catalog and the real BOLT discovery:
//! the optimizer turned off with its reason, the pipeline stages, and `reset`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::catalog::{base, bolt_jobs, profiles, runs};
use crate::clock::SystemClock;
use crate::config::{FileConfig, Overrides};
use crate::control::subsystem::section_json;
use crate::elf::ElfFacts;
use crate::identity::{ContentId, FileKey};
use crate::policy::Pipeline;

/// A temp dir others may enter (the sandbox user must reach the scratch directory).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn config(dir: &Path, optimizer: &str) -> Config {
    let text = format!(
        "[profile]\nmin_samples = 100\nmin_runs = 2\nmin_stability = 0.5\n\n[optimizer]\n\
         min_text_bytes = 1024\n{optimizer}"
    );
    let file: FileConfig = toml::from_str(&text).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    Config::resolve(
        file,
        Overrides {
            mountpoint: Some(dir.join("mnt")),
            state_dir: Some(dir.join("state")),
            overlay: vec![dir.join("bin")],
            ..Default::default()
        },
        None,
    )
    .unwrap()
}

fn facts(symbols: bool) -> ElfFacts {
    ElfFacts {
        is_elf: true,
        x86_64: true,
        pie: true,
        has_symbols: symbols,
        function_symbols: 10,
        has_relocs: true,
        text_size: 8 * 1024,
        bolted: false,
        build_id: None,
    }
}

/// Indexes a file at `<dir>/bin/<name>` with `facts`; returns its path and binary id.
fn indexed(catalog: &Catalog, cfg: &Config, name: &str, facts: ElfFacts) -> (PathBuf, i64) {
    let path = cfg.overlay[0].join(name);
    std::fs::write(&path, name).unwrap();
    let key = FileKey::of(&path).unwrap();
    let text = path.to_string_lossy().into_owned();
    let id = catalog
        .run_blocking(move |c| {
            let id = base::upsert_binary(c, &ContentId::of_bytes(text.as_bytes()), 1, &facts, 1)?;
            base::upsert_path(c, &text, Some(id), &key, 1)?;
            Ok(id)
        })
        .unwrap();
    (path, id)
}

fn pipeline(o: &Optimizing, catalog: &Catalog, id: i64) -> Pipeline {
    let view = o.pipeline_view();
    catalog.run_blocking(move |c| Ok(view.pipeline(c, id))).unwrap()
}

#[test]
fn a_missing_bolt_turns_the_optimizer_off_with_where_it_looked() {
    let dir = open_tempdir();
    let scratch = dir.path().join("scratch");
    let cfg = config(
        dir.path(),
        &format!(
            "scratch_dir = {:?}\nbolt = \"/nonexistent/llvm-bolt\"\n",
            scratch.display().to_string()
        ),
    );
    let catalog = Catalog::in_memory().unwrap();
    let o = Optimizing::new(&cfg, &catalog, Arc::new(SystemClock), None).unwrap();
    let section = section_json(&*o.status());
    let summary = section["summary"].as_str().unwrap();
    assert!(summary.starts_with("off: BOLT is not installed"), "{summary}");
    assert!(summary.contains("/nonexistent/llvm-bolt: not found"), "{summary}");
    assert_eq!(section["bolt"]["found"], false);
    let (path, id) = indexed(&catalog, &cfg, "tool", facts(true));
    let err = o.hooks().optimize(&path).unwrap_err();
    assert_eq!(err.errno, libc::EINVAL);
    assert!(err.message.contains("the optimizer is off"), "{}", err.message);
    assert!(matches!(pipeline(&o, &catalog, id), Pipeline::NotCandidate(w) if w.contains("off")));
}

#[test]
fn a_scratch_dir_the_sandbox_user_cannot_reach_turns_it_off() {
    // Only root has a sandbox user to drop to: the suite runs as root (a run as another user
    // fails here rather than passing without checking anything).
    assert!(SandboxUser::resolve().is_some(), "run as root: the sandbox user is only used then");
    let dir = tempfile::tempdir().unwrap();
    // Like the state directory: nobody else may enter it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let scratch = dir.path().join("scratch");
    let cfg = config(dir.path(), &format!("scratch_dir = {:?}\n", scratch.display().to_string()));
    let o =
        Optimizing::new(&cfg, &Catalog::in_memory().unwrap(), Arc::new(SystemClock), None).unwrap();
    let summary = section_json(&*o.status())["summary"].as_str().unwrap().to_string();
    assert!(summary.contains("the scratch directory is unusable"), "{summary}");
}

#[test]
fn a_scratch_dir_everyone_may_write_is_refused_and_left_untouched() {
    let dir = open_tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let cfg = config(dir.path(), &format!("scratch_dir = {:?}\n", shared.display().to_string()));
    let o =
        Optimizing::new(&cfg, &Catalog::in_memory().unwrap(), Arc::new(SystemClock), None).unwrap();
    let summary = section_json(&*o.status())["summary"].as_str().unwrap().to_string();
    assert!(summary.contains("writable by everyone"), "{summary}");
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777);
}

#[tokio::test]
async fn the_scratch_dir_waits_for_the_first_job() {
    let dir = open_tempdir();
    let scratch = dir.path().join("scratch");
    let cfg = config(dir.path(), &format!("scratch_dir = {:?}\n", scratch.display().to_string()));
    let o =
        Optimizing::new(&cfg, &Catalog::in_memory().unwrap(), Arc::new(SystemClock), None).unwrap();
    assert!(o.shared.off.is_none(), "{:?}", o.shared.off);
    assert!(!scratch.exists(), "created before any job needed it");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let hooks = instrumenting::Hooks::none();
    let tasks = o.spawn(&tokio::runtime::Handle::current(), shutdown, hooks);
    assert_eq!(tasks.len(), 2, "the queue and the driver");
    stop.send(true).unwrap();
    for task in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(10), task).await.unwrap().unwrap();
    }
    assert!(!scratch.exists());
}

#[test]
fn pipeline_stages_and_reset() {
    let dir = open_tempdir();
    let scratch = dir.path().join("scratch");
    let cfg = config(dir.path(), &format!("scratch_dir = {:?}\n", scratch.display().to_string()));
    let catalog = Catalog::in_memory().unwrap();
    let o = Optimizing::new(&cfg, &catalog, Arc::new(SystemClock), None).unwrap();
    assert!(o.shared.off.is_none(), "BOLT is installed here: {:?}", o.shared.off);

    let (_, stripped) = indexed(&catalog, &cfg, "stripped", facts(false));
    assert!(matches!(
        pipeline(&o, &catalog, stripped),
        Pipeline::NotCandidate(w) if w.contains("stripped")
    ));
    let err = o.hooks().optimize(&cfg.overlay[0].join("stripped")).unwrap_err();
    assert!(err.message.contains("stripped"), "{}", err.message);

    let (path, id) = indexed(&catalog, &cfg, "tool", facts(true));
    assert_eq!(pipeline(&o, &catalog, id), Pipeline::Collecting);
    let details = catalog.run_blocking({
        let report = o.status();
        move |c| {
            let mut d = crate::control::details::BinaryDetails::default();
            report.binary(c, id, &mut d);
            Ok(d)
        }
    });
    let details = details.unwrap().optimizer.unwrap();
    let details = details.read().unwrap();
    assert!(details.facts_only);
    assert!(details.summary.contains("unknown until it is profiled"), "{}", details.summary);

    catalog
        .run_blocking(move |c| {
            let batch = profiles::WindowBatch {
                samples: vec![("hot".into(), 0, 90)],
                own_samples: 90,
                new_runs: 1,
                ..Default::default()
            };
            profiles::add_window(c, id, 0, "cpu-clock", &batch, 1)?;
            let failed = bolt_jobs::AttemptRecord {
                binary_id: id,
                outcome: "exit 1".into(),
                tail: Some("BOLT-INFO: x\nBOLT-ERROR: broken\n".into()),
                profile_samples: 90,
                bolt_version: "22.1.8".into(),
                ..Default::default()
            };
            bolt_jobs::record_attempt(c, &failed, 2)?;
            bolt_jobs::set_failed_until_change(c, id, true, 2)?;
            base::insert_variant(
                c,
                &base::NewVariant {
                    binary_id: id,
                    kind: base::VariantKind::Bolt,
                    sha256: ContentId::of_bytes(b"v").hex(),
                    state: base::VariantState::Ready,
                    ..Default::default()
                },
                2,
            )?;
            runs::record_decision(
                c,
                &runs::DecisionRow {
                    at_ms: 1,
                    binary_id: id,
                    variant_id: None,
                    action: "start_canary".into(),
                    from_state: None,
                    to_state: None,
                    first_run_id: None,
                    detail: "x".into(),
                    profile_samples: None,
                },
            )?;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        pipeline(&o, &catalog, id),
        Pipeline::BoltFailed("exit 1: BOLT-INFO: x | BOLT-ERROR: broken".into())
    );

    let done = o.hooks().reset(&path).unwrap();
    assert!(done.contains("1 variant(s) forgotten"), "{done}");
    let left = catalog
        .run_blocking(move |c| {
            Ok((
                profiles::windows(c, id)?.len(),
                profiles::profile_head(c, id)?.is_none(),
                bolt_jobs::job_of(c, id)?.is_none(),
                runs::decisions_of(c, id)?.len(),
                base::variants_of(c, id)?.into_iter().map(|v| v.state).collect::<Vec<_>>(),
            ))
        })
        .unwrap();
    assert_eq!(left, (0, true, true, 0, vec![base::VariantState::Retired]));
    assert_eq!(pipeline(&o, &catalog, id), Pipeline::Collecting);
    let err = o.hooks().reset(&cfg.overlay[0].join("never-seen")).unwrap_err();
    assert_eq!(err.errno, libc::EINVAL);
}

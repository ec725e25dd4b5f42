//! The flag search in the real daemon with real BOLT and a real mount: a gcc-built program
//! (symbols, PIE, `-Wl,--emit-relocs`) run through `<mnt>/bin` gets its BOLT variant with
//! the default flags (from an instrumentation profile: sampling is set never to mature).
//! That variant is then marked served in the catalog: whether a real canary promotes a
//! tiny program's variant depends on a gain the test cannot control, and the search only
//! starts from a served variant. From there everything is the daemon's: the driver builds
//! a challenger with the first other flag set from the served variant's kept profile; the
//! policy canaries it against the served variant (the mount serves both, and the
//! original's exploration share); it is decided; the outcome is recorded in `flag_trials`
//! and shown in status; and with `max_challengers = 1` no second challenger is built.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, catalog_read_only};

const ARG: &str = "200000";

fn output(cmd: &mut Command) -> String {
    let out = common::run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
}

/// (id, state, flags) of every BOLT variant of the binary with this sha256.
fn bolt_variants(state: &Path, sha256: &str) -> Vec<(i64, String, String)> {
    let c = catalog_read_only(state);
    let mut stmt = c
        .prepare(
            "SELECT v.id, v.state, COALESCE(v.flags, '') FROM variants v
             JOIN binaries b ON b.id = v.binary_id
             WHERE b.sha256 = ?1 AND v.kind = 'bolt' ORDER BY v.id",
        )
        .unwrap();
    stmt.query_map([sha256], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// (flag set, challenger, variant, outcome, detail) of every flag trial of the binary.
type Trial = (String, bool, Option<i64>, String, String);

fn trials(state: &Path, sha256: &str) -> Vec<Trial> {
    let c = catalog_read_only(state);
    let mut stmt = c
        .prepare(
            "SELECT t.flag_set, t.challenger, t.variant_id, t.outcome, COALESCE(t.detail, '')
             FROM flag_trials t JOIN binaries b ON b.id = t.binary_id
             WHERE b.sha256 = ?1 ORDER BY t.rowid",
        )
        .unwrap();
    stmt.query_map([sha256], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn runs_of_variant(state: &Path, variant: i64) -> i64 {
    catalog_read_only(state)
        .query_row("SELECT COUNT(*) FROM runs WHERE variant_id = ?1", [variant], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_challenger_with_other_flags_is_canaried_against_the_served_variant() {
    let dir = common::open_tempdir();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let prog = bin.join("prog");
    common::cc(common::STEPS_C, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let expected = output(Command::new(&prog).arg(ARG));
    // One look at 5 pairs decides a challenger (promoted only when faster beyond noise on
    // 20 pairs, so at 5 it is rejected unless the look is already clear).
    let config = format!(
        "[profile]\nflush_secs = 1\nmin_samples = 100000000\ninstrument_first_runs = 3\n\
         instrument_max_runs = 3\n\n\
         [optimizer]\nscratch_dir = {:?}\nmin_text_bytes = 256\ncheck_interval_secs = 1\n\
         timeout_secs = 120\nmax_challengers = 1\n\n\
         [policy]\nmin_runs = 5\nlooks = 1\nrescan_ms = 100\n",
        root.join("scratch").display().to_string(),
    );
    std::fs::write(root.join("config.toml"), config).unwrap();
    std::fs::create_dir(root.join("mnt")).unwrap();
    let state = root.join("state");
    let d = Daemon::start(&root.join("mnt"), &[&bin], &state, Some(&root.join("config.toml")));
    let through_mount = d.bin().join("prog");
    let sha = optbin::identity::ContentId::of_file(&prog).unwrap().hex();

    // The first variant, with the default flags.
    let (first, _, first_flags) =
        d.wait_for(Duration::from_secs(60), "the first BOLT variant", |_| {
            assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected);
            bolt_variants(&state, &sha).into_iter().next()
        });
    assert!(first_flags.contains("-reorder-blocks=ext-tsp"), "{first_flags}");
    assert!(!first_flags.contains("-icf"), "{first_flags}");
    let first_profile = d.wait_for(Duration::from_secs(10), "the default set's trial", |_| {
        trials(&state, &sha).into_iter().find(|t| t.0 == "default" && t.3 != "building")
    });
    assert_eq!(first_profile.2, Some(first), "{first_profile:?}");
    assert!(!first_profile.1, "the first build is no challenger");
    {
        let c = rusqlite::Connection::open(state.join("catalog.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute("UPDATE variants SET state = 'served' WHERE id = ?1", [first]).unwrap();
    }

    // The challenger: another flag set, from the same (kept) profile.
    let (challenger, _, flags) =
        d.wait_for(Duration::from_secs(60), "a challenger with other flags", |_| {
            bolt_variants(&state, &sha).into_iter().find(|v| v.0 != first)
        });
    assert!(flags.contains("-icf -peepholes=all -plt=hot -frame-opt=hot"), "{flags}");
    assert!(flags.contains("-data=<profile>"), "{flags}");

    // Canaried against the served variant: both arms run through the mount, outputs equal.
    d.wait_for(Duration::from_secs(60), "the challenger decided", |_| {
        assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected);
        let t = trials(&state, &sha).into_iter().find(|t| t.0 == "cleanup-passes")?;
        matches!(t.3.as_str(), "served" | "rejected").then_some(())
    });
    let all = trials(&state, &sha);
    eprintln!("flag trials: {all:#?}");
    let trial = all.iter().find(|t| t.0 == "cleanup-passes").unwrap();
    assert!(trial.1, "a challenger: {trial:?}");
    assert_eq!(trial.2, Some(challenger));
    assert!(trial.4.contains("variant"), "the decision names the served variant: {trial:?}");
    assert!(runs_of_variant(&state, challenger) >= 5, "measured on real runs");
    assert!(runs_of_variant(&state, first) >= 5, "the served variant is the other arm");
    let decision: String = catalog_read_only(&state)
        .query_row(
            "SELECT detail FROM policy_decisions WHERE variant_id = ?1
             AND action IN ('promote', 'reject') ORDER BY id DESC LIMIT 1",
            [challenger],
            |r| r.get(0),
        )
        .unwrap();
    assert!(decision.contains(&format!("variant {first}")), "{decision}");

    // Status shows the search; the bound holds: no second challenger.
    let details = d.binary(&prog).expect("the binary in status")["details"]["optimizer"].clone();
    let search = &details["flag_search"];
    assert_eq!(search["tried"].as_array().map(Vec::len), Some(2), "{search}");
    assert!(search["next"].as_str().unwrap_or("").contains("1 of at most 1"), "{search}");
    assert!(d.status_text().contains("flag search: cleanup-passes"), "{}", d.status_text());
    for _ in 0..5 {
        assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected);
    }
    assert_eq!(bolt_variants(&state, &sha).len(), 2, "{:?}", bolt_variants(&state, &sha));
    drop(d);
    assert!(!common::is_mounted(&root.join("mnt")));
}

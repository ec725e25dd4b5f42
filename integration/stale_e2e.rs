//! Profiles that survive upgrades, in the real daemon with real BOLT and a real mount: a
//! gcc-built program (symbols, PIE, `-Wl,--emit-relocs`) run through `<mnt>/bin` gets its
//! BOLT variant (from an instrumentation profile: sampling is set never to mature), and
//! the build keeps its profile in BOLT's YAML form under `<state>/stale-profiles/`. Then
//! the program is upgraded: rebuilt with one function changed (its output changes too) and
//! renamed over the original. The new version is built at once from the old version's
//! profile (`-infer-stale-profile`), without a profile of its own; status says so; and
//! the policy canaries it like any variant, whose runs print the *new* version's output.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, catalog_read_only};

const ARG: &str = "200000";

fn build(out: &Path, mask: &str) {
    let define = format!("-DMASK={mask}");
    common::cc(common::STEPS_C, out, &["-fPIE", "-pie", "-Wl,--emit-relocs", &define]);
}

fn output(cmd: &mut Command) -> String {
    let out = common::run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
}

/// One BOLT variant of the binary with this sha256.
#[derive(Debug)]
struct Variant {
    id: i64,
    state: String,
    flags: String,
    profile_samples: i64,
}

fn bolt_variants(state: &Path, sha256: &str) -> Vec<Variant> {
    let c = catalog_read_only(state);
    let mut stmt = c
        .prepare(
            "SELECT v.id, v.state, COALESCE(v.flags, ''), COALESCE(v.profile_samples, 0)
             FROM variants v JOIN binaries b ON b.id = v.binary_id
             WHERE b.sha256 = ?1 AND v.kind = 'bolt' ORDER BY v.id",
        )
        .unwrap();
    stmt.query_map([sha256], |r| {
        Ok(Variant {
            id: r.get(0)?,
            state: r.get(1)?,
            flags: r.get(2)?,
            profile_samples: r.get(3)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn sha256(path: &Path) -> String {
    optbin::identity::ContentId::of_file(path).unwrap().hex()
}

fn runs_of_variant(state: &Path, variant: i64) -> i64 {
    catalog_read_only(state)
        .query_row("SELECT COUNT(*) FROM runs WHERE variant_id = ?1", [variant], |r| r.get(0))
        .unwrap()
}

/// The kept profile's metadata files (`<key>.json`) under `<state>/stale-profiles`.
fn kept_metas(state: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(state.join("stale-profiles")) else { return vec![] };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect()
}

#[test]
fn an_upgraded_binary_is_built_at_once_from_its_previous_versions_profile() {
    let dir = common::open_tempdir();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let prog = bin.join("prog");
    build(&prog, "0xff");
    let expected_v1 = output(Command::new(&prog).arg(ARG));
    let config = format!(
        "[profile]\nflush_secs = 1\nmin_samples = 100000000\ninstrument_first_runs = 3\n\
         instrument_max_runs = 3\n\n\
         [optimizer]\nscratch_dir = {:?}\nmin_text_bytes = 256\ncheck_interval_secs = 1\n\
         timeout_secs = 120\n",
        root.join("scratch").display().to_string(),
    );
    std::fs::write(root.join("config.toml"), config).unwrap();
    std::fs::create_dir(root.join("mnt")).unwrap();
    let state = root.join("state");
    let d = Daemon::start(&root.join("mnt"), &[&bin], &state, Some(&root.join("config.toml")));
    let through_mount = d.bin().join("prog");

    // Version 1: instrumented runs, then a BOLT variant from its own profile, whose
    // profile is kept for the next version.
    let v1 = sha256(&prog);
    let mut v1_runs = 0;
    let built = d.wait_for(Duration::from_secs(120), "version 1's BOLT variant", |_| {
        v1_runs += 1;
        assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected_v1);
        bolt_variants(&state, &v1).into_iter().next()
    });
    assert!(built.flags.contains("-w=<profile.yaml>"), "{built:?}");
    assert!(!built.flags.contains("-infer-stale-profile"), "{built:?}");
    let kept = d.wait_for(Duration::from_secs(10), "version 1's kept profile", |_| {
        kept_metas(&state).into_iter().find(|m| m["sha256"] == v1.as_str())
    });
    assert_eq!(kept["path"], prog.to_str().unwrap());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("stale-profiles")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "kept profiles are root's");

    // The upgrade: version 2 built beside, renamed over version 1.
    let staged = root.join("prog.v2");
    build(&staged, "0x1ff");
    let expected_v2 = output(Command::new(&staged).arg(ARG));
    assert_ne!(expected_v1, expected_v2, "the change shows in the output");
    std::fs::rename(&staged, &prog).unwrap();
    let v2 = sha256(&prog);
    // The rename tells the daemon of the new version (it looked up the old one); one run
    // checks what runs. Then nothing runs until its variant exists: it cannot come from a
    // profile of its own.
    assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected_v2);
    let bridge =
        d.wait_for(Duration::from_secs(90), "version 2's variant from the old profile", |_| {
            bolt_variants(&state, &v2).into_iter().next()
        });
    eprintln!("version 1: {v1_runs} runs to its variant {built:?}; version 2: {bridge:?}");
    let data = format!("-data=<stale profile of version {}>", &v1[..12]);
    assert!(bridge.flags.starts_with(&format!("{data} -infer-stale-profile")), "{bridge:?}");
    assert_eq!(bridge.profile_samples, 1, "recorded as a bridge: {bridge:?}");
    let origin = format!("built from the stale profile of version {}", &v1[..12]);
    // The event log has BOLT's own count of what matched.
    let event: String = d.wait_for(Duration::from_secs(10), "the bridge's event", |_| {
        catalog_read_only(&state)
            .query_row(
                "SELECT detail FROM events WHERE kind = 'bolt' AND path = ?1 AND detail LIKE ?2",
                [prog.to_str().unwrap(), &format!("{origin}%")],
                |r| r.get(0),
            )
            .ok()
    });
    assert!(event.contains("functions have a profile"), "BOLT's match: {event}");
    eprintln!("event: {event}");
    let instrumented: i64 = catalog_read_only(&state)
        .query_row(
            "SELECT COALESCE(MAX(i.runs), 0) FROM instr_profiles i JOIN binaries b
             ON b.id = i.binary_id WHERE b.sha256 = ?1",
            [&v2],
            |r| r.get(0),
        )
        .unwrap();
    assert!(instrumented < 3, "version 2's own profile is not complete: {instrumented}");
    let details = d.binary(&prog).expect("version 2 in status")["details"]["optimizer"].clone();
    let shown = details["stale_profile"].as_str().unwrap_or_default().to_string();
    assert!(shown.contains(&origin), "status.json shows the bridge: {details}");
    assert!(d.status_text().contains(&origin), "status shows the bridge");

    // The policy decides as for any variant: a canary, whose runs print version 2's output.
    d.wait_for(Duration::from_secs(90), "runs of version 2's variant", |_| {
        assert_eq!(output(Command::new(&through_mount).arg(ARG)), expected_v2);
        (runs_of_variant(&state, bridge.id) >= 3).then_some(())
    });
    let now = bolt_variants(&state, &v2);
    assert!(
        now.iter().any(|v| v.id == bridge.id && v.state != "ready" && v.state != "retired"),
        "the policy took it up: {now:?}"
    );
    drop(d);
    assert!(!common::is_mounted(&root.join("mnt")));
}

//! The optimizer in the real daemon, end to end: `optbin mount --foreground` on temp dirs
//! overlays a directory holding a gcc-built CPU-bound program (symbols, PIE,
//! `-Wl,--emit-relocs`) and a stripped copy of it; the program runs through `<mnt>/bin`;
//! a mature profile turns into a BOLT variant that status.json, the catalog and the store
//! show; `optimize` and `reset` work through `.optbin/control`; a BOLT that fails leaves
//! the original served and its output's tail in status.json.
//!
//! The profile comes from the daemon's own sampler (`[profile]` set to mature after a few
//! short runs): the test only runs the program through the mount until status.json shows
//! what it waits for.

#[path = "common/branchy.rs"]
mod branchy;
#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

/// A BOLT that reports a version and fails every run with a recognisable message.
const FAKE_BOLT: &str = "#!/bin/sh
if [ \"$1\" = \"--version\" ]; then
  echo 'LLVM (http://llvm.org/):'
  echo '  LLVM version 1.0.0'
  exit 0
fi
echo 'BOLT-INFO: fake BOLT for the optbin e2e test'
echo 'BOLT-ERROR: fake failure for the e2e test' >&2
exit 1
";

struct Fixture {
    dir: tempfile::TempDir,
    bin: PathBuf,
    prog: PathBuf,
    plain: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = common::open_tempdir();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let bin = std::fs::canonicalize(&bin).unwrap();
        let prog = bin.join("prog");
        common::cc(branchy::PROGRAM, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
        let plain = bin.join("plain");
        common::cc(branchy::PROGRAM, &plain, &["-fPIE", "-pie"]);
        assert!(Command::new("strip").arg(&plain).status().unwrap().success());
        let fake = dir.path().join("fake-bolt");
        std::fs::write(&fake, FAKE_BOLT).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Self { dir, bin, prog, plain }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes the config: low maturity, scratch in the temp dir, and `bolt` when given.
    fn write_config(&self, bolt: Option<&Path>) {
        let bolt_line =
            bolt.map_or(String::new(), |b| format!("bolt = {:?}\n", b.display().to_string()));
        let config = format!(
            "[profile]\ninstrumentation = \"off\"\nfrequency_hz = 499\nflush_secs = 1\nwindow_secs = 2\n\
             identify_after_samples = 20\nmin_samples = 500\nmin_runs = 2\nmin_stability = 0.5\n\n\
             [optimizer]\nscratch_dir = {:?}\nmin_text_bytes = 1024\ncheck_interval_secs = 1\n\
             timeout_secs = 120\n{bolt_line}",
            self.path("scratch").display().to_string()
        );
        std::fs::write(self.path("config.toml"), config).unwrap();
    }

    fn start(&self) -> Daemon {
        std::fs::create_dir_all(self.path("mnt")).unwrap();
        Daemon::start(
            &self.path("mnt"),
            &[&self.bin],
            &self.path("state"),
            Some(&self.path("config.toml")),
        )
    }

    fn catalog(&self) -> Connection {
        let c = Connection::open_with_flags(
            self.path("state/catalog.db"),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    fn binary_id(&self, path: &Path) -> Option<i64> {
        self.catalog()
            .query_row(
                "SELECT binary_id FROM paths WHERE path = ?1",
                [path.to_string_lossy()],
                |r| r.get(0),
            )
            .ok()
            .flatten()
    }
}

fn run(program: &Path, arg: &str) -> String {
    let out = common::run(Command::new(program).arg(arg));
    assert_eq!(out.code, Some(0), "{} {arg}: {}", program.display(), out.stderr);
    out.stdout
}

/// The status entry of `path`.
fn binary<'a>(status: &'a Value, path: &Path) -> Option<&'a Value> {
    status["binaries"].as_array()?.iter().find(|b| b["path"] == path.to_string_lossy().as_ref())
}

fn optimizer(status: &Value) -> &Value {
    &status["subsystems"]["optimizer"]
}

fn idle(status: &Value) -> bool {
    let o = optimizer(status);
    o["queued"].as_array().is_some_and(|q| q.is_empty())
        && o["running"].as_array().is_some_and(|r| r.is_empty())
}

/// Runs `prog` through the mount (feeding the daemon's sampler) until `done` answers.
fn drive_until<T>(
    d: &Daemon,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Value) -> Option<T>,
) -> T {
    let prog = d.bin().join("prog");
    d.wait_for(timeout, what, |d| {
        run(&prog, branchy::WORK);
        done(&d.status_json())
    })
}

#[test]
fn mature_profiles_become_variants_and_commands_reach_the_optimizer() {
    let fx = Fixture::new();
    let expected = run(&fx.prog, branchy::QUICK);

    // Phase 1: a BOLT that always fails. The original stays served; status shows why.
    let fake = fx.path("fake-bolt");
    fx.write_config(Some(&fake));
    let mut d = fx.start();
    let section = optimizer(&d.status_json()).clone();
    assert_eq!(section["bolt"]["found"], true, "{section:#}");
    assert_eq!(section["bolt"]["path"], fake.to_string_lossy().as_ref());
    let mnt_bin = d.mnt.join("bin");
    assert_eq!(run(&mnt_bin.join("prog"), branchy::QUICK), expected);
    assert_eq!(run(&mnt_bin.join("plain"), branchy::QUICK), expected);
    let id = d.wait_for(Duration::from_secs(20), "prog to be indexed", |_| fx.binary_id(&fx.prog));
    d.wait_for(Duration::from_secs(20), "plain to be indexed", |_| fx.binary_id(&fx.plain));
    let failure = drive_until(&d, "the fake BOLT's failure", Duration::from_secs(60), |s| {
        let job = binary(s, &fx.prog)?["details"]["optimizer"]["job"].clone();
        (job["failed_until_change"] == true && idle(s)).then(|| s.clone())
    });
    let o = optimizer(&failure);
    println!("after the fake BOLT: {}", o["summary"]);
    let listed = &o["failures"][0]["job"];
    assert_eq!(listed["binary_id"], id, "{o:#}");
    assert_eq!(listed["last_outcome"], "exit 1");
    let tail = listed["failure_tail"].as_str().unwrap();
    assert!(tail.contains("BOLT-ERROR: fake failure for the e2e test"), "{tail}");
    assert!(o["summary"].as_str().unwrap().contains("failed"), "{}", o["summary"]);
    let prog_status = binary(&failure, &fx.prog).unwrap();
    // No variant to serve: passed through, it runs natively.
    assert_eq!(prog_status["served"], "original (link)");
    assert!(prog_status["variants"].as_array().unwrap().is_empty());
    assert!(prog_status["candidate"].as_bool().unwrap(), "{prog_status:#}");
    assert_eq!(
        run(&mnt_bin.join("prog"), branchy::QUICK),
        expected,
        "the original is still served"
    );
    d.stop();
    assert!(!d.log().contains("panicked"), "{}", d.log());
    assert!(!fx.path("scratch").exists(), "the scratch root the jobs created outlived the daemon");

    // Phase 2: the real BOLT. Its version differs from the failed one's: the binary is
    // built again, without anyone asking.
    fx.write_config(None);
    d.restart();
    let status = drive_until(&d, "a stored BOLT variant", Duration::from_secs(60), |s| {
        let has = binary(s, &fx.prog)?["variants"].as_array()?.iter().any(|v| v["kind"] == "bolt");
        (has && idle(s)).then(|| s.clone())
    });
    let o = optimizer(&status);
    println!("with the real BOLT: {}", o["summary"]);
    println!("prog: {}", binary(&status, &fx.prog).unwrap()["details"]["optimizer"]["summary"]);
    let version = o["bolt"]["version"].as_str().unwrap().to_string();
    assert!(o["store"]["files"].as_u64().unwrap() >= 1, "{o:#}");
    let (state, bolt_version, store_path): (String, String, String) = fx
        .catalog()
        .query_row(
            "SELECT state, bolt_version, store_path FROM variants WHERE binary_id = ?1 AND kind = 'bolt'",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(["ready", "canary", "served"].contains(&state.as_str()), "{state}");
    assert_eq!(bolt_version, version);
    let variant = PathBuf::from(&store_path);
    assert!(variant.is_file(), "{store_path}");
    assert_eq!(run(&variant, branchy::QUICK), expected, "the variant behaves like the original");
    assert_eq!(run(&variant, "12345"), run(&fx.prog, "12345"));
    let details = &binary(&status, &fx.prog).unwrap()["details"]["optimizer"];
    assert_eq!(details["job"]["last_outcome"], "ok", "{details:#}");
    assert_eq!(details["mode"], "relocation mode");
    assert_eq!(details["facts_only"], false);

    // `optimize` on the stripped binary: EINVAL, and last_error says why.
    let err = d.control("optimize plain").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert!(d.last_error().contains("stripped"), "{}", d.last_error());
    let plain = binary(&status, &fx.plain).unwrap();
    assert_eq!(plain["candidate"], false);
    assert!(plain["candidate_reason"].as_str().unwrap().contains("stripped"));

    // `optimize` on the candidate queues a build now, though nothing changed.
    let built = o["built"].as_u64().unwrap();
    d.control("optimize prog").unwrap_or_else(|e| panic!("{e}: {}", d.last_error()));
    // BOLT takes far longer than the next write: the job is still queued or running.
    let err = d.control("reset prog").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert!(d.last_error().contains("queued or running"), "{}", d.last_error());
    d.wait_for(Duration::from_secs(60), "the requested build", |d| {
        let s = d.status_json();
        (idle(&s) && optimizer(&s)["built"].as_u64()? > built).then_some(())
    });

    // `reset` forgets profile, variants and BOLT history, and serves the original.
    d.control("reset prog").unwrap_or_else(|e| panic!("{e}: {}", d.last_error()));
    let c = fx.catalog();
    let count = |sql: &str| -> i64 { c.query_row(sql, [id], |r| r.get(0)).unwrap() };
    assert_eq!(count("SELECT count(*) FROM profile_windows WHERE binary_id = ?1"), 0);
    assert_eq!(count("SELECT count(*) FROM profile_samples WHERE binary_id = ?1"), 0);
    assert_eq!(count("SELECT count(*) FROM bolt_jobs WHERE binary_id = ?1"), 0);
    assert_eq!(
        count("SELECT count(*) FROM variants WHERE binary_id = ?1 AND state != 'retired'"),
        0
    );
    assert!(count("SELECT count(*) FROM variants WHERE binary_id = ?1") >= 1);
    let after = d.status_json();
    let prog_status = binary(&after, &fx.prog).unwrap();
    assert_eq!(prog_status["served"], "original (link)", "nothing to serve: it runs natively");
    assert!(prog_status["details"]["optimizer"]["job"].is_null());
    let err = d.control("reset nosuchprogram").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(run(&mnt_bin.join("prog"), branchy::QUICK), expected);
    d.stop();
    assert!(!d.log().contains("panicked"), "{}", d.log());
    assert!(!fx.path("scratch").exists(), "the scratch root the jobs created outlived the daemon");
}

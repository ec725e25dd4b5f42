//! The optimizer end to end: programs compiled here with gcc, real profiles (`perf record`
//! and `perf2bolt`), real BOLT (19 and 22), the real sandbox, store and catalog; forced
//! failures through fake BOLT executables written by the tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use optbin::bolt::applicability::ApplicabilityConfig;
use optbin::bolt::perf2bolt::{fdata_samples, perf_to_fdata, record_cpu_clock};
use optbin::bolt::queue::OptimizerDeps;
use optbin::bolt::sandbox::SandboxLimits;
use optbin::bolt::status::JobEnd;
use optbin::bolt::{
    BoltJob, BoltMode, BoltOutcome, BoltPlan, BoltRunner, BoltState, BoltTool, BoltVersion,
    OptimizeRequest, OptimizerConfig, OptimizerHandle, ProfileInput, ProfileNumbers, RequestOrigin,
    Sandbox, SandboxUser, SandboxedBoltRunner, SmokeCommand, discover, optimizer, run_optimizer,
};
use optbin::catalog::{Catalog, base, bolt_jobs, profile_digests};
use optbin::clock::SystemClock;
use optbin::elf::ElfFacts;
use optbin::identity::ContentId;
use optbin::store::VariantStore;
use tokio::sync::watch;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static unsigned long mix(unsigned long x) { x ^= x >> 13; x *= 0x9E3779B97F4A7C15UL; return x ^ (x >> 29); }
__attribute__((noinline)) unsigned long hot(unsigned long n) {
    unsigned long s = 0;
    for (unsigned long i = 0; i < n; i++) { if (i % 7 == 3) s += mix(i); else s ^= i * 3; }
    return s;
}
__attribute__((noinline)) int rare_error(const char *why) { fprintf(stderr, "error: %s\n", why); return 2; }
__attribute__((noinline)) unsigned long sort_sum(unsigned n) {
    unsigned *v = malloc(n * sizeof *v); unsigned long s = 0;
    if (!v) return 0;
    for (unsigned i = 0; i < n; i++) v[i] = (unsigned)mix(i);
    for (unsigned i = 1; i < n; i++) { unsigned x = v[i], j = i; while (j > 0 && v[j-1] > x) { v[j] = v[j-1]; j--; } v[j] = x; }
    for (unsigned i = 0; i < n; i += 17) s += v[i];
    free(v); return s;
}
int main(int argc, char **argv) {
    if (argc < 2) return rare_error("usage: prog N");
    unsigned long n = strtoul(argv[1], 0, 10);
    if (n == 0) return rare_error("N must be positive");
    printf("%lu %lu\n", hot(n), sort_sum((unsigned)(n / 5000 + 10)));
    return 0;
}
"#;

/// A temp dir the sandbox user can enter (tests' temp dirs are 0700 by default).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn compile(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join("prog.c");
    std::fs::write(&src, PROGRAM).unwrap();
    let out = dir.join(name);
    let st =
        Command::new("gcc").args(["-O2", "-o"]).arg(&out).arg(&src).args(flags).status().unwrap();
    assert!(st.success(), "gcc {flags:?}");
    out
}

fn run(bin: &Path, args: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new(bin).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

fn tool(major: u32) -> BoltTool {
    let path = PathBuf::from(format!("/usr/lib/llvm-{major}/bin/llvm-bolt"));
    BoltTool::probe(&path).unwrap_or_else(|e| panic!("bolt-{major} is installed here: {e}"))
}

#[path = "common/file_profiles.rs"]
mod file_profiles;
use file_profiles::FileProfiles;

struct Rig {
    dir: tempfile::TempDir,
    catalog: Catalog,
    store: VariantStore,
    handle: OptimizerHandle,
    profiles: Arc<FileProfiles>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    fn new(tool: BoltTool, limits: SandboxLimits) -> Self {
        Self::with_bolt(BoltState::Found(tool), limits)
    }

    fn with_bolt(bolt: BoltState, limits: SandboxLimits) -> Self {
        let dir = open_tempdir();
        let catalog = Catalog::open(&dir.path().join("state/catalog.db")).unwrap();
        let store = VariantStore::open(&dir.path().join("state")).unwrap();
        let sandbox = Sandbox::new(&dir.path().join("scratch"), SandboxUser::resolve()).unwrap();
        let runner = bolt.tool().map(|tool| {
            let r = SandboxedBoltRunner::new(tool.clone(), sandbox.clone(), limits.clone());
            Arc::new(r) as Arc<dyn BoltRunner>
        });
        let profiles = Arc::new(FileProfiles::default());
        let config = OptimizerConfig {
            applicability: ApplicabilityConfig { min_text_bytes: 0, min_own_text_share: 0.0 },
            limits,
            ..OptimizerConfig::default()
        };
        let deps = OptimizerDeps {
            catalog: catalog.clone(),
            store: store.clone(),
            bolt,
            runner,
            sandbox,
            profiles: profiles.clone(),
            clock: Arc::new(SystemClock),
            kept_profiles: None,
            variant_profiles: None,
        };
        let (handle, worker) = optimizer(config, deps);
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(run_optimizer(worker, rx));
        Self { dir, catalog, store, handle, profiles, shutdown, task }
    }

    /// Registers a binary with a profile and returns the request for it.
    async fn request(&self, bin: &Path, fdata: &Path) -> OptimizeRequest {
        let content = ContentId::of_file(bin).unwrap();
        let facts = ElfFacts::read(bin).unwrap();
        let size = std::fs::metadata(bin).unwrap().len();
        let f = facts.clone();
        let id =
            self.catalog.run(move |c| base::upsert_binary(c, &content, size, &f, 1)).await.unwrap();
        self.profiles.0.lock().unwrap().insert(id, fdata.to_path_buf());
        let samples = fdata_samples(&std::fs::read_to_string(fdata).unwrap());
        OptimizeRequest {
            binary_id: id,
            name: bin.display().to_string(),
            original: bin.to_path_buf(),
            content,
            facts,
            profile: ProfileNumbers { samples, own_text_share: 0.9, front_end: None },
            origin: RequestOrigin::Matured,
            smoke: Some(SmokeCommand {
                args: vec!["200000".into()],
                stdin: None,
                timeout: Duration::from_secs(20),
            }),
            stale: None,
            challenge: None,
        }
    }

    /// Waits until `n` jobs have finished and nothing is queued or running.
    async fn settle(&self, n: usize) -> optbin::bolt::OptimizerStatus {
        let start = Instant::now();
        loop {
            let s = self.handle.status();
            if s.idle() && s.recent.len() >= n {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(180), "optimizer stuck: {s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn variants(&self, id: i64) -> Vec<base::VariantRow> {
        self.catalog.run(move |c| base::variants_of(c, id)).await.unwrap()
    }

    async fn job(&self, id: i64) -> bolt_jobs::BoltJobRow {
        self.catalog.run(move |c| bolt_jobs::job_of(c, id)).await.unwrap().expect("a bolt_jobs row")
    }

    /// Shuts the optimizer down; hands back the temp dir for checks after.
    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap();
        self.dir
    }
}

/// perf record + perf2bolt of `bin` on its workload.
fn real_profile(tool: &BoltTool, bin: &Path, dir: &Path) -> PathBuf {
    let perf = dir.join(format!("{}.perf", bin.file_name().unwrap().to_string_lossy()));
    record_cpu_clock(bin, &["40000000"], &perf).unwrap();
    let fdata = perf.with_extension("fdata");
    perf_to_fdata(tool, bin, &perf, &fdata).unwrap();
    fdata
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matured_profiles_become_verified_variants_with_the_originals_behaviour() {
    // (name, gcc flags, BOLT version): PIE and non-PIE, with and without relocations,
    // both installed BOLT versions.
    let cases: [(&str, &[&str], u32, BoltMode); 4] = [
        ("pie_relocs", &["-Wl,--emit-relocs"], 22, BoltMode::Relocations),
        ("nopie_plain", &["-no-pie"], 22, BoltMode::NonRelocation),
        ("pie_plain", &[], 19, BoltMode::NonRelocation),
        ("nopie_relocs", &["-no-pie", "-Wl,--emit-relocs"], 19, BoltMode::Relocations),
    ];
    for (name, flags, major, mode) in cases {
        let tool = tool(major);
        let rig = Rig::new(tool.clone(), SandboxLimits::default());
        let bin = compile(rig.dir.path(), name, flags);
        let fdata = real_profile(&tool, &bin, rig.dir.path());
        let req = rig.request(&bin, &fdata).await;
        let (id, samples) = (req.binary_id, req.profile.samples);
        assert!(samples > 100, "{name}: perf gave {samples} samples");
        rig.handle.submit(req.clone()).unwrap();
        let status = rig.settle(1).await;
        let end = &status.recent[0].end;
        let JobEnd::Built { sha256, .. } = end else { panic!("{name}: {end:#?}") };

        let variants = rig.variants(id).await;
        assert_eq!(variants.len(), 1, "{name}");
        let v = &variants[0];
        assert_eq!((v.kind.as_str(), v.state.as_str()), ("bolt", "ready"));
        assert_eq!(&v.sha256, sha256);
        assert_eq!(v.bolt_version.as_deref(), Some(tool.version.to_string().as_str()));
        assert_eq!(v.profile_samples, Some(samples as i64));
        // The variant names the exact profile bytes it was built from.
        let vid = v.id;
        let digests = rig.catalog.run(move |c| profile_digests::of_binary(c, id)).await.unwrap();
        assert_eq!(digests.get(&vid), Some(&ContentId::of_file(&fdata).unwrap()), "{name}");
        let flags_used = v.flags.clone().unwrap();
        assert!(flags_used.contains("-reorder-blocks=ext-tsp"), "{flags_used}");
        assert_eq!(
            flags_used.contains("-reorder-functions=cdsort"),
            mode == BoltMode::Relocations,
            "{name}: {flags_used}"
        );
        assert!(v.note.as_deref().unwrap().contains("smoke run"), "{:?}", v.note);

        // The stored file: content-addressed, a BOLT output of the same kind, same output.
        let stored = PathBuf::from(&v.store_path);
        assert_eq!(stored, rig.store.path_of(&ContentId::parse(sha256).unwrap()));
        assert_eq!(ContentId::of_file(&stored).unwrap().hex(), *sha256);
        let (of, vf) = (ElfFacts::read(&bin).unwrap(), ElfFacts::read(&stored).unwrap());
        assert!(vf.bolted && !of.bolted);
        assert_eq!(vf.pie, of.pie, "{name}");
        for args in [&["3000000"][..], &["77"], &[][..], &["0"]] {
            assert_eq!(run(&stored, args), run(&bin, args), "{name} {args:?}");
        }
        let job = rig.job(id).await;
        assert_eq!((job.last_outcome.as_str(), job.attempts), ("ok", 1));
        assert!(job.peak_rss_kib.unwrap() > 10_000, "BOLT's peak RSS is measured");

        // Same profile again: nothing to do; a profile grown 2x: rebuilt.
        rig.handle.submit(req.clone()).unwrap();
        let s = rig.settle(2).await;
        assert!(matches!(s.recent[0].end, JobEnd::Skipped { .. }), "{:?}", s.recent[0]);
        rig.stop().await;
    }
}

fn fake_bolt(dir: &Path, name: &str, body: &str) -> BoltTool {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("#!/bin/sh\n# args: $1=input $2=-o $3=output, then flags\n{body}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    BoltTool {
        llvm_bolt: path,
        perf2bolt: None,
        version: BoltVersion { major: 22, minor: 1, patch: 8 },
    }
}

/// A no_lbr profile written by hand: the hot function of PROGRAM.
fn hand_profile(dir: &Path) -> PathBuf {
    let p = dir.join("hand.fdata");
    std::fs::write(&p, "no_lbr cpu-clock:\n1 hot 10 5000\n1 hot 20 4000\n1 main 8 3\n").unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bolt_failures_leave_no_variant_and_are_recorded_with_kind_and_tail() {
    let scripts = open_tempdir();
    let limits = SandboxLimits { timeout: Duration::from_millis(1500), ..Default::default() };
    // (script, expected outcome label, expected tail text, expected attempts)
    let cases = [
        (
            "exit1",
            "echo 'BOLT-ERROR: fake failure number one'; exit 1",
            "exit 1",
            "fake failure",
            3,
        ),
        (
            "sleeper",
            "echo 'BOLT-INFO: thinking'; sleep 47.25; echo never",
            "timeout",
            "thinking",
            2,
        ),
        (
            "crasher",
            "echo 'BOLT-INFO: about to crash'; kill -SEGV $$",
            "signal 11",
            "about to crash",
            3,
        ),
        (
            "unbolted",
            "cp \"$1\" \"$3\"",
            "verification: no .note.bolt_info: not a BOLT output",
            "",
            3,
        ),
    ];
    for (name, body, outcome, tail, attempts) in cases {
        let rig = Rig::new(fake_bolt(scripts.path(), name, body), limits.clone());
        let bin = compile(rig.dir.path(), "prog", &["-Wl,--emit-relocs"]);
        let req = rig.request(&bin, &hand_profile(rig.dir.path())).await;
        let id = req.binary_id;
        let started = Instant::now();
        rig.handle.submit(req.clone()).unwrap();
        let status = rig.settle(1).await;
        let JobEnd::Failed { kind, tail: shown, .. } = &status.recent[0].end else {
            panic!("{name}: {:#?}", status.recent[0])
        };
        assert_eq!(kind, outcome, "{name}");
        assert!(shown.contains(tail), "{name}: status tail {shown:?}");
        assert_eq!(status.last_failures().count(), 1);
        assert!(rig.variants(id).await.is_empty(), "{name}: a failure stored a variant");
        let job = rig.job(id).await;
        assert_eq!(job.last_outcome, outcome, "{name}");
        assert_eq!(job.attempts, attempts, "{name}: ladder steps");
        assert!(job.failed_until_change, "{name}");
        assert!(job.failure_tail.unwrap_or_default().contains(tail), "{name}");
        if name == "sleeper" {
            assert!(started.elapsed() < Duration::from_secs(10), "the timeout was not enforced");
            let survivors = std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains("47.25"))
                .count();
            assert_eq!(survivors, 0, "the timed-out job's sleep survived");
        }
        if name == "exit1" {
            // Failed until something changes: the same profile is not retried, a profile
            // grown 2x is; a user's `optimize` always is.
            rig.handle.submit(req.clone()).unwrap();
            let s = rig.settle(2).await;
            assert!(
                matches!(&s.recent[0].end, JobEnd::Skipped { why } if why.contains("failed")),
                "{:?}",
                s.recent[0]
            );
            let user = OptimizeRequest { origin: RequestOrigin::User, ..req.clone() };
            rig.handle.submit(user).unwrap();
            let s = rig.settle(3).await;
            assert!(matches!(s.recent[0].end, JobEnd::Failed { .. }));
            assert_eq!(rig.job(id).await.attempts, 6);
        }
        let usage = rig.store.disk_usage().unwrap();
        assert_eq!(usage.files, 0, "{name}: nothing left in the store");
        let scratch_left = std::fs::read_dir(rig.dir.path().join("scratch")).unwrap().count();
        assert_eq!(scratch_left, 0, "{name}: scratch directories left behind");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ladder_skips_the_function_bolt_names() {
    let scripts = open_tempdir();
    let body = r#"case "$*" in
  *-skip-funcs=foo/1*)
    printf 'fake' > note && objcopy --add-section .note.bolt_info=note "$1" "$3" && echo "BOLT-INFO: ok";;
  *)
    echo "BOLT-INFO: rewriting"
    echo "BOLT-ERROR: unable to get new address corresponding to input address 0x1234 in function foo/1"
    exit 1;;
esac"#;
    let rig = Rig::new(fake_bolt(scripts.path(), "picky", body), SandboxLimits::default());
    let bin = compile(rig.dir.path(), "prog", &["-Wl,--emit-relocs"]);
    let req = rig.request(&bin, &hand_profile(rig.dir.path())).await;
    let id = req.binary_id;
    rig.handle.submit(req).unwrap();
    let status = rig.settle(1).await;
    assert!(matches!(status.recent[0].end, JobEnd::Built { .. }), "{:#?}", status.recent[0]);
    assert_eq!(status.recent[0].attempts, 2);
    let job = rig.job(id).await;
    assert_eq!(job.attempts, 2);
    assert_eq!(job.ladder_step.as_deref(), Some("full, skip foo/1"));
    let v = &rig.variants(id).await[0];
    assert!(v.flags.as_deref().unwrap().contains("-skip-funcs=foo/1"));
    assert_eq!(run(Path::new(&v.store_path), &["1000"]), run(&bin, &["1000"]));
    rig.stop().await;
}

#[test]
fn bolt_runs_unprivileged_at_idle_priority_with_limits() {
    let dir = open_tempdir();
    let body = r#"{ id -u; nice; ionice -p $$; grep -E '^policy' /proc/self/sched | tr -d ' '; ulimit -v; } > "$3""#;
    let tool = fake_bolt(dir.path(), "whoami", body);
    let sandbox = Sandbox::new(&dir.path().join("scratch"), SandboxUser::resolve()).unwrap();
    let limits = SandboxLimits { memory_bytes: 3 << 30, ..Default::default() };
    let runner = SandboxedBoltRunner::new(tool, sandbox, limits);
    let bin = compile(dir.path(), "prog", &[]);
    let job = BoltJob {
        original: bin.clone(),
        expected_content: Some(ContentId::of_file(&bin).unwrap()),
        plan: BoltPlan {
            mode: BoltMode::NonRelocation,
            split_functions: false,
            skip_funcs: vec![],
            profile: ProfileInput::Fdata(hand_profile(dir.path())),
            flag_set: &optbin::bolt::flags::DEFAULT_SET,
        },
        cancel: Default::default(),
    };
    let BoltOutcome::Ok(ok) = runner.run(&job) else { panic!("the fake BOLT failed") };
    let report = std::fs::read_to_string(&ok.output).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test runs as root");
    let nobody = SandboxUser::resolve().unwrap();
    assert_ne!(lines[0], "0", "BOLT ran as root: {report}");
    assert_eq!(lines[0], nobody.uid.to_string());
    assert_eq!(lines[1], "19", "nice: {report}");
    assert_eq!(lines[2], "idle", "I/O class: {report}");
    assert_eq!(lines[3], "policy:5", "SCHED_IDLE is policy 5: {report}");
    assert_eq!(lines[4], (3u64 << 20).to_string(), "RLIMIT_AS in KiB: {report}");
    assert!(ok.args.iter().any(|a| a == "-relocs=0"));
    // The original was copied: the job never touches it.
    assert!(ok.args[0].starts_with(&dir.path().join("scratch").display().to_string()));
    let scratch = ok.scratch.path().to_path_buf();
    drop(ok);
    assert!(!scratch.exists(), "the scratch directory outlived its guard");

    // A changed original is refused before BOLT runs.
    let stale = BoltJob { expected_content: Some(ContentId::of_bytes(b"other")), ..job };
    let BoltOutcome::Failed(f) = runner.run(&stale) else { panic!("ran on changed content") };
    assert!(f.kind.label().starts_with("setup: the original changed"), "{:?}", f.kind);
}

#[test]
fn memory_exhaustion_is_recognised_as_a_memory_limit() {
    let dir = open_tempdir();
    // A fake BOLT that really allocates past RLIMIT_AS and dies the way LLVM does.
    let src = dir.path().join("hog.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    for (int i = 0; i < 64; i++) {
        char *p = malloc(64 << 20);
        if (!p) { fprintf(stderr, "LLVM ERROR: out of memory\nAllocation failed\n"); abort(); }
        memset(p, 1, 64 << 20);
    }
    return 0;
}"#,
    )
    .unwrap();
    let hog = dir.path().join("hog");
    assert!(Command::new("gcc").arg("-o").arg(&hog).arg(&src).status().unwrap().success());
    let tool = BoltTool {
        llvm_bolt: hog,
        perf2bolt: None,
        version: BoltVersion { major: 22, minor: 1, patch: 8 },
    };
    let sandbox = Sandbox::new(&dir.path().join("scratch"), SandboxUser::resolve()).unwrap();
    let limits = SandboxLimits { memory_bytes: 256 << 20, ..Default::default() };
    let runner = SandboxedBoltRunner::new(tool, sandbox, limits);
    let job = BoltJob {
        original: Path::new("/bin/true").to_path_buf(),
        expected_content: None,
        plan: BoltPlan {
            mode: BoltMode::Relocations,
            split_functions: true,
            skip_funcs: vec![],
            profile: ProfileInput::Fdata(hand_profile(dir.path())),
            flag_set: &optbin::bolt::flags::DEFAULT_SET,
        },
        cancel: Default::default(),
    };
    let BoltOutcome::Failed(f) = runner.run(&job) else { panic!("4 GiB fit in 256 MiB") };
    assert_eq!(f.kind.label(), "memory limit", "{}", f.tail);
    assert!(f.peak_rss_kib < 300 * 1024, "peak {} KiB", f.peak_rss_kib);
}

#[test]
fn discovery_finds_the_newest_installed_bolt() {
    let BoltState::Found(t) = discover(None) else { panic!("BOLT is installed here") };
    assert_eq!(t.version.major, 22);
    assert_eq!(t.version.perf2bolt_no_lbr_flag(), "-ba");
    assert_eq!(tool(19).version.perf2bolt_no_lbr_flag(), "-nl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_refused_or_skipped_with_their_reason() {
    // No BOLT: a state in status, and every request refused saying so.
    let missing =
        BoltState::Missing { looked_in: vec!["/usr/lib/llvm-*/bin/llvm-bolt: none".into()] };
    let rig = Rig::with_bolt(missing, SandboxLimits::default());
    let bin = compile(rig.dir.path(), "prog", &["-Wl,--emit-relocs"]);
    let req = rig.request(&bin, &hand_profile(rig.dir.path())).await;
    let err = rig.handle.submit(req).unwrap_err();
    assert!(err.to_string().contains("BOLT is not installed"), "{err}");
    let status = rig.handle.status();
    assert!(!status.bolt.found);
    assert_eq!(status.bolt.looked_in.len(), 1);
    rig.stop().await;

    let rig = Rig::new(tool(22), SandboxLimits::default());
    let fdata = hand_profile(rig.dir.path());
    // Stripped: not a candidate, with the reason.
    let stripped = compile(rig.dir.path(), "stripped", &["-s"]);
    let err = rig.handle.submit(rig.request(&stripped, &fdata).await).unwrap_err();
    assert!(err.to_string().ends_with("not a candidate: stripped (no .symtab)"), "{err}");
    // No profile yet.
    let bin = compile(rig.dir.path(), "prog", &["-Wl,--emit-relocs"]);
    let mut req = rig.request(&bin, &fdata).await;
    req.profile.samples = 0;
    let err = rig.handle.submit(req.clone()).unwrap_err();
    assert!(err.to_string().contains("no profile"), "{err}");
    // Excluded by the user: queued, then skipped without running BOLT.
    let name = req.name.clone();
    rig.catalog.run(move |c| base::set_excluded(c, &name, true, 1)).await.unwrap();
    req.profile.samples = 9003;
    rig.handle.submit(req.clone()).unwrap();
    let s = rig.settle(1).await;
    assert!(
        matches!(&s.recent[0].end, JobEnd::Skipped { why } if why.contains("excluded")),
        "{:?}",
        s.recent[0]
    );
    let id = req.binary_id;
    assert!(
        rig.catalog.run(move |c| bolt_jobs::job_of(c, id)).await.unwrap().is_none(),
        "BOLT ran"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_a_running_job_without_blaming_the_binary() {
    let scripts = open_tempdir();
    let slow = fake_bolt(scripts.path(), "slow", "echo started; sleep 53.75");
    let limits = SandboxLimits { timeout: Duration::from_secs(120), ..Default::default() };
    let rig = Rig::new(slow, limits);
    let bin = compile(rig.dir.path(), "prog", &["-Wl,--emit-relocs"]);
    let req = rig.request(&bin, &hand_profile(rig.dir.path())).await;
    let id = req.binary_id;
    rig.handle.submit(req.clone()).unwrap();
    let dup = rig.handle.submit(req).unwrap_err();
    assert!(dup.to_string().contains("already queued"), "{dup}");
    let start = Instant::now();
    while rig.handle.status().running.first().is_none_or(|r| r.attempt == 0) {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fake BOLT is in its long sleep: the shutdown has a running process to kill.
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains("53.75"))
    };
    while !sleeping() {
        assert!(start.elapsed() < Duration::from_secs(20), "the fake BOLT never slept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handle = rig.handle.clone();
    let catalog = rig.catalog.clone();
    let stopping = Instant::now();
    let dir = rig.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(5), "shutdown waited for BOLT");
    let s = handle.status();
    assert!(matches!(s.recent[0].end, JobEnd::Cancelled), "{:?}", s.recent);
    assert_eq!(s.failed, 0);
    let job = catalog.run(move |c| bolt_jobs::job_of(c, id)).await.unwrap();
    assert!(job.is_none(), "a cancelled run was recorded as a failure: {job:?}");
    let survivors = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains("53.75"))
        .count();
    assert_eq!(survivors, 0, "BOLT survived the shutdown");
    assert_eq!(std::fs::read_dir(dir.path().join("scratch")).unwrap().count(), 0);
}

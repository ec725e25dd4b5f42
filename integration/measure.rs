//! Measuring real runs end to end: C programs compiled here are started the way execve
//! reaches a served binary (the process is blocked before its exec while `on_exec_open`
//! attaches the counters), and measured through the real perf counters and the kernel's
//! process connector; the records then go through the real policy task into SQLite.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use optbin::catalog::base::{
    NewVariant, VariantKind, VariantState, insert_variant, upsert_binary, upsert_path, variants_of,
};
use optbin::catalog::{Catalog, runs};
use optbin::elf::ElfFacts;
use optbin::identity::{ContentId, FileKey};
use optbin::measure::cmdline::cmd_hash_of_args;
use optbin::measure::{ExecOpen, Measurer, RunExit, RunRecord};
use optbin::policy::task::{PolicyTaskOptions, ServingSink, run_policy};
use optbin::policy::{PolicyConfig, ServeDecision};
use tokio::sync::{mpsc, watch};

/// Burns `argv[1]` ms of CPU (by the process CPU clock), optionally in a child too
/// (`argv[3]` ms, waited for), then exits with `argv[2]`.
const BURN_C: &str = r#"
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
static void burn(long ms) {
    struct timespec t0, t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    volatile unsigned long x = 0;
    for (;;) {
        for (int i = 0; i < 100000; i++) x += i * 2654435761u;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
        long el = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        if (el >= ms) return;
    }
}
int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 0;
    int code = argc > 2 ? atoi(argv[2]) : 0;
    long child_ms = argc > 3 ? atol(argv[3]) : 0;
    if (child_ms > 0) {
        pid_t p = fork();
        if (p == 0) { burn(child_ms); _exit(0); }
        burn(ms);
        int st; waitpid(p, &st, 0);
    } else {
        burn(ms);
    }
    return code;
}
"#;

/// Dies of a real segmentation fault after a little work.
const SEGV_C: &str = r#"
#include <stdlib.h>
int main(int argc, char **argv) {
    volatile int *p = (int *)(argc > 100 ? argv : 0);
    *p = 1;
    return 0;
}
"#;

fn compile(dir: &Path, name: &str, src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let out = std::process::Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .expect("running gcc");
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// A forked child blocked before its exec, like a process inside execve when the overlay
/// sees the exec-time open. Killed and reaped on drop if still around.
struct Held {
    pid: i32,
    go: i32,
    reaped: bool,
}

impl Held {
    /// Forks; the child waits on a pipe, then execs `exe` with `argv`.
    fn fork(exe: &Path, argv: &[&str]) -> Held {
        let path = CString::new(exe.as_os_str().as_bytes()).unwrap();
        let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only calls async-signal-safe functions (read, execv, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                let mut b = 0u8;
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                libc::execv(path.as_ptr(), ptrs.as_ptr());
                libc::_exit(127);
            }
        }
        unsafe { libc::close(fds[0]) };
        Held { pid, go: fds[1], reaped: false }
    }

    /// Lets the child exec, then waits for it; returns the raw wait status.
    fn release_and_wait(mut self) -> i32 {
        let b = 1u8;
        // SAFETY: go is our pipe's write end.
        unsafe {
            libc::write(self.go, (&b as *const u8).cast(), 1);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid);
        self.reaped = true;
        status
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        unsafe {
            libc::close(self.go);
            if !self.reaped {
                libc::kill(self.pid, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(self.pid, &mut st, 0);
            }
        }
    }
}

fn key_of(p: &Path) -> FileKey {
    FileKey::of(p).unwrap()
}

/// Runs `exe` as a measured exec of `original` and returns its record.
async fn measured_run(
    m: &Measurer,
    rx: &mut mpsc::UnboundedReceiver<RunRecord>,
    exe: &Path,
    argv: &[&str],
    original: &Path,
    variant_id: Option<i64>,
) -> RunRecord {
    let held = Held::fork(exe, argv);
    m.on_exec_open(ExecOpen {
        pid: held.pid,
        original: original.to_path_buf(),
        variant_id,
        binary_id: None,
        key: key_of(original),
    })
    .unwrap();
    let status = tokio::task::spawn_blocking(move || held.release_and_wait()).await.unwrap();
    assert!(status != 127 << 8, "exec failed");
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no run record within 10 s")
        .expect("measurer channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_exit_codes_signals_and_command_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let burn = compile(dir.path(), "burn", BURN_C);
    let segv = compile(dir.path(), "segv", SEGV_C);
    let (m, mut rx) = Measurer::start().expect("measurer (needs root)");

    let r = measured_run(&m, &mut rx, &burn, &["burn", "200", "3"], &burn, None).await;
    eprintln!("burn 200 ms: {r:?}");
    assert_eq!(r.exit, RunExit::Exited(3));
    let cpu_ms = r.task_clock_ns as f64 / 1e6;
    assert!((150.0..400.0).contains(&cpu_ms), "task-clock {cpu_ms} ms");
    assert!(r.wall_ns >= r.task_clock_ns * 9 / 10, "wall {} < cpu {}", r.wall_ns, r.task_clock_ns);
    assert_eq!(r.cmd_hash, cmd_hash_of_args(&["burn", "200", "3"]));
    assert_eq!(r.variant_id, None);
    // Software counters on every run.
    assert!(r.counts.page_faults.is_some_and(|n| n > 0), "{r:?}");
    assert!(r.counts.context_switches.is_some(), "{r:?}");
    // No PMU on this VM: hardware counters are absent, not zero.
    if !optbin::measure::counters::PerfCounterFactory::detect().has_hardware() {
        assert_eq!((r.counts.instructions, r.counts.cycles), (None, None));
        assert_eq!((r.counts.branch_misses, r.counts.itlb_misses), (None, None));
    }

    // inherit: a child's CPU time (waited for) is counted too.
    let r = measured_run(&m, &mut rx, &burn, &["burn", "100", "0", "100"], &burn, None).await;
    let cpu_ms = r.task_clock_ns as f64 / 1e6;
    eprintln!("burn 100 ms + child 100 ms: {cpu_ms:.1} ms");
    assert!((170.0..400.0).contains(&cpu_ms), "task-clock with child {cpu_ms} ms");

    let r = measured_run(&m, &mut rx, &segv, &["segv"], &segv, Some(9)).await;
    eprintln!("segv: {r:?}");
    assert_eq!(r.exit, RunExit::Signaled(libc::SIGSEGV), "the killing signal, not SIGCHLD");
    assert_eq!(r.variant_id, Some(9));

    // 20 ms runs: long enough for the command line to be read after the exec (a process
    // that exits within about a millisecond may be gone first; its command is "unknown").
    let a = measured_run(&m, &mut rx, &burn, &["burn", "20", "0"], &burn, None).await;
    let b = measured_run(&m, &mut rx, &burn, &["burn", "20", "0"], &burn, None).await;
    let c = measured_run(&m, &mut rx, &burn, &["burn", "21", "0"], &burn, None).await;
    assert_ne!(a.cmd_hash, optbin::measure::cmdline::UNKNOWN_CMD);
    assert_eq!(a.cmd_hash, cmd_hash_of_args(&["burn", "20", "0"]));
    assert_eq!(a.cmd_hash, b.cmd_hash);
    assert_ne!(a.cmd_hash, c.cmd_hash);
    assert_eq!(m.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exec_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("does-not-exist");
    let (m, mut rx) = Measurer::start().unwrap();
    let held = Held::fork(&missing, &["x"]);
    m.on_exec_open(ExecOpen {
        pid: held.pid,
        original: missing.clone(),
        variant_id: None,
        binary_id: None,
        key: FileKey { dev: 0, ino: 0, size: 0, mtime_ns: 0, ctime_ns: 0 },
    })
    .unwrap();
    let status = tokio::task::spawn_blocking(move || held.release_and_wait()).await.unwrap();
    assert_eq!(status, 127 << 8);
    assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv()).await.is_err());
    assert_eq!(m.pending(), 0);
    assert_eq!(m.dropped().exec_failed, 1);
}

#[derive(Default)]
struct RecordingSink(Mutex<Vec<(PathBuf, ServeDecision)>>);

impl ServingSink for RecordingSink {
    fn set_decision(&self, original: &Path, decision: ServeDecision) {
        self.0.lock().unwrap().push((original.to_path_buf(), decision));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_crash_lands_in_sqlite_and_quarantines_the_variant_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let original = compile(dir.path(), "prog", BURN_C);
    let crashing_variant = compile(dir.path(), "prog.variant", SEGV_C);
    let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    let orig_path = original.to_string_lossy().to_string();
    let key = key_of(&original);
    let (binary_id, variant_id) = {
        let p = orig_path.clone();
        let v = crashing_variant.to_string_lossy().to_string();
        catalog
            .run(move |c| {
                let b = upsert_binary(
                    c,
                    &ContentId::of_file(Path::new(&p))?,
                    1,
                    &ElfFacts::default(),
                    1,
                )?;
                upsert_path(c, &p, Some(b), &key, 1)?;
                let vid = insert_variant(
                    c,
                    &NewVariant {
                        binary_id: b,
                        kind: VariantKind::Placed,
                        store_path: v,
                        state: VariantState::Ready,
                        ..Default::default()
                    },
                    1,
                )?;
                Ok((b, vid))
            })
            .await
            .unwrap()
    };

    let (m, mut measured) = Measurer::start().unwrap();
    let (records_tx, records_rx) = mpsc::unbounded_channel();
    let sink = Arc::new(RecordingSink::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = PolicyTaskOptions {
        config: PolicyConfig::default(),
        rescan_every: Duration::from_millis(100),
        ..Default::default()
    };
    let task = tokio::spawn(run_policy(catalog.clone(), records_rx, sink.clone(), stop_rx, opts));

    // The rescan puts the ready variant in canary and tells the serving table.
    let canary = ServeDecision::Split { variant_id, variant_share: 0.5 };
    for _ in 0..50 {
        if sink.0.lock().unwrap().iter().any(|(_, d)| *d == canary) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink.0.lock().unwrap().last().map(|x| x.1), Some(canary));

    // The user's command, served the original, then the variant (same argv: the overlay
    // serves both under the original's name).
    let argv = ["prog", "5", "0"];
    let r = measured_run(&m, &mut measured, &original, &argv, &original, None).await;
    assert_eq!(r.exit, RunExit::Exited(0));
    records_tx.send(r).unwrap();
    let r = measured_run(&m, &mut measured, &crashing_variant, &argv, &original, Some(variant_id))
        .await;
    assert_eq!(r.exit, RunExit::Signaled(libc::SIGSEGV));
    let crash_hash = r.cmd_hash.clone();
    records_tx.send(r).unwrap();

    let mut quarantined = false;
    for _ in 0..100 {
        let d = sink.0.lock().unwrap().last().cloned();
        if d == Some((original.clone(), ServeDecision::Original)) {
            quarantined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(quarantined, "sink: {:?}", sink.0.lock().unwrap());

    let (stored, incidents, states) = catalog
        .run(move |c| {
            Ok((
                runs::runs_of_binary(c, binary_id, 100)?,
                runs::incidents_of(c, binary_id)?,
                variants_of(c, binary_id)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].variant_id, None);
    assert_eq!(stored[0].exit, RunExit::Exited(0));
    assert!(stored[0].task_clock_ns > 3_000_000, "{:?}", stored[0]);
    assert_eq!(stored[1].variant_id, Some(variant_id));
    assert_eq!(stored[1].exit, RunExit::Signaled(11));
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].cmd_hash, crash_hash);
    assert_eq!(incidents[0].exit, RunExit::Signaled(11));
    assert_eq!(incidents[0].kind, "crash");
    assert_eq!(states[0].state, VariantState::Quarantined);
    let status = catalog
        .run(move |c| {
            optbin::policy::load::binary_status(
                c,
                binary_id,
                &PolicyConfig::default(),
                &optbin::policy::load::NoPipeline,
            )
        })
        .await
        .unwrap();
    eprintln!("status: {}", status[0].stage_text);
    assert!(status[0].stage_text.contains("crashed"), "{}", status[0].stage_text);
    assert!(status[0].last_incident.as_deref().unwrap_or("").contains("SIGSEGV"));

    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instant_run_is_recorded() {
    // Programs that exit right after their exec still give a record with the right exit
    // status. Their command line may be gone before it is read; the reader thread's
    // real-time priority makes that rare (at normal priority 15 of 60 were lost here).
    // Meanwhile four threads read the counts status shows, as fast as they can, and three
    // busy loops keep both cores taken. When the reader thread shared a lock with status,
    // it waited whenever a holder was preempted: here 27-36 command lines of 200 were lost
    // that way (0 of 200 since it owns its state alone).
    let dir = tempfile::tempdir().unwrap();
    let burn = compile(dir.path(), "burn", BURN_C);
    let (m, mut rx) = Measurer::start().unwrap();
    let m = Arc::new(m);
    let status_readers = StatusReaders::start(&m, 4);
    let busy = BusyLoops::start(3);
    let n = 60;
    // Command lines lost is a rate: at most a tenth of a batch. A batch over it (once in a
    // full test run, 12 of 60, while the same binary lost 0-2 in each of six runs right
    // after) gets one more batch; losing them at normal priority's rate (15 of 60) fails
    // both batches but about once in a hundred.
    let mut lost = Vec::new();
    for _batch in 0..2 {
        let mut unknown = 0;
        for i in 0..n {
            let code = (i % 5).to_string();
            let r = measured_run(&m, &mut rx, &burn, &["burn", "0", &code], &burn, None).await;
            assert_eq!(r.exit, RunExit::Exited(i % 5));
            assert!(r.task_clock_ns > 0 && r.task_clock_ns < 50_000_000, "{r:?}");
            if r.cmd_hash == optbin::measure::cmdline::UNKNOWN_CMD {
                unknown += 1;
            }
        }
        eprintln!("instant runs: {n} recorded, {unknown} with an unknown command line");
        lost.push(unknown);
        if unknown <= n / 10 {
            break;
        }
    }
    drop(busy);
    let reads = status_readers.stop();
    assert!(reads > 0, "the status readers ran");
    assert!(lost.last().is_some_and(|&u| u <= n / 10), "command lines lost of {n}: {lost:?}");
    assert_eq!(m.pending(), 0);
}

/// Shell busy loops, killed and reaped when dropped (also on a panic).
struct BusyLoops(Vec<std::process::Child>);

impl BusyLoops {
    fn start(n: usize) -> Self {
        let spawn = || {
            std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap()
        };
        Self((0..n).map(|_| spawn()).collect())
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Threads that read the measurer's status counts in a loop until stopped.
struct StatusReaders {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl StatusReaders {
    fn start(m: &Arc<Measurer>, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (m, stop) = (m.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::black_box((m.pending(), m.dropped()));
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the threads; the reads they made.
    fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap_or(0)).sum()
    }
}

impl Drop for StatusReaders {
    fn drop(&mut self) {
        self.halt();
    }
}

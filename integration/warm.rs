//! Keeping hot binaries warm, on a real mount with the real page cache: a program compiled
//! here runs through the mount; the daemon ranks it (and the libraries its processes map)
//! by execs, and when its pages are evicted it reads them back within the check interval,
//! never beyond the budget; real memory pressure (a thrashing process in a small memory
//! cgroup) makes warming stand back and status say why.

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::daemon::Daemon;
use serde_json::Value;

/// Touches a 1 MiB table at start, so its working set is about 256 pages of the file.
const TABLE_C: &str = r#"
#include <stdio.h>
#define N (1 << 20)
static const unsigned char table[N] = { [0] = 1, [N / 2] = 2, [N - 1] = 3 };
int main(void) {
    unsigned long sum = 0;
    for (int i = 0; i < N; i += 512) sum += ((volatile const unsigned char *)table)[i];
    printf("%lu\n", sum);
    return 0;
}
"#;

fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, format!("[warm]\ninterval_secs = 1\n{extra}\n")).unwrap();
    path
}

fn warm(d: &Daemon) -> Value {
    d.status_json()["subsystems"]["warm"].clone()
}

fn kept_paths(w: &Value) -> Vec<String> {
    w["kept"].as_array().map_or(Vec::new(), |a| {
        a.iter().filter_map(|k| k["path"].as_str().map(str::to_string)).collect()
    })
}

/// Drops `path`'s pages from the page cache (written back first: dirty pages stay).
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Resident pages of `path` (mincore of a read-only mapping).
fn resident_pages(path: &Path) -> usize {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: read-only mapping, only its residency is read.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    let mut v = vec![0u8; len.div_ceil(4096)];
    // SAFETY: one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, len, v.as_mut_ptr()) };
    assert_eq!(rc, 0);
    v.iter().filter(|b| **b & 1 != 0).count()
}

fn run(bin: &Path) {
    let out = Command::new(bin).output().unwrap();
    assert!(out.status.success(), "{} failed: {out:?}", bin.display());
}

/// The overlaid directory, the mountpoint and the state directory of one test (the first
/// two created).
fn layout(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (over, mnt, state) = (dir.join("bin"), dir.join("mnt"), dir.join("state"));
    for d in [&over, &mnt] {
        std::fs::create_dir_all(d).unwrap();
    }
    (over, mnt, state)
}

fn section_in_the_status(d: &Daemon) -> Option<Value> {
    let s = d.status_json();
    s.get("subsystems").and_then(|s| s.get("warm")).cloned()
}

#[test]
fn the_ranking_follows_execs_and_evicted_pages_come_back_within_the_budget() {
    let dir = common::open_tempdir();
    let (over, mnt, state) = layout(dir.path());
    let (a, b) = (over.join("warm-a"), over.join("warm-b"));
    common::cc(TABLE_C, &a, &[]);
    common::cc(TABLE_C, &b, &["-DUNUSED=1", "-O2"]);
    let cfg = config(dir.path(), "budget_mib = 64");
    let d = Daemon::start(&mnt, &[&over], &state, Some(&cfg));
    assert!(section_in_the_status(&d).is_some(), "no warm section in status.json");
    let budget = warm(&d)["budget_bytes"].as_u64().unwrap();
    assert_eq!(budget, 64 << 20);
    let a_str = a.to_str().unwrap().to_string();
    let b_str = b.to_str().unwrap().to_string();

    // a runs more often than b: a ranks first; libc (mapped by both) is kept too.
    for _ in 0..6 {
        run(&d.bin().join("warm-a"));
    }
    for _ in 0..2 {
        run(&d.bin().join("warm-b"));
    }
    let kept = d.wait_for(Duration::from_secs(20), "a and b kept warm", |d| {
        let k = kept_paths(&warm(d));
        (k.contains(&a_str) && k.contains(&b_str)).then_some(k)
    });
    let pos = |k: &[String], p: &str| k.iter().position(|x| x == p).unwrap();
    assert!(pos(&kept, &a_str) < pos(&kept, &b_str), "a (6 execs) not above b (2): {kept:?}");
    assert!(kept.iter().any(|p| p.contains("libc")), "libc, mapped by both, not kept: {kept:?}");

    // Now b runs more: it overtakes a.
    for _ in 0..10 {
        run(&d.bin().join("warm-b"));
    }
    d.wait_for(Duration::from_secs(20), "b ranked above a", |d| {
        let k = kept_paths(&warm(d));
        (k.contains(&a_str) && pos(&k, &b_str) < pos(&k, &a_str)).then_some(())
    });

    // Evicted pages of a hot file come back within the interval.
    let before = warm(&d)["pages_reread"].as_u64().unwrap();
    evict(&a);
    let evicted = resident_pages(&a);
    let total = File::open(&a).unwrap().metadata().unwrap().len().div_ceil(4096) as usize;
    assert!(evicted < total / 2, "DONTNEED left {evicted} of {total} pages resident");
    d.wait_for(Duration::from_secs(15), "a's evicted pages read back", |_| {
        (resident_pages(&a) >= 256).then_some(())
    });
    let w = d.wait_for(Duration::from_secs(10), "pages_reread to count them", |d| {
        let w = warm(d);
        (w["pages_reread"].as_u64().unwrap() >= before + 200).then_some(w)
    });
    // The budget is never exceeded, and the summary says what is kept.
    assert!(w["kept_bytes"].as_u64().unwrap() <= budget, "{w}");
    assert!(d.status_text().contains("files kept warm"), "{}", d.status_text());
}

#[test]
fn a_budget_smaller_than_the_working_sets_is_never_exceeded() {
    let dir = common::open_tempdir();
    let (over, mnt, state) = layout(dir.path());
    let a = over.join("warm-a");
    common::cc(TABLE_C, &a, &[]);
    // 1 MiB: less than a's table plus libc.
    let cfg = config(dir.path(), "budget_mib = 1");
    let d = Daemon::start(&mnt, &[&over], &state, Some(&cfg));
    for _ in 0..3 {
        run(&d.bin().join("warm-a"));
    }
    // Watch several checks: none keeps more than the budget.
    let first = warm(&d)["checks"].as_u64().unwrap();
    d.wait_for(Duration::from_secs(20), "five checks", |d| {
        let w = warm(d);
        assert!(w["kept_bytes"].as_u64().unwrap() <= 1 << 20, "budget exceeded: {w}");
        (w["checks"].as_u64().unwrap() >= first + 5 && w["files_tracked"].as_u64().unwrap() > 0)
            .then_some(())
    });
}

/// A memory cgroup (v1 or v2) with a small limit, removed on drop with its processes killed.
struct SmallCgroup {
    dir: PathBuf,
    procs: Vec<Child>,
}

impl SmallCgroup {
    fn new(limit: u64) -> Self {
        let name = format!("optbin-test-{}", std::process::id());
        let (dir, limit_file) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup").join(&name), "memory.max")
        } else {
            (PathBuf::from("/sys/fs/cgroup/memory").join(&name), "memory.limit_in_bytes")
        };
        std::fs::create_dir_all(&dir).expect("creating a memory cgroup (as root)");
        std::fs::write(dir.join(limit_file), limit.to_string()).expect("setting its limit");
        Self { dir, procs: Vec::new() }
    }

    fn spawn(&mut self, cmd: &mut Command) {
        let child = cmd.spawn().unwrap();
        std::fs::write(self.dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        self.procs.push(child);
    }
}

impl Drop for SmallCgroup {
    fn drop(&mut self) {
        for c in &mut self.procs {
            c.kill().ok();
            c.wait().ok();
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads random pages of a file mapped in memory, forever: in a cgroup smaller than the
/// file, every read refaults a page the kernel just evicted (real memory stalls).
const THRASH_C: &str = r#"
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat st; fstat(fd, &st);
    volatile unsigned char *m = mmap(0, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    unsigned long pages = st.st_size / 4096, sum = 0, x = 88172645463325252ul;
    for (;;) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; sum += m[(x % pages) * 4096]; }
}
"#;

#[test]
fn memory_pressure_makes_warming_stand_back_and_status_say_why() {
    let dir = common::open_tempdir();
    let (over, mnt, state) = layout(dir.path());
    let a = over.join("warm-a");
    common::cc(TABLE_C, &a, &[]);
    let thrash = dir.path().join("thrash");
    common::cc(THRASH_C, &thrash, &[]);
    let cfg = config(dir.path(), "budget_mib = 64\nmax_memory_pressure = 1.0");
    let d = Daemon::start(&mnt, &[&over], &state, Some(&cfg));
    for _ in 0..3 {
        run(&d.bin().join("warm-a"));
    }
    d.wait_for(Duration::from_secs(20), "a kept warm", |d| {
        kept_paths(&warm(d)).contains(&a.to_str().unwrap().to_string()).then_some(())
    });

    // 96 MiB read at random by two processes in a 32 MiB cgroup.
    let data = dir.path().join("data");
    std::fs::write(&data, vec![1u8; 96 << 20]).unwrap();
    File::open(&data).unwrap().sync_all().unwrap();
    evict(&data);
    let mut cg = SmallCgroup::new(32 << 20);
    for _ in 0..2 {
        cg.spawn(Command::new(&thrash).arg(&data));
    }
    let w = d.wait_for(Duration::from_secs(60), "warming to back off", |d| {
        let w = warm(d);
        (w["backing_off"] == true).then_some(w)
    });
    let reason = w["last_backoff"]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("memory pressure"), "{reason}");
    assert!(d.status_text().contains("backing off: memory pressure"), "{}", d.status_text());
    // While it stands back, evicted pages stay evicted: two more checks read nothing.
    evict(&a);
    let (checks, reread) = (w["checks"].as_u64().unwrap(), w["pages_reread"].as_u64().unwrap());
    d.wait_for(Duration::from_secs(30), "two checks under pressure", |d| {
        let w = warm(d);
        if w["backing_off"] != true {
            return None;
        }
        assert_eq!(w["pages_reread"].as_u64().unwrap(), reread, "read back under pressure: {w}");
        (w["checks"].as_u64().unwrap() >= checks + 2).then_some(())
    });
    drop(cg);
}

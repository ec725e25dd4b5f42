//! Benchmark of the mount against the original paths, measured side by side in one run
//! (interleaved rounds, order alternating; ratios of each pair, their median and a 95%
//! interval of that median), through `<mount>/bin`: exec+exit of a small binary that has no
//! variant (what every binary is until optbin has one for it: passed through, it runs
//! natively), of a small binary with a served variant (bind-mounted over its entry by
//! default, `[policy] bind_served`: no request per exec, every run followed to its exit, the
//! original's exploration runs and the counted pairs in windows through the mount; the
//! report says how many runs were bound),
//! and of one served as a symlink (stripped); reading a ~100 MB served file (pinned to its
//! variant) with a warm and with a cold page cache; and the first exec of binaries never
//! seen before.
//!
//! The mount is the real daemon in its default configuration (per-exec measurement on,
//! the profiler, the warmer: what a user gets), logging at the default level. The variants
//! are copies of the originals' bytes with one byte appended (the same code, their own
//! content), placed in the catalog the way the optimizer records its output. The benchmark
//! checks that the runs of the binary with a variant were measured and that those of the
//! binary without one were not.
//! `OPTBIN_BENCH_QUICK=1` shrinks the counts; `OPTBIN_BENCH_BINARY=/path/to/optbin` runs
//! another build of the daemon (to compare before and after a change in one place).

#[path = "common/bench.rs"]
mod bench;

mod common;

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, OPTBIN};
use common::*;
use optbin::fs::{NoEvents, Overlay, OverlayConfig, ServingTable, StaticControl};
use optbin::fuse::{MountOptions, mount_background};

fn main() {
    bench::run("bench_overlay", bench_overlay);
}

/// Median and a distribution-free 95% interval of the median (order statistics of the
/// binomial: ranks n/2 -+ 0.98 sqrt(n), clamped).
struct Summary {
    median: f64,
    low: f64,
    high: f64,
}

fn summary(mut v: Vec<f64>) -> Summary {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    Summary { median, low: v[lo], high: v[hi] }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}, {:.3}]", self.median, self.low, self.high)
    }
}

fn exec_once(path: &Path) {
    let status = Command::new(path).stdout(Stdio::null()).status().expect("exec");
    assert!(status.success(), "{} failed", path.display());
}

/// Runs `n` execs of `path`, returns the time per exec in microseconds.
fn exec_round(path: &Path, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        exec_once(path);
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Per-round values of `a` and `b` and the ratios b/a, `rounds` pairs, order alternating.
struct Paired {
    a: Vec<f64>,
    b: Vec<f64>,
    ratios: Vec<f64>,
}

/// `run(false)` measures `a`, `run(true)` measures `b`.
fn paired(rounds: usize, mut run: impl FnMut(bool) -> f64) -> Paired {
    let mut p = Paired { a: vec![], b: vec![], ratios: vec![] };
    for r in 0..rounds {
        let (x, y) = if r % 2 == 0 {
            let x = run(false);
            (x, run(true))
        } else {
            let y = run(true);
            (run(false), y)
        };
        p.a.push(x);
        p.b.push(y);
        p.ratios.push(y / x);
    }
    p
}

/// One row of the report: the medians of both sides in `unit`, the ratio with its interval.
fn row(label: &str, p: &Paired, unit: &str, ratio_note: &str, target: &str) {
    let med = |v: &[f64]| summary(v.to_vec()).median;
    println!(
        "| {label} | {:.0} {unit} | {:.0} {unit} | {}{ratio_note} | {target} |",
        med(&p.a),
        med(&p.b),
        summary(p.ratios.clone())
    );
}

/// The file under the state directory with `size` bytes (the variant store's copy that
/// passthrough reads through the mount).
fn state_file_of_size(state: &Path, size: u64) -> Option<PathBuf> {
    files_under(state).into_iter().find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == size))
}

/// Places a variant of `original` ([`variant_copy`]) in state `served` once the daemon has
/// indexed it; returns the variant's id and the copy it was made from.
fn place_copy_as_variant(d: &Daemon, original: &Path, work: &Path) -> (i64, PathBuf) {
    std::fs::metadata(in_mount(&d.mnt, original)).unwrap(); // a lookup announces it
    let b = wait_binary(d, original, 30, "indexing", |b| b["sha256"].is_string());
    let sha = b["sha256"].as_str().unwrap().to_string();
    let copy = variant_copy(original, work);
    (place_variant(&d.state, &sha, &copy, "served"), copy)
}

/// The regular files under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let (mut files, mut dirs) = (Vec::new(), vec![dir.to_path_buf()]);
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(e.path()),
                Ok(t) if t.is_file() => files.push(e.path()),
                _ => {}
            }
        }
    }
    files
}

/// Reads the whole file, returns MB/s.
fn read_round(path: &Path, buf: &mut Vec<u8>) -> f64 {
    buf.clear();
    let start = Instant::now();
    std::fs::File::open(path).unwrap().read_to_end(buf).unwrap();
    let secs = start.elapsed().as_secs_f64();
    buf.len() as f64 / 1e6 / secs
}

/// Drops the page cache of `path` (its clean pages: `POSIX_FADV_DONTNEED`).
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a valid descriptor; fadvise has no memory preconditions.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "fadvise DONTNEED of {}", path.display());
}

/// Evicts `real` and every file the daemon may serve it from (the variant store and the
/// private copies of originals under the state directory): passthrough reads those.
fn evict_all(real: &Path, state: &Path) {
    evict(real);
    for p in files_under(state) {
        evict(&p);
    }
}

fn timed_exec(path: &Path) -> f64 {
    let start = Instant::now();
    exec_once(path);
    start.elapsed().as_secs_f64() * 1e6
}

/// The first number under `key` anywhere in `v`.
fn find_number(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_u64())
            .or_else(|| m.values().find_map(|x| find_number(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_number(x, key)),
        _ => None,
    }
}

fn runs_measured(d: &Daemon) -> u64 {
    find_number(&d.status_json(), "runs_measured").expect("status.json says runs_measured")
}

fn bench_overlay() {
    let quick = bench::quick();
    // Many short interleaved rounds: this machine is shared and noisy, and a median of
    // many paired ratios resists load changes better than a few long rounds.
    let (execs, rounds, big_mb, read_rounds, fresh) =
        if quick { (300, 15, 20, 7, 7) } else { (3000, 60, 100, 61, 21) };
    let per_round = execs / rounds;

    let (_tmp, root, bin) = open_test_root();
    // Two small programs (different content): one gets a served variant, one has none.
    prog(&bin.join("small"), "small", &[]);
    prog(&bin.join("plain"), "plain", &[]);
    // The same program stripped: nothing to optimize, served as a symlink to the original.
    prog(&bin.join("stripped"), "stripped", &["-s"]);
    // A big served file: a real program with data appended (still an ELF with symbols).
    prog(&bin.join("big"), "big", &[]);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(bin.join("big")).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..big_mb {
            f.write_all(&chunk).unwrap();
        }
    }
    let binary =
        std::env::var_os("OPTBIN_BENCH_BINARY").map_or(PathBuf::from(OPTBIN), PathBuf::from);
    let (mount, state) = (root.join("mnt"), root.join("state"));
    let config = root.join("config.toml");
    // `OPTBIN_BENCH_CONFIG`: config text for experiments (what a part of the daemon costs
    // per exec); the figures then no longer describe the default configuration.
    let experiment = std::env::var("OPTBIN_BENCH_CONFIG").ok();
    let config_text = experiment.clone().unwrap_or_else(|| "# the defaults\n".into());
    std::fs::write(&config, config_text.replace("\\n", "\n")).unwrap();
    let d = Daemon::start_as(&binary, "info", &mount, &[&bin], &state, Some(&config));
    let view = d.bin();
    let mirror = |name: &str| in_mount(&mount, &bin.join(name));
    let is_file = |name: &str| std::fs::symlink_metadata(mirror(name)).unwrap().is_file();
    let label_is = |name: &str, want: &str| {
        wait_binary(&d, &bin.join(name), 30, want, |b| b["served"] == want);
    };
    // An experiment may serve every binary through the mount (`native_until_variant = false`).
    if experiment.is_none() {
        assert!(!is_file("plain"), "plain, with no variant, is passed through as a symlink");
    }
    assert!(!is_file("stripped"), "stripped is served as a symlink");
    // small: a promoted variant, drawn per exec (the original keeps its exploration share).
    let (small_variant, small_copy) = place_copy_as_variant(&d, &bin.join("small"), &root);
    label_is("small", &format!("variant {small_variant} for 95% of execs"));
    // big: pinned to its variant, so every read is of the one served file.
    let (big_variant, big_variant_file) = place_copy_as_variant(&d, &bin.join("big"), &root);
    let variant_bytes = std::fs::read(&big_variant_file).unwrap();
    d.control("pin big bolted").unwrap();
    label_is("big", &format!("variant {big_variant}"));
    assert!(is_file("small") && is_file("big"), "binaries with a variant are served as files");

    // exec + exit: a binary with no variant, then one with a served variant
    let (native_plain, mount_plain) = (bin.join("plain"), view.join("plain"));
    exec_once(&native_plain);
    exec_once(&mount_plain);
    let measured_before = runs_measured(&d);
    // Paired rounds of execs of `a` and `b`, order alternating.
    let compare = |a: &Path, b: &Path| {
        paired(rounds, |second| exec_round(if second { b } else { a }, per_round))
    };
    let unvaried = compare(&native_plain, &mount_plain);
    exec_once(&bin.join("small"));
    exec_once(&view.join("small"));
    let (native_small, mount_small) = (bin.join("small"), view.join("small"));
    let served = compare(&native_small, &mount_small);
    // Per-exec measurement is on: the runs of small through the mount were measured, those
    // of plain were not (the records come in exec order: once small's are in, plain's
    // would be).
    let small_execs = (rounds * per_round) as u64 + 1;
    let expect = match experiment {
        // An experiment may switch measurement off.
        Some(_) => 0,
        None => measured_before + small_execs * 9 / 10,
    };
    d.wait_for(Duration::from_secs(30), "the runs through the mount measured", |d| {
        (runs_measured(d) >= expect).then_some(())
    });
    let measured = runs_measured(&d) - measured_before;
    if experiment.is_none() {
        assert!(measured <= small_execs, "{measured} measured, more than small's {small_execs}");
    }
    // How the served variant's runs reached it (absent from builds before bind mounts).
    let bound = d.status_json()["subsystems"]["policy"]["measurement"]["bound"].clone();
    // Bound runs are read for their command line one in `served_count_one_in`.
    let unread: i64 = common::daemon::catalog_read_only(&state)
        .query_row("SELECT count(*) FROM runs WHERE cmd_hash = 'unread'", [], |r| r.get(0))
        .unwrap_or(0);
    let bound = match (bound["execs"].as_u64(), bound["windows"].as_u64()) {
        (Some(execs), Some(windows)) => {
            format!("{execs} bound runs, {unread} not read for their command; {windows} windows")
        }
        _ => "no bind mounts in this build".to_string(),
    };
    // Where a served exec's time goes: the variant's file itself, the bind mount over the
    // mirror entry, the PATH view's symlink to that entry.
    let small_bytes = std::fs::read(&small_copy).unwrap();
    let store_small =
        state_file_of_size(&state, small_bytes.len() as u64).expect("the variant file of small");
    assert!(std::fs::read(&store_small).unwrap() == small_bytes, "{}", store_small.display());
    let mirror_small = mirror("small");
    exec_once(&store_small);
    let served_file = compare(&native_small, &store_small);
    let served_bind = compare(&store_small, &mirror_small);
    let served_view = compare(&mirror_small, &mount_small);
    let (native_stripped, mount_stripped) = (bin.join("stripped"), view.join("stripped"));
    exec_once(&mount_stripped);
    let symlinked = compare(&native_stripped, &mount_stripped);
    // A/A control: the same comparison of the original with itself shows the noise floor.
    let control = compare(&native_small, &native_small);

    // reading a big served file, page cache warm for both, then cold for both
    let mut buf = Vec::with_capacity((big_mb + 1) << 20);
    let (native_big, mount_big) = (bin.join("big"), view.join("big"));
    read_round(&native_big, &mut buf);
    read_round(&mount_big, &mut buf);
    let warm =
        paired(read_rounds, |b| read_round(if b { &mount_big } else { &native_big }, &mut buf));
    let cold = paired(read_rounds, |b| {
        evict_all(&native_big, &state);
        read_round(if b { &mount_big } else { &native_big }, &mut buf)
    });
    assert!(std::fs::read(&mount_big).unwrap() == variant_bytes, "big serves its variant");
    // Passthrough reads the variant's file in the store, not the original: two files whose
    // page cache can differ (how each was written decides the size of its cached folios).
    // These two comparisons split the warm ratio into the files and the FUSE layer.
    let copy =
        state_file_of_size(&state, variant_bytes.len() as u64).expect("the variant file of big");
    read_round(&copy, &mut buf);
    let copy_vs_original =
        paired(read_rounds, |b| read_round(if b { &copy } else { &native_big }, &mut buf));
    let mount_vs_copy =
        paired(read_rounds, |b| read_round(if b { &mount_big } else { &copy }, &mut buf));
    // The same split with a cold cache: is a cold difference the files' or the mount's?
    let cold_copy_vs_original = paired(read_rounds, |b| {
        evict_all(&native_big, &state);
        read_round(if b { &copy } else { &native_big }, &mut buf)
    });
    let cold_mount_vs_copy = paired(read_rounds, |b| {
        evict_all(&native_big, &state);
        read_round(if b { &mount_big } else { &copy }, &mut buf)
    });

    // first exec of binaries never seen before (fresh copies of plain: new names, new
    // inodes, no variant)
    let small = std::fs::read(&native_plain).unwrap();
    let mut n = 0;
    let first = paired(fresh, |through_mount| {
        n += 1;
        let name = format!("fresh-{n}");
        let real = bin.join(&name);
        std::fs::write(&real, &small).unwrap();
        chmod(&real, 0o755);
        // Let inotify's invalidation of the new name pass.
        std::thread::sleep(Duration::from_millis(20));
        timed_exec(&if through_mount { view.join(&name) } else { real })
    });
    drop(d);
    assert!(!is_mounted(&mount));

    // Without passthrough (the fallback for kernels without it), no daemon: why it matters.
    let mount2 = root.join("mnt2");
    let overlay = Overlay::new(
        OverlayConfig {
            mountpoint: mount2.clone(),
            overlay_dirs: vec![bin.clone()],
            originals: None,
        },
        ServingTable::new(),
        None,
        Arc::new(StaticControl::default()),
        Arc::new(NoEvents),
    )
    .unwrap();
    let mut opts = MountOptions::new(&mount2);
    opts.passthrough = false;
    let guard = mount_background(overlay, &opts).unwrap();
    let view2 = mount2.join("bin");
    exec_once(&view2.join("small"));
    let fallback_small = view2.join("small");
    let fallback_exec = paired(rounds / 2, |b| {
        exec_round(if b { &fallback_small } else { &native_small }, per_round)
    });
    let fallback_big = view2.join("big");
    read_round(&fallback_big, &mut buf);
    let fallback_read = paired(read_rounds.div_ceil(2), |b| {
        read_round(if b { &fallback_big } else { &native_big }, &mut buf)
    });
    drop(guard);
    assert!(!is_mounted(&mount2));

    let med = |v: &[f64]| summary(v.to_vec()).median;
    println!();
    let daemon = match &experiment {
        None => "the daemon in its default configuration".to_string(),
        Some(c) => format!("the daemon with the experiment's config {c:?}"),
    };
    println!(
        "overlay benchmark ({} mode; {daemon}; {measured} runs measured during the first two \
         comparisons, whose execs through the mount were {small_execs} of the binary with a \
         variant and as many of the one without; ratio: median of the paired rounds' ratios \
         [95% interval of that median])",
        if quick { "quick" } else { "full" },
    );
    println!("| measure | original | through the mount | ratio | target |");
    println!("|---|---|---|---|---|");
    let exec = |label: String, p: &Paired, target: &str| row(&label, p, "us", "", target);
    let read =
        |label: String, p: &Paired, target: &str| row(&label, p, "MB/s", " (throughput)", target);
    exec(
        format!(
            "exec+exit of a binary with no variant (runs natively until it has one), {execs} \
             execs in {rounds} rounds"
        ),
        &unvaried,
        "<= 1.02",
    );
    exec(
        format!(
            "exec+exit of a binary with a served variant (95% of execs, the original 5%; every \
             run followed; {bound}), same rounds"
        ),
        &served,
        "<= 1.02",
    );
    exec(
        "served, split: the variant's file run natively vs the original".into(),
        &served_file,
        "-",
    );
    exec(
        "served, split: its mirror entry (the bind mount, followed) vs the variant's file run \
         natively"
            .into(),
        &served_bind,
        "-",
    );
    exec(
        "served, split: the PATH view (a symlink to the mirror entry) vs the mirror entry".into(),
        &served_view,
        "-",
    );
    exec(
        "exec+exit of a binary served as a symlink (stripped), same rounds".into(),
        &symlinked,
        "<= 1.01",
    );
    exec("A/A control: exec+exit original vs original, same rounds".into(), &control, "~1.00");
    read(
        format!("read {big_mb} MB served file (its variant), warm cache, {read_rounds} rounds"),
        &warm,
        ">= 0.97",
    );
    read(
        "warm read, split: the variant's file read natively vs the original".into(),
        &copy_vs_original,
        "-",
    );
    read(
        "warm read, split: through the mount vs the variant's file read natively".into(),
        &mount_vs_copy,
        "-",
    );
    read(
        format!("read {big_mb} MB served file (its variant), cold cache, {read_rounds} rounds"),
        &cold,
        ">= 0.97",
    );
    read(
        "cold read, split: the variant's file read natively vs the original".into(),
        &cold_copy_vs_original,
        "-",
    );
    read(
        "cold read, split: through the mount vs the variant's file read natively".into(),
        &cold_mount_vs_copy,
        "-",
    );
    exec(
        format!("first exec of an unseen binary (no variant: passed through), {fresh} binaries"),
        &first,
        "-",
    );
    let fallback_execs = rounds / 2 * per_round;
    exec(
        format!("without passthrough, no daemon: exec+exit, {fallback_execs} execs"),
        &fallback_exec,
        "-",
    );
    read(
        format!("without passthrough, no daemon: read {big_mb} MB, warm cache"),
        &fallback_read,
        "-",
    );
    // Bounds that this machine's noise does not reach (see the A/A control) but a broken
    // fast path does (no passthrough, no kernel caching, an exec that waits on the daemon).
    let (exec_ratio, read_ratio) = (med(&served.ratios), med(&warm.ratios));
    assert!(exec_ratio < 2.0, "exec+exit through the mount costs {exec_ratio:.3}x native");
    let native_ratio = med(&unvaried.ratios);
    assert!(native_ratio < 1.5, "a passed-through exec costs {native_ratio:.3}x native");
    assert!(read_ratio > 0.5, "reading through the mount runs at {read_ratio:.3}x native");
}

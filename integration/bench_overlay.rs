//! Benchmark of the overlay against the original paths, measured side by side in one run
//! (interleaved rounds, medians): exec+exit of a small served binary through
//! `<mount>/bin`, reading a ~100 MB served file with a warm page cache, and the first exec
//! of binaries never seen before. `OPTBIN_BENCH_QUICK=1` shrinks the counts.

#[path = "common/bench.rs"]
mod bench;

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use optbin::fs::{NoEvents, Overlay, OverlayConfig, ServingTable, StaticControl};
use optbin::fuse::{MountOptions, mount_background};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
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

/// Interleaved rounds of `per_round` execs of `a` and `b` (order alternating), returning
/// the per-exec times of each and the ratios b/a per round.
fn paired_exec_rounds(
    a: &Path,
    b: &Path,
    rounds: usize,
    per_round: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut ta, mut tb, mut ratios) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let (x, y) = if r % 2 == 0 {
            let x = exec_round(a, per_round);
            (x, exec_round(b, per_round))
        } else {
            let y = exec_round(b, per_round);
            (exec_round(a, per_round), y)
        };
        ta.push(x);
        tb.push(y);
        ratios.push(y / x);
    }
    (ta, tb, ratios)
}

/// Interleaved full reads of `a` and `b` (order alternating): MB/s of each, ratios b/a.
fn paired_read_rounds(
    a: &Path,
    b: &Path,
    rounds: usize,
    buf: &mut Vec<u8>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut ta, mut tb, mut ratios) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let (x, y) = if r % 2 == 0 {
            let x = read_round(a, buf);
            (x, read_round(b, buf))
        } else {
            let y = read_round(b, buf);
            (read_round(a, buf), y)
        };
        ta.push(x);
        tb.push(y);
        ratios.push(y / x);
    }
    (ta, tb, ratios)
}

/// Reads the whole file, returns MB/s.
fn read_round(path: &Path, buf: &mut Vec<u8>) -> f64 {
    buf.clear();
    let start = Instant::now();
    std::fs::File::open(path).unwrap().read_to_end(buf).unwrap();
    let secs = start.elapsed().as_secs_f64();
    buf.len() as f64 / 1e6 / secs
}

fn timed_exec(path: &Path) -> f64 {
    let start = Instant::now();
    exec_once(path);
    start.elapsed().as_secs_f64() * 1e6
}

fn main() {
    bench::run("bench_overlay", bench_overlay);
}

fn bench_overlay() {
    let quick = std::env::var("OPTBIN_BENCH_QUICK").is_ok_and(|v| v == "1");
    // Many short interleaved rounds: this machine is shared and noisy, and a median of
    // many paired ratios resists load changes better than a few long rounds.
    let (execs, rounds, big_mb, read_rounds, fresh) =
        if quick { (200, 10, 20, 7, 7) } else { (2000, 40, 100, 21, 21) };

    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    prog(&bin.join("small"), "small", &[]);
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
    let mount = root.join("mnt");
    let overlay = Overlay::new(
        OverlayConfig {
            mountpoint: mount.clone(),
            overlay_dirs: vec![bin.clone()],
            originals: None,
        },
        ServingTable::new(),
        None,
        Arc::new(StaticControl::default()),
        Arc::new(NoEvents),
    )
    .unwrap();
    let guard = mount_background(overlay, &MountOptions::new(&mount)).unwrap();
    let view = mount.join("bin");
    let mirror = |name: &str| in_mount(&mount, &bin.join(name));
    assert!(
        std::fs::symlink_metadata(mirror("small")).unwrap().file_type().is_file(),
        "small is served"
    );
    assert!(
        std::fs::symlink_metadata(mirror("big")).unwrap().file_type().is_file(),
        "big is served"
    );

    // exec + exit
    exec_once(&bin.join("small"));
    exec_once(&view.join("small"));
    let per_round = execs / rounds;
    let (orig_exec, mount_exec, exec_ratios) =
        paired_exec_rounds(&bin.join("small"), &view.join("small"), rounds, per_round);
    // A/A control: the same comparison of the original with itself shows the noise floor.
    let (_, _, control_ratios) =
        paired_exec_rounds(&bin.join("small"), &bin.join("small"), rounds, per_round);

    // reading a big served file, page cache warm for both
    let mut buf = Vec::with_capacity((big_mb + 1) << 20);
    read_round(&bin.join("big"), &mut buf);
    read_round(&view.join("big"), &mut buf);
    let (orig_read, mount_read, read_ratios) =
        paired_read_rounds(&bin.join("big"), &view.join("big"), read_rounds, &mut buf);
    assert_eq!(std::fs::read(view.join("big")).unwrap(), std::fs::read(bin.join("big")).unwrap());

    // first exec of binaries never seen before (fresh copies: new names, new inodes)
    let (mut orig_first, mut mount_first, mut first_ratios) = (vec![], vec![], vec![]);
    let small = std::fs::read(bin.join("small")).unwrap();
    for i in 0..fresh {
        let a: PathBuf = bin.join(format!("fresh-a{i}"));
        let b: PathBuf = bin.join(format!("fresh-b{i}"));
        for p in [&a, &b] {
            std::fs::write(p, &small).unwrap();
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        // Let inotify's invalidations of the new names pass.
        std::thread::sleep(Duration::from_millis(20));
        let (o, m) = if i % 2 == 0 {
            let o = timed_exec(&a);
            (o, timed_exec(&view.join(format!("fresh-b{i}"))))
        } else {
            let m = timed_exec(&view.join(format!("fresh-b{i}")));
            (timed_exec(&a), m)
        };
        orig_first.push(o);
        mount_first.push(m);
        first_ratios.push(m / o);
    }
    drop(guard);
    assert!(!is_mounted(&mount));

    // The same without passthrough (the fallback for kernels without it): why it matters.
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
    let (_, _, fallback_exec) =
        paired_exec_rounds(&bin.join("small"), &view2.join("small"), rounds / 2, per_round);
    read_round(&view2.join("big"), &mut buf);
    let (_, fallback_read_mbs, fallback_read) =
        paired_read_rounds(&bin.join("big"), &view2.join("big"), read_rounds.div_ceil(2), &mut buf);
    drop(guard);
    assert!(!is_mounted(&mount2));

    println!();
    println!(
        "overlay benchmark ({}; medians of interleaved rounds)",
        if quick { "quick" } else { "full" }
    );
    println!("| measure | original | through the mount | ratio (median of pairs) | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| exec+exit, {execs} execs in {rounds} rounds | {:.0} us | {:.0} us | {:.3} | <= 1.05 |",
        median(orig_exec),
        median(mount_exec),
        median(exec_ratios.clone())
    );
    let exec_ratios_for_assert = exec_ratios;
    println!(
        "| A/A control: exec+exit original vs original, same rounds | - | - | {:.3} | ~1.00 |",
        median(control_ratios)
    );
    println!(
        "| read {big_mb} MB served file, warm cache, {read_rounds} rounds | {:.0} MB/s | {:.0} MB/s | {:.3} (throughput) | >= 0.9 |",
        median(orig_read),
        median(mount_read),
        median(read_ratios.clone())
    );
    let read_ratios_for_assert = read_ratios;
    println!(
        "| without passthrough: exec+exit, {} execs | - | - | {:.3} | - |",
        rounds / 2 * per_round,
        median(fallback_exec)
    );
    println!(
        "| without passthrough: read {big_mb} MB, warm cache | - | {:.0} MB/s | {:.3} (throughput) | - |",
        median(fallback_read_mbs),
        median(fallback_read)
    );
    println!(
        "| first exec of an unseen binary, {fresh} binaries | {:.0} us | {:.0} us | {:.3} | - |",
        median(orig_first),
        median(mount_first),
        median(first_ratios)
    );
    // Bounds that this machine's noise does not reach (see the A/A control) but a broken
    // fast path does (no passthrough, no kernel caching, an exec that waits on the daemon).
    let (exec_ratio, read_ratio) = (median(exec_ratios_for_assert), median(read_ratios_for_assert));
    assert!(exec_ratio < 2.0, "exec+exit through the mount costs {exec_ratio:.3}x native");
    assert!(read_ratio > 0.5, "reading through the mount runs at {read_ratio:.3}x native");
}

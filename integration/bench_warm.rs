//! Benchmark of keeping hot binaries warm: cold exec latency some seconds after the page
//! cache was dropped (`echo 3 > /proc/sys/vm/drop_caches`, as root), with warming on
//! against off, in interleaved pairs, for a large binary (`node`, 98 MB, copied into the
//! overlaid directory so it is served through the mount) and two small programs built
//! here. Two daemons serve the same directory: A warms (check every second), B does not
//! (`budget_mib = 0`); during an "off" trial A's server is stopped (SIGSTOP) so nothing
//! warms. Prints per program the median on/off ratio with the range of the pairs, and the
//! warming costs: pages read back per drop and bytes kept resident.
//! `OPTBIN_BENCH_QUICK=1` runs 2 pairs, else 8.

#[path = "common/bench.rs"]
mod bench;

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;

const SMALL_C: &str = r#"
#include <stdio.h>
#define N (2 << 20)
static const unsigned char table[N] = { [0] = 1, [N - 1] = 3 };
int main(void) {
    unsigned long sum = 0;
    for (int i = 0; i < N; i += 4096) sum += ((volatile const unsigned char *)table)[i];
    printf("%lu\n", sum);
    return 0;
}
"#;

fn drop_caches() {
    Command::new("sync").status().unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (run as root)");
}

fn time_exec(bin: &Path, args: &[&str]) -> f64 {
    let t = Instant::now();
    let s = Command::new(bin).args(args).stdout(Stdio::null()).status().unwrap();
    assert!(s.success(), "{} failed", bin.display());
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on the test's own daemon.
    unsafe { libc::kill(pid as i32, sig) };
}

fn warm_field(d: &Daemon, key: &str) -> u64 {
    d.status_json()["subsystems"]["warm"][key].as_u64().unwrap_or(0)
}

fn main() {
    bench::run("bench_warm", warm_on_vs_off);
}

fn warm_on_vs_off() {
    let pairs = if bench::quick() { 2 } else { 8 };
    let dir = common::open_tempdir();
    let over = dir.path().join("bin");
    std::fs::create_dir_all(&over).unwrap();
    let node = Path::new("/usr/bin/node");
    let mut programs: Vec<(&str, Vec<&str>)> = Vec::new();
    if node.exists() {
        std::fs::copy(node, over.join("node")).unwrap();
        programs.push(("node", vec!["-e", "0"]));
    } else {
        eprintln!("bench_warm: no /usr/bin/node here; small programs only");
    }
    for name in ["small-a", "small-b"] {
        common::cc(SMALL_C, &over.join(name), &[]);
        programs.push((name, vec![]));
    }
    let cfg_on = dir.path().join("on.toml");
    std::fs::write(&cfg_on, "[warm]\nbudget_mib = 512\ninterval_secs = 1\n").unwrap();
    let cfg_off = dir.path().join("off.toml");
    std::fs::write(&cfg_off, "[warm]\nbudget_mib = 0\n").unwrap();
    let (ma, mb) = (dir.path().join("mnt-a"), dir.path().join("mnt-b"));
    std::fs::create_dir_all(&ma).unwrap();
    std::fs::create_dir_all(&mb).unwrap();
    let a = Daemon::start(&ma, &[&over], &dir.path().join("state-a"), Some(&cfg_on));
    let b = Daemon::start(&mb, &[&over], &dir.path().join("state-b"), Some(&cfg_off));
    // Make them hot through A: its warmer learns their working sets.
    for _ in 0..3 {
        for (name, args) in &programs {
            time_exec(&a.bin().join(name), args);
        }
    }
    a.wait_for(Duration::from_secs(30), "the programs kept warm", |d| {
        let kept = d.status_json()["subsystems"]["warm"]["kept"].as_array().map_or(0, |k| k.len());
        (kept >= programs.len()).then_some(())
    });
    let kept_bytes = warm_field(&a, "kept_bytes");
    // The user comes back this long after the drop: a check has happened by then.
    let delay = Duration::from_secs(3);
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); programs.len()];
    let (mut on_ms, mut off_ms): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (vec![Vec::new(); programs.len()], vec![Vec::new(); programs.len()]);
    let mut reread = Vec::new();
    let server_a = a.server_pid();
    for pair in 0..pairs {
        let on_first = pair % 2 == 0;
        let mut times = [Vec::new(), Vec::new()];
        for arm_on in [on_first, !on_first] {
            let before = warm_field(&a, "pages_reread");
            if !arm_on {
                signal(server_a, libc::SIGSTOP);
            }
            drop_caches();
            std::thread::sleep(delay);
            let mnt = if arm_on { &a } else { &b };
            let t: Vec<f64> =
                programs.iter().map(|(n, args)| time_exec(&mnt.bin().join(n), args)).collect();
            if !arm_on {
                signal(server_a, libc::SIGCONT);
            } else {
                reread.push((warm_field(&a, "pages_reread") - before) as f64);
            }
            times[usize::from(arm_on)] = t;
        }
        for i in 0..programs.len() {
            off_ms[i].push(times[0][i]);
            on_ms[i].push(times[1][i]);
            ratios[i].push(times[1][i] / times[0][i]);
        }
    }
    println!(
        "cold exec {} s after dropping the page cache, warming on vs off, {pairs} interleaved pairs",
        delay.as_secs()
    );
    println!(
        "| program | off, median ms | on, median ms | on/off median ratio | pair ratios min..max |"
    );
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in programs.iter().enumerate() {
        let r = &ratios[i];
        let (lo, hi) = r.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "| {name} | {:.1} | {:.1} | {:.3} | {lo:.3}..{hi:.3} |",
            median(off_ms[i].clone()),
            median(on_ms[i].clone()),
            median(r.clone())
        );
    }
    println!(
        "warming cost: {:.1} MiB kept resident (working sets); {:.1} MiB read back per drop (median)",
        kept_bytes as f64 / 1048576.0,
        median(reread) * 4096.0 / 1048576.0
    );
    // What can honestly be asserted: with the pages read back, the large binary's cold
    // start is faster than without.
    if node.exists() {
        let r = median(ratios[0].clone());
        assert!(r < 1.0, "warming did not make node's cold start faster: ratio {r:.3}");
    }
}

//! What every benchmark under `integration/` shares: they are programs (`harness = false`),
//! not tests. `integration/run-tests.sh` runs each in its short mode (`OPTBIN_BENCH_QUICK=1`)
//! as a smoke check that fails the suite if the benchmark fails; `integration/bench.sh` runs
//! them in full mode and writes what they print to `docs/benchmarks.md`.
#![allow(dead_code)]

use std::time::Instant;

/// Short mode: `OPTBIN_BENCH_QUICK` set to anything but `0`.
pub fn quick() -> bool {
    std::env::var_os("OPTBIN_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// Runs the benchmark `body` as the whole program: a failed assertion in it (a panic) ends
/// the program with a non-zero status. Arguments (such as the `--bench` of `cargo bench`)
/// are ignored: the mode comes from `OPTBIN_BENCH_QUICK`.
pub fn run(name: &str, body: impl FnOnce()) {
    let mode = if quick() { "quick" } else { "full" };
    eprintln!("{name}: running ({mode} mode)");
    let started = Instant::now();
    body();
    eprintln!("{name}: passed ({mode} mode, {:.1} s)", started.elapsed().as_secs_f64());
}

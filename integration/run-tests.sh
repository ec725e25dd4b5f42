#!/usr/bin/env bash
# Runs all of optbin's tests: installs what they need (fuse3, BOLT, perf, gcc; as root),
# then the benchmarks in their short mode as smoke checks (each fails the run if it
# fails; `integration/bench.sh` runs them in full mode), the fuzz targets for a bounded
# number of cases, a short soak run, and last the unit and integration tests on real
# mounts (so that the output ends with cargo test's summary lines).
# Tests mount FUSE and use perf system-wide: run as root.
# Arguments go to `cargo test` (a test name filters); OPTBIN_SKIP_BENCH_SMOKE=1 skips the
# benchmark smoke runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash mount/deps.sh
if [ "$(id -u)" != 0 ]; then
    echo "run-tests.sh: the tests mount FUSE and sample with perf: run them as root" >&2
    exit 1
fi
# Release: the benchmarks compare the overlay with native speed, and BOLT runs on
# optimized test programs either way. Tests share two cores: run test binaries one
# at a time, each test file's tests in parallel only where they say so.
if [ "${OPTBIN_SKIP_BENCH_SMOKE-0}" != 1 ]; then
    OPTBIN_BENCH_QUICK=1 cargo test --release --locked --no-fail-fast --benches
fi
cargo test --release --locked --no-fail-fast -- --test-threads=1 "$@"

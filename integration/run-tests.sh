#!/usr/bin/env bash
# Runs all of optbin's tests: installs what they need (fuse3, BOLT, perf, gcc; as root),
# then unit tests, integration tests on real mounts, and the benchmarks in their short
# mode (OPTBIN_BENCH_QUICK=1; unset it for full-length benchmark runs).
# Tests mount FUSE and use perf system-wide: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash mount/deps.sh
export OPTBIN_BENCH_QUICK="${OPTBIN_BENCH_QUICK-1}"
# Release: the benchmarks compare the overlay with native speed, and BOLT runs on
# optimized test programs either way. Tests share two cores: run test binaries one
# at a time, each test file's tests in parallel only where they say so.
cargo test --release --locked -- --test-threads=1 "$@"

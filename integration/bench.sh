#!/usr/bin/env bash
# Runs optbin's benchmarks (integration/bench_*.rs) in full mode and writes what each
# printed into docs/benchmarks.md, in that benchmark's section (the sections of benchmarks
# not run this time stay as they were). Run as root (they mount FUSE, sample with perf,
# run BOLT). A full run of all of them takes over an hour on a 2-core machine; name some
# to run only those:
#   integration/bench.sh                      # all
#   integration/bench.sh bench_overlay bench_policy
# OPTBIN_BENCH_QUICK=1 runs the short modes instead (and says so in the document).
set -euo pipefail
cd "$(dirname "$0")/.."
all=(bench_overlay bench_sampling bench_policing bench_policy bench_optimizer bench_pipeline bench_warm bench_fleet)
if [ $# -gt 0 ]; then names=("$@"); else names=("${all[@]}"); fi
export OPTBIN_BENCH_QUICK="${OPTBIN_BENCH_QUICK-0}"
mode=full
[ "$OPTBIN_BENCH_QUICK" != 0 ] && mode=quick
doc=docs/benchmarks.md
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --release --locked --benches
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ", with local changes" || true)
failed=()
for name in "${names[@]}"; do
    echo "== $name ($mode mode)" >&2
    started=$(date +%s)
    if cargo test --release --locked --bench "$name" >"$out/$name.txt" 2>"$out/$name.err"; then
        status=passed
    else
        status=FAILED
        failed+=("$name")
        tail -30 "$out/$name.err" >&2
    fi
    secs=$(( $(date +%s) - started ))
    cat "$out/$name.txt"
    {
        echo "<!-- bench:$name -->"
        echo "### $name"
        echo
        echo "$mode mode, $status in ${secs} s; $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit$dirty;"
        echo "$(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
        echo "Command: \`OPTBIN_BENCH_QUICK=$OPTBIN_BENCH_QUICK cargo test --release --bench $name\`"
        echo
        echo '```'
        cat "$out/$name.txt"
        echo '```'
        echo "<!-- /bench:$name -->"
    } >"$out/$name.section"
    python3 - "$doc" "$name" "$out/$name.section" <<'PY'
import re, sys
doc, name, section_file = sys.argv[1:]
section = open(section_file).read().rstrip("\n")
text = open(doc).read()
pattern = re.compile(r"<!-- bench:%s -->.*?<!-- /bench:%s -->" % (re.escape(name), re.escape(name)), re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(doc, "w").write(text)
PY
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench.sh: failed: ${failed[*]} (their sections say so)" >&2
    exit 1
fi
echo "bench.sh: wrote ${names[*]} to $doc" >&2

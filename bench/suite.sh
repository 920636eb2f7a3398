#!/usr/bin/env bash
# The suite runner, measured: examples/suite (8 tests, one 512 MiB VM each) sequentially
# (-j 1) and in parallel (the default: one test per usable core; and -j 4), wall time each,
# with the load average before and after (the machine may be shared).
# Usage: bench/suite.sh [OUT]   (run from the repo root; NTNG=path/to/ntng)
set -uo pipefail
cd "$(dirname "$0")/.."
NTNG=${NTNG:-.venv/bin/ntng}
OUT=${1:-/tmp/ntng-bench-suite}
rm -rf "$OUT"
for jobs in 1 default 4; do
  args=(); [ "$jobs" = default ] || args=(-j "$jobs")
  echo "== -j $jobs  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  t0=$(date +%s.%N)
  "$NTNG" test examples/suite --accel tcg -o "$OUT/j$jobs" "${args[@]}" > "$OUT-j$jobs.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -1 "$OUT-j$jobs.log"
  printf -- "-j %s: exit %d, wall %.1f s, load after: %s\n" "$jobs" "$rc" "$(echo "$t1 - $t0" | bc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
done

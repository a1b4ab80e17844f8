#!/usr/bin/env bash
# CPU time per request by thread (user and kernel, and for the benchmark's own threads their
# run-queue wait and preemptions) for one target of the gateway benchmark:
# runs a closed-loop slice of `target` and reads /proc/<pid>/task/*/stat (and wrk's, Redis's and
# Postgres's processes) over 10 s in its middle. With `perf` installed it also records a
# `cpu-clock` profile of the whole machine for the same 10 s (perf slows the run by ~10 %).
#
#   bench/threads.sh "governed gateway" [postgres|sqlite] [more caracal-bench gateway options]
#
# e.g. `bench/threads.sh "governed gateway" postgres --open-loop` for the fixed-rate loop at
# 3,000 req/s (where the added latency is measured) instead of the closed loop.
#
# Postgres and Redis must answer on 127.0.0.1 for `postgres` (`.ci/run` starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; store="${2:-postgres}"; shift $(( $# < 2 ? $# : 2 ))
BENCH_TOOLS="wrk cmake"
. bench/setup.sh
out="$(mktemp -d)"
"$target/release/caracal-bench" gateway --store "$store" --seconds 20 --connections 32 --only "$name" "$@" >"$out/bench.txt" 2>&1 &
pid=$!
sleep 9
if command -v perf >/dev/null; then
  perf record -e cpu-clock -F 2999 -a -o "$out/perf.data" -- sleep 10 >/dev/null 2>&1 &
fi
python3 bench/threads_cpu.py "$pid" 10 >"$out/threads.txt"
wait
cat "$out/bench.txt" "$out/threads.txt"
echo "(divide by the slice's requests: the req/s above × 10; perf profile, if any: $out/perf.data)"

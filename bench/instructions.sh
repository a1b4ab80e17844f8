#!/usr/bin/env bash
# Instructions per request on each proxy's worker thread (valgrind's callgrind counts
# instructions, so the figure repeats run to run whatever else the machine is doing, unlike
# the timed benchmark on a shared VM), and in the audit publisher, which runs on the other core.
# Builds the benchmark like bench/run.sh, then runs one closed-loop slice per target under
# callgrind, and ends with where the governed thread's extra instructions go (bench/cg_diff.py:
# the functions whose own cost per request differs most from the plain passthrough's). The
# profiles are kept for callgrind_annotate; the last line says where.
#
#   bench/instructions.sh [seconds]        # default 20 s per target (a few thousand requests)
#
# Postgres and Redis must answer on 127.0.0.1 (`.ci/run` starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
BENCH_TOOLS="wrk cmake valgrind"
. bench/setup.sh
out="$(mktemp -d)"
run() { # name, --only target, upstream_peer symbol
  mkdir -p "$out/$1"
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/$1/cg.out" \
    "$target/release/caracal-bench" gateway --store postgres --seconds "$secs" --connections 16 \
    --only "$2" >"$out/$1/bench.txt" 2>"$out/$1/valgrind.txt"
  printf '%-28s ' "$2:"
  python3 bench/cg_per_request.py "$out/$1"/cg.out-* "$3"
}
plain="gateway::Plain as pingora_proxy::proxy_trait::ProxyHttp>::upstream_peer"
governed="proxy::Proxy as pingora_proxy::proxy_trait::ProxyHttp>::upstream_peer"
run plain "plain Pingora passthrough" "$plain"
run governed "governed gateway" "$governed"
run budget "governed gateway + budget" "$governed"
echo "governed gateway against the plain passthrough (A: plain, B: governed):"
python3 bench/cg_diff.py "$out/plain" "$plain" "$out/governed" "$governed"
echo "(profiles: $out/{plain,governed,budget}/cg.out-*)"

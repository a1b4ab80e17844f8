#!/usr/bin/env bash
# Reproduce the figures in bench/RESULTS.md on this machine: installs the load generator (wrk;
# without it the gateway benchmark falls back to an in-process generator that shares the
# process with the system under test, and its figures are not comparable), builds the
# benchmark in release and runs it with the arguments given, e.g.
#
#   bench/run.sh gateway --store postgres --seconds 6 --rounds 7
#   bench/run.sh gateway --store sqlite --seconds 6 --rounds 7
#   bench/run.sh sts --store postgres --seconds 10 --workers 32
#
# Postgres and Redis must answer on 127.0.0.1 for `--store postgres` (`.ci/run` starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_TOOLS="wrk cmake"
. bench/setup.sh
exec "$target/release/caracal-bench" "$@"

# Sourced by bench/run.sh and bench/instructions.sh (from the repository's root): installs the
# tools named in BENCH_TOOLS that are missing, points the benchmark at Postgres and Redis on
# loopback (unless set), builds it in release and sets `target` to the cargo target directory.
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
for tool in $BENCH_TOOLS; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi
export CARACAL_TEST_DATABASE_URL="${CARACAL_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export CARACAL_TEST_REDIS_URL="${CARACAL_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p caracal-bench

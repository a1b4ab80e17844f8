#!/usr/bin/env bash
# Fuzz the control API from its own OpenAPI document with schemathesis: every generated input
# must get a non-5xx answer. Runs against `caracal dev` on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug/caracal"
[ -x "$bin" ] || cargo build -p caracal-cli --locked
venv="${CARACAL_CI_VENV:-$HOME/.cache/caracal-ci/venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis>=4,<5"
fi
work=$(mktemp -d)
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
export CARACAL__CONTROL__LISTEN=127.0.0.1:27402 CARACAL__STS__LISTEN=127.0.0.1:27403 \
  CARACAL__COORDINATOR__LISTEN=127.0.0.1:27404 CARACAL__AUDIT__LISTEN=127.0.0.1:27405 \
  CARACAL__GATEWAY__LISTEN=127.0.0.1:27400 CARACAL__GATEWAY__ADMIN_LISTEN=127.0.0.1:27401 \
  CARACAL__HTTP__RATE_LIMIT_PER_SEC=100000 CARACAL__HTTP__RATE_LIMIT_BURST=100000 RUST_LOG=warn
"$bin" dev --data-dir "$work/data" > "$work/dev.log" 2>&1 &
pid=$!
ready=0
for _ in $(seq 1 600); do
  if curl -sf http://127.0.0.1:27402/readyz >/dev/null && [ -s "$work/data/admin-token" ]; then ready=1; break; fi
  kill -0 $pid 2>/dev/null || break
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "caracal dev did not become ready; its log:"
  cat "$work/dev.log"
  exit 1
fi
token=$(cat "$work/data/admin-token")
tenant=$(awk '/demo tenant/ {print $3}' "$work/dev.log")
"$venv/bin/schemathesis" run http://127.0.0.1:27402/v1/openapi.json \
  -H "Authorization: Bearer $token" -H "X-Caracal-Tenant: $tenant" \
  --checks not_a_server_error -n "${FUZZ_EXAMPLES:-30}" --seed 1 --request-timeout 10 \
  --exclude-operation-id delete_v1_admin_tokens__token_id_ \
  --exclude-operation-id delete_v1_tenants__tenant_id_

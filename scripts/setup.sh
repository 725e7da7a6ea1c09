#!/usr/bin/env bash
# Installs what building, running and testing portcullis needs on Debian.
# Idempotent; run as root. Sourced or run by the other scripts.
set -euo pipefail

# install_missing PACKAGE...: installs those not installed yet, and leaves
# their names in `newly_installed`.
install_missing() {
  local p
  newly_installed=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || newly_installed+=("$p")
  done
  [ ${#newly_installed[@]} -gt 0 ] || return 0
  echo "setup: installing ${newly_installed[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${newly_installed[@]}" >/dev/null
}

install_missing ca-certificates curl openssl iproute2 iptables procps util-linux python3 python3-venv publicsuffix \
  shellcheck gcc libc6-dev systemd logrotate

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  # Debian's own Rust is too old for edition 2024: use rustup's stable.
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# Python test tools in venvs of their own (Debian's Python refuses
# system-wide pip installs): moto_server, a local S3 API for the
# allowlist-source tests; python-hcl2, which parses the Terraform module;
# configobj for cloud-init below. checkov, the Terraform policy checker,
# gets a venv apart: it pins its own fork of the HCL parser.
PORTCULLIS_VENV=${PORTCULLIS_VENV:-/opt/portcullis-test-venv}
if [ ! -x "$PORTCULLIS_VENV/bin/moto_server" ] || ! "$PORTCULLIS_VENV/bin/python" -c 'import configobj, hcl2' 2>/dev/null; then
  echo "setup: installing moto[server], python-hcl2 and configobj into $PORTCULLIS_VENV"
  python3 -m venv "$PORTCULLIS_VENV"
  "$PORTCULLIS_VENV/bin/pip" install -q 'moto[server]>=5,<6' 'python-hcl2>=7,<9' 'configobj>=5'
fi
export MOTO_SERVER="$PORTCULLIS_VENV/bin/moto_server" PORTCULLIS_VENV
PORTCULLIS_CHECKOV_VENV=${PORTCULLIS_CHECKOV_VENV:-/opt/portcullis-checkov-venv}
if [ ! -x "$PORTCULLIS_CHECKOV_VENV/bin/checkov" ]; then
  echo "setup: installing checkov into $PORTCULLIS_CHECKOV_VENV"
  python3 -m venv "$PORTCULLIS_CHECKOV_VENV"
  "$PORTCULLIS_CHECKOV_VENV/bin/pip" install -q 'checkov>=3,<4'
fi
export PORTCULLIS_CHECKOV_VENV

# Checkers taken out of Debian's packages without installing them, so a
# test run starts no service and changes no boot: promtool (metrics and
# alert rules; installing prometheus would start a server on port 9090,
# portcullis's admin port), packer (the AMI template) and cloud-init (the
# user data schema; installed, it would run at the next boot).
PORTCULLIS_TOOLS=${PORTCULLIS_TOOLS:-/opt/portcullis-test-tools}
unpack() {
  local package=$1 deb_dir
  [ -e "$PORTCULLIS_TOOLS/$package.unpacked" ] && return 0
  echo "setup: unpacking $package into $PORTCULLIS_TOOLS"
  deb_dir=$(mktemp -d)
  if ! (cd "$deb_dir" && apt-get download -qq "$package" 2>/dev/null); then
    apt-get update -qq
    (cd "$deb_dir" && apt-get download -qq "$package")
  fi
  mkdir -p "$PORTCULLIS_TOOLS"
  dpkg-deb -x "$deb_dir"/"$package"_*.deb "$PORTCULLIS_TOOLS"
  rm -rf "$deb_dir"
  touch "$PORTCULLIS_TOOLS/$package.unpacked"
}
unpack prometheus
unpack packer
unpack cloud-init
cat >"$PORTCULLIS_TOOLS/usr/bin/cloud-init" <<WRAPPER
#!/bin/sh
PYTHONPATH="$PORTCULLIS_TOOLS/usr/lib/python3/dist-packages" exec "$PORTCULLIS_VENV/bin/python" -m cloudinit.cmd.main "\$@"
WRAPPER
chmod 0755 "$PORTCULLIS_TOOLS/usr/bin/cloud-init"
export PATH="$PORTCULLIS_TOOLS/usr/bin:$PATH"

#!/usr/bin/env bash
# Builds portcullis and runs it on the shipped example allowlist. Extra
# arguments go to `portcullis run` (see `portcullis run --help`).
# Traffic reaches it once the iptables rules redirect it: see
# iptables/portcullis-iptables.sh, or scripts/demo.sh for a complete example.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
cargo build --locked --release
exec target/release/portcullis run --allowlist examples/allowlist.txt "$@"

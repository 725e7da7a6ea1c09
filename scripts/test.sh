#!/usr/bin/env bash
# The whole test suite, as CI runs it (root: the end-to-end tests build
# network namespaces and iptables rules).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

# Namespaces left by an earlier run that was killed before its clean-up:
# the tests' (pc…, ho…, pt-tf-…), the shipping benchmark's (pb-ship-…),
# the HA simulation's (hs-…) and the GWLB simulation's (gw-…).
leftover='^(pc[0-9]+-[a-z0-9]+-[cgu]|ho[0-9]+-[a-z0-9]+|pt-tf-[0-9]+|pb-ship-[0-9]+|hs-[a-z0-9-]+|gw-[a-z0-9-]+)$'
for ns in $(ip netns list | awk -v re="$leftover" '$1 ~ re {print $1}'); do ip netns del "$ns"; done

step() { printf '\n== %s\n' "$*"; }
step "cargo fmt --check";   cargo fmt --all --check && cargo fmt --check --manifest-path fuzz/Cargo.toml
step "shellcheck";          shellcheck scripts/*.sh iptables/*.sh ami/scripts/*.sh benches/netns/*.sh benches/ship/*.sh .ci/run
step "cargo clippy";        cargo clippy --locked --workspace --all-targets -- -D warnings
step "release build";       cargo build --locked --release
# Each gateway of the macro-benchmark must carry traffic (a second per
# workload; the numbers are not kept).
step "macro-benchmark, short"; bash benches/netns/run.sh --short
# The audit shipper against a local CloudWatch Logs: every record arrives.
step "audit shipping, short"; timeout 300 bash benches/ship/run.sh --short
# Failover, rollout and split of two gateways against a local EC2 API.
step "HA simulation";       timeout 600 bash scripts/ha-sim.sh
# Three gateways behind a GWLB stand-in: spread, a target's death, a scale-in.
step "GWLB simulation";     timeout 600 bash scripts/gwlb-sim.sh
# The tests run against the release build, the binary we ship, and share
# its compiled dependencies instead of building them a second time.
step "tests";               cargo test --locked --release --workspace --all-targets
# Each fuzz target from real seeds and past failures, for a bounded time.
step "fuzzing";             bash scripts/fuzz.sh 45

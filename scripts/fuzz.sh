#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 45 s each), seeded
# with real inputs: captured ClientHellos, captured HTTP heads, the example
# allowlist, GENEVE datagrams laid out as GWLB sends them, and every input
# that once failed (fuzz/regressions/). A failure stops the run; libFuzzer
# leaves the input under fuzz/artifacts/.
#
#   scripts/fuzz.sh [SECONDS]
#
# The machine has only the stable toolchain: RUSTC_BOOTSTRAP=1 lets it
# take the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
seeds() {
  case $1 in
    client_hello) echo testdata/clienthellos ;;
    http_head) echo testdata/http ;;
    allowlist) echo examples ;;
    geneve) echo testdata/geneve ;;
  esac
}
for target in client_hello http_head allowlist geneve; do
  # New inputs go to the first directory: a scratch corpus, not the seeds.
  corpus=target/fuzz-corpus/$target
  # git keeps no empty directory, and libFuzzer exits on a missing one.
  regressions=fuzz/regressions/$target
  mkdir -p "$corpus" "$regressions"
  log=target/fuzz-$target.log
  echo "fuzz: $target for ${seconds}s"
  if ! cargo fuzz run "$target" "$corpus" "$(seeds "$target")" "$regressions" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $target failed; keep the input above as fuzz/regressions/$target/<name> once fixed" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log"
done

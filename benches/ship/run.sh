#!/usr/bin/env bash
# How many audit records a second `portcullis ship` puts to CloudWatch Logs
# without losing one: RECORDS lines shaped like portcullis's (about 330
# bytes each) are written to an audit file at once, the shipper started on
# it, and the time until the last one is in the stream is measured, against
# moto's CloudWatch Logs in a namespace with only a loopback. Every record
# is then checked to be there. Root. `--short`: 20,000 records.
#
#   ship: 100000 records (31.7 MiB) in 6.2 s: 16129 records/s, 0 lost
#
# moto (Python) bounds the figure; CloudWatch Logs itself takes up to
# 10,000 events or 1 MiB per call, and the shipper makes one call at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
RECORDS=100000
[ "${1:-}" = "--short" ] && RECORDS=20000
if [ -z "${MOTO_SERVER:-}" ]; then
  # shellcheck source=scripts/setup.sh
  source scripts/setup.sh
fi
BIN=${PORTCULLIS_BIN:-target/release/portcullis}
PY="$PORTCULLIS_VENV/bin/python"
[ -x "$BIN" ] || { echo "ship bench: build first (cargo build --release): no $BIN" >&2; exit 2; }
NS=pb-ship-$$
DIR=$(mktemp -d)
cleanup() {
  disown -a
  ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
export AWS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
ip netns exec "$NS" "$MOTO_SERVER" -H 127.0.0.1 -p 5000 >"$DIR/moto.log" 2>&1 &
for _ in $(seq 100); do
  ip netns exec "$NS" curl -sf -o /dev/null http://127.0.0.1:5000/moto-api/ && break
  sleep 0.2
done
ip netns exec "$NS" "$PY" tests/support/aws_logs.py create-group /bench/audit
"$PY" - "$DIR/audit.log" "$RECORDS" <<'PY'
import sys, time
path, n = sys.argv[1], int(sys.argv[2])
base = int(time.time() * 1000)
with open(path, "w") as f:
    for i in range(n):
        ms = base + i // 10
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)
        f.write('{"ts":"%s","kind":"end","src":"198.51.100.10:%d","dst":"203.0.113.10:443",'
                '"upstream":"203.0.113.10:443","proto":"tls","name":"api%d.example.com",'
                '"verdict":"allow","reason":null,"would_deny":null,"policy":"default",'
                '"rule":".example.com","bytes_up":517,"bytes_down":4096,"duration_ms":12,"ech":false}\n'
                % (ts, 1024 + i % 60000, i))
PY
cat >"$DIR/ship.toml" <<TOML
file = "$DIR/audit.log"
log-group = "/bench/audit"
log-stream = "bench"
region = "us-east-1"
state = "$DIR/ship.json"
metrics-listen = "127.0.0.1:9092"
TOML
bytes=$(stat -c %s "$DIR/audit.log")
start=$(date +%s.%N)
ip netns exec "$NS" "$BIN" ship --config "$DIR/ship.toml" 2>"$DIR/ship.log" &
shipped() {
  ip netns exec "$NS" curl -s http://127.0.0.1:9092/metrics |
    awk '/^portcullis_ship_records_total\{result="shipped"\}/ {print $2}'
}
deadline=$(($(date +%s) + 300))
until [ "$(shipped)" = "$RECORDS" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "ship bench: not all shipped within 300 s" >&2; tail "$DIR/ship.log" >&2; exit 1; }
  sleep 0.1
done
end=$(date +%s.%N)
ip netns exec "$NS" "$PY" tests/support/aws_logs.py dump /bench/audit bench "$DIR/got.txt"
lost=$(sort "$DIR/audit.log" | comm -23 - <(sort -u "$DIR/got.txt") | wc -l)
awk -v n="$RECORDS" -v b="$bytes" -v s="$start" -v e="$end" -v lost="$lost" \
  'BEGIN {t = e - s; printf "ship: %d records (%.1f MiB) in %.1f s: %d records/s, %d lost\n", n, b / 1048576, t, n / t, lost}'
[ "$lost" -eq 0 ]

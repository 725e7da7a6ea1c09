#!/usr/bin/env bash
# The GWLB simulation: three gateways, each running the real portcullis,
# `portcullis gwlb` and `GWLB=1 iptables/portcullis-iptables.sh apply`,
# behind a stand-in for AWS's Gateway Load Balancer (scripts/gwlb_standin.py:
# GENEVE with the three options, 5-tuple hashing, HTTP health checks every
# second, rebalance, draining, the 8500 MTU) in the client's namespace, on
# a 9001-MTU subnet. The client makes a new allowed connection every
# 100 ms. Root; bounded to 10 minutes by its caller (scripts/test.sh).
# GWLB_SIM_KEEP=1 keeps the logs.
#
#   subnet (gw-vpc bridge, 198.51.100.0/24, MTU 9001):
#     client and stand-in .10, gateways .11 .12 .13
#   internet (gw-net bridge, 192.0.2.0/24): gateways .11 .12 .13, the web
#     server at 203.0.113.10:80
#
# It prints as its last three lines:
#   gwlb: N connections over K targets, fewest on one target M
#   gwlb failover: new connections served again after X s
#   gwlb scale-in: N of M connections failed
# and fails if a connection fails before a failure is injected, a target
# takes no flow, new connections are not served again within 15 s of a
# target's death, or the stand-in sees an answer with the wrong options or
# too large.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PORTCULLIS_VENV:-}" ]; then
  # shellcheck source=scripts/setup.sh
  source scripts/setup.sh
fi
# shellcheck source=scripts/topology.sh
source scripts/topology.sh
BIN=${PORTCULLIS_BIN:-target/release/portcullis}
PY="$PORTCULLIS_VENV/bin/python"
[ -x "$BIN" ] || { echo "gwlb-sim: build first (cargo build --release): no $BIN" >&2; exit 2; }
DIR=$(mktemp -d)
NAMESPACES="gw-net gw-vpc gw-c gw-g1 gw-g2 gw-g3"

cleanup() {
  local rc=$?
  disown -a
  # shellcheck disable=SC2086
  topology_down $NAMESPACES
  if [ "$rc" -ne 0 ]; then
    echo "gwlb-sim: failed; the last lines of each log:" >&2
    for log in "$DIR"/*.log "$DIR"/lb.json; do
      echo "--- $log" >&2
      tail -n 15 "$log" >&2 || true
    done
  fi
  if [ -n "${GWLB_SIM_KEEP:-}" ]; then echo "gwlb-sim: logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
# shellcheck disable=SC2086
topology_down $NAMESPACES

fail() {
  echo "gwlb-sim: $*" >&2
  exit 1
}
now() { date +%s.%N; }
# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 200 ms.
wait_until() {
  local bound=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + bound))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what: not within ${bound}s"
    sleep 0.2
  done
}
# lb EXPRESSION: a value of the stand-in's state (DIR/lb.json).
lb() { "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$DIR/lb.json" "$1"; }
# count LOG FROM TO [ok|fail]: attempts of a client log started in [FROM, TO].
count() {
  awk -v from="$2" -v to="$3" -v only="${4:-}" \
    '$1 >= from && $1 <= to && (only == "" || $3 == only) {n++} END {print n+0}' "$1"
}

# --- the networks
for ns in $NAMESPACES; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
for ns in gw-net gw-vpc; do
  ip -n "$ns" link add br0 type bridge
  ip -n "$ns" link set br0 mtu 9001 up
done
ip -n gw-net addr add 192.0.2.1/24 dev br0
ip -n gw-net addr add 203.0.113.10/32 dev lo
# plug NS IFNAME FABRIC ADDRESS: a 9001-MTU veth from NS onto FABRIC's bridge.
plug() {
  local ns=$1 ifname=$2 fabric=$3 address=$4 peer="${1#gw-}-$2"
  ip -n "$ns" link add "$ifname" mtu 9001 type veth peer name "$peer" mtu 9001 netns "$fabric"
  ip -n "$fabric" link set "$peer" master br0 up
  ip -n "$ns" addr add "$address" dev "$ifname"
  ip -n "$ns" link set "$ifname" up
}
plug gw-c eth0 gw-vpc 198.51.100.10/24
ip netns exec gw-net "$PY" scripts/ha_sim.py web 203.0.113.10 >"$DIR/web.log" 2>&1 &
echo allowed.example >"$DIR/allowlist.txt"

# --- the gateways: what a GWLB target runs, and nothing else
TARGETS=""
for n in 1 2 3; do
  ns=gw-g$n
  plug "$ns" eth0 gw-vpc "198.51.100.1$n/24"
  plug "$ns" eth1 gw-net "192.0.2.1$n/24"
  ip -n "$ns" route add default via 192.0.2.1
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  GWLB=1 GWLB_CIDRS=198.51.100.0/24 PRIVATE_CIDRS=198.51.100.0/24 PRIVATE_CIDRS6="" \
    MONITORING_CIDRS=198.51.100.0/24 ip netns exec "$ns" iptables/portcullis-iptables.sh apply
  ip netns exec "$ns" "$BIN" run --allowlist "$DIR/allowlist.txt" --verify-dst off \
    --drain-timeout 15s --gwlb-ready 127.0.0.1:9093 \
    >"$DIR/g$n.audit.log" 2>"$DIR/g$n.portcullis.log" &
  echo $! >"$DIR/g$n.pid"
  ip netns exec "$ns" "$BIN" gwlb --device-v4 203.0.113.249/30 --device-v6 2001:db8:6081::1/64 \
    2>"$DIR/g$n.gwlb.log" &
  TARGETS="$TARGETS${TARGETS:+,}198.51.100.1$n"
done

# --- the load balancer, and every target in service
ip netns exec gw-c "$PY" scripts/gwlb_standin.py 198.51.100.10 "$TARGETS" "$DIR" >"$DIR/standin.log" 2>&1 &
wait_until 10 "the stand-in" test -e "$DIR/lb.ready"
ip -n gw-c route add default dev lb0
all_healthy() { [ "$(lb 'all(s["healthy"].values())')" = True ]; }
wait_until 30 "every target healthy" all_healthy

# --- 1. spread: ten seconds of connections
ip netns exec gw-c "$PY" scripts/ha_sim.py client allowed.example 203.0.113.10 "$DIR/client.log" &
CLIENT=$!
started=$(now)
sleep 10
spread_end=$(now)
spread_ok=$(count "$DIR/client.log" "$started" "$spread_end" ok)
[ "$(count "$DIR/client.log" "$started" "$spread_end" fail)" -eq 0 ] || fail "a connection failed before any failure was injected"
fewest=$(lb 'min(s["new_flows"].values())')
used=$(lb 'sum(1 for n in s["new_flows"].values() if n > 0)')
[ "$fewest" -gt 0 ] || fail "a target took no flow: $(cat "$DIR/lb.json")"

# --- 2. failover: a target's instance dies
killed=$(now)
for pid in $(ip netns pids gw-g1); do kill -9 "$pid" 2>/dev/null || true; done
ip -n gw-g1 link set eth0 down
sleep 15
settled=$(now)
last_fail=$(awk -v from="$killed" '$1 >= from && $3 == "fail" {t = $1} END {printf "%.3f", t}' "$DIR/client.log")
if [ "$last_fail" = 0.000 ]; then
  failover=0.0
else
  failover=$(awk -v a="$last_fail" -v k="$killed" 'BEGIN {printf "%.1f", a + 0.1 - k}')
fi
awk -v x="$failover" 'BEGIN {exit !(x < 15)}' || fail "new connections not served again within 15 s"
[ "$(count "$DIR/client.log" "$(awk -v t="$settled" 'BEGIN {printf "%.3f", t - 3}')" "$settled" fail)" -eq 0 ] ||
  fail "connections still failing 12 s after a target died"

# --- 3. scale-in: a target deregistered and drained while downloads run
scaled=$(now)
# Twelve 6-second downloads: by hash, some go through the target leaving.
DOWNLOADS=12
for _ in $(seq "$DOWNLOADS"); do
  ip netns exec gw-c "$PY" scripts/ha_sim.py long allowed.example 203.0.113.10 "$DIR/long.log" &
done
sleep 1
echo 198.51.100.12 >"$DIR/deregister"
# The deregistration delay: connections in flight finish on it.
sleep 8
kill -TERM "$(cat "$DIR/g2.pid")"
wait_until 20 "gateway 2 drained and stopped" sh -c "! kill -0 $(cat "$DIR/g2.pid")"
for pid in $(ip netns pids gw-g2); do kill -9 "$pid" 2>/dev/null || true; done
sleep 2
scaled_end=$(now)
kill "$CLIENT" 2>/dev/null || true
[ "$(wc -l <"$DIR/long.log")" -eq "$DOWNLOADS" ] || fail "not every download ended: $(cat "$DIR/long.log")"
grep -q '"bytes_down":6[0-9]\{4\}' "$DIR/g2.audit.log" || fail "no download went through the target that left"
scale_total=$(($(count "$DIR/client.log" "$scaled" "$scaled_end") + DOWNLOADS))
scale_failed=$(($(count "$DIR/client.log" "$scaled" "$scaled_end" fail) + $(count "$DIR/long.log" 0 "$scaled_end" fail)))
[ "$(lb 's["drops"]["wrong_options"]')" -eq 0 ] || fail "a target answered with another flow's options"
[ "$(lb 's["drops"]["too_big"]')" -eq 0 ] || fail "a packet larger than GWLB carries"

echo "gwlb: $spread_ok connections over $used targets, fewest on one target $fewest"
echo "gwlb failover: new connections served again after $failover s"
echo "gwlb scale-in: $scale_failed of $scale_total connections failed"

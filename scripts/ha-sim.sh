#!/usr/bin/env bash
# The HA simulation: two "AZs" in network namespaces, each with a private
# client and a gateway running the real portcullis and the real HA agent
# (portcullis ha), against a local EC2 API (moto_server) that holds the
# VPC, route tables, instances and their interfaces; an IMDSv2 responder in
# each gateway namespace; and a test router that applies the API's route
# tables to the clients' routes every 300 ms, so a route moved through the
# API moves the traffic. Each client makes a new allowed connection every
# 100 ms. Root; bounded to 10 minutes by its caller (scripts/test.sh).
# HA_SIM_KEEP=1 keeps the logs.
#
#   VPC fabric (hs-vpc bridge, 198.51.100.0/24):
#     client a .10   client b .74   gateways a1 .140 (a2 .141)   b1 .200 (b2 .201)
#   internet (hs-net bridge, 192.0.2.0/24): gateways .11/.12/.21/.22, the EC2
#     API at 192.0.2.1:5000, the web server at 203.0.113.10:80
#
# It measures, and prints as its last three lines:
#   failover: egress restored after X s     SIGKILL of AZ a's gateway
#   rollout: N of M connections failed      both AZs' gateways replaced, as one
#                                           apply has the ASGs do it
#   split: routes moved N times             the gateways cut off from each other
# and fails if egress is not restored, the AZ's own gateway does not take
# its routes back, the rollout does not hand over, does not go one AZ at a
# time or fails a connection (the downloads in flight included), or a split
# moves a route.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MOTO_SERVER:-}" ]; then
  # shellcheck source=scripts/setup.sh
  source scripts/setup.sh
fi
# shellcheck source=scripts/topology.sh
source scripts/topology.sh
BIN=${PORTCULLIS_BIN:-target/release/portcullis}
PY="$PORTCULLIS_VENV/bin/python"
[ -x "$BIN" ] || { echo "ha-sim: build first (cargo build --release): no $BIN" >&2; exit 2; }
DIR=$(mktemp -d)
NAMESPACES="hs-net hs-vpc hs-ca hs-cb hs-a1 hs-a2 hs-b1 hs-b2"
export AWS_ENDPOINT_URL=http://192.0.2.1:5000 AWS_ACCESS_KEY_ID=sim AWS_SECRET_ACCESS_KEY=sim AWS_REGION=us-east-1

cleanup() {
  local rc=$?
  disown -a
  if [ "$rc" -ne 0 ]; then
    # Before the teardown: whether each gateway still reaches the
    # "internet" side, and its neighbours (a stale one cuts it off).
    for ns in hs-a1 hs-a2 hs-b1 hs-b2; do
      ip -n "$ns" link show eth1 >/dev/null 2>&1 || continue
      echo "--- $ns: the EC2 API $(ip netns exec "$ns" curl -s -m 1 -o /dev/null -w '%{http_code}' http://192.0.2.1:5000/moto-api/ || echo unreachable)" >&2
      ip -n "$ns" neigh >&2
    done
    ip -n hs-net link show br0 >&2 || true
  fi
  # shellcheck disable=SC2086
  topology_down $NAMESPACES
  if [ "$rc" -ne 0 ]; then
    echo "ha-sim: failed; the last lines of each log:" >&2
    for log in "$DIR"/*.log; do
      echo "--- $log" >&2
      tail -n 15 "$log" >&2
    done
  fi
  if [ -n "${HA_SIM_KEEP:-}" ]; then echo "ha-sim: logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
# shellcheck disable=SC2086
topology_down $NAMESPACES

fail() {
  echo "ha-sim: $*" >&2
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
sim() { ip netns exec hs-net "$PY" scripts/ha_sim.py "$@"; }

# --- the networks
for ns in $NAMESPACES; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
# Each bridge gets a fixed address. Left to itself a bridge takes the
# lowest of its ports' addresses, so plugging in a new gateway can change
# it; the other gateways' cached neighbour entry for 192.0.2.1 then names
# an address the bridge no longer takes as its own, and their egress is
# cut for the 30-45 s until it is probed again.
mac=1
for ns in hs-net hs-vpc; do
  ip -n "$ns" link add br0 address "02:00:00:00:00:0$mac" type bridge
  ip -n "$ns" link set br0 up
  mac=$((mac + 1))
done
ip -n hs-net addr add 192.0.2.1/24 dev br0
ip -n hs-net addr add 203.0.113.10/32 dev lo
# plug NS IFNAME FABRIC ADDRESS: a veth from NS onto FABRIC's bridge.
plug() {
  local ns=$1 ifname=$2 fabric=$3 address=$4 peer="${1#hs-}-$2"
  ip -n "$ns" link add "$ifname" type veth peer name "$peer" netns "$fabric"
  ip -n "$fabric" link set "$peer" master br0 up
  ip -n "$ns" addr add "$address" dev "$ifname"
  ip -n "$ns" link set "$ifname" up
}
plug hs-ca eth0 hs-vpc 198.51.100.10/24
plug hs-cb eth0 hs-vpc 198.51.100.74/24
for ns in hs-ca hs-cb; do ip -n "$ns" route add blackhole default; done

# --- the EC2 API and the web server, "on the internet"
ip netns exec hs-net "$MOTO_SERVER" -H 192.0.2.1 -p 5000 >"$DIR/moto.log" 2>&1 &
ip netns exec hs-net "$PY" scripts/ha_sim.py web 203.0.113.10 >"$DIR/web.log" 2>&1 &
wait_until 30 "the EC2 API" ip netns exec hs-net curl -sf -o /dev/null http://192.0.2.1:5000/moto-api/
sim seed "$DIR/vpc.json"
table() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]])' "$DIR/vpc.json" "$@"; }
TABLE_A=$(table tables us-east-1a)
TABLE_B=$(table tables us-east-1b)
pool() { "$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["eips"][sys.argv[2]]))' "$DIR/vpc.json" "$1"; }
POOL_A=$(pool us-east-1a)
POOL_B=$(pool us-east-1b)
echo allowed.example >"$DIR/allowlist.txt"

# --- gateways
# gateway NAME VPC-ADDRESS NET-ADDRESS SUBNET AZ RELEASE: launches the
# instance in the API, tagged with its release as the module's launch
# template does, and builds its namespace.
gateway() {
  local name=$1 vpc=$2 net=$3 subnet=$4 az=$5 release=$6 ns="hs-$1" id eni
  read -r id eni < <(sim launch "$(table subnets "$subnet")" "$vpc" "$az" "$release")
  echo "$id" >"$DIR/$name.id"
  echo "$eni" >"$DIR/$name.eni"
  plug "$ns" eth0 hs-vpc "$vpc/24"
  plug "$ns" eth1 hs-net "$net/24"
  ip -n "$ns" route add default via 192.0.2.1
  ip -n "$ns" addr add 169.254.169.254/32 dev lo
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  # As the AMI sets it: a hand-off forwards out the interface a packet came
  # in on, and must not tell the client to go to the sibling itself.
  ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0
  PRIVATE_CIDRS=198.51.100.0/24 PRIVATE_CIDRS6="" MONITORING_CIDRS=198.51.100.0/24 \
    ip netns exec "$ns" iptables/portcullis-iptables.sh apply
  printf '{"instance-id": "%s", "placement/region": "us-east-1", "placement/availability-zone": "%s", "autoscaling/target-lifecycle-state": "InService"}\n' \
    "$id" "$az" >"$DIR/$name.imds.json"
}
# start NAME: the instance's processes (IMDS, portcullis, the agent).
start() {
  local name=$1 ns="hs-$1" pid
  ip netns exec "$ns" "$PY" scripts/ha_sim.py imds "$DIR/$name.imds.json" >>"$DIR/$name.imds.log" 2>&1 &
  ip netns exec "$ns" "$BIN" run --allowlist "$DIR/allowlist.txt" --verify-dst off --drain-timeout 15s \
    >>"$DIR/$name.audit.log" 2>>"$DIR/$name.portcullis.log" &
  pid=$!
  echo "$pid" >"$DIR/$name.portcullis.pid"
  cat >"$DIR/$name.ha.toml" <<EOF
fleet = "sim"
internet-check = "203.0.113.10:80"
metrics-listen = "127.0.0.1:9091"
drain-command = ["kill", "-TERM", "$pid"]
handoff-command = ["$PWD/ami/scripts/handoff.sh"]
rollout-soak = "${SOAK}s"
[route-tables]
"us-east-1a" = ["$TABLE_A"]
"us-east-1b" = ["$TABLE_B"]
[eips]
"us-east-1a" = $POOL_A
"us-east-1b" = $POOL_B
EOF
  RUST_LOG=info ip netns exec "$ns" "$BIN" ha --config "$DIR/$name.ha.toml" >>"$DIR/$name.ha.log" 2>&1 &
}
# kill_all NAME: the instance dies, all of it at once.
kill_all() {
  local pid
  # Killed on purpose: no "Killed" job notices after the last lines.
  disown -a
  for pid in $(ip netns pids "hs-$1"); do kill -9 "$pid" 2>/dev/null || true; done
}
# holds NAME AZ: the instance's interface holds an address of AZ's pool.
holds() {
  local held
  held=$(sim addresses "$DIR/vpc.json")
  grep -q "^$2 eipalloc-[0-9a-f]* $(cat "$DIR/$1.eni")\$" <<<"$held"
}
route_is() { [ "$(sim route "$1")" = "$(cat "$DIR/$2.eni")" ]; }
state_is() {
  local tags
  tags=$(sim tags "$(cat "$DIR/$1.id")")
  grep -q "^portcullis:state $2@" <<<"$tags"
}

# How long AZ a must have been served by a new release before AZ b's new
# gateway says it is ready (60 s in production).
SOAK=5
gateway a1 198.51.100.140 192.0.2.11 public-a us-east-1a r1
gateway b1 198.51.100.200 192.0.2.21 public-b us-east-1b r1
start a1
start b1
ip netns exec hs-net "$PY" scripts/ha_sim.py router "$DIR/vpc.json" "$DIR/router.log" &
wait_until 60 "AZ a's route on its gateway" route_is "$TABLE_A" a1
wait_until 60 "AZ b's route on its gateway" route_is "$TABLE_B" b1
holds a1 us-east-1a || fail "a1 holds no address of AZ a's pool"
holds b1 us-east-1b || fail "b1 holds no address of AZ b's pool"
ip netns exec hs-ca "$PY" scripts/ha_sim.py client allowed.example 203.0.113.10 "$DIR/ca.log" &
ip netns exec hs-cb "$PY" scripts/ha_sim.py client allowed.example 203.0.113.10 "$DIR/cb.log" &
sleep 3
# count LOG FROM TO [fail]: attempts started in [FROM, TO] (that failed).
count() {
  awk -v from="$2" -v to="$3" -v only="${4:-}" \
    '$1 >= from && $1 <= to && (only == "" || $3 == only) {n++} END {print n+0}' "$1"
}
t=$(now)
[ "$(count "$DIR/ca.log" 0 "$t")" -gt 0 ] || fail "client a made no connection"
[ "$(count "$DIR/ca.log" 0 "$t" fail)" -eq 0 ] || fail "client a failed before any failure was injected"

# --- 1. SIGKILL AZ a's gateway
killed=$(now)
kill_all a1
served_again() { awk -v t="$killed" '$1 > t && $3 == "ok" {found=1} END {exit !found}' "$DIR/ca.log"; }
wait_until 60 "AZ a served again after its gateway died" served_again
restored=$(awk -v t="$killed" '$1 > t && $3 == "ok" {print $2 - t; exit}' "$DIR/ca.log")
# The instance comes back (a reboot): it takes AZ a back once settled.
start a1
wait_until 90 "AZ a's own gateway taking its route back" route_is "$TABLE_A" a1

# --- 2. a rollout: one apply has both AZs' groups launch a new gateway
# (release r2) beside the old, at once
rolled=$(now)
gateway a2 198.51.100.141 192.0.2.12 public-a us-east-1a r2
gateway b2 198.51.100.201 192.0.2.22 public-b us-east-1b r2
start a2
start b2
wait_until 60 "AZ a's new gateway ready" state_is a2 ready
# Each took its AZ's spare address; the old ones keep theirs while they drain.
holds a2 us-east-1a || fail "a2 is ready without an address of AZ a's pool"
holds a1 us-east-1a || fail "a1 lost its address to the new gateway"
sleep 2
! state_is b2 ready || fail "AZ b's new gateway said ready before AZ a had rolled"
# retire NAME TABLE NEW: the group takes the old gateway out (its lifecycle
# hook's wait begins) while a download runs through it; the new one takes
# the route (at $handed), the old one drains and is terminated.
retire() {
  local old=$1 table=$2 new=$3 client=hs-c${1:0:1}
  ip netns exec "$client" "$PY" scripts/ha_sim.py long allowed.example 203.0.113.10 "$DIR/$client-long.log" &
  sleep 0.5
  sed -i 's/"InService"/"Terminated"/' "$DIR/$old.imds.json"
  wait_until 60 "the route of $old's AZ handed to $new" route_is "$table" "$new"
  handed=$(now)
  exited() { ! kill -0 "$(cat "$DIR/$old.portcullis.pid")" 2>/dev/null; }
  wait_until 60 "$old drained" exited
  sim terminate "$(cat "$DIR/$old.id")"
  kill_all "$old"
}
retire a1 "$TABLE_A" a2
a_rolled=$handed
wait_until 60 "AZ b's new gateway ready" state_is b2 ready
b2_ready=$(sim tags "$(cat "$DIR/b2.id")" | sed -n 's/^portcullis:state ready@//p')
# Seen a moment after it happened: a second of slack on the soak.
awk -v r="$b2_ready" -v a="$a_rolled" -v soak="$SOAK" 'BEGIN {exit !(r / 1000 >= a + soak - 1)}' ||
  fail "AZ b's new gateway said ready $(awk -v r="$b2_ready" -v a="$a_rolled" 'BEGIN {print r / 1000 - a}') s after AZ a rolled, before the ${SOAK} s soak"
holds b2 us-east-1b || fail "b2 is ready without an address of AZ b's pool"
holds b1 us-east-1b || fail "b1 lost its address to the new gateway"
retire b1 "$TABLE_B" b2
sleep 2
rolled_end=$(now)
roll_total=0
roll_failed=0
for client in ca cb; do
  [ -s "$DIR/hs-$client-long.log" ] || fail "the download through $client's old gateway did not finish"
  grep -q ' ok ' "$DIR/hs-$client-long.log" ||
    echo "ha-sim: the download in flight at $client's handover was cut: $(cat "$DIR/hs-$client-long.log")" >&2
  roll_total=$((roll_total + $(count "$DIR/$client.log" "$rolled" "$rolled_end") + 1))
  roll_failed=$((roll_failed + $(count "$DIR/$client.log" "$rolled" "$rolled_end" fail) + $(count "$DIR/hs-$client-long.log" 0 "$rolled_end" fail)))
done
if [ "$roll_failed" -gt 0 ]; then
  # What the router applied, and when the failed attempts started, beside
  # the rollout's own moments, for the log tails printed on exit.
  echo "ha-sim: rollout from $rolled to $rolled_end (AZ a done at $a_rolled); $roll_failed failed, first and last:" >&2
  cat "$DIR/ca.log" "$DIR/cb.log" | awk '$3 == "fail"' | sort -n | sed -n '1p;$p' >&2
  cat "$DIR/router.log" >&2
  fail "rollout: $roll_failed of $roll_total connections failed"
fi

# --- 3. the two serving gateways cut off from each other, both healthy
split=$(now)
ip netns exec hs-a2 iptables -I INPUT 1 -s 198.51.100.201 -j DROP
ip netns exec hs-b2 iptables -I INPUT 1 -s 198.51.100.141 -j DROP
# Long enough for two rounds of challenges (the second after a 30 s backoff).
sleep 50
ip netns exec hs-a2 iptables -D INPUT -s 198.51.100.201 -j DROP
ip netns exec hs-b2 iptables -D INPUT -s 198.51.100.141 -j DROP
sleep 5
split_end=$(now)
moves=$(awk -v from="$split" -v to="$split_end" '$1 >= from && $1 <= to && $2 ~ /^rtb-/ {n++} END {print n+0}' "$DIR/router.log")
challenges=$(cat "$DIR"/a2.ha.log "$DIR"/b2.ha.log | grep -c 'challenged it' || true)
[ "$challenges" -gt 0 ] || fail "the split was not noticed: no challenge"
route_is "$TABLE_A" a2 || fail "AZ a's route left its gateway"
route_is "$TABLE_B" b2 || fail "AZ b's route left its gateway"

holds a2 us-east-1a || fail "a2 lost its address"
holds b2 us-east-1b || fail "b2 lost its address"
echo "ha-sim: egress addresses (AZ, allocation, interface):"
sim addresses "$DIR/vpc.json" | sed 's/^/  /'
echo "ha-sim: $(cat "$DIR"/*.ha.log | grep -c 'route moved') route moves in all, $challenges challenges during the split"
printf 'failover: egress restored after %.1f s\n' "$restored"
echo "rollout: $roll_failed of $roll_total connections failed"
echo "split: routes moved $moves times"
[ "$moves" -eq 0 ] || exit 1

#!/usr/bin/env bash
# Macro-benchmark: the same traffic through each gateway, side by side in
# one run, in network namespaces of our own (root):
#
#   client 192.0.2.2 --- gateway 192.0.2.1 | 198.51.100.1 --- upstream 198.51.100.2
#                                                     203.0.113.10 answers 1 KiB,
#                                                     .11 sinks, .12 sources,
#                                                     .13 serves HTTP (port 80)
#
#   (a) kernel    plain routing, no proxy: the limit of this machine
#       relay     a bare splice relay (loadgen relay): no parsing, no policy,
#                 no log; what a proxy that only moves the bytes reaches.
#                 Stream workloads only: a thread per connection says
#                 nothing about connection rates
#   (b) portcullis with its defaults: --verify-dst pin, so every admitted
#                 name is resolved (a real DNS server, dnsmasq, answers the
#                 gateway from the upstream host; after the first connection
#                 each name is a cache hit)
#       portcullis_off  the same with --verify-dst off. What pinning costs
#                 is measured apart too, in pairs run back to back (pin
#                 first in odd pairs, off first in even ones, so that going
#                 first or second favours neither), each pair's ratio from
#                 moments seconds apart, and the median of those reported
#   (c) nginx     stream + ssl_preread, a map of allowed names
#   (d) haproxy   req.ssl_sni, a backend per allowed name
#   (e) squid     intercept, ssl_bump peek then splice by ssl::server_name
#                 (the Squid-in-an-autoscaling-group design portcullis replaces)
#
# The rounds' medians judge narrow margins poorly (a round's numbers move by
# 10% on a shared machine), so the closest comparisons are also measured
# head to head: in DUELS sets run back to back, each in a rotated order,
# portcullis's connection rate against nginx's and HAProxy's, and its eight
# streams against the relay's; each set gives one ratio from moments
# seconds apart, and the report gives their median.
#
# Every proxy gets the same redirect (iptables/portcullis-iptables.sh) and
# the same allowlist; the client sends a real ClientHello before any data.
# Every proxy also writes one log line per connection, as a gateway kept
# for an audit must: portcullis its JSON audit line, nginx an access_log
# with the SNI (buffered), HAProxy its tcplog on stdout, Squid its
# access.log; all of them to /dev/null.
#
#   benches/netns/run.sh           full run, about 15 minutes once built
#   benches/netns/run.sh --short   a second per workload: checks every gateway carries traffic
#   benches/netns/profile.sh ...   where portcullis's time and memory go (its header says how)
#
#   GATEWAYS="portcullis portcullis_base" PORTCULLIS_BASELINE=BINARY PAIRS=0 \
#     BENCH_RESULTS=DIR benches/netns/run.sh
#                                  this build against another (an older
#                                  commit's), side by side, with the same
#                                  defaults, results in DIR
#
# Results: benches/results/latest.md (table), latest.svg (chart) and
# latest.txt (raw numbers);
# a short run writes them under target/bench-short/ instead.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../.."
repo=$PWD
SECONDS_PER=${SECONDS_PER:-3}
ROUNDS=${ROUNDS:-3}
PAIRS=${PAIRS:-10}
DUELS=${DUELS:-5}
IDLE=2000
RESULTS=${BENCH_RESULTS:-$repo/benches/results}
# The short run only proves that every gateway carries traffic: its
# numbers are not worth publishing, so they stay under target/.
if [ "${1:-}" = --short ]; then SECONDS_PER=1 ROUNDS=1 PAIRS=1 DUELS=1 IDLE=200 RESULTS=$repo/target/bench-short; fi
# The whole run is bounded: nothing here may run away.
if [ -z "${PORTCULLIS_BENCH_BOUNDED:-}" ]; then
  PORTCULLIS_BENCH_BOUNDED=1 exec timeout --kill-after=10 1800 bash "$self" "$@"
fi

# shellcheck source=scripts/setup.sh
source scripts/setup.sh
# shellcheck source=benches/netns/peers.sh
source benches/netns/peers.sh
install_peers nginx libnginx-mod-stream haproxy squid-openssl dnsmasq-base

cargo build --locked --release --quiet
loadgen=$(cargo bench --locked --bench loadgen --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
portcullis=$repo/target/release/portcullis

C=pcbench-client G=pcbench-gateway U=pcbench-upstream
# shellcheck source=scripts/topology.sh
source scripts/topology.sh
topology_down $C $G $U # left by a run that was killed
work=$(mktemp -d)
trap 'topology_down $C $G $U; rm -rf "$work"' EXIT
topology_up $C $G $U 203.0.113.10 203.0.113.11 203.0.113.12 203.0.113.13
topology_many_connections $C $G $U

ip netns exec $U "$loadgen" serve 203.0.113.10:443 203.0.113.11:443 203.0.113.12:443 203.0.113.13:80 &
disown # killed with the namespace, not reported

ANSWER=answer.bench.example SINK=sink.bench.example SOURCE=source.bench.example WEB=web.bench.example
printf '.bench.example\n' >"$work/allowlist.txt"

# The gateway's DNS: a real server on the upstream host that knows each
# name's server, as the VPC resolver would. portcullis sees only it: it runs
# in a mount namespace whose /etc/resolv.conf names this server alone.
gateway_dns $U "$work" "$ANSWER,203.0.113.10" "$SINK,203.0.113.11" "$SOURCE,203.0.113.12" "$WEB,203.0.113.13"

# Gateway CPU seconds so far, over every process in the gateway namespace;
# `gateway_cpu user` only the part in user space: the proxies' own code.
# The rest (the kernel's TCP, conntrack and NAT) is much the same for each.
gateway_cpu() {
  local user_only=0 total=0 pid ticks
  [ "${1:-}" = user ] && user_only=1
  for pid in $(ip netns pids $G); do
    ticks=$(awk -v u=$user_only '{print u ? $14 : $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + ticks))
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}
# Packets received and sent on the gateway's two links so far.
gateway_packets() {
  ip netns exec $G cat /proc/net/dev | awk 'NR > 2 && $1 != "lo:" { n += $3 + $11 } END { print n }'
}
# Gateway resident memory in KiB, all its processes.
gateway_rss() {
  local total=0 pid kib
  for pid in $(ip netns pids $G); do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
client() {
  if ! ip netns exec $C "$loadgen" "$@"; then
    echo "bench: the $gw workload '$*' failed; gateway logs:" >&2
    tail -n 20 "$work"/*.log >&2 || true
    exit 1
  fi
}

start_kernel() { ip netns exec $G "$repo/iptables/portcullis-iptables.sh" remove; }

redirect() {
  ip netns exec $G env PRIVATE_CIDRS=192.0.2.0/24 PRIVATE_CIDRS6= "$repo/iptables/portcullis-iptables.sh" apply
}

start_relay() {
  redirect
  ip netns exec $G "$loadgen" relay 0.0.0.0:15443 2>"$work/relay.log" &
  disown # killed with the namespace, not reported
}

# run_portcullis ARGS...: portcullis with the benchmark's DNS and ARGS.
run_portcullis() {
  redirect
  # The audit log is stdout.
  # One load generator stands in for a VPC of hosts: it holds more
  # connections than one host's share (builds that have one).
  local share=()
  if "$portcullis" run --help | grep -q -- --max-connections-per-source; then
    share=(--max-connections-per-source 10000)
  fi
  with_own_dns $G "$work" "$portcullis" run --allowlist "$work/allowlist.txt" --metrics-listen 127.0.0.1:9090 \
    --tls-listen 0.0.0.0:15443 --http-listen 0.0.0.0:15080 "${share[@]}" "$@" \
    >/dev/null 2>"$work/portcullis.log" &
  disown # killed with the namespace, not reported
}
start_portcullis() { run_portcullis; }
start_portcullis_off() { run_portcullis --verify-dst off; }
# Another build of portcullis (PORTCULLIS_BASELINE), with the same defaults.
start_portcullis_base() {
  local portcullis=${PORTCULLIS_BASELINE:?PORTCULLIS_BASELINE names the baseline build}
  run_portcullis
}

start_nginx() {
  redirect
  write_nginx_conf "$work" $ANSWER $SINK $SOURCE
  ip netns exec $G nginx -c "$work/nginx.conf" -e "$work/nginx.log" &
  disown # killed with the namespace, not reported
}

start_haproxy() {
  redirect
  cat >"$work/haproxy.cfg" <<EOF
global
  # Two descriptors a connection: within the descriptor limit.
  maxconn 8000
  log stdout format raw local0
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 10s
  timeout client 15m
  timeout server 15m
frontend tls
  bind :15443
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
  tcp-request content reject
  use_backend answer if { req.ssl_sni -i $ANSWER }
  use_backend sink if { req.ssl_sni -i $SINK }
  use_backend source if { req.ssl_sni -i $SOURCE }
backend answer
  server s 203.0.113.10:443
backend sink
  server s 203.0.113.11:443
backend source
  server s 203.0.113.12:443
EOF
  # Its log is stdout.
  ip netns exec $G haproxy -W -db -f "$work/haproxy.cfg" >/dev/null &
  disown # killed with the namespace, not reported
}

start_squid() {
  redirect
  # ssl-bump wants a certificate even when it only peeks and splices.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench \
    -keyout "$work/squid.pem" -out "$work/squid.pem" 2>/dev/null
  chmod 0755 "$work"
  chmod 0644 "$work/squid.pem"
  install -o proxy -m 0644 /dev/null "$work/squid.log"
  # Squid checks the SNI against the dialled address by name lookup; these
  # stand in for the DNS a real deployment has.
  printf '203.0.113.10 %s\n203.0.113.11 %s\n203.0.113.12 %s\n' $ANSWER $SINK $SOURCE >"$work/squid-hosts"
  cat >"$work/squid.conf" <<EOF
http_port 127.0.0.1:3128
https_port 15443 intercept ssl-bump tls-cert=$work/squid.pem generate-host-certificates=off
acl step1 at_step SslBump1
acl allowed ssl::server_name .bench.example
ssl_bump peek step1
ssl_bump splice allowed
ssl_bump terminate all
http_access allow all
cache deny all
cache_mem 8 MB
access_log stdio:/dev/null
cache_log $work/squid.log
debug_options ALL,1
pid_filename none
coredump_dir none
dns_nameservers 127.0.0.1
hosts_file $work/squid-hosts
max_filedescriptors 16384
shutdown_lifetime 0 seconds
EOF
  ip netns exec $G squid -N -f "$work/squid.conf" &
  disown # killed with the namespace, not reported
}

wait_ready() {
  local gw=$1
  [ "$gw" = kernel ] && return 0
  for _ in $(seq 100); do
    ip netns exec $G ss -Hltn 'sport = :15443' | grep -q LISTEN && return 0
    sleep 0.1
  done
  echo "bench: $gw did not start; gateway logs:" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}

stop_gateway() {
  for pid in $(ip netns pids $G); do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in $(ip netns pids $G); do kill -9 "$pid" 2>/dev/null || true; done
  # Until every process is gone and the port is free, so that the next
  # gateway can bind it (a killed proxy's helpers can outlive it briefly).
  for _ in $(seq 50); do
    if [ -z "$(ip netns pids $G)" ] && ! ip netns exec $G ss -Hltn 'sport = :15443' | grep -q LISTEN; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench: the gateway's processes did not exit" >&2
  exit 1
}

# Room for every gateway's connections: as many descriptors as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

raw=$RESULTS/latest.txt
mkdir -p "$RESULTS"
: >"$raw"
: >"$RESULTS/pinning.txt"
: >"$RESULTS/duels.txt"
# The busy fraction of the whole machine since the last call (from
# /proc/stat): on a box this small the clients and servers share the CPUs
# with the gateway, so this says whether a workload was CPU-bound.
busy_since() {
  local cpu b0 t0
  read -r -a cpu </proc/stat
  local busy=$((cpu[1] + cpu[2] + cpu[3] + cpu[6] + cpu[7] + cpu[8]))
  local total=$((busy + cpu[4] + cpu[5]))
  if [ -n "${1:-}" ]; then
    read -r b0 t0 <<<"$1"
    awk -v b=$((busy - b0)) -v t=$((total - t0)) 'BEGIN { printf "%.0f", (t > 0 ? 100 * b / t : 0) }'
  else
    echo "$busy $total"
  fi
}

read -r -a gateways <<<"${GATEWAYS:-kernel relay portcullis portcullis_off nginx haproxy squid}"
# Rounds interleave the gateways (kernel, portcullis, nginx, …, then again),
# so a noisy moment on a shared machine hits one round, not one gateway;
# the report takes each number's median over the rounds.
for round in $(seq "$ROUNDS"); do
  for gw in "${gateways[@]}"; do
    echo "== $gw (round $round of $ROUNDS)"
    "start_$gw"
    wait_ready "$gw"
    cpu0=$(gateway_cpu)
    box0=$(busy_since)
    down1=$(client bulk down 203.0.113.12:443 1 "$SECONDS_PER" $SOURCE)
    busy1=$(busy_since "$box0")
    up1=$(client bulk up 203.0.113.11:443 1 "$SECONDS_PER" $SINK)
    down8=$(client bulk down 203.0.113.12:443 8 "$SECONDS_PER" $SOURCE)
    cpu1=$(gateway_cpu)
    bytes=$(($(field bytes "$down1") + $(field bytes "$up1") + $(field bytes "$down8")))
    line="gateway=$gw down1=$(field mib_per_s "$down1") up1=$(field mib_per_s "$up1") down8=$(field mib_per_s "$down8")"
    line+=" cpu_s_per_gib=$(awk -v c="$cpu1" -v c0="$cpu0" -v b="$bytes" 'BEGIN { printf "%.3f", (c - c0) / (b / 2^30) }')"
    line+=" busy_pct_down1=$busy1"
    if [ "$bytes" -le 0 ]; then
      echo "bench: $gw carried no traffic" >&2
      exit 1
    fi
    if [ "$gw" != relay ]; then
      user1=$(gateway_cpu user)
      packets1=$(gateway_packets)
      rate=$(client rate 203.0.113.10:443 64 "$SECONDS_PER" $ANSWER)
      cpu2=$(gateway_cpu)
      user2=$(gateway_cpu user)
      packets2=$(gateway_packets)
      # Latency is measured apart, one client at a time: at 64 clients a
      # saturated gateway's time to first byte is only its rate restated
      # (64 / rate), not the delay it adds to a connection.
      # A second is thousands of connections: enough for a p99.
      lat=$(client rate 203.0.113.10:443 1 1 $ANSWER)
      rss0=$(gateway_rss)
      client idle 203.0.113.11:443 "$IDLE" 2 $SINK >"$work/idle.out" &
      idle_pid=$!
      for _ in $(seq 100); do grep -q held= "$work/idle.out" && break; sleep 0.1; done
      sleep 1
      rss1=$(gateway_rss)
      wait "$idle_pid"
      conns=$(field connections "$rate")
      if [ "$conns" -le 0 ] || [ "$(field held "$(cat "$work/idle.out")")" != "$IDLE" ]; then
        echo "bench: $gw carried no traffic ($conns connections)" >&2
        exit 1
      fi
      line+=" conn_per_s=$(field conn_per_s "$rate") ttfb_p50_ms=$(field ttfb_p50_ms "$lat") ttfb_p99_ms=$(field ttfb_p99_ms "$lat")"
      line+=" cpu_s_per_10k_conn=$(awk -v c="$cpu2" -v c1="$cpu1" -v n="$conns" 'BEGIN { printf "%.3f", (c - c1) / (n / 10000) }')"
      line+=" user_cpu_s_per_10k_conn=$(awk -v c="$user2" -v c1="$user1" -v n="$conns" 'BEGIN { printf "%.3f", (c - c1) / (n / 10000) }')"
      line+=" packets_per_conn=$(awk -v p="$packets2" -v p1="$packets1" -v n="$conns" 'BEGIN { printf "%.1f", (p - p1) / n }')"
      line+=" kib_per_idle_conn=$(awk -v a="$rss1" -v b="$rss0" -v n="$IDLE" 'BEGIN { printf "%.1f", (a - b) / n }')"
      # portcullis only (the peers here proxy TLS alone): an idle
      # kept-alive HTTP connection after a 256 KiB answer.
      if [[ $gw == portcullis* ]]; then
        rss0=$(gateway_rss)
        client idle-http 203.0.113.13:80 "$IDLE" 2 $WEB >"$work/idle-http.out" &
        idle_pid=$!
        for _ in $(seq 300); do grep -q held= "$work/idle-http.out" && break; sleep 0.1; done
        sleep 1
        rss1=$(gateway_rss)
        wait "$idle_pid"
        if [ "$(field held "$(cat "$work/idle-http.out")")" != "$IDLE" ]; then
          echo "bench: $gw did not hold $IDLE kept-alive HTTP connections" >&2
          exit 1
        fi
        line+=" kib_per_idle_http_conn=$(awk -v a="$rss1" -v b="$rss0" -v n="$IDLE" 'BEGIN { printf "%.1f", (a - b) / n }')"
      fi
    fi
    echo "$line" | tee -a "$raw"
    stop_gateway
  done
done

# What pinning costs, paired: each pair runs the connection-rate and
# latency workloads through portcullis with --verify-dst pin and off,
# seconds apart, so the machine's drift between them is small; the order
# alternates (pin off, off pin, …).
if [[ " ${gateways[*]} " == *" portcullis "* ]]; then
  for pair in $(seq "$PAIRS"); do
    line="pair=$pair"
    order="pin off"
    [ $((pair % 2)) -eq 0 ] && order="off pin"
    for mode in $order; do
      echo "== pinning pair $pair of $PAIRS: --verify-dst $mode"
      gw=portcullis
      run_portcullis --verify-dst "$mode"
      wait_ready portcullis
      rate=$(client rate 203.0.113.10:443 64 "$SECONDS_PER" $ANSWER)
      lat=$(client rate 203.0.113.10:443 1 "$SECONDS_PER" $ANSWER)
      line+=" ${mode}_conn_per_s=$(field conn_per_s "$rate") ${mode}_ttfb_p50_ms=$(field ttfb_p50_ms "$lat") ${mode}_ttfb_p99_ms=$(field ttfb_p99_ms "$lat")"
      stop_gateway
    done
    echo "$line" | tee -a "$RESULTS/pinning.txt"
  done
fi

# Head to head (see the header): portcullis and each rival present in
# turn, the order rotated by one each set, so that going first favours
# none of them.
rivals=()
for gw in relay nginx haproxy; do
  [[ " ${gateways[*]} " == *" $gw "* ]] && rivals+=("$gw")
done
if [[ " ${gateways[*]} " == *" portcullis "* ]] && [ ${#rivals[@]} -gt 0 ]; then
  for set in $(seq "$DUELS"); do
    line="set=$set"
    order=(portcullis "${rivals[@]}")
    shift_by=$(((set - 1) % ${#order[@]}))
    order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
    for gw in "${order[@]}"; do
      echo "== head to head, set $set of $DUELS: $gw"
      "start_$gw"
      wait_ready "$gw"
      if [ "$gw" != relay ]; then
        rate=$(client rate 203.0.113.10:443 64 "$SECONDS_PER" $ANSWER)
        line+=" ${gw}_conn_per_s=$(field conn_per_s "$rate")"
      fi
      if [ "$gw" = relay ] || [ "$gw" = portcullis ]; then
        down8=$(client bulk down 203.0.113.12:443 8 "$SECONDS_PER" $SOURCE)
        line+=" ${gw}_down8=$(field mib_per_s "$down8")"
      fi
      stop_gateway
    done
    echo "$line" | tee -a "$RESULTS/duels.txt"
  done
fi

python3 "$repo/benches/netns/report.py" "$raw" "$(uname -r)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) x $(nproc)" "$RESULTS/latest.svg" \
  "$RESULTS/pinning.txt" "$RESULTS/duels.txt" >"$RESULTS/latest.md"
cat "$RESULTS/latest.md"

#!/usr/bin/env bash
# Where the time and the memory go, in the macro-benchmark's namespaces
# (the same client / gateway / upstream and load generator as run.sh):
#
#   benches/netns/profile.sh memory [COUNT]   heap per idle TLS connection
#       The gateway built with --features dhat-heap holds COUNT and then
#       2 x COUNT idle TLS connections (default 2000); the heap's peak
#       differs by COUNT connections' worth, reported per connection with
#       the largest allocation sites. RSS per connection of the normal
#       build, as run.sh measures it, beside it.
#   benches/netns/profile.sh stream [SECONDS]  one stream, portcullis and the relay
#       One stream each way through each (default 5 s), three rounds that
#       alternate them: MiB/s and the gateway process's CPU seconds per
#       GiB (user and system); then once under `strace -c`: system calls
#       per MiB moved.
#   benches/netns/profile.sh rate [SECONDS]   short connections
#       The connection-rate workload (64 clients) through portcullis and
#       through nginx, the same way: CPU per connection; under `strace -c`:
#       system calls per connection; under `perf record`: the share of the
#       CPU in the kernel and in the proxy, and its own functions that take
#       more than 0.5%.
#
# Instruction counts need a hardware PMU; the virtual machines this ran on
# have none (`perf stat -e instructions` is not supported there), so time
# is measured as CPU ticks and software-clock samples, and work as system
# calls.
#
# PORTCULLIS=BINARY profiles another build (memory: a dhat build).
# Root; everything runs in namespaces of its own, removed on exit.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../.."
repo=$PWD
mode=${1:?usage: profile.sh memory|stream|rate [N]}
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
install_missing strace linux-perf dnsmasq-base
# shellcheck source=benches/netns/peers.sh
source benches/netns/peers.sh
[ "$mode" != rate ] || install_peers nginx libnginx-mod-stream

case $mode in
  memory)
    COUNT=${2:-2000}
    if [ -z "${PORTCULLIS:-}" ]; then
      cargo build --locked --release --quiet --features dhat-heap
      cp target/release/portcullis target/portcullis-dhat
      PORTCULLIS=$repo/target/portcullis-dhat
      cargo build --locked --release --quiet
    fi
    ;;
  stream | rate) SECONDS_PER=${2:-5} ;;
  *)
    echo "usage: profile.sh memory|stream|rate [N]" >&2
    exit 2
    ;;
esac
cargo build --locked --release --quiet
loadgen=$(cargo bench --locked --bench loadgen --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
portcullis=${PORTCULLIS:-$repo/target/release/portcullis}

C=pcprof-client G=pcprof-gateway U=pcprof-upstream
# shellcheck source=scripts/topology.sh
source scripts/topology.sh
topology_down $C $G $U
work=$(mktemp -d)
trap 'topology_down $C $G $U; rm -rf "$work"' EXIT
topology_up $C $G $U 203.0.113.10 203.0.113.11 203.0.113.12
topology_many_connections $C $G $U
ip netns exec $U "$loadgen" serve 203.0.113.10:443 203.0.113.11:443 203.0.113.12:443 &
disown # killed with the namespace
ANSWER=answer.bench.example SINK=sink.bench.example SOURCE=source.bench.example
printf '.bench.example\n' >"$work/allowlist.txt"
gateway_dns $U "$work" "$ANSWER,203.0.113.10" "$SINK,203.0.113.11" "$SOURCE,203.0.113.12"
ip netns exec $G env PRIVATE_CIDRS=192.0.2.0/24 PRIVATE_CIDRS6= "$repo/iptables/portcullis-iptables.sh" apply
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# start BINARY [run|relay|nginx]: the gateway, in $work (where dhat
# writes); its pid (one of nginx's).
start() {
  local bin=$1
  if [ "${2:-run}" = nginx ]; then
    write_nginx_conf "$work" $ANSWER $SINK $SOURCE
    ip netns exec $G nginx -c "$work/nginx.conf" -e "$work/nginx.log" &
  elif [ "${2:-run}" = relay ]; then
    # Not on this function's stdout, which the caller reads to its end.
    ip netns exec $G "$loadgen" relay 0.0.0.0:15443 >/dev/null 2>"$work/gateway.log" &
  else
    # One load generator holds more than one host's share (in the builds
    # that have a share).
    local share=()
    if (cd "$work" && "$bin" run --help 2>/dev/null) | grep -q -- --max-connections-per-source; then
      share=(--max-connections-per-source 10000)
    fi
    (cd "$work" && with_own_dns $G "$work" "$bin" run --allowlist "$work/allowlist.txt" \
      --metrics-listen 127.0.0.1:9090 --tls-listen 0.0.0.0:15443 --http-listen 0.0.0.0:15080 \
      "${share[@]}" 2>"$work/gateway.log") >/dev/null &
  fi
  for _ in $(seq 100); do
    ip netns exec $G ss -Hltnp 'sport = :15443' | grep -q LISTEN && break
    sleep 0.1
  done
  ip netns exec $G ss -Hltnp 'sport = :15443' | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}
# stop: SIGTERM to every process of the gateway, and wait until they have
# exited (dhat writes on exit).
stop() {
  local pid
  for pid in $(ip netns pids $G); do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 300); do
    [ -n "$(ip netns pids $G)" ] || return 0
    sleep 0.1
  done
  for pid in $(ip netns pids $G); do kill -9 "$pid" 2>/dev/null || true; done
}
# The gateway's processes: portcullis's one, or nginx's master and workers.
gateway_pids() { ip netns pids $G | tr '\n' ' '; }
client() { ip netns exec $C "$loadgen" "$@"; }
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# cpu_ticks PID...: the processes' user and system clock ticks so far.
cpu_ticks() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/stat"; done | awk '{ u += $14; s += $15 } END { print u, s }'
}
# per_gib TICKS0 TICKS1 BYTES: CPU seconds per GiB, user and system.
per_gib() {
  awk -v a="$1" -v b="$2" -v n="$3" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { split(a, x, " "); split(b, y, " "); g = n / 2^30; printf "%.3f user + %.3f system", (y[1] - x[1]) / hz / g, (y[2] - x[2]) / hz / g }'
}
# per N FILE: strace -c's table (% time, seconds, usecs/call, calls,
# [errors], syscall), each call's count (and failures) divided by N.
per() {
  awk -v n="$1" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $4 / n >= 0.005 {
    errors = NF == 6 ? sprintf(" (%.2f failed)", $5 / n) : ""
    printf "  %-18s %8.2f%s\n", $NF, $4 / n, errors
  }' "$2"
}

# hold PID COUNT: COUNT idle TLS connections held; the gateway's RSS
# growth in KiB while they are.
hold() {
  local pid=$1 count=$2 before after
  before=$(rss_kib "$pid")
  client idle 203.0.113.11:443 "$count" 3 $SINK >"$work/idle.out" &
  local idle=$!
  for _ in $(seq 300); do grep -q held= "$work/idle.out" && break; sleep 0.1; done
  sleep 1
  after=$(rss_kib "$pid")
  wait "$idle"
  [ "$(field held "$(cat "$work/idle.out")")" = "$count" ] || { echo "profile: idle connections not held" >&2; exit 1; }
  echo $((after - before))
}

# The peak heap (dhat's t-gmax) of a gateway that held COUNT idle connections.
peak_heap() {
  local count=$1 pid
  pid=$(start "$portcullis")
  client rate 203.0.113.10:443 8 1 $ANSWER >/dev/null # names resolved, caches warm
  hold "$pid" "$count" >/dev/null
  stop
  cp "$work/dhat-heap.json" "$work/heap-$count.json"
  python3 -c 'import json, sys; print(sum(p.get("gb", 0) for p in json.load(open(sys.argv[1]))["pps"]))' \
    "$work/heap-$count.json"
}

case $mode in
  memory)
    one=$(peak_heap "$COUNT")
    two=$(peak_heap $((2 * COUNT)))
    echo "heap per idle TLS connection: $(((two - one) / COUNT)) bytes (peak $one B with $COUNT, $two B with $((2 * COUNT)))"
    python3 "$repo/benches/netns/heap_sites.py" "$work/heap-$((2 * COUNT)).json" $((2 * COUNT))
    pid=$(start "$repo/target/release/portcullis")
    client rate 203.0.113.10:443 8 1 $ANSWER >/dev/null
    grown=$(hold "$pid" "$COUNT")
    stop
    echo "RSS per idle TLS connection (mimalloc build, as run.sh measures): $(awk -v k="$grown" -v n="$COUNT" 'BEGIN { printf "%.2f", k / n }') KiB"
    ;;
  stream)
    # Rounds alternate the two, so that a noisy moment hits both.
    for round in 1 2 3; do
      for gw in portcullis relay; do
        for way in down up; do
          target=203.0.113.12:443 name=$SOURCE
          [ $way = up ] && target=203.0.113.11:443 name=$SINK
          pid=$(start "$portcullis" "$([ $gw = relay ] && echo relay || echo run)")
          cpu0=$(cpu_ticks "$pid")
          out=$(client bulk $way $target 1 "$SECONDS_PER" $name)
          cpu1=$(cpu_ticks "$pid")
          stop
          echo "round $round: $gw $way $(field mib_per_s "$out") MiB/s, CPU s per GiB $(per_gib "$cpu0" "$cpu1" "$(field bytes "$out")")"
          if [ "$round" = 1 ]; then
            pid=$(start "$portcullis" "$([ $gw = relay ] && echo relay || echo run)")
            strace -c -f -p "$pid" -o "$work/strace.txt" 2>/dev/null &
            tracer=$!
            sleep 0.5
            out=$(client bulk $way $target 1 "$SECONDS_PER" $name)
            kill -INT "$tracer"
            wait "$tracer" || true
            stop
            mib=$(awk -v b="$(field bytes "$out")" 'BEGIN { printf "%.1f", b / 2^20 }')
            echo "  under strace ($mib MiB), system calls per MiB:"
            per "$mib" "$work/strace.txt"
          fi
        done
      done
    done
    ;;
  rate)
    for gw in portcullis nginx; do
      for tool in none strace perf; do
        start "$portcullis" "$([ $gw = nginx ] && echo nginx || echo run)" >/dev/null
        client rate 203.0.113.10:443 8 1 $ANSWER >/dev/null
        read -r -a pids <<<"$(gateway_pids)"
        if [ $tool = strace ]; then
          strace -c -f "${pids[@]/#/-p}" -o "$work/strace.txt" 2>/dev/null &
          tracer=$!
          sleep 0.5
        elif [ $tool = perf ]; then
          # Sampled by a software clock: these machines have no PMU.
          perf record -q -e cpu-clock -F 2000 -p "$(IFS=,; echo "${pids[*]}")" -o "$work/perf.data" 2>/dev/null &
          tracer=$!
          sleep 0.5
        fi
        cpu0=$(cpu_ticks "${pids[@]}")
        out=$(client rate 203.0.113.10:443 64 "$SECONDS_PER" $ANSWER)
        cpu1=$(cpu_ticks "${pids[@]}")
        conns=$(field connections "$out")
        if [ $tool = strace ]; then
          kill -INT "$tracer"
          wait "$tracer" || true
          echo "  $gw under strace ($conns connections), system calls per connection:"
          per "$conns" "$work/strace.txt"
        elif [ $tool = perf ]; then
          kill -INT "$tracer"
          wait "$tracer" || true
          echo "  where $gw's CPU samples fall:"
          perf report -i "$work/perf.data" --no-children --sort dso --stdio 2>/dev/null |
            awk '$1 ~ /%$/ && $1 + 0 >= 0.5 { printf "    %-8s %s\n", $1, $2 }'
          echo "  its own functions above 0.5%:"
          own=nginx
          [ $gw = nginx ] || own=$(basename "$portcullis")
          perf report -i "$work/perf.data" --no-children --sort sym --stdio --dsos "$own" 2>/dev/null |
            awk '$1 ~ /%$/ && $1 + 0 >= 0.5 { $2 = ""; print "   " $0 }' | head -10
        else
          echo "$gw: $(field conn_per_s "$out") connections/s, CPU ms per connection $(awk -v a="$cpu0" -v b="$cpu1" -v n="$conns" -v hz="$(getconf CLK_TCK)" 'BEGIN { split(a, x); split(b, y); printf "%.3f user, %.3f system", (y[1] - x[1]) / hz * 1000 / n, (y[2] - x[2]) / hz * 1000 / n }')"
        fi
        stop
      done
    done
    ;;
esac

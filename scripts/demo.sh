#!/usr/bin/env bash
# A complete portcullis gateway in three network namespaces (run as root):
#
#   client (192.0.2.2) -> gateway (portcullis + iptables) -> "internet" (203.0.113.20)
#
# The client has no proxy settings: its default route is the gateway, whose
# iptables rules (iptables/portcullis-iptables.sh) redirect tcp/443 and
# tcp/80 to portcullis. The "internet" host runs a real TLS server, an
# HTTP server and the gateway's DNS server (dnsmasq: pypi.org is
# 203.0.113.20), so nothing leaves this machine. The gateway enforces
# examples/allowlist.txt with its defaults: pypi.org is allowed, evil.example
# is not, and pypi.org sent to another address still reaches pypi.org's own
# server (--verify-dst pin). Everything is torn down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
install_missing dnsmasq-base
cargo build --locked --release --quiet
bin=$PWD/target/release/portcullis
iptables_script=$PWD/iptables/portcullis-iptables.sh

C=pcdemo-client G=pcdemo-gateway U=pcdemo-internet
# shellcheck source=scripts/topology.sh
source scripts/topology.sh
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  topology_down $C $G $U
  rm -rf "$work"
}
trap cleanup EXIT
topology_down $C $G $U # left by a run that was killed

echo "== building the topology"
topology_up $C $G $U 203.0.113.20

echo "== applying the iptables rules in the gateway"
ip netns exec $G env PRIVATE_CIDRS=192.0.2.0/24 PRIVATE_CIDRS6= "$iptables_script" apply
ip netns exec $G iptables -t nat -S PORTCULLIS_PREROUTING | sed 's/^/   /'
ip netns exec $G iptables -S PORTCULLIS_FORWARD | sed 's/^/   /'

echo "== starting the internet host's servers (TLS on :443, HTTP on :80)"
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=demo \
    -addext "subjectAltName=DNS:pypi.org,DNS:evil.example" -keyout key.pem -out cert.pem 2>/dev/null
  echo "hello from the internet host" > index.html
)
ip netns exec $U openssl s_server -quiet -www -accept 203.0.113.20:443 -cert "$work/cert.pem" -key "$work/key.pem" \
  </dev/null >/dev/null 2>&1 &
pids+=($!)
ip netns exec $U python3 -m http.server --bind 203.0.113.20 --directory "$work" 80 >/dev/null 2>&1 &
pids+=($!)

echo "== starting the gateway's DNS server on the internet host (pypi.org is 203.0.113.20)"
gateway_dns $U "$work" pypi.org,203.0.113.20

echo "== starting portcullis in the gateway on examples/allowlist.txt"
# In a mount namespace of its own whose resolv.conf names that DNS server.
with_own_dns $G "$work" "$bin" run --allowlist examples/allowlist.txt --metrics-listen 127.0.0.1:9090 \
  >"$work/audit.jsonl" 2>"$work/portcullis.log" &
pids+=($!)
for _ in $(seq 100); do
  ip netns exec $G curl -sf -o /dev/null http://127.0.0.1:9090/healthz && ip netns exec $U curl -sf -o /dev/null http://203.0.113.20/ && break
  sleep 0.1
done

try() {
  echo
  echo "\$ curl $*"
  ip netns exec $C curl -sS --max-time 5 --cacert "$work/cert.pem" "$@" 2>&1 | sed 's/^/   /' || true
}
try --resolve pypi.org:443:203.0.113.20 https://pypi.org/ -o /dev/null -w 'HTTP %{http_code} over TLS: allowed\n'
try --resolve evil.example:443:203.0.113.20 https://evil.example/
# The allowed name sent to an address of the client's choosing: the
# gateway connects to pypi.org's own address instead (the audit line's
# "upstream"), and 203.0.113.66 is never contacted.
try --resolve pypi.org:443:203.0.113.66 https://pypi.org/ -o /dev/null -w 'HTTP %{http_code} over TLS: pinned to the real server\n'
try --resolve pypi.org:80:203.0.113.20 http://pypi.org/ -w 'HTTP %{http_code}\n'
try --resolve evil.example:80:203.0.113.20 http://evil.example/ -w 'HTTP %{http_code}\n'

echo
echo "== the audit log (portcullis's stdout: one JSON line per connection)"
sleep 0.2
sed 's/^/   /' "$work/audit.jsonl"
echo
echo "== from /metrics"
ip netns exec $G curl -sS http://127.0.0.1:9090/metrics |
  grep -E '^portcullis_(connections_total|denied_total|rule_hits_total|repinned_total|dns_lookups_total)' |
  grep -v ' 0$' | sed 's/^/   /'
echo
echo "== what portcullis logged (stderr)"
sed 's/^/   /' "$work/portcullis.log"

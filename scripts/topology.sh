#!/usr/bin/env bash
# Sourced by scripts/demo.sh and benches/netns/run.sh and profile.sh: the
# client / gateway / upstream namespaces they share, and the gateway's own
# DNS server (the e2e tests build the same in Rust, tests/support/netns.rs
# and dns.rs), with documentation addresses only:
#
#   client 192.0.2.2 --- 192.0.2.1 gateway 198.51.100.1 --- 198.51.100.2 upstream
#                                                          + the "internet" addresses given
#
# topology_up CLIENT GATEWAY UPSTREAM INTERNET-ADDRESS...
topology_up() {
  local c=$1 g=$2 u=$3 ns ifname dev address
  shift 3
  for ns in "$c" "$g" "$u"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip -n "$c" link add eth0 type veth peer name cli netns "$g"
  ip -n "$u" link add eth0 type veth peer name net netns "$g"
  ip -n "$c" addr add 192.0.2.2/24 dev eth0
  ip -n "$g" addr add 192.0.2.1/24 dev cli
  ip -n "$g" addr add 198.51.100.1/24 dev net
  ip -n "$u" addr add 198.51.100.2/24 dev eth0
  for address in "$@"; do ip -n "$u" addr add "$address/32" dev lo; done
  for dev in "$c eth0" "$g cli" "$g net" "$u eth0"; do
    read -r ns ifname <<<"$dev"
    ip -n "$ns" link set "$ifname" up
  done
  ip -n "$c" route add default via 192.0.2.1
  ip -n "$u" route add default via 198.51.100.1
  ip -n "$g" route add 203.0.113.0/24 via 198.51.100.2
  ip netns exec "$g" sysctl -qw net.ipv4.ip_forward=1
}

# topology_many_connections CLIENT GATEWAY UPSTREAM: for workloads that
# open tens of thousands of connections a run, every host reuses TIME_WAIT
# ports over a wide range, as ami/sysctl sets for a gateway. With the range
# that wide, a gateway's own outbound connections (Squid's to the upstream)
# could take its listening ports, left in TIME_WAIT for the next gateway's
# bind: reserved, as ami/sysctl reserves them.
topology_many_connections() {
  local ns
  for ns in "$@"; do
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
  done
  ip netns exec "$2" sysctl -qw net.ipv4.ip_local_reserved_ports=9090,15080,15443
}

# gateway_dns UPSTREAM DIR NAME,ADDRESS...: a real DNS server (dnsmasq) on
# the upstream host, 198.51.100.2, that knows only these names, in the
# background; and DIR/own-dns/resolv.conf and hosts, which point at it
# alone, for with_own_dns. A TTL of 300 s: the names never move.
gateway_dns() {
  local u=$1 dir=$2 record args=()
  shift 2
  for record in "$@"; do args+=("--host-record=$record"); done
  mkdir -p "$dir/own-dns"
  ip netns exec "$u" dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
    --listen-address=198.51.100.2 --user=root --pid-file="$dir/own-dns/dnsmasq.pid" --local-ttl=300 \
    "${args[@]}" 2>"$dir/own-dns/dnsmasq.log" &
  disown # killed with the namespace
  printf 'nameserver 198.51.100.2\noptions timeout:1 attempts:1\n' >"$dir/own-dns/resolv.conf"
  printf '127.0.0.1 localhost\n' >"$dir/own-dns/hosts"
}

# with_own_dns NAMESPACE DIR COMMAND...: runs COMMAND in NAMESPACE, in a
# mount namespace of its own whose /etc/resolv.conf and /etc/hosts are
# gateway_dns's files in DIR, so its lookups reach that server only.
with_own_dns() {
  local ns=$1 dir=$2
  shift 2
  # The inner script's "$1" is its own argument, not this function's.
  # shellcheck disable=SC2016
  ip netns exec "$ns" unshare --mount --propagation private \
    sh -c 'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
    sh "$dir/own-dns/resolv.conf" "$dir/own-dns/hosts" "$@"
}

# topology_down NAMESPACE...: kills what runs in them, then deletes them.
topology_down() {
  local ns pid
  for ns in "$@"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

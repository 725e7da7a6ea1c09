#!/usr/bin/env bash
# Sourced by scripts/demo.sh and benches/netns/run.sh: the client / gateway
# / upstream namespaces they share (the e2e tests build the same in Rust,
# tests/support/netns.rs), with documentation addresses only:
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

# topology_down NAMESPACE...: kills what runs in them, then deletes them.
topology_down() {
  local ns pid
  for ns in "$@"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

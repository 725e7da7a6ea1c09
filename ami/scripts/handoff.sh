#!/usr/bin/env bash
# Flow hand-off, run by the HA agent (portcullis ha) on the gateway that
# has just taken a route over from a live sibling in its own subnet (a
# rollout's handover). The clients' packets now come here, but the
# connections they belong to live on the sibling: every packet of a flow
# this gateway did not see begin (a TCP packet to port 80 or 443 that is
# not a SYN and matches no connection here) is routed on to the sibling,
# which still holds the socket, instead of being reset. New connections
# (SYNs) are served here as usual.
#
#   handoff.sh start PEER-IPV4 [PEER-IPV6]   route unknown flows to PEER
#                                            (IPv6 ones too, with its IPv6
#                                            address: the AZ's ::/0 is ours)
#   handoff.sh stop                          remove everything start added
#
# The rules exist only while a hand-off runs; the sibling, which has none,
# resets any packet that matches none of its own connections, so nothing
# is ever forwarded past a proxy. Settings: HANDOFF_MARK (0x50c),
# HANDOFF_TABLE (50).
set -euo pipefail
MARK=${HANDOFF_MARK:-0x50c}
TABLE=${HANDOFF_TABLE:-50}
CHAIN=PORTCULLIS_HANDOFF

# remove_family IPTABLES IP-FAMILY-FLAG
remove_family() {
  local ipt=$1 fam=$2
  while $ipt -w -t mangle -D PREROUTING -j "$CHAIN" 2>/dev/null; do :; done
  $ipt -w -t mangle -F "$CHAIN" 2>/dev/null || true
  $ipt -w -t mangle -X "$CHAIN" 2>/dev/null || true
  while $ipt -w -t nat -D PREROUTING -m mark --mark "$MARK" -j ACCEPT 2>/dev/null; do :; done
  while $ipt -w -t filter -D FORWARD -m mark --mark "$MARK" -j ACCEPT 2>/dev/null; do :; done
  while ip "$fam" rule del fwmark "$MARK" lookup "$TABLE" 2>/dev/null; do :; done
  ip "$fam" route flush table "$TABLE" 2>/dev/null || true
}

stop() {
  remove_family iptables -4
  if command -v ip6tables >/dev/null; then remove_family ip6tables -6; fi
}

# add_family IPTABLES IP-FAMILY-FLAG PEER
add_family() {
  local ipt=$1 fam=$2 peer=$3
  # Where marked packets go: the sibling, and nowhere else.
  ip "$fam" route replace default via "$peer" table "$TABLE"
  ip "$fam" rule add fwmark "$MARK" lookup "$TABLE" priority 50
  $ipt -w -t mangle -N "$CHAIN"
  $ipt -w -t mangle -A "$CHAIN" -p tcp -m multiport --dports 80,443 \
    -m conntrack --ctstate NEW -m tcp ! --syn -j CONNMARK --set-mark "$MARK"
  $ipt -w -t mangle -A "$CHAIN" -m connmark --mark "$MARK" -j MARK --set-mark "$MARK"
  $ipt -w -t mangle -I PREROUTING 1 -j "$CHAIN"
  # Neither redirected to the proxy here nor dropped by the filter.
  $ipt -w -t nat -I PREROUTING 1 -m mark --mark "$MARK" -j ACCEPT
  $ipt -w -t filter -I FORWARD 1 -m mark --mark "$MARK" -j ACCEPT
}

start() {
  local peer=$1 peer6=${2:-}
  [[ $peer =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || {
    echo "handoff: '$peer' is not an IPv4 address" >&2
    exit 2
  }
  [[ -z $peer6 || $peer6 =~ ^[0-9a-fA-F:]+$ ]] || {
    echo "handoff: '$peer6' is not an IPv6 address" >&2
    exit 2
  }
  stop
  add_family iptables -4 "$peer"
  if [ -n "$peer6" ]; then add_family ip6tables -6 "$peer6"; fi
}

case "${1:-}" in
  start) start "${2:?handoff.sh start PEER-IPV4 [PEER-IPV6]}" "${3:-}" ;;
  stop) stop ;;
  *)
    echo "usage: $0 start PEER-IPV4 [PEER-IPV6] | stop" >&2
    exit 2
    ;;
esac

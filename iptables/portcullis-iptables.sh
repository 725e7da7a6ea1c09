#!/usr/bin/env bash
# Redirects the private network's tcp/443 and tcp/80 to portcullis.
#
#   portcullis-iptables.sh apply    install or refresh the rules (idempotent)
#   portcullis-iptables.sh remove   remove every rule this script added
#   portcullis-iptables.sh print    print the rules, change nothing
#
# Settings (environment):
#   PRIVATE_CIDRS    IPv4 sources to redirect   (default: 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16)
#   PRIVATE_CIDRS6   IPv6 sources to redirect   (default: fc00::/7; empty: no IPv6 rules)
#   TLS_PORT         portcullis TLS listener    (default: 15443)
#   HTTP_PORT        portcullis HTTP listener   (default: 15080)
#
# All rules live in chains of our own (PORTCULLIS_*), reached by one jump
# from the built-in chain, so apply/remove never touch anyone else's rules.
# Only PREROUTING is used: the gateway's own outbound connections (OUTPUT)
# are never redirected, so portcullis cannot loop into itself.
set -euo pipefail

PRIVATE_CIDRS=${PRIVATE_CIDRS-10.0.0.0/8 172.16.0.0/12 192.168.0.0/16}
PRIVATE_CIDRS6=${PRIVATE_CIDRS6-fc00::/7}
TLS_PORT=${TLS_PORT:-15443}
HTTP_PORT=${HTTP_PORT:-15080}
CHAIN=PORTCULLIS_PREROUTING

# The rules of our nat chain for one family, one per line.
chain_rules() {
  local cidrs=$1 cidr
  for cidr in $cidrs; do
    echo "-A $CHAIN -s $cidr -p tcp -m tcp --dport 443 -j REDIRECT --to-ports $TLS_PORT"
    echo "-A $CHAIN -s $cidr -p tcp -m tcp --dport 80 -j REDIRECT --to-ports $HTTP_PORT"
  done
}

print_family() {
  local cidrs=$1
  echo "*nat"
  echo ":$CHAIN - [0:0]"
  echo "-A PREROUTING -j $CHAIN"
  chain_rules "$cidrs"
  echo "COMMIT"
}

apply_family() {
  local cmd=$1 cidrs=$2 rule
  "$cmd" -w -t nat -N "$CHAIN" 2>/dev/null || true
  "$cmd" -w -t nat -F "$CHAIN"
  while read -r rule; do
    [ -n "$rule" ] || continue
    # shellcheck disable=SC2086 # a rule is a list of words
    "$cmd" -w -t nat $rule
  done < <(chain_rules "$cidrs")
  "$cmd" -w -t nat -C PREROUTING -j "$CHAIN" 2>/dev/null || "$cmd" -w -t nat -I PREROUTING 1 -j "$CHAIN"
}

remove_family() {
  local cmd=$1
  while "$cmd" -w -t nat -D PREROUTING -j "$CHAIN" 2>/dev/null; do :; done
  "$cmd" -w -t nat -F "$CHAIN" 2>/dev/null || true
  "$cmd" -w -t nat -X "$CHAIN" 2>/dev/null || true
}

case "${1:-}" in
  apply)
    apply_family iptables "$PRIVATE_CIDRS"
    if [ -n "$PRIVATE_CIDRS6" ]; then apply_family ip6tables "$PRIVATE_CIDRS6"; else remove_family ip6tables; fi
    ;;
  remove)
    remove_family iptables
    remove_family ip6tables
    ;;
  print)
    echo "# IPv4 (iptables-restore --noflush)"
    print_family "$PRIVATE_CIDRS"
    if [ -n "$PRIVATE_CIDRS6" ]; then
      echo "# IPv6 (ip6tables-restore --noflush)"
      print_family "$PRIVATE_CIDRS6"
    fi
    ;;
  *)
    echo "usage: $0 apply|remove|print" >&2
    exit 2
    ;;
esac

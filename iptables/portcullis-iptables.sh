#!/usr/bin/env bash
# The packet filter of a portcullis gateway, IPv4 and IPv6.
#
#   portcullis-iptables.sh apply    install or refresh the rules (idempotent)
#   portcullis-iptables.sh remove   remove every rule this script added
#   portcullis-iptables.sh print    print the rules (iptables-restore format), change nothing
#
# What it enforces:
#   nat PREROUTING  tcp/443 and tcp/80 from the private networks are
#                   redirected to portcullis's TLS and HTTP listeners.
#   FORWARD         policy DROP: nothing is routed around the proxy except
#                   what ALLOW_FORWARD lists (masqueraded). udp/443 (QUIC)
#                   is rejected with an ICMP error, so HTTP/3 clients fall
#                   back to TCP at once instead of waiting for a timeout.
#   INPUT           the proxy ports from the private networks, the metrics
#                   port from the monitoring networks, ICMP, loopback and
#                   replies; everything else is dropped.
#   mangle          GWLB=1 only: connections arriving through the GWLB
#                   tunnel's device are marked, the host's packets of them
#                   carry the mark (which `portcullis gwlb` routes back into
#                   the device), and TCP's MSS either way fits GWLB's 8500.
# Only PREROUTING is redirected: the gateway's own outbound connections
# (OUTPUT) never are, so portcullis cannot loop into itself.
#
# Settings (environment):
#   PRIVATE_CIDRS      IPv4 clients                 (default: 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16)
#   PRIVATE_CIDRS6     IPv6 clients                 (default: fc00::/7; empty: IPv6 is only filtered)
#   MONITORING_CIDRS   may scrape the metrics port  (default: PRIVATE_CIDRS)
#   MONITORING_CIDRS6                               (default: PRIVATE_CIDRS6)
#   TLS_PORT HTTP_PORT METRICS_PORT                 (default: 15443 15080 9090)
#   ALLOW_FORWARD      traffic routed without the proxy, as PROTO:PORT[@DESTINATION-CIDR]
#                      words, e.g. "udp:123 tcp:22@10.9.0.0/16" (default: none). A word
#                      with an IPv6 destination applies to IPv6 only, one with an IPv4
#                      destination to IPv4 only, one without to both.
#   ALLOW_INPUT        extra ports on the gateway itself, same syntax with @SOURCE-CIDR
#                      (default: none; use SSM rather than opening SSH).
#   GWLB               1: a Gateway Load Balancer target (`portcullis gwlb`) (default: 0)
#   GWLB_CIDRS         where GWLB's GENEVE (udp/6081) and health checks come from
#                      (default: MONITORING_CIDRS)
#   GWLB_DEVICE        the tunnel's device (default: gwlb0)
#
# Every rule lives in chains of our own (PORTCULLIS_*), reached by one jump
# from each built-in chain, so apply and remove never touch anyone else's
# rules. The exception is the FORWARD policy, set to DROP by apply and back
# to ACCEPT by remove.
set -euo pipefail

PRIVATE_CIDRS=${PRIVATE_CIDRS-10.0.0.0/8 172.16.0.0/12 192.168.0.0/16}
PRIVATE_CIDRS6=${PRIVATE_CIDRS6-fc00::/7}
MONITORING_CIDRS=${MONITORING_CIDRS-$PRIVATE_CIDRS}
MONITORING_CIDRS6=${MONITORING_CIDRS6-$PRIVATE_CIDRS6}
TLS_PORT=${TLS_PORT:-15443}
HTTP_PORT=${HTTP_PORT:-15080}
METRICS_PORT=${METRICS_PORT:-9090}
ALLOW_FORWARD=${ALLOW_FORWARD:-}
ALLOW_INPUT=${ALLOW_INPUT:-}
GWLB=${GWLB:-0}
GWLB_CIDRS=${GWLB_CIDRS-$MONITORING_CIDRS}
GWLB_DEVICE=${GWLB_DEVICE:-gwlb0}
# What `portcullis gwlb` routes back into its device (its MARK).
GWLB_MARK=0x6081
# GWLB carries 8500 bytes, 68 of them its own: TCP's largest segment
# inside is 8432 less the IP and TCP headers.
GWLB_MSS4=8392
GWLB_MSS6=8372

# table:built-in chain:our chain, in the order they are installed.
MANGLE_HOOKS="mangle:PREROUTING:PORTCULLIS_MANGLE_PRE mangle:OUTPUT:PORTCULLIS_MANGLE_OUT mangle:POSTROUTING:PORTCULLIS_MANGLE_POST"
HOOKS="nat:PREROUTING:PORTCULLIS_PREROUTING nat:POSTROUTING:PORTCULLIS_POSTROUTING filter:INPUT:PORTCULLIS_INPUT filter:FORWARD:PORTCULLIS_FORWARD"
[ "$GWLB" = 1 ] && HOOKS="$HOOKS $MANGLE_HOOKS"
TABLES="nat filter"
[ "$GWLB" = 1 ] && TABLES="nat filter mangle"

die() {
  echo "portcullis-iptables: $*" >&2
  exit 2
}

# Whether a CIDR or address is IPv6.
is_v6() { [[ $1 == *:* ]]; }

# Splits a PROTO:PORT[@CIDR] word into "proto port cidr" (cidr may be empty).
parse_allow() {
  local word=$1 what cidr="" proto port
  what=${word%%@*}
  [[ $word == *@* ]] && cidr=${word#*@}
  proto=${what%%:*}
  port=${what#*:}
  [[ $proto == tcp || $proto == udp ]] || die "bad protocol in '$word' (tcp or udp)"
  [[ $port =~ ^[0-9]+(:[0-9]+)?$ ]] || die "bad port in '$word' (a number or a range LOW:HIGH)"
  [[ -z $cidr || $cidr =~ ^[0-9a-fA-F:.]+(/[0-9]+)?$ ]] || die "bad address in '$word'"
  echo "$proto $port $cidr"
}

# The ALLOW_* words that apply to family $1, as "proto port cidr" lines.
allowed() {
  local family=$1 list=$2 word proto port cidr
  for word in $list; do
    read -r proto port cidr <<<"$(parse_allow "$word")"
    if [ -n "$cidr" ]; then
      if is_v6 "$cidr"; then [ "$family" = 6 ] || continue; else [ "$family" = 4 ] || continue; fi
    fi
    echo "$proto $port $cidr"
  done
}

# The matches of the ALLOW_FORWARD traffic of family $1 from clients $2,
# one per line, e.g. "-s 10.0.0.0/8 -d 10.9.0.0/16 -p tcp -m tcp --dport 22".
forward_matches() {
  local family=$1 clients=$2 proto port dst cidr
  while read -r proto port dst; do
    [ -n "$proto" ] || continue
    for cidr in $clients; do
      echo "-s $cidr${dst:+ -d $dst} -p $proto -m $proto --dport $port"
    done
  done < <(allowed "$family" "$ALLOW_FORWARD")
}

# The rules of our chains for family $1 (4 or 6), one per line, without
# the table: nat first, then filter.
nat_rules() {
  local family=$1 clients cidr match
  if [ "$family" = 4 ]; then clients=$PRIVATE_CIDRS; else clients=$PRIVATE_CIDRS6; fi
  for cidr in $clients; do
    echo "-A PORTCULLIS_PREROUTING -s $cidr -p tcp -m tcp --dport 443 -j REDIRECT --to-ports $TLS_PORT"
    echo "-A PORTCULLIS_PREROUTING -s $cidr -p tcp -m tcp --dport 80 -j REDIRECT --to-ports $HTTP_PORT"
  done
  while read -r match; do
    echo "-A PORTCULLIS_POSTROUTING $match -j MASQUERADE"
  done < <(forward_matches "$family" "$clients")
}

filter_rules() {
  local family=$1 clients monitors cidr proto port peer icmp reject match
  if [ "$family" = 4 ]; then
    clients=$PRIVATE_CIDRS monitors=$MONITORING_CIDRS icmp="icmp" reject="icmp-port-unreachable"
  else
    clients=$PRIVATE_CIDRS6 monitors=$MONITORING_CIDRS6 icmp="ipv6-icmp" reject="icmp6-port-unreachable"
  fi
  # INPUT: replies, loopback and ICMP (IPv6 neighbour discovery and path
  # MTU discovery need it) first, then the listeners, then nothing.
  echo "-A PORTCULLIS_INPUT -i lo -j ACCEPT"
  echo "-A PORTCULLIS_INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
  echo "-A PORTCULLIS_INPUT -m conntrack --ctstate INVALID -j DROP"
  echo "-A PORTCULLIS_INPUT -p $icmp -j ACCEPT"
  # A DHCPv6 lease renewal is answered to a UDP socket, not a raw one.
  [ "$family" = 6 ] && echo "-A PORTCULLIS_INPUT -s fe80::/10 -p udp -m udp --sport 547 --dport 546 -j ACCEPT"
  for cidr in $clients; do
    echo "-A PORTCULLIS_INPUT -s $cidr -p tcp -m tcp --dport $TLS_PORT -j ACCEPT"
    echo "-A PORTCULLIS_INPUT -s $cidr -p tcp -m tcp --dport $HTTP_PORT -j ACCEPT"
  done
  for cidr in $monitors; do
    echo "-A PORTCULLIS_INPUT -s $cidr -p tcp -m tcp --dport $METRICS_PORT -j ACCEPT"
  done
  # GWLB's GENEVE and health checks, over IPv4 only.
  if [ "$GWLB" = 1 ] && [ "$family" = 4 ]; then
    for cidr in $GWLB_CIDRS; do
      echo "-A PORTCULLIS_INPUT -s $cidr -p udp -m udp --dport 6081 -j ACCEPT"
      echo "-A PORTCULLIS_INPUT -s $cidr -p tcp -m tcp --dport $METRICS_PORT -j ACCEPT"
    done
  fi
  while read -r proto port peer; do
    [ -n "$proto" ] || continue
    echo "-A PORTCULLIS_INPUT${peer:+ -s $peer} -p $proto -m $proto --dport $port -j ACCEPT"
  done < <(allowed "$family" "$ALLOW_INPUT")
  echo "-A PORTCULLIS_INPUT -j DROP"

  # FORWARD: replies to what was let through, the operator's exceptions,
  # a fast refusal for QUIC; the DROP policy takes the rest.
  echo "-A PORTCULLIS_FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
  while read -r match; do
    echo "-A PORTCULLIS_FORWARD $match -m conntrack --ctstate NEW -j ACCEPT"
  done < <(forward_matches "$family" "$clients")
  echo "-A PORTCULLIS_FORWARD -p udp -m udp --dport 443 -j REJECT --reject-with $reject"
}

# GWLB=1: the tunnel's connections marked, and the host's packets of them
# routed back into the device; TCP segments either way within GWLB's MTU.
mangle_rules() {
  local family=$1 mss
  if [ "$family" = 4 ]; then mss=$GWLB_MSS4; else mss=$GWLB_MSS6; fi
  echo "-A PORTCULLIS_MANGLE_PRE -i $GWLB_DEVICE -j CONNMARK --set-xmark $GWLB_MARK/0xffffffff"
  echo "-A PORTCULLIS_MANGLE_PRE -i $GWLB_DEVICE -p tcp -m tcp --tcp-flags SYN,RST SYN -m tcpmss --mss $((mss + 1)):65535 -j TCPMSS --set-mss $mss"
  echo "-A PORTCULLIS_MANGLE_OUT -m connmark --mark $GWLB_MARK -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
  echo "-A PORTCULLIS_MANGLE_POST -o $GWLB_DEVICE -p tcp -m tcp --tcp-flags SYN,RST SYN -m tcpmss --mss $((mss + 1)):65535 -j TCPMSS --set-mss $mss"
}

# Everything for family $1 in iptables-restore --noflush form.
print_family() {
  local family=$1 hook table t builtin chain
  for table in $TABLES; do
    echo "*$table"
    [ "$table" = filter ] && echo ":FORWARD DROP [0:0]"
    for hook in $HOOKS; do
      IFS=: read -r t builtin chain <<<"$hook"
      [ "$t" = "$table" ] && echo ":$chain - [0:0]"
    done
    for hook in $HOOKS; do
      IFS=: read -r t builtin chain <<<"$hook"
      [ "$t" = "$table" ] && echo "-A $builtin -j $chain"
    done
    case $table in
      nat) nat_rules "$family" ;;
      filter) filter_rules "$family" ;;
      mangle) mangle_rules "$family" ;;
    esac
    echo "COMMIT"
  done
}

apply_family() {
  local family=$1 cmd=$2 hook table builtin chain rule
  # Validate every word before changing anything.
  allowed "$family" "$ALLOW_FORWARD $ALLOW_INPUT" >/dev/null
  for hook in $HOOKS; do
    IFS=: read -r table builtin chain <<<"$hook"
    "$cmd" -w -t "$table" -N "$chain" 2>/dev/null || true
    "$cmd" -w -t "$table" -F "$chain"
  done
  while read -r rule; do
    [ -n "$rule" ] || continue
    # shellcheck disable=SC2086 # a rule is a list of words
    "$cmd" -w -t nat $rule
  done < <(nat_rules "$family")
  while read -r rule; do
    [ -n "$rule" ] || continue
    # shellcheck disable=SC2086
    "$cmd" -w -t filter $rule
  done < <(filter_rules "$family")
  if [ "$GWLB" = 1 ]; then
    while read -r rule; do
      # shellcheck disable=SC2086
      "$cmd" -w -t mangle $rule
    done < <(mangle_rules "$family")
  else
    # A GWLB target no longer: its marks go.
    remove_hooks "$cmd" "$MANGLE_HOOKS"
  fi
  for hook in $HOOKS; do
    IFS=: read -r table builtin chain <<<"$hook"
    "$cmd" -w -t "$table" -C "$builtin" -j "$chain" 2>/dev/null ||
      "$cmd" -w -t "$table" -I "$builtin" 1 -j "$chain"
  done
  "$cmd" -w -t filter -P FORWARD DROP
}

# Unhooks, flushes and deletes the chains of hooks $2.
remove_hooks() {
  local cmd=$1 hook table builtin chain
  for hook in $2; do
    IFS=: read -r table builtin chain <<<"$hook"
    while "$cmd" -w -t "$table" -D "$builtin" -j "$chain" 2>/dev/null; do :; done
    "$cmd" -w -t "$table" -F "$chain" 2>/dev/null || true
    "$cmd" -w -t "$table" -X "$chain" 2>/dev/null || true
  done
}

remove_family() {
  local cmd=$1
  remove_hooks "$cmd" "$HOOKS $MANGLE_HOOKS"
  "$cmd" -w -t filter -P FORWARD ACCEPT
}

# Settings are checked before anything is changed.
[[ $GWLB == 0 || $GWLB == 1 ]] || die "bad GWLB '$GWLB' (0 or 1)"
[[ $GWLB_DEVICE =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad GWLB_DEVICE '$GWLB_DEVICE'"
for cidr in $PRIVATE_CIDRS $MONITORING_CIDRS $PRIVATE_CIDRS6 $MONITORING_CIDRS6 $GWLB_CIDRS; do
  [[ $cidr =~ ^[0-9a-fA-F:.]+(/[0-9]+)?$ ]] || die "bad CIDR '$cidr'"
done
for port in "$TLS_PORT" "$HTTP_PORT" "$METRICS_PORT"; do
  [[ $port =~ ^[0-9]+$ ]] || die "bad port '$port'"
done
for word in $ALLOW_FORWARD $ALLOW_INPUT; do parse_allow "$word" >/dev/null; done

case "${1:-}" in
  apply)
    apply_family 4 iptables
    apply_family 6 ip6tables
    ;;
  remove)
    remove_family iptables
    remove_family ip6tables
    ;;
  print)
    echo "# IPv4: iptables-restore --noflush"
    print_family 4
    echo "# IPv6: ip6tables-restore --noflush"
    print_family 6
    ;;
  print4) print_family 4 ;;
  print6) print_family 6 ;;
  *)
    echo "usage: $0 apply|remove|print|print4|print6" >&2
    exit 2
    ;;
esac

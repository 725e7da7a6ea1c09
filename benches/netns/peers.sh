#!/usr/bin/env bash
# Sourced by run.sh and profile.sh: the peer proxies, installed and
# configured the same way for both. Needs scripts/setup.sh sourced first.
# shellcheck source=scripts/setup.sh
[ "$(type -t install_missing)" = function ] || source scripts/setup.sh

# install_peers PACKAGE...: installs the peers' packages (and any other
# missing ones) without starting their services, now or at the next boot:
# policy-rc.d answers 101 while they install, unless the administrator has
# a policy-rc.d of their own, which is left as it is.
install_peers() {
  local own_policy='' status=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  install_missing "$@" || status=$?
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || return "$status"
  if [ ${#newly_installed[@]} -gt 0 ]; then
    systemctl disable --quiet nginx haproxy squid 2>/dev/null || true
  fi
}

# write_nginx_conf DIR ANSWER SINK SOURCE: DIR/nginx.conf, nginx as an
# SNI-routing TCP proxy on :15443 for the three names (to 203.0.113.10, .11
# and .12), its pid and error log in DIR, an access log line per
# connection (buffered, to /dev/null).
write_nginx_conf() {
  local work=$1 ANSWER=$2 SINK=$3 SOURCE=$4
  cat >"$work/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx.log warn;
daemon off;
events { worker_connections 16384; }
stream {
  log_format egress '\$time_iso8601 \$remote_addr:\$remote_port \$ssl_preread_server_name '
                    '\$upstream_addr \$status \$bytes_received \$bytes_sent \$session_time';
  access_log /dev/null egress buffer=64k flush=1s;
  # The allowlist: SNI -> upstream (in production, a resolver and
  # \$ssl_preread_server_name:443; here a map stands in for DNS).
  map \$ssl_preread_server_name \$upstream {
    $ANSWER 203.0.113.10:443;
    $SINK 203.0.113.11:443;
    $SOURCE 203.0.113.12:443;
    default 127.0.0.1:1;
  }
  server {
    listen 15443 reuseport;
    ssl_preread on;
    proxy_pass \$upstream;
  }
}
EOF
}

#!/usr/bin/env bash
# Makes this instance the egress of its AZ: waits until portcullis is ready,
# turns off the source/destination check on this instance (EC2 otherwise
# drops packets not addressed to it, which is all a gateway receives), then
# points the default routes of the AZ's private route tables at this
# instance's network interface. A replacement instance runs the same, so it
# takes the routes over by itself.
#
#   ROUTE_TABLES   route table ids, space separated (required)
#   IPV6           "true": also take ::/0 (default: false)
#   READY_URL      readiness endpoint (default: http://127.0.0.1:9090/readyz)
#   READY_TIMEOUT  seconds to wait for readiness before failing (default: 600)
set -euo pipefail
: "${ROUTE_TABLES:?ROUTE_TABLES is required}"
IPV6=${IPV6:-false}
READY_URL=${READY_URL:-http://127.0.0.1:9090/readyz}
READY_TIMEOUT=${READY_TIMEOUT:-600}
# shellcheck source=ami/scripts/imds.sh
source /usr/libexec/portcullis/imds.sh

# Routing traffic here before portcullis serves would black-hole the AZ.
waited=0
until curl -sf --max-time 2 -o /dev/null "$READY_URL"; do
  if [ "$waited" -ge "$READY_TIMEOUT" ]; then
    echo "portcullis not ready after ${READY_TIMEOUT}s: leaving the routes alone" >&2
    exit 1
  fi
  sleep 5
  waited=$((waited + 5))
done

instance=$(imds instance-id)
mac=$(imds mac)
eni=$(imds "network/interfaces/macs/$mac/interface-id")
AWS_REGION=$(imds placement/region)
export AWS_REGION

aws ec2 modify-instance-attribute --instance-id "$instance" --no-source-dest-check

# replace-route fails when there is no such route yet: then create it.
take() {
  local table=$1 flag=$2 destination=$3
  if aws ec2 replace-route --route-table-id "$table" "$flag" "$destination" \
    --network-interface-id "$eni" 2>/dev/null; then
    echo "$table: $destination -> $eni (replaced)"
  else
    aws ec2 create-route --route-table-id "$table" "$flag" "$destination" \
      --network-interface-id "$eni" >/dev/null
    echo "$table: $destination -> $eni (created)"
  fi
}
for table in $ROUTE_TABLES; do
  take "$table" --destination-cidr-block 0.0.0.0/0
  if [ "$IPV6" = true ]; then
    take "$table" --destination-ipv6-cidr-block ::/0
  fi
done

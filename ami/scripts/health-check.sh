#!/usr/bin/env bash
# Run every 30 s by portcullis-health.timer. After FAILURES readiness checks
# in a row fail, reports this instance Unhealthy to its auto-scaling group,
# which replaces it (the group's grace period protects a booting instance).
#
#   READY_URL  readiness endpoint (default: http://127.0.0.1:9090/readyz)
#   FAILURES   consecutive failures that condemn the instance (default: 4)
set -euo pipefail
READY_URL=${READY_URL:-http://127.0.0.1:9090/readyz}
FAILURES=${FAILURES:-4}
state=/run/portcullis-health.failures
# shellcheck source=ami/scripts/imds.sh
source /usr/libexec/portcullis/imds.sh

if curl -sf --max-time 5 -o /dev/null "$READY_URL"; then
  echo 0 >"$state"
  exit 0
fi
failed=$(($(cat "$state" 2>/dev/null || echo 0) + 1))
echo "$failed" >"$state"
echo "portcullis not ready ($failed of $FAILURES allowed failures)" >&2
if [ "$failed" -ge "$FAILURES" ]; then
  AWS_REGION=$(imds placement/region)
  export AWS_REGION
  aws autoscaling set-instance-health --instance-id "$(imds instance-id)" --health-status Unhealthy
  echo "reported this instance Unhealthy to its auto-scaling group" >&2
fi

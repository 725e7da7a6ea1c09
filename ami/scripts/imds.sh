#!/usr/bin/env bash
# Sourced by the other scripts: reads instance metadata with IMDSv2 (the
# launch template requires tokens).
imds() {
  local token
  token=$(curl -sS --fail --max-time 5 -X PUT \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 60" http://169.254.169.254/latest/api/token)
  curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
    "http://169.254.169.254/latest/meta-data/$1"
}

"""CloudWatch Logs on the test's moto server, for tests/shipping.rs.

  create-group GROUP          the group the shipper writes to (the
                              Terraform module creates it in production)
  dump GROUP STREAM OUT       every event's message, one per line, in order
"""

import sys

import boto3

logs = boto3.client("logs")
command = sys.argv[1]
if command == "create-group":
    logs.create_log_group(logGroupName=sys.argv[2])
elif command == "dump":
    group, stream, out = sys.argv[2:5]
    token, messages = None, []
    while True:
        page = logs.get_log_events(
            logGroupName=group,
            logStreamName=stream,
            startFromHead=True,
            **({"nextToken": token} if token else {}),
        )
        messages += [e["message"] for e in page["events"]]
        if not page["events"] or page["nextForwardToken"] == token:
            break
        token = page["nextForwardToken"]
    with open(out, "w") as f:
        for m in messages:
            f.write(m + "\n")
else:
    sys.exit(f"unknown command {command}")

"""Helpers of scripts/ha-sim.sh, each a subcommand:

  seed OUT.json                  the VPC, subnets and route tables in the EC2 API
  launch SUBNET IP AZ RELEASE    one gateway instance; prints its instance id and ENI
  imds FILE                      an IMDSv2 responder (one per gateway namespace)
  router STATE.json LOG          applies the API's route tables to the client namespaces
  client HOST ADDR LOG           a new HTTP connection every 100 ms through the gateway
  long HOST ADDR LOG             one 6 s download through the gateway
  web ADDR                       the web server the clients reach
  tags INSTANCE                  prints the instance's portcullis tags (for waiting)
  route TABLE                    prints the ENI the table's default route points at
  addresses STATE.json           prints which interface holds each pool address
  terminate INSTANCE             as the auto-scaling group would

The EC2 API is moto_server at $AWS_ENDPOINT_URL; nothing leaves the
namespaces ha-sim.sh builds.
"""

import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time



FLEET = "sim"


def ec2():
    import boto3  # here, not at the top: the IMDS responder starts faster without it

    return boto3.client(
        "ec2",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )


def seed(out):
    api = ec2()
    vpc = api.create_vpc(CidrBlock="198.51.100.0/24")["Vpc"]["VpcId"]
    state = {"vpc": vpc, "subnets": {}, "tables": {}}
    for name, cidr, az in [
        ("private-a", "198.51.100.0/26", "us-east-1a"),
        ("private-b", "198.51.100.64/26", "us-east-1b"),
        ("public-a", "198.51.100.128/26", "us-east-1a"),
        ("public-b", "198.51.100.192/26", "us-east-1b"),
    ]:
        subnet = api.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=az)
        state["subnets"][name] = subnet["Subnet"]["SubnetId"]
    for az, private in [("us-east-1a", "private-a"), ("us-east-1b", "private-b")]:
        table = api.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        api.associate_route_table(RouteTableId=table, SubnetId=state["subnets"][private])
        state["tables"][az] = table
    # Each AZ's Elastic IP pool: one more than its gateways.
    state["eips"] = {
        az: [api.allocate_address(Domain="vpc")["AllocationId"] for _ in range(2)]
        for az in ["us-east-1a", "us-east-1b"]
    }
    with open(out, "w") as f:
        json.dump(state, f)


def launch(subnet, ip, az, release):
    api = ec2()
    instance = api.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        PrivateIpAddress=ip,
        Placement={"AvailabilityZone": az},
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "portcullis:gateway", "Value": FLEET},
                    {"Key": "portcullis:release", "Value": release},
                ],
            }
        ],
    )["Instances"][0]
    print(instance["InstanceId"], instance["NetworkInterfaces"][0]["NetworkInterfaceId"])


def tags(instance):
    reservations = ec2().describe_instances(InstanceIds=[instance])["Reservations"]
    for r in reservations:
        for i in r["Instances"]:
            for t in i.get("Tags", []):
                if t["Key"].startswith("portcullis:"):
                    print(t["Key"], t["Value"])


def route_target(api, table):
    tables = api.describe_route_tables(RouteTableIds=[table])["RouteTables"]
    for r in tables[0]["Routes"] if tables else []:
        if r.get("DestinationCidrBlock") == "0.0.0.0/0":
            return r.get("NetworkInterfaceId") or r.get("GatewayId") or "other"
    return "none"


def route(table):
    print(route_target(ec2(), table))


def addresses(state_file):
    """Prints "az allocation eni" per pool address."""
    with open(state_file) as f:
        state = json.load(f)
    api = ec2()
    for az, pool in sorted(state["eips"].items()):
        for a in api.describe_addresses(AllocationIds=pool)["Addresses"]:
            print(az, a["AllocationId"], a.get("NetworkInterfaceId") or "-")


def terminate(instance):
    ec2().terminate_instances(InstanceIds=[instance])


class Server(socketserver.ThreadingTCPServer):
    """An HTTP server without http.server's bind-time getfqdn(): in a
    namespace with a default route that reverse lookup waits out the
    resolver's timeouts (10 s) before the server listens."""

    daemon_threads = True
    allow_reuse_address = True


class Imds(http.server.BaseHTTPRequestHandler):
    """IMDSv2: a token for a PUT, metadata for a GET that carries it. The
    values come from a JSON file that ha-sim.sh rewrites (the lifecycle
    state of a rollout)."""

    file = None
    token = "sim-token"

    def log_message(self, *args):
        pass

    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.answer(404, "")
        ttl = self.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        self.answer(200, self.token, {"x-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self):
        if self.headers.get("x-aws-ec2-metadata-token") != self.token:
            return self.answer(401, "")
        with open(self.file) as f:
            values = json.load(f)
        key = self.path.removeprefix("/latest/meta-data/")
        if key in values:
            return self.answer(200, values[key])
        self.answer(404, "")

    def answer(self, status, body, headers=None):
        data = body.encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Web(http.server.BaseHTTPRequestHandler):
    """The "internet" web server: / answers at once; /slow streams 64 KiB
    over 6 s, a download in flight across a route move."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        chunks, body = (60, b"x" * 1024) if self.path == "/slow" else (1, b"hello\n")
        self.send_response(200)
        self.send_header("Content-Length", str(chunks * len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(chunks):
            self.wfile.write(body)
            self.wfile.flush()
            if chunks > 1:
                time.sleep(0.1)


def web(addr):
    Server((addr, 80), Web).serve_forever()


def long(host, addr, log):
    """One download of /slow; logs "start end ok|fail bytes"."""
    start = time.time()
    got, ok = 0, False
    try:
        with socket.create_connection((addr, 80), timeout=5) as s:
            s.settimeout(5)
            s.sendall(f"GET /slow HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            got = len(body)
            ok = head.startswith(b"HTTP/1.1 200") and got == 60 * 1024
    except OSError:
        ok = False
    with open(log, "a") as out:
        print(f"{start:.3f} {time.time():.3f} {'ok' if ok else 'fail'} {got}", file=out)


def imds(file):
    Imds.file = file
    server = Server(("169.254.169.254", 80), Imds)
    server.serve_forever()


def router(state_file, log):
    """Every 300 ms, points each client namespace's default route where its
    route table's default route points, as the VPC would. Logs each change
    as "unix-time table target"."""
    with open(state_file) as f:
        state = json.load(f)
    api = ec2()
    clients = {state["tables"]["us-east-1a"]: "hs-ca", state["tables"]["us-east-1b"]: "hs-cb"}
    applied = {}
    with open(log, "a", buffering=1) as out:
        while True:
            try:
                tables = api.describe_route_tables(RouteTableIds=list(clients))["RouteTables"]
                enis = {}
                for n in api.describe_network_interfaces()["NetworkInterfaces"]:
                    enis[n["NetworkInterfaceId"]] = n["PrivateIpAddress"]
            except Exception as e:  # the API restarting, a slow answer: try again
                print(f"{time.time():.3f} error {e}", file=out)
                time.sleep(0.3)
                continue
            for t in tables:
                target = "none"
                for r in t["Routes"]:
                    if r.get("DestinationCidrBlock") == "0.0.0.0/0":
                        target = r.get("NetworkInterfaceId") or "other"
                table = t["RouteTableId"]
                if applied.get(table) == target:
                    continue
                ns = clients[table]
                if target in enis:
                    cmd = ["ip", "-n", ns, "route", "replace", "default", "via", enis[target]]
                else:
                    cmd = ["ip", "-n", ns, "route", "replace", "blackhole", "default"]
                subprocess.run(cmd, check=False)
                applied[table] = target
                print(f"{time.time():.3f} {table} {target}", file=out)
            time.sleep(0.3)


def client(host, addr, log):
    """A new connection every 100 ms, each in its own thread with a 2 s
    bound, so a black-holed attempt does not delay the next. Logs
    "start end ok|fail" per attempt."""
    lock = threading.Lock()
    out = open(log, "a", buffering=1)

    def attempt():
        start = time.time()
        ok = False
        try:
            with socket.create_connection((addr, 80), timeout=2) as s:
                s.settimeout(2)
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = b""
                while b"\r\n" not in head and len(head) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                ok = head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
                while s.recv(65536):
                    pass
        except OSError:
            ok = False
        with lock:
            print(f"{start:.3f} {time.time():.3f} {'ok' if ok else 'fail'}", file=out)

    while True:
        threading.Thread(target=attempt, daemon=True).start()
        time.sleep(0.1)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {
        "seed": seed,
        "launch": launch,
        "imds": imds,
        "router": router,
        "client": client,
        "web": web,
        "long": long,
        "tags": tags,
        "route": route,
        "addresses": addresses,
        "terminate": terminate,
    }[command](*args)

"""A stand-in for AWS's Gateway Load Balancer, for scripts/gwlb-sim.sh.

Runs in the clients' namespace. A tun device (lb0, MTU 9001 like the
clients' subnet) takes the clients' packets; each new flow (5-tuple) goes
to a healthy target that is not draining, by hash, and sticks to it; every
packet goes to its target as GWLB sends it: GENEVE on UDP 6081 with the
ENI, attachment and flow cookie options. What a target sends back must
carry its flow's options and fit GWLB's 8500 bytes, or it is dropped and
counted, as GWLB does. Each target's /readyz (port 9090) is asked every
second; two failures in a row take it out, two successes put it back; a
dead target's flows move to the others (target_failover = rebalance).
A target named in DIR/deregister is drained: no new flows, its own go on.

    gwlb_standin.py LOCAL-IP TARGET-IP,... DIR

Writes DIR/lb.json every 200 ms: new flows per target, health, drops.
"""

import fcntl
import hashlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import urllib.request

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PORT = 6081
CLASS = 0x0108
ENI, ATTACHMENT = 0x0E1E000000000001, 0x0A77000000000002
GWLB_MTU = 8500
HEALTH_EVERY, THRESHOLD = 1.0, 2


def flow_of(packet):
    """The 5-tuple of an IPv4 TCP or UDP packet, the client's end first."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    if proto not in (6, 17) or len(packet) < ihl + 4:
        return None
    sport, dport = struct.unpack("!HH", packet[ihl:ihl + 4])
    return (proto, packet[12:16], sport, packet[16:20], dport)


def reversed_flow(packet):
    key = flow_of(packet)
    if key is None:
        return None
    proto, src, sport, dst, dport = key
    return (proto, dst, dport, src, sport)


def header(cookie):
    h = struct.pack("!BBHI", 8, 0, 0x0800, 0)
    h += struct.pack("!HBBQ", CLASS, 1, 2, ENI)
    h += struct.pack("!HBBQ", CLASS, 2, 2, ATTACHMENT)
    h += struct.pack("!HBBI", CLASS, 3, 1, cookie)
    return h


class Balancer:
    def __init__(self, targets, directory):
        self.targets = targets
        self.dir = directory
        self.lock = threading.Lock()
        self.healthy = {t: False for t in targets}
        self.streak = {t: 0 for t in targets}
        self.flows = {}  # 5-tuple -> (target, cookie)
        self.new_flows = {t: 0 for t in targets}
        self.next_cookie = 1
        self.drops = {"no_target": 0, "wrong_options": 0, "too_big": 0}

    def draining(self):
        try:
            with open(os.path.join(self.dir, "deregister")) as f:
                return set(f.read().split())
        except OSError:
            return set()

    def route(self, key):
        """The flow's target and cookie; a new or orphaned flow is placed."""
        with self.lock:
            known = self.flows.get(key)
            if known and self.healthy[known[0]]:
                return known
            open_ = [t for t in self.targets if self.healthy[t] and t not in self.draining()]
            if not open_:
                return None
            digest = hashlib.sha256(repr(key).encode()).digest()
            target = open_[int.from_bytes(digest[:4], "big") % len(open_)]
            cookie = known[1] if known else self.next_cookie
            self.next_cookie += 1
            self.flows[key] = (target, cookie)
            if not known:
                self.new_flows[target] += 1
            return self.flows[key]

    def check(self, target):
        while True:
            try:
                with urllib.request.urlopen(f"http://{target}:9090/readyz", timeout=0.5) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            with self.lock:
                if ok == self.healthy[target]:
                    self.streak[target] = 0
                else:
                    self.streak[target] += 1
                    if self.streak[target] >= THRESHOLD:
                        self.healthy[target] = ok
                        self.streak[target] = 0
            time.sleep(HEALTH_EVERY)

    def report(self):
        while True:
            with self.lock:
                state = {
                    "new_flows": self.new_flows,
                    "healthy": self.healthy,
                    "drops": self.drops,
                }
                text = json.dumps(state)
            tmp = os.path.join(self.dir, "lb.json.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.dir, "lb.json"))
            time.sleep(0.2)


def main(local, targets, directory):
    lb = Balancer(targets.split(","), directory)
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"lb0", IFF_TUN | IFF_NO_PI))
    os.system("ip link set lb0 mtu 9001 up")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((local, PORT))
    for t in lb.targets:
        threading.Thread(target=lb.check, args=(t,), daemon=True).start()
    threading.Thread(target=lb.report, daemon=True).start()
    with open(os.path.join(directory, "lb.ready"), "w"):
        pass
    while True:
        readable, _, _ = select.select([tun, udp], [], [])
        if tun in readable:
            packet = os.read(tun, 65536)
            key = flow_of(packet)
            placed = lb.route(key) if key else None
            if placed is None:
                lb.drops["no_target"] += 1
            elif 28 + 40 + len(packet) > GWLB_MTU:
                lb.drops["too_big"] += 1
            else:
                udp.sendto(header(placed[1]) + packet, (placed[0], PORT))
        if udp in readable:
            data, (sender, _) = udp.recvfrom(65536)
            hlen = 8 + (data[0] & 0x3F) * 4
            packet = data[hlen:]
            key = reversed_flow(packet)
            with lb.lock:
                placed = lb.flows.get(key)
            if placed is None or placed[0] != sender or data[:hlen] != header(placed[1]):
                lb.drops["wrong_options"] += 1
            elif len(data) + 28 > GWLB_MTU:
                lb.drops["too_big"] += 1
            else:
                os.write(tun, packet)


if __name__ == "__main__":
    main(*sys.argv[1:])

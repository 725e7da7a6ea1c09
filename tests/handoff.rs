//! The rollout hand-off (ami/scripts/handoff.sh), IPv4 and IPv6: two
//! gateways running portcullis on one subnet, a client downloading through
//! the old one when its route moves to the new one. With the hand-off
//! started on the new gateway the download completes; without it, the new
//! gateway resets it (the control that shows the test can fail). Root.
#![forbid(unsafe_code)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;
use support::netns::{Netns, require_root};
use support::repo;
use support::wait_until;

const CHUNKS: usize = 12;
const CHUNK: usize = 4096;
const GAP: Duration = Duration::from_millis(250);

struct Site {
    seg: Netns,
    net: Netns,
    client: Netns,
    old: Netns,
    new: Netns,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A veth from `ns` (as `ifname`) onto `fabric`'s bridge.
fn plug(ns: &Netns, ifname: &str, fabric: &Netns, v4: &str, v6: &str) {
    let peer = format!("{}-{ifname}", ns.name.rsplit('-').next().unwrap());
    ns.ip(&[
        "link",
        "add",
        ifname,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        &fabric.name,
    ]);
    fabric.ip(&["link", "set", &peer, "master", "br0", "up"]);
    ns.ip(&["addr", "add", v4, "dev", ifname]);
    ns.ip(&["-6", "addr", "add", v6, "dev", ifname, "nodad"]);
    ns.ip(&["link", "set", ifname, "up"]);
}

fn site() -> Site {
    let id = format!("ho{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("portcullis-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = |n: &str| Netns::new(format!("{id}-{n}"));
    let mut s = Site {
        seg: ns("s"),
        net: ns("n"),
        client: ns("c"),
        old: ns("o"),
        new: ns("w"),
        children: Vec::new(),
        dir,
    };
    // Fixed bridge addresses: a bridge otherwise takes its lowest port's.
    for (fabric, mac) in [(&s.seg, "02:00:00:00:01:01"), (&s.net, "02:00:00:00:01:02")] {
        fabric.ip(&["link", "add", "br0", "address", mac, "type", "bridge"]);
        fabric.ip(&["link", "set", "br0", "up"]);
    }
    s.net.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"]);
    s.net.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:b::1/64",
        "dev",
        "br0",
        "nodad",
    ]);
    s.net.ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"]);
    s.net.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:c::10/128",
        "dev",
        "lo",
        "nodad",
    ]);
    s.net
        .exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    plug(
        &s.client,
        "eth0",
        &s.seg,
        "198.51.100.10/24",
        "2001:db8:a::10/64",
    );
    // A VPC host takes no redirects (its next hop is the VPC's router):
    // neither does this one, or a gateway forwarding on the subnet would
    // move its flows by itself.
    s.client.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.accept_redirects=0",
        "net.ipv4.conf.eth0.accept_redirects=0",
        "net.ipv6.conf.all.accept_redirects=0",
        "net.ipv6.conf.eth0.accept_redirects=0",
    ]);
    for (gw, last) in [(&s.old, "140"), (&s.new, "141")] {
        plug(
            gw,
            "eth0",
            &s.seg,
            &format!("198.51.100.{last}/24"),
            &format!("2001:db8:a::{last}/64"),
        );
        let tail = if last == "140" { "11" } else { "12" };
        plug(
            gw,
            "eth1",
            &s.net,
            &format!("192.0.2.{tail}/24"),
            &format!("2001:db8:b::{tail}/64"),
        );
        gw.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        gw.ip(&["-6", "route", "add", "default", "via", "2001:db8:b::1"]);
        gw.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        // As the AMI sets it: a hand-off forwards out the interface a
        // packet came in on, and must not redirect the client.
        gw.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ]);
        let status = gw
            .command(repo("iptables/portcullis-iptables.sh").to_str().unwrap())
            .arg("apply")
            .env("PRIVATE_CIDRS", "198.51.100.0/24")
            .env("PRIVATE_CIDRS6", "2001:db8:a::/64")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "iptables script");
    }
    let list = s.dir.join("allowlist.txt");
    std::fs::write(&list, "allowed.test\n").unwrap();
    for (gw, tag) in [(&s.old, "old"), (&s.new, "new")] {
        let log = std::fs::File::create(s.dir.join(format!("{tag}.log"))).unwrap();
        let child = gw
            .command(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "run",
                "--verify-dst",
                "off",
                "--metrics-listen",
                "127.0.0.1:9090",
                "--allowlist",
            ])
            .arg(&list)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        s.children.push(child);
    }
    for gw in [&s.old, &s.new] {
        wait_until("portcullis ready", Duration::from_secs(10), || {
            gw.enter(|| TcpStream::connect("127.0.0.1:9090").is_ok())
        });
    }
    s
}

/// A slow download on port 80 of both upstream addresses: a head, then
/// [`CHUNKS`] chunks [`GAP`] apart.
fn serve(net: &Netns) {
    for ip in ["203.0.113.10", "2001:db8:c::10"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), 80);
        let listener = net.enter(move || TcpListener::bind(addr).unwrap());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut head = [0; 1024];
                    let _ = conn.read(&mut head);
                    let len = CHUNKS * CHUNK;
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    );
                    for _ in 0..CHUNKS {
                        if conn.write_all(&[b'x'; CHUNK]).is_err() {
                            return;
                        }
                        std::thread::sleep(GAP);
                    }
                });
            }
        });
    }
}

fn route_client_via(s: &Site, v4: &str, v6: &str) {
    s.client.ip(&["route", "replace", "default", "via", v4]);
    s.client
        .ip(&["-6", "route", "replace", "default", "via", v6]);
}

fn handoff(gw: &Netns, args: &[&str]) {
    let status = gw
        .command(repo("ami/scripts/handoff.sh").to_str().unwrap())
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "handoff.sh {args:?}");
}

/// Downloads from `to` through the old gateway, moving the client's route
/// to the new one after the first chunk (and running `between` then);
/// the body bytes that arrived.
fn download_across_the_move(s: &Site, to: SocketAddr, between: impl FnOnce()) -> usize {
    let mut conn = s.client.enter(move || {
        let c = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    });
    conn.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 65536];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || got.len() < 200 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    between();
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |at| got.len() - at - 4)
}

#[test]
fn a_download_in_flight_survives_the_route_moving_to_a_new_gateway_with_the_hand_off_only() {
    if !require_root() {
        return;
    }
    let s = site();
    serve(&s.net);
    let whole = CHUNKS * CHUNK;
    for (to, family) in [("203.0.113.10:80", "IPv4"), ("[2001:db8:c::10]:80", "IPv6")] {
        let to: SocketAddr = to.parse().unwrap();
        // With the hand-off: the new gateway routes the old flow on.
        route_client_via(&s, "198.51.100.140", "2001:db8:a::140");
        let got = download_across_the_move(&s, to, || {
            route_client_via(&s, "198.51.100.141", "2001:db8:a::141");
            handoff(&s.new, &["start", "198.51.100.140", "2001:db8:a::140"]);
        });
        handoff(&s.new, &["stop"]);
        assert_eq!(got, whole, "{family}: the download with the hand-off");
        // Without it: the new gateway knows nothing of the flow.
        route_client_via(&s, "198.51.100.140", "2001:db8:a::140");
        let cut = download_across_the_move(&s, to, || {
            route_client_via(&s, "198.51.100.141", "2001:db8:a::141");
        });
        assert!(
            cut < whole,
            "{family}: without the hand-off the flow is cut ({cut} bytes)"
        );
    }
    // Stop leaves nothing behind.
    let rules = s.new.command("ip6tables-save").output().unwrap();
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("PORTCULLIS_HANDOFF"));
}

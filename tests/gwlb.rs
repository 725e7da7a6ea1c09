//! End-to-end, in namespaces: portcullis as a Gateway Load Balancer
//! target. A stand-in for GWLB in the client's namespace sends the
//! client's packets to the gateway as GENEVE (tests/support/gwlb.rs); the
//! gateway runs `portcullis run`, `portcullis gwlb` and
//! `GWLB=1 iptables/portcullis-iptables.sh apply`, and nothing else. The
//! proxy decides, pins and audits tunnelled connections exactly as routed
//! ones, every answer goes back behind its flow's options, and a packet of
//! a flow GWLB never sent goes nowhere. Needs root; under CI=true a
//! non-root run fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::client::{http, https, text};
use support::dns::{Answer, DnsServer};
use support::gwlb::StandIn;
use support::netns::{NAMESERVER, RAW_V4, RAW_V6, Topology, WEB_V4, WEB_V6, require_root};
use support::scrape::Scrape;
use support::servers::{TlsServer, http_server, make_certs, recorder};
use support::{addr, ip, wait_until};

const ALLOWLIST: &str = ".example.test\n";
/// The tunnel's metrics, in the gateway's namespace.
const GWLB_ADMIN: &str = "127.0.0.1:9093";

/// `portcullis gwlb` in the gateway's namespace, killed when dropped.
struct Tunnel(Child);

impl Tunnel {
    fn start(t: &Topology) -> Tunnel {
        let log = std::fs::File::create(t.dir.join("gwlb.log")).unwrap();
        let child = t
            .gateway
            .command(env!("CARGO_BIN_EXE_portcullis"))
            .args(["gwlb", "--metrics-listen", GWLB_ADMIN])
            // Documentation addresses for the device, as the tests use no
            // others.
            .args([
                "--device-v4",
                "203.0.113.249/30",
                "--device-v6",
                "2001:db8:6081::1/64",
            ])
            .stderr(log)
            .spawn()
            .unwrap();
        let tunnel = Tunnel(child);
        wait_until("the tunnel serving", Duration::from_secs(10), || {
            tunnel_get(t, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        tunnel
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tunnel_get(t: &Topology, path: &str) -> Option<String> {
    let path = path.to_string();
    t.gateway.enter(move || {
        use std::io::{Read, Write};
        let to: std::net::SocketAddr = GWLB_ADMIN.parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: gwlb\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

fn tunnel_metrics(t: &Topology) -> Scrape {
    let response = tunnel_get(t, "/metrics").expect("the tunnel's /metrics");
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    Scrape::parse(body)
}

/// A topology whose client reaches the gateway only through the stand-in.
fn through_gwlb() -> (Topology, StandIn) {
    let t = Topology::with_rules(&[("GWLB", "1"), ("GWLB_CIDRS", "192.0.2.0/24")]);
    // GWLB's targets sit on jumbo-frame subnets (9001), as on EC2.
    t.client.ip(&["link", "set", "eth0", "mtu", "9001"]);
    t.gateway.ip(&["link", "set", "cli", "mtu", "9001"]);
    let stand_in = StandIn::start(
        &t.client,
        "192.0.2.2:6081".parse().unwrap(),
        "192.0.2.1:6081".parse().unwrap(),
    );
    (t, stand_in)
}

#[test]
fn tunnelled_connections_are_decided_pinned_and_audited_as_routed_ones() {
    if !require_root() {
        return;
    }
    let (mut t, stand_in) = through_gwlb();
    make_certs(&t.dir);
    let _tls4 = TlsServer::start(&t.upstream, &t.dir, false, 443);
    let _tls6 = TlsServer::start(&t.upstream, &t.dir, true, 443);
    let (_web, requests) = http_server(&t.upstream, &[addr(WEB_V4, 80), addr(WEB_V6, 80)]);
    let (attacker, _) = recorder(&t.upstream, &[addr(RAW_V4, 443), addr(RAW_V6, 443)]);
    let dns = DnsServer::start(&[(&t.upstream, addr(NAMESERVER, 53))]);
    dns.set(
        "www.example.test",
        Answer::All(vec![ip(WEB_V4), ip(WEB_V6)], 300),
    );
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);
    let _tunnel = Tunnel::start(&t);

    // Allowed, over IPv4 and IPv6 inside the IPv4 tunnel: the real server
    // (its certificate verifies), even when the client dials another.
    for dialled in [WEB_V4, RAW_V4, WEB_V6, RAW_V6] {
        let out = https(&t, "www.example.test", dialled);
        assert!(
            out.status.success() && text(&out.stdout).contains("s_server"),
            "via {dialled}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        attacker.accepted(),
        0,
        "a spoofed destination was contacted"
    );
    let answer = text(&http(&t, "www.example.test", WEB_V4, "/in").stdout);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(*requests.lock().unwrap(), ["www.example.test /in"]);
    // Refused: an unlisted name gets its 403 back through the tunnel.
    let refused = text(&http(&t, "denied.test", WEB_V4, "/").stdout);
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    // Every answer went back behind its flow's options, none larger than
    // GWLB carries.
    let seen = &stand_in.seen;
    assert!(seen.answered.load(Ordering::SeqCst) > 20);
    assert_eq!(seen.wrong.load(Ordering::SeqCst), 0);
    assert!(seen.largest.load(Ordering::SeqCst) <= 8500 - 28);
    wait_until("the audit records", Duration::from_secs(5), || {
        t.audit_where("name", "www.example.test").len() == 5
    });
    for line in t.audit_where("name", "www.example.test") {
        assert_eq!(line["verdict"], "allow", "{line}");
        let upstream = line["upstream"].as_str().unwrap();
        assert!(
            upstream.starts_with(WEB_V4) || upstream.starts_with(&format!("[{WEB_V6}]")),
            "{line}"
        );
    }
    assert_eq!(t.audit_where("reason", "not_listed").len(), 1);
    // The tunnel publishes its counts each second.
    let packets =
        |m: &Scrape, direction| m.get("portcullis_gwlb_packets_total", &[("direction", direction)]);
    wait_until("the tunnel's counts", Duration::from_secs(5), || {
        let m = tunnel_metrics(&t);
        packets(&m, "from_gwlb") > 20.0 && packets(&m, "to_gwlb") > 20.0
    });
    let m = tunnel_metrics(&t);
    assert_eq!(m.get("portcullis_gwlb_serving", &[]), 1.0);
    for reason in [
        "not_geneve",
        "unknown_flow",
        "table_full",
        "too_big",
        "send_failed",
    ] {
        let dropped = m.get("portcullis_gwlb_dropped_total", &[("reason", reason)]);
        assert_eq!(dropped, 0.0, "{reason}");
    }
}

/// Sends one QUIC-like datagram from the client's port `from` to
/// `WEB_V4:443` and waits for the refusal: whether it came, and when.
fn quic_refused(t: &Topology, from: u16) -> Option<Duration> {
    t.client.enter(move || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", from)).unwrap();
        s.connect(addr(WEB_V4, 443)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let started = std::time::Instant::now();
        s.send(b"\xc0quic initial").unwrap();
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(started.elapsed()),
            _ => None,
        }
    })
}

#[test]
fn quic_is_refused_at_once_through_the_tunnel_and_a_reused_five_tuple_answers_with_its_new_cookie()
{
    if !require_root() {
        return;
    }
    let (mut t, stand_in) = through_gwlb();
    t.start_portcullis(ALLOWLIST, &[]);
    let _tunnel = Tunnel::start(&t);
    // The host's ICMP error about the client's datagram goes back through
    // the tunnel, behind the flow of the datagram it quotes.
    let took = quic_refused(&t, 40_443).expect("QUIC refused with an ICMP error");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The same 5-tuple again, as a new flow with a new cookie: the answer
    // carries the new one (the stand-in counts any other as wrong).
    stand_in.new_flows();
    assert!(quic_refused(&t, 40_443).is_some());
    let seen = &stand_in.seen;
    assert_eq!(seen.answered.load(Ordering::SeqCst), 2);
    assert_eq!(seen.wrong.load(Ordering::SeqCst), 0);
}

#[test]
fn a_packet_of_a_flow_gwlb_never_sent_goes_nowhere_and_is_counted() {
    if !require_root() {
        return;
    }
    let (mut t, stand_in) = through_gwlb();
    t.start_portcullis(ALLOWLIST, &[]);
    let _tunnel = Tunnel::start(&t);
    // The gateway itself sends toward an address behind the device: no
    // flow of GWLB's, so the tunnel has no header to send it with.
    for _ in 0..3 {
        t.gateway.enter(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"not a flow of GWLB's", "203.0.113.250:9")
                .unwrap();
        });
    }
    wait_until("the drops counted", Duration::from_secs(5), || {
        let m = tunnel_metrics(&t);
        m.get(
            "portcullis_gwlb_dropped_total",
            &[("reason", "unknown_flow")],
        ) == 3.0
    });
    let m = tunnel_metrics(&t);
    assert_eq!(
        m.get("portcullis_gwlb_packets_total", &[("direction", "to_gwlb")]),
        0.0
    );
    assert_eq!(stand_in.seen.answered.load(Ordering::SeqCst), 0);
    assert_eq!(stand_in.seen.wrong.load(Ordering::SeqCst), 0);
    // Once a line: the log says why.
    let log = std::fs::read_to_string(t.dir.join("gwlb.log")).unwrap();
    assert_eq!(log.matches("never came from GWLB").count(), 1, "{log}");
}

#[test]
fn a_dead_tunnel_takes_its_target_out_of_service_and_a_draining_proxy_keeps_its_flows() {
    if !require_root() {
        return;
    }
    let (mut t, _stand_in) = through_gwlb();
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(
        ALLOWLIST,
        &["--gwlb-ready", GWLB_ADMIN, "--drain-timeout", "30s"],
    );
    // GWLB's health check asks the proxy's /readyz: not ready without its
    // tunnel, ready with it, and not ready again once it dies.
    assert_eq!(t.admin_status("/readyz"), Some(503));
    let tunnel = Tunnel::start(&t);
    wait_until("ready with its tunnel", Duration::from_secs(5), || {
        t.admin_status("/readyz") == Some(200)
    });
    drop(tunnel);
    wait_until("out of service without it", Duration::from_secs(5), || {
        t.admin_status("/readyz") == Some(503)
    });
    // Its device gone, its clients' answers go nowhere rather than around
    // the load balancer.
    for family in ["-4", "-6"] {
        let out = t
            .gateway
            .command("ip")
            .args([family, "route", "show", "table", "6081"])
            .output()
            .unwrap();
        let routes = text(&out.stdout);
        assert!(routes.starts_with("unreachable default"), "{routes}");
    }
    let _tunnel = Tunnel::start(&t);
    wait_until("back in service", Duration::from_secs(5), || {
        t.admin_status("/readyz") == Some(200)
    });

    // Deregistered, the proxy drains: a connection it serves goes on
    // through the tunnel, which keeps carrying it.
    use std::io::Write;
    let mut s = t.connect(addr(WEB_V4, 80));
    // The server answers with the host and path it was asked for.
    let ask = |s: &mut std::net::TcpStream, path: &str| -> String {
        write!(s, "GET {path} HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
        let end = format!("www.example.test{path}\n");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !text(&got).ends_with(&end) {
            let n = std::io::Read::read(s, &mut chunk).unwrap();
            assert!(n > 0, "closed after {:?}", text(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        text(&got)
    };
    assert!(ask(&mut s, "/before").starts_with("HTTP/1.1 200"));
    t.signal_portcullis(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let during = ask(&mut s, "/during");
    assert!(during.starts_with("HTTP/1.1 200"), "{during}");
}

#[test]
fn a_jumbo_frame_client_moves_100_mib_each_way_intact_within_gwlbs_mtu() {
    if !require_root() {
        return;
    }
    let (mut t, stand_in) = through_gwlb();
    t.start_portcullis(ALLOWLIST, &[]);
    let _tunnel = Tunnel::start(&t);
    let hello = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
    support::transfer::each_way_intact(&t, addr(RAW_V4, 443), hello, 100 << 20);
    // The client's 9001-byte MTU never showed: the MSS both ways kept
    // every packet within what GWLB carries.
    let seen = &stand_in.seen;
    assert_eq!(seen.too_big.load(Ordering::SeqCst), 0);
    assert_eq!(seen.wrong.load(Ordering::SeqCst), 0);
    let largest = seen.largest.load(Ordering::SeqCst);
    assert!(largest <= 8500 - 28, "{largest}");
    // Jumbo frames were used, not 1500-byte ones.
    assert!(largest > 8000, "{largest}");
}

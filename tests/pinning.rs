//! End-to-end, in namespaces, with a real DNS server answering the
//! gateway: `--verify-dst pin`, the default. An allowed name only ever
//! reaches that name's own servers, a spoofed destination is never
//! contacted, and nothing a normal client does (rotating DNS, IPv6, CNAMEs)
//! is refused. Also the destinations the gateway never reaches, and the h2c
//! upgrade. Needs root; under CI=true a non-root run fails instead of
//! skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::alert;
use support::client::{curl, http, https, text};
use support::dns::{Answer, DnsServer, lookup};
use support::netns::{NAMESERVER, RAW_V4, RAW_V6, Topology, WEB_V4, WEB_V6, require_root};
use support::scrape::Scrape;
use support::servers::{Server, TlsServer, find, http_server, make_certs, recorder};
use support::{addr, ip, wait_until};

const TLS12_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/openssl-3.0-tls12-only.bin");
const ALLOWLIST: &str = ".example.test\n";
/// The client's own stub resolver address: the same DNS server, listening
/// on the client's loopback too.
const CLIENT_DNS: &str = "127.0.0.1";

/// A DNS server answering the gateway on the upstream host.
fn dns_for_gateway(t: &Topology) -> DnsServer {
    DnsServer::start(&[(&t.upstream, addr(NAMESERVER, 53))])
}

/// A hello for `name` to `dst:443`, half-closed; what came back.
fn hello_to(t: &Topology, dst: &str, name: &str) -> Vec<u8> {
    t.exchange(addr(dst, 443), &hello::with_server_name(TLS12_HELLO, name))
}

/// The audit records so far for `name`.
fn audited(t: &Topology, name: &str) -> Vec<serde_json::Value> {
    t.audit_where("name", name)
}

#[test]
fn by_default_a_spoofed_destination_is_never_contacted_and_the_client_reaches_the_real_server() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    make_certs(&t.dir);
    let _tls4 = TlsServer::start(&t.upstream, &t.dir, false, 443);
    let _tls6 = TlsServer::start(&t.upstream, &t.dir, true, 443);
    let (_web, requests) = http_server(&t.upstream, &[addr(WEB_V4, 80), addr(WEB_V6, 80)]);
    // The attacker's servers, where the client sends the allowed name.
    let (attacker, _) = recorder(
        &t.upstream,
        &[addr(RAW_V4, 443), addr(RAW_V4, 80), addr(RAW_V6, 443)],
    );
    let dns = dns_for_gateway(&t);
    dns.set(
        "www.example.test",
        Answer::All(vec![ip(WEB_V4), ip(WEB_V6)], 300),
    );
    // No --verify-dst: the default.
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    // `curl --resolve www.example.test:443:ATTACKER`: the client still
    // reaches the real server for the name it asked for (its certificate
    // verifies), over IPv4 and IPv6.
    for dialled in [RAW_V4, WEB_V4, RAW_V6, WEB_V6] {
        let out = https(&t, "www.example.test", dialled);
        assert!(
            out.status.success() && text(&out.stdout).contains("s_server"),
            "via {dialled}: {}",
            text(&out.stderr)
        );
    }
    // `openssl s_client -connect ATTACKER:443 -servername allowed`.
    let s_client = t
        .client
        .command("openssl")
        .args(["s_client", "-connect", &format!("{RAW_V4}:443")])
        .args(["-servername", "www.example.test", "-CAfile", "ca.pem"])
        .args(["-verify_return_error", "-brief"])
        .current_dir(&t.dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        text(&s_client.stderr).contains("Verification: OK"),
        "{}",
        text(&s_client.stderr)
    );
    // Plain HTTP the same way.
    let out = text(&http(&t, "www.example.test", RAW_V4, "/x").stdout);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(*requests.lock().unwrap(), ["www.example.test /x"]);
    assert_eq!(
        attacker.accepted(),
        0,
        "the spoofed destination was contacted"
    );

    // The audit says where each connection really went.
    wait_until("six audit lines", Duration::from_secs(5), || {
        audited(&t, "www.example.test").len() == 6
    });
    for line in audited(&t, "www.example.test") {
        assert_eq!(line["verdict"], "allow", "{line}");
        assert_eq!(line["rule"], ".example.test", "{line}");
        let dst: SocketAddr = line["dst"].as_str().unwrap().parse().unwrap();
        let upstream: SocketAddr = line["upstream"].as_str().unwrap().parse().unwrap();
        let expected = match dst.ip().to_string().as_str() {
            RAW_V4 | WEB_V4 => ip(WEB_V4),
            _ => ip(WEB_V6),
        };
        assert_eq!(upstream.ip(), expected, "{line}");
        assert_eq!(upstream.port(), dst.port(), "{line}");
    }
    let m = Scrape::take(&t);
    assert_eq!(m.get("portcullis_repinned_total", &[("proto", "tls")]), 3.0);
    assert_eq!(
        m.get("portcullis_repinned_total", &[("proto", "http")]),
        1.0
    );
    // One lookup for the name (its A and AAAA queries); every other
    // connection was answered from the cache.
    assert_eq!(
        m.get("portcullis_dns_lookups_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(m.get("portcullis_dns_cache_hits_total", &[]), 5.0);
    assert_eq!(dns.asked("www.example.test"), 2);
}

/// Sends `GET /` for `name` to `dst:80` and reads the answer.
fn get(t: &Topology, dst: IpAddr, name: &str) -> String {
    let mut s = t.connect(SocketAddr::new(dst, 80));
    write!(s, "GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").unwrap();
    read_response(&mut s)
}

/// One response, by its Content-Length (every server here sends one).
fn read_response(s: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = text(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text(&buf[..end + 4 + length]);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return text(&buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn a_rotating_name_is_never_refused_by_pin_where_dns_mode_refuses_it() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    // Four servers for one name, one address per answer, TTL 1 s, as S3
    // answers: the client and the gateway ask the same server and get
    // different addresses.
    let v4 = [
        "203.0.113.31",
        "203.0.113.32",
        "203.0.113.33",
        "203.0.113.34",
    ];
    let v6 = ["2001:db8:3::31", "2001:db8:3::32"];
    for a in v4 {
        t.upstream
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    for a in v6 {
        t.upstream.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    let all: Vec<SocketAddr> = v4.iter().chain(&v6).map(|a| addr(a, 80)).collect();
    let (_web, _) = http_server(&t.upstream, &all);
    let dns = DnsServer::start(&[
        (&t.upstream, addr(NAMESERVER, 53)),
        (&t.client, addr(CLIENT_DNS, 53)),
    ]);
    let name = "bucket.s3.example.test";
    let addresses: Vec<IpAddr> = v4.iter().chain(&v6).map(|a| ip(a)).collect();
    dns.set(name, Answer::Rotate(addresses.clone(), 1));
    let client_dns = addr(CLIENT_DNS, 53);

    // Each connection: the client resolves the name, then dials what it
    // was told, for a while so the gateway's answers expire and rotate too.
    let run = |t: &Topology, count: usize, v6: bool| -> (usize, usize) {
        let (mut served, mut refused) = (0, 0);
        for i in 0..count {
            let told = lookup(&t.client, client_dns, name, v6);
            assert_eq!(told.len(), 1, "one address per answer");
            let answer = get(t, told[0], name);
            if answer.starts_with("HTTP/1.1 200") {
                served += 1;
            } else {
                assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
                refused += 1;
            }
            if i % 4 == 3 {
                std::thread::sleep(Duration::from_millis(400));
            }
        }
        (served, refused)
    };

    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);
    assert_eq!(run(&t, 36, false), (36, 0), "pin refused a rotating name");
    assert_eq!(run(&t, 12, true), (12, 0), "pin refused an IPv6 client");
    // Every connection went to one of the name's servers.
    for line in audited(&t, name) {
        let upstream: SocketAddr = line["upstream"].as_str().unwrap().parse().unwrap();
        assert!(addresses.contains(&upstream.ip()), "{line}");
    }
    t.stop_portcullis(nix::sys::signal::Signal::SIGINT, Duration::from_secs(5));

    // The same clients under `dns`: the first connection is refused, as
    // the gateway's answer named another server than the client's.
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &["--verify-dst", "dns"]);
    let (served, refused) = run(&t, 36, false);
    eprintln!("--verify-dst dns: {served} served, {refused} refused of 36");
    assert!(
        refused >= 1,
        "dns mode refused none: the test shows nothing"
    );
}

#[test]
fn names_that_do_not_resolve_are_refused_fast_and_cnames_resolve_as_a_client_would() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (attacker, _) = recorder(&t.upstream, &[addr(RAW_V4, 443), addr(RAW_V4, 80)]);
    let (edge, seen) = recorder(&t.upstream, &[addr(WEB_V4, 443)]);
    let mut dns = dns_for_gateway(&t);
    // A CNAME chain out of the list's domain: the target need not be listed.
    dns.set(
        "assets.example.test",
        Answer::Alias("assets.cdn.test".into()),
    );
    dns.set("assets.cdn.test", Answer::Alias("edge7.cdn.test".into()));
    dns.set("edge7.cdn.test", Answer::All(vec![ip(WEB_V4)], 60));
    dns.set("v6only.example.test", Answer::All(vec![ip(WEB_V6)], 60));
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    // The chain is followed to its addresses: pinned to the edge server.
    let answer = hello_to(&t, RAW_V4, "assets.example.test");
    assert!(answer.is_empty(), "forwarded, not refused: {answer:?}");
    wait_until("the hello at the edge", Duration::from_secs(5), || {
        seen.lock().unwrap().len() == 1
    });
    assert_eq!(edge.accepted(), 1);

    // NXDOMAIN: refused at once, with a reason of its own, TLS and HTTP.
    let started = Instant::now();
    assert_eq!(
        hello_to(&t, RAW_V4, "nowhere.example.test"),
        alert::ACCESS_DENIED
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let answer = text(&http(&t, "nowhere.example.test", RAW_V4, "/").stdout);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("could not be resolved"), "{answer}");

    // The resolver dies: a name it never answered is refused within the
    // lookup's bound, never forwarded, and the gateway does not hang.
    dns.stop();
    let started = Instant::now();
    assert_eq!(
        hello_to(&t, RAW_V4, "www.example.test"),
        alert::ACCESS_DENIED
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "waited {took:?} on a dead resolver"
    );
    // A name already known is still served from the cache meanwhile.
    assert!(hello_to(&t, RAW_V4, "assets.example.test").is_empty());
    assert_eq!(attacker.accepted(), 0, "an unresolved name was forwarded");

    wait_until("the refusals in the audit", Duration::from_secs(5), || {
        t.audit_where("reason", "unresolvable").len() == 3
    });
    let m = Scrape::take(&t);
    for (proto, n) in [("tls", 2.0), ("http", 1.0)] {
        let labels = [
            ("policy", "default"),
            ("proto", proto),
            ("reason", "unresolvable"),
        ];
        assert_eq!(m.get("portcullis_denied_total", &labels), n, "{proto}");
    }
    assert_eq!(
        m.get("portcullis_dns_lookups_total", &[("result", "nxdomain")]),
        1.0
    );
    let failed = m.get("portcullis_dns_lookups_total", &[("result", "timeout")])
        + m.get("portcullis_dns_lookups_total", &[("result", "error")]);
    assert_eq!(failed, 1.0);
    t.stop_portcullis(nix::sys::signal::Signal::SIGINT, Duration::from_secs(5));

    // Monitor mode forwards what does not resolve, as before, and says so.
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &["--mode", "monitor"]);
    assert!(hello_to(&t, RAW_V4, "nowhere.example.test").is_empty());
    wait_until("the forwarded hello", Duration::from_secs(5), || {
        attacker.accepted() == 1
    });
    wait_until("its audit line", Duration::from_secs(5), || {
        t.audit()
            .iter()
            .any(|r| r["verdict"] == "allow" && r["would_deny"] == "unresolvable")
    });
}

#[test]
fn a_kept_alive_connection_never_turns_to_another_hosts_servers() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_web, web_log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let (_other, other_log) = http_server(&t.upstream, &[addr(RAW_V4, 80)]);
    let dns = dns_for_gateway(&t);
    dns.set("a.example.test", Answer::All(vec![ip(WEB_V4)], 60));
    // A shared CDN address serves both names.
    dns.set(
        "c.example.test",
        Answer::All(vec![ip(RAW_V4), ip(WEB_V4)], 60),
    );
    dns.set("b.example.test", Answer::All(vec![ip(RAW_V4)], 60));
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    let mut s = t.connect(addr(WEB_V4, 80));
    let mut ask = |host: &str| -> String {
        write!(s, "GET /{host} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        read_response(&mut s)
    };
    assert!(ask("a.example.test").starts_with("HTTP/1.1 200"));
    assert!(ask("c.example.test").starts_with("HTTP/1.1 200"));
    let refused = ask("b.example.test");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("b.example.test"), "{refused}");
    assert_eq!(
        *web_log.lock().unwrap(),
        [
            "a.example.test /a.example.test",
            "c.example.test /c.example.test"
        ]
    );
    assert!(other_log.lock().unwrap().is_empty());
    wait_until(
        "the connection's audit line",
        Duration::from_secs(5),
        || !audited(&t, "b.example.test").is_empty(),
    );
    let line = &audited(&t, "b.example.test")[0];
    assert_eq!(line["reason"], "spoofed", "{line}");
}

#[test]
fn destinations_the_gateway_never_reaches_are_refused_in_every_mode() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    // A metadata service beyond the gateway, and the gateway's other side.
    t.upstream
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    t.gateway
        .ip(&["route", "add", "169.254.169.254/32", "via", "198.51.100.2"]);
    let (imds, _) = recorder(&t.upstream, &[addr("169.254.169.254", 80)]);
    let (attacker, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    let dns = dns_for_gateway(&t);
    // DNS rebinding: allowed names whose addresses are the gateway's own
    // or link-local.
    dns.set(
        "rebind.example.test",
        Answer::All(vec![ip("127.0.0.1")], 60),
    );
    dns.set(
        "own.example.test",
        Answer::All(vec![ip("198.51.100.1")], 60),
    );
    dns.set(
        "imds.example.test",
        Answer::All(vec![ip("169.254.169.254")], 60),
    );

    for extra in [&[][..], &["--mode", "monitor", "--verify-dst", "off"][..]] {
        t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, extra);
        let answer = text(
            &http(
                &t,
                "www.example.test",
                "169.254.169.254",
                "/latest/meta-data/",
            )
            .stdout,
        );
        assert!(answer.starts_with("HTTP/1.1 403"), "{extra:?}: {answer}");
        // The gateway's address on its upstream side: the gateway itself,
        // refused as a loop before its hello is read, in every mode.
        assert_eq!(
            hello_to(&t, "198.51.100.1", "www.example.test"),
            alert::ACCESS_DENIED,
            "{extra:?}"
        );
        t.stop_portcullis(nix::sys::signal::Signal::SIGINT, Duration::from_secs(5));
    }
    // Pinning never takes a name to a forbidden address either.
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);
    for name in [
        "rebind.example.test",
        "own.example.test",
        "imds.example.test",
    ] {
        assert_eq!(hello_to(&t, RAW_V4, name), alert::ACCESS_DENIED, "{name}");
    }
    assert_eq!(imds.accepted(), 0, "the metadata service was reached");
    assert_eq!(attacker.accepted(), 0);
    wait_until("the refusals in the audit", Duration::from_secs(5), || {
        t.audit_where("reason", "forbidden_dst").len() == 5
            && t.audit_where("reason", "loop").len() == 2
    });
}

#[test]
fn an_h2c_upgrade_never_reaches_the_server_and_the_request_is_served_as_http_1() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let sink = heads.clone();
    let _server = Server::start(&t.upstream, &[addr(WEB_V4, 80)], move |mut s| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while find(&buf, b"\r\n\r\n").is_none() {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        sink.lock().unwrap().push(text(&buf));
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    });
    let dns = dns_for_gateway(&t);
    dns.set("www.example.test", Answer::All(vec![ip(WEB_V4)], 60));
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    // curl offers h2c on plain HTTP with --http2.
    let out = curl(
        &t,
        &[
            "--http2",
            "-i",
            "--resolve",
            &format!("www.example.test:80:{WEB_V4}"),
            "http://www.example.test/h2c",
        ],
    );
    let answer = text(&out.stdout);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}{}",
        text(&out.stderr)
    );
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("get /h2c http/1.1\r\n"), "{head}");
    assert!(
        !head.contains("h2c\r\n") && !head.contains("http2-settings"),
        "{head}"
    );
    assert!(!head.contains("upgrade"), "{head}");
}

#[test]
fn an_address_added_to_the_gateway_is_never_connected_to_not_even_at_once() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    // Each name's real server, beyond the gateway, until the gateway takes
    // its address (a secondary IP, an ENI attached, a hand-off address).
    let added: Vec<String> = (0..4).map(|i| format!("203.0.113.{}", 77 + i)).collect();
    for a in &added {
        t.upstream
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    let real: Vec<SocketAddr> = added.iter().map(|a| addr(a, 443)).collect();
    let (real_server, _) = recorder(&t.upstream, &real);
    // A listener on the gateway itself, on every address it will have.
    let (on_gateway, _) = recorder(&t.gateway, &[addr("::", 443)]);
    let dns = dns_for_gateway(&t);
    for (i, a) in added.iter().enumerate() {
        dns.set(
            &format!("fresh{i}.example.test"),
            Answer::All(vec![ip(a)], 300),
        );
    }
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    for (i, a) in added.iter().enumerate() {
        let name = format!("fresh{i}.example.test");
        // Served while the address is the real server's, so the name's
        // answer is cached: the next decision waits on nothing.
        assert!(hello_to(&t, a, &name).is_empty(), "{name}");
        t.gateway
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        // At once: a client pinned to the name's address, and one that
        // dials it (addressed to the gateway now: a loop).
        let started = Instant::now();
        assert_eq!(hello_to(&t, RAW_V4, &name), alert::ACCESS_DENIED, "{name}");
        assert_eq!(hello_to(&t, a, &name), alert::ACCESS_DENIED, "{name}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    wait_until("the real servers' hellos", Duration::from_secs(5), || {
        real_server.accepted() == added.len()
    });
    assert_eq!(on_gateway.accepted(), 0, "the gateway connected to itself");
    // The listener would have seen it: the gateway reaches it at the
    // address it just took.
    let first: SocketAddr = addr(&added[0], 443);
    t.gateway.enter(move || {
        std::net::TcpStream::connect_timeout(&first, Duration::from_secs(1)).unwrap()
    });
    wait_until("the sanity connection", Duration::from_secs(5), || {
        on_gateway.accepted() == 1
    });
    wait_until("the refusals in the audit", Duration::from_secs(5), || {
        t.audit_where("reason", "forbidden_dst").len() == added.len()
            && t.audit_where("reason", "loop").len() == added.len()
    });
    for line in t.audit_where("reason", "forbidden_dst") {
        assert_eq!(line["upstream"], serde_json::Value::Null, "{line}");
    }
}

#[test]
fn the_broadcast_network_and_anycast_addresses_of_the_gateways_prefixes_are_refused_at_once() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    // The gateway's interfaces have no `brd` (the topology gives none),
    // and forwarding is on, so it answers for each /64's anycast address.
    let dns = dns_for_gateway(&t);
    let hostile = [
        ("bcast.example.test", "198.51.100.255"),
        ("network.example.test", "198.51.100.0"),
        ("client-bcast.example.test", "192.0.2.255"),
        ("anycast.example.test", "2001:db8:2::"),
        ("client-anycast.example.test", "2001:db8:1::"),
    ];
    for (name, a) in hostile {
        dns.set(name, Answer::All(vec![ip(a)], 300));
    }
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);
    // The namespaces' first connection of each family waits out their
    // neighbour discovery (a second on a fresh IPv6 link): not timed.
    for dialled in [RAW_V4, RAW_V6] {
        assert_eq!(hello_to(&t, dialled, "unlisted.test"), alert::ACCESS_DENIED);
    }
    for (name, a) in hostile {
        let dialled = if ip(a).is_ipv4() { RAW_V4 } else { RAW_V6 };
        let started = Instant::now();
        assert_eq!(hello_to(&t, dialled, name), alert::ACCESS_DENIED, "{name}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{name}: {took:?}");
    }
    wait_until("the refusals in the audit", Duration::from_secs(5), || {
        t.audit_where("reason", "forbidden_dst").len() == hostile.len()
    });
    assert!(t.audit_where("reason", "connect").is_empty());
}

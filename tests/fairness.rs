//! End-to-end, in namespaces: one client cannot take the gateway from the
//! others. A client at its per-source cap is refused with a TLS alert or a
//! 503 while another client is served; IPv6 clients count by /64; a flow
//! whose one side has closed is reaped at the half-closed timeout; and a
//! kept-alive HTTP connection gives its buffers back between requests.
//! Needs root; under CI=true a non-root run fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::alert;
use support::netns::{CLIENT_V4, RAW_V4, Topology, WEB_V4, WEB_V6, require_root};
use support::scrape::Scrape;
use support::servers::{Server, find, http_server};
use support::{addr, ip, raise_fd_limit, read_all, read_response, wait_until};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const ALLOWLIST: &str = ".example.test\n";

/// Opens a kept-alive HTTP connection from `src` to `to`, asks for `path`
/// on www.example.test, and returns it open with the response.
fn get_kept_alive(t: &Topology, src: IpAddr, to: SocketAddr, path: &str) -> (TcpStream, String) {
    let mut s = t.connect_from(src, to);
    write!(s, "GET {path} HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
    let response = String::from_utf8_lossy(&read_response(&mut s)).into_owned();
    (s, response)
}

#[test]
fn a_client_at_its_cap_is_refused_politely_while_another_client_is_served() {
    if !require_root() {
        return;
    }
    const CAP: usize = 4;
    let mut t = Topology::new();
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80), addr(WEB_V6, 80)]);
    let second = "192.0.2.3";
    t.client
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    t.start_portcullis(
        ALLOWLIST,
        &[
            "--max-connections",
            "100",
            "--max-connections-per-source",
            "4",
        ],
    );
    let first = ip(CLIENT_V4);
    let held: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let (s, response) = get_kept_alive(&t, first, addr(WEB_V4, 80), &format!("/{i}"));
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            s
        })
        .collect();

    // The fifth from the same client: a 503 on the HTTP port, an alert on
    // the TLS port, not a bare reset.
    let (_, over) = get_kept_alive(&t, first, addr(WEB_V4, 80), "/over");
    assert!(over.starts_with("HTTP/1.1 503 "), "{over}");
    assert!(
        over.contains("this client holds as many connections"),
        "{over}"
    );
    let mut tls = t.connect_from(first, addr(RAW_V4, 443));
    tls.write_all(CURL_HELLO).unwrap();
    assert_eq!(read_all(&mut tls), alert::INTERNAL_ERROR);

    // Another client is served meanwhile.
    let (_other, response) = get_kept_alive(&t, ip(second), addr(WEB_V4, 80), "/other");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let scrape = Scrape::take(&t);
    let rejections = "portcullis_connection_limit_rejections_total";
    assert_eq!(scrape.get(rejections, &[("limit", "per_source")]), 2.0);
    assert_eq!(scrape.get(rejections, &[("limit", "total")]), 0.0);
    assert!(
        t.log().contains(&format!(
            "client {CLIENT_V4} holds its --max-connections-per-source"
        )),
        "{}",
        t.log()
    );

    // Its slots come back as its connections end.
    drop(held);
    wait_until(
        "the client's slots to free",
        Duration::from_secs(10),
        || {
            get_kept_alive(&t, first, addr(WEB_V4, 80), "/after")
                .1
                .starts_with("HTTP/1.1 200")
        },
    );

    // IPv6: a host has its whole /64, so another address of it is the
    // same client.
    let v6: Vec<IpAddr> = (0xa..=0xe)
        .map(|i| ip(&format!("2001:db8:1::{i:x}")))
        .collect();
    for a in &v6 {
        t.client
            .ip(&["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]);
    }
    let held: Vec<TcpStream> = v6[..CAP]
        .iter()
        .map(|a| {
            let (s, response) = get_kept_alive(&t, *a, addr(WEB_V6, 80), "/v6");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            s
        })
        .collect();
    let (_, over) = get_kept_alive(&t, v6[CAP], addr(WEB_V6, 80), "/v6-over");
    assert!(over.starts_with("HTTP/1.1 503 "), "{over}");
    // The IPv4 clients were not counted with the IPv6 ones.
    let (_v4, response) = get_kept_alive(&t, first, addr(WEB_V4, 80), "/v4");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    drop(held);
}

#[test]
fn a_flow_whose_server_has_closed_is_reaped_at_the_half_closed_timeout() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    // Reads the hello, sends its FIN at once, and keeps its socket open.
    let _server = Server::start(&t.upstream, &[addr(RAW_V4, 443)], |mut s| {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.shutdown(std::net::Shutdown::Write);
        std::thread::sleep(Duration::from_secs(30));
    });
    t.start_portcullis(ALLOWLIST, &["--half-closed-timeout", "2s"]);
    let hello = hello::with_server_name(CURL_HELLO, "www.example.test");
    let mut s = t.connect(addr(RAW_V4, 443));
    let start = Instant::now();
    s.write_all(&hello).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the server's FIN is passed on");
    // The client stays idle with its side open; the gateway closes the
    // flow at the half-closed timeout, not at the 15-minute idle timeout.
    wait_until(
        "the half-closed flow's record",
        Duration::from_secs(15),
        || !t.audit_where("reason", "half_closed").is_empty(),
    );
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(2), "reaped after {took:?}");
    let records = t.audit_where("reason", "half_closed");
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(
        (r["verdict"].as_str(), r["name"].as_str()),
        (Some("error"), Some("www.example.test"))
    );
    assert_eq!(r["bytes_up"], hello.len());
    let active = Scrape::take(&t).get("portcullis_active_connections", &[("proto", "tls")]);
    assert_eq!(active, 0.0);
    drop(s);
}

#[test]
fn an_idle_kept_alive_http_connection_holds_a_few_kib_after_a_large_response() {
    if !require_root() {
        return;
    }
    const CONNECTIONS: usize = 1_000;
    const BODY: usize = 256 * 1024;
    /// The stated bound (README): what an idle kept-alive HTTP connection
    /// costs the gateway after a large response. Measured: 6 to 8 KiB (its
    /// tasks, channels and registrations; no buffer), the gateway's RSS
    /// moving in steps of 2 MiB, 2 KiB a connection here. Before buffers
    /// were given back between messages: 76 KiB.
    const KIB_PER_IDLE: u64 = 12;
    raise_fd_limit(CONNECTIONS as u64 + 1_000);
    let mut t = Topology::new();
    // A keep-alive server that answers every request with BODY bytes.
    let _server = Server::start(&t.upstream, &[addr(WEB_V4, 80)], |mut s| {
        let body = vec![b'x'; BODY];
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                buf.drain(..end + 4);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
                if s.write_all(head.as_bytes()).is_err() || s.write_all(&body).is_err() {
                    return;
                }
                continue;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    t.start_portcullis(
        ALLOWLIST,
        &[
            "--max-connections",
            "5000",
            "--max-connections-per-source",
            "5000",
        ],
    );
    let client = ip(CLIENT_V4);
    let fetch = |path: &str| {
        let (s, response) = get_kept_alive(&t, client, addr(WEB_V4, 80), path);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{}",
            &response[..80.min(response.len())]
        );
        assert!(response.len() > BODY, "the whole body arrived");
        s
    };
    // Warm up: the workers' runtimes, buffers and allocator caches.
    let warm: Vec<TcpStream> = (0..50).map(|_| fetch("/warm")).collect();
    drop(warm);
    std::thread::sleep(Duration::from_secs(1));
    let before = t.portcullis_rss_kib();
    let idle: Vec<TcpStream> = (0..CONNECTIONS).map(|_| fetch("/large")).collect();
    // Freed pages go back to the system a moment after they are freed.
    std::thread::sleep(Duration::from_secs(2));
    let held = t.portcullis_rss_kib().saturating_sub(before);
    let per = held as f64 / CONNECTIONS as f64;
    eprintln!("{per:.1} KiB per idle kept-alive HTTP connection ({held} KiB for {CONNECTIONS})");
    assert!(
        held <= CONNECTIONS as u64 * KIB_PER_IDLE,
        "{held} KiB for {CONNECTIONS} idle kept-alive connections ({per:.1} each)"
    );
    // They are still alive: each answers a second request.
    for mut s in idle.into_iter().take(10) {
        write!(s, "GET /again HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
        let again = read_response(&mut s);
        assert!(again.starts_with(b"HTTP/1.1 200"));
    }
}

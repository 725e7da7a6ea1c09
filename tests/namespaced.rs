//! End-to-end: a client namespace whose default route is a gateway
//! namespace running portcullis behind the shipped iptables rules, and an
//! upstream namespace with real servers. Needs root; under CI=true a
//! non-root run fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use support::alert;
use support::client::{http, https, text};
use support::netns::{RAW_V4, RAW_V6, Topology, WEB_V4, WEB_V6, require_root};
use support::servers::{TlsServer, find, http_server, make_certs, recorder};
use support::{addr, read_all, wait_until};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const CHROMIUM_HELLO: &[u8] =
    include_bytes!("../testdata/clienthellos/chromium-156-x25519mlkem768.bin");
const ALLOWLIST: &str = "# test list\n.example.test\nexact.allowed.test\n";

fn tls_allows_listed_and_refuses_unlisted(v6: bool) {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    make_certs(&t.dir);
    let (web, raw) = if v6 {
        (WEB_V6, RAW_V6)
    } else {
        (WEB_V4, RAW_V4)
    };
    let _tls = TlsServer::start(&t.upstream, &t.dir, v6, 443);
    let (raw_server, _) = recorder(&t.upstream, &[addr(raw, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let ok = https(&t, "www.example.test", web);
    assert!(
        ok.status.success(),
        "allowed name failed: {}",
        text(&ok.stderr)
    );
    assert!(
        text(&ok.stdout).contains("s_server"),
        "the real TLS server answered"
    );
    let exact = https(&t, "exact.allowed.test", web);
    assert!(
        exact.status.success(),
        "exact entry allowed: {}",
        text(&exact.stderr)
    );

    for denied in [
        "blocked.invalid",
        "notexample.test",
        "example.test.evil.invalid",
        "www.allowed.test",
    ] {
        let out = https(&t, denied, raw);
        assert!(!out.status.success(), "{denied} must be refused");
        assert!(
            text(&out.stderr).contains("access denied"),
            "{denied}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        raw_server.accepted(),
        0,
        "denied connections never reach upstream"
    );
}

#[test]
fn tls_allows_listed_and_refuses_unlisted_ipv4() {
    tls_allows_listed_and_refuses_unlisted(false);
}

#[test]
fn tls_allows_listed_and_refuses_unlisted_ipv6() {
    tls_allows_listed_and_refuses_unlisted(true);
}

fn http_allows_listed_and_refuses_unlisted(v6: bool) {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let web = if v6 { WEB_V6 } else { WEB_V4 };
    let (server, log) = http_server(&t.upstream, &[addr(web, 80)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let ok = http(&t, "www.example.test", web, "/hello");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let body = text(&ok.stdout);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("www.example.test/hello\n"), "{body}");

    for denied in ["blocked.invalid", "notexample.test"] {
        let out = http(&t, denied, web, "/secret");
        let body = text(&out.stdout);
        assert!(
            body.starts_with("HTTP/1.1 403 Forbidden"),
            "{denied}: {body}"
        );
        assert!(body.contains(denied), "the refusal names the host: {body}");
        assert!(
            body.contains("not on this gateway's allowlist"),
            "and the reason: {body}"
        );
    }
    assert_eq!(*log.lock().unwrap(), ["www.example.test /hello"]);
    assert_eq!(server.accepted(), 1, "denied requests never reach upstream");
}

#[test]
fn http_allows_listed_and_refuses_unlisted_ipv4() {
    http_allows_listed_and_refuses_unlisted(false);
}

#[test]
fn http_allows_listed_and_refuses_unlisted_ipv6() {
    http_allows_listed_and_refuses_unlisted(true);
}

#[test]
fn large_hello_in_three_records_sent_as_five_delayed_writes_arrives_byte_exact() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let mut sent = hello::large_hello_in_three_records(CURL_HELLO);
    assert!(sent.len() > 15_000);
    sent.extend_from_slice(b"bytes after the hello");
    let mut s = t.connect(addr(RAW_V4, 443));
    for part in sent.chunks(sent.len().div_ceil(5)) {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    s.shutdown(Shutdown::Write).unwrap();
    wait_until(
        "upstream to see the stream end",
        Duration::from_secs(10),
        || !seen.lock().unwrap().is_empty(),
    );
    assert!(
        seen.lock().unwrap()[0] == sent,
        "upstream got exactly what the client sent"
    );
}

#[test]
fn chromium_post_quantum_hello_split_across_segments_is_allowed() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);
    let mut s = t.connect(addr(RAW_V4, 443));
    s.set_nodelay(true).unwrap();
    let (first, second) = CHROMIUM_HELLO.split_at(1400);
    s.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(second).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    wait_until("upstream to see the hello", Duration::from_secs(10), || {
        !seen.lock().unwrap().is_empty()
    });
    assert!(seen.lock().unwrap()[0] == CHROMIUM_HELLO);
}

#[test]
fn moves_100_mib_each_way_intact() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    t.start_portcullis(ALLOWLIST, &[]);
    support::transfer::each_way_intact(&t, addr(RAW_V4, 443), CURL_HELLO, 100 << 20);
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let _server = support::servers::Server::start(&t.upstream, &[addr(RAW_V4, 443)], |mut s| {
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        // Only after the client's half-close does the server answer.
        s.write_all(format!("got {} bytes", all.len()).as_bytes())
            .unwrap();
    });
    t.start_portcullis(ALLOWLIST, &[]);
    let mut s = t.connect(addr(RAW_V4, 443));
    s.write_all(CURL_HELLO).unwrap();
    s.write_all(b"ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        text(&read_all(&mut s)),
        format!("got {} bytes", CURL_HELLO.len() + 4)
    );
}

/// Reads one `Content-Length` response from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = text(&buf[..end]);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.parse().unwrap());
            if buf.len() >= end + 4 + len {
                let response = text(&buf[..end + 4 + len]);
                buf.drain(..end + 4 + len);
                assert!(buf.is_empty(), "one response at a time");
                return response;
            }
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-response: {}", text(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn keep_alive_request_to_a_denied_host_never_reaches_upstream() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let mut s = t.connect(addr(WEB_V4, 80));
    s.write_all(b"GET /first HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).ends_with("www.example.test/first\n"));
    s.write_all(b"GET /second HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).ends_with("api.example.test/second\n"));
    s.write_all(b"GET /steal HTTP/1.1\r\nHost: blocked.invalid\r\n\r\n")
        .unwrap();
    let refused = text(&read_all(&mut s));
    assert!(refused.starts_with("HTTP/1.1 403 Forbidden"), "{refused}");
    assert!(refused.contains("blocked.invalid"));
    assert_eq!(
        *log.lock().unwrap(),
        ["www.example.test /first", "api.example.test /second"]
    );
}

#[test]
fn pipelined_request_to_a_denied_host_is_refused_after_earlier_answers() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let mut s = t.connect(addr(WEB_V4, 80));
    let body = "x".repeat(10_000);
    let pipelined = format!(
        "POST /upload HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: {}\r\n\r\n{body}\
         GET /chunked HTTP/1.1\r\nHost: www.example.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
         GET /steal HTTP/1.1\r\nHost: blocked.invalid\r\n\r\n",
        body.len()
    );
    s.write_all(pipelined.as_bytes()).unwrap();
    let all = text(&read_all(&mut s));
    let first = all.find("www.example.test/upload\n").expect("first answer");
    let second = all
        .find("www.example.test/chunked\n")
        .expect("second answer");
    let refusal = all.find("HTTP/1.1 403 Forbidden").expect("refusal");
    assert!(
        first < second && second < refusal,
        "answers in order, refusal last: {all}"
    );
    assert_eq!(
        *log.lock().unwrap(),
        ["www.example.test /upload", "www.example.test /chunked"]
    );
}

#[test]
fn upgrade_switches_to_plain_forwarding_only_after_101() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let _server = support::servers::Server::start(&t.upstream, &[addr(WEB_V4, 80)], |mut s| {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while find(&got, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .unwrap();
        // Echo whatever follows: not HTTP any more.
        got.drain(..find(&got, b"\r\n\r\n").unwrap() + 4);
        s.write_all(&got).unwrap();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    });
    t.start_portcullis(ALLOWLIST, &[]);
    let mut s = t.connect(addr(WEB_V4, 80));
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: ws.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).unwrap();
    assert!(
        text(&head[..n]).starts_with("HTTP/1.1 101"),
        "{}",
        text(&head[..n])
    );
    // Binary frames that are no HTTP request pass through untouched.
    let frame = b"\x82\x05\x00\xffGET / HTTP/1.1\r\nHost: blocked.invalid\r\n\r\n";
    s.write_all(frame).unwrap();
    let mut echo = vec![0u8; frame.len()];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(echo, frame);
}

#[test]
fn refuses_hellos_without_sni_and_bytes_that_are_not_tls() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);

    let message = hello::handshake_message(CURL_HELLO);
    let at = find(&message, b"www.example.test").unwrap() - 9;
    let mut no_sni = message.clone();
    no_sni[at + 1] = 0x99; // the server_name extension becomes an unknown one
    let cases: [(&str, Vec<u8>, [u8; 7]); 3] = [
        (
            "no SNI",
            hello::into_records(&no_sni, &[]),
            alert::ACCESS_DENIED,
        ),
        (
            "plain HTTP on 443",
            b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n".to_vec(),
            alert::DECODE_ERROR,
        ),
        ("garbage", vec![0x42; 64], alert::DECODE_ERROR),
    ];
    for (what, bytes, alert) in cases {
        let mut s = t.connect(addr(RAW_V4, 443));
        s.write_all(&bytes).unwrap();
        assert_eq!(read_all(&mut s), alert, "{what}");
    }
    let mut ip_literal = t.connect(addr(RAW_V4, 443));
    let mut with_ip = message.clone();
    with_ip[at + 9..at + 25].copy_from_slice(b"0000000192.0.2.1");
    ip_literal
        .write_all(&hello::into_records(&with_ip, &[]))
        .unwrap();
    assert_eq!(
        read_all(&mut ip_literal),
        alert::ACCESS_DENIED,
        "IP literal SNI"
    );
    // Larger than the 16 KiB cap: refused as soon as the size is declared.
    let huge = hello::with_filler_extension(&message, 20_000);
    let huge = hello::into_records(&huge, &[8_000, 16_000]);
    let mut too_large = t.connect(addr(RAW_V4, 443));
    too_large.write_all(&huge[..8_005]).unwrap();
    assert_eq!(read_all(&mut too_large), alert::DECODE_ERROR, "too large");
    assert_eq!(
        server.accepted(),
        0,
        "refused connections never reach upstream"
    );
}

/// A client that names an allowed host but sends the bytes to the gateway
/// itself is refused as a loop, before its hello is read, on either
/// family and on the gateway's other link too.
#[test]
fn a_connection_addressed_to_the_gateway_itself_is_refused_as_a_loop() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    t.start_portcullis(ALLOWLIST, &[]);
    let hello = hello::into_records(&hello::handshake_message(CURL_HELLO), &[]);
    let own = [
        "192.0.2.1",
        "2001:db8:1::1",
        "198.51.100.1",
        "2001:db8:2::1",
    ];
    for ip in own {
        assert_eq!(
            t.exchange(addr(ip, 443), &hello),
            alert::ACCESS_DENIED,
            "to {ip}"
        );
    }
    wait_until("the loops' audit records", Duration::from_secs(5), || {
        t.audit_where("reason", "loop").len() == own.len()
    });
    for record in t.audit_where("reason", "loop") {
        assert!(
            own.iter()
                .any(|ip| record["dst"].as_str().unwrap().contains(ip)),
            "{record}"
        );
    }
}

#[test]
fn idle_connections_do_not_stop_a_normal_client_and_close_after_the_hello_timeout() {
    if !require_root() {
        return;
    }
    const IDLE: usize = 300;
    let mut t = Topology::new();
    let (server, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let (raw, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--hello-timeout", "2s"]);

    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            let (ip, port) = if i % 2 == 0 {
                (RAW_V4, 443)
            } else {
                (WEB_V4, 80)
            };
            let mut s = t.connect(addr(ip, port));
            // Half of them start a message and never finish it.
            if i % 4 < 2 {
                let partial: &[u8] = if port == 443 {
                    &CURL_HELLO[..3]
                } else {
                    b"GET / HT"
                };
                s.write_all(partial).unwrap();
            }
            s
        })
        .collect();
    let ok = http(&t, "www.example.test", WEB_V4, "/while-busy");
    assert!(
        text(&ok.stdout).ends_with("www.example.test/while-busy\n"),
        "{}",
        text(&ok.stderr)
    );

    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        // A refusal (alert or 408) then end of stream, or a reset.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "closed only after the hello timeout ({took:?})"
    );
    assert!(
        took < Duration::from_secs(10),
        "all closed soon after it ({took:?})"
    );
    assert_eq!(raw.accepted(), 0);
    assert_eq!(server.accepted(), 1);
    assert_eq!(*log.lock().unwrap(), ["www.example.test /while-busy"]);
}

#[test]
fn refuses_connections_beyond_the_limit_and_recovers() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(
        ALLOWLIST,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-source",
            "4",
        ],
    );
    let busy: Vec<TcpStream> = (0..4).map(|_| t.connect(addr(WEB_V4, 80))).collect();
    std::thread::sleep(Duration::from_millis(200));
    let refused = http(&t, "www.example.test", WEB_V4, "/over-limit");
    assert!(
        text(&refused.stdout).contains("the gateway is serving as many connections as it may"),
        "over the limit: a 503 that says why, not a reset: {}",
        text(&refused.stderr)
    );
    drop(busy);
    wait_until("a slot to free", Duration::from_secs(10), || {
        http(&t, "www.example.test", WEB_V4, "/after")
            .status
            .success()
    });
    assert_eq!(
        log.lock().unwrap().last().map(String::as_str),
        Some("www.example.test /after")
    );
    assert!(server.accepted() >= 1);
}

#[test]
fn running_out_of_file_descriptors_degrades_and_recovers() {
    if !require_root() {
        return;
    }
    const CONNECTIONS: usize = 120;
    let mut t = Topology::new();
    let (_server, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    // Room for the listeners, the runtime and a few dozen sockets.
    t.start_portcullis_under(&["prlimit", "--nofile=64:64"], ALLOWLIST, &[]);
    let hogs: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| t.connect(addr(WEB_V4, 80)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(t.portcullis_running(), "EMFILE must not crash the gateway");
    drop(hogs);
    wait_until("service to come back", Duration::from_secs(15), || {
        text(&http(&t, "www.example.test", WEB_V4, "/recovered").stdout)
            .ends_with("www.example.test/recovered\n")
    });
    assert!(t.portcullis_running());
    assert!(
        t.log().contains("accept failed"),
        "the shortage was logged:\n{}",
        t.log()
    );
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l == "www.example.test /recovered")
    );
}

#[test]
fn sigterm_drains_live_connections_and_refuses_new_ones() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--drain-timeout", "20s"]);
    let mut live = t.connect(addr(RAW_V4, 443));
    live.write_all(CURL_HELLO).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let gateway = std::thread::scope(|scope| {
        let stopping = scope.spawn(|| {
            t.stop_portcullis(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(15))
        });
        std::thread::sleep(Duration::from_millis(300));
        // Still forwarding after SIGTERM…
        live.write_all(b"still here").unwrap();
        live.shutdown(Shutdown::Write).unwrap();
        let _ = read_all(&mut live);
        stopping.join().unwrap()
    });
    assert!(gateway.success(), "drained and exited cleanly: {gateway:?}");
    let upstream_saw = seen.lock().unwrap().clone();
    assert_eq!(upstream_saw.len(), 1);
    assert!(upstream_saw[0].ends_with(b"still here"));
    let refused = https(&t, "www.example.test", RAW_V4);
    assert!(!refused.status.success(), "no new connections once stopped");
}

#[test]
fn sigint_stops_at_once_despite_live_connections() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--drain-timeout", "60s"]);
    let mut live = t.connect(addr(RAW_V4, 443));
    live.write_all(CURL_HELLO).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    t.stop_portcullis(nix::sys::signal::Signal::SIGINT, Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The live connection is cut, not drained.
    let mut buf = [0u8; 16];
    assert!(matches!(live.read(&mut buf), Ok(0) | Err(_)));
}

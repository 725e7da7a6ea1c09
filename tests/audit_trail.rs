//! End-to-end, in namespaces: the audit trail has no gaps. Connections
//! still open when the gateway stops (drain timeout, SIGINT, a second
//! SIGTERM) write their records before it exits; a long connection writes
//! interim records while it runs, and with `--audit-open` a record when it
//! opens; each request of a kept-alive HTTP connection is recorded under
//! its own name with its own bytes, so a refused request cannot hide an
//! upload; `discover` counts each connection once and is not steered by a
//! host that floods refused names. Needs root; under CI=true a non-root run
//! fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use nix::sys::signal::Signal;
use portcullis_core::hello;
use serde_json::Value;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use support::client::text;
use support::dns::{Answer, DnsServer};
use support::netns::{CLIENT_V4, NAMESERVER, RAW_V4, Topology, WEB_V4, require_root};
use support::scrape::Scrape;
use support::servers::{http_server, recorder};
use support::{addr, read_all, read_response, wait_until};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const ALLOWLIST: &str = ".example.test\n";
/// Sent after the hello on each held connection.
const PAYLOAD: &[u8] = b"more bytes after the hello";

/// Opens `n` allowed TLS tunnels to the recorder, each with its hello and
/// [`PAYLOAD`] sent, and waits until the gateway serves them all.
fn hold(t: &Topology, n: usize) -> Vec<TcpStream> {
    let hello = hello::with_server_name(CURL_HELLO, "www.example.test");
    let held = (0..n)
        .map(|_| {
            let mut s = t.connect(addr(RAW_V4, 443));
            s.write_all(&hello).unwrap();
            s.write_all(PAYLOAD).unwrap();
            s
        })
        .collect();
    wait_until("the tunnels to be served", Duration::from_secs(10), || {
        Scrape::take(t).get("portcullis_active_connections", &[("proto", "tls")]) == n as f64
    });
    held
}

/// Holds three tunnels, stops the gateway with `stop`, and checks that
/// each left its `end` record, cut by shutdown, with what it moved.
fn open_connections_are_recorded_when_stopped(drain: &str, stop: impl FnOnce(&mut Topology)) {
    let mut t = Topology::new();
    let (_raw, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--drain-timeout", drain]);
    let held = hold(&t, 3);
    // Let the payload reach upstream: it is counted as it moves.
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut t);
    let cut = t.audit_where("reason", "shutdown");
    assert_eq!(
        cut.len(),
        3,
        "one record per live connection: {:#?}",
        t.audit()
    );
    let sent = hello::with_server_name(CURL_HELLO, "www.example.test").len() + PAYLOAD.len();
    for r in &cut {
        assert_eq!(r["kind"], "end");
        assert_eq!(r["verdict"], "error");
        assert_eq!(r["name"], "www.example.test");
        assert_eq!(r["bytes_up"], sent, "{r}");
        assert!(r["upstream"].is_string());
    }
    assert_eq!(t.audit().len(), 3, "nothing else was written");
    drop(held);
}

#[test]
fn connections_still_open_after_the_drain_timeout_leave_their_records() {
    if !require_root() {
        return;
    }
    open_connections_are_recorded_when_stopped("1s", |t| {
        let status = t.stop_portcullis(Signal::SIGTERM, Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert!(
            t.log().contains("cutting the connections still open"),
            "{}",
            t.log()
        );
    });
}

#[test]
fn sigint_stops_at_once_and_still_records_every_open_connection() {
    if !require_root() {
        return;
    }
    open_connections_are_recorded_when_stopped("60s", |t| {
        let status = t.stop_portcullis(Signal::SIGINT, Duration::from_secs(5));
        assert!(status.success(), "{status:?}");
    });
}

#[test]
fn a_second_sigterm_stops_a_drain_and_still_records_every_open_connection() {
    if !require_root() {
        return;
    }
    open_connections_are_recorded_when_stopped("60s", |t| {
        t.signal_portcullis(Signal::SIGTERM);
        wait_until("the drain to begin", Duration::from_secs(5), || {
            t.log().contains("SIGTERM: draining")
        });
        let status = t.stop_portcullis(Signal::SIGTERM, Duration::from_secs(5));
        assert!(status.success(), "{status:?}");
    });
}

/// The records of the connection from the client's `port`.
fn of_connection(t: &Topology, port: u16) -> Vec<Value> {
    let src = format!("{CLIENT_V4}:{port}");
    t.audit_where("src", &src)
}

#[test]
fn a_long_connection_writes_interim_records_while_it_runs() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_raw, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--audit-interval", "1s", "--audit-open"]);
    let hello = hello::with_server_name(CURL_HELLO, "www.example.test");
    let mut s = t.connect(addr(RAW_V4, 443));
    let port = s.local_addr().unwrap().port();
    s.write_all(&hello).unwrap();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(PAYLOAD).unwrap();
    }
    let kinds = |t: &Topology| -> Vec<String> {
        of_connection(t, port)
            .iter()
            .map(|r| r["kind"].as_str().unwrap().to_string())
            .collect()
    };
    let while_open = kinds(&t);
    assert_eq!(
        while_open.first().map(String::as_str),
        Some("open"),
        "{while_open:?}"
    );
    assert!(
        while_open.iter().filter(|k| *k == "interim").count() >= 2,
        "an interim record each second of 3.6: {while_open:?}"
    );
    assert!(!while_open.contains(&"end".to_string()));

    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_until("the end record", Duration::from_secs(10), || {
        kinds(&t).contains(&"end".to_string())
    });
    let records = of_connection(&t, port);
    let sent = hello.len() + 12 * PAYLOAD.len();
    let end = records.last().unwrap();
    assert_eq!(
        (end["kind"].as_str(), end["verdict"].as_str()),
        (Some("end"), Some("allow"))
    );
    assert_eq!(end["bytes_up"], sent);
    assert_eq!(seen.lock().unwrap()[0].len(), sent);
    // Each interim record says what had moved by then, and it only grows.
    let moved: Vec<u64> = records
        .iter()
        .map(|r| r["bytes_up"].as_u64().unwrap())
        .collect();
    assert!(moved.windows(2).all(|w| w[0] <= w[1]), "{moved:?}");
    for r in &records[..records.len() - 1] {
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str()),
            (Some("allow"), None)
        );
        assert_eq!(r["name"], "www.example.test");
    }

    // discover counts the connection once, not once per record.
    let proposed = t.discover();
    let proposal = text(&proposed.stdout);
    assert!(
        proposal.contains("from 1 connections to 1 names")
            && proposal.contains("# 1 connections from 1 client only"),
        "{proposal}"
    );
}

#[test]
fn discover_is_not_steered_by_a_host_that_floods_refused_names() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_raw, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    let dns = DnsServer::start(&[(&t.upstream, addr(NAMESERVER, 53))]);
    dns.set(
        "api.vendor.test",
        Answer::All(vec![RAW_V4.parse().unwrap()], 60),
    );
    let second = "192.0.2.3";
    t.client
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    // The monitor week: nothing is refused for policy, every name is
    // checked against DNS (the default, pin).
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &["--mode", "monitor"]);
    let send = |src: &str, dst: &str, name: &str| {
        let mut s = t.connect_from(src.parse().unwrap(), addr(dst, 443));
        s.write_all(&hello::with_server_name(CURL_HELLO, name))
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        read_all(&mut s);
    };
    // Two hosts use a vendor's API.
    send(CLIENT_V4, RAW_V4, "api.vendor.test");
    send(second, RAW_V4, "api.vendor.test");
    // One host floods made-up names that do not resolve, under a listed
    // suffix (monitor mode records them as unresolvable: ignored) and
    // under its own domain (not listed: proposed, but marked).
    const FLOOD: usize = 30;
    for i in 0..FLOOD {
        send(CLIENT_V4, RAW_V4, &format!("x{i}.example.test"));
        send(CLIENT_V4, RAW_V4, &format!("x{i}.made-up.test"));
    }
    wait_until("every record", Duration::from_secs(30), || {
        t.audit().len() == 2 + 2 * FLOOD
    });
    assert_eq!(t.audit_where("would_deny", "unresolvable").len(), FLOOD);

    let proposed = t.discover();
    assert!(proposed.status.success(), "{}", text(&proposed.stderr));
    let proposal = text(&proposed.stdout);
    assert!(
        proposal.contains("# 2 connections from 2 clients\napi.vendor.test\n"),
        "{proposal}"
    );
    assert!(!proposal.contains(".example.test"), "{proposal}");
    assert!(
        proposal.contains(&format!(
            "# {FLOOD} connections from 1 client only: check it, {FLOOD} names:"
        )),
        "{proposal}"
    );
}

#[test]
fn each_request_of_a_kept_alive_connection_is_recorded_with_its_own_name_and_bytes() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_web, served) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(ALLOWLIST, &[]);
    const UPLOAD: usize = 1 << 20;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: {UPLOAD}\r\n\r\n"
    );
    let decoy = b"GET /secret HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    // An upload to an allowed host, then a request for an unlisted one:
    // sent one after the other, as curl or a browser would, then
    // pipelined, all at once.
    for pipelined in [false, true] {
        let mut s = t.connect(addr(WEB_V4, 80));
        let port = s.local_addr().unwrap().port();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&vec![b'x'; UPLOAD]).unwrap();
        let mut answered = Vec::new();
        if !pipelined {
            answered = read_response(&mut s);
        }
        s.write_all(decoy).unwrap();
        answered.extend(read_all(&mut s));
        let answered = text(&answered);
        let refusal_at = answered.find("HTTP/1.1 403").expect("refused");
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        // What the upload's response took, as the client saw it.
        let upload_down = refusal_at;

        wait_until("the connection's records", Duration::from_secs(5), || {
            of_connection(&t, port).len() == 2
        });
        let records = of_connection(&t, port);
        let (upload, refused) = (&records[0], &records[1]);
        let what = |r: &Value| {
            (
                r["kind"].as_str().map(String::from),
                r["name"].as_str().map(String::from),
                r["verdict"].as_str().map(String::from),
                r["reason"].as_str().map(String::from),
                r["request"].as_u64(),
            )
        };
        let owned = |s: &str| Some(s.to_string());
        assert_eq!(
            what(upload),
            (
                owned("request"),
                owned("www.example.test"),
                owned("allow"),
                None,
                Some(1)
            ),
            "pipelined: {pipelined}: {upload}"
        );
        assert_eq!(upload["bytes_up"], head.len() + UPLOAD, "{upload}");
        assert_eq!(upload["bytes_down"], upload_down, "{upload}");
        assert_eq!(upload["rule"], ".example.test");
        // The refusal carries none of the upload's bytes: nothing of it
        // was forwarded, and its 403 is the gateway's own.
        assert_eq!(
            what(refused),
            (
                owned("end"),
                owned("evil.test"),
                owned("deny"),
                owned("not_listed"),
                Some(2)
            ),
            "pipelined: {pipelined}: {refused}"
        );
        assert_eq!(
            (refused["bytes_up"].as_u64(), refused["bytes_down"].as_u64()),
            (Some(0), Some(0))
        );
    }
    assert_eq!(
        served.lock().unwrap().len(),
        2,
        "the decoy never went upstream"
    );
    // discover proposes the upload's name, under its own verdict, and not
    // the decoy's.
    let proposal = text(&t.discover().stdout);
    assert!(
        proposal.contains("# 2 connections from 1 client only: check it\nwww.example.test\n"),
        "{proposal}"
    );
    assert!(!proposal.contains("evil.test"), "{proposal}");
}

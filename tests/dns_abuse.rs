//! End-to-end, in namespaces, with a test DNS server answering the gateway
//! with hostile records: whoever controls DNS under an allowed wildcard
//! cannot grow the gateway's memory with huge answers, and one client's
//! flood of names that never answer cannot hold another client's new
//! names back. Needs root; under CI=true a non-root run fails instead of
//! skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::alert;
use support::dns::{Answer, DnsServer};
use support::netns::{CLIENT_V4, NAMESERVER, RAW_V4, Topology, WEB_V4, require_root};
use support::scrape::Scrape;
use support::servers::recorder;
use support::{addr, ip, read_all, wait_until};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const ALLOWLIST: &str = ".example.test\n";

fn dns_for_gateway(t: &Topology) -> DnsServer {
    DnsServer::start(&[(&t.upstream, addr(NAMESERVER, 53))])
}

/// Sends a hello for `name` to `dst` from `src`, half-closes, and reads
/// what came back until the gateway closes.
fn hello_from(t: &Topology, src: IpAddr, dst: SocketAddr, name: &str) -> Vec<u8> {
    let mut s = t.connect_from(src, dst);
    s.write_all(&hello::with_server_name(CURL_HELLO, name))
        .unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    read_all(&mut s)
}

/// What README states: the gateway grows by less than this however its
/// DNS answers (the cache holds at most 200,000 addresses, about 12 MB
/// with its names; the rest is room for the allocator's own keeping).
const FLOOD_GROWTH_MAX_KIB: u64 = 32 * 1024;

#[test]
fn huge_answers_for_many_names_under_a_wildcard_grow_the_gateway_only_within_its_bound() {
    if !require_root() {
        return;
    }
    const NAMES: usize = 1_500;
    const RECORDS: u128 = 2_000;
    let mut t = Topology::new();
    let dns = dns_for_gateway(&t);
    // 2,000 AAAA records per name: too large for UDP, so each is fetched
    // whole over TCP. Their prefix has no route from the gateway, so a
    // connection pinned to one fails at once and the test stays short.
    let huge: Vec<IpAddr> = (0..RECORDS)
        .map(|i| IpAddr::V6(Ipv6Addr::from(0x2001_0db8_00ff_0000_u128 << 64 | (i + 1))))
        .collect();
    dns.set("*.flood.example.test", Answer::All(huge, 300));
    dns.set("*.warm.example.test", Answer::All(vec![ip(WEB_V4)], 300));
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);
    let client = ip(CLIENT_V4);
    let raw = addr(RAW_V4, 443);
    // Every worker's resolver and buffers made before the baseline.
    for i in 0..64 {
        hello_from(&t, client, raw, &format!("w{i}.warm.example.test"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = t.portcullis_rss_kib();

    // A few at a time, as a scripted attacker would (within its share of
    // lookups: each name is really looked up and cached).
    let t = std::sync::Arc::new(t);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in (w..NAMES).step_by(8) {
                    let answer = hello_from(&t, client, raw, &format!("n{i}.flood.example.test"));
                    // Pinned to an address with no route: a reset, as
                    // through a NAT, never forwarded to the dialled one.
                    assert!(answer.is_empty(), "n{i}: {answer:?}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = t.portcullis_rss_kib();
    let grew = after.saturating_sub(before);
    eprintln!(
        "{NAMES} names × {RECORDS} AAAA: RSS {before} KiB → {after} KiB (+{grew} KiB), {} TCP queries",
        dns.tcp_queries()
    );
    assert!(
        dns.tcp_queries() >= NAMES,
        "the huge answers were not fetched"
    );
    let m = Scrape::take(&t);
    assert!(m.get("portcullis_dns_lookups_total", &[("result", "ok")]) >= NAMES as f64);
    // Every name kept, each with its first 16 addresses (and the same 16
    // seen): the answers were cut, not the names.
    let names = m.get("portcullis_dns_cache_names", &[]);
    let held = m.get("portcullis_dns_cache_addresses", &[]);
    assert_eq!(names, (NAMES + 64) as f64);
    assert_eq!(held, (NAMES * 32 + 64 * 2) as f64);
    assert!(
        grew < FLOOD_GROWTH_MAX_KIB,
        "grew by {grew} KiB, over the {FLOOD_GROWTH_MAX_KIB} KiB README states"
    );
}

#[test]
fn one_clients_flood_of_names_that_never_answer_does_not_hold_back_another_clients_names() {
    if !require_root() {
        return;
    }
    const FLOOD: usize = 400;
    let mut t = Topology::new();
    let second = "192.0.2.3";
    t.client
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    let (web, _) = recorder(&t.upstream, &[addr(WEB_V4, 443)]);
    let dns = dns_for_gateway(&t);
    dns.set("*.void.example.test", Answer::Silent);
    dns.set("*.live.example.test", Answer::All(vec![ip(WEB_V4)], 300));
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &[]);

    // The flood: more names that never answer, at once, than the
    // resolver has queries in flight (256), all from one client.
    let flooder = ip(CLIENT_V4);
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let mut s = t.connect_from(flooder, addr(RAW_V4, 443));
            let hello = hello::with_server_name(CURL_HELLO, &format!("v{i}.void.example.test"));
            s.write_all(&hello).unwrap();
            s
        })
        .collect();
    // Meanwhile another client's new names: each admitted in the time of
    // its own lookup, not after the flood's.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let started = Instant::now();
        let answer = hello_from(
            &t,
            ip(second),
            addr(WEB_V4, 443),
            &format!("m{i}.live.example.test"),
        );
        let took = started.elapsed();
        assert!(answer.is_empty(), "m{i} was refused: {answer:?}");
        slowest = slowest.max(took);
    }
    eprintln!("the other client's slowest new name took {slowest:?} during the flood");
    assert!(
        slowest < Duration::from_millis(500),
        "another client's name waited {slowest:?} behind the flood (a void lookup holds its slot 1 s)"
    );
    wait_until("the other client's hellos", Duration::from_secs(5), || {
        web.accepted() == 10
    });
    // Every name of the flood was refused: past its share at once, the
    // rest once their lookup failed.
    let mut refused = 0;
    for mut s in flood {
        let _ = s.shutdown(std::net::Shutdown::Write);
        if read_all(&mut s) == alert::ACCESS_DENIED {
            refused += 1;
        }
    }
    assert_eq!(refused, FLOOD);
    let m = Scrape::take(&t);
    let busy = m.get("portcullis_dns_lookups_total", &[("result", "busy")]);
    assert!(
        busy >= (FLOOD / 2) as f64,
        "only {busy} of the flood's lookups past its share"
    );
}

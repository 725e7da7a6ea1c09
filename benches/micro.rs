//! Micro-benchmarks of the pure hot paths: allowlist lookup (hit and miss,
//! 10 to 1M entries), loading a 1M-entry list, ClientHello and request-head
//! parsing, writing a connection's audit line, and what `--verify-dst pin`
//! adds to a decision on a DNS cache hit. `cargo bench --bench micro`; `cargo test --benches` runs each
//! once so they cannot rot. Targets (README, Performance): lookup < 200 ns
//! at 1M entries, 1M-entry load < 1 s, a typical hello well under 1 µs.
#![forbid(unsafe_code)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use portcullis::allowlist::{Allowlist, parse};
use portcullis::detect::http::parse_request_head;
use portcullis::detect::tls::parse_client_hello;
use portcullis::name::HostName;
use std::hint::black_box;
use std::time::Duration;

use portcullis_core::hello;

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const CHROMIUM_HELLO: &[u8] =
    include_bytes!("../testdata/clienthellos/chromium-156-x25519mlkem768.bin");
const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];

/// A list of `n` entries in all three forms, spread over many parents as
/// real lists are: `.svc{i}.team{t}.corp{c}.example`, `api{i}.…`, `*.…`.
fn list_text(n: usize) -> String {
    let mut text = String::with_capacity(n * 40);
    for i in 0..n {
        let parent = format!("team{}.corp{}.example", i % 1_009, i % 53);
        match i % 3 {
            0 => text.push_str(&format!(".svc{i}.{parent}\n")),
            1 => text.push_str(&format!("api{i}.{parent}\n")),
            _ => text.push_str(&format!("*.cdn{i}.{parent}\n")),
        }
    }
    text
}

/// Names the list allows (each matched by a different entry) and names it
/// does not (sharing its parents, so the walk goes deep before failing).
fn names(n: usize) -> (Vec<String>, Vec<String>) {
    let step = (n / 64).max(1);
    let hits = (0..n)
        .step_by(step)
        .map(|i| {
            let parent = format!("team{}.corp{}.example", i % 1_009, i % 53);
            match i % 3 {
                0 => format!("www.svc{i}.{parent}"),
                1 => format!("api{i}.{parent}"),
                _ => format!("img.cdn{i}.{parent}"),
            }
        })
        .collect();
    let misses = (0..64)
        .map(|i| format!("www.unlisted{i}.team{}.corp{}.example", i % 1_009, i % 53))
        .collect();
    (hits, misses)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in SIZES {
        let list = parse(&list_text(n)).expect("a valid list");
        let (hits, misses) = names(n);
        for (kind, names, found) in [("hit", &hits, true), ("miss", &misses, false)] {
            assert!(
                names.iter().all(|h| list.lookup(h).is_some() == found),
                "{kind} at {n}"
            );
            let mut next = names.iter().cycle();
            group.bench_function(BenchmarkId::new(kind, n), |b| {
                b.iter(|| {
                    black_box(&list)
                        .lookup(black_box(next.next().unwrap()))
                        .is_some()
                })
            });
        }
    }
    group.finish();
}

/// The whole decision a connection makes: SNI bytes → normalised name →
/// lookup, at the largest list size.
fn decide(c: &mut Criterion) {
    let list = parse(&list_text(1_000_000)).unwrap();
    let (hits, _) = names(1_000_000);
    let mut next = hits.iter().cycle();
    c.bench_function("decide/sni-to-rule/1000000", |b| {
        b.iter(|| {
            let name = HostName::from_wire(black_box(next.next().unwrap().as_bytes())).unwrap();
            list.lookup(name.as_str()).is_some()
        })
    });
}

/// What pinning adds to a connection's decision when its name is a DNS
/// cache hit (every connection but a name's first, within its TTL): the
/// cache lookup among 10,000 names and the address check, beside the same
/// decision with `--verify-dst off`.
fn pinning(c: &mut Criterion) {
    use portcullis::config::VerifyDst;
    use portcullis::decide::{Facts, Step, decide};
    use portcullis::dns::{Cache, Cached};
    let live = portcullis::allowlist::Live::with(parse(".bench.example\n").unwrap());
    let guard = portcullis::guard::Guard::with_addresses(["192.0.2.1".parse().unwrap()]);
    let now = std::time::Instant::now();
    let mut cache = Cache::default();
    let names: Vec<HostName> = (0..10_000)
        .map(|i| HostName::from_wire(format!("n{i}.bench.example").as_bytes()).unwrap())
        .collect();
    for (i, name) in names.iter().enumerate() {
        let ip = std::net::Ipv4Addr::from(0xcb00_7100 + (i as u32 % 200));
        cache.store(
            name.as_str(),
            vec![ip.into()],
            Duration::from_secs(300),
            now,
        );
    }
    let dst: std::net::SocketAddr = "203.0.113.10:443".parse().unwrap();
    let list = live.current();
    let mut group = c.benchmark_group("decide-per-connection");
    for verify in [VerifyDst::Off, VerifyDst::Pin] {
        let mut next = names.iter().cycle();
        let label = format!("{verify:?}").to_lowercase();
        group.bench_function(&label, |b| {
            b.iter(|| {
                let name = next.next().unwrap();
                let cached = (verify == VerifyDst::Pin).then(|| cache.get(name.as_str(), now));
                let addresses = match &cached {
                    Some(Cached::Fresh { addresses, .. }) => Some(Ok(&**addresses)),
                    _ => None,
                };
                let facts = Facts {
                    name: Ok(black_box(name)),
                    below_tls_floor: false,
                    list: Some(&list),
                    dst,
                    connected: None,
                    verify,
                    enforcing: true,
                    addresses,
                    guard: &guard,
                    now,
                    pick: 0,
                };
                matches!(decide(&facts), Step::Done(_))
            })
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let text = list_text(1_000_000);
    let mut group = c.benchmark_group("load");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse-and-validate/1000000", |b| {
        b.iter(|| parse(black_box(&text)).map(|l: Allowlist| l.len()))
    });
    group.finish();
}

fn hellos(c: &mut Criterion) {
    let large = hello::large_hello_in_three_records(CURL_HELLO);
    let mut group = c.benchmark_group("client-hello");
    for (name, bytes) in [
        ("curl", CURL_HELLO.to_vec()),
        ("chromium-pq", CHROMIUM_HELLO.to_vec()),
        ("16k-in-3-records", large),
    ] {
        assert!(matches!(
            parse_client_hello(&bytes, 64 * 1024),
            portcullis::detect::Detect::Done(_)
        ));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(BenchmarkId::new(name, bytes.len()), |b| {
            b.iter(|| parse_client_hello(black_box(&bytes), 64 * 1024))
        });
    }
    group.finish();
}

fn request_heads(c: &mut Criterion) {
    let head = b"GET /simple/requests/ HTTP/1.1\r\nHost: pypi.org\r\nUser-Agent: pip/24.0 CPython/3.11.7\r\nAccept: text/html; charset=utf-8\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n";
    assert!(matches!(
        parse_request_head(head, 16 * 1024),
        portcullis::detect::Detect::Done(_)
    ));
    c.bench_function("request-head/pip", |b| {
        b.iter(|| parse_request_head(black_box(head), 16 * 1024))
    });
}

fn audit_line(c: &mut Criterion) {
    use portcullis::policy::PolicyId;
    use portcullis::record::Record;
    use portcullis::verdict::{Proto, Verdict};
    let mut rec = Record::new(
        "192.0.2.10:40512".parse().unwrap(),
        PolicyId::DEFAULT,
        Proto::Tls,
    );
    rec.dst = Some(portcullis::net::orig_dst::OrigDst(
        "203.0.113.20:443".parse().unwrap(),
    ));
    rec.name = Some(HostName::from_wire(b"api.example.com").unwrap());
    rec.rule = Some(".example.com".into());
    rec.verdict = Verdict::Allow;
    rec.moved.up = 2245;
    rec.moved.down = 48213;
    rec.duration = Duration::from_millis(311);
    let at = std::time::SystemTime::now();
    c.bench_function("audit-line/allowed-tls", |b| {
        b.iter(|| {
            portcullis::audit::line(black_box(&rec), portcullis::audit::Kind::End, "default", at)
        })
    });
}

criterion_group!(
    benches,
    lookup,
    decide,
    pinning,
    load,
    hellos,
    request_heads,
    audit_line
);
criterion_main!(benches);

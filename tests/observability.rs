//! Observability end to end in the namespace topology: `/metrics` counts
//! allowed and refused connections by label, `/readyz` follows the list,
//! the audit log has one JSON line per connection, and a flood of distinct
//! denied names adds no series. Needs root; under CI=true a non-root run
//! fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;
use support::client::{http, http_status, https, text};
use support::netns::{CLIENT_V4, RAW_V4, Topology, WEB_V4, require_root};
use support::s3::{self, Moto, put_list, require_moto};
use support::scrape::{Scrape, Series, promtool_check};
use support::servers::{TlsServer, http_server, make_certs, recorder};
use support::{addr, wait_until};

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const CHROMIUM_HELLO: &[u8] =
    include_bytes!("../testdata/clienthellos/chromium-156-x25519mlkem768.bin");
const ALLOWLIST: &str = ".example.test\nexact.allowed.test\n";
/// The labels of the only policy these tests configure.
const DEFAULT: &[(&str, &str)] = &[("policy", "default")];

/// Waits until the audit log holds `n` records, and returns them.
fn audit_records(t: &Topology, n: usize) -> Vec<Value> {
    wait_until("audit records", Duration::from_secs(10), || {
        t.audit().len() >= n
    });
    let records = t.audit();
    assert_eq!(records.len(), n, "one record per connection: {records:#?}");
    records
}

/// The records about `name` (null for "no name").
fn about<'a>(records: &'a [Value], name: Option<&str>) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["name"].as_str() == name)
        .collect()
}

#[test]
fn metrics_and_audit_account_for_every_allowed_and_refused_connection() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    make_certs(&t.dir);
    let _tls = TlsServer::start(&t.upstream, &t.dir, false, 443);
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let (raw, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);
    let before = Scrape::take(&t);

    for name in ["www.example.test", "api.example.test", "exact.allowed.test"] {
        let out = https(&t, name, WEB_V4);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
    for name in ["blocked.invalid", "www.allowed.test"] {
        assert!(!https(&t, name, RAW_V4).status.success(), "{name}");
    }
    let not_tls = t.exchange(addr(RAW_V4, 443), b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n");
    assert_eq!(not_tls[0], 21, "a TLS alert");
    // Chromium always offers (GREASE) ECH: audited as such.
    let chromium = hello::with_server_name(CHROMIUM_HELLO, "ech.example.test");
    t.exchange(addr(RAW_V4, 443), &chromium);
    wait_until("the ECH hello upstream", Duration::from_secs(5), || {
        seen.lock().unwrap().len() == 1
    });
    assert_eq!(seen.lock().unwrap()[0], chromium, "forwarded byte-exact");
    assert_eq!(
        raw.accepted(),
        1,
        "refused connections never reach upstream"
    );

    let ok = http(&t, "www.example.test", WEB_V4, "/hello");
    assert!(text(&ok.stdout).starts_with("HTTP/1.1 200"));
    assert_eq!(http_status(&t, "blocked.invalid", WEB_V4), 403);

    let records = audit_records(&t, 9);
    wait_until("no connection active", Duration::from_secs(5), || {
        let now = Scrape::take(&t);
        now.get("portcullis_active_connections", &[("proto", "tls")]) == 0.0
            && now.get("portcullis_active_connections", &[("proto", "http")]) == 0.0
    });
    let after = Scrape::take(&t);
    promtool_check(&after.text);

    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let connections = "portcullis_connections_total";
    assert_eq!(
        delta(
            connections,
            &[
                ("policy", "default"),
                ("proto", "tls"),
                ("verdict", "allow")
            ]
        ),
        4.0
    );
    assert_eq!(
        delta(
            connections,
            &[("policy", "default"), ("proto", "tls"), ("verdict", "deny")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            connections,
            &[
                ("policy", "default"),
                ("proto", "tls"),
                ("verdict", "error")
            ]
        ),
        0.0
    );
    assert_eq!(
        delta(
            connections,
            &[
                ("policy", "default"),
                ("proto", "http"),
                ("verdict", "allow")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            connections,
            &[
                ("policy", "default"),
                ("proto", "http"),
                ("verdict", "deny")
            ]
        ),
        1.0
    );
    let denied = "portcullis_denied_total";
    assert_eq!(
        delta(
            denied,
            &[
                ("policy", "default"),
                ("proto", "tls"),
                ("reason", "not_listed")
            ]
        ),
        2.0
    );
    assert_eq!(
        delta(
            denied,
            &[
                ("policy", "default"),
                ("proto", "tls"),
                ("reason", "not_tls")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            denied,
            &[
                ("policy", "default"),
                ("proto", "http"),
                ("reason", "not_listed")
            ]
        ),
        1.0
    );
    // Every (proto, reason) pair is exported from the start, at zero: a
    // closed set, and the others did not move.
    assert_eq!(
        after.series(denied).len(),
        2 * portcullis::verdict::Reason::ALL.len()
    );
    let moved = after
        .series(denied)
        .into_iter()
        .filter(|labels| {
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            delta(denied, &pairs) != 0.0
        })
        .count();
    assert_eq!(moved, 3, "only the reasons that happened moved");
    let hits = "portcullis_rule_hits_total";
    assert_eq!(
        delta(hits, &[("policy", "default"), ("rule", ".example.test")]),
        4.0
    );
    assert_eq!(
        delta(
            hits,
            &[("policy", "default"), ("rule", "exact.allowed.test")]
        ),
        1.0
    );
    for direction in ["upstream", "downstream"] {
        let bytes = delta(
            "portcullis_bytes_total",
            &[("proto", "tls"), ("direction", direction)],
        );
        assert!(bytes > 0.0, "tls {direction} bytes");
    }
    let hello_count = |p| delta("portcullis_hello_duration_seconds_count", &[("proto", p)]);
    assert_eq!(hello_count("tls"), 6.0, "every complete hello was timed");
    assert_eq!(hello_count("http"), 2.0);
    let connects = |p| {
        delta(
            "portcullis_upstream_connect_duration_seconds_count",
            &[("proto", p)],
        )
    };
    assert_eq!((connects("tls"), connects("http")), (4.0, 1.0));
    let lifetimes = "portcullis_connection_duration_seconds_count";
    assert_eq!(
        delta(lifetimes, &[("proto", "tls"), ("verdict", "deny")]),
        3.0
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        after.get("portcullis_build_info", &[("version", version)]),
        1.0
    );
    assert_eq!(after.get("portcullis_allowlist_loaded", DEFAULT), 1.0);
    assert_eq!(after.get("portcullis_allowlist_entries", DEFAULT), 2.0);
    let list = t.dir.join("allowlist.txt");
    let info = [
        ("policy", "default"),
        ("source", list.to_str().unwrap()),
        ("etag", ""),
    ];
    assert_eq!(after.get("portcullis_allowlist_info", &info), 1.0);
    assert!(
        after.get(
            "portcullis_allowlist_last_success_timestamp_seconds",
            DEFAULT
        ) > 1.7e9
    );

    for r in &records {
        let ts = r["ts"].as_str().unwrap();
        assert!(
            ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(),
            "{ts}"
        );
        let src = r["src"].as_str().unwrap();
        assert!(src.starts_with(&format!("{CLIENT_V4}:")), "{src}");
        assert!(r["duration_ms"].is_u64(), "{r}");
        assert_eq!(r.as_object().unwrap().len(), 17, "{r}");
        assert_eq!(r["kind"], "end", "one end record per connection: {r}");
        assert_eq!(r["policy"], "default", "{r}");
        assert!(r["would_deny"].is_null(), "enforce mode: {r}");
    }
    let www = about(&records, Some("www.example.test"));
    let tls_www = www.iter().find(|r| r["proto"] == "tls").expect("tls www");
    assert_eq!(tls_www["dst"], format!("{WEB_V4}:443"));
    // --verify-dst off here: where the client dialled.
    assert_eq!(tls_www["upstream"], format!("{WEB_V4}:443"));
    assert_eq!(
        (&tls_www["verdict"], &tls_www["reason"], &tls_www["rule"]),
        (
            &Value::from("allow"),
            &Value::Null,
            &Value::from(".example.test")
        )
    );
    assert!(tls_www["bytes_up"].as_u64().unwrap() > 0);
    assert!(tls_www["bytes_down"].as_u64().unwrap() > 0);
    assert_eq!(tls_www["ech"], false);
    let http_www = www.iter().find(|r| r["proto"] == "http").expect("http www");
    assert_eq!(http_www["dst"], format!("{WEB_V4}:80"));
    let ech = about(&records, Some("ech.example.test"));
    assert_eq!(
        (ech[0]["ech"].clone(), ech[0]["verdict"].clone()),
        (true.into(), "allow".into())
    );
    assert_eq!(ech[0]["bytes_up"], chromium.len());

    let blocked = about(&records, Some("blocked.invalid"));
    assert_eq!(blocked.len(), 2, "tls and http");
    for r in blocked {
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str()),
            (Some("deny"), Some("not_listed"))
        );
        assert_eq!(
            (&r["rule"], &r["bytes_up"], &r["bytes_down"]),
            (&Value::Null, &0.into(), &0.into())
        );
    }
    let nameless = about(&records, None);
    assert_eq!(nameless.len(), 1);
    assert_eq!(nameless[0]["reason"], "not_tls");
    assert_eq!(nameless[0]["dst"], format!("{RAW_V4}:443"));
}

#[test]
fn readyz_and_metrics_follow_whether_a_list_is_loaded() {
    if !require_root() || !require_moto() {
        return;
    }
    let mut t = Topology::new();
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    s3::start_portcullis(&mut t, "1s");
    assert_eq!(t.admin_status("/healthz"), Some(200));
    let not_ready = t.admin_get("/readyz").unwrap();
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
    let before = Scrape::take(&t);
    assert_eq!(before.get("portcullis_allowlist_loaded", DEFAULT), 0.0);
    assert_eq!(
        before.get(
            "portcullis_allowlist_last_success_timestamp_seconds",
            DEFAULT
        ),
        0.0
    );
    assert_eq!(
        http_status(&t, "www.example.test", WEB_V4),
        503,
        "fail closed"
    );
    let refused = audit_records(&t, 1);
    assert_eq!(
        (
            refused[0]["verdict"].as_str(),
            refused[0]["reason"].as_str()
        ),
        (Some("deny"), Some("no_list"))
    );

    let failed = [("policy", "default"), ("result", "failed")];
    wait_until("a failed fetch", Duration::from_secs(10), || {
        Scrape::take(&t).get("portcullis_allowlist_reloads_total", &failed) >= 1.0
    });
    assert_eq!(t.admin_status("/readyz"), Some(503), "still not ready");

    let moto = Moto::start(&t);
    put_list(&t.gateway, ALLOWLIST);
    let updated = [("policy", "default"), ("result", "updated")];
    wait_until("ready", Duration::from_secs(15), || {
        t.admin_status("/readyz") == Some(200)
    });
    // The reload is counted just after the swap that makes it ready.
    wait_until("the reload counted", Duration::from_secs(5), || {
        Scrape::take(&t).get("portcullis_allowlist_reloads_total", &updated) == 1.0
    });
    let after = Scrape::take(&t);
    promtool_check(&after.text);
    assert_eq!(after.get("portcullis_allowlist_loaded", DEFAULT), 1.0);
    assert_eq!(after.get("portcullis_allowlist_entries", DEFAULT), 2.0);
    let info = after.series("portcullis_allowlist_info");
    assert_eq!(info.len(), 1, "one series");
    assert_eq!(info[0]["source"], s3::URL);
    assert!(
        info[0]["etag"].len() > 2,
        "the ETag in force: {:?}",
        info[0]
    );
    let no_list = [
        ("policy", "default"),
        ("proto", "http"),
        ("reason", "no_list"),
    ];
    assert_eq!(after.get("portcullis_denied_total", &no_list), 1.0);
    assert_eq!(http_status(&t, "www.example.test", WEB_V4), 200);
    drop(moto);
}

/// Sends a refused request for each name (true: TLS) from `threads`
/// client threads, each checking that an answer came back.
fn deny_all(t: &Topology, names: &[(bool, String)], threads: usize) {
    let chunk = names.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for part in names.chunks(chunk) {
            let part = part.to_vec();
            scope.spawn(|| t.client.enter(move || deny_each(part)));
        }
    });
}

fn deny_each(names: Vec<(bool, String)>) {
    for (tls, name) in names {
        let to = addr(RAW_V4, if tls { 443 } else { 80 });
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = if tls {
            hello::with_server_name(CURL_HELLO, &name)
        } else {
            format!("GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").into_bytes()
        };
        s.write_all(&request).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(!answer.is_empty(), "{name} refused with an answer");
    }
}

#[test]
fn ten_thousand_distinct_denied_names_add_no_series() {
    if !require_root() {
        return;
    }
    const NAMES: usize = 10_000;
    let mut t = Topology::new();
    let (raw, _) = recorder(&t.upstream, &[addr(RAW_V4, 443), addr(RAW_V4, 80)]);
    t.start_portcullis(ALLOWLIST, &[]);
    // One of each kind first, so every series these refusals touch exists.
    let warm_up = [
        (true, "warm.invalid".into()),
        (false, "warm.invalid".into()),
    ];
    deny_all(&t, &warm_up, 1);
    let before = Scrape::take(&t);

    let names: Vec<(bool, String)> = (0..NAMES)
        .map(|i| (i % 2 == 0, format!("host-{i}.denied-{}.invalid", i % 97)))
        .collect();
    deny_all(&t, &names, 4);
    let records = audit_records(&t, NAMES + 2);
    let after = Scrape::take(&t);

    let keys = |s: &Scrape| s.samples.keys().cloned().collect::<BTreeSet<Series>>();
    assert_eq!(
        keys(&before),
        keys(&after),
        "the same series before and after"
    );
    assert!(
        !after.text.contains("denied-"),
        "no denied name in any label"
    );
    let denied = |s: &Scrape, p| {
        s.get(
            "portcullis_denied_total",
            &[
                ("policy", "default"),
                ("proto", p),
                ("reason", "not_listed"),
            ],
        )
    };
    assert_eq!(
        denied(&after, "tls") - denied(&before, "tls"),
        (NAMES / 2) as f64
    );
    assert_eq!(
        denied(&after, "http") - denied(&before, "http"),
        (NAMES / 2) as f64
    );
    let audited: BTreeSet<&str> = records.iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(
        names.iter().all(|(_, n)| audited.contains(n.as_str())),
        "every name audited"
    );
    assert_eq!(raw.accepted(), 0);
}

//! End-to-end, in namespaces: the policies beyond the allowlist itself
//! (per-source policies, TLS version floor, ECH and odd hellos, monitor
//! mode, discovery, destination verification). Needs root; under CI=true
//! a non-root run fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::Write;
use std::time::{Duration, SystemTime};
use support::alert;
use support::client::{http, http_status_from, text};
use support::dns::{Answer, DnsServer};
use support::netns::{NAMESERVER, RAW_V4, RAW_V6, Topology, WEB_V4, require_root};
use support::scrape::Scrape;
use support::servers::{http_server, recorder};
use support::{addr, read_all, wait_until};

const CHROMIUM_HELLO: &[u8] =
    include_bytes!("../testdata/clienthellos/chromium-156-x25519mlkem768.bin");
const TLS12_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/openssl-3.0-tls12-only.bin");
const ALLOWLIST: &str = ".example.test\n";

/// Sends `bytes` to RAW_V4:443 and half-closes; what the gateway answered.
fn exchange(t: &Topology, bytes: &[u8]) -> Vec<u8> {
    t.exchange(addr(RAW_V4, 443), bytes)
}

/// The audit records so far with this `reason`.
fn audited(t: &Topology, reason: &str) -> Vec<serde_json::Value> {
    t.audit_where("reason", reason)
}

#[test]
fn hellos_below_the_tls_floor_are_refused_with_protocol_version() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, seen) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &[]);

    // An old client: TLS 1.0 at most, for a listed name. Default floor 1.2.
    let tls10 = hello::with_legacy_version(TLS12_HELLO, 0x0301);
    assert_eq!(exchange(&t, &tls10), alert::PROTOCOL_VERSION);
    // SSLv2-compatible hello (a 2-byte header with the top bit set).
    let sslv2 = [0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00];
    assert_eq!(exchange(&t, &sslv2), alert::DECODE_ERROR);
    // TLS 1.2 and TLS 1.3 pass the default floor.
    exchange(&t, TLS12_HELLO);
    exchange(&t, CHROMIUM_HELLO);
    wait_until("two forwarded hellos", Duration::from_secs(5), || {
        seen.lock().unwrap().len() == 2
    });
    assert_eq!(server.accepted(), 2, "only the hellos above the floor");

    wait_until("both refusals' audit lines", Duration::from_secs(5), || {
        audited(&t, "tls_version").len() == 1 && audited(&t, "not_tls").len() == 1
    });
    let refused = &audited(&t, "tls_version")[0];
    assert_eq!(refused["name"], "www.example.test");
    assert_eq!(refused["verdict"], "deny");
    let metrics = t.admin_get("/metrics").unwrap();
    assert!(
        metrics.contains(
            r#"portcullis_denied_total{policy="default",proto="tls",reason="tls_version"} 1"#
        ),
        "{metrics}"
    );
}

#[test]
fn a_tls13_floor_refuses_tls12_clients() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--min-tls", "1.3"]);
    assert_eq!(exchange(&t, TLS12_HELLO), alert::PROTOCOL_VERSION);
    exchange(&t, CHROMIUM_HELLO);
    wait_until("the TLS 1.3 hello upstream", Duration::from_secs(5), || {
        server.accepted() == 1
    });
    wait_until("the refusal's audit line", Duration::from_secs(5), || {
        audited(&t, "tls_version").len() == 1
    });
}

#[test]
fn an_ech_hello_is_decided_by_its_outer_name() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    // Real ECH puts the provider's public name in the outer SNI: that name
    // must be listed itself, whatever the hidden inner name is.
    t.start_portcullis(".example.test\ncloudflare-ech.com\n", &[]);
    let unlisted_outer = hello::with_server_name(CHROMIUM_HELLO, "public.ech-provider.test");
    assert_eq!(exchange(&t, &unlisted_outer), alert::ACCESS_DENIED);
    let listed_outer = hello::with_server_name(CHROMIUM_HELLO, "cloudflare-ech.com");
    exchange(&t, &listed_outer);
    wait_until(
        "the listed outer name upstream",
        Duration::from_secs(5),
        || server.accepted() == 1,
    );
    wait_until("two audit lines", Duration::from_secs(5), || {
        t.audit().len() == 2
    });
    let records = t.audit();
    let by_name = |name: &str| {
        records
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no record for {name}: {records:?}"))
    };
    let denied = by_name("public.ech-provider.test");
    assert_eq!(
        (denied["verdict"].as_str(), denied["ech"].as_bool()),
        (Some("deny"), Some(true))
    );
    let allowed = by_name("cloudflare-ech.com");
    assert_eq!(
        (allowed["verdict"].as_str(), allowed["ech"].as_bool()),
        (Some("allow"), Some(true))
    );
}

#[test]
fn monitor_mode_forwards_and_counts_what_it_would_deny_until_its_time() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    let (_web, requests) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let end = SystemTime::now() + Duration::from_secs(4);
    let end = humantime::format_rfc3339_seconds(end).to_string();
    t.start_portcullis(ALLOWLIST, &["--mode", "monitor", "--monitor-until", &end]);
    assert!(metric(&t, "portcullis_enforcing 0"));

    let unlisted = hello::with_server_name(TLS12_HELLO, "unlisted.other.test");
    exchange(&t, &unlisted);
    wait_until(
        "the unlisted hello upstream",
        Duration::from_secs(5),
        || server.accepted() == 1,
    );
    let answer = text(&http(&t, "unlisted.other.test", WEB_V4, "/x").stdout);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(requests.lock().unwrap().len(), 1);
    wait_until("two would_deny audit lines", Duration::from_secs(5), || {
        t.audit()
            .iter()
            .filter(|r| r["would_deny"] == "not_listed" && r["verdict"] == "allow")
            .count()
            == 2
    });
    assert!(metric(
        &t,
        r#"portcullis_would_deny_total{policy="default",proto="tls",reason="not_listed"} 1"#
    ));
    assert!(metric(
        &t,
        r#"portcullis_would_deny_total{policy="default",proto="http",reason="not_listed"} 1"#
    ));

    // The date passes: enforce mode, without a restart.
    wait_until("enforce mode", Duration::from_secs(10), || {
        metric(&t, "portcullis_enforcing 1")
    });
    assert_eq!(exchange(&t, &unlisted), alert::ACCESS_DENIED);
    let answer = text(&http(&t, "unlisted.other.test", WEB_V4, "/y").stdout);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(server.accepted(), 1);
    assert_eq!(requests.lock().unwrap().len(), 1);
    assert_eq!(t.log_count("monitor mode has ended"), 1);
}

/// Whether the scrape has this exact sample line.
fn metric(t: &Topology, line: &str) -> bool {
    t.admin_get("/metrics")
        .is_some_and(|m| m.lines().any(|l| l == line))
}

#[test]
fn discover_turns_a_monitored_audit_log_into_a_list_that_check_accepts() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443)]);
    t.start_portcullis(ALLOWLIST, &["--mode", "monitor"]);
    let names = [
        "a.shop.test",
        "b.shop.test",
        "c.shop.test",
        "api.vendor.test",
    ];
    for name in names.iter().chain(&["api.vendor.test"]) {
        exchange(&t, &hello::with_server_name(TLS12_HELLO, name));
    }
    wait_until("five audit lines", Duration::from_secs(5), || {
        t.audit().len() == 5
    });
    assert_eq!(server.accepted(), 5);

    let proposed = t.discover();
    let portcullis = env!("CARGO_BIN_EXE_portcullis");
    assert!(proposed.status.success(), "{}", text(&proposed.stderr));
    let list = t.dir.join("proposed.txt");
    std::fs::write(&list, &proposed.stdout).unwrap();
    let proposal = text(&proposed.stdout);
    assert!(proposal.contains("\n.shop.test\n"), "{proposal}");
    assert!(
        proposal.contains("# 2 connections from 1 client only: check it\napi.vendor.test\n"),
        "{proposal}"
    );

    let run = |args: &[&str]| {
        std::process::Command::new(portcullis)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    let list = list.to_str().unwrap();
    assert_eq!(run(&["check", list]), Some(0));
    assert_eq!(
        run(&["match", list, "d.shop.test", "api.vendor.test"]),
        Some(0)
    );
    assert_eq!(run(&["match", list, "www.vendor.test"]), Some(1));
}

#[test]
fn with_verify_dst_dns_an_allowed_name_reaches_only_its_own_addresses() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (server, _) = recorder(&t.upstream, &[addr(RAW_V4, 443), addr(WEB_V4, 443)]);
    let (_web, requests) = http_server(&t.upstream, &[addr(RAW_V4, 80), addr(WEB_V4, 80)]);
    // A real DNS server in the upstream namespace is the gateway's only
    // one: www.example.test is 203.0.113.10, nowhere.example.test does
    // not exist.
    let dns = DnsServer::start(&[(&t.upstream, addr(NAMESERVER, 53))]);
    dns.set(
        "www.example.test",
        Answer::All(vec![RAW_V4.parse().unwrap()], 60),
    );
    t.start_portcullis_with_dns(NAMESERVER, ALLOWLIST, &["--verify-dst", "dns"]);

    // To the name's own address: forwarded.
    t.exchange(addr(RAW_V4, 443), TLS12_HELLO);
    wait_until("the hello upstream", Duration::from_secs(5), || {
        server.accepted() == 1
    });
    // The same allowed name to another address, as `curl --resolve
    // www.example.test:443:203.0.113.20` sends it: refused.
    assert_eq!(
        t.exchange(addr(WEB_V4, 443), TLS12_HELLO),
        alert::ACCESS_DENIED
    );
    // An allowed name that does not resolve at all: refused, for a reason
    // of its own.
    let unresolvable = hello::with_server_name(TLS12_HELLO, "nowhere.example.test");
    assert_eq!(
        t.exchange(addr(RAW_V4, 443), &unresolvable),
        alert::ACCESS_DENIED
    );
    wait_until(
        "the unresolvable audit line",
        Duration::from_secs(5),
        || audited(&t, "unresolvable").len() == 1,
    );
    // HTTP: the Host decides the same way.
    let right = text(&http(&t, "www.example.test", RAW_V4, "/right").stdout);
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    let wrong = text(&http(&t, "www.example.test", WEB_V4, "/wrong").stdout);
    assert!(wrong.starts_with("HTTP/1.1 403"), "{wrong}");
    assert_eq!(*requests.lock().unwrap(), ["www.example.test /right"]);
    assert_eq!(server.accepted(), 1, "nothing spoofed went upstream");

    wait_until("two spoofed audit lines", Duration::from_secs(5), || {
        audited(&t, "spoofed").len() == 2
    });
    // The name matched an entry, but no entry admitted the connection:
    // no rule in the audit, no hit on it. One TLS connection and one HTTP
    // request were admitted.
    for line in audited(&t, "spoofed") {
        assert!(line["rule"].is_null(), "{line}");
    }
    assert!(metric(
        &t,
        r#"portcullis_rule_hits_total{policy="default",rule=".example.test"} 2"#
    ));
    assert!(metric(
        &t,
        r#"portcullis_denied_total{policy="default",proto="tls",reason="spoofed"} 1"#
    ));
    assert!(metric(
        &t,
        r#"portcullis_denied_total{policy="default",proto="tls",reason="unresolvable"} 1"#
    ));
}

/// Client addresses in three policies: the default, `ci`'s /25 (and /65)
/// and, inside it, `runner`'s one address.
const DEFAULT_SRC: &str = "192.0.2.2";
const CI_SRC: &str = "192.0.2.130";
const CI_SRC6: &str = "2001:db8:1:0:8000::2";
const RUNNER_SRC: &str = "192.0.2.131";

/// Whether a hello for `name` from `src` was forwarded (the recorder
/// answers nothing and closes) rather than refused with an alert.
fn forwarded(t: &Topology, src: &str, dst: &str, name: &str) -> bool {
    let mut s = t.connect_from(src.parse().unwrap(), addr(dst, 443));
    s.write_all(&hello::with_server_name(TLS12_HELLO, name))
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    match read_all(&mut s).as_slice() {
        [] => true,
        answer if answer == alert::ACCESS_DENIED => false,
        other => panic!("{name} from {src}: unexpected answer {other:?}"),
    }
}

#[test]
fn each_source_subnet_is_decided_by_its_own_policy_and_list() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    for src in [CI_SRC, RUNNER_SRC] {
        t.client
            .ip(&["addr", "add", &format!("{src}/24"), "dev", "eth0"]);
    }
    t.client.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{CI_SRC6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let (_raw, _) = recorder(&t.upstream, &[addr(RAW_V4, 443), addr(RAW_V6, 443)]);
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let list = |name: &str, text: &str| {
        let path = t.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let default = list("default.txt", "default.example.test\n");
    let ci = list("ci.txt", "ci.example.test\n");
    let runner = list("runner.txt", "runner.example.test\n");
    let config = t.dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "allowlist = \"{default}\"\nrefresh = \"1h\"\n\n\
             [policy.ci]\nsources = [\"192.0.2.128/25\", \"2001:db8:1:0:8000::/65\"]\nallowlist = \"{ci}\"\n\n\
             [policy.runner]\nsources = [\"{RUNNER_SRC}\"]\nallowlist = \"{runner}\"\n"
        ),
    )
    .unwrap();
    t.launch(&[], &["--config", config.to_str().unwrap()], &[]);
    assert_eq!(t.admin_status("/readyz"), Some(200));

    // Each client gets its own policy's list, and only that one: the most
    // specific block wins, lists are not merged.
    let cases = [
        (DEFAULT_SRC, "default.example.test", true),
        (DEFAULT_SRC, "ci.example.test", false),
        (CI_SRC, "ci.example.test", true),
        (CI_SRC, "default.example.test", false),
        (CI_SRC, "runner.example.test", false),
        (RUNNER_SRC, "runner.example.test", true),
        (RUNNER_SRC, "ci.example.test", false),
    ];
    for (src, name, allowed) in cases {
        assert_eq!(
            forwarded(&t, src, RAW_V4, name),
            allowed,
            "{name} from {src}"
        );
    }
    assert!(forwarded(&t, CI_SRC6, RAW_V6, "ci.example.test"));
    assert!(!forwarded(&t, CI_SRC6, RAW_V6, "default.example.test"));
    // Plain HTTP follows the same policies.
    let status_from = |src, name| http_status_from(&t, src, name, WEB_V4);
    assert_eq!(status_from(CI_SRC, "ci.example.test"), 200);
    assert_eq!(status_from(CI_SRC, "default.example.test"), 403);
    assert_eq!(status_from(DEFAULT_SRC, "default.example.test"), 200);

    // Audit lines and metrics name the policy.
    wait_until("every audit line", Duration::from_secs(5), || {
        t.audit().len() == 12
    });
    let policy_of = |src: &str, name: &str| -> Vec<String> {
        t.audit()
            .iter()
            .filter(|r| r["name"] == name && r["src"].as_str().unwrap().contains(src))
            .map(|r| r["policy"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(policy_of(RUNNER_SRC, "ci.example.test"), ["runner"]);
    assert_eq!(policy_of(CI_SRC6, "ci.example.test"), ["ci"]);
    assert_eq!(policy_of(DEFAULT_SRC, "ci.example.test"), ["default"]);
    let scrape = Scrape::take(&t);
    let connections = |policy, verdict| {
        let labels = [("policy", policy), ("proto", "tls"), ("verdict", verdict)];
        scrape.get("portcullis_connections_total", &labels)
    };
    assert_eq!(
        (
            connections("default", "allow"),
            connections("default", "deny")
        ),
        (1.0, 1.0)
    );
    assert_eq!(
        (connections("ci", "allow"), connections("ci", "deny")),
        (2.0, 3.0)
    );
    assert_eq!(
        (
            connections("runner", "allow"),
            connections("runner", "deny")
        ),
        (1.0, 1.0)
    );
    let hits = |policy, rule| {
        scrape.get(
            "portcullis_rule_hits_total",
            &[("policy", policy), ("rule", rule)],
        )
    };
    assert_eq!(hits("ci", "ci.example.test"), 3.0, "two TLS, one HTTP");
    assert_eq!(hits("runner", "runner.example.test"), 1.0);

    // Lists reload independently: ci's changes, runner's breaks (and is
    // kept), default's stays as it is.
    std::fs::write(t.dir.join("ci.txt"), "ci.example.test\nci2.example.test\n").unwrap();
    std::fs::write(t.dir.join("runner.txt"), "runner.example.test\n192.0.2.1\n").unwrap();
    t.signal_portcullis(nix::sys::signal::Signal::SIGHUP);
    let reloads = |s: &Scrape, policy, result| {
        s.get(
            "portcullis_allowlist_reloads_total",
            &[("policy", policy), ("result", result)],
        )
    };
    wait_until("every policy reloaded", Duration::from_secs(5), || {
        let s = Scrape::take(&t);
        reloads(&s, "ci", "updated") == 1.0
            && reloads(&s, "runner", "failed") == 1.0
            && reloads(&s, "default", "unchanged") == 1.0
    });
    let s = Scrape::take(&t);
    assert_eq!(reloads(&s, "default", "updated"), 0.0);
    let entries = |policy| s.get("portcullis_allowlist_entries", &[("policy", policy)]);
    assert_eq!(
        (entries("default"), entries("ci"), entries("runner")),
        (1.0, 2.0, 1.0)
    );
    assert!(forwarded(&t, CI_SRC, RAW_V4, "ci2.example.test"));
    assert!(!forwarded(&t, RUNNER_SRC, RAW_V4, "ci2.example.test"));
    assert!(forwarded(&t, RUNNER_SRC, RAW_V4, "runner.example.test"));
    assert!(!forwarded(&t, DEFAULT_SRC, RAW_V4, "ci2.example.test"));
    let log = t.log();
    let named =
        |l: &&str| l.contains("name=runner") && l.contains("line 2") && l.contains("runner.txt");
    assert!(
        log.lines().any(|l| named(&l)),
        "the policy, file and line named"
    );
}

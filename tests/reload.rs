//! Allowlist sources and hot reload, end to end in the namespace topology:
//! a file edited under a running gateway, and a real S3 API (moto_server)
//! updated, broken, stopped and restarted. Needs root (and moto_server for
//! the S3 tests); under CI=true a missing one fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis_core::hello;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::client::{http_status, http_status_from};
use support::netns::{RAW_V4, Topology, WEB_V4, require_root};
use support::s3::{self, Moto, put_list, require_moto};
use support::scrape::Scrape;
use support::servers::{Server, http_server};
use support::{addr, wait_until};

use nix::sys::signal::Signal;

const CURL_HELLO: &[u8] = include_bytes!("../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
const LIST_A: &str = ".stable.test\na.flip.test\n";
const LIST_B: &str = ".stable.test\nb.flip.test\n";

/// Asserts which of the two flipping names the gateway lets through.
fn assert_enforcing(t: &Topology, list: &str) {
    let (allowed, denied) = if list == LIST_A {
        ("a.flip.test", "b.flip.test")
    } else {
        ("b.flip.test", "a.flip.test")
    };
    assert_eq!(
        http_status(t, allowed, WEB_V4),
        200,
        "{allowed} allowed\n{}",
        t.log()
    );
    assert_eq!(http_status(t, denied, WEB_V4), 403, "{denied} denied");
}

fn enforces(t: &Topology, list: &str) -> bool {
    let (allowed, denied) = if list == LIST_A {
        ("a.flip.test", "b.flip.test")
    } else {
        ("b.flip.test", "a.flip.test")
    };
    http_status(t, allowed, WEB_V4) == 200 && http_status(t, denied, WEB_V4) == 403
}

#[test]
fn file_edit_and_sighup_is_enforced_at_once() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(LIST_A, &["--refresh", "1h"]);
    assert_enforcing(&t, LIST_A);
    t.write_list(LIST_B);
    t.signal_portcullis(Signal::SIGHUP);
    wait_until("the SIGHUP reload", Duration::from_secs(5), || {
        t.log_count("allowlist updated") == 1
    });
    assert_enforcing(&t, LIST_B);
    // A broken edit is refused, naming the line, and the list stays.
    t.write_list(".stable.test\n\nnot a name\n");
    t.signal_portcullis(Signal::SIGHUP);
    wait_until("the refusal", Duration::from_secs(5), || {
        t.log_count("reload failed") == 1
    });
    assert!(t.log().contains("invalid list: line 3"), "{}", t.log());
    assert_enforcing(&t, LIST_B);
}

#[test]
fn file_edit_is_enforced_on_the_next_poll() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new();
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    t.start_portcullis(LIST_A, &["--refresh", "1s"]);
    assert_enforcing(&t, LIST_A);
    let edited = Instant::now();
    t.write_list(LIST_B);
    wait_until("the poll to see the edit", Duration::from_secs(5), || {
        enforces(&t, LIST_B)
    });
    // One refresh (1s ± 10%) plus the time to notice.
    assert!(
        edited.elapsed() < Duration::from_secs(3),
        "{:?}",
        edited.elapsed()
    );
}

/// Streams a pattern through an echoing upstream until told to stop,
/// checking every byte that comes back.
fn stream(
    t: &Topology,
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let mut s = t.connect(addr(RAW_V4, 443));
    std::thread::spawn(move || {
        let hello = hello::with_server_name(CURL_HELLO, "www.stable.test");
        s.write_all(&hello).map_err(|e| e.to_string())?;
        let mut echoed = vec![0u8; hello.len()];
        s.read_exact(&mut echoed)
            .map_err(|e| format!("hello echo: {e}"))?;
        let mut round = 0u8;
        let mut chunk = vec![0u8; 16 * 1024];
        let mut back = vec![0u8; chunk.len()];
        while !stop.load(Ordering::Relaxed) {
            chunk.fill(round);
            s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
            if back != chunk {
                return Err("corrupted echo".into());
            }
            moved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            round = round.wrapping_add(1);
        }
        Ok(())
    })
}

/// A new TLS connection for `name`: true if it reached the upstream.
fn tls_allowed(t: &Topology, name: &str) -> bool {
    let mut s = t.connect(addr(RAW_V4, 443));
    let hello = hello::with_server_name(CURL_HELLO, name);
    s.write_all(&hello).unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    // The echo upstream returns the hello (a handshake record); a refusal
    // is an alert record.
    match first[0] {
        22 => true,
        21 => false,
        other => panic!("unexpected first byte {other}"),
    }
}

#[test]
fn reloading_a_hundred_times_drops_no_connection_and_admits_nothing_unlisted() {
    if !require_root() {
        return;
    }
    const RELOADS: usize = 100;
    const STREAMS: usize = 8;
    let mut t = Topology::new();
    let _echo = Server::start(&t.upstream, &[addr(RAW_V4, 443)], |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    t.start_portcullis(LIST_A, &["--refresh", "1h"]);
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| stream(&t, stop.clone(), moved.clone()))
        .collect();

    let t = Arc::new(t);
    let churn = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut opened = 0;
            while !stop.load(Ordering::Relaxed) {
                assert!(
                    tls_allowed(&t, "new.stable.test"),
                    "a listed name was refused mid-reload"
                );
                opened += 1;
            }
            opened
        })
    };
    for i in 1..=RELOADS {
        let list = if i % 2 == 0 { LIST_A } else { LIST_B };
        t.write_list(list);
        t.signal_portcullis(Signal::SIGHUP);
        wait_until("the reload", Duration::from_secs(5), || {
            t.log_count("allowlist updated") == i
        });
        let (allowed, denied) = if list == LIST_A {
            ("a.flip.test", "b.flip.test")
        } else {
            ("b.flip.test", "a.flip.test")
        };
        assert!(tls_allowed(&t, allowed), "reload {i}: {allowed} must pass");
        assert!(
            !tls_allowed(&t, denied),
            "reload {i}: {denied} must be refused"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.join()
            .unwrap()
            .expect("a long-lived connection failed during reloads");
    }
    let opened = churn.join().unwrap();
    assert!(opened > 0);
    assert!(moved.load(Ordering::Relaxed) > 0);
    assert_eq!(t.log_count("allowlist updated"), RELOADS);
}

/// A topology with an HTTP upstream, moto holding `list`, and portcullis
/// serving it from S3 and ready. None when the test cannot run here.
fn s3_gateway(list: &str, refresh: &str) -> Option<(Topology, Moto, Server)> {
    if !require_root() || !require_moto() {
        return None;
    }
    let mut t = Topology::new();
    let (web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let moto = Moto::start(&t);
    put_list(&t.gateway, list);
    s3::start_portcullis(&mut t, refresh);
    wait_until("ready", Duration::from_secs(10), || {
        t.admin_status("/readyz") == Some(200)
    });
    Some((t, moto, web))
}

#[test]
fn s3_update_is_enforced_within_one_refresh_and_unchanged_polls_cost_a_304() {
    let Some((t, moto, _web)) = s3_gateway(LIST_A, "2s") else {
        return;
    };
    assert_enforcing(&t, LIST_A);
    wait_until("an unchanged poll", Duration::from_secs(10), || {
        moto.gets_with_status(304) >= 1
    });
    let updated = Instant::now();
    put_list(&t.gateway, LIST_B);
    wait_until("the new list", Duration::from_secs(10), || {
        enforces(&t, LIST_B)
    });
    assert!(
        updated.elapsed() < Duration::from_secs(4),
        "within one refresh: {:?}",
        updated.elapsed()
    );
}

#[test]
fn s3_sighup_fetches_at_once() {
    let Some((t, _moto, _web)) = s3_gateway(LIST_A, "1h") else {
        return;
    };
    put_list(&t.gateway, LIST_B);
    t.signal_portcullis(Signal::SIGHUP);
    wait_until("the SIGHUP fetch", Duration::from_secs(3), || {
        enforces(&t, LIST_B)
    });
}

#[test]
fn s3_outage_keeps_the_last_good_list_and_updates_resume_after() {
    let Some((t, mut moto, _web)) = s3_gateway(LIST_A, "1s") else {
        return;
    };
    moto.stop();
    wait_until("failed polls", Duration::from_secs(10), || {
        t.log_count("reload failed") >= 2
    });
    assert!(t.log().contains("keeping the list in force"));
    assert_enforcing(&t, LIST_A);
    assert_eq!(
        t.admin_status("/readyz"),
        Some(200),
        "still ready on the last good list"
    );
    moto.resume(&t.gateway);
    put_list(&t.gateway, LIST_B);
    wait_until("updates to resume", Duration::from_secs(10), || {
        enforces(&t, LIST_B)
    });
}

#[test]
fn s3_malformed_and_empty_objects_are_refused_and_the_list_stays() {
    let Some((t, _moto, _web)) = s3_gateway(LIST_A, "1h") else {
        return;
    };

    put_list(&t.gateway, ".stable.test\n.co.uk\n");
    t.signal_portcullis(Signal::SIGHUP);
    wait_until("the refusal", Duration::from_secs(5), || {
        t.log_count("reload failed") == 1
    });
    assert!(t.log().contains("invalid list: line 2"), "{}", t.log());
    assert_enforcing(&t, LIST_A);
    // `portcullis check` reads S3 the same way and names the line.
    let check = |t: &Topology| {
        t.gateway
            .command(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check", s3::URL])
            .envs(s3::ENV)
            .output()
            .unwrap()
    };
    let out = check(&t);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}: line 2", s3::URL)), "{err}");

    put_list(&t.gateway, "");
    t.signal_portcullis(Signal::SIGHUP);
    wait_until("the refusal", Duration::from_secs(5), || {
        t.log_count("reload failed") == 2
    });
    assert!(t.log().contains("the new list is empty"), "{}", t.log());
    assert_enforcing(&t, LIST_A);
    put_list(&t.gateway, LIST_B);
    assert_eq!(check(&t).status.code(), Some(0));
}

#[test]
fn restart_during_an_s3_outage_starts_from_the_cache() {
    let Some((mut t, mut moto, _web)) = s3_gateway(LIST_B, "1h") else {
        return;
    };
    t.stop_portcullis(Signal::SIGTERM, Duration::from_secs(10));
    moto.stop();
    let cache = std::fs::read_dir(t.dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cache"))
        .expect("a cache file");
    let written = std::fs::metadata(&cache).unwrap().modified().unwrap();
    let written = written
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Time passes: the restart must not claim the list is current now.
    std::thread::sleep(Duration::from_millis(2100));

    s3::start_portcullis(&mut t, "1h");
    assert!(
        t.log().contains("starting from the cached allowlist"),
        "{}",
        t.log()
    );
    assert_eq!(t.admin_status("/readyz"), Some(200));
    assert_enforcing(&t, LIST_B);
    let confirmed = Scrape::take(&t).get(
        "portcullis_allowlist_last_success_timestamp_seconds",
        &[("policy", "default")],
    );
    assert_eq!(
        confirmed, written as f64,
        "confirmed current when cached, not at restart"
    );
}

#[test]
fn without_cache_or_s3_everything_is_denied_until_s3_returns() {
    if !require_root() || !require_moto() {
        return;
    }
    let mut t = Topology::new();
    let (web, log) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    s3::start_portcullis(&mut t, "2s");
    assert_eq!(t.admin_status("/readyz"), Some(503));
    assert_eq!(http_status(&t, "a.flip.test", WEB_V4), 503, "fail closed");
    assert_eq!(
        http_status(&t, "www.stable.test", WEB_V4),
        503,
        "fail closed"
    );
    let moto = Moto::start(&t);
    put_list(&t.gateway, LIST_A);
    wait_until("the list to load", Duration::from_secs(15), || {
        t.admin_status("/readyz") == Some(200)
    });
    assert_enforcing(&t, LIST_A);
    drop(moto);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .all(|l| !l.starts_with("b.flip.test"))
    );
    assert!(web.accepted() >= 1);
}

#[test]
fn an_s3_policy_loads_caches_and_fails_on_its_own() {
    if !require_root() || !require_moto() {
        return;
    }
    const CI_SRC: &str = "192.0.2.130";
    let mut t = Topology::new();
    t.client
        .ip(&["addr", "add", &format!("{CI_SRC}/24"), "dev", "eth0"]);
    let (_web, _) = http_server(&t.upstream, &[addr(WEB_V4, 80)]);
    let default = t.write_list(LIST_A);
    let cache = t.dir.join("cache");
    let config = t.dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "allowlist = {:?}\ncache-dir = {:?}\nrefresh = \"1s\"\n\n\
             [policy.ci]\nsources = [\"192.0.2.128/25\"]\nallowlist = \"{}\"\n",
            default.to_str().unwrap(),
            cache.to_str().unwrap(),
            s3::URL
        ),
    )
    .unwrap();
    // S3 is down and nothing is cached: only the ci policy fails closed.
    t.launch(&[], &["--config", config.to_str().unwrap()], &s3::ENV);
    assert_eq!(
        t.admin_status("/readyz"),
        Some(503),
        "not every policy has a list"
    );
    assert_eq!(http_status_from(&t, CI_SRC, "a.flip.test", WEB_V4), 503);
    assert_enforcing(&t, LIST_A);

    let mut moto = Moto::start(&t);
    put_list(&t.gateway, LIST_B);
    wait_until("ready", Duration::from_secs(15), || {
        t.admin_status("/readyz") == Some(200)
    });
    assert_eq!(http_status_from(&t, CI_SRC, "b.flip.test", WEB_V4), 200);
    assert_eq!(http_status_from(&t, CI_SRC, "a.flip.test", WEB_V4), 403);
    assert_enforcing(&t, LIST_A);
    // Cached in a directory of its own, apart from any default S3 list.
    let cached = std::fs::read_dir(cache.join("policies/ci"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(cached.len(), 1);
    assert!(cached[0].ends_with(LIST_B), "{}", cached[0]);

    // An outage keeps ci's list, and the default's file still reloads.
    moto.stop();
    t.write_list(LIST_B);
    wait_until("the default list reloaded", Duration::from_secs(10), || {
        enforces(&t, LIST_B)
    });
    assert_eq!(http_status_from(&t, CI_SRC, "b.flip.test", WEB_V4), 200);
}

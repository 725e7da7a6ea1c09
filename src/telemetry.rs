//! Metrics. Every name, its kind, its labels and its help text are in
//! [`FAMILIES`]; label values come from closed enums (proto, verdict,
//! reason, kind), never from a peer, so the series count stays bounded.
//! A denied name goes to the audit log, never into a label.
//!
//! Event counts and timings go through the `metrics` facade into the
//! Prometheus recorder. The allowlist families (entries, reloads, version,
//! per-rule hits) describe the list in force and are rendered from it at
//! scrape time, so a rule dropped by a reload stops being exported at once.

use crate::allowlist::Live;
use crate::proxy::Record;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

pub const CONNECTIONS: &str = "portcullis_connections_total";
pub const DENIED: &str = "portcullis_denied_total";
pub const WOULD_DENY: &str = "portcullis_would_deny_total";
pub const ENFORCING: &str = "portcullis_enforcing";
pub const ACTIVE: &str = "portcullis_active_connections";
pub const BYTES: &str = "portcullis_bytes_total";
pub const UPSTREAM_ERRORS: &str = "portcullis_upstream_errors_total";
pub const ACCEPT_ERRORS: &str = "portcullis_accept_errors_total";
pub const LIMIT_REJECTIONS: &str = "portcullis_connection_limit_rejections_total";
pub const HELLO_DURATION: &str = "portcullis_hello_duration_seconds";
pub const CONNECT_DURATION: &str = "portcullis_upstream_connect_duration_seconds";
pub const CONNECTION_DURATION: &str = "portcullis_connection_duration_seconds";
pub const AUDIT_DROPPED: &str = "portcullis_audit_records_dropped_total";
pub const BUILD_INFO: &str = "portcullis_build_info";
pub const LIST_LOADED: &str = "portcullis_allowlist_loaded";
pub const LIST_ENTRIES: &str = "portcullis_allowlist_entries";
pub const LIST_RELOADS: &str = "portcullis_allowlist_reloads_total";
pub const LIST_LAST_SUCCESS: &str = "portcullis_allowlist_last_success_timestamp_seconds";
pub const LIST_INFO: &str = "portcullis_allowlist_info";
pub const RULE_HITS: &str = "portcullis_rule_hits_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family as exported.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

/// Every family portcullis exports.
pub const FAMILIES: &[Family] = &[
    family(
        CONNECTIONS,
        Kind::Counter,
        &["proto", "verdict"],
        "Connections ended, by listener and verdict (allow, deny, error).",
    ),
    family(
        DENIED,
        Kind::Counter,
        &["proto", "reason"],
        "Connections refused, by reason.",
    ),
    family(
        WOULD_DENY,
        Kind::Counter,
        &["proto", "reason"],
        "Monitor mode: connections forwarded that enforce mode would have refused, by reason.",
    ),
    family(
        ENFORCING,
        Kind::Gauge,
        &[],
        "1 when policy refusals are carried out; 0 in monitor mode.",
    ),
    family(
        ACTIVE,
        Kind::Gauge,
        &["proto"],
        "Connections being served now.",
    ),
    family(
        BYTES,
        Kind::Counter,
        &["proto", "direction"],
        "Bytes forwarded, counted when a connection ends; upstream is client to server.",
    ),
    family(
        UPSTREAM_ERRORS,
        Kind::Counter,
        &["kind"],
        "Allowed connections that failed at the upstream (connect refused or timed out, bad response).",
    ),
    family(
        ACCEPT_ERRORS,
        Kind::Counter,
        &[],
        "Failed accepts (e.g. out of file descriptors).",
    ),
    family(
        LIMIT_REJECTIONS,
        Kind::Counter,
        &[],
        "Connections reset at once because --max-connections were being served.",
    ),
    family(
        HELLO_DURATION,
        Kind::Histogram,
        &["proto"],
        "Time from accept until the ClientHello or first request head was complete.",
    ),
    family(
        CONNECT_DURATION,
        Kind::Histogram,
        &["proto"],
        "Time to establish upstream TCP connections that succeeded.",
    ),
    family(
        CONNECTION_DURATION,
        Kind::Histogram,
        &["proto", "verdict"],
        "Lifetime of connections, from accept to close.",
    ),
    family(
        AUDIT_DROPPED,
        Kind::Counter,
        &[],
        "Audit records dropped because the audit log could not keep up or could not be written.",
    ),
    family(
        BUILD_INFO,
        Kind::Gauge,
        &["version"],
        "Always 1; the running version as a label.",
    ),
    family(
        LIST_LOADED,
        Kind::Gauge,
        &[],
        "1 once an allowlist is in force; 0 while everything is denied for want of one.",
    ),
    family(
        LIST_ENTRIES,
        Kind::Gauge,
        &[],
        "Entries in the allowlist in force.",
    ),
    family(
        LIST_RELOADS,
        Kind::Counter,
        &["result"],
        "Allowlist reload attempts: updated, unchanged, or failed (the list in force was kept).",
    ),
    family(
        LIST_LAST_SUCCESS,
        Kind::Gauge,
        &[],
        "Unix time the list in force was last confirmed current with its source (0: never).",
    ),
    family(
        LIST_INFO,
        Kind::Gauge,
        &["source", "etag"],
        "Always 1; the allowlist source and the version (S3 ETag) in force as labels.",
    ),
    family(
        RULE_HITS,
        Kind::Counter,
        &["rule"],
        "Admissions per allowlist entry (a TLS connection, or an HTTP request); entries no longer in the list are not exported.",
    ),
];

/// Seconds, for the phases of a connection before data flows.
const SETUP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds, for whole connections: from refusals to long downloads.
const LIFETIME_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

fn family_of(name: &str) -> &'static Family {
    FAMILIES
        .iter()
        .find(|f| f.name == name)
        .expect("every name has a family")
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The Prometheus side of the metrics, and the list whose families are
/// rendered at scrape time.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    live: Arc<Live>,
    source: String,
}

impl Exporter {
    /// Installs the process-wide recorder (the first call does; later
    /// calls share it) and describes every family.
    pub fn install(live: Arc<Live>, source: String) -> Exporter {
        let handle = HANDLE.get_or_init(build).clone();
        Exporter {
            handle,
            live,
            source,
        }
    }

    /// Drains histogram samples into their buckets; call it periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        render_list(&mut out, &self.live, &self.source);
        out
    }
}

fn build() -> PrometheusHandle {
    let with_buckets = |builder: PrometheusBuilder, name: &str, buckets: &[f64]| {
        builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .expect("bucket lists are not empty")
    };
    let mut builder = PrometheusBuilder::new();
    builder = with_buckets(builder, HELLO_DURATION, SETUP_BUCKETS);
    builder = with_buckets(builder, CONNECT_DURATION, SETUP_BUCKETS);
    builder = with_buckets(builder, CONNECTION_DURATION, LIFETIME_BUCKETS);
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics will miss its events");
    }
    describe();
    let _ = HANDLES.set(Handles::register());
    handle
}

fn describe() {
    for f in FAMILIES {
        match f.kind {
            Kind::Counter => metrics::describe_counter!(f.name, f.help),
            Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
            Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
        }
    }
}

/// The series every connection touches, registered once at start: counting
/// a connection is then a few atomic adds, not a registry lookup (and a
/// label allocation) per series. Registering also exports each series
/// from the start, at zero, so rates and alerts work before the first
/// event rather than on an absent series.
struct Handles {
    /// By [`Proto`].
    by_proto: [ProtoSeries; 2],
    /// By [`ErrorKind`]; only the upstream kinds have a series.
    upstream_errors: [Option<Counter>; ErrorKind::ALL.len()],
}

struct ProtoSeries {
    active: Gauge,
    /// By [`Verdict::index`].
    connections: [Counter; 3],
    /// By [`Reason`].
    denied: [Counter; Reason::ALL.len()],
    /// By [`Reason`].
    would_deny: [Counter; Reason::ALL.len()],
    bytes_upstream: Counter,
    bytes_downstream: Counter,
    hello: Histogram,
    connect: Histogram,
    /// By [`Verdict::index`].
    duration: [Histogram; 3],
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

impl Handles {
    fn register() -> Handles {
        let by_proto = Proto::ALL.map(|proto| {
            let p = proto.as_str();
            ProtoSeries {
                active: metrics::gauge!(ACTIVE, "proto" => p),
                connections: Verdict::LABELS
                    .map(|v| metrics::counter!(CONNECTIONS, "proto" => p, "verdict" => v)),
                denied: Reason::ALL
                    .map(|r| metrics::counter!(DENIED, "proto" => p, "reason" => r.as_str())),
                would_deny: Reason::ALL
                    .map(|r| metrics::counter!(WOULD_DENY, "proto" => p, "reason" => r.as_str())),
                bytes_upstream: metrics::counter!(BYTES, "proto" => p, "direction" => "upstream"),
                bytes_downstream: metrics::counter!(BYTES, "proto" => p, "direction" => "downstream"),
                hello: metrics::histogram!(HELLO_DURATION, "proto" => p),
                connect: metrics::histogram!(CONNECT_DURATION, "proto" => p),
                duration: Verdict::LABELS
                    .map(|v| metrics::histogram!(CONNECTION_DURATION, "proto" => p, "verdict" => v)),
            }
        });
        let upstream_errors = ErrorKind::ALL.map(|kind| {
            kind.is_upstream()
                .then(|| metrics::counter!(UPSTREAM_ERRORS, "kind" => kind.as_str()))
        });
        for series in &by_proto {
            series.active.set(0.0);
            let counters = series.connections.iter().chain(&series.denied);
            for counter in counters.chain(&series.would_deny) {
                counter.increment(0);
            }
            series.bytes_upstream.increment(0);
            series.bytes_downstream.increment(0);
        }
        for counter in upstream_errors.iter().flatten() {
            counter.increment(0);
        }
        metrics::counter!(ACCEPT_ERRORS).increment(0);
        metrics::counter!(LIMIT_REJECTIONS).increment(0);
        metrics::counter!(AUDIT_DROPPED).increment(0);
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Handles {
            by_proto,
            upstream_errors,
        }
    }

    fn of(proto: Proto) -> Option<&'static ProtoSeries> {
        HANDLES.get().map(|h| &h.by_proto[proto as usize])
    }
}

/// Counts one ended connection.
pub fn connection_ended(rec: &Record) {
    let Some(handles) = HANDLES.get() else {
        return;
    };
    let series = &handles.by_proto[rec.proto as usize];
    let verdict = rec.verdict.index();
    series.connections[verdict].increment(1);
    match rec.verdict {
        Verdict::Allow => {}
        Verdict::Deny(reason) => series.denied[reason as usize].increment(1),
        Verdict::Error(kind) => {
            if let Some(counter) = &handles.upstream_errors[kind as usize] {
                counter.increment(1);
            }
        }
    }
    if let Some(reason) = rec.would_deny {
        series.would_deny[reason as usize].increment(1);
    }
    series.bytes_upstream.increment(rec.moved.up);
    series.bytes_downstream.increment(rec.moved.down);
    if let Some(hello) = rec.hello {
        series.hello.record(hello);
    }
    if let Some(connect) = rec.connect {
        series.connect.record(connect);
    }
    series.duration[verdict].record(rec.duration);
}

/// Counts a connection being served for as long as it lives.
pub struct Active(Proto);

impl Active {
    pub fn start(proto: Proto) -> Active {
        if let Some(series) = Handles::of(proto) {
            series.active.increment(1.0);
        }
        Active(proto)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(series) = Handles::of(self.0) {
            series.active.decrement(1.0);
        }
    }
}

pub fn set_enforcing(enforcing: bool) {
    metrics::gauge!(ENFORCING).set(f64::from(u8::from(enforcing)));
}

pub fn accept_error() {
    metrics::counter!(ACCEPT_ERRORS).increment(1);
}

pub fn limit_rejection() {
    metrics::counter!(LIMIT_REJECTIONS).increment(1);
}

pub fn audit_dropped(records: u64) {
    metrics::counter!(AUDIT_DROPPED).increment(records);
}

/// Appends the families that describe the list in force.
fn render_list(out: &mut String, live: &Live, source: &str) {
    let in_force = live.current();
    let stats = &live.stats;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);

    header(out, LIST_LOADED);
    let _ = writeln!(out, "{LIST_LOADED} {}", u8::from(live.is_loaded()));
    header(out, LIST_ENTRIES);
    let _ = writeln!(out, "{LIST_ENTRIES} {}", in_force.list.len());
    header(out, LIST_RELOADS);
    for (result, count) in [
        ("updated", &stats.updated),
        ("unchanged", &stats.unchanged),
        ("failed", &stats.failed),
    ] {
        let _ = writeln!(out, "{LIST_RELOADS}{{result=\"{result}\"}} {}", load(count));
    }
    header(out, LIST_LAST_SUCCESS);
    let _ = writeln!(
        out,
        "{LIST_LAST_SUCCESS} {}",
        load(&stats.last_success_unix)
    );
    header(out, LIST_INFO);
    let _ = writeln!(
        out,
        "{LIST_INFO}{{source=\"{}\",etag=\"{}\"}} 1",
        Escaped(source),
        Escaped(in_force.version.as_deref().unwrap_or(""))
    );
    header(out, RULE_HITS);
    for rule in in_force.rules() {
        let _ = writeln!(
            out,
            "{RULE_HITS}{{rule=\"{}\"}} {}",
            Escaped(&rule.text),
            rule.hits.load(Ordering::Relaxed)
        );
    }
}

fn header(out: &mut String, name: &str) {
    let f = family_of(name);
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
}

/// A label value escaped for the text format (backslash, quote, newline).
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allowlist::parse;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("portcullis_"), "{}", f.name);
            assert!(
                f.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                f.name
            );
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            if f.kind == Kind::Histogram {
                assert!(f.name.ends_with("_seconds"), "{}", f.name);
            }
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
        }
    }

    #[test]
    fn list_families_follow_the_list_in_force_and_escape_labels() {
        let live = Live::with(parse(".example.com\nold.example.org\n").unwrap());
        live.current().admit("www.example.com");
        live.install(parse(".example.com\n").unwrap(), Some("\"abc\\1\"".into()));
        live.stats.failed.fetch_add(2, Ordering::Relaxed);
        let mut out = String::new();
        render_list(&mut out, &live, "s3://bucket/list.txt");
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "portcullis_allowlist_loaded 1",
                "portcullis_allowlist_entries 1",
                "portcullis_allowlist_reloads_total{result=\"updated\"} 0",
                "portcullis_allowlist_reloads_total{result=\"unchanged\"} 0",
                "portcullis_allowlist_reloads_total{result=\"failed\"} 2",
                "portcullis_allowlist_last_success_timestamp_seconds 0",
                "portcullis_allowlist_info{source=\"s3://bucket/list.txt\",etag=\"\\\"abc\\\\1\\\"\"} 1",
                "portcullis_rule_hits_total{rule=\".example.com\"} 1",
            ]
        );
        assert!(out.contains("# TYPE portcullis_rule_hits_total counter\n"));
    }
}

//! Metrics. Every name, its kind, its labels and its help text are in
//! [`FAMILIES`]; label values come from closed enums (proto, verdict,
//! reason, kind) or the config (policy names, at most
//! [`MAX_POLICIES`](crate::policy::MAX_POLICIES) + 1), never from a peer,
//! so the series count stays bounded. A denied name goes to the audit log,
//! never into a label.
//!
//! Event counts and timings go through the `metrics` facade into the
//! Prometheus recorder. The allowlist families (entries, reloads, version,
//! per-rule hits) describe the list in force and are rendered from it at
//! scrape time (`lists`), so a rule dropped by a reload stops being
//! exported at once.

mod lists;

use crate::policy::{Policies, PolicyName};
use crate::record::Record;
use crate::verdict::LookupResult;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use lists::{ListView, render_lists};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
pub const REPINNED: &str = "portcullis_repinned_total";
pub const DNS_LOOKUPS: &str = "portcullis_dns_lookups_total";
pub const DNS_CACHE_HITS: &str = "portcullis_dns_cache_hits_total";
pub const HA_ROUTE_MOVES: &str = "portcullis_ha_route_moves_total";
pub const HA_API_ERRORS: &str = "portcullis_ha_api_errors_total";
pub const HA_UNSERVED_ROUTES: &str = "portcullis_ha_unserved_routes";
pub const HA_ROUTES_HELD: &str = "portcullis_ha_routes_held";
pub const HA_READY: &str = "portcullis_ha_ready";
pub const HA_AZ_GATEWAYS: &str = "portcullis_ha_az_gateways";
pub const ENA_EXCEEDED: &str = "portcullis_ena_allowance_exceeded_total";
pub const ENA_CONNTRACK_AVAILABLE: &str = "portcullis_ena_conntrack_allowance_available";
pub const SHIP_RECORDS: &str = "portcullis_ship_records_total";
pub const SHIP_TRUNCATED: &str = "portcullis_ship_records_truncated_total";
pub const SHIP_ERRORS: &str = "portcullis_ship_errors_total";
pub const SHIP_BEHIND_BYTES: &str = "portcullis_ship_behind_bytes";
pub const SHIP_LAST_SUCCESS: &str = "portcullis_ship_last_success_timestamp_seconds";

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
        &["policy", "proto", "verdict"],
        "Connections ended, by source policy, listener and verdict (allow, deny, error).",
    ),
    family(
        DENIED,
        Kind::Counter,
        &["policy", "proto", "reason"],
        "Connections refused, by source policy and reason.",
    ),
    family(
        WOULD_DENY,
        Kind::Counter,
        &["policy", "proto", "reason"],
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
        &["limit"],
        "Connections refused at once (TLS alert or 503, else reset) because --max-connections (limit=total) or the client's --max-connections-per-source (limit=per_source) were being served.",
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
        &["policy"],
        "1 once the policy's allowlist is in force; 0 while it denies everything for want of one.",
    ),
    family(
        LIST_ENTRIES,
        Kind::Gauge,
        &["policy"],
        "Entries in the policy's allowlist in force.",
    ),
    family(
        LIST_RELOADS,
        Kind::Counter,
        &["policy", "result"],
        "Allowlist reload attempts: updated, unchanged, or failed (the list in force was kept).",
    ),
    family(
        LIST_LAST_SUCCESS,
        Kind::Gauge,
        &["policy"],
        "Unix time the list in force was last confirmed current with its source (0: never).",
    ),
    family(
        LIST_INFO,
        Kind::Gauge,
        &["policy", "source", "etag"],
        "Always 1; each policy's allowlist source and the version (S3 ETag) in force as labels.",
    ),
    family(
        RULE_HITS,
        Kind::Counter,
        &["policy", "rule"],
        "Admissions per policy and allowlist entry (a TLS connection, or an HTTP request); entries no longer in the list are not exported.",
    ),
    family(
        REPINNED,
        Kind::Counter,
        &["proto"],
        "--verify-dst pin: connections sent to one of the name's own addresses instead of the address the client dialled.",
    ),
    family(
        DNS_LOOKUPS,
        Kind::Counter,
        &["result"],
        "Queries the gateway sent for admitted names (A and AAAA), by result: ok, nxdomain, no_addresses, error, timeout.",
    ),
    family(
        DNS_CACHE_HITS,
        Kind::Counter,
        &[],
        "Admitted names answered from the gateway's DNS cache (addresses or a recent failure) without a query.",
    ),
];

/// Every family the HA agent (`portcullis ha`) exports, on its own port.
pub const HA_FAMILIES: &[Family] = &[
    family(
        HA_ROUTE_MOVES,
        Kind::Counter,
        &["reason"],
        "Default routes this gateway moved to itself: failover (holder dead or down), handover (holder leaving), giveback (the AZ's own gateway is back), reclaim (the route pointed at no gateway of the fleet).",
    ),
    family(
        HA_API_ERRORS,
        Kind::Counter,
        &["kind"],
        "EC2 API calls that failed: throttled, api (refused), unreachable, malformed, credentials.",
    ),
    family(
        HA_UNSERVED_ROUTES,
        Kind::Gauge,
        &[],
        "Default routes of the fleet's route tables that point at no serving gateway, as this gateway last read them.",
    ),
    family(
        HA_ROUTES_HELD,
        Kind::Gauge,
        &[],
        "Default routes pointing at this gateway.",
    ),
    family(
        HA_READY,
        Kind::Gauge,
        &[],
        "1 while this gateway's own checks pass (its proxy ready, the internet reachable), so it may serve and take routes.",
    ),
    family(
        HA_AZ_GATEWAYS,
        Kind::Gauge,
        &["az"],
        "Serving gateways (running, ready, not dead) in each AZ of the fleet's layout, as this gateway last read the fleet; az is one of the configured AZ names.",
    ),
    family(
        ENA_EXCEEDED,
        Kind::Counter,
        &["allowance"],
        "Packets EC2 queued or dropped because this instance went over an allowance (the ENA driver's counters): bw_in, bw_out, pps, conntrack, linklocal.",
    ),
    family(
        ENA_CONNTRACK_AVAILABLE,
        Kind::Gauge,
        &[],
        "Connections EC2 can still track for this instance before it drops new ones.",
    ),
];

/// Every family the audit shipper (`portcullis ship`) exports, on its own
/// port.
pub const SHIP_FAMILIES: &[Family] = &[
    family(
        SHIP_RECORDS,
        Kind::Counter,
        &["result"],
        "Audit records put to CloudWatch Logs: shipped, or rejected (CloudWatch refused them: older than the group keeps, far in the future, or a batch it would not take).",
    ),
    family(
        SHIP_TRUNCATED,
        Kind::Counter,
        &[],
        "Audit records longer than a CloudWatch event (256 KiB), shipped cut short.",
    ),
    family(
        SHIP_ERRORS,
        Kind::Counter,
        &["kind"],
        "Failed calls and other trouble: throttled, not_found, api, unreachable, credentials, malformed, state (the position could not be saved), position_lost (the file to resume in is gone).",
    ),
    family(
        SHIP_BEHIND_BYTES,
        Kind::Gauge,
        &[],
        "Bytes of the audit file written and not yet shipped.",
    ),
    family(
        SHIP_LAST_SUCCESS,
        Kind::Gauge,
        &[],
        "When a batch was last put (Unix seconds).",
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

/// The Prometheus side of the metrics, and the lists whose families are
/// rendered at scrape time.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    lists: Arc<[ListView]>,
}

impl Exporter {
    /// Installs the process-wide recorder (the first call does; later
    /// calls share it, with the first call's policies), describes every
    /// family and registers the series of every policy.
    pub fn install(policies: &Policies) -> Exporter {
        let handle = HANDLE.get_or_init(build).clone();
        let names: Vec<&PolicyName> = policies.iter().map(|p| &p.name).collect();
        HANDLES.get_or_init(|| Handles::register(&names));
        let lists = policies
            .iter()
            .map(|p| ListView {
                policy: p.name.clone(),
                source: p.source.to_string(),
                live: p.live.clone(),
            })
            .collect();
        Exporter { handle, lists }
    }

    /// The HA agent's exporter: its own families, no lists.
    pub fn install_ha() -> Exporter {
        Self::install_agent(HA_FAMILIES)
    }

    /// The audit shipper's exporter: its own families, no lists.
    pub fn install_ship() -> Exporter {
        Self::install_agent(SHIP_FAMILIES)
    }

    /// A helper process's exporter: `families`, no lists.
    fn install_agent(families: &'static [Family]) -> Exporter {
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!("a metrics recorder was already installed");
                }
                for f in families {
                    match f.kind {
                        Kind::Counter => metrics::describe_counter!(f.name, f.help),
                        Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
                        Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
                    }
                }
                handle
            })
            .clone();
        Exporter {
            handle,
            lists: Arc::from(Vec::new()),
        }
    }

    /// Drains histogram samples into their buckets; call it periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        render_lists(&mut out, &self.lists);
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
    /// By [`PolicyId`](crate::policy::PolicyId), then [`Proto`].
    decisions: Vec<[Decisions; 2]>,
    /// By [`ErrorKind`]; only the upstream kinds have a series.
    upstream_errors: [Option<Counter>; ErrorKind::ALL.len()],
    /// By [`Proto`].
    repinned: [Counter; 2],
    /// By [`LookupResult::index`].
    dns_lookups: [Counter; LookupResult::ALL.len()],
    dns_cache_hits: Counter,
}

struct ProtoSeries {
    active: Gauge,
    bytes_upstream: Counter,
    bytes_downstream: Counter,
    hello: Histogram,
    connect: Histogram,
    /// By [`Verdict::index`].
    duration: [Histogram; 3],
}

/// The outcomes one policy decided on one listener.
struct Decisions {
    /// By [`Verdict::index`].
    connections: [Counter; 3],
    /// By [`Reason`].
    denied: [Counter; Reason::ALL.len()],
    /// By [`Reason`].
    would_deny: [Counter; Reason::ALL.len()],
}

impl Decisions {
    fn register(policy: &PolicyName, proto: Proto) -> Decisions {
        let labels = |key: &'static str, value: &str| {
            [
                ("policy", policy.to_string()),
                ("proto", proto.as_str().to_string()),
                (key, value.to_string()),
            ]
        };
        let by_reason = |family: &'static str| {
            Reason::ALL.map(|r| metrics::counter!(family, &labels("reason", r.as_str())))
        };
        Decisions {
            connections: Verdict::LABELS
                .map(|v| metrics::counter!(CONNECTIONS, &labels("verdict", v))),
            denied: by_reason(DENIED),
            would_deny: by_reason(WOULD_DENY),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Counter> {
        self.connections
            .iter()
            .chain(&self.denied)
            .chain(&self.would_deny)
    }
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

impl Handles {
    fn register(policies: &[&PolicyName]) -> Handles {
        let decisions: Vec<[Decisions; 2]> = policies
            .iter()
            .map(|policy| Proto::ALL.map(|proto| Decisions::register(policy, proto)))
            .collect();
        let by_proto = Proto::ALL.map(|proto| {
            let p = proto.as_str();
            ProtoSeries {
                active: metrics::gauge!(ACTIVE, "proto" => p),
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
        for counter in decisions.iter().flatten().flat_map(Decisions::all) {
            counter.increment(0);
        }
        for series in &by_proto {
            series.active.set(0.0);
            series.bytes_upstream.increment(0);
            series.bytes_downstream.increment(0);
        }
        for counter in upstream_errors.iter().flatten() {
            counter.increment(0);
        }
        let repinned = Proto::ALL.map(|p| metrics::counter!(REPINNED, "proto" => p.as_str()));
        let dns_lookups =
            LookupResult::ALL.map(|r| metrics::counter!(DNS_LOOKUPS, "result" => r.as_str()));
        let dns_cache_hits = metrics::counter!(DNS_CACHE_HITS);
        for counter in repinned.iter().chain(&dns_lookups) {
            counter.increment(0);
        }
        dns_cache_hits.increment(0);
        metrics::counter!(ACCEPT_ERRORS).increment(0);
        for full in crate::limit::Full::ALL {
            metrics::counter!(LIMIT_REJECTIONS, "limit" => full.as_str()).increment(0);
        }
        metrics::counter!(AUDIT_DROPPED).increment(0);
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Handles {
            by_proto,
            decisions,
            upstream_errors,
            repinned,
            dns_lookups,
            dns_cache_hits,
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
    // Registered for every policy the exporter was installed with.
    let decided = handles
        .decisions
        .get(rec.policy.index())
        .map(|d| &d[rec.proto as usize]);
    if let Some(decided) = decided {
        decided.connections[verdict].increment(1);
        if let Verdict::Deny(reason) = rec.verdict {
            decided.denied[reason as usize].increment(1);
        }
        if let Some(reason) = rec.would_deny {
            decided.would_deny[reason as usize].increment(1);
        }
    }
    if let Verdict::Error(kind) = rec.verdict
        && let Some(counter) = &handles.upstream_errors[kind as usize]
    {
        counter.increment(1);
    }
    if let (Some(upstream), Some(dst)) = (rec.upstream, rec.dst)
        && upstream != dst.0
    {
        handles.repinned[rec.proto as usize].increment(1);
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

/// Counts a query the gateway sent to its resolver.
pub fn dns_lookup(result: LookupResult) {
    if let Some(handles) = HANDLES.get() {
        handles.dns_lookups[result.index()].increment(1);
    }
}

/// Counts a name answered from the DNS cache.
pub fn dns_cache_hit() {
    if let Some(handles) = HANDLES.get() {
        handles.dns_cache_hits.increment(1);
    }
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

pub fn limit_rejection(full: crate::limit::Full) {
    metrics::counter!(LIMIT_REJECTIONS, "limit" => full.as_str()).increment(1);
}

pub fn audit_dropped(records: u64) {
    metrics::counter!(AUDIT_DROPPED).increment(records);
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

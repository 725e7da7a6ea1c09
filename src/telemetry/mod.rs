//! Metrics. Every name, its kind, its labels and its help text are in
//! [`FAMILIES`]; label values come from closed enums (proto, verdict,
//! reason, kind) or the config (policy names, at most
//! [`MAX_POLICIES`](crate::policy::MAX_POLICIES) + 1), never from a peer,
//! so the series count stays bounded. A denied name goes to the audit log,
//! never into a label.
//!
//! The gateway counts through [`Metrics`], handles registered once on a
//! Prometheus recorder of its own and passed to whoever counts; the HA
//! agent and the shipper, each alone in its process, use the `metrics`
//! facade's process-wide recorder. The allowlist families (entries, reloads, version,
//! per-rule hits) describe the list in force and are rendered from it at
//! scrape time (`lists`), so a rule dropped by a reload stops being
//! exported at once.

mod lists;

use crate::policy::{Policies, PolicyName};
use crate::record::Record;
use crate::verdict::LookupResult;
use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
use lists::{ListView, render_lists};
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::sync::Arc;

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
pub const DNS_CACHE_NAMES: &str = "portcullis_dns_cache_names";
pub const DNS_CACHE_ADDRESSES: &str = "portcullis_dns_cache_addresses";
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
pub const GWLB_PACKETS: &str = "portcullis_gwlb_packets_total";
pub const GWLB_BYTES: &str = "portcullis_gwlb_bytes_total";
pub const GWLB_DROPPED: &str = "portcullis_gwlb_dropped_total";
pub const GWLB_FLOWS: &str = "portcullis_gwlb_flows";
pub const GWLB_SERVING: &str = "portcullis_gwlb_serving";

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
        "Monitor mode: connections (on HTTP, requests) forwarded that enforce mode would have refused, by reason.",
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
        "Lookups of admitted names (A and AAAA), by result: ok, nxdomain, no_addresses, error, timeout; busy: not sent, the pending bound or the client's share was full.",
    ),
    family(
        DNS_CACHE_HITS,
        Kind::Counter,
        &[],
        "Admitted names answered from the gateway's DNS cache (addresses or a recent failure) without a query.",
    ),
    family(
        DNS_CACHE_NAMES,
        Kind::Gauge,
        &[],
        "Names whose addresses the gateway's DNS cache holds (at most 10,000).",
    ),
    family(
        DNS_CACHE_ADDRESSES,
        Kind::Gauge,
        &[],
        "Addresses the gateway's DNS cache holds for all names together (at most 200,000), its memory bound.",
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

/// Every family the GWLB tunnel (`portcullis gwlb`) exports, on its own port.
pub const GWLB_FAMILIES: &[Family] = &[
    family(
        GWLB_PACKETS,
        Kind::Counter,
        &["direction"],
        "GENEVE datagrams from the load balancer (from_gwlb) and back to it (to_gwlb).",
    ),
    family(
        GWLB_BYTES,
        Kind::Counter,
        &["direction"],
        "Bytes of those datagrams' UDP payloads (GENEVE header and inner packet).",
    ),
    family(
        GWLB_DROPPED,
        Kind::Counter,
        &["reason"],
        "Packets not carried: not_geneve, no_flow (names no flow), unknown_flow (toward a client whose flow never came from GWLB), table_full, too_big, send_failed.",
    ),
    family(
        GWLB_FLOWS,
        Kind::Gauge,
        &[],
        "Flows the tunnel knows the GENEVE header of.",
    ),
    family(
        GWLB_SERVING,
        Kind::Gauge,
        &[],
        "1 while the tunnel's device, routes and sockets are up.",
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

/// The Prometheus side of the gateway's metrics, and the lists whose
/// families are rendered at scrape time.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    lists: Arc<[ListView]>,
}

impl Exporter {
    /// A recorder of the gateway's own (not the process-wide one, so each
    /// gateway, and each test, counts apart), every family described and
    /// the series of every policy registered: what renders it, and the
    /// handles the data path counts with.
    pub fn new(policies: &Policies) -> (Exporter, Metrics) {
        let names: Vec<&PolicyName> = policies.iter().map(|p| &p.name).collect();
        let (handle, metrics) = Metrics::register(&names);
        let lists = policies
            .iter()
            .map(|p| ListView {
                policy: p.name.clone(),
                source: p.source.to_string(),
                live: p.live.clone(),
            })
            .collect();
        (Exporter { handle, lists }, metrics)
    }

    /// The HA agent's exporter: its own families, no lists.
    pub fn install_ha() -> Exporter {
        Self::install_agent(HA_FAMILIES)
    }

    /// The audit shipper's exporter: its own families, no lists.
    pub fn install_ship() -> Exporter {
        Self::install_agent(SHIP_FAMILIES)
    }

    /// The GWLB tunnel's exporter: its own families, no lists.
    pub fn install_gwlb() -> Exporter {
        Self::install_agent(GWLB_FAMILIES)
    }

    /// A helper process's exporter: `families`, no lists. Its recorder
    /// is the process-wide one, which the helper's `metrics::counter!`
    /// calls record into; a process runs one helper.
    fn install_agent(families: &'static [Family]) -> Exporter {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        describe(&recorder, families);
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed");
        }
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

fn recorder() -> PrometheusRecorder {
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
    describe(&recorder, FAMILIES);
    recorder
}

fn describe(recorder: &PrometheusRecorder, families: &[Family]) {
    for f in families {
        let (name, help) = (
            KeyName::from_const_str(f.name),
            SharedString::const_str(f.help),
        );
        match f.kind {
            Kind::Counter => recorder.describe_counter(name, None, help),
            Kind::Gauge => recorder.describe_gauge(name, None, help),
            Kind::Histogram => recorder.describe_histogram(name, None, help),
        }
    }
}

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Registers series on one recorder.
struct Registry<'r>(&'r PrometheusRecorder);

impl Registry<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.0.register_counter(&Self::key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.0.register_gauge(&Self::key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.0
            .register_histogram(&Self::key(name, labels), &METADATA)
    }
}

/// The series the gateway counts with, registered once at start on its
/// own recorder and passed to whoever counts (the proxy's context, the
/// resolver, the accept loops, the audit writer); cheap to clone.
/// Counting a connection is then a few atomic adds, not a registry lookup
/// (and a label allocation) per series. Registering also exports each
/// series from the start, at zero, so rates and alerts work before the
/// first event rather than on an absent series.
#[derive(Clone)]
pub struct Metrics(Arc<Handles>);

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
    dns_cache_names: Gauge,
    dns_cache_addresses: Gauge,
    accept_errors: Counter,
    /// By [`Full`](crate::limit::Full).
    limit_rejections: [Counter; 2],
    audit_dropped: Counter,
    enforcing: Gauge,
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
    fn register(r: &Registry<'_>, policy: &PolicyName, proto: Proto) -> Decisions {
        let (policy, proto) = (policy.as_str(), proto.as_str());
        let by_reason = |family: &'static str| {
            Reason::ALL.map(|reason| {
                let labels = [
                    ("policy", policy),
                    ("proto", proto),
                    ("reason", reason.as_str()),
                ];
                r.counter(family, &labels)
            })
        };
        Decisions {
            connections: Verdict::LABELS.map(|verdict| {
                let labels = [("policy", policy), ("proto", proto), ("verdict", verdict)];
                r.counter(CONNECTIONS, &labels)
            }),
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

impl Metrics {
    /// A recorder of its own with every series of `policies` registered;
    /// its handle renders them.
    fn register(policies: &[&PolicyName]) -> (PrometheusHandle, Metrics) {
        let recorder = recorder();
        let r = Registry(&recorder);
        let decisions: Vec<[Decisions; 2]> = policies
            .iter()
            .map(|policy| Proto::ALL.map(|proto| Decisions::register(&r, policy, proto)))
            .collect();
        let by_proto = Proto::ALL.map(|proto| {
            let p = proto.as_str();
            let bytes = |direction| r.counter(BYTES, &[("proto", p), ("direction", direction)]);
            ProtoSeries {
                active: r.gauge(ACTIVE, &[("proto", p)]),
                bytes_upstream: bytes("upstream"),
                bytes_downstream: bytes("downstream"),
                hello: r.histogram(HELLO_DURATION, &[("proto", p)]),
                connect: r.histogram(CONNECT_DURATION, &[("proto", p)]),
                duration: Verdict::LABELS
                    .map(|v| r.histogram(CONNECTION_DURATION, &[("proto", p), ("verdict", v)])),
            }
        });
        let upstream_errors = ErrorKind::ALL.map(|kind| {
            kind.is_upstream()
                .then(|| r.counter(UPSTREAM_ERRORS, &[("kind", kind.as_str())]))
        });
        let handles = Handles {
            by_proto,
            decisions,
            upstream_errors,
            repinned: Proto::ALL.map(|p| r.counter(REPINNED, &[("proto", p.as_str())])),
            dns_lookups: LookupResult::ALL
                .map(|l| r.counter(DNS_LOOKUPS, &[("result", l.as_str())])),
            dns_cache_hits: r.counter(DNS_CACHE_HITS, &[]),
            dns_cache_names: r.gauge(DNS_CACHE_NAMES, &[]),
            dns_cache_addresses: r.gauge(DNS_CACHE_ADDRESSES, &[]),
            accept_errors: r.counter(ACCEPT_ERRORS, &[]),
            limit_rejections: crate::limit::Full::ALL
                .map(|full| r.counter(LIMIT_REJECTIONS, &[("limit", full.as_str())])),
            audit_dropped: r.counter(AUDIT_DROPPED, &[]),
            enforcing: r.gauge(ENFORCING, &[]),
        };
        let counters = handles
            .decisions
            .iter()
            .flatten()
            .flat_map(Decisions::all)
            .chain(handles.upstream_errors.iter().flatten())
            .chain(&handles.repinned)
            .chain(&handles.dns_lookups)
            .chain(&handles.limit_rejections)
            .chain([
                &handles.dns_cache_hits,
                &handles.accept_errors,
                &handles.audit_dropped,
            ]);
        for counter in counters {
            counter.increment(0);
        }
        handles.dns_cache_names.set(0.0);
        handles.dns_cache_addresses.set(0.0);
        for series in &handles.by_proto {
            series.active.set(0.0);
            series.bytes_upstream.increment(0);
            series.bytes_downstream.increment(0);
        }
        r.gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))])
            .set(1.0);
        (recorder.handle(), Metrics(Arc::new(handles)))
    }

    /// Handles on a recorder nobody renders, for the default policy: for
    /// code (and tests) that must count somewhere but whose counts are not
    /// exported.
    pub fn detached() -> Metrics {
        Metrics::register(&[&PolicyName::default_policy()]).1
    }

    /// Counts an HTTP request that another followed on its connection
    /// (its `request` audit record): the connection's own counts wait for
    /// its end.
    pub fn request_ended(&self, rec: &Record) {
        if let (Some(reason), Some(decided)) =
            (rec.would_deny, self.0.decisions.get(rec.policy.index()))
        {
            decided[rec.proto as usize].would_deny[reason as usize].increment(1);
        }
    }

    /// Counts one ended connection.
    pub fn connection_ended(&self, rec: &Record) {
        let handles = &self.0;
        let series = &handles.by_proto[rec.proto as usize];
        let verdict = rec.verdict.index();
        // Registered for every policy the exporter was made with.
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
    pub fn dns_lookup(&self, result: LookupResult) {
        self.0.dns_lookups[result.index()].increment(1);
    }

    /// Counts a name answered from the DNS cache.
    pub fn dns_cache_hit(&self) {
        self.0.dns_cache_hits.increment(1);
    }

    /// The DNS cache's size after an answer was stored.
    pub fn dns_cache_size(&self, names: usize, addresses: usize) {
        self.0.dns_cache_names.set(names as f64);
        self.0.dns_cache_addresses.set(addresses as f64);
    }

    /// Counts a connection being served for as long as the value lives.
    pub fn active(&self, proto: Proto) -> Active<'_> {
        let gauge = &self.0.by_proto[proto as usize].active;
        gauge.increment(1.0);
        Active(gauge)
    }

    pub fn set_enforcing(&self, enforcing: bool) {
        self.0.enforcing.set(f64::from(u8::from(enforcing)));
    }

    pub fn accept_error(&self) {
        self.0.accept_errors.increment(1);
    }

    pub fn limit_rejection(&self, full: crate::limit::Full) {
        self.0.limit_rejections[full as usize].increment(1);
    }

    /// The counter of audit records dropped at a full queue.
    pub fn audit_dropped(&self) -> Counter {
        self.0.audit_dropped.clone()
    }
}

/// A connection being served, counted until dropped.
pub struct Active<'m>(&'m Gauge);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exporter() -> (Exporter, Metrics) {
        Exporter::new(&Policies::single(
            crate::allowlist::Source::File("/nonexistent".into()),
            Arc::new(crate::allowlist::Live::empty()),
        ))
    }

    fn series(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn each_exporter_counts_its_own_connections_from_zero() {
        let ((one, counts_one), (two, counts_two)) = (exporter(), exporter());
        let mut rec = Record::new(
            "192.0.2.10:40000".parse().unwrap(),
            crate::policy::PolicyId::DEFAULT,
            Proto::Http,
        );
        rec.verdict = Verdict::Deny(Reason::NotListed);
        counts_one.connection_ended(&rec);
        counts_one.connection_ended(&rec);
        let denied =
            "portcullis_denied_total{policy=\"default\",proto=\"http\",reason=\"not_listed\"}";
        assert_eq!(series(&one.render(), denied), Some(2.0));
        assert_eq!(series(&two.render(), denied), Some(0.0));
        let active = "portcullis_active_connections{proto=\"tls\"}";
        let held = counts_two.active(Proto::Tls);
        assert_eq!(series(&two.render(), active), Some(1.0));
        drop(held);
        assert_eq!(series(&two.render(), active), Some(0.0));
        assert_eq!(series(&one.render(), active), Some(0.0));
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        let all = [FAMILIES, HA_FAMILIES, SHIP_FAMILIES, GWLB_FAMILIES];
        for f in all.into_iter().flatten() {
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

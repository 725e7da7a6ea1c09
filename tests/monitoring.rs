//! The shipped Grafana dashboard and Prometheus alert rules: they parse,
//! Prometheus accepts the rules and each alert fires on its own test case
//! (`promtool`), and every metric they query is one portcullis exports.
#![forbid(unsafe_code)]

mod support;

use portcullis::telemetry::{FAMILIES, HA_FAMILIES, Kind, SHIP_FAMILIES};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("ami/monitoring")
        .join(file)
}

/// Every `portcullis_…` metric name in a query text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("portcullis_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Whether `name` is a series portcullis exports.
fn exported(name: &str) -> bool {
    FAMILIES
        .iter()
        .chain(HA_FAMILIES)
        .chain(SHIP_FAMILIES)
        .any(|f| {
            f.name == name
                || (f.kind == Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.name)))
        })
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v {
                    serde_json::Value::String(s) if key == "expr" || key == "definition" => {
                        out.push(s.clone())
                    }
                    v => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(monitoring("dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["uid"], "portcullis");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");

    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() > 15, "{queries:?}");
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let unknown: Vec<&String> = used.iter().filter(|n| !exported(n)).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    // The families an operator most needs each have a panel.
    for needed in [
        "portcullis_connections_total",
        "portcullis_denied_total",
        "portcullis_rule_hits_total",
        "portcullis_allowlist_last_success_timestamp_seconds",
        "portcullis_connection_limit_rejections_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn alert_rules_query_only_exported_metrics() {
    let text = std::fs::read_to_string(monitoring("alerts.yml")).unwrap();
    let used = metric_names(&text);
    let unknown: Vec<&String> = used.iter().filter(|n| !exported(n)).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    for alert in [
        "PortcullisDown",
        "PortcullisAllowlistStale",
        "PortcullisAllowlistReloadFailing",
        "PortcullisDenySpike",
        "PortcullisConnectionLimitHit",
        "PortcullisDnsFailing",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "{alert}");
    }
}

/// Runs promtool in the monitoring folder.
fn promtool(args: &[&str]) {
    let mut promtool = Command::new("promtool");
    let command = promtool.args(args).current_dir(monitoring(""));
    let Some(out) = support::checker(command, b"") else {
        return;
    };
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_accepts_the_alert_rules() {
    promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn each_alert_fires_on_its_situation_and_not_on_a_healthy_gateway() {
    promtool(&["test", "rules", "alerts_test.yml"]);
}

//! Reading `/metrics`: samples by name and labels, and the text format
//! checked by Prometheus's own parser (`promtool check metrics`).

use super::netns::Topology;
use std::collections::BTreeMap;
use std::process::Command;

/// One sample's identity: its name and its labels, sorted.
pub type Series = (String, BTreeMap<String, String>);

/// The samples of one scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: BTreeMap<Series, f64>,
}

impl Scrape {
    /// GETs `/metrics` from inside the gateway namespace.
    pub fn take(t: &Topology) -> Scrape {
        let response = t.admin_get("/metrics").expect("/metrics answered");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        Scrape::parse(body)
    }

    /// Parses the sample lines of the text format.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            let previous = samples.insert((name.to_string(), labels), value);
            assert!(previous.is_none(), "series twice: {line}");
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of the series with exactly these labels (0 if absent:
    /// a counter that has not counted yet).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Every series of `name`.
    pub fn series(&self, name: &str) -> Vec<&BTreeMap<String, String>> {
        self.samples
            .keys()
            .filter(|(n, _)| n == name)
            .map(|(_, labels)| labels)
            .collect()
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        assert_eq!(chars.next(), Some('"'), "label {key} has a quoted value");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {text}"),
                },
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        if chars.next().is_none() {
            return labels;
        }
    }
}

/// Runs `promtool check metrics` on a scrape: it parses the text format
/// and lints names, help and types.
pub fn promtool_check(text: &str) {
    let mut promtool = Command::new("promtool");
    let Some(out) = super::checker(promtool.args(["check", "metrics"]), text.as_bytes()) else {
        return;
    };
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! `portcullis discover`: audit logs → a proposed allowlist, so a team can
//! build its first list from a week of monitor mode.
//!
//! A name is proposed only from connections that were allowed, or that
//! monitor mode would have refused as `not_listed`: a host flooding the
//! gateway with made-up names during the monitor week gets them refused
//! as malformed, spoofed or unresolvable, or refused outright in enforce
//! mode, and none of those count. Each proposal says how many distinct
//! clients used it, and marks a name only one client used, which is
//! worth a closer look before it goes on the list.
//!
//! Names under one registrable domain (`a.example.co.uk`,
//! `b.example.co.uk`, …) collapse to one `.example.co.uk` entry once
//! there are [`COLLAPSE_AT`] of them. A registrable domain is a public
//! suffix plus one label, per the Public Suffix List with its private
//! section, so an entry never covers a public suffix such as `.co.uk`,
//! nor everyone's sites under a shared host such as `.github.io`.

use crate::name::HostName;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, BufRead};
use std::net::IpAddr;

/// Distinct names under one registrable domain that make a `.domain` entry.
pub const COLLAPSE_AT: usize = 3;

/// Distinct clients remembered per name, at most: enough to tell one
/// host from many.
pub const MAX_CLIENTS: usize = 1000;

/// Connections and distinct clients for one name.
#[derive(Debug, Default)]
struct Seen {
    connections: u64,
    clients: HashSet<IpAddr>,
}

/// Names seen, with how many connections and clients asked for each.
#[derive(Debug, Default)]
pub struct Tally {
    names: HashMap<HostName, Seen>,
    /// Only records of this policy count (a record without a `policy`
    /// field predates policies and is the default's).
    policy: Option<String>,
    /// Lines that were not audit records with a name (refusals before a
    /// name was read, other log lines).
    pub skipped: u64,
    /// Records of connections refused, or that monitor mode would have
    /// refused for another reason than `not_listed`: never proposed.
    pub refused: u64,
    /// Records of other policies.
    pub other_policies: u64,
}

/// One proposed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// As written in the list: `name` or `.domain`.
    pub entry: String,
    pub connections: u64,
    /// Distinct client addresses (at most [`MAX_CLIENTS`] counted per name).
    pub clients: usize,
    /// The names seen that it covers, most used first.
    pub names: Vec<String>,
}

impl Tally {
    /// A tally of only the records `policy` decided.
    pub fn for_policy(policy: &str) -> Tally {
        Tally {
            policy: Some(policy.to_string()),
            ..Tally::default()
        }
    }

    /// Counts the audit records (JSON lines) read from `input`.
    pub fn read(&mut self, input: impl BufRead) -> io::Result<()> {
        for line in input.lines() {
            self.add_line(&line?);
        }
        Ok(())
    }

    fn add_line(&mut self, line: &str) {
        let record: Option<serde_json::Value> = serde_json::from_str(line).ok();
        if let (Some(wanted), Some(record)) = (&self.policy, &record) {
            let policy = record.get("policy").and_then(|p| p.as_str());
            if policy.unwrap_or(crate::policy::DEFAULT_POLICY) != wanted {
                self.other_policies += 1;
                return;
            }
        }
        let Some(record) = record else {
            self.skipped += 1;
            return;
        };
        // A connection is counted by its one `end` record (logs from before
        // records had kinds have only those), and each earlier request of a
        // kept-alive HTTP connection by its own `request` record, under its
        // own name and verdict; `open` and `interim` records repeat them.
        if !matches!(
            record.get("kind").and_then(|k| k.as_str()),
            None | Some("end" | "request")
        ) {
            return;
        }
        let name = record
            .get("name")
            .and_then(|n| n.as_str())
            .and_then(|n| HostName::from_wire(n.as_bytes()).ok());
        let Some(name) = name else {
            self.skipped += 1;
            return;
        };
        if !proposable(&record) {
            self.refused += 1;
            return;
        }
        let client = record
            .get("src")
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
            .map(|s| crate::guard::canonical(s.ip()));
        let seen = self.names.entry(name).or_default();
        seen.connections += 1;
        if let Some(client) = client
            && seen.clients.len() < MAX_CLIENTS
        {
            seen.clients.insert(client);
        }
    }

    pub fn connections(&self) -> u64 {
        self.names.values().map(|s| s.connections).sum()
    }

    pub fn distinct_names(&self) -> usize {
        self.names.len()
    }

    /// The proposed entries, most used first.
    pub fn propose(&self) -> Vec<Proposal> {
        let mut by_domain: BTreeMap<&str, Vec<(&str, &Seen)>> = BTreeMap::new();
        for (name, seen) in &self.names {
            let name = name.as_str();
            // No registrable domain (the name is itself a public suffix):
            // it stands alone.
            let domain = psl::domain_str(name).unwrap_or(name);
            by_domain.entry(domain).or_default().push((name, seen));
        }
        let mut proposals = Vec::new();
        for (domain, mut names) in by_domain {
            names.sort_by(|a, b| b.1.connections.cmp(&a.1.connections).then(a.0.cmp(b.0)));
            if names.len() >= COLLAPSE_AT {
                let clients: HashSet<&IpAddr> =
                    names.iter().flat_map(|(_, s)| &s.clients).collect();
                proposals.push(Proposal {
                    entry: format!(".{domain}"),
                    connections: names.iter().map(|(_, s)| s.connections).sum(),
                    clients: clients.len(),
                    names: names.iter().map(|(n, _)| n.to_string()).collect(),
                });
            } else {
                proposals.extend(names.into_iter().map(|(name, seen)| Proposal {
                    entry: name.to_string(),
                    connections: seen.connections,
                    clients: seen.clients.len(),
                    names: vec![name.to_string()],
                }));
            }
        }
        proposals.sort_by(|a, b| {
            b.connections
                .cmp(&a.connections)
                .then_with(|| a.entry.cmp(&b.entry))
        });
        proposals
    }

    /// The proposal as an allowlist file, each entry under a comment with
    /// its counts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Proposed by `portcullis discover` from {} connections to {} names.",
            self.connections(),
            self.distinct_names()
        );
        let _ = writeln!(
            out,
            "# Review before use: a .domain entry also allows names below it that were not seen."
        );
        for p in self.propose() {
            let shown: Vec<&str> = p.names.iter().take(5).map(String::as_str).collect();
            let more = p.names.len().saturating_sub(shown.len());
            let from = match p.clients {
                // Records without a client address (none are written so).
                0 => String::new(),
                1 => " from 1 client only: check it".to_string(),
                n if n >= MAX_CLIENTS => format!(" from {n}+ clients"),
                n => format!(" from {n} clients"),
            };
            let _ = write!(out, "\n# {} connections{from}", p.connections);
            if p.entry.starts_with('.') {
                let _ = write!(out, ", {} names: {}", p.names.len(), shown.join(", "));
                if more > 0 {
                    let _ = write!(out, ", and {more} more");
                }
            }
            let _ = writeln!(out, "\n{}", p.entry);
        }
        out
    }
}

/// Whether a record's name may be proposed: the connection was allowed
/// (and so was the name, unless monitor mode let it through), or monitor
/// mode would have refused it only because the list lacks it. Malformed,
/// spoofed, unresolvable and the like are what a host steering the log
/// would produce; a record with no verdict is not an audit record.
fn proposable(record: &serde_json::Value) -> bool {
    let verdict = record.get("verdict").and_then(|v| v.as_str());
    let would_deny = record.get("would_deny").and_then(|v| v.as_str());
    matches!(verdict, Some("allow" | "error")) && matches!(would_deny, None | Some("not_listed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(names: &[(&str, u64)]) -> Tally {
        let mut t = Tally::default();
        for (name, count) in names {
            for i in 0..*count {
                t.add_line(&format!(
                    r#"{{"src":"192.0.2.{}:40000","name":"{name}","verdict":"allow"}}"#,
                    i % 3 + 1
                ));
            }
        }
        t
    }

    #[test]
    fn a_connection_is_counted_once_whatever_records_it_left() {
        let log = concat!(
            "{\"kind\":\"open\",\"src\":\"192.0.2.5:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\"}\n",
            "{\"kind\":\"interim\",\"src\":\"192.0.2.5:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\"}\n",
            "{\"kind\":\"interim\",\"src\":\"192.0.2.5:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\"}\n",
            "{\"kind\":\"end\",\"src\":\"192.0.2.5:1\",\"name\":\"api.vendor.test\",\"verdict\":\"error\",\"reason\":\"shutdown\"}\n",
            // From before records had a kind: an end record.
            "{\"src\":\"192.0.2.6:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\"}\n",
        );
        let mut t = Tally::default();
        t.read(log.as_bytes()).unwrap();
        assert_eq!((t.connections(), t.skipped), (2, 0));
    }

    #[test]
    fn each_request_of_a_kept_alive_connection_counts_under_its_own_verdict() {
        // An upload to an allowed name, then a request for an unlisted one
        // on the same connection: the upload is proposed, the decoy is not.
        let log = concat!(
            "{\"kind\":\"request\",\"src\":\"192.0.2.5:1\",\"proto\":\"http\",\"name\":\"up.vendor.test\",\"verdict\":\"allow\",\"request\":1,\"bytes_up\":1048650}\n",
            "{\"kind\":\"end\",\"src\":\"192.0.2.5:1\",\"proto\":\"http\",\"name\":\"evil.test\",\"verdict\":\"deny\",\"reason\":\"not_listed\",\"request\":2,\"bytes_up\":0}\n",
        );
        let mut t = Tally::default();
        t.read(log.as_bytes()).unwrap();
        assert_eq!((t.connections(), t.refused), (1, 1));
        let proposed: Vec<String> = t.propose().iter().map(|p| p.entry.clone()).collect();
        assert_eq!(proposed, ["up.vendor.test"]);
    }

    #[test]
    fn only_allowed_or_merely_unlisted_names_are_proposed_with_their_clients() {
        let mut t = Tally::default();
        let log = concat!(
            // Allowed, and monitored as only not listed: proposed.
            "{\"src\":\"192.0.2.5:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\",\"would_deny\":null}\n",
            "{\"src\":\"192.0.2.6:1\",\"name\":\"api.vendor.test\",\"verdict\":\"allow\",\"would_deny\":\"not_listed\"}\n",
            "{\"src\":\"[2001:db8:1::7]:1\",\"name\":\"api.vendor.test\",\"verdict\":\"error\",\"would_deny\":null}\n",
            "{\"src\":\"192.0.2.5:2\",\"name\":\"cdn.vendor.test\",\"verdict\":\"allow\",\"would_deny\":\"not_listed\"}\n",
            // A flood of made-up names from one host: refused, or monitored
            // for another reason than the list. None is proposed.
            "{\"src\":\"192.0.2.66:1\",\"name\":\"x1.evil.test\",\"verdict\":\"deny\",\"reason\":\"not_listed\"}\n",
            "{\"src\":\"192.0.2.66:2\",\"name\":\"x2.evil.test\",\"verdict\":\"allow\",\"would_deny\":\"unresolvable\"}\n",
            "{\"src\":\"192.0.2.66:3\",\"name\":\"x3.evil.test\",\"verdict\":\"allow\",\"would_deny\":\"spoofed\"}\n",
            "{\"src\":\"192.0.2.66:4\",\"name\":\"x4.evil.test\",\"verdict\":\"deny\",\"reason\":\"malformed\"}\n",
            // No verdict: not an audit record.
            "{\"name\":\"x5.evil.test\"}\n",
        );
        t.read(log.as_bytes()).unwrap();
        assert_eq!((t.refused, t.distinct_names()), (5, 2));
        let proposals = t.propose();
        let summary: Vec<(&str, u64, usize)> = proposals
            .iter()
            .map(|p| (p.entry.as_str(), p.connections, p.clients))
            .collect();
        assert_eq!(
            summary,
            [("api.vendor.test", 3, 3), ("cdn.vendor.test", 1, 1)]
        );
        let text = t.render();
        assert!(
            text.contains("# 3 connections from 3 clients\napi.vendor.test\n"),
            "{text}"
        );
        assert!(
            text.contains("# 1 connections from 1 client only: check it\ncdn.vendor.test\n"),
            "{text}"
        );
        assert!(!text.contains("evil"), "{text}");
    }

    fn entries(t: &Tally) -> Vec<(String, u64)> {
        t.propose()
            .into_iter()
            .map(|p| (p.entry, p.connections))
            .collect()
    }

    #[test]
    fn collapses_only_at_enough_names_under_one_registrable_domain() {
        let t = tally(&[
            ("a.example.co.uk", 5),
            ("b.example.co.uk", 1),
            ("c.example.co.uk", 1),
            ("api.other.test", 2),
            ("www.other.test", 1),
        ]);
        assert_eq!(
            entries(&t),
            [
                (".example.co.uk".to_string(), 7),
                ("api.other.test".to_string(), 2),
                ("www.other.test".to_string(), 1),
            ]
        );
    }

    #[test]
    fn never_collapses_to_a_public_suffix_or_a_shared_host() {
        // Each is its own registrable domain: .co.uk (ICANN) and
        // .github.io (private section) must not appear.
        let t = tally(&[
            ("alpha.co.uk", 1),
            ("beta.co.uk", 1),
            ("gamma.co.uk", 1),
            ("one.github.io", 1),
            ("two.github.io", 1),
            ("three.github.io", 1),
        ]);
        for (entry, _) in entries(&t) {
            assert!(!entry.starts_with('.'), "{entry}");
        }
        assert_eq!(entries(&t).len(), 6);
    }

    #[test]
    fn skips_lines_without_a_valid_name_and_renders_a_list_that_parses() {
        let mut t = tally(&[("a.x.test", 2), ("b.x.test", 1), ("c.x.test", 1)]);
        let log = "not json\n{\"name\":null,\"verdict\":\"deny\"}\n{\"name\":\"192.0.2.1\"}\n";
        t.read(log.as_bytes()).unwrap();
        assert_eq!((t.skipped, t.connections()), (3, 4));
        let text = t.render();
        let list = crate::allowlist::parse(&text).unwrap();
        assert_eq!(list.len(), 1, "{text}");
        assert!(text.contains(
            "# 4 connections from 2 clients, 3 names: a.x.test, b.x.test, c.x.test\n.x.test\n"
        ));
    }

    #[test]
    fn a_policy_filter_counts_only_that_policys_records() {
        let log = concat!(
            "{\"name\":\"ci.x.test\",\"policy\":\"ci\",\"verdict\":\"allow\"}\n",
            "{\"name\":\"web.x.test\",\"policy\":\"default\",\"verdict\":\"allow\"}\n",
            // Written before policies existed: the default's.
            "{\"name\":\"old.x.test\",\"verdict\":\"allow\"}\n",
        );
        let mut ci = Tally::for_policy("ci");
        ci.read(log.as_bytes()).unwrap();
        assert_eq!(entries(&ci), [("ci.x.test".to_string(), 1)]);
        assert_eq!(ci.other_policies, 2);
        let mut default = Tally::for_policy("default");
        default.read(log.as_bytes()).unwrap();
        assert_eq!(default.distinct_names(), 2);
        let mut all = Tally::default();
        all.read(log.as_bytes()).unwrap();
        assert_eq!((all.distinct_names(), all.other_policies), (3, 0));
    }
}

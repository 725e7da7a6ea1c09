//! `portcullis discover`: audit logs → a proposed allowlist, so a team can
//! build its first list from a week of monitor mode.
//!
//! Every name a connection asked for is proposed, with its connection
//! count. Names under one registrable domain (`a.example.co.uk`,
//! `b.example.co.uk`, …) collapse to one `.example.co.uk` entry once
//! there are [`COLLAPSE_AT`] of them. A registrable domain is a public
//! suffix plus one label, per the Public Suffix List with its private
//! section, so an entry never covers a public suffix such as `.co.uk`,
//! nor everyone's sites under a shared host such as `.github.io`.

use crate::name::HostName;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, BufRead};

/// Distinct names under one registrable domain that make a `.domain` entry.
pub const COLLAPSE_AT: usize = 3;

/// Names seen, with how many connections asked for each.
#[derive(Debug, Default)]
pub struct Tally {
    names: HashMap<HostName, u64>,
    /// Only records of this policy count (a record without a `policy`
    /// field predates policies and is the default's).
    policy: Option<String>,
    /// Lines that were not audit records with a name (refusals before a
    /// name was read, other log lines).
    pub skipped: u64,
    /// Records of other policies.
    pub other_policies: u64,
}

/// One proposed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// As written in the list: `name` or `.domain`.
    pub entry: String,
    pub connections: u64,
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
        let name = record
            .as_ref()
            .and_then(|r| r.get("name")?.as_str())
            .and_then(|n| HostName::from_wire(n.as_bytes()).ok());
        match name {
            Some(name) => *self.names.entry(name).or_default() += 1,
            None => self.skipped += 1,
        }
    }

    pub fn connections(&self) -> u64 {
        self.names.values().sum()
    }

    pub fn distinct_names(&self) -> usize {
        self.names.len()
    }

    /// The proposed entries, most used first.
    pub fn propose(&self) -> Vec<Proposal> {
        let mut by_domain: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
        for (name, &count) in &self.names {
            let name = name.as_str();
            // No registrable domain (the name is itself a public suffix):
            // it stands alone.
            let domain = psl::domain_str(name).unwrap_or(name);
            by_domain.entry(domain).or_default().push((name, count));
        }
        let mut proposals = Vec::new();
        for (domain, mut names) in by_domain {
            names.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            if names.len() >= COLLAPSE_AT {
                proposals.push(Proposal {
                    entry: format!(".{domain}"),
                    connections: names.iter().map(|(_, c)| c).sum(),
                    names: names.iter().map(|(n, _)| n.to_string()).collect(),
                });
            } else {
                proposals.extend(names.into_iter().map(|(name, count)| Proposal {
                    entry: name.to_string(),
                    connections: count,
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
            let _ = write!(out, "\n# {} connections", p.connections);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(names: &[(&str, u64)]) -> Tally {
        let mut t = Tally::default();
        for (name, count) in names {
            for _ in 0..*count {
                t.add_line(&format!(r#"{{"name":"{name}","verdict":"allow"}}"#));
            }
        }
        t
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
        assert!(text.contains("# 4 connections, 3 names: a.x.test, b.x.test, c.x.test\n.x.test\n"));
    }

    #[test]
    fn a_policy_filter_counts_only_that_policys_records() {
        let log = concat!(
            "{\"name\":\"ci.x.test\",\"policy\":\"ci\"}\n",
            "{\"name\":\"web.x.test\",\"policy\":\"default\"}\n",
            // Written before policies existed: the default's.
            "{\"name\":\"old.x.test\"}\n",
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

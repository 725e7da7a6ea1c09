//! The allowlist families, rendered at scrape time from each policy's list
//! in force (entries, reloads, version, per-rule hits) rather than
//! recorded: a rule dropped by a reload stops being exported at once.

use super::{
    LIST_ENTRIES, LIST_INFO, LIST_LAST_SUCCESS, LIST_LOADED, LIST_RELOADS, RULE_HITS, family_of,
};
use crate::allowlist::Live;
use crate::policy::PolicyName;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What the list families show of one policy.
pub(super) struct ListView {
    pub policy: PolicyName,
    pub source: String,
    pub live: Arc<Live>,
}

/// Appends the families that describe each policy's list in force.
pub(super) fn render_lists(out: &mut String, lists: &[ListView]) {
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    // Each policy's snapshot is taken once, so its lines agree.
    let in_force: Vec<_> = lists.iter().map(|l| l.live.current()).collect();
    let each = |out: &mut String, name: &str, line: &dyn Fn(&mut String, &ListView, usize)| {
        header(out, name);
        for (i, list) in lists.iter().enumerate() {
            line(out, list, i);
        }
    };
    each(out, LIST_LOADED, &|out, l, _| {
        let loaded = u8::from(l.live.is_loaded());
        let _ = writeln!(out, "{LIST_LOADED}{{policy=\"{}\"}} {loaded}", l.policy);
    });
    each(out, LIST_ENTRIES, &|out, l, i| {
        let entries = in_force[i].list.len();
        let _ = writeln!(out, "{LIST_ENTRIES}{{policy=\"{}\"}} {entries}", l.policy);
    });
    each(out, LIST_RELOADS, &|out, l, _| {
        let stats = &l.live.stats;
        for (result, count) in [
            ("updated", &stats.updated),
            ("unchanged", &stats.unchanged),
            ("failed", &stats.failed),
        ] {
            let _ = writeln!(
                out,
                "{LIST_RELOADS}{{policy=\"{}\",result=\"{result}\"}} {}",
                l.policy,
                load(count)
            );
        }
    });
    each(out, LIST_LAST_SUCCESS, &|out, l, _| {
        let at = load(&l.live.stats.last_success_unix);
        let _ = writeln!(out, "{LIST_LAST_SUCCESS}{{policy=\"{}\"}} {at}", l.policy);
    });
    each(out, LIST_INFO, &|out, l, i| {
        let _ = writeln!(
            out,
            "{LIST_INFO}{{policy=\"{}\",source=\"{}\",etag=\"{}\"}} 1",
            l.policy,
            Escaped(&l.source),
            Escaped(in_force[i].version.as_deref().unwrap_or(""))
        );
    });
    each(out, RULE_HITS, &|out, l, i| {
        for rule in in_force[i].rules() {
            let _ = writeln!(
                out,
                "{RULE_HITS}{{policy=\"{}\",rule=\"{}\"}} {}",
                l.policy,
                Escaped(&rule.text),
                rule.hits.load(Ordering::Relaxed)
            );
        }
    });
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
    fn list_families_follow_each_policys_list_in_force_and_escape_labels() {
        let live = Arc::new(Live::with(
            parse(".example.com\nold.example.org\n").unwrap(),
        ));
        live.current().admit("www.example.com");
        live.install(parse(".example.com\n").unwrap(), Some("\"abc\\1\"".into()));
        live.stats.failed.fetch_add(2, Ordering::Relaxed);
        let lists = [
            ListView {
                policy: PolicyName::default_policy(),
                source: "s3://bucket/list.txt".into(),
                live,
            },
            ListView {
                policy: "ci".parse().unwrap(),
                source: "/etc/ci.txt".into(),
                live: Arc::new(Live::empty()),
            },
        ];
        let mut out = String::new();
        render_lists(&mut out, &lists);
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "portcullis_allowlist_loaded{policy=\"default\"} 1",
                "portcullis_allowlist_loaded{policy=\"ci\"} 0",
                "portcullis_allowlist_entries{policy=\"default\"} 1",
                "portcullis_allowlist_entries{policy=\"ci\"} 0",
                "portcullis_allowlist_reloads_total{policy=\"default\",result=\"updated\"} 0",
                "portcullis_allowlist_reloads_total{policy=\"default\",result=\"unchanged\"} 0",
                "portcullis_allowlist_reloads_total{policy=\"default\",result=\"failed\"} 2",
                "portcullis_allowlist_reloads_total{policy=\"ci\",result=\"updated\"} 0",
                "portcullis_allowlist_reloads_total{policy=\"ci\",result=\"unchanged\"} 0",
                "portcullis_allowlist_reloads_total{policy=\"ci\",result=\"failed\"} 0",
                "portcullis_allowlist_last_success_timestamp_seconds{policy=\"default\"} 0",
                "portcullis_allowlist_last_success_timestamp_seconds{policy=\"ci\"} 0",
                "portcullis_allowlist_info{policy=\"default\",source=\"s3://bucket/list.txt\",etag=\"\\\"abc\\\\1\\\"\"} 1",
                "portcullis_allowlist_info{policy=\"ci\",source=\"/etc/ci.txt\",etag=\"\"} 1",
                "portcullis_rule_hits_total{policy=\"default\",rule=\".example.com\"} 1",
            ]
        );
        assert_eq!(
            out.matches("# TYPE portcullis_rule_hits_total counter\n")
                .count(),
            1
        );
    }
}

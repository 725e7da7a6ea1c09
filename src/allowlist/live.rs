//! The list in force: one immutable snapshot swapped atomically, so every
//! decision sees either the whole old list or the whole new one and a
//! reload never waits on, or for, the data path.

use super::Allowlist;
use arc_swap::{ArcSwap, Guard};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counts of reload outcomes, exported as metrics at scrape time.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub updated: AtomicU64,
    pub unchanged: AtomicU64,
    pub failed: AtomicU64,
    /// Unix time of the last fetch that proved the list current.
    pub last_success_unix: AtomicU64,
}

/// One rule as written (normalised) and how many connections it admitted.
#[derive(Debug, Clone)]
pub struct Rule {
    pub text: Arc<str>,
    pub hits: Arc<AtomicU64>,
}

impl Rule {
    /// Counts an admission by this rule; the rule as written.
    pub fn admitted(&self) -> Arc<str> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.text.clone()
    }
}

/// A list with what belongs to it: its version and its rules' hit counts.
#[derive(Debug, Default)]
pub struct InForce {
    pub list: Allowlist,
    /// The source's version of this list (an S3 ETag), if it has one.
    pub version: Option<String>,
    /// Distinct rules, in list order.
    rules: Vec<Rule>,
    /// For each list entry, its index in `rules` (duplicates share one).
    rule_of_entry: Vec<u32>,
}

impl InForce {
    /// Builds the snapshot for `list`. A rule that was also in `previous`
    /// keeps its counter, so its hits count on across reloads (even those
    /// still being admitted by the old snapshot); a dropped rule's counter
    /// goes with the old snapshot.
    fn new(list: Allowlist, version: Option<String>, previous: Option<&InForce>) -> InForce {
        let mut kept: FxHashMap<&str, &Arc<AtomicU64>> = previous
            .map(|p| p.rules.iter().map(|r| (&*r.text, &r.hits)).collect())
            .unwrap_or_default();
        let mut index: FxHashMap<String, u32> = FxHashMap::default();
        let mut rules = Vec::new();
        let mut rule_of_entry = Vec::with_capacity(list.len());
        for entry in list.entries() {
            let text = entry.to_string();
            let next = u32::try_from(rules.len()).expect("fewer than 2^32 rules");
            let i = *index.entry(text).or_insert_with_key(|text| {
                let hits = kept.remove(text.as_str()).cloned().unwrap_or_default();
                rules.push(Rule {
                    text: text.as_str().into(),
                    hits,
                });
                next
            });
            rule_of_entry.push(i);
        }
        InForce {
            list,
            version,
            rules,
            rule_of_entry,
        }
    }

    /// The rule that allows `name` (normalised), counting the hit: an
    /// admission with no further check, as the tests make them.
    #[cfg(test)]
    pub fn admit(&self, name: &str) -> Option<Arc<str>> {
        self.rule_for(name).map(Rule::admitted)
    }

    /// The rule that allows `name` (normalised), not yet counted: for an
    /// admission that still depends on another check.
    pub fn rule_for(&self, name: &str) -> Option<&Rule> {
        let entry = self.list.lookup_index(name)?;
        Some(&self.rules[self.rule_of_entry[entry] as usize])
    }

    /// Distinct rules in list order, with their hit counters.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

#[derive(Debug)]
pub struct Live {
    in_force: ArcSwap<InForce>,
    loaded: AtomicBool,
    pub stats: ReloadStats,
}

impl Live {
    /// No list yet: everything is denied and the gateway is not ready.
    pub fn empty() -> Live {
        Live {
            in_force: ArcSwap::from_pointee(InForce::default()),
            loaded: AtomicBool::new(false),
            stats: ReloadStats::default(),
        }
    }

    /// A list already in force.
    pub fn with(list: Allowlist) -> Live {
        let live = Live::empty();
        live.install(list, None);
        live
    }

    /// The snapshot to decide with. Cheap, lock-free, never blocks.
    pub fn current(&self) -> Guard<Arc<InForce>> {
        self.in_force.load()
    }

    /// Whether any list has been loaded since start.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Swaps `list` in. Connections already admitted are unaffected. Only
    /// the reloader calls this, so reading the previous snapshot and
    /// storing the next one cannot race with another install.
    pub fn install(&self, list: Allowlist, version: Option<String>) {
        let next = InForce::new(list, version, Some(&self.in_force.load()));
        self.in_force.store(Arc::new(next));
        self.loaded.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allowlist::parse;

    fn hits(live: &Live) -> Vec<(String, u64)> {
        let in_force = live.current();
        let rules = in_force.rules().iter();
        rules
            .map(|r| (r.text.to_string(), r.hits.load(Ordering::Relaxed)))
            .collect()
    }

    #[test]
    fn admissions_count_per_rule_and_duplicates_share_one_counter() {
        let live = Live::with(parse(".example.com\napi.example.org\n.EXAMPLE.com.\n").unwrap());
        let in_force = live.current();
        assert_eq!(
            in_force.admit("a.example.com").as_deref(),
            Some(".example.com")
        );
        assert_eq!(
            in_force.admit("example.com").as_deref(),
            Some(".example.com")
        );
        assert_eq!(
            in_force.admit("api.example.org").as_deref(),
            Some("api.example.org")
        );
        assert_eq!(in_force.admit("www.example.org"), None);
        assert_eq!(
            hits(&live),
            [(".example.com".into(), 2), ("api.example.org".into(), 1)]
        );
    }

    #[test]
    fn kept_rules_keep_their_counts_and_dropped_rules_disappear() {
        let live = Live::with(parse(".example.com\nold.example.org\n").unwrap());
        let old = live.current();
        old.admit("a.example.com");
        old.admit("old.example.org");
        live.install(
            parse("new.example.net\n.example.com\n").unwrap(),
            Some("\"v2\"".into()),
        );
        // A connection still deciding on the old snapshot counts into the
        // same counter as the new snapshot's.
        old.admit("b.example.com");
        live.current().admit("c.example.com");
        assert_eq!(
            hits(&live),
            [("new.example.net".into(), 0), (".example.com".into(), 3)]
        );
        assert_eq!(live.current().version.as_deref(), Some("\"v2\""));
    }
}

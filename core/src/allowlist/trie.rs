//! Reversed-label suffix trie: `www.example.com` is stored as the path
//! `com` → `example` → `www`. A lookup walks the name's labels from the
//! right over borrowed `&str` slices, so it allocates nothing, and stops at
//! the first label the list does not know. Matching is on whole labels, so
//! `.trusted.com` can never match `untrusted.com`.

use super::entry::{Entry, EntryKind};
use rustc_hash::FxHashMap;

type EntryId = u32;
type NodeId = u32;

#[derive(Default)]
struct Node {
    children: FxHashMap<Box<str>, NodeId>,
    /// `name`: matches exactly this name.
    exact: Option<EntryId>,
    /// `.name`: matches this name and everything below.
    domain: Option<EntryId>,
    /// `*.name`: matches everything below, not this name.
    subdomains: Option<EntryId>,
}

/// A parsed, immutable allowlist: [`super::parse`] builds one from text,
/// and `collect()` from entries.
pub struct Allowlist {
    nodes: Vec<Node>,
    entries: Vec<Entry>,
}

impl Default for Allowlist {
    fn default() -> Self {
        Allowlist {
            nodes: vec![Node::default()],
            entries: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Allowlist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allowlist")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl FromIterator<Entry> for Allowlist {
    fn from_iter<I: IntoIterator<Item = Entry>>(entries: I) -> Allowlist {
        let mut list = Allowlist::default();
        for entry in entries {
            list.insert(entry);
        }
        list
    }
}

impl Allowlist {
    /// Adds an entry. A duplicate of an earlier entry is kept in `entries`
    /// but the earlier line stays the one reported as the match.
    fn insert(&mut self, entry: Entry) {
        let id = EntryId::try_from(self.entries.len()).expect("fewer than 2^32 entries");
        let mut node: NodeId = 0;
        for label in entry.name.as_str().rsplit('.') {
            node = match self.nodes[node as usize].children.get(label) {
                Some(&child) => child,
                None => {
                    let child = NodeId::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
                    self.nodes.push(Node::default());
                    self.nodes[node as usize]
                        .children
                        .insert(label.into(), child);
                    child
                }
            };
        }
        let node = &mut self.nodes[node as usize];
        let slot = match entry.kind {
            EntryKind::Exact => &mut node.exact,
            EntryKind::Domain => &mut node.domain,
            EntryKind::Subdomains => &mut node.subdomains,
        };
        slot.get_or_insert(id);
        self.entries.push(entry);
    }

    /// The most specific entry that allows `name`, which must already be
    /// normalised (see [`crate::name::HostName`]).
    pub fn lookup(&self, name: &str) -> Option<&Entry> {
        self.lookup_index(name).map(|i| &self.entries[i])
    }

    /// Like [`Self::lookup`], as an index into [`Self::entries`].
    pub fn lookup_index(&self, name: &str) -> Option<usize> {
        let mut best = None;
        let mut node = &self.nodes[0];
        let mut labels = name.rsplit('.').peekable();
        while let Some(label) = labels.next() {
            let Some(&child) = node.children.get(label) else {
                break;
            };
            node = &self.nodes[child as usize];
            let whole_name = labels.peek().is_none();
            let here = if whole_name {
                node.exact.or(node.domain)
            } else {
                node.domain.or(node.subdomains)
            };
            best = here.or(best);
        }
        best.map(|id| id as usize)
    }

    /// Entries in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use crate::allowlist::parse;
    use crate::name::HostName;
    use proptest::prelude::*;

    fn rule(list: &str, name: &str) -> Option<String> {
        let list = parse(list).unwrap();
        let name = HostName::from_wire(name.as_bytes()).unwrap();
        list.lookup(name.as_str()).map(|e| e.to_string())
    }

    #[test]
    fn exact_entry_matches_only_that_name() {
        assert_eq!(
            rule("example.com", "example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(rule("example.com", "www.example.com"), None);
        assert_eq!(rule("www.example.com", "example.com"), None);
    }

    #[test]
    fn dot_entry_matches_domain_and_all_subdomains() {
        let list = ".example.com";
        for name in ["example.com", "www.example.com", "a.b.c.example.com"] {
            assert_eq!(rule(list, name).as_deref(), Some(".example.com"), "{name}");
        }
        assert_eq!(rule(list, "example.org"), None);
    }

    #[test]
    fn wildcard_entry_matches_subdomains_only() {
        let list = "*.example.com";
        assert_eq!(rule(list, "example.com"), None);
        assert_eq!(
            rule(list, "www.example.com").as_deref(),
            Some("*.example.com")
        );
        assert_eq!(
            rule(list, "a.b.example.com").as_deref(),
            Some("*.example.com")
        );
    }

    #[test]
    fn denies_sibling_with_shared_suffix() {
        assert_eq!(rule(".trusted.com", "untrusted.com"), None);
        assert_eq!(rule(".trusted.com", "www.untrusted.com"), None);
        assert_eq!(rule("trusted.com", "nottrusted.com"), None);
        assert_eq!(rule(".trusted.com", "trusted.com.evil.example"), None);
    }

    #[test]
    fn matches_case_and_trailing_dot_insensitively() {
        assert_eq!(
            rule(".Example.COM.", "WWW.EXAMPLE.com.").as_deref(),
            Some(".example.com")
        );
    }

    #[test]
    fn matches_internationalised_names_by_punycode() {
        assert_eq!(
            rule(".bücher.de", "shop.xn--bcher-kva.de").as_deref(),
            Some(".xn--bcher-kva.de")
        );
    }

    #[test]
    fn most_specific_entry_wins() {
        let list = ".example.com\napi.example.com\n*.cdn.example.com\n";
        assert_eq!(
            rule(list, "api.example.com").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            rule(list, "x.cdn.example.com").as_deref(),
            Some("*.cdn.example.com")
        );
        assert_eq!(
            rule(list, "cdn.example.com").as_deref(),
            Some(".example.com")
        );
        assert_eq!(
            rule(list, "www.example.com").as_deref(),
            Some(".example.com")
        );
    }

    #[test]
    fn first_of_duplicate_entries_is_reported() {
        let list = parse("a.example.com\nA.example.com.\n").unwrap();
        assert_eq!(list.lookup("a.example.com").unwrap().line, 1);
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn empty_list_allows_nothing() {
        let list = parse("# nothing\n").unwrap();
        assert!(list.is_empty());
        assert!(list.lookup("example.com").is_none());
    }

    proptest! {
        /// The trie agrees with a direct reading of the three rules.
        #[test]
        fn trie_agrees_with_reference_matcher(
            entries in prop::collection::vec(("[*.]?", "(a|b|c)(\\.(a|b|c)){0,3}\\.test"), 0..8),
            name in "(a|b|c)(\\.(a|b|c)){0,4}\\.test",
        ) {
            let text: String = entries.iter().map(|(p, n)| {
                let p = if p == "*" { "*." } else { p.as_str() };
                format!("{p}{n}\n")
            }).collect();
            let list = parse(&text).unwrap();
            let reference = entries.iter().any(|(p, n)| match p.as_str() {
                "" => name == *n,
                "." => name == *n || name.ends_with(&format!(".{n}")),
                _ => name.ends_with(&format!(".{n}")),
            });
            prop_assert_eq!(list.lookup(&name).is_some(), reference);
        }
    }
}

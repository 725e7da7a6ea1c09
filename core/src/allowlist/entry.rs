//! One allowlist entry: a normalised name and how it matches. The parser
//! makes them and the trie holds them.

use crate::name::HostName;

/// How an entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// `example.com`
    Exact,
    /// `.example.com`
    Domain,
    /// `*.example.com`
    Subdomains,
}

/// One allowlist line, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub name: HostName,
    /// 1-based line number in the source text.
    pub line: usize,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            EntryKind::Exact => write!(f, "{}", self.name),
            EntryKind::Domain => write!(f, ".{}", self.name),
            EntryKind::Subdomains => write!(f, "*.{}", self.name),
        }
    }
}

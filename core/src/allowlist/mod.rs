//! The allowlist's pure half: Squid `dstdomain` syntax parsed into a
//! suffix trie. `parse` rejects the whole list on the first bad line,
//! naming it; `Allowlist::lookup` answers without allocating.

mod entry;
mod parse;
mod trie;

pub use entry::{Entry, EntryKind};
pub use parse::{
    ParseError, ParseErrorKind, PrivateSuffixes, SharedSuffix, parse, shared_suffix,
    shared_suffixes,
};
pub use trie::Allowlist;

//! The allowlist: Squid `dstdomain` syntax parsed into a suffix trie.
//!
//! `parse` is pure and rejects the whole list on the first bad line, naming
//! it; `Allowlist::lookup` answers without allocating.

mod parse;
mod trie;

pub use parse::{Entry, EntryKind, ParseError, ParseErrorKind, parse};
pub use trie::Allowlist;

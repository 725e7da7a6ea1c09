//! The allowlist: Squid `dstdomain` syntax parsed into a suffix trie, and
//! the machinery that keeps the list in force current.
//!
//! `parse` is pure and rejects the whole list on the first bad line, naming
//! it; `Allowlist::lookup` answers without allocating. `source` fetches a
//! list only when it changed, `live` holds the list in force, `reload`
//! swaps in new lists and `cache` keeps the last good one on disk.

mod cache;
mod entry;
mod live;
mod parse;
mod reload;
mod source;
mod trie;

pub use cache::{Cache, Cached};
pub use entry::{Entry, EntryKind};
pub use live::{InForce, Live, ReloadStats, Rule};
pub use parse::{
    ParseError, ParseErrorKind, PrivateSuffixes, SharedSuffix, parse, shared_suffix,
    shared_suffixes,
};
pub use reload::{
    LoadError, Outcome, ReloadSettings, Reloader, load_once, parse_checked, system_suffixes,
};
pub use source::{FetchError, Fetched, Fetcher, MAX_LIST_BYTES, Source, SourceError};
pub use trie::Allowlist;

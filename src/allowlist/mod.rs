//! The allowlist: Squid `dstdomain` syntax parsed into a suffix trie, and
//! the machinery that keeps the list in force current.
//!
//! The parser and the trie are the core crate's
//! (`portcullis_core::allowlist`), re-exported here. `source` fetches a list
//! only when it changed, `live` holds the list in force, `reload` swaps in
//! new lists and `cache` keeps the last good one on disk.

mod cache;
mod live;
mod reload;
mod source;

pub use cache::{Cache, Cached};
pub use live::{InForce, Live, ReloadStats, Rule};
pub use portcullis_core::allowlist::{
    Allowlist, Entry, EntryKind, ParseError, ParseErrorKind, PrivateSuffixes, SharedSuffix, parse,
    shared_suffix, shared_suffixes,
};
pub use reload::{
    LoadError, Outcome, ReloadSettings, Reloader, load_once, parse_checked, system_suffixes,
};
pub use source::{FetchError, Fetched, Fetcher, MAX_LIST_BYTES, Source, SourceError};

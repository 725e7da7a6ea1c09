//! The pure parsers of portcullis, compiled on their own from the same
//! source files: the fuzz targets need them, not the gateway's runtime
//! (tokio, the AWS SDK), which would make the sanitizer build several
//! times longer.
#![forbid(unsafe_code)]

#[path = "../../src/name.rs"]
pub mod name;

#[path = "../../src/detect/mod.rs"]
pub mod detect;

// At the root, where each finds the other as `super::`.
#[path = "../../src/allowlist/parse.rs"]
mod parse;
#[path = "../../src/allowlist/trie.rs"]
mod trie;

pub mod allowlist {
    pub use crate::parse::{Entry, EntryKind, parse};
    pub use crate::trie::Allowlist;
}

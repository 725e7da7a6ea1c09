//! portcullis: a transparent egress gateway.
//!
//! # Layout
//! - [`name`]: host-name normalisation shared by the list, SNI and Host.
//! - [`allowlist`]: Squid `dstdomain` list parser and suffix-trie matcher.

pub mod allowlist;
pub mod name;

//! portcullis: a transparent egress gateway.
//!
//! # Layout
//! - [`name`]: host-name normalisation shared by the list, SNI and Host.
//! - [`allowlist`]: Squid `dstdomain` list parser and suffix-trie matcher.
//! - [`detect`]: pure parsers: TLS ClientHello → SNI, HTTP request head → Host.

pub mod allowlist;
pub mod detect;
pub mod name;

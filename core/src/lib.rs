//! portcullis-core: the pure parsers and the matcher of portcullis, with
//! no I/O and no runtime, so that the gateway, the fuzz targets and the
//! benchmarks build the same code as an ordinary dependency.
//!
//! # Layout
//! - [`name`]: host-name normalisation shared by the list, SNI and Host.
//! - [`detect`]: bytes → a ClientHello's SNI, HTTP heads and body framing;
//!   every parser returns Incomplete / Invalid / Done and never panics.
//! - [`allowlist`]: Squid `dstdomain` text → entries → a suffix trie.
//! - `hello` (feature `testing`): ClientHellos built from captured ones.
#![forbid(unsafe_code)]

pub mod allowlist;
pub mod detect;
#[cfg(any(test, feature = "testing"))]
pub mod hello;
pub mod name;

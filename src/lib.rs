//! portcullis: a transparent egress gateway.
//!
//! # Layout
//! - [`name`], [`detect`] and the pure half of [`allowlist`] (parser, trie)
//!   are the `portcullis-core` crate (`core/`): host names, the TLS and HTTP
//!   detectors, the Squid `dstdomain` list.
//! - [`allowlist`]: the list in force, its sources, reloads and cache.
//! - [`config`]: run-time settings and their textual forms.
//! - [`policy`]: per-source policies: client address → which list decides.
//! - [`verdict`]: what happened to a connection, as values.
//! - [`net`]: original destination, listeners, splice forwarding.
//! - [`proxy`]: one connection: detect → decide → refuse or forward.
//! - [`server`]: accept loops, shutdown.
//! - [`balance`]: which worker serves a connection: few heavy flows spread.
//! - [`limit`]: connections served at once: in all and per client.
//! - [`drain`]: signals and how to stop.
//! - [`telemetry`]: metric names, the Prometheus recorder, list families.
//! - [`audit`]: the JSON audit log on stdout or in a file, behind a bounded queue.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, on their own thread.
//! - [`discover`]: audit logs → a proposed allowlist.
//! - [`decide`]: the one decision of both ports, as a pure function.
//! - [`dns`]: admitted names' addresses: a coalescing, bounded TTL cache.
//! - [`guard`]: destinations never contacted (loopback, link-local, own).
//! - [`aws`]: signed calls to AWS APIs (credentials, SigV4, one HTTPS client).
//! - [`ship`]: `portcullis ship`, the audit file to CloudWatch Logs,
//!   at least once, resuming where it stopped.
//! - [`ha`]: `portcullis ha`, the agent that keeps every AZ's routes on a
//!   serving gateway (EC2 API, no I/O in its decisions).
//! - [`gwlb`]: `portcullis gwlb`, the GWLB tunnel (crate `portcullis-gwlb`,
//!   `gwlb/`) with its metrics and health endpoint.
#![forbid(unsafe_code)]

// The pure core, a crate of its own (`core/`), at the paths it always had.
pub use portcullis_core::{detect, name};

pub mod admin;
pub mod allowlist;
pub mod audit;
pub mod aws;
pub mod balance;
pub mod config;
pub mod decide;
pub mod discover;
pub mod dns;
pub mod drain;
pub mod guard;
pub mod gwlb;
pub mod ha;
pub mod limit;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod server;
pub mod ship;
pub mod telemetry;
pub mod verdict;

//! The audit log: JSON lines on stdout, or in a file (`--audit-file`)
//! reopened on SIGUSR1 so it can be rotated. Every connection writes one `end`
//! record when it ends (a refusal ends it at once, and a connection still
//! open when the gateway stops ends then); a long one also writes an
//! `interim` record every `--audit-interval`, and with `--audit-open` an
//! `open` record once it is admitted. A dedicated thread does
//! the writing behind a bounded queue, so a slow or blocked stdout can
//! never stall the data path: when the queue is full a record is dropped
//! and counted instead.
//!
//! - [`line`]: a [`Record`](crate::record::Record) → one JSON line (pure).
//! - [`writer`]: the bounded queue and the thread that writes it.

pub mod line;
pub mod writer;

pub use line::{Kind, line};
pub use writer::{AuditLog, QUEUE_RECORDS};

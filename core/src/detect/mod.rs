//! Pure detectors: bytes a client sent first → the name it wants.
//!
//! Each detector is a function over the bytes received so far that never
//! panics and returns [`Detect::Incomplete`] (read more), [`Detect::Invalid`]
//! or [`Detect::Done`]. The I/O around them (the gateway's proxy) reads with a cap
//! and a deadline and replays the bytes upstream.

pub mod http;
pub mod tls;

/// Outcome of looking at a prefix of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detect<T, E> {
    /// The prefix is consistent so far; more bytes are needed.
    Incomplete,
    /// The prefix can never become valid.
    Invalid(E),
    /// Parsed.
    Done(T),
}

//! Shutdown: SIGTERM drains (stop accepting, let live connections finish
//! up to the drain timeout); SIGINT, or a second SIGTERM, stops at once.
//! SIGHUP (reload the allowlist) and SIGUSR1 (reopen the audit file) are
//! installed here too, before anything else, so an early one cannot kill
//! the process by its default action.

use tokio::signal::unix::{SignalKind, signal};

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Drain,
    Now,
}

/// Signal handlers, installed before the listeners open so an early
/// signal is not lost.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP, for the allowlist reloader to take.
    pub hangup: Option<tokio::signal::unix::Signal>,
    /// SIGUSR1, for the audit log to take.
    pub reopen: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hangup: Some(signal(SignalKind::hangup())?),
            reopen: Some(signal(SignalKind::user_defined1())?),
        })
    }

    /// Waits for the next stop request.
    pub async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.term.recv() => Stop::Drain,
            _ = self.int.recv() => Stop::Now,
        }
    }
}

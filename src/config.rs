//! Run-time settings, validated, and the parsers for their textual forms.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `portcullis run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub allowlist: PathBuf,
    pub tls_listen: Vec<SocketAddr>,
    pub http_listen: Vec<SocketAddr>,
    pub metrics_listen: SocketAddr,
    pub limits: Limits,
    pub max_connections: usize,
    /// How long SIGTERM waits for live connections before exiting.
    pub drain_timeout: Duration,
}

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept until the ClientHello or first request head is complete;
    /// also the time a later request head may take once it has begun.
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    /// A flow with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Cap on a ClientHello (record headers included) or request head.
    pub max_hello_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15 * 60),
            max_hello_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number and a unit (ms, s, m, h), e.g. 500ms, 5s, 15m")]
pub struct DurationError(String);

/// Parses `500ms`, `5s`, `15m`, `1h`. A unit is required: a bare `5` is
/// ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn refuses_durations_without_a_known_unit() {
        for s in [
            "5",
            "",
            "s",
            "5 s",
            "1.5s",
            "5d",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}

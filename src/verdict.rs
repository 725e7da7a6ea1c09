//! What happened to a connection, and to the lookups it needed, as values:
//! closed sets, audited and counted in one place (`proxy::report`), never
//! as scattered strings.

/// Why a connection was refused. A closed set: safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The name is valid but no entry allows it.
    NotListed,
    /// No list has loaded yet (first start, source unreachable, no cache).
    NoList,
    /// No SNI / no Host.
    NoName,
    /// The name is an IP address.
    IpLiteral,
    /// A ClientHello or request head that cannot be parsed, or an invalid name.
    Malformed,
    /// The first bytes on the TLS port are not a TLS handshake.
    NotTls,
    /// The hello or request head is larger than the cap.
    TooLarge,
    /// The hello or request head did not arrive in time.
    Timeout,
    /// The connection was not redirected, or targets the gateway itself.
    Loop,
    /// An absolute-form request target disagrees with the Host header.
    HostMismatch,
    /// A method a transparent gateway does not forward (CONNECT).
    Method,
    /// The ClientHello's highest version is below `--min-tls`.
    TlsVersion,
    /// The destination is not an address the name resolves to: with
    /// `--verify-dst dns`, the original destination; with `pin`, the
    /// upstream a kept-alive HTTP connection has, for a later request.
    Spoofed,
    /// `--verify-dst dns` or `pin`: the allowed name has no address
    /// (NXDOMAIN, no records, a failed or timed-out lookup).
    Unresolvable,
    /// The destination is one the gateway never reaches, in any mode
    /// (loopback, link-local, multicast, its own addresses, …).
    ForbiddenDst,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::NotListed,
        Reason::NoList,
        Reason::NoName,
        Reason::IpLiteral,
        Reason::Malformed,
        Reason::NotTls,
        Reason::TooLarge,
        Reason::Timeout,
        Reason::Loop,
        Reason::HostMismatch,
        Reason::Method,
        Reason::TlsVersion,
        Reason::Spoofed,
        Reason::Unresolvable,
        Reason::ForbiddenDst,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotListed => "not_listed",
            Reason::NoList => "no_list",
            Reason::NoName => "no_name",
            Reason::IpLiteral => "ip_literal",
            Reason::Malformed => "malformed",
            Reason::NotTls => "not_tls",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
            Reason::Loop => "loop",
            Reason::HostMismatch => "host_mismatch",
            Reason::Method => "method",
            Reason::TlsVersion => "tls_version",
            Reason::Spoofed => "spoofed",
            Reason::Unresolvable => "unresolvable",
            Reason::ForbiddenDst => "forbidden_dst",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tls,
    Http,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tls, Proto::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tls => "tls",
            Proto::Http => "http",
        }
    }
}

/// Why an allowed connection failed on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client went away before sending a complete hello or head.
    ClientClosed,
    ConnectRefused,
    ConnectTimeout,
    /// Another error connecting upstream (unreachable, no descriptors, …).
    Connect,
    /// The flow was idle longer than `--idle-timeout`.
    Idle,
    /// One side had closed, and the other then moved nothing for
    /// `--half-closed-timeout`.
    HalfClosed,
    /// Still open when the gateway stopped (after the drain timeout, on
    /// SIGINT or on a second SIGTERM).
    Shutdown,
    /// A socket error while forwarding.
    Io,
    /// The upstream's response could not be framed.
    UpstreamProtocol,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::ClientClosed,
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::Connect,
        ErrorKind::Idle,
        ErrorKind::HalfClosed,
        ErrorKind::Shutdown,
        ErrorKind::Io,
        ErrorKind::UpstreamProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ClientClosed => "client_closed",
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Idle => "idle",
            ErrorKind::HalfClosed => "half_closed",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Io => "io",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
        }
    }

    /// Whether the upstream, not the client or the flow, failed.
    pub fn is_upstream(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectRefused
                | ErrorKind::ConnectTimeout
                | ErrorKind::Connect
                | ErrorKind::UpstreamProtocol
        )
    }
}

/// The end state of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Reason),
    Error(ErrorKind),
}

impl Verdict {
    /// The verdicts as labels, in [`Verdict::index`] order.
    pub const LABELS: [&'static str; 3] = ["allow", "deny", "error"];

    pub fn index(&self) -> usize {
        match self {
            Verdict::Allow => 0,
            Verdict::Deny(_) => 1,
            Verdict::Error(_) => 2,
        }
    }

    pub fn as_str(&self) -> &'static str {
        Verdict::LABELS[self.index()]
    }
}

/// Why a name has no address to go to. A closed set: a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// NXDOMAIN.
    NxDomain,
    /// The name exists but has no A or AAAA record.
    NoAddresses,
    /// SERVFAIL, REFUSED, no server reachable, a bad answer.
    Failed,
    /// No answer within [`crate::dns::LOOKUP_TIMEOUT`].
    Timeout,
    /// Not asked: the gateway's lookups in flight, or this client's share
    /// of them ([`crate::dns::SOURCE_SHARE`]), are all taken.
    Busy,
}

/// What a query to the resolver came to, as `portcullis_dns_lookups_total`
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    Ok,
    Failed(LookupError),
}

impl LookupResult {
    pub const ALL: [LookupResult; 6] = [
        LookupResult::Ok,
        LookupResult::Failed(LookupError::NxDomain),
        LookupResult::Failed(LookupError::NoAddresses),
        LookupResult::Failed(LookupError::Failed),
        LookupResult::Failed(LookupError::Timeout),
        LookupResult::Failed(LookupError::Busy),
    ];

    pub fn index(self) -> usize {
        match self {
            LookupResult::Ok => 0,
            LookupResult::Failed(LookupError::NxDomain) => 1,
            LookupResult::Failed(LookupError::NoAddresses) => 2,
            LookupResult::Failed(LookupError::Failed) => 3,
            LookupResult::Failed(LookupError::Timeout) => 4,
            LookupResult::Failed(LookupError::Busy) => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Ok => "ok",
            LookupResult::Failed(LookupError::NxDomain) => "nxdomain",
            LookupResult::Failed(LookupError::NoAddresses) => "no_addresses",
            LookupResult::Failed(LookupError::Failed) => "error",
            LookupResult::Failed(LookupError::Timeout) => "timeout",
            LookupResult::Failed(LookupError::Busy) => "busy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_of_all_values_are_in_declaration_order() {
        // Metric handles are indexed by `value as usize`.
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r}");
        }
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{}", k.as_str());
        }
        for (i, p) in Proto::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{}", p.as_str());
        }
    }
}

//! DNS host names as the gateway compares them.
//!
//! One normalisation serves the allowlist, the TLS SNI and the HTTP Host
//! header, so a name can never match in one place and not in another:
//! ASCII lowercase, one trailing dot removed, LDH labels (plus `_`, which
//! real hosts use), label and name lengths as RFC 1035 sets them.

use std::net::IpAddr;

/// Longest name in presentation form without the trailing dot (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a usable host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("label is empty")]
    EmptyLabel,
    #[error("label is longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    #[error("illegal character {0:?}")]
    IllegalChar(char),
    #[error("label starts or ends with '-'")]
    HyphenAtEdge,
    #[error("is an IP address, not a name")]
    IpLiteral,
    #[error("not a valid internationalised name")]
    Idna,
}

/// A validated, lowercase, ASCII host name without trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostName(Box<str>);

impl HostName {
    /// Parses a name received from a peer (SNI, Host). Peers must send
    /// A-labels, so non-ASCII is an error rather than converted.
    pub fn from_wire(raw: &[u8]) -> Result<HostName, NameError> {
        let s = std::str::from_utf8(raw).map_err(|_| NameError::IllegalChar('\u{FFFD}'))?;
        if !s.is_ascii() {
            let c = s.chars().find(|c| !c.is_ascii()).unwrap_or('\u{FFFD}');
            return Err(NameError::IllegalChar(c));
        }
        Self::from_ascii(s)
    }

    /// Parses a name written by an operator: Unicode is converted to
    /// punycode (IDNA, UTS 46) first.
    pub fn from_config(s: &str) -> Result<HostName, NameError> {
        if s.is_ascii() {
            return Self::from_ascii(s);
        }
        let ascii = idna::domain_to_ascii(s).map_err(|_| NameError::Idna)?;
        Self::from_ascii(&ascii)
    }

    fn from_ascii(s: &str) -> Result<HostName, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        // Parsing as an address is the slow part: only characters that can
        // spell an IPv4 or IPv6 literal make it worth trying.
        let may_be_ip = s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'[' | b']'));
        if may_be_ip && is_ip_literal(s) {
            return Err(NameError::IpLiteral);
        }
        for label in s.split('.') {
            check_label(label)?;
        }
        // A numeric top label can only be an IP address in some notation
        // (e.g. `127.1`, `0x7f.1`): never a name.
        if s.rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(NameError::IpLiteral);
        }
        Ok(HostName(s.to_ascii_lowercase().into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_label(label: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong);
    }
    // Callers pass ASCII only, so a byte is a char.
    if let Some(b) = label
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'))
    {
        return Err(NameError::IllegalChar(char::from(b)));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::HyphenAtEdge);
    }
    Ok(())
}

/// True for `192.0.2.1`, `2001:db8::1` and `[2001:db8::1]`.
pub fn is_ip_literal(s: &str) -> bool {
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_and_strips_one_trailing_dot() {
        assert_eq!(
            HostName::from_wire(b"WWW.Example.COM.").unwrap().as_str(),
            "www.example.com"
        );
        assert_eq!(
            HostName::from_wire(b"a..").unwrap_err(),
            NameError::EmptyLabel
        );
    }

    #[test]
    fn rejects_ip_literals_in_any_form() {
        for s in [
            "192.0.2.1",
            "2001:db8::1",
            "[2001:db8::1]",
            "127.1",
            "10.0.0",
        ] {
            assert_eq!(
                HostName::from_wire(s.as_bytes()).unwrap_err(),
                NameError::IpLiteral,
                "{s}"
            );
        }
    }

    #[test]
    fn enforces_rfc1035_lengths() {
        let label63 = "a".repeat(63);
        assert!(HostName::from_wire(format!("{label63}.com").as_bytes()).is_ok());
        let label64 = "a".repeat(64);
        assert_eq!(
            HostName::from_wire(format!("{label64}.com").as_bytes()).unwrap_err(),
            NameError::LabelTooLong
        );
        let long = format!("{label63}.{label63}.{label63}.{}", "a".repeat(61));
        assert_eq!(long.len(), 253);
        assert!(HostName::from_wire(long.as_bytes()).is_ok());
        assert_eq!(
            HostName::from_wire(format!("{long}b").as_bytes()).unwrap_err(),
            NameError::TooLong
        );
    }

    #[test]
    fn rejects_illegal_characters() {
        for s in [
            "exa mple.com",
            "a/b.com",
            "a*b.com",
            "-a.com",
            "a-.com",
            "a:b.com",
        ] {
            assert!(HostName::from_wire(s.as_bytes()).is_err(), "{s}");
        }
        assert!(HostName::from_wire("bücher.de".as_bytes()).is_err());
        assert!(HostName::from_wire(b"under_score.example.com").is_ok());
    }

    #[test]
    fn converts_unicode_config_names_to_punycode() {
        assert_eq!(
            HostName::from_config("Bücher.de").unwrap().as_str(),
            "xn--bcher-kva.de"
        );
        assert_eq!(
            HostName::from_config("xn--bcher-kva.de").unwrap().as_str(),
            "xn--bcher-kva.de"
        );
    }
}

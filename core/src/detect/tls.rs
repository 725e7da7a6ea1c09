//! TLS ClientHello → SNI.
//!
//! A ClientHello may span several TLS records (post-quantum key shares make
//! it larger than one packet; some clients fragment on purpose), so the
//! handshake message is reassembled from consecutive handshake records
//! before tls-parser reads it.

use super::Detect;
use crate::name::{HostName, NameError};
use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake};

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_ALERT: u8 = 21;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
/// `encrypted_client_hello` (RFC 9849 draft numbering, as sent by browsers).
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// What the ClientHello says about where the client is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: ServerName,
    /// The hello carries `encrypted_client_hello` (real or GREASE: the outer
    /// SNI is what is decided on either way).
    pub ech: bool,
    /// Highest protocol version offered, GREASE values ignored.
    pub max_version: TlsVersion,
}

/// The SNI extension's host_name, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    Absent,
    Name(HostName),
    Invalid(NameError),
}

/// Why the bytes are not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed ClientHello")]
    Malformed,
    #[error("ClientHello larger than the cap")]
    TooLarge,
}

/// Looks for a complete ClientHello at the start of `buf`. `max_len` caps
/// the bytes (record headers included) the hello may take; a hello that
/// declares more is refused at once instead of waited for.
pub fn parse_client_hello(buf: &[u8], max_len: usize) -> Detect<ClientHello, TlsError> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if let Some(err) = check_record_header(rest, rest.len() == buf.len()) {
            return Detect::Invalid(err);
        }
        if rest.len() < RECORD_HEADER_LEN {
            return Detect::Incomplete;
        }
        let payload_len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if payload_len == 0 || payload_len > MAX_RECORD_PAYLOAD {
            return Detect::Invalid(TlsError::Malformed);
        }
        let Some(payload) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len) else {
            // Refuse an oversized hello before waiting for all of it.
            let partial = &rest[RECORD_HEADER_LEN..];
            let header = if handshake.is_empty() {
                partial
            } else {
                &handshake
            };
            if stream_len_needed(header).is_some_and(|n| n > max_len) {
                return Detect::Invalid(TlsError::TooLarge);
            }
            return Detect::Incomplete;
        };
        rest = &rest[RECORD_HEADER_LEN + payload_len..];
        // Common case: the whole message is in the first record; no copy.
        let message: &[u8] = if handshake.is_empty() && complete_len(payload).is_some() {
            payload
        } else {
            handshake.extend_from_slice(payload);
            &handshake
        };
        if message[0] != HANDSHAKE_CLIENT_HELLO {
            return Detect::Invalid(TlsError::Malformed);
        }
        if stream_len_needed(message).is_some_and(|n| n > max_len) {
            return Detect::Invalid(TlsError::TooLarge);
        }
        if let Some(len) = complete_len(message) {
            return read_client_hello(&message[..len]);
        }
        if buf.len() - rest.len() >= max_len {
            return Detect::Invalid(TlsError::TooLarge);
        }
    }
}

/// Checks as much of a record header as has arrived. Only the first record
/// can show that the stream is not TLS at all; a later record of another
/// type interrupts the hello, which makes it malformed.
fn check_record_header(rest: &[u8], first: bool) -> Option<TlsError> {
    let not_handshake = if first {
        TlsError::NotTls
    } else {
        TlsError::Malformed
    };
    match *rest {
        [] => None,
        [ty, ..] if ty != CONTENT_HANDSHAKE => Some(not_handshake),
        [_, major, ..] if major != 3 => Some(not_handshake),
        [_, _, minor, ..] if minor > 4 => Some(TlsError::Malformed),
        _ => None,
    }
}

/// Length of the handshake message (header included) if all of it is here.
fn complete_len(message: &[u8]) -> Option<usize> {
    let len = HANDSHAKE_HEADER_LEN + declared_body_len(message)?;
    (message.len() >= len).then_some(len)
}

fn declared_body_len(message: &[u8]) -> Option<usize> {
    let h = message.get(..HANDSHAKE_HEADER_LEN)?;
    Some(usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]))
}

/// The fewest stream bytes a hello with this handshake header can take:
/// the message plus one record header per 2^14 bytes.
fn stream_len_needed(message: &[u8]) -> Option<usize> {
    let message_len = HANDSHAKE_HEADER_LEN + declared_body_len(message)?;
    Some(message_len + RECORD_HEADER_LEN * message_len.div_ceil(MAX_RECORD_PAYLOAD))
}

fn read_client_hello(message: &[u8]) -> Detect<ClientHello, TlsError> {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        tls_parser::parse_tls_message_handshake(message)
    else {
        return Detect::Invalid(TlsError::Malformed);
    };
    let mut server_name = ServerName::Absent;
    let mut ech = false;
    let mut max_version = hello.version.0;
    // Walk the extension headers and parse only the two extensions that
    // matter: a modern hello carries a dozen or more (key shares,
    // signature algorithms, …) and decoding them all costs most of the time.
    let mut rest = hello.ext.unwrap_or_default();
    while !rest.is_empty() {
        let Some(&[t0, t1, l0, l1]) = rest.get(..4) else {
            return Detect::Invalid(TlsError::Malformed);
        };
        let end = 4 + usize::from(u16::from_be_bytes([l0, l1]));
        let Some(whole) = rest.get(..end) else {
            return Detect::Invalid(TlsError::Malformed);
        };
        rest = &rest[end..];
        let kind = u16::from_be_bytes([t0, t1]);
        if kind == EXT_ENCRYPTED_CLIENT_HELLO {
            ech = true;
            continue;
        }
        if kind != EXT_SERVER_NAME && kind != EXT_SUPPORTED_VERSIONS {
            continue;
        }
        let Ok((&[], extension)) = tls_parser::parse_tls_extension(whole) else {
            return Detect::Invalid(TlsError::Malformed);
        };
        match extension {
            TlsExtension::SNI(names) => {
                for (kind, raw) in names {
                    if kind != SNIType::HostName {
                        continue;
                    }
                    // RFC 6066 §3: at most one name of each type.
                    if server_name != ServerName::Absent {
                        return Detect::Invalid(TlsError::Malformed);
                    }
                    server_name = match HostName::from_wire(raw) {
                        Ok(name) => ServerName::Name(name),
                        Err(e) => ServerName::Invalid(e),
                    };
                }
            }
            TlsExtension::SupportedVersions(versions) => {
                if let Some(v) = versions
                    .iter()
                    .map(|v| v.0)
                    .filter(|v| !is_grease(*v))
                    .max()
                {
                    max_version = max_version.max(v);
                }
            }
            _ => return Detect::Invalid(TlsError::Malformed),
        }
    }
    Detect::Done(ClientHello {
        server_name,
        ech,
        max_version: TlsVersion(max_version),
    })
}

/// RFC 8701 GREASE values: 0x0a0a, 0x1a1a, … 0xfafa.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// A TLS alert record: what a refused client sees instead of a ServerHello.
pub fn fatal_alert(description: AlertDescription) -> [u8; 7] {
    [CONTENT_ALERT, 3, 3, 0, 2, 2, description as u8]
}

/// A TLS protocol version as it appears on the wire (0x0303 = TLS 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsVersion(pub u16);

impl TlsVersion {
    pub const TLS1_0: TlsVersion = TlsVersion(0x0301);
    pub const TLS1_1: TlsVersion = TlsVersion(0x0302);
    pub const TLS1_2: TlsVersion = TlsVersion(0x0303);
    pub const TLS1_3: TlsVersion = TlsVersion(0x0304);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid TLS version {0:?}: expected 1.0, 1.1, 1.2 or 1.3")]
pub struct TlsVersionError(String);

impl std::str::FromStr for TlsVersion {
    type Err = TlsVersionError;

    /// `1.0` to `1.3`, as `--min-tls` takes it.
    fn from_str(s: &str) -> Result<TlsVersion, TlsVersionError> {
        match s.trim() {
            "1.0" => Ok(TlsVersion::TLS1_0),
            "1.1" => Ok(TlsVersion::TLS1_1),
            "1.2" => Ok(TlsVersion::TLS1_2),
            "1.3" => Ok(TlsVersion::TLS1_3),
            _ => Err(TlsVersionError(s.to_string())),
        }
    }
}

impl std::fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0x0300 => f.write_str("SSL 3.0"),
            v @ 0x0301..=0x0304 => write!(f, "TLS 1.{}", v - 0x0301),
            v => write!(f, "0x{v:04x}"),
        }
    }
}

/// The alerts the gateway sends (RFC 8446 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    HandshakeFailure = 40,
    AccessDenied = 49,
    DecodeError = 50,
    ProtocolVersion = 70,
    InternalError = 80,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::hello;

    const CAP: usize = 16 * 1024;
    const CHROMIUM: &[u8] =
        include_bytes!("../../../testdata/clienthellos/chromium-156-x25519mlkem768.bin");
    const CURL: &[u8] = include_bytes!("../../../testdata/clienthellos/curl-7.88-openssl-3.0.bin");
    const GNUTLS: &[u8] = include_bytes!("../../../testdata/clienthellos/gnutls-3.7.bin");
    const OPENSSL_TLS12: &[u8] =
        include_bytes!("../../../testdata/clienthellos/openssl-3.0-tls12-only.bin");
    const PYTHON: &[u8] = include_bytes!("../../../testdata/clienthellos/python3-ssl.bin");
    const ALL: [(&str, &[u8]); 5] = [
        ("chromium", CHROMIUM),
        ("curl", CURL),
        ("gnutls", GNUTLS),
        ("openssl-tls12", OPENSSL_TLS12),
        ("python", PYTHON),
    ];

    fn sni_of(bytes: &[u8]) -> String {
        match parse_client_hello(bytes, CAP) {
            Detect::Done(ClientHello {
                server_name: ServerName::Name(n),
                ..
            }) => n.to_string(),
            other => panic!("expected a name, got {other:?}"),
        }
    }

    #[test]
    fn reads_sni_from_every_captured_client() {
        for (client, bytes) in ALL {
            assert_eq!(sni_of(bytes), "www.example.test", "{client}");
        }
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        for (client, bytes) in ALL {
            for len in 0..bytes.len() {
                assert_eq!(
                    parse_client_hello(&bytes[..len], CAP),
                    Detect::Incomplete,
                    "{client} at {len}"
                );
            }
        }
    }

    #[test]
    fn every_split_into_three_records_parses() {
        for (client, bytes) in ALL {
            let message = hello::handshake_message(bytes);
            for a in 1..message.len() {
                for b in a + 1..message.len() {
                    let records = hello::into_records(&message, &[a, b]);
                    match parse_client_hello(&records, CAP) {
                        Detect::Done(h) if h.server_name != ServerName::Absent => {}
                        other => panic!("{client} cut at {a},{b}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn large_hello_in_three_records_is_read_at_every_prefix() {
        let records = hello::large_hello_in_three_records(CURL);
        assert!(
            records.len() > 15_000 && records.len() <= CAP,
            "{}",
            records.len()
        );
        for len in 0..records.len() {
            assert_eq!(
                parse_client_hello(&records[..len], CAP),
                Detect::Incomplete,
                "at {len}"
            );
        }
        assert_eq!(sni_of(&records), "www.example.test");
    }

    #[test]
    fn refuses_a_hello_that_declares_more_than_the_cap_at_once() {
        let records = hello::large_hello_in_three_records(CURL);
        // The first record alone already tells the total size.
        let first_record = 5 + usize::from(u16::from_be_bytes([records[3], records[4]]));
        assert_eq!(
            parse_client_hello(&records[..first_record], 4096),
            Detect::Invalid(TlsError::TooLarge)
        );
        assert_eq!(
            parse_client_hello(&records[..10], 4096),
            Detect::Invalid(TlsError::TooLarge)
        );
    }

    #[test]
    fn reports_ech_and_highest_version() {
        let Detect::Done(chromium) = parse_client_hello(CHROMIUM, CAP) else {
            panic!()
        };
        assert!(chromium.ech);
        assert_eq!(chromium.max_version, TlsVersion::TLS1_3);
        let Detect::Done(tls12) = parse_client_hello(OPENSSL_TLS12, CAP) else {
            panic!()
        };
        assert!(!tls12.ech);
        assert_eq!(tls12.max_version, TlsVersion::TLS1_2);
    }

    #[test]
    fn reports_an_old_clients_version_and_names_versions() {
        let tls10 = hello::with_legacy_version(OPENSSL_TLS12, 0x0301);
        let Detect::Done(h) = parse_client_hello(&tls10, CAP) else {
            panic!()
        };
        assert_eq!(h.max_version, TlsVersion::TLS1_0);
        assert_eq!(h.max_version.to_string(), "TLS 1.0");
        assert!(TlsVersion::TLS1_0 < TlsVersion::TLS1_2);
        assert_eq!("1.3".parse(), Ok(TlsVersion::TLS1_3));
        assert!("1.4".parse::<TlsVersion>().is_err());
    }

    #[test]
    fn refuses_what_is_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x80\x2e\x01\x03\x01",
            b"SSH-2.0-OpenSSH",
            b"\x16\x02\x01",
        ] {
            assert_eq!(
                parse_client_hello(bytes, CAP),
                Detect::Invalid(TlsError::NotTls),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn refuses_a_hello_interrupted_by_another_record() {
        let message = hello::handshake_message(CURL);
        let mut records = hello::into_records(&message[..100], &[]);
        records.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(
            parse_client_hello(&records, CAP),
            Detect::Invalid(TlsError::Malformed)
        );
    }

    #[test]
    fn refuses_a_handshake_that_is_not_a_client_hello() {
        let mut bytes = CURL.to_vec();
        bytes[5] = 2; // ServerHello
        assert_eq!(
            parse_client_hello(&bytes, CAP),
            Detect::Invalid(TlsError::Malformed)
        );
    }

    #[test]
    fn reports_missing_and_ip_literal_sni() {
        // Rename the SNI extension (type 0) to an unknown type: no SNI.
        let message = hello::handshake_message(CURL);
        let at = find(&message, b"www.example.test") - 9;
        assert_eq!(&message[at..at + 2], &[0, 0]);
        let mut no_sni = message.clone();
        no_sni[at + 1] = 0x99;
        let Detect::Done(h) = parse_client_hello(&hello::into_records(&no_sni, &[]), CAP) else {
            panic!()
        };
        assert_eq!(h.server_name, ServerName::Absent);

        let mut ip = message.clone();
        let name_at = at + 9;
        ip[name_at..name_at + 16].copy_from_slice(b"0000000192.0.2.1");
        let Detect::Done(h) = parse_client_hello(&hello::into_records(&ip, &[]), CAP) else {
            panic!()
        };
        assert_eq!(h.server_name, ServerName::Invalid(NameError::IpLiteral));
    }

    #[test]
    fn alert_is_a_fatal_alert_record() {
        assert_eq!(
            fatal_alert(AlertDescription::AccessDenied),
            [21, 3, 3, 0, 2, 2, 49]
        );
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse_client_hello(&bytes, CAP);
        }

        #[test]
        fn never_panics_on_corrupted_hellos(
            index in 0usize..5,
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = ALL[index].1.to_vec();
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            let cut = cut % (bytes.len() + 1);
            let _ = parse_client_hello(&bytes[..cut], CAP);
        }
    }
}

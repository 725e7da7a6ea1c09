//! HTTP/1.x message heads and body framing.
//!
//! The gateway checks every request on a connection, not only the first, so
//! it must know where each request ends: [`parse_request_head`] gives the
//! Host and the body's framing, [`parse_response_head`] the framing of the
//! answer, and [`ChunkedDecoder`] finds the end of a chunked body. Anything
//! ambiguous (both Content-Length and Transfer-Encoding, differing lengths,
//! bare LF in chunk lines) is refused: a proxy and a server that read one
//! message two ways is how request smuggling works.

use super::Detect;
use crate::name::{HostName, NameError, is_ip_literal};

/// Most header lines we accept in one head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a request or response cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("not an HTTP/1.x message")]
    Malformed,
    #[error("message head larger than the cap")]
    TooLarge,
    #[error("no Host header")]
    NoHost,
    #[error("more than one Host header")]
    SeveralHosts,
    #[error("request target names another host than the Host header")]
    HostMismatch,
    #[error("CONNECT is not allowed through a transparent gateway")]
    Connect,
    #[error("Host is not a valid name: {0}")]
    BadHost(NameError),
    #[error("ambiguous or unsupported body framing")]
    BadFraming,
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Exactly this many bytes (0: no body).
    Exact(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes (responses only).
    UntilClose,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes the head takes, final CRLF included.
    pub len: usize,
    pub host: HostName,
    pub body: BodyLength,
    /// Asks to switch protocols (`Connection: upgrade` + `Upgrade`).
    pub upgrade: bool,
    /// HEAD: the response has no body whatever its headers say.
    pub is_head: bool,
    /// Offers `Upgrade: h2c`: see [`without_h2c`].
    pub h2c: bool,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub body: BodyLength,
}

impl ResponseHead {
    /// 1xx other than 101: the final response is still to come.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses a request head at the start of `buf`.
pub fn parse_request_head(buf: &[u8], max_len: usize) -> Detect<RequestHead, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match head_len(req.parse(buf), buf.len(), max_len) {
        Ok(len) => len,
        Err(outcome) => return outcome,
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Detect::Invalid(HttpError::Malformed);
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        return Detect::Invalid(HttpError::Connect);
    }
    let headers = req.headers;
    match read_request(headers, target, version) {
        Ok((host, body, upgrade)) => Detect::Done(RequestHead {
            len,
            host,
            body,
            upgrade,
            is_head: method == "HEAD",
            h2c: header_has_token(headers, "upgrade", "h2c"),
        }),
        Err(e) => Detect::Invalid(e),
    }
}

fn read_request(
    headers: &[httparse::Header<'_>],
    target: &str,
    version: u8,
) -> Result<(HostName, BodyLength, bool), HttpError> {
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host_value = hosts.next().ok_or(HttpError::NoHost)?.value;
    if hosts.next().is_some() {
        return Err(HttpError::SeveralHosts);
    }
    let host = host_name(host_value)?;
    if let Some(authority) = absolute_form_authority(target)?
        && host_name(authority.as_bytes())? != host
    {
        return Err(HttpError::HostMismatch);
    }
    // A request cannot be delimited by close (RFC 9112 §6.3): no length
    // means no body, and a coding other than chunked last is an error.
    let body = match body_framing(headers, version)? {
        BodyLength::UntilClose if has_header(headers, "transfer-encoding") => {
            return Err(HttpError::BadFraming);
        }
        BodyLength::UntilClose => BodyLength::Exact(0),
        framing => framing,
    };
    let upgrade =
        has_header(headers, "upgrade") && header_has_token(headers, "connection", "upgrade");
    Ok((host, body, upgrade))
}

/// The authority of an absolute-form target (`http://host:port/path`).
/// Only a target that starts with a scheme is one: `://` later on, as in
/// `/login?next=http://other.example/`, is part of a path or query.
fn absolute_form_authority(target: &str) -> Result<Option<&str>, HttpError> {
    let Some((scheme, rest)) = target.split_once("://") else {
        return Ok(None);
    };
    if !is_scheme(scheme) {
        return Ok(None);
    }
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return Err(HttpError::Malformed);
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Userinfo (`user@host`) is deprecated and a classic confusion vector.
    if authority.contains('@') {
        return Err(HttpError::Malformed);
    }
    Ok(Some(authority))
}

/// RFC 3986 §3.1: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Host header value → name: port stripped, lowercased, validated.
fn host_name(value: &[u8]) -> Result<HostName, HttpError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| HttpError::BadHost(NameError::IllegalChar('\u{FFFD}')))?;
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() {
        return Err(HttpError::NoHost);
    }
    if value.starts_with('[') || is_ip_literal(value) {
        return Err(HttpError::BadHost(NameError::IpLiteral));
    }
    let name = match value.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return Err(HttpError::BadHost(NameError::IllegalChar(':'))),
        None => value,
    };
    HostName::from_wire(name.as_bytes()).map_err(HttpError::BadHost)
}

/// Framing from Transfer-Encoding and Content-Length (RFC 9112 §6).
fn body_framing(headers: &[httparse::Header<'_>], version: u8) -> Result<BodyLength, HttpError> {
    let has_te = has_header(headers, "transfer-encoding");
    let mut lengths = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .flat_map(|h| h.value.split(|&b| b == b','));
    if has_te {
        if version == 0 || lengths.next().is_some() {
            return Err(HttpError::BadFraming);
        }
        let last_coding = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .map(trim_ows)
            .rfind(|c| !c.is_empty());
        return match last_coding {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Ok(BodyLength::Chunked),
            _ => Ok(BodyLength::UntilClose),
        };
    }
    let mut length = None;
    for raw in lengths {
        let n = parse_decimal(trim_ows(raw)).ok_or(HttpError::BadFraming)?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::BadFraming);
        }
        length = Some(n);
    }
    Ok(length.map_or(BodyLength::UntilClose, BodyLength::Exact))
}

/// The request head `head` (complete, as [`parse_request_head`] accepted
/// it) without its offer to upgrade to cleartext HTTP/2: the `h2c` token
/// of `Upgrade`, the `HTTP2-Settings` header, and the `Connection` tokens
/// that named them. A server that took the offer would speak HTTP/2 on the
/// connection from then on, where requests are no longer checked one by
/// one. Other upgrades (WebSocket) are kept. `None` if nothing offers h2c.
pub fn without_h2c(head: &[u8]) -> Option<Vec<u8>> {
    let lines: Vec<&[u8]> = head.split_inclusive(|&b| b == b'\n').collect();
    let (request_line, fields) = lines.split_first()?;
    let name_of = |line: &[u8]| -> Vec<u8> {
        let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
        line[..colon].to_ascii_lowercase()
    };
    let value_of = |line: &'_ [u8]| -> Vec<Vec<u8>> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .map_or(line.len(), |c| c + 1);
        line[colon..]
            .split(|&b| b == b',')
            .map(|t| trim_ows(t).to_vec())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let is = |token: &[u8], name: &[u8]| token.eq_ignore_ascii_case(name);
    let upgrades: Vec<Vec<u8>> = fields
        .iter()
        .filter(|l| name_of(l) == b"upgrade")
        .flat_map(|l| value_of(l))
        .collect();
    if !upgrades.iter().any(|t| is(t, b"h2c")) {
        return None;
    }
    let upgrade_left = upgrades.iter().any(|t| !is(t, b"h2c"));
    let mut out = Vec::with_capacity(head.len());
    out.extend_from_slice(request_line);
    let write = |out: &mut Vec<u8>, name: &[u8], tokens: Vec<Vec<u8>>| {
        if !tokens.is_empty() {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&tokens.join(&b", "[..]));
            out.extend_from_slice(b"\r\n");
        }
    };
    for line in fields {
        match name_of(line).as_slice() {
            b"http2-settings" => {}
            b"upgrade" => {
                let kept = value_of(line)
                    .into_iter()
                    .filter(|t| !is(t, b"h2c"))
                    .collect();
                write(&mut out, b"Upgrade", kept);
            }
            b"connection" => {
                let kept = value_of(line)
                    .into_iter()
                    .filter(|t| !is(t, b"http2-settings") && (upgrade_left || !is(t, b"upgrade")))
                    .collect();
                write(&mut out, b"Connection", kept);
            }
            _ => {
                // Field lines, and the empty line that ends the head.
                out.extend_from_slice(line);
            }
        }
    }
    Some(out)
}

/// Parses a response head at the start of `buf`. `request_was_head`: the
/// request it answers was HEAD, so there is no body.
pub fn parse_response_head(
    buf: &[u8],
    max_len: usize,
    request_was_head: bool,
) -> Detect<ResponseHead, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match head_len(res.parse(buf), buf.len(), max_len) {
        Ok(len) => len,
        Err(outcome) => return outcome,
    };
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Detect::Invalid(HttpError::Malformed);
    };
    let body = if request_was_head || (100..200).contains(&status) || status == 204 || status == 304
    {
        BodyLength::Exact(0)
    } else {
        match body_framing(res.headers, version) {
            Ok(body) => body,
            Err(e) => return Detect::Invalid(e),
        }
    };
    Detect::Done(ResponseHead { len, status, body })
}

/// The length of a complete head within the cap, or what to report: more
/// bytes needed, too large, or not HTTP.
fn head_len<T>(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max_len: usize,
) -> Result<usize, Detect<T, HttpError>> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len <= max_len => Ok(len),
        Ok(httparse::Status::Partial) if buffered < max_len => Err(Detect::Incomplete),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Err(Detect::Invalid(HttpError::TooLarge)),
        Err(_) => Err(Detect::Invalid(HttpError::Malformed)),
    }
}

fn has_header(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers.iter().any(|h| h.name.eq_ignore_ascii_case(name))
}

fn header_has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Finds the end of a chunked body, fed the bytes as they arrive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Reading a chunk-size line; `size` so far, `len` bytes of it read.
    #[default]
    SizeStart,
    Size {
        size: u64,
        len: usize,
        in_ext: bool,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    TrailerLineStart {
        total: usize,
    },
    TrailerLine {
        total: usize,
    },
    TrailerLf {
        total: usize,
        empty: bool,
    },
    Done,
}

impl ChunkedDecoder {
    /// Consumes body bytes from the start of `buf`; returns how many belong
    /// to this body. Once [`Self::is_done`], the rest belongs to whatever
    /// comes next.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, HttpError> {
        let mut at = 0;
        while at < buf.len() && self.state != ChunkState::Done {
            if let ChunkState::Data { remaining } = self.state {
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - at);
                at += take;
                let remaining = remaining - take as u64;
                self.state = if remaining == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data { remaining }
                };
                continue;
            }
            self.state = step(self.state, buf[at])?;
            at += 1;
        }
        Ok(at)
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

fn step(state: ChunkState, b: u8) -> Result<ChunkState, HttpError> {
    use ChunkState::*;
    let bad = Err(HttpError::BadFraming);
    Ok(match state {
        SizeStart => match hex_value(b) {
            Some(v) => Size {
                size: v,
                len: 1,
                in_ext: false,
            },
            None => return bad,
        },
        Size { size, len, in_ext } => {
            if len >= MAX_CHUNK_LINE {
                return bad;
            }
            match (b, in_ext, hex_value(b)) {
                (b'\r', _, _) => SizeLf { size },
                (b'\n', _, _) => return bad,
                (_, false, Some(v)) => {
                    let size = size.checked_mul(16).and_then(|s| s.checked_add(v));
                    match size {
                        Some(size) if size <= i64::MAX as u64 => Size {
                            size,
                            len: len + 1,
                            in_ext,
                        },
                        _ => return bad,
                    }
                }
                (b';' | b' ' | b'\t', _, _) | (_, true, _) => Size {
                    size,
                    len: len + 1,
                    in_ext: true,
                },
                _ => return bad,
            }
        }
        SizeLf { size } => match (b, size) {
            (b'\n', 0) => TrailerLineStart { total: 0 },
            (b'\n', size) => Data { remaining: size },
            _ => return bad,
        },
        Data { .. } => unreachable!("data is consumed in bulk"),
        DataCr if b == b'\r' => DataLf,
        DataLf if b == b'\n' => SizeStart,
        DataCr | DataLf => return bad,
        TrailerLineStart { total } | TrailerLine { total } if total >= MAX_TRAILERS => return bad,
        TrailerLineStart { total } => match b {
            b'\r' => TrailerLf {
                total: total + 1,
                empty: true,
            },
            b'\n' => return bad,
            _ => TrailerLine { total: total + 1 },
        },
        TrailerLine { total } => match b {
            b'\r' => TrailerLf {
                total: total + 1,
                empty: false,
            },
            b'\n' => return bad,
            _ => TrailerLine { total: total + 1 },
        },
        TrailerLf { total, empty } => match (b, empty) {
            (b'\n', true) => Done,
            (b'\n', false) => TrailerLineStart { total: total + 1 },
            _ => return bad,
        },
        Done => Done,
    })
}

fn hex_value(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAP: usize = 16 * 1024;

    fn request(text: &str) -> Result<RequestHead, HttpError> {
        match parse_request_head(text.as_bytes(), CAP) {
            Detect::Done(head) => Ok(head),
            Detect::Invalid(e) => Err(e),
            Detect::Incomplete => panic!("incomplete: {text:?}"),
        }
    }

    #[test]
    fn reads_host_without_port_in_lowercase() {
        let text = "GET / HTTP/1.1\r\nHost: WWW.Example.COM:8080\r\n\r\nbody";
        let head = request(text).unwrap();
        assert_eq!(head.host.as_str(), "www.example.com");
        assert_eq!(head.len, text.len() - 4);
        assert_eq!(head.body, BodyLength::Exact(0));
        assert!(!head.upgrade);
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        let text = b"POST /upload?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\n";
        for len in 0..text.len() {
            assert_eq!(
                parse_request_head(&text[..len], CAP),
                Detect::Incomplete,
                "at {len}"
            );
        }
        assert!(matches!(parse_request_head(text, CAP), Detect::Done(_)));
    }

    #[test]
    fn refuses_missing_duplicate_and_empty_host() {
        assert_eq!(request("GET / HTTP/1.1\r\n\r\n"), Err(HttpError::NoHost));
        assert_eq!(request("GET / HTTP/1.0\r\n\r\n"), Err(HttpError::NoHost));
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost:\r\n\r\n"),
            Err(HttpError::NoHost)
        );
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n"),
            Err(HttpError::SeveralHosts)
        );
    }

    #[test]
    fn refuses_ip_literal_hosts() {
        for host in [
            "192.0.2.1",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "[2001:db8::1]:80",
            "2001:db8::1",
        ] {
            assert_eq!(
                request(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")),
                Err(HttpError::BadHost(NameError::IpLiteral)),
                "{host}"
            );
        }
    }

    #[test]
    fn absolute_form_target_must_agree_with_host() {
        let ok =
            request("GET http://Example.com:80/a HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap();
        assert_eq!(ok.host.as_str(), "example.com");
        assert_eq!(
            request("GET http://evil.example/a HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            Err(HttpError::HostMismatch)
        );
        assert_eq!(
            request("GET http://user@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            Err(HttpError::Malformed)
        );
    }

    #[test]
    fn a_url_in_the_path_or_query_is_not_an_absolute_form_target() {
        for target in [
            "/login?next=http://example.com/",
            "/redirect?to=https://evil.example/x",
            "/a/http://b.example/",
            "/?u=ftp://x.example",
            "*",
        ] {
            let head = request(&format!(
                "GET {target} HTTP/1.1\r\nHost: www.example.test\r\n\r\n"
            ));
            assert_eq!(
                head.map(|h| h.host.as_str().to_string()),
                Ok("www.example.test".to_string()),
                "{target}"
            );
        }
        // A real absolute form with a query naming another host is still
        // decided by its own authority.
        let ok = request(
            "GET http://www.example.test/?next=http://evil.example/ HTTP/1.1\r\nHost: www.example.test\r\n\r\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            request("GET ftp://www.example.test/ HTTP/1.1\r\nHost: www.example.test\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        assert_eq!(
            request("GET HTTP://evil.example/?x HTTP/1.1\r\nHost: www.example.test\r\n\r\n"),
            Err(HttpError::HostMismatch)
        );
    }

    #[test]
    fn an_h2c_upgrade_is_taken_out_and_the_request_stays_http_1() {
        let curl = "GET /x HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: curl/8\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
        let head = request(curl).unwrap();
        assert!(head.h2c && head.upgrade);
        let stripped = without_h2c(curl.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(stripped.clone()).unwrap(),
            "GET /x HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: curl/8\r\n\r\n"
        );
        let again = match parse_request_head(&stripped, 16 * 1024) {
            Detect::Done(h) => h,
            other => panic!("{other:?}"),
        };
        assert!(!again.h2c && !again.upgrade);
        assert_eq!(again.len, stripped.len());
        assert_eq!(without_h2c(&stripped), None);

        // Other tokens stay, and so does the upgrade they ask for.
        let both = "GET / HTTP/1.1\r\nHost: a.example.test\r\nconnection: keep-alive, upgrade, http2-settings\r\nupgrade: H2C, websocket\r\nhttp2-settings: AA\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let stripped = String::from_utf8(without_h2c(both.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            stripped,
            "GET / HTTP/1.1\r\nHost: a.example.test\r\nConnection: keep-alive, upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        assert!(request(&stripped).unwrap().upgrade);
        // A WebSocket upgrade alone is not touched.
        let ws = "GET /ws HTTP/1.1\r\nHost: a.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(!request(ws).unwrap().h2c);
        assert_eq!(without_h2c(ws.as_bytes()), None);
        // Bare LF line ends, as httparse accepts them.
        let lf = "GET / HTTP/1.1\nHost: a.example.test\nUpgrade: h2c\nConnection: upgrade\n\n";
        let stripped = without_h2c(lf.as_bytes()).unwrap();
        assert_eq!(stripped, b"GET / HTTP/1.1\nHost: a.example.test\n\n");
    }

    #[test]
    fn refuses_connect() {
        assert_eq!(
            request("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
            Err(HttpError::Connect)
        );
    }

    #[test]
    fn refuses_what_is_not_http() {
        for bytes in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"SSH-2.0-OpenSSH\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
        ] {
            assert_eq!(
                parse_request_head(bytes, CAP),
                Detect::Invalid(HttpError::Malformed),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn caps_the_head_size() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: example.com\r\nX: {}\r\n\r\n",
            "a".repeat(CAP)
        );
        assert_eq!(
            parse_request_head(big.as_bytes(), CAP),
            Detect::Invalid(HttpError::TooLarge)
        );
        assert_eq!(
            parse_request_head(&big.as_bytes()[..CAP], CAP),
            Detect::Invalid(HttpError::TooLarge)
        );
        let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\nHost: example.com\r\n{many}\r\n");
        assert_eq!(request(&text), Err(HttpError::TooLarge));
    }

    #[test]
    fn reads_body_framing() {
        let cl =
            request("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 42\r\n\r\n").unwrap();
        assert_eq!(cl.body, BodyLength::Exact(42));
        let same =
            request("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 7, 7\r\n\r\n").unwrap();
        assert_eq!(same.body, BodyLength::Exact(7));
        let te = request(
            "POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
        )
        .unwrap();
        assert_eq!(te.body, BodyLength::Chunked);
    }

    #[test]
    fn refuses_ambiguous_framing() {
        for headers in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Content-Length: 5\r\nContent-Length: 6",
            "Content-Length: -1",
            "Content-Length: 99999999999999999999",
            "Content-Length: 0x10",
        ] {
            let text = format!("POST / HTTP/1.1\r\nHost: a.example\r\n{headers}\r\n\r\n");
            assert_eq!(request(&text), Err(HttpError::BadFraming), "{headers}");
        }
        // A request whose body would end only at close cannot be delimited.
        assert_eq!(
            request("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(HttpError::BadFraming),
        );
    }

    #[test]
    fn recognises_upgrade_requests() {
        let ws = request(
            "GET /ws HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
        assert!(ws.upgrade);
        let no =
            request("GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(!no.upgrade);
    }

    #[test]
    fn reads_response_framing() {
        let parse = |text: &str, head: bool| match parse_response_head(text.as_bytes(), CAP, head) {
            Detect::Done(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).body,
            BodyLength::Exact(3)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).body,
            BodyLength::Exact(0)
        );
        assert_eq!(
            parse("HTTP/1.1 204 No Content\r\n\r\n", false).body,
            BodyLength::Exact(0)
        );
        assert_eq!(
            parse(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            )
            .body,
            BodyLength::Exact(0)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\n\r\n", false).body,
            BodyLength::UntilClose
        );
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .body,
            BodyLength::Chunked
        );
        let interim = parse("HTTP/1.1 100 Continue\r\n\r\n", false);
        assert!(interim.is_interim());
        let switching = parse(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            false,
        );
        assert!(!switching.is_interim());
        assert_eq!(switching.status, 101);
    }

    fn decode_all(body: &[u8]) -> Result<(usize, bool), HttpError> {
        let mut d = ChunkedDecoder::default();
        let n = d.advance(body)?;
        Ok((n, d.is_done()))
    }

    #[test]
    fn finds_the_end_of_a_chunked_body() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        assert_eq!(decode_all(body), Ok((body.len() - 4, true)));
        assert_eq!(decode_all(b"0\r\n\r\n"), Ok((5, true)));
    }

    #[test]
    fn chunked_body_fed_one_byte_at_a_time_ends_at_the_same_place() {
        let body = b"3\r\nabc\r\n0\r\n\r\nGET";
        let mut d = ChunkedDecoder::default();
        let mut consumed = 0;
        for b in body.chunks(1) {
            if d.is_done() {
                break;
            }
            consumed += d.advance(b).unwrap();
        }
        assert!(d.is_done());
        assert_eq!(consumed, body.len() - 3);
    }

    #[test]
    fn refuses_malformed_chunks() {
        for body in [
            &b"x\r\n"[..],
            b"5\nhello",
            b"3\r\nabcX\r\n",
            b"fffffffffffffffffff\r\n",
            b"0\r\nbad\n",
        ] {
            assert_eq!(decode_all(body), Err(HttpError::BadFraming), "{body:?}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), head in any::<bool>()) {
            let _ = parse_request_head(&bytes, CAP);
            let _ = parse_response_head(&bytes, CAP, head);
            let _ = ChunkedDecoder::default().advance(&bytes);
        }

        #[test]
        fn chunked_end_does_not_depend_on_how_bytes_arrive(
            sizes in prop::collection::vec(0usize..40, 0..6),
            cuts in prop::collection::vec(1usize..20, 1..50),
        ) {
            let mut body = Vec::new();
            for size in sizes.iter().filter(|s| **s > 0) {
                body.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                body.extend(std::iter::repeat_n(b'x', *size));
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let end = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut d = ChunkedDecoder::default();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while !d.is_done() && at < body.len() {
                let upto = (at + cut.next().unwrap()).min(body.len());
                at += d.advance(&body[at..upto]).unwrap();
            }
            prop_assert!(d.is_done());
            prop_assert_eq!(at, end);
        }
    }
}

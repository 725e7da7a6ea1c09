//! One audit record as one JSON line, encoded in place: no serialiser,
//! one allocation per record, the timestamp formatted by hand.

use crate::record::Record;
use std::io::Write;
use std::net::SocketAddr;
use std::time::SystemTime;

/// Room for a typical record, so the line is not reallocated as it grows.
const LINE_CAPACITY: usize = 384;

/// `,"NAME":` as one literal: a field's key costs one copy, not three.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// Which record of a connection a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Admitted and connected upstream (only with `--audit-open`).
    Open,
    /// Still open: what it moved so far.
    Interim,
    /// Ended: its verdict and everything it moved. Exactly one per
    /// connection; on HTTP, it describes the connection's last request.
    End,
    /// HTTP: a request of a kept-alive connection that another request
    /// followed: its name, verdict and the bytes it moved.
    Request,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Interim => "interim",
            Kind::End => "end",
            Kind::Request => "request",
        }
    }
}

/// One record as a JSON line (with its newline); `policy` is the name of
/// the policy that decided it, `at` when it was written. `reason` is the refusal
/// reason for a deny and the error kind for an error.
///
/// Written by hand, field by field into one presized buffer: it runs once
/// per connection, and a generic serialiser took several times as long.
/// The fields and their order are those of the README's table.
pub fn line(rec: &Record, kind: Kind, policy: &str, at: SystemTime) -> Vec<u8> {
    use crate::verdict::Verdict;
    let reason = match rec.verdict {
        Verdict::Allow => None,
        Verdict::Deny(reason) => Some(reason.as_str()),
        Verdict::Error(kind) => Some(kind.as_str()),
    };
    let mut out = Json(Vec::with_capacity(LINE_CAPACITY));
    out.0.extend_from_slice(b"{\"ts\":\"");
    rfc3339_millis(&mut out.0, at);
    out.0.push(b'"');
    out.string(key!("kind"), Some(kind.as_str()));
    out.address(key!("src"), Some(rec.src));
    out.address(key!("dst"), rec.dst.map(|d| d.0));
    out.address(key!("upstream"), rec.upstream);
    out.string(key!("proto"), Some(rec.proto.as_str()));
    out.string(key!("name"), rec.name.as_ref().map(|n| n.as_str()));
    out.string(key!("verdict"), Some(rec.verdict.as_str()));
    out.string(key!("reason"), reason);
    out.string(key!("would_deny"), rec.would_deny.map(|r| r.as_str()));
    out.string(key!("policy"), Some(policy));
    out.string(key!("rule"), rec.rule.as_deref());
    out.key(key!("request"));
    match rec.request {
        0 => out.0.extend_from_slice(b"null"),
        n => digits(&mut out.0, n.into(), 1),
    }
    let moved = rec.own_bytes();
    out.number(key!("bytes_up"), moved.up);
    out.number(key!("bytes_down"), moved.down);
    let duration_ms = u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX);
    out.number(key!("duration_ms"), duration_ms);
    out.key(key!("ech"));
    let ech: &[u8] = if rec.ech { b"true" } else { b"false" };
    out.0.extend_from_slice(ech);
    out.0.extend_from_slice(b"}\n");
    out.0
}

/// A JSON object being written, as bytes: everything written is ASCII or
/// copied whole from a `&str`, so the line is UTF-8 without a check.
struct Json(Vec<u8>);

impl Json {
    /// `key` is a whole `,"name":` from [`key!`].
    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(key.as_bytes());
    }

    /// A string value, escaped, or null.
    fn string(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        let Some(value) = value else {
            return self.0.extend_from_slice(b"null");
        };
        self.0.push(b'"');
        // Names, rules and policies are plain ASCII by construction, so
        // almost always nothing needs escaping; the escaping keeps the line
        // valid JSON whatever they hold. Bytes of multi-byte characters are
        // all 0x80 or above and pass through whole.
        if !value.bytes().any(needs_escape) {
            self.0.extend_from_slice(value.as_bytes());
            return self.0.push(b'"');
        }
        for b in value.bytes() {
            match b {
                b'"' => self.0.extend_from_slice(b"\\\""),
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b if b < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.0.extend_from_slice(b"\\u00");
                    self.0.push(HEX[usize::from(b >> 4)]);
                    self.0.push(HEX[usize::from(b & 0xf)]);
                }
                b => self.0.push(b),
            }
        }
        self.0.push(b'"');
    }

    /// An address as `ip:port` (`[ip]:port` for IPv6), quoted, or null.
    fn address(&mut self, key: &str, value: Option<SocketAddr>) {
        self.key(key);
        match value {
            Some(SocketAddr::V4(a)) => {
                self.0.push(b'"');
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.0.push(b'.');
                    }
                    digits(&mut self.0, octet.into(), 1);
                }
                self.0.push(b':');
                digits(&mut self.0, a.port().into(), 1);
                self.0.push(b'"');
            }
            Some(a) => {
                let _ = write!(self.0, "\"{a}\"");
            }
            None => self.0.extend_from_slice(b"null"),
        }
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        digits(&mut self.0, value, 1);
    }
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// `n` in decimal, zero-padded to at least `width` digits. The formatting
/// machinery costs more than the digits for the dozen numbers of a line.
fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut at = buf.len();
    while n > 0 || buf.len() - at < width.max(1) {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[at..]);
}

/// `at` as RFC 3339 in UTC with milliseconds: `2026-11-26T08:36:49.512Z`.
fn rfc3339_millis(out: &mut Vec<u8>, at: SystemTime) {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let parts = [
        (year, 4, b'-'),
        (month, 2, b'-'),
        (day, 2, b'T'),
        (of_day / 3600, 2, b':'),
        (of_day / 60 % 60, 2, b':'),
        (of_day % 60, 2, b'.'),
        (since.subsec_millis().into(), 3, b'Z'),
    ];
    for (value, width, then) in parts {
        digits(out, value, width);
        out.push(then);
    }
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// days-to-civil, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::HostName;
    use crate::net::forward::Transferred;
    use crate::verdict::{ErrorKind, Proto, Reason, Verdict};
    use std::time::Duration;

    /// The line as text; it must be UTF-8.
    fn text(rec: &Record, policy: &str, at: SystemTime) -> String {
        String::from_utf8(line(rec, Kind::End, policy, at)).unwrap()
    }

    fn record(verdict: Verdict) -> Record {
        let mut rec = Record::new(
            "192.0.2.10:40000".parse().unwrap(),
            crate::policy::PolicyId::DEFAULT,
            Proto::Tls,
        );
        rec.dst = Some(crate::net::orig_dst::OrigDst(
            "[2001:db8:3::20]:443".parse().unwrap(),
        ));
        rec.upstream = Some("[2001:db8:3::10]:443".parse().unwrap());
        rec.name = Some(HostName::from_wire(b"www.example.test").unwrap());
        rec.rule = Some(".example.test".into());
        rec.ech = true;
        rec.verdict = verdict;
        rec.moved = Transferred {
            up: 517,
            down: 4096,
        };
        rec.duration = Duration::from_millis(1234);
        rec
    }

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let text = text(&record(Verdict::Allow), "build-agents", at);
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": "2026-09-21T14:13:20.123Z",
                "kind": "end",
                "src": "192.0.2.10:40000",
                "dst": "[2001:db8:3::20]:443",
                "upstream": "[2001:db8:3::10]:443",
                "proto": "tls",
                "name": "www.example.test",
                "verdict": "allow",
                "reason": null,
                "would_deny": null,
                "policy": "build-agents",
                "rule": ".example.test",
                "request": null,
                "bytes_up": 517,
                "bytes_down": 4096,
                "duration_ms": 1234,
                "ech": true,
            })
        );
    }

    #[test]
    fn reason_is_the_refusal_or_the_error_and_absent_facts_are_null() {
        let mut rec = record(Verdict::Deny(Reason::NotListed));
        rec.rule = None;
        let v: serde_json::Value =
            serde_json::from_str(&text(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["reason"], "not_listed");
        assert_eq!(v["rule"], serde_json::Value::Null);

        let mut rec = record(Verdict::Error(ErrorKind::ConnectRefused));
        rec.dst = None;
        rec.name = None;
        let v: serde_json::Value =
            serde_json::from_str(&text(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(
            (v["verdict"].as_str(), v["reason"].as_str()),
            (Some("error"), Some("connect_refused"))
        );
        assert_eq!((v["dst"].is_null(), v["name"].is_null()), (true, true));

        // Monitor mode: forwarded, with what enforce mode would have done.
        let mut rec = record(Verdict::Allow);
        rec.rule = None;
        rec.would_deny = Some(Reason::NotListed);
        let v: serde_json::Value =
            serde_json::from_str(&text(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(
            (v["verdict"].as_str(), v["would_deny"].as_str()),
            (Some("allow"), Some("not_listed"))
        );
    }

    #[test]
    fn each_line_says_which_record_of_its_connection_it_is() {
        let rec = record(Verdict::Allow);
        for kind in [Kind::Open, Kind::Interim, Kind::End, Kind::Request] {
            let text = String::from_utf8(line(&rec, kind, "default", SystemTime::UNIX_EPOCH));
            let v: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
            assert_eq!(v["kind"], kind.as_str());
        }
    }

    #[test]
    fn an_http_record_numbers_its_request_and_counts_only_its_bytes() {
        let mut rec = record(Verdict::Deny(Reason::NotListed));
        rec.proto = Proto::Http;
        rec.request = 2;
        rec.base = Transferred { up: 500, down: 96 };
        let v: serde_json::Value =
            serde_json::from_str(&text(&rec, "default", SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(v["request"], 2);
        assert_eq!(
            (v["bytes_up"].as_u64(), v["bytes_down"].as_u64()),
            (Some(17), Some(4000))
        );
    }

    #[test]
    fn timestamps_agree_with_humantime_across_four_centuries() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut times = vec![SystemTime::UNIX_EPOCH];
        // Leap days and the turn of each century, then any millisecond.
        for s in [951_782_400, 951_868_799, 4_107_542_400, 253_402_300_799] {
            times.push(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        }
        for _ in 0..100_000 {
            let ms = rng.u64(..253_402_300_800_000);
            times.push(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        }
        for at in times {
            let mut ours = Vec::new();
            rfc3339_millis(&mut ours, at);
            let theirs = humantime::format_rfc3339_millis(at).to_string();
            assert_eq!(ours, theirs.as_bytes());
        }
    }

    #[test]
    fn any_string_stays_valid_json() {
        let odd = "q\"b\\n\n\u{1}\u{7f}é\u{2028}";
        let mut rec = record(Verdict::Allow);
        rec.rule = Some(odd.into());
        let text = text(&rec, odd, SystemTime::UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["rule"].as_str(), v["policy"].as_str()),
            (Some(odd), Some(odd))
        );
        assert!(!text[..text.len() - 1].contains('\n'), "one line: {text}");
    }
}

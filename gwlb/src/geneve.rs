//! GWLB's GENEVE header (RFC 8926): version 0, no control bit, protocol
//! 0x0800 (IPv4) or 0x86DD (IPv6, carried all the same in an IPv4 outer
//! packet), and AWS's options of class 0x0108: the endpoint's ENI id
//! (type 1, 8 bytes), the attachment id (type 2, 8 bytes) and the flow
//! cookie (type 3, 4 bytes). 40 bytes in all.
//!
//! A packet sent back toward a client must carry the header of the latest
//! packet of its flow, byte for byte; [`Header`] keeps it whole for that.
//! A datagram is whole or nothing, so [`decode`] answers Done or Invalid
//! (there is no Incomplete), and never panics.

use thiserror::Error;

/// GENEVE's UDP port, where GWLB sends.
pub const PORT: u16 = 6081;
/// AWS's option class.
pub const AWS_CLASS: u16 = 0x0108;
pub const OPTION_ENI: u8 = 1;
pub const OPTION_ATTACHMENT: u8 = 2;
pub const OPTION_COOKIE: u8 = 3;
/// The header GWLB sends: 8 bytes and its three options.
pub const GWLB_HEADER_LEN: usize = 40;
/// The longest header kept: GWLB's, and room for options it may add.
pub const MAX_HEADER_LEN: usize = 64;
/// What GWLB adds to a packet: outer IPv4 (20), UDP (8) and [`GWLB_HEADER_LEN`].
pub const OVERHEAD: usize = 28 + GWLB_HEADER_LEN;
/// The largest packet GWLB carries, outer headers included.
pub const GWLB_MTU: usize = 8500;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
/// An option type with this bit set must be understood, or the packet
/// dropped (RFC 8926 3.5).
const CRITICAL: u8 = 0x80;

/// The inner packet's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// AWS's options: which endpoint and flow a packet belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Options {
    pub eni: u64,
    pub attachment: u64,
    pub cookie: u32,
}

/// A GENEVE header as it arrived, to send back unchanged.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl Header {
    /// The header's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// GWLB's own header for `options` and an inner packet of `family`:
    /// what the load balancer sends (the tests' stand-in builds it so).
    pub fn gwlb(options: Options, family: Family) -> Header {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        // Version 0, options 32 bytes (8 words), no flags.
        bytes[0] = 8;
        let protocol = match family {
            Family::V4 => ETHERTYPE_IPV4,
            Family::V6 => ETHERTYPE_IPV6,
        };
        bytes[2..4].copy_from_slice(&protocol.to_be_bytes());
        let mut at = 8;
        let mut option = |kind: u8, data: &[u8]| {
            bytes[at..at + 2].copy_from_slice(&AWS_CLASS.to_be_bytes());
            bytes[at + 2] = kind;
            bytes[at + 3] = (data.len() / 4) as u8;
            bytes[at + 4..at + 4 + data.len()].copy_from_slice(data);
            at += 4 + data.len();
        };
        option(OPTION_ENI, &options.eni.to_be_bytes());
        option(OPTION_ATTACHMENT, &options.attachment.to_be_bytes());
        option(OPTION_COOKIE, &options.cookie.to_be_bytes());
        Header {
            bytes,
            len: GWLB_HEADER_LEN as u8,
        }
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({:02x?})", self.as_bytes())
    }
}

/// One datagram from GWLB, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub header: Header,
    pub options: Options,
    pub family: Family,
    /// The inner packet, a bare IPv4 or IPv6 packet.
    pub packet: &'a [u8],
}

/// Why a datagram is not one of GWLB's; each is a drop counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GeneveError {
    #[error("shorter than its GENEVE header")]
    Short,
    #[error("GENEVE version is not 0")]
    Version,
    #[error("a GENEVE control packet (O bit)")]
    Control,
    #[error("inner protocol is neither IPv4 nor IPv6")]
    Protocol,
    #[error("malformed GENEVE options")]
    Options,
    #[error("a critical GENEVE option not understood")]
    Critical,
    #[error("GWLB's ENI, attachment or cookie option missing")]
    Missing,
    #[error("a GENEVE header longer than kept")]
    TooLong,
    #[error("no inner packet")]
    Empty,
}

impl GeneveError {
    /// Every error, for metrics' label values.
    pub const ALL: [GeneveError; 9] = [
        GeneveError::Short,
        GeneveError::Version,
        GeneveError::Control,
        GeneveError::Protocol,
        GeneveError::Options,
        GeneveError::Critical,
        GeneveError::Missing,
        GeneveError::TooLong,
        GeneveError::Empty,
    ];

    /// A label value.
    pub fn as_str(self) -> &'static str {
        match self {
            GeneveError::Short => "short",
            GeneveError::Version => "version",
            GeneveError::Control => "control",
            GeneveError::Protocol => "protocol",
            GeneveError::Options => "options",
            GeneveError::Critical => "critical_option",
            GeneveError::Missing => "missing_option",
            GeneveError::TooLong => "header_too_long",
            GeneveError::Empty => "empty",
        }
    }
}

/// Decodes a UDP payload from GWLB.
pub fn decode(datagram: &[u8]) -> Result<Decoded<'_>, GeneveError> {
    let fixed = datagram.get(..8).ok_or(GeneveError::Short)?;
    if fixed[0] >> 6 != 0 {
        return Err(GeneveError::Version);
    }
    if fixed[1] & 0x80 != 0 {
        return Err(GeneveError::Control);
    }
    let header_len = 8 + usize::from(fixed[0] & 0x3f) * 4;
    let family = match u16::from_be_bytes([fixed[2], fixed[3]]) {
        ETHERTYPE_IPV4 => Family::V4,
        ETHERTYPE_IPV6 => Family::V6,
        _ => return Err(GeneveError::Protocol),
    };
    let whole = datagram.get(..header_len).ok_or(GeneveError::Short)?;
    if header_len > MAX_HEADER_LEN {
        return Err(GeneveError::TooLong);
    }
    let (mut eni, mut attachment, mut cookie) = (None, None, None);
    let mut options = &whole[8..];
    while !options.is_empty() {
        let head = options.get(..4).ok_or(GeneveError::Options)?;
        let class = u16::from_be_bytes([head[0], head[1]]);
        let kind = head[2];
        let len = usize::from(head[3] & 0x1f) * 4;
        let data = options.get(4..4 + len).ok_or(GeneveError::Options)?;
        match (class, kind) {
            (AWS_CLASS, OPTION_ENI) => eni = Some(u64_of(data)?),
            (AWS_CLASS, OPTION_ATTACHMENT) => attachment = Some(u64_of(data)?),
            (AWS_CLASS, OPTION_COOKIE) => {
                let bytes: [u8; 4] = data.try_into().map_err(|_| GeneveError::Options)?;
                cookie = Some(u32::from_be_bytes(bytes));
            }
            _ if kind & CRITICAL != 0 => return Err(GeneveError::Critical),
            _ => {}
        }
        options = &options[4 + len..];
    }
    let (Some(eni), Some(attachment), Some(cookie)) = (eni, attachment, cookie) else {
        return Err(GeneveError::Missing);
    };
    let packet = &datagram[header_len..];
    if packet.is_empty() {
        return Err(GeneveError::Empty);
    }
    let mut bytes = [0u8; MAX_HEADER_LEN];
    bytes[..header_len].copy_from_slice(whole);
    Ok(Decoded {
        header: Header {
            bytes,
            len: header_len as u8,
        },
        options: Options {
            eni,
            attachment,
            cookie,
        },
        family,
        packet,
    })
}

fn u64_of(data: &[u8]) -> Result<u64, GeneveError> {
    let bytes: [u8; 8] = data.try_into().map_err(|_| GeneveError::Options)?;
    Ok(u64::from_be_bytes(bytes))
}

/// `packet` behind `header`, with the header's protocol set for the
/// packet's own family (a flow's header may have come with an IPv4
/// packet and an ICMPv6 error go back, or the reverse, only in theory;
/// the protocol always says what follows).
pub fn encapsulate(header: &Header, family: Family, packet: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(header.as_bytes());
    let protocol = match family {
        Family::V4 => ETHERTYPE_IPV4,
        Family::V6 => ETHERTYPE_IPV6,
    };
    out[2..4].copy_from_slice(&protocol.to_be_bytes());
    out.extend_from_slice(packet);
}

/// The outer IPv4 and UDP headers of a datagram back to GWLB: from
/// `local` to `gwlb`'s address, the UDP ports as GWLB sent them (its port
/// as the source, ours as the destination), for `payload` bytes of GENEVE
/// behind. The kernel fills in the IPv4 checksum and identification; the
/// UDP checksum is zero, as RFC 8926 allows over IPv4 and GWLB sends.
pub fn outer_header(
    local: std::net::SocketAddrV4,
    gwlb: std::net::SocketAddrV4,
    payload: usize,
) -> Option<[u8; 28]> {
    let total = u16::try_from(28 + payload).ok()?;
    let udp = u16::try_from(8 + payload).ok()?;
    let mut h = [0u8; 28];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    // Don't fragment: GWLB takes whole packets only.
    h[6] = 0x40;
    h[8] = 64;
    h[9] = 17;
    h[12..16].copy_from_slice(&local.ip().octets());
    h[16..20].copy_from_slice(&gwlb.ip().octets());
    h[20..22].copy_from_slice(&gwlb.port().to_be_bytes());
    h[22..24].copy_from_slice(&local.port().to_be_bytes());
    h[24..26].copy_from_slice(&udp.to_be_bytes());
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: Options = Options {
        eni: 0x0123_4567_89ab_cdef,
        attachment: 0x1111_2222_3333_4444,
        cookie: 0xdead_beef,
    };

    fn datagram(header: &Header, packet: &[u8]) -> Vec<u8> {
        [header.as_bytes(), packet].concat()
    }

    #[test]
    fn gwlbs_header_is_forty_bytes_and_decodes_to_its_options() {
        let header = Header::gwlb(OPTIONS, Family::V6);
        assert_eq!(header.as_bytes().len(), GWLB_HEADER_LEN);
        assert_eq!(OVERHEAD, 68);
        // The layout, byte by byte: 8 words of options, IPv6 inside, and
        // each option's class, type and length in words.
        assert_eq!(&header.as_bytes()[..4], &[0x08, 0x00, 0x86, 0xdd]);
        assert_eq!(&header.as_bytes()[8..12], &[0x01, 0x08, 0x01, 0x02]);
        assert_eq!(&header.as_bytes()[20..24], &[0x01, 0x08, 0x02, 0x02]);
        assert_eq!(
            &header.as_bytes()[32..40],
            &[0x01, 0x08, 0x03, 0x01, 0xde, 0xad, 0xbe, 0xef]
        );
        let d = datagram(&header, b"\x60inner");
        let decoded = decode(&d).unwrap();
        assert_eq!(decoded.options, OPTIONS);
        assert_eq!(decoded.family, Family::V6);
        assert_eq!(decoded.packet, b"\x60inner");
        assert_eq!(decoded.header, header);
    }

    #[test]
    fn other_options_are_kept_in_the_header_unless_critical() {
        let gwlb = Header::gwlb(OPTIONS, Family::V4);
        let mut bytes = gwlb.as_bytes().to_vec();
        // One more option of another class, 4 bytes of data.
        bytes.extend_from_slice(&[0x01, 0x09, 0x05, 0x01, 1, 2, 3, 4]);
        bytes[0] += 2;
        bytes.extend_from_slice(b"\x45inner");
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.header.as_bytes(), &bytes[..48]);
        assert_eq!(decoded.options, OPTIONS);
        // The same option, critical.
        let at = 40 + 2;
        bytes[at] |= 0x80;
        assert_eq!(decode(&bytes), Err(GeneveError::Critical));
    }

    #[test]
    fn what_is_not_gwlbs_is_refused_with_its_reason() {
        let good = datagram(&Header::gwlb(OPTIONS, Family::V4), b"\x45x");
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut d = good.clone();
            f(&mut d);
            decode(&d).map(|decoded| decoded.options)
        };
        assert_eq!(decode(&good[..7]), Err(GeneveError::Short));
        assert_eq!(decode(&good[..30]), Err(GeneveError::Short));
        assert_eq!(with(&|d| d[0] |= 0x40), Err(GeneveError::Version));
        assert_eq!(with(&|d| d[1] |= 0x80), Err(GeneveError::Control));
        assert_eq!(with(&|d| d[2] = 0x65), Err(GeneveError::Protocol));
        // The cookie's length says 8 bytes: past the options' end.
        assert_eq!(with(&|d| d[35] = 2), Err(GeneveError::Options));
        // The cookie's type changed: missing.
        assert_eq!(with(&|d| d[34] = 9), Err(GeneveError::Missing));
        assert_eq!(with(&|d| d.truncate(40)), Err(GeneveError::Empty));
        // An option length of 63 words: longer than kept.
        assert_eq!(
            with(&|d| {
                d[0] = 63;
                d.resize(8 + 252 + 1, 0);
            }),
            Err(GeneveError::TooLong)
        );
    }

    #[test]
    fn a_packet_goes_back_behind_its_flows_header() {
        let header = Header::gwlb(OPTIONS, Family::V4);
        let mut out = Vec::new();
        encapsulate(&header, Family::V4, b"\x45reply", &mut out);
        let decoded = decode(&out).unwrap();
        assert_eq!(
            (decoded.options, decoded.packet),
            (OPTIONS, &b"\x45reply"[..])
        );
        assert_eq!(decoded.header, header);
        encapsulate(&header, Family::V6, b"\x60reply", &mut out);
        assert_eq!(decode(&out).unwrap().family, Family::V6);
    }

    /// The fuzzer's seeds (testdata/geneve) are datagrams as GWLB sends
    /// them, each carrying a packet of a flow.
    #[test]
    fn the_fuzz_seeds_are_gwlbs_datagrams() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/geneve");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let decoded = decode(&bytes).unwrap();
            assert_eq!(decoded.header.as_bytes().len(), GWLB_HEADER_LEN);
            let from = crate::packet::from_client(decoded.packet);
            let to = crate::packet::to_client(decoded.packet);
            assert!(from.is_ok() && to.is_ok());
            seen += 1;
        }
        assert!(seen >= 4);
    }

    #[test]
    fn the_outer_header_swaps_the_addresses_and_keeps_the_ports() {
        let local = "198.51.100.130:6081".parse().unwrap();
        let gwlb = "198.51.100.129:51234".parse().unwrap();
        let h = outer_header(local, gwlb, 100).unwrap();
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 128);
        assert_eq!(&h[12..16], &[198, 51, 100, 130]);
        assert_eq!(&h[16..20], &[198, 51, 100, 129]);
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 51234);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), PORT);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 108);
        assert_eq!(outer_header(local, gwlb, 70_000), None);
    }

    #[test]
    fn any_bytes_decode_or_are_refused_without_panicking() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let good = datagram(&Header::gwlb(OPTIONS, Family::V4), b"\x45payload");
        for _ in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut d = good.clone();
            // A few bytes changed, and a length anywhere.
            for k in 0..(rng % 4) {
                let at = ((rng >> (8 * k)) as usize) % d.len();
                d[at] = (rng >> (8 * k + 3)) as u8;
            }
            d.truncate((rng >> 40) as usize % (good.len() + 1));
            if let Ok(decoded) = decode(&d) {
                assert!(decoded.header.as_bytes().len() + decoded.packet.len() == d.len());
            }
        }
    }
}

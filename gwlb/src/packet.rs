//! An inner packet's flow: its protocol and both ends, with the client's
//! end first whichever way the packet goes, so that a packet from a
//! client and the host's answer to it name the same flow. An ICMP error
//! the host sends about a flow (a refused QUIC datagram, "fragmentation
//! needed") names the flow of the packet it quotes.
//!
//! Pure; never panics on any bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use thiserror::Error;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// A flow, the client's end first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub client: IpAddr,
    pub server: IpAddr,
    /// Ports (for ICMP echo, the identifier on both).
    pub client_port: u16,
    pub server_port: u16,
}

/// Why a packet names no flow; each is a drop counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("truncated or malformed IP packet")]
    Malformed,
    #[error("a fragment after the first: its ports are not in it")]
    Fragment,
    #[error("a protocol whose packets name no flow")]
    Unsupported,
    /// Multicast or link-local: the device's own link chatter (IPv6
    /// neighbour discovery, MLD), never a client's flow.
    #[error("link-local or multicast: not a client's")]
    Local,
}

impl PacketError {
    pub const ALL: [PacketError; 4] = [
        PacketError::Malformed,
        PacketError::Fragment,
        PacketError::Unsupported,
        PacketError::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PacketError::Malformed => "malformed",
            PacketError::Fragment => "fragment",
            PacketError::Unsupported => "unsupported",
            PacketError::Local => "local",
        }
    }
}

/// The parts of an IP packet a flow is read from.
struct Ip<'a> {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    /// What follows the IP headers.
    payload: &'a [u8],
}

fn ip(packet: &[u8]) -> Result<Ip<'_>, PacketError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => ipv4(packet),
        Some(6) => ipv6(packet),
        _ => Err(PacketError::Malformed),
    }
}

fn ipv4(packet: &[u8]) -> Result<Ip<'_>, PacketError> {
    let header = packet.get(..20).ok_or(PacketError::Malformed)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(PacketError::Malformed);
    }
    let offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if offset != 0 {
        return Err(PacketError::Fragment);
    }
    let octets =
        |at: usize| Ipv4Addr::new(header[at], header[at + 1], header[at + 2], header[at + 3]);
    Ok(Ip {
        proto: header[9],
        src: octets(12).into(),
        dst: octets(16).into(),
        // A quoted packet (inside an ICMP error) is cut short: its total
        // length is not what is there, so what is there is used.
        payload: packet.get(ihl..).ok_or(PacketError::Malformed)?,
    })
}

fn ipv6(packet: &[u8]) -> Result<Ip<'_>, PacketError> {
    let header = packet.get(..40).ok_or(PacketError::Malformed)?;
    let address = |at: usize| {
        let bytes: [u8; 16] = header[at..at + 16].try_into().unwrap_or([0; 16]);
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    let (src, dst) = (address(8), address(24));
    let mut next = header[6];
    let mut rest = &packet[40..];
    // Extension headers, a bounded number of them.
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => {
                let ext = rest.get(..2).ok_or(PacketError::Malformed)?;
                let len = (usize::from(ext[1]) + 1) * 8;
                next = ext[0];
                rest = rest.get(len..).ok_or(PacketError::Malformed)?;
            }
            44 => {
                let frag = rest.get(..8).ok_or(PacketError::Malformed)?;
                if u16::from_be_bytes([frag[2], frag[3]]) >> 3 != 0 {
                    return Err(PacketError::Fragment);
                }
                next = frag[0];
                rest = &rest[8..];
            }
            proto => {
                return Ok(Ip {
                    proto,
                    src,
                    dst,
                    payload: rest,
                });
            }
        }
    }
    Err(PacketError::Malformed)
}

/// The ports of a TCP or UDP payload, or an ICMP echo's identifier.
fn ports(proto: u8, payload: &[u8]) -> Result<(u16, u16), PacketError> {
    match proto {
        TCP | UDP => {
            let p = payload.get(..4).ok_or(PacketError::Malformed)?;
            Ok((
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ))
        }
        ICMP | ICMPV6 => {
            let p = payload.get(..8).ok_or(PacketError::Malformed)?;
            let id = u16::from_be_bytes([p[4], p[5]]);
            Ok((id, id))
        }
        _ => Err(PacketError::Unsupported),
    }
}

/// Whether an ICMP message of `proto` and `kind` is an error quoting the
/// packet that caused it.
fn is_icmp_error(proto: u8, kind: u8) -> bool {
    match proto {
        // Unreachable (fragmentation needed among them), time exceeded,
        // parameter problem.
        ICMP => matches!(kind, 3 | 11 | 12),
        // Unreachable, packet too big, time exceeded, parameter problem.
        ICMPV6 => matches!(kind, 1..=4),
        _ => false,
    }
}

/// The flow of a packet arriving from a client: the source is the client.
pub fn from_client(packet: &[u8]) -> Result<FlowKey, PacketError> {
    let ip = ip(packet)?;
    let (sport, dport) = ports(ip.proto, ip.payload)?;
    Ok(FlowKey {
        proto: ip.proto,
        client: ip.src,
        server: ip.dst,
        client_port: sport,
        server_port: dport,
    })
}

/// The flow of a packet the host sends toward a client: the destination
/// is the client, or for an ICMP error, the flow of the client's packet it
/// quotes.
pub fn to_client(packet: &[u8]) -> Result<FlowKey, PacketError> {
    let ip = ip(packet)?;
    let local = match ip.dst {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast() || v6.is_unicast_link_local(),
    };
    if local {
        return Err(PacketError::Local);
    }
    if let (ICMP | ICMPV6, Some(&kind)) = (ip.proto, ip.payload.first())
        && is_icmp_error(ip.proto, kind)
    {
        let quoted = ip.payload.get(8..).ok_or(PacketError::Malformed)?;
        return from_client(quoted);
    }
    let (sport, dport) = ports(ip.proto, ip.payload)?;
    Ok(FlowKey {
        proto: ip.proto,
        client: ip.dst,
        server: ip.src,
        client_port: dport,
        server_port: sport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 packet of `proto` with `payload`, from `src` to `dst`.
    pub fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let len = (p.len() + payload.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn v6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(rest.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(rest);
        p
    }

    fn ports_of(sport: u16, dport: u16) -> Vec<u8> {
        let mut p = sport.to_be_bytes().to_vec();
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    const CLIENT: [u8; 4] = [192, 0, 2, 2];
    const SERVER: [u8; 4] = [203, 0, 113, 20];

    #[test]
    fn a_packet_and_its_answer_name_the_same_flow() {
        let syn = v4(TCP, CLIENT, SERVER, &ports_of(40000, 443));
        let syn_ack = v4(TCP, SERVER, CLIENT, &ports_of(443, 40000));
        let key = from_client(&syn).unwrap();
        assert_eq!(key, to_client(&syn_ack).unwrap());
        assert_eq!(
            key,
            FlowKey {
                proto: TCP,
                client: IpAddr::from(CLIENT),
                server: IpAddr::from(SERVER),
                client_port: 40000,
                server_port: 443,
            }
        );
        // IPv6 behind a hop-by-hop header.
        let (c, s): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8:1::2".parse().unwrap(),
            "2001:db8:3::20".parse().unwrap(),
        );
        let mut hop = vec![TCP, 0, 0, 0, 0, 0, 0, 0];
        hop.extend_from_slice(&ports_of(40000, 443));
        let key = from_client(&v6(0, c, s, &hop)).unwrap();
        assert_eq!(
            key,
            to_client(&v6(TCP, s, c, &ports_of(443, 40000))).unwrap()
        );
        assert_eq!(key.client, IpAddr::V6(c));
    }

    #[test]
    fn an_icmp_error_names_the_flow_of_the_packet_it_quotes() {
        // QUIC to udp/443, refused by the host with port unreachable.
        let quic = v4(UDP, CLIENT, SERVER, &ports_of(50000, 443));
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quic[..28]);
        // The host answers from its own address, not the server's.
        let error = v4(ICMP, [198, 51, 100, 1], CLIENT, &icmp);
        assert_eq!(to_client(&error).unwrap(), from_client(&quic).unwrap());
        // ICMPv6 packet too big, quoting a TCP segment.
        let (c, s): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8:1::2".parse().unwrap(),
            "2001:db8:3::20".parse().unwrap(),
        );
        let segment = v6(TCP, c, s, &ports_of(40000, 443));
        let mut too_big = vec![2, 0, 0, 0, 0, 0, 0x21, 0x34];
        too_big.extend_from_slice(&segment);
        let error = v6(ICMPV6, "2001:db8:2::1".parse().unwrap(), c, &too_big);
        assert_eq!(to_client(&error).unwrap(), from_client(&segment).unwrap());
        // An echo is a flow of its own, by its identifier.
        let echo = v4(ICMP, CLIENT, SERVER, &[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        let reply = v4(ICMP, SERVER, CLIENT, &[0, 0, 0, 0, 0x12, 0x34, 0, 1]);
        assert_eq!(from_client(&echo).unwrap(), to_client(&reply).unwrap());
    }

    #[test]
    fn packets_that_name_no_flow_say_why() {
        assert_eq!(from_client(b""), Err(PacketError::Malformed));
        assert_eq!(from_client(&[0x45; 19]), Err(PacketError::Malformed));
        let mut later = v4(TCP, CLIENT, SERVER, &ports_of(1, 2));
        later[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(from_client(&later), Err(PacketError::Fragment));
        assert_eq!(
            from_client(&v4(47, CLIENT, SERVER, &[0; 8])),
            Err(PacketError::Unsupported)
        );
        assert_eq!(
            from_client(&v4(TCP, CLIENT, SERVER, &[0; 3])),
            Err(PacketError::Malformed)
        );
    }

    #[test]
    fn any_bytes_name_a_flow_or_are_refused_without_panicking() {
        let seed = v4(TCP, CLIENT, SERVER, &ports_of(40000, 443));
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut p = seed.clone();
            for k in 0..(rng % 5) {
                let at = ((rng >> (7 * k)) as usize) % p.len();
                p[at] = (rng >> (7 * k + 2)) as u8;
            }
            p.truncate((rng >> 48) as usize % (p.len() + 1));
            let _ = from_client(&p);
            let _ = to_client(&p);
        }
    }
}

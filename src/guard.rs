//! Destinations the gateway itself must never reach, in every mode and
//! whatever the list says: its own loopback and addresses, the link-local
//! services of the cloud (the instance metadata service among them),
//! multicast and broadcast. A client could otherwise name an allowed host
//! and dial one of these (or an allowed name could resolve to one), and the
//! gateway would connect from inside its own trust boundary.
//!
//! [`classify`] is pure; [`Guard`] adds the addresses the host has now,
//! read with `getifaddrs` and refreshed in the background, since
//! interfaces come and go (an ENI attached, DHCP renewed).

use arc_swap::ArcSwap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// Why a destination is never contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    Loopback,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `169.254.0.0/16`, `fe80::/10`, and AWS's IPv6 service range
    /// `fd00:ec2::/32` (metadata, DNS, time).
    LinkLocal,
    Multicast,
    /// `255.255.255.255`, the reserved `240.0.0.0/4`, and the broadcast
    /// addresses of the host's own networks.
    Broadcast,
    /// An address of the gateway host itself.
    Gateway,
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`)
/// addresses as the IPv4 address they carry, so that no IPv6 spelling of a
/// forbidden IPv4 address slips past. `::` and `::1` stay IPv6.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => ip,
        IpAddr::V6(v6) => v6.to_ipv4().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The fixed ranges: what no host anywhere may be reached at.
pub fn classify(ip: IpAddr) -> Option<Forbidden> {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    let a = ip.octets()[0];
    if ip.is_loopback() {
        Some(Forbidden::Loopback)
    } else if a == 0 {
        Some(Forbidden::Unspecified)
    } else if ip.is_link_local() {
        Some(Forbidden::LinkLocal)
    } else if ip.is_multicast() {
        Some(Forbidden::Multicast)
    } else if a >= 240 {
        Some(Forbidden::Broadcast)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    let seg = ip.segments();
    if ip.is_loopback() {
        Some(Forbidden::Loopback)
    } else if ip.is_unspecified() {
        Some(Forbidden::Unspecified)
    } else if seg[0] & 0xffc0 == 0xfe80 || (seg[0] == 0xfd00 && seg[1] == 0x0ec2) {
        Some(Forbidden::LinkLocal)
    } else if ip.is_multicast() {
        Some(Forbidden::Multicast)
    } else {
        None
    }
}

/// The fixed ranges and the host's own addresses.
#[derive(Debug)]
pub struct Guard {
    /// Every address of every interface, and their broadcast addresses,
    /// canonical.
    own: ArcSwap<Box<[IpAddr]>>,
}

impl Guard {
    /// A guard that knows `own` as the host's addresses.
    pub fn with_addresses(own: impl IntoIterator<Item = IpAddr>) -> Guard {
        Guard {
            own: ArcSwap::from_pointee(canonical_all(own)),
        }
    }

    /// A guard that knows the host's addresses as they are now.
    pub fn from_host() -> std::io::Result<Guard> {
        Ok(Guard::with_addresses(host_addresses()?))
    }

    /// Reads the host's addresses again.
    pub fn refresh(&self) -> std::io::Result<()> {
        let own = canonical_all(host_addresses()?);
        if **self.own.load() != own {
            self.own.store(Arc::new(own));
        }
        Ok(())
    }

    /// Whether `ip` is one of the host's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own.load().contains(&canonical(ip))
    }

    /// Why `ip` must not be contacted, if it must not.
    pub fn check(&self, ip: IpAddr) -> Option<Forbidden> {
        let ip = canonical(ip);
        classify(ip).or_else(|| self.own.load().contains(&ip).then_some(Forbidden::Gateway))
    }
}

/// The host's addresses as [`Guard::check`] compares them.
fn canonical_all(own: impl IntoIterator<Item = IpAddr>) -> Box<[IpAddr]> {
    own.into_iter().map(canonical).collect()
}

/// Every address and broadcast address of the host's interfaces.
fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut all = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        for addr in [ifa.address, ifa.broadcast].into_iter().flatten() {
            if let Some(v4) = addr.as_sockaddr_in() {
                all.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                all.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_fixed_ranges_are_forbidden_in_every_spelling() {
        use Forbidden::*;
        for (addr, why) in [
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("::ffff:0.0.0.0", Unspecified),
            ("169.254.169.254", LinkLocal),
            ("169.254.169.253", LinkLocal),
            ("::ffff:169.254.169.254", LinkLocal),
            // IPv4-compatible, deprecated but still parsed by stacks.
            ("::169.254.169.254", LinkLocal),
            ("::ffff:a9fe:a9fe", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fd00:ec2::254", LinkLocal),
            ("fd00:ec2::23", LinkLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("::ffff:224.0.0.251", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Broadcast),
        ] {
            assert_eq!(classify(ip(addr)), Some(why), "{addr}");
        }
    }

    #[test]
    fn ordinary_addresses_are_not() {
        for addr in [
            "203.0.113.10",
            "198.51.100.7",
            "10.0.0.2",
            "100.64.0.1",
            "2001:db8::10",
            "::ffff:203.0.113.10",
            "fec0::1",
            "fd00:ec3::1",
            "fc00::1",
            "223.255.255.255",
        ] {
            assert_eq!(classify(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_forbidden_in_every_spelling() {
        let guard =
            Guard::with_addresses([ip("192.0.2.1"), ip("2001:db8:1::1"), ip("192.0.2.255")]);
        assert_eq!(guard.check(ip("192.0.2.1")), Some(Forbidden::Gateway));
        assert_eq!(
            guard.check(ip("::ffff:192.0.2.1")),
            Some(Forbidden::Gateway)
        );
        assert_eq!(guard.check(ip("2001:db8:1::1")), Some(Forbidden::Gateway));
        assert_eq!(guard.check(ip("192.0.2.255")), Some(Forbidden::Gateway));
        assert_eq!(
            guard.check(ip("169.254.169.254")),
            Some(Forbidden::LinkLocal)
        );
        assert_eq!(guard.check(ip("192.0.2.2")), None);
        assert_eq!(guard.check(ip("203.0.113.10")), None);
        // What the proxy's loop check asks of every connection.
        assert!(guard.is_own(ip("::ffff:192.0.2.1")));
        assert!(guard.is_own(ip("2001:db8:1::1")));
        assert!(!guard.is_own(ip("169.254.169.254")));
        assert!(!guard.is_own(ip("192.0.2.2")));
    }

    #[test]
    fn the_host_addresses_include_loopback_and_refresh() {
        let guard = Guard::from_host().unwrap();
        guard.refresh().unwrap();
        // Every host has lo; it is forbidden twice over.
        assert!(guard.own.load().contains(&ip("127.0.0.1")));
    }
}

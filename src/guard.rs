//! Destinations the gateway itself must never reach, in every mode and
//! whatever the list says: its own loopback and addresses, the link-local
//! services of the cloud (the instance metadata service among them),
//! multicast and broadcast. A client could otherwise name an allowed host
//! and dial one of these (or an allowed name could resolve to one), and the
//! gateway would connect from inside its own trust boundary.
//!
//! [`classify`] and [`owned`] are pure; [`Guard`] adds the addresses the
//! host has now, read with `getifaddrs`, and [`follow_host`] reads them
//! again the moment the kernel says they changed, since interfaces come
//! and go (an ENI attached, a secondary address added, DHCP renewed).

use crate::net::netlink::AddressEvents;
use arc_swap::ArcSwap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

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
    /// `255.255.255.255` and the reserved `240.0.0.0/4`.
    Broadcast,
    /// An address the gateway host itself answers for ([`owned`]): its
    /// own, and its networks' broadcast and anycast addresses.
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
    /// Every address the host answers for ([`owned`]), canonical, sorted.
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
        Ok(Guard::with_addresses(owned(&host_prefixes()?)))
    }

    /// Reads the host's addresses again.
    pub fn refresh(&self) -> std::io::Result<()> {
        let own = canonical_all(owned(&host_prefixes()?));
        if **self.own.load() != own {
            self.own.store(Arc::new(own));
        }
        Ok(())
    }

    /// Whether `ip` is one of the host's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own.load().binary_search(&canonical(ip)).is_ok()
    }

    /// Why `ip` must not be contacted, if it must not.
    pub fn check(&self, ip: IpAddr) -> Option<Forbidden> {
        let ip = canonical(ip);
        classify(ip).or_else(|| {
            let own = self.own.load();
            own.binary_search(&ip).is_ok().then_some(Forbidden::Gateway)
        })
    }
}

/// Keeps `guard` in step with the host's addresses from the moment they
/// change: a thread woken by the kernel's address events (rtnetlink), so
/// that an address added to the host (a secondary IP, an ENI attached, a
/// hand-off) is never connected to, not even for the moments a timer would
/// leave. It reads every address again on each burst of events, and every
/// [`BACKSTOP`] in case an event was lost. It ends once the guard is
/// dropped.
pub fn follow_host(guard: &Arc<Guard>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let events = AddressEvents::open()?;
    // Read after subscribing: nothing that changed in between is missed.
    guard.refresh()?;
    let guard = Arc::downgrade(guard);
    std::thread::Builder::new()
        .name("portcullis-addresses".into())
        .spawn(move || {
            let mut pause = Duration::from_secs(1);
            loop {
                let woke = events.wait(BACKSTOP);
                let Some(guard) = guard.upgrade() else { return };
                if let Err(e) = woke {
                    tracing::warn!("address events: {e}; reading the addresses again");
                    // A socket that keeps failing must not spin: the
                    // backstop's pace at worst.
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(BACKSTOP);
                } else {
                    pause = Duration::from_secs(1);
                }
                if let Err(e) = guard.refresh() {
                    tracing::warn!(
                        "cannot read the host's own addresses, keeping the last ones: {e}"
                    );
                }
            }
        })
}

/// How often the addresses are read again when no event came.
pub const BACKSTOP: Duration = Duration::from_secs(30);

/// The host's addresses as [`Guard::check`] compares them.
fn canonical_all(own: impl IntoIterator<Item = IpAddr>) -> Box<[IpAddr]> {
    let mut all: Vec<IpAddr> = own.into_iter().map(canonical).collect();
    all.sort_unstable();
    all.dedup();
    all.into()
}

/// One address of an interface: the address, its prefix length, and the
/// broadcast address the interface was given, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub address: IpAddr,
    pub prefix: u8,
    pub broadcast: Option<IpAddr>,
}

/// Every address the host answers for, given its interfaces' addresses:
/// each address itself and its broadcast address; for each IPv4 prefix of
/// /30 or wider its network and broadcast addresses (whether or not the
/// interface was given a `brd`: the kernel treats both as local to the
/// prefix); and for each IPv6 prefix of /126 or wider its subnet-router
/// anycast address (the prefix with all host bits zero, RFC 4291 2.6.1),
/// which the kernel answers for whenever forwarding is on. A /31 or /32
/// (RFC 3021) and a /127 or /128 (RFC 6164) have no such addresses.
pub fn owned(locals: &[Local]) -> Vec<IpAddr> {
    let mut all = Vec::with_capacity(locals.len() * 3);
    for local in locals {
        all.push(local.address);
        all.extend(local.broadcast);
        match local.address {
            IpAddr::V4(v4) if local.prefix <= 30 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(local.prefix))
                    .unwrap_or(0);
                let bits = v4.to_bits();
                all.push(IpAddr::V4(Ipv4Addr::from_bits(bits & mask)));
                all.push(IpAddr::V4(Ipv4Addr::from_bits(bits | !mask)));
            }
            IpAddr::V6(v6) if local.prefix <= 126 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(local.prefix));
                let network = v6.to_bits() & mask.unwrap_or(0);
                all.push(IpAddr::V6(Ipv6Addr::from_bits(network)));
            }
            _ => {}
        }
    }
    all
}

/// Every address of the host's interfaces, with its prefix length and
/// broadcast address.
fn host_prefixes() -> std::io::Result<Vec<Local>> {
    let ip_of = |addr: &nix::sys::socket::SockaddrStorage| {
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        }
    };
    let mut all = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(address) = ifa.address.as_ref().and_then(ip_of) else {
            continue;
        };
        let full = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match ifa.netmask.as_ref().and_then(ip_of) {
            Some(IpAddr::V4(mask)) => mask.to_bits().leading_ones(),
            Some(IpAddr::V6(mask)) => mask.to_bits().leading_ones(),
            None => full,
        };
        all.push(Local {
            address,
            prefix: u8::try_from(prefix).unwrap_or(full as u8),
            broadcast: ifa.broadcast.as_ref().and_then(ip_of),
        });
    }
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

    fn local(address: &str, prefix: u8, broadcast: Option<&str>) -> Local {
        Local {
            address: ip(address),
            prefix,
            broadcast: broadcast.map(ip),
        }
    }

    #[test]
    fn a_prefix_makes_its_network_broadcast_and_anycast_addresses_the_hosts() {
        let guard = Guard::with_addresses(owned(&[
            // No `brd` given: the broadcast address is the host's all the same.
            local("203.0.113.7", 24, None),
            local("198.51.100.9", 30, Some("198.51.100.11")),
            // RFC 3021 point-to-point and host routes: no such addresses.
            local("192.0.2.10", 31, None),
            local("192.0.2.20", 32, None),
            local("2001:db8:2::1", 64, None),
            local("2001:db8:5::1", 127, None),
            local("2001:db8:6::9", 128, None),
            local("2001:db8:7:1:2::1", 80, None),
        ]));
        for own in [
            "203.0.113.7",
            "203.0.113.0",
            "203.0.113.255",
            "::ffff:203.0.113.255",
            "198.51.100.9",
            "198.51.100.8",
            "198.51.100.11",
            "192.0.2.10",
            "192.0.2.20",
            "2001:db8:2::1",
            "2001:db8:2::",
            "2001:db8:5::1",
            "2001:db8:6::9",
            "2001:db8:7:1:2::",
        ] {
            assert_eq!(guard.check(ip(own)), Some(Forbidden::Gateway), "{own}");
            assert!(guard.is_own(ip(own)), "{own}");
        }
        for other in [
            "203.0.113.8",
            "203.0.112.255",
            "203.0.114.0",
            "198.51.100.12",
            "192.0.2.11",
            "192.0.2.21",
            "2001:db8:2::2",
            "2001:db8:5::",
            "2001:db8:6::",
            "2001:db8:7::",
            "2001:db8:7:1::",
        ] {
            assert_eq!(guard.check(ip(other)), None, "{other}");
        }
    }

    #[test]
    fn the_widest_and_narrowest_prefixes_do_not_overflow() {
        let all = owned(&[
            local("10.1.2.3", 0, None),
            local("2001:db8::1", 0, None),
            local("10.1.2.3", 1, None),
            local("2001:db8::1", 3, None),
        ]);
        assert!(all.contains(&ip("0.0.0.0")));
        assert!(all.contains(&ip("255.255.255.255")));
        assert!(all.contains(&ip("::")));
        assert!(all.contains(&ip("127.255.255.255")));
        assert!(all.contains(&ip("2000::")));
    }

    #[test]
    fn the_host_addresses_include_loopback_and_refresh() {
        let guard = Guard::from_host().unwrap();
        guard.refresh().unwrap();
        // Every host has lo; it is forbidden twice over.
        assert!(guard.is_own(ip("127.0.0.1")));
        // 127.0.0.0/8's own broadcast address, derived from its prefix.
        assert!(guard.is_own(ip("127.255.255.255")));
    }

    /// In a network namespace of its own (root; under CI=true a non-root
    /// run fails): an address added or removed is known as soon as the
    /// kernel's event arrives, not at the next backstop read.
    #[test]
    fn an_address_added_or_removed_is_known_at_once() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v != "true"),
                "needs root, and CI=true: refusing to skip"
            );
            eprintln!("skipping: needs root for a network namespace");
            return;
        }
        std::thread::spawn(|| {
            // This thread, and the threads and commands it starts, are in a
            // namespace of their own; the host's addresses are untouched.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let ip_command = |args: &[&str]| {
                let status = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {args:?}");
            };
            ip_command(&["link", "set", "lo", "up"]);
            let guard = Arc::new(Guard::from_host().unwrap());
            follow_host(&guard).unwrap();
            let known_within = |what: &str, want: bool, addrs: &[&str]| {
                let since = std::time::Instant::now();
                while addrs.iter().any(|a| guard.is_own(ip(a)) != want) {
                    assert!(
                        since.elapsed() < Duration::from_secs(2),
                        "{what}: {addrs:?}"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            let added = ["203.0.113.77", "203.0.113.0", "203.0.113.255"];
            assert!(added.iter().all(|a| !guard.is_own(ip(a))));
            ip_command(&["addr", "add", "203.0.113.77/24", "dev", "lo"]);
            known_within("added", true, &added);
            ip_command(&[
                "-6",
                "addr",
                "add",
                "2001:db8:9::5/64",
                "dev",
                "lo",
                "nodad",
            ]);
            known_within("added", true, &["2001:db8:9::5", "2001:db8:9::"]);
            ip_command(&["addr", "del", "203.0.113.77/24", "dev", "lo"]);
            known_within("removed", false, &added);
        })
        .join()
        .unwrap();
    }
}

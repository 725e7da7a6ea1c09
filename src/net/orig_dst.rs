//! The address a redirected connection was really sent to.
//!
//! iptables `REDIRECT` rewrites the destination to our listener; conntrack
//! remembers the original, and `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6) reads it back. No capability is needed.

use nix::sys::socket::{getsockopt, sockopt};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

/// Where the client meant to go. A newtype so it cannot be confused with
/// the client's own address or our listener's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst(pub SocketAddr);

impl std::fmt::Display for OrigDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Reads the original destination of an accepted socket whose addresses
/// are of `family`'s family (the client's, or our own: they are the same).
pub fn original_dst(socket: &impl AsFd, family: SocketAddr) -> io::Result<OrigDst> {
    let addr = match family {
        SocketAddr::V4(_) => {
            let sin = getsockopt(socket, sockopt::OriginalDst)?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(socket, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))
        }
    };
    Ok(OrigDst(addr))
}

/// Whether forwarding to `dst` would come back to this gateway: the
/// connection was not redirected at all (its original destination is then
/// our listener, at one of our addresses), or it was addressed to the
/// gateway itself. `own` says whether an address is the host's: the
/// destination guard's set, kept fresh, so that no connection needs a
/// `getsockname` for this.
pub fn is_loop(dst: OrigDst, own: impl Fn(IpAddr) -> bool) -> bool {
    let ip = dst.0.ip();
    ip.is_loopback() || ip.is_unspecified() || own(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn detects_connections_that_would_loop() {
        let own = |ip: IpAddr| ip == addr("192.0.2.1:0").ip() || ip == addr("[2001:db8::1]:0").ip();
        assert!(
            is_loop(OrigDst(addr("192.0.2.1:15443")), own),
            "not redirected"
        );
        assert!(
            is_loop(OrigDst(addr("192.0.2.1:443")), own),
            "addressed to the gateway"
        );
        assert!(is_loop(OrigDst(addr("[2001:db8::1]:443")), own));
        assert!(is_loop(OrigDst(addr("127.0.0.1:443")), own));
        assert!(is_loop(OrigDst(addr("0.0.0.0:443")), own));
        assert!(is_loop(OrigDst(addr("[::1]:443")), own));
        assert!(!is_loop(OrigDst(addr("203.0.113.10:443")), own));
        assert!(!is_loop(OrigDst(addr("[2001:db8::2]:443")), own));
    }

    #[tokio::test]
    async fn fails_on_a_connection_that_was_not_redirected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let local = server.local_addr().unwrap();
        // Without NAT, conntrack either has no entry (ENOENT) or reports the
        // address as it is: both are refused by the proxy.
        match original_dst(&server, peer) {
            Ok(dst) => assert!(is_loop(dst, |ip| ip == local.ip())),
            Err(e) => assert!(e.raw_os_error().is_some()),
        }
        drop(client);
    }
}

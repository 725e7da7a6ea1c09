//! Listening sockets.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

const BACKLOG: i32 = 4096;

/// Binds a listener, not yet registered with any runtime. IPv6 sockets are
/// v6-only so `0.0.0.0:p` and `[::]:p` can both bind. SO_REUSEPORT lets
/// each worker bind its own listener on the same address; the kernel
/// spreads new connections across them. Returns `Ok(None)` for an IPv6
/// address on a host without IPv6, which the caller reports and skips.
pub fn bind(addr: SocketAddr) -> io::Result<Option<TcpListener>> {
    let domain = Domain::for_address(addr);
    let socket = match Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) {
        Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return Ok(None);
        }
        other => other?,
    };
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: one system call per listener instead
    // of one per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    match socket.bind(&addr.into()) {
        Err(e)
            if addr.is_ipv6()
                && e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                && addr.ip().is_unspecified() =>
        {
            return Ok(None);
        }
        other => other?,
    }
    socket.listen(BACKLOG)?;
    Ok(Some(socket.into()))
}

/// `count` listeners on `addr`, one per worker, all on the port the first
/// one got (which matters when `addr` asks for port 0).
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Option<Vec<TcpListener>>> {
    let Some(first) = bind(addr)? else {
        return Ok(None);
    };
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count {
        group.push(bind(bound)?.ok_or_else(|| io::Error::other("address vanished"))?);
    }
    Ok(Some(group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_group_shares_one_port_even_when_asked_for_any() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3)
            .unwrap()
            .unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &group {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }
}

//! Listening sockets.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use tokio::net::TcpListener;

const BACKLOG: i32 = 4096;

/// Binds a listener. IPv6 sockets are v6-only so `0.0.0.0:p` and `[::]:p`
/// can both bind. Returns `Ok(None)` for an IPv6 address on a host without
/// IPv6, which the caller reports and skips.
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
    TcpListener::from_std(socket.into()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}

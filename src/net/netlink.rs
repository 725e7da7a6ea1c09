//! The kernel's address events: a routing netlink socket subscribed to
//! the IPv4 and IPv6 address groups, so that the gateway learns of an
//! address added or removed the moment it happens. The messages are not
//! parsed: any one of them means "read the addresses again", which is
//! simpler than applying each change and cannot drift from the truth.

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// Room for the events of a burst (a few hundred addresses changing at
/// once); past it the kernel says ENOBUFS, which is handled as a change.
const RECEIVE_BUFFER: usize = 256 * 1024;
/// Messages taken with the first of a burst, at most: events that never
/// stop (address churn) still let the addresses be read again.
const BURST: usize = 256;

/// A subscription to the host's address changes.
#[derive(Debug)]
pub struct AddressEvents {
    socket: OwnedFd,
}

/// What [`AddressEvents::wait`] came back for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// Addresses changed (or events were lost: as good as a change).
    Changed,
    /// Nothing happened within the wait.
    Quiet,
}

impl AddressEvents {
    /// Subscribes to every IPv4 and IPv6 address change of this network
    /// namespace.
    pub fn open() -> io::Result<AddressEvents> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // Best effort: the default buffer only loses events sooner.
        let _ = setsockopt(&socket, sockopt::RcvBuf, &RECEIVE_BUFFER);
        Ok(AddressEvents { socket })
    }

    /// Waits up to `timeout` for a change; once one comes, takes every
    /// event already queued with it, so a burst is one wake-up.
    pub fn wait(&self, timeout: Duration) -> io::Result<Woke> {
        let timeout = TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        );
        setsockopt(&self.socket, sockopt::ReceiveTimeout, &timeout)?;
        let mut buf = vec![0u8; 16 * 1024];
        match recv(self.socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(_) | Err(Errno::ENOBUFS) => {}
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Woke::Quiet),
            Err(e) => return Err(e.into()),
        }
        for _ in 0..BURST {
            match recv(self.socket.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) | Err(Errno::ENOBUFS | Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Woke::Changed)
    }
}

// Tested with the guard, in a network namespace of its own
// (guard::tests::an_address_added_or_removed_is_known_at_once).

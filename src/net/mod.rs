//! Sockets: original destination, listeners, and byte forwarding.

pub mod forward;
pub mod listener;
pub mod netlink;
pub mod orig_dst;

//! Sockets: original destination, listeners, and byte forwarding.

pub mod forward;
pub mod listener;
pub mod orig_dst;

//! `portcullis gwlb`: the tunnel between an AWS Gateway Load Balancer and
//! the host's own stack, so that the proxy serves GWLB's flows exactly as
//! it serves routed ones.
//!
//! # Layout
//! - [`geneve`]: GWLB's GENEVE header (RFC 8926 with AWS's three options)
//!   as a pure codec.
//! - [`packet`]: an inner IPv4 or IPv6 packet's flow, as seen arriving from
//!   a client or leaving toward one (ICMP errors by the packet they quote).
//! - [`flows`]: which GENEVE header each flow's packets go back with: a
//!   bounded table, idle flows expired as GWLB expires them.
//!
//! - [`tunnel`]: the I/O: GWLB's datagrams in and out, a tun device into
//!   the host's stack, and the policy routes that bring the host's answers
//!   back to it (feature `tunnel`, on by default).
//!
//! The first three are pure (time is passed in), unit-tested and fuzzed.

#![forbid(unsafe_code)]

pub mod flows;
pub mod geneve;
pub mod packet;
#[cfg(feature = "tunnel")]
pub mod tunnel;

//! Test hosts in network namespaces, real servers and clients.
#![allow(dead_code)]

pub mod hello {
    include!("hello.rs");
}
pub mod client;
pub mod netns;
pub mod s3;
pub mod scrape;
pub mod servers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Polls `done` until it holds, failing the test after `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

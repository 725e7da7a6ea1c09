//! Test hosts in network namespaces, real servers and clients.
#![allow(dead_code)]

pub mod hello {
    include!("hello.rs");
}
pub mod netns;
pub mod servers;

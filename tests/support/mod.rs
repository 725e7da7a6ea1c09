//! Test hosts in network namespaces, real servers and clients.
#![allow(dead_code)]

pub mod alert;
pub mod client;
pub mod dns;
pub mod gwlb;
pub mod netns;
pub mod s3;
pub mod scrape;
pub mod servers;
pub mod transfer;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A path of the repository.
pub fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Whether this is CI (`CI=true`), where a missing tool fails instead of
/// skipping.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v == "true")
}

/// The test venv (scripts/setup.sh): moto, boto3, python-hcl2.
pub fn venv() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var("PORTCULLIS_VENV").unwrap_or_else(|_| "/opt/portcullis-test-venv".into()),
    )
}

/// The venv's Python.
pub fn venv_python() -> String {
    venv().join("bin/python").display().to_string()
}

/// The indented body of the cloud-config `write_files` entry for `path`
/// in `user_data`.
pub fn written_file(user_data: &str, path: &str) -> String {
    let start = user_data.find(&format!("- path: {path}\n")).expect(path);
    let rest = &user_data[start..];
    let body = &rest[rest.find("content: |\n").unwrap() + 11..];
    body.lines()
        .take_while(|l| l.starts_with("      "))
        .map(|l| format!("{}\n", &l[6..]))
        .collect()
}

/// Reads until end of stream or an error (such as a reset): what arrived.
pub fn read_all(s: &mut std::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(s, &mut out);
    out
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// Raises this process's descriptor limit to its hard limit, which must
/// be at least `needed`: the test holds thousands of client sockets.
pub fn raise_fd_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "the hard descriptor limit {hard} is below {needed}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// Polls `done` until it holds, failing the test after `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a checker (promtool, packer, …) with `input` on its standard
/// input. None when it is not installed and this is not CI, so the test
/// skips; under CI=true a missing checker fails (scripts/setup.sh installs
/// them all).
pub fn checker(command: &mut Command, input: &[u8]) -> Option<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let spawned = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(_) if std::env::var_os("CI").is_none_or(|v| v != "true") => {
            eprintln!("skipping: {program} not installed (scripts/setup.sh installs it)");
            return None;
        }
        Err(e) => panic!("{program} not found ({e}) and CI=true: refusing to skip"),
    };
    child.stdin.take().unwrap().write_all(input).unwrap();
    Some(child.wait_with_output().unwrap())
}

/// Deterministic bytes that differ per position, so any reordering, loss
/// or duplication changes the digest.
pub fn pattern(seed: u64, len: usize, mut sink: impl FnMut(&[u8])) {
    let mut state = seed | 1;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        for word in chunk[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        sink(&chunk[..n]);
        left -= n;
    }
}

pub fn digest_of_pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    pattern(seed, len, |c| sha2::Digest::update(&mut h, c));
    sha2::Digest::finalize(h).to_vec()
}

/// Reads one HTTP response (head and Content-Length body) from `s`.
pub fn read_response(s: &mut std::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = servers::find(&got, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return got;
            }
        }
        match std::io::Read::read(s, &mut chunk) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

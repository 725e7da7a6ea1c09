//! Large transfers through the gateway, checked byte for byte.

use super::netns::Topology;
use super::servers::Server;
use super::{digest_of_pattern, pattern, wait_until};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

/// Sends `hello` then `len` patterned bytes from the client to a server
/// at `to` (in the upstream namespace), which sends `len` others back at
/// once; both ends check every byte arrived, in order (SHA-256).
pub fn each_way_intact(t: &Topology, to: SocketAddr, hello: &'static [u8], len: usize) {
    let upstream_digest = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sink = upstream_digest.clone();
    let _server = Server::start(&t.upstream, &[to], move |s| {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut reader = s.try_clone().unwrap();
        let digest = std::thread::spawn(move || {
            let mut first = vec![0u8; hello.len()];
            reader.read_exact(&mut first).unwrap();
            assert_eq!(first, hello);
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    Err(e) => panic!("upstream read: {e}"),
                }
            }
            h.finalize().to_vec()
        });
        let mut writer = &s;
        pattern(2, len, |c| writer.write_all(c).unwrap());
        s.shutdown(Shutdown::Write).unwrap();
        *sink.lock().unwrap() = Some(digest.join().unwrap());
    });
    let s = t.connect(to);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let downstream = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    total += n;
                }
                Err(e) => panic!("client read: {e}"),
            }
        }
        (total, h.finalize().to_vec())
    });
    let mut writer = &s;
    writer.write_all(hello).unwrap();
    pattern(1, len, |c| writer.write_all(c).unwrap());
    s.shutdown(Shutdown::Write).unwrap();

    let (got, client_digest) = downstream.join().unwrap();
    assert_eq!(got, len);
    assert_eq!(
        client_digest,
        digest_of_pattern(2, len),
        "downstream sha256"
    );
    wait_until("upstream digest", Duration::from_secs(30), || {
        upstream_digest.lock().unwrap().is_some()
    });
    let up = upstream_digest.lock().unwrap().clone().unwrap();
    assert_eq!(up, digest_of_pattern(1, len), "upstream sha256");
}

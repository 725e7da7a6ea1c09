//! GWLB's GENEVE codec and the inner packets' flows on any bytes: they
//! must never panic, a decoded datagram must split into its header and
//! its packet exactly, and re-encapsulating must give the same datagram.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use portcullis_gwlb::{geneve, packet};

fuzz_target!(|data: &[u8]| {
    let _ = packet::from_client(data);
    let _ = packet::to_client(data);
    let Ok(decoded) = geneve::decode(data) else {
        return;
    };
    assert_eq!(
        decoded.header.as_bytes().len() + decoded.packet.len(),
        data.len()
    );
    let mut again = Vec::new();
    geneve::encapsulate(&decoded.header, decoded.family, decoded.packet, &mut again);
    assert_eq!(again, data);
    let _ = packet::from_client(decoded.packet);
    let _ = packet::to_client(decoded.packet);
});

//! The ClientHello parser on any bytes: it must never panic, and what it
//! accepts must stay accepted when cut into more records.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use portcullis_core::detect::Detect;
use portcullis_core::detect::tls::parse_client_hello;

const CAP: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let Detect::Done(hello) = parse_client_hello(data, CAP) else {
        return;
    };
    // Every proper prefix of an accepted hello is incomplete or refused,
    // never a different hello.
    for len in [0, 1, 5, data.len() / 2, data.len().saturating_sub(1)] {
        if let Detect::Done(other) = parse_client_hello(&data[..len.min(data.len())], CAP) {
            assert_eq!(other, hello, "a prefix of {len} bytes gave another hello");
        }
    }
});

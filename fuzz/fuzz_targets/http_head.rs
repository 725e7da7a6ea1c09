//! The HTTP head parsers and the chunked-body framer on any bytes: they
//! must never panic, and framing must not depend on how bytes arrive.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use portcullis_core::detect::http::{ChunkedDecoder, parse_request_head, parse_response_head};

const CAP: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request_head(data, CAP);
    let _ = parse_response_head(data, CAP, false);
    let _ = parse_response_head(data, CAP, true);

    // All at once, then in pieces of 1 to 7 bytes (sizes taken from the
    // input itself): a body must end at the same place either way.
    let mut whole = ChunkedDecoder::default();
    let Ok(whole_end) = whole.advance(data) else {
        return;
    };
    let mut pieces = ChunkedDecoder::default();
    let (mut at, mut upto) = (0, 0);
    let mut step = data.iter().cycle().map(|b| 1 + usize::from(b % 7));
    while !pieces.is_done() && upto < data.len() {
        // The window only grows, so a line longer than a piece still
        // completes.
        upto = (upto + step.next().unwrap_or(1)).min(data.len());
        match pieces.advance(&data[at..upto]) {
            Ok(n) => at += n,
            Err(e) => panic!("refused in pieces what it accepted at once: {e}"),
        }
    }
    if whole.is_done() {
        assert!(pieces.is_done(), "ended at once but not in pieces");
        assert_eq!(at, whole_end, "the body ends at the same place");
    }
});

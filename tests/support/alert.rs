//! The TLS alerts the gateway refuses with, as the client reads them: a
//! fatal alert record (TLS 1.2 framing) with its description.

pub const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];
pub const DECODE_ERROR: [u8; 7] = [21, 3, 3, 0, 2, 2, 50];
pub const PROTOCOL_VERSION: [u8; 7] = [21, 3, 3, 0, 2, 2, 70];
/// What a client refused at a connection limit reads on the TLS port.
pub const INTERNAL_ERROR: [u8; 7] = [21, 3, 3, 0, 2, 2, 80];

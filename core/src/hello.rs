//! Builds ClientHello byte streams for tests from captured real hellos:
//! this crate's detector tests and the gateway's end-to-end tests share it
//! (feature `testing`).

/// Joins the payloads of consecutive TLS records: the handshake message.
pub fn handshake_message(records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = records;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        out.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    out
}

/// Wraps a handshake message in handshake records, cutting it at `cuts`.
pub fn into_records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5 * (cuts.len() + 1));
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&message.len())) {
        let part = &message[start..end];
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        out.extend_from_slice(part);
        start = end;
    }
    out
}

/// Appends an extension of type 0x7a7a (a GREASE value, which servers
/// ignore) with `len` bytes of data, fixing the handshake and extension
/// block lengths. The base hello must not already carry 0x7a7a.
pub fn with_filler_extension(message: &[u8], len: usize) -> Vec<u8> {
    let mut m = message.to_vec();
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(m[at]);
    at += 2 + usize::from(u16::from_be_bytes([m[at], m[at + 1]]));
    at += 1 + usize::from(m[at]);
    let ext_len = usize::from(u16::from_be_bytes([m[at], m[at + 1]])) + 4 + len;
    m[at..at + 2].copy_from_slice(&u16::try_from(ext_len).unwrap().to_be_bytes());
    m.extend_from_slice(&[0x7a, 0x7a]);
    m.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    m.resize(m.len() + len, 0xab);
    let body = u32::try_from(m.len() - 4).unwrap().to_be_bytes();
    m[1..4].copy_from_slice(&body[1..]);
    m
}

/// A ~16 KiB ClientHello for `www.example.test` in three records.
pub fn large_hello_in_three_records(curl_hello: &[u8]) -> Vec<u8> {
    let message = with_filler_extension(&handshake_message(curl_hello), 15_400);
    let third = message.len() / 3;
    into_records(&message, &[third, 2 * third])
}

/// A copy of a captured hello (one record) asking for `name` instead.
pub fn with_server_name(records: &[u8], name: &str) -> Vec<u8> {
    let m = handshake_message(records);
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(m[at]);
    at += 2 + usize::from(u16::from_be_bytes([m[at], m[at + 1]]));
    at += 1 + usize::from(m[at]);
    let ext_block = at;
    let mut out = m[..ext_block + 2].to_vec();
    let mut rest = &m[ext_block + 2..];
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if kind == 0 {
            let n = u16::try_from(name.len()).unwrap();
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(n + 5).to_be_bytes());
            out.extend_from_slice(&(n + 3).to_be_bytes());
            out.push(0);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        } else {
            out.extend_from_slice(&rest[..4 + len]);
        }
        rest = &rest[4 + len..];
    }
    let ext_len = u16::try_from(out.len() - ext_block - 2)
        .unwrap()
        .to_be_bytes();
    out[ext_block..ext_block + 2].copy_from_slice(&ext_len);
    let body = u32::try_from(out.len() - 4).unwrap().to_be_bytes();
    out[1..4].copy_from_slice(&body[1..]);
    into_records(&out, &[])
}

/// A copy of a captured hello that has no `supported_versions` extension
/// (a TLS 1.2-only one) offering at most `version`, as an old client would.
pub fn with_legacy_version(records: &[u8], version: u16) -> Vec<u8> {
    let mut m = handshake_message(records);
    m[4..6].copy_from_slice(&version.to_be_bytes());
    into_records(&m, &[])
}

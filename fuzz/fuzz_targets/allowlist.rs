//! The allowlist parser and matcher on any text: parsing must never
//! panic, and a list that parses must decide every name it contains.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use portcullis_core::allowlist::{EntryKind, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(list) = parse(text) else {
        return;
    };
    for entry in list.entries() {
        let name = entry.name.as_str();
        let below = format!("x.{name}");
        match entry.kind {
            EntryKind::Exact => assert!(list.lookup(name).is_some(), "{name}"),
            EntryKind::Domain => {
                assert!(list.lookup(name).is_some(), "{name}");
                assert!(list.lookup(&below).is_some(), "{below}");
            }
            EntryKind::Subdomains => assert!(list.lookup(&below).is_some(), "{below}"),
        }
    }
});

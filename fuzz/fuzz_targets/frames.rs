//! Feeds arbitrary bytes to every decoder of the r3map protocol: none may panic, and whatever
//! decodes must encode back to the bytes it came from.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run frames` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use r3map_net::proto::{
    self, ClientHello, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, ReplyHeader, RequestHeader, ServerHello,
};

fuzz_target!(|data: &[u8]| {
    let max = data.first().map_or(proto::DEFAULT_MAX_REQUEST, |&b| u32::from(b) << 16);
    if let Ok(h) = RequestHeader::decode(data, max) {
        let mut enc = h.encode();
        // The reserved bytes are not kept.
        enc[6..8].copy_from_slice(&data[6..8]);
        assert_eq!(&enc[..], &data[..REQUEST_HEADER_LEN]);
    }
    if let Ok(h) = ReplyHeader::decode(data, max) {
        assert_eq!(&h.encode()[..], &data[..REPLY_HEADER_LEN]);
    }
    if let Ok(Some((hello, used))) = ClientHello::decode(data) {
        let again = ClientHello::decode(&hello.encode()).expect("re-encoded hello decodes");
        assert_eq!(again.map(|(h, _)| h), Some(hello));
        assert!(used <= data.len());
    }
    if let Ok(Some((hello, used))) = ServerHello::decode(data) {
        let again = ServerHello::decode(&hello.encode()).expect("re-encoded hello decodes");
        assert_eq!(again.map(|(h, _)| h), Some(hello));
        assert!(used <= data.len());
    }
    if let Ok(chunks) = proto::decode_chunks(data) {
        assert_eq!(proto::encode_chunks(&chunks), data);
    }
});

//! Plays an NBD server whose bytes are the fuzz input, against the client's handshake and reply
//! reading (`r3map_nbd::client::fuzz_session`): the client must never panic, never accept a reply
//! that does not fit its request, and must stop once the server's bytes run out. The first byte
//! selects a valid handshake to start with (with or without structured replies), so the fuzzer
//! reaches the transmission phase quickly; replies answer cookies 1, 2, ...
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run nbd_client` (from `fuzz/`).

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use r3map_nbd::proto::{
    self, encode_info_block_size, encode_info_export, encode_option_reply, handshake_flags, opt, rep,
    transmission_flags as tf,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    })
}

/// A server's side of a successful handshake, up to the transmission phase.
fn handshake(structured: bool) -> Vec<u8> {
    let mut s = proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_vec();
    if structured {
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        let mut context = 1u32.to_be_bytes().to_vec();
        context.extend_from_slice(b"base:allocation");
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &context));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
    } else {
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
    }
    let flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_CACHE;
    s.extend(encode_option_reply(opt::GO, rep::INFO, &encode_info_export(1 << 20, flags)));
    s.extend(encode_option_reply(opt::GO, rep::INFO, &encode_info_block_size(1, 4096, 1 << 20)));
    s.extend(encode_option_reply(opt::GO, rep::ACK, &[]));
    s
}

fuzz_target!(|data: &[u8]| {
    let mut input = match data.first() {
        Some(b) if b % 4 == 1 => handshake(true),
        Some(b) if b % 4 == 2 => handshake(false),
        _ => Vec::new(),
    };
    input.extend_from_slice(data.get(1..).unwrap_or_default());
    runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(r3map_nbd::client::fuzz_session(client));
        let (mut rd, mut wr) = tokio::io::split(server);
        let feed = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        // The client drops its end when the session is over, which ends the drain.
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while rd.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        };
        let all = async { tokio::join!(feed, drain, session).2 };
        let Ok(joined) = tokio::time::timeout(Duration::from_secs(20), all).await else {
            panic!("the client did not stop after the server's bytes ran out");
        };
        assert!(joined.is_ok(), "the client panicked: {joined:?}");
    });
});

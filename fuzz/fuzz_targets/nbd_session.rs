//! Feeds arbitrary bytes to the NBD server as a whole client session (handshake, options,
//! requests) over an in-memory stream: the server must never panic and must end the session
//! once the client's bytes run out. Starting the bytes with a valid prefix lets the fuzzer reach
//! the transmission phase quickly: the first byte selects one.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run nbd_session` (from the repository root).

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use r3map_core::{Memory, SharedBackend};
use r3map_nbd::{NbdExport, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NBD_OPT_GO: u32 = 7;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

fn server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let backend: SharedBackend = Arc::new(Memory::new(1 << 20));
        let ro: SharedBackend = Arc::new(Memory::new(4096 * 3 + 17));
        NbdServer::new(vec![
            NbdExport::new("", backend),
            NbdExport { read_only: true, ..NbdExport::new("ro", ro) },
        ])
        .unwrap()
    })
}

/// Client flags (FIXED_NEWSTYLE | NO_ZEROES), then `NBD_OPT_GO` for the default export.
fn go_prefix() -> Vec<u8> {
    let mut p = 3u32.to_be_bytes().to_vec();
    p.extend_from_slice(&IHAVEOPT.to_be_bytes());
    p.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    p.extend_from_slice(&6u32.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // empty name
    p.extend_from_slice(&0u16.to_be_bytes()); // no info requests
    p
}

fuzz_target!(|data: &[u8]| {
    let mut input = match data.first() {
        Some(b) if b % 2 == 1 => go_prefix(),
        _ => Vec::new(),
    };
    input.extend_from_slice(data.get(1..).unwrap_or_default());
    runtime().block_on(async move {
        let (mut client, served) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(server().serve_stream(served, std::future::pending()));
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while rd.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        };
        let feed = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(drain, feed);
        })
        .await;
        assert!(ended.is_ok(), "the session did not end after the client's bytes ran out");
        // An error ends a session; a panic in it is a bug.
        let joined = session.await;
        assert!(joined.is_ok(), "the session panicked: {joined:?}");
    });
});

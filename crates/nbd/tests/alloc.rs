//! The path the kernel's requests take through the NBD server allocates nothing once it runs. A
//! swap device served by this process (`ram-dl`) must not need fresh memory to take pages that
//! the kernel is writing out to free memory. Measured with a counting global allocator over many
//! 4 KiB writes and reads on a socketpair, sent as the kernel sends them.

// Page numbers and sizes are small; a page's fill byte is its round number, wrapped.
#![allow(clippy::cast_possible_truncation)]

use std::alloc::System;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::Memory;
use r3map_nbd::proto::{self, Command, Request, SimpleReply};
use r3map_nbd::{NbdExport, NbdServer};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PAGE: usize = 4096;
/// Pages the requests cycle over (the backend's pages are all touched during the warm-up).
const PAGES: u64 = 256;

/// One write and one read of page `i % PAGES`, with buffers the caller owns.
fn round(kernel: &mut UnixStream, i: u64, page: &mut [u8; PAGE], reply: &mut [u8; proto::SIMPLE_REPLY_LEN]) {
    let offset = (i % PAGES) * PAGE as u64;
    let length = PAGE as u32;
    page.fill(i as u8);
    let write = Request { flags: 0, kind: Command::Write.to_u16(), cookie: 2 * i, offset, length };
    kernel.write_all(&write.encode()).unwrap();
    kernel.write_all(page).unwrap();
    kernel.read_exact(reply).unwrap();
    assert_eq!(SimpleReply::decode(reply).unwrap().error, 0);
    let read = Request { flags: 0, kind: Command::Read.to_u16(), cookie: 2 * i + 1, offset, length };
    kernel.write_all(&read.encode()).unwrap();
    kernel.read_exact(reply).unwrap();
    assert_eq!(SimpleReply::decode(reply).unwrap().error, 0);
    kernel.read_exact(page).unwrap();
    assert!(page.iter().all(|&b| b == i as u8), "page {} read back wrong", i % PAGES);
}

#[test]
fn kernel_requests_allocate_nothing_once_the_server_runs() {
    // Made before the sockets, so dropped after them: a failed assertion must not leave the
    // runtime waiting for server threads that wait for the socket.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let backend = Arc::new(Memory::new(PAGES * PAGE as u64));
    let server = NbdServer::new(vec![NbdExport::new("swap", backend)]).unwrap();
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    kernel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let serving =
        rt.spawn(async move { server.serve_transmission(ours, "swap", std::future::pending()).await });

    let mut page = [0u8; PAGE];
    let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
    // Warm-up: the server starts its threads and sizes its buffers; every page gets touched.
    for i in 0..4 * PAGES {
        round(&mut kernel, i, &mut page, &mut reply);
    }
    let measured = Region::new(GLOBAL);
    for i in 0..20 * PAGES {
        round(&mut kernel, i, &mut page, &mut reply);
    }
    let change = measured.change();
    assert_eq!(
        (change.allocations, change.reallocations),
        (0, 0),
        "{} requests allocated: {change:?}",
        40 * PAGES
    );

    let disc = Request { flags: 0, kind: Command::Disc.to_u16(), cookie: 0, offset: 0, length: 0 };
    kernel.write_all(&disc.encode()).unwrap();
    rt.block_on(serving).unwrap().expect("a clean disconnect");
}

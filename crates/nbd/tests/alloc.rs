//! The path the kernel's requests take through the NBD server allocates nothing once it runs. A
//! swap device served by this process (`ram-dl`) must not need fresh memory to take pages that
//! the kernel is writing out to free memory. Measured with a counting global allocator over many
//! 4 KiB writes and reads on a socketpair, sent as the kernel sends them: one at a time, and
//! many in flight at once.
//!
//! The count covers the whole process, so it holds only because nothing else in it runs while
//! the window is open: the server starts every thread of the connection, each with its buffers,
//! before it reads the first request (`serve_transmission`), so no thread can start inside the
//! window however the threads are scheduled.

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
/// Requests in flight at once in the pipelined rounds: more than the server has threads.
const DEPTH: usize = 16;

fn request(kind: Command, cookie: u64, page: u64) -> [u8; proto::REQUEST_LEN] {
    Request { flags: 0, kind: kind.to_u16(), cookie, offset: page * PAGE as u64, length: PAGE as u32 }
        .encode()
}

/// Reads one simple reply header and checks that it reports success.
fn reply(kernel: &mut UnixStream) -> SimpleReply {
    let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
    kernel.read_exact(&mut header).unwrap();
    let reply = SimpleReply::decode(&header).unwrap();
    assert_eq!(reply.error, 0, "request {} failed", reply.cookie);
    reply
}

/// One write and one read of page `i % PAGES`, with buffers the caller owns.
fn round(kernel: &mut UnixStream, i: u64, page: &mut [u8; PAGE]) {
    let p = i % PAGES;
    page.fill(i as u8);
    kernel.write_all(&request(Command::Write, 2 * i, p)).unwrap();
    kernel.write_all(page).unwrap();
    reply(kernel);
    kernel.write_all(&request(Command::Read, 2 * i + 1, p)).unwrap();
    reply(kernel);
    kernel.read_exact(page).unwrap();
    assert!(page.iter().all(|&b| b == i as u8), "page {p} read back wrong");
}

/// [`DEPTH`] writes of distinct pages sent before any reply is read, then [`DEPTH`] reads of
/// them the same way. Replies come in any order; a read's cookie says which page it carries.
fn pipelined_round(kernel: &mut UnixStream, i: u64, page: &mut [u8; PAGE]) {
    let first = (i * DEPTH as u64) % PAGES;
    for d in 0..DEPTH as u64 {
        page.fill((i + d) as u8);
        kernel.write_all(&request(Command::Write, d, first + d)).unwrap();
        kernel.write_all(page).unwrap();
    }
    for _ in 0..DEPTH {
        reply(kernel);
    }
    for d in 0..DEPTH as u64 {
        kernel.write_all(&request(Command::Read, d, first + d)).unwrap();
    }
    for _ in 0..DEPTH {
        let d = reply(kernel).cookie;
        kernel.read_exact(page).unwrap();
        assert!(page.iter().all(|&b| b == (i + d) as u8), "page {} read back wrong", first + d);
    }
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
    // Warm-up: every page of the backend gets touched (a sparse memory backend allocates a
    // page on its first write) and the test's own lazily made state is made.
    for i in 0..PAGES {
        round(&mut kernel, i, &mut page);
    }
    for i in 0..PAGES / DEPTH as u64 {
        pipelined_round(&mut kernel, i, &mut page);
    }

    let measured = Region::new(GLOBAL);
    for i in 0..10 * PAGES {
        round(&mut kernel, i, &mut page);
    }
    for i in 0..10 * PAGES / DEPTH as u64 {
        pipelined_round(&mut kernel, i, &mut page);
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

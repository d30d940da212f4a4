//! A fault handler in another process: the mapping side sends its userfaultfd over a Unix socket
//! (`SCM_RIGHTS`), the handler side serves the missing pages from a backend.
//!
//! - Mapping side: [`ExternalRegion::new`] maps anonymous memory and registers it for
//!   missing-page faults; [`ExternalRegion::send`] passes the descriptor, with the mapping's
//!   address and length, to the handler. Accesses then wait for the other process to fill the
//!   pages.
//! - Handler side: [`receive`] takes the descriptor (checking that it is a userfaultfd), and
//!   [`serve_faults`] answers each fault with its whole chunk, read from the backend and installed
//!   with `UFFDIO_COPY` into the other process, until told to stop.
//!
//! This is the small, read-only variant: no background pull, no write tracking and no push (the
//! full pipeline needs the memory in the handler's own process). A chunk that cannot be read is
//! poisoned so the access raises SIGBUS in the mapping process.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use r3map_core::backend::Backend;
use r3map_sys::uffd::{CopyMode, Event, Features, RegisterMode};
use r3map_sys::{AnonMapping, Uffd};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use crate::cache::RegionMemory;
use crate::region::RegionError;
use r3map_core::geometry::to_usize;

/// The mapping side: memory whose missing pages another process fills. See the
/// [module docs](self).
#[derive(Debug)]
pub struct ExternalRegion {
    memory: RegionMemory,
    len: u64,
}

impl ExternalRegion {
    /// Maps `len` bytes and registers them for missing-page faults.
    ///
    /// # Errors
    /// As [`Region::open`](crate::Region::open).
    pub fn new(len: u64) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::InvalidOptions("the region is empty".into()));
        }
        let api = Uffd::probe().map_err(RegionError::Unavailable)?;
        let features = api.features.intersection(Features::POISON);
        let uffd = Uffd::open(features).map_err(|source| RegionError::Open { features, source })?;
        let mapping = AnonMapping::new(to_usize(len)).map_err(|source| RegionError::Map { len, source })?;
        uffd.register(&mapping, RegisterMode::MISSING).map_err(RegionError::Register)?;
        Ok(Self { memory: RegionMemory { mapping, uffd }, len })
    }

    /// Sends the descriptor, the mapping's address and its length over `socket` (a connected
    /// Unix socket).
    ///
    /// # Errors
    /// The `sendmsg` error.
    pub fn send(&self, socket: impl AsFd) -> io::Result<()> {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&self.memory.mapping.addr().to_le_bytes());
        payload[8..].copy_from_slice(&self.len.to_le_bytes());
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        let fds = [self.memory.uffd.as_fd()];
        if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("the descriptor does not fit the control message"));
        }
        let sent =
            rustix::net::sendmsg(socket, &[IoSlice::new(&payload)], &mut ancillary, SendFlags::empty())?;
        if sent != payload.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send of the region description"));
        }
        Ok(())
    }

    /// Size in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first byte; the rules of [`Region::as_ptr`](crate::Region::as_ptr) apply.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.mapping.as_ptr()
    }

    /// Copies bytes out (volatile loads); missing pages wait for the handler process.
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        r3map_core::check_range(off, buf.len() as u64, self.len)?;
        self.memory.mapping.read(to_usize(off), buf)
    }
}

/// A descriptor received by [`receive`], with the mapping it serves (addresses in the sender).
#[derive(Debug)]
pub struct Received {
    pub uffd: Uffd,
    /// Start address of the mapping in the sending process.
    pub base: u64,
    pub len: u64,
}

/// Receives what [`ExternalRegion::send`] sent.
///
/// # Errors
/// The `recvmsg` error; `InvalidData` when the message carries no userfaultfd or a short payload.
pub fn receive(socket: impl AsFd) -> io::Result<Received> {
    let mut payload = [0u8; 16];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut payload)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd: Option<OwnedFd> = None;
    for m in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    let (Some(fd), 16) = (fd, msg.bytes) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the message carries no region description"));
    };
    let mut word = [0u8; 8];
    word.copy_from_slice(&payload[..8]);
    let base = u64::from_le_bytes(word);
    word.copy_from_slice(&payload[8..]);
    let len = u64::from_le_bytes(word);
    Ok(Received { uffd: Uffd::from_fd(fd)?, base, len })
}

/// Serves the missing-page faults of a received region from `remote` (which holds the region's
/// bytes from offset 0), one `chunk_size` chunk per fault, until `stop` is set. Returns the
/// faults served.
///
/// # Errors
/// A failed `poll` or read of events. A chunk that cannot be read from `remote` is not an error
/// here: its page is poisoned (SIGBUS in the mapping process).
pub fn serve_faults(
    received: &Received,
    remote: &dyn Backend,
    chunk_size: u64,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let page = r3map_sys::region_map::page_size() as u64;
    let chunk_size = chunk_size.max(page).next_multiple_of(page);
    let mapped = received.len.next_multiple_of(page);
    let mut served = 0;
    let mut events = Vec::new();
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [rustix::event::PollFd::new(&received.uffd, rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        events.clear();
        received.uffd.read_events(&mut events, 16)?;
        for event in events.drain(..) {
            let Event::Pagefault { address, .. } = event else { continue };
            if address < received.base || address >= received.base + mapped {
                continue;
            }
            let off = address - received.base;
            let start = off / chunk_size * chunk_size;
            let end = (start + chunk_size).min(mapped);
            let data_end = end.min(received.len).min(remote.size());
            buf.clear();
            buf.resize(to_usize(end - start), 0);
            let read = if data_end > start {
                remote.read_at(&mut buf[..to_usize(data_end - start)], start)
            } else {
                Ok(())
            };
            let result = read.and_then(|()| {
                received.uffd.copy(received.base + start, &buf, CopyMode::default()).map(|_| ())
            });
            let page_addr = address / page * page;
            match result {
                Ok(()) => received.uffd.wake(page_addr, page)?,
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "serving an external fault failed; poisoning the page");
                    if received.uffd.poison(page_addr, page).is_err() {
                        // Without POISON the faulting thread would wait forever; wake it to retry.
                        std::thread::sleep(Duration::from_millis(10));
                        received.uffd.wake(page_addr, page)?;
                    }
                }
            }
            served += 1;
        }
    }
    Ok(served)
}

//! The fault handler threads.
//!
//! Each thread waits on the userfaultfd with its own epoll instance (`EPOLLEXCLUSIVE`, so one
//! fault wakes one thread, not all), reads one message at a time without blocking, and serves it:
//! - **Missing page** at address `A`: the chunk holding `A` is made local with
//!   [`Synced::fetch_for`] (which pulls it with one ranged read and fills it into the
//!   [`RegionCache`] with `UFFDIO_COPY`, or waits for whoever is pulling it already, the
//!   background puller say); the fault goes with the fetch to the cache, which copies the
//!   faulting page first so the faulting thread resumes before the rest of the chunk is in. When
//!   faults walk forward through the region, each fetch also reads ahead (a window of chunks
//!   that doubles up to [`RegionOptions::readahead`](crate::RegionOptions::readahead)). Then the
//!   page is
//!   woken (`UFFDIO_WAKE`: the copy woke the waiters if this thread made it; otherwise the wake
//!   makes sure no thread sleeps on a page someone else installed). A fault on a chunk that is
//!   already local but whose page is missing (the application dropped it with `MADV_DONTNEED`)
//!   is repaired: the chunk is read from the remote again and its missing pages installed.
//! - **Write-protect fault** (only with [`WriteTracking::Sync`](crate::WriteTracking::Sync)): the
//!   page is recorded as written and un-protected, which wakes the writer.
//!
//! After serving a message a thread keeps polling without blocking for `spin` (default 50 µs)
//! before it goes back to sleep: a thread that faults once usually faults again soon (a
//! sequential scan), and a sleeping handler costs a wake-up (tens of µs on a virtual machine)
//! per fault.
//!
//! A fetch that fails is retried `fault_retries` times with doubling backoff; then the page is
//! poisoned (`UFFDIO_POISON`) so the access raises SIGBUS instead of hanging forever. Without the
//! `POISON` feature the handler keeps retrying (every second at most).
//!
//! Handler threads never touch the region's memory themselves (they only issue ioctls and read
//! the remote): a fault taken by a handler on its own region could never be served.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::pipeline::{Cache as _, Fault};
use r3map_core::{Backend as _, Chunk, Synced};
use r3map_sys::PageMap;
use r3map_sys::uffd::Event;
use rustix::event::epoll;

use crate::cache::{RegionCache, RegionMemory};
use crate::dirty::Tracker;
use r3map_core::geometry::to_usize;

/// Counters of the handlers.
#[derive(Debug, Default)]
pub(crate) struct HandlerCounters {
    pub(crate) missing_faults: AtomicU64,
    pub(crate) wp_faults: AtomicU64,
    pub(crate) already_local: AtomicU64,
    pub(crate) repairs: AtomicU64,
    pub(crate) spin_hits: AtomicU64,
    pub(crate) sleeps: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) poisoned_pages: AtomicU64,
    pub(crate) other_events: AtomicU64,
}

pub(crate) struct HandlerShared {
    pub(crate) memory: Arc<RegionMemory>,
    pub(crate) cache: Arc<RegionCache>,
    pub(crate) synced: Arc<Synced<RegionCache>>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) pagemap: PageMap,
    pub(crate) page: u64,
    pub(crate) spin: Duration,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) can_poison: bool,
    /// Largest readahead window in chunks (1: none).
    pub(crate) readahead: u64,
    /// Sequential-fault detection: (chunk after the last window, last window in chunks).
    pub(crate) stream: std::sync::Mutex<(u64, u64)>,
    pub(crate) stop: AtomicBool,
    pub(crate) stop_fd: OwnedFd,
    pub(crate) counters: HandlerCounters,
}

impl std::fmt::Debug for HandlerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerShared").field("spin", &self.spin).finish_non_exhaustive()
    }
}

/// The running handler threads; [`Handlers::stop`] (or drop) ends them.
#[derive(Debug)]
pub(crate) struct Handlers {
    pub(crate) shared: Arc<HandlerShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Handlers {
    pub(crate) fn start(shared: Arc<HandlerShared>, count: usize) -> io::Result<Self> {
        let mut handlers = Self { shared, threads: Vec::with_capacity(count) };
        for i in 0..count {
            let shared = Arc::clone(&handlers.shared);
            let epfd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
            epoll::add(
                &epfd,
                shared.memory.uffd.as_fd(),
                epoll::EventData::new_u64(0),
                epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE,
            )?;
            epoll::add(&epfd, &shared.stop_fd, epoll::EventData::new_u64(1), epoll::EventFlags::IN)?;
            let t = std::thread::Builder::new()
                .name(format!("r3map-fault-{i}"))
                .spawn(move || run(&shared, &epfd))?;
            handlers.threads.push(t);
        }
        Ok(handlers)
    }

    /// Stops and joins every thread. Faults still pending are not served afterwards.
    pub(crate) fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake every thread in epoll; the eventfd stays readable, so none sleeps again.
        if let Err(e) = rustix::io::write(&self.shared.stop_fd, &1u64.to_ne_bytes()) {
            tracing::error!(error = %e, "could not signal the fault handlers to stop");
        }
        for t in self.threads.drain(..) {
            // A panicked handler has nothing left to clean up.
            let _ = t.join();
        }
    }
}

impl Drop for Handlers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &HandlerShared, epfd: &OwnedFd) {
    let mut msgs = Vec::with_capacity(1);
    let mut ready = Vec::with_capacity(4);
    let mut spin_until: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        msgs.clear();
        match shared.memory.uffd.read_events(&mut msgs, 1) {
            Ok(0) => {}
            Ok(_) => {
                if spin_until.is_some() {
                    shared.counters.spin_hits.fetch_add(1, Ordering::Relaxed);
                }
                for event in msgs.drain(..) {
                    serve(shared, event);
                }
                spin_until = (!shared.spin.is_zero()).then(|| Instant::now() + shared.spin);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading userfaultfd events failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        if let Some(until) = spin_until {
            if Instant::now() < until {
                std::hint::spin_loop();
                continue;
            }
            spin_until = None;
        }
        shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        ready.clear();
        match epoll::wait(epfd, rustix::buffer::spare_capacity(&mut ready), None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "waiting for userfaultfd events failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(shared: &HandlerShared, event: Event) {
    match event {
        Event::Pagefault { address, flags, .. } => {
            let mapping = &shared.memory.mapping;
            let base = mapping.addr();
            if address < base || address >= base + mapping.len() as u64 {
                tracing::warn!(address, "fault outside the region");
                shared.counters.other_events.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let off = (address - base) / shared.page * shared.page;
            if flags.wp {
                shared.counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = shared.tracker.on_wp_fault(off) {
                    tracing::error!(error = %e, offset = off, "lifting write protection failed");
                }
            } else {
                shared.counters.missing_faults.fetch_add(1, Ordering::Relaxed);
                serve_missing(shared, off);
            }
        }
        other => {
            shared.counters.other_events.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(event = ?other, "ignoring a userfaultfd event");
        }
    }
}

/// The chunks to fetch for a fault on `chunk`: the chunk alone, or, when faults walk forward
/// through the region (each one at the chunk after the previous window), a window that doubles
/// up to the readahead limit, as the kernel's readahead does for files.
fn window(shared: &HandlerShared, chunk: u64, chunks: u64) -> std::ops::Range<u64> {
    if shared.readahead <= 1 {
        return chunk..chunk + 1;
    }
    let mut stream = shared.stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (expected, last) = *stream;
    let size = if chunk == expected { (last * 2).min(shared.readahead) } else { 1 };
    let end = (chunk + size).min(chunks);
    *stream = (end, size);
    chunk..end
}

fn serve_missing(shared: &HandlerShared, off: u64) {
    let geometry = shared.synced.geometry();
    let chunk = geometry.chunk_of(off).0.min(geometry.chunks().saturating_sub(1));
    let chunks = window(shared, chunk, geometry.chunks());
    let addr = shared.memory.mapping.addr() + off;
    let mut attempt = 0u32;
    let mut backoff = shared.backoff;
    loop {
        let result = if shared.synced.is_local(Chunk(chunk)) {
            shared.counters.already_local.fetch_add(1, Ordering::Relaxed);
            repair(shared, chunk, off)
        } else {
            let fault = Fault { off, sequential: chunks.end - chunks.start > 1 };
            shared.synced.fetch_for(chunks.clone(), fault)
        };
        match result {
            Ok(()) => {
                if let Err(e) = shared.memory.uffd.wake(addr, shared.page) {
                    tracing::error!(error = %e, "waking a faulting thread failed");
                }
                return;
            }
            Err(e) if shared.stop.load(Ordering::Relaxed) => {
                tracing::debug!(error = %e, "fault not served: the region is closing");
                return;
            }
            Err(e) if attempt < shared.retries || !shared.can_poison => {
                attempt += 1;
                shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, offset = off, attempt, "serving a fault failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!(error = %e, offset = off, "serving a fault failed; poisoning the page (SIGBUS)");
                shared.counters.poisoned_pages.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = shared.memory.uffd.poison(addr, shared.page) {
                    tracing::error!(error = %e, "poisoning the page failed");
                }
                return;
            }
        }
    }
}

/// A fault on a local chunk: either the page was installed meanwhile (nothing to do), or the
/// application dropped it (`MADV_DONTNEED`): then the chunk's missing pages are filled from the
/// remote again. Present pages are left alone.
fn repair(shared: &HandlerShared, chunk: u64, off: u64) -> io::Result<()> {
    if !shared.pagemap.is_missing(&shared.memory.mapping, to_usize(off))? {
        return Ok(());
    }
    shared.counters.repairs.fetch_add(1, Ordering::Relaxed);
    let geometry = shared.synced.geometry();
    let bytes = geometry.byte_range(chunk..chunk + 1);
    let mut buf = vec![0u8; to_usize(bytes.end - bytes.start)];
    shared.synced.remote().read_at(&mut buf, bytes.start)?;
    shared.cache.fill(&buf, bytes.start, Some(Fault { off, sequential: false }))
}

//! [`RegionCache`]: the region's memory as the local backend of the chunk pipeline.
//!
//! The mapping *is* the cache: `write_at` installs bytes with `UFFDIO_COPY` (write-protected when
//! writes are tracked, so the application's first write to the page is recorded), and `read_at`
//! copies out of the mapping (what the pusher does for dirty chunks). `UFFDIO_COPY` only fills
//! pages that are missing: a page that is already present (the application may have written it)
//! is never overwritten; it is skipped and counted. That is the right behaviour for the fills
//! the [`Synced`](r3map_core::Synced) layer makes, and the reason why writes of the application
//! must go through the mapping ([`Region::write`](crate::Region::write) or the pointer), never
//! through `Synced::write_at` of a region's pipeline.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use r3map_core::backend::{Backend, check_range, len64};
use r3map_sys::uffd::CopyMode;
use r3map_sys::{AnonMapping, Uffd};

use r3map_core::geometry::to_usize;

thread_local! {
    /// The page offset a fault handler is serving on this thread, if any (see [`with_fault_hint`]).
    static FAULT_HINT: std::cell::Cell<Option<(u64, bool)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a fetch made for a fault at page offset `off`) so that an install of the chunk
/// holding that page starts at the faulting page. With `alone` (a random access), the faulting
/// page is copied by itself first: the faulting thread is woken after one page instead of the
/// whole chunk, and the rest follows while it runs. Without (a sequential walk, which would only
/// fault again on the next page), the run from the faulting page to the end goes in one copy.
pub(crate) fn with_fault_hint<R>(off: u64, alone: bool, f: impl FnOnce() -> R) -> R {
    FAULT_HINT.with(|h| h.set(Some((off, alone))));
    let result = f();
    FAULT_HINT.with(|h| h.set(None));
    result
}

/// The mapping and the userfaultfd that serves it. Fields drop in order: the mapping is unmapped
/// while the descriptor is still open, so no thread ever sees the range fall back to zero-filled
/// pages (which is what closing a descriptor with registered ranges does).
#[derive(Debug)]
pub(crate) struct RegionMemory {
    pub(crate) mapping: AnonMapping,
    pub(crate) uffd: Uffd,
}

/// Counters of the cache.
#[derive(Debug, Default)]
pub(crate) struct CacheCounters {
    pub(crate) copied_bytes: AtomicU64,
    pub(crate) existing_bytes: AtomicU64,
    pub(crate) copies: AtomicU64,
}

/// The region's mapping as a [`Backend`] of the remote's size. See the [module docs](self).
pub struct RegionCache {
    memory: std::sync::Arc<RegionMemory>,
    size: u64,
    page: u64,
    write_protect: bool,
    closed: AtomicBool,
    pub(crate) counters: CacheCounters,
}

impl fmt::Debug for RegionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionCache")
            .field("size", &self.size)
            .field("write_protect", &self.write_protect)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RegionCache {
    pub(crate) fn new(memory: std::sync::Arc<RegionMemory>, size: u64, write_protect: bool) -> Self {
        Self {
            memory,
            size,
            page: r3map_sys::region_map::page_size() as u64,
            write_protect,
            closed: AtomicBool::new(false),
            counters: CacheCounters::default(),
        }
    }

    /// After close, every call fails: the fault handlers are gone, and an access to a missing page
    /// would wait forever.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the region is closed"));
        }
        Ok(())
    }

    /// Installs `buf` at `off` (page-aligned) into missing pages; a short last page is padded with
    /// zeroes (the bytes past the region's size). Returns the bytes left alone because their pages
    /// were present.
    pub(crate) fn install(&self, buf: &[u8], off: u64) -> io::Result<u64> {
        if !off.is_multiple_of(self.page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the region cache installs whole pages; offset {off} is not page-aligned"),
            ));
        }
        let mapping = &self.memory.mapping;
        let end = off + len64(buf);
        let padded_end = end.next_multiple_of(self.page).min(mapping.len() as u64);
        let mode = CopyMode { write_protect: self.write_protect, dont_wake: false };
        let dst = mapping.addr() + off;
        let padded;
        let src = if padded_end == end {
            buf
        } else {
            let mut p = vec![0u8; to_usize(padded_end - off)];
            p[..buf.len()].copy_from_slice(buf);
            padded = p;
            &padded[..]
        };
        let hint = FAULT_HINT.with(std::cell::Cell::get).filter(|&(h, _)| h >= off && h < padded_end);
        let mut existing = 0;
        match hint {
            None => existing += self.copy(dst, src, mode)?,
            Some((h, alone)) => {
                // The faulting page (alone, or with the rest after it), then the rest after it,
                // then the part before it.
                let at = to_usize(h - off);
                let first = if alone { to_usize(self.page) } else { src.len() - at };
                existing += self.copy(dst + (h - off), &src[at..at + first], mode)?;
                if at + first < src.len() {
                    existing += self.copy(dst + (h - off) + first as u64, &src[at + first..], mode)?;
                }
                if at > 0 {
                    existing += self.copy(dst, &src[..at], mode)?;
                }
            }
        }
        Ok(existing)
    }

    fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> io::Result<u64> {
        let report = self.memory.uffd.copy(dst, src, mode)?;
        self.counters.copies.fetch_add(1, Ordering::Relaxed);
        self.counters.copied_bytes.fetch_add(report.copied, Ordering::Relaxed);
        self.counters.existing_bytes.fetch_add(report.existing, Ordering::Relaxed);
        Ok(report.existing)
    }
}

impl Backend for RegionCache {
    fn size(&self) -> u64 {
        self.size
    }

    /// Copies out of the mapping. The pages must be present (the chunk is local), or the read
    /// faults to the region's handlers like any access.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.check_open()?;
        self.memory.mapping.read(to_usize(off), buf)
    }

    /// Installs the bytes into missing pages (see the [module docs](self)); present pages are
    /// left as they are.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.check_open()?;
        if buf.is_empty() {
            return Ok(());
        }
        self.install(buf, off).map(|_| ())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

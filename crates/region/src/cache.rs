//! [`RegionCache`]: the region's memory as the local cache of the chunk pipeline.
//!
//! The mapping *is* the cache, and it keeps the [`Cache`] contract of the
//! [`Synced`](r3map_core::Synced) layer:
//! - [`Cache::fill`] (a chunk pulled from the remote) installs pages with `UFFDIO_COPY`,
//!   write-protected when writes are tracked, so that the application's first write to each is
//!   recorded. `UFFDIO_COPY` fills only missing pages: a page that is present holds bytes newer
//!   than the remote's (the application wrote it after an earlier fill, or after the faulting page
//!   of this very fill was installed and woke it), so it is skipped and counted, never
//!   overwritten. A fill made for a fault installs the faulting page first (see [`Fault`]).
//! - [`Backend::write_at`] (data written through the `Synced` layer: [`Region::write`]) replaces
//!   the bytes, as any backend's write does. Whole pages that are missing are installed with
//!   `UFFDIO_COPY` rather than touched: the `Synced` layer claims a chunk that a write covers
//!   whole without fetching it, and a fault on it would wait for that very claim. Present pages
//!   and the partial pages at either end (whose chunks are local) are copied over.
//! - [`Backend::read_at`] copies out of the mapping (what the pusher does for dirty chunks).
//! - [`Cache::take_written`] reports the pages the write tracking found written through the
//!   mapping (the pointer, the kernel), protecting them again; the pusher collects them before
//!   every cycle.
//!
//! [`Region::write`]: crate::Region::write

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use r3map_core::backend::{Backend, check_range, len64};
use r3map_core::pipeline::{Cache, Fault};
use r3map_sys::uffd::CopyMode;
use r3map_sys::{AnonMapping, Uffd};

use crate::dirty::{Tracker, WriteTracking};
use r3map_core::geometry::to_usize;

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

/// The region's mapping as the [`Cache`] of its pipeline, of the remote's size. See the
/// [module docs](self).
pub struct RegionCache {
    memory: Arc<RegionMemory>,
    tracker: Arc<Tracker>,
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
    pub(crate) fn new(memory: Arc<RegionMemory>, size: u64, tracker: Arc<Tracker>) -> Self {
        Self {
            memory,
            size,
            page: r3map_sys::region_map::page_size() as u64,
            write_protect: tracker.mode() != WriteTracking::Off,
            tracker,
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
    ///
    /// With a `fault` in the range, the install starts at the faulting page. For a random access
    /// the faulting page is copied by itself first: the faulting thread is woken after one page
    /// instead of the whole range, and the rest follows while it runs. For a sequential walk
    /// (which would only fault again on the next page) the run from the faulting page to the end
    /// goes in one copy. The part before the faulting page comes last.
    fn install(&self, buf: &[u8], off: u64, fault: Option<Fault>) -> io::Result<u64> {
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
        let hint = fault
            .map(|f| (f.off - f.off % self.page, !f.sequential))
            .filter(|&(h, _)| h >= off && h < padded_end);
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

    /// Writes the bytes into the mapping, replacing what is there (see the
    /// [module docs](self)). A partial page at either end that is missing faults to the
    /// handlers, which fetch its chunk: never call it from a handler thread.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.check_open()?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = off + len64(buf);
        // `off..start` and `stop..end` are parts of pages; `start..stop` are whole pages, the
        // last one possibly the short page at the end of the region (padded when installed).
        let start = off.next_multiple_of(self.page).min(end);
        let stop = if end == self.size { end } else { end - end % self.page }.max(start);
        let part = |from: u64, to: u64| &buf[to_usize(from - off)..to_usize(to - off)];
        let mapping = &self.memory.mapping;
        if start < stop && self.install(part(start, stop), start, None)? > 0 {
            // Some pages were present: copy over them (the pages just installed get the same
            // bytes again, which no reader can tell apart).
            mapping.write(to_usize(start), part(start, stop))?;
        }
        if off < start {
            mapping.write(to_usize(off), part(off, start))?;
        }
        if stop < end {
            mapping.write(to_usize(stop), part(stop, end))?;
        }
        // Installed pages are write-protected like filled ones, so the tracking did not see
        // this write: a tracking epoch must still report it.
        self.tracker.note_written(off..end);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Cache for RegionCache {
    /// Installs the bytes into the missing pages only (see the [module docs](self)), starting at
    /// the faulting page when there is one.
    fn fill(&self, buf: &[u8], off: u64, fault: Option<Fault>) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.check_open()?;
        if buf.is_empty() {
            return Ok(());
        }
        self.install(buf, off, fault).map(drop)
    }

    /// The pages written through the mapping since the last scan, found by the write tracking.
    fn take_written(&self, written: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        self.tracker.scan(written).map(drop)
    }

    /// Drops the pages of a stale fill, so that the next access faults and fetches the chunk
    /// again. Chunks are whole pages (the region checks it), except the last one, whose short
    /// page is dropped whole.
    fn evict(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size)?;
        self.memory.mapping.discard(to_usize(off), to_usize(len))
    }
}

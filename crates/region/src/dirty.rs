//! Write tracking: which pages of the region the application wrote.
//!
//! Pages are installed write-protected (`UFFDIO_COPY_MODE_WP`). The first write to such a page is
//! recorded, in one of two ways:
//! - [`WriteTracking::Async`] (`UFFD_FEATURE_WP_ASYNC`): the kernel lifts the protection itself,
//!   without waking any handler (about 1 µs), and a `PAGEMAP_SCAN` later returns the written pages
//!   and protects them again in the same walk.
//! - [`WriteTracking::Sync`]: the write faults to a handler thread, which records the page in a
//!   bitmap and lifts the protection (`UFFDIO_WRITEPROTECT`), waking the writer (tens of µs). A
//!   scan takes the recorded bits, clearing each, then protects those pages again.
//!
//! Either way a scan reports each write at least once: a write that lands after its page was
//! reported and before it was protected again is in the reported page, whose data is read only
//! after the scan; a write after the protection is recorded anew for the next scan.
//!
//! A scan hands the written ranges to its caller, inside its critical section: the region's cache
//! reports them to the [`Synced`](r3map_core::Synced) layer, which marks their chunks dirty for
//! the pusher ([`Synced::mark_written`](r3map_core::Synced::mark_written), which waits for a fill
//! in flight: its pages can be written a moment before the chunk is local). While a tracking epoch
//! is on ([`Region::track`](crate::Region::track)) a scan also adds the pages to the epoch's set
//! (what a migration source reports), as does a write through the pipeline
//! (`Tracker::note_written`), whose pages may have been installed rather than written.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use r3map_core::bitmap::AtomicBitmap;
use r3map_sys::PageMap;

use crate::cache::RegionMemory;
use r3map_core::geometry::to_usize;

/// How the region learns which pages the application wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteTracking {
    /// [`Async`](WriteTracking::Async) where the kernel has `WP_ASYNC`, else
    /// [`Sync`](WriteTracking::Sync), else an error at open.
    #[default]
    Auto,
    /// Asynchronous write-protect and `PAGEMAP_SCAN` (Linux 6.7 and later).
    Async,
    /// Write-protect faults served by the handler threads (Linux 5.7 and later).
    Sync,
    /// No tracking: writes through the mapping's pointer are never pushed, and tracking epochs
    /// are unavailable. Writes through [`Region::write`](crate::Region::write) still mark their
    /// chunks dirty.
    Off,
}

pub(crate) struct Tracker {
    mode: WriteTracking,
    memory: Arc<RegionMemory>,
    pagemap: Option<PageMap>,
    page: u64,
    size: u64,
    /// `Sync` mode: pages written since the last scan (set by the handlers).
    pending: AtomicBitmap,
    /// Pages written since `track()`, while `tracking` is on.
    epoch: AtomicBitmap,
    tracking: AtomicBool,
    /// One scan at a time (its buffer).
    scan: Mutex<Vec<Range<usize>>>,
    pub(crate) scans: AtomicU64,
    pub(crate) wp_faults: AtomicU64,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("mode", &self.mode)
            .field("tracking", &self.tracking.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tracker {
    pub(crate) fn new(
        mode: WriteTracking,
        memory: Arc<RegionMemory>,
        size: u64,
        page: u64,
    ) -> io::Result<Self> {
        let pages = size.div_ceil(page);
        let pagemap = if mode == WriteTracking::Async { Some(PageMap::open_self()?) } else { None };
        Ok(Self {
            mode,
            memory,
            pagemap,
            page,
            size,
            pending: AtomicBitmap::new(if mode == WriteTracking::Sync { pages } else { 0 }),
            epoch: AtomicBitmap::new(if mode == WriteTracking::Off { 0 } else { pages }),
            tracking: AtomicBool::new(false),
            scan: Mutex::new(Vec::new()),
            scans: AtomicU64::new(0),
            wp_faults: AtomicU64::new(0),
        })
    }

    pub(crate) fn mode(&self) -> WriteTracking {
        self.mode
    }

    /// `Sync` mode: a handler saw a write-protect fault at `off`: record the page, then lift the
    /// protection (which wakes the writer).
    pub(crate) fn on_wp_fault(&self, off: u64) -> io::Result<()> {
        self.wp_faults.fetch_add(1, Ordering::Relaxed);
        let page = off / self.page;
        if self.mode == WriteTracking::Sync && page < self.pending.len() {
            self.pending.set(page);
        }
        let addr = self.memory.mapping.addr() + page * self.page;
        self.memory.uffd.write_protect(addr, self.page, false, false)
    }

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "write tracking is off for this region")
    }

    /// Records a write that went through the pipeline in the epoch, if one is on (the pages may
    /// have been installed write-protected, which the scans do not see as written).
    pub(crate) fn note_written(&self, bytes: Range<u64>) {
        if !self.tracking.load(Ordering::SeqCst) || bytes.start >= bytes.end {
            return;
        }
        for p in bytes.start / self.page..bytes.end.min(self.size).div_ceil(self.page) {
            self.epoch.set(p);
        }
    }

    /// Collects the pages written since the last scan (protecting them again), calls `mark` with
    /// each written range (before another scan can start) and adds them to the epoch. Returns the
    /// byte ranges.
    pub(crate) fn scan(&self, mark: &mut dyn FnMut(Range<u64>)) -> io::Result<Vec<Range<u64>>> {
        let mut found = self.scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.scan_locked(&mut found, mark)
    }

    fn scan_locked(
        &self,
        found: &mut Vec<Range<usize>>,
        mark: &mut dyn FnMut(Range<u64>),
    ) -> io::Result<Vec<Range<u64>>> {
        found.clear();
        match self.mode {
            WriteTracking::Off => return Ok(Vec::new()),
            WriteTracking::Async => {
                let pagemap = self.pagemap.as_ref().expect("async tracking has a pagemap");
                let mapping = &self.memory.mapping;
                pagemap.scan_written(mapping, 0..mapping.len(), true, found)?;
            }
            WriteTracking::Sync | WriteTracking::Auto => {
                let pages = self.pending.len();
                let mut p = 0;
                while let Some(start) = self.pending.next_set(p, pages) {
                    let mut end = start;
                    while end < pages && self.pending.clear(end) {
                        end += 1;
                    }
                    let addr = self.memory.mapping.addr() + start * self.page;
                    self.memory.uffd.write_protect(addr, (end - start) * self.page, true, false)?;
                    found.push(to_usize(start * self.page)..to_usize(end * self.page));
                    p = end;
                }
            }
        }
        self.scans.fetch_add(1, Ordering::Relaxed);
        let tracking = self.tracking.load(Ordering::SeqCst);
        let mut ranges = Vec::with_capacity(found.len());
        for r in found.iter() {
            let (start, end) = (r.start as u64, (r.end as u64).min(self.size));
            if start >= end {
                continue;
            }
            if tracking {
                for p in start / self.page..end.div_ceil(self.page) {
                    self.epoch.set(p);
                }
            }
            mark(start..end);
            ranges.push(start..end);
        }
        Ok(ranges)
    }

    /// Starts a tracking epoch: writes so far are scanned (and stay dirty for the pusher), the
    /// epoch's set is emptied.
    pub(crate) fn track(&self, mark: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        if self.mode == WriteTracking::Off {
            return Err(Self::unsupported());
        }
        let mut found = self.scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.scan_locked(&mut found, mark)?;
        let pages = self.epoch.len();
        let mut p = 0;
        while let Some(set) = self.epoch.next_set(p, pages) {
            self.epoch.clear(set);
            p = set + 1;
        }
        self.tracking.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// The pages written in the current epoch (after a scan), as byte ranges; with `finish`, the
    /// epoch ends: its pages are cleared and tracking stops, in the same critical section as the
    /// scan, so a concurrent scan cannot slip a page in between.
    pub(crate) fn epoch_ranges(
        &self,
        finish: bool,
        mark: &mut dyn FnMut(Range<u64>),
    ) -> io::Result<Vec<Range<u64>>> {
        self.epoch(if finish { EpochEnd::Finish } else { EpochEnd::Keep }, mark)
    }

    /// The pages written since the epoch began or since the previous call, as byte ranges; they
    /// are cleared and tracking goes on (a round of an iterative pre-copy). They are cleared in the
    /// same critical section as the scan, so a page written meanwhile is in this round or the next.
    pub(crate) fn epoch_take(&self, mark: &mut dyn FnMut(Range<u64>)) -> io::Result<Vec<Range<u64>>> {
        if !self.is_tracking() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no tracking epoch is on"));
        }
        self.epoch(EpochEnd::Restart, mark)
    }

    fn epoch(&self, end: EpochEnd, mark: &mut dyn FnMut(Range<u64>)) -> io::Result<Vec<Range<u64>>> {
        if self.mode == WriteTracking::Off {
            return Err(Self::unsupported());
        }
        let mut found = self.scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.scan_locked(&mut found, mark)?;
        let pages = self.epoch.len();
        let runs: Vec<Range<u64>> = self.epoch.set_runs(0..pages, pages.max(1)).collect();
        if end != EpochEnd::Keep {
            if end == EpochEnd::Finish {
                self.tracking.store(false, Ordering::SeqCst);
            }
            for r in &runs {
                for p in r.clone() {
                    self.epoch.clear(p);
                }
            }
        }
        Ok(runs.into_iter().map(|r| r.start * self.page..(r.end * self.page).min(self.size)).collect())
    }
}

/// What reading an epoch's pages does to the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochEnd {
    /// Nothing: the pages stay.
    Keep,
    /// The pages are cleared and tracking goes on.
    Restart,
    /// The pages are cleared and tracking stops.
    Finish,
}

//! [`Region`]: the userfaultfd frontend.

use std::fmt;
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r3map_core::backend::{Backend, Capabilities, SharedBackend, check_range, len64};
use r3map_core::pipeline::puller::{PullProgress, PullerOptions};
use r3map_core::pipeline::pusher::{PushCycle, PusherOptions};
use r3map_core::pipeline::synced::{SyncedOptions, SyncedStats};
use r3map_core::{Chunk, Managed, ManagedOptions, Puller, Seeder, Synced};
use r3map_sys::uffd::{Features, RegisterMode};
use r3map_sys::{AnonMapping, PageMap, Uffd};

use crate::cache::{RegionCache, RegionMemory};
use crate::dirty::{Tracker, WriteTracking};
use crate::handler::{HandlerShared, Handlers};
use r3map_core::geometry::to_usize;

/// Options of a [`Region`].
#[derive(Debug)]
pub struct RegionOptions {
    /// Bytes per chunk: the unit of fault-around (a fault fills its whole chunk), pulling,
    /// pushing and dirty tracking. A multiple of the page size; default 64 KiB.
    pub chunk_size: u64,
    /// Fault handler threads (each serves one fault at a time); default 2.
    pub handler_threads: usize,
    /// How long a handler keeps polling for the next fault after serving one before it sleeps;
    /// default 50 µs. Zero always sleeps.
    pub spin: Duration,
    /// Background pull of every chunk (in priority order); `None` pulls only what is accessed.
    /// Default: 16 requests of 4 MiB. Not the puller's 16 MiB: a fault on a chunk inside a
    /// request in flight waits for the whole request, and the pull threads run at the lowest
    /// priority while the handlers and the application run at normal priority (a cold read of
    /// 1 GiB ran at 2.3 GB/s with 16 MiB requests and 7.2 GB/s with 4 MiB).
    pub pull: Option<PullerOptions>,
    /// Background write-back: every `interval`, written pages are scanned and their chunks pushed
    /// (a failed cycle is retried with backoff; the remote is flushed by [`Region::sync`] and
    /// [`Region::close`]). `None` pushes only on those two. The depth and request size apply to
    /// every push.
    pub push: Option<PusherOptions>,
    /// How writes are tracked; default [`WriteTracking::Auto`].
    pub tracking: WriteTracking,
    /// Failed fetches of a faulting chunk retried before the page is poisoned (SIGBUS).
    pub fault_retries: u32,
    /// First delay between those retries; it doubles.
    pub fault_backoff: Duration,
    /// Largest remote read of an on-demand pull.
    pub max_request: u64,
    /// Largest readahead of a fault (bytes): faults that walk forward through the region fetch
    /// a window of chunks that doubles up to this; a fault elsewhere fetches its chunk alone.
    /// Default 1 MiB; the chunk size or less turns it off.
    pub readahead: u64,
}

impl Default for RegionOptions {
    fn default() -> Self {
        Self {
            chunk_size: r3map_core::pipeline::synced::DEFAULT_CHUNK_SIZE,
            handler_threads: 2,
            spin: Duration::from_micros(50),
            pull: Some(PullerOptions { request_size: 4 * 1024 * 1024, ..PullerOptions::default() }),
            push: Some(PusherOptions::default()),
            tracking: WriteTracking::Auto,
            fault_retries: 3,
            fault_backoff: Duration::from_millis(10),
            max_request: 4 * 1024 * 1024,
            readahead: 1024 * 1024,
        }
    }
}

/// Why [`Region::open`] failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// No userfaultfd here (kernel, or privilege).
    #[error("userfaultfd is not available: {0}")]
    Unavailable(#[source] io::Error),
    /// The kernel lacks a feature the options need.
    #[error("the kernel's userfaultfd lacks {0}")]
    MissingFeature(String),
    /// The options are inconsistent.
    #[error("invalid region options: {0}")]
    InvalidOptions(String),
    /// Creating the descriptor or its handshake failed.
    #[error("opening userfaultfd with {features:?} failed: {source}")]
    Open { features: Features, source: io::Error },
    /// The mapping could not be made.
    #[error("mapping {len} bytes failed: {source}")]
    Map { len: u64, source: io::Error },
    /// Registering the mapping failed.
    #[error("registering the mapping with userfaultfd failed: {0}")]
    Register(#[source] io::Error),
    /// Setting up the chunk pipeline (or opening the pagemap) failed.
    #[error("setting up the chunk pipeline failed: {0}")]
    Pipeline(#[source] io::Error),
    /// A thread could not be started.
    #[error("starting the region's threads failed: {0}")]
    Spawn(#[source] io::Error),
}

/// Counters of a region, from [`Region::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Missing-page faults served.
    pub missing_faults: u64,
    /// Of those, faults on a chunk that was already local when the handler looked (installed
    /// meanwhile by the puller or another handler, or dropped by the application and repaired).
    pub already_local: u64,
    /// Pages refilled after the application dropped them.
    pub repairs: u64,
    /// Write-protect faults served (synchronous tracking only).
    pub wp_faults: u64,
    /// Faults found while a handler was spinning (no wake-up needed).
    pub spin_hits: u64,
    /// Times a handler went to sleep in epoll.
    pub sleeps: u64,
    /// Failed fetches retried, and pages poisoned after the retries ran out.
    pub fault_retries: u64,
    pub poisoned_pages: u64,
    /// `UFFDIO_COPY` calls, bytes installed, and bytes skipped because their pages were present.
    pub copies: u64,
    pub copied_bytes: u64,
    pub existing_bytes: u64,
    /// Dirty scans run.
    pub scans: u64,
    /// The chunk pipeline's counters.
    pub synced: SyncedStats,
}

/// A memory mapping of a remote backend's size whose pages are filled from the remote on first
/// access (and by a background pull), whose writes are tracked and pushed back. See the
/// [crate docs](crate).
///
/// The chunk pipeline is the managed stack of the other frontends ([`Managed`]) over the
/// [`RegionCache`]: its pusher collects the pages the write tracking found written before every
/// cycle, and it closes in the same order (stop the pull, push, flush the remote).
pub struct Region {
    memory: Arc<RegionMemory>,
    cache: Arc<RegionCache>,
    tracker: Arc<Tracker>,
    /// Until shutdown.
    managed: Option<Managed<RegionCache>>,
    handlers: Option<Handlers>,
    size: u64,
    features: Features,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.memory.mapping.addr()))
            .field("size", &self.size)
            .field("tracking", &self.tracker.mode())
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// What the tracking mode needs, and what it turns into here.
fn resolve_tracking(wanted: WriteTracking, available: Features) -> Result<WriteTracking, RegionError> {
    let wp = available.contains(Features::PAGEFAULT_FLAG_WP);
    let wp_async = wp && available.contains(Features::WP_ASYNC);
    match wanted {
        WriteTracking::Auto if wp_async => Ok(WriteTracking::Async),
        WriteTracking::Auto | WriteTracking::Sync if wp => Ok(WriteTracking::Sync),
        WriteTracking::Async if wp_async => Ok(WriteTracking::Async),
        WriteTracking::Off => Ok(WriteTracking::Off),
        WriteTracking::Async => {
            Err(RegionError::MissingFeature("WP_ASYNC (asynchronous write-protect)".into()))
        }
        _ => Err(RegionError::MissingFeature("PAGEFAULT_FLAG_WP (write-protect faults)".into())),
    }
}

impl Region {
    /// Maps a region of `remote`'s size and starts its fault handlers (and the background pull
    /// and write-back, as the options say).
    ///
    /// # Errors
    /// A [`RegionError`] naming the step that failed; [`RegionError::Unavailable`] where this
    /// machine has no usable userfaultfd.
    pub fn open(remote: SharedBackend, options: RegionOptions) -> Result<Self, RegionError> {
        let page = r3map_sys::region_map::page_size() as u64;
        let size = remote.size();
        if size == 0 {
            return Err(RegionError::InvalidOptions("the remote is empty".into()));
        }
        if options.chunk_size == 0 || !options.chunk_size.is_multiple_of(page) {
            return Err(RegionError::InvalidOptions(format!(
                "the chunk size ({}) must be a positive multiple of the page size ({page})",
                options.chunk_size
            )));
        }
        if options.handler_threads == 0 {
            return Err(RegionError::InvalidOptions("at least one fault handler thread is needed".into()));
        }
        let api = Uffd::probe().map_err(RegionError::Unavailable)?;
        let tracking = resolve_tracking(options.tracking, api.features)?;
        let mut features = api.features.intersection(Features::POISON);
        let mut mode = RegisterMode::MISSING;
        if tracking != WriteTracking::Off {
            features = features | Features::PAGEFAULT_FLAG_WP;
            mode = mode | RegisterMode::WP;
        }
        if tracking == WriteTracking::Async {
            features = features | Features::WP_ASYNC;
        }
        let uffd = Uffd::open(features).map_err(|source| RegionError::Open { features, source })?;
        let mapping =
            AnonMapping::new(to_usize(size)).map_err(|source| RegionError::Map { len: size, source })?;
        uffd.register(&mapping, mode).map_err(RegionError::Register)?;
        let memory = Arc::new(RegionMemory { mapping, uffd });
        let tracker =
            Arc::new(Tracker::new(tracking, Arc::clone(&memory), size, page).map_err(RegionError::Pipeline)?);
        let cache = Arc::new(RegionCache::new(Arc::clone(&memory), size, Arc::clone(&tracker)));
        let managed_options = ManagedOptions {
            synced: SyncedOptions {
                chunk_size: options.chunk_size,
                max_request: options.max_request.max(options.chunk_size),
                on_chunk_local: None,
            },
            pull: options.pull,
            // Always a pusher: without a background cycle it pushes on `sync` and `close`.
            push: Some(
                options.push.unwrap_or(PusherOptions { interval: Duration::MAX, ..PusherOptions::default() }),
            ),
        };
        // The pull starts before the handlers: it only installs pages, and nothing faults before
        // the region is returned.
        let managed = Managed::start_with_cache(remote, Arc::clone(&cache), managed_options)
            .map_err(RegionError::Pipeline)?;
        let synced = Arc::clone(managed.synced());
        let stop_fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| RegionError::Spawn(e.into()))?;
        let handler_shared = Arc::new(HandlerShared {
            memory: Arc::clone(&memory),
            cache: Arc::clone(&cache),
            synced: Arc::clone(&synced),
            tracker: Arc::clone(&tracker),
            pagemap: PageMap::open_self().map_err(RegionError::Pipeline)?,
            page,
            spin: options.spin,
            retries: options.fault_retries,
            backoff: options.fault_backoff,
            can_poison: features.contains(Features::POISON),
            readahead: (options.readahead / options.chunk_size).clamp(1, synced.geometry().chunks()),
            stream: Mutex::new((u64::MAX, 1)),
            stop: std::sync::atomic::AtomicBool::new(false),
            stop_fd,
            counters: crate::handler::HandlerCounters::default(),
        });
        let handlers =
            Handlers::start(handler_shared, options.handler_threads).map_err(RegionError::Spawn)?;
        Ok(Self { memory, cache, tracker, managed: Some(managed), handlers: Some(handlers), size, features })
    }

    fn managed(&self) -> &Managed<RegionCache> {
        self.managed.as_ref().expect("a region's pipeline lives until the region is closed")
    }

    /// What a scan does with the ranges it finds: the pipeline marks their chunks dirty.
    fn mark_written(&self) -> impl FnMut(Range<u64>) + '_ {
        let synced = self.synced();
        move |bytes| synced.mark_written(bytes)
    }

    /// Size in bytes (the remote's).
    #[must_use]
    pub fn len(&self) -> usize {
        to_usize(self.size)
    }

    /// Always false: an empty remote is rejected at open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first byte of the mapping. It is valid for [`Region::len`] bytes while the region
    /// lives. Accessing it is up to the caller: other threads and the kernel change the bytes
    /// at any time (so make no `&[u8]` of it, use volatile or atomic accesses, or the copies of
    /// [`Region::read`] and [`Region::write`]), a first access waits for its chunk to arrive,
    /// and a page whose chunk cannot be fetched raises SIGBUS. The pointer dangles after the
    /// region is closed or dropped.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.mapping.as_ptr()
    }

    /// The userfaultfd features enabled for this region.
    #[must_use]
    pub fn features(&self) -> Features {
        self.features
    }

    /// How writes are tracked here (never [`WriteTracking::Auto`]).
    #[must_use]
    pub fn tracking(&self) -> WriteTracking {
        self.tracker.mode()
    }

    /// The chunk pipeline over the region's memory.
    #[must_use]
    pub fn synced(&self) -> &Arc<Synced<RegionCache>> {
        self.managed().synced()
    }

    #[must_use]
    pub fn puller(&self) -> Option<&Puller<RegionCache>> {
        self.managed().puller()
    }

    /// The background pull's progress, if there is one.
    #[must_use]
    pub fn pull_progress(&self) -> Option<PullProgress> {
        self.puller().map(Puller::progress)
    }

    fn fetch_range(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.synced().fetch(self.synced().geometry().chunks_touched(off, len))
    }

    /// Copies `buf.len()` bytes at `off` out of the region. The chunks are fetched first, so a
    /// failing remote is an error here, never a SIGBUS.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the fetch error.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fetch_range(off, len64(buf))?;
        self.memory.mapping.read(to_usize(off), buf)
    }

    /// Copies `buf` into the region at `off` through the pipeline: a chunk written whole is not
    /// fetched first, one written in part is. Its chunks become dirty and are pushed.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the fetch error.
    pub fn write(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.synced().write_at(buf, off)
    }

    /// Reads one byte (a volatile load; a missing page faults to the handlers like any access).
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn read_u8(&self, off: u64) -> io::Result<u8> {
        check_range(off, 1, self.size)?;
        self.memory.mapping.read_u8(to_usize(off))
    }

    /// Writes one byte (a volatile store; a missing page faults to the handlers like any access).
    /// Tracked like any write through the pointer.
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn write_u8(&self, off: u64, value: u8) -> io::Result<()> {
        check_range(off, 1, self.size)?;
        self.memory.mapping.write_u8(to_usize(off), value)
    }

    /// Writes a native-endian `u64` (volatile stores; faults like any access; tracked like any
    /// write through the pointer).
    ///
    /// # Errors
    /// `InvalidInput` past the end.
    pub fn write_u64(&self, off: u64, value: u64) -> io::Result<()> {
        check_range(off, 8, self.size)?;
        self.memory.mapping.write_u64(to_usize(off), value)
    }

    /// Reads `len` bytes of `file` at `file_off` straight into the region at `off` with one
    /// `pread(2)`: the kernel writes the region, and its accesses to missing pages fault to the
    /// handlers like the application's (the descriptor is not user-mode-only). Returns the bytes
    /// read.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `pread` error.
    pub fn read_from(&self, file: impl AsFd, file_off: u64, off: u64, len: usize) -> io::Result<usize> {
        check_range(off, len as u64, self.size)?;
        self.memory.mapping.pread_from(file.as_fd(), file_off, to_usize(off), len)
    }

    /// Writes `len` bytes of the region at `off` to `file` at `file_off` with one `pwrite(2)` (the
    /// kernel reads the region, faulting missing pages in). Returns the bytes written.
    ///
    /// # Errors
    /// `InvalidInput` past the end; the `pwrite` error.
    pub fn write_to(&self, file: impl AsFd, file_off: u64, off: u64, len: usize) -> io::Result<usize> {
        check_range(off, len as u64, self.size)?;
        self.memory.mapping.pwrite_to(file.as_fd(), file_off, to_usize(off), len)
    }

    /// Waits until every chunk is local: for the background pull, or, without one, by pulling
    /// the rest on this thread.
    ///
    /// # Errors
    /// The error that made the pull give up.
    pub fn wait_pulled(&self) -> io::Result<()> {
        match self.puller() {
            Some(p) => p.wait(),
            None => self.synced().fetch(0..self.synced().geometry().chunks()),
        }
    }

    /// Scans for written pages, pushes every dirty chunk, then flushes the remote.
    ///
    /// # Errors
    /// A failed scan or push (the chunks stay dirty) or remote flush.
    pub fn sync(&self) -> io::Result<PushCycle> {
        let pusher = self.managed().pusher().expect("a region always has a pusher");
        let cycle = pusher.push()?;
        self.synced().remote().flush()?;
        Ok(cycle)
    }

    /// The pages written since the last scan (by anyone: the background write-back scans too),
    /// as byte ranges; their chunks are marked dirty for the pusher. Mostly useful to observe
    /// tracking; a migration uses [`Region::track`] and [`Region::dirty_pages`].
    ///
    /// # Errors
    /// A failed scan.
    pub fn scan(&self) -> io::Result<Vec<Range<u64>>> {
        self.tracker.scan(&mut self.mark_written())
    }

    /// Starts a tracking epoch: from now on, [`Region::dirty_pages`] and
    /// [`Region::dirty_chunks`] report the pages written (by any path). Starting again empties
    /// the set.
    ///
    /// # Errors
    /// `Unsupported` without write tracking; a failed scan.
    pub fn track(&self) -> io::Result<()> {
        self.tracker.track(&mut self.mark_written())
    }

    /// Whether a tracking epoch is on.
    #[must_use]
    pub fn is_tracking(&self) -> bool {
        self.tracker.is_tracking()
    }

    /// The pages written since [`Region::track`], as byte ranges of whole pages (the last one
    /// clipped to the size). Page granularity: 4 KiB.
    ///
    /// # Errors
    /// `Unsupported` without write tracking; a failed scan.
    pub fn dirty_pages(&self) -> io::Result<Vec<Range<u64>>> {
        self.tracker.epoch_ranges(false, &mut self.mark_written())
    }

    /// The chunks written since [`Region::track`], in ascending order.
    ///
    /// # Errors
    /// As [`Region::dirty_pages`].
    pub fn dirty_chunks(&self) -> io::Result<Vec<Chunk>> {
        let pages = self.tracker.epoch_ranges(false, &mut self.mark_written())?;
        Ok(self.pages_to_chunks(&pages))
    }

    fn pages_to_chunks(&self, pages: &[Range<u64>]) -> Vec<Chunk> {
        let geometry = self.synced().geometry();
        let mut chunks: Vec<Chunk> = Vec::new();
        for r in pages {
            for c in geometry.chunks_touched(r.start, r.end - r.start) {
                if chunks.last() != Some(&Chunk(c)) {
                    chunks.push(Chunk(c));
                }
            }
        }
        chunks
    }

    /// Drops the local copy of `chunks` (their pages are discarded, local writes to them not
    /// yet pushed are lost) so that the next access fetches them from the remote again; the
    /// background pull, if any, fetches them again first. What a migration destination does
    /// with the chunks the source reports dirty.
    ///
    /// # Errors
    /// `InvalidInput` for chunks past the end; the `madvise` error.
    pub fn invalidate(&self, chunks: Range<u64>) -> io::Result<()> {
        let geometry = self.synced().geometry();
        if chunks.end > geometry.chunks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunks {chunks:?} are beyond the end ({} chunks)", geometry.chunks()),
            ));
        }
        let bytes = geometry.byte_range(chunks.clone());
        let start = to_usize(bytes.start);
        let end = to_usize(bytes.end).next_multiple_of(r3map_sys::region_map::page_size());
        let end = end.min(self.memory.mapping.len());
        self.memory.mapping.discard(start, end - start)?;
        self.synced().mark_remote(chunks.clone().map(Chunk));
        if let Some(p) = self.puller() {
            p.prioritize(chunks.map(Chunk));
        }
        Ok(())
    }

    /// Counters of the handlers, the cache and the pipeline.
    #[must_use]
    pub fn stats(&self) -> RegionStats {
        let mut s = RegionStats { synced: self.synced().stats(), ..RegionStats::default() };
        if let Some(h) = &self.handlers {
            let c = &h.shared.counters;
            s.missing_faults = c.missing_faults.load(Ordering::Relaxed);
            s.already_local = c.already_local.load(Ordering::Relaxed);
            s.repairs = c.repairs.load(Ordering::Relaxed);
            s.wp_faults = c.wp_faults.load(Ordering::Relaxed);
            s.spin_hits = c.spin_hits.load(Ordering::Relaxed);
            s.sleeps = c.sleeps.load(Ordering::Relaxed);
            s.fault_retries = c.retries.load(Ordering::Relaxed);
            s.poisoned_pages = c.poisoned_pages.load(Ordering::Relaxed);
        }
        let cc = &self.cache.counters;
        s.copies = cc.copies.load(Ordering::Relaxed);
        s.copied_bytes = cc.copied_bytes.load(Ordering::Relaxed);
        s.existing_bytes = cc.existing_bytes.load(Ordering::Relaxed);
        s.scans = self.tracker.scans.load(Ordering::Relaxed);
        s
    }

    /// Pushes what was written, then shuts down: background threads stop, the handlers stop
    /// after the last push (which may still need them), and the mapping is unmapped.
    ///
    /// # Errors
    /// The final push or remote flush failed: the data written locally is lost with the mapping.
    pub fn close(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        // The managed stack's order: the pull stops (requests in flight complete first), the
        // written pages are collected and pushed, the remote is flushed. The push reads present
        // pages only, but a page the application dropped would fault: the handlers stop after it.
        let result = self.managed.take().map_or(Ok(()), Managed::close);
        if let Some(mut h) = self.handlers.take() {
            h.stop();
        }
        self.cache.close();
        result
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.handlers.is_some()
            && let Err(e) = self.shutdown()
        {
            tracing::error!(error = %e, "the region's final push failed; its local writes are lost");
        }
    }
}

/// The region as a backend: reads and writes are [`Region::read`] and [`Region::write`] (chunks
/// fetched first, errors returned), `flush` is [`Region::sync`]. What a migration source serves.
impl Backend for Region {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read(off, buf)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write(off, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync().map(|_| ())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// A region as the source of a migration: [`Seeder::track`] starts an epoch, [`Seeder::sync`]
/// returns the chunks written since (by any path: pointer, kernel, [`Region::write`]) and ends
/// it, and [`Seeder::take_dirty`] returns those written since the previous round and goes on. (Not to be confused with [`Region::sync`], the write-back.)
impl Seeder for Region {
    fn chunk_size(&self) -> u64 {
        self.synced().geometry().chunk_size()
    }

    fn track(&self) -> io::Result<()> {
        Region::track(self)
    }

    fn sync(&self) -> io::Result<Vec<Chunk>> {
        let pages = self.tracker.epoch_ranges(true, &mut self.mark_written())?;
        Ok(self.pages_to_chunks(&pages))
    }

    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        let pages = self.tracker.epoch_take(&mut self.mark_written())?;
        Ok(self.pages_to_chunks(&pages))
    }
}

//! [`Synced`]: lazy copy-on-read of a remote backend into a local one.
//!
//! Every chunk is in one of these states, kept in three atomic bitmaps (three bits per chunk):
//!
//! ```text
//!            claim (busy)            fill ok (local)
//!   remote ───────────────► pulling ────────────────► local ──write──► local + dirty
//!     ▲                        │ fill failed              ▲                  │
//!     │                        └──────────► remote        └──── push ok ─────┘
//!     └──────────── mark_remote (from any state) ──────────────────────────┘
//! ```
//!
//! - A read makes the chunks it touches local first: it claims the `busy` bit of each missing
//!   chunk it is the first to want, fetches runs of claimed chunks with one ranged remote read
//!   each, fills them into the local backend ([`Cache::fill`]), and only then sets `local`. Readers that find a chunk
//!   already being pulled wait for that pull instead of starting another: concurrent readers of a
//!   missing chunk cause one pull. A failed pull leaves the chunk remote and the error goes to the
//!   reader; nothing is ever presented as data that was not fetched.
//! - A write that covers a missing chunk completely needs nothing from the remote: the chunk is
//!   claimed, written locally and becomes local. A write that covers part of a missing chunk pulls
//!   it first. Writes reach the local backend as [`Backend::write_at`], fills as [`Cache::fill`]:
//!   a cache may tell them apart (see [`Cache`]). Every completed write sets `dirty` after its
//!   data is in the local backend, which is what the [`Pusher`](super::Pusher) relies on.
//! - [`Synced::mark_remote`] invalidates chunks (the remote has newer data). A pull in flight for
//!   such a chunk is discarded when it lands, so a stale fill never becomes local.
//!
//! Waiting uses a small striped table of mutexes and condition variables, so the metadata is three
//! bits per chunk plus a constant: a 1 TiB resource in 64 KiB chunks needs 6 MiB.
//!
//! `mark_remote` is meant for a quiescent resource (the migration destination is locked while it
//! runs): a write racing with the invalidation of its own chunk may be discarded.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::cache::{Cache, Fault};
use crate::backend::{Backend, Capabilities, SharedBackend, check_range, len64};
use crate::bitmap::AtomicBitmap;
use crate::geometry::{Chunk, Geometry, to_usize};

/// Default chunk size of the pipeline (see DESIGN.md for the measurement behind it).
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;
/// Default largest remote read for on-demand pulls.
pub const DEFAULT_MAX_REQUEST: u64 = 4 * 1024 * 1024;

const STRIPES: usize = 256;

/// Called with each chunk that becomes local (pulled, or written whole before it was pulled).
pub type ChunkHook = Arc<dyn Fn(Chunk) + Send + Sync>;

/// Options of a [`Synced`] layer.
#[derive(Clone)]
pub struct SyncedOptions {
    /// Bytes per chunk: the unit of pulling, pushing and state.
    pub chunk_size: u64,
    /// Largest remote read an on-demand pull sends (adjacent missing chunks are merged up to it).
    pub max_request: u64,
    /// Called after a chunk becomes local.
    pub on_chunk_local: Option<ChunkHook>,
}

impl Default for SyncedOptions {
    fn default() -> Self {
        Self { chunk_size: DEFAULT_CHUNK_SIZE, max_request: DEFAULT_MAX_REQUEST, on_chunk_local: None }
    }
}

impl fmt::Debug for SyncedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncedOptions")
            .field("chunk_size", &self.chunk_size)
            .field("max_request", &self.max_request)
            .field("on_chunk_local", &self.on_chunk_local.is_some())
            .finish()
    }
}

/// Counters of a [`Synced`] layer, read with [`Synced::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncedStats {
    pub chunks: u64,
    pub local_chunks: u64,
    pub dirty_chunks: u64,
    /// Chunks fetched from the remote (on demand and in the background).
    pub pulled_chunks: u64,
    pub pulled_bytes: u64,
    /// Remote reads sent (each may carry several chunks).
    pub pull_requests: u64,
    pub pushed_chunks: u64,
    pub pushed_bytes: u64,
    /// Remote writes sent by pushes.
    pub push_requests: u64,
    /// Times an access found a chunk that someone else was pulling (or writing whole) and waited
    /// for them rather than send a request of its own.
    pub waits: u64,
    /// Bytes of per-chunk metadata (bitmaps and the wait table).
    pub metadata_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    local: AtomicU64,
    pulled_chunks: AtomicU64,
    pulled_bytes: AtomicU64,
    pull_requests: AtomicU64,
    pushed_chunks: AtomicU64,
    pushed_bytes: AtomicU64,
    push_requests: AtomicU64,
    waits: AtomicU64,
}

/// Where waiters sleep, and which in-flight fills were invalidated. One per group of chunks.
#[derive(Debug, Default)]
struct Stripe {
    stale: Mutex<HashSet<u64>>,
    cv: Condvar,
}

/// A caller's buffer that a pull may fill directly, skipping a copy.
struct Target<'a> {
    buf: &'a mut [u8],
    off: u64,
}

/// Lazy copy-on-read of `remote` into `local`, with per-chunk state. See the module docs.
///
/// The local backend is any [`Cache`]: by default a [`SharedBackend`] ([`Synced::new`]), or a
/// cache type of its own ([`Synced::with_cache`]).
pub struct Synced<L: Cache + ?Sized = dyn Backend> {
    remote: SharedBackend,
    local: Arc<L>,
    geometry: Geometry,
    max_request_chunks: u64,
    local_bits: AtomicBitmap,
    busy: AtomicBitmap,
    dirty: AtomicBitmap,
    stripes: Box<[Stripe]>,
    counters: Counters,
    on_chunk_local: Option<ChunkHook>,
}

impl<L: Cache + ?Sized> fmt::Debug for Synced<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Synced").field("geometry", &self.geometry).field("stats", &self.stats()).finish()
    }
}

impl Synced {
    /// Everything starts remote. Chunks are filled into `local` with `write_at`.
    ///
    /// # Errors
    /// `InvalidInput` when the local backend is smaller than the remote or an option is zero.
    pub fn new(remote: SharedBackend, local: SharedBackend, options: SyncedOptions) -> io::Result<Self> {
        Self::with_cache(remote, local, options)
    }
}

impl<L: Cache + ?Sized> Synced<L> {
    /// As [`Synced::new`], over a cache of its own type (one that fills differently from how it
    /// writes, or learns of writes behind the layer's back).
    ///
    /// # Errors
    /// As [`Synced::new`].
    pub fn with_cache(remote: SharedBackend, local: Arc<L>, options: SyncedOptions) -> io::Result<Self> {
        let size = remote.size();
        if local.size() < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the local backend ({} bytes) is smaller than the remote ({size} bytes)",
                    local.size()
                ),
            ));
        }
        if options.max_request < options.chunk_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the largest request ({} bytes) must hold at least one chunk ({} bytes)",
                    options.max_request, options.chunk_size
                ),
            ));
        }
        let geometry = Geometry::new(size, options.chunk_size)?;
        let chunks = geometry.chunks();
        Ok(Self {
            remote,
            local,
            geometry,
            max_request_chunks: options.max_request / options.chunk_size,
            local_bits: AtomicBitmap::new(chunks),
            busy: AtomicBitmap::new(chunks),
            dirty: AtomicBitmap::new(chunks),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            counters: Counters::default(),
            on_chunk_local: options.on_chunk_local,
        })
    }

    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    #[must_use]
    pub fn remote(&self) -> &SharedBackend {
        &self.remote
    }

    #[must_use]
    pub fn local(&self) -> &Arc<L> {
        &self.local
    }

    #[must_use]
    pub fn is_local(&self, chunk: Chunk) -> bool {
        self.local_bits.get(chunk.0)
    }

    #[must_use]
    pub fn is_dirty(&self, chunk: Chunk) -> bool {
        self.dirty.get(chunk.0)
    }

    /// Number of local chunks (a counter, no bitmap scan).
    #[must_use]
    pub fn local_chunks(&self) -> u64 {
        self.counters.local.load(Ordering::Acquire)
    }

    /// Whether every chunk is local.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.local_chunks() == self.geometry.chunks()
    }

    /// Whether someone is pulling `chunk` (or writing it whole) right now.
    #[must_use]
    pub fn is_busy(&self, chunk: Chunk) -> bool {
        self.busy.get(chunk.0)
    }

    /// The first chunk at or after `from` (and before `end`) that is not local.
    #[must_use]
    pub fn next_remote(&self, from: u64, end: u64) -> Option<Chunk> {
        self.local_bits.next_clear(from, end).map(Chunk)
    }

    #[must_use]
    pub fn stats(&self) -> SyncedStats {
        let c = &self.counters;
        let bitmaps = self.local_bits.heap_bytes() + self.busy.heap_bytes() + self.dirty.heap_bytes();
        let stripes = std::mem::size_of_val(&*self.stripes);
        SyncedStats {
            chunks: self.geometry.chunks(),
            local_chunks: c.local.load(Ordering::Relaxed),
            dirty_chunks: self.dirty.count_ones(),
            pulled_chunks: c.pulled_chunks.load(Ordering::Relaxed),
            pulled_bytes: c.pulled_bytes.load(Ordering::Relaxed),
            pull_requests: c.pull_requests.load(Ordering::Relaxed),
            pushed_chunks: c.pushed_chunks.load(Ordering::Relaxed),
            pushed_bytes: c.pushed_bytes.load(Ordering::Relaxed),
            push_requests: c.push_requests.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            metadata_bytes: (bitmaps + stripes) as u64,
        }
    }

    /// Declares chunks local without pulling them (the local backend already holds their data,
    /// for example a cache file kept from an earlier run).
    pub fn assume_local(&self, chunks: Range<u64>) {
        for c in chunks.start..chunks.end.min(self.geometry.chunks()) {
            if !self.local_bits.set(c) {
                self.counters.local.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Invalidates chunks: they become remote (and not dirty) and are pulled again on next access.
    /// A pull of one of them that is in flight is discarded when it lands.
    pub fn mark_remote(&self, chunks: impl IntoIterator<Item = Chunk>) {
        for Chunk(c) in chunks {
            if c >= self.geometry.chunks() {
                continue;
            }
            let stripe = self.stripe(c);
            let mut stale = stripe.stale.lock().expect("synced stripe lock");
            if self.busy.get(c) {
                stale.insert(c);
            }
            if self.local_bits.clear(c) {
                self.counters.local.fetch_sub(1, Ordering::AcqRel);
            }
            self.dirty.clear(c);
        }
    }

    /// Makes every chunk of `chunks` local: pulls the missing ones (adjacent ones merged into
    /// ranged reads of up to the on-demand request size) and waits for those someone else is
    /// pulling. Returns once all of them are local. Frontends that serve the local backend
    /// themselves (a userfaultfd region) call it before they let an access proceed.
    ///
    /// # Errors
    /// `InvalidInput` for chunks past the end; the first failed remote read or local write (the
    /// chunks of that request stay remote).
    pub fn fetch(&self, chunks: Range<u64>) -> io::Result<()> {
        self.check_chunks(&chunks)?;
        if chunks.is_empty() {
            return Ok(());
        }
        self.ensure_local(chunks, None, None, &mut Vec::new())
    }

    /// As [`Synced::fetch`], for an access that waits at `fault` (a page fault): the fill of the
    /// run that holds it passes it to [`Cache::fill`], so that the cache can let the access go on
    /// before the rest of the run is in.
    ///
    /// # Errors
    /// As [`Synced::fetch`].
    pub fn fetch_for(&self, chunks: Range<u64>, fault: Fault) -> io::Result<()> {
        self.check_chunks(&chunks)?;
        if chunks.is_empty() {
            return Ok(());
        }
        self.ensure_local(chunks, None, Some(fault), &mut Vec::new())
    }

    fn check_chunks(&self, chunks: &Range<u64>) -> io::Result<()> {
        if chunks.end > self.geometry.chunks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunks {}..{} are beyond the end ({} chunks)",
                    chunks.start,
                    chunks.end,
                    self.geometry.chunks()
                ),
            ));
        }
        Ok(())
    }

    /// Marks local chunks dirty: their data changed in the local backend by a path that did not
    /// go through this layer (a frontend that writes the local storage directly and learns of
    /// the writes afterwards, like a write-protect scan). Call it after the data is in place, as
    /// [`Backend::write_at`] does. Chunks that are not local are skipped: they have no local
    /// data to push.
    pub fn mark_dirty(&self, chunks: impl IntoIterator<Item = Chunk>) {
        for Chunk(c) in chunks {
            if c < self.geometry.chunks() && self.local_bits.get(c) {
                self.dirty.set(c);
            }
        }
    }

    /// As [`Synced::mark_dirty`] for the chunks that the bytes `bytes` touch, waiting first for
    /// a fill in flight of any of them: a cache that lets an access go on before its fill is
    /// complete (a mapping) may be written a moment before the chunk is marked local, and the
    /// write must not be skipped.
    pub fn mark_written(&self, bytes: Range<u64>) {
        let end = bytes.end.min(self.geometry.size());
        if bytes.start >= end {
            return;
        }
        for c in self.geometry.chunks_touched(bytes.start, end - bytes.start) {
            if self.busy.get(c) {
                self.wait_not_busy(c);
            }
            if self.local_bits.get(c) {
                self.dirty.set(c);
            }
            // Otherwise the chunk was invalidated: its local data is gone, and the write with it.
        }
    }

    /// Marks dirty what the local cache reports written behind this layer's back
    /// ([`Cache::take_written`]); the [`Pusher`](super::Pusher) calls it before every cycle.
    ///
    /// # Errors
    /// The cache's error finding the written ranges.
    pub fn collect_written(&self) -> io::Result<()> {
        self.local.take_written(&mut |bytes| self.mark_written(bytes))
    }

    /// Pulls the chunks of `chunks` that are neither local nor being pulled by someone else,
    /// with ranged reads of at most `max_chunks` chunks each. Used by the background
    /// [`Puller`](super::Puller); returns the number of chunks and bytes pulled.
    ///
    /// # Errors
    /// The first failed remote read or local write; the chunks of that request stay remote.
    pub fn pull(&self, chunks: Range<u64>, max_chunks: u64, scratch: &mut Vec<u8>) -> io::Result<(u64, u64)> {
        self.pull_runs(std::slice::from_ref(&chunks), max_chunks, scratch)
    }

    /// As [`Synced::pull`] for several runs of chunks (scattered chunks a migration round found
    /// dirty): the chunks to pull are gathered into batches of at most `max_chunks`, and each
    /// batch is one [`Backend::read_many`] of the remote with a read per run of adjacent chunks,
    /// so a network remote fetches the batch in one round trip.
    ///
    /// # Errors
    /// The first failed batch; its chunks stay remote, and the batches after it are not sent.
    pub fn pull_runs(
        &self,
        runs: &[Range<u64>],
        max_chunks: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<(u64, u64)> {
        let max = max_chunks.max(1);
        let chunks = self.geometry.chunks();
        let mut batch: Vec<Range<u64>> = Vec::new();
        let mut in_batch = 0;
        let mut pulled = (0, 0);
        let mut send = |batch: &mut Vec<Range<u64>>, in_batch: &mut u64| -> io::Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            self.fill_many(batch, scratch)?;
            pulled.0 += *in_batch;
            pulled.1 += batch
                .iter()
                .map(|r| self.geometry.byte_range(r.clone()))
                .map(|b| b.end - b.start)
                .sum::<u64>();
            batch.clear();
            *in_batch = 0;
            Ok(())
        };
        for run in runs {
            let end = run.end.min(chunks);
            let mut c = run.start;
            while c < end {
                let Some(Chunk(start)) = self.next_remote(c, end) else {
                    break;
                };
                let mut stop = start;
                while stop < end && in_batch + (stop - start) < max && self.try_claim(stop) {
                    stop += 1;
                }
                if stop == start {
                    // Someone else is pulling it; they will finish it.
                    c = start + 1;
                    continue;
                }
                batch.push(start..stop);
                in_batch += stop - start;
                c = stop;
                if in_batch >= max {
                    send(&mut batch, &mut in_batch)?;
                }
            }
        }
        send(&mut batch, &mut in_batch)?;
        Ok(pulled)
    }

    /// Claims chunk `c` for filling; false when it is local or someone else holds it.
    fn try_claim(&self, c: u64) -> bool {
        if self.local_bits.get(c) || self.busy.set(c) {
            return false;
        }
        if self.local_bits.get(c) {
            // Became local between the check and the claim.
            self.release(c, false);
            return false;
        }
        true
    }

    fn stripe(&self, c: u64) -> &Stripe {
        &self.stripes[to_usize(c) % STRIPES]
    }

    /// Ends a claim; `filled` says whether the local backend now holds the chunk's data. Returns
    /// whether the chunk became local.
    fn release(&self, c: u64, filled: bool) -> bool {
        let stripe = self.stripe(c);
        let mut stale = stripe.stale.lock().expect("synced stripe lock");
        let was_invalidated = stale.remove(&c);
        if filled && was_invalidated {
            // Still claimed: nobody fills the chunk again before its old bytes are gone.
            let bytes = self.geometry.byte_range(c..c + 1);
            if let Err(e) = self.local.evict(bytes.start, bytes.end - bytes.start) {
                tracing::warn!(chunk = c, error = %e, "dropping a stale fill failed");
            }
        }
        let became_local = filled && !was_invalidated && !self.local_bits.set(c);
        if became_local {
            self.counters.local.fetch_add(1, Ordering::AcqRel);
        }
        self.busy.clear(c);
        drop(stale);
        stripe.cv.notify_all();
        became_local
    }

    fn wait_not_busy(&self, c: u64) {
        let stripe = self.stripe(c);
        let mut guard = stripe.stale.lock().expect("synced stripe lock");
        if self.busy.get(c) {
            self.counters.waits.fetch_add(1, Ordering::Relaxed);
        }
        while self.busy.get(c) {
            guard = stripe.cv.wait(guard).expect("synced stripe lock");
        }
    }

    fn notify_local(&self, chunks: impl Iterator<Item = u64>) {
        if let Some(hook) = &self.on_chunk_local {
            for c in chunks {
                hook(Chunk(c));
            }
        }
    }

    /// Fetches the claimed run `run` from the remote and fills it into the local cache (passing
    /// `fault` on if it lies in the run), then releases it. Returns whether the data went straight
    /// into `target`.
    fn fill(
        &self,
        run: Range<u64>,
        target: Option<&mut Target<'_>>,
        fault: Option<Fault>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let bytes = self.geometry.byte_range(run.clone());
        let fault = fault.filter(|f| bytes.contains(&f.off));
        let len = to_usize(bytes.end - bytes.start);
        let (buf, direct): (&mut [u8], bool) = match target {
            Some(t) if bytes.start >= t.off && bytes.end <= t.off + len64(t.buf) => {
                let start = to_usize(bytes.start - t.off);
                (&mut t.buf[start..start + len], true)
            }
            _ => {
                scratch.resize(len, 0);
                (&mut scratch[..len], false)
            }
        };
        let result =
            self.remote.read_at(buf, bytes.start).and_then(|()| self.local.fill(buf, bytes.start, fault));
        self.counters.pull_requests.fetch_add(1, Ordering::Relaxed);
        let ok = result.is_ok();
        let mut became = Vec::new();
        for c in run.clone() {
            if self.release(c, ok) {
                became.push(c);
            }
        }
        if let Err(e) = result {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "pulling chunks {}..{} (bytes {}..{}) failed: {e}",
                    run.start, run.end, bytes.start, bytes.end
                ),
            ));
        }
        self.counters.pulled_chunks.fetch_add(run.end - run.start, Ordering::Relaxed);
        self.counters.pulled_bytes.fetch_add(bytes.end - bytes.start, Ordering::Relaxed);
        self.notify_local(became.into_iter());
        Ok(direct)
    }

    /// Fetches the claimed runs `runs` from the remote with one [`Backend::read_many`], stores
    /// them locally, then releases them.
    fn fill_many(&self, runs: &[Range<u64>], scratch: &mut Vec<u8>) -> io::Result<()> {
        if let [run] = runs {
            return self.fill(run.clone(), None, None, scratch).map(drop);
        }
        let bytes: Vec<Range<u64>> = runs.iter().map(|r| self.geometry.byte_range(r.clone())).collect();
        let total = bytes.iter().map(|b| to_usize(b.end - b.start)).sum();
        scratch.resize(total, 0);
        let mut reads = Vec::with_capacity(runs.len());
        let mut rest = &mut scratch[..total];
        for b in &bytes {
            let (head, tail) = rest.split_at_mut(to_usize(b.end - b.start));
            reads.push((b.start, head));
            rest = tail;
        }
        let mut result = self.remote.read_many(&mut reads);
        self.counters.pull_requests.fetch_add(runs.len() as u64, Ordering::Relaxed);
        let mut written = vec![false; runs.len()];
        if result.is_ok() {
            for (i, (off, buf)) in reads.iter().enumerate() {
                match self.local.fill(buf, *off, None) {
                    Ok(()) => written[i] = true,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        let mut became = Vec::new();
        for (run, &ok) in runs.iter().zip(&written) {
            for c in run.clone() {
                if self.release(c, ok) {
                    became.push(c);
                }
            }
        }
        let filled: Vec<&Range<u64>> =
            runs.iter().zip(&written).filter(|(_, ok)| **ok).map(|(r, _)| r).collect();
        self.counters
            .pulled_chunks
            .fetch_add(filled.iter().map(|r| r.end - r.start).sum(), Ordering::Relaxed);
        self.counters.pulled_bytes.fetch_add(
            filled.iter().map(|r| self.geometry.byte_range((*r).clone())).map(|b| b.end - b.start).sum(),
            Ordering::Relaxed,
        );
        self.notify_local(became.into_iter());
        result.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "pulling {} runs of chunks from {}..{} to {}..{} failed: {e}",
                    runs.len(),
                    runs[0].start,
                    runs[0].end,
                    runs[runs.len() - 1].start,
                    runs[runs.len() - 1].end
                ),
            )
        })
    }

    /// Makes every chunk of `chunks` local, pulling what is missing and waiting for pulls by
    /// others; `fault` goes to the fill that holds it. Runs filled straight into `target` are
    /// appended to `direct`.
    fn ensure_local(
        &self,
        chunks: Range<u64>,
        mut target: Option<Target<'_>>,
        fault: Option<Fault>,
        direct: &mut Vec<Range<u64>>,
    ) -> io::Result<()> {
        let mut scratch = Vec::new();
        loop {
            let mut waiting_on = None;
            let mut c = chunks.start;
            while c < chunks.end {
                if self.local_bits.get(c) {
                    c += 1;
                    continue;
                }
                let start = c;
                while c < chunks.end && c - start < self.max_request_chunks && self.try_claim(c) {
                    c += 1;
                }
                if c == start {
                    if !self.local_bits.get(c) {
                        waiting_on.get_or_insert(c);
                    }
                    c += 1;
                    continue;
                }
                if self.fill(start..c, target.as_mut(), fault, &mut scratch)? {
                    direct.push(start..c);
                }
            }
            match waiting_on {
                Some(w) => self.wait_not_busy(w),
                None if (chunks.start..chunks.end).all(|c| self.local_bits.get(c)) => return Ok(()),
                // A chunk we filled was invalidated meanwhile: go round again.
                None => {}
            }
        }
    }

    /// Runs `op` (which changes `off..off + len` in the local backend) with the chunks it touches
    /// made local or claimed, then marks them dirty.
    fn modify(&self, off: u64, len: u64, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        check_range(off, len, self.geometry.size())?;
        if len == 0 {
            return Ok(());
        }
        let touched = self.geometry.chunks_touched(off, len);
        let mut owned = Vec::new();
        // Claims are taken in ascending chunk order and never waited for by readers or pulls while
        // held, so two writers cannot wait on each other.
        for c in touched.clone() {
            let chunk_bytes = self.geometry.byte_range(c..c + 1);
            let whole = off <= chunk_bytes.start && off + len >= chunk_bytes.end;
            loop {
                if self.local_bits.get(c) {
                    break;
                }
                if !whole {
                    if let Err(e) = self.ensure_local(c..c + 1, None, None, &mut Vec::new()) {
                        self.abandon(&owned);
                        return Err(e);
                    }
                    continue;
                }
                if self.try_claim(c) {
                    owned.push(c);
                    break;
                }
                if !self.local_bits.get(c) {
                    self.wait_not_busy(c);
                }
            }
        }
        let result = op();
        let ok = result.is_ok();
        let became: Vec<u64> = owned.iter().copied().filter(|&c| self.release(c, ok)).collect();
        result?;
        for c in touched {
            self.dirty.set(c);
        }
        self.notify_local(became.into_iter());
        Ok(())
    }

    fn abandon(&self, owned: &[u64]) {
        for &c in owned {
            self.release(c, false);
        }
    }

    /// Reads local bytes of `off..off + buf.len()` that fall in `chunks`.
    fn read_local(&self, buf: &mut [u8], off: u64, chunks: Range<u64>) -> io::Result<()> {
        let bytes = self.geometry.byte_range(chunks);
        let start = bytes.start.max(off);
        let end = bytes.end.min(off + len64(buf));
        if start >= end {
            return Ok(());
        }
        let dst = &mut buf[to_usize(start - off)..to_usize(end - off)];
        self.local.read_at(dst, start)
    }

    /// Writes the local copy of the dirty chunks in `run` to the remote. Dirty bits are cleared
    /// before the local read, so a write that lands meanwhile sets them again and is pushed next
    /// time; on failure they are set again. Only one push may run at a time (the pusher holds a
    /// lock), or an older copy could overtake a newer one at the remote.
    pub(crate) fn push_run(&self, run: Range<u64>, scratch: &mut Vec<u8>) -> io::Result<u64> {
        let mut pushed = 0;
        let mut c = run.start;
        while c < run.end {
            // Push only local chunks; a dirty bit on a remote chunk is a write that raced with
            // mark_remote and was discarded.
            if !self.local_bits.get(c) {
                self.dirty.clear(c);
                c += 1;
                continue;
            }
            let start = c;
            while c < run.end && self.local_bits.get(c) {
                self.dirty.clear(c);
                c += 1;
            }
            let bytes = self.geometry.byte_range(start..c);
            let len = to_usize(bytes.end - bytes.start);
            scratch.resize(len, 0);
            let buf = &mut scratch[..len];
            let result =
                self.local.read_at(buf, bytes.start).and_then(|()| self.remote.write_at(buf, bytes.start));
            self.counters.push_requests.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = result {
                for d in start..c {
                    self.dirty.set(d);
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("pushing chunks {start}..{c} (bytes {}..{}) failed: {e}", bytes.start, bytes.end),
                ));
            }
            self.counters.pushed_chunks.fetch_add(c - start, Ordering::Relaxed);
            self.counters.pushed_bytes.fetch_add(bytes.end - bytes.start, Ordering::Relaxed);
            pushed += c - start;
        }
        Ok(pushed)
    }

    /// Runs of dirty chunks, each at most `max_chunks` long.
    pub(crate) fn dirty_runs(&self, max_chunks: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        self.dirty.set_runs(0..self.geometry.chunks(), max_chunks)
    }
}

impl<L: Cache + ?Sized> Backend for Synced<L> {
    fn size(&self) -> u64 {
        self.geometry.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.geometry.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let touched = self.geometry.chunks_touched(off, len64(buf));
        let mut direct = Vec::new();
        self.ensure_local(touched.clone(), Some(Target { buf: &mut *buf, off }), None, &mut direct)?;
        // Read what was not filled straight into the buffer from the local backend.
        direct.sort_by_key(|r| r.start);
        let mut next = touched.start;
        for run in direct {
            self.read_local(buf, off, next..run.start)?;
            next = run.end;
        }
        self.read_local(buf, off, next..touched.end)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.modify(off, len64(buf), || self.local.write_at(buf, off))
    }

    /// Flushes the local backend. Pushing to the remote is the [`Pusher`](super::Pusher)'s job.
    fn flush(&self) -> io::Result<()> {
        self.local.flush()
    }

    fn capabilities(&self) -> Capabilities {
        let local = self.local.capabilities();
        Capabilities { trim: local.trim, write_zeroes: local.write_zeroes, extents: false, read_only: false }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.modify(off, len, || self.local.trim(off, len))
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.modify(off, len, || self.local.write_zeroes(off, len))
    }
}

#[cfg(test)]
// Test sizes are a few MiB: `u64 as usize` cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backends::Memory;
    use crate::conformance;
    use crate::pipeline::testutil::{Probe, Recorder, Stored, contents, pattern, wait_until};

    const CS: u64 = 64 * 1024;

    fn options(chunk_size: u64) -> SyncedOptions {
        SyncedOptions { chunk_size, ..SyncedOptions::default() }
    }

    fn stack(remote: &Arc<Probe>) -> Synced {
        let local = Arc::new(Memory::new(remote.size()));
        Synced::new(remote.clone(), local, options(CS)).unwrap()
    }

    #[test]
    fn conformance_over_memory() {
        conformance::run(&|size| {
            let remote = Arc::new(Memory::new(size));
            let local = Arc::new(Memory::new(size));
            Arc::new(Synced::new(remote, local, options(CS)).unwrap())
        });
    }

    #[test]
    fn conformance_with_small_requests() {
        conformance::run(&|size| {
            let remote = Arc::new(Memory::new(size));
            let local = Arc::new(Memory::new(size));
            let opts = SyncedOptions { chunk_size: 4096, max_request: 3 * 4096, on_chunk_local: None };
            Arc::new(Synced::new(remote, local, opts).unwrap())
        });
    }

    #[test]
    fn a_read_pulls_only_the_chunks_it_touches() {
        let data = pattern(1, (10 * CS + 123) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        let mut buf = vec![0u8; 100];
        s.read_at(&mut buf, 3 * CS + 10).unwrap();
        assert_eq!(buf, data[(3 * CS + 10) as usize..(3 * CS + 110) as usize]);
        assert!(s.is_local(Chunk(3)));
        assert_eq!(s.stats().local_chunks, 1);
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1);
        // Reading it again does not go to the remote.
        s.read_at(&mut buf, 3 * CS).unwrap();
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn adjacent_missing_chunks_are_one_ranged_read() {
        let data = pattern(2, (8 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        s.read_at(&mut [0u8; 1], 2 * CS).unwrap();
        let mut buf = vec![0u8; (6 * CS) as usize];
        s.read_at(&mut buf, CS).unwrap();
        assert_eq!(buf, data[CS as usize..(7 * CS) as usize]);
        // Chunk 2 was local: chunks 1 and 3..7 are two requests.
        assert_eq!(remote.reads.load(Ordering::SeqCst), 3);
        assert_eq!(s.stats().pull_requests, 3);
    }

    #[test]
    fn scattered_runs_are_pulled_in_batches_of_reads_sent_together() {
        let data = pattern(21, (20 * CS + 99) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        s.read_at(&mut [0u8; 1], 4 * CS).unwrap();
        let reads_before = remote.reads.load(Ordering::SeqCst);
        let runs = [0..1, 3..6, 9..10, 12..13, 15..16, 20..21];
        // Chunk 4 is local: 0, 3, 5, 9 fill the first batch of four; 12, 15 and the tail the second.
        let (chunks, bytes) = s.pull_runs(&runs, 4, &mut Vec::new()).unwrap();
        assert_eq!((chunks, bytes), (7, 6 * CS + 99));
        assert_eq!(remote.batches.load(Ordering::SeqCst), 2);
        let mut offsets = remote.read_offsets.lock().unwrap()[reads_before as usize..].to_vec();
        offsets.sort_unstable();
        let expected: Vec<u64> = [0, 3, 5, 9, 12, 15, 20].iter().map(|c| c * CS).collect();
        assert_eq!(offsets, expected);
        assert_eq!(s.stats().pulled_chunks, 8);
        for c in [0, 3, 4, 5, 9, 12, 15, 20] {
            assert!(s.is_local(Chunk(c)), "chunk {c}");
        }
        assert!(!s.is_local(Chunk(1)) && !s.is_local(Chunk(10)));
        remote.fail_reads.store(true, Ordering::SeqCst);
        let mut buf = vec![0u8; (3 * CS) as usize];
        s.read_at(&mut buf, 3 * CS).unwrap();
        assert_eq!(buf, data[(3 * CS) as usize..(6 * CS) as usize]);
        let mut tail = vec![0u8; 99];
        s.read_at(&mut tail, 20 * CS).unwrap();
        assert_eq!(tail, data[(20 * CS) as usize..]);
    }

    #[test]
    fn a_failed_batch_leaves_its_chunks_remote() {
        let data = pattern(22, (8 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        remote.fail_reads.store(true, Ordering::SeqCst);
        let err = s.pull_runs(&[1..2, 4..5, 6..8], 8, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("3 runs of chunks"), "{err}");
        assert_eq!(s.local_chunks(), 0);
        assert!((0..8).all(|c| !s.is_busy(Chunk(c))), "every claim was released");
        remote.fail_reads.store(false, Ordering::SeqCst);
        assert_eq!(s.pull_runs(&[1..2, 4..5, 6..8], 8, &mut Vec::new()).unwrap().0, 4);
        assert_eq!(s.stats().pulled_chunks, 4);
    }

    #[test]
    fn concurrent_readers_of_a_missing_chunk_cause_one_pull() {
        let data = pattern(3, (4 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = Arc::new(stack(&remote));
        remote.close_gate(true, false);
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..8)
                .map(|i| {
                    let s = &s;
                    scope.spawn(move || {
                        let mut buf = vec![0u8; 10];
                        s.read_at(&mut buf, CS + i * 100).unwrap();
                        buf
                    })
                })
                .collect();
            let _open = remote.open_on_drop();
            remote.wait_held(1);
            // Hold the one pull until every other reader has either found it and waits for it,
            // or sent a request of its own (which would be the second to reach the gate).
            wait_until("the other readers to wait for the pull", || {
                s.stats().waits >= 7 || remote.arrived() > 1
            });
            assert_eq!(remote.arrived(), 1, "a second reader sent a request of its own");
            remote.open_gate();
            for (i, r) in readers.into_iter().enumerate() {
                let off = (CS + i as u64 * 100) as usize;
                assert_eq!(r.join().unwrap(), data[off..off + 10]);
            }
        });
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failing_remote_is_an_error_never_zeroes() {
        let data = pattern(4, (4 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        remote.fail_reads.store(true, Ordering::SeqCst);
        let mut buf = vec![0u8; 10];
        let err = s.read_at(&mut buf, 0).unwrap_err();
        assert!(err.to_string().contains("pulling chunks 0..1"), "{err}");
        assert!(!s.is_local(Chunk(0)));
        // A partial write needs the chunk's other bytes: it fails too and changes nothing.
        assert!(s.write_at(&[1, 2, 3], 5).is_err());
        assert!(!s.is_dirty(Chunk(0)));
        remote.fail_reads.store(false, Ordering::SeqCst);
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data[..10]);
    }

    #[test]
    fn whole_chunk_writes_need_no_pull_and_partial_ones_do() {
        let data = pattern(5, (4 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        let whole = pattern(6, (2 * CS) as usize);
        s.write_at(&whole, CS).unwrap();
        assert_eq!(remote.reads.load(Ordering::SeqCst), 0);
        assert!(s.is_local(Chunk(1)) && s.is_dirty(Chunk(1)) && s.is_dirty(Chunk(2)));
        s.write_at(&[9u8; 10], 3 * CS + 5).unwrap();
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1);
        let mut expected = data.clone();
        expected[CS as usize..(3 * CS) as usize].copy_from_slice(&whole);
        expected[(3 * CS + 5) as usize..(3 * CS + 15) as usize].fill(9);
        assert_eq!(contents(&s), expected);
        // The remote is untouched until something pushes.
        assert_eq!(contents(&*remote), data);
    }

    #[test]
    fn mark_remote_invalidates() {
        let remote = Arc::new(Probe::with_data(&pattern(7, (3 * CS) as usize)));
        let s = stack(&remote);
        s.read_at(&mut [0u8; 1], 0).unwrap();
        s.write_at(&[1u8; 4], 0).unwrap();
        let newer = pattern(8, CS as usize);
        remote.inner.write_at(&newer, 0).unwrap();
        s.mark_remote([Chunk(0)]);
        assert!(!s.is_local(Chunk(0)) && !s.is_dirty(Chunk(0)));
        let mut buf = vec![0u8; CS as usize];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, newer);
    }

    #[test]
    fn a_pull_in_flight_when_invalidated_is_discarded() {
        let old = pattern(9, (2 * CS) as usize);
        let remote = Arc::new(Probe::with_data(&old));
        let s = Arc::new(stack(&remote));
        remote.close_gate(true, false);
        let reader = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8];
                s.read_at(&mut buf, 0).map(|()| buf)
            })
        };
        remote.wait_held(1);
        // The reader's remote read is under way; the source changes and invalidates the chunk.
        let newer = pattern(19, CS as usize);
        remote.inner.write_at(&newer, 0).unwrap();
        s.mark_remote([Chunk(0)]);
        remote.open_gate();
        reader.join().unwrap().unwrap();
        // The stale fill was discarded: the chunk was pulled again and holds the newer data.
        assert_eq!(remote.reads.load(Ordering::SeqCst), 2);
        let mut buf = vec![0u8; CS as usize];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, newer);
    }

    #[test]
    fn the_tail_chunk_is_pulled_like_any_other() {
        let data = pattern(10, (2 * CS + 77) as usize);
        let remote = Arc::new(Probe::with_data(&data));
        let s = stack(&remote);
        assert_eq!(s.geometry().chunks(), 3);
        let mut buf = vec![0u8; 77];
        s.read_at(&mut buf, 2 * CS).unwrap();
        assert_eq!(buf, data[(2 * CS) as usize..]);
        assert!(s.is_local(Chunk(2)));
        assert_eq!(s.stats().pulled_bytes, 77);
    }

    #[test]
    fn the_hook_sees_every_chunk_that_becomes_local_once() {
        let remote = Arc::new(Probe::with_data(&pattern(11, (6 * CS) as usize)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook_seen = Arc::clone(&seen);
        let hook: ChunkHook = Arc::new(move |c| hook_seen.lock().unwrap().push(c.0));
        let opts = SyncedOptions { on_chunk_local: Some(hook), ..options(CS) };
        let s = Synced::new(remote.clone(), Arc::new(Memory::new(6 * CS)), opts).unwrap();
        s.read_at(&mut vec![0u8; (2 * CS) as usize], 0).unwrap();
        s.write_at(&vec![1u8; CS as usize], 4 * CS).unwrap();
        s.read_at(&mut [0u8; 1], 0).unwrap();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 4]);
    }

    #[test]
    fn metadata_for_a_sparse_tebibyte_is_a_few_mebibytes() {
        let size = 1u64 << 40;
        let s = Synced::new(Arc::new(Memory::new(size)), Arc::new(Memory::new(size)), options(CS)).unwrap();
        let meta = s.stats().metadata_bytes;
        assert!(meta <= 7 << 20, "{meta} bytes of metadata");
    }

    fn recorded(remote: &Arc<Probe>) -> (Arc<Recorder>, Synced<Recorder>) {
        let cache = Arc::new(Recorder::new(remote.size()));
        let s = Synced::with_cache(remote.clone(), Arc::clone(&cache), options(CS)).unwrap();
        (cache, s)
    }

    #[test]
    fn conformance_over_a_cache_of_its_own_type() {
        conformance::run(&|size| {
            let cache = Arc::new(Recorder::new(size));
            Arc::new(Synced::with_cache(Arc::new(Memory::new(size)), cache, options(CS)).unwrap())
        });
    }

    #[test]
    fn pulls_are_fills_and_writes_are_writes() {
        let remote = Arc::new(Probe::with_data(&pattern(23, (4 * CS) as usize)));
        let (cache, s) = recorded(&remote);
        s.read_at(&mut [0u8; 10], 5).unwrap();
        s.pull(1..2, 1, &mut Vec::new()).unwrap();
        assert_eq!(
            cache.take_calls(),
            [Stored::Fill { off: 0, len: CS, fault: None }, Stored::Fill { off: CS, len: CS, fault: None }]
        );
        // A write of a whole missing chunk needs no fill; one of part of a missing chunk pulls it
        // first.
        s.write_at(&vec![1u8; CS as usize], 2 * CS).unwrap();
        s.write_at(&[2u8; 7], 3 * CS + 1).unwrap();
        assert_eq!(
            cache.take_calls(),
            [
                Stored::Write { off: 2 * CS, len: CS },
                Stored::Fill { off: 3 * CS, len: CS, fault: None },
                Stored::Write { off: 3 * CS + 1, len: 7 },
            ]
        );
    }

    #[test]
    fn the_fault_reaches_the_fill_of_the_run_that_holds_it() {
        let remote = Arc::new(Probe::with_data(&pattern(24, (6 * CS) as usize)));
        let (cache, s) = recorded(&remote);
        s.fetch(2..3).unwrap();
        cache.take_calls();
        // Chunk 2 is local: 0..2 and 3..6 are two fills, and only the second holds the fault.
        let fault = Fault { off: 4 * CS + 123, sequential: true };
        s.fetch_for(0..6, fault).unwrap();
        assert_eq!(
            cache.take_calls(),
            [
                Stored::Fill { off: 0, len: 2 * CS, fault: None },
                Stored::Fill { off: 3 * CS, len: 3 * CS, fault: Some(fault) },
            ]
        );
        // Nothing left to fill: nothing is called.
        s.fetch_for(0..6, fault).unwrap();
        assert!(cache.take_calls().is_empty());
        assert!(s.fetch_for(0..7, fault).is_err(), "chunks past the end are refused");
    }

    #[test]
    fn writes_behind_the_layers_back_are_collected_as_dirty() {
        let remote = Arc::new(Probe::with_data(&pattern(25, (4 * CS) as usize)));
        let (cache, s) = recorded(&remote);
        s.fetch(0..2).unwrap();
        // Local chunks 0 and 1 are written in the cache itself, and so is remote chunk 3 (which
        // has no local data to push).
        cache.behind_the_back.lock().unwrap().extend([10..20, CS + 5..CS + 6, 3 * CS..3 * CS + 1]);
        assert!(!s.is_dirty(Chunk(0)) && !s.is_dirty(Chunk(1)));
        s.collect_written().unwrap();
        assert!(s.is_dirty(Chunk(0)) && s.is_dirty(Chunk(1)));
        assert!(!s.is_dirty(Chunk(2)) && !s.is_dirty(Chunk(3)));
    }

    #[test]
    fn marking_a_chunk_written_waits_for_its_fill_in_flight() {
        let remote = Arc::new(Probe::with_data(&pattern(26, (2 * CS) as usize)));
        let s = Arc::new(stack(&remote));
        remote.close_gate(true, false);
        let _open = remote.open_on_drop();
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| s.fetch(0..1));
            remote.wait_held(1);
            let marker = scope.spawn(|| s.mark_written(0..1));
            // The mark finds the chunk being filled and waits (counted before it sleeps); it
            // cannot finish while the fill is held at the gate.
            wait_until("the mark to wait for the fill", || s.stats().waits == 1);
            assert!(!marker.is_finished());
            remote.open_gate();
            reader.join().unwrap().unwrap();
            marker.join().unwrap();
        });
        assert!(s.is_local(Chunk(0)) && s.is_dirty(Chunk(0)));
    }

    #[test]
    fn bad_options_are_rejected() {
        let small = Arc::new(Memory::new(10));
        let big = Arc::new(Memory::new(20));
        let err = Synced::new(big.clone(), small.clone(), options(4)).unwrap_err();
        assert!(err.to_string().contains("smaller than the remote"), "{err}");
        assert!(Synced::new(small.clone(), big.clone(), options(0)).is_err());
        let opts = SyncedOptions { chunk_size: 8, max_request: 4, on_chunk_local: None };
        assert!(Synced::new(small, big, opts).is_err());
    }
}

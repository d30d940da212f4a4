//! [`Puller`]: background pull of a [`Synced`] layer's missing chunks, in priority order.
//!
//! Throughput over a long link comes from bytes in flight: `depth` requests of up to
//! `request_size` bytes each (adjacent missing chunks merged into one ranged read). At 40 ms per
//! request, 16 requests of 16 MiB keep 256 MiB in flight, about 6.7 GB/s, where the original
//! needed thousands of workers of one 4 KiB chunk each. The price is memory: each worker holds a
//! buffer of one request while it pulls (released when the pull is done).
//!
//! Slow start: the first requests are small (one chunk, then two, four...) and grow to
//! `request_size`, so the start of the order (the chunks an application is likely to touch first)
//! arrives after one short request rather than behind a large one. The number of requests in
//! flight can be limited at start ([`PullerOptions::initial_depth`]) and changed at any time
//! ([`Puller::set_depth`]): a mount pulls with one request while its frontend is being set up.
//!
//! Order: chunks named by [`Puller::prioritize`] or [`Puller::finalize`] go first (a worker takes
//! up to `request_size` of them at a time, however scattered, and fetches them with one
//! [`Backend::read_many`](crate::Backend::read_many): one round trip for a network remote), then the
//! [`PullOrder`] (sequential by default), then a sweep that picks up whatever is still remote
//! (chunks invalidated by `mark_remote`, or left by a failed on-demand read). The puller is done
//! when it has been finalized and every chunk is local.
//!
//! The worker threads run at the lowest priority of the normal scheduling class (nice 19), so
//! the background pull yields to foreground accesses and the frontend without starving: an
//! access may wait for a chunk a worker is pulling.
//!
//! Failures: a failed request is retried with exponential backoff; after `max_attempts` failures
//! in a row of one worker (no pull of its own succeeding in between) the puller stops and [`Puller::wait`] returns the error. Reads through the
//! [`Synced`] layer keep pulling on demand either way.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::cache::Cache;
use super::synced::Synced;
use crate::backend::Backend;
use crate::geometry::Chunk;

/// The order in which the background pull visits chunks. Implement it to pull by a priority of
/// your own (for example, the chunks an application touched first on its last run).
pub trait PullOrder: Send {
    /// The next run of chunks to pull, at most `max_chunks` long; `None` when the order is done.
    fn next_run(&mut self, max_chunks: u64) -> Option<Range<u64>>;
}

/// Chunks `0..chunks` in ascending order.
#[derive(Debug, Clone)]
pub struct Sequential {
    next: u64,
    end: u64,
}

impl Sequential {
    #[must_use]
    pub fn new(chunks: u64) -> Self {
        Self { next: 0, end: chunks }
    }
}

impl PullOrder for Sequential {
    fn next_run(&mut self, max_chunks: u64) -> Option<Range<u64>> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        self.next = (start + max_chunks.max(1)).min(self.end);
        Some(start..self.next)
    }
}

/// Chunks by descending priority (ties in ascending chunk order), as the original's
/// `PullPriority`. It sorts every chunk index once, so it costs 16 bytes per chunk while it lives.
#[derive(Debug, Clone)]
pub struct ByPriority {
    order: Vec<u64>,
    pos: usize,
}

impl ByPriority {
    pub fn new(chunks: u64, priority: impl Fn(Chunk) -> i64) -> Self {
        let mut keyed: Vec<(i64, u64)> = (0..chunks).map(|c| (priority(Chunk(c)), c)).collect();
        keyed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        Self { order: keyed.into_iter().map(|(_, c)| c).collect(), pos: 0 }
    }
}

impl PullOrder for ByPriority {
    fn next_run(&mut self, max_chunks: u64) -> Option<Range<u64>> {
        let &start = self.order.get(self.pos)?;
        let mut end = start + 1;
        self.pos += 1;
        // Merge the following entries while they continue the run.
        while end - start < max_chunks && self.order.get(self.pos) == Some(&end) {
            end += 1;
            self.pos += 1;
        }
        Some(start..end)
    }
}

/// Options of a [`Puller`].
pub struct PullerOptions {
    /// Requests in flight (worker threads).
    pub depth: usize,
    /// Largest remote read in bytes; adjacent missing chunks are merged up to it.
    pub request_size: u64,
    /// Visiting order; `None` is sequential.
    pub order: Option<Box<dyn PullOrder>>,
    /// Start finalized: done as soon as everything is local. A migration destination starts
    /// unfinalized and calls [`Puller::finalize`] with the chunks dirtied at the source.
    pub finalized: bool,
    /// Requests in flight at start (at most `depth`; `None` is `depth`); see [`Puller::set_depth`].
    pub initial_depth: Option<usize>,
    /// Failures in a row of one worker (with no successful pull in between) before the puller
    /// gives up.
    pub max_attempts: u32,
    /// First retry delay; it doubles up to one second.
    pub retry_backoff: Duration,
}

impl Default for PullerOptions {
    fn default() -> Self {
        Self {
            depth: 16,
            request_size: 16 * 1024 * 1024,
            order: None,
            finalized: true,
            initial_depth: None,
            max_attempts: 8,
            retry_backoff: Duration::from_millis(10),
        }
    }
}

impl fmt::Debug for PullerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullerOptions")
            .field("depth", &self.depth)
            .field("request_size", &self.request_size)
            .field("custom_order", &self.order.is_some())
            .field("finalized", &self.finalized)
            .field("initial_depth", &self.initial_depth)
            .field("max_attempts", &self.max_attempts)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

/// A snapshot of a puller's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    pub chunks: u64,
    pub local_chunks: u64,
    /// Chunks and bytes this puller fetched (on-demand pulls are in [`Synced::stats`]).
    pub pulled_chunks: u64,
    pub pulled_bytes: u64,
    pub in_flight: usize,
    /// The current limit of requests in flight.
    pub depth: usize,
    /// Worker threads started (or being started) so far: they start as the depth allows, up to
    /// [`PullerOptions::depth`].
    pub workers: usize,
    pub retries: u64,
    pub paused: bool,
    pub finalized: bool,
    pub done: bool,
    /// Why the puller stopped, if it gave up.
    pub failed: Option<String>,
}

struct Queue {
    urgent: VecDeque<u64>,
    order: Box<dyn PullOrder>,
    order_done: bool,
    sweep: u64,
    finalized: bool,
    paused: bool,
    stop: bool,
    done: bool,
    in_flight: usize,
    /// Requests allowed in flight (at most `Shared::depth`).
    limit: usize,
    /// Worker threads started or being started; grows lazily up to `limit`.
    workers: usize,
    /// Chunks in the next run of the order or sweep (slow start; grows to `max_chunks`).
    ramp: u64,
    failed: Option<(io::ErrorKind, String)>,
}

struct Shared<L: Cache + ?Sized + 'static> {
    synced: Arc<Synced<L>>,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Largest number of workers (`PullerOptions::depth`).
    depth: usize,
    /// Join handles of the workers, pushed by whoever started them.
    handles: Mutex<Vec<JoinHandle<()>>>,
    max_chunks: u64,
    max_attempts: u32,
    retry_backoff: Duration,
    pulled_chunks: AtomicU64,
    pulled_bytes: AtomicU64,
    retries: AtomicU64,
}

/// Background pull of a [`Synced`] layer. See the module docs. Dropping it stops the workers.
pub struct Puller<L: Cache + ?Sized + 'static = dyn Backend> {
    shared: Arc<Shared<L>>,
    /// Workers joined so far (`close` and then `Drop` both stop).
    joined: usize,
}

impl<L: Cache + ?Sized + 'static> fmt::Debug for Puller<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Puller").field("progress", &self.progress()).finish()
    }
}

enum Work {
    /// Runs of chunks to pull together: one run, or a batch of scattered urgent ones.
    Run(Vec<Range<u64>>),
    Wait,
    Exit,
}

impl<L: Cache + ?Sized + 'static> Puller<L> {
    /// Starts the first worker; it starts the others as the depth allows, up to `options.depth`
    /// (so a caller never waits for thread creation beyond the first).
    ///
    /// # Errors
    /// `InvalidInput` for a zero depth or a request smaller than a chunk; an error spawning threads.
    pub fn start(synced: Arc<Synced<L>>, options: PullerOptions) -> io::Result<Self> {
        let chunk_size = synced.geometry().chunk_size();
        super::check_workers("pull", options.depth, options.request_size, chunk_size)?;
        let chunks = synced.geometry().chunks();
        let order = options.order.unwrap_or_else(|| Box::new(Sequential::new(chunks)));
        let limit = options.initial_depth.unwrap_or(options.depth).clamp(1, options.depth);
        let shared = Arc::new(Shared {
            synced,
            queue: Mutex::new(Queue {
                urgent: VecDeque::new(),
                order,
                order_done: false,
                sweep: 0,
                finalized: options.finalized,
                paused: false,
                stop: false,
                done: false,
                in_flight: 0,
                limit,
                workers: 1,
                ramp: 1,
                failed: None,
            }),
            cv: Condvar::new(),
            depth: options.depth,
            handles: Mutex::new(Vec::with_capacity(options.depth)),
            max_chunks: options.request_size / chunk_size,
            max_attempts: options.max_attempts.max(1),
            retry_backoff: options.retry_backoff,
            pulled_chunks: AtomicU64::new(0),
            pulled_bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        let handle = spawn_worker(&shared, 0)?;
        shared.handles.lock().expect("puller handles lock").push(handle);
        Ok(Self { shared, joined: 0 })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.shared.queue.lock().expect("puller queue lock")
    }

    /// Pulls these chunks before anything else still queued (for example, chunks an application
    /// is about to touch).
    pub fn prioritize(&self, chunks: impl IntoIterator<Item = Chunk>) {
        let mut q = self.lock();
        queue_first(&mut q, chunks);
        drop(q);
        self.shared.cv.notify_all();
    }

    /// Queues `dirty` first and lets the puller finish once everything is local. Only the first
    /// call counts (as in the original); the caller marks `dirty` remote on the [`Synced`] layer
    /// before calling it.
    pub fn finalize(&self, dirty: &[Chunk]) {
        let mut q = self.lock();
        if q.finalized {
            return;
        }
        queue_first(&mut q, dirty.iter().copied());
        q.finalized = true;
        drop(q);
        self.shared.cv.notify_all();
    }

    /// Allows `depth` requests in flight (clamped to `1..=options.depth`). Lowering it lets
    /// requests in flight complete; raising it starts workers in the background.
    pub fn set_depth(&self, depth: usize) {
        self.lock().limit = depth.clamp(1, self.shared.depth);
        self.shared.cv.notify_all();
        // Workers may all be busy in requests: start the next one here; it starts the rest.
        grow(&self.shared);
    }

    /// Stops sending new requests; requests in flight complete.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.shared.cv.notify_all();
    }

    #[must_use]
    pub fn progress(&self) -> PullProgress {
        let synced = &self.shared.synced;
        let (chunks, local_chunks) = (synced.geometry().chunks(), synced.local_chunks());
        let q = self.lock();
        PullProgress {
            chunks,
            local_chunks,
            pulled_chunks: self.shared.pulled_chunks.load(Ordering::Relaxed),
            pulled_bytes: self.shared.pulled_bytes.load(Ordering::Relaxed),
            in_flight: q.in_flight,
            depth: q.limit,
            workers: q.workers,
            retries: self.shared.retries.load(Ordering::Relaxed),
            paused: q.paused,
            finalized: q.finalized,
            done: q.done,
            failed: q.failed.as_ref().map(|(_, m)| m.clone()),
        }
    }

    /// Blocks until the puller is done (finalized and everything local) or has given up.
    ///
    /// # Errors
    /// The error that made the puller give up, or `Interrupted` if it was closed first.
    pub fn wait(&self) -> io::Result<()> {
        self.wait_timeout(None).map(|_| ())
    }

    /// As [`Puller::wait`], giving up after `timeout`; returns whether the puller is done.
    ///
    /// # Errors
    /// As [`Puller::wait`].
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut q = self.lock();
        loop {
            if let Some((kind, msg)) = &q.failed {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            if q.done {
                return Ok(true);
            }
            if q.stop {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the puller was closed before it finished",
                ));
            }
            match deadline {
                None => q = self.shared.cv.wait(q).expect("puller queue lock"),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    q = self.shared.cv.wait_timeout(q, d - now).expect("puller queue lock").0;
                }
            }
        }
    }

    /// Stops the workers (requests in flight complete first).
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.lock().stop = true;
        self.shared.cv.notify_all();
        // No worker starts another once `stop` is set; wait for those being started too.
        loop {
            let handles = std::mem::take(&mut *self.shared.handles.lock().expect("puller handles lock"));
            for w in handles {
                // A worker that panicked has nothing left to clean up.
                let _ = w.join();
                self.joined += 1;
            }
            if self.joined >= self.lock().workers {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<L: Cache + ?Sized + 'static> Drop for Puller<L> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts `chunks` at the front of the urgent queue, in ascending order so that runs merge.
fn queue_first(q: &mut Queue, chunks: impl IntoIterator<Item = Chunk>) {
    let mut front: Vec<u64> = chunks.into_iter().map(|c| c.0).collect();
    front.sort_unstable();
    for c in front.into_iter().rev() {
        q.urgent.push_front(c);
    }
    q.done = false;
}

fn next_work<L: Cache + ?Sized + 'static>(shared: &Shared<L>, q: &mut Queue) -> Work {
    if q.stop || q.failed.is_some() {
        return Work::Exit;
    }
    if q.paused || q.in_flight >= q.limit {
        return Work::Wait;
    }
    let synced = &shared.synced;
    let chunks = synced.geometry().chunks();
    // Urgent chunks are scattered (a round's dirty set): a worker takes up to a request's worth
    // of them, runs of adjacent ones merged, and fetches them with one batch of reads.
    let mut batch: Vec<Range<u64>> = Vec::new();
    let mut in_batch = 0;
    while in_batch < shared.max_chunks {
        let Some(c) = q.urgent.pop_front() else {
            break;
        };
        if c >= chunks || synced.is_local(Chunk(c)) || synced.is_busy(Chunk(c)) {
            continue;
        }
        let mut end = c + 1;
        while in_batch + (end - c) < shared.max_chunks && q.urgent.front() == Some(&end) {
            q.urgent.pop_front();
            end += 1;
        }
        in_batch += end - c;
        batch.push(c..end);
    }
    if !batch.is_empty() {
        return Work::Run(batch);
    }
    let max_chunks = q.ramp.min(shared.max_chunks);
    while !q.order_done {
        match q.order.next_run(max_chunks) {
            Some(run) if synced.next_remote(run.start, run.end).is_some() => {
                q.ramp = (max_chunks * 2).min(shared.max_chunks);
                return Work::Run(vec![run]);
            }
            Some(_) => {}
            None => q.order_done = true,
        }
    }
    // Sweep up whatever is still remote, skipping chunks someone is pulling right now.
    let mut from = q.sweep;
    while let Some(Chunk(c)) = synced.next_remote(from, chunks) {
        if synced.is_busy(Chunk(c)) {
            from = c + 1;
            continue;
        }
        let end = (c + max_chunks).min(chunks);
        q.ramp = (max_chunks * 2).min(shared.max_chunks);
        q.sweep = end;
        let run = c..end;
        return Work::Run(vec![run]);
    }
    // Start the next sweep from the beginning: chunks may have become remote behind it
    // (mark_remote, a failed on-demand pull).
    q.sweep = 0;
    if synced.is_complete() && q.finalized && q.in_flight == 0 && !q.done {
        q.done = true;
        shared.cv.notify_all();
    }
    Work::Wait
}

/// How much nicer than the rest of the process the pull threads run. Not `SCHED_IDLE`: a thread
/// that waits for a chunk a pull worker has claimed (a read, a userfaultfd fault) would then wait
/// as long as any other thread keeps the CPUs busy (measured: a userfaultfd region's cold read
/// of 1 GiB fell to 0.7 GB/s from 1.3 to 2.3 GB/s at nice 19, its fault handlers spinning).
const BACKGROUND_NICENESS: i32 = 19;

fn spawn_worker<L: Cache + ?Sized + 'static>(
    shared: &Arc<Shared<L>>,
    index: usize,
) -> io::Result<JoinHandle<()>> {
    let for_worker = Arc::clone(shared);
    std::thread::Builder::new().name(format!("r3map-pull-{index}")).spawn(move || worker(&for_worker))
}

/// Starts one more worker if the depth allows it; called with the queue unlocked. Each worker
/// calls it when it starts, so one call starts a chain of as many as the depth allows.
fn grow<L: Cache + ?Sized + 'static>(shared: &Arc<Shared<L>>) {
    let index = {
        let mut q = shared.queue.lock().expect("puller queue lock");
        if q.stop || q.workers >= q.limit.min(shared.depth) {
            return;
        }
        q.workers += 1;
        q.workers - 1
    };
    match spawn_worker(shared, index) {
        Ok(handle) => shared.handles.lock().expect("puller handles lock").push(handle),
        Err(e) => {
            tracing::warn!(error = %e, workers = index, "cannot start another pull worker");
            let mut q = shared.queue.lock().expect("puller queue lock");
            q.workers -= 1;
            // Do not try again: run with the workers there are.
            q.limit = q.limit.min(q.workers);
        }
    }
}

fn worker<L: Cache + ?Sized + 'static>(shared: &Arc<Shared<L>>) {
    // Background work yields to the application and the frontend: on a small machine a pull at
    // full speed would otherwise delay the very reads it exists to speed up. Best effort.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICENESS);
    let mut scratch = Vec::new();
    let mut failures = Failures::new(shared);
    let mut q = shared.queue.lock().expect("puller queue lock");
    loop {
        if q.workers < q.limit.min(shared.depth) && !q.stop {
            drop(q);
            grow(shared);
            q = shared.queue.lock().expect("puller queue lock");
            continue;
        }
        match next_work(shared, &mut q) {
            Work::Exit => break,
            Work::Wait if q.done => {
                // Nothing left to pull: give the request buffer back.
                scratch = Vec::new();
                q = shared.cv.wait(q).expect("puller queue lock");
            }
            Work::Wait => {
                // The timeout re-checks for chunks that became remote without a notification
                // (a failed on-demand pull, mark_remote) or that someone else was pulling.
                q = shared.cv.wait_timeout(q, Duration::from_millis(50)).expect("puller queue lock").0;
            }
            Work::Run(runs) => {
                q.in_flight += 1;
                drop(q);
                let result = pull_with_retries(shared, &runs, &mut scratch, &mut failures);
                q = shared.queue.lock().expect("puller queue lock");
                q.in_flight -= 1;
                if let Err(e) = result {
                    tracing::error!(error = %e, "background pull gave up");
                    q.failed.get_or_insert((e.kind(), e.to_string()));
                    shared.cv.notify_all();
                }
            }
        }
    }
}

/// A worker's failed pulls since its last pull that fetched something.
struct Failures {
    in_a_row: u32,
    backoff: Duration,
}

impl Failures {
    fn new<L: Cache + ?Sized + 'static>(shared: &Shared<L>) -> Self {
        Self { in_a_row: 0, backoff: shared.retry_backoff }
    }
}

/// Pulls `runs`, retrying with backoff. The failures count per worker across work items, not per
/// item: a failed item's chunks go back to the pool, and the retry may find them taken by another
/// worker (nothing to do, which is neither a success nor a failure), so a count per item would
/// never reach `max_attempts` while the workers trade the same dead chunks.
fn pull_with_retries<L: Cache + ?Sized + 'static>(
    shared: &Shared<L>,
    runs: &[Range<u64>],
    scratch: &mut Vec<u8>,
    failures: &mut Failures,
) -> io::Result<()> {
    loop {
        match shared.synced.pull_runs(runs, shared.max_chunks, scratch) {
            Ok((chunks, bytes)) => {
                shared.pulled_chunks.fetch_add(chunks, Ordering::Relaxed);
                shared.pulled_bytes.fetch_add(bytes, Ordering::Relaxed);
                if chunks > 0 {
                    *failures = Failures::new(shared);
                }
                return Ok(());
            }
            Err(e) => {
                failures.in_a_row += 1;
                let attempt = failures.in_a_row;
                if attempt >= shared.max_attempts {
                    return Err(e);
                }
                tracing::warn!(error = %e, attempt, "background pull failed; retrying");
                shared.retries.fetch_add(1, Ordering::Relaxed);
                if shared.queue.lock().expect("puller queue lock").stop {
                    return Ok(());
                }
                std::thread::sleep(failures.backoff);
                failures.backoff = (failures.backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
// Test sizes are a few MiB: `u64 as usize` cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backend::Backend;
    use crate::backends::Memory;
    use crate::pipeline::synced::SyncedOptions;
    use crate::pipeline::testutil::{PATIENCE, Probe, contents, pattern, wait_until};

    const CS: u64 = 64 * 1024;

    fn setup(data: &[u8]) -> (Arc<Probe>, Arc<Synced>) {
        let remote = Arc::new(Probe::with_data(data));
        let local = Arc::new(Memory::new(remote.size()));
        let opts = SyncedOptions { chunk_size: CS, ..SyncedOptions::default() };
        (remote.clone(), Arc::new(Synced::new(remote, local, opts).unwrap()))
    }

    fn opts(depth: usize, request_size: u64) -> PullerOptions {
        PullerOptions { depth, request_size, ..PullerOptions::default() }
    }

    #[test]
    fn pulls_everything_with_merged_requests() {
        let data = pattern(1, (40 * CS + 5) as usize);
        let (remote, synced) = setup(&data);
        // Every request is held at the gate and let go one at a time, so a worker only looks for
        // work while the runs of all the others are claimed: otherwise a worker that has run out
        // of the order may sweep up chunks another one was handed but has not claimed yet,
        // splitting that run into more requests than the slow start below.
        remote.close_gate(true, false);
        let puller = Puller::start(Arc::clone(&synced), opts(4, 8 * CS)).unwrap();
        let _open = remote.open_on_drop();
        remote.wait_arrived(4);
        for n in 5..=8 {
            remote.release(1);
            remote.wait_arrived(n);
        }
        remote.open_gate();
        puller.wait().unwrap();
        assert!(synced.is_complete());
        // 41 chunks in requests that start at one chunk and double up to 8 (slow start):
        // 1, 2, 4, 8, 8, 8, 8 and the last 2.
        assert_eq!(remote.reads.load(Ordering::SeqCst), 8);
        let mut offsets = remote.read_offsets.lock().unwrap().clone();
        offsets.sort_unstable();
        let starts: Vec<u64> = [0, 1, 3, 7, 15, 23, 31, 39].iter().map(|c| c * CS).collect();
        assert_eq!(offsets, starts);
        let p = puller.progress();
        assert!(p.done && p.pulled_chunks == 41 && p.pulled_bytes == data.len() as u64, "{p:?}");
        remote.fail_reads.store(true, Ordering::SeqCst);
        assert_eq!(contents(&*synced), data);
    }

    #[test]
    fn the_depth_limits_requests_in_flight_and_can_be_raised() {
        let data = pattern(2, (64 * CS) as usize);
        let (remote, synced) = setup(&data);
        remote.close_gate(true, false);
        let options = PullerOptions { initial_depth: Some(1), ..opts(4, CS) };
        let puller = Puller::start(Arc::clone(&synced), options).unwrap();
        let _open = remote.open_on_drop();
        remote.wait_held(1);
        // A worker starts the others before it takes its first request: had the limit been
        // ignored, more workers would be counted by now.
        let p = puller.progress();
        assert_eq!((p.in_flight, p.depth, p.workers), (1, 1, 1), "{p:?}");
        puller.set_depth(100);
        remote.wait_held(4);
        let p = puller.progress();
        assert_eq!((p.in_flight, p.depth, p.workers), (4, 4, 4), "clamped to the workers: {p:?}");
        assert_eq!(remote.arrived(), 4);
        remote.open_gate();
        puller.wait().unwrap();
        assert_eq!(contents(&*synced), data);
    }

    #[test]
    fn close_joins_every_worker_started_so_far() {
        let data = pattern(3, (64 * CS) as usize);
        let (remote, synced) = setup(&data);
        remote.close_gate(true, false);
        let puller = Puller::start(Arc::clone(&synced), opts(4, CS)).unwrap();
        let open = remote.open_on_drop();
        remote.wait_held(4);
        drop(open);
        // `close` stops and joins; the `Drop` after it must find nothing left to wait for.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            puller.close();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(PATIENCE).expect("close returned");
    }

    #[test]
    fn priority_decides_the_order() {
        let data = pattern(2, (10 * CS) as usize);
        let (remote, synced) = setup(&data);
        let order = ByPriority::new(10, |c| i64::try_from(c.0).unwrap());
        let puller =
            Puller::start(Arc::clone(&synced), PullerOptions { order: Some(Box::new(order)), ..opts(1, CS) })
                .unwrap();
        puller.wait().unwrap();
        let offsets = remote.read_offsets.lock().unwrap().clone();
        let expected: Vec<u64> = (0..10).rev().map(|c| c * CS).collect();
        assert_eq!(offsets, expected);
    }

    #[test]
    fn by_priority_merges_runs() {
        let mut order = ByPriority::new(6, |c| if c.0 >= 3 { 1 } else { 0 });
        assert_eq!(order.next_run(2), Some(3..5));
        assert_eq!(order.next_run(2), Some(5..6));
        assert_eq!(order.next_run(8), Some(0..3));
        assert_eq!(order.next_run(8), None);
    }

    #[test]
    fn an_unfinalized_puller_waits_for_finalize_and_pulls_the_dirty_chunks_first() {
        let data = pattern(3, (8 * CS) as usize);
        let (remote, synced) = setup(&data);
        let puller =
            Puller::start(Arc::clone(&synced), PullerOptions { finalized: false, ..opts(2, CS) }).unwrap();
        // The worker that ends the last request looks for more work before it lets go of the
        // queue, so once nothing is in flight a puller that ignored `finalized` would be done.
        wait_until("every chunk pulled", || {
            let p = puller.progress();
            p.local_chunks == p.chunks && p.in_flight == 0
        });
        assert!(!puller.progress().done, "done before finalize");
        assert!(!puller.wait_timeout(Some(Duration::ZERO)).unwrap());
        // The source changed chunks 2 and 5 after they were pulled.
        let newer = pattern(4, (2 * CS) as usize);
        remote.inner.write_at(&newer[..CS as usize], 2 * CS).unwrap();
        remote.inner.write_at(&newer[CS as usize..], 5 * CS).unwrap();
        let dirty = [Chunk(2), Chunk(5)];
        synced.mark_remote(dirty);
        puller.finalize(&dirty);
        puller.wait().unwrap();
        let mut reads_after: Vec<u64> = remote.read_offsets.lock().unwrap()[8..].to_vec();
        reads_after.sort_unstable();
        assert_eq!(reads_after, vec![2 * CS, 5 * CS]);
        remote.fail_reads.store(true, Ordering::SeqCst);
        let mut expected = data;
        expected[(2 * CS) as usize..(3 * CS) as usize].copy_from_slice(&newer[..CS as usize]);
        expected[(5 * CS) as usize..(6 * CS) as usize].copy_from_slice(&newer[CS as usize..]);
        assert_eq!(contents(&*synced), expected);
    }

    #[test]
    fn scattered_urgent_chunks_are_fetched_in_batches_of_a_request() {
        let data = pattern(9, (64 * CS) as usize);
        let (remote, synced) = setup(&data);
        let puller =
            Puller::start(Arc::clone(&synced), PullerOptions { finalized: false, ..opts(1, 8 * CS) })
                .unwrap();
        wait_until("every chunk pulled", || synced.is_complete());
        // Paused while the chunks are invalidated: a sweep between `mark_remote` and `finalize`
        // would fetch them in runs of its own instead of the batches counted below.
        puller.pause();
        let (reads, batches) = (remote.reads.load(Ordering::SeqCst), remote.batches.load(Ordering::SeqCst));
        // Ten scattered chunks (two of them adjacent) changed at the source.
        let dirty: Vec<Chunk> = [1, 7, 8, 13, 22, 30, 41, 50, 57, 63].into_iter().map(Chunk).collect();
        let newer = pattern(10, (64 * CS) as usize);
        for c in &dirty {
            let range = (c.0 * CS) as usize..((c.0 + 1) * CS) as usize;
            remote.inner.write_at(&newer[range], c.0 * CS).unwrap();
        }
        synced.mark_remote(dirty.iter().copied());
        puller.finalize(&dirty);
        puller.resume();
        puller.wait().unwrap();
        // Eight chunks per request: two batches, nine reads (7 and 8 are one).
        assert_eq!(remote.batches.load(Ordering::SeqCst) - batches, 2);
        assert_eq!(remote.reads.load(Ordering::SeqCst) - reads, 9);
        remote.fail_reads.store(true, Ordering::SeqCst);
        let got = contents(&*synced);
        for c in 0..64 {
            let range = (c * CS) as usize..((c + 1) * CS) as usize;
            let want = if dirty.contains(&Chunk(c)) { &newer[range.clone()] } else { &data[range.clone()] };
            assert!(got[range] == *want, "chunk {c}");
        }
    }

    #[test]
    fn pause_stops_new_requests_and_resume_continues() {
        let data = pattern(5, (30 * CS) as usize);
        let (remote, synced) = setup(&data);
        remote.close_gate(true, false);
        let puller = Puller::start(Arc::clone(&synced), opts(1, CS)).unwrap();
        let _open = remote.open_on_drop();
        remote.wait_held(1);
        puller.pause();
        // The request in flight lands. The worker looks for the next one before it lets go of
        // the queue: when nothing is in flight any more it has found the puller paused, and had
        // it not, its next request would be the second to reach the gate.
        remote.release(1);
        wait_until("the request in flight to land, or another to start", || {
            puller.progress().in_flight == 0 || remote.arrived() > 1
        });
        assert_eq!(remote.arrived(), 1, "a request was sent while paused");
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1);
        assert!(puller.progress().paused);
        puller.resume();
        remote.open_gate();
        puller.wait().unwrap();
        assert!(synced.is_complete());
    }

    #[test]
    fn failures_are_retried() {
        let data = pattern(6, (4 * CS) as usize);
        let (remote, synced) = setup(&data);
        remote.fail_next.store(3, Ordering::SeqCst);
        let puller = Puller::start(Arc::clone(&synced), opts(1, CS)).unwrap();
        puller.wait().unwrap();
        assert_eq!(puller.progress().retries, 3);
        assert!(synced.is_complete());
    }

    #[test]
    fn a_dead_remote_makes_the_puller_give_up_with_the_error() {
        let (remote, synced) = setup(&pattern(7, (4 * CS) as usize));
        remote.fail_reads.store(true, Ordering::SeqCst);
        let options =
            PullerOptions { max_attempts: 3, retry_backoff: Duration::from_millis(1), ..opts(2, CS) };
        let puller = Puller::start(Arc::clone(&synced), options).unwrap();
        let err = puller.wait().unwrap_err();
        assert!(err.to_string().contains("failed on purpose"), "{err}");
        assert!(puller.progress().failed.is_some());
        assert!(!synced.is_complete());
    }

    #[test]
    fn many_workers_trading_dead_chunks_still_give_up() {
        // Many more workers than chunks: while a worker waits to retry its failed request, an
        // idle one picks the chunks up, and the owner's retry finds nothing to do.
        let (remote, synced) = setup(&pattern(11, (2 * CS) as usize));
        remote.fail_reads.store(true, Ordering::SeqCst);
        *remote.latency.lock().unwrap() = Duration::from_millis(5);
        let options =
            PullerOptions { max_attempts: 3, retry_backoff: Duration::from_millis(150), ..opts(16, CS) };
        let puller = Puller::start(Arc::clone(&synced), options).unwrap();
        let ended = puller.wait_timeout(Some(PATIENCE));
        let err = ended.expect_err("the puller gave up");
        assert!(err.to_string().contains("failed on purpose"), "{err}");
    }

    #[test]
    fn chunks_pulled_on_demand_are_not_pulled_again() {
        let data = pattern(8, (16 * CS) as usize);
        let (remote, synced) = setup(&data);
        synced.read_at(&mut vec![0u8; (16 * CS) as usize], 0).unwrap();
        let reads = remote.reads.load(Ordering::SeqCst);
        let puller = Puller::start(Arc::clone(&synced), opts(4, CS)).unwrap();
        puller.wait().unwrap();
        assert_eq!(remote.reads.load(Ordering::SeqCst), reads);
        assert_eq!(puller.progress().pulled_chunks, 0);
    }

    #[test]
    fn bad_options_are_rejected() {
        let (_, synced) = setup(&[1u8; 100]);
        assert!(Puller::start(Arc::clone(&synced), opts(0, CS)).is_err());
        assert!(Puller::start(synced, opts(1, CS - 1)).is_err());
    }
}

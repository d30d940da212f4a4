//! [`Pusher`]: background write-back of a [`Synced`] layer's dirty chunks to its remote.
//!
//! A push cycle first marks dirty what the local cache saw written behind the [`Synced`] layer's
//! back ([`Cache::take_written`]: a mapping's write-protect tracking, say; nothing for a plain
//! cache), then walks the dirty bitmap, merges adjacent dirty chunks into writes of up to
//! `request_size` bytes and sends up to `depth` of them at once. Cycles run every `interval`, on
//! [`Pusher::push`], on `flush` (the pusher is the managed stack's [`Backend`]: reads and writes
//! go to the [`Synced`] layer, and `flush` pushes everything dirty, then flushes the remote), and a
//! last time on [`Pusher::close`].
//!
//! Correctness rests on two rules: a chunk's dirty bit is set after its data reaches the local
//! backend and cleared before the push reads it, so a write that lands while its chunk is being
//! pushed stays dirty and goes out in the next cycle; and one cycle runs at a time, so an older
//! copy of a chunk can never reach the remote after a newer one. A failed write sets the dirty
//! bits again: failures are retried (with backoff in the background) and reported, never dropped.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cache::Cache;
use super::synced::Synced;
use crate::backend::{Backend, Capabilities};

/// Options of a [`Pusher`].
#[derive(Debug, Clone)]
pub struct PusherOptions {
    /// Time between background cycles. The original defaulted to 20 s. `Duration::MAX` runs no
    /// background cycle: pushes happen on `push`, `flush` and `close` only.
    pub interval: Duration,
    /// Writes in flight during a cycle.
    pub depth: usize,
    /// Largest remote write in bytes; adjacent dirty chunks are merged up to it.
    pub request_size: u64,
    /// First delay before a failed background cycle is retried; it doubles up to `interval`.
    pub retry_backoff: Duration,
}

impl Default for PusherOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            depth: 4,
            request_size: 4 * 1024 * 1024,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// Counters of a pusher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushProgress {
    pub cycles: u64,
    pub pushed_chunks: u64,
    pub pushed_bytes: u64,
    pub dirty_chunks: u64,
    /// Cycles that ended with an error (their chunks stayed dirty).
    pub failed_cycles: u64,
    pub last_error: Option<String>,
}

/// What one cycle did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushCycle {
    pub chunks: u64,
    pub requests: u64,
}

struct Shared<L: Cache + ?Sized + 'static> {
    synced: Arc<Synced<L>>,
    options: PusherOptions,
    max_chunks: u64,
    /// Held for the whole of a cycle: one cycle at a time.
    cycle: Mutex<()>,
    control: Mutex<Control>,
    cv: Condvar,
    cycles: AtomicU64,
    failed_cycles: AtomicU64,
}

#[derive(Default)]
struct Control {
    stop: bool,
    last_error: Option<String>,
}

/// Background write-back of a [`Synced`] layer; also the managed stack's [`Backend`].
pub struct Pusher<L: Cache + ?Sized + 'static = dyn Backend> {
    shared: Arc<Shared<L>>,
    thread: Option<JoinHandle<()>>,
}

impl<L: Cache + ?Sized + 'static> fmt::Debug for Pusher<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pusher").field("progress", &self.progress()).finish()
    }
}

impl<L: Cache + ?Sized + 'static> Pusher<L> {
    /// Starts the background thread.
    ///
    /// # Errors
    /// `InvalidInput` for a zero depth or a request smaller than a chunk; an error spawning the thread.
    pub fn start(synced: Arc<Synced<L>>, options: PusherOptions) -> io::Result<Self> {
        let chunk_size = synced.geometry().chunk_size();
        super::check_workers("push", options.depth, options.request_size, chunk_size)?;
        let shared = Arc::new(Shared {
            synced,
            max_chunks: options.request_size / chunk_size,
            options,
            cycle: Mutex::new(()),
            control: Mutex::new(Control::default()),
            cv: Condvar::new(),
            cycles: AtomicU64::new(0),
            failed_cycles: AtomicU64::new(0),
        });
        let bg = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("r3map-push".into()).spawn(move || background(&bg))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    #[must_use]
    pub fn synced(&self) -> &Arc<Synced<L>> {
        &self.shared.synced
    }

    /// Pushes every chunk that is dirty now, with what the cache reports written behind the
    /// layer's back (and any dirtied while the cycle runs, if the walk has not passed them yet);
    /// waits for a cycle already running first.
    ///
    /// # Errors
    /// The cache's error finding its written ranges; the first failed write: its chunks, and
    /// those not reached, stay dirty.
    pub fn push(&self) -> io::Result<PushCycle> {
        self.shared.cycle()
    }

    #[must_use]
    pub fn progress(&self) -> PushProgress {
        let stats = self.shared.synced.stats();
        PushProgress {
            cycles: self.shared.cycles.load(Ordering::Relaxed),
            pushed_chunks: stats.pushed_chunks,
            pushed_bytes: stats.pushed_bytes,
            dirty_chunks: stats.dirty_chunks,
            failed_cycles: self.shared.failed_cycles.load(Ordering::Relaxed),
            last_error: self.shared.control.lock().expect("pusher control lock").last_error.clone(),
        }
    }

    /// Stops the background thread, then pushes what is still dirty and flushes the remote.
    ///
    /// # Errors
    /// A failed final push: the chunks stay dirty in the local backend (nothing is lost locally).
    pub fn close(mut self) -> io::Result<()> {
        self.stop_thread();
        self.flush()
    }

    fn stop_thread(&mut self) {
        self.shared.control.lock().expect("pusher control lock").stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            // A panicked thread has nothing left to clean up; the final push below still runs.
            let _ = t.join();
        }
    }
}

impl<L: Cache + ?Sized + 'static> Drop for Pusher<L> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            if let Err(e) = self.flush() {
                tracing::error!(error = %e, "the final push failed; dirty chunks remain only in the local backend");
            }
        }
    }
}

impl<L: Cache + ?Sized + 'static> Shared<L> {
    fn cycle(&self) -> io::Result<PushCycle> {
        let _one_at_a_time = self.cycle.lock().expect("pusher cycle lock");
        if let Err(e) = self.synced.collect_written() {
            self.failed(&e);
            return Err(e);
        }
        let mut dirty = self.synced.dirty_runs(self.max_chunks).peekable();
        if dirty.peek().is_none() {
            self.cycles.fetch_add(1, Ordering::Relaxed);
            self.control.lock().expect("pusher control lock").last_error = None;
            return Ok(PushCycle::default());
        }
        let runs = Mutex::new(dirty);
        let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
        let chunks = AtomicU64::new(0);
        let requests = AtomicU64::new(0);
        let next_run = || -> Option<Range<u64>> {
            if first_error.lock().expect("push error lock").is_some() {
                return None;
            }
            runs.lock().expect("push runs lock").next()
        };
        std::thread::scope(|s| {
            for _ in 0..self.options.depth {
                s.spawn(|| {
                    let mut scratch = Vec::new();
                    while let Some(run) = next_run() {
                        match self.synced.push_run(run, &mut scratch) {
                            Ok(n) => {
                                chunks.fetch_add(n, Ordering::Relaxed);
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                first_error.lock().expect("push error lock").get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("push error lock") {
            self.failed(&e);
            return Err(e);
        }
        self.cycles.fetch_add(1, Ordering::Relaxed);
        self.control.lock().expect("pusher control lock").last_error = None;
        Ok(PushCycle { chunks: chunks.into_inner(), requests: requests.into_inner() })
    }

    /// Counts a cycle that failed with `e`.
    fn failed(&self, e: &io::Error) {
        self.cycles.fetch_add(1, Ordering::Relaxed);
        self.failed_cycles.fetch_add(1, Ordering::Relaxed);
        self.control.lock().expect("pusher control lock").last_error = Some(e.to_string());
    }
}

fn background<L: Cache + ?Sized + 'static>(shared: &Shared<L>) {
    let interval = shared.options.interval;
    let mut wait = interval;
    loop {
        // No deadline (an interval too long to reach): wait for the stop only.
        let deadline = Instant::now().checked_add(wait);
        let mut control = shared.control.lock().expect("pusher control lock");
        while !control.stop && deadline.is_none_or(|d| Instant::now() < d) {
            control = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    shared.cv.wait_timeout(control, left).expect("pusher control lock").0
                }
                None => shared.cv.wait(control).expect("pusher control lock"),
            };
        }
        if control.stop {
            return;
        }
        drop(control);
        match shared.cycle() {
            Ok(_) => wait = interval,
            Err(e) => {
                wait = if wait >= interval {
                    shared.options.retry_backoff
                } else {
                    wait.saturating_mul(2).min(interval)
                };
                tracing::warn!(error = %e, retry_in = ?wait, "background push failed; the chunks stay dirty");
            }
        }
    }
}

impl<L: Cache + ?Sized + 'static> Backend for Pusher<L> {
    fn size(&self) -> u64 {
        self.shared.synced.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.shared.synced.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.shared.synced.write_at(buf, off)
    }

    /// Flushes the local backend, pushes every dirty chunk, then flushes the remote.
    fn flush(&self) -> io::Result<()> {
        self.shared.synced.flush()?;
        self.shared.cycle()?;
        self.shared.synced.remote().flush()
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.synced.capabilities()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.shared.synced.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.shared.synced.write_zeroes(off, len)
    }
}

#[cfg(test)]
// Test sizes are a few MiB: `u64 as usize` cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backends::Memory;
    use crate::geometry::Chunk;
    use crate::pipeline::synced::SyncedOptions;
    use crate::pipeline::testutil::{Probe, Recorder, contents, pattern, wait_until};

    const CS: u64 = 64 * 1024;

    fn setup(data: &[u8], options: PusherOptions) -> (Arc<Probe>, Pusher) {
        let remote = Arc::new(Probe::with_data(data));
        let local = Arc::new(Memory::new(remote.size()));
        let opts = SyncedOptions { chunk_size: CS, ..SyncedOptions::default() };
        let synced = Arc::new(Synced::new(remote.clone(), local, opts).unwrap());
        (remote, Pusher::start(synced, options).unwrap())
    }

    fn manual() -> PusherOptions {
        PusherOptions { interval: Duration::from_secs(3600), ..PusherOptions::default() }
    }

    #[test]
    fn conformance_of_the_managed_stack() {
        crate::conformance::run(&|size| {
            let remote = Arc::new(Memory::new(size));
            let local = Arc::new(Memory::new(size));
            let opts = SyncedOptions { chunk_size: CS, ..SyncedOptions::default() };
            let synced = Arc::new(Synced::new(remote, local, opts).unwrap());
            Arc::new(Pusher::start(synced, manual()).unwrap())
        });
    }

    #[test]
    fn flush_pushes_dirty_chunks_merged() {
        let data = pattern(1, (20 * CS + 9) as usize);
        let (remote, pusher) = setup(&data, manual());
        let a = pattern(2, (10 * CS) as usize);
        pusher.write_at(&a, 2 * CS).unwrap();
        pusher.write_at(&[7u8; 9], 20 * CS).unwrap();
        pusher.flush().unwrap();
        let mut expected = data;
        expected[(2 * CS) as usize..(12 * CS) as usize].copy_from_slice(&a);
        expected[(20 * CS) as usize..].fill(7);
        assert_eq!(contents(&remote.inner), expected);
        // Ten adjacent chunks in one write, the tail in another.
        assert_eq!(remote.writes.load(Ordering::SeqCst), 2);
        assert_eq!(pusher.progress().dirty_chunks, 0);
        // Nothing dirty: nothing sent.
        pusher.flush().unwrap();
        assert_eq!(remote.writes.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn pushes_in_the_background_on_the_interval() {
        let (remote, pusher) =
            setup(&[0u8; 4096], PusherOptions { interval: Duration::from_millis(20), ..manual() });
        pusher.write_at(&[5u8; 100], 50).unwrap();
        // Nothing but the background thread pushes: the write reaching the remote is the check.
        wait_until("the background push", || contents(&remote.inner)[50..150] == [5u8; 100]);
        assert!(remote.writes.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn a_write_during_its_chunks_push_is_not_lost() {
        let (remote, pusher) = setup(&vec![0u8; (2 * CS) as usize], manual());
        let v1 = pattern(3, CS as usize);
        let v2 = pattern(4, CS as usize);
        pusher.write_at(&v1, 0).unwrap();
        remote.close_gate(false, true);
        std::thread::scope(|s| {
            let first = s.spawn(|| pusher.push());
            let _open = remote.open_on_drop();
            // The push has read v1 and is held in the remote write.
            remote.wait_held(1);
            pusher.write_at(&v2, 0).unwrap();
            remote.open_gate();
            first.join().unwrap().unwrap();
        });
        assert_eq!(contents(&remote.inner)[..CS as usize], v1[..]);
        assert!(pusher.synced().is_dirty(Chunk(0)), "the newer write must still be dirty");
        pusher.flush().unwrap();
        assert_eq!(contents(&remote.inner)[..CS as usize], v2[..]);
    }

    #[test]
    fn failed_pushes_keep_chunks_dirty_and_are_reported() {
        let (remote, pusher) = setup(&vec![0u8; (4 * CS) as usize], manual());
        pusher.write_at(&[1u8; 10], CS).unwrap();
        remote.fail_writes.store(true, Ordering::SeqCst);
        let err = pusher.flush().unwrap_err();
        assert!(err.to_string().contains("pushing chunks 1..2"), "{err}");
        let p = pusher.progress();
        assert_eq!((p.failed_cycles, p.dirty_chunks), (1, 1));
        assert!(p.last_error.is_some());
        remote.fail_writes.store(false, Ordering::SeqCst);
        pusher.flush().unwrap();
        assert_eq!(contents(&remote.inner)[CS as usize..(CS + 10) as usize], [1u8; 10]);
        assert!(pusher.progress().last_error.is_none());
    }

    #[test]
    fn the_background_retries_failed_pushes() {
        let (remote, pusher) = setup(
            &[0u8; 4096],
            PusherOptions {
                interval: Duration::from_millis(10),
                retry_backoff: Duration::from_millis(1),
                ..manual()
            },
        );
        remote.fail_next.store(5, Ordering::SeqCst);
        pusher.write_at(&[3u8; 4096], 0).unwrap();
        // Not `dirty_chunks == 0`: a push clears the dirty bits before it writes and sets them
        // again when the write fails, so they read zero for a moment in every failed cycle.
        wait_until("the retried push", || contents(&remote.inner) == vec![3u8; 4096]);
        // One cycle at a time, and a failed one is counted before the next starts.
        assert!(pusher.progress().failed_cycles >= 5);
    }

    #[test]
    fn a_cycle_pushes_what_the_cache_saw_written_behind_the_layers_back() {
        let remote = Arc::new(Probe::with_data(&vec![0u8; (2 * CS) as usize]));
        let cache = Arc::new(Recorder::new(2 * CS));
        let opts = SyncedOptions { chunk_size: CS, ..SyncedOptions::default() };
        let synced = Arc::new(Synced::with_cache(remote.clone(), Arc::clone(&cache), opts).unwrap());
        let pusher = Pusher::start(synced, manual()).unwrap();
        pusher.read_at(&mut [0u8; 1], CS).unwrap();
        // Written in the cache itself (as through a mapping), and reported by it.
        cache.inner.write_at(&[4u8; 3], CS + 10).unwrap();
        cache.behind_the_back.lock().unwrap().push(CS + 10..CS + 13);
        assert_eq!(pusher.push().unwrap().chunks, 1);
        assert_eq!(contents(&remote.inner)[(CS + 10) as usize..(CS + 13) as usize], [4u8; 3]);
    }

    #[test]
    fn without_an_interval_only_flush_and_close_push() {
        let (remote, pusher) = setup(&[0u8; 4096], PusherOptions { interval: Duration::MAX, ..manual() });
        pusher.write_at(&[6u8; 10], 0).unwrap();
        assert_eq!(pusher.progress().cycles, 0, "no background cycle ever starts");
        pusher.close().unwrap();
        assert_eq!(contents(&remote.inner)[..10], [6u8; 10]);
    }

    #[test]
    fn close_pushes_what_is_left() {
        let (remote, pusher) = setup(&[0u8; 4096], manual());
        pusher.write_at(&[8u8; 10], 0).unwrap();
        pusher.close().unwrap();
        assert_eq!(contents(&remote.inner)[..10], [8u8; 10]);
    }
}

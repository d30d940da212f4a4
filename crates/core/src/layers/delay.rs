//! A simulated network link in front of a backend, for tests and benchmarks.
//!
//! [`Delay`] makes every `read_at`, `write_at`, `flush`, `trim`, `write_zeroes` and `extents`
//! take at least `latency` (one round trip), as the r3map thesis simulated remote resources by
//! adding RTT. Concurrent calls wait concurrently, like requests in flight on a link, so latency
//! is hidden by parallelism as it is on a real network.
//!
//! With a bandwidth cap, the layer also models one shared link of that many bytes per second: a
//! call that moves `len` bytes (the buffer of a read or write; trims, zeroings, flushes and extent
//! queries move none) reserves `len / bandwidth` of the link, starting when the link is free,
//! and completes `latency` after its transfer ends. So `n` concurrent transfers of `len` bytes
//! take `n * len / bandwidth + latency` together.
//!
//! The wait comes first, then the inner call. The layer does not model packet loss, jitter,
//! request size limits or a cost for the answer's direction separately, and `size` and
//! `capabilities` never wait.
//!
//! Time comes from a [`Clock`]: the system's by default, or a [`ManualClock`] that moves only
//! when told to, so a test can see who waits and when they are let go without timing anything.

use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Extent, len64};

/// Where a [`Delay`] reads the time and waits.
pub trait Clock: fmt::Debug + Send + Sync {
    /// The current time.
    fn now(&self) -> Instant;

    /// Returns once [`Clock::now`] has reached `deadline` (at once if it has already).
    fn sleep_until(&self, deadline: Instant);
}

/// Real time: [`Instant::now`] and [`std::thread::sleep`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    }
}

/// A clock for tests: it stands still from its creation and moves only by
/// [`ManualClock::advance`], and it counts the threads sleeping on it.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    state: Mutex<ManualState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ManualState {
    elapsed: Duration,
    sleepers: usize,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    #[must_use]
    pub fn new() -> Self {
        Self { start: Instant::now(), state: Mutex::new(ManualState::default()), changed: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().expect("manual clock lock")
    }

    /// Moves the clock forward by `by`; sleepers whose deadline it reaches return.
    pub fn advance(&self, by: Duration) {
        self.lock().elapsed += by;
        self.changed.notify_all();
    }

    /// Threads inside [`Clock::sleep_until`] now.
    #[must_use]
    pub fn sleepers(&self) -> usize {
        self.lock().sleepers
    }

    /// Waits up to `timeout` of real time until at least `n` threads sleep on the clock; returns
    /// whether they do.
    #[must_use]
    pub fn wait_for_sleepers(&self, n: usize, timeout: Duration) -> bool {
        let (state, _) = self
            .changed
            .wait_timeout_while(self.lock(), timeout, |s| s.sleepers < n)
            .expect("manual clock lock");
        state.sleepers >= n
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.lock().elapsed
    }

    fn sleep_until(&self, deadline: Instant) {
        let mut state = self.lock();
        if self.start + state.elapsed >= deadline {
            return;
        }
        state.sleepers += 1;
        self.changed.notify_all();
        state =
            self.changed.wait_while(state, |s| self.start + s.elapsed < deadline).expect("manual clock lock");
        state.sleepers -= 1;
        drop(state);
        self.changed.notify_all();
    }
}

/// A simulated link of fixed latency and optional bandwidth; see the [module documentation](self).
pub struct Delay<B> {
    inner: B,
    latency: Duration,
    bytes_per_sec: Option<u64>,
    clock: Arc<dyn Clock>,
    /// When the link has finished every transfer reserved so far.
    link_free_at: Mutex<Instant>,
}

impl<B: Backend> Delay<B> {
    /// Every call waits `latency`; bandwidth is unlimited.
    #[must_use]
    pub fn new(inner: B, latency: Duration) -> Self {
        Self::with_bandwidth(inner, latency, None)
    }

    /// Every call waits `latency`, and calls share a link of `bytes_per_sec` bytes per second.
    /// `None` (or `Some(0)`) means unlimited bandwidth.
    #[must_use]
    pub fn with_bandwidth(inner: B, latency: Duration, bytes_per_sec: Option<u64>) -> Self {
        Self {
            inner,
            latency,
            bytes_per_sec: bytes_per_sec.filter(|&bw| bw > 0),
            clock: Arc::new(SystemClock),
            link_free_at: Mutex::new(Instant::now()),
        }
    }

    /// Takes the time from `clock` instead of the system's (a [`ManualClock`] in tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.link_free_at = Mutex::new(clock.now());
        self.clock = clock;
        self
    }

    /// Waits as long as a call moving `bytes` takes on the link.
    fn wait(&self, bytes: u64) {
        let deadline = match self.bytes_per_sec {
            Some(bw) if bytes > 0 => {
                let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(bw);
                let transfer = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                let mut free_at = self.link_free_at.lock().expect("delay link lock");
                let start = (*free_at).max(self.clock.now());
                *free_at = start + transfer;
                *free_at + self.latency
            }
            _ if self.latency.is_zero() => return,
            _ => self.clock.now() + self.latency,
        };
        self.clock.sleep_until(deadline);
    }
}

impl<B> Delay<B> {
    /// The latency every call waits.
    #[must_use]
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// The bandwidth cap in bytes per second, if any.
    #[must_use]
    pub fn bytes_per_sec(&self) -> Option<u64> {
        self.bytes_per_sec
    }
}

crate::impl_layer!(Delay { latency, bytes_per_sec });

impl<B: Backend> Backend for Delay<B> {
    crate::forward_backend!(inner, except read_at, read_many, write_at, flush, trim, write_zeroes, extents);

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.wait(len64(buf));
        self.inner.read_at(buf, off)
    }

    /// One latency for the whole batch (its reads travel together), plus the time of its bytes.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.wait(reads.iter().map(|(_, b)| len64(b)).sum());
        self.inner.read_many(reads)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.wait(len64(buf));
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.wait(0);
        self.inner.flush()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.wait(0);
        self.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.wait(0);
        self.inner.write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.wait(0);
        self.inner.extents(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SharedBackend;
    use crate::backends::Memory;
    use crate::conformance;
    use crate::pipeline::testutil::{PATIENCE, wait_until};

    fn timed(f: impl FnOnce()) -> Duration {
        let start = Instant::now();
        f();
        start.elapsed()
    }

    #[test]
    fn conformance_without_delay() {
        conformance::run(&|size| -> SharedBackend {
            Arc::new(Delay::new(Memory::new(size), Duration::ZERO))
        });
        conformance::run(&|size| -> SharedBackend {
            Arc::new(Delay::with_bandwidth(Memory::new(size), Duration::ZERO, Some(u64::MAX)))
        });
    }

    #[test]
    fn every_call_waits_the_latency() {
        let latency = Duration::from_millis(20);
        let d = Delay::new(Memory::new(4096), latency);
        assert!(timed(|| d.read_at(&mut [0u8; 10], 0).unwrap()) >= latency);
        assert!(timed(|| d.write_at(&[1u8; 10], 0).unwrap()) >= latency);
        assert!(timed(|| d.flush().unwrap()) >= latency);
        assert!(timed(|| d.trim(0, 10).unwrap()) >= latency);
        assert!(timed(|| d.write_zeroes(0, 10).unwrap()) >= latency);
        assert!(timed(|| drop(d.extents(0, 10).unwrap())) >= latency);
    }

    #[test]
    fn size_and_capabilities_do_not_wait() {
        let clock = Arc::new(ManualClock::new());
        let d = Arc::new(Delay::new(Memory::new(4096), Duration::from_secs(30)).with_clock(clock.clone()));
        // The clock never moves: a call that waited would sleep on it for ever.
        let (tx, rx) = std::sync::mpsc::channel();
        let caller = Arc::clone(&d);
        std::thread::spawn(move || tx.send((caller.size(), caller.capabilities())).unwrap());
        let mut answer = None;
        wait_until("size and capabilities", || {
            answer = answer.take().or_else(|| rx.try_recv().ok());
            answer.is_some() || clock.sleepers() > 0
        });
        assert_eq!(clock.sleepers(), 0, "size or capabilities waited");
        let (size, capabilities) = answer.unwrap();
        assert_eq!(size, 4096);
        assert!(capabilities.trim);
        assert_eq!(d.latency(), Duration::from_secs(30));
        assert_eq!(d.bytes_per_sec(), None);
    }

    #[test]
    fn concurrent_calls_wait_concurrently() {
        let latency = Duration::from_millis(50);
        let clock = Arc::new(ManualClock::new());
        let d = Arc::new(Delay::new(Memory::new(4096), latency).with_clock(clock.clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..4u8 {
            let (d, tx) = (Arc::clone(&d), tx.clone());
            std::thread::spawn(move || tx.send(d.write_at(&[i; 10], u64::from(i) * 10)).unwrap());
        }
        assert!(
            clock.wait_for_sleepers(4, PATIENCE),
            "calls were serialised: {} waited at once",
            clock.sleepers()
        );
        assert!(rx.try_recv().is_err(), "a call returned before its latency");
        // All four began at the same time, so one latency lets them all go.
        clock.advance(latency);
        for _ in 0..4 {
            rx.recv_timeout(PATIENCE).expect("every call ends one latency after they began").unwrap();
        }
        assert_eq!(clock.sleepers(), 0);
    }

    #[test]
    fn bandwidth_caps_transfers() {
        let d = Delay::with_bandwidth(Memory::new(2_000_000), Duration::ZERO, Some(10_000_000));
        assert_eq!(d.bytes_per_sec(), Some(10_000_000));
        let data = vec![1u8; 1_000_000];
        assert!(timed(|| d.write_at(&data, 0).unwrap()) >= Duration::from_millis(100));
        // The link is shared: two concurrent 500 KB reads take as long as one 1 MB transfer.
        let took = timed(|| {
            std::thread::scope(|s| {
                for i in 0..2u64 {
                    let d = &d;
                    s.spawn(move || d.read_at(&mut vec![0u8; 500_000], i * 500_000).unwrap());
                }
            });
        });
        assert!(took >= Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn latency_adds_to_transfer_time() {
        let d = Delay::with_bandwidth(Memory::new(100_000), Duration::from_millis(30), Some(1_000_000));
        // 50 KB at 1 MB/s is 50 ms, plus 30 ms.
        assert!(timed(|| d.write_at(&vec![1u8; 50_000], 0).unwrap()) >= Duration::from_millis(80));
        let zero = Delay::with_bandwidth(Memory::new(10), Duration::ZERO, Some(0));
        assert_eq!(zero.bytes_per_sec(), None, "zero means unlimited");
        assert!(format!("{zero:?}").contains("Delay"));
    }
}

//! A probing backend for the pipeline's tests: counts calls, fails on demand, holds calls at a
//! gate, and remembers the offsets it was asked for; a cache that records fills and writes apart
//! ([`Recorder`]). Also [`wait_until`], for the few conditions that have no event to wait on.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something that must happen before it calls it a hang.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `cond` until it holds; panics naming `what` after [`PATIENCE`]. Only for conditions
/// without an event to wait on: the outcome never depends on how long it takes.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "still waiting for {what} after {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

use super::cache::{Cache, Fault};
use crate::backend::{Backend, Capabilities};
use crate::backends::Memory;

#[derive(Debug, Default)]
struct Gate {
    closed: bool,
    /// Calls held at the gate now.
    waiting: usize,
    /// Calls that reached the closed gate so far (held, released or still held).
    arrived: usize,
    /// Held calls [`Probe::release`] lets through while the gate stays closed.
    permits: usize,
}

#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) inner: Memory,
    pub(crate) reads: AtomicU64,
    /// `read_many` calls (each also counts its ranges in `reads`).
    pub(crate) batches: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) fail_reads: AtomicBool,
    pub(crate) fail_writes: AtomicBool,
    /// Fail this many calls, then work.
    pub(crate) fail_next: AtomicU64,
    pub(crate) latency: Mutex<Duration>,
    pub(crate) read_offsets: Mutex<Vec<u64>>,
    gate_reads: AtomicBool,
    gate_writes: AtomicBool,
    gate: Mutex<Gate>,
    cv: Condvar,
}

impl Probe {
    pub(crate) fn new(inner: Memory) -> Self {
        Self {
            inner,
            reads: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            latency: Mutex::new(Duration::ZERO),
            read_offsets: Mutex::new(Vec::new()),
            gate_reads: AtomicBool::new(false),
            gate_writes: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn with_data(data: &[u8]) -> Self {
        Self::new(Memory::from_bytes(data))
    }

    /// Holds reads and/or writes at the gate until [`Probe::open_gate`].
    pub(crate) fn close_gate(&self, reads: bool, writes: bool) {
        self.gate.lock().unwrap().closed = true;
        self.gate_reads.store(reads, Ordering::SeqCst);
        self.gate_writes.store(writes, Ordering::SeqCst);
    }

    pub(crate) fn open_gate(&self) {
        self.gate.lock().unwrap().closed = false;
        self.cv.notify_all();
    }

    /// Opens the gate when the guard drops. Take it after starting whatever the gate holds (a
    /// puller, scoped threads), so that a failing assertion lets the held calls go before that is
    /// joined, and the test fails instead of hanging.
    pub(crate) fn open_on_drop(&self) -> OpenOnDrop<'_> {
        OpenOnDrop(self)
    }

    /// Lets `n` held (or future) calls through while the gate stays closed for the others.
    pub(crate) fn release(&self, n: usize) {
        self.gate.lock().unwrap().permits += n;
        self.cv.notify_all();
    }

    /// Waits until `n` calls are held at the gate.
    pub(crate) fn wait_held(&self, n: usize) {
        self.wait_gate(|g| g.waiting >= n, &format!("{n} calls held at the gate"));
    }

    /// Waits until `n` calls in all have reached the closed gate (released ones included).
    pub(crate) fn wait_arrived(&self, n: usize) {
        self.wait_gate(|g| g.arrived >= n, &format!("{n} calls to reach the gate"));
    }

    /// Calls that reached the closed gate so far.
    pub(crate) fn arrived(&self) -> usize {
        self.gate.lock().unwrap().arrived
    }

    fn wait_gate(&self, done: impl Fn(&Gate) -> bool, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        let mut g = self.gate.lock().unwrap();
        while !done(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "still waiting for {what} after {PATIENCE:?}: {g:?}");
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }

    fn pass(&self, gated: &AtomicBool) {
        let latency = *self.latency.lock().unwrap();
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        if gated.load(Ordering::SeqCst) {
            let mut g = self.gate.lock().unwrap();
            if g.closed {
                g.waiting += 1;
                g.arrived += 1;
                self.cv.notify_all();
                while g.closed && g.permits == 0 {
                    g = self.cv.wait(g).unwrap();
                }
                if g.closed {
                    g.permits -= 1;
                }
                g.waiting -= 1;
                self.cv.notify_all();
            }
        }
    }

    fn check(&self, fail: &AtomicBool, what: &str) -> io::Result<()> {
        let injected = fail.load(Ordering::SeqCst)
            || self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if injected {
            return Err(io::Error::other(format!("probe: {what} failed on purpose")));
        }
        Ok(())
    }
}

/// See [`Probe::open_on_drop`].
pub(crate) struct OpenOnDrop<'a>(&'a Probe);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open_gate();
    }
}

impl Backend for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.read_offsets.lock().unwrap().push(off);
        self.pass(&self.gate_reads);
        self.check(&self.fail_reads, "read")?;
        self.inner.read_at(buf, off)
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        for (off, buf) in reads.iter_mut() {
            self.read_at(buf, *off)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.pass(&self.gate_writes);
        self.check(&self.fail_writes, "write")?;
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(off, len)
    }
}

/// Deterministic non-zero bytes.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(1..=255)).collect()
}

/// The whole content of a backend.
pub(crate) fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; crate::geometry::to_usize(b.size())];
    b.read_at(&mut buf, 0).unwrap();
    buf
}

/// A call that reached a [`Recorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Fill { off: u64, len: u64, fault: Option<Fault> },
    Write { off: u64, len: u64 },
}

/// A cache over memory that records its fills and writes apart, and reports the ranges queued in
/// `behind_the_back` as written behind the layer's back.
#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) inner: Memory,
    pub(crate) calls: Mutex<Vec<Stored>>,
    pub(crate) behind_the_back: Mutex<Vec<Range<u64>>>,
}

impl Recorder {
    pub(crate) fn new(size: u64) -> Self {
        Self {
            inner: Memory::new(size),
            calls: Mutex::new(Vec::new()),
            behind_the_back: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn take_calls(&self) -> Vec<Stored> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Backend for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Stored::Write { off, len: crate::backend::len64(buf) });
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Cache for Recorder {
    fn fill(&self, buf: &[u8], off: u64, fault: Option<Fault>) -> io::Result<()> {
        self.calls.lock().unwrap().push(Stored::Fill { off, len: crate::backend::len64(buf), fault });
        self.inner.write_at(buf, off)
    }

    fn take_written(&self, written: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        for r in std::mem::take(&mut *self.behind_the_back.lock().unwrap()) {
            written(r);
        }
        Ok(())
    }
}

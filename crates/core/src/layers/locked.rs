//! A gate that holds I/O back until it is opened: a migration destination stays locked until
//! the migration is finalized.
//!
//! [`Locked`] lets `read_at`, `write_at`, `flush`, `trim`, `write_zeroes` and `extents` through
//! only while it is unlocked; while it is locked they block until [`Locked::unlock`]. `size` and
//! `capabilities` never block.
//!
//! [`Locked::lock`] closes the gate and then waits until every call already inside has returned,
//! so once it returns nothing touches the inner backend until the next `unlock`. The gate can be
//! locked and unlocked any number of times.
//!
//! It does not time out, cancel or fail blocked calls: a caller that must not wait forever checks
//! [`Locked::wait_unlocked`] first. It does not order the blocked calls: when the gate opens they
//! all proceed, in no particular order.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Extent};

/// Holds I/O back while locked; see the [module documentation](self).
pub struct Locked<B> {
    inner: B,
    state: Mutex<State>,
    /// Signalled when the gate opens.
    opened: Condvar,
    /// Signalled when the last call in flight leaves.
    drained: Condvar,
}

#[derive(Debug)]
struct State {
    locked: bool,
    in_flight: u64,
    /// Callers blocked in the layer (see [`Locked::waiting`]).
    waiting: u64,
}

/// A call inside the gate; leaving (even by unwinding) lets `lock` know.
struct Pass<'a, B> {
    gate: &'a Locked<B>,
}

impl<B> Drop for Pass<'_, B> {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.gate.drained.notify_all();
        }
    }
}

impl<B: Backend> Locked<B> {
    /// Wraps `inner`, with the gate closed when `locked` is true.
    #[must_use]
    pub fn new(inner: B, locked: bool) -> Self {
        Self {
            inner,
            state: Mutex::new(State { locked, in_flight: 0, waiting: 0 }),
            opened: Condvar::new(),
            drained: Condvar::new(),
        }
    }
}

impl<B> Locked<B> {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("locked layer state lock")
    }

    /// Waits for the gate to be open and enters it.
    fn enter(&self) -> Pass<'_, B> {
        let mut state = self.state();
        if state.locked {
            state.waiting += 1;
            state = self.opened.wait_while(state, |s| s.locked).expect("locked layer state lock");
            state.waiting -= 1;
        }
        state.in_flight += 1;
        Pass { gate: self }
    }

    /// Closes the gate and waits until every call already inside has returned.
    ///
    /// If another thread unlocks while this one waits, it returns at once: the last of the two
    /// calls wins.
    pub fn lock(&self) {
        let mut state = self.state();
        state.locked = true;
        if state.in_flight > 0 {
            state.waiting += 1;
            state = self
                .drained
                .wait_while(state, |s| s.locked && s.in_flight > 0)
                .expect("locked layer state lock");
            state.waiting -= 1;
        }
    }

    /// Opens the gate and wakes every blocked call.
    pub fn unlock(&self) {
        self.state().locked = false;
        self.opened.notify_all();
    }

    /// Whether the gate is closed.
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.state().locked
    }

    /// Waits up to `timeout` for the gate to be open; returns whether it is.
    #[must_use]
    pub fn wait_unlocked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        if !state.locked {
            return true;
        }
        state.waiting += 1;
        while state.locked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.opened.wait_timeout(state, left).expect("locked layer state lock").0;
        }
        state.waiting -= 1;
        !state.locked
    }

    /// Number of calls inside the gate now.
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.state().in_flight
    }

    /// Number of callers blocked in the layer now: calls and [`Locked::wait_unlocked`] waiting
    /// for the gate to open, and [`Locked::lock`] waiting for the calls inside to return.
    #[must_use]
    pub fn waiting(&self) -> u64 {
        self.state().waiting
    }
}

crate::impl_layer!(Locked { locked = is_locked(), in_flight = in_flight(), waiting = waiting() });

impl<B: Backend> Backend for Locked<B> {
    crate::forward_backend!(inner, except read_at, read_many, write_at, flush, trim, write_zeroes, extents);

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.read_at(buf, off)
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.read_many(reads)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.flush()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let _pass = self.enter();
        self.inner.write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _pass = self.enter();
        self.inner.extents(off, len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::backend::SharedBackend;
    use crate::backends::Memory;
    use crate::conformance;
    use crate::pipeline::testutil::{PATIENCE, wait_until};

    /// Runs `op` on a thread; the receiver gets its result when it returns.
    fn spawn_io(
        l: &Arc<Locked<Memory>>,
        op: impl FnOnce(&Locked<Memory>) -> io::Result<()> + Send + 'static,
    ) -> mpsc::Receiver<io::Result<()>> {
        let (tx, rx) = mpsc::channel();
        let l = Arc::clone(l);
        std::thread::spawn(move || {
            let _ = tx.send(op(&l));
        });
        rx
    }

    /// Waits until `n` callers are blocked in `l`, or one of `pending` has returned (it went
    /// through when it should have blocked); then checks that none has.
    fn assert_blocked<B, T: std::fmt::Debug>(l: &Locked<B>, n: u64, pending: &[&mpsc::Receiver<T>]) {
        let mut early = None;
        wait_until(&format!("{n} callers blocked at the gate"), || {
            early = pending
                .iter()
                .position(|rx| matches!(rx.try_recv(), Ok(_) | Err(mpsc::TryRecvError::Disconnected)));
            l.waiting() >= n || early.is_some()
        });
        assert_eq!(early, None, "caller {early:?} went through a locked gate");
    }

    #[test]
    fn conformance_unlocked() {
        conformance::run(&|size| -> SharedBackend { Arc::new(Locked::new(Memory::new(size), false)) });
    }

    #[test]
    fn io_blocks_while_locked_and_proceeds_after_unlock() {
        let l = Arc::new(Locked::new(Memory::new(8192), true));
        assert!(l.is_locked());
        // size and capabilities never block.
        assert_eq!(l.size(), 8192);
        assert!(l.capabilities().trim);

        let write = spawn_io(&l, |l| l.write_at(&[5u8; 10], 100));
        let read = spawn_io(&l, |l| l.read_at(&mut [0u8; 10], 100));
        let flush = spawn_io(&l, Backend::flush);
        let trim = spawn_io(&l, |l| l.trim(4096, 4096));
        let extents = spawn_io(&l, |l| l.extents(0, 8192).map(drop));
        assert_blocked(&l, 5, &[&write, &read, &flush, &trim, &extents]);
        assert_eq!(l.in_flight(), 0);
        assert!(!l.wait_unlocked(Duration::from_millis(10)));
        assert_eq!(l.inner().read_at(&mut [0u8; 10], 100).ok(), Some(()));
        assert_eq!(l.waiting(), 5);

        l.unlock();
        assert!(!l.is_locked());
        assert!(l.wait_unlocked(Duration::ZERO));
        for rx in [write, read, flush, trim, extents] {
            rx.recv_timeout(PATIENCE).expect("I/O proceeds after unlock").unwrap();
        }
        assert_eq!(l.waiting(), 0);
        let mut back = [0u8; 10];
        l.read_at(&mut back, 100).unwrap();
        assert_eq!(back, [5u8; 10]);
    }

    #[test]
    fn wait_unlocked_wakes_on_unlock() {
        let l = Arc::new(Locked::new(Memory::new(10), true));
        let (tx, rx) = mpsc::channel();
        let waiter = Arc::clone(&l);
        std::thread::spawn(move || {
            // Far longer than the test waits: returning `true` means unlock woke it.
            let _ = tx.send(waiter.wait_unlocked(Duration::from_secs(24 * 3600)));
        });
        assert_blocked(&l, 1, &[&rx]);
        l.unlock();
        assert_eq!(rx.recv_timeout(PATIENCE), Ok(true));
    }

    /// A backend whose reads block in the middle until the test lets them go.
    struct Slow {
        entered: Barrier,
        release: Barrier,
    }

    impl Backend for Slow {
        fn size(&self) -> u64 {
            100
        }
        fn read_at(&self, buf: &mut [u8], _off: u64) -> io::Result<()> {
            self.entered.wait();
            self.release.wait();
            buf.fill(1);
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lock_waits_for_io_in_flight() {
        let l = Arc::new(Locked::new(Slow { entered: Barrier::new(2), release: Barrier::new(2) }, false));
        let reader = {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4];
                l.read_at(&mut buf, 0).map(|()| buf)
            })
        };
        l.inner().entered.wait(); // the read is inside the inner backend now
        assert_eq!(l.in_flight(), 1);

        let (tx, rx) = mpsc::channel();
        let locker = Arc::clone(&l);
        std::thread::spawn(move || {
            locker.lock();
            let _ = tx.send(locker.in_flight());
        });
        // The read stays inside until released below, so `lock` must be waiting for it.
        assert_blocked(&l, 1, &[&rx]);
        assert!(l.is_locked(), "the gate closes before the wait");

        l.inner().release.wait();
        assert_eq!(rx.recv_timeout(PATIENCE), Ok(0));
        assert_eq!(reader.join().unwrap().unwrap(), [1u8; 4]);
        assert!(l.is_locked());
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn gate_can_be_locked_again() {
        let l = Arc::new(Locked::new(Memory::new(100), false));
        l.write_at(&[1], 0).unwrap();
        l.lock();
        l.lock();
        let write = spawn_io(&l, |l| l.write_at(&[2], 0));
        assert_blocked(&l, 1, &[&write]);
        l.unlock();
        write.recv_timeout(PATIENCE).unwrap().unwrap();
        l.lock();
        let read = spawn_io(&l, |l| {
            let mut b = [0u8];
            l.read_at(&mut b, 0)?;
            assert_eq!(b, [2]);
            Ok(())
        });
        assert_blocked(&l, 1, &[&read]);
        l.unlock();
        read.recv_timeout(PATIENCE).unwrap().unwrap();
        let text = format!("{l:?}");
        assert!(text.contains("locked: false") && text.contains("waiting: 0"), "{text}");
    }
}

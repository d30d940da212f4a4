//! Dirty-chunk tracking for migration and write-back, with the semantics of r3map's tracking
//! layer.
//!
//! [`Tracked`] records which chunks writes touched between [`Tracked::track`] and
//! [`Tracked::sync`]:
//! - `track()` turns tracking on (it does nothing if tracking is already on, and it does not
//!   clear chunks still marked from an earlier cycle).
//! - While tracking is on, every `write_at`, `trim` and `write_zeroes` that **succeeds** marks the
//!   chunks its range touched dirty. A call that fails marks nothing.
//! - `sync()` returns the dirty chunks in ascending order, clears them and turns tracking off, as
//!   the original did: writes before `track()` or after `sync()` are not recorded.
//!
//! # The rule for concurrent writes
//! A write is recorded when tracking is on at the moment its inner write has returned: the layer
//! writes to the inner backend first, then checks the flag, then marks. So a chunk found in the
//! dirty set already has its new data in the inner backend. `sync()` turns the flag off first,
//! then takes each dirty bit with an atomic clear, so a write that completes concurrently with
//! `sync()` is either in the returned set or still marked for the next cycle; it is never lost.
//! (A write that saw the flag on just before `sync()` turned it off may mark its chunks after
//! `sync()` collected: they are returned by the next `track()`/`sync()` cycle.)
//!
//! It does not copy data, keep old versions of chunks, or track reads. The data of the marked
//! chunks is the inner backend's; callers read it from there.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{Backend, len64};
use crate::bitmap::AtomicBitmap;
use crate::geometry::{Chunk, Geometry};

/// Marks the chunks written while tracking is on; see the [module documentation](self).
pub struct Tracked<B> {
    inner: B,
    geometry: Geometry,
    dirty: AtomicBitmap,
    tracking: AtomicBool,
}

impl<B: Backend> Tracked<B> {
    /// Wraps `inner`, tracking chunks of `chunk_size` bytes; tracking starts off.
    ///
    /// # Errors
    /// `InvalidInput` when `chunk_size` is zero.
    pub fn new(inner: B, chunk_size: u64) -> io::Result<Self> {
        let geometry = Geometry::new(inner.size(), chunk_size)?;
        Ok(Self {
            inner,
            dirty: AtomicBitmap::new(geometry.chunks()),
            geometry,
            tracking: AtomicBool::new(false),
        })
    }

    /// Marks the chunks of a completed write, if tracking is on now.
    fn mark(&self, off: u64, len: u64) {
        if !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        for chunk in self.geometry.chunks_touched(off, len) {
            self.dirty.set(chunk);
        }
    }
}

impl<B> Tracked<B> {
    /// Turns tracking on; does nothing if it is already on.
    pub fn track(&self) {
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Returns the dirty chunks in ascending order, clears them and turns tracking off.
    ///
    /// Writes completing concurrently are either returned or left marked for the next cycle.
    #[must_use = "the dirty chunks are cleared; dropping them loses them"]
    pub fn sync(&self) -> Vec<Chunk> {
        self.tracking.store(false, Ordering::SeqCst);
        self.take_dirty()
    }

    /// Returns the dirty chunks in ascending order and clears them, leaving tracking as it is:
    /// one round of an iterative pre-copy, which re-sends what was written since the last round.
    ///
    /// Writes completing concurrently are either returned or left marked for the next round.
    #[must_use = "the dirty chunks are cleared; dropping them loses them"]
    pub fn take_dirty(&self) -> Vec<Chunk> {
        let len = self.dirty.len();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(bit) = self.dirty.next_set(pos, len) {
            // The atomic clear decides: a bit set again after it stays for the next cycle.
            if self.dirty.clear(bit) {
                out.push(Chunk(bit));
            }
            pos = bit + 1;
        }
        out
    }

    /// Whether tracking is on.
    #[must_use]
    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Number of chunks marked dirty now.
    #[must_use]
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count_ones()
    }

    /// The chunk geometry dirty chunks are counted in.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}

crate::impl_layer!(Tracked { geometry, tracking = is_tracking(), dirty = dirty_count() });

impl<B: Backend> Backend for Tracked<B> {
    crate::forward_backend!(inner, except write_at, trim, write_zeroes);

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)?;
        self.mark(off, len64(buf));
        Ok(())
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.trim(off, len)?;
        self.mark(off, len);
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(off, len)?;
        self.mark(off, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::backend::SharedBackend;
    use crate::backends::Memory;
    use crate::conformance;

    fn tracked() -> Tracked<Memory> {
        Tracked::new(Memory::new(10 * 4096 + 100), 4096).unwrap()
    }

    #[test]
    fn conformance_with_tracking_on() {
        conformance::run(&|size| -> SharedBackend {
            let t = Tracked::new(Memory::new(size), 4096).unwrap();
            t.track();
            Arc::new(t)
        });
    }

    #[test]
    fn nothing_is_recorded_before_track() {
        let t = tracked();
        assert!(!t.is_tracking());
        t.write_at(&[1u8; 10], 0).unwrap();
        assert_eq!(t.dirty_count(), 0);
        t.track();
        t.track();
        assert!(t.is_tracking());
        t.write_at(&[1u8; 10], 8192).unwrap();
        assert_eq!(t.sync(), vec![Chunk(2)]);
        assert!(!t.is_tracking(), "sync turns tracking off");
        t.write_at(&[1u8; 10], 4096).unwrap();
        assert_eq!(t.sync(), vec![], "writes after sync are not recorded");
    }

    #[test]
    fn a_chunk_written_twice_appears_once() {
        let t = tracked();
        t.track();
        t.write_at(&[1u8; 10], 4096).unwrap();
        t.write_at(&[2u8; 10], 5000).unwrap();
        assert_eq!(t.dirty_count(), 1);
        assert_eq!(t.sync(), vec![Chunk(1)]);
    }

    #[test]
    fn a_second_cycle_returns_only_the_new_delta() {
        let t = tracked();
        t.track();
        t.write_at(&[1u8; 10], 0).unwrap();
        t.write_at(&[1u8; 10], 9 * 4096).unwrap();
        assert_eq!(t.sync(), vec![Chunk(0), Chunk(9)]);
        assert_eq!(t.dirty_count(), 0);
        t.track();
        t.write_at(&[1u8; 10], 3 * 4096).unwrap();
        assert_eq!(t.sync(), vec![Chunk(3)]);
    }

    #[test]
    fn a_write_spanning_chunks_marks_each() {
        let t = tracked();
        t.track();
        t.write_at(&vec![1u8; 2 * 4096 + 2], 4095).unwrap();
        assert_eq!(t.sync(), vec![Chunk(0), Chunk(1), Chunk(2), Chunk(3)]);
        t.track();
        // The short tail chunk is a chunk like any other; an empty write marks nothing.
        t.write_at(&[1u8; 100], 10 * 4096).unwrap();
        t.write_at(&[], 0).unwrap();
        assert_eq!(t.sync(), vec![Chunk(10)]);
    }

    #[test]
    fn trim_and_zeroes_mark_and_failures_do_not() {
        let t = tracked();
        t.track();
        t.trim(0, 4097).unwrap();
        t.write_zeroes(5 * 4096, 10).unwrap();
        assert!(t.write_at(&[1u8; 200], 10 * 4096).is_err());
        assert!(t.trim(10 * 4096, 101).is_err());
        assert_eq!(t.sync(), vec![Chunk(0), Chunk(1), Chunk(5)]);
    }

    #[test]
    fn writes_concurrent_with_sync_are_never_lost() {
        const CHUNKS: u64 = 4096;
        let t = Arc::new(Tracked::new(Memory::new(CHUNKS * 512), 512).unwrap());
        t.track();
        let done = Arc::new(Mutex::new(Vec::new()));
        let (first, completed_before) = std::thread::scope(|s| {
            for w in 0..4u64 {
                let t = Arc::clone(&t);
                let done = Arc::clone(&done);
                s.spawn(move || {
                    for c in (w..CHUNKS).step_by(4) {
                        t.write_at(&[1u8; 8], c * 512).unwrap();
                        done.lock().unwrap().push(c);
                    }
                });
            }
            // Let some writes land, then sync while writers are running.
            while done.lock().unwrap().len() < 200 {
                std::thread::yield_now();
            }
            let completed_before: Vec<u64> = done.lock().unwrap().clone();
            (t.sync(), completed_before)
        });
        t.track();
        let second = t.sync();
        let first_set: std::collections::HashSet<u64> = first.iter().map(|c| c.0).collect();
        for c in &completed_before {
            assert!(first_set.contains(c), "chunk {c} was written before sync but not returned");
        }
        // Everything returned was written; nothing is returned twice.
        let written: std::collections::HashSet<u64> = done.lock().unwrap().iter().copied().collect();
        for c in first.iter().chain(&second) {
            assert!(written.contains(&c.0), "{c} was never written");
        }
        assert!(first.windows(2).all(|w| w[0] < w[1]), "ascending");
        assert!(second.iter().all(|c| !first_set.contains(&c.0)));
    }

    #[test]
    fn debug_shows_state() {
        let inner: SharedBackend = Arc::new(Memory::new(4096));
        let t = Tracked::new(inner, 512).unwrap();
        t.track();
        t.write_at(&[1], 0).unwrap();
        let text = format!("{t:?}");
        assert!(text.contains("tracking: true") && text.contains("dirty: 1"), "{text}");
        assert_eq!(t.into_inner().size(), 4096);
    }
}

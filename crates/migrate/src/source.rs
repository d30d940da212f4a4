//! [`Source`]: the resource at the migration source, as the application writes it and as the
//! destination sees it through the seeder operations.

use std::fmt;
use std::io;
use std::sync::Mutex;

use r3map_core::{Backend, Capabilities, Chunk, Extent, Seeder, Tracked};

/// A hook of the source: suspend the application and flush its state, or clean up.
pub type SourceHook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// What the source does at the two moments only it can act on.
#[derive(Default)]
pub struct SourceHooks {
    /// Called when a destination starts tracking, after tracking is on.
    pub after_track: Option<SourceHook>,
    /// Called by the final `sync`, before the dirty set is taken: suspend the application and
    /// flush what it holds in memory, so that nothing is written after. An error fails the
    /// `sync` and leaves the dirty set as it was, so the destination may try again.
    pub before_sync: Option<SourceHook>,
    /// Called when the destination closes the migration after a successful `sync`: the source
    /// may now stop the application for good and free the resource.
    pub before_close: Option<SourceHook>,
}

impl fmt::Debug for SourceHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHooks")
            .field("after_track", &self.after_track.is_some())
            .field("before_sync", &self.before_sync.is_some())
            .field("before_close", &self.before_close.is_some())
            .finish()
    }
}

/// Where a source is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// No destination has started tracking yet.
    Idle,
    /// A destination is copying; the application still runs here.
    Tracking,
    /// The final dirty set went out: the application runs at the destination now.
    Synced,
    /// The destination closed the migration.
    Closed,
}

/// A backend being migrated away: the application reads and writes it as usual, and a
/// destination calls the [`Seeder`] operations on it (usually over the network, by exporting it
/// with `r3map_net::Export::with_seeder`).
///
/// Only the destination acts: `track` starts recording written chunks, `take_dirty` rounds of the
/// iterative pre-copy collect what was written since the previous round, and the final `sync` runs
/// [`SourceHooks::before_sync`] (the application is suspended) and returns what is left. `close`
/// counts only after a `sync`, so a destination that gives up early leaves the source as it was.
pub struct Source<B> {
    tracked: Tracked<B>,
    hooks: SourceHooks,
    phase: Mutex<SourcePhase>,
}

impl<B: Backend> Source<B> {
    /// Wraps `backend`, recording writes in chunks of `chunk_size` bytes once a destination
    /// starts tracking.
    ///
    /// # Errors
    /// `InvalidInput` for a zero chunk size.
    pub fn new(backend: B, chunk_size: u64, hooks: SourceHooks) -> io::Result<Self> {
        Ok(Self { tracked: Tracked::new(backend, chunk_size)?, hooks, phase: Mutex::new(SourcePhase::Idle) })
    }

    /// Where the migration is.
    #[must_use]
    pub fn phase(&self) -> SourcePhase {
        *self.lock()
    }

    /// The wrapped backend.
    #[must_use]
    pub fn inner(&self) -> &B {
        self.tracked.inner()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SourcePhase> {
        self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<B> fmt::Debug for Source<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("phase", &*self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Seeder for Source<B> {
    fn chunk_size(&self) -> u64 {
        self.tracked.geometry().chunk_size()
    }

    fn track(&self) -> io::Result<()> {
        let mut phase = self.lock();
        self.tracked.track();
        *phase = SourcePhase::Tracking;
        drop(phase);
        tracing::info!("migration: the destination started tracking");
        if let Some(hook) = &self.hooks.after_track {
            hook()?;
        }
        Ok(())
    }

    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        if *self.lock() != SourcePhase::Tracking {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no migration is tracking writes here"));
        }
        let dirty = self.tracked.take_dirty();
        tracing::debug!(chunks = dirty.len(), "migration: pre-copy round");
        Ok(dirty)
    }

    fn sync(&self) -> io::Result<Vec<Chunk>> {
        let mut phase = self.lock();
        if *phase != SourcePhase::Tracking {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sync without a migration tracking writes",
            ));
        }
        if let Some(hook) = &self.hooks.before_sync {
            hook()?;
        }
        self.tracked.flush()?;
        let dirty = self.tracked.sync();
        *phase = SourcePhase::Synced;
        tracing::info!(chunks = dirty.len(), "migration: final dirty set sent; the application moves on");
        Ok(dirty)
    }

    fn close(&self) -> io::Result<()> {
        let mut phase = self.lock();
        if *phase != SourcePhase::Synced {
            // A destination that leaves before the final sync changes nothing here.
            return Ok(());
        }
        if let Some(hook) = &self.hooks.before_close {
            hook()?;
        }
        *phase = SourcePhase::Closed;
        tracing::info!("migration: closed by the destination");
        Ok(())
    }
}

impl<B: Backend> Backend for Source<B> {
    fn size(&self) -> u64 {
        self.tracked.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.tracked.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.tracked.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.tracked.flush()
    }

    fn capabilities(&self) -> Capabilities {
        self.tracked.capabilities()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.tracked.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.tracked.write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.tracked.extents(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::Memory;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn phases_and_hooks() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, b, t) = (Arc::clone(&calls), Arc::clone(&calls), Arc::clone(&calls));
        let hooks = SourceHooks {
            after_track: Some(Box::new(move || {
                t.fetch_add(100, Ordering::SeqCst);
                Ok(())
            })),
            before_sync: Some(Box::new(move || {
                a.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })),
            before_close: Some(Box::new(move || {
                b.fetch_add(10, Ordering::SeqCst);
                Ok(())
            })),
        };
        let s = Source::new(Memory::new(1 << 16), 4096, hooks).unwrap();
        // Closing or syncing before tracking does nothing or is refused.
        s.close().unwrap();
        assert!(s.sync().is_err());
        assert!(s.take_dirty().is_err());
        s.track().unwrap();
        s.write_at(&[1], 4096).unwrap();
        assert_eq!(s.take_dirty().unwrap(), vec![Chunk(1)]);
        s.write_at(&[1], 0).unwrap();
        assert_eq!(s.sync().unwrap(), vec![Chunk(0)]);
        assert_eq!(calls.load(Ordering::SeqCst), 101);
        assert_eq!(s.phase(), SourcePhase::Synced);
        s.close().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 111);
        assert_eq!(s.phase(), SourcePhase::Closed);
    }

    #[test]
    fn a_failing_suspend_keeps_the_dirty_set() {
        let hooks = SourceHooks {
            before_sync: Some(Box::new(|| Err(io::Error::other("cannot suspend")))),
            ..Default::default()
        };
        let s = Source::new(Memory::new(1 << 16), 4096, hooks).unwrap();
        s.track().unwrap();
        s.write_at(&[1], 0).unwrap();
        assert!(s.sync().is_err());
        assert_eq!(s.phase(), SourcePhase::Tracking);
        assert_eq!(s.take_dirty().unwrap(), vec![Chunk(0)]);
    }
}

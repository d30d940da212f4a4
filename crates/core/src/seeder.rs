//! [`Seeder`]: the source side of a migration, as the network protocols expose it.

use std::io;

use crate::backend::Backend;
use crate::geometry::Chunk;
use crate::layers::Tracked;

/// A resource whose writes can be tracked between [`track`](Seeder::track) and
/// [`sync`](Seeder::sync): what a migration destination calls on the source. The protocol is
/// one-way: only the destination calls, so the source never dials out.
pub trait Seeder: Send + Sync {
    /// Size of the chunks [`sync`](Seeder::sync) reports.
    fn chunk_size(&self) -> u64;

    /// Starts recording which chunks are written.
    ///
    /// # Errors
    /// Whatever prevents tracking (a remote seeder that cannot be reached).
    fn track(&self) -> io::Result<()>;

    /// Returns the chunks written since [`track`](Seeder::track), in ascending order, and stops
    /// tracking. Implementations that wrap an application suspend it and flush first.
    ///
    /// # Errors
    /// A failed flush or suspension; nothing is cleared then.
    fn sync(&self) -> io::Result<Vec<Chunk>>;

    /// Returns the chunks written since [`track`](Seeder::track) or the previous call, in
    /// ascending order, and keeps tracking, without suspending anything: a round of an iterative
    /// pre-copy, so the final [`sync`](Seeder::sync) has less left to report.
    ///
    /// # Errors
    /// `Unsupported` by default (a source that can only report once); what prevents it otherwise.
    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this seeder cannot report dirty chunks before sync"))
    }

    /// The destination is done with the source.
    ///
    /// # Errors
    /// Whatever the implementation's clean-up reports.
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

impl<B: Backend> Seeder for Tracked<B> {
    fn chunk_size(&self) -> u64 {
        self.geometry().chunk_size()
    }

    fn track(&self) -> io::Result<()> {
        Tracked::track(self);
        Ok(())
    }

    fn sync(&self) -> io::Result<Vec<Chunk>> {
        self.flush()?;
        Ok(Tracked::sync(self))
    }

    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        Ok(Tracked::take_dirty(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::Memory;

    #[test]
    fn a_tracked_backend_is_a_seeder() {
        let t = Tracked::new(Memory::new(1 << 20), 4096).unwrap();
        let seeder: &dyn Seeder = &t;
        seeder.track().unwrap();
        t.write_at(&[1], 5000).unwrap();
        t.write_at(&[1], 0).unwrap();
        assert_eq!(seeder.take_dirty().unwrap(), vec![Chunk(0), Chunk(1)]);
        assert!(t.is_tracking(), "a round keeps tracking");
        t.write_at(&[1], 5000).unwrap();
        assert_eq!(seeder.sync().unwrap(), vec![Chunk(1)]);
        assert_eq!(seeder.chunk_size(), 4096);
        seeder.close().unwrap();
    }
}

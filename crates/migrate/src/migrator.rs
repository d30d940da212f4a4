//! [`Migrator`]: the one-step API of a host in a chain of migrations (A → B → C).

use std::fmt;
use std::io;
use std::sync::Arc;

use r3map_core::{Locked, SharedBackend, Synced};

use crate::leecher::{Leecher, LeecherHooks, LeecherOptions, SeederRemote};
use crate::source::{Source, SourceHooks};

/// The destination's view of the resource, as [`Leecher::backend`] returns it.
pub type LeecherView = Arc<Locked<Arc<Synced>>>;

/// A host that takes a resource over from a source and can then be the source of the next hop,
/// with one backend for its application throughout (the Go r3map's migrators, without their
/// remount: nothing is swapped under the application).
///
/// [`Migrator::backend`] is what the application here uses from the start: a [`Source`] over the
/// leecher's view, so it is locked until [`Leecher::finalize`], reads through the pull after it,
/// and records writes for the next hop once one starts tracking. [`Migrator::seed`] waits for the
/// post-copy, releases the previous source and returns that same source, to be exported (for
/// example with `r3map_net::Export::with_seeder`) for the next destination.
pub struct Migrator {
    leecher: Leecher,
    source: Arc<Source<LeecherView>>,
}

impl fmt::Debug for Migrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migrator").field("leecher", &self.leecher).field("source", &self.source).finish()
    }
}

impl Migrator {
    /// Starts taking the resource over from `remote` into `local` (see [`Leecher::open`]);
    /// `next` are the hooks of this host's own source for the next hop (suspend the application
    /// here when that hop finalizes).
    ///
    /// # Errors
    /// As [`Leecher::open`].
    pub fn leech(
        remote: Arc<dyn SeederRemote>,
        local: SharedBackend,
        options: LeecherOptions,
        hooks: LeecherHooks,
        next: SourceHooks,
    ) -> io::Result<Self> {
        let chunk_size = remote.chunk_size();
        let leecher = Leecher::open(remote, local, options, hooks)?;
        let source = Arc::new(Source::new(leecher.backend(), chunk_size, next)?);
        Ok(Self { leecher, source })
    }

    /// The application's backend on this host, before and after the hand-off.
    #[must_use]
    pub fn backend(&self) -> Arc<Source<LeecherView>> {
        Arc::clone(&self.source)
    }

    /// The migration in: [`Leecher::precopy`], [`Leecher::finalize`], progress.
    #[must_use]
    pub fn leecher(&self) -> &Leecher {
        &self.leecher
    }

    /// Waits until everything is local, releases the previous source (its `close`), and returns
    /// this host's source for the next hop: the same object as [`Migrator::backend`].
    ///
    /// # Errors
    /// Not finalized, the post-copy failed, or the previous source's `close` failed.
    pub fn seed(self) -> io::Result<Arc<Source<LeecherView>>> {
        self.leecher.wait()?;
        self.leecher.close()?;
        Ok(self.source)
    }
}

//! The managed stack: a [`Synced`] cache of a remote, with a background [`Puller`] and a
//! background [`Pusher`], started in one call and closed in one order.
//!
//! Every frontend that makes a remote resource usable locally (mounts, the migration
//! destination, the demo) builds the same three parts; [`Managed`] is that stack, so that the
//! order in which they start and stop is written once:
//!
//! ```text
//!   frontend ──▶ Pusher (tracks writes, pushes them in the background)
//!                  └─▶ Synced (pulls a chunk on first access) ──▶ remote
//!                        ▲          └─▶ local (the cache)
//!                      Puller (pulls the rest in the background)
//! ```
//!
//! Closing stops the background pull (requests in flight complete first), stops the background
//! push and pushes what is still dirty, then flushes the remote: nothing written locally is
//! left behind unless the final push fails, and then it stays dirty in the local backend.
//!
//! The cache is any [`SharedBackend`] ([`Managed::start`]) or a [`Cache`] type of its own
//! ([`Managed::start_with_cache`]): a frontend that serves the cache's memory itself (a
//! userfaultfd region) brings a cache that fills without overwriting and reports the writes it
//! saw, which the pusher collects before every cycle.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::backend::{Backend, SharedBackend};
use crate::pipeline::cache::Cache;
use crate::pipeline::puller::PullerOptions;
use crate::pipeline::pusher::PusherOptions;
use crate::pipeline::synced::SyncedOptions;
use crate::pipeline::{Puller, Pusher, Synced};

/// How a [`Managed`] stack is built.
pub struct ManagedOptions {
    /// Chunk size, on-demand request size and the chunk hook of the [`Synced`] layer.
    pub synced: SyncedOptions,
    /// The background pull; `None` pulls on demand only.
    pub pull: Option<PullerOptions>,
    /// The background push; `None` keeps writes local (a copy-on-write overlay of the remote).
    pub push: Option<PusherOptions>,
}

impl Default for ManagedOptions {
    /// The default chunk size; pull and push in the background with their default options.
    fn default() -> Self {
        Self {
            synced: SyncedOptions::default(),
            pull: Some(PullerOptions::default()),
            push: Some(PusherOptions::default()),
        }
    }
}

impl fmt::Debug for ManagedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedOptions")
            .field("synced", &self.synced)
            .field("pull", &self.pull.is_some())
            .field("push", &self.push)
            .finish()
    }
}

/// A remote made usable locally: see the module docs. Dropping it closes it, logging a failed
/// final push; [`Managed::close`] returns that error instead.
pub struct Managed<L: Cache + ?Sized + 'static = dyn Backend> {
    synced: Arc<Synced<L>>,
    puller: Option<Puller<L>>,
    pusher: Option<Arc<Pusher<L>>>,
}

impl<L: Cache + ?Sized + 'static> fmt::Debug for Managed<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("geometry", &self.synced.geometry())
            .field("pull", &self.puller.is_some())
            .field("push", &self.pusher.is_some())
            .finish()
    }
}

impl Managed {
    /// Builds the stack over `remote` with `local` as its cache and starts the background pull,
    /// then the background push. The pull starts first, so it runs while the caller sets up its
    /// frontend.
    ///
    /// # Errors
    /// `InvalidInput` for bad options (a local backend smaller than the remote, a request smaller
    /// than a chunk); an error starting a background thread.
    pub fn start(remote: SharedBackend, local: SharedBackend, options: ManagedOptions) -> io::Result<Self> {
        Self::start_with_cache(remote, local, options)
    }
}

impl<L: Cache + ?Sized + 'static> Managed<L> {
    /// As [`Managed::start`], over a cache of its own type (see [`Synced::with_cache`]).
    ///
    /// # Errors
    /// As [`Managed::start`].
    pub fn start_with_cache(
        remote: SharedBackend,
        local: Arc<L>,
        options: ManagedOptions,
    ) -> io::Result<Self> {
        let synced = Arc::new(Synced::with_cache(remote, local, options.synced)?);
        let puller = options.pull.map(|pull| Puller::start(Arc::clone(&synced), pull)).transpose()?;
        let pusher =
            options.push.map(|push| Pusher::start(Arc::clone(&synced), push).map(Arc::new)).transpose()?;
        Ok(Self { synced, puller, pusher })
    }

    /// What a frontend serves: the pusher, which sees every write, or the [`Synced`] layer when
    /// nothing is pushed.
    #[must_use]
    pub fn backend(&self) -> SharedBackend {
        match &self.pusher {
            Some(p) => Arc::clone(p) as SharedBackend,
            None => Arc::clone(&self.synced) as SharedBackend,
        }
    }

    #[must_use]
    pub fn synced(&self) -> &Arc<Synced<L>> {
        &self.synced
    }

    /// The background pull, until [`Managed::stop_pull`].
    #[must_use]
    pub fn puller(&self) -> Option<&Puller<L>> {
        self.puller.as_ref()
    }

    #[must_use]
    pub fn pusher(&self) -> Option<&Pusher<L>> {
        self.pusher.as_deref()
    }

    /// Stops the background pull (requests in flight complete first). Chunks still missing are
    /// pulled on demand.
    pub fn stop_pull(&mut self) {
        if let Some(p) = self.puller.take() {
            p.close();
        }
    }

    /// Stops the background pull, then the background push, pushes what is still dirty and
    /// flushes the remote. A pusher still shared by a frontend (a [`Managed::backend`] clone)
    /// pushes and flushes the same way; its thread stops when the last clone goes.
    ///
    /// # Errors
    /// A failed final push: the chunks stay dirty in the local backend (nothing is lost locally).
    pub fn close(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.stop_pull();
        match self.pusher.take().map(Arc::try_unwrap) {
            Some(Ok(pusher)) => pusher.close(),
            Some(Err(shared)) => crate::Backend::flush(shared.as_ref()),
            None => Ok(()),
        }
    }
}

impl<L: Cache + ?Sized + 'static> Drop for Managed<L> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "the final push failed; the writes stay dirty in the local backend");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use crate::backends::Memory;
    use std::time::Duration;

    fn remote_with(data: &[u8]) -> Arc<Memory> {
        Arc::new(Memory::from_bytes(data))
    }

    fn options() -> ManagedOptions {
        ManagedOptions {
            synced: SyncedOptions { chunk_size: 4096, max_request: 16 * 4096, on_chunk_local: None },
            pull: Some(PullerOptions { depth: 2, request_size: 4 * 4096, ..PullerOptions::default() }),
            // Pushed only when closed or asked: no background cycle in a test.
            push: Some(PusherOptions { interval: Duration::from_secs(3600), ..PusherOptions::default() }),
        }
    }

    #[test]
    fn writes_reach_the_remote_when_closed() {
        let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
        let remote = remote_with(&data);
        let managed = Managed::start(remote.clone(), Arc::new(Memory::new(64 * 4096)), options()).unwrap();
        let backend = managed.backend();
        let mut buf = vec![0u8; 10];
        backend.read_at(&mut buf, 5 * 4096).unwrap();
        assert_eq!(buf, data[5 * 4096..5 * 4096 + 10]);
        backend.write_at(b"local", 7 * 4096).unwrap();
        let mut on_remote = [0u8; 5];
        remote.read_at(&mut on_remote, 7 * 4096).unwrap();
        assert_ne!(&on_remote, b"local", "not pushed before the close");
        managed.puller().unwrap().wait().unwrap();
        drop(backend);
        managed.close().unwrap();
        remote.read_at(&mut on_remote, 7 * 4096).unwrap();
        assert_eq!(&on_remote, b"local");
    }

    #[test]
    fn a_frontend_still_holding_the_backend_gets_the_final_push_too() {
        let remote = remote_with(&vec![0u8; 8 * 4096]);
        let managed = Managed::start(remote.clone(), Arc::new(Memory::new(8 * 4096)), options()).unwrap();
        let kept = managed.backend();
        kept.write_at(b"kept", 4096).unwrap();
        managed.close().unwrap();
        let mut on_remote = [0u8; 4];
        remote.read_at(&mut on_remote, 4096).unwrap();
        assert_eq!(&on_remote, b"kept");
    }

    #[test]
    fn without_push_writes_stay_local() {
        let remote = remote_with(&vec![1u8; 8 * 4096]);
        let local = Arc::new(Memory::new(8 * 4096));
        let options = ManagedOptions { pull: None, push: None, ..options() };
        let managed = Managed::start(remote.clone(), local.clone(), options).unwrap();
        assert!(managed.puller().is_none() && managed.pusher().is_none());
        managed.backend().write_at(b"overlay", 0).unwrap();
        managed.close().unwrap();
        let mut buf = [0u8; 7];
        remote.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 7], "the remote is untouched");
        local.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"overlay");
    }

    #[test]
    fn a_cache_of_its_own_type_has_its_written_ranges_pushed_at_close() {
        let remote = remote_with(&vec![0u8; 8 * 4096]);
        let cache = Arc::new(crate::pipeline::testutil::Recorder::new(8 * 4096));
        let managed = Managed::start_with_cache(remote.clone(), Arc::clone(&cache), options()).unwrap();
        managed.puller().unwrap().wait().unwrap();
        cache.inner.write_at(b"behind", 3 * 4096).unwrap();
        cache.behind_the_back.lock().unwrap().push(3 * 4096..3 * 4096 + 6);
        managed.close().unwrap();
        let mut on_remote = [0u8; 6];
        remote.read_at(&mut on_remote, 3 * 4096).unwrap();
        assert_eq!(&on_remote, b"behind");
    }

    #[test]
    fn bad_options_are_refused() {
        let remote = remote_with(&vec![0u8; 8 * 4096]);
        let small_local = Arc::new(Memory::new(4096));
        assert_eq!(
            Managed::start(remote.clone(), small_local, options()).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let mut bad = options();
        bad.pull = Some(PullerOptions { request_size: 100, ..PullerOptions::default() });
        let e = Managed::start(remote, Arc::new(Memory::new(8 * 4096)), bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

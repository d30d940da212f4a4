//! [`Leecher`]: the destination of a migration.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r3map_core::pipeline::puller::{PullProgress, PullerOptions};
use r3map_core::pipeline::synced::{ChunkHook, SyncedOptions};
use r3map_core::{Backend, Chunk, Locked, Managed, ManagedOptions, Puller, Seeder, SharedBackend, Synced};

/// A migration source as the destination reaches it: its data and its seeder operations
/// (`r3map_net::RemoteBackend` is one).
pub trait SeederRemote: Backend + Seeder {}

impl<T: Backend + Seeder + ?Sized> SeederRemote for T {}

/// How the destination pulls.
#[derive(Debug)]
pub struct LeecherOptions {
    /// The background pull (its `finalized` field is ignored: the leecher finalizes it).
    pub puller: PullerOptions,
    /// Most rounds of iterative pre-copy in [`Leecher::precopy`].
    pub max_rounds: usize,
    /// [`Leecher::precopy`] stops once a round finds at most this many dirty chunks.
    pub target_dirty: usize,
    /// How often waits for the pull to catch up look at the progress.
    pub poll: Duration,
}

impl Default for LeecherOptions {
    fn default() -> Self {
        Self {
            puller: PullerOptions::default(),
            max_rounds: 8,
            target_dirty: 0,
            poll: Duration::from_millis(1),
        }
    }
}

/// Called with the final dirty set of a migration.
pub type DirtyHook = Box<dyn Fn(&[Chunk]) + Send + Sync>;

/// What the destination does at the moments of a migration.
#[derive(Default)]
pub struct LeecherHooks {
    /// Called with the final dirty set, before those chunks are marked remote and the
    /// destination unlocks.
    pub on_after_sync: Option<DirtyHook>,
    /// Called each time a chunk becomes local.
    pub on_chunk_local: Option<ChunkHook>,
}

impl fmt::Debug for LeecherHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeecherHooks")
            .field("on_after_sync", &self.on_after_sync.is_some())
            .field("on_chunk_local", &self.on_chunk_local.is_some())
            .finish()
    }
}

/// One round of iterative pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Chunks written at the source since the previous round, pulled again.
    pub dirty: usize,
    /// Time from the start of the round until everything was local again.
    pub took: Duration,
}

/// What [`Leecher::finalize`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// The chunks written at the source since the last pre-copy round.
    pub dirty: Vec<Chunk>,
    /// From the call to the destination unlocked: the time the application runs nowhere.
    pub downtime: Duration,
}

/// The destination of a migration: a local copy of a source's backend, pulled in the background
/// while the application still runs at the source (pre-copy), locked until [`Leecher::finalize`],
/// then served here while the chunks the source dirtied at the end arrive (post-copy).
///
/// [`Leecher::backend`] is the destination's view: a `Backend` that blocks every access until
/// finalize (so nothing stale can be read), then reads through the pull (a chunk that is not
/// local yet is fetched first) and writes locally. Writes are never pushed back: after finalize
/// the source is out of date by design.
pub struct Leecher {
    remote: Arc<dyn Seeder>,
    /// The pull, unfinalized until [`Leecher::finalize`]; nothing is pushed.
    managed: Managed,
    frontend: Arc<Locked<Arc<Synced>>>,
    options: Rounds,
    hooks: LeecherHooks,
    finalized: Mutex<bool>,
}

impl fmt::Debug for Leecher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leecher")
            .field("size", &self.managed.synced().geometry().size())
            .field("chunk_size", &self.managed.synced().geometry().chunk_size())
            .field("progress", &self.progress())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Leecher {
    /// Starts a migration from `remote` into `local` (of the same size): asks the source to
    /// track writes, then starts pulling in the background in the source's chunk size.
    ///
    /// # Errors
    /// Sizes that differ, or a source that cannot track (not a migration source, unreachable).
    pub fn open(
        remote: Arc<dyn SeederRemote>,
        local: SharedBackend,
        options: LeecherOptions,
        hooks: LeecherHooks,
    ) -> io::Result<Self> {
        let data: SharedBackend = Arc::clone(&remote) as Arc<dyn Backend>;
        Self::open_parts(data, remote, local, options, hooks)
    }

    /// As [`Leecher::open`], for a source whose data and seeder operations are separate objects
    /// (the Go r3map's gRPC services: `r3map_grpc::GrpcSeeder::source` and the `GrpcSeeder`).
    ///
    /// # Errors
    /// As [`Leecher::open`].
    pub fn open_parts(
        data: SharedBackend,
        remote: Arc<dyn Seeder>,
        local: SharedBackend,
        options: LeecherOptions,
        hooks: LeecherHooks,
    ) -> io::Result<Self> {
        if data.size() != local.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the source has {} bytes and the destination {}", data.size(), local.size()),
            ));
        }
        remote
            .track()
            .map_err(|e| io::Error::new(e.kind(), format!("the source cannot track writes: {e}")))?;
        let synced_options = SyncedOptions {
            chunk_size: remote.chunk_size(),
            on_chunk_local: hooks.on_chunk_local.clone(),
            ..SyncedOptions::default()
        };
        let LeecherOptions { puller, max_rounds, target_dirty, poll } = options;
        let pull = Some(PullerOptions { finalized: false, ..puller });
        let managed =
            Managed::start(data, local, ManagedOptions { synced: synced_options, pull, push: None })?;
        let options = Rounds { max_rounds, target_dirty, poll };
        let frontend = Arc::new(Locked::new(Arc::clone(managed.synced()), true));
        Ok(Self { remote, managed, frontend, options, hooks, finalized: Mutex::new(false) })
    }

    /// The destination's view of the resource: blocked until [`Leecher::finalize`].
    #[must_use]
    pub fn backend(&self) -> Arc<Locked<Arc<Synced>>> {
        Arc::clone(&self.frontend)
    }

    /// The pull's progress.
    #[must_use]
    pub fn progress(&self) -> PullProgress {
        self.puller().progress()
    }

    fn puller(&self) -> &Puller {
        self.managed.puller().expect("the pull lives until the leecher is closed")
    }

    /// Waits until every chunk is local (the pre-copy has caught up with the source).
    ///
    /// # Errors
    /// The pull gave up (the source is gone).
    pub fn wait_caught_up(&self) -> io::Result<()> {
        while !self.managed.synced().is_complete() {
            if let Some(failed) = self.progress().failed {
                return Err(io::Error::other(format!("the pull from the source failed: {failed}")));
            }
            std::thread::sleep(self.options.poll);
        }
        Ok(())
    }

    /// Waits for the first copy, taking rounds from the source while it runs, and returns the
    /// chunks those rounds found already copied (the caller pulls them again).
    ///
    /// A chunk written before its first pull is then pulled once, fresh, instead of again after
    /// the copy. Chunks found already local are only remembered, not marked remote, so a source
    /// that writes faster than the link copies cannot keep the first copy from ending; a chunk
    /// found while its pull is in flight is marked remote, which discards that pull.
    fn first_copy(&self) -> io::Result<Vec<Chunk>> {
        let mut carried = Vec::new();
        let mut next_round = Some(Instant::now() + FIRST_COPY_ROUNDS);
        while !self.managed.synced().is_complete() {
            if let Some(failed) = self.progress().failed {
                return Err(io::Error::other(format!("the pull from the source failed: {failed}")));
            }
            if next_round.is_some_and(|t| Instant::now() >= t) {
                next_round = Some(Instant::now() + FIRST_COPY_ROUNDS);
                match self.remote.take_dirty() {
                    Ok(dirty) => {
                        let (copied, pending): (Vec<Chunk>, Vec<Chunk>) =
                            dirty.into_iter().partition(|&c| self.managed.synced().is_local(c));
                        self.managed.synced().mark_remote(pending);
                        carried.extend(copied);
                    }
                    // A source without rounds: the first round after the copy has them all.
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => next_round = None,
                    Err(e) => return Err(e),
                }
            }
            std::thread::sleep(self.options.poll);
        }
        Ok(carried)
    }

    /// Iterative pre-copy: waits for the pull to catch up, then asks the source for the chunks
    /// written meanwhile and pulls them again, round after round, until a round finds no more than
    /// [`LeecherOptions::target_dirty`] chunks, shrinks the set by less than a tenth of the round
    /// before (the application writes about as fast as they are copied), or [`LeecherOptions::max_rounds`] is
    /// reached. What is left for [`Leecher::finalize`], and so the downtime, shrinks with each
    /// round. A source that cannot report rounds (a Go r3map peer) ends it after the first wait.
    ///
    /// # Errors
    /// The pull gave up, or the source failed a round (the migration cannot continue; the source's
    /// application is not affected).
    pub fn precopy(&self) -> io::Result<Vec<Round>> {
        let mut rounds = Vec::new();
        let start = Instant::now();
        let carried = self.first_copy()?;
        // What the source cleared during the copy but the copy already had is pulled again now,
        // whatever the rounds below do: the source will not report it again.
        if !carried.is_empty() {
            self.managed.synced().mark_remote(carried.iter().copied());
            self.puller().prioritize(carried);
            self.wait_caught_up()?;
        }
        tracing::debug!(took = ?start.elapsed(), "migration: first copy done");
        let mut previous = usize::MAX;
        while rounds.len() < self.options.max_rounds {
            let started = Instant::now();
            let dirty = match self.remote.take_dirty() {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => break,
                Err(e) => return Err(e),
            };
            let n = dirty.len();
            self.managed.synced().mark_remote(dirty.iter().copied());
            self.puller().prioritize(dirty);
            self.wait_caught_up()?;
            rounds.push(Round { dirty: n, took: started.elapsed() });
            tracing::debug!(round = rounds.len(), dirty = n, "migration: pre-copy round");
            // A round that shrinks the set by less than a tenth is at the equilibrium between
            // the application's writes and the link: more rounds cost bytes, not downtime.
            if n <= self.options.target_dirty || n.saturating_mul(10) > previous.saturating_mul(9) {
                break;
            }
            previous = n;
        }
        Ok(rounds)
    }

    /// Ends the pre-copy: the source suspends its application and sends the chunks written since
    /// the last round (its `sync`); they are marked remote and queued first, and the destination
    /// unlocks. Reads of those chunks fetch them on demand until the pull has them (post-copy).
    /// Only the first call does anything; later ones return the same dirty set with no downtime.
    ///
    /// # Errors
    /// The source's `sync` failed: the destination stays locked and the migration has not
    /// happened (the source decides in its hook whether its application resumes).
    pub fn finalize(&self) -> io::Result<Finalized> {
        let mut done = self.finalized.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *done {
            return Ok(Finalized { dirty: Vec::new(), downtime: Duration::ZERO });
        }
        let started = Instant::now();
        let dirty = self.remote.sync()?;
        if let Some(hook) = &self.hooks.on_after_sync {
            hook(&dirty);
        }
        self.managed.synced().mark_remote(dirty.iter().copied());
        self.puller().finalize(&dirty);
        self.frontend.unlock();
        *done = true;
        let downtime = started.elapsed();
        tracing::info!(dirty = dirty.len(), ?downtime, "migration: finalized; the destination is live");
        Ok(Finalized { dirty, downtime })
    }

    /// Waits until every chunk is local after [`Leecher::finalize`].
    ///
    /// # Errors
    /// The pull gave up (the source went away before everything was copied).
    pub fn wait(&self) -> io::Result<()> {
        self.puller().wait()
    }

    /// Ends the migration once everything is local: tells the source it is done (its `close`)
    /// and returns the local backend, which now holds the whole resource (to serve it, or to
    /// become the source of the next hop).
    ///
    /// # Errors
    /// Not finalized or not complete (`InvalidInput`, and the leecher is dropped: the source is
    /// not told and keeps its state), or the source's `close` failed.
    pub fn close(mut self) -> io::Result<SharedBackend> {
        let finalized = *self.finalized.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !finalized || !self.managed.synced().is_complete() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the migration is not finished: finalize and wait for the pull first",
            ));
        }
        self.managed.stop_pull();
        self.remote.close()?;
        Ok(Arc::clone(self.managed.synced().local()))
    }
}

/// How often the source is asked for its dirty chunks while the first copy runs.
const FIRST_COPY_ROUNDS: Duration = Duration::from_millis(100);

/// The options the leecher keeps after the pull has started.
#[derive(Debug, Clone, Copy)]
struct Rounds {
    max_rounds: usize,
    target_dirty: usize,
    poll: Duration,
}

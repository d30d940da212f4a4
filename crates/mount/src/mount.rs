//! [`Mount`]: a backend as a local file, a block device or a memory slice, direct or managed.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::pipeline::puller::{ByPriority, PullProgress, PullerOptions};
use r3map_core::pipeline::pusher::{PushProgress, PusherOptions};
use r3map_core::pipeline::synced::{ChunkHook, DEFAULT_CHUNK_SIZE, SyncedOptions};
use r3map_core::{Backend, Chunk, Managed, Puller, SharedBackend, Synced};
use r3map_fuse::{FuseMount, FuseOptions};
use r3map_nbd::kernel::{KernelDevice, KernelOptions};
use r3map_nbd::{NbdExport, NbdServer};
use r3map_sys::SharedMapping;

use crate::loopdev::LoopDevice;

/// A hook the mount calls at a point of its life (an application flushing its state, say).
pub type Hook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// The frontend that makes the backend visible to the system.
#[derive(Debug, Clone)]
pub enum Frontend {
    /// A single-file FUSE filesystem (works on this kernel; a loop device makes it a block device).
    Fuse(FuseOptions),
    /// A kernel NBD device (`/dev/nbdN`) served by this process over socketpairs: a block device
    /// without FUSE or a loop device in between. Needs root and `nbd.ko`; the mountpoint is not
    /// used.
    Nbd(KernelOptions),
}

impl Default for Frontend {
    fn default() -> Self {
        Self::Fuse(FuseOptions::default())
    }
}

/// Options common to direct and managed mounts.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    pub frontend: Frontend,
    /// Attach a loop device to the mount's file, making it a block device.
    pub loop_device: bool,
}

/// Options of a managed mount (local cache, background pull, background push), named as in the
/// original r3map.
pub struct ManagedOptions {
    pub chunk_size: u64,
    /// Pull in the background (the original's `PullWorkers > 0`).
    pub pull: bool,
    /// Background pull requests in flight.
    pub pull_depth: usize,
    /// Largest background pull request in bytes.
    pub pull_request: u64,
    /// Higher first; `None` pulls in ascending order. The argument is a chunk index.
    pub pull_priority: Option<Box<dyn Fn(Chunk) -> i64 + Send + Sync>>,
    /// Pull everything before the frontend is started.
    pub pull_first: bool,
    /// Push local writes to the remote (without it the mount is a local copy-on-write overlay).
    pub push: bool,
    pub push_depth: usize,
    pub push_request: u64,
    pub push_interval: Duration,
}

impl Default for ManagedOptions {
    fn default() -> Self {
        let pull = PullerOptions::default();
        let push = PusherOptions::default();
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pull: true,
            pull_depth: pull.depth,
            pull_request: pull.request_size,
            pull_priority: None,
            pull_first: false,
            push: true,
            push_depth: push.depth,
            push_request: push.request_size,
            push_interval: push.interval,
        }
    }
}

impl fmt::Debug for ManagedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedOptions")
            .field("chunk_size", &self.chunk_size)
            .field("pull", &self.pull)
            .field("pull_depth", &self.pull_depth)
            .field("pull_request", &self.pull_request)
            .field("pull_priority", &self.pull_priority.is_some())
            .field("pull_first", &self.pull_first)
            .field("push", &self.push)
            .field("push_depth", &self.push_depth)
            .field("push_request", &self.push_request)
            .field("push_interval", &self.push_interval)
            .finish()
    }
}

/// Hooks of a mount, as in the original.
#[derive(Default)]
pub struct Hooks {
    /// Before [`Mount::sync`] pushes (flush the application's own buffers here).
    pub before_sync: Option<Hook>,
    /// Before [`Mount::close`] tears the mount down.
    pub before_close: Option<Hook>,
    /// A chunk became local (pulled, or written whole).
    pub on_chunk_local: Option<ChunkHook>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("before_sync", &self.before_sync.is_some())
            .field("before_close", &self.before_close.is_some())
            .field("on_chunk_local", &self.on_chunk_local.is_some())
            .finish()
    }
}

/// A mounted backend. See the crate docs.
pub struct Mount {
    fuse: Option<FuseMount>,
    nbd: Option<KernelDevice>,
    loop_device: Option<LoopDevice>,
    managed: Option<Managed>,
    served: SharedBackend,
    hooks: Hooks,
    opened_in: Duration,
}

impl fmt::Debug for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mount")
            .field("file", &self.fuse.as_ref().map(FuseMount::file_path))
            .field("nbd", &self.nbd.as_ref().map(KernelDevice::path))
            .field("device", &self.loop_device)
            .field("managed", &self.managed.is_some())
            .field("opened_in", &self.opened_in)
            .finish_non_exhaustive()
    }
}

impl Mount {
    /// A direct mount: every access goes to `remote`.
    ///
    /// # Errors
    /// The frontend or the loop device could not be set up.
    pub fn direct(
        remote: SharedBackend,
        mountpoint: &Path,
        options: &MountOptions,
        hooks: Hooks,
    ) -> io::Result<Self> {
        let started = Instant::now();
        Self::start(remote, None, mountpoint, options, hooks, started)
    }

    /// A managed mount: `local` caches `remote` chunk by chunk; chunks are pulled on first access
    /// and in the background, writes are pushed in the background. The background pull starts
    /// before the frontend, so it runs while the frontend is being set up.
    ///
    /// # Errors
    /// Bad options (a local backend smaller than the remote), a failed pull when `pull_first`, or
    /// the frontend could not be set up.
    pub fn managed(
        remote: SharedBackend,
        local: SharedBackend,
        mountpoint: &Path,
        options: &MountOptions,
        managed: ManagedOptions,
        hooks: Hooks,
    ) -> io::Result<Self> {
        let started = Instant::now();
        let synced = SyncedOptions {
            chunk_size: managed.chunk_size,
            max_request: managed.pull_request.max(managed.chunk_size),
            on_chunk_local: hooks.on_chunk_local.clone(),
        };
        let chunks = r3map_core::Geometry::new(remote.size(), managed.chunk_size)?.chunks();
        let pull = managed.pull.then(|| {
            let order = managed.pull_priority.map(|p| {
                Box::new(ByPriority::new(chunks, p)) as Box<dyn r3map_core::pipeline::puller::PullOrder>
            });
            PullerOptions {
                depth: managed.pull_depth,
                request_size: managed.pull_request,
                order,
                // One request in flight while the frontend is set up: the pull starts at once
                // without taking the CPU the mount needs (see `Mount::start`).
                initial_depth: (!managed.pull_first).then_some(1),
                ..PullerOptions::default()
            }
        });
        let push = managed.push.then(|| PusherOptions {
            interval: managed.push_interval,
            depth: managed.push_depth,
            request_size: managed.push_request,
            ..PusherOptions::default()
        });
        let pull_first = managed.pull_first;
        let managed = Managed::start(remote, local, r3map_core::ManagedOptions { synced, pull, push })?;
        if pull_first && let Some(p) = managed.puller() {
            p.wait()?;
        }
        let served = managed.backend();
        Self::start(served, Some(managed), mountpoint, options, hooks, started)
    }

    fn start(
        served: SharedBackend,
        managed: Option<Managed>,
        mountpoint: &Path,
        options: &MountOptions,
        hooks: Hooks,
        started: Instant,
    ) -> io::Result<Self> {
        let fuse_options = match &options.frontend {
            Frontend::Fuse(f) => f,
            Frontend::Nbd(kernel) => return Self::start_nbd(served, managed, *kernel, hooks, started),
        };
        let mut fuse_options = fuse_options.clone();
        // A managed mount's local cache already holds the data in memory: the page cache would
        // hold it twice and put the kernel's writeback between the application and the cache.
        fuse_options.direct_io.get_or_insert(managed.is_some());
        let read_only = fuse_options.read_only || served.capabilities().read_only;
        let fuse = FuseMount::mount(Arc::clone(&served), mountpoint, fuse_options)?;
        if let Some(puller) = managed.as_ref().and_then(Managed::puller) {
            puller.set_depth(usize::MAX);
        }
        let loop_device = if options.loop_device {
            match LoopDevice::attach(&fuse.file_path(), read_only) {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = fuse.unmount();
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Self {
            fuse: Some(fuse),
            nbd: None,
            loop_device,
            managed,
            served,
            hooks,
            opened_in: started.elapsed(),
        })
    }

    fn start_nbd(
        served: SharedBackend,
        managed: Option<Managed>,
        options: KernelOptions,
        hooks: Hooks,
        started: Instant,
    ) -> io::Result<Self> {
        let server = NbdServer::new(vec![NbdExport::new("mount", Arc::clone(&served))])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let device = KernelDevice::attach(&server, "mount", options)?;
        if let Some(puller) = managed.as_ref().and_then(Managed::puller) {
            puller.set_depth(usize::MAX);
        }
        Ok(Self {
            fuse: None,
            nbd: Some(device),
            loop_device: None,
            managed,
            served,
            hooks,
            opened_in: started.elapsed(),
        })
    }

    /// How long opening took, frontend included.
    #[must_use]
    pub fn opened_in(&self) -> Duration {
        self.opened_in
    }

    /// The mount's file: the FUSE file, or the NBD device.
    ///
    /// # Panics
    /// Never while the mount is open.
    #[must_use]
    pub fn file_path(&self) -> PathBuf {
        match &self.nbd {
            Some(d) => d.path(),
            None => self.fuse.as_ref().expect("mounted until closed").file_path(),
        }
    }

    /// The block device: the NBD device, or the loop device when one was asked for.
    #[must_use]
    pub fn device(&self) -> Option<PathBuf> {
        self.nbd
            .as_ref()
            .map(KernelDevice::path)
            .or_else(|| self.loop_device.as_ref().map(|d| d.path().to_path_buf()))
    }

    /// The path to hand to applications: the block device if there is one, else the file.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.device().unwrap_or_else(|| self.file_path())
    }

    /// Size of the mounted resource.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.served.size()
    }

    /// Opens the mount's path read-write (read-only for read-only backends).
    ///
    /// # Errors
    /// The `open` error.
    pub fn open_file(&self) -> io::Result<File> {
        let writable = !self.served.capabilities().read_only;
        OpenOptions::new().read(true).write(writable).open(self.path())
    }

    /// Maps the whole resource as a shared, writable slice. Writes reach the backend on
    /// [`Mapping::flush`] (`msync`), on [`Mount::sync`], or when the kernel writes pages back.
    ///
    /// The FUSE frontend serves the mapping from this same process. The mapping writes its dirty
    /// pages back before it is unmapped: unmapping dirty pages of a FUSE file makes the kernel
    /// write them back under the process's memory-map lock, which a FUSE worker of this process may
    /// need at the same moment (a deadlock, the FUSE form of the original's garbage-collector
    /// one). Flush with [`Mapping::flush`] before dropping to see write-back errors.
    ///
    /// # Errors
    /// An empty or read-only resource, or the `mmap` error.
    // The one call into `r3map-sys`'s unsafe API outside that crate: only the mount knows the
    // invariants (fixed size, the mount outliving the mapping) that make it sound.
    #[allow(unsafe_code)]
    pub fn map(&self) -> io::Result<Mapping<'_>> {
        if let Some(settings) = self.fuse.as_ref().map(FuseMount::settings)
            && settings.direct_io
            && !settings.direct_io_mmap
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel cannot map a FUSE file served in direct-I/O mode (it lacks \
                 FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6): mount with FuseOptions::direct_io = Some(false)",
            ));
        }
        let file = OpenOptions::new().read(true).write(true).open(self.path())?;
        let len = usize::try_from(self.size())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the resource is too large to map"))?;
        // SAFETY: the mount file and the loop device have a fixed size (the frontend refuses size
        // changes), and the returned `Mapping` borrows the mount, so the mount outlives the mapping.
        let map = unsafe { SharedMapping::map(&file, len)? };
        Ok(Mapping { map, _mount: self })
    }

    /// Pull and push progress of a managed mount.
    #[must_use]
    pub fn progress(&self) -> Option<(Option<PullProgress>, Option<PushProgress>)> {
        self.managed
            .as_ref()
            .map(|m| (m.puller().map(Puller::progress), m.pusher().map(r3map_core::Pusher::progress)))
    }

    /// The managed mount's chunk state.
    #[must_use]
    pub fn synced(&self) -> Option<&Arc<Synced>> {
        self.managed.as_ref().map(Managed::synced)
    }

    /// Blocks until the background pull is done (everything local).
    ///
    /// # Errors
    /// The error that made the pull give up; `Unsupported` for a direct mount or without pull.
    pub fn wait_pulled(&self) -> io::Result<()> {
        match self.managed.as_ref().and_then(Managed::puller) {
            Some(p) => p.wait(),
            None => Err(io::Error::new(io::ErrorKind::Unsupported, "this mount has no background pull")),
        }
    }

    /// Makes everything written so far durable at the remote: the `before_sync` hook, then the
    /// kernel's dirty pages of the block device (if any) and of the mount file, whose `fsync` the
    /// frontend answers by flushing the served backend (managed: a push of every dirty chunk and a
    /// flush of the remote; direct: a flush of the backend).
    ///
    /// # Errors
    /// A hook, writeback, push or flush error; nothing is lost locally, and a later sync retries.
    pub fn sync(&self) -> io::Result<()> {
        if let Some(hook) = &self.hooks.before_sync {
            hook()?;
        }
        if let Some(d) = &self.loop_device {
            File::open(d.path())?.sync_all()?;
        }
        File::open(self.file_path())?.sync_all()
    }

    /// Syncs, runs `before_close`, detaches the loop device, unmounts, stops the pull and does the
    /// final push.
    ///
    /// # Errors
    /// The first error of those steps; the later steps still run.
    pub fn close(mut self) -> io::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> io::Result<()> {
        if self.fuse.is_none() && self.nbd.is_none() {
            return Ok(());
        }
        let mut result = Ok(());
        let mut keep = |r: io::Result<()>| {
            if let Err(e) = r {
                tracing::error!(error = %e, "closing the mount");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        };
        if let Some(d) = &self.loop_device {
            keep(File::open(d.path()).and_then(|f| f.sync_all()));
        }
        if let Some(d) = &self.nbd {
            keep(File::open(d.path()).and_then(|f| f.sync_all()));
        }
        if let Some(hook) = &self.hooks.before_close {
            keep(hook());
        }
        if let Some(d) = self.loop_device.take() {
            keep(d.detach());
        }
        if let Some(d) = self.nbd.take() {
            keep(d.detach());
        }
        if let Some(fuse) = self.fuse.take() {
            keep(fuse.unmount());
        }
        if let Some(m) = self.managed.take() {
            keep(m.close());
        }
        result
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(error = %e, "closing the mount on drop failed");
        }
    }
}

/// The mounted resource as memory: a shared mapping of the mount's file or device that cannot
/// outlive the mount.
#[derive(Debug)]
pub struct Mapping<'m> {
    map: SharedMapping,
    _mount: &'m Mount,
}

impl Mapping<'_> {
    /// Writes the dirty pages back through the mount (`msync`).
    ///
    /// # Errors
    /// `EIO` when the backend failed.
    pub fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}

impl std::ops::Deref for Mapping<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl std::ops::DerefMut for Mapping<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

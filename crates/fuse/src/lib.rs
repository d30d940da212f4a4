//! The FUSE frontend of r3map: serves one [`Backend`](r3map_core::Backend) as a single regular
//! file inside a mount point, so a remote resource becomes a local file (and, through a loop
//! device, a block device).
//!
//! ```no_run
//! # use std::{path::Path, sync::Arc};
//! # use r3map_fuse::{FuseMount, FuseOptions};
//! let backend = Arc::new(r3map_core::Memory::new(1 << 30));
//! let mount = FuseMount::mount(backend, Path::new("/mnt/r3map"), FuseOptions::default())?;
//! let file = std::fs::OpenOptions::new().read(true).write(true).open(mount.file_path())?;
//! // read, write, mmap(MAP_SHARED), fsync, fallocate(PUNCH_HOLE) ... the file
//! drop(file);
//! mount.unmount()?; // writes back, flushes the backend, unmounts
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # The file
//! The mount's root directory holds exactly one regular file of `backend.size()` bytes (mode
//! 0644, or 0444 read-only, owned by the mounting user). Its size is fixed:
//! - reads that reach the end return the bytes up to the end, as for any file;
//! - a write that starts at or past the end fails with `ENOSPC` and one that crosses it writes
//!   what fits and returns a short count, as on a block device (with the writeback cache the
//!   kernel accepts such a write into its cache and `fsync`/`close` report `ENOSPC`);
//! - `truncate` to another size fails with `EPERM` (so does `open(O_TRUNC)`; use
//!   `dd conv=notrunc`); changes of times, mode or owner are accepted and ignored;
//! - `fallocate`: `PUNCH_HOLE | KEEP_SIZE` trims the backend (`EOPNOTSUPP` without the trim
//!   capability), `ZERO_RANGE` zeroes it (with `write_zeroes`, or buffers of zeroes), plain
//!   allocation inside the file succeeds and past its end fails with `ENOSPC`.
//!
//! A backend error fails the request: `EIO` by default, `EINVAL` for `InvalidInput`, `EPERM`
//! (`EROFS` on writes) for `PermissionDenied`, `EOPNOTSUPP` for `Unsupported`, `ENOSPC` for
//! `StorageFull`, `ETIMEDOUT` for `TimedOut`. A failed read is never answered with zeroes.
//! `fsync`, `fdatasync`, `msync` and the `close` of a descriptor that was written to flush the
//! backend, and a failed flush fails them: that is how an application learns that its data did
//! not reach the remote.
//!
//! # Modes
//! Page-cache mode (the default) keeps the kernel's page cache across opens, with attribute
//! and entry timeouts of a year since the size never changes, 1 MiB requests, a 1 MiB
//! readahead window and (by default) the writeback cache; `mmap(MAP_SHARED)` works. Direct-I/O
//! mode sends every `read`/`write` to the backend. See [`FuseOptions`].
//!
//! # Mapping the file in the process that serves it
//! Unmapping a shared writable mapping of a FUSE file makes the kernel write its dirty pages
//! back (`fuse_vma_close`) while it holds the unmapping process's mmap lock. When that process
//! is also the server, a worker that needs the lock for writing meanwhile (any allocation that
//! maps memory: a backend allocating a page, a large buffer) waits for the unmapper, which waits
//! for the worker: the process hangs in `munmap`, unkillable until the connection is aborted
//! through `/sys/fs/fuse/connections/N/abort`. This is how FUSE works, not something a frontend
//! can avoid. So either map the file in another process (the usual case), or `msync` a mapping
//! before unmapping it and do not dirty it afterwards (`msync` does not hold the lock while the
//! pages go out). Reading through a mapping and `read(2)`/`write(2)` are not affected.
//!
//! # Threads
//! [`FuseOptions::threads`] fuser workers each read requests from their own clone of the
//! `/dev/fuse` descriptor and call the backend directly, so that many requests run at once.

mod fs;
mod mount;

pub use fs::KernelSettings;
pub use mount::{FuseMount, FuseOptions, cleanup_stale};

/// Whether this process can mount FUSE filesystems here: it runs as root and `/dev/fuse` exists.
#[must_use]
pub fn can_mount() -> bool {
    rustix::process::geteuid().is_root() && std::path::Path::new("/dev/fuse").exists()
}

//! Mounting, unmounting and cleaning up after a crash.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};
use r3map_core::SharedBackend;
use rustix::io::Errno;
use rustix::mount::UnmountFlags;
use tracing::{debug, error, info, warn};

use crate::fs::{FILE_INO, FileFs, FsConfig, KernelSettings};

/// Largest request size fuser can receive (its buffer holds 16 MiB of data).
const MAX_IO_LIMIT: u32 = 16 * 1024 * 1024;

/// How long `unmount` keeps retrying while the file is busy before it detaches lazily.
const BUSY_RETRY: Duration = Duration::from_millis(500);

/// How long `unmount` waits for the worker threads once the kernel has let go of the mount.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a [`FuseMount`] serves its file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct FuseOptions {
    /// Name of the single file inside the mount point. Default `"r3map"`.
    pub file_name: String,
    /// Worker threads serving requests, each with its own `/dev/fuse` descriptor
    /// (`FUSE_DEV_IOC_CLONE`). Default 4; at least 1.
    pub threads: usize,
    /// `Some(false)`: page-cache mode. The kernel caches the file's pages and keeps them across
    /// opens (`FOPEN_KEEP_CACHE`); `mmap(MAP_SHARED)` works and `msync`/`fsync` write the dirty
    /// pages back and then flush the backend.
    ///
    /// `Some(true)`: direct-I/O mode (`FOPEN_DIRECT_IO`). Every `read`/`write` goes to the
    /// backend and nothing is cached. Shared writable `mmap` works only on kernels that offer
    /// `FUSE_DIRECT_IO_ALLOW_MMAP` (Linux 6.6 and later; see [`KernelSettings::direct_io_mmap`]);
    /// elsewhere it fails with `ENODEV`. There the kernel keeps `read(2)`/`write(2)` and the
    /// mapping coherent: a direct read writes dirty mapped pages back first, a direct write drops
    /// the cached pages it covers.
    ///
    /// `None` (default): the caller decides; [`FuseMount::mount`] uses the page cache, and
    /// `r3map-mount` uses direct I/O for managed mounts (whose local cache already holds the data
    /// in memory) and the page cache for direct ones.
    pub direct_io: Option<bool>,
    /// Page-cache mode only: let the kernel cache writes and send them later, coalesced
    /// (`FUSE_WRITEBACK_CACHE`). Default `true`.
    ///
    /// With it, `write(2)` costs a memory copy and backend errors surface at `fsync`/`close` (as
    /// on a local file system); a `write(2)` past the end of the file is accepted into the cache
    /// (the kernel's idea of the size grows until the next `truncate` to the real size) and
    /// `fsync`/`close` (and [`FuseMount::unmount`]) fail with `ENOSPC`. Without it, every
    /// `write(2)` reaches the backend before it returns (reads are still cached) and fails at
    /// once.
    pub writeback_cache: bool,
    /// Serve the file read-only (mode 0444, a read-only mount). Also on whenever the backend
    /// reports [`Capabilities::read_only`](r3map_core::Capabilities::read_only). Default `false`.
    pub read_only: bool,
    /// Largest read or write request asked of the kernel (`max_read`, `max_write`, and the
    /// readahead window in page-cache mode), 4 KiB to 16 MiB. The kernel caps requests at
    /// `/proc/sys/fs/fuse/max_pages_limit` pages (256, so 1 MiB, by default). Default 1 MiB.
    pub max_io: u32,
    /// Let users other than the one mounting use the file (`allow_other`). Default `false`.
    pub allow_other: bool,
    /// Source name shown in `/proc/mounts`. Default `"r3map"`.
    pub fs_name: String,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            file_name: "r3map".to_owned(),
            threads: 4,
            direct_io: None,
            writeback_cache: true,
            read_only: false,
            max_io: 1024 * 1024,
            allow_other: false,
            fs_name: "r3map".to_owned(),
        }
    }
}

impl FuseOptions {
    fn check(&self) -> io::Result<()> {
        let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        let name = &self.file_name;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return invalid(format!("{name:?} cannot be the name of a file in a directory"));
        }
        if self.threads == 0 {
            return invalid("a FUSE mount needs at least one worker thread".to_owned());
        }
        if !(4096..=MAX_IO_LIMIT).contains(&self.max_io) {
            return invalid(format!(
                "max_io of {} bytes is outside 4096..={MAX_IO_LIMIT} bytes",
                self.max_io
            ));
        }
        if self.fs_name.is_empty() || self.fs_name.contains([',', ' ', '\0', '\n', '\t']) {
            return invalid(format!("{:?} cannot be a file system name in /proc/mounts", self.fs_name));
        }
        Ok(())
    }
}

/// A backend served as one regular file in a FUSE mount.
///
/// Dropping it unmounts like [`FuseMount::unmount`] and logs what went wrong.
///
/// Mapping the file `MAP_SHARED` in the process that serves it needs care: `msync` before
/// `munmap` (see the crate documentation).
pub struct FuseMount {
    /// The mount point as given.
    mountpoint: PathBuf,
    /// The mount point with symbolic links resolved: what the kernel knows it by.
    target: PathBuf,
    file_name: String,
    size: u64,
    read_only: bool,
    backend: SharedBackend,
    settings: KernelSettings,
    notifier: fuser::Notifier,
    /// The session thread; `None` once unmounted.
    session: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuseMount")
            .field("mountpoint", &self.mountpoint)
            .field("file_name", &self.file_name)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("settings", &self.settings)
            .field("mounted", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// Mounts a file system at `mountpoint` (an existing directory) whose only entry is a regular
    /// file of `backend.size()` bytes named `options.file_name`. Returns once the file is
    /// visible and usable (`stat` works).
    ///
    /// Needs root (or `CAP_SYS_ADMIN`): the mount is made directly, without `fusermount`.
    ///
    /// # Errors
    /// `InvalidInput` for bad options; any error of mounting (`/dev/fuse` missing, no
    /// permission, the mount point missing or stale, see [`cleanup_stale`]).
    pub fn mount(backend: SharedBackend, mountpoint: &Path, options: FuseOptions) -> io::Result<FuseMount> {
        options.check()?;
        let target = mountpoint.canonicalize().map_err(|e| {
            let hint = if e.raw_os_error() == Some(Errno::NOTCONN.raw_os_error()) {
                " (a FUSE mount left behind by a process that died: cleanup_stale removes it)"
            } else {
                ""
            };
            annotate(&e, &format!("cannot mount FUSE at {}{hint}", mountpoint.display()))
        })?;
        if !target.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("cannot mount FUSE at {}: it is not a directory", mountpoint.display()),
            ));
        }
        if fuse_mounted_at(&target)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot mount FUSE at {}: a FUSE file system is mounted there already (one left behind \
                     by a process that died? cleanup_stale removes it)",
                    mountpoint.display()
                ),
            ));
        }
        let size = backend.size();
        let read_only = options.read_only || backend.capabilities().read_only;
        let direct_io = options.direct_io.unwrap_or(false);
        let settings = Arc::new(OnceLock::new());
        let fs = FileFs::new(
            Arc::clone(&backend),
            FsConfig {
                name: options.file_name.clone(),
                read_only,
                direct_io,
                writeback_cache: options.writeback_cache,
                max_io: options.max_io,
                settings: Arc::clone(&settings),
            },
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(options.fs_name.clone()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
            MountOption::CUSTOM(format!("max_read={}", options.max_io)),
            if read_only { MountOption::RO } else { MountOption::RW },
        ];
        config.acl = if options.allow_other { SessionACL::All } else { SessionACL::Owner };
        config.n_threads = Some(options.threads);
        config.clone_fd = options.threads > 1;

        // Mounts, then answers the kernel's INIT (which calls FileFs::init) before returning.
        let session = fuser::Session::new(fs, &target, &config)
            .map_err(|e| annotate(&e, &format!("cannot mount FUSE at {}", mountpoint.display())))?;
        let notifier = session.notifier();
        let settings = settings.get().copied().ok_or_else(|| {
            io::Error::other(format!(
                "the FUSE session at {} did not negotiate settings",
                mountpoint.display()
            ))
        })?;
        // If spawning fails, dropping the session (moved into the closure) unmounts.
        let session = thread::Builder::new()
            .name("r3map-fuse".to_owned())
            .spawn(move || session.run())
            .map_err(|e| annotate(&e, "cannot start the FUSE session thread"))?;
        let mount = FuseMount {
            mountpoint: mountpoint.to_path_buf(),
            target,
            file_name: options.file_name,
            size,
            read_only,
            backend,
            settings,
            notifier,
            session: Some(session),
        };
        let path = mount.file_path();
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == size => {}
            Ok(meta) => {
                return Err(io::Error::other(format!(
                    "the FUSE file {} shows {} bytes of type {:?} instead of a file of {size} bytes",
                    path.display(),
                    meta.len(),
                    meta.file_type()
                )));
            }
            Err(e) => return Err(annotate(&e, &format!("the FUSE file {} is not usable", path.display()))),
        }
        if !direct_io {
            mount.set_readahead(options.max_io);
        }
        info!(
            "serving {} bytes as {} ({}, {} threads)",
            size,
            path.display(),
            if direct_io { "direct I/O" } else { "page cache" },
            options.threads
        );
        Ok(mount)
    }

    /// The mount point, as given to [`FuseMount::mount`].
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The served file: the mount point joined with the file name.
    #[must_use]
    pub fn file_path(&self) -> PathBuf {
        self.mountpoint.join(&self.file_name)
    }

    /// What the kernel agreed to when mounting (writeback cache, mmap in direct-I/O mode, ...).
    #[must_use]
    pub fn settings(&self) -> KernelSettings {
        self.settings
    }

    /// Whether the file is served read-only.
    #[must_use]
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Drops the kernel's cached pages of `off..off + len` (`len == 0`: to the end of the file),
    /// for when the backend's bytes changed other than through this file (a migration, another
    /// writer). Dirty cached pages are written back first. Needless in direct-I/O mode.
    ///
    /// # Errors
    /// Any error of the notification (`ENOENT` when the kernel has no cached pages of the file
    /// yet is not an error).
    pub fn invalidate(&self, off: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match self.notifier.inval_inode(FILE_INO, off, len) {
            Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => Ok(()),
            other => other,
        }
    }

    /// Writes back the kernel's dirty pages, flushes the backend, unmounts and waits for the
    /// worker threads; then flushes the backend once more for writes that arrived while
    /// unmounting.
    ///
    /// When the file is still in use (an open descriptor, a mapping, a loop device) after a short
    /// retry, the mount is detached lazily: the file disappears from the mount point at once and
    /// is served until its last user lets go, then the backend is flushed a last time; this
    /// returns an error of kind `ResourceBusy` saying so.
    ///
    /// # Errors
    /// The first error of writing back, flushing or unmounting; the mount is gone (or detached)
    /// in every case.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let mut errors = Errors::default();
        if !self.read_only {
            // Pages dirtied through the page cache reach the backend, then the backend flushes.
            if let Err(e) = fs::File::open(&self.target).and_then(|dir| Ok(rustix::fs::syncfs(&dir)?)) {
                errors.note(annotate(
                    &e,
                    &format!("cannot write back the cached pages of {}", self.file_path().display()),
                ));
            }
            if let Err(e) = self.backend.flush() {
                errors.note(annotate(
                    &e,
                    &format!("cannot flush the backend of {}", self.file_path().display()),
                ));
            }
        }
        match self.unmount_target() {
            Ok(true) => {
                match join_within(session, JOIN_TIMEOUT) {
                    Ok(Ok(())) => {}
                    // A worker reading /dev/fuse while our own unmount tears the connection down
                    // gets ECONNABORTED: that is the normal end here, not an error.
                    Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) => {
                    }
                    Ok(Err(e)) => errors.note(annotate(&e, "the FUSE session ended with an error")),
                    Err(session) => {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "unmounted {}, but a FUSE worker is still busy in the backend after \
                                 {JOIN_TIMEOUT:?}; it is left to finish in the background",
                                self.mountpoint.display()
                            ),
                        );
                        self.reap_in_background(session);
                        errors.note(e);
                        return errors.into_result();
                    }
                }
                if !self.read_only
                    && let Err(e) = self.backend.flush()
                {
                    errors.note(annotate(
                        &e,
                        &format!("cannot flush the backend of {}", self.file_path().display()),
                    ));
                }
            }
            Ok(false) => {
                self.reap_in_background(session);
                errors.note(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is still in use (an open file, a mapping or a loop device): it was detached \
                         lazily and is served until its last user closes it",
                        self.file_path().display()
                    ),
                ));
            }
            Err(e) => {
                // The session keeps serving until the kernel lets go; do not wait for it here.
                self.reap_in_background(session);
                errors.note(e);
            }
        }
        errors.into_result()
    }

    /// Unmounts; `Ok(false)` when the mount stayed busy and was detached lazily instead.
    fn unmount_target(&self) -> io::Result<bool> {
        let deadline = Instant::now() + BUSY_RETRY;
        loop {
            match rustix::mount::unmount(&self.target, UnmountFlags::empty()) {
                Ok(()) => return Ok(true),
                Err(Errno::INTR) => {}
                // Not a mount point any more: someone unmounted it (or cleanup_stale detached it).
                Err(Errno::INVAL | Errno::NOENT) => {
                    warn!("{} was already unmounted", self.mountpoint.display());
                    return Ok(true);
                }
                Err(Errno::BUSY) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(Errno::BUSY) => {
                    rustix::mount::unmount(&self.target, UnmountFlags::DETACH).map_err(|e| {
                        annotate(&e.into(), &format!("cannot detach {}", self.mountpoint.display()))
                    })?;
                    return Ok(false);
                }
                Err(e) => {
                    return Err(annotate(
                        &e.into(),
                        &format!("cannot unmount {}", self.mountpoint.display()),
                    ));
                }
            }
        }
    }

    /// Leaves the session thread to end on its own; flushes the backend after it has.
    fn reap_in_background(&self, session: JoinHandle<io::Result<()>>) {
        let backend = Arc::clone(&self.backend);
        let read_only = self.read_only;
        let name = self.file_path().display().to_string();
        let spawned = thread::Builder::new().name("r3map-fuse-reap".to_owned()).spawn(move || {
            match session.join() {
                Ok(Ok(())) => debug!("the FUSE session of {name} ended"),
                Ok(Err(e)) => warn!("the FUSE session of {name} ended with an error: {e}"),
                Err(_) => error!("the FUSE session of {name} panicked"),
            }
            if !read_only && let Err(e) = backend.flush() {
                error!("cannot flush the backend of {name} after its last user let go: {e}");
            }
        });
        if let Err(e) = spawned {
            error!(
                "cannot start a thread to wait for the FUSE session of {}: {e}",
                self.mountpoint.display()
            );
        }
    }

    /// Sets the readahead window of the mount's backing device info (`read_ahead_kb` in sysfs):
    /// the kernel only lets FUSE lower it in `INIT`, and its default is 128 KiB.
    fn set_readahead(&self, bytes: u32) {
        let dev = match fs::metadata(&self.target) {
            Ok(meta) => meta.dev(),
            Err(e) => {
                debug!("cannot stat {} to set its readahead: {e}", self.target.display());
                return;
            }
        };
        let path =
            format!("/sys/class/bdi/{}:{}/read_ahead_kb", rustix::fs::major(dev), rustix::fs::minor(dev));
        match fs::write(&path, format!("{}\n", bytes / 1024)) {
            Ok(()) => debug!("readahead of {} set to {} KiB", self.mountpoint.display(), bytes / 1024),
            Err(e) => debug!("cannot set the readahead in {path}: {e}"),
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            error!("unmounting {} failed: {e}", self.mountpoint.display());
        }
    }
}

/// The first of several errors; the others are logged.
#[derive(Default)]
struct Errors(Option<io::Error>);

impl Errors {
    fn note(&mut self, e: io::Error) {
        warn!("{e}");
        self.0.get_or_insert(e);
    }

    fn into_result(self) -> io::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Waits up to `timeout` for `handle`'s thread; gives the handle back when it is still running.
fn join_within<T>(handle: JoinHandle<T>, timeout: Duration) -> Result<T, JoinHandle<T>> {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return Err(handle);
        }
        thread::sleep(Duration::from_millis(2));
    }
    match handle.join() {
        Ok(value) => Ok(value),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Detaches a FUSE mount left behind at `mountpoint` by a process that died (accessing it fails
/// with "Transport endpoint is not connected"): a lazy unmount, repeated while FUSE mounts are
/// stacked there. Returns whether something was unmounted; `Ok(false)` when no FUSE mount is
/// there.
///
/// It detaches any FUSE mount at that path, whether or not a process still serves it: call it
/// on mount points you own, before mounting.
///
/// # Errors
/// Any error of reading `/proc/self/mountinfo` or of the unmount (`EPERM` without privilege).
pub fn cleanup_stale(mountpoint: &Path) -> io::Result<bool> {
    let target = resolve_mountpoint(mountpoint)?;
    let stale =
        matches!(fs::metadata(&target), Err(e) if e.raw_os_error() == Some(Errno::NOTCONN.raw_os_error()));
    let mut detached = false;
    // Each pass removes the top mount; a crash loop may have stacked several.
    for _ in 0..64 {
        let listed = fuse_mounted_at(&target)?;
        if !listed && (detached || !stale) {
            break;
        }
        match rustix::mount::unmount(&target, UnmountFlags::DETACH) {
            Ok(()) => {
                info!("detached the stale FUSE mount at {}", target.display());
                detached = true;
            }
            Err(Errno::INVAL | Errno::NOENT) => break,
            Err(e) => {
                return Err(annotate(
                    &e.into(),
                    &format!("cannot detach the FUSE mount at {}", target.display()),
                ));
            }
        }
    }
    Ok(detached)
}

/// The absolute path of `mountpoint` with the links of its parent resolved, without touching the
/// mount point itself (a stale mount fails every access with `ENOTCONN`).
fn resolve_mountpoint(mountpoint: &Path) -> io::Result<PathBuf> {
    let absolute = std::path::absolute(mountpoint)?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(absolute),
    }
}

/// Whether `/proc/self/mountinfo` lists a FUSE file system mounted at `target`.
fn fuse_mounted_at(target: &Path) -> io::Result<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4).map(unescape_mountinfo);
        let fs_type = fields.skip_while(|f| *f != "-").nth(1);
        let is_fuse = fs_type.is_some_and(|t| t == "fuse" || t.starts_with("fuse."));
        is_fuse && mount_point.is_some_and(|p| Path::new(&p) == target)
    }))
}

/// Undoes the octal escapes (`\040` for a space, ...) of a path in `/proc/self/mountinfo`.
fn unescape_mountinfo(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt as _;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

fn annotate(e: &io::Error, context: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<FuseMount>();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn options_are_checked() {
        assert!(FuseOptions::default().check().is_ok());
        for bad in [
            FuseOptions { file_name: String::new(), ..FuseOptions::default() },
            FuseOptions { file_name: "a/b".to_owned(), ..FuseOptions::default() },
            FuseOptions { file_name: "..".to_owned(), ..FuseOptions::default() },
            FuseOptions { threads: 0, ..FuseOptions::default() },
            FuseOptions { max_io: 512, ..FuseOptions::default() },
            FuseOptions { max_io: 32 << 20, ..FuseOptions::default() },
            FuseOptions { fs_name: "a,b".to_owned(), ..FuseOptions::default() },
        ] {
            assert_eq!(bad.check().unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn cleanup_stale_leaves_plain_directories_alone() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!cleanup_stale(dir.path()).unwrap());
    }
}

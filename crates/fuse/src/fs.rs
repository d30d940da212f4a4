//! The file system the kernel talks to: a root directory holding exactly one regular file whose
//! bytes are the backend's.
//!
//! Every request is answered on the fuser worker thread that received it, with one blocking call
//! into the backend (which is `Sync`, so the workers run in parallel).

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use r3map_core::{Capabilities, SharedBackend};
use rustix::fs::FallocateFlags;
use tracing::{debug, warn};

/// Inode of the one file (the root directory is [`INodeNo::ROOT`]).
pub(crate) const FILE_INO: INodeNo = INodeNo(2);

/// How long the kernel may cache the file's attributes and directory entry: the size never
/// changes and nothing else changes the tree, so "a year" stands for "for ever".
const TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How long the kernel may cache the root directory's attributes: short, so that `stat` of the
/// mount point of a server that died reports "Transport endpoint is not connected" at once
/// rather than cached attributes.
const ROOT_TTL: Duration = Duration::from_secs(1);

/// Block size reported by `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// Background requests (readahead, page-cache writeback) the kernel may have in flight.
const MAX_BACKGROUND: u16 = 64;

/// Largest buffer of zeroes written at once when the backend cannot zero a range by itself.
const ZERO_PIECE: u64 = 1024 * 1024;

/// What the kernel and this frontend agreed on when the file system was mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSettings {
    /// FUSE protocol version of the kernel (major, minor).
    pub protocol: (u32, u32),
    /// The kernel caches writes and sends them later (`FUSE_WRITEBACK_CACHE`).
    pub writeback_cache: bool,
    /// The file is served in direct-I/O mode (`FOPEN_DIRECT_IO`), not through the page cache.
    pub direct_io: bool,
    /// Shared writable `mmap` works on the direct-I/O file (`FUSE_DIRECT_IO_ALLOW_MMAP`).
    pub direct_io_mmap: bool,
    /// Largest write request asked for (the kernel further caps it at its page limit per request).
    pub max_write: u32,
}

/// The filesystem handed to fuser.
pub(crate) struct FileFs {
    backend: SharedBackend,
    size: u64,
    name: OsString,
    read_only: bool,
    direct_io: bool,
    want_writeback_cache: bool,
    max_io: u32,
    caps: Capabilities,
    root_attr: FileAttr,
    file_attr: FileAttr,
    /// Source of file handles: `counter << 1 | writable`.
    next_fh: AtomicU64,
    /// Number of completed calls that changed data (writes, trims, zeroing).
    writes: AtomicU64,
    /// Value of `writes` covered by the last successful backend flush.
    flushed: AtomicU64,
    settings: Arc<OnceLock<KernelSettings>>,
}

/// What [`FileFs::new`] needs besides the backend.
pub(crate) struct FsConfig {
    pub(crate) name: String,
    pub(crate) read_only: bool,
    pub(crate) direct_io: bool,
    pub(crate) writeback_cache: bool,
    pub(crate) max_io: u32,
    pub(crate) settings: Arc<OnceLock<KernelSettings>>,
}

impl FileFs {
    pub(crate) fn new(backend: SharedBackend, config: FsConfig) -> Self {
        let size = backend.size();
        let caps = backend.capabilities();
        let now = SystemTime::now();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let attr = |ino, kind, perm, size, nlink| FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        };
        let (dir_perm, file_perm) = if config.read_only { (0o555, 0o444) } else { (0o755, 0o644) };
        Self {
            backend,
            size,
            name: OsString::from(config.name),
            read_only: config.read_only,
            direct_io: config.direct_io,
            want_writeback_cache: config.writeback_cache,
            max_io: config.max_io,
            caps,
            root_attr: attr(INodeNo::ROOT, FileType::Directory, dir_perm, 0, 2),
            file_attr: attr(FILE_INO, FileType::RegularFile, file_perm, size, 1),
            next_fh: AtomicU64::new(1),
            writes: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            settings: config.settings,
        }
    }

    /// The attributes of `ino` and how long the kernel may cache them.
    fn attr(&self, ino: INodeNo) -> Option<(&FileAttr, Duration)> {
        match ino {
            INodeNo::ROOT => Some((&self.root_attr, ROOT_TTL)),
            FILE_INO => Some((&self.file_attr, TTL)),
            _ => None,
        }
    }

    /// The error for an operation on the file that `ino` is not.
    fn not_the_file(ino: INodeNo) -> Errno {
        if ino == INodeNo::ROOT { Errno::EISDIR } else { Errno::ENOENT }
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::AcqRel);
    }

    fn dirty(&self) -> bool {
        self.writes.load(Ordering::Acquire) != self.flushed.load(Ordering::Acquire)
    }

    /// `backend.flush()`, remembering which writes it covered.
    fn flush_backend(&self, why: &str) -> Result<(), Errno> {
        if self.read_only {
            return Ok(());
        }
        let covered = self.writes.load(Ordering::Acquire);
        match self.backend.flush() {
            Ok(()) => {
                self.flushed.fetch_max(covered, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                warn!("{why}: flushing the backend failed: {e}");
                Err(errno(&e, true))
            }
        }
    }

    /// Sets `off..off + len` (within the size) to zeroes.
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        if self.caps.write_zeroes {
            match self.backend.write_zeroes(off, len) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                other => return other,
            }
        }
        let zeroes = vec![0u8; to_usize(len.min(ZERO_PIECE))];
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let n = (end - pos).min(ZERO_PIECE);
            self.backend.write_at(&zeroes[..to_usize(n)], pos)?;
            pos += n;
        }
        Ok(())
    }

    fn fallocate_file(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let flags = FallocateFlags::from_bits_retain(mode.cast_unsigned());
        let keep_size = flags.contains(FallocateFlags::KEEP_SIZE);
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        // The part of the range inside the file.
        let clipped = (offset.min(self.size), end.min(self.size) - offset.min(self.size));
        let rest = flags - FallocateFlags::KEEP_SIZE;
        if rest.is_empty() {
            // Preallocation: every byte of the file already exists; growing it is impossible.
            return if keep_size || end <= self.size { Ok(()) } else { Err(Errno::ENOSPC) };
        }
        if rest == FallocateFlags::PUNCH_HOLE {
            if !keep_size {
                return Err(Errno::EOPNOTSUPP);
            }
            if !self.caps.trim {
                return Err(Errno::EOPNOTSUPP);
            }
            if clipped.1 == 0 {
                return Ok(());
            }
            let result = self.backend.trim(clipped.0, clipped.1);
            self.wrote();
            return result.map_err(|e| {
                warn!("trim of {} bytes at {} failed: {e}", clipped.1, clipped.0);
                errno(&e, true)
            });
        }
        if rest == FallocateFlags::ZERO_RANGE {
            if !keep_size && end > self.size {
                return Err(Errno::ENOSPC);
            }
            if clipped.1 == 0 {
                return Ok(());
            }
            let result = self.zero_range(clipped.0, clipped.1);
            self.wrote();
            return result.map_err(|e| {
                warn!("zeroing {} bytes at {} failed: {e}", clipped.1, clipped.0);
                errno(&e, true)
            });
        }
        Err(Errno::EOPNOTSUPP)
    }
}

thread_local! {
    /// Each worker thread's read buffer, reused so that a 1 MiB read costs no allocation.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("request sizes fit in usize")
}

/// The errno an application sees for a backend error. Never made-up data: every failure of the
/// backend becomes an error of the request.
pub(crate) fn errno(e: &io::Error, writing: bool) -> Errno {
    use io::ErrorKind as K;
    match e.kind() {
        K::InvalidInput => Errno::EINVAL,
        K::PermissionDenied if writing => Errno::EROFS,
        K::PermissionDenied => Errno::EPERM,
        K::ReadOnlyFilesystem => Errno::EROFS,
        K::Unsupported => Errno::EOPNOTSUPP,
        K::StorageFull => Errno::ENOSPC,
        K::QuotaExceeded => Errno::EDQUOT,
        K::FileTooLarge => Errno::EFBIG,
        K::TimedOut => Errno::ETIMEDOUT,
        K::OutOfMemory => Errno::ENOMEM,
        _ => Errno::EIO,
    }
}

impl Filesystem for FileFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max_write = match config.set_max_write(self.max_io) {
            Ok(_) => self.max_io,
            Err(nearest) => {
                let _ = config.set_max_write(nearest);
                nearest
            }
        };
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        let offered = config.capabilities();
        let mut writeback_cache = false;
        let mut direct_io_mmap = false;
        if self.direct_io {
            // Lets MAP_SHARED work on a file opened with FOPEN_DIRECT_IO (Linux 6.6 and later).
            if offered.contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP) {
                direct_io_mmap = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP).is_ok();
            }
        } else if self.want_writeback_cache && !self.read_only {
            if offered.contains(InitFlags::FUSE_WRITEBACK_CACHE) {
                writeback_cache = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE).is_ok();
            } else {
                warn!("the kernel does not offer FUSE_WRITEBACK_CACHE: writes go through to the backend");
            }
        }
        let version = config.kernel_abi();
        let settings = KernelSettings {
            protocol: (version.0, version.1),
            writeback_cache,
            direct_io: self.direct_io,
            direct_io_mmap,
            max_write,
        };
        debug!("FUSE session settings: {settings:?}");
        let _ = self.settings.set(settings);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
        } else if name == self.name.as_os_str() {
            reply.entry(&TTL, &self.file_attr, Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some((attr, ttl)) => reply.attr(&ttl, attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some((attr, ttl)) = self.attr(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // The size is the backend's and cannot change. Times, mode and owner are accepted and
        // ignored (tools such as cp and dd set them), so the attributes stay as they were.
        match size {
            Some(size) if ino != FILE_INO || size != self.size => {
                reply.error(if self.read_only { Errno::EROFS } else { Errno::EPERM });
            }
            _ => reply.attr(&ttl, attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            reply.error(Self::not_the_file(ino));
            return;
        }
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writable && self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) << 1 | u64::from(writable);
        let open_flags = if self.direct_io {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), open_flags);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            reply.error(Self::not_the_file(ino));
            return;
        }
        if offset >= self.size || size == 0 {
            reply.data(&[]);
            return;
        }
        // As for any file: a read that reaches the end returns what is there.
        let len = to_usize(u64::from(size).min(self.size - offset));
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            match self.backend.read_at(buf, offset) {
                Ok(()) => reply.data(buf),
                Err(e) => {
                    warn!("read of {len} bytes at {offset} failed: {e}");
                    reply.error(errno(&e, false));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            reply.error(Self::not_the_file(ino));
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        // As for a block device: a write that starts at or past the end fails with ENOSPC, one
        // that crosses the end writes what fits and reports a short count.
        if offset >= self.size {
            reply.error(Errno::ENOSPC);
            return;
        }
        let len = to_usize((self.size - offset).min(data.len() as u64));
        let Ok(count) = u32::try_from(len) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let result = self.backend.write_at(&data[..len], offset);
        self.wrote();
        match result {
            // Writeback of cached pages ignores a short count: the bytes past the end would be
            // dropped silently, so it fails instead and fsync/close report ENOSPC.
            Ok(()) if len < data.len() && write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) => {
                warn!(
                    "cached write of {} bytes at {offset} goes past the end ({} bytes)",
                    data.len(),
                    self.size
                );
                reply.error(Errno::ENOSPC);
            }
            Ok(()) => reply.written(count),
            Err(e) => {
                warn!("write of {len} bytes at {offset} failed: {e}");
                reply.error(errno(&e, true));
            }
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Sent on every close(); the kernel has written the file's dirty pages back before it.
        // Only a descriptor opened for writing flushes, and only when something changed since
        // the last flush, so readers closing the file cost nothing.
        let writable = fh.0 & 1 == 1;
        if ino == FILE_INO && writable && self.dirty() {
            match self.flush_backend("close") {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        } else {
            reply.ok();
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.flush_backend("fsync") {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == INodeNo::ROOT {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR);
        } else {
            reply.error(if ino == FILE_INO { Errno::ENOTDIR } else { Errno::ENOENT });
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            reply.error(if ino == FILE_INO { Errno::ENOTDIR } else { Errno::ENOENT });
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.name.as_os_str()),
        ];
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (next, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, next as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.flush_backend("fsync of the directory") {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size.div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.attr(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if mask.contains(AccessFlags::W_OK) && self.read_only {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            reply.error(Self::not_the_file(ino));
            return;
        }
        match self.fallocate_file(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_map_to_errno() {
        let e = |kind| io::Error::new(kind, "x");
        assert_eq!(errno(&e(io::ErrorKind::Other), false), Errno::EIO);
        assert_eq!(errno(&io::Error::other("remote went away"), false), Errno::EIO);
        assert_eq!(errno(&e(io::ErrorKind::InvalidInput), false), Errno::EINVAL);
        assert_eq!(errno(&e(io::ErrorKind::PermissionDenied), false), Errno::EPERM);
        assert_eq!(errno(&e(io::ErrorKind::PermissionDenied), true), Errno::EROFS);
        assert_eq!(errno(&e(io::ErrorKind::Unsupported), true), Errno::EOPNOTSUPP);
        assert_eq!(errno(&e(io::ErrorKind::StorageFull), true), Errno::ENOSPC);
        assert_eq!(errno(&e(io::ErrorKind::TimedOut), false), Errno::ETIMEDOUT);
        assert_eq!(errno(&e(io::ErrorKind::ConnectionReset), false), Errno::EIO);
        assert_eq!(errno(&io::Error::from_raw_os_error(28), true), Errno::ENOSPC);
    }
}

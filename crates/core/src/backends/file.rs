//! A backend over one regular file or block device, using positional I/O.
//!
//! Every call goes straight to the kernel (`pread`/`pwrite`, `fallocate`, `lseek`): there is no
//! lock in this backend, so concurrent requests run in parallel as far as the kernel lets them.
//! Regular files are sparse-aware: `trim` punches holes, `write_zeroes` uses `FALLOC_FL_ZERO_RANGE`
//! and `extents` reports holes found with `SEEK_DATA` / `SEEK_HOLE`.

use std::fs;
use std::io::{self, Seek as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, FileTypeExt as _};
use std::path::Path;

use rustix::fs::{FallocateFlags, OFlags, SeekFrom};
use rustix::io::Errno;

use crate::backend::{Backend, Capabilities, Extent, check_range, len64};
use crate::geometry::to_usize;

/// Largest buffer of zeroes written at once when the storage cannot zero a range by itself.
const ZERO_PIECE: u64 = 1024 * 1024;

/// A regular file or block device of a fixed size, read and written with positional I/O.
///
/// The size is taken when the file is opened; a file that is later truncated or extended by
/// someone else keeps its old size here (reads past its new end fail rather than invent zeroes).
#[derive(Debug)]
pub struct File {
    file: fs::File,
    /// How errors name the file: its path, or its descriptor for [`File::from_std`].
    name: String,
    size: u64,
    read_only: bool,
    /// The logical block size of a block device (its `fallocate` alignment); `None` for a file.
    block_size: Option<u64>,
}

impl File {
    /// Opens an existing regular file or block device for reading and writing.
    ///
    /// The size is the file's length, or the device's size for a block device.
    ///
    /// # Errors
    /// Any error of opening `path` (`NotFound`, `PermissionDenied`, ...), with the path in the
    /// message; `InvalidInput` when `path` is neither a regular file nor a block device.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_with(path.as_ref(), false)
    }

    /// Opens an existing regular file or block device for reading only.
    ///
    /// Writes, trims and zeroing fail; [`Capabilities::read_only`] is set.
    ///
    /// # Errors
    /// As for [`File::open`].
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_with(path.as_ref(), true)
    }

    /// Creates a regular file of `size` bytes, or truncates an existing one and sets it to `size`
    /// bytes. The file is sparse: it reads as zeroes and takes (almost) no disk space.
    ///
    /// # Errors
    /// Any error of creating or sizing the file, with the path in the message.
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let path = path.as_ref();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| annotate(&e, &format!("cannot create {}", path.display())))?;
        file.set_len(size).map_err(|e| {
            annotate(&e, &format!("cannot set the size of {} to {size} bytes", path.display()))
        })?;
        Self::new(file, path.display().to_string(), false)
    }

    /// Wraps an open file or block device. `read_only` must be set when `file` was not opened for
    /// writing (writes would fail anyway, but with a less helpful error).
    ///
    /// # Errors
    /// Any error of inspecting the file; `InvalidInput` when it is neither a regular file nor a
    /// block device, or when it is writable but opened in append mode (where Linux `pwrite`
    /// ignores the offset).
    pub fn from_std(file: fs::File, read_only: bool) -> io::Result<Self> {
        let name = format!("file descriptor {}", file.as_raw_fd());
        let flags = rustix::fs::fcntl_getfl(&file)
            .map_err(|e| annotate(&e.into(), &format!("cannot inspect {name}")))?;
        if !read_only && flags.contains(OFlags::APPEND) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is open in append mode, where positional writes go to the end"),
            ));
        }
        Self::new(file, name, read_only)
    }

    /// Whether this backend is a block device (rather than a regular file).
    #[must_use]
    pub fn is_block_device(&self) -> bool {
        self.block_size.is_some()
    }

    fn open_with(path: &Path, read_only: bool) -> io::Result<Self> {
        let mode = if read_only { "read-only" } else { "read-write" };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| annotate(&e, &format!("cannot open {} {mode}", path.display())))?;
        Self::new(file, path.display().to_string(), read_only)
    }

    fn new(file: fs::File, name: String, read_only: bool) -> io::Result<Self> {
        let meta = file.metadata().map_err(|e| annotate(&e, &format!("cannot inspect {name}")))?;
        let kind = meta.file_type();
        let (size, block_size) = if kind.is_file() {
            (meta.len(), None)
        } else if kind.is_block_device() {
            let size = (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|e| annotate(&e, &format!("cannot find the size of {name}")))?;
            let block = rustix::fs::ioctl_blksszget(&file)
                .map_err(|e| annotate(&e.into(), &format!("cannot find the logical block size of {name}")))?;
            (size, Some(u64::from(block.max(1))))
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is neither a regular file nor a block device"),
            ));
        };
        Ok(Self { file, name, size, read_only, block_size })
    }

    fn check_writable(&self, verb: &str) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("cannot {verb} {}: it was opened read-only", self.name),
            ));
        }
        Ok(())
    }

    /// `fallocate(mode)` over `off..off + len`; `Ok(false)` when the file system or device does
    /// not support `mode`. A block device only accepts ranges aligned to its logical block size,
    /// so there the unaligned head and tail are written with zeroes instead.
    fn fallocate(&self, mode: FallocateFlags, off: u64, len: u64) -> io::Result<bool> {
        let end = off + len;
        let (start, stop) = match self.block_size {
            Some(bs) => (off.next_multiple_of(bs), end / bs * bs),
            None => (off, end),
        };
        if start >= stop {
            // Less than one aligned block of a device: the device cannot help.
            zero_fill(&self.file, off, len)?;
            return Ok(true);
        }
        match rustix::fs::fallocate(&self.file, mode, start, stop - start) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        zero_fill(&self.file, off, start - off)?;
        zero_fill(&self.file, stop, end - stop)?;
        Ok(true)
    }

    /// `lseek` to `whence` (`SEEK_DATA` or `SEEK_HOLE`); only the returned offset is used.
    fn seek(&self, whence: SeekFrom) -> io::Result<Found> {
        // lseek moves the descriptor's shared position, which positional I/O never uses, so
        // concurrent callers do not disturb each other.
        match rustix::fs::seek(&self.file, whence) {
            Ok(at) => Ok(Found::At(at)),
            Err(Errno::NXIO) => Ok(Found::Beyond),
            Err(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => Ok(Found::Unknown),
            Err(e) => Err(annotate(&e.into(), &format!("cannot list the holes of {}", self.name))),
        }
    }
}

/// The answer of `SEEK_DATA` / `SEEK_HOLE`.
enum Found {
    /// The next data (or hole) starts here.
    At(u64),
    /// `ENXIO`: no data after the offset (for `SEEK_DATA`), or the offset is past the end.
    Beyond,
    /// The file system or device does not support the query.
    Unknown,
}

impl Backend for File {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.file.read_exact_at(buf, off).map_err(|e| {
            annotate(&e, &format!("cannot read {} bytes at offset {off} of {}", buf.len(), self.name))
        })
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.check_writable("write to")?;
        self.file.write_all_at(buf, off).map_err(|e| {
            annotate(&e, &format!("cannot write {} bytes at offset {off} of {}", buf.len(), self.name))
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| annotate(&e, &format!("cannot flush {} to disk", self.name)))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            trim: !self.read_only,
            write_zeroes: !self.read_only,
            extents: true,
            read_only: self.read_only,
        }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size)?;
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("cannot trim {}: it was opened read-only", self.name),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let msg = || format!("cannot trim {len} bytes at offset {off} of {}", self.name);
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match self.fallocate(punch, off, len) {
            Ok(true) => Ok(()),
            Ok(false) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: the file system or device cannot punch holes", msg()),
            )),
            Err(e) => Err(annotate(&e, &msg())),
        }
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.size)?;
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("cannot write zeroes to {}: it was opened read-only", self.name),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let msg = || format!("cannot write {len} zero bytes at offset {off} of {}", self.name);
        let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let zeroed = || -> io::Result<()> {
            if !(self.fallocate(zero, off, len)? || self.fallocate(punch, off, len)?) {
                zero_fill(&self.file, off, len)?;
            }
            Ok(())
        };
        zeroed().map_err(|e| annotate(&e, &msg()))
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(off, len, self.size)?;
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let data = match self.seek(SeekFrom::Data(pos))? {
                Found::At(at) => at.clamp(pos, end),
                Found::Beyond => end,
                // No SEEK_DATA: the rest is data (SEEK_HOLE below says so too).
                Found::Unknown => pos,
            };
            push(&mut out, data - pos, true);
            pos = data;
            if pos >= end {
                break;
            }
            let hole = match self.seek(SeekFrom::Hole(pos))? {
                Found::At(at) => at.clamp(pos, end),
                // The file shrank behind our back, or there is no SEEK_HOLE: report data.
                Found::Beyond | Found::Unknown => end,
            };
            // A hole punched at `pos` between the two calls yields no progress here; the next
            // SEEK_DATA then moves past it.
            push(&mut out, hole - pos, false);
            pos = hole;
        }
        Ok(out)
    }
}

/// Writes zeroes over `off..off + len` of `file` in pieces of at most 1 MiB.
pub(super) fn zero_fill(file: &fs::File, off: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; to_usize(len.min(ZERO_PIECE))];
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let n = (end - pos).min(ZERO_PIECE);
        file.write_all_at(&zeroes[..to_usize(n)], pos)?;
        pos += n;
    }
    Ok(())
}

/// Appends a run, merging it with the previous one of the same kind.
pub(super) fn push(out: &mut Vec<Extent>, len: u64, hole: bool) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == hole => last.len += len,
        _ => out.push(Extent { len, hole }),
    }
}

/// Puts `context` in front of the message of `e`, keeping its kind.
pub(super) fn annotate(e: &io::Error, context: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::backend::SharedBackend;
    use crate::conformance;

    const GIB: u64 = 1024 * 1024 * 1024;

    fn blocks(path: &Path) -> u64 {
        fs::metadata(path).unwrap().blocks()
    }

    #[test]
    fn conformance_on_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicU64::new(0);
        conformance::run(&|size| -> SharedBackend {
            let path = dir.path().join(format!("f{}", n.fetch_add(1, Ordering::Relaxed)));
            Arc::new(File::create(path, size).unwrap())
        });
    }

    #[test]
    fn a_fresh_file_is_one_hole_and_takes_no_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let f = File::create(&path, GIB).unwrap();
        assert_eq!(f.size(), GIB);
        assert!(!f.is_block_device());
        assert!(blocks(&path) <= 16, "{} blocks", blocks(&path));
        assert_eq!(f.extents(0, GIB).unwrap(), vec![Extent { len: GIB, hole: true }]);
        let caps = f.capabilities();
        assert!(caps.trim && caps.write_zeroes && caps.extents && !caps.read_only);

        // One written block shows up as data between two holes.
        f.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let extents = f.extents(0, GIB).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), GIB);
        assert_eq!(extents.len(), 3, "{extents:?}");
        assert!(extents[0].hole && !extents[1].hole && extents[2].hole);
        assert!(extents[0].len <= 1 << 20);
        assert!(extents[0].len + extents[1].len >= (1 << 20) + 4096);
        // A range inside the data, and one inside the trailing hole.
        assert_eq!(f.extents((1 << 20) + 100, 10).unwrap(), vec![Extent { len: 10, hole: false }]);
        assert_eq!(f.extents(GIB - 10, 10).unwrap(), vec![Extent { len: 10, hole: true }]);
        assert_eq!(f.extents(GIB, 0).unwrap(), vec![]);
        assert_eq!(f.extents(GIB, 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn trim_frees_blocks_and_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path, 8 << 20).unwrap();
        f.write_at(&vec![0x5a; 4 << 20], 1 << 20).unwrap();
        f.flush().unwrap();
        let full = blocks(&path);
        assert!(full >= (4 << 20) / 512, "{full} blocks after writing 4 MiB");

        f.trim(1 << 20, 4 << 20).unwrap();
        let after = blocks(&path);
        assert!(after < full / 8, "{after} blocks after trim, {full} before");
        let mut buf = vec![1u8; 4 << 20];
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(f.extents(0, 8 << 20).unwrap(), vec![Extent { len: 8 << 20, hole: true }]);
        assert_eq!(f.trim(8 << 20, 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn write_zeroes_and_its_fallback_zero_unaligned_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f"), 4 << 20).unwrap();
        let data = vec![0xffu8; 4 << 20];
        f.write_at(&data, 0).unwrap();
        f.write_zeroes(10, 5000).unwrap();
        // The last resort when fallocate is not supported: zero buffers in pieces.
        zero_fill(&f.file, ZERO_PIECE - 3, 2 * ZERO_PIECE + 7).unwrap();
        let mut expected = data;
        expected[10..5010].fill(0);
        expected[to_usize(ZERO_PIECE - 3)..to_usize(3 * ZERO_PIECE + 4)].fill(0);
        let mut buf = vec![0u8; 4 << 20];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf == expected);
    }

    #[test]
    fn read_only_rejects_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        fs::write(&path, b"hello world").unwrap();
        let f = File::open_read_only(&path).unwrap();
        assert_eq!(f.size(), 11);
        let caps = f.capabilities();
        assert!(caps.read_only && !caps.trim && !caps.write_zeroes && caps.extents);
        let mut buf = [0u8; 5];
        f.read_at(&mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        let err = f.write_at(b"x", 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("read-only"), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert_eq!(f.trim(0, 1).unwrap_err().kind(), io::ErrorKind::Unsupported);
        assert_eq!(f.write_zeroes(0, 1).unwrap_err().kind(), io::ErrorKind::Unsupported);
        f.flush().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello world");

        let std_file = fs::File::open(&path).unwrap();
        let f = File::from_std(std_file, true).unwrap();
        assert_eq!(f.write_at(b"x", 0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn open_reports_the_path_and_keeps_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        for err in [File::open(&missing).unwrap_err(), File::open_read_only(&missing).unwrap_err()] {
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
            assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
        }
        let err = File::open_read_only(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("neither"), "{err}");
        let err = File::create(dir.path().join("no/such/dir"), 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }

    #[test]
    fn open_existing_file_keeps_data_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path, 10_000).unwrap().write_at(b"abc", 9_997).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(f.size(), 10_000);
        let mut buf = [0u8; 3];
        f.read_at(&mut buf, 9_997).unwrap();
        assert_eq!(&buf, b"abc");
        let f = File::from_std(fs::OpenOptions::new().read(true).write(true).open(&path).unwrap(), false)
            .unwrap();
        f.write_at(b"xyz", 0).unwrap();
        assert_eq!(&fs::read(&path).unwrap()[..3], b"xyz");
        let appending = fs::OpenOptions::new().append(true).open(&path).unwrap();
        let err = File::from_std(appending, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("append"), "{err}");
    }

    /// A loop device over a file, detached on drop (also when the test fails).
    struct Loop {
        dev: PathBuf,
    }

    impl Loop {
        fn attach(backing: &Path) -> Result<Self, String> {
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(backing)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Ok(Self { dev: dev.into() })
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let status = Command::new("losetup").arg("-d").arg(&self.dev).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("could not detach {}: {status:?}", self.dev.display());
            }
        }
    }

    fn is_root() -> bool {
        fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)) == Some("0")
        })
    }

    #[test]
    fn block_device_via_loop() {
        if !is_root() {
            println!("skipping block_device_via_loop: not root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let size: u64 = 8 << 20;
        fs::File::create(&backing).unwrap().set_len(size).unwrap();
        let lo = match Loop::attach(&backing) {
            Ok(lo) => lo,
            Err(e) => {
                println!("skipping block_device_via_loop: {e}");
                return;
            }
        };
        // Declared after `lo`, so it is closed before the device is detached.
        let f = File::open(&lo.dev).unwrap();
        assert!(f.is_block_device());
        assert_eq!(f.size(), size);

        let mut model = vec![0u8; to_usize(size)];
        let data: Vec<u8> = (0..3usize << 20).map(|i| u8::try_from(i % 251 + 1).unwrap()).collect();
        f.write_at(&data, 12_345).unwrap();
        model[12_345..12_345 + data.len()].copy_from_slice(&data);
        f.flush().unwrap();

        // Unaligned trims and zeroing: the device does the aligned middle, we write the edges.
        f.trim(100_000, 1_000_001).unwrap();
        model[100_000..1_100_001].fill(0);
        f.trim(2_000_001, 10).unwrap();
        model[2_000_001..2_000_011].fill(0);
        f.write_zeroes(1_500_003, 700_000).unwrap();
        model[1_500_003..2_200_003].fill(0);
        let mut buf = vec![1u8; to_usize(size)];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf == model, "the device does not read back as written");

        let extents = f.extents(0, size).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), size);
        assert_eq!(f.write_at(b"x", size).unwrap_err().kind(), io::ErrorKind::InvalidInput);

        let ro = File::open_read_only(&lo.dev).unwrap();
        assert_eq!(ro.size(), size);
        assert_eq!(ro.write_at(b"x", 0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }
}

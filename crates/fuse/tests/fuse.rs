//! The FUSE frontend through the kernel: every test mounts a backend in a temporary directory
//! (as root, with `/dev/fuse`; otherwise it prints why and skips) and uses the file with ordinary
//! system calls. A `Mounted` fixture unmounts (its `FuseMount` drops first) even when a test
//! fails.
//!
//! The `mmap` checks need `unsafe` (mapping a file is unsafe in memmap2): it is confined to the
//! one helper `map_shared` below, allowed there alone.

// Test code: sizes are small, so `u64 as usize` cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Capabilities, Extent, Memory, SharedBackend, conformance};
use r3map_fuse::{FuseMount, FuseOptions, cleanup_stale};
use rustix::fs::FallocateFlags;
use tempfile::TempDir;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;
const EPERM: i32 = 1;
const EROFS: i32 = 30;
const ENOTCONN: i32 = 107;

fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        println!("skipping: /dev/fuse is missing");
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        println!("skipping: mounting FUSE needs root");
        return false;
    }
    true
}

/// A mounted backend and its temporary mount point. Fields drop in order: unmount, then remove
/// the directory.
struct Mounted {
    mount: FuseMount,
    _dir: TempDir,
}

impl Mounted {
    fn new(backend: SharedBackend, options: FuseOptions) -> Self {
        let dir = tempfile::tempdir().expect("temporary mount point");
        let mount = FuseMount::mount(backend, dir.path(), options).expect("mount");
        Self { mount, _dir: dir }
    }

    fn open(&self) -> File {
        OpenOptions::new().read(true).write(true).open(self.mount.file_path()).expect("open the FUSE file")
    }
}

fn page_cache() -> FuseOptions {
    FuseOptions::default()
}

fn write_through() -> FuseOptions {
    FuseOptions { writeback_cache: false, ..FuseOptions::default() }
}

fn direct_io() -> FuseOptions {
    FuseOptions { direct_io: Some(true), ..FuseOptions::default() }
}

fn all_modes() -> [(&'static str, FuseOptions); 3] {
    [("page cache", page_cache()), ("write-through", write_through()), ("direct I/O", direct_io())]
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(1..=255)).collect()
}

fn backend_bytes(b: &dyn Backend, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    b.read_at(&mut buf, off).expect("backend read");
    buf
}

/// Maps the whole file shared and writable.
#[allow(unsafe_code)]
fn map_shared(file: &File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: the file is served by this test's own FUSE mount with a fixed size (truncation is
    // refused), and nothing else maps or changes it while the mapping is alive, so the memory
    // stays valid and no other Rust reference aliases it.
    unsafe { memmap2::MmapMut::map_mut(file) }
}

/// A memory backend that records the optional verbs, can fail reads or flushes on demand, and
/// keeps a second copy updated only by `flush` ("what the remote has durably").
struct Spy {
    live: Memory,
    durable: Memory,
    dirty: Mutex<Vec<(u64, u64)>>,
    trims: Mutex<Vec<(u64, u64)>>,
    zeroes: Mutex<Vec<(u64, u64)>>,
    flushes: AtomicU64,
    fail_reads: AtomicBool,
    fail_flushes: AtomicBool,
}

impl Spy {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            live: Memory::new(size),
            durable: Memory::new(size),
            dirty: Mutex::new(Vec::new()),
            trims: Mutex::new(Vec::new()),
            zeroes: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
        })
    }

    fn shared(self: &Arc<Self>) -> SharedBackend {
        Arc::clone(self) as SharedBackend
    }
}

impl Backend for Spy {
    fn size(&self) -> u64 {
        self.live.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("injected read failure at {off}")));
        }
        self.live.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.live.write_at(buf, off)?;
        self.dirty.lock().unwrap().push((off, buf.len() as u64));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected flush failure"));
        }
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap());
        for (off, len) in dirty {
            let data = backend_bytes(&self.live, off, len as usize);
            self.durable.write_at(&data, off)?;
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { trim: true, write_zeroes: true, extents: false, read_only: false }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.trims.lock().unwrap().push((off, len));
        self.live.trim(off, len)?;
        self.dirty.lock().unwrap().push((off, len));
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.zeroes.lock().unwrap().push((off, len));
        self.live.write_zeroes(off, len)?;
        self.dirty.lock().unwrap().push((off, len));
        Ok(())
    }
}

/// `r3map_core::File` over the FUSE file, keeping the mount alive as long as the file.
struct MountedFile {
    file: r3map_core::File,
    _mounted: Mounted,
}

impl Backend for MountedFile {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.flush()
    }
    fn capabilities(&self) -> Capabilities {
        self.file.capabilities()
    }
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.file.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.file.write_zeroes(off, len)
    }
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.file.extents(off, len)
    }
}

fn conformance_through_fuse(options: &FuseOptions) {
    conformance::run(&|size| {
        let mounted = Mounted::new(Arc::new(Memory::new(size)), options.clone());
        let file =
            r3map_core::File::open(mounted.mount.file_path()).expect("open the FUSE file as a backend");
        Arc::new(MountedFile { file, _mounted: mounted }) as SharedBackend
    });
}

#[test]
fn conformance_page_cache() {
    if fuse_available() {
        conformance_through_fuse(&page_cache());
    }
}

#[test]
fn conformance_write_through() {
    if fuse_available() {
        conformance_through_fuse(&write_through());
    }
}

#[test]
fn conformance_direct_io() {
    if fuse_available() {
        conformance_through_fuse(&direct_io());
    }
}

#[test]
fn directory_holds_exactly_the_file() {
    if !fuse_available() {
        return;
    }
    let size = 5 * 1024 * 1024 + 3;
    let options = FuseOptions { file_name: "disk.img".to_owned(), ..FuseOptions::default() };
    let m = Mounted::new(Arc::new(Memory::new(size)), options);
    assert_eq!(m.mount.file_path(), m.mount.mountpoint().join("disk.img"));
    let names: Vec<_> = std::fs::read_dir(m.mount.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["disk.img"]);
    let meta = std::fs::metadata(m.mount.file_path()).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), size);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(meta.uid(), rustix::process::getuid().as_raw());
    assert_eq!(meta.gid(), rustix::process::getgid().as_raw());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mountpoint = m.mount.mountpoint().canonicalize().unwrap();
    let line =
        mounts.lines().find(|l| l.split(' ').nth(4) == mountpoint.to_str()).expect("listed in mountinfo");
    assert!(line.contains(" - fuse r3map "), "{line}");
    assert!(line.contains("default_permissions"), "{line}");
    // Nothing else can be created, and the size cannot change.
    let err = File::create(m.mount.mountpoint().join("other")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EPERM), "{err}");
    let file = m.open();
    assert_eq!(file.set_len(size - 1).unwrap_err().raw_os_error(), Some(EPERM));
    assert_eq!(file.set_len(size + 1).unwrap_err().raw_os_error(), Some(EPERM));
    file.set_len(size).expect("truncating to the same size is a no-op");
    file.set_modified(std::time::SystemTime::now()).expect("setting times is accepted");
    let err = OpenOptions::new().write(true).truncate(true).open(m.mount.file_path()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EPERM), "open(O_TRUNC) must not empty the file");
}

#[test]
fn read_and_write_round_trip_in_every_mode() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in all_modes() {
        let size = 9 * 1024 * 1024 + 1234;
        let spy = Spy::new(size);
        let before = pattern(1, size as usize);
        spy.write_at(&before, 0).unwrap();
        let m = Mounted::new(spy.shared(), options);
        let file = m.open();
        let mut all = Vec::new();
        File::open(m.mount.file_path()).unwrap().read_to_end(&mut all).unwrap();
        assert!(all == before, "{mode}: the file reads as the backend");

        let mut model = before;
        let cases = [(0u64, 1usize), (4095, 3), (1 << 20, 3 << 20), (size - 10, 10), (777, 200_000)];
        for (i, (off, len)) in cases.into_iter().enumerate() {
            let data = pattern(100 + i as u64, len);
            file.write_all_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let mut back = vec![0; len];
            file.read_exact_at(&mut back, off).unwrap();
            assert!(back == data, "{mode}: case {i} reads back");
        }
        // Reads at and past the end are short or empty, as for any file.
        let mut buf = vec![0; 100];
        assert_eq!(file.read_at(&mut buf, size - 7).unwrap(), 7);
        assert_eq!(&buf[..7], &model[size as usize - 7..]);
        assert_eq!(file.read_at(&mut buf, size).unwrap(), 0);
        assert_eq!(file.read_at(&mut buf, size + 4096).unwrap(), 0);

        file.sync_all().unwrap();
        assert!(backend_bytes(&spy.live, 0, size as usize) == model, "{mode}: the backend holds the writes");
        assert!(backend_bytes(&spy.durable, 0, size as usize) == model, "{mode}: fsync flushed the backend");
        drop(file);
        m.mount.unmount().unwrap();
    }
}

#[test]
fn writes_past_the_end_fail_with_enospc() {
    if !fuse_available() {
        return;
    }
    let size = 1024 * 1024 + 100;
    for (mode, options) in [("write-through", write_through()), ("direct I/O", direct_io())] {
        let spy = Spy::new(size);
        let m = Mounted::new(spy.shared(), options);
        let file = m.open();
        let err = file.write_at(b"x", size).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENOSPC), "{mode}: {err}");
        let err = file.write_at(&[1; 4096], size + 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENOSPC), "{mode}: {err}");
        // A write across the end writes what fits.
        let n = file.write_at(&[7; 300], size - 100).unwrap();
        assert_eq!(n, 100, "{mode}: short count at the end");
        assert_eq!(backend_bytes(&spy.live, size - 100, 100), vec![7; 100]);
        assert_eq!(file.metadata().unwrap().len(), size, "{mode}: the size never changes");
        let err = rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, size + 1).unwrap_err();
        assert_eq!(err.raw_os_error(), ENOSPC, "{mode}: allocating past the end");
        rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, size).expect("allocating inside the file");
    }
    // With the writeback cache the kernel takes the write into its cache; fsync reports it.
    let spy = Spy::new(size);
    let m = Mounted::new(spy.shared(), page_cache());
    if m.mount.settings().writeback_cache {
        let file = m.open();
        file.write_at(b"past the end", size + 10).unwrap();
        let err = file.sync_all().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENOSPC), "{err}");
    }
}

#[test]
fn mmap_shared_writes_reach_the_backend_through_msync() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in all_modes() {
        let size = 4 * 1024 * 1024 + 3000;
        let spy = Spy::new(size);
        spy.write_at(&pattern(5, size as usize), 0).unwrap();
        let m = Mounted::new(spy.shared(), options);
        if mode == "direct I/O" && !m.mount.settings().direct_io_mmap {
            println!("skipping mmap in direct-I/O mode: the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP");
            continue;
        }
        let file = m.open();
        let mut map = map_shared(&file).expect("mmap(MAP_SHARED)");
        assert!(
            map[..] == backend_bytes(&spy.live, 0, size as usize)[..],
            "{mode}: the mapping shows the backend"
        );
        let flushes = spy.flushes.load(Ordering::SeqCst);
        let writes = [(0usize, 10usize), (70_000, 5000), (size as usize - 3000, 3000)];
        for (i, &(off, len)) in writes.iter().enumerate() {
            map[off..off + len].copy_from_slice(&pattern(50 + i as u64, len));
        }
        map.flush().expect("msync");
        for (i, &(off, len)) in writes.iter().enumerate() {
            let want = pattern(50 + i as u64, len);
            assert!(
                backend_bytes(&spy.live, off as u64, len) == want,
                "{mode}: write {i} reached the backend"
            );
            assert!(backend_bytes(&spy.durable, off as u64, len) == want, "{mode}: write {i} was flushed");
        }
        assert!(spy.flushes.load(Ordering::SeqCst) > flushes, "{mode}: msync flushed the backend");
        drop(map);
        drop(file);
        m.mount.unmount().unwrap();
    }
}

#[test]
fn direct_io_reads_and_writes_stay_coherent_with_a_mapping() {
    if !fuse_available() {
        return;
    }
    let size = 1024 * 1024;
    let spy = Spy::new(size);
    let m = Mounted::new(spy.shared(), direct_io());
    if !m.mount.settings().direct_io_mmap {
        println!("skipped: the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP");
        return;
    }
    let file = m.open();
    let mut map = map_shared(&file).expect("mmap(MAP_SHARED)");
    // Written through the mapping, not synced: a direct read still sees it.
    map[4096..4101].copy_from_slice(b"hello");
    let mut buf = [0u8; 5];
    file.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf, b"hello", "pread after a store into the mapping");
    // Written with pwrite: the mapping shows it (the cached page was dropped).
    file.write_all_at(b"world", 8192).unwrap();
    assert_eq!(&map[8192..8197], b"world", "the mapping after a pwrite");
    // Over a page the mapping has dirtied: the direct write wins and the mapping shows it.
    file.write_all_at(b"XYZ", 4096).unwrap();
    assert_eq!(&map[4096..4101], b"XYZlo", "a pwrite over a dirty mapped page");
    map.flush().expect("msync");
    assert_eq!(backend_bytes(&spy.live, 4096, 5), b"XYZlo");
    assert_eq!(backend_bytes(&spy.live, 8192, 5), b"world");
    drop(map);
    drop(file);
    m.mount.unmount().unwrap();
}

#[test]
fn fsync_reports_a_failed_backend_flush_as_eio() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in all_modes() {
        let spy = Spy::new(1024 * 1024);
        let m = Mounted::new(spy.shared(), options);
        let file = m.open();
        file.write_all_at(&[9; 8192], 4096).unwrap();
        spy.fail_flushes.store(true, Ordering::SeqCst);
        let err = file.sync_all().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO), "{mode}: {err}");
        let err = file.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO), "{mode}: {err}");
        spy.fail_flushes.store(false, Ordering::SeqCst);
        file.sync_all().expect("fsync succeeds once the backend flushes again");
        assert_eq!(backend_bytes(&spy.durable, 4096, 8192), vec![9; 8192]);
    }
}

#[test]
fn a_failed_backend_read_is_eio_never_zeroes() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in all_modes() {
        let size = 2 * 1024 * 1024;
        let spy = Spy::new(size);
        spy.write_at(&pattern(3, size as usize), 0).unwrap();
        let m = Mounted::new(spy.shared(), options);
        let file = m.open();
        spy.fail_reads.store(true, Ordering::SeqCst);
        let mut buf = vec![0; 4096];
        let err = file.read_exact_at(&mut buf, 8192).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO), "{mode}: {err}");
        spy.fail_reads.store(false, Ordering::SeqCst);
        file.read_exact_at(&mut buf, 8192).expect("reads work again");
        assert_eq!(buf, pattern(3, size as usize)[8192..8192 + 4096], "{mode}");
    }
}

#[test]
fn fallocate_punches_holes_and_zeroes_through_the_backend() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in all_modes() {
        let size = 3 * 1024 * 1024 + 17;
        let spy = Spy::new(size);
        let data = pattern(8, size as usize);
        spy.write_at(&data, 0).unwrap();
        let m = Mounted::new(spy.shared(), options);
        let file = m.open();
        let mut cached = vec![0; 100_000];
        file.read_exact_at(&mut cached, 0).unwrap(); // pages now cached in page-cache mode

        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&file, punch, 4096, 65_536).expect("punch hole");
        assert_eq!(*spy.trims.lock().unwrap(), [(4096, 65_536)], "{mode}: trim reached the backend");
        // Past the end only the part inside the file is trimmed.
        rustix::fs::fallocate(&file, punch, size - 10, 1000).expect("punch hole at the end");
        assert_eq!(spy.trims.lock().unwrap()[1], (size - 10, 10), "{mode}");

        let mut expect = data;
        expect[4096..4096 + 65_536].fill(0);
        expect[size as usize - 10..].fill(0);
        let mut back = vec![1; size as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == expect, "{mode}: the hole reads as zeroes, the rest unchanged");

        match rustix::fs::fallocate(
            &file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            200_000,
            5000,
        ) {
            Ok(()) => {
                assert_eq!(
                    *spy.zeroes.lock().unwrap(),
                    [(200_000, 5000)],
                    "{mode}: zeroing reached the backend"
                );
                expect[200_000..205_000].fill(0);
                file.read_exact_at(&mut back, 0).unwrap();
                assert!(back == expect, "{mode}: the zeroed range reads as zeroes");
            }
            Err(e) => println!("{mode}: this kernel does not pass FALLOC_FL_ZERO_RANGE to FUSE ({e})"),
        }
        file.sync_all().unwrap();
        assert!(
            backend_bytes(&spy.durable, 0, size as usize) == expect,
            "{mode}: trims are flushed like writes"
        );
    }
}

#[test]
fn punching_holes_without_the_trim_capability_is_unsupported() {
    if !fuse_available() {
        return;
    }
    struct NoTrim(Memory);
    impl Backend for NoTrim {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.0.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.0.write_at(buf, off)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }
    let m = Mounted::new(Arc::new(NoTrim(Memory::new(1 << 20))), page_cache());
    let file = m.open();
    file.write_all_at(&[5; 10_000], 0).unwrap();
    let err = rustix::fs::fallocate(&file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, 0, 4096)
        .unwrap_err();
    assert_eq!(err, rustix::io::Errno::OPNOTSUPP);
    // Zeroing falls back to writing zeroes.
    if rustix::fs::fallocate(&file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, 100, 200).is_ok()
    {
        let mut back = vec![1; 10_000];
        file.read_exact_at(&mut back, 0).unwrap();
        let mut expect = vec![5; 10_000];
        expect[100..300].fill(0);
        assert_eq!(back, expect);
    }
}

#[test]
fn concurrent_readers_see_the_backend() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in [("page cache", page_cache()), ("direct I/O", direct_io())] {
        let size = 16 * 1024 * 1024 + 511;
        let data = Arc::new(pattern(11, size as usize));
        let backend = Arc::new(Memory::from_bytes(&data));
        let m = Mounted::new(backend, FuseOptions { threads: 8, ..options });
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let data = Arc::clone(&data);
                let path = m.mount.file_path();
                s.spawn(move || {
                    let file = File::open(path).unwrap();
                    let mut rng = fastrand::Rng::with_seed(t);
                    for _ in 0..200 {
                        let off = rng.u64(0..size);
                        let len = rng.u64(1..=(size - off).min(1 << 20)) as usize;
                        let mut buf = vec![0; len];
                        file.read_exact_at(&mut buf, off).unwrap();
                        assert!(
                            buf[..] == data[off as usize..off as usize + len],
                            "{mode}: read {len} at {off}"
                        );
                    }
                });
            }
        });
    }
}

/// Not a test on its own: the child process of `unmount_writes_back_and_flushes`. It maps the
/// file, closes the descriptor, writes through the mapping and unmaps it without `msync`, so the
/// data reaches the backend (written back when the mapping goes) but nothing flushes it.
///
/// This runs in another process on purpose: unmapping a dirty shared mapping of a FUSE file makes
/// the kernel write the pages back while it holds the process's mmap lock, so a process that both
/// serves the file and unmaps it can deadlock (see `FuseMount`).
#[test]
fn child_map_and_write() {
    let Some(path) = std::env::var_os("R3MAP_FUSE_TEST_CHILD_MAP") else {
        return;
    };
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut map = map_shared(&file).unwrap();
    drop(file);
    let len = map.len();
    map[1000..5000].fill(0xAB);
    map[len - 5..].fill(0xCD);
    drop(map);
}

#[test]
fn unmount_writes_back_and_flushes() {
    if !fuse_available() {
        return;
    }
    for (mode, options) in [("page cache", page_cache()), ("write-through", write_through())] {
        let size = 2 * 1024 * 1024 + 5;
        let spy = Spy::new(size);
        let m = Mounted::new(spy.shared(), options);
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_map_and_write", "--test-threads=1"])
            .env("R3MAP_FUSE_TEST_CHILD_MAP", m.mount.file_path())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{mode}: the child wrote through its mapping");
        let flushes = spy.flushes.load(Ordering::SeqCst);
        let Mounted { mount, _dir: dir } = m;
        mount.unmount().expect("unmount");
        assert!(spy.flushes.load(Ordering::SeqCst) > flushes, "{mode}: unmount flushed the backend");
        assert_eq!(backend_bytes(&spy.durable, 1000, 4000), vec![0xAB; 4000], "{mode}");
        assert_eq!(backend_bytes(&spy.durable, size - 5, 5), vec![0xCD; 5], "{mode}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "{mode}: the mount point is empty again"
        );
    }
}

#[test]
fn dropping_the_mount_unmounts_and_flushes() {
    if !fuse_available() {
        return;
    }
    let spy = Spy::new(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    {
        let mount = FuseMount::mount(spy.shared(), dir.path(), page_cache()).unwrap();
        let file = OpenOptions::new().write(true).open(mount.file_path()).unwrap();
        file.write_all_at(b"kept", 10).unwrap();
    }
    assert_eq!(backend_bytes(&spy.durable, 10, 4), b"kept");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn unmount_while_the_file_is_open_detaches_lazily() {
    if !fuse_available() {
        return;
    }
    let spy = Spy::new(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let mount = FuseMount::mount(spy.shared(), dir.path(), page_cache()).unwrap();
    let file = OpenOptions::new().read(true).write(true).open(mount.file_path()).unwrap();
    let err = mount.unmount().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "the name is gone at once");
    // The open descriptor is still served; closing it ends the session and flushes.
    file.write_all_at(b"late", 0).unwrap();
    let mut back = [0; 4];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"late");
    drop(file);
    // The session ends, and the backend is flushed, on a thread of its own that nothing can wait
    // for: poll for the flush, with a minute before calling it missing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while backend_bytes(&spy.durable, 0, 4) != b"late" {
        assert!(Instant::now() < deadline, "the last flush did not happen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn read_only_mounts_refuse_writes() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Memory::from_bytes(&pattern(2, 100_000)));
    let m = Mounted::new(backend, FuseOptions { read_only: true, ..FuseOptions::default() });
    let meta = std::fs::metadata(m.mount.file_path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert!(m.mount.read_only());
    let err = OpenOptions::new().write(true).open(m.mount.file_path()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");
    assert_eq!(std::fs::read(m.mount.file_path()).unwrap(), pattern(2, 100_000));
}

#[test]
fn page_cache_is_kept_until_invalidated() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Memory::new(1 << 20));
    let m = Mounted::new(Arc::clone(&backend) as SharedBackend, page_cache());
    assert_eq!(std::fs::read(m.mount.file_path()).unwrap(), vec![0; 1 << 20]);
    backend.write_at(&[3; 4096], 8192).unwrap(); // behind the kernel's back
    let mut buf = [0; 4096];
    File::open(m.mount.file_path()).unwrap().read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [0; 4096], "the page cache survives closing and reopening the file");
    m.mount.invalidate(8192, 4096).unwrap();
    File::open(m.mount.file_path()).unwrap().read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [3; 4096], "after invalidate the backend's bytes show");

    let d = Mounted::new(Arc::clone(&backend) as SharedBackend, direct_io());
    backend.write_at(&[4; 4096], 8192).unwrap();
    File::open(d.mount.file_path()).unwrap().read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [4; 4096], "direct I/O always reads the backend");
}

/// Not a test on its own: the child process of `cleanup_stale_after_the_serving_process_died`
/// (selected with `--exact` and an environment variable). It mounts and waits to be killed.
#[test]
fn child_mount_process() {
    let Some(dir) = std::env::var_os("R3MAP_FUSE_TEST_CHILD_MOUNT") else {
        return;
    };
    let mount = FuseMount::mount(Arc::new(Memory::new(1 << 20)), Path::new(&dir), page_cache()).unwrap();
    println!("MOUNTED {}", mount.file_path().display());
    io::stdout().flush().unwrap();
    // The parent kills this process; should the parent die first, its end of stdin closes and
    // this child unmounts and exits instead of serving for ever.
    let _ = io::stdin().read_to_end(&mut Vec::new());
    mount.unmount().unwrap();
}

/// Kills the child and detaches whatever it left behind, even when the test fails.
struct ChildGuard {
    child: Child,
    dir: TempDir,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = cleanup_stale(self.dir.path());
    }
}

#[test]
fn cleanup_stale_after_the_serving_process_died() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(!cleanup_stale(dir.path()).unwrap(), "nothing is mounted yet");
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_mount_process", "--nocapture", "--test-threads=1"])
        .env("R3MAP_FUSE_TEST_CHILD_MOUNT", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard { child, dir };
    let stdout = guard.child.stdout.take().unwrap();
    let mounted = BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.contains("MOUNTED "));
    assert!(mounted.is_some(), "the child did not mount");
    let path = guard.dir.path().to_path_buf();
    assert!(path.join("r3map").is_file(), "the child serves its file");

    guard.child.kill().unwrap(); // SIGKILL: no unmount
    guard.child.wait().unwrap();
    let err = File::open(path.join("r3map")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(ENOTCONN), "a dead server leaves a stale mount: {err}");
    let err = FuseMount::mount(Arc::new(Memory::new(4096)), &path, page_cache()).unwrap_err();
    assert!(err.to_string().contains("cleanup_stale"), "the mount error points at the cure: {err}");

    assert!(cleanup_stale(&path).unwrap(), "the stale mount is detached");
    assert!(std::fs::read_dir(&path).unwrap().next().is_none(), "an empty directory again");
    assert!(!cleanup_stale(&path).unwrap(), "nothing left to detach");
    // And it can be mounted again.
    let mount = FuseMount::mount(Arc::new(Memory::new(4096)), &path, page_cache()).unwrap();
    assert_eq!(std::fs::metadata(mount.file_path()).unwrap().len(), 4096);
    mount.unmount().unwrap();
}

//! Mount benchmark: prints, from one run, the baselines (a local file read from the page cache and
//! `nbdfuse` over `nbdkit`'s memory plugin, read cold), then for direct and managed FUSE mounts of a
//! `Memory` remote: the latency of the first 4 KiB read after the mount returned, cold sequential
//! read throughput as ratios to the baselines, managed reads while the background pull runs over a
//! remote behind `Delay`, managed writes as a ratio to a local file, and the time to open a mount.
//!
//! `cargo bench -p r3map-mount --bench mount` for the full run (1 GiB, under a minute);
//! add `-- --quick` for a smoke run with 64 MiB. The mounts need root and `/dev/fuse`; the
//! `nbdfuse` baseline needs `nbdkit`, `nbdcopy` and `nbdfuse` (`apt-get install nbdkit libnbd-bin
//! fuse3`). Without them the affected rows say so and the rest runs.

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::pipeline::synced::DEFAULT_CHUNK_SIZE;
use r3map_core::{Backend, Delay, Memory, SharedBackend};
use r3map_mount::{Frontend, FuseOptions, Hooks, ManagedOptions, Mount, MountOptions};

mod common;
use common::{Data, fmt_duration, memory_remote, quantile, tag, tag_of, warm_up};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Generations of contents: every MiB carries `generation << 48 | index` in its first 8 bytes, so
/// each read checks that it got the MiB it asked for, as last written.
const GEN_DATA: u64 = 1;
const GEN_WRITE_A: u64 = 2;
const GEN_WRITE_B: u64 = 3;

struct Config {
    quick: bool,
    size: u64,
    /// Cold throughput figures are the best of this many runs, each on a fresh mount.
    runs: usize,
    /// Fresh mounts for the latency and open-time percentiles.
    samples: usize,
    /// Delays per remote call of the managed read rows, besides 0 ms.
    delays: &'static [u64],
}

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn wrong(what: &Path, mib: u64) -> io::Error {
    io::Error::other(format!("MiB {mib} of {} does not hold what was last written there", what.display()))
}

/// Reads `path` from start to end in 1 MiB `read(2)`s, checking each MiB's tag. The time of the
/// reads alone (the file is opened before).
fn read_through(path: &Path, size: u64, generation: u64) -> io::Result<Duration> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    for mib in 0..size / MIB {
        f.read_exact(&mut buf)?;
        if tag_of(&buf) != tag(generation, mib) {
            return Err(wrong(path, mib));
        }
    }
    Ok(t.elapsed())
}

/// How the written data is made durable after the writes.
#[derive(Clone, Copy, PartialEq)]
enum Durable {
    /// `fsync` of the file.
    Fsync,
    /// `syncfs`: the kernel writes the dirty pages back (into a mount: to its backend), without
    /// `fsync` (which a managed mount answers with a push).
    Syncfs,
}

/// Overwrites `file` from start to end with 1 MiB `write(2)`s of `generation`, then makes it
/// durable; the time of both. The caller keeps the file open: closing a descriptor that was
/// written to flushes the mount's backend, which on a managed mount is a push.
fn write_through(
    file: &File,
    data: &Data,
    size: u64,
    generation: u64,
    durable: Durable,
) -> io::Result<Duration> {
    let mut f = file;
    f.seek(SeekFrom::Start(0))?;
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; MIB as usize]; 2];
    let t = Instant::now();
    for mib in 0..size / MIB {
        let buf = &mut bufs[(mib % 2) as usize];
        data.fill(buf, generation, mib);
        f.write_all(buf)?;
    }
    match durable {
        Durable::Fsync => f.sync_all()?,
        Durable::Syncfs => rustix::fs::syncfs(f)?,
    }
    Ok(t.elapsed())
}

fn open_writable(path: &Path) -> File {
    OpenOptions::new().write(true).open(path).expect("open for writing")
}

/// Checks that every MiB of `backend` carries `generation`'s tag.
fn check_backend(backend: &dyn Backend, generation: u64) {
    let mut head = [0u8; 8];
    for mib in 0..backend.size() / MIB {
        backend.read_at(&mut head, mib * MIB).expect("read the remote");
        assert_eq!(tag_of(&head), tag(generation, mib), "MiB {mib} of the remote was not pushed");
    }
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop the page cache (needs root)");
}

/// Whether `program` is on `PATH`.
fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

// ---------------------------------------------------------------------------------------------
// The nbdfuse peer

/// `nbdkit`'s memory plugin on a Unix socket, filled with the data, and `nbdfuse` serving it as
/// `MNT/nbd`. Dropping it unmounts and stops both processes, also when a measurement panicked.
struct NbdPeer {
    dir: tempfile::TempDir,
    nbdkit: Child,
    nbdfuse: Option<Child>,
}

impl NbdPeer {
    fn start(source: &Path, size: u64) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("sock");
        let kit_pid = dir.path().join("nbdkit.pid");
        let nbdkit = Command::new("nbdkit")
            .arg("--exit-with-parent")
            .arg("--foreground")
            .arg("-P")
            .arg(&kit_pid)
            .arg("-U")
            .arg(&sock)
            .arg("memory")
            .arg(size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut peer = Self { dir, nbdkit, nbdfuse: None };
        wait_for_file(&kit_pid, &mut peer.nbdkit, "nbdkit")?;

        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let copied = Command::new("nbdcopy").arg(source).arg(&uri).stdin(Stdio::null()).status()?;
        if !copied.success() {
            return Err(io::Error::other(format!("nbdcopy into nbdkit failed: {copied}")));
        }

        let mnt = peer.mountpoint();
        fs::create_dir(&mnt)?;
        let fuse_pid = peer.dir.path().join("nbdfuse.pid");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&fuse_pid)
            .arg(mnt.join("nbd"))
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let child = peer.nbdfuse.insert(child);
        wait_for_file(&fuse_pid, child, "nbdfuse")?;
        let len = fs::metadata(peer.file())?.len();
        if len != size {
            return Err(io::Error::other(format!("nbdfuse shows {len} bytes instead of {size}")));
        }
        Ok(peer)
    }

    fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn file(&self) -> PathBuf {
        self.mountpoint().join("nbd")
    }
}

/// Waits until `child` wrote its pid file (it does once it serves).
fn wait_for_file(path: &Path, child: &mut Child, name: &str) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("{name} exited before it was ready: {status}")));
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{name} was not ready after 10 s")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

impl Drop for NbdPeer {
    fn drop(&mut self) {
        if let Some(mut fuse) = self.nbdfuse.take() {
            let mnt = self.mountpoint();
            if !quiet(Command::new("fusermount3").arg("-u").arg(&mnt)) {
                quiet(Command::new("umount").arg(&mnt));
            }
            // nbdfuse exits once unmounted.
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(fuse.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(fuse.try_wait(), Ok(None)) {
                eprintln!("nbdfuse did not exit after the unmount; detaching the mount and killing it");
                quiet(Command::new("umount").arg("-l").arg(&mnt));
                let _ = fuse.kill();
                let _ = fuse.wait();
            }
        }
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
    }
}

/// Cold sequential read of the nbdfuse file (best of `runs`, caches dropped before each) and the
/// p50/p90 of a cold 4 KiB `pread` at 64 KiB after dropping the caches.
struct NbdFigures {
    read: f64,
    pread: (Duration, Duration),
}

fn nbdfuse_baseline(local: &Path, data: &Data, cfg: &Config) -> io::Result<NbdFigures> {
    let peer = NbdPeer::start(local, cfg.size)?;
    let file = peer.file();
    let mut read = 0.0f64;
    for _ in 0..cfg.runs {
        drop_caches();
        read = read.max(gbps(cfg.size, read_through(&file, cfg.size, GEN_DATA)?));
    }
    let expected = data.bytes_at(DEFAULT_CHUNK_SIZE, (4 * KIB) as usize);
    let mut buf = vec![0u8; 4 * KIB as usize];
    let mut times = Vec::new();
    for _ in 0..cfg.samples {
        let f = File::open(&file)?;
        drop_caches();
        let t = Instant::now();
        f.read_exact_at(&mut buf, DEFAULT_CHUNK_SIZE)?;
        times.push(t.elapsed());
        if buf != expected {
            return Err(io::Error::other("nbdfuse returned the wrong bytes"));
        }
    }
    drop(peer);
    Ok(NbdFigures { read, pread: (quantile(&times, 0.5), quantile(&times, 0.9)) })
}

// ---------------------------------------------------------------------------------------------
// Our mounts

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Managed(Pull),
}

/// The background pull of a managed mount.
#[derive(Clone, Copy, PartialEq)]
enum Pull {
    /// `ManagedOptions::default()`.
    Default,
    /// No background pull: chunks are pulled only when read (a diagnostic).
    Off,
    /// `depth` requests of `request` bytes in flight.
    With { depth: usize, request: u64 },
}

const MANAGED: Kind = Kind::Managed(Pull::Default);

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Direct => "direct".to_owned(),
            Kind::Managed(Pull::Default) => "managed".to_owned(),
            Kind::Managed(Pull::Off) => "managed, no background pull (diagnostic)".to_owned(),
            Kind::Managed(Pull::With { depth, request }) => {
                format!("managed, pull {depth} × {} MiB (not the default)", request / MIB)
            }
        }
    }

    fn managed_options(self) -> ManagedOptions {
        let default = ManagedOptions::default();
        match self {
            Kind::Direct | Kind::Managed(Pull::Default) => default,
            Kind::Managed(Pull::Off) => ManagedOptions { pull: false, ..default },
            Kind::Managed(Pull::With { depth, request }) => {
                ManagedOptions { pull_depth: depth, pull_request: request, ..default }
            }
        }
    }

    fn pulls(self) -> bool {
        matches!(self, Kind::Managed(Pull::Default | Pull::With { .. }))
    }
}

/// How the FUSE file is served.
#[derive(Clone, Copy, PartialEq)]
enum Io {
    /// The mount's choice: the page cache for a direct mount, direct I/O for a managed one.
    Default,
    /// Page-cache mode with the writeback cache.
    PageCache,
    /// Direct-I/O mode: every `read(2)`/`write(2)` goes to the backend.
    Direct,
}

impl Io {
    fn name(self) -> &'static str {
        match self {
            Io::Default => "",
            Io::PageCache => ", page-cache mode",
            Io::Direct => ", direct-I/O mode",
        }
    }
}

/// Closes a mount. A `ConnectionAborted` error of the FUSE session (a worker thread that was
/// reading the next request when the kernel tore the connection down at unmount) is reported on
/// stderr and tolerated: the mount is gone and the measurement is unaffected.
fn close_mount(m: Mount) {
    match m.close() {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
            eprintln!("warning: closing a mount reported a spurious error: {e}");
        }
        Err(e) => panic!("close: {e}"),
    }
}

/// Mounts `remote` at `dir`: direct, or managed over a fresh `Memory` cache with `options`.
fn mount(kind: Kind, io: Io, remote: &SharedBackend, dir: &Path, options: ManagedOptions) -> Mount {
    let direct_io = match io {
        Io::Default => None,
        Io::PageCache => Some(false),
        Io::Direct => Some(true),
    };
    let fuse = FuseOptions { direct_io, ..FuseOptions::default() };
    let mount_options = MountOptions { frontend: Frontend::Fuse(fuse), ..MountOptions::default() };
    match kind {
        Kind::Direct => {
            Mount::direct(Arc::clone(remote), dir, &mount_options, Hooks::default()).expect("direct mount")
        }
        Kind::Managed(_) => {
            let local = Arc::new(Memory::new(remote.size()));
            Mount::managed(Arc::clone(remote), local, dir, &mount_options, options, Hooks::default())
                .expect("managed mount")
        }
    }
}

/// One 4 KiB `pread` at offset one chunk right after the mount returned, on `samples` fresh
/// mounts: the times of the `pread` alone and of `open` + `pread`.
fn first_chunk(
    kind: Kind,
    remote: &SharedBackend,
    data: &Data,
    samples: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let expected = data.bytes_at(DEFAULT_CHUNK_SIZE, (4 * KIB) as usize);
    let mut buf = vec![0u8; 4 * KIB as usize];
    let (mut pread, mut open_pread) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let dir = tempfile::tempdir().expect("mount point");
        let m = mount(kind, Io::Default, remote, dir.path(), kind.managed_options());
        let t = Instant::now();
        let f = File::open(m.file_path()).expect("open the mount file");
        let opened = Instant::now();
        f.read_exact_at(&mut buf, DEFAULT_CHUNK_SIZE).expect("pread");
        pread.push(opened.elapsed());
        open_pread.push(t.elapsed());
        assert!(buf == expected, "the {} mount returned the wrong bytes", kind.name());
        drop(f);
        close_mount(m);
    }
    (pread, open_pread)
}

/// A cold sequential read of a fresh mount: GB/s, and for a managed mount how long after the start
/// of `Mount::managed` everything was local (`wait_pulled` returned).
fn cold_read(kind: Kind, io: Io, remote: &SharedBackend, size: u64) -> (f64, Option<Duration>) {
    let dir = tempfile::tempdir().expect("mount point");
    // Before the mount: once it returns, the background pull runs and the clock is ticking.
    drop_caches();
    let start = Instant::now();
    let m = mount(kind, io, remote, dir.path(), kind.managed_options());
    let file = m.file_path();
    let (read, pulled) = std::thread::scope(|s| {
        let waiter = kind.pulls().then(|| {
            s.spawn(|| {
                m.wait_pulled().expect("background pull");
                start.elapsed()
            })
        });
        let read = read_through(&file, size, GEN_DATA).expect("read the mount");
        (read, waiter.map(|w| w.join().expect("waiter")))
    });
    close_mount(m);
    (gbps(size, read), pulled)
}

/// Best of `runs` cold reads (the pull time of the best run).
fn best_cold_read(
    kind: Kind,
    io: Io,
    remote: &SharedBackend,
    size: u64,
    runs: usize,
) -> (f64, Option<Duration>) {
    (0..runs)
        .map(|_| cold_read(kind, io, remote, size))
        .fold((0.0, None), |best, r| if r.0 > best.0 { r } else { best })
}

struct WriteFigures {
    /// Writes + `syncfs`: the pages written back into the local cache, nothing pushed.
    mount: Duration,
    /// `Mount::sync` after that: the push.
    push: Duration,
    /// Writes + `fsync`, which on a managed mount includes the push.
    fsync: Duration,
}

/// Managed writes over a fresh, fully pulled mount whose background push waits an hour.
fn managed_write(remote: &Arc<Memory>, io: Io, data: &Data, size: u64) -> WriteFigures {
    let shared: SharedBackend = Arc::clone(remote) as SharedBackend;
    let dir = tempfile::tempdir().expect("mount point");
    let options = ManagedOptions { push_interval: Duration::from_secs(3600), ..ManagedOptions::default() };
    let m = mount(MANAGED, io, &shared, dir.path(), options);
    m.wait_pulled().expect("background pull");
    let file = open_writable(&m.file_path());
    drop_caches();
    let t = Instant::now();
    write_through(&file, data, size, GEN_WRITE_A, Durable::Syncfs).expect("write the mount");
    // syncfs starts the writeback of every dirty page but does not wait for FUSE writeback (Linux
    // does not let a FUSE server hold up sync): the last pages have landed in the local cache when
    // every chunk is dirty.
    let synced = m.synced().expect("a managed mount");
    let deadline = Instant::now() + Duration::from_secs(60);
    while synced.stats().dirty_chunks < size / DEFAULT_CHUNK_SIZE {
        assert!(Instant::now() < deadline, "the writeback did not reach the local cache within 60 s");
        std::thread::sleep(Duration::from_micros(20));
    }
    let mount = t.elapsed();
    let pushed = m.progress().and_then(|(_, push)| push).expect("a pusher").pushed_chunks;
    assert_eq!(pushed, 0, "nothing should have been pushed before the sync");
    let t = Instant::now();
    m.sync().expect("sync");
    let push = t.elapsed();
    check_backend(&**remote, GEN_WRITE_A);
    // Cold, as the local file's writes are (its pages are clean after the sync).
    drop_caches();
    let fsync = write_through(&file, data, size, GEN_WRITE_B, Durable::Fsync).expect("write the mount");
    check_backend(&**remote, GEN_WRITE_B);
    drop(file);
    close_mount(m);
    WriteFigures { mount, push, fsync }
}

/// The same writes + `fsync` through a fresh direct mount of `remote`: the FUSE frontend alone.
fn direct_write(remote: &Arc<Memory>, data: &Data, size: u64) -> Duration {
    let shared: SharedBackend = Arc::clone(remote) as SharedBackend;
    let dir = tempfile::tempdir().expect("mount point");
    let m = mount(Kind::Direct, Io::Default, &shared, dir.path(), ManagedOptions::default());
    let file = open_writable(&m.file_path());
    drop_caches();
    let t = write_through(&file, data, size, GEN_WRITE_A, Durable::Fsync).expect("write the mount");
    check_backend(&**remote, GEN_WRITE_A);
    drop(file);
    close_mount(m);
    t
}

/// Time for `Mount::direct` / `Mount::managed` to return, and for `close`, over `samples` mounts.
fn open_close(kind: Kind, remote: &SharedBackend, samples: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut open, mut close) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let dir = tempfile::tempdir().expect("mount point");
        let t = Instant::now();
        let m = mount(kind, Io::Default, remote, dir.path(), kind.managed_options());
        open.push(t.elapsed());
        let t = Instant::now();
        close_mount(m);
        close.push(t.elapsed());
    }
    (open, close)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config { quick, size: 64 * MIB, runs: 1, samples: 5, delays: &[10, 40] }
    } else {
        Config { quick, size: GIB, runs: 3, samples: 20, delays: &[10, 25, 40] }
    };
    let size = cfg.size;
    let started = Instant::now();
    println!("# r3map mount benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });
    let defaults = ManagedOptions::default();
    println!(
        "{} MiB, 1 MiB `read(2)`/`write(2)` calls. FUSE frontend with the mount's defaults (direct \
         mounts: page cache, writeback cache, 1 MiB readahead; managed mounts: direct I/O; 1 MiB \
         requests, 4 threads); managed mounts with the default options ({} KiB chunks, pull {} × {} \
         MiB) and a fresh `Memory` cache; the remote is a `Memory` backend.\n",
        size / MIB,
        defaults.chunk_size / KIB,
        defaults.pull_depth,
        defaults.pull_request / MIB,
    );

    let data = Data::new();
    let work = tempfile::tempdir().expect("work directory");
    let local = work.path().join("local");
    warm_up(3 * size);

    // ---- Baselines
    {
        let mut f = File::create(&local).expect("create the local file");
        let mut buf = vec![0u8; MIB as usize];
        for mib in 0..size / MIB {
            data.fill(&mut buf, GEN_DATA, mib);
            f.write_all(&buf).expect("write the local file");
        }
        f.sync_all().expect("fsync the local file");
    }
    read_through(&local, size, GEN_DATA).expect("warm the page cache");
    let mut cached: Vec<f64> = (0..3)
        .map(|_| gbps(size, read_through(&local, size, GEN_DATA).expect("read the local file")))
        .collect();
    cached.sort_by(f64::total_cmp);
    let page_cache = cached[1];

    let mounting = r3map_fuse::can_mount();
    let nbd = if !mounting {
        Err("n/a (needs root and /dev/fuse)".to_owned())
    } else if !["nbdkit", "nbdcopy", "nbdfuse"].iter().all(|p| have(p)) {
        Err("n/a (install nbdkit libnbd-bin)".to_owned())
    } else {
        nbdfuse_baseline(&local, &data, &cfg).map_err(|e| format!("n/a ({e})"))
    };

    println!("## Baselines\n\n| baseline | GB/s |\n|---|---|");
    println!("| local file ({}), page cache, median of 3 | {page_cache:.2} |", fs_type(work.path()));
    let nbd_runs = if cfg.runs > 1 { format!(", best of {}", cfg.runs) } else { String::new() };
    match &nbd {
        Ok(n) => println!("| nbdfuse over nbdkit memory (Unix socket), cold{nbd_runs} | {:.2} |", n.read),
        Err(e) => println!("| nbdfuse over nbdkit memory (Unix socket), cold | {e} |"),
    }
    println!();

    if !mounting {
        println!("Skipped the mounts: they need root and /dev/fuse.");
        return;
    }

    let remote_mem = memory_remote(&data, size, GEN_DATA);
    let remote: SharedBackend = Arc::clone(&remote_mem) as SharedBackend;

    // ---- First-chunk latency
    println!(
        "## First-chunk latency: one 4 KiB pread at offset {} KiB right after the mount returned ({} fresh mounts)\n",
        DEFAULT_CHUNK_SIZE / KIB,
        cfg.samples
    );
    println!(
        "| mount | pread p50 | pread p90 | open + pread p50 | open + pread p90 |\n|---|---|---|---|---|"
    );
    for kind in [Kind::Direct, MANAGED, Kind::Managed(Pull::Off)] {
        let (pread, open_pread) = first_chunk(kind, &remote, &data, cfg.samples);
        println!(
            "| {} | {} | {} | {} | {} |",
            kind.name(),
            fmt_duration(quantile(&pread, 0.5)),
            fmt_duration(quantile(&pread, 0.9)),
            fmt_duration(quantile(&open_pread, 0.5)),
            fmt_duration(quantile(&open_pread, 0.9)),
        );
    }
    match &nbd {
        Ok(n) => println!(
            "| nbdfuse, caches dropped (reference) | {} | {} | | |",
            fmt_duration(n.pread.0),
            fmt_duration(n.pread.1)
        ),
        Err(e) => println!("| nbdfuse, caches dropped (reference) | {e} | | | |"),
    }
    println!();

    // ---- Sequential read throughput
    let runs = if cfg.runs > 1 { format!("; best of {}", cfg.runs) } else { String::new() };
    println!("## Sequential read, cold (fresh mount, caches dropped{runs})\n");
    println!("| mount | GB/s | ratio to page cache | ratio to nbdfuse |\n|---|---|---|---|");
    let nbd_ratio = |r: f64| nbd.as_ref().map_or_else(|_| "n/a".to_owned(), |n| format!("{:.2}", r / n.read));
    let (direct, _) = best_cold_read(Kind::Direct, Io::Default, &remote, size, cfg.runs);
    println!("| direct | {direct:.2} | {:.2} | {} |", direct / page_cache, nbd_ratio(direct));
    let (managed, pulled0) = best_cold_read(MANAGED, Io::Default, &remote, size, cfg.runs);
    println!("| managed | {managed:.2} | {:.2} | {} |", managed / page_cache, nbd_ratio(managed));
    for (kind, io) in [(Kind::Direct, Io::Direct), (MANAGED, Io::PageCache)] {
        let (r, _) = best_cold_read(kind, io, &remote, size, cfg.runs);
        let name = kind.name();
        println!("| {name}{} (diagnostic) | {r:.2} | {:.2} | {} |", io.name(), r / page_cache, nbd_ratio(r));
    }
    println!();

    // ---- Managed reads over a delayed remote
    println!("## Managed read while the background pull runs, remote behind Delay (cold{runs})\n");
    println!(
        "| delay per call | GB/s | ratio to 0 ms | ratio to nbdfuse | everything local after |\n|---|---|---|---|---|"
    );
    let local_after = |d: Option<Duration>| d.map_or_else(|| "n/a".to_owned(), fmt_duration);
    println!("| 0 ms | {managed:.2} | 1.00 | {} | {} |", nbd_ratio(managed), local_after(pulled0));
    let longest = cfg.delays.iter().max().copied().unwrap_or(0);
    let narrow = Kind::Managed(Pull::With { depth: 16, request: 4 * MIB });
    for (ms, kind) in cfg.delays.iter().map(|&ms| (ms, MANAGED)).chain([(longest, narrow)]) {
        let delayed: SharedBackend = Arc::new(Delay::new(Arc::clone(&remote_mem), Duration::from_millis(ms)));
        let (r, pulled) = best_cold_read(kind, Io::Default, &delayed, size, cfg.runs);
        let label = match kind {
            Kind::Managed(Pull::With { depth, request }) => {
                format!("{ms} ms, pull {depth} × {} MiB (diagnostic)", request / MIB)
            }
            _ => format!("{ms} ms"),
        };
        println!("| {label} | {r:.2} | {:.2} | {} | {} |", r / managed, nbd_ratio(r), local_after(pulled));
    }
    println!();

    // ---- Managed writes
    let mut local_write = Duration::MAX;
    let local_file = open_writable(&local);
    for _ in 0..cfg.runs {
        drop_caches();
        let t = write_through(&local_file, &data, size, GEN_WRITE_A, Durable::Fsync)
            .expect("write the local file");
        local_write = local_write.min(t);
    }
    drop(local_file);
    let mut w = WriteFigures { mount: Duration::MAX, push: Duration::MAX, fsync: Duration::MAX };
    let mut direct_w = Duration::MAX;
    let mut cached_w = Duration::MAX;
    for _ in 0..cfg.runs {
        direct_w = direct_w.min(direct_write(&remote_mem, &data, size));
        cached_w = cached_w.min(managed_write(&remote_mem, Io::PageCache, &data, size).fsync);
        let r = managed_write(&remote_mem, Io::Default, &data, size);
        w.mount = w.mount.min(r.mount);
        w.push = w.push.min(r.push);
        w.fsync = w.fsync.min(r.fsync);
    }
    println!("## Managed write: 1 MiB write(2)s over the whole file (push interval 1 h{runs})\n");
    println!("| what | time | GB/s | ratio to local file |\n|---|---|---|---|");
    let row = |what: &str, t: Duration, ratio: bool| {
        let r =
            if ratio { format!("{:.2}", local_write.as_secs_f64() / t.as_secs_f64()) } else { String::new() };
        println!("| {what} | {} | {:.2} | {r} |", fmt_duration(t), gbps(size, t));
    };
    row(&format!("local file ({}): writes + fsync", fs_type(work.path())), local_write, true);
    row("managed: writes + fsync (the fsync pushes)", w.fsync, true);
    row("managed: the writes alone (in the local cache, no push)", w.mount, true);
    row("managed: `Mount::sync` after them (the push to the remote)", w.push, false);
    row("managed, page-cache mode: writes + fsync (diagnostic)", cached_w, true);
    row("direct (page cache): writes + fsync (the FUSE frontend alone, diagnostic)", direct_w, true);
    println!();

    // ---- Open time
    println!("## Mount open and close ({} mounts each)\n", cfg.samples);
    println!("| mount | open p50 | open p90 | close p50 |\n|---|---|---|---|");
    let delayed: SharedBackend = Arc::new(Delay::new(Arc::clone(&remote_mem), Duration::from_millis(10)));
    let rows = [
        (Kind::Direct, &remote, String::new()),
        (MANAGED, &remote, String::new()),
        (Kind::Managed(Pull::Off), &remote, String::new()),
        (MANAGED, &delayed, ", remote behind a 10 ms Delay (diagnostic)".to_owned()),
    ];
    for (kind, remote, note) in rows {
        let (open, close) = open_close(kind, remote, cfg.samples);
        println!(
            "| {}{note} | {} | {} | {} |",
            kind.name(),
            fmt_duration(quantile(&open, 0.5)),
            fmt_duration(quantile(&open, 0.9)),
            fmt_duration(quantile(&close, 0.5)),
        );
    }
    println!("\nTotal time: {:.1} s", started.elapsed().as_secs_f64());
}

/// The file system type of `path` (from `/proc/self/mountinfo`, longest matching mount point).
fn fs_type(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else { return "?".to_owned() };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return "?".to_owned() };
    info.lines()
        .filter_map(|line| {
            let mount_point = line.split(' ').nth(4)?;
            let fs = line.split(" - ").nth(1)?.split(' ').next()?;
            path.starts_with(mount_point).then(|| (mount_point.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "?".to_owned(), |(_, fs)| fs)
}

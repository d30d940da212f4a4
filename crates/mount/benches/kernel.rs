//! Kernel block device benchmark: r3map's NBD devices (`Frontend::Nbd`, served in-process over
//! socketpairs) next to a plain loop device over a tmpfs file, measured in the same run, and a
//! managed NBD mount of an r3map server on 127.0.0.1 with netem delaying the loopback interface.
//!
//! Prints, as markdown tables: device open time (from the attach until the device answers a 4 KiB
//! `O_DIRECT` read) and first-chunk latency (that read alone) over fresh devices, with p50/p90 and
//! ratios to the loop device; sequential `O_DIRECT` read throughput as ratios to the loop device;
//! and for the networked managed mount at each delay: connect, open, first-chunk and last-chunk
//! latency, the read throughput while the background pull runs and when everything was local.
//!
//! Needs root, `loop.ko` and `nbd.ko`, so it is meant for the test VM (this host kernel has no
//! `nbd.ko`): `bash scripts/bench-vm.sh` for the full run (64 MiB), `--quick` for a smoke run
//! (16 MiB). Run elsewhere, it prints the rows it can (the loop device as root) and says what it
//! skipped. The netem rows need iproute2's `tc` and `sch_netem`; the qdisc is removed afterwards,
//! also when a measurement fails.

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::pipeline::synced::DEFAULT_CHUNK_SIZE;
use r3map_core::{Backend, Delay, Memory, SharedBackend};
use r3map_mount::{Frontend, Hooks, ManagedOptions, Mount, MountOptions};
use r3map_nbd::kernel::KernelOptions;
use r3map_net::{Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity};
use rustix::fs::{Mode, OFlags};

mod common;
use common::{Data, fmt_duration, memory_remote, quantile, tag, tag_of, warm_up};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The generation of the data ([`common::tag`]): it is written once.
const GEN: u64 = 1;

/// Where the first-chunk read lands: chunk 1, as in the FUSE mount benchmark.
const FIRST_READ: u64 = DEFAULT_CHUNK_SIZE;
const PAGE: usize = 4096;

struct Config {
    quick: bool,
    size: u64,
    /// Fresh devices for the open-time and first-chunk percentiles.
    samples: usize,
    /// Throughput figures are the best of this many fresh devices.
    runs: usize,
    /// Fresh mounts per network row (the row shows their medians).
    net_runs: usize,
    /// One-way netem delays on `lo`, besides 0 ms.
    netem_ms: &'static [u64],
}

fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
}

/// A buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + PAGE];
        let start = raw.as_ptr().align_offset(PAGE);
        Self { raw, start, len }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC, Mode::empty())?;
    Ok(File::from(fd))
}

/// One 4 KiB `O_DIRECT` `pread` at `off`, checked against `data`.
fn read_page(f: &File, data: &Data, off: u64, what: &str) {
    let mut buf = AlignedBuf::new(PAGE);
    f.read_exact_at(buf.get(), off).unwrap_or_else(|e| panic!("4 KiB read at {off} of {what}: {e}"));
    assert!(buf.get() == data.bytes_at(off, PAGE), "{what} returned the wrong bytes at {off}");
}

/// Reads `path` from start to end in 1 MiB `O_DIRECT` `pread`s, checking each MiB's tag; the time
/// of the reads (the device is opened before).
fn read_through(path: &Path, size: u64) -> io::Result<Duration> {
    let f = open_direct(path)?;
    let mut buf = AlignedBuf::new(MIB as usize);
    let t = Instant::now();
    for mib in 0..size / MIB {
        f.read_exact_at(buf.get(), mib * MIB)?;
        if tag_of(buf.get()) != tag(GEN, mib) {
            return Err(io::Error::other(format!("MiB {mib} of {} holds the wrong data", path.display())));
        }
    }
    Ok(t.elapsed())
}

/// iproute2's `tc` (busybox has a `tc` too, without netem; the VM puts iproute2's in /sbin).
fn iproute2_tc() -> Option<&'static str> {
    ["/sbin/tc", "/usr/sbin/tc", "/usr/bin/tc"]
        .into_iter()
        .find(|p| fs::canonicalize(p).is_ok_and(|real| real.file_name() != Some("busybox".as_ref())))
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Loop devices

/// A loop device not bound to a file (`/sys/block/loopN/loop` exists only while bound).
fn free_loop() -> io::Result<PathBuf> {
    (0..256)
        .map(|i| (PathBuf::from(format!("/dev/loop{i}")), PathBuf::from(format!("/sys/block/loop{i}"))))
        .find(|(dev, sys)| dev.exists() && sys.exists() && !sys.join("loop").exists())
        .map(|(dev, _)| dev)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no free loop device"))
}

/// A loop device bound to a file with `LOOP_SET_FD` (what `losetup` does, without a process);
/// unbound on drop.
struct Loop {
    dev: File,
    path: PathBuf,
}

impl Loop {
    fn attach(path: &Path, backing: &File) -> io::Result<Self> {
        let dev = File::open(path)?;
        r3map_sys::loop_ioctl::set_fd(dev.as_fd(), backing.as_fd())?;
        Ok(Self { dev, path: path.to_owned() })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Err(e) = r3map_sys::loop_ioctl::clear_fd(self.dev.as_fd()) {
            eprintln!("warning: unbinding {}: {e}", self.path.display());
        }
    }
}

/// A loop device set up by the `losetup` command; `losetup -d` on drop.
struct Losetup(PathBuf);

impl Losetup {
    fn attach(path: &Path, file: &Path) -> io::Result<Self> {
        let (dev, file) = (path.to_string_lossy(), file.to_string_lossy());
        run("losetup", &["-r", &dev, &file])?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for Losetup {
    fn drop(&mut self) {
        if let Err(e) = run("losetup", &["-d", &self.0.to_string_lossy()]) {
            eprintln!("warning: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Devices

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A loop device over the tmpfs file, bound with `LOOP_SET_FD`: the baseline.
    Loop,
    /// The same through the `losetup` command (a process, as a script would do it).
    Losetup,
    /// `Mount::direct` of a `Memory` remote, kernel NBD frontend.
    Direct,
    /// The same with one connection instead of the default four.
    DirectOneConnection,
    /// `Mount::managed` of a `Memory` remote over a fresh `Memory` cache, kernel NBD frontend.
    Managed,
    /// The same without the background pull: chunks are pulled only when read.
    ManagedNoPull,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Loop => "loop device (`LOOP_SET_FD`), the baseline",
            Kind::Losetup => "loop device through `losetup` (a process)",
            Kind::Direct => "r3map direct NBD device, `Memory` remote",
            Kind::DirectOneConnection => "r3map direct NBD device, 1 connection (diagnostic)",
            Kind::Managed => "r3map managed NBD device, `Memory` remote and cache",
            Kind::ManagedNoPull => "r3map managed NBD device, no background pull (diagnostic)",
        }
    }
}

/// An attached device of any kind; detached on drop (a mount is closed, and its errors reported).
enum Device {
    Loop(Loop),
    Losetup(Losetup),
    Mount(Option<Box<Mount>>),
}

impl Device {
    fn path(&self) -> PathBuf {
        match self {
            Device::Loop(l) => l.path.clone(),
            Device::Losetup(l) => l.0.clone(),
            Device::Mount(m) => m.as_ref().and_then(|m| m.device()).expect("an NBD device"),
        }
    }

    fn mount(&self) -> &Mount {
        match self {
            Device::Mount(Some(m)) => m,
            _ => panic!("not a mount"),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Device::Mount(m) = self
            && let Some(m) = m.take()
            && let Err(e) = m.close()
        {
            eprintln!("warning: closing the mount: {e}");
        }
    }
}

/// The NBD frontend with its defaults but `connections`.
fn nbd_options(connections: usize) -> MountOptions {
    // An explicit request timeout: with none, the kernel waits for an answer forever, and a broken
    // run would hang instead of failing.
    let timeout = Duration::from_secs(60);
    let kernel = KernelOptions { connections, timeout, ..KernelOptions::default() };
    MountOptions { frontend: Frontend::Nbd(kernel), loop_device: false }
}

fn managed(remote: SharedBackend, size: u64, pull: bool) -> io::Result<Mount> {
    let local = Arc::new(Memory::new(size));
    let options = ManagedOptions { pull, ..ManagedOptions::default() };
    let frontend = nbd_options(KernelOptions::default().connections);
    Mount::managed(remote, local, Path::new("/"), &frontend, options, Hooks::default())
}

/// What backs the devices: the tmpfs file for loop devices, the `Memory` remote for ours.
struct Sources {
    file: PathBuf,
    remote: Arc<Memory>,
}

fn attach(kind: Kind, src: &Sources) -> io::Result<Device> {
    Ok(match kind {
        Kind::Loop => {
            let path = free_loop()?;
            let backing = File::open(&src.file)?;
            Device::Loop(Loop::attach(&path, &backing)?)
        }
        Kind::Losetup => Device::Losetup(Losetup::attach(&free_loop()?, &src.file)?),
        Kind::Direct | Kind::DirectOneConnection => {
            let remote = Arc::clone(&src.remote) as SharedBackend;
            let connections = if kind == Kind::Direct { KernelOptions::default().connections } else { 1 };
            let options = nbd_options(connections);
            Device::Mount(Some(Box::new(Mount::direct(remote, Path::new("/"), &options, Hooks::default())?)))
        }
        Kind::Managed | Kind::ManagedNoPull => {
            let remote = Arc::clone(&src.remote) as SharedBackend;
            let pull = kind == Kind::Managed;
            Device::Mount(Some(Box::new(managed(remote, src.remote.size(), pull)?)))
        }
    })
}

/// One fresh device: the attach call alone, open (the attach, `open(2)` of the device with
/// `O_DIRECT` and a 4 KiB `pread` at [`FIRST_READ`] answered) and that `pread` alone.
struct OpenSample {
    attach: Duration,
    open: Duration,
    pread: Duration,
}

fn open_sample(kind: Kind, src: &Sources, data: &Data) -> io::Result<OpenSample> {
    let t = Instant::now();
    let device = attach(kind, src)?;
    let attach = t.elapsed();
    let f = open_direct(&device.path())?;
    let opened = Instant::now();
    read_page(&f, data, FIRST_READ, kind.name());
    let pread = opened.elapsed();
    let open = t.elapsed();
    drop(f);
    drop(device);
    Ok(OpenSample { attach, open, pread })
}

#[derive(Clone, Copy)]
struct OpenFigures {
    attach: Duration,
    open: (Duration, Duration),
    pread: (Duration, Duration),
}

impl OpenFigures {
    fn of(samples: &[OpenSample]) -> Self {
        let pick = |f: fn(&OpenSample) -> Duration| samples.iter().map(f).collect::<Vec<_>>();
        let (attach, open, pread) = (pick(|s| s.attach), pick(|s| s.open), pick(|s| s.pread));
        Self {
            attach: quantile(&attach, 0.5),
            open: (quantile(&open, 0.5), quantile(&open, 0.9)),
            pread: (quantile(&pread, 0.5), quantile(&pread, 0.9)),
        }
    }
}

/// The median of `values` (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A sequential read of a fresh device: MB/s, and for a managed device read while the pull runs
/// how long after the start of the attach everything was local. `pulled_first` waits for the pull
/// before reading.
fn read_once(
    kind: Kind,
    src: &Sources,
    size: u64,
    pulled_first: bool,
) -> io::Result<(f64, Option<Duration>)> {
    let start = Instant::now();
    let device = attach(kind, src)?;
    if !matches!(kind, Kind::Managed) {
        return Ok((mbps(size, read_through(&device.path(), size)?), None));
    }
    let m = device.mount();
    if pulled_first {
        m.wait_pulled()?;
        return Ok((mbps(size, read_through(&device.path(), size)?), None));
    }
    let (read, pulled) = std::thread::scope(|s| {
        let waiter = s.spawn(|| m.wait_pulled().map(|()| start.elapsed()));
        let read = read_through(&device.path(), size);
        (read, waiter.join().expect("waiter"))
    });
    Ok((mbps(size, read?), Some(pulled?)))
}

// ---------------------------------------------------------------------------------------------
// A managed mount of a remote over TCP on lo

/// netem on `lo` while alive: `tc qdisc del dev lo root` on drop, also after a panic.
struct Netem {
    tc: &'static str,
}

impl Netem {
    fn add(tc: &'static str, delay_ms: u64) -> io::Result<Self> {
        // A qdisc left by an earlier run would make `add` fail.
        let _ = run(tc, &["qdisc", "del", "dev", "lo", "root"]);
        run(tc, &["qdisc", "add", "dev", "lo", "root", "netem", "delay", &format!("{delay_ms}ms")])?;
        Ok(Self { tc })
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        if let Err(e) = run(self.tc, &["qdisc", "del", "dev", "lo", "root"]) {
            eprintln!("warning: removing netem from lo: {e}");
        }
    }
}

/// Where a networked row's remote comes from.
enum NetRemote {
    /// `RemoteBackend::open` of this URL (timed as the connect), with netem on lo while the
    /// sample runs (none for 0 ms).
    Tcp { url: String, netem_ms: u64 },
    /// The `Memory` remote behind an in-process `Delay` of this much per call (no network).
    Delay(Duration),
}

/// One managed mount: connect, open (from before the connect until the first 4 KiB read
/// answered), the first read alone, a read of the last chunk (not pulled yet, unless the pull
/// was quick), the sequential read while the pull runs, and when everything was local.
struct NetSample {
    connect: Option<Duration>,
    open: Duration,
    pread: Duration,
    last: Duration,
    read: f64,
    pulled: Duration,
}

fn net_sample(
    remote: &NetRemote,
    tc: Option<&'static str>,
    src: &Sources,
    data: &Data,
    size: u64,
) -> io::Result<NetSample> {
    let _netem = match remote {
        NetRemote::Tcp { netem_ms, .. } if *netem_ms > 0 => {
            let tc = tc.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no iproute2 `tc`"))?;
            Some(Netem::add(tc, *netem_ms)?)
        }
        _ => None,
    };
    let start = Instant::now();
    let (backend, connect): (SharedBackend, _) = match remote {
        NetRemote::Tcp { url, .. } => (Arc::new(RemoteBackend::open(url)?), Some(start.elapsed())),
        NetRemote::Delay(d) => (Arc::new(Delay::new(Arc::clone(&src.remote), *d)), None),
    };
    let device = Device::Mount(Some(Box::new(managed(backend, size, true)?)));
    let path = device.path();
    let f = open_direct(&path)?;
    let t = Instant::now();
    read_page(&f, data, FIRST_READ, "the networked managed mount");
    let pread = t.elapsed();
    let open = start.elapsed();
    let last_off = size - DEFAULT_CHUNK_SIZE;
    let t = Instant::now();
    read_page(&f, data, last_off, "the networked managed mount");
    let last = t.elapsed();
    let m = device.mount();
    let (read, pulled) = std::thread::scope(|s| {
        let waiter = s.spawn(|| m.wait_pulled().map(|()| start.elapsed()));
        let read = read_through(&path, size);
        (read, waiter.join().expect("waiter"))
    });
    drop(f);
    drop(device);
    Ok(NetSample { connect, open, pread, last, read: mbps(size, read?), pulled: pulled? })
}

/// A row of the network table and what was measured for it.
struct NetRow {
    label: String,
    remote: NetRemote,
    samples: Vec<NetSample>,
    failed: Option<String>,
}

impl NetRow {
    fn new(label: String, remote: NetRemote) -> Self {
        Self { label, remote, samples: Vec::new(), failed: None }
    }

    /// The medians, with ratios to the loop device's open time and to `base_read`.
    fn print(&self, loop_open: Duration, base_read: f64) {
        let label = &self.label;
        if let Some(e) = &self.failed {
            println!("| {label} | {e} | | | | | | | |");
            return;
        }
        let all = &self.samples;
        let median_of =
            |f: &dyn Fn(&NetSample) -> Duration| quantile(&all.iter().map(f).collect::<Vec<_>>(), 0.5);
        let read = median(&all.iter().map(|s| s.read).collect::<Vec<_>>());
        let connect = all.iter().map(|s| s.connect).collect::<Option<Vec<_>>>();
        let open = median_of(&|s| s.open);
        println!(
            "| {label} | {} | {} | {} | {} | {} | {read:.1} | {:.2} | {} |",
            connect.map_or_else(|| "—".to_owned(), |c| fmt_duration(quantile(&c, 0.5))),
            fmt_duration(open),
            ratio(open, loop_open),
            fmt_duration(median_of(&|s| s.pread)),
            fmt_duration(median_of(&|s| s.last)),
            read / base_read,
            fmt_duration(median_of(&|s| s.pulled)),
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// Why the kernel rows cannot run here, if they cannot.
fn missing(module: &str) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root".to_owned());
    }
    if !Path::new("/sys/module").join(module).exists() {
        return Some(format!("needs {module}.ko loaded"));
    }
    None
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config { quick, size: 16 * MIB, samples: 5, runs: 1, net_runs: 1, netem_ms: &[5] }
    } else {
        Config { quick, size: 64 * MIB, samples: 20, runs: 5, net_runs: 5, netem_ms: &[5, 20, 50] }
    };
    let size = cfg.size;
    let started = Instant::now();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!("# r3map kernel block device benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });
    let defaults = ManagedOptions::default();
    println!(
        "Linux {}, {cpus} CPUs. {} MiB devices, 4 KiB logical blocks; every read is `O_DIRECT` and \
         checked. NBD devices: `Frontend::Nbd` with its defaults ({} connections); managed mounts \
         with `ManagedOptions::default()` ({} KiB chunks, pull {} × {} MiB) and a fresh `Memory` \
         cache. The loop devices are bound to a file of the same data in {}. Each table is \
         measured in rounds that take every row in turn, so that a slow stretch of the machine \
         hits all rows alike.\n",
        kernel.trim(),
        size / MIB,
        KernelOptions::default().connections,
        defaults.chunk_size / KIB,
        defaults.pull_depth,
        defaults.pull_request / MIB,
        fs_type(&std::env::temp_dir()),
    );

    if let Some(why) = missing("loop") {
        println!("Skipped everything: the loop device baseline {why}.");
        return;
    }
    let nbd = missing("nbd");

    let data = Data::new();
    let work = tempfile::tempdir().expect("work directory");
    let file = work.path().join("data");
    {
        let f = File::create(&file).expect("create the data file");
        let mut buf = vec![0u8; MIB as usize];
        for mib in 0..size / MIB {
            data.fill(&mut buf, GEN, mib);
            f.write_all_at(&buf, mib * MIB).expect("write the data file");
        }
    }
    warm_up(3 * size);
    let src = Sources { file, remote: memory_remote(&data, size, GEN) };
    let kinds: &[Kind] = if nbd.is_none() {
        &[
            Kind::Loop,
            Kind::Losetup,
            Kind::Direct,
            Kind::DirectOneConnection,
            Kind::Managed,
            Kind::ManagedNoPull,
        ]
    } else {
        &[Kind::Loop, Kind::Losetup]
    };

    // ---- Open time and first chunk: one round not counted (under emulation the first run of a
    // code path also pays for translating it).
    let mut opens: Vec<Vec<OpenSample>> = kinds.iter().map(|_| Vec::new()).collect();
    for round in 0..=cfg.samples {
        for (i, &kind) in kinds.iter().enumerate() {
            let s = open_sample(kind, &src, &data).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
            if round > 0 {
                opens[i].push(s);
            }
        }
    }
    println!(
        "## Device open and first chunk ({} fresh devices each)\n\n\
         Open: from the start of the attach until a 4 KiB `O_DIRECT` `pread` at {} KiB answered \
         (attach, `open(2)`, `pread`); first chunk: that `pread` alone. Ratios: p50 against the \
         loop device's p50.\n",
        cfg.samples,
        FIRST_READ / KIB
    );
    println!(
        "| device | attach p50 | open p50 | open p90 | open ratio | first chunk p50 | first chunk p90 | first chunk ratio |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let base = OpenFigures::of(&opens[0]);
    for (&kind, samples) in kinds.iter().zip(&opens) {
        let f = OpenFigures::of(samples);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            kind.name(),
            fmt_duration(f.attach),
            fmt_duration(f.open.0),
            fmt_duration(f.open.1),
            ratio(f.open.0, base.open.0),
            fmt_duration(f.pread.0),
            fmt_duration(f.pread.1),
            ratio(f.pread.0, base.pread.0),
        );
    }
    if let Some(why) = &nbd {
        println!("| r3map NBD devices | skipped: {why} | | | | | | |");
    }
    println!();
    let loop_open = base.open.0;

    // ---- Sequential read
    let rows: &[(Kind, bool, &str)] = &[
        (Kind::Loop, false, "loop device (`LOOP_SET_FD`)"),
        (Kind::Direct, false, "r3map direct NBD device"),
        (Kind::Managed, false, "r3map managed NBD device, read while the background pull runs"),
        (Kind::Managed, true, "r3map managed NBD device, after the pull finished (diagnostic)"),
    ];
    let rows = if nbd.is_none() { rows } else { &rows[..1] };
    let mut reads: Vec<(Vec<f64>, Vec<Duration>)> = rows.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for _ in 0..cfg.runs {
        for (i, &(kind, pulled_first, label)) in rows.iter().enumerate() {
            let (r, pulled) =
                read_once(kind, &src, size, pulled_first).unwrap_or_else(|e| panic!("{label}: {e}"));
            reads[i].0.push(r);
            reads[i].1.extend(pulled);
        }
    }
    let runs = if cfg.runs > 1 { format!(" ({} fresh devices each)", cfg.runs) } else { String::new() };
    println!("## Sequential read: 1 MiB `O_DIRECT` `pread`s over a fresh device{runs}\n");
    println!(
        "| device | MB/s, median | MB/s, best | ratio to loop (medians) | everything local after |\n\
         |---|---|---|---|---|"
    );
    let loop_read = median(&reads[0].0);
    for (&(_, _, label), (mbs, pulled)) in rows.iter().zip(&reads) {
        let best = mbs.iter().copied().fold(0.0, f64::max);
        let m = median(mbs);
        let after = if pulled.is_empty() { String::new() } else { fmt_duration(quantile(pulled, 0.5)) };
        println!("| {label} | {m:.1} | {best:.1} | {:.2} | {after} |", m / loop_read);
    }
    if let Some(why) = &nbd {
        println!("| r3map NBD devices | skipped: {why} | | | |");
    }
    println!();

    // ---- Managed mount of a networked remote
    if let Some(why) = &nbd {
        println!("Skipped the networked managed mount: it {why}.");
        println!("\nTotal time: {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    let config = ServerConfig::new(
        Export::new("default", Arc::clone(&src.remote) as SharedBackend),
        ServerSecurity::Plaintext,
    );
    let server =
        ServerHandle::start_tcp(Server::new(config).expect("server"), "127.0.0.1:0".parse().expect("addr"))
            .expect("start the server");
    let port = server.local_addr().expect("a TCP address").port();
    let url = format!("r3map+plain://127.0.0.1:{port}/default");
    let tc = iproute2_tc();
    let mut net =
        vec![NetRow::new("TCP, no netem".to_owned(), NetRemote::Tcp { url: url.clone(), netem_ms: 0 })];
    for &ms in cfg.netem_ms {
        let remote = NetRemote::Tcp { url: url.clone(), netem_ms: ms };
        net.push(NetRow::new(format!("TCP, netem {ms} ms (RTT {} ms)", 2 * ms), remote));
    }
    // The longest delay again over four connections (the pull and the reads that miss share the
    // connections).
    if let Some(&ms) = cfg.netem_ms.iter().max() {
        let remote = NetRemote::Tcp { url: format!("{url}?connections=4"), netem_ms: ms };
        let label = format!("TCP, netem {ms} ms (RTT {} ms), 4 connections (diagnostic)", 2 * ms);
        net.push(NetRow::new(label, remote));
    }
    for &ms in cfg.netem_ms {
        let label = format!("`Delay` {} ms per call, in-process (diagnostic)", 2 * ms);
        net.push(NetRow::new(label, NetRemote::Delay(Duration::from_millis(2 * ms))));
    }
    for row in &mut net {
        if tc.is_none() && matches!(row.remote, NetRemote::Tcp { netem_ms: 1.., .. }) {
            row.failed = Some("skipped: no iproute2 `tc`".to_owned());
        }
    }
    // One mount not counted, as for the devices above.
    net_sample(&net[0].remote, tc, &src, &data, size).expect("a managed mount of the server");
    for _ in 0..cfg.net_runs {
        for row in net.iter_mut().filter(|r| r.failed.is_none()) {
            match net_sample(&row.remote, tc, &src, &data, size) {
                Ok(s) => row.samples.push(s),
                Err(e) => row.failed = Some(format!("failed: {e}")),
            }
        }
    }
    drop(server);
    let medians =
        if cfg.net_runs > 1 { format!(", medians of {} fresh mounts", cfg.net_runs) } else { String::new() };
    println!(
        "## Managed NBD mount of an r3map server on 127.0.0.1 (TCP, plaintext), netem delay on lo{medians}\n\n\
         netem delays every packet leaving lo, so both directions: the round trip is twice the \
         delay. Connect: `RemoteBackend::open`; open: from before the connect until the first 4 KiB \
         `O_DIRECT` read at {} KiB answered; then a 4 KiB read of the last chunk, then a sequential \
         read of the whole device while the background pull runs; everything local: from before \
         the connect until `wait_pulled` returned. The `Delay` rows are the same mount over the \
         `Memory` remote behind an in-process `Delay` of one round trip per call (no network).\n",
        FIRST_READ / KIB
    );
    println!(
        "| remote | connect | open | open ratio to loop | first chunk | last chunk | read MB/s | ratio to 0 ms | everything local after |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    let base_read = if net[0].samples.is_empty() {
        f64::NAN
    } else {
        median(&net[0].samples.iter().map(|s| s.read).collect::<Vec<_>>())
    };
    for row in &net {
        row.print(loop_open, base_read);
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

//! NBD server benchmark: our `NbdServer` serving a `Memory` export against `nbdkit memory`, both
//! started by this run, on a Unix socket and on TCP loopback, driven by the same clients:
//! `nbdcopy` reading the whole export to `null:` (MB/s), `fio`'s `nbd` engine doing 4 KiB random
//! reads and writes at iodepth 32 (IOPS), and a small blocking client of our own timing a fresh
//! connection from `connect()` through the handshake (`NBD_OPT_GO`) to the reply of a first
//! 4 KiB read (p50 and p90). Every row shows our figure, nbdkit's and the ratio ours / nbdkit.
//!
//! `cargo bench -p r3map-nbd --bench nbd` for the full run (1 GiB exports, a 256 MiB fio working
//! set, about two minutes); add `-- --quick` for a smoke run with 64 MiB (about 12 s).
//! The baseline needs `nbdkit` (its memory plugin), the clients `nbdcopy` (libnbd) and `fio` built
//! with its `nbd` engine (`apt-get install nbdkit libnbd-bin fio`). Rows whose tool is missing say
//! so and the rest runs. Both exports are filled with the same random data first (with `nbdcopy`
//! from a file, or directly for our server when `nbdcopy` is missing), so that neither server
//! can answer reads of holes or zeroes cheaply.

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener as StdTcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::{Backend, Memory};
use r3map_nbd::proto::{
    self, InfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply, client_flags, handshake_flags,
    info, opt, rep,
};
use r3map_nbd::{NbdExport, NbdServer};
use tokio::sync::oneshot;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// The export's name on both servers (nbdkit's memory plugin serves any name).
const EXPORT: &str = "bench";
/// Size of the first read of the latency client.
const FIRST_READ: usize = 4096;

struct Config {
    quick: bool,
    /// Size of both exports, all of it filled and read by `nbdcopy`.
    size: u64,
    /// `nbdcopy` and fio figures are the best of this many runs, alternating between the servers.
    runs: usize,
    /// fio's working set (`--size`), the start of the export.
    fio_size: u64,
    /// fio's measured time and the warm-up before it (`--ramp_time`).
    fio_runtime: u64,
    fio_ramp: u64,
    /// Fresh connections per server for the first-request latency.
    samples: usize,
}

// ---------------------------------------------------------------------------------------------
// Small utilities

/// Whether `program` is on `PATH`.
fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// The first line of `program --version`, or `None` when it does not run.
fn version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_owned())
}

/// The `p` quantile (nearest rank) of `samples`.
fn quantile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Touches and frees `size` bytes, so that later allocations (ours and nbdkit's) get memory the
/// hypervisor has already backed: on a virtual machine the first touch of guest memory costs far
/// more than the kernel's page fault, and would land on whichever server is filled first.
fn warm_up(size: u64) {
    let m = Memory::new(size);
    let ones = vec![1u8; MIB as usize];
    let mut off = 0;
    while off < size {
        m.write_at(&ones, off).expect("touch memory");
        off += MIB;
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// The servers

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "Unix socket",
            Transport::Tcp => "TCP loopback",
        }
    }
}

/// Where a server listens.
#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl Endpoint {
    /// The NBD URI of the benchmark export.
    fn uri(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///{EXPORT}?socket={}", p.display()),
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{EXPORT}"),
        }
    }
}

/// Our server on a tokio runtime (default worker count: one per core) in a background thread.
/// Dropping it stops the server and waits for its final flush.
struct Ours {
    endpoint: Endpoint,
    backend: Arc<Memory>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Ours {
    fn start(transport: Transport, size: u64) -> io::Result<Self> {
        let backend = Arc::new(Memory::new(size));
        let server =
            NbdServer::new(vec![NbdExport::new(EXPORT, backend.clone())]).map_err(io::Error::other)?;
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("ours.sock");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Endpoint>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("nbd-server".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                match transport {
                    Transport::Unix => {
                        let listener = tokio::net::UnixListener::bind(&sock)?;
                        let _ = ready_tx.send(Endpoint::Unix(sock));
                        server.serve_unix(listener, shutdown).await
                    }
                    Transport::Tcp => {
                        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                        let _ = ready_tx.send(Endpoint::Tcp(listener.local_addr()?.port()));
                        server.serve_tcp(listener, shutdown).await
                    }
                }
            })
        })?;
        let Ok(endpoint) = ready_rx.recv() else {
            let why = match thread.join() {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "it stopped".to_owned(),
                Err(_) => "it panicked".to_owned(),
            };
            return Err(io::Error::other(format!("our server did not start: {why}")));
        };
        Ok(Self { endpoint, backend, stop: Some(stop_tx), thread: Some(thread), _dir: dir })
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("our server ended with an error: {e}"),
                Err(_) => eprintln!("our server panicked"),
            }
        }
    }
}

/// `nbdkit memory SIZE` in the foreground, with its default thread count. Dropping it kills the
/// process (it also exits with this one: `--exit-with-parent`).
struct Nbdkit {
    endpoint: Endpoint,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nbdkit {
    fn start(transport: Transport, size: u64) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("nbdkit.pid");
        let log = File::create(dir.path().join("nbdkit.log"))?;
        let mut cmd = Command::new("nbdkit");
        cmd.arg("--exit-with-parent").arg("-f").arg("-P").arg(&pid_file);
        let endpoint = match transport {
            Transport::Unix => {
                let sock = dir.path().join("nbdkit.sock");
                cmd.arg("-U").arg(&sock);
                Endpoint::Unix(sock)
            }
            Transport::Tcp => {
                let port = free_port()?;
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                Endpoint::Tcp(port)
            }
        };
        cmd.arg("memory").arg(size.to_string());
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?;
        let mut kit = Self { endpoint, child, dir };
        kit.wait_ready(&pid_file)?;
        Ok(kit)
    }

    /// Waits until nbdkit wrote its pid file (it does once it listens) and its socket exists or
    /// its port accepts.
    fn wait_ready(&mut self, pid_file: &Path) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening = fs::metadata(pid_file).is_ok_and(|m| m.len() > 0)
                && match &self.endpoint {
                    Endpoint::Unix(sock) => sock.exists(),
                    Endpoint::Tcp(port) => TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).is_ok(),
                };
            if listening {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let log = fs::read_to_string(self.dir.path().join("nbdkit.log")).unwrap_or_default();
                return Err(io::Error::other(format!("nbdkit exited ({status}): {}", log.trim())));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "nbdkit was not listening after 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The clients

/// Runs `program` with `args`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(io::Error::other(format!("{program} failed ({}): {first}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies `file` into the export with `nbdcopy`; MB/s.
fn nbdcopy_in(file: &Path, endpoint: &Endpoint, size: u64) -> io::Result<f64> {
    let t = Instant::now();
    run("nbdcopy", &[&file.to_string_lossy(), &endpoint.uri()])?;
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Reads the whole export to `null:` with `nbdcopy` (its defaults: several connections, as both
/// servers announce `CAN_MULTI_CONN`); MB/s.
fn nbdcopy_out(endpoint: &Endpoint, size: u64) -> io::Result<f64> {
    let t = Instant::now();
    run("nbdcopy", &[&endpoint.uri(), "null:"])?;
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

#[derive(Clone, Copy)]
enum Workload {
    RandRead,
    RandWrite,
}

impl Workload {
    fn fio_rw(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
        }
    }

    /// The section of fio's JSON job report that holds the figures.
    fn section(self) -> &'static str {
        match self {
            Workload::RandRead => "read",
            Workload::RandWrite => "write",
        }
    }
}

/// One fio job with the `nbd` engine, 4 KiB at iodepth 32; IOPS.
fn fio(endpoint: &Endpoint, workload: Workload, cfg: &Config) -> io::Result<f64> {
    let uri = format!("--uri={}", endpoint.uri());
    let rw = format!("--rw={}", workload.fio_rw());
    let size = format!("--size={}", cfg.fio_size);
    let runtime = format!("--runtime={}", cfg.fio_runtime);
    let ramp = format!("--ramp_time={}", cfg.fio_ramp);
    let out = run(
        "fio",
        &[
            "--name=r",
            "--ioengine=nbd",
            &uri,
            &rw,
            "--bs=4k",
            "--iodepth=32",
            &size,
            "--time_based",
            &runtime,
            &ramp,
            "--output-format=json",
        ],
    )?;
    fio_iops(&out, workload.section())
        .ok_or_else(|| invalid(format!("no {} IOPS in fio's output", workload.section())))
}

/// The `iops` figure of the `section` ("read" or "write") of the first job in fio's JSON output.
fn fio_iops(json: &str, section: &str) -> Option<f64> {
    let jobs = &json[json.find("\"jobs\"")?..];
    let key = format!("\"{section}\"");
    let part = &jobs[jobs.find(&key)? + key.len()..];
    let after = &part[part.find("\"iops\"")? + "\"iops\"".len()..];
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let end = value.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))?;
    value[..end].parse().ok()
}

/// A fresh connection to `endpoint`: connect, fixed newstyle handshake with `NBD_OPT_GO` (simple
/// replies), one `FIRST_READ` read at `offset` into `buf`. The time until the read's data has
/// arrived; the client then sends `NBD_CMD_DISC` and hangs up.
fn first_request(endpoint: &Endpoint, offset: u64, buf: &mut [u8]) -> io::Result<Duration> {
    let start = Instant::now();
    match endpoint {
        Endpoint::Unix(path) => exchange(UnixStream::connect(path)?, start, offset, buf),
        Endpoint::Tcp(port) => {
            let s = TcpStream::connect((Ipv4Addr::LOCALHOST, *port))?;
            s.set_nodelay(true)?;
            exchange(s, start, offset, buf)
        }
    }
}

fn exchange<S: Read + Write>(mut s: S, start: Instant, offset: u64, buf: &mut [u8]) -> io::Result<Duration> {
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting)?;
    let server_flags = proto::decode_greeting(&greeting).map_err(invalid)?;
    if server_flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(invalid("the server does not speak fixed newstyle"));
    }
    let mut flags = client_flags::FIXED_NEWSTYLE;
    if server_flags & handshake_flags::NO_ZEROES != 0 {
        flags |= client_flags::NO_ZEROES;
    }
    let go = InfoRequest { name: EXPORT.to_owned(), infos: Vec::new() }.encode();
    let mut hello = flags.to_be_bytes().to_vec();
    hello.extend_from_slice(&OptionHeader { option: opt::GO, len: go.len() as u32 }.encode());
    hello.extend_from_slice(&go);
    s.write_all(&hello)?;
    let mut size = None;
    loop {
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut header)?;
        let reply = OptionReplyHeader::decode(&header).map_err(invalid)?;
        if reply.option != opt::GO || reply.len > proto::MAX_OPTION_DATA {
            return Err(invalid(format!("unexpected option reply {reply:?}")));
        }
        let mut data = vec![0u8; reply.len as usize];
        s.read_exact(&mut data)?;
        match reply.reply {
            rep::ACK => break,
            rep::INFO if data.len() >= 12 && data[..2] == info::EXPORT.to_be_bytes() => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
            }
            r if rep::is_error(r) => {
                return Err(invalid(format!("NBD_OPT_GO refused: {}", String::from_utf8_lossy(&data))));
            }
            _ => {}
        }
    }
    if size.is_none_or(|size| size < offset + buf.len() as u64) {
        return Err(invalid(format!("the export is too small or its size is missing ({size:?})")));
    }
    let read = Request {
        flags: 0,
        kind: proto::Command::Read.to_u16(),
        cookie: 1,
        offset,
        length: buf.len() as u32,
    };
    s.write_all(&read.encode())?;
    let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
    s.read_exact(&mut header)?;
    let reply = SimpleReply::decode(&header).map_err(invalid)?;
    if reply.error != 0 || reply.cookie != 1 {
        return Err(invalid(format!("the read failed: {reply:?}")));
    }
    s.read_exact(buf)?;
    let elapsed = start.elapsed();
    let disc = Request { flags: 0, kind: proto::Command::Disc.to_u16(), cookie: 2, offset: 0, length: 0 };
    let _ = s.write_all(&disc.encode());
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// A figure, or why there is none.
type Figure = Result<f64, String>;

fn na(e: impl std::fmt::Display) -> String {
    format!("n/a ({e})")
}

/// Our server and nbdkit on one transport, both filled with the same data.
struct Pair {
    transport: Transport,
    ours: Ours,
    kit: Result<Nbdkit, String>,
    /// The fill with `nbdcopy` (one run each, into fresh memory).
    fill: (Figure, Figure),
}

impl Pair {
    fn start(transport: Transport, data: &[u8], file: &Path) -> Self {
        let size = data.len() as u64;
        let ours = Ours::start(transport, size).expect("start our server");
        let kit = if have("nbdkit") {
            Nbdkit::start(transport, size).map_err(na)
        } else {
            Err("skipped: nbdkit not installed".to_owned())
        };
        let fill = if have("nbdcopy") {
            let ours_fill = nbdcopy_in(file, &ours.endpoint, size).map_err(na);
            let kit_fill = match &kit {
                Ok(k) => nbdcopy_in(file, &k.endpoint, size).map_err(na),
                Err(e) => Err(e.clone()),
            };
            (ours_fill, kit_fill)
        } else {
            ours.backend.write_at(data, 0).expect("fill our export");
            let skipped = "skipped: nbdcopy not installed".to_owned();
            let kit = match &kit {
                Ok(_) => Err(skipped.clone()),
                Err(e) => Err(e.clone()),
            };
            (Err(skipped), kit)
        };
        let kit = match (kit, &fill.1) {
            (Ok(_), Err(e)) => Err(format!("n/a (nbdkit's export could not be filled: {e})")),
            (kit, _) => kit,
        };
        Pair { transport, ours, kit, fill }
    }

    /// `f` on our server and on nbdkit, `runs` times each, alternating; the best of each.
    fn best(&self, runs: usize, f: impl Fn(&Endpoint) -> io::Result<f64>) -> (Figure, Figure) {
        let (mut ours, mut kit) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            ours.push(f(&self.ours.endpoint));
            if let Ok(k) = &self.kit {
                kit.push(f(&k.endpoint));
            }
        }
        let best =
            |v: Vec<io::Result<f64>>| v.into_iter().try_fold(0.0f64, |b, r| r.map(|x| b.max(x))).map_err(na);
        let kit = match &self.kit {
            Ok(_) => best(kit),
            Err(e) => Err(e.clone()),
        };
        (best(ours), kit)
    }

    /// First-request latencies over `samples` fresh connections to each server, alternating, at
    /// random 4 KiB-aligned offsets; every read is checked against `data`.
    fn latency(
        &self,
        data: &[u8],
        samples: usize,
    ) -> (Result<Vec<Duration>, String>, Result<Vec<Duration>, String>) {
        let mut rng = fastrand::Rng::with_seed(7);
        let blocks = data.len() as u64 / FIRST_READ as u64;
        let mut buf = vec![0u8; FIRST_READ];
        let mut sample = |endpoint: &Endpoint, offset: u64| -> Result<Duration, String> {
            let t = first_request(endpoint, offset, &mut buf).map_err(na)?;
            let at = offset as usize;
            if buf[..] != data[at..at + FIRST_READ] {
                return Err(format!("n/a (wrong data at offset {offset})"));
            }
            Ok(t)
        };
        let mut ours = Ok(Vec::new());
        let mut kit = self.kit.as_ref().map(|_| Vec::new()).map_err(Clone::clone);
        for _ in 0..samples {
            let offset = rng.u64(..blocks) * FIRST_READ as u64;
            if let Ok(v) = &mut ours {
                match sample(&self.ours.endpoint, offset) {
                    Ok(t) => v.push(t),
                    Err(e) => ours = Err(e),
                }
            }
            if let (Ok(v), Ok(k)) = (&mut kit, &self.kit) {
                match sample(&k.endpoint, offset) {
                    Ok(t) => v.push(t),
                    Err(e) => kit = Err(e),
                }
            }
        }
        (ours, kit)
    }
}

/// Everything measured on one transport.
struct Results {
    transport: Transport,
    fill: (Figure, Figure),
    copy: (Figure, Figure),
    read_iops: (Figure, Figure),
    write_iops: (Figure, Figure),
    /// p50 and p90 in µs.
    latency: [(Figure, Figure); 2],
}

fn measure(transport: Transport, data: &[u8], file: &Path, cfg: &Config) -> Results {
    let pair = Pair::start(transport, data, file);
    let skipped = |tool: &str| {
        let e = format!("skipped: {tool} not installed");
        (Err(e.clone()), Err(e))
    };
    let copy = if have("nbdcopy") {
        pair.best(cfg.runs, |ep| nbdcopy_out(ep, cfg.size))
    } else {
        skipped("nbdcopy")
    };
    // Before fio's random writes, which overwrite the start of both exports.
    let (ours, kit) = pair.latency(data, cfg.samples);
    let pct = |s: &Result<Vec<Duration>, String>, p: f64| -> Figure {
        s.as_ref().map(|v| micros(quantile(v, p))).map_err(Clone::clone)
    };
    let latency = [(pct(&ours, 0.5), pct(&kit, 0.5)), (pct(&ours, 0.9), pct(&kit, 0.9))];
    let (read_iops, write_iops) = if have("fio") {
        (
            pair.best(cfg.runs, |ep| fio(ep, Workload::RandRead, cfg)),
            pair.best(cfg.runs, |ep| fio(ep, Workload::RandWrite, cfg)),
        )
    } else {
        (skipped("fio"), skipped("fio"))
    };
    Results { transport: pair.transport, fill: pair.fill.clone(), copy, read_iops, write_iops, latency }
}

// ---------------------------------------------------------------------------------------------
// Output

fn cell(f: &Figure, decimals: usize) -> String {
    match f {
        Ok(v) => format!("{v:.decimals$}"),
        Err(e) => e.clone(),
    }
}

fn ratio(ours: &Figure, kit: &Figure) -> String {
    match (ours, kit) {
        (Ok(o), Ok(k)) if *k > 0.0 => format!("{:.2}", o / k),
        _ => "n/a".to_owned(),
    }
}

fn row(what: &str, (ours, kit): &(Figure, Figure), decimals: usize) {
    println!("| {what} | {} | {} | {} |", cell(ours, decimals), cell(kit, decimals), ratio(ours, kit));
}

/// The CPU model from `/proc/cpuinfo`.
fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config {
            quick,
            size: 64 * MIB,
            runs: 1,
            fio_size: 64 * MIB,
            fio_runtime: 1,
            fio_ramp: 0,
            samples: 50,
        }
    } else {
        Config { quick, size: GIB, runs: 3, fio_size: 256 * MIB, fio_runtime: 3, fio_ramp: 1, samples: 500 }
    };
    let started = Instant::now();
    println!("# r3map NBD server benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("Machine: {cores} cores ({}), Linux {}.", cpu_model(), kernel.trim());
    let tools: Vec<String> = ["nbdkit", "nbdcopy", "fio"]
        .iter()
        .map(|t| {
            if have(t) {
                version(t).unwrap_or_else(|| format!("{t} (version unknown)"))
            } else {
                format!("{t}: not installed")
            }
        })
        .collect();
    println!("Tools: {}.", tools.join("; "));
    println!(
        "Ours: `NbdServer` with one `Memory` export on a tokio runtime with {cores} workers. Baseline: \
         `nbdkit -f memory SIZE` (its default 16 threads). Exports of {} MiB, filled with the same \
         random data.\n",
        cfg.size / MIB
    );

    let mut data = vec![0u8; cfg.size as usize];
    fastrand::Rng::with_seed(42).fill(&mut data);
    let work = tempfile::tempdir().expect("work directory");
    let file = work.path().join("random");
    fs::write(&file, &data).expect("write the random file");
    warm_up(2 * cfg.size);

    let results: Vec<Results> =
        [Transport::Unix, Transport::Tcp].into_iter().map(|t| measure(t, &data, &file, &cfg)).collect();

    let runs = if cfg.runs > 1 { format!(", best of {}", cfg.runs) } else { String::new() };
    println!("## Sequential read: `nbdcopy URI null:` ({} MiB{runs})\n", cfg.size / MIB);
    println!("| transport | ours MB/s | nbdkit MB/s | ours / nbdkit |\n|---|---|---|---|");
    for r in &results {
        row(r.transport.name(), &r.copy, 0);
    }
    for r in &results {
        row(
            &format!("{}: `nbdcopy FILE URI`, the fill (one run, fresh memory)", r.transport.name()),
            &r.fill,
            0,
        );
    }

    println!(
        "\n## Random 4 KiB I/O: fio `--ioengine=nbd --bs=4k --iodepth=32`, {} MiB working set, {} s{}{runs}\n",
        cfg.fio_size / MIB,
        cfg.fio_runtime,
        if cfg.fio_ramp > 0 { format!(" after {} s of ramp", cfg.fio_ramp) } else { String::new() }
    );
    println!("| workload | ours IOPS | nbdkit IOPS | ours / nbdkit |\n|---|---|---|---|");
    for r in &results {
        row(&format!("randread, {}", r.transport.name()), &r.read_iops, 0);
    }
    for r in &results {
        row(&format!("randwrite, {}", r.transport.name()), &r.write_iops, 0);
    }

    println!(
        "\n## First request: `connect()`, handshake (`NBD_OPT_GO`), first 4 KiB read ({} fresh \
         connections per server)\n",
        cfg.samples
    );
    println!("| transport | ours µs | nbdkit µs | ours / nbdkit (below 1: ours faster) |");
    println!("|---|---|---|---|");
    for r in &results {
        row(&format!("{}, p50", r.transport.name()), &r.latency[0], 0);
        row(&format!("{}, p90", r.transport.name()), &r.latency[1], 0);
    }
    println!("\nTotal time: {:.1} s", started.elapsed().as_secs_f64());
}

//! Migration benchmark: prints, from one run, the live migration of a resource between two
//! in-process endpoints over loopback TCP (the native protocol, plaintext, one connection), with
//! a writer at the source dirtying 0 %, 10 % or 50 % of the chunks during the pre-copy, and a
//! latency of 0 or 10 ms per remote call; the baseline is a plain copy of the resource over the
//! same transport, measured in the same run.
//!
//! `cargo bench -p r3map-migrate --bench migrate` for the full run (1 GiB, each row the median of
//! three migrations by total time; about a minute); add `-- --quick` for a smoke run with 64 MiB
//! and one migration per row (a few seconds).
//!
//! - **Transport**: the source is a `Source` over a `Memory`, exported with
//!   `Export::with_seeder` (64 KiB chunks); the destination is a `Leecher` into a fresh `Memory`,
//!   reaching the source through a `RemoteBackend`. The pull runs 16 requests of up to 4 MiB in
//!   flight (64 MiB in flight: enough for 6.4 GB/s at 10 ms per call, above what one loopback
//!   connection carries), the leecher's default rounds (at most 8, until a round finds nothing or
//!   a set less than a tenth smaller than the one before).
//! - **Latency**: a wrapper around the `RemoteBackend` at the destination waits the latency before
//!   every call (reads, `track`, `take_dirty`, `sync`, `close`), in the calling thread, so
//!   concurrent requests wait concurrently, like requests in flight on a link. This models a round
//!   trip per call better than a `Delay` around the source's backend on the server: that would
//!   delay only the data reads (the seeder operations reach `Source` directly), so the final
//!   `sync`, the one call inside the downtime, would cost nothing; and under `Source` it would
//!   also slow the application's own writes. The same wrapper counts the bytes the destination
//!   reads from the source.
//! - **Dirtying**: for a share `s`, a fixed random set of `s` of the chunks is chosen. From the
//!   moment the leecher has opened until the source's `before_sync` hook suspends it, a writer
//!   rewrites that set over and over, each pass in a fresh random order, one 4 KiB write at a
//!   random place in each chunk, and one pass over the set per plain-copy time of the whole
//!   resource (the baseline). So the source dirties chunks at `s` times the rate the link
//!   copies them, and during a first copy as long as the baseline every chunk of the set is
//!   written once. The writer never writes outside the set.
//! - **Per row**: total time from `Leecher::open` until every chunk is local (after finalize),
//!   also as a ratio to the plain copy; the first copy (from open until the pull first caught
//!   up) and the whole pre-copy; the rounds (dirty chunks and time of each); the chunks of the
//!   final dirty set; the bytes read from the source as a ratio to the resource size; the
//!   downtime (`Finalized::downtime`: from the finalize call to the destination unlocked); the
//!   post-copy (from unlocked until everything is local); the writes the application made. The
//!   destination's content is checked against the source's after each migration.

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::{Backend, Capabilities, Chunk, Memory, Seeder, SharedBackend};
use r3map_migrate::{Leecher, LeecherHooks, LeecherOptions, Round, SeederRemote, Source, SourceHooks};
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const CHUNK: u64 = 64 * KIB;
const DEPTH: usize = 16;
const REQUEST: u64 = 4 * MIB;
/// What the writer writes into a chunk to dirty it.
const WRITE: u64 = 4 * KIB;

struct Config {
    quick: bool,
    size: u64,
    /// Migrations (and plain copies) per row; the row shows the median by total time.
    runs: usize,
}

/// The destination's side of the link: every call waits `latency` first (one round trip), and the
/// bytes read are counted.
struct Link {
    remote: RemoteBackend,
    latency: Duration,
    read: AtomicU64,
}

impl Link {
    fn wait(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl Backend for Link {
    fn size(&self) -> u64 {
        self.remote.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.wait();
        self.remote.read_at(buf, off)?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A batch travels together: one round trip.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.wait();
        self.remote.read_many(reads)?;
        self.read.fetch_add(reads.iter().map(|(_, b)| b.len() as u64).sum(), Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.wait();
        self.remote.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.wait();
        self.remote.flush()
    }

    fn capabilities(&self) -> Capabilities {
        self.remote.capabilities()
    }
}

impl Seeder for Link {
    fn chunk_size(&self) -> u64 {
        Seeder::chunk_size(&self.remote)
    }

    fn track(&self) -> io::Result<()> {
        self.wait();
        self.remote.track()
    }

    fn sync(&self) -> io::Result<Vec<Chunk>> {
        self.wait();
        self.remote.sync()
    }

    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        self.wait();
        self.remote.take_dirty()
    }

    fn close(&self) -> io::Result<()> {
        self.wait();
        self.remote.close()
    }
}

/// The application at the source: rewrites its set of chunks, one pass per `pass`, until the
/// source's `before_sync` hook sets `stopped`.
struct Writer {
    stopped: Arc<Mutex<bool>>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(
        target: Arc<Source<Arc<Memory>>>,
        mut set: Vec<u64>,
        pass: Duration,
        stopped: Arc<Mutex<bool>>,
        seed: u64,
    ) -> Self {
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (Arc::clone(&stopped), Arc::clone(&writes));
        let thread = (!set.is_empty()).then(|| {
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut block = vec![0u8; WRITE as usize];
                let interval = pass / set.len() as u32;
                let start = Instant::now();
                let mut due = start;
                loop {
                    rng.shuffle(&mut set);
                    for &c in &set {
                        // Keep to the schedule: catch up after a stall rather than slow down.
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        due += interval;
                        let guard = s.lock().expect("writer lock");
                        if *guard {
                            return;
                        }
                        rng.fill(&mut block);
                        let off = c * CHUNK + rng.u64(..CHUNK / WRITE) * WRITE;
                        target.write_at(&block, off).expect("the application's write");
                        drop(guard);
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        Self { stopped, writes, thread }
    }

    /// Joins the writer (suspended by then) and returns its number of writes.
    fn finish(mut self) -> u64 {
        *self.stopped.lock().expect("writer lock") = true;
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer");
        }
        self.writes.load(Ordering::Relaxed)
    }
}

fn filled(size: u64) -> Arc<Memory> {
    let m = Memory::new(size);
    let mut rng = fastrand::Rng::with_seed(42);
    let mut block = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        rng.fill(&mut block);
        m.write_at(&block, off).expect("fill the source");
        off += MIB;
    }
    Arc::new(m)
}

/// Touches and frees `size` bytes, so that the hypervisor has backed the memory the destinations
/// get later (its first backing of guest memory would land on the first measurement otherwise).
fn warm_up(size: u64) {
    std::hint::black_box(vec![1u8; size as usize]);
}

fn serve(source: &Arc<Source<Arc<Memory>>>) -> ServerHandle {
    let export = Export::new("default", Arc::clone(source) as SharedBackend)
        .with_seeder(Arc::clone(source) as Arc<dyn Seeder>)
        .with_chunk_size(CHUNK as u32);
    ServerHandle::start_tcp(
        Server::new(ServerConfig::new(export, ServerSecurity::Plaintext)).expect("server"),
        "127.0.0.1:0".parse().expect("address"),
    )
    .expect("start the server")
}

fn connect(server: &ServerHandle, latency: Duration) -> Arc<Link> {
    let port = server.local_addr().expect("the server's address").port();
    let address = Address::Tcp { host: "127.0.0.1".into(), port };
    let remote =
        RemoteBackend::connect(address, ClientOptions::new(ClientSecurity::Plaintext)).expect("connect");
    Arc::new(Link { remote, latency, read: AtomicU64::new(0) })
}

fn pull_options() -> PullerOptions {
    PullerOptions { depth: DEPTH, request_size: REQUEST, ..PullerOptions::default() }
}

/// Checks that `dest` holds what `source` holds.
fn check(source: &Memory, dest: &dyn Backend) {
    let (mut a, mut b) = (vec![0u8; REQUEST as usize], vec![0u8; REQUEST as usize]);
    let mut off = 0;
    while off < source.size() {
        source.read_at(&mut a, off).expect("read the source");
        dest.read_at(&mut b, off).expect("read the destination");
        assert!(a == b, "the destination differs from the source in the 4 MiB at {off}");
        off += REQUEST;
    }
}

/// A plain copy of the whole resource into a fresh `Memory`: `DEPTH` threads reading `REQUEST`
/// bytes at a time through the link and writing them locally.
fn plain_copy(memory: &Arc<Memory>, latency: Duration) -> Duration {
    let source = Arc::new(Source::new(Arc::clone(memory), CHUNK, SourceHooks::default()).expect("source"));
    let server = serve(&source);
    let link = connect(&server, latency);
    let dest = Memory::new(memory.size());
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..DEPTH {
            let (link, dest, next) = (&link, &dest, &next);
            s.spawn(move || {
                let mut buf = vec![0u8; REQUEST as usize];
                loop {
                    let off = next.fetch_add(REQUEST, Ordering::Relaxed);
                    if off >= dest.size() {
                        return;
                    }
                    let n = REQUEST.min(dest.size() - off) as usize;
                    link.read_at(&mut buf[..n], off).expect("read");
                    dest.write_at(&buf[..n], off).expect("write");
                }
            });
        }
    });
    let took = t.elapsed();
    assert_eq!(link.read.load(Ordering::Relaxed), memory.size());
    check(memory, &dest);
    took
}

struct Migration {
    total: Duration,
    precopy: Duration,
    rounds: Vec<Round>,
    final_dirty: usize,
    pulled: u64,
    downtime: Duration,
    postcopy: Duration,
    writes: u64,
}

fn migrate(memory: &Arc<Memory>, percent: u64, latency: Duration, pass: Duration, seed: u64) -> Migration {
    let chunks = memory.size() / CHUNK;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut set: Vec<u64> = (0..chunks).collect();
    rng.shuffle(&mut set);
    set.truncate((chunks * percent / 100) as usize);

    let stopped = Arc::new(Mutex::new(false));
    let suspend = Arc::clone(&stopped);
    let hooks = SourceHooks {
        before_sync: Some(Box::new(move || {
            *suspend.lock().expect("writer lock") = true;
            Ok(())
        })),
        ..SourceHooks::default()
    };
    let source = Arc::new(Source::new(Arc::clone(memory), CHUNK, hooks).expect("source"));
    let server = serve(&source);
    let link = connect(&server, latency);
    let dest = Arc::new(Memory::new(memory.size()));
    let options = LeecherOptions { puller: pull_options(), ..LeecherOptions::default() };

    let t = Instant::now();
    let leecher = Leecher::open(
        Arc::clone(&link) as Arc<dyn SeederRemote>,
        Arc::clone(&dest) as SharedBackend,
        options,
        LeecherHooks::default(),
    )
    .expect("open the migration");
    let writer = Writer::start(Arc::clone(&source), set, pass, stopped, seed + 1);
    let rounds = leecher.precopy().expect("pre-copy");
    let precopy = t.elapsed();
    let finalized = leecher.finalize().expect("finalize");
    let unlocked = t.elapsed();
    leecher.wait().expect("post-copy");
    let total = t.elapsed();
    let writes = writer.finish();
    drop(leecher.close().expect("close"));
    check(memory, &*dest);
    Migration {
        total,
        precopy,
        rounds,
        final_dirty: finalized.dirty.len(),
        pulled: link.read.load(Ordering::Relaxed),
        downtime: finalized.downtime,
        postcopy: total - unlocked,
        writes,
    }
}

fn median<T>(mut runs: Vec<T>, key: impl Fn(&T) -> Duration) -> T {
    runs.sort_by_key(key);
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg =
        if quick { Config { quick, size: 64 * MIB, runs: 1 } } else { Config { quick, size: GIB, runs: 3 } };
    println!("# r3map migration benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });
    println!(
        "{} MiB resource, {} KiB chunks, native protocol over loopback TCP (plaintext, one \
         connection), pull {DEPTH} × {} MiB, a fresh `Memory` at the destination; {} per row.\n",
        cfg.size / MIB,
        CHUNK / KIB,
        REQUEST / MIB,
        if cfg.runs == 1 { "one run".to_owned() } else { format!("the median of {} runs", cfg.runs) },
    );
    let memory = filled(cfg.size);
    warm_up(2 * cfg.size);
    // One copy first, untimed: the first connection and the first threads of a process cost more.
    plain_copy(&memory, Duration::ZERO);
    let latencies = [Duration::ZERO, Duration::from_millis(10)];

    println!("## Baseline: plain copy over the same transport\n");
    println!("| latency per call | time s | GB/s |\n|---|---|---|");
    let mut copies = Vec::new();
    for &latency in &latencies {
        let copy = median((0..cfg.runs).map(|_| plain_copy(&memory, latency)).collect(), |d| *d);
        println!(
            "| {} ms | {:.3} | {:.2} |",
            latency.as_millis(),
            copy.as_secs_f64(),
            cfg.size as f64 / copy.as_secs_f64() / 1e9
        );
        copies.push(copy);
    }

    println!("\n## Migration\n");
    println!(
        "| dirtied | latency per call | total s | / plain copy | first copy s | pre-copy s | rounds: dirty \
         chunks (ms) each | final dirty chunks | pulled / size | downtime ms | post-copy ms | source writes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (&latency, &copy) in latencies.iter().zip(&copies) {
        for percent in [0, 10, 50] {
            let runs = (0..cfg.runs)
                .map(|i| migrate(&memory, percent, latency, copy, 100 * percent + i as u64))
                .collect();
            let m = median(runs, |m| m.total);
            let rounds: Vec<String> =
                m.rounds.iter().map(|r| format!("{} ({:.0})", r.dirty, ms(r.took))).collect();
            let first_copy = m.precopy - m.rounds.iter().map(|r| r.took).sum::<Duration>();
            println!(
                "| {percent} % | {} ms | {:.3} | {:.2} | {:.3} | {:.3} | {}: {} | {} | {:.3} | {:.2} | \
                 {:.1} | {} |",
                latency.as_millis(),
                m.total.as_secs_f64(),
                m.total.as_secs_f64() / copy.as_secs_f64(),
                first_copy.as_secs_f64(),
                m.precopy.as_secs_f64(),
                m.rounds.len(),
                rounds.join(", "),
                m.final_dirty,
                m.pulled as f64 / cfg.size as f64,
                ms(m.downtime),
                ms(m.postcopy),
                m.writes,
            );
        }
    }
}

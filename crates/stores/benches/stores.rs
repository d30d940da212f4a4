//! Store benchmark, in the shape of the thesis' backend figure: for each backend, the latency of
//! the first chunk and the read throughput of a direct and of a managed access, from one run, with
//! `Memory` and `File` as baselines.
//!
//! `cargo bench -p r3map-stores --bench stores` for the full run (256 MiB per backend, a few
//! minutes with the S3 server); add `-- --quick` for a smoke run with 16 MiB.
//!
//! - **Backends**: `Memory` and a `File` (in the page cache: its reads are memory copies plus a
//!   system call) as baselines; the in-memory `MemoryStore` through `Stored` (what splitting into
//!   chunks and batching costs by itself); Redis (`redis-server`, no persistence) and S3 on two
//!   S3-compatible servers: s3s-fs (a Rust server over a directory) and moto (the Python server
//!   the tests use, far slower), each started by the benchmark on loopback and reached through
//!   their URLs with 64 KiB chunks. A store whose server is not installed is skipped
//!   with a note; `scripts/bench-stores.sh` installs s3s-fs and runs this benchmark.
//! - **First chunk**: a fresh `Synced` layer over the backend (as a managed mount starts), one
//!   4 KiB read at a chunk never read before, so it pulls one chunk from the store: the median of
//!   21 such reads at different chunks, in ms.
//! - **Direct**: every read goes to the backend, as through a direct mount: one reader reading the
//!   resource front to back in 1 MiB requests (what an application reading a file sequentially
//!   through a mount with 1 MiB readahead asks for), and 16 readers with 4 MiB requests each.
//! - **Managed**: the background pull of a managed mount: `Synced` + `Puller` into a fresh
//!   `Memory`, from start until every chunk is local, with 16 requests of 4 MiB in flight (what
//!   suits a store far away) and with 4 of 1 MiB (what suits Redis, which answers one request at
//!   a time, on a machine of two cores).
//! - Throughputs are in MB/s (10^6 bytes per second), each the best of three runs; the backend is
//!   filled with random bytes first (that write is timed too, as a note).

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use r3map_core::pipeline::puller::{Puller, PullerOptions};
use r3map_core::pipeline::synced::{Synced, SyncedOptions};
use r3map_core::{Backend, File, Memory, SharedBackend};
use r3map_stores::{MemoryStore, Stored, StoredOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CHUNK: u64 = 64 * KIB;
const REQUEST: u64 = 4 * MIB;
const DEPTH: usize = 16;

#[path = "../tests/servers/mod.rs"]
mod servers;

fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn best_of_three(mut run: impl FnMut() -> Duration) -> Duration {
    (0..3).map(|_| run()).min().expect("three runs")
}

fn fill(backend: &dyn Backend) -> Duration {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut block = vec![0u8; REQUEST as usize];
    let t = Instant::now();
    let mut off = 0;
    while off < backend.size() {
        let n = REQUEST.min(backend.size() - off) as usize;
        rng.fill(&mut block[..n]);
        backend.write_at(&block[..n], off).expect("fill the backend");
        off += n as u64;
    }
    backend.flush().expect("flush the backend");
    t.elapsed()
}

fn synced(backend: &SharedBackend) -> Arc<Synced> {
    let local = Arc::new(Memory::new(backend.size()));
    let options = SyncedOptions { chunk_size: CHUNK, ..SyncedOptions::default() };
    Arc::new(Synced::new(Arc::clone(backend), local, options).expect("synced"))
}

/// The median time of a cold 4 KiB read through a fresh `Synced`, at 21 chunks spread over the
/// resource.
fn first_chunk(backend: &SharedBackend) -> Duration {
    let chunks = backend.size() / CHUNK;
    let mut times: Vec<Duration> = (0..21u64)
        .map(|i| {
            let s = synced(backend);
            let mut buf = [0u8; 4096];
            let off = (i * 7919 % chunks) * CHUNK;
            let t = Instant::now();
            s.read_at(&mut buf, off).expect("first read");
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2]
}

fn direct_one(backend: &dyn Backend) -> Duration {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut off = 0;
    while off < backend.size() {
        let n = MIB.min(backend.size() - off) as usize;
        backend.read_at(&mut buf[..n], off).expect("direct read");
        off += n as u64;
    }
    t.elapsed()
}

fn direct_parallel(backend: &dyn Backend) -> Duration {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..DEPTH {
            s.spawn(|| {
                let mut buf = vec![0u8; REQUEST as usize];
                loop {
                    let off = next.fetch_add(REQUEST, Ordering::Relaxed);
                    if off >= backend.size() {
                        return;
                    }
                    let n = REQUEST.min(backend.size() - off) as usize;
                    backend.read_at(&mut buf[..n], off).expect("direct read");
                }
            });
        }
    });
    t.elapsed()
}

/// The two background pulls the managed column tries: many large requests in flight (for a store
/// far away) and a few small ones (for a store that serves one request at a time, like Redis, on
/// a machine with few cores, where many large answers in flight only compete for the caches).
const PULLS: [(usize, u64); 2] = [(DEPTH, REQUEST), (4, MIB)];

fn managed(backend: &SharedBackend, (depth, request_size): (usize, u64)) -> Duration {
    let s = synced(backend);
    let t = Instant::now();
    let options = PullerOptions { depth, request_size, ..PullerOptions::default() };
    let puller = Puller::start(Arc::clone(&s), options).expect("puller");
    puller.wait().expect("the pull");
    t.elapsed()
}

fn row(name: &str, backend: &SharedBackend) {
    let size = backend.size();
    let wrote = fill(&**backend);
    let first = first_chunk(backend);
    let one = best_of_three(|| direct_one(&**backend));
    let many = best_of_three(|| direct_parallel(&**backend));
    let pulls: Vec<Duration> = PULLS.iter().map(|&p| best_of_three(|| managed(backend, p))).collect();
    println!(
        "| {name} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        first.as_secs_f64() * 1e3,
        mbps(size, one),
        mbps(size, many),
        mbps(size, pulls[0]),
        mbps(size, pulls[1]),
        mbps(size, wrote),
    );
}

fn open_store(url: &str) -> SharedBackend {
    servers::open_url(url, CHUNK)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick { 16 * MIB } else { 256 * MIB };
    let dir = tempfile::tempdir().expect("a temporary directory");
    println!("# r3map store benchmark{}\n", if quick { " (quick smoke run)" } else { "" });
    println!(
        "{} MiB per backend, {} KiB chunks; first chunk: median of 21 cold 4 KiB reads through a fresh \
         `Synced`; direct: 1 reader × 1 MiB, and {DEPTH} readers × {} MiB; managed: a background pull \
         into memory with two depths and request sizes; best of three; MB/s.\n",
        size / MIB,
        CHUNK / KIB,
        REQUEST / MIB,
    );
    println!(
        "| backend | first chunk ms | direct, 1 reader MB/s | direct, {DEPTH} readers MB/s | managed, {DEPTH} × {} MiB MB/s | managed, {} × {} MiB MB/s | fill (write) MB/s |",
        PULLS[0].1 / MIB,
        PULLS[1].0,
        PULLS[1].1 / MIB
    );
    println!("|---|---|---|---|---|---|---|");
    row("memory (baseline)", &(Arc::new(Memory::new(size)) as SharedBackend));
    let path = dir.path().join("file.img");
    let file = File::create(&path, size).expect("a file backend");
    row("file, page cache (baseline)", &(Arc::new(file) as SharedBackend));
    let store = Stored::new(
        MemoryStore::new(),
        size,
        StoredOptions { chunk_size: CHUNK, ..StoredOptions::default() },
    )
    .expect("a memory store");
    row("`Stored` over `MemoryStore`", &(Arc::new(store) as SharedBackend));

    let mut notes = Vec::new();
    match servers::redis() {
        Some(server) => {
            row("Redis", &open_store(&format!("redis://127.0.0.1:{}/0?size={size}", server.port)));
        }
        None => notes.push("Redis: skipped, redis-server is not installed (scripts/test.sh installs it)"),
    }
    match servers::s3s_fs() {
        Some(server) => {
            row("S3 (s3s-fs)", &open_store(&servers::s3_url(&server, "bench", "data", "r3map", size)));
        }
        None => {
            notes.push("S3 (s3s-fs): skipped, s3s-fs is not installed (scripts/bench-stores.sh installs it)");
        }
    }
    match servers::moto() {
        Some(server) => {
            row("S3 (moto)", &open_store(&servers::s3_url(&server, "bench", "data", "bench", size)));
        }
        None => notes.push("S3 (moto): skipped, moto_server is not installed (scripts/test.sh installs it)"),
    }
    for n in notes {
        println!("\n{n}");
    }
}

//! Pipeline benchmark: prints, from one run, memcpy bandwidth as the baseline, sequential reads
//! through `Synced` over a memory remote as a ratio to it, background pull throughput over a
//! delayed remote for several request sizes and depths, and the metadata of a sparse 1 TiB
//! resource.
//!
//! `cargo bench -p r3map-core --bench pipeline` for the full run (about two minutes);
//! add `-- --quick` for a smoke run with small sizes.

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::backend::Backend;
use r3map_core::backends::Memory;
use r3map_core::layers::Delay;
use r3map_core::pipeline::puller::{Puller, PullerOptions};
use r3map_core::pipeline::synced::{Synced, SyncedOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

struct Config {
    quick: bool,
    read_size: u64,
    pull_size: u64,
    pull_budget: Duration,
}

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn filled(size: u64) -> Memory {
    let m = Memory::new(size);
    let mut rng = fastrand::Rng::with_seed(42);
    let block: Vec<u8> = (0..MIB).map(|_| rng.u8(1..=255)).collect();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        m.write_at(&block[..n as usize], off).expect("fill the remote");
        off += n;
    }
    m
}

/// Touches and frees `size` bytes in huge pages, so that later allocations get memory the
/// hypervisor has already backed: on a virtual machine the first touch of guest memory costs far
/// more than the kernel's own page fault, and that cost would land on whichever measurement runs
/// first.
fn warm_up(size: u64) {
    drop(warm_memory(size));
}

/// Best of three copies of `size` bytes between two buffers that are already faulted in.
fn memcpy(size: u64) -> f64 {
    let src = vec![0x5au8; size as usize];
    let mut dst = vec![0u8; size as usize];
    dst.copy_from_slice(&src);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            gbps(size, t.elapsed())
        })
        .fold(0.0, f64::max)
}

/// Writing fresh (never touched) memory: what any local cache pays for its first copy.
fn first_touch(size: u64, page: u64) -> f64 {
    let src = vec![0x5au8; MIB as usize];
    let t = Instant::now();
    let dst = Memory::with_page_size(size, page).expect("memory");
    let mut off = 0;
    while off < size {
        dst.write_at(&src, off).expect("write");
        off += MIB;
    }
    gbps(size, t.elapsed())
}

/// A local cache: either fresh memory, or memory whose pages are already allocated and faulted
/// in (reused from an earlier run), which isolates the pipeline from the cost of the first touch.
#[derive(Clone, Copy, PartialEq)]
enum Local {
    Fresh,
    Warm,
}

fn warm_memory(size: u64) -> Arc<Memory> {
    let m = Arc::new(Memory::new(size));
    let ones = vec![1u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        m.write_at(&ones[..n as usize], off).expect("fault the cache in");
        off += n;
    }
    m
}

/// Sequential 1 MiB reads through a new `Synced` over `remote`; best of two.
fn synced_read(remote: &Arc<Memory>, chunk_size: u64, local: Local) -> f64 {
    let size = remote.size();
    let warm = (local == Local::Warm).then(|| warm_memory(size));
    let mut buf = vec![0u8; MIB as usize];
    (0..2)
        .map(|_| {
            let cache = warm.clone().unwrap_or_else(|| Arc::new(Memory::new(size)));
            let opts = SyncedOptions { chunk_size, ..SyncedOptions::default() };
            let synced = Synced::new(remote.clone(), cache, opts).expect("synced");
            let t = Instant::now();
            let mut off = 0;
            while off < size {
                synced.read_at(&mut buf, off).expect("read");
                off += MIB;
            }
            gbps(size, t.elapsed())
        })
        .fold(0.0, f64::max)
}

/// Background pull over a remote that takes `latency` per call into the warm `cache`: bytes
/// pulled per second until done or until the budget runs out.
fn pull(
    remote: &Arc<Memory>,
    cache: &Arc<Memory>,
    latency: Duration,
    request: u64,
    depth: usize,
    budget: Duration,
) -> f64 {
    let delayed = Arc::new(Delay::new(remote.clone(), latency));
    let opts = SyncedOptions { chunk_size: 64 * KIB, ..SyncedOptions::default() };
    let synced = Arc::new(Synced::new(delayed, cache.clone(), opts).expect("synced"));
    let t = Instant::now();
    let puller =
        Puller::start(synced, PullerOptions { depth, request_size: request, ..PullerOptions::default() })
            .expect("puller");
    puller.wait_timeout(Some(budget)).expect("pull");
    let elapsed = t.elapsed();
    let bytes = puller.progress().pulled_bytes;
    puller.close();
    gbps(bytes, elapsed)
}

fn metadata(chunk_size: u64) -> u64 {
    let size = 1u64 << 40;
    let opts = SyncedOptions { chunk_size, ..SyncedOptions::default() };
    Synced::new(Arc::new(Memory::new(size)), Arc::new(Memory::new(size)), opts)
        .expect("synced")
        .stats()
        .metadata_bytes
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config { quick, read_size: 64 * MIB, pull_size: 128 * MIB, pull_budget: Duration::from_millis(300) }
    } else {
        Config { quick, read_size: GIB, pull_size: 2 * GIB, pull_budget: Duration::from_secs(2) }
    };
    println!("# r3map pipeline benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });

    warm_up(3 * cfg.pull_size.max(cfg.read_size));
    let base = memcpy(cfg.read_size);
    println!("| baseline | GB/s |\n|---|---|");
    println!("| memcpy, {} MiB, prefaulted | {base:.2} |", cfg.read_size / MIB);
    for page in [64 * KIB, 2 * MIB] {
        let touch = first_touch(cfg.read_size, page);
        println!("| Memory backend, 1 MiB writes to fresh {} KiB pages | {touch:.2} |", page / KIB);
    }
    println!();

    let remote = Arc::new(filled(cfg.read_size));
    println!("## Sequential 1 MiB reads through Synced, memory remote, no delay\n");
    println!("| chunk size | local cache | GB/s | ratio to memcpy |\n|---|---|---|---|");
    for (local, name) in [(Local::Warm, "warm"), (Local::Fresh, "fresh")] {
        for cs in [4 * KIB, 64 * KIB, 256 * KIB, MIB] {
            let r = synced_read(&remote, cs, local);
            println!("| {} KiB | {name} | {r:.2} | {:.2} |", cs / KIB, r / base);
        }
    }
    drop(remote);

    println!("\n## Background pull into a warm cache, Delay per call, 64 KiB chunks\n");
    let remote = Arc::new(filled(cfg.pull_size));
    let cache = warm_memory(cfg.pull_size);
    let latencies: &[u64] = if cfg.quick { &[0, 40] } else { &[0, 10, 25, 40] };
    let requests: &[u64] = if cfg.quick { &[4 * MIB] } else { &[256 * KIB, MIB, 4 * MIB, 16 * MIB] };
    let depths: &[usize] = if cfg.quick { &[16] } else { &[4, 16, 64] };
    print!("| request | depth |");
    for l in latencies {
        print!(" {l} ms |");
    }
    print!("\n|---|---|");
    for _ in latencies {
        print!("---|");
    }
    println!();
    for &request in requests {
        for &depth in depths {
            print!("| {} KiB | {depth} |", request / KIB);
            for &l in latencies {
                let r = pull(&remote, &cache, Duration::from_millis(l), request, depth, cfg.pull_budget);
                print!(" {r:.2} GB/s |");
            }
            println!();
        }
    }
    println!("\nThe original r3map: about 0.35 GB/s at 40 ms with 4096 workers of 4 KiB.\n");

    println!("## Metadata of a sparse 1 TiB resource\n\n| chunk size | bytes |\n|---|---|");
    for cs in [4 * KIB, 64 * KIB, MIB] {
        println!("| {} KiB | {} |", cs / KIB, metadata(cs));
    }
}

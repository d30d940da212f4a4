//! Region benchmark: prints, from one run, the baselines (first touch of fresh anonymous memory,
//! memcpy), the first-access latency of a region page, cold sequential reads of a region over a
//! memory remote and over a remote with 10 ms per call, handler thread counts, and the cost of
//! write tracking.
//!
//! `cargo bench -p r3map-region --bench region` for the full run (1 GiB; about a minute);
//! add `-- --quick` for a smoke run with small sizes (a few seconds).

// Benchmark sizes fit in memory and figures are printed as floats.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::backend::{Backend, SharedBackend};
use r3map_core::backends::Memory;
use r3map_core::layers::Delay;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_region::{Region, RegionError, RegionOptions, WriteTracking};
use r3map_sys::AnonMapping;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 4096;

struct Config {
    quick: bool,
    /// Cold sequential reads and baselines.
    size: u64,
    /// The 10 ms remote.
    delay_size: u64,
    /// Latency samples.
    samples: usize,
    /// Write tracking.
    write_size: u64,
}

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn filled(size: u64) -> Arc<Memory> {
    let m = Memory::new(size);
    let mut rng = fastrand::Rng::with_seed(42);
    let block: Vec<u8> = (0..MIB).map(|_| rng.u8(1..=255)).collect();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        m.write_at(&block[..n as usize], off).expect("fill the remote");
        off += n;
    }
    Arc::new(m)
}

/// Touches and frees `size` bytes so that later mappings get memory the hypervisor has already
/// backed (on a virtual machine the first touch of guest memory costs far more than the kernel's
/// page fault, and that cost would land on whichever measurement runs first).
fn warm_up(size: u64) {
    let m = AnonMapping::new(size as usize).expect("map");
    let mut off = 0;
    while off < size {
        m.write_u8(off as usize, 1).expect("touch");
        off += PAGE;
    }
}

/// Best of three copies between two prefaulted buffers.
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

/// First touch of fresh anonymous memory, one byte per page: a read (maps the shared zero
/// page) or a write (allocates and zeroes a page, as a region fault does).
fn anon_touch(size: u64, write: bool) -> f64 {
    let m = AnonMapping::new(size as usize).expect("map");
    let t = Instant::now();
    let mut off = 0;
    let mut sum = 0u64;
    while off < size {
        if write {
            m.write_u8(off as usize, 1).expect("touch");
        } else {
            sum += u64::from(m.read_u8(off as usize).expect("touch"));
        }
        off += PAGE;
    }
    std::hint::black_box(sum);
    gbps(size, t.elapsed())
}

fn open(remote: SharedBackend, options: RegionOptions) -> Region {
    match Region::open(remote, options) {
        Ok(r) => r,
        Err(RegionError::Unavailable(e)) => {
            println!("skipped: {e}");
            std::process::exit(0);
        }
        Err(e) => panic!("opening the region failed: {e}"),
    }
}

fn on_demand(chunk_size: u64, spin: Duration) -> RegionOptions {
    RegionOptions { chunk_size, spin, pull: None, push: None, ..RegionOptions::default() }
}

fn pull(depth: usize, request: u64) -> PullerOptions {
    PullerOptions { depth, request_size: request, ..PullerOptions::default() }
}

/// Reads one byte of every page in order; GB/s.
fn touch_all(region: &Region) -> f64 {
    let size = region.len() as u64;
    let t = Instant::now();
    let mut off = 0;
    let mut sum = 0u64;
    while off < size {
        sum += u64::from(region.read_u8(off).expect("touch"));
        off += PAGE;
    }
    std::hint::black_box(sum);
    gbps(size, t.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// First access to one page of a fresh chunk, chunks in random order; `gap` between samples.
fn latency(
    remote: &Arc<Memory>,
    chunk_size: u64,
    spin: Duration,
    gap: Duration,
    samples: usize,
) -> (f64, f64) {
    let region = open(remote.clone(), on_demand(chunk_size, spin));
    let chunks = region.len() as u64 / chunk_size;
    let mut order: Vec<u64> = (0..chunks).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut order);
    let mut times = Vec::with_capacity(samples);
    for &c in order.iter().take(samples) {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let t = Instant::now();
        std::hint::black_box(region.read_u8(c * chunk_size + 100).expect("touch"));
        times.push(t.elapsed());
    }
    times.sort_unstable();
    (percentile(&times, 0.5), percentile(&times, 0.9))
}

/// `threads` readers touch disjoint parts of a cold region with `handlers` handler threads.
fn parallel_touch(remote: &Arc<Memory>, handlers: usize, threads: u64) -> f64 {
    let options =
        RegionOptions { handler_threads: handlers, ..on_demand(64 * KIB, Duration::from_micros(50)) };
    let region = open(remote.clone(), options);
    let size = region.len() as u64;
    let span = size / threads;
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..threads {
            let region = &region;
            s.spawn(move || {
                let mut off = i * span;
                while off < (i + 1) * span {
                    std::hint::black_box(region.read_u8(off).expect("touch"));
                    off += PAGE;
                }
            });
        }
    });
    gbps(size, t.elapsed())
}

/// Random 8-byte stores, two passes of `stores` each; returns ns per store of each pass.
fn stores(write: impl Fn(u64, u64), size: u64, stores: u64) -> (f64, f64) {
    let pass = |seed| {
        let mut rng = fastrand::Rng::with_seed(seed);
        let t = Instant::now();
        for _ in 0..stores {
            write(rng.u64(0..size - 8) & !7, rng.u64(..));
        }
        t.elapsed().as_secs_f64() * 1e9 / stores as f64
    };
    (pass(1), pass(2))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config { quick, size: 64 * MIB, delay_size: 64 * MIB, samples: 200, write_size: 32 * MIB }
    } else {
        Config { quick, size: GIB, delay_size: GIB, samples: 2000, write_size: 256 * MIB }
    };
    println!("# r3map region benchmark{}\n", if cfg.quick { " (quick smoke run)" } else { "" });
    let remote = filled(cfg.size);
    warm_up(2 * cfg.size);

    let copy = memcpy(cfg.size.min(GIB));
    let anon_read = anon_touch(cfg.size, false);
    let anon_write = anon_touch(cfg.size, true);
    println!("## Baselines\n");
    println!("| what | GB/s |\n|---|---|");
    println!("| memcpy, {} MiB, prefaulted | {copy:.2} |", cfg.size / MIB);
    println!("| first read touch of fresh anonymous memory (zero page), 1 byte per page | {anon_read:.2} |");
    println!(
        "| first write touch of fresh anonymous memory (allocates), 1 byte per page | {anon_write:.2} |"
    );

    println!("\n## First access to a page (fresh chunk, memory remote)\n");
    println!("| chunk | handler | p50 µs | p90 µs |\n|---|---|---|---|");
    let lat_remote = filled(if cfg.quick { 16 * MIB } else { 256 * MIB });
    for (chunk, spin, gap, label) in [
        (4 * KIB, Duration::from_micros(50), Duration::ZERO, "spins 50 µs, back-to-back faults"),
        (64 * KIB, Duration::from_micros(50), Duration::ZERO, "spins 50 µs, back-to-back faults"),
        (64 * KIB, Duration::ZERO, Duration::ZERO, "sleeps at once, back-to-back faults"),
        (
            64 * KIB,
            Duration::from_micros(50),
            Duration::from_millis(1),
            "spins 50 µs, faults 1 ms apart (asleep)",
        ),
    ] {
        let samples = if gap.is_zero() { cfg.samples } else { cfg.samples / 4 };
        let (p50, p90) = latency(&lat_remote, chunk, spin, gap, samples);
        println!("| {} KiB | {label} | {p50:.1} | {p90:.1} |", chunk / KIB);
    }
    drop(lat_remote);

    println!("\n## Cold sequential read, touching every page once, memory remote\n");
    println!(
        "| chunk | background pull | GB/s | / anon write touch | / anon read touch |\n|---|---|---|---|---|"
    );
    for chunk in [64 * KIB, 256 * KIB, MIB] {
        for background in [false, true] {
            let mut options = on_demand(chunk, Duration::from_micros(50));
            if background {
                options.pull = Some(pull(16, 4 * MIB));
            }
            let region = open(remote.clone() as SharedBackend, options);
            let rate = touch_all(&region);
            drop(region);
            println!(
                "| {} KiB | {} | {rate:.2} | {:.2} | {:.2} |",
                chunk / KIB,
                if background { "16 × 4 MiB" } else { "off" },
                rate / anon_write,
                rate / anon_read
            );
        }
    }
    {
        let region = open(remote.clone() as SharedBackend, on_demand(64 * KIB, Duration::from_micros(50)));
        let mut buf = vec![0u8; MIB as usize];
        let t = Instant::now();
        let mut off = 0;
        while off < cfg.size {
            region.read(off, &mut buf).expect("read");
            off += MIB;
        }
        let rate = gbps(cfg.size, t.elapsed());
        println!(
            "| 64 KiB | off; `Region::read` of 1 MiB (fetch, then copy out: no faults) | {rate:.2} | {:.2} | {:.2} |",
            rate / anon_write,
            rate / anon_read
        );
    }

    println!("\n## Several faulting threads (64 KiB chunks, 4 readers on disjoint quarters)\n");
    println!("| handler threads | GB/s |\n|---|---|");
    let par_remote = filled(if cfg.quick { 32 * MIB } else { 256 * MIB });
    for handlers in [1, 2, 4] {
        println!("| {handlers} | {:.2} |", parallel_touch(&par_remote, handlers, 4));
    }
    drop(par_remote);

    println!("\n## Cold sequential read over a remote with 10 ms per call\n");
    println!("| chunk | background pull | GB/s | time to the first byte ms |\n|---|---|---|---|");
    let delay_remote = if cfg.delay_size == cfg.size { remote.clone() } else { filled(cfg.delay_size) };
    for (depth, request) in [(16, 4 * MIB), (32, 4 * MIB)] {
        let delayed: SharedBackend = Arc::new(Delay::new(delay_remote.clone(), Duration::from_millis(10)));
        let options = RegionOptions {
            pull: Some(pull(depth, request)),
            ..on_demand(64 * KIB, Duration::from_micros(50))
        };
        let t = Instant::now();
        let region = open(delayed, options);
        std::hint::black_box(region.read_u8(0).expect("touch"));
        let first = t.elapsed();
        let rate = touch_all(&region);
        let total = gbps(cfg.delay_size, t.elapsed());
        drop(region);
        println!(
            "| 64 KiB | {depth} × {} MiB | {total:.2} (touch loop alone {rate:.2}) | {:.1} |",
            request / MIB,
            first.as_secs_f64() * 1e3
        );
    }
    drop(delay_remote);

    println!("\n## Write tracking: random 8-byte stores, two passes over {} MiB\n", cfg.write_size / MIB);
    println!(
        "| memory | pass 1 ns/store | pass 2 ns/store | pass 1 / anon | pass 2 / anon |\n|---|---|---|---|---|"
    );
    let n = cfg.write_size / 64;
    let anon = AnonMapping::new(cfg.write_size as usize).expect("map");
    let mut off = 0;
    while off < cfg.write_size {
        anon.write_u8(off as usize, 1).expect("prefault");
        off += PAGE;
    }
    let (a1, a2) = stores(|o, v| anon.write_u64(o as usize, v).expect("store"), cfg.write_size, n);
    println!("| plain anonymous memory, prefaulted | {a1:.1} | {a2:.1} | 1.00 | 1.00 |");
    drop(anon);
    let write_remote = filled(cfg.write_size);
    let mut modes = vec![WriteTracking::Off, WriteTracking::Async];
    if !cfg.quick {
        modes.push(WriteTracking::Sync);
    }
    let mut track_times = Vec::new();
    for mode in modes {
        let options = RegionOptions { tracking: mode, ..on_demand(64 * KIB, Duration::from_micros(50)) };
        let region = open(write_remote.clone() as SharedBackend, options);
        region.wait_pulled().expect("pull");
        let (r1, r2) = stores(|o, v| region.write_u64(o, v).expect("store"), cfg.write_size, n);
        println!(
            "| region, tracking {mode:?}, all pulled | {r1:.1} | {r2:.1} | {:.2} | {:.2} |",
            r1 / a1,
            r2 / a2
        );
        if mode != WriteTracking::Off {
            let t = Instant::now();
            let written = region.scan().expect("scan");
            let scan = t.elapsed();
            let pages: u64 = written.iter().map(|r| (r.end - r.start).div_ceil(PAGE)).sum();
            let t = Instant::now();
            let empty = region.scan().expect("scan");
            let scan_clean = t.elapsed();
            assert!(empty.is_empty());
            let t = Instant::now();
            region.track().expect("track");
            let track = t.elapsed();
            track_times.push((mode, pages, scan, scan_clean, track));
        }
        drop(region);
    }
    println!(
        "\n| tracking | scan of {} MiB with written pages | pages found | scan with none written | track() |",
        cfg.write_size / MIB
    );
    println!("|---|---|---|---|---|");
    for (mode, pages, scan, clean, track) in track_times {
        println!(
            "| {mode:?} | {:.2} ms | {pages} | {:.2} ms | {:.2} ms |",
            scan.as_secs_f64() * 1e3,
            clean.as_secs_f64() * 1e3,
            track.as_secs_f64() * 1e3
        );
    }
}

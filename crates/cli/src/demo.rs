//! `r3map demo`: the managed pipeline against a simulated remote, checked end to end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use r3map_core::backend::Backend;
use r3map_core::backends::Memory;
use r3map_core::layers::Delay;
use r3map_core::pipeline::puller::{Puller, PullerOptions};
use r3map_core::pipeline::pusher::{Pusher, PusherOptions};
use r3map_core::pipeline::synced::{Synced, SyncedOptions};

use crate::units::{human, parse_duration, parse_size};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the simulated remote resource.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size: the unit of pulling, pushing and state.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Simulated latency of every remote call (the round trip of a network).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    latency: Duration,
    /// Random reads and writes to run while the background pull is going on.
    #[arg(long, default_value_t = 2000)]
    ops: u64,
    /// Application threads issuing the reads and writes (each in its own part of the resource).
    #[arg(long, default_value_t = 4)]
    threads: u64,
    /// Largest single read or write.
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    max_io: u64,
    /// Background pull requests in flight.
    #[arg(long, default_value_t = 16)]
    pull_depth: usize,
    /// Largest background pull request (adjacent chunks are merged up to it).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pull_request: u64,
    /// Time between background pushes.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    push_interval: Duration,
    /// Seed of the random data and operations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.threads == 0 || args.size < args.threads * args.max_io.max(1) {
        bail!("the resource must hold at least --threads × --max-io bytes");
    }
    let size_usize = usize::try_from(args.size).context("the size does not fit in memory")?;
    println!(
        "remote: {} of memory behind {:?} per call; chunks of {}; pull {} × {}; push every {:?}",
        human(args.size),
        args.latency,
        human(args.chunk_size),
        args.pull_depth,
        human(args.pull_request),
        args.push_interval
    );
    let mut model = pattern(args.seed, size_usize);
    let remote_memory = Arc::new(Memory::from_bytes(&model));
    let remote = Arc::new(Delay::new(remote_memory.clone(), args.latency));
    let local = Arc::new(Memory::new(args.size));
    let opts = SyncedOptions { chunk_size: args.chunk_size, ..SyncedOptions::default() };
    let synced = Arc::new(Synced::new(remote, local, opts).context("building the managed stack")?);

    let started = Instant::now();
    let puller = Puller::start(
        Arc::clone(&synced),
        PullerOptions { depth: args.pull_depth, request_size: args.pull_request, ..PullerOptions::default() },
    )
    .context("starting the background pull")?;
    let pusher = Pusher::start(
        Arc::clone(&synced),
        PusherOptions { interval: args.push_interval, ..PusherOptions::default() },
    )
    .context("starting the background push")?;

    let bar = ProgressBar::new(args.ops);
    bar.set_style(
        ProgressStyle::with_template("{spinner} ops {pos}/{len} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let part = args.size / args.threads;
    let (reads, writes) = std::thread::scope(|s| -> anyhow::Result<(u64, u64)> {
        let workers: Vec<_> = model
            .chunks_mut(usize::try_from(part).context("part size")?)
            .take(usize::try_from(args.threads).context("threads")?)
            .enumerate()
            .map(|(t, slice)| {
                let pusher = &pusher;
                let bar = &bar;
                let base = part * t as u64;
                s.spawn(move || app_thread(pusher, slice, base, args, t as u64, bar))
            })
            .collect();
        let watch = s.spawn(|| {
            while !bar.is_finished() {
                let p = puller.progress();
                bar.set_message(format!("pulled {}/{} chunks", p.local_chunks, p.chunks));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut totals = (0, 0);
        for w in workers {
            let (r, wr) = w.join().expect("application thread")?;
            totals.0 += r;
            totals.1 += wr;
        }
        bar.finish_and_clear();
        watch.join().expect("progress thread");
        Ok(totals)
    })?;
    let ops_time = started.elapsed();

    pusher.flush().context("pushing the last writes")?;
    puller.wait().context("finishing the background pull")?;
    let total_time = started.elapsed();
    let pull = puller.progress();
    let push = pusher.progress();
    let stats = synced.stats();
    pusher.close().context("closing the background push")?;
    puller.close();

    let mut remote_now = vec![0u8; size_usize];
    remote_memory.read_at(&mut remote_now, 0).context("reading the remote back")?;
    let matches = remote_now == model;

    println!("application: {reads} reads and {writes} writes in {ops_time:.2?}, every read checked");
    println!(
        "pulled:      {} chunks ({}) in {} requests: {} in the background, {} on demand",
        stats.pulled_chunks,
        human(stats.pulled_bytes),
        stats.pull_requests,
        pull.pulled_chunks,
        stats.pulled_chunks.saturating_sub(pull.pulled_chunks)
    );
    println!(
        "pushed:      {} chunks ({}) in {} requests over {} cycles",
        stats.pushed_chunks,
        human(stats.pushed_bytes),
        stats.push_requests,
        push.cycles
    );
    println!("everything local and pushed after {total_time:.2?}");
    if !matches {
        let first = remote_now.iter().zip(&model).position(|(a, b)| a != b).unwrap_or(0);
        bail!("the remote differs from what was written, first at byte {first}");
    }
    println!("check:       the remote equals everything written ({})", human(args.size));
    Ok(())
}

/// Random reads and writes in `model` (this thread's part of the resource, at `base`).
fn app_thread(
    backend: &Pusher,
    model: &mut [u8],
    base: u64,
    args: &Args,
    thread: u64,
    bar: &ProgressBar,
) -> anyhow::Result<(u64, u64)> {
    let mut rng = fastrand::Rng::with_seed(args.seed ^ (thread + 1).wrapping_mul(0x9E37_79B9));
    let len_max = usize::try_from(args.max_io)?.min(model.len());
    let (mut reads, mut writes) = (0, 0);
    let mut buf = vec![0u8; len_max];
    for i in 0..args.ops / args.threads {
        let len = rng.usize(1..=len_max);
        let at = rng.usize(0..=model.len() - len);
        let off = base + at as u64;
        if rng.u8(0..10) < 6 {
            backend.read_at(&mut buf[..len], off).with_context(|| format!("read {len} bytes at {off}"))?;
            if buf[..len] != model[at..at + len] {
                bail!("read {len} bytes at {off} returned wrong data");
            }
            reads += 1;
        } else {
            let data = pattern(args.seed ^ (thread << 32) ^ i, len);
            backend.write_at(&data, off).with_context(|| format!("write {len} bytes at {off}"))?;
            model[at..at + len].copy_from_slice(&data);
            writes += 1;
        }
        bar.inc(1);
    }
    Ok((reads, writes))
}

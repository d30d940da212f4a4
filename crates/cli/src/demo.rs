//! `r3map demo`: a managed mount of an embedded server with a simulated latency, used through its
//! file and a mapping, checked end to end; or the same pipeline in-process (`--pipeline`, or where
//! FUSE is not available).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use r3map_core::Managed;
use r3map_core::backend::Backend;
use r3map_core::backends::Memory;
use r3map_core::layers::Delay;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::pipeline::pusher::PusherOptions;
use r3map_core::pipeline::synced::{SyncedOptions, SyncedStats};
use r3map_mount::{Hooks, ManagedOptions, Mount, MountOptions};
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
};

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
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pull_request: u64,
    /// Time between background pushes.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    push_interval: Duration,
    /// Seed of the random data and operations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the pipeline in-process instead of mounting it (which needs root and /dev/fuse).
    #[arg(long)]
    pipeline: bool,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// `r3map demo`: the mount demo where FUSE is available (root and `/dev/fuse`), the in-process
/// pipeline otherwise or with `--pipeline`.
///
/// # Errors
/// A failed step, or a remote that differs from what was written.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.threads == 0 || args.size < args.threads * args.max_io.max(1) {
        bail!("the resource must hold at least --threads × --max-io bytes");
    }
    if args.pipeline {
        return run_pipeline(args);
    }
    if !r3map_fuse::can_mount() {
        println!(
            "(FUSE needs root and /dev/fuse, which this process lacks: running the in-process pipeline instead)"
        );
        return run_pipeline(args);
    }
    run_mount(args)
}

/// An embedded r3map server (a Unix socket) serves memory behind the simulated latency; a managed
/// FUSE mount of it is used through its file and a mapping, then closed, and the server's memory is
/// compared with everything written.
fn run_mount(args: &Args) -> anyhow::Result<()> {
    let size_usize = usize::try_from(args.size).context("the size does not fit in memory")?;
    let dir = std::env::temp_dir().join(format!("r3map-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("mnt")).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = mount_demo(args, size_usize, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn mount_demo(args: &Args, size_usize: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut model = pattern(args.seed, size_usize);
    let served = Arc::new(Memory::from_bytes(&model));
    let export = Export::new("default", Arc::new(Delay::new(served.clone(), args.latency)));
    let socket = dir.join("server.sock");
    let server = ServerHandle::start_unix(
        Server::new(ServerConfig::new(export, ServerSecurity::Plaintext)).context("server")?,
        &socket,
    )
    .context("starting the embedded server")?;
    println!(
        "server:  {} of memory on {} behind {:?} per call",
        human(args.size),
        socket.display(),
        args.latency
    );
    let remote = RemoteBackend::connect(Address::Unix(socket), ClientOptions::new(ClientSecurity::Plaintext))
        .context("connecting to the embedded server")?;
    let managed = ManagedOptions {
        chunk_size: args.chunk_size,
        pull_depth: args.pull_depth,
        pull_request: args.pull_request,
        push_interval: args.push_interval,
        ..ManagedOptions::default()
    };
    let mount = Mount::managed(
        Arc::new(remote),
        Arc::new(Memory::new(args.size)),
        &dir.join("mnt"),
        &MountOptions::default(),
        managed,
        Hooks::default(),
    )
    .context("mounting")?;
    println!("mount:   managed, {} in {:.1?}", mount.file_path().display(), mount.opened_in());

    let file = r3map_core::File::open(mount.file_path()).context("opening the mount's file")?;
    let t = Instant::now();
    let mut first = vec![0u8; 4096];
    file.read_at(&mut first, args.chunk_size).context("first read")?;
    println!("first 4 KiB read through the file: {:.1?}", t.elapsed());

    let synced = Arc::clone(mount.synced().expect("a managed mount"));
    let started = Instant::now();
    let (reads, writes) = run_app(&file, &mut model, args, || {
        let s = synced.stats();
        format!("pulled {}/{} chunks", s.local_chunks, s.chunks)
    })?;
    let ops_time = started.elapsed();
    {
        let mut map = mount.map().context("mapping the mount")?;
        let at = size_usize / 2;
        map[at..at + 4096].fill(0x5a);
        model[at..at + 4096].fill(0x5a);
        map.flush().context("msync")?;
    }
    println!(
        "application: {reads} reads and {writes} writes through the file in {ops_time:.2?}, every read checked; one page written through a mapping"
    );
    mount.sync().context("sync")?;
    mount.wait_pulled().context("background pull")?;
    let stats = synced.stats();
    drop((file, synced));
    mount.close().context("closing the mount")?;
    server.shutdown().context("stopping the server")?;
    report(&stats, started.elapsed());
    compare(&served, &model)
}

fn report(stats: &SyncedStats, total: Duration) {
    println!(
        "pulled:  {} chunks ({}) in {} requests",
        stats.pulled_chunks,
        human(stats.pulled_bytes),
        stats.pull_requests
    );
    println!(
        "pushed:  {} chunks ({}) in {} requests",
        stats.pushed_chunks,
        human(stats.pushed_bytes),
        stats.push_requests
    );
    println!("everything local and pushed after {total:.2?}");
}

fn compare(remote: &Memory, model: &[u8]) -> anyhow::Result<()> {
    let mut now = vec![0u8; model.len()];
    remote.read_at(&mut now, 0).context("reading the remote back")?;
    if now != model {
        let first = now.iter().zip(model).position(|(a, b)| a != b).unwrap_or(0);
        bail!("the remote differs from what was written, first at byte {first}");
    }
    println!("check:   the remote equals everything written ({})", human(model.len() as u64));
    Ok(())
}

/// The managed stack in-process, without the kernel.
fn run_pipeline(args: &Args) -> anyhow::Result<()> {
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
    let options = r3map_core::ManagedOptions {
        synced: SyncedOptions { chunk_size: args.chunk_size, ..SyncedOptions::default() },
        pull: Some(PullerOptions {
            depth: args.pull_depth,
            request_size: args.pull_request,
            ..PullerOptions::default()
        }),
        push: Some(PusherOptions { interval: args.push_interval, ..PusherOptions::default() }),
    };

    let started = Instant::now();
    let managed = Managed::start(remote, local, options).context("building the managed stack")?;
    let puller = managed.puller().context("the background pull")?;
    let backend = managed.backend();
    let (reads, writes) = run_app(backend.as_ref(), &mut model, args, || {
        let p = puller.progress();
        format!("pulled {}/{} chunks", p.local_chunks, p.chunks)
    })?;
    println!(
        "application: {reads} reads and {writes} writes in {:.2?}, every read checked",
        started.elapsed()
    );
    backend.flush().context("pushing the last writes")?;
    puller.wait().context("finishing the background pull")?;
    let pull = puller.progress();
    let stats = managed.synced().stats();
    drop(backend);
    managed.close().context("closing the background push")?;
    report(&stats, started.elapsed());
    println!(
        "         {} chunks pulled in the background, {} on demand",
        pull.pulled_chunks,
        stats.pulled_chunks.saturating_sub(pull.pulled_chunks)
    );
    compare(&remote_memory, &model)
}

/// Application threads doing random reads (checked) and writes on `backend`, each in its own part
/// of the resource, with a progress bar.
fn run_app(
    backend: &(dyn Backend + Sync),
    model: &mut [u8],
    args: &Args,
    progress: impl Fn() -> String + Sync,
) -> anyhow::Result<(u64, u64)> {
    let bar = ProgressBar::new(args.ops);
    bar.set_style(
        ProgressStyle::with_template("{spinner} ops {pos}/{len} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let part = args.size / args.threads;
    std::thread::scope(|s| -> anyhow::Result<(u64, u64)> {
        let workers: Vec<_> = model
            .chunks_mut(usize::try_from(part).context("part size")?)
            .take(usize::try_from(args.threads).context("threads")?)
            .enumerate()
            .map(|(t, slice)| {
                let bar = &bar;
                let base = part * t as u64;
                s.spawn(move || app_thread(backend, slice, base, args, t as u64, bar))
            })
            .collect();
        let watch = s.spawn(|| {
            while !bar.is_finished() {
                bar.set_message(progress());
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut totals = (0, 0);
        let mut failed = None;
        for w in workers {
            match w.join().expect("application thread") {
                Ok((r, wr)) => {
                    totals.0 += r;
                    totals.1 += wr;
                }
                Err(e) => failed = Some(e),
            }
        }
        bar.finish_and_clear();
        watch.join().expect("progress thread");
        failed.map_or(Ok(totals), Err)
    })
}

/// Random reads and writes in `model` (this thread's part of the resource, at `base`).
fn app_thread(
    backend: &(dyn Backend + Sync),
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

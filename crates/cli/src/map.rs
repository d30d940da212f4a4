//! `r3map map`: a backend mapped into this process as a userfaultfd region, used, checked and
//! written back.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use r3map::OpenOptions;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::pipeline::pusher::PusherOptions;
use r3map_region::{Region, RegionOptions, WriteTracking};
use tokio::signal::unix::{SignalKind, signal};

use r3map_core::geometry::to_usize;

use crate::backend_url;
use crate::units::{human, parse_duration, parse_size};

const PAGE: u64 = 4096;

/// The flags of `r3map map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to map: a server, a store or a local backend, as a backend URL.
    #[arg(
        value_name = "BACKEND-URL",
        long_help = backend_url::help("What to map: a server, a store or a local backend:", "")
    )]
    pub remote: String,
    /// Chunk size: what one fault fetches, and the unit of pulling, pushing and write tracking.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// No background pull: chunks arrive only when touched.
    #[arg(long)]
    pub no_pull: bool,
    /// Background pull requests in flight.
    #[arg(long, default_value_t = 16)]
    pub pull_depth: usize,
    /// Largest background pull request (a fault on a chunk in a request in flight waits for the
    /// whole request).
    #[arg(long, default_value = "4MiB", value_parser = parse_size, value_name = "SIZE")]
    pub pull_request: u64,
    /// Fault handler threads.
    #[arg(long, default_value_t = 2)]
    pub handlers: usize,
    /// Time a handler keeps polling for the next fault before it sleeps (0 sleeps at once).
    #[arg(long, default_value = "50us", value_parser = parse_duration, value_name = "DURATION")]
    pub spin: Duration,
    /// Do not read every page after mapping (by default the whole region is read once, in order,
    /// and the time it took is printed).
    #[arg(long)]
    pub no_read: bool,
    /// Write random bytes over this share of the pages (chosen at random), push them and check
    /// that the backend holds them.
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT")]
    pub write_percent: f64,
    /// Keep the region mapped until SIGINT or SIGTERM (with the pull progress), then push and
    /// unmap.
    #[arg(long)]
    pub hold: bool,
    /// Time between background pushes of written pages.
    #[arg(long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub push_interval: Duration,
    /// Seed of the written data and of the pages chosen.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `r3map map`: maps the backend, reads it, optionally writes and checks, and unmaps after a final
/// push.
///
/// # Errors
/// The backend cannot be opened or mapped (userfaultfd needs root or access to
/// `/dev/userfaultfd`), a read or the push failed, or the backend does not hold what was written.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !(0.0..=100.0).contains(&args.write_percent) {
        bail!("--write-percent must be between 0 and 100, not {}", args.write_percent);
    }
    let open = OpenOptions {
        read_only: args.write_percent == 0.0,
        chunk_size: args.chunk_size,
        ..OpenOptions::default()
    };
    let remote = r3map::open(&args.remote, &open)?;
    let backend = remote.backend;
    let size = backend.size();
    let options = RegionOptions {
        chunk_size: args.chunk_size,
        handler_threads: args.handlers,
        spin: args.spin,
        pull: (!args.no_pull).then(|| PullerOptions {
            depth: args.pull_depth,
            request_size: args.pull_request,
            ..PullerOptions::default()
        }),
        push: Some(PusherOptions { interval: args.push_interval, ..PusherOptions::default() }),
        tracking: WriteTracking::Auto,
        ..RegionOptions::default()
    };
    let started = Instant::now();
    let region = Region::open(backend.clone(), options)
        .with_context(|| format!("cannot map {} as a userfaultfd region", remote.description))?;
    println!(
        "mapped {} ({}) at {:p} in {:.1?}; write tracking: {:?}",
        remote.description,
        human(size),
        region.as_ptr(),
        started.elapsed(),
        region.tracking()
    );

    if !args.no_read && size > 0 {
        let t = Instant::now();
        let first = region.read_u8(0).context("reading the first byte")?;
        let first_after = t.elapsed();
        let bar = progress(size / PAGE, "pages read");
        let mut sum = u64::from(first);
        for page in 1..size.div_ceil(PAGE) {
            sum = sum.wrapping_add(u64::from(region.read_u8(page * PAGE)?));
            if page % 4096 == 0 {
                bar.set_position(page);
            }
        }
        bar.finish_and_clear();
        let took = t.elapsed();
        println!(
            "read every page in {took:.1?} ({:.2} GB/s; first byte after {first_after:.1?}; checksum {sum:#x})",
            gbps(size, took)
        );
    }

    if args.write_percent > 0.0 && size > 0 {
        write_and_check(&region, &*backend, size, args)?;
    }

    if args.hold {
        r3map_net::Io::shared().block_on(hold(&region))?;
    }

    let stats = region.stats();
    region.close().context("closing the region (final push) failed")?;
    println!(
        "closed after {:.1?}: {} faults ({} served by a spinning handler), {} pulled in {} requests, {} pushed",
        started.elapsed(),
        stats.missing_faults,
        stats.spin_hits,
        human(stats.synced.pulled_bytes),
        stats.synced.pull_requests,
        human(stats.synced.pushed_bytes),
    );
    Ok(())
}

/// Writes random pages, pushes them and compares the backend with the region.
fn write_and_check(
    region: &Region,
    backend: &dyn r3map_core::Backend,
    size: u64,
    args: &Args,
) -> anyhow::Result<()> {
    let pages = size.div_ceil(PAGE);
    // The share is a percentage of a page count: far from f64's 53 bits of precision.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let count = ((pages as f64) * args.write_percent / 100.0).ceil() as u64;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut chosen: Vec<u64> = (0..count).map(|_| rng.u64(0..pages)).collect();
    chosen.sort_unstable();
    chosen.dedup();
    let t = Instant::now();
    let mut buf = vec![0u8; to_usize(PAGE)];
    for &page in &chosen {
        let off = page * PAGE;
        let len = to_usize(PAGE.min(size - off));
        rng.fill(&mut buf[..len]);
        region.write(off, &buf[..len])?;
    }
    let wrote = t.elapsed();
    let t = Instant::now();
    let cycle = region.sync().context("pushing the written pages")?;
    let pushed = t.elapsed();
    let (mut mine, mut theirs) = (vec![0u8; buf.len()], vec![0u8; buf.len()]);
    for &page in &chosen {
        let off = page * PAGE;
        let len = to_usize(PAGE.min(size - off));
        region.read(off, &mut mine[..len])?;
        backend.read_at(&mut theirs[..len], off).context("reading the backend back")?;
        if mine[..len] != theirs[..len] {
            bail!("the backend does not hold what was written at byte {off}");
        }
    }
    println!(
        "wrote {} pages in {wrote:.1?}; pushed {} chunks in {} requests in {pushed:.1?}; the backend holds \
         every written page",
        chosen.len(),
        cycle.chunks,
        cycle.requests,
    );
    Ok(())
}

async fn hold(region: &Region) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let chunks = region.synced().geometry().chunks();
    let bar = progress(chunks, "chunks local");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    eprintln!("mapped until SIGINT or SIGTERM");
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                let s = region.synced().stats();
                bar.set_position(s.local_chunks);
                bar.set_message(format!("{} dirty, {} pushed", s.dirty_chunks, s.pushed_chunks));
            }
        }
    }
    bar.finish_and_clear();
    eprintln!("stopping: pushing what was written (send the signal again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => std::process::exit(130),
            _ = sigterm.recv() => std::process::exit(143),
        }
    });
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {{pos}}/{{len}} {what} [{{bar:30}}] {{msg}}"))
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

// Sizes here are far below 2^53 bytes.
#[allow(clippy::cast_precision_loss)]
fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}

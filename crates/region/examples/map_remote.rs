//! Maps a remote resource as a userfaultfd region: a memory backend behind a 10 ms delay per
//! call stands in for a remote over a long link. The first access to a chunk costs one round
//! trip; the background pull (16 requests of 4 MiB in flight) fetches the rest meanwhile.
//!
//! `cargo run --release -p r3map-region --example map_remote -- [MiB]` (default 256). Needs
//! userfaultfd (root, or access to /dev/userfaultfd).

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::backend::Backend;
use r3map_core::backends::Memory;
use r3map_core::layers::Delay;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_region::{Region, RegionOptions};

fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(256);
    let size = mib << 20;
    let memory = Memory::new(size);
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for off in (0..size).step_by(1 << 20) {
        memory.write_at(&block[..(size - off).min(1 << 20) as usize], off)?;
    }
    let remote = Arc::new(Delay::new(memory, Duration::from_millis(10)));
    let options = RegionOptions {
        pull: Some(PullerOptions { depth: 16, request_size: 4 << 20, ..PullerOptions::default() }),
        ..RegionOptions::default()
    };
    let t = Instant::now();
    let region = Region::open(remote, options)?;
    let first = region.read_u8(size / 2)?;
    println!("first byte from the middle ({first}) after {:?}", t.elapsed());
    let mut sum = 0u64;
    for off in (0..size).step_by(4096) {
        sum += u64::from(region.read_u8(off)?);
    }
    let elapsed = t.elapsed();
    println!(
        "every page touched after {elapsed:?}: {:.2} GB/s (byte sum {sum})",
        size as f64 / elapsed.as_secs_f64() / 1e9
    );
    region.write_u64(8, 0xfeed)?;
    println!("stats: {:?}", region.stats());
    region.close()?;
    Ok(())
}

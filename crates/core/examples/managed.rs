//! A managed stack over a slow remote: lazy reads, background pull, background push.
//!
//! `cargo run --release -p r3map-core --example managed`

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::pipeline::pusher::PusherOptions;
use r3map_core::pipeline::synced::SyncedOptions;
use r3map_core::{Backend, Delay, Memory, Puller, Pusher, Synced};

fn main() -> std::io::Result<()> {
    // A 1 GiB "remote" that takes 20 ms per call, and a local cache of the same size.
    let remote_memory = Arc::new(Memory::new(1 << 30));
    let remote = Arc::new(Delay::new(remote_memory.clone(), Duration::from_millis(20)));
    let local = Arc::new(Memory::new(1 << 30));

    let synced = Arc::new(Synced::new(remote, local, SyncedOptions::default())?);
    let puller = Puller::start(synced.clone(), PullerOptions::default())?; // background pull
    let managed = Pusher::start(synced.clone(), PusherOptions::default())?; // background push

    let t = Instant::now();
    let mut buf = [0u8; 4096];
    managed.read_at(&mut buf, 700 << 20)?; // pulls that chunk first unless the puller got there
    println!("first read of a chunk at 700 MiB: {:?}", t.elapsed());

    managed.write_at(b"hello, remote memory", 7)?; // a local write, marked dirty
    managed.flush()?; // pushes everything dirty, then flushes the remote
    let mut check = [0u8; 20];
    remote_memory.read_at(&mut check, 7)?;
    assert_eq!(&check, b"hello, remote memory");

    puller.wait()?; // everything is local now
    println!("all of 1 GiB local after {:?}: {:?}", t.elapsed(), synced.stats());
    managed.close()
}

//! The conformance suite over every backend and the layer stacks r3map builds.

use std::sync::Arc;
use std::time::Duration;

use r3map_core::backend::SharedBackend;
use r3map_core::conformance;
use r3map_core::layers::fault::FaultConfig;
use r3map_core::pipeline::pusher::PusherOptions;
use r3map_core::pipeline::synced::SyncedOptions;
use r3map_core::{Aligned, Chunked, Delay, Dir, FaultInject, File, Locked, Memory, Pusher, Synced, Tracked};

const CS: u64 = 64 * 1024;

fn file(dir: &tempfile::TempDir, name: &str, size: u64) -> File {
    File::create(dir.path().join(name), size).unwrap()
}

fn chunk_dir(dir: &tempfile::TempDir, name: &str, size: u64) -> Dir {
    Dir::open(dir.path().join(name), size, CS, 16).unwrap()
}

fn synced_opts() -> SyncedOptions {
    SyncedOptions { chunk_size: CS, ..SyncedOptions::default() }
}

fn manual_push() -> PusherOptions {
    PusherOptions { interval: Duration::from_secs(3600), ..PusherOptions::default() }
}

#[test]
fn memory() {
    conformance::run(&|size| Arc::new(Memory::new(size)));
}

#[test]
fn file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    conformance::run(&|size| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(file(&dir, &format!("f{i}"), size))
    });
}

#[test]
fn dir_backend() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    conformance::run(&|size| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(chunk_dir(&dir, &format!("d{i}"), size))
    });
}

#[test]
fn aligned_over_chunked_stores() {
    conformance::run(&|size| {
        Arc::new(Aligned::new(Chunked::new(Memory::new(size), CS).unwrap(), CS).unwrap())
    });
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    conformance::run(&|size| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = Chunked::new(chunk_dir(&dir, &format!("d{i}"), size), CS).unwrap();
        Arc::new(Aligned::new(store, CS).unwrap())
    });
}

#[test]
fn plain_layers() {
    conformance::run(&|size| {
        let t = Tracked::new(Memory::new(size), CS).unwrap();
        t.track();
        Arc::new(t)
    });
    conformance::run(&|size| Arc::new(Locked::new(Memory::new(size), false)));
    conformance::run(&|size| Arc::new(Delay::new(Memory::new(size), Duration::ZERO)));
    conformance::run(&|size| Arc::new(FaultInject::new(Memory::new(size), FaultConfig::default())));
}

#[test]
fn managed_stack_over_a_chunk_store_with_a_file_cache() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    conformance::run(&|size| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let remote: SharedBackend = Arc::new(
            Aligned::new(Chunked::new(chunk_dir(&dir, &format!("r{i}"), size), CS).unwrap(), CS).unwrap(),
        );
        let local: SharedBackend = Arc::new(file(&dir, &format!("l{i}"), size));
        let synced = Arc::new(Synced::new(remote, local, synced_opts()).unwrap());
        Arc::new(Pusher::start(synced, manual_push()).unwrap())
    });
}

#[test]
fn migration_destination_shape() {
    // Locked over a Synced layer over a Tracked seeder: the stack a leecher builds.
    conformance::run(&|size| {
        let seeder = Tracked::new(Memory::new(size), CS).unwrap();
        seeder.track();
        let synced: SharedBackend =
            Arc::new(Synced::new(Arc::new(seeder), Arc::new(Memory::new(size)), synced_opts()).unwrap());
        let locked = Locked::new(synced, true);
        locked.unlock();
        Arc::new(locked)
    });
}

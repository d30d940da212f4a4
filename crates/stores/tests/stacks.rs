//! The stores as remotes of the layers above them, against real servers: the managed pipeline
//! (pull and push through `Synced`), a managed FUSE mount, and a userfaultfd region, each through
//! the conformance suite. FUSE and userfaultfd need root; those parts say so and are skipped
//! without it.

mod servers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r3map_core::pipeline::pusher::PusherOptions;
use r3map_core::pipeline::synced::SyncedOptions;
use r3map_core::{Backend, File, Memory, Pusher, SharedBackend, Synced, conformance};
use r3map_mount::{Hooks, ManagedOptions, Mount, MountOptions};
use r3map_region::{Region, RegionOptions};

const CHUNK: u64 = 16 * 1024;

/// A fresh prefix per backend, so that each conformance run starts from an empty store.
fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn open(url: &str) -> SharedBackend {
    servers::open_url(url, CHUNK)
}

/// Runs the three stacks over stores made by `store` (a URL for a fresh resource of a size).
fn stacks(store: &dyn Fn(u64) -> String) {
    // The managed pipeline: a local cache pulling from the store and pushing back to it.
    conformance::run(&|size| {
        let local = Arc::new(Memory::new(size));
        let options = SyncedOptions { chunk_size: CHUNK, ..SyncedOptions::default() };
        let synced = Arc::new(Synced::new(open(&store(size)), local, options).unwrap());
        let push = PusherOptions { interval: Duration::from_secs(3600), ..PusherOptions::default() };
        Arc::new(Pusher::start(synced, push).unwrap())
    });

    // A managed mount: the suite goes through the kernel, the mount's file.
    if r3map_fuse::can_mount() {
        let mounts: Mutex<Vec<(Mount, tempfile::TempDir)>> = Mutex::new(Vec::new());
        conformance::run(&|size| {
            let dir = tempfile::tempdir().unwrap();
            let options = ManagedOptions { chunk_size: CHUNK, ..ManagedOptions::default() };
            let local = Arc::new(Memory::new(size));
            let mount = Mount::managed(
                open(&store(size)),
                local,
                dir.path(),
                &MountOptions::default(),
                options,
                Hooks::default(),
            )
            .unwrap();
            let file = Arc::new(File::open(mount.path()).unwrap());
            mounts.lock().unwrap().push((mount, dir));
            file
        });
        for (mount, _dir) in mounts.into_inner().unwrap() {
            mount.close().unwrap();
        }
    } else {
        println!("skipped the managed mount: needs root and /dev/fuse");
    }

    // A region: the suite through memory served by userfaultfd from the store.
    let probe = RegionOptions { pull: None, push: None, chunk_size: CHUNK, ..RegionOptions::default() };
    if Region::open(Arc::new(Memory::new(CHUNK)), probe).is_ok() {
        conformance::run(&|size| {
            let options =
                RegionOptions { pull: None, push: None, chunk_size: CHUNK, ..RegionOptions::default() };
            Arc::new(Region::open(open(&store(size)), options).unwrap()) as SharedBackend
        });
    } else {
        println!("skipped the region: userfaultfd is not available");
    }
}

#[test]
fn redis_under_the_managed_pipeline_a_managed_mount_and_a_region() {
    let Some(server) = servers::redis() else {
        return println!("skipped: redis-server not installed (scripts/test.sh installs it)");
    };
    stacks(&|size| format!("redis://127.0.0.1:{}/0?size={size}&prefix={}:", server.port, unique()));
}

#[test]
fn s3_under_the_managed_pipeline_a_managed_mount_and_a_region() {
    let Some(server) = servers::moto() else {
        return println!("skipped: moto_server not installed (scripts/test.sh installs it)");
    };
    // 64 KiB objects: moto takes some 10 ms per request.
    stacks(&|size| {
        format!("{}&chunk-size=64KiB", servers::s3_url(&server, "stacks", &unique(), "test", size))
    });
}

#[test]
fn a_write_through_a_managed_stack_reaches_the_store() {
    let Some(server) = servers::redis() else {
        return println!("skipped: redis-server not installed (scripts/test.sh installs it)");
    };
    let url = format!("redis://127.0.0.1:{}/0?size=1MiB&prefix={}:", server.port, unique());
    let store = open(&url);
    store.write_at(&[5u8; 4096], 0).unwrap();
    let local = Arc::new(Memory::new(1 << 20));
    let options = SyncedOptions { chunk_size: CHUNK, ..SyncedOptions::default() };
    let synced = Arc::new(Synced::new(Arc::clone(&store), local, options).unwrap());
    let push = PusherOptions { interval: Duration::from_secs(3600), ..PusherOptions::default() };
    let managed = Pusher::start(synced, push).unwrap();
    let mut buf = [0u8; 4];
    managed.read_at(&mut buf, 10).unwrap();
    assert_eq!(buf, [5; 4], "pulled from the store");
    managed.write_at(&[9u8; 100], 3 * CHUNK + 7).unwrap();
    managed.flush().unwrap();
    // A second client of the same keys sees the pushed write.
    let other = open(&url);
    let mut back = [0u8; 100];
    other.read_at(&mut back, 3 * CHUNK + 7).unwrap();
    assert_eq!(back, [9u8; 100]);
}

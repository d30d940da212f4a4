//! Frontends on either side of a migration (they need root: userfaultfd and FUSE; skipped
//! otherwise): a userfaultfd region written through its memory is the source, and FUSE mounts
//! carry the application's file at both ends.

use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::{Backend, Capabilities, Extent, Memory, SharedBackend};
use r3map_migrate::{Leecher, LeecherHooks, LeecherOptions, Source, SourceHooks};
use r3map_mount::{Hooks, Mount, MountOptions};
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
};
use r3map_region::{Region, RegionError, RegionOptions};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 * 1024;

fn random(seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(SIZE).unwrap()];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    data
}

fn serve(backend: SharedBackend, seeder: Arc<dyn r3map_core::Seeder>) -> ServerHandle {
    let export =
        Export::new("default", backend).with_seeder(seeder).with_chunk_size(u32::try_from(CHUNK).unwrap());
    ServerHandle::start_tcp(
        Server::new(ServerConfig::new(export, ServerSecurity::Plaintext)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap()
}

fn leech(server: &ServerHandle) -> Leecher {
    let address = Address::Tcp { host: "127.0.0.1".into(), port: server.local_addr().unwrap().port() };
    let remote =
        Arc::new(RemoteBackend::connect(address, ClientOptions::new(ClientSecurity::Plaintext)).unwrap());
    let options = LeecherOptions {
        puller: PullerOptions { depth: 4, request_size: 1 << 20, ..PullerOptions::default() },
        ..LeecherOptions::default()
    };
    Leecher::open(remote, Arc::new(Memory::new(SIZE)), options, LeecherHooks::default()).unwrap()
}

fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(b.size()).unwrap()];
    b.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn a_region_written_through_memory_is_migrated() {
    let remote = Arc::new(Memory::with_page_size(SIZE, CHUNK).unwrap());
    remote.write_at(&random(1), 0).unwrap();
    let options = RegionOptions { chunk_size: CHUNK, ..RegionOptions::default() };
    let region = match Region::open(remote, options) {
        Ok(r) => Arc::new(r),
        Err(RegionError::Unavailable(e)) => return println!("skipped: {e}"),
        Err(e) => panic!("{e}"),
    };
    region.wait_pulled().unwrap();
    let server = serve(region.clone(), region.clone());
    // The application writes through the mapping while the destination copies.
    let stop = Arc::new(AtomicBool::new(false));
    let (app_region, app_stop) = (Arc::clone(&region), Arc::clone(&stop));
    let app = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(2);
        while !app_stop.load(Ordering::SeqCst) {
            let off = rng.u64(..SIZE / 8) * 8;
            app_region.write_u64(off, rng.u64(..)).unwrap();
        }
    });
    let leecher = leech(&server);
    let rounds = leecher.precopy().unwrap();
    // Suspend the application, then take over.
    stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    let finalized = leecher.finalize().unwrap();
    let expected = contents(&*region);
    assert!(contents(&*leecher.backend()) == expected, "rounds {rounds:?}, final {}", finalized.dirty.len());
    leecher.wait().unwrap();
    leecher.close().unwrap();
}

#[test]
fn an_application_file_on_a_mount_moves_to_a_mount() {
    if !r3map_fuse::can_mount() {
        return println!("skipped: needs root and /dev/fuse");
    }
    let dir = tempfile::tempdir().unwrap();
    let (mnt_a, mnt_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&mnt_a).unwrap();
    std::fs::create_dir(&mnt_b).unwrap();

    // The source: the application's file is a mount of a Source; its suspend hook flushes the
    // application's writes out of the page cache and stops it.
    let memory = Arc::new(Memory::new(SIZE));
    memory.write_at(&random(3), 0).unwrap();
    let app_file: Arc<Mutex<Option<std::fs::File>>> = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&app_file);
    let hooks = SourceHooks {
        before_sync: Some(Box::new(move || {
            // Taking the file stops the application (it writes only while it holds it).
            if let Some(file) = slot.lock().unwrap().take() {
                file.sync_all()?;
            }
            Ok(())
        })),
        ..SourceHooks::default()
    };
    let source = Arc::new(Source::new(Arc::clone(&memory), CHUNK, hooks).unwrap());
    let mount_a = Mount::direct(source.clone(), &mnt_a, &MountOptions::default(), Hooks::default()).unwrap();
    *app_file.lock().unwrap() = Some(mount_a.open_file().unwrap());
    let server = serve(source.clone(), source.clone());
    let writer_file = Arc::clone(&app_file);
    let app = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(4);
        let block = [0x5au8; 4096];
        loop {
            let guard = writer_file.lock().unwrap();
            let Some(file) = guard.as_ref() else { return };
            file.write_all_at(&block, rng.u64(..SIZE / 4096) * 4096).unwrap();
            drop(guard);
            std::thread::sleep(Duration::from_micros(200));
        }
    });

    // The destination: its mount serves the leecher's view, which blocks until finalize, so
    // nothing stale can enter its page cache.
    let leecher = leech(&server);
    let mount_b =
        Mount::direct(leecher.backend(), &mnt_b, &MountOptions::default(), Hooks::default()).unwrap();
    leecher.precopy().unwrap();
    leecher.finalize().unwrap();
    app.join().unwrap();
    let file_b = mount_b.open_file().unwrap();
    let mut at_b = vec![0u8; usize::try_from(SIZE).unwrap()];
    file_b.read_exact_at(&mut at_b, 0).unwrap();
    assert!(at_b == contents(&*memory), "the destination's file differs from the source's");
    drop(file_b);
    leecher.wait().unwrap();
    mount_b.close().unwrap();
    mount_a.close().unwrap();
    leecher.close().unwrap();
}

/// A backend that counts the reads that reach it, before passing them on.
struct Arrivals<B> {
    inner: B,
    reads: Mutex<u64>,
    changed: Condvar,
}

impl<B> Arrivals<B> {
    fn new(inner: B) -> Self {
        Self { inner, reads: Mutex::new(0), changed: Condvar::new() }
    }

    fn arrived(&self) {
        *self.reads.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    /// Waits until a read has arrived (a watchdog fails the test if none comes).
    fn wait_for_a_read(&self) {
        let (_reads, waited) = self
            .changed
            .wait_timeout_while(self.reads.lock().unwrap(), Duration::from_secs(60), |r| *r == 0)
            .unwrap();
        assert!(!waited.timed_out(), "no read reached the destination's view in 60 s");
    }
}

impl<B: Backend> Backend for Arrivals<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.arrived();
        self.inner.read_at(buf, off)
    }
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.arrived();
        self.inner.read_many(reads)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(off, len)
    }
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.extents(off, len)
    }
}

#[test]
fn a_region_at_the_destination_waits_for_finalize() {
    let memory = Arc::new(Memory::with_page_size(SIZE, CHUNK).unwrap());
    memory.write_at(&random(5), 0).unwrap();
    let source = Arc::new(Source::new(Arc::clone(&memory), CHUNK, SourceHooks::default()).unwrap());
    let server = serve(source.clone(), source.clone());
    let leecher = leech(&server);
    // The application's memory at the destination is a region over the leecher's view: its
    // faults wait until finalize, then are served from what was pulled (or fetched first). The
    // test sees a fault arrive at the view.
    let view = Arc::new(Arrivals::new(leecher.backend()));
    let options = RegionOptions { chunk_size: CHUNK, pull: None, ..RegionOptions::default() };
    let region = match Region::open(view.clone(), options) {
        Ok(r) => Arc::new(r),
        Err(RegionError::Unavailable(e)) => return println!("skipped: {e}"),
        Err(e) => panic!("{e}"),
    };
    let touched = Arc::new(AtomicBool::new(false));
    let (reader_region, flag) = (Arc::clone(&region), Arc::clone(&touched));
    let reader = std::thread::spawn(move || {
        let v = reader_region.read_u8(SIZE - 1).unwrap();
        flag.store(true, Ordering::SeqCst);
        v
    });
    leecher.precopy().unwrap();
    view.wait_for_a_read();
    // The source's application writes once more after the pre-copy, while the access waits:
    // only the final sync carries it, so an access let through early would see the old byte.
    let mut last = [0u8];
    memory.read_at(&mut last, SIZE - 1).unwrap();
    let new = !last[0];
    source.write_at(&[new], SIZE - 1).unwrap();
    assert!(!touched.load(Ordering::SeqCst), "the access waits for finalize");
    leecher.finalize().unwrap();
    assert_eq!(reader.join().unwrap(), new, "the access sees the source's last write");
    assert!(contents(&*region) == contents(&*memory));
    leecher.wait().unwrap();
}

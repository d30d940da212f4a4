//! Region tests. They need userfaultfd (root, or /dev/userfaultfd access); without it each test
//! prints "skipped: <reason>" and passes. Every test runs under a watchdog that aborts the process
//! rather than let a hang go unnoticed.

// Test sizes are a few MiB: `u64 as usize` cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use r3map_core::backend::{Backend, SharedBackend};
use r3map_core::backends::Memory;
use r3map_core::layers::fault::FaultConfig;
use r3map_core::layers::{Delay, FaultInject};
use r3map_core::pipeline::Cache as _;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::pipeline::pusher::PusherOptions;
use r3map_core::{Chunk, Seeder};
use r3map_region::{Region, RegionError, RegionOptions, WriteTracking};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const PAGE: u64 = 4096;

/// Aborts the process if the test is still running after `secs`.
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(name: &'static str, secs: u64) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("watchdog: {name} still running after {secs} s; aborting");
            std::process::abort();
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn on_demand() -> RegionOptions {
    RegionOptions { pull: None, push: None, ..RegionOptions::default() }
}

/// Opens a region, or returns `None` (after printing why) where userfaultfd is unavailable.
fn open(remote: SharedBackend, options: RegionOptions) -> Option<Region> {
    match Region::open(remote, options) {
        Ok(r) => Some(r),
        Err(RegionError::Unavailable(e)) => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening the region failed: {e}"),
    }
}

fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; b.size() as usize];
    b.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn every_page_reads_as_the_backend_from_several_threads() {
    let _w = Watchdog::new("reads", 60);
    let size = 8 * MIB + 5000;
    let data = pattern(1, size as usize);
    let remote = Arc::new(Memory::from_bytes(&data));
    let Some(region) = open(remote, on_demand()) else { return };
    assert!(!region.is_empty() && region.len() == size as usize);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (region, data) = (&region, &data);
            s.spawn(move || {
                // Each thread walks every page from a different start, so threads fault on the
                // same chunks at the same time.
                let pages = size.div_ceil(PAGE);
                for i in 0..pages {
                    let p = (i + t * pages / 4) % pages;
                    let off = (p * PAGE + t * 7).min(size - 1);
                    assert_eq!(region.read_u8(off).unwrap(), data[off as usize], "byte {off}");
                }
            });
        }
    });
    let mut all = vec![0u8; size as usize];
    region.read(0, &mut all).unwrap();
    assert!(all == data, "the region differs from the backend");
    let stats = region.stats();
    assert!(stats.missing_faults >= 1 && stats.synced.pulled_chunks == size.div_ceil(64 * KIB), "{stats:?}");
    region.close().unwrap();
}

#[test]
fn background_pull_fills_everything() {
    let _w = Watchdog::new("pull", 60);
    let size = 16 * MIB + 123;
    let data = pattern(2, size as usize);
    let remote = Arc::new(Memory::from_bytes(&data));
    let options = RegionOptions {
        chunk_size: 256 * KIB,
        pull: Some(PullerOptions { depth: 4, request_size: MIB, ..PullerOptions::default() }),
        ..on_demand()
    };
    let Some(region) = open(remote, options) else { return };
    // Touch the end first: the fault is served while the pull runs from the start.
    assert_eq!(region.read_u8(size - 1).unwrap(), data[size as usize - 1]);
    region.wait_pulled().unwrap();
    assert!(region.synced().is_complete());
    assert!(contents(&region) == data);
    region.close().unwrap();
}

#[test]
fn kernel_mode_accesses_fault_to_the_handlers() {
    let _w = Watchdog::new("kernel-mode", 60);
    let size = 2 * MIB;
    let data = pattern(3, size as usize);
    let Some(region) = open(Arc::new(Memory::from_bytes(&data)), on_demand()) else { return };
    // write(2) FROM missing pages of the region: the kernel reads them, faulting them in.
    let mut out = tempfile::tempfile().unwrap();
    assert_eq!(region.write_to(&out, 0, 100 * KIB, 300 * KIB as usize).unwrap(), 300 * KIB as usize);
    let mut got = Vec::new();
    out.rewind().unwrap();
    out.read_to_end(&mut got).unwrap();
    assert!(got[..] == data[100 * KIB as usize..400 * KIB as usize]);
    // read(2) INTO missing pages of the region: the kernel writes them, faulting them in first.
    let mut input = tempfile::tempfile().unwrap();
    let fresh = pattern(4, 200 * KIB as usize);
    input.write_all(&fresh).unwrap();
    assert_eq!(region.read_from(&input, 0, MIB + 10, fresh.len()).unwrap(), fresh.len());
    let mut back = vec![0u8; fresh.len()];
    region.read(MIB + 10, &mut back).unwrap();
    assert!(back == fresh);
    // The kernel's write is tracked like any other and reaches the remote.
    region.sync().unwrap();
    let remote = region.synced().remote().clone();
    let mut at_remote = vec![0u8; fresh.len()];
    remote.read_at(&mut at_remote, MIB + 10).unwrap();
    assert!(at_remote == fresh);
    region.close().unwrap();
}

#[test]
fn writes_then_sync_leave_the_backend_equal_to_the_region() {
    let _w = Watchdog::new("sync", 60);
    for tracking in [WriteTracking::Async, WriteTracking::Sync] {
        let size = 4 * MIB + 77;
        let remote = Arc::new(Memory::from_bytes(&pattern(5, size as usize)));
        let options = RegionOptions { tracking, ..on_demand() };
        let region = match Region::open(remote.clone(), options) {
            Ok(r) => r,
            Err(RegionError::Unavailable(e)) => return println!("skipped: {e}"),
            Err(RegionError::MissingFeature(f)) => {
                println!("skipped {tracking:?}: {f}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(region.tracking(), tracking);
        let mut rng = fastrand::Rng::with_seed(6);
        for _ in 0..500 {
            let off = rng.u64(0..size - 8);
            region.write_u64(off, rng.u64(..)).unwrap();
        }
        region.write(size - 50, &[7u8; 50]).unwrap();
        region.write_u8(0, 1).unwrap();
        let cycle = region.sync().unwrap();
        assert!(cycle.chunks > 0);
        assert!(contents(&*remote) == contents(&region), "{tracking:?}: the remote differs after sync");
        // Nothing written since: nothing to push.
        assert_eq!(region.sync().unwrap().chunks, 0);
        region.write_u8(size / 2, 9).unwrap();
        region.close().unwrap();
        assert_eq!(contents(&*remote)[(size / 2) as usize], 9, "close pushes the last write");
    }
}

fn check_dirty_set(tracking: WriteTracking, writes: &[u64]) -> Result<(), TestCaseError> {
    let size = 2 * MIB + 3000;
    let remote = Arc::new(Memory::from_bytes(&pattern(7, size as usize)));
    let options = RegionOptions { tracking, chunk_size: 64 * KIB, ..on_demand() };
    let region = match Region::open(remote, options) {
        Ok(r) => r,
        Err(RegionError::Unavailable(_) | RegionError::MissingFeature(_)) => return Ok(()),
        Err(e) => panic!("{e}"),
    };
    // Half the region present before tracking starts; the rest faults in during the writes.
    let mut buf = vec![0u8; MIB as usize];
    region.read(0, &mut buf).unwrap();
    region.write_u8(5, 5).unwrap();
    region.track().unwrap();
    let mut pages = std::collections::BTreeSet::new();
    for &w in writes {
        let off = w % (size - 8);
        region.write_u64(off, w).unwrap();
        pages.insert(off / PAGE);
        pages.insert((off + 7) / PAGE);
    }
    let got: Vec<u64> =
        region.dirty_pages().unwrap().iter().flat_map(|r| r.start / PAGE..r.end.div_ceil(PAGE)).collect();
    let want: Vec<u64> = pages.iter().copied().collect();
    prop_assert_eq!(&got, &want);
    let chunks: Vec<u64> = Seeder::sync(&region).unwrap().into_iter().map(|c| c.0).collect();
    let mut want_chunks: Vec<u64> = want.iter().map(|p| p * PAGE / (64 * KIB)).collect();
    want_chunks.dedup();
    prop_assert_eq!(chunks, want_chunks);
    prop_assert!(!region.is_tracking());
    region.close().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn the_dirty_set_is_exactly_the_written_pages(writes in proptest::collection::vec(any::<u64>(), 0..40)) {
        let _w = Watchdog::new("dirty set", 60);
        check_dirty_set(WriteTracking::Async, &writes)?;
    }
}

#[test]
fn synchronous_write_protect_tracks_the_same_pages() {
    let _w = Watchdog::new("sync wp", 60);
    check_dirty_set(WriteTracking::Sync, &[0, 4095, 4096 * 9 + 3, MIB + 1, 2 * MIB - 5]).unwrap();
    check_dirty_set(WriteTracking::Sync, &[]).unwrap();
}

#[test]
fn a_region_is_a_seeder_and_a_backend() {
    let _w = Watchdog::new("seeder", 60);
    let Some(region) = open(Arc::new(Memory::new(MIB)), on_demand()) else { return };
    let seeder: &dyn Seeder = &region;
    assert_eq!(seeder.chunk_size(), 64 * KIB);
    assert!(seeder.take_dirty().is_err(), "no round without an epoch");
    seeder.track().unwrap();
    region.write_u8(5 * KIB, 1).unwrap();
    // A pre-copy round takes what was written so far, and the epoch goes on.
    assert_eq!(seeder.take_dirty().unwrap(), vec![Chunk(0)]);
    assert!(seeder.take_dirty().unwrap().is_empty());
    assert!(region.is_tracking());
    region.write_u8(70 * KIB, 1).unwrap();
    region.write_at(&[2u8; 10], 200 * KIB).unwrap();
    assert_eq!(seeder.sync().unwrap(), vec![Chunk(1), Chunk(3)]);
    assert!(seeder.sync().unwrap().is_empty(), "an ended epoch reports nothing");
    seeder.close().unwrap();
    region.close().unwrap();
}

#[test]
fn conformance() {
    let _w = Watchdog::new("conformance", 120);
    if Region::open(Arc::new(Memory::new(PAGE)), on_demand()).is_err() {
        return println!("skipped: no userfaultfd");
    }
    r3map_core::conformance::run(&|size| {
        Arc::new(Region::open(Arc::new(Memory::new(size)), on_demand()).unwrap()) as SharedBackend
    });
    r3map_core::conformance::run(&|size| {
        let options = RegionOptions { handler_threads: 1, spin: Duration::ZERO, ..RegionOptions::default() };
        Arc::new(Region::open(Arc::new(Memory::new(size)), options).unwrap()) as SharedBackend
    });
}

#[test]
fn invalidate_fetches_the_chunk_again() {
    let _w = Watchdog::new("invalidate", 60);
    let size = MIB;
    let remote = Arc::new(Memory::from_bytes(&pattern(8, size as usize)));
    let Some(region) = open(remote.clone(), on_demand()) else { return };
    assert_eq!(region.read_u8(3 * 64 * KIB).unwrap(), pattern(8, size as usize)[(3 * 64 * KIB) as usize]);
    let newer = pattern(9, (64 * KIB) as usize);
    remote.write_at(&newer, 3 * 64 * KIB).unwrap();
    // Still the old data: the chunk is local.
    assert_ne!(region.read_u8(3 * 64 * KIB + 1).unwrap(), newer[1]);
    region.invalidate(3..4).unwrap();
    assert!(!region.synced().is_local(Chunk(3)));
    // Through the pointer (a fault), then through `read`.
    assert_eq!(region.read_u8(3 * 64 * KIB + 1).unwrap(), newer[1]);
    let mut back = vec![0u8; newer.len()];
    region.read(3 * 64 * KIB, &mut back).unwrap();
    assert!(back == newer);
    assert!(region.invalidate(0..100).is_err());
    region.close().unwrap();
}

const CHUNK: u64 = 64 * KIB;

#[test]
fn a_fill_never_overwrites_what_the_application_wrote_and_a_write_does() {
    let _w = Watchdog::new("fill and write", 60);
    let data = pattern(30, (4 * CHUNK) as usize);
    let remote = Arc::new(Memory::from_bytes(&data));
    let Some(region) = open(remote, on_demand()) else { return };
    let cache = region.synced().local();
    // The application writes page 3 of chunk 0 through the pointer (the fault fetches the chunk).
    region.write_u64(3 * PAGE + 8, 0x0102_0304_0506_0708).unwrap();
    let mut expected = data[..CHUNK as usize].to_vec();
    expected[(3 * PAGE + 8) as usize..(3 * PAGE + 16) as usize]
        .copy_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes());
    // The fault's thread resumes after its page: a read of the chunk waits for the rest.
    let mut back = vec![0u8; CHUNK as usize];
    region.read(0, &mut back).unwrap();
    let existing = region.stats().existing_bytes;
    // A fill of the chunk (older bytes from the remote) leaves every present page as it is.
    cache.fill(&vec![0xee; CHUNK as usize], 0, None).unwrap();
    region.read(0, &mut back).unwrap();
    assert!(back == expected, "a fill changed a present page");
    assert_eq!(region.stats().existing_bytes - existing, CHUNK);
    // A write replaces the bytes, the application's included.
    let newer = pattern(31, CHUNK as usize);
    cache.write_at(&newer, 0).unwrap();
    region.read(0, &mut back).unwrap();
    assert!(back == newer, "a write left bytes unchanged");
    region.close().unwrap();
}

#[test]
fn a_write_through_the_pipeline_is_pushed_and_reported_in_the_epoch() {
    let _w = Watchdog::new("pipeline write", 60);
    let size = 4 * CHUNK + 100;
    let remote = Arc::new(Memory::from_bytes(&pattern(32, size as usize)));
    let Some(region) = open(remote.clone(), on_demand()) else { return };
    if region.tracking() == WriteTracking::Off {
        return println!("skipped: no write tracking");
    }
    region.track().unwrap();
    // Chunk 1 whole (nothing fetched), the tail chunk whole (its short page padded), and part of
    // chunk 3 (fetched first).
    let whole = pattern(33, CHUNK as usize);
    region.write(CHUNK, &whole).unwrap();
    region.write(4 * CHUNK, &[5u8; 100]).unwrap();
    assert_eq!(region.stats().synced.pulled_chunks, 0, "whole chunks are not fetched");
    region.write(3 * CHUNK + 10, &[6u8; 20]).unwrap();
    assert_eq!(region.stats().synced.pulled_chunks, 1);
    let mut back = vec![0u8; CHUNK as usize];
    region.read(CHUNK, &mut back).unwrap();
    assert!(back == whole);
    // Installed pages are write-protected like filled ones: the epoch still has them.
    assert_eq!(region.dirty_chunks().unwrap(), [Chunk(1), Chunk(3), Chunk(4)]);
    region.sync().unwrap();
    let mut expected = pattern(32, size as usize);
    expected[CHUNK as usize..(2 * CHUNK) as usize].copy_from_slice(&whole);
    expected[(4 * CHUNK) as usize..].fill(5);
    expected[(3 * CHUNK + 10) as usize..(3 * CHUNK + 30) as usize].fill(6);
    assert!(contents(&*remote) == expected, "the remote differs after sync");
    region.close().unwrap();
}

#[test]
fn a_fault_reaches_the_fill_which_installs_the_faulting_page_first() {
    let _w = Watchdog::new("fault first", 60);
    let remote = Arc::new(Memory::from_bytes(&pattern(34, (4 * CHUNK) as usize)));
    let options = RegionOptions { readahead: CHUNK, ..on_demand() };
    let Some(region) = open(remote, options) else { return };
    let whole_chunk = |c: u64| {
        // A read of the whole chunk waits for its fill to be done (the fault's thread resumes
        // after the first page).
        region.read(c * CHUNK, &mut vec![0u8; CHUNK as usize]).unwrap();
        region.stats().copies
    };
    // A fault in the middle of chunk 0: its page, the rest after it, the part before it.
    region.read_u8(5 * PAGE + 1).unwrap();
    assert_eq!(whole_chunk(0), 3);
    // A fault at the start of chunk 2: its page, then the rest.
    region.read_u8(2 * CHUNK).unwrap();
    assert_eq!(whole_chunk(2), 5);
    // No fault: one copy.
    assert_eq!(whole_chunk(3), 6);
    region.close().unwrap();
}

#[test]
fn the_managed_pusher_writes_back_pages_written_through_the_pointer() {
    let _w = Watchdog::new("background write-back", 60);
    let remote = Arc::new(Memory::from_bytes(&pattern(35, (4 * CHUNK) as usize)));
    let push = PusherOptions { interval: Duration::from_millis(5), ..PusherOptions::default() };
    let Some(region) = open(remote.clone(), RegionOptions { push: Some(push), ..on_demand() }) else {
        return;
    };
    if region.tracking() == WriteTracking::Off {
        return println!("skipped: no write tracking");
    }
    region.write_u64(2 * CHUNK + 8, 0xfeed).unwrap();
    // Nothing but the pusher's background cycle (which collects the tracked pages first) writes
    // the remote: the bytes arriving there are the check, however long a cycle takes.
    let mut on_remote = [0u8; 8];
    while on_remote != 0xfeedu64.to_ne_bytes() {
        std::thread::yield_now();
        remote.read_at(&mut on_remote, 2 * CHUNK + 8).unwrap();
    }
    region.close().unwrap();
}

/// A remote whose reads below `limit` are held until [`Stuck::fail_held`] makes them fail: a
/// background pull stays in flight, and unfinished, for as long as the test wants.
struct Stuck {
    inner: Memory,
    limit: u64,
    /// Reads held now, and how many times the held reads were failed.
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Stuck {
    fn new(size: u64, limit: u64) -> Self {
        Self { inner: Memory::new(size), limit, state: Mutex::new((0, 0)), cv: Condvar::new() }
    }

    fn wait_held(&self, n: usize) {
        let _held = self.cv.wait_while(self.state.lock().unwrap(), |s| s.0 < n).unwrap();
    }

    /// Fails the reads held now; later ones are held again.
    fn fail_held(&self) {
        self.state.lock().unwrap().1 += 1;
        self.cv.notify_all();
    }
}

impl Backend for Stuck {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        if off >= self.limit {
            return self.inner.read_at(buf, off);
        }
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        self.cv.notify_all();
        let round = state.1;
        state = self.cv.wait_while(state, |s| s.1 == round).unwrap();
        state.0 -= 1;
        Err(std::io::Error::other("a held read failed on purpose"))
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn dropping_during_a_background_pull_is_clean() {
    let _w = Watchdog::new("drop during pull", 60);
    // Everything below 100 MiB is stuck: the pull never gets there, a fault at 100 MiB does.
    let remote = Arc::new(Stuck::new(256 * MIB, 100 * MIB));
    let pull = PullerOptions {
        depth: 16,
        request_size: 4 * MIB,
        // The pull keeps retrying (it never gives up before the drop) without waiting long.
        max_attempts: u32::MAX,
        retry_backoff: Duration::from_millis(1),
        ..PullerOptions::default()
    };
    let options = RegionOptions { pull: Some(pull), ..RegionOptions::default() };
    let Some(region) = open(Arc::clone(&remote) as SharedBackend, options) else { return };
    assert_eq!(region.read_u8(100 * MIB).unwrap(), 0);
    remote.wait_held(1);
    let progress = region.pull_progress().unwrap();
    assert!(!progress.done && progress.in_flight >= 1, "{progress:?}");
    // Dropped while requests are in flight; they keep failing until the drop has stopped the
    // pull, so it cannot have finished first. The watchdog catches a drop that hangs.
    let (dropped, done) = mpsc::channel();
    std::thread::spawn(move || {
        drop(region);
        let _ = dropped.send(());
    });
    loop {
        remote.fail_held();
        match done.recv_timeout(Duration::from_millis(1)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("dropping the region panicked"),
        }
    }
    // And close while faults are being served from several threads.
    let remote: SharedBackend = Arc::new(Delay::new(Memory::new(64 * MIB), Duration::from_millis(2)));
    let Some(region) = open(remote, on_demand()) else { return };
    std::thread::scope(|s| {
        for t in 0..3 {
            let region = &region;
            s.spawn(move || {
                for i in 0..20u64 {
                    region.read_u8((t * 20 + i) * MIB).unwrap();
                }
            });
        }
    });
    region.close().unwrap();
}

#[test]
fn open_rejects_bad_options() {
    let remote: SharedBackend = Arc::new(Memory::new(MIB));
    let bad = |options: RegionOptions| match Region::open(remote.clone(), options) {
        Err(RegionError::InvalidOptions(msg)) => msg,
        Err(RegionError::Unavailable(_)) => "unavailable".into(),
        other => panic!("{other:?}"),
    };
    assert!(bad(RegionOptions { chunk_size: 1000, ..on_demand() }).contains("multiple of the page size"));
    bad(RegionOptions { handler_threads: 0, ..on_demand() });
    assert!(matches!(
        Region::open(Arc::new(Memory::new(0)), on_demand()),
        Err(RegionError::InvalidOptions(_))
    ));
}

/// What a child process started by [`run_child`] does, selected by `R3MAP_REGION_CHILD`.
#[test]
fn child_scenario() {
    let Ok(scenario) = std::env::var("R3MAP_REGION_CHILD") else { return };
    match scenario.as_str() {
        "sigbus" => {
            // Every remote read fails: after the retries the page is poisoned and the access
            // raises SIGBUS. Reaching the end is the failure.
            let remote = FaultInject::new(
                Memory::new(MIB),
                FaultConfig { fail_after: Some(0), ..FaultConfig::default() },
            );
            let options =
                RegionOptions { fault_retries: 2, fault_backoff: Duration::from_millis(1), ..on_demand() };
            let region = Region::open(Arc::new(remote), options).expect("open");
            // `read` returns the error instead.
            assert!(region.read(0, &mut [0u8; 1]).is_err());
            let _ = region.read_u8(5 * PAGE);
            std::process::exit(3);
        }
        "external-handler" => {
            // Serve the faults of the parent's region, received over a Unix socket, until the
            // parent hangs up.
            let path = std::env::var("R3MAP_REGION_SOCKET").expect("socket path");
            let socket = std::os::unix::net::UnixStream::connect(path).expect("connect");
            let received = r3map_region::external::receive(&socket).expect("receive");
            let remote = Memory::from_bytes(&pattern(11, received.len as usize));
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    // EOF: the parent is done.
                    let _ = (&socket).read(&mut [0u8; 1]);
                    stop.store(true, Ordering::SeqCst);
                });
                let served =
                    r3map_region::external::serve_faults(&received, &remote, 64 * KIB, &stop).unwrap();
                assert!(served > 0);
            });
            std::process::exit(0);
        }
        other => panic!("unknown child scenario {other}"),
    }
}

/// Starts [`child_scenario`] in a child process.
fn spawn_child(scenario: &str, env: &[(&str, &str)]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_scenario", "--nocapture", "--test-threads=1"])
        .env("R3MAP_REGION_CHILD", scenario)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs [`child_scenario`] in a child process; kills it after `timeout`.
fn run_child(scenario: &str, timeout: Duration) -> std::process::ExitStatus {
    wait_child(spawn_child(scenario, &[]), scenario, timeout)
}

fn wait_child(mut child: std::process::Child, scenario: &str, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child scenario {scenario} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_failing_backend_raises_sigbus_instead_of_hanging() {
    if let Err(e) = r3map_sys::Uffd::probe() {
        return println!("skipped: {e}");
    }
    if !r3map_sys::Uffd::probe().unwrap().features.contains(r3map_region::Features::POISON) {
        return println!("skipped: no UFFDIO_POISON");
    }
    let status = run_child("sigbus", Duration::from_secs(60));
    assert_eq!(status.signal(), Some(rustix::process::Signal::BUS.as_raw()), "{status:?}");
}

#[test]
fn an_external_handler_serves_faults_over_scm_rights() {
    let _w = Watchdog::new("external handler", 60);
    let size = 3 * MIB + 100;
    let region = match r3map_region::external::ExternalRegion::new(size) {
        Ok(r) => r,
        Err(RegionError::Unavailable(e)) => return println!("skipped: {e}"),
        Err(e) => panic!("{e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uffd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let child = spawn_child("external-handler", &[("R3MAP_REGION_SOCKET", path.to_str().unwrap())]);
    let (socket, _) = listener.accept().unwrap();
    region.send(&socket).unwrap();
    let want = pattern(11, size as usize);
    // Faults from several threads, served by the other process.
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (region, want) = (&region, &want);
            s.spawn(move || {
                let mut buf = vec![0u8; 10_000];
                let mut off = t * 7777;
                while off + 10_000 <= size {
                    region.read(off, &mut buf).unwrap();
                    assert!(buf[..] == want[off as usize..off as usize + 10_000], "bytes at {off}");
                    off += 150_000;
                }
            });
        }
    });
    let mut all = vec![0u8; size as usize];
    region.read(0, &mut all).unwrap();
    assert!(all == want);
    drop(socket);
    let status = wait_child(child, "external-handler", Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

/// A remote whose reads, while it is closed, take their bytes and then wait for it to open: a
/// pull that has its (soon old) data and is still on its way.
struct HoldAfterRead {
    inner: Memory,
    state: Mutex<(bool, u64)>,
    changed: Condvar,
}

impl HoldAfterRead {
    fn new(inner: Memory) -> Self {
        Self { inner, state: Mutex::new((true, 0)), changed: Condvar::new() }
    }

    fn wait_held(&self, n: u64) {
        let mut s = self.state.lock().unwrap();
        while s.1 < n {
            s = self.changed.wait(s).unwrap();
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
}

impl Backend for HoldAfterRead {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)?;
        let mut s = self.state.lock().unwrap();
        if s.0 {
            s.1 += 1;
            self.changed.notify_all();
            while s.0 {
                s = self.changed.wait(s).unwrap();
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_pull_in_flight_when_invalidated_leaves_no_old_page() {
    let _w = Watchdog::new("stale fill", 60);
    let size = MIB;
    let remote = Arc::new(HoldAfterRead::new(Memory::from_bytes(&pattern(10, size as usize))));
    let Some(region) = open(remote.clone(), on_demand()) else { return };
    let region = Arc::new(region);
    let reader = {
        let region = Arc::clone(&region);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16];
            region.read(3 * CHUNK, &mut buf).map(|()| buf)
        })
    };
    // The reader's pull holds chunk 3's old bytes; the source changes it and invalidates it.
    remote.wait_held(1);
    let newer = pattern(11, CHUNK as usize);
    remote.inner.write_at(&newer, 3 * CHUNK).unwrap();
    region.invalidate(3..4).unwrap();
    remote.open();
    assert_eq!(reader.join().unwrap().unwrap(), newer[..16], "the read fetched the chunk again");
    // The old fill's pages are gone: a fault and a read both find the newer bytes.
    assert_eq!(region.read_u8(3 * CHUNK + 1).unwrap(), newer[1]);
    assert_eq!(region.read_u8(4 * CHUNK - 1).unwrap(), newer[CHUNK as usize - 1]);
    let mut back = vec![0u8; newer.len()];
    region.read(3 * CHUNK, &mut back).unwrap();
    assert!(back == newer);
    let Ok(region) = Arc::try_unwrap(region) else { panic!("the reader is done") };
    region.close().unwrap();
}

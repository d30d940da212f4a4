//! Migrations over the native protocol on loopback: a writer keeps changing the source during
//! pre-copy, and the destination must end up equal to the source's final content; a source that
//! dies before finalize; a chain A → B → C, by hand and with the one-step `Migrator`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use r3map_core::pipeline::puller::PullerOptions;
use r3map_core::{Backend, Chunk, Memory, Seeder, SharedBackend};
use r3map_migrate::{Leecher, LeecherHooks, LeecherOptions, Migrator, Source, SourceHooks, SourcePhase};
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
};
use r3map_testkit::HeldPort;

const SIZE: u64 = 16 << 20;
const CHUNK: u64 = 64 * 1024;

/// How many writes the application has made, for waiting until it writes on.
#[derive(Default)]
struct Progress {
    writes: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    fn add(&self) {
        *self.writes.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    fn count(&self) -> u64 {
        *self.writes.lock().unwrap()
    }

    /// Waits until `n` writes have been made (a watchdog fails the test if they stop coming).
    fn wait_for(&self, n: u64) {
        let (writes, waited) = self
            .changed
            .wait_timeout_while(self.writes.lock().unwrap(), Duration::from_secs(60), |w| *w < n)
            .unwrap();
        assert!(
            !waited.timed_out(),
            "the application stopped writing after {} writes (waited for {n})",
            *writes
        );
    }
}

/// An application writing random 4 KiB blocks to its memory until it is suspended.
struct Writer {
    stopped: Arc<Mutex<bool>>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(target: SharedBackend, seed: u64, hot: u64) -> Self {
        let stopped = Arc::new(Mutex::new(false));
        let progress = Arc::new(Progress::default());
        let (s, w) = (Arc::clone(&stopped), Arc::clone(&progress));
        let thread = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut block = vec![0u8; 4096];
            loop {
                let guard = s.lock().unwrap();
                if *guard {
                    return;
                }
                rng.fill(&mut block);
                // Mostly a hot set of chunks, sometimes anywhere.
                let span = if rng.u8(..) < 200 { hot } else { SIZE };
                let off = rng.u64(..span / 4096) * 4096;
                target.write_at(&block, off).unwrap();
                drop(guard);
                w.add();
                // Pacing, so that the copy gets some of the machine.
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        Self { stopped, progress, thread: Some(thread) }
    }

    /// The source's suspend hook: no write happens after it returns.
    fn suspender(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let stopped = Arc::clone(&self.stopped);
        move || {
            *stopped.lock().unwrap() = true;
            Ok(())
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        *self.stopped.lock().unwrap() = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn random_memory(seed: u64) -> Memory {
    let m = Memory::with_page_size(SIZE, 64 * 1024).unwrap();
    let mut data = vec![0u8; usize::try_from(SIZE).unwrap()];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    m.write_at(&data, 0).unwrap();
    m
}

fn config(backend: SharedBackend, seeder: Arc<dyn Seeder>) -> ServerConfig {
    let export =
        Export::new("default", backend).with_seeder(seeder).with_chunk_size(u32::try_from(CHUNK).unwrap());
    ServerConfig::new(export, ServerSecurity::Plaintext)
}

fn serve<B: Backend + 'static>(source: Arc<Source<B>>) -> ServerHandle {
    ServerHandle::start_tcp(
        Server::new(config(source.clone(), source)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap()
}

/// The source's server on a held port (`r3map_testkit::HeldPort`: the port stays this test's after
/// the server shut down, so the destination's reconnections are refused and cannot reach a server
/// another test started on it).
fn serve_on<B: Backend + 'static>(port: &HeldPort, source: Arc<Source<B>>) -> ServerHandle {
    let config = config(source.clone(), source);
    ServerHandle::start_tcp_listener(Server::new(config).unwrap(), port.listener().unwrap()).unwrap()
}

fn connect(server: &ServerHandle, timeout: Duration) -> Arc<RemoteBackend> {
    let address = Address::Tcp { host: "127.0.0.1".into(), port: server.local_addr().unwrap().port() };
    let mut options = ClientOptions::new(ClientSecurity::Plaintext);
    options.timeout = timeout;
    Arc::new(RemoteBackend::connect(address, options).unwrap())
}

/// A source's seeder operations that wait, each, until the application has written again since
/// the one before: every pre-copy round and the final sync find writes, however the threads are
/// scheduled. Two writes, since the first one counted may have been recorded before the last
/// operation took the dirty set; the next began after it.
struct AfterWrites<B> {
    source: Arc<Source<B>>,
    progress: Arc<Progress>,
    seen: Mutex<u64>,
}

impl<B: Backend> AfterWrites<B> {
    fn wait(&self) {
        self.progress.wait_for(*self.seen.lock().unwrap() + 2);
    }

    fn mark(&self) {
        *self.seen.lock().unwrap() = self.progress.count();
    }
}

impl<B: Backend> Seeder for AfterWrites<B> {
    fn chunk_size(&self) -> u64 {
        self.source.chunk_size()
    }
    fn track(&self) -> io::Result<()> {
        self.source.track()?;
        self.mark();
        Ok(())
    }
    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        self.wait();
        let dirty = self.source.take_dirty()?;
        self.mark();
        Ok(dirty)
    }
    fn sync(&self) -> io::Result<Vec<Chunk>> {
        self.wait();
        self.source.sync()
    }
    fn close(&self) -> io::Result<()> {
        self.source.close()
    }
}

/// A backend whose reads, after the first `free` ones, wait at a gate until the test opens it.
struct GatedReads<B> {
    inner: B,
    gate: Mutex<Gate>,
    changed: Condvar,
}

struct Gate {
    free: usize,
    held: usize,
    open: bool,
}

impl<B: Backend> GatedReads<B> {
    fn new(inner: B, free: usize) -> Self {
        Self { inner, gate: Mutex::new(Gate { free, held: 0, open: false }), changed: Condvar::new() }
    }

    /// Waits until a read is held at the gate (a watchdog fails the test if none comes).
    fn wait_held(&self) {
        let (_gate, waited) = self
            .changed
            .wait_timeout_while(self.gate.lock().unwrap(), Duration::from_secs(60), |g| g.held == 0)
            .unwrap();
        assert!(!waited.timed_out(), "no read reached the held gate in 60 s");
    }

    fn open(&self) {
        self.gate.lock().unwrap().open = true;
        self.changed.notify_all();
    }
}

impl<B: Backend> Backend for GatedReads<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut gate = self.gate.lock().unwrap();
        if gate.free > 0 {
            gate.free -= 1;
        } else if !gate.open {
            gate.held += 1;
            self.changed.notify_all();
            gate = self.changed.wait_while(gate, |g| !g.open).unwrap();
        }
        drop(gate);
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(b.size()).unwrap()];
    b.read_at(&mut buf, 0).unwrap();
    buf
}

fn options() -> LeecherOptions {
    LeecherOptions {
        puller: PullerOptions { depth: 4, request_size: 1 << 20, ..PullerOptions::default() },
        ..LeecherOptions::default()
    }
}

#[test]
fn a_resource_written_during_precopy_arrives_whole() {
    let app_memory = Arc::new(random_memory(1));
    // The hook needs the writer, the writer needs the source: build the source with a hook that
    // reaches the writer through a slot.
    let suspend: Arc<Mutex<Option<r3map_migrate::SourceHook>>> = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&suspend);
    let hooks = SourceHooks {
        before_sync: Some(Box::new(move || slot.lock().unwrap().as_ref().map_or(Ok(()), |f| f()))),
        ..SourceHooks::default()
    };
    let writer_target = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, hooks).unwrap());
    let writer = Writer::start(writer_target.clone(), 2, 1 << 20);
    *suspend.lock().unwrap() = Some(Box::new(writer.suspender()));
    let seeder = Arc::new(AfterWrites {
        source: Arc::clone(&writer_target),
        progress: Arc::clone(&writer.progress),
        seen: Mutex::new(0),
    });
    let server = ServerHandle::start_tcp(
        Server::new(config(writer_target.clone(), seeder)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();

    let after_sync = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&after_sync);
    let hooks = LeecherHooks {
        on_after_sync: Some(Box::new(move |dirty| seen.store(dirty.len() as u64, Ordering::SeqCst))),
        ..LeecherHooks::default()
    };
    let remote = connect(&server, Duration::from_secs(30));
    let leecher = Leecher::open(remote, Arc::new(Memory::new(SIZE)), options(), hooks).unwrap();
    assert!(leecher.backend().is_locked());
    let rounds = leecher.precopy().unwrap();
    assert!(writer.progress.count() > 0, "the application wrote during pre-copy");
    let finalized = leecher.finalize().unwrap();
    assert_eq!(finalized.dirty.len() as u64, after_sync.load(Ordering::SeqCst));
    assert!(
        rounds.iter().any(|r| r.dirty > 0) && !finalized.dirty.is_empty(),
        "chunks were dirtied during the rounds and before the final sync: {rounds:?}, {}",
        finalized.dirty.len()
    );
    assert_eq!(writer_target.phase(), SourcePhase::Synced);
    // Read at once, before the post-copy is done: nothing stale may come back.
    let dest = leecher.backend();
    assert!(!dest.is_locked());
    let expected = contents(&*app_memory);
    assert!(contents(&*dest) == expected, "the destination differs from the source (rounds: {rounds:?})");
    leecher.wait().unwrap();
    let local = leecher.close().unwrap();
    assert_eq!(writer_target.phase(), SourcePhase::Closed);
    assert!(contents(&*local) == expected);
}

#[test]
fn a_source_that_dies_before_finalize_fails_the_destination_only() {
    let app_memory = Arc::new(random_memory(3));
    let source = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, SourceHooks::default()).unwrap());
    let port = HeldPort::new();
    let server = serve_on(&port, Arc::clone(&source));
    let writer = Writer::start(source.clone(), 4, SIZE);
    // The deadline the calls to the gone source fail at.
    let remote = connect(&server, Duration::from_secs(5));
    // A slow pull, so the source goes away in the middle of it.
    let slow = LeecherOptions {
        puller: PullerOptions { depth: 1, request_size: CHUNK, max_attempts: 2, ..PullerOptions::default() },
        ..LeecherOptions::default()
    };
    let leecher = Leecher::open(remote, Arc::new(Memory::new(SIZE)), slow, LeecherHooks::default()).unwrap();
    server.shutdown().unwrap();
    assert!(leecher.precopy().is_err() || leecher.finalize().is_err(), "the migration must fail");
    assert!(leecher.backend().is_locked(), "the destination never went live");
    // The application at the source goes on writing, and its source state was not touched.
    writer.progress.wait_for(writer.progress.count() + 1);
    assert_eq!(source.phase(), SourcePhase::Tracking);
}

#[test]
fn a_chain_a_to_b_to_c() {
    let a_memory = Arc::new(random_memory(5));
    let a = Arc::new(Source::new(Arc::clone(&a_memory), CHUNK, SourceHooks::default()).unwrap());
    let a_server = serve(Arc::clone(&a));
    let b = Leecher::open(
        connect(&a_server, Duration::from_secs(30)),
        Arc::new(Memory::new(SIZE)),
        options(),
        LeecherHooks::default(),
    )
    .unwrap();
    b.precopy().unwrap();
    b.finalize().unwrap();
    // The application runs at B now and writes there.
    let b_view = b.backend();
    b_view.write_at(&[0xbb; 4096], 8192).unwrap();
    b.wait().unwrap();
    let b_local = b.close().unwrap();
    drop(b_view);
    let mut expected = contents(&*a_memory);
    expected[8192..8192 + 4096].fill(0xbb);
    assert!(contents(&*b_local) == expected);

    // B becomes the source of the next hop, on the same local backend.
    let b_source = Arc::new(Source::new(b_local, CHUNK, SourceHooks::default()).unwrap());
    let b_server = serve(Arc::clone(&b_source));
    let c = Leecher::open(
        connect(&b_server, Duration::from_secs(30)),
        Arc::new(Memory::new(SIZE)),
        options(),
        LeecherHooks::default(),
    )
    .unwrap();
    // The application at B writes while C copies.
    b_source.write_at(&[0xcc; 10], SIZE - 10).unwrap();
    c.precopy().unwrap();
    c.finalize().unwrap();
    c.wait().unwrap();
    expected[usize::try_from(SIZE).unwrap() - 10..].fill(0xcc);
    assert!(contents(&*c.backend()) == expected);
    c.close().unwrap();
    assert_eq!(b_source.phase(), SourcePhase::Closed);
}

#[test]
fn a_chain_with_one_backend_for_the_application_at_each_hop() {
    let a_memory = Arc::new(random_memory(17));
    let a = Arc::new(Source::new(Arc::clone(&a_memory), CHUNK, SourceHooks::default()).unwrap());
    let a_server = serve(Arc::clone(&a));
    let suspended_at_b = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&suspended_at_b);
    let next = SourceHooks {
        before_sync: Some(Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
        ..SourceHooks::default()
    };
    let b = Migrator::leech(
        connect(&a_server, Duration::from_secs(30)),
        Arc::new(Memory::new(SIZE)),
        options(),
        LeecherHooks::default(),
        next,
    )
    .unwrap();
    // The application at B has its backend from the start; it is locked until finalize.
    let app_b = b.backend();
    a.write_at(&[0xaa; 100], 4096).unwrap();
    b.leecher().precopy().unwrap();
    b.leecher().finalize().unwrap();
    app_b.write_at(&[0xbb; 4096], 8192).unwrap();
    let b_source = b.seed().unwrap();
    assert_eq!(a.phase(), SourcePhase::Closed, "A was released");
    assert!(Arc::ptr_eq(&b_source, &app_b), "the next hop's source is the application's backend");
    let mut expected = contents(&*a_memory);
    expected[8192..8192 + 4096].fill(0xbb);
    assert!(contents(&*app_b) == expected);

    let b_server = serve(Arc::clone(&b_source));
    let c = Migrator::leech(
        connect(&b_server, Duration::from_secs(30)),
        Arc::new(Memory::new(SIZE)),
        options(),
        LeecherHooks::default(),
        SourceHooks::default(),
    )
    .unwrap();
    // The application at B writes on while C copies, through the same backend.
    app_b.write_at(&[0xcc; 10], SIZE - 10).unwrap();
    c.leecher().precopy().unwrap();
    app_b.write_at(&[0xdd; 3], 5 << 20).unwrap();
    c.leecher().finalize().unwrap();
    expected[usize::try_from(SIZE).unwrap() - 10..].fill(0xcc);
    expected[5 << 20..(5 << 20) + 3].fill(0xdd);
    assert!(contents(&*c.backend()) == expected);
    c.seed().unwrap();
    assert_eq!(b_source.phase(), SourcePhase::Closed, "B was released");
    assert_eq!(suspended_at_b.load(Ordering::SeqCst), 1, "B's application was suspended once");
}

/// A TCP proxy whose connections can be cut, to break the link between the two hosts.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&conns);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(upstream) else { continue };
                let mut list = kept.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, conns }
    }

    /// Breaks every connection through the proxy; new ones are still accepted.
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_link_dropped_during_postcopy_is_reconnected() {
    let app_memory = Arc::new(random_memory(7));
    // After a few chunks, the source holds its reads until the link has been cut.
    let gated = Arc::new(GatedReads::new(Arc::clone(&app_memory), 8));
    let source = Arc::new(Source::new(Arc::clone(&gated), CHUNK, SourceHooks::default()).unwrap());
    let server = serve(Arc::clone(&source));
    let proxy = Proxy::start(server.local_addr().unwrap());
    let address = Address::Tcp { host: "127.0.0.1".into(), port: proxy.port };
    let remote =
        Arc::new(RemoteBackend::connect(address, ClientOptions::new(ClientSecurity::Plaintext)).unwrap());
    let options = LeecherOptions {
        puller: PullerOptions { depth: 2, request_size: CHUNK, ..PullerOptions::default() },
        ..LeecherOptions::default()
    };
    let leecher =
        Leecher::open(remote, Arc::new(Memory::new(SIZE)), options, LeecherHooks::default()).unwrap();
    // Finalize at once: almost everything arrives in the post-copy.
    leecher.finalize().unwrap();
    // A read of the post-copy is at the source when the link breaks: its answer is lost with
    // the connection, and the destination must ask again on a new one.
    gated.wait_held();
    let before = leecher.progress().local_chunks;
    proxy.cut();
    gated.open();
    leecher.wait().unwrap();
    assert!(before < leecher.progress().chunks, "the link was cut during the post-copy");
    let expected = contents(&*app_memory);
    assert!(contents(&*leecher.backend()) == expected);
    leecher.close().unwrap();
    assert_eq!(source.phase(), SourcePhase::Closed);
}

#[test]
fn a_migration_over_tls_with_client_certificates() {
    use r3map_net::certs::Authority;
    let ca = Authority::new("migration CA").unwrap();
    let server_pem = ca.server(&["localhost"]).unwrap();
    let client_pem = ca.client("destination").unwrap();
    let app_memory = Arc::new(random_memory(9));
    let source = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, SourceHooks::default()).unwrap());
    let writer = Writer::start(source.clone(), 10, 4 << 20);
    let config = r3map_net::server_tls(
        server_pem.cert.as_bytes(),
        server_pem.key.as_bytes(),
        Some(ca.pem().cert.as_bytes()),
    )
    .unwrap();
    let export = Export::new("default", source.clone())
        .with_seeder(source.clone())
        .with_chunk_size(u32::try_from(CHUNK).unwrap());
    let server = ServerHandle::start_tcp(
        Server::new(ServerConfig::new(export, ServerSecurity::Tls(config))).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let tls = r3map_net::client_tls(
        ca.pem().cert.as_bytes(),
        Some((client_pem.cert.as_bytes(), client_pem.key.as_bytes())),
    )
    .unwrap();
    let address = Address::Tcp { host: "localhost".into(), port: server.local_addr().unwrap().port() };
    let remote = Arc::new(
        RemoteBackend::connect(
            address,
            ClientOptions::new(ClientSecurity::Tls { config: tls, server_name: None }),
        )
        .unwrap(),
    );
    let hooks = LeecherHooks::default();
    let leecher = Leecher::open(remote, Arc::new(Memory::new(SIZE)), options(), hooks).unwrap();
    leecher.precopy().unwrap();
    // The source's application stops (here by hand: this source has no suspend hook).
    drop(writer);
    leecher.finalize().unwrap();
    assert!(contents(&*leecher.backend()) == contents(&*app_memory));
    leecher.wait().unwrap();
    leecher.close().unwrap();
}

#[test]
fn a_source_lost_for_good_during_postcopy_is_reported() {
    let app_memory = Arc::new(random_memory(11));
    // After a few chunks, the source answers no more reads: the post-copy cannot finish.
    let gated = Arc::new(GatedReads::new(Arc::clone(&app_memory), 8));
    let source = Arc::new(Source::new(Arc::clone(&gated), CHUNK, SourceHooks::default()).unwrap());
    let port = HeldPort::new();
    let server = serve_on(&port, Arc::clone(&source));
    // The deadline the calls to the gone source fail at.
    let remote = connect(&server, Duration::from_secs(5));
    let options = LeecherOptions {
        puller: PullerOptions {
            depth: 2,
            request_size: CHUNK,
            max_attempts: 2,
            retry_backoff: Duration::from_millis(10),
            ..PullerOptions::default()
        },
        ..LeecherOptions::default()
    };
    let leecher =
        Leecher::open(remote, Arc::new(Memory::new(SIZE)), options, LeecherHooks::default()).unwrap();
    leecher.finalize().unwrap();
    // The source goes away in the middle of the post-copy. Its shutdown waits for the reads it
    // holds, which are let go only once the destination gave up on them.
    gated.wait_held();
    let shutdown = std::thread::spawn(move || server.shutdown());
    // The post-copy cannot finish: waiting reports it, reads of chunks that never arrived fail
    // (never zeroes or stale data), and the migration cannot be closed as if it had succeeded.
    assert!(leecher.wait().is_err());
    gated.open();
    shutdown.join().unwrap().unwrap();
    let mut buf = vec![0u8; 4096];
    let last = SIZE - 4096;
    match leecher.backend().read_at(&mut buf, last) {
        Ok(()) => {
            let mut expected = vec![0u8; 4096];
            app_memory.read_at(&mut expected, last).unwrap();
            assert_eq!(buf, expected, "a chunk that did arrive is correct");
        }
        // Failing is right: the source is gone and the chunk never arrived.
        Err(e) => assert_ne!(e.kind(), io::ErrorKind::InvalidInput, "{e}"),
    }
    assert!(leecher.close().is_err());
}

#[test]
fn a_migration_over_the_go_r3map_grpc_services() {
    use r3map_grpc::{GrpcClientOptions, GrpcExport, GrpcSeeder, GrpcServer};
    let app_memory = Arc::new(random_memory(13));
    let source = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, SourceHooks::default()).unwrap());
    let backend: SharedBackend = source.clone();
    let export = GrpcExport { seeder: Some(source.clone()), ..GrpcExport::new(backend) };
    let server = GrpcServer::start("127.0.0.1:0".parse().unwrap(), export).unwrap();
    let endpoint = format!("http://{}", server.local_addr());
    let seeder = Arc::new(GrpcSeeder::connect(&endpoint, CHUNK, GrpcClientOptions::default()).unwrap());
    let data: SharedBackend = Arc::new(seeder.source(SIZE));
    let leecher =
        Leecher::open_parts(data, seeder, Arc::new(Memory::new(SIZE)), options(), LeecherHooks::default())
            .unwrap();
    // The application writes through the source after tracking started.
    source.write_at(&[7u8; 100], 4 << 20).unwrap();
    // The Go services have no pre-copy rounds: one wait, then the final sync carries it all.
    let rounds = leecher.precopy().unwrap();
    assert!(rounds.is_empty(), "{rounds:?}");
    let finalized = leecher.finalize().unwrap();
    assert_eq!(finalized.dirty, vec![r3map_core::Chunk((4 << 20) / CHUNK)]);
    leecher.wait().unwrap();
    assert!(contents(&*leecher.backend()) == contents(&*app_memory));
    leecher.close().unwrap();
    assert_eq!(source.phase(), SourcePhase::Closed);
}

#[test]
fn a_failed_final_sync_leaves_the_destination_locked_and_can_be_retried() {
    let app_memory = Arc::new(random_memory(15));
    let attempts = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&attempts);
    let hooks = SourceHooks {
        before_sync: Some(Box::new(move || {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(io::Error::other("the application could not be suspended"))
            } else {
                Ok(())
            }
        })),
        ..SourceHooks::default()
    };
    let source = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, hooks).unwrap());
    let server = serve(Arc::clone(&source));
    let leecher = Leecher::open(
        connect(&server, Duration::from_secs(30)),
        Arc::new(Memory::new(SIZE)),
        options(),
        LeecherHooks::default(),
    )
    .unwrap();
    leecher.precopy().unwrap();
    source.write_at(&[9u8; 64], 3 << 20).unwrap();
    let err = leecher.finalize().unwrap_err();
    assert!(err.to_string().contains("could not be suspended"), "{err}");
    assert!(leecher.backend().is_locked(), "no downtime began: the destination stays locked");
    assert_eq!(source.phase(), SourcePhase::Tracking, "the source runs on");
    // The write made before the failed attempt is still in the dirty set of the next one.
    let finalized = leecher.finalize().unwrap();
    assert!(finalized.dirty.contains(&r3map_core::Chunk((3 << 20) / CHUNK)));
    leecher.wait().unwrap();
    assert!(contents(&*leecher.backend()) == contents(&*app_memory));
    leecher.close().unwrap();
}

#[test]
fn a_final_sync_whose_answer_is_lost_is_asked_for_again() {
    let app_memory = Arc::new(random_memory(16));
    let proxy: Arc<Mutex<Option<Proxy>>> = Arc::new(Mutex::new(None));
    let (cutter, suspends) = (Arc::clone(&proxy), Arc::new(AtomicU64::new(0)));
    let counted = Arc::clone(&suspends);
    let hooks = SourceHooks {
        // The link breaks while the source suspends: the answer to this sync never arrives.
        before_sync: Some(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            cutter.lock().unwrap().as_ref().expect("the proxy").cut();
            Ok(())
        })),
        ..SourceHooks::default()
    };
    let source = Arc::new(Source::new(Arc::clone(&app_memory), CHUNK, hooks).unwrap());
    let server = serve(Arc::clone(&source));
    let port = {
        let p = Proxy::start(server.local_addr().unwrap());
        let port = p.port;
        *proxy.lock().unwrap() = Some(p);
        port
    };
    let address = Address::Tcp { host: "127.0.0.1".into(), port };
    let remote =
        Arc::new(RemoteBackend::connect(address, ClientOptions::new(ClientSecurity::Plaintext)).unwrap());
    let leecher =
        Leecher::open(remote, Arc::new(Memory::new(SIZE)), options(), LeecherHooks::default()).unwrap();
    leecher.precopy().unwrap();
    source.write_at(&[7u8; 100], 5 << 20).unwrap();
    let finalized = leecher.finalize().unwrap();
    assert_eq!(finalized.dirty, vec![r3map_core::Chunk((5 << 20) / CHUNK)], "the lost answer, asked again");
    assert_eq!(suspends.load(Ordering::SeqCst), 1, "the source suspended once");
    leecher.wait().unwrap();
    assert!(contents(&*leecher.backend()) == contents(&*app_memory));
    leecher.close().unwrap();
    assert_eq!(source.phase(), SourcePhase::Closed);
}

#[test]
fn a_source_writing_faster_than_the_link_still_finishes() {
    use r3map_core::Delay;
    let app_memory = Arc::new(random_memory(17));
    // 5 ms per read at the source and one 64 KiB request at a time: the copy is far slower than
    // the writer, which rewrites chunks all over the resource.
    let slow = Delay::new(Arc::clone(&app_memory), Duration::from_millis(5));
    let source = Arc::new(Source::new(slow, CHUNK, SourceHooks::default()).unwrap());
    let server = serve(Arc::clone(&source));
    let writer = Writer::start(source.clone(), 18, SIZE);
    let options = LeecherOptions {
        puller: PullerOptions { depth: 1, request_size: CHUNK, ..PullerOptions::default() },
        max_rounds: 2,
        ..LeecherOptions::default()
    };
    let leecher = Arc::new(
        Leecher::open(
            connect(&server, Duration::from_secs(30)),
            Arc::new(Memory::new(SIZE)),
            options,
            LeecherHooks::default(),
        )
        .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let l = Arc::clone(&leecher);
    std::thread::spawn(move || tx.send(l.precopy().map(|r| r.len())).unwrap());
    let rounds = rx.recv_timeout(Duration::from_secs(120)).expect("the pre-copy ends").unwrap();
    assert!(rounds <= 2);
    drop(writer);
    leecher.finalize().unwrap();
    leecher.wait().unwrap();
    assert!(contents(&*leecher.backend()) == contents(&*app_memory));
}

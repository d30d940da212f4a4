//! The `Backend` service: conformance through our client, the server's limits and range rules
//! seen by a raw client, and concurrency.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Memory, conformance};
use r3map_grpc::proto::mount::backend_client::BackendClient;
use r3map_grpc::proto::mount::{ReadAtArgs, SyncArgs, WriteAtArgs};
use r3map_grpc::{DEFAULT_MAX_READ, GrpcBackend, GrpcClientOptions, GrpcExport, GrpcServer};
use tonic::Code;

use r3map_testkit::HeldPort;

use crate::{Served, any_port, http, runtime, shared};

#[test]
fn conformance_with_default_options() {
    conformance::run(&|size| shared(Served::memory(size, GrpcClientOptions::default())));
}

#[test]
fn conformance_with_reads_and_writes_split_into_many_calls() {
    let options = GrpcClientOptions { max_read: 65_537, max_write: 100_000, ..GrpcClientOptions::default() };
    conformance::run(&|size| shared(Served::memory(size, options.clone())));
}

#[test]
fn reads_and_writes_larger_than_tonics_default_limit_pass() {
    // 40 MiB: more than the 4 MiB tonic allows by default, and more than one 32 MiB call.
    let size = 40 << 20;
    let served = Served::memory(size, GrpcClientOptions::default());
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    served.write_at(&data, 0).unwrap();
    let mut back = vec![0u8; data.len()];
    served.read_at(&mut back, 0).unwrap();
    assert!(back == data, "40 MiB read back differs");
    served.flush().unwrap();
}

#[test]
fn the_server_refuses_oversize_reads_with_a_clear_error() {
    let memory = Arc::new(Memory::new(1 << 20));
    let export = GrpcExport { max_read: 4096, ..GrpcExport::new(memory) };
    let server = GrpcServer::start(any_port(), export).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut raw = BackendClient::connect(http(&server)).await.unwrap();
        let err = raw.read_at(ReadAtArgs { length: 4097, off: 0 }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("max chunk size exceeded"), "{err:?}");
        assert!(err.message().contains("4097") && err.message().contains("4096"), "{err:?}");
        let err = raw.read_at(ReadAtArgs { length: -1, off: 0 }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("negative"), "{err:?}");
        let err = raw.read_at(ReadAtArgs { length: 1, off: -5 }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let ok = raw.read_at(ReadAtArgs { length: 4096, off: 0 }).await.unwrap().into_inner();
        assert_eq!((ok.n, ok.p.len()), (4096, 4096));
    });
    // Our client against that server, asking for more than the server takes: a clear error.
    let options = GrpcClientOptions { max_read: 8192, ..GrpcClientOptions::default() };
    let client = GrpcBackend::connect(&http(&server), 1 << 20, options).unwrap();
    let err = client.read_at(&mut [0u8; 8192], 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("max chunk size exceeded"), "{err}");
    drop(client);
    drop(rt); // closes the raw client's connection, which the graceful shutdown waits for
    server.shutdown().unwrap();
}

#[test]
fn a_client_that_never_closes_its_connection_delays_shutdown_by_the_grace_period_only() {
    let export = GrpcExport {
        shutdown_grace: Duration::from_millis(300),
        ..GrpcExport::new(Arc::new(Memory::new(8)))
    };
    let server = GrpcServer::start(any_port(), export).unwrap();
    let rt = runtime();
    // After this block_on nothing drives the connection: it never answers the server's GOAWAY.
    let _raw = rt.block_on(async {
        let mut raw = BackendClient::connect(http(&server)).await.unwrap();
        raw.sync(SyncArgs {}).await.unwrap();
        raw
    });
    let started = Instant::now();
    let (done, shut) = mpsc::channel();
    std::thread::spawn(move || done.send((server.shutdown(), started.elapsed())));
    // A watchdog, not a measurement: without the grace period the shutdown would wait forever.
    let Ok((result, took)) = shut.recv_timeout(Duration::from_secs(60)) else {
        panic!("the shutdown still waits for the client 60 s into a grace period of 300 ms");
    };
    result.unwrap();
    assert!(took >= Duration::from_millis(250), "shutdown took {took:?}: it did not wait for the client");
}

#[test]
fn the_default_server_refuses_reads_over_32_mib() {
    let server = GrpcServer::start(any_port(), GrpcExport::new(Arc::new(Memory::new(1 << 20)))).unwrap();
    runtime().block_on(async {
        let mut raw = BackendClient::connect(http(&server)).await.unwrap();
        let length = i32::try_from(DEFAULT_MAX_READ + 1).unwrap();
        let err = raw.read_at(ReadAtArgs { length, off: 0 }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    });
}

#[test]
fn reads_and_writes_at_the_end_follow_the_documented_rules() {
    let size = 10_000u64;
    let memory = Arc::new(Memory::new(size));
    memory.write_at(&[7u8; 100], size - 100).unwrap();
    let server = GrpcServer::start(any_port(), GrpcExport::new(memory.clone())).unwrap();
    runtime().block_on(async {
        let mut raw = BackendClient::connect(http(&server)).await.unwrap();
        // Starts inside, crosses the end: the bytes that exist.
        let reply = raw.read_at(ReadAtArgs { length: 300, off: 9_900 }).await.unwrap().into_inner();
        assert_eq!(reply.n, 100);
        assert_eq!(&reply.p[..], &[7u8; 100][..]);
        // Starts at or past the end: out of range.
        for off in [10_000, 10_001, i64::MAX] {
            let err = raw.read_at(ReadAtArgs { length: 1, off }).await.unwrap_err();
            assert_eq!(err.code(), Code::OutOfRange, "read at {off}: {err:?}");
        }
        // Empty reads up to the end answer nothing.
        let reply = raw.read_at(ReadAtArgs { length: 0, off: 10_000 }).await.unwrap().into_inner();
        assert_eq!((reply.n, reply.p.len()), (0, 0));
        // Writes with any byte past the end are refused and change nothing.
        for (off, len) in [(9_999i64, 2usize), (10_000, 1), (i64::MAX, 1)] {
            let err = raw
                .write_at(WriteAtArgs { off, p: vec![9u8; len].into() })
                .await
                .expect_err("write past end");
            assert_eq!(err.code(), Code::OutOfRange, "write at {off}+{len}: {err:?}");
        }
        let err = raw.write_at(WriteAtArgs { off: -1, p: vec![1].into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let reply =
            raw.write_at(WriteAtArgs { off: 9_998, p: vec![1, 2].into() }).await.unwrap().into_inner();
        assert_eq!(reply.length, 2);
        raw.sync(SyncArgs {}).await.unwrap();
    });
    let mut tail = [0u8; 3];
    memory.read_at(&mut tail, size - 3).unwrap();
    assert_eq!(tail, [7, 1, 2]);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let memory = Arc::new(Memory::new(4096));
    let export = GrpcExport { read_only: true, ..GrpcExport::new(memory.clone()) };
    let server = GrpcServer::start(any_port(), export).unwrap();
    let client = GrpcBackend::connect(&http(&server), 4096, GrpcClientOptions::default()).unwrap();
    let err = client.write_at(&[1u8; 10], 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("read-only"), "{err}");
    let mut buf = [1u8; 10];
    client.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 10]);
    client.flush().unwrap();
}

#[test]
fn a_client_given_a_larger_size_than_the_server_gets_an_error_not_zeroes() {
    let server = GrpcServer::start(any_port(), GrpcExport::new(Arc::new(Memory::new(4096)))).unwrap();
    let client = GrpcBackend::connect(&http(&server), 8192, GrpcClientOptions::default()).unwrap();
    let err = client.read_at(&mut [0u8; 200], 4000).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("returned 96 of 200 bytes at offset 4000"), "{err}");
    let err = client.read_at(&mut [0u8; 1], 4096).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    let err = client.write_at(&[0u8; 1], 5000).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
}

/// A backend whose reads fail with `NotFound`.
struct Missing;

impl Backend for Missing {
    fn size(&self) -> u64 {
        1 << 16
    }
    fn read_at(&self, _buf: &mut [u8], off: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::NotFound, format!("the object holding offset {off} is gone")))
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this store cannot flush"))
    }
}

#[test]
fn backend_errors_reach_the_client_with_their_kind_and_message() {
    let server = GrpcServer::start(any_port(), GrpcExport::new(Arc::new(Missing))).unwrap();
    let client = GrpcBackend::connect(&http(&server), 1 << 16, GrpcClientOptions::default()).unwrap();
    let err = client.read_at(&mut [0u8; 10], 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    let text = err.to_string();
    assert!(text.starts_with("ReadAt of 10 bytes at offset 0 on http://"), "{text}");
    assert!(text.contains("the object holding offset 0 is gone"), "{text}");
    let err = client.flush().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
    drop(client);
    // The final flush of the shutdown fails too, and says so.
    let err = server.shutdown().unwrap_err();
    assert!(err.to_string().contains("final flush"), "{err}");
}

#[test]
fn many_clients_at_once() {
    let size = 4u64 << 20;
    let memory = Arc::new(Memory::new(size));
    let server = GrpcServer::start(any_port(), GrpcExport::new(memory.clone())).unwrap();
    let endpoint = http(&server);
    let clients = 6u64;
    let span = size / clients;
    std::thread::scope(|s| {
        for c in 0..clients {
            let endpoint = endpoint.clone();
            s.spawn(move || {
                let client = GrpcBackend::connect(&endpoint, size, GrpcClientOptions::default()).unwrap();
                // Several threads per client share its connection.
                std::thread::scope(|s| {
                    for t in 0..3u64 {
                        let client = &client;
                        s.spawn(move || {
                            let mut off = c * span + t * (span / 3);
                            let end = off + span / 3;
                            let mut i = 0u64;
                            while off < end {
                                let len = (4096 + i * 997 % 30_000).min(end - off);
                                let data = vec![(c * 16 + t + i) as u8; len as usize];
                                client.write_at(&data, off).unwrap();
                                let mut back = vec![0u8; len as usize];
                                client.read_at(&mut back, off).unwrap();
                                assert_eq!(back, data);
                                off += len;
                                i += 1;
                            }
                        });
                    }
                });
                client.flush().unwrap();
            });
        }
    });
    // Every write landed in the server's backend.
    let check = GrpcBackend::connect(&endpoint, size, GrpcClientOptions::default()).unwrap();
    let mut all = vec![0u8; size as usize];
    check.read_at(&mut all, 0).unwrap();
    let mut direct = vec![0u8; size as usize];
    memory.read_at(&mut direct, 0).unwrap();
    assert!(all == direct);
}

/// A gate that holds calls until the test opens it, and tells the test how many arrived.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    open: bool,
}

impl Gate {
    /// Counts a call and holds it until the gate opens.
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.arrived += 1;
        self.changed.notify_all();
        let _open = self.changed.wait_while(state, |s| !s.open).unwrap();
    }

    /// Waits until `n` calls have arrived (a watchdog fails the test if they do not).
    fn wait_arrived(&self, n: usize) {
        let (state, waited) = self
            .changed
            .wait_timeout_while(self.state.lock().unwrap(), Duration::from_secs(60), |s| s.arrived < n)
            .unwrap();
        assert!(!waited.timed_out(), "{} calls arrived in 60 s, not {n}", state.arrived);
    }

    fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }
}

/// A memory backend whose writes wait at a gate; flushes are counted, with the writes done by
/// then.
struct HeldWrites {
    inner: Memory,
    gate: Gate,
    written: AtomicUsize,
    flushes: AtomicUsize,
    written_at_flush: AtomicUsize,
}

impl HeldWrites {
    fn new(size: u64) -> Self {
        Self {
            inner: Memory::new(size),
            gate: Gate::default(),
            written: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            written_at_flush: AtomicUsize::new(0),
        }
    }
}

impl Backend for HeldWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.gate.pass();
        self.inner.write_at(buf, off)?;
        self.written.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.written_at_flush.store(self.written.load(Ordering::SeqCst), Ordering::SeqCst);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn shutdown_finishes_calls_in_flight_then_flushes() {
    let held = Arc::new(HeldWrites::new(1 << 20));
    // The port stays held after the server closes it: the client's reconnections are refused.
    let port = HeldPort::new();
    let server = GrpcServer::start_listener(port.listener().unwrap(), GrpcExport::new(held.clone())).unwrap();
    let client = GrpcBackend::connect(&http(&server), 1 << 20, GrpcClientOptions::default()).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| client.write_at(&[5u8; 100], 0));
        held.gate.wait_arrived(1);
        let shutdown = s.spawn(move || server.shutdown());
        // The write is held until the server has told the connection it is on that it goes
        // away: calls on that connection fail from then on (a new one is refused). A server that
        // dropped its connections instead has failed the write by then.
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.read_at(&mut [0u8; 1], 0).is_ok() {
            assert!(Instant::now() < deadline, "the server still answers 60 s after its shutdown began");
        }
        held.gate.open();
        writer.join().unwrap().expect("the write in flight completes");
        shutdown.join().unwrap().unwrap();
    });
    let mut buf = [0u8; 100];
    held.inner.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [5u8; 100]);
    assert_eq!(held.flushes.load(Ordering::SeqCst), 1, "the shutdown flushes once");
    assert_eq!(held.written_at_flush.load(Ordering::SeqCst), 1, "the flush comes after the write");
    let err = client.read_at(&mut buf, 0).unwrap_err();
    // Which of the "server gone" errors comes back depends on how far the connection's teardown
    // got when the call is made.
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::NotConnected
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
        "after shutdown: {err:?}"
    );
}

#[test]
fn connecting_to_nothing_fails_quickly_with_the_cause() {
    // Nothing listens on a held port, and nothing can start to.
    let port = HeldPort::new();
    // Refused at once: a client that waited for its deadline would fail with TimedOut instead.
    let options = GrpcClientOptions { timeout: Duration::from_secs(60), ..GrpcClientOptions::default() };
    let err = GrpcBackend::connect(&format!("http://{}", port.addr()), 1, options).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().starts_with("cannot connect to http://127.0.0.1:"), "{err}");
}

#[test]
fn bad_options_are_refused_before_connecting() {
    for options in [
        GrpcClientOptions { max_read: 0, ..GrpcClientOptions::default() },
        GrpcClientOptions { max_write: 1 << 31, ..GrpcClientOptions::default() },
        GrpcClientOptions { timeout: Duration::ZERO, ..GrpcClientOptions::default() },
    ] {
        let err = GrpcBackend::connect("http://127.0.0.1:1", 1, options).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }
    let export = GrpcExport { max_read: 0, ..GrpcExport::new(Arc::new(Memory::new(1))) };
    assert_eq!(GrpcServer::start(any_port(), export).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

/// A memory backend whose reads wait at a gate.
struct HeldReads {
    inner: Memory,
    gate: Gate,
}

impl Backend for HeldReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.gate.pass();
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn calls_time_out() {
    let held = Arc::new(HeldReads { inner: Memory::new(4096), gate: Gate::default() });
    let server = GrpcServer::start(any_port(), GrpcExport::new(held.clone())).unwrap();
    let options = GrpcClientOptions { timeout: Duration::from_millis(300), ..GrpcClientOptions::default() };
    let client = GrpcBackend::connect(&http(&server), 4096, options).unwrap();
    // The read is held until it returns, so only a deadline can end it. A watchdog opens the
    // gate 20 s on, far past the 300 ms configured here but before the default 30 s: a client
    // that ignored its timeout gets its data then, and fails below rather than hanging.
    let (returned, read_returned) = mpsc::channel::<()>();
    let watchdog = {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            let _ = read_returned.recv_timeout(Duration::from_secs(20));
            held.gate.open();
        })
    };
    let started = Instant::now();
    let result = client.read_at(&mut [0u8; 1], 0);
    let took = started.elapsed();
    drop(returned);
    watchdog.join().unwrap();
    let err = result.expect_err("the read waited for the gate: the timeout did not end it");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(took >= Duration::from_millis(300), "gave up after {took:?}, before the deadline");
}

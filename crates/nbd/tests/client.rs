//! The NBD client against real servers: this crate's server (in process), `nbdkit` and `qemu-nbd`.
//! A test whose server program is missing prints `skipped: <tool> not installed` and passes.

use std::io::{self, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::{Backend, Extent, Memory, SharedBackend, conformance};
use r3map_nbd::server::BlockSizes;
use r3map_nbd::{NbdAddress, NbdBackend, NbdClientOptions, NbdExport, NbdServer, NbdTls, TlsMode};
use r3map_testkit::{Daemon, HeldPort};
use tokio::sync::oneshot;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Peers

/// This crate's server on its own runtime in a background thread, on a Unix socket or TCP.
struct Served {
    uri_base: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

enum Listen {
    Unix(PathBuf),
    Tcp,
    /// A Unix listener the test made (and may keep a clone of).
    UnixListener(std::os::unix::net::UnixListener),
    /// A TCP listener the test made (and may keep a clone of).
    TcpListener(TcpListener),
}

impl Served {
    fn start(server: NbdServer, listen: Listen) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                match listen {
                    Listen::Unix(path) => {
                        let _ = std::fs::remove_file(&path);
                        let listener = tokio::net::UnixListener::bind(&path)?;
                        ready_tx.send(format!("nbd+unix://?socket={}", path.display())).expect("test alive");
                        server.serve_unix(listener, shutdown).await
                    }
                    Listen::UnixListener(listener) => {
                        listener.set_nonblocking(true)?;
                        let listener = tokio::net::UnixListener::from_std(listener)?;
                        let path = listener.local_addr()?.as_pathname().expect("a path").to_owned();
                        ready_tx.send(format!("nbd+unix://?socket={}", path.display())).expect("test alive");
                        server.serve_unix(listener, shutdown).await
                    }
                    Listen::Tcp => {
                        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
                        ready_tx.send(format!("nbd://{}", listener.local_addr()?)).expect("test alive");
                        server.serve_tcp(listener, shutdown).await
                    }
                    Listen::TcpListener(listener) => {
                        listener.set_nonblocking(true)?;
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        ready_tx.send(format!("nbd://{}", listener.local_addr()?)).expect("test alive");
                        server.serve_tcp(listener, shutdown).await
                    }
                }
            })
        });
        let uri_base = ready_rx.recv().expect("the server started");
        Self { uri_base, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn unix(exports: Vec<NbdExport>, socket: &Path) -> Self {
        Self::start(NbdServer::new(exports).expect("valid exports"), Listen::Unix(socket.to_owned()))
    }

    fn tcp(exports: Vec<NbdExport>) -> Self {
        Self::start(NbdServer::new(exports).expect("valid exports"), Listen::Tcp)
    }

    /// The URI of `export`, with `query` (`key=value&...`) added.
    fn uri(&self, export: &str, query: &str) -> String {
        uri_of(&self.uri_base, export, query)
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server program, killed when dropped (also when the test fails). It is handed its listening
/// socket (socket activation), so it serves from the moment it starts: no port is picked before
/// the program binds it, and nothing polls for it to come up.
struct Peer {
    daemon: Daemon,
    uri_base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Peer {
    /// Starts `program args` on `listener`.
    fn spawn(
        program: &str,
        args: &[&str],
        listener: impl Into<std::os::fd::OwnedFd>,
        uri_base: String,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        let daemon =
            Daemon::activated(program, args, listener).unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Self { daemon, uri_base, _dir: dir }
    }

    /// A Unix socket listening in a fresh directory, and its `nbd+unix://` URI base.
    fn unix_listener(name: &str) -> (std::os::unix::net::UnixListener, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join(name);
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("a Unix socket");
        (listener, format!("nbd+unix://?socket={}", socket.display()), dir)
    }

    /// `nbdkit PLUGIN ARGS` on a Unix socket in a fresh directory.
    fn nbdkit_unix(args: &[&str]) -> Self {
        let (listener, uri_base, dir) = Self::unix_listener("nbdkit.sock");
        let mut all = vec!["-f", "--exit-with-parent"];
        all.extend_from_slice(args);
        Self::spawn("nbdkit", &all, listener, uri_base, Some(dir))
    }

    /// `nbdkit PLUGIN ARGS` on 127.0.0.1.
    fn nbdkit_tcp(args: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a TCP listener");
        let port = listener.local_addr().expect("its address").port();
        let mut all = vec!["-f", "--exit-with-parent"];
        all.extend_from_slice(args);
        Self::spawn("nbdkit", &all, listener, format!("nbd://127.0.0.1:{port}"), None)
    }

    /// `nbdkit --tls=require --tls-certificates=DIR [--tls-verify-peer] PLUGIN ARGS` on
    /// 127.0.0.1; `uri_base` is `nbds://localhost:PORT`.
    fn nbdkit_tls(dir: &Path, verify_peer: bool, args: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a TCP listener");
        let port = listener.local_addr().expect("its address").port();
        let certificates = format!("--tls-certificates={}", dir.display());
        let mut all = vec!["-f", "--exit-with-parent", "--tls=require", &certificates];
        if verify_peer {
            all.push("--tls-verify-peer");
        }
        all.extend_from_slice(args);
        Self::spawn("nbdkit", &all, listener, format!("nbds://localhost:{port}"), None)
    }

    fn uri(&self, export: &str, query: &str) -> String {
        uri_of(&self.uri_base, export, query)
    }

    fn kill(&mut self) {
        self.daemon.kill();
    }
}

/// Whether `tool` is on the PATH; prints the skip notice when it is not.
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
    if !found {
        println!("skipped: {tool} not installed");
    }
    found
}

fn open(uri: &str) -> NbdBackend {
    NbdBackend::open(uri).unwrap_or_else(|e| panic!("opening {uri}: {e}"))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn read(b: &dyn Backend, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    b.read_at(&mut buf, off).unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
    buf
}

#[allow(clippy::cast_possible_truncation)]
fn usize_of(n: u64) -> usize {
    n as usize
}

/// Random writes and reads of up to `max_len` bytes, checked against a model of the contents.
fn random_io(b: &dyn Backend, seed: u64, ops: u64, max_len: u64) {
    let size = b.size();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = read(b, 0, usize_of(size));
    for i in 0..ops {
        let off = rng.u64(0..size);
        let len = rng.u64(0..=(size - off).min(max_len));
        let range = usize_of(off)..usize_of(off + len);
        if rng.bool() {
            let data = pattern(seed ^ i, range.len());
            b.write_at(&data, off).unwrap_or_else(|e| panic!("write {len} at {off}: {e}"));
            model[range].copy_from_slice(&data);
        } else {
            assert!(read(b, off, range.len()) == model[range], "read {len} at {off} (op {i}) differs");
        }
    }
    b.flush().expect("flush");
    assert!(read(b, 0, usize_of(size)) == model, "the whole export differs from the model");
}

// ---------------------------------------------------------------------------------------------
// Against this crate's server

fn export(name: &str, backend: SharedBackend) -> NbdExport {
    NbdExport::new(name, backend)
}

#[test]
fn conformance_against_our_server_on_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let servers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let mut servers = servers.lock().unwrap();
        let socket = dir.path().join(format!("s{}", servers.len()));
        let server = Served::unix(vec![export("disk", Arc::new(Memory::new(size)))], &socket);
        let client = open(&server.uri("disk", ""));
        assert!(client.capabilities().extents, "our server offers base:allocation");
        servers.push(server);
        Arc::new(client)
    });
}

#[test]
fn conformance_with_several_connections_over_tcp() {
    let servers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let server = Served::tcp(vec![export("", Arc::new(Memory::new(size)))]);
        let client = open(&server.uri("", "connections=3"));
        assert_eq!(client.connections(), 3);
        servers.lock().unwrap().push(server);
        Arc::new(client)
    });
}

#[test]
fn conformance_through_block_size_constraints() {
    // A minimum block size puts the Aligned layer in front; a small maximum cuts requests.
    let dir = tempfile::tempdir().unwrap();
    let servers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let mut servers = servers.lock().unwrap();
        let socket = dir.path().join(format!("s{}", servers.len()));
        let mut e = export("disk", Arc::new(Memory::new(size)));
        e.block_sizes = BlockSizes::new(4096, 4096, 64 * 1024).unwrap();
        let server = Served::unix(vec![e], &socket);
        let client = open(&server.uri("disk", ""));
        let info = client.info();
        assert_eq!((info.min_block, info.max_block, info.max_payload()), (4096, 65536, 65536));
        servers.push(server);
        Arc::new(client)
    });
}

#[test]
fn data_lands_on_the_server() {
    let memory = Arc::new(Memory::new(8 * MIB));
    let server = Served::tcp(vec![export("disk", memory.clone())]);
    let client = open(&server.uri("disk", ""));
    random_io(&client, 7, 200, 3 * MIB);
    let data = pattern(1, usize_of(5 * MIB + 3));
    client.write_at(&data, 12345).unwrap();
    client.flush().unwrap();
    assert!(read(memory.as_ref(), 12345, data.len()) == data, "the server's backend holds what was written");
    // And what the server holds is what the client reads, across the 32 MiB limit.
    let big = pattern(2, usize_of(8 * MIB));
    memory.write_at(&big, 0).unwrap();
    assert!(read(&client, 0, big.len()) == big);
}

#[test]
fn trim_write_zeroes_and_extents_against_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(Memory::with_page_size(4 * MIB, 64 * 1024).unwrap());
    let server = Served::unix(vec![export("disk", memory)], &dir.path().join("s"));
    let client = open(&server.uri("disk", ""));
    let caps = client.capabilities();
    assert!(caps.trim && caps.write_zeroes && caps.extents && !caps.read_only, "{caps:?}");
    let holes =
        |off, len| client.extents(off, len).unwrap().iter().filter(|e| e.hole).map(|e| e.len).sum::<u64>();
    assert_eq!(holes(0, 4 * MIB), 4 * MIB, "a fresh memory export is all hole");
    client.write_at(&pattern(3, usize_of(4 * MIB)), 0).unwrap();
    assert_eq!(holes(0, 4 * MIB), 0);
    client.trim(MIB, MIB).unwrap();
    client.write_zeroes(3 * MIB, 1000).unwrap();
    assert!(read(&client, MIB, usize_of(MIB)).iter().all(|&b| b == 0), "trim zeroes");
    assert!(read(&client, 3 * MIB, 1000).iter().all(|&b| b == 0), "write_zeroes zeroes");
    assert_eq!(holes(MIB, MIB), MIB, "the trimmed range is a hole");
    // NBD_CMD_TRIM reaches the backend's trim too.
    client.discard(2 * MIB, MIB).unwrap();
    assert_eq!(holes(2 * MIB, MIB), MIB, "the discarded range is a hole");
    let extents = client.extents(2 * MIB - 100, MIB + 200).unwrap();
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), MIB + 200, "extents cover the range exactly");
    // The first 100 bytes were trimmed before; the last 100 hold data.
    assert_eq!(extents, [Extent { len: MIB + 100, hole: true }, Extent { len: 100, hole: false }]);
    client.cache(0, 4 * MIB).unwrap();
    for (off, len) in [(0, 0), (4 * MIB, 0)] {
        client.trim(off, len).unwrap();
        assert!(client.extents(off, len).unwrap().is_empty());
    }
    assert_eq!(client.trim(4 * MIB, 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    assert_eq!(client.cache(4 * MIB, 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn read_only_export() {
    let memory = Arc::new(Memory::from_bytes(&pattern(4, 65536)));
    let ro = NbdExport { read_only: true, ..export("ro", memory) };
    let server = Served::tcp(vec![ro]);
    let client = open(&server.uri("ro", ""));
    let caps = client.capabilities();
    assert!(caps.read_only && !caps.trim && !caps.write_zeroes, "{caps:?}");
    assert!(read(&client, 0, 65536) == pattern(4, 65536));
    let e = client.write_at(b"x", 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("'ro'") && e.to_string().contains("read-only"), "{e}");
    assert_eq!(client.discard(0, 4096).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(client.trim(0, 1).unwrap_err().kind(), io::ErrorKind::Unsupported);
    client.write_at(&[], 0).expect("an empty write succeeds locally");
    client.flush().unwrap();
}

#[test]
fn unknown_exports_are_named() {
    let server = Served::tcp(vec![export("disk", Arc::new(Memory::new(4096)))]);
    let e = NbdBackend::open(&server.uri("nope", "")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("no export named 'nope'"), "{e}");
    // The empty name is the default export.
    assert_eq!(open(&server.uri("", "")).size(), 4096);
}

#[test]
fn a_server_that_requires_tls_is_explained() {
    let ca = r3map_net::certs::Authority::new("test CA").unwrap();
    let pem = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let config = r3map_net::server_tls(pem.cert.as_bytes(), pem.key.as_bytes(), None).unwrap();
    let server = NbdServer::new(vec![export("disk", Arc::new(Memory::new(4096)))])
        .unwrap()
        .with_tls(NbdTls { config, mode: TlsMode::Require });
    let served = Served::start(server, Listen::Tcp);
    let e = NbdBackend::open(&served.uri("disk", "")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    assert!(e.to_string().contains("requires TLS") && e.to_string().contains("use an nbds:// URI"), "{e}");
}

#[test]
fn something_that_is_not_an_nbd_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let talker = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let e = NbdBackend::open(&format!("nbd://127.0.0.1:{port}/")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("not an NBD server") && e.to_string().contains("SSH-2.0"), "{e}");
    talker.join().unwrap();

    // Nothing listening at all.
    let held = HeldPort::new();
    let e = NbdBackend::open(&format!("nbd://127.0.0.1:{}/", held.port())).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn a_silent_server_times_out_the_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let options =
        NbdClientOptions { connect_timeout: Duration::from_millis(300), ..NbdClientOptions::default() };
    let started = Instant::now();
    let e = NbdBackend::connect(NbdAddress::Tcp { host: "127.0.0.1".into(), port }, options).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(e.to_string().contains("is it an NBD server?"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(listener);
}

#[test]
fn requests_wait_through_a_server_restart() {
    let (listener, _, _dir) = Peer::unix_listener("s");
    let memory = Arc::new(Memory::new(MIB));
    let serve = |memory: Arc<Memory>| {
        let server = NbdServer::new(vec![export("disk", memory)]).expect("valid exports");
        Served::start(server, Listen::UnixListener(listener.try_clone().expect("a clone")))
    };
    let server = serve(Arc::clone(&memory));
    let client = open(&server.uri("disk", "timeout=20"));
    let accept = || {
        listener.set_nonblocking(false)?;
        listener.accept().map(drop)
    };
    requests_wait_through(server, &client, &memory, accept, || serve(Arc::clone(&memory)));
}

/// Stops `server`; then a read and a write the client sends while nothing serves it are
/// answered by the server `serve` starts, once the client has tried to reconnect and been
/// turned away (`accept` takes that attempt on the test's clone of the listener and closes it).
fn requests_wait_through(
    mut server: Served,
    client: &NbdBackend,
    memory: &Memory,
    accept: impl FnOnce() -> io::Result<()> + Send,
    serve: impl FnOnce() -> Served,
) {
    client.write_at(b"before", 0).unwrap();
    server.stop();
    std::thread::scope(|s| {
        let requests = s.spawn(|| {
            let before = read(client, 0, 6);
            client.write_at(b"after", 6).unwrap();
            before
        });
        take_a_reconnect_attempt(accept);
        let _server = serve();
        assert_eq!(requests.join().expect("no panic"), b"before");
    });
    assert_eq!(read(memory, 0, 11), b"beforeafter");
}

/// With the server stopped, takes the client's next connection on the test's own clone of the
/// server's listener and closes it unanswered: one failed attempt to reconnect, after which the
/// client must keep trying.
fn take_a_reconnect_attempt(accept: impl FnOnce() -> io::Result<()> + Send) {
    std::thread::scope(|s| {
        let (taken, attempt) = std::sync::mpsc::channel();
        s.spawn(move || taken.send(accept()));
        match attempt.recv_timeout(Duration::from_secs(60)) {
            Ok(accepted) => accepted.expect("accepting the reconnection"),
            Err(_) => panic!("the client did not try to reconnect in 60 s"),
        }
    });
}

#[test]
fn the_client_works_from_inside_async_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(Memory::new(MIB));
    let server = Served::unix(vec![export("disk", memory.clone())], &dir.path().join("s"));
    let uri = server.uri("disk", "");
    // One worker: a client that blocked it while waiting for its own connection task (on the
    // shared runtime, or here) would hang.
    let app = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let read = app.block_on(async move {
        tokio::spawn(async move {
            let client = open(&uri);
            client.write_at(b"from a task", 4096).unwrap();
            read(&client, 4096, 11)
        })
        .await
        .unwrap()
    });
    assert_eq!(read, b"from a task");
    assert_eq!(self::read(memory.as_ref(), 4096, 11), b"from a task");
}

#[test]
fn a_changed_export_is_refused_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let mut server = Served::unix(vec![export("disk", Arc::new(Memory::new(MIB)))], &socket);
    let client = open(&server.uri("disk", "timeout=10"));
    server.stop();
    let _bigger = Served::unix(vec![export("disk", Arc::new(Memory::new(2 * MIB)))], &socket);
    let e = client.read_at(&mut [0u8; 16], 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("changed while reconnecting"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A CA, a server certificate for `localhost`, a client certificate, and the files clients read:
/// a libnbd-style directory (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`, and for nbdkit
/// `server-cert.pem`, `server-key.pem`) and the same as separate files.
struct Pki {
    dir: tempfile::TempDir,
    ca: r3map_net::certs::Authority,
    server: r3map_net::certs::Pem,
}

impl Pki {
    fn new() -> Self {
        Self::named("r3map test CA")
    }

    fn named(ca_name: &str) -> Self {
        let ca = r3map_net::certs::Authority::new(ca_name).unwrap();
        let server = ca.server(&["localhost"]).unwrap();
        let client = ca.client("tester").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca-cert.pem", &ca.pem().cert);
        write("client-cert.pem", &client.cert);
        write("client-key.pem", &client.key);
        write("server-cert.pem", &server.cert);
        write("server-key.pem", &server.key);
        std::fs::create_dir(dir.path().join("ca-only")).unwrap();
        std::fs::write(dir.path().join("ca-only/ca-cert.pem"), &ca.pem().cert).unwrap();
        Self { dir, ca, server }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `tls-certificates=DIR` with the client certificate.
    fn directory(&self) -> String {
        format!("tls-certificates={}", self.dir.path().display())
    }

    /// `tls-certificates=DIR` without a client certificate.
    fn ca_only_directory(&self) -> String {
        format!("tls-certificates={}", self.path("ca-only"))
    }

    /// `ca=...&cert=...&key=...`.
    fn files(&self) -> String {
        format!(
            "ca={}&cert={}&key={}",
            self.path("ca-cert.pem"),
            self.path("client-cert.pem"),
            self.path("client-key.pem")
        )
    }

    /// Our server requiring TLS, and client certificates signed by the CA when `client_auth`.
    fn server(&self, exports: Vec<NbdExport>, client_auth: bool) -> NbdServer {
        let client_ca = client_auth.then(|| self.ca.pem().cert.as_bytes());
        let config =
            r3map_net::server_tls(self.server.cert.as_bytes(), self.server.key.as_bytes(), client_ca)
                .unwrap();
        NbdServer::new(exports).unwrap().with_tls(NbdTls { config, mode: TlsMode::Require })
    }
}

/// The `nbds` URI of `export` on a served `nbd://127.0.0.1:PORT` or `nbd+unix://` base, with the
/// host named `localhost` (the certificate's name).
fn nbds(served: &Served, export: &str, query: &str) -> String {
    let base = served.uri_base.replacen("nbd://127.0.0.1:", "nbds://localhost:", 1);
    let base = base.replacen("nbd+unix://", "nbds+unix://", 1);
    uri_of(&base, export, query)
}

#[test]
fn tls_with_a_libnbd_certificate_directory() {
    let pki = Pki::new();
    let memory = Arc::new(Memory::new(8 * MIB));
    let served = Served::start(pki.server(vec![export("disk", memory.clone())], true), Listen::Tcp);
    let client = open(&nbds(&served, "disk", &format!("{}&connections=2", pki.directory())));
    assert!(client.tls());
    assert_eq!((client.size(), client.connections()), (8 * MIB, 2));
    assert!(client.info().structured_replies && client.capabilities().extents, "{:?}", client.info());
    random_io(&client, 31, 200, MIB);
    client.write_at(b"through TLS", 0).unwrap();
    client.flush().unwrap();
    assert_eq!(read(memory.as_ref(), 0, 11), b"through TLS");
    assert!(format!("{client:?}").contains("tls: true"), "{client:?}");
}

#[test]
fn conformance_over_tls_with_certificate_files() {
    let pki = Pki::new();
    let servers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let served =
            Served::start(pki.server(vec![export("", Arc::new(Memory::new(size)))], true), Listen::Tcp);
        let client = open(&nbds(&served, "", &pki.files()));
        assert!(client.tls());
        servers.lock().unwrap().push(served);
        Arc::new(client)
    });
}

#[test]
fn tls_over_a_unix_socket() {
    // Our server offers TLS on Unix sockets without requiring it; nbds+unix requires it.
    let pki = Pki::new();
    let socket = pki.dir.path().join("s");
    let memory = Arc::new(Memory::new(MIB));
    let served = Served::start(pki.server(vec![export("disk", memory)], true), Listen::Unix(socket));
    let client = open(&nbds(&served, "disk", &pki.directory()));
    assert!(client.tls());
    random_io(&client, 32, 100, 65536);
    // The name checked defaults to localhost; another one fails.
    let e =
        NbdBackend::open(&nbds(&served, "disk", &format!("{}&tls-hostname=disk.example", pki.directory())))
            .unwrap_err();
    assert!(e.to_string().contains("not valid for the name 'disk.example'"), "{e}");
}

#[test]
fn a_client_without_a_certificate_is_refused_clearly() {
    let pki = Pki::new();
    let served =
        Served::start(pki.server(vec![export("disk", Arc::new(Memory::new(MIB)))], true), Listen::Tcp);
    let started = Instant::now();
    for query in [pki.ca_only_directory(), format!("ca={}", pki.path("ca-cert.pem"))] {
        let e = NbdBackend::open(&nbds(&served, "disk", &query)).unwrap_err();
        assert!(e.to_string().contains("may require a client certificate"), "{query}: {e}");
        assert!(e.to_string().contains("localhost"), "the server is named: {e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "not retried: {:?}", started.elapsed());
    // Without client authentication, the same clients are served.
    let open_server =
        Served::start(pki.server(vec![export("disk", Arc::new(Memory::new(MIB)))], false), Listen::Tcp);
    assert_eq!(open(&nbds(&open_server, "disk", &pki.ca_only_directory())).size(), MIB);
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let served =
        Served::start(pki.server(vec![export("disk", Arc::new(Memory::new(MIB)))], false), Listen::Tcp);
    // A CA of the same name (the signature does not verify) and one of another name.
    for other in [Pki::new(), Pki::named("another CA")] {
        let e = NbdBackend::open(&nbds(&served, "disk", &other.ca_only_directory())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("not signed by the CA this client trusts"), "{e}");
    }
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let served =
        Served::start(pki.server(vec![export("disk", Arc::new(Memory::new(MIB)))], false), Listen::Tcp);
    // The certificate names localhost, not 127.0.0.1.
    let by_address =
        uri_of(&served.uri_base.replacen("nbd://", "nbds://", 1), "disk", &pki.ca_only_directory());
    let e = NbdBackend::open(&by_address).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("not valid for the name '127.0.0.1'"), "{e}");
    assert!(e.to_string().contains("tls-hostname=NAME"), "{e}");
    // tls-hostname gives the name the certificate was issued for.
    let named = format!("{by_address}&tls-hostname=localhost");
    assert_eq!(open(&named).size(), MIB);
}

#[test]
fn nbds_to_a_server_without_tls_fails_clearly() {
    let pki = Pki::new();
    let served = Served::tcp(vec![export("disk", Arc::new(Memory::new(MIB)))]);
    let e = NbdBackend::open(&nbds(&served, "disk", &pki.directory())).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("does not start TLS"), "{e}");
    assert!(e.to_string().contains("never falls back to plaintext"), "{e}");
}

#[test]
fn requests_wait_through_a_tls_server_restart() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let memory = Arc::new(Memory::new(MIB));
    let serve = |memory: Arc<Memory>| {
        let listen = Listen::TcpListener(listener.try_clone().expect("a clone"));
        Served::start(pki.server(vec![export("disk", memory)], true), listen)
    };
    let server = serve(Arc::clone(&memory));
    let client = open(&nbds(&server, "disk", &format!("{}&timeout=20", pki.directory())));
    let accept = || {
        listener.set_nonblocking(false)?;
        listener.accept().map(drop)
    };
    // Answered over a new TLS session.
    requests_wait_through(server, &client, &memory, accept, || serve(Arc::clone(&memory)));
}

#[test]
fn nbdkit_over_tls() {
    if !have("nbdkit") {
        return;
    }
    let pki = Pki::new();
    let peer = Peer::nbdkit_tls(pki.dir.path(), false, &["memory", "64M"]);
    let client = open(&peer.uri("", &format!("{}&connections=2", pki.ca_only_directory())));
    assert!(client.tls());
    assert_eq!(client.size(), 64 * MIB);
    random_io(&client, 33, 200, 4 * MIB);
    // Plaintext is refused by nbdkit --tls=require, with the way out named.
    let plain = peer.uri("", "").replacen("nbds://localhost", "nbd://127.0.0.1", 1);
    let e = NbdBackend::open(&plain).unwrap_err();
    assert!(e.to_string().contains("use an nbds:// URI"), "{e}");
}

#[test]
fn nbdkit_over_tls_checks_client_certificates() {
    if !have("nbdkit") {
        return;
    }
    let pki = Pki::new();
    let peer = Peer::nbdkit_tls(pki.dir.path(), true, &["memory", "16M"]);
    for query in [pki.directory(), pki.files()] {
        let client = open(&peer.uri("", &query));
        random_io(&client, 34, 50, MIB);
    }
    let e = NbdBackend::open(&peer.uri("", &pki.ca_only_directory())).unwrap_err();
    assert!(e.to_string().contains("client certificate"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Against nbdkit

#[test]
fn nbdkit_conformance_over_unix() {
    if !have("nbdkit") {
        return;
    }
    let peers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let size = size.to_string();
        let peer = Peer::nbdkit_unix(&["memory", &size]);
        let client = open(&peer.uri("", ""));
        peers.lock().unwrap().push(peer);
        Arc::new(client)
    });
}

#[test]
fn nbdkit_over_tcp_with_four_connections() {
    if !have("nbdkit") {
        return;
    }
    let peer = Peer::nbdkit_tcp(&["memory", "64M"]);
    let client = Arc::new(open(&peer.uri("", "connections=4")));
    assert_eq!(client.connections(), 4, "nbdkit's memory plugin allows several connections");
    assert_eq!(client.size(), 64 * MIB);
    // Disjoint writers in parallel, spread over the connections.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let client = Arc::clone(&client);
            s.spawn(move || {
                let data = pattern(t, usize_of(8 * MIB));
                client.write_at(&data, t * 8 * MIB).unwrap();
                assert!(read(client.as_ref(), t * 8 * MIB, data.len()) == data);
            });
        }
    });
    client.flush().unwrap();
    random_io(client.as_ref(), 11, 100, 4 * MIB);
}

#[test]
fn nbdkit_extents_report_a_hole_after_trim() {
    if !have("nbdkit") {
        return;
    }
    let peer = Peer::nbdkit_unix(&["memory", "16M"]);
    let client = open(&peer.uri("", ""));
    assert!(client.capabilities().extents && client.capabilities().trim);
    client.write_at(&pattern(5, usize_of(16 * MIB)), 0).unwrap();
    let extents = client.extents(0, 16 * MIB).unwrap();
    assert!(extents.iter().all(|e| !e.hole), "{extents:?}");
    client.trim(4 * MIB, 2 * MIB).unwrap();
    let extents = client.extents(0, 16 * MIB).unwrap();
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 16 * MIB);
    let mut pos = 0;
    let mut hole = 0;
    for e in &extents {
        if e.hole {
            assert!(pos >= 4 * MIB && pos + e.len <= 6 * MIB, "hole at {pos}+{}: {extents:?}", e.len);
            hole += e.len;
        }
        pos += e.len;
    }
    assert_eq!(hole, 2 * MIB, "{extents:?}");
    assert!(read(&client, 4 * MIB, usize_of(2 * MIB)).iter().all(|&b| b == 0));
    client.cache(0, 16 * MIB).unwrap();
    client.discard(8 * MIB, MIB).unwrap();
}

#[test]
fn nbdkit_block_size_policy_is_respected() {
    if !have("nbdkit") {
        return;
    }
    // The server fails any request that is not aligned to 4 KiB or longer than 64 KiB.
    let peer = Peer::nbdkit_unix(&[
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "blocksize-minimum=4096",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]);
    let client = open(&peer.uri("", ""));
    let info = client.info();
    assert_eq!((info.min_block, info.max_payload()), (4096, 65536), "{info:?}");
    random_io(&client, 13, 300, 300_000);
    client.write_zeroes(1, 200_000).unwrap();
    assert!(read(&client, 1, 200_000).iter().all(|&b| b == 0));
    client.trim(5000, 10_000).unwrap();
    let extents = client.extents(3, 1_000_000).unwrap();
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 1_000_000);
    // Widened (cache) or narrowed (discard) to whole blocks, or the server would refuse them.
    client.cache(1, 10_000).unwrap();
    client.discard(1, 10_000).unwrap();
    client.discard(1, 100).unwrap();
}

#[test]
fn nbdkit_without_structured_replies_fixed_newstyle_or_no_zeroes() {
    if !have("nbdkit") {
        return;
    }
    for (args, structured) in [
        (["--no-sr", "memory", "4M"], false),
        (["--mask-handshake=1", "memory", "4M"], true),
        (["--mask-handshake=0", "memory", "4M"], false),
    ] {
        let peer = Peer::nbdkit_unix(&args);
        let client = open(&peer.uri("", ""));
        let info = client.info();
        assert_eq!(info.structured_replies, structured, "{args:?}: {info:?}");
        assert_eq!(client.capabilities().extents, structured, "{args:?}: {info:?}");
        assert_eq!(client.size(), 4 * MIB);
        random_io(&client, 17, 60, MIB);
    }
}

#[test]
fn nbdkit_old_style_is_refused_clearly() {
    if !have("nbdkit") {
        return;
    }
    let peer = Peer::nbdkit_unix(&["--oldstyle", "memory", "1M"]);
    let e = NbdBackend::open(&peer.uri("", "")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    assert!(e.to_string().contains("old-style"), "{e}");
}

#[test]
fn nbdkit_errors_map_to_error_kinds() {
    if !have("nbdkit") {
        return;
    }
    let peer = Peer::nbdkit_unix(&[
        "--filter=error",
        "memory",
        "1M",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]);
    let client = open(&peer.uri("", ""));
    let e = client.write_at(&[1; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
    assert!(e.to_string().contains("ENOSPC"), "{e}");
    let e = client.read_at(&mut [0; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
    assert!(e.to_string().contains("EIO"), "{e}");
    // The connection survives errors.
    client.flush().unwrap();
}

#[test]
fn a_killed_server_fails_requests_within_the_timeout() {
    if !have("nbdkit") {
        return;
    }
    let mut peer = Peer::nbdkit_unix(&["memory", "16M"]);
    let client = Arc::new(open(&peer.uri("", "timeout=2")));
    client.write_at(&pattern(6, 4096), 0).unwrap();
    // Readers in flight when the server dies: each has been answered once before it is killed.
    let answered = Arc::new(std::sync::Barrier::new(5));
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let (client, answered) = (Arc::clone(&client), Arc::clone(&answered));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let first = client.read_at(&mut buf, i * (1 << 20));
                answered.wait();
                first?;
                loop {
                    client.read_at(&mut buf, i * (1 << 20))?;
                }
            })
        })
        .collect();
    answered.wait();
    peer.kill();
    let killed = Instant::now();
    for r in readers {
        let result: io::Result<()> = r.join().expect("no panic");
        let e = result.expect_err("reads fail once the server is gone");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }
    // Within the 2 s timeout, with room for a loaded machine; without it, they would wait forever.
    assert!(killed.elapsed() < Duration::from_secs(20), "failed within the timeout: {:?}", killed.elapsed());
    // Later requests fail too, within the timeout.
    let started = Instant::now();
    let e = client.write_at(b"x", 0).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("last problem"), "the cause is named: {e}");
}

// ---------------------------------------------------------------------------------------------
// Against qemu-nbd

#[test]
fn qemu_nbd_writes_reach_the_file() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    let size = 16 * MIB;
    std::fs::write(&file, vec![0u8; usize_of(size)]).unwrap();
    let (listener, uri_base, socket_dir) = Peer::unix_listener("qemu.sock");
    let file_arg = file.display().to_string();
    let mut peer = Peer::spawn(
        "qemu-nbd",
        &["-f", "raw", "--persistent", &file_arg],
        listener,
        uri_base,
        Some(socket_dir),
    );
    let client = open(&peer.uri("", ""));
    assert_eq!(client.size(), size);
    assert!(client.info().structured_replies && client.capabilities().extents, "{:?}", client.info());
    let mut model = vec![0u8; usize_of(size)];
    let mut rng = fastrand::Rng::with_seed(21);
    for i in 0..100 {
        let off = rng.u64(0..size);
        let len = rng.u64(1..=(size - off).min(MIB));
        let data = pattern(i, usize_of(len));
        client.write_at(&data, off).unwrap();
        model[usize_of(off)..usize_of(off + len)].copy_from_slice(&data);
    }
    client.write_zeroes(MIB, 4096 * 3 + 5).unwrap();
    model[usize_of(MIB)..usize_of(MIB + 4096 * 3 + 5)].fill(0);
    client.trim(5 * MIB, MIB).unwrap();
    model[usize_of(5 * MIB)..usize_of(6 * MIB)].fill(0);
    client.flush().unwrap();
    assert!(read(&client, 0, usize_of(size)) == model, "reads through qemu-nbd match");
    drop(client);
    peer.kill();
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk == model, "the file holds what was written");
}

/// The URI of `export` on the server at `base` (`nbd://HOST:PORT` or `nbd+unix://?socket=PATH`),
/// with `query` (`key=value&...`) added.
fn uri_of(base: &str, export: &str, query: &str) -> String {
    match base.split_once('?') {
        Some((scheme, socket)) => {
            let sep = if query.is_empty() { "" } else { "&" };
            format!("{scheme}/{export}?{socket}{sep}{query}")
        }
        None if query.is_empty() => format!("{base}/{export}"),
        None => format!("{base}/{export}?{query}"),
    }
}

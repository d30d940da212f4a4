//! The protocol end to end on loopback: conformance over every transport, credentials, bad
//! frames, many clients, reconnection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Chunk, File, Memory, Seeder, SharedBackend, Tracked, conformance};
use r3map_net::certs::{Authority, Pem};
use r3map_net::client::Address;
use r3map_net::proto::{self, ClientHello, Op, REPLY_HEADER_LEN, ReplyHeader, RequestHeader, ServerHello};
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
    client_tls, server_tls,
};
use r3map_testkit::HeldPort;

const TOKEN: &str = "correct horse battery staple";

struct Pki {
    ca: Authority,
    server: Pem,
    client: Pem,
}

fn pki() -> Pki {
    let ca = Authority::new("r3map test CA").unwrap();
    let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let client = ca.client("test client").unwrap();
    Pki { ca, server, client }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A server on a held port (`r3map_testkit::HeldPort`: the port stays this test's while no server
/// listens on it, so a client's reconnection is refused rather than reaching another test's).
fn serve_on(port: &HeldPort, config: ServerConfig) -> ServerHandle {
    ServerHandle::start_tcp_listener(Server::new(config).unwrap(), port.listener().unwrap()).unwrap()
}

fn start(backend: SharedBackend, security: ServerSecurity, token: Option<&str>) -> ServerHandle {
    let mut config = ServerConfig::new(Export::new("default", backend), security);
    config.token = token.map(str::to_owned);
    ServerHandle::start_tcp(Server::new(config).unwrap(), any_port()).unwrap()
}

fn tcp(handle: &ServerHandle) -> Address {
    let addr = handle.local_addr().unwrap();
    Address::Tcp { host: "127.0.0.1".into(), port: addr.port() }
}

fn plain_options(token: Option<&str>) -> ClientOptions {
    let mut o = ClientOptions::new(ClientSecurity::Plaintext);
    o.token = token.map(str::to_owned);
    o
}

fn tls_options(ca: &Pem, identity: Option<&Pem>, token: Option<&str>) -> ClientOptions {
    let config =
        client_tls(ca.cert.as_bytes(), identity.map(|p| (p.cert.as_bytes(), p.key.as_bytes()))).unwrap();
    let mut o = ClientOptions::new(ClientSecurity::Tls { config, server_name: None });
    o.token = token.map(str::to_owned);
    o
}

/// Runs the conformance suite with a fresh server and client per backend it asks for.
fn conformance_over(
    make_server: impl Fn(SharedBackend) -> ServerHandle,
    options: impl Fn() -> ClientOptions,
) {
    let servers = Mutex::new(Vec::new());
    conformance::run(&|size| {
        let server = make_server(Arc::new(Memory::new(size)));
        let client = RemoteBackend::connect(tcp(&server), options()).unwrap();
        servers.lock().unwrap().push(server);
        Arc::new(client)
    });
}

#[test]
fn conformance_plaintext() {
    conformance_over(|b| start(b, ServerSecurity::Plaintext, None), || plain_options(None));
}

#[test]
fn conformance_tls_with_token() {
    let pki = pki();
    let tls = server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None).unwrap();
    conformance_over(
        |b| start(b, ServerSecurity::Tls(Arc::clone(&tls)), Some(TOKEN)),
        || tls_options(pki.ca.pem(), None, Some(TOKEN)),
    );
}

#[test]
fn conformance_mutual_tls_with_several_connections_and_small_requests() {
    let pki = pki();
    let tls =
        server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), Some(pki.ca.pem().cert.as_bytes()))
            .unwrap();
    conformance_over(
        |b| start(b, ServerSecurity::Tls(Arc::clone(&tls)), None),
        || {
            let mut o = tls_options(pki.ca.pem(), Some(&pki.client), None);
            o.connections = 3;
            o.max_request = 64 * 1024;
            o
        },
    );
}

#[test]
fn conformance_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let servers = Mutex::new(Vec::new());
    let n = std::sync::atomic::AtomicU64::new(0);
    conformance::run(&|size| {
        let path = dir.path().join(format!("s{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let config =
            ServerConfig::new(Export::new("default", Arc::new(Memory::new(size))), ServerSecurity::Plaintext);
        let server = ServerHandle::start_unix(Server::new(config).unwrap(), &path).unwrap();
        let client = RemoteBackend::connect(Address::Unix(path), plain_options(None)).unwrap();
        servers.lock().unwrap().push(server);
        Arc::new(client)
    });
}

#[test]
fn urls_open_every_transport() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca.pem().cert).unwrap();
    let tls = server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None).unwrap();
    let secure = start(Arc::new(Memory::new(4096)), ServerSecurity::Tls(tls), Some(TOKEN));
    let port = secure.local_addr().unwrap().port();
    let url = format!(
        "r3map://localhost:{port}/default?ca={}&token={}",
        ca.display(),
        "correct%20horse%20battery%20staple"
    );
    let client = RemoteBackend::open(&url).unwrap();
    assert_eq!(client.size(), 4096);

    let plain = start(Arc::new(Memory::new(8192)), ServerSecurity::Plaintext, None);
    let client =
        RemoteBackend::open(&format!("r3map+plain://127.0.0.1:{}", plain.local_addr().unwrap().port()))
            .unwrap();
    assert_eq!(client.size(), 8192);

    let err = RemoteBackend::open(&format!("r3map://127.0.0.1:{port}/default")).unwrap_err();
    assert!(err.to_string().contains("?ca=PATH"), "{err}");
    let err = RemoteBackend::open("r3map+plain://127.0.0.1:1/x?colour=blue").unwrap_err();
    assert!(err.to_string().contains("unknown parameter 'colour'"), "{err}");
    let err = RemoteBackend::open("http://127.0.0.1/").unwrap_err();
    assert!(err.to_string().contains("unknown scheme"), "{err}");
}

#[test]
fn wrong_or_missing_token_is_refused() {
    let pki = pki();
    let tls = server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None).unwrap();
    let server = start(Arc::new(Memory::new(4096)), ServerSecurity::Tls(tls), Some(TOKEN));
    for token in [Some("wrong"), None] {
        let err = RemoteBackend::connect(tcp(&server), tls_options(pki.ca.pem(), None, token)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("wrong or missing token"), "{err}");
    }
}

#[test]
fn wrong_certificates_are_refused() {
    let pki = pki();
    let other = Authority::new("someone else").unwrap();
    let stranger = other.client("stranger").unwrap();
    let tls =
        server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), Some(pki.ca.pem().cert.as_bytes()))
            .unwrap();
    let server = start(Arc::new(Memory::new(4096)), ServerSecurity::Tls(tls), None);
    // A client certificate from another CA, and none at all.
    for identity in [Some(&stranger), None] {
        let err =
            RemoteBackend::connect(tcp(&server), tls_options(pki.ca.pem(), identity, None)).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    // A client that does not trust the server's CA.
    let err =
        RemoteBackend::connect(tcp(&server), tls_options(other.pem(), Some(&pki.client), None)).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    // The right one gets in.
    RemoteBackend::connect(tcp(&server), tls_options(pki.ca.pem(), Some(&pki.client), None)).unwrap();
}

#[test]
fn unknown_export_and_read_only_exports() {
    let mut config = ServerConfig::new(
        Export::new("ro", Arc::new(Memory::from_bytes(&[7u8; 4096]))).read_only(),
        ServerSecurity::Plaintext,
    );
    config.exports.push(Export::new("rw", Arc::new(Memory::new(4096))));
    let server = ServerHandle::start_tcp(Server::new(config).unwrap(), any_port()).unwrap();
    let mut o = plain_options(None);
    o.export = "nope".into();
    let err = RemoteBackend::connect(tcp(&server), o).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    let mut o = plain_options(None);
    o.export = "ro".into();
    let ro = RemoteBackend::connect(tcp(&server), o).unwrap();
    assert!(ro.capabilities().read_only);
    assert_eq!(ro.write_at(&[1], 0).unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    let mut buf = [0u8; 4];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4]);
}

#[test]
fn seeder_operations_cross_the_network() {
    let tracked = Arc::new(Tracked::new(Memory::new(1 << 20), 4096).unwrap());
    let export = Export::new("default", tracked.clone()).with_seeder(tracked).with_chunk_size(4096);
    let server = ServerHandle::start_tcp(
        Server::new(ServerConfig::new(export, ServerSecurity::Plaintext)).unwrap(),
        any_port(),
    )
    .unwrap();
    let client = RemoteBackend::connect(tcp(&server), plain_options(None)).unwrap();
    assert_eq!(Seeder::chunk_size(&client), 4096);
    client.track().unwrap();
    client.write_at(&[1u8; 10], 0).unwrap();
    // A pre-copy round takes what was written so far and keeps tracking.
    assert_eq!(client.take_dirty().unwrap(), vec![Chunk(0)]);
    assert_eq!(client.take_dirty().unwrap(), vec![]);
    client.write_at(&[1u8; 5000], 4096 * 3).unwrap();
    assert_eq!(Seeder::sync(&client).unwrap(), vec![Chunk(3), Chunk(4)]);
    // Asked again (as after an answer lost with its connection), the sync answers the same.
    assert_eq!(Seeder::sync(&client).unwrap(), vec![Chunk(3), Chunk(4)]);
    client.close().unwrap();

    let plain = start(Arc::new(Memory::new(4096)), ServerSecurity::Plaintext, None);
    let client = RemoteBackend::connect(tcp(&plain), plain_options(None)).unwrap();
    assert_eq!(client.track().unwrap_err().kind(), std::io::ErrorKind::Unsupported);
}

#[test]
fn many_concurrent_clients() {
    let size = 8u64 << 20;
    let server = start(Arc::new(Memory::new(size)), ServerSecurity::Plaintext, None);
    let addr = tcp(&server);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let addr = addr.clone();
            s.spawn(move || {
                let client = RemoteBackend::connect(addr, plain_options(None)).unwrap();
                let span = size / 16;
                let data: Vec<u8> = (0..span).map(|i| i.to_le_bytes()[0] ^ t.to_le_bytes()[0]).collect();
                client.write_at(&data, t * span).unwrap();
                let mut back = vec![0u8; data.len()];
                client.read_at(&mut back, t * span).unwrap();
                assert_eq!(back, data);
            });
        }
    });
}

/// A raw connection that has passed the handshake, for sending frames by hand.
fn raw(server: &ServerHandle) -> TcpStream {
    let mut s = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    // A watchdog only: a server that never answers fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let hello = ClientHello {
        version: proto::VERSION,
        export: "default".into(),
        token: String::new(),
        max_request: 1 << 20,
    };
    s.write_all(&hello.encode()).unwrap();
    let mut buf = Vec::new();
    loop {
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "the server closed during the handshake");
        buf.extend_from_slice(&b[..n]);
        if let Some((reply, _)) = ServerHello::decode(&buf).unwrap() {
            assert!(matches!(reply, ServerHello::Accepted { .. }));
            return s;
        }
    }
}

fn read_error_reply(s: &mut TcpStream) -> (ReplyHeader, String) {
    let mut h = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = ReplyHeader::decode(&h, 1 << 20).unwrap();
    let mut msg = vec![0u8; h.length as usize];
    s.read_exact(&mut msg).unwrap();
    (h, String::from_utf8(msg).unwrap())
}

/// Whether the server closed the connection (a reset counts: it may close with unread bytes).
/// The read timeout of [`raw`] is not a close: a connection left open fails the test.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Sends one seeder request on a raw connection and returns the chunk list it answers.
fn ask(s: &mut TcpStream, op: Op, offset: u64) -> Vec<u64> {
    s.write_all(&RequestHeader { op, flags: 0, id: 9, offset, length: 0 }.encode()).unwrap();
    let mut h = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = ReplyHeader::decode(&h, 1 << 20).unwrap();
    let mut payload = vec![0u8; h.length as usize];
    s.read_exact(&mut payload).unwrap();
    assert_eq!(h.status, 0, "{}: {}", op.name(), String::from_utf8_lossy(&payload));
    proto::decode_chunks(&payload).unwrap()
}

#[test]
fn a_round_or_sync_asked_for_again_gets_the_same_answer() {
    let tracked = Arc::new(Tracked::new(Memory::new(1 << 20), 4096).unwrap());
    let export = Export::new("default", tracked.clone()).with_seeder(tracked.clone()).with_chunk_size(4096);
    let server = ServerHandle::start_tcp(
        Server::new(ServerConfig::new(export, ServerSecurity::Plaintext)).unwrap(),
        any_port(),
    )
    .unwrap();
    let mut first = raw(&server);
    assert_eq!(ask(&mut first, Op::Track, 0), Vec::<u64>::new());
    tracked.write_at(&[1; 10], 0).unwrap();
    assert_eq!(ask(&mut first, Op::Dirty, 1), vec![0]);
    tracked.write_at(&[1; 10], 4096 * 5).unwrap();
    // The answer to round 1 was lost with its connection: the destination asks again on another.
    drop(first);
    let mut second = raw(&server);
    assert_eq!(ask(&mut second, Op::Dirty, 1), vec![0], "the same round, the same chunks");
    assert_eq!(ask(&mut second, Op::Dirty, 2), vec![5], "the next round has what came after");
    tracked.write_at(&[1; 10], 4096 * 7).unwrap();
    // Round 0 is a client that does not number its rounds: always a new round.
    assert_eq!(ask(&mut second, Op::Dirty, 0), vec![7]);
    assert_eq!(ask(&mut second, Op::Dirty, 0), Vec::<u64>::new());
    tracked.write_at(&[1; 10], 4096 * 9).unwrap();
    assert_eq!(ask(&mut second, Op::Sync, 0), vec![9]);
    let mut third = raw(&server);
    assert_eq!(ask(&mut third, Op::Sync, 0), vec![9], "a repeated sync answers the same");
    // A new migration starts afresh.
    assert_eq!(ask(&mut third, Op::Track, 0), Vec::<u64>::new());
    tracked.write_at(&[1; 10], 4096 * 2).unwrap();
    assert_eq!(ask(&mut third, Op::Dirty, 1), vec![2]);
    assert_eq!(ask(&mut third, Op::Sync, 0), Vec::<u64>::new());
}

#[test]
fn bad_frames_get_an_error_and_the_server_serves_on() {
    let server = start(Arc::new(Memory::new(1 << 20)), ServerSecurity::Plaintext, None);
    let good = RemoteBackend::connect(tcp(&server), plain_options(None)).unwrap();
    good.write_at(&[5u8; 100], 0).unwrap();

    // Garbage instead of a frame.
    let mut s = raw(&server);
    s.write_all(&[0xEEu8; 28]).unwrap();
    let (h, msg) = read_error_reply(&mut s);
    assert_ne!(h.status, 0);
    assert!(msg.contains("malformed frame"), "{msg}");
    assert!(closed(&mut s));

    // An unknown operation.
    let mut s = raw(&server);
    let mut frame = RequestHeader { op: Op::Read, flags: 0, id: 9, offset: 0, length: 10 }.encode();
    frame[4] = 42;
    s.write_all(&frame).unwrap();
    let (h, msg) = read_error_reply(&mut s);
    assert_eq!(h.id, 9);
    assert!(msg.contains("unknown operation 42"), "{msg}");

    // A request larger than the maximum.
    let mut s = raw(&server);
    s.write_all(&RequestHeader { op: Op::Write, flags: 0, id: 3, offset: 0, length: 64 << 20 }.encode())
        .unwrap();
    let (_, msg) = read_error_reply(&mut s);
    assert!(msg.contains("larger than the maximum"), "{msg}");
    assert!(closed(&mut s));

    // A truncated frame, then the client vanishes.
    let mut s = raw(&server);
    s.write_all(&RequestHeader { op: Op::Write, flags: 0, id: 4, offset: 0, length: 1000 }.encode()).unwrap();
    s.write_all(&[1u8; 10]).unwrap();
    drop(s);

    // An out-of-range read is an error reply, and the connection goes on.
    let mut s = raw(&server);
    s.write_all(&RequestHeader { op: Op::Read, flags: 0, id: 5, offset: 1 << 20, length: 1 }.encode())
        .unwrap();
    let (h, msg) = read_error_reply(&mut s);
    assert_eq!((h.id, h.status), (5, r3map_net::errno::EINVAL));
    assert!(msg.contains("beyond the end"), "{msg}");
    s.write_all(&RequestHeader { op: Op::Read, flags: 0, id: 6, offset: 0, length: 3 }.encode()).unwrap();
    let (h, data) = read_error_reply(&mut s);
    assert_eq!((h.id, h.status, data.as_bytes()), (6, 0, &[5u8, 5, 5][..]));

    // The well-behaved client never noticed.
    let mut buf = [0u8; 100];
    good.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [5u8; 100]);
}

#[test]
fn a_garbage_hello_is_refused() {
    let server = start(Arc::new(Memory::new(4096)), ServerSecurity::Plaintext, None);
    let mut s = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    match ServerHello::decode(&reply).unwrap() {
        Some((ServerHello::Refused { message, .. }, _)) => assert!(message.contains("magic"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_client_rides_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let port = HeldPort::new();
    let config = |backend| ServerConfig::new(Export::new("default", backend), ServerSecurity::Plaintext);
    let server = serve_on(&port, config(Arc::new(File::create(&path, 1 << 20).unwrap())));
    let mut options = plain_options(None);
    options.timeout = Duration::from_secs(60);
    let address = Address::Tcp { host: "127.0.0.1".into(), port: port.port() };
    let client = Arc::new(RemoteBackend::connect(address, options).unwrap());
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    client.write_at(&data, 0).unwrap();
    server.shutdown().unwrap();

    // Reads issued while the server is down wait for it to come back.
    let reader = {
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            client.read_at(&mut buf, 0).map(|()| buf)
        })
    };
    // The client reconnects only to send something: a connection here means the read was sent
    // while nothing listened (its attempts until now were refused). Closing it unanswered is one
    // more failed attempt.
    let listener = port.listener().unwrap();
    let (attempted, attempt) = mpsc::channel();
    std::thread::spawn(move || {
        let accepted = listener.accept().map(drop);
        attempted.send((listener, accepted))
    });
    let Ok((listener, accepted)) = attempt.recv_timeout(Duration::from_secs(60)) else {
        panic!("the client has not tried to reconnect in 60 s");
    };
    accepted.unwrap();
    let config = config(Arc::new(File::open(&path).unwrap()));
    let _restarted = ServerHandle::start_tcp_listener(Server::new(config).unwrap(), listener).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), data);
}

#[test]
fn a_restarted_server_whose_memory_is_gone_is_an_error_not_zeroes() {
    let volatile = |backend: Arc<Memory>| Export::new("default", backend).volatile();
    let port = HeldPort::new();
    let server = serve_on(
        &port,
        ServerConfig::new(volatile(Arc::new(Memory::new(1 << 20))), ServerSecurity::Plaintext),
    );
    let mut options = plain_options(None);
    options.timeout = Duration::from_secs(60);
    let client = RemoteBackend::connect(tcp(&server), options).unwrap();
    assert_ne!(client.info().flags & proto::export_flags::VOLATILE, 0);
    client.write_at(&[7u8; 4096], 0).unwrap();
    server.shutdown().unwrap();

    // The same size and chunk size, on the same address: only the instance tells it apart.
    let _restarted = serve_on(
        &port,
        ServerConfig::new(volatile(Arc::new(Memory::new(1 << 20))), ServerSecurity::Plaintext),
    );
    let mut buf = [0u8; 4096];
    let err = client.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    assert!(err.to_string().contains("restarted"), "{err}");
    assert_eq!(buf, [0u8; 4096], "nothing was read");
}

#[test]
fn a_server_that_never_comes_back_is_a_timeout() {
    // The port stays held: reconnecting is refused until the deadline, whatever else runs.
    let port = HeldPort::new();
    let server = serve_on(
        &port,
        ServerConfig::new(Export::new("default", Arc::new(Memory::new(4096))), ServerSecurity::Plaintext),
    );
    let mut options = plain_options(None);
    options.timeout = Duration::from_millis(500);
    let client = RemoteBackend::connect(tcp(&server), options).unwrap();
    server.shutdown().unwrap();
    let started = Instant::now();
    let err = client.read_at(&mut [0u8; 10], 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    // The deadline that fired is the one configured here (the default is 30 s), and it was
    // waited for: the read did not give up at the first refused connection.
    assert!(err.to_string().contains("within 500ms"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(500), "gave up after {:?}", started.elapsed());
}

#[test]
fn a_silent_client_does_not_hold_up_shutdown() {
    let pki = pki();
    let tls = server_tls(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None).unwrap();
    // A silent client stalls the TLS handshake on one server, the hello on the other.
    for (security, options) in [
        (ServerSecurity::Plaintext, plain_options(None)),
        (ServerSecurity::Tls(tls), tls_options(pki.ca.pem(), None, None)),
    ] {
        let mut config = ServerConfig::new(Export::new("default", Arc::new(Memory::new(4096))), security);
        // Far longer than the test may run: only shutdown can end the silent client's handshake.
        config.handshake_timeout = Duration::from_secs(3600);
        let server = ServerHandle::start_tcp(Server::new(config).unwrap(), any_port()).unwrap();
        let silent = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        // Connections are accepted in order: once a later client is through its handshake, the
        // server has taken the silent one and waits for its handshake.
        let later = RemoteBackend::connect(tcp(&server), options).unwrap();
        let (done, shut) = mpsc::channel();
        std::thread::spawn(move || done.send(server.shutdown()));
        // A watchdog, not a measurement: the handshake would hold shutdown for an hour.
        match shut.recv_timeout(Duration::from_secs(60)) {
            Ok(result) => result.unwrap(),
            Err(_) => panic!("shutdown still waits for the silent client's handshake after 60 s"),
        }
        drop((later, silent));
    }
}

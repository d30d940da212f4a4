//! Transport benchmark: prints, from one run, a raw loopback TCP stream as the baseline, read
//! throughput through the native protocol (plaintext and TLS) and gRPC at several request sizes
//! and depths, and the latency of 4 KiB reads.
//!
//! `cargo bench -p r3map-net --bench transport`; `-- --quick` for a smoke run.

// Benchmark figures are floats and sizes fit in memory.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Memory, SharedBackend};
use r3map_grpc::{GrpcBackend, GrpcClientOptions, GrpcExport, GrpcServer};
use r3map_net::certs::Authority;
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
    client_tls, server_tls,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// One TCP stream on loopback, 1 MiB writes, as fast as it goes.
fn raw_stream(bytes: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sender = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let buf = vec![0x5au8; MIB];
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&buf).expect("write");
            sent += buf.len();
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    let mut got = 0;
    while got < bytes {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early");
        got += n;
    }
    let r = gbps(got as u64, t.elapsed());
    sender.join().expect("sender");
    r
}

/// `depth` threads reading `size`-byte requests at successive offsets for `budget`.
fn throughput(b: &Arc<dyn Backend>, size: usize, depth: usize, budget: Duration) -> f64 {
    let total = b.size();
    let bytes = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for d in 0..depth {
            let b = Arc::clone(b);
            let bytes = &bytes;
            s.spawn(move || {
                let mut buf = vec![0u8; size];
                let slots = total / size as u64;
                let mut i = d as u64;
                while t.elapsed() < budget {
                    let off = (i % slots) * size as u64;
                    b.read_at(&mut buf, off).expect("read");
                    bytes.fetch_add(size as u64, Ordering::Relaxed);
                    i += depth as u64;
                }
            });
        }
    });
    gbps(bytes.load(Ordering::Relaxed), t.elapsed())
}

/// p50 and p99 of single 4 KiB reads, one at a time.
fn latency(b: &Arc<dyn Backend>, samples: usize) -> (Duration, Duration) {
    let mut buf = vec![0u8; 4 * KIB];
    let mut times: Vec<Duration> = (0..samples)
        .map(|i| {
            let t = Instant::now();
            b.read_at(&mut buf, (i as u64 * 4096) % (b.size() - 4096)).expect("read");
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    (times[samples / 2], times[samples * 99 / 100])
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

struct Transport {
    name: &'static str,
    client: Arc<dyn Backend>,
    // Kept alive for the measurements.
    _native: Option<ServerHandle>,
    _grpc: Option<GrpcServer>,
}

/// Serves on a runtime of its own, as a server in another process would: the clients run on the
/// process's shared one ([`r3map_net::Io::shared`]), and sharing its two threads with the servers
/// would measure the two sides competing for them, not the protocol.
fn serve_apart(server: Server) -> std::io::Result<ServerHandle> {
    static SERVERS: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = SERVERS.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-server")
            .enable_all()
            .build()
            .expect("the servers' runtime")
    });
    let io = r3map_net::Io::from_handle(runtime.handle().clone());
    let listener = r3map_net::serve::Listener::bind_tcp(&io, any_port())?;
    Ok(ServerHandle::start(server, io, listener))
}

fn transports(backend: &SharedBackend) -> Vec<Transport> {
    let mut out = Vec::new();

    let plain = serve_apart(
        Server::new(ServerConfig::new(
            Export::new("default", Arc::clone(backend)),
            ServerSecurity::Plaintext,
        ))
        .expect("server"),
    )
    .expect("start");
    let addr = Address::Tcp { host: "127.0.0.1".into(), port: plain.local_addr().expect("addr").port() };
    let client =
        RemoteBackend::connect(addr, ClientOptions::new(ClientSecurity::Plaintext)).expect("connect");
    out.push(Transport { name: "native", client: Arc::new(client), _native: Some(plain), _grpc: None });

    let plain = serve_apart(
        Server::new(ServerConfig::new(
            Export::new("default", Arc::clone(backend)),
            ServerSecurity::Plaintext,
        ))
        .expect("server"),
    )
    .expect("start");
    let addr = Address::Tcp { host: "127.0.0.1".into(), port: plain.local_addr().expect("addr").port() };
    let mut options = ClientOptions::new(ClientSecurity::Plaintext);
    options.connections = 4;
    let client = RemoteBackend::connect(addr, options).expect("connect");
    out.push(Transport {
        name: "native, 4 connections",
        client: Arc::new(client),
        _native: Some(plain),
        _grpc: None,
    });

    let ca = Authority::new("bench").expect("ca");
    let cert = ca.server(&["localhost"]).expect("cert");
    let tls = server_tls(cert.cert.as_bytes(), cert.key.as_bytes(), None).expect("tls");
    let mut config = ServerConfig::new(Export::new("default", Arc::clone(backend)), ServerSecurity::Tls(tls));
    config.token = Some("bench".into());
    let secure = serve_apart(Server::new(config).expect("server")).expect("start");
    let addr = Address::Tcp { host: "localhost".into(), port: secure.local_addr().expect("addr").port() };
    let mut options = ClientOptions::new(ClientSecurity::Tls {
        config: client_tls(ca.pem().cert.as_bytes(), None).expect("client tls"),
        server_name: None,
    });
    options.token = Some("bench".into());
    let client = RemoteBackend::connect(addr, options).expect("connect");
    out.push(Transport {
        name: "native + TLS",
        client: Arc::new(client),
        _native: Some(secure),
        _grpc: None,
    });

    let grpc = GrpcServer::start(any_port(), GrpcExport::new(Arc::clone(backend))).expect("grpc server");
    let endpoint = format!("http://{}", grpc.local_addr());
    let client =
        GrpcBackend::connect(&endpoint, backend.size(), GrpcClientOptions::default()).expect("grpc client");
    out.push(Transport { name: "gRPC", client: Arc::new(client), _native: None, _grpc: Some(grpc) });
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (size, budget, samples) = if quick {
        (64 * MIB, Duration::from_millis(150), 200)
    } else {
        (512 * MIB, Duration::from_secs(1), 5000)
    };
    println!("# r3map transport benchmark{}\n", if quick { " (quick smoke run)" } else { "" });

    // The machine is noisy: the baseline is the median of three runs, each figure the best of two.
    let mut raws: Vec<f64> = (0..3).map(|_| raw_stream(if quick { 256 * MIB } else { 2048 * MIB })).collect();
    raws.sort_by(f64::total_cmp);
    let raw = raws[1];
    println!("Baseline: one raw TCP stream on loopback, 1 MiB writes: **{raw:.2} GB/s** (median of 3)\n");

    let memory = Memory::new(size as u64);
    let fill = vec![0xa5u8; MIB];
    for off in (0..size).step_by(MIB) {
        memory.write_at(&fill, off as u64).expect("fill");
    }
    let backend: SharedBackend = Arc::new(memory);
    let transports = transports(&backend);

    println!("## Read throughput (GB/s; ratio to the raw stream)\n");
    print!("| request | in flight |");
    for t in &transports {
        print!(" {} |", t.name);
    }
    print!("\n|---|---|");
    for _ in &transports {
        print!("---|");
    }
    println!();
    for req in [4 * KIB, 64 * KIB, MIB] {
        for depth in [1, 16] {
            print!("| {} KiB | {depth} |", req / KIB);
            for t in &transports {
                let r = (0..if quick { 1 } else { 2 })
                    .map(|_| throughput(&t.client, req, depth, budget))
                    .fold(0.0, f64::max);
                print!(" {r:.3} ({:.2}) |", r / raw);
            }
            println!();
        }
    }

    println!("\n## Latency of one 4 KiB read at a time\n\n| transport | p50 | p99 |\n|---|---|---|");
    for t in &transports {
        let (p50, p99) = latency(&t.client, samples);
        println!("| {} | {p50:.1?} | {p99:.1?} |", t.name);
    }
}

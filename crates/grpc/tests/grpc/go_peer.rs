//! Against a Go peer (`tests/go-peer/main.go`): Go's gRPC with code generated from our `.proto`
//! files, as a client of our server and as a server of our clients. Built here with Debian's Go
//! toolchain and packages, in GOPATH mode and without the network; skipped when they are not
//! installed (`scripts/test.sh` installs them).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use r3map_core::{Backend, Chunk, Memory, Seeder, Tracked, conformance};
use r3map_grpc::{GrpcBackend, GrpcClientOptions, GrpcExport, GrpcSeeder, GrpcServer};
use r3map_testkit::Daemon;

use crate::{Served, any_port, shared};

/// Where Debian's Go packages put their sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// The tools and Debian packages the build needs: a program to run, or a source directory.
const TOOLS: [(&str, &str); 4] = [
    ("go", "golang-go"),
    ("protoc", "protobuf-compiler"),
    ("protoc-gen-go", "protoc-gen-go"),
    ("protoc-gen-go-grpc", "protoc-gen-go-grpc"),
];
const SOURCES: [(&str, &str); 2] = [
    ("src/google.golang.org/grpc", "golang-google-grpc-dev"),
    ("src/google.golang.org/protobuf", "golang-google-protobuf-dev"),
];

/// The seeder's chunk size, on both sides.
const CHUNK: u64 = 4096;

/// A size that is no multiple of the chunk size nor of the pieces either side cuts its calls in.
const SIZE: u64 = 2 * 1024 * 1024 + 12_345;

/// The Go server uses gRPC's default limits, as the Go r3map does: it takes messages of at most
/// 4 MiB, so our client sends less (see `GrpcClientOptions::max_write`).
fn go_options() -> GrpcClientOptions {
    let limit = 4 * 1024 * 1024 - 64 * 1024;
    GrpcClientOptions { max_read: limit, max_write: limit, ..GrpcClientOptions::default() }
}

/// The Go client's pattern: the byte at offset `i`.
fn pattern(i: u64) -> u8 {
    ((i % 251) as u8) ^ ((i / 251) as u8)
}

/// The Go client's writes during its migration, `(offset, length)`; the k-th writes `0xE0 + k`.
fn seeder_writes(size: u64) -> [(u64, u64); 3] {
    [(CHUNK + 7, 10), (3 * CHUNK - 1, 2), (size - 1, 1)]
}

/// The built Go program, in a directory of its own that goes with it.
struct GoPeer {
    program: PathBuf,
    _dir: tempfile::TempDir,
}

impl GoPeer {
    /// Generates the Go code from `proto/` and builds the program, or says why it cannot and
    /// returns `None` when a tool or package is missing.
    fn build() -> Option<Self> {
        for (tool, _package) in TOOLS {
            // `--version` is not everyone's flag, but any answer means it is installed.
            let found = Command::new(tool).arg("--version").output();
            if matches!(&found, Err(e) if e.kind() == io::ErrorKind::NotFound) {
                println!("skipped: {tool} not installed (scripts/test.sh installs it)");
                return None;
            }
        }
        for (dir, package) in SOURCES {
            if !Path::new(DEBIAN_GOPATH).join(dir).is_dir() {
                println!("skipped: {package} not installed (scripts/test.sh installs it)");
                return None;
            }
        }
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir =
            tempfile::Builder::new().prefix("go-peer-").tempdir_in(target_tmp).expect("a build directory");
        let src = dir.path().join("src");
        std::fs::create_dir(&src).expect("the GOPATH's src");
        let started = Instant::now();

        // The generated packages land at their go_package paths, github.com/pojntfx/r3map/...,
        // which the program imports as the Go r3map's own code does.
        let mut protoc = Command::new("protoc");
        protoc
            .arg("-I")
            .arg(crate_dir.join("proto"))
            .arg(format!("--go_out={}", src.display()))
            .arg(format!("--go-grpc_out={}", src.display()))
            .args(["mount/v1/backend.proto", "migration/v1/seeder.proto"]);
        succeed(&mut protoc, "generating the Go code");

        let program = dir.path().join("go-peer");
        let gopath = std::env::join_paths([dir.path(), Path::new(DEBIAN_GOPATH)]).expect("a GOPATH");
        let mut go = Command::new("go");
        go.arg("build")
            .arg("-o")
            .arg(&program)
            .arg(crate_dir.join("tests/go-peer/main.go"))
            // GOPATH mode over Debian's sources: no module, no proxy, no download.
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOENV", "off")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            // Kept between runs, so that only the first builds Go's gRPC.
            .env("GOCACHE", target_tmp.join("go-build-cache"));
        succeed(&mut go, "building the Go peer");
        println!("generated and built the Go peer in {:.1} s", started.elapsed().as_secs_f64());
        Some(Self { program, _dir: dir })
    }

    /// Starts the Go server over `size` bytes of memory; returns it and its address once it
    /// listens.
    fn server(&self, size: u64) -> (Daemon, SocketAddr) {
        let mut command = Command::new(&self.program);
        command.args(["server", "-size", &size.to_string(), "-chunk", &CHUNK.to_string()]);
        let daemon = Daemon::start(command, "listening on ").expect("the Go server starts");
        let line = daemon.wait_for_line("listening on ");
        let addr = line.trim_start_matches("listening on ").parse().unwrap_or_else(|e| {
            panic!("the Go server printed {line:?}, not an address: {e}");
        });
        (daemon, addr)
    }

    /// Runs the Go client against `server` to its end; returns its result line, or panics with
    /// its output when it fails.
    fn client(&self, server: &GrpcServer, size: u64, seeder: bool) -> String {
        let mut command = Command::new(&self.program);
        command.args([
            "client",
            "-addr",
            &server.local_addr().to_string(),
            "-size",
            &size.to_string(),
            "-chunk",
            &CHUNK.to_string(),
        ]);
        if seeder {
            command.arg("-seeder");
        }
        // The client gives up by itself after 60 s, so this cannot hang.
        let output = succeed(&mut command, "the Go client");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let result = stdout.lines().find(|l| l.starts_with("result: ")).unwrap_or_default();
        assert!(result.starts_with("result: ok"), "the Go client printed no result:\n{stdout}");
        println!("{result}");
        result.to_owned()
    }
}

/// Runs `command` to its end and panics with its output unless it succeeds.
fn succeed(command: &mut Command, what: &str) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {command:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

/// A backend (and seeder) that records the calls that are not reads or writes.
struct Recording<B> {
    inner: B,
    calls: Mutex<Vec<&'static str>>,
}

impl<B> Recording<B> {
    fn new(inner: B) -> Arc<Self> {
        Arc::new(Self { inner, calls: Mutex::new(Vec::new()) })
    }

    fn record(&self, call: &'static str) {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).push(call);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl<B: Backend> Backend for Recording<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.record("flush");
        self.inner.flush()
    }
}

impl<B: Backend + Seeder> Seeder for Recording<B> {
    fn chunk_size(&self) -> u64 {
        Seeder::chunk_size(&self.inner)
    }
    fn track(&self) -> io::Result<()> {
        self.record("track");
        Seeder::track(&self.inner)
    }
    fn sync(&self) -> io::Result<Vec<Chunk>> {
        self.record("sync");
        Seeder::sync(&self.inner)
    }
    fn close(&self) -> io::Result<()> {
        self.record("close");
        Seeder::close(&self.inner)
    }
}

/// Panics at the first byte of `backend` that differs from `model`.
fn assert_holds(backend: &dyn Backend, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    backend.read_at(&mut got, 0).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(g, m)| g != m) {
        panic!("byte {i} holds {} but the Go client wrote {}", got[i], model[i]);
    }
}

#[test]
fn the_go_client_writes_and_reads_our_server() {
    let Some(peer) = GoPeer::build() else { return };
    let memory = Recording::new(Memory::new(SIZE));
    let server = GrpcServer::start(any_port(), GrpcExport::new(memory.clone())).unwrap();
    peer.client(&server, SIZE, false);
    let model: Vec<u8> = (0..SIZE).map(pattern).collect();
    assert_holds(&memory.inner, &model);
    assert_eq!(memory.calls(), ["flush"], "the Go client's Sync flushes the backend");
}

#[test]
fn the_go_client_migrates_from_our_seeder() {
    let Some(peer) = GoPeer::build() else { return };
    let size = 64 * CHUNK + 100;
    let tracked = Recording::new(Tracked::new(Memory::new(size), CHUNK).unwrap());
    let export = GrpcExport { seeder: Some(tracked.clone()), ..GrpcExport::new(tracked.clone()) };
    let server = GrpcServer::start(any_port(), export).unwrap();
    // The client checks what Sync answers against the writes it made; here, what they left.
    peer.client(&server, size, true);
    let mut model: Vec<u8> = (0..size).map(pattern).collect();
    for (k, (off, len)) in seeder_writes(size).into_iter().enumerate() {
        model[off as usize..(off + len) as usize].fill(0xE0 + k as u8);
    }
    assert_holds(&tracked.inner, &model);
    assert_eq!(tracked.calls(), ["flush", "track", "sync", "close"]);
    assert!(!tracked.inner.is_tracking(), "Sync stopped tracking");
}

/// Our client on a Go server of its own.
fn go_served(peer: &GoPeer, size: u64) -> Served<Daemon> {
    let (server, addr) = peer.server(size);
    let client = GrpcBackend::connect(&format!("http://{addr}"), size, go_options()).unwrap();
    Served { client, _server: server }
}

#[test]
fn our_client_passes_conformance_against_the_go_server() {
    let Some(peer) = GoPeer::build() else { return };
    conformance::run(&|size| shared(go_served(&peer, size)));
}

#[test]
fn our_client_fits_its_calls_to_the_go_servers_default_limits() {
    let Some(peer) = GoPeer::build() else { return };
    // 10 MiB: more than the 4 MiB a Go server takes in one message.
    let size = 10 << 20;
    let (server, addr) = peer.server(size);
    let endpoint = format!("http://{addr}");
    let client = GrpcBackend::connect(&endpoint, size, go_options()).unwrap();
    let data: Vec<u8> = (0..size).map(|i| pattern(i * 3)).collect();
    client.write_at(&data, 0).unwrap();
    assert_holds(&client, &data);
    client.flush().unwrap();
    server.wait_for_line("call Backend.Sync");

    // With the default 32 MiB a write of 5 MiB is one message, which the Go server refuses.
    let default = GrpcBackend::connect(&endpoint, size, GrpcClientOptions::default()).unwrap();
    let err = default.write_at(&data[..5 << 20], 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded, "{err}");
    assert!(err.to_string().contains("ResourceExhausted"), "{err}");
}

#[test]
fn our_seeder_client_against_the_go_seeder() {
    let Some(peer) = GoPeer::build() else { return };
    let size = 64 * CHUNK + 100;
    let (server, addr) = peer.server(size);
    let endpoint = format!("http://{addr}");
    let seeder = GrpcSeeder::connect(&endpoint, CHUNK, go_options()).unwrap();
    let backend = GrpcBackend::connect(&endpoint, size, go_options()).unwrap();

    backend.write_at(&[1u8; 10], 0).unwrap(); // before Track: not recorded
    seeder.track().unwrap();
    server.wait_for_line("call Seeder.Track");
    backend.write_at(&[2u8; 10], 5 * CHUNK + 7).unwrap();
    backend.write_at(&[3u8; 2], 2 * CHUNK - 1).unwrap(); // crosses into chunk 2
    backend.write_at(&[4u8; 50], 64 * CHUNK).unwrap(); // the short tail chunk
    assert_eq!(seeder.sync().unwrap(), vec![Chunk(1), Chunk(2), Chunk(5), Chunk(64)]);
    server.wait_for_line("call Seeder.Sync dirty=4");
    assert_eq!(seeder.sync().unwrap(), vec![], "Sync stops tracking and clears");

    // The source's data, read through the Seeder service: what a destination pulls.
    let source = seeder.source(size);
    let mut model = vec![0u8; size as usize];
    model[..10].fill(1);
    model[(5 * CHUNK + 7) as usize..][..10].fill(2);
    model[(2 * CHUNK - 1) as usize..][..2].fill(3);
    model[(64 * CHUNK) as usize..][..50].fill(4);
    assert_holds(&source, &model);
    let mut tail = [0u8; 100];
    source.read_at(&mut tail, size - 100).unwrap();
    assert_eq!(tail[..50], [4u8; 50]);
    seeder.close().unwrap();
    server.wait_for_line("call Seeder.Close");
}

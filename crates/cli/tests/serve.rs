//! `r3map serve`, `r3map certs` and `ram-ul` as processes, used by an r3map client: every
//! transport, credentials, metrics, a clean Ctrl-C, and a server killed with SIGKILL mid-transfer.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use r3map_core::Seeder as _;
use r3map_core::{Backend, Memory};
use r3map_net::RemoteBackend;

mod common;
use common::{Gate, Proc, Relay, STARTUP, Upstream, scrape};

const R3MAP: &str = env!("CARGO_BIN_EXE_r3map");
const RAM_UL: &str = env!("CARGO_BIN_EXE_ram-ul");

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Writes, reads back and flushes a pattern that crosses chunk boundaries at odd offsets.
fn round_trip(client: &RemoteBackend, seed: u64) -> (u64, Vec<u8>) {
    let off = 4096 * 3 + 17;
    let data = pattern(seed, 200_000);
    client.write_at(&data, off).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(&mut back, off).unwrap();
    assert!(back == data, "read back different data");
    client.flush().unwrap();
    (off, data)
}

fn run(bin: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin).args(args).env_remove("R3MAP_TOKEN").env("RUST_BACKTRACE", "0").output().unwrap()
}

#[test]
fn plaintext_tcp_is_refused_without_the_flag_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    let url = format!("file://{}?size=1MiB", path.display());
    let out = run(R3MAP, &["serve", &url, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for w in ["refusing to serve TCP", "--tls-cert", "--insecure-plaintext", "--unix", "r3map certs"] {
        assert!(err.contains(w), "{w:?} missing from:\n{err}");
    }
    assert!(!path.exists(), "the backend was created before the flags were checked");
    // ram-ul asks for the same choice.
    let out = run(RAM_UL, &["--backend", "memory", "--size", "1MiB", "--addr", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-plaintext"));
}

#[test]
fn plaintext_round_trip_and_ctrl_c_flushes_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let url = format!("file://{}?size=4MiB", path.display());
    let mut server = Proc::start(
        R3MAP,
        &["serve", &url, "--insecure-plaintext", "--listen", "127.0.0.1:0"],
        dir.path(),
        &[],
    );
    assert!(
        server.ready.contains("4.0 MiB") && server.ready.contains("plaintext, no token"),
        "{}",
        server.ready
    );
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    assert_eq!(client.size(), 4 << 20);
    let (off, data) = round_trip(&client, 1);
    // A last write without a flush, and a connection left open: Ctrl-C must still stop the server
    // promptly, after flushing.
    client.write_at(b"last words", 0).unwrap();
    server.interrupt();
    let status = server.wait(STARTUP);
    assert!(status.success(), "{status}:\n{}", server.stderr());
    let log = server.stderr();
    assert!(log.contains("SIGINT") && log.contains("backend is flushed"), "{log}");
    let file = fs::read(&path).unwrap();
    assert_eq!(&file[..10], b"last words");
    let off = usize::try_from(off).unwrap();
    assert!(file[off..off + data.len()] == data[..]);
}

/// The first Ctrl-C waits for the requests in flight; a second one, while it waits, exits at once
/// with 130. The request in flight is a read the server's own storage holds (a gate in this
/// process) until the test has seen the server exit.
#[test]
fn a_second_ctrl_c_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(dir.path(), Gate::new(Memory::new(1 << 20), 0));
    // The server's own client of its storage must not give up on the held read meanwhile.
    let storage = format!("{}&timeout=600", upstream.url);
    let mut server = Proc::start(
        R3MAP,
        &["serve", &storage, "--insecure-plaintext", "--listen", "127.0.0.1:0"],
        dir.path(),
        &[],
    );
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    // Its answer never comes: the client is left behind when the test ends.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let _ = client.read_at(&mut buf, 0);
    });
    upstream.gate.wait_held();
    server.interrupt();
    server.wait_for_log("SIGINT: stopping");
    assert!(server.child.try_wait().unwrap().is_none(), "the server did not wait for the read in flight");
    server.interrupt();
    let status = server.wait(STARTUP);
    assert_eq!(status.code(), Some(130), "{status}:\n{}", server.stderr());
    assert!(server.stderr().contains("again: exiting at once"), "{}", server.stderr());
}

#[test]
fn tls_with_certificates_from_r3map_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki_s = pki.display().to_string();
    let out = run(R3MAP, &["certs", "--out", &pki_s, "--client", "alice", "--server-name", "127.0.0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("--tls-client-ca") && printed.contains("r3map://127.0.0.1:1337/default?ca="),
        "{printed}"
    );
    // Refuses to overwrite.
    let again = run(R3MAP, &["certs", "--out", &pki_s]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));

    let p = |f: &str| pki.join(f).display().to_string();
    let token = dir.path().join("token");
    fs::write(&token, "sesame\n").unwrap();
    let server = Proc::start(
        R3MAP,
        &[
            "serve",
            "memory:8MiB",
            "--listen",
            "127.0.0.1:0",
            "--export",
            "disk",
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server-key.pem"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--token-file",
            &token.display().to_string(),
        ],
        dir.path(),
        &[],
    );
    assert!(server.ready.contains("TLS 1.3, client certificates, token"), "{}", server.ready);
    let base = format!("r3map://{}/disk?ca={}&token=sesame", server.tcp(), p("ca.pem"));
    let client = RemoteBackend::open(&format!(
        "{base}&cert={}&key={}",
        p("client-alice.pem"),
        p("client-alice-key.pem")
    ))
    .unwrap();
    assert_eq!(client.size(), 8 << 20);
    round_trip(&client, 2);
    // Without a client certificate, or with the wrong token, nobody gets in.
    assert!(RemoteBackend::open(&base).is_err());
    let wrong = format!(
        "r3map://{}/disk?ca={}&token=open&cert={}&key={}",
        server.tcp(),
        p("ca.pem"),
        p("client-alice.pem"),
        p("client-alice-key.pem")
    );
    let err = RemoteBackend::open(&wrong).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
}

#[test]
fn unix_socket_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("r3map.sock");
    let socket_s = socket.display().to_string();
    let mut server = Proc::start(R3MAP, &["serve", "memory:2MiB", "--unix", &socket_s], dir.path(), &[]);
    assert!(
        server.ready.contains(&format!("unix:{socket_s}")) && !server.ready.contains(":1337"),
        "{}",
        server.ready
    );
    let client = RemoteBackend::open(&format!("r3map+unix:///default?socket={socket_s}")).unwrap();
    assert_eq!(client.size(), 2 << 20);
    round_trip(&client, 3);
    server.interrupt();
    assert!(server.wait(STARTUP).success());
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(
        R3MAP,
        &["serve", "memory:1MiB", "--insecure-plaintext", "--listen", "127.0.0.1:0"],
        dir.path(),
        &[("R3MAP_TOKEN", "right")],
    );
    assert!(server.ready.contains("plaintext, token"), "{}", server.ready);
    let url = format!("r3map+plain://{}/default", server.tcp());
    for bad in [format!("{url}?token=wrong"), url.clone()] {
        let err = RemoteBackend::open(&bad).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("token"), "{err}");
    }
    round_trip(&RemoteBackend::open(&format!("{url}?token=right")).unwrap(), 4);
}

#[test]
fn read_only_and_seeder_exports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro");
    fs::write(&path, vec![9u8; 8192]).unwrap();
    let url = format!("file://{}", path.display());
    let ro = Proc::start(
        R3MAP,
        &["serve", &url, "--read-only", "--insecure-plaintext", "--listen", "127.0.0.1:0"],
        dir.path(),
        &[],
    );
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", ro.tcp())).unwrap();
    assert_eq!(client.write_at(&[1], 0).unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    let mut buf = [0u8; 4];
    client.read_at(&mut buf, 8000).unwrap();
    assert_eq!(buf, [9; 4]);

    let seeder = Proc::start(
        R3MAP,
        &[
            "serve",
            "memory:1MiB",
            "--seeder",
            "--chunking",
            "--chunk-size",
            "4KiB",
            "--insecure-plaintext",
            "--listen",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    assert!(seeder.ready.contains("migration source") && seeder.ready.contains("server-side chunking"));
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", seeder.tcp())).unwrap();
    assert_eq!(client.info().chunk_size, 4096);
    client.track().unwrap();
    client.write_at(&[1u8; 5000], 4096 * 3 + 1).unwrap();
    assert_eq!(client.sync().unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 4]);
}

#[test]
fn metrics_are_served_for_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(
        R3MAP,
        &[
            "serve",
            "memory:1MiB",
            "--insecure-plaintext",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    // The port the kernel picked is the one printed.
    let metrics = server.metrics();
    assert!(metrics.starts_with("127.0.0.1:") && !metrics.ends_with(":0"), "{}", server.ready);
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    round_trip(&client, 5);
    let response = scrape(&metrics);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for w in [
        "r3map_server_requests_total{op=\"read\"}",
        "r3map_server_requests_total{op=\"write\"}",
        "r3map_server_connections_total",
    ] {
        assert!(response.contains(w), "{w:?} missing from:\n{response}");
    }
}

/// The server dies with SIGKILL while a client reads and rewrites data it wrote and flushed
/// before; the server comes back on the same file (at the same address for the client: a relay
/// in front of it), and the client carries on through its reconnection with every read correct.
#[test]
fn sigkill_mid_transfer_loses_nothing_that_was_flushed() {
    const BLOCK: usize = 1 << 20;
    const BLOCKS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}?size=64MiB", dir.path().join("x").display());
    let args = ["serve", url.as_str(), "--insecure-plaintext", "--listen", "127.0.0.1:0"];
    let mut server = Proc::start(R3MAP, &args, dir.path(), &[]);
    let relay = Relay::start(&server.tcp());
    let client =
        Arc::new(RemoteBackend::open(&format!("r3map+plain://{}/default?timeout=60", relay.addr())).unwrap());
    assert_eq!(client.size(), 64 << 20);
    let block = |i: u64| pattern(100 + i, BLOCK);
    for i in 0..BLOCKS {
        client.write_at(&block(i), i * BLOCK as u64).unwrap();
    }
    client.flush().unwrap();

    let progress = Arc::new(AtomicU64::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let worker = {
        let (client, progress, restarted) =
            (Arc::clone(&client), Arc::clone(&progress), Arc::clone(&restarted));
        std::thread::spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; BLOCK];
            let mut rounds_after_restart = 0;
            while rounds_after_restart < 2 {
                let after = restarted.load(Ordering::SeqCst);
                for i in 0..BLOCKS {
                    let off = i * BLOCK as u64;
                    client.read_at(&mut buf, off).map_err(|e| format!("read of block {i}: {e}"))?;
                    if buf != block(i) {
                        return Err(format!("block {i} read back wrong"));
                    }
                    client.write_at(&block(i), off).map_err(|e| format!("rewrite of block {i}: {e}"))?;
                    if i % 4 == 3 {
                        client.flush().map_err(|e| format!("flush: {e}"))?;
                    }
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                if after {
                    rounds_after_restart += 1;
                }
            }
            Ok(progress.load(Ordering::SeqCst))
        })
    };
    // Kill it in the middle of the second round.
    let deadline = Instant::now() + STARTUP;
    while progress.load(Ordering::SeqCst) < BLOCKS + 5 {
        assert!(!worker.is_finished(), "the client stopped early");
        assert!(Instant::now() < deadline, "the client made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Until the new server is up, the client's reconnections find nobody (and never a server
    // that took the old port meanwhile).
    relay.set_upstream(None);
    server.kill();
    let at_kill = progress.load(Ordering::SeqCst);
    drop(server);
    let server = Proc::start(R3MAP, &args, dir.path(), &[]);
    relay.set_upstream(Some(&server.tcp()));
    restarted.store(true, Ordering::SeqCst);
    let done = worker.join().unwrap().unwrap();
    assert!(done >= at_kill + 2 * BLOCKS, "{done} blocks done, {at_kill} at the kill");
    let mut buf = vec![0u8; BLOCK];
    for i in 0..BLOCKS {
        client.read_at(&mut buf, i * BLOCK as u64).unwrap();
        assert!(buf == block(i), "block {i} differs at the end");
    }
}

#[test]
fn ram_ul_serves_memory_of_the_right_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(
        RAM_UL,
        &["--backend", "memory", "--size", "8388608", "--addr", "127.0.0.1:0", "--insecure-plaintext"],
        dir.path(),
        &[],
    );
    assert!(server.ready.contains("8.0 MiB of memory") && server.ready.contains("server-side chunking"));
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    assert_eq!(client.size(), 8 << 20);
    assert_eq!(client.info().chunk_size, 4096);
    round_trip(&client, 6);
}

#[test]
fn a_client_refuses_a_restarted_ram_ul_whose_storage_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("ram").display().to_string();
    let args = ["--location", &location, "--size", "1MiB", "--addr", "127.0.0.1:0", "--insecure-plaintext"];
    let server = Proc::start(RAM_UL, &args, dir.path(), &[]);
    // The client keeps one address (the relay's) across the restart.
    let relay = Relay::start(&server.tcp());
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default?timeout=60", relay.addr())).unwrap();
    client.write_at(&[9u8; 4096], 0).unwrap();
    relay.set_upstream(None);
    drop(server);
    let restarted = Proc::start(RAM_UL, &args, dir.path(), &[]);
    relay.set_upstream(Some(&restarted.tcp()));
    let mut buf = [0u8; 4096];
    let e = client.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("restarted"), "{e}");
}

#[test]
fn ram_ul_directory_and_file_backends_start_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = dir.path().join("chunks");
    fs::create_dir(&chunks).unwrap();
    fs::write(chunks.join("99"), "stale").unwrap();
    let chunks_s = chunks.display().to_string();
    let server = Proc::start(
        RAM_UL,
        &[
            "--backend",
            "directory",
            "--location",
            &chunks_s,
            "--size",
            "2MiB",
            "--addr",
            "127.0.0.1:0",
            "--insecure-plaintext",
        ],
        dir.path(),
        &[],
    );
    assert!(!chunks.join("99").exists(), "the old location was not cleared");
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    assert_eq!(client.size(), 2 << 20);
    round_trip(&client, 7);
    assert!(chunks.join("3").exists() && chunks.join("51").exists(), "no chunk files were written");
    drop(server);

    // The file backend, with chunking off, replaces what the directory backend left.
    let server = Proc::start(
        RAM_UL,
        &[
            "--location",
            &chunks_s,
            "--size",
            "1048576",
            "--chunking=false",
            "--addr",
            "127.0.0.1:0",
            "--insecure-plaintext",
        ],
        dir.path(),
        &[],
    );
    assert!(!server.ready.contains("chunking"), "{}", server.ready);
    assert_eq!(fs::metadata(&chunks).unwrap().len(), 1 << 20);
    let client = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    assert_eq!(client.size(), 1 << 20);
    round_trip(&client, 8);
}

#[test]
fn grpc_serves_the_go_services_beside_the_native_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(
        R3MAP,
        &[
            "serve",
            "memory:1MiB",
            "--seeder",
            "--insecure-plaintext",
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    let (_, after) = server.ready.split_once("gRPC ").expect("a gRPC address in the ready line");
    let grpc_addr = after.split(' ').next().unwrap().to_owned();
    assert!(grpc_addr.starts_with("127.0.0.1:") && !grpc_addr.ends_with(":0"), "{}", server.ready);
    let native = RemoteBackend::open(&format!("r3map+plain://{}/default", server.tcp())).unwrap();
    let endpoint = format!("http://{grpc_addr}");
    let grpc = r3map_grpc::GrpcBackend::connect(&endpoint, 1 << 20, r3map_grpc::GrpcClientOptions::default())
        .unwrap();
    // Writes through one protocol are read through the other.
    grpc.write_at(&[3u8; 5000], 100).unwrap();
    let mut buf = [0u8; 5000];
    native.read_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [3u8; 5000]);
    // The Seeder service is there too.
    let seeder =
        r3map_grpc::GrpcSeeder::connect(&endpoint, 64 * 1024, r3map_grpc::GrpcClientOptions::default())
            .unwrap();
    seeder.track().unwrap();
    native.write_at(&[1], 70_000).unwrap();
    assert_eq!(seeder.sync().unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn grpc_over_tls_needs_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = run(R3MAP, &["certs", "--out", certs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = |name: &str| certs.join(name).to_str().unwrap().to_owned();
    let out = run(
        R3MAP,
        &[
            "serve",
            "memory:1MiB",
            "--tls-cert",
            &pem("server.pem"),
            "--tls-key",
            &pem("server-key.pem"),
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--grpc needs --tls-client-ca"));
}

/// A managed mount gets SIGINT while a program writes and fsyncs blocks; whatever was fsynced
/// reaches the remote, and the mount exits 0. The mount's final flush is held at the remote (a
/// gate in this process) while the program writes a few more blocks and closes the file, so
/// those writes race the shutdown, and the file is closed before the mount unmounts, whatever
/// the timing (the mount would otherwise give up waiting for it and detach lazily).
#[test]
fn sigint_during_writes_to_a_mount_loses_no_fsynced_data() {
    if !r3map_fuse::can_mount() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    const BLOCK: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(dir.path(), Gate::new(Memory::new(16 << 20), u64::MAX));
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt_arg = mnt.to_str().unwrap();
    let mut mount = Proc::start(
        R3MAP,
        &["mount", &upstream.url, mnt_arg, "--managed", "--push-interval", "1h"],
        dir.path(),
        &[],
    );

    // Write blocks and fsync each; interrupt the mount after the 21st.
    let file = fs::OpenOptions::new().read(true).write(true).open(mnt.join("r3map")).unwrap();
    let write = |i: usize| {
        let block = pattern(500 + i as u64, BLOCK);
        std::os::unix::fs::FileExt::write_all_at(&file, &block, (i * BLOCK) as u64)?;
        file.sync_all()
    };
    for i in 0..=20 {
        write(i).unwrap_or_else(|e| panic!("block {i}: {e}"));
    }
    let mut fsynced = 21;
    upstream.gate.hold_next_flush();
    mount.interrupt();
    // The mount is stopping: its flush waits at the remote, and it cannot unmount yet.
    upstream.gate.wait_held();
    for i in 21..24 {
        // Still served, or refused cleanly: either way, not lost once fsynced.
        if write(i).is_err() {
            break;
        }
        fsynced = i + 1;
    }
    drop(file);
    upstream.gate.release();
    assert!(mount.wait(STARTUP).success(), "the mount exits 0 on SIGINT:\n{}", mount.stderr());

    // Everything fsynced is at the remote.
    let remote = upstream.contents();
    for i in 0..fsynced {
        assert!(
            remote[i * BLOCK..(i + 1) * BLOCK] == pattern(500 + i as u64, BLOCK),
            "fsynced block {i} is missing at the remote"
        );
    }
}

#[test]
fn cleanup_detaches_a_stale_mount() {
    if !r3map_fuse::can_mount() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt_arg = mnt.to_str().unwrap();
    let mut mount = Proc::start(R3MAP, &["mount", "memory:8MiB", mnt_arg, "--loop"], dir.path(), &[]);
    assert!(mount.ready.contains("/dev/loop"), "{}", mount.ready);
    // A crash: the mount stays behind, its file no longer answers.
    mount.child.kill().unwrap();
    mount.child.wait().unwrap();
    let out = run(R3MAP, &["cleanup", mnt_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("detached /dev/loop") && said.contains("unmounted the stale mount"), "{said}");
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0, "the mount point is an empty directory again");
    let out = run(R3MAP, &["cleanup", mnt_arg]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"));
}

/// The NBD TCP address from a ready line (`... NBD 127.0.0.1:PORT [...]`).
fn nbd_addr(ready: &str) -> String {
    let (_, after) = ready.split_once("NBD ").expect("an NBD address in the ready line");
    after.split(' ').next().unwrap().to_owned()
}

/// Whether `tool` is installed; prints the skip notice when it is not.
fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        println!("skipped: {tool} not installed");
    }
    found
}

#[test]
fn nbd_clients_use_r3map_serve_over_tcp_and_unix() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    let url = format!("file://{}?size=16MiB", file.display());
    let mut server = Proc::start(
        R3MAP,
        &[
            "serve",
            &url,
            "--export",
            "disk",
            "--nbd",
            "127.0.0.1:0",
            "--nbd-unix",
            &sock.display().to_string(),
            "--nbd-preferred-block",
            "64KiB",
            "--insecure-plaintext",
            "--metrics",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    let metrics = server.metrics();
    // Only NBD was asked for: no native listener.
    assert!(!server.ready.contains(":1337"), "{}", server.ready);
    let tcp = format!("nbd://{}/disk", nbd_addr(&server.ready));
    let unix = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = run("qemu-io", &["-f", "raw", &tcp, "-c", "write -P 0x3c 1M 2M", "-c", "flush"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run("qemu-io", &["-f", "raw", &unix, "-c", "read -P 0x3c 1M 2M", "-c", "read -P 0 0 1M"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
    let out = run("nbdinfo", &[&unix]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("export-size: 16777216"), "{text}");
    assert!(text.contains("block_size_preferred: 65536"), "{text}");
    assert!(text.contains("disk.img"), "the description names the backend: {text}");

    let response = scrape(&metrics);
    for w in ["r3map_nbd_requests_total{op=\"write\"}", "r3map_nbd_bytes_total{direction=\"read\"}"] {
        assert!(response.contains(w), "{w:?} missing from:\n{response}");
    }

    server.interrupt();
    assert!(server.wait(STARTUP).success(), "{}", server.stderr());
    let data = fs::read(&file).unwrap();
    assert!(data[1 << 20..3 << 20].iter().all(|&b| b == 0x3c));
    assert!(!sock.exists(), "the NBD socket is removed on exit");
}

#[test]
fn nbd_over_tls_with_certificates_from_r3map_certs() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = run(
        R3MAP,
        &["certs", "--out", &pki.display().to_string(), "--client", "alice", "--server-name", "localhost"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = |f: &str| pki.join(f).display().to_string();
    // libnbd's certificate directory layout.
    let libnbd = dir.path().join("libnbd");
    fs::create_dir(&libnbd).unwrap();
    fs::copy(pki.join("ca.pem"), libnbd.join("ca-cert.pem")).unwrap();
    fs::copy(pki.join("client-alice.pem"), libnbd.join("client-cert.pem")).unwrap();
    fs::copy(pki.join("client-alice-key.pem"), libnbd.join("client-key.pem")).unwrap();
    let tls = ["--tls-cert", &p("server.pem"), "--tls-key", &p("server-key.pem")];

    // A token cannot protect NBD: refused unless client certificates do.
    let mut args = vec!["serve", "memory:4MiB", "--nbd", "127.0.0.1:0", "--token", "t"];
    args.extend_from_slice(&tls);
    let out = run(R3MAP, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-client-ca"));

    let mut args = vec!["serve", "memory:4MiB", "--nbd", "127.0.0.1:0", "--tls-client-ca"];
    let ca = p("ca.pem");
    args.push(&ca);
    args.extend_from_slice(&tls);
    let server = Proc::start(R3MAP, &args, dir.path(), &[]);
    assert!(server.ready.contains("STARTTLS required, client certificates"), "{}", server.ready);
    let port = nbd_addr(&server.ready).rsplit_once(':').unwrap().1.to_owned();
    let uri = format!("nbds://localhost:{port}/default?tls-certificates={}", libnbd.display());
    let out = run("nbdinfo", &[&uri]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("with TLS"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("nbdinfo", &[&format!("nbd://localhost:{port}/default")]);
    assert!(!out.status.success(), "plaintext must be refused");
}

/// An export of `r3map serve --nbd-unix`, mounted lazily through an `nbd+unix://` URL: data
/// written by an NBD client is read through the mount, and what is written through the mount is
/// pushed back to the NBD server when the mount stops.
#[test]
fn an_nbd_export_is_mounted_through_its_url() {
    if !r3map_fuse::can_mount() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let _server =
        Proc::start(R3MAP, &["serve", "memory:16MiB", "--nbd-unix", sock.to_str().unwrap()], dir.path(), &[]);
    let url = format!("nbd+unix:///default?socket={}", sock.display());
    let out = run("qemu-io", &["-f", "raw", &url, "-c", "write -P 0x5a 1M 1M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut mount = Proc::start(R3MAP, &["mount", &url, mnt.to_str().unwrap(), "--managed"], dir.path(), &[]);
    assert!(mount.ready.contains("NBD server unix:"), "{}", mount.ready);
    let file = fs::OpenOptions::new().read(true).write(true).open(mnt.join("r3map")).unwrap();
    let mut back = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 1 << 20).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a), "the mount reads what the NBD client wrote");
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x77; 4096], 4 << 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    mount.interrupt();
    assert!(mount.wait(STARTUP).success(), "{}", mount.stderr());

    let out = run("qemu-io", &["-f", "raw", &url, "-c", "read -P 0x77 4M 4k", "-c", "read -P 0x5a 1M 1M"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
}

/// A `redis-server` on a Unix socket in `dir` (no TCP port), killed when dropped; `None` when it
/// is not installed.
struct Redis {
    child: Child,
    socket: std::path::PathBuf,
}

impl Redis {
    fn start(dir: &Path) -> Option<Self> {
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket", socket.to_str().unwrap(), "--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut redis = Self { child, socket };
        // Redis says nothing when it is ready: its socket accepting is the sign.
        let deadline = Instant::now() + STARTUP;
        while std::os::unix::net::UnixStream::connect(&redis.socket).is_err() {
            if let Some(status) = redis.child.try_wait().unwrap() {
                panic!("redis-server exited ({status}) before it was ready");
            }
            assert!(Instant::now() < deadline, "redis-server did not start within {STARTUP:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_redis_store_is_served_and_outlives_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = Redis::start(dir.path()) else {
        return println!("skipped: redis-server not installed (scripts/test.sh installs it)");
    };
    let url = format!("redis+unix://{}?db=0&size=2MiB&prefix=cli:", redis.socket.display());
    let socket = dir.path().join("r3map.sock").display().to_string();
    let mut server = Proc::start(R3MAP, &["serve", &url, "--unix", &socket], dir.path(), &[]);
    assert!(server.ready.contains(&format!("redis+unix://{}", redis.socket.display())), "{}", server.ready);
    let client = RemoteBackend::open(&format!("r3map+unix:///default?socket={socket}")).unwrap();
    assert_eq!(client.size(), 2 << 20);
    let (off, data) = round_trip(&client, 11);
    drop(client);
    server.interrupt();
    assert!(server.wait(STARTUP).success());
    // The data lives in Redis: a new server of the same URL serves it.
    let mut again = Proc::start(R3MAP, &["serve", &url, "--unix", &socket], dir.path(), &[]);
    let client = RemoteBackend::open(&format!("r3map+unix:///default?socket={socket}")).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(&mut back, off).unwrap();
    assert!(back == data, "the second server read other data");
    drop(client);
    again.interrupt();
    assert!(again.wait(STARTUP).success());
    // An unreachable store fails at once, with the URL in the message.
    let nobody = r3map_testkit::HeldPort::new();
    let dead = format!("redis://{}/0?size=1MiB", nobody.addr());
    let out = run(R3MAP, &["serve", &dead, "--unix", &socket]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the backend") && err.contains(&nobody.addr().to_string()), "{err}");
}

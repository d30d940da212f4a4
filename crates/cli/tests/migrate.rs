//! `r3map migrate seed` and `r3map migrate leech` as separate processes on loopback: a 256 MiB
//! file migrated while the source's demo application keeps rewriting a tenth of it arrives byte
//! for byte, and the source exits once the destination has taken over; a chain A → B → C; a
//! link dropped and a source killed during the pre-copy and the post-copy.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const R3MAP: &str = env!("CARGO_BIN_EXE_r3map");

/// A seeding process, killed when dropped if it is still running.
struct Seed(Child);

impl Drop for Seed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `r3map migrate seed` on a free port and waits for its "serving" line.
fn seed(file: &Path, extra: &[&str]) -> (Seed, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("file://{}", file.display());
    let mut args = vec!["migrate", "seed", &url, "--listen", &listen, "--insecure-plaintext"];
    args.extend_from_slice(extra);
    let mut child =
        Command::new(R3MAP).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.starts_with("serving "), "{line}");
    (Seed(child), format!("r3map+plain://{listen}/default"))
}

fn random_file(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    std::fs::write(path, data).unwrap();
}

fn wait_exit(seed: &mut Seed) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = seed.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the source did not exit after the migration");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_file_is_migrated_while_the_source_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 256 << 20, 1);
    let (mut source, url) = seed(&src, &["--invalidate", "10", "--chunk-size", "64KiB"]);
    let local = format!("file://{}?size=256MiB", dst.display());
    let out = Command::new(R3MAP).args(["migrate", "leech", &url, &local]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("finalized: ") && text.contains("downtime"), "{text}");
    assert!(text.contains("migrated 256 MiB") || text.contains("migrated 256.0 MiB"), "{text}");
    assert!(wait_exit(&mut source).success());
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(), "the copy differs from the source");
}

#[test]
fn finalize_early_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 8 << 20, 2);
    let (mut source, url) = seed(&src, &[]);
    // A local backend of another size is refused before anything happens.
    let wrong = format!("file://{}?size=4MiB", dir.path().join("wrong.img").display());
    let out = Command::new(R3MAP).args(["migrate", "leech", &url, &wrong]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("source's size"));
    // Finalizing at half way: the rest arrives in the post-copy.
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=8MiB", dst.display());
    let out =
        Command::new(R3MAP).args(["migrate", "leech", &url, &local, "--finalize-at", "50"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_exit(&mut source).success());
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
    let out = Command::new(R3MAP)
        .args(["migrate", "leech", &url, &local, "--finalize-at", "150"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn a_migration_over_tls_with_r3map_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = Command::new(R3MAP)
        .args(["certs", "--out", pki.to_str().unwrap(), "--client", "dest", "--server-name", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = |f: &str| pki.join(f).display().to_string();
    let src = dir.path().join("src.img");
    random_file(&src, 8 << 20, 3);
    let (cert, key, ca) = (p("server.pem"), p("server-key.pem"), p("ca.pem"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("file://{}", src.display());
    let mut child = Command::new(R3MAP)
        .args(["migrate", "seed", &url, "--listen", &listen, "--tls-cert", &cert, "--tls-key", &key])
        .args(["--tls-client-ca", &ca, "--invalidate", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut source = Seed(child);
    assert!(line.contains("TLS 1.3, client certificates"), "{line}");
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=8MiB", dst.display());
    // Without a client certificate the source refuses the destination.
    let bare = format!("r3map://{listen}/default?ca={ca}");
    let out = Command::new(R3MAP).args(["migrate", "leech", &bare, &local]).output().unwrap();
    assert!(!out.status.success());
    let full = format!("{bare}&cert={}&key={}", p("client-dest.pem"), p("client-dest-key.pem"));
    let out = Command::new(R3MAP).args(["migrate", "leech", &full, &local]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_exit(&mut source).success());
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
}

#[test]
fn a_source_killed_during_precopy_fails_the_destination_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 64 << 20, 4);
    let (mut source, url) = seed(&src, &["--invalidate", "50"]);
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    let leech = Command::new(R3MAP)
        .args(["migrate", "leech", &format!("{url}?timeout=1"), &local, "--pull-depth", "1"])
        .args(["--pull-request", "64KiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    source.0.kill().unwrap();
    let out = leech.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the source is unaffected") || err.contains("cannot start the migration"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("finalized"), "it never went live");
}

/// A TCP proxy in front of a source that slows what the source sends (a pause after each read of
/// up to 64 KiB: at most about 64 MB/s), so a post-copy lasts long enough to act during it, and
/// that can break every connection through it at once.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: &str, pause: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (kept, count, upstream) = (Arc::clone(&conns), Arc::clone(&accepted), upstream.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                kept.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (from, to, wait) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), Duration::ZERO),
                    (server, client, pause),
                ] {
                    std::thread::spawn(move || pipe(from, to, wait));
                }
            }
        });
        Self { port, conns, accepted }
    }

    fn url(&self) -> String {
        format!("r3map+plain://127.0.0.1:{}/default", self.port)
    }

    /// Breaks every connection through the proxy; new ones are still accepted.
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, pause: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        std::thread::sleep(pause);
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Reads `out` line by line until a line containing `what`, and returns the lines read.
fn read_until(out: &mut BufReader<ChildStdout>, what: &str) -> String {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the output ended before '{what}': {text}");
        text.push_str(&line);
        if line.contains(what) {
            return text;
        }
    }
}

/// `r3map migrate leech SOURCE LOCAL ARGS`, its standard output piped.
fn leech(source: &str, local: &str, args: &[&str]) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(R3MAP)
        .args(["migrate", "leech", source, local])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_chain_a_to_b_to_c() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a.img"), dir.path().join("b.img"), dir.path().join("c.img"));
    random_file(&a, 64 << 20, 5);
    let (mut source, url_a) = seed(&a, &["--invalidate", "10"]);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen_b = format!("127.0.0.1:{port}");
    // B takes the resource over from A, then serves it, without reopening, for C.
    let local_b = format!("file://{}?size=64MiB", b.display());
    let (hop, mut out_b) = leech(&url_a, &local_b, &["--then-seed", &listen_b, "--insecure-plaintext"]);
    let mut hop = Seed(hop);
    let text = read_until(&mut out_b, "serving ");
    assert!(text.contains("finalized: ") && text.contains("migrated 64"), "{text}");
    assert!(wait_exit(&mut source).success(), "A exits once B has taken over");
    let local_c = format!("file://{}?size=64MiB", c.display());
    let url_b = format!("r3map+plain://{listen_b}/default");
    let out = Command::new(R3MAP).args(["migrate", "leech", &url_b, &local_c]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_exit(&mut hop).success(), "B exits once C has taken over");
    let want = std::fs::read(&a).unwrap();
    assert!(std::fs::read(&b).unwrap() == want, "B differs from A");
    assert!(std::fs::read(&c).unwrap() == want, "C differs from A");
}

#[test]
fn next_hop_flags_are_checked_before_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 1 << 20, 6);
    let (_source, url) = seed(&src, &[]);
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=1MiB", dst.display());
    // No choice of security for the next hop's TCP listener.
    let out =
        Command::new(R3MAP).args(["migrate", "leech", &url, &local, "--then-seed", ":0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--then-seed") && err.contains("--insecure-plaintext"), "{err}");
    // Server flags without a next hop.
    let out = Command::new(R3MAP)
        .args(["migrate", "leech", &url, &local, "--insecure-plaintext"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --then-seed"));
    assert!(!dst.exists(), "nothing was created");
}

#[test]
fn a_link_dropped_during_postcopy_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 64 << 20, 7);
    let (mut source, url) = seed(&src, &["--invalidate", "10"]);
    let proxy = Proxy::start(
        url.trim_start_matches("r3map+plain://").trim_end_matches("/default"),
        Duration::from_millis(1),
    );
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    let (child, mut out) = leech(&proxy.url(), &local, &["--finalize-at", "5"]);
    read_until(&mut out, "finalized: ");
    proxy.cut();
    let text = read_until(&mut out, "migrated ");
    let (status, err) = stderr_of(child);
    assert!(status.success(), "{text}{err}");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= 2, "the destination reconnected");
    assert!(wait_exit(&mut source).success());
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(), "the copy differs from the source");
}

#[test]
fn a_source_killed_during_postcopy_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 64 << 20, 8);
    let (mut source, url) = seed(&src, &[]);
    let proxy = Proxy::start(
        url.trim_start_matches("r3map+plain://").trim_end_matches("/default"),
        Duration::from_millis(1),
    );
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    // Little in flight, so that no answer waits behind a second of slowed data (the timeout).
    let args = ["--finalize-at", "5", "--pull-depth", "2", "--pull-request", "256KiB"];
    let (child, mut out) = leech(&format!("{}?timeout=1", proxy.url()), &local, &args);
    read_until(&mut out, "finalized: ");
    source.0.kill().unwrap();
    let (status, err) = stderr_of(child);
    assert!(!status.success());
    assert!(err.contains("the post-copy failed"), "{err}");
}

//! `r3map migrate seed` and `r3map migrate leech` as separate processes on loopback: a 256 MiB
//! file migrated while the source's demo application keeps rewriting a tenth of it arrives byte
//! for byte, and the source exits once the destination has taken over; a chain A → B → C; a
//! link dropped and a source killed during the pre-copy and the post-copy.
//!
//! Where a test acts during a phase of the migration, the source's storage is a [`Gate`] in the
//! test process that holds the source's reads from a chosen point on: the phase cannot end
//! before the test has acted, however fast or slow the machine is.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{Gate, Proc, Relay, STARTUP, Upstream, random_memory, tcp_of};

const R3MAP: &str = env!("CARGO_BIN_EXE_r3map");

/// How long a destination waits for an answer of a source that is gone, through its attempts to
/// reconnect, before the request fails: ample for a loaded machine's answers to the requests the
/// tests need answered (tracking, the final sync), short enough for a test, since the post-copy
/// retries a failed pull several times (8), each waiting this long, before it gives up.
const GONE_TIMEOUT: &str = "timeout=5";

/// Starts `r3map migrate seed BACKEND-URL` on a port of its own; the process (killed when
/// dropped) and the URL destinations use.
fn seed(dir: &Path, backend: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["migrate", "seed", backend, "--listen", "127.0.0.1:0", "--insecure-plaintext"];
    args.extend_from_slice(extra);
    let source = Proc::start(R3MAP, &args, dir, &[]);
    let url = format!("r3map+plain://{}/default", source.tcp());
    (source, url)
}

/// `r3map migrate seed` of a file.
fn seed_file(file: &Path, extra: &[&str]) -> (Proc, String) {
    seed(file.parent().unwrap(), &format!("file://{}", file.display()), extra)
}

fn random_file(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    std::fs::write(path, data).unwrap();
}

/// Waits for a source to exit by itself, as it does once a destination has taken over.
fn wait_exit(source: &mut Proc) -> ExitStatus {
    source.wait(STARTUP)
}

#[test]
fn a_file_is_migrated_while_the_source_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 256 << 20, 1);
    let (mut source, url) = seed_file(&src, &["--invalidate", "10", "--chunk-size", "64KiB"]);
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
    let (mut source, url) = seed_file(&src, &[]);
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
    let url = format!("file://{}", src.display());
    let mut source = Proc::start(
        R3MAP,
        &[
            "migrate",
            "seed",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--invalidate",
            "20",
        ],
        dir.path(),
        &[],
    );
    assert!(source.ready.contains("TLS 1.3, client certificates"), "{}", source.ready);
    let listen = source.tcp();
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
    // The source's reads stop after the first MiB: the pre-copy is under way and cannot end.
    let upstream = Upstream::start(dir.path(), Gate::new(random_memory(64 << 20, 4), 1 << 20));
    let (mut source, url) = seed(dir.path(), &upstream.url, &["--invalidate", "50"]);
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    let leech = Leech::start(
        &format!("{url}?{GONE_TIMEOUT}"),
        &local,
        &["--pull-depth", "1", "--pull-request", "64KiB"],
    );
    upstream.gate.wait_held();
    source.kill();
    let (status, out, err) = leech.finish();
    assert!(!status.success());
    assert!(err.contains("the pre-copy failed; the source is unaffected"), "{err}");
    assert!(!out.contains("finalized"), "it never went live: {out}");
}

/// A running `r3map migrate leech SOURCE LOCAL ARGS`, killed when dropped; its standard output
/// is read as the test goes.
struct Leech {
    child: Child,
    /// Its standard output, line by line.
    lines: mpsc::Receiver<String>,
    /// Its standard error, read to the end as it comes (so it never fills the pipe).
    err: Option<std::thread::JoinHandle<String>>,
}

impl Leech {
    fn start(source: &str, local: &str, args: &[&str]) -> Self {
        let mut child = Command::new(R3MAP)
            .args(["migrate", "leech", source, local])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Self { child, lines, err: Some(err) }
    }

    /// Reads the output until a line containing `what`; the lines read.
    fn read_until(&mut self, what: &str) -> String {
        let deadline = Instant::now() + STARTUP;
        let mut text = String::new();
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                    if line.contains(what) {
                        return text;
                    }
                }
                Err(e) => panic!("no line with '{what}' ({e}); the output so far: {text}"),
            }
        }
    }

    /// Waits for it to exit by itself: its status, the rest of its output and its standard error.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.wait();
        // Everything it wrote, up to the end of its output.
        let deadline = Instant::now() + STARTUP;
        let mut rest = String::new();
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    rest.push_str(&line);
                    rest.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("its output did not end: {rest}"),
            }
        }
        let err = self.err.take().unwrap().join().unwrap();
        (status, rest, err)
    }

    /// Waits for it to exit by itself (a watchdog of twice [`STARTUP`]: one that gives up on a
    /// dead source waits out several request timeouts first).
    fn wait(&mut self) -> ExitStatus {
        let limit = 2 * STARTUP;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the destination did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Leech {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_chain_a_to_b_to_c() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a.img"), dir.path().join("b.img"), dir.path().join("c.img"));
    random_file(&a, 64 << 20, 5);
    let (mut source, url_a) = seed_file(&a, &["--invalidate", "10"]);
    // B takes the resource over from A, then serves it, without reopening, for C.
    let local_b = format!("file://{}?size=64MiB", b.display());
    let mut hop = Leech::start(&url_a, &local_b, &["--then-seed", "127.0.0.1:0", "--insecure-plaintext"]);
    let text = hop.read_until("serving ");
    assert!(text.contains("finalized: ") && text.contains("migrated 64"), "{text}");
    assert!(wait_exit(&mut source).success(), "A exits once B has taken over");
    let local_c = format!("file://{}?size=64MiB", c.display());
    let url_b = format!("r3map+plain://{}/default", tcp_of(text.lines().last().unwrap()));
    let out = Command::new(R3MAP).args(["migrate", "leech", &url_b, &local_c]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(hop.wait().success(), "B exits once C has taken over");
    let want = std::fs::read(&a).unwrap();
    assert!(std::fs::read(&b).unwrap() == want, "B differs from A");
    assert!(std::fs::read(&c).unwrap() == want, "C differs from A");
}

#[test]
fn next_hop_flags_are_checked_before_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 1 << 20, 6);
    let (_source, url) = seed_file(&src, &[]);
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

/// The reads of the post-copy are held at the source's storage from 16 MiB on (finalizing at 5 %
/// needs less than that), so the link through a relay is cut while the post-copy runs; the
/// destination reconnects and finishes.
#[test]
fn a_link_dropped_during_postcopy_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(dir.path(), Gate::new(random_memory(64 << 20, 7), 16 << 20));
    let (mut source, url) = seed(dir.path(), &upstream.url, &["--invalidate", "10"]);
    let relay = Relay::start(url.trim_start_matches("r3map+plain://").trim_end_matches("/default"));
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    let mut leech =
        Leech::start(&format!("r3map+plain://{}/default", relay.addr()), &local, &["--finalize-at", "5"]);
    leech.read_until("finalized: ");
    upstream.gate.wait_held();
    let before = relay.accepted();
    relay.cut();
    upstream.gate.release();
    let text = leech.read_until("migrated ");
    let (status, _, err) = leech.finish();
    assert!(status.success(), "{text}{err}");
    assert!(relay.accepted() > before, "the destination reconnected");
    assert!(wait_exit(&mut source).success());
    assert!(upstream.contents() == std::fs::read(&dst).unwrap(), "the copy differs from the source");
}

/// As above, but the source is killed while the post-copy's reads are held.
#[test]
fn a_source_killed_during_postcopy_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(dir.path(), Gate::new(random_memory(64 << 20, 8), 16 << 20));
    let (mut source, url) = seed(dir.path(), &upstream.url, &[]);
    let dst = dir.path().join("dst.img");
    let local = format!("file://{}?size=64MiB", dst.display());
    let mut leech = Leech::start(&format!("{url}?{GONE_TIMEOUT}"), &local, &["--finalize-at", "5"]);
    leech.read_until("finalized: ");
    upstream.gate.wait_held();
    source.kill();
    let (status, _, err) = leech.finish();
    assert!(!status.success());
    assert!(err.contains("the post-copy failed"), "{err}");
}

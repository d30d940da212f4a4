//! `r3map migrate seed` and `r3map migrate leech` as two processes on loopback: a 256 MiB file
//! migrated while the source's demo application keeps rewriting a tenth of it arrives byte for
//! byte, and the source exits once the destination has taken over.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
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
        .args(["migrate", "leech", &format!("{url}?timeout=2"), &local, "--pull-depth", "1"])
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

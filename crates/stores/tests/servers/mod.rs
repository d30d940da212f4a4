//! Store servers on loopback for tests and the benchmark: `redis-server` and moto (an
//! S3-compatible server), each started on a free port and killed when dropped. `None` when the
//! program is not installed (scripts/test.sh installs both).

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process; killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(program: &Path, args: &[String], what: &str, port: u16, dir: tempfile::TempDir) -> Option<Server> {
    let child = Command::new(program)
        .args(args)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server { child, port, _dir: dir };
    wait_for_port(port, what);
    Some(server)
}

/// `redis-server` without persistence.
pub fn redis() -> Option<Server> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let args: Vec<String> =
        ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .iter()
            .map(ToString::to_string)
            .collect();
    start(Path::new("redis-server"), &args, "redis-server", port, dir)
}

/// Where moto's server is: `$R3MAP_MOTO_SERVER`, the venv scripts/test.sh makes, or PATH.
pub fn moto_program() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("R3MAP_MOTO_SERVER").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/r3map/moto/bin/moto_server")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file()).or_else(|| {
        Command::new("moto_server").arg("--help").output().ok().map(|_| PathBuf::from("moto_server"))
    })
}

/// moto's S3 server; it accepts any credentials.
pub fn moto() -> Option<Server> {
    let program = moto_program()?;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let args = vec!["-H".to_owned(), "127.0.0.1".to_owned(), "-p".to_owned(), port.to_string()];
    start(&program, &args, "moto_server", port, dir)
}

/// s3s-fs, an S3 server over a directory (much faster than moto), when installed: in
/// `$R3MAP_S3S_FS`, in `~/.cache/r3map/s3s/bin`, or on PATH. Its credentials are `r3map`/`r3map`.
pub fn s3s_fs() -> Option<Server> {
    let candidates = [
        std::env::var_os("R3MAP_S3S_FS").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/r3map/s3s/bin/s3s-fs")),
    ];
    let program =
        candidates.into_iter().flatten().find(|p| p.is_file()).or_else(|| {
            Command::new("s3s-fs").arg("--help").output().ok().map(|_| PathBuf::from("s3s-fs"))
        })?;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("the s3s-fs root");
    let args = vec![
        "--host".to_owned(),
        "127.0.0.1".to_owned(),
        "--port".to_owned(),
        port.to_string(),
        "--access-key".to_owned(),
        "r3map".to_owned(),
        "--secret-key".to_owned(),
        "r3map".to_owned(),
        root.display().to_string(),
    ];
    start(&program, &args, "s3s-fs", port, dir)
}

/// An `s3://` URL for a bucket on a local S3 server (created if missing).
pub fn s3_url(server: &Server, bucket: &str, prefix: &str, key: &str, size: u64) -> String {
    format!(
        "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&access-key-id={key}\
         &secret-access-key={key}&create-bucket=true&size={size}",
        server.port
    )
}

//! Store servers on loopback for tests and the benchmark: `redis-server` and moto (an
//! S3-compatible server), each started on a port the test holds, ready once it says so, and
//! killed when dropped. `None` when the program is not installed (scripts/test.sh installs both).

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;

use r3map_testkit::{Daemon, HeldPort};

/// A server process on a held port; killed when dropped.
pub struct Server {
    pub port: u16,
    daemon: Daemon,
    launch: Box<dyn Fn() -> Command>,
    ready: &'static str,
    _held: HeldPort,
    dir: tempfile::TempDir,
}

impl Server {
    /// Everything the server printed so far.
    pub fn output(&self) -> String {
        self.daemon.output()
    }

    /// How many lines the server printed so far contain `pattern`.
    pub fn count_lines(&self, pattern: &str) -> usize {
        self.daemon.count_lines(pattern)
    }

    /// Waits until the server has printed `count` lines with `pattern`.
    pub fn wait_for_lines(&self, pattern: &str, count: usize) {
        self.daemon.wait_for_lines(pattern, count);
    }

    /// The server's own directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the server; nothing listens on its port until [`Server::restart`].
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Kills the server and starts a new one, with the same arguments, on the same port.
    pub fn restart(&mut self) {
        self.daemon.kill();
        let mut command = (self.launch)();
        command.current_dir(self.dir.path());
        self.daemon = Daemon::start(command, self.ready).expect("restarting the server");
    }
}

/// Starts the command `launch` makes (in `dir`) and waits until it prints `ready`; `None` when
/// the program is missing.
fn start(
    launch: impl Fn() -> Command + 'static,
    ready: &'static str,
    held: HeldPort,
    dir: tempfile::TempDir,
) -> Option<Server> {
    let mut command = launch();
    command.current_dir(dir.path());
    let daemon = Daemon::start(command, ready).ok()?;
    Some(Server { port: held.port(), daemon, launch: Box::new(launch), ready, _held: held, dir })
}

/// `redis-server` without persistence.
pub fn redis() -> Option<Server> {
    redis_with(&[])
}

/// `redis-server` without persistence, with `extra` arguments (`--requirepass X`).
pub fn redis_with(extra: &[&str]) -> Option<Server> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let held = HeldPort::new();
    let port = held.port().to_string();
    let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    let launch = move || {
        let mut command = Command::new("redis-server");
        command.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.args(&extra);
        command
    };
    // Redis 7 logs "Ready to accept connections tcp" once it listens.
    start(launch, "eady to accept connections", held, dir)
}

/// Where moto's server is: `$R3MAP_MOTO_SERVER`, the venv scripts/test.sh makes, or PATH.
pub fn moto_program() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("R3MAP_MOTO_SERVER").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/r3map/moto/bin/moto_server")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file()).or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|dir| dir.join("moto_server")).find(|p| p.is_file())
    })
}

/// moto's S3 server on `held` (a fresh port for `None`), started in `dir`; it accepts any
/// credentials unless `check_credentials`. Ready once it logs "Running on" (it listens by then);
/// it logs every request it serves.
pub fn moto_on(held: HeldPort, dir: tempfile::TempDir, check_credentials: bool) -> Option<Server> {
    let program = moto_program()?;
    let port = held.port().to_string();
    let launch = move || {
        let mut command = Command::new(&program);
        command.args(["-H", "127.0.0.1", "-p", &port]);
        if check_credentials {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        command
    };
    start(launch, "Running on", held, dir)
}

/// moto's S3 server on a fresh port; it accepts any credentials.
pub fn moto() -> Option<Server> {
    moto_on(HeldPort::new(), tempfile::tempdir().expect("a temporary directory"), false)
}

/// s3s-fs, an S3 server over a directory (much faster than moto), when installed: in
/// `$R3MAP_S3S_FS`, in `~/.cache/r3map/s3s/bin`, or on PATH. Its credentials are `r3map`/`r3map`.
pub fn s3s_fs() -> Option<Server> {
    let candidates = [
        std::env::var_os("R3MAP_S3S_FS").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/r3map/s3s/bin/s3s-fs")),
    ];
    let program = candidates.into_iter().flatten().find(|p| p.is_file()).or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|dir| dir.join("s3s-fs")).find(|p| p.is_file())
    })?;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let held = HeldPort::new();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("the s3s-fs root");
    let port = held.port().to_string();
    let launch = move || {
        let mut command = Command::new(&program);
        command
            .args(["--host", "127.0.0.1", "--port", &port])
            .args(["--access-key", "r3map", "--secret-key", "r3map"])
            .arg(&root)
            .env("RUST_LOG", "s3s_fs=info");
        command
    };
    // It binds before it logs this.
    start(launch, "server is running", held, dir)
}

/// An `s3://` URL for a bucket on a local S3 server (created if missing).
pub fn s3_url(server: &Server, bucket: &str, prefix: &str, key: &str, size: u64) -> String {
    format!(
        "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&access-key-id={key}\
         &secret-access-key={key}&create-bucket=true&size={size}",
        server.port
    )
}

/// The backend a test URL of one of the servers here names (`redis://` or `s3://`, with
/// `size=SIZE` and optionally `chunk-size=SIZE`), as the `r3map` crate's registry opens it:
/// the store's own constructor under a `Stored` of the URL's size.
pub fn open_url(url: &str, chunk_size: u64) -> r3map_core::SharedBackend {
    use r3map_stores::{ChunkStore, Stored, StoredOptions};
    let parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let size_of = |key: &str| {
        let (_, value) = parsed.query_pairs().find(|(k, _)| k == key)?;
        Some(r3map_core::units::parse_size(&value).unwrap_or_else(|e| panic!("{url}: {key}: {e}")))
    };
    let store: Box<dyn ChunkStore> = match parsed.scheme() {
        "redis" => Box::new(
            r3map_stores::redis::RedisStore::open(&parsed).unwrap_or_else(|e| panic!("open {url}: {e}")),
        ),
        "s3" => {
            Box::new(r3map_stores::s3::S3Store::open(&parsed).unwrap_or_else(|e| panic!("open {url}: {e}")))
        }
        other => panic!("{url}: no test server speaks {other}"),
    };
    let size = size_of("size").unwrap_or_else(|| panic!("{url}: no size"));
    let options =
        StoredOptions { chunk_size: size_of("chunk-size").unwrap_or(chunk_size), ..StoredOptions::default() };
    std::sync::Arc::new(Stored::new(store, size, options).expect("a Stored backend"))
}

//! The Redis store against a real `redis-server`, started by each test on a loopback port it
//! holds (or a Unix socket), ready once it says so, and killed when the test ends, also when it
//! panics.

#![cfg(feature = "redis")]

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use r3map_core::{Backend, SharedBackend, conformance};
use r3map_stores::redis::RedisStore;
use r3map_stores::{ChunkStore, Stored, StoredOptions};
use r3map_testkit::{Daemon, HeldPort};
use url::Url;

const PROGRAM: &str = "redis-server";

fn installed() -> bool {
    Command::new(PROGRAM).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Returns from the test, saying why, when `redis-server` is missing.
macro_rules! require_server {
    () => {
        if !installed() {
            println!("skipped: {PROGRAM} not installed (scripts/test.sh installs it)");
            return;
        }
    };
}

/// A `redis-server` child process, killed on drop.
struct Server {
    daemon: Daemon,
    dir: tempfile::TempDir,
    /// `None` for a server on a Unix socket only.
    port: Option<HeldPort>,
    /// The port is a TLS port.
    tls: bool,
    extra: Vec<String>,
}

impl Server {
    /// A server on a free loopback port, with `extra` arguments (`--requirepass X`).
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = HeldPort::new();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let daemon = spawn(Some(port.port()), false, dir.path(), &extra);
        Self { daemon, dir, port: Some(port), tls: false, extra }
    }

    /// A server on a free loopback TLS port (and no plain one), with the certificate of
    /// `localhost` and `127.0.0.1` signed by the CA in `ca.pem` of its directory. `None` when
    /// `openssl` is missing to make the certificates.
    fn start_tls() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"];
        std::fs::write(dir.path().join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        let ca =
            [&["req", "-x509"][..], &key, &["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA"]];
        let csr = [&["req"][..], &key, &["-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"]];
        let sign = [
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ];
        let made = openssl(&ca.concat()) && openssl(&csr.concat()) && openssl(&sign);
        if !made {
            return None;
        }
        let port = HeldPort::new();
        let extra: Vec<String> =
            ["--tls-cert-file", "srv.pem", "--tls-key-file", "srv.key", "--tls-ca-cert-file", "ca.pem"]
                .iter()
                .map(|a| {
                    if a.starts_with("--") {
                        (*a).to_owned()
                    } else {
                        dir.path().join(a).display().to_string()
                    }
                })
                .chain(["--tls-auth-clients".to_owned(), "no".to_owned()])
                .collect();
        let daemon = spawn(Some(port.port()), true, dir.path(), &extra);
        Some(Self { daemon, dir, port: Some(port), tls: true, extra })
    }

    /// A server on a Unix socket in its directory, with no TCP port.
    fn start_unix() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let extra = vec!["--unixsocket".to_owned(), socket.display().to_string()];
        let daemon = spawn(None, false, dir.path(), &extra);
        Self { daemon, dir, port: None, tls: false, extra }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn port(&self) -> u16 {
        self.port.as_ref().expect("a TCP server").port()
    }

    /// `redis://127.0.0.1:PORT/?QUERY`.
    fn url(&self, query: &str) -> Url {
        Url::parse(&format!("redis://127.0.0.1:{}/?{query}", self.port())).unwrap()
    }

    /// A plain connection of our own, to look at or plant keys behind the store's back.
    fn raw(&self, password: Option<&str>) -> redis::Connection {
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let url = match &self.port {
            Some(port) => format!("redis://{auth}127.0.0.1:{}/", port.port()),
            None => format!("redis+unix://{}", self.socket().display()),
        };
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }

    fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Kills the server and starts a new, empty one on the same port.
    fn restart(&mut self) {
        self.kill();
        let port = self.port.as_ref().map(HeldPort::port);
        self.daemon = spawn(port, self.tls, self.dir.path(), &self.extra);
    }
}

/// Starts `redis-server` on `port` (a TLS port if `tls`; none for `None`), logging to standard
/// output, and returns once it is ready to accept connections.
fn spawn(port: Option<u16>, tls: bool, dir: &Path, extra: &[String]) -> Daemon {
    let port = port.unwrap_or(0).to_string();
    let (plain, tls_port) = if tls { ("0", port.as_str()) } else { (port.as_str(), "0") };
    let mut command = Command::new(PROGRAM);
    command
        .args(["--port", plain, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(if tls { vec!["--tls-port", tls_port] } else { vec![] })
        .arg("--dir")
        .arg(dir)
        .args(extra);
    // "Ready to accept connections tcp", or "... now ready to accept connections at PATH".
    Daemon::start(command, "eady to accept connections").expect("starting redis-server")
}

fn backend(store: RedisStore, size: u64, chunk_size: u64, max_batch: usize) -> Stored<RedisStore> {
    Stored::new(store, size, StoredOptions { chunk_size, max_batch }).unwrap()
}

/// Runs the conformance suite with a fresh prefix for every backend it asks for.
fn conformance_with(options: StoredOptions) {
    require_server!();
    let server = Server::start(&[]);
    let next = AtomicU64::new(0);
    conformance::run(&|size| -> SharedBackend {
        let n = next.fetch_add(1, Ordering::SeqCst);
        let store = RedisStore::open(&server.url(&format!("prefix=conf{n}:"))).unwrap();
        Arc::new(Stored::new(store, size, options).unwrap())
    });
}

#[test]
fn conformance_with_small_chunks_and_batches() {
    conformance_with(StoredOptions { chunk_size: 4096, max_batch: 16 });
}

#[test]
fn conformance_with_default_options() {
    conformance_with(StoredOptions::default());
}

/// Calls of `command` the server has answered since its statistics were reset.
fn calls(conn: &mut redis::Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[test]
fn a_read_of_many_chunks_is_one_mget_per_batch_and_missing_chunks_are_zeroes() {
    require_server!();
    let server = Server::start(&[]);
    let b = backend(RedisStore::open(&server.url("")).unwrap(), 1 << 20, 4096, 16);
    b.write_at(&[7u8; 4096], 8192).unwrap();
    let mut raw = server.raw(None);
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut raw).unwrap();

    let mut buf = vec![1u8; 64 * 4096];
    b.read_at(&mut buf, 0).unwrap();

    assert_eq!(calls(&mut raw, "mget"), 4, "64 chunks in batches of 16");
    assert!(buf[..8192].iter().all(|&x| x == 0));
    assert!(buf[8192..12288].iter().all(|&x| x == 7));
    assert!(buf[12288..].iter().all(|&x| x == 0));
    assert_eq!(calls(&mut raw, "get"), 0, "no key is fetched alone");
}

#[test]
fn whole_chunks_are_one_mset_and_trim_deletes_their_keys() {
    require_server!();
    let server = Server::start(&[]);
    let b = backend(RedisStore::open(&server.url("prefix=t:")).unwrap(), 10 * 4096 + 100, 4096, 64);
    let mut raw = server.raw(None);
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut raw).unwrap();

    b.write_at(&vec![9u8; 10 * 4096 + 100], 0).unwrap();
    assert_eq!(calls(&mut raw, "mset"), 1);
    let keys: Vec<String> = redis::cmd("KEYS").arg("t:*").query(&mut raw).unwrap();
    assert_eq!(keys.len(), 11);

    b.trim(4096, 3 * 4096 + 10).unwrap();

    for (chunk, exists) in [(0, true), (1, false), (2, false), (3, false), (4, true), (10, true)] {
        let n: u64 = redis::cmd("EXISTS").arg(format!("t:{chunk}")).query(&mut raw).unwrap();
        assert_eq!(n == 1, exists, "chunk {chunk}");
    }
    let mut buf = vec![1u8; 5 * 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 9));
    assert!(buf[4096..4 * 4096 + 10].iter().all(|&x| x == 0));
    assert!(buf[4 * 4096 + 10..].iter().all(|&x| x == 9));
}

#[test]
fn chunks_are_stored_as_raw_bytes_under_the_documented_keys() {
    require_server!();
    let server = Server::start(&[]);
    let store = RedisStore::open(&server.url("prefix=disk:")).unwrap();
    let data: Vec<u8> = (0..=255).collect();
    store.put(&[(12, &data[..])]).unwrap();
    let mut raw = server.raw(None);
    let stored: Vec<u8> = redis::cmd("GET").arg("disk:12").query(&mut raw).unwrap();
    assert_eq!(stored, data);
    assert_eq!(store.key(12), b"disk:12");
    assert_eq!(store.get(&[12, 13]).unwrap(), vec![Some(data), None]);
    store.delete(&[12, 13]).unwrap();
    assert_eq!(store.get(&[12]).unwrap(), vec![None]);
    assert!(store.get(&[]).unwrap().is_empty());
    store.put(&[]).unwrap();
    store.delete(&[]).unwrap();
}

#[test]
fn a_chunk_of_the_wrong_size_planted_by_someone_else_is_invalid_data() {
    require_server!();
    let server = Server::start(&[]);
    let b = backend(RedisStore::open(&server.url("prefix=w:")).unwrap(), 4 * 4096, 4096, 16);
    let mut raw = server.raw(None);
    let _: () = redis::cmd("SET").arg("w:2").arg(vec![5u8; 100]).query(&mut raw).unwrap();

    let err = b.read_at(&mut [0u8; 10], 2 * 4096).unwrap_err();

    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("chunk 2") && err.to_string().contains("100 bytes"), "{err}");
}

#[test]
fn a_key_of_another_type_reads_as_a_chunk_never_written() {
    require_server!();
    let server = Server::start(&[]);
    let store = RedisStore::open(&server.url("prefix=l:")).unwrap();
    let mut raw = server.raw(None);
    let _: () = redis::cmd("RPUSH").arg("l:3").arg("x").query(&mut raw).unwrap();
    // MGET answers nil for a key that holds no string: it reads as a chunk never written.
    assert_eq!(store.get(&[3]).unwrap(), vec![None]);
}

#[test]
fn an_unreachable_server_fails_at_open_within_seconds() {
    let held = HeldPort::new();
    let port = held.port();
    let url = Url::parse(&format!("redis://127.0.0.1:{port}/?connect-timeout=2")).unwrap();
    let start = Instant::now();

    let err = RedisStore::open(&url).unwrap_err();

    // Refused at once; a bound far above the 2 s timeout, for a loaded machine.
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn a_server_that_never_answers_is_timed_out_not_waited_for() {
    // Accepts connections (the kernel does, into the backlog) but never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = Url::parse(&format!("redis://127.0.0.1:{port}/?timeout=0.5&connect-timeout=0.5")).unwrap();
    let start = Instant::now();

    let err = RedisStore::open(&url).unwrap_err();

    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
}

#[test]
fn refused_credentials_are_permission_denied() {
    require_server!();
    let server = Server::start(&["--requirepass", "s3cr:t"]);
    let port = server.port();
    for url in [format!("redis://127.0.0.1:{port}"), format!("redis://:wrong@127.0.0.1:{port}")] {
        let err = RedisStore::open(&Url::parse(&url).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{url}: {err}");
        assert!(err.to_string().contains("credentials"), "{err}");
        assert!(!err.to_string().contains("wrong@"), "no password in messages: {err}");
    }
    for url in
        [format!("redis://:s3cr%3At@127.0.0.1:{port}"), format!("redis://default:s3cr%3At@127.0.0.1:{port}")]
    {
        let store = RedisStore::open(&Url::parse(&url).unwrap()).unwrap();
        store.put(&[(1, b"x")]).unwrap();
        assert_eq!(store.get(&[1]).unwrap(), vec![Some(b"x".to_vec())]);
        assert!(!store.describe().contains("s3cr"), "{}", store.describe());
    }
}

#[test]
fn a_restarted_server_is_reconnected_to() {
    require_server!();
    let mut server = Server::start(&[]);
    let b = backend(RedisStore::open(&server.url("timeout=2&connect-timeout=1")).unwrap(), 1 << 20, 4096, 16);
    b.write_at(&[1u8; 8192], 0).unwrap();

    server.kill();
    let start = Instant::now();
    assert!(b.read_at(&mut [0u8; 10], 0).is_err(), "the server is gone");
    assert!(start.elapsed() < Duration::from_secs(30), "a call while down took {:?}", start.elapsed());
    server.restart();

    b.write_at(&[2u8; 4096], 4096).unwrap();
    let mut buf = vec![9u8; 8192];
    b.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 0), "the old data went with the server (--save '')");
    assert!(buf[4096..].iter().all(|&x| x == 2));
}

#[test]
fn a_server_restarted_between_calls_is_invisible() {
    require_server!();
    let mut server = Server::start(&[]);
    let store = RedisStore::open(&server.url("")).unwrap();
    store.put(&[(0, b"a")]).unwrap();

    server.restart();

    store.put(&[(0, b"b")]).unwrap();
    assert_eq!(store.get(&[0]).unwrap(), vec![Some(b"b".to_vec())]);
}

#[test]
fn the_store_works_from_inside_an_async_task_and_on_a_runtime_of_the_callers() {
    require_server!();
    let server = Server::start(&[]);
    let app = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Opened and used from a tokio worker, on the shared runtime.
    let url = server.url("prefix=task:");
    let got = app.block_on(async move {
        tokio::spawn(async move {
            let store = RedisStore::open(&url).unwrap();
            store.put(&[(1, b"in a task")]).unwrap();
            store.get(&[1, 2]).unwrap()
        })
        .await
        .unwrap()
    });
    assert_eq!(got, vec![Some(b"in a task".to_vec()), None]);
    // On the application's own runtime, from a plain thread.
    let io = r3map_net::Io::from_handle(app.handle().clone());
    let store =
        RedisStore::open_on(&server.url("prefix=task:"), r3map_stores::redis::RedisOptions::default(), io)
            .unwrap();
    assert_eq!(store.get(&[1]).unwrap(), vec![Some(b"in a task".to_vec())]);
}

#[test]
fn a_unix_socket_server_works() {
    require_server!();
    let server = Server::start_unix();
    let url = Url::parse(&format!("redis+unix://{}?db=1&prefix=u:", server.socket().display())).unwrap();
    let store = RedisStore::open(&url).unwrap();
    assert_eq!(store.describe(), format!("redis+unix://{}?db=1, prefix \"u:\"", server.socket().display()));
    let b = backend(store, 1 << 20, 4096, 16);
    b.write_at(&[4u8; 5000], 100).unwrap();
    let mut buf = vec![0u8; 5000];
    b.read_at(&mut buf, 100).unwrap();
    assert!(buf.iter().all(|&x| x == 4));

    let mut raw = server.raw(None);
    let _: () = redis::cmd("SELECT").arg(1).query(&mut raw).unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("u:*").query(&mut raw).unwrap();
    assert_eq!(keys.len(), 2, "chunks 0 and 1 in database 1: {keys:?}");
}

#[test]
fn stores_with_different_prefixes_or_databases_do_not_see_each_other() {
    require_server!();
    let server = Server::start(&[]);
    let port = server.port();
    let a = RedisStore::open(&server.url("prefix=a:")).unwrap();
    let b = RedisStore::open(&server.url("prefix=b:")).unwrap();
    let c = RedisStore::open(&Url::parse(&format!("redis://127.0.0.1:{port}/2?prefix=a:")).unwrap()).unwrap();

    a.put(&[(0, b"from a"), (1, b"a1")]).unwrap();
    b.put(&[(0, b"from b")]).unwrap();

    assert_eq!(a.get(&[0, 1]).unwrap(), vec![Some(b"from a".to_vec()), Some(b"a1".to_vec())]);
    assert_eq!(b.get(&[0, 1]).unwrap(), vec![Some(b"from b".to_vec()), None]);
    assert_eq!(c.get(&[0, 1]).unwrap(), vec![None, None], "another database");
    b.delete(&[0, 1]).unwrap();
    assert_eq!(a.get(&[0, 1]).unwrap(), vec![Some(b"from a".to_vec()), Some(b"a1".to_vec())]);
}

#[test]
fn describe_names_the_server_and_prefix_without_credentials() {
    require_server!();
    let server = Server::start(&["--requirepass", "pw"]);
    let port = server.port();
    let url = Url::parse(&format!(
        "redis://:pw@127.0.0.1:{port}/0?prefix=disk:&size=1M&chunk-size=4096&max-batch=4"
    ))
    .unwrap();
    let store = RedisStore::open(&url).unwrap();
    assert_eq!(store.describe(), format!("redis://127.0.0.1:{port}/0, prefix \"disk:\""));
}

#[test]
fn an_unknown_parameter_is_rejected_before_connecting() {
    let err = RedisStore::open(&Url::parse("redis://127.0.0.1:1/?colour=blue").unwrap()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("colour"), "{err}");
}

#[test]
fn tls_with_a_ca_of_our_own() {
    require_server!();
    let Some(server) = Server::start_tls() else {
        println!("skipped: openssl not installed (to make the test certificates)");
        return;
    };
    let port = server.port();
    let ca = server.dir.path().join("ca.pem");
    for host in ["localhost", "127.0.0.1"] {
        let url = Url::parse(&format!("rediss://{host}:{port}/?ca={}&prefix=tls:", ca.display())).unwrap();
        let store = RedisStore::open(&url).unwrap();
        assert_eq!(store.describe(), format!("rediss://{host}:{port}/0, prefix \"tls:\""));
        store.put(&[(5, b"secret")]).unwrap();
        assert_eq!(store.get(&[5, 6]).unwrap(), vec![Some(b"secret".to_vec()), None]);
    }
    // The system's roots do not know our CA.
    let url = Url::parse(&format!("rediss://localhost:{port}/?connect-timeout=2")).unwrap();
    let start = Instant::now();
    let err = RedisStore::open(&url).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    assert!(err.to_string().contains(&format!("localhost:{port}")), "{err}");
    // Nor does plain Redis get through to a TLS port.
    let plain = Url::parse(&format!("redis://127.0.0.1:{port}/?timeout=1&connect-timeout=1")).unwrap();
    assert!(RedisStore::open(&plain).is_err());
    let missing = Url::parse(&format!("rediss://localhost:{port}/?ca=/nonexistent/ca.pem")).unwrap();
    assert_eq!(RedisStore::open(&missing).unwrap_err().kind(), io::ErrorKind::NotFound);
}

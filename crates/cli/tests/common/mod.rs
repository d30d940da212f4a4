//! What the CLI tests share: child processes that are reaped whatever happens and say where they
//! listen, a relay whose far end can change, an address that refuses connections, and a storage
//! whose reads the test can hold.
//!
//! No test picks a port: servers bind port 0 and print the address they got (their ready line),
//! and the tests read it from there.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Memory, SharedBackend};
use r3map_net::{Export, Server, ServerConfig, ServerHandle, ServerSecurity};

/// How long a server may take to say it is ready, or a process to do what a test waits for: a
/// watchdog for a loaded machine, not an expectation.
pub(crate) const STARTUP: Duration = Duration::from_secs(60);

/// The lines by which a process says it is ready: a server, a mount, a swap.
const READY: [&str; 3] = ["serving ", "mounted ", "swap on "];

/// A child process that is killed and reaped when dropped, whatever happened; its standard error
/// goes to a file that is printed when the test failed.
pub(crate) struct Proc {
    pub(crate) child: Child,
    log: PathBuf,
    /// The line it printed when it was ready.
    pub(crate) ready: String,
}

impl Proc {
    /// Starts `bin args` and waits for its ready line ("serving ...", "mounted ...", "swap on ...").
    pub(crate) fn start(bin: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("server-{}.log", fastrand::u32(..)));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_remove("R3MAP_TOKEN")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Self { child, log, ready: String::new() };
        let deadline = Instant::now() + STARTUP;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if READY.iter().any(|r| line.starts_with(r)) => {
                    proc.ready = line;
                    return proc;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{bin} {args:?} did not start within {STARTUP:?}:\n{}", proc.stderr())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.child.wait().unwrap();
                    panic!("{bin} {args:?} exited ({status}) before it was ready:\n{}", proc.stderr());
                }
            }
        }
    }

    /// The TCP address of the native protocol from the ready line (`... on 127.0.0.1:PORT [...]`).
    pub(crate) fn tcp(&self) -> String {
        tcp_of(&self.ready)
    }

    /// The address of `--metrics` from the ready line (`...; metrics at http://ADDR/metrics`).
    pub(crate) fn metrics(&self) -> String {
        let (_, after) =
            self.ready.split_once("metrics at http://").expect("a metrics address in the ready line");
        after.split_once("/metrics").expect("a metrics URL in the ready line").0.to_owned()
    }

    pub(crate) fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends SIGINT (like Ctrl-C).
    pub(crate) fn interrupt(&self) {
        let status = Command::new("kill").args(["-INT", &self.pid()]).status().unwrap();
        assert!(status.success());
    }

    /// Kills it with SIGKILL and reaps it.
    pub(crate) fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit by itself; `timeout` is a watchdog.
    pub(crate) fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its standard error says `what` (the process logs what it did, as it does
    /// it). Fails if it exits first.
    pub(crate) fn wait_for_log(&mut self, what: &str) {
        let deadline = Instant::now() + STARTUP;
        while !self.stderr().contains(what) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the process exited ({status}) before it logged {what:?}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "the process did not log {what:?} in time:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- standard error of the server ---\n{}", self.stderr());
        }
    }
}

/// The TCP address of the native protocol in a "serving ..." line (`... on 127.0.0.1:PORT [...]`).
pub(crate) fn tcp_of(ready: &str) -> String {
    let (_, after) = ready.rsplit_once(") on ").expect("a TCP address in the ready line");
    after.split(' ').next().unwrap().to_owned()
}

/// A TCP relay on a port of its own to the server of the moment, so that clients keep one
/// address while the server behind it is killed and started again (on whatever port it gets),
/// and so that a test can break every connection through it at once.
pub(crate) struct Relay {
    addr: SocketAddr,
    upstream: Arc<Mutex<Option<String>>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    /// Relays to `upstream` (`HOST:PORT`).
    pub(crate) fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Self {
            addr,
            upstream: Arc::new(Mutex::new(Some(upstream.to_owned()))),
            conns: Arc::default(),
            accepted: Arc::default(),
        };
        let (to, conns, accepted) =
            (Arc::clone(&relay.upstream), Arc::clone(&relay.conns), Arc::clone(&relay.accepted));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                // No server at the moment, or one that refuses: the client sees its connection
                // closed, as it would a server that went away.
                let Some(target) = to.lock().unwrap().clone() else { continue };
                let Ok(server) = TcpStream::connect(&target) else { continue };
                conns.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || pipe(client, server));
                std::thread::spawn(move || pipe(back.0, back.1));
            }
        });
        relay
    }

    /// `127.0.0.1:PORT`, where clients connect.
    pub(crate) fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Where new connections go from now on; `None` closes them at once.
    pub(crate) fn set_upstream(&self, upstream: Option<&str>) {
        *self.upstream.lock().unwrap() = upstream.map(str::to_owned);
    }

    /// Connections accepted so far (those closed at once included).
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Breaks every connection through the relay; new ones are still relayed.
    pub(crate) fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Memory whose calls the test can hold: reads go through until `budget` bytes have been read,
/// then each waits until [`Gate::release`]; a flush waits too once [`Gate::hold_next_flush`] asked
/// for it. A transfer from it stops at a point the test chose, and stays there while the test
/// acts (kills a process, breaks a link, closes a file), whatever the timing. Writes always go
/// through.
pub(crate) struct Gate {
    memory: Memory,
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    budget: u64,
    read: u64,
    hold_flush: bool,
    held: usize,
    open: bool,
}

impl Gate {
    pub(crate) fn new(memory: Memory, budget: u64) -> Self {
        let state = GateState { budget, read: 0, hold_flush: false, held: 0, open: false };
        Self { memory, state: Mutex::new(state), changed: Condvar::new() }
    }

    /// Holds the next flush (only that one) until [`Gate::release`].
    pub(crate) fn hold_next_flush(&self) {
        self.state.lock().unwrap().hold_flush = true;
    }

    /// Waits until a call is held.
    pub(crate) fn wait_held(&self) {
        let state = self.state.lock().unwrap();
        let (state, timeout) = self.changed.wait_timeout_while(state, STARTUP, |s| s.held == 0).unwrap();
        assert!(
            !timeout.timed_out(),
            "no call reached the gate within {STARTUP:?} ({} bytes read)",
            state.read
        );
    }

    /// Holds the caller until [`Gate::release`].
    fn hold<'a>(&'a self, mut state: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        state.held += 1;
        self.changed.notify_all();
        state = self.changed.wait_while(state, |s| !s.open).unwrap();
        state.held -= 1;
        state
    }

    /// Lets every read through, the held ones and all later ones.
    pub(crate) fn release(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        self.memory.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        let mut state = self.state.lock().unwrap();
        if !state.open && state.read + len > state.budget {
            state = self.hold(state);
        }
        state.read += len;
        drop(state);
        self.memory.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.memory.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if !state.open && state.hold_flush {
            state.hold_flush = false;
            state = self.hold(state);
        }
        drop(state);
        self.memory.flush()
    }
}

/// `size` bytes of memory holding the pattern of `seed`.
pub(crate) fn random_memory(size: usize, seed: u64) -> Memory {
    let memory = Memory::new(size as u64);
    let mut data = vec![0u8; size];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    memory.write_at(&data, 0).unwrap();
    memory
}

/// A [`Gate`] served by an r3map server in the test process, on a Unix socket: the storage of an
/// `r3map serve` or `r3map migrate seed` started with [`Upstream::url`] as its backend URL.
/// Dropped, it releases the gate first, so the server can finish its requests and stop.
pub(crate) struct Upstream {
    pub(crate) gate: Arc<Gate>,
    /// `r3map+unix:///default?socket=PATH`.
    pub(crate) url: String,
    server: Option<ServerHandle>,
}

impl Upstream {
    pub(crate) fn start(dir: &Path, gate: Gate) -> Self {
        let gate = Arc::new(gate);
        let socket = dir.join(format!("upstream-{}.sock", fastrand::u32(..)));
        let backend: SharedBackend = Arc::clone(&gate) as SharedBackend;
        let server =
            Server::new(ServerConfig::new(Export::new("default", backend), ServerSecurity::Plaintext))
                .unwrap();
        let server = ServerHandle::start_unix(server, &socket).unwrap();
        Self { gate, url: format!("r3map+unix:///default?socket={}", socket.display()), server: Some(server) }
    }

    /// Everything in it.
    pub(crate) fn contents(&self) -> Vec<u8> {
        let mut data = vec![0u8; usize::try_from(self.gate.size()).unwrap()];
        self.gate.memory.read_at(&mut data, 0).unwrap();
        data
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.gate.release();
        drop(self.server.take());
    }
}

/// The text of a Prometheus scrape of `http://ADDR/metrics`.
pub(crate) fn scrape(addr: &str) -> String {
    let mut http = TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(STARTUP)).unwrap();
    http.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    response
}

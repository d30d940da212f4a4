//! Test support for r3map's integration tests: the server programs they run against, and ports.
//!
//! What it does: starts server programs (`redis-server`, moto, `nbdkit`, `qemu-nbd`) so that a
//! test knows when they serve and where without polling or sleeping, keeps their output for
//! failure messages and for tests that count requests, and kills them when the test ends, also
//! when it fails. It holds TCP ports, so that no other process can take a port between two
//! servers a test starts on it, or while a test needs an address that refuses connections.
//!
//! What it does not: anything a user of r3map runs. It is only ever a dev-dependency.
//!
//! # Layout
//! - [`HeldPort`]: a loopback port bound without listening, and listeners on it.
//! - [`Daemon`]: a server process, ready when it says so in its output or at once when it is
//!   handed its listening socket (socket activation), killed when dropped.

use std::fmt;
use std::io::{self, BufRead as _, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt as _, FdMapping};
use socket2::{Domain, Socket, Type};

/// How long a server may take to say it is ready, or to print a line a test waits for, before
/// the test fails. Only a guard against a test that would otherwise hang: nothing waits for it
/// to pass.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A port on 127.0.0.1, bound with `SO_REUSEADDR` but not listening: connections to it are
/// refused, the kernel gives it to no other socket bound to port 0 or connecting out, and only a
/// socket with `SO_REUSEADDR` asking for this very port can bind it (what a server a test starts
/// on it does). Released when dropped.
#[derive(Debug)]
pub struct HeldPort {
    _socket: Socket,
    addr: SocketAddr,
}

impl HeldPort {
    /// Holds a port the kernel picks.
    ///
    /// # Panics
    /// When no socket can be made or bound.
    #[must_use]
    pub fn new() -> Self {
        let socket = reusable_socket().expect("a TCP socket");
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("binding 127.0.0.1:0");
        let addr = socket.local_addr().ok().and_then(|a| a.as_socket()).expect("the bound address");
        Self { _socket: socket, addr }
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A listener on the port (blocking). Another listener may follow once this one is closed;
    /// until then, this fails.
    ///
    /// # Errors
    /// When something listens on the port already.
    pub fn listener(&self) -> io::Result<TcpListener> {
        let socket = reusable_socket()?;
        socket.bind(&self.addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    }
}

impl Default for HeldPort {
    fn default() -> Self {
        Self::new()
    }
}

fn reusable_socket() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// A server process with its standard output and error captured line by line; killed (and
/// reaped) when dropped.
pub struct Daemon {
    name: String,
    child: Child,
    output: Arc<Output>,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon").field("name", &self.name).field("pid", &self.child.id()).finish()
    }
}

#[derive(Default)]
struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutputState {
    lines: Vec<String>,
    /// Pipes still open: 0 once the process has closed both (it exited, or closed them).
    open: usize,
}

impl Daemon {
    /// Starts `command` and returns once a line of its output (standard output or error)
    /// contains `ready`.
    ///
    /// # Errors
    /// When the program cannot be started (`NotFound` when it is not installed).
    ///
    /// # Panics
    /// When the program ends, or stays silent for [`PATIENCE`], before it prints `ready`; the
    /// message holds what it printed.
    pub fn start(mut command: Command, ready: &str) -> io::Result<Self> {
        let daemon = Self::spawn(&mut command)?;
        daemon.wait_for_line(ready);
        Ok(daemon)
    }

    /// Starts `program args` with `listener` (a listening socket) as its file descriptor 3 and
    /// `LISTEN_FDS=1`, `LISTEN_PID` set to its own pid: systemd's socket activation, which
    /// `nbdkit` and `qemu-nbd` take. Ready at once: connections wait in the socket's backlog
    /// until the program accepts them.
    ///
    /// # Errors
    /// When `sh` or the program cannot be started.
    pub fn activated(program: &str, args: &[&str], listener: impl Into<OwnedFd>) -> io::Result<Self> {
        // The shell sets LISTEN_PID to its own pid and then becomes the program.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .env_remove("LISTEN_FDNAMES");
        command
            .fd_mappings(vec![FdMapping { parent_fd: listener.into(), child_fd: 3 }])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut daemon = Self::spawn(&mut command)?;
        daemon.name = program.to_owned();
        Ok(daemon)
    }

    fn spawn(command: &mut Command) -> io::Result<Self> {
        let name = command.get_program().to_string_lossy().into_owned();
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let output = Arc::new(Output::default());
        output.lock().open = 2;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        collect(stdout, Arc::clone(&output));
        collect(stderr, Arc::clone(&output));
        Ok(Self { name, child, output })
    }

    /// The process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line printed since the start contains `pattern`, and returns it.
    ///
    /// # Panics
    /// When the process closes its output, or [`PATIENCE`] passes, first.
    pub fn wait_for_line(&self, pattern: &str) -> String {
        self.wait_for_lines(pattern, 1)
    }

    /// Waits until `count` lines printed since the start contain `pattern`, and returns the last.
    ///
    /// # Panics
    /// When the process closes its output, or [`PATIENCE`] passes, first.
    pub fn wait_for_lines(&self, pattern: &str, count: usize) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut state = self.output.lock();
        loop {
            if let Some(line) = state.lines.iter().filter(|l| l.contains(pattern)).nth(count - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if state.open == 0 || now >= deadline {
                let printed = state.lines.join("\n");
                let why = if state.open == 0 { "ended" } else { "waited too long" };
                drop(state);
                panic!(
                    "{} {why} before printing {count} lines with {pattern:?}; it printed:\n{printed}",
                    self.name
                );
            }
            state = self
                .output
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// How many lines printed so far contain `pattern`.
    #[must_use]
    pub fn count_lines(&self, pattern: &str) -> usize {
        self.output.lock().lines.iter().filter(|l| l.contains(pattern)).count()
    }

    /// Everything printed so far, a line each.
    #[must_use]
    pub fn output(&self) -> String {
        self.output.lock().lines.join("\n")
    }

    /// Kills the process (`SIGKILL`) and reaps it; nothing if it has ended.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads `pipe` line by line into `output` until it closes, so the process never blocks on a
/// full pipe.
fn collect(pipe: impl Read + Send + 'static, output: Arc<Output>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_owned();
                    output.lock().lines.push(text);
                    output.changed.notify_all();
                }
            }
        }
        output.lock().open -= 1;
        output.changed.notify_all();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_refuses_connections_and_other_binds() {
        let port = HeldPort::new();
        let e = std::net::TcpStream::connect(port.addr()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let plain = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert!(plain.bind(&port.addr().into()).is_err(), "a bind without SO_REUSEADDR fails");
    }

    #[test]
    fn listeners_on_a_held_port_follow_each_other() {
        let port = HeldPort::new();
        let first = port.listener().unwrap();
        assert!(port.listener().is_err(), "two listeners at once");
        let client = std::net::TcpStream::connect(port.addr()).unwrap();
        drop(first.accept().unwrap());
        drop((client, first));
        let second = port.listener().unwrap();
        let _client = std::net::TcpStream::connect(port.addr()).unwrap();
        drop(second.accept().unwrap());
    }

    #[test]
    fn a_daemon_is_ready_when_it_prints_the_line() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo starting; echo ready >&2; echo 'GET /a'; echo 'GET /b'; exec sleep 600"]);
        let mut daemon = Daemon::start(command, "ready").unwrap();
        assert_eq!(daemon.wait_for_lines("GET", 2), "GET /b");
        assert_eq!(daemon.count_lines("GET"), 2);
        daemon.kill();
        assert!(daemon.output().contains("starting"));
    }

    #[test]
    #[should_panic(expected = "ended before printing 1 lines with \"ready\"")]
    fn a_daemon_that_ends_before_it_is_ready_fails_with_its_output() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'no config'; exit 3"]);
        let _ = Daemon::start(command, "ready");
    }

    #[test]
    fn a_missing_program_is_not_found() {
        let e = Daemon::start(Command::new("/nonexistent/r3map-test-program"), "x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn an_activated_daemon_gets_the_listener_as_fd_3() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Prints its environment and what fd 3 is, then serves one connection with "hello".
        let script = "echo pid=$$ fds=$LISTEN_FDS listen_pid=$LISTEN_PID; \
                      readlink /proc/self/fd/3; exec sleep 600";
        let daemon = Daemon::activated("sh", &["-c", script], listener).unwrap();
        let line = daemon.wait_for_line("fds=");
        assert_eq!(line, format!("pid={0} fds=1 listen_pid={0}", daemon.id()));
        assert!(daemon.wait_for_line("socket:").starts_with("socket:["), "{}", daemon.output());
        // The socket listens already: a connection is queued until the program accepts.
        let _queued = std::net::TcpStream::connect(addr).unwrap();
    }
}

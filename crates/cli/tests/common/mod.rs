//! What the CLI tests share: child processes that are reaped whatever happens, free ports.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to say it is ready.
pub(crate) const STARTUP: Duration = Duration::from_secs(30);

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
    /// Starts `bin args` and waits for its "serving ..." line.
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
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if READY.iter().any(|r| line.starts_with(r)) => {
                    proc.ready = line;
                    return proc;
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.child.wait().unwrap();
                    panic!("{bin} {args:?} exited ({status}) before serving:\n{}", proc.stderr());
                }
            }
            assert!(Instant::now() < deadline, "{bin} {args:?} did not start in time:\n{}", proc.stderr());
        }
    }

    /// The TCP address from the ready line (`... on 127.0.0.1:PORT [...]`).
    pub(crate) fn tcp(&self) -> String {
        let (_, after) = self.ready.rsplit_once(") on ").expect("a TCP address in the ready line");
        after.split(' ').next().unwrap().to_owned()
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

    /// Waits for the process to exit by itself.
    pub(crate) fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit in time:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
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

/// A port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The text of a Prometheus scrape of `http://ADDR/metrics`.
pub(crate) fn scrape(addr: &str) -> String {
    let mut http = TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    http.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    response
}

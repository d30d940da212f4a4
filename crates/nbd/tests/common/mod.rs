//! A server running on its own runtime in a background thread, for tests that drive it with
//! blocking peers (external programs, plain sockets).

#![allow(dead_code, unreachable_pub)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use r3map_core::{Backend, Memory, SharedBackend};
use r3map_nbd::{NbdExport, NbdServer};
use tokio::sync::oneshot;

pub struct Running {
    pub port: u16,
    pub socket: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Serves `exports` on 127.0.0.1 at a free port.
    pub fn tcp(exports: Vec<NbdExport>) -> Self {
        Self::start(exports, false)
    }

    /// Serves `exports` on a Unix socket in a fresh directory.
    pub fn unix(exports: Vec<NbdExport>) -> Self {
        Self::start(exports, true)
    }

    /// Serves a configured server on 127.0.0.1 at a free port.
    pub fn tcp_server(server: NbdServer) -> Self {
        Self::serve(server, false)
    }

    fn start(exports: Vec<NbdExport>, unix: bool) -> Self {
        Self::serve(NbdServer::new(exports).expect("valid exports"), unix)
    }

    fn serve(server: NbdServer, unix: bool) -> Self {
        let dir = unix.then(|| tempfile::tempdir().expect("tempdir"));
        let socket = dir.as_ref().map(|d| d.path().join("nbd.sock"));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                if let Some(path) = path {
                    let listener = tokio::net::UnixListener::bind(&path)?;
                    ready_tx.send(0).expect("test alive");
                    server.serve_unix(listener, shutdown).await
                } else {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    ready_tx.send(listener.local_addr()?.port()).expect("test alive");
                    server.serve_tcp(listener, shutdown).await
                }
            })
        });
        let port = ready_rx.recv().expect("the server started");
        Self { port, socket, stop: Some(stop_tx), thread: Some(thread), _dir: dir }
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        match &self.socket {
            Some(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            None => format!("nbd://127.0.0.1:{}/{name}", self.port),
        }
    }

    /// Stops the server and returns the result of its final flush.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    /// Tells the server to shut down, without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.begin_stop();
        match self.thread.take() {
            Some(t) => t.join().expect("the server thread did not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A memory backend of `size` bytes with 64 KiB pages.
pub fn memory(size: u64) -> Arc<Memory> {
    Arc::new(Memory::with_page_size(size, 64 * 1024).expect("valid page size"))
}

pub fn export(name: &str, backend: SharedBackend) -> NbdExport {
    NbdExport::new(name, backend)
}

/// Whether `tool` is on the PATH; prints the skip notice when it is not.
pub fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(tool))));
    if !found {
        println!("skipped: {tool} not installed");
    }
    found
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs a program, returning its exit success and combined output.
pub fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(program).args(args).output().expect("the program runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Reads the whole backend.
pub fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(b.size()).expect("small backend")];
    b.read_at(&mut buf, 0).expect("read");
    buf
}

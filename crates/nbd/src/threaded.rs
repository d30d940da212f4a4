//! Transmission on plaintext TCP and Unix sockets: a few threads per connection, each reading a
//! request, running it and writing its reply itself, as nbdkit does.
//!
//! Handing every request from an async reader to a blocking pool and every reply back to an async
//! writer costs two thread wake-ups per request, which at 4 KiB was most of the server's time.
//! Here a thread takes the reader (a mutex around a buffered socket), reads one request, lets go,
//! runs it on the backend, then takes the writer and sends the reply straight from its own
//! buffer, which it keeps from request to request. A connection holds at most the server's
//! limit of requests at once ([`NbdServer::with_threads`](crate::NbdServer::with_threads)); the
//! next ones wait in the socket, which is the backpressure.
//!
//! How the threads start is the caller's choice ([`Start`]):
//! - [`Start::Lazy`], for clients over the network: one thread at first, another whenever every
//!   thread is busy, up to the limit.
//! - [`Start::Eager`], for the kernel's NBD client, which may be swapping to us because memory is
//!   short: every thread starts, and sizes its buffers, before the first request is read. From
//!   then on a request of up to the preallocated size allocates nothing, whichever thread takes
//!   it and however the threads are scheduled.
//!
//! Shutdown (the server's or a `DISC`) shuts the socket down for reading, so the thread waiting
//! for a request sees the end of the stream; requests already read still run and are answered,
//! with [`SHUTDOWN_GRACE`] for a client that does not read them.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use r3map_core::Capabilities;
use r3map_net::serve::Stop;
use tokio::sync::Notify;

use crate::exec::{Conn, SHUTDOWN_GRACE, check, error_reply, execute};
use crate::proto::{self, Command, Request};

/// Reply buffers larger than this are given back after their request instead of being kept.
const KEEP_BUFFER: usize = 4 * 1024 * 1024;

/// How the threads of a connection start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// One thread, and another whenever every thread is busy.
    Lazy,
    /// Every thread, each with request and reply buffers of `buffer` bytes, before any request
    /// is read.
    Eager { buffer: usize },
}

/// A plaintext socket taken back from tokio.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // The peer may be gone already; there is nothing more to do then.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }

    fn set_write_timeout(&self, d: std::time::Duration) {
        let _ = match self {
            Self::Tcp(s) => s.set_write_timeout(Some(d)),
            Self::Unix(s) => s.set_write_timeout(Some(d)),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the threads of one connection share.
struct Shared {
    conn: Conn,
    size: u64,
    caps: Capabilities,
    reader: Mutex<Reader>,
    writer: Mutex<Socket>,
    /// For shutting the socket down from outside the threads.
    control: Socket,
    /// Threads running, the most that may run, and how many are waiting for a request.
    threads: AtomicUsize,
    max_threads: usize,
    idle: AtomicUsize,
    /// The first error that ended the connection.
    error: Mutex<Option<io::Error>>,
    finished: Notify,
    runtime: tokio::runtime::Handle,
    start: Start,
    /// With [`Start::Eager`]: threads that have not yet sized their buffers. No thread reads a
    /// request before this is zero.
    starting: Mutex<usize>,
    started: Condvar,
}

struct Reader {
    rd: BufReader<Socket>,
    /// No more requests will be read: the client left, sent `DISC` or broke the stream.
    done: bool,
}

/// One request taken from the stream: checked, with its payload in the thread's buffer.
enum Taken {
    Run(Command, Request),
    Refuse(Request, u32, String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-request leaves nothing half-done that matters here.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves transmission on `socket` until the client leaves or `stop` fires.
pub(crate) async fn transmission(
    socket: Socket,
    conn: Conn,
    max_threads: usize,
    start: Start,
    stop: Stop,
) -> io::Result<()> {
    let max_threads = max_threads.max(1);
    let size = conn.export.backend.size();
    let caps = conn.export.backend.capabilities();
    let shared = Arc::new(Shared {
        conn,
        size,
        caps,
        reader: Mutex::new(Reader {
            rd: BufReader::with_capacity(256 * 1024, socket.try_clone()?),
            done: false,
        }),
        writer: Mutex::new(socket.try_clone()?),
        control: socket,
        threads: AtomicUsize::new(0),
        max_threads,
        idle: AtomicUsize::new(0),
        error: Mutex::new(None),
        finished: Notify::new(),
        runtime: tokio::runtime::Handle::current(),
        start,
        starting: Mutex::new(if matches!(start, Start::Eager { .. }) { max_threads } else { 0 }),
        started: Condvar::new(),
    });
    let finished = shared.finished.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    match start {
        Start::Lazy => spawn(&shared),
        Start::Eager { .. } => (0..max_threads).for_each(|_| spawn(&shared)),
    }
    let over = tokio::select! {
        () = &mut finished => true,
        () = stop.stopped() => {
            shared.control.set_write_timeout(SHUTDOWN_GRACE);
            shared.control.shutdown(Shutdown::Read);
            false
        }
    };
    if !over {
        finished.await;
    }
    let error = lock(&shared.error).take();
    error.map_or(Ok(()), Err)
}

fn spawn(shared: &Arc<Shared>) {
    shared.threads.fetch_add(1, Ordering::AcqRel);
    shared.idle.fetch_add(1, Ordering::AcqRel);
    let s = Arc::clone(shared);
    shared.runtime.spawn_blocking(move || worker(&s));
}

fn worker(shared: &Arc<Shared>) {
    let (mut reply, mut payload) = match shared.start {
        Start::Lazy => (Vec::new(), Vec::new()),
        Start::Eager { buffer } => {
            let buffers = (Vec::with_capacity(buffer), Vec::with_capacity(buffer));
            let mut starting = lock(&shared.starting);
            *starting -= 1;
            if *starting == 0 {
                shared.started.notify_all();
            }
            while *starting > 0 {
                starting = shared.started.wait(starting).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            buffers
        }
    };
    loop {
        let taken = match take(shared, &mut payload) {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(e) => {
                fail(shared, e);
                break;
            }
        };
        // Every thread is busy now: start one more for the requests behind this one.
        if shared.idle.fetch_sub(1, Ordering::AcqRel) == 1
            && shared.start == Start::Lazy
            && shared.threads.load(Ordering::Acquire) < shared.max_threads
        {
            spawn(shared);
        }
        let n = match &taken {
            Taken::Run(cmd, req) => {
                let len = if *cmd == Command::Write { req.length as usize } else { 0 };
                execute(&shared.conn, *cmd, req, &payload[..len], &mut reply)
            }
            Taken::Refuse(req, error, message) => {
                metrics::counter!("r3map_nbd_refused_total").increment(1);
                let r = error_reply(req.cookie, *error, message, shared.conn.structured);
                reply.clear();
                reply.extend_from_slice(&r);
                r.len()
            }
        };
        let written = lock(&shared.writer).write_all(&reply[..n]);
        // A buffer grown past the limit by a large request is given back; an eager thread
        // takes its preallocated size again at once, so the next small request allocates nothing.
        let (keep, fresh) = match shared.start {
            Start::Lazy => (KEEP_BUFFER, 0),
            Start::Eager { buffer } => (KEEP_BUFFER.max(buffer), buffer),
        };
        if reply.capacity() > keep {
            reply = Vec::with_capacity(fresh);
        }
        if payload.capacity() > keep {
            payload = Vec::with_capacity(fresh);
        }
        shared.idle.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = written {
            fail(shared, e);
            break;
        }
    }
    shared.idle.fetch_sub(1, Ordering::AcqRel);
    if shared.threads.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.finished.notify_one();
    }
}

/// Ends the connection because of `e`: no more requests are read, and the reply of `e` is the
/// connection's result (the first one wins).
fn fail(shared: &Shared, e: io::Error) {
    lock(&shared.error).get_or_insert(e);
    // Shut down first: a thread may hold the reader while it waits for bytes.
    shared.control.shutdown(Shutdown::Both);
    lock(&shared.reader).done = true;
}

/// Reads the next request (and a write's payload into `payload`); `None` once the stream is over.
fn take(shared: &Shared, payload: &mut Vec<u8>) -> io::Result<Option<Taken>> {
    let mut guard = lock(&shared.reader);
    let reader = &mut *guard;
    if reader.done {
        return Ok(None);
    }
    let mut header = [0u8; proto::REQUEST_LEN];
    if let Err(e) = reader.rd.read_exact(&mut header) {
        reader.done = true;
        // A client that hangs up between requests (or a shutdown) is a clean end.
        return if e.kind() == io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e) };
    }
    let req = match Request::decode(&header) {
        Ok(r) => r,
        Err(e) => {
            // Without the magic the stream cannot be followed: hang up.
            reader.done = true;
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")));
        }
    };
    if req.command() == Some(Command::Disc) {
        reader.done = true;
        drop(guard);
        shared.control.shutdown(Shutdown::Read);
        return Ok(None);
    }
    let checked = check(&req, &shared.conn, shared.size, shared.caps);
    if req.command() == Some(Command::Write) {
        let len = req.length as usize;
        if checked.is_ok() {
            if payload.len() < len {
                payload.resize(len, 0);
            }
            reader.rd.read_exact(&mut payload[..len]).inspect_err(|_| reader.done = true)?;
        } else {
            // Keep the stream in step: the data of a refused write is read and dropped.
            io::copy(&mut (&mut reader.rd).take(u64::from(req.length)), &mut io::sink())
                .inspect_err(|_| reader.done = true)?;
        }
    }
    Ok(Some(match checked {
        Ok(cmd) => Taken::Run(cmd, req),
        Err(r) => {
            tracing::debug!(kind = req.kind, offset = req.offset, length = req.length, message = %r.message, "NBD request refused");
            Taken::Refuse(req, r.error, r.message)
        }
    }))
}

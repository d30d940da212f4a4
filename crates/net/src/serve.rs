//! The server side every protocol's server is built on, as [`mux`](crate::mux) is the client
//! side. A protocol brings its handshake, its request codec ([`Protocol`]) and what a connection
//! does ([`Service`]); the loops around them are here, written once:
//!
//! - **Accepting** ([`Listener`]): TCP (with `TCP_NODELAY`) or a Unix socket, each connection
//!   handed over as a [`Stream`] with a description of the peer for the logs. A failed accept
//!   (out of file descriptors, say) is logged and retried after a short pause, so the clients
//!   already connected are served on.
//! - **The connection set** ([`serve`]): every connection runs as a task of its own until the
//!   shutdown future completes. Then the listener closes, every connection is told to stop
//!   ([`Stop`]), the server waits for all of them (aborting the rest after [`Service::grace`],
//!   when the service sets one) and only then flushes every export ([`Service::flush_all`]):
//!   stop accepting, stop the connections, drain, flush, in this order and nowhere else.
//! - **Handshakes** ([`handshake`]): a client gets a bounded time to negotiate, and shutdown does
//!   not wait for one that is still negotiating.
//! - **Transmission** ([`transmission`]): a reader decodes requests and starts each at once on
//!   tokio's blocking pool (backends are blocking); one writer task sends the replies in the
//!   order they complete, through a buffer it flushes whenever no reply is waiting. A request
//!   takes its share of the connection's budget ([`Protocol::cost`]) before it runs and its reply
//!   carries it until written, so a client that stops reading its replies stops the server
//!   reading its requests. When the connection ends, requests in flight finish and their replies
//!   go out; on shutdown a client that does not read them gets [`Limits::grace`] to do so.
//! - **A handle** ([`ServerHandle`]): a server running as a task on an [`Io`] runtime, for
//!   callers without a runtime of their own; dropping it stops it and waits for the final flush.
//!
//! Not here: TLS (each protocol upgrades its own way: the native one before its hello, NBD on
//! `NBD_OPT_STARTTLS`), negotiation, what a request means, metrics, and NBD's threaded driver for
//! plaintext sockets, which reads and answers requests on its own threads and shares only
//! [`Stop`] and [`handshake`] with this.
//!
//! Written by hand rather than on a server framework (tower, hyper's server loop): both protocols
//! are long-lived binary streams with replies out of order, which those do not model, and what is
//! needed (a budget that follows a reply to the socket, a drain that ends before the flush) is
//! a few hundred lines on tokio's primitives.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::runtime::Io;

/// The pause after a failed accept, so that a listener out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The reply writer's buffer.
const WRITE_BUFFER: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Accepting

/// A bound socket connections are accepted on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr` (port 0 picks one) on the runtime of `io`.
    ///
    /// # Errors
    /// Binding the address.
    pub fn bind_tcp(io: &Io, addr: SocketAddr) -> io::Result<Self> {
        io.block_on(TcpListener::bind(addr)).map(Self::Tcp)
    }

    /// Takes over a TCP listener the caller bound, with whatever socket options it needs.
    ///
    /// # Errors
    /// The listener cannot be used by tokio.
    pub fn from_std_tcp(io: &Io, listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let _entered = io.handle().enter();
        TcpListener::from_std(listener).map(Self::Tcp)
    }

    /// Binds a Unix socket at `path` on the runtime of `io`, replacing a stale socket file.
    ///
    /// # Errors
    /// Removing the old file or binding the socket.
    pub fn bind_unix(io: &Io, path: &Path) -> io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let _entered = io.handle().enter();
        UnixListener::bind(path).map(Self::Unix)
    }

    /// The TCP address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Unix(_) => None,
        }
    }

    /// The Unix socket's file, when it has one.
    #[must_use]
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Self::Tcp(_) => None,
            Self::Unix(l) => l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_owned)),
        }
    }

    /// The next connection and a description of its peer (an address, or `unix socket`).
    ///
    /// # Errors
    /// What `accept` reports (out of file descriptors and the like).
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Self::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "TCP_NODELAY could not be set");
                }
                Ok((Stream::Tcp(tcp), peer.to_string()))
            }
            Self::Unix(l) => {
                let (unix, _) = l.accept().await?;
                Ok((Stream::Unix(unix), "unix socket".to_owned()))
            }
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

/// An accepted connection, in plaintext.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Runs `$body` with `$s` bound to the socket inside `$stream`, pinned.
macro_rules! on_stream {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream.get_mut() {
            Stream::Tcp(t) => {
                let $s = Pin::new(t);
                $body
            }
            Stream::Unix(u) => {
                let $s = Pin::new(u);
                $body
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_stream!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(t) => t.is_write_vectored(),
            Self::Unix(u) => u.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_shutdown(cx))
    }
}

// ---------------------------------------------------------------------------------------------
// Stopping

/// Tells connections to stop; they watch a [`Stop`] from [`Stopper::token`]. Dropping it stops
/// them too, so a connection never outlives what started it unnoticed.
#[derive(Debug)]
pub struct Stopper(watch::Sender<bool>);

/// What a connection watches to learn that it should stop. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stopper {
    #[must_use]
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    /// A token that completes [`Stop::stopped`] once [`Stopper::stop`] is called.
    #[must_use]
    pub fn token(&self) -> Stop {
        Stop(self.0.subscribe())
    }

    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Stopper {
    fn default() -> Self {
        Self::new()
    }
}

impl Stop {
    /// Whether stopping has begun.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Completes once stopping has begun (at once if it has), or the [`Stopper`] is gone.
    pub async fn stopped(&self) {
        let mut rx = self.0.clone();
        // An error means the stopper is gone, which counts as stopping.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// How a [`handshake`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake<T> {
    /// It finished (successfully or not) in time.
    Done(T),
    /// It took longer than allowed.
    TimedOut,
    /// The server began stopping first; the client is simply dropped.
    Stopped,
}

/// Runs a connection's handshake `negotiation` for at most `timeout`, or until `stop` fires.
pub async fn handshake<F: Future>(timeout: Duration, stop: &Stop, negotiation: F) -> Handshake<F::Output> {
    tokio::select! {
        done = tokio::time::timeout(timeout, negotiation) => match done {
            Ok(out) => Handshake::Done(out),
            Err(_) => Handshake::TimedOut,
        },
        () = stop.stopped() => Handshake::Stopped,
    }
}

// ---------------------------------------------------------------------------------------------
// The connection set

/// What a server does with its connections: the per-protocol half of [`serve`].
pub trait Service: Clone + Send + Sync + 'static {
    /// The protocol's name, for the logs.
    const NAME: &'static str;

    /// Serves one accepted connection until it ends or `stop` fires. Requests that have started
    /// must have finished on the backend when it returns: the final flush comes next.
    fn connection(&self, stream: Stream, peer: String, stop: Stop) -> impl Future<Output = ()> + Send;

    /// Flushes every export; runs once, after every connection has ended.
    ///
    /// # Errors
    /// A failed flush.
    fn flush_all(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// How long connections may take to end once shutdown starts, after which they are aborted.
    /// `None` (the default) waits for them: the transmission has its own [`Limits::grace`] for
    /// clients that do not read, and an aborted connection could leave a backend call running
    /// past the flush.
    fn grace(&self) -> Option<Duration> {
        None
    }
}

/// Serves connections from `listener` until `shutdown` completes, then closes the listener, stops
/// every connection, waits for them to end, and flushes every export.
///
/// # Errors
/// A failed final flush.
pub async fn serve<S: Service>(
    service: &S,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let stopper = Stopper::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = service.clone();
                    let stop = stopper.token();
                    connections.spawn(async move { service.connection(stream, peer, stop).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the clients we have.
                    tracing::warn!(server = S::NAME, error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(
        server = S::NAME,
        connections = connections.len(),
        "shutting down: finishing requests in flight"
    );
    stopper.stop();
    let all_ended = async { while connections.join_next().await.is_some() {} };
    match service.grace() {
        None => all_ended.await,
        Some(grace) => {
            if tokio::time::timeout(grace, all_ended).await.is_err() {
                tracing::warn!(
                    server = S::NAME,
                    connections = connections.len(),
                    "connections still open after the grace period are aborted"
                );
                connections.shutdown().await;
            }
        }
    }
    service.flush_all().await
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A protocol's request codec, for [`transmission`].
pub trait Protocol: Send + Sync + 'static {
    /// Bytes of a request header, read before [`Protocol::decode`] is called.
    const HEADER_LEN: usize;
    /// A request read and checked, ready to run.
    type Request: Send + 'static;
    /// A reply, ready to write.
    type Reply: Send + 'static;

    /// Decodes a request from its `header`, reading whatever follows it (a payload) from `rd`.
    /// An error ends the connection with it, without a reply.
    fn decode<R: AsyncRead + Unpin + Send>(
        &self,
        header: &[u8],
        rd: &mut R,
    ) -> impl Future<Output = io::Result<Decoded<Self::Request, Self::Reply>>> + Send;

    /// How much of the connection's budget `request` takes until its reply is written.
    fn cost(&self, _request: &Self::Request) -> u32 {
        1
    }

    /// Runs `request` (blocking: on tokio's blocking pool).
    fn execute(&self, request: Self::Request) -> Self::Reply;

    /// Writes `reply` to the (buffered) stream; the writer flushes. The reply is the
    /// protocol's again (to give its buffers back), and dropped if the connection broke first.
    fn write<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut W,
        reply: Self::Reply,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// What a request header turned out to be.
#[derive(Debug)]
pub enum Decoded<Q, P> {
    /// A request to run.
    Run(Q),
    /// A request answered without running it (refused); takes one unit of the budget.
    Answer(P),
    /// The client said goodbye: no more requests.
    Disconnect,
    /// The stream cannot be followed: send this reply, then end the connection with the error.
    Fatal(P, io::Error),
}

/// A connection's in-flight bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Units of [`Protocol::cost`] in flight at once: running, or with a reply not yet written.
    /// A request costing more runs alone.
    pub budget: u32,
    /// How long replies in flight may take to reach the client once shutdown starts.
    pub grace: Duration,
}

type Queued<P> = (<P as Protocol>::Reply, Option<OwnedSemaphorePermit>);

/// Serves requests from `rd` with replies to `wr` until the client disconnects, the stream breaks
/// or `stop` fires; then lets requests in flight finish and their replies go out (see the module
/// docs). Returns once no request of the connection runs on the backend any more.
///
/// # Errors
/// A broken stream or a fatal request ([`Decoded::Fatal`]); a failed write of a reply. A client
/// that hangs up between requests is a clean end.
pub async fn transmission<P, R, W>(
    protocol: Arc<P>,
    mut rd: R,
    wr: W,
    limits: Limits,
    stop: Stop,
) -> io::Result<()>
where
    P: Protocol,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let total = limits.budget.max(1);
    let budget = Arc::new(Semaphore::new(total as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Queued<P>>();
    let writer =
        tokio::spawn(write_replies(Arc::clone(&protocol), BufWriter::with_capacity(WRITE_BUFFER, wr), rx));
    let mut header = vec![0u8; P::HEADER_LEN];
    let result = loop {
        tokio::select! {
            biased;
            () = stop.stopped() => break Ok(()),
            read = rd.read_exact(&mut header) => {
                if let Err(e) = read {
                    // A client that hangs up between requests is done with us.
                    break if e.kind() == io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
                }
            }
        }
        let request = match protocol.decode(&header, &mut rd).await {
            Ok(Decoded::Run(request)) => request,
            Ok(Decoded::Answer(reply)) => {
                let Some(permit) = acquire(&budget, 1, &stop).await else {
                    break Ok(());
                };
                let _ = tx.send((reply, Some(permit)));
                continue;
            }
            Ok(Decoded::Disconnect) => break Ok(()),
            Ok(Decoded::Fatal(reply, e)) => {
                let _ = tx.send((reply, None));
                break Err(e);
            }
            Err(e) => break Err(e),
        };
        let units = protocol.cost(&request).clamp(1, total);
        let Some(permit) = acquire(&budget, units, &stop).await else {
            break Ok(());
        };
        let protocol = Arc::clone(&protocol);
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let reply = protocol.execute(request);
            let _ = tx.send((reply, Some(permit)));
        });
    };
    // The whole budget back means nothing runs and every reply is written.
    let drained = tokio::select! {
        r = budget.acquire_many(total) => r.is_ok(),
        () = async {
            stop.stopped().await;
            tokio::time::sleep(limits.grace).await;
        } => false,
    };
    drop(tx);
    if drained {
        let written = writer.await.map_err(io::Error::other)?;
        return result.and(written);
    }
    // The client did not take its replies in time: drop them (and their budget), then wait for
    // the requests still running, so that the final flush comes after them.
    writer.abort();
    let _ = writer.await;
    let _ = budget.acquire_many(total).await;
    result
}

/// Takes `units` of the budget, or `None` once stopping begins.
async fn acquire(budget: &Arc<Semaphore>, units: u32, stop: &Stop) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = Arc::clone(budget).acquire_many_owned(units) => permit.ok(),
        () = stop.stopped() => None,
    }
}

/// Writes replies as they come, flushing whenever none is waiting. After a failed write it keeps
/// taking (and dropping) replies, so their budget comes back; the error is its result.
async fn write_replies<P: Protocol, W: AsyncWrite + Unpin + Send>(
    protocol: Arc<P>,
    mut out: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Queued<P>>,
) -> io::Result<()> {
    let mut failed = None;
    while let Some((reply, permit)) = rx.recv().await {
        if failed.is_some() {
            continue;
        }
        let written = async {
            protocol.write(&mut out, reply).await?;
            if rx.is_empty() {
                out.flush().await?;
            }
            Ok::<(), io::Error>(())
        }
        .await;
        drop(permit);
        if let Err(e) = written {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush().await?;
    // The client may be gone already; everything it asked for was written.
    let _ = out.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The handle

/// A server running as a task on an [`Io`] runtime (the process's shared one unless given
/// another), for callers without an async runtime of their own (tests, benchmarks, simple tools).
/// Dropping it stops the server and waits for its final flush.
#[derive(Debug)]
pub struct ServerHandle {
    addr: Option<SocketAddr>,
    path: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
    io: Io,
}

impl ServerHandle {
    /// Serves TCP on `addr` (port 0 picks one; see [`ServerHandle::local_addr`]).
    ///
    /// # Errors
    /// Binding the address.
    pub fn start_tcp<S: Service>(service: S, addr: SocketAddr) -> io::Result<Self> {
        let io = Io::shared();
        let listener = Listener::bind_tcp(&io, addr)?;
        Ok(Self::start(service, io, listener))
    }

    /// Serves TCP on a listener the caller bound, with whatever socket options it needs (the
    /// server takes it over and closes it at shutdown).
    ///
    /// # Errors
    /// The listener cannot be used by tokio.
    pub fn start_tcp_listener<S: Service>(service: S, listener: std::net::TcpListener) -> io::Result<Self> {
        let io = Io::shared();
        let listener = Listener::from_std_tcp(&io, listener)?;
        Ok(Self::start(service, io, listener))
    }

    /// Serves a Unix socket at `path` (replacing a stale socket file).
    ///
    /// # Errors
    /// Binding the socket.
    pub fn start_unix<S: Service>(service: S, path: &Path) -> io::Result<Self> {
        let io = Io::shared();
        let listener = Listener::bind_unix(&io, path)?;
        Ok(Self::start(service, io, listener))
    }

    /// Serves `listener` (made on the runtime of `io`) on `io`. A Unix socket's file is removed
    /// when the server stops.
    pub fn start<S: Service>(service: S, io: Io, listener: Listener) -> Self {
        let (addr, path) = (listener.local_addr(), listener.socket_path());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = io.handle().spawn(async move {
            serve(&service, listener, async move {
                let _ = stopped.await;
            })
            .await
        });
        Self { addr, path, stop: Some(stop), task: Some(task), io }
    }

    /// The TCP address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Stops accepting, finishes requests in flight, flushes the exports.
    ///
    /// # Errors
    /// A failed final flush.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.task.take() {
            Some(t) => self.io.block_on(t).map_err(|_| io::Error::other("the server task panicked"))?,
            None => Ok(()),
        };
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, "the server's final flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

    use super::*;

    /// What the test servers report, in the order it happened.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Started(u8),
        Executed(u8),
        Stopped,
        Handshake(&'static str),
        Aborted,
        Flushed,
    }

    /// One byte per request, answered with `reply_len` copies of it. 0 is goodbye, 0xFF a frame
    /// that breaks the stream, 0xFE a refused request.
    struct Echo {
        reply_len: usize,
        events: UnboundedSender<Event>,
        /// When set, each request waits for a message on it before it runs.
        gate: Option<Mutex<std::sync::mpsc::Receiver<()>>>,
        executed: AtomicUsize,
    }

    impl Echo {
        fn new(reply_len: usize, events: UnboundedSender<Event>) -> Self {
            Self { reply_len, events, gate: None, executed: AtomicUsize::new(0) }
        }
    }

    impl Protocol for Echo {
        const HEADER_LEN: usize = 1;
        type Request = u8;
        type Reply = Vec<u8>;

        async fn decode<R: AsyncRead + Unpin + Send>(
            &self,
            header: &[u8],
            _rd: &mut R,
        ) -> io::Result<Decoded<u8, Vec<u8>>> {
            Ok(match header[0] {
                0 => Decoded::Disconnect,
                0xFF => Decoded::Fatal(b"bad".to_vec(), io::Error::new(io::ErrorKind::InvalidData, "bad")),
                0xFE => Decoded::Answer(b"no".to_vec()),
                b => Decoded::Run(b),
            })
        }

        fn execute(&self, request: u8) -> Vec<u8> {
            let _ = self.events.send(Event::Started(request));
            if let Some(gate) = &self.gate {
                gate.lock().unwrap().recv().unwrap();
            }
            self.executed.fetch_add(1, Ordering::SeqCst);
            let _ = self.events.send(Event::Executed(request));
            vec![request; self.reply_len]
        }

        async fn write<W: AsyncWrite + Unpin + Send>(&self, out: &mut W, reply: Vec<u8>) -> io::Result<()> {
            out.write_all(&reply).await
        }
    }

    type Handler = Arc<dyn Fn(Stream, Stop) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

    /// A service whose connections run `handler`, reporting the flush.
    #[derive(Clone)]
    struct Test {
        handler: Handler,
        events: UnboundedSender<Event>,
        grace: Option<Duration>,
    }

    impl Test {
        fn new<F, Fut>(events: &UnboundedSender<Event>, handler: F) -> Self
        where
            F: Fn(Stream, Stop) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = ()> + Send + 'static,
        {
            Self {
                handler: Arc::new(move |s, stop| Box::pin(handler(s, stop))),
                events: events.clone(),
                grace: None,
            }
        }
    }

    impl Service for Test {
        const NAME: &'static str = "test";

        async fn connection(&self, stream: Stream, _peer: String, stop: Stop) {
            (self.handler)(stream, stop).await;
        }

        async fn flush_all(&self) -> io::Result<()> {
            let _ = self.events.send(Event::Flushed);
            Ok(())
        }

        fn grace(&self) -> Option<Duration> {
            self.grace
        }
    }

    /// Reports the drop of what it guards: a connection task aborted or ended.
    struct OnDrop(UnboundedSender<Event>);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(Event::Aborted);
        }
    }

    const LIMITS: Limits = Limits { budget: 2, grace: Duration::from_secs(10) };
    /// A reply larger than the writer's buffer: writing it waits for the client to read.
    const BIG: usize = WRITE_BUFFER + 4096;

    async fn tcp() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Serves `service` on `listener` until the returned sender fires.
    fn spawn_serve(
        service: Test,
        listener: TcpListener,
    ) -> (oneshot::Sender<()>, JoinHandle<io::Result<()>>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(&service, listener.into(), async move {
                let _ = stopped.await;
            })
            .await
        });
        (stop, task)
    }

    async fn next(events: &mut UnboundedReceiver<Event>) -> Event {
        events.recv().await.expect("the server reports")
    }

    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish_then_flushes() {
        let (events_tx, mut events) = unbounded_channel();
        let (release, gate) = std::sync::mpsc::channel();
        let echo = Arc::new(Echo { gate: Some(Mutex::new(gate)), ..Echo::new(3, events_tx.clone()) });
        let reports = events_tx.clone();
        let service = Test::new(&events_tx, move |stream, stop| {
            let (echo, reports) = (Arc::clone(&echo), reports.clone());
            async move {
                let watch = stop.clone();
                tokio::spawn(async move {
                    watch.stopped().await;
                    let _ = reports.send(Event::Stopped);
                });
                let (rd, wr) = tokio::io::split(stream);
                transmission(echo, rd, wr, LIMITS, stop).await.unwrap();
            }
        });
        let (listener, addr) = tcp().await;
        let (shutdown, served) = spawn_serve(service, listener);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&[7]).await.unwrap();
        assert_eq!(next(&mut events).await, Event::Started(7));
        shutdown.send(()).unwrap();
        assert_eq!(next(&mut events).await, Event::Stopped);
        // The request is still running: nothing may be flushed before it is done.
        release.send(()).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, [7, 7, 7], "the reply goes out, then the server hangs up");
        served.await.unwrap().unwrap();
        assert_eq!(next(&mut events).await, Event::Executed(7));
        assert_eq!(next(&mut events).await, Event::Flushed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_never_finishes_is_cut_at_the_timeout() {
        let began = tokio::time::Instant::now();
        let stopper = Stopper::new();
        let out = handshake(Duration::from_secs(10), &stopper.token(), std::future::pending::<()>()).await;
        assert_eq!(out, Handshake::TimedOut);
        assert_eq!(began.elapsed(), Duration::from_secs(10));

        // Over a socket: a client that connects and says nothing.
        let (events_tx, mut events) = unbounded_channel();
        let reports = events_tx.clone();
        let service = Test::new(&events_tx, move |mut stream, stop| {
            let reports = reports.clone();
            async move {
                let _ = reports.send(Event::Started(0));
                let mut hello = [0u8; 1];
                let out = match handshake(Duration::from_secs(10), &stop, stream.read_exact(&mut hello)).await
                {
                    Handshake::Done(_) => "done",
                    Handshake::TimedOut => "timed out",
                    Handshake::Stopped => "stopped",
                };
                let _ = reports.send(Event::Handshake(out));
            }
        });
        let (listener, addr) = tcp().await;
        let (shutdown, served) = spawn_serve(service, listener);
        let _silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(next(&mut events).await, Event::Started(0));
        assert_eq!(next(&mut events).await, Event::Handshake("timed out"));
        // Shutdown does not wait for a silent client's handshake.
        let _second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(next(&mut events).await, Event::Started(0));
        let stopping = tokio::time::Instant::now();
        shutdown.send(()).unwrap();
        served.await.unwrap().unwrap();
        assert!(stopping.elapsed() < Duration::from_secs(10), "shutdown waited for a handshake");
        assert_eq!(next(&mut events).await, Event::Handshake("stopped"));
        assert_eq!(next(&mut events).await, Event::Flushed);
    }

    #[tokio::test]
    async fn a_stopped_handshake_returns_at_once() {
        let stopper = Stopper::new();
        let stop = stopper.token();
        assert!(!stop.is_stopped());
        stopper.stop();
        assert!(stop.is_stopped());
        let out = handshake(Duration::from_secs(3600), &stop, std::future::pending::<()>()).await;
        assert_eq!(out, Handshake::Stopped);
        // A dropped stopper counts as stopping.
        let orphan = Stopper::new().token();
        assert!(orphan.is_stopped());
        orphan.stopped().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_stops_the_server_reading() {
        let (events_tx, _events) = unbounded_channel();
        let echo = Arc::new(Echo::new(BIG, events_tx));
        let (mut client, server) = tokio::io::duplex(1024);
        let (rd, wr) = tokio::io::split(server);
        let stopper = Stopper::new();
        let served = tokio::spawn(transmission(Arc::clone(&echo), rd, wr, LIMITS, stopper.token()));
        client.write_all(&[1, 2, 3, 4, 5]).await.unwrap();
        // With the clock paused, this sleep ends only once every task waits for something.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(echo.executed.load(Ordering::SeqCst), 2, "the budget of 2 is held by unread replies");
        let mut replies = vec![0u8; 5 * BIG];
        client.read_exact(&mut replies).await.unwrap();
        assert_eq!(echo.executed.load(Ordering::SeqCst), 5);
        let mut got: Vec<u8> = replies.chunks(BIG).map(|c| c[0]).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        client.write_all(&[0]).await.unwrap();
        served.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn on_shutdown_a_client_that_does_not_read_gets_the_grace_then_is_dropped() {
        let (events_tx, _events) = unbounded_channel();
        let echo = Arc::new(Echo::new(BIG, events_tx));
        let (mut client, server) = tokio::io::duplex(1024);
        let (rd, wr) = tokio::io::split(server);
        let stopper = Stopper::new();
        let served = tokio::spawn(transmission(Arc::clone(&echo), rd, wr, LIMITS, stopper.token()));
        client.write_all(&[1, 2]).await.unwrap();
        // Every task waits now: the writer for the client, which does not read.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let stopping = tokio::time::Instant::now();
        stopper.stop();
        served.await.unwrap().unwrap();
        assert_eq!(stopping.elapsed(), LIMITS.grace);
        assert_eq!(echo.executed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refused_and_fatal_requests_are_answered() {
        let (events_tx, _events) = unbounded_channel();
        let echo = Arc::new(Echo::new(1, events_tx));
        let (mut client, server) = tokio::io::duplex(1024);
        let (rd, wr) = tokio::io::split(server);
        let stopper = Stopper::new();
        let served = tokio::spawn(transmission(echo, rd, wr, LIMITS, stopper.token()));
        client.write_all(&[0xFE, 0xFF]).await.unwrap();
        let mut replies = Vec::new();
        client.read_to_end(&mut replies).await.unwrap();
        assert_eq!(replies, b"nobad");
        let e = served.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_period_aborts_a_stuck_connection() {
        let (events_tx, mut events) = unbounded_channel();
        let reports = events_tx.clone();
        let mut service = Test::new(&events_tx, move |_stream, _stop| {
            let reports = reports.clone();
            async move {
                let _guard = OnDrop(reports.clone());
                let _ = reports.send(Event::Started(0));
                // Never looks at its stop.
                std::future::pending::<()>().await;
            }
        });
        service.grace = Some(Duration::from_secs(5));
        let (listener, addr) = tcp().await;
        let (shutdown, served) = spawn_serve(service, listener);
        let _client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(next(&mut events).await, Event::Started(0));
        let stopping = tokio::time::Instant::now();
        shutdown.send(()).unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(stopping.elapsed(), Duration::from_secs(5));
        assert_eq!(next(&mut events).await, Event::Aborted);
        assert_eq!(next(&mut events).await, Event::Flushed);
    }

    #[test]
    fn a_handle_serves_a_unix_socket_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.sock");
        let (events_tx, mut events) = unbounded_channel();
        let echo = Arc::new(Echo::new(2, events_tx.clone()));
        let service = Test::new(&events_tx, move |stream, stop| {
            let echo = Arc::clone(&echo);
            async move {
                let (rd, wr) = tokio::io::split(stream);
                transmission(echo, rd, wr, LIMITS, stop).await.unwrap();
            }
        });
        let handle = ServerHandle::start_unix(service, &path).unwrap();
        assert_eq!(handle.local_addr(), None);
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut client, &[9, 0]).unwrap();
        let mut reply = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut reply).unwrap();
        assert_eq!(reply, [9, 9]);
        handle.shutdown().unwrap();
        assert!(!path.exists(), "the socket file is removed");
        assert_eq!(events.try_recv().unwrap(), Event::Started(9));
        assert_eq!(events.try_recv().unwrap(), Event::Executed(9));
        assert_eq!(events.try_recv().unwrap(), Event::Flushed);
    }
}

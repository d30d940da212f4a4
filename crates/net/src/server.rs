//! The server: exposes [`Backend`]s (and migration [`Seeder`]s) to clients over TCP (TLS 1.3 by
//! default), plaintext TCP when asked for, and Unix sockets.
//!
//! Each connection has a reader that decodes frames and starts every request at once (up to
//! `max_in_flight` per connection) on tokio's blocking pool, since backends are blocking; replies
//! go back in completion order through one writer. A malformed frame gets an error reply and
//! closes that connection only. Shutdown stops accepting, lets requests in flight finish, then
//! flushes every export.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r3map_core::{Capabilities, Seeder, SharedBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::errno;
use crate::frame_io::write_frame;
use crate::pool::BufPool;
use crate::proto::{
    self, ClientHello, ExportInfo, Op, REQUEST_HEADER_LEN, Refusal, ReplyHeader, RequestHeader, ServerHello,
    export_flags,
};
use crate::runtime::Io;
use crate::security::{BoxedIo, ServerSecurity, same_secret};

/// One named resource a server offers.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub backend: SharedBackend,
    /// Migration source operations (track, sync, close), when this export is one.
    pub seeder: Option<Arc<dyn Seeder>>,
    /// Chunk size announced to clients (a hint for their own chunking).
    pub chunk_size: u32,
    pub read_only: bool,
    /// The data is gone when this process ends (a memory backend); clients are told, with the
    /// export's instance number, so that they never take a restarted server for the old one.
    pub volatile: bool,
    /// Drawn at random when the export is made (see [`ExportInfo::instance`]).
    instance: u64,
    /// The last answers to the seeder operations, for a destination that asks again.
    answers: Arc<Mutex<SeederAnswers>>,
}

/// What the seeder answered last, so that a destination whose connection dropped before the
/// answer arrived can ask again and get the same chunk list (the source already cleared it).
#[derive(Debug, Default)]
struct SeederAnswers {
    /// The last pre-copy round: its number (the request's `offset`) and its encoded chunk list.
    round: Option<(u64, Vec<u8>)>,
    /// The encoded answer of the final `sync`.
    sync: Option<Vec<u8>>,
}

impl SeederAnswers {
    /// TRACK: a new migration; its track runs under the lock so that nothing interleaves.
    fn track(this: &Mutex<Self>, seeder: &dyn Seeder) -> io::Result<()> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seeder.track()?;
        *answers = Self::default();
        Ok(())
    }

    /// DIRTY round `round`: a repeated round number gets the stored answer; round 0 (a client
    /// that does not number its rounds) always takes a new set.
    fn round(this: &Mutex<Self>, seeder: &dyn Seeder, round: u64) -> io::Result<Vec<u8>> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, payload)) = answers.round.as_ref().filter(|(n, _)| round != 0 && *n == round) {
            tracing::info!(round, "migration: a pre-copy round was asked for again");
            return Ok(payload.clone());
        }
        let payload = encode(&seeder.take_dirty()?);
        answers.round = Some((round, payload.clone()));
        Ok(payload)
    }

    /// SYNC: the first successful one suspends the source; later ones get the same answer
    /// (nothing was written at the source since).
    fn sync(this: &Mutex<Self>, seeder: &dyn Seeder) -> io::Result<Vec<u8>> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(payload) = &answers.sync {
            tracing::info!("migration: the final sync was asked for again");
            return Ok(payload.clone());
        }
        let payload = encode(&seeder.sync()?);
        answers.sync = Some(payload.clone());
        Ok(payload)
    }
}

fn encode(chunks: &[r3map_core::Chunk]) -> Vec<u8> {
    let ids: Vec<u64> = chunks.iter().map(|c| c.0).collect();
    proto::encode_chunks(&ids)
}

impl Export {
    /// A writable export with a chunk size of 64 KiB and no seeder.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self {
            name: name.into(),
            backend,
            seeder: None,
            chunk_size: 64 * 1024,
            read_only: false,
            volatile: false,
            instance: fastrand::u64(1..),
            answers: Arc::default(),
        }
    }

    /// Marks the export volatile (see [`Export::volatile`]).
    #[must_use]
    pub fn volatile(mut self) -> Self {
        self.volatile = true;
        self
    }

    #[must_use]
    pub fn with_seeder(mut self, seeder: Arc<dyn Seeder>) -> Self {
        self.seeder = Some(seeder);
        self
    }

    #[must_use]
    pub fn with_chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    fn info(&self, max_request: u32) -> ExportInfo {
        let caps: Capabilities = self.backend.capabilities();
        let mut flags = 0;
        if self.read_only || caps.read_only {
            flags |= export_flags::READ_ONLY;
        }
        if caps.trim {
            flags |= export_flags::TRIM;
        }
        if caps.write_zeroes {
            flags |= export_flags::WRITE_ZEROES;
        }
        if self.seeder.is_some() {
            flags |= export_flags::SEEDER;
        }
        if self.volatile {
            flags |= export_flags::VOLATILE;
        }
        ExportInfo {
            size: self.backend.size(),
            chunk_size: self.chunk_size,
            max_request,
            flags,
            instance: self.instance,
        }
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("seeder", &self.seeder.is_some())
            .field("chunk_size", &self.chunk_size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Everything a server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub exports: Vec<Export>,
    /// TLS for TCP listeners (Unix sockets are always plaintext).
    pub security: ServerSecurity,
    /// The shared secret clients must send; `None` accepts any client that passes TLS (use with
    /// mutual TLS or on a Unix socket).
    pub token: Option<String>,
    /// Largest request and reply payload.
    pub max_request: u32,
    /// Requests executed at once per connection.
    pub max_in_flight: usize,
    /// How long a client may take for the TLS handshake and, again, for its hello; one that takes
    /// longer is disconnected. Shutdown does not wait for it either way.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    /// One export, the given security, no token, 32 MiB requests, 64 in flight per connection,
    /// [`HANDSHAKE_TIMEOUT`] for the handshake.
    #[must_use]
    pub fn new(export: Export, security: ServerSecurity) -> Self {
        Self {
            exports: vec![export],
            security,
            token: None,
            max_request: proto::DEFAULT_MAX_REQUEST,
            max_in_flight: 64,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// What a running server counts (also exported as `metrics` under `r3map_server_*`).
struct Inner {
    exports: HashMap<String, Export>,
    security: ServerSecurity,
    token: Option<String>,
    max_request: u32,
    max_in_flight: usize,
    handshake_timeout: Duration,
    pool: BufPool,
}

/// A server for one or more exports. Cheap to clone; serve it on as many listeners as you like.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("exports", &self.inner.exports.values().collect::<Vec<_>>()).finish()
    }
}

/// Default [`ServerConfig::handshake_timeout`]: how long a client may take for the TLS handshake
/// and its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Signals shutdown to everything a server runs.
type Shutdown = watch::Receiver<bool>;

impl Server {
    /// # Errors
    /// `InvalidInput` for no exports, duplicate names, or a maximum request below 4 KiB.
    pub fn new(config: ServerConfig) -> io::Result<Self> {
        if config.exports.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a server needs at least one export"));
        }
        if config.max_request < proto::MIN_MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the maximum request size must be at least {} bytes", proto::MIN_MAX_REQUEST),
            ));
        }
        let mut exports = HashMap::new();
        for e in config.exports {
            if e.name.len() > proto::MAX_NAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an export name is longer than 4096 bytes",
                ));
            }
            let name = e.name.clone();
            if exports.insert(name.clone(), e).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the export name '{name}' is used twice"),
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                exports,
                security: config.security,
                token: config.token,
                max_request: config.max_request,
                max_in_flight: config.max_in_flight.max(1),
                handshake_timeout: config.handshake_timeout,
                pool: BufPool::new(256),
            }),
        })
    }

    /// Serves TCP connections from `listener` until `shutdown` completes, then finishes requests in
    /// flight and flushes every export.
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let acceptor = match &self.inner.security {
            ServerSecurity::Tls(config) => Some(tokio_rustls::TlsAcceptor::from(Arc::clone(config))),
            ServerSecurity::Plaintext => None,
        };
        self.serve(Listener::Tcp(listener, acceptor), shutdown).await
    }

    /// Serves Unix socket connections until `shutdown` completes, as [`Server::serve_tcp`].
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.serve(Listener::Unix(listener), shutdown).await
    }

    async fn serve(&self, listener: Listener, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(incoming) => {
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(async move {
                            let peer = incoming.peer.clone();
                            let mut early_stop = stop.clone();
                            let timeout = server.inner.handshake_timeout;
                            let established = tokio::select! {
                                r = tokio::time::timeout(timeout, incoming.establish()) => r,
                                _ = early_stop.changed() => return,
                            };
                            match established {
                                Ok(Ok(io)) => server.serve_connection(io, peer, stop).await,
                                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the clients we have.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!(connections = connections.len(), "shutting down: finishing requests in flight");
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
        self.flush_all().await
    }

    /// Flushes every export's backend.
    ///
    /// # Errors
    /// The first failed flush.
    pub async fn flush_all(&self) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            r3map_core::flush_each(inner.exports.values().map(|e| (e.name.as_str(), &*e.backend)))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Serves one connection that is already established (and, for TCP, already through TLS).
    ///
    /// A client has [`ServerConfig::handshake_timeout`] to complete its hello; shutdown ends a
    /// handshake that is still going on.
    pub async fn serve_connection(&self, mut io: BoxedIo, peer: String, mut shutdown: Shutdown) {
        let hello = tokio::select! {
            r = tokio::time::timeout(self.inner.handshake_timeout, self.handshake(&mut io)) => r,
            _ = shutdown.changed() => return,
        };
        let export = match hello {
            Ok(Ok(Some(export))) => export,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "the client sent no hello in time");
                return;
            }
        };
        tracing::debug!(%peer, export = %export.name, "client connected");
        metrics::counter!("r3map_server_connections_total").increment(1);
        if let Err(e) = self.transmission(io, export, shutdown).await {
            tracing::info!(%peer, error = %e, "connection ended with an error");
        }
    }

    /// Reads the client's hello and answers it. `Ok(None)`: refused (and told why).
    async fn handshake(&self, io: &mut BoxedIo) -> io::Result<Option<Export>> {
        let mut buf = Vec::with_capacity(128);
        let hello = loop {
            match ClientHello::decode(&buf) {
                Ok(Some((hello, _))) => break hello,
                Ok(None) => {}
                Err(e) => {
                    refuse(io, Refusal::BadHello, &e.to_string()).await?;
                    return Ok(None);
                }
            }
            if buf.len() > 2 * proto::MAX_NAME + 64 {
                refuse(io, Refusal::BadHello, "the hello is too long").await?;
                return Ok(None);
            }
            let mut byte = [0u8; 256];
            let n = io.read(&mut byte).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client left during the handshake",
                ));
            }
            buf.extend_from_slice(&byte[..n]);
        };
        if hello.version != proto::VERSION {
            let msg =
                format!("this server speaks protocol version {}, not {}", proto::VERSION, hello.version);
            refuse(io, Refusal::Version, &msg).await?;
            return Ok(None);
        }
        if let Some(token) = &self.inner.token
            && !same_secret(token.as_bytes(), hello.token.as_bytes())
        {
            metrics::counter!("r3map_server_refused_total", "reason" => "unauthorized").increment(1);
            refuse(io, Refusal::Unauthorized, "wrong or missing token").await?;
            return Ok(None);
        }
        let Some(export) = self.inner.exports.get(&hello.export) else {
            refuse(io, Refusal::UnknownExport, &format!("no export named '{}'", hello.export)).await?;
            return Ok(None);
        };
        let max_request = hello.max_request.min(self.inner.max_request);
        let reply = ServerHello::Accepted { version: proto::VERSION, info: export.info(max_request) };
        io.write_all(&reply.encode()).await?;
        io.flush().await?;
        Ok(Some(export.clone()))
    }

    async fn transmission(&self, io: BoxedIo, export: Export, mut shutdown: Shutdown) -> io::Result<()> {
        let max_request = self.inner.max_request;
        let (mut rd, wr) = tokio::io::split(io);
        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let writer = tokio::spawn(write_replies(wr, rx, Arc::clone(&self.inner)));
        let permits = Arc::new(Semaphore::new(self.inner.max_in_flight));
        let export = Arc::new(export);
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Ok(()),
                read = rd.read_exact(&mut header) => {
                    if let Err(e) = read {
                        // A client that hangs up between frames is the normal end.
                        break if e.kind() == io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
                    }
                }
            }
            let h = match RequestHeader::decode(&header, max_request) {
                Ok(h) => h,
                Err(e) => {
                    metrics::counter!("r3map_server_errors_total", "op" => "frame").increment(1);
                    let id = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
                    let _ = tx.send(Reply::error(id, errno::EINVAL, format!("malformed frame: {e}")));
                    break Err(e.into());
                }
            };
            if h.op == Op::Disconnect {
                break Ok(());
            }
            let mut payload = Vec::new();
            if h.payload_len() > 0 {
                payload = self.inner.pool.take(h.payload_len());
                rd.read_exact(&mut payload).await?;
            }
            let permit = Arc::clone(&permits).acquire_owned().await.map_err(io::Error::other)?;
            let export = Arc::clone(&export);
            let inner = Arc::clone(&self.inner);
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let reply = execute(&export, &inner.pool, h, payload);
                record(h.op, &reply, started);
                let _ = tx.send(reply);
                drop(permit);
            });
        };
        // Let requests in flight finish and their replies go out.
        let _ = permits.acquire_many(u32::try_from(self.inner.max_in_flight).unwrap_or(u32::MAX)).await;
        drop(tx);
        writer.await.map_err(io::Error::other)??;
        result
    }
}

/// A reply on its way to the writer.
struct Reply {
    header: ReplyHeader,
    payload: Vec<u8>,
    pooled: bool,
}

impl Reply {
    fn error(id: u64, code: u32, message: String) -> Self {
        let payload = message.into_bytes();
        let length = u32::try_from(payload.len()).unwrap_or(0);
        Self { header: ReplyHeader { status: code, id, length }, payload, pooled: false }
    }

    fn ok(id: u64, payload: Vec<u8>, pooled: bool) -> Self {
        let length = u32::try_from(payload.len()).expect("payloads are bounded by the maximum request");
        Self { header: ReplyHeader { status: 0, id, length }, payload, pooled }
    }
}

fn execute(export: &Export, pool: &BufPool, h: RequestHeader, payload: Vec<u8>) -> Reply {
    let backend = &export.backend;
    let writable = || {
        if export.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the export '{}' is read-only", export.name),
            ))
        } else {
            Ok(())
        }
    };
    let seeder = || {
        export.seeder.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the export '{}' is not a migration source", export.name),
            )
        })
    };
    let result: io::Result<(Vec<u8>, bool)> = match h.op {
        Op::Read => {
            let mut buf = pool.take(h.length as usize);
            match backend.read_at(&mut buf, h.offset) {
                Ok(()) => Ok((buf, true)),
                Err(e) => {
                    pool.put(buf);
                    Err(e)
                }
            }
        }
        Op::Write => {
            let r = writable().and_then(|()| backend.write_at(&payload, h.offset));
            pool.put(payload);
            r.map(|()| (Vec::new(), false))
        }
        Op::Flush => backend.flush().map(|()| (Vec::new(), false)),
        Op::Trim => writable()
            .and_then(|()| backend.trim(h.offset, u64::from(h.length)))
            .map(|()| (Vec::new(), false)),
        Op::WriteZeroes => writable()
            .and_then(|()| backend.write_zeroes(h.offset, u64::from(h.length)))
            .map(|()| (Vec::new(), false)),
        Op::Track => {
            seeder().and_then(|s| SeederAnswers::track(&export.answers, &**s)).map(|()| (Vec::new(), false))
        }
        Op::Sync => seeder().and_then(|s| SeederAnswers::sync(&export.answers, &**s)).map(|p| (p, false)),
        Op::Dirty => {
            seeder().and_then(|s| SeederAnswers::round(&export.answers, &**s, h.offset)).map(|p| (p, false))
        }
        Op::Close => seeder().and_then(|s| s.close()).map(|()| (Vec::new(), false)),
        Op::Disconnect => Ok((Vec::new(), false)),
    };
    match result {
        Ok((payload, pooled)) => Reply::ok(h.id, payload, pooled),
        Err(e) => Reply::error(h.id, errno::from_io(&e), e.to_string()),
    }
}

/// Counts a request in the metrics. Each operation's label is a literal, so that its metric keys
/// are statics (a key built from a runtime string allocates on every request).
fn record(op: Op, reply: &Reply, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let failed = reply.header.status != 0;
    macro_rules! per_op {
        ($op:literal) => {{
            metrics::counter!("r3map_server_requests_total", "op" => $op).increment(1);
            metrics::histogram!("r3map_server_request_seconds", "op" => $op).record(seconds);
            if failed {
                metrics::counter!("r3map_server_errors_total", "op" => $op).increment(1);
            }
        }};
    }
    match op {
        Op::Read => per_op!("read"),
        Op::Write => per_op!("write"),
        Op::Flush => per_op!("flush"),
        Op::Trim => per_op!("trim"),
        Op::WriteZeroes => per_op!("write_zeroes"),
        Op::Track => per_op!("track"),
        Op::Sync => per_op!("sync"),
        Op::Close => per_op!("close"),
        Op::Disconnect => per_op!("disconnect"),
        Op::Dirty => per_op!("dirty"),
    }
    if !failed && op == Op::Read {
        metrics::counter!("r3map_server_bytes_total", "direction" => "read")
            .increment(u64::from(reply.header.length));
    }
}

async fn write_replies(
    wr: tokio::io::WriteHalf<BoxedIo>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    inner: Arc<Inner>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(reply) = rx.recv().await {
        write_frame(&mut out, &reply.header.encode(), &reply.payload).await?;
        if reply.pooled {
            inner.pool.put(reply.payload);
        }
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}

async fn refuse(io: &mut BoxedIo, reason: Refusal, message: &str) -> io::Result<()> {
    let hello = ServerHello::Refused { version: proto::VERSION, reason, message: message.to_owned() };
    io.write_all(&hello.encode()).await?;
    io.flush().await?;
    io.shutdown().await
}

enum Listener {
    Tcp(TcpListener, Option<tokio_rustls::TlsAcceptor>),
    Unix(UnixListener),
}

/// An accepted connection, before TLS.
struct Incoming {
    peer: String,
    stream: IncomingStream,
}

enum IncomingStream {
    Tcp(tokio::net::TcpStream, Option<tokio_rustls::TlsAcceptor>),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Incoming> {
        match self {
            Self::Tcp(l, acceptor) => {
                let (tcp, peer) = l.accept().await?;
                tcp.set_nodelay(true)?;
                Ok(Incoming { peer: peer.to_string(), stream: IncomingStream::Tcp(tcp, acceptor.clone()) })
            }
            Self::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Incoming { peer: "unix socket".to_owned(), stream: IncomingStream::Unix(s) })
            }
        }
    }
}

impl Incoming {
    /// Runs the TLS handshake where there is one.
    async fn establish(self) -> io::Result<BoxedIo> {
        match self.stream {
            IncomingStream::Tcp(tcp, Some(acceptor)) => Ok(Box::new(acceptor.accept(tcp).await?)),
            IncomingStream::Tcp(tcp, None) => Ok(Box::new(tcp)),
            IncomingStream::Unix(s) => Ok(Box::new(s)),
        }
    }
}

/// A server running as a task on the process's shared runtime ([`Io::shared`]), for callers
/// without an async runtime of their own (tests, benchmarks, simple tools).
#[derive(Debug)]
pub struct ServerHandle {
    addr: Option<SocketAddr>,
    path: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
    io: Io,
}

impl ServerHandle {
    /// Serves TCP on `addr` (port 0 picks one; see [`ServerHandle::local_addr`]).
    ///
    /// # Errors
    /// Binding the address.
    pub fn start_tcp(server: Server, addr: SocketAddr) -> io::Result<Self> {
        let io = Io::shared();
        let listener = io.block_on(TcpListener::bind(addr))?;
        Self::serve_tcp_on(server, io, listener)
    }

    /// Serves TCP on a listener the caller bound, with whatever socket options it needs (the
    /// server takes it over and closes it at shutdown).
    ///
    /// # Errors
    /// The listener cannot be used by tokio.
    pub fn start_tcp_listener(server: Server, listener: std::net::TcpListener) -> io::Result<Self> {
        let io = Io::shared();
        listener.set_nonblocking(true)?;
        let listener = {
            let _guard = io.handle().enter();
            TcpListener::from_std(listener)?
        };
        Self::serve_tcp_on(server, io, listener)
    }

    fn serve_tcp_on(server: Server, io: Io, listener: TcpListener) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = io.handle().spawn(async move {
            server
                .serve_tcp(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self { addr: Some(local), path: None, stop: Some(stop), task: Some(task), io })
    }

    /// Serves a Unix socket at `path` (replacing a stale socket file).
    ///
    /// # Errors
    /// Binding the socket.
    pub fn start_unix(server: Server, path: &Path) -> io::Result<Self> {
        let io = Io::shared();
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = {
            let _guard = io.handle().enter();
            UnixListener::bind(path)?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = io.handle().spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self { addr: None, path: Some(path.to_owned()), stop: Some(stop), task: Some(task), io })
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
